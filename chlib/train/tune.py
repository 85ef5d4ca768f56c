"""Hyperparameter tuning: experiment plans and resumable sweeps over seeds.

A *plan* (YAML, e.g. ``chlib/recipes/tune_demo.yaml``; keys in :mod:`chlib.train.tune_plan`)
names a base config, the *factors* to vary (``one_factor``: each alone; ``grid``: every
combination) and the *seeds*. Every (setting, seed) pair is an ordinary run folder,
``<tune_dir>/experiments/<name>/seed_<s>/`` (+ ``done.json`` when finished), beside
``plan.yaml``, ``plan.json``, ``config/hparams.yaml`` (the base) and ``summary.csv/json``.
No Optuna: each trial is a full training run and seed noise on small datasets is as large as
the effects, so TPE and pruners gain little.
"""

from __future__ import annotations

import itertools
import os
import shlex
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from chlib.core.config import HParams, load_hparams, save_hparams
from chlib.core.errors import ChlibError, ConfigError
from chlib.core.io import atomic_write_text, stable_hash, write_json
from chlib.core.schema import check
from chlib.train.loop import make_run_config, train
from chlib.train.runs import run_config
from chlib.train.tune_plan import (
    Experiment,
    TunePlan,
    expand_plan,
    load_plan,
    parse_plan,
    run_overrides,
)
from chlib.train.tune_summary import (
    READING_GUIDE,
    TuneSummary,
    ls_slope,
    reading,
    seed_series,
    seed_status,
    summarise,
)

# re-exported: the notebooks and tests use the tuning API from this one module
__all__ = ["READING_GUIDE", "Experiment", "TunePlan", "TuneResult", "parse_plan", "load_plan",
           "expand_plan", "run_overrides", "run_plan", "batch_commands", "seed_series",
           "ls_slope", "reading", "summarise"]


def _resolve_config(plan: TunePlan, overrides: dict, dataset_dir: str | None,
                    tune_dir: Path) -> HParams:
    """The training config of one run. A recipe base is written to ``<tune_dir>/config/`` by
    :func:`make_run_config` (with ``test_unseen.txt``, which every experiment then names)."""
    if plan.base_config is not None:
        return load_hparams(plan.base_config).updated(overrides)
    return load_hparams(make_run_config(tune_dir, plan.base_recipe, overrides,
                                        dataset_dir=dataset_dir))


def _in(cwd: str | os.PathLike | None, path: Any) -> Any:
    """``path`` (None, or relative to the project folder ``cwd``) as the process can open it;
    unchanged when ``cwd`` is the working directory, so stored configs keep relative paths."""
    if path is None or cwd is None or Path(path).is_absolute() or \
            Path(cwd).resolve() == Path.cwd().resolve():
        return path
    return str(Path(cwd) / path)


def _config_key(hp: HParams) -> str:
    """Hash of a config without its seed (equal settings -> equal key)."""
    return stable_hash({k: v for k, v in hp.to_dict().items() if k != "seed"})


def _merge_aliases(plan: TunePlan, exps: list[Experiment],
                   configs: dict[str, HParams]) -> list[Experiment]:
    """one_factor mode: experiments whose config equals an earlier one's become its aliases."""
    if plan.mode != "one_factor":
        return exps
    same: dict[str, list[Experiment]] = {}
    for e in exps:
        same.setdefault(_config_key(configs[e.name]), []).append(e)
    return [replace(g[0], aliases=tuple(e.name for e in g[1:])) for g in same.values()]


@dataclass
class TuneResult:
    """What :func:`run_plan` did: per run ``{experiment, seed, status, seconds, error}``, the
    experiments (after merging aliases) and the summary of the tuning folder."""

    tune_dir: Path
    experiments: list[Experiment]
    runs: list[dict]
    summary: TuneSummary | None = None
    stopped_early: bool = False

    def report(self) -> str:
        counts = Counter(r["status"] for r in self.runs)
        lines = [f"tuning folder {self.tune_dir}: " +
                 ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
        lines += [f"  {r['experiment']} seed {r['seed']}: {r['status']}: {r['error']}"
                  for r in self.runs if r["status"] in ("failed", "diverged")]
        if self.stopped_early:
            lines.append("  stopped early (max_runs); run again to continue")
        return "\n".join(lines)


def _notebook_params(plan: TunePlan, exp: Experiment, seed: int | None, dataset_dir: str | None,
                     device: str, hp: HParams | None = None) -> dict[str, Any]:
    """``03_train``'s parameters for one run; with ``hp`` (papermill) its max_epochs, and a
    config base handed over whole as overrides (no recipe behind it)."""
    if hp is not None and plan.base_config is not None:
        params: dict[str, Any] = {"overrides": hp.to_dict()}
    else:
        params = {"recipe": plan.base_recipe, "overrides": run_overrides(plan, exp, seed)}
    params.update(device=device, seed=seed,
                  max_epochs=plan.max_epochs if hp is None else hp.max_epochs,
                  dataset_dir=dataset_dir)
    return {k: v for k, v in params.items() if v is not None}


def _train_papermill(seed_dir: Path, params: dict[str, Any], progress: bool,
                     cwd: str | os.PathLike | None) -> None:
    """Execute ``03_train`` with papermill into ``<seed_dir>/notebooks/03_train.ipynb``; the
    notebook is searched from ``cwd`` upwards, then beside the package."""
    import papermill as pm

    here = Path(cwd or Path.cwd()).resolve()
    path = next((p for d in [here, *here.parents, Path(__file__).resolve().parents[2]]
                 if (p := d / "notebooks" / "03_train.ipynb").is_file()), None)
    if path is None:
        raise ConfigError(f"no notebooks/03_train.ipynb found from {here} upwards; run from the "
                          "chlib repository root")
    declared = pm.inspect_notebook(str(path))
    params = {**params, "run_dir": str(seed_dir)}
    out = seed_dir / "notebooks" / path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        pm.execute_notebook(str(path), str(out), kernel_name="python3", progress_bar=progress,
                            parameters={k: v for k, v in params.items() if k in declared},
                            cwd=str(Path(cwd) if cwd else path.parent.parent))
    except pm.PapermillExecutionError as e:
        raise ChlibError(f"{e.ename}: {e.evalue} (cell {e.exec_count}; see {out})") from None


def _prepare_plan(plan: TunePlan, tune_dir: Path, dataset_dir: str | None
                  ) -> tuple[list[Experiment], dict[str, HParams], list[int]]:
    """Resolve and check every experiment's config, merge aliases, write the plan files."""
    exps = expand_plan(plan)
    tune_dir.mkdir(parents=True, exist_ok=True)
    configs: dict[str, HParams] = {}
    for e in exps:  # every setting is checked before any training starts
        try:
            configs[e.name] = _resolve_config(plan, run_overrides(plan, e, None), dataset_dir,
                                              tune_dir)
        except ConfigError as err:
            raise ConfigError(f"{plan.source}: experiment {e.name!r} ({e.settings or 'the base'})"
                              f" gives an invalid config: {err}") from err
    base_hp = _resolve_config(plan, run_overrides(plan, Experiment("base"), None), dataset_dir,
                              tune_dir)
    save_hparams(base_hp, tune_dir / "config" / "hparams.yaml")
    seeds = plan.seeds if plan.seeds is not None else [base_hp.seed]
    exps = _merge_aliases(plan, exps, configs)
    test_names = sorted(base_hp.testsets)
    check(plan.test_name is None or plan.test_name in test_names, plan.source, f"test_name "
          f"{plan.test_name!r} is not a test set of the base config (test sets: "
          f"{', '.join(test_names) or 'none'})")
    atomic_write_text(tune_dir / "plan.yaml",
                      yaml.safe_dump(plan.raw, sort_keys=False, allow_unicode=True))
    write_json(tune_dir / "plan.json", {
        "source": plan.source, "mode": plan.mode, "seeds": seeds, "test_name": plan.test_name,
        "window": plan.early_stopping_patience or base_hp.early_stopping_patience,
        "flat_map_slope": plan.flat_map_slope, "flat_loss_slope": plan.flat_loss_slope,
        "experiments": [{"name": e.name, "settings": e.settings, "aliases": list(e.aliases)}
                        for e in exps],
    })
    return exps, configs, seeds


def run_plan(plan: TunePlan | str | os.PathLike, tune_dir: str | os.PathLike, *,
             dataset_dir: str | None = None, device: str = "auto", launch: str = "inprocess",
             progress: bool = True, max_runs: int | None = None,
             cwd: str | os.PathLike | None = None, summarise_after: bool = True,
             callbacks: Sequence[Callable[[dict], Any]] | None = None,
             train_fn: Callable[[Path], None] | None = None) -> TuneResult:
    """Run (or resume) every experiment x seed of ``plan`` (a TunePlan or a YAML path).

    Finished runs (``done.json``) are skipped, half-finished ones resume; a diverged run is not
    retried, another failure (``failed.json``) is, next time. ``launch``: ``"inprocess"`` or
    ``"papermill"`` (``03_train`` executed into each run folder). ``max_runs``: start no more
    runs after that many. ``cwd``: the project folder that relative paths (the plan, tune_dir,
    dataset_dir, a base config) are taken from and papermill kernels run in (default: the working
    directory). ``callbacks`` (in-process): epoch records plus ``experiment`` and ``seed``.
    ``train_fn(seed_dir)`` replaces the training call.
    """
    plan = plan if isinstance(plan, TunePlan) else load_plan(_in(cwd, plan))
    if launch not in ("inprocess", "papermill"):
        raise ConfigError(f"launch must be 'inprocess' or 'papermill', got {launch!r}")
    tune_dir = Path(_in(cwd, tune_dir))
    dataset_dir = _in(cwd, dataset_dir or plan.dataset_dir)
    plan = replace(plan, base_config=_in(cwd, plan.base_config))
    check(launch != "papermill" or plan.base_config is None or dataset_dir is not None,
          plan.source, "launch='papermill' with a config base needs dataset_dir (03_train builds "
          "its config from a dataset folder; the base config's settings then override it)")
    exps, configs, seeds = _prepare_plan(plan, tune_dir, dataset_dir)

    def train_one(seed_dir: Path, e: Experiment, seed: int, hp: HParams) -> None:
        if train_fn is not None:
            train_fn(seed_dir)
        elif launch == "papermill":
            _train_papermill(seed_dir, _notebook_params(plan, e, seed, dataset_dir, device, hp),
                             progress, cwd)
        elif train(seed_dir, device=device, progress=progress, callbacks=[
                lambda rec, cb=cb: cb({**rec, "experiment": e.name, "seed": seed})
                for cb in callbacks or ()]).interrupted:
            raise KeyboardInterrupt  # Ctrl-C inside train: it saved; stop the session

    runs: list[dict] = []
    started = 0
    for seed, e in itertools.product(seeds, exps):  # seed-major: a first look at each comes early
        seed_dir = tune_dir / "experiments" / e.name / f"seed_{seed}"
        hp = configs[e.name].updated({"seed": seed})
        run_config(seed_dir, hp, "", "the plan changed under an existing experiment. Use a new "
                   "tuning folder, or delete this experiment's folder to rerun it")
        who, status = {"experiment": e.name, "seed": seed}, seed_status(seed_dir)
        if status in _FINISHED or (max_runs is not None and started >= max_runs):
            runs.append({**who, "status": f"skipped ({status})" if status in _FINISHED
                         else "not started", "seconds": 0.0, "error": None})
        else:
            started += 1
            runs.append(_run_one(seed_dir, who, partial(train_one, seed_dir, e, seed, hp),
                                 {"config_key": _config_key(hp), "launch": launch}))
    result = TuneResult(tune_dir=tune_dir, experiments=exps, runs=runs, stopped_early=any(
        r["status"] == "not started" for r in runs))
    if summarise_after:
        result.summary = summarise(tune_dir)
    return result


_FINISHED = ("ok", "diverged")  # a diverged run is not retried


def _run_one(seed_dir: Path, who: dict, train_it: Callable[[], None], done_info: dict) -> dict:
    """Train one run and mark it: ``done.json`` (ok, or diverged: the NaN guard, not retried)
    or ``failed.json`` (retried next time); one bad experiment must not stop the session."""
    t0 = time.monotonic()
    (seed_dir / "failed.json").unlink(missing_ok=True)
    status, error = "ok", None
    try:
        train_it()
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
        status = "diverged" if "diverg" in error.lower() else "failed"
    seconds = time.monotonic() - t0
    if status == "failed":
        write_json(seed_dir / "failed.json", {**who, "error": error, "seconds": seconds})
    else:
        write_json(seed_dir / "done.json", {"status": status, **who, "seconds": seconds,
                                            **({"error": error} if error else done_info)})
    return {**who, "status": status, "seconds": seconds, "error": error}


def batch_commands(plan: TunePlan | str | os.PathLike, tune_dir: str | os.PathLike, *,
                   dataset_dir: str | None = None, device: str = "auto") -> list[str]:
    """Shell commands that run the plan's pending runs elsewhere, one ``python -m chlib run
    03_train`` each (recipe bases only). Copy the finished ``experiments/`` folders back and
    :func:`summarise` reads them (their status shows as ``unmarked``: no done.json)."""
    plan = plan if isinstance(plan, TunePlan) else load_plan(plan)
    check(plan.base_config is None, plan.source, "batch_commands needs a recipe base (base: "
          "{recipe: ...}); with a config base use run_plan(launch='papermill')")
    dataset_dir = dataset_dir or plan.dataset_dir
    out = []
    seeds = plan.seeds if plan.seeds is not None else [None]
    for seed, e in itertools.product(seeds, expand_plan(plan)):  # in run_plan's order
        seed_dir = Path(tune_dir) / "experiments" / e.name / f"seed_{seed}"
        if seed is not None and seed_status(seed_dir) in _FINISHED:
            continue
        params = _notebook_params(plan, e, seed, dataset_dir, device)
        parts = ["python", "-m", "chlib", "run", "03_train", "--runs-root", str(seed_dir.parent),
                 "--run", seed_dir.name]
        parts += [x for k, v in params.items()
                  for x in ("-p", k, repr(v) if k == "overrides" else str(v))]
        out.append(" ".join(shlex.quote(p) for p in parts))
    return out


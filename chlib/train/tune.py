"""Hyperparameter tuning: experiment plans and resumable sweeps over seeds.

A *plan* (YAML, e.g. ``chlib/recipes/tune_demo.yaml``; keys in :mod:`chlib.train.tune_plan`)
names a base training config, the *factors* to vary (``one_factor``: each alone from the base;
``grid``: every combination) and the *seeds*. Every (setting, seed) pair is an ordinary run::

    <tune_dir>/plan.yaml, plan.json            the plan as given; the expanded experiments
    <tune_dir>/config/hparams.yaml             the base config (+ test_unseen.txt)
    <tune_dir>/experiments/<name>/seed_<s>/    a run folder (+ done.json when finished)
    <tune_dir>/summary.csv, summary.json       :func:`chlib.train.tune_summary.summarise`

Unlike the original's ``train_tune``: resumable (finished runs are skipped, changed settings
under an existing folder are an error), one_factor values equal to the base merge into it,
seed-major order, honest statistics. Optuna is not used: each trial is a full training run and
seed noise on small datasets is as large as the effects, so TPE and pruners gain little.
"""

from __future__ import annotations

import os
import shlex
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from chlib.core.config import HParams, load_hparams, save_hparams
from chlib.core.errors import ChlibError, ConfigError
from chlib.core.io import atomic_write_text, stable_hash, write_json
from chlib.train.loop import make_run_config, train
from chlib.train.runs import check_saved_config
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
__all__ = [
    "READING_GUIDE", "Experiment", "TunePlan", "TuneResult", "parse_plan", "load_plan",
    "expand_plan", "run_overrides", "run_plan", "batch_commands", "seed_series", "ls_slope",
    "reading", "summarise",
]


def _resolve_config(plan: TunePlan, overrides: dict, dataset_dir: str | None,
                    tune_dir: Path) -> HParams:
    """The training config of one run. A recipe base is written to ``<tune_dir>/config/`` by
    :func:`make_run_config` (with ``test_unseen.txt``, which every experiment then names)."""
    if plan.base_config is not None:
        return load_hparams(plan.base_config).updated(overrides)
    kw: dict[str, Any] = {"recipe": plan.base_recipe, "overrides": overrides}
    if dataset_dir is not None:
        kw["dataset_dir"] = dataset_dir
    return load_hparams(make_run_config(tune_dir, **kw))


def _config_key(hp: HParams) -> str:
    """Hash of a config without its seed (equal settings -> equal key)."""
    d = hp.to_dict()
    d.pop("seed", None)
    return stable_hash(d)


def _merge_aliases(plan: TunePlan, exps: list[Experiment],
                   configs: dict[str, HParams]) -> list[Experiment]:
    """one_factor mode: experiments whose config equals an earlier one's become its aliases."""
    if plan.mode != "one_factor":
        return exps
    first: dict[str, int] = {}
    out: list[Experiment] = []
    for e in exps:
        key = _config_key(configs[e.name])
        if key in first:
            kept = out[first[key]]
            out[first[key]] = Experiment(kept.name, kept.settings, kept.overrides,
                                         kept.aliases + (e.name,))
            continue
        first[key] = len(out)
        out.append(e)
    return out


def _is_divergence(err: BaseException | str) -> bool:
    """True for the trainer's NaN guard (its error class or message says 'diverg')."""
    text = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    return "diverg" in text.lower()


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
        for r in self.runs:
            if r["status"] in ("failed", "diverged"):
                lines.append(f"  {r['experiment']} seed {r['seed']}: {r['status']}: {r['error']}")
        if self.stopped_early:
            lines.append("  stopped early (max_runs / time budget); run again to continue")
        return "\n".join(lines)


def _write_seed_config(seed_dir: Path, hp: HParams) -> None:
    """Write the run's config; an existing one must hold the same settings."""
    path = seed_dir / "config" / "hparams.yaml"
    if not check_saved_config(path, hp, "the plan changed under an existing experiment. Use a "
                              "new tuning folder, or delete this experiment's folder to rerun it"):
        save_hparams(hp, path)


def _tag(cb: Callable[[dict], Any], name: str, seed: int) -> Callable[[dict], Any]:
    def tagged(rec: dict) -> Any:
        return cb({**rec, "experiment": name, "seed": seed})

    return tagged


def _train_inprocess(seed_dir: Path, device: str, progress: bool,
                     callbacks: Sequence[Callable[[dict], Any]]) -> None:
    result = train(seed_dir, device=device, progress=progress, callbacks=callbacks)
    if getattr(result, "interrupted", False):  # Ctrl-C inside train: it saved; stop the session
        raise KeyboardInterrupt


def _notebook_03(cwd: str | os.PathLike | None) -> Path:
    """``notebooks/03_train.ipynb``: searched from ``cwd`` upwards, then beside the package."""
    here = Path(cwd or Path.cwd()).resolve()
    for d in [here, *here.parents, Path(__file__).resolve().parents[2]]:
        if (d / "notebooks" / "03_train.ipynb").is_file():
            return d / "notebooks" / "03_train.ipynb"
    raise ConfigError(f"no notebooks/03_train.ipynb found from {here} upwards; run from the "
                      "chlib repository root")


def _train_papermill(seed_dir: Path, *, plan: TunePlan, overrides: dict, hp: HParams,
                     dataset_dir: str | None, device: str, seed: int, progress: bool,
                     cwd: str | os.PathLike | None) -> None:
    """Execute ``03_train`` with papermill into ``<seed_dir>/notebooks/03_train.ipynb``."""
    import papermill as pm

    path = _notebook_03(cwd)
    declared = pm.inspect_notebook(str(path))
    if plan.base_config is None:
        params: dict[str, Any] = {"recipe": plan.base_recipe, "overrides": overrides}
    else:  # no recipe behind the base: hand the whole resolved config over as overrides
        params = {"overrides": hp.to_dict()}
    params.update({"run_dir": str(seed_dir), "device": device, "seed": seed,
                   "max_epochs": hp.max_epochs})
    if dataset_dir is not None:
        params["dataset_dir"] = dataset_dir
    out = seed_dir / "notebooks" / path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        pm.execute_notebook(str(path), str(out), kernel_name="python3", progress_bar=progress,
                            parameters={k: v for k, v in params.items() if k in declared},
                            cwd=str(Path(cwd) if cwd else path.parent.parent))
    except pm.PapermillExecutionError as e:
        raise _NotebookFailed(f"{e.ename}: {e.evalue} (cell {e.exec_count}; see {out})") from None


class _NotebookFailed(ChlibError):
    pass


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
    if plan.test_name is not None and plan.test_name not in test_names:
        raise ConfigError(f"{plan.source}: test_name {plan.test_name!r} is not a test set of the "
                          f"base config (test sets: {', '.join(test_names) or 'none'})")

    atomic_write_text(tune_dir / "plan.yaml",
                      yaml.safe_dump(plan.raw, sort_keys=False, allow_unicode=True))
    write_json(tune_dir / "plan.json", {
        "source": plan.source, "mode": plan.mode, "seeds": seeds,
        "test_name": plan.test_name,
        "window": plan.early_stopping_patience or base_hp.early_stopping_patience,
        "flat_map_slope": plan.flat_map_slope, "flat_loss_slope": plan.flat_loss_slope,
        "experiments": [{"name": e.name, "settings": e.settings, "aliases": list(e.aliases)}
                        for e in exps],
    })
    return exps, configs, seeds


def run_plan(
    plan: TunePlan | str | os.PathLike,
    tune_dir: str | os.PathLike,
    *,
    dataset_dir: str | None = None,
    device: str = "auto",
    launch: str = "inprocess",
    progress: bool = True,
    max_runs: int | None = None,
    time_budget_s: float | None = None,
    cwd: str | os.PathLike | None = None,
    summarise_after: bool = True,
    callbacks: Sequence[Callable[[dict], Any]] | None = None,
    train_fn: Callable[[Path], None] | None = None,
) -> TuneResult:
    """Run (or resume) every experiment x seed of ``plan`` (a TunePlan or a YAML path).

    Finished runs (``done.json``) are skipped, half-finished ones resume. A diverged run is
    marked ``diverged`` and not retried; another failure writes ``failed.json`` and is retried
    next time; the others carry on. ``KeyboardInterrupt`` stops the session.
    ``launch``: ``"inprocess"`` (:func:`train`) or ``"papermill"`` (``03_train`` executed into
    each run folder). ``max_runs`` / ``time_budget_s``: start no more runs after that many /
    that long. ``callbacks`` (in-process): epoch records plus ``experiment`` and ``seed``.
    ``train_fn(seed_dir)`` replaces the training call (tests, custom launchers).
    """
    if not isinstance(plan, TunePlan):
        plan = load_plan(plan)
    if launch not in ("inprocess", "papermill"):
        raise ConfigError(f"launch must be 'inprocess' or 'papermill', got {launch!r}")
    tune_dir = Path(tune_dir)
    dataset_dir = dataset_dir if dataset_dir is not None else plan.dataset_dir
    if launch == "papermill" and plan.base_config is not None and dataset_dir is None:
        raise ConfigError(
            f"{plan.source}: launch='papermill' with a config base needs dataset_dir (03_train "
            "builds its config from a dataset folder; the base config's settings then override it)")
    exps, configs, seeds = _prepare_plan(plan, tune_dir, dataset_dir)
    runs: list[dict] = []
    started = 0
    t_start = time.monotonic()
    stopped = False
    for seed in seeds:  # seed-major: a first look at every experiment comes early
        for e in exps:
            seed_dir = tune_dir / "experiments" / e.name / f"seed_{seed}"
            hp = configs[e.name].updated({"seed": seed})
            _write_seed_config(seed_dir, hp)
            status = seed_status(seed_dir)
            idle = {"experiment": e.name, "seed": seed, "seconds": 0.0, "error": None}
            if status in ("ok", "diverged"):
                runs.append({**idle, "status": f"skipped ({status})"})
                continue
            if (max_runs is not None and started >= max_runs) or (
                    time_budget_s is not None and time.monotonic() - t_start >= time_budget_s):
                stopped = True
                runs.append({**idle, "status": "not started"})
                continue
            started += 1
            runs.append(_run_one(seed_dir, e, seed, plan=plan, hp=hp, dataset_dir=dataset_dir,
                                 device=device, launch=launch, progress=progress, cwd=cwd,
                                 train_fn=train_fn, callbacks=callbacks))
    result = TuneResult(tune_dir=tune_dir, experiments=exps, runs=runs, stopped_early=stopped)
    if summarise_after:
        result.summary = summarise(tune_dir)
    return result


def _run_one(seed_dir: Path, exp: Experiment, seed: int, *, plan: TunePlan, hp: HParams,
             dataset_dir: str | None, device: str, launch: str, progress: bool,
             cwd: str | os.PathLike | None, train_fn: Callable[[Path], None] | None,
             callbacks: Sequence[Callable[[dict], Any]] | None = None) -> dict:
    t0 = time.monotonic()
    tagged = [_tag(cb, exp.name, seed) for cb in callbacks or ()]
    (seed_dir / "failed.json").unlink(missing_ok=True)
    who = {"experiment": exp.name, "seed": seed}
    try:
        if train_fn is not None:
            train_fn(seed_dir)
        elif launch == "inprocess":
            _train_inprocess(seed_dir, device, progress, tagged)
        else:
            _train_papermill(seed_dir, plan=plan, overrides=run_overrides(plan, exp, seed), hp=hp,
                             dataset_dir=dataset_dir, device=device, seed=seed,
                             progress=progress, cwd=cwd)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # one bad experiment must not stop the session
        seconds, text = time.monotonic() - t0, f"{type(err).__name__}: {err}"
        if _is_divergence(err):
            write_json(seed_dir / "done.json", {"status": "diverged", **who, "error": text,
                                                "seconds": seconds})
            return {**who, "status": "diverged", "seconds": seconds, "error": text}
        write_json(seed_dir / "failed.json", {**who, "error": text, "seconds": seconds})
        return {**who, "status": "failed", "seconds": seconds, "error": text}
    seconds = time.monotonic() - t0
    write_json(seed_dir / "done.json", {"status": "ok", **who, "config_key": _config_key(hp),
                                        "seconds": seconds, "launch": launch})
    return {**who, "status": "ok", "seconds": seconds, "error": None}


def batch_commands(plan: TunePlan | str | os.PathLike, tune_dir: str | os.PathLike, *,
                   dataset_dir: str | None = None, device: str = "auto") -> list[str]:
    """Shell commands that run the plan's pending runs elsewhere, one ``python -m chlib run
    03_train`` each (recipe bases only). Copy the finished ``experiments/`` folders back and
    :func:`summarise` reads them (their status shows as ``unmarked``: no done.json)."""
    if not isinstance(plan, TunePlan):
        plan = load_plan(plan)
    if plan.base_config is not None:
        raise ConfigError(f"{plan.source}: batch_commands needs a recipe base (base: {{recipe: "
                          "...}}); with a config base use run_plan(launch='papermill')")
    dataset_dir = dataset_dir if dataset_dir is not None else plan.dataset_dir
    seeds = plan.seeds if plan.seeds is not None else [None]
    out = []
    for seed in seeds:
        for e in expand_plan(plan):
            exp_root = Path(tune_dir) / "experiments" / e.name
            if seed is not None and seed_status(exp_root / f"seed_{seed}") in ("ok", "diverged"):
                continue
            over = run_overrides(plan, e, seed)
            parts = ["python", "-m", "chlib", "run", "03_train", "--runs-root", str(exp_root),
                     "--run", f"seed_{seed}", "-p", "recipe", str(plan.base_recipe),
                     "-p", "overrides", repr(over), "-p", "device", device]
            if seed is not None:
                parts += ["-p", "seed", str(seed)]
            if plan.max_epochs is not None:
                parts += ["-p", "max_epochs", str(plan.max_epochs)]
            if dataset_dir is not None:
                parts += ["-p", "dataset_dir", str(dataset_dir)]
            out.append(" ".join(shlex.quote(p) for p in parts))
    return out


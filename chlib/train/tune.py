"""Hyperparameter tuning: experiment plans, resumable sweeps over seeds, honest summaries.

A *plan* (YAML, see ``chlib/recipes/tune_demo.yaml``) names a base training config, the
*factors* to vary and the *seeds* to repeat each setting with. Every (setting, seed) pair is an
ordinary training run in its own folder::

    <tune_dir>/plan.yaml                       the plan as given (for the record)
    <tune_dir>/config/hparams.yaml             the base config (+ test_unseen.txt, see below)
    <tune_dir>/plan.json                       the expanded experiments, aliases, slope window
    <tune_dir>/experiments/<name>/seed_<s>/    a run folder: config/hparams.yaml, checkpoints/,
                                               logs/, metrics.jsonl, done.json (when finished)
    <tune_dir>/summary.csv, summary.json       written by :func:`summarise`
    <tune_dir>/figures/                        tune_curves.png, tune_ranking.png

Plan keys (unknown keys are a :class:`~chlib.core.errors.ConfigError`):

``base``
    ``{recipe: laptop, overrides: {...}}`` (a recipe of :func:`chlib.train.loop.make_run_config`) or
    ``{config: runs/x/config/hparams.yaml, overrides: {...}}`` (an existing run config).
``dataset_dir``
    dataset folder for recipe bases (the ``dataset_dir`` argument of :func:`run_plan` wins).
``mode``
    ``one_factor`` (default; the original's sweeps: each factor varied alone from the base, plus
    one ``base`` experiment) or ``grid`` (every combination of the factors' values).
``factors``
    ``{dotted.key: [values]}``, e.g. ``learning_rate: [0.001, 0.0005]``,
    ``spec_augmentation.roll_pitch.prob: [0, 0.5]``, ``chunk_frame: [[250, 200, 150]]``.
    Several keys varied together: ``"adam_b1,adam_b2": [[0.9, 0.999], [0.85, 0.995]]``.
    A mapping value is deep-merged at its key (``spec_augmentation: [{roll_pitch: {...}}]``).
``seeds``
    list of training seeds (default: the base config's ``seed``).
``max_epochs``, ``early_stopping_patience``, ``early_stop_metric``, ``map_stopping_testsets``,
``map_smoothing_alpha``
    set on every experiment (absent: the base config's value). ``early_stopping_patience`` is also
    the window of the slopes in the summary (as in the original).
``test_name``
    the test set whose ``mAP`` is summarised (default: the only one, or the first by name).
``hp_overrides``
    a mapping deep-merged into every experiment's config (null entries are ignored). A key that
    is also a factor is an error (the plan would contradict itself).
``include_base``
    one_factor mode: also run the unmodified base (default true).
``flat_map_slope``, ``flat_loss_slope``
    thresholds of the reading guide (defaults :data:`FLAT_MAP_SLOPE`, :data:`FLAT_LOSS_SLOPE`).

The original's ``hp_tuning.yaml`` sweep keys are accepted at the top level and mapped to
factors (an empty list or ``{}`` disables a sweep, as there):

============================  ===================================  ===========================
original key                  factor                               experiment name
============================  ===================================  ===========================
``chunk_frames`` (x           ``chunk_frame,mean_size`` (product)   ``chunk_frame375_300_225_``
``mean_sizes``)                                                     ``mean_size3``
``m_per_classes``             ``m_per_class``                      ``m_per_class4``
``num_blockss``               ``encoder.num_blocks``               ``num_blocks3``
``spec_augmentations``        ``spec_augmentation`` (whole block)  ``erase_prob0.5_num4_...``
``losses``                    root mapping: ``foc``/``triplet``/    ``FOC_dims30000_wt1.0_...``
                              ``center`` blocks
``learning_rates``            ``learning_rate``                    ``lrate0.001``
``lr_decays``                 ``lr_decay``                         ``lr_decay0.998``
``adam_betas``                ``adam_b1,adam_b2``                  ``adam_betas0.9_0.999``
``optimizers``                ``optimizer``                        ``optimizer_prodigy``
============================  ===================================  ===========================

Also accepted: ``seeds``, ``max_epochs``, ``early_stopping_patience``, ``early_stop_metric``,
``map_stopping_testsets``, ``map_smoothing_alpha``, ``test_name``, ``hp_overrides``,
``restore_optimizer_state`` (ignored) and ``foundation_checkpoint`` (only ``null``: warm starts
from a foundation model are not supported yet, so a path is an error rather than silently
ignored). Unlike the original, ``hp_overrides`` applies to every sweep (the original skipped the
chunk_frame sweep), an absent ``optimizers`` key adds no sweep (the original always ran
``optimizer_adamw``) and the experiment seed is the run's only seed (chlib's trainer seeds the
batch sampler from it too, fact sheet 7.7).

Deviations from the original's ``train_tune``, on purpose:

* **Resumable.** A finished (experiment, seed) writes ``done.json`` atomically and is skipped
  when the plan is run again; a half-finished one resumes from its own checkpoints (the
  original deleted ``checkpoints/`` and retrained). Changing an experiment's settings under an
  existing folder is an error, so results are never mixed.
* **No duplicate work.** In one_factor mode a factor value equal to the base's own value gives
  the base config again; it is run once (as ``base``) and listed as an alias.
* **Order.** Seed-major: every experiment's first seed runs before any second seed, so a
  session cut short still gives a first look at every setting.
* **Honest about noise.** Standard deviations are sample std (ddof = 1; the original's
  population std understates the spread of 2-3 seeds), the table says which experiments are
  within noise of the top one, val-loss slopes are shown (the original computed but did not
  print them), and diverged or failed seeds are listed, not dropped silently.
* **From metrics alone.** :func:`summarise` reads only ``metrics.jsonl`` (+ ``done.json``
  markers when present) under ``experiments/``, so runs launched elsewhere (papermill on another
  machine, Colab) are summarised the same way once their folders are copied back.

Reading guide (a column of the summary; mean slopes over the last ``early_stopping_patience``
epochs of the seeds, mAP in [0, 1] per epoch, val loss relative to its mean per epoch):

====================  =========================================  =================================
reading               rule (mAP slope m, val-loss slope v)       what to do
====================  =========================================  =================================
still improving       m > +eps and v <= +eps, or |m| <= eps and   train longer / raise patience
                      v < -eps
converged             |m| <= eps and |v| <= eps                   compare experiments as they are
overfitting           v > +eps and m <= +eps (mAP flat/falling)   stop earlier; more augmentation or
                                                                  data; smaller model
degrading             m < -eps and |v| <= eps                     mAP falls without loss moving:
                                                                  stop earlier, check the test set
decoupled             m and v disagree: m > +eps with v > +eps,   val loss is a poor proxy here:
                      or m < -eps with v < -eps                   use ``early_stop_metric: mAP``
too short             fewer than 2 validated epochs               train more epochs
diverged              no seed finished (NaN guard)                lower learning_rate
====================  =========================================  =================================

eps is :data:`FLAT_MAP_SLOPE` for mAP and :data:`FLAT_LOSS_SLOPE` x |mean val loss| for the loss
(both settable per plan). Without a test set the loss alone decides (falling: still improving,
flat: converged, rising: overfitting). When the seeds' own readings differ, the reading gets
"(seeds disagree)": treat it as noise.

Optuna: not used. Each trial here is a full training run (hours on a laptop), so a tuning
session holds tens of trials, where TPE is barely better than a well-chosen grid; the seed
noise on the small, culture-specific datasets our users tune on is of the same size as the
effects, which makes Optuna's pruners (they compare single noisy intermediate values) cut good
settings; and one-factor sweeps with a reading of every curve teach a user more about their
data than a black-box optimum. The summary files (``summary.json``, every run's
``config/hparams.yaml``) are plain data, so anyone who wants Bayesian search can feed them to
Optuna by hand.
"""

from __future__ import annotations

import copy
import csv
import difflib
import io
import itertools
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from chlib.core.config import HParams, deep_merge, load_hparams, load_yaml, save_hparams
from chlib.core.errors import ChlibError, ConfigError
from chlib.core.io import atomic_write_text, read_json, read_jsonl, stable_hash, write_json

__all__ = [
    "FLAT_MAP_SLOPE",
    "FLAT_LOSS_SLOPE",
    "READING_GUIDE",
    "ORIGINAL_SWEEP_KEYS",
    "Factor",
    "Experiment",
    "TunePlan",
    "TuneSummary",
    "TuneResult",
    "parse_plan",
    "load_plan",
    "expand_plan",
    "experiment_name",
    "run_overrides",
    "run_plan",
    "batch_commands",
    "seed_status",
    "seed_series",
    "ls_slope",
    "reading",
    "summarise",
    "format_table",
    "plot_tuning_curves",
    "plot_tuning_ranking",
    "save_tuning_figures",
]

#: |mAP slope| (mAP units per epoch, mAP in [0, 1]) below which mAP counts as flat.
FLAT_MAP_SLOPE = 0.002
#: |val-loss slope| / |mean val loss| (per epoch) below which the val loss counts as flat.
FLAT_LOSS_SLOPE = 0.005

#: reading -> advice (the reading-guide column, see the module docstring for the rules).
READING_GUIDE: dict[str, str] = {
    "still improving": "not finished: train longer or raise early_stopping_patience",
    "converged": "curves flat: compare experiments as they are",
    "overfitting": "val loss rising: stop earlier, add augmentation or data, or a smaller model",
    "degrading": "mAP falling while the loss is flat: stop earlier; check the test set",
    "decoupled": "val loss and mAP disagree: prefer early_stop_metric: mAP",
    "too short": "fewer than 2 validated epochs: train more epochs",
    "diverged": "no seed finished (NaN guard): lower learning_rate or check the data",
    "no data": "no metrics yet",
}

_PLAN_KEYS = {
    "base", "dataset_dir", "mode", "factors", "seeds", "max_epochs", "early_stopping_patience",
    "early_stop_metric", "map_stopping_testsets", "map_smoothing_alpha", "test_name",
    "hp_overrides", "include_base", "flat_map_slope", "flat_loss_slope",
    "foundation_checkpoint", "restore_optimizer_state",
}
#: The original hp_tuning.yaml sweep keys, in the original's sweep order -> chlib factor key.
ORIGINAL_SWEEP_KEYS: dict[str, str] = {
    "chunk_frames": "chunk_frame,mean_size",
    "m_per_classes": "m_per_class",
    "num_blockss": "encoder.num_blocks",
    "spec_augmentations": "spec_augmentation",
    "losses": "losses",
    "learning_rates": "learning_rate",
    "lr_decays": "lr_decay",
    "adam_betas": "adam_b1,adam_b2",
    "optimizers": "optimizer",
}
_EXTRA_ORIGINAL_KEYS = {"mean_sizes"}

# Experiment-name labels: factor key -> prefix (the original's names where it had one).
_LABELS = {
    "learning_rate": "lrate",
    "encoder.num_blocks": "num_blocks",
    "adam_b1,adam_b2": "adam_betas",
    "optimizer": "optimizer_",
    "losses": "",
    "spec_augmentation": "",
}
# Abbreviations for keys inside mapping values (the original's spec-aug and loss names).
_ABBREV = {
    "random_erase": "erase", "roll_pitch": "roll", "erase_num": "num", "region_size": "size",
    "shift_num": "shift", "method": "", "foc": "FOC", "triplet": "TRIP", "center": "CNTR",
    "output_dims": "dims", "weight": "wt", "margin": "marg",
}
_LOSS_BLOCKS = ("foc", "triplet", "center", "ce")
_MAX_NAME = 120


# --------------------------------------------------------------------------------------------
# plan


@dataclass(frozen=True)
class Factor:
    """One thing varied: ``keys`` (dotted config keys; ``("",)`` = a root mapping) and values.

    ``name`` is the key as written in the plan (``"adam_b1,adam_b2"`` for a tuple factor).
    """

    name: str
    keys: tuple[str, ...]
    values: tuple[Any, ...]

    def overrides(self, value: Any) -> dict:
        """The config overrides that set this factor to ``value`` (a nested mapping)."""
        if self.keys == ("",):
            return copy.deepcopy(dict(value))
        parts = [value] if len(self.keys) == 1 else list(value)
        out: dict = {}
        for key, v in zip(self.keys, parts, strict=True):
            out = deep_merge(out, _nest(key, v))
        return out

    def label(self, value: Any) -> str:
        """Readable name part, e.g. ``lrate0.001`` or ``chunk_frame375_300_225_mean_size3``."""
        if self.name in _LABELS:
            return f"{_LABELS[self.name]}{_fmt(value)}"
        if len(self.keys) == 1:
            return f"{_key_label(self.keys[0])}{_fmt(value)}"
        return "_".join(f"{_key_label(k)}{_fmt(v)}" for k, v in zip(self.keys, value, strict=True))


@dataclass(frozen=True)
class Experiment:
    """One setting of the factors: its ``name``, the ``settings`` (factor -> value) and the
    config ``overrides`` they amount to. ``aliases`` are names of equal settings merged into it."""

    name: str
    settings: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)
    aliases: tuple[str, ...] = ()


@dataclass
class TunePlan:
    """A validated experiment plan (see the module docstring for the keys)."""

    base_recipe: str | None = "laptop"
    base_config: str | None = None
    base_overrides: dict = field(default_factory=dict)
    dataset_dir: str | None = None
    mode: str = "one_factor"
    factors: list[Factor] = field(default_factory=list)
    seeds: list[int] | None = None
    max_epochs: int | None = None
    early_stopping_patience: int | None = None
    test_name: str | None = None
    hp_overrides: dict = field(default_factory=dict)
    include_base: bool = True
    flat_map_slope: float = FLAT_MAP_SLOPE
    flat_loss_slope: float = FLAT_LOSS_SLOPE
    source: str = "<plan>"
    raw: dict = field(default_factory=dict)

    def describe(self) -> str:
        """A few lines saying what the plan will run."""
        exps = expand_plan(self)
        seeds = self.seeds if self.seeds is not None else ["<base seed>"]
        base = f"recipe {self.base_recipe!r}" if self.base_config is None else self.base_config
        lines = [
            f"plan {self.source}: mode {self.mode}, base {base}",
            f"  seeds {seeds}; max_epochs {self.max_epochs or '<base>'}; "
            f"early_stopping_patience {self.early_stopping_patience or '<base>'}; "
            f"test set {self.test_name or '<auto>'}",
        ]
        for f in self.factors:
            shown = [list(v) if isinstance(v, tuple) else v for v in f.values]
            lines.append(f"  factor {f.name}: {shown}")
        if self.hp_overrides:
            lines.append(f"  hp_overrides: {self.hp_overrides}")
        lines.append(f"  {len(exps)} experiment(s) x {len(seeds)} seed(s) = "
                     f"{len(exps) * len(seeds)} training run(s) (before merging duplicates):")
        lines += [f"    {e.name}" for e in exps]
        return "\n".join(lines)


def _nest(dotted: str, value: Any) -> dict:
    out: Any = copy.deepcopy(value)
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _fmt(value: Any) -> str:
    """Value -> name text: 0.001 -> '0.001', [375, 300] -> '375_300', True -> 'true'."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, Mapping):
        parts = []
        for k, v in value.items():
            ab = _ABBREV.get(k, k)
            if isinstance(v, Mapping):
                parts.append(f"{ab}_{_fmt(v)}" if ab else _fmt(v))
            else:
                parts.append(f"{ab}{_fmt(v)}")
        return "_".join(parts)
    if isinstance(value, (list, tuple)):
        return "_".join(_fmt(v) for v in value)
    return str(value)


def _key_label(dotted: str) -> str:
    for prefix in ("spec_augmentation.", "encoder."):
        if dotted.startswith(prefix):
            dotted = dotted[len(prefix):]
    return dotted.replace(".", "_")


def _safe_name(text: str, salt: Any) -> str:
    name = re.sub(r"[^A-Za-z0-9._+=-]", "_", text).strip("._") or "exp"
    if len(name) > _MAX_NAME:
        name = f"{name[:_MAX_NAME - 9]}_{stable_hash(salt, 8)}"
    return name


def _config_tree() -> dict:
    """The key tree of a training config (for checking factor keys)."""
    return HParams().to_dict()


def _check_key(dotted: str, where: str) -> None:
    node: Any = _config_tree()
    walked = []
    for part in dotted.split("."):
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: factor key {dotted!r}: {'.'.join(walked)} is a value, "
                              "not a mapping; vary it directly")
        if part not in node:
            close = difflib.get_close_matches(part, list(node), n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(
                f"{where}: factor key {dotted!r}: unknown config key {part!r}"
                f"{' under ' + '.'.join(walked) if walked else ''}.{hint}"
            )
        walked.append(part)
        node = node[part]


def _make_factor(name: str, values: Any, where: str) -> Factor | None:
    if values in (None, {}, []):
        return None  # an empty sweep is disabled (the original's convention)
    if not isinstance(values, list):
        raise ConfigError(f"{where}: factor {name!r} must be a list of values, got {values!r}")
    if name == "losses":
        keys: tuple[str, ...] = ("",)
        for v in values:
            if not isinstance(v, dict) or not set(v) <= set(_LOSS_BLOCKS):
                raise ConfigError(f"{where}: each 'losses' value must be a mapping of "
                                  f"{', '.join(_LOSS_BLOCKS)} blocks, got {v!r}")
    else:
        keys = tuple(k.strip() for k in name.split(","))
        for k in keys:
            _check_key(k, where)
        if len(keys) > 1:
            for v in values:
                if not isinstance(v, (list, tuple)) or len(v) != len(keys):
                    raise ConfigError(f"{where}: factor {name!r} varies {len(keys)} keys "
                                      f"together; each value must be a list of {len(keys)}, "
                                      f"got {v!r}")
    seen = []
    for v in values:
        if v in seen:
            raise ConfigError(f"{where}: factor {name!r} lists the value {v!r} twice")
        seen.append(v)
    vals = tuple(tuple(v) if len(keys) > 1 else v for v in values)
    return Factor(name=name, keys=keys, values=vals)


def _clean_overrides(d: Any, where: str, what: str) -> dict:
    """Drop null entries (the original's 'not set') from an overrides mapping."""
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: {what} must be a mapping, got {d!r}")
    out = {}
    for k, v in d.items():
        if v is None:
            continue
        out[k] = _clean_overrides(v, where, what) if isinstance(v, dict) else v
    return out


def _flat_keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.add(key)
        if isinstance(v, dict):
            out |= _flat_keys(v, key + ".")
    return out


def parse_plan(data: Mapping, *, where: str = "<plan>") -> TunePlan:
    """Validate a plan mapping (as read from YAML) into a :class:`TunePlan`.

    Raises :class:`ConfigError` naming ``where`` and the key for unknown keys, bad types, factor
    keys that are not config keys, and factors that ``hp_overrides`` also sets.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: a plan must be a mapping, got {type(data).__name__}")
    d = dict(data)
    allowed = _PLAN_KEYS | set(ORIGINAL_SWEEP_KEYS) | _EXTRA_ORIGINAL_KEYS
    for k in d:
        if k not in allowed:
            close = difflib.get_close_matches(k, sorted(allowed), n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"{where}: unknown plan key {k!r}.{hint} "
                              f"Allowed: {', '.join(sorted(allowed))}")
    plan = TunePlan(source=where, raw=copy.deepcopy(dict(d)))

    base = d.get("base") or {"recipe": "laptop"}
    if not isinstance(base, dict) or not set(base) <= {"recipe", "config", "overrides"}:
        raise ConfigError(f"{where}: base must be a mapping with 'recipe' or 'config' "
                          f"(+ optional 'overrides'), got {base!r}")
    if ("recipe" in base) == ("config" in base):
        raise ConfigError(f"{where}: base needs exactly one of 'recipe' (a recipe name) or "
                          "'config' (a run's config/hparams.yaml)")
    plan.base_recipe = base.get("recipe")
    plan.base_config = str(base["config"]) if "config" in base else None
    plan.base_overrides = _clean_overrides(base.get("overrides"), where, "base.overrides")
    plan.dataset_dir = None if d.get("dataset_dir") is None else str(d["dataset_dir"])

    plan.mode = str(d.get("mode", "one_factor"))
    if plan.mode not in ("one_factor", "grid"):
        raise ConfigError(f"{where}: mode must be 'one_factor' or 'grid', got {plan.mode!r}")

    factors: list[Factor] = []
    given = d.get("factors") or {}
    if not isinstance(given, dict):
        raise ConfigError(f"{where}: factors must be a mapping of key: [values], got {given!r}")
    for name, values in given.items():
        f = _make_factor(str(name), values, where)
        if f is not None:
            factors.append(f)
    for orig, key in ORIGINAL_SWEEP_KEYS.items():
        if orig not in d:
            continue
        values = d[orig]
        if orig == "chunk_frames" and values:
            sizes = d.get("mean_sizes") or []
            if sizes:
                values = [[list(cf), int(ms)] for cf in values for ms in sizes]
                f = _make_factor(key, values, where)
            else:
                f = _make_factor("chunk_frame", values, where)
        else:
            f = _make_factor(key, values, where)
        if f is not None:
            factors.append(f)
    names = [f.name for f in factors]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{where}: factor(s) {', '.join(dup)} given twice "
                          "(under factors: and as an original sweep key?)")
    plan.factors = factors

    if d.get("seeds") is not None:
        seeds = d["seeds"]
        if not isinstance(seeds, list) or not seeds or not all(
                isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ConfigError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"{where}: seeds {seeds} repeat a seed")
        plan.seeds = list(seeds)
    for k in ("max_epochs", "early_stopping_patience"):
        if d.get(k) is not None:
            v = d[k]
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{where}: {k} must be an integer >= 1, got {v!r}")
            setattr(plan, k, v)
    plan.test_name = None if d.get("test_name") is None else str(d["test_name"])
    plan.include_base = bool(d.get("include_base", True))
    for k in ("flat_map_slope", "flat_loss_slope"):
        if d.get(k) is not None:
            v = d[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"{where}: {k} must be a number >= 0, got {v!r}")
            setattr(plan, k, float(v))
    if d.get("foundation_checkpoint") is not None:
        raise ConfigError(f"{where}: foundation_checkpoint {d['foundation_checkpoint']!r}: warm "
                          "starts from a foundation model are not supported by chlib's tuning "
                          "yet; set it to null (every experiment trains from scratch)")

    hp_over = _clean_overrides(d.get("hp_overrides"), where, "hp_overrides")
    for k in ("early_stop_metric", "map_stopping_testsets", "map_smoothing_alpha"):
        if d.get(k) is not None:
            hp_over[k] = d[k]
    for k in hp_over:  # values are checked against the real base when the plan runs
        if not (isinstance(hp_over[k], dict) and "query_path" in hp_over[k]):
            _check_key(k, f"{where} hp_overrides")
    plan.hp_overrides = hp_over
    set_keys = _flat_keys(hp_over)
    for f in plan.factors:
        fkeys = _flat_keys(f.overrides(f.values[0]))
        clash = sorted(k for k in fkeys & set_keys if not isinstance(_get(hp_over, k), dict))
        if clash:
            raise ConfigError(f"{where}: hp_overrides sets {', '.join(clash)}, which factor "
                              f"{f.name!r} varies; remove it from hp_overrides")
    return plan


def _get(d: dict, dotted: str) -> Any:
    node: Any = d
    for part in dotted.split("."):
        node = node[part]
    return node


def load_plan(path: str | os.PathLike) -> TunePlan:
    """Read and validate a plan YAML file.

    A path that does not exist but names a plan shipped in ``chlib/recipes/`` (e.g.
    ``chlib/recipes/tune_demo.yaml`` when chlib is installed from a wheel, as on Colab) is read
    from there.
    """
    path = Path(path)
    if not path.exists():
        shipped = Path(__file__).resolve().parents[1] / "recipes" / path.name
        if shipped.is_file():
            path = shipped
    return parse_plan(load_yaml(path), where=str(path))


def experiment_name(settings: Sequence[tuple[Factor, Any]]) -> str:
    """Folder-safe readable name of a factor setting; ``base`` for no setting."""
    if not settings:
        return "base"
    text = "_".join(f.label(v) for f, v in settings)
    return _safe_name(text, [(f.name, v) for f, v in settings])


def expand_plan(plan: TunePlan) -> list[Experiment]:
    """The plan's experiments, in order (before merging equal settings).

    one_factor: ``base`` (if ``include_base``), then each factor's values, each alone.
    grid: every combination (the product of the factors' value lists).
    """
    combos: list[list[tuple[Factor, Any]]] = []
    if plan.mode == "one_factor":
        if plan.include_base or not plan.factors:
            combos.append([])
        for f in plan.factors:
            combos += [[(f, v)] for v in f.values]
    else:
        combos = [list(zip(plan.factors, vals, strict=True))
                  for vals in itertools.product(*[f.values for f in plan.factors])]
    out: list[Experiment] = []
    names: set[str] = set()
    for combo in combos:
        name = experiment_name(combo)
        if name in names:  # two settings that read the same: keep both, distinguish by hash
            name = _safe_name(f"{name}_{stable_hash([(f.name, v) for f, v in combo], 6)}", name)
        names.add(name)
        over: dict = {}
        for f, v in combo:
            over = deep_merge(over, f.overrides(v))
        out.append(Experiment(name=name, settings={f.name: v for f, v in combo}, overrides=over))
    return out


def run_overrides(plan: TunePlan, exp: Experiment, seed: int | None) -> dict:
    """All overrides of one run, applied to the base config in this order: the base's
    ``overrides``, ``hp_overrides``, the experiment's factor values, then ``seed``,
    ``max_epochs`` and ``early_stopping_patience`` from the plan."""
    over = deep_merge(plan.base_overrides, plan.hp_overrides)
    over = deep_merge(over, exp.overrides)
    fixed: dict[str, Any] = {}
    if seed is not None:
        fixed["seed"] = seed
    if plan.max_epochs is not None:
        fixed["max_epochs"] = plan.max_epochs
    if plan.early_stopping_patience is not None:
        fixed["early_stopping_patience"] = plan.early_stopping_patience
    return deep_merge(over, fixed)


# --------------------------------------------------------------------------------------------
# configs and running


def _resolve_config(plan: TunePlan, overrides: dict, dataset_dir: str | None,
                    tune_dir: Path) -> HParams:
    """The training config of one run.

    A recipe base goes through :func:`chlib.train.loop.make_run_config` with ``run_dir=tune_dir``: it
    writes ``<tune_dir>/config/hparams.yaml`` (overwritten by each call; :func:`run_plan` writes
    the base last) and, for datasets with works held out entirely, the ``unseen`` test list
    ``<tune_dir>/config/test_unseen.txt`` that every experiment's config then names.
    """
    if plan.base_config is not None:
        return load_hparams(plan.base_config).updated(overrides)
    from chlib.train.loop import make_run_config

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


def seed_status(seed_dir: str | os.PathLike) -> str:
    """``ok`` / ``diverged`` (done.json), ``failed`` (failed.json), ``unmarked`` (metrics but no
    marker: running, killed, or launched elsewhere) or ``pending`` (nothing yet)."""
    seed_dir = Path(seed_dir)
    if (seed_dir / "done.json").is_file():
        try:
            return str(read_json(seed_dir / "done.json").get("status", "ok"))
        except ValueError:
            return "unmarked"
    if (seed_dir / "failed.json").is_file():
        return "failed"
    if (seed_dir / "metrics.jsonl").is_file():
        return "unmarked"
    return "pending"


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
        counts: dict[str, int] = {}
        for r in self.runs:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
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
    if path.is_file():
        old = load_hparams(path)
        if old.to_dict() != hp.to_dict():
            diff = sorted(k for k in set(old.to_dict()) | set(hp.to_dict())
                          if old.to_dict().get(k) != hp.to_dict().get(k))
            raise ConfigError(
                f"{path}: this run folder was made with other settings (differing: "
                f"{', '.join(diff)}); the plan changed under an existing experiment. Use a new "
                "tuning folder, or delete this experiment's folder to rerun it"
            )
        return
    save_hparams(hp, path)


def _tag(cb: Callable[[dict], Any], name: str, seed: int) -> Callable[[dict], Any]:
    def tagged(rec: dict) -> Any:
        return cb({**rec, "experiment": name, "seed": seed})

    return tagged


def _train_inprocess(seed_dir: Path, device: str, progress: bool,
                     callbacks: Sequence[Callable[[dict], Any]]) -> None:
    from chlib.train.loop import train

    result = train(seed_dir, device=device, progress=progress, callbacks=callbacks)
    if getattr(result, "interrupted", False):  # Ctrl-C inside train: it saved; stop the session
        raise KeyboardInterrupt


def _train_papermill(seed_dir: Path, *, plan: TunePlan, overrides: dict, hp: HParams,
                     dataset_dir: str | None, device: str, seed: int, progress: bool,
                     cwd: str | os.PathLike | None) -> None:
    from chlib.ui.runner import (
        find_notebooks_dir,
        notebook_parameters,
        notebook_path,
        run_notebooks,
    )

    declared = notebook_parameters(notebook_path("03_train", find_notebooks_dir(cwd)))
    if plan.base_config is None:
        params: dict[str, Any] = {"recipe": plan.base_recipe, "overrides": overrides}
    else:  # no recipe behind the base: hand the whole resolved config over as overrides
        params = {"overrides": hp.to_dict()}
    params.update({"run_dir": str(seed_dir), "device": device, "seed": seed,
                   "max_epochs": hp.max_epochs})
    if dataset_dir is not None:
        params["dataset_dir"] = dataset_dir
    params = {k: v for k, v in params.items() if k in declared}
    record = run_notebooks(["03_train"], run_dir=seed_dir, parameters=params, cwd=cwd,
                           progress=progress)
    if not record.ok:
        raise _NotebookFailed(record.executed[-1]["error"])


class _NotebookFailed(ChlibError):
    pass


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
    """Run (or resume) every experiment x seed of ``plan`` under ``tune_dir``.

    Finished runs (``done.json``) are skipped; a half-finished one resumes from its
    checkpoints. A run that diverges is marked ``diverged`` (done, not retried); one that fails
    otherwise writes ``failed.json`` with the error and is retried next time; the others carry
    on. ``KeyboardInterrupt`` stops the session (resume later by calling again).

    Parameters
    ----------
    plan : a :class:`TunePlan` or the path of a plan YAML.
    dataset_dir : dataset folder for recipe bases (default: the plan's ``dataset_dir``).
    launch : ``"inprocess"`` (:func:`chlib.train.loop.train`) or ``"papermill"`` (executes
        ``notebooks/03_train.ipynb`` into each run folder via :func:`chlib.ui.runner.run_notebooks`).
    max_runs : start at most this many training runs in this call (finished ones do not count).
    time_budget_s : start no new run after this many seconds (a running one is not cut).
    callbacks : passed to :func:`chlib.train.loop.train` (in-process runs): called after every epoch
        with the epoch record, plus keys ``experiment`` and ``seed``.
    train_fn : replaces the training call (``train_fn(seed_dir)``); for tests and custom launchers.
    """
    if not isinstance(plan, TunePlan):
        plan_path = Path(plan)
        plan = load_plan(plan_path)
    if launch not in ("inprocess", "papermill"):
        raise ConfigError(f"launch must be 'inprocess' or 'papermill', got {launch!r}")
    tune_dir = Path(tune_dir)
    dataset_dir = dataset_dir if dataset_dir is not None else plan.dataset_dir
    if launch == "papermill" and plan.base_config is not None and dataset_dir is None:
        raise ConfigError(
            f"{plan.source}: launch='papermill' with a config base needs dataset_dir (03_train "
            "builds its config from a dataset folder; the base config's settings then override it)")
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
            if status in ("ok", "diverged"):
                runs.append({"experiment": e.name, "seed": seed, "status": f"skipped ({status})",
                             "seconds": 0.0, "error": None})
                continue
            if (max_runs is not None and started >= max_runs) or (
                    time_budget_s is not None and time.monotonic() - t_start >= time_budget_s):
                stopped = True
                runs.append({"experiment": e.name, "seed": seed, "status": "not started",
                             "seconds": 0.0, "error": None})
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
        seconds = time.monotonic() - t0
        text = f"{type(err).__name__}: {err}"
        if _is_divergence(err):
            write_json(seed_dir / "done.json", {"status": "diverged", "experiment": exp.name,
                                                "seed": seed, "error": text, "seconds": seconds})
            return {"experiment": exp.name, "seed": seed, "status": "diverged",
                    "seconds": seconds, "error": text}
        write_json(seed_dir / "failed.json", {"experiment": exp.name, "seed": seed,
                                              "error": text, "seconds": seconds})
        return {"experiment": exp.name, "seed": seed, "status": "failed", "seconds": seconds,
                "error": text}
    seconds = time.monotonic() - t0
    write_json(seed_dir / "done.json", {"status": "ok", "experiment": exp.name, "seed": seed,
                                        "config_key": _config_key(hp), "seconds": seconds,
                                        "launch": launch})
    return {"experiment": exp.name, "seed": seed, "status": "ok", "seconds": seconds,
            "error": None}


def batch_commands(plan: TunePlan | str | os.PathLike, tune_dir: str | os.PathLike, *,
                   dataset_dir: str | None = None, device: str = "auto") -> list[str]:
    """Shell commands that run the plan's pending runs elsewhere, one ``python -m chlib run
    03_train`` each (recipe bases only). Copy the finished ``experiments/`` folders back and
    :func:`summarise` reads them (their status shows as ``unmarked``: no done.json)."""
    import shlex

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


# --------------------------------------------------------------------------------------------
# summary


def _val_loss_of(rec: Mapping) -> float | None:
    for k in ("val_loss", "foc_loss", "total"):
        if rec.get(k) is not None:
            return float(rec[k])
    return None


def seed_series(records: Iterable[Mapping]) -> dict:
    """Per-epoch series of one run from its metrics records.

    Returns ``{"val_loss": {epoch: value}, "mAP": {testset: {epoch: mAP}}}``. The val loss is
    the focal loss of ``kind == "val"`` records (the original's ``csi_val/foc_loss``; ``total``
    if there is no focal part); mAP comes from ``kind == "test"`` records with a ``testset``.
    When an epoch was logged twice (a run resumed after a kill), the last record wins.
    """
    val: dict[int, float] = {}
    maps: dict[str, dict[int, float]] = {}
    for rec in records:
        kind = rec.get("kind")
        if rec.get("epoch") is None:
            continue
        ep = int(rec["epoch"])
        if kind == "val":
            v = _val_loss_of(rec)
            if v is not None:
                val[ep] = v
        elif kind == "test" and rec.get("testset") is not None and rec.get("mAP") is not None:
            maps.setdefault(str(rec["testset"]), {})[ep] = float(rec["mAP"])
    return {"val_loss": dict(sorted(val.items())),
            "mAP": {k: dict(sorted(v.items())) for k, v in sorted(maps.items())}}


def ls_slope(epochs: Sequence[float], values: Sequence[float], window: int) -> float:
    """Least-squares slope (value units per epoch) over the last ``window`` points.

    All points if there are fewer; NaN for fewer than 2 points (the original returned 0, which
    reads as "flat").
    """
    x = np.asarray(list(epochs)[-window:], dtype=np.float64)
    y = np.asarray(list(values)[-window:], dtype=np.float64)
    if x.size < 2 or np.ptp(x) == 0:
        return float("nan")
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def _sign(slope: float, eps: float) -> int:
    if slope > eps:
        return 1
    if slope < -eps:
        return -1
    return 0


def reading(map_slope: float | None, val_slope: float | None, *, val_level: float | None = None,
            flat_map_slope: float = FLAT_MAP_SLOPE,
            flat_loss_slope: float = FLAT_LOSS_SLOPE) -> str:
    """The reading-guide label for an mAP slope and a val-loss slope (per epoch).

    ``val_level`` is the typical val loss (the loss slope counts as flat below
    ``flat_loss_slope x |val_level|``). A None/NaN mAP slope means "no test set": the loss alone
    decides. Both missing: ``too short``. See the module docstring for the table.
    """
    has_m = map_slope is not None and math.isfinite(map_slope)
    has_v = val_slope is not None and math.isfinite(val_slope)
    if not has_m and not has_v:
        return "too short"
    loss_eps = flat_loss_slope * (abs(val_level) if val_level is not None
                                  and math.isfinite(val_level) else 1.0)
    v = _sign(val_slope, loss_eps) if has_v else 0
    if not has_m:
        return {-1: "still improving", 0: "converged", 1: "overfitting"}[v]
    m = _sign(map_slope, flat_map_slope)
    if not has_v:
        return {1: "still improving", 0: "converged", -1: "degrading"}[m]
    if (m == 1 and v == 1) or (m == -1 and v == -1):
        return "decoupled"
    if m == 1 or (m == 0 and v == -1):
        return "still improving"
    if v == 1:
        return "overfitting"
    if m == -1:
        return "degrading"
    return "converged"


def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample std (ddof 1; NaN for one value) and count of the finite values."""
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if a.size == 0:
        return float("nan"), float("nan"), 0
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else float("nan"), int(a.size)


def _seed_stats(series: dict, test_name: str | None, window: int, *, flat_map_slope: float,
                flat_loss_slope: float) -> dict:
    val = series["val_loss"]
    maps = series["mAP"].get(test_name, {}) if test_name else {}
    out: dict[str, Any] = {"last_epoch": max([*val, *maps], default=None)}
    if val:
        ep, vv = list(val), list(val.values())
        i_best = int(np.argmin(vv))
        out.update(val_final=vv[-1], val_best=vv[i_best], val_best_epoch=ep[i_best],
                   val_slope=ls_slope(ep, vv, window), val_level=float(np.mean(vv[-window:])))
    if maps:
        ep, mm = list(maps), list(maps.values())
        i_best = int(np.argmax(mm))
        out.update(map_final=mm[-1], map_best=mm[i_best], map_best_epoch=ep[i_best],
                   map_slope=ls_slope(ep, mm, window))
    out["reading"] = reading(out.get("map_slope"), out.get("val_slope"),
                             val_level=out.get("val_level"), flat_map_slope=flat_map_slope,
                             flat_loss_slope=flat_loss_slope)
    if not val and not maps:
        out["reading"] = "no data"
    return out


@dataclass
class TuneSummary:
    """One row per experiment (dicts, see :func:`summarise`), the formatted table, the curves
    (experiment -> seed -> series) and notes."""

    rows: list[dict]
    table: str
    curves: dict[str, dict[int, dict]]
    test_name: str | None
    window: int
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return self.table


_ROW_FIELDS = [
    "rank", "experiment", "seeds_ok", "seeds_total", "seeds_diverged", "seeds_failed",
    "seeds_unmarked", "val_loss_final_mean", "val_loss_final_std", "val_loss_best_mean",
    "val_loss_best_std", "val_loss_best_epoch_mean", "val_slope_mean", "mAP_final_mean",
    "mAP_final_std", "mAP_best_mean", "mAP_best_std", "mAP_best_epoch_mean", "mAP_slope_mean",
    "last_epoch_mean", "mAP_final_n", "vs_top", "reading", "seeds_disagree", "advice", "aliases", "settings",
    "problems",
]


def _discover(tune_dir: Path) -> dict[str, dict[int, Path]]:
    out: dict[str, dict[int, Path]] = {}
    root = tune_dir / "experiments"
    if not root.is_dir():
        return out
    for exp_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        seeds = {}
        for sd in exp_dir.iterdir():
            m = re.fullmatch(r"seed_(-?\d+)", sd.name)
            if m and sd.is_dir():
                seeds[int(m.group(1))] = sd
        if seeds:
            out[exp_dir.name] = dict(sorted(seeds.items()))
    return out


def _window_of(tune_dir: Path, seed_dirs: Iterable[Path]) -> int:
    if (tune_dir / "plan.json").is_file():
        w = read_json(tune_dir / "plan.json").get("window")
        if w:
            return int(w)
    for sd in seed_dirs:
        if (sd / "config" / "hparams.yaml").is_file():
            try:
                return load_hparams(sd / "config" / "hparams.yaml").early_stopping_patience
            except ChlibError:
                continue
    return 5


def summarise(
    tune_dir: str | os.PathLike,
    *,
    test_name: str | None = None,
    window: int | None = None,
    flat_map_slope: float | None = None,
    flat_loss_slope: float | None = None,
    save: bool = True,
) -> TuneSummary:
    """Summarise every experiment under ``<tune_dir>/experiments/`` from its metrics files.

    Seeds marked ``ok`` (done.json) or ``unmarked`` (metrics without a marker: still running,
    killed, or run elsewhere) enter the statistics; ``diverged`` and ``failed`` seeds are
    counted and named, never averaged. Per experiment: final and best val loss and mAP (of
    ``test_name``) as mean and sample std over seeds, mean best epochs, mean least-squares
    slopes over the last ``window`` epochs (default: the plan's ``early_stopping_patience``),
    the reading guide, and ``vs_top``: ``top`` for the best mean final mAP, ``~top`` when its
    gap to the top is within 2 standard errors of the difference (noise), ``below`` otherwise,
    ``?`` with a single seed. Ranked by mean final mAP (by final val loss without test sets):
    the last epoch is not selected on the test set, so it is not biased upwards the way a
    best-of-epochs value is.

    Saves ``summary.csv`` and ``summary.json`` in ``tune_dir`` (unless ``save=False``).
    """
    tune_dir = Path(tune_dir)
    found = _discover(tune_dir)
    plan_info = read_json(tune_dir / "plan.json") if (tune_dir / "plan.json").is_file() else {}
    window = window or _window_of(tune_dir, [sd for s in found.values() for sd in s.values()])
    fm = flat_map_slope if flat_map_slope is not None else plan_info.get("flat_map_slope",
                                                                          FLAT_MAP_SLOPE)
    fl = flat_loss_slope if flat_loss_slope is not None else plan_info.get("flat_loss_slope",
                                                                           FLAT_LOSS_SLOPE)
    notes: list[str] = []
    curves: dict[str, dict[int, dict]] = {}
    statuses: dict[str, dict[int, str]] = {}
    all_sets: set[str] = set()
    for name, seeds in found.items():
        curves[name] = {}
        statuses[name] = {}
        for seed, sd in seeds.items():
            statuses[name][seed] = seed_status(sd)
            series = seed_series(read_jsonl(sd / "metrics.jsonl"))
            curves[name][seed] = series
            all_sets |= set(series["mAP"])
    test_name = test_name or plan_info.get("test_name")
    if test_name is None and all_sets:
        test_name = sorted(all_sets)[0]
        if len(all_sets) > 1:
            notes.append(f"several test sets ({', '.join(sorted(all_sets))}); summarising "
                         f"{test_name!r} (pass test_name= to choose)")
    elif test_name is not None and all_sets and test_name not in all_sets:
        notes.append(f"test set {test_name!r} appears in no metrics file "
                     f"(found: {', '.join(sorted(all_sets))})")
    planned_seeds = [int(x) for x in plan_info.get("seeds") or []]
    for e in plan_info.get("experiments", []):  # planned runs not begun count as pending
        for seed in planned_seeds:
            if e["name"] in statuses and seed not in statuses[e["name"]]:
                statuses[e["name"]][seed] = "pending"
    aliases = {e["name"]: e.get("aliases", []) for e in plan_info.get("experiments", [])}
    settings = {e["name"]: e.get("settings", {}) for e in plan_info.get("experiments", [])}

    rows = []
    for name in found:
        per_seed = {}
        problems = []
        for seed, st in sorted(statuses[name].items()):
            if st in ("ok", "unmarked"):
                per_seed[seed] = _seed_stats(curves[name][seed], test_name, window,
                                             flat_map_slope=fm, flat_loss_slope=fl)
            elif st in ("diverged", "failed"):
                marker = "done.json" if st == "diverged" else "failed.json"
                try:
                    err = read_json(found[name][seed] / marker).get("error", "")
                except ValueError:
                    err = ""
                problems.append(f"seed {seed} {st}: {err}"[:200])
        row = _experiment_row(name, per_seed, statuses[name], fm, fl)
        row["aliases"] = ", ".join(aliases.get(name, []))
        row["settings"] = settings.get(name, {})
        row["problems"] = "; ".join(problems)
        rows.append(row)
    _rank(rows)
    table = format_table(rows, test_name=test_name, window=window)
    if notes:
        table += "\n" + "\n".join(f"note: {n}" for n in notes)
    summary = TuneSummary(rows=rows, table=table, curves=curves, test_name=test_name,
                          window=window, notes=notes)
    if save and found:
        _save_summary(tune_dir, summary)
    return summary


def _experiment_row(name: str, per_seed: dict[int, dict], statuses: dict[int, str],
                    fm: float, fl: float) -> dict:
    def col(key: str) -> list[float]:
        return [s[key] for s in per_seed.values() if s.get(key) is not None]

    row: dict[str, Any] = {"experiment": name, "seeds_total": len(statuses)}
    for st in ("ok", "diverged", "failed", "unmarked"):
        row[f"seeds_{st}"] = sum(1 for s in statuses.values() if s == st)
    for src, dst in (("val_final", "val_loss_final"), ("val_best", "val_loss_best"),
                     ("map_final", "mAP_final"), ("map_best", "mAP_best")):
        row[f"{dst}_mean"], row[f"{dst}_std"], row[f"{dst}_n"] = _mean_std(col(src))
    row["val_loss_best_epoch_mean"] = _mean_std(col("val_best_epoch"))[0]
    row["mAP_best_epoch_mean"] = _mean_std(col("map_best_epoch"))[0]
    row["val_slope_mean"] = _mean_std(col("val_slope"))[0]
    row["mAP_slope_mean"] = _mean_std(col("map_slope"))[0]
    row["last_epoch_mean"] = _mean_std(col("last_epoch"))[0]
    seed_readings = {s["reading"] for s in per_seed.values()}
    if not per_seed:
        label = "diverged" if row["seeds_diverged"] else "no data"
        disagree = False
    else:
        label = reading(row["mAP_slope_mean"], row["val_slope_mean"],
                        val_level=_mean_std(col("val_level"))[0],
                        flat_map_slope=fm, flat_loss_slope=fl)
        disagree = len(seed_readings) > 1
    row["reading"] = label + (" (seeds disagree)" if disagree else "")
    row["seeds_disagree"] = disagree
    row["advice"] = READING_GUIDE.get(label, "")
    return row


def _rank(rows: list[dict]) -> None:
    """Sort rows in place (best first) and fill ``rank`` and ``vs_top``."""
    has_map = any(math.isfinite(r["mAP_final_mean"]) for r in rows)
    key, sign = ("mAP_final", -1.0) if has_map else ("val_loss_final", 1.0)

    def sort_key(r: dict) -> tuple:
        v = r[f"{key}_mean"]
        return (0, sign * v) if math.isfinite(v) else (1, 0.0)

    rows.sort(key=sort_key)
    top = rows[0] if rows and math.isfinite(rows[0][f"{key}_mean"]) else None
    for i, r in enumerate(rows, start=1):
        r["rank"] = i if math.isfinite(r[f"{key}_mean"]) else None
        if top is None or r["rank"] is None:
            r["vs_top"] = ""
        elif r is top:
            r["vs_top"] = "top"
        elif r[f"{key}_n"] < 2 or top[f"{key}_n"] < 2:
            r["vs_top"] = "?"
        else:
            se = math.sqrt(top[f"{key}_std"] ** 2 / top[f"{key}_n"]
                           + r[f"{key}_std"] ** 2 / r[f"{key}_n"])
            gap = abs(top[f"{key}_mean"] - r[f"{key}_mean"])
            r["vs_top"] = "~top" if gap <= 2 * se else "below"


def _pm(mean: float, std: float, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "-"
    if not math.isfinite(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f}±{std:.{digits}f}"


def _num(v: float, fmt: str) -> str:
    return format(v, fmt) if v is not None and math.isfinite(v) else "-"


def format_table(rows: Sequence[dict], *, test_name: str | None = None,
                 window: int | None = None) -> str:
    """A fixed-width text table of summary rows (pandas-free), with a legend."""
    head = ["#", "experiment", "seeds", "val loss (final)", f"mAP {test_name or ''} (final)",
            "best mAP @epoch", "mAP slope", "val slope", "vs top", "reading"]
    body = []
    for r in rows:
        seeds = f"{r['seeds_ok'] + r['seeds_unmarked']}/{r['seeds_total']}"
        extra = [f"{r[k]} {k.split('_')[1]}" for k in
                 ("seeds_diverged", "seeds_failed") if r.get(k)]
        if r.get("seeds_unmarked"):
            extra.append(f"{r['seeds_unmarked']} unmarked")
        if extra:
            seeds += f" ({', '.join(extra)})"
        best = _pm(r["mAP_best_mean"], r["mAP_best_std"])
        if math.isfinite(r["mAP_best_epoch_mean"]):
            best += f" @{r['mAP_best_epoch_mean']:.1f}"
        name = r["experiment"] + (f" (= {r['aliases']})" if r.get("aliases") else "")
        body.append([
            "" if r["rank"] is None else str(r["rank"]), name, seeds,
            _pm(r["val_loss_final_mean"], r["val_loss_final_std"]),
            _pm(r["mAP_final_mean"], r["mAP_final_std"]), best,
            _num(r["mAP_slope_mean"], "+.4f"), _num(r["val_slope_mean"], "+.4f"),
            r["vs_top"], r["reading"],
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
             for line in [head, ["-" * w for w in widths], *body]]
    lines.append("")
    lines.append(f"mean±std over seeds (sample std); slopes per epoch over the last "
                 f"{window or '?'} epochs; '~top': within 2 standard errors of the top (noise); "
                 "'?': one seed, cannot tell")
    for r in rows:
        if r.get("problems"):
            lines.append(f"{r['experiment']}: {r['problems']}")
    return "\n".join(lines)


def _save_summary(tune_dir: Path, summary: TuneSummary) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_ROW_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for r in summary.rows:
        writer.writerow({k: (yaml.safe_dump(r[k], default_flow_style=True).strip()
                             if isinstance(r.get(k), dict) else r.get(k)) for k in _ROW_FIELDS})
    atomic_write_text(tune_dir / "summary.csv", buf.getvalue())

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    write_json(tune_dir / "summary.json", {
        "test_name": summary.test_name, "window": summary.window, "notes": summary.notes,
        "rows": clean(summary.rows), "reading_guide": READING_GUIDE,
    })


# --------------------------------------------------------------------------------------------
# plots


def _band(series_by_seed: Iterable[dict[int, float]]) -> tuple[np.ndarray, ...]:
    """Epochs, mean, min and max over the seeds that reached each epoch."""
    by_epoch: dict[int, list[float]] = {}
    for s in series_by_seed:
        for ep, v in s.items():
            if math.isfinite(v):
                by_epoch.setdefault(ep, []).append(v)
    eps = np.array(sorted(by_epoch), dtype=np.float64)
    vals = [by_epoch[int(e)] for e in eps]
    return (eps, np.array([np.mean(v) for v in vals]), np.array([min(v) for v in vals]),
            np.array([max(v) for v in vals]))


def plot_tuning_curves(summary: TuneSummary, *, experiments: Sequence[str] | None = None,
                       top: int | None = 8):
    """mAP (of the summary's test set) and val loss per epoch: one line per experiment (mean over
    its statistic seeds) with a shaded band from the lowest to the highest seed. ``top`` keeps the
    best-ranked experiments (None: all). Returns a Figure."""
    from chlib.ui.plots import new_figure

    ranked = [r["experiment"] for r in summary.rows]
    names = list(experiments) if experiments is not None else ranked[: top or len(ranked)]
    fig, (ax_map, ax_val) = new_figure(1, 2, figsize=(12, 4.5))
    known = {r["experiment"] for r in summary.rows}
    for i, name in enumerate(names):
        if name not in known:
            continue
        color = f"C{i % 10}"
        seeds = summary.curves.get(name, {})
        for ax, get in ((ax_map, lambda s: s["mAP"].get(summary.test_name, {})),
                        (ax_val, lambda s: s["val_loss"])):
            eps, mean, lo, hi = _band(get(s) for s in seeds.values())
            if eps.size == 0:
                continue
            ax.plot(eps, mean, color=color, label=name, marker="o", markersize=3)
            if len(seeds) > 1:
                ax.fill_between(eps, lo, hi, color=color, alpha=0.2, linewidth=0)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_map, ax_val):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_map.set_title(f"mAP ({summary.test_name or 'no test set'})", fontsize=10)
    ax_map.set_xlabel("epoch")
    ax_map.set_ylabel("mAP")
    ax_val.set_title("validation loss (focal)", fontsize=10)
    ax_val.set_xlabel("epoch")
    ax_val.set_ylabel("loss")
    if names:
        ax_val.legend(fontsize=8, loc="best")
    fig.suptitle("mean over seeds; band = seed range", fontsize=9)
    return fig


def plot_tuning_ranking(summary: TuneSummary):
    """Horizontal bars of the experiments' mean final mAP (val loss if no test set), best at the
    top, with error bars of one seed std; hatched bars are within noise of the top. Returns a
    Figure."""
    from chlib.ui.plots import new_figure

    has_map = any(math.isfinite(r["mAP_final_mean"]) for r in summary.rows)
    key = "mAP_final" if has_map else "val_loss_final"
    rows = [r for r in summary.rows if math.isfinite(r[f"{key}_mean"])]
    fig, ax = new_figure(1, 1, figsize=(8, 0.45 * max(len(rows), 2) + 1.2))
    y = np.arange(len(rows))[::-1]
    means = [r[f"{key}_mean"] for r in rows]
    errs = [r[f"{key}_std"] if math.isfinite(r[f"{key}_std"]) else 0.0 for r in rows]
    bars = ax.barh(y, means, xerr=errs, color="C0", alpha=0.8, capsize=3)
    for bar, r in zip(bars, rows, strict=True):
        if r["vs_top"] == "below":
            bar.set_alpha(0.45)
        elif r["vs_top"] == "~top":
            bar.set_hatch("//")
    ax.set_yticks(y, [r["experiment"] for r in rows], fontsize=8)
    label = f"final mAP ({summary.test_name})" if has_map else "final val loss"
    ax.set_xlabel(f"{label}, mean ± std over seeds")
    ax.set_title("experiments ranked (hatched: within noise of the top)", fontsize=10)
    return fig


def save_tuning_figures(summary: TuneSummary, tune_dir: str | os.PathLike) -> dict[str, Path]:
    """Draw both figures and save them in ``<tune_dir>/figures/``; returns name -> path."""
    from chlib.ui.plots import save_figure

    out = {}
    for name, fn in (("tune_curves", plot_tuning_curves), ("tune_ranking", plot_tuning_ranking)):
        out[name] = save_figure(fn(summary), Path(tune_dir) / "figures" / f"{name}.png")
    return out

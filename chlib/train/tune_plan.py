"""Tuning plans: validation, factors, experiment names, expansion (see :mod:`chlib.train.tune`)."""

from __future__ import annotations

import copy
import difflib
import itertools
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Any

from chlib.core import schema
from chlib.core.config import HParams, deep_merge, load_yaml
from chlib.core.errors import ConfigError
from chlib.core.io import stable_hash
from chlib.core.schema import check
from chlib.train.tune_summary import FLAT_LOSS_SLOPE, FLAT_MAP_SLOPE

__all__ = ["ORIGINAL_SWEEP_KEYS", "Factor", "Experiment", "TunePlan", "parse_plan", "load_plan",
           "expand_plan", "experiment_name", "run_overrides"]


_INT_1 = (int, lambda v: v >= 1, "an integer >= 1")
_SLOPE = (float, lambda v: v >= 0, "a number >= 0")
# plain plan keys -> (type, check, what the value must be); null keeps the TunePlan default
_SCALARS: dict[str, tuple[Any, Callable[[Any], bool], str]] = {
    "dataset_dir": (str, lambda v: True, ""),
    "test_name": (str, lambda v: True, ""),
    "include_base": (bool, lambda v: True, ""),
    "mode": (str, lambda v: v in ("one_factor", "grid"), "'one_factor' or 'grid'"),
    "seeds": (list[int], lambda v: bool(v) and len(set(v)) == len(v),
              "a non-empty list of distinct integers"),
    "max_epochs": _INT_1,
    "early_stopping_patience": _INT_1,
    "flat_map_slope": _SLOPE,
    "flat_loss_slope": _SLOPE,
}
# early-stopping keys a plan may give at its top level; they join hp_overrides
_HP_SHORTCUTS = ("early_stop_metric", "map_stopping_testsets", "map_smoothing_alpha")
#: The original hp_tuning.yaml sweep keys, in the original's sweep order -> chlib factor key.
ORIGINAL_SWEEP_KEYS: dict[str, str] = {
    "chunk_frames": "chunk_frame,mean_size", "m_per_classes": "m_per_class",
    "num_blockss": "encoder.num_blocks", "spec_augmentations": "spec_augmentation",
    "losses": "losses", "learning_rates": "learning_rate", "lr_decays": "lr_decay",
    "adam_betas": "adam_b1,adam_b2", "optimizers": "optimizer",
}
_PLAN_KEYS = {*_SCALARS, *_HP_SHORTCUTS, *ORIGINAL_SWEEP_KEYS, "base", "factors", "hp_overrides",
              "mean_sizes", "foundation_checkpoint", "restore_optimizer_state"}

# Experiment-name labels: factor key -> prefix (the original's names where it had one).
_LABELS = {"learning_rate": "lrate", "encoder.num_blocks": "num_blocks",
           "adam_b1,adam_b2": "adam_betas", "optimizer": "optimizer_", "losses": "",
           "spec_augmentation": ""}
# Abbreviations for keys inside mapping values (the original's spec-aug and loss names).
_ABBREV = {
    "random_erase": "erase", "roll_pitch": "roll", "erase_num": "num", "region_size": "size",
    "shift_num": "shift", "method": "", "foc": "FOC", "triplet": "TRIP", "center": "CNTR",
    "output_dims": "dims", "weight": "wt", "margin": "marg",
}
_LOSS_BLOCKS = ("foc", "triplet", "center", "ce")
_MAX_NAME = 120


@dataclass(frozen=True)
class Factor:
    """One thing varied: ``name`` as written in the plan (``"adam_b1,adam_b2"``), its dotted
    config ``keys`` (``("",)``: a root mapping) and ``values``."""

    name: str
    keys: tuple[str, ...]
    values: tuple[Any, ...]

    def _pairs(self, value: Any) -> list[tuple[str, Any]]:
        return list(zip(self.keys, [value] if len(self.keys) == 1 else value, strict=True))

    def overrides(self, value: Any) -> dict:
        """The config overrides that set this factor to ``value`` (a nested mapping)."""
        if self.keys == ("",):
            return copy.deepcopy(dict(value))
        out: dict = {}
        for key, v in self._pairs(value):
            for part in reversed(key.split(".")):  # "a.b": v -> {"a": {"b": v}}
                v = {part: v}
            out = deep_merge(out, v)  # deep_merge copies v
        return out

    def label(self, value: Any) -> str:
        """Readable name part, e.g. ``lrate0.001`` or ``chunk_frame375_300_225_mean_size3``."""
        if self.name in _LABELS:
            return f"{_LABELS[self.name]}{_fmt(value)}"
        return "_".join(re.sub(r"^(spec_augmentation|encoder)\.", "", k).replace(".", "_") + _fmt(v)
                        for k, v in self._pairs(value))


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
    """A validated experiment plan (keys: ``chlib/recipes/tune_demo.yaml``)."""

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
        lines = [f"plan {self.source}: mode {self.mode}, base {base}",
                 f"  seeds {seeds}; max_epochs {self.max_epochs or '<base>'}; "
                 f"early_stopping_patience {self.early_stopping_patience or '<base>'}; "
                 f"test set {self.test_name or '<auto>'}",
                 *(f"  factor {f.name}: "
                   f"{[list(v) if isinstance(v, tuple) else v for v in f.values]}"
                   for f in self.factors),
                 *([f"  hp_overrides: {self.hp_overrides}"] if self.hp_overrides else []),
                 f"  {len(exps)} experiment(s) x {len(seeds)} seed(s) = {len(exps) * len(seeds)} "
                 "training run(s) (before merging duplicates):",
                 *(f"    {e.name}" for e in exps)]
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    """Value -> name text: 0.001 -> '0.001', [375, 300] -> '375_300', True -> 'true'."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, Mapping):
        parts = []
        for k, v in value.items():
            ab, text = _ABBREV.get(k, k), _fmt(v)
            parts.append((f"{ab}_{text}" if ab else text) if isinstance(v, Mapping) else ab + text)
        return "_".join(parts)
    if isinstance(value, (list, tuple)):
        return "_".join(_fmt(v) for v in value)
    return str(value)


def _safe_name(text: str, salt: Any) -> str:
    name = re.sub(r"[^A-Za-z0-9._+=-]", "_", text).strip("._") or "exp"
    if len(name) > _MAX_NAME:
        name = f"{name[:_MAX_NAME - 9]}_{stable_hash(salt, 8)}"
    return name


def _hint(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=3)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _check_key(dotted: str, where: str) -> None:
    node: Any = HParams().to_dict()  # the key tree of a training config
    walked: list[str] = []
    for part in dotted.split("."):
        check(isinstance(node, dict), where, f"factor key {dotted!r}: {'.'.join(walked)} is a "
              "value, not a mapping; vary it directly")
        if part not in node:
            raise ConfigError(f"{where}: factor key {dotted!r}: unknown config key {part!r}"
                              f"{' under ' + '.'.join(walked) if walked else ''}."
                              f"{_hint(part, node)}")
        walked.append(part)
        node = node[part]


def _make_factor(name: str, values: Any, where: str) -> Factor | None:
    if values in (None, {}, []):
        return None  # an empty sweep is disabled (the original's convention)
    check(isinstance(values, list), where,
          f"factor {name!r} must be a list of values, got {values!r}")
    keys = ("",) if name == "losses" else tuple(k.strip() for k in name.split(","))
    for v in values:
        check(name != "losses" or (isinstance(v, dict) and set(v) <= set(_LOSS_BLOCKS)), where,
              f"each 'losses' value must be a mapping of {', '.join(_LOSS_BLOCKS)} blocks, "
              f"got {v!r}")
        check(len(keys) == 1 or (isinstance(v, (list, tuple)) and len(v) == len(keys)), where,
              f"factor {name!r} varies {len(keys)} keys together; each value must be a list "
              f"of {len(keys)}, got {v!r}")
    if name != "losses":
        for k in keys:
            _check_key(k, where)
    for i, v in enumerate(values):
        check(v not in values[:i], where, f"factor {name!r} lists the value {v!r} twice")
    return Factor(name, keys, tuple(tuple(v) if len(keys) > 1 else v for v in values))


def _clean_overrides(d: Any, where: str, what: str) -> dict:
    """Drop null entries (the original's 'not set') from an overrides mapping."""
    if d is None:
        return {}
    check(isinstance(d, dict), where, f"{what} must be a mapping, got {d!r}")
    return {k: _clean_overrides(v, where, what) if isinstance(v, dict) else v
            for k, v in d.items() if v is not None}


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every entry of a nested mapping, the mappings included."""
    out = {f"{prefix}{k}": v for k, v in d.items()}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
    return out


def _parse_base(plan: TunePlan, d: dict, where: str) -> None:
    base = d.get("base") or {"recipe": "laptop"}
    check(isinstance(base, dict) and set(base) <= {"recipe", "config", "overrides"}, where,
          f"base must be a mapping with 'recipe' or 'config' (+ optional 'overrides'), "
          f"got {base!r}")
    check(("recipe" in base) != ("config" in base), where, "base needs exactly one of 'recipe' "
          "(a recipe name) or 'config' (a run's config/hparams.yaml)")
    plan.base_recipe = base.get("recipe")
    plan.base_config = str(base["config"]) if "config" in base else None
    plan.base_overrides = _clean_overrides(base.get("overrides"), where, "base.overrides")


def _parse_factors(d: dict, where: str) -> list[Factor]:
    given = d.get("factors") or {}
    check(isinstance(given, dict), where,
          f"factors must be a mapping of key: [values], got {given!r}")
    factors = [_make_factor(str(name), values, where) for name, values in given.items()]
    for orig, key in ORIGINAL_SWEEP_KEYS.items():
        values = d.get(orig)
        if orig == "chunk_frames" and values:  # crossed with mean_sizes when both are given
            if d.get("mean_sizes"):
                values = [[list(cf), int(ms)] for cf in values for ms in d["mean_sizes"]]
            else:
                key = "chunk_frame"
        factors.append(_make_factor(key, values, where))
    factors = [f for f in factors if f is not None]
    names = [f.name for f in factors]
    dup = sorted({n for n in names if names.count(n) > 1})
    check(not dup, where, f"factor(s) {', '.join(dup)} given twice (under factors: and as an "
          "original sweep key?)")
    return factors


def _parse_hp_overrides(plan: TunePlan, d: dict, where: str) -> None:
    hp_over = _clean_overrides(d.get("hp_overrides"), where, "hp_overrides")
    hp_over.update({k: d[k] for k in _HP_SHORTCUTS if d.get(k) is not None})
    for k, v in hp_over.items():  # values are checked against the real base when the plan runs
        if not (isinstance(v, dict) and "query_path" in v):  # a new test set
            _check_key(k, f"{where} hp_overrides")
    plan.hp_overrides = hp_over
    leaves = {k for k, v in _flat(hp_over).items() if not isinstance(v, dict)}
    for f in plan.factors:
        clash = sorted(leaves & set(_flat(f.overrides(f.values[0]))))
        check(not clash, where, f"hp_overrides sets {', '.join(clash)}, which factor {f.name!r} "
              "varies; remove it from hp_overrides")


def parse_plan(data: Mapping, *, where: str = "<plan>") -> TunePlan:
    """Validate a plan mapping (as read from YAML) into a :class:`TunePlan`; a ConfigError
    names ``where`` and the key."""
    check(isinstance(data, Mapping), where,
          f"a plan must be a mapping, got {type(data).__name__}")
    d = dict(data)
    for k in d:
        check(k in _PLAN_KEYS, where, f"unknown plan key {k!r}.{_hint(k, sorted(_PLAN_KEYS))} "
              f"Allowed: {', '.join(sorted(_PLAN_KEYS))}")
    check(d.get("foundation_checkpoint") is None, where, f"foundation_checkpoint "
          f"{d.get('foundation_checkpoint')!r}: warm starts from a foundation model are not "
          "supported by chlib's tuning yet; set it to null (every experiment trains from scratch)")
    plan = TunePlan(source=where, raw=copy.deepcopy(d))
    for key, (typ, ok, what) in _SCALARS.items():
        if d.get(key) is not None:  # the config's coercion (numeric strings are numbers)
            value = str(d[key]) if typ is str else schema.coerce(d[key], typ, where, key, what)
            check(ok(value), where, f"{key} must be {what}, got {d[key]!r}")
            setattr(plan, key, value)
    _parse_base(plan, d, where)
    plan.factors = _parse_factors(d, where)
    _parse_hp_overrides(plan, d, where)
    return plan


def load_plan(path: str | os.PathLike) -> TunePlan:
    """Read and validate a plan YAML file; a missing path naming a plan shipped in
    ``chlib/recipes/`` (chlib installed from a wheel, as on Colab) is read from there."""
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
    """The plan's experiments, in order (before merging equal settings): one_factor: ``base``
    (if ``include_base``), then each factor value alone; grid: every combination."""
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
    for combo in combos:
        name = experiment_name(combo)
        if any(e.name == name for e in out):  # two settings that read the same: add a hash
            name = _safe_name(f"{name}_{stable_hash([(f.name, v) for f, v in combo], 6)}", name)
        out.append(Experiment(name=name, settings={f.name: v for f, v in combo},
                              overrides=reduce(deep_merge, (f.overrides(v) for f, v in combo), {})))
    return out


def run_overrides(plan: TunePlan, exp: Experiment, seed: int | None) -> dict:
    """All overrides of one run, applied to the base config in this order: the base's
    ``overrides``, ``hp_overrides``, the experiment's factor values, then ``seed``,
    ``max_epochs`` and ``early_stopping_patience`` from the plan."""
    over = deep_merge(deep_merge(plan.base_overrides, plan.hp_overrides), exp.overrides)
    fixed = {"seed": seed, "max_epochs": plan.max_epochs,
             "early_stopping_patience": plan.early_stopping_patience}
    return deep_merge(over, {k: v for k, v in fixed.items() if v is not None})

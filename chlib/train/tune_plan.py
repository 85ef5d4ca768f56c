"""Tuning plans: validation, factors, experiment names and expansion (see :mod:`chlib.train.tune`)."""

from __future__ import annotations

import copy
import difflib
import itertools
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chlib.core.config import HParams, deep_merge, load_yaml
from chlib.core.errors import ConfigError
from chlib.core.io import stable_hash
from chlib.train.tune_summary import FLAT_LOSS_SLOPE, FLAT_MAP_SLOPE

__all__ = ["ORIGINAL_SWEEP_KEYS", "Factor", "Experiment", "TunePlan", "parse_plan", "load_plan",
           "expand_plan", "experiment_name", "run_overrides"]

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


def _check_key(dotted: str, where: str) -> None:
    node: Any = HParams().to_dict()  # the key tree of a training config
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
    return {f"{prefix}{k}" for k in d} | {key for k, v in d.items() if isinstance(v, dict)
                                           for key in _flat_keys(v, f"{prefix}{k}.")}


def _check_plan_keys(d: dict, where: str) -> None:
    allowed = _PLAN_KEYS | set(ORIGINAL_SWEEP_KEYS) | _EXTRA_ORIGINAL_KEYS
    for k in d:
        if k not in allowed:
            close = difflib.get_close_matches(k, sorted(allowed), n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"{where}: unknown plan key {k!r}.{hint} "
                              f"Allowed: {', '.join(sorted(allowed))}")


def _parse_base(plan: TunePlan, d: dict, where: str) -> None:
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


def _parse_factors(d: dict, where: str) -> list[Factor]:
    given = d.get("factors") or {}
    if not isinstance(given, dict):
        raise ConfigError(f"{where}: factors must be a mapping of key: [values], got {given!r}")
    factors = [_make_factor(str(name), values, where) for name, values in given.items()]
    for orig, key in ORIGINAL_SWEEP_KEYS.items():
        if orig not in d:
            continue
        values = d[orig]
        if orig == "chunk_frames" and values and not d.get("mean_sizes"):
            key = "chunk_frame"
        elif orig == "chunk_frames" and values:
            values = [[list(cf), int(ms)] for cf in values for ms in d["mean_sizes"]]
        factors.append(_make_factor(key, values, where))
    factors = [f for f in factors if f is not None]
    names = [f.name for f in factors]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{where}: factor(s) {', '.join(dup)} given twice "
                          "(under factors: and as an original sweep key?)")
    return factors


def _parse_numbers(plan: TunePlan, d: dict, where: str) -> None:
    if d.get("seeds") is not None:
        seeds = d["seeds"]
        if not isinstance(seeds, list) or not seeds or not all(
                isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ConfigError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"{where}: seeds {seeds} repeat a seed")
        plan.seeds = list(seeds)
    for k in ("max_epochs", "early_stopping_patience"):
        v = d.get(k)
        if v is not None:
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{where}: {k} must be an integer >= 1, got {v!r}")
            setattr(plan, k, v)
    for k in ("flat_map_slope", "flat_loss_slope"):
        v = d.get(k)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"{where}: {k} must be a number >= 0, got {v!r}")
            setattr(plan, k, float(v))
    plan.test_name = None if d.get("test_name") is None else str(d["test_name"])
    plan.include_base = bool(d.get("include_base", True))
    if d.get("foundation_checkpoint") is not None:
        raise ConfigError(f"{where}: foundation_checkpoint {d['foundation_checkpoint']!r}: warm "
                          "starts from a foundation model are not supported by chlib's tuning "
                          "yet; set it to null (every experiment trains from scratch)")


def _parse_hp_overrides(plan: TunePlan, d: dict, where: str) -> None:
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


def parse_plan(data: Mapping, *, where: str = "<plan>") -> TunePlan:
    """Validate a plan mapping (as read from YAML) into a :class:`TunePlan`; a ConfigError
    names ``where`` and the key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: a plan must be a mapping, got {type(data).__name__}")
    d = dict(data)
    _check_plan_keys(d, where)
    plan = TunePlan(source=where, raw=copy.deepcopy(d))
    _parse_base(plan, d, where)
    plan.factors = _parse_factors(d, where)
    _parse_numbers(plan, d, where)
    _parse_hp_overrides(plan, d, where)
    return plan


def _get(d: dict, dotted: str) -> Any:
    node: Any = d
    for part in dotted.split("."):
        node = node[part]
    return node


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
    over = deep_merge(deep_merge(plan.base_overrides, plan.hp_overrides), exp.overrides)
    fixed = {"seed": seed, "max_epochs": plan.max_epochs,
             "early_stopping_patience": plan.early_stopping_patience}
    return deep_merge(over, {k: v for k, v in fixed.items() if v is not None})

"""Config fields declared once by :func:`opt` (default, YAML key, allowed values), and the
generic YAML loader (:func:`flatten`, :func:`reject_unknown`, :func:`build`), checker
(:func:`check_fields`) and dumper (:func:`dump`) of such dataclasses."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import functools
import operator
import os
import typing
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from chlib.core.errors import ConfigError

__all__ = ["opt", "keys", "fixed_keys", "differences", "coerce", "flatten", "reject_unknown",
           "rename", "build", "check_fields", "dump", "check", "load_yaml", "deep_merge"]

_NAME = object()  # opt(key=...) default: the YAML key is the field name
_LE = {True: operator.le, False: operator.lt}  # a closed / open end of a range


def opt(default: Any = dataclasses.MISSING, *, key: str | None | object = _NAME,
        choices: tuple | None = None, rng: str | None = None, nonempty: bool = False,
        valid: tuple[Callable[[Any], bool], str] | None = None, fixed: bool = False,
        hint: str = "") -> Any:
    """A config field: ``default`` (a class: a nested section; none: required) plus its YAML
    ``key`` (dotted in a block; ``""``: a section at the top level; None: not in the YAML) and
    checks; ``rng``: an interval such as ``"[0, 1)"`` (of every entry of a list); ``valid``:
    (test, words) instead; ``fixed``: a run's checkpoints depend on it (see
    :func:`fixed_keys`)."""
    meta = {"key": key, "rule": valid or _rule(choices, rng), "nonempty": nonempty,
            "fixed": fixed, "hint": hint}
    if isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata=meta)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_hints = functools.cache(typing.get_type_hints)  # class -> {field name: type}


def _walk(cls: type, prefix: str = ""):
    """(field, dotted YAML key, type, prefix of its children) of each YAML field of ``cls``."""
    for f in fields(cls):
        key = f.metadata.get("key", _NAME)
        if key is not None:
            key = prefix + (f.name if key is _NAME else key)
            yield f, key, _hints(cls)[f.name], (key + "." if key else "")


def keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted YAML key of ``cls`` (nested sections expanded)."""
    return [k for _f, key, typ, sub in _walk(cls, prefix)
            for k in (keys(typ, sub) if is_dataclass(typ) else [key])]


def fixed_keys(cls: type, prefix: str = "") -> list[str]:
    """The dotted YAML keys of ``cls`` declared ``fixed`` (every key of a fixed section)."""
    out: list[str] = []
    for f, key, typ, sub in _walk(cls, prefix):
        fixed = f.metadata.get("fixed")
        if is_dataclass(typ):
            out += keys(typ, sub) if fixed else fixed_keys(typ, sub)
        elif fixed:
            out.append(key)
    return out


def differences(old: dict, new: dict, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old value, new value)}`` where two nested mappings differ."""
    out: dict[str, tuple[Any, Any]] = {}
    for k in [*old, *(k for k in new if k not in old)]:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(differences(a, b, f"{prefix}{k}."))
        elif a != b:
            out[f"{prefix}{k}"] = (a, b)
    return out


def coerce(value: Any, typ: Any, where: str, key: str, hint: str = "") -> Any:
    """Coerce a YAML value to ``typ`` (int -> float allowed, lists per entry; a numeric string,
    as YAML 1.1 reads ``1e-3``, is a number), else ConfigError."""
    args, origin = typing.get_args(typ), typing.get_origin(typ)
    if type(None) in args:  # X | None
        typ = next(a for a in args if a is not type(None))
        return None if value is None else coerce(value, typ, where, key, hint)
    num = value
    if typ in (int, float) and isinstance(value, str):
        with contextlib.suppress(ValueError):
            num = float(value)
    if origin in (list, tuple):
        if isinstance(value, (list, tuple)) and (origin is list or len(value) == len(args)):
            return origin(coerce(v, args[0], where, key, hint) for v in value)
    elif typ is float and isinstance(num, (int, float)) and not isinstance(num, bool):
        return float(num)
    elif typ is int and isinstance(num, float) and num.is_integer():
        return int(num)
    elif isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    what = {list: "a list", tuple: f"a list of {len(args)} values"}.get(origin, typ.__name__)
    remedy = f" ({hint})" if hint else ""
    raise ConfigError(f"{where}: {key} must be {what}, got {value!r}{remedy}")


def _rule(choices: tuple | None, rng: str | None) -> tuple[Callable[[Any], bool], str] | None:
    """A field's declared check and its words ("one of a, b", "in [0, 1)", ">= 1"), or None."""
    if choices:
        return choices.__contains__, f"one of {', '.join(map(str, choices))}"
    if not rng:
        return None
    lo_s, hi_s = rng[1:-1].split(", ")
    lo_ok, hi_ok = _LE[rng[0] == "["], _LE[rng[-1] == "]"]
    words = f"{'>=' if rng[0] == '[' else '>'} {lo_s}" if hi_s == "inf" else f"in {rng}"
    return (lambda v: lo_ok(float(lo_s), v) and hi_ok(v, float(hi_s))), words


def flatten(d: dict, where: str, allowed: list[str], prefix: str = "") -> dict:
    """Nested YAML sections (prefixes of ``allowed`` keys) -> ``{dotted key: value}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if not any(a.startswith(key + ".") for a in allowed):
            out[key] = v
        elif v is not None:
            check(isinstance(v, dict), where, f"{key} must be a mapping of key: value, got {v!r}")
            out.update(flatten(v, where, allowed, key + "."))
    return out


def reject_unknown(flat: dict, allowed: list[str], where: str, extra: str = "") -> None:
    for key in (k for k in flat if k not in allowed):
        section = key.rpartition(".")[0]
        pre = section + "." if section else ""
        near = sorted({a[len(pre):].split(".")[0] for a in allowed if a.startswith(pre)})
        close = difflib.get_close_matches(key, allowed, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"{where}: unknown key {key!r}.{hint} Allowed keys"
                          f"{' in ' + section if section else ''}: {', '.join(near)}"
                          f"{'' if section else extra}.")


def rename(d: dict, old: str, new: str, where: str) -> None:
    """Read the original's key ``old`` as ``new`` (both given is an error)."""
    if old in d:
        check(new not in d, where, f"both {old!r} (original) and {new!r} given; keep one")
        d[new] = d.pop(old)


def build(cls: type, flat: dict, where: str, prefix: str = "", **given: Any) -> Any:
    """An instance of ``cls`` from the keys of ``flat`` it declares (missing or None: default)."""
    kw = dict(given)
    for f, key, typ, sub in _walk(cls, prefix):
        if is_dataclass(typ):
            kw[f.name] = build(typ, flat, where, sub)
        elif flat.get(key) is not None:
            kw[f.name] = coerce(flat[key], typ, where, key, f.metadata["hint"])
    return cls(**kw)


def check_fields(obj: Any, where: str, prefix: str = "") -> None:
    """Check every field of ``obj`` against its declared choices, range and non-emptiness."""
    for f, key, _typ, sub in _walk(type(obj), prefix):
        value, m = getattr(obj, f.name), f.metadata
        if is_dataclass(value):
            check_fields(value, where, sub)
            continue
        entries = value if isinstance(value, (list, tuple)) else [value]
        ok, words = m["rule"] or (None, "")
        if m["nonempty"] and not entries:
            ok, words = None, "a non-empty list"
        if words and (ok is None or not all(ok(v) for v in entries if v is not None)):
            raise ConfigError(f"{where}: {key} must be {words}, got {value!r}"
                              + (f" ({m['hint']})" if m["hint"] else ""))


def dump(obj: Any, out: dict, prefix: str = "") -> dict:
    """Write the YAML fields of ``obj`` into the nested mapping ``out`` (None and [] left out)."""
    for f, key, _typ, sub in _walk(type(obj), prefix):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            dump(value, out, sub)
        elif value is not None and value != []:
            *parents, last = key.split(".")
            node = functools.reduce(lambda n, p: n.setdefault(p, {}), parents, out)
            node[last] = list(value) if isinstance(value, (list, tuple)) else value
    return out


def check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {msg}")


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping (an empty file is ``{}``); missing or not a mapping: ConfigError."""
    path = Path(path)
    check(path.exists(), str(path), "config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    check(data is None or isinstance(data, dict), str(path),
           f"expected a mapping of key: value, got {type(data).__name__}")
    return data or {}


def deep_merge(base: dict, over: dict) -> dict:
    """Recursively merge ``over`` into a copy of ``base`` (mappings merge, the rest replaces)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        both = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = deep_merge(out[k], v) if both else copy.deepcopy(v)
    return out

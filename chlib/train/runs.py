"""Run folders: recipes, ``config/hparams.yaml`` from a recipe and a dataset, metrics files."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from chlib.core import schema
from chlib.core.config import HParams, deep_merge, input_bins, load_hparams, load_yaml, save_hparams
from chlib.core.errors import ConfigError
from chlib.core.io import atomic_write_text, folder_lock, read_json, read_jsonl
from chlib.core.manifest import FULL_KEYS, read_manifest, write_manifest
from chlib.core.schema import check
from chlib.data.features import feature_path
from chlib.model.checkpoint import list_checkpoints

__all__ = ["RECIPES_DIR", "recipe_path", "load_recipe", "make_run_config", "setting_changes",
           "check_saved_config", "run_config", "read_metrics", "epoch_table",
           "save_epoch_table", "stopping_text"]

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
_FEATURE_KEYS = (("sample_rate", "sample_rate"), ("hop_length", "hop_length"), ("fmin", "fmin"),
                 ("n_bins", "n_bins"), ("bins_per_octave", "bins_per_octave"),
                 ("cqt_flavour", "flavour"))


def recipe_path(recipe: str | os.PathLike) -> Path:
    """The YAML of a recipe name ("laptop", "coverhunter") or a path to a YAML file."""
    for p in (Path(recipe), RECIPES_DIR / f"{recipe}.yaml"):
        if p.suffix in (".yaml", ".yml") and p.is_file():
            return p
    text = os.fspath(recipe)
    if Path(text).suffix in (".yaml", ".yml") or "/" in text or os.sep in text:
        raise ConfigError(f"recipe file {Path(text).resolve()} does not exist (paths are relative "
                          f"to the current directory {os.getcwd()}); check the path")
    known = sorted(x.stem for x in RECIPES_DIR.glob("*.yaml"))
    raise ConfigError(f"unknown recipe {text!r}: the built-in recipes are {', '.join(known)}; "
                      "or give the path of a .yaml file")


def load_recipe(recipe: str | os.PathLike = "laptop") -> dict:
    """A recipe's YAML mapping (not yet validated; no data paths)."""
    return load_yaml(recipe_path(recipe))


def _held_out_list(dataset_dir: Path, split: str, *, keep_if_all: bool) -> list[dict] | None:
    """The ``<split>.txt`` records of works held out entirely (``<split>-only-work-ids.txt``);
    None when fewer than 2 such works (or, unless ``keep_if_all``, when the split holds nothing
    else)."""
    ids_file, split_file = dataset_dir / f"{split}-only-work-ids.txt", dataset_dir / f"{split}.txt"
    if not ids_file.is_file() or not split_file.is_file():
        return None
    ids = {int(line) for line in ids_file.read_text(encoding="utf-8").split() if line.strip()}
    every = read_manifest(split_file, FULL_KEYS)
    # feature paths re-anchored: the copy lives elsewhere than the split file
    recs = [{**r, "feat": str(feature_path(r, split_file))} for r in every
            if int(r["work_id"]) in ids]
    if len({r["work_id"] for r in recs}) < 2 or (len(recs) == len(every) and not keep_if_all):
        return None
    return recs


def _testset(path: Path) -> dict:
    return {"query_path": str(path), "ref_path": str(path), "every_n_epoch_to_test": 1}


def _dataset_settings(d: dict, ds: Path, run_dir: Path) -> dict[Path, list[dict]]:
    """Set the data paths, CQT settings and test sets of dataset folder ``ds`` in ``d``;
    returns the held-out lists to write into the run's ``config/`` (path: records)."""
    check((ds / "train.txt").is_file(), str(ds), "no train.txt; run the split step on this "
          "dataset first")
    d["train_path"] = str(ds / "train.txt")
    val = ds / "val.txt"
    if val.is_file() and read_manifest(val, FULL_KEYS):
        d["val_path"] = str(val)
    else:
        d.pop("val_path", None)
    lists: dict[Path, list[dict]] = {}
    if (ds / "features.json").is_file():
        f = read_json(ds / "features.json")
        d.update({yk: f[fk] for yk, fk in _FEATURE_KEYS if fk in f})
    test = ds / "test.txt"
    if test.is_file() and read_manifest(test, FULL_KEYS):
        d["test"] = _testset(test)
        if (unseen := _held_out_list(ds, "test", keep_if_all=False)) is not None:
            d["unseen"] = _testset(out := run_dir / "config" / "test_unseen.txt")
            lists[out] = unseen
    if (val_unseen := _held_out_list(ds, "val", keep_if_all=True)) is not None:
        d["val_unseen"] = _testset(out := run_dir / "config" / "val_unseen.txt")
        lists[out] = val_unseen
    return lists


def make_run_config(run_dir: str | os.PathLike, recipe: str | os.PathLike = "laptop",
                    overrides: dict | None = None, *,
                    dataset_dir: str | os.PathLike | None = None) -> Path:
    """Write ``<run_dir>/config/hparams.yaml`` from a recipe and a dataset's split files.

    With ``dataset_dir``: the split paths, CQT settings from ``features.json`` and the test sets
    ``test``, ``unseen`` (works held out entirely) and ``val_unseen`` (what ``early_stop_metric:
    mAP`` stops on; without it mAP stopping falls back to val_loss with a warning).
    ``overrides`` (nested, YAML key names) are merged last. Returns the YAML path.
    """
    run_dir, lists = Path(run_dir), {}
    d = load_recipe(recipe)
    if dataset_dir is not None:
        lists = _dataset_settings(d, Path(dataset_dir), run_dir)
    if overrides:
        d = deep_merge(d, overrides)
    if dataset_dir is not None and "n_bins" in d:  # the model input follows the features
        d["input_dim"] = input_bins(d["n_bins"], d.get("input_transform") or "none")
    wanted = d.get("map_stopping_testsets") or []
    if d.get("early_stop_metric") == "mAP" and not all(
            isinstance(d.get(n), dict) or n in (d.get("testsets") or {}) for n in wanted):
        warnings.warn(
            f"recipe {recipe}: early stopping on the mAP of {wanted} is not possible with this "
            "dataset (no such test set: it needs works held out for validation, val_unseen in "
            "the data-prep config); using val_loss instead", stacklevel=2)
        d["early_stop_metric"], d["map_stopping_testsets"] = "val_loss", []
    hp = HParams.from_dict(d, where=f"recipe {recipe} + overrides")
    with folder_lock(run_dir, "writing the run config", wait=False):  # not under a training
        _check_run_change(run_dir, hp)  # before anything is written
        for path, recs in lists.items():
            write_manifest(path, recs)
        save_hparams(hp, out := run_dir / "config" / "hparams.yaml")
    return out


def setting_changes(old: dict, hp: HParams, where: str) -> str:
    """``"key old -> new, ..."`` for each setting of ``hp`` that differs from ``old`` (a saved
    config mapping); a ConfigError naming ``where`` when one of them is a setting the run's
    checkpoints depend on (the network's shape and input, :func:`schema.fixed_keys`)."""
    diff = schema.differences(old, hp.to_dict())
    fixed_keys = set(schema.fixed_keys(HParams))
    fixed = [k for k in diff if k in fixed_keys]

    def words(keys: list[str]) -> str:
        return ", ".join(f"{k} {diff[k][0]} -> {diff[k][1]}" for k in keys)

    check(not fixed, where, f"its checkpoints were trained with other model settings "
          f"({words(fixed)}) and would no longer load with this config; train in a new run "
          "folder (or delete its checkpoints/ to start this one again)")
    return words(list(diff))


def _check_run_change(run_dir: Path, hp: HParams) -> None:
    """Refuse ``hp`` for a run folder with checkpoints whose config differs in a fixed key."""
    cfg = run_dir / "config" / "hparams.yaml"
    if cfg.is_file() and list_checkpoints(run_dir / "checkpoints"):
        setting_changes(load_hparams(cfg).to_dict(), hp, str(run_dir))


def check_saved_config(path: Path, hp: HParams, remedy: str) -> bool:
    """True if ``path`` holds a config: then it must equal ``hp`` (else a ConfigError naming the
    differing keys, then ``remedy``); False if there is none yet."""
    if not path.is_file():
        return False
    old, new = load_hparams(path).to_dict(), hp.to_dict()
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    check(not diff, str(path), f"made with other settings (differing: {', '.join(diff)}); "
          + remedy)
    return True


def run_config(folder: Path, hp: HParams | str | os.PathLike | None, missing: str,
               remedy: str | None = None) -> HParams:
    """``hp`` (an HParams or a YAML path), saved as ``<folder>/config/hparams.yaml``; with
    ``remedy`` an existing one must equal it (see :func:`check_saved_config`). None: the saved
    one, else a ConfigError saying ``missing``."""
    cfg = folder / "config" / "hparams.yaml"
    if hp is None:
        check(cfg.is_file(), str(cfg), missing)
        return load_hparams(cfg)
    hp = hp if isinstance(hp, HParams) else load_hparams(hp)
    if remedy is None or not check_saved_config(cfg, hp, remedy):
        _check_run_change(folder, hp)
        save_hparams(hp, cfg)
    return hp


def read_metrics(run_dir: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """Records of ``<run>/metrics.jsonl`` (all, or those of one ``kind``: train/val/test/epoch)."""
    return [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl")
            if kind is None or r.get("kind") == kind]


def epoch_table(run_dir: str | os.PathLike) -> Any:
    """One row per epoch (a DataFrame indexed by epoch): losses, lr, step, mAP per test set...
    When an epoch was run twice (a resume after a kill), its last record wins."""
    rows = [{k: v for k, v in r.items() if k != "kind"} for r in read_metrics(run_dir, "epoch")]
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).drop_duplicates("epoch", keep="last").sort_values("epoch") \
        .set_index("epoch")


def save_epoch_table(run_dir: str | os.PathLike) -> Path:
    """Write :func:`epoch_table` as ``<run>/epochs.csv`` (beside metrics.jsonl), atomically."""
    atomic_write_text(out := Path(run_dir) / "epochs.csv", epoch_table(run_dir).to_csv())
    return out


def stopping_text(hp: HParams) -> str:
    """How the run names its best epoch and when it stops, in words, read from ``hp``
    (``early_stop_metric``, ``map_stopping_testsets``, ``early_stopping_patience``)."""
    n, sets = hp.early_stopping_patience, ", ".join(map(repr, hp.map_stopping_testsets))
    if hp.early_stop_metric == "mAP":
        what = "mAP" if len(hp.map_stopping_testsets) == 1 else "mean mAP"
        return (f"The best epoch is the one with the highest {what} on test set(s) {sets}; "
                f"training stops when the smoothed {what} (alpha {hp.map_smoothing_alpha:g}) has "
                f"not improved for {n} evaluations in a row, or after max_epochs "
                f"{hp.max_epochs}.")
    loss = "validation loss" if hp.val_path else "training loss (no validation data)"
    return (f"The best epoch is the one with the lowest {loss}; training stops after {n} "
            f"epochs without a lower one, or after max_epochs {hp.max_epochs}.")

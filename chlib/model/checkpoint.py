"""Checkpoints on disk: the original CoverHunter(MPS) layout, read and written.
Layout (fact sheet 2.4; epochs are 0-based and zero-padded to 8 digits)::

    <run>/config/hparams.yaml
    <run>/checkpoints/g_00000012     {"generator": model.state_dict()}   weights only
    <run>/checkpoints/do_00000012    {"optim_g", "steps", "epoch", "early_stopping", ...}
    <run>/checkpoints/best.json      {"epoch": N, ...}  written by chlib's trainer (optional)

The original CoverHunter keeps the same files in ``<model_dir>/pt_model/``, CoverHunterMPS's
production training in ``prod_checkpoints/``; all three are read. A ``g_`` file written here
holds exactly ``{"generator": state_dict}``, so the original tools load it too. Weights are read
with ``torch.load(weights_only=True)``: a checkpoint cannot run code when opened. Fixed here:
the original's model loader never picked an epoch-0 checkpoint (bug 13.3.8)."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from chlib.core.config import HParams, load_hparams
from chlib.core.device import pick_device
from chlib.core.errors import CheckpointError
from chlib.core.io import atomic_torch_save, read_json
from chlib.model.network import CoverHunterNet

__all__ = ["CHECKPOINT_DIR_NAMES", "checkpoint_name", "list_checkpoints", "latest_epoch",
           "find_checkpoint_dir", "remove_temp_files", "save_checkpoint", "load_generator_state",
           "load_train_state", "load_state_into", "model_fingerprint", "read_best_epoch",
           "resolve_epoch", "load_model"]

# Sub-folders holding g_/do_ files, in search order: chlib's and CoverHunterMPS's training, the
# fork's production training, the original's (same module names: keys load without renaming).
CHECKPOINT_DIR_NAMES = ("checkpoints", "prod_checkpoints", "pt_model")

BEST_FILE = "best.json"
EPOCH_DIGITS = 8


def checkpoint_name(epoch: int, prefix: str = "g_") -> str:
    """File name of an epoch's checkpoint: ``checkpoint_name(12) == "g_00000012"``."""
    if epoch < 0:
        raise CheckpointError(f"epoch must be >= 0, got {epoch}")
    return f"{prefix}{epoch:0{EPOCH_DIGITS}d}"


def list_checkpoints(ckpt_dir: str | os.PathLike, prefix: str = "g_") -> dict[int, Path]:
    """``{epoch: path}`` of every ``<prefix><digits>`` file in ``ckpt_dir`` (epoch 0 too), sorted;
    ``{}`` for a missing folder. Temporary files (``.g_00000003.xxx.tmp``) do not match."""
    ckpt_dir = Path(ckpt_dir)
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)$")
    found = {int(m.group(1)): p for p in (ckpt_dir.iterdir() if ckpt_dir.is_dir() else ())
             if (m := pattern.match(p.name)) and p.is_file()}
    return dict(sorted(found.items()))


def remove_temp_files(ckpt_dir: str | os.PathLike) -> int:
    """Delete the temporary files (``.g_00000003.xxx.tmp``) a killed save left in ``ckpt_dir``
    (call it only while no one else writes there: under the run's lock); how many."""
    stale = [p for p in Path(ckpt_dir).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def latest_epoch(ckpt_dir: str | os.PathLike, prefix: str = "g_") -> int | None:
    """Largest saved epoch in ``ckpt_dir`` (0 counts), or None when there is none."""
    return max(list_checkpoints(ckpt_dir, prefix), default=None)


def find_checkpoint_dir(run_or_model_dir: str | os.PathLike) -> Path:
    """The folder holding the ``g_`` files: the folder itself or one of its
    :data:`CHECKPOINT_DIR_NAMES` sub-folders (several with checkpoints: CheckpointError)."""
    if not (root := Path(run_or_model_dir)).is_dir():
        raise CheckpointError(f"{root}: folder not found (expected a run or model folder)")
    if list_checkpoints(root):
        return root
    candidates = [root / name for name in CHECKPOINT_DIR_NAMES if list_checkpoints(root / name)]
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        raise CheckpointError(f"{root}: several checkpoint folders hold g_ files "
                              f"({', '.join(c.name for c in candidates)}); pass the one you mean, "
                              f"e.g. {candidates[0]}")
    raise CheckpointError(f"{root}: no g_######## checkpoint files found in it or in its "
                          f"{', '.join(n + '/' for n in CHECKPOINT_DIR_NAMES)} sub-folders: train "
                          "a model first or point at the folder that holds them")


def save_checkpoint(ckpt_dir: str | os.PathLike, epoch: int, *, model_state: Mapping[str, Tensor],
                    train_state: dict[str, Any] | None = None) -> Path:
    """Write ``g_<epoch>`` = ``{"generator": model_state}`` (and ``do_<epoch>`` = train_state)
    atomically, ``do_`` first (so a ``g_`` file always has its ``do_`` partner), tensors copied
    to the CPU; returns the ``g_`` path."""
    ckpt_dir = Path(ckpt_dir)
    if train_state is not None:
        atomic_torch_save(ckpt_dir / checkpoint_name(epoch, "do_"), train_state)
    g_path = ckpt_dir / checkpoint_name(epoch, "g_")
    atomic_torch_save(g_path, {"generator": {k: v.detach().cpu() for k, v in model_state.items()}})
    return g_path


def _torch_load(path: Path, *, weights_only: bool) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # torch raises many types for corrupt or foreign files
        if weights_only and (isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e)):
            # torch's text advises loading it unsafely (weights_only=False): not passed on
            raise CheckpointError(f"{path}: this file holds objects other than tensors; it is "
                                  "not a chlib checkpoint or was tampered with (or is damaged). "
                                  "Do not load it; delete it or pick another epoch") from None
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({type(e).__name__}: "
                              f"{e}). The file may be truncated or not a checkpoint; delete it or "
                              "pick another epoch") from e


def load_generator_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """The model ``state_dict`` in a ``g_`` file (CPU, ``weights_only=True``; a bare one too)."""
    path = Path(path)
    obj = _torch_load(path, weights_only=True)
    if isinstance(obj, dict) and "generator" in obj:
        obj = obj["generator"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected {{'generator': state_dict}} (a mapping of names "
                              f"to tensors), found {type(obj).__name__}; is this a do_ (optimizer) "
                              "file?")
    return dict(obj)


def load_train_state(path: str | os.PathLike, *, trusted: bool = False) -> dict[str, Any]:
    """The training state in a ``do_`` file, read with ``weights_only=True`` unless ``trusted``
    (needed for e.g. numpy RNG state; unpickling can run code, so only for files you trust)."""
    path = Path(path)
    if not isinstance(obj := _torch_load(path, weights_only=not trusted), dict):
        raise CheckpointError(
            f"{path}: expected a dict of training state, found {type(obj).__name__}")
    return obj


# (key whose first dimension reveals a config value, the hint when checkpoint a != config b)
_SIZE_HINTS = (
    ("_ce_layer.weight", "foc.output_dims differs: checkpoint has {a} classes, config {b} "
                         "(set foc.output_dims: {a}, or auto)"),
    ("_global_cmvn.weight", "input_dim (CQT bins) differs: checkpoint {a}, config {b}"),
    ("_encoder.after_norm.weight", "encoder.output_dims differs: checkpoint {a}, config {b}"),
    ("_encoder.encoders.0.feed_forward.w_1.weight",
     "encoder.attention_dim (feed-forward size) differs: checkpoint {a}, config {b}"),
    ("_bottleneck.weight", "embed_dim differs: checkpoint {a}, config {b}"))


def _mismatch_hints(ckpt: Mapping[str, Tensor], model_state: Mapping[str, Tensor]) -> list[str]:
    """Plain-language guesses at which config value differs between checkpoint and model."""

    def rows(sd: Mapping[str, Tensor], key: str) -> int | None:
        return int(sd[key].shape[0]) if key in sd and sd[key].dim() >= 1 else None

    def n_blocks(sd: Mapping[str, Tensor]) -> int:
        ids = {int(m.group(1)) for k in sd if (m := re.match(r"_encoder\.encoders\.(\d+)\.", k))}
        return max(ids) + 1 if ids else 0

    hints = []
    for key, hint in _SIZE_HINTS:
        a, b = rows(ckpt, key), rows(model_state, key)
        if a is not None and b is not None and a != b:
            hints.append(hint.format(a=a, b=b))
    b_ckpt, b_model = n_blocks(ckpt), n_blocks(model_state)
    if b_ckpt != b_model:
        hints.append(f"encoder.num_blocks differs: checkpoint {b_ckpt}, config {b_model}")
    if ("_embed_lo.weight" in ckpt) != ("_embed_lo.weight" in model_state):
        hints.append("_embed_lo is in only one of them: embed_dim equals encoder.output_dims in "
                     "one and not in the other")
    return hints


def load_state_into(model: nn.Module, state_dict: Mapping[str, Tensor], *,
                    where: str = "checkpoint") -> None:
    """Load ``state_dict`` into ``model`` strictly; on any mismatch nothing is loaded and the
    :class:`CheckpointError` (naming ``where``) lists every key and shape problem, with hints."""
    ckpt, own = dict(state_dict), model.state_dict()
    problems = {"missing from the checkpoint": [k for k in own if k not in ckpt],
                "unexpected in the checkpoint": [k for k in ckpt if k not in own],
                "shape mismatches": [
                    f"{k}: checkpoint {tuple(ckpt[k].shape)}, model {tuple(own[k].shape)}"
                    for k in own if k in ckpt and tuple(ckpt[k].shape) != tuple(own[k].shape)]}
    if any(problems.values()):
        lines = [f"{where} does not match the model built from the config:"]
        for title, items in problems.items():
            if items:
                lines += [f"  {title} ({len(items)}):", *(f"    {item}" for item in items)]
        if hints := _mismatch_hints(ckpt, own):
            lines += ["  likely cause:", *(f"    {h}" for h in hints)]
        lines.append("  Build the model from the hparams.yaml saved with this checkpoint.")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(ckpt, strict=True)


def model_fingerprint(state_dict: Mapping[str, Tensor]) -> str:
    """First 16 hex characters of a SHA-256 over the weights (fact sheet 9.1): per key, sorted,
    the key, ``str(tuple(shape))``, ``str(dtype)`` and the raw CPU bytes (so any change of value,
    shape, dtype or name changes it; the device does not)."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        for text in (key, str(tuple(t.shape)), str(t.dtype)):
            h.update(text.encode("utf-8"))
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def read_best_epoch(ckpt_dir: str | os.PathLike) -> int | None:
    """Epoch recorded in ``<ckpt_dir>/best.json`` by the trainer, or None if there is no file."""
    if not (path := Path(ckpt_dir) / BEST_FILE).is_file():
        return None
    try:
        epoch = read_json(path)["epoch"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: expected JSON like {{\"epoch\": 12}} ({e})") from e
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise CheckpointError(f"{path}: 'epoch' must be an integer >= 0, got {epoch!r}")
    return epoch


def resolve_epoch(ckpt_dir: str | os.PathLike, epoch: int | str = "latest") -> int:
    """The epoch number meant by ``epoch`` ("latest", "best" or an int) in ``ckpt_dir``."""
    if not (available := list_checkpoints(ckpt_dir)):
        raise CheckpointError(f"{ckpt_dir}: no g_######## checkpoint files")
    if epoch == "latest":
        return max(available)
    if epoch == "best":
        if (best := read_best_epoch(ckpt_dir)) is None:
            raise CheckpointError(f"{ckpt_dir}: no {BEST_FILE} (written by chlib's trainer); ask "
                                  "for 'latest' or an epoch number "
                                  f"({', '.join(map(str, available))})")
        epoch = best
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise CheckpointError(f"epoch must be 'latest', 'best' or an integer, got {epoch!r}")
    if epoch not in available:
        raise CheckpointError(f"{ckpt_dir}: no checkpoint for epoch {epoch}; available: "
                              f"{', '.join(map(str, available))}")
    return epoch


def load_model(model_dir: str | os.PathLike, epoch: int | str = "latest",
               device: str | torch.device = "auto",
               hp: HParams | None = None) -> tuple[nn.Module, HParams, int]:
    """Build a :class:`~chlib.model.CoverHunterNet` from a run folder and load a checkpoint.
    ``model_dir``: a run folder (``config/hparams.yaml`` + a checkpoint sub-folder) or the
    checkpoint folder (config from its parent). ``foc.output_dims: auto`` takes the class count
    from the checkpoint. ``epoch``: "latest", "best" or a number. Returns ``(model in eval mode
    on the device, hp, epoch)``."""
    model_dir = Path(model_dir)
    ckpt_dir = find_checkpoint_dir(model_dir)
    if hp is None:
        run_dir = model_dir if ckpt_dir != model_dir else model_dir.parent
        hp = load_hparams(run_dir / "config" / "hparams.yaml")
    chosen = resolve_epoch(ckpt_dir, epoch)
    state = load_generator_state(path := ckpt_dir / checkpoint_name(chosen))
    if hp.num_classes_auto and "_ce_layer.weight" not in state:
        raise CheckpointError(f"{path}: no _ce_layer.weight to size foc.output_dims: auto from")
    num_works = int(state["_ce_layer.weight"].shape[0]) if hp.num_classes_auto else None
    model = CoverHunterNet(hp.model_config(num_works))
    load_state_into(model, state, where=str(path))
    model.to(pick_device(device)).eval()
    return model, hp, chosen

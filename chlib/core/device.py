"""Choosing the torch device (cuda, mps or cpu) and its quirks, in one place."""

from __future__ import annotations

import torch

from chlib.core.errors import ConfigError

__all__ = ["pick_device", "device_dtype_ok", "synchronize"]


def pick_device(name: str | torch.device | None = "auto") -> torch.device:
    """The torch device for ``name``: ``"auto"`` (or None) picks CUDA, else Apple MPS, else CPU;
    an explicit ``"cuda"``/``"mps"`` that is not available is a :class:`ConfigError`."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    kind = "cuda" if name.startswith("cuda") else name
    if kind not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unknown device {name!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if not {"cpu": True, "cuda": torch.cuda.is_available(), "mps": mps}[kind]:
        raise ConfigError(f"device {name!r} was asked for but {kind.upper()} is not available; "
                          "use 'auto' or 'cpu'")
    return torch.device(name)


def device_dtype_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """False for dtypes the device cannot hold (MPS has no float64)."""
    return not (device.type == "mps" and dtype == torch.float64)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (for honest timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()

"""Choosing the torch device (cuda, mps or cpu) and its quirks, in one place."""

from __future__ import annotations

import torch

from chlib.core.errors import ConfigError

__all__ = ["pick_device", "device_dtype_ok", "synchronize", "empty_cache"]


def pick_device(name: str | torch.device | None = "auto") -> torch.device:
    """Return the torch device for ``name``.

    ``"auto"`` (or None) picks CUDA if available, else Apple MPS, else CPU. An explicit
    ``"cuda"``/``"mps"`` that is not available is a :class:`ConfigError` saying so.
    """
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but CUDA is not available; use 'auto' or 'cpu'")
    if name == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise ConfigError("device 'mps' was asked for but MPS is not available; use 'auto' or 'cpu'")
    if not (name == "cpu" or name == "mps" or name.startswith("cuda")):
        raise ConfigError(f"unknown device {name!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
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


def empty_cache(device: torch.device) -> None:
    """Release cached accelerator memory."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()

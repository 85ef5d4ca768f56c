"""Invariance diagnostics: what is a trained model blind to? Each recording is changed in ONE
factor (in the feature domain) and used as a query against all the unchanged recordings; the
model passes when it finds its source. Covers differ in exactly these factors (``FACTORS``):

* ``transpose`` - semitones; the CQT moves by whole bins, vacated bins get -100 dB;
* ``tempo`` - playing-speed factor, frames resampled (0.7 = slower, longer);
* ``timbre`` - dB depth of a random smooth spectral envelope (another instrument or EQ);
* ``noise`` - signal-to-noise ratio in dB of a noise floor under the music;
* ``excerpt`` - fraction of the recording kept, from a random start (other form or length).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from chlib.core.errors import ConfigError
from chlib.core.manifest import read_manifest
from chlib.data.features import PAD_DB, feature_path, load_feature
from chlib.retrieval.embed import embed_recordings
from chlib.retrieval.evaluate import load_checkpoint, resolve_testsets
from chlib.retrieval.protocol import track_distances
from chlib.retrieval.scoring import readings_of, rule_of
from chlib.signal.specaug import random_eq, tempo_resample

__all__ = ["FACTORS", "change_one_factor", "invariance_curves", "invariance_for_run"]

FACTORS: dict[str, list[float]] = {
    "transpose": [-24, -12, -7, -5, -3, -2, -1, 0, 1, 2, 3, 5, 7, 12, 24],
    "tempo": [0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.4],
    "timbre": [0, 6, 12, 20, 30],
    "noise": [40, 20, 10, 5, 0],
    "excerpt": [1.0, 0.75, 0.5, 0.33],
}


def change_one_factor(feat: np.ndarray, factor: str, value: float, *, bins_per_octave: int = 12,
                      rng: np.random.Generator) -> np.ndarray:
    """``feat`` [frames, bins] (dB, max 0) with one factor changed; float32, same bins. The
    identity values (transpose 0, tempo 1, timbre 0, excerpt 1) return a copy; ``noise`` always
    adds a floor at ``value`` dB below the track's mean level."""
    x = np.array(feat, dtype=np.float32)
    frames, n_bins = x.shape
    if factor == "transpose":
        shift = int(round(value * bins_per_octave / 12))
        out = np.full_like(x, PAD_DB)
        if abs(shift) < n_bins:
            src = slice(max(0, -shift), n_bins - max(0, shift))
            dst = slice(max(0, shift), n_bins - max(0, -shift))
            out[:, dst] = x[:, src]
        return out
    if factor == "tempo":
        return tempo_resample(x, max(1, int(round(frames / value))))
    if factor == "timbre":
        return random_eq(x, value, rng=rng)
    if factor == "noise":
        level = 10 * np.log10(np.mean(10 ** (x / 10))) - value  # noise power, dB
        noise = level + 10 * np.log10(rng.exponential(size=x.shape))  # Rayleigh magnitudes
        return (10 * np.log10(10 ** (x / 10) + 10 ** (noise / 10))).astype(np.float32)
    if factor == "excerpt":
        keep = max(1, int(round(frames * value)))
        start = int(rng.integers(0, frames - keep + 1))
        return x[start:start + keep].copy()
    raise ConfigError(f"unknown factor {factor!r}; choose from {', '.join(FACTORS)}")


def invariance_curves(model: torch.nn.Module, features: Sequence[Any], hp: Any, *,
                      factors: dict[str, Sequence[float]] | None = None, rule: str | None = None,
                      device: str | torch.device | None = None, seed: int = 0) -> pd.DataFrame:
    """Top-1 rate of finding the unchanged recording, per factor and value, of ``features``
    ([frames, bins] arrays or ``.npy`` paths: a few dozen recordings of different works). One
    row per (factor, value): ``top1`` (share of queries nearest their own source), ``mean_rank``
    (1 = always first), ``distance`` (mean query-to-source distance), ``chance`` (1 / N)."""
    rule = rule or rule_of(hp)
    feats = [np.asarray(load_feature(f)) for f in features]
    if len(feats) < 2:
        raise ConfigError("invariance_curves needs at least 2 recordings")
    refs = embed_recordings(model, feats, hp, device=device, progress=False)
    bpo = hp.features.bins_per_octave
    rows = []
    for factor, values in (factors or FACTORS).items():
        for value in values:
            rng = np.random.default_rng(seed)
            changed = [change_one_factor(f, factor, value, bins_per_octave=bpo, rng=rng)
                       for f in feats]
            queries = embed_recordings(model, changed, hp, device=device, progress=False)
            dist = track_distances(queries, refs, rule=rule, readings=readings_of(hp))
            own = np.diag(dist)
            rank = 1 + (dist < own[:, None]).sum(axis=1)
            rows.append({"factor": factor, "value": value, "top1": float(np.mean(rank == 1)),
                         "mean_rank": float(rank.mean()), "distance": float(own.mean()),
                         "chance": 1.0 / len(feats)})
    return pd.DataFrame(rows)


def invariance_for_run(run_dir: str | os.PathLike, *, checkpoint: str | int = "best",
                       testset: str | None = None, n: int = 24, device: str = "auto",
                       factors: dict[str, Sequence[float]] | None = None,
                       seed: int = 0) -> pd.DataFrame:
    """:func:`invariance_curves` of a run's checkpoint on ``n`` recordings of its test set
    ``testset`` (default: the first), one recording per work (the first of each, by perf id)."""
    model, hp, _, _ = load_checkpoint(run_dir, checkpoint, device)
    specs = {s.name: s for s in resolve_testsets(hp)}  # ConfigError if there is none
    spec = specs[testset] if testset in specs else next(iter(specs.values()))
    first: dict[str, dict] = {}
    for rec in sorted(read_manifest(spec.query_path, required=("perf", "work", "feat")),
                      key=lambda r: str(r["perf"])):
        first.setdefault(str(rec["work"]), rec)
    chosen = list(first.values())[:n]
    return invariance_curves(model, [feature_path(r, spec.query_path) for r in chosen], hp,
                             factors=factors, device=device, seed=seed)

"""Coarse-to-fine training: chunks aligned between versions of a work (the CoverHunter paper's
second stage, never released by its authors).

:func:`mine_alignments` embeds every training recording's windows (the run's shortest chunk,
every ``hop`` frames) with a trained model and, per work, matches each recording's windows to
a pivot recording's (the work's longest): a pair is kept when the two windows are each other's
nearest neighbour and their cosine similarity is at least ``min_similarity``. Each pivot window
with matches is one *group*: the start frame of the same passage in each recording. Training
with ``align_path`` (run config) then cuts the m chunks of a work in a batch at one group's
starts (:class:`chlib.data.dataset.ChunkDataset`), so the model is shown the *same passage* in
different versions instead of random passages."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chlib.core.errors import ConfigError
from chlib.core.io import read_json, write_json
from chlib.data.features import feature_path, load_feature
from chlib.model.checkpoint import model_fingerprint
from chlib.retrieval.embed import embed_windows, window_starts
from chlib.retrieval.protocol import unit_rows

__all__ = ["ALIGN_VERSION", "mine_alignments", "write_alignments", "read_alignments",
           "aligned_groups"]

ALIGN_VERSION = 1


def _pivot_matches(pivot: np.ndarray, other: np.ndarray, min_similarity: float
                   ) -> dict[int, int]:
    """Mutual nearest neighbours between two recordings' unit windows: pivot row -> other row."""
    sim = pivot @ other.T  # [P, O]
    best_o, best_p = sim.argmax(axis=1), sim.argmax(axis=0)
    return {int(i): int(j) for i, j in enumerate(best_o)
            if best_p[j] == i and sim[i, j] >= min_similarity}


def mine_alignments(model: torch.nn.Module, records: Sequence[dict], hp: Any, *,
                    manifest_path: str | os.PathLike | None = None, hop: int = 25,
                    min_similarity: float = 0.8, device: str | torch.device = "cpu") -> dict:
    """Alignment groups of ``records`` (full.txt-style, with ``feat``): ``{"version",
    "model_fingerprint", "window", "hop", "min_similarity", "groups": [{"work", "starts":
    {perf: start frame}}]}``; windows of ``min(hp.chunk_len)`` raw frames every ``hop``."""
    if hop < 1 or not -1.0 <= min_similarity <= 1.0:
        raise ConfigError(f"need hop >= 1 frame and min_similarity in [-1, 1], got {hop}, "
                          f"{min_similarity}")
    window = int(min(hp.chunk_len))
    feats = [feature_path(r, manifest_path) for r in records]
    wins = embed_windows(model, feats, window=window, mean_size=hp.mean_size, hop=hop,
                         tail="shift", min_tail=0.0, device=device, progress=False,
                         transform=hp.input_transform,
                         bins_per_octave=hp.features.bins_per_octave)
    by_work: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_work.setdefault(str(r["work"]), []).append(i)
    groups = []
    for work, members in sorted(by_work.items()):
        if len(members) < 2:
            continue
        pivot = max(members, key=lambda i: len(wins[i]))
        starts = {i: window_starts(load_feature(feats[i]).shape[0], window, hop=hop,
                                   tail="shift", min_tail=0.0) for i in members}
        found: dict[int, dict[str, int]] = {}
        p_unit = unit_rows(wins[pivot])
        for i in members:
            if i == pivot:
                continue
            for pi, oi in _pivot_matches(p_unit, unit_rows(wins[i]), min_similarity).items():
                found.setdefault(pi, {records[pivot]["perf"]: starts[pivot][pi]})[
                    records[i]["perf"]] = starts[i][oi]
        groups += [{"work": work, "starts": g} for _, g in sorted(found.items())]
    return {"version": ALIGN_VERSION, "model_fingerprint": model_fingerprint(model.state_dict()),
            "window": window, "hop": hop, "min_similarity": min_similarity, "groups": groups}


def write_alignments(path: str | os.PathLike, alignments: dict) -> Path:
    """Write :func:`mine_alignments`' result as JSON, atomically; returns the path."""
    write_json(path, alignments)
    return Path(path)


def read_alignments(path: str | os.PathLike) -> dict:
    """An alignments file, checked (ConfigError naming the file and what is wrong)."""
    data = read_json(path)
    if not isinstance(data, dict) or data.get("version") != ALIGN_VERSION or not isinstance(
            data.get("groups"), list):
        raise ConfigError(f"{path}: not a chlib alignments file (version {ALIGN_VERSION}); "
                          "make one with chlib.train.align.mine_alignments")
    for k, g in enumerate(data["groups"]):
        if not (isinstance(g, dict) and isinstance(g.get("starts"), dict) and all(
                isinstance(v, int) and v >= 0 for v in g["starts"].values())):
            raise ConfigError(f"{path}: group {k} must be {{'work', 'starts': {{perf: frame}}}} "
                              "with non-negative integer frames")
    return data


def aligned_groups(alignments: dict, records: Sequence[dict]) -> dict[int, list[dict[int, int]]]:
    """Per work id of ``records``, its groups as ``{record index: start frame}`` (perfs the
    records do not hold are dropped; groups left with fewer than 2 members too)."""
    index = {str(r["perf"]): i for i, r in enumerate(records)}
    out: dict[int, list[dict[int, int]]] = {}
    for g in alignments["groups"]:
        members = {index[p]: int(s) for p, s in g["starts"].items() if p in index}
        if len(members) >= 2:
            work_id = int(records[next(iter(members))]["work_id"])
            out.setdefault(work_id, []).append(members)
    return out

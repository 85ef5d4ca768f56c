"""Prototype: does searching the query's 12 key rotations help a keyed-chroma run?

Embeds every recording of a manifest with the run's keyed-chroma windows in the canonical
rotation and in all 12 rotations, and scores the manifest (query = reference list) twice: the
canonical distance, and the minimum over the query's rotations (symmetrised). Not in the kit:
a measurement for deciding whether to build it into the retrieval protocol.

    python bench/rotation_search.py RUN_DIR MANIFEST [--checkpoint best]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from chlib.core.manifest import read_manifest
from chlib.data.features import feature_path, load_feature, prepare_window
from chlib.model.checkpoint import load_model
from chlib.retrieval import metrics
from chlib.retrieval.embed import window_starts
from chlib.retrieval.protocol import track_vectors
from chlib.retrieval.scoring import score_inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run_dir")
    ap.add_argument("manifest")
    ap.add_argument("--checkpoint", default="best")
    args = ap.parse_args()
    model, hp, epoch = load_model(args.run_dir, args.checkpoint, "cpu")
    recs = read_manifest(args.manifest, required=("perf", "work", "feat"))
    window, mean_size = hp.chunk_len[0], hp.mean_size

    def windows(rec: dict) -> np.ndarray:  # [n_windows, frames, 12]
        feat = np.asarray(load_feature(feature_path(rec, args.manifest)))
        return np.stack([prepare_window(feat, s, window, mean_size, transform=hp.input_transform)
                         for s in window_starts(len(feat), window)])

    @torch.no_grad()
    def embed(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    wins = [windows(r) for r in recs]
    canon = track_vectors([embed(w) for w in wins])  # [N, D]
    rotated = np.stack([track_vectors([embed(np.roll(w, k, axis=2)) for w in wins])
                        for k in range(12)])  # [12, N, D]
    by_rotation = (1 - np.einsum("knd,md->knm", rotated, canon)).min(axis=0)
    inputs = score_inputs(recs, recs, [c[None] for c in canon], [c[None] for c in canon],
                          rule="mean")
    for name, dist in (("canonical", 1 - canon @ canon.T),
                       ("min over 12 query rotations", np.minimum(by_rotation, by_rotation.T))):
        m = metrics.retrieval_metrics(dist.astype(np.float32), inputs.q_labels, inputs.r_labels,
                                      exclude=inputs.exclude)
        print(f"epoch {epoch}, {name}: mAP {m['mAP']:.3f}, HR1 {m['HR1']:.3f}")


if __name__ == "__main__":
    main()

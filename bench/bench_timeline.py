"""Speed of segment identification (issue 12): one 10-minute query, end to end (decode, CQT,
18 s windows every 2 s through the model, scores against every reference window, the Viterbi
decoding, the segments' searches), against indexes of 10k and 100k reference recordings.

The model is a trained run's (default the demo's, ``make demo``); the 10-minute query is the
run's dataset's test recordings joined end to end; the index holds the run's references plus
synthetic recordings (unit vectors, 2 windows each) up to the size asked. The best-match null
(400 searches, once per index) is timed apart: a service computes it once.

    python bench/bench_timeline.py --run runs/demo --dataset datasets/demo --sizes 10000 100000

Prints seconds per stage and the ratio to the 10 s target (> 1: faster than the target).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from chlib.data.splits import read_split
from chlib.retrieval import evaluate
from chlib.retrieval import identify as ident
from chlib.retrieval.segment import identify_segments
from chlib.retrieval.timeline import best_match_null
from chlib.signal.audio import load_audio

TARGET_S = 10.0


def ten_minute_query(dataset: str, sample_rate: int, out: Path, seconds: float = 600.0) -> Path:
    """The dataset's test recordings joined until ``seconds`` long, as one WAV."""
    parts, total = [], 0.0
    recs = [r for r in read_split(dataset, "test") if r.get("wav")]
    while total < seconds:
        for r in recs:
            y = load_audio(r["wav"], sample_rate=sample_rate)
            parts.append(y)
            total += len(y) / sample_rate
            if total >= seconds:
                break
    y = np.concatenate(parts)[: int(seconds * sample_rate)]
    sf.write(out, y, sample_rate)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--dataset", default="datasets/demo")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, hp, _, _ = evaluate.load_checkpoint(args.run, "best", "cpu")
    refs = ident.reference_records(args.dataset, "")
    base, _ = ident.reference_index_for_run(args.run, model, hp, refs, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        query = ten_minute_query(args.dataset, hp.features.sample_rate, Path(tmp) / "q.wav")
        rng = np.random.default_rng(0)
        print(f"query: {sf.info(query).duration:.0f} s; torch threads {args.threads}")
        for size in args.sizes:
            index = ident.reference_index_for_run(args.run, model, hp, refs, device="cpu")[0]
            n_extra = max(0, size - len(base))
            fake = [{"perf": f"synthetic_{i}", "work": f"synthetic_work_{i // 4}"}
                    for i in range(n_extra)]
            index.add(fake, list(rng.normal(size=(n_extra, 2, index.dim)).astype(np.float32)))
            t0 = time.perf_counter()
            null = best_match_null(index)
            null_s = time.perf_counter() - t0
            identify_segments([query], model=model, hp=hp, index=index, device="cpu",
                              best_null=null)  # warm-up (allocations, thread pools)
            t0 = time.perf_counter()
            rep = identify_segments([query], model=model, hp=hp, index=index, device="cpu",
                                    best_null=null)
            total = time.perf_counter() - t0
            t = rep.timings
            print(f"{len(index):>7} refs ({len(index.windows)} windows): total {total:.2f} s "
                  f"(decode+CQT {t['features_s']:.2f}, windows+scores+Viterbi+searches+"
                  f"boundaries {t['timeline_s']:.2f}); index null once {null_s:.2f} s; "
                  f"ratio to the {TARGET_S:.0f} s target {TARGET_S / total:.2f}; "
                  f"{len(rep.timelines[str(query)].segments)} segments")


if __name__ == "__main__":
    main()

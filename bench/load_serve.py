"""Load test of the identification service (issue 13): concurrent clients and live edits.

Starts ``chlib.serve.app.serve`` for a trained run in a subprocess (uvicorn on a free loopback
port, a random editing token), then for ``--seconds`` runs ``--clients`` threads that POST the
dataset's held-out test recordings to ``/identify`` (timeline included) while one more thread,
every ``--edit-every`` seconds, adds a test recording as a reference (``POST /references``) or
removes one it added earlier. At the end it removes what it still holds and prints requests,
errors, p50/p95 latency and whether the index holds exactly the expected recordings (no lost
updates: the start's perfs plus every acknowledged add minus every acknowledged removal).

Run: ``.venv/bin/python bench/load_serve.py`` (runs/demo with datasets/demo, 60 s, 4 clients;
``--seconds 30`` for a shorter run). The service keeps its own index in ``<run>/service/``.
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from chlib.data.splits import read_split


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: str, dataset: str, device: str, port: int, token: str) -> subprocess.Popen:
    code = ("import sys; from chlib.serve.app import serve; "
            "serve(sys.argv[1], port=int(sys.argv[3]), dataset_dir=sys.argv[2], device=sys.argv[4])")
    env = os.environ | {"CHLIB_SERVE_TOKEN": token}
    return subprocess.Popen([sys.executable, "-c", code, run, dataset, str(port), device],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_healthy(base: str, proc: subprocess.Popen, timeout_s: float = 600.0) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited (rc {proc.returncode}):\n{proc.stderr.read()}")
        try:
            return httpx.get(f"{base}/health", timeout=5).json()
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SystemExit(f"the server did not answer /health within {timeout_s:.0f} s")


def index_perfs(c: httpx.Client) -> set[str]:
    return {r["perf"] for w in c.get("/works").json()
            for r in c.get(f"/works/{w['work']}").json()["recordings"]}


def client_loop(base: str, files: list[Path], deadline: float, seed: int, out: list) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=base, timeout=300) as c:
        while time.monotonic() < deadline:
            f = rng.choice(files)
            t0 = time.perf_counter()
            try:
                r = c.post("/identify", files={"file": (f.name, f.read_bytes())})
                out.append((r.status_code, time.perf_counter() - t0))
            except httpx.HTTPError as e:
                out.append((type(e).__name__, time.perf_counter() - t0))


def editor_loop(base: str, token: str, recs: list[dict], deadline: float, every: float,
                expected: set[str], log: Counter) -> None:
    rng, added, k = random.Random(1), [], 0
    with httpx.Client(base_url=base, timeout=300,
                      headers={"Authorization": f"Bearer {token}"}) as c:
        while time.monotonic() < deadline:
            time.sleep(every)
            if added and (len(added) >= 3 or rng.random() < 0.4):
                perf = added.pop(rng.randrange(len(added)))
                r = c.delete(f"/references/{perf}")
                if r.status_code == 200:
                    expected.discard(perf)
                log[f"remove {r.status_code}"] += 1
            else:
                rec, k = rng.choice(recs), k + 1
                perf = f"bench-{os.getpid()}-{k}"
                r = c.post("/references", files={"file": (Path(rec["wav"]).name,
                                                          Path(rec["wav"]).read_bytes())},
                           data={"work": rec["work"], "perf": perf})
                if r.status_code == 200:
                    expected.add(perf)
                    added.append(perf)
                log[f"add {r.status_code}"] += 1
        for perf in added:  # leave the index as it was
            if c.delete(f"/references/{perf}").status_code == 200:
                expected.discard(perf)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--dataset", default="datasets/demo")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--edit-every", type=float, default=4.0, help="seconds between edits")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    recs = [r for r in read_split(a.dataset, "test") if r.get("wav") and Path(r["wav"]).is_file()]
    if not recs:
        raise SystemExit(f"{a.dataset}: no test recordings with audio to send")
    files = sorted({Path(r["wav"]) for r in recs})
    token, port = secrets.token_urlsafe(16), free_port()
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    proc = start_server(a.run, a.dataset, a.device, port, token)
    try:
        health = wait_healthy(base, proc)
        print(f"service up in {time.monotonic() - t0:.1f} s: {health}")
        with httpx.Client(base_url=base, timeout=60) as c:
            expected = index_perfs(c)
        deadline = time.monotonic() + a.seconds
        results: list = []
        edits: Counter = Counter()
        threads = [threading.Thread(target=client_loop, args=(base, files, deadline, i, results))
                   for i in range(a.clients)]
        threads.append(threading.Thread(target=editor_loop, args=(
            base, token, recs, deadline, a.edit_every, expected, edits)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with httpx.Client(base_url=base, timeout=60) as c:
            final = index_perfs(c)
            n_refs = c.get("/health").json()["n_references"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    lat = sorted(s for code, s in results if code == 200)
    codes = Counter(code for code, _ in results)
    q = statistics.quantiles(lat, n=20) if len(lat) >= 2 else [float("nan")] * 19
    print(f"{a.clients} clients, {a.seconds:.0f} s, {len(files)} query files")
    print(f"requests: {len(results)}  ok: {codes.get(200, 0)}  errors: "
          f"{sum(n for c, n in codes.items() if c != 200)} {dict(codes)}")
    print(f"latency: p50 {statistics.median(lat) if lat else float('nan'):.2f} s  "
          f"p95 {q[18]:.2f} s  ({len(lat) / a.seconds:.2f} requests/s)")
    print(f"edits: {dict(edits)}")
    ok = final == expected and n_refs == len(expected)
    print(f"index at the end: {len(final)} perfs, expected {len(expected)}: "
          f"{'equal (no lost updates)' if ok else 'DIFFERENT'}"
          + ("" if ok else f"; missing {sorted(expected - final)[:5]}, extra "
             f"{sorted(final - expected)[:5]}"))
    sys.exit(0 if ok and codes.get(200, 0) == len(results) else 1)


if __name__ == "__main__":
    main()

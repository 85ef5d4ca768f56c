"""One worker pool for batch jobs (feature extraction, demo rendering): spawn-started processes,
one job per worker at a time, so a worker that dies or hangs is charged to its own job only."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

from chlib.core.errors import ChlibError

__all__ = ["JobFailure", "WorkerStartError", "run_jobs"]


class WorkerStartError(ChlibError, RuntimeError):
    """Worker processes die before they can take a job (e.g. an unguarded script under spawn)."""


@dataclass(frozen=True)
class JobFailure:
    kind: str  # "error" (fn raised; message "Type: text"), "crash" (worker died) or "timeout"
    message: str


def _call(fn: Callable, args: tuple) -> Any:
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - a batch job reports and goes on
        return JobFailure("error", f"{type(e).__name__}: {e}")


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(0)  # the main process died (kill -9, killed kernel): do not linger


_RAW_PIPE = sys.platform != "win32"  # a socket pair: its fd is read straight into the array


def _send(conn, obj: Any) -> None:
    """Pickle protocol 5, large buffers (a decoded signal) out of band: no copy into the message."""
    buffers: list[pickle.PickleBuffer] = []
    head = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    conn.send((head, [r.nbytes for r in raws]))
    for r in raws:
        if not _RAW_PIPE:
            conn.send_bytes(r)
            continue
        while r:
            r = r[os.write(conn.fileno(), r):]


def _recv(conn) -> Any:
    """What :func:`_send` sent; each out-of-band buffer is read in 1 MB pieces into its array."""
    head, sizes = conn.recv()
    buffers = [bytearray(n) for n in sizes]
    for b in buffers:
        if not _RAW_PIPE:  # Windows: one more copy of each buffer
            conn.recv_bytes_into(b)
            continue
        view = memoryview(b)
        while view:
            if not (piece := os.read(conn.fileno(), min(len(view), 1 << 20))):
                raise EOFError("worker closed its pipe mid-result")
            view[:len(piece)] = piece
            view = view[len(piece):]
    return pickle.loads(head, buffers=buffers)


def _worker(conn, fn: Callable, parent_pid: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)  # the workers already run in parallel
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    _send(conn, "ready")
    while (msg := conn.recv()) is not None:
        _send(conn, (msg[0], _call(fn, msg[1])))


def run_jobs(fn: Callable, jobs: Sequence[tuple], *, num_workers: int,
             timeout_s: float | None = None) -> Iterator[tuple[int, Any]]:
    """Yield ``(job index, fn(*job) or JobFailure)`` for every job, in completion order.

    ``fn``: module-level (picklable); ``num_workers <= 0``: run here, no timeout. A worker that
    dies or runs past ``timeout_s`` is replaced; only its job fails. A feeding thread keeps the
    workers up to ``2 x num_workers`` results ahead of the caller."""
    if num_workers <= 0:
        yield from ((i, _call(fn, args)) for i, args in enumerate(jobs))
        return
    results: queue.Queue = queue.Queue(maxsize=2 * num_workers)
    stop = threading.Event()
    thread = threading.Thread(target=_feed, args=(fn, jobs, num_workers, timeout_s, stop,
                                                  results.put), daemon=True, name="chlib-run-jobs")
    thread.start()
    try:
        while (item := results.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock the feeder, which then kills the workers
            with contextlib.suppress(queue.Empty):
                results.get(timeout=0.1)


def _feed(fn: Callable, jobs: Sequence[tuple], num_workers: int, timeout_s: float | None,
          stop: threading.Event, put: Callable[[Any], None]) -> None:
    """Run ``jobs`` on worker processes: ``put`` each ``(index, result)``, an error, then None."""
    ctx, todo, slots = mp.get_context("spawn"), deque(enumerate(jobs)), {}

    def start() -> None:  # slot: [process, ready, job index or None, start time]
        here, there = ctx.Pipe()
        slots[here] = [ctx.Process(target=_worker, args=(there, fn, os.getpid()), daemon=True),
                       False, None, 0.0]
        slots[here][0].start()

    try:
        for _ in range(min(num_workers, len(todo))):
            start()
        while (todo or any(s[2] is not None for s in slots.values())) and not stop.is_set():
            wait([*slots, *(s[0].sentinel for s in slots.values())], timeout=0.5)
            for conn, (proc, ready, job, t0) in list(slots.items()):
                msg, late = None, timeout_s is not None and time.monotonic() - t0 > timeout_s
                with contextlib.suppress(EOFError, OSError):
                    msg = _recv(conn) if conn.poll() else None
                if msg is not None:  # ready or done: hand the worker its next job
                    if msg != "ready":
                        put(msg)
                    nxt = todo.popleft() if todo else None
                    slots[conn][1:] = [True, nxt and nxt[0], time.monotonic()]
                    if nxt:
                        conn.send(nxt)
                elif not proc.is_alive() or (late and job is not None):
                    if not ready:
                        raise WorkerStartError("worker processes die before doing any work; in "
                                               "a script, call this under `if __name__ == "
                                               "'__main__':` (spawn re-imports the script)")
                    kind = "timeout" if proc.is_alive() else "crash"
                    proc.kill()
                    proc.join()
                    del slots[conn]
                    if todo:  # a replacement worker
                        start()
                    if job is not None:
                        put((job, JobFailure(kind, f"worker process {kind}")))
    except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
        put(e)
    finally:
        for proc, *_ in slots.values():
            proc.kill()
            proc.join(timeout=5)
    put(None)

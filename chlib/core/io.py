"""Atomic file writes (a temporary file beside the target, renamed over it, so a killed job
never leaves a half-written file), content hashes, JSON helpers (NaN and inf written as null, so
every file is valid JSON), the one safe ``.npy`` loader and a lock per folder (one job at a time)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from chlib.core.errors import FeatureError, FolderLockedError, ManifestError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_text", "atomic_save_npy",
           "atomic_torch_save", "json_safe", "json_text", "write_json", "read_json",
           "append_jsonl", "read_jsonl", "load_npy", "folder_lock", "LOCK_NAME", "file_sha256",
           "stable_hash"]

#: The lock file :func:`folder_lock` keeps inside a folder while a job works there.
LOCK_NAME = ".chlib.lock"


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path``, renamed over it on success, removed on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save ``array`` as ``.npy`` atomically (no pickle)."""
    with atomic_open(path) as f:
        np.save(f, np.asarray(array), allow_pickle=False)


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` to ``path`` atomically."""
    import torch

    with atomic_open(path) as f:
        torch.save(obj, f)


def json_safe(obj: Any) -> Any:
    """``obj`` with NumPy values made plain and NaN / inf floats replaced by None (JSON null)."""
    if isinstance(obj, (np.generic, np.ndarray)):
        obj = obj.tolist()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def json_text(obj: Any, indent: int | None = None, default: Any = None) -> str:
    """The one JSON encoder of the files chlib writes: UTF-8 text, non-ASCII kept, NaN and inf
    as null (:func:`json_safe`; ``allow_nan=False`` guards the rest)."""
    return json.dumps(json_safe(obj), ensure_ascii=False, indent=indent, allow_nan=False,
                      default=default)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON atomically (:func:`json_text`)."""
    atomic_write_text(path, json_text(obj, indent) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file (a UTF-8 byte-order mark is allowed)."""
    return json.loads(Path(path).read_text(encoding="utf-8-sig"))


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON record as a line (metrics.jsonl). A last line without its newline is
    ended first; one that is no JSON (torn by a power cut) is cut off, so the log stays
    readable."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        end = f.seek(0, os.SEEK_END)
        lead, last = b"", b"\n"
        if end:  # the usual case reads one byte: the last line's newline
            f.seek(end - 1)
            last = f.read(1)
        if last != b"\n":
            f.seek(max(0, end - (1 << 20)))
            tail = f.read()
            cut = tail.rfind(b"\n") + 1  # start of the unfinished last line (in the tail)
            try:
                json.loads(tail[cut:])
                lead = b"\n"
            except ValueError:  # torn: keep everything before it
                f.truncate(end - len(tail) + cut)
        f.write(lead + (json_text(record) + "\n").encode("utf-8"))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines log ([] if missing); a torn last line from a killed writer is skipped,
    a bad line elsewhere raises a ManifestError naming the file and line."""
    text = Path(path).read_text(encoding="utf-8-sig") if Path(path).exists() else ""
    lines = [(i, line) for i, line in enumerate(text.split("\n"), start=1) if line.strip()]
    out = []
    for k, (lineno, line) in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if k < len(lines) - 1:
                raise ManifestError(f"{path} line {lineno}: not a JSON record ({e.msg} at column "
                                    f"{e.colno}); repair or delete that line") from None
    return out


def load_npy(path: str | os.PathLike, *, mmap_mode: str | None = None) -> np.ndarray:
    """A plain ``.npy`` array (memory-mapped with ``mmap_mode="r"``), never a pickle:
    FileNotFoundError when missing, FeatureError naming the file for anything unreadable."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError) as e:
        text = str(e)  # numpy's advice for pickles is to load them unsafely: not passed on
        why = ("not a plain numeric array: pickled Python objects or a damaged header; chlib "
               "loads no pickles" if "pickle" in text or "object" in text.lower() else text)
        raise FeatureError(f"{path}: not a readable .npy array ({why}); re-extract it (delete "
                           "the file and run the step that wrote it again)") from None


def _try_lock(f: Any) -> bool:
    """Take the OS lock of open file ``f`` without blocking (released when the process dies)."""
    try:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # lock a byte far past the holder's note, which stays readable
            f.seek(1 << 30)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str,
                wait: bool | float = False) -> Iterator[Path]:
    """Hold ``folder/.chlib.lock`` while this job writes in ``folder`` (one job per folder).

    The file holds the holder's pid, host, start time and ``what``; the lock is the OS's
    (``flock``), so a crashed holder leaves no lock behind. If another process holds it:
    ``wait=False`` raises :class:`FolderLockedError` naming the holder at once, ``True`` waits
    for it, a number waits at most that many seconds. Yields the lock file's path."""
    path = Path(folder) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = None if wait is True else time.monotonic() + (0.0 if wait is False else wait)
    while True:
        f = open(path, "a+", encoding="utf-8")
        if _try_lock(f):
            with contextlib.suppress(OSError):  # removed by a holder that just left: retry
                if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino or fcntl is None:
                    break
        else:
            f.seek(0)
            note = f.read(4096)
            if deadline is not None and time.monotonic() >= deadline:
                f.close()
                raise FolderLockedError(_held_message(path, note))
        f.close()
        time.sleep(0.2)
    try:
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                            "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        f.flush()
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # before the lock goes, so a waiter's retry sees a fresh file
        f.close()


def _held_message(path: Path, note: str) -> str:
    try:
        h = json.loads(note)
        who = (f"{h['what']} (process {h['pid']} on {h['host']}, started {h['started']})")
    except (ValueError, TypeError, KeyError):
        who = "another job (just starting)"
    return (f"{path.parent} is in use by {who}; lock file {path}. Wait for that job to finish "
            "(or pass wait=True to wait for it), or stop it; a job that crashed holds no lock.")


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def stable_hash(obj: Any, n_chars: int = 16) -> str:
    """Short hex digest of a JSON-serialisable object (sorted keys): a cache key."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n_chars]

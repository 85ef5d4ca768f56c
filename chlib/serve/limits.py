"""What the service accepts from a client, and decoding it safely.

:class:`~chlib.serve.Limits` bounds an upload (size, duration, decoding time; re-exported
here with :class:`~chlib.serve.ServeError` and :func:`~chlib.serve.sniff_audio`).
:func:`receive_upload` streams
a ``multipart/form-data`` body straight into a temporary file inside the service folder,
stopping as soon as the file part passes the size limit (413), and sniffs the audio type from
the first bytes, never from the name (415). :class:`DecodePool` decodes and computes the CQT in
spawn-started worker processes; one that runs past the timeout is killed and replaced (504), so
a hostile file can neither hang nor crash the server. Every refusal is a :class:`ServeError`
carrying its HTTP status and a sentence naming the problem and what to do."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import tempfile
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from chlib.core.errors import ChlibError, ConfigError
from chlib.retrieval.identify import query_features
from chlib.serve import AUDIO_TYPES, MB, Limits, ServeError, sniff_audio
from chlib.signal.audio import audio_info

FIELD_BYTES = 4096  # a text field (work, perf) longer than this is refused

__all__ = ["Limits", "ServeError", "AUDIO_TYPES", "sniff_audio", "Upload", "receive_upload",
           "decode_features", "DecodePool"]


@dataclass
class Upload:
    """An uploaded file written to ``path`` (delete it when done), with the form's text fields."""

    path: Path
    filename: str
    size: int
    kind: str
    fields: dict[str, str] = field(default_factory=dict)

    def delete(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


class _FormSink:
    """python-multipart callbacks: the ``file`` part to a temporary file, other parts to text."""

    def __init__(self, tmp_dir: Path, max_bytes: int) -> None:
        self.tmp_dir, self.max_bytes, self.fields = tmp_dir, max_bytes, {}
        self.file: Any = None
        self.path: Path | None = None
        self.filename, self.size, self.head = "", 0, b""
        self._h, self._name, self._buf = [b"", b"", {}], None, bytearray()

    def callbacks(self) -> dict:
        return {"on_part_begin": self._h[2].clear, "on_header_field": self._hfield,
                "on_header_value": self._hvalue, "on_header_end": self._hend,
                "on_headers_finished": self._headers_done, "on_part_data": self._data,
                "on_part_end": self._end}

    def _hfield(self, data: bytes, start: int, end: int) -> None:
        self._h[0] += data[start:end]

    def _hvalue(self, data: bytes, start: int, end: int) -> None:
        self._h[1] += data[start:end]

    def _hend(self) -> None:
        self._h[2][self._h[0].lower()] = self._h[1]
        self._h[:2] = [b"", b""]

    def _headers_done(self) -> None:
        _, opts = parse_options_header(self._h[2].get(b"content-disposition", b""))
        self._name, self._buf = opts.get(b"name", b"").decode("utf-8", "replace"), bytearray()
        if self._name == "file":
            if self.file is not None:
                raise ServeError(422, "the form has more than one 'file' field; send one file")
            self.filename = Path(opts.get(b"filename", b"upload").decode("utf-8", "replace")).name
            fd, tmp = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=self.tmp_dir)
            self.file, self.path = os.fdopen(fd, "wb"), Path(tmp)

    def _data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._name != "file":
            self._buf += chunk
            if len(self._buf) > FIELD_BYTES:
                raise ServeError(422, f"form field {self._name!r} is longer than {FIELD_BYTES} "
                                      "bytes; send a short text value")
            return
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise ServeError(413, f"the file is larger than the limit of {self.max_bytes / MB:g} MB;"
                                  " send a shorter excerpt or a compressed copy (e.g. MP3 or FLAC)")
        self.head += chunk[:max(0, 12 - len(self.head))]
        self.file.write(chunk)

    def _end(self) -> None:
        if self._name and self._name != "file":
            self.fields[self._name] = self._buf.decode("utf-8", "replace")


async def receive_upload(headers: Mapping[str, str], stream: AsyncIterator[bytes],
                         tmp_dir: str | os.PathLike, limits: Limits) -> Upload:
    """Stream a ``multipart/form-data`` body (``file`` part plus short text fields) into a
    temporary file in ``tmp_dir``; ServeError 422 (not a form / no file), 413 (over
    ``limits.max_bytes``, checked as it arrives), 400 (empty), 415 (not a known audio type)."""
    ctype, opts = parse_options_header(headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not opts.get(b"boundary"):
        raise ServeError(422, "send the audio as multipart/form-data with a 'file' field "
                              "(e.g. curl -F file=@recording.mp3 ...)")
    with contextlib.suppress(ValueError):  # an honest Content-Length: refuse before reading
        if int(headers.get("content-length", "0")) > limits.max_bytes + 64 * FIELD_BYTES:
            raise ServeError(413, f"the upload is larger than the limit of "
                                  f"{limits.max_upload_mb:g} MB; send a shorter excerpt or a "
                                  "compressed copy (e.g. MP3 or FLAC)")
    Path(tmp_dir).mkdir(parents=True, exist_ok=True)
    sink = _FormSink(Path(tmp_dir), limits.max_bytes)
    parser = MultipartParser(opts[b"boundary"], sink.callbacks())
    try:
        try:
            async for chunk in stream:
                parser.write(chunk)
            parser.finalize()
        except FormParserError as e:
            raise ServeError(422, f"the multipart form could not be parsed ({e}); send it as "
                                  "a browser or curl -F does") from None
        finally:
            if sink.file is not None:
                sink.file.close()
        if sink.path is None:
            raise ServeError(422, "the form has no 'file' field; attach the audio as 'file'")
        if sink.size == 0:
            raise ServeError(400, f"{sink.filename}: the file is empty (0 bytes); choose the "
                                  "recording again (an interrupted copy or download is empty)")
        if (kind := sniff_audio(sink.head)) is None:
            raise ServeError(415, f"{sink.filename}: not an audio file this service reads (its "
                                  "first bytes are not WAV, FLAC, OGG, MP3, AIFF or M4A, "
                                  "whatever its name says); convert it, e.g. ffmpeg -i in out.flac")
    except BaseException:
        if sink.path is not None:
            with contextlib.suppress(OSError):
                sink.path.unlink()
        raise
    return Upload(sink.path, sink.filename, sink.size, kind, sink.fields)


def decode_features(path: str, features: Any, max_duration_s: float) -> tuple:
    """Run in a worker: ``("ok", CQT [frames, bins] float32 dB, duration_s)``, ``("too_long",
    duration_s)`` (from the header before decoding, or after), or ``("error", message)``."""
    try:
        dur = audio_info(path)[0]
        if dur > max_duration_s:
            return "too_long", dur
        feat = query_features(path, SimpleNamespace(features=features), "cpu")
        dur = len(feat) / features.frames_per_second
        return ("too_long", dur) if dur > max_duration_s else ("ok", feat, dur)
    except ChlibError as e:
        return "error", str(e).replace(path, "the file")
    except Exception as e:  # noqa: BLE001 - decoders raise anything; the worker must live on
        return "error", f"the decoder failed ({type(e).__name__}: {e})".replace(path, "the file")


def _worker_main(conn: Any) -> None:
    torch.set_num_threads(1)  # one core per decode: the model keeps the rest
    with contextlib.suppress(EOFError, OSError):  # EOF: the server went away
        while True:
            conn.send(decode_features(*conn.recv()))


class DecodePool:
    """``n_workers`` spawn-started decoding processes (started at once, so the first request
    does not wait for their imports); :meth:`decode` hands a file to a free one. Not a
    ProcessPoolExecutor: one hung decode must be killed without breaking the others."""

    def __init__(self, n_workers: int = 2) -> None:
        if n_workers < 1:
            raise ConfigError(f"decode_workers must be >= 1, got {n_workers}")
        self._ctx, self._free, self._lock = mp.get_context("spawn"), queue.Queue(), threading.Lock()
        self._workers: list[tuple] = []  # (process, connection)
        for _ in range(n_workers):
            self._free.put(self._start())

    def _start(self) -> tuple:
        conn, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child,), daemon=True,
                                 name="chlib-serve-decode")
        proc.start()
        child.close()
        with self._lock:
            self._workers.append((proc, conn))
        return proc, conn

    def _kill(self, w: tuple) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._workers.remove(w)
        w[0].kill()
        w[0].join(timeout=5)
        w[1].close()

    def decode(self, path: str | os.PathLike, features: Any, limits: Limits
               ) -> tuple[np.ndarray, float]:
        """``(CQT [frames, bins], duration_s)`` of an audio file; ServeError 413 (too long),
        422 (cannot be decoded, silent, too short, decoder crashed) or 504 (timeout)."""
        w = self._free.get()
        if not w[0].is_alive():  # died while idle (killed from outside): use a fresh one
            self._kill(w)
            w = self._start()
        try:
            w[1].send((str(path), features, limits.max_duration_s))
            if not w[1].poll(limits.decode_timeout_s):
                raise TimeoutError
            out = w[1].recv()
        except (TimeoutError, EOFError, OSError) as e:
            self._kill(w)
            self._free.put(self._start())
            if isinstance(e, TimeoutError):
                raise ServeError(504, f"decoding took longer than {limits.decode_timeout_s:g} s;"
                                      " send a shorter excerpt or convert it to WAV or FLAC"
                                 ) from None
            raise ServeError(422, "the decoder crashed on this file; convert it to WAV or FLAC "
                                  "(e.g. ffmpeg -i in out.flac) and send it again") from None
        self._free.put(w)
        if out[0] == "too_long":
            raise ServeError(413, f"the recording lasts {out[1]:.0f} s, over the limit of "
                                  f"{limits.max_duration_s:g} s; send an excerpt")
        if out[0] == "error":
            raise ServeError(422, f"the audio cannot be used: {out[1]}")
        return out[1], out[2]

    def close(self) -> None:
        """Stop every worker (the pool cannot be used afterwards)."""
        with self._lock:
            workers = list(self._workers)
        for w in workers:
            self._kill(w)

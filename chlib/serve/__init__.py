"""The identification web service: :func:`chlib.serve.app.create_app` (FastAPI) and
:func:`chlib.serve.app.serve` (uvicorn, 127.0.0.1 by default); streaming uploads and the decoder
processes in :mod:`chlib.serve.limits`, the service's own reference index in
:mod:`chlib.serve.library`, the web page in ``static/``.

Here: what every part shares, :class:`Limits`, :class:`ServeError` and the audio sniffer. The
app is not imported here on purpose: the decoder processes import ``chlib.serve.limits`` when
they start, and should not pay for FastAPI and matplotlib."""

from __future__ import annotations

import math
from dataclasses import dataclass

from chlib.core.errors import ChlibError, ConfigError

__all__ = ["MB", "AUDIO_TYPES", "ServeError", "Limits", "sniff_audio"]

MB = 1_000_000  # max_upload_mb counts SI megabytes (10^6 bytes), as browsers show file sizes
#: kind -> (Content-Type, file suffix) of each audio type the sniffer knows
AUDIO_TYPES = {"wav": ("audio/wav", ".wav"), "flac": ("audio/flac", ".flac"),
               "ogg": ("audio/ogg", ".ogg"), "mp3": ("audio/mpeg", ".mp3"),
               "aiff": ("audio/aiff", ".aiff"), "m4a": ("audio/mp4", ".m4a")}


class ServeError(ChlibError):
    """A request the service refuses: ``status`` (HTTP code) and a plain-sentence message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = int(status)


@dataclass(frozen=True)
class Limits:
    """Bounds on one upload: size (SI MB), decoded duration (s) and decoding time (s)."""

    max_upload_mb: float = 200.0  # ~3 h of 128 kbit/s MP3, ~20 min of CD-quality WAV
    max_duration_s: float = 7200.0  # 2 h: a whole concert or session
    decode_timeout_s: float = 120.0  # decode + CQT of a 2-hour file takes well under this

    def __post_init__(self) -> None:
        for name in ("max_upload_mb", "max_duration_s", "decode_timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                    math.isfinite(v) and v > 0):
                raise ConfigError(f"Limits.{name} must be a finite number > 0, got {v!r}")

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * MB)


def sniff_audio(head: bytes) -> str | None:
    """The audio kind (a key of :data:`AUDIO_TYPES`) of a file from its first 12 bytes, or None:
    WAV ``RIFF....WAVE``, FLAC ``fLaC``, OGG ``OggS``, MP3 ``ID3`` or an MPEG audio frame sync
    (layer bits non-zero, so AAC ADTS is not taken for MP3), AIFF ``FORM....AIFF/AIFC``, M4A
    ``....ftyp``."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0
                              and head[1] & 0x06 != 0):
        return "mp3"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head[4:8] == b"ftyp":
        return "m4a"
    return None

"""A corpus of bad (and awkward-but-good) inputs, written into a folder on demand.

Tests import it as ``from bad_inputs import ...`` (pytest puts ``tests/`` on the path).

Each ``write_*`` function writes one file and returns its path. :func:`write_audio_corpus`
writes them all and says, for each, whether a loader must accept it (``good``) or reject it
(``bad``). 8 kHz stereo and 48 kHz 24-bit files are GOOD: they must be decoded, mixed to mono
and resampled, not refused. :data:`MALFORMED_MANIFEST_LINES` holds manifest lines that must be
reported, each with a word its error message must contain.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from helpers import tone, write_tone

__all__ = [
    "tone",
    "write_tone",
    "missing_file",
    "write_zero_byte",
    "write_corrupt_mp3",
    "write_text_as_wav",
    "write_silent",
    "write_too_short",
    "write_stereo_8k",
    "write_48k_24bit",
    "write_nan_float",
    "write_inf_float",
    "CorpusEntry",
    "write_audio_corpus",
    "MALFORMED_MANIFEST_LINES",
    "fake_decode_job",
]


def missing_file(folder: str | Path, name: str = "missing.wav") -> Path:
    """A path in ``folder`` where no file exists."""
    p = Path(folder) / name
    assert not p.exists()
    return p


def write_zero_byte(folder: str | Path, name: str = "empty.wav") -> Path:
    p = Path(folder) / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")
    return p


def write_corrupt_mp3(folder: str | Path, name: str = "corrupt.mp3", seed: int = 1) -> Path:
    """Random bytes with an .mp3 name (no valid frame header)."""
    p = Path(folder) / name
    p.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).integers(0, 256, 20000, dtype=np.uint8).tobytes()
    p.write_bytes(b"\x00\x00\x00\x00" + data)
    return p


def write_text_as_wav(folder: str | Path, name: str = "notes.wav") -> Path:
    """A text file with a .wav name."""
    p = Path(folder) / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("These are my field notes, not audio.\n" * 50, encoding="utf-8")
    return p


def write_silent(folder: str | Path, name: str = "silent.wav", seconds: float = 3.0) -> Path:
    p = Path(folder) / name
    p.parent.mkdir(parents=True, exist_ok=True)
    sf.write(p, np.zeros(int(seconds * 16000), dtype=np.float32), 16000, subtype="PCM_16")
    return p


def write_too_short(folder: str | Path, name: str = "short.wav", seconds: float = 0.2) -> Path:
    """Audio shorter than one CQT kernel (0.2 s by default)."""
    return write_tone(Path(folder) / name, seconds)


def write_stereo_8k(folder: str | Path, name: str = "stereo_8k.wav", seconds: float = 2.5) -> Path:
    """GOOD input: 8 kHz, 2 channels, 16-bit."""
    return write_tone(Path(folder) / name, seconds, sample_rate=8000, channels=2,
                      subtype="PCM_16", freqs=(200.0, 300.0))


def write_48k_24bit(folder: str | Path, name: str = "hires_48k.wav", seconds: float = 2.5) -> Path:
    """GOOD input: 48 kHz, mono, 24-bit PCM."""
    return write_tone(Path(folder) / name, seconds, sample_rate=48000, subtype="PCM_24",
                      freqs=(250.0, 500.0))


def _write_float_with(folder: str | Path, name: str, value: float, seconds: float) -> Path:
    p = Path(folder) / name
    p.parent.mkdir(parents=True, exist_ok=True)
    y = tone(seconds)
    y[len(y) // 3 : len(y) // 3 + 50] = value
    sf.write(p, y, 16000, subtype="FLOAT")
    return p


def write_nan_float(folder: str | Path, name: str = "nan.wav", seconds: float = 2.0) -> Path:
    """A 32-bit float WAV with NaN samples."""
    return _write_float_with(folder, name, np.nan, seconds)


def write_inf_float(folder: str | Path, name: str = "inf.wav", seconds: float = 2.0) -> Path:
    """A 32-bit float WAV with +inf samples."""
    return _write_float_with(folder, name, np.inf, seconds)


@dataclass(frozen=True)
class CorpusEntry:
    name: str  # short label, e.g. "zero_byte"
    path: Path
    good: bool  # True: must be accepted (decoded and resampled); False: must be rejected


def write_audio_corpus(folder: str | Path) -> list[CorpusEntry]:
    """Write every case into ``folder``; returns one entry per case (good and bad)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [
        CorpusEntry("missing", missing_file(folder), False),
        CorpusEntry("zero_byte", write_zero_byte(folder), False),
        CorpusEntry("corrupt_mp3", write_corrupt_mp3(folder), False),
        CorpusEntry("text_as_wav", write_text_as_wav(folder), False),
        CorpusEntry("silent", write_silent(folder), False),
        CorpusEntry("too_short", write_too_short(folder), False),
        CorpusEntry("nan_float", write_nan_float(folder), False),
        CorpusEntry("inf_float", write_inf_float(folder), False),
        CorpusEntry("stereo_8k", write_stereo_8k(folder), True),
        CorpusEntry("wav_48k_24bit", write_48k_24bit(folder), True),
    ]


#: (line, a word the reported problem must contain). Each line is bad on its own.
MALFORMED_MANIFEST_LINES: list[tuple[str, str]] = [
    ('{"perf": "a1", "wav": "a.wav", "work": "A"', "JSON"),  # unterminated object
    ('["perf", "a2"]', "object"),  # valid JSON, not an object -> treated as legacy, no ':'
    ('{"perf": "a3", "work": "A"}', "wav"),  # missing key
    ('{"perf": "a4", "wav": "a.wav", "work": "A", "dur_s": "long"}', "dur_s"),
    ('{"perf": "a5", "wav": "a.wav", "work": "A", "work_id": 1.5}', "work_id"),
    ('{"perf": "a6", "wav": "a.wav", "work": "A", "feat_len": -3}', "feat_len"),
    ('{"perf": "", "wav": "a.wav", "work": "A"}', "perf"),
    ("perf:a8\twav a.wav\twork:A", "':'"),  # legacy line with a field lacking ':'
    ('{"perf": "a9", "wav": "a.wav", "work": "A", "dur_s": NaN}', "dur_s"),
]


def fake_decode_job(wav: str, factor: float, sample_rate: int, backend: str, min_samples: int):
    """Stand-in for ``chlib.data.extract._decode_job`` that misbehaves on purpose (for pool tests).

    A file name containing ``hang`` writes its process id to ``<wav stem>.pid`` and sleeps for
    10 minutes, ``crash`` kills its worker process;
    anything else returns a 1 s tone without reading the file.
    """
    import os
    import time

    name = Path(wav).name
    if "hang" in name:
        Path(wav).with_suffix(".pid").write_text(str(os.getpid()))
        time.sleep(600)
    if "crash" in name:
        os._exit(3)
    return tone(1.0, sample_rate=sample_rate), 0.0

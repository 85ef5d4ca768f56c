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


# ----------------------------------------------------------- data-side hostile inputs (issue 10)


def write_bom_manifest(path: str | Path, records: list[dict]) -> Path:
    """A JSON-lines manifest saved with a UTF-8 byte-order mark (as Windows Notepad does)."""
    import json

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    p.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    return p


def make_unreadable_file(path: str | Path) -> Path:
    """``chmod 000`` an existing file (root can still read it: tests must simulate that case)."""
    p = Path(path)
    p.chmod(0)
    return p


def write_torn_jsonl(path: str | Path, records: list[dict], torn: str = '{"epoch": 3, "lo') -> Path:
    """A JSON-lines log whose last line was cut short by a power cut (no final newline)."""
    import json

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(r) + "\n" for r in records) + torn, encoding="utf-8")
    return p


def write_object_npy(path: str | Path) -> Path:
    """A ``.npy`` holding a pickled object array (numpy says: set allow_pickle=True)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    np.save(p, np.array([{"not": "features"}, None], dtype=object), allow_pickle=True)
    return p


def write_pickle_as_npy(path: str | Path) -> Path:
    """A plain pickle file with a ``.npy`` name (numpy says: load it unsafely with allow_pickle)."""
    import pickle

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(pickle.dumps({"not": "features"}))
    return p


#: Work names that must be read as the same work (NFC/NFD, trailing/leading space).
LOOKALIKE_WORK_PAIRS: list[tuple[str, str]] = [
    ("Caf\u00e9", "Cafe\u0301"),  # NFC vs NFD
    ("Song", "Song "),
    ("Blue", "\u00a0Blue"),  # no-break space in front
]
#: Work names that stay different works but are reported as near-duplicates.
NEAR_DUPLICATE_WORK_PAIRS: list[tuple[str, str]] = [("Yesterday", "yesterday"),
                                                    ("Big  Band", "big band")]
#: Work names with a control character (each must be refused when the manifest is read).
CONTROL_CHAR_WORK_NAMES: list[str] = ["Line\nbreak", "Tab\there", "Bell\x07", "CR\rname"]


# ------------------------------------------------------- training-side hostile inputs (issue 10)


def write_single_work_split(folder: str | Path, n_perfs: int = 4) -> Path:
    """A ``full.txt`` whose recordings all belong to ONE work (nothing to tell apart)."""
    from helpers import write_toy_dataset

    return write_toy_dataset(folder, n_works=1, n_perfs=n_perfs, frames=(30, 60))


def write_stale_checkpoint_temps(ckpt_dir: str | Path) -> list[Path]:
    """Partial checkpoint temp files that a killed ``atomic_torch_save`` leaves behind."""
    d = Path(ckpt_dir)
    d.mkdir(parents=True, exist_ok=True)
    out = [d / ".g_00000000.k2j3x9.tmp", d / ".do_00000001.a8f0q1.tmp", d / ".best.json.zz1.tmp"]
    for p in out:
        p.write_bytes(b"PK\x03\x04 half a checkpoint")
    return out


class PickledIntruder:
    """Not a tensor: an object a weights-only unpickler must refuse (its class is a global)."""

    def __reduce__(self):
        return (print, ("this ran at load time",))


def write_checkpoint_with_object(path: str | Path, state: dict | None = None) -> Path:
    """A ``g_`` file that pickles a callable beside the weights (a tampered checkpoint)."""
    import torch

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    gen = dict(state) if state is not None else {"w": torch.zeros(2)}
    torch.save({"generator": gen, "extra": PickledIntruder()}, p)
    return p


def write_metrics_with_bad_middle_line(path: str | Path) -> Path:
    """A ``metrics.jsonl`` whose 2nd of 3 lines is not JSON (hand-edited, not a torn tail)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text('{"kind": "epoch", "epoch": 0}\n{"kind": "epoch", "epo\n'
                 '{"kind": "epoch", "epoch": 1}\n', encoding="utf-8")
    return p


# ------------------------------------------------------------ long recordings (issue 10, memory)


def write_long_stereo_wav(folder: str | Path, name: str = "long_stereo.wav",
                          seconds: float = 120.0, sample_rate: int = 44100) -> Path:
    """A long 16-bit stereo WAV (two different tones over noise), written a second at a time:
    decoding it whole as float32 takes ``seconds * sample_rate * 8`` bytes."""
    p = Path(folder) / name
    p.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    with sf.SoundFile(p, "w", samplerate=sample_rate, channels=2, subtype="PCM_16") as f:
        for s in range(int(np.ceil(seconds))):
            n = int(min(1.0, seconds - s) * sample_rate)
            t = (s * sample_rate + np.arange(n)) / sample_rate
            left, right = 0.3 * np.sin(2 * np.pi * 330 * t), 0.2 * np.sin(2 * np.pi * 550 * t)
            f.write(np.stack([left, right], axis=1) + 0.01 * rng.standard_normal((n, 2)))
    return p


# ----------------------------------------------- retrieval / runner hostile inputs (issue 10)


def write_unreadable_query_folder(folder: str | Path) -> list[Path]:
    """A folder of audio-named files none of which decodes (corrupt mp3, text, zero bytes)."""
    return [write_corrupt_mp3(folder, "q_corrupt.mp3"), write_text_as_wav(folder, "q_text.wav"),
            write_zero_byte(folder, "q_empty.flac")]


def make_damaged_index_meta(index_dir: str | Path, how: str) -> Path:
    """Damage a saved index's ``meta.json``: ``how`` = "truncated" (cut mid-file), "no_rule" /
    "no_files" (a key deleted), "no_sha" (a file entry without its hash), "a_list" (not an
    object). Returns the meta.json path."""
    import json

    meta_path = Path(index_dir) / "meta.json"
    text = meta_path.read_text(encoding="utf-8")
    meta = json.loads(text)
    if how == "truncated":
        meta_path.write_text(text[: len(text) // 2], encoding="utf-8")
        return meta_path
    if how == "no_rule":
        del meta["rule"]
    elif how == "no_files":
        del meta["files"]
    elif how == "no_sha":
        del meta["files"]["embeddings.npy"]["sha256"]
    elif how == "a_list":
        meta = [meta]
    else:
        raise ValueError(how)
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    return meta_path


def make_index_file_entry_outside(index_dir: str | Path, entry: str) -> Path:
    """List ``entry`` (``../../etc/passwd``, an absolute path) among a saved index's files in
    its ``meta.json``, with a plausible hash, as an edited index could."""
    import json

    meta_path = Path(index_dir) / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["files"][entry] = {"sha256": "0" * 64}
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    return meta_path


def make_index_feat_outside(index_dir: str | Path, feat: str, row: int = 0) -> Path:
    """Point record ``row`` of a saved index's ``records.jsonl`` at ``feat`` and update its
    SHA-256 in ``meta.json`` (a careful edit: the hashes still match). Returns records.jsonl."""
    import hashlib
    import json

    folder = Path(index_dir)
    rec_path, meta_path = folder / "records.jsonl", folder / "meta.json"
    rows = [json.loads(line) for line in rec_path.read_text(encoding="utf-8").splitlines()]
    rows[row]["feat"] = feat
    rec_path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["files"]["records.jsonl"]["sha256"] = hashlib.sha256(rec_path.read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    return rec_path


def write_kernel_killing_notebook(path: str | Path, params_src: str = 'run_dir: str = "runs/x"'
                                  ) -> Path:
    """A notebook (parameters cell, a harmless cell, then a cell that kills its own kernel with
    SIGKILL, as the out-of-memory killer does, then one that must never run)."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(params_src)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("x = 1 + 1"),
                nbformat.v4.new_code_cell("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"),
                nbformat.v4.new_code_cell("print('never reached')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(p))
    return p


def make_pool_result_arrays(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A worker job's result (for chlib.core.parallel tests): a large float32 array of 0.5, a
    strided (non-contiguous) view and an empty array."""
    return np.full(n, 0.5, dtype=np.float32), np.arange(5)[::2], np.zeros(0, np.float32)

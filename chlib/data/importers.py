"""Turn folders of audio into a dataset.txt: covers80 as downloaded (``covers32k/<work>/
<recording>.mp3``, 80 works), or any ``<work>/<recording>.<ext>`` tree, e.g. tune families."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from chlib.core.config import PrepConfig
from chlib.core.errors import AudioError, ConfigError, ManifestError
from chlib.core.io import write_json
from chlib.core.manifest import write_manifest
from chlib.signal.audio import audio_info

__all__ = ["AUDIO_EXTENSIONS", "PREP_DEFAULTS", "ImportReport", "import_covers80",
           "import_folder_tree", "find_covers80_root", "default_prep_config"]

#: File name endings treated as audio (case-insensitive).
AUDIO_EXTENSIONS = (".wav", ".mp3", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".aif", ".aiff",
                    ".aifc", ".wv")
#: Data-prep settings (over the PrepConfig defaults) per kind of source, no tempo copies. demo
#: (40 works x 6 versions, +-25 % tempo): 4 works test-only, 2 val-only, one version of every
#: other work each in val and test. covers80 (~2 recordings a work): whole works held out.
#: folder: unseen-work val (for early stopping) and test, 10 % of seen recordings to test.
PREP_DEFAULTS: dict[str, dict] = {
    "demo": {"aug_speed_mode": [1.0], "val_data_split": 0.1, "val_unseen": 0.05,
             "test_data_split": 0.1, "test_data_unseen": 0.1},
    "covers80": {"aug_speed_mode": [1.0], "val_data_split": 0.0, "val_unseen": 0.1,
                 "test_data_split": 0.0, "test_data_unseen": 0.2},
    "folder": {"aug_speed_mode": [1.0], "val_data_split": 0.0, "val_unseen": 0.1,
               "test_data_split": 0.1, "test_data_unseen": 0.15},
}


def default_prep_config(kind: str, n_works: int | None = None) -> PrepConfig:
    """The default :class:`PrepConfig` of a source ``kind`` (:data:`PREP_DEFAULTS`); a folder
    tree of ``n_works`` < 10 holds no work out and gives a quarter of the recordings to test."""
    if kind not in PREP_DEFAULTS:
        raise ConfigError(f"default_prep_config: kind must be one of {sorted(PREP_DEFAULTS)}, "
                          f"got {kind!r}")
    d = dict(PREP_DEFAULTS[kind])
    if kind == "folder" and n_works is not None and n_works < 10:
        d.update(val_data_split=0.0, val_unseen=0.0, test_data_split=0.25, test_data_unseen=0.0)
    return PrepConfig.from_dict(d, where=f"{kind} prep defaults")


@dataclass
class ImportReport:
    """What an import wrote and what it skipped."""

    dataset_txt: Path
    n_records: int
    n_works: int
    skipped: list[dict] = field(default_factory=list)  # {"wav": path, "reason": str}

    def summary(self) -> str:
        s = f"{self.dataset_txt}: {self.n_records} recordings of {self.n_works} works"
        if self.skipped:
            s += f"; skipped {len(self.skipped)} file(s):"
            s += "".join(f"\n  {x['wav']}: {x['reason']}" for x in self.skipped[:20])
            if len(self.skipped) > 20:
                s += f"\n  ... and {len(self.skipped) - 20} more (see import_report.json)"
        return s

    __str__ = summary


def find_covers80_root(root: str | os.PathLike) -> Path:
    """The ``covers32k`` folder, given it or the folder that contains it."""
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"{root}: folder not found (expected covers32k/ or its parent)")
    if root.name != "covers32k" and (root / "covers32k").is_dir():
        return root / "covers32k"
    return root


def _wav_string(path: Path, relative_to: str | os.PathLike | None) -> str:
    if relative_to is not None:
        try:
            return os.path.relpath(path.resolve(), Path(relative_to).resolve())
        except ValueError:  # another drive on Windows
            pass
    return str(path.resolve())


def import_covers80(root: str | os.PathLike, out_dir: str | os.PathLike, *,
                    relative_to: str | os.PathLike | None = None,
                    return_report: bool = False) -> Path | ImportReport:
    """Write ``out_dir/dataset.txt`` for covers80's ``covers32k/<work>/<recording>.mp3`` tree.

    ``root``: ``covers32k`` or its parent. Perf ids are the original's ``cover80_<running
    index:08d>_<work index>_<version index>``; see :func:`import_folder_tree`."""
    return import_folder_tree(find_covers80_root(root), out_dir, "*/*", relative_to=relative_to,
                              perf_prefix="cover80", return_report=return_report)


def import_folder_tree(root: str | os.PathLike, out_dir: str | os.PathLike,
                       pattern: str = "*/*.*", *, relative_to: str | os.PathLike | None = None,
                       perf_prefix: str | None = None,
                       extensions: tuple[str, ...] = AUDIO_EXTENSIONS,
                       return_report: bool = False) -> Path | ImportReport:
    """Write ``out_dir/dataset.txt`` for a tree ``root/<work>/<recording>.<ext>``.

    ``pattern``: glob under ``root`` (the work is each file's parent folder); ``relative_to``:
    write ``wav`` paths relative to this folder (default absolute); ``perf_prefix``: default the
    root folder's name, made file-name safe; ``return_report``: return the
    :class:`ImportReport`, not the path. Works are numbered over sorted folder names, recordings
    over sorted file names: perf = ``<prefix>_<running index:08d>_<work index>_<version
    index>``, version = file name, dur_s from the header. Unreadable or non-audio files are
    skipped and listed in ``import_report.json``; their indices stay reserved."""
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"{root}: folder not found")
    prefix = re.sub(r"[^A-Za-z0-9]+", "_", perf_prefix if perf_prefix is not None
                    else root.resolve().name).strip("_") or "perf"
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    files = sorted((p for p in root.glob(pattern) if p.is_file() and not p.name.startswith(".")),
                   key=lambda p: (p.parent.name, p.name))
    audio = [p for p in files if p.suffix.lower() in exts]
    skipped = [{"wav": str(p), "reason": f"not an audio file ending {p.suffix!r}"}
               for p in files if p.suffix.lower() not in exts]
    if not audio:
        raise ManifestError(f"{root}: no audio files match {pattern!r} (endings {', '.join(exts)}"
                            "); expected one folder per work holding its recordings")
    work_index = {w: i for i, w in enumerate(sorted({p.parent.name for p in audio}))}
    first: dict[str, int] = {}  # work -> running index of its first file (a work's are adjacent)
    records = []
    for running, p in enumerate(audio):
        w = p.parent.name
        v = running - first.setdefault(w, running)
        try:
            dur_s, _sr, _ch = audio_info(p)
        except (AudioError, OSError, RuntimeError, ValueError) as e:  # keep going; report it
            skipped.append({"wav": str(p), "reason": str(e) or type(e).__name__})
            continue
        records.append({"perf": f"{prefix}_{running:08d}_{work_index[w]}_{v}",
                        "wav": _wav_string(p, relative_to), "dur_s": round(float(dur_s), 3),
                        "work": w, "version": p.name})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(out_dir / "dataset.txt", records)
    report = ImportReport(out_dir / "dataset.txt", len(records),
                          len({r["work"] for r in records}), skipped)
    write_json(out_dir / "import_report.json", {"root": str(root), "pattern": pattern,
               "n_records": report.n_records, "n_works": report.n_works, "skipped": skipped})
    return report if return_report else report.dataset_txt

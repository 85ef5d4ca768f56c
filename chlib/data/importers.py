"""Turn folders of audio into a dataset.txt: covers80 as downloaded, or any work/recording tree.

covers80 (Ellis 2007) unpacks to ``covers32k/<work>/<recording>.mp3``: one folder per work
(80 works, 164 recordings). :func:`import_covers80` reads that tree directly (no manual
flattening or conversion: chlib decodes mp3 itself) and writes ``dataset.txt`` with the
original's perf ids ``cover80_<8-digit running index>_<work index>_<version index>``.

:func:`import_folder_tree` does the same for any ``<work>/<recording>.<ext>`` collection, e.g. a
musicologist's own folders of tune families.

Unreadable files are skipped and listed in ``import_report.json`` beside ``dataset.txt``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from chlib.core.errors import AudioError, ManifestError
from chlib.core.io import write_json
from chlib.core.manifest import write_manifest

__all__ = [
    "AUDIO_EXTENSIONS",
    "ImportReport",
    "import_covers80",
    "import_folder_tree",
    "find_covers80_root",
]

#: File name endings treated as audio (case-insensitive).
AUDIO_EXTENSIONS = (".wav", ".mp3", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".aif", ".aiff",
                    ".aifc", ".wv")


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


def _default_audio_info(path: Path) -> tuple[float, int, int]:
    from chlib.signal.audio import audio_info

    return audio_info(path)


def _wav_string(path: Path, relative_to: str | os.PathLike | None) -> str:
    if relative_to is None:
        return str(path.resolve())
    try:
        return os.path.relpath(path.resolve(), Path(relative_to).resolve())
    except ValueError:  # another drive on Windows
        return str(path.resolve())


def _import_tree(
    root: Path,
    out_dir: Path,
    *,
    pattern: str,
    perf_prefix: str,
    relative_to: str | os.PathLike | None,
    extensions: tuple[str, ...],
    info: Callable[[Path], tuple[float, int, int]],
    version_from: Callable[[Path], str],
) -> ImportReport:
    files = sorted(
        (p for p in root.glob(pattern) if p.is_file() and not p.name.startswith(".")),
        key=lambda p: (p.parent.name, p.name),
    )
    skipped: list[dict] = []
    audio = []
    for p in files:
        if p.suffix.lower() in extensions:
            audio.append(p)
        else:
            skipped.append({"wav": str(p), "reason": f"not an audio file ending {p.suffix!r}"})
    if not audio:
        raise ManifestError(
            f"{root}: no audio files match {pattern!r} (endings {', '.join(extensions)}); "
            "expected one folder per work holding its recordings"
        )
    works = sorted({p.parent.name for p in audio})
    work_index = {w: i for i, w in enumerate(works)}
    version_counter: dict[str, int] = {}
    records = []
    for running, p in enumerate(audio):
        w = p.parent.name
        v = version_counter.get(w, 0)
        version_counter[w] = v + 1
        try:
            dur_s, _sr, _ch = info(p)
        except (AudioError, OSError, RuntimeError, ValueError) as e:  # keep going; report it
            skipped.append({"wav": str(p), "reason": str(e) or type(e).__name__})
            continue
        records.append({
            "perf": f"{perf_prefix}_{running:08d}_{work_index[w]}_{v}",
            "wav": _wav_string(p, relative_to),
            "dur_s": round(float(dur_s), 3),
            "work": w,
            "version": version_from(p),
        })
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset_txt = out_dir / "dataset.txt"
    write_manifest(dataset_txt, records)
    report = ImportReport(dataset_txt, len(records), len({r["work"] for r in records}), skipped)
    write_json(out_dir / "import_report.json", {
        "root": str(root), "pattern": pattern, "n_records": report.n_records,
        "n_works": report.n_works, "skipped": skipped,
    })
    return report


def import_covers80(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    relative_to: str | os.PathLike | None = None,
    return_report: bool = False,
) -> Path | ImportReport:
    """Write ``out_dir/dataset.txt`` for the covers80 tree ``covers32k/<work>/<recording>.mp3``.

    Parameters
    ----------
    root : the ``covers32k`` folder or the folder containing it.
    out_dir : the dataset folder to create (e.g. ``datasets/covers80``).
    relative_to : write ``wav`` paths relative to this folder (e.g. the project root, the
        original's convention); default: absolute paths.
    return_report : return the :class:`ImportReport` instead of the path.

    Works are numbered over sorted folder names, recordings over sorted file names within a
    work; perf = ``cover80_<running index:08d>_<work index>_<version index>``, work = the folder
    name, version = the file name, dur_s = the decoded duration in seconds. Unreadable files are
    skipped and listed in ``out_dir/import_report.json`` (their indices stay reserved, so the
    ids of the other files do not depend on which files could be read).

    Returns the path of ``dataset.txt``.
    """
    covers = find_covers80_root(root)
    report = _import_tree(
        covers, Path(out_dir), pattern="*/*", perf_prefix="cover80", relative_to=relative_to,
        extensions=AUDIO_EXTENSIONS, info=_default_audio_info, version_from=lambda p: p.name,
    )
    return report if return_report else report.dataset_txt


def _safe_prefix(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
    return s or "perf"


def import_folder_tree(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    pattern: str = "*/*.*",
    *,
    relative_to: str | os.PathLike | None = None,
    perf_prefix: str | None = None,
    extensions: tuple[str, ...] = AUDIO_EXTENSIONS,
    return_report: bool = False,
) -> Path | ImportReport:
    """Write ``out_dir/dataset.txt`` for a tree ``root/<work>/<recording>.<ext>``.

    Parameters
    ----------
    root : folder with one sub-folder per work.
    out_dir : dataset folder to create.
    pattern : glob (relative to ``root``) selecting the recordings; the work is the name of each
        file's parent folder, so deeper patterns (``"*/*/*.wav"``) group by the innermost folder.
    relative_to : write ``wav`` paths relative to this folder; default absolute.
    perf_prefix : prefix of the perf ids (default: the root folder's name, made file-name safe);
        ids are ``<prefix>_<running index:08d>_<work index>_<version index>``.
    extensions : file endings accepted as audio; other matched files are skipped and reported.
    return_report : return the :class:`ImportReport` instead of the path.

    Returns the path of ``dataset.txt``.
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"{root}: folder not found")
    prefix = _safe_prefix(perf_prefix if perf_prefix is not None else root.resolve().name)
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    report = _import_tree(
        root, Path(out_dir), pattern=pattern, perf_prefix=prefix, relative_to=relative_to,
        extensions=exts, info=_default_audio_info, version_from=lambda p: p.name,
    )
    return report if return_report else report.dataset_txt

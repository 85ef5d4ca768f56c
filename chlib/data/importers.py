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


#: Data-prep settings (merged over the PrepConfig defaults) of each kind of source.
PREP_DEFAULTS: dict[str, dict] = {
    # the synthetic demo: 40 works x 6 versions; its versions already span +-25 % of each work's
    # tempo, so no tempo copies. 4 works test-only, 2 val-only, and one version of every other
    # work in val and one in test.
    "demo": {"aug_speed_mode": [1.0], "val_data_split": 0.1, "val_unseen": 0.05,
             "test_data_split": 0.1, "test_data_unseen": 0.1},
    # covers80: 80 works of ~2 recordings, too few to give a seen work's version away (one must
    # stay in training), so whole works are held out: 16 for test, 8 for validation.
    "covers80": {"aug_speed_mode": [1.0], "val_data_split": 0.0, "val_unseen": 0.1,
                 "test_data_split": 0.0, "test_data_unseen": 0.2},
    # your own folder tree: 15 % of works test-only and 10 % val-only (validation on unseen
    # works, what early stopping should watch), and 10 % of the other works' recordings to test
    "folder": {"aug_speed_mode": [1.0], "val_data_split": 0.0, "val_unseen": 0.1,
               "test_data_split": 0.1, "test_data_unseen": 0.15},
}


def default_prep_config(kind: str, n_works: int | None = None) -> PrepConfig:
    """The default :class:`PrepConfig` of a source ``kind``: "demo", "covers80" or "folder".

    With ``n_works`` < 10 (too few works to hold any out) a folder tree keeps every work seen
    and gives a quarter of each work's recordings to test (and none to val).
    """
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
) -> ImportReport:
    files = sorted(
        (p for p in root.glob(pattern) if p.is_file() and not p.name.startswith(".")),
        key=lambda p: (p.parent.name, p.name),
    )
    audio = [p for p in files if p.suffix.lower() in extensions]
    skipped = [{"wav": str(p), "reason": f"not an audio file ending {p.suffix!r}"}
               for p in files if p.suffix.lower() not in extensions]
    if not audio:
        raise ManifestError(f"{root}: no audio files match {pattern!r} (endings "
                            f"{', '.join(extensions)}); expected one folder per work holding its "
                            "recordings")
    work_index = {w: i for i, w in enumerate(sorted({p.parent.name for p in audio}))}
    version_counter: dict[str, int] = {}
    records = []
    for running, p in enumerate(audio):
        w = p.parent.name
        v = version_counter.get(w, 0)
        version_counter[w] = v + 1
        try:
            dur_s, _sr, _ch = audio_info(p)
        except (AudioError, OSError, RuntimeError, ValueError) as e:  # keep going; report it
            skipped.append({"wav": str(p), "reason": str(e) or type(e).__name__})
            continue
        records.append({
            "perf": f"{perf_prefix}_{running:08d}_{work_index[w]}_{v}",
            "wav": _wav_string(p, relative_to),
            "dur_s": round(float(dur_s), 3),
            "work": w,
            "version": p.name,
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
    """Write ``out_dir/dataset.txt`` for covers80's ``covers32k/<work>/<recording>.mp3`` tree.

    ``root``: ``covers32k`` or its parent; ``relative_to``: write ``wav`` paths relative to this
    folder (default absolute); ``return_report``: return the :class:`ImportReport`, not the path.
    Works are numbered over sorted folder names, recordings over sorted file names; perf =
    ``cover80_<running index:08d>_<work index>_<version index>``, work = folder name, version =
    file name, dur_s = decoded duration (s). Unreadable files are skipped and listed in
    ``import_report.json``; their indices stay reserved, so other ids do not depend on them.
    """
    covers = find_covers80_root(root)
    report = _import_tree(
        covers, Path(out_dir), pattern="*/*", perf_prefix="cover80", relative_to=relative_to,
        extensions=AUDIO_EXTENSIONS,
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

    As :func:`import_covers80`, with ``pattern`` (glob under ``root``; the work is each file's
    parent folder, so ``"*/*/*.wav"`` groups by the innermost one), ``perf_prefix`` (default: the
    root folder's name, made file-name safe) and ``extensions`` (other matched files are skipped
    and reported).
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"{root}: folder not found")
    prefix = _safe_prefix(perf_prefix if perf_prefix is not None else root.resolve().name)
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    report = _import_tree(
        root, Path(out_dir), pattern=pattern, perf_prefix=prefix, relative_to=relative_to,
        extensions=exts,
    )
    return report if return_report else report.dataset_txt

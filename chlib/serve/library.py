"""The service's own reference index and the recordings added to it through the API.

Everything lives in ``<run_dir>/service/`` (06's ``<run_dir>/index`` is never touched):
``index-<n>/`` (a :class:`~chlib.retrieval.index.ReferenceIndex` folder), ``current.json``
naming the live one, ``library/`` (audio and CQT of added recordings), ``tmp/`` (uploads being
processed) and, optionally, ``token``. An edit copies the live index, changes the copy, saves
it into a new ``index-<n+1>/`` and only then rewrites ``current.json`` (atomically) and swaps it
in memory: a crash at any point leaves the previous index live and readable, and a search in
flight keeps the snapshot it started with."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import threading
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np

from chlib.core.errors import ChlibError, IndexMismatchError
from chlib.core.io import atomic_open, atomic_save_npy, folder_lock, read_json, write_json
from chlib.model.checkpoint import model_fingerprint
from chlib.retrieval.embed import embed_recordings, hp_window_settings
from chlib.retrieval.identify import reference_records
from chlib.retrieval.index import ReferenceIndex, build_index, is_tempo_copy
from chlib.retrieval.scoring import expansion_of, rule_of
from chlib.retrieval.timeline import best_match_null, index_null
from chlib.serve import AUDIO_TYPES, ServeError

__all__ = ["TOKEN_ENV", "PERF_PATTERN", "load_token", "clean_work", "check_perf",
           "ReferenceLibrary"]

TOKEN_ENV = "CHLIB_SERVE_TOKEN"
PERF_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # also a file name: no paths
_INDEX_DIR = re.compile(r"^index-(\d{6})$")
_LOCK_WAIT_S = 60.0  # another server process editing the same run: wait this long at most


def load_token(service_dir: str | os.PathLike, token: str | None = None) -> str | None:
    """The editing token: ``token`` if given, else env ``CHLIB_SERVE_TOKEN``, else the first
    line of ``<service_dir>/token``; None (editing disabled) when none is set or it is blank."""
    if token is None:
        token = os.environ.get(TOKEN_ENV)
    if token is None and (f := Path(service_dir) / "token").is_file():
        token = f.read_text(encoding="utf-8").strip()
    return None if token is None else (token.strip() or None)


def clean_work(work: str | None) -> str:
    """A work name as manifests keep it (NFC, stripped); ServeError 422 if empty or not one
    line of at most 200 characters."""
    w = unicodedata.normalize("NFC", work or "").strip()
    if not w or len(w) > 200 or any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in w):
        raise ServeError(422, f"work {work!r}: give the work's name, one line of 1-200 "
                              "characters")
    return w


def check_perf(perf: str) -> str:
    """``perf`` if it is a usable recording id (letters, digits, ``._-``; not a tempo copy's
    ``sp_<factor>-`` prefix), else ServeError 422."""
    if not PERF_PATTERN.match(perf) or is_tempo_copy({"perf": perf}):
        raise ServeError(422, f"perf {perf!r}: use 1-100 letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit (and not 'sp_<factor>-')")
    return perf


class ReferenceLibrary:
    """The live index of a service (see the module docstring): loaded from ``service_dir``
    when it is ``model``'s, with the run's window recipe and rule, else built from the
    recordings it held (or, the first time, the dataset's train + val references) and saved.
    ``model_lock`` is held while the model embeds."""

    def __init__(self, service_dir: str | os.PathLike, model: Any, hp: Any,
                 dataset_dir: str | os.PathLike, *, model_lock: threading.Lock,
                 device: Any = None) -> None:
        self.dir, self.model, self.hp = Path(service_dir), model, hp
        self.dataset_dir = Path(dataset_dir).resolve()
        self.library_dir = self.dir / "library"
        self.model_lock, self.device = model_lock, device
        self.edit_lock = threading.Lock()
        self.library_dir.mkdir(parents=True, exist_ok=True)
        self._dataset_refs = [r for r in reference_records(self.dataset_dir)
                              if not is_tempo_copy(r)]
        self._dataset_wavs = {Path(r["wav"]).resolve() for r in self._dataset_refs
                              if r.get("wav")}
        self.roots = sorted({str(self.library_dir.resolve()), *(
            str(Path(r["feat"]).resolve().parent) for r in self._dataset_refs if r.get("feat"))})
        with folder_lock(self.dir, "chlib serve: opening the reference index", wait=_LOCK_WAIT_S):
            self.status = self._open()
        self._drop_stale()

    # --- state on disk ---------------------------------------------------------------
    def _current_name(self) -> str | None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            name = str(read_json(self.dir / "current.json")["index"])
            return name if _INDEX_DIR.match(name) else None
        return None

    def _fits(self, idx: ReferenceIndex) -> str:
        if idx.window_settings != hp_window_settings(self.hp):
            return "the index was built with another window recipe"
        if idx.rule != rule_of(self.hp):
            return f"the index ranks by rule {idx.rule!r}, the run by {rule_of(self.hp)!r}"
        if idx.expansion != expansion_of(self.hp):
            return "the index and the run differ in neighbour expansion"
        return ""

    def _open(self) -> str:
        name = self._current_name()
        folder = self.dir / name if name else None
        why = "no service index yet"
        if folder is not None:
            try:
                idx = ReferenceIndex.load(folder, expect_fingerprint=model_fingerprint(
                    self.model.state_dict()), expect_features=self.hp.features,
                    feature_roots=self.roots)
                if not (why := self._fits(idx)):
                    self._set(idx, name)
                    return f"loaded {folder}: {len(idx)} reference recordings"
            except IndexMismatchError as e:
                why = str(e)
        records = self._previous_records(folder) or self._dataset_refs
        with self.model_lock:
            idx = build_index(self.model, records, self.hp, device=self.device,
                              cache_dir=self.dir.parent / "embeddings", progress=False)
        self._save_and_swap(idx)
        return f"built {self.dir / self._name}: {len(idx)} reference recordings ({why})"

    def _previous_records(self, folder: Path | None) -> list[dict]:
        """The recordings an index that no longer fits held (feature files inside the roots)."""
        try:
            lines = (folder / "records.jsonl").read_text(encoding="utf-8").splitlines()
            recs = [json.loads(x) for x in lines if x.strip()]
        except (OSError, ValueError, TypeError):
            return []
        return [r for r in recs if isinstance(r, dict) and r.get("feat") and any(
            Path(r["feat"]).resolve().is_relative_to(root) for root in self.roots)]

    def _set(self, idx: ReferenceIndex, name: str) -> None:
        nulls = {"best_null": best_match_null(idx), "null_stats": index_null(idx)}
        self._snapshot, self._name = (idx, nulls), name  # one assignment: readers see old or new

    def _save_and_swap(self, idx: ReferenceIndex) -> None:
        """Save ``idx`` as the next ``index-<n>``, point ``current.json`` at it, swap it in."""
        old = self._current_name()
        n = int(_INDEX_DIR.match(old).group(1)) + 1 if old else 1
        name = f"index-{n:06d}"
        shutil.rmtree(self.dir / name, ignore_errors=True)
        idx.save(self.dir / name)
        write_json(self.dir / "current.json", {"index": name})
        self._set(idx, name)
        if old and old != name:
            shutil.rmtree(self.dir / old, ignore_errors=True)

    def _drop_stale(self) -> None:
        """Remove index folders left by an interrupted save (never the live one)."""
        for p in self.dir.glob("index-*"):
            if p.name != self._name and _INDEX_DIR.match(p.name):
                shutil.rmtree(p, ignore_errors=True)

    # --- reading ------------------------------------------------------------------
    def snapshot(self) -> tuple[ReferenceIndex, dict]:
        """``(index, its statistics)``: ``{"best_null", "null_stats"}`` (keyword arguments of
        :func:`~chlib.retrieval.timeline.timeline`), consistent, never changed afterwards."""
        return self._snapshot

    @property
    def index(self) -> ReferenceIndex:
        return self._snapshot[0]

    def record(self, perf: str) -> dict | None:
        return next((r for r in self.index.records if r["perf"] == perf), None)

    def audio_path(self, rec: dict | None) -> Path | None:
        """A record's audio file if it exists and is one the service may read: a dataset
        reference's own ``wav`` (as its manifest names it) or a file of the library."""
        if not rec or not rec.get("wav"):
            return None
        p = Path(rec["wav"]).resolve()
        allowed = p in self._dataset_wavs or p.is_relative_to(self.library_dir.resolve())
        return p if allowed and p.is_file() else None

    def works(self) -> list[dict]:
        """``{"work", "work_id", "n_recordings"}`` per work of the index, sorted by work."""
        out: dict[str, dict] = {}
        for r in self.index.records:
            row = out.setdefault(r["work"], {"work": r["work"], "work_id": r.get("work_id"),
                                             "n_recordings": 0})
            row["n_recordings"] += 1
        return [out[w] for w in sorted(out)]

    # --- editing ------------------------------------------------------------------
    def add(self, feat: np.ndarray, audio: Path, kind: str, *, work: str, perf: str,
            duration_s: float) -> int:
        """Add a recording (its CQT ``feat`` and audio file, copied into the library) as
        ``perf`` of ``work``; returns the number of references. ServeError 409 for a known
        perf, 500 when saving fails (then nothing changed)."""
        with self.edit_lock, folder_lock(self.dir, "chlib serve: adding a reference",
                                         wait=_LOCK_WAIT_S):
            cur = self.index
            if perf in cur.perfs:
                raise ServeError(409, f"perf {perf!r} is already in the index; choose another "
                                      f"id or DELETE /references/{perf} first")
            ids = {r["work"]: r.get("work_id") for r in cur.records}
            known = [i for i in ids.values() if i is not None]
            work_id = ids[work] if work in ids else max(known, default=-1) + 1
            wav = self.library_dir / f"{perf}{AUDIO_TYPES[kind][1]}"
            feat_path = self.library_dir / f"{perf}.cqt.npy"
            rec = {"perf": perf, "work": work, "work_id": work_id, "wav": str(wav.resolve()),
                   "feat": str(feat_path.resolve()), "duration_s": float(duration_s)}
            try:
                with open(audio, "rb") as src, atomic_open(wav) as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                atomic_save_npy(feat_path, np.asarray(feat, np.float32))
                ws = cur.window_settings
                with self.model_lock:
                    (wins,) = embed_recordings(self.model, [rec], self.hp, hop=ws["hop"],
                                               tail=ws["tail"], min_tail=ws["min_tail"],
                                               device=self.device, progress=False)
                new = dataclasses.replace(cur)
                new.add([rec], [wins])
                self._commit(new)
            except BaseException:
                for p in (wav, feat_path):
                    with contextlib.suppress(OSError):
                        p.unlink()
                raise
            return len(new)

    def remove(self, perf: str) -> int:
        """Remove ``perf`` (its library files too); returns the number of references left.
        ServeError 404 unknown, 409 for the last one, 500 when saving fails."""
        with self.edit_lock, folder_lock(self.dir, "chlib serve: removing a reference",
                                         wait=_LOCK_WAIT_S):
            cur = self.index
            if (rec := self.record(perf)) is None:
                raise ServeError(404, f"perf {perf!r} is not in the index; GET /works lists "
                                      "the works and GET /works/{work} their recordings")
            if len(cur) == 1:
                raise ServeError(409, "this is the last reference recording; add another "
                                      "before removing it")
            new = dataclasses.replace(cur)
            new.remove(perfs=[perf])
            self._commit(new)
            for key in ("wav", "feat"):
                p = Path(rec.get(key) or "")
                if rec.get(key) and p.resolve().is_relative_to(self.library_dir.resolve()):
                    with contextlib.suppress(OSError):
                        p.unlink()
            return len(new)

    def _commit(self, new: ReferenceIndex) -> None:
        try:
            self._save_and_swap(new)
        except (OSError, ChlibError) as e:
            raise ServeError(500, f"could not save the reference index ({type(e).__name__}: "
                                  f"{e}); nothing was changed: check the disk space and "
                                  f"permissions of {self.dir} and try again") from e

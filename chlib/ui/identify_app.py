"""06's interactive identify app: upload or type a query, press Identify, see and hear its
matches and its timeline (which works, where; a click on a segment plays it)."""

from __future__ import annotations

import html
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ipywidgets as w
from IPython.display import display

from chlib.core.errors import ChlibError, ConfigError
from chlib.retrieval.identify import find_audio_files, identify
from chlib.retrieval.segment import SegmentReport, identify_segments
from chlib.ui.report import query_match_figure
from chlib.ui.timeline_view import timeline_player
from chlib.ui.widgets import (
    ParameterForm,
    audio_player,
    png_image,
    results_table,
    table,
)

__all__ = ["IdentifyApp"]

_MATCH_COLUMNS = ["rank", "work", "perf", "distance", "p_value", "verdict"]


class IdentifyApp:
    """Upload or type a query, set ``top_k`` and ``threshold_p``, press Identify: the matches
    with players, the query's timeline (click a segment to hear it) and its CQT beside its best
    match's. ``widget`` is the box to display, ``report`` the last IdentifyReport and
    ``segments`` the last SegmentReport; nothing runs until the button is pressed."""

    def __init__(self, model: Any, hp: Any, index: Any, *, device: str = "auto",
                 top_k: int = 10, threshold_p: float = 0.001, path: str = "",
                 upload_dir: str | os.PathLike | None = None, max_seconds: float = 30.0):
        self.model, self.hp, self.index, self.device = model, hp, index, device
        self.max_seconds, self.upload_dir, self.report = max_seconds, upload_dir, None
        self.segments: SegmentReport | None = None
        self._by_perf = {r["perf"]: r for r in index.records}
        form = ParameterForm({"query_path": str(path), "top_k": int(top_k),
                              "threshold_p": float(threshold_p)})
        self.path, self.top_k, self.threshold = form.inputs.values()
        self.upload = w.FileUpload(accept="audio/*", multiple=False, description="upload audio")
        self.clear_button = w.Button(description="clear upload", icon="times")
        self.button = w.Button(description="Identify", button_style="primary")
        self.source_note, self.out, self._use_upload = w.HTML(), w.Output(), False
        self.upload.observe(lambda _c: self._touched(upload=True), names="value")
        self.path.observe(lambda _c: self._touched(upload=False), names="value")
        self.clear_button.on_click(lambda _b: self.clear_upload())
        self.button.on_click(lambda _b: self.run())
        self.widget = w.VBox([w.HBox([self.upload, self.clear_button]), form.widget,
                              self.source_note, self.button, self.out])
        self._touched(upload=False)

    def _upload_item(self) -> Mapping | None:
        """``{"name", "content"}`` of the upload, or None (ipywidgets 8: a tuple of such dicts;
        7, which Colab ships: ``{name: {"metadata": {"name", ...}, "content"}}``)."""
        if not (files := self.upload.value):
            return None
        if isinstance(files, (list, tuple)):
            return files[0]
        item = next(iter(files.values()))
        return {"name": item["metadata"]["name"], "content": item["content"]}

    def clear_upload(self) -> None:
        """Forget the upload (its value is read-only in ipywidgets 7, hence ``set_trait``)."""
        self.upload.set_trait("value", type(self.upload.value)())
        self._touched(upload=False)

    def _touched(self, *, upload: bool) -> None:
        """The last thing edited (an upload or the path box) is the query; say which."""
        item = self._upload_item()
        self._use_upload = upload and item is not None
        self.clear_button.disabled = item is None
        self.source_note.value = "query: " + (
            f"the upload <b>{html.escape(item['name'])}</b>" if self._use_upload
            else f"the typed path <b>{html.escape(self.path.value)}</b>" if self.path.value
            else "none yet (upload an audio file or type a path)")

    def query_paths(self) -> list[str]:
        """The uploaded file (saved to ``upload_dir`` or a temporary folder) if it was touched
        last, else the file or the audio files of the folder that ``query_path`` names."""
        if self._use_upload and (item := self._upload_item()):
            folder = Path(self.upload_dir or tempfile.mkdtemp(prefix="chlib_upload_"))
            folder.mkdir(parents=True, exist_ok=True)
            (target := folder / Path(item["name"]).name).write_bytes(bytes(item["content"]))
            return [str(target)]
        if str(p := Path(self.path.value.strip())) in ("", "."):
            raise ConfigError("upload an audio file or type the path of one")
        if not p.exists():
            raise ConfigError(f"{p}: no such file or folder")
        return [str(f) for f in find_audio_files(p)] if p.is_dir() else [str(p)]

    def run(self) -> None:
        """Identify the chosen query and show the results (called by the button, which is
        disabled and says so meanwhile)."""
        self.out.clear_output()
        self.button.disabled, self.button.description = True, "Identifying..."
        self.button.icon = "hourglass-half"
        try:
            with self.out:
                self._run()
        finally:
            self.button.disabled, self.button.description, self.button.icon = (
                False, "Identify", "")

    def _run(self) -> None:
        try:
            paths = self.query_paths()
            print(f"identifying {len(paths)} recording(s)...")
            self.report = identify(paths, model=self.model, hp=self.hp, index=self.index,
                                   device=self.device, top_k=self.top_k.value,
                                   threshold_p=self.threshold.value)
            self.segments = identify_segments(paths, model=self.model, hp=self.hp,
                                              index=self.index, device=self.device)
        except ChlibError as e:
            print(f"error: {e}")
            return
        for q in paths:
            display(*self.views(q))
        if self.report.errors:
            display(table(self.report.errors, title="could not be read"))
        if best := [r for r in self.report.best() if r["rank"] == 1]:
            display(png_image(self.match_figure(best[0])))

    def views(self, query: str) -> list:
        """The query's player and its results grid with a player per match."""
        rows = [dict(r, wav=self._by_perf.get(r["perf"], {}).get("wav"))
                for r in self.report.rows if r["query"] == query and r["rank"]]
        head = w.HBox([w.HTML(f"<b>{html.escape(Path(query).name)}</b>&nbsp;"),
                       audio_player(query, max_seconds=self.max_seconds)])
        out = [head, results_table(rows, _MATCH_COLUMNS, audio_column="wav",
                                   max_seconds=self.max_seconds)]
        if self.segments is not None and (tl := self.segments.timelines.get(query)):
            out += [w.HTML("<b>timeline</b> (click a segment to hear it)"),
                    timeline_player(query, tl)]
        return out

    def match_figure(self, best_row: Mapping) -> Any:
        """CQT of the query beside its best match's."""
        return query_match_figure(best_row["query"], self._by_perf.get(best_row["perf"], {}),
                                  self.hp, max_seconds=self.max_seconds)

"""The identification service's web page (issue 13) in a real headless Chromium, as a person
uses it: choose a recording, press Identify, read the works and their verdicts, see the
timeline; a file that is not audio shows the API's own message on the red line; nothing scrolls
sideways at 1280 px or on a 390 px phone. One test runs the real service
(:func:`chlib.serve.app.create_app` over a tiny run trained here); one runs the page against a
stand-in returning fixed JSON of the contract's shape, for what a tiny run cannot produce
(hostile work names, time matched to no work, a CQT picture, a slow answer). Screenshots go to
tmp_path, or to ``$CHLIB_SCREENSHOTS``: browser_serve_1280.png, browser_serve_390.png."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import pytest
import soundfile as sf
import uvicorn
from browser import CHROMIUM, need_browser, sync_playwright
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from helpers import make_tiny_dataset, tiny_config, tone

import chlib.demo as dd

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

STATIC = Path(__file__).resolve().parents[1] / "chlib" / "serve" / "static"
VERDICTS = {"likely the same work", "possibly related", "no confident match", "no calibration"}
_NO_SIDEWAYS = "() => document.documentElement.scrollWidth <= document.documentElement.clientWidth"


def _shots(tmp_path: Path) -> Path:
    out = Path(os.environ.get("CHLIB_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app) -> Iterator[str]:
    """``app`` under uvicorn in a background thread on a free 127.0.0.1 port; yields its URL."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > end:
            raise RuntimeError(f"uvicorn did not start on port {port}")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@contextmanager
def browser_page(width: int = 1280, height: int = 900, *, fake_microphone: bool = False):
    """A headless Chromium page; ``fake_microphone``: a microphone playing a beep, allowed."""
    args = ["--no-sandbox"]
    if fake_microphone:
        args += ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def _wav(path: Path, seconds: float = 6.0) -> Path:
    sf.write(path, tone(seconds), 16000)
    return path


def _demo_recording(path: Path, cache: Path) -> Path:
    """A performance of a demo tune, as the demo generator renders them (what `make serve`
    users drop on the page after `make demo`)."""
    tune = dd.demo_tunes(1, seed=0, cache_dir=cache)[0]
    params = dd.draw_performance_params(tune, 1, seed=3, min_seconds=8.0, max_seconds=10.0)[0]
    sf.write(path, dd.render_performance(tune, params, 16000), 16000)
    return path


def _identify(page, path: Path) -> dict:
    """Choose ``path`` in the file input, press Identify; the API's JSON answer."""
    page.set_input_files("#file", str(path))
    with page.expect_response(lambda r: "/identify" in r.url, timeout=120_000) as answer:
        page.click("#identify")
    page.wait_for_function("() => document.querySelector('#identify').textContent === 'Identify'",
                           timeout=30_000)
    return answer.value.json()


def _no_sideways_scroll(page, width: int) -> None:
    page.set_viewport_size({"width": width, "height": 900})
    page.wait_for_timeout(200)
    sizes = page.evaluate("() => [document.documentElement.scrollWidth, "
                          "document.documentElement.clientWidth]")
    assert page.evaluate(_NO_SIDEWAYS), f"scrolls sideways at {width} px: {sizes}"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny run trained for one epoch (as tests/test_runner.py's identify test does)."""
    from chlib.core.config import HParams, save_hparams
    from chlib.train.loop import train

    need_browser()  # before training: no browser, nothing to train for
    root = tmp_path_factory.mktemp("serve_run")
    ds = make_tiny_dataset(root)
    run_dir = root / "runs" / "tiny"
    save_hparams(HParams.from_dict(tiny_config(ds, max_epochs=1)),
                 run_dir / "config" / "hparams.yaml")
    train(run_dir, device="cpu", max_epochs=1, progress=False)
    return run_dir


def test_page_identifies_an_upload_with_the_real_service(tiny_run, tmp_path):
    """Issue 13: upload through the file input, see the works with verdict words and one bar per
    timeline segment; a text file named x.mp3 shows the API's "detail"; no sideways scroll."""
    need_browser()
    create_app = pytest.importorskip("chlib.serve.app").create_app
    shots = _shots(tmp_path)
    query = _demo_recording(tmp_path / "session tune.wav", tmp_path / "tunes")
    bad = tmp_path / "x.mp3"
    bad.write_text("these are words, not music\n" * 20)
    with serving(create_app(tiny_run, device="cpu")) as base, browser_page() as page:
        page.goto(base + "/")
        page.wait_for_selector("#health.ok", timeout=30_000)
        health = page.text_content("#health")
        assert "works" in health and "reference recording" in health, health

        result = _identify(page, query)
        page.wait_for_selector("#results", state="visible")
        assert result["query"] == "session tune.wav"
        rows = page.locator("#matches tbody tr")
        assert rows.count() == len(result["matches"]) > 0
        assert page.locator("#matches td.work").all_text_contents() == [
            m["work"] for m in result["matches"]]
        verdicts = page.locator("#matches .badge").all_text_contents()
        assert verdicts == [m["verdict"] for m in result["matches"]]
        assert set(verdicts) <= VERDICTS, verdicts
        assert result["query"] in page.text_content("#headline")
        assert result["timeline"] is not None  # the page asks for it (timeline=true)
        assert page.locator("#timeline .seg").count() == len(result["timeline"]["segments"]) > 0
        assert page.is_visible("#cqt-block") == (result["cqt_png"] is not None)
        assert not page.is_visible("#error")
        # the tiny dataset has no audio files: Play shows the service's 404 reason by the player
        first = result["matches"][0]
        page.locator("#matches button.play").first.click()
        page.wait_for_selector("#player-error", state="visible", timeout=15_000)
        assert first["perf"] in page.text_content("#player-error")
        assert first["work"] in page.text_content("#now-playing")
        _no_sideways_scroll(page, 1280)
        page.screenshot(path=str(shots / "browser_serve_1280.png"), full_page=True)
        _no_sideways_scroll(page, 390)
        page.screenshot(path=str(shots / "browser_serve_390.png"), full_page=True)
        page.set_viewport_size({"width": 1280, "height": 900})

        answer = _identify(page, bad)
        page.wait_for_selector("#error", state="visible")
        assert isinstance(answer.get("detail"), str) and answer["detail"]
        assert page.text_content("#error") == answer["detail"]
        assert page.evaluate("getComputedStyle(document.querySelector('#error')).color") == \
            "rgb(179, 38, 30)"  # the red line
        assert not page.is_visible("#results")
        page.screenshot(path=str(shots / "browser_serve_error_1280.png"))


def test_page_records_from_the_microphone_and_identifies_it(tiny_run):
    """Record (Chromium's fake microphone), stop: the recording becomes a WAV file on the page
    (browsers record WebM/Ogg, which a service may not decode), and Identify answers for it."""
    need_browser()
    create_app = pytest.importorskip("chlib.serve.app").create_app
    with serving(create_app(tiny_run, device="cpu")) as base, \
            browser_page(fake_microphone=True) as page:
        page.goto(base + "/")
        page.wait_for_selector("#health.ok", timeout=30_000)
        page.click("#record")
        page.wait_for_function("() => document.querySelector('#rec-note').textContent"
                               ".startsWith('Recording 0:03')", timeout=15_000)
        assert "Stop" in page.text_content("#record")
        page.click("#record")
        page.wait_for_selector("#chosen", state="visible", timeout=15_000)
        chosen = page.text_content("#chosen")
        assert re.search(r"recording-[\d-]+\.wav \((\d+ kB|\d+\.\d MB)\)", chosen), chosen
        with page.expect_response(lambda r: "/identify" in r.url, timeout=120_000) as answer:
            page.click("#identify")
        assert answer.value.ok, answer.value.text()
        page.wait_for_selector("#results", state="visible", timeout=30_000)
        assert page.locator("#matches tbody tr").count() == len(answer.value.json()["matches"])


# --- the stand-in: fixed JSON of the contract's shape ------------------------------------------

HOSTILE = '<img src=x onerror="window.__pwned = 1">Reel & Jig "quoted"'
LONG = "The Exceedingly Long-Named Hornpipe of the Western Shore" + "Supercalifragilistic" * 3


def _png_1x1() -> str:
    """A 1x1 PNG, base64 (what cqt_png carries)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\x00\x30\x60\x90")) + chunk(b"IEND", b""))
    return base64.b64encode(png).decode()


def _stand_in_app(delay_s: float = 1.0):
    """A FastAPI app serving the page and answering /health, /identify and /audio like the
    contract, with fixed answers (an upload starting with "text" is refused as not audio)."""
    app = FastAPI()
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    buf = io.BytesIO()
    sf.write(buf, tone(2.0), 16000, format="WAV")
    wav = buf.getvalue()
    seen: list[str] = []

    @app.get("/")
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    def health():
        return {"status": "ok", "run": "stand-in", "epoch": 3, "n_works": 2, "n_references": 5,
                "max_upload_mb": 50.0, "max_duration_s": 900.0, "can_edit": False}

    @app.post("/identify")
    async def identify(request: Request, file: Annotated[UploadFile, File()]):
        data = await file.read()
        seen.append(str(request.url))
        await asyncio.sleep(delay_s)
        if data.startswith(b"text"):
            return JSONResponse(status_code=415, content={"detail": (
                f"{file.filename} is not audio (it looks like text); choose a WAV, FLAC, MP3 "
                "or OGG recording.")})
        return {"query": file.filename, "duration_s": 60.0,
                "matches": [
                    {"rank": 1, "work": HOSTILE, "work_id": 0, "perf": "p/1 a&b",
                     "distance": 0.21, "p_value": 0.0002, "verdict": "likely the same work"},
                    {"rank": 2, "work": LONG, "work_id": 1, "perf": "p2",
                     "distance": 0.55, "p_value": 0.03, "verdict": "possibly related"},
                    {"rank": 3, "work": "A third tune", "work_id": 2, "perf": "p3",
                     "distance": 0.9, "p_value": 0.6, "verdict": "no confident match"}],
                "timeline": {"segments": [
                    {"start_s": 0.0, "end_s": 24.0, "work": HOSTILE, "p_value": 0.0002,
                     "perf": "p/1 a&b"},
                    {"start_s": 24.0, "end_s": 36.0, "work": "unknown", "p_value": None,
                     "perf": None},
                    {"start_s": 36.0, "end_s": 60.0, "work": LONG, "p_value": 0.03,
                     "perf": "p2"}],
                    "works": [{"work": HOSTILE, "seconds": 24.0, "share": 0.4, "p_value": 0.0002},
                              {"work": LONG, "seconds": 24.0, "share": 0.4, "p_value": 0.03},
                              {"work": "unknown", "seconds": 12.0, "share": 0.2,
                               "p_value": None}]},
                "cqt_png": _png_1x1()}

    @app.get("/audio/{perf:path}")
    def audio(perf: str):
        seen.append("audio:" + perf)
        return Response(wav, media_type="audio/wav")

    app.state.seen = seen
    return app


def test_page_escapes_server_text_and_shows_busy_unknown_and_picture(tmp_path):
    """Against the stand-in: server strings are shown as text (an <img onerror> work name runs
    nothing), the button reads "Identifying..." and is disabled while the answer is awaited,
    time matched to no work is a grey bar, a bar's click seeks the query player, a match's Play
    fetches /audio/{perf}, the CQT picture appears, and long names fit a 390 px phone."""
    need_browser()
    shots = _shots(tmp_path)
    query = _wav(tmp_path / "phone recording.wav", 60.0)
    app = _stand_in_app()
    with serving(app) as base, browser_page() as page:
        asked: list[str] = []
        page.on("request", lambda r: asked.append(r.url))
        page.goto(base + "/")
        page.wait_for_selector("#health.ok")
        assert "2 works" in page.text_content("#health")
        assert page.is_disabled("#identify")  # nothing chosen yet
        page.set_input_files("#file", str(query))
        assert "phone recording.wav" in page.text_content("#chosen")
        page.click("#identify")
        page.wait_for_function(
            "() => document.querySelector('#identify').textContent === 'Identifying...'")
        assert page.is_disabled("#identify")
        page.wait_for_selector("#results", state="visible", timeout=30_000)
        assert not page.is_disabled("#identify")
        assert "top_k=10" in app.state.seen[0] and "timeline=true" in app.state.seen[0]

        assert page.locator("#matches td.work").all_text_contents() == [HOSTILE, LONG,
                                                                         "A third tune"]
        assert page.evaluate("window.__pwned") is None
        assert page.locator("#results img:not(#cqt)").count() == 0
        assert HOSTILE in page.text_content("#headline")
        assert "likely the same work" in page.text_content("#headline")

        segs = page.locator("#timeline .seg")
        assert segs.count() == 3
        grey = segs.nth(1).evaluate("e => getComputedStyle(e).backgroundColor")
        assert grey == "rgb(212, 212, 212)" and "unknown" in segs.nth(1).get_attribute("class")
        colours = {segs.nth(i).evaluate("e => getComputedStyle(e).backgroundColor")
                   for i in (0, 2)}
        assert len(colours) == 2 and grey not in colours
        box0, box2 = segs.nth(0).bounding_box(), segs.nth(2).bounding_box()
        assert abs(box0["width"] - box2["width"]) < 2  # 24 s each of 60 s
        page.wait_for_function("() => document.querySelector('#query-audio').duration > 0")
        segs.nth(2).click()
        page.wait_for_function(
            "() => document.querySelector('#query-audio').currentTime >= 35.5", timeout=10_000)

        page.locator("#matches button.play").first.click()
        page.wait_for_selector("#match-player", state="visible")
        assert page.get_attribute("#match-audio", "src") == "/audio/p%2F1%20a%26b"
        assert HOSTILE in page.text_content("#now-playing")
        page.wait_for_function("() => document.querySelector('#match-audio').readyState >= 1",
                               timeout=10_000)
        assert "audio:p/1 a&b" in app.state.seen

        assert page.is_visible("#cqt")
        assert page.evaluate("document.querySelector('#cqt').naturalWidth") == 1
        _no_sideways_scroll(page, 1280)
        _no_sideways_scroll(page, 390)
        page.screenshot(path=str(shots / "browser_serve_standin_390.png"), full_page=True)
        _no_sideways_scroll(page, 320)
        page.set_viewport_size({"width": 1280, "height": 900})
        page.wait_for_timeout(300)  # the timeline's ticks are redrawn 0.1 s after a resize
        page.screenshot(path=str(shots / "browser_serve_standin_1280.png"), full_page=True)

        text = tmp_path / "notes.mp3"
        text.write_text("text, not a recording")
        page.set_input_files("#file", str(text))
        page.click("#identify")
        page.wait_for_selector("#error", state="visible", timeout=30_000)
        assert page.text_content("#error").startswith("notes.mp3 is not audio")

        # a file dropped on the box is chosen like one picked in the dialog
        page.evaluate("""() => { const t = new DataTransfer();
            t.items.add(new File([new Uint8Array(64)], 'dropped tune.flac', {type: 'audio/flac'}));
            document.querySelector('#drop').dispatchEvent(
                new DragEvent('drop', {dataTransfer: t, bubbles: true, cancelable: true})); }""")
        assert "dropped tune.flac" in page.text_content("#chosen")
        assert not page.is_visible("#error") and not page.is_disabled("#identify")
        # a file over /health's max_upload_mb is refused before it is sent
        posts = len(app.state.seen)
        page.evaluate("""() => { const t = new DataTransfer();
            t.items.add(new File([new Uint8Array(51e6)], 'big.wav', {type: 'audio/wav'}));
            document.querySelector('#drop').dispatchEvent(
                new DragEvent('drop', {dataTransfer: t, bubbles: true, cancelable: true})); }""")
        assert "more than this service takes (50 MB)" in page.text_content("#error")
        page.click("#identify")
        page.wait_for_timeout(300)
        assert len(app.state.seen) == posts and "big.wav" in page.text_content("#error")
        # works offline: everything the page asked for came from the service itself
        assert asked and all(u.startswith((base, "data:", "blob:")) for u in asked), asked

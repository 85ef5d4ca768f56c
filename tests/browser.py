"""A real JupyterLab in headless Chromium for the tests that must see what a person sees.

:func:`lab_page` starts ``jupyter lab`` on a free port with every Jupyter folder under a
temporary directory (nothing written to the user's settings), opens Debian's Chromium through
playwright's Python API (``executable_path``; never ``playwright install``) at a 1280 px wide
window, and yields ``(page, open_and_run)``: ``open_and_run(name)`` opens ``root/name`` and runs
all of its cells from the Run menu, as a person would."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nbformat
import pytest

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright
except ImportError:  # need_browser() skips, or fails under CI
    sync_playwright = PlaywrightTimeout = None

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
VIEWPORT = {"width": 1280, "height": 1000}
TOKEN = "chlib-browser-test"
# every code cell's prompt shows "[*]:" (running or queued) or "[n]:" (run)
_STARTED = ("() => [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')]"
            ".some(e => /\\[(\\*|\\d+)\\]/.test(e.textContent))")
_FINISHED = ("() => { const p = [...document.querySelectorAll("
             "'.jp-CodeCell .jp-InputArea-prompt')]; return p.length > 0 && "
             "p.every(e => /\\[\\d+\\]/.test(e.textContent)); }")


def need_browser() -> None:
    """Skip without Chromium or playwright; under CI (``CI=true``) fail instead."""
    if sync_playwright is None:
        missing = "playwright (pip install -e '.[dev]')"
    else:
        missing = "" if CHROMIUM else "chromium (apt-get install chromium)"
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests need {missing}; .ci/run installs it")
        pytest.skip(f"needs {missing}")


def write_notebook(path: Path, cells: list[str]) -> Path:
    """A notebook of code ``cells`` with the python3 kernel."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, path)
    return path


def wait_for_output(page, selector: str, shot: Path, timeout_s: float = 60.0):
    """The first element matching ``selector`` once visible; else fail with what the
    notebook's outputs say and a screenshot at ``shot``."""
    try:
        page.wait_for_selector(selector, timeout=timeout_s * 1000)
    except PlaywrightTimeout:
        page.screenshot(path=str(shot))
        said = "\n".join(page.locator(".jp-OutputArea-output").all_text_contents())[-3000:]
        pytest.fail(f"{selector} did not appear within {timeout_s:.0f} s; screenshot {shot}; "
                    f"the outputs say:\n{said}")
    return page.locator(selector).first


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, proc: subprocess.Popen, seconds: float = 60.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"jupyter lab did not answer at {url} within {seconds:.0f} s")


@contextmanager
def lab_page(root: Path, home: Path) -> Iterator[tuple]:
    """JupyterLab serving ``root`` (its settings under ``home``) and a 1280 px browser page."""
    port = _free_port()
    news = home / "settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True, exist_ok=True)  # no "official Jupyter news?" toast over the page
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    nb_settings = home / "settings" / "@jupyterlab" / "notebook-extension"
    nb_settings.mkdir(parents=True, exist_ok=True)  # every cell in the page, not only visible ones
    (nb_settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(home / "config"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"), JUPYTER_DATA_DIR=str(home / "data"),
               IPYTHONDIR=str(home / "ipython"), PYTHONPATH=os.pathsep.join(
                   [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", f"--port={port}",
           f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           f"--LabApp.workspaces_dir={home / 'workspaces'}",
           f"--LabApp.user_settings_dir={home / 'settings'}"]
    log = (home / "lab.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for(f"{base}/api?token={TOKEN}", proc)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport=VIEWPORT)

            def open_and_run(name: str, timeout_s: float = 180.0) -> None:
                page.goto(f"{base}/lab/tree/{name}?token={TOKEN}")
                page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
                page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']",
                                       timeout=60_000)
                for _ in range(10):  # the Run menu may not take a click while Lab settles
                    page.get_by_role("menuitem", name="Run", exact=True).click()
                    page.get_by_text("Run All Cells", exact=True).click()
                    try:
                        page.wait_for_function(_STARTED, timeout=3_000)
                        break
                    except PlaywrightTimeout:
                        page.keyboard.press("Escape")
                page.wait_for_function(_FINISHED, timeout=timeout_s * 1000)

            open_and_run.base = base  # the server's address, for pages opened by hand
            try:
                yield page, open_and_run
            finally:
                browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextmanager
def notebook_page(tmp_path: Path, name: str, cells: list[str]) -> Iterator:
    """A notebook of ``cells`` written under ``tmp_path``, opened in JupyterLab and run; the
    page (skips without a browser, or fails under CI)."""
    need_browser()
    root, home = tmp_path / "root", tmp_path / "home"
    root.mkdir()
    home.mkdir()
    write_notebook(root / name, cells)
    with lab_page(root, home) as (page, open_and_run):
        open_and_run(name)
        yield page

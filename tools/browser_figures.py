"""Look at every figure of executed notebooks as a person does: JupyterLab in headless Chromium
at 1280 px, each output image scrolled into view and photographed, with its drawn and natural
sizes (a figure drawn narrower than it was made is squeezed; wider than the notebook, cut).

    python tools/browser_figures.py runs/demo/notebooks/05_evaluate.ipynb \\
        runs/demo/notebooks/06_identify.ipynb --out /tmp/figures_1280

Writes ``<out>/<notebook>_<n>.png`` per figure and prints one line per figure; exit status 1
if any is drawn below 70 % of its width (its text shrinks as much) or runs past the
notebook's right edge.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from browser import TOKEN, lab_page  # noqa: E402  (the tests' JupyterLab + Chromium helper)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        root, home = Path(tmp) / "root", Path(tmp) / "home"
        root.mkdir()
        home.mkdir()
        for nb in args.notebooks:
            shutil.copy(nb, root / Path(nb).name)
        with lab_page(root, home) as (page, run):
            for nb in args.notebooks:
                name = Path(nb).name
                page.goto(f"{run.base}/lab/tree/{name}?token={TOKEN}")
                page.wait_for_selector(".jp-NotebookPanel:visible .jp-Cell", timeout=60_000)
                page.wait_for_timeout(1500)
                panel = page.locator(".jp-NotebookPanel:visible").first.bounding_box()
                imgs = page.locator(".jp-NotebookPanel:visible .jp-OutputArea-output img")
                n = 0
                for i in range(imgs.count()):
                    img = imgs.nth(i)
                    if not img.is_visible():
                        continue
                    img.scroll_into_view_if_needed()
                    box = img.bounding_box()
                    natural = img.evaluate("e => e.naturalWidth")
                    if not box or not natural:
                        continue
                    n += 1
                    img.screenshot(path=str(out / f"{Path(name).stem}_{n:02d}.png"))
                    squeezed = box["width"] < 0.7 * natural  # its text shrinks as much
                    cut = box["x"] + box["width"] > panel["x"] + panel["width"] + 1
                    bad += squeezed or cut
                    print(f"{name} figure {n}: drawn {box['width']:.0f} x {box['height']:.0f} "
                          f"px, made {natural} px wide"
                          + (" SQUEEZED" if squeezed else "") + (" CUT" if cut else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

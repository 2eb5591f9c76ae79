"""report.html, checked the way a user reads it: opened in a real headless Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import analysis
from analysis.report_html import build_html_report, write_html_report

from .test_analysis import ABLATION, build


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


needs_browser = pytest.mark.skipif(
    _chromium() is None, reason="no Chromium on PATH (.ci/run installs Debian's `chromium`; apt-get install chromium)"
)
# Runs in the page once it has loaded; the result lands in the DOM that --dump-dom prints.
_PROBE = (
    "<script>window.addEventListener('load',()=>{const i=[...document.images];"
    "document.body.setAttribute('data-probe',JSON.stringify({images:i.map(x=>[x.alt,x.complete,x.naturalWidth]),"
    "tables:document.querySelectorAll('table').length,rows:document.querySelectorAll('tr').length}));});</script>"
)


@pytest.fixture()
def report(tmp_path: Path) -> Path:
    out = build().write(tmp_path / "demo")
    path = write_html_report(out)
    assert path == out / "report.html"
    return path


def test_report_is_one_self_contained_file_with_every_section(report: Path):
    text = report.read_text()
    srcs = re.findall(r'<img alt="[^"]*" src="([^"]{0,40})', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)  # nothing to fetch
    assert "<script" not in text and "http" not in text.replace("http-equiv", "")
    for heading in ("Summary", "Search: search", "Ablations", "Task-order robustness", "Accuracy matrix of the best"):
        assert heading in text
    # One heatmap and one curve plot per stage's best trial, bars, a box plot, history, Avg vs Last.
    alts = re.findall(r'<img alt="([^"]*)"', text)
    assert sum(a.startswith("accuracy matrix of") for a in alts) == 3
    assert "ablation bars" in alts and "order robustness of orders" in alts and "search history of search" in alts
    # Building again from the directory gives the same document (write = build + store).
    assert build_html_report(analysis.load(report.parent)) == text


@needs_browser
def test_report_renders_in_a_real_browser_with_every_image_loaded(report: Path, tmp_path: Path):
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</body>", _PROBE + "</body>"))
    args = [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([*args, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout  # fmt: skip
    found = re.search(r'data-probe="([^"]*)"', dom)
    assert found, dom[-2000:]
    state = json.loads(html.unescape(found.group(1)))
    assert len(state["images"]) == len(re.findall(r"<img ", report.read_text())) >= 8
    assert all(complete and width > 0 for _, complete, width in state["images"]), state["images"]
    assert state["tables"] >= 5 and state["rows"] > 3 + len(ABLATION)
    shot = tmp_path / "report.png"
    subprocess.run([*args, "--window-size=1200,2000", f"--screenshot={shot}", report.as_uri()],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    from matplotlib.image import imread

    img = imread(str(shot))
    assert img.shape[:2] == (2000, 1200) and img[..., :3].std() > 0.05  # a page, not a blank window

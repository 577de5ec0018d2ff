"""Browser test of the dashboard: headless Chromium opens the page from ``file://`` and every plot renders.

Two Chromium runs on the same page and window size:

1. ``--dump-dom`` after the page's load handler ran: each ``svg.plot`` carries
   its laid-out rectangle and the bounding box of its drawn data (written by
   the page's inline script from ``getBoundingClientRect``/``getBBox``); all
   must be non-empty and every trend must have one point per saved run.
2. ``--screenshot``: the PNG (decoded here with zlib, no dependency) must show,
   inside each plot's rectangle, the colours its data are drawn in — the
   min/max band and median line of a trend, the bars of a bar chart, the red
   marker of the flagged regression.  A plot that failed to paint is blank.

Chromium is Debian's ``chromium`` (``apt-get install -y chromium``; or set
``HARNESS_CHROMIUM``).  Without it the test skips — except under ``CI``, where
it fails, so CI cannot silently skip it.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from harness.dashboard import build_dashboard, build_series, load_runs

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "bench_runs"
SLOWED = "test_bench_cpu_materialize[offset1]"
WIDTH = 1300

# Colours the dashboard draws data in (harness/dashboard/render.py) and how far anti-aliasing may move them.
BAND, LINE, RED = (0xAE, 0xC7, 0xE8), (0x1F, 0x77, 0xB4), (0xD6, 0x27, 0x28)
BAR_COLOURS = [(0x2C, 0xA0, 0x2C), (0x7F, 0x7F, 0x7F), (0xFF, 0x7F, 0x0E), (0x94, 0x67, 0xBD), LINE]
EXACT, AA = 3, 40


def _chromium() -> str:
    exe = os.environ.get("HARNESS_CHROMIUM") or next(
        (p for p in (shutil.which(n) for n in ("chromium", "chromium-browser")) if p), None
    )
    if exe is None:
        msg = "headless Chromium not found (install Debian's package: apt-get install -y chromium, or set HARNESS_CHROMIUM)"
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(f"{msg}; CI must run the dashboard browser test, not skip it")
        pytest.skip(msg)
    return exe


def _run_chromium(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--user-data-dir={profile}",
        *args,
    ]
    r = subprocess.run(cmd, capture_output=True, timeout=120)
    assert r.returncode == 0, f"chromium exited {r.returncode}: {r.stderr.decode(errors='replace')[-2000:]}"
    return r


class _Plots(HTMLParser):
    """Collects every <svg class="plot ..."> element's attributes and the <body> attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.plots: list[dict[str, str]] = []
        self.body: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "svg" and "plot" in a.get("class", "").split():
            self.plots.append(a)
        elif tag == "body":
            self.body = a


def _decode_png(data: bytes) -> tuple[int, int, list[bytes], int]:
    """(width, height, rows of RGB(A) bytes, bytes per pixel) of an 8-bit RGB/RGBA, non-interlaced PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, [], None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    w, h, depth, colour_type, _, _, interlace = header
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, f"unsupported PNG {header}"
    bpp = 3 if colour_type == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride = w * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(h):
        i = y * (stride + 1)
        ft, line = raw[i], bytearray(raw[i + 1 : i + 1 + stride])
        if ft == 1:
            for x in range(bpp, stride):
                line[x] = (line[x] + line[x - bpp]) & 255
        elif ft == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, prev))
        elif ft == 3:
            for x in range(stride):
                line[x] = (line[x] + (((line[x - bpp] if x >= bpp else 0) + prev[x]) >> 1)) & 255
        elif ft == 4:
            for x in range(stride):
                a = line[x - bpp] if x >= bpp else 0
                b, c = prev[x], (prev[x - bpp] if x >= bpp else 0)
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        else:
            assert ft == 0, f"bad PNG filter {ft} in row {y}"
        rows.append(bytes(line))
        prev = line
    return w, h, rows, bpp


def _count(rows: list[bytes], bpp: int, rect: tuple[int, int, int, int], colour: tuple[int, int, int], tol: int) -> int:
    """Pixels inside ``rect`` (x, y, w, h) within ``tol`` of ``colour`` on every channel."""
    x0, y0, w, h = rect
    n = 0
    for y in range(max(0, y0), min(len(rows), y0 + h)):
        row = rows[y]
        for x in range(max(0, x0), x0 + w):
            px = row[x * bpp : x * bpp + 3]
            if len(px) == 3 and all(abs(px[i] - colour[i]) <= tol for i in range(3)):
                n += 1
    return n


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The dashboard built from the fixture runs and matrix summary, its DOM after scripts, its screenshot."""
    exe = _chromium()
    tmp = tmp_path_factory.mktemp("dashboard")
    page = tmp / "dashboard.html"
    build_dashboard(FIXTURES, page, matrix=FIXTURES / "matrix", threshold=0.10, window=5)
    url = page.resolve().as_uri()
    dom = _run_chromium(exe, tmp / "profile1", f"--window-size={WIDTH},2000", "--dump-dom", url).stdout.decode()
    parsed = _Plots()
    parsed.feed(dom)
    height = int(parsed.body.get("data-page-height", "0") or 0)
    assert height > 0, "the page's load handler did not run (no data-page-height on <body>)"
    shot = tmp / "shot.png"
    _run_chromium(exe, tmp / "profile2", f"--window-size={WIDTH},{height}", f"--screenshot={shot}", url)
    # the screenshot is laid out in a window as tall as the page; lay the DOM out the same way
    dom = _run_chromium(exe, tmp / "profile3", f"--window-size={WIDTH},{height}", "--dump-dom", url).stdout.decode()
    parsed = _Plots()
    parsed.feed(dom)
    runs, _ = load_runs(FIXTURES)
    return {
        "plots": parsed.plots,
        "body": parsed.body,
        "png": _decode_png(shot.read_bytes()),
        "source": page.read_text(),
        "series": build_series(runs),
        "runs": runs,
    }


def _rect(plot: dict[str, str]) -> tuple[int, int, int, int]:
    x, y, w, h = (int(v) for v in plot["data-rect"].split(","))
    return x, y, w, h


def test_dashboard_browser_every_plot_laid_out(rendered: dict) -> None:
    plots = rendered["plots"]
    n_series = len(rendered["series"])
    assert rendered["source"].count('<svg class="plot') == len(plots)
    # one trend per benchmark series, plus the speed-up and ceiling-ratio bar charts of the one device
    assert len(plots) == n_series + 2
    assert rendered["body"]["data-plots-rendered"] == str(len(plots))
    for p in plots:
        assert "data-rect" in p and "data-bbox" in p, f"plot not processed by the page script: {p.get('aria-label')}"
        _, _, w, h = _rect(p)
        bw, bh = (float(v) for v in p["data-bbox"].split(",")[2:])
        assert w > 0 and h > 0, f"plot {p.get('aria-label') or p['class']} has no size: {p['data-rect']}"
        assert bw > 0 and bh > 0, f"plot {p.get('aria-label') or p['class']} drew nothing: bbox {p['data-bbox']}"


def test_dashboard_browser_trends_have_one_point_per_run(rendered: dict) -> None:
    trends = [p for p in rendered["plots"] if "trend" in p["class"].split()]
    assert len(trends) == len(rendered["series"])
    assert {p["data-points"] for p in trends} == {str(len(rendered["runs"]))}


def test_dashboard_browser_plots_are_painted(rendered: dict) -> None:
    w, h, rows, bpp = rendered["png"]
    assert w == WIDTH
    for p in rendered["plots"]:
        rect = _rect(p)
        assert rect[1] + rect[3] <= h, f"plot at {rect} lies outside the {w}x{h} screenshot"
        label = p.get("aria-label") or p["class"]
        if "trend" in p["class"].split():
            band = _count(rows, bpp, rect, BAND, EXACT)
            line = _count(rows, bpp, rect, LINE, AA)
            assert band >= 20, f"{label}: min/max band not painted ({band} px of {BAND})"
            assert line >= 10, f"{label}: median line not painted ({line} px near {LINE})"
        else:
            bars = sum(_count(rows, bpp, rect, c, EXACT) for c in BAR_COLOURS)
            assert bars >= 20 * int(p["data-points"]), f"{label}: bars not painted ({bars} px)"


def test_dashboard_browser_regression_marker_is_painted(rendered: dict) -> None:
    """The slowed benchmark's trend shows the red regression point; a steady one shows none."""
    _, _, rows, bpp = rendered["png"]
    trends = {p["aria-label"].removeprefix("trend of "): p for p in rendered["plots"] if "trend" in p["class"].split()}
    red_slowed = _count(rows, bpp, _rect(trends[SLOWED]), RED, EXACT)
    assert red_slowed >= 20, f"no red regression marker painted in the {SLOWED} trend ({red_slowed} px)"
    steady = next(name for name in trends if name != SLOWED)
    # the dashed limit line is red too but one pixel thin and anti-aliased: far fewer exact-red pixels than a marker
    assert _count(rows, bpp, _rect(trends[steady]), RED, EXACT) < red_slowed, steady

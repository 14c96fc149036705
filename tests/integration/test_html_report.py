"""`runs show --html` opened in Debian's chromium, headless: the page it renders (its
DOM, and a screenshot whose pixels hold the histogram's bars) for a run recorded through
the Session against fake connections (test doubles) with hostile output in it."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from stapctl import history
from stapctl.aggregate import aggregates_json
from stapctl.models import Aggregates, CountTotal, HistogramBucket, HistogramTotal
from tests.fleet_double import quick_agent
from tests.unit.test_audits import AFTER, BEFORE, apply, write_manifest

pytestmark = pytest.mark.integration
__all__ = ["quick_agent"]  # the agent's waits shortened, run records in the test's folder

CHROMIUM = shutil.which("chromium")
HOSTILE = b"t1 t2 <img src=x onerror=alert(1)> \x1b[2J"  # the first two fields are ignored
BAR_BLUE = (0x3B, 0x6F, 0xD8)  # .bar's colour in stapctl/html_report.py
AGGREGATES = aggregates_json(Aggregates(
    counts=(CountTotal("execs", "execs per program", ("h1", "h2"),
                       (("<b>bash</b>", 12), ("ls", 6), ("/tmp/planted", 3))),),
    histograms=(HistogramTotal("execs", "<h2>latency_us", ("h1",), "log", (
        HistogramBucket("", 1, 4), HistogramBucket("", 2, 8), HistogramBucket(">", 4, 2))),),
    rejected=1))


def chromium(page: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={tmp_path / 'chromium'}",
         "--window-size=1000,1000", *args, page.as_uri()],
        capture_output=True, check=False, timeout=120)


def rgb_pixels(png: bytes) -> list[tuple[int, int, int]]:
    """The pixels of an 8-bit RGB or RGBA PNG, not interlaced (what chromium writes)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    offset, chunks, header = 8, b"", b""
    while offset < len(png):
        length, kind = struct.unpack(">I4s", png[offset:offset + 8])
        data = png[offset + 8:offset + 8 + length]
        header = data if kind == b"IHDR" else header
        chunks += data if kind == b"IDAT" else b""
        offset += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour in (2, 6) and interlace == 0
    size = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(chunks), width * size
    previous, pixels = bytearray(stride), []
    for row in range(height):
        kind, line = raw[row * (stride + 1)], bytearray(raw[row * (stride + 1) + 1:
                                                           (row + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - size] if i >= size else 0
            up, corner = previous[i], previous[i - size] if i >= size else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                nearest = min((abs(p - left), 0, left), (abs(p - up), 1, up),
                              (abs(p - corner), 2, corner))[2]
                line[i] = (line[i] + nearest) & 0xFF
        pixels += [tuple(line[i:i + 3]) for i in range(0, stride, size)]
        previous = line
    return pixels  # type: ignore[return-value]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_the_report_page_in_a_real_browser(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path)
    apply(tmp_path, manifest, {"h1": BEFORE, "h2": BEFORE})
    run, _ = apply(tmp_path, manifest, {"h1": [*AFTER, HOSTILE], "h2": BEFORE},
                   baseline="last")
    folder = Path(history.find_run(run.id)["dir"])
    (folder / "aggregates.json").write_text(json.dumps(AGGREGATES))

    shown = subprocess.run([sys.executable, "-m", "stapctl", "runs", "show", run.id, "--html"],
                           capture_output=True, check=False, env=os.environ)
    assert shown.returncode == 0, shown.stderr
    html = shown.stdout.decode()
    assert "<img" not in html and "\x1b" not in html and "<b>bash" not in html
    assert not re.search(r"<[^>]*\s(src|href)=|url\(|<script|<link", html)  # no assets
    page = tmp_path / "report.html"
    page.write_bytes(shown.stdout)

    dom = chromium(page, tmp_path, "--dump-dom").stdout.decode()
    assert f"<h1>Run {run.id}</h1>" in dom
    assert "Compared with run" in dom and "1 host(s) changed" in dom
    assert "+ * exec /tmp/planted" in dom
    assert "+ &lt;img src=x onerror=alert(1)&gt; \\x1b[2J" in dom
    assert "<img" not in dom and "<h2>&lt;" not in dom
    assert "&lt;b&gt;bash&lt;/b&gt;" in dom and dom.count('class="bar"') == 6
    assert dom.count('style="width:100.0%"') == 2  # bash's 12, the bucket of 8
    assert dom.count('style="width:25.0%"') == 2  # /tmp/planted's 3, the bucket >4 of 2
    assert "&gt;4" in dom and "1 malformed or excess record(s) rejected" in dom

    # $STAPCTL_REPORT_SCREENSHOT keeps the screenshot where a person can look at it
    screenshot = Path(os.environ.get("STAPCTL_REPORT_SCREENSHOT") or tmp_path / "report.png")
    taken = chromium(page, tmp_path, f"--screenshot={screenshot}")
    assert taken.returncode == 0, taken.stderr
    pixels = rgb_pixels(screenshot.read_bytes())
    assert len(pixels) == 1000 * 1000
    # the histogram's bars (12, 6, 3 of a 24em column) are drawn: thousands of blue pixels
    assert sum(pixel == BAR_BLUE for pixel in pixels) > 2000

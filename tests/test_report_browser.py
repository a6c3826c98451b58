"""The report in a real headless Chromium (Debian's `chromium`): it loads, renders, has data.

Skipped only where chromium is missing (ci/setup-host.sh installs it).
The screenshot check needs no image library: a PNG's IHDR gives its size,
and its decompressed pixel stream of a one-colour page holds a handful of
distinct byte values whatever the row filters, while a rendered table or
plot holds hundreds; a blank page is screenshotted too, as the control.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
from report_jobs import run_tiny_job

from orchestrator.report.cli import make_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WIDTH, HEIGHT = 1280, 900
# Fewer distinct byte values than this in the pixel stream: one colour (a blank page).
BLANK_BELOW = 32

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (apt-get install --no-install-recommends chromium;"
    " run ci/setup-host.sh)",
)


def chromium(profile: Path, *args: str) -> str:
    """Run headless chromium offline with a throwaway profile; its stdout."""
    assert CHROMIUM is not None
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--window-size={WIDTH},{HEIGHT}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def screenshot(profile: Path, page: Path, png: Path) -> tuple[int, int, int]:
    """(width, height, distinct byte values of the pixel stream) of `page`'s screenshot."""
    chromium(profile, f"--screenshot={png}", page.as_uri())
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, size = 8, bytearray(), (0, 0)
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            size = struct.unpack(">II", chunk[:8])
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    return size[0], size[1], len(set(zlib.decompress(bytes(idat))))


class Census(HTMLParser):
    """Counts what the checks need in a DOM: matrix cells with links, plot lines with points."""

    def __init__(self) -> None:
        super().__init__()
        self.in_matrix = False
        self.matrix_cells = 0
        self.matrix_links = 0
        self.svgs = 0
        self.polyline_points: list[int] = []
        self.marker_lines = 0
        self._in_marker = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        classes = (attr.get("class") or "").split()
        if tag == "table" and attr.get("id") == "matrix":
            self.in_matrix = True
        elif tag == "td" and self.in_matrix and any(c.startswith("s-") for c in classes):
            self.matrix_cells += 1
        elif tag == "a" and self.in_matrix and attr.get("href"):
            self.matrix_links += 1
        elif tag == "svg":
            self.svgs += 1
        elif tag == "polyline":
            self.polyline_points.append(len((attr.get("points") or "").split()))
        elif tag == "g" and "marker" in classes:
            self._in_marker = True
        elif tag == "line" and self._in_marker:
            self.marker_lines += 1
            self._in_marker = False

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.in_matrix = False


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    job = run_tiny_job(root / "run")
    built = make_report([job], root / "report")
    assert built.index is not None
    return built.index


def test_matrix_is_in_the_rendered_dom(report: Path, tmp_path: Path) -> None:
    census = Census()
    census.feed(chromium(tmp_path / "profile", "--dump-dom", report.as_uri()))
    assert census.matrix_cells == 8 and census.matrix_links == 8


def test_test_page_plot_is_in_the_rendered_dom(report: Path, tmp_path: Path) -> None:
    page = next((report.parent / "tests").glob("*test_pass-anon.html"))
    census = Census()
    census.feed(chromium(tmp_path / "profile", "--dump-dom", page.as_uri()))
    assert census.svgs == 1
    assert census.polyline_points == [20, 20]
    # punch, convert, BALLOON_CHANGE, the H2 verdict, and the record of an unknown source
    assert census.marker_lines == 5


def test_screenshots_are_full_size_and_not_blank(report: Path, tmp_path: Path) -> None:
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    page = next((report.parent / "tests").glob("*test_fail-anon.html"))
    profile = tmp_path / "profile"
    # The control: a blank page must count as blank, or the check below proves nothing.
    assert screenshot(profile, blank, tmp_path / "blank.png")[2] < BLANK_BELOW
    for name, target in (("matrix.png", report), ("test.png", page)):
        width, height, distinct = screenshot(profile, target, tmp_path / name)
        assert (width, height) == (WIDTH, HEIGHT)
        assert distinct >= BLANK_BELOW, f"{name} looks blank ({distinct} distinct bytes)"

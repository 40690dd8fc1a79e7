"""Render a sample report in headless Chromium: it must draw, log no errors and fetch nothing.

Needs the ``playwright`` pip package and a system Chromium (``apt-get install -y chromium``).
Without them the test is skipped, unless ``TUNELAB_REQUIRE_BROWSER=1`` (set in CI), where a
missing browser is a failure. The screenshot is kept in the session's artifacts folder
(tests/conftest.py) for inspection.
"""

from __future__ import annotations

import importlib.util
import sys
import zlib
from pathlib import Path
from types import ModuleType

from tunelab.report import write_report

TESTS = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path) -> ModuleType:
    # Load helpers by path: tests/ is not a package, and this works under any import mode.
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


browser = _load("tunelab_tests_browser", TESTS / "browser.py")


def _png(path: Path, width: int, height: int, pixel: bytes) -> None:
    import struct

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + pixel * width for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(
        rows)) + chunk(b"IEND", b""))


def test_blank_png_detection(tmp_path: Path) -> None:
    blank = tmp_path / "blank.png"
    _png(blank, 8, 4, b"\xff\xff\xff")
    assert browser.is_blank_png(blank)
    assert browser.png_distinct_colours(blank) == 1


def test_external_url_classification() -> None:
    assert browser.is_external("https://fonts.googleapis.com/css")
    assert browser.is_external("http://example.com/x.png")
    for url in ("file:///tmp/x.html", "data:,", "about:blank", "http://127.0.0.1:8000/a",
                "http://localhost/x"):
        assert not browser.is_external(url), url


def test_report_renders_in_chromium(tmp_path: Path, artifacts: Path) -> None:
    browser.require_browser()
    sample = _load("tunelab_tests_report_html", Path(__file__).with_name("test_report_html.py"))
    html_path, _ = write_report(tmp_path / "run", sample.sample_report())
    result = browser.render_page(html_path, artifacts / "report.png")
    assert result.screenshot.is_file()
    assert not browser.is_blank_png(result.screenshot)
    assert result.console_errors == []
    assert result.external_requests == []


def test_browser_helper_sees_external_requests_and_errors(tmp_path: Path) -> None:
    # The negative control: a page that does fetch from the network and throws must be
    # caught, otherwise the test above proves nothing.
    browser.require_browser()
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><link rel="stylesheet" '
                    'href="https://cdn.example.com/x.css"></head><body><p>hi</p>'
                    '<img src="http://example.com/i.png"><script>throw new Error("boom")'
                    "</script></body></html>")
    result = browser.render_page(page, tmp_path / "bad.png")
    assert any("cdn.example.com" in u for u in result.external_requests)
    assert any("example.com/i.png" in u for u in result.external_requests)
    assert any("boom" in e for e in result.console_errors)

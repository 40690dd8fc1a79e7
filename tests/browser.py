"""Render a local HTML file (or URL) in headless Chromium for tests.

Uses the ``playwright`` Python package driving the *system* Chromium (``/usr/bin/chromium``
from apt, or ``$TUNELAB_CHROMIUM``); ``playwright install`` is never needed. Every request
to anything other than ``file:``, ``data:``, ``about:``, ``blob:``, ``127.0.0.1`` or
``localhost`` is recorded as external and aborted, so a test can assert a page is
self-contained without it ever reaching the network.

    result = render_page("runs/x/report.html", tmp_path / "report.png")
    assert not result.console_errors and not result.external_requests
    assert not is_blank_png(result.screenshot)
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
_LOCAL_SCHEMES = {"file", "data", "about", "blob", "chrome", "chrome-extension", "devtools"}
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def chromium_path() -> str | None:
    """The Chromium binary to drive: ``$TUNELAB_CHROMIUM``, else ``/usr/bin/chromium``, else
    ``chromium``/``chromium-browser`` on ``PATH``; ``None`` if there is none."""
    candidates = [os.environ.get("TUNELAB_CHROMIUM"), "/usr/bin/chromium"]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return shutil.which("chromium") or shutil.which("chromium-browser")


def require_browser(*needs: tuple[str, str]) -> None:
    """Skip (or, under ``TUNELAB_REQUIRE_BROWSER=1`` as in CI, fail) when the playwright
    package, Chromium or any of ``needs`` (``(module, what to install)`` pairs) is missing."""
    import importlib.util

    import pytest

    missing = [] if importlib.util.find_spec("playwright") else [
        "the playwright package (pip install playwright)"]
    if chromium_path() is None:
        missing.append("Chromium (apt-get install -y chromium)")
    missing += [what for module, what in needs if importlib.util.find_spec(module) is None]
    if missing:
        msg = "browser test needs " + " and ".join(missing)
        if os.environ.get("TUNELAB_REQUIRE_BROWSER") == "1":
            pytest.fail(msg)
        pytest.skip(msg)


def is_external(url: str) -> bool:
    """True for a URL that would leave this machine."""
    parsed = urlparse(url)
    if parsed.scheme in _LOCAL_SCHEMES:
        return False
    return (parsed.hostname or "") not in _LOCAL_HOSTS


@dataclass
class RenderResult:
    screenshot: Path
    console_errors: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)


def render_page(target: str | os.PathLike[str], screenshot: str | os.PathLike[str], *,
                width: int = 1280, height: int = 900, full_page: bool = True,
                timeout_ms: int = 30_000) -> RenderResult:
    """Load ``target`` (a local path or a URL), wait for the network to go idle, and save a
    PNG screenshot. Returns the screenshot path, console errors (``console.error`` messages
    and uncaught page exceptions) and the external requests that were attempted."""
    from playwright.sync_api import sync_playwright  # optional test dependency

    exe = chromium_path()
    if exe is None:
        raise RuntimeError("no Chromium found: apt-get install -y chromium, or set "
                           "TUNELAB_CHROMIUM")
    target_s = os.fspath(target)
    url = target_s if "://" in target_s else Path(target_s).resolve().as_uri()
    shot = Path(screenshot)
    shot.parent.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    external: list[str] = []

    def on_route(route) -> None:  # type: ignore[no-untyped-def]
        req_url = route.request.url
        if is_external(req_url):
            external.append(req_url)
            route.abort()
        else:
            route.continue_()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": width, "height": height})
            context.route("**/*", on_route)
            page = context.new_page()
            page.on("console", lambda msg: errors.append(msg.text)
                    if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
            page.on("requestfailed", lambda req: errors.append(
                f"request failed: {req.url} ({req.failure})") if not is_external(req.url)
                else None)
            page.goto(url, wait_until="networkidle", timeout=timeout_ms)
            page.screenshot(path=str(shot), full_page=full_page)
            context.close()
        finally:
            browser.close()
    return RenderResult(shot, errors, external)


# --------------------------------------------------------------------------------------------
# PNG inspection without Pillow
# --------------------------------------------------------------------------------------------

_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def png_distinct_colours(path: str | os.PathLike[str], limit: int = 2) -> int:
    """Count distinct pixel values in a non-interlaced 8-bit PNG, stopping at ``limit``.

    Decodes with ``zlib`` and undoes the five PNG scanline filters, which is enough for
    browser screenshots (8-bit RGB/RGBA, no interlace) without depending on Pillow.
    """
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    pos, idat = 8, []
    width = height = bit_depth = colour_type = interlace = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        ctype = data[pos + 4:pos + 8]
        chunk = data[pos + 8:pos + 8 + length]
        if ctype == b"IHDR":
            width, height, bit_depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB",
                                                                                 chunk)
        elif ctype == b"IDAT":
            idat.append(chunk)
        elif ctype == b"IEND":
            break
        pos += 12 + length
    if bit_depth != 8 or interlace != 0 or colour_type not in _CHANNELS:
        raise ValueError(f"{path}: only 8-bit non-interlaced PNGs are supported")
    bpp = _CHANNELS[colour_type]
    stride = width * bpp
    raw = zlib.decompress(b"".join(idat))
    prev = bytearray(stride)
    seen: set[bytes] = set()
    for y in range(height):
        base = y * (stride + 1)
        ftype = raw[base]
        line = bytearray(raw[base + 1:base + 1 + stride])
        if ftype == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif ftype == 2:
            for i in range(stride):
                line[i] = (line[i] + prev[i]) & 0xFF
        elif ftype == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif ftype == 4:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                up_left = prev[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + _paeth(left, prev[i], up_left)) & 0xFF
        for x in range(0, stride, bpp):
            seen.add(bytes(line[x:x + bpp]))
            if len(seen) >= limit:
                return len(seen)
        prev = line
    return len(seen)


def is_blank_png(path: str | os.PathLike[str]) -> bool:
    """True if every pixel of the PNG has the same colour."""
    return png_distinct_colours(path, limit=2) < 2

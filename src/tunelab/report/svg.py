"""Tiny inline-SVG charts for the HTML report: a line chart and a horizontal bar chart with
interval whiskers. No JavaScript, no external resources; every text node is escaped.

Styling is by CSS class (``series-*``, ``bar-*``, ``marker-*``) so the report's inline
stylesheet decides colours.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

# Above this many points a line is thinned by striding: a 900-px-wide chart cannot show
# more, and the file stays small for runs that log every step.
MAX_LINE_POINTS = 1500


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values covering ``[lo, hi]``: steps of 1, 2 or 5 times a power of ten."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(1, target)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    t = start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 12))
    return ticks


def fmt_tick(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 10000 or abs(v) < 0.001:
        return f"{v:.1e}"
    return f"{v:.4g}"


def _truncate(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


@dataclass
class Series:
    """A polyline: ``points`` are ``(x, y)``; ``dots`` draws a circle per point."""

    label: str
    points: Sequence[tuple[float, float]]
    css: str
    dots: bool = False


@dataclass
class VMarker:
    """A vertical line at ``x`` with a label (e.g. the best checkpoint)."""

    x: float
    label: str
    css: str


@dataclass
class Shade:
    """A shaded x-range (e.g. where overfitting starts)."""

    x0: float
    x1: float
    label: str
    css: str


def _thin(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    pts = list(points)
    if len(pts) <= MAX_LINE_POINTS:
        return pts
    stride = math.ceil(len(pts) / MAX_LINE_POINTS)
    thinned = pts[::stride]
    if thinned[-1] != pts[-1]:
        thinned.append(pts[-1])
    return thinned


def line_chart(series: Sequence[Series], *, title: str, x_label: str, y_label: str,
               markers: Sequence[VMarker] = (), shades: Sequence[Shade] = (),
               width: int = 900, height: int = 340) -> str:
    """An SVG line chart with axes, ticks, a legend, vertical markers and shaded ranges."""
    all_pts = [p for s in series for p in s.points]
    if not all_pts:
        return ""
    left, right, top, bottom = 64, 16, 28, 44
    pw, ph = width - left - right, height - top - bottom
    xs = [p[0] for p in all_pts] + [m.x for m in markers]
    ys = [p[1] for p in all_pts]
    xt = nice_ticks(min(xs), max(xs))
    yt = nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + ph - (y - y0) / (y1 - y0) * ph

    out = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" '
           f'height="{height}" role="img" aria-label="{_e(title)}">',
           f"<title>{_e(title)}</title>"]
    for sh in shades:
        a, b = sx(max(sh.x0, x0)), sx(min(sh.x1, x1))
        out.append(f'<rect class="{_e(sh.css)}" x="{a:.1f}" y="{top}" width="{max(0, b - a):.1f}"'
                   f' height="{ph}"><title>{_e(sh.label)}</title></rect>')
        out.append(f'<text class="shade-label" x="{a + 4:.1f}" y="{top + 14}">'
                   f"{_e(sh.label)}</text>")
    for t in yt:
        y = sy(t)
        out.append(f'<line class="grid" x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}"/>')
        out.append(f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
                   f"{_e(fmt_tick(t))}</text>")
    for t in xt:
        x = sx(t)
        out.append(f'<line class="tickmark" x1="{x:.1f}" x2="{x:.1f}" y1="{top + ph}" '
                   f'y2="{top + ph + 4}"/>')
        out.append(f'<text class="tick" x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">'
                   f"{_e(fmt_tick(t))}</text>")
    out.append(f'<rect class="frame" x="{left}" y="{top}" width="{pw}" height="{ph}"/>')
    for s in series:
        pts = _thin(s.points)
        if not pts:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline class="{_e(s.css)}" points="{path}"><title>{_e(s.label)}'
                   "</title></polyline>")
        if s.dots and len(pts) <= 300:
            for x, y in pts:
                out.append(f'<circle class="{_e(s.css)} dot" cx="{sx(x):.1f}" cy="{sy(y):.1f}" '
                           f'r="2.5"><title>{_e(s.label)} step {fmt_tick(x)}: {y:.4g}'
                           "</title></circle>")
    for m in markers:
        x = sx(m.x)
        out.append(f'<line class="{_e(m.css)}" x1="{x:.1f}" x2="{x:.1f}" y1="{top}" '
                   f'y2="{top + ph}"><title>{_e(m.label)}</title></line>')
        anchor = "end" if x > left + pw * 0.8 else "start"
        dx = -4 if anchor == "end" else 4
        out.append(f'<text class="marker-label" x="{x + dx:.1f}" y="{top + ph - 6}" '
                   f'text-anchor="{anchor}">{_e(m.label)}</text>')
    # Legend along the top edge.
    lx = left
    for s in series:
        out.append(f'<line class="{_e(s.css)}" x1="{lx}" x2="{lx + 18}" y1="14" y2="14"/>')
        out.append(f'<text class="legend" x="{lx + 22}" y="18">{_e(s.label)}</text>')
        lx += 30 + 7 * len(s.label)
    out.append(f'<text class="axis-label" x="{left + pw / 2:.1f}" y="{height - 6}" '
               f'text-anchor="middle">{_e(x_label)}</text>')
    out.append(f'<text class="axis-label" transform="translate(14 {top + ph / 2:.1f}) '
               f'rotate(-90)" text-anchor="middle">{_e(y_label)}</text>')
    out.append("</svg>")
    return "\n".join(out)


@dataclass
class Bar:
    """One bar: ``value`` with optional interval ``[low, high]`` drawn as a whisker."""

    label: str
    value: float
    low: float | None = None
    high: float | None = None
    css: str = "bar"


def bar_chart(bars: Sequence[Bar], *, title: str, domain: tuple[float, float] | None = None,
              width: int = 900, row_height: int = 30, label_width: int = 240,
              value_digits: int = 2) -> str:
    """Horizontal bars from 0 to ``value`` with whiskers for ``[low, high]``.

    ``domain`` fixes the value axis (e.g. ``(0, 1)`` for scores); by default it covers 0 and
    every value and interval end, so negative deltas get bars to the left of a zero line.
    """
    if not bars:
        return ""
    vals = [0.0]
    for b in bars:
        vals += [v for v in (b.value, b.low, b.high) if v is not None and math.isfinite(v)]
    if domain is None:
        ticks = nice_ticks(min(vals), max(vals))
        d0, d1 = ticks[0], ticks[-1]
    else:
        d0, d1 = domain
        ticks = [t for t in nice_ticks(d0, d1) if d0 - 1e-12 <= t <= d1 + 1e-12]
    top, bottom, right = 10, 34, 56
    pw = width - label_width - right
    height = top + bottom + row_height * len(bars)

    def sx(v: float) -> float:
        v = min(max(v, d0), d1)
        return label_width + (v - d0) / (d1 - d0) * pw

    out = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" '
           f'height="{height}" role="img" aria-label="{_e(title)}">',
           f"<title>{_e(title)}</title>"]
    axis_y = top + row_height * len(bars)
    for t in ticks:
        x = sx(t)
        out.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{axis_y}"/>')
        out.append(f'<text class="tick" x="{x:.1f}" y="{axis_y + 16}" text-anchor="middle">'
                   f"{_e(fmt_tick(t))}</text>")
    zero = sx(0.0)
    for i, b in enumerate(bars):
        yc = top + row_height * i + row_height / 2
        bh = row_height * 0.6
        v = b.value if math.isfinite(b.value) else 0.0
        a, c = sorted((zero, sx(v)))
        interval = ""
        if b.low is not None and b.high is not None:
            interval = f" [{b.low:.{value_digits}f}, {b.high:.{value_digits}f}]"
        tip = f"{b.label}: {b.value:.{value_digits}f}{interval}"
        short = _truncate(b.label, label_width // 7)  # ~7 px per character at 12 px
        out.append(f'<text class="bar-label" x="{label_width - 8}" y="{yc + 4:.1f}" '
                   f'text-anchor="end">{_e(short)}<title>{_e(b.label)}</title></text>')
        out.append(f'<rect class="{_e(b.css)}" x="{a:.1f}" y="{yc - bh / 2:.1f}" '
                   f'width="{max(c - a, 0.5):.1f}" height="{bh:.1f}"><title>{_e(tip)}</title>'
                   "</rect>")
        end = sx(v)
        if b.low is not None and b.high is not None:
            lo, hi = sx(b.low), sx(b.high)
            out.append(f'<line class="whisker" x1="{lo:.1f}" x2="{hi:.1f}" y1="{yc:.1f}" '
                       f'y2="{yc:.1f}"/>')
            for x in (lo, hi):
                out.append(f'<line class="whisker" x1="{x:.1f}" x2="{x:.1f}" '
                           f'y1="{yc - 6:.1f}" y2="{yc + 6:.1f}"/>')
            end = max(end, hi)
        out.append(f'<text class="bar-value" x="{end + 6:.1f}" y="{yc + 4:.1f}">'
                   f"{_e(f'{b.value:.{value_digits}f}')}</text>")
    out.append(f'<line class="zero" x1="{zero:.1f}" x2="{zero:.1f}" y1="{top}" '
               f'y2="{axis_y}"/>')
    out.append("</svg>")
    return "\n".join(out)


def scatter_chart(points: dict[str, tuple[float, float]], *, title: str, x_label: str,
                  y_label: str, line: Sequence[tuple[float, float]] = (),
                  highlight: str | None = None, width: int = 900, height: int = 380) -> str:
    """Labelled points ``{label: (x, y)}``, an optional polyline through ``line`` (e.g. a
    Pareto frontier) and one highlighted point."""
    if not points:
        return ""
    left, right, top, bottom = 64, 24, 28, 44
    pw, ph = width - left - right, height - top - bottom
    xs = [p[0] for p in points.values()] + [0.0]
    ys = [p[1] for p in points.values()]
    xt, yt = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def sx(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1.0) * pw

    def sy(y: float) -> float:
        return top + ph - (y - y0) / ((y1 - y0) or 1.0) * ph

    out = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" '
           f'height="{height}" role="img" aria-label="{_e(title)}">',
           f"<title>{_e(title)}</title>"]
    for t in xt:
        out.append(f'<line class="grid" x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{top}" '
                   f'y2="{top + ph}"/><text class="tick" x="{sx(t):.1f}" y="{top + ph + 16}" '
                   f'text-anchor="middle">{_e(fmt_tick(t))}</text>')
    for t in yt:
        out.append(f'<line class="grid" x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" '
                   f'y2="{sy(t):.1f}"/><text class="tick" x="{left - 6}" y="{sy(t) + 4:.1f}" '
                   f'text-anchor="end">{_e(fmt_tick(t))}</text>')
    out.append(f'<line class="zero" x1="{sx(0.0):.1f}" x2="{sx(0.0):.1f}" y1="{top}" '
               f'y2="{top + ph}"/>')
    if len(line) > 1:
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in sorted(line))
        out.append(f'<polyline class="series-0" fill="none" points="{path}"/>')
    for label, (x, y) in points.items():
        css = "marker-best" if label == highlight else "marker"
        out.append(f'<circle class="{css}" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5">'
                   f"<title>{_e(label)}: ({x:.3f}, {y:.3f})</title></circle>"
                   f'<text class="tick" x="{sx(x) + 8:.1f}" y="{sy(y) - 6:.1f}">'
                   f"{_e(_truncate(label, 32))}</text>")
    out.append(f'<text class="axis-label" x="{left + pw / 2:.1f}" y="{height - 6}" '
               f'text-anchor="middle">{_e(x_label)}</text>')
    out.append(f'<text class="axis-label" x="14" y="{top + ph / 2:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 14 {top + ph / 2:.1f})">{_e(y_label)}</text>')
    out.append("</svg>")
    return "\n".join(out)

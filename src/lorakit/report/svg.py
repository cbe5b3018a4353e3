"""Charts as inline SVG strings: line charts and horizontal bar charts, no JavaScript, no libraries.

The output is plain SVG 1.1 markup meant to be pasted into an HTML page, so a report is one
self-contained file that any browser draws offline. Every drawn series is a `<polyline
class="series">` (markers are `<circle class="point">`, bars `<rect class="bar">`) so tests can find
them in the DOM.

Coordinates: data (x, y) maps to pixels by
    px = left + (x - x0) / (x1 - x0) * plot_w,   py = top + (1 - (y - y0) / (y1 - y0)) * plot_h
where [x0, x1] x [y0, y1] is the data range widened to "nice" tick values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape
from typing import Optional, Sequence

# Matplotlib's "tab10" colour cycle (matplotlib/_cm.py): distinct, colour-blind-friendlier hues.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
MARGIN = {"left": 64, "right": 16, "top": 30, "bottom": 44}  # px around the plot area
FONT = 'font-family="sans-serif" font-size="11"'


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]
    color: Optional[str] = None
    markers: bool = False
    line: bool = True
    dashed: bool = False
    labels: list[str] = field(default_factory=list)  # optional text beside each marker


def standalone(svg: str) -> str:
    """The chart as a file of its own (.svg): outside HTML, SVG needs its XML namespace."""
    return svg.replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1) + "\n"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi] (steps of 1, 2, 2.5 or 5 x 10^k)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi <= lo:
        pad = abs(lo) * 0.05 or 0.5
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks, t = [], first
    while t < hi + step * 0.5:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def fmt_tick(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.6g}"


class _Frame:
    """The plot area of one chart and its data -> pixel mapping."""

    def __init__(self, width: int, height: int, xr: tuple[float, float], yr: tuple[float, float], log_x: bool):
        self.w, self.h, self.log_x = width, height, log_x
        self.left, self.top = MARGIN["left"], MARGIN["top"]
        self.pw = width - MARGIN["left"] - MARGIN["right"]
        self.ph = height - MARGIN["top"] - MARGIN["bottom"]
        self.xr, self.yr = xr, yr

    def _tx(self, x: float) -> float:
        return math.log2(x) if self.log_x else x

    def px(self, x: float) -> float:
        a, b = self._tx(self.xr[0]), self._tx(self.xr[1])
        return self.left + (self._tx(x) - a) / ((b - a) or 1.0) * self.pw

    def py(self, y: float) -> float:
        a, b = self.yr
        return self.top + (1.0 - (y - a) / ((b - a) or 1.0)) * self.ph


def _finite(points) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in points
            if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]


def _axes(f: _Frame, xticks: Sequence[float], yticks: Sequence[float], xlabel: str, ylabel: str) -> list[str]:
    out = [f'<rect x="{f.left}" y="{f.top}" width="{f.pw}" height="{f.ph}" fill="#fff" stroke="#999"/>']
    for t in yticks:
        y = f.py(t)
        out.append(f'<line x1="{f.left}" y1="{y:.1f}" x2="{f.left + f.pw}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{f.left - 6}" y="{y + 4:.1f}" text-anchor="end" {FONT}>{fmt_tick(t)}</text>')
    for t in xticks:
        x = f.px(t)
        out.append(f'<line x1="{x:.1f}" y1="{f.top}" x2="{x:.1f}" y2="{f.top + f.ph}" stroke="#f0f0f0"/>')
        out.append(f'<text x="{x:.1f}" y="{f.top + f.ph + 15}" text-anchor="middle" {FONT}>{fmt_tick(t)}</text>')
    out.append(f'<text x="{f.left + f.pw / 2:.1f}" y="{f.h - 8}" text-anchor="middle" {FONT}>{escape(xlabel)}</text>')
    cy = f.top + f.ph / 2
    out.append(f'<text x="14" y="{cy:.1f}" text-anchor="middle" transform="rotate(-90 14 {cy:.1f})" {FONT}>'
               f'{escape(ylabel)}</text>')
    return out


def _legend(f: _Frame, series: Sequence[Series]) -> list[str]:
    out, x = [], f.left + 4
    for s in series:
        out.append(f'<rect x="{x}" y="8" width="12" height="12" fill="{s.color}"/>')
        out.append(f'<text x="{x + 16}" y="18" {FONT}>{escape(s.name)}</text>')
        x += 26 + 7 * len(s.name)
    return out


def line_chart(series: Sequence[Series], title: str, xlabel: str, ylabel: str, width: int = 560,
               height: int = 300, log_x: bool = False, xticks: Optional[Sequence[float]] = None) -> str:
    """An SVG line chart of every series (empty series are listed in the legend but not drawn)."""
    series = [Series(s.name, _finite(s.points), s.color or PALETTE[i % len(PALETTE)], s.markers, s.line, s.dashed,
                     s.labels) for i, s in enumerate(series)]
    pts = [p for s in series for p in s.points if not log_x or p[0] > 0]
    empty_x = [1.0, 2.0] if log_x else [0.0, 1.0]  # no data: an empty frame (log axes need x > 0)
    xs, ys = [p[0] for p in pts] or list(xticks or empty_x), [p[1] for p in pts] or [0.0, 1.0]
    yticks = nice_ticks(min(ys), max(ys))
    if xticks is None:
        xticks = sorted(set(xs)) if log_x else nice_ticks(min(xs), max(xs))
    xr = (min(min(xs), *xticks), max(max(xs), *xticks))
    if log_x:  # a quarter octave of room each side, so end markers and their labels stay inside
        xr = (xr[0] / 2 ** 0.25, xr[1] * 2 ** 0.25)
    f = _Frame(width, height, xr, (yticks[0], yticks[-1]), log_x)
    out = [f'<svg class="chart" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img"><title>{escape(title)}</title>']
    out += _axes(f, xticks, yticks, xlabel, ylabel) + _legend(f, series)
    for s in series:
        coords = " ".join(f"{f.px(x):.1f},{f.py(y):.1f}" for x, y in s.points if not log_x or x > 0)
        if s.line and len(s.points) > 1:
            dash = ' stroke-dasharray="5 3"' if s.dashed else ""
            out.append(f'<polyline class="series" data-name="{escape(s.name)}" points="{coords}" fill="none" '
                       f'stroke="{s.color}" stroke-width="2"{dash}/>')
        if s.markers or len(s.points) == 1:
            for i, (x, y) in enumerate(s.points):
                out.append(f'<circle class="point" cx="{f.px(x):.1f}" cy="{f.py(y):.1f}" r="3.5" fill="{s.color}">'
                           f'<title>{escape(s.name)}: ({fmt_tick(x)}, {y:.4g})</title></circle>')
                if i < len(s.labels) and s.labels[i]:
                    out.append(f'<text x="{f.px(x) + 6:.1f}" y="{f.py(y) - 6:.1f}" {FONT}>{escape(s.labels[i])}</text>')
    out.append("</svg>")
    return "\n".join(out)


def bar_chart(rows: Sequence[tuple[str, Sequence[Optional[float]]]], legend: Sequence[str], title: str,
              unit: str, width: int = 640) -> str:
    """Horizontal grouped bars: rows of (label, values per legend entry); None values are skipped."""
    bar_h, gap, label_w = 14, 10, 150
    height = MARGIN["top"] + len(rows) * (bar_h * len(legend) + gap) + MARGIN["bottom"]
    values = [v for _, vs in rows for v in vs if v is not None and math.isfinite(v)] or [1.0]
    ticks = nice_ticks(0.0, max(values))
    plot_w = width - label_w - MARGIN["right"]
    scale = plot_w / (ticks[-1] or 1.0)
    out = [f'<svg class="chart" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img"><title>{escape(title)}</title>']
    x = label_w
    for i, name in enumerate(legend):
        out.append(f'<rect x="{x}" y="8" width="12" height="12" fill="{PALETTE[i % len(PALETTE)]}"/>')
        out.append(f'<text x="{x + 16}" y="18" {FONT}>{escape(name)}</text>')
        x += 26 + 7 * len(name)
    bottom = height - MARGIN["bottom"]
    for t in ticks:
        tx = label_w + t * scale
        out.append(f'<line x1="{tx:.1f}" y1="{MARGIN["top"]}" x2="{tx:.1f}" y2="{bottom}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{tx:.1f}" y="{bottom + 15}" text-anchor="middle" {FONT}>{fmt_tick(t)}</text>')
    out.append(f'<text x="{label_w + plot_w / 2:.1f}" y="{height - 8}" text-anchor="middle" {FONT}>{escape(unit)}</text>')
    y = MARGIN["top"]
    for label, vs in rows:
        out.append(f'<text x="{label_w - 6}" y="{y + bar_h * len(legend) / 2 + 4:.1f}" text-anchor="end" {FONT}>'
                   f'{escape(label)}</text>')
        for i, v in enumerate(vs):
            if v is not None and math.isfinite(v):
                out.append(f'<rect class="bar" x="{label_w}" y="{y}" width="{max(v * scale, 1):.1f}" height="{bar_h - 2}" '
                           f'fill="{PALETTE[i % len(PALETTE)]}"><title>{escape(label)} {escape(legend[i])}: '
                           f'{v:.4g} {escape(unit)}</title></rect>')
            y += bar_h
        y += gap
    out.append("</svg>")
    return "\n".join(out)

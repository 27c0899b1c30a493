"""Inline SVG charts for the report: grouped horizontal bars with interval whiskers, and a curve.

Labels never sit on a bar or a whisker: each value label starts to the right of the larger of
the bar's end and its whisker's end, rows are further apart than a label is tall, and group and
series names live in the left margin. Elements carry classes the report test measures in a
browser: `bar`, `whisker`, `label` (value labels), `axis-label`.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape
from typing import Any, Sequence

PALETTE = ("#4a7bd0", "#d0774a", "#4aa06b", "#9b59b6", "#c9a227", "#5a6b7d", "#c0392b", "#16a085")
LEFT, PLOT, RIGHT = 190, 420, 170  # px: names, bars, value labels
ROW, BAR, GROUP_GAP, TOP = 18, 12, 22, 28  # row pitch, bar height, space above each group's heading, title room


@dataclass(frozen=True)
class Series:
    """One coloured series of a bar chart (a condition)."""

    name: str
    colour: str


def series_for(names: Sequence[str]) -> list[Series]:
    """One colour per name, in order."""
    return [Series(name, PALETTE[i % len(PALETTE)]) for i, name in enumerate(names)]


def _format(value: float, percent: bool) -> str:
    return f"{100 * value:.0f}%" if percent else f"{value:.3g}"


def _value_label(estimate: dict[str, Any], percent: bool) -> str:
    ci, n = estimate.get("ci"), estimate.get("n", 0)
    low, high = (_format(v, percent).rstrip("%") for v in ci) if ci else ("", "")
    interval = f" [{low}-{high}]" if ci else ""
    return f"{_format(estimate['value'], percent)}{interval} n={n}"


def _bar_row(y: float, series: Series, estimate: dict[str, Any] | None, scale: float, percent: bool) -> str:
    """The series name, the bar, its whisker and the value label of one row centred at y."""
    parts = [f'<text class="axis-label" x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">{escape(series.name)}</text>']
    if not estimate or estimate.get("value") is None:
        return "".join(parts) + f'<text class="label" x="{LEFT + 6}" y="{y + 4:.1f}">no data</text>'
    value, ci = estimate["value"], estimate.get("ci")
    width = max(0.0, min(value, scale)) / scale * PLOT
    parts.append(f'<rect class="bar" x="{LEFT}" y="{y - BAR / 2:.1f}" width="{width:.1f}" height="{BAR}" '
                 f'fill="{series.colour}"><title>{escape(series.name)}: {escape(_value_label(estimate, percent))}'
                 '</title></rect>')
    end = width
    if ci:
        low, high = (LEFT + max(0.0, min(v, scale)) / scale * PLOT for v in ci)
        parts.append(f'<path class="whisker" d="M{low:.1f},{y:.1f}H{high:.1f}M{low:.1f},{y - 4:.1f}V{y + 4:.1f}'
                     f'M{high:.1f},{y - 4:.1f}V{y + 4:.1f}" stroke="#1b2f57" stroke-width="1.5" fill="none"/>')
        end = max(end, high - LEFT)
    parts.append(f'<text class="label" x="{LEFT + end + 6:.1f}" y="{y + 4:.1f}">'
                 f'{escape(_value_label(estimate, percent))}</text>')
    return "".join(parts)


def bar_chart(title: str, groups: Sequence[tuple[str, dict[str, dict[str, Any] | None]]], series: Sequence[Series],
              *, percent: bool = True, scale: float = 1.0, chart_id: str = "") -> str:
    """Horizontal bars: per group a heading, then one bar (with its 95% whisker) per series."""
    body, y = [], TOP
    for group, estimates in groups:
        y += GROUP_GAP
        body.append(f'<text class="group-label" x="8" y="{y - 6:.1f}" font-weight="bold">{escape(group)}</text>')
        for entry in series:
            body.append(_bar_row(y + ROW / 2, entry, estimates.get(entry.name), scale, percent))
            y += ROW
    height = y + 24
    axis = "".join(f'<line x1="{LEFT + PLOT * t:.1f}" y1="{TOP}" x2="{LEFT + PLOT * t:.1f}" y2="{y:.1f}" '
                   f'stroke="#e2e2e2"/><text class="tick" x="{LEFT + PLOT * t:.1f}" y="{y + 14:.1f}" '
                   f'text-anchor="middle">{escape(_format(scale * t, percent))}</text>' for t in (0, 0.25, 0.5, 0.75, 1))
    width = LEFT + PLOT + RIGHT
    return (f'<figure class="chart" id="{escape(chart_id)}"><svg xmlns="http://www.w3.org/2000/svg" '
            f'width="{width}" height="{height:.0f}" viewBox="0 0 {width} {height:.0f}" font-size="11" '
            f'font-family="system-ui,sans-serif"><text x="8" y="16" font-size="13" font-weight="bold">'
            f'{escape(title)}</text>{axis}{"".join(body)}</svg></figure>')


def curve_chart(title: str, points: Sequence[tuple[float, float, str]], x_title: str, y_title: str,
                chart_id: str = "") -> str:
    """A line through (x, y) points in order, each marked and labelled (e.g. by merge scale)."""
    width, height, margin = 560, 320, 56
    xs, ys = [p[0] for p in points], [p[1] for p in points]

    def span(values: Sequence[float]) -> tuple[float, float]:
        low, high = min(values), max(values)
        return (low - 0.5, high + 0.5) if low == high else (low - 0.05 * (high - low), high + 0.05 * (high - low))

    (x0, x1), (y0, y1) = span(xs), span(ys)
    px = [margin + (x - x0) / (x1 - x0) * (width - 2 * margin) for x in xs]
    py = [height - margin - (y - y0) / (y1 - y0) * (height - 2 * margin) for y in ys]
    path = "M" + "L".join(f"{a:.1f},{b:.1f}" for a, b in zip(px, py))
    marks = "".join(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="4" fill="#4a7bd0"/><text class="point-label" '
                    f'x="{a + 7:.1f}" y="{b - 7:.1f}">{escape(label)}</text>'
                    for a, b, (_, _, label) in zip(px, py, points))
    return (f'<figure class="chart" id="{escape(chart_id)}"><svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}" font-size="11" font-family="system-ui,sans-serif">'
            f'<text x="8" y="16" font-size="13" font-weight="bold">{escape(title)}</text>'
            f'<line x1="{margin}" y1="{height - margin}" x2="{width - margin}" y2="{height - margin}" stroke="#888"/>'
            f'<line x1="{margin}" y1="{margin}" x2="{margin}" y2="{height - margin}" stroke="#888"/>'
            f'<text x="{width / 2}" y="{height - 16}" text-anchor="middle">{escape(x_title)} '
            f'({x0:.3g} to {x1:.3g})</text><text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" '
            f'text-anchor="middle">{escape(y_title)} ({y0:.3g} to {y1:.3g})</text>'
            f'<path d="{path}" stroke="#4a7bd0" stroke-width="2" fill="none"/>{marks}</svg></figure>')

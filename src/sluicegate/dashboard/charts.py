"""Server-rendered SVG charts: stacked bars over time, and sparklines. No JavaScript needed.

Every bar segment carries ``data-key``/``data-bucket``/``data-value`` attributes and a
``<title>`` (the browser's tooltip), so the numbers behind a chart are readable by people and
by tests alike. Colours come from a palette that stays distinguishable for colour-blind readers
(Okabe–Ito, extended).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape

from markupsafe import Markup

PALETTE = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#56B4E9",
    "#D55E00",
    "#F0E442",
    "#6A3D9A",
    "#8C564B",
    "#17BECF",
)
OTHER_COLOUR = "#9AA5B1"


def safe(markup: str) -> Markup:
    """Mark SVG built by this module as safe for templates: every value in it is escaped."""
    return Markup(markup)  # noqa: S704 - built here, each interpolated value escaped


def colour(i: int, key: str) -> str:
    return OTHER_COLOUR if key == "(other)" else PALETTE[i % len(PALETTE)]


def short_number(value: float) -> str:
    """1234 → 1.2K, 5_600_000 → 5.6M (for axes)."""
    for limit, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= limit:
            text = f"{value / limit:.1f}".rstrip("0").rstrip(".")
            return text + suffix
    return f"{value:g}" if value == int(value) else f"{value:.2f}"


def nice_ceiling(value: float) -> float:
    """The smallest 1/2/2.5/5 x 10^n at or above ``value`` (an axis maximum)."""
    if value <= 0:
        return 1.0
    exp = math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        candidate = step * 10**exp
        if candidate >= value:
            return float(candidate)
    return float(10 ** (exp + 1))


def bucket_label(t: float, granularity: str, short: bool = False) -> str:
    d = datetime.fromtimestamp(t, UTC)
    if granularity == "hour":
        return d.strftime("%H:00") if short and d.hour else d.strftime("%d %b %H:00")
    if granularity == "month":
        return d.strftime("%b %Y")
    return d.strftime("%d %b")


@dataclass(frozen=True, slots=True)
class ChartSeries:
    key: str
    label: str
    values: Sequence[float]


def stacked_bars(
    buckets: Sequence[float],
    series: Sequence[ChartSeries],
    *,
    granularity: str,
    unit: str,
    fmt: Callable[[float], str],
    axis_fmt: Callable[[float, float], str] | None = None,
    width: int = 960,
    height: int = 280,
    chart_id: str = "chart",
) -> str:
    """An SVG stacked bar chart (already escaped markup)."""
    left, right, top, bottom = 72, 12, 26, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    n = max(len(buckets), 1)
    stacks = [sum(s.values[i] for s in series) for i in range(len(buckets))]
    y_max = nice_ceiling(max(stacks, default=0))
    out = [
        f'<svg class="chart" id="{escape(chart_id)}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{escape(unit)} per {escape(granularity)}" '
        f'preserveAspectRatio="xMidYMid meet">'
    ]
    for i in range(5):
        value = y_max * i / 4
        y = top + plot_h - plot_h * i / 4
        out.append(
            f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="axis" x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">'
            f"{escape(axis_fmt(value, y_max) if axis_fmt else short_number(value))}</text>"
        )
    out.append(
        f'<text class="axis unit" x="{left}" y="{top - 12}" text-anchor="start">'
        f"{escape(unit)}</text>"
    )
    slot = plot_w / n
    bar_w = max(1.0, min(slot * 0.72, 48))
    label_every = max(1, math.ceil(n / (8 if granularity == "hour" else 12)))
    for i, t in enumerate(buckets):
        x = left + slot * i + (slot - bar_w) / 2
        y_base = float(top + plot_h)
        for j, s in enumerate(series):
            v = s.values[i]
            if v <= 0:
                continue
            h = plot_h * v / y_max
            y_base -= h
            when = bucket_label(t, granularity)
            out.append(
                f'<rect class="bar" x="{x:.1f}" y="{y_base:.1f}" width="{bar_w:.1f}" '
                f'height="{max(h, 0.5):.1f}" fill="{colour(j, s.key)}" '
                f'data-key="{escape(s.key)}" data-bucket="{int(t)}" data-value="{v:g}">'
                f"<title>{escape(s.label)} · {escape(when)}: {escape(fmt(v))}</title></rect>"
            )
        if i % label_every == 0:
            cx = left + slot * i + slot / 2
            label = bucket_label(t, granularity, short=i > 0)
            out.append(
                f'<text class="axis" x="{cx:.1f}" y="{height - 10}" text-anchor="middle">'
                f"{escape(label)}</text>"
            )
    out.append(
        f'<line class="baseline" x1="{left}" x2="{width - right}" '
        f'y1="{top + plot_h}" y2="{top + plot_h}"/>'
    )
    if not any(stacks):
        out.append(
            f'<text class="empty" x="{left + plot_w / 2}" y="{top + plot_h / 2}" '
            'text-anchor="middle">No usage in this period</text>'
        )
    out.append("</svg>")
    return "".join(out)


def sparkline(values: Sequence[float], width: int = 120, height: int = 28) -> str:
    """A tiny line of daily values (already escaped markup)."""
    if not values:
        return ""
    top = max(max(values), 1)
    step = width / max(len(values) - 1, 1)
    points = " ".join(
        f"{i * step:.1f},{height - 2 - (height - 4) * v / top:.1f}" for i, v in enumerate(values)
    )
    return (
        f'<svg class="spark" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'aria-hidden="true"><polyline points="{points}"/></svg>'
    )

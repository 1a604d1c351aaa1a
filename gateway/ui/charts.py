"""Small SVG line charts drawn on the server: no chart library, no build step.

Pure: samples in, SVG text out (escaped; every number formatted by us).
"""
from __future__ import annotations

from html import escape
from typing import Sequence

W, H = 560, 160
PAD_L, PAD_R, PAD_T, PAD_B = 48, 12, 14, 22


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    magnitude = 10 ** (len(str(int(v))) - 1) if v >= 1 else 10 ** -(len(f"{v:.10f}".split(".")[1].rstrip("0")) - 1)
    for step in (1, 2, 2.5, 5, 10):
        if v <= step * magnitude:
            return step * magnitude
    return 10 * magnitude


def _fmt(v: float) -> str:
    return f"{v:g}" if v >= 1 else f"{v:.2g}"


def line_chart(title: str, unit: str, xs: Sequence[float], series: Sequence[tuple[str, str, Sequence[float | None]]],
               chart_id: str) -> str:
    """`series`: (name, CSS colour, values aligned with `xs`); None leaves a gap.
    x is minutes relative to now (e.g. -59..0)."""
    values = [v for _, _, vs in series for v in vs if v is not None]
    top = _nice_max(max(values) if values else 0.0)
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    span = (x1 - x0) or 1.0
    iw, ih = W - PAD_L - PAD_R, H - PAD_T - PAD_B

    def px(x: float) -> float:
        return PAD_L + (x - x0) / span * iw

    def py(v: float) -> float:
        return PAD_T + ih - (v / top) * ih

    parts = [f'<svg id="{escape(chart_id)}" class="chart" viewBox="0 0 {W} {H}" role="img" '
             f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="{PAD_L}" y="10" class="chart-title">{escape(title)}</text>']
    for frac in (0.0, 0.5, 1.0):
        y = py(top * frac)
        parts.append(f'<line x1="{PAD_L}" y1="{y:.1f}" x2="{W - PAD_R}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{PAD_L - 4}" y="{y + 3:.1f}" class="axis" text-anchor="end">'
                     f'{escape(_fmt(top * frac))}{escape(unit)}</text>')
    for x in (x0, (x0 + x1) / 2, x1):
        label = "now" if x == x1 else f"{x:g} min"
        parts.append(f'<text x="{px(x):.1f}" y="{H - 6}" class="axis" text-anchor="middle">{escape(label)}</text>')
    legend_x = W - PAD_R
    for name, colour, vs in reversed(series):
        legend_x -= 8 + 7 * len(name)
        parts.append(f'<text x="{legend_x:.0f}" y="10" class="legend" fill="{escape(colour)}">{escape(name)}</text>')
        runs: list[list[str]] = [[]]
        for x, v in zip(xs, vs):
            if v is None:
                if runs[-1]:
                    runs.append([])
                continue
            runs[-1].append(f"{px(x):.1f},{py(v):.1f}")
        for run in runs:
            if len(run) == 1:
                cx, cy = run[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{escape(colour)}"/>')
            elif run:
                parts.append(f'<polyline fill="none" stroke="{escape(colour)}" stroke-width="1.5" '
                             f'points="{" ".join(run)}"/>')
    if not values:
        parts.append(f'<text x="{W / 2:.0f}" y="{H / 2:.0f}" class="empty" text-anchor="middle">'
                     'no requests in the last hour</text>')
    parts.append("</svg>")
    return "".join(parts)


def history_charts(history: list[dict], now: float) -> tuple[str, str]:
    """(latency chart, request-rate chart) over the controller's per-minute samples."""
    xs = [round((h["t"] - now) / 60.0) for h in history]
    latency = line_chart("latency (ms, per minute)", "", xs, [
        ("p50", "#2b8a3e", [h["p50"] for h in history]),
        ("p95", "#e67700", [h["p95"] for h in history]),
        ("p99", "#c92a2a", [h["p99"] for h in history])], "chart-latency")
    rate = line_chart("requests per second (per minute)", "", xs, [
        ("req/s", "#1c7ed6", [h["requests_per_s"] for h in history]),
        ("errors/s", "#c92a2a", [round(h["requests_per_s"] * h["error_rate"], 3) for h in history])],
        "chart-rate")
    return latency, rate

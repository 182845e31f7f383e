"""Server-rendered SVG charts: no script and nothing external is needed to see them.

Every piece of text that reaches the SVG goes through `esc` (team names are user input).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from fedtune.leaderboard.entry import BYTES_PER_GB, Entry, format_gb
from fedtune.leaderboard.reference import ReferenceRow


def esc(value: object) -> str:
    """Escape text for HTML/SVG content and attribute values."""
    return escape(str(value), quote=True)


def _nice_max(value: float) -> float:
    """A round axis maximum at or above `value` (1, 2 or 5 × 10^k)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * power:
            return step * power
    return 10 * power


def _fmt_gb_tick(gb: float) -> str:
    return f"{gb:g} GB"


def score_vs_cost(
    entries: Sequence[Entry],
    front: Sequence[Entry],
    references: Sequence[ReferenceRow] = (),
    *,
    compact: bool = False,
) -> str:
    """Average against communication cost (log scale), with the Pareto front as a staircase.

    Each point links to its entry page; constant-answer references are a band (A…D) with a line at
    the best of them, since they cost no communication and have no place on a log axis. The
    Pareto front's points are labelled with their team. `compact`: the phone layout — a narrow
    chart whose text stays readable at 390 px, bigger points to tap, the legend on two rows.
    """
    suffix = "-compact" if compact else ""
    if compact:
        width, height = 420, 430
        left, right, top, bottom = 46, 14, 62, 52
    else:
        width, height = 880, 380
        left, right, top, bottom = 60, 150, 34, 52
    plot_w, plot_h = width - left - right, height - top - bottom
    points = [e for e in entries if e.comm_bytes > 0]
    gbs = [e.comm_bytes / BYTES_PER_GB for e in points] or [1.0]
    lo = math.floor(math.log10(min(gbs)))
    hi = math.ceil(math.log10(max(gbs)))
    if hi == lo:
        hi += 1
    y_max = _nice_max(max([e.average for e in points] + [r.average for r in references] + [10.0]))
    y_max = min(100.0, math.ceil(y_max / 10) * 10)

    def x_of_gb(gb: float) -> float:
        return left + (math.log10(gb) - lo) / (hi - lo) * plot_w

    def x_of(num_bytes: int) -> float:
        return x_of_gb(num_bytes / BYTES_PER_GB)

    # A decade label at most every ~70 px (bytes from 1 to 10^19 span 28 decades of GB).
    label_every = max(1, math.ceil((hi - lo) * (90 if compact else 70) / plot_w))

    def y_of(average: float) -> float:
        return top + (1 - average / y_max) * plot_h

    parts = [
        f'<svg id="score-chart{suffix}" class="chart{" compact" if compact else ""}" '
        f'viewBox="0 0 {width} {height}" role="img" '
        f'aria-labelledby="score-chart-title{suffix}" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="score-chart-title{suffix}">Average against communication cost (log scale); '
        "the Pareto front is the staircase</title>",
    ]
    # Grid: every 10 points of Average, every decade (and its 2…9 multiples) of GB.
    for tick in range(0, int(y_max) + 1, 10):
        y = y_of(tick)
        parts.append(
            f'<line class="grid" x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}"/>'
        )
        parts.append(
            f'<text class="tick" x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{tick}</text>'
        )
    for decade in range(lo, hi + 1):
        for multiple in range(1, 10):
            gb = multiple * 10.0**decade
            if not 10.0**lo <= gb <= 10.0**hi:
                continue
            if multiple > 1 and label_every > 1:
                continue  # minor lines only while decades are wide enough to hold them
            x = x_of_gb(gb)
            css = "grid major" if multiple == 1 else "grid minor"
            parts.append(
                f'<line class="{css}" x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}"/>'
            )
            if multiple == 1 and (decade - lo) % label_every == 0:
                parts.append(
                    f'<text class="tick" x="{x:.1f}" y="{top + plot_h + 18}" '
                    f'text-anchor="middle">{esc(_fmt_gb_tick(gb))}</text>'
                )
    parts.append(
        f'<text class="axis-title" x="{left + plot_w / 2:.1f}" y="{height - 10}" '
        'text-anchor="middle">Communication cost (GB, log scale)</text>'
    )
    parts.append(
        f'<text class="axis-title" transform="translate(16 {top + plot_h / 2:.1f}) rotate(-90)" '
        'text-anchor="middle">Average (%)</text>'
    )
    if references:
        low = min(r.average for r in references)
        best = max(references, key=lambda r: r.average)
        y_hi, y_lo = y_of(best.average), y_of(low)
        parts.append(
            f'<rect class="ref-band" x="{left}" y="{y_hi:.1f}" width="{plot_w}" '
            f'height="{max(1.0, y_lo - y_hi):.1f}"><title>Constant answers: '
            f"{esc(', '.join(f'{r.label} {r.average:.2f}' for r in references))}</title></rect>"
        )
        parts.append(
            f'<line class="ref-line" x1="{left}" x2="{left + plot_w}" '
            f'y1="{y_hi:.1f}" y2="{y_hi:.1f}"/>'
        )
        if compact:  # no margin on the right: one label inside the plot
            parts.append(
                f'<text class="ref-label" x="{left + plot_w - 4}" y="{y_lo + 16:.1f}" '
                f'text-anchor="end">always A–D: {low:.2f}–{best.average:.2f}</text>'
            )
        else:
            parts.append(
                f'<text class="ref-label" x="{left + plot_w + 6}" y="{y_hi + 4:.1f}">'
                f"{esc(best.label)} {best.average:.2f}</text>"
            )
            parts.append(
                f'<text class="ref-label small" x="{left + plot_w + 6}" y="{y_lo + 12:.1f}">'
                f"always A–D: {low:.2f}–{best.average:.2f}</text>"
            )
    front_ids = {e.id for e in front}
    drawn = [e for e in front if e.comm_bytes > 0]
    if drawn:
        path = [f"{x_of(drawn[0].comm_bytes):.1f},{y_of(drawn[0].average):.1f}"]
        for prev, cur in zip(drawn, drawn[1:], strict=False):
            path.append(f"{x_of(cur.comm_bytes):.1f},{y_of(prev.average):.1f}")
            path.append(f"{x_of(cur.comm_bytes):.1f},{y_of(cur.average):.1f}")
        path.append(f"{left + plot_w},{y_of(drawn[-1].average):.1f}")
        parts.append(
            f'<polyline id="pareto-front{suffix}" class="front" points="{" ".join(path)}"/>'
        )
    for entry in sorted(points, key=lambda e: e.id in front_ids):
        css = f"pt track-{esc(entry.track)} status-{esc(entry.status)}"
        if entry.id in front_ids:
            css += " on-front"
        label = (
            f"{entry.team} · {entry.base_model} · {entry.average:.2f} · "
            f"{format_gb(entry.comm_bytes)}"
            + (" · on the Pareto front" if entry.id in front_ids else "")
        )
        entry_id = int(entry.id or 0)
        x, y = x_of(entry.comm_bytes), y_of(entry.average)
        parts.append(
            f'<a href="/entry/{entry_id}"><circle class="{css}" data-id="{entry_id}" '
            f'cx="{x:.1f}" cy="{y:.1f}" r="{8 if compact else 5.5}">'
            f"<title>{esc(label)}</title></circle></a>"
        )
    for entry in drawn:  # the front's points carry their team's name
        x, y = x_of(entry.comm_bytes), y_of(entry.average)
        anchor = "end" if x > left + plot_w * 0.6 else "start"
        shift = -10 if anchor == "end" else 10
        name = entry.team if len(entry.team) <= 22 else entry.team[:21] + "…"
        parts.append(
            f'<text class="pt-label" x="{x + shift:.1f}" y="{y - 8:.1f}" '
            f'text-anchor="{anchor}">{esc(name)}</text>'
        )
    parts.append(_legend(left, 18, rows=2 if compact else 1, width=plot_w))
    parts.append("</svg>")
    return "".join(parts)


def _legend(x0: float, y: float, *, rows: int = 1, width: float = 0.0) -> str:
    """Marks and their meaning: track fills; submitted, re-scored, verified and Pareto-front
    rings."""
    items = [
        ("pt track-general-nlp status-published", "General NLP"),
        ("pt track-open status-published", "open track"),
        ("pt track-general-nlp status-submitted", "submitted"),
        ("pt track-general-nlp status-re-scored", "re-scored"),
        ("pt track-general-nlp status-verified", "verified"),
        ("front", "Pareto front"),
    ]
    out = []
    x = x0
    per_row = math.ceil(len(items) / rows)
    for i, (css, text) in enumerate(items):
        if i and i % per_row == 0:
            x, y = x0, y + 22
        if css == "front":
            out.append(
                f'<line class="front" x1="{x:.1f}" x2="{x + 20:.1f}" y1="{y - 4}" y2="{y - 4}"/>'
            )
            x += 8
        else:
            out.append(f'<circle class="{css}" cx="{x + 6:.1f}" cy="{y - 4}" r="5"/>')
        out.append(f'<text class="legend" x="{x + 16:.1f}" y="{y}">{esc(text)}</text>')
        x += 30 + (8.5 if rows > 1 else 7.2) * len(text)
    return "".join(out)


def line_chart(
    xs: Sequence[float],
    series: Sequence[tuple[str, Sequence[float | None]]],
    *,
    chart_id: str,
    title: str,
    x_label: str,
    y_label: str,
    bars: bool = False,
) -> str:
    """A small chart of one or more series over rounds (lines, or stacked bars with `bars`)."""
    width, height = 620, 260
    left, right, top, bottom = 64, 16, 30, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    if not xs:
        return f'<p class="empty" id="{esc(chart_id)}">No per-round data.</p>'
    x_lo, x_hi = min(xs), max(xs)
    span = (x_hi - x_lo) or 1.0
    if bars:
        y_top = max(
            sum(v or 0.0 for v in values) for values in zip(*(s for _, s in series), strict=True)
        )
    else:
        y_top = max((v for _, s in series for v in s if v is not None), default=1.0)
    y_max = _nice_max(y_top * 1.05)

    def x_of(value: float) -> float:
        pad = plot_w / (2 * len(xs)) if bars else 0.0
        return left + pad + (value - x_lo) / span * (plot_w - 2 * pad)

    def y_of(value: float) -> float:
        return top + (1 - value / y_max) * plot_h

    parts = [
        f'<svg id="{esc(chart_id)}" class="chart small" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{esc(title)}" xmlns="http://www.w3.org/2000/svg">',
        f'<text class="chart-title" x="{left}" y="18">{esc(title)}</text>',
    ]
    for i in range(5):
        value = y_max * i / 4
        y = y_of(value)
        parts.append(
            f'<line class="grid" x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}"/>'
        )
        parts.append(
            f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" '
            f'text-anchor="end">{value:.3g}</text>'
        )
    for value in _x_ticks(x_lo, x_hi):
        parts.append(
            f'<text class="tick" x="{x_of(value):.1f}" y="{top + plot_h + 16}" '
            f'text-anchor="middle">{value:g}</text>'
        )
    parts.append(
        f'<text class="axis-title" x="{left + plot_w / 2:.1f}" y="{height - 6}" '
        f'text-anchor="middle">{esc(x_label)}</text>'
    )
    parts.append(
        f'<text class="axis-title" transform="translate(14 {top + plot_h / 2:.1f}) rotate(-90)" '
        f'text-anchor="middle">{esc(y_label)}</text>'
    )
    if bars:
        bar_w = max(1.0, 0.8 * plot_w / len(xs))
        base = [0.0] * len(xs)
        for k, (name, values) in enumerate(series):
            for i, (x, v) in enumerate(zip(xs, values, strict=True)):
                v = v or 0.0
                y0, y1 = y_of(base[i]), y_of(base[i] + v)
                parts.append(
                    f'<rect class="bar s{k}" x="{x_of(x) - bar_w / 2:.1f}" y="{y1:.1f}" '
                    f'width="{bar_w:.1f}" height="{max(0.0, y0 - y1):.1f}">'
                    f"<title>{esc(name)}, round {x:g}: {v:.4g}</title></rect>"
                )
                base[i] += v
    else:
        for k, (name, values) in enumerate(series):
            pts = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
            coords = " ".join(f"{x_of(x):.1f},{y_of(v):.1f}" for x, v in pts)
            parts.append(
                f'<polyline class="line s{k}" points="{coords}">'
                f"<title>{esc(name)}</title></polyline>"
            )
            if len(pts) <= 60:
                for x, v in pts:
                    parts.append(
                        f'<circle class="dot s{k}" cx="{x_of(x):.1f}" cy="{y_of(v):.1f}" r="3">'
                        f"<title>round {x:g}: {v:.4g}</title></circle>"
                    )
    for k, (name, _) in enumerate(series):
        x = left + plot_w - 110 * (len(series) - k)
        parts.append(f'<rect class="bar s{k}" x="{x:.0f}" y="8" width="10" height="10"/>')
        parts.append(f'<text class="legend" x="{x + 14:.0f}" y="17">{esc(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _x_ticks(lo: float, hi: float) -> list[float]:
    if hi <= lo:
        return [lo]
    step = max(1.0, _nice_max((hi - lo) / 6))  # rounds are whole numbers
    first = math.ceil(lo / step) * step
    ticks = []
    value = first
    while value <= hi + 1e-9:
        ticks.append(round(value, 6))
        value += step
    return ticks


def letter_bars(predicted: dict[str, int], gold: dict[str, int]) -> str:
    """Predicted answer letters against the gold letters, as horizontal bar pairs (percent)."""
    labels = list(dict.fromkeys([*gold, *predicted]))
    total_p = sum(predicted.values()) or 1
    total_g = sum(gold.values()) or 1
    width, row_h, left = 620, 34, 70
    height = 30 + row_h * len(labels)
    scale = (width - left - 90) / 100.0
    parts = [
        f'<svg id="letter-chart" class="chart small" viewBox="0 0 {width} {height}" role="img" '
        'aria-label="Answer-letter distribution" xmlns="http://www.w3.org/2000/svg">',
        '<rect class="bar s0" x="70" y="6" width="10" height="10"/>'
        '<text class="legend" x="86" y="15">model\'s answers</text>'
        '<rect class="bar gold" x="220" y="6" width="10" height="10"/>'
        '<text class="legend" x="236" y="15">gold answers</text>',
    ]
    for i, label in enumerate(labels):
        y = 26 + i * row_h
        p = 100.0 * predicted.get(label, 0) / total_p
        g = 100.0 * gold.get(label, 0) / total_g if label in gold else None
        parts.append(
            f'<text class="tick" x="{left - 8}" y="{y + 14}" text-anchor="end">{esc(label)}</text>'
        )
        parts.append(
            f'<rect class="bar s0" x="{left}" y="{y}" width="{p * scale:.1f}" height="12">'
            f"<title>{esc(label)}: {predicted.get(label, 0):,} answers ({p:.1f}%)</title></rect>"
        )
        parts.append(
            f'<text class="tick" x="{left + p * scale + 6:.1f}" y="{y + 10}">{p:.1f}%</text>'
        )
        if g is not None:
            parts.append(
                f'<rect class="bar gold" x="{left}" y="{y + 14}" '
                f'width="{g * scale:.1f}" height="8">'
                f"<title>gold {esc(label)}: {g:.1f}%</title></rect>"
            )
    parts.append("</svg>")
    return "".join(parts)

"""Server-rendered SVG charts: no script and nothing external is needed to see them.

Every piece of text that reaches the SVG goes through `esc` (team names are user input).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from html import escape

from fedtune.leaderboard.entry import Entry
from fedtune.leaderboard.reference import ReferenceRow
from fedtune.units import BYTES_PER_GB, format_gb


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


def css_name(text: str) -> str:
    """`text` as part of a CSS class name: lower case, every run of other characters one hyphen
    ("failed verification" → "failed-verification"), so any status or track gets a class."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "none"


def status_classes(entry: Entry) -> str:
    """The CSS classes of an entry's status: `status-<name>` and `ranked` or `unranked`
    (`Entry.ranked` decides), so a status the stylesheet does not name still gets the look of its
    kind."""
    return f"status-{css_name(entry.status)} {'ranked' if entry.ranked else 'unranked'}"


def _log_gb(entry: Entry) -> float:
    return math.log10(entry.comm_bytes / BYTES_PER_GB) if entry.comm_bytes > 0 else -math.inf


def cost_range(entries: Sequence[Entry]) -> tuple[float, float]:
    """The chart's cost axis, (low, high) in log10 GB, spanned by the ranked entries' costs only,
    less far outliers, and padded so the points sit inside the frame.

    A far outlier lies more than 3 interquartile ranges (at least 3 decades) outside the middle
    half of the ranked costs — of every shown cost where fewer than 4 entries are ranked, too few
    to tell. Unranked entries never widen the axis; with no ranked entry inside it, the shown
    ones span it. Entries outside it are drawn at the edge, marked as off the scale.
    """
    usable = [e for e in entries if e.comm_bytes > 0]
    ranked = sorted(_log_gb(e) for e in usable if e.ranked)
    shown = sorted(_log_gb(e) for e in usable)
    if not shown:
        return 0.0, 1.0
    basis = ranked if len(ranked) >= 4 else shown
    low, high = -math.inf, math.inf
    if len(basis) >= 4:
        q1, _, q3 = statistics.quantiles(basis, n=4, method="inclusive")
        reach = 3 * max(q3 - q1, 1.0)
        low, high = q1 - reach, q3 + reach
    logs = [v for v in ranked if low <= v <= high] or [v for v in shown if low <= v <= high]
    lo, hi = (logs[0], logs[-1]) if logs else (shown[0], shown[-1])
    if hi - lo < 1.0:  # at least a decade, around the points
        middle = (lo + hi) / 2
        lo, hi = middle - 0.5, middle + 0.5
    pad = 0.06 * (hi - lo)
    return lo - pad, hi + pad


def _fmt_gb_bound(log_gb: float) -> str:
    gb = 10.0**log_gb
    return f"{gb:,.0f}" if gb >= 10 else f"{gb:.2g}"


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

    The scale comes from the ranked entries (`cost_range`; the Average axis from ranked entries
    and the references): a self-reported or far-off cost cannot squash the others into a corner.
    A point off the scale is drawn at the frame's edge with a triangle pointing the way it is off,
    and a note under the chart counts them.
    """
    suffix = "-compact" if compact else ""
    if compact:
        width, height = 420, 430
        left, right, top, bottom = 46, 14, 62, 52
    else:
        width, height = 880, 380
        left, right, top, bottom = 60, 150, 34, 52
    plot_w, plot_h = width - left - right, height - top - bottom
    radius = 8 if compact else 5.5
    inset = 7 + radius  # an off-scale point's centre, from the frame: its triangle fits between
    lo, hi = cost_range(entries)
    scaled = [e for e in entries if e.ranked] or list(entries)
    y_max = _nice_max(max([e.average for e in scaled] + [r.average for r in references] + [10.0]))
    y_max = min(100.0, math.ceil(y_max / 10) * 10)

    def x_of_log(value: float) -> float:
        return left + (value - lo) / (hi - lo) * plot_w

    def y_of(average: float) -> float:
        return top + (1 - average / y_max) * plot_h

    def place(entry: Entry) -> tuple[float, float, str]:
        """The point's x and y, and where it is off the scale ("", "left", "right", "up" or
        "left up", "right up")."""
        value, off = _log_gb(entry), []
        if value < lo:
            x, off = left + inset, ["left"]
        elif value > hi:
            x, off = left + plot_w - inset, ["right"]
        else:
            x = x_of_log(value)
        if entry.average > y_max:
            y = top + inset
            off.append("up")
        else:
            y = y_of(entry.average)
        return x, y, " ".join(off)

    placed = {id(e): place(e) for e in entries}
    off_counts = {
        side: sum(side in p[2].split() for p in placed.values()) for side in ("left", "right", "up")
    }
    note_lines = _off_scale_note(off_counts, lo, hi, y_max, compact=compact)
    full_height = height + 22 * len(note_lines) + (6 if note_lines else 0)

    # A decade label at most every ~70 px (bytes from 1 to 10^19 span 28 decades of GB).
    label_every = max(1, math.ceil((hi - lo) * (90 if compact else 70) / plot_w))
    decades = list(range(math.ceil(lo), math.floor(hi) + 1))
    # The 2 and 5 multiples get labels too where decades are wide (≥ 200 px) or fewer than two
    # decades are on the axis.
    wide_decades = plot_w / (hi - lo) >= 200
    labelled = {1, 2, 5} if len(decades) < 2 or wide_decades else {1}

    parts = [
        f'<svg id="score-chart{suffix}" class="chart{" compact" if compact else ""}" '
        f'viewBox="0 0 {width} {full_height}" role="img" '
        f'aria-labelledby="score-chart-title{suffix}" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="score-chart-title{suffix}">Average against communication cost (log scale); '
        "the Pareto front is the staircase</title>",
        f'<rect class="plot-area" x="{left}" y="{top}" width="{plot_w}" height="{plot_h}"/>',
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
    for decade in range(math.floor(lo), math.ceil(hi) + 1):
        for multiple in range(1, 10):
            value = decade + math.log10(multiple)
            if not lo <= value <= hi:
                continue
            if multiple > 1 and label_every > 1:
                continue  # minor lines only while decades are wide enough to hold them
            x = x_of_log(value)
            css = "grid major" if multiple == 1 else "grid minor"
            parts.append(
                f'<line class="{css}" x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}"/>'
            )
            if multiple in labelled and (decade - math.ceil(lo)) % label_every == 0:
                parts.append(
                    f'<text class="tick" x="{x:.1f}" y="{top + plot_h + 18}" '
                    f'text-anchor="middle">{esc(_fmt_gb_tick(multiple * 10.0**decade))}</text>'
                )
    parts.append(
        f'<text class="axis-title" x="{left + plot_w / 2:.1f}" y="{height - 10}" '
        'text-anchor="middle">Communication cost (GB, log scale)</text>'
    )
    parts.append(
        f'<text class="axis-title" transform="translate(16 {top + plot_h / 2:.1f}) rotate(-90)" '
        'text-anchor="middle">Average (%)</text>'
    )
    for i, line in enumerate(note_lines):
        parts.append(
            f'<text class="off-note" x="{8 if compact else left}" y="{height + 14 + 22 * i}">'
            f"{esc(line)}</text>"
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
    drawn = [e for e in front if id(e) in placed]
    if drawn:
        xy = [placed[id(e)][:2] for e in drawn]
        path = [f"{xy[0][0]:.1f},{xy[0][1]:.1f}"]
        for (_, prev_y), (x, y) in zip(xy, xy[1:], strict=False):
            path.append(f"{x:.1f},{prev_y:.1f}")
            path.append(f"{x:.1f},{y:.1f}")
        path.append(f"{left + plot_w},{xy[-1][1]:.1f}")
        parts.append(
            f'<polyline id="pareto-front{suffix}" class="front" points="{" ".join(path)}"/>'
        )
    for entry in sorted(entries, key=lambda e: e.id in front_ids):
        x, y, off = placed[id(entry)]
        css = f"pt track-{css_name(entry.track)} {status_classes(entry)}"
        if entry.id in front_ids:
            css += " on-front"
        if off:
            css += " off-scale"
        label = (
            f"{entry.team} · {entry.base_model} · {entry.average:.2f} · "
            f"{format_gb(entry.comm_bytes)}"
            + (" · on the Pareto front" if entry.id in front_ids else "")
            + (" · off the scale, drawn at the edge" if off else "")
        )
        entry_id = int(entry.id or 0)
        marks = "".join(
            _off_mark(side, x, y, left, left + plot_w, top, radius) for side in off.split()
        )
        parts.append(
            f'<a href="/entry/{entry_id}"><circle class="{css}" data-id="{entry_id}" '
            f'cx="{x:.1f}" cy="{y:.1f}" r="{radius}">'
            f"<title>{esc(label)}</title></circle>{marks}</a>"
        )
    for entry in drawn:  # the front's points carry their team's name
        x, y, _ = placed[id(entry)]
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


def _off_mark(side: str, x: float, y: float, x0: float, x1: float, y0: float, r: float) -> str:
    """A triangle between an off-scale point and the frame, its tip on the frame."""
    if side == "left":
        d = f"M{x0 + 0.5:.1f},{y:.1f} L{x - r - 1:.1f},{y - 5:.1f} L{x - r - 1:.1f},{y + 5:.1f}Z"
    elif side == "right":
        d = f"M{x1 - 0.5:.1f},{y:.1f} L{x + r + 1:.1f},{y - 5:.1f} L{x + r + 1:.1f},{y + 5:.1f}Z"
    else:
        d = f"M{x:.1f},{y0 + 0.5:.1f} L{x - 5:.1f},{y - r - 1:.1f} L{x + 5:.1f},{y - r - 1:.1f}Z"
    return f'<path class="off-mark" d="{d}"/>'


def _off_scale_note(
    counts: dict[str, int], lo: float, hi: float, y_max: float, *, compact: bool
) -> list[str]:
    """The lines under the chart that count the points drawn at its edges (none: no lines)."""

    def entries(n: int) -> str:
        return f"{n} {'entry' if n == 1 else 'entries'}"

    parts = []
    if counts["left"]:
        parts.append(f"◀ {entries(counts['left'])} below {_fmt_gb_bound(lo)} GB")
    if counts["right"]:
        parts.append(f"▶ {entries(counts['right'])} above {_fmt_gb_bound(hi)} GB")
    if counts["up"]:
        parts.append(f"▲ {entries(counts['up'])} above Average {y_max:g}")
    if not parts:
        return []
    lead = "Off the scale, drawn at the edge:"
    if compact:
        return [lead, *parts] if len(parts) > 2 else [lead, " · ".join(parts)]
    return [f"{lead} {' · '.join(parts)}"]


def _legend(x0: float, y: float, *, rows: int = 1, width: float = 0.0) -> str:
    """Marks and their meaning: track fills; not-ranked (any unranked status), reproduced and
    Pareto-front rings."""
    items = [
        ("pt track-general-nlp status-published ranked", "General NLP"),
        ("pt track-open status-published ranked", "open track"),
        ("pt track-general-nlp unranked", "not ranked"),
        ("pt track-general-nlp status-reproduced ranked", "reproduced"),
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
    compact: bool = False,
    css: str = "",
) -> str:
    """A small chart of one or more series over rounds (lines, or stacked bars with `bars`).

    `compact`: the phone layout, 360 units wide so that it is drawn near 1:1 on a phone and its
    text keeps its CSS size (the legend on a row of its own). `css`: more classes for the SVG.
    """
    if compact:
        width, height = 360, 260
        left, right, top, bottom = 50, 14, 58, 44
    else:
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
        f'<svg id="{esc(chart_id)}" class="{_classes("chart small", compact, css)}" '
        f'viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{esc(title)}" xmlns="http://www.w3.org/2000/svg">',
        f'<text class="chart-title" x="{8 if compact else left}" y="18">{esc(title)}</text>',
    ]
    for i in range(5):
        value = y_max * i / 4
        y = y_of(value)
        parts.append(
            f'<line class="grid" x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}"/>'
        )
        parts.append(
            f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" '
            f'text-anchor="end">{_fmt_tick(value)}</text>'
        )
    for value in _x_ticks(x_lo, x_hi, most=5 if compact else 7):
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
        x, y = (8 + 130 * k, 38) if compact else (left + plot_w - 110 * (len(series) - k), 17)
        parts.append(f'<rect class="bar s{k}" x="{x:.0f}" y="{y - 9}" width="10" height="10"/>')
        parts.append(f'<text class="legend" x="{x + 14:.0f}" y="{y}">{esc(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _classes(base: str, compact: bool, css: str) -> str:
    return " ".join(c for c in (base, "compact" if compact else "", css) if c)


def _fmt_tick(value: float) -> str:
    """An axis number that stays short: 1,500 rather than 1.5e+03."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _x_ticks(lo: float, hi: float, most: int = 7) -> list[float]:
    """Round numbers from `lo` to `hi`, at most `most` of them (rounds: whole numbers)."""
    if hi <= lo:
        return [lo]
    step = max(1.0, _nice_max((hi - lo) / (most - 1)))
    first = math.ceil(lo / step) * step
    ticks = []
    value = first
    while value <= hi + 1e-9:
        ticks.append(round(value, 6))
        value += step
    return ticks


def letter_bars(
    predicted: dict[str, int], gold: dict[str, int], *, compact: bool = False, css: str = ""
) -> str:
    """Predicted answer letters against the gold letters, as horizontal bar pairs (percent).

    `compact`: the phone layout, 360 units wide (drawn near 1:1 on a phone); `css`: more classes.
    """
    labels = list(dict.fromkeys([*gold, *predicted]))
    total_p = sum(predicted.values()) or 1
    total_g = sum(gold.values()) or 1
    width, row_h, left = (360, 34, 60) if compact else (620, 34, 70)
    height = 30 + row_h * len(labels)
    scale = (width - left - (56 if compact else 90)) / 100.0
    gold_x = left + (140 if compact else 150)
    parts = [
        f'<svg id="letter-chart{"-compact" if compact else ""}" '
        f'class="{_classes("chart small letters", compact, css)}" '
        f'viewBox="0 0 {width} {height}" role="img" '
        'aria-label="Answer-letter distribution" xmlns="http://www.w3.org/2000/svg">',
        f'<rect class="bar s0" x="{left}" y="6" width="10" height="10"/>'
        f'<text class="legend" x="{left + 16}" y="15">model\'s answers</text>'
        f'<rect class="bar gold" x="{gold_x}" y="6" width="10" height="10"/>'
        f'<text class="legend" x="{gold_x + 16}" y="15">gold answers</text>',
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

"""The HTML pages: the ranked board and an entry's page. Every user-supplied string goes via `esc`.

Pages carry no inline script or style (the app's Content-Security-Policy forbids both), so even a
mistake in escaping could not run a submitted script.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedtune.evaluation.subjects import CATEGORY_SUBJECTS, SCORED_CATEGORIES
from fedtune.leaderboard.entry import SUBMITTED, TRACK_TITLES, TRACKS, Entry, board_date, format_gb
from fedtune.leaderboard.ranking import ALL_TRACKS, BoardRow
from fedtune.leaderboard.reference import ReferenceRow, scored_gold_distribution
from fedtune.leaderboard.web.charts import css_name, esc, letter_bars, line_chart, status_classes

CATEGORY_TITLES = {
    "stem": "STEM",
    "social_sciences": "Social Sciences",
    "humanities": "Humanities",
    "other": "Other (not scored)",
}


def layout(title: str, body: str) -> str:
    """A complete page around `body`."""
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title>"
        '<link rel="icon" href="data:,">'  # no /favicon.ico request (a 404 in the console)
        '<link rel="stylesheet" href="/static/board.css">'
        '<script src="/static/board.js" defer></script>'
        "</head><body>"
        '<header class="top"><a class="brand" href="/">fedtune leaderboard</a>'
        '<span class="sub">federated LoRA fine-tuning · MMLU, FlowerTune General NLP protocol'
        "</span>"
        '<nav><a href="/api/entries">JSON API</a></nav></header>'
        f"<main>{body}</main>"
        "<footer>Scores: MMLU test split, zero-shot; Average = mean of STEM, Social Sciences and "
        "Humanities. Comm. Costs: adapter bytes sent to and from clients, in GB (GiB) as the board "
        "prints them.</footer>"
        "</body></html>"
    )


# --- the board ------------------------------------------------------------------------------------

_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # key, header, type (num sorts numerically; text alphabetically)
    ("rank", "Rank", "num"),
    ("team", "Team", "text"),
    ("code", "Code", "text"),
    ("model", "Base Model", "text"),
    ("comm", "Comm. Costs", "num"),
    ("average", "Average ↑", "num"),
    ("stem", "STEM", "num"),
    ("social", "Social Sciences", "num"),
    ("humanities", "Humanities", "num"),
    ("date", "Date", "text"),
    ("track", "Track", "text"),
)


def board_page(
    rows: Sequence[BoardRow],
    *,
    track: str,
    base_model: str | None,
    models: Sequence[str],
    chart: str,
    shown_entries: int,
    page: int = 1,
    pages: int = 1,
    first_row: int = 1,
    total_rows: int = 0,
) -> str:
    """The home page: filters, the Average-vs-cost chart and the sortable ranked table (one page
    of rows; the pager links the others)."""
    body = [
        '<section class="intro"><h1>Federated LLM fine-tuning leaderboard</h1>'
        "<p>Ranked by Average (two decimals), then lower communication, then earlier date. "
        "Only scores the board checked are ranked: published (the FlowerTune board), re-scored "
        "(computed here from the entry's generation files with the official parser) or verified "
        "(the adapter re-evaluated by the operators); self-reported entries are listed after "
        "them without a rank. "
        'Rows marked <span class="ref-mark">ref</span> are constant-answer baselines: a model that '
        "always answers the same letter scores that much without knowing anything.</p></section>",
        _filters(track, base_model, models),
        f'<section class="chart-box">{chart}</section>',
        f'<p class="count" id="row-count">{shown_entries} entries</p>',
        _table(rows),
        _pager(track, base_model, page, pages, first_row, len(rows), total_rows),
    ]
    return layout("fedtune leaderboard", "".join(body))


def _pager(
    track: str,
    base_model: str | None,
    page: int,
    pages: int,
    first_row: int,
    shown: int,
    total: int,
) -> str:
    if pages <= 1:
        return ""
    from urllib.parse import urlencode

    def link(number: int, text: str, rel: str) -> str:
        query = {"track": track, "page": number, **({"model": base_model} if base_model else {})}
        return f'<a rel="{rel}" href="/?{esc(urlencode(query))}">{esc(text)}</a>'

    parts = [f"rows {first_row:,}–{first_row + shown - 1:,} of {total:,} · page {page} of {pages}"]
    if page > 1:
        parts.insert(0, link(page - 1, "← previous", "prev"))
    if page < pages:
        parts.append(link(page + 1, "next →", "next"))
    return f'<nav class="pager" id="pager">{" · ".join(parts)}</nav>'


def _filters(track: str, base_model: str | None, models: Sequence[str]) -> str:
    track_opts = [(ALL_TRACKS, "All tracks")] + [(t, TRACK_TITLES[t]) for t in TRACKS]
    out = ['<form id="filters" class="filters" method="get" action="/">']
    out.append('<label>Track <select name="track" id="track-filter">')
    for value, text in track_opts:
        selected = " selected" if value == track else ""
        out.append(f'<option value="{esc(value)}"{selected}>{esc(text)}</option>')
    out.append('</select></label><label>Base model <select name="model" id="model-filter">')
    out.append('<option value="">All base models</option>')
    for model in models:
        selected = " selected" if model == base_model else ""
        out.append(f'<option value="{esc(model)}"{selected}>{esc(model)}</option>')
    out.append('</select></label><button type="submit" class="apply">Apply</button></form>')
    return "".join(out)


def _table(rows: Sequence[BoardRow]) -> str:
    head = "".join(
        f'<th data-key="{key}" data-type="{kind}" aria-sort="none">'
        f'<button type="button" class="sort">{esc(title)}</button></th>'
        for key, title, kind in _COLUMNS
    )
    body = "".join(_row(row) for row in rows)
    return (
        '<div class="table-wrap"><table id="board" class="board">'
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
    )


def _cell(value: Any, text: str, css: str = "") -> str:
    cls = f' class="{css}"' if css else ""
    return f'<td data-v="{esc(value)}"{cls}>{text}</td>'


def _clipped(text: str) -> str:
    """A name cut to one line with an ellipsis when long, the whole of it in the tooltip; a tap or
    click shows it all (board.js)."""
    return f'<span class="clip" title="{esc(text)}">{esc(text)}</span>'


def _row(row: BoardRow) -> str:
    if row.entry is None:
        return _reference_row(row)
    e = row.entry
    status = (
        ""
        if e.status == "published"
        else f' <span class="badge {status_classes(e)}">{esc(e.status)}</span>'
    )
    cells = [
        # Unranked (self-reported) entries sort after every ranked row when sorting by rank.
        _cell(row.rank or 10**9 - 1, str(row.rank or "—"), "num"),
        # Long names wrap anywhere inside the cell's width; the tooltip has the whole name.
        _cell(
            e.team,
            f'<a class="name" href="/entry/{e.id}" title="{esc(e.team)}">{esc(e.team)}</a>{status}',
            "team",
        ),
        _cell(
            e.code_url, f'<a href="{esc(e.code_url)}" rel="nofollow noopener noreferrer">Link</a>'
        ),
        _cell(e.base_model, _clipped(e.base_model), "model"),
        _cell(e.comm_bytes, esc(format_gb(e.comm_bytes)), "num"),
        _cell(f"{e.average:.6f}", f"{e.average:.2f}", "num avg"),
        _cell(e.stem, f"{e.stem:.2f}", "num"),
        _cell(e.social_sciences, f"{e.social_sciences:.2f}", "num"),
        _cell(e.humanities, f"{e.humanities:.2f}", "num"),
        _cell(e.date, esc(board_date(e.date))),
        _cell(
            e.track,
            f'<span class="track {css_name(e.track)}">'
            f"{esc(TRACK_TITLES.get(e.track, e.track))}</span>",
        ),
    ]
    kind = "ranked" if e.ranked else "unranked"
    return (
        f'<tr class="entry {css_name(e.track)} {kind}" data-id="{e.id}" '
        f'data-model="{esc(e.base_model)}">'
        f"{''.join(cells)}</tr>"
    )


def _reference_row(row: BoardRow) -> str:
    r = row.reference
    assert r is not None
    cells = [
        # References sort after every ranked row when sorting by rank.
        _cell(10**9, '<span class="ref-mark">ref</span>', "num"),
        _cell(r.label, f"Reference: {esc(r.label)}", "team"),
        _cell("", ""),
        _cell("", "—", "model"),
        _cell(0, "—", "num"),
        _cell(f"{r.average:.6f}", f"{r.average:.2f}", "num avg"),
        _cell(r.stem, f"{r.stem:.2f}", "num"),
        _cell(r.social_sciences, f"{r.social_sciences:.2f}", "num"),
        _cell(r.humanities, f"{r.humanities:.2f}", "num"),
        _cell("", ""),
        _cell("reference", '<span class="track reference">reference</span>'),
    ]
    return f'<tr class="reference" data-ref="{esc(r.letter)}">{"".join(cells)}</tr>'


# --- an entry -------------------------------------------------------------------------------------


def _score_source(entry: Entry) -> str:
    rescored = entry.details.get("evaluation", {}).get("rescored") or {}
    if rescored:
        links = " · ".join(
            f'<a href="/api/entries/{entry.id}/generations/{esc(c)}">{esc(c)}</a> '
            f'<code class="hash">sha256 {esc(str(v.get("sha256", ""))[:12])}…</code>'
            for c, v in rescored.items()
        )
        kind = (
            "the per-question predictions"
            if any(v.get("format") == "predictions" for v in rescored.values())
            else "the generation files"
        )
        return f"re-scored by the board from {kind} it holds: {links}"
    known = {
        "published": "quoted from the published FlowerTune board",
        "verified": "the operators re-evaluated the adapter",
        SUBMITTED: "self-reported by the submitter (not checked)",
    }
    if entry.status in known:
        return known[entry.status]
    checked = "checked by the board" if entry.ranked else "not checked by the board"
    return f"{esc(entry.status)} ({checked})"


def _not_ranked(entry: Entry) -> str:
    if entry.moderation == "rejected":
        return "not ranked (rejected)"
    if not entry.ranked and entry.status == SUBMITTED:
        return (
            "not ranked: self-reported scores the board could not check (no generation files, "
            "not re-evaluated by the operators)"
        )
    if not entry.ranked:
        return f"not ranked ({esc(entry.status)})"
    return "not ranked"


def entry_page(entry: Entry, rank: int | None, references: Sequence[ReferenceRow]) -> str:
    """An entry: scores by category and subject, answer letters, round plots, config, provenance."""
    d = entry.details
    evaluation = d.get("evaluation", {})
    best_ref = max(references, key=lambda r: r.average) if references else None
    verdict = ""
    if best_ref is not None and entry.average <= best_ref.average:
        verdict = (
            f'<p class="warn">This Average ({entry.average:.2f}) is not above the best constant '
            "answer "
            f"({esc(best_ref.label)}: {best_ref.average:.2f}).</p>"
        )
    if entry.moderation == "rejected":
        verdict = (
            '<p class="warn rejected">Rejected by the operators, not ranked: '
            f"{esc(entry.moderation_reason)}</p>" + verdict
        )
    track = TRACK_TITLES.get(entry.track, entry.track)
    summary = [
        ("Rank", f"{rank} in {esc(track)}" if rank is not None else _not_ranked(entry)),
        ("Team", esc(entry.team)),
        (
            "Code",
            f'<a href="{esc(entry.code_url)}" rel="nofollow noopener noreferrer">'
            f"{esc(entry.code_url)}</a>",
        ),
        ("Base model", esc(entry.base_model)),
        ("Track", esc(track)),
        ("Status", esc(entry.status)),
        ("Scores", _score_source(entry)),
        ("Comm. Costs", f"{esc(format_gb(entry.comm_bytes))} ({entry.comm_bytes:,} bytes)"),
        (
            "Evaluation",
            esc(f"{evaluation.get('protocol', '?')} {evaluation.get('protocol_version', '')}"),
        ),
        ("Date", esc(entry.date)),
    ]
    adapter = d.get("adapter") or {}
    if adapter:
        summary.append(
            (
                "Adapter",
                esc(adapter.get("location", ""))
                + (
                    f' <code class="hash">sha256 {esc(adapter["sha256"])}</code>'
                    if adapter.get("sha256")
                    else ""
                ),
            )
        )
    body = [
        f'<p class="back"><a href="/">← board</a> · <a href="/api/entries/{entry.id}">JSON</a></p>',
        f'<h1 id="entry-title">{esc(entry.team)} '
        f'<span class="model">{esc(entry.base_model)}</span></h1>',
        verdict,
        _dl(summary),
        _scores(entry),
        _subjects(evaluation.get("subjects") or {}),
        _letters(evaluation.get("answer_distribution") or {}),
        _rounds(d.get("rounds") or []),
        _key_values("Setup", d.get("setup") or {}, "setup"),
        _key_values("Configuration", d.get("config") or {}, "config"),
        _key_values("Provenance", d.get("provenance") or {}, "provenance"),
    ]
    return layout(f"{entry.team} · fedtune leaderboard", "".join(body))


def _dl(items: Sequence[tuple[str, str]]) -> str:
    inner = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in items)
    return f'<dl class="summary">{inner}</dl>'


def _bar(percent: float) -> str:
    # A CSS-free bar (the CSP has no 'unsafe-inline'): an SVG whose width carries the value.
    return (
        f'<svg class="meter" viewBox="0 0 100 8" preserveAspectRatio="none" aria-hidden="true">'
        '<rect class="meter-bg" width="100" height="8"/>'
        f'<rect class="meter-fg" width="{percent:.2f}" '
        'height="8"/></svg>'
    )


def _scores(entry: Entry) -> str:
    rows = [
        ("Average", entry.average),
        ("STEM", entry.stem),
        ("Social Sciences", entry.social_sciences),
        ("Humanities", entry.humanities),
    ]
    extra = entry.details.get("evaluation", {}).get("extra") or {}
    body = "".join(
        f'<tr><th>{esc(name)}</th><td class="num">{value:.2f}</td><td>{_bar(value)}</td></tr>'
        for name, value in rows
    )
    extra_rows = "".join(
        f'<tr><th>{esc(k)}</th><td class="num">{v:.4g}</td><td></td></tr>' for k, v in extra.items()
    )
    return (
        '<section><h2>Scores</h2><table id="scores" class="kv scores"><tbody>'
        f"{body}{extra_rows}</tbody></table></section>"
    )


def _subjects(subjects: dict[str, dict[str, int]]) -> str:
    if not subjects:
        return (
            '<section><h2>Per-subject results</h2><p class="empty">Not published for this entry.'
            "</p></section>"
        )
    rows = []
    for category in (*SCORED_CATEGORIES, "other"):
        for subject in CATEGORY_SUBJECTS[category]:
            if subject not in subjects:
                continue
            cell = subjects[subject]
            pct = 100.0 * cell["correct"] / cell["total"]
            rows.append(
                f"<tr><td>{esc(subject.replace('_', ' '))}</td>"
                f"<td>{esc(CATEGORY_TITLES[category])}</td>"
                f'<td class="num">{cell["correct"]:,} / {cell["total"]:,}</td>'
                f'<td class="num">{pct:.2f}</td><td>{_bar(pct)}</td></tr>'
            )
    return (
        "<section><h2>Per-subject results "
        f'<span class="muted">({len(subjects)} subjects)</span></h2>'
        '<table id="subjects" class="subjects"><thead><tr><th>Subject</th><th>Category</th>'
        "<th>Correct</th><th>Accuracy %</th><th></th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def _letters(distribution: dict[str, int]) -> str:
    title = "<h2>Answer letters</h2>"
    if not distribution:
        return f'<section>{title}<p class="empty">Not known for this entry.</p></section>'
    gold = scored_gold_distribution()
    note = (
        '<p class="muted">Which letter the model answered, against how often each letter is the '
        "gold answer. A model that piles onto one letter scores like that letter's constant-answer "
        "row.</p>"
    )
    charts = letter_bars(distribution, gold, css="wide-only") + letter_bars(
        distribution, gold, compact=True, css="narrow-only"
    )
    return f"<section>{title}{note}{charts}</section>"


def _rounds(rounds: list[dict[str, Any]]) -> str:
    title = "<h2>Training rounds</h2>"
    if not rounds:
        return f'<section>{title}<p class="empty">No per-round data for this entry.</p></section>'
    xs = [float(r["round"]) for r in rounds]
    mib = 1024.0**2
    comm_series = [
        ("downlink MiB", [r["downlink_bytes"] / mib for r in rounds]),
        ("uplink MiB", [r["uplink_bytes"] / mib for r in rounds]),
    ]
    losses = [r.get("train_loss") for r in rounds]
    charts = []
    # Each chart twice: the wide one, and a compact one whose text stays readable on a phone
    # (the stylesheet shows one of them).
    for compact, css in ((False, "wide-only"), (True, "narrow-only")):
        suffix = "-compact" if compact else ""
        charts.append(
            line_chart(
                xs,
                comm_series,
                chart_id=f"comm-chart{suffix}",
                title="Communication per round",
                x_label="round",
                y_label="MiB",
                bars=True,
                compact=compact,
                css=css,
            )
        )
        if any(v is not None for v in losses):
            charts.append(
                line_chart(
                    xs,
                    [("train loss", losses)],
                    chart_id=f"loss-chart{suffix}",
                    title="Training loss per round",
                    x_label="round",
                    y_label="loss",
                    compact=compact,
                    css=css,
                )
            )
    if not any(v is not None for v in losses):
        charts.append('<p class="empty" id="loss-chart">No loss recorded.</p>')
    return f'<section class="plots">{title}<div class="plot-row">{"".join(charts)}</div></section>'


def _key_values(title: str, values: dict[str, Any], section_id: str) -> str:
    if not values:
        return ""
    rows = "".join(
        f"<tr><th>{esc(k)}</th><td><code>{esc(_show(v))}</code></td></tr>"
        for k, v in values.items()
    )
    return (
        f'<section><h2>{esc(title)}</h2><table id="{esc(section_id)}" class="kv">'
        f"<tbody>{rows}</tbody></table></section>"
    )


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_show(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_show(v) for v in value)
    return str(value)


def not_found_page(message: str) -> str:
    """A 404 page."""
    return layout(
        "Not found · fedtune leaderboard",
        f'<h1>Not found</h1><p>{esc(message)}</p><p><a href="/">← board</a></p>',
    )

"""`fedtune leaderboard show` output: an aligned terminal table, Markdown, CSV or JSON."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from typing import Any

from fedtune.leaderboard.ranking import BOARD_COLUMNS, BoardRow
from fedtune.units import board_gb

FORMATS: tuple[str, ...] = ("table", "markdown", "csv", "json")
_NUMERIC = {"Rank", "Comm. Costs", "Average ↑", "STEM", "Social Sciences", "Humanities"}
CSV_COLUMNS = (
    "Rank", "Team", "Code", "Base Model", "Comm. Bytes", "Comm. GB", "Average", "STEM",
    "Social Sciences", "Humanities", "Date", "Track", "Status", "Id",
)  # fmt: skip
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def row_record(row: BoardRow) -> dict[str, Any]:
    """A row as plain data (what the JSON output and the API list return)."""
    if row.entry is not None:
        record = row.entry.to_dict()
        record.pop("details")
        return {"rank": row.rank, "kind": "entry", **record}
    assert row.reference is not None
    return {"rank": None, "kind": "reference", "comm_bytes": 0, **row.reference.to_dict()}


def render(rows: Sequence[BoardRow], fmt: str, *, with_track: bool = False) -> str:
    """Lay out the board rows in one of FORMATS.

    Args:
        rows: the rows of one view, in order.
        fmt: table, markdown, csv or json.
        with_track: add a Track column (for views that mix tracks).
    Raises:
        ValueError: an unknown format.
    """
    columns = (*BOARD_COLUMNS, "Track") if with_track else BOARD_COLUMNS
    if fmt == "json":
        return json.dumps([row_record(r) for r in rows], indent=2, ensure_ascii=False)
    if fmt == "csv":
        return _csv(rows, columns)
    if fmt == "markdown":
        return _markdown(rows, columns)
    if fmt == "table":
        return _table(rows, columns)
    raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")


def csv_cell(value: object) -> object:
    """A cell a spreadsheet will not run: text starting with = + - @ (or a tab or carriage return,
    which some programs skip before looking) gets a leading apostrophe. Numbers stay numbers."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def csv_rank(row: BoardRow) -> int | str:
    """The CSV's Rank cell: the rank of a ranked entry, "ref" for a constant-answer reference row,
    empty for an entry the board does not rank (whatever its status; `Entry.ranked` decides), so
    that the column holds numbers and blanks."""
    if row.is_reference:
        return "ref"
    return row.rank if row.rank is not None else ""


def _csv(rows: Sequence[BoardRow], columns: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        r = row_record(row)
        writer.writerow([csv_cell(cell) for cell in [
            csv_rank(row),
            r.get("team") or f"Reference: {r.get('label')}",
            r.get("code_url", ""), r.get("base_model", ""), r["comm_bytes"],
            f"{board_gb(r['comm_bytes']):.1f}", f"{r['average']:.2f}", f"{r['stem']:.2f}",
            f"{r['social_sciences']:.2f}", f"{r['humanities']:.2f}", r.get("date", ""),
            r.get("track", "reference"), r.get("status", "reference"), r.get("id") or "",
        ]])  # fmt: skip
    return out.getvalue()


def _markdown_cell(text: str) -> str:
    # A team name must not open HTML or break the table in a Markdown renderer.
    text = _CONTROL.sub(" ", text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|").replace("[", "\\[").replace("]", "\\]")


def _markdown(rows: Sequence[BoardRow], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |"]
    lines.append("|" + "|".join("---:" if c in _NUMERIC else "---" for c in columns) + "|")
    for row in rows:
        cells = row.cells()
        shown = []
        for column in columns:
            text = cells[column]
            if column == "Code" and text:
                # The URL passed validation (http(s), no spaces, quotes or angle brackets).
                shown.append(f"[Link]({text.replace(')', '%29')})")
            elif row.is_reference and column == "Team":
                shown.append(f"*{_markdown_cell(text)}*")
            else:
                shown.append(_markdown_cell(text))
        lines.append("| " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(rows: Sequence[BoardRow], columns: Sequence[str]) -> str:
    limits = {"Team": 32, "Code": 30, "Base Model": 30}
    grid = []
    for row in rows:
        cells = row.cells()
        if cells["Code"]:
            cells["Code"] = re.sub(r"^https?://(www\.)?", "", cells["Code"])
        grid.append([_shorten(_CONTROL.sub(" ", cells[c]), limits.get(c, 1000)) for c in columns])
    widths = [max([len(c)] + [len(line[i]) for line in grid]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if c in _NUMERIC else v.ljust(w)
            for v, w, c in zip(values, widths, columns, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line(columns), "  ".join("─" * w for w in widths)]
    out.extend(line(values) for values in grid)
    return "\n".join(out) + "\n"

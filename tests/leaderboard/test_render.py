"""`show` formats: the board's columns, escaping, machine-readable output that round-trips."""

from __future__ import annotations

import csv
import io
import json

from fedtune.leaderboard.entry import OPEN, STATUSES, Entry
from fedtune.leaderboard.ranking import board_rows, rank
from fedtune.leaderboard.reference import constant_answer_rows
from fedtune.leaderboard.render import render
from fedtune.leaderboard.validation import validate_submission

from .lb_submissions import make_submission


def _rows(store, team="A|B <script>x</script> [c](d)"):
    store.add(validate_submission(make_submission(team, correct=(2000, 2000, 2000))))
    return board_rows(store.entries(), constant_answer_rows())


def test_table_is_aligned_and_shows_the_board_columns(store):
    text = render(_rows(store), "table")
    lines = text.splitlines()
    assert lines[0].split("  ")[0] == "Rank"
    for column in ("Team", "Comm. Costs", "Average ↑", "Social Sciences", "Date"):
        assert column in lines[0]
    assert lines[2].lstrip().startswith("1  ZeroOne.AI")
    widths = {len(line) for line in lines[2:] if "ZeroOne" in line or "ZJUDAI" in line}
    assert len(widths) <= 2  # right-aligned numbers; rows end where their last cell ends
    assert any(line.lstrip().startswith("ref  Reference: always D") for line in lines)


def test_markdown_escapes_team_names(store):
    text = render(_rows(store), "markdown")
    line = next(row for row in text.splitlines() if "script" in row)
    assert "<script>" not in line and "&lt;script&gt;" in line
    assert "A\\|B" in line and "\\[c\\]" in line
    # Every row has the same number of (unescaped) cell separators as the header.
    header_cells = text.splitlines()[0].count("|")
    assert line.replace("\\|", "").count("|") == header_cells
    assert "| 1 | ZeroOne.AI | [Link](https://github.com/0-1-ai/01AI-FlowerTune" in text


def test_csv_and_json_round_trip(store):
    rows = _rows(store, team='Quote " and, comma')
    records = list(csv.DictReader(io.StringIO(render(rows, "csv"))))
    ours = next(r for r in records if r["Team"] == 'Quote " and, comma')
    assert ours["Track"] == "open" and int(ours["Comm. Bytes"]) == 3 * 1024**3
    data = json.loads(render(rows, "json"))
    # The self-reported entry is listed last, without a rank.
    assert [r["rank"] for r in data if r["kind"] == "entry"] == [*range(1, 20), None]
    assert {r["label"] for r in data if r["kind"] == "reference"} == {
        "always A",
        "always B",
        "always C",
        "always D",
    }


def test_csv_cells_a_spreadsheet_would_run_are_neutralized(store):
    for team in ('=HYPERLINK("http://x","y")', "+1+1", "-2", "@SUM(A1)"):
        store.add(validate_submission(make_submission(team, correct=(2000, 2000, 2000))))
    rows = board_rows(store.entries(), constant_answer_rows())
    records = list(csv.DictReader(io.StringIO(render(rows, "csv"))))
    teams = {r["Team"] for r in records}
    assert {'\'=HYPERLINK("http://x","y")', "'+1+1", "'-2", "'@SUM(A1)"} <= teams
    assert not [t for t in teams if t[:1] in "=+-@"]
    assert all(r["Comm. Bytes"].isdigit() for r in records)  # numbers stay numbers


# Statuses beyond today's, as a board may come to have: `Entry.ranked` decides for each.
MORE_STATUSES = ("pending", "reproduced", "failed verification", "held for review")


def test_rank_column_is_right_for_every_status():
    """A rank for each ranked entry; for every other status "—" in the table and Markdown, an
    empty cell in the CSV, null in JSON; "ref" only on the constant-answer rows."""
    statuses = list(dict.fromkeys([*STATUSES, *MORE_STATUSES]))
    entries = [
        Entry(
            team=f"team {status}",
            code_url="https://example.org/run",
            base_model="m",
            track=OPEN,
            comm_bytes=(i + 1) * 1024**3,
            average=40.0 + i,
            stem=40.0 + i,
            social_sciences=40.0 + i,
            humanities=40.0 + i,
            date="2026-01-02",
            status=status,
            id=100 + i,
        )
        for i, status in enumerate(statuses)
    ]
    assert any(e.ranked for e in entries) and not all(e.ranked for e in entries)
    expected = {e.team: str(position) for position, e in rank(entries)}
    rows = board_rows(entries, constant_answer_rows())

    records = list(csv.DictReader(io.StringIO(render(rows, "csv"))))
    by_team = {r["Team"]: r for r in records}
    for e in entries:
        assert by_team[e.team]["Rank"] == expected.get(e.team, ""), e.status
        assert by_team[e.team]["Status"] == e.status
    assert {r["Team"] for r in records if r["Rank"] == "ref"} == {
        f"Reference: always {letter}" for letter in "ABCD"
    }

    table = render(rows, "table").splitlines()
    markdown = render(rows, "markdown").splitlines()
    for e in entries:
        want = expected.get(e.team, "—")
        assert next(line for line in table if e.team in line).split()[0] == want, e.status
        cells = next(line for line in markdown if e.team in line).split("|")
        assert cells[1].strip() == want, e.status
    assert all(line.split()[0] == "ref" for line in table if "Reference:" in line)

    data = {r.get("team"): r["rank"] for r in json.loads(render(rows, "json"))}
    for e in entries:
        assert data[e.team] == (int(expected[e.team]) if e.team in expected else None)

"""Ranking, the board's rows (entries with constant-answer rows interleaved), the Pareto front.

Order: Average, high first, compared at the board's precision (two decimals, as published: a
difference the board does not show must not decide a rank in secret); then lower communication
(the same score for fewer bytes is the better federated result); then the earlier date (who got
there first); then the lower id (stored first). The id is unique, so the order is total and the
same on every call.

Only entries whose scores the board checked get a rank (published, reproduced; see
`Entry.ranked`); the others (pending, held for review, failed verification, self-reported) are
listed after every ranked row, unranked, in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedtune.accounting.targets import CurvePoint, cost_to_target
from fedtune.leaderboard.entry import TRACK_TITLES, Entry, board_date
from fedtune.leaderboard.reference import ReferenceRow
from fedtune.units import format_gb

ALL_TRACKS = "all"


def rank_key(entry: Entry) -> tuple[float, int, str, int]:
    """The sort key of an entry: smaller sorts first."""
    return (-round(entry.average, 2), entry.comm_bytes, entry.date, entry.id or 0)


def rank(entries: Iterable[Entry]) -> list[tuple[int, Entry]]:
    """The ranked entries (`Entry.ranked`) in rank order with their 1-based ranks (every entry its
    own rank, as the board); self-reported entries are left out."""
    ordered = sorted((e for e in entries if e.ranked), key=rank_key)
    return [(position, entry) for position, entry in enumerate(ordered, start=1)]


def unranked(entries: Iterable[Entry]) -> list[Entry]:
    """The entries the board could not check, in the order ranked ones would have."""
    return sorted((e for e in entries if not e.ranked), key=rank_key)


@dataclass(frozen=True)
class BoardRow:
    """A displayed row: a ranked entry, or a reference row (no rank, no id, no cost)."""

    rank: int | None
    entry: Entry | None = None
    reference: ReferenceRow | None = None

    @property
    def is_reference(self) -> bool:
        """True for a constant-answer reference row."""
        return self.reference is not None

    @property
    def average(self) -> float:
        """The Average of either kind of row."""
        return self.entry.average if self.entry else self.reference.average  # type: ignore[union-attr]

    def cells(self) -> dict[str, str]:
        """The row's display cells, in the board's columns (values as the board prints them)."""
        if self.entry is not None:
            e = self.entry
            return {
                "Rank": "—" if self.rank is None else str(self.rank),
                "Team": e.team,
                "Code": e.code_url,
                "Base Model": e.base_model,
                "Comm. Costs": format_gb(e.comm_bytes),
                "Average ↑": f"{e.average:.2f}",
                "STEM": f"{e.stem:.2f}",
                "Social Sciences": f"{e.social_sciences:.2f}",
                "Humanities": f"{e.humanities:.2f}",
                "Date": board_date(e.date),
                "Track": TRACK_TITLES.get(e.track, e.track),
                "Status": e.status,
            }
        r = self.reference
        assert r is not None
        return {
            "Rank": "ref",
            "Team": f"Reference: {r.label}",
            "Code": "",
            "Base Model": "(none)",
            "Comm. Costs": "0.0 GB",
            "Average ↑": f"{r.average:.2f}",
            "STEM": f"{r.stem:.2f}",
            "Social Sciences": f"{r.social_sciences:.2f}",
            "Humanities": f"{r.humanities:.2f}",
            "Date": "",
            "Track": "reference",
            "Status": "reference",
        }


BOARD_COLUMNS: tuple[str, ...] = (
    "Rank", "Team", "Code", "Base Model", "Comm. Costs", "Average ↑", "STEM", "Social Sciences",
    "Humanities", "Date",
)  # fmt: skip


def board_rows(
    entries: Iterable[Entry],
    references: Sequence[ReferenceRow] = (),
    *,
    track: str = ALL_TRACKS,
    base_model: str | None = None,
) -> list[BoardRow]:
    """The rows of one view: entries of `track` ranked, references placed by their Average, then
    the unranked (self-reported) entries.

    Ranks are positions within the track view; the base-model filter hides rows without
    renumbering, so a row keeps its rank when a reader narrows the view.
    A reference row sits below every entry with a higher-or-equal Average.
    """
    in_track = [e for e in entries if track == ALL_TRACKS or e.track == track]
    ranked = [
        BoardRow(rank=position, entry=entry)
        for position, entry in rank(in_track)
        if base_model is None or entry.base_model == base_model
    ]
    rows: list[BoardRow] = []
    pending = sorted(references, key=lambda r: (-r.average, r.letter))
    for row in ranked:
        while pending and pending[0].average > round(row.average, 2):
            rows.append(BoardRow(rank=None, reference=pending.pop(0)))
        rows.append(row)
    rows.extend(BoardRow(rank=None, reference=r) for r in pending)
    rows.extend(
        BoardRow(rank=None, entry=entry)
        for entry in unranked(in_track)
        if base_model is None or entry.base_model == base_model
    )
    return rows


def pareto_front(entries: Iterable[Entry]) -> list[Entry]:
    """The entries no other entry beats on both axes (higher Average for no more bytes).

    Returns them by increasing communication cost (and so increasing Average): the front a
    reader should try to push up and to the left.
    """
    front: list[Entry] = []
    best = float("-inf")
    for entry in sorted(entries, key=lambda e: (e.comm_bytes, -e.average, e.id or 0)):
        if entry.average > best:
            front.append(entry)
            best = entry.average
    return front


def round_curve(rounds: Sequence[Mapping[str, Any]]) -> list[CurvePoint]:
    """An entry's rounds (its submission's `rounds`) as a curve: the cumulative bytes at the end
    of each round that carries a held-out loss."""
    points, sent = [], 0
    for row in sorted(rounds, key=lambda r: int(r["round"])):
        sent += int(row["downlink_bytes"]) + int(row["uplink_bytes"])
        if row.get("heldout_loss") is not None:
            points.append(CurvePoint(int(row["round"]), sent, float(row["heldout_loss"])))
    return points


def bytes_to_target(rounds: Sequence[Mapping[str, Any]], target: float) -> int | None:
    """Cost-to-Target of an entry: the bytes its federation had sent when its held-out loss first
    reached `target` (None: never, or no held-out losses submitted)."""
    return cost_to_target(round_curve(rounds), target)

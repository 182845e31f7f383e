"""A leaderboard entry: what a row of the board is, and the units it is shown in.

Scores are percentages (0–100) as on the published board. Communication is stored in bytes and
shown as the board's "GB", which is really GiB: the FlowerTune logs say "MB" but mean MiB, and
the board divides that MiB total by 1024 and prints one decimal (40.6 GiB of the Mistral baseline
→ "40.7 GB" after their per-array headers).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from fedtune.units import board_gb, format_gb

GENERAL_NLP = "general-nlp"
OPEN = "open"
TRACKS: tuple[str, ...] = (GENERAL_NLP, OPEN)
TRACK_TITLES = {GENERAL_NLP: "General NLP", OPEN: "Open"}

# Where an entry's scores come from, and so whether the board ranks it. The board ranks only what
# a model reproducibly produced, checked from artefacts it holds (docs/leaderboard.md, "Trust model"):
PUBLISHED = "published"  # quoted from the FlowerTune board, which ran the official evaluation
REPRODUCED = "reproduced"  # re-scored from its outputs, and a verifier re-generated a secret sample
PENDING = "pending"  # re-scored, adapter held, base model loadable: waiting for a verifier
HELD = "held for review"  # reproduced, but above the track's plausibility ceiling
FAILED = "failed verification"  # the sample's letters disagree with the submitted ones
SUBMITTED = "submitted"  # self-reported, or evidence the board cannot check: shown, never ranked
STATUSES: tuple[str, ...] = (PUBLISHED, REPRODUCED, PENDING, HELD, FAILED, SUBMITTED)
RANKED_STATUSES = frozenset({PUBLISHED, REPRODUCED})

# What an operator has decided about an entry: shown (ranked), hidden (off every page), or
# rejected (off the ranking; its page says why).
SHOWN = "shown"
HIDDEN = "hidden"
REJECTED = "rejected"
MODERATIONS: tuple[str, ...] = (SHOWN, HIDDEN, REJECTED)

# The board's score columns, in its order; keys are the evaluation package's category names.
SCORE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("average", "Average"),
    ("stem", "STEM"),
    ("social_sciences", "Social Sciences"),
    ("humanities", "Humanities"),
)


@dataclass(frozen=True)
class Entry:
    """One ranked row. `details` holds everything that is shown but never ranked on.

    `details` keys (all optional for published rows): `evaluation` (protocol, subjects, answer
    distribution, extra figures), `adapter`, `setup`, `provenance`, `config`, `rounds`,
    `communication`.
    """

    team: str
    code_url: str
    base_model: str
    track: str
    comm_bytes: int
    average: float
    stem: float
    social_sciences: float
    humanities: float
    date: str  # ISO 8601 day, e.g. 2025-03-19
    status: str = SUBMITTED
    id: int | None = None
    submitted_at: str = ""
    details: dict[str, Any] = field(default_factory=dict, compare=False)
    moderation: str = SHOWN
    moderation_reason: str = ""

    @property
    def board_gb(self) -> str:
        """Communication as the board prints it: GiB with one decimal, e.g. "2.9 GB"."""
        return format_gb(self.comm_bytes)

    @property
    def ranked(self) -> bool:
        """True when the board checked the scores (published, or reproduced by a verifier)."""
        return self.status in RANKED_STATUSES

    @property
    def protocol(self) -> str:
        """The evaluation protocol name ("flowertune" for the official one), or "" if unknown."""
        return str(self.details.get("evaluation", {}).get("protocol", ""))

    def to_dict(self) -> dict[str, Any]:
        """The entry as the JSON API returns it."""
        return {
            "id": self.id,
            "status": self.status,
            "track": self.track,
            "team": self.team,
            "code_url": self.code_url,
            "base_model": self.base_model,
            "comm_bytes": self.comm_bytes,
            "comm_gb": board_gb(self.comm_bytes),
            "average": self.average,
            "stem": self.stem,
            "social_sciences": self.social_sciences,
            "humanities": self.humanities,
            "date": self.date,
            "submitted_at": self.submitted_at,
            "moderation": self.moderation,
            "moderation_reason": self.moderation_reason,
            "details": self.details,
        }


def board_date(iso_day: str) -> str:
    """ISO day → the board's dd.mm.yy (2025-03-19 → 19.03.25); other text is returned unchanged."""
    try:
        return dt.date.fromisoformat(iso_day).strftime("%d.%m.%y")
    except ValueError:
        return iso_day


def today_utc() -> str:
    """Today's date in UTC as an ISO day."""
    return dt.datetime.now(dt.UTC).date().isoformat()

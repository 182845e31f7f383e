"""`fedtune leaderboard`: submissions, ranking, the web app (registered by the leaderboard package)."""

from __future__ import annotations

from typing import Any


def register(subparsers: Any) -> None:
    """Add the `leaderboard` command group. Filled in by the leaderboard package."""

"""`fedtune eval`: MMLU evaluation (registered by the evaluation package)."""

from __future__ import annotations

from typing import Any


def register(subparsers: Any) -> None:
    """Add the `eval` command group. Filled in by the evaluation package."""

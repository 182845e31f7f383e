"""A one-line progress bar on stderr: questions done, questions/s and ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """Redraws at most every `interval_s` seconds; `close()` prints the final line with a
    newline."""

    def __init__(
        self, total: int, label: str = "", stream: TextIO | None = None, interval_s: float = 0.5
    ) -> None:
        """Start timing now.

        Args:
            total: number of questions expected.
            label: a short prefix, e.g. "flowertune stem+ss+hum".
            stream: where to draw (default stderr).
            interval_s: shortest time between redraws.
        """
        self.total = total
        self.label = label
        self.stream = stream or sys.stderr
        self.interval_s = interval_s
        self.done = 0
        self.started = time.perf_counter()
        self._last_draw = 0.0

    def __call__(self, count: int) -> None:
        """Record `count` more finished questions."""
        self.done += count
        now = time.perf_counter()
        if now - self._last_draw >= self.interval_s or self.done >= self.total:
            self._last_draw = now
            self._draw(end="\r")

    @property
    def elapsed_s(self) -> float:
        """Seconds since the bar was created."""
        return time.perf_counter() - self.started

    def line(self) -> str:
        """The current progress line (without control characters)."""
        elapsed = self.elapsed_s
        rate = self.done / elapsed if elapsed > 0 else 0.0
        remaining = (self.total - self.done) / rate if rate > 0 else float("nan")
        width = 24
        filled = int(width * self.done / self.total) if self.total else width
        bar = "#" * filled + "-" * (width - filled)
        eta = _clock(remaining) if remaining == remaining else "?"
        return (
            f"{self.label} [{bar}] {self.done}/{self.total} {rate:.2f} q/s "
            f"elapsed {_clock(elapsed)} ETA {eta}"
        )

    def _draw(self, end: str) -> None:
        self.stream.write(self.line() + end)
        self.stream.flush()

    def close(self) -> None:
        """Print the final state and a newline."""
        self._draw(end="\n")


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"

"""Byte units and how fedtune prints them: the one owner of both.

fedtune counts bytes exactly and prints binary units (KiB, MiB, GiB). The FlowerTune board's "GB" is
a MiB total (which Flower's logs call MB) divided by 1024 — a GiB — printed with one decimal.
"""

from __future__ import annotations

KIB = 1024
MIB = 1024**2
BYTES_PER_GB = 1024**3  # the board's "GB": a MiB total divided by 1024


def human_bytes(count: float) -> str:
    """A byte count in the largest binary unit below 1024 of it ("3.5 MiB", "512 B")."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"  # pragma: no cover


def board_gb(total_bytes: int) -> float:
    """The leaderboard's "GB": the MiB total / 1024, one decimal."""
    return round(total_bytes / BYTES_PER_GB, 1)


def format_gb(num_bytes: int) -> str:
    """Bytes → the board's "GB" string: GiB with one decimal ("2.9 GB").

    Below 0.05 GB one decimal would print "0.0 GB" for every small run, so two significant digits
    are shown instead ("0.0043 GB"); the board has no such rows.
    """
    gb = num_bytes / BYTES_PER_GB
    if 0 < gb < 0.05:
        return f"{gb:.2g} GB"
    return f"{board_gb(num_bytes):.1f} GB"


UNITS = {"b": 1, "kib": KIB, "mib": MIB, "gib": 1024**3, "kb": 1000, "mb": 1000**2,
         "gb": BYTES_PER_GB}  # fmt: skip


def parse_bytes(text: str) -> int:
    """ "2000000", "1.5MiB", "0.1GB" (the board's GB, a GiB) → bytes; decimal kB and MB as SI.

    Raises:
        ValueError: not a number with an optional unit, or negative.
    """
    raw = text.strip().replace(" ", "").lower()
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number) :] or "b"
    if unit not in UNITS:
        raise ValueError(f"{text!r}: unit must be one of B, KiB, MiB, GiB, kB, MB, GB")
    try:
        value = float(number) * UNITS[unit]
    except ValueError:
        raise ValueError(f"{text!r} is not a byte count") from None
    if not value >= 0:
        raise ValueError(f"{text!r}: a byte count cannot be negative")
    return int(value)

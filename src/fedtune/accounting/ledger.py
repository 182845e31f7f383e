"""The communication ledger: bytes per round × client × direction, counted on serialized records.

Board-compatible bytes are what the FlowerTune tracker counts: for every ArrayRecord in a message,
the length of each array's serialized payload (`len(array.data)`: the .npy bytes, i.e. the raw
tensor plus a 128-byte header per array for the shapes adapters have); key names and configs are not
counted. Check against the board: SmolLM2-135M DoRA r=8 on q,v has 180 arrays and 483,840 fp32
parameters → 1,935,360 + 180 × 128 = 1,958,400 bytes per message; 100 rounds × 2 clients × 2
directions → 783,360,000 bytes = 747.1 MiB, the board's "0.7 GB".
`wire_bytes` is the size of the whole serialized RecordDict (keys, config, metrics included), for
readers who want the honest transport figure.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedtune.units import MIB, board_gb


def array_record_bytes(record: Any) -> int:
    """Board-compatible bytes of one ArrayRecord: the serialized payload of each array."""
    return sum(len(array.data) for array in record.values())


def record_payload_bytes(content: Any) -> tuple[int, int]:
    """(payload bytes, array count) over every ArrayRecord of a message's RecordDict."""
    records = list(content.array_records.values())
    return sum(array_record_bytes(r) for r in records), sum(len(r) for r in records)


def record_wire_bytes(content: Any) -> int:
    """Size of the RecordDict as Flower serializes it for the wire."""
    from flwr.common.serde import recorddict_to_proto

    return int(recorddict_to_proto(content).ByteSize())


@dataclass
class LedgerEntry:
    round: int
    node_id: int
    partition_id: int
    downlink_bytes: int = 0
    uplink_bytes: int = 0
    downlink_arrays: int = 0
    uplink_arrays: int = 0
    downlink_wire_bytes: int = 0
    uplink_wire_bytes: int = 0
    attempt: int = 1  # a round retried with other clients has entries for each attempt


@dataclass
class Ledger:
    """Running totals plus an append-only JSON Lines file (one line per client per round)."""

    path: Path | None = None
    downlink_bytes: int = 0
    uplink_bytes: int = 0
    downlink_wire_bytes: int = 0
    uplink_wire_bytes: int = 0
    entries: int = 0
    per_round: dict[int, dict[str, int]] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.downlink_bytes + self.uplink_bytes

    def record(self, entries: Iterable[LedgerEntry]) -> None:
        """Add a round's entries to the totals and append them to the file."""
        lines = []
        for entry in entries:
            self.downlink_bytes += entry.downlink_bytes
            self.uplink_bytes += entry.uplink_bytes
            self.downlink_wire_bytes += entry.downlink_wire_bytes
            self.uplink_wire_bytes += entry.uplink_wire_bytes
            totals = self.per_round.setdefault(entry.round, {"downlink": 0, "uplink": 0})
            totals["downlink"] += entry.downlink_bytes
            totals["uplink"] += entry.uplink_bytes
            self.entries += 1
            lines.append(json.dumps(asdict(entry)))
        if self.path is not None and lines:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write("\n".join(lines) + "\n")

    def would_exceed(self, budget_bytes: int, next_round_bytes: int) -> bool:
        """True when a budget is set and the next round would push the total past it."""
        return budget_bytes > 0 and self.total_bytes + next_round_bytes > budget_bytes

    def summary(self) -> dict[str, Any]:
        return {
            "downlink_bytes": self.downlink_bytes,
            "uplink_bytes": self.uplink_bytes,
            "total_bytes": self.total_bytes,
            "total_mib": round(self.total_bytes / MIB, 3),
            "board_gb": board_gb(self.total_bytes),
            "wire_bytes": self.downlink_wire_bytes + self.uplink_wire_bytes,
            "entries": self.entries,
            "counting": "sum of len(array.data) over ArrayRecords (FlowerTune tracker)",
        }

    @classmethod
    def continued(cls, path: Path | None, position: dict[str, int]) -> Ledger:
        """A ledger whose totals continue from `position` (a resumed run's)."""
        keys = (
            "entries",
            "downlink_bytes",
            "uplink_bytes",
            "downlink_wire_bytes",
            "uplink_wire_bytes",
        )
        ledger = cls(path)
        for key in keys:
            setattr(ledger, key, int(position[key]))
        return ledger

    def position(self) -> dict[str, int]:
        """What a resumed run needs to continue the ledger exactly."""
        return {
            "entries": self.entries,
            "downlink_bytes": self.downlink_bytes,
            "uplink_bytes": self.uplink_bytes,
            "downlink_wire_bytes": self.downlink_wire_bytes,
            "uplink_wire_bytes": self.uplink_wire_bytes,
        }

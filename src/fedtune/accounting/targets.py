"""Cost-to-Target and Quality-under-Budget: a run's bytes judged by the quality they bought.

Both read one curve: the held-out loss after each evaluated round against the cumulative bytes
(down + up, as the ledger counts them) at the end of that round; round 0 is the evaluation before
training, at 0 bytes.

- **Cost-to-Target** (`cost_to_target`): the cumulative bytes at the end of the first round whose
  held-out loss is at or below the target; None when the run never reached it. The natural target
  when comparing methods is a reference run's final held-out loss, and the headline ratio is the
  reference's total bytes over a method's cost-to-target (`fewer_bytes`).
- **Quality-under-Budget** (`quality_under_budget`): the lowest held-out loss among the rounds
  whose cumulative bytes stay within the budget (round 0 always does); None for an empty curve.

Round granularity, no interpolation: a round's bytes are paid whole before its loss is known.
These are the two measures Flower's EdgeFlowerTune benchmark judges runs by; `fedtune report`,
the benchmarks and the leaderboard all compute them here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CurvePoint:
    """One evaluated round: its number, the bytes sent by its end, its held-out loss."""

    round: int
    bytes: int
    loss: float


def curve(
    rounds: Sequence[int], cumulative_bytes: Sequence[int], losses: Mapping[int, float]
) -> list[CurvePoint]:
    """The evaluated rounds as points: `rounds[i]` ended with `cumulative_bytes[i]` sent;
    `losses` is round → held-out loss (round 0, before training, at 0 bytes)."""
    sent = dict(zip(rounds, cumulative_bytes, strict=True))
    sent[0] = 0
    return [CurvePoint(r, sent[r], losses[r]) for r in sorted(losses) if r in sent]


def cost_to_target(points: Iterable[CurvePoint], target: float) -> int | None:
    """Bytes sent by the end of the first round whose loss reached `target` (None: never)."""
    for point in sorted(points, key=lambda p: p.round):
        if point.loss <= target:
            return point.bytes
    return None


def quality_under_budget(points: Iterable[CurvePoint], budget: int) -> float | None:
    """The lowest loss among the rounds whose bytes stay within `budget` (None: no such round)."""
    within = [p.loss for p in points if p.bytes <= budget]
    return min(within) if within else None


def fewer_bytes(reference_bytes: int, cost: int | None) -> float | None:
    """How many times fewer bytes than the reference's total a cost-to-target is (None: the
    target was not reached; inf: reached before any byte was sent)."""
    if cost is None:
        return None
    return float("inf") if cost == 0 else reference_bytes / cost

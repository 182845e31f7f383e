"""The board's verification policy: every setting an operator may change, declared once.

Each setting has its flat key (as `fedtune leaderboard policy set KEY VALUE` takes it), its
default, its range and its meaning here; the store keeps the operator's values (table `settings`)
and everything else — the intake of a submission, the verifier's sample, the verdict, the CLI's
listing and the docs — reads them through `Policy`.

Defaults, and why:
- `sample-per-category` 100: 300 questions per entry, ~1–2 min of the embedded model on a 2-core
  CPU (docs/benchmarks.md); an entry whose answers differ from its model's on a fraction f of the
  questions agrees on about 1 − f of the sample, and at n = 300 the chance that f = 5 % still
  reaches a 0.98 threshold is below 1 % (binomial tail).
- `agreement-threshold` 0.98: honest entries re-generated on the same kind of machine agree on
  every letter (the protocols are deterministic; the board protocol re-checks near ties one question
  at a time); the margin allows a few letters to flip where the submitter's hardware or precision
  differed from the verifier's (greedy outputs can differ in the last bits of a logit).
- `lease-s` 900: how long a claimed verification stays with its worker without a sign of life;
  a worker reports progress at least every third of it, so only a dead or cut-off worker loses it.
- `max-attempts` 3: how many workers may take a verification and lose it (die, or stop reporting
  until the lease runs out) before it stops being handed out: an adapter that crashes every
  verifier would otherwise be retaken forever. It then waits, `stalled`, for an operator's
  `requeue` (which gives it one more try).
- `ceiling-margin` 5.0: an entry more than 5 points above the best published Average (69.25)
  waits for an operator even when reproduced; `ceiling.<track>` sets a track's ceiling outright.
- `max-adapter-mib` 512: an 8B model's LoRA r = 32 on q, v in fp32 is ~80 MiB; all seven linear
  projections at r = 64 ~450 MiB.
- `target-heldout-loss` unset: Cost-to-Target needs a target that the entries' held-out losses can
  be compared against (the same base model, data and held-out rows); the operator who runs such a
  board sets it, and the board then shows and sorts by each entry's bytes to reach it.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedtune.leaderboard.entry import TRACKS
from fedtune.units import MIB


class PolicyError(ValueError):
    """An unknown policy key or a value outside its range."""


class Policy(BaseModel):
    """The verification policy (flat keys are the field names with `-` for `_`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    sample_per_category: int = Field(
        100, ge=1, le=5000, description="questions drawn per scored category for a spot check"
    )
    agreement_threshold: float = Field(
        0.98, ge=0.0, le=1.0, description="share of sampled letters that must agree to rank"
    )
    lease_s: int = Field(
        900, ge=5, le=86400, description="seconds a claimed verification stays with its worker"
    )
    max_attempts: int = Field(
        3, ge=1, le=100, description="workers that may lose a verification before it stalls"
    )
    ceiling_margin: float = Field(
        5.0, ge=0.0, le=100.0, description="points above the best published Average held for review"
    )
    ceiling_general_nlp: float | None = Field(
        None, ge=0.0, le=100.0, description="General NLP ceiling (default: best published + margin)"
    )
    ceiling_open: float | None = Field(
        None, ge=0.0, le=100.0, description="open-track ceiling (default: best published + margin)"
    )
    max_adapter_mib: int = Field(
        512, ge=1, le=16384, description="largest adapter weights file accepted, MiB"
    )
    target_heldout_loss: float | None = Field(
        None,
        ge=0.0,
        le=100.0,
        description="held-out loss of the board's 'To target' column: the bytes an entry's "
        "curve sent until it reached it (unset: no column)",
    )

    @property
    def max_adapter_bytes(self) -> int:
        """`max-adapter-mib` in bytes."""
        return self.max_adapter_mib * MIB

    def ceiling(self, track: str, best_published: float) -> float:
        """The Average above which a reproduced entry of `track` waits for an operator."""
        explicit = getattr(self, _field(f"ceiling.{track}"), None) if track in TRACKS else None
        return explicit if explicit is not None else best_published + self.ceiling_margin

    def flat(self) -> dict[str, Any]:
        """Every setting by its flat key."""
        return {key(name): value for name, value in self.model_dump().items()}


def key(field_name: str) -> str:
    """A field's flat key: `ceiling_general_nlp` → `ceiling.general-nlp`."""
    if field_name.startswith("ceiling_") and field_name != "ceiling_margin":
        return "ceiling." + field_name.removeprefix("ceiling_").replace("_", "-")
    return field_name.replace("_", "-")


def _field(flat_key: str) -> str:
    return flat_key.replace(".", "_").replace("-", "_")


KEYS: tuple[str, ...] = tuple(key(name) for name in Policy.model_fields)


def describe() -> list[tuple[str, Any, str]]:
    """(flat key, default, description) of every setting, for listings and docs."""
    return [
        (key(name), info.default, info.description or "")
        for name, info in Policy.model_fields.items()
    ]


def build(values: dict[str, Any]) -> Policy:
    """A policy from flat keys (absent keys keep their defaults).

    Raises:
        PolicyError: an unknown key (naming the known ones) or a value out of range.
    """
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise PolicyError(f"unknown policy key {unknown[0]!r}; known: {', '.join(KEYS)}")
    try:
        return Policy.model_validate({_field(k): v for k, v in values.items()})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = key(str(first["loc"][0])) if first["loc"] else ""
        raise PolicyError(f"{where}: {first['msg']} (got {first.get('input')!r})") from None


def parse_value(text: str) -> Any:
    """A value typed on the command line: JSON (numbers, null) or else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text

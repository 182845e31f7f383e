"""Client updates: decode a reply, then decide whether it may be aggregated.

A reply is dropped — with the reason recorded in clients.jsonl and counted in metrics.jsonl —
when it is an error, has no adapter or metrics, its metrics break the schema
(`messages.REPLY_METRICS`), its tensors do not fit the adapter (keys, shapes, dtypes), hold a NaN or
an infinity, or its update is far larger than the cohort's (the norm rule below). Nothing a
client sends can put a NaN into the global adapter or end the run by itself.

The norm rule. An update's norm is ‖client adapter − global adapter‖₂ over all tensors. The
reference is the median of the norms accepted over the last `validate.norm-window-rounds` rounds;
in the first round, with no history, it is the smallest norm in the cohort (so one outlier cannot
raise its own bar). An update above `validate.update-norm-ratio` × reference is dropped. Norms
shrink as the learning rate decays, which the moving window follows.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from fedtune.compression.codecs import CodecError
from fedtune.federation.messages import (
    ARRAYS,
    MAX_EXAMPLES,
    METRICS,
    ReplyError,
    check_reply_metrics,
)


@dataclass
class ClientUpdate:
    """One client's answer in one attempt of one round."""

    node_id: int
    partition_id: int
    attempt: int
    reply: Any = None  # flwr Message, or None when nothing came back in time
    problem: str | None = None
    metrics: dict[str, int | float] = field(default_factory=dict)
    ignored_metrics: list[str] = field(default_factory=list)
    arrays: Any = None  # decoded ArrayRecord
    norm: float | None = None
    side: dict[str, Any] = field(default_factory=dict)  # a strategy's extra records (SCAFFOLD)

    @property
    def usable(self) -> bool:
        return self.problem is None


def short_reason(text: str, limit: int = 300) -> str:
    """The last meaningful line of an error (a traceback's exception line), shortened."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    line = lines[-1] if lines else "unknown error"
    return line if len(line) <= limit else line[: limit - 1] + "…"


def check_reply(
    update: ClientUpdate,
    decode: Any,
    expected_spec: dict[str, tuple[tuple[int, ...], str]],
    global_arrays: dict[str, Any],
    max_examples: int = MAX_EXAMPLES,
) -> None:
    """Decode the reply and check everything that does not depend on the rest of the cohort.
    Sets `update.problem` on failure, else `arrays`, `metrics` and `norm`."""
    import numpy as np

    from fedtune.model.adapters import AdapterMismatch, check_state

    reply = update.reply
    if reply is None:
        update.problem = "no reply within strategy.round-timeout-s"
        return
    if reply.has_error():
        update.problem = f"client error: {short_reason(reply.error.reason)}"
        return
    content = reply.content
    if ARRAYS not in content.array_records or METRICS not in content.metric_records:
        update.problem = "reply without adapter or metrics"
        return
    try:
        update.metrics, update.ignored_metrics = check_reply_metrics(
            dict(content.metric_records[METRICS]), max_examples
        )
        arrays = decode(content.array_records[ARRAYS])
        received = {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}
        check_state(expected_spec, received)
    except (ReplyError, AdapterMismatch, CodecError) as exc:
        update.problem = str(exc)
        return
    squared = 0.0
    for key, array in arrays.items():
        values = array.numpy()
        if not np.isfinite(values).all():
            update.problem = f"non-finite values in {key}"
            return
        squared += float(np.sum((values.astype(np.float64) - global_arrays[key]) ** 2))
    update.arrays = arrays
    update.norm = math.sqrt(squared)


def check_side_records(
    update: ClientUpdate, names: tuple[str, ...], spec: dict[str, tuple[tuple[int, ...], str]]
) -> None:
    """A strategy's extra reply records (fp32, the travelling adapter's layout, finite) are
    kept in `update.side`; a missing or malformed one drops the reply."""
    import numpy as np

    from fedtune.model.adapters import AdapterMismatch, check_state

    if not update.usable or not names:
        return
    content = update.reply.content
    for name in names:
        if name not in content.array_records:
            update.problem = f"reply without its {name!r} record"
            return
        record = content.array_records[name]
        try:
            values = {k: a.numpy() for k, a in record.items()}
            check_state(spec, {k: (tuple(v.shape), str(v.dtype)) for k, v in values.items()})
        except (AdapterMismatch, ValueError, TypeError) as exc:
            update.problem = f"{name}: {exc}"
            return
        if not all(np.isfinite(v).all() for v in values.values()):
            update.problem = f"{name}: non-finite values"
            return
        update.side[name] = record


def norm_reference(history: list[list[float]], cohort: list[float]) -> float | None:
    """The norm the rule compares with (see the module docstring); None when there is none."""
    accepted = [norm for round_norms in history for norm in round_norms]
    if accepted:
        return statistics.median(accepted)
    return min(cohort) if cohort else None


def drop_outliers(updates: list[ClientUpdate], history: list[list[float]], ratio: float) -> None:
    """Apply the norm rule to the usable updates of one attempt (in place)."""
    usable = [u for u in updates if u.usable and u.norm is not None]
    if ratio <= 0 or not usable:
        return
    reference = norm_reference(history, [u.norm for u in usable if u.norm is not None])
    if not reference or reference <= 0:
        return
    for update in usable:
        assert update.norm is not None
        if update.norm > ratio * reference:
            update.problem = (
                f"update norm {update.norm:.4g} is over {ratio:g}× the reference "
                f"{reference:.4g} (validate.update-norm-ratio)"
            )
            update.arrays = None

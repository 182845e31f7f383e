"""What travels between the ServerApp and the ClientApp: record keys and the reply schema.

Both apps import this module, so the two sides cannot drift apart.

A train message holds three records:
- `arrays` (ArrayRecord): the global adapter, as the downlink codec encoded it;
- `config` (ConfigRecord): the strategy's own record (`server-round`, and whatever a strategy
  adds: FedProx's `proximal-mu`, a DP wrapper's clipping norm, ...). It reaches the client
  untouched; the client reads the keys it knows and ignores the rest;
- `run-config` (ConfigRecord): fedtune's resolved flat configuration, so every client trains
  with exactly the server's settings;
- `run-context` (ConfigRecord): `run-dir`, the server's run directory, where a simulated node
  keeps the state it must carry across a resume (error-feedback residuals) when its node config
  names no `state-dir` of its own.
With SCAFFOLD a train message also holds `scaffold-control` (ArrayRecord, fp32: the server's
control variate c over the adapter tensors that travel), and its reply `scaffold-control-delta`
(the client's cᵢ⁺ − cᵢ); both are paid for in the ledger like the adapter.
A reply holds `arrays` (the client's adapter, encoded by the uplink codec) and `metrics`
(MetricRecord) following REPLY_METRICS. A query message (node discovery) holds `run-config`;
its reply holds `node` (MetricRecord: partition-id, num-partitions).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ARRAYS = "arrays"
STRATEGY_CONFIG = "config"
RUN_CONFIG = "run-config"
METRICS = "metrics"
NODE = "node"
RUN_CONTEXT = "run-context"
CONTROL = "scaffold-control"
CONTROL_DELTA = "scaffold-control-delta"

# The weight FedAvg-family strategies aggregate by.
WEIGHT_KEY = "num-examples"
# Upper bound on a client's example count when its partition size is unknown (hub data):
# anything larger is a corrupted or hostile reply, not a data set.
MAX_EXAMPLES = 2**31 - 1


@dataclass(frozen=True)
class MetricSpec:
    kind: type  # int or float
    minimum: float = 0.0
    required: bool = True
    doc: str = ""


REPLY_METRICS: dict[str, MetricSpec] = {
    "train-loss": MetricSpec(float, doc="mean loss of the round's optimizer steps"),
    WEIGHT_KEY: MetricSpec(int, minimum=1, doc="examples the client holds (FedAvg weight)"),
    "examples-seen": MetricSpec(int, doc="examples trained on this round"),
    "tokens": MetricSpec(int, doc="real (unpadded) tokens trained on"),
    "response-tokens": MetricSpec(int, doc="tokens that carried a label"),
    "padded-tokens": MetricSpec(int, doc="tokens computed, padding included"),
    "learning-rate": MetricSpec(float, doc="the round's learning rate"),
    "seconds": MetricSpec(float, doc="time from message to reply"),
    "train-seconds": MetricSpec(float, doc="time in the training loop"),
    "partition-id": MetricSpec(int, doc="the client's data partition"),
    "partition-rows": MetricSpec(int, required=False, doc="rows in the partition"),
    "skipped-rows": MetricSpec(int, required=False, doc="rows without instruction/response"),
    "truncated": MetricSpec(int, required=False, doc="responses cut by train.seq-length"),
    "dropped-no-response": MetricSpec(int, required=False, doc="examples with no label left"),
    "dp-update-norm": MetricSpec(
        float, required=False, doc="with DP: the update's L2 norm before clipping"
    ),
}


class ReplyError(ValueError):
    """A reply that cannot be aggregated; the message is the reason recorded for it."""


def check_reply_metrics(
    metrics: Mapping[str, Any], max_examples: int = MAX_EXAMPLES
) -> tuple[dict[str, int | float], list[str]]:
    """Check a reply's metrics against REPLY_METRICS.

    Returns:
        (the schema's metrics, converted to their kinds; the names of keys outside the schema,
        which are ignored so that one client's extra key cannot break aggregation).
    Raises:
        ReplyError: a required key is missing, a value is not a finite number of the right kind,
            below its minimum, or `num-examples` above `max_examples`.
    """
    clean: dict[str, int | float] = {}
    for key, spec in REPLY_METRICS.items():
        if key not in metrics:
            if spec.required:
                raise ReplyError(f"metric {key!r} missing")
            continue
        value = metrics[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ReplyError(f"metric {key!r} is not a number: {value!r}")
        if not math.isfinite(value):
            raise ReplyError(f"metric {key!r} is not finite: {value!r}")
        if spec.kind is int and float(value) != int(value):
            raise ReplyError(f"metric {key!r} is not an integer: {value!r}")
        if value < spec.minimum:
            raise ReplyError(f"metric {key!r} is {value!r}, below {spec.minimum:g}")
        clean[key] = int(value) if spec.kind is int else float(value)
    if clean[WEIGHT_KEY] > max_examples:
        raise ReplyError(
            f"metric {WEIGHT_KEY!r} is {clean[WEIGHT_KEY]:,}, more than the {max_examples:,} "
            "rows this client's partition can hold"
        )
    extra = sorted(set(metrics) - set(REPLY_METRICS))
    return clean, extra

"""One federated round as named steps, and the loop state that saves and restores itself.

    configure → encode → meter → send → decode → validate → aggregate → evaluate → record/checkpoint

- configure: fedtune samples partitions (seeded) and maps them to nodes; the strategy builds the
  messages at its documented hook (`configure_train`) from the nodes it is shown; the run config
  is added in its own record.
- encode / decode: the codecs of the downlink and the uplink (`compression/`, `compress.*`); the
  uplink is decoded against the global adapter the round sent (for `delta`).
- meter: the ledger counts what is really serialized, downlink and uplink separately.
- send: one bounded wait (`strategy.round-timeout-s`).
- validate: `updates.py`; dropped replies keep their reason. Fewer than `strategy.min-clients`
  usable replies → the round is retried with other clients, up to `strategy.max-retries` times.
- aggregate: the strategy's `aggregate_train`, on the usable replies in partition order (so the
  floating-point sum is the same in every run); the result is cast back to the adapter's dtypes
  and must be finite.
- record/checkpoint: logs, then a resume point holding everything in `LoopState`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from logging import INFO
from typing import Any

from fedtune.accounting.ledger import (
    Ledger,
    LedgerEntry,
    array_record_bytes,
    record_payload_bytes,
    record_wire_bytes,
)
from fedtune.compression.codecs import CodecSpec
from fedtune.compression.message import MessageCodec
from fedtune.federation.messages import ARRAYS, MAX_EXAMPLES, RUN_CONFIG, RUN_CONTEXT, WEIGHT_KEY
from fedtune.federation.nodes import NodeDirectory, PartitionSampler, exchange
from fedtune.federation.strategies import restore_strategy_state, strategy_state
from fedtune.federation.updates import (
    ClientUpdate,
    check_reply,
    check_side_records,
    drop_outliers,
)
from fedtune.rundir import RunDirectory, RunDirError

STATE_FORMAT = 1


def zstd_bound(size: int) -> int:
    """The most a zstd frame of `size` input bytes can take (ZSTD_COMPRESSBOUND), plus fedtune's
    3-byte marker: the budget's estimate of a reply never undercounts."""
    small = (131072 - size) >> 11 if size < 131072 else 0
    return size + (size >> 8) + small + 3


class FederationError(RuntimeError):
    """A round could not produce an aggregate; the run stops with a resumable checkpoint."""


class BudgetReached(Exception):
    """The next attempt would take the total past run.byte-budget (`kind` "budget"), or the
    next release past dp.max-epsilon (`kind` "privacy-budget")."""

    def __init__(self, message: str, kind: str = "budget") -> None:
        super().__init__(message)
        self.kind = kind


# --------------------------------------------------------------------------------------------
# Loop state
# --------------------------------------------------------------------------------------------


@dataclass
class LoopState:
    """Everything the loop carries from one round to the next; saved at every resume point."""

    arrays: Any  # the global adapter, a flwr ArrayRecord
    round: int = 0  # rounds completed
    sampler: list[Any] = field(default_factory=list)  # PartitionSampler state
    norm_history: list[list[float]] = field(default_factory=list)
    server_eval: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0  # time spent in earlier processes of this run
    last_train_loss: float | None = None
    dropped_replies: int = 0
    retries: int = 0
    max_uplink_bytes: int = 0  # largest uplink payload of one reply so far
    stopped: str | None = None  # "budget" when run.byte-budget stopped the loop
    checkpoint_seconds: list[float] = field(default_factory=list)  # writing each round's point
    resumes: list[dict[str, Any]] = field(default_factory=list)
    privacy_releases: list[int] = field(default_factory=list)  # clients in each DP release

    def save(
        self, run_dir: RunDirectory, ledger: Ledger, strategy: Any, checkpoint_s: float = 0.0
    ) -> None:
        """Write a resume point: global adapter and strategy state bit for bit, the rest JSON."""
        tensors = {f"global.{k}": v for k, v in self.arrays.to_torch_state_dict().items()}
        strategy_tensors, strategy_described = strategy_state(strategy)
        tensors.update(strategy_tensors)
        run_dir.write_resume_point(
            self.round,
            tensors,
            {
                "format": STATE_FORMAT,
                "global_keys": list(self.arrays.keys()),
                "strategy": {"class": type(strategy).__name__, "state": strategy_described},
                "sampler": self.sampler,
                "norm_history": self.norm_history,
                "server_eval": self.server_eval,
                "elapsed_s": self.elapsed_s,
                "last_train_loss": self.last_train_loss,
                "dropped_replies": self.dropped_replies,
                "retries": self.retries,
                "max_uplink_bytes": self.max_uplink_bytes,
                "stopped": self.stopped,
                "checkpoint_seconds": self.checkpoint_seconds,
                "resumes": self.resumes,
                "privacy_releases": self.privacy_releases,
                "ledger": ledger.position(),
                "logs": run_dir.log_positions(),
            },
        )

    @classmethod
    def restore(
        cls, run_dir: RunDirectory, strategy: Any
    ) -> tuple[LoopState, dict[str, Any]] | None:
        """The state of the last resume point with the strategy's state put back, and the ledger
        position; None when the run never reached one.

        Raises:
            RunDirError: a damaged point, or one written by another strategy.
        """
        from flwr.app import ArrayRecord

        point = run_dir.read_resume_point()
        if point is None:
            return None
        saved, tensors = point
        if saved.get("format") != STATE_FORMAT:
            raise RunDirError(f"resume point format {saved.get('format')!r} is not {STATE_FORMAT}")
        if saved["strategy"]["class"] != type(strategy).__name__:
            raise RunDirError(
                f"the resume point was written by {saved['strategy']['class']}, "
                f"this run builds {type(strategy).__name__}"
            )
        restore_strategy_state(strategy, tensors, saved["strategy"]["state"])
        arrays = ArrayRecord({k: tensors[f"global.{k}"] for k in saved["global_keys"]})
        state = cls(
            arrays=arrays,
            round=int(saved["round"]),
            sampler=saved["sampler"],
            norm_history=saved["norm_history"],
            server_eval=saved["server_eval"],
            elapsed_s=float(saved["elapsed_s"]),
            last_train_loss=saved["last_train_loss"],
            dropped_replies=int(saved["dropped_replies"]),
            retries=int(saved["retries"]),
            max_uplink_bytes=int(saved["max_uplink_bytes"]),
            stopped=saved["stopped"],
            checkpoint_seconds=saved["checkpoint_seconds"],
            resumes=saved["resumes"],
            privacy_releases=saved.get("privacy_releases", []),
        )
        return state, {**saved["ledger"], "logs": saved["logs"]}


# --------------------------------------------------------------------------------------------
# One round
# --------------------------------------------------------------------------------------------


@dataclass
class RoundContext:
    """What every round uses and nothing in a round changes."""

    grid: Any
    strategy: Any
    nodes: NodeDirectory
    sampler: PartitionSampler
    ledger: Ledger
    run_config: dict[str, Any]
    expected_spec: dict[str, tuple[tuple[int, ...], str]]
    clients_per_round: int
    min_clients: int
    max_retries: int
    round_timeout_s: float
    byte_budget: int
    norm_ratio: float
    norm_window: int
    partition_rows: list[int] | None  # rows per partition when the server knows them
    downlink: MessageCodec = field(default_factory=lambda: MessageCodec(CodecSpec()))
    uplink: MessageCodec = field(default_factory=lambda: MessageCodec(CodecSpec()))
    seed: int = 0  # seeds the downlink's stochastic rounding, per round
    run_dir: str = ""  # where simulated nodes keep state that must survive a resume
    frozen_sha256: str = ""  # digest of the adapter tensors that do not travel (nodes check it)
    rank_of: Any = None  # partition → its LoRA rank, for a strategy with `node_ranks` (FlexLoRA)
    log: Any = None  # callable(str) for per-client problems
    dp: Any = None  # DpConfig when differential privacy is on (privacy.py)
    population: int = 0  # clients in the federation (the accountant's population)


@dataclass
class RoundResult:
    arrays: Any
    metrics: dict[str, Any]
    clients: list[dict[str, Any]]
    accepted_norms: list[float]


class _SampledGrid:
    """Shows a strategy only the nodes fedtune sampled (its documented `grid` argument)."""

    def __init__(self, grid: Any, node_ids: list[int]) -> None:
        self._grid = grid
        self._node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def configure(
    ctx: RoundContext, server_round: int, arrays: Any, partitions: list[int]
) -> list[Any]:
    """The strategy's messages for the sampled partitions, with the run config added."""
    from flwr.app import ConfigRecord

    node_ids = [ctx.nodes.node_of[p] for p in partitions]
    if ctx.rank_of is not None and hasattr(ctx.strategy, "node_ranks"):
        ctx.strategy.node_ranks = {ctx.nodes.node_of[p]: ctx.rank_of(p) for p in partitions}
    messages = list(
        ctx.strategy.configure_train(
            server_round, arrays, ConfigRecord(), _SampledGrid(ctx.grid, node_ids)
        )
    )
    run_config = ConfigRecord(ctx.run_config)
    run_context = ConfigRecord({"run-dir": ctx.run_dir, "frozen-sha256": ctx.frozen_sha256})
    for content in {id(m.content): m.content for m in messages}.values():
        content[RUN_CONFIG] = run_config
        content[RUN_CONTEXT] = run_context
    return messages


def encode(ctx: RoundContext, messages: list[Any], server_round: int) -> list[Any]:
    """Put each message's adapter through the downlink codec (once per shared payload)."""
    import numpy as np

    for content in {id(m.content): m.content for m in messages}.values():
        tensors = {k: a.numpy() for k, a in content.array_records[ARRAYS].items()}
        rng = np.random.default_rng([ctx.seed, server_round, 0])
        content[ARRAYS], _ = ctx.downlink.encode(tensors, rng=rng)
    return messages


def meter_downlink(messages: list[Any]) -> list[tuple[int, int, int]]:
    """(payload bytes, arrays, wire bytes) of each message as serialized."""
    sizes: dict[int, tuple[int, int, int]] = {}
    for message in messages:
        if id(message.content) not in sizes:
            payload, count = record_payload_bytes(message.content)
            sizes[id(message.content)] = (payload, count, record_wire_bytes(message.content))
    return [sizes[id(m.content)] for m in messages]


def expected_uplink_bytes(ctx: RoundContext, state: LoopState, arrays: Any) -> int:
    """What one reply will cost: the largest seen so far, or before any, the global adapter as
    the uplink codec would encode it — without its zstd stage, whose ratio depends on the values
    (an unchanged adapter's delta is all zeros and would compress to almost nothing)."""
    import dataclasses

    import numpy as np

    if state.max_uplink_bytes:
        return state.max_uplink_bytes
    tensors = {k: a.numpy() for k, a in arrays.items()}
    spec = ctx.uplink.spec
    codec = MessageCodec(dataclasses.replace(spec, zstd=0)) if spec.zstd else ctx.uplink
    record, _ = codec.encode(tensors, reference=tensors, rng=np.random.default_rng(0))
    size = array_record_bytes(record)
    # A strategy's extra records travel as fp32 in the adapter's layout (SCAFFOLD's Δcᵢ).
    extra = len(side_records(ctx)) * array_record_bytes(arrays)
    return (zstd_bound(size) if spec.zstd else size) + extra


def send(ctx: RoundContext, messages: list[Any]) -> dict[int, Any]:
    """Send and wait at most the round timeout; replies by node id."""
    replies = exchange(ctx.grid, messages, ctx.round_timeout_s)
    return {reply.metadata.src_node_id: reply for reply in replies}


def side_records(ctx: RoundContext) -> tuple[str, ...]:
    """The extra records the strategy expects in every reply (SCAFFOLD's Δcᵢ)."""
    return tuple(getattr(ctx.strategy, "reply_records", ()))


def sent_adapters(messages: list[Any]) -> dict[int, dict[str, Any]]:
    """node id → the adapter its message carries before encoding (float32 arrays): what its
    reply must match in layout and is decoded and measured against. Nodes sent one body share
    one entry."""
    by_body: dict[int, dict[str, Any]] = {}
    sent = {}
    for message in messages:
        key = id(message.content)
        if key not in by_body:
            by_body[key] = {k: a.numpy() for k, a in message.content.array_records[ARRAYS].items()}
        sent[message.metadata.dst_node_id] = by_body[key]
    return sent


def validate(
    ctx: RoundContext,
    state: LoopState,
    updates: list[ClientUpdate],
    sent: dict[int, dict[str, Any]],
) -> None:
    """Decode and check each reply against what its node was sent (its layout, the reference of
    `delta`, the origin of its norm), then apply the norm rule to the attempt's cohort."""
    layouts: dict[int, tuple[Any, Any]] = {}
    for update in updates:
        reference = sent[update.node_id]
        if id(reference) not in layouts:
            origin = {k: v.astype("float64") for k, v in reference.items()}
            # Shapes from what was sent (FlexLoRA's ranks differ), dtypes the adapter's.
            spec = {k: (tuple(v.shape), ctx.expected_spec[k][1]) for k, v in reference.items()}
            layouts[id(reference)] = (spec, origin)
        spec, origin = layouts[id(reference)]

        def decode(record: Any, spec: Any = spec, reference: Any = reference) -> Any:
            return ctx.uplink.decode(record, spec, reference=reference)

        rows = ctx.partition_rows[update.partition_id] if ctx.partition_rows else None
        check_reply(update, decode, spec, origin, rows or MAX_EXAMPLES)
        check_side_records(
            update, side_records(ctx), {k: (s, "float32") for k, (s, _) in spec.items()}
        )
        if update.usable and update.metrics.get("partition-id") != update.partition_id:
            update.problem = (
                f"reply says partition {update.metrics.get('partition-id')}, "
                f"the node holds {update.partition_id}"
            )
    drop_outliers(updates, state.norm_history[-ctx.norm_window :], ctx.norm_ratio)


def aggregate(
    ctx: RoundContext,
    server_round: int,
    usable: list[ClientUpdate],
    reference: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """The strategy's aggregate of the usable updates, in partition order, cast to the adapter's
    dtypes (a server optimizer may compute in float64). With DP (privacy.py): each update
    clipped against `reference` (the global sent), equal weights, and the server's noise.

    Raises:
        FederationError: the strategy returned nothing or a non-finite adapter.
    """
    import numpy as np
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    from fedtune.federation.privacy import add_noise, clip_update, noise_rng

    dp = ctx.dp
    ordered = sorted(usable, key=lambda u: u.partition_id)
    replies = []
    for update in ordered:
        # The decoded adapter and the schema's metrics only: an extra metric key in one reply
        # must not make the strategy refuse the whole cohort.
        arrays, metrics = update.arrays, dict[str, Any](update.metrics)
        if dp is not None and reference is not None:
            clipped, _ = clip_update(
                {k: a.numpy() for k, a in arrays.items()}, reference, dp.clipping_norm
            )
            arrays = ArrayRecord({k: Array(v) for k, v in clipped.items()})
            metrics[WEIGHT_KEY] = 1  # equal weights: each client's sensitivity is C/n
        update.reply.content = RecordDict(
            {ARRAYS: arrays, "metrics": MetricRecord(metrics), **update.side}
        )
        replies.append(update.reply)
    arrays, metrics = ctx.strategy.aggregate_train(server_round, replies)
    if arrays is None:
        raise FederationError(f"round {server_round}: the strategy aggregated nothing")
    values_of = {key: array.numpy() for key, array in arrays.items()}
    if dp is not None and dp.noise == "server" and dp.noise_multiplier > 0:
        std = dp.noise_multiplier * dp.clipping_norm / len(ordered)
        values_of = add_noise(values_of, std, noise_rng(ctx.seed, server_round, -1))
    cast = {}
    for key, values in values_of.items():
        want = np.dtype(ctx.expected_spec[key][1])
        if not np.isfinite(values).all():
            raise FederationError(f"round {server_round}: the aggregate of {key} is not finite")
        cast[key] = Array(values.astype(want, copy=False))
    return ArrayRecord(cast), metrics


def run_round(ctx: RoundContext, state: LoopState, server_round: int) -> RoundResult:
    """configure → encode → meter → send → decode/validate, retried while too few replies are
    usable; then aggregate. Every attempt's messages go into the ledger.

    Raises:
        BudgetReached: the next attempt would pass run.byte-budget (nothing was sent).
        FederationError: too few usable replies after every retry.
        NodeWaitTimeout: not enough nodes within strategy.node-wait-s.
    """
    from flwr.app import ArrayRecord

    # What travels: the adapter, or a variant's trainable part (FFA-LoRA: the B factors).
    sent = ArrayRecord({k: state.arrays[k] for k in ctx.expected_spec})
    usable: list[ClientUpdate] = []
    clients: list[dict[str, Any]] = []
    tried: set[int] = set()
    down_total = up_total = 0
    attempt = 0
    for attempt in range(1, ctx.max_retries + 2):
        wanted = ctx.clients_per_round - len(usable)
        total = ctx.nodes.num_partitions
        if len(tried) >= total:
            break  # every partition has been asked this round
        # Wait for a full cohort of untried partitions; settle for one when the wait runs out.
        available = ctx.nodes.available(
            need=min(len(tried) + wanted, total), minimum=min(len(tried) + 1, total)
        )
        partitions = ctx.sampler.sample(available, wanted, exclude=tried)
        if not partitions:
            break
        tried.update(partitions)
        messages = configure(ctx, server_round, sent, partitions)
        sent_to = sent_adapters(messages)
        messages = encode(ctx, messages, server_round)
        # The strategy may order its messages as it likes: take each one's partition from its node.
        partitions = [ctx.nodes.partition_of[m.metadata.dst_node_id] for m in messages]
        down = meter_downlink(messages)
        cost = sum(d[0] for d in down) + len(messages) * expected_uplink_bytes(ctx, state, sent)
        if ctx.dp is not None and ctx.dp.max_epsilon > 0 and attempt == 1:
            from fedtune.federation.privacy import epsilon_after

            epsilon = epsilon_after(
                ctx.dp, ctx.population, state.privacy_releases, ctx.clients_per_round
            )
            if epsilon > ctx.dp.max_epsilon:
                raise BudgetReached(
                    f"stopping before round {server_round}: its release would take ε to "
                    f"{epsilon:.3f}, past dp.max-epsilon={ctx.dp.max_epsilon:g} "
                    f"(δ = {ctx.dp.delta:g})",
                    kind="privacy-budget",
                )
        if ctx.ledger.would_exceed(ctx.byte_budget, cost):
            if attempt == 1:
                raise BudgetReached(
                    f"stopping before round {server_round}: it would take the total past "
                    f"run.byte-budget={ctx.byte_budget:,} bytes"
                )
            break
        replies = send(ctx, messages)
        updates = [
            ClientUpdate(m.metadata.dst_node_id, p, attempt, replies.get(m.metadata.dst_node_id))
            for m, p in zip(messages, partitions, strict=True)
        ]
        order = sorted(range(len(updates)), key=lambda i: updates[i].partition_id)
        updates, down = [updates[i] for i in order], [down[i] for i in order]
        validate(ctx, state, updates, sent_to)
        entries = _ledger_entries(server_round, attempt, updates, down)
        ctx.ledger.record(entries)
        down_total += sum(e.downlink_bytes for e in entries)
        up_total += sum(e.uplink_bytes for e in entries)
        state.max_uplink_bytes = max([state.max_uplink_bytes, *(e.uplink_bytes for e in entries)])
        for update in updates:
            clients.append(_client_row(server_round, update))
            if not update.usable and ctx.log is not None:
                ctx.log(
                    f"round {server_round}: partition {update.partition_id} "
                    f"(node {update.node_id}) dropped: {update.problem}"
                )
        usable.extend(u for u in updates if u.usable)
        if len(usable) >= ctx.min_clients:
            break
    dropped = sum(1 for c in clients if "problem" in c)
    state.dropped_replies += dropped
    state.retries += attempt - 1
    if len(usable) < ctx.min_clients:
        reasons = "; ".join(sorted({c["problem"] for c in clients if "problem" in c})) or "none"
        raise FederationError(
            f"round {server_round}: {len(usable)} usable replies after {attempt} attempt(s), "
            f"strategy.min-clients is {ctx.min_clients} (reasons: {reasons})"
        )
    reference = {k: a.numpy() for k, a in sent.items()} if ctx.dp is not None else None
    aggregated_part, aggregated = aggregate(ctx, server_round, usable, reference)
    if ctx.dp is not None:
        state.privacy_releases = [*state.privacy_releases, len(usable)]
    # The new global: the aggregate where it travelled, the frozen rest unchanged, in order.
    arrays = ArrayRecord({k: aggregated_part.get(k, a) for k, a in state.arrays.items()})
    metrics: dict[str, Any] = {
        "round": server_round,
        "attempts": attempt,
        "clients": len(usable),
        "failed_clients": dropped,
        "train_loss": float(aggregated["train-loss"]) if aggregated else None,
        "examples": sum(int(u.metrics["examples-seen"]) for u in usable),
        "tokens": sum(int(u.metrics["tokens"]) for u in usable),
        "response_tokens": sum(int(u.metrics["response-tokens"]) for u in usable),
        "learning_rate": float(usable[0].metrics["learning-rate"]),
        "downlink_bytes": down_total,
        "uplink_bytes": up_total,
    }
    if ctx.dp is not None:
        from fedtune.federation.privacy import privacy_spent

        epsilon = privacy_spent(ctx.dp, ctx.population, state.privacy_releases)["epsilon"]
        metrics["dp_epsilon"] = epsilon if math.isfinite(epsilon) else None  # None: infinite
    norms = [u.norm for u in usable if u.norm is not None]
    return RoundResult(arrays, metrics, clients, norms)


def _ledger_entries(
    server_round: int, attempt: int, updates: list[ClientUpdate], down: list[tuple[int, int, int]]
) -> list[LedgerEntry]:
    entries = []
    for update, (down_bytes, down_arrays, down_wire) in zip(updates, down, strict=True):
        entry = LedgerEntry(
            server_round,
            update.node_id,
            update.partition_id,
            attempt=attempt,
            downlink_bytes=down_bytes,
            downlink_arrays=down_arrays,
            downlink_wire_bytes=down_wire,
        )
        reply = update.reply
        if reply is not None and reply.has_content():
            entry.uplink_bytes, entry.uplink_arrays = record_payload_bytes(reply.content)
            entry.uplink_wire_bytes = record_wire_bytes(reply.content)
        entries.append(entry)
    return entries


def _client_row(server_round: int, update: ClientUpdate) -> dict[str, Any]:
    row: dict[str, Any] = {
        "round": server_round,
        "attempt": update.attempt,
        "node_id": update.node_id,
        "partition_id": update.partition_id,
    }
    if update.problem is not None:
        row["problem"] = update.problem
        return row
    m = update.metrics
    row.update(
        train_loss=m["train-loss"],
        examples=m["examples-seen"],
        num_examples=m["num-examples"],
        tokens=m["tokens"],
        response_tokens=m["response-tokens"],
        padded_tokens=m["padded-tokens"],
        learning_rate=m["learning-rate"],
        seconds=m["seconds"],
        train_seconds=m["train-seconds"],
        skipped_rows=m.get("skipped-rows", 0),
        update_norm=update.norm,
    )
    if "dp-update-norm" in m:
        row["dp_update_norm"] = m["dp-update-norm"]
    if update.ignored_metrics:
        row["ignored_metrics"] = update.ignored_metrics
    return row


def log_info(text: str) -> None:
    from flwr.common import log

    log(INFO, "%s", text)

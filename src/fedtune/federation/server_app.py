"""The ServerApp: FedAvg over adapters, with the communication ledger, checkpoints and progress.

The round loop calls Flower's FedAvg at its documented steps (configure_train → send_and_receive →
aggregate_train) and does the bookkeeping around them: bytes of every message, a budget check before
a round is sent, per-round metrics, and checkpoints a later resume can start from.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO
from typing import Any, cast

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedtune.accounting.ledger import (
    Ledger,
    LedgerEntry,
    array_record_bytes,
    record_payload_bytes,
    record_wire_bytes,
)
from fedtune.config import RunConfig, build_config
from fedtune.federation.client_app import ARRAY_RECORD, CONFIG_RECORD, METRIC_RECORD
from fedtune.federation.progress import Progress
from fedtune.federation.rundir import RunDirectory, rng_state, write_json_atomic

app = ServerApp()


class FederationError(RuntimeError):
    """A round could not produce an aggregate (every client failed or sent a bad adapter)."""


@dataclass
class GlobalAdapter:
    state: dict[str, Any]  # key → tensor (PEFT checkpoint names)
    peft_config: Any  # the resolved peft.LoraConfig, saved beside every checkpoint
    parameters: int


@dataclass
class ServerEvaluator:
    """What the server measures on the global adapter between rounds.

    - the probe loss: the loss on a fixed sample of client 0's data. Clients train on different
      data every round, so their losses mix learning with data noise; the probe holds the data
      fixed and shows the federation's progress alone;
    - MMLU on a fixed stratified subset, every `eval.mmlu-every-rounds` rounds.
    """

    model: Any
    tokenizer: Any
    device: str
    probe_examples: list[Any]
    mmlu_questions: list[Any]
    mmlu_protocol: str
    mmlu_every: int
    num_rounds: int

    def mmlu_due(self, server_round: int) -> bool:
        if not self.mmlu_questions:
            return False
        return server_round in (0, self.num_rounds) or server_round % self.mmlu_every == 0

    def __call__(self, state: dict[str, Any], server_round: int) -> dict[str, Any]:
        from fedtune.model.adapters import load_adapter_state
        from fedtune.training.local import evaluate_loss

        load_adapter_state(self.model, state)
        metrics: dict[str, Any] = {}
        if self.probe_examples:
            metrics["probe_loss"] = evaluate_loss(
                self.model, self.probe_examples, self.tokenizer.pad_token_id, self.device
            )
        if self.mmlu_due(server_round):
            from fedtune.evaluation.api import score_questions

            result = score_questions(
                self.model, self.tokenizer, self.mmlu_questions, protocol=self.mmlu_protocol
            )
            metrics["mmlu"] = {
                "protocol": self.mmlu_protocol,
                "questions": result["n_questions"],
                **result["board"],
                "predicted_letters": result["predicted_letters"],
            }
        return metrics


def init_global_adapter(config: RunConfig) -> tuple[GlobalAdapter, ServerEvaluator | None]:
    """Initial adapter: the base model with a fresh adapter seeded by train.seed.

    The base model is needed once (DoRA's magnitudes come from the base weights); it is kept
    only when the server evaluates between rounds.
    """
    from fedtune.data.pipeline import partition_examples
    from fedtune.model.adapters import adapter_state, attach_adapter, count_parameters
    from fedtune.model.loading import load_model, load_tokenizer, pick_device, resolve_model
    from fedtune.training.local import draw_examples

    source = resolve_model(config.model.name)
    device = pick_device()
    model = load_model(
        source, dtype=config.model.dtype, quantization=config.model.quantization, device=device
    )
    peft_model = attach_adapter(model, config.lora, config.train.seed)
    state = adapter_state(peft_model)
    resolved = copy.deepcopy(peft_model.peft_config[peft_model.active_adapter])
    # PEFT records the directory it loaded from (for the embedded model, a cache path); the
    # configured name is what identifies the base model to a reader of the checkpoint.
    resolved.base_model_name_or_path = config.model.name
    adapter = GlobalAdapter(state, resolved, count_parameters(state))
    ev = config.eval
    if ev.probe_examples == 0 and ev.mmlu_every_rounds == 0:
        return adapter, None
    tokenizer = load_tokenizer(source)
    probe: list[Any] = []
    if ev.probe_examples:
        examples, _ = partition_examples(tokenizer, config, 0, config.federation.num_clients)
        count = min(ev.probe_examples, len(examples))
        probe = [examples[i] for i in draw_examples(len(examples), count, config.data.seed)]
    questions: list[Any] = []
    if ev.mmlu_every_rounds:
        from fedtune.evaluation.sampling import fixed_subset

        questions = fixed_subset(ev.mmlu_questions, seed=config.data.seed)
    evaluator = ServerEvaluator(
        peft_model,
        tokenizer,
        device,
        probe,
        questions,
        ev.mmlu_protocol,
        ev.mmlu_every_rounds,
        config.federation.num_rounds,
    )
    return adapter, evaluator


def build_strategy(config: RunConfig) -> FedAvg:
    """Flower's FedAvg, weighted by each client's number of examples, k clients per round."""
    fed = config.federation
    k = fed.sampled_clients
    return FedAvg(
        fraction_train=k / fed.num_clients,
        min_train_nodes=k,
        min_available_nodes=k,
        fraction_evaluate=0.0,
        min_evaluate_nodes=0,
        weighted_by_key="num-examples",
        arrayrecord_key=ARRAY_RECORD,
        configrecord_key=CONFIG_RECORD,
    )


def _reply_problem(reply: Message, expected_spec: dict[str, Any]) -> str | None:
    """Why a reply cannot be aggregated, or None when it can."""
    from fedtune.model.adapters import AdapterMismatch, check_state

    if reply.has_error():
        return f"client error: {reply.error.reason}"
    content = reply.content
    if ARRAY_RECORD not in content.array_records or METRIC_RECORD not in content.metric_records:
        return "reply without adapter or metrics"
    record = content.array_records[ARRAY_RECORD]
    received = {key: (tuple(array.shape), array.dtype) for key, array in record.items()}
    try:
        check_state(expected_spec, received)
    except AdapterMismatch as exc:
        return str(exc)
    return None


def run_federation(
    grid: Grid,
    config: RunConfig,
    run_dir: RunDirectory,
    progress: Progress,
) -> dict[str, Any]:
    """Run every round; write metrics, ledger, checkpoints and the final adapter.

    Returns:
        The summary also written to summary.json.
    Raises:
        FederationError: a round in which no client produced a usable update.
    """
    fed, train = config.federation, config.train
    # FedAvg samples clients with Python's `random`: seeding it makes the sampling reproducible.
    random.seed(train.seed)
    progress.note("building the initial global adapter")
    adapter, evaluator = init_global_adapter(config)
    expected_spec = {
        k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in adapter.state.items()
    }
    arrays = ArrayRecord(adapter.state)
    per_message = array_record_bytes(arrays)
    progress.note(
        f"adapter: {adapter.parameters:,} parameters in {len(adapter.state)} tensors, "
        f"{per_message:,} bytes per message; {fed.sampled_clients} of {fed.num_clients} clients "
        f"per round, {fed.num_rounds} rounds"
    )
    strategy = build_strategy(config)
    ledger = Ledger(run_dir.ledger_path)
    flat = config.to_flat()
    state_name = "completed"
    last_loss: float | None = None
    rounds_done = 0
    server_eval: dict[int, dict[str, Any]] = {}
    if evaluator is not None:
        server_eval[0] = evaluator(adapter.state, 0)
        progress.note(f"before training: {describe_eval(server_eval[0])}")
    for server_round in range(1, fed.num_rounds + 1):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(flat), grid))
        downlink = [record_payload_bytes(m.content) for m in messages]
        # Replies carry the same adapter shapes, so a round costs twice its downlink.
        if ledger.would_exceed(config.run.byte_budget, 2 * sum(b for b, _ in downlink)):
            progress.note(
                f"stopping before round {server_round}: it would take the total past "
                f"run.byte-budget={config.run.byte_budget:,} bytes"
            )
            state_name = "stopped-budget"
            break
        progress.begin_round(server_round, len(messages))
        round_started = time.perf_counter()
        replies = list(grid.send_and_receive(messages, timeout=fed.round_timeout_s))
        round_metrics, clients, good = _account_round(
            server_round, messages, downlink, replies, expected_spec, ledger
        )
        if not good:
            reasons = "; ".join(c["problem"] for c in clients if c.get("problem")) or "no reply"
            raise FederationError(f"round {server_round}: no usable client update ({reasons})")
        aggregated, _ = strategy.aggregate_train(server_round, good)
        if aggregated is None:
            raise FederationError(f"round {server_round}: aggregation produced nothing")
        arrays = aggregated
        if evaluator is not None:
            server_eval[server_round] = evaluator(arrays.to_torch_state_dict(), server_round)
            round_metrics.update(server_eval[server_round])
        round_metrics["seconds"] = round(time.perf_counter() - round_started, 3)
        round_metrics["cumulative_bytes"] = ledger.total_bytes
        last_loss = round_metrics.get("train_loss")
        run_dir.log_round(round_metrics, clients)
        rounds_done = server_round
        if server_round == fed.num_rounds or (
            train.save_every_round and server_round % train.save_every_round == 0
        ):
            _checkpoint(run_dir, server_round, arrays, adapter, ledger, strategy, config)
        run_dir.set_status("running", rounds_completed=rounds_done)
        progress.end_round(server_round, round_metrics)
    final_state = arrays.to_torch_state_dict()
    digest = run_dir.write_adapter(run_dir.path / "adapter", final_state, adapter.peft_config)
    summary = {
        "state": state_name,
        "rounds_completed": rounds_done,
        "rounds_planned": fed.num_rounds,
        "clients_per_round": fed.sampled_clients,
        "num_clients": fed.num_clients,
        "adapter_parameters": adapter.parameters,
        "adapter_tensors": len(adapter.state),
        "message_payload_bytes": per_message,
        "communication": ledger.summary(),
        "final_train_loss": last_loss,
        "server_eval": {str(k): v for k, v in server_eval.items()},
        "adapter": "adapter",
        "adapter_sha256": digest,
        "config_digest": config.digest(),
        "seconds": round(time.perf_counter() - progress.started, 1),
    }
    write_json_atomic(run_dir.path / "summary.json", summary)
    run_dir.set_status(state_name, rounds_completed=rounds_done)
    return summary


def describe_eval(metrics: dict[str, Any]) -> str:
    parts = []
    if "probe_loss" in metrics:
        parts.append(f"probe loss {metrics['probe_loss']:.4f}")
    if "mmlu" in metrics:
        mmlu = metrics["mmlu"]
        parts.append(
            f"MMLU ({mmlu['protocol']}, {mmlu['questions']} questions) {mmlu['average']:.2f}"
        )
    return ", ".join(parts)


def _account_round(
    server_round: int,
    messages: list[Message],
    downlink: list[tuple[int, int]],
    replies: list[Message],
    expected_spec: dict[str, Any],
    ledger: Ledger,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[Message]]:
    """Ledger entries, per-client metrics, and the replies fit for aggregation."""
    by_node = {reply.metadata.src_node_id: reply for reply in replies}
    entries, clients, good = [], [], []
    # FedAvg sends one RecordDict to every sampled client: serialize it once to measure it.
    wire_sizes: dict[int, int] = {}
    for message, (down_bytes, down_arrays) in zip(messages, downlink, strict=True):
        node = message.metadata.dst_node_id
        reply = by_node.get(node)
        if id(message.content) not in wire_sizes:
            wire_sizes[id(message.content)] = record_wire_bytes(message.content)
        entry = LedgerEntry(
            server_round,
            node,
            -1,
            downlink_bytes=down_bytes,
            downlink_arrays=down_arrays,
            downlink_wire_bytes=wire_sizes[id(message.content)],
        )
        client: dict[str, Any] = {"round": server_round, "node_id": node}
        problem = "no reply within strategy.round-timeout-s" if reply is None else None
        if reply is not None:
            problem = _reply_problem(reply, expected_spec)
            if reply.has_content():
                entry.uplink_bytes, entry.uplink_arrays = record_payload_bytes(reply.content)
                entry.uplink_wire_bytes = record_wire_bytes(reply.content)
            if problem is None:
                metrics = dict(reply.content[METRIC_RECORD])
                entry.partition_id = int(cast(int, metrics.get("partition-id", -1)))
                client.update(
                    partition_id=entry.partition_id,
                    train_loss=metrics["train-loss"],
                    examples=metrics["examples-seen"],
                    num_examples=metrics["num-examples"],
                    tokens=metrics["tokens"],
                    response_tokens=metrics["response-tokens"],
                    padded_tokens=metrics["padded-tokens"],
                    learning_rate=metrics["learning-rate"],
                    seconds=metrics["seconds"],
                    skipped_rows=metrics.get("skipped-rows", 0),
                )
                good.append(reply)
        if problem is not None:
            client["problem"] = problem
            log(INFO, "round %s: node %s not aggregated: %s", server_round, node, problem)
        entries.append(entry)
        clients.append(client)
    ledger.record(entries)
    ok = [c for c in clients if "problem" not in c]
    weights = [c["num_examples"] for c in ok]
    round_metrics: dict[str, Any] = {
        "round": server_round,
        "clients": len(ok),
        "failed_clients": len(clients) - len(ok),
        # Weighted as FedAvg weights the adapters, so the loss describes the aggregate.
        "train_loss": (
            sum(c["train_loss"] * w for c, w in zip(ok, weights, strict=True)) / sum(weights)
            if ok
            else None
        ),
        "examples": sum(c["examples"] for c in ok),
        "tokens": sum(c["tokens"] for c in ok),
        "response_tokens": sum(c["response_tokens"] for c in ok),
        "learning_rate": ok[0]["learning_rate"] if ok else None,
        "downlink_bytes": sum(e.downlink_bytes for e in entries),
        "uplink_bytes": sum(e.uplink_bytes for e in entries),
    }
    return round_metrics, clients, good


def _checkpoint(
    run_dir: RunDirectory,
    server_round: int,
    arrays: ArrayRecord,
    adapter: GlobalAdapter,
    ledger: Ledger,
    strategy: FedAvg,
    config: RunConfig,
) -> None:
    resume = {
        "num_rounds": config.federation.num_rounds,
        "config_digest": config.digest(),
        "strategy": {
            "name": type(strategy).__name__,
            "fraction_train": strategy.fraction_train,
            "min_train_nodes": strategy.min_train_nodes,
            "weighted_by_key": strategy.weighted_by_key,
        },
        "ledger": ledger.position(),
        "metrics_lines": server_round,
        "rng": rng_state(),
    }
    run_dir.write_checkpoint(
        server_round, arrays.to_torch_state_dict(), adapter.peft_config, resume
    )


def preflight(config: RunConfig) -> None:
    """Check the model and data sources before anything is written (fails with one clear line)."""
    from fedtune.data.sources import resolve_data
    from fedtune.model.loading import check_quantization, resolve_model

    resolve_model(config.model.name)
    check_quantization(config.model.quantization)
    resolve_data(config.data.name)


def make_server_app(
    config: RunConfig, run_dir: RunDirectory, emit: Callable[[str], None]
) -> ServerApp:
    """A ServerApp bound to an already-resolved config and run directory (`fedtune run`)."""
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        _serve(grid, config, run_dir, Progress(config.federation.num_rounds, emit))

    return bound


def _serve(grid: Grid, config: RunConfig, run_dir: RunDirectory, progress: Progress) -> None:
    try:
        run_federation(grid, config, run_dir, progress)
    except BaseException as exc:
        run_dir.set_status("failed", error=f"{type(exc).__name__}: {exc}")
        raise


def _flower_log(line: str) -> None:
    log(INFO, "%s", line)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point (`flwr run .`): the config is Flower's fused run config."""
    config = build_config(context.run_config, warn=_flower_log)
    preflight(config)
    run_dir = RunDirectory.create(config)
    _flower_log(f"fedtune: run directory {run_dir.path}")
    _serve(grid, config, run_dir, Progress(config.federation.num_rounds, _flower_log))

"""The ServerApp: a recipe over the round's named steps (`rounds.py`).

resolve config → open the run directory → build the global adapter and the server's evaluator →
build the strategy → start or resume the loop state → run rounds → write the adapter and summary.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedtune.accounting.ledger import Ledger, array_record_bytes
from fedtune.compression.message import MessageCodec
from fedtune.compression.settings import codec_specs
from fedtune.config import (
    ConfigError,
    RunConfig,
    build_config,
    client_rank,
    config_differences,
)
from fedtune.data.partition_report import PartitionReport
from fedtune.federation.nodes import NodeDirectory, PartitionSampler
from fedtune.federation.progress import Progress
from fedtune.federation.rounds import (
    BudgetReached,
    LoopState,
    RoundContext,
    log_info,
    run_round,
)
from fedtune.federation.strategies import build_strategy, get_strategy
from fedtune.model.adapters import frozen_digest, to_peft, travelling_keys
from fedtune.model.variants import get_variant
from fedtune.rundir import LEDGER_FILE, RunDirectory, SummaryRow, now_utc, read_run_config

app = ServerApp()


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
    - the held-out loss: the loss on the rows no client trains on (`data.heldout-examples`),
      the quality signal that compares configurations;
    - MMLU on a fixed stratified subset, every `eval.mmlu-every-rounds` rounds.
    """

    model: Any
    tokenizer: Any
    device: str
    probe_examples: list[Any]
    heldout_examples: list[Any]
    mmlu_questions: list[Any]
    mmlu_protocol: str
    mmlu_every: int
    num_rounds: int
    heldout_every: int = 1

    def mmlu_due(self, server_round: int) -> bool:
        if not self.mmlu_questions:
            return False
        return server_round in (0, self.num_rounds) or server_round % self.mmlu_every == 0

    def heldout_due(self, server_round: int) -> bool:
        if not self.heldout_examples:
            return False
        return server_round in (0, self.num_rounds) or server_round % self.heldout_every == 0

    def __call__(self, state: dict[str, Any], server_round: int) -> dict[str, Any]:
        from fedtune.model.adapters import load_adapter_state
        from fedtune.training.local import evaluate_loss

        load_adapter_state(self.model, state)
        metrics: dict[str, Any] = {}
        if self.probe_examples:
            metrics["probe_loss"] = evaluate_loss(
                self.model, self.probe_examples, self.tokenizer.pad_token_id, self.device
            )
        if self.heldout_due(server_round):
            metrics["heldout_loss"] = evaluate_loss(
                self.model, self.heldout_examples, self.tokenizer.pad_token_id, self.device
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
    from fedtune.data.pipeline import heldout_examples, partition_examples, sb_init_examples
    from fedtune.model.adapters import adapter_state, count_parameters, prepare_adapter
    from fedtune.model.loading import load_model, load_tokenizer, pick_device, resolve_model
    from fedtune.training.local import draw_examples

    source = resolve_model(config.model.name)
    device = pick_device()
    model = load_model(
        source, dtype=config.model.dtype, quantization=config.model.quantization, device=device
    )
    tokenizer = load_tokenizer(source)
    wanted = get_variant(config.lora.variant).init_examples(config)
    init = sb_init_examples(tokenizer, config, wanted) if wanted else None
    peft_model = prepare_adapter(
        model, config.lora, config.train.seed, init, tokenizer.pad_token_id
    )
    state = adapter_state(peft_model)
    resolved = copy.deepcopy(peft_model.peft_config[peft_model.active_adapter])
    # PEFT records the directory it loaded from (for the embedded model, a cache path); the
    # configured name is what identifies the base model to a reader of the checkpoint.
    resolved.base_model_name_or_path = config.model.name
    adapter = GlobalAdapter(state, resolved, count_parameters(state))
    ev = config.eval
    if ev.probe_examples == 0 and ev.mmlu_every_rounds == 0 and config.data.heldout_examples == 0:
        return adapter, None
    probe: list[Any] = []
    if ev.probe_examples:
        examples, _ = partition_examples(tokenizer, config, 0, config.federation.num_clients)
        count = min(ev.probe_examples, len(examples))
        probe = [examples[i] for i in draw_examples(len(examples), count, config.data.seed)]
    heldout = heldout_examples(tokenizer, config)
    questions: list[Any] = []
    if ev.mmlu_every_rounds:
        from fedtune.evaluation.sampling import fixed_subset

        questions = fixed_subset(ev.mmlu_questions, seed=config.data.seed)
    evaluator = ServerEvaluator(
        peft_model,
        tokenizer,
        device,
        probe,
        heldout,
        questions,
        ev.mmlu_protocol,
        ev.mmlu_every_rounds,
        config.federation.num_rounds,
        ev.heldout_every_rounds,
    )
    return adapter, evaluator


def open_run(config: RunConfig, command: list[str] | None = None) -> RunDirectory:
    """A new run directory, or with `run.resume` the existing one, checked for resuming.

    Raises:
        RunDirError: the directory exists (new run), or cannot be resumed.
        ConfigError: the configuration differs from the one the run started with.
    """
    if not config.run.resume:
        return RunDirectory.create(config, command)
    run_dir = RunDirectory.open_for_resume(config.run.resume)
    started_with, _ = read_run_config(run_dir.path)
    differences = config_differences(started_with, config.to_flat())
    if differences:
        raise ConfigError(
            f"--resume: the configuration differs from the run's ({len(differences)} keys): "
            + "; ".join(differences)
        )
    run_dir.claim_for_resume()
    return run_dir


def partition_report(
    run_dir: RunDirectory, config: RunConfig, progress: Progress
) -> PartitionReport | None:
    """What each client holds (local and embedded data; None for hub data), written to the run
    directory as partitions.json/.png when the run starts. Its sizes are the most examples a
    client can truthfully report."""
    from fedtune.data.partition_report import REPORT_JSON, build_report, describe, save

    report = build_report(config.data, config.federation.num_clients)
    if report is not None and not (run_dir.path / REPORT_JSON).exists():
        save(report, run_dir.path)
        progress.note(f"partitions: {describe(report)} (partitions.png)")
    return report


def start_or_resume(
    run_dir: RunDirectory,
    config: RunConfig,
    adapter: GlobalAdapter,
    strategy: Any,
    progress: Progress,
) -> tuple[LoopState, Ledger]:
    """The loop state of the last resume point (logs cut back to it), or a fresh one."""
    restored = LoopState.restore(run_dir, strategy) if config.run.resume else None
    if restored is None:
        run_dir.cut_logs({})  # a run killed before its first resume point starts over
        state = LoopState(
            arrays=ArrayRecord(adapter.state),
            sampler=PartitionSampler(config.train.seed).state(),
        )
        return state, Ledger(run_dir.ledger_path)
    state, position = restored
    # Messages of rounds the killed run did not checkpoint were really sent: the ledger holds
    # each round once, the resume record keeps what the redone rounds cost.
    lost = run_dir.log_tail(LEDGER_FILE, int(position["logs"].get(LEDGER_FILE, 0)))
    dropped = run_dir.cut_logs(position["logs"])
    state.resumes.append(
        {
            "after_round": state.round,
            "at": now_utc(),
            "dropped_log_bytes": sum(dropped.values()),
            "redone_messages": len(lost),
            "redone_communication_bytes": sum(
                int(row.get("downlink_bytes", 0)) + int(row.get("uplink_bytes", 0)) for row in lost
            ),
        }
    )
    progress.note(
        f"resuming after round {state.round}: its adapter, strategy state, sampler and ledger "
        f"restored ({sum(dropped.values()):,} bytes of later log lines dropped"
        + (f"; {len(lost)} client messages of unfinished rounds are redone" if lost else "")
        + ")"
    )
    return state, Ledger.continued(run_dir.ledger_path, position)


def round_context(
    grid: Grid,
    config: RunConfig,
    strategy: Any,
    ledger: Ledger,
    adapter: GlobalAdapter,
    sampler: PartitionSampler,
    progress: Progress,
    run_dir: Path | str = "",
    rows: list[int] | None = None,
) -> RoundContext:
    fed, s = config.federation, config.strategy
    flat = config.to_flat()
    downlink, uplink = codec_specs(config)
    travelling = travelling_keys(config.lora.variant, adapter.state)
    return RoundContext(
        grid=grid,
        strategy=strategy,
        nodes=NodeDirectory(grid, flat, fed.num_clients, s.node_wait_s, note=progress.note),
        sampler=sampler,
        ledger=ledger,
        run_config=flat,
        expected_spec={
            k: (tuple(v.shape), str(v.dtype).replace("torch.", ""))
            for k, v in adapter.state.items()
            if k in travelling
        },
        frozen_sha256=frozen_digest(adapter.state, travelling),
        rank_of=(
            functools.partial(client_rank, config.lora)
            if get_strategy(s.name).heterogeneous_ranks
            else None
        ),
        clients_per_round=config.sampled_clients,
        min_clients=s.min_clients,
        max_retries=s.max_retries,
        round_timeout_s=s.round_timeout_s,
        byte_budget=config.run.byte_budget,
        norm_ratio=config.validate.update_norm_ratio,
        norm_window=config.validate.norm_window_rounds,
        partition_rows=rows,
        downlink=MessageCodec(downlink),
        uplink=MessageCodec(uplink),
        seed=config.train.seed,
        run_dir=str(run_dir),
        log=progress.note,
        dp=config.dp if config.dp.enabled else None,
        population=fed.num_clients,
    )


def run_federation(
    grid: Grid, config: RunConfig, run_dir: RunDirectory, progress: Progress
) -> SummaryRow:
    """Run (or continue) every round; write metrics, ledger, checkpoints and the final adapter.

    Returns:
        The summary also written to summary.json.
    Raises:
        FederationError: a round with too few usable replies after its retries.
        NodeWaitTimeout: too few nodes within strategy.node-wait-s.
    """
    started = time.perf_counter()
    fed, train = config.federation, config.train
    run_dir.record_device()
    progress.note("building the initial global adapter")
    adapter, evaluator = init_global_adapter(config)
    strategy = build_strategy(config, {k: v.numpy() for k, v in adapter.state.items()})
    state, ledger = start_or_resume(run_dir, config, adapter, strategy, progress)
    sampler = PartitionSampler(train.seed)
    sampler.set_state(state.sampler)
    report = partition_report(run_dir, config, progress)
    ctx = round_context(
        grid,
        config,
        strategy,
        ledger,
        adapter,
        sampler,
        progress,
        run_dir=run_dir.path,
        rows=report.sizes if report else None,
    )
    progress.start(state.round)
    progress.note(
        f"adapter: {adapter.parameters:,} parameters in {len(adapter.state)} tensors"
        + (
            f" ({config.lora.variant}: {len(ctx.expected_spec)} travel)"
            if len(ctx.expected_spec) < len(adapter.state)
            else ""
        )
        + f", {array_record_bytes(ArrayRecord({k: state.arrays[k] for k in ctx.expected_spec})):,} "
        f"bytes per uncompressed message; {config.strategy.name}, "
        f"{config.sampled_clients} of {fed.num_clients} clients per round, {fed.num_rounds} rounds"
    )
    run_dir.set_status("running", rounds_completed=state.round)
    elapsed_before = state.elapsed_s
    if evaluator is not None and "0" not in state.server_eval:
        state.server_eval["0"] = evaluator(adapter.state, 0)
        progress.note(f"before training: {describe_eval(state.server_eval['0'])}")
    while state.round < fed.num_rounds and state.stopped is None:
        server_round = state.round + 1
        progress.begin_round(server_round, config.sampled_clients)
        round_started = time.perf_counter()
        try:
            result = run_round(ctx, state, server_round)
        except BudgetReached as stop:
            progress.note(str(stop))
            state.stopped = stop.kind
            break
        metrics = result.metrics
        if evaluator is not None:
            state.server_eval[str(server_round)] = evaluator(
                result.arrays.to_torch_state_dict(), server_round
            )
            metrics.update(state.server_eval[str(server_round)])
        state.arrays = result.arrays
        state.round = server_round
        state.last_train_loss = metrics["train_loss"]
        state.norm_history = [*state.norm_history, result.accepted_norms][-1000:]
        state.sampler = sampler.state()
        metrics["seconds"] = round(time.perf_counter() - round_started, 3)
        metrics["cumulative_bytes"] = ledger.total_bytes
        checkpoint(
            run_dir,
            config,
            state,
            ledger,
            strategy,
            adapter,
            metrics,
            result.clients,
            elapsed_before + time.perf_counter() - started,
        )
        progress.end_round(server_round, metrics)
    state.elapsed_s = elapsed_before + time.perf_counter() - started
    summary = finish(run_dir, config, adapter, state, ledger, strategy)
    try:
        from fedtune.report import plot_run

        progress.note(f"curves drawn: {plot_run(run_dir.path)}")
    except Exception as exc:  # noqa: BLE001 - a figure must not fail a finished run
        progress.note(f"could not draw report.png: {exc}")
    return summary


def checkpoint(
    run_dir: RunDirectory,
    config: RunConfig,
    state: LoopState,
    ledger: Ledger,
    strategy: Any,
    adapter: GlobalAdapter,
    metrics: dict[str, Any],
    clients: list[dict[str, Any]],
    elapsed_s: float,
) -> float:
    """Record the round: logs first, then the resume point that counts them, then the status.
    A kill between the two leaves lines the resume point does not count: a resume drops them.

    Returns:
        Seconds spent writing the resume point and snapshot (the checkpoint's overhead).
    """
    run_dir.log_round(metrics, clients)
    began = time.perf_counter()
    state.elapsed_s = elapsed_s
    state.save(run_dir, ledger, strategy)
    every = config.train.save_every_round
    if state.round == config.federation.num_rounds or (every and state.round % every == 0):
        run_dir.write_snapshot(
            state.round,
            to_peft(state.arrays.to_torch_state_dict(), config.lora.variant),
            adapter.peft_config,
        )
    # The round's metrics line is written before its resume point (which counts it), so the
    # point's cost is kept in the loop state and reported in the summary.
    spent = round(time.perf_counter() - began, 4)
    state.checkpoint_seconds.append(spent)
    run_dir.set_status("running", rounds_completed=state.round)
    return spent


def privacy_summary(config: RunConfig, state: LoopState) -> dict[str, Any] | None:
    """What DP this run had and the (ε, δ) it spent (ε None: infinite, no noise); None
    without DP."""
    if not config.dp.enabled:
        return None
    from fedtune.federation.privacy import privacy_spent

    spent = privacy_spent(config.dp, config.federation.num_clients, state.privacy_releases)
    if not math.isfinite(spent["epsilon"]):
        spent["epsilon"] = None
    return spent


def finish(
    run_dir: RunDirectory,
    config: RunConfig,
    adapter: GlobalAdapter,
    state: LoopState,
    ledger: Ledger,
    strategy: Any,
) -> SummaryRow:
    """The final adapter, summary.json and the final status."""
    fed = config.federation
    state_name = f"stopped-{state.stopped}" if state.stopped else "completed"
    digest = run_dir.write_adapter(
        run_dir.path / "adapter",
        to_peft(state.arrays.to_torch_state_dict(), config.lora.variant),
        adapter.peft_config,
    )
    summary: SummaryRow = {
        "state": state_name,
        "rounds_completed": state.round,
        "rounds_planned": fed.num_rounds,
        "clients_per_round": config.sampled_clients,
        "num_clients": fed.num_clients,
        "strategy": config.strategy.name,
        "codecs": dict(
            zip(
                ("downlink", "uplink"),
                (MessageCodec(s).name for s in codec_specs(config)),
                strict=True,
            )
        ),
        "adapter_parameters": adapter.parameters,
        "adapter_tensors": len(adapter.state),
        # what one uncompressed message carries: the tensors that travel, as fp32 arrays
        "message_payload_bytes": array_record_bytes(
            ArrayRecord(
                {k: state.arrays[k] for k in travelling_keys(config.lora.variant, state.arrays)}
            )
        ),
        "communication": ledger.summary(),
        "final_train_loss": state.last_train_loss,
        "final_heldout_loss": state.server_eval.get(str(state.round), {}).get("heldout_loss"),
        "dropped_replies": state.dropped_replies,
        "retried_rounds": state.retries,
        "resumes": state.resumes,
        "server_eval": state.server_eval,
        "adapter": "adapter",
        "adapter_sha256": digest,
        "config_digest": config.digest(),
        "seconds": round(state.elapsed_s, 1),
        "privacy": privacy_summary(config, state),
        "checkpoint_seconds": {
            "per_round": state.checkpoint_seconds,
            "mean": round(sum(state.checkpoint_seconds) / max(len(state.checkpoint_seconds), 1), 4),
            "max": max(state.checkpoint_seconds, default=0.0),
        },
    }
    run_dir.write_summary(summary)
    run_dir.set_status(state_name, rounds_completed=state.round)
    return summary


def preflight(config: RunConfig) -> None:
    """Check the model and data sources before anything is written (fails with one clear line)."""
    from fedtune.data.sources import resolve_data
    from fedtune.model.loading import check_hub_model, check_quantization, resolve_model

    check_hub_model(resolve_model(config.model.name))
    check_quantization(config.model.quantization)
    resolve_data(config.data.name)


def not_resumable() -> tuple[type[BaseException], ...]:
    """Failures a resume cannot cure: the configuration, model or data is what must change."""
    from fedtune.data.sources import DataError
    from fedtune.federation.nodes import ClientCountMismatch
    from fedtune.model.loading import ModelError

    return (ConfigError, ModelError, DataError, ClientCountMismatch)


def make_server_app(
    config: RunConfig, run_dir: RunDirectory, emit: Callable[[str], None]
) -> ServerApp:
    """A ServerApp bound to an already-resolved config and run directory (`fedtune run`)."""
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        serve(grid, config, run_dir, Progress(config.federation.num_rounds, emit))

    return bound


def serve(grid: Grid, config: RunConfig, run_dir: RunDirectory, progress: Progress) -> None:
    """Run the federation; whatever ends it is recorded in status.json before it propagates."""
    link_errors = bound_link_wait(grid, config.strategy.link_wait_s)
    try:
        run_federation(grid, config, run_dir, progress)
    except BaseException as exc:
        rounds = _rounds_completed(run_dir)
        error = f"{type(exc).__name__}: {exc}"
        if link_errors and isinstance(exc, link_errors):
            error = (
                f"the SuperLink did not answer for {config.strategy.link_wait_s:.0f} s "
                f"(strategy.link-wait-s): {error}"
            )
        resumable = not isinstance(exc, not_resumable())
        try:
            run_dir.set_status(
                "failed",
                error=error,
                rounds_completed=rounds,
                resumable=resumable,
            )
        except OSError as unwritable:  # a read-only disk refuses even this
            progress.note(f"could not record the failure in status.json: {unwritable}")
        progress.note(f"failed after {rounds} rounds: {exc}")
        if resumable:
            progress.note(
                f"the run can continue from its last checkpoint: fedtune run --resume "
                f"{run_dir.path}"
            )
        raise


def bound_link_wait(grid: Any, seconds: float) -> tuple[type[BaseException], ...]:
    """Bound how long the deployment engine's grid retries an unreachable SuperLink; the
    exceptions it then gives up with. Flower 1.42's grid retries every call forever, so a
    ServerApp whose SuperLink died would wait without end; with a limit, the call raises and
    the run ends failed (resumable). The simulation's grid makes no network calls: nothing to
    bound, no exceptions."""
    invoker = getattr(grid, "_retry_invoker", None)
    if invoker is None or not hasattr(invoker, "max_time"):
        return ()
    invoker.max_time = seconds
    errors = invoker.recoverable_exceptions
    return errors if isinstance(errors, tuple) else (errors,)


def _rounds_completed(run_dir: RunDirectory) -> int:
    try:
        return int(run_dir.status().get("rounds_completed", 0))
    except (ValueError, OSError):
        return 0


def describe_eval(metrics: dict[str, Any]) -> str:
    parts = []
    if "probe_loss" in metrics:
        parts.append(f"probe loss {metrics['probe_loss']:.4f}")
    if "heldout_loss" in metrics:
        parts.append(f"held-out loss {metrics['heldout_loss']:.4f}")
    if "mmlu" in metrics:
        mmlu = metrics["mmlu"]
        parts.append(
            f"MMLU ({mmlu['protocol']}, {mmlu['questions']} questions) {mmlu['average']:.2f}"
        )
    return ", ".join(parts)


def adopt_federation_size(grid: Grid, config: RunConfig) -> RunConfig:
    """`federation.num-clients = 0`: as many clients as the federation's SuperNodes hold
    partitions (asked of the first node to answer), said in the run's first lines."""
    from fedtune.config import FLOWERTUNE_CLIENTS, with_num_clients
    from fedtune.federation.nodes import federation_clients, simulation_size_command

    count = federation_clients(grid, config.to_flat(), config.strategy.node_wait_s, log_info)
    config = with_num_clients(config, count)
    log_info(
        f"fedtune: federation.num-clients = 0: the federation's SuperNodes hold {count} "
        f"partitions, so {count} clients, {config.sampled_clients} a round"
    )
    if count != FLOWERTUNE_CLIENTS:
        log_info(
            f"fedtune: FlowerTune's job has {FLOWERTUNE_CLIENTS} clients: "
            f"`{simulation_size_command(FLOWERTUNE_CLIENTS)}` before `flwr run .` "
            f"gives Flower's local simulation {FLOWERTUNE_CLIENTS} SuperNodes"
        )
    return config


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point (`flwr run .`): the config is Flower's fused run config; set
    `run.resume` to a run directory to continue it."""
    config = build_config(context.run_config, warn=log_info)
    if config.federation.auto_clients:
        config = adopt_federation_size(grid, config)
    preflight(config)
    run_dir = open_run(config)
    log_info(f"fedtune: run directory {run_dir.path.resolve()}")
    serve(grid, config, run_dir, Progress(config.federation.num_rounds, log_info))

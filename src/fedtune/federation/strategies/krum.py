"""Krum (Flower's): the reply closest to its n − f − 2 nearest others."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedtune.config import ConfigError, Int, RunConfig, Section, setting
from fedtune.federation.strategies.base import Strategy, register_strategy

if TYPE_CHECKING:
    from flwr.serverapp.strategy import FedAvg


def check_malicious(name: str, malicious: int, config: RunConfig) -> None:
    """Krum's scores need n ≥ f + 3 replies a round (checked once the count is known)."""
    sampled = config.known_sampled_clients
    if sampled is not None and sampled < malicious + 3:
        raise ConfigError(
            f"strategy.{name}.num-malicious-nodes: {name} scores each reply by its distance "
            f"to the n - f - 2 nearest others: it needs at least f + 3 = {malicious + 3} "
            f"clients a round, got {sampled}"
        )


class KrumSettings(Section):
    num_malicious_nodes: Int = setting(
        "strategy.krum.num-malicious-nodes",
        0,
        "Krum: f, the replies that may be hostile; needs clients-per-round >= f + 3.",
        ge=0,
    )


class KrumStrategy(Strategy):
    name = "krum"
    section = KrumSettings

    def build(
        self, config: RunConfig, common: dict[str, Any], initial: Mapping[str, Any]
    ) -> FedAvg:
        from flwr.serverapp import strategy as flower

        malicious = config.params(KrumSettings).num_malicious_nodes
        return flower.Krum(**common, num_malicious_nodes=malicious)

    def check(self, config: RunConfig) -> None:
        super().check(config)
        check_malicious(self.name, config.params(KrumSettings).num_malicious_nodes, config)


register_strategy(KrumStrategy())

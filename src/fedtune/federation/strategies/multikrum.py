"""MultiKrum (Flower's): the mean of the m best-scored replies under Krum's score."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedtune.config import ConfigError, Int, RunConfig, Section, setting
from fedtune.federation.strategies.base import Strategy, register_strategy
from fedtune.federation.strategies.krum import check_malicious

if TYPE_CHECKING:
    from flwr.serverapp.strategy import FedAvg


class MultiKrumSettings(Section):
    num_malicious_nodes: Int = setting(
        "strategy.multikrum.num-malicious-nodes",
        0,
        "MultiKrum: f, the replies that may be hostile; needs clients-per-round >= f + 3.",
        ge=0,
    )
    num_nodes_to_select: Int = setting(
        "strategy.multikrum.num-nodes-to-select",
        2,
        "MultiKrum: m, the best-scored replies averaged (1 = Krum).",
        ge=1,
    )


class MultiKrumStrategy(Strategy):
    name = "multikrum"
    section = MultiKrumSettings

    def build(
        self, config: RunConfig, common: dict[str, Any], initial: Mapping[str, Any]
    ) -> FedAvg:
        from flwr.serverapp import strategy as flower

        s = config.params(MultiKrumSettings)
        return flower.MultiKrum(
            **common,
            num_malicious_nodes=s.num_malicious_nodes,
            num_nodes_to_select=s.num_nodes_to_select,
        )

    def check(self, config: RunConfig) -> None:
        super().check(config)
        s = config.params(MultiKrumSettings)
        check_malicious(self.name, s.num_malicious_nodes, config)
        sampled = config.known_sampled_clients
        if sampled is not None and s.num_nodes_to_select > sampled:
            raise ConfigError(
                f"strategy.multikrum.num-nodes-to-select: must be in [1, {sampled}] (the "
                f"clients sampled per round), got {s.num_nodes_to_select}"
            )


register_strategy(MultiKrumStrategy())

"""FedAvgM (Flower's): FedAvg with server momentum on the mean update."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedtune.config import RunConfig, Section, setting
from fedtune.federation.strategies.base import Strategy, register_strategy

if TYPE_CHECKING:
    from flwr.serverapp.strategy import FedAvg


class FedAvgMSettings(Section):
    server_learning_rate: float = setting(
        "strategy.fedavgm.server-learning-rate", 1.0, "FedAvgM: server learning rate.", gt=0
    )
    server_momentum: float = setting(
        "strategy.fedavgm.server-momentum", 0.9, "FedAvgM: server momentum in [0, 1).", ge=0, lt=1
    )


class FedAvgMStrategy(Strategy):
    name = "fedavgm"
    section = FedAvgMSettings

    def build(
        self, config: RunConfig, common: dict[str, Any], initial: Mapping[str, Any]
    ) -> FedAvg:
        from flwr.serverapp import strategy as flower

        s = config.params(FedAvgMSettings)
        return flower.FedAvgM(
            **common,
            server_learning_rate=s.server_learning_rate,
            server_momentum=s.server_momentum,
        )


register_strategy(FedAvgMStrategy())

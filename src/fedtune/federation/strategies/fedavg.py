"""FedAvg (Flower's): the example-weighted mean of the replies."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedtune.config import RunConfig
from fedtune.federation.strategies.base import Strategy, register_strategy

if TYPE_CHECKING:
    from flwr.serverapp.strategy import FedAvg


class FedAvgStrategy(Strategy):
    name = "fedavg"
    supports_dp = True

    def build(
        self, config: RunConfig, common: dict[str, Any], initial: Mapping[str, Any]
    ) -> FedAvg:
        from flwr.serverapp import strategy as flower

        return flower.FedAvg(**common)


register_strategy(FedAvgStrategy())

"""FedTrimmedAvg (Flower's): the coordinate-wise mean with a fraction cut at each end."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedtune.config import RunConfig, Section, setting
from fedtune.federation.strategies.base import Strategy, register_strategy

if TYPE_CHECKING:
    from flwr.serverapp.strategy import FedAvg


class FedTrimmedAvgSettings(Section):
    beta: float = setting(
        "strategy.fedtrimmedavg.beta",
        0.2,
        "FedTrimmedAvg: fraction of the replies cut at each end, per coordinate, in [0, 0.5).",
        ge=0,
        lt=0.5,
    )


class FedTrimmedAvgStrategy(Strategy):
    name = "fedtrimmedavg"
    section = FedTrimmedAvgSettings

    def build(
        self, config: RunConfig, common: dict[str, Any], initial: Mapping[str, Any]
    ) -> FedAvg:
        from flwr.serverapp import strategy as flower

        return flower.FedTrimmedAvg(**common, beta=config.params(FedTrimmedAvgSettings).beta)


register_strategy(FedTrimmedAvgStrategy())

"""FedYogi (Flower's): the server applies Yogi to the mean update."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedtune.config import RunConfig, Section, setting
from fedtune.federation.strategies.base import Strategy, register_strategy

if TYPE_CHECKING:
    from flwr.serverapp.strategy import FedAvg


class FedYogiSettings(Section):
    eta: float = setting("strategy.fedyogi.eta", 1e-3, "FedYogi: server learning rate.", gt=0)
    beta_1: float = setting(
        "strategy.fedyogi.beta-1", 0.9, "FedYogi: first-moment decay.", ge=0, lt=1
    )
    beta_2: float = setting(
        "strategy.fedyogi.beta-2", 0.99, "FedYogi: second-moment decay.", ge=0, lt=1
    )
    tau: float = setting("strategy.fedyogi.tau", 1e-3, "FedYogi: adaptivity.", gt=0)


class FedYogiStrategy(Strategy):
    name = "fedyogi"
    section = FedYogiSettings

    def build(
        self, config: RunConfig, common: dict[str, Any], initial: Mapping[str, Any]
    ) -> FedAvg:
        from flwr.serverapp import strategy as flower

        s = config.params(FedYogiSettings)
        return flower.FedYogi(**common, eta=s.eta, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau)


register_strategy(FedYogiStrategy())

"""FedAdagrad (Flower's): the server applies Adagrad to the mean update."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedtune.config import RunConfig, Section, setting
from fedtune.federation.strategies.base import Strategy, register_strategy

if TYPE_CHECKING:
    from flwr.serverapp.strategy import FedAvg


class FedAdagradSettings(Section):
    eta: float = setting("strategy.fedadagrad.eta", 1e-3, "FedAdagrad: server learning rate.", gt=0)
    tau: float = setting("strategy.fedadagrad.tau", 1e-3, "FedAdagrad: adaptivity.", gt=0)


class FedAdagradStrategy(Strategy):
    name = "fedadagrad"
    section = FedAdagradSettings

    def build(
        self, config: RunConfig, common: dict[str, Any], initial: Mapping[str, Any]
    ) -> FedAvg:
        from flwr.serverapp import strategy as flower

        s = config.params(FedAdagradSettings)
        return flower.FedAdagrad(**common, eta=s.eta, tau=s.tau)


register_strategy(FedAdagradStrategy())

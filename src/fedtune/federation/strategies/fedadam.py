"""FedAdam (Flower's): the server applies Adam to the mean update."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedtune.config import RunConfig, Section, setting
from fedtune.federation.strategies.base import Strategy, register_strategy

if TYPE_CHECKING:
    from flwr.serverapp.strategy import FedAvg


class FedAdamSettings(Section):
    eta: float = setting("strategy.fedadam.eta", 1e-3, "FedAdam: server learning rate.", gt=0)
    beta_1: float = setting(
        "strategy.fedadam.beta-1", 0.9, "FedAdam: first-moment decay.", ge=0, lt=1
    )
    beta_2: float = setting(
        "strategy.fedadam.beta-2", 0.99, "FedAdam: second-moment decay.", ge=0, lt=1
    )
    tau: float = setting(
        "strategy.fedadam.tau",
        1e-3,
        "FedAdam: adaptivity (added to the root of the second moment).",
        gt=0,
    )


class FedAdamStrategy(Strategy):
    name = "fedadam"
    section = FedAdamSettings

    def build(
        self, config: RunConfig, common: dict[str, Any], initial: Mapping[str, Any]
    ) -> FedAvg:
        from flwr.serverapp import strategy as flower

        s = config.params(FedAdamSettings)
        return flower.FedAdam(**common, eta=s.eta, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau)


register_strategy(FedAdamStrategy())

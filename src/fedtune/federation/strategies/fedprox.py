"""FedProx: FedAvg on the server (Flower's FedProx), the proximal term on the clients
(`training/local.py`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedtune.config import RunConfig, Section, setting
from fedtune.federation.strategies.base import Strategy, register_strategy

if TYPE_CHECKING:
    from flwr.serverapp.strategy import FedAvg


class FedProxSettings(Section):
    proximal_mu: float = setting(
        "strategy.fedprox.proximal-mu",
        0.01,
        "FedProx: μ of the clients' proximal term μ/2·‖w − w_global‖² on the trained adapter.",
        gt=0,
    )


class FedProxStrategy(Strategy):
    name = "fedprox"
    section = FedProxSettings
    supports_dp = True

    def build(
        self, config: RunConfig, common: dict[str, Any], initial: Mapping[str, Any]
    ) -> FedAvg:
        from flwr.serverapp import strategy as flower

        return flower.FedProx(**common, proximal_mu=self.proximal_mu(config))

    def proximal_mu(self, config: RunConfig) -> float:
        return config.params(FedProxSettings).proximal_mu


register_strategy(FedProxStrategy())

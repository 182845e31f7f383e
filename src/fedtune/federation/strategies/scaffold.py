"""SCAFFOLD (Karimireddy et al., 2020) for adapters: control variates against client drift.

The server keeps a control variate c and each client its own cᵢ (both over the adapter tensors
that travel; zero at the start). A round sends x (the global adapter) and c; the client trains
from x with every minibatch gradient g corrected to g − cᵢ + c, then sets cᵢ⁺ to the mean of its
raw minibatch gradients over the round's steps and replies with its adapter y and Δcᵢ = cᵢ⁺ − cᵢ.
The server moves x ← x + η_g·(mean_w(y) − x) (example-weighted mean, as FedAvg) and
c ← c + (|S|/N)·mean(Δcᵢ) (S: the clients that replied, N: all clients).

cᵢ⁺ is the paper's option I (the client's gradient at x) estimated along the way, in gradient
units, rather than option II's (x − y)/(Kη), which assumes plain SGD: fedtune's clients step with
AdamW, whose steps are not gradients, and the correction must be added to gradients. A client keeps
cᵢ in its node state (`Context.state` and `<run dir>/node-state/partition-N/control-R.safetensors`,
or the node config's `state-dir`), so a resumed run continues with the same cᵢ and SCAFFOLD works
on the deployment engine. c and Δcᵢ travel as fp32 next to the adapter and are counted in the
ledger: SCAFFOLD doubles a round's bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, cast

import numpy as np
from flwr.serverapp.strategy import FedAvg

from fedtune.config import RunConfig, Section, setting
from fedtune.federation.messages import CONTROL, CONTROL_DELTA
from fedtune.federation.strategies.base import Strategy, register_strategy


class Scaffold(FedAvg):
    """Flower's FedAvg with SCAFFOLD's messages and server update.

    `control` (c) is the state saved with every resume point; the adapter sent this round is kept
    only until its replies are aggregated.
    """

    reply_records = (CONTROL_DELTA,)  # what fedtune must check and hand over with each reply

    def __init__(self, *, num_clients: int, server_learning_rate: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_clients = int(num_clients)
        self.server_learning_rate = float(server_learning_rate)
        self.control: dict[str, np.ndarray] | None = None
        self.sent: MappingProxyType[str, np.ndarray] = MappingProxyType({})

    def configure_train(
        self, server_round: int, arrays: Any, config: Any, grid: Any
    ) -> Iterable[Any]:
        from flwr.app import Array, ArrayRecord

        self.sent = MappingProxyType({k: a.numpy() for k, a in arrays.items()})
        if self.control is None:
            self.control = {k: np.zeros_like(v, dtype=np.float32) for k, v in self.sent.items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        control = ArrayRecord({k: Array(v) for k, v in self.control.items()})
        for content in {id(m.content): m.content for m in messages}.values():
            content[CONTROL] = control
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Any]) -> tuple[Any, Any]:
        from flwr.app import Array, ArrayRecord

        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid or self.control is None or not self.sent:
            return None, None
        contents = [message.content for message in valid]
        weights = np.asarray(
            [
                float(cast(float, next(iter(c.metric_records.values()))[self.weighted_by_key]))
                for c in contents
            ]
        )
        states = [
            {
                k: a.numpy().astype(np.float64)
                for k, a in c.array_records[self.arrayrecord_key].items()
            }
            for c in contents
        ]
        deltas = [
            {k: a.numpy().astype(np.float64) for k, a in c.array_records[CONTROL_DELTA].items()}
            for c in contents
        ]
        fraction = len(contents) / self.num_clients
        new_arrays, new_control = {}, {}
        for key, x in self.sent.items():
            mean_y = sum(w * s[key] for w, s in zip(weights, states, strict=True)) / weights.sum()
            moved = x.astype(np.float64) + self.server_learning_rate * (mean_y - x)
            new_arrays[key] = moved.astype(x.dtype)
            mean_delta = sum(d[key] for d in deltas) / len(deltas)
            new_control[key] = (self.control[key] + fraction * mean_delta).astype(np.float32)
        self.control = new_control
        self.sent = MappingProxyType({})
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return ArrayRecord({k: Array(v) for k, v in new_arrays.items()}), metrics


class ScaffoldSettings(Section):
    server_learning_rate: float = setting(
        "strategy.scaffold.server-learning-rate",
        1.0,
        "SCAFFOLD: η_g, the step from the global adapter towards the clients' mean.",
        gt=0,
    )


class ScaffoldStrategy(Strategy):
    name = "scaffold"
    section = ScaffoldSettings
    control_variates = True

    def build(
        self, config: RunConfig, common: dict[str, Any], initial: Mapping[str, Any]
    ) -> FedAvg:
        return Scaffold(
            **common,
            num_clients=config.federation.num_clients,
            server_learning_rate=config.params(ScaffoldSettings).server_learning_rate,
        )


register_strategy(ScaffoldStrategy())

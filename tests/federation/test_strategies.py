"""Each strategy's aggregate against a NumPy reference written from its paper, over two rounds
(so the server optimizers' moments and FedAvgM's momentum are carried), on small tensors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from fedtune.config import build_config
from fedtune.federation.messages import ARRAYS, WEIGHT_KEY
from fedtune.federation.strategies import STRATEGIES, build_strategy

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("task_identity")]

SHAPES = {"layer.lora_A.weight": (3, 4), "layer.lora_B.weight": (5, 3)}


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def _flat(state):
    return np.concatenate([state[k].ravel() for k in SHAPES])


def _unflat(vector):
    out, start = {}, 0
    for key, shape in SHAPES.items():
        size = int(np.prod(shape))
        out[key] = vector[start : start + size].reshape(shape)
        start += size
    return out


def _reply(vector, weight, **extra):
    """A client's reply: its adapter (flat vector), weight, and extra records (flat vectors)."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    def record(values):
        return ArrayRecord({k: Array(v.astype(np.float32)) for k, v in _unflat(values).items()})

    content = RecordDict(
        {
            ARRAYS: record(vector),
            "metrics": MetricRecord({WEIGHT_KEY: weight, "train-loss": float(weight)}),
            **{name: record(values) for name, values in extra.items()},
        }
    )
    return Message(content=content, dst_node_id=1, message_type="train")


def _configure(strategy, server_round, global_vec, nodes):
    from flwr.app import Array, ArrayRecord, ConfigRecord

    arrays = ArrayRecord({k: Array(v.astype(np.float32)) for k, v in _unflat(global_vec).items()})
    return list(strategy.configure_train(server_round, arrays, ConfigRecord(), _Grid(nodes)))


def _round(strategy, server_round, global_vec, clients, weights):
    _configure(strategy, server_round, global_vec, list(range(1, len(clients) + 1)))
    replies = [_reply(v, w) for v, w in zip(clients, weights, strict=True)]
    result, _ = strategy.aggregate_train(server_round, replies)
    return _flat({k: a.numpy().astype(np.float64) for k, a in result.items()})


def _weighted_mean(clients, weights):
    w = np.asarray(weights, dtype=np.float64)
    return (np.stack(clients) * w[:, None]).sum(0) / w.sum()


def _krum_scores(clients, f):
    n = len(clients)
    stacked = np.stack(clients)
    distances = ((stacked[:, None, :] - stacked[None, :, :]) ** 2).sum(-1)
    scores = []
    for i in range(n):
        others = np.sort(np.delete(distances[i], i))
        scores.append(others[: n - f - 2].sum())
    return np.asarray(scores)


def _settings(config):
    """Every strategy.* value, named as attributes (strategy.fedadam.beta-1 → fedadam_beta_1)."""
    flat = config.to_flat()
    return SimpleNamespace(
        **{
            k.removeprefix("strategy.").replace(".", "_").replace("-", "_"): v
            for k, v in flat.items()
            if k.startswith("strategy.")
        }
    )


class Reference:
    """The papers' update rules, in float64."""

    def __init__(self, name, s):
        self.name, self.s = name, s
        self.m = self.v = None

    def __call__(self, x, clients, weights):
        s, name = self.s, self.name
        avg = _weighted_mean(clients, weights)
        if name in ("fedavg", "fedprox"):
            return avg
        if name == "fedavgm":  # Hsu et al. 2019: v ← βv + (x − avg); x ← x − ηv
            grad = x - avg
            self.m = grad if self.m is None else s.fedavgm_server_momentum * self.m + grad
            return x - s.fedavgm_server_learning_rate * self.m
        if name in ("fedadam", "fedyogi", "fedadagrad"):  # Reddi et al. 2021, Algorithm 2
            delta = avg - x
            beta_1 = {"fedadam": s.fedadam_beta_1, "fedyogi": s.fedyogi_beta_1}.get(name, 0.0)
            eta = {"fedadam": s.fedadam_eta, "fedyogi": s.fedyogi_eta}.get(name, s.fedadagrad_eta)
            tau = {"fedadam": s.fedadam_tau, "fedyogi": s.fedyogi_tau}.get(name, s.fedadagrad_tau)
            m = np.zeros_like(x) if self.m is None else self.m
            v = np.zeros_like(x) if self.v is None else self.v
            self.m = beta_1 * m + (1 - beta_1) * delta
            if name == "fedadam":
                self.v = s.fedadam_beta_2 * v + (1 - s.fedadam_beta_2) * delta**2
            elif name == "fedyogi":
                self.v = v - (1 - s.fedyogi_beta_2) * delta**2 * np.sign(v - delta**2)
            else:
                self.v = v + delta**2
            if name == "fedadam":
                # Flower's FedAdam also bias-corrects η as Adam does, counting t = round + 1.
                t = self.t = getattr(self, "t", 1) + 1
                eta *= np.sqrt(1 - s.fedadam_beta_2**t) / (1 - beta_1**t)
            return x + eta * self.m / (np.sqrt(self.v) + tau)
        if name == "fedmedian":
            return np.median(np.stack(clients), axis=0)
        if name == "fedtrimmedavg":
            cut = int(s.fedtrimmedavg_beta * len(clients))
            ordered = np.sort(np.stack(clients), axis=0)
            return ordered[cut : len(clients) - cut].mean(axis=0)
        if name in ("krum", "multikrum"):
            f = s.krum_num_malicious_nodes if name == "krum" else s.multikrum_num_malicious_nodes
            keep = 1 if name == "krum" else s.multikrum_num_nodes_to_select
            chosen = np.argsort(_krum_scores(clients, f), kind="stable")[:keep]
            return _weighted_mean([clients[i] for i in chosen], [weights[i] for i in chosen])
        raise AssertionError(name)


SETTINGS = {
    "fedavgm": {
        "strategy.fedavgm.server-momentum": 0.7,
        "strategy.fedavgm.server-learning-rate": 0.9,
    },
    "fedadam": {"strategy.fedadam.eta": 0.05},
    "fedyogi": {"strategy.fedyogi.eta": 0.05},
    "fedadagrad": {"strategy.fedadagrad.eta": 0.05},
    "fedtrimmedavg": {"strategy.fedtrimmedavg.beta": 0.2},
    "krum": {"strategy.krum.num-malicious-nodes": 1},
    "multikrum": {
        "strategy.multikrum.num-malicious-nodes": 1,
        "strategy.multikrum.num-nodes-to-select": 2,
    },
}


@pytest.mark.parametrize("name", [n for n in STRATEGIES if n not in ("flexlora", "scaffold")])
def test_aggregate_equals_the_numpy_reference_over_two_rounds(name):
    config = build_config(
        {"strategy.name": name, "strategy.clients-per-round": 5, **SETTINGS.get(name, {})}
    )
    strategy = build_strategy(config)
    reference = Reference(name, _settings(config))
    rng = np.random.default_rng(7)
    size = sum(int(np.prod(s)) for s in SHAPES.values())
    x = rng.standard_normal(size).astype(np.float32).astype(np.float64)
    for server_round in (1, 2):
        clients = [
            (x + 0.1 * rng.standard_normal(size)).astype(np.float32).astype(np.float64)
            for _ in range(5)
        ]
        clients[3] = clients[3] + 3.0  # one far-off reply: robust rules must not follow it
        weights = [10, 20, 30, 40, 50]
        got = _round(strategy, server_round, x, clients, weights)
        want = reference(x, clients, weights)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6, err_msg=name)
        x = got
    if name in ("fedmedian", "fedtrimmedavg", "krum", "multikrum"):
        assert np.abs(got - clients[3]).max() > 1.0  # the outlier did not pull the aggregate


def test_krum_needs_enough_clients_and_strategy_keys_are_checked():
    from fedtune.config import ConfigError

    with pytest.raises(ConfigError, match="needs at least f \\+ 3 = 3 clients"):
        build_config({"strategy.name": "krum", "strategy.clients-per-round": 2})
    with pytest.raises(ConfigError, match="num-nodes-to-select"):
        build_config(
            {
                "strategy.name": "multikrum",
                "strategy.clients-per-round": 3,
                "strategy.multikrum.num-nodes-to-select": 4,
            }
        )
    with pytest.raises(ConfigError, match="proximal-mu: must be > 0"):
        build_config({"strategy.name": "fedprox", "strategy.fedprox.proximal-mu": 0})
    with pytest.raises(ConfigError, match="applies to strategy.name=fedyogi, not fedadam"):
        build_config({"strategy.name": "fedadam", "strategy.fedyogi.eta": 0.5})
    build_config({"strategy.clients-per-round": 1})  # other strategies' defaults do not bind


def test_scaffold_server_update_and_messages():
    from fedtune.federation.messages import CONTROL, CONTROL_DELTA

    config = build_config(
        {
            "strategy.name": "scaffold",
            "federation.num-clients": 10,
            "strategy.scaffold.server-learning-rate": 0.5,
        }
    )
    strategy = build_strategy(config)
    rng = np.random.default_rng(11)
    size = sum(int(np.prod(s)) for s in SHAPES.values())
    x = rng.standard_normal(size).astype(np.float32).astype(np.float64)
    c = np.zeros(size)
    for server_round in (1, 2):
        messages = _configure(strategy, server_round, x, [1, 2, 3])
        sent_c = _flat({k: a.numpy() for k, a in messages[0].content[CONTROL].items()})
        np.testing.assert_allclose(sent_c, c, rtol=1e-6, atol=1e-7)  # zero, then the update
        clients = [x + rng.standard_normal(size) * 0.1 for _ in range(3)]
        deltas = [rng.standard_normal(size) for _ in range(3)]
        weights = [5, 10, 25]
        replies = [
            _reply(v, w, **{CONTROL_DELTA: d})
            for v, d, w in zip(clients, deltas, weights, strict=True)
        ]
        got, _ = strategy.aggregate_train(server_round, replies)
        clients = [v.astype(np.float32).astype(np.float64) for v in clients]
        deltas = [v.astype(np.float32).astype(np.float64) for v in deltas]
        # x ← x + η_g·(mean_w(y) − x); c ← c + (|S|/N)·mean(Δcᵢ)
        want = x + 0.5 * (_weighted_mean(clients, weights) - x)
        c = c + (3 / 10) * np.mean(deltas, axis=0)
        x = _flat({k: a.numpy().astype(np.float64) for k, a in got.items()})
        np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(_flat(strategy.control), c, rtol=1e-5, atol=1e-6)

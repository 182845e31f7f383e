"""Flower strategies by name, and the state they carry between rounds.

fedtune decides which clients train (seeded partition sampling, `nodes.py`) and shows the
strategy only those nodes, so every strategy is built to train all the nodes it is shown
(fraction 1.0, minimum 1). The strategy is then called only at its documented hooks:
`configure_train` (builds the messages and its config record) and `aggregate_train` (arrays and
metrics). Whatever state it keeps between rounds (FedAvgM's momentum, FedAdam's moments) is
found by `strategy_state` — every attribute holding arrays — and saved bit for bit with each
resume point, so a resumed run continues it exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedtune.federation.messages import ARRAYS, STRATEGY_CONFIG, WEIGHT_KEY

if TYPE_CHECKING:
    from flwr.serverapp.strategy import FedAvg

    from fedtune.config import RunConfig

STRATEGIES = (
    "fedavg",
    "fedavgm",
    "fedprox",
    "scaffold",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "flexlora",
)


def build_strategy(config: RunConfig, initial: Mapping[str, Any] | None = None) -> FedAvg:
    """The configured Flower strategy (`strategy.name`), weighted by `num-examples`.

    Args:
        initial: the initial global adapter (FlexLoRA starts empty directions from its A).
    """
    from flwr.serverapp import strategy as flower

    common: dict[str, Any] = dict(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_evaluate_nodes=0,
        min_available_nodes=1,
        weighted_by_key=WEIGHT_KEY,
        arrayrecord_key=ARRAYS,
        configrecord_key=STRATEGY_CONFIG,
    )
    s = config.strategy
    built: dict[str, Any] = {
        "fedavg": lambda: flower.FedAvg(**common),
        "fedavgm": lambda: flower.FedAvgM(
            **common,
            server_learning_rate=s.fedavgm_server_learning_rate,
            server_momentum=s.fedavgm_server_momentum,
        ),
        # The server side of FedProx is FedAvg's; the proximal term is the clients' (local.py).
        "fedprox": lambda: flower.FedProx(**common, proximal_mu=s.fedprox_proximal_mu),
        "fedadam": lambda: flower.FedAdam(
            **common,
            eta=s.fedadam_eta,
            beta_1=s.fedadam_beta_1,
            beta_2=s.fedadam_beta_2,
            tau=s.fedadam_tau,
        ),
        "fedyogi": lambda: flower.FedYogi(
            **common,
            eta=s.fedyogi_eta,
            beta_1=s.fedyogi_beta_1,
            beta_2=s.fedyogi_beta_2,
            tau=s.fedyogi_tau,
        ),
        "fedadagrad": lambda: flower.FedAdagrad(
            **common, eta=s.fedadagrad_eta, tau=s.fedadagrad_tau
        ),
        "fedmedian": lambda: flower.FedMedian(**common),
        "fedtrimmedavg": lambda: flower.FedTrimmedAvg(**common, beta=s.fedtrimmedavg_beta),
        "krum": lambda: flower.Krum(**common, num_malicious_nodes=s.krum_num_malicious_nodes),
        "multikrum": lambda: flower.MultiKrum(
            **common,
            num_malicious_nodes=s.multikrum_num_malicious_nodes,
            num_nodes_to_select=s.multikrum_num_nodes_to_select,
        ),
    }
    if s.name in built:
        return built[s.name]()
    if s.name == "scaffold":
        from fedtune.federation.scaffold import Scaffold

        return Scaffold(
            **common,
            num_clients=config.federation.num_clients,
            server_learning_rate=s.scaffold_server_learning_rate,
        )
    if s.name == "flexlora":
        from fedtune.federation.flexlora import FlexLoRA

        return FlexLoRA(
            **common, alpha=config.lora.alpha, rank=config.lora.r, initial=initial or {}
        )
    raise ValueError(f"strategy.name: unknown strategy {s.name!r}")  # config validated it


def _is_array(value: Any) -> bool:
    import numpy as np

    return isinstance(value, np.ndarray)


def strategy_state(strategy: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every attribute of `strategy` that holds arrays, as (tensors, description).

    Arrays are kept in their own dtype (FedAdam's moments are float64), so a restore is exact.
    Attributes that hold None are recorded too (a state not yet started).

    Returns:
        tensors: "strategy.<attr>.<i>" → torch tensor;
        description: attr → {"kind": arrayrecord|dict|list|array|none, "keys": [...]}.
    """
    import torch
    from flwr.app import ArrayRecord

    tensors: dict[str, Any] = {}
    described: dict[str, Any] = {}
    for attr, value in sorted(vars(strategy).items()):
        if isinstance(value, ArrayRecord):
            items = [(key, array.numpy()) for key, array in value.items()]
            kind = "arrayrecord"
        elif isinstance(value, dict) and value and all(_is_array(v) for v in value.values()):
            items = list(value.items())
            kind = "dict"
        elif isinstance(value, list) and value and all(_is_array(v) for v in value):
            items = [(str(i), v) for i, v in enumerate(value)]
            kind = "list"
        elif _is_array(value):
            items = [("", value)]
            kind = "array"
        elif value is None:
            described[attr] = {"kind": "none"}
            continue
        else:
            continue  # settings (floats, names, callables) come from the configuration
        keys = []
        for i, (key, array) in enumerate(items):
            tensors[f"strategy.{attr}.{i}"] = torch.from_numpy(array.copy())
            keys.append(key)
        described[attr] = {"kind": kind, "keys": keys}
    return tensors, described


def restore_strategy_state(
    strategy: Any, tensors: dict[str, Any], described: dict[str, Any]
) -> None:
    """Put back what `strategy_state` saved (a fresh strategy built from the same config)."""
    from flwr.app import Array, ArrayRecord

    for attr, info in described.items():
        kind = info["kind"]
        if kind == "none":
            setattr(strategy, attr, None)
            continue
        arrays = [tensors[f"strategy.{attr}.{i}"].numpy() for i in range(len(info["keys"]))]
        pairs = list(zip(info["keys"], arrays, strict=True))
        if kind == "arrayrecord":
            setattr(strategy, attr, ArrayRecord({k: Array(a) for k, a in pairs}))
        elif kind == "dict":
            setattr(strategy, attr, dict(pairs))
        elif kind == "list":
            setattr(strategy, attr, arrays)
        elif kind == "array":
            setattr(strategy, attr, arrays[0])
        else:  # pragma: no cover - written by strategy_state
            raise ValueError(f"unknown strategy state kind {kind!r} for {attr}")

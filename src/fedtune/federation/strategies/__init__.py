"""Aggregation strategies, one module each, registered by name (`strategy.name`).

`base.py` says what a strategy is (`Strategy`, `register_strategy`); each other module is one
strategy: Flower's FedAvg, FedAvgM, FedProx, FedAdam, FedYogi, FedAdagrad, FedMedian,
FedTrimmedAvg, Krum and MultiKrum, and fedtune's SCAFFOLD and FlexLoRA. Importing this package
registers them in this order (the order `strategy.name`'s errors and the docs list them in).
Whatever state a strategy keeps between rounds is saved and restored by `state.py`.
"""

import importlib

from fedtune.config import STRATEGIES
from fedtune.federation.strategies.base import (
    Strategy,
    build_strategy,
    get_strategy,
    register_strategy,
    strategies,
)
from fedtune.federation.strategies.state import restore_strategy_state, strategy_state

__all__ = [
    "STRATEGIES",
    "Strategy",
    "build_strategy",
    "get_strategy",
    "register_strategy",
    "restore_strategy_state",
    "strategies",
    "strategy_state",
]

# fedtune's own, in the order errors and docs list them; each module registers itself.
BUILTIN = (
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
for _module in BUILTIN:
    importlib.import_module(f"{__name__}.{_module}")

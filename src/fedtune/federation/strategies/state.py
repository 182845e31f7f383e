"""The state a strategy carries between rounds, saved and restored bit for bit.

Whatever a strategy keeps between rounds (FedAvgM's momentum, FedAdam's moments, SCAFFOLD's
control variate) is found by `strategy_state` — every attribute holding arrays — and saved with
each resume point, so a resumed run continues it exactly.
"""

from __future__ import annotations

from typing import Any


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

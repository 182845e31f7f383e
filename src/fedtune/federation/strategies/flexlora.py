"""FlexLoRA's aggregation (Bai et al., 2024), for clients whose LoRA ranks differ.

LoRA factors of different ranks cannot be averaged, and even at one rank averaging A and B apart
is not averaging the updates (mean(B)·mean(A) ≠ mean(B·A)). FlexLoRA averages what the factors
mean — each client's update ΔWᵢ = sᵢ·Bᵢ·Aᵢ (sᵢ = α/r, its LoRA scaling) — weighted by examples, and
hands each client back the best rank-rᵢ approximation of the average (truncated SVD, singular
values split evenly between the factors): Bᵢ = U·√Σ / √sᵢ, Aᵢ = √Σ·Vᵀ / √sᵢ over the top rᵢ.

fedtune keeps the global as LoRA factors at rank `model.lora.peft-lora-r` (≥ every client's rank),
so it is a PEFT adapter like any other (saved, evaluated, submitted as is). Nothing a client
receives is lost by that: the top rᵢ of the top r of the average are its top rᵢ. The global itself
is exact while the sampled clients' ranks sum to at most r. The SVDs never form a dense matrix:
Σ wᵢsᵢBᵢAᵢ = [w₁s₁B₁ | …]·[A₁; …], and the SVD of a product of thin factors is that of a small
matrix after two QR decompositions.

Directions the average does not fill (all of them before the first round; fewer than rᵢ after a
round of small ranks) would give a client zero columns of B *and* zero rows of A, which never
train (each factor's gradient is proportional to the other). They start as a fresh LoRA component
instead: A's row from the seeded initial adapter, B's column zero — the product is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, cast

import numpy as np
from flwr.serverapp.strategy import FedAvg

from fedtune.config import ConfigError, RunConfig
from fedtune.federation.strategies.base import Strategy, register_strategy

A_KEY, B_KEY = ".lora_A.weight", ".lora_B.weight"


def average_update(
    factors: Sequence[tuple[np.ndarray, np.ndarray]],
    weights: Sequence[float],
    scalings: Sequence[float],
) -> np.ndarray:
    """Σ wᵢ·sᵢ·Bᵢ·Aᵢ / Σ wᵢ in float64: the average of the clients' updates to one weight.

    Args:
        factors: (B (out×rᵢ), A (rᵢ×in)) per client; the ranks may differ.
        weights: each client's weight (its example count).
        scalings: each client's LoRA scaling α/rᵢ.
    Raises:
        ValueError: no client, a non-positive total weight, or factors that do not multiply.
    """
    if not factors:
        raise ValueError("no client update to average")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("the clients' weights sum to zero")
    result: np.ndarray | None = None
    for (b, a), weight, scaling in zip(factors, weights, scalings, strict=True):
        if b.shape[1] != a.shape[0]:
            raise ValueError(f"factors of rank {b.shape[1]} and {a.shape[0]} do not multiply")
        update = (weight * scaling / total) * (b.astype(np.float64) @ a.astype(np.float64))
        result = update if result is None else result + update
    assert result is not None
    return result


def factors_for_rank(
    update: np.ndarray, rank: int, scaling: float
) -> tuple[np.ndarray, np.ndarray]:
    """(B, A) of rank `rank` with scaling·B·A the best rank-`rank` approximation of `update`.

    Raises:
        ValueError: a rank above the update's smaller side.
    """
    if not 1 <= rank <= min(update.shape):
        raise ValueError(f"rank {rank} is outside 1..{min(update.shape)}")
    u, s, vh = np.linalg.svd(update.astype(np.float64), full_matrices=False)
    root = np.sqrt(s[:rank] / scaling)
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def stacked_update(
    factors: Sequence[tuple[np.ndarray, np.ndarray]],
    weights: Sequence[float],
    scalings: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    """(B (out×Σrᵢ), A (Σrᵢ×in)) in float64 whose product is `average_update` of the same
    arguments, without forming it.

    Raises:
        ValueError: as average_update.
    """
    if not factors:
        raise ValueError("no client update to average")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("the clients' weights sum to zero")
    bs, as_ = [], []
    for (b, a), weight, scaling in zip(factors, weights, scalings, strict=True):
        if b.shape[1] != a.shape[0]:
            raise ValueError(f"factors of rank {b.shape[1]} and {a.shape[0]} do not multiply")
        bs.append((weight * scaling / total) * b.astype(np.float64))
        as_.append(a.astype(np.float64))
    return np.concatenate(bs, axis=1), np.concatenate(as_, axis=0)


def product_svd(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The thin SVD (U, S, Vᵀ) of b·a (b: out×k, a: k×in), through QR of both factors."""
    q_b, r_b = np.linalg.qr(b.astype(np.float64))
    q_a, r_a = np.linalg.qr(a.astype(np.float64).T)
    u, s, vh = np.linalg.svd(r_b @ r_a.T)
    return q_b @ u, s, vh @ q_a.T


def truncated_factors(
    b: np.ndarray,
    a: np.ndarray,
    rank: int,
    scaling: float,
    filler: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """float32 (B, A) of rank `rank` with scaling·B·A the best rank-`rank` approximation of
    b·a; directions with a zero singular value get `filler`'s rows as A (B zero), or zeros.

    Raises:
        ValueError: a rank outside 1..min(out, in), or a filler of the wrong shape.
    """
    out_features, in_features = b.shape[0], a.shape[1]
    if not 1 <= rank <= min(out_features, in_features):
        raise ValueError(f"rank {rank} is outside 1..{min(out_features, in_features)}")
    u, s, vh = product_svd(b, a)
    width = min(rank, s.size)
    big_b = np.zeros((out_features, rank))
    big_a = np.zeros((rank, in_features))
    root = np.sqrt(s[:width] / scaling)
    big_b[:, :width] = u[:, :width] * root
    big_a[:width] = root[:, None] * vh[:width]
    # Numerical rank as numpy's matrix_rank decides it.
    tolerance = (s.max() if s.size else 0.0) * max(out_features, in_features) * np.finfo(float).eps
    empty = [k for k in range(rank) if k >= s.size or s[k] <= tolerance]
    if filler is not None and empty:
        if filler.shape[0] < rank or filler.shape[1] != in_features:
            raise ValueError(f"filler of shape {filler.shape} cannot fill rank {rank}")
        for k in empty:
            big_b[:, k] = 0.0
            big_a[k] = filler[k]
    elif empty:
        big_b[:, empty] = 0.0
        big_a[empty] = 0.0
    return big_b.astype(np.float32), big_a.astype(np.float32)


def module_pairs(keys: Iterable[str]) -> list[tuple[str, str]]:
    """(A key, B key) of each adapted module, in the adapter's order.

    Raises:
        ValueError: an A without its B, or a tensor that is neither (DoRA magnitudes).
    """
    keys = list(keys)
    known = set(keys)
    pairs = []
    for key in keys:
        if key.endswith(A_KEY):
            partner = key[: -len(A_KEY)] + B_KEY
            if partner not in known:
                raise ValueError(f"{key} has no {B_KEY} partner")
            pairs.append((key, partner))
        elif not key.endswith(B_KEY):
            raise ValueError(f"FlexLoRA aggregates LoRA factors only, not {key}")
    return pairs


class FlexLoRA(FedAvg):
    """Flower's FedAvg with FlexLoRA's messages and aggregation (see the module docstring).

    `node_ranks` (node id → rank) is set by fedtune before each round's `configure_train`; a
    node it does not name trains at the global rank. The initial adapter's A factors (the
    filler) are rebuilt from the seed at every start, so they are not part of the saved state.
    """

    def __init__(
        self, *, alpha: float, rank: int, initial: Mapping[str, Any], **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.alpha = float(alpha)
        self.rank = int(rank)
        self.node_ranks: dict[int, int] = {}
        self.filler = MappingProxyType(
            {k: np.asarray(v, dtype=np.float64) for k, v in initial.items() if k.endswith(A_KEY)}
        )

    def client_factors(self, arrays: Any, rank: int) -> dict[str, np.ndarray]:
        """The global adapter as a rank-`rank` client's factors (its scaling α/rank)."""
        state = {k: a.numpy() for k, a in arrays.items()}
        result: dict[str, np.ndarray] = {}
        for a_key, b_key in module_pairs(state):
            b, a = truncated_factors(
                (self.alpha / self.rank) * state[b_key].astype(np.float64),
                state[a_key],
                rank,
                self.alpha / rank,
                self.filler.get(a_key),
            )
            result[a_key], result[b_key] = a, b
        return {k: result[k] for k in state}  # the adapter's order

    def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> list[Any]:
        """One message per node, with the global's factors at the node's rank (nodes of one
        rank share a message body)."""
        from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict

        config["server-round"] = server_round
        bodies: dict[int, Any] = {}
        messages = []
        for node_id in grid.get_node_ids():
            rank = self.node_ranks.get(node_id, self.rank)
            if rank not in bodies:
                factors = ArrayRecord(
                    {k: Array(v) for k, v in self.client_factors(arrays, rank).items()}
                )
                bodies[rank] = RecordDict(
                    {self.arrayrecord_key: factors, self.configrecord_key: config}
                )
            messages.append(
                Message(content=bodies[rank], message_type=MessageType.TRAIN, dst_node_id=node_id)
            )
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Any]) -> tuple[Any, Any]:
        """The global at rank `rank`: the truncated SVD of the example-weighted average of the
        clients' products; metrics as FedAvg."""
        from flwr.app import Array, ArrayRecord

        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [message.content for message in valid]
        weights = [
            float(cast(float, next(iter(c.metric_records.values()))[self.weighted_by_key]))
            for c in contents
        ]
        states = [
            {k: a.numpy() for k, a in c.array_records[self.arrayrecord_key].items()}
            for c in contents
        ]
        result: dict[str, np.ndarray] = {}
        for a_key, b_key in module_pairs(states[0]):
            factors = [(s[b_key], s[a_key]) for s in states]
            scalings = [self.alpha / a.shape[0] for _, a in factors]
            b, a = stacked_update(factors, weights, scalings)
            result[b_key], result[a_key] = truncated_factors(
                b, a, self.rank, self.alpha / self.rank
            )
        arrays = ArrayRecord({k: Array(result[k]) for k in states[0]})
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)


class FlexLoRAStrategy(Strategy):
    """Clients train at their own ranks (model.lora.client-ranks); the server keeps the
    global at model.lora.peft-lora-r."""

    name = "flexlora"
    heterogeneous_ranks = True

    def build(
        self, config: RunConfig, common: dict[str, Any], initial: Mapping[str, Any]
    ) -> FedAvg:
        return FlexLoRA(**common, alpha=config.lora.alpha, rank=config.lora.r, initial=initial)

    def check(self, config: RunConfig) -> None:
        super().check(config)
        if config.lora.variant != "lora" or config.lora.use_dora:
            raise ConfigError(
                "strategy.name: flexlora aggregates plain LoRA factors: it needs "
                "model.lora.variant=lora without model.lora.use-dora"
            )


register_strategy(FlexLoRAStrategy())

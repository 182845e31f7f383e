"""FlexLoRA's aggregation (Bai et al., 2024), for clients whose LoRA ranks differ.

LoRA factors of different ranks cannot be averaged, and even at one rank averaging A and B apart
is not averaging the updates (mean(B)·mean(A) ≠ mean(B·A)). FlexLoRA averages what the factors
mean — each client's update ΔWᵢ = sᵢ·Bᵢ·Aᵢ (sᵢ = α/r, its LoRA scaling) — weighted by examples, and
hands each client back the best rank-rᵢ approximation of the average (truncated SVD, singular
values split evenly between the factors): Bᵢ = U·√Σ / √sᵢ, Aᵢ = √Σ·Vᵀ / √sᵢ over the top rᵢ.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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

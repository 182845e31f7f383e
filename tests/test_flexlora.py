"""FlexLoRA's aggregation against an exact SVD of the averaged product, on small matrices."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.federation.flexlora import average_update, factors_for_rank

pytestmark = pytest.mark.unit


def test_the_average_is_of_the_products_and_each_rank_gets_its_best_approximation():
    rng = np.random.default_rng(0)
    ranks, weights, alpha = [2, 4, 8], [10.0, 30.0, 60.0], 16.0
    factors = [(rng.standard_normal((12, r)), rng.standard_normal((r, 9))) for r in ranks]
    scalings = [alpha / r for r in ranks]
    average = average_update(factors, weights, scalings)
    expected = sum(
        w * s * (b @ a) for (b, a), w, s in zip(factors, weights, scalings, strict=True)
    ) / sum(weights)
    np.testing.assert_allclose(average, expected, rtol=1e-12, atol=1e-12)
    # Not what averaging the factors apart would give (same rank, equal weights, scaling 1).
    (b1, a1), (b2, a2) = factors[0], (rng.standard_normal((12, 2)), rng.standard_normal((2, 9)))
    products = average_update([(b1, a1), (b2, a2)], [1, 1], [1, 1])
    np.testing.assert_allclose(products, (b1 @ a1 + b2 @ a2) / 2, rtol=1e-12)
    assert not np.allclose(products, ((b1 + b2) / 2) @ ((a1 + a2) / 2))
    u, s, vh = np.linalg.svd(expected)
    for rank, scaling in zip(ranks, scalings, strict=True):
        b, a = factors_for_rank(average, rank, scaling)
        assert b.shape == (12, rank) and a.shape == (rank, 9)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]  # Eckart–Young: the best rank-r fit
        np.testing.assert_allclose(scaling * b @ a, best, rtol=1e-10, atol=1e-10)
    # Full rank gives the average back exactly.
    b, a = factors_for_rank(average, 9, 1.0)
    np.testing.assert_allclose(b @ a, average, rtol=1e-10, atol=1e-10)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="no client"):
        average_update([], [], [])
    with pytest.raises(ValueError, match="sum to zero"):
        average_update([(np.ones((2, 1)), np.ones((1, 2)))], [0.0], [1.0])
    with pytest.raises(ValueError, match="do not multiply"):
        average_update([(np.ones((2, 1)), np.ones((2, 2)))], [1.0], [1.0])
    with pytest.raises(ValueError, match="outside"):
        factors_for_rank(np.ones((3, 2)), 3, 1.0)

"""Cost-to-Target and Quality-under-Budget on curves built here."""

from __future__ import annotations

import math

import pytest

from fedtune.accounting.targets import (
    CurvePoint,
    cost_to_target,
    curve,
    fewer_bytes,
    quality_under_budget,
)

pytestmark = pytest.mark.unit


def test_the_curve_pairs_each_evaluated_round_with_its_bytes():
    # Rounds 1–4 sent 10, 30, 60, 100 bytes in all; the loss was scored before training and
    # after rounds 2 and 4 only.
    points = curve([1, 2, 3, 4], [10, 30, 60, 100], {0: 3.0, 2: 2.5, 4: 2.0})
    assert points == [CurvePoint(0, 0, 3.0), CurvePoint(2, 30, 2.5), CurvePoint(4, 100, 2.0)]
    # A loss for a round the ledger does not hold (a run cut short) is left out.
    assert curve([1], [10], {0: 3.0, 1: 2.9, 2: 2.8}) == [
        CurvePoint(0, 0, 3.0),
        CurvePoint(1, 10, 2.9),
    ]


def test_cost_to_target_is_the_first_round_at_or_below_it():
    points = curve([1, 2, 3], [10, 20, 30], {0: 3.0, 1: 2.6, 2: 2.7, 3: 2.4})
    assert cost_to_target(points, 2.6) == 10  # reached at round 1, even if round 2 is worse
    assert cost_to_target(points, 2.5) == 30
    assert cost_to_target(points, 3.0) == 0  # before training: nothing sent
    assert cost_to_target(points, 2.0) is None
    assert cost_to_target(reversed(points), 2.6) == 10  # order of the points does not matter


def test_quality_under_budget_is_the_best_loss_within_it():
    points = curve([1, 2, 3], [10, 20, 30], {0: 3.0, 1: 2.6, 2: 2.7, 3: 2.4})
    assert quality_under_budget(points, 25) == 2.6  # rounds 0–2: the best, not the last
    assert quality_under_budget(points, 30) == 2.4
    assert quality_under_budget(points, 9) == 3.0  # only the model before training
    assert quality_under_budget([], 100) is None
    assert quality_under_budget(points[1:], 5) is None


def test_fewer_bytes_is_the_reference_total_over_the_cost():
    assert fewer_bytes(1000, 50) == 20.0
    assert fewer_bytes(1000, None) is None
    assert math.isinf(fewer_bytes(1000, 0))


@pytest.mark.parametrize(
    "text,expected",
    [("2000000", 2_000_000), ("1.5MiB", 1_572_864), ("2 KiB", 2048), ("0.1GB", 107_374_182),
     ("3kB", 3000), ("1MB", 1_000_000), ("512b", 512)],
)  # fmt: skip
def test_byte_counts_parse_with_binary_si_and_board_units(text, expected):
    from fedtune.units import parse_bytes

    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["two", "5 parsecs", "-3MiB", "", "MiB"])
def test_a_byte_count_that_is_not_one_is_refused(text):
    from fedtune.units import parse_bytes

    with pytest.raises(ValueError):
        parse_bytes(text)

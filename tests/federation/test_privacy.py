"""Client-level DP: clipping, the server's DP aggregate against a NumPy reference, the noise's
seeding, and the accountant against the Gaussian mechanism's RDP bound."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from fedtune.config import ConfigError, build_config
from fedtune.federation import rounds
from fedtune.federation.messages import WEIGHT_KEY
from fedtune.federation.privacy import (
    add_noise,
    clip_update,
    epsilon_after,
    noise_rng,
    privacy_spent,
)
from fedtune.federation.strategies import build_strategy
from fedtune.federation.updates import ClientUpdate

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("task_identity")]

SHAPES = {"m.lora_A.weight": (3, 4), "m.lora_B.weight": (5, 3)}


def _random(rng, scale=1.0):
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def _norm(a, b):
    return math.sqrt(sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in b))


def test_clipping_bounds_the_update_keeps_its_direction_and_leaves_small_ones_alone():
    rng = np.random.default_rng(0)
    reference, new = _random(rng), _random(rng)
    norm = _norm(new, reference)
    clipped, reported = clip_update(new, reference, 0.5)
    assert reported == pytest.approx(norm, rel=1e-12)
    assert 0.5 * (1 - 1e-5) <= _norm(clipped, reference) <= 0.5
    delta = np.concatenate([(new[k] - reference[k]).ravel() for k in SHAPES])
    kept = np.concatenate([(clipped[k] - reference[k]).ravel() for k in SHAPES])
    assert np.dot(delta, kept) / (np.linalg.norm(delta) * np.linalg.norm(kept)) > 1 - 1e-6
    assert all(clipped[k].dtype == np.float32 for k in SHAPES)
    same, _ = clip_update(new, reference, norm * 2)
    assert all(np.array_equal(same[k], new[k]) for k in SHAPES)


def test_noise_is_seeded_by_seed_round_and_client():
    zeros = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    a = add_noise(zeros, 0.1, noise_rng(7, 3, 1))
    assert all(np.array_equal(a[k], add_noise(zeros, 0.1, noise_rng(7, 3, 1))[k]) for k in a)
    for other in (noise_rng(7, 4, 1), noise_rng(7, 3, 2), noise_rng(8, 3, 1), noise_rng(7, 3, -1)):
        b = add_noise(zeros, 0.1, other)
        assert not np.array_equal(a["m.lora_A.weight"], b["m.lora_A.weight"])
    values = np.concatenate([v.ravel() for v in add_noise(
        {"x": np.zeros(200_000, np.float32)}, 0.3, noise_rng(1, 1, 0)).values()])  # fmt: skip
    assert values.std() == pytest.approx(0.3, rel=0.01) and abs(values.mean()) < 0.003


def _context(config, strategy, population):
    return rounds.RoundContext(
        grid=None, strategy=strategy, nodes=None, sampler=None, ledger=None, run_config={},
        expected_spec={k: (s, "float32") for k, s in SHAPES.items()}, clients_per_round=3,
        min_clients=1, max_retries=0, round_timeout_s=1.0, byte_budget=0, norm_ratio=0.0,
        norm_window=1, partition_rows=None, seed=config.train.seed,
        dp=config.dp, population=population,
    )  # fmt: skip


def test_server_dp_aggregate_equals_the_numpy_reference():
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

    config = build_config(
        {"dp.clipping-norm": 0.8, "dp.noise-multiplier": 1.5, "federation.num-clients": 6}
    )
    strategy = build_strategy(config)
    rng = np.random.default_rng(1)
    reference = _random(rng)
    # Three clients: one small update, two far larger than the bound; very different weights.
    clients = [
        {k: reference[k] + 0.01 * rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()},
        _random(rng, 3.0),
        _random(rng, 5.0),
    ]  # fmt: skip
    updates = []
    for i, values in enumerate(clients):
        update = ClientUpdate(node_id=10 + i, partition_id=i, attempt=1)
        update.reply = Message(content=RecordDict(), dst_node_id=10 + i, message_type="train")
        update.arrays = ArrayRecord({k: Array(v) for k, v in values.items()})
        update.metrics = {WEIGHT_KEY: [1, 50, 900][i], "train-loss": 1.0}
        updates.append(update)
    ctx = _context(config, strategy, 6)
    sent = ArrayRecord({k: Array(v) for k, v in reference.items()})
    strategy.configure_train(1, sent, ConfigRecord(), _Grid([10, 11, 12]))
    got, _ = rounds.aggregate(ctx, 1, updates, reference)

    # Reference: clip each delta to C, unweighted mean, then N(0, (σC/n)²) from the server's
    # generator for (seed, round), drawn tensor by tensor in key order.
    clipped = [clip_update(c, reference, 0.8)[0] for c in clients]
    mean = {k: np.mean([c[k].astype(np.float64) for c in clipped], axis=0) for k in SHAPES}
    noise_gen = noise_rng(config.train.seed, 1, -1)
    want = {
        k: mean[k] + noise_gen.normal(0.0, 1.5 * 0.8 / 3, size=SHAPES[k]) for k in sorted(SHAPES)
    }
    for k in SHAPES:
        np.testing.assert_allclose(got[k].numpy(), want[k], rtol=1e-5, atol=1e-6)
    # Without the noise the mean of clipped updates is within C of the reference.
    assert _norm(mean, reference) <= 0.8


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def _rdp_bound(sigma: float, releases: int, delta: float) -> float:
    """ε of `releases` Gaussian mechanisms with noise multiplier σ by the classic RDP
    conversion (Mironov 2017): min over α of releases·α/(2σ²) + log(1/δ)/(α − 1)."""
    return min(
        releases * a / (2 * sigma**2) + math.log(1 / delta) / (a - 1)
        for a in np.linspace(1.01, 400, 40_000)
    )


@pytest.mark.parametrize("sigma,releases", [(1.0, 5), (2.0, 50), (0.7, 1)])
def test_accountant_agrees_with_the_gaussian_rdp_bound(sigma, releases):
    dp = SimpleNamespace(noise="server", noise_multiplier=sigma, clipping_norm=1.0, delta=1e-5,
                         accounting="no-amplification")  # fmt: skip
    epsilon = privacy_spent(dp, 20, [2] * releases)["epsilon"]
    bound = _rdp_bound(sigma, releases, 1e-5)
    # dp-accounting's conversion is tighter than the classic one, never looser, and not by much.
    assert 0.75 * bound <= epsilon <= bound * (1 + 1e-6)
    more_noise = SimpleNamespace(**{**vars(dp), "noise_multiplier": sigma * 2})
    assert privacy_spent(more_noise, 20, [2] * releases)["epsilon"] < epsilon


def _direct_epsilon(
    multiplier: float, releases: int, *, sampled: int | None, relation: str, population: int = 20
) -> float:
    """ε at δ = 1e-5 computed with dp-accounting's own events (not through fedtune): a Gaussian of
    noise multiplier `multiplier`, alone or inside uniform sampling of `sampled` of `population`
    clients without replacement, composed `releases` times under `relation`."""
    from dp_accounting import dp_event
    from dp_accounting.privacy_accountant import NeighboringRelation
    from dp_accounting.rdp import RdpAccountant

    ledger = RdpAccountant(neighboring_relation=getattr(NeighboringRelation, relation))
    event = dp_event.GaussianDpEvent(multiplier)
    if sampled is not None:
        event = dp_event.SampledWithoutReplacementDpEvent(population, sampled, event)
    ledger.compose(event, releases)
    return float(ledger.get_epsilon(1e-5))


def _dp(sigma: float, accounting: str, noise: str = "server") -> SimpleNamespace:
    return SimpleNamespace(noise=noise, noise_multiplier=sigma, clipping_norm=0.1, delta=1e-5,
                           accounting=accounting)  # fmt: skip


@pytest.mark.parametrize(
    "sigma,releases,epsilon", [(1.0, 10, 17.508), (1.0, 100, 83.937), (2.0, 100, 14.054)]
)
def test_sampling_without_replacement_counts_the_replace_one_sensitivity_2c(
    sigma, releases, epsilon
):
    # Replacing one client moves the sum of clipped updates by up to 2C; the noise on it is σC:
    # the accountant's multiplier is σ/2 (docs/privacy.md), 2 of 20 clients a round.
    got = privacy_spent(_dp(sigma, "without-replacement"), 20, [2] * releases)
    assert round(got["epsilon"], 3) == epsilon
    assert got["relation"] == "replace-one" and got["accountant_noise_multiplier"] == sigma / 2
    direct = _direct_epsilon(sigma / 2, releases, sampled=2, relation="REPLACE_ONE")
    assert got["epsilon"] == pytest.approx(direct, rel=1e-9)
    # The figure of the multiplier σ (what an accountant that ignores the 2C gives) is far smaller.
    assert _direct_epsilon(sigma, releases, sampled=2, relation="REPLACE_ONE") < 0.7 * epsilon


def test_the_budget_stop_projects_the_corrected_epsilon():
    # What `dp.max-epsilon` compares (rounds.py, before each round): σ = 2 with 2 of 3 clients
    # sampled, multiplier σ/2 = 1 — ε 6.661 after two releases, 8.493 if a third were made.
    dp = _dp(2.0, "without-replacement")
    assert round(epsilon_after(dp, 3, [2, 2], 2), 3) == 8.493
    assert epsilon_after(dp, 3, [2, 2], 2) == pytest.approx(
        _direct_epsilon(1.0, 3, sampled=2, relation="REPLACE_ONE", population=3), rel=1e-9
    )


@pytest.mark.parametrize("noise", ["server", "client"])
@pytest.mark.parametrize("sigma,releases", [(0.8, 3), (1.5, 40)])
def test_no_amplification_counts_sensitivity_c_under_add_or_remove(noise, sigma, releases):
    got = privacy_spent(_dp(sigma, "no-amplification", noise), 20, [2] * releases)
    assert got["relation"] == "add-or-remove-one" and got["accountant_noise_multiplier"] == sigma
    direct = _direct_epsilon(sigma, releases, sampled=None, relation="ADD_OR_REMOVE_ONE")
    assert got["epsilon"] == pytest.approx(direct, rel=1e-9)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
def test_sampling_every_client_is_no_better_than_no_sampling_under_the_same_relation(sigma):
    # All 20 of 20 sampled: nothing is amplified, so ε must not fall below the plain Gaussian's
    # under replace-one (multiplier σ/2) — with the multiplier σ it would, by far.
    everyone = privacy_spent(_dp(sigma, "without-replacement"), 20, [20] * 5)["epsilon"]
    plain = _direct_epsilon(sigma / 2, 5, sampled=None, relation="REPLACE_ONE")
    assert everyone >= plain * (1 - 1e-9)
    assert _direct_epsilon(sigma, 5, sampled=20, relation="REPLACE_ONE") < 0.6 * plain


def test_no_noise_means_infinite_epsilon_and_bad_settings_are_named():
    dp = SimpleNamespace(noise="server", noise_multiplier=0.0, clipping_norm=1.0, delta=1e-5,
                         accounting="no-amplification")  # fmt: skip
    assert privacy_spent(dp, 20, [])["epsilon"] == 0.0
    assert math.isinf(privacy_spent(dp, 20, [2])["epsilon"])
    for bad, key in [
        ({"dp.noise-multiplier": 1.0}, "dp.noise-multiplier"),
        ({"dp.clipping-norm": 0.1, "strategy.name": "fedadam"}, "dp.clipping-norm"),
        (
            {
                "dp.clipping-norm": 0.1,
                "compress.uplink": "delta,int8",
                "compress.error-feedback": True,
            },
            "dp.clipping-norm",
        ),  # fmt: skip
        (
            {"dp.clipping-norm": 0.1, "dp.noise": "client", "dp.accounting": "without-replacement"},
            "dp.accounting",
        ),  # fmt: skip
        ({"dp.clipping-norm": 0.1, "dp.delta": 1.0}, "dp.delta"),
        ({"dp.clipping-norm": 0.1, "dp.noise-multiplier": 1e300}, "dp.noise-multiplier"),
        ({"dp.clipping-norm": 0.1, "dp.max-epsilon": 3.0}, "dp.max-epsilon"),
    ]:
        with pytest.raises(ConfigError, match=key):
            build_config(bad)

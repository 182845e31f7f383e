"""Client-level differential privacy for the adapter updates: DP-FedAvg with fixed clipping.

- Every client clips its update — its adapter after local training minus the global adapter it
  received, over all tensors that travel, as one vector — to L2 norm `dp.clipping-norm` (C)
  before the uplink codec sees it.
- The server clips each decoded update to C again (a no-op for an honest client and a lossless
  codec; it bounds what a lossy codec's rounding or a client that skipped its clipping could
  add), averages the updates with equal weights (an example-count weight would change the
  sensitivity), and
  - `dp.noise = server` (central DP, a trusted server): adds Gaussian noise of standard
    deviation σ·C/n to the mean of the n updates;
  - `dp.noise = client` (local DP, the server sees only noised updates): each client adds noise
    of standard deviation σ·C to its own clipped update.
  σ is `dp.noise-multiplier`. The noise comes from generators seeded by (train.seed, round,
  client), so the same seed gives the same bits and a resumed run redoes a round identically.
- Each round that releases an aggregate is one Gaussian event in Flower's RDP accountant
  (Google's dp-accounting underneath). The ε at `dp.delta` after every round is written to
  metrics.jsonl, the summary and the leaderboard submission; `dp.max-epsilon` stops the run
  before a round that would pass it. Accounting is per client, under the neighbouring relation of
  `dp.accounting` (`RELATIONS`): `no-amplification` (the default) counts every client in every
  round, "add or remove one client's data", sensitivity C; `without-replacement` amplifies by the
  server's uniform sampling of n of N clients, which dp-accounting analyses under "replace one
  client", sensitivity 2C — central noise only. The accountant's noise multiplier is the noise's
  standard deviation over the sensitivity: σ/1 or σ/2 (`accountant_noise_multiplier`; the
  derivation is in docs/privacy.md). The loss metrics clients report are not covered, as in
  Flower's own accounting.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedtune.config import ACCOUNTING

# Each accounting mode's neighbouring relation and the L2 sensitivity, in units of the clipping norm
# C, of what a round releases under it (the sum of the clipped updates; see docs/privacy.md):
# removing one client's data takes at most C off the sum, replacing it moves the sum by up to 2C.
RELATIONS = {
    "no-amplification": ("add-or-remove-one", 1.0),
    "without-replacement": ("replace-one", 2.0),
}
if tuple(RELATIONS) != ACCOUNTING:  # the modes dp.accounting accepts (fedtune.config)
    raise ImportError(
        f"privacy relations {tuple(RELATIONS)} differ from dp.accounting's {ACCOUNTING}"
    )


def clip_update(
    new: dict[str, np.ndarray], reference: dict[str, np.ndarray], clipping_norm: float
) -> tuple[dict[str, np.ndarray], float]:
    """`new` moved towards `reference` so that ‖new − reference‖₂ ≤ clipping_norm; and the
    norm before clipping. Computed in float64, returned in each tensor's own dtype."""
    deltas = {k: new[k].astype(np.float64) - reference[k].astype(np.float64) for k in reference}
    norm = math.sqrt(sum(float(np.sum(d * d)) for d in deltas.values()))
    factor = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    clipped = {
        k: (reference[k].astype(np.float64) + factor * d).astype(new[k].dtype)
        for k, d in deltas.items()
    }
    # Rounding back to float32 may leave the norm a hair above C: shrink until it is not.
    while factor < 1.0 and _distance(clipped, reference) > clipping_norm:
        factor *= 1 - 1e-6
        clipped = {
            k: (reference[k].astype(np.float64) + factor * d).astype(new[k].dtype)
            for k, d in deltas.items()
        }
    return clipped, norm


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return math.sqrt(
        sum(float(np.sum((a[k].astype(np.float64) - b[k].astype(np.float64)) ** 2)) for k in b)
    )


def noise_rng(seed: int, server_round: int, who: int) -> np.random.Generator:
    """The generator of one round's noise: `who` is the partition id (client noise) or -1
    (the server's)."""
    return np.random.default_rng([seed, server_round, who + 1, 0xD1FF])


def add_noise(
    arrays: dict[str, np.ndarray], std: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Each tensor plus i.i.d. N(0, std²) noise (drawn in float64, in key order)."""
    return {
        k: (v.astype(np.float64) + rng.normal(0.0, std, size=v.shape)).astype(v.dtype)
        for k, v in sorted(arrays.items())
    }


def accountant_noise_multiplier(dp: Any) -> float:
    """The noise multiplier the accountant's Gaussian event takes: the standard deviation of the
    noise on the sum of clipped updates (σ·C) over that sum's sensitivity under the mode's
    neighbouring relation (C or 2C)."""
    return float(dp.noise_multiplier) / RELATIONS[dp.accounting][1]


def accountant(dp: Any, population: int) -> Any:
    """Flower's RDP accountant for `dp` (a DpConfig) over `population` clients."""
    from flwr.supercore.privacy_accounting import (
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    amplified = dp.accounting == "without-replacement"
    relation = {
        "add-or-remove-one": NeighboringRelation.ADD_OR_REMOVE_ONE,
        "replace-one": NeighboringRelation.REPLACE_ONE,
    }[RELATIONS[dp.accounting][0]]
    return RdpAccountant(
        PrivacyConfig(
            target_delta=dp.delta,
            population_size=population,
            neighboring_relation=relation,
            sampling_method=(
                SamplingMethod.WITHOUT_REPLACEMENT if amplified else SamplingMethod.NO_AMPLIFICATION
            ),
        )
    )


def privacy_spent(dp: Any, population: int, releases: list[int]) -> dict[str, Any]:
    """What DP a run has and the (ε, δ) spent after `releases` (each round's number of
    aggregated clients). ε is infinite while σ is 0 (clipping without noise)."""
    spent: dict[str, Any] = {
        "noise": dp.noise,
        "noise_multiplier": dp.noise_multiplier,
        "clipping_norm": dp.clipping_norm,
        "delta": dp.delta,
        "accounting": dp.accounting,
        "accountant": "RDP (Flower's RdpAccountant over Google's dp-accounting)",
        "relation": RELATIONS[dp.accounting][0],
        "accountant_noise_multiplier": accountant_noise_multiplier(dp),
        "population": population,
        "releases": list(releases),
        "epsilon": 0.0 if not releases else math.inf,
    }
    if releases and dp.noise_multiplier > 0:
        from collections import Counter

        from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

        ledger = accountant(dp, population)
        # Releases of one size are one event composed that many times (the same ε, far faster).
        for sample, count in sorted(Counter(releases).items()):
            ledger.compose(
                GaussianPrivacyEvent(accountant_noise_multiplier(dp), sample, population), count
            )
        spent["epsilon"] = float(ledger.get_epsilon(dp.delta))
    return spent


def epsilon_after(dp: Any, population: int, releases: list[int], sample: int) -> float:
    """ε if one more round released an aggregate of `sample` clients."""
    return float(privacy_spent(dp, population, [*releases, sample])["epsilon"])

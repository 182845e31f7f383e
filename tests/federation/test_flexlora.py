"""FlexLoRA's aggregation against an exact SVD of the averaged product, on small matrices."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.federation.strategies.flexlora import average_update, factors_for_rank

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


def test_the_thin_path_equals_the_dense_one():
    from fedtune.federation.strategies.flexlora import stacked_update, truncated_factors

    rng = np.random.default_rng(1)
    ranks, weights, alpha = [2, 4], [3.0, 5.0], 8.0
    factors = [(rng.standard_normal((20, r)), rng.standard_normal((r, 15))) for r in ranks]
    scalings = [alpha / r for r in ranks]
    b, a = stacked_update(factors, weights, scalings)
    assert b.shape == (20, 6) and a.shape == (6, 15)
    dense = average_update(factors, weights, scalings)
    np.testing.assert_allclose(b @ a, dense, rtol=1e-12, atol=1e-12)
    for rank in (1, 3, 6):
        thin_b, thin_a = truncated_factors(b, a, rank, alpha / rank)
        ref_b, ref_a = factors_for_rank(dense, rank, alpha / rank)
        assert thin_b.dtype == np.float32 and thin_b.shape == (20, rank)
        np.testing.assert_allclose(thin_b @ thin_a, ref_b @ ref_a, rtol=1e-5, atol=1e-5)


def test_empty_directions_start_as_fresh_lora_components():
    from fedtune.federation.strategies.flexlora import truncated_factors

    rng = np.random.default_rng(2)
    filler = rng.standard_normal((4, 7))
    # Nothing learned yet: B zero, A the initial rows — what a fresh LoRA adapter holds.
    b, a = truncated_factors(np.zeros((5, 4)), filler, 4, 2.0, filler)
    assert not b.any()
    np.testing.assert_array_equal(a, filler.astype(np.float32))
    # A rank-1 average handed to a rank-3 client: one learned direction, two fresh ones.
    u, v = rng.standard_normal((5, 1)), rng.standard_normal((1, 7))
    b, a = truncated_factors(u, v, 3, 1.0, filler)
    np.testing.assert_allclose(b @ a, u @ v, rtol=1e-5, atol=1e-6)
    assert b[:, 0].any() and not b[:, 1:].any()
    np.testing.assert_array_equal(a[1:], filler[1:3].astype(np.float32))
    # Without a filler those directions are zero in both factors.
    b, a = truncated_factors(u, v, 3, 1.0)
    assert not b[:, 1:].any() and not a[1:].any()
    with pytest.raises(ValueError, match="filler"):
        truncated_factors(u, v, 3, 1.0, filler[:2])


def _pairs(rng, rank, modules=("m0", "m1"), out=6, inp=5):
    state = {}
    for name in modules:
        state[f"{name}.lora_A.weight"] = rng.standard_normal((rank, inp)).astype(np.float32)
        state[f"{name}.lora_B.weight"] = rng.standard_normal((out, rank)).astype(np.float32)
    return state


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def _strategy(rank=4, alpha=8, initial=None):
    from fedtune.config import build_config
    from fedtune.federation.strategies import build_strategy

    config = build_config(
        {
            "strategy.name": "flexlora",
            "model.lora.peft-lora-r": rank,
            "model.lora.peft-lora-alpha": alpha,
        }
    )
    return build_strategy(config, initial or {})


def test_flexlora_sends_each_node_the_global_at_its_rank(task_identity):
    from flwr.app import Array, ArrayRecord, ConfigRecord

    from fedtune.federation.messages import ARRAYS

    rng = np.random.default_rng(3)
    global_state = _pairs(rng, 4)
    strategy = _strategy(rank=4, alpha=8.0, initial=_pairs(rng, 4))
    strategy.node_ranks = {11: 2, 12: 4, 13: 2}
    arrays = ArrayRecord({k: Array(v) for k, v in global_state.items()})
    messages = strategy.configure_train(3, arrays, ConfigRecord(), _Grid([11, 12, 13]))
    assert [m.metadata.dst_node_id for m in messages] == [11, 12, 13]
    assert messages[0].content is messages[2].content  # one body per rank
    assert messages[0].content.config_records["config"]["server-round"] == 3
    for message, rank in zip(messages, (2, 4, 2), strict=True):
        sent = {k: a.numpy() for k, a in message.content[ARRAYS].items()}
        assert list(sent) == list(global_state)  # the adapter's keys, in its order
        for name in ("m0", "m1"):
            a, b = sent[f"{name}.lora_A.weight"], sent[f"{name}.lora_B.weight"]
            assert a.shape == (rank, 5) and b.shape == (6, rank)
            product = (
                (8.0 / 4)
                * global_state[f"{name}.lora_B.weight"].astype(np.float64)
                @ (global_state[f"{name}.lora_A.weight"].astype(np.float64))
            )
            u, s, vh = np.linalg.svd(product)
            best = (u[:, :rank] * s[:rank]) @ vh[:rank]
            np.testing.assert_allclose((8.0 / rank) * b @ a, best, rtol=1e-4, atol=1e-5)


def test_flexlora_aggregates_the_products_of_clients_of_different_ranks(task_identity):
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    from fedtune.federation.messages import ARRAYS, WEIGHT_KEY

    rng = np.random.default_rng(4)
    ranks, weights, alpha = (2, 4), (10, 30), 8.0
    states = [_pairs(rng, r) for r in ranks]
    replies = []
    for state, weight in zip(states, weights, strict=True):
        content = RecordDict(
            {
                ARRAYS: ArrayRecord({k: Array(v) for k, v in state.items()}),
                "metrics": MetricRecord({WEIGHT_KEY: weight, "train-loss": float(weight)}),
            }
        )
        replies.append(Message(content=content, dst_node_id=0, message_type="train"))
    arrays, metrics = _strategy(rank=4, alpha=alpha).aggregate_train(1, replies)
    assert metrics["train-loss"] == pytest.approx((10 * 10 + 30 * 30) / 40)
    for name in ("m0", "m1"):
        a, b = (arrays[f"{name}.lora_{x}.weight"].numpy() for x in "AB")
        assert a.shape == (4, 5) and b.shape == (6, 4)
        average = sum(
            w
            * (alpha / r)
            * s[f"{name}.lora_B.weight"].astype(np.float64)
            @ s[f"{name}.lora_A.weight"].astype(np.float64)
            for s, w, r in zip(states, weights, ranks, strict=True)
        ) / sum(weights)
        u, sv, vh = np.linalg.svd(average)
        best = (u[:, :4] * sv[:4]) @ vh[:4]
        np.testing.assert_allclose((alpha / 4) * b @ a, best, rtol=1e-4, atol=1e-5)


def test_flexlora_refuses_tensors_that_are_not_lora_factors():
    from fedtune.federation.strategies.flexlora import module_pairs

    assert module_pairs(["x.lora_A.weight", "x.lora_B.weight"]) == [
        ("x.lora_A.weight", "x.lora_B.weight")
    ]
    with pytest.raises(ValueError, match="partner"):
        module_pairs(["x.lora_A.weight"])
    with pytest.raises(ValueError, match="LoRA factors only"):
        module_pairs(["x.lora_A.weight", "x.lora_B.weight", "x.lora_magnitude_vector"])


def test_client_ranks_are_checked():
    from fedtune.config import ConfigError, build_config, client_rank

    config = build_config(
        {
            "strategy.name": "flexlora",
            "model.lora.peft-lora-r": 8,
            "model.lora.client-ranks": "4, 8,2",
        }
    )
    assert [client_rank(config.lora, p) for p in range(5)] == [4, 8, 2, 4, 8]
    assert client_rank(build_config({}).lora, 3) == 8  # empty: the global rank
    for flat, match in [
        ({"model.lora.client-ranks": "4,8"}, "need strategy.name=flexlora"),
        ({"strategy.name": "flexlora", "model.lora.client-ranks": "4,16"}, r"in \[1, 8\]"),
        ({"strategy.name": "flexlora", "model.lora.client-ranks": "4,x"}, "not an integer"),
        ({"strategy.name": "flexlora", "model.lora.variant": "ffa"}, "variant=lora"),
        ({"strategy.name": "flexlora", "model.lora.use-dora": True}, "use-dora"),
    ]:
        with pytest.raises(ConfigError, match=match):
            build_config(flat)


def test_a_client_trains_at_its_own_rank_on_one_base_model(tiny_llama):
    import torch

    from fedtune.config import build_config
    from fedtune.model.adapters import adapter_state, attach_adapter, use_rank

    lora = build_config({"model.lora.peft-lora-r": 8}).lora
    model = attach_adapter(tiny_llama(), lora, seed=1)
    default = adapter_state(model)
    use_rank(model, lora, 4, seed=1)
    small = adapter_state(model)
    assert set(small) == set(default)
    assert all(v.shape[0] == 4 for k, v in small.items() if ".lora_A." in k)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".rank-4." in n for n in trainable)
    use_rank(model, lora, 8, seed=1)
    assert all(torch.equal(default[k], v) for k, v in adapter_state(model).items())
    assert all(".default." in n for n, p in model.named_parameters() if p.requires_grad)

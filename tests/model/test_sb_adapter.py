"""The r×r adapter (model.lora.variant=sb): factors from the first gradient's SVD, R = 0 at the
start, exact aggregation, and a merge to plain PEFT LoRA that loads and computes the same."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedtune.config import build_config
from fedtune.data.pipeline import sb_init_examples
from fedtune.model.adapters import (
    adapter_state,
    frozen_digest,
    load_adapter_state,
    prepare_adapter,
    to_peft,
    travelling_keys,
)
from fedtune.model.variants import sb

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test its own FEDTUNE_CACHE: the r×r factors one test computed are not another's."""
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def setup(smollm2_tokenizer, tiny_llama):
    """(config, init examples, pad id, the tiny-model builder of tests/conftest.py)."""
    config = build_config(
        {"model.lora.variant": "sb", "model.lora.sb-init-examples": 4, "train.seq-length": 48}
    )
    examples = sb_init_examples(smollm2_tokenizer, config, sb.SbVariant().init_examples(config))
    return config, examples, smollm2_tokenizer.pad_token_id, tiny_llama


def prepared(setup):
    config, examples, pad, build = setup
    return prepare_adapter(build(), config.lora, config.train.seed, examples, pad)


def test_factors_are_the_gradients_svd_and_the_adapter_starts_as_the_base_model(setup):
    config, examples, pad, build_tiny_llama = setup
    model = prepared(setup)
    ids = torch.tensor([[5, 17, 230, 4000, 12]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        base = build_tiny_llama()(input_ids=ids).logits
    assert torch.equal(adapted, base)  # R = 0
    # A and B are the top-r singular vectors of the gradient on the public init examples.
    gradients = sb.init_gradients(
        prepare_adapter(
            build_tiny_llama(),
            build_config({"train.seq-length": 48}).lora,
            config.train.seed,
            None,
            pad,
        ),
        examples,
        pad,
    )
    state = adapter_state(model)
    for name, gradient in gradients.items():
        u, _, vh = torch.linalg.svd(gradient, full_matrices=False)
        a = state[f"{name}.lora_A.weight"]
        basis = state[f"{name}.lora_B.basis"]
        assert torch.allclose(a, vh[:8].float(), atol=1e-6)
        assert torch.allclose(basis, u[:, :8].float(), atol=1e-6)
        assert torch.allclose(a @ a.T, torch.eye(8), atol=1e-5)
        assert torch.count_nonzero(state[f"{name}.lora_B.core"]) == 0
    # Only R trains and travels; the factors are the same on every node (checked by digest).
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".core") for n in trainable)
    travelling = travelling_keys("sb", state)
    assert travelling and all(k.endswith(".lora_B.core") for k in travelling)
    again = adapter_state(prepared(setup))
    assert frozen_digest(again, travelling) == frozen_digest(state, travelling)


def test_gradient_and_svd_run_on_one_thread_whatever_the_callers_count(setup, monkeypatch):
    # LAPACK's SVD gives other bits on another thread count (SmolLM2's gradients at r = 32 on two
    # threads vs one), which broke the digest check between a 2-thread server and 1-thread nodes.
    threads_seen = []
    real_svd = torch.linalg.svd

    def recording_svd(*args, **kwargs):
        threads_seen.append(torch.get_num_threads())
        return real_svd(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", recording_svd)
    monkeypatch.setattr(sb, "_read_cache", lambda key, ranks: None)  # computed both times
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        state = adapter_state(prepared(setup))
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)
    assert threads_seen and set(threads_seen) == {1}
    torch.set_num_threads(1)
    try:
        again = adapter_state(prepared(setup))
    finally:
        torch.set_num_threads(before)
    travelling = travelling_keys("sb", state)
    assert frozen_digest(again, travelling) == frozen_digest(state, travelling)


def test_the_factors_are_cached_and_read_back_bit_for_bit(setup, tmp_path, monkeypatch):
    config, examples, pad, build = setup
    computed = []
    real = sb.init_gradients
    monkeypatch.setattr(sb, "init_gradients", lambda *a, **k: computed.append(1) or real(*a, **k))
    first = adapter_state(prepared(setup))
    files = list((tmp_path / "cache" / sb.CACHE_DIR).glob("*.safetensors"))
    assert len(computed) == 1 and len(files) == 1
    again = adapter_state(prepared(setup))
    assert len(computed) == 1  # read, not computed
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    # The adapter's own seeded start does not enter the first gradient (LoRA's B starts at 0):
    # another seed reads the same factors.
    prepare_adapter(build(), config.lora, config.train.seed + 1, examples, pad)
    assert len(computed) == 1
    # Another rank, other examples: other factors, computed.
    other_rank = build_config({"model.lora.variant": "sb", "model.lora.peft-lora-r": 4})
    prepare_adapter(build(), other_rank.lora, config.train.seed, examples, pad)
    prepare_adapter(build(), config.lora, config.train.seed, examples[:2], pad)
    assert len(computed) == 3
    # A damaged file is computed again (and replaced), with the same bits.
    files[0].write_bytes(b"not a safetensors file")
    damaged = adapter_state(prepared(setup))
    assert len(computed) == 4 and all(torch.equal(first[k], damaged[k]) for k in first)
    assert files[0].stat().st_size > 100
    # A cache that cannot be written (its folder is a file) is passed by.
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a folder")
    monkeypatch.setenv("FEDTUNE_CACHE", str(blocked / "cache"))
    passed_by = adapter_state(prepared(setup))
    assert len(computed) == 5 and all(torch.equal(first[k], passed_by[k]) for k in first)


def test_averaging_r_is_exactly_averaging_the_updates(setup):
    model = prepared(setup)
    state = {k: v.double() for k, v in adapter_state(model).items()}  # exact arithmetic
    travelling = travelling_keys("sb", state)
    rng = np.random.default_rng(0)
    clients = [
        {**state, **{k: torch.tensor(rng.standard_normal((8, 8))) for k in travelling}}
        for _ in range(3)
    ]
    averaged = {**state, **{k: sum(c[k] for c in clients) / 3 for k in travelling}}
    merged = to_peft(averaged, "sb")
    for key in (k for k in merged if k.endswith(".lora_B.weight")):
        a = merged[key.replace(".lora_B.weight", ".lora_A.weight")]
        products = [to_peft(c, "sb")[key] @ a for c in clients]  # B·R_i·A
        mean_update = sum(products) / 3
        assert torch.allclose(merged[key] @ a, mean_update, rtol=0, atol=1e-12)


def test_the_merged_adapter_is_plain_peft_lora_and_computes_the_same(setup, tmp_path):
    from peft import PeftModel

    from fedtune.rundir import RunDirectory

    _, _, _, build_tiny_llama = setup
    model = prepared(setup)
    state = adapter_state(model)
    trained = {k: (torch.randn(8, 8) * 0.1 if k.endswith(".core") else v) for k, v in state.items()}
    load_adapter_state(model, trained)
    peft_config = copy.deepcopy(model.peft_config[model.active_adapter])
    RunDirectory(tmp_path).write_adapter(tmp_path / "adapter", to_peft(trained, "sb"), peft_config)
    loaded = PeftModel.from_pretrained(build_tiny_llama(), str(tmp_path / "adapter"))
    ids = torch.tensor([[5, 17, 230, 4000, 12, 99]])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-5)

"""Adapters: build, extract, refuse mismatches, and save in PEFT format."""

from __future__ import annotations

import pytest
import torch

from fedtune.config import build_config
from fedtune.model.adapters import (
    AdapterMismatch,
    adapter_state,
    attach_adapter,
    check_state,
    load_adapter_state,
    peft_config,
    state_spec,
)


def lora(**overrides):
    return build_config(overrides).lora


def test_lora_on_q_v_has_the_expected_tensors(tiny_llama):
    model = attach_adapter(tiny_llama(vocab_size=64), lora(), seed=0)
    state = adapter_state(model)
    # 2 layers × (q, v) × (A, B); q: 64→64, v: 64→32 (2 of 4 heads are kv heads of width 16).
    assert len(state) == 8
    assert state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 64)
    assert state["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (32, 8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_dora_and_all_linear(tiny_llama):
    dora = adapter_state(
        attach_adapter(tiny_llama(vocab_size=64), lora(**{"model.lora.use-dora": True}), 0)
    )
    assert sum("lora_magnitude_vector" in k for k in dora) == 4
    every = adapter_state(
        attach_adapter(
            tiny_llama(vocab_size=64), lora(**{"model.lora.target-modules": "all-linear"}), 0
        )
    )
    # 7 projections per layer, LM head excluded.
    assert len(every) == 2 * 7 * 2 and not any("lm_head" in k for k in every)


def test_initialisation_is_seeded(tiny_llama):
    a = adapter_state(attach_adapter(tiny_llama(vocab_size=64), lora(), seed=3))
    b = adapter_state(attach_adapter(tiny_llama(vocab_size=64), lora(), seed=3))
    c = adapter_state(attach_adapter(tiny_llama(vocab_size=64), lora(), seed=4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_unknown_target_module_is_a_clear_error(tiny_llama):
    with pytest.raises(AdapterMismatch, match="model.lora.target-modules"):
        attach_adapter(tiny_llama(vocab_size=64), lora(**{"model.lora.target-modules": "qkv"}), 0)


def test_load_round_trips_and_refuses_mismatches(tiny_llama):
    model = attach_adapter(tiny_llama(vocab_size=64), lora(), seed=0)
    state = adapter_state(model)
    shifted = {k: v + 1.0 for k, v in state.items()}
    load_adapter_state(model, shifted)
    assert all(torch.equal(adapter_state(model)[k], shifted[k]) for k in state)
    key = next(iter(state))
    with pytest.raises(AdapterMismatch, match="1 missing"):
        load_adapter_state(model, {k: v for k, v in state.items() if k != key})
    with pytest.raises(AdapterMismatch, match="1 unexpected"):
        load_adapter_state(model, {**state, "base_model.model.extra.lora_A.weight": state[key]})
    with pytest.raises(AdapterMismatch, match=r"shape \(3, 3\), expected \(8, 64\)"):
        load_adapter_state(model, {**state, key: torch.zeros(3, 3)})
    with pytest.raises(AdapterMismatch, match="dtype float16, expected float32"):
        load_adapter_state(model, {**state, key: state[key].half()})
    # Nothing of the refused payloads was applied.
    assert all(torch.equal(adapter_state(model)[k], shifted[k]) for k in state)


def test_rank_mismatch_between_peers(tiny_llama):
    mine = state_spec(adapter_state(attach_adapter(tiny_llama(vocab_size=64), lora(), 0)))
    theirs = state_spec(
        adapter_state(
            attach_adapter(tiny_llama(vocab_size=64), lora(**{"model.lora.peft-lora-r": 4}), 0)
        )
    )
    with pytest.raises(AdapterMismatch, match="shape"):
        check_state(mine, theirs)


def test_saved_adapter_loads_with_peft(tmp_path, tiny_llama):
    from peft import PeftModel

    from fedtune.rundir import RunDirectory

    model = attach_adapter(tiny_llama(vocab_size=64), lora(), seed=0)
    trained = {k: torch.randn_like(v) for k, v in adapter_state(model).items()}
    load_adapter_state(model, trained)
    digest = RunDirectory(tmp_path).write_adapter(
        tmp_path / "adapter", trained, peft_config(lora())
    )
    assert len(digest) == 64
    loaded = PeftModel.from_pretrained(tiny_llama(vocab_size=64), str(tmp_path / "adapter"))
    model.eval()  # LoRA dropout off, as in the loaded (inference) copy
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)

"""Shared fixtures: an offline, quiet environment; tiny random models built in code; the real tokenizer."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_TMP = Path(tempfile.mkdtemp(prefix="fedtune-tests-"))

# Nothing in the test suite may reach a hub or phone home, and Flower must not install dependencies.
OFFLINE_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "UV_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "FLWR_HOME": str(_TMP / "flwr-home"),
    "RAY_TMPDIR": str(_TMP / "ray"),
    "HF_DATASETS_CACHE": str(_TMP / "hf-datasets"),
}


def pytest_configure(config: pytest.Config) -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    (_TMP / "ray").mkdir(parents=True, exist_ok=True)


@pytest.fixture(scope="session")
def embedded_source():
    """The embedded SmolLM2 model source (converted to safetensors once, cached in FEDTUNE_CACHE)."""
    from fedtune.model.loading import ensure_embedded_cache, resolve_model

    source = resolve_model("embedded:smollm2-135m-instruct")
    ensure_embedded_cache(source)
    return source


@pytest.fixture(scope="session")
def smollm2_tokenizer(embedded_source):
    """SmolLM2's real BPE tokenizer (49,152 tokens)."""
    from fedtune.model.loading import load_tokenizer

    return load_tokenizer(embedded_source)


def build_tiny_llama(vocab_size: int = 49152, seed: int = 0, **overrides):
    """A randomly initialised 2-layer Llama with SmolLM2's layout at toy width."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    model.eval()
    return model


@pytest.fixture
def tiny_llama():
    """Factory fixture: tiny_llama(**overrides) → a fresh random tiny Llama."""
    return build_tiny_llama


@pytest.fixture
def tiny_model_dir(tmp_path, smollm2_tokenizer):
    """A local Hugging Face directory holding a tiny random Llama and SmolLM2's tokenizer."""
    model = build_tiny_llama()
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path

"""Model sources: hub ids (through a local hub cache), local directories, the embedded GGUF."""

from __future__ import annotations

import pytest
import torch

from fedtune.model.loading import (
    ModelError,
    check_quantization,
    load_model,
    resolve_dtype,
    resolve_model,
)


def hub_cache_with(tmp_path, repo_id, directory):
    """Lay out `directory` as the hub cache would hold a downloaded snapshot of repo_id."""
    cache = tmp_path / "hub"
    commit = "0" * 40
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for item in directory.iterdir():
        (snapshot / item.name).write_bytes(item.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache


HUB_PROBE = """
import sys
from fedtune.model.loading import ModelError, load_model, load_tokenizer, resolve_model
source = resolve_model(sys.argv[1])
try:
    model = load_model(source, device="cpu")
except ModelError as exc:
    print("ModelError:", exc)
    sys.exit(3)
assert source.kind == "hub"
assert not any(p.requires_grad for p in model.parameters())
print(model.config.hidden_size, load_tokenizer(source).eos_token)
"""


def load_from_hub_cache(cache, repo_id):
    """huggingface_hub reads its cache location at import: probe in a fresh process."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-c", HUB_PROBE, repo_id], capture_output=True, text=True, env=env
    )


def test_hub_id_loads_through_the_hub_client_offline(tmp_path, tiny_model_dir):
    cache = hub_cache_with(tmp_path, "fedtune-test/tiny-llama", tiny_model_dir)
    done = load_from_hub_cache(cache, "fedtune-test/tiny-llama")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["64", "<|im_end|>"]


def test_hub_id_missing_offline_is_a_clear_error(tmp_path):
    done = load_from_hub_cache(tmp_path / "empty", "nobody/nothing")
    assert done.returncode == 3 and "cannot load 'nobody/nothing'" in done.stdout


def test_local_directory(tiny_model_dir, tmp_path):
    source = resolve_model(str(tiny_model_dir))
    assert source.kind == "local"
    assert load_model(source, device="cpu").config.num_hidden_layers == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "absent"))


def test_embedded_model_is_cached_safetensors(embedded_source):
    from pathlib import Path

    cache = Path(embedded_source.path)
    assert (cache / "model.safetensors").is_file() and (cache / "fedtune-conversion.json").is_file()
    model = load_model(embedded_source, device="cpu")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M, tied head
    assert model.dtype == torch.float32


def test_quantization_and_dtype_rules():
    check_quantization(0)
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="needs a CUDA GPU"):
            check_quantization(8)
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16

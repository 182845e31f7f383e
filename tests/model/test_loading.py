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


@pytest.mark.integration  # loads through the hub client in a fresh Python process
def test_hub_id_loads_through_the_hub_client_offline(tmp_path, tiny_model_dir):
    cache = hub_cache_with(tmp_path, "fedtune-test/tiny-llama", tiny_model_dir)
    done = load_from_hub_cache(cache, "fedtune-test/tiny-llama")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["64", "<|im_end|>"]


@pytest.mark.integration  # a fresh Python process
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


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A small stand-in for the wheel's GGUF file, and a fresh FEDTUNE_CACHE."""
    import fedtune.model.loading as loading

    gguf = tmp_path / "wheel" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 16)
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "_embedded_gguf", lambda key: gguf)
    return gguf


def test_embedded_cache_is_keyed_by_content_not_mtime(fake_gguf, monkeypatch):
    import hashlib
    import json
    import os

    import fedtune.model.loading as loading

    first = resolve_model("embedded:smollm2-135m-instruct")
    digest = hashlib.sha256(fake_gguf.read_bytes()).hexdigest()
    assert first.path.endswith(f"smollm2-135m-instruct-{digest[:16]}")
    index = json.loads((loading.cache_root() / loading.DIGEST_INDEX).read_text())
    assert index[str(fake_gguf.resolve())]["sha256"] == digest

    # A later start with the file unchanged reads the digest from the index, not the file.
    real_file_digest = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda *a: pytest.fail("rehashed"))
    assert resolve_model("embedded:smollm2-135m-instruct") == first

    # A reinstall: same content, another modification time → hashed again, same directory.
    monkeypatch.setattr(hashlib, "file_digest", real_file_digest)
    stat = fake_gguf.stat()
    os.utime(fake_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns - 86_400 * 10**9))
    assert resolve_model("embedded:smollm2-135m-instruct").path == first.path
    index = json.loads((loading.cache_root() / loading.DIGEST_INDEX).read_text())
    assert index[str(fake_gguf.resolve())]["mtime_ns"] == fake_gguf.stat().st_mtime_ns

    # Other content of the same size → another directory.
    fake_gguf.write_bytes(b"GGUF" + bytes(reversed(range(256))) * 16)
    other = resolve_model("embedded:smollm2-135m-instruct")
    assert other.path != first.path
    assert other.path.endswith(hashlib.sha256(fake_gguf.read_bytes()).hexdigest()[:16])


def test_digest_without_a_writable_cache(fake_gguf, tmp_path, monkeypatch):
    import hashlib

    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("FEDTUNE_CACHE", str(blocker / "cache"))
    source = resolve_model("embedded:smollm2-135m-instruct")
    assert source.path.endswith(hashlib.sha256(fake_gguf.read_bytes()).hexdigest()[:16])


def test_an_unreachable_hub_fails_in_seconds_with_the_local_copy_fix(
    tmp_path, tiny_model_dir, monkeypatch
):
    import socket
    import time

    from huggingface_hub import constants

    from fedtune.model.loading import check_hub_model

    with socket.socket() as sock:  # a port nobody listens on: connection refused at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    source = resolve_model("nobody/nothing")
    started = time.monotonic()
    with pytest.raises(ModelError, match="cannot be reached .*set model.name to a local copy"):
        check_hub_model(source)
    assert time.monotonic() - started < 10
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no connection is even tried
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set and the hub cache .* no copy"):
        check_hub_model(source)
    # A cached copy needs no hub; local and embedded sources are never checked.
    cache = hub_cache_with(tmp_path, "fedtune-test/tiny-llama", tiny_model_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    check_hub_model(resolve_model("fedtune-test/tiny-llama"))
    check_hub_model(resolve_model(str(tiny_model_dir)))


@pytest.mark.integration  # a fresh `fedtune run` process
def test_fedtune_run_with_an_unloadable_hub_model_fails_at_once_without_a_resume_hint(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    done = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "run", "--set", "model.name=mistralai/Mistral-7B-v0.3",
         "--set", f"run.output-dir={tmp_path / 'runs'}"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "HF_HUB_OFFLINE is set" in done.stderr and "local copy" in done.stderr
    assert "--resume" not in done.stderr and not (tmp_path / "runs").exists()

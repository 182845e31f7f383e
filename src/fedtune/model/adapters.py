"""PEFT LoRA/DoRA adapters: build, extract, and load with explicit checks.

Only adapter tensors travel between server and clients. A receiver checks the keys, shapes and
dtypes of what it got against its own adapter before loading anything, and refuses a mismatch:
PEFT's own loader is non-strict and would silently leave missing tensors at their initial values.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedtune.config import LoraConfig, target_modules

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel


class AdapterMismatch(ValueError):
    """Adapter tensors do not fit the model they are meant for."""


def peft_config(lora: LoraConfig, base_model_name: str = "") -> Any:
    """The peft.LoraConfig for fedtune's LoRA settings."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules(lora),
        use_dora=lora.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name or None,
    )


def attach_adapter(model: PreTrainedModel, lora: LoraConfig, seed: int) -> PeftModel:
    """Wrap the frozen base model with a freshly initialised adapter (deterministic in `seed`).

    Raises:
        AdapterMismatch: target modules that do not exist in this model.
    """
    import torch
    from peft import get_peft_model

    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():
            # transformers 5 deprecates an attribute PEFT still reads; nothing for users to act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            peft_model = get_peft_model(model, peft_config(lora))
    except ValueError as exc:
        raise AdapterMismatch(f"model.lora.target-modules: {exc}") from exc
    return peft_model


def use_rank(model: PeftModel, lora: LoraConfig, rank: int, seed: int) -> None:
    """Make the adapter of rank `rank` the one that trains: the model's own (named `default`)
    at `lora.r`, else a second adapter of that rank added to the same base model (seeded) the
    first time it is asked for. FlexLoRA's clients of different ranks share one base model."""
    import torch

    name = "default" if rank == lora.r else f"rank-{rank}"
    if name not in model.peft_config:
        torch.manual_seed(seed)
        model.add_adapter(name, peft_config(lora.model_copy(update={"r": rank})))
    if model.active_adapter != name:
        model.set_adapter(name)


def travelling_keys(variant: str, keys: Any) -> list[str]:
    """The adapter tensors that train, travel and are aggregated, in the adapter's order (the
    registered variant's: all of them for `lora`; all but the A factors for `ffa`)."""
    from fedtune.model.variants import get_variant

    return get_variant(variant).travelling(keys)


def frozen_digest(state: Mapping[str, Any], travelling: list[str]) -> str:
    """sha256 over the adapter tensors that do not travel (names, shapes, bytes): nodes and the
    server must hold the same ones, which they check instead of sending them."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for key in sorted(set(state) - set(travelling)):
        value = state[key]
        array = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
        digest.update(f"{key}:{tuple(array.shape)}:{array.dtype}\n".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def prepare_adapter(
    model: PreTrainedModel, lora: LoraConfig, seed: int, init_examples: Any = None, pad_id: int = 0
) -> PeftModel:
    """The adapter a variant trains: attach (seeded), let the variant set it up (`sb`: A and B
    from the first gradient on `init_examples`), then freeze what the variant keeps fixed."""
    from fedtune.model.variants import get_variant

    variant = get_variant(lora.variant)
    peft_model = attach_adapter(model, lora, seed)
    variant.initialise(peft_model, list(init_examples or []), pad_id)
    variant.freeze(peft_model)
    return peft_model


def to_peft(state: Mapping[str, Any], variant: str) -> dict[str, Any]:
    """The adapter as PEFT saves and loads it (the r×r adapter merged to plain LoRA)."""
    from fedtune.model.variants import get_variant

    return get_variant(variant).to_peft(state)


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """A copy of the adapter tensors (PEFT's saved-checkpoint key names), on CPU, contiguous."""
    from peft import get_peft_model_state_dict

    return {
        key: value.detach().to("cpu", copy=True).contiguous()
        for key, value in get_peft_model_state_dict(
            model, adapter_name=model.active_adapter
        ).items()
    }


TensorSpec = tuple[tuple[int, ...], str]


def state_spec(state: Mapping[str, Any]) -> dict[str, TensorSpec]:
    """key → (shape, dtype name) for tensors or numpy arrays."""
    spec: dict[str, TensorSpec] = {}
    for key, value in state.items():
        dtype = str(value.dtype).replace("torch.", "")
        spec[key] = (tuple(int(d) for d in value.shape), dtype)
    return spec


def check_state(expected: Mapping[str, TensorSpec], received: Mapping[str, TensorSpec]) -> None:
    """Refuse a received adapter whose keys, shapes or dtypes differ from the expected ones.

    Raises:
        AdapterMismatch: listing what is missing, unexpected, or of another shape/dtype.
    """
    missing = sorted(set(expected) - set(received))
    unexpected = sorted(set(received) - set(expected))
    problems: list[str] = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    for key in sorted(set(expected) & set(received)):
        (want_shape, want_dtype), (got_shape, got_dtype) = expected[key], received[key]
        if want_shape != got_shape:
            problems.append(f"{key}: shape {got_shape}, expected {want_shape}")
        elif want_dtype != got_dtype:
            problems.append(f"{key}: dtype {got_dtype}, expected {want_dtype}")
        if len(problems) >= 4:
            break
    if problems:
        raise AdapterMismatch("adapter does not fit this model: " + "; ".join(problems))


def load_adapter_state(
    model: PeftModel, state: Mapping[str, torch.Tensor], keys: list[str] | None = None
) -> None:
    """Check, then copy received adapter tensors into the model in place.

    Args:
        keys: the tensors expected (a variant's travelling ones); default: the whole adapter.
    Raises:
        AdapterMismatch: see check_state.
    """
    import torch

    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    targets = _state_key_to_parameter(model, state.keys(), own, keys)
    check_state(state_spec({k: own[targets[k]] for k in targets}), state_spec(state))
    with torch.no_grad():
        for key, value in state.items():
            own[targets[key]].copy_(value)


def parameter_names(model: PeftModel, keys: list[str]) -> dict[str, str]:
    """Saved-checkpoint adapter keys (a subset) → the model's parameter names."""
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return _state_key_to_parameter(model, keys, own, keys)


def _state_key_to_parameter(
    model: PeftModel, keys: Any, own: Mapping[str, Any], wanted: list[str] | None = None
) -> dict[str, str]:
    """Map saved-checkpoint keys (no adapter name) to the model's parameter names."""
    adapter = model.active_adapter
    expected: Any = adapter_state(model)
    if wanted is not None:
        expected = [k for k in expected if k in set(wanted)]
    mapping: dict[str, str] = {}
    for key in expected:
        candidates = [
            key.replace(".lora_A.weight", f".lora_A.{adapter}.weight")
            .replace(".lora_B.weight", f".lora_B.{adapter}.weight")
            .replace(".lora_magnitude_vector", f".lora_magnitude_vector.{adapter}.weight")
            .replace(".lora_B.core", f".lora_B.{adapter}.core")
            .replace(".lora_B.basis", f".lora_B.{adapter}.basis"),
        ]
        for candidate in candidates:
            if candidate in own:
                mapping[key] = candidate
                break
        else:  # pragma: no cover - a PEFT layout this code does not know
            raise AdapterMismatch(f"cannot locate the parameter for adapter key {key}")
    missing = sorted(set(keys) - set(mapping))
    if missing:
        raise AdapterMismatch(
            f"adapter does not fit this model: {len(missing)} unexpected (e.g. {missing[0]})"
        )
    extra = sorted(set(mapping) - set(keys))
    if extra:
        raise AdapterMismatch(
            f"adapter does not fit this model: {len(extra)} missing (e.g. {extra[0]})"
        )
    return mapping


def count_parameters(state: Mapping[str, Any]) -> int:
    return int(
        sum(
            int(value.numel()) if hasattr(value, "numel") else value.size
            for value in state.values()
        )
    )

"""The r×r adapter (`model.lora.variant=sb`, after LoRA-SB and Fed-SB): ΔW = (α/r)·B·R·A.

A (r×in) and B (out×r) are set once, from a first gradient, and frozen; only the small r×r matrix R
trains, travels and is aggregated, so averaging the clients' R is exactly averaging their updates
(B·mean(R)·A = mean(B·R·A)), which LoRA's separate averaging of A and B is not.

Initialisation: the gradient G of the loss with respect to each target module's base weight, on
`model.lora.sb-init-examples` public examples (a seeded draw from the embedded Alpaca-GPT4 sample,
its held-out rows excluded), then G's truncated SVD: B = the top r left singular vectors, A = the top r
right ones (orthonormal), R = 0, so the adapted model starts as the base model and R's gradient starts
as G's top singular values. Every node and the server compute the same factors from the same public
examples on one thread (bit for bit on the same software stack) and check a digest instead of sending
them; a node whose factors differ refuses to train rather than train in another basis.

In the model, B·R is a small module in place of PEFT's lora_B (`SBUp`: a buffer `basis` = B and a
parameter `core` = R); the adapter's tensors are `lora_A.weight` (A), `lora_B.basis` (B) and
`lora_B.core` (R). Saved adapters are merged to plain PEFT LoRA — lora_A = A, lora_B = B·R, same
r and α — which `fedtune eval`, `leaderboard submit` and PEFT load as any LoRA adapter.

The first gradient on one thread is the r×r adapter's one cost that LoRA does not pay (~22 s on the
embedded model on a 2-core CPU, per process: the server and every worker or node). Its result is
kept in FEDTUNE_CACHE/sb-factors/, under a digest of everything that decides its bits — the base
model's weights, the examples' tokens, each module's rank, the torch build and the machine — so
a later process on the same machine and software reads A and B instead (bit for bit what it would
compute). A cache that cannot be read or written is passed by: the factors are computed as before.
On a GPU the gradient is quick and the cache is not used.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from fedtune.config import ConfigError, Int, RunConfig, Section, setting
from fedtune.model.variants.base import AdapterVariant, freeze_a_factors, register_variant

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

CORE = ".lora_B.core"
BASIS = ".lora_B.basis"
CACHE_DIR = "sb-factors"
CACHE_FORMAT = "fedtune r×r factors 1"


def _module_class() -> Any:
    import torch
    import torch.nn.functional as F
    from torch import nn

    class SBUp(nn.Module):
        """B·R in place of lora_B: `basis` B (out×r, frozen buffer), `core` R (r×r, trained)."""

        def __init__(self, basis: torch.Tensor) -> None:
            super().__init__()
            rank = basis.shape[1]
            self.register_buffer("basis", basis.contiguous())
            self.core = nn.Parameter(torch.zeros(rank, rank, dtype=basis.dtype))

        @property
        def weight(self) -> torch.Tensor:  # PEFT reads lora_B.weight (dtype, merging)
            basis: Any = self.basis
            return basis @ self.core

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            basis: Any = self.basis
            return F.linear(F.linear(hidden, self.core), basis)

    return SBUp


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block: LAPACK's SVD, like the matmuls, gives other bits
    on another thread count (measured on SmolLM2's gradients at r = 32), and the server and the
    nodes may run with different counts."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def init_gradients(model: Any, examples: list[Any], pad_id: int) -> dict[str, torch.Tensor]:
    """module name → gradient of the response-token loss w.r.t. its base weight, computed
    on one thread in eval mode (the same bits on every node of the same software stack)."""
    import torch
    from peft.tuners.lora.layer import LoraLayer

    from fedtune.training.local import collate, micro_batches, summed_token_loss

    layers: dict[str, Any] = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    weights: dict[str, Any] = {n: m.get_base_layer().weight for n, m in layers.items()}
    saved = {n: w.requires_grad for n, w in weights.items()}
    was_training = model.training
    model.eval()
    try:
        for weight in weights.values():
            weight.requires_grad_(True)
            weight.grad = None
        # The loss summed over response tokens: its scale does not change the singular vectors.
        with one_thread():
            for group in micro_batches(examples, 4096):
                loss_sum, _ = summed_token_loss(model, *collate(group, pad_id, "cpu"))
                loss_sum.backward()
        gradients = {}
        for name, weight in weights.items():
            if weight.grad is None:
                raise ValueError(f"no gradient reached {name}: cannot initialise the r×r adapter")
            gradients[name] = weight.grad.detach().to(torch.float64).clone()
    finally:
        for name, weight in weights.items():
            weight.grad = None
            weight.requires_grad_(saved[name])
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return gradients


def _lora_layers(model: Any) -> dict[str, Any]:
    from peft.tuners.lora.layer import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def factors(gradients: Mapping[str, torch.Tensor], ranks: Mapping[str, int], dtype: Any) -> dict:
    """module name → (A, B): the top `rank` right and left singular vectors of its gradient."""
    import torch

    out = {}
    for name, rank in ranks.items():
        with one_thread():
            u, _, vh = torch.linalg.svd(gradients[name], full_matrices=False)
        if u.shape[1] < rank:
            raise ValueError(f"{name}: rank {rank} is above the layer's size {u.shape[1]}")
        out[name] = (vh[:rank, :].to(dtype).contiguous(), u[:, :rank].to(dtype).contiguous())
    return out


def install(model: Any, found: Mapping[str, tuple[Any, Any]]) -> None:
    """Set each module's A and B (frozen) from `found` (`factors`), R = 0."""
    import torch

    sb_up = _module_class()
    adapter = model.active_adapter
    for name, module in _lora_layers(model).items():
        lora_a: Any = module.lora_A[adapter]
        a_factor, b_factor = found[name]
        with torch.no_grad():
            lora_a.weight.copy_(a_factor)
        lora_a.weight.requires_grad_(False)
        module.lora_B[adapter] = sb_up(b_factor.contiguous())


def factors_digest(model: Any, examples: list[Any], ranks: Mapping[str, int]) -> str:
    """The cache key: a digest of everything the factors' bits depend on — the base weights (not
    the adapter's, which the first gradient does not see: LoRA's B starts at 0), the examples'
    tokens and masks, each module's rank and dtype, the torch build and the machine."""
    import hashlib
    import platform

    import torch

    digest = hashlib.sha256(f"{CACHE_FORMAT}\n{platform.machine()}\n".encode())
    digest.update(torch.__config__.show().encode())
    digest.update(f"torch {torch.__version__}\n".encode())
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().data)
    for example in examples:
        digest.update(repr((example.input_ids, example.label_mask)).encode())
    digest.update(repr(sorted(ranks.items())).encode())
    return digest.hexdigest()


def _cache_file(key: str) -> Any:
    from fedtune.model.loading import cache_root

    return cache_root() / CACHE_DIR / f"{key}.safetensors"


def _read_cache(key: str, ranks: Mapping[str, int]) -> dict | None:
    """The cached factors of `key`, or None (none, or not readable as what was stored)."""
    from safetensors.torch import load_file

    path = _cache_file(key)
    try:
        stored = load_file(str(path))
        return {name: (stored[f"{name}.A"], stored[f"{name}.B"]) for name in ranks}
    except Exception:  # noqa: BLE001 — missing, partial or foreign: computed again
        return None


def _write_cache(key: str, found: Mapping[str, tuple[Any, Any]]) -> None:
    import os
    import tempfile

    from safetensors.torch import save_file

    path = _cache_file(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=path.parent, suffix=".part")
        os.close(handle)
        tensors = {f"{n}.{k}": t for n, (a, b) in found.items() for k, t in (("A", a), ("B", b))}
        save_file(tensors, temp)
        os.replace(temp, path)  # whole or not at all, also beside another process writing it
    except OSError:
        return  # a read-only or full cache: the factors were computed, nothing is lost


def initialise_factors(model: Any, examples: list[Any], pad_id: int) -> bool:
    """Set A and B of every module, from the cache when it holds them; True when it did."""
    adapter = model.active_adapter
    layers = _lora_layers(model)
    ranks = {name: int(m.lora_A[adapter].weight.shape[0]) for name, m in layers.items()}
    dtype = next(iter(layers.values())).lora_A[adapter].weight.dtype
    # On a GPU the first gradient takes a second or two, less than hashing the weights would.
    cached = next(model.parameters()).device.type == "cpu"
    key = factors_digest(model, examples, ranks) if cached else ""
    found = _read_cache(key, ranks) if cached else None
    if found is not None:
        install(model, found)
        return True
    found = factors(init_gradients(model, examples, pad_id), ranks, dtype)
    install(model, found)
    if cached:
        _write_cache(key, found)
    return False


def peft_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """An r×r adapter's tensors merged to PEFT LoRA: lora_B.weight = basis @ core."""
    merged: dict[str, Any] = {}
    for key, value in state.items():
        if key.endswith(CORE):
            continue
        if key.endswith(BASIS):
            stem = key[: -len(BASIS)]
            merged[f"{stem}.lora_B.weight"] = (value @ state[stem + CORE]).contiguous()
        else:
            merged[key] = value
    return merged


class SbSettings(Section):
    init_examples: Int = setting(
        "model.lora.sb-init-examples",
        16,
        "Public examples (embedded Alpaca-GPT4 sample, held-out rows excluded) whose gradient "
        "sets the sb variant's frozen A and B.",
        ge=1,
    )


class SbVariant(AdapterVariant):
    name = "sb"
    label = "Fed-SB r×r"
    section = SbSettings

    def travelling(self, keys: Iterable[str]) -> list[str]:
        return [k for k in keys if k.endswith(CORE)]

    def init_examples(self, config: RunConfig) -> int:
        return config.params(SbSettings).init_examples

    def initialise(self, model: PeftModel, examples: list[Any], pad_id: int) -> None:
        if not examples:
            raise ValueError("the sb variant needs examples for its first gradient")
        initialise_factors(model, examples, pad_id)

    def freeze(self, model: PeftModel) -> None:
        freeze_a_factors(model)

    def to_peft(self, state: Mapping[str, Any]) -> dict[str, Any]:
        return peft_state(state)

    def check(self, config: RunConfig) -> None:
        if config.lora.use_dora:
            raise ConfigError("model.lora.variant: sb does not combine with model.lora.use-dora")


register_variant(SbVariant())

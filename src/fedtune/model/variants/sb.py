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


def install(model: Any, gradients: Mapping[str, torch.Tensor]) -> None:
    """Set A and B from each gradient's truncated SVD, R = 0; freeze A."""
    import torch
    from peft.tuners.lora.layer import LoraLayer

    sb_up = _module_class()
    module: Any
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapter = model.active_adapter
        lora_a: Any = module.lora_A[adapter]
        rank = lora_a.weight.shape[0]
        with one_thread():
            u, _, vh = torch.linalg.svd(gradients[name], full_matrices=False)
        if u.shape[1] < rank:
            raise ValueError(f"{name}: rank {rank} is above the layer's size {u.shape[1]}")
        dtype = lora_a.weight.dtype
        with torch.no_grad():
            lora_a.weight.copy_(vh[:rank, :].to(dtype))
        lora_a.weight.requires_grad_(False)
        module.lora_B[adapter] = sb_up(u[:, :rank].to(dtype).contiguous())


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
        install(model, init_gradients(model, examples, pad_id))

    def freeze(self, model: PeftModel) -> None:
        freeze_a_factors(model)

    def to_peft(self, state: Mapping[str, Any]) -> dict[str, Any]:
        return peft_state(state)

    def check(self, config: RunConfig) -> None:
        if config.lora.use_dora:
            raise ConfigError("model.lora.variant: sb does not combine with model.lora.use-dora")


register_variant(SbVariant())

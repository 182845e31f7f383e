"""The local SFT loop of one client for one round, in plain PyTorch.

Same work as the FlowerTune template's SFTTrainer step (AdamW, constant rate within the round,
gradient clipping at 1.0, loss = mean over the step's response tokens), done with less waste:
- each optimizer step's examples are sorted by length and cut into micro-batches under a token
  budget, so almost no padding is computed;
- the LM head runs only on positions whose next token is a label (SmolLM2: 576 × 49,152 MACs per
  position, ~21% of the forward pass, skipped for every prompt and padding position).
Splitting a step into micro-batches does not change its gradient: token losses are summed and
divided once by the step's total number of response tokens.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedtune.data.prompts import TokenizedExample

if TYPE_CHECKING:
    import torch


def cosine_annealing(server_round: int, num_rounds: int, lr_max: float, lr_min: float) -> float:
    """The challenge's per-round learning rate: lr_min + ½(lr_max − lr_min)(1 + cos(π·round/N)).

    Round 0 gives lr_max and round N gives lr_min (round 1 of 200 is 0.99994·lr_max).
    """
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * server_round / num_rounds))


def draw_examples(num_examples: int, count: int, seed: int) -> list[int]:
    """Indices of `count` examples: a seeded permutation, cycled (a new one per pass) if short."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < count:
        permutation = list(range(num_examples))
        rng.shuffle(permutation)
        order.extend(permutation)
    return order[:count]


def micro_batches(
    examples: Sequence[TokenizedExample], max_batch_tokens: int, max_padding: float = 0.05
) -> list[list[TokenizedExample]]:
    """Group examples by length: each group's padded size stays within the token budget and its
    padding below `max_padding` of it. On a compute-bound CPU a bigger batch buys nothing, so
    padding is pure waste; on a GPU the budget lets batches grow.
    """
    ordered = sorted(examples, key=lambda e: e.num_tokens)
    groups: list[list[TokenizedExample]] = []
    current: list[TokenizedExample] = []
    real = 0
    for example in ordered:
        # Sorted ascending: the newcomer is the longest, so it sets the padded width.
        padded = (len(current) + 1) * example.num_tokens
        wasted = 1 - (real + example.num_tokens) / padded
        if current and (padded > max_batch_tokens or wasted > max_padding):
            groups.append(current)
            current, real = [], 0
        current.append(example)
        real += example.num_tokens
    if current:
        groups.append(current)
    return groups


def collate(
    batch: Sequence[TokenizedExample], pad_id: int, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask, and the mask of positions that predict a label."""
    import torch

    width = max(e.num_tokens for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    labelled = torch.zeros((len(batch), width), dtype=torch.bool)
    for row, example in enumerate(batch):
        n = example.num_tokens
        ids[row, :n] = torch.tensor(example.input_ids)
        attention[row, :n] = 1
        labelled[row, :n] = torch.tensor(example.label_mask)
    return ids.to(device), attention.to(device), labelled.to(device)


def _split_model(model: Any) -> tuple[Any, Any] | None:
    """(decoder trunk, LM head) when logits can be computed from hidden states directly."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None  # the model post-processes its logits: use its own forward
    get_decoder = getattr(base, "get_decoder", None)
    head = base.get_output_embeddings()
    decoder = get_decoder() if get_decoder else None
    if decoder is None or head is None:
        return None
    return decoder, head


# Rows of logits computed at once when a loss is only scored (no gradients): 512 × 49,152 fp32
# logits are 0.1 GB.
EVAL_LOGIT_ROWS = 512


def summed_token_loss(
    model: Any, ids: torch.Tensor, attention: torch.Tensor, labelled: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Sum of cross-entropy over response tokens, and how many there were.

    Position t predicts token t+1, so the positions that matter are labelled[:, 1:].
    """
    import torch
    import torch.nn.functional as F

    targets = ids[:, 1:][labelled[:, 1:]]
    predicting = labelled[:, 1:]
    split = _split_model(model)
    if split is not None:
        decoder, head = split
        hidden = decoder(input_ids=ids, attention_mask=attention).last_hidden_state
        rows = hidden[:, :-1][predicting]
        if not torch.is_grad_enabled() and len(rows) > EVAL_LOGIT_ROWS:
            # Scoring only: the vocabulary-wide logits of a whole batch (4,096 tokens × 49,152
            # for SmolLM2, 0.8 GB in fp32, twice over inside cross_entropy) are what a server's
            # held-out scoring would peak on; a slice of rows at a time bounds them.
            total = sum(
                F.cross_entropy(
                    head(rows[start : start + EVAL_LOGIT_ROWS]).float(),
                    targets[start : start + EVAL_LOGIT_ROWS],
                    reduction="sum",
                )
                for start in range(0, len(rows), EVAL_LOGIT_ROWS)
            )
            return torch.as_tensor(total), int(targets.numel())
        logits = head(rows)
    else:
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1][predicting]
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    return loss, int(targets.numel())


def evaluate_loss(
    model: Any,
    examples: Sequence[TokenizedExample],
    pad_id: int,
    device: str = "cpu",
    max_batch_tokens: int = 4096,
) -> float:
    """Mean cross-entropy over the response tokens of `examples` (no gradients, eval mode)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for group in micro_batches(examples, max_batch_tokens):
            loss_sum, n = summed_token_loss(model, *collate(group, pad_id, device))
            total += float(loss_sum)
            count += n
    return total / max(count, 1)


@dataclass
class LocalResult:
    train_loss: float  # mean of the optimizer steps' losses (as HF Trainer's training_loss)
    steps: int
    examples: int
    tokens: int
    response_tokens: int
    padded_tokens: int
    seconds: float
    # With a gradient correction (SCAFFOLD): the mean of the raw minibatch gradients over the
    # steps, by parameter name.
    mean_gradients: dict[str, Any] | None = None


def add_proximal_gradient(params: Sequence[Any], anchors: Sequence[Any], mu: float) -> None:
    """grad += μ·(w − w₀) for each parameter: the gradient of FedProx's μ/2·‖w − w₀‖²."""
    import torch

    with torch.no_grad():
        for param, anchor in zip(params, anchors, strict=True):
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            param.grad.add_(param - anchor, alpha=mu)


def train_local(
    model: Any,
    examples: Sequence[TokenizedExample],
    *,
    steps: int,
    batch_size: int,
    grad_accumulation: int,
    learning_rate: float,
    seed: int,
    pad_id: int,
    max_grad_norm: float = 1.0,
    weight_decay: float = 0.0,
    max_batch_tokens: int = 4096,
    device: str = "cpu",
    on_step: Callable[[int, float], None] | None = None,
    proximal_mu: float = 0.0,
    gradient_correction: Mapping[str, Any] | None = None,
) -> LocalResult:
    """Run `steps` AdamW steps of `batch_size × grad_accumulation` examples each.

    Args:
        model: a PEFT model whose trainable parameters are the adapter.
        examples: the client's tokenized examples.
        seed: decides which examples each step sees, and dropout.
        max_batch_tokens: padded-token budget per micro-batch (memory knob, not a math knob).
        proximal_mu: FedProx's μ: every step's gradient gets μ·(w − w₀), the gradient of
            μ/2·‖w − w₀‖² with w₀ the trainable parameters as the round started (the global
            adapter received), before clipping. The reported loss stays the data loss.
        gradient_correction: parameter name → a tensor added to that parameter's gradient at
            every step, before the proximal term and clipping (SCAFFOLD's c − cᵢ); the result
            then carries the mean raw gradient of each named parameter.
    Returns:
        Loss and work counters of the round.
    """
    import torch

    if not examples:
        raise ValueError("no training examples")
    started = time.perf_counter()
    torch.manual_seed(seed)
    per_step = batch_size * grad_accumulation
    order = draw_examples(len(examples), steps * per_step, seed)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    correction: list[tuple[str, Any, Any]] = []
    if gradient_correction is not None:
        unknown = sorted(set(gradient_correction) - {n for n, _ in named})
        if unknown:
            raise ValueError(f"gradient correction for parameters that do not train: {unknown[:3]}")
        correction = [(n, p, gradient_correction[n]) for n, p in named if n in gradient_correction]
    gradient_sums = {n: torch.zeros_like(p) for n, p, _ in correction}
    # A fresh optimizer per round, as the template's per-round trainer has.
    optimizer = torch.optim.AdamW(
        params, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay
    )
    anchors = [p.detach().clone() for p in params] if proximal_mu else []
    model.train()
    step_losses: list[float] = []
    tokens = response_tokens = padded = 0
    for step in range(steps):
        chosen = [examples[i] for i in order[step * per_step : (step + 1) * per_step]]
        step_targets = sum(e.num_response_tokens - int(e.label_mask[0]) for e in chosen)
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for group in micro_batches(chosen, max_batch_tokens):
            ids, attention, labelled = collate(group, pad_id, device)
            loss_sum, _ = summed_token_loss(model, ids, attention, labelled)
            (loss_sum / step_targets).backward()
            step_loss += float(loss_sum.detach()) / step_targets
            padded += ids.numel()
        with torch.no_grad():
            for name, param, term in correction:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                gradient_sums[name] += param.grad
                param.grad += term.to(param.device, param.dtype)
        if proximal_mu:
            add_proximal_gradient(params, anchors, proximal_mu)
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        step_losses.append(step_loss)
        tokens += sum(e.num_tokens for e in chosen)
        response_tokens += step_targets
        if on_step is not None:
            on_step(step + 1, step_loss)
    model.eval()
    optimizer.zero_grad(set_to_none=True)
    return LocalResult(
        train_loss=sum(step_losses) / len(step_losses),
        steps=steps,
        examples=steps * per_step,
        tokens=tokens,
        response_tokens=response_tokens,
        padded_tokens=padded,
        seconds=time.perf_counter() - started,
        mean_gradients={n: g / steps for n, g in gradient_sums.items()} if correction else None,
    )

"""The local SFT loop: schedule, batching without padding waste, exact loss, real learning."""

from __future__ import annotations

import math

import pytest
import torch

from fedtune.config import build_config
from fedtune.data.prompts import TokenizedExample
from fedtune.model.adapters import adapter_state, attach_adapter
from fedtune.training.local import (
    collate,
    cosine_annealing,
    draw_examples,
    micro_batches,
    summed_token_loss,
    train_local,
)


def random_examples(n, seed=0, low=6, high=40, vocab=64):
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(low, high, (1,), generator=generator))
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        start = max(2, length // 3)
        examples.append(TokenizedExample(ids, [i >= start for i in range(length)]))
    return examples


def test_cosine_schedule_is_the_templates():
    assert cosine_annealing(0, 200, 5e-5, 1e-6) == pytest.approx(5e-5)
    assert cosine_annealing(200, 200, 5e-5, 1e-6) == pytest.approx(1e-6)
    assert cosine_annealing(100, 200, 5e-5, 1e-6) == pytest.approx((5e-5 + 1e-6) / 2)
    assert cosine_annealing(1, 200, 5e-5, 1e-6) == pytest.approx(
        1e-6 + 0.5 * 49e-6 * (1 + math.cos(math.pi / 200))
    )


def test_draw_examples_is_seeded_and_cycles():
    # Pinned: a change of the draw would change every run's bits (same seed, same bits).
    assert draw_examples(5, 12, seed=1) == [2, 3, 4, 0, 1, 0, 2, 1, 4, 3, 2, 3]
    assert draw_examples(5, 12, seed=1) != draw_examples(5, 12, seed=2)
    drawn = draw_examples(5, 12, seed=1)
    assert sorted(drawn[:5]) == list(range(5)) and sorted(drawn[5:10]) == list(range(5))


def test_micro_batches_keep_everything_and_waste_little():
    examples = random_examples(64)
    groups = micro_batches(examples, max_batch_tokens=256)
    assert sorted(id(e) for g in groups for e in g) == sorted(id(e) for e in examples)
    for group in groups:
        width = max(e.num_tokens for e in group)
        assert width * len(group) <= 256 or len(group) == 1
        real = sum(e.num_tokens for e in group)
        assert 1 - real / (width * len(group)) <= 0.05


def test_fast_loss_equals_the_models_own_loss(tiny_llama):
    model = tiny_llama(vocab_size=64)
    batch = random_examples(3, seed=1)
    ids, attention, labelled = collate(batch, pad_id=0, device="cpu")
    loss_sum, count = summed_token_loss(model, ids, attention, labelled)
    labels = ids.masked_fill(~labelled, -100)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=attention, labels=labels).loss
    assert count == int(labelled[:, 1:].sum())
    assert float(loss_sum / count) == pytest.approx(float(reference), rel=1e-5)


def test_scoring_in_row_slices_gives_the_same_loss(tiny_llama, monkeypatch):
    """Without gradients the logits are computed a slice of rows at a time (bounded memory):
    the same sum, the same count, as the whole batch at once."""
    import fedtune.training.local as local

    model = tiny_llama(vocab_size=64)
    ids, attention, labelled = collate(random_examples(6, seed=4), pad_id=0, device="cpu")
    whole, count = summed_token_loss(model, ids, attention, labelled)  # gradients on: one slice
    assert whole.requires_grad
    monkeypatch.setattr(local, "EVAL_LOGIT_ROWS", 5)
    assert count > 3 * local.EVAL_LOGIT_ROWS
    with torch.no_grad():
        sliced, sliced_count = summed_token_loss(model, ids, attention, labelled)
    assert sliced_count == count
    assert float(sliced) == pytest.approx(float(whole), rel=1e-6)


def test_micro_batching_does_not_change_the_gradient(tiny_llama):
    lora = build_config().lora
    examples = random_examples(8, seed=2)
    grads = []
    for budget in (10_000, 40):  # one padded batch vs many small ones
        model = attach_adapter(tiny_llama(vocab_size=64), lora, seed=0)
        model.train()
        for module in model.modules():  # no dropout: compare the math, not the noise
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        total = sum(e.num_response_tokens - int(e.label_mask[0]) for e in examples)
        for group in micro_batches(examples, budget):
            loss, _ = summed_token_loss(model, *collate(group, 0, "cpu"))
            (loss / total).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name


def test_local_training_learns_and_touches_only_the_adapter(tiny_llama):
    base = tiny_llama(vocab_size=64)
    frozen = {n: p.clone() for n, p in base.named_parameters()}
    settings = {"model.lora.dropout": 0.0}
    model = attach_adapter(base, build_config(settings).lora, seed=0)
    before = adapter_state(model)
    examples = random_examples(4, seed=3)

    def one_step():
        return train_local(
            model,
            examples,
            steps=1,
            batch_size=4,
            grad_accumulation=1,
            learning_rate=1e-2,
            seed=0,
            pad_id=0,
        )

    first = one_step()
    later = train_local(
        model,
        examples,
        steps=20,
        batch_size=4,
        grad_accumulation=1,
        learning_rate=1e-2,
        seed=0,
        pad_id=0,
    )
    last = one_step()
    assert last.train_loss < first.train_loss - 0.3  # it starts memorising four sequences
    after = adapter_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for name, param in model.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, frozen[name.replace("base_layer.", "")]), name
    assert later.examples == 80 and later.steps == 20
    assert later.padded_tokens >= later.tokens


def test_gradient_accumulation_counts_examples(tiny_llama):
    model = attach_adapter(tiny_llama(vocab_size=64), build_config().lora, seed=0)
    result = train_local(
        model,
        random_examples(10),
        steps=2,
        batch_size=2,
        grad_accumulation=3,
        learning_rate=1e-3,
        seed=1,
        pad_id=0,
    )
    assert result.examples == 12 and result.response_tokens > 0


def test_empty_partition_is_refused(tiny_llama):
    model = attach_adapter(tiny_llama(vocab_size=64), build_config().lora, seed=0)
    with pytest.raises(ValueError, match="no training examples"):
        train_local(
            model,
            [],
            steps=1,
            batch_size=1,
            grad_accumulation=1,
            learning_rate=1e-3,
            seed=0,
            pad_id=0,
        )


def test_fedprox_adds_exactly_the_proximal_gradient(tiny_llama):
    from fedtune.training.local import add_proximal_gradient

    model = attach_adapter(
        tiny_llama(vocab_size=64), build_config({"model.lora.dropout": 0.0}).lora, seed=0
    )
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params]
    with torch.no_grad():  # the client has moved away from the global adapter it received
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    ids, attention, labelled = collate(random_examples(3, seed=5), 0, "cpu")
    mu = 0.3

    def gradients(proximal_in_loss: bool) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss, _ = summed_token_loss(model, ids, attention, labelled)
        if proximal_in_loss:  # FedProx's objective, differentiated by autograd
            loss = loss + mu / 2 * sum(
                ((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True)
            )
        loss.backward()
        return [p.grad.clone() for p in params]

    plain = gradients(False)
    objective = gradients(True)
    gradients(False)
    add_proximal_gradient(params, anchors, mu)
    for p, a, g0, g_obj in zip(params, anchors, plain, objective, strict=True):
        proximal = mu * (p.detach() - a)
        assert proximal.abs().max() > 0
        torch.testing.assert_close(p.grad - g0, proximal, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(p.grad, g_obj, rtol=1e-5, atol=1e-6)


def test_fedprox_keeps_a_client_closer_to_the_global_adapter(tiny_llama):
    def distance(mu: float) -> float:
        model = attach_adapter(
            tiny_llama(vocab_size=64), build_config({"model.lora.dropout": 0.0}).lora, seed=0
        )
        start = adapter_state(model)
        result = train_local(
            model,
            random_examples(8, seed=4),
            steps=12,
            batch_size=4,
            grad_accumulation=1,
            learning_rate=1e-2,
            seed=0,
            pad_id=0,
            max_grad_norm=0.0,
            proximal_mu=mu,
        )
        assert math.isfinite(result.train_loss)
        end = adapter_state(model)
        return sum(float(((end[k] - start[k]) ** 2).sum()) for k in start) ** 0.5

    free, held = distance(0.0), distance(50.0)
    assert held < 0.8 * free


def test_scaffold_correction_is_added_to_the_gradient_and_the_raw_mean_returned(tiny_llama):
    def fresh():
        return attach_adapter(
            tiny_llama(vocab_size=64), build_config({"model.lora.dropout": 0.0}).lora, seed=0
        )

    examples = random_examples(4, seed=6)
    settings = dict(
        steps=1, batch_size=4, grad_accumulation=1, learning_rate=1e-2, seed=0, pad_id=0
    )
    settings["max_grad_norm"] = 0.0
    # The raw gradient at the start, by parameter name.
    probe = fresh()
    ids, attention, labelled = collate(examples, 0, "cpu")
    loss, _ = summed_token_loss(probe, ids, attention, labelled)
    targets = sum(e.num_response_tokens - int(e.label_mask[0]) for e in examples)
    (loss / targets).backward()
    raw = {n: p.grad.clone() for n, p in probe.named_parameters() if p.requires_grad}
    terms = {n: torch.randn_like(g) for n, g in raw.items()}
    model = fresh()
    used = {}

    def capture(step, loss):  # after the optimizer step: .grad is what it stepped with
        used.update({n: p.grad.clone() for n, p in model.named_parameters() if n in terms})

    result = train_local(model, examples, **settings, gradient_correction=terms, on_step=capture)
    for name, gradient in raw.items():
        torch.testing.assert_close(result.mean_gradients[name], gradient, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(used[name], gradient + terms[name], rtol=1e-5, atol=1e-6)
    plain = train_local(fresh(), examples, **settings)
    assert plain.mean_gradients is None
    with pytest.raises(ValueError, match="do not train"):
        train_local(fresh(), examples, **settings, gradient_correction={"nope": terms[name]})

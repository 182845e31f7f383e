"""Both protocols on a tiny random Llama with SmolLM2's tokenizer (seconds)."""

from __future__ import annotations

import pytest
import torch

from fedtune.evaluation import flowertune, loglik
from fedtune.evaluation.api import ProtocolError, score_questions
from fedtune.evaluation.batching import BatchPlan
from fedtune.evaluation.sampling import fixed_subset


@pytest.fixture(scope="module")
def questions():
    return fixed_subset(50, seed=3)


@pytest.fixture
def model(tiny_llama):
    # A wider init than the default: at 0.02 a 2-layer model answers "\n" to every prompt, which would
    # make the comparisons below trivially true.
    return tiny_llama(initializer_range=0.5)


@pytest.mark.parametrize("plan", [BatchPlan(), BatchPlan(max_batch=8, pad_tolerance=16)])
def test_batched_generations_equal_one_at_a_time(model, smollm2_tokenizer, questions, plan):
    reference = flowertune.generate_one_at_a_time(model, smollm2_tokenizer, questions)
    batched = flowertune.generate_batched(model, smollm2_tokenizer, questions, plan=plan)
    assert [g.output for g in batched] == [g.output for g in reference]
    assert (
        len({g.output for g in reference}) > 10
    )  # varied answers, so the comparison means something


def test_near_ties_and_special_configs_take_the_official_path(model, smollm2_tokenizer, questions):
    reference = flowertune.generate_one_at_a_time(model, smollm2_tokenizer, questions[:6])
    forced = flowertune.generate_batched(
        model, smollm2_tokenizer, questions[:6], margin=float("inf")
    )
    assert all(g.rechecked for g in forced)
    assert [g.output for g in forced] == [g.output for g in reference]
    model.generation_config.repetition_penalty = 1.5
    assert not flowertune.greedy_is_argmax(model)
    penalised = flowertune.generate_batched(model, smollm2_tokenizer, questions[:6])
    assert all(g.rechecked for g in penalised)
    assert [g.output for g in penalised] == [
        g.output for g in flowertune.generate_one_at_a_time(model, smollm2_tokenizer, questions[:6])
    ]


@pytest.mark.parametrize("shots", [0, 5])
def test_loglik_equals_a_plain_forward_per_prompt(model, smollm2_tokenizer, questions, shots):
    scores = loglik.score_letters(model, smollm2_tokenizer, questions, shots=shots)
    prompts = loglik.build_prompts(questions, shots)
    letter_ids = loglik.letter_token_ids(smollm2_tokenizer)
    for score, prompt in zip(scores, prompts, strict=True):
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([smollm2_tokenizer.encode(prompt)])).logits[0, -1]
        expected = torch.log_softmax(logits.float(), dim=-1)[letter_ids]
        torch.testing.assert_close(torch.tensor(score.logprobs), expected, atol=1e-4, rtol=1e-4)
        assert score.letter == "ABCD"[int(expected.argmax())]


def test_score_questions_restores_training_mode(model, smollm2_tokenizer, questions):
    model.train()
    metrics = score_questions(model, smollm2_tokenizer, questions[:10], protocol="loglik")
    assert model.training
    assert metrics["n_questions"] == 10 and metrics["protocol"] == "loglik"
    assert set(metrics["categories"]) <= {"stem", "social_sciences", "humanities"}
    assert sum(metrics["predicted_letters"].values()) == 10
    with pytest.raises(ProtocolError, match="zero-shot"):
        score_questions(model, smollm2_tokenizer, questions[:2], protocol="flowertune", shots=5)
    with pytest.raises(ProtocolError, match="unknown protocol"):
        score_questions(model, smollm2_tokenizer, questions[:2], protocol="cloze")

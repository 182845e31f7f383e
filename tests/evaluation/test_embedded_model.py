"""Integration: the embedded SmolLM2-135M-Instruct on a small slice (under a minute on 2 idle cores)."""

from __future__ import annotations

import pytest
import torch

from fedtune.evaluation import flowertune, loglik
from fedtune.evaluation.batching import BatchPlan
from fedtune.evaluation.prompts import flowertune_prompt
from fedtune.evaluation.sampling import fixed_subset

# Over half of the suite's time when the machine is busy: slow as well as integration.
pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def smollm2(embedded_source):
    from fedtune.model.loading import load_model, load_tokenizer

    model = load_model(embedded_source, dtype="float32", device="cpu")
    model.eval()
    return model, load_tokenizer(embedded_source)


@pytest.fixture(scope="module")
def questions():
    # 52 questions spread over the scored subjects; prompts under 600 characters (~150 tokens) keep the
    # one-at-a-time reference to about 15 s on 2 cores.
    pool = fixed_subset(200, seed=11)
    return [q for q in pool if len(flowertune_prompt(q)) < 600][:52]


@pytest.fixture(scope="module")
def reference(smollm2, questions):
    model, tokenizer = smollm2
    return flowertune.generate_one_at_a_time(model, tokenizer, questions)


@pytest.mark.parametrize(
    "plan",
    [BatchPlan(), BatchPlan(max_batch=8, pad_tolerance=24)],
    ids=["exact-length", "left-padded"],
)
def test_batched_predictions_equal_the_official_loop(smollm2, questions, reference, plan):
    model, tokenizer = smollm2
    batched = flowertune.generate_batched(model, tokenizer, questions, plan=plan)
    assert len(questions) >= 50
    assert [g.output for g in batched] == [g.output for g in reference]


def test_untuned_model_answers_mostly_with_end_of_turn(reference):
    # Documented behaviour of the untuned model on the board's prompt: `<|im_end|>` first, decoded as "".
    outputs = [g.output for g in reference]
    assert outputs.count("") > len(outputs) // 2


def test_loglik_on_the_embedded_model(smollm2, questions):
    model, tokenizer = smollm2
    subset = questions[:12]
    scores = loglik.score_letters(model, tokenizer, subset, shots=0, plan=BatchPlan(max_batch=4))
    for score, prompt in zip(scores, loglik.build_prompts(subset, 0), strict=True):
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([tokenizer.encode(prompt)])).logits[0, -1]
        expected = torch.log_softmax(logits.float(), dim=-1)[loglik.letter_token_ids(tokenizer)]
        torch.testing.assert_close(torch.tensor(score.logprobs), expected, atol=2e-3, rtol=1e-3)

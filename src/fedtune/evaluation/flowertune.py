"""Protocol `flowertune`: the board's generation-based evaluation, batched, with the official
predictions.

The official loop (Flower `general-nlp/benchmarks.py`) calls `model.generate` once per question:
greedy, `max_new_tokens` = token count of the gold letter (1 for A–D on every tokenizer we know),
the output decoded with `skip_special_tokens=True`, then parsed by the official parser. With one new
token, greedy generation is the argmax of the next-token logits after the prompt, so fedtune
computes exactly those logits, in batches that share the prompt's common prefix, at the last
position only (`batching.py`).

Batching changes float summation order, so logits differ from the one-at-a-time loop in the last
bits. A prediction could only change where the top two logits are that close: every question whose
margin is below `margin` (fp32: 0.01, orders of magnitude above the differences measured, see
docs/evaluation.md) is re-run through the official one-at-a-time call, so the predictions are those
of the official loop. Questions whose gold needs more than one token, and models whose generation
config changes greedy decoding (a repetition penalty, suppressed tokens, a minimum length), always
take the official path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fedtune.evaluation.batching import BatchPlan, iter_last_logits
from fedtune.evaluation.dataset import Question
from fedtune.evaluation.prompts import flowertune_prompt

PROTOCOL = "flowertune"
PROTOCOL_VERSION = "1"
# Logit margin under which a batched prediction is re-checked one at a time, by compute dtype.
MARGIN_FP32 = 0.01
MARGIN_HALF = 0.5
# Float error grows with the logits' size: the fixed margins suit ordinary models (top logits of
# ~10–30, batched-vs-single differences ~5e-5), not an adapter that drives logits into the
# hundreds, where fp32 rounding alone reaches ~1e-5 of the value per operation. The margin used is
# the larger of the fixed one and this share of the top logit's magnitude.
RELATIVE_MARGIN_FP32 = 1e-4
RELATIVE_MARGIN_HALF = 2.5e-2


@dataclass(frozen=True)
class Generation:
    """One question's generation.

    Attributes:
        question: the question.
        output: the decoded generation, as the official loop would store it.
        rechecked: True when it came from the one-at-a-time call (near tie, multi-token gold,
            special config).
    """

    question: Question
    output: str
    rechecked: bool = False


def encode_prompt(tokenizer: Any, question: Question) -> list[int]:
    """Token ids of a question's prompt, as the official loop encodes it (default special
    tokens)."""
    return list(tokenizer.encode(flowertune_prompt(question)))


def max_new_tokens(tokenizer: Any, question: Question) -> int:
    """The official `max_new_tokens`: the token count of the gold letter without special tokens."""
    return len(tokenizer(question.answer, add_special_tokens=False)["input_ids"])


def official_generate(model: Any, tokenizer: Any, question: Question) -> str:
    """One question through the official call: `model.generate` on the single prompt, greedy.

    This is the reference the batched path is checked against (and its fallback); it mirrors the
    official loop's arguments exactly.
    """
    import torch

    device = next(model.parameters()).device
    input_ids = torch.tensor([encode_prompt(tokenizer, question)], device=device)
    with torch.inference_mode():
        output_ids = model.generate(
            inputs=input_ids,
            max_new_tokens=max_new_tokens(tokenizer, question),
            do_sample=False,
            top_p=1.0,
            temperature=1.0,
            pad_token_id=tokenizer.eos_token_id,
        )
    return str(tokenizer.decode(output_ids[0][input_ids.shape[1] :], skip_special_tokens=True))


def greedy_is_argmax(model: Any) -> bool:
    """Whether the model's generation config leaves the first greedy token equal to the logits'
    argmax."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return True
    plain = (
        (getattr(config, "repetition_penalty", None) or 1.0) == 1.0
        and not getattr(config, "no_repeat_ngram_size", None)
        and not getattr(config, "bad_words_ids", None)
        and not getattr(config, "suppress_tokens", None)
        and not getattr(config, "begin_suppress_tokens", None)
        and not getattr(config, "min_length", None)
        and not getattr(config, "min_new_tokens", None)
        and getattr(config, "forced_bos_token_id", None) is None
        and getattr(config, "forced_eos_token_id", None) is None
        and not getattr(config, "sequence_bias", None)
    )
    return bool(plain)


def default_margin(model: Any) -> float:
    """The recheck margin for the model's compute dtype."""
    import torch

    dtype = next(model.parameters()).dtype
    return MARGIN_FP32 if dtype == torch.float32 else MARGIN_HALF


def relative_margin(model: Any) -> float:
    """The share of the top logit under which a prediction is re-checked, by compute dtype."""
    import torch

    dtype = next(model.parameters()).dtype
    return RELATIVE_MARGIN_FP32 if dtype == torch.float32 else RELATIVE_MARGIN_HALF


def generate_batched(
    model: Any,
    tokenizer: Any,
    questions: Sequence[Question],
    *,
    plan: BatchPlan | None = None,
    margin: float | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> list[Generation]:
    """The official loop's generations for `questions`, computed in batches.

    Args:
        model: a causal LM (optionally PEFT-wrapped), eval mode.
        tokenizer: its tokenizer.
        questions: the questions, in any order.
        plan: batching limits (default: by device).
        margin: logit margin below which a prediction is re-checked one at a time (default: by
            dtype).
        on_progress: called with the number of questions finished since the last call.

    Returns:
        One Generation per question, in the input order.
    """
    device = str(next(model.parameters()).device)
    plan = plan or BatchPlan.for_device(device)
    margin = default_margin(model) if margin is None else margin
    relative = relative_margin(model)
    fast = [i for i, q in enumerate(questions) if max_new_tokens(tokenizer, q) == 1]
    if not greedy_is_argmax(model):
        fast = []
    slow = sorted(set(range(len(questions))) - set(fast))
    results: dict[int, Generation] = {}
    prompts = {i: encode_prompt(tokenizer, questions[i]) for i in fast}
    index_of = list(prompts)
    near_ties: list[int] = []
    for local, logits in iter_last_logits(
        model,
        [prompts[i] for i in index_of],
        [list(range(len(index_of)))],
        plan,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        on_batch=on_progress,
    ):
        index = index_of[local]
        top = logits.topk(2)
        best = float(top.values[0])
        if best - float(top.values[1]) < max(margin, relative * abs(best)):
            near_ties.append(index)
            continue
        token = int(top.indices[0])
        output = str(tokenizer.decode([token], skip_special_tokens=True))
        results[index] = Generation(questions[index], output)
    for index in near_ties + slow:
        results[index] = Generation(
            questions[index], official_generate(model, tokenizer, questions[index]), True
        )
        if on_progress is not None and index in slow:
            on_progress(1)
    return [results[i] for i in range(len(questions))]


def generate_one_at_a_time(
    model: Any,
    tokenizer: Any,
    questions: Sequence[Question],
    on_progress: Callable[[int], None] | None = None,
) -> list[Generation]:
    """The official loop itself: one `generate` call per question (the reference for tests and
    benchmarks)."""
    generations = []
    for question in questions:
        generations.append(
            Generation(question, official_generate(model, tokenizer, question), True)
        )
        if on_progress is not None:
            on_progress(1)
    return generations

"""Protocol `loglik`: the answer is the letter whose token `" A"` … `" D"` is most likely after the
prompt.

This is lm-evaluation-harness's `mmlu` task (multiple choice, `acc`): the same prompt
(`prompts.loglik_prompt`, 0 or 5 dev examples), the same continuations, the same argmax over four
log-likelihoods. It cannot be gamed by the first word of a reply ("Answer" is not a letter), and it
needs one forward pass per question, logits at the last position only. Few-shot prompts share their
subject's description and five examples (~400–600 tokens), so those are computed once per subject
and only the question's own tokens per question.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fedtune.evaluation.batching import BatchPlan, iter_last_logits
from fedtune.evaluation.dataset import EMBEDDED, LETTERS, DatasetError, Question, dev_examples
from fedtune.evaluation.prompts import loglik_choice_strings, loglik_prompt

PROTOCOL = "loglik"
PROTOCOL_VERSION = "1"
SHOTS = (0, 5)


class LoglikError(ValueError):
    """The loglik protocol cannot run as asked (shots, a tokenizer that splits `" A"`)."""


@dataclass(frozen=True)
class LetterScores:
    """One question's letter log-probabilities.

    Attributes:
        question: the question.
        logprobs: log P(" A"), …, log P(" D") as next tokens (natural log, over the whole
            vocabulary).
        letter: the argmax letter (the first on an exact tie, as lm-evaluation-harness's argmax).
    """

    question: Question
    logprobs: tuple[float, float, float, float]
    letter: str


def letter_token_ids(tokenizer: Any) -> list[int]:
    """Token ids of `" A"` … `" D"`.

    Raises:
        LoglikError: the tokenizer needs more than one token for a letter.
    """
    ids = []
    for text in loglik_choice_strings():
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise LoglikError(
                f"loglik protocol: the tokenizer splits {text!r} into {len(tokens)} tokens"
            )
        ids.append(tokens[0])
    return ids


def build_prompts(questions: Sequence[Question], shots: int, source: str = EMBEDDED) -> list[str]:
    """The loglik prompt of every question (few-shot examples: the first `shots` dev questions of
    its subject).

    Raises:
        LoglikError: `shots` is not 0–5.
        DatasetError: the dev split cannot be loaded.
    """
    if not 0 <= shots <= 5:
        raise LoglikError(
            f"--shots must be between 0 and 5 (the dev split has 5 per subject), got {shots}"
        )
    examples = dev_examples(source) if shots else {}
    return [loglik_prompt(q, examples[q.subject][:shots] if shots else ()) for q in questions]


def score_letters(
    model: Any,
    tokenizer: Any,
    questions: Sequence[Question],
    *,
    shots: int = 0,
    source: str = EMBEDDED,
    plan: BatchPlan | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> list[LetterScores]:
    """Score every question by the next-token log-probabilities of the four letters.

    Args:
        model: a causal LM (optionally PEFT-wrapped), eval mode.
        tokenizer: its tokenizer.
        questions: the questions.
        shots: number of dev examples in the prompt (0 or 5 in the usual protocol).
        source: MMLU source of the dev split.
        plan: batching limits (default: by device).
        on_progress: called with the number of questions finished since the last call.

    Returns:
        One LetterScores per question, in the input order.

    Raises:
        LoglikError: bad `shots` or a tokenizer that splits a letter.
        DatasetError: the dev split cannot be loaded.
    """
    import torch

    letter_ids = letter_token_ids(tokenizer)
    prompts = [list(tokenizer.encode(text)) for text in build_prompts(questions, shots, source)]
    # One prefix group per subject: few-shot prompts share description + examples within a subject.
    groups: dict[str, list[int]] = {}
    for index, question in enumerate(questions):
        groups.setdefault(question.subject, []).append(index)
    plan = plan or BatchPlan.for_device(str(next(model.parameters()).device))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: dict[int, LetterScores] = {}
    for index, logits in iter_last_logits(
        model, prompts, list(groups.values()), plan, pad_id, on_progress
    ):
        logprobs = torch.log_softmax(logits, dim=-1)[letter_ids].tolist()
        best = max(range(4), key=lambda k: (logprobs[k], -k))
        results[index] = LetterScores(questions[index], tuple(logprobs), LETTERS[best])  # type: ignore[arg-type]
    return [results[i] for i in range(len(questions))]


__all__ = ["DatasetError", "LetterScores", "LoglikError", "score_letters"]

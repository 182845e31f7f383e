"""Scoring an already-loaded model: the plain-Python core of `fedtune eval`, also used during
training.

    from fedtune.evaluation import fixed_subset, score_questions
    questions = fixed_subset(200, seed=0)                 # once, at start-up
    metrics = score_questions(model, tokenizer, questions)  # every N rounds, on the (PEFT-wrapped)
    global model

Nothing here loads a model or writes a file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fedtune.evaluation import flowertune, loglik
from fedtune.evaluation.batching import BatchPlan
from fedtune.evaluation.dataset import EMBEDDED, Question
from fedtune.evaluation.metrics import Verdict, summarize
from fedtune.evaluation.parser import is_correct, predicted_letter

PROTOCOLS = (flowertune.PROTOCOL, loglik.PROTOCOL)
PROTOCOL_VERSIONS = {
    flowertune.PROTOCOL: flowertune.PROTOCOL_VERSION,
    loglik.PROTOCOL: loglik.PROTOCOL_VERSION,
}


class ProtocolError(ValueError):
    """An unknown protocol or a setting the protocol does not have."""


def check_protocol(protocol: str, shots: int) -> None:
    """Validate a protocol name and its shot count.

    Raises:
        ProtocolError: unknown protocol, or flowertune with shots (the board's protocol is
            zero-shot).
    """
    if protocol not in PROTOCOLS:
        raise ProtocolError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    if protocol == flowertune.PROTOCOL and shots != 0:
        raise ProtocolError(
            "the flowertune protocol is zero-shot; use --shots 0 or --protocol loglik"
        )
    if shots not in loglik.SHOTS:
        raise ProtocolError(f"--shots must be 0 or 5, got {shots}")


def run_protocol(
    model: Any,
    tokenizer: Any,
    questions: Sequence[Question],
    *,
    protocol: str = loglik.PROTOCOL,
    shots: int = 0,
    source: str = EMBEDDED,
    plan: BatchPlan | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[list[Verdict], dict[str, Any]]:
    """Run one protocol on loaded questions.

    Returns:
        The verdicts, and protocol details: flowertune → `generations` (list of Generation) and
        `rechecked`; loglik → `letter_scores` (list of LetterScores).

    Raises:
        ProtocolError: see `check_protocol`.
        LoglikError: a tokenizer that splits a letter.
    """
    check_protocol(protocol, shots)
    if protocol == flowertune.PROTOCOL:
        generations = flowertune.generate_batched(
            model, tokenizer, questions, plan=plan, on_progress=on_progress
        )
        verdicts = [
            Verdict(g.question, predicted_letter(g.output), is_correct(g.output, g.question.answer))
            for g in generations
        ]
        details = {"generations": generations, "rechecked": sum(g.rechecked for g in generations)}
        return verdicts, details
    scores = loglik.score_letters(
        model, tokenizer, questions, shots=shots, source=source, plan=plan, on_progress=on_progress
    )
    verdicts = [Verdict(s.question, s.letter, s.letter == s.question.answer) for s in scores]
    return verdicts, {"letter_scores": scores}


def score_questions(
    model: Any,
    tokenizer: Any,
    questions: Sequence[Question],
    protocol: str = loglik.PROTOCOL,
    shots: int = 0,
    source: str = EMBEDDED,
) -> dict[str, Any]:
    """Score a loaded (optionally PEFT-wrapped) model on the given questions.

    The model is switched to eval mode for the call and restored to its previous mode afterwards; no
    gradient is recorded. Suited to server-side evaluation every N rounds on a `fixed_subset`.

    Args:
        model: a causal LM on its device.
        tokenizer: its tokenizer.
        questions: e.g. `fixed_subset(200, seed=0)`.
        protocol: "loglik" (default: cheap, not fooled by answer-initial words) or "flowertune".
        shots: 0 or 5 (loglik only).
        source: MMLU source of the few-shot examples.

    Returns:
        The metrics dict of `metrics.summarize` (`average`, `weighted_mean`,
        `categories[c]["accuracy"]`, `subjects`, `predicted_letters`, `constant_baselines`, …) plus
        `protocol`, `protocol_version`, `shots`.

    Raises:
        ProtocolError: unknown protocol or shots.
        LoglikError: a tokenizer that splits a letter.
    """
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        verdicts, _ = run_protocol(
            model, tokenizer, questions, protocol=protocol, shots=shots, source=source
        )
    finally:
        if was_training:
            model.train()
    metrics = summarize(verdicts)
    metrics.update(protocol=protocol, protocol_version=PROTOCOL_VERSIONS[protocol], shots=shots)
    return metrics

"""Spot-check verification: did the submitted adapter on its base model produce these answers?

Re-scoring an entry's generation files proves their arithmetic, not that a model wrote them: files
whose outputs are the gold letters re-score to 100. So after an entry is stored the board draws a
secret sample of questions per scored category, a verifier (`fedtune leaderboard verify`, a worker
that may run on another machine) re-generates their answers from the base model and the submitted
adapter with the entry's own protocol, and the board compares the letters with the submitted ones.

- **The sample** is drawn with a seed the submitter cannot know: HMAC-SHA256 of the entry's id under
  the board's secret (32 random bytes made with the store, never served). It is drawn when the entry
  is stored — after its answers are fixed — and made public with the verdict, so anyone can re-check
  the comparison from the held files.
- **The comparison** is of letters as the board reads them: the official parser's letter (A–D, or
  none) of each output for the board protocol, the predicted letter for `loglik`. Greedy outputs may
  differ in their last tokens across hardware; the letters should not.
- **The verdict**: agreement (equal letters / sample size) at or above the policy's threshold →
  reproduced (ranked), or held for review when the Average is above the track's plausibility
  ceiling; below it → failed verification, with the counts and the first disagreements for the
  operator.

Everything here is plain Python over the held files; the store runs it inside its transactions.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedtune.evaluation.dataset import EMBEDDED, Question, load_split
from fedtune.evaluation.parser import predicted_letter
from fedtune.evaluation.prompts import flowertune_inner_prompt
from fedtune.evaluation.rescore import decompress, parse_generations, parse_predictions
from fedtune.evaluation.subjects import SCORED_CATEGORIES
from fedtune.leaderboard.entry import FAILED, HELD, REPRODUCED

NONE = "none"  # the letter of an output the parser reads no letter from
MAX_DISAGREEMENTS_SHOWN = 20


class VerificationError(ValueError):
    """A verifier's answers that do not answer the entry's sample, or held files that cannot be
    read."""


@functools.lru_cache(maxsize=1)
def _scored_questions() -> dict[str, tuple[Question, ...]]:
    """The scored categories' test questions, in the split's order."""
    by_category: dict[str, list[Question]] = {c: [] for c in SCORED_CATEGORIES}
    for question in load_split(EMBEDDED, "test"):
        if question.category in by_category:
            by_category[question.category].append(question)
    return {c: tuple(qs) for c, qs in by_category.items()}


def question_index() -> dict[tuple[str, int], Question]:
    """(subject, row) → the scored test question."""
    return {(q.subject, q.index): q for qs in _scored_questions().values() for q in qs}


def sample_seed(secret: bytes, entry_id: int) -> str:
    """The entry's sample seed (hex): HMAC-SHA256 of its id under the board's secret."""
    return hmac.new(secret, f"fedtune-verification:{entry_id}".encode(), hashlib.sha256).hexdigest()


def draw_sample(seed: str, per_category: int) -> list[tuple[str, int]]:
    """`per_category` questions of each scored category (all of it when smaller), drawn without
    replacement with `seed`; as (subject, row) in the split's order within each category."""
    rng = random.Random(int(seed, 16))
    sample: list[tuple[str, int]] = []
    for category in SCORED_CATEGORIES:
        questions = _scored_questions()[category]
        chosen = sorted(rng.sample(range(len(questions)), min(per_category, len(questions))))
        sample += [(questions[i].subject, questions[i].index) for i in chosen]
    return sample


def submitted_letters(
    files: Mapping[str, bytes], formats: Mapping[str, str], sample: Sequence[tuple[str, int]]
) -> dict[tuple[str, int], str]:
    """The letter the entry's held files give for each sampled question.

    Raises:
        VerificationError: a held file cannot be read, or does not answer a sampled question.
    """
    questions = question_index()
    wanted = set(sample)
    letters: dict[tuple[str, int], str] = {}
    for category, raw in files.items():
        try:
            if formats.get(category) == "predictions":
                for row in parse_predictions(raw, category):
                    key = (row["subset"], row["index"])
                    if key in wanted:
                        letters[key] = str(row["predicted"])
                continue
            by_prompt = {
                (row["subset"], row["prompt"]): row["output"]
                for row in parse_generations(decompress(raw, category), category)
            }
        except ValueError as exc:
            raise VerificationError(f"held {category} file: {exc}") from exc
        for key in wanted:
            question = questions[key]
            output = by_prompt.get((question.subject, flowertune_inner_prompt(question)))
            if question.category == category and output is not None:
                letters[key] = predicted_letter(output) or NONE
    missing = [k for k in sample if k not in letters]
    if missing:
        raise VerificationError(f"the held files do not answer {missing[0][0]} #{missing[0][1]}")
    return letters


def regenerated_letters(
    protocol: str, answers: Any, sample: Sequence[tuple[str, int]]
) -> dict[tuple[str, int], str]:
    """A verifier's answers as letters: exactly one per sampled question.

    Args:
        protocol: "flowertune" (answers carry the raw `output`) or "loglik" (`predicted`).
        answers: the verifier's list of `{"subset", "index", "output" | "predicted"}`.

    Raises:
        VerificationError: malformed, or not exactly the sample.
    """
    field = "output" if protocol == "flowertune" else "predicted"
    if not isinstance(answers, list) or len(answers) != len(sample):
        raise VerificationError(f"expected {len(sample)} answers, one per sampled question")
    wanted, letters = set(sample), {}
    for number, row in enumerate(answers):
        ok = (
            isinstance(row, dict)
            and set(row) == {"subset", "index", field}
            and isinstance(row["subset"], str)
            and isinstance(row["index"], int)
            and isinstance(row[field], str)
        )
        if not ok:
            raise VerificationError(f"answer {number}: expected {{subset, index, {field}}}")
        key = (row["subset"], row["index"])
        if key not in wanted or key in letters:
            raise VerificationError(
                f"answer {number}: {key[0]} #{key[1]} is not a sampled question"
            )
        value = row[field]
        if protocol == "flowertune":
            letters[key] = predicted_letter(value) or NONE
        elif value in ("A", "B", "C", "D", NONE):
            letters[key] = value
        else:
            raise VerificationError(f"answer {number}: predicted must be A–D or none")
    return letters


@dataclass(frozen=True)
class Comparison:
    """Submitted against re-generated letters on the sample.

    Attributes:
        sampled: questions compared.
        agreed: questions whose letters are equal.
        submitted_correct / regenerated_correct: how many each got right on the sample — a
            submission better than its model on the sample is the signature of edited answers.
        disagreements: the first few (subject, row, submitted, re-generated, gold).
        lettered / lettered_agreed: questions where either side read a letter, and those of them
            that agree — how much the check could tell apart: two models that both answer
            nothing agree there, rightly (they score alike), but say little about each other.
    """

    sampled: int
    agreed: int
    submitted_correct: int
    regenerated_correct: int
    disagreements: tuple[tuple[str, int, str, str, str], ...]
    lettered: int = 0
    lettered_agreed: int = 0

    @property
    def agreement(self) -> float:
        """agreed / sampled."""
        return self.agreed / self.sampled if self.sampled else 0.0

    def to_json(self) -> dict[str, Any]:
        """As stored with the entry and shown on its page."""
        return {
            "sampled": self.sampled,
            "agreed": self.agreed,
            "agreement": self.agreement,
            "submitted_correct": self.submitted_correct,
            "regenerated_correct": self.regenerated_correct,
            "lettered": self.lettered,
            "lettered_agreed": self.lettered_agreed,
            "disagreements": [
                {"subset": s, "index": i, "submitted": a, "regenerated": b, "gold": g}
                for s, i, a, b, g in self.disagreements
            ],
        }


def compare(
    submitted: Mapping[tuple[str, int], str],
    regenerated: Mapping[tuple[str, int], str],
    sample: Sequence[tuple[str, int]],
) -> Comparison:
    """Compare the two sets of letters over the sample."""
    questions = question_index()
    agreed = sub_ok = regen_ok = lettered = lettered_agreed = 0
    differ: list[tuple[str, int, str, str, str]] = []
    for key in sample:
        gold = questions[key].answer
        mine, theirs = submitted[key], regenerated[key]
        agreed += mine == theirs
        if NONE not in (mine, theirs) or mine != theirs:
            lettered += 1
            lettered_agreed += mine == theirs
        sub_ok += mine == gold
        regen_ok += theirs == gold
        if mine != theirs and len(differ) < MAX_DISAGREEMENTS_SHOWN:
            differ.append((key[0], key[1], mine, theirs, gold))
    return Comparison(
        len(sample), agreed, sub_ok, regen_ok, tuple(differ), lettered, lettered_agreed
    )


def verdict(comparison: Comparison, threshold: float, average: float, ceiling: float) -> str:
    """The entry's status after verification."""
    if comparison.agreement < threshold:
        return FAILED
    return HELD if average > ceiling else REPRODUCED


def check_adapter_file(path: str) -> int:
    """Check that a file is a safetensors file (header and data sizes consistent) and return its
    tensor count; only the header is read.

    Raises:
        VerificationError: not a safetensors file, or one without tensors.
    """
    from safetensors import safe_open

    try:
        with safe_open(path, framework="np") as handle:
            names = list(handle.keys())  # noqa: SIM118 (a safe_open handle is not a dict)
            for name in names:
                handle.get_slice(name).get_shape()
    except Exception as exc:  # safetensors raises its own error types, and OSError
        raise VerificationError(f"not a safetensors file ({exc})") from None
    if not names:
        raise VerificationError("the adapter file holds no tensors")
    return len(names)

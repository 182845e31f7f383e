"""Accuracies from per-question verdicts: per subject and category, the board's Average, answer
bias.

Accuracies are fractions (0–1) at full precision; the `board` block repeats them as percentages
rounded to two decimals, the way the leaderboard prints them. A category's accuracy is micro (over
its questions); the board's Average is the unweighted mean of the scored categories; `weighted_mean`
is correct / total over all questions. Standard errors are those of a mean of 0/1 outcomes,
sqrt(p(1-p)/(n-1)) (lm-evaluation-harness's convention).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedtune.evaluation.dataset import LETTERS, Question
from fedtune.evaluation.subjects import ALL_CATEGORIES, ALL_SUBJECTS, SCORED_CATEGORIES, category_of

NO_LETTER = "none"


@dataclass(frozen=True)
class Verdict:
    """One scored question.

    Attributes:
        question: the question.
        letter: the letter the protocol read from the model (A–D), or None when it read none.
        correct: whether the protocol counts the answer as right (flowertune: the official parser's
            verdict).
    """

    question: Question
    letter: str | None
    correct: bool


def stderr(accuracy: float, count: int) -> float:
    """Standard error of a mean of `count` 0/1 outcomes with mean `accuracy` (0 for fewer than
    2)."""
    if count < 2:
        return 0.0
    return math.sqrt(accuracy * (1.0 - accuracy) / (count - 1))


def _cell(correct: int, count: int) -> dict[str, Any]:
    accuracy = correct / count if count else 0.0
    return {"n": count, "correct": correct, "accuracy": accuracy, "stderr": stderr(accuracy, count)}


def category_table(pairs: Sequence[tuple[Question, bool]]) -> dict[str, dict[str, Any]]:
    """Per-category counts and accuracies of (question, correct) pairs, in the board's order."""
    correct: Counter[str] = Counter()
    count: Counter[str] = Counter()
    for question, ok in pairs:
        count[question.category] += 1
        correct[question.category] += int(ok)
    return {c: _cell(correct[c], count[c]) for c in ALL_CATEGORIES if count[c]}


def percent(correct: int, total: int) -> float:
    """A share in percent at full precision, as scores are stored: 100 · correct / total."""
    return 100.0 * correct / total


def board_mean(percents: Mapping[str, float]) -> float:
    """The board's Average of per-category percents: their unweighted mean over the scored
    categories, summed in `SCORED_CATEGORIES` order (the same bits wherever it is computed)."""
    return sum(percents[c] for c in SCORED_CATEGORIES) / len(SCORED_CATEGORIES)


def board_average(categories: dict[str, dict[str, Any]]) -> float | None:
    """The unweighted mean of the scored categories' accuracies (None when none was evaluated)."""
    scored = [categories[c]["accuracy"] for c in SCORED_CATEGORIES if c in categories]
    return sum(scored) / len(scored) if scored else None


def _average_stderr(categories: dict[str, dict[str, Any]]) -> float | None:
    # Var(mean of k independent accuracies) = sum(se_i^2) / k^2.
    scored = [categories[c]["stderr"] for c in SCORED_CATEGORIES if c in categories]
    return math.sqrt(sum(se * se for se in scored)) / len(scored) if scored else None


def _percent(value: float | None) -> float | None:
    return None if value is None else round(100.0 * value, 2)


def board_row(categories: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The leaderboard's columns in percent with two decimals: average, stem, social_sciences,
    humanities."""
    row = {"average": _percent(board_average(categories))}
    for category in SCORED_CATEGORIES:
        row[category] = (
            _percent(categories[category]["accuracy"]) if category in categories else None
        )
    return row


def constant_baselines(questions: Sequence[Question]) -> dict[str, dict[str, Any]]:
    """What answering the same letter every time would score on these questions.

    Returns:
        For each letter A–D: per-category accuracies, the board's Average (fraction) and its board
        row.
    """
    baselines = {}
    for letter in LETTERS:
        table = category_table([(q, q.answer == letter) for q in questions])
        baselines[letter] = {
            "average": board_average(table),
            "board": board_row(table),
            "categories": {c: cell["accuracy"] for c, cell in table.items()},
        }
    return baselines


def summarize(verdicts: Sequence[Verdict]) -> dict[str, Any]:
    """All metrics of one evaluation.

    Args:
        verdicts: one per evaluated question.

    Returns:
        A JSON-ready dict: `categories`, `subjects`, `average`, `average_stderr`, `weighted_mean`,
        `board`, `n_questions`, `predicted_letters`, `gold_letters`, `constant_baselines`.
    """
    categories = category_table([(v.question, v.correct) for v in verdicts])
    subject_correct: Counter[str] = Counter()
    subject_count: Counter[str] = Counter()
    for verdict in verdicts:
        subject_count[verdict.question.subject] += 1
        subject_correct[verdict.question.subject] += int(verdict.correct)
    subjects = {}
    for subject in ALL_SUBJECTS:
        if subject_count[subject]:
            cell = _cell(subject_correct[subject], subject_count[subject])
            subjects[subject] = {"category": category_of(subject), **cell}
    for category, cell in categories.items():
        cell["subjects"] = sum(1 for s in subjects.values() if s["category"] == category)
    total = len(verdicts)
    predicted = Counter(v.letter or NO_LETTER for v in verdicts)
    gold = Counter(v.question.answer for v in verdicts)
    return {
        "n_questions": total,
        "average": board_average(categories),
        "average_stderr": _average_stderr(categories),
        "weighted_mean": sum(v.correct for v in verdicts) / total if total else None,
        "board": board_row(categories),
        "categories": categories,
        "subjects": subjects,
        "predicted_letters": {k: predicted[k] for k in (*LETTERS, NO_LETTER)},
        "gold_letters": {k: gold[k] for k in LETTERS},
        "constant_baselines": constant_baselines([v.question for v in verdicts]),
    }

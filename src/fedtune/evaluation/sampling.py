"""Which questions an evaluation runs: categories, subjects, and deterministic stratified
subsamples.

Subsamples are drawn per subject with `random.Random(f"{seed}:{subject}")` (string seeds are hashed
with SHA-512, so the draw is the same on every machine and Python version) and returned in the
official order. Any subsample makes the evaluation *partial*, which result files state.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from fedtune.evaluation.dataset import EMBEDDED, Question, load_split
from fedtune.evaluation.subjects import SCORED_CATEGORIES, SubjectError


@dataclass(frozen=True)
class Selection:
    """The questions chosen and how.

    Attributes:
        questions: the chosen questions in the official order.
        categories: categories asked for.
        subjects: subjects asked for (empty: all of the categories).
        limit_per_subject: at most this many per subject (None: no limit).
        sample: a proportional stratified sample of about this many questions (None: no sample).
        seed: the sampling seed.
        available: how many questions the categories/subjects hold before any limit.
        available_per_category: the same, per category.
    """

    questions: tuple[Question, ...]
    categories: tuple[str, ...]
    subjects: tuple[str, ...]
    limit_per_subject: int | None
    sample: int | None
    seed: int
    available: int
    available_per_category: dict[str, int]

    @property
    def partial(self) -> bool:
        """True when fewer questions than the categories/subjects hold are evaluated."""
        return len(self.questions) < self.available


def _by_subject(questions: Sequence[Question]) -> dict[str, list[Question]]:
    groups: dict[str, list[Question]] = {}
    for question in questions:
        groups.setdefault(question.subject, []).append(question)
    return groups


def _draw(rows: list[Question], count: int, seed: int, subject: str) -> list[Question]:
    if count >= len(rows):
        return list(rows)
    chosen = random.Random(f"{seed}:{subject}").sample(range(len(rows)), count)
    return [rows[i] for i in sorted(chosen)]


def proportional_counts(sizes: dict[str, int], total: int) -> dict[str, int]:
    """Split `total` over subjects in proportion to their sizes (largest remainder, ties by name).

    Every subject gets at least one question when `total` allows it, so no subject vanishes from a
    sample.
    """
    grand = sum(sizes.values())
    if total >= grand:
        return dict(sizes)
    quotas = {s: total * n / grand for s, n in sizes.items()}
    counts = {s: max(1, int(q)) for s, q in quotas.items()}
    left = total - sum(counts.values())
    # The floor of one can overshoot a small total: take back from the most over-allocated subjects.
    while left < 0:
        reducible = [s for s in sizes if counts[s] > 1]
        if not reducible:  # total < number of subjects: one each is the least a sample keeps
            break
        subject = max(reducible, key=lambda s: (counts[s] - quotas[s], s))
        counts[subject] -= 1
        left += 1
    for subject in sorted(sizes, key=lambda s: (-(quotas[s] - int(quotas[s])), s)):
        if left <= 0:
            break
        if counts[subject] < sizes[subject]:
            counts[subject] += 1
            left -= 1
    return counts


def select(
    categories: Sequence[str] = SCORED_CATEGORIES,
    subjects: Sequence[str] = (),
    *,
    limit_per_subject: int | None = None,
    sample: int | None = None,
    seed: int = 2024,
    source: str = EMBEDDED,
) -> Selection:
    """Choose the questions of an evaluation from the test split.

    Args:
        categories: validated category names.
        subjects: validated subject names; when given, only these (they must lie in `categories`).
        limit_per_subject: keep at most this many per subject (seeded draw).
        sample: keep a stratified sample of about this many questions in proportion to subject
            sizes.
        seed: sampling seed.
        source: MMLU source.

    Returns:
        The Selection.

    Raises:
        SubjectError: a subject outside the categories, or a non-positive limit.
        DatasetError: the source cannot be loaded.
    """
    for value, name in ((limit_per_subject, "--limit-per-subject"), (sample, "--sample")):
        if value is not None and value < 1:
            raise SubjectError(f"{name} must be at least 1, got {value}")
    pool = [q for q in load_split(source, "test") if q.category in categories]
    if subjects:
        outside = [s for s in subjects if all(q.subject != s for q in pool)]
        if outside:
            raise SubjectError(
                f"subject {outside[0]!r} is not in the categories {', '.join(categories)}"
            )
        pool = [q for q in pool if q.subject in subjects]
    groups = _by_subject(pool)
    counts = {s: len(rows) for s, rows in groups.items()}
    if sample is not None:
        counts = proportional_counts(counts, sample)
    if limit_per_subject is not None:
        counts = {s: min(n, limit_per_subject) for s, n in counts.items()}
    chosen = [q for s, rows in groups.items() for q in _draw(rows, counts[s], seed, s)]
    return Selection(
        questions=tuple(chosen),
        categories=tuple(categories),
        subjects=tuple(subjects),
        limit_per_subject=limit_per_subject,
        sample=sample,
        seed=seed,
        available=len(pool),
        available_per_category=dict(Counter(q.category for q in pool)),
    )


def fixed_subset(
    num_questions: int,
    seed: int = 0,
    categories: Sequence[str] = SCORED_CATEGORIES,
    source: str = EMBEDDED,
) -> list[Question]:
    """A small fixed stratified subset for evaluation during training (same seed → same questions).

    Args:
        num_questions: about this many questions, spread over subjects in proportion to their size
            (at least one per subject, so at least 44 for the three scored categories).
        seed: sampling seed.
        categories: categories to draw from.
        source: MMLU source.

    Returns:
        The questions in the official order.
    """
    return list(select(categories, sample=num_questions, seed=seed, source=source).questions)

"""Constant-answer reference rows: what a model scores by always answering the same letter.

The board's parser turns many non-answers into a letter ("Answer" → A, "Certainly" → C), so a model
with a letter bias and no knowledge can score near a constant answer. MMLU's gold letters are not
uniform: on the three scored categories of the test split "always D" gets 27.95 Average, above six
published entries. These rows let a reader tell knowledge from answer bias.

The numbers are the evaluation package's: its constant baselines (`metrics.constant_baselines`)
over its shipped copy of the MMLU test split — no second table or reader here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from fedtune.evaluation.dataset import EMBEDDED, LETTERS, load_split
from fedtune.evaluation.metrics import constant_baselines
from fedtune.evaluation.subjects import SCORED_CATEGORIES


@dataclass(frozen=True)
class ReferenceRow:
    """The scores (percent) of always answering `letter`; comm cost is nil (nothing is trained)."""

    letter: str
    stem: float
    social_sciences: float
    humanities: float
    average: float

    @property
    def label(self) -> str:
        """The row's name on the board, e.g. "always D"."""
        return f"always {self.letter}"

    def to_dict(self) -> dict[str, object]:
        """The row as the JSON API returns it."""
        return {
            "letter": self.letter,
            "label": self.label,
            "average": self.average,
            "stem": self.stem,
            "social_sciences": self.social_sciences,
            "humanities": self.humanities,
        }


@lru_cache(maxsize=1)
def _test_questions() -> tuple:
    return tuple(load_split(EMBEDDED, "test"))


def constant_answer_rows() -> list[ReferenceRow]:
    """One reference row per letter, as the evaluation package scores it on the test split
    (micro accuracy per category, unweighted mean of the three scored ones, two decimals)."""
    baselines = constant_baselines(_test_questions())
    rows = []
    for letter in LETTERS:
        board = baselines[letter]["board"]
        rows.append(
            ReferenceRow(
                letter=letter,
                stem=board["stem"],
                social_sciences=board["social_sciences"],
                humanities=board["humanities"],
                average=board["average"],
            )
        )
    return rows


def scored_gold_distribution() -> dict[str, int]:
    """Gold letters over the three scored categories (10,935 questions): what an unbiased model's
    answer-letter distribution should resemble."""
    counts = Counter(q.answer for q in _test_questions() if q.category in SCORED_CATEGORIES)
    return {letter: counts[letter] for letter in LETTERS}

"""Constant-answer reference rows: what a model scores by always answering the same letter.

The board's parser turns many non-answers into a letter ("Answer" → A, "Certainly" → C), so a model
with a letter bias and no knowledge can score near a constant answer. MMLU's gold letters are not
uniform: on the three scored categories of the test split "always D" gets 27.95 Average, above six
published entries. These rows let a reader tell knowledge from answer bias.

The numbers come from the gold-letter counts of the test split below; `count_gold_letters` recounts
them from the MMLU CSVs and a test checks the two agree.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedtune.evaluation.subjects import CATEGORY_SUBJECTS, SCORED_CATEGORIES

LETTERS: tuple[str, ...] = ("A", "B", "C", "D")

# Gold-answer letters per category on the MMLU test split (hendrycks/test CSVs). Sums are the
# board's question counts: 3,153 STEM, 3,077 Social Sciences, 4,705 Humanities.
TEST_GOLD_LETTERS: dict[str, dict[str, int]] = {
    "stem": {"A": 670, "B": 753, "C": 828, "D": 902},
    "social_sciences": {"A": 668, "B": 721, "C": 732, "D": 956},
    "humanities": {"A": 1139, "B": 1153, "C": 1276, "D": 1137},
    "other": {"A": 745, "B": 835, "C": 746, "D": 781},
}


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


def constant_answer_rows(
    gold_letters: Mapping[str, Mapping[str, int]] = TEST_GOLD_LETTERS,
) -> list[ReferenceRow]:
    """One reference row per letter, scored like the board (micro per category, mean of three).

    Args:
        gold_letters: category → letter → number of questions whose gold answer is that letter.
    Returns:
        Rows for A, B, C, D, rounded to the board's two decimals.
    """
    rows = []
    for letter in LETTERS:
        accuracy = {
            category: 100.0 * gold_letters[category][letter] / sum(gold_letters[category].values())
            for category in SCORED_CATEGORIES
        }
        average = sum(accuracy.values()) / len(accuracy)
        rows.append(
            ReferenceRow(
                letter=letter,
                stem=round(accuracy["stem"], 2),
                social_sciences=round(accuracy["social_sciences"], 2),
                humanities=round(accuracy["humanities"], 2),
                average=round(average, 2),
            )
        )
    return rows


def count_gold_letters(test_dir: str | Path) -> dict[str, dict[str, int]]:
    """Count gold letters per category from the MMLU test CSVs (`<subject>_test.csv`, no header).

    Raises:
        FileNotFoundError: a subject's CSV is missing.
    """
    counts: dict[str, dict[str, int]] = {}
    for category, subjects in CATEGORY_SUBJECTS.items():
        counts[category] = dict.fromkeys(LETTERS, 0)
        for subject in subjects:
            with open(Path(test_dir) / f"{subject}_test.csv", newline="", encoding="utf-8") as f:
                for row in csv.reader(f):
                    counts[category][row[5]] += 1
    return counts


def scored_gold_distribution() -> dict[str, int]:
    """Gold letters over the three scored categories (10,935 questions): what an unbiased model's
    answer-letter distribution should resemble."""
    return {
        letter: sum(TEST_GOLD_LETTERS[c][letter] for c in SCORED_CATEGORIES) for letter in LETTERS
    }

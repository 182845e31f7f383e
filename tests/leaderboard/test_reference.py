"""The constant-answer reference rows, recomputed from the MMLU data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedtune.evaluation.dataset import load_split
from fedtune.evaluation.subjects import SCORED_CATEGORIES
from fedtune.leaderboard.reference import constant_answer_rows, scored_gold_distribution

# Gold-answer letters per category of the MMLU test split, counted once by hand from the
# hendrycks/test CSVs: the board's 3,153 STEM, 3,077 Social Sciences, 4,705 Humanities questions.
TEST_GOLD_LETTERS: dict[str, dict[str, int]] = {
    "stem": {"A": 670, "B": 753, "C": 828, "D": 902},
    "social_sciences": {"A": 668, "B": 721, "C": 732, "D": 956},
    "humanities": {"A": 1139, "B": 1153, "C": 1276, "D": 1137},
    "other": {"A": 745, "B": 835, "C": 746, "D": 781},
}


def test_constant_answer_averages():
    rows = {r.letter: r for r in constant_answer_rows()}
    assert {k: r.average for k, r in rows.items()} == {
        "A": 22.39,
        "B": 23.94,
        "C": 25.72,
        "D": 27.95,
    }
    assert (rows["D"].stem, rows["D"].social_sciences, rows["D"].humanities) == (
        28.61,
        31.07,
        24.17,
    )
    assert sum(scored_gold_distribution().values()) == 3153 + 3077 + 4705


def test_shipped_counts_equal_the_evaluation_data():
    # The evaluation package's own copy of the test split (shipped inside fedtune).
    questions = load_split("embedded", "test")
    counted: dict[str, dict[str, int]] = {}
    for q in questions:
        cell = counted.setdefault(q.category, dict.fromkeys("ABCD", 0))
        cell[q.answer] += 1
    assert counted == TEST_GOLD_LETTERS
    # The rows shown, recomputed here from the hand-counted letters alone: answering letter L
    # scores count(L) / questions per category; the average is the three categories' mean.
    for row in constant_answer_rows():
        percent = {
            c: 100 * TEST_GOLD_LETTERS[c][row.letter] / sum(TEST_GOLD_LETTERS[c].values())
            for c in SCORED_CATEGORIES
        }
        for category in SCORED_CATEGORIES:
            assert getattr(row, category) == pytest.approx(percent[category], abs=0.005)
        assert row.average == pytest.approx(sum(percent.values()) / 3, abs=0.005)


# The original MMLU CSVs (not vendored): FEDTUNE_MMLU_CSV, or ../shared/data/mmlu beside the checkout.
MMLU_CSV = (
    Path(
        os.environ.get("FEDTUNE_MMLU_CSV")
        or Path(__file__).resolve().parents[3] / "shared" / "data" / "mmlu"
    )
    / "test"
)


@pytest.mark.skipif(not MMLU_CSV.is_dir(), reason=f"no MMLU CSVs at {MMLU_CSV} (FEDTUNE_MMLU_CSV)")
def test_shipped_counts_equal_the_original_csvs():
    from collections import Counter

    from fedtune.evaluation.dataset import read_csv_dir

    counted = Counter((q.category, q.answer) for q in read_csv_dir(MMLU_CSV.parent, "test"))
    assert {
        c: {letter: counted[c, letter] for letter in "ABCD"} for c in TEST_GOLD_LETTERS
    } == TEST_GOLD_LETTERS

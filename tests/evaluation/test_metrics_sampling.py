"""Metrics arithmetic, deterministic stratified sampling, atomic writes, the progress line."""

from __future__ import annotations

import io
import math

import pytest

from fedtune.evaluation.dataset import Question
from fedtune.evaluation.metrics import Verdict, stderr, summarize
from fedtune.evaluation.progress import ProgressBar
from fedtune.evaluation.results import write_atomically
from fedtune.evaluation.sampling import fixed_subset, proportional_counts, select
from fedtune.evaluation.subjects import SubjectError


def _q(subject, answer, index=0):
    return Question(subject, index, "q", ("a", "b", "c", "d"), answer)


def test_summary_arithmetic():
    verdicts = [
        Verdict(_q("anatomy", "A", 0), "A", True),  # stem 1/2
        Verdict(_q("anatomy", "B", 1), "A", False),
        Verdict(_q("sociology", "C", 0), "C", True),  # social sciences 1/1
        Verdict(_q("philosophy", "D", 0), None, False),  # humanities 0/1
        Verdict(_q("virology", "D", 0), "D", True),  # other: not in the Average
    ]
    summary = summarize(verdicts)
    assert summary["categories"]["stem"]["accuracy"] == 0.5
    assert summary["average"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert summary["weighted_mean"] == pytest.approx(3 / 5)
    assert summary["board"] == {
        "average": 50.0,
        "stem": 50.0,
        "social_sciences": 100.0,
        "humanities": 0.0,
    }
    assert summary["predicted_letters"] == {"A": 2, "B": 0, "C": 1, "D": 1, "none": 1}
    assert summary["subjects"]["anatomy"] == {
        "category": "stem",
        "n": 2,
        "correct": 1,
        "accuracy": 0.5,
        "stderr": math.sqrt(0.25),
    }
    assert summary["constant_baselines"]["D"]["categories"] == {
        "stem": 0.0,
        "social_sciences": 0.0,
        "humanities": 1.0,
        "other": 1.0,
    }
    assert stderr(0.25, 101) == pytest.approx(math.sqrt(0.25 * 0.75 / 100))


def test_sampling_is_seeded_stratified_and_marked_partial():
    first = select(limit_per_subject=3, seed=7)
    assert first.questions == select(limit_per_subject=3, seed=7).questions
    assert first.questions != select(limit_per_subject=3, seed=8).questions
    assert len(first.questions) == 44 * 3 and first.partial and first.available == 10935
    per_subject = {q.subject for q in first.questions}
    assert len(per_subject) == 44
    whole = select(categories=("stem",), subjects=("anatomy",))
    assert len(whole.questions) == 135 and not whole.partial
    sample = select(sample=2000, seed=2024)
    assert len(sample.questions) == 2000 and sample.partial
    professional_law = sum(q.subject == "professional_law" for q in sample.questions)
    assert professional_law == round(2000 * 1534 / 10935)  # proportional to the subject's size
    assert fixed_subset(100, seed=1) == list(select(sample=100, seed=1).questions)


def test_proportional_counts_keep_every_subject():
    counts = proportional_counts({"a": 1000, "b": 10, "c": 5}, 20)
    assert sum(counts.values()) == 20 and min(counts.values()) >= 1
    assert len(select(sample=50).questions) == 50  # 44 subjects at one each, the rest by size


def test_selection_errors():
    with pytest.raises(SubjectError, match="not in the categories"):
        select(categories=("stem",), subjects=("sociology",))
    with pytest.raises(SubjectError, match="at least 1"):
        select(limit_per_subject=0)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(OSError):
        write_atomically(tmp_path, {"a.txt": "x", "missing/b.txt": "y"})
    assert list(tmp_path.iterdir()) == []
    written = write_atomically(tmp_path / "out", {"a.txt": "x", "b.txt": "y"})
    assert sorted(p.name for p in written) == ["a.txt", "b.txt"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt", "b.txt"]


def test_progress_line_shows_rate_and_eta():
    stream = io.StringIO()
    bar = ProgressBar(10, "loglik", stream=stream, interval_s=0)
    bar(4)
    bar.close()
    line = stream.getvalue().splitlines()[-1]
    assert "loglik" in line and "4/10" in line and "q/s" in line and "ETA" in line

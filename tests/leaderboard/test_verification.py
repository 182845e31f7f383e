"""The spot check's plain parts: the secret sample, the letters on both sides, the comparison, the
verdict (no model, no server)."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest

from fedtune.evaluation.prompts import flowertune_inner_prompt
from fedtune.evaluation.subjects import SCORED_CATEGORIES, SUBJECT_CATEGORY
from fedtune.leaderboard.entry import FAILED, HELD, REPRODUCED
from fedtune.leaderboard.verification import (
    NONE,
    VerificationError,
    compare,
    draw_sample,
    question_index,
    regenerated_letters,
    sample_seed,
    submitted_letters,
    verdict,
)


def test_the_sample_is_secret_per_entry_and_stratified():
    seed = sample_seed(b"k" * 32, 20)
    assert seed == sample_seed(b"k" * 32, 20)  # the same entry, the same sample, on every re-run
    assert seed != sample_seed(b"k" * 32, 21) and seed != sample_seed(b"j" * 32, 20)
    sample = draw_sample(seed, 100)
    assert sample == draw_sample(seed, 100)
    assert len(set(sample)) == 300
    per_category = Counter(SUBJECT_CATEGORY[s] for s, _ in sample)
    assert per_category == {c: 100 for c in SCORED_CATEGORIES}
    assert set(sample) != set(draw_sample(sample_seed(b"k" * 32, 21), 100))
    index = question_index()
    assert all(key in index for key in sample)
    # Larger than a category: all of it.
    assert len(draw_sample(seed, 5000)) == 3153 + 3077 + 4705


def _generation_files(outputs):
    questions = question_index().values()
    files = {}
    for category in SCORED_CATEGORIES:
        rows = [
            {"prompt": flowertune_inner_prompt(q), "gold": q.answer, "subset": q.subject,
             "output": outputs.get((q.subject, q.index), "")}
            for q in questions
            if q.category == category
        ]  # fmt: skip
        files[category] = gzip.compress(json.dumps(rows).encode())
    return files


def test_letters_as_the_board_reads_them_on_both_sides():
    sample = draw_sample(sample_seed(b"s" * 32, 1), 2)
    a, b, c = sample[:3]
    outputs = {a: "B. because", b: "The answer is C", c: "d"}  # the parser: B, none, D
    files = _generation_files(outputs)
    formats = {category: "generations" for category in files}
    letters = submitted_letters(files, formats, sample)
    assert (letters[a], letters[b], letters[c]) == ("B", NONE, "D")
    assert all(letters[k] == NONE for k in sample[3:])  # empty outputs read no letter
    answers = [{"subset": s, "index": i, "output": outputs.get((s, i), "")} for s, i in sample]
    assert regenerated_letters("flowertune", answers, sample) == letters
    loglik = [{"subset": s, "index": i, "predicted": "A"} for s, i in sample]
    assert set(regenerated_letters("loglik", loglik, sample).values()) == {"A"}


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda rows: rows[:-1], "one per sampled question"),
        (lambda rows: rows[:-1] + rows[:1], "not a sampled question"),
        (lambda rows: [{**rows[0], "index": 10**6}] + rows[1:], "not a sampled question"),
        (lambda rows: [{**rows[0], "predicted": "E"}] + rows[1:], "A–D or none"),
        (lambda rows: [{**rows[0], "extra": 1}] + rows[1:], "expected {subset, index"),
        (lambda rows: "not a list", "one per sampled question"),
    ],
)
def test_a_verifiers_answers_must_be_the_sample(change, reason):
    sample = draw_sample(sample_seed(b"s" * 32, 2), 3)
    rows = [{"subset": s, "index": i, "predicted": "A"} for s, i in sample]
    with pytest.raises(VerificationError, match=reason):
        regenerated_letters("loglik", change(rows), sample)


def test_comparison_counts_and_verdict():
    sample = draw_sample(sample_seed(b"c" * 32, 3), 10)  # 30 questions
    gold = {k: question_index()[k].answer for k in sample}
    other = {k: "A" if g != "A" else "B" for k, g in gold.items()}  # always wrong
    regenerated = {k: NONE if n < 20 else other[k] for n, k in enumerate(sample)}
    submitted = dict(regenerated)
    for key in sample[:3]:  # three answers edited to the gold letter
        submitted[key] = gold[key]
    result = compare(submitted, regenerated, sample)
    assert (result.sampled, result.agreed) == (30, 27)
    assert (result.submitted_correct, result.regenerated_correct) == (3, 0)
    assert (result.lettered, result.lettered_agreed) == (13, 10)  # 20 none on both sides but 3
    assert [d[:2] for d in result.disagreements] == list(sample[:3])
    assert verdict(result, 0.9, 50.0, 74.25) == REPRODUCED  # 0.9 = 27/30: at the threshold
    assert verdict(result, 0.91, 50.0, 74.25) == FAILED
    assert verdict(result, 0.9, 80.0, 74.25) == HELD

"""Scores the board computes itself: a submission's generation files re-scored with the official
parser against the shipped MMLU test split, kept, served and re-checkable; claims that disagree are
refused; self-reported scores are shown but never ranked."""

from __future__ import annotations

import base64
import copy
import gzip
import json
import sqlite3
from pathlib import Path

import pytest

from fedtune.cli import main
from fedtune.evaluation.rescore import GenerationFileError, decompress, read_generations
from fedtune.leaderboard.entry import PENDING, PUBLISHED, REPRODUCED, SUBMITTED
from fedtune.leaderboard.ranking import board_rows
from fedtune.leaderboard.validation import (
    SubmissionError,
    check_submission,
    recheck,
    rescore_generations,
)

from .lb_submissions import admit, generation_files, make_submission, predictions_file

pytestmark = pytest.mark.unit

PUBLISHED_FILES = Path(__file__).resolve().parents[1] / "fixtures" / "flowertune-generations"
CORRECT = (1500, 1800, 2500)


def _rows(category: str, correct=CORRECT) -> list[dict[str, str]]:
    return json.loads(gzip.decompress(generation_files(correct)[category]))


def _with_rows(category: str, rows, base=None) -> dict:
    payload = copy.deepcopy(base or make_submission(correct=CORRECT, generations=True))
    packed = gzip.compress(json.dumps(rows).encode(), mtime=0)
    payload["generations"][category] = base64.b64encode(packed).decode()
    return payload


def test_the_entry_is_scored_from_its_files_not_from_its_claims():
    payload = make_submission(correct=CORRECT, generations=True)
    # A claim rounded to the board's two decimals is accepted; what is stored is the exact score.
    payload["scores"] = {k: round(v, 2) for k, v in payload["scores"].items()}
    checked = check_submission(payload)
    entry = checked.entry
    # Re-scored, with an adapter to re-generate from: it waits for a verifier, unranked.
    assert entry.status == PENDING and not entry.ranked
    assert entry.stem == 100 * 1500 / 3153 and entry.social_sciences == 100 * 1800 / 3077
    assert entry.humanities == 100 * 2500 / 4705
    assert entry.average == (entry.stem + entry.social_sciences + entry.humanities) / 3
    evaluation = entry.details["evaluation"]
    assert evaluation["protocol"] == "flowertune" and evaluation["shots"] == 0
    assert sum(s["total"] for s in evaluation["subjects"].values()) == 10935
    assert sum(s["correct"] for s in evaluation["subjects"].values()) == sum(CORRECT)
    assert sum(evaluation["answer_distribution"].values()) == 10935
    assert set(evaluation["rescored"]) == {"stem", "social_sciences", "humanities"}
    assert checked.generations == generation_files(CORRECT)  # kept as received (gzip)
    # Without any claim the files alone make the entry.
    del payload["scores"], payload["evaluation"]
    assert check_submission(payload).entry.average == entry.average


@pytest.mark.parametrize(
    ("path", "value", "field", "reason"),
    [
        ("scores.stem", 47.59, "scores.stem", "the generation files give 47.5737 (1,500/3,153"),
        ("scores.humanities", 100.0, "scores.humanities", "claimed 100.0"),
        (
            "evaluation.subjects",
            {"abstract_algebra": {"correct": 100, "total": 100}},
            "evaluation.subjects.",
            "the generation files give",
        ),
        (
            "evaluation.answer_distribution",
            {"A": 10935},
            "evaluation.answer_distribution",
            "the generation files give",
        ),
        ("evaluation.protocol", "loglik", "evaluation.protocol", "zero-shot outputs"),
        ("evaluation.shots", 5, "evaluation.protocol", "with 5 shots"),
    ],
)
def test_claims_that_disagree_with_the_files_are_refused(path, value, field, reason):
    payload = make_submission(correct=CORRECT, generations=True)
    section, key = path.split(".")
    payload[section][key] = value
    with pytest.raises(SubmissionError) as caught:
        check_submission(payload)
    assert caught.value.field.startswith(field) and reason in caught.value.reason


def _swap_prompt(rows):
    rows[7]["prompt"] = rows[7]["prompt"].replace("Options:", "Choices:")
    return rows


def _wrong_gold(rows):
    rows[3]["gold"] = "ABCD"[("ABCD".index(rows[3]["gold"]) + 1) % 4]
    return rows


def _twice(rows):
    rows[5] = dict(rows[4])
    return rows


def _foreign(rows):
    rows[0] = dict(_rows("humanities")[0])
    return rows


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (_swap_prompt, "not one of the test split's questions"),
        (_wrong_gold, "the test split says"),
        (_twice, "answers a question twice"),
        (lambda rows: rows[:-10], "10 of the stem test questions are not answered"),
        (_foreign, "a humanities subject, not stem"),
        (lambda rows: [*rows, {"prompt": 1}], "not an object with string fields"),
        (lambda rows: [], "expected a non-empty JSON array"),
    ],
)
def test_files_that_are_not_the_test_split_are_refused(tamper, reason):
    payload = _with_rows("stem", tamper(_rows("stem")))
    with pytest.raises(SubmissionError) as caught:
        check_submission(payload)
    assert caught.value.field == "generations.stem" and reason in caught.value.reason


@pytest.mark.parametrize(
    ("value", "field", "reason"),
    [
        ({"stem": "x"}, "generations.social_sciences", "missing"),
        ({"other": "eA=="}, "generations.other", "not a scored category"),
        ({"stem": "@@@"}, "generations.stem", "not valid base64"),
        ({"stem": 12}, "generations.stem", "must be the file in base64"),
        ("text", "generations", "must be a JSON object"),
    ],
)
def test_malformed_generations_are_refused(value, field, reason):
    payload = make_submission(correct=CORRECT, generations=True)
    if isinstance(value, dict) and "stem" in value and value["stem"] == "x":
        value = {"stem": payload["generations"]["stem"]}
    payload["generations"] = value
    with pytest.raises(SubmissionError) as caught:
        check_submission(payload)
    assert caught.value.field == field and reason in caught.value.reason


def test_gzip_that_is_corrupt_truncated_padded_or_a_bomb_is_refused():
    packed = generation_files(CORRECT)["stem"]
    for raw, reason in [
        (packed[:1000], "truncated gzip"),
        (packed + gzip.compress(b"[]"), "data after the end"),
        (packed[:20] + b"\x00" * 50 + packed[70:], "not valid gzip"),
    ]:
        with pytest.raises(GenerationFileError, match=reason):
            decompress(raw, "f")
    bomb = gzip.compress(b"[" + b" " * 5_000_000 + b"]")
    assert len(bomb) < 10_000
    with pytest.raises(GenerationFileError, match="expands to over 1,000,000 bytes"):
        decompress(bomb, "f", max_bytes=1_000_000)


def test_the_published_files_pass_the_checks_and_give_the_published_scores():
    # T-IoI@UNR's SmolLM2-135M-Instruct (board rank 14: STEM 18.68, Social Sciences 21.90),
    # as their repository publishes the official evaluation's output.
    folder = PUBLISHED_FILES / "tni_smol135i"
    files = {
        c: (folder / f"generation_mmlu_{c}.jsonl.gz").read_bytes()
        for c in ("stem", "social_sciences")
    }
    files["humanities"] = generation_files(CORRECT)["humanities"]  # not published (over 4 MiB)
    rescored = rescore_generations(files)
    assert round(100 * rescored["stem"].result.accuracy, 2) == 18.68
    assert round(100 * rescored["social_sciences"].result.accuracy, 2) == 21.90
    official = (folder / "acc_mmlu_stem.txt").read_text()
    assert rescored["stem"].result.official_line().strip() == official.strip()
    assert len(read_generations(folder / "generation_mmlu_stem.jsonl.gz")) == 3153


def test_unranked_entries_follow_every_ranked_row(store):
    claims = check_submission(make_submission("Claims", correct=(3153, 3077, 4705))).entry
    rescored = check_submission(make_submission("Files", correct=CORRECT, generations=True))
    assert claims.status == SUBMITTED and not claims.ranked
    ids = {
        "claims": store.add(claims),
        "files": admit(store, rescored),
    }
    rows = [r for r in board_rows(store.entries(details=False)) if r.entry is not None]
    assert [r.rank for r in rows] == [*range(1, 21), None]
    assert rows[-1].entry.id == ids["claims"] and rows[-1].cells()["Rank"] == "—"
    assert any(r.entry.id == ids["files"] and r.rank is not None for r in rows)
    assert store.get(ids["claims"]).status == SUBMITTED
    assert store.get(ids["files"]).status == REPRODUCED
    assert all(e.status == PUBLISHED for e in store.entries() if e.id not in ids.values())


def test_the_board_recomputes_what_it_shows_and_notices_tampering(store, tmp_path, capsys):
    checked = check_submission(make_submission("Files", correct=CORRECT, generations=True))
    entry_id = store.add(checked.entry, generations=checked.generations)
    assert store.generations(entry_id) == checked.generations
    assert recheck(store.get(entry_id), store.generations(entry_id)) == []
    data = ["--data-dir", str(store.path.parent)]
    assert main(["leaderboard", "rescore", *data]) == 0
    assert "the held files re-score to the numbers shown" in capsys.readouterr().out
    # Someone edits the held file in the database: the numbers no longer follow from it.
    rows = _rows("stem")
    rows[0]["output"] = "Z"  # a right answer made wrong
    tampered = gzip.compress(json.dumps(rows).encode())
    with sqlite3.connect(store.path) as db:
        db.execute(
            "UPDATE generations SET content = ? WHERE entry_id = ? AND category = 'stem'",
            (tampered, entry_id),
        )
    assert main(["leaderboard", "rescore", str(entry_id), *data]) == 1
    out = capsys.readouterr().out
    assert "DIFFERS" in out and "stem: shows" in out and "file sha256" in out
    # Deleting the entry deletes its files.
    store.delete(entry_id, "test", "tests")
    assert store.generations(entry_id) == {}


# --- the loglik protocol's per-question predictions --------------------------------------------


def _prediction_rows(correct=CORRECT):
    return [json.loads(line) for line in gzip.decompress(predictions_file(correct)).splitlines()]


def _with_predictions(rows):
    payload = make_submission(correct=CORRECT, predictions=True)
    packed = gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())
    payload["predictions"] = base64.b64encode(packed).decode()
    return payload


def test_predictions_are_recounted_against_the_split(store):
    payload = make_submission(correct=CORRECT, predictions=True)
    checked = check_submission(payload)
    entry = checked.entry
    assert entry.status == PENDING and not entry.ranked
    assert entry.stem == 100 * 1500 / 3153 and entry.humanities == 100 * 2500 / 4705
    evaluation = entry.details["evaluation"]
    assert evaluation["protocol"] == "loglik" and evaluation["shots"] == 5
    assert {v["format"] for v in evaluation["rescored"].values()} == {"predictions"}
    assert sum(s["total"] for s in evaluation["subjects"].values()) == 10935  # "other" left out
    entry_id = store.add(entry, generations=checked.generations)
    assert recheck(store.get(entry_id), store.generations(entry_id)) == []
    payload["scores"]["stem"] += 1
    with pytest.raises(SubmissionError, match="the generation files give|claimed"):
        check_submission(payload)


def _prediction_twice(rows):
    rows[5] = dict(rows[4])
    return rows


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (
            lambda rows: [
                {**rows[0], "gold": "ABCD"[("ABCD".index(rows[0]["gold"]) + 1) % 4]},
                *rows[1:],
            ],
            "the test split says",
        ),  # fmt: skip
        (_prediction_twice, "answers a question twice"),
        (lambda rows: rows[1:], "partial evaluation"),
        (lambda rows: [{**rows[0], "index": 99999}, *rows[1:]], "is not a test-split question"),
        (lambda rows: [{**rows[0], "predicted": "E"}, *rows[1:]], "is not {subset"),
        (lambda rows: [{**rows[0], "index": True}, *rows[1:]], "is not {subset"),
        (lambda rows: [], "no predictions"),
    ],
)
def test_predictions_that_are_not_the_test_split_are_refused(tamper, reason):
    with pytest.raises(SubmissionError) as caught:
        check_submission(_with_predictions(tamper(_prediction_rows())))
    assert caught.value.field == "predictions" and reason in caught.value.reason


def test_predictions_need_the_loglik_protocol_and_come_alone():
    payload = make_submission(correct=CORRECT, predictions=True)
    payload["evaluation"]["protocol"] = "flowertune"
    with pytest.raises(SubmissionError, match="'loglik' protocol's outputs"):
        check_submission(payload)
    both = make_submission(correct=CORRECT, predictions=True, generations=True)
    with pytest.raises(SubmissionError, match="not both"):
        check_submission(both)
    official = make_submission(correct=CORRECT, predictions=True, track="general-nlp")
    with pytest.raises(SubmissionError, match="General NLP requires the official"):
        check_submission(official)

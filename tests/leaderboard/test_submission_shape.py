"""A submission's shape and ranges are its types (`fedtune.leaderboard.submission`), checked by a
strict pydantic adapter: no coercion, no unknown key, every required key, every range; each refusal
names the field."""

from __future__ import annotations

import copy

import pytest

from fedtune.leaderboard.submission import PAYLOAD, SubmissionPayload
from fedtune.leaderboard.validation import SubmissionError, check_submission

from .lb_submissions import make_submission


def _changed(path: tuple[str | int, ...], value) -> dict:
    """A copy of a valid submission with the field at `path` set to `value` (... deletes it)."""
    payload = copy.deepcopy(make_submission())
    target = payload
    for part in path[:-1]:
        target = target[part]
    if value is ...:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return payload


def _refusal(payload) -> SubmissionError:
    with pytest.raises(SubmissionError) as info:
        check_submission(payload, today="2026-11-28")
    return info.value


def test_a_valid_submission_passes_the_types_unchanged():
    payload = make_submission()
    assert PAYLOAD.validate_python(copy.deepcopy(payload)) == payload
    for files in ({"generations": True}, {"predictions": True}):
        with_files = make_submission(**files)
        assert PAYLOAD.validate_python(copy.deepcopy(with_files)) == with_files
    assert check_submission(payload).entry.team == "Team A"


WRONG_TYPES = [
    # No coercion: a number is not read from a string, a count from a float or a bool.
    (("scores", "stem"), "47.5", "scores.stem", "a number"),
    (("communication", "total_bytes"), "1000", "communication.total_bytes", "an integer"),
    (("communication", "total_bytes"), 1000.0, "communication.total_bytes", "an integer"),
    (("setup", "num_clients"), True, "setup.num_clients", "an integer, got true"),
    (("rounds", 1, "uplink_bytes"), False, "rounds[1].uplink_bytes", "an integer"),
    (("rounds", 0, "train_loss"), "2.0", "rounds[0].train_loss", "a number"),
    (("rounds", 0, "heldout_loss"), "1.9", "rounds[0].heldout_loss", "a number"),
    (("evaluation", "subjects", "anatomy", "total"), 166.0, "evaluation.subjects.anatomy.total",
     "an integer"),
    (("team",), 7, "team", "a string, got 7"),
    (("scores",), [50.0, 50.0, 50.0], "scores", "a JSON object, got a list"),
    (("rounds",), {"round": 1}, "rounds", "a list"),
    (("adapter", "config"), "LORA", "adapter.config", "a JSON object"),
    (("evaluation", "answer_distribution", "A"), 1.5, "evaluation.answer_distribution.A",
     "an integer"),
]  # fmt: skip

OUT_OF_RANGE = [
    (("scores", "average"), 100.01, "scores.average", "not a percentage in [0, 100]"),
    (("scores", "stem"), -0.5, "scores.stem", "not a percentage in [0, 100]"),
    (("communication", "downlink_bytes"), -1, "communication.downlink_bytes", "-1 is below 0"),
    (("rounds", 2, "round"), 0, "rounds[2].round", "0 is below 1"),
    (("rounds", 1, "heldout_loss"), -0.5, "rounds[1].heldout_loss", "below 0"),
    (("rounds", 1, "heldout_loss"), float("nan"), "rounds[1].heldout_loss", "finite"),
    (("setup", "rounds"), 2**63, "setup.rounds", "too large"),
    (("evaluation", "subjects", "anatomy", "total"), 0, "evaluation.subjects.anatomy.total",
     "below 1"),
    (("evaluation", "extra"), {"x": float("inf")}, "evaluation.extra.x", "finite"),
    (("team",), "x" * 101, "team", "101 characters; at most 100"),
    (("rounds",), [{"round": 1, "downlink_bytes": 0, "uplink_bytes": 0}] * 5001, "rounds",
     "5,001 items; at most 5,000"),
]  # fmt: skip

UNKNOWN_KEYS = [
    (("score",), 50.0, "score", "allowed: adapter, base_model, code_url"),
    (("scores", "other"), 50.0, "scores.other", "allowed: average, humanities, social_sciences, stem"),
    (("rounds", 0, "loss"), 1.0, "rounds[0].loss", "allowed: clients, downlink_bytes, heldout_loss, round"),
    (("evaluation", "subjects", "anatomy", "wrong"), 1, "evaluation.subjects.anatomy.wrong",
     "allowed: correct, total"),
    (("setup", "seed"), 1, "setup.seed", "unknown field"),
]  # fmt: skip

MISSING_KEYS = [
    (("team",), "team"),
    (("code_url",), "code_url"),
    (("communication",), "communication"),
    (("communication", "total_bytes"), "communication.total_bytes"),
    (("scores", "humanities"), "scores.humanities"),
    (("rounds", 1, "round"), "rounds[1].round"),
    (("evaluation", "subjects", "anatomy", "correct"), "evaluation.subjects.anatomy.correct"),
]


@pytest.mark.parametrize(
    ("path", "value", "field", "reason"),
    WRONG_TYPES + OUT_OF_RANGE + UNKNOWN_KEYS,
    ids=[
        ".".join(map(str, r[0])) + f"={r[1]!r}"[:40]
        for r in WRONG_TYPES + OUT_OF_RANGE + UNKNOWN_KEYS
    ],
)
def test_a_shape_the_types_do_not_allow_is_refused_naming_the_field(path, value, field, reason):
    error = _refusal(_changed(path, value))
    assert error.field == field, error
    assert reason in error.reason, error
    assert str(error) == f"{field}: {error.reason}"


@pytest.mark.parametrize(("path", "field"), MISSING_KEYS, ids=[m[1] for m in MISSING_KEYS])
def test_a_missing_required_key_is_refused_naming_it(path, field):
    error = _refusal(_changed(path, ...))
    assert (error.field, error.reason) == (field, "missing")


def test_the_first_of_several_problems_is_named():
    payload = _changed(("scores", "stem"), "high")
    payload["communication"]["total_bytes"] = -1
    error = _refusal(payload)
    assert error.field == "scores.stem" and "a number" in error.reason


def test_optional_keys_may_be_left_out():
    payload = make_submission(track="open")
    for key in ("date", "adapter", "setup", "provenance", "config"):
        del payload[key]
    del payload["evaluation"]["answer_distribution"], payload["evaluation"]["split"]
    del payload["communication"]["downlink_bytes"], payload["communication"]["uplink_bytes"]
    for record in payload["rounds"]:
        del record["train_loss"], record["clients"]
    entry = check_submission(payload, today="2026-11-28").entry
    assert entry.date == "2026-11-28" and entry.details["rounds"][0]["train_loss"] is None
    assert entry.details["provenance"] == {} and entry.details["adapter"] == {}


def test_every_key_the_types_declare_is_what_a_refusal_allows():
    from typing import get_type_hints

    error = _refusal(_changed(("sneaky",), 1))
    declared = sorted(get_type_hints(SubmissionPayload))
    assert error.reason == f"unknown field; allowed: {', '.join(declared)}"

"""Submission validation: what is accepted, and every refusal names the field and the reason."""

from __future__ import annotations

import copy

import pytest

from fedtune.leaderboard.validation import SubmissionError, validate_submission

from .lb_submissions import make_submission


def test_a_well_formed_submission_becomes_an_entry():
    entry = validate_submission(make_submission("Team A", correct=(1500, 1800, 2500)))
    assert entry.status == "submitted" and entry.track == "open"
    assert entry.stem == pytest.approx(100 * 1500 / 3153)
    assert entry.average == pytest.approx(
        (entry.stem + entry.social_sciences + entry.humanities) / 3
    )
    assert entry.details["evaluation"]["protocol"] == "flowertune"
    assert len(entry.details["evaluation"]["subjects"]) == 44
    assert sum(r["downlink_bytes"] + r["uplink_bytes"] for r in entry.details["rounds"]) == (
        entry.comm_bytes
    )


def test_general_nlp_accepts_the_official_setup():
    entry = validate_submission(make_submission(track="general-nlp"))
    assert entry.track == "general-nlp"


def test_html_in_a_team_name_is_kept_as_text():
    # Accepted as data; every renderer escapes it (tested in test_api and test_render).
    entry = validate_submission(make_submission("<script>alert(1)</script>"))
    assert entry.team == "<script>alert(1)</script>"


def _with(path: str, value, base=None):
    """A copy of a valid submission with one (dotted) field set; value ... deletes it."""
    payload = copy.deepcopy(base or make_submission())
    *parents, last = path.split(".")
    target = payload
    for part in parents:
        target = target[part]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return payload


def _partial() -> dict:
    payload = make_submission()
    del payload["evaluation"]["subjects"]["machine_learning"]
    return payload


def _fewer_questions() -> dict:
    payload = make_submission()
    payload["evaluation"]["subjects"]["anatomy"]["total"] -= 10
    return payload


def _rounds_off() -> dict:
    payload = make_submission()
    payload["rounds"][0]["uplink_bytes"] += 1
    return payload


TOTAL = "communication.total_bytes"
REFUSALS = [
    ("missing team", _with("team", ...), "team", "missing"),
    ("empty team", _with("team", "   "), "team", "empty"),
    ("long team", _with("team", "x" * 101), "team", "at most 100"),
    ("control char", _with("team", "bad\x1b[31mname"), "team", "control character"),
    ("bidi override", _with("team", "abc\u202edcb"), "team", "control character"),
    ("line separator", _with("team", "two\u2028lines"), "team", "line break U+2028"),
    ("paragraph separator", _with("team", "two\u2029parts"), "team", "line break U+2029"),
    ("variation selector", _with("team", "Team\ufe0f"), "team", "invisible character U+FE0F"),
    ("zero-width joiner", _with("team", "\U0001f468\u200d\U0001f4bb"), "team", "U+200D"),
    ("braille blank", _with("base_model", "Qwen\u2800"), "base_model", "U+2800"),
    ("Hangul filler", _with("evaluation.protocol", "flowertune\u3164"), "evaluation.protocol",
     "U+3164 (HANGUL FILLER)"),
    ("invisible in a url", _with("code_url", "https://x.org/a\u034f"), "code_url", "U+034F"),
    ("invisible in setup", _with("setup.dataset", "d\U000e0061"), "setup.dataset", "U+E0061"),
    ("invisible in a config key", _with("config", {"lr\u115f": 1}), "config key", "U+115F"),
    ("invisible in provenance", _with("provenance", {"commit": "abc\uffa0"}),
     "provenance.commit", "U+FFA0"),
    ("missing scores", _with("scores", ...), "scores", "JSON object"),
    ("accuracy over 100", _with("scores.stem", 100.5), "scores.stem", "percentage"),
    ("negative accuracy", _with("scores.humanities", -1), "scores.humanities", "percentage"),
    ("NaN accuracy", _with("scores.stem", float("nan")), "scores.stem", "finite"),
    ("string accuracy", _with("scores.stem", "47"), "scores.stem", "number"),
    ("huge integer accuracy", _with("scores.stem", 10**400), "scores.stem", "401 digits"),
    ("huge negative accuracy", _with("scores.average", -(10**400)), "scores.average", "range"),
    ("huge integer loss", _with("rounds", [{"round": 1, "train_loss": 10**400,
     "downlink_bytes": 0, "uplink_bytes": 0}]), "rounds[0].train_loss", "range"),
    ("huge integer figure", _with("evaluation.extra", {"stderr": 10**400}),
     "evaluation.extra.stderr", "range"),
    ("huge integer in config", _with("config", {"seed": -(10**400)}), "config.seed", "range"),
    ("huge integer bytes", _with(TOTAL, 10**400), TOTAL, "too large"),
    ("average not the mean", _with("scores.average", 60.0), "scores.average", "mean"),
    ("negative bytes", _with(TOTAL, -5), TOTAL, "below"),
    ("zero bytes", _with(TOTAL, 0), TOTAL, "below"),
    ("float bytes", _with(TOTAL, 1.5), TOTAL, "integer"),
    ("down+up", _with("communication.uplink_bytes", 7), TOTAL, "downlink + uplink"),
    ("rounds do not add up", _rounds_off(), "rounds", "sum to"),
    ("javascript url", _with("code_url", "javascript:alert(1)"), "code_url", "http(s)"),
    ("quote in url", _with("code_url", 'https://x.org/"onmouseover="x'), "code_url", "http(s)"),
    ("unknown field", _with("sneaky", 1), "sneaky", "unknown field"),
    ("unknown track", _with("track", "closed"), "track", "one of"),
    ("partial: subject missing", _partial(), "evaluation.subjects", "partial evaluation"),
    ("partial: fewer questions", _fewer_questions(), "evaluation.subjects", "partial evaluation"),
    ("not a subject", _with("evaluation.subjects.astrology", {"correct": 1, "total": 2}),
     "evaluation.subjects.astrology", "not an MMLU subject"),
    ("scores vs counts", _with("scores.stem", 40.0), "scores.stem", "disagrees"),
    ("more correct than asked", _with("evaluation.subjects.anatomy.correct", 10_000),
     "evaluation.subjects.anatomy", "correct out of"),
    ("validation split", _with("evaluation.split", "validation"), "evaluation.split", "test split"),
    ("letters do not add up", _with("evaluation.answer_distribution", {"A": 5}),
     "evaluation.answer_distribution", "sum to"),
    ("future date", _with("date", "2999-01-01"), "date", "future"),
    ("bad date", _with("date", "28.11.26"), "date", "ISO"),
    ("bad sha", _with("adapter.sha256", "xyz"), "adapter.sha256", "hex"),
    ("deep provenance", _with("provenance", {"a": {"b": {"c": {"d": 1}}}}), "provenance.a.b.c",
     "deeply"),
    ("not an object", [1, 2, 3], "", "must be a JSON object"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("payload", "field", "reason"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_refusals_name_the_field_and_reason(payload, field, reason):
    with pytest.raises(SubmissionError) as info:
        validate_submission(payload, today="2026-11-28")
    assert info.value.field == field
    assert reason in info.value.reason


GENERAL_NLP_BREAKS = [
    ("embedded sample data", "setup.dataset", "embedded:alpaca-gpt4-sample", "Alpaca-GPT4"),
    ("another data set", "setup.dataset", "databricks/dolly-15k", "Alpaca-GPT4"),
    ("10 clients", "setup.num_clients", 10, "20 clients"),
    ("another protocol", "evaluation.protocol", "letter-logits", "official"),
]


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [r[1:] for r in GENERAL_NLP_BREAKS],
    ids=[r[0] for r in GENERAL_NLP_BREAKS],
)
def test_general_nlp_rules_and_the_open_track(path, value, reason):
    general = _with(path, value, make_submission(track="general-nlp"))
    with pytest.raises(SubmissionError) as info:
        validate_submission(general)
    assert info.value.field == path
    assert reason in info.value.reason and "--track open" in info.value.reason
    # The same setup is welcome on the open track.
    assert validate_submission(_with("track", "open", general)).track == "open"


def test_general_nlp_needs_the_setup_recorded():
    payload = make_submission(track="general-nlp")
    del payload["setup"]
    with pytest.raises(SubmissionError, match="Alpaca-GPT4"):
        validate_submission(payload)


def test_stored_scores_are_the_counts_never_the_claim():
    # A claim may be off by the board's rounding; adding 0.0099 to each score wins nothing.
    payload = make_submission("Tie Breaker", correct=(1500, 1800, 2500))
    exact = validate_submission(copy.deepcopy(payload))
    payload["scores"] = {k: v + 0.0099 for k, v in payload["scores"].items()}
    padded = validate_submission(payload)
    assert (padded.stem, padded.social_sciences, padded.humanities, padded.average) == (
        exact.stem,
        exact.social_sciences,
        exact.humanities,
        exact.average,
    )
    assert padded.stem == 100 * 1500 / 3153


def test_a_dp_claim_is_recomputed_and_a_wrong_epsilon_refused():
    from types import SimpleNamespace

    from fedtune.federation.privacy import privacy_spent

    dp = SimpleNamespace(noise="server", noise_multiplier=1.1, clipping_norm=0.05, delta=1e-5,
                         accounting="without-replacement")  # fmt: skip
    epsilon = privacy_spent(dp, 20, [2, 2, 1])["epsilon"]
    privacy = {**vars(dp), "releases": [2, 2, 1], "epsilon": epsilon}
    payload = make_submission(rounds=3)
    payload["setup"]["privacy"] = privacy
    entry = validate_submission(payload)
    assert entry.details["setup"]["privacy"]["epsilon"] == epsilon
    # What an accountant given the multiplier σ (not σ/2: replace-one moves the sum by 2C) claims.
    from dp_accounting import dp_event
    from dp_accounting.privacy_accountant import NeighboringRelation
    from dp_accounting.rdp import RdpAccountant

    ledger = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    for n, count in ((2, 2), (1, 1)):
        gaussian = dp_event.GaussianDpEvent(1.1)
        ledger.compose(dp_event.SampledWithoutReplacementDpEvent(20, n, gaussian), count)
    stale = ledger.get_epsilon(1e-5)
    assert 0 < stale < epsilon / 2
    refusals = [
        ({"epsilon": epsilon * 0.9}, "setup.privacy.epsilon", "the accountant gives"),
        ({"epsilon": stale}, "setup.privacy.epsilon", "the accountant gives"),
        ({"releases": [2, 2]}, "setup.privacy.releases", "one release per round"),
        ({"releases": [3, 2, 1]}, "setup.privacy.releases", "at most the clients"),
        ({"noise": "nobody"}, "setup.privacy.noise", "must be one of"),
        ({"noise_multiplier": 0.0}, "setup.privacy.epsilon", "send null"),
        ({"noise": "client"}, "setup.privacy.accounting", "amplification needs"),
        ({"secret": 1}, "setup.privacy", "unknown"),
        ({"noise_multiplier": 1e300}, "setup.privacy", "noise_multiplier <= 1e+06"),
    ]
    for change, field, reason in refusals:
        bad = make_submission(rounds=3)
        bad["setup"]["privacy"] = {**privacy, **change}
        with pytest.raises(SubmissionError) as info:
            validate_submission(bad)
        assert info.value.field.startswith(field) and reason in str(info.value), (
            change,
            info.value,
        )
    no_rounds = make_submission(rounds=3)
    no_rounds["setup"]["privacy"] = privacy
    del no_rounds["rounds"]
    with pytest.raises(SubmissionError, match="recomputed"):
        validate_submission(no_rounds)

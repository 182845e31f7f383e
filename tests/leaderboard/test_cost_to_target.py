"""Cost-to-Target on the board: entries carry their held-out loss by round; with the operator's
target the board shows and sorts each entry's bytes to reach it, and the entry page says it."""

from __future__ import annotations

import pytest

from fedtune.leaderboard.ranking import board_rows, bytes_to_target, round_curve
from fedtune.leaderboard.runs import build_submission
from fedtune.leaderboard.submission import PAYLOAD
from fedtune.leaderboard.validation import validate_submission
from fedtune.leaderboard.web.pages import board_page, entry_page

from .lb_rundir import make_run_dir

pytestmark = pytest.mark.unit


def _with_curve(submission, team: str, losses: list[float | None]) -> dict:
    """A submission whose rounds carry `losses` (1,500 bytes a round) and add up."""
    rounds = _rounds(losses)
    down = sum(r["downlink_bytes"] for r in rounds)
    up = sum(r["uplink_bytes"] for r in rounds)
    communication = {"total_bytes": down + up, "downlink_bytes": down, "uplink_bytes": up}
    return submission(team, rounds=len(rounds)) | {"rounds": rounds, "communication": communication}


def _rounds(losses: list[float | None], per_round: int = 1000) -> list[dict]:
    return [
        {"round": r, "downlink_bytes": per_round, "uplink_bytes": per_round // 2,
         **({"heldout_loss": loss} if loss is not None else {})}
        for r, loss in enumerate(losses, start=1)
    ]  # fmt: skip


def test_a_run_submits_its_held_out_loss_where_it_scored_one(tmp_path):
    run = make_run_dir(tmp_path, rounds=4, heldout_every=2)
    payload = build_submission(run, team="T", code_url="https://example.org/x", track="open")
    PAYLOAD.validate_python(payload)  # the board's types accept it
    assert [r.get("heldout_loss") for r in payload["rounds"]] == [None, 2.3, None, 2.1]
    assert "heldout_loss" not in payload["rounds"][0]  # absent, not null, where none was scored
    plain = build_submission(make_run_dir(tmp_path, name="plain"), team="T",
                             code_url="https://example.org/x", track="open")  # fmt: skip
    assert all("heldout_loss" not in r for r in plain["rounds"])


def test_bytes_to_target_counts_every_round_up_to_the_first_that_reached_it():
    rounds = _rounds([None, 2.4, None, 2.1, 2.2])  # 1,500 bytes a round
    assert [(p.round, p.bytes) for p in round_curve(rounds)] == [(2, 3000), (4, 6000), (5, 7500)]
    assert bytes_to_target(rounds, 2.4) == 3000
    assert bytes_to_target(rounds, 2.15) == 6000
    assert bytes_to_target(rounds, 2.0) is None
    assert bytes_to_target(_rounds([None, None]), 9.9) is None  # no curve: no cost


def test_the_store_hands_the_board_only_the_curves_it_has(store, submission):
    with_curve = store.add(validate_submission(_with_curve(submission, "curve", [2.5, 2.2])))
    store.add(validate_submission(submission("none", rounds=2)))
    curves = store.round_curves()
    assert list(curves) == [with_curve]
    assert bytes_to_target(curves[with_curve], 2.3) == 3000


def test_the_board_and_the_entry_page_show_bytes_to_target(store, submission):
    cheap = store.add(validate_submission(_with_curve(submission, "cheap", [2.5, 2.2, 2.0])))
    store.add(validate_submission(submission("no curve", rounds=3)))
    entries = store.entries(details=False)
    rows = board_rows(entries)
    costs = {i: bytes_to_target(r, 2.3) for i, r in store.round_curves().items()}
    html = board_page(rows, track="all", base_model=None, models=[], chart="",
                      shown_entries=len(rows), target=2.3, costs=costs)  # fmt: skip
    assert 'data-key="target"' in html and 'data-first="ascending"' in html
    assert "To loss ≤ 2.3" in html
    assert f'<td data-v="{3000}" class="num">' in html  # the cheap entry: two rounds' bytes
    assert html.count("<th ") == html.count("<th data-key")  # every header sortable
    plain = board_page(rows, track="all", base_model=None, models=[], chart="",
                       shown_entries=len(rows))  # fmt: skip
    assert 'data-key="target"' not in plain and "To loss" not in plain
    page = entry_page(store.get(cheap), 1, [], target=2.3)
    assert "Bytes to held-out loss ≤ 2.3" in page and "round 2" in page and "3,000 bytes" in page
    assert "held-out loss" in page  # the curve is drawn beside the train loss
    assert "Bytes to held-out loss" not in entry_page(store.get(cheap), 1, [])  # no target set


def test_the_target_is_an_operator_policy(store):
    assert store.policy().target_heldout_loss is None
    assert store.set_policy("target-heldout-loss", "1.85").target_heldout_loss == 1.85
    with pytest.raises(ValueError):
        store.set_policy("target-heldout-loss", "-1")
    assert store.set_policy("target-heldout-loss", None).target_heldout_loss is None

"""Ranking order, tie-breaking, the reference rows' placement and the Pareto front."""

from __future__ import annotations

import random

import pytest

from fedtune.leaderboard.entry import REPRODUCED, Entry
from fedtune.leaderboard.published import PUBLISHED_ROWS, published_entries
from fedtune.leaderboard.ranking import board_rows, pareto_front, rank
from fedtune.leaderboard.reference import constant_answer_rows


def _entry(id_: int, average: float, comm_bytes: int = 10**9, date: str = "2026-01-01", **kw):
    return Entry(
        id=id_,
        team=kw.get("team", f"t{id_}"),
        code_url="https://example.org",
        base_model=kw.get("base_model", "M"),
        track=kw.get("track", "open"),
        comm_bytes=comm_bytes,
        average=average,
        stem=average,
        social_sciences=average,
        humanities=average,
        date=date,
        status=kw.get("status", REPRODUCED),  # scores the board checked: ranked
    )


def test_published_rows_rank_as_published():
    entries = [Entry(**{**e.__dict__, "id": i}) for i, e in enumerate(published_entries(), 1)]
    random.Random(0).shuffle(entries)
    ranked = rank(entries)
    assert [(r, e.team, e.average) for r, e in ranked] == [
        (row[0], row[1], row[4]) for row in PUBLISHED_ROWS
    ]


def test_ties_at_two_decimals_go_to_lower_cost_then_earlier_date_then_id():
    entries = [
        _entry(1, 50.001, comm_bytes=300),
        _entry(2, 50.004, comm_bytes=200),  # same 50.00 on the board: cheaper wins
        _entry(3, 50.0, comm_bytes=200, date="2025-12-31"),  # same cost: earlier wins
        _entry(4, 50.0, comm_bytes=200, date="2025-12-31"),  # fully tied: lower id first
        _entry(5, 50.006, comm_bytes=10**12),  # shows as 50.01: above all the others
    ]
    for seed in range(5):
        shuffled = entries[:]
        random.Random(seed).shuffle(shuffled)
        assert [e.id for _, e in rank(shuffled)] == [5, 3, 4, 2, 1]


def test_references_sit_by_average_and_filters_keep_ranks():
    entries = [
        _entry(1, 60.0, base_model="A"),
        _entry(2, 27.95, base_model="B"),  # ties the always-D row: the entry comes first
        _entry(3, 20.0, base_model="A"),
    ]
    rows = board_rows(entries, constant_answer_rows())
    labels = [r.entry.id if r.entry else r.reference.label for r in rows]
    assert labels == [1, 2, "always D", "always C", "always B", "always A", 3]
    only_a = board_rows(entries, (), base_model="A")
    assert [(r.rank, r.entry.id) for r in only_a] == [(1, 1), (3, 3)]


def test_track_views_rank_separately():
    entries = [
        _entry(1, 60.0, track="general-nlp"),
        _entry(2, 70.0, track="open"),
        _entry(3, 50.0, track="general-nlp"),
    ]
    general = board_rows(entries, (), track="general-nlp")
    assert [(r.rank, r.entry.id) for r in general] == [(1, 1), (2, 3)]
    everything = board_rows(entries, (), track="all")
    assert [(r.rank, r.entry.id) for r in everything] == [(1, 2), (2, 1), (3, 3)]


def test_self_reported_entries_are_listed_unranked_after_the_ranked_ones():
    entries = [
        _entry(1, 60.0),
        _entry(2, 99.0, comm_bytes=1, status="submitted"),  # claims the top spot
        _entry(3, 50.0),
        _entry(4, 70.0, status="submitted"),
    ]
    rows = board_rows(entries, constant_answer_rows())
    labels = [(r.rank, r.entry.id if r.entry else r.reference.label) for r in rows]
    assert labels[:2] == [(1, 1), (2, 3)]
    assert [label for _, label in labels[2:6]] == ["always D", "always C", "always B", "always A"]
    assert labels[6:] == [(None, 2), (None, 4)]  # unranked, in the order they would rank
    assert [e.id for _, e in rank(entries)] == [1, 3]


def test_pareto_front():
    entries = [
        _entry(1, 40.0, comm_bytes=100),
        _entry(2, 35.0, comm_bytes=200),  # dominated by 1
        _entry(3, 60.0, comm_bytes=300),
        _entry(4, 60.0, comm_bytes=400),  # same score for more bytes: dominated
        _entry(5, 10.0, comm_bytes=50),
        _entry(6, 70.0, comm_bytes=5000),
    ]
    assert [e.id for e in pareto_front(entries)] == [5, 1, 3, 6]


def test_pareto_front_of_the_published_board():
    entries = [Entry(**{**e.__dict__, "id": i}) for i, e in enumerate(published_entries(), 1)]
    front = [(e.team, e.base_model, e.board_gb) for e in pareto_front(entries)]
    # 0.5 GB Llama-3.2-1B, then the 0.7 GB Gemma2 (67.78), then the 2.9 GB InternLM3 (69.25).
    assert front == [
        ("ZJUDAI", "Llama-3.2-1B-Instruct", "0.5 GB"),
        ("T-IoI@UNR", "Gemma2-9b-cpt-sahabatai-v1-instruct", "0.7 GB"),
        ("ZeroOne.AI", "Internlm3-8b-instruct", "2.9 GB"),
    ]


@pytest.mark.parametrize("seed", range(3))
def test_rank_is_a_total_order(seed):
    rng = random.Random(seed)
    entries = [
        _entry(
            i,
            rng.choice([30.0, 30.001, 45.5]),
            comm_bytes=rng.choice([1, 2]),
            date=f"2026-01-0{rng.randint(1, 3)}",
        )
        for i in range(1, 60)
    ]
    first = [e.id for _, e in rank(entries)]
    rng.shuffle(entries)
    assert [e.id for _, e in rank(entries)] == first
    keys = [(-round(e.average, 2), e.comm_bytes, e.date, e.id) for _, e in rank(entries)]
    assert keys == sorted(keys)

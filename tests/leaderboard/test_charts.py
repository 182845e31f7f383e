"""The SVG charts without a browser: the cost axis comes from the ranked entries, far-off and
unranked costs cannot stretch it, and any status gets a CSS class."""

from __future__ import annotations

import re

from fedtune.leaderboard.entry import OPEN, PUBLISHED, SUBMITTED, Entry
from fedtune.leaderboard.published import published_entries
from fedtune.leaderboard.ranking import pareto_front
from fedtune.leaderboard.web.charts import cost_range, css_name, score_vs_cost, status_classes
from fedtune.units import BYTES_PER_GB


def _entry(team: str, gb: float, status: str, average: float = 40.0, id_: int = 900) -> Entry:
    return Entry(
        team=team,
        code_url="https://example.org/run",
        base_model="m",
        track=OPEN,
        comm_bytes=max(1, round(gb * BYTES_PER_GB)),
        average=average,
        stem=average,
        social_sciences=average,
        humanities=average,
        date="2026-01-02",
        status=status,
        id=id_,
    )


def test_cost_axis_comes_from_the_ranked_entries_without_far_outliers():
    board = published_entries()  # 0.5 to 44.7 GB
    lo, hi = cost_range(board)
    far = [
        _entry("one byte", 1 / BYTES_PER_GB, SUBMITTED, id_=901),
        _entry("exabyte, ranked", 10**18 / BYTES_PER_GB, PUBLISHED, id_=902),
        _entry("cheap, unranked", 0.01, SUBMITTED, id_=903),
    ]
    assert cost_range([*board, *far]) == (lo, hi)
    assert 10**lo < 0.5 and 10**hi > 44.7 and hi - lo < 2.5  # 0.5–44.7 GB, padded
    # A cheap ranked entry within reach of the others does widen it.
    assert cost_range([*board, _entry("cheap, ranked", 0.004, PUBLISHED)])[0] < -2.4


def test_few_ranked_entries_use_every_shown_cost_to_find_outliers():
    view = [
        _entry("ranked", 2.0, PUBLISHED, id_=1),
        _entry("exabyte, ranked", 10**18 / BYTES_PER_GB, PUBLISHED, id_=2),
        _entry("a", 3.0, SUBMITTED, id_=3),
        _entry("b", 1.2, SUBMITTED, id_=4),
        _entry("one byte", 1 / BYTES_PER_GB, SUBMITTED, id_=5),
    ]
    lo, hi = cost_range(view)
    assert 10**lo < 2.0 < 10**hi < 100  # a decade around the one ranked cost in reach


def test_off_scale_points_sit_at_the_edge_marked_and_counted():
    # Ranked entries from 0.5 to 8 GB scoring 20 to 45: axes up to 50 (Average) and ~10 GB.
    ranked = [
        _entry(f"r{i}", gb, PUBLISHED, average=20.0 + 5 * i, id_=i)
        for i, gb in enumerate((0.5, 1.0, 2.0, 4.0, 8.0, 1.5))
    ]
    far = [
        _entry("one byte", 1 / BYTES_PER_GB, SUBMITTED, id_=901),
        _entry("exabyte", 10**18 / BYTES_PER_GB, PUBLISHED, id_=902),
        _entry("claims 95", 3.0, SUBMITTED, average=95.0, id_=903),
    ]
    entries = [*ranked, *far]
    front = pareto_front(e for e in entries if e.ranked)
    for compact in (False, True):
        svg = score_vs_cost(entries, front, compact=compact)
        off = re.findall(r'<circle class="([^"]*off-scale[^"]*)" data-id="(\d+)"', svg)
        assert {int(i) for _, i in off} == {901, 902, 903}
        assert svg.count('class="off-mark"') == 3
        note = " ".join(re.findall(r'<text class="off-note"[^>]*>([^<]*)</text>', svg))
        assert "◀ 1 entry below" in note and "▶ 1 entry above" in note
        assert "▲ 1 entry above Average 50" in note
        # The ranked entries set the Average axis (the unranked 95 does not).
        assert re.search(r'text-anchor="end">50</text>', svg)
        assert not re.search(r'text-anchor="end">60</text>', svg)


def test_every_status_gets_a_class_of_its_own_and_of_its_kind():
    assert css_name("failed verification") == "failed-verification"
    assert css_name("Held for review!") == "held-for-review"
    held = _entry("x", 1.0, "held for review")
    assert status_classes(held) == "status-held-for-review unranked"
    assert status_classes(_entry("x", 1.0, PUBLISHED)) == "status-published ranked"
    svg = score_vs_cost([held], [])
    assert 'class="pt track-open status-held-for-review unranked"' in svg

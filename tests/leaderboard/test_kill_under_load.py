"""SIGKILL of `fedtune leaderboard serve` while clients submit: every acknowledged submission is
stored exactly once, nothing else is stored, and the clients' retries are answered (bench/
leaderboard_load.py measures the same at a larger size)."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from fedtune.leaderboard.store import Store

from .lb_submissions import ADAPTER_BYTES, ADAPTER_SHA256, make_submission

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from leaderboard_load import (  # noqa: E402  (the benchmark's driver, beside it)
    Server,
    check_nothing_lost,
    free_port,
    hammer,
    stored_entries,
)

pytestmark = pytest.mark.integration  # a server in its own process, killed twice


def test_nothing_acknowledged_is_lost_when_the_server_is_killed(tmp_path):
    store = Store.in_dir(tmp_path / "board")
    teams = [f"Kill test {i}" for i in range(3)]
    tokens = [store.new_token(f"c{i}", team=team) for i, team in enumerate(teams)]
    payloads = [
        [
            make_submission(team, correct=(900 + n, 900 + i, 900), generations=n == 0)
            for n in range(20)
        ]
        for i, team in enumerate(teams)
    ]
    server = Server(tmp_path / "board", free_port(), tmp_path / "server.log")
    server.start()
    try:
        # The adapter the file-carrying submissions name is on the board: they wait for a verifier.
        upload = httpx.put(
            f"{server.url}/api/adapters/{ADAPTER_SHA256}",
            content=ADAPTER_BYTES,
            headers={"Authorization": f"Bearer {tokens[0]}",
                     "Content-Type": "application/octet-stream"},
        )  # fmt: skip
        assert upload.status_code == 201, upload.text
        # The kills come early (0.3 s apart, each restart ~1 s) so that they land mid-load.
        result = hammer(server, payloads, tokens, kills=2, kill_every_s=0.3, deadline_s=240)
        stored = stored_entries(server.url)
    finally:
        server.stop()
    assert result["kills"] == 2
    assert check_nothing_lost(result["acknowledged"], stored, expected=60) == []
    assert sum(row["status"] == "pending" for row in stored) == 3
    assert server.process is not None and server.process.poll() is not None  # nothing left behind

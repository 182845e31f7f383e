"""The server keeps answering while it checks heavy submissions — DP claims at the caps, a gzip
bomb of predictions, generation files to re-score, 16 MiB of JSON — all checked in worker
processes; those processes end with the server however it ends; what they hand back (a checked
submission, a refusal) survives the trip."""

from __future__ import annotations

import base64
import gzip
import json
import os
import pickle
import signal
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from fedtune.evaluation.rescore import MAX_PREDICTIONS_BYTES
from fedtune.leaderboard.store import Store
from fedtune.leaderboard.validation import (
    MAX_BODY_BYTES,
    MAX_RELEASE_SIZES,
    MAX_ROUNDS,
    SubmissionError,
    check_submission,
)
from fedtune.leaderboard.web.checks import BadBody, CheckPool

from .lb_submissions import make_submission

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from leaderboard_load import Server, free_port  # noqa: E402  (the benchmark's server driver)

HEALTH_BUDGET_S = 0.2
TEAM = "Heavy Team"


def _dp_submission(sizes: int, epsilon: float | None, accounting: str) -> dict[str, Any]:
    """MAX_ROUNDS rounds of a 64-client open-track run whose DP releases cycle through `sizes`
    distinct client counts, claiming `epsilon`."""
    population = 64
    payload = make_submission(
        TEAM, rounds=MAX_ROUNDS, code_url=f"https://example.org/dp-{sizes}-{accounting}"
    )
    payload["setup"]["num_clients"] = population
    for record in payload["rounds"]:
        record["clients"] = population
    payload["setup"]["privacy"] = {
        "noise": "server",
        "noise_multiplier": 1.0,
        "clipping_norm": 1.0,
        "delta": 1e-5,
        "accounting": accounting,
        "releases": [1 + i % sizes for i in range(MAX_ROUNDS)],
        "epsilon": epsilon,
    }
    return payload


def _predictions_bomb() -> dict[str, Any]:
    """Predictions whose gzip (~0.2 MB) expands to 64 MiB of well-formed lines."""
    line = json.dumps({"subset": "anatomy", "index": 0, "gold": "A", "predicted": "A"}) + "\n"
    content = line.encode() * (64 * 1024 * 1024 // len(line))
    payload = make_submission(TEAM, code_url="https://example.org/bomb")
    payload["predictions"] = base64.b64encode(gzip.compress(content, 9, mtime=0)).decode()
    payload["evaluation"] = {"protocol": "loglik", "protocol_version": "1", "shots": 5}
    return payload


def _huge_json() -> dict[str, Any]:
    """A submission padded with millions of numbers to just under the body limit."""
    payload = make_submission(TEAM, code_url="https://example.org/huge")
    room = MAX_BODY_BYTES - len(json.dumps(payload)) - 100
    payload["provenance"]["numbers"] = [0] * (room // 3)  # "0, " each
    return payload


@pytest.mark.integration  # a server in its own process
def test_health_checks_answer_within_200_ms_while_heavy_submissions_are_checked(tmp_path):
    """`fedtune leaderboard serve` in its own process (as it runs for real: the test's threads do
    not share its interpreter lock), six heavy submissions at once, /healthz every 50 ms."""
    from fedtune.federation.privacy import privacy_spent

    store = Store.in_dir(tmp_path / "board")
    token = store.new_token("heavy", team=TEAM)
    cheap_dp = _dp_submission(MAX_RELEASE_SIZES, None, "no-amplification")
    dp = SimpleNamespace(**cheap_dp["setup"]["privacy"])
    cheap_dp["setup"]["privacy"]["epsilon"] = privacy_spent(dp, 64, dp.releases)["epsilon"]
    # (name, payload, expected status, field, words of the reason)
    heavy = [
        ("DP at the cap", _dp_submission(MAX_RELEASE_SIZES, 1.0, "without-replacement"),
         422, "setup.privacy.epsilon", "the accountant gives"),
        ("DP over the cap", _dp_submission(MAX_RELEASE_SIZES + 1, 1.0, "without-replacement"),
         422, "setup.privacy.releases", f"at most {MAX_RELEASE_SIZES}"),
        ("DP, no amplification", cheap_dp, 201, None, None),
        ("predictions bomb", _predictions_bomb(),
         422, "predictions", f"expands to over {MAX_PREDICTIONS_BYTES:,} bytes"),
        ("generation files", make_submission(TEAM, generations=True), 201, None, None),
        ("16 MiB of JSON", _huge_json(), 422, "provenance.numbers", "more than 1,000 items"),
    ]  # fmt: skip
    bodies = [json.dumps(payload).encode() for _, payload, *_ in heavy]
    assert max(len(b) for b in bodies) <= MAX_BODY_BYTES
    replies: dict[str, httpx.Response] = {}
    took: dict[str, float] = {}
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    server = Server(tmp_path / "board", free_port(), tmp_path / "server.log")
    server.start()
    try:

        def send(name: str, body: bytes) -> None:
            started = time.perf_counter()
            replies[name] = httpx.post(
                f"{server.url}/api/entries", content=body, headers=headers, timeout=120
            )
            took[name] = time.perf_counter() - started

        senders = [
            threading.Thread(target=send, args=(name, body))
            for (name, *_), body in zip(heavy, bodies, strict=True)
        ]
        for sender in senders:
            sender.start()
        latencies = []
        with httpx.Client(base_url=server.url, timeout=60) as http:
            while any(sender.is_alive() for sender in senders):
                started = time.perf_counter()
                assert http.get("/healthz").status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.05)
        for sender in senders:
            sender.join()
    finally:
        _stop_like_ctrl_c(server)

    for name, _, status, field, reason in heavy:
        reply = replies[name]
        assert reply.status_code == status, (name, reply.text[:300])
        if status == 422:
            assert reply.json()["field"] == field and reason in reply.json()["error"], name
    kept = store.get(replies["DP, no amplification"].json()["id"])
    assert kept is not None
    assert kept.details["setup"]["privacy"]["epsilon"] == cheap_dp["setup"]["privacy"]["epsilon"]
    rescored = store.get(replies["generation files"].json()["id"])
    # Re-scored from its files (its Average is theirs); no adapter on the board: not verifiable.
    assert rescored is not None and rescored.status == "submitted"
    assert rescored.details["evaluation"]["rescored"]
    assert "upload it before submitting" in rescored.details["verification"]["reason"]
    print(
        f"\n{len(latencies)} health checks during {max(took.values()):.1f} s of heavy "
        f"submissions: max {max(latencies) * 1000:.0f} ms, "
        f"median {sorted(latencies)[len(latencies) // 2] * 1000:.0f} ms; "
        + ", ".join(f"{name} {took[name]:.2f} s" for name, *_ in heavy)
    )
    assert len(latencies) >= 10
    assert max(latencies) < HEALTH_BUDGET_S, sorted(latencies)[-5:]


@pytest.mark.integration
def test_workers_exit_when_the_server_is_killed(tmp_path):
    """A SIGKILLed server cannot shut its pool down: its workers notice and exit by themselves."""
    store = Store.in_dir(tmp_path / "board")
    token = store.new_token("kill", team=TEAM)
    server = Server(tmp_path / "board", free_port(), tmp_path / "server.log")
    server.start()
    try:
        reply = httpx.post(
            f"{server.url}/api/entries",
            json=make_submission(TEAM),
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        assert reply.status_code == 201, reply.text
        assert server.process is not None
        group = server.process.pid  # its own session: the group holds the server and its workers
        assert len(_group_members(group)) >= 2
        os.kill(group, signal.SIGKILL)  # the server alone
        server.process.wait(timeout=30)
        assert _group_gone(group, within_s=10), _group_members(group)
    finally:
        server.kill()


def test_the_server_leaves_no_worker_process_behind(live_server, store):
    token = store.new_token("workers", team=TEAM)
    headers = {"Authorization": f"Bearer {token}"}
    reply = httpx.post(
        f"{live_server.url}/api/entries", json=make_submission(TEAM), headers=headers, timeout=60
    )
    assert reply.status_code == 201, reply.text
    checks = live_server.server.config.app.state.checks  # the app the fixture serves
    pids = checks.pids()
    assert pids and all(_alive(pid) for pid in pids)
    live_server.stop()
    assert not checks.running
    assert not any(_alive(pid) for pid in pids)


def test_a_dead_worker_is_replaced_and_its_check_answered_503(store):
    from starlette.testclient import TestClient

    from fedtune.leaderboard.web.app import create_app

    token = store.new_token("crash", team=TEAM)
    headers = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app(store, check_workers=1)) as client:
        first = client.post("/api/entries", json=make_submission(TEAM), headers=headers)
        assert first.status_code == 201, first.text
        checks = client.app.state.checks  # type: ignore[attr-defined]
        (pid,) = checks.pids()
        body = make_submission(TEAM, code_url="https://example.org/after-the-crash")
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        crashed = client.post("/api/entries", json=body, headers=headers)
        assert crashed.status_code == 503 and crashed.headers["retry-after"] == "1"
        again = client.post("/api/entries", json=body, headers=headers)
        assert again.status_code == 201, again.text
        assert checks.pids() and checks.pids() != [pid]
    assert not _alive(pid)


def test_checked_submissions_and_refusals_survive_pickling():
    checked = check_submission(make_submission(TEAM, generations=True))
    assert pickle.loads(pickle.dumps(checked)) == checked
    error = SubmissionError("setup.privacy.releases", "too many")
    back = pickle.loads(pickle.dumps(error))
    assert (type(back), back.field, back.reason, str(back)) == (
        SubmissionError,
        "setup.privacy.releases",
        "too many",
        str(error),
    )
    bad = pickle.loads(pickle.dumps(BadBody("not JSON")))
    assert isinstance(bad, BadBody) and bad.reason == "not JSON"


def test_a_pool_not_started_checks_in_a_thread():
    import asyncio

    pool = CheckPool(1)
    assert asyncio.run(pool.run(sum, [1, 2])) == 3 and pool.pids() == []


def _stop_like_ctrl_c(server: Server) -> None:
    """SIGINT to the server's whole process group, as Ctrl-C in a terminal sends it: the server
    shuts its pool down (the workers ignore it), and nothing of the group remains."""
    process = server.process
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGINT)
    process.wait(timeout=60)
    assert _group_gone(process.pid, within_s=10), _group_members(process.pid)


def _group_members(group: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == group and fields[0] != "Z":  # pgrp; zombies are gone already
                members.append(int(entry))
    return members


def _group_gone(group: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while _group_members(group):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child not yet reaped counts as gone
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_predictions_file_is_read_up_to_its_cap():
    from fedtune.evaluation.rescore import GenerationFileError, parse_predictions

    line = b'{"subset": "anatomy", "index": 0, "gold": "A", "predicted": "A"}\n'
    at_cap = line * (MAX_PREDICTIONS_BYTES // len(line))
    assert len(parse_predictions(gzip.compress(at_cap, mtime=0), "p")) == len(at_cap) // len(line)
    for over in (at_cap + line, gzip.compress(at_cap + line, mtime=0)):
        with pytest.raises(GenerationFileError, match=f"over {MAX_PREDICTIONS_BYTES:,} bytes"):
            parse_predictions(over, "p")


def test_depth_counts_levels_and_stops_past_the_limit():
    from fedtune.leaderboard.web.checks import depth

    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    assert depth(deep, 32) == 33
    assert [depth(v) for v in (1, [], {}, [1, [2]], {"a": [{"b": 1}]}, [[], [[[]]]])] == [
        1, 1, 1, 2, 3, 4
    ]  # fmt: skip

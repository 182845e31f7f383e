"""A node's death on Flower's deployment engine, across real processes with TLS and SuperNode
authentication: a SuperNode is SIGKILLed while it holds a training message; the round completes on
the survivors within the round timeout, later rounds go on, the node is restarted with its own key
and rejoins, and a later round trains it again. Every wait has a hard deadline."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedtune.rundir import RunDirectory
from fedtune.runtime.local import (
    _alive,
    _group_alive,
    down,
    flower_env,
    restart_node,
    restart_superlink,
    up,
)

pytestmark = pytest.mark.integration  # real Flower processes; runs in CI

ROOT = Path(__file__).resolve().parents[2]
ROUND_TIMEOUT_S = 30  # a silent node's reply is given up after this
RUN_DEADLINE_S = 600  # the whole run, kill and rejoin included
ROUNDS = 6


def _members(pgid: int) -> list[str]:
    """Command lines of the live processes in a process group."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(cmdline)
    return found


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _wait(predicate, deadline: float, what: str, run: subprocess.Popen) -> None:
    while not predicate():
        if run is not None and run.poll() is not None:
            raise AssertionError(f"the run ended before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _run_config(tiny_model_dir: Path, out: Path, rounds: int, *extra: str) -> str:
    return " ".join(
        [
            f"num-server-rounds={rounds}",
            f"model.name='{tiny_model_dir}'",
            "model.lora.peft-lora-r=4",
            "train.training-arguments.max-steps=1",
            "train.training-arguments.per-device-train-batch-size=2",
            "train.seq-length=64",
            "federation.num-clients=3",
            "strategy.clients-per-round=3",
            "strategy.min-clients=2",
            f"strategy.round-timeout-s={ROUND_TIMEOUT_S}",
            "strategy.node-wait-s=90",
            "eval.probe-examples=2",
            "data.heldout-examples=8",
            f"run.output-dir='{out}'",
            "run.name='deploy'",
            *extra,
        ]
    )


def _flwr_run(state: dict, run_config: str, cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as handle:
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "flwr"), "run", str(ROOT), state["connection"],
             "--stream", "--run-config", run_config],
            env=flower_env(Path(state["flwr_home"])), cwd=cwd, stdout=handle,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def _stop(run: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(run.pid, signal.SIGKILL)
    run.wait()


def test_node_killed_mid_round_survivors_finish_and_it_rejoins(tmp_path, tiny_model_dir):
    directory = tmp_path / "federation"
    state = up(directory, 3, tls=True, auth=True, timeout_s=60)
    out = tmp_path / "runs"
    run_dir = out / "deploy"
    log = tmp_path / "flwr-run.log"
    victim = next(p for p in state["processes"] if p["name"] == "node-1")
    started = time.monotonic()
    deadline = started + RUN_DEADLINE_S
    run = _flwr_run(state, _run_config(tiny_model_dir, out, ROUNDS), tmp_path, log)
    try:
        # After round 1, wait for node-1 to hold a message: its ClientApp process is running.
        _wait(lambda: len(_lines(run_dir / "metrics.jsonl")) >= 1, deadline, "round 1", run)
        _wait(
            lambda: any("flwr-clientapp" in c for c in _members(victim["pgid"])),
            deadline,
            "node-1's ClientApp",
            run,
        )
        killed_in = len(_lines(run_dir / "metrics.jsonl")) + 1
        os.killpg(victim["pgid"], signal.SIGKILL)
        killed_at = time.monotonic()
        _wait(lambda: not _group_alive(victim["pgid"]), deadline, "node-1 to die", run)

        rejoined = restart_node(directory, "node-1", timeout_s=180)
        rejoined_after = time.monotonic() - killed_at

        code = run.wait(timeout=max(deadline - time.monotonic(), 1))
        finished_after = time.monotonic() - started
    finally:
        _stop(run)
        recorded = json.loads((directory / "federation.json").read_text())["processes"]
        report = down(directory)
    text = log.read_text(errors="replace")
    assert code == 0, text[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state"] == "completed", summary
    metrics = _lines(run_dir / "metrics.jsonl")
    assert [m["round"] for m in metrics] == list(range(1, ROUNDS + 1))
    assert all(m["clients"] >= 2 for m in metrics)  # strategy.min-clients
    clients = _lines(run_dir / "clients.jsonl")
    # The round node-1 died in: its reply is given up, the survivors are aggregated.
    lost = [c for c in clients if c["round"] == killed_in and c["partition_id"] == 1]
    assert lost and "problem" in lost[-1], lost
    assert metrics[killed_in - 1]["clients"] == 2
    # No round waited longer than its bounds (round timeout + node wait, with start-up slack).
    assert finished_after < RUN_DEADLINE_S
    # Restarted with its own key, under its own node id, and trained again in a later round.
    assert rejoined["restarts"] == 1 and rejoined_after < 180
    again = [
        c
        for c in clients
        if c["round"] > killed_in and c["partition_id"] == 1 and "problem" not in c
    ]
    assert again, f"node-1 never trained after rejoining ({rejoined_after:.0f} s after its death)"
    assert len(report) == 4 and all(line.endswith("stopped") for line in report), report
    for process in recorded:
        assert not _group_alive(process["pgid"]), process["name"]
    # Warm nodes: each survivor's worker loaded the model once and answered every message.
    for name in ("node-0", "node-2"):
        lines = [
            x
            for x in (directory / "logs" / f"{name}.log").read_text().splitlines()
            if "fedtune node worker: message" in x
        ]
        assert len(lines) >= ROUNDS and lines[-1].endswith("model loaded 1 time(s)"), lines[-3:]


def _kill_after_round_2_then_resume(
    tmp_path: Path, tiny_model_dir: Path, kill, *extra: str
) -> dict:
    """A 4-round run on 3 nodes (TLS + auth); after round 2 `kill(directory, state, run_dir)`;
    then `flwr run` with run.resume continues the same run directory. Checks that every round is
    in every log once; returns the summary and the clients' rows."""
    directory = tmp_path / "federation"
    state = up(directory, 3, tls=True, auth=True, timeout_s=60)
    out = tmp_path / "runs"
    run_dir = out / "deploy"
    log = tmp_path / "flwr-run.log"
    deadline = time.monotonic() + RUN_DEADLINE_S
    config = _run_config(tiny_model_dir, out, 4, "train.save-every-round=1", *extra)
    first = _flwr_run(state, config, tmp_path, log)
    try:
        # Round 2's resume point, not only its log line: a checkpoint writes the logs first.
        def resume_round() -> int:
            point = RunDirectory(run_dir).read_resume_point()
            return int(point[0]["round"]) if point else 0

        _wait(lambda: resume_round() >= 2, deadline, "round 2's resume point", first)
        # The ServerApp's process: the one the run directory's status names.
        pid = json.loads((run_dir / "status.json").read_text())["pid"]
        assert "flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        kill(directory, state, pid, run_dir)
        _wait(lambda: not _alive(pid), deadline, "the ServerApp to die", None)
        _stop(first)  # the stream of a run whose ServerApp is gone

        second = _flwr_run(state, f"{config} run.resume='{run_dir}'", tmp_path, log)
        try:
            code = second.wait(timeout=max(deadline - time.monotonic(), 1))
        finally:
            _stop(second)
    finally:
        _stop(first)
        recorded = json.loads((directory / "federation.json").read_text())["processes"]
        report = down(directory)
    text = log.read_text(errors="replace")
    assert code == 0, text[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state"] == "completed", text[-3000:]
    assert summary["resumes"] and summary["resumes"][0]["after_round"] >= 2
    for name in ("metrics.jsonl", "ledger.jsonl", "clients.jsonl"):
        rounds = [r["round"] for r in _lines(run_dir / name)]
        assert sorted(set(rounds)) == [1, 2, 3, 4], name
        assert rounds == sorted(rounds), name
    assert [m["round"] for m in _lines(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]
    assert all(line.endswith("stopped") for line in report), report
    for process in recorded:
        assert not _group_alive(process["pgid"]), process["name"]
    return {"summary": summary, "clients": _lines(run_dir / "clients.jsonl"), "state": recorded}


@pytest.mark.slow
def test_serverapp_killed_then_resumed_on_the_same_federation(tmp_path, tiny_model_dir):
    """SIGKILL the ServerApp after round 2; `flwr run` with run.resume continues the same run
    directory from its last resume point: every round once in every log, the resume recorded."""

    def kill_serverapp(directory: Path, state: dict, pid: int, run_dir: Path) -> None:
        os.kill(pid, signal.SIGKILL)
        _wait(lambda: not _alive(pid), time.monotonic() + 30, "the ServerApp to die", None)
        status = json.loads((run_dir / "status.json").read_text())
        assert status["state"] == "running"  # what it was when killed; the pid is dead now

    _kill_after_round_2_then_resume(tmp_path, tiny_model_dir, kill_serverapp)


@pytest.mark.slow
def test_superlink_killed_restarted_and_the_run_resumed(tmp_path, tiny_model_dir):
    """SIGKILL the SuperLink's process group (it and its SuperExec) after round 2. The
    ServerApp, a process of its own, keeps retrying the SuperLink only for strategy.link-wait-s,
    then records an honest failure and exits (Flower alone would retry forever). `fedtune
    federation restart superlink` brings the SuperLink back on the same address and database —
    the registered keys survive, the nodes reconnect by themselves — and run.resume finishes the
    run with every node training again."""
    link_wait_s = 20
    restarted: dict = {}

    def kill_superlink(directory: Path, state: dict, pid: int, run_dir: Path) -> None:
        link = next(p for p in state["processes"] if p["role"] == "superlink")
        os.killpg(link["pgid"], signal.SIGKILL)
        killed_at = time.monotonic()
        _wait(
            lambda: not _alive(pid),
            killed_at + link_wait_s + 60,
            "the ServerApp to give up on the SuperLink",
            None,
        )
        gave_up_after = time.monotonic() - killed_at
        status = json.loads((run_dir / "status.json").read_text())
        assert status["state"] == "failed" and status["resumable"], status
        assert f"SuperLink did not answer for {link_wait_s} s" in status["error"], status
        assert gave_up_after >= link_wait_s - 1
        restarted.update(restart_superlink(directory, timeout_s=120))

    result = _kill_after_round_2_then_resume(
        tmp_path, tiny_model_dir, kill_superlink, f"strategy.link-wait-s={link_wait_s}"
    )
    assert restarted["restarts"] == 1 and restarted["rejoined_s"] < 120
    link = next(p for p in result["state"] if p["role"] == "superlink")
    assert link["pid"] == restarted["pid"]  # `down` stopped the restarted one
    after = {c["partition_id"] for c in result["clients"] if c["round"] >= 3 and "problem" not in c}
    assert after == {0, 1, 2}, result["clients"]

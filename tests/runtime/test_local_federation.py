"""`fedtune federation up/down` on loopback: a SuperLink and SuperNodes as real processes with TLS
and SuperNode authentication; an unregistered node is refused; `down` leaves nothing behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.runtime.certs import make_node_key
from fedtune.runtime.local import (
    FederationError,
    _group_alive,
    down,
    flower_env,
    free_port,
    online_nodes,
    read_state,
    up,
)

pytestmark = pytest.mark.integration  # real Flower processes

DEADLINE_S = 60  # every wait in this test is bounded by this


def test_up_with_tls_and_auth_refuses_strangers_and_down_leaves_nothing(tmp_path):
    directory = tmp_path / "federation"
    state = up(directory, 3, tls=True, auth=True, timeout_s=DEADLINE_S)
    try:
        assert [p["role"] for p in state["processes"]] == ["superlink", *["supernode"] * 3]
        assert state["tls"] and state["auth"] and state["nodes_online_s"] < DEADLINE_S
        assert len(online_nodes(state)) == 3
        config = (directory / "flwr-home" / "config.toml").read_text()
        assert "root-certificates" in config and "insecure = false" in config
        for i, process in enumerate(state["processes"][1:]):
            assert f"partition-id={i} num-partitions=3" in " ".join(process["command"])
        with pytest.raises(FederationError, match="already running"):
            up(directory, 1, tls=True, auth=True, timeout_s=DEADLINE_S)

        # A node with a key the SuperLink never registered is refused and exits.
        private, _ = make_node_key(tmp_path / "stranger", "stranger")
        log = tmp_path / "stranger.log"
        with open(log, "wb") as handle:
            stranger = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "flower-supernode"),
                    "--superlink", state["address"], "--port", str(free_port()),
                    "--root-certificates", str(directory / "certs" / "ca.crt"),
                    "--auth-supernode-private-key", str(private),
                    "--node-config", "partition-id=0 num-partitions=3",
                ],
                env=flower_env(directory / "flwr-home"),
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            code = stranger.wait(timeout=DEADLINE_S)
        finally:  # its SuperExec child too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(stranger.pid, signal.SIGKILL)
            stranger.wait()
        assert code != 0 and "Failed to activate SuperNode" in log.read_text(errors="replace")
        assert len(online_nodes(state)) == 3
    finally:
        report = down(directory)
    assert len(report) == 4 and all(line.endswith("stopped") for line in report)
    for process in state["processes"]:
        assert not _group_alive(process["pgid"]), process["name"]
    assert read_state(directory)["processes"] == []
    assert down(directory) == []  # nothing left to stop


def test_up_refuses_bad_requests_and_starts_nothing(tmp_path):
    with pytest.raises(FederationError, match="needs TLS"):
        up(tmp_path / "a", 2, auth=True)
    with pytest.raises(FederationError, match="at least 1"):
        up(tmp_path / "b", 0)
    with pytest.raises(FederationError, match="not a readable `fedtune data split` manifest"):
        up(tmp_path / "c", 2, data_dir=tmp_path / "nowhere")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing started


def test_restart_refuses_unknown_and_running_nodes(tmp_path):
    from fedtune.runtime.local import STATE_FILE, restart_node

    directory = tmp_path / "federation"
    directory.mkdir()
    me = {"role": "supernode", "name": "node-0", "pid": os.getpid(), "pgid": os.getpgid(0),
          "command": ["true"], "log": str(tmp_path / "n.log")}  # fmt: skip
    state = {"processes": [me], "flwr_home": str(tmp_path), "connection": "x", "nodes": 1}
    (directory / STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(FederationError, match="no node 'node-7'.*nodes: node-0"):
        restart_node(directory, "node-7")
    with pytest.raises(FederationError, match="node-0 is still running"):
        restart_node(directory, "node-0")
    with pytest.raises(FederationError, match="no federation recorded"):
        restart_node(tmp_path / "nowhere", "node-0")


def test_down_also_stops_what_a_process_started_in_a_session_of_its_own(tmp_path):
    """Flower's SuperExec starts a ServerApp with start_new_session: a signal to the SuperLink's
    group misses it, so `down` finds such descendants first and stops them after their parent."""
    import time

    from fedtune.runtime.local import STATE_FILE, _alive, _start

    directory = tmp_path / "federation"
    directory.mkdir()
    child_pid = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],"
        " start_new_session=True)\n"
        f"open({str(child_pid)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(600)\n"
    )
    link = _start("superlink", "superlink", [sys.executable, "-c", script],
                  directory / "logs" / "superlink.log", dict(os.environ))  # fmt: skip
    state = {"processes": [link], "flwr_home": str(tmp_path), "connection": "x", "nodes": 0}
    (directory / STATE_FILE).write_text(json.dumps(state))
    deadline = time.monotonic() + DEADLINE_S
    while not (child_pid.exists() and child_pid.read_text()):
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.1)
    child = int(child_pid.read_text())
    assert os.getpgid(child) != link["pgid"]  # out of the group's reach
    try:
        report = down(directory, timeout_s=10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child, signal.SIGKILL)
    assert not _group_alive(link["pgid"]) and not _alive(child)
    assert report == [
        f"superlink (pid {link['pid']}): stopped; "
        f"its detached {Path(sys.executable).name} (pid {child}) stopped"
    ], report


def test_restart_superlink_refuses_when_none_is_recorded_or_it_still_runs(tmp_path):
    from fedtune.runtime.local import STATE_FILE, restart_superlink

    directory = tmp_path / "federation"
    directory.mkdir()
    (directory / STATE_FILE).write_text(json.dumps({"processes": [], "flwr_home": str(tmp_path)}))
    with pytest.raises(FederationError, match="no SuperLink recorded"):
        restart_superlink(directory)
    me = {"role": "superlink", "name": "superlink", "pid": os.getpid(), "pgid": os.getpgid(0),
          "command": ["true"], "log": str(tmp_path / "l.log")}  # fmt: skip
    (directory / STATE_FILE).write_text(json.dumps({"processes": [me], "flwr_home": str(tmp_path)}))
    with pytest.raises(FederationError, match="the SuperLink is still running"):
        restart_superlink(directory)

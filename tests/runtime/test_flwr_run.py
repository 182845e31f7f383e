"""`flwr run .` — Flower's own CLI on its local simulation SuperLink — runs the same app."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flower_env(home: Path) -> dict[str, str]:
    """The environment of a user whose Flower home is `home` (not created: Flower does that),
    on ports of its own, with `flwr` on PATH."""
    return dict(
        os.environ,
        FLWR_HOME=str(home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )


STOP_LOCAL = [sys.executable, "-m", "fedtune.cli", "federation", "stop-local"]


def flwr_run(
    env: dict[str, str], run_config: str, cwd: Path, timeout: int
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """`flwr run . --stream --run-config …` as a user types it, then `fedtune federation
    stop-local` whatever happened: (the run, the stop)."""
    try:
        done = subprocess.run(
            [str(Path(sys.executable).parent / "flwr"), "run", str(ROOT), "--stream",
             "--run-config", run_config],
            capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
        )  # fmt: skip
    finally:
        stopped = subprocess.run(STOP_LOCAL, capture_output=True, text=True, env=env, timeout=60)
    return done, stopped


def test_flwr_run_with_flowers_defaults_and_template_keys(tmp_path, tiny_model_dir):
    # A fresh Flower home: nothing written by the test, Flower creates its default configuration
    # (a local simulation SuperLink with 2 SuperNodes); federation.num-clients is left at 0.
    home = tmp_path / "flwr-home"
    out = tmp_path / "runs"
    env = flower_env(home)
    # FlowerTune template keys, exactly as a FlowerTune user types them.
    run_config = (
        f"num-server-rounds=1 model.name='{tiny_model_dir}' model.lora.peft-lora-r=4 "
        "train.training-arguments.max-steps=1 train.training-arguments.per-device-train-batch-size=2 "
        f"train.seq-length=64 strategy.fraction-train=1.0 "
        f"eval.probe-examples=2 run.output-dir='{out}' run.name='flwr'"
    )
    done, stopped = flwr_run(env, run_config, tmp_path, timeout=420)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

    assert (home / "config.toml").read_text() == DEFAULT_FLOWER_CONFIG_TOML  # Flower's own
    assert "federation's SuperNodes hold 2 partitions, so 2 clients, 2 a round" in log
    assert "--num-supernodes 20" in log  # how to get FlowerTune's 20
    summary = json.loads((out / "flwr" / "summary.json").read_text())
    assert summary["state"] == "completed" and summary["num_clients"] == 2
    assert summary["clients_per_round"] == 2
    config = json.loads((out / "flwr" / "config.json").read_text())["config"]
    assert config["federation.num-clients"] == 2  # the run records the count it used
    assert (
        config["model.lora.peft-lora-r"] == 4 and config["train.training-arguments.max-steps"] == 1
    )
    assert summary["communication"]["entries"] == 2
    # `fedtune federation stop-local` stopped the SuperLink `flwr run` started, and its children.
    assert stopped.returncode == 0 and "stopped Flower's local SuperLink" in stopped.stdout
    from fedtune.runtime.flower_local import local_superlinks

    assert local_superlinks(home) == []
    again = subprocess.run(STOP_LOCAL, capture_output=True, text=True, env=env, timeout=60)
    assert again.returncode == 0 and "no local SuperLink of" in again.stdout


def test_a_set_client_count_that_differs_fails_within_seconds(tmp_path, tiny_model_dir):
    home = tmp_path / "flwr-home"
    env = flower_env(home)
    run_config = (
        f"model.name='{tiny_model_dir}' federation.num-clients=20 eval.probe-examples=2 "
        f"run.output-dir='{tmp_path / 'runs'}' run.name='wrong'"
    )
    started = time.monotonic()
    done, _ = flwr_run(env, run_config, tmp_path, timeout=300)
    log = done.stdout + done.stderr
    assert time.monotonic() - started < 120, log[-3000:]  # not strategy.node-wait-s (300 s)
    assert "hold 2 partitions but federation.num-clients is 20" in log, log[-3000:]
    assert "--num-supernodes 20" in log and "--resume" not in log
    status = json.loads((tmp_path / "runs" / "wrong" / "status.json").read_text())
    assert status["state"] == "failed" and status["resumable"] is False

"""`flwr run .` — Flower's own CLI on its local simulation SuperLink — runs the same app."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_processes_mentioning(marker: str) -> None:
    """The local SuperLink outlives `flwr run` by design: stop the one this test started."""
    victims = []
    for process in psutil.process_iter(["cmdline"]):
        if marker in " ".join(process.info["cmdline"] or []):
            victims.extend([process, *process.children(recursive=True)])
    for process in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    psutil.wait_procs(victims, timeout=10)


def test_flwr_run_uses_template_keys(tmp_path, tiny_model_dir):
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        "options.num-supernodes = 3\noptions.backend.client-resources.num-cpus = 1\n"
    )
    out = tmp_path / "runs"
    env = dict(
        os.environ,
        FLWR_HOME=str(home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )
    # FlowerTune template keys, exactly as a FlowerTune user types them.
    run_config = (
        f"num-server-rounds=1 model.name='{tiny_model_dir}' model.lora.peft-lora-r=4 "
        "train.training-arguments.max-steps=1 train.training-arguments.per-device-train-batch-size=2 "
        f"train.seq-length=64 federation.num-clients=3 strategy.fraction-train=0.67 "
        f"eval.probe-examples=2 run.output-dir='{out}' run.name='flwr'"
    )
    try:
        done = subprocess.run(
            [
                str(Path(sys.executable).parent / "flwr"),
                "run",
                str(ROOT),
                "local",
                "--stream",
                "--run-config",
                run_config,
            ],
            capture_output=True,
            text=True,
            timeout=420,
            env=env,
            cwd=tmp_path,
        )
    finally:
        stop_processes_mentioning(str(home))
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    summary = json.loads((out / "flwr" / "summary.json").read_text())
    assert summary["state"] == "completed" and summary["clients_per_round"] == 2
    config = json.loads((out / "flwr" / "config.json").read_text())["config"]
    assert (
        config["model.lora.peft-lora-r"] == 4 and config["train.training-arguments.max-steps"] == 1
    )
    assert summary["communication"]["entries"] == 2

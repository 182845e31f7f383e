"""What the benchmark scripts share: running a fedtune command with its output in a log."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def run_logged(command: list[str], log: Path) -> float:
    """Run `command` (Flower told not to install anything), its output into `log`; wall seconds.

    Raises:
        SystemExit: the command failed (the log says why).
    """
    started = time.perf_counter()
    env = dict(os.environ, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    with open(log, "w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed; see {log}")
    return time.perf_counter() - started

"""bench/process_memory.py: the peak memory of a command's whole process tree, not just its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "process_memory.py"

# A parent holding ~20 MiB that starts a child holding ~150 MiB for a while, then exits with 3.
COMMAND = """
import subprocess, sys, time
parent = bytearray(20 * 2**20)
child = subprocess.Popen([sys.executable, "-c",
    "import time; block = bytearray(150 * 2**20); time.sleep(2.5)"])
child.wait()
sys.exit(3)
"""


def test_tree_peak_counts_the_children(tmp_path):
    out = tmp_path / "memory.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--interval", "0.1", "--output", str(out), "--",
         sys.executable, "-c", COMMAND],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr  # the command's exit code
    result = json.loads(out.read_text())
    mib = 2**20
    assert result["exit_code"] == 3 and result["samples"] >= 5
    assert result["max_processes"] >= 2
    assert result["peak_main_rss_bytes"] < 150 * mib
    assert result["peak_tree_rss_bytes"] >= result["peak_main_rss_bytes"] + 140 * mib
    [child] = [p for p in result["at_peak"]["processes"] if p["rss"] >= 140 * mib]
    assert child["ppid"] == next(
        p["pid"] for p in result["at_peak"]["processes"] if p["rss"] < 140 * mib
    )
    assert child["label"].startswith("python")
    assert sum(p["rss"] for p in result["at_peak"]["processes"]) == result["peak_tree_rss_bytes"]
    assert "peak RSS of the tree" in done.stderr

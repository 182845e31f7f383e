"""Checkpoint overhead per round, and the time from a SIGKILL to a resumed run's first new round.

Runs the default job (embedded SmolLM2-135M-Instruct, LoRA r=8 on q,v, 20 clients, 2 per round)
for --rounds rounds, SIGKILLs `fedtune run` once round --kill-after's resume point is written, resumes it with
`fedtune run --resume`, and reports:
- checkpoint_seconds per round (resume point + PEFT snapshot, as metrics.jsonl records it);
- kill → resumed run's first new round recorded (the whole restart: process, model, Ray, discovery);
- whether the resumed adapter equals an uninterrupted run's (sha256), when --reference is given.

    .venv/bin/python bench/resume_timing.py [--rounds 4 --kill-after 2] [--reference]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedtune.rundir import read_metrics, read_summary

ROOT = Path(__file__).resolve().parents[1]


def fedtune(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedtune.cli", "run", *args]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--kill-after", type=int, default=2)
    parser.add_argument("--reference", action="store_true", help="also run uninterrupted")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "resume_timing.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedtune-resume-"))
    sets = ["--set", f"num-server-rounds={args.rounds}", "--set", f"run.output-dir={work}"]
    env = dict(os.environ, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    run_dir = work / "killed"
    proc = subprocess.Popen(
        fedtune(*sets, "--set", "run.name=killed"), env=env, stderr=subprocess.DEVNULL
    )
    pointer = run_dir / "checkpoints" / "resume-point"
    wanted = f"state-{args.kill_after:05d}"
    # Kill once round --kill-after's resume point is in place: the resumed run starts after it.
    while not (pointer.exists() and pointer.read_text().strip() == wanted):
        if proc.poll() is not None:
            raise SystemExit("the run ended before the kill")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    proc.wait()
    resumed = subprocess.Popen(fedtune("--resume", str(run_dir)), env=env, stderr=subprocess.PIPE)
    while len(read_metrics(run_dir)) <= args.kill_after:
        if resumed.poll() is not None:
            raise SystemExit(f"resume ended early: {resumed.stderr.read()[-2000:]!r}")
        time.sleep(0.05)
    first_new_round_s = time.monotonic() - killed_at
    resumed.wait()
    metrics = read_metrics(run_dir)
    summary = read_summary(run_dir)
    result = {
        "machine": f"{os.cpu_count()} CPU cores",
        "load_average_at_end": os.getloadavg(),
        "rounds": args.rounds,
        "killed_after_round": args.kill_after,
        "checkpoint_seconds": summary["checkpoint_seconds"],
        "round_seconds": [m["seconds"] for m in metrics],
        "kill_to_first_new_round_s": round(first_new_round_s, 1),
        # what the restart itself cost: the first new round's own time taken off
        "restart_overhead_s": round(first_new_round_s - metrics[args.kill_after]["seconds"], 1),
        "adapter_sha256": summary["adapter_sha256"],
        "resumes": summary["resumes"],
    }
    if args.reference:
        subprocess.run(fedtune(*sets, "--set", "run.name=reference"), env=env, check=True)
        reference = read_summary(work / "reference")
        result["reference_sha256"] = reference["adapter_sha256"]
        result["bitwise_equal"] = reference["adapter_sha256"] == summary["adapter_sha256"]
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Peak memory of a command's whole process tree (the command and every process it starts).

Samples every `--interval` seconds (default 0.5) the resident set size (RSS) of the command and all
its descendants, Ray's own processes and workers included, and records the peak of their sum, the
peak of the main process alone, and which processes held what at the tree's peak. A process seen
once as a descendant stays counted while it lives, even if it is re-parented (daemons).

RSS counts pages shared between processes (libraries, Ray's object store) once per process, so the
sum overstates the machine's use a little; the proportional set size (PSS, shared pages divided
among their users) is recorded too, where the kernel offers it.

    .venv/bin/python bench/process_memory.py -- .venv/bin/fedtune run --set run.output-dir=/tmp/rss-runs

Writes bench/results/process_memory.json (or `--output`); exits with the command's exit code.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 1024**3


def _label(process: psutil.Process) -> str:
    """A short, recognisable name: Ray sets its workers' titles (`ray::ClientAppActor…`)."""
    try:
        cmdline = process.cmdline()
        name = process.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "?"
    if cmdline and cmdline[0].startswith("ray::"):
        return " ".join(cmdline)[:80]
    if not cmdline:
        return name
    words = [Path(cmdline[0]).name, *cmdline[1:]]
    # `python -m x …` / `python script.py …`: show what runs, not the interpreter.
    if words[0].startswith("python") and len(words) > 1 and words[1] != "-c":
        words = words[1:]
        if words[0] == "-m" and len(words) > 1:
            words = words[1:]
        words[0] = Path(words[0]).name
    return " ".join(" ".join(words).split())[:80]


class Tree:
    """The processes of one command: the root, its descendants, and those seen before."""

    def __init__(self, root: psutil.Process, pss: bool) -> None:
        self.root = root
        self.pss = pss
        self.known: dict[int, psutil.Process] = {root.pid: root}

    def members(self) -> list[psutil.Process]:
        try:
            for child in self.root.children(recursive=True):
                self.known.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass
        alive = []
        for pid, process in list(self.known.items()):
            # is_running() also checks the creation time, so a reused pid is not counted.
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
            else:
                del self.known[pid]
        return alive

    def sample(self) -> list[dict[str, Any]]:
        rows = []
        for process in self.members():
            try:
                if self.pss:
                    info = process.memory_full_info()
                    rss, pss = info.rss, getattr(info, "pss", None)
                else:
                    rss, pss = process.memory_info().rss, None
                rows.append(
                    {
                        "pid": process.pid,
                        "ppid": process.ppid(),
                        "label": _label(process),
                        "rss": rss,
                        "pss": pss,
                    }
                )
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            except psutil.AccessDenied:
                self.pss = False
        return rows


def measure(command: list[str], interval: float, pss: bool) -> dict[str, Any]:
    started = time.time()
    load_before = os.getloadavg()
    child = subprocess.Popen(command)
    tree = Tree(psutil.Process(child.pid), pss)
    timeline: list[dict[str, Any]] = []
    peak: dict[str, Any] = {"rss": -1}
    main_peak = 0
    process_peaks: dict[int, dict[str, Any]] = {}
    max_processes = 0
    while True:
        now = time.time() - started
        rows = tree.sample()
        total = sum(r["rss"] for r in rows)
        total_pss = sum(r["pss"] for r in rows if r["pss"] is not None) if tree.pss else None
        main = next((r["rss"] for r in rows if r["pid"] == child.pid), 0)
        main_peak = max(main_peak, main)
        max_processes = max(max_processes, len(rows))
        timeline.append(
            {
                "t": round(now, 2),
                "processes": len(rows),
                "rss": total,
                "pss": total_pss,
                "main_rss": main,
            }
        )
        if total > peak["rss"]:
            peak = {
                "t": round(now, 2),
                "rss": total,
                "pss": total_pss,
                "processes": sorted(rows, key=lambda r: -r["rss"]),
            }
        for row in rows:
            best = process_peaks.get(row["pid"])
            if best is None or row["rss"] > best["rss"]:
                process_peaks[row["pid"]] = {**row, "t": round(now, 2)}
        if child.poll() is not None:
            break
        time.sleep(interval)
    return {
        "command": command,
        "exit_code": child.returncode,
        "started_at": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(timespec="seconds"),
        "wall_seconds": round(time.time() - started, 1),
        "interval_seconds": interval,
        "samples": len(timeline),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "machine": {
            "cpus": os.cpu_count(),
            "memory_bytes": psutil.virtual_memory().total,
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "peak_tree_rss_bytes": peak["rss"],
        "peak_tree_pss_bytes": peak.get("pss"),
        "peak_main_rss_bytes": main_peak,
        "max_processes": max_processes,
        "at_peak": peak,
        "per_process_peaks": sorted(process_peaks.values(), key=lambda r: -r["rss"]),
        "timeline": timeline,
    }


def _gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / GIB:.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--output", type=Path, default=RESULTS / "process_memory.json")
    parser.add_argument("--no-pss", action="store_true", help="RSS only (no /proc smaps reads)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS…]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to measure after --")
    result = measure(command, args.interval, pss=not args.no_pss)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"process_memory: peak RSS of the tree {_gib(result['peak_tree_rss_bytes'])} "
        f"(PSS {_gib(result['peak_tree_pss_bytes'])}) over {len(result['at_peak']['processes'])} "
        f"processes at {result['at_peak']['t']} s; main process {_gib(result['peak_main_rss_bytes'])}; "
        f"{result['wall_seconds']} s, exit {result['exit_code']} → {args.output}",
        file=sys.stderr,
    )
    for row in result["at_peak"]["processes"]:
        print(f"  {_gib(row['rss']):>10}  {row['pid']:>7}  {row['label']}", file=sys.stderr)
    return int(result["exit_code"] or 0)


if __name__ == "__main__":
    sys.exit(main())

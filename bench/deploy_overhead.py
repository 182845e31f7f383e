"""A round's non-training overhead on Flower's deployment engine, cold ClientApps vs warm nodes.

For each mode, `fedtune federation up --nodes N` (cold: `--cold`, every message's ClientApp process
imports torch, loads the model and tokenizes its data; warm: a node worker keeps them), then one
`flwr run . local-deployment` of the embedded default job shape on N clients, all N training each
round. The server's own scoring (held-out and probe losses) is turned off so that a round is
the engine and the clients only. Per round: its wall time (metrics.jsonl), the longest client
training loop (clients.jsonl `train_seconds`), the longest `local_train` (`seconds`: adapter load,
data, training, encoding), and the differences — the overhead: message
transport, ClientApp process start, imports, model load, tokenization, encoding, aggregation.
Round 1 carries the first load in both modes; rounds 2.. are the steady state.

    .venv/bin/python bench/deploy_overhead.py                  # 2 nodes, 3 rounds, both modes
    .venv/bin/python bench/deploy_overhead.py --modes warm --rounds 4 --set train.seq-length=128

Writes bench/results/deploy_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fedtune.rundir import read_clients, read_metrics, read_summary  # noqa: E402
from fedtune.runtime.local import down, flower_env, up  # noqa: E402


def measure(mode: str, args: argparse.Namespace, work: Path) -> dict:
    directory = work / f"federation-{mode}"
    out = work / "runs"
    state = up(directory, args.nodes, tls=True, auth=True, warm=mode == "warm", timeout_s=120)
    settings = [
        f"num-server-rounds={args.rounds}",
        f"federation.num-clients={args.nodes}",
        f"strategy.clients-per-round={args.nodes}",
        "data.heldout-examples=0",
        "eval.probe-examples=0",
        f"run.output-dir='{out}'",
        f"run.name='{mode}'",
        *args.set,
    ]
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [str(Path(sys.executable).parent / "flwr"), "run", str(ROOT), state["connection"],
             "--stream", "--run-config", " ".join(settings)],
            env=flower_env(Path(state["flwr_home"])), cwd=work, capture_output=True, text=True,
            timeout=args.timeout,
        )  # fmt: skip
    finally:
        down(directory)
    wall = time.perf_counter() - started
    run_dir = out / mode
    summary = read_summary(run_dir)
    if summary.get("state") != "completed":
        raise SystemExit(f"{mode}: the run did not complete: {(done.stdout + done.stderr)[-2000:]}")
    metrics = read_metrics(run_dir)
    clients = read_clients(run_dir)
    rounds = []
    for m in metrics:
        done = [c for c in clients if c["round"] == m["round"] and "problem" not in c]
        longest = max(c["train_seconds"] for c in done)
        in_client = max(c["seconds"] for c in done)  # local_train from message to reply
        rounds.append(
            {"round": m["round"], "seconds": m["seconds"], "train_seconds": round(longest, 2),
             "client_seconds": round(in_client, 2),
             "overhead_seconds": round(m["seconds"] - longest, 2),
             "outside_client_seconds": round(m["seconds"] - in_client, 2),
             "overhead_ratio": round((m["seconds"] - longest) / longest, 3)}
        )  # fmt: skip
    steady = rounds[1:] or rounds
    return {
        "mode": mode,
        "wall_seconds": round(wall, 1),
        "rounds": rounds,
        "steady_overhead_seconds": round(
            statistics.fmean(r["overhead_seconds"] for r in steady), 2
        ),
        "steady_train_seconds": round(statistics.fmean(r["train_seconds"] for r in steady), 2),
        "steady_overhead_ratio": round(statistics.fmean(r["overhead_ratio"] for r in steady), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default="cold,warm")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="extra KEY=VALUE run config")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "deploy_overhead.json"))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="ft-deploy-") as work:
        for mode in args.modes.split(","):
            print(
                f"[{mode}] federation up, {args.rounds} rounds on {args.nodes} nodes …", flush=True
            )
            result = measure(mode, args, Path(work))
            results.append(result)
            print(json.dumps(result, indent=1), flush=True)
    report = {
        "machine": f"{os.cpu_count()} CPU cores",
        "date": time.strftime("%Y-%m-%d"),
        "nodes": args.nodes,
        "rounds": args.rounds,
        "extra_settings": args.set,
        "results": results,
    }
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

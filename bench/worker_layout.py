"""One simulation worker with all the cores, or one worker per core? Local-training throughput of
the embedded default's client, both ways, on the same cores.

- `threads`: one process trains one client's round with torch using all `--cores` threads, then a
  second client's round (what one Ray worker with `num_cpus=cores` does with a round's clients).
- `processes`: `--cores` processes start at once, each training one client's round with one thread
  (what one worker per core does), each with its own copy of the model.

Each case reports the training loop's wall time (model loading excluded: both layouts pay it once
per worker) and the tokens per second over all clients, next to an fp32 matmul peak measured with
1 and with `--cores` threads in the same run. Nothing else should run on the machine meanwhile.

    .venv/bin/python bench/worker_layout.py        # writes bench/results/worker_layout.json
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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def train_clients(partitions: list[int], threads: int, settings: dict | None = None) -> list[dict]:
    """In this process: build the run configuration (the defaults plus `settings`), load the
    model, adapter and tokenizer once as a ClientApp's worker does, and train one round of each
    partition's client; one row per client."""
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from fedtune.config import build_config
    from fedtune.federation.client_app import get_partition, get_worker
    from fedtune.model.adapters import adapter_state, load_adapter_state
    from fedtune.training.local import train_local

    torch.set_num_threads(threads)
    config = build_config(settings or {})
    worker = get_worker(config)
    train = config.train
    initial = {k: v.clone() for k, v in adapter_state(worker.model).items()}
    rows = []
    for partition in partitions:
        load_adapter_state(worker.model, initial)  # every client starts from the same global
        examples, _ = get_partition(worker, config, partition, config.federation.num_clients)
        started = time.perf_counter()
        result = train_local(
            worker.model, examples, steps=train.local_steps, batch_size=train.batch_size,
            grad_accumulation=train.gradient_accumulation_steps,
            learning_rate=train.learning_rate_max, seed=train.seed,
            pad_id=worker.tokenizer.pad_token_id, max_grad_norm=train.max_grad_norm,
            weight_decay=train.weight_decay, device=worker.device,
        )  # fmt: skip
        rows.append(
            {
                "partition": partition,
                "threads": threads,
                "seconds": round(time.perf_counter() - started, 2),
                "tokens": result.tokens,
                "loss": result.train_loss,
            }
        )
    return rows


def child(args: argparse.Namespace) -> int:
    partitions = [int(p) for p in args.partitions.split(",")]
    print(json.dumps(train_clients(partitions, args.threads)), flush=True)
    return 0


def spawn(partitions: list[int], threads: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [sys.executable, __file__, "--child", "--threads", str(threads),
               "--partitions", ",".join(map(str, partitions))]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)


def case(groups: list[list[int]], threads: int) -> dict:
    """Start one process per group at once; the training loops' span and throughput."""
    processes = [spawn(group, threads) for group in groups]
    rows = []
    for process in processes:
        out, _ = process.communicate()
        if process.returncode:
            raise SystemExit(f"a training process failed (exit {process.returncode})")
        rows += json.loads(out.strip().splitlines()[-1])
    # Processes train at the same time: the case lasts as long as its slowest process's loops.
    span = max(sum(r["seconds"] for r in rows if r["partition"] in g) for g in groups)
    tokens = sum(r["tokens"] for r in rows)
    return {"clients": rows, "seconds": round(span, 2), "tokens_per_s": round(tokens / span, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--output", default=str(RESULTS / "worker_layout.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--partitions", default="0", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    sys.path.insert(0, str(ROOT / "bench"))
    import torch

    from train_throughput import matmul_peak_gflops

    torch.set_num_threads(1)
    peak_1 = matmul_peak_gflops()
    torch.set_num_threads(args.cores)
    peak_n = matmul_peak_gflops()
    clients = list(range(args.cores))
    print(f"fp32 matmul peak: {peak_1:.1f} GFLOP/s (1 thread), {peak_n:.1f} ({args.cores})")
    threads = case([clients], args.cores)
    print(f"one worker, {args.cores} threads: {threads['tokens_per_s']} tokens/s")
    processes = case([[c] for c in clients], 1)
    print(f"{args.cores} workers, 1 thread each: {processes['tokens_per_s']} tokens/s")
    ratio = threads["tokens_per_s"] / processes["tokens_per_s"]
    print(f"one worker / {args.cores} workers: {ratio:.3f}")
    result = {
        "benchmark": "worker_layout",
        "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "torch": torch.__version__,
        "cores": args.cores,
        "load_average_before": os.getloadavg(),
        "matmul_peak_gflops": {"1": peak_1, str(args.cores): peak_n},
        "one_worker_all_threads": threads,
        "one_worker_per_core": processes,
        "throughput_ratio": round(ratio, 3),
    }
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

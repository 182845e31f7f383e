"""A GPU's numbers in one run, from what the packages ship (the embedded model; no hub), ≤ 8 min on
one H100:

1. `peak`: the device's bf16 matmul rate (fp32 on a CPU), measured here, the yardstick of the rest.
2. `train`: LoRA training throughput in bf16 — fedtune's client loop (without and with gradient
   checkpointing) against the FlowerTune template's TRL SFTTrainer (`pip install -e ".[bench]"`),
   same examples and batch shape (bench/train_throughput.py) — as tokens/s, a fraction of the peak
   and a ratio to TRL.
3. `quantized_round`: the embedded model loaded in 4 bits through bitsandbytes and one federated
   round of `fedtune run` on it (`model.quantization=4`).
4. `eval`: the board protocol's questions/s, fedtune's batched generation against the official
   one-question-at-a-time loop, identical generations asserted (bench/eval_throughput.py).
5. `default_job`: `fedtune run` with no settings — the README's main job — on the GPU.

Each step records its result or why it failed or was skipped; the JSON holds them all, and the exit
status is 1 when a step failed. `--dry-run` runs every step on the CPU at toy size (fp32, a few
examples, one tiny round, no 4-bit loading, which bitsandbytes does on CUDA only), so that CI keeps
this script working on machines without a GPU; its numbers mean nothing.

    .venv/bin/python bench/gpu_check.py               # a CUDA machine: bench/results/gpu_check.json
    .venv/bin/python bench/gpu_check.py --dry-run --json /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODEL = "embedded:smollm2-135m-instruct"


class Skipped(Exception):
    """A step that cannot run here, and why."""


def sizes(dry_run: bool) -> dict[str, Any]:
    """What each step does: the GPU's sizes, or toy ones for --dry-run on a CPU."""
    if dry_run:
        return {"device": "cpu", "dtype": "float32", "matmul": 256, "steps": 1, "batch": 2,
                "seq": 64, "questions": 6, "chunks": 1}  # fmt: skip
    return {"device": "cuda", "dtype": "bfloat16", "matmul": 8192, "steps": 3, "batch": 16,
            "seq": 512, "questions": 570, "chunks": 2}  # fmt: skip


def matmul_peak(device: str, dtype: str, size: int, seconds: float = 2.0) -> float:
    """Best rate of size³ matrix products on `device` in `dtype`, GFLOP/s."""
    import torch

    kind = getattr(torch, dtype)
    a = torch.randn(size, size, device=device, dtype=kind)
    b = torch.randn(size, size, device=device, dtype=kind)
    best, ended = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < ended:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(5):
            a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = max(best, 5 * 2 * size**3 / (time.perf_counter() - started) / 1e9)
    return best


def step_peak(size: dict[str, Any], _: argparse.Namespace) -> dict[str, Any]:
    import torch

    gflops = matmul_peak(size["device"], size["dtype"], size["matmul"])
    return {
        "matmul_gflops": round(gflops, 1),
        "dtype": size["dtype"],
        "size": size["matmul"],
        "device_name": torch.cuda.get_device_name(0) if size["device"] == "cuda" else "cpu",
    }


def step_train(size: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from fedtune.model.loading import load_model, load_tokenizer, resolve_model
    from train_throughput import lora_train_flops_per_token, pick_rows, run_fedtune, run_reference

    source = resolve_model(MODEL)
    tokenizer = load_tokenizer(source)
    rows = pick_rows(size["steps"] * size["batch"], seed=0)
    params = sum(p.numel() for p in load_model(source, device="cpu").parameters())
    shape = (rows, tokenizer, source, size["steps"], size["batch"], size["seq"])
    on = {"device": size["device"], "dtype": size["dtype"]}
    runs: dict[str, Any] = {
        "fedtune": run_fedtune(*shape, False, **on),
        "fedtune (gradient checkpointing)": run_fedtune(*shape, True, **on),
    }
    reference = "TRL SFTTrainer (template, gradient checkpointing)"
    if importlib.util.find_spec("trl") is None:
        runs[reference] = {"skipped": 'trl is not installed (pip install -e ".[bench]")'}
    else:
        runs[reference] = run_reference(*shape, True, **on)
    peak = args.peak_gflops
    for name, run in runs.items():
        if "tokens_per_s" not in run:
            continue
        flops = lora_train_flops_per_token(params, "checkpointing" in name)
        run["model_gflops"] = round(run["tokens_per_s"] * flops / 1e9, 1)
        if peak:
            run["fraction_of_peak"] = round(run["model_gflops"] / peak, 4)
        if "tokens_per_s" in runs[reference]:
            run["vs_trl"] = round(run["tokens_per_s"] / runs[reference]["tokens_per_s"], 3)
    torch.cuda.empty_cache() if size["device"] == "cuda" else None
    return {"steps": size["steps"], "batch": size["batch"], "seq_length": size["seq"],
            "dtype": size["dtype"], "runs": runs}  # fmt: skip


def fedtune_run(out: Path, name: str, sets: list[str], timeout_s: float) -> dict[str, Any]:
    """`fedtune run` with `sets`; its summary's headline numbers and the wall time."""
    command = [sys.executable, "-m", "fedtune.cli", "run", "--set", f"run.output-dir={out}",
               "--set", f"run.name={name}"]  # fmt: skip
    for item in sets:
        command += ["--set", item]
    env = dict(os.environ, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"fedtune run exited {done.returncode}: {done.stderr[-1500:]}")
    summary = json.loads((out / name / "summary.json").read_text())
    return {
        "seconds": round(seconds, 1),
        "rounds": summary["rounds_completed"],
        "final_train_loss": summary.get("final_train_loss"),
        "final_heldout_loss": summary.get("final_heldout_loss"),
        "total_bytes": summary["communication"]["total_bytes"],
        "settings": sets,
    }


TINY_ROUND = ["num-server-rounds=1", "federation.num-clients=2", "strategy.clients-per-round=2",
              "train.local-steps=1", "train.batch-size=1", "train.seq-length=64",
              "eval.probe-examples=2", "data.heldout-examples=8"]  # fmt: skip


def step_quantized_round(size: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    sets = list(TINY_ROUND)
    note = None
    if size["device"] == "cuda":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise Skipped("bitsandbytes is not installed")
        sets.append("model.quantization=4")
    else:
        note = "4-bit loading needs CUDA (bitsandbytes): the round ran unquantized"
    result = fedtune_run(args.work, "quantized-round", sets, timeout_s=600)
    return {**result, "note": note} if note else result


def step_eval(size: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import eval_throughput

    path = args.work / "eval_throughput.json"
    eval_throughput.main([
        "--sample", str(size["questions"]), "--limit", str(size["questions"]),
        "--chunks", str(size["chunks"]), "--device", size["device"], "--dtype", size["dtype"],
        "--output", str(path), *(["--no-full-split"] if size["device"] == "cpu" else []),
    ])  # fmt: skip
    report = json.loads(path.read_text())
    keep = ("n_questions", "identical_generations", "seconds", "questions_per_s", "speedup")
    return {key: report[key] for key in keep}


def step_default_job(size: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    # The README's `fedtune run`; on a CPU dry run a tiny round of it (the real one takes 6 min).
    return fedtune_run(args.work, "default", [] if size["device"] == "cuda" else TINY_ROUND, 900)


STEPS: dict[str, Callable[[dict[str, Any], argparse.Namespace], dict[str, Any]]] = {
    "peak": step_peak,
    "train": step_train,
    "quantized_round": step_quantized_round,
    "eval": step_eval,
    "default_job": step_default_job,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU, toy sizes")
    parser.add_argument("--only", help=f"comma-separated steps of {', '.join(STEPS)}")
    parser.add_argument("--json", type=Path, help="default: bench/results/gpu_check.json")
    args = parser.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here; --dry-run runs the steps on the CPU")
    wanted = args.only.split(",") if args.only else list(STEPS)
    unknown = [name for name in wanted if name not in STEPS]
    if unknown:
        parser.error(f"unknown step {unknown[0]!r} (steps: {', '.join(STEPS)})")
    size = sizes(args.dry_run)
    out = args.json or RESULTS / ("gpu_check_dry_run.json" if args.dry_run else "gpu_check.json")
    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "gpu_check",
        "dry_run": args.dry_run,
        "model": MODEL,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "steps": {},
    }
    failed = False
    with tempfile.TemporaryDirectory(prefix="fedtune-gpu-check-") as work:
        args.work = Path(work)
        args.peak_gflops = None
        for name in wanted:
            print(f"gpu_check: {name} …", flush=True)
            begun = time.perf_counter()
            try:
                result = {"status": "ok", **STEPS[name](size, args)}
            except Skipped as why:
                result = {"status": "skipped", "reason": str(why)}
            except Exception as exc:  # noqa: BLE001 — recorded, and the exit status says so
                failed = True
                result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
            result["seconds"] = round(time.perf_counter() - begun, 1)
            if name == "peak" and result["status"] == "ok":
                args.peak_gflops = result["matmul_gflops"]
            report["steps"][name] = result
            print(f"gpu_check: {name} {result['status']} in {result['seconds']} s", flush=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"gpu_check: {report['seconds']} s in all; wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))  # train_throughput, eval_throughput beside this script
    sys.exit(main())

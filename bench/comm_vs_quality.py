"""Accuracy for bytes: fp32 FedAvg LoRA against codecs and adapters that send less.

Every configuration runs `fedtune run` on the embedded default (SmolLM2-135M-Instruct, Alpaca-GPT4
sample, 20 clients, 2 per round) with the same seed, rounds and data, then `fedtune eval` scores
its adapter on a fixed stratified MMLU subset with the log-likelihood protocol. For each:
total bytes (down/up), final held-out loss, bytes to reach the reference's final held-out loss,
MMLU (board average of the three categories, with its standard error), wall time.
Writes JSON and a PNG of held-out loss against bytes (log scale) with the Pareto front.

    .venv/bin/python bench/comm_vs_quality.py --only fp32,int8,sb-r32-int8   # ~1 h, 2 CPU cores
    .venv/bin/python bench/comm_vs_quality.py                 # every configuration: ~3–4 h
    .venv/bin/python bench/comm_vs_quality.py --only fp32,sb-int8 --rounds 3 --mmlu 200  # quick

On 2 CPU cores a configuration costs ~7–17 min of training and ~7 min for the 1,000 5-shot MMLU
questions, so an hour holds the reference and two others.

On a GPU: --rounds 20 --clients-per-round 4 --local-steps 10 --seq-length 512 --mmlu 14042
(and `--set` for anything else); every run's directory is kept under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fedtune.rundir import SUMMARY_FILE, read_summary  # noqa: E402
from fedtune_runs import run_logged  # beside this script

ROOT = Path(__file__).resolve().parents[1]

# name → the settings that differ from the reference (fp32 LoRA, FedAvg, identity codecs).
CONFIGS: dict[str, list[str]] = {
    "fp32": [],
    "fp16": ["compress.downlink=fp16", "compress.uplink=fp16"],
    "int8": ["compress.downlink=int8", "compress.uplink=delta,int8"],
    "int4": ["compress.downlink=int8", "compress.uplink=delta,int4"],
    "topk-ef": [
        "compress.downlink=int8",
        "compress.uplink=delta,top-k=0.05,int8,zstd",
        "compress.error-feedback=true",
    ],
    "ffa": ["model.lora.variant=ffa"],
    "ffa-int8": [
        "model.lora.variant=ffa",
        "compress.downlink=int8,zstd",
        "compress.uplink=delta,int8,zstd",
    ],
    "sb": ["model.lora.variant=sb"],
    # FlexLoRA: clients at ranks 4 and 8 (alpha 16 as the reference), the global at 16 (two
    # clients a round: exact).
    "flexlora": [
        "strategy.name=flexlora",
        "model.lora.peft-lora-r=16",
        "model.lora.client-ranks=4,8",
    ],
    "sb-int8": [
        "model.lora.variant=sb",
        "compress.downlink=int8,zstd",
        "compress.uplink=delta,int8,zstd",
    ],
    "sb-r16-int8": [
        "model.lora.variant=sb",
        "model.lora.peft-lora-r=16",
        "model.lora.peft-lora-alpha=32",
        "compress.downlink=int8,zstd",
        "compress.uplink=delta,int8,zstd",
    ],
    # r = 32: 16× the r×r matrix of r = 8, still ~1/50 of the reference's bytes per round.
    "sb-r32-int8": [
        "model.lora.variant=sb",
        "model.lora.peft-lora-r=32",
        "model.lora.peft-lora-alpha=64",
        "compress.downlink=int8,zstd",
        "compress.uplink=delta,int8,zstd",
    ],
}


def mmlu_with_error(result: dict) -> tuple[float, float]:
    """Board average (unweighted mean of the three categories, %) and its standard error, as
    `fedtune eval` computes them."""
    return 100 * result["average"], 100 * result["average_stderr"]


def pareto(points: list[tuple[float, float, str]]) -> list[str]:
    """Names on the front: no other point has fewer-or-equal bytes and lower-or-equal loss."""
    front = []
    for bytes_, loss, name in points:
        dominated = any(
            b <= bytes_ and val <= loss and (b, val) != (bytes_, loss) for b, val, _ in points
        )
        if not dominated:
            front.append(name)
    return front


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", help="comma-separated configuration names")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients-per-round", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--mmlu", type=int, default=1000, help="stratified MMLU questions")
    parser.add_argument(
        "--shots",
        type=int,
        default=5,
        choices=(0, 5),
        help="MMLU examples in the prompt (5: at 0 shots the 135M model answers A to everything)",
    )
    parser.add_argument("--set", action="append", default=[], help="extra KEY=VALUE for all")
    parser.add_argument("--out", default="/tmp/fedtune-comm-vs-quality")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "comm_vs_quality.json"))
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(CONFIGS)
    if names[0] != "fp32":
        names = ["fp32", *[n for n in names if n != "fp32"]]  # the reference comes first
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [
        f"num-server-rounds={args.rounds}",
        f"strategy.clients-per-round={args.clients_per_round}",
        f"train.local-steps={args.local_steps}",
        f"train.seq-length={args.seq_length}",
        # Bytes-to-target needs the held-out loss after every round.
        "eval.heldout-every-rounds=1",
        f"run.output-dir={out}",
        *args.set,
    ]
    sys.path.insert(0, str(ROOT / "src"))
    from fedtune.report import read_curves

    results = []
    for name in names:
        run_dir = out / name
        if not (run_dir / SUMMARY_FILE).exists():
            command = [sys.executable, "-m", "fedtune.cli", "run"]
            if run_dir.exists():  # an interrupted grid continues where the run stopped
                command += ["--resume", str(run_dir)]
            else:
                sets = [*common, f"run.name={name}", *CONFIGS[name]]
                command += [x for item in sets for x in ("--set", item)]
            print(f"[{name}] training …", flush=True)
            train_s = run_logged(command, out / f"{name}.run.log")
        else:
            train_s = read_summary(run_dir)["seconds"]
        eval_dir = run_dir / "eval"
        pattern = f"mmlu_loglik_{args.shots}shot_*.json"
        timing = run_dir / f"bench-eval-{args.shots}shot.json"
        found = sorted(eval_dir.glob(pattern)) if eval_dir.exists() else []
        if not found:
            print(f"[{name}] MMLU ({args.mmlu} questions, log-likelihood) …", flush=True)
            command = [sys.executable, "-m", "fedtune.cli", "eval", "--adapter", str(run_dir)]
            command += ["--protocol", "loglik", "--shots", str(args.shots)]
            command += ["--sample", str(args.mmlu), "--no-progress"]
            eval_s = run_logged(command, out / f"{name}.eval-{args.shots}shot.log")
            found = sorted(eval_dir.glob(pattern))
            timing.write_text(json.dumps({"eval_seconds": eval_s}) + "\n")
        else:  # scored by an earlier invocation, which kept its wall time beside the result
            eval_s = json.loads(timing.read_text())["eval_seconds"] if timing.exists() else 0.0
        scored = json.loads(found[-1].read_text())
        if scored["n_questions"] != args.mmlu:
            raise SystemExit(
                f"{found[-1]} scored {scored['n_questions']} questions, not {args.mmlu}"
            )
        mmlu, mmlu_se = mmlu_with_error(scored)
        curves = read_curves(run_dir)
        summary = read_summary(run_dir)
        results.append(
            {
                "name": name,
                "settings": CONFIGS[name],
                "codecs": summary["codecs"],
                "downlink_bytes": summary["communication"]["downlink_bytes"],
                "uplink_bytes": summary["communication"]["uplink_bytes"],
                "total_bytes": summary["communication"]["total_bytes"],
                "heldout": curves.heldout,
                "cumulative_bytes": [
                    d + u for d, u in zip(curves.downlink, curves.uplink, strict=True)
                ],
                "final_heldout_loss": curves.final_heldout,
                "mmlu_loglik": round(mmlu, 2),
                "mmlu_se": round(mmlu_se, 2),
                "mmlu_predicted_letters": scored["predicted_letters"],
                "train_seconds": round(train_s, 1),
                "eval_seconds": round(eval_s, 1),
                "curves": curves,
            }
        )
    target = results[0]["final_heldout_loss"]
    reference_bytes = results[0]["total_bytes"]
    for row in results:
        curves = row.pop("curves")
        row["bytes_to_reference_loss"] = curves.bytes_to(target)
        row["fewer_bytes_than_reference"] = (
            round(reference_bytes / row["bytes_to_reference_loss"], 1)
            if row["bytes_to_reference_loss"]
            else None
        )
        row["mmlu_within_one_se"] = row["mmlu_loglik"] >= results[0]["mmlu_loglik"] - row["mmlu_se"]
    front = pareto([(r["total_bytes"], r["final_heldout_loss"], r["name"]) for r in results])
    report = {
        "machine": f"{os.cpu_count()} CPU cores",
        "rounds": args.rounds,
        "clients_per_round": args.clients_per_round,
        "local_steps": args.local_steps,
        "seq_length": args.seq_length,
        "mmlu_questions": args.mmlu,
        "mmlu_shots": args.shots,
        "reference_final_heldout_loss": target,
        "pareto_front": front,
        "configs": results,
    }
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    draw(results, front, Path(args.json).with_suffix(".png"))
    print(
        f"{'config':<13}{'total bytes':>14}{'held-out':>10}{'to ref loss':>14}{'×fewer':>8}"
        f"{'MMLU':>8}{'±SE':>6}{'train s':>9}"
    )
    for row in results:
        reach = row["bytes_to_reference_loss"]
        print(
            f"{row['name']:<13}{row['total_bytes']:>14,}{row['final_heldout_loss']:>10.4f}"
            f"{(f'{reach:,}' if reach else 'not reached'):>14}"
            f"{(row['fewer_bytes_than_reference'] or float('nan')):>8.1f}"
            f"{row['mmlu_loglik']:>8.2f}{row['mmlu_se']:>6.2f}{row['train_seconds']:>9.0f}"
        )
    print(f"Pareto front (bytes, final held-out loss): {', '.join(front)}")


def draw(results: list[dict], front: list[str], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=110, layout="constrained")
    axis = figure.subplots()
    for row in results:
        rounds = sorted(int(r) for r in row["heldout"] if int(r) > 0)
        xs = row["cumulative_bytes"][: len(rounds)]
        ys = [row["heldout"][r] for r in rounds]
        axis.plot(xs, ys, marker="o", markersize=3, label=row["name"])
    points = sorted(
        (r["total_bytes"], r["final_heldout_loss"]) for r in results if r["name"] in front
    )
    axis.plot(
        *zip(*points, strict=True), color="black", linestyle="--", linewidth=1, label="Pareto front"
    )
    axis.axhline(results[0]["final_heldout_loss"], color="grey", linestyle=":", linewidth=1)
    axis.set(xscale="log", xlabel="cumulative bytes (down + up, log)", ylabel="held-out loss")
    axis.set_title("Held-out loss against bytes sent")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    figure.savefig(path)


if __name__ == "__main__":
    main()

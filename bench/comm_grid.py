"""Fewer bytes at equal quality, over seeds and partitions: methods against fp32 LoRA references.

The regime (per run; `REGIME`): the embedded SmolLM2-135M-Instruct on Dolly-15k (embedded, with its
8 categories), 20 clients, 4 a round, 20 rounds, 2 local steps of 2 examples of at most 128 tokens,
the held-out loss on 32 held-out rows after every round. Two partitionings of the same rows — `iid`
and `dirichlet` (α = 0.5 over the categories) — and three seeds (`train.seed` and `data.seed`
together: the adapter's start, the example order and, for dirichlet, the partition).

Configurations (`CONFIGS`): the references — fp32 FedAvg LoRA at r = 8 and at r = 32 (equal
capacity to the r×r adapter at r = 32) — and the methods, each an adapter variant and codecs of
fedtune's registries. Stages, each resumable (a finished run is read, an interrupted one resumed):

1. `sweep`: every configuration at each learning rate of `LEARNING_RATES` on the first seed, iid
   — and, while the best lies at an edge of the rates swept, at half the lowest or twice the
   highest (`MAX_EXTENSIONS` more at most); the rate with the lowest final held-out loss is
   chosen, by this script, and recorded.
2. `grid`: every configuration at its chosen rate, on both partitionings and every seed.
3. `mmlu`: 1,000 MMLU questions (log-likelihood, 0-shot) for each configuration's iid run of the
   first seed whose adapter is at hand: a guard that the bytes saved did not cost accuracy (within one standard error).
4. `report` (always last): per partitioning, over the seeds every reference has run (all three
   once the grid is complete), the best reference is the one with the lower mean final held-out
   loss; each seed's target is that reference's final held-out loss in that seed;
   each configuration's Cost-to-Target (`fedtune.accounting.targets`) against it and the ratio
   reference total bytes / cost, mean ± std over the seeds that reached it (and how many did).

    .venv/bin/python bench/comm_grid.py                      # everything: hours on 2 CPU cores
    .venv/bin/python bench/comm_grid.py --stage sweep --max-minutes 60   # a slice, then stop
    .venv/bin/python bench/comm_grid.py --stage report       # JSON, PNG and table from what ran

Writes bench/results/comm_grid.json and comm_grid.png. Runs live under --out (large, local);
every finished run is also written to the record, bench/results/comm_grid_runs.json (its final
held-out loss, curve, bytes, seconds and MMLU score), and the stages read the record first — so
the results outlive the run directories and the grid goes on where it stopped on another machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from fedtune.accounting.targets import cost_to_target, fewer_bytes, quality_under_budget
from fedtune.report import read_curves
from fedtune.rundir import SUMMARY_FILE, read_summary
from fedtune_runs import run_logged  # beside this script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

REGIME = [
    "data.name=embedded:dolly-15k",
    "federation.num-clients=20",
    "strategy.clients-per-round=4",
    "num-server-rounds=20",
    "train.local-steps=2",
    "train.batch-size=2",
    "train.seq-length=128",
    "data.heldout-examples=32",
    "eval.heldout-every-rounds=1",
    "eval.probe-examples=0",
    "train.save-every-round=5",
]
PARTITIONS: dict[str, list[str]] = {
    "iid": [],
    "dirichlet": [
        "data.partitioner=dirichlet",
        "data.partition-by=category",
        "data.dirichlet-alpha=0.5",
    ],
}
SEEDS = (1, 2, 3)
LEARNING_RATES = (1e-3, 2e-3, 4e-3)  # train.learning-rate-max; the minimum is a tenth of it
MAX_EXTENSIONS = 2  # rates added beyond an edge of the sweep while the best lies there

SB32 = ["model.lora.variant=sb", "model.lora.peft-lora-r=32", "model.lora.peft-lora-alpha=64"]
EF = ["compress.error-feedback=true", "compress.stochastic-rounding=true"]
CONFIGS: dict[str, list[str]] = {
    # References: fp32 both ways, FedAvg.
    "lora-r8": [],
    "lora-r32": ["model.lora.peft-lora-r=32", "model.lora.peft-lora-alpha=64"],
    # The methods, in the order the sweep takes them: the likeliest to reach ≥ 200× first.
    # Lower rank, fewest bytes: the r×r adapter at r = 16 (only R, 16×16 per module, travels), 2-bit
    # updates, 4-bit broadcasts.
    "sb16-int2-ef": [
        "model.lora.variant=sb",
        "model.lora.peft-lora-r=16",
        "model.lora.peft-lora-alpha=32",
        "compress.downlink=int4,zstd",
        "compress.uplink=delta,int2,zstd",
        *EF,
    ],
    # r = 32 (R is 32×32 per module) at 2 bits both ways. (Sparse top-k updates of R do not pay:
    # at r = 32 each kept value's uint16 index costs more than the 2–4 bits it saves; ternary codes
    # are sparse already, and zstd packs their zeros.)
    "sb32-int2-both-ef": [
        *SB32,
        "compress.downlink=int2,zstd",
        "compress.uplink=delta,int2,zstd",
        *EF,
    ],  # fmt: skip
    "sb32-int2-ef": [*SB32, "compress.downlink=int4,zstd", "compress.uplink=delta,int2,zstd", *EF],
    # Low-rank updates of R: each R's delta as rank-8 factors (32+32)·8 = 512 values, not 1,024.
    "sb32-lr8-int4-ef": [
        *SB32,
        "compress.downlink=int8,zstd",
        "compress.uplink=delta,low-rank=8,int4,zstd",
        *EF,
    ],  # fmt: skip
    "sb32-int4-ef": [*SB32, "compress.downlink=int8,zstd", "compress.uplink=delta,int4,zstd", *EF],
}
REFERENCES = ("lora-r8", "lora-r32")


def rate_name(rate: float) -> str:
    return f"lr{rate:g}"


def run_name(config: str, partition: str, seed: int, rate: float) -> str:
    return f"{config}.{partition}.s{seed}.{rate_name(rate)}"


def settings(config: str, partition: str, seed: int, rate: float) -> list[str]:
    return [
        *REGIME,
        *PARTITIONS[partition],
        f"train.seed={seed}",
        f"data.seed={seed}",
        f"train.learning-rate-max={rate:g}",
        f"train.learning-rate-min={rate / 10:g}",
        *CONFIGS[config],
    ]


class Budget:
    """Stops starting runs once --max-minutes have passed (a run in progress finishes)."""

    def __init__(self, minutes: float | None) -> None:
        self.deadline = time.monotonic() + 60 * minutes if minutes else math.inf

    def left(self) -> bool:
        return time.monotonic() < self.deadline


class Runs:
    """The grid's runs: their directories under `out` and the record of the finished ones
    (`record`: run name → `describe_run`, plus its MMLU score once scored), read first."""

    def __init__(self, out: Path, record: Path) -> None:
        self.out, self.record = out, record
        self.entries: dict[str, dict[str, Any]] = (
            json.loads(record.read_text()) if record.exists() else {}
        )

    def finished(self, name: str, *, curve: bool = False) -> dict[str, Any] | None:
        """The finished run `name` as recorded (recorded now if only its directory says so);
        None while it has not finished. `curve`: only a run recorded with its per-round curve
        counts (the grid's comparisons need it; a sweep result carried from an earlier report
        holds its final loss alone, which is all the sweep reads)."""
        entry = self.entries.get(name)
        if entry is None or (curve and "curve" not in entry):
            if not (self.out / name / SUMMARY_FILE).exists():
                return None
            self.entries[name] = {**(entry or {}), **describe_run(self.out / name)}
            self.save()
        return self.entries[name]

    def add(self, name: str, **values: Any) -> None:
        self.entries[name] = {**self.entries[name], **values}
        self.save()

    def save(self) -> None:
        """Write the record, merged into what is on disk (another process, e.g. a report beside
        a running grid, may have recorded runs or scores since this one read it)."""
        on_disk = json.loads(self.record.read_text()) if self.record.exists() else {}
        for name, entry in on_disk.items():
            self.entries[name] = {**entry, **self.entries.get(name, {})}
        self.record.parent.mkdir(parents=True, exist_ok=True)
        partial = self.record.with_suffix(".partial")
        partial.write_text(json.dumps(self.entries, indent=1, sort_keys=True) + "\n")
        partial.replace(self.record)


def ensure_run(
    runs: Runs, name: str, sets: list[str], budget: Budget, *, curve: bool = False
) -> dict[str, Any] | None:
    """The finished run `name`: trained now (or resumed) if it is not yet (`curve`: nor recorded
    with its curve); None when the time budget ran out first or the run failed."""
    if (done := runs.finished(name, curve=curve)) is not None:
        return done
    if not budget.left():
        return None
    out, run_dir = runs.out, runs.out / name
    command = [sys.executable, "-m", "fedtune.cli", "run"]
    if run_dir.exists():  # an interrupted run continues where it stopped
        command += ["--resume", str(run_dir)]
    else:
        for item in [*sets, f"run.output-dir={out}", f"run.name={name}"]:
            command += ["--set", item]
    print(f"[{name}] training …", flush=True)
    try:
        seconds = run_logged(command, out / f"{name}.log")
    except SystemExit as failed:  # one failed run does not stop the grid; the next call retries it
        print(f"[{name}] failed: {failed}", flush=True)
        return None
    print(f"[{name}] done in {seconds:.0f} s", flush=True)
    return runs.finished(name, curve=curve)


def describe_run(run_dir: Path) -> dict[str, Any]:
    curves = read_curves(run_dir)
    summary = read_summary(run_dir)
    return {
        "run": run_dir.name,
        "total_bytes": curves.total_bytes,
        "final_heldout_loss": curves.final_heldout,
        "curve": [[p.round, p.bytes, p.loss] for p in curves.points],
        "seconds": summary.get("seconds"),
        "codecs": summary.get("codecs"),
    }


def _final_loss(runs: Runs, config: str, rate: float) -> float | None:
    """The sweep run's final held-out loss (first seed, iid), None while it has not finished."""
    done = runs.finished(run_name(config, "iid", SEEDS[0], rate))
    return None if done is None else float(done["final_heldout_loss"])


def sweep_plan(runs: Runs, config: str) -> tuple[dict[float, float | None], float | None]:
    """A configuration's sweep: the rates it takes so far (rate → final held-out loss, None
    while not run) and the next rate to run (None: the sweep is complete).

    `LEARNING_RATES` first; while the best of them lies at an edge of the rates swept, one more
    rate beyond that edge (half the lowest, or twice the highest), at most `MAX_EXTENSIONS`
    times — so a rate is chosen inside the sweep wherever the extensions allow it.
    """
    losses = {rate: _final_loss(runs, config, rate) for rate in LEARNING_RATES}
    for _ in range(MAX_EXTENSIONS + 1):
        missing = [rate for rate, loss in losses.items() if loss is None]
        if missing:
            return losses, missing[0]
        if len(losses) == len(LEARNING_RATES) + MAX_EXTENSIONS:
            break
        best = min(losses, key=lambda r: losses[r])  # type: ignore[arg-type, return-value]
        if best == min(losses):
            beyond = best / 2
        elif best == max(losses):
            beyond = best * 2
        else:
            break
        losses[beyond] = _final_loss(runs, config, beyond)
    missing = [rate for rate, loss in losses.items() if loss is None]
    return losses, (missing[0] if missing else None)


def sweep_state(runs: Runs, configs: list[str]) -> dict[str, dict[str, float | None]]:
    """Each configuration's sweep so far: rate → final held-out loss (None: not run yet)."""
    return {
        config: {rate_name(r): loss for r, loss in sorted(sweep_plan(runs, config)[0].items())}
        for config in configs
    }


def chosen_rates(runs: Runs, configs: list[str]) -> dict[str, dict[str, Any]]:
    """Each configuration's sweep (final held-out loss by rate, first seed, iid) and the rate
    with the lowest one; configurations whose sweep is incomplete are left out. `edge`: the
    chosen rate is still the lowest or highest swept (the extensions ran out)."""
    chosen = {}
    for config in configs:
        losses, missing = sweep_plan(runs, config)
        if missing is None:
            best = min(losses, key=lambda r: losses[r])  # type: ignore[arg-type, return-value]
            chosen[config] = {
                "rate": best,
                "sweep": {rate_name(r): v for r, v in sorted(losses.items())},
                "edge": best in (min(losses), max(losses)),
            }
    return chosen


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: Runs, chosen: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The report: per partitioning and configuration, the runs at the chosen rate and their
    Cost-to-Target against the best reference of the same seed — over the seeds that every
    reference has run (`seeds`; all of them once the grid is complete); the best reference is the
    one with the lower mean final held-out loss over those seeds."""
    partitions: dict[str, Any] = {}
    for partition in PARTITIONS:
        found: dict[str, dict[int, dict[str, Any]]] = {}
        for config, pick in chosen.items():
            for seed in SEEDS:
                done = runs.finished(run_name(config, partition, seed, pick["rate"]), curve=True)
                if done is not None:  # a copy: the report adds its costs to it
                    found.setdefault(config, {})[seed] = dict(done)
        # The seeds every reference has run (all of them once the grid is complete).
        ready = [seed for seed in SEEDS if all(seed in found.get(r, {}) for r in REFERENCES)]
        if not ready:  # no target yet: the runs alone (the plot draws their curves)
            partitions[partition] = {
                "best_reference": None,
                "seeds": [],
                "configs": {c: {"seeds": len(s), "runs": s} for c, s in found.items()},
                "mixed_machines": mixed_machines(found),
            }
            continue
        best = min(
            REFERENCES,
            key=lambda r: statistics.fmean(found[r][s]["final_heldout_loss"] for s in ready),
        )
        rows = {}
        for config, every_seed in found.items():
            by_seed = {seed: run for seed, run in every_seed.items() if seed in ready}
            if not by_seed:
                continue
            costs, ratios, finals, gaps, budgeted = [], [], [], [], []
            for seed, run in by_seed.items():
                reference = found[best][seed]
                points = [_point(p) for p in run["curve"]]
                cost = cost_to_target(points, reference["final_heldout_loss"])
                run["cost_to_target"] = cost
                run["fewer_bytes"] = fewer_bytes(reference["total_bytes"], cost)
                run["quality_under_budget"] = quality_under_budget(
                    points, reference["total_bytes"] // 200
                )
                finals.append(run["final_heldout_loss"])
                gaps.append(run["final_heldout_loss"] - reference["final_heldout_loss"])
                budgeted.append(run["quality_under_budget"])
                if cost is not None:
                    costs.append(cost)
                    ratios.append(run["fewer_bytes"])
            ratio_mean, ratio_std = mean_std([r for r in ratios if math.isfinite(r)])
            final_mean, final_std = mean_std(finals)
            gap_mean, gap_std = mean_std(gaps)
            cost_mean, cost_std = mean_std([float(c) for c in costs])
            rows[config] = {
                "seeds": len(by_seed),
                "reached": len(costs),
                "total_bytes_mean": statistics.fmean(r["total_bytes"] for r in by_seed.values()),
                "final_heldout_mean": final_mean,
                "final_heldout_std": final_std,
                "above_target_mean": gap_mean,  # final − the seed's target; ≤ 0: reached
                "above_target_std": gap_std,
                "cost_to_target_mean": cost_mean,
                "cost_to_target_std": cost_std,
                "fewer_bytes_mean": ratio_mean,
                "fewer_bytes_std": ratio_std,
                "quality_under_half_percent_budget_mean": statistics.fmean(budgeted)
                if all(b is not None for b in budgeted) and budgeted
                else None,
                "runs": by_seed,
            }
        partitions[partition] = {
            "best_reference": best,
            "seeds": ready,
            "configs": rows,
            "mixed_machines": mixed_machines(found),
        }
    return partitions


def mixed_machines(found: dict[str, dict[int, dict[str, Any]]]) -> dict[int, list[float]]:
    """The seeds whose runs did not all start from the same held-out loss, with the losses seen.

    Runs of one seed hold out the same rows and start from the same base model, so on one machine
    and software stack they start from the same loss bit for bit; another machine's float paths
    give other bits (measured: ~1e-5 apart). A seed listed here compares runs made on different
    machines — fair in the mean, but not bit for bit.
    """
    starts: dict[int, set[float]] = {}
    for by_seed in found.values():
        for seed, run in by_seed.items():
            if run.get("curve"):
                starts.setdefault(seed, set()).add(run["curve"][0][2])
    return {seed: sorted(losses) for seed, losses in sorted(starts.items()) if len(losses) > 1}


def _point(values: list[Any]) -> Any:
    from fedtune.accounting.targets import CurvePoint

    return CurvePoint(int(values[0]), int(values[1]), float(values[2]))


def run_mmlu(runs: Runs, chosen: dict[str, dict[str, Any]], budget: Budget) -> dict[str, Any]:
    """Each configuration's MMLU guard score: 1,000 questions on its iid run of the first seed whose
    adapter is at hand (recorded with the run; the seed is reported)."""
    scores = {}
    for config, pick in chosen.items():
        names = {seed: run_name(config, "iid", seed, pick["rate"]) for seed in SEEDS}
        scored = [n for n in names.values() if "mmlu_loglik_1000" in (runs.finished(n) or {})]
        if not scored and budget.left():
            at_hand = [s for s, n in names.items() if (runs.out / n / SUMMARY_FILE).exists()]
            if at_hand:
                scored = [_score_mmlu(runs, names[at_hand[0]], at_hand[0])]
        if scored:
            scores[config] = runs.entries[scored[0]]["mmlu_loglik_1000"]
    return scores


def _score_mmlu(runs: Runs, name: str, seed: int) -> str:
    run_dir = runs.out / name
    command = [sys.executable, "-m", "fedtune.cli", "eval", "--adapter", str(run_dir),
               "--protocol", "loglik", "--sample", "1000", "--no-progress"]  # fmt: skip
    print(f"[{name}] MMLU (1,000 questions, log-likelihood) …", flush=True)
    run_logged(command, runs.out / f"{name}.mmlu.log")
    result = json.loads(sorted((run_dir / "eval").glob("mmlu_loglik_0shot_*.json"))[-1].read_text())
    runs.finished(name)
    runs.add(name, mmlu_loglik_1000={
        "average": round(100 * result["average"], 2),
        "stderr": round(100 * result["average_stderr"], 2),
        "questions": result["n_questions"],
        "seed": seed,
    })  # fmt: skip
    return name


def mmlu_guard(scores: dict[str, dict[str, Any]], reference: str | None) -> dict[str, Any]:
    """Each configuration's MMLU average with `within_one_se`: not below the best reference's by
    more than its own standard error (None until the reference is known and scored)."""
    base = scores.get(reference) if reference else None
    return {
        config: {
            **score,
            "within_one_se": None
            if base is None
            else score["average"] >= base["average"] - score["stderr"],
        }
        for config, score in scores.items()
    }


def draw(report: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    parts = [p for p, v in report["partitions"].items() if v.get("configs")]
    if not parts:
        return
    figure = Figure(figsize=(6 * len(parts), 4.5), dpi=110, layout="constrained")
    axes = figure.subplots(1, len(parts), squeeze=False)[0]
    for axis, partition in zip(axes, parts, strict=True):
        view = report["partitions"][partition]
        for config, row in view["configs"].items():
            run = row["runs"][min(row["runs"])]  # the first seed's curve
            xs = [max(p[1], 1) for p in run["curve"]]
            axis.plot(xs, [p[2] for p in run["curve"]], marker="o", markersize=2, label=config)
        best = view.get("best_reference")
        if best:
            first = view["configs"][best]["runs"][min(view["configs"][best]["runs"])]
            axis.axhline(first["final_heldout_loss"], color="grey", linestyle=":", linewidth=1)
        axis.set(xscale="log", xlabel="cumulative bytes (log)", ylabel="held-out loss",
                 title=f"{partition} (first seed; dotted: best reference's final)")  # fmt: skip
        axis.grid(alpha=0.3)
        axis.legend(fontsize="x-small")
    figure.savefig(path)


def print_table(report: dict[str, Any]) -> None:
    """The sweep and each partitioning's results as Markdown tables (docs/benchmarks.md)."""
    swept = sorted({float(r.removeprefix("lr")) for row in report["sweep"].values() for r in row})
    rates = [rate_name(r) for r in swept]
    print(f"Sweep (seed {SEEDS[0]}, iid): final held-out loss by `train.learning-rate-max`\n")
    print("| configuration | " + " | ".join(rates) + " | chosen |")
    print("|---|" + "---:|" * len(rates) + "---|")
    for config, row in report["sweep"].items():
        cells = [
            f"{row[r]:.4f}" if row.get(r) is not None else ("…" if r in row else "") for r in rates
        ]
        pick = report["chosen"].get(config)
        chosen = f"{rate_name(pick['rate'])}{' (edge)' if pick['edge'] else ''}" if pick else "…"
        print(f"| {config} | " + " | ".join(cells) + f" | {chosen} |")
    if report.get("mmlu_loglik_1000"):
        print("\nMMLU log-likelihood, 1,000 questions, 0-shot (iid)\n")
        print("| configuration | seed | average % | stderr | within one stderr of the reference |")
        print("|---|---:|---:|---:|---|")
        for config, score in report["mmlu_loglik_1000"].items():
            guard = {True: "yes", False: "**no**", None: "–"}[score["within_one_se"]]
            print(f"| {config} | {score.get('seed', '')} | {score['average']:.2f} "
                  f"| {score['stderr']:.2f} | {guard} |")  # fmt: skip
    for partition, view in report["partitions"].items():
        best = view.get("best_reference")
        seeds = ", ".join(str(s) for s in view.get("seeds") or []) or "none yet"
        print(f"\n{partition}: target = the final held-out loss of the best reference ({best}) "
              f"in each seed; seeds {seeds}\n")  # fmt: skip
        print("| configuration | seeds | reached | bytes to target (mean ± std) "
              "| × fewer (mean ± std) | final held-out (mean ± std) | final − target (mean ± std) "
              "| total bytes (mean) | held-out within 0.5 % of the reference's bytes |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for config, row in (view.get("configs") or {}).items():
            if "final_heldout_mean" not in row:
                continue
            cost = (
                f"{row['cost_to_target_mean']:,.0f} ± {row['cost_to_target_std']:,.0f}"
                if row["cost_to_target_mean"] is not None
                else "not reached"
            )
            fewer = (
                f"{row['fewer_bytes_mean']:,.0f} ± {row['fewer_bytes_std']:,.0f}"
                if row["fewer_bytes_mean"] is not None
                else "–"
            )
            budget = row["quality_under_half_percent_budget_mean"]
            print(
                f"| {config} | {row['seeds']} | {row['reached']} | {cost} | {fewer} "
                f"| {row['final_heldout_mean']:.4f} ± {row['final_heldout_std']:.4f} "
                f"| {row['above_target_mean']:+.4f} ± {row['above_target_std']:.4f} "
                f"| {row['total_bytes_mean']:,.0f} "
                f"| {f'{budget:.4f}' if budget is not None else '–'} |"
            )
        for seed, starts in (view.get("mixed_machines") or {}).items():
            print(f"\nSeed {seed}: runs from different machines (held-out loss before training: "
                  f"{', '.join(f'{v:.9f}' for v in starts)}).")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", choices=("all", "sweep", "grid", "mmlu", "report"),
                        default="all")  # fmt: skip
    parser.add_argument("--only", help="comma-separated configurations (default: all)")
    parser.add_argument("--max-minutes", type=float, help="start no run after this long")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-comm-grid")
    parser.add_argument("--json", type=Path, default=RESULTS / "comm_grid.json")
    parser.add_argument("--record", type=Path, default=RESULTS / "comm_grid_runs.json",
                        help="the finished runs' record, read before the run directories")  # fmt: skip
    args = parser.parse_args(argv)
    configs = args.only.split(",") if args.only else list(CONFIGS)
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration {unknown[0]!r} (known: {', '.join(CONFIGS)})")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = Runs(args.out, args.record)
    budget = Budget(args.max_minutes)
    if args.stage in ("all", "sweep"):
        for config in configs:
            while (rate := sweep_plan(runs, config)[1]) is not None:
                name = run_name(config, "iid", SEEDS[0], rate)
                if ensure_run(runs, name, settings(config, "iid", SEEDS[0], rate), budget) is None:
                    break  # out of time, or the run failed (the next call retries it)
    chosen = chosen_rates(runs, list(CONFIGS))
    if args.stage in ("all", "grid"):
        for seed in SEEDS:  # a seed at a time: a slice of the grid covers every configuration
            for partition in PARTITIONS:
                for config in configs:
                    if config in chosen:
                        rate = chosen[config]["rate"]
                        name = run_name(config, partition, seed, rate)
                        sets = settings(config, partition, seed, rate)
                        ensure_run(runs, name, sets, budget, curve=True)
    mmlu = run_mmlu(runs, chosen, budget if args.stage in ("all", "mmlu") else Budget(1e-9))
    partitions = summarise(runs, chosen)
    report = {
        "benchmark": "comm_grid",
        "machine": f"{os.cpu_count()} CPU cores",
        "regime": REGIME,
        "partitions_settings": PARTITIONS,
        "seeds": list(SEEDS),
        "learning_rates": list(LEARNING_RATES),
        "configs_settings": CONFIGS,
        "references": list(REFERENCES),
        "sweep": sweep_state(runs, list(CONFIGS)),
        "chosen": chosen,
        "partitions": partitions,
        "mmlu_loglik_1000": mmlu_guard(mmlu, partitions["iid"].get("best_reference")),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    draw(report, args.json.with_suffix(".png"))
    print_table(report)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

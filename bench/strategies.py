"""Strategies compared on the same data, seeds and ledger: IID and non-IID Dolly-15k.

Every strategy × every partitioning × every seed runs `fedtune run` on the embedded model with
`data.name=embedded:dolly-15k` split over the clients by its 8-value `category` (IID, or
flwr-datasets' Dirichlet partitioner at each α), with the same rounds, clients per round, local
steps and sequence length. A seed sets `train.seed` and `data.seed` together: the adapter's
initialisation, the clients sampled, the data order, the Dirichlet draw and the 200 held-out rows
(which the partitioning does not touch, so every strategy and partitioning of one seed is scored
on the same rows). For each run: the final held-out loss, total bytes (SCAFFOLD pays twice: its
control variates travel too), wall time, MMLU log-likelihood on a fixed stratified subset, and
‖ΔW‖ (how far the final adapter moves the model); then mean ± std over seeds per strategy and
partitioning, and each run paired with FedAvg's on the same partitioning and seed. Writes JSON, a
PNG (the paired held-out loss and MMLU differences: a bar per partitioning, a dot per seed) and a
Markdown table.

    .venv/bin/python bench/strategies.py                          # the full grid
    .venv/bin/python bench/strategies.py --strategies fedavg,fedprox --partitions iid --seeds 1

Knobs for a larger run (a GPU): --rounds, --clients, --clients-per-round, --local-steps,
--seq-length, --mmlu, and `--set KEY=VALUE` for any other setting; every run's directory is kept
under --out and reused when the grid is run again (an interrupted run is resumed). The JSON
is rewritten after every run, and its rows are reused by a later invocation with the same
settings even when the run directories are gone; `--collect` reports what is finished without
training anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from fedtune_runs import run_logged  # beside this script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fedtune.federation.strategies import STRATEGIES  # noqa: E402
from fedtune.rundir import SUMMARY_FILE, read_summary  # noqa: E402

# name → data settings; Dirichlet over Dolly's category.
PARTITIONS: dict[str, list[str]] = {
    "iid": ["data.partitioner=iid"],
    "dirichlet-1.0": [
        "data.partitioner=dirichlet",
        "data.partition-by=category",
        "data.dirichlet-alpha=1.0",
    ],
    "dirichlet-0.1": [
        "data.partitioner=dirichlet",
        "data.partition-by=category",
        "data.dirichlet-alpha=0.1",
    ],
}


def one_run(
    args: argparse.Namespace, strategy: str, partition: str, seed: int, done: dict
) -> dict | None:
    """Train (or reuse) one run and score it; its row. A row already in the JSON file (same
    settings) is reused even when its run directory is gone; with --collect nothing new is
    trained or scored and a run not finished yet gives None."""
    out = Path(args.out)
    name = f"{strategy}-{partition}-s{seed}"
    run_dir = out / name
    if (strategy, partition, seed) in done:
        row = done[(strategy, partition, seed)]
        if row.get("delta_w_norm") is None:  # a row from before ‖ΔW‖ was recorded
            row["delta_w_norm"] = adapter_delta_norm(run_dir)
        return row
    finished = (run_dir / SUMMARY_FILE).exists()
    scored = (
        bool(sorted((run_dir / "eval").glob("mmlu_loglik_5shot_*.json")))
        if finished and (run_dir / "eval").exists()
        else False
    )
    if args.collect and (not finished or (args.mmlu and not scored)):
        return None
    if not finished:
        # One simulation worker per core, the layout the grid's first seeds were trained with
        # (the thread count changes a run's last bits).
        command = [sys.executable, "-m", "fedtune.cli", "run", "--client-cpus", "1"]
        if run_dir.exists():
            command += ["--resume", str(run_dir)]
        else:
            sets = [
                "data.name=embedded:dolly-15k",
                *PARTITIONS[partition],
                f"data.seed={seed}",
                f"train.seed={seed}",
                f"strategy.name={strategy}",
                f"num-server-rounds={args.rounds}",
                f"federation.num-clients={args.clients}",
                f"strategy.clients-per-round={args.clients_per_round}",
                f"train.local-steps={args.local_steps}",
                f"train.seq-length={args.seq_length}",
                # The held-out loss before round 1 and after the last is what is compared.
                f"eval.heldout-every-rounds={args.rounds}",
                "eval.probe-examples=0",
                f"run.output-dir={out}",
                f"run.name={name}",
                *args.set,
            ]
            command += [x for item in sets for x in ("--set", item)]
        print(f"[{name}] training …", flush=True)
        run_logged(command, out / f"{name}.run.log")
    summary = read_summary(run_dir)
    pattern = "mmlu_loglik_5shot_*.json"
    found = sorted((run_dir / "eval").glob(pattern)) if (run_dir / "eval").exists() else []
    if args.mmlu and not found:
        print(f"[{name}] MMLU ({args.mmlu} questions, 5-shot log-likelihood) …", flush=True)
        command = [sys.executable, "-m", "fedtune.cli", "eval", "--adapter", str(run_dir)]
        command += ["--protocol", "loglik", "--shots", "5", "--sample", str(args.mmlu)]
        command += ["--no-progress"]
        run_logged(command, out / f"{name}.eval.log")
        found = sorted((run_dir / "eval").glob(pattern))
    mmlu = json.loads(found[-1].read_text()) if found else None
    return {
        "strategy": strategy,
        "partition": partition,
        "seed": seed,
        "final_heldout_loss": summary["final_heldout_loss"],
        "total_bytes": summary["communication"]["total_bytes"],
        "seconds": summary["seconds"],
        "dropped_replies": summary.get("dropped_replies", 0),
        "mmlu": round(100 * mmlu["average"], 2) if mmlu else None,
        "mmlu_se": round(100 * mmlu["average_stderr"], 2) if mmlu else None,
        "delta_w_norm": adapter_delta_norm(run_dir),
    }


def adapter_delta_norm(run_dir: Path) -> float | None:
    """‖ΔW‖: the Frobenius norm, over every LoRA module, of the weight change the final adapter
    applies, scaling·B·A (scaling = lora_alpha / r, or / √r with rsLoRA). B starts at 0, so this
    is how far the federation moved the model; None for an adapter that is not plain LoRA."""
    import numpy as np
    from safetensors.numpy import load_file

    adapter = run_dir / "adapter"
    if not (adapter / "adapter_model.safetensors").exists():
        return None
    config = json.loads((adapter / "adapter_config.json").read_text())
    if config.get("use_dora") or config.get("peft_type") != "LORA":
        return None
    rank, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / (rank**0.5 if config.get("use_rslora") else rank)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    total = 0.0
    for key, b in tensors.items():
        if key.endswith("lora_B.weight"):
            a = tensors[key.replace("lora_B.weight", "lora_A.weight")].astype(np.float64)
            total += float((((scaling * b.astype(np.float64)) @ a) ** 2).sum())
    return round(total**0.5, 4)


def settings_of(args: argparse.Namespace) -> dict:
    return {
        k: getattr(args, k)
        for k in ("rounds", "clients", "clients_per_round", "local_steps", "seq_length", "mmlu")
    }


def earlier_rows(args: argparse.Namespace) -> dict:
    """(strategy, partition, seed) → row, from the JSON file of an earlier run of this grid with
    the same settings."""
    path = Path(args.json)
    if not path.exists():
        return {}
    report = json.loads(path.read_text())
    if report.get("settings") != settings_of(args) or report.get("extra_settings", []) != args.set:
        return {}
    return {(r["strategy"], r["partition"], r["seed"]): r for r in report.get("runs", [])}


def baseline_rows(args: argparse.Namespace) -> list[dict]:
    """FedAvg's rows from --baseline, a grid's JSON with the same settings (its --set may differ),
    to pair a variant grid (one strategy under other keys) with FedAvg without training it again."""
    if not args.baseline:
        return []
    report = json.loads(Path(args.baseline).read_text())
    if report.get("settings") != settings_of(args):
        raise SystemExit(f"--baseline {args.baseline} was run with other settings")
    return [r for r in report["runs"] if r["strategy"] == "fedavg"]


def write_report(args, rows, done, started) -> tuple[list[dict], list[str]]:
    """Write the JSON and the PNG: this invocation's rows and, kept as they were, the earlier
    rows (same settings) it did not cover, so a grid can be widened one strategy at a time."""
    covered = {(r["strategy"], r["partition"], r["seed"]) for r in rows}
    rows = rows + [row for key, row in done.items() if key not in covered]
    order = {name: i for i, name in enumerate([*PARTITIONS, *STRATEGIES])}
    rows.sort(key=lambda r: (r["seed"], order[r["partition"]], order[r["strategy"]]))
    present = {r["partition"] for r in rows}
    partitions = [p for p in PARTITIONS if p in present]
    baseline = baseline_rows(args)
    table = aggregate(rows, baseline)
    report = {
        "machine": f"{os.cpu_count()} CPU cores",
        "settings": settings_of(args),
        "extra_settings": args.set,
        "baseline": args.baseline or None,
        "seeds": sorted({r["seed"] for r in rows}),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "table": table,
        "runs": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    draw([*baseline, *rows], partitions, Path(args.json).with_suffix(".png"))
    return table, partitions


def _mean_std(values: list[float], digits: int) -> tuple[float | None, float]:
    if not values:
        return None, 0.0
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return round(statistics.fmean(values), digits), round(std, digits)


def aggregate(rows: list[dict], baseline: list[dict] | None = None) -> list[dict]:
    """mean ± std over seeds per (strategy, partitioning), and the paired difference from FedAvg
    on the same partitioning and seed (the seed also draws the held-out rows, so a loss varies
    more between seeds than between strategies on one seed: the pairing removes that)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["strategy"], row["partition"]), []).append(row)
    fedavg = {
        (r["partition"], r["seed"]): r
        for r in [*(baseline or []), *rows]
        if r["strategy"] == "fedavg"
    }
    table = []
    for (strategy, partition), members in groups.items():
        losses = [m["final_heldout_loss"] for m in members]
        scores = [m["mmlu"] for m in members if m["mmlu"] is not None]
        paired = [
            (m, fedavg[(partition, m["seed"])]) for m in members if (partition, m["seed"]) in fedavg
        ]
        delta, delta_std = _mean_std(
            [m["final_heldout_loss"] - f["final_heldout_loss"] for m, f in paired], 4
        )
        mmlu_delta, mmlu_delta_std = _mean_std(
            [
                m["mmlu"] - f["mmlu"]
                for m, f in paired
                if m["mmlu"] is not None and f["mmlu"] is not None
            ],
            2,
        )
        step, step_std = _mean_std(
            [
                m["delta_w_norm"] / f["delta_w_norm"]
                for m, f in paired
                if m.get("delta_w_norm") and f.get("delta_w_norm")
            ],
            2,
        )
        table.append(
            {
                "strategy": strategy,
                "partition": partition,
                "seeds": len(members),
                "heldout_mean": round(statistics.fmean(losses), 4),
                "heldout_std": round(statistics.stdev(losses), 4) if len(losses) > 1 else 0.0,
                "mmlu_mean": round(statistics.fmean(scores), 2) if scores else None,
                "mmlu_std": round(statistics.stdev(scores), 2) if len(scores) > 1 else 0.0,
                "heldout_vs_fedavg_mean": delta,
                "heldout_vs_fedavg_std": delta_std,
                "mmlu_vs_fedavg_mean": mmlu_delta,
                "mmlu_vs_fedavg_std": mmlu_delta_std,
                "delta_w_vs_fedavg_mean": step,
                "delta_w_vs_fedavg_std": step_std,
                "paired_seeds": len(paired),
                "total_bytes": members[0]["total_bytes"],
                "seconds_mean": round(statistics.fmean(m["seconds"] for m in members), 1),
            }
        )
    return table


def _spread(mean: float, std: float, n: int, spec: str) -> str:
    """'mean ± std' over n seeds; one seed has no spread to show (not '± 0'): just its value."""
    return f"{mean:{spec}} ± {std:.{spec[-2]}f}" if n > 1 else f"{mean:{spec}}"


def _paired_cell(row: dict, key: str, spec: str) -> str:
    """A 'vs FedAvg' cell: the paired mean ± std of `key`, or '—' (FedAvg itself, or unpaired)."""
    if row.get(f"{key}_mean") is None or row["strategy"] == "fedavg":
        return "—"
    return _spread(row[f"{key}_mean"], row[f"{key}_std"], row["paired_seeds"], spec)


def markdown(table: list[dict], partitions: list[str]) -> str:
    head = "| strategy | " + " | ".join(
        f"held-out loss, {p} | vs FedAvg, same seed, {p}" for p in partitions
    )
    head += " | MMLU 5-shot (IID) | MMLU vs FedAvg, same seed (IID)"
    head += " | ‖ΔW‖ ÷ FedAvg's, same seed (IID) | bytes per run | seeds |"
    lines = [head, "|---" * (2 * len(partitions) + 6) + "|"]
    by_key = {(r["strategy"], r["partition"]): r for r in table}
    for strategy in dict.fromkeys(r["strategy"] for r in table):
        cells = []
        for partition in partitions:
            row = by_key.get((strategy, partition))
            cells.append(
                _spread(row["heldout_mean"], row["heldout_std"], row["seeds"], ".4f")
                if row
                else "—"
            )
            cells.append(_paired_cell(row or {}, "heldout_vs_fedavg", "+.4f"))
        first = by_key.get((strategy, partitions[0])) or {}
        mmlu = (
            _spread(first["mmlu_mean"], first["mmlu_std"], first["seeds"], ".2f")
            if first.get("mmlu_mean") is not None
            else "—"
        )
        mmlu_delta = _paired_cell(first, "mmlu_vs_fedavg", "+.2f")
        step = _paired_cell(first, "delta_w_vs_fedavg", ".2f")
        lines.append(
            f"| {strategy} | "
            + " | ".join(cells)
            + f" | {mmlu} | {mmlu_delta} | {step} | {first.get('total_bytes', 0):,} | "
            + "/".join(
                str(by_key[(strategy, p)]["seeds"]) if (strategy, p) in by_key else "0"
                for p in partitions
            )  # fmt: skip
            + " |"
        )
    return "\n".join(lines)


def _paired_deltas(rows: list[dict], key: str) -> dict[tuple[str, str], list[float]]:
    """Per (strategy, partitioning): each seed's `key` minus FedAvg's on the same partitioning and seed."""
    fedavg = {(r["partition"], r["seed"]): r for r in rows if r["strategy"] == "fedavg"}
    deltas: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        base = fedavg.get((row["partition"], row["seed"]))
        if row["strategy"] != "fedavg" and base and row[key] is not None and base[key] is not None:
            deltas.setdefault((row["strategy"], row["partition"]), []).append(row[key] - base[key])
    return deltas


def draw(rows: list[dict], partitions: list[str], path: Path) -> None:
    """Two panels, each run paired with FedAvg on its partitioning and seed (so strategies with
    one seed and with three are on the same footing): the held-out loss difference and the MMLU
    difference; a bar is the mean over seeds, a dot is one seed."""
    from matplotlib.figure import Figure

    order = {name: i for i, name in enumerate(STRATEGIES)}
    strategies = sorted({r["strategy"] for r in rows} - {"fedavg"}, key=order.__getitem__)
    if not strategies:
        return
    figure = Figure(
        figsize=(max(7.0, 0.8 * len(strategies) + 2), 7.0), dpi=110, layout="constrained"
    )
    axes = figure.subplots(2, 1, sharex=True)
    width = 0.8 / len(partitions)
    panels = [
        ("final_heldout_loss", "held-out loss − FedAvg's (lower is better)"),
        ("mmlu", "MMLU 5-shot − FedAvg's, points (higher is better)"),
    ]
    for axis, (key, label) in zip(axes, panels, strict=True):
        deltas = _paired_deltas(rows, key)
        for j, partition in enumerate(partitions):
            offset = (j - (len(partitions) - 1) / 2) * width
            xs, means = [], []
            for i, strategy in enumerate(strategies):
                values = deltas.get((strategy, partition))
                if values:
                    xs.append(i + offset)
                    means.append(statistics.fmean(values))
                    axis.plot([i + offset] * len(values), values, "k.", markersize=3)
            axis.bar(xs, means, width, label=partition, color=f"C{j}", alpha=0.8)
        axis.axhline(0.0, color="black", linewidth=0.8)
        axis.set_ylabel(label, fontsize="small")
        axis.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(range(len(strategies)), strategies, rotation=30, ha="right")
    axes[0].set_title("Strategies on Dolly-15k, each run against FedAvg on the same data and seed")
    axes[0].legend(fontsize="small")
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--partitions", default=",".join(PARTITIONS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--clients-per-round", type=int, default=3, help="Krum needs >= 3")
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--mmlu", type=int, default=200, help="5-shot questions; 0 skips MMLU")
    parser.add_argument("--set", action="append", default=[], help="extra KEY=VALUE for all")
    parser.add_argument("--out", default="/tmp/fedtune-strategies")
    parser.add_argument(
        "--collect",
        action="store_true",
        help="train and score nothing: report the runs already finished (and those in --json)",
    )
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "strategies.json"))
    parser.add_argument(
        "--table-seeds",
        default="",
        help="print the table over these seeds only, e.g. 1 (the JSON keeps every run)",
    )
    parser.add_argument(
        "--baseline",
        default="",
        help="pair with FedAvg's runs in this JSON (same settings; --set may differ)",
    )
    args = parser.parse_args()
    strategies = [s for s in args.strategies.split(",") if s]
    partitions = [p for p in args.partitions.split(",") if p]
    unknown = [s for s in strategies if s not in STRATEGIES] + [
        p for p in partitions if p not in PARTITIONS
    ]
    if unknown:
        raise SystemExit(f"unknown strategies or partitions: {', '.join(unknown)}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    done = earlier_rows(args)
    rows: list[dict] = []
    for seed in range(1, args.seeds + 1):
        for partition in partitions:
            for strategy in strategies:
                row = one_run(args, strategy, partition, seed, done)
                if row is not None:
                    rows.append(row)
                    # Written after every run: an interrupted grid keeps what it finished.
                    write_report(args, rows, done, started)
    if not rows:
        raise SystemExit("no finished run to report")
    table, shown = write_report(args, rows, done, started)
    if args.table_seeds:
        # Strategies run on fewer seeds than FedAvg compare with it on those seeds alone.
        kept = {int(seed) for seed in args.table_seeds.split(",")}
        runs = json.loads(Path(args.json).read_text())["runs"]
        table = aggregate([r for r in runs if r["seed"] in kept], baseline_rows(args))
    print(markdown(table, shown))


if __name__ == "__main__":
    main()

"""Runs drawn, not only logged: one run's curves at its end, and `fedtune report` to compare runs.

- `plot_run(run_dir)` → `run_dir/report.png`: train, probe and held-out loss by round (round 0 is
  the server's evaluation before training), and cumulative bytes down and up.
- `compare_runs(run_dirs)` → rows of a table and a PNG: held-out loss against rounds and against
  cumulative bytes (log scale), so two configurations compare at a glance; each row's
  Cost-to-Target (`bytes_to_target`: the cumulative bytes at the end of the first round whose
  held-out loss reached the target) and Quality-under-Budget (`quality_under_budget`: the lowest
  held-out loss within the byte budget), as `fedtune.accounting.targets` defines them.

Figures are drawn with matplotlib's object API (no pyplot, no display needed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.accounting.targets import (
    CurvePoint,
    cost_to_target,
    curve,
    fewer_bytes,
    quality_under_budget,
)
from fedtune.rundir import (
    STATUS_FILE,
    SUMMARY_FILE,
    RunDirError,
    read_metrics,
    read_run_config,
    read_status,
    read_summary,
)
from fedtune.units import MIB, human_bytes, parse_bytes

REPORT_FILE = "report.png"


@dataclass
class RunCurves:
    """What the plots and the table need from one run directory."""

    name: str
    path: Path
    rounds: list[int]
    train_loss: list[float | None]
    heldout: dict[int, float]  # round (0 = before training) → held-out loss
    probe: dict[int, float]
    downlink: list[int]  # cumulative bytes at the end of each round
    uplink: list[int]
    strategy: str
    codecs: dict[str, str]
    state: str

    @property
    def total_bytes(self) -> int:
        return (self.downlink[-1] if self.downlink else 0) + (self.uplink[-1] if self.uplink else 0)

    @property
    def final_heldout(self) -> float | None:
        return self.heldout[max(self.heldout)] if self.heldout else None

    @property
    def cumulative_bytes(self) -> list[int]:
        """Down + up sent by the end of each round of `rounds`."""
        return [d + u for d, u in zip(self.downlink, self.uplink, strict=True)]

    @property
    def points(self) -> list[CurvePoint]:
        """The held-out loss by cumulative bytes (round 0: before training, 0 bytes)."""
        return curve(self.rounds, self.cumulative_bytes, self.heldout)

    def bytes_to(self, target: float) -> int | None:
        """Cost-to-Target: cumulative bytes when the held-out loss first reached `target`."""
        return cost_to_target(self.points, target)

    def best_within(self, budget: int) -> float | None:
        """Quality-under-Budget: the lowest held-out loss within `budget` bytes."""
        return quality_under_budget(self.points, budget)


def read_curves(run_dir: str | Path) -> RunCurves:
    """Curves of a run directory (finished or not: whatever rounds it recorded).

    Raises:
        RunDirError: not a run directory, or its logs cannot be read.
    """
    path = Path(run_dir).expanduser().resolve()
    flat, _ = read_run_config(path)
    metrics = read_metrics(path)
    summary = read_summary(path) if (path / SUMMARY_FILE).exists() else {}
    status = read_status(path) if (path / STATUS_FILE).exists() else {}
    heldout: dict[int, float] = {}
    probe: dict[int, float] = {}
    for key, values in (summary.get("server_eval") or {}).items():
        if "heldout_loss" in values:
            heldout[int(key)] = float(values["heldout_loss"])
        if "probe_loss" in values:
            probe[int(key)] = float(values["probe_loss"])
    down = up = 0
    downlink, uplink = [], []
    for row in metrics:
        if "heldout_loss" in row:
            heldout[int(row["round"])] = float(row["heldout_loss"])
        if "probe_loss" in row:
            probe[int(row["round"])] = float(row["probe_loss"])
        down += int(row.get("downlink_bytes", 0))
        up += int(row.get("uplink_bytes", 0))
        downlink.append(down)
        uplink.append(up)
    return RunCurves(
        name=path.name,
        path=path,
        rounds=[int(row["round"]) for row in metrics],
        train_loss=[row.get("train_loss") for row in metrics],
        heldout=dict(sorted(heldout.items())),
        probe=dict(sorted(probe.items())),
        downlink=downlink,
        uplink=uplink,
        strategy=str(flat.get("strategy.name", "fedavg")),
        codecs=summary.get("codecs")
        or {
            "downlink": str(flat.get("compress.downlink", "fp32")),
            "uplink": str(flat.get("compress.uplink", "fp32")),
        },
        state=str(status.get("state", "unknown")),
    )


def _short(codec: str | None) -> str:
    return str(codec).split(" (")[0].split(" +")[0]


def _integer_rounds(*axes: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    for axis in axes:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def plot_run(run_dir: str | Path) -> Path:
    """Draw `run_dir/report.png` (losses by round; cumulative bytes by round)."""
    curves = read_curves(run_dir)
    figure = _figure(10, 4)
    losses, traffic = figure.subplots(1, 2)
    train = [(r, v) for r, v in zip(curves.rounds, curves.train_loss, strict=True) if v is not None]
    if train:
        losses.plot(*zip(*train, strict=True), marker="o", label="train (clients)")
    if curves.probe:
        losses.plot(list(curves.probe), list(curves.probe.values()), marker="s", label="probe")
    if curves.heldout:
        losses.plot(
            list(curves.heldout), list(curves.heldout.values()), marker="^", label="held-out"
        )
    losses.set(xlabel="round", ylabel="loss", title=f"{curves.name}: loss")
    losses.legend()
    losses.grid(alpha=0.3)
    traffic.plot(curves.rounds, [b / MIB for b in curves.downlink], marker="o", label="down")
    traffic.plot(curves.rounds, [b / MIB for b in curves.uplink], marker="o", label="up")
    traffic.set(
        xlabel="round",
        ylabel="cumulative MiB",
        title=f"bytes ({_short(curves.codecs.get('downlink'))} ↓, "
        f"{_short(curves.codecs.get('uplink'))} ↑)",
    )
    traffic.legend()
    traffic.grid(alpha=0.3)
    _integer_rounds(losses, traffic)
    target = curves.path / REPORT_FILE
    figure.savefig(target)
    return target


def compare_runs(
    run_dirs: list[str | Path],
    out: str | Path,
    target: float | None = None,
    budget: int | None = None,
) -> tuple[list[dict[str, Any]], Path]:
    """Table rows and a PNG comparing runs by held-out loss against rounds and against bytes.

    Args:
        target: held-out loss for Cost-to-Target; default: the first run's final held-out loss.
        budget: bytes for Quality-under-Budget; default: a hundredth of the first run's total.
    Raises:
        RunDirError: a directory that is not a run.
    """
    runs = [read_curves(d) for d in run_dirs]
    if target is None:
        target = runs[0].final_heldout
    if budget is None:
        budget = default_budget(runs[0].total_bytes)
    reference_bytes = runs[0].total_bytes
    rows = []
    for run in runs:
        cost = run.bytes_to(target) if target is not None else None
        rows.append(
            {
                "run": run.name,
                "state": run.state,
                "strategy": run.strategy,
                "downlink": run.codecs.get("downlink"),
                "uplink": run.codecs.get("uplink"),
                "rounds": len(run.rounds),
                "total_bytes": run.total_bytes,
                "final_heldout_loss": run.final_heldout,
                "bytes_to_target": cost,
                "fewer_bytes": fewer_bytes(reference_bytes, cost),
                "budget": budget,
                "quality_under_budget": run.best_within(budget),
            }
        )
    figure = _figure(11, 4.2)
    by_round, by_bytes = figure.subplots(1, 2)
    for run in runs:
        if not run.heldout:
            continue
        by_round.plot(list(run.heldout), list(run.heldout.values()), marker="o", label=run.name)
        points = [
            (run.downlink[i] + run.uplink[i], run.heldout[r])
            for i, r in enumerate(run.rounds)
            if r in run.heldout
        ]
        if points:
            by_bytes.plot(*zip(*points, strict=True), marker="o", label=run.name)
    if target is not None and not math.isnan(target):
        for axis in (by_round, by_bytes):
            axis.axhline(target, color="grey", linestyle=":", linewidth=1)
    by_round.set(xlabel="round", ylabel="held-out loss", title="held-out loss by round")
    by_bytes.set(xlabel="cumulative bytes (log)", ylabel="held-out loss", title="… by bytes")
    by_bytes.set_xscale("log")
    _integer_rounds(by_round)
    for axis in (by_round, by_bytes):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize="small")
    out_path = Path(out)
    figure.savefig(out_path)
    return rows, out_path


def format_table(rows: list[dict[str, Any]], target: float | None) -> str:
    """A plain-text table of compare_runs' rows."""
    header = [
        "run",
        "state",
        "strategy",
        "↓ codec",
        "↑ codec",
        "rounds",
        "bytes",
        "held-out",
        "cost to target",
        "× fewer",
        "best under budget",
    ]
    lines = [header]
    for row in rows:
        held = row["final_heldout_loss"]
        reach = row["bytes_to_target"]
        fewer = row["fewer_bytes"]
        best = row["quality_under_budget"]
        lines.append(
            [
                row["run"],
                row["state"],
                row["strategy"],
                str(row["downlink"]),
                str(row["uplink"]),
                str(row["rounds"]),
                f"{row['total_bytes']:,}",
                f"{held:.4f}" if held is not None else "n/a",
                f"{reach:,}" if reach is not None else "not reached",
                f"{fewer:,.1f}" if fewer is not None else "–",
                f"{best:.4f}" if best is not None else "n/a",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in lines
    )
    if target is not None:
        text += f"\ncost to target: bytes until the held-out loss reached {target:.4f}"
        text += f" (× fewer: {rows[0]['run']}'s total over it)"
    if rows:
        budget = rows[0]["budget"]
        text += f"\nbest under budget: lowest held-out loss within {budget:,} bytes"
        text += f" ({human_bytes(budget)})"
    return text


def default_budget(reference_bytes: int) -> int:
    """Quality-under-Budget's default: a hundredth of the reference's total bytes."""
    return max(reference_bytes // 100, 1)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report",
        help="compare runs: held-out loss against rounds and bytes (PNG + table)",
        description="Overlay runs' held-out loss against rounds and against cumulative bytes.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--out", default="fedtune-report.png", help="PNG to write")
    parser.add_argument(
        "--target",
        type=float,
        help="held-out loss for Cost-to-Target (default: the first run's final held-out loss)",
    )
    parser.add_argument(
        "--budget",
        type=parse_bytes,
        help="bytes for Quality-under-Budget, e.g. 2000000, 1.5MiB or 0.1GB (the board's GB); "
        "default: a hundredth of the first run's total",
    )
    parser.set_defaults(handler=handle_report)


def handle_report(args: Any) -> int:
    import sys

    try:
        rows, path = compare_runs(args.run_dirs, args.out, args.target, args.budget)
    except RunDirError as exc:
        print(f"fedtune report: error: {exc}", file=sys.stderr)
        return 2
    target = args.target if args.target is not None else rows[0]["final_heldout_loss"]
    print(format_table(rows, target))
    print(f"figure: {path}")
    return 0

"""What each client holds: partition sizes, the label histogram per client, how far from IID.

Built from the same partitioner the clients use (`partition.partition_dataset`: the seeded
shuffle, the held-out rows taken out, then flwr-datasets' partitioner), so the counts are the
clients' rows before cleaning. Counts come from flwr-datasets' `compute_counts`.

Heterogeneity, in numbers a reader can check:
- sizes: min, max, mean and their coefficient of variation (std / mean);
- label skew: each client's total-variation distance to the pooled label distribution,
  ½·Σₗ|pᵢ(l) − p(l)| (0: the pooled mix; 1: labels the pool barely has), its mean and max, and the
  number of labels each client has at all.

`fedtune run` writes `partitions.json` and `partitions.png` into the run directory (local and
embedded data); `fedtune data report` does it for any data file and partitioner.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedtune.config import DataConfig

REPORT_JSON = "partitions.json"
REPORT_PNG = "partitions.png"
LABEL_GUESSES = ("category", "label")  # shown for IID splits too, when the data has one


@dataclass
class PartitionReport:
    data: str
    partitioner: str
    num_partitions: int
    heldout_rows: int
    sizes: list[int]
    label: str | None = None
    labels: list[str] = field(default_factory=list)
    counts: list[list[int]] = field(default_factory=list)  # partition × label

    def label_distance(self) -> list[float]:
        """Each partition's total-variation distance to the pooled label distribution."""
        if not self.labels:
            return []
        totals = [sum(row[j] for row in self.counts) for j in range(len(self.labels))]
        pooled = [t / max(sum(totals), 1) for t in totals]
        distances = []
        for row in self.counts:
            size = max(sum(row), 1)
            distances.append(0.5 * sum(abs(c / size - p) for c, p in zip(row, pooled, strict=True)))
        return distances

    def summary(self) -> dict[str, Any]:
        n = len(self.sizes)
        mean = sum(self.sizes) / n
        std = (sum((s - mean) ** 2 for s in self.sizes) / n) ** 0.5
        result: dict[str, Any] = {
            "rows": sum(self.sizes),
            "size_min": min(self.sizes),
            "size_max": max(self.sizes),
            "size_mean": round(mean, 2),
            "size_cv": round(std / mean, 4) if mean else 0.0,
        }
        if self.labels:
            distances = self.label_distance()
            present = [sum(1 for c in row if c) for row in self.counts]
            result.update(
                label_tv_mean=round(sum(distances) / n, 4),
                label_tv_max=round(max(distances), 4),
                labels_per_client_min=min(present),
                labels_per_client_mean=round(sum(present) / n, 2),
            )
        return result

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "summary": self.summary()}


def guess_label(columns: list[str], config: DataConfig) -> str | None:
    if config.partition_by:
        return config.partition_by
    return next((c for c in LABEL_GUESSES if c in columns), None)


def split_report(directory: str, config: DataConfig, num_partitions: int) -> PartitionReport:
    """A split directory's report: the one `fedtune data split` saved beside its files when it
    is there, else the row counts its manifest lists (the server never reads a node's file)."""
    from fedtune.data.sources import read_manifest

    manifest = read_manifest(directory, num_partitions)
    sizes = [int(node["rows"]) for node in manifest["nodes"]]
    saved = Path(directory) / REPORT_JSON
    if saved.is_file():
        try:
            fields = json.loads(saved.read_text())
            fields.pop("summary", None)
            report = PartitionReport(**fields)
        except (ValueError, KeyError, TypeError, AttributeError):
            report = None
        if report is not None and report.sizes == sizes:
            return report
    heldout = int(manifest.get("heldout", {}).get("rows", 0))
    return PartitionReport(
        data=config.name,
        partitioner=str(manifest.get("data_settings", {}).get("partitioner", "split")),
        num_partitions=num_partitions,
        heldout_rows=heldout,
        sizes=sizes,
    )


def build_report(config: DataConfig, num_partitions: int) -> PartitionReport | None:
    """The report for local or embedded data; None for a hub data set (the server does not hold
    its rows).

    Raises:
        DataError: as partition_dataset.
    """
    from flwr_datasets.metrics import compute_counts

    from fedtune.data.partition import partition_dataset
    from fedtune.data.sources import load_local_rows, resolve_data

    source = resolve_data(config.name)
    if source.kind == "hub":
        return None
    if source.kind == "split":
        return split_report(source.path, config, num_partitions)
    rows = load_local_rows(source)
    partitioner = partition_dataset(rows, config, num_partitions)
    sizes = [len(partitioner.load_partition(i)) for i in range(num_partitions)]
    report = PartitionReport(
        data=config.name,
        partitioner=config.partitioner,
        num_partitions=num_partitions,
        heldout_rows=len(rows) - len(partitioner.dataset),
        sizes=sizes,
    )
    label = guess_label(list(rows.column_names), config)
    if label is not None:
        frame = compute_counts(partitioner, label)
        report.label = label
        report.labels = [str(c) for c in frame.columns]
        report.counts = [[int(v) for v in frame.loc[i]] for i in range(num_partitions)]
    return report


def draw(report: PartitionReport, path: Path) -> Path:
    """Two panels: rows per client; each client's label mix (stacked shares) with its distance to
    the pooled mix."""
    from matplotlib.figure import Figure

    panels = 2 if report.labels else 1
    width = max(6.0, min(18.0, 0.35 * report.num_partitions + 3))
    figure = Figure(figsize=(width, 3.2 * panels), dpi=110, layout="constrained")
    axes = figure.subplots(panels, 1, squeeze=False)[:, 0]
    clients = list(range(report.num_partitions))
    axes[0].bar(clients, report.sizes, color="#4c72b0")
    summary = report.summary()
    axes[0].set(
        ylabel="rows",
        title=f"{report.data} · {report.partitioner} · {report.num_partitions} clients · "
        f"sizes {summary['size_min']}–{summary['size_max']} (CV {summary['size_cv']:.2f})",
    )
    if report.labels:
        axis = axes[1]
        bottom = [0.0] * report.num_partitions
        for j, name in enumerate(report.labels):
            shares = [row[j] / max(sum(row), 1) for row in report.counts]
            axis.bar(clients, shares, bottom=bottom, label=name, color=f"C{j % 10}")
            bottom = [b + s for b, s in zip(bottom, shares, strict=True)]
        axis.set(
            ylabel=f"share of each {report.label}",
            xlabel="client (partition id)",
            ylim=(0, 1),
            title=f"label skew: total-variation distance to the pooled mix, mean "
            f"{summary['label_tv_mean']:.2f}, max {summary['label_tv_max']:.2f}",
        )
        axis.legend(
            fontsize="x-small",
            ncol=min(4, len(report.labels)),
            loc="upper center",
            bbox_to_anchor=(0.5, -0.22),
            frameon=False,
        )
    step = max(1, report.num_partitions // 25)
    for axis in axes:
        axis.set_xticks(clients[::step])
        axis.set_xlim(-0.6, report.num_partitions - 0.4)
    axes[-1].set_xlabel("client (partition id)")
    figure.savefig(path)
    return path


def save(report: PartitionReport, directory: Path) -> tuple[Path, Path]:
    """partitions.json and partitions.png in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / REPORT_JSON
    json_path.write_text(json.dumps(report.to_json(), indent=1) + "\n")
    return json_path, draw(report, directory / REPORT_PNG)


def describe(report: PartitionReport) -> str:
    s = report.summary()
    text = (
        f"{report.num_partitions} partitions of {s['size_min']}–{s['size_max']} rows "
        f"(mean {s['size_mean']}, CV {s['size_cv']})"
    )
    if report.labels:
        text += (
            f"; {report.label}: total-variation distance to the pooled mix mean "
            f"{s['label_tv_mean']}, max {s['label_tv_max']}, at least "
            f"{s['labels_per_client_min']} of {len(report.labels)} labels per client"
        )
    return text

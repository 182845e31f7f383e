"""The partition report counts what each client holds, the way the clients' partitioner splits it."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest

from fedtune.config import build_config
from fedtune.data.partition import partition_dataset
from fedtune.data.partition_report import PartitionReport, build_report, describe, save
from fedtune.data.sources import load_local_rows, resolve_data

pytestmark = pytest.mark.unit


def _write(tmp_path, rows=400, labels=("a", "b", "c", "d")):
    path = tmp_path / "labelled.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        for i in range(rows):
            record = {
                "instruction": f"q{i}",
                "response": f"r{i}",
                "category": labels[(i * 7) % len(labels)],
            }
            handle.write(json.dumps(record) + "\n")
    return path


@pytest.mark.parametrize(
    "settings",
    [
        {"data.partitioner": "iid"},
        {
            "data.partitioner": "dirichlet",
            "data.partition-by": "category",
            "data.dirichlet-alpha": 0.1,
        },
        {
            "data.partitioner": "pathological",
            "data.partition-by": "category",
            "data.classes-per-partition": 1,
        },
    ],
)
def test_counts_equal_a_direct_count_of_each_partition(tmp_path, settings):
    path = _write(tmp_path)
    config = build_config(
        {
            "data.name": str(path),
            "federation.num-clients": 6,
            "data.heldout-examples": 40,
            **settings,
        }
    )
    report = build_report(config.data, 6)
    partitioner = partition_dataset(load_local_rows(resolve_data(str(path))), config.data, 6)
    assert report.heldout_rows == 40 and sum(report.sizes) == 360
    assert report.label == "category" and report.labels == ["a", "b", "c", "d"]
    for i in range(6):
        rows = partitioner.load_partition(i)
        assert report.sizes[i] == len(rows)
        direct = Counter(rows["category"])
        assert report.counts[i] == [direct.get(label, 0) for label in report.labels]
    if settings["data.partitioner"] == "pathological":
        assert all(sum(1 for c in row if c) == 1 for row in report.counts)
        assert report.summary()["label_tv_mean"] >= 0.7
    if settings["data.partitioner"] == "iid":
        assert report.summary()["label_tv_max"] < 0.2


def test_distance_and_summary_by_hand(tmp_path):
    report = PartitionReport(
        data="x",
        partitioner="manual",
        num_partitions=2,
        heldout_rows=0,
        sizes=[4, 4],
        label="y",
        labels=["p", "q"],
        counts=[[4, 0], [2, 2]],
    )
    # pooled (6/8, 2/8): client 0 is 1/4 away, client 1 is 1/4 away.
    assert report.label_distance() == pytest.approx([0.25, 0.25])
    summary = report.summary()
    assert summary["size_cv"] == 0 and summary["labels_per_client_min"] == 1
    json_path, png_path = save(report, tmp_path / "out")
    assert json.loads(json_path.read_text())["summary"]["label_tv_mean"] == 0.25
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "0.25" in describe(report)


def test_data_report_command(tmp_path, capsys):
    from fedtune.cli import main

    path = _write(tmp_path)
    out = tmp_path / "report"
    code = main(
        [
            "data", "report", str(path), "--clients", "5", "--partitioner", "dirichlet",
            "--partition-by", "category", "--alpha", "0.3", "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    saved = json.loads((out / "partitions.json").read_text())
    assert saved["num_partitions"] == 5 and saved["partitioner"] == "dirichlet"
    assert (out / "partitions.png").exists()
    assert main(["data", "report", str(path), "--set", "train.seed=1"]) == 2
    assert "only data.* keys" in capsys.readouterr().err
    assert main(["data", "report", "org/hub-name", "--out", str(out)]) == 2
    assert "hub data set" in capsys.readouterr().err
    assert main(["data", "report", str(path), "--partitioner", "dirichlet"]) == 2
    assert "needs a label column" in capsys.readouterr().err


def test_the_embedded_dolly_has_its_eight_categories():
    config = build_config(
        {"data.name": "embedded:dolly-15k", "data.heldout-examples": 0, "federation.num-clients": 2}
    )
    report = build_report(config.data, 2)
    totals = dict(zip(report.labels, map(sum, zip(*report.counts, strict=True)), strict=True))
    assert sum(report.sizes) == 14935
    assert totals["open_qa"] == 3601 and totals["creative_writing"] == 701 and len(totals) == 8

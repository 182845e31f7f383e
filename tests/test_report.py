"""`fedtune report` and each run's report.png, on run directories written here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedtune.report import compare_runs, plot_run, read_curves

pytestmark = pytest.mark.unit

PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(root, name, heldout, per_round_bytes, codec="fp32"):
    """A run directory as fedtune writes it: config, metrics by round, summary, status."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(
        json.dumps({"config": {"strategy.name": "fedavg", "compress.uplink": codec}, "digest": "x"})
    )
    rows = [
        {
            "round": r,
            "train_loss": 2.0 - 0.1 * r,
            "heldout_loss": heldout[r],
            "downlink_bytes": per_round_bytes,
            "uplink_bytes": per_round_bytes // 2,
        }
        for r in range(1, len(heldout))
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        "server_eval": {"0": {"heldout_loss": heldout[0], "probe_loss": 1.9}},
        "codecs": {"downlink": "fp32", "uplink": codec},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "status.json").write_text(json.dumps({"state": "completed"}))
    return run


def test_bytes_to_target_is_the_first_round_reaching_it(tmp_path):
    reference = fake_run(tmp_path, "fp32", [2.0, 1.8, 1.6, 1.5], 1000)
    cheap = fake_run(tmp_path, "int4", [2.0, 1.7, 1.55, 1.45], 100, codec="int4")
    curves = read_curves(cheap)
    assert curves.heldout == {0: 2.0, 1: 1.7, 2: 1.55, 3: 1.45}
    assert curves.downlink == [100, 200, 300] and curves.uplink == [50, 100, 150]
    rows, figure = compare_runs([reference, cheap], tmp_path / "cmp.png")
    # The default target is the first run's final held-out loss, 1.5: the reference reaches it
    # after 3 rounds (4,500 bytes), the int4 run after its third round too (450 bytes).
    assert [r["bytes_to_target"] for r in rows] == [4500, 450]
    assert rows[1]["uplink"] == "int4" and rows[1]["total_bytes"] == 450
    rows, _ = compare_runs([reference, cheap], tmp_path / "cmp.png", target=1.6)
    assert [r["bytes_to_target"] for r in rows] == [3000, 300]
    rows, _ = compare_runs([reference, cheap], tmp_path / "cmp.png", target=1.0)
    assert [r["bytes_to_target"] for r in rows] == [None, None]
    assert figure.read_bytes()[:8] == PNG


def test_a_run_draws_its_curves(tmp_path):
    run = fake_run(tmp_path, "r", [2.0, 1.8], 10)
    assert plot_run(run).read_bytes()[:8] == PNG


def test_report_command_prints_a_table_and_refuses_a_non_run(tmp_path):
    a = fake_run(tmp_path, "a", [2.0, 1.8, 1.7], 1000)
    b = fake_run(tmp_path, "b", [2.0, 1.9, 1.75], 10, codec="int8")
    out = tmp_path / "r.png"
    done = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "report", str(a), str(b), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "not reached" in done.stdout and "3,000" in done.stdout and out.exists()
    done = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "report", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "config.json is missing" in done.stderr


def test_quality_under_budget_and_the_ratio_to_the_reference(tmp_path):
    reference = fake_run(tmp_path, "fp32", [2.0, 1.8, 1.6, 1.5], 1000)  # 1,500 bytes a round
    cheap = fake_run(tmp_path, "int4", [2.0, 1.7, 1.55, 1.45], 100, codec="int4")  # 150
    rows, _ = compare_runs([reference, cheap], tmp_path / "cmp.png", budget=3000)
    # Within 3,000 bytes the reference got through 2 rounds (1.6); the int4 run through all 3.
    assert [r["quality_under_budget"] for r in rows] == [1.6, 1.45]
    # Cost-to-target 1.5: 4,500 and 450 bytes, so 10× fewer than the reference's 4,500 total.
    assert [r["fewer_bytes"] for r in rows] == [1.0, 10.0]
    rows, _ = compare_runs([reference, cheap], tmp_path / "cmp.png")
    assert rows[0]["budget"] == 45  # default: a hundredth of the reference's total
    assert [r["quality_under_budget"] for r in rows] == [2.0, 2.0]  # only round 0 fits


def test_report_command_takes_a_budget_with_a_unit(tmp_path):
    a = fake_run(tmp_path, "a", [2.0, 1.8, 1.7], 1000)
    b = fake_run(tmp_path, "b", [2.0, 1.9, 1.75], 10, codec="int8")
    command = [sys.executable, "-m", "fedtune.cli", "report", str(a), str(b), "--out",
               str(tmp_path / "r.png")]  # fmt: skip
    done = subprocess.run([*command, "--budget", "2KiB"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "within 2,048 bytes (2.0 KiB)" in done.stdout
    assert "best under budget" in done.stdout and "1.8000" in done.stdout
    done = subprocess.run([*command, "--budget", "two"], capture_output=True, text=True)
    assert done.returncode == 2 and "--budget" in done.stderr

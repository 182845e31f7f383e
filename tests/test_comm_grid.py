"""bench/comm_grid.py's bookkeeping on run directories written here: the sweep's choice, the best
reference, each configuration's Cost-to-Target against it and the ratio over the seeds."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from unittest.mock import ANY

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import comm_grid as grid  # noqa: E402

pytestmark = pytest.mark.unit


def fake_run(out: Path, name: str, heldout: list[float], per_round: int) -> None:
    """A finished run: held-out loss before training and after each round, bytes per round."""
    run = out / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"config": {}, "digest": "x"}))
    rows = [
        {"round": r, "train_loss": 2.0, "heldout_loss": heldout[r],
         "downlink_bytes": per_round // 2, "uplink_bytes": per_round // 2}
        for r in range(1, len(heldout))
    ]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"server_eval": {"0": {"heldout_loss": heldout[0]}}, "seconds": 1.0,
               "codecs": {"downlink": "fp32", "uplink": "fp32"}}  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "status.json").write_text(json.dumps({"state": "completed"}))


def test_the_sweep_picks_the_lowest_final_loss_and_the_report_counts_bytes_to_the_best_reference(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(grid, "PARTITIONS", {"iid": []})
    monkeypatch.setattr(grid, "SEEDS", (1, 2))
    monkeypatch.setattr(grid, "LEARNING_RATES", (1e-3, 2e-3))
    monkeypatch.setattr(grid, "MAX_EXTENSIONS", 0)
    monkeypatch.setattr(grid, "REFERENCES", ("lora-r8", "lora-r32"))
    configs = ["lora-r8", "lora-r32", "sb32-int4-ef"]
    # Sweep (seed 1, iid): r8 best at 2e-3, r32 at 1e-3, sb at 2e-3.
    sweep = {("lora-r8", 1e-3): 2.6, ("lora-r8", 2e-3): 2.5, ("lora-r32", 1e-3): 2.4,
             ("lora-r32", 2e-3): 2.45, ("sb32-int4-ef", 1e-3): 2.7, ("sb32-int4-ef", 2e-3): 2.35}  # fmt: skip
    for (config, rate), final in sweep.items():
        fake_run(tmp_path, grid.run_name(config, "iid", 1, rate), [3.0, 2.8, final], 1000)
    runs = grid.Runs(tmp_path, tmp_path / "record.json")
    chosen = grid.chosen_rates(runs, configs)
    # Before a seed that every reference has run: no target, the runs alone, and a plot of them.
    early = grid.summarise(runs, {c: chosen[c] for c in ("lora-r8", "sb32-int4-ef")})
    assert early["iid"]["best_reference"] is None and early["iid"]["seeds"] == []
    assert early["iid"]["configs"]["lora-r8"] == {"seeds": 1, "runs": {1: ANY}}
    grid.draw({"partitions": early}, tmp_path / "early.png")
    assert (tmp_path / "early.png").stat().st_size > 0
    # Seed 1 alone so far (the sweep): compared on it; seed 2 of r8 alone is not compared yet.
    fake_run(tmp_path, grid.run_name("lora-r8", "iid", 2, 2e-3), [3.0, 2.8, 2.5], 1000)
    partial = grid.summarise(runs, chosen)["iid"]
    assert partial["seeds"] == [1] and partial["best_reference"] == "lora-r32"  # 2.4 < 2.5
    assert partial["configs"]["lora-r8"]["seeds"] == 1
    assert {c: v["rate"] for c, v in chosen.items()} == {
        "lora-r8": 2e-3, "lora-r32": 1e-3, "sb32-int4-ef": 2e-3
    }  # fmt: skip
    assert chosen["lora-r8"]["sweep"] == {"lr0.001": 2.6, "lr0.002": 2.5}
    # Both seeds at the chosen rates: r32 (4,000 bytes a round) ends lower than r8 on average,
    # so it is the reference; sb (20 bytes a round) reaches r32's final loss of seed 1 (2.4) in
    # round 2 — 40 bytes against r32's 8,000, 200× fewer — and never reaches seed 2's (2.42).
    (tmp_path / grid.run_name("lora-r32", "iid", 1, 1e-3)).rename(tmp_path / "old")
    fake_run(tmp_path, grid.run_name("lora-r32", "iid", 1, 1e-3), [3.0, 2.7, 2.4], 4000)
    fake_run(tmp_path, grid.run_name("lora-r32", "iid", 2, 1e-3), [3.0, 2.7, 2.42], 4000)
    fake_run(tmp_path, grid.run_name("sb32-int4-ef", "iid", 2, 2e-3), [3.0, 2.9, 2.5], 20)
    (tmp_path / grid.run_name("sb32-int4-ef", "iid", 1, 2e-3)).rename(tmp_path / "old-sb")
    fake_run(tmp_path, grid.run_name("sb32-int4-ef", "iid", 1, 2e-3), [3.0, 2.6, 2.35], 20)
    runs = grid.Runs(tmp_path, tmp_path / "rewritten.json")  # the runs above were rewritten
    report = grid.summarise(runs, chosen)["iid"]
    assert report["best_reference"] == "lora-r32" and report["seeds"] == [1, 2]
    r32, sb = report["configs"]["lora-r32"], report["configs"]["sb32-int4-ef"]
    assert r32["reached"] == 2 and r32["fewer_bytes_mean"] == 1.0  # itself: at its last round
    assert sb["seeds"] == 2 and sb["reached"] == 1
    assert sb["runs"][1]["cost_to_target"] == 40  # round 2 of seed 1 reached 2.4
    assert sb["runs"][2]["cost_to_target"] is None  # seed 2 ended at 2.5 > 2.42
    assert sb["fewer_bytes_mean"] == pytest.approx(8000 / 40)
    assert sb["final_heldout_mean"] == pytest.approx((2.35 + 2.5) / 2)
    assert sb["cost_to_target_mean"] == 40 and sb["cost_to_target_std"] == 0.0
    # The docs' table: one row per configuration, the unreached seeds counted.
    grid.print_table({"sweep": grid.sweep_state(runs, configs), "chosen": chosen,
                      "partitions": {"iid": report}})  # fmt: skip
    printed = capsys.readouterr().out
    assert "| lora-r8 | 2.6000 | 2.5000 | lr0.002 (edge) |" in printed
    assert sb["above_target_mean"] == pytest.approx(((2.35 - 2.4) + (2.5 - 2.42)) / 2)
    assert (
        "| sb32-int4-ef | 2 | 1 | 40 ± 0 | 200 ± 0 | 2.4250 ± 0.1061 | +0.0150 ± 0.0919 | 40 "
        "| 2.4250 |" in printed
    )
    # Every run starts from 3.0 here: one machine's bits. A seed whose runs start elsewhere was run
    # on another machine, and the report says so.
    assert report["mixed_machines"] == {}
    fake_run(tmp_path, grid.run_name("lora-r8", "iid", 3, 2e-3), [3.0, 2.8, 2.5], 1000)
    fake_run(tmp_path, grid.run_name("lora-r32", "iid", 3, 1e-3), [3.00001, 2.7, 2.4], 4000)
    with monkeypatch.context() as patch:
        patch.setattr(grid, "SEEDS", (1, 2, 3))
        third = grid.summarise(grid.Runs(tmp_path, tmp_path / "third.json"), chosen)["iid"]
    assert third["mixed_machines"] == {3: [3.0, 3.00001]}
    grid.print_table({"sweep": {}, "chosen": {}, "partitions": {"iid": third}})
    assert "Seed 3: runs from different machines" in capsys.readouterr().out
    for name in (
        grid.run_name("lora-r8", "iid", 3, 2e-3),
        grid.run_name("lora-r32", "iid", 3, 1e-3),
    ):
        shutil.rmtree(tmp_path / name)
    # The record outlives the run directories: without them, the same choice and the same report.
    for run_dir in [p for p in tmp_path.iterdir() if p.is_dir()]:
        shutil.rmtree(run_dir)
    recorded = grid.Runs(tmp_path, tmp_path / "rewritten.json")
    assert grid.chosen_rates(recorded, configs) == chosen
    assert grid.summarise(recorded, chosen)["iid"] == report
    assert grid.Runs(tmp_path, tmp_path / "none.json").finished(
        grid.run_name("lora-r8", "iid", 2, 2e-3)
    ) is None  # fmt: skip


def test_the_sweep_goes_beyond_an_edge_while_the_best_lies_there(tmp_path, monkeypatch):
    monkeypatch.setattr(grid, "SEEDS", (1,))
    monkeypatch.setattr(grid, "LEARNING_RATES", (1e-3, 2e-3, 4e-3))
    monkeypatch.setattr(grid, "MAX_EXTENSIONS", 2)

    runs = grid.Runs(tmp_path, tmp_path / "record.json")

    def finish(rate: float, final: float) -> None:
        fake_run(tmp_path, grid.run_name("c", "iid", 1, rate), [3.0, final], 10)

    assert grid.sweep_plan(runs, "c") == ({1e-3: None, 2e-3: None, 4e-3: None}, 1e-3)
    finish(1e-3, 2.50)
    finish(2e-3, 2.55)
    assert grid.sweep_plan(runs, "c")[1] == 4e-3
    finish(4e-3, 2.60)
    # Best at the lowest rate: half of it next; still best there: half again; then no more.
    assert grid.sweep_plan(runs, "c")[1] == 5e-4
    assert grid.chosen_rates(runs, ["c"]) == {}  # not chosen while the sweep goes on
    finish(5e-4, 2.45)
    assert grid.sweep_plan(runs, "c")[1] == 2.5e-4
    finish(2.5e-4, 2.44)
    losses, following = grid.sweep_plan(runs, "c")
    assert following is None and len(losses) == 5
    chosen = grid.chosen_rates(runs, ["c"])["c"]
    assert chosen["rate"] == 2.5e-4 and chosen["edge"] is True
    assert list(chosen["sweep"]) == ["lr0.00025", "lr0.0005", "lr0.001", "lr0.002", "lr0.004"]
    # Inside the rates: chosen with no extension.
    other = {1e-3: 2.6, 2e-3: 2.5, 4e-3: 2.7}
    for rate, final in other.items():
        fake_run(tmp_path, grid.run_name("d", "iid", 1, rate), [3.0, final], 10)
    assert grid.sweep_plan(runs, "d") == (other, None)
    assert grid.chosen_rates(runs, ["d"])["d"] == {
        "rate": 2e-3, "sweep": {"lr0.001": 2.6, "lr0.002": 2.5, "lr0.004": 2.7}, "edge": False
    }  # fmt: skip


def test_the_mmlu_guard_holds_a_method_within_its_stderr_of_the_reference():
    scores = {"lora-r32": {"average": 25.0, "stderr": 1.4}, "sb": {"average": 23.7, "stderr": 1.3},
              "worse": {"average": 23.6, "stderr": 1.3}}  # fmt: skip
    guard = grid.mmlu_guard(scores, "lora-r32")
    assert [guard[c]["within_one_se"] for c in scores] == [True, True, False]
    assert grid.mmlu_guard(scores, None)["sb"]["within_one_se"] is None


def test_the_mmlu_guard_reads_a_recorded_score_of_any_seed_without_evaluating(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(grid, "SEEDS", (1, 2))
    record = tmp_path / "record.json"
    score = {"average": 25.1, "stderr": 1.37, "questions": 1000, "seed": 2}
    name = grid.run_name("lora-r8", "iid", 2, 1e-3)
    record.write_text(json.dumps({name: {"run": name, "final_heldout_loss": 2.6,
                                         "mmlu_loglik_1000": score}}))  # fmt: skip
    runs = grid.Runs(tmp_path, record)
    chosen = {"lora-r8": {"rate": 1e-3}, "sb": {"rate": 1e-3}}
    # Seed 1 has neither a score nor an adapter, seed 2 a recorded score: that one, nothing run;
    # "sb" has neither anywhere: left out.
    assert grid.run_mmlu(runs, chosen, grid.Budget(60)) == {"lora-r8": score}
    # Another process's record since: merged on the next write, nothing of either lost.
    other = grid.Runs(tmp_path, record)
    fake_run(tmp_path, grid.run_name("sb", "iid", 1, 1e-3), [3.0, 2.9], 10)
    assert other.finished(grid.run_name("sb", "iid", 1, 1e-3)) is not None
    runs.add(name, seconds=1.0)
    merged = json.loads(record.read_text())
    assert set(merged) == {name, grid.run_name("sb", "iid", 1, 1e-3)}
    assert merged[name]["mmlu_loglik_1000"] == score and merged[name]["seconds"] == 1.0


def test_a_sweep_result_recorded_without_its_curve_serves_the_sweep_and_the_grid_runs_it_again(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(grid, "PARTITIONS", {"iid": []})
    monkeypatch.setattr(grid, "SEEDS", (1,))
    monkeypatch.setattr(grid, "LEARNING_RATES", (1e-3,))
    monkeypatch.setattr(grid, "MAX_EXTENSIONS", 0)
    monkeypatch.setattr(grid, "REFERENCES", ("ref",))
    record = tmp_path / "record.json"
    name = grid.run_name("c", "iid", 1, 1e-3)  # carried from an earlier report: its final loss
    record.write_text(json.dumps({name: {"run": name, "final_heldout_loss": 2.5}}))
    fake_run(tmp_path, grid.run_name("ref", "iid", 1, 1e-3), [3.0, 2.6], 100)
    runs = grid.Runs(tmp_path, record)
    chosen = grid.chosen_rates(runs, ["ref", "c"])
    assert chosen["c"]["sweep"] == {"lr0.001": 2.5}  # the sweep reads the final loss alone
    # The grid cannot compare it (no curve, no bytes): left out, not a KeyError; not finished
    # for the grid, which therefore trains it again …
    assert set(grid.summarise(runs, chosen)["iid"]["configs"]) == {"ref"}
    assert runs.finished(name, curve=True) is None
    assert runs.finished(name) == {"run": name, "final_heldout_loss": 2.5}
    # … and once that run has finished, its curve and bytes join the record.
    fake_run(tmp_path, name, [3.0, 2.55], 10)
    rerun = runs.finished(name, curve=True)
    assert rerun["final_heldout_loss"] == 2.55 and rerun["total_bytes"] == 10
    assert grid.summarise(runs, chosen)["iid"]["configs"]["c"]["reached"] == 1
    assert json.loads(record.read_text())[name]["curve"] == rerun["curve"]

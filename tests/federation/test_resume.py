"""Same seed, same bits; SIGKILL/SIGTERM/Ctrl-C at several points, then --resume: the same adapter
as an uninterrupted run, each round exactly once in every log, and no process left behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from harness import Run, adapter_sha, read_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def reference(tiny_model_dir_module, tmp_path_factory):
    """An uninterrupted run with fedtune's own ClientApp."""
    tmp = tmp_path_factory.mktemp("reference")
    run = Run(tmp, "ref", tiny_model_dir_module, wrap=False)
    code, err = run.wait()
    assert code == 0, err[-3000:]
    return run.dir


def test_same_seed_same_bits(reference, tiny_model_dir_module, tmp_path):
    run = Run(tmp_path, "again", tiny_model_dir_module, wrap=False)
    code, err = run.wait()
    assert code == 0, err[-3000:]
    assert adapter_sha(run.dir) == adapter_sha(reference)
    picked = lambda d: [(c["round"], c["partition_id"]) for c in read_jsonl(d / "clients.jsonl")]  # noqa: E731
    assert picked(run.dir) == picked(reference)
    # The digest identifies the setup, not the run's name or directory.
    digest = lambda d: json.loads((d / "config.json").read_text())["digest"]  # noqa: E731
    assert digest(run.dir) == digest(reference)


def _check_resumed(run_dir, reference):
    assert adapter_sha(run_dir) == adapter_sha(reference)
    for name in ("metrics.jsonl", "ledger.jsonl", "clients.jsonl"):
        rows = read_jsonl(run_dir / name)
        keys = [(r["round"], r.get("partition_id")) for r in rows]
        assert keys == [
            (r["round"], r.get("partition_id")) for r in read_jsonl(reference / name)
        ], name
    ref_metrics = read_jsonl(reference / "metrics.jsonl")
    got = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["train_loss"] for m in got] == [m["train_loss"] for m in ref_metrics]
    assert [m["learning_rate"] for m in got] == [m["learning_rate"] for m in ref_metrics]
    summary = json.loads((run_dir / "summary.json").read_text())
    ref_summary = json.loads((reference / "summary.json").read_text())
    assert summary["communication"]["total_bytes"] == ref_summary["communication"]["total_bytes"]
    assert summary["resumes"], "the summary records the resume"


def _resume(tmp_path, name, model_dir, reference):
    run = Run(tmp_path, name, model_dir, resume=True)
    code, err = run.wait()
    assert code == 0, err[-3000:]
    assert "resuming after round" in err or "before training" in err
    _check_resumed(run.dir, reference)


@pytest.mark.parametrize(
    "where",
    ["mid-round", "between-rounds", "in-checkpoint"],
)
def test_sigkill_then_resume(where, reference, tiny_model_dir_module, tmp_path):
    faults = []
    if where == "mid-round":
        faults = [{"round": 3, "partition": None, "kind": "kill-run"}]
    elif where == "in-checkpoint":
        faults = [{"round": 2, "kind": "kill-in-checkpoint"}]
    run = Run(tmp_path, "killed", tiny_model_dir_module, faults=faults)
    if where == "between-rounds":
        run.wait_for(lambda: run.metrics_lines() >= 2)
        run.proc.kill()
    code, _ = run.wait()
    assert code == -signal.SIGKILL
    assert run.leftovers() == []
    assert run.status()["state"] in ("running", "failed")  # what --resume recognises
    _resume(tmp_path, "killed", tiny_model_dir_module, reference)


@pytest.mark.parametrize(
    "signum,state,code", [(signal.SIGTERM, "terminated", 143), (signal.SIGINT, "interrupted", 130)]
)
def test_signal_ends_honestly_then_resume(
    signum, state, code, reference, tiny_model_dir_module, tmp_path
):
    run = Run(tmp_path, "stopped", tiny_model_dir_module)
    run.wait_for(lambda: run.metrics_lines() >= 1)
    run.proc.send_signal(signum)
    got, err = run.wait(timeout=60)
    assert got == code, err[-2000:]
    assert run.status()["state"] == state and run.status()["resumable"] is True
    assert "--resume" in err
    assert run.leftovers() == []
    _resume(tmp_path, "stopped", tiny_model_dir_module, reference)


def test_resume_refuses_a_different_config_and_a_finished_run(reference, tmp_path):
    args = [sys.executable, "-m", "fedtune.cli", "run", "--resume", str(reference)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "already ended (completed)" in done.stderr
    status = json.loads((reference / "status.json").read_text())
    (reference / "status.json").write_text(json.dumps({**status, "state": "failed"}))
    try:
        done = subprocess.run(
            [*args, "--set", "train.learning-rate-max=0.5", "--set", "num-server-rounds=9"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        (reference / "status.json").write_text(json.dumps(status))
    assert done.returncode == 2
    assert "num-server-rounds: 5 → 9" in done.stderr and "train.learning-rate-max" in done.stderr

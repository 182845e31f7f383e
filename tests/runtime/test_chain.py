"""The whole chain on a tiny run, as a user types it: `fedtune run` → `fedtune eval` → `submit`.

Each step runs in its own process and reads only what the previous one left on disk, so a change
in any file format (run directory, ledger, summary, adapter, evaluation results) breaks it here.
The evaluation is a small sample, which the board refuses as partial; `submit --dry-run
--allow-partial` still reads and cross-checks every file and prints the submission.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SAMPLE = 60


def fedtune(*args, cwd, timeout=600):
    done = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ),
    )
    return done


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_run_eval_submit(tmp_path, tiny_model_dir):
    runs, board = tmp_path / "runs", tmp_path / "board"
    sets = [
        f"model.name={tiny_model_dir}",
        "federation.num-clients=2",
        "strategy.clients-per-round=2",
        "num-server-rounds=1",
        "train.local-steps=1",
        "train.batch-size=1",
        "train.seq-length=64",
        "eval.probe-examples=2",
        "data.heldout-examples=8",
        # An adapter that sends less, through a codec: the chain must carry both to the board.
        "model.lora.variant=sb",
        "model.lora.sb-init-examples=4",
        "compress.uplink=delta,int8,zstd",
        f"run.output-dir={runs}",
        "run.name=chain",
    ]
    done = fedtune("run", *(x for item in sets for x in ("--set", item)), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = runs / "chain"

    done = fedtune(
        "eval", "--adapter", str(run_dir), "--sample", str(SAMPLE), "--no-progress", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(PARTIAL)" in done.stdout
    [results_file] = (run_dir / "eval").glob("mmlu_*.json")
    results = json.loads(results_file.read_text())

    submit = ["leaderboard", "submit", str(run_dir), "--team", "t", "--code"]
    submit += ["https://example.org/x", "--track", "open", "--data-dir", str(board)]
    refused = fedtune(*submit, "--dry-run", cwd=tmp_path)
    assert refused.returncode == 2 and "refused: partial evaluation" in refused.stderr

    done = fedtune(*submit, "--dry-run", "--allow-partial", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "partial evaluation: would be refused" in done.stderr
    payload = json.loads(done.stdout)
    assert not board.exists()  # a dry run stores nothing

    # Scores: the three scored categories, from the evaluation's own per-subject counts.
    assert set(payload["scores"]) == {"stem", "social_sciences", "humanities"}
    assert all(0.0 <= v <= 100.0 for v in payload["scores"].values())
    subjects = payload["evaluation"]["subjects"]
    assert sum(c["total"] for c in subjects.values()) == results["n_questions"]
    assert results["n_questions"] == pytest.approx(SAMPLE, abs=3)
    for category, cell in results["categories"].items():
        assert payload["scores"][category] == pytest.approx(100.0 * cell["accuracy"])

    # Communication: the summary's totals, which are the ledger's sums.
    summary = json.loads((run_dir / "summary.json").read_text())
    ledger = read_jsonl(run_dir / "ledger.jsonl")
    assert payload["communication"] == {
        k: summary["communication"][k] for k in ("total_bytes", "downlink_bytes", "uplink_bytes")
    }
    assert payload["communication"]["downlink_bytes"] == sum(r["downlink_bytes"] for r in ledger)
    assert payload["communication"]["uplink_bytes"] == sum(r["uplink_bytes"] for r in ledger)
    assert payload["communication"]["total_bytes"] > 0
    assert [(r["round"], r["clients"]) for r in payload["rounds"]] == [(1, 2)]
    # The entry shows how the bytes were saved: adapter type, strategy and codecs.
    setup = payload["setup"]
    assert setup["adapter"] == "Fed-SB r×r r=8 alpha=16 on q_proj,v_proj"
    assert setup["strategy"] == "fedavg" and setup["codec_downlink"] == "identity"
    assert setup["codec_uplink"] == "delta,int8,zstd=3 (blocks of 64)"
    # Only the r×r matrices travel: 2 layers × (q, v) × 8·8 fp32 (+ the .npy header) down.
    assert {r["downlink_bytes"] for r in ledger} == {4 * (8 * 8 * 4 + 128)}

    # The adapter: the run's, on disk, and the one evaluated.
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert payload["adapter"]["sha256"] == summary["adapter_sha256"] == sha256
    assert results["adapter"]["sha256"] == sha256
    assert payload["adapter"]["location"] == str(run_dir / "adapter")

    # Setup and provenance come from the run directory's config and environment.
    config = json.loads((run_dir / "config.json").read_text())
    assert payload["setup"]["num_clients"] == 2 and payload["setup"]["rounds"] == 1
    assert payload["provenance"]["run"] == "chain"
    assert payload["provenance"]["config_digest"] == config["digest"]
    assert payload["provenance"]["evaluation_file"] == str(results_file.relative_to(run_dir))
    assert payload["config"]["model.name"] == str(tiny_model_dir)

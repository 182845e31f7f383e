"""End to end through Flower's real simulation engine: `fedtune run` as a user types it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fedtune.rundir import read_ledger

pytestmark = pytest.mark.integration


def fedtune_run(tmp_path, *sets, timeout=600):
    """Run the CLI in its own process (Ray starts and stops with it); return (process, run dir)."""
    out = tmp_path / "runs"
    args = [
        sys.executable,
        "-m",
        "fedtune.cli",
        "run",
        "--set",
        f"run.output-dir={out}",
        "--set",
        "run.name=r",
    ]
    for item in sets:
        args += ["--set", item]
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env=dict(os.environ)
    )
    return done, out / "r"


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def per_message_bytes(adapter_file):
    state = load_file(str(adapter_file))
    return sum(t.numel() * t.element_size() for t in state.values()) + 128 * len(state)


@pytest.mark.slow
def test_tiny_model_three_clients_two_rounds(tmp_path, tiny_model_dir):
    done, run_dir = fedtune_run(
        tmp_path,
        f"model.name={tiny_model_dir}",
        "federation.num-clients=3",
        "strategy.clients-per-round=3",
        "num-server-rounds=2",
        "eval.heldout-every-rounds=1",
        "train.local-steps=2",
        "train.batch-size=2",
        "train.seq-length=64",
        "train.save-every-round=1",
        "train.learning-rate-max=1e-2",
        "eval.mmlu-every-rounds=1",
        "eval.mmlu-questions=44",
        "eval.probe-examples=4",
        "data.heldout-examples=24",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "round 2/2 │ clients 3" in done.stderr and "│ held-out " in done.stderr
    for name in (
        "config.json",
        "environment.json",
        "metrics.jsonl",
        "clients.jsonl",
        "ledger.jsonl",
        "summary.json",
    ):
        assert (run_dir / name).is_file(), name
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "completed" and status["rounds_completed"] == 2

    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [1, 2]
    # Server-side evaluation: the probe loss every round, MMLU on a 44-question stratified subset.
    # (at least one question per scored subject: 44 asked, 49 drawn in proportion to subject size)
    questions = metrics[0]["mmlu"]["questions"]
    assert questions >= 44 and all(m["probe_loss"] > 0 for m in metrics)
    assert sum(metrics[0]["mmlu"]["predicted_letters"].values()) == questions
    assert 0 <= metrics[-1]["mmlu"]["average"] <= 100
    clients = read_jsonl(run_dir / "clients.jsonl")
    for server_round in (1, 2):
        assert sorted(c["partition_id"] for c in clients if c["round"] == server_round) == [0, 1, 2]

    # The ledger against the analytic figure: rounds × 2 directions × clients × message bytes.
    message = per_message_bytes(run_dir / "adapter" / "adapter_model.safetensors")
    ledger = read_ledger(run_dir)
    assert len(ledger) == 2 * 3
    assert all(e["downlink_bytes"] == e["uplink_bytes"] == message for e in ledger)
    total = sum(e["downlink_bytes"] + e["uplink_bytes"] for e in ledger)
    assert total == 2 * 2 * 3 * message
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["communication"]["total_bytes"] == total
    assert sorted(summary["server_eval"]) == ["0", "1", "2"]
    # The held-out loss (24 rows no client holds) before training and after every round.
    heldout = [summary["server_eval"][r]["heldout_loss"] for r in ("0", "1", "2")]
    assert heldout[1:] == [m["heldout_loss"] for m in metrics]
    assert summary["final_heldout_loss"] == heldout[-1] and heldout[-1] != heldout[0]
    assert summary["communication"]["wire_bytes"] > total
    assert metrics[-1]["cumulative_bytes"] == total

    # A resume point after every round (the last one kept), PEFT snapshots every N rounds.
    assert (run_dir / "checkpoints" / "resume-point").read_text().strip() == "state-00002"
    state = json.loads((run_dir / "checkpoints" / "state-00002" / "state.json").read_text())
    assert state["round"] == 2 and state["ledger"]["entries"] == 6
    assert state["strategy"]["class"] == "FedAvg" and len(state["sampler"]) == 3
    assert len(summary["checkpoint_seconds"]["per_round"]) == 2
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().sum()) > 0 for p in lora_b)  # trained: B left zero-init
    checkpoint = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        str(run_dir / "checkpoints" / "round-00001"),
    )
    assert sum("lora_A" in n for n, _ in checkpoint.named_parameters()) == len(lora_b)
    assert (run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # drawn at the end
    environment = json.loads((run_dir / "environment.json").read_text())
    assert environment["packages"]["flwr"] == "1.42.0" and environment["command"][:2] == [
        "fedtune",
        "run",
    ]
    # Filled in by the engine's process, which trains; `fedtune run` never imports torch.
    assert environment["device"] == "cpu" and environment["torch_threads"] >= 1


@pytest.mark.slow
def test_byte_budget_stops_before_crossing(tmp_path, tiny_model_dir):
    from flwr.app import ArrayRecord
    from transformers import AutoModelForCausalLM

    from fedtune.accounting.ledger import array_record_bytes
    from fedtune.config import build_config, parse_assignment
    from fedtune.model.adapters import adapter_state, attach_adapter

    sets = [
        f"model.name={tiny_model_dir}",
        "federation.num-clients=2",
        "strategy.clients-per-round=1",
        "train.local-steps=1",
        "train.batch-size=1",
        "train.seq-length=64",
        "eval.probe-examples=2",
        "data.heldout-examples=8",
    ]
    # One round of 1 client costs 2 messages: the adapter down, the trained adapter up, each the
    # ArrayRecord of its fp32 tensors (made here from the same model and settings).
    config = build_config(dict(parse_assignment(item) for item in sets))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    state = adapter_state(attach_adapter(base, config.lora, config.train.seed))
    round_bytes = 2 * array_record_bytes(ArrayRecord(state))
    # Allow 1.5 rounds' worth: round 2 must not start.
    done, run_dir = fedtune_run(
        tmp_path, *sets, "num-server-rounds=3", f"run.byte-budget={round_bytes * 3 // 2}"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stopping before round 2" in done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state"] == "stopped-budget" and summary["rounds_completed"] == 1
    # The ledger paid exactly the one round it allowed, as computed above.
    assert summary["communication"]["total_bytes"] == round_bytes <= round_bytes * 3 // 2
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_embedded_smollm2_one_round(tmp_path, embedded_source):
    done, run_dir = fedtune_run(
        tmp_path,
        "federation.num-clients=2",
        "strategy.clients-per-round=2",
        "num-server-rounds=1",
        "train.local-steps=2",
        "train.batch-size=2",
        "train.seq-length=64",
        "data.heldout-examples=16",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert len(metrics) == 1 and metrics[0]["clients"] == 2
    assert 0.5 < metrics[0]["train_loss"] < 5.0  # a pretrained model on English text
    state = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    # SmolLM2-135M, LoRA r=8 on q,v over 30 layers: 30 × (8·576 + 576·8 + 8·576 + 192·8) = 460,800.
    assert sum(t.numel() for t in state.values()) == 460_800
    assert all(t.dtype == torch.float32 for t in state.values())


@pytest.mark.slow
def test_local_dp_stops_before_passing_its_epsilon(tmp_path, tiny_model_dir):
    # σ = 2 over 3 clients, no amplification: ε = 3.19 after two releases, 4.01 after three.
    done, run_dir = fedtune_run(
        tmp_path,
        f"model.name={tiny_model_dir}",
        "federation.num-clients=3",
        "strategy.clients-per-round=3",
        "num-server-rounds=4",
        "train.local-steps=1",
        "train.batch-size=1",
        "train.seq-length=64",
        "dp.clipping-norm=0.1",
        "dp.noise-multiplier=2.0",
        "dp.noise=client",
        "dp.max-epsilon=3.5",
        "eval.probe-examples=2",
        "data.heldout-examples=8",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stopping before round 3: its release would take ε to 4.011" in done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state"] == "stopped-privacy-budget" and summary["rounds_completed"] == 2
    privacy = summary["privacy"]
    assert privacy["noise"] == "client" and privacy["releases"] == [3, 3]
    assert privacy["epsilon"] == pytest.approx(3.189, abs=1e-3) and privacy["epsilon"] <= 3.5
    # Local DP: the server is told no unnoised norm; every update it saw carries σ·C noise, so
    # its distance from the global is far above the clipping norm.
    clients = [json.loads(x) for x in (run_dir / "clients.jsonl").read_text().splitlines()]
    assert clients and all("dp_update_norm" not in c for c in clients)
    assert all(c["update_norm"] > 0.1 for c in clients)

"""Faults injected through a real ClientApp in the simulation engine: each bad reply is dropped
with its reason, counted, and the run goes on; too few usable replies retry, then stop honestly."""

from __future__ import annotations

import json
import math

import pytest
from harness import Run, read_jsonl
from safetensors.torch import load_file

from fedtune.federation.nodes import PartitionSampler

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVERYONE = ("strategy.clients-per-round=4", "strategy.round-timeout-s=20", "num-server-rounds=5")


def test_bad_replies_are_dropped_with_their_reasons(tiny_model_dir_module, tmp_path):
    faults = [
        {"round": 1, "partition": 0, "kind": "raise"},
        {"round": 1, "partition": 1, "kind": "nan"},
        {"round": 1, "partition": 2, "kind": "shape"},
        {"round": 2, "partition": 0, "kind": "scale"},
        {"round": 2, "partition": 1, "kind": "no-loss"},
        {"round": 2, "partition": 2, "kind": "extra-metric"},
        {"round": 2, "partition": 3, "kind": "negative-examples"},
        {"round": 3, "partition": 0, "kind": "huge-examples"},
        {"round": 3, "partition": 1, "kind": "nan-loss"},
        {"round": 3, "partition": 2, "kind": "sleep", "seconds": 45},
        {"round": 4, "partition": 0, "kind": "crash"},
    ]
    # One worker per core: the sleeping client and the crashing one hold up only their own.
    run = Run(tmp_path, "faults", tiny_model_dir_module, *EVERYONE, faults=faults, client_cpus=1)
    code, err = run.wait()
    assert code == 0, err[-4000:]
    problems = {
        (c["round"], c["partition_id"]): c.get("problem")
        for c in read_jsonl(run.dir / "clients.jsonl")
    }
    expected = {
        (1, 0): "client error: ",
        (1, 1): "non-finite values in",
        (1, 2): "adapter does not fit this model",
        (1, 3): None,
        (2, 0): "update norm",
        (2, 1): "metric 'train-loss' missing",
        (2, 2): None,
        (2, 3): "metric 'num-examples' is -333",
        # 999 rows, 8 held out, in 4 partitions: partition 0 holds 248.
        (3, 0): "metric 'num-examples' is 1,000,000,000,000, more than the 248 rows",
        (3, 1): "metric 'train-loss' is not finite",
        (3, 2): "no reply within strategy.round-timeout-s",
        (3, 3): None,
        (4, 0): "client error: ",
        (5, 0): None,  # the crashed worker was replaced: every client trains in round 5
        (5, 1): None,
        (5, 2): None,
        (5, 3): None,
    }
    for key, start in expected.items():
        if start is None:
            assert problems[key] is None, (key, problems[key])
        else:
            assert problems[key] and problems[key].startswith(start), (key, problems[key])
    assert "injected failure in partition 0" in problems[(1, 0)]  # the reason, not a traceback
    assert len(problems[(1, 0)]) <= 300
    rows = read_jsonl(run.dir / "clients.jsonl")
    extra = [r for r in rows if r["round"] == 2 and r["partition_id"] == 2][0]
    assert extra["ignored_metrics"] == ["surprise"]
    metrics = read_jsonl(run.dir / "metrics.jsonl")
    # A message that reaches the dying worker while Ray restarts it fails too ("actor is
    # restarting"); the round still aggregates the others, and the next round has every client.
    assert [m["failed_clients"] for m in metrics[:3]] == [3, 3, 3] and metrics[4][
        "failed_clients"
    ] == 0
    assert 1 <= metrics[3]["clients"] <= 3 and metrics[4]["clients"] == 4
    assert all(math.isfinite(m["train_loss"]) for m in metrics)
    summary = json.loads((run.dir / "summary.json").read_text())
    assert summary["state"] == "completed" and 10 <= summary["dropped_replies"] <= 12
    adapter = load_file(str(run.dir / "adapter" / "adapter_model.safetensors"))
    assert all(bool(t.isfinite().all()) for t in adapter.values())
    assert "partition 0 (node" in err and "dropped: client error" in err
    assert run.leftovers() == []


def test_too_few_usable_replies_retry_then_stop_resumably(tiny_model_dir_module, tmp_path):
    # Round 1 first asks the sampler's first two partitions; make one of them fail: the round
    # is retried with another client and aggregates two usable replies.
    first = PartitionSampler(2024).sample([0, 1, 2, 3], 2)
    faults = [{"round": 1, "partition": first[0], "kind": "raise"}]
    # Round 2: every client fails; after 1 retry the run stops with a resumable checkpoint.
    faults += [{"round": 2, "partition": p, "kind": "raise"} for p in range(4)]
    run = Run(
        tmp_path,
        "retry",
        tiny_model_dir_module,
        "strategy.min-clients=2",
        "strategy.max-retries=1",
        faults=faults,
    )
    code, err = run.wait()
    assert code == 1, err[-3000:]
    metrics = read_jsonl(run.dir / "metrics.jsonl")
    assert len(metrics) == 1 and metrics[0]["attempts"] == 2 and metrics[0]["clients"] == 2
    ledger = read_jsonl(run.dir / "ledger.jsonl")
    assert sorted({(e["round"], e["attempt"]) for e in ledger}) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    status = run.status()
    assert status["state"] == "failed" and status["resumable"] and status["rounds_completed"] == 1
    assert "round 2: 0 usable replies after 2 attempt(s)" in status["error"]
    assert "fedtune run --resume" in err
    assert (run.dir / "checkpoints" / "resume-point").read_text().strip() == "state-00001"
    assert run.leftovers() == []

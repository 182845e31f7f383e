"""Same seed, same bits; SIGKILL/SIGTERM/Ctrl-C at several points, then --resume: the same adapter
as an uninterrupted run, each round exactly once in every log, and no process left behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from harness import SETUPS, Run, adapter_sha, check_resumed, read_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def reference(reference_run):
    return reference_run("fedavg")


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


def _resume(tmp_path, name, model_dir, reference):
    run = Run(tmp_path, name, model_dir, resume=True)
    code, err = run.wait()
    assert code == 0, err[-3000:]
    assert "resuming after round" in err or "before training" in err
    check_resumed(run.dir, reference)


@pytest.mark.parametrize(
    "where,setup",
    # Each stateful strategy resumes through a real SIGKILL: SCAFFOLD's server and client
    # control variates and FedAdam's moments must come back bit for bit for the adapter to
    # match (FedAvgM's momentum, FedYogi's and FedAdagrad's moments are the same kind of saved
    # strategy state, round-tripped in test_round_parts); so must the clients' error-feedback
    # residuals of a compressed run, killed after its clients had already
    # moved on to round 2's residuals; FlexLoRA's SVDs give the same factors again.
    [
        ("mid-round", "flexlora"),
        ("between-rounds", "scaffold-ffa"),
        ("in-checkpoint", "fedadam-compressed"),
        ("between-rounds", "dp-central"),
        ("between-rounds", "sb-int2-ef"),
    ],
)
def test_sigkill_then_resume(where, setup, reference_run, tiny_model_dir_module, tmp_path):
    faults = []
    if where == "mid-round":
        faults = [{"round": 3, "partition": None, "kind": "kill-run"}]
    elif where == "in-checkpoint":
        faults = [{"round": 2, "kind": "kill-in-checkpoint"}]
    run = Run(tmp_path, "killed", tiny_model_dir_module, *SETUPS[setup], faults=faults)
    if where == "between-rounds":
        run.wait_for(lambda: run.metrics_lines() >= 2)
        run.proc.kill()
    code, _ = run.wait()
    assert code == -signal.SIGKILL
    assert run.leftovers(settle_s=5) == []  # the watchdog stops Ray's agents at once
    assert run.status()["state"] in ("running", "failed")  # what --resume recognises
    reference = reference_run(setup)
    _resume(tmp_path, "killed", tiny_model_dir_module, reference)
    if where == "in-checkpoint":
        # Round 2's messages were logged, then the kill came before its resume point: the
        # ledger holds round 2 once (checked above) and the resume record keeps what it cost.
        resume = json.loads((run.dir / "summary.json").read_text())["resumes"][0]
        round2 = [r for r in read_jsonl(reference / "ledger.jsonl") if r["round"] == 2]
        assert resume["after_round"] == 1
        assert resume["redone_messages"] == len(round2)
        assert resume["redone_communication_bytes"] == sum(
            r["downlink_bytes"] + r["uplink_bytes"] for r in round2
        )


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
    if signum == signal.SIGTERM:  # one resume from a stopped run is enough (they are alike)
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


def test_a_compressed_run_pays_for_what_it_serializes(reference_run):
    """The compressed reference: the ledger counts the codec payloads, scales and indices
    included; the clients' residuals are kept per partition; the summary names the codecs."""
    import math

    import numpy as np
    from safetensors.numpy import load_file

    from fedtune.compression.codecs import parse_spec
    from fedtune.compression.message import MessageCodec

    run_dir = reference_run("fedadam-compressed")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["codecs"] == {
        "downlink": "int8 (blocks of 64, stochastic)",
        "uplink": "delta,top-k=0.1,int4,zstd=3 (blocks of 64, stochastic) + error feedback",
    }
    ledger = read_jsonl(run_dir / "ledger.jsonl")
    snapshot = load_file(str(run_dir / "checkpoints" / "round-00002" / "adapter_model.safetensors"))
    sizes = [v.size for v in snapshot.values()]
    int8_bytes = 8 + sum(n + 2 * math.ceil(n / 64) for n in sizes)
    assert {e["downlink_bytes"] for e in ledger} == {int8_bytes}
    record, _ = MessageCodec(parse_spec("int8", stochastic=True)).encode(
        snapshot, rng=np.random.default_rng(0)
    )
    assert record["fedtune.codec"].data.__len__() == int8_bytes  # the round-3 message, re-made
    fp32_message = summary["message_payload_bytes"]
    assert all(0 < e["uplink_bytes"] < fp32_message / 10 for e in ledger)
    assert summary["communication"]["total_bytes"] == sum(
        e["downlink_bytes"] + e["uplink_bytes"] for e in ledger
    )
    trained = {e["partition_id"] for e in ledger}
    kept = {p.name for p in (run_dir / "node-state").iterdir()}
    assert kept == {f"partition-{p}" for p in trained}


def test_the_r_by_r_adapter_at_two_bits_pays_for_what_it_serializes(reference_run):
    """Only R travels: int2 down (ternary, four codes a byte, an fp16 scale per 64), each R's delta
    up as rank-2 factors (int2, zstd); the ledger holds those bytes exactly."""
    import math

    import numpy as np
    from flwr.app import Array, ArrayRecord
    from safetensors.numpy import load_file

    from fedtune.accounting.ledger import array_record_bytes
    from fedtune.federation.rounds import zstd_bound

    run_dir = reference_run("sb-int2-ef")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["codecs"] == {
        "downlink": "int2 (blocks of 64, stochastic)",
        "uplink": "delta,low-rank=2,int2,zstd=3 (blocks of 64, stochastic) + error feedback",
    }
    snapshot = load_file(str(run_dir / "checkpoints" / "round-00002" / "adapter_model.safetensors"))
    ranks = [v.shape[0] for k, v in snapshot.items() if k.endswith("lora_A.weight")]
    cores = [r * r for r in ranks]  # one r×r matrix per adapted module
    # The uncompressed message, as the board counts it, holds R alone (fp32, .npy headers).
    fp32_r = ArrayRecord(
        {f"r{i}": Array(np.zeros((r, r), np.float32)) for i, r in enumerate(ranks)}
    )
    assert summary["message_payload_bytes"] == array_record_bytes(fp32_r)
    down = 8 + sum(math.ceil(n / 4) + 2 * math.ceil(n / 64) for n in cores)
    factor_values = [2 * r for r in ranks]  # r×2 and 2×r, each its own scales
    up = 8 + sum(2 * (math.ceil(n / 4) + 2 * math.ceil(n / 64)) for n in factor_values)
    ledger = read_jsonl(run_dir / "ledger.jsonl")
    assert {e["downlink_bytes"] for e in ledger} == {down}
    assert all(0 < e["uplink_bytes"] <= zstd_bound(up) for e in ledger)
    assert summary["communication"]["total_bytes"] == sum(
        e["downlink_bytes"] + e["uplink_bytes"] for e in ledger
    )


def test_ffa_lora_sends_only_b_and_keeps_a_at_its_seeded_start_and_scaffold_pays_twice(
    reference_run, tiny_model_dir_module
):
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    from fedtune.config import build_config
    from fedtune.model.adapters import adapter_state, attach_adapter

    run_dir = reference_run("scaffold-ffa")
    final = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    config = build_config({"model.name": str(tiny_model_dir_module)})
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir_module)
    start = {
        k: v.numpy() for k, v in adapter_state(attach_adapter(base, config.lora, 2024)).items()
    }
    a_keys = [k for k in final if ".lora_A." in k]
    b_keys = [k for k in final if ".lora_B." in k]
    assert a_keys and b_keys
    assert all((final[k] == start[k]).all() for k in a_keys)  # bit for bit, after 5 rounds
    assert all(abs(final[k]).sum() > 0 for k in b_keys)  # B trained (it starts at zero)
    b_bytes = sum(final[k].nbytes + 128 for k in b_keys)  # .npy payloads of the B factors
    ledger = read_jsonl(run_dir / "ledger.jsonl")
    # SCAFFOLD sends c with x and gets Δcᵢ with y: each the B factors' layout, fp32.
    assert {e["downlink_bytes"] for e in ledger} == {2 * b_bytes}
    assert {e["uplink_bytes"] for e in ledger} == {2 * b_bytes}
    assert {e["downlink_arrays"] for e in ledger} == {2 * len(b_keys)}
    # Each client that trained keeps its control variate cᵢ (over B) in its node state.
    trained = {e["partition_id"] for e in ledger}
    for partition in trained:
        files = sorted((run_dir / "node-state" / f"partition-{partition}").glob("control-*"))
        assert files, partition
        control = load_file(str(files[-1]))
        assert sorted(control) == sorted(b_keys) and any(abs(v).sum() > 0 for v in control.values())
    assert not [c for c in read_jsonl(run_dir / "clients.jsonl") if "problem" in c]


def test_flexlora_clients_train_at_their_ranks_and_the_global_is_a_peft_adapter(
    reference_run, tiny_model_dir_module
):
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    run_dir = reference_run("flexlora")
    ledger = read_jsonl(run_dir / "ledger.jsonl")
    final = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    a_keys = [k for k in final if ".lora_A." in k]
    assert a_keys and all(final[k].shape[0] == 8 for k in a_keys)  # the global's rank
    by_rank: dict[int, set[tuple[int, int]]] = {4: set(), 8: set()}
    for entry in ledger:
        by_rank[(4, 8)[entry["partition_id"] % 2]].add(
            (entry["downlink_bytes"], entry["uplink_bytes"])
        )
    # Each rank always pays the same fp32 factors down and int8 deltas up; rank 4 half as much.
    per_rank_fp32 = {r: sum(r * final[k].size // 8 * 4 + 128 for k in final) for r in (4, 8)}
    assert {down for down, _ in by_rank[4]} == {per_rank_fp32[4]}
    assert {down for down, _ in by_rank[8]} == {per_rank_fp32[8]}
    (up4,), (up8,) = ({up for _, up in by_rank[r]} for r in (4, 8))
    assert up4 < up8 < per_rank_fp32[8] / 3
    clients = read_jsonl(run_dir / "clients.jsonl")
    assert clients and not [c for c in clients if "problem" in c]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir_module)
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    assert model.peft_config["default"].r == 8
    # Every run directory says what each client held (here 4 IID partitions of the sample).
    report = json.loads((run_dir / "partitions.json").read_text())
    assert report["num_partitions"] == 4 and len(report["sizes"]) == 4
    assert (run_dir / "partitions.png").exists()


def test_dp_clips_noises_and_accounts_each_release(reference_run):
    from types import SimpleNamespace

    from fedtune.federation.privacy import privacy_spent

    run_dir = reference_run("dp-central")
    summary = json.loads((run_dir / "summary.json").read_text())
    privacy = summary["privacy"]
    assert privacy["noise"] == "server" and privacy["clipping_norm"] == 0.02
    assert privacy["noise_multiplier"] == 0.5 and privacy["delta"] == 1e-5
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert privacy["releases"] == [m["clients"] for m in metrics] and len(metrics) == 5
    # ε grows with each release and is the accountant's for these releases, recomputed here.
    epsilons = [m["dp_epsilon"] for m in metrics]
    assert all(a < b for a, b in zip(epsilons, epsilons[1:], strict=False))
    dp = SimpleNamespace(**{k: privacy[k] for k in ("noise", "noise_multiplier", "clipping_norm",
                                                    "delta", "accounting")})  # fmt: skip
    releases = [m["clients"] for m in metrics]
    assert privacy["epsilon"] == epsilons[-1] == privacy_spent(dp, 4, releases)["epsilon"]
    # Every client reported its norm before clipping; the clipping bound held for every update
    # the server accepted (its norm is measured after decoding, before the server's re-clip).
    clients = [c for c in read_jsonl(run_dir / "clients.jsonl") if "problem" not in c]
    assert clients and all(c["dp_update_norm"] > 0 for c in clients)
    assert any(c["dp_update_norm"] > 0.02 for c in clients)  # the bound was binding
    assert all(c["update_norm"] <= 0.02 * 1.01 for c in clients)  # int8 rounding's margin

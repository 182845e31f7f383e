"""`fedtune leaderboard verify` as its own process against a live server, on a tiny random model.

The entries are real: a tiny Llama with SmolLM2's tokenizer and a LoRA adapter, evaluated on the
whole scored test split (10,935 questions) by `fedtune eval`'s own runner under both protocols, and
submitted with `fedtune leaderboard submit --server`. The verifier re-generates each entry's secret
sample and the board decides: the honest entries are reproduced; the same outputs replaced by the
gold letters, or claimed for another adapter than the one that produced them, fail verification.
A worker SIGKILLed mid-verification loses nothing: the next one takes the entry when the lease runs
out, and the verdict is recorded once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fedtune.cli import main
from fedtune.leaderboard.runs import build_submission
from fedtune.provenance import file_sha256

from .lb_rundir import make_run_dir
from .lb_submissions import gold_letters

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
]  # a live server, worker processes, 2 × 10,935 questions (~2 min)

TINY = "Tiny-Llama-test"


def _adapter(model_dir: Path, seed: int, target: Path) -> Path:
    """A LoRA adapter with random (non-zero) weights, saved as PEFT saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(target)
    return target


def _evaluated_run(root: Path, name: str, model_dir: Path, adapter: Path, protocol: str) -> Path:
    """A finished run directory holding `adapter`, evaluated by `fedtune eval`'s runner on the
    whole scored test split with the tiny model."""
    from fedtune.evaluation import runner

    run = make_run_dir(root, name=name, evaluate=False)
    shutil.rmtree(run / "adapter")
    shutil.copytree(adapter, run / "adapter")
    summary = json.loads((run / "summary.json").read_text())
    summary["adapter_sha256"] = file_sha256(run / "adapter" / "adapter_model.safetensors")
    (run / "summary.json").write_text(json.dumps(summary))
    request = runner.EvalRequest(
        model=str(model_dir),
        adapter=str(run),
        protocol=protocol,
        shots=0,
        categories="stem,social_sciences,humanities",
        output_dir=str(run / "eval"),
        run_name=name,
        show_progress=False,
    )
    prepared = runner.prepare(request)
    model, tokenizer = runner.load(prepared)
    runner.evaluate(prepared, model, tokenizer)
    return run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_tokenizer, tiny_llama_factory):
    """A tiny model folder, two adapters, and an evaluated run per protocol (adapter 1)."""
    root = tmp_path_factory.mktemp("tiny-board")
    model_dir = root / "model"
    tiny_llama_factory(initializer_range=0.5).save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    adapters = [_adapter(model_dir, seed, root / f"adapter-{seed}") for seed in (1, 2)]
    runs = {
        protocol: _evaluated_run(root, f"run-{protocol}", model_dir, adapters[0], protocol)
        for protocol in ("flowertune", "loglik")
    }
    return {"model": model_dir, "adapters": adapters, "runs": runs, "root": root}


def _board(store, tiny):
    store.set_base_model(TINY, str(tiny["model"]))
    return store.new_token("verifier", role="operator")


def _verify(server_url: str, token: str, cache: Path, *extra: str) -> subprocess.Popen[str]:
    command = [
        sys.executable, "-m", "fedtune.cli", "leaderboard", "verify", "--server", server_url,
        f"--token={token}", "--cache-dir", str(cache), "--no-progress", *extra,
    ]  # fmt: skip
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


def _post(server, token, payload):
    reply = httpx.post(
        f"{server.url}/api/entries",
        json=payload,
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    )
    assert reply.status_code == 201, reply.text
    return reply.json()


def _upload(server, token, adapter: Path) -> str:
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    sha = file_sha256(adapter / "adapter_model.safetensors")
    reply = httpx.put(
        f"{server.url}/api/adapters/{sha}",
        content=weights,
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    )
    assert reply.status_code in (200, 201), reply.text
    return sha


def test_honest_entries_are_reproduced_and_doctored_ones_fail(tiny, live_server, tmp_path, capsys):
    operator = _board(live_server.store, tiny)
    ids = {}
    for protocol, run in tiny["runs"].items():
        # The honest entry, as a user submits it: the adapter goes up, then the submission.
        team = f"Honest {protocol}"
        token = live_server.store.new_token(team, team=team)
        args = ["leaderboard", "submit", str(run), "--team", team, "--code",
                "https://example.org/code", "--track", "open", "--base-model", TINY,
                "--server", live_server.url, f"--token={token}"]  # fmt: skip
        assert main(args) == 0
        assert "not ranked until a verifier reproduces it" in capsys.readouterr().out
        ids[("honest", protocol)] = max(e.id for e in live_server.store.entries())
        payload = build_submission(
            run, team=team, code_url="https://example.org/code", track="open", base_model=TINY
        )
        # The same outputs replaced by the gold letters: they re-score to 100 …
        cheat = live_server.store.new_token(f"Gold {protocol}", team=f"Gold {protocol}")
        created = _post(live_server, cheat, {**gold_letters(payload), "team": f"Gold {protocol}"})
        assert live_server.store.get(created["id"]).average == 100.0
        ids[("gold", protocol)] = created["id"]
        # … and the honest outputs claimed for another adapter than the one that produced them.
        other = live_server.store.new_token(f"Other {protocol}", team=f"Other {protocol}")
        sha = _upload(live_server, other, tiny["adapters"][1])
        config = json.loads((tiny["adapters"][1] / "adapter_config.json").read_text())
        swapped = {**payload, "team": f"Other {protocol}",
                   "adapter": {"sha256": sha, "config": config}}  # fmt: skip
        ids[("other", protocol)] = _post(live_server, other, swapped)["id"]
    assert {live_server.store.get(i).status for i in ids.values()} == {"pending"}

    worker = _verify(live_server.url, operator, tmp_path / "cache", "--once")
    output, _ = worker.communicate(timeout=600)
    assert worker.returncode == 0, output
    # One load of the base model: each adapter came off again (PEFT's unload) and the next
    # job's answers are those of a fresh load — the honest entries below agree on every letter.
    assert "verified 6 entries (1 base model load)" in output

    for (kind, protocol), entry_id in ids.items():
        entry = live_server.store.get(entry_id)
        record = entry.details["verification"]
        if kind == "honest":
            assert entry.status == "reproduced" and entry.ranked, (protocol, record)
            assert record["agreed"] == record["sampled"] == 300  # every letter, on one machine
        else:
            assert entry.status == "failed verification" and not entry.ranked, (kind, protocol)
            assert record["agreement"] < 0.9, (kind, protocol, record["agreement"])
        assert record["seed"] and len(record["sample"]) == 300  # public with the verdict
    # The doctored files are better than their model on the sample: the signature of editing.
    gold = live_server.store.get(ids[("gold", "flowertune")]).details["verification"]
    assert gold["submitted_correct"] == 300 > gold["regenerated_correct"]
    ranked = {e.id for e in live_server.store.entries() if e.ranked}
    assert ranked & set(ids.values()) == {ids[("honest", p)] for p in tiny["runs"]}


def test_a_killed_worker_loses_nothing(tiny, live_server, tmp_path):
    operator = _board(live_server.store, tiny)
    store = live_server.store
    # A large sample (~9,000 questions, ~15 s) and a short lease, so a kill lands mid-way and the
    # next worker does not wait long.
    store.set_policy("sample-per-category", "3000")
    store.set_policy("lease-s", "5")
    run = tiny["runs"]["flowertune"]
    token = store.new_token("Killed", team="Killed")
    assert main(["leaderboard", "submit", str(run), "--team", "Killed", "--code",
                 "https://example.org/c", "--track", "open", "--base-model", TINY,
                 "--server", live_server.url, f"--token={token}"]) == 0  # fmt: skip
    entry_id = max(e.id for e in store.entries())

    first = _verify(live_server.url, operator, tmp_path / "cache", "--max-jobs", "1")
    deadline = time.monotonic() + 300
    while not ((store.verification(entry_id) or {}).get("progress") or {}).get("done"):
        assert first.poll() is None, first.communicate()[0]
        assert time.monotonic() < deadline, "the worker reported no progress"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    assert store.get(entry_id).status == "pending"  # nothing recorded, nothing lost
    assert store.verification(entry_id)["state"] == "running"  # until its lease runs out

    second = _verify(live_server.url, operator, tmp_path / "cache", "--max-jobs", "1",
                     "--poll-s", "0.5")  # fmt: skip
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output
    entry = store.get(entry_id)
    assert entry.status == "reproduced", entry.details.get("verification")
    assert entry.details["verification"]["attempts"] == 2
    audit = store.audit_log(100, entry_id)
    assert [r["action"] for r in audit].count("verification") == 1  # recorded once
    assert [r["action"] for r in audit].count("claim") == 2

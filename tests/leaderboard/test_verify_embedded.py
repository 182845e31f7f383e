"""The verifier on the embedded model (SmolLM2-135M-Instruct): honest answers are reproduced, gold
letters and a swapped adapter fail — under both protocols.

A full evaluation of the embedded model takes ~35 min per protocol on a 2-core CPU, so this test
does not make one (bench/verify_e2e.py does, end to end, and records the numbers). It holds the
board's secret instead, so it knows each entry's sample before submitting — a real submitter does
not — and computes the entry's answers on that sample with the real model and adapter through
`fedtune eval`'s code; the other questions get the empty answer this model mostly gives under the
board protocol (`none` for loglik), since a verifier looks only at the sample. The verifier is the
real `fedtune leaderboard verify` process, loading the embedded model and each uploaded adapter.

It also holds the board protocol's batched generation to the official loop where logits are large:
these adapters put the letter logits in the hundreds, where a fixed 0.01 re-check margin let 2 of 30
honest letters differ between two batch layouts (the margin now grows with the top logit).
"""

from __future__ import annotations

import base64
import gzip
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from fedtune.evaluation.prompts import flowertune_inner_prompt
from fedtune.evaluation.subjects import SCORED_CATEGORIES
from fedtune.leaderboard.verification import (
    NONE,
    draw_sample,
    question_index,
    sample_seed,
)
from fedtune.provenance import file_sha256

from .lb_submissions import make_submission

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # the embedded model, ~2.5 min

PER_CATEGORY = 10  # 30 questions an entry: the test's cost, not the board's default (100)
MODEL = "SmolLM2-135M-Instruct"


def _adapters(source, root: Path) -> list[Path]:
    """Two LoRA adapters on the embedded model's output layer, seeded, that make it answer with a
    letter that depends on the question (their update raises the letter tokens' logits along a
    random projection of the last hidden state) — each adapter its own letters. The model alone
    mostly answers nothing under the board protocol; two adapters that both answered nothing
    would agree on those questions, and rightly: they would score alike there."""
    import math

    import torch
    from peft import LoraConfig, get_peft_model

    from fedtune.model.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(source)
    letters = sorted(
        {tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in ("A", "B", "C", "D",
                                                                          " A", " B", " C", " D")}
    )  # fmt: skip
    folders = []
    for seed in (1, 2):
        model = load_model(source, dtype="float32", device="cpu")
        config = LoraConfig(r=4, lora_alpha=4, target_modules=["lm_head"], init_lora_weights=False)
        peft_model = get_peft_model(model, config)
        head = peft_model.base_model.model.lm_head
        down, up = head.lora_A["default"].weight, head.lora_B["default"].weight
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            down.copy_(torch.randn(down.shape, generator=generator) / math.sqrt(down.shape[1]))
            up.zero_()
            for token in letters:
                up[token] = 40 * torch.randn(up.shape[1], generator=generator)
        folder = root / f"adapter-{seed}"
        peft_model.save_pretrained(folder)
        folders.append(folder)
    return folders


def _answers(source, adapter: Path, protocol: str, keys: list[tuple[str, int]]) -> dict:
    """The real model's answers (output or letter) on `keys`, through `fedtune eval`'s code."""
    from fedtune.evaluation.adapters import AdapterSource, apply_adapter
    from fedtune.evaluation.api import run_protocol
    from fedtune.model.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(source)
    model = apply_adapter(
        load_model(source, dtype="float32", device="cpu"),
        AdapterSource(adapter, None, None, file_sha256(adapter / "adapter_model.safetensors")),
    )
    index = question_index()
    questions = [index[k] for k in keys]
    verdicts, details = run_protocol(model, tokenizer, questions, protocol=protocol)
    if protocol == "flowertune":
        return {(g.question.subject, g.question.index): g.output for g in details["generations"]}
    return {(v.question.subject, v.question.index): v.letter or NONE for v in verdicts}


def _files(protocol: str, answers: dict, gold: bool) -> dict:
    """The submission's `generations` or `predictions`: `answers` where given (or every gold
    letter), the empty answer elsewhere."""
    questions = question_index().values()
    if protocol == "loglik":
        rows = [
            {"subset": q.subject, "index": q.index, "gold": q.answer,
             "predicted": q.answer if gold else answers.get((q.subject, q.index), NONE)}
            for q in questions
        ]  # fmt: skip
        packed = gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())
        return {"predictions": base64.b64encode(packed).decode()}
    files = {}
    for category in SCORED_CATEGORIES:
        rows = [
            {"prompt": flowertune_inner_prompt(q), "gold": q.answer, "subset": q.subject,
             "output": q.answer if gold else answers.get((q.subject, q.index), "")}
            for q in questions
            if q.category == category
        ]  # fmt: skip
        files[category] = base64.b64encode(gzip.compress(json.dumps(rows).encode())).decode()
    return {"generations": files}


def test_the_embedded_model_reproduces_honest_answers_only(embedded_source, live_server, tmp_path):
    store = live_server.store
    store.set_policy("sample-per-category", str(PER_CATEGORY))
    with sqlite3.connect(store.path) as db:  # the board's secret: only this test may look
        secret = bytes(db.execute("SELECT value FROM secrets WHERE name = 'sample'").fetchone()[0])
    adapters = _adapters(embedded_source, tmp_path)
    shas = [file_sha256(a / "adapter_model.safetensors") for a in adapters]
    kinds = [(p, k) for p in ("flowertune", "loglik") for k in ("honest", "gold", "other")]
    first_id = max(e.id for e in store.entries()) + 1  # ids are given in submission order
    samples = {
        kind: draw_sample(sample_seed(secret, first_id + n), PER_CATEGORY)
        for n, kind in enumerate(kinds)
    }
    ids = {}
    for protocol in ("flowertune", "loglik"):
        needed = samples[(protocol, "honest")] + samples[(protocol, "other")]
        answers = _answers(embedded_source, adapters[0], protocol, needed)
        for kind in ("honest", "gold", "other"):
            team = f"{kind} {protocol}"
            token = store.new_token(team, team=team)
            auth = {"Authorization": f"Bearer {token}"}
            adapter = adapters[1] if kind == "other" else adapters[0]  # the outputs are adapter 0's
            put = httpx.put(
                f"{live_server.url}/api/adapters/{file_sha256(adapter / 'adapter_model.safetensors')}",
                content=(adapter / "adapter_model.safetensors").read_bytes(),
                headers=auth,
            )
            assert put.status_code in (200, 201), put.text
            payload = make_submission(team, base_model=MODEL)
            payload.pop("scores")
            payload["evaluation"] = {"protocol": protocol, "protocol_version": "1", "shots": 0}
            payload["adapter"] = {
                "sha256": shas[1] if kind == "other" else shas[0],
                "config": json.loads((adapter / "adapter_config.json").read_text()),
            }
            payload.update(_files(protocol, answers, gold=kind == "gold"))
            reply = httpx.post(f"{live_server.url}/api/entries", json=payload, headers=auth,
                               timeout=60)  # fmt: skip
            assert reply.status_code == 201, reply.text
            assert reply.json()["status"] == "pending"
            ids[(protocol, kind)] = reply.json()["id"]
    assert [ids[k] for k in kinds] == list(range(first_id, first_id + len(kinds)))

    operator = store.new_token("verifier", role="operator")
    done = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "leaderboard", "verify", "--server",
         live_server.url, f"--token={operator}", "--once", "--no-progress", "--cache-dir",
         str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr

    for (protocol, kind), entry_id in ids.items():
        entry = store.get(entry_id)
        record = entry.details["verification"]
        assert record["sampled"] == 3 * PER_CATEGORY
        assert [tuple(q) for q in record["sample"]] == samples[(protocol, kind)]
        if kind == "honest":
            assert entry.status == "reproduced", (protocol, record)
            assert record["agreed"] == record["sampled"]
        else:
            assert entry.status == "failed verification", (protocol, kind, record)
            assert record["agreement"] < 0.9, (protocol, kind, record)

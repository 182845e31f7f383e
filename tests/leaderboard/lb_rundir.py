"""Small, well-formed run directories (docs/run-directory.md) with an evaluation, built in code.

The evaluation results are made by the evaluation package's own `summarize` over the real MMLU
test questions, with a chosen answering strategy, so they have exactly the shape it writes.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedtune.evaluation.dataset import Question, load_split
from fedtune.evaluation.metrics import Verdict, summarize
from fedtune.evaluation.subjects import SCORED_CATEGORIES

Answer = Callable[[Question], str | None]


def always(letter: str) -> Answer:
    """An answering strategy: the same letter for every question."""
    return lambda question: letter


def _write(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def evaluation_results(
    answer: Answer, *, adapter_sha256: str, keep: Callable[[Question], bool] | None = None
) -> dict[str, Any]:
    """An evaluation results document over the scored categories of the test split."""
    questions = [q for q in load_split("embedded", "test") if q.category in SCORED_CATEGORIES]
    if keep is not None:
        questions = [q for q in questions if keep(q)]
    verdicts = []
    for question in questions:
        letter = answer(question)
        verdicts.append(
            Verdict(question=question, letter=letter, correct=letter == question.answer)
        )
    return {
        "protocol": "flowertune",
        "protocol_version": "1",
        "split": "test",
        "complete": keep is None,
        "base_model": "embedded:smollm2-135m-instruct",
        "adapter": {"path": "adapter", "sha256": adapter_sha256},
        "metrics": summarize(verdicts),
    }


def make_run_dir(
    root: Path,
    *,
    name: str = "demo",
    rounds: int = 3,
    clients_per_round: int = 2,
    message_bytes: int = 1_958_400,
    data_name: str = "embedded:alpaca-gpt4-sample",
    num_clients: int = 20,
    answer: Answer | None = None,
    evaluation: dict[str, Any] | None = None,
) -> Path:
    """A finished run with a ledger, an adapter and one evaluation under eval/board/."""
    run = root / name
    config = {
        "num-server-rounds": rounds,
        "model.name": "embedded:smollm2-135m-instruct",
        "model.lora.peft-lora-r": 8,
        "data.name": data_name,
        "federation.num-clients": num_clients,
        "strategy.fraction-train": 0.1,
    }
    _write(run / "config.json", {"config": config, "digest": "0123456789abcdef"})
    _write(
        run / "environment.json",
        {
            "command": ["fedtune", "run", "--set", f"num-server-rounds={rounds}"],
            "packages": {"fedtune": "0.1.0", "flwr": "1.42.0"},
            "git": {"commit": "a" * 40, "dirty": False},
            "python": "3.11.2",
            "device": "cpu",
            "started_at": "2026-11-28T15:30:00+00:00",
        },
    )
    _write(run / "status.json", {"state": "completed", "rounds_completed": rounds})
    rng = random.Random(0)
    ledger, metrics = [], []
    for r in range(1, rounds + 1):
        for node in range(clients_per_round):
            ledger.append(
                {"round": r, "node_id": 1000 + node, "partition_id": rng.randrange(num_clients),
                 "downlink_bytes": message_bytes, "uplink_bytes": message_bytes,
                 "downlink_arrays": 180, "uplink_arrays": 180,
                 "downlink_wire_bytes": message_bytes + 900,
                 "uplink_wire_bytes": message_bytes + 950}
            )  # fmt: skip
        total = clients_per_round * message_bytes
        metrics.append(
            {"round": r, "train_loss": 2.0 - 0.2 * r, "clients": clients_per_round,
             "downlink_bytes": total, "uplink_bytes": total, "cumulative_bytes": 2 * total * r}
        )  # fmt: skip
    (run / "ledger.jsonl").write_text("".join(json.dumps(x) + "\n" for x in ledger))
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in metrics))
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(rng.randbytes(4096))
    _write(run / "adapter" / "adapter_config.json", {"peft_type": "LORA", "r": 8})
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    down = up = rounds * clients_per_round * message_bytes
    _write(
        run / "summary.json",
        {
            "rounds_completed": rounds,
            "communication": {
                "downlink_bytes": down,
                "uplink_bytes": up,
                "total_bytes": down + up,
                "total_mib": round((down + up) / 2**20, 3),
                "board_gb": round((down + up) / 2**30, 1),
            },
            "final_train_loss": metrics[-1]["train_loss"],
            "adapter": "adapter",
            "adapter_sha256": sha,
        },
    )
    results = evaluation or evaluation_results(answer or always("D"), adapter_sha256=sha)
    _write(run / "eval" / "board" / "results.json", results)
    return run

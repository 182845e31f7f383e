"""Small, well-formed run directories (docs/run-directory.md) with an evaluation, built in code.

The evaluation results are written by the evaluation package's own runner over the real MMLU test
questions, with a chosen answering strategy in place of a model, so they have exactly its format.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest.mock import patch

from fedtune.evaluation.dataset import Question
from fedtune.evaluation.metrics import Verdict
from fedtune.provenance import file_sha256

Answer = Callable[[Question], str | None]


def always(letter: str) -> Answer:
    """An answering strategy: the same letter for every question."""
    return lambda question: letter


def _write(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def write_evaluation(
    run: Path,
    answer: Answer,
    *,
    adapter: Path | None | str = "run",
    limit_per_subject: int | None = None,
    protocol: str = "flowertune",
    shots: int = 0,
    categories: str | None = None,
) -> Path:
    """Write RUN_DIR/eval/ with the evaluation package's own runner and writer.

    Only the model is replaced: the protocol's answers come from `answer` (a letter per question,
    parsed by the official parser), everything else — question selection, adapter resolution and
    hashing, metrics, the result file and the board's files — is the real `fedtune eval` code.
    """
    import torch

    from fedtune.evaluation import runner
    from fedtune.evaluation.flowertune import Generation
    from fedtune.evaluation.parser import is_correct, predicted_letter

    def fake_protocol(model, tokenizer, questions, **kwargs):
        generations = [Generation(q, answer(q) or "") for q in questions]
        verdicts = [
            Verdict(g.question, predicted_letter(g.output), is_correct(g.output, g.question.answer))
            for g in generations
        ]
        return verdicts, {"generations": generations}

    request = runner.EvalRequest(
        # A hub id is only classified, never fetched: no model is loaded here.
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        adapter=str(run if adapter == "run" else adapter) if adapter is not None else None,
        protocol=protocol,
        shots=shots,
        categories=categories,
        limit_per_subject=limit_per_subject,
        output_dir=str(run / "eval"),
        run_name=run.name,
        show_progress=False,
    )
    prepared = runner.prepare(request)
    with patch.object(runner, "run_protocol", fake_protocol):
        result, paths = runner.evaluate(prepared, torch.nn.Linear(1, 1), tokenizer=None)
    return next(p for p in paths if p.suffix == ".json")


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
    evaluate: bool = True,
    seed: int = 0,
    privacy: dict[str, Any] | None = None,
    heldout_every: int = 0,
) -> Path:
    """A finished run with a ledger, an adapter and (with `evaluate`) a complete evaluation;
    with `heldout_every`, a held-out loss (2.5 − 0.1·round) on every such round's metrics."""
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
    rng = random.Random(seed)  # the seed decides the adapter's bytes
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
        if heldout_every and r % heldout_every == 0:
            metrics[-1]["heldout_loss"] = round(2.5 - 0.1 * r, 4)
    (run / "ledger.jsonl").write_text("".join(json.dumps(x) + "\n" for x in ledger))
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in metrics))
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.parent.mkdir(parents=True)
    # A real safetensors file (the board checks uploads), with the seed's bytes in it.
    import numpy as np
    from safetensors.numpy import save

    noise = np.frombuffer(rng.randbytes(4096), dtype=np.float32).reshape(32, 32).copy()
    weights.write_bytes(save({"base_model.model.lora_A.weight": noise}))
    _write(run / "adapter" / "adapter_config.json", {"peft_type": "LORA", "r": 8})
    sha = file_sha256(weights)
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
            "privacy": privacy,
        },
    )
    if evaluate:
        write_evaluation(run, answer or always("D"))
    return run

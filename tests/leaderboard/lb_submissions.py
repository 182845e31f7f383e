"""Well-formed leaderboard submissions built in code (for fixtures and worker processes)."""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import json
from typing import Any

from fedtune.evaluation.subjects import (
    CATEGORY_SUBJECTS,
    EXPECTED_TEST_QUESTIONS,
    SCORED_CATEGORIES,
)


def _adapter_bytes() -> bytes:
    import numpy as np
    from safetensors.numpy import save

    return save({"base_model.model.lora_A.weight": np.arange(64, dtype=np.float32).reshape(8, 8)})


# The adapter a built submission names: a small safetensors file (as the API requires of uploads)
# and a PEFT config.
ADAPTER_BYTES = _adapter_bytes()
ADAPTER_SHA256 = hashlib.sha256(ADAPTER_BYTES).hexdigest()
ADAPTER_CONFIG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}


def spread(total: int, parts: int) -> list[int]:
    """`total` split into `parts` near-equal integers (the first ones take the remainder)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def subjects_for(correct: dict[str, int]) -> dict[str, dict[str, int]]:
    """Per-subject counts covering the whole test split with `correct[category]` right answers."""
    subjects: dict[str, dict[str, int]] = {}
    for category in SCORED_CATEGORIES:
        names = CATEGORY_SUBJECTS[category]
        totals = spread(EXPECTED_TEST_QUESTIONS[category], len(names))
        rights = spread(correct[category], len(names))
        for name, total, right in zip(names, totals, rights, strict=True):
            subjects[name] = {"correct": min(right, total), "total": total}
    return subjects


@functools.lru_cache(maxsize=8)
def generation_files(correct: tuple[int, int, int], *, wrong: str = "") -> dict[str, bytes]:
    """The official evaluation's generation file of each scored category (gzip) for the shipped
    test split: the first `correct[i]` questions of category i answered right ("X. …", which the
    official parser reads as X), the rest wrong (another letter, or `wrong` when given)."""
    from fedtune.evaluation.dataset import load_split
    from fedtune.evaluation.prompts import flowertune_inner_prompt

    questions = load_split()
    files = {}
    for category, right in zip(SCORED_CATEGORIES, correct, strict=True):
        rows = []
        for number, q in enumerate(x for x in questions if x.category == category):
            other = "ABCD"[("ABCD".index(q.answer) + 1) % 4]
            output = f"{q.answer}. {q.choices[0]}" if number < right else (wrong or other)
            rows.append(
                {"prompt": flowertune_inner_prompt(q), "gold": q.answer, "subset": q.subject,
                 "output": output}
            )  # fmt: skip
        files[category] = gzip.compress(json.dumps(rows).encode(), compresslevel=1, mtime=0)
    return files


@functools.lru_cache(maxsize=8)
def predictions_file(correct: tuple[int, int, int]) -> bytes:
    """The loglik protocol's predictions file (gzip) for every test question: the first
    `correct[i]` questions of scored category i predicted right, the rest wrong; the "other"
    category's questions follow, which the board reads and leaves out."""
    from fedtune.evaluation.dataset import load_split

    questions = load_split()
    rights = dict(zip(SCORED_CATEGORIES, correct, strict=True))
    seen: dict[str, int] = {}
    lines = []
    for q in questions:
        number = seen[q.category] = seen.get(q.category, -1) + 1
        other = "ABCD"[("ABCD".index(q.answer) + 1) % 4]
        right = number < rights.get(q.category, 0)
        row = {"subset": q.subject, "index": q.index, "gold": q.answer,
               "predicted": q.answer if right else other}  # fmt: skip
        lines.append(json.dumps(row) + "\n")
    return gzip.compress("".join(lines).encode(), compresslevel=1, mtime=0)


def encoded_generations(correct: tuple[int, int, int]) -> dict[str, str]:
    """`generation_files` as a submission's `generations` (base64)."""
    return {c: base64.b64encode(b).decode() for c, b in generation_files(correct).items()}


def make_submission(
    team: str = "Team A",
    *,
    correct: tuple[int, int, int] = (1500, 1800, 2500),
    comm_bytes: int = 3 * 1024**3,
    track: str = "open",
    rounds: int = 3,
    base_model: str = "SmolLM2-135M-Instruct",
    generations: bool = False,
    predictions: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """A valid submission whose category scores follow from `correct` (STEM, Social, Humanities).

    With `generations`, it carries the official evaluation's generation files (so the board
    re-scores and ranks it) and leaves the per-subject counts and answer letters to them; with
    `predictions`, the loglik protocol's per-question predictions instead (5-shot).
    """
    by_category = dict(zip(SCORED_CATEGORIES, correct, strict=True))
    scores = {c: 100.0 * by_category[c] / EXPECTED_TEST_QUESTIONS[c] for c in SCORED_CATEGORIES}
    per_round = spread(comm_bytes, rounds * 2)
    payload: dict[str, Any] = {
        "team": team,
        "code_url": "https://github.com/example/fedtune-run",
        "base_model": base_model,
        "track": track,
        "date": "2026-11-28",
        "scores": scores,
        "communication": {
            "total_bytes": comm_bytes,
            "downlink_bytes": sum(per_round[0::2]),
            "uplink_bytes": sum(per_round[1::2]),
        },
        "evaluation": {
            "protocol": "flowertune",
            "protocol_version": "1",
            "split": "test",
            "subjects": subjects_for(by_category),
            "answer_distribution": {"A": 10935 - 300, "B": 100, "C": 100, "D": 100},
        },
        "adapter": {
            "location": "runs/demo/adapter",
            "sha256": ADAPTER_SHA256,
            "config": ADAPTER_CONFIG,
        },
        "setup": {"dataset": "flwrlabs/alpaca-gpt4", "num_clients": 20, "rounds": rounds},
        "provenance": {
            "commit": "0123abc",
            "command": "fedtune run",
            "versions": {"fedtune": "0.1.0"},
        },
        "config": {"num-server-rounds": rounds, "model.lora.peft-lora-r": 8},
        "rounds": [
            {
                "round": r + 1,
                "train_loss": 2.0 - 0.1 * r,
                "downlink_bytes": per_round[2 * r],
                "uplink_bytes": per_round[2 * r + 1],
                "clients": 2,
            }
            for r in range(rounds)
        ],  # fmt: skip
    }
    if generations:
        payload["generations"] = encoded_generations(tuple(correct))
        del payload["evaluation"]["subjects"], payload["evaluation"]["answer_distribution"]
    if predictions:
        payload["predictions"] = base64.b64encode(predictions_file(tuple(correct))).decode()
        payload["evaluation"] = {"protocol": "loglik", "protocol_version": "1", "shots": 5}
    payload.update(overrides)
    return payload


def admit(store: Any, checked: Any, *, reproduce: bool = True) -> int:
    """Store a checked submission as the API does (its adapter held first) and, with
    `reproduce`, run its verification with a scripted verifier that re-generates exactly the
    submitted letters — so an entry with files ends reproduced (ranked), as an honest one would."""
    store.put_adapter(ADAPTER_BYTES, ADAPTER_SHA256, "tests")
    entry_id = int(store.add(checked.entry, generations=checked.generations))
    if reproduce:
        reproduce_pending(store)
    return entry_id


def reproduce_pending(store: Any) -> list[int]:
    """Verify every pending entry with the scripted honest verifier; their ids."""
    done = []
    while (job := store.claim_verification("scripted")) is not None:
        store.finish_verification(job["entry_id"], job["lease"], honest_answers(store, job), {})
        done.append(job["entry_id"])
    return done


def honest_answers(store: Any, job: dict[str, Any], flip: int = 0) -> list[dict[str, Any]]:
    """A verifier's answers equal to the letters the entry's held files give for its sample
    (`flip` of them changed to another letter)."""
    from fedtune.leaderboard.verification import submitted_letters

    entry = store.get(job["entry_id"])
    formats = {c: v.get("format", "generations")
               for c, v in entry.details["evaluation"]["rescored"].items()}  # fmt: skip
    sample = [(s, i) for s, i in job["questions"]]
    letters = submitted_letters(store.generations(job["entry_id"]), formats, sample)
    answers = []
    for number, (subject, index) in enumerate(sample):
        letter = letters[(subject, index)]
        if number < flip:
            letter = "B" if letter == "A" else "A"
        if job["protocol"] == "flowertune":
            answers.append({"subset": subject, "index": index,
                            "output": "" if letter == "none" else letter})  # fmt: skip
        else:
            answers.append({"subset": subject, "index": index, "predicted": letter})
    return answers


def gold_letters(payload: dict[str, Any]) -> dict[str, Any]:
    """A submission with every output replaced by its gold letter (the claims left out): files
    that re-score to 100 and that no model wrote."""
    doctored = {k: v for k, v in payload.items() if k != "scores"}
    doctored["evaluation"] = {
        k: v
        for k, v in payload["evaluation"].items()
        if k not in ("subjects", "answer_distribution")
    }
    if "predictions" in payload:
        text = gzip.decompress(base64.b64decode(payload["predictions"])).decode()
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        for row in rows:
            row["predicted"] = row["gold"]
        packed = gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())
        doctored["predictions"] = base64.b64encode(packed).decode()
        return doctored
    files = {}
    for category, encoded in payload["generations"].items():
        rows = json.loads(gzip.decompress(base64.b64decode(encoded)))
        for row in rows:
            row["output"] = row["gold"]
        files[category] = base64.b64encode(gzip.compress(json.dumps(rows).encode())).decode()
    doctored["generations"] = files
    return doctored

"""Reading a run's evaluation results (RUN_DIR/eval/…) into what a submission needs.

`fedtune eval --adapter RUN_DIR` writes one self-describing JSON per evaluation,
`RUN_DIR/eval/mmlu_{protocol}_{shots}shot_{run}.json` (fedtune.evaluation.results). This reader
takes only what a submission needs from it:

    {"protocol": "flowertune", "protocol_version": "1", "shots": 0,
     "partial": false,                                  # true → --limit-per-subject / --sample
     "model": {"name": "…"},
     "adapter": {"path": "…", "sha256": "…"} | null,    # what was evaluated (null: base model)
     "data": {"split": "test"},
     "subjects": {subject: {"n": int, "correct": int, …}},
     "categories": {category: {"accuracy": float, …}},
     "predicted_letters": {"A": int, …, "none": int},
     "weighted_mean": float, "average_stderr": float, …}

The metrics may also sit under a `metrics` key. Anything it cannot find is reported, never guessed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.evaluation.subjects import SUBJECT_CATEGORY

RESULT_NAMES = ("results.json", "summary.json", "metrics.json")


class EvalResultsError(ValueError):
    """The run's evaluation results are missing, ambiguous or unreadable."""


@dataclass(frozen=True)
class EvalResults:
    """What a submission takes from one evaluation."""

    path: Path
    protocol: str
    protocol_version: str
    split: str
    complete: bool | None
    subjects: dict[str, dict[str, Any]]  # {"correct", "total"}; checked by validation
    answer_distribution: dict[str, int]
    extra: dict[str, float]
    adapter_path: str | None
    adapter_sha256: str | None
    base_model: str | None
    shots: int | None
    without_adapter: bool  # the document says no adapter was applied
    raw: dict[str, Any] = field(repr=False, default_factory=dict)


def find_results(run_dir: Path, name: str | None = None) -> Path:
    """The evaluation results file of a run: the one JSON under RUN_DIR/eval/ with per-subject
    results. With several, the board's protocol (flowertune, zero-shot) is taken if exactly one
    is; otherwise `name` must choose (a file or folder under eval/, or a path).

    Raises:
        EvalResultsError: none found, or several and no `name` to choose.
    """
    eval_dir = run_dir / "eval"
    if name and Path(name).is_file():
        return Path(name)
    if not eval_dir.is_dir():
        hint = f"fedtune eval --adapter {run_dir}"
        raise EvalResultsError(f"{eval_dir} does not exist: evaluate the run first ({hint})")
    if name:
        base = eval_dir / name
        if base.is_file():
            return base
        candidates = [base / n for n in RESULT_NAMES if (base / n).is_file()]
        if not candidates:
            raise EvalResultsError(f"no evaluation results at {base}")
        return candidates[0]
    found = [p for n in RESULT_NAMES for p in sorted(eval_dir.glob(f"*/{n}"))]
    found += [p for n in RESULT_NAMES if (p := eval_dir / n).is_file()]
    found += [p for p in sorted(eval_dir.glob("*.json")) if p not in found]
    found = [p for p in found if _looks_like_results(p)]
    if not found:
        raise EvalResultsError(f"no evaluation results under {eval_dir}")
    official = [p for p in found if _is_board_protocol(p)]
    if len(found) > 1 and len(official) == 1:
        return official[0]
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(eval_dir)) for p in found)
        raise EvalResultsError(
            f"several evaluations under {eval_dir} ({names}); choose one with --eval"
        )
    return found[0]


def _looks_like_results(path: Path) -> bool:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and isinstance(_metrics(doc).get("subjects"), dict)


def _is_board_protocol(path: Path) -> bool:
    doc = json.loads(path.read_text(encoding="utf-8"))
    return doc.get("protocol") == "flowertune" and doc.get("shots", 0) == 0


def _metrics(doc: dict[str, Any]) -> dict[str, Any]:
    for key in ("metrics", "results"):
        value = doc.get(key)
        if isinstance(value, dict) and "subjects" in value:
            return value
    return doc


def _first(doc: dict[str, Any], *paths: str) -> Any:
    """The first value found along dotted paths."""
    for path in paths:
        value: Any = doc
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            return value
    return None


def read_results(path: Path) -> EvalResults:
    """Parse an evaluation results file.

    Raises:
        EvalResultsError: unreadable, or without per-subject counts or a protocol name.
    """
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EvalResultsError(f"cannot read evaluation results {path}: {exc}") from exc
    if not isinstance(doc, dict):
        raise EvalResultsError(f"{path}: expected a JSON object")
    metrics = _metrics(doc)
    subjects: dict[str, dict[str, Any]] = {}
    for subject, cell in (metrics.get("subjects") or {}).items():
        if subject not in SUBJECT_CATEGORY or not isinstance(cell, dict):
            raise EvalResultsError(f"{path}: unexpected subject entry {subject!r}")
        total = cell.get("n", cell.get("total"))
        subjects[subject] = {"correct": cell.get("correct"), "total": total}
    if not subjects:
        raise EvalResultsError(f"{path}: no per-subject results")
    protocol = _first(doc, "protocol", "evaluation.protocol", "config.protocol")
    if not protocol:
        raise EvalResultsError(f"{path}: the evaluation protocol is not recorded")
    extra: dict[str, float] = {}
    other = _first(metrics, "categories.other.accuracy")
    if isinstance(other, int | float):
        extra["other"] = 100.0 * other
    for key in ("weighted_mean", "average_stderr"):
        if isinstance(metrics.get(key), int | float):
            extra[key] = 100.0 * metrics[key]
    letters = metrics.get("predicted_letters") or metrics.get("answer_distribution") or {}
    complete = _first(doc, "complete", "evaluation.complete")
    partial = doc.get("partial")
    if isinstance(partial, bool):
        complete = not partial
    adapter = doc.get("adapter")
    shots = doc.get("shots")
    return EvalResults(
        path=Path(path),
        protocol=str(protocol),
        protocol_version=str(
            _first(
                doc, "protocol_version", "evaluation.protocol_version", "config.protocol_version"
            )
            or ""
        ),
        split=str(_first(doc, "split", "data.split", "evaluation.split") or "test"),
        complete=complete if isinstance(complete, bool) else None,
        subjects=subjects,
        answer_distribution={str(k): v for k, v in letters.items()},
        extra=extra,
        adapter_path=_first(
            doc, "adapter.path", "adapter_path", "model.adapter", "model.adapter_path"
        ),
        adapter_sha256=_first(
            doc,
            "adapter.sha256",
            "adapter_sha256",
            "model.adapter_sha256",
            "adapter.adapter_sha256",
        ),
        base_model=_first(doc, "base_model", "model.base", "model.name", "model.base_model"),
        shots=shots if isinstance(shots, int) and not isinstance(shots, bool) else None,
        without_adapter="adapter" in doc and adapter is None,
        raw=doc,
    )

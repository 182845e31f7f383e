"""`fedtune eval` as a recipe: validate everything → load model (+ adapter) → run the protocol →
write results."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.evaluation.adapters import AdapterSource, apply_adapter, resolve_adapter
from fedtune.evaluation.api import PROTOCOL_VERSIONS, check_protocol, run_protocol
from fedtune.evaluation.batching import BatchPlan
from fedtune.evaluation.dataset import EMBEDDED, describe_source
from fedtune.evaluation.metrics import summarize
from fedtune.evaluation.progress import ProgressBar
from fedtune.evaluation.resultfile import build_result
from fedtune.evaluation.results import (
    RESULT_FORMAT,
    board_files,
    environment,
    prediction_rows,
    predictions_file_name,
    result_file_name,
    safe_run_name,
    write_atomically,
)
from fedtune.evaluation.sampling import Selection, select
from fedtune.evaluation.subjects import resolve_categories, resolve_subjects

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"


@dataclass
class EvalRequest:
    """Everything `fedtune eval` was asked to do (validated by `prepare`)."""

    model: str | None = None
    adapter: str | None = None
    protocol: str = "flowertune"
    categories: str | None = None
    subjects: str = ""
    shots: int = 0
    limit_per_subject: int | None = None
    sample: int | None = None
    seed: int = 2024
    source: str = EMBEDDED
    output_dir: str | None = None
    run_name: str | None = None
    dtype: str = "auto"
    max_batch: int | None = None
    pad_tolerance: int | None = None
    workers: int | None = None
    show_progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Prepared:
    """A request with every input checked, before any model is loaded."""

    request: EvalRequest
    model_name: str
    adapter: AdapterSource | None
    selection: Selection
    output_dir: Path
    run_name: str


def prepare(request: EvalRequest) -> Prepared:
    """Check every input that can be checked without loading a model.

    Raises:
        ValueError subclasses (SubjectError, DatasetError, ProtocolError, AdapterError, ModelError)
        with a message naming the bad option.
    """
    from fedtune.model.loading import resolve_model

    check_protocol(request.protocol, request.shots)
    categories = resolve_categories(request.categories)
    subjects = resolve_subjects(request.subjects) if request.subjects else ()
    adapter = resolve_adapter(request.adapter) if request.adapter else None
    model_name = (
        request.model
        or (adapter.run_model if adapter and adapter.run_model else None)
        or DEFAULT_MODEL
    )
    resolve_model(model_name)
    selection = select(
        categories,
        subjects,
        limit_per_subject=request.limit_per_subject,
        sample=request.sample,
        seed=request.seed,
        source=request.source,
    )
    if request.output_dir:
        output_dir = Path(request.output_dir)
    elif adapter and adapter.run_dir:
        output_dir = adapter.run_dir / "eval"
    else:
        output_dir = Path("eval")
    default_run = adapter.run_dir.name if adapter and adapter.run_dir else model_name.split("/")[-1]
    run_name = safe_run_name(request.run_name or default_run)
    return Prepared(request, model_name, adapter, selection, output_dir, run_name)


def load(prepared: Prepared) -> tuple[Any, Any]:
    """Load tokenizer, base model and adapter (via fedtune.model.loading).

    Raises:
        ModelError, AdapterError: the model or adapter cannot be loaded.
    """
    from fedtune.model.loading import load_model, load_tokenizer, resolve_model

    source = resolve_model(prepared.model_name)
    tokenizer = load_tokenizer(source)
    model = load_model(source, dtype=prepared.request.dtype)
    if prepared.adapter:
        model = apply_adapter(model, prepared.adapter)
    model.eval()
    return model, tokenizer


def _plan(request: EvalRequest, device: str) -> BatchPlan:
    plan = BatchPlan.for_device(device)
    return dataclasses.replace(
        plan,
        max_batch=request.max_batch or plan.max_batch,
        pad_tolerance=plan.pad_tolerance
        if request.pad_tolerance is None
        else request.pad_tolerance,
        **_workers(plan, request.workers),
    )


def _workers(plan: BatchPlan, workers: int | None) -> dict[str, int]:
    """`workers` side by side, sharing the threads the plan's workers had between them."""
    if workers is None:
        return {}
    total = plan.workers * max(plan.threads, 1)
    return {"workers": workers, "threads": max(1, total // workers)}


def evaluate(prepared: Prepared, model: Any, tokenizer: Any) -> tuple[dict[str, Any], list[Path]]:
    """Run the protocol and write the result files (all or none).

    The result JSON is an `EvalResultFile` (fedtune.evaluation.resultfile), checked before anything
    is written.

    Returns:
        The result dict (as written to JSON) and the paths written.
    """
    request, selection = prepared.request, prepared.selection
    questions = selection.questions
    device = str(next(model.parameters()).device)
    label = f"{request.protocol} {request.shots}-shot"
    bar = ProgressBar(len(questions), label) if request.show_progress else None
    started = time.perf_counter()
    verdicts, details = run_protocol(
        model,
        tokenizer,
        questions,
        protocol=request.protocol,
        shots=request.shots,
        source=request.source,
        plan=_plan(request, device),
        on_progress=bar,
    )
    seconds = time.perf_counter() - started
    if bar:
        bar.close()
    metrics = summarize(verdicts)
    partial = selection.partial
    result = {
        "format": RESULT_FORMAT,
        "benchmark": "mmlu",
        "protocol": request.protocol,
        "protocol_version": PROTOCOL_VERSIONS[request.protocol],
        "shots": request.shots,
        "partial": partial,
        "model": {
            "name": prepared.model_name,
            "dtype": str(next(model.parameters()).dtype),
            "device": device,
        },
        "adapter": prepared.adapter.to_json() if prepared.adapter else None,
        "data": {"source": describe_source(request.source), "split": "test"},
        "selection": {
            "categories": list(selection.categories),
            "subjects": list(selection.subjects),
            "limit_per_subject": selection.limit_per_subject,
            "sample": selection.sample,
            "seed": selection.seed,
            "n_questions": len(questions),
            "available": selection.available,
        },
        "run": prepared.run_name,
        **metrics,
        "timing": {
            "seconds": round(seconds, 2),
            "questions_per_s": round(len(questions) / seconds, 3),
        },
        "environment": environment(),
    }
    if "rechecked" in details:
        result["rechecked_one_at_a_time"] = details["rechecked"]
    files = {}
    if request.protocol == "flowertune":
        files.update(
            board_files(
                details["generations"],
                metrics["categories"],
                prepared.run_name,
                selection.available_per_category,
                selection.seed,
            )
        )
    else:
        files[predictions_file_name(request.protocol, request.shots, prepared.run_name)] = (
            prediction_rows(verdicts)
        )
    result["files"] = sorted(files)
    document = build_result(result)
    name = result_file_name(request.protocol, request.shots, prepared.run_name)
    files[name] = document.to_json_text()
    return document.model_dump(mode="json"), write_atomically(prepared.output_dir, files)


def format_summary(result: dict[str, Any]) -> str:
    """A short human-readable table of a result."""
    board = result["board"]
    lines = [
        f"MMLU {result['protocol']} {result['shots']}-shot, {result['n_questions']} questions"
        + (" (PARTIAL)" if result["partial"] else ""),
        f"  {'Average':<16}{_pct(board['average'])}",
    ]
    for category, cell in result["categories"].items():
        accuracy, error = 100 * cell["accuracy"], 100 * cell["stderr"]
        lines.append(f"  {category:<16}{accuracy:6.2f}  (n={cell['n']}, ±{error:.2f})")
    letters = " ".join(f"{k}:{v}" for k, v in result["predicted_letters"].items())
    always = " ".join(
        f"{k}={_pct(v['board']['average'])}" for k, v in result["constant_baselines"].items()
    )
    lines += [f"  predicted letters {letters}", f"  always-X Average {always}"]
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.2f}"

"""Reading a run's evaluation result (RUN_DIR/eval/…) into what a submission needs.

`fedtune eval --adapter RUN_DIR` writes one result file per evaluation,
`RUN_DIR/eval/mmlu_{protocol}_{shots}shot_{run}.json`, in the one typed format of
`fedtune.evaluation.resultfile` (`EvalResultFile`, `format: 1`). Only files with that name are
looked for, and each is parsed strictly against that model: an unknown or missing field, or a
value of the wrong type, is an error naming the file and the field; no other layout is read.

A submission takes from it: `protocol`, `protocol_version`, `shots`, `partial`, `model.name`,
`adapter` (`path`, `sha256`; null: the base model alone), `data.split`, the per-subject `n` and
`correct`, `predicted_letters`, the `other` category's accuracy, `weighted_mean` and
`average_stderr`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedtune.evaluation.resultfile import EvalResultFile, ResultFileError, parse_result
from fedtune.evaluation.results import RESULT_FILE_GLOB
from fedtune.leaderboard.submission import SubjectCount

BOARD_PROTOCOL = ("flowertune", 0)


class EvalResultsError(ValueError):
    """The run's evaluation results are missing, ambiguous or unreadable."""


@dataclass(frozen=True)
class EvalResults:
    """What a submission takes from one evaluation."""

    path: Path
    protocol: str
    protocol_version: str
    split: str
    complete: bool  # not flagged partial
    subjects: dict[str, SubjectCount]  # checked by validation
    answer_distribution: dict[str, int]
    extra: dict[str, float]
    adapter_path: str | None
    adapter_sha256: str | None
    base_model: str
    shots: int
    without_adapter: bool  # the result says no adapter was applied


def find_results(run_dir: Path, name: str | None = None) -> Path:
    """The evaluation result file of a run: the one `eval/mmlu_{protocol}_{shots}shot_{run}.json`.
    With several, the board's protocol (flowertune, zero-shot) is taken if exactly one is;
    otherwise `name` must choose (a file path, or a file name under eval/).

    Raises:
        EvalResultsError: none found, a result file that does not parse, or several and no `name`
            to choose.
    """
    eval_dir = run_dir / "eval"
    if name and Path(name).is_file():
        return Path(name)
    if not eval_dir.is_dir():
        hint = f"fedtune eval --adapter {run_dir}"
        raise EvalResultsError(f"{eval_dir} does not exist: evaluate the run first ({hint})")
    if name:
        chosen = eval_dir / name
        if not chosen.is_file():
            raise EvalResultsError(f"no evaluation result file {name} (nor {chosen})")
        return chosen
    found = [p for p in sorted(eval_dir.glob(RESULT_FILE_GLOB)) if p.is_file()]
    if not found:
        raise EvalResultsError(
            f"no evaluation results ({RESULT_FILE_GLOB}) under {eval_dir}: "
            f"evaluate the run first (fedtune eval --adapter {run_dir})"
        )
    if len(found) == 1:
        return found[0]
    parsed = {p: read_result_file(p) for p in found}
    official = [p for p, d in parsed.items() if (d.protocol, d.shots) == BOARD_PROTOCOL]
    if len(official) == 1:
        return official[0]
    names = ", ".join(p.name for p in found)
    raise EvalResultsError(
        f"several evaluations under {eval_dir} ({names}); choose one with --eval"
    )


def read_result_file(path: Path) -> EvalResultFile:
    """The typed result file at `path`.

    Raises:
        EvalResultsError: unreadable, or not a format-1 result file (the message names the field).
    """
    try:
        content = Path(path).read_bytes()
    except OSError as exc:
        raise EvalResultsError(f"cannot read evaluation results {path}: {exc}") from exc
    try:
        return parse_result(content, path)
    except ResultFileError as exc:
        raise EvalResultsError(str(exc)) from None


def read_results(path: Path) -> EvalResults:
    """Parse an evaluation result file (fedtune.evaluation.resultfile) for a submission.

    Raises:
        EvalResultsError: unreadable, not a format-1 result file (the message names the field), or
            without per-subject results.
    """
    document = read_result_file(path)
    if not document.subjects:
        raise EvalResultsError(f"{path}: no per-subject results")
    extra: dict[str, float] = {}
    other = document.categories.get("other")
    if other is not None:
        extra["other"] = 100.0 * other.accuracy
    if document.weighted_mean is not None:
        extra["weighted_mean"] = 100.0 * document.weighted_mean
    if document.average_stderr is not None:
        extra["average_stderr"] = 100.0 * document.average_stderr
    adapter = document.adapter
    return EvalResults(
        path=Path(path),
        protocol=document.protocol,
        protocol_version=document.protocol_version,
        split=document.data.split,
        complete=not document.partial,
        subjects={
            s: SubjectCount(correct=c.correct, total=c.n) for s, c in document.subjects.items()
        },
        answer_distribution={str(k): v for k, v in document.predicted_letters.items()},
        extra=extra,
        adapter_path=adapter.path if adapter else None,
        adapter_sha256=adapter.sha256 if adapter else None,
        base_model=document.model.name,
        shots=document.shots,
        without_adapter=adapter is None,
    )

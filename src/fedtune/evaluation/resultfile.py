"""The evaluation result file, `mmlu_{protocol}_{shots}shot_{run}.json`: one typed format (`format: 1`),
written by `fedtune eval` and read back by `fedtune leaderboard submit`.

`EvalResultFile` is the whole document; `fedtune eval` builds it and serializes it
(`to_json_text`), and every reader parses it with `parse_result`, which refuses anything else:

    {"format": 1, "benchmark": "mmlu",
     "protocol": "flowertune" | "loglik", "protocol_version": "1", "shots": 0,
     "partial": false,                                   # true: a subsample was evaluated
     "model": {"name", "dtype", "device"},
     "adapter": {"path", "run_dir" | null, "sha256"} | null,   # null: the base model alone
     "data": {"source", "split"},
     "selection": {"categories", "subjects", "limit_per_subject", "sample", "seed",
                   "n_questions", "available"},
     "run": "…",
     "n_questions": int, "average": float | null, "average_stderr": float | null,
     "weighted_mean": float | null,
     "board": {"average", "stem", "social_sciences", "humanities"},   # percent, 2 decimals
     "categories": {category: {"n", "correct", "accuracy", "stderr", "subjects"}},
     "subjects": {subject: {"category", "n", "correct", "accuracy", "stderr"}},
     "predicted_letters": {"A", "B", "C", "D", "none"}, "gold_letters": {"A", "B", "C", "D"},
     "constant_baselines": {letter: {"average", "board", "categories"}},
     "timing": {"seconds", "questions_per_s"},
     "environment": {…},                                 # free-form: commit, versions, machine
     "rechecked_one_at_a_time": int,                     # flowertune only; absent otherwise
     "files": ["acc_mmlu_…", "generation_mmlu_…"]}        # the files beside it: the board's
                                                         # (flowertune) or predictions_… (loglik)

Accuracies are fractions (0–1; see `fedtune.evaluation.metrics`); counts are non-negative integers.
Parsing is strict: an unknown or missing key, a value of the wrong type (no string for a number, no
1.5 or true for a count), an unknown subject, category or letter, or another `format` is an error
naming the file and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
)

from fedtune.evaluation.api import PROTOCOL_VERSIONS
from fedtune.evaluation.results import RESULT_FORMAT
from fedtune.evaluation.subjects import ALL_CATEGORIES, SUBJECT_CATEGORY

Count = Annotated[int, Field(ge=0)]
Letter = Literal["A", "B", "C", "D"]
PredictedLetter = Literal["A", "B", "C", "D", "none"]


class ResultFileError(ValueError):
    """A result file that is not a format-1 evaluation result."""


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class ModelInfo(_Strict):
    """The base model evaluated."""

    name: str
    dtype: str
    device: str


class AdapterInfo(_Strict):
    """The adapter applied to the base model."""

    path: str
    run_dir: str | None
    sha256: str


class DataInfo(_Strict):
    """Where the questions came from."""

    source: str
    split: str


class SelectionInfo(_Strict):
    """Which questions were evaluated (see `fedtune.evaluation.sampling.Selection`)."""

    categories: list[str]
    subjects: list[str]
    limit_per_subject: Count | None
    sample: Count | None
    seed: int
    n_questions: Count
    available: Count


class BoardRow(_Strict):
    """The leaderboard's columns in percent with two decimals (null: not evaluated)."""

    average: float | None
    stem: float | None
    social_sciences: float | None
    humanities: float | None


class CategoryCell(_Strict):
    """One category's counts and accuracy."""

    n: Count
    correct: Count
    accuracy: float
    stderr: float
    subjects: Count


class SubjectCell(_Strict):
    """One subject's counts and accuracy."""

    category: str
    n: Count
    correct: Count
    accuracy: float
    stderr: float


class ConstantBaseline(_Strict):
    """What answering one letter every time scores on the same questions."""

    average: float | None
    board: BoardRow
    categories: dict[str, float]


class Timing(_Strict):
    """How long the protocol ran."""

    seconds: float
    questions_per_s: float


class EvalResultFile(_Strict):
    """One evaluation, as `fedtune eval` writes it (format 1)."""

    format: int
    benchmark: Literal["mmlu"]
    protocol: str
    protocol_version: str
    shots: Count
    partial: bool
    model: ModelInfo
    adapter: AdapterInfo | None
    data: DataInfo
    selection: SelectionInfo
    run: str
    n_questions: Count
    average: float | None
    average_stderr: float | None
    weighted_mean: float | None
    board: BoardRow
    categories: dict[str, CategoryCell]
    subjects: dict[str, SubjectCell]
    predicted_letters: dict[PredictedLetter, Count]
    gold_letters: dict[Letter, Count]
    constant_baselines: dict[Letter, ConstantBaseline]
    timing: Timing
    environment: dict[str, Any]
    rechecked_one_at_a_time: Count | None = None
    files: list[str]

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: int) -> int:
        if value != RESULT_FORMAT:
            raise ValueError(f"format {value} is not {RESULT_FORMAT}, the one this version reads")
        return value

    @field_validator("protocol")
    @classmethod
    def _known_protocol(cls, value: str) -> str:
        if value not in PROTOCOL_VERSIONS:
            raise ValueError(f"unknown protocol {value!r} ({', '.join(PROTOCOL_VERSIONS)})")
        return value

    @field_validator("categories")
    @classmethod
    def _known_categories(cls, value: dict[str, CategoryCell]) -> dict[str, CategoryCell]:
        for category in value:
            if category not in ALL_CATEGORIES:
                raise ValueError(f"unknown category {category!r}")
        return value

    @field_validator("subjects")
    @classmethod
    def _known_subjects(cls, value: dict[str, SubjectCell]) -> dict[str, SubjectCell]:
        for subject, cell in value.items():
            if subject not in SUBJECT_CATEGORY:
                raise ValueError(f"unknown MMLU subject {subject!r}")
            if cell.category != SUBJECT_CATEGORY[subject]:
                raise ValueError(
                    f"{subject} is in {SUBJECT_CATEGORY[subject]}, not {cell.category!r}"
                )
            if cell.correct > cell.n:
                raise ValueError(f"{subject}: {cell.correct} correct of {cell.n}")
        return value

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # `rechecked_one_at_a_time` exists only where the protocol re-checks (flowertune).
        data: dict[str, Any] = handler(self)
        if data.get("rechecked_one_at_a_time") is None:
            data.pop("rechecked_one_at_a_time", None)
        return data

    def to_json_text(self) -> str:
        """The file's content: indented JSON in the fields' order, ending in a newline."""
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


def _describe(error: ValidationError) -> str:
    first = error.errors(include_url=False)[0]
    location = ".".join(str(part) for part in first["loc"] if part != "[key]")
    more = error.error_count() - 1
    text = first["msg"].removeprefix("Value error, ")
    message = f"{location}: {text}" if location else text
    return message + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


def parse_result(text: str | bytes, where: str | Path) -> EvalResultFile:
    """Parse a result file's content strictly.

    Args:
        text: the file's content.
        where: the file, named in errors.

    Raises:
        ResultFileError: not JSON, or not a format-1 result; the message names the file and the
            first problem (the field and what is wrong with it).
    """
    try:
        return EvalResultFile.model_validate_json(text)
    except ValidationError as exc:
        raise ResultFileError(f"{where}: not an evaluation result file: {_describe(exc)}") from None


def build_result(document: dict[str, Any]) -> EvalResultFile:
    """The typed result of a document assembled in Python (what `fedtune eval` writes).

    Raises:
        ResultFileError: the document does not fit the format.
    """
    try:
        return EvalResultFile.model_validate(document)
    except ValidationError as exc:
        raise ResultFileError(
            f"evaluation result does not fit the format: {_describe(exc)}"
        ) from None

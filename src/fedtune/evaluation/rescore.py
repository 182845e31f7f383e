"""Re-score saved generations in the board's published format with the official parser.

A generation file is a JSON array of `{"prompt", "gold", "subset", "output"}` objects (the official
evaluator writes it with pandas `to_json(orient="records")`, so the `.jsonl` name notwithstanding it
is one array); JSON Lines and gzip (`.gz`) are accepted too. The accuracy is correct / rows, which
equals the float the official scorer prints (sklearn's `accuracy_score` averages the same 0/1
values: k / n, correctly rounded).
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.evaluation.parser import is_correct, predicted_letter
from fedtune.evaluation.subjects import SUBJECT_CATEGORY

REQUIRED_FIELDS = ("prompt", "gold", "subset", "output")


class GenerationFileError(ValueError):
    """A file that is not a generation file in the board's format."""


@dataclass(frozen=True)
class RescoredFile:
    """The official accuracy of one generation file, and what it is made of.

    Attributes:
        path: the file.
        category: the board category of its subjects (None when they span several).
        rows: number of generations.
        correct: number the official parser counts as right.
        accuracy: correct / rows, exactly the official scorer's number.
        subjects: per-subject (rows, correct).
        predicted_letters: how often the parser read each of A–D, or none.
    """

    path: str
    category: str | None
    rows: int
    correct: int
    accuracy: float
    subjects: dict[str, tuple[int, int]]
    predicted_letters: dict[str, int]

    def official_line(self) -> str:
        """The text the official scorer writes to `acc_mmlu_{category}_{run}.txt`."""
        return f"Accuracy: {self.accuracy}. "

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "path": self.path,
            "category": self.category,
            "rows": self.rows,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "official_line": self.official_line(),
            "subjects": {s: {"n": n, "correct": c} for s, (n, c) in self.subjects.items()},
            "predicted_letters": self.predicted_letters,
        }


def read_generations(path: Path) -> list[dict[str, str]]:
    """Read a generation file (JSON array or JSON Lines, optionally gzipped) and check every row.

    Raises:
        GenerationFileError: unreadable, not JSON, empty, or a row without the four string fields.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the name says
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise GenerationFileError(f"{path}: cannot read ({exc})") from exc
    try:
        stripped = text.lstrip()
        if stripped.startswith("["):
            rows = json.loads(stripped)
        else:
            rows = [json.loads(line) for line in text.split("\n") if line.strip()]
    except json.JSONDecodeError as exc:
        raise GenerationFileError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(rows, list) or not rows:
        raise GenerationFileError(f"{path}: expected a non-empty JSON array of generations")
    for number, row in enumerate(rows):
        if not isinstance(row, dict) or not all(
            isinstance(row.get(f), str) for f in REQUIRED_FIELDS
        ):
            raise GenerationFileError(
                f"{path}: row {number} is not an object with string fields "
                + ", ".join(REQUIRED_FIELDS)
            )
        if row["subset"] not in SUBJECT_CATEGORY:
            raise GenerationFileError(
                f"{path}: row {number} has unknown MMLU subject {row['subset']!r}"
            )
    return rows


def rescore_rows(rows: list[dict[str, str]], path: str = "") -> RescoredFile:
    """Score generation rows with the official parser (see `read_generations` for the format)."""
    subjects: dict[str, list[int]] = {}
    letters: Counter[str] = Counter()
    correct = 0
    for row in rows:
        ok = is_correct(row["output"], row["gold"])
        correct += ok
        cell = subjects.setdefault(row["subset"], [0, 0])
        cell[0] += 1
        cell[1] += ok
        letters[predicted_letter(row["output"]) or "none"] += 1
    categories = {SUBJECT_CATEGORY[s] for s in subjects}
    return RescoredFile(
        path=path,
        category=categories.pop() if len(categories) == 1 else None,
        rows=len(rows),
        correct=correct,
        accuracy=correct / len(rows),
        subjects={s: (n, c) for s, (n, c) in subjects.items()},
        predicted_letters={k: letters[k] for k in ("A", "B", "C", "D", "none")},
    )


def rescore_file(path: Path) -> RescoredFile:
    """Read and score one generation file.

    Raises:
        GenerationFileError: the file is not in the board's format.
    """
    return rescore_rows(read_generations(path), str(path))

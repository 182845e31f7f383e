"""Re-score saved generations in the board's published format with the official parser.

A generation file is a JSON array of `{"prompt", "gold", "subset", "output"}` objects (the official
evaluator writes it with pandas `to_json(orient="records")`, so the `.jsonl` name notwithstanding it
is one array); JSON Lines and gzip (`.gz`) are accepted too. The accuracy is correct / rows, which
equals the float the official scorer prints (sklearn's `accuracy_score` averages the same 0/1
values: k / n, correctly rounded).
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.evaluation.dataset import Question
from fedtune.evaluation.parser import is_correct, predicted_letter
from fedtune.evaluation.prompts import flowertune_inner_prompt
from fedtune.evaluation.subjects import SUBJECT_CATEGORY
from fedtune.units import MIB

REQUIRED_FIELDS = ("prompt", "gold", "subset", "output")
# A category's file of the official evaluation is ~1–5 MB; outputs of a verbose model add more.
MAX_FILE_BYTES = 64 * MIB
# A predictions file of the whole test split (14,042 lines of at most ~95 bytes) is ~1.1 MB; 8 MiB
# leaves room for any spacing of the same rows, while a gzip bomb stops expanding at 8 MiB (reading
# 64 MiB of lines took ~3 s).
MAX_PREDICTIONS_BYTES = 8 * MIB


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
    except OSError as exc:
        raise GenerationFileError(f"{path}: cannot read ({exc})") from exc
    return parse_generations(raw, str(path))


def decompress(raw: bytes, where: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """`raw` itself, or its gzip content when it starts with gzip's magic, refusing more than
    `max_bytes` of content (a small upload must not expand into gigabytes).

    Raises:
        GenerationFileError: corrupt gzip, or content over the limit.
    """
    if raw[:2] != b"\x1f\x8b":
        if len(raw) > max_bytes:
            raise GenerationFileError(f"{where}: over {max_bytes:,} bytes")
        return raw
    inflater = zlib.decompressobj(wbits=31)
    try:
        content = inflater.decompress(raw, max_bytes + 1)
    except zlib.error as exc:
        raise GenerationFileError(f"{where}: not valid gzip ({exc})") from exc
    if len(content) > max_bytes:
        raise GenerationFileError(f"{where}: expands to over {max_bytes:,} bytes")
    if not inflater.eof:
        raise GenerationFileError(f"{where}: truncated gzip")
    if inflater.unused_data:
        raise GenerationFileError(f"{where}: data after the end of the gzip stream")
    return content


def parse_generations(raw: bytes, where: str = "") -> list[dict[str, str]]:
    """Rows of a generation file's bytes (see `read_generations`); `where` names it in errors."""
    try:
        text = decompress(raw, where).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GenerationFileError(f"{where}: not UTF-8 ({exc.reason})") from exc
    try:
        stripped = text.lstrip()
        if stripped.startswith("["):
            rows = json.loads(stripped)
        else:
            rows = [json.loads(line) for line in text.split("\n") if line.strip()]
    except (json.JSONDecodeError, RecursionError) as exc:
        detail = f"{exc.msg} at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise GenerationFileError(f"{where}: not JSON ({detail or 'nested too deeply'})") from exc
    if not isinstance(rows, list) or not rows:
        raise GenerationFileError(f"{where}: expected a non-empty JSON array of generations")
    for number, row in enumerate(rows):
        if not isinstance(row, dict) or not all(
            isinstance(row.get(f), str) for f in REQUIRED_FIELDS
        ):
            raise GenerationFileError(
                f"{where}: row {number} is not an object with string fields "
                + ", ".join(REQUIRED_FIELDS)
            )
        if row["subset"] not in SUBJECT_CATEGORY:
            raise GenerationFileError(
                f"{where}: row {number} has unknown MMLU subject {row['subset']!r}"
            )
    return rows


QuestionSet = Counter[tuple[str, str, str]]


def question_set(category: str, questions: Sequence[Question]) -> QuestionSet:
    """(subject, the board's prompt, gold letter) → how often it occurs among the questions of
    `category` — what a complete generation file of that category answers."""
    return Counter(
        (q.subject, flowertune_inner_prompt(q), q.answer)
        for q in questions
        if q.category == category
    )


def check_question_set(
    rows: Sequence[Mapping[str, str]], category: str, expected: QuestionSet, where: str = ""
) -> None:
    """Check that `rows` answer exactly the questions of `expected` (`question_set` of the MMLU
    test split), each once, with the board's prompt and the split's gold letter.

    Raises:
        GenerationFileError: a row of another category, a prompt that is not one of the split's,
            a wrong gold letter, a question answered twice, or questions left out.
    """
    golds = {(subject, prompt): gold for subject, prompt, gold in expected}
    seen: QuestionSet = Counter()
    for number, row in enumerate(rows):
        subject, prompt, gold = row["subset"], row["prompt"], row["gold"]
        if SUBJECT_CATEGORY[subject] != category:
            raise GenerationFileError(
                f"{where}: row {number} is {subject}, a {SUBJECT_CATEGORY[subject]} subject, "
                f"not {category}"
            )
        if (subject, prompt) not in golds:
            raise GenerationFileError(
                f"{where}: row {number} ({subject}) has a prompt that is not one of the test "
                "split's questions in the board's prompt format"
            )
        if golds[(subject, prompt)] != gold:
            raise GenerationFileError(
                f"{where}: row {number} ({subject}) gives gold {gold!r}; the test split says "
                f"{golds[(subject, prompt)]!r}"
            )
        key = (subject, prompt, gold)
        seen[key] += 1
        if seen[key] > expected[key]:
            raise GenerationFileError(f"{where}: row {number} ({subject}) answers a question twice")
    missing = sum(expected.values()) - sum(seen.values())
    if missing:
        raise GenerationFileError(
            f"partial evaluation: {where}: {missing:,} of the {category} test questions are not "
            "answered "
            f"({len(rows):,} rows, the split has {sum(expected.values()):,})"
        )


def rescore_rows(rows: Sequence[Mapping[str, str]], path: str = "") -> RescoredFile:
    """Score generation rows with the official parser (see `read_generations` for the format)."""
    return _tally(
        (
            (row["subset"], is_correct(row["output"], row["gold"]),
             predicted_letter(row["output"]) or "none")
            for row in rows
        ),
        path,
    )  # fmt: skip


def _tally(verdicts: Iterable[tuple[str, bool, str]], path: str) -> RescoredFile:
    """(subject, right?, letter read or "none") per row → the counts of a `RescoredFile`."""
    subjects: dict[str, list[int]] = {}
    letters: Counter[str] = Counter()
    for subject, ok, letter in verdicts:
        cell = subjects.setdefault(subject, [0, 0])
        cell[0] += 1
        cell[1] += ok
        letters[letter] += 1
    rows = sum(n for n, _ in subjects.values())
    correct = sum(c for _, c in subjects.values())
    categories = {SUBJECT_CATEGORY[s] for s in subjects}
    return RescoredFile(
        path=path,
        category=categories.pop() if len(categories) == 1 else None,
        rows=rows,
        correct=correct,
        accuracy=correct / rows,
        subjects={s: (n, c) for s, (n, c) in subjects.items()},
        predicted_letters={k: letters[k] for k in ("A", "B", "C", "D", "none")},
    )


def rescore_file(path: Path) -> RescoredFile:
    """Read and score one generation file.

    Raises:
        GenerationFileError: the file is not in the board's format.
    """
    return rescore_rows(read_generations(path), str(path))


# --- per-question predictions (the loglik protocol's outputs) ----------------------------------

PREDICTION_FIELDS = ("subset", "index", "gold", "predicted")
PREDICTED_VALUES = frozenset({"A", "B", "C", "D", "none"})


def parse_predictions(
    raw: bytes, where: str = "", max_bytes: int = MAX_PREDICTIONS_BYTES
) -> list[dict[str, Any]]:
    """Rows of a predictions file (JSON Lines of `{"subset", "index", "gold", "predicted"}`, gzip
    or not, at most `max_bytes` of content), each checked for its fields and their types.

    Raises:
        GenerationFileError: over the size limit, not UTF-8 JSON Lines, empty, or a malformed row.
    """
    try:
        text = decompress(raw, where, max_bytes).decode("utf-8")
        rows = [json.loads(line) for line in text.split("\n") if line.strip()]
    except UnicodeDecodeError as exc:
        raise GenerationFileError(f"{where}: not UTF-8 ({exc.reason})") from exc
    except (json.JSONDecodeError, RecursionError) as exc:
        raise GenerationFileError(f"{where}: not JSON Lines") from exc
    if not rows:
        raise GenerationFileError(f"{where}: no predictions")
    for number, row in enumerate(rows):
        ok = (
            isinstance(row, dict)
            and set(row) == set(PREDICTION_FIELDS)
            and isinstance(row["subset"], str)
            and row["subset"] in SUBJECT_CATEGORY
            and isinstance(row["index"], int)
            and not isinstance(row["index"], bool)
            and row["gold"] in ("A", "B", "C", "D")
            and row["predicted"] in PREDICTED_VALUES
        )
        if not ok:
            raise GenerationFileError(
                f"{where}: row {number} is not {{subset: an MMLU subject, index: int, "
                "gold: A–D, predicted: A–D or none}"
            )
    return rows


def check_prediction_set(
    rows: Sequence[Mapping[str, Any]],
    category: str,
    golds: Mapping[tuple[str, int], str],
    where: str = "",
) -> None:
    """Check that `rows` answer exactly the questions in `golds` (subject, row in the test split →
    gold letter, one category's), each once, with the split's gold letters.

    Raises:
        GenerationFileError: a question of another category or not in the split, a wrong gold
            letter, a question answered twice, or questions left out.
    """
    seen: set[tuple[str, int]] = set()
    for number, row in enumerate(rows):
        key = (row["subset"], row["index"])
        if SUBJECT_CATEGORY[key[0]] != category:
            raise GenerationFileError(f"{where}: row {number} is not a {category} question")
        if key not in golds:
            raise GenerationFileError(
                f"{where}: row {number} ({key[0]} #{key[1]}) is not a test-split question"
            )
        if golds[key] != row["gold"]:
            raise GenerationFileError(
                f"{where}: row {number} ({key[0]} #{key[1]}) gives gold {row['gold']!r}; the test "
                f"split says {golds[key]!r}"
            )
        if key in seen:
            raise GenerationFileError(f"{where}: row {number} answers a question twice")
        seen.add(key)
    missing = len(golds) - len(seen)
    if missing:
        raise GenerationFileError(
            f"partial evaluation: {where}: {missing:,} of the {category} test questions are not "
            f"answered ({len(rows):,} rows, the split has {len(golds):,})"
        )


def rescore_predictions(rows: Sequence[Mapping[str, Any]], path: str = "") -> RescoredFile:
    """Count predictions that equal the gold letter, per subject and in all."""
    return _tally(((r["subset"], r["predicted"] == r["gold"], r["predicted"]) for r in rows), path)

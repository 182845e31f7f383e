"""MMLU questions from three sources: the embedded copy (default), a local CSV directory, or the
hub.

- `embedded`: the test and dev splits shipped in `fedtune/resources/mmlu/mmlu.jsonl.xz` (1.5 MB), so
  evaluation works offline. Built from the original CSVs by `write_embedded_copy`.
- a local directory in the original layout: `{dir}/{split}/{subject}_{split}.csv`, no header, rows
  `question,A,B,C,D,answer`.
- `hub` or `hub:<name>`: `datasets.load_dataset(<name>, "all")` with cais/mmlu's columns
  (`question`, `subject`, `choices`, `answer` as an index 0–3); the default name is `cais/mmlu`.

Every load of a complete test split is checked against the known counts (14,042 questions; 3,153 /
3,077 / 4,705 in the scored categories) and every dev split against 5 questions per subject.
"""

from __future__ import annotations

import csv
import functools
import json
import lzma
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fedtune.evaluation.subjects import (
    ALL_SUBJECTS,
    DEV_SHOTS_PER_SUBJECT,
    EXPECTED_TEST_QUESTIONS,
    EXPECTED_TEST_TOTAL,
    SUBJECT_CATEGORY,
    category_of,
)

LETTERS = ("A", "B", "C", "D")
SPLITS = ("test", "dev")
EMBEDDED = "embedded"
DEFAULT_HUB_DATASET = "cais/mmlu"
_EMBEDDED_RESOURCE = "mmlu.jsonl.xz"


class DatasetError(ValueError):
    """An MMLU source that cannot be read, or whose contents are not MMLU as expected."""


@dataclass(frozen=True)
class Question:
    """One MMLU question.

    Attributes:
        subject: one of the 57 subjects, e.g. "abstract_algebra".
        index: the row number inside the subject's split file (0-based); with `subject` it
            identifies the question.
        question: the question text as in the source.
        choices: the four option texts, A to D.
        answer: the gold letter, "A" to "D".
    """

    subject: str
    index: int
    question: str
    choices: tuple[str, str, str, str]
    answer: str

    @property
    def category(self) -> str:
        """The board category (stem, social_sciences, humanities, other)."""
        return SUBJECT_CATEGORY[self.subject]

    @property
    def key(self) -> str:
        """A stable identifier, `subject/index`."""
        return f"{self.subject}/{self.index}"


def _make_question(subject: str, index: int, fields: Sequence[str], where: str) -> Question:
    if len(fields) != 6:
        raise DatasetError(
            f"{where}: expected 6 fields (question, A, B, C, D, answer), got {len(fields)}"
        )
    answer = fields[5].strip()
    if answer not in LETTERS:
        raise DatasetError(f"{where}: answer {answer!r} is not one of A, B, C, D")
    question, a, b, c, d = fields[:5]
    return Question(subject, index, question, (a, b, c, d), answer)


def _order(questions: Iterable[Question]) -> tuple[Question, ...]:
    # Category then the official subject order, then row order: the official evaluator's order.
    rank = {subject: position for position, subject in enumerate(ALL_SUBJECTS)}
    return tuple(sorted(questions, key=lambda q: (rank[q.subject], q.index)))


def check_counts(questions: Sequence[Question], split: str) -> None:
    """Check a complete split against the known MMLU counts.

    Args:
        questions: every question of the split.
        split: "test" or "dev".

    Raises:
        DatasetError: a subject is missing or a count differs.
    """
    by_subject = Counter(q.subject for q in questions)
    missing = sorted(set(ALL_SUBJECTS) - set(by_subject))
    if missing:
        raise DatasetError(
            f"MMLU {split} split: {len(missing)} subjects missing, e.g. {missing[0]}"
        )
    if split == "dev":
        wrong = {s: n for s, n in by_subject.items() if n != DEV_SHOTS_PER_SUBJECT}
        if wrong:
            raise DatasetError(f"MMLU dev split: expected 5 questions per subject, got {wrong}")
        return
    by_category = Counter(q.category for q in questions)
    if len(questions) != EXPECTED_TEST_TOTAL or dict(by_category) != EXPECTED_TEST_QUESTIONS:
        raise DatasetError(
            f"MMLU test split: {len(questions)} questions {dict(by_category)}, expected "
            f"{EXPECTED_TEST_TOTAL} {EXPECTED_TEST_QUESTIONS}"
        )


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def read_csv_dir(root: Path, split: str) -> tuple[Question, ...]:
    """Read one split from a directory in the original MMLU CSV layout.

    Raises:
        DatasetError: the directory or a file is missing or malformed.
    """
    folder = Path(root) / split
    if not folder.is_dir():
        raise DatasetError(
            f"MMLU source {root}: no {split}/ folder (expected {split}/<subject>_{split}.csv)"
        )
    questions: list[Question] = []
    for path in sorted(folder.glob(f"*_{split}.csv")):
        subject = path.name[: -len(f"_{split}.csv")]
        category_of(subject)  # an unknown file name is an error, not a silently extra subject
        with open(path, newline="", encoding="utf-8") as handle:
            for index, row in enumerate(csv.reader(handle)):
                questions.append(_make_question(subject, index, row, f"{path}:{index + 1}"))
    return _order(questions)


@functools.lru_cache(maxsize=1)
def _embedded_rows() -> tuple[dict[str, Any], ...]:
    blob = (resources.files("fedtune") / "resources" / "mmlu" / _EMBEDDED_RESOURCE).read_bytes()
    return tuple(
        json.loads(line) for line in lzma.decompress(blob).decode("utf-8").split("\n") if line
    )


def read_embedded(split: str) -> tuple[Question, ...]:
    """Read one split of the embedded copy (package data)."""
    counters: Counter[str] = Counter()
    questions = []
    for row in _embedded_rows():
        if row["split"] != split:
            continue
        subject = row["subject"]
        fields = [row["question"], *row["choices"], row["answer"]]
        questions.append(_make_question(subject, counters[subject], fields, f"embedded {subject}"))
        counters[subject] += 1
    return _order(questions)


def questions_from_hub_rows(rows: Iterable[dict[str, Any]], split: str) -> tuple[Question, ...]:
    """Convert rows with cais/mmlu's columns (`question`, `subject`, `choices`, `answer` index) to
    questions.

    Raises:
        DatasetError: a row lacks a column, has other than 4 choices or an answer outside 0–3.
    """
    counters: Counter[str] = Counter()
    questions = []
    for number, row in enumerate(rows):
        try:
            subject, choices, answer = row["subject"], list(row["choices"]), int(row["answer"])
            text = row["question"]
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(
                f"hub MMLU {split} row {number}: not in cais/mmlu's format ({exc})"
            ) from exc
        if len(choices) != 4 or not 0 <= answer < 4:
            raise DatasetError(
                f"hub MMLU {split} row {number}: needs 4 choices and an answer index 0–3"
            )
        fields = [text, *choices, LETTERS[answer]]
        questions.append(_make_question(subject, counters[subject], fields, f"hub {subject}"))
        counters[subject] += 1
    return _order(questions)


def read_hub(name: str, split: str) -> tuple[Question, ...]:
    """Load one split through `datasets` (a hub id, or a local folder laid out like the hub
    dataset).

    Raises:
        DatasetError: `datasets` cannot load it (offline, unknown name).
    """
    from datasets import load_dataset

    try:
        rows = load_dataset(name, "all", split=split)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        raise DatasetError(f"cannot load MMLU {split} split from {name!r}: {exc}") from exc
    return questions_from_hub_rows(rows, split)


def describe_source(source: str) -> str:
    """A canonical description of a source for result files: `embedded`, `hub:<name>` or an absolute
    path."""
    if source == EMBEDDED:
        return EMBEDDED
    if source == "hub" or source.startswith("hub:"):
        return f"hub:{source[4:] or DEFAULT_HUB_DATASET}"
    return str(Path(source).expanduser().resolve())


@functools.lru_cache(maxsize=8)
def load_split(source: str = EMBEDDED, split: str = "test") -> tuple[Question, ...]:
    """All questions of one split, checked against the known counts.

    Args:
        source: "embedded", "hub", "hub:<name>", or a directory in the original CSV layout.
        split: "test" or "dev".

    Returns:
        The questions in the official order (category, subject, row).

    Raises:
        DatasetError: an unknown split, an unreadable source, or counts that differ from MMLU's.
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown MMLU split {split!r}; choose from {', '.join(SPLITS)}")
    described = describe_source(source)
    if described == EMBEDDED:
        questions = read_embedded(split)
    elif described.startswith("hub:"):
        questions = read_hub(described[4:], split)
    else:
        if not Path(described).is_dir():
            raise DatasetError(
                f"MMLU source {source!r}: not 'embedded', 'hub[:name]' or a directory"
            )
        questions = read_csv_dir(Path(described), split)
    check_counts(questions, split)
    return questions


def dev_examples(source: str = EMBEDDED) -> dict[str, tuple[Question, ...]]:
    """The five dev-split questions per subject (few-shot examples), in file order."""
    examples: dict[str, list[Question]] = {subject: [] for subject in ALL_SUBJECTS}
    for question in load_split(source, "dev"):
        examples[question.subject].append(question)
    return {subject: tuple(rows) for subject, rows in examples.items()}


def write_embedded_copy(csv_root: Path, target: Path) -> int:
    """Build the embedded resource from a directory in the original CSV layout (test and dev
    splits).

    One JSON object per line, `{"split", "subject", "question", "choices", "answer"}`,
    xz-compressed.

    Returns:
        The number of questions written.

    Raises:
        DatasetError: the CSV directory is incomplete or malformed.
    """
    lines = []
    for split in SPLITS:
        questions = read_csv_dir(Path(csv_root), split)
        check_counts(questions, split)
        for q in sorted(questions, key=lambda q: (q.subject, q.index)):
            record = {
                "split": split,
                "subject": q.subject,
                "question": q.question,
                "choices": list(q.choices),
                "answer": q.answer,
            }
            lines.append(json.dumps(record, ensure_ascii=False))
    payload = ("\n".join(lines) + "\n").encode("utf-8")
    target.write_bytes(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME))
    return len(lines)

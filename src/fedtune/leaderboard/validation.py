"""Checking a submission (the JSON the API and `submit` exchange) and turning it into an entry.

A submission is refused, with the field and the reason, when it is malformed (missing or unknown
fields, wrong types, out-of-range numbers, integers beyond a float's range, over-long text, control
characters, characters that show as nothing: `fedtune.leaderboard.invisible`), when it does not
add up (category scores that disagree with the per-subject counts, an Average that is not the mean
of the three categories, per-round bytes that do not sum to the total), when the evaluation is
partial (a scored subject missing, or a category with fewer questions than the test split), or when
it breaks the rules of its track. Text that merely looks like HTML is accepted, and escaped
wherever it is shown.

The shape (the types in `fedtune.leaderboard.submission`, from which every allowed key is taken;
every key below the top level is optional unless stated):

    {"team": str, "code_url": "https://…", "base_model": str, "track": "general-nlp" | "open",
     "date": "YYYY-MM-DD",
     "scores": {"stem": %, "social_sciences": %, "humanities": %, "average": %},   # required
     "communication": {"total_bytes": int, "downlink_bytes": int, "uplink_bytes": int},
     "evaluation": {"protocol": str, "protocol_version": str, "split": "test",
                    "subjects": {subject: {"correct": int, "total": int}},        # required
                    "answer_distribution": {letter: int}, "extra": {name: number}},
     "adapter": {"location": str, "sha256": hex64, "config": {PEFT adapter_config.json}},
     "setup": {"dataset": str, "num_clients": int, "rounds": int, "clients_per_round": int,
               "strategy": str, "adapter": str, "codec_downlink": str, "codec_uplink": str},
     "provenance": {...}, "config": {key: scalar},
     "rounds": [{"round": int, "train_loss": float | null, "downlink_bytes": int,
                 "uplink_bytes": int}],
     "generations": {"stem": b64, "social_sciences": b64, "humanities": b64},
     "predictions": b64}

`generations` carries the official evaluation's own output files, one per category (base64 of the
file, gzip-compressed or not). With them the board scores the entry itself: each file must answer
exactly its category's test questions, once each, in the board's prompt format with the split's
gold letters; the official parser then gives the per-subject counts, the category scores, the
Average and the answer distribution. `scores` and `evaluation.subjects` may then be left out; when
given they must agree with the re-scored numbers (scores within 0.01, counts exactly) or the
submission is refused, naming both. Such an entry is stored as "re-scored", with its files; an
entry without them is "submitted" (self-reported) and is shown but not ranked.

`predictions` does the same for the `loglik` protocol: the per-question predictions file `fedtune
eval --protocol loglik` writes (JSON Lines of `{"subset", "index", "gold", "predicted"}`, base64,
gzip or not). Every scored test question must appear once, by subject and row, with the split's
gold letter; the board counts predicted == gold. The rows of the "other" category are read and
left out.

Re-scoring proves the arithmetic of the files, not that a model wrote them. An entry with files,
an adapter (`adapter.sha256` of the weights the submitter uploads, `adapter.config` its PEFT
config) and a base model on the board's list is stored "pending" and ranked only once a verifier
has re-generated a secret sample of its answers from that model and adapter
(`fedtune.leaderboard.verification`); anything less is "submitted": listed, never ranked.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import gzip
import hashlib
import json
import math
import re
import sys
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from fedtune.evaluation.dataset import EMBEDDED, load_split
from fedtune.evaluation.metrics import board_mean, percent
from fedtune.evaluation.rescore import (
    PREDICTION_FIELDS,
    GenerationFileError,
    QuestionSet,
    RescoredFile,
    check_prediction_set,
    check_question_set,
    decompress,
    parse_generations,
    parse_predictions,
    question_set,
    rescore_predictions,
    rescore_rows,
)
from fedtune.evaluation.subjects import (
    CATEGORY_SUBJECTS,
    EXPECTED_TEST_QUESTIONS,
    SCORED_CATEGORIES,
    SUBJECT_CATEGORY,
)
from fedtune.leaderboard.entry import GENERAL_NLP, PENDING, SUBMITTED, TRACKS, Entry, today_utc
from fedtune.leaderboard.invisible import describe, first_invisible
from fedtune.leaderboard.submission import (
    Adapter,
    Communication,
    Evaluation,
    Privacy,
    RoundRecord,
    Scores,
    Setup,
    SubjectCount,
    SubmissionPayload,
    keys,
)
from fedtune.units import MIB

# The General NLP rules (FlowerTune): the data set and the 20 clients are fixed, and scores must
# come from the official evaluation protocol.
GENERAL_NLP_DATASETS = frozenset({"flwrlabs/alpaca-gpt4", "vicgalle/alpaca-gpt4"})
GENERAL_NLP_CLIENTS = 20
OFFICIAL_PROTOCOL = "flowertune"

# A full submission with 5,000 rounds is ~0.5 MiB; the three generation files of the official
# evaluation, gzipped and in base64, ~1.5–3 MiB.
MAX_BODY_BYTES = 16 * MIB
MAX_ROUNDS = 5000
MAX_NAME_CHARS = 100
MAX_URL_CHARS = 500
MAX_TEXT_CHARS = 4000
MAX_ITEMS = 1000
# The board recomputes a DP ε with one accountant event per distinct release size (clients
# aggregated in a round), each ~0.2 s of Python for sampling without replacement (dp-accounting's
# RDP at its 156 orders; rounds of one size are that event composed n times, which is free). A run
# has at most clients_per_round sizes (fewer clients only when some fail): General NLP's 20 clients
# stay under this, and it bounds the check at ~6 s of one worker process.
MAX_RELEASE_SIZES = 32
# Scores given with the board's two decimals can be off by 0.005 each; the mean of three such
# numbers by as much again. 0.01 points is below what the board shows.
SCORE_TOLERANCE = 0.01

TOP_LEVEL_KEYS = keys(SubmissionPayload)
GZIP_MAGIC = b"\x1f\x8b"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHORT_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_FLOAT_MAX = sys.float_info.max


class SubmissionError(ValueError):
    """A submission is malformed, inconsistent, partial or against its track's rules.

    Attributes:
        field: the dotted path of the offending field ("" for the whole submission).
        reason: the human-readable reason.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason

    def __reduce__(self) -> tuple[type[SubmissionError], tuple[str, str]]:
        # Raised in the server's worker processes and pickled back: keep both fields.
        return (type(self), (self.field, self.reason))


@dataclass(frozen=True)
class Submission:
    """A checked submission: its entry, and the generation files it was re-scored from.

    Attributes:
        entry: the entry to store: "pending" with files and an adapter (the store may still
            find it unverifiable), else "submitted" with `details["verification"]["reason"]`.
        generations: category → the file as the store keeps it (gzip), empty without files.
    """

    entry: Entry
    generations: dict[str, bytes] = field(default_factory=dict)


def validate_submission(payload: Any, *, today: str | None = None) -> Entry:
    """Check a submission and build the entry it describes (see `check_submission`)."""
    return check_submission(payload, today=today).entry


def check_submission(payload: Any, *, today: str | None = None) -> Submission:
    """Check a submission, re-score its generation files if it has them, and build its entry.

    Args:
        payload: the decoded JSON object.
        today: the current ISO day (for the "date in the future" check); defaults to UTC today.
    Returns:
        The entry (no id yet), with `details` holding the normalised evaluation, setup,
        provenance, …, and the generation files to keep with it.
    Raises:
        SubmissionError: the first problem found, naming the field.
    """
    obj = _mapping(payload, "")
    unknown = sorted(set(obj) - TOP_LEVEL_KEYS)
    if unknown:
        raise SubmissionError(
            unknown[0], f"unknown field; allowed: {', '.join(sorted(TOP_LEVEL_KEYS))}"
        )
    track = _text(obj, "track", "", 20, required=False) or GENERAL_NLP
    if track not in TRACKS:
        raise SubmissionError("track", f"must be one of {', '.join(TRACKS)}, got {track!r}")
    if "generations" in obj and "predictions" in obj:
        raise SubmissionError("predictions", "send generation files or predictions, not both")
    rescored = (
        _generations(obj["generations"])
        if "generations" in obj
        else _predictions(obj["predictions"])
        if "predictions" in obj
        else None
    )
    scores = _scores(obj.get("scores"), rescored)
    evaluation = _evaluation(obj.get("evaluation"), scores, rescored)
    # What is stored is what the counts give, never the claim (which only had to agree with them
    # to the board's precision): no one gains a tie by adding 0.0099 to each score.
    scores = _scores_from_counts(evaluation["subjects"])
    communication = _communication(obj.get("communication"))
    rounds = _rounds(obj.get("rounds"), communication["total_bytes"])
    details: dict[str, Any] = {
        "evaluation": evaluation,
        "communication": communication,
        "rounds": rounds,
        "adapter": _adapter(obj.get("adapter")),
        "setup": _setup(obj.get("setup"), rounds),
        "provenance": _plain(obj.get("provenance", {}), "provenance", depth=3),
        "config": _plain(obj.get("config", {}), "config", depth=1),
    }
    if track == GENERAL_NLP:
        check_general_nlp_rules(details)
    unverifiable = _unverifiable(rescored is not None, details["adapter"])
    if unverifiable:
        details["verification"] = {"reason": unverifiable}
    entry = Entry(
        team=_name(obj, "team"),
        code_url=_url(obj.get("code_url")),
        base_model=_name(obj, "base_model"),
        track=track,
        comm_bytes=communication["total_bytes"],
        average=scores["average"],
        stem=scores["stem"],
        social_sciences=scores["social_sciences"],
        humanities=scores["humanities"],
        date=_date(obj.get("date"), today or today_utc()),
        status=SUBMITTED if unverifiable else PENDING,
        details=details,
    )
    return Submission(entry, {c: r.stored for c, r in (rescored or {}).items()})


def _unverifiable(rescored: bool, adapter: Mapping[str, Any]) -> str:
    """Why an entry cannot be verified from what it carries ("" when it can be)."""
    if not rescored:
        return "self-reported: no generation files or predictions for the board to re-score"
    if "sha256" not in adapter or "config" not in adapter:
        return "no adapter (weights sha256 and PEFT config) to re-generate its answers from"
    return ""


def check_general_nlp_rules(details: Mapping[str, Any]) -> None:
    """The General NLP track's rules: Alpaca-GPT4, 20 clients, the official evaluation protocol.

    Raises:
        SubmissionError: naming the rule that is broken and suggesting the open track.
    """
    hint = "; the open track (--track open) accepts other setups"
    setup = details.get("setup") or {}
    dataset = setup.get("dataset")
    if dataset not in GENERAL_NLP_DATASETS:
        raise SubmissionError(
            "setup.dataset",
            f"General NLP requires the Alpaca-GPT4 data set "
            f"({', '.join(sorted(GENERAL_NLP_DATASETS))}), got {dataset!r}{hint}",
        )
    clients = setup.get("num_clients")
    if clients != GENERAL_NLP_CLIENTS:
        raise SubmissionError(
            "setup.num_clients",
            f"General NLP requires {GENERAL_NLP_CLIENTS} clients, got {clients!r}{hint}",
        )
    protocol = details.get("evaluation", {}).get("protocol")
    shots = details.get("evaluation", {}).get("shots", 0)
    if protocol != OFFICIAL_PROTOCOL or shots != 0:
        raise SubmissionError(
            "evaluation.protocol",
            f"General NLP requires the official {OFFICIAL_PROTOCOL!r} evaluation protocol "
            f"(zero-shot), got {protocol!r} with {shots} shots{hint}",
        )


# --- sections -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rescored:
    """One category's generation file, re-scored: what the entry shows and what the store keeps."""

    result: RescoredFile
    sha256: str  # of the file's content (uncompressed)
    stored: bytes  # gzip of the content
    format: str = "generations"  # or "predictions" (the loglik protocol's per-question letters)


@functools.lru_cache(maxsize=len(SCORED_CATEGORIES))
def _test_question_set(category: str) -> QuestionSet:
    """The questions a category's generation file must answer (the shipped MMLU test split)."""
    return question_set(category, load_split(EMBEDDED, "test"))


def rescore_generations(files: Mapping[str, bytes]) -> dict[str, _Rescored]:
    """Re-score one generation file per scored category against the shipped MMLU test split.

    Raises:
        SubmissionError: a category missing or unknown, or a file that is not that category's
            complete set of test questions in the board's format (`generations.<category>`).
    """
    unknown = sorted(set(files) - set(SCORED_CATEGORIES))
    if unknown:
        raise SubmissionError(
            f"generations.{_short(unknown[0])}",
            f"not a scored category; expected {', '.join(SCORED_CATEGORIES)}",
        )
    rescored: dict[str, _Rescored] = {}
    for category in SCORED_CATEGORIES:
        where = f"generations.{category}"
        if category not in files:
            raise SubmissionError(where, "missing: the board needs the file of every category")
        try:
            raw = files[category]
            content = decompress(raw, where)
            rows = parse_generations(content, where)
            check_question_set(rows, category, _test_question_set(category), where)
        except GenerationFileError as exc:
            raise SubmissionError(where, str(exc).replace(f"{where}: ", "")) from None
        rescored[category] = _Rescored(
            result=rescore_rows(rows, where),
            sha256=hashlib.sha256(content).hexdigest(),
            # Kept as received when gzipped (checked above to expand to `content`).
            stored=raw if raw[:2] == GZIP_MAGIC else gzip.compress(content, mtime=0),
        )
    return rescored


@functools.lru_cache(maxsize=len(SCORED_CATEGORIES))
def _test_golds(category: str) -> dict[tuple[str, int], str]:
    """(subject, row) → gold letter of a category's questions in the shipped MMLU test split."""
    return {
        (q.subject, q.index): q.answer
        for q in load_split(EMBEDDED, "test")
        if q.category == category
    }


def rescore_predictions_by_category(rows: list[dict[str, Any]], where: str) -> dict[str, _Rescored]:
    """Per scored category: its questions' predictions checked against the test split and counted;
    what the store keeps is that category's rows as JSON Lines (gzip). Rows of other categories are
    checked for form and then left out, as the board scores only three."""
    rescored: dict[str, _Rescored] = {}
    for category in SCORED_CATEGORIES:
        mine = [r for r in rows if SUBJECT_CATEGORY[r["subset"]] == category]
        try:
            check_prediction_set(mine, category, _test_golds(category), where)
        except GenerationFileError as exc:
            raise SubmissionError(where, str(exc).replace(f"{where}: ", "")) from None
        content = "".join(
            json.dumps({k: r[k] for k in PREDICTION_FIELDS}) + "\n" for r in mine
        ).encode()
        rescored[category] = _Rescored(
            result=rescore_predictions(mine, f"{where}.{category}"),
            sha256=hashlib.sha256(content).hexdigest(),
            stored=gzip.compress(content, mtime=0),
            format="predictions",
        )
    return rescored


def _predictions(value: Any) -> dict[str, _Rescored]:
    if not isinstance(value, str):
        raise SubmissionError("predictions", "must be the predictions file in base64 (a string)")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise SubmissionError("predictions", "not valid base64") from None
    try:
        rows = parse_predictions(raw, "predictions")
    except GenerationFileError as exc:
        raise SubmissionError("predictions", str(exc).replace("predictions: ", "")) from None
    return rescore_predictions_by_category(rows, "predictions")


def _rescore_held(files: Mapping[str, bytes], formats: Mapping[str, str]) -> dict[str, _Rescored]:
    """Re-score the files the store holds for an entry, each by its format."""
    if set(formats.values()) == {"predictions"}:
        rows: list[dict[str, Any]] = []
        for category in SCORED_CATEGORIES:
            where = f"predictions.{category}"
            try:
                rows += parse_predictions(files.get(category, b""), where)
            except GenerationFileError as exc:
                raise SubmissionError(where, str(exc)) from None
        return rescore_predictions_by_category(rows, "predictions")
    return rescore_generations(files)


def recheck(entry: Entry, files: Mapping[str, bytes]) -> list[str]:
    """Re-score a stored entry from the generation files the store holds for it; the differences
    from what the entry shows (empty when every number is reproduced exactly).

    Raises:
        SubmissionError: the held files are no longer valid generation files.
    """
    evaluation = entry.details.get("evaluation", {})
    formats = {
        c: str(v.get("format", "generations")) for c, v in evaluation.get("rescored", {}).items()
    }
    rescored = _rescore_held(files, formats)
    problems = []
    for category, item in rescored.items():
        shown = getattr(entry, category)
        exact = _rescored_percent(item)
        if shown != exact:
            problems.append(f"{category}: shows {shown}, the files give {exact}")
        held = evaluation.get("rescored", {}).get(category, {}).get("sha256")
        if held != item.sha256:
            problems.append(f"{category}: file sha256 {item.sha256[:12]}… is not {held}")
        for subject, (rows, correct) in item.result.subjects.items():
            cell = evaluation.get("subjects", {}).get(subject)
            if cell != {"correct": correct, "total": rows}:
                problems.append(f"{subject}: shows {cell}, the files give {correct}/{rows}")
    average = board_mean({c: _rescored_percent(item) for c, item in rescored.items()})
    if entry.average != average:
        problems.append(f"average: shows {entry.average}, the files give {average}")
    return problems


def _generations(value: Any) -> dict[str, _Rescored]:
    obj = _mapping(value, "generations", required=True)
    files: dict[str, bytes] = {}
    for category, text in obj.items():
        where = f"generations.{_short(category)}"
        if not isinstance(text, str):
            raise SubmissionError(where, "must be the file in base64 (a string)")
        try:
            files[str(category)] = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise SubmissionError(where, "not valid base64") from None
    return rescore_generations(files)


def _rescored_percent(item: _Rescored) -> float:
    return percent(item.result.correct, item.result.rows)


def _scores(value: Any, rescored: Mapping[str, _Rescored] | None = None) -> dict[str, float]:
    if rescored is not None and value is None:
        scores = {c: _rescored_percent(rescored[c]) for c in SCORED_CATEGORIES}
        return {**scores, "average": board_mean(scores)}
    obj = _mapping(value, "scores", required=True)
    _no_unknown(obj, "scores", keys(Scores))
    scores = {}
    for category in SCORED_CATEGORIES:
        value = _percent(obj.get(category), f"scores.{category}", required=True)
        assert value is not None  # required=True raises instead
        scores[category] = value
    mean = sum(scores.values()) / len(scores)
    given = _percent(obj.get("average"), "scores.average", required=False)
    if given is not None and abs(given - mean) > SCORE_TOLERANCE:
        raise SubmissionError(
            "scores.average",
            f"{given} is not the mean of STEM, Social Sciences and Humanities ({mean:.4f})",
        )
    if rescored is None:
        scores["average"] = given if given is not None else mean
        return scores
    # The claim must match the files; what is stored is the re-scored number, never the claim.
    for category in SCORED_CATEGORIES:
        item = rescored[category]
        exact = _rescored_percent(item)
        if abs(scores[category] - exact) > SCORE_TOLERANCE:
            raise SubmissionError(
                f"scores.{category}",
                f"claimed {scores[category]}; the generation files give {exact:.4f} "
                f"({item.result.correct:,}/{item.result.rows:,} by the official parser)",
            )
    return _scores(None, rescored)


def _scores_from_counts(subjects: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    """Category scores (percent) from per-subject counts, and their unweighted mean."""
    scores = {}
    for category in SCORED_CATEGORIES:
        cells = [subjects[s] for s in CATEGORY_SUBJECTS[category]]
        scores[category] = percent(sum(c["correct"] for c in cells), sum(c["total"] for c in cells))
    return {**scores, "average": board_mean(scores)}


def _evaluation(
    value: Any, scores: Mapping[str, float], rescored: Mapping[str, _Rescored] | None = None
) -> dict[str, Any]:
    obj = _mapping(value, "evaluation", required=rescored is None)
    _no_unknown(obj, "evaluation", keys(Evaluation))
    split = _text(obj, "split", "evaluation", 20, required=False) or "test"
    if split != "test":
        raise SubmissionError(
            "evaluation.split", f"the board scores the MMLU test split, got {split!r}"
        )
    shots = _int(obj["shots"], "evaluation.shots", minimum=0) if "shots" in obj else None
    if rescored is not None:
        return _rescored_evaluation(obj, shots, rescored)
    subjects = _subjects(obj.get("subjects"))
    _check_complete_and_consistent(subjects, scores)
    evaluated = sum(s["total"] for s in subjects.values())
    return {
        "protocol": _text(obj, "protocol", "evaluation", MAX_NAME_CHARS, required=True),
        "protocol_version": _text(
            obj, "protocol_version", "evaluation", MAX_NAME_CHARS, required=False
        ),
        "split": split,
        **({"shots": shots} if shots is not None else {}),
        "subjects": subjects,
        "answer_distribution": _answer_distribution(obj.get("answer_distribution"), evaluated),
        "extra": _extra(obj.get("extra")),
    }


def _rescored_evaluation(
    obj: Mapping[str, Any], shots: int | None, rescored: Mapping[str, _Rescored]
) -> dict[str, Any]:
    """The evaluation of an entry with generation files: every count from the files."""
    protocol = _text(obj, "protocol", "evaluation", MAX_NAME_CHARS, required=False)
    by_predictions = next(iter(rescored.values())).format == "predictions"
    if by_predictions:
        if protocol not in ("", "loglik"):
            raise SubmissionError(
                "evaluation.protocol",
                f"predictions are the 'loglik' protocol's outputs, but the evaluation says "
                f"{protocol!r}",
            )
    elif protocol not in ("", OFFICIAL_PROTOCOL) or shots not in (None, 0):
        raise SubmissionError(
            "evaluation.protocol",
            f"generation files are the official {OFFICIAL_PROTOCOL!r} protocol's zero-shot "
            f"outputs, but the evaluation says {protocol!r} with {shots} shots",
        )
    subjects: dict[str, dict[str, int]] = {}
    letters: dict[str, int] = {}
    for item in rescored.values():
        for subject, (rows, correct) in item.result.subjects.items():
            subjects[subject] = {"correct": correct, "total": rows}
        for letter, count in item.result.predicted_letters.items():
            letters[letter] = letters.get(letter, 0) + count
    if "subjects" in obj:
        claimed = _subjects(obj["subjects"])
        for subject in sorted(set(claimed) | set(subjects)):
            if claimed.get(subject) != subjects.get(subject):
                raise SubmissionError(
                    f"evaluation.subjects.{subject}",
                    f"claimed {claimed.get(subject)}; the generation files give "
                    f"{subjects.get(subject)}",
                )
    evaluated = sum(s["total"] for s in subjects.values())
    if "answer_distribution" in obj:
        claimed_letters = _answer_distribution(obj["answer_distribution"], evaluated)
        if {k: v for k, v in claimed_letters.items() if v} != {
            k: v for k, v in letters.items() if v
        }:
            raise SubmissionError(
                "evaluation.answer_distribution",
                f"claimed {claimed_letters}; the generation files give {letters}",
            )
    return {
        "protocol": "loglik" if by_predictions else OFFICIAL_PROTOCOL,
        "protocol_version": _text(
            obj, "protocol_version", "evaluation", MAX_NAME_CHARS, required=False
        ),
        "split": "test",
        **({"shots": shots} if by_predictions and shots is not None else {}),
        **({} if by_predictions else {"shots": 0}),
        "subjects": subjects,
        "answer_distribution": letters,
        "extra": _extra(obj.get("extra")),
        "rescored": {
            category: {
                "format": item.format,
                "sha256": item.sha256,
                "rows": item.result.rows,
                "correct": item.result.correct,
            }
            for category, item in rescored.items()
        },
    }


def _subjects(value: Any) -> dict[str, dict[str, int]]:
    obj = _mapping(value, "evaluation.subjects", required=True)
    subjects: dict[str, dict[str, int]] = {}
    for name, counts in obj.items():
        where = f"evaluation.subjects.{_short(name)}"
        if name not in SUBJECT_CATEGORY:
            raise SubmissionError(where, "not an MMLU subject")
        item = _mapping(counts, where, required=True)
        _no_unknown(item, where, keys(SubjectCount))
        total = _int(item.get("total"), f"{where}.total", minimum=1)
        correct = _int(item.get("correct"), f"{where}.correct", minimum=0)
        if correct > total:
            raise SubmissionError(where, f"{correct} correct out of {total} questions")
        subjects[name] = {"correct": correct, "total": total}
    return subjects


def _check_complete_and_consistent(
    subjects: Mapping[str, Mapping[str, int]], scores: Mapping[str, float]
) -> None:
    for category in SCORED_CATEGORIES:
        missing = [s for s in CATEGORY_SUBJECTS[category] if s not in subjects]
        if missing:
            raise SubmissionError(
                "evaluation.subjects",
                f"partial evaluation: {len(missing)} {category} subject(s) missing "
                f"({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''})",
            )
        total = sum(subjects[s]["total"] for s in CATEGORY_SUBJECTS[category])
        expected = EXPECTED_TEST_QUESTIONS[category]
        if total != expected:
            raise SubmissionError(
                "evaluation.subjects",
                f"partial evaluation: {category} has {total:,} questions, "
                f"the test split {expected:,}",
            )
        correct = sum(subjects[s]["correct"] for s in CATEGORY_SUBJECTS[category])
        accuracy = percent(correct, total)
        if abs(accuracy - scores[category]) > SCORE_TOLERANCE:
            raise SubmissionError(
                f"scores.{category}",
                f"{scores[category]} disagrees with the subjects' counts "
                f"({correct}/{total} = {accuracy:.4f})",
            )


def _answer_distribution(value: Any, evaluated: int) -> dict[str, int]:
    obj = _mapping(value, "evaluation.answer_distribution", required=False)
    if len(obj) > 16:
        raise SubmissionError("evaluation.answer_distribution", "more than 16 answers")
    counts = {}
    for key, count in obj.items():
        where = f"evaluation.answer_distribution.{_short(key)}"
        if not _SHORT_KEY.match(str(key)):
            raise SubmissionError(where, "answer labels are short names like A, B, none")
        counts[str(key)] = _int(count, where, minimum=0)
    if counts and sum(counts.values()) != evaluated:
        raise SubmissionError(
            "evaluation.answer_distribution",
            f"counts sum to {sum(counts.values()):,} but {evaluated:,} questions were evaluated",
        )
    return counts


def _extra(value: Any) -> dict[str, float]:
    obj = _mapping(value, "evaluation.extra", required=False)
    if len(obj) > 64:
        raise SubmissionError("evaluation.extra", "more than 64 figures")
    extra = {}
    for key, number in obj.items():
        where = f"evaluation.extra.{_short(key)}"
        if not _SHORT_KEY.match(str(key)):
            raise SubmissionError(where, "names are letters, digits and _.:- (at most 64)")
        extra[str(key)] = _finite(number, where)
    return extra


def _communication(value: Any) -> dict[str, int]:
    obj = _mapping(value, "communication", required=True)
    _no_unknown(obj, "communication", keys(Communication))
    total = _int(obj.get("total_bytes"), "communication.total_bytes", minimum=1)
    result = {"total_bytes": total}
    if "downlink_bytes" in obj or "uplink_bytes" in obj:
        down = _int(obj.get("downlink_bytes"), "communication.downlink_bytes", minimum=0)
        up = _int(obj.get("uplink_bytes"), "communication.uplink_bytes", minimum=0)
        if down + up != total:
            raise SubmissionError(
                "communication.total_bytes",
                f"{total:,} is not downlink + uplink ({down:,} + {up:,} = {down + up:,})",
            )
        result.update(downlink_bytes=down, uplink_bytes=up)
    return result


def _rounds(value: Any, total_bytes: int) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise SubmissionError("rounds", "must be a list of per-round records")
    if len(value) > MAX_ROUNDS:
        raise SubmissionError("rounds", f"{len(value):,} rounds; at most {MAX_ROUNDS:,}")
    rounds: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"rounds[{i}]"
        obj = _mapping(item, where, required=True)
        _no_unknown(obj, where, keys(RoundRecord))
        number = _int(obj.get("round"), f"{where}.round", minimum=1)
        if rounds and number <= rounds[-1]["round"]:
            raise SubmissionError(f"{where}.round", "rounds must be listed in increasing order")
        loss = obj.get("train_loss")
        rounds.append(
            {
                "round": number,
                "train_loss": None if loss is None else _finite(loss, f"{where}.train_loss"),
                "downlink_bytes": _int(
                    obj.get("downlink_bytes"), f"{where}.downlink_bytes", minimum=0
                ),
                "uplink_bytes": _int(obj.get("uplink_bytes"), f"{where}.uplink_bytes", minimum=0),
                "clients": _int(obj.get("clients", 0), f"{where}.clients", minimum=0),
            }
        )
    summed = sum(r["downlink_bytes"] + r["uplink_bytes"] for r in rounds)
    if rounds and summed != total_bytes:
        raise SubmissionError(
            "rounds",
            f"per-round bytes sum to {summed:,}, not communication.total_bytes {total_bytes:,}",
        )
    return rounds


MAX_ADAPTER_CONFIG_KEYS = 200


def _adapter(value: Any) -> dict[str, Any]:
    obj = _mapping(value, "adapter", required=False)
    _no_unknown(obj, "adapter", keys(Adapter))
    adapter: dict[str, Any] = {}
    location = _text(obj, "location", "adapter", MAX_URL_CHARS, required=False)
    if location:
        adapter["location"] = location
    digest = _text(obj, "sha256", "adapter", 64, required=False)
    if digest:
        if not _SHA256.match(digest):
            raise SubmissionError("adapter.sha256", "must be 64 lower-case hex digits")
        adapter["sha256"] = digest
    if "config" in obj:
        config = _mapping(obj["config"], "adapter.config", required=True)
        if len(config) > MAX_ADAPTER_CONFIG_KEYS:
            raise SubmissionError("adapter.config", f"more than {MAX_ADAPTER_CONFIG_KEYS} keys")
        peft_type = config.get("peft_type")
        if not isinstance(peft_type, str) or not peft_type:
            raise SubmissionError("adapter.config.peft_type", "PEFT's adapter_config.json names it")
        adapter["config"] = _plain(config, "adapter.config", depth=3)
        if "sha256" not in adapter:
            raise SubmissionError("adapter.sha256", "a config needs the weights' sha256 beside it")
    return adapter


def _setup(value: Any, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    obj = _mapping(value, "setup", required=False)
    texts = ("dataset", "strategy", "adapter", "codec_downlink", "codec_uplink")
    _no_unknown(obj, "setup", keys(Setup))
    setup: dict[str, Any] = {}
    for key in texts:
        text = _text(obj, key, "setup", MAX_URL_CHARS, required=False)
        if text:
            setup[key] = text
    for key in ("num_clients", "rounds", "clients_per_round"):
        if key in obj:
            setup[key] = _int(obj[key], f"setup.{key}", minimum=1)
    if "privacy" in obj:
        setup["privacy"] = _privacy(obj["privacy"], setup.get("num_clients"), rounds)
    return setup


def _privacy(value: Any, population: int | None, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """A DP claim the board can recompute: ε from σ, δ, the accounting, the population and
    each round's release, by the same accountant; a claim that differs is refused."""
    from types import SimpleNamespace

    from fedtune.federation.privacy import (
        ACCOUNTING,
        MAX_NOISE_MULTIPLIER,
        NOISE_MODES,
        privacy_spent,
    )

    where = "setup.privacy"
    obj = _mapping(value, where, required=True)
    _no_unknown(obj, where, keys(Privacy))
    noise = _text(obj, "noise", where, 20, required=True)
    accounting = _text(obj, "accounting", where, 40, required=True)
    if noise not in NOISE_MODES:
        raise SubmissionError(f"{where}.noise", f"must be one of {', '.join(NOISE_MODES)}")
    if accounting not in ACCOUNTING:
        raise SubmissionError(f"{where}.accounting", f"must be one of {', '.join(ACCOUNTING)}")
    sigma = _finite(obj.get("noise_multiplier"), f"{where}.noise_multiplier")
    clip = _finite(obj.get("clipping_norm"), f"{where}.clipping_norm")
    delta = _finite(obj.get("delta"), f"{where}.delta")
    if not 0 <= sigma <= MAX_NOISE_MULTIPLIER or clip <= 0 or not 0 < delta < 1:
        raise SubmissionError(
            where,
            f"needs 0 <= noise_multiplier <= {MAX_NOISE_MULTIPLIER:g}, clipping_norm > 0, "
            "0 < delta < 1",
        )
    releases = obj.get("releases")
    if not isinstance(releases, list) or len(releases) > MAX_ROUNDS:
        raise SubmissionError(f"{where}.releases", "must be a list: clients per round's release")
    counts = [_int(n, f"{where}.releases[{i}]", minimum=1) for i, n in enumerate(releases)]
    if population is None or not rounds:
        raise SubmissionError(
            where, "ε is recomputed from setup.num_clients and the per-round records: send both"
        )
    if len(counts) != len(rounds) or any(
        n > r["clients"] for n, r in zip(counts, rounds, strict=False)
    ):
        raise SubmissionError(
            f"{where}.releases",
            "one release per round, each at most the clients that round's ledger counts",
        )
    if accounting == "without-replacement" and noise != "server":
        raise SubmissionError(f"{where}.accounting", "amplification needs noise=server")
    if max(counts, default=0) > population:
        raise SubmissionError(f"{where}.releases", "more clients than setup.num_clients")
    sizes = len(set(counts))
    if sizes > MAX_RELEASE_SIZES:
        raise SubmissionError(
            f"{where}.releases",
            f"{sizes} distinct release sizes; at most {MAX_RELEASE_SIZES} (the board recomputes ε "
            "once per distinct number of clients aggregated)",
        )
    dp = SimpleNamespace(noise=noise, noise_multiplier=sigma, clipping_norm=clip, delta=delta,
                         accounting=accounting)  # fmt: skip
    epsilon = privacy_spent(dp, population, counts)["epsilon"]
    claimed = obj.get("epsilon")
    if not math.isfinite(epsilon):
        if claimed is not None:
            raise SubmissionError(f"{where}.epsilon", "without noise ε is infinite: send null")
        recomputed = None
    else:
        got = _finite(claimed, f"{where}.epsilon")
        if abs(got - epsilon) > 1e-6 * max(1.0, epsilon):
            raise SubmissionError(
                f"{where}.epsilon", f"claims {got:.6f}; the accountant gives {epsilon:.6f}"
            )
        recomputed = epsilon
    return {"noise": noise, "noise_multiplier": sigma, "clipping_norm": clip, "delta": delta,
            "accounting": accounting, "releases": counts, "epsilon": recomputed}  # fmt: skip


# --- primitives -----------------------------------------------------------------------------------


def _mapping(value: Any, where: str, required: bool = True) -> Mapping[str, Any]:
    if value is None and not required:
        return {}
    if not isinstance(value, Mapping):
        what = where if where else "the submission"
        raise SubmissionError(where, f"{what} must be a JSON object")
    return value


def _no_unknown(obj: Mapping[str, Any], where: str, allowed: frozenset[str]) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise SubmissionError(
            f"{where}.{_short(unknown[0])}", f"unknown field; allowed: {', '.join(sorted(allowed))}"
        )


def _short(key: Any) -> str:
    text = str(key)
    return text if len(text) <= 40 else text[:40] + "…"


def _clean(text: str, where: str, max_chars: int) -> str:
    text = text.strip()
    if len(text) > max_chars:
        raise SubmissionError(where, f"{len(text):,} characters; at most {max_chars:,}")
    for ch in text:
        # Control and bidi-override characters garble terminals and can disguise a name.
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co"):
            raise SubmissionError(where, f"contains the control character {describe(ch)}")
    # Characters drawn as nothing (variation selectors, Hangul fillers, the braille blank, …)
    # would let "ZeroOne.AI" plus one of them pass for ZeroOne.AI.
    hidden = first_invisible(text)
    if hidden is not None:
        raise SubmissionError(
            where,
            f"contains the invisible character {describe(hidden)}, drawn as nothing or a blank",
        )
    return text


def _text(obj: Mapping[str, Any], key: str, section: str, max_chars: int, required: bool) -> str:
    where = f"{section}.{key}" if section else key
    value = obj.get(key)
    if value is None:
        if required:
            raise SubmissionError(where, "missing")
        return ""
    if not isinstance(value, str):
        raise SubmissionError(where, "must be a string")
    return _clean(value, where, max_chars)


def _name(obj: Mapping[str, Any], key: str) -> str:
    text = _text(obj, key, "", MAX_NAME_CHARS, required=True)
    if not text:
        raise SubmissionError(key, "must not be empty")
    return text


def _url(value: Any) -> str:
    if value is None:
        raise SubmissionError("code_url", "missing")
    if not isinstance(value, str):
        raise SubmissionError("code_url", "must be a string")
    url = _clean(value, "code_url", MAX_URL_CHARS)
    parts = urlsplit(url)
    # Only web links: a javascript: or data: URL in an href would run in readers' browsers.
    if parts.scheme not in ("http", "https") or not parts.netloc or re.search(r"[\s<>\"'`]", url):
        raise SubmissionError("code_url", f"must be an http(s) URL of the code, got {url!r}")
    return url


def _date(value: Any, today: str) -> str:
    if value is None:
        return today
    if not isinstance(value, str):
        raise SubmissionError("date", "must be an ISO date string (YYYY-MM-DD)")
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        raise SubmissionError("date", f"not an ISO date (YYYY-MM-DD): {value!r}") from None
    if day > dt.date.fromisoformat(today) + dt.timedelta(days=1):
        raise SubmissionError("date", f"{value} is in the future")
    return day.isoformat()


def _finite(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SubmissionError(where, "must be a number")
    _in_float_range(value, where)
    if not math.isfinite(value):
        raise SubmissionError(where, "must be a finite number")
    return float(value)


def _in_float_range(value: int | float, where: str) -> None:
    """JSON integers have no bound: one beyond ±1.8e308 cannot become a float (OverflowError)."""
    if isinstance(value, int) and not -_FLOAT_MAX <= value <= _FLOAT_MAX:
        digits = int(abs(value).bit_length() * math.log10(2)) + 1  # str() stops at 4,300 digits
        raise SubmissionError(
            where,
            f"an integer of about {digits:,} digits, beyond ±{_FLOAT_MAX:.2g}, the range of a number",
        )


def _percent(value: Any, where: str, required: bool) -> float | None:
    if value is None:
        if required:
            raise SubmissionError(where, "missing")
        return None
    number = _finite(value, where)
    if not 0.0 <= number <= 100.0:
        raise SubmissionError(where, f"{number} is not a percentage in [0, 100]")
    return number


def _int(value: Any, where: str, minimum: int) -> int:
    if value is None:
        raise SubmissionError(where, "missing")
    if isinstance(value, bool) or not isinstance(value, int):
        raise SubmissionError(where, "must be an integer")
    if value < minimum:
        raise SubmissionError(where, f"{value:,} is below {minimum}")
    if value >= 2**63:  # SQLite's INTEGER
        raise SubmissionError(where, f"{value:,} is too large")
    return value


def _plain(value: Any, where: str, depth: int) -> Any:
    """Bounded plain JSON: objects (depth-limited) of strings, numbers, booleans and null."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        _in_float_range(value, where)
        return _finite(value, where) if isinstance(value, float) else value
    if isinstance(value, str):
        return _clean(value, where, MAX_TEXT_CHARS)
    if isinstance(value, Mapping):
        if depth <= 0:
            raise SubmissionError(where, "nested too deeply")
        if len(value) > MAX_ITEMS:
            raise SubmissionError(where, f"more than {MAX_ITEMS:,} keys")
        result = {}
        for key, item in value.items():
            name = _clean(str(key), f"{where} key", 200)
            result[name] = _plain(item, f"{where}.{_short(name)}", depth - 1)
        return result
    if isinstance(value, list):
        if depth <= 0:
            raise SubmissionError(where, "nested too deeply")
        if len(value) > MAX_ITEMS:
            raise SubmissionError(where, f"more than {MAX_ITEMS:,} items")
        return [_plain(item, f"{where}[{i}]", depth - 1) for i, item in enumerate(value)]
    raise SubmissionError(where, f"unsupported value of type {type(value).__name__}")

"""Checking a submission (the JSON the API and `submit` exchange) and turning it into an entry.

A submission's shape and ranges (missing or unknown fields, wrong types, out-of-range numbers,
integers beyond a float's range, over-long text, control characters, characters that show as
nothing: `fedtune.leaderboard.invisible`) are declared once, as the types of
`fedtune.leaderboard.submission`, and checked by its strict `PAYLOAD` adapter. What is checked here
is what no type can say: a submission is refused, with the field and the reason, when it does not
add up (category scores that disagree with the per-subject counts, an Average that is not the mean
of the three categories, per-round bytes that do not sum to the total, a DP ε the board's
accountant does not give), when the evaluation is partial (a scored subject missing, or a category
with fewer questions than the test split), when its files do not re-score to its claims, or when
it breaks the rules of its track. Text that merely looks like HTML is accepted, and escaped
wherever it is shown.

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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

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
from fedtune.leaderboard.entry import GENERAL_NLP, PENDING, SUBMITTED, Entry, today_utc
from fedtune.leaderboard.submission import MAX_ROUNDS as MAX_ROUNDS  # the list's cap, re-exported
from fedtune.leaderboard.submission import (
    PAYLOAD,
    Adapter,
    Communication,
    Evaluation,
    Privacy,
    RoundRecord,
    Scores,
    Setup,
    SubjectCount,
    SubmissionPayload,
    problem,
    shortened,
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
# The board recomputes a DP ε with one accountant event per distinct release size (clients
# aggregated in a round), each ~0.2 s of Python for sampling without replacement (dp-accounting's
# RDP at its 156 orders; rounds of one size are that event composed n times, which is free). A run
# has at most clients_per_round sizes (fewer clients only when some fail): General NLP's 20 clients
# stay under this, and it bounds the check at ~6 s of one worker process.
MAX_RELEASE_SIZES = 32
# Scores given with the board's two decimals can be off by 0.005 each; the mean of three such
# numbers by as much again. 0.01 points is below what the board shows.
SCORE_TOLERANCE = 0.01

GZIP_MAGIC = b"\x1f\x8b"


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
    obj = _shaped(payload)
    track = obj.get("track", GENERAL_NLP)
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
    communication = _communication(obj["communication"])
    rounds = _rounds(obj.get("rounds", []), communication["total_bytes"])
    details: dict[str, Any] = {
        "evaluation": evaluation,
        "communication": communication,
        "rounds": rounds,
        "adapter": _adapter(obj.get("adapter", {})),
        "setup": _setup(obj.get("setup", {}), rounds),
        "provenance": obj.get("provenance", {}),
        "config": obj.get("config", {}),
    }
    if track == GENERAL_NLP:
        check_general_nlp_rules(details)
    unverifiable = _unverifiable(rescored is not None, details["adapter"])
    if unverifiable:
        details["verification"] = {"reason": unverifiable}
    entry = Entry(
        team=obj["team"],
        code_url=obj["code_url"],
        base_model=obj["base_model"],
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


def _shaped(payload: Any) -> SubmissionPayload:
    """The submission as its types declare it (text stripped, numbers as floats), or refused with
    the first field they do not allow."""
    try:
        return PAYLOAD.validate_python(payload)
    except ValidationError as exc:
        raise SubmissionError(*problem(exc.errors()[0])) from None


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
            f"generations.{shortened(unknown[0])}",
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


def _predictions(text: str) -> dict[str, _Rescored]:
    try:
        raw = base64.b64decode(text, validate=True)
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


def _generations(encoded: Mapping[str, str]) -> dict[str, _Rescored]:
    files: dict[str, bytes] = {}
    for category, text in encoded.items():
        try:
            files[category] = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise SubmissionError(
                f"generations.{shortened(category)}", "not valid base64"
            ) from None
    return rescore_generations(files)


def _rescored_percent(item: _Rescored) -> float:
    return percent(item.result.correct, item.result.rows)


def _scores(value: Scores | None, rescored: Mapping[str, _Rescored] | None) -> dict[str, float]:
    if value is None:
        if rescored is None:
            raise SubmissionError(
                "scores",
                "missing: the scores (a JSON object) are needed without generation files or "
                "predictions to re-score",
            )
        scores = {c: _rescored_percent(rescored[c]) for c in SCORED_CATEGORIES}
        return {**scores, "average": board_mean(scores)}
    claimed = {
        "stem": value["stem"],
        "social_sciences": value["social_sciences"],
        "humanities": value["humanities"],
    }
    scores = {c: claimed[c] for c in SCORED_CATEGORIES}
    mean = sum(scores.values()) / len(scores)
    given = value.get("average")
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
    value: Evaluation | None,
    scores: Mapping[str, float],
    rescored: Mapping[str, _Rescored] | None,
) -> dict[str, Any]:
    if rescored is not None:
        return _rescored_evaluation(value or {}, rescored)
    needed = "missing: needed without generation files or predictions to re-score"
    if value is None:
        raise SubmissionError("evaluation", needed)
    for key in ("subjects", "protocol"):
        if key not in value:
            raise SubmissionError(f"evaluation.{key}", needed)
    subjects = _subjects(value["subjects"])
    _check_complete_and_consistent(subjects, scores)
    evaluated = sum(s["total"] for s in subjects.values())
    return {
        "protocol": value["protocol"],
        "protocol_version": value.get("protocol_version", ""),
        "split": value.get("split", "test"),
        **({"shots": value["shots"]} if "shots" in value else {}),
        "subjects": subjects,
        "answer_distribution": _answer_distribution(value.get("answer_distribution"), evaluated),
        "extra": dict(value.get("extra", {})),
    }


def _rescored_evaluation(value: Evaluation, rescored: Mapping[str, _Rescored]) -> dict[str, Any]:
    """The evaluation of an entry with generation files: every count from the files."""
    protocol = value.get("protocol", "")
    shots = value.get("shots")
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
    if "subjects" in value:
        claimed = _subjects(value["subjects"])
        for subject in sorted(set(claimed) | set(subjects)):
            if claimed.get(subject) != subjects.get(subject):
                raise SubmissionError(
                    f"evaluation.subjects.{subject}",
                    f"claimed {claimed.get(subject)}; the generation files give "
                    f"{subjects.get(subject)}",
                )
    evaluated = sum(s["total"] for s in subjects.values())
    if "answer_distribution" in value:
        claimed_letters = _answer_distribution(value["answer_distribution"], evaluated)
        if {k: v for k, v in claimed_letters.items() if v} != {
            k: v for k, v in letters.items() if v
        }:
            raise SubmissionError(
                "evaluation.answer_distribution",
                f"claimed {claimed_letters}; the generation files give {letters}",
            )
    return {
        "protocol": "loglik" if by_predictions else OFFICIAL_PROTOCOL,
        "protocol_version": value.get("protocol_version", ""),
        "split": "test",
        **({"shots": shots} if by_predictions and shots is not None else {}),
        **({} if by_predictions else {"shots": 0}),
        "subjects": subjects,
        "answer_distribution": letters,
        "extra": dict(value.get("extra", {})),
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


def _subjects(cells: Mapping[str, SubjectCount]) -> dict[str, dict[str, int]]:
    subjects: dict[str, dict[str, int]] = {}
    for name, cell in cells.items():
        correct, total = cell["correct"], cell["total"]
        if correct > total:
            raise SubmissionError(
                f"evaluation.subjects.{name}", f"{correct} correct out of {total} questions"
            )
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


def _answer_distribution(counts: Mapping[str, int] | None, evaluated: int) -> dict[str, int]:
    counts = dict(counts or {})
    if counts and sum(counts.values()) != evaluated:
        raise SubmissionError(
            "evaluation.answer_distribution",
            f"counts sum to {sum(counts.values()):,} but {evaluated:,} questions were evaluated",
        )
    return counts


def _communication(value: Communication) -> dict[str, int]:
    total = value["total_bytes"]
    result = {"total_bytes": total}
    sent = [k for k in ("downlink_bytes", "uplink_bytes") if k in value]
    if len(sent) == 1:
        other = "uplink_bytes" if sent == ["downlink_bytes"] else "downlink_bytes"
        raise SubmissionError(f"communication.{other}", f"missing: {sent[0]} is given")
    if sent:
        down, up = value["downlink_bytes"], value["uplink_bytes"]
        if down + up != total:
            raise SubmissionError(
                "communication.total_bytes",
                f"{total:,} is not downlink + uplink ({down:,} + {up:,} = {down + up:,})",
            )
        result.update(downlink_bytes=down, uplink_bytes=up)
    return result


def _rounds(records: list[RoundRecord], total_bytes: int) -> list[dict[str, Any]]:
    rounds: list[dict[str, Any]] = []
    for i, record in enumerate(records):
        if rounds and record["round"] <= rounds[-1]["round"]:
            raise SubmissionError(f"rounds[{i}].round", "rounds must be listed in increasing order")
        row = {
            "round": record["round"],
            "train_loss": record.get("train_loss"),
            "downlink_bytes": record["downlink_bytes"],
            "uplink_bytes": record["uplink_bytes"],
            "clients": record.get("clients", 0),
        }
        if record.get("heldout_loss") is not None:
            row["heldout_loss"] = record["heldout_loss"]
        rounds.append(row)
    summed = sum(r["downlink_bytes"] + r["uplink_bytes"] for r in rounds)
    if rounds and summed != total_bytes:
        raise SubmissionError(
            "rounds",
            f"per-round bytes sum to {summed:,}, not communication.total_bytes {total_bytes:,}",
        )
    return rounds


def _adapter(value: Adapter) -> dict[str, Any]:
    # Empty text is no value: "location": "" is no location.
    adapter = _in_order(value, ("location", "sha256", "config"))
    if "config" in adapter and "sha256" not in adapter:
        raise SubmissionError("adapter.sha256", "a config needs the weights' sha256 beside it")
    return adapter


def _setup(value: Setup, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    # Empty text is no value: a run that does not name its data set has none to show.
    setup = _in_order(value, SETUP_ORDER)
    if "privacy" in value:
        setup["privacy"] = _privacy(value["privacy"], setup.get("num_clients"), rounds)
    return setup


# The order the entry page shows the setup in: text, then counts.
SETUP_ORDER = ("dataset", "strategy", "adapter", "codec_downlink", "codec_uplink",
               "num_clients", "rounds", "clients_per_round")  # fmt: skip


def _in_order(section: Mapping[str, object], keys: tuple[str, ...]) -> dict[str, Any]:
    """The section's `keys` that hold a value (empty text holds none), in that order."""
    return {k: section[k] for k in keys if section.get(k, "") != ""}


def _privacy(
    value: Privacy, population: int | None, rounds: list[dict[str, Any]]
) -> dict[str, Any]:
    """A DP claim the board can recompute: ε from σ, δ, the accounting, the population and
    each round's release, by the same accountant; a claim that differs is refused."""
    from types import SimpleNamespace

    from fedtune.federation.privacy import privacy_spent

    where = "setup.privacy"
    noise, accounting, counts = value["noise"], value["accounting"], value["releases"]
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
    sigma, clip, delta = value["noise_multiplier"], value["clipping_norm"], value["delta"]
    dp = SimpleNamespace(noise=noise, noise_multiplier=sigma, clipping_norm=clip, delta=delta,
                         accounting=accounting)  # fmt: skip
    epsilon = privacy_spent(dp, population, counts)["epsilon"]
    claimed = value.get("epsilon")
    if not math.isfinite(epsilon):
        if claimed is not None:
            raise SubmissionError(f"{where}.epsilon", "without noise ε is infinite: send null")
        recomputed = None
    elif claimed is None:
        raise SubmissionError(f"{where}.epsilon", f"missing; the accountant gives {epsilon:.6f}")
    else:
        if abs(claimed - epsilon) > 1e-6 * max(1.0, epsilon):
            raise SubmissionError(
                f"{where}.epsilon", f"claims {claimed:.6f}; the accountant gives {epsilon:.6f}"
            )
        recomputed = epsilon
    return {"noise": noise, "noise_multiplier": sigma, "clipping_norm": clip, "delta": delta,
            "accounting": accounting, "releases": list(counts), "epsilon": recomputed}  # fmt: skip


def _date(value: str | None, today: str) -> str:
    if value is None:
        return today
    if dt.date.fromisoformat(value) > dt.date.fromisoformat(today) + dt.timedelta(days=1):
        raise SubmissionError("date", f"{value} is in the future")
    return value

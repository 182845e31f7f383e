"""The submission format, as types: what `submit` writes (`runs.build_submission`) and what the
board accepts. The types are the one declaration of a submission's shape: its keys, which of them
are required, the type of every value, their ranges, lengths and forms. `PAYLOAD`, a strict pydantic
`TypeAdapter` over them, checks all of that (no string for a number, no 1.5 or true for a count, no
unknown key); `fedtune.leaderboard.validation` then checks what the types cannot say (that the
numbers add up, the files re-score, the rules of the track), and `problem` turns each of PAYLOAD's
errors into the field and the reason a refusal names.

    {"team": name, "code_url": "https://…", "base_model": name,             # required
     "track": "general-nlp" | "open", "date": "YYYY-MM-DD",
     "scores": {"stem": %, "social_sciences": %, "humanities": %, "average": %},
     "communication": {"total_bytes": int, "downlink_bytes": int, "uplink_bytes": int},  # required
     "evaluation": {"protocol": str, "protocol_version": str, "shots": int, "split": "test",
                    "subjects": {subject: {"correct": int, "total": int}},
                    "answer_distribution": {letter: int}, "extra": {name: number}},
     "adapter": {"location": str, "sha256": hex64, "config": {PEFT adapter_config.json}},
     "setup": {"dataset": str, "num_clients": int, "rounds": int, "clients_per_round": int,
               "strategy": str, "adapter": str, "codec_downlink": str, "codec_uplink": str,
               "privacy": {"noise", "noise_multiplier", "clipping_norm", "delta", "accounting",
                           "releases": [int], "epsilon": number | null}},
     "provenance": {...}, "config": {key: scalar},
     "rounds": [{"round": int, "train_loss": number | null, "heldout_loss": number | null,
                 "downlink_bytes": int, "uplink_bytes": int, "clients": int}],
     "generations": {"stem": b64, "social_sciences": b64, "humanities": b64},
     "predictions": b64}

`scores` and `evaluation` (with its `subjects` and `protocol`) are required unless the submission
carries `generations` or `predictions` for the board to re-score: that rule spans keys, and is
`validation`'s. Text is stripped of surrounding blanks and may not hold control characters, line or
paragraph separators (U+2028, U+2029) or characters that show as nothing
(`fedtune.leaderboard.invisible`); integers are at most SQLite's 2^63 − 1; numbers are finite and
within a float's range.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import re
import sys
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, NotRequired, Required, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

from pydantic import AfterValidator, ConfigDict, Field, StringConstraints, TypeAdapter, with_config
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError

# pydantic reads TypedDicts from typing_extensions before Python 3.12.
from typing_extensions import TypedDict, is_typeddict

from fedtune.config import ACCOUNTING, MAX_NOISE_MULTIPLIER, NOISE_MODES
from fedtune.evaluation.subjects import SUBJECT_CATEGORY
from fedtune.leaderboard.entry import TRACKS
from fedtune.leaderboard.invisible import describe, first_invisible

MAX_ROUNDS = 5000
MAX_NAME_CHARS = 100
MAX_URL_CHARS = 500
MAX_TEXT_CHARS = 4000
MAX_ITEMS = 1000
MAX_ADAPTER_CONFIG_KEYS = 200
MAX_INTEGER = 2**63 - 1  # SQLite's INTEGER
_FLOAT_MAX = sys.float_info.max

STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


def _refused(reason: str, at: str = "") -> PydanticCustomError:
    """A refusal raised inside a type's check; `at` is the path below the value pydantic reached
    (".commit", "[2]", " key"), for the checks that walk free-form JSON themselves."""
    return PydanticCustomError("submission", "{reason}", {"reason": reason, "at": at})


# --- forms of text --------------------------------------------------------------------------------


def _printable(text: str, at: str = "") -> str:
    for ch in text:
        # Control and bidi-override characters garble terminals and can disguise a name.
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co"):
            raise _refused(f"contains the control character {describe(ch)}", at)
        # U+2028/U+2029 break a line wherever text is shown or logged, as a newline would.
        if unicodedata.category(ch) in ("Zl", "Zp"):
            raise _refused(f"contains the line break {describe(ch)}", at)
    # Characters drawn as nothing (variation selectors, Hangul fillers, the braille blank, …)
    # would let "ZeroOne.AI" plus one of them pass for ZeroOne.AI.
    hidden = first_invisible(text)
    if hidden is not None:
        raise _refused(
            f"contains the invisible character {describe(hidden)}, drawn as nothing or a blank", at
        )
    return text


def _web_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        web = parts.scheme in ("http", "https") and bool(parts.netloc)
    except ValueError:  # an unbalanced [ of an IPv6 host
        web = False
    # Only web links: a javascript: or data: URL in an href would run in readers' browsers.
    if not web or re.search(r"[\s<>\"'`]", url):
        raise _refused(f"must be an http(s) URL of the code, got {url!r}")
    return url


def _iso_date(text: str) -> str:
    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise _refused(f"not an ISO date (YYYY-MM-DD): {text!r}") from None


def _one_of(values: Sequence[str]) -> AfterValidator:
    def check(value: str) -> str:
        if value not in values:
            raise _refused(f"must be one of {', '.join(values)}, got {value!r}")
        return value

    return AfterValidator(check)


def _test_split(split: str) -> str:
    if split != "test":
        raise _refused(f"the board scores the MMLU test split, got {split!r}")
    return split


def _mmlu_subject(name: str) -> str:
    if name not in SUBJECT_CATEGORY:
        raise _refused("not an MMLU subject")
    return name


def _text(max_chars: int, min_chars: int = 0) -> StringConstraints:
    return StringConstraints(strip_whitespace=True, min_length=min_chars, max_length=max_chars)


Name = Annotated[str, _text(MAX_NAME_CHARS, min_chars=1), AfterValidator(_printable)]
Label = Annotated[str, _text(MAX_NAME_CHARS), AfterValidator(_printable)]
Text = Annotated[str, _text(MAX_URL_CHARS), AfterValidator(_printable)]
WebUrl = Annotated[str, _text(MAX_URL_CHARS), AfterValidator(_printable), AfterValidator(_web_url)]
IsoDate = Annotated[
    str,
    StringConstraints(max_length=40),
    AfterValidator(_iso_date),
    Field(description="an ISO date, YYYY-MM-DD"),
]
Track = Annotated[str, _text(20), _one_of(TRACKS)]
Split = Annotated[str, _text(20), AfterValidator(_test_split)]
Sha256 = Annotated[
    str,
    StringConstraints(strip_whitespace=True, pattern=r"^[0-9a-f]{64}$"),
    Field(description="64 lower-case hex digits"),
]
ShortName = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9_.:-]{1,64}$",
        description="a short name of letters, digits and _.:- (at most 64), like A, B, none",
    ),
]
SubjectName = Annotated[str, AfterValidator(_mmlu_subject)]
Base64File = Annotated[str, Field(description="the file in base64")]

# --- numbers --------------------------------------------------------------------------------------

Percent = Annotated[float, Field(ge=0, le=100, description="a percentage in [0, 100]")]
Count = Annotated[int, Field(ge=0, le=MAX_INTEGER)]
Positive = Annotated[int, Field(ge=1, le=MAX_INTEGER)]

# --- free-form JSON -------------------------------------------------------------------------------


def shortened(key: Any) -> str:
    """A key as a field path names it: at most 40 characters."""
    text = str(key)
    return text if len(text) <= 40 else text[:40] + "…"


def _in_float_range(value: int) -> str | None:
    """Why an integer is no number (JSON integers have no bound: one beyond ±1.8e308 cannot
    become a float), None when it is one."""
    if -_FLOAT_MAX <= value <= _FLOAT_MAX:
        return None
    digits = int(abs(value).bit_length() * math.log10(2)) + 1  # str() stops at 4,300 digits
    return f"an integer of about {digits:,} digits, beyond ±{_FLOAT_MAX:.2g}, the range of a number"


def _plain(value: Any, at: str, depth: int) -> Any:
    """Bounded plain JSON: objects (depth-limited) of strings, numbers, booleans and null."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        beyond = _in_float_range(value)
        if beyond:
            raise _refused(beyond, at)
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _refused("must be a finite number", at)
        return value
    if isinstance(value, str):
        return _printable(_stripped(value, at, MAX_TEXT_CHARS), at)
    if isinstance(value, Mapping | list):
        if depth <= 0:
            raise _refused("nested too deeply", at)
        if len(value) > MAX_ITEMS:
            kind = "keys" if isinstance(value, Mapping) else "items"
            raise _refused(f"more than {MAX_ITEMS:,} {kind}", at)
    if isinstance(value, Mapping):
        result = {}
        for key, item in value.items():
            name = _printable(_stripped(str(key), f"{at} key", 200), f"{at} key")
            result[name] = _plain(item, f"{at}.{shortened(name)}", depth - 1)
        return result
    if isinstance(value, list):
        return [_plain(item, f"{at}[{i}]", depth - 1) for i, item in enumerate(value)]
    raise _refused(f"unsupported value of type {type(value).__name__}", at)


def _stripped(text: str, at: str, max_chars: int) -> str:
    text = text.strip()
    if len(text) > max_chars:
        raise _refused(f"{len(text):,} characters; at most {max_chars:,}", at)
    return text


def _plain_json(depth: int) -> AfterValidator:
    return AfterValidator(functools.partial(_plain, at="", depth=depth))


def _peft_config(config: dict[str, Any]) -> dict[str, Any]:
    if len(config) > MAX_ADAPTER_CONFIG_KEYS:
        raise _refused(f"more than {MAX_ADAPTER_CONFIG_KEYS} keys")
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or not peft_type:
        raise _refused("PEFT's adapter_config.json names it", ".peft_type")
    plain: dict[str, Any] = _plain(config, "", depth=3)
    return plain


PlainJson = Annotated[dict[str, Any], _plain_json(depth=3)]
FlatJson = Annotated[dict[str, Any], _plain_json(depth=1)]
PeftConfig = Annotated[dict[str, Any], AfterValidator(_peft_config)]

# --- the sections ---------------------------------------------------------------------------------


@with_config(STRICT)
class Scores(TypedDict):
    """Percentages (0–100); `average` is the unweighted mean of the three."""

    stem: Percent
    social_sciences: Percent
    humanities: Percent
    average: NotRequired[Percent]


@with_config(STRICT)
class SubjectCount(TypedDict):
    """One subject's result."""

    correct: Count
    total: Positive


@with_config(STRICT)
class Evaluation(TypedDict, total=False):
    """How the scores were obtained."""

    protocol: Label
    protocol_version: Label
    shots: Count
    split: Split
    subjects: dict[SubjectName, SubjectCount]
    answer_distribution: Annotated[dict[ShortName, Count], Field(max_length=16)]
    extra: Annotated[dict[ShortName, float], Field(max_length=64)]


@with_config(STRICT)
class Communication(TypedDict):
    """The whole federation's bytes (the ledger's sums)."""

    total_bytes: Positive
    downlink_bytes: NotRequired[Count]
    uplink_bytes: NotRequired[Count]


@with_config(STRICT)
class Adapter(TypedDict, total=False):
    """The adapter that produced the outputs: where it came from, the sha256 of its weights file
    (PEFT's `adapter_model.safetensors`, uploaded to the board beside the submission) and its PEFT
    `adapter_config.json`. With both, and a base model the board can load, the entry is verified."""

    location: Text
    sha256: Sha256
    config: PeftConfig


@with_config(STRICT)
class Privacy(TypedDict):
    """Client-level differential privacy of the run (`dp.*`); the board recomputes ε."""

    noise: Annotated[str, _text(20), _one_of(NOISE_MODES)]  # server (central) or client (local)
    noise_multiplier: Annotated[float, Field(ge=0, le=MAX_NOISE_MULTIPLIER)]
    clipping_norm: Annotated[float, Field(gt=0)]
    delta: Annotated[float, Field(gt=0, lt=1)]
    accounting: Annotated[str, _text(40), _one_of(ACCOUNTING)]
    releases: Annotated[list[Positive], Field(max_length=MAX_ROUNDS)]  # clients in each release
    epsilon: NotRequired[float | None]  # None: infinite (no noise)


@with_config(STRICT)
class Setup(TypedDict, total=False):
    """The federation's shape, shown on the entry."""

    dataset: Text
    num_clients: Positive
    rounds: Positive
    clients_per_round: Positive
    strategy: Text
    adapter: Text
    codec_downlink: Text
    codec_uplink: Text
    privacy: Privacy


@with_config(STRICT)
class RoundRecord(TypedDict):
    """One round of the ledger."""

    round: Positive
    train_loss: NotRequired[float | None]
    # The held-out loss after the round, where the run scored it: the curve that Cost-to-Target
    # reads (self-reported, as the bytes are).
    heldout_loss: NotRequired[Annotated[float, Field(ge=0)] | None]
    downlink_bytes: Count
    uplink_bytes: Count
    clients: NotRequired[Count]


@with_config(STRICT)
class SubmissionPayload(TypedDict, total=False):
    """A submission: the JSON body of `POST /api/entries` and of `submit --dry-run`.

    Every key is optional to the type checker (`runs` assembles a submission from partial ones);
    REQUIRED_KEYS are required of a submission the board checks (`PAYLOAD`)."""

    team: Name
    code_url: WebUrl
    base_model: Name
    track: Track
    date: IsoDate
    scores: Scores
    communication: Communication
    evaluation: Evaluation
    adapter: Adapter
    setup: Setup
    provenance: PlainJson
    config: FlatJson
    rounds: Annotated[list[RoundRecord], Field(max_length=MAX_ROUNDS)]
    # category → base64 of the official generation file (gzip or not)
    generations: dict[str, Base64File]
    # base64 of the loglik protocol's per-question predictions file
    predictions: Annotated[str, Field(description="the predictions file in base64")]


REQUIRED_KEYS = ("team", "code_url", "base_model", "communication")


def _complete(payload: SubmissionPayload) -> SubmissionPayload:
    for key in REQUIRED_KEYS:
        if key not in payload:
            raise _refused("missing", f".{key}")
    return payload


PAYLOAD: TypeAdapter[SubmissionPayload] = TypeAdapter(
    Annotated[SubmissionPayload, AfterValidator(_complete)]
)

# --- errors ---------------------------------------------------------------------------------------

_KINDS = {
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "dict_type": "a JSON object",
    "list_type": "a list",
}


def problem(error: ErrorDetails) -> tuple[str, str]:
    """The field (a dotted path: `rounds[0].train_loss`) and the reason of one of PAYLOAD's
    errors, in the words of the board's refusals."""
    loc = error["loc"]
    field = ""
    for part in loc:
        if part == "[key]":  # the key just named is at fault, not its value
            continue
        field += f"[{part}]" if isinstance(part, int) else f".{shortened(part)}"
    ctx = error.get("ctx") or {}
    field = (field + str(ctx.get("at", ""))).lstrip(".")
    return field, _reason(error, ctx)


def _reason(error: ErrorDetails, ctx: Mapping[str, Any]) -> str:
    kind, value, loc = error["type"], error["input"], error["loc"]
    declared = _declared(loc)
    description = _description(declared)
    if kind == "missing":
        return "missing"
    if kind == "extra_forbidden":
        section = _bare(_declared(loc[:-1]))
        allowed = ", ".join(sorted(_fields(section))) if is_typeddict(section) else ""
        return f"unknown field; allowed: {allowed}" if allowed else "unknown field"
    if kind == "float_type" and isinstance(value, int) and not isinstance(value, bool):
        beyond = _in_float_range(value)
        if beyond:
            return beyond
    if kind in _KINDS:
        expected = f"{description} ({_KINDS[kind]})" if description else _KINDS[kind]
        whole = "" if loc else "the submission "
        return f"{whole}must be {expected}, got {_shown(value)}"
    if kind == "finite_number":
        return "must be a finite number"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        if description:
            return f"{_number(value)} is not {description}"
        name = next((str(p) for p in reversed(loc) if isinstance(p, str)), "the value")
        bound = {
            "greater_than_equal": ("ge", "is below", ""),
            "greater_than": ("gt", "is not above", ""),
            "less_than_equal": ("le", "is too large: needs", "<="),
            "less_than": ("lt", "is too large: needs", "<"),
        }[kind]
        limit = _number(ctx[bound[0]])
        if bound[2]:
            return f"{_number(value)} {bound[1]} {name} {bound[2]} {limit}"
        return f"{_number(value)} {bound[1]} {limit}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_too_long":
        length = len(value.strip()) if isinstance(value, str) else ctx.get("max_length")
        return f"{length:,} characters; at most {ctx['max_length']:,}"
    if kind == "too_long":
        what = "keys" if ctx.get("field_type") == "Dictionary" else "items"
        actual = len(value) if isinstance(value, Mapping | list) else ctx.get("actual_length")
        counted = f"{actual:,} {what}" if isinstance(actual, int) else f"too many {what}"
        return f"{counted}; at most {ctx['max_length']:,}"
    if kind == "string_pattern_mismatch":
        return f"must be {description}" if description else f"must match {ctx.get('pattern')}"
    return str(error["msg"]).removeprefix("Value error, ")


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _shown(value)
    if isinstance(value, int):
        return _shown(value) if value.bit_length() > 100 else f"{value:,}"
    return f"{value:g}" if abs(value) >= 1e6 or value.is_integer() else repr(value)


def _shown(value: Any) -> str:
    """A submitted value as a refusal quotes it: short, and in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, int) and value.bit_length() > 100:  # over 30 digits
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1:,} digits"
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "…"


@functools.cache
def _fields(section: type) -> dict[str, Any]:
    return get_type_hints(section, include_extras=True)


def _bare(hint: Any) -> Any:
    """A declared type without Annotated, Required, NotRequired and None (of `X | None`)."""
    while True:
        origin = get_origin(hint)
        if origin is Annotated or origin is Required or origin is NotRequired:
            hint = get_args(hint)[0]
        elif type(None) in get_args(hint) and origin is not dict and origin is not list:
            hint = next(a for a in get_args(hint) if a is not type(None))
        else:
            return hint


def _declared(loc: Sequence[int | str]) -> Any:
    """The type declared at `loc` in a submission (with its Annotated metadata), None where the
    types do not go."""
    hint: Any = SubmissionPayload
    for i, part in enumerate(loc):
        if part == "[key]":
            continue
        bare = _bare(hint)
        if is_typeddict(bare):
            hint = _fields(bare).get(str(part))
        elif get_origin(bare) is dict:
            key, value = get_args(bare)
            hint = key if loc[i + 1 : i + 2] == ("[key]",) else value
        elif get_origin(bare) is list:
            hint = get_args(bare)[0]
        else:
            return None
        if hint is None:
            return None
    return hint


def _description(hint: Any) -> str:
    """The description a declared type gives its values ("" for none)."""
    while get_origin(hint) in (Required, NotRequired):
        hint = get_args(hint)[0]
    if get_origin(hint) is not Annotated:
        return ""
    for meta in reversed(get_args(hint)[1:]):
        if isinstance(meta, FieldInfo) and meta.description:
            return meta.description
    return ""

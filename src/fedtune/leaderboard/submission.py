"""The submission format, as types: what `submit` writes (`runs.build_submission`) and what the
board accepts (`validation.check_submission`, which takes every allowed key from these types and
refuses any other). Every key is optional to the type checker; which ones are required, and the
values' ranges, is `validation`'s business (documented there).
"""

from __future__ import annotations

from typing import Any, TypedDict


class Scores(TypedDict, total=False):
    """Percentages (0–100); `average` is the unweighted mean of the three."""

    stem: float
    social_sciences: float
    humanities: float
    average: float


class SubjectCount(TypedDict):
    """One subject's result."""

    correct: int
    total: int


class Evaluation(TypedDict, total=False):
    """How the scores were obtained."""

    protocol: str
    protocol_version: str
    shots: int
    split: str
    subjects: dict[str, SubjectCount]
    answer_distribution: dict[str, int]
    extra: dict[str, float]


class Communication(TypedDict, total=False):
    """The whole federation's bytes (the ledger's sums)."""

    total_bytes: int
    downlink_bytes: int
    uplink_bytes: int


class Adapter(TypedDict, total=False):
    """The adapter that produced the outputs: where it came from, the sha256 of its weights file
    (PEFT's `adapter_model.safetensors`, uploaded to the board beside the submission) and its PEFT
    `adapter_config.json`. With both, and a base model the board can load, the entry is verified."""

    location: str
    sha256: str
    config: dict[str, Any]


class Privacy(TypedDict, total=False):
    """Client-level differential privacy of the run (`dp.*`); the board recomputes ε."""

    noise: str  # server (central) or client (local)
    noise_multiplier: float
    clipping_norm: float
    delta: float
    accounting: str  # no-amplification or without-replacement
    releases: list[int]  # clients aggregated in each round's release
    epsilon: float | None  # None: infinite (no noise)


class Setup(TypedDict, total=False):
    """The federation's shape, shown on the entry."""

    dataset: str
    num_clients: int
    rounds: int
    clients_per_round: int
    strategy: str
    adapter: str
    codec_downlink: str
    codec_uplink: str
    privacy: Privacy


class RoundRecord(TypedDict, total=False):
    """One round of the ledger."""

    round: int
    train_loss: float | None
    downlink_bytes: int
    uplink_bytes: int
    clients: int


class SubmissionPayload(TypedDict, total=False):
    """A submission: the JSON body of `POST /api/entries` and of `submit --dry-run`."""

    team: str
    code_url: str
    base_model: str
    track: str
    date: str
    scores: Scores
    communication: Communication
    evaluation: Evaluation
    adapter: Adapter
    setup: Setup
    provenance: dict[str, Any]
    config: dict[str, Any]
    rounds: list[RoundRecord]
    generations: dict[str, str]  # category → base64 of the official generation file
    predictions: str  # base64 of the loglik protocol's per-question predictions file


def keys(section: type) -> frozenset[str]:
    """The keys a section of the format allows."""
    return frozenset(section.__annotations__)

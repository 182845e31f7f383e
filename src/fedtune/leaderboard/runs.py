"""From a run directory to a submission: collect, cross-check, refuse what does not add up.

A run is refused, with the reason, when:
- it did not finish (status.json not "completed", "stopped-budget" or "stopped-privacy-budget");
- its ledger is missing, unreadable, or its totals differ from summary.json (or from the per-round
  metrics), or a completed round has no ledger line;
- its adapter on disk is not the one summary.json names (sha256), or the evaluation was of another
  adapter (sha256 or path);
- the evaluation is partial (flagged incomplete, or fewer questions than the test split; the latter
  is checked by `validation`);
- the track's rules are broken (General NLP: Alpaca-GPT4, 20 clients, the `flowertune` protocol;
  also checked by `validation`, which the server repeats).
"""

from __future__ import annotations

import base64
import gzip
import json
import math
import shlex
from pathlib import Path
from typing import Any

from fedtune.evaluation.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from fedtune.evaluation.metrics import percent
from fedtune.evaluation.subjects import SCORED_CATEGORIES
from fedtune.leaderboard.entry import today_utc
from fedtune.leaderboard.evalresults import (
    EvalResults,
    EvalResultsError,
    find_results,
    read_results,
)
from fedtune.leaderboard.submission import (
    Adapter,
    Privacy,
    RoundRecord,
    Scores,
    Setup,
    SubmissionPayload,
)
from fedtune.model.variants import variant_label
from fedtune.provenance import file_sha256
from fedtune.rundir import (
    FINISHED_STATES,
    LEDGER_FILE,
    METRICS_FILE,
    STATUS_FILE,
    RunDirError,
    SummaryRow,
    read_environment,
    read_jsonl,
    read_run_config,
    read_status,
    read_summary,
)

# Display names of the embedded models (the board shows the model's own name, not a hub id).
EMBEDDED_MODEL_NAMES = {"embedded:smollm2-135m-instruct": "SmolLM2-135M-Instruct"}


def _count(row: dict[str, Any], key: str, where: str) -> int:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RunDirError(f"{where}: {key} must be a non-negative integer, got {value!r}")
    return value


def check_ledger(run_dir: Path, summary: SummaryRow) -> list[dict[str, Any]]:
    """Check the ledger against summary.json (and metrics.jsonl if present); return per-round rows.

    Returns:
        One row per round: round, downlink_bytes, uplink_bytes, clients, train_loss (or None).
    Raises:
        RunDirError: missing or inconsistent ledger.
    """
    ledger_path = run_dir / LEDGER_FILE
    if not ledger_path.is_file():
        raise RunDirError(f"no communication ledger (ledger.jsonl) in {run_dir}")
    per_round: dict[int, dict[str, int]] = {}
    for i, row in enumerate(read_jsonl(ledger_path), start=1):
        where = f"ledger.jsonl line {i}"
        number = _count(row, "round", where)
        cell = per_round.setdefault(number, {"downlink_bytes": 0, "uplink_bytes": 0, "clients": 0})
        cell["downlink_bytes"] += _count(row, "downlink_bytes", where)
        cell["uplink_bytes"] += _count(row, "uplink_bytes", where)
        cell["clients"] += 1
    if not per_round:
        raise RunDirError("the communication ledger (ledger.jsonl) is empty")
    rounds_completed = summary.get("rounds_completed")
    if isinstance(rounds_completed, int):
        missing = sorted(set(range(1, rounds_completed + 1)) - set(per_round))
        extra = sorted(set(per_round) - set(range(1, rounds_completed + 1)))
        if missing or extra:
            raise RunDirError(
                f"the ledger does not cover rounds 1–{rounds_completed}: "
                f"missing {missing[:5]}, unexpected {extra[:5]}"
            )
    comm = summary.get("communication")
    if not isinstance(comm, dict):
        raise RunDirError("summary.json has no communication totals")
    down = sum(c["downlink_bytes"] for c in per_round.values())
    up = sum(c["uplink_bytes"] for c in per_round.values())
    for key, value in (("downlink_bytes", down), ("uplink_bytes", up), ("total_bytes", down + up)):
        if comm.get(key) != value:
            raise RunDirError(
                f"ledger and summary disagree: the ledger's {key} add up to {value:,}, "
                f"summary.json says {comm.get(key)!r}"
            )
    losses, heldout = _check_metrics(run_dir, per_round)
    return [
        {"round": r, **per_round[r], "train_loss": losses.get(r), "heldout_loss": heldout.get(r)}
        for r in sorted(per_round)
    ]


def _check_metrics(
    run_dir: Path, per_round: dict[int, dict[str, int]]
) -> tuple[dict[int, float | None], dict[int, float]]:
    """Each round's train loss (None where it has none) and, where scored, held-out loss."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return {}, {}
    losses: dict[int, float | None] = {}
    heldout: dict[int, float] = {}
    for row in read_jsonl(path):
        number = row.get("round")
        if number not in per_round:
            raise RunDirError(f"metrics.jsonl has round {number!r}, which the ledger does not")
        for key in ("downlink_bytes", "uplink_bytes"):
            if key in row and row[key] != per_round[number][key]:
                raise RunDirError(
                    f"metrics.jsonl round {number}: {key} {row[key]!r} but the ledger adds up "
                    f"to {per_round[number][key]:,}"
                )
        loss = row.get("train_loss")
        losses[number] = float(loss) if isinstance(loss, int | float) else None
        scored = row.get("heldout_loss")
        if isinstance(scored, int | float) and math.isfinite(scored):
            heldout[number] = float(scored)
    return losses, heldout


def check_adapter(run_dir: Path, summary: SummaryRow, results: EvalResults) -> Adapter:
    """The run's final adapter, checked on disk and against what was evaluated.

    Raises:
        RunDirError: the adapter changed since the run, or the evaluation is of another adapter.
    """
    relative = summary.get("adapter") or "adapter"
    recorded = summary.get("adapter_sha256")
    weights = run_dir / str(relative) / ADAPTER_WEIGHTS
    if not isinstance(recorded, str) or not recorded:
        raise RunDirError("summary.json does not record the adapter's sha256 (adapter_sha256)")
    if not weights.is_file():
        raise RunDirError(f"the run's adapter is missing: {weights}")
    actual = file_sha256(weights)
    if actual != recorded:
        raise RunDirError(
            f"{weights} has sha256 {actual[:12]}…, summary.json records {recorded[:12]}…: "
            "the adapter changed after the run"
        )
    if results.without_adapter:
        raise RunDirError(
            f"the evaluation ({results.path.name}) is of the base model alone, not of this run's "
            f"adapter: evaluate with --adapter {run_dir}"
        )
    if results.adapter_sha256:
        if results.adapter_sha256 != recorded:
            raise RunDirError(
                f"the evaluation is of another adapter (sha256 {results.adapter_sha256[:12]}…, "
                f"the run's is {recorded[:12]}…)"
            )
    elif isinstance(results.adapter_path, str) and results.adapter_path:
        evaluated = Path(results.adapter_path)
        if not evaluated.is_absolute():
            evaluated = run_dir / evaluated
        if evaluated.resolve() != (run_dir / str(relative)).resolve():
            raise RunDirError(
                f"the evaluation is of another adapter ({results.adapter_path}, "
                f"the run's is {relative})"
            )
    else:
        raise RunDirError(
            f"{results.path.name} does not say which adapter was evaluated (adapter sha256 or path)"
        )
    config_path = run_dir / str(relative) / ADAPTER_CONFIG
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunDirError(f"cannot read the adapter's PEFT config {config_path}: {exc}") from exc
    if not isinstance(config, dict):
        raise RunDirError(f"{config_path} is not a JSON object")
    return Adapter(location=str(run_dir / str(relative)), sha256=recorded, config=config)


def adapter_weights(payload: SubmissionPayload) -> Path | None:
    """The weights file of a submission's adapter (uploaded beside it), or None."""
    location = payload.get("adapter", {}).get("location")
    return Path(location) / ADAPTER_WEIGHTS if location else None


def display_model_name(name: str) -> str:
    """The board's name of a base model: the embedded model's name, or a hub id without its org."""
    if name in EMBEDDED_MODEL_NAMES:
        return EMBEDDED_MODEL_NAMES[name]
    return name.rstrip("/").split("/")[-1] if "/" in name and not name.startswith("/") else name


def build_submission(
    run_dir: str | Path,
    *,
    team: str,
    code_url: str,
    track: str,
    base_model: str | None = None,
    eval_name: str | None = None,
) -> SubmissionPayload:
    """Collect and cross-check a run directory into a submission (see validation.py's shape).

    Raises:
        RunDirError: the run is unfinished, its ledger or adapter do not add up, or its
            evaluation is partial or of another adapter.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is not a directory")
    if (run_dir / STATUS_FILE).is_file():
        state = read_status(run_dir).get("state")
        if state not in FINISHED_STATES:
            raise RunDirError(f"the run has not finished (status.json state {state!r})")
    config, config_digest = read_run_config(run_dir)
    summary = read_summary(run_dir)
    environment = read_environment(run_dir)
    rounds = check_ledger(run_dir, summary)
    try:
        results = read_results(find_results(run_dir, eval_name))
    except EvalResultsError as exc:
        raise RunDirError(str(exc)) from exc
    if results.complete is False:
        raise RunDirError(f"partial evaluation: {results.path} is marked incomplete")
    adapter = check_adapter(run_dir, summary, results)
    comm = summary["communication"]
    clients_per_round = max((r["clients"] for r in rounds), default=0)
    model_name = base_model or display_model_name(
        str(results.base_model or config.get("model.name", ""))
    )
    git = environment.get("git") or {}
    command = environment.get("command")
    return {
        "team": team,
        "code_url": code_url,
        "base_model": model_name,
        "track": track,
        "date": today_utc(),
        "scores": _scores(results),
        "communication": {
            "total_bytes": comm["total_bytes"],
            "downlink_bytes": comm["downlink_bytes"],
            "uplink_bytes": comm["uplink_bytes"],
        },
        "evaluation": {
            "protocol": results.protocol,
            "protocol_version": results.protocol_version,
            **({"shots": results.shots} if results.shots is not None else {}),
            "split": results.split,
            "subjects": results.subjects,
            "answer_distribution": results.answer_distribution,
            "extra": results.extra,
        },
        "adapter": adapter,
        "setup": _setup(config, len(rounds), clients_per_round, summary),
        "provenance": {
            "run": run_dir.name,
            "config_digest": config_digest,
            "commit": git.get("commit"),
            "dirty": git.get("dirty"),
            "command": shlex.join(command) if isinstance(command, list) else command,
            "versions": environment.get("packages") or {},
            "python": environment.get("python"),
            "device": environment.get("device"),
            "started_at": environment.get("started_at"),
            "evaluation_file": str(results.path.relative_to(run_dir)),
        },
        "config": {k: v for k, v in config.items() if not isinstance(v, dict | list)},
        "rounds": [_round_record(r) for r in rounds],
        **_generations(results),
    }


def _round_record(row: dict[str, Any]) -> RoundRecord:
    """One round of the submission; its held-out loss where the run scored one."""
    record = RoundRecord(
        round=row["round"],
        train_loss=row["train_loss"],
        downlink_bytes=row["downlink_bytes"],
        uplink_bytes=row["uplink_bytes"],
        clients=row["clients"],
    )
    if row["heldout_loss"] is not None:
        record["heldout_loss"] = row["heldout_loss"]
    return record


def generation_files(results: EvalResults) -> dict[str, Path]:
    """The official evaluation's generation file of each scored category, written beside its
    result file by `fedtune eval --protocol flowertune` (`generation_mmlu_{category}_{run}.jsonl`);
    empty for another protocol or when any of them is missing."""
    prefix = "mmlu_flowertune_0shot_"
    name = results.path.stem
    if results.protocol != "flowertune" or not name.startswith(prefix):
        return {}
    run = name.removeprefix(prefix)
    files = {
        category: results.path.with_name(f"generation_mmlu_{category}_{run}.jsonl")
        for category in SCORED_CATEGORIES
    }
    return files if all(path.is_file() for path in files.values()) else {}


def predictions_file(results: EvalResults) -> Path | None:
    """The per-question predictions `fedtune eval --protocol loglik` writes beside its result file
    (`predictions_mmlu_loglik_{shots}shot_{run}.jsonl`), or None."""
    name = results.path.stem
    prefix = "mmlu_"
    if results.protocol != "loglik" or not name.startswith(prefix):
        return None
    path = results.path.with_name(f"predictions_{name}.jsonl")
    return path if path.is_file() else None


def _generations(results: EvalResults) -> SubmissionPayload:
    """The submission's `generations` (gzip, base64) or `predictions`, so the board scores the
    entry itself."""
    predictions = predictions_file(results)
    if predictions is not None:
        try:
            content = predictions.read_bytes()
        except OSError as exc:
            raise RunDirError(f"cannot read {predictions}: {exc}") from exc
        packed = gzip.compress(content, compresslevel=9, mtime=0)
        return {"predictions": base64.b64encode(packed).decode("ascii")}
    files = generation_files(results)
    if not files:
        return {}
    encoded = {}
    for category, path in files.items():
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise RunDirError(f"cannot read {path}: {exc}") from exc
        packed = gzip.compress(content, compresslevel=9, mtime=0)
        encoded[category] = base64.b64encode(packed).decode("ascii")
    return {"generations": encoded}


def _setup(
    config: dict[str, Any], num_rounds: int, clients_per_round: int, summary: SummaryRow
) -> Setup:
    setup: Setup = {"dataset": str(config.get("data.name", "")), "rounds": num_rounds}
    if isinstance(config.get("federation.num-clients"), int):
        setup["num_clients"] = config["federation.num-clients"]
    if clients_per_round:
        setup["clients_per_round"] = clients_per_round
    setup["strategy"] = str(summary.get("strategy") or config.get("strategy.name", "fedavg"))
    variant = str(config.get("model.lora.variant", "lora"))
    kind = "DoRA" if config.get("model.lora.use-dora") else variant_label(variant)
    setup["adapter"] = (
        f"{kind} r={config.get('model.lora.peft-lora-r')} "
        f"alpha={config.get('model.lora.peft-lora-alpha')} on {config.get('model.lora.target-modules')}"
    )
    if config.get("model.lora.client-ranks"):
        setup["adapter"] += f", client ranks {config['model.lora.client-ranks']}"
    codecs = summary.get("codecs") or {}
    setup["codec_downlink"] = str(codecs.get("downlink", "identity"))
    setup["codec_uplink"] = str(codecs.get("uplink", "identity"))
    privacy = summary.get("privacy")
    if isinstance(privacy, dict):
        setup["privacy"] = Privacy(
            noise=str(privacy["noise"]),
            noise_multiplier=float(privacy["noise_multiplier"]),
            clipping_norm=float(privacy["clipping_norm"]),
            delta=float(privacy["delta"]),
            accounting=str(privacy["accounting"]),
            releases=[int(n) for n in privacy["releases"]],
            epsilon=privacy["epsilon"],
        )
    return setup


def _scores(results: EvalResults) -> Scores:
    """Category scores in percent from the per-subject counts (the numbers exist once)."""
    from fedtune.evaluation.subjects import SCORED_CATEGORIES, SUBJECT_CATEGORY

    scores = {}
    for category in SCORED_CATEGORIES:
        cells = [c for s, c in results.subjects.items() if SUBJECT_CATEGORY[s] == category]
        try:
            total = sum(int(c["total"]) for c in cells)
            correct = sum(int(c["correct"]) for c in cells)
        except (TypeError, ValueError) as exc:
            raise RunDirError(f"{results.path}: per-subject counts are not integers") from exc
        if total == 0:
            raise RunDirError(f"partial evaluation: no {category} questions were evaluated")
        scores[category] = percent(correct, total)
    return Scores(
        stem=scores["stem"],
        social_sciences=scores["social_sciences"],
        humanities=scores["humanities"],
    )

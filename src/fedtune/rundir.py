"""The run directory: one owner for its format, the writer and the readers.

A run describes itself (config, environment, status, per-round metrics, per-client rows, the
communication ledger, summary, adapters, checkpoints). Layout: docs/run-directory.md.

Crash safety. Files that are rewritten (status, summary, adapters, checkpoints) are written to a
temporary name and renamed, so a reader never sees half a file. The three logs (metrics, clients,
ledger) are appended; every resume point records their byte sizes, and a resumed run cuts them
back to those sizes, so each round appears exactly once whatever moment the run was killed at.
A resume point is a new directory made visible by rewriting one small pointer file: a kill at
any moment leaves either the previous point or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import socket
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, cast

from fedtune.provenance import file_sha256, git_commit, package_versions

if TYPE_CHECKING:
    from fedtune.config import RunConfig

CONFIG_FILE = "config.json"
ENVIRONMENT_FILE = "environment.json"
STATUS_FILE = "status.json"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
CLIENTS_FILE = "clients.jsonl"
LEDGER_FILE = "ledger.jsonl"
LOG_FILES = (METRICS_FILE, CLIENTS_FILE, LEDGER_FILE)
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CHECKPOINTS_DIR = "checkpoints"
RESUME_POINTER = "resume-point"  # under checkpoints/: the name of the current resume point

# How a run ended. Finished runs can be evaluated and submitted; the others can be resumed.
FINISHED_STATES = ("completed", "stopped-budget", "stopped-privacy-budget")
ENDED_STATES = (*FINISHED_STATES, "failed", "interrupted", "terminated")
# States a live process writes; with a dead pid they mean the run was killed.
LIVE_STATES = ("created", "resuming", "running")


class StatusRow(TypedDict, total=False):
    """status.json (docs/run-directory.md)."""

    state: str
    rounds_completed: int
    pid: int
    host: str
    updated_at: str
    error: str
    resumable: bool
    previous_state: str
    previous_error: str


class MetricsRow(TypedDict, total=False):
    """One round of metrics.jsonl."""

    round: int
    attempts: int
    clients: int
    failed_clients: int
    train_loss: float | None
    examples: int
    tokens: int
    response_tokens: int
    learning_rate: float
    downlink_bytes: int
    uplink_bytes: int
    cumulative_bytes: int
    probe_loss: float
    heldout_loss: float
    mmlu: dict[str, Any]
    dp_epsilon: float | None
    seconds: float


class ClientRow(TypedDict, total=False):
    """One client's reply (or why it was dropped) in one attempt of a round: clients.jsonl."""

    round: int
    attempt: int
    node_id: int
    partition_id: int
    problem: str
    train_loss: float
    examples: int
    num_examples: int
    tokens: int
    response_tokens: int
    padded_tokens: int
    learning_rate: float
    seconds: float
    skipped_rows: int
    update_norm: float
    ignored_metrics: list[str]


class LedgerRow(TypedDict, total=False):
    """One client message pair of one attempt: ledger.jsonl (the communication ledger)."""

    round: int
    attempt: int
    node_id: int
    partition_id: int
    downlink_bytes: int
    uplink_bytes: int
    downlink_arrays: int
    uplink_arrays: int
    downlink_wire_bytes: int
    uplink_wire_bytes: int


class SummaryRow(TypedDict, total=False):
    """summary.json: what a finished (or stopped) run did (docs/run-directory.md)."""

    state: str
    rounds_completed: int
    rounds_planned: int
    clients_per_round: int
    num_clients: int
    strategy: str
    codecs: dict[str, str]
    adapter_parameters: int
    adapter_tensors: int
    message_payload_bytes: int
    communication: dict[str, Any]
    final_train_loss: float | None
    final_heldout_loss: float | None
    dropped_replies: int
    retried_rounds: int
    resumes: list[dict[str, Any]]
    server_eval: dict[str, Any]
    adapter: str
    adapter_sha256: str
    config_digest: str
    seconds: float
    privacy: dict[str, Any] | None
    checkpoint_seconds: dict[str, Any]


class RunDirError(ValueError):
    """A run directory that cannot be created, read or used as asked; the message says why."""


def now_utc() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def write_json_atomic(path: Path, payload: Any, durable: bool = False) -> None:
    """Write JSON to a temporary name and rename it over `path` (fsync'd when `durable`)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(payload, indent=2) + "\n")
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append_jsonl(path: Path, rows: list[Any]) -> None:
    """Append rows as JSON Lines in one write."""
    if rows:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(row) + "\n" for row in rows))


def read_json(path: Path) -> Any:
    """Parse a JSON file. Raises RunDirError naming the file when it is missing or broken."""
    if not path.is_file():
        raise RunDirError(f"{path.name} is missing from {path.parent}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise RunDirError(f"{path} is not valid JSON: {exc}") from exc


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every JSON object of a JSON Lines file. Raises RunDirError naming the bad line."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise RunDirError(f"{path.name} line {number} is not JSON: {exc}") from exc
        if not isinstance(row, dict):
            raise RunDirError(f"{path.name} line {number} is not a JSON object")
        rows.append(row)
    return rows


def read_run_config(run_dir: Path) -> tuple[dict[str, Any], str | None]:
    """(flat resolved config, digest) from config.json."""
    doc = read_json(Path(run_dir) / CONFIG_FILE)
    config = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(config, dict):
        raise RunDirError(f"{CONFIG_FILE} has no resolved configuration ('config')")
    return config, doc.get("digest")


def read_status(run_dir: Path) -> StatusRow:
    status = read_json(Path(run_dir) / STATUS_FILE)
    if not isinstance(status, dict) or "state" not in status:
        raise RunDirError(f"{STATUS_FILE} in {run_dir} has no state")
    return status  # type: ignore[return-value]


def _log(run_dir: Path, name: str) -> list[Any]:
    path = Path(run_dir) / name
    return read_jsonl(path) if path.is_file() else []


def read_metrics(run_dir: Path) -> list[MetricsRow]:
    """metrics.jsonl, one row per round ([] before the first round)."""
    return _log(run_dir, METRICS_FILE)


def read_clients(run_dir: Path) -> list[ClientRow]:
    """clients.jsonl, one row per client per attempt ([] before the first round)."""
    return _log(run_dir, CLIENTS_FILE)


def read_ledger(run_dir: Path) -> list[LedgerRow]:
    """ledger.jsonl, the communication ledger ([] before the first round)."""
    return _log(run_dir, LEDGER_FILE)


def read_summary(run_dir: Path) -> SummaryRow:
    summary = read_json(Path(run_dir) / SUMMARY_FILE)
    if not isinstance(summary, dict):
        raise RunDirError(f"{SUMMARY_FILE} in {run_dir} is not a JSON object")
    return cast(SummaryRow, summary)


def read_environment(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / ENVIRONMENT_FILE
    return read_json(path) if path.is_file() else {}


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------------
# The writer
# --------------------------------------------------------------------------------------------


class RunDirectory:
    """Writes one run's artefacts. Create it only after the configuration has been validated."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._status_lock = threading.Lock()

    @staticmethod
    def check_new(config: RunConfig) -> Path:
        """Where `create` would make the run; checked before any slow preparation.

        Raises:
            RunDirError: the directory already exists.
        """
        root = Path(config.run.output_dir).expanduser()
        name = config.run.name or dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
        path = (root / name).resolve()
        if path.exists():
            raise RunDirError(f"run directory {path} already exists; choose another run.name")
        return path

    @classmethod
    def create(cls, config: RunConfig, command: list[str] | None = None) -> RunDirectory:
        """Make the directory and write config.json, environment.json and status.json.

        Raises:
            RunDirError: the directory already exists or cannot be made.
        """
        path = cls.check_new(config)
        try:
            path.mkdir(parents=True)
        except OSError as exc:
            raise RunDirError(f"cannot create run directory {path}: {exc}") from exc
        run_dir = cls(path)
        write_json_atomic(
            path / CONFIG_FILE, {"config": config.to_flat(), "digest": config.digest()}
        )
        write_json_atomic(path / ENVIRONMENT_FILE, environment(config, command))
        run_dir.set_status("created", rounds_completed=0)
        return run_dir

    @classmethod
    def open_for_resume(cls, path: str | Path) -> RunDirectory:
        """An existing run that may be resumed: not finished, not running in another process.

        Raises:
            RunDirError: not a run directory, already finished, or still running.
        """
        root = Path(path).expanduser().resolve()
        if not (root / CONFIG_FILE).is_file():
            raise RunDirError(f"--resume: {root} is not a fedtune run directory (no {CONFIG_FILE})")
        status = read_status(root)
        state = status["state"]
        if state in FINISHED_STATES:
            raise RunDirError(f"--resume: the run in {root} already ended ({state}); nothing to do")
        pid, host = status.get("pid"), status.get("host")
        if (
            state in LIVE_STATES
            and isinstance(pid, int)
            and host == socket.gethostname()
            and pid != os.getpid()
            and process_alive(pid)
        ):
            raise RunDirError(f"--resume: the run in {root} is still running (process {pid})")
        return cls(root)

    def claim_for_resume(self) -> None:
        """Mark the run as being resumed by this process, so a second `--resume` is refused
        while this one starts (model loading and the engine's start take a while).

        Raises:
            RunDirError: status.json cannot be written (a read-only or full disk).
        """
        previous = self.status()
        try:
            self.set_status(
                "resuming",
                rounds_completed=int(previous.get("rounds_completed", 0)),
                resumable=True,
                previous_state=previous.get("state"),
                previous_error=previous.get("error"),
            )
        except OSError as exc:
            raise RunDirError(f"--resume: cannot write {self.path / STATUS_FILE}: {exc}") from exc

    # ---- status ----------------------------------------------------------------------------

    def status(self) -> StatusRow:
        return read_status(self.path)

    def record_device(self) -> None:
        """Fill in environment.json's device fields, from the process that trains, once."""
        path = self.path / ENVIRONMENT_FILE
        recorded = read_environment(self.path)
        if recorded.get("device") is None:
            write_json_atomic(path, {**recorded, **device_fields()})

    def set_status(self, state: str, **details: Any) -> None:
        """Rewrite status.json. Keeps `pid`/`host` of the writer so a resume can tell a dead run
        from a live one. When the disk refuses a new file (full, quota), the existing file is
        overwritten in place: it needs no new block, so the end of a run is still recorded."""
        payload = {
            "state": state,
            "updated_at": now_utc(),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            **details,
        }
        path = self.path / STATUS_FILE
        with self._status_lock:
            try:
                write_json_atomic(path, payload)
            except OSError:
                _overwrite_in_place(path, json.dumps(payload))

    # ---- logs --------------------------------------------------------------------------------

    def log_round(self, metrics: dict[str, Any], clients: list[dict[str, Any]]) -> None:
        append_jsonl(self.path / CLIENTS_FILE, clients)
        append_jsonl(self.path / METRICS_FILE, [metrics])

    @property
    def ledger_path(self) -> Path:
        return self.path / LEDGER_FILE

    def log_positions(self) -> dict[str, int]:
        """Byte size of each log: where a resumed run continues them."""
        return {
            name: (self.path / name).stat().st_size if (self.path / name).exists() else 0
            for name in LOG_FILES
        }

    def log_tail(self, name: str, position: int) -> list[dict[str, Any]]:
        """The complete JSON lines of a log after byte `position` (what a cut would drop);
        a torn last line or an unreadable one is skipped."""
        path = self.path / name
        if not path.exists():
            return []
        with open(path, "rb") as handle:
            handle.seek(position)
            tail = handle.read()
        rows = []
        for line in tail.split(b"\n")[:-1]:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def cut_logs(self, positions: Mapping[str, int]) -> dict[str, int]:
        """Cut each log back to a recorded size (what a killed run wrote after it is dropped).

        Returns:
            Bytes dropped per file.
        Raises:
            RunDirError: a log is shorter than recorded (it was edited or lost).
        """
        dropped = {}
        for name in LOG_FILES:
            path = self.path / name
            size = path.stat().st_size if path.exists() else 0
            keep = int(positions.get(name, 0))
            if size < keep:
                raise RunDirError(
                    f"{name} holds {size:,} bytes but the resume point recorded {keep:,}: "
                    "the log was changed after the run; cannot resume safely"
                )
            if path.exists():
                with open(path, "r+b") as handle:
                    handle.truncate(keep)
            dropped[name] = size - keep
        return dropped

    # ---- adapters and checkpoints --------------------------------------------------------------

    def write_adapter(self, target: Path, state: dict[str, Any], peft_config: Any) -> str:
        """Write a PEFT-format adapter directory atomically; return the weights' sha256."""
        from safetensors.torch import save_file

        staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        with _removed_on_error(staging):
            peft_config.save_pretrained(str(staging))
            save_file(state, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            digest = file_sha256(staging / ADAPTER_WEIGHTS)
        if target.exists():
            # Renaming over a non-empty directory is not possible: move the old one aside first.
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
        return digest

    def write_snapshot(self, server_round: int, state: dict[str, Any], peft_config: Any) -> str:
        """checkpoints/round-NNNNN/: the global adapter in PEFT format (the board's checkpoints)."""
        folder = self.path / CHECKPOINTS_DIR / f"round-{server_round:05d}"
        folder.parent.mkdir(exist_ok=True)
        return self.write_adapter(folder, state, peft_config)

    def write_resume_point(
        self,
        server_round: int,
        tensors: dict[str, Any],
        state: dict[str, Any],
    ) -> Path:
        """checkpoints/state-NNNNN/{tensors.safetensors, state.json}, then the pointer.

        Args:
            tensors: name → torch tensor (global adapter, strategy state), saved bit for bit.
            state: JSON-ready loop state (round, RNG, ledger and log positions, history).
        Returns:
            The resume point's directory.
        """
        from safetensors.torch import save_file

        checkpoints = self.path / CHECKPOINTS_DIR
        checkpoints.mkdir(exist_ok=True)
        name = f"state-{server_round:05d}"
        staging = checkpoints / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        with _removed_on_error(staging):
            save_file(tensors, str(staging / "tensors.safetensors"))
            _fsync_file(staging / "tensors.safetensors")
            payload = {
                **state,
                "round": server_round,
                "tensors_sha256": file_sha256(staging / "tensors.safetensors"),
                "written_at": now_utc(),
            }
            write_json_atomic(staging / "state.json", payload, durable=True)
        final = checkpoints / name
        if final.exists():  # a point for this round written before a kill: replace it
            shutil.rmtree(final)
        os.replace(staging, final)
        pointer = checkpoints / RESUME_POINTER
        tmp = checkpoints / f".{RESUME_POINTER}.tmp-{os.getpid()}"
        tmp.write_text(name + "\n", encoding="utf-8")
        _fsync_file(tmp)
        os.replace(tmp, pointer)
        for old in checkpoints.glob("state-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        for stale in checkpoints.glob(".state-*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return final

    def read_resume_point(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(state, tensors) of the latest resume point, or None before the first one.

        Raises:
            RunDirError: the pointer names a point that is missing or whose tensors changed.
        """
        from safetensors.torch import load_file

        pointer = self.path / CHECKPOINTS_DIR / RESUME_POINTER
        if not pointer.is_file():
            return None
        folder = self.path / CHECKPOINTS_DIR / pointer.read_text(encoding="utf-8").strip()
        state = read_json(folder / "state.json")
        tensors_file = folder / "tensors.safetensors"
        if not tensors_file.is_file() or file_sha256(tensors_file) != state.get("tensors_sha256"):
            raise RunDirError(f"resume point {folder} is damaged (tensors missing or changed)")
        return state, load_file(str(tensors_file))

    def write_summary(self, summary: SummaryRow) -> None:
        write_json_atomic(self.path / SUMMARY_FILE, summary)


@contextlib.contextmanager
def _removed_on_error(staging: Path) -> Iterator[None]:
    """A half-written staging directory is removed (on a full disk, that frees its space)."""
    try:
        yield
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _overwrite_in_place(path: Path, text: str) -> None:
    """Rewrite a small existing file without allocating: pad with spaces to its old length."""
    with open(path, "r+b") as handle:
        old_size = os.fstat(handle.fileno()).st_size
        data = text.encode("utf-8")
        data += b" " * max(0, old_size - len(data))
        handle.seek(0)
        handle.write(data)
        handle.flush()


def device_fields() -> dict[str, Any]:
    """The device the training process sees (needs torch: filled in by that process)."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "device": "cuda" if cuda else "cpu",
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "torch_threads": torch.get_num_threads(),
    }


def environment(config: RunConfig, command: list[str] | None) -> dict[str, Any]:
    """What the run ran on: versions, commit, command, seeds. The device fields are filled in by
    the process that trains (`RunDirectory.record_device`): `fedtune run` itself never imports
    torch, which would cost it ~0.2 GB for the whole run."""
    return {
        "started_at": now_utc(),
        "command": command if command is not None else list(sys.argv),
        "cwd": os.getcwd(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": None,
        "gpu": None,
        "torch_threads": None,
        "packages": package_versions(),
        "git": git_commit(),
        "seeds": {"train.seed": config.train.seed, "data.seed": config.data.seed},
        "config_digest": config.digest(),
    }

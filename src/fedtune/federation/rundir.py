"""The run directory: a run describes itself (config, environment, metrics, ledger, checkpoints).

Layout: docs/run-directory.md. Files that are rewritten (status, summary, checkpoints) are written
to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from fedtune.config import RunConfig

PACKAGES = (
    "fedtune",
    "flwr",
    "flwr-datasets",
    "torch",
    "transformers",
    "peft",
    "datasets",
    "safetensors",
    "numpy",
)


class RunDirError(ValueError):
    """The run directory cannot be created or read."""


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def append_jsonl(path: Path, payload: Any) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(payload) + "\n")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit(start: Path | None = None) -> dict[str, Any]:
    """Commit and dirtiness of the fedtune source tree (None outside a git checkout)."""
    where = start or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class RunDirectory:
    """Writes one run's artefacts. Create it only after the configuration has been validated."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, config: RunConfig, command: list[str] | None = None) -> RunDirectory:
        """Make the directory and write config.json, environment.json and status.json.

        Raises:
            RunDirError: the directory already exists or cannot be made.
        """
        root = Path(config.run.output_dir).expanduser()
        name = config.run.name or dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
        path = (root / name).resolve()
        if path.exists():
            raise RunDirError(f"run directory {path} already exists; choose another run.name")
        try:
            path.mkdir(parents=True)
        except OSError as exc:
            raise RunDirError(f"cannot create run directory {path}: {exc}") from exc
        run_dir = cls(path)
        write_json_atomic(
            path / "config.json", {"config": config.to_flat(), "digest": config.digest()}
        )
        write_json_atomic(path / "environment.json", environment(config, command))
        run_dir.set_status("running", rounds_completed=0)
        return run_dir

    def set_status(self, state: str, **details: Any) -> None:
        payload = {"state": state, "updated_at": _now(), **details}
        write_json_atomic(self.path / "status.json", payload)

    def log_round(self, metrics: dict[str, Any], clients: list[dict[str, Any]]) -> None:
        append_jsonl(self.path / "metrics.jsonl", metrics)
        for client in clients:
            append_jsonl(self.path / "clients.jsonl", client)

    @property
    def ledger_path(self) -> Path:
        return self.path / "ledger.jsonl"

    def write_adapter(self, target: Path, state: dict[str, Any], peft_config: Any) -> str:
        """Write a PEFT-format adapter directory atomically; return the weights' sha256."""
        from safetensors.torch import save_file

        staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        peft_config.save_pretrained(str(staging))
        save_file(state, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
        digest = file_sha256(staging / "adapter_model.safetensors")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        return digest

    def write_checkpoint(
        self, server_round: int, state: dict[str, Any], peft_config: Any, resume: dict[str, Any]
    ) -> Path:
        """checkpoints/round-NNNNN/{adapter/, state.json}, made visible in one rename."""
        final = self.path / "checkpoints" / f"round-{server_round:05d}"
        staging = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        digest = self.write_adapter(staging / "adapter", state, peft_config)
        write_json_atomic(
            staging / "state.json",
            {**resume, "round": server_round, "adapter_sha256": digest, "written_at": _now()},
        )
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        (self.path / "checkpoints" / ".latest.tmp").write_text(final.name + "\n")
        os.replace(self.path / "checkpoints" / ".latest.tmp", self.path / "checkpoints" / "latest")
        return final


def environment(config: RunConfig, command: list[str] | None) -> dict[str, Any]:
    import torch

    return {
        "started_at": _now(),
        "command": command if command is not None else list(sys.argv),
        "cwd": os.getcwd(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "packages": package_versions(),
        "git": git_commit(),
        "seeds": {"train.seed": config.train.seed, "data.seed": config.data.seed},
        "config_digest": config.digest(),
    }


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as JSON (what a resumed run restores)."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    np_state: tuple[Any, ...] = tuple(np.random.get_state(legacy=True))
    return {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")

"""State a node carries from one round to the next — error-feedback residuals (`residual`),
SCAFFOLD's client control variate (`control`) — kept so that a resumed run continues exactly.

A node keeps each in its `Context.state` (fast, what Flower gives a node) and, when it has
a directory for it, on disk as one safetensors file per round it trained in. On round r it uses
the newest residual from a round before r: if the server was killed after round r's messages and
resumed from round r − 1, the node redoes round r from the same residual it used the first time.
The directory is the node config's `state-dir` (deployment: a node's own disk), else
`<run dir>/node-state/partition-<id>` (simulation, where the run directory is on the same disk).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("residual", "control")
KEEP = 2  # files kept: the newest and the one before it


class NodeStateStore:
    """One node's tensors of one kind, by the round that produced them."""

    def __init__(self, context: Any, directory: Path | None, kind: str = "residual") -> None:
        if kind not in KINDS:
            raise ValueError(f"node state kind {kind!r} is not one of {', '.join(KINDS)}")
        self.context = context
        self.directory = directory
        self.kind = kind
        self.key = f"fedtune.{kind}"

    @classmethod
    def for_node(
        cls, context: Any, run_dir: str, partition_id: int, kind: str = "residual"
    ) -> NodeStateStore:
        configured = context.node_config.get("state-dir")
        if configured:
            directory: Path | None = Path(str(configured)) / f"partition-{partition_id}"
        elif run_dir:
            directory = Path(run_dir) / "node-state" / f"partition-{partition_id}"
        else:
            directory = None
        return cls(context, directory, kind)

    def _files(self) -> dict[int, Path]:
        if self.directory is None or not self.directory.is_dir():
            return {}
        found = {}
        prefix = f"{self.kind}-"
        for path in self.directory.glob(f"{prefix}*.safetensors"):
            stem = path.name[len(prefix) : -len(".safetensors")]
            if stem.isdigit():
                found[int(stem)] = path
        return found

    def load(self, server_round: int) -> dict[str, np.ndarray] | None:
        """The newest tensors produced before `server_round`, or None (start from zero)."""
        from safetensors.numpy import load_file

        memory = self._memory()
        on_disk = {r: p for r, p in self._files().items() if r < server_round}
        best_memory = max((r for r in memory if r < server_round), default=None)
        best_disk = max(on_disk, default=None)
        if best_memory is not None and (best_disk is None or best_memory >= best_disk):
            return memory[best_memory]
        if best_disk is not None:
            return dict(load_file(str(on_disk[best_disk])))
        return None

    def save(self, server_round: int, tensors: dict[str, np.ndarray]) -> None:
        """Keep the tensors of `server_round` (memory, and disk when there is a directory)."""
        from flwr.app import Array, ArrayRecord, ConfigRecord
        from safetensors.numpy import save_file

        state = self.context.state
        state[self.key] = ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in tensors.items()}
        )
        state[self.key + ".round"] = ConfigRecord({"round": server_round})
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.directory / f"{self.kind}-{server_round:05d}.safetensors"
        staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(staging))
        os.replace(staging, target)
        # Later rounds' files are stale (a resumed run redoes them); keep the newest KEEP before.
        files = self._files()
        for stale in [r for r in files if r > server_round]:
            files.pop(stale).unlink(missing_ok=True)
        for old in sorted(files)[:-KEEP]:
            files[old].unlink(missing_ok=True)

    def _memory(self) -> dict[int, dict[str, np.ndarray]]:
        state = self.context.state
        if self.key not in state.array_records or self.key + ".round" not in state.config_records:
            return {}
        produced = int(state.config_records[self.key + ".round"]["round"])
        return {produced: {k: a.numpy() for k, a in state.array_records[self.key].items()}}

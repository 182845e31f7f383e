"""Live progress of a federated run: one line per round with loss, bytes, time and ETA."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from fedtune.units import human_bytes


def human_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def stderr_emit(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Progress:
    """Formats progress lines and hands them to `emit` (stderr, or Flower's log under flwr run)."""

    def __init__(self, num_rounds: int, emit: Callable[[str], None] = stderr_emit) -> None:
        self.num_rounds = num_rounds
        self.emit = emit
        self.started = time.perf_counter()
        self.round_started = self.started
        self.first_round = 0  # rounds already done when this process started (a resume)

    def start(self, rounds_done: int) -> None:
        """Count the ETA from here: a resumed run's earlier rounds took no time in this process."""
        self.started = time.perf_counter()
        self.first_round = rounds_done

    def note(self, text: str) -> None:
        self.emit(f"fedtune: {text}")

    def begin_round(self, server_round: int, clients: int) -> None:
        self.round_started = time.perf_counter()
        noun = "client" if clients == 1 else "clients"
        self.emit(f"round {server_round}/{self.num_rounds} │ training on {clients} {noun} …")

    def end_round(self, server_round: int, metrics: dict[str, Any]) -> None:
        now = time.perf_counter()
        elapsed = now - self.started
        eta = elapsed / max(server_round - self.first_round, 1) * (self.num_rounds - server_round)
        loss = metrics.get("train_loss")
        loss_text = f"{loss:.4f}" if isinstance(loss, float) else "n/a"
        failed = metrics.get("failed_clients", 0)
        self.emit(
            f"round {server_round}/{self.num_rounds} │ clients {metrics.get('clients', 0)}"
            + (f" ({failed} failed)" if failed else "")
            + f" │ loss {loss_text}"
            + (f" (probe {metrics['probe_loss']:.4f})" if "probe_loss" in metrics else "")
            + (f" │ held-out {metrics['heldout_loss']:.4f}" if "heldout_loss" in metrics else "")
            + (f" │ MMLU {metrics['mmlu']['average']:.2f}" if "mmlu" in metrics else "")
            + f" │ ↓ {human_bytes(metrics.get('downlink_bytes', 0))}"
            + f" ↑ {human_bytes(metrics.get('uplink_bytes', 0))}"
            + f" (total {human_bytes(metrics.get('cumulative_bytes', 0))})"
            + f" │ {metrics.get('tokens', 0) / max(now - self.round_started, 1e-9):.0f} tok/s"
            + f" │ {human_seconds(now - self.round_started)}"
            + f" │ ETA {human_seconds(eta)}"
        )

"""Start real `fedtune run` processes (simulation engine, tiny model), kill them, look at what is left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent

# 4 clients, 2 per round, one 2-example step of ≤64 tokens: a round takes about a second.
TINY_RUN = (
    "federation.num-clients=4",
    "strategy.clients-per-round=2",
    "num-server-rounds=5",
    "train.local-steps=1",
    "train.batch-size=2",
    "train.seq-length=64",
    "train.save-every-round=2",
    "eval.probe-examples=2",
    "data.heldout-examples=8",  # scored before round 1 and after the last (200 by default)
)

# Setups the resume tests compare: each stateful strategy, FFA-LoRA (only B travels), and a
# compressed run whose clients keep error-feedback residuals across rounds (and round
# stochastically, seeded).
SETUPS: dict[str, tuple[str, ...]] = {
    "fedavg": (),
    # SCAFFOLD over FFA-LoRA's B factors: server and client control variates carried across rounds.
    "scaffold-ffa": ("strategy.name=scaffold", "model.lora.variant=ffa"),
    # FlexLoRA with clients of two ranks (partitions 0, 2 at 4; 1, 3 at 8), replies as deltas
    # against each client's own factors.
    "flexlora": (
        "strategy.name=flexlora",
        "model.lora.client-ranks=4,8",
        "compress.uplink=delta,int8",
    ),
    # Client-level DP with the server's noise over an int8 uplink: clipped updates, seeded noise.
    "dp-central": (
        "dp.clipping-norm=0.02",
        "dp.noise-multiplier=0.5",
        "compress.uplink=delta,int8",
    ),
    # The r×r adapter (only R travels) with 2-bit codecs: each R's delta as rank-2 factors,
    # ternary, stochastically rounded, error feedback; int2 down.
    "sb-int2-ef": (
        "model.lora.variant=sb",
        "compress.downlink=int2",
        "compress.uplink=delta,low-rank=2,int2,zstd",
        "compress.error-feedback=true",
        "compress.stochastic-rounding=true",
    ),
    "fedadam-compressed": (
        "strategy.name=fedadam",
        "compress.downlink=int8",
        "compress.uplink=delta,top-k=0.1,int4,zstd",
        "compress.error-feedback=true",
        "compress.stochastic-rounding=true",
    ),
}


class Run:
    """One `fedtune run` process with its own Ray temp dir (to find its processes afterwards)."""

    def __init__(
        self,
        tmp: Path,
        name: str,
        model_dir: Path,
        *sets: str,
        faults=(),
        resume=False,
        wrap=True,
        client_cpus: int | None = None,
    ):
        self.out = tmp / "runs"
        self.dir = self.out / name
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="ft-ray-", dir="/tmp"))
        self.pidfile = tmp / f"{name}.pid"
        # One simulation worker for the whole machine by default: a round's clients train one
        # after another in it, and the run starts one worker process instead of one per core.
        # A run whose hung or crashing client must hold up only its own worker asks for one core
        # per client (`client_cpus=1`: two workers on a 2-core machine).
        cpus = client_cpus or os.cpu_count() or 1
        args = [sys.executable, "-m", "fedtune.cli", "run", "--client-cpus", str(cpus)]
        if resume:
            args += ["--resume", str(self.dir)]
        else:
            args += ["--set", f"model.name={model_dir}"]
            args += [
                f"--set={item}"
                for item in (*TINY_RUN, f"run.output-dir={self.out}", f"run.name={name}")
            ]
            args += [f"--set={item}" for item in sets]
        if wrap:  # fedtune's ClientApp behind the fault-injecting wrapper
            args += ["--client-app", "faultapp:app"]
        env = dict(
            os.environ,
            RAY_TMPDIR=str(self.ray_tmp),
            FEDTUNE_TEST_FAULTS=json.dumps(list(faults)),
            FEDTUNE_TEST_PIDFILE=str(self.pidfile),
            PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        )
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.pidfile.write_text(str(self.proc.pid))

    def wait(self, timeout: float = 600) -> tuple[int, str]:
        out, err = self.proc.communicate(timeout=timeout)
        self.stderr = err
        return self.proc.returncode, err

    def wait_for(self, predicate, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"run ended early: {self.proc.stderr.read()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError("condition not reached in time")

    def metrics_lines(self) -> int:
        path = self.dir / "metrics.jsonl"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def status(self) -> dict:
        return json.loads((self.dir / "status.json").read_text())

    def leftovers(self, settle_s: float = 15.0) -> list[str]:
        """Processes of this run (Ray's, the engine) still alive after `settle_s`."""
        deadline = time.monotonic() + settle_s
        while True:
            alive = []
            for process in psutil.process_iter(["pid", "cmdline", "environ"]):
                try:
                    cmdline = " ".join(process.info["cmdline"] or [])
                    environ = process.info["environ"] or {}
                except psutil.Error:
                    continue
                ours = str(self.ray_tmp) in cmdline or environ.get("RAY_TMPDIR") == str(
                    self.ray_tmp
                )
                if ours and process.pid != os.getpid():
                    alive.append(f"{process.pid} {cmdline[:120]}")
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.5)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def adapter_sha(run_dir: Path) -> str:
    from fedtune.provenance import file_sha256

    return file_sha256(run_dir / "adapter" / "adapter_model.safetensors")


def check_resumed(run_dir: Path, reference: Path) -> None:
    """The resumed run ended as the uninterrupted one: same adapter bits, each round once in
    every log, same losses, learning rates and bytes."""
    assert adapter_sha(run_dir) == adapter_sha(reference)
    for name in ("metrics.jsonl", "ledger.jsonl", "clients.jsonl"):
        rows = read_jsonl(run_dir / name)
        keys = [(r["round"], r.get("partition_id")) for r in rows]
        assert keys == [
            (r["round"], r.get("partition_id")) for r in read_jsonl(reference / name)
        ], name
    ref_metrics = read_jsonl(reference / "metrics.jsonl")
    got = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["train_loss"] for m in got] == [m["train_loss"] for m in ref_metrics]
    assert [m["learning_rate"] for m in got] == [m["learning_rate"] for m in ref_metrics]
    summary = json.loads((run_dir / "summary.json").read_text())
    ref_summary = json.loads((reference / "summary.json").read_text())
    assert summary["communication"]["total_bytes"] == ref_summary["communication"]["total_bytes"]
    assert summary["resumes"], "the summary records the resume"

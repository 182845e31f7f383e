"""`fedtune run` supervises its engine process so that every ending is honest and bounded.

- Ctrl-C / SIGTERM / SIGHUP: the engine's process group gets SIGTERM, then SIGKILL after
  `STOP_GRACE_S`; every process it started (Ray's included) is stopped; status.json says
  "interrupted" (Ctrl-C) or "terminated", with the round a resume continues after.
- The engine dies (OOM killer, a crash): status.json says "failed" with the exit status.
- The run has ended (status.json final) but the engine does not exit within `EXIT_GRACE_S`
  (a client hung in a worker): the engine is stopped; the run's result stands.
- `fedtune run` itself is SIGKILLed: the engine dies with it (PR_SET_PDEATHSIG) and a watchdog
  process SIGKILLs the engine's whole process group (Ray's agents included, which would otherwise
  linger for a minute); status.json still says "running" with a process id that is gone, which
  `--resume` recognises.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedtune.rundir import ENDED_STATES, FINISHED_STATES, RunDirectory, RunDirError, StatusRow

STOP_GRACE_S = 10.0
EXIT_GRACE_S = 30.0
POLL_S = 0.5
SIGNAL_STATES = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}
SIGNAL_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


# Run with `python -I -S -c`: waits for its parent (the supervisor) to go, however it goes, then
# SIGKILLs the engine's process group. Ctrl-C at a terminal reaches the supervisor, not this.
WATCHDOG = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
parent, group = int(sys.argv[1]), int(sys.argv[2])
while os.getppid() == parent:
    time.sleep(0.2)
try:
    os.killpg(group, signal.SIGKILL)
except OSError:
    pass
"""


def _watch(engine: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", WATCHDOG, str(os.getpid()), str(engine.pid)],
        stdin=subprocess.DEVNULL,
    )


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: SIGKILL this process when the supervisor dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _descendants(pid: int) -> list[Any]:
    import psutil

    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return []


def _stop(proc: subprocess.Popen[bytes], tracked: dict[int, Any]) -> None:
    """SIGTERM the engine's group, SIGKILL it after the grace, then every tracked process."""
    import psutil

    for process in _descendants(proc.pid):
        tracked[process.pid] = process
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _, alive = psutil.wait_procs(list(tracked.values()), timeout=STOP_GRACE_S / 2)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=STOP_GRACE_S / 2)


def _state(run_dir: RunDirectory) -> StatusRow:
    try:
        return run_dir.status()
    except (RunDirError, OSError):
        return {}


def _record(run_dir: RunDirectory, emit: Any, state: str, **details: Any) -> None:
    """Write the run's end to status.json; a disk that refuses even that is reported, not raised
    (the run's process is gone, which is what `--resume` recognises)."""
    try:
        run_dir.set_status(state, **details)
    except OSError as exc:
        emit(f"fedtune: could not record the run's end ({state}) in status.json: {exc}")


def supervise(command: list[str], run_dir: RunDirectory, emit: Any) -> int:
    """Run the engine command; return the exit code `fedtune run` should end with."""
    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)

    previous = {
        s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    tracked: dict[int, Any] = {}
    ended_at: float | None = None
    code: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    watchdog: subprocess.Popen[bytes] | None = None
    try:
        proc = subprocess.Popen(command, start_new_session=True, preexec_fn=_die_with_parent)
        watchdog = _watch(proc)
        while code is None:
            try:
                code = proc.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                pass
            for process in _descendants(proc.pid):
                tracked[process.pid] = process
            if received:
                signum = received[0]
                emit(f"fedtune: {signal.Signals(signum).name}: stopping the run …")
                _stop(proc, tracked)
                status = _state(run_dir)
                _record(
                    run_dir,
                    emit,
                    SIGNAL_STATES.get(signal.Signals(signum), "terminated"),
                    rounds_completed=int(status.get("rounds_completed", 0)),
                    resumable=True,
                    error=f"stopped by {signal.Signals(signum).name}",
                )
                emit(f"fedtune: stopped; continue it with: fedtune run --resume {run_dir.path}")
                return SIGNAL_CODES.get(signal.Signals(signum), 143)
            if _state(run_dir).get("state") in ENDED_STATES:
                ended_at = ended_at or time.monotonic()
                if time.monotonic() - ended_at > EXIT_GRACE_S:
                    emit(
                        f"fedtune: the run ended but the engine did not exit within "
                        f"{EXIT_GRACE_S:.0f} s (a client still busy?): stopping it"
                    )
                    _stop(proc, tracked)
                    code = 0 if _state(run_dir).get("state") in FINISHED_STATES else 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _reap(tracked)
        if proc is not None:  # whatever is left in the engine's group is a leftover
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if watchdog is not None:
            watchdog.kill()
            watchdog.wait()
    status = _state(run_dir)
    if status.get("state") not in ENDED_STATES:
        why = f"signal {-code}" if code < 0 else f"exit status {code}"
        _record(
            run_dir,
            emit,
            "failed",
            rounds_completed=int(status.get("rounds_completed", 0)),
            resumable=True,
            error=f"the engine process ended ({why}) before the run did",
        )
    return code if code >= 0 else 1


def _reap(tracked: dict[int, Any]) -> None:
    """Nothing the engine started outlives `fedtune run`."""
    import psutil

    alive = [p for p in tracked.values() if p.is_running()]
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, still = psutil.wait_procs(alive, timeout=5)
    for process in still:
        with contextlib.suppress(psutil.Error):
            process.kill()


def engine_command(
    run_dir: Path,
    config_flat: dict[str, Any],
    client_app: str | None,
    client_cpus: float | None,
    client_gpus: float | None,
    verbose: bool,
) -> list[str]:
    import json

    command = [
        sys.executable,
        "-m",
        "fedtune.runtime.engine",
        str(run_dir),
        "--config-json",
        json.dumps(config_flat),
    ]
    if client_app:
        command += ["--client-app", client_app]
    if client_cpus is not None:
        command += ["--client-cpus", str(client_cpus)]
    if client_gpus is not None:
        command += ["--client-gpus", str(client_gpus)]
    if verbose:
        command.append("--verbose")
    return command

"""Checking submissions off the event loop, in a small pool of worker processes.

Reading a submission's JSON and checking it — above all recomputing a DP ε with the RDP
accountant, decompressing and re-scoring generation or predictions files — is pure-Python CPU
work: on the event loop it stalls every client (one submission with 100 distinct DP release sizes
held every request, /healthz included, for ~20 s), and threads do not help enough, because the
work holds the interpreter lock that the event loop needs (the six heavy submissions of
`tests/leaderboard/test_responsive.py` at once, on 2 CPU cores: /healthz waited up to 9–16 s with
the checks inline, ~0.4 s with them in threads, under 0.08 s in processes). So a submission's
body goes, as bytes, to one of `CHECK_WORKERS` worker processes, which parses, checks and re-scores
it and sends back the `Submission` (or the `SubmissionError` / `BadBody` that refuses it); the
event loop only awaits. The workers run at a lower priority than the server (`WORKER_NICENESS`).

The pool lives as long as the app: the app's lifespan starts it and shuts it down (waiting for
the checks in progress), so `fedtune leaderboard serve` and every uvicorn server that runs the
lifespan leave no process behind. A worker ignores Ctrl-C (the server, which gets it too, shuts the
pool down) and exits by itself if the server process dies. An app used without its lifespan (a
test client outside `with`) has no pool and checks in a thread. The workers are started with
"spawn", which imports the server's main module again: a script that serves the app must start
the server under `if __name__ == "__main__":`.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

from fedtune.leaderboard.validation import Submission, check_submission

CHECK_WORKERS = 2  # submissions checked at once; more wait their turn, the event loop does not
MAX_DEPTH = 32  # a submission is about 5 levels deep
WORKER_NICENESS = 10  # added to the workers' nice value (lower priority than the event loop)

T = TypeVar("T")


class BadBody(ValueError):
    """A body that is not a JSON document the board reads (400)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __reduce__(self) -> tuple[type[BadBody], tuple[str]]:
        return (type(self), (self.reason,))


class CheckerRestarted(RuntimeError):
    """A worker process died during a check; the pool was replaced and the check can be sent
    again (503)."""


def check_body(body: bytes) -> Submission:
    """Parse a submission's body and check it (`check_submission`); run in a worker process.

    Raises:
        BadBody: not UTF-8 JSON (NaN and Infinity included), or nested deeper than MAX_DEPTH.
        SubmissionError: the submission is refused (see `check_submission`).
    """
    try:
        payload = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadBody(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadBody(f"body is nested deeper than {MAX_DEPTH} levels") from None
    if depth(payload, MAX_DEPTH) > MAX_DEPTH:
        raise BadBody(f"body is nested deeper than {MAX_DEPTH} levels")
    return check_submission(payload)


def depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of parsed JSON (a scalar is 1), without recursion; counting stops past
    `limit`. Level by level, looking only at containers: ~0.6 s for 8 million numbers."""
    level, frontier = 0, [value]
    while frontier and level <= limit:
        level += 1
        nested: list[Any] = []
        for item in frontier:
            if isinstance(item, dict):
                item = item.values()
            elif not isinstance(item, list):
                continue
            nested += [v for v in item if isinstance(v, dict | list)]
        frontier = nested
    return level


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class CheckPool:
    """`workers` processes that run checks for the event loop (see the module's docstring)."""

    def __init__(self, workers: int = CHECK_WORKERS) -> None:
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None

    def start(self) -> None:
        """Start the pool (its processes start with the first checks)."""
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                self.workers,
                # Not fork: the server has threads (uvicorn's, the thread pool's), and a child
                # forked while one of them holds a lock can hang on it.
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_started,
                initargs=(os.getpid(),),
            )

    def close(self) -> None:
        """Wait for the checks in progress, drop those not started, and end the processes."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    @property
    def running(self) -> bool:
        return self._executor is not None

    def pids(self) -> list[int]:
        """The worker processes alive now."""
        processes = getattr(self._executor, "_processes", None) or {}
        return [p.pid for p in processes.values() if p.is_alive()]

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` in a worker process (in a thread when the pool is not started).

        Raises:
            CheckerRestarted: a worker died meanwhile (killed, out of memory); the pool has been
                replaced by a fresh one.
            Whatever `function` raises (it must pickle).
        """
        executor = self._executor
        if executor is None:
            return await run_in_threadpool(function, *args)
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, function, *args)
        except BrokenProcessPool:
            if self._executor is executor:  # the first request to notice replaces it
                self._executor = None
                executor.shutdown(wait=False, cancel_futures=True)
                self.start()
            raise CheckerRestarted("a worker process checking submissions died") from None


def _worker_started(server: int) -> None:
    # Below the server's priority: when the CPUs are busy checking, the event loop still gets
    # one as soon as a request arrives.
    os.nice(WORKER_NICENESS)
    # Ctrl-C in a terminal reaches the whole process group; the server shuts the pool down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(server,), daemon=True).start()


def _exit_with(server: int) -> None:
    """Exit once the server process is gone (a SIGKILLed server cannot shut its pool down)."""
    while os.getppid() == server:
        time.sleep(0.5)
    os._exit(0)

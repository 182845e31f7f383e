"""The leaderboard under load and under SIGKILL: submissions/s, latency, nothing acknowledged lost.

`fedtune leaderboard serve` runs as its own process on a loopback port. Client threads, one API
token and team each, submit valid entries (self-reported, and every Kth one with the three
generation files of a full evaluation, re-scored by the server); meanwhile the server is SIGKILLed
every few seconds and started again. A client whose request fails on the wire sends the same
payload again until it is answered: 201 (stored) or 409 with the stored id (an earlier attempt was
stored, its answer lost). At the end, every acknowledged id must be stored exactly once under its
team, and nothing else may be stored.

    .venv/bin/python bench/leaderboard_load.py                       # ~1 min on 2 CPU cores
    .venv/bin/python bench/leaderboard_load.py --clients 16 --per-client 50 --kills 5

Payloads come from the test suite's submission builder (tests/leaderboard/lb_submissions.py).
Writes JSON (default bench/results/leaderboard_load.json).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """`fedtune leaderboard serve` in its own process group, killable and restartable."""

    def __init__(self, data_dir: Path, port: int, log: Path) -> None:
        self.data_dir, self.port, self.log = data_dir, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> float:
        """Start and wait for /healthz; seconds until it answered."""
        import httpx

        command = [
            sys.executable, "-m", "fedtune.cli", "leaderboard", "serve", "--port",
            str(self.port), "--data-dir", str(self.data_dir), "--submissions-per-minute", "0",
        ]  # fmt: skip
        started = time.monotonic()
        with open(self.log, "ab") as handle:
            self.process = subprocess.Popen(
                command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
            )
        while True:
            try:
                httpx.get(self.url + "/healthz", timeout=2).raise_for_status()
                return time.monotonic() - started
            except httpx.HTTPError:
                if self.process.poll() is not None or time.monotonic() - started > timeout_s:
                    raise RuntimeError(f"the server did not start; see {self.log}") from None
                time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the server's whole process group and reap it."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        """Terminate (then kill) the server."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


def hammer(
    server: Server,
    payloads: list[list[dict[str, Any]]],
    tokens: list[str],
    *,
    kills: int = 3,
    kill_every_s: float = 4.0,
    deadline_s: float = 600.0,
) -> dict[str, Any]:
    """Submit `payloads[i]` from client thread i (with `tokens[i]`) while the server is SIGKILLed
    `kills` times; return what was acknowledged, latencies and restarts.

    Raises:
        RuntimeError: a payload was refused (4xx other than 409) or not answered in time.
    """
    import httpx

    acknowledged: list[tuple[str, int]] = []
    latencies: list[float] = []
    retries = [0]
    errors: list[str] = []
    lock = threading.Lock()
    done = threading.Event()
    give_up = time.monotonic() + deadline_s

    def client(index: int) -> None:
        headers = {"Authorization": f"Bearer {tokens[index]}"}
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for payload in payloads[index]:
                while True:
                    if time.monotonic() > give_up:
                        errors.append(f"client {index}: no answer before the deadline")
                        return
                    started = time.perf_counter()
                    try:
                        reply = http.post("/api/entries", json=payload, headers=headers)
                    except httpx.TransportError:
                        with lock:
                            retries[0] += 1
                        time.sleep(0.2)
                        continue
                    if reply.status_code in (201, 409) and "id" in reply.json():
                        with lock:
                            latencies.append(time.perf_counter() - started)
                            acknowledged.append((payload["team"], int(reply.json()["id"])))
                        break
                    if reply.status_code in (429, 503):
                        time.sleep(float(reply.headers.get("Retry-After", "1")))
                        continue
                    errors.append(f"client {index}: {reply.status_code} {reply.text[:200]}")
                    return

    restarts: list[float] = []

    def killer() -> None:
        for _ in range(kills):
            if done.wait(kill_every_s):
                return
            server.kill()
            restarts.append(server.start())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(payloads))]
    chaos = threading.Thread(target=killer)
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    chaos.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    done.set()
    chaos.join()
    if errors:
        raise RuntimeError("; ".join(errors[:5]))
    return {
        "acknowledged": acknowledged,
        "latencies": sorted(latencies),
        "elapsed_s": elapsed,
        "kills": len(restarts),
        "restart_s": restarts,
        "retries": retries[0],
    }


def stored_entries(url: str) -> list[dict[str, Any]]:
    """Every non-published entry the server lists (all pages)."""
    import httpx

    rows: list[dict[str, Any]] = []
    offset = 0
    while True:
        page = httpx.get(
            f"{url}/api/entries", params={"reference": 0, "offset": offset}, timeout=60
        ).json()
        rows += page["rows"]
        offset += page["count"]
        if offset >= page["total"] or not page["count"]:
            break
    return [r for r in rows if r["status"] != "published"]


def check_nothing_lost(
    acknowledged: list[tuple[str, int]], stored: list[dict[str, Any]], expected: int
) -> list[str]:
    """Problems: an acknowledged id missing or under another team, duplicates, extra rows."""
    problems = []
    by_id = {row["id"]: row["team"] for row in stored}
    ids = {entry_id for _, entry_id in acknowledged}
    for team, entry_id in acknowledged:
        if by_id.get(entry_id) != team:
            problems.append(f"acknowledged entry {entry_id} of {team!r} is not stored as such")
    if len(stored) != expected or len(ids) != expected:
        problems.append(
            f"{len(stored)} stored, {len(ids)} distinct acknowledged, {expected} submitted"
        )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=30)
    parser.add_argument("--rescored-every", type=int, default=10, help="0: none re-scored")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--kill-every-s", type=float, default=4.0)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "leaderboard_load.json"))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT / "tests"))
    from fedtune.leaderboard.store import Store
    from leaderboard.lb_submissions import make_submission

    with tempfile.TemporaryDirectory(prefix="fedtune-load-") as scratch:
        data_dir = Path(scratch) / "board"
        store = Store.in_dir(data_dir)
        teams = [f"Load client {i}" for i in range(args.clients)]
        tokens = [store.new_token(f"client{i}", team=team) for i, team in enumerate(teams)]
        payloads = [
            [
                make_submission(
                    team,
                    correct=(1000 + n, 1000 + i, 1000),
                    comm_bytes=10**9 + n,
                    generations=bool(args.rescored_every) and n % args.rescored_every == 0,
                )
                for n in range(args.per_client)
            ]
            for i, team in enumerate(teams)
        ]
        server = Server(data_dir, free_port(), Path(scratch) / "server.log")
        first_start = server.start()
        try:
            result = hammer(
                server, payloads, tokens, kills=args.kills, kill_every_s=args.kill_every_s
            )
            stored = stored_entries(server.url)
        finally:
            server.stop()
    expected = args.clients * args.per_client
    problems = check_nothing_lost(result["acknowledged"], stored, expected)
    latencies = result["latencies"]
    summary = {
        "clients": args.clients,
        "submissions": expected,
        "rescored": sum(1 for row in stored if row["status"] == "re-scored"),
        "elapsed_s": round(result["elapsed_s"], 2),
        "submissions_per_s": round(expected / result["elapsed_s"], 1),
        "latency_p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
        "latency_p95_ms": round(1000 * latencies[int(len(latencies) * 0.95)], 1),
        "server_kills": result["kills"],
        "restart_s": [round(s, 2) for s in result["restart_s"]],
        "first_start_s": round(first_start, 2),
        "client_retries_after_a_kill": result["retries"],
        "lost_or_duplicated": problems,
        "cpu_count": os.cpu_count(),
        "when": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(summary, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Load: ≥ 200 submissions through the API from 8 concurrent clients; none lost or duplicated."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from fedtune.leaderboard.ranking import rank_key

from .lb_submissions import make_submission

CLIENTS = 8
PER_CLIENT = 26  # 208 submissions


def _payloads(client: int) -> list[dict]:
    rng = random.Random(client)
    payloads = []
    for i in range(PER_CLIENT):
        # Few distinct scores and costs, so many entries tie and the tie-breaks decide the order.
        correct = (rng.choice([900, 1500, 2100]), rng.choice([1000, 1600]), 2000)
        comm = rng.choice([1, 2, 3]) * 1024**3
        date = f"2026-11-{rng.randint(1, 28):02d}"
        # One team per client (its token is bound to it); each run its own code URL.
        payloads.append(
            make_submission(
                f"client {client}",
                correct=correct,
                comm_bytes=comm,
                date=date,
                code_url=f"https://example.org/client-{client}/run-{i}",
            )
        )
    return payloads


def test_concurrent_submissions(live_server):
    tokens = [live_server.store.new_token(f"client {c}") for c in range(CLIENTS)]
    barrier = threading.Barrier(CLIENTS)
    latencies: list[float] = []

    def run_client(client: int) -> list[tuple[str, int]]:
        created = []
        headers = {"Authorization": f"Bearer {tokens[client]}"}
        with httpx.Client(base_url=live_server.url, headers=headers, timeout=60) as http:
            payloads = _payloads(client)
            barrier.wait()  # all clients start together
            for payload in payloads:
                start = time.perf_counter()
                reply = http.post("/api/entries", json=payload)
                latencies.append(time.perf_counter() - start)
                assert reply.status_code == 201, reply.text
                created.append((payload["team"], reply.json()["id"]))
            # A client retrying its last submission (lost reply) must not create a second row.
            retry = http.post("/api/entries", json=payloads[-1])
            assert retry.status_code == 409 and retry.json()["id"] == created[-1][1]
        return created

    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(run_client, range(CLIENTS)))
    elapsed = time.perf_counter() - start
    created = [item for chunk in results for item in chunk]
    assert len(created) == CLIENTS * PER_CLIENT >= 200

    listing = httpx.get(f"{live_server.url}/api/entries?reference=0", timeout=60).json()["rows"]
    submitted = [r for r in listing if r["status"] == "submitted"]
    # None lost, none duplicated, every id the one its client was given.
    assert len(submitted) == len(created)
    assert {(r["team"], r["id"]) for r in submitted} == set(created)
    assert len({r["id"] for r in listing}) == len(listing) == 19 + len(created)
    # The order is what an independent sort of the stored rows gives: the 19 published rows
    # ranked, then the self-reported submissions unranked, in the same order.
    expected = sorted(
        listing,
        key=lambda r: (
            r["status"] == "submitted",
            -round(r["average"], 2),
            r["comm_bytes"],
            r["date"],
            r["id"],
        ),
    )
    assert [r["id"] for r in listing] == [r["id"] for r in expected]
    assert [r["rank"] for r in listing] == [*range(1, 20), *[None] * len(created)]
    # And the store's own key agrees with the served order.
    entries = sorted(live_server.store.entries(), key=lambda e: (not e.ranked, rank_key(e)))
    assert [e.id for e in entries] == [r["id"] for r in listing]
    latencies.sort()
    p50, p95 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.95)]
    print(
        f"\n{len(created)} submissions from {CLIENTS} clients in {elapsed:.2f} s "
        f"({len(created) / elapsed:.0f}/s); latency p50 {p50 * 1000:.0f} ms, "
        f"p95 {p95 * 1000:.0f} ms"
    )

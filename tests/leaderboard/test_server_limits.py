"""The server's own limits, over raw sockets: slow requests and huge heads are cut off."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from fedtune.leaderboard.web import server


@pytest.fixture
def fast_deadline(monkeypatch):
    monkeypatch.setattr(server.GuardedH11Protocol, "request_timeout_s", 1.0)


def _connect(live_server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", live_server.port), timeout=10)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_a_request_sent_too_slowly_gets_408_and_is_closed(fast_deadline, live_server):
    started = time.monotonic()
    with _connect(live_server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and then nothing more
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 408")
    assert time.monotonic() - started < 5  # 1 s deadline, closed soon after
    with _connect(live_server) as sock:  # a connection that never sends a byte is closed too
        assert _read_all(sock).startswith(b"HTTP/1.1 408")


def test_a_body_that_stops_half_way_gets_408(fast_deadline, live_server):
    with _connect(live_server) as sock:
        sock.sendall(
            b"POST /api/entries HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer " + live_server.token.encode() + b"\r\n"
            b'content-length: 1000\r\n\r\n{"team": '
        )
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 408")
    assert live_server.store.count() == 19  # nothing was stored


def test_a_huge_request_head_gets_431(live_server):
    with _connect(live_server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1024 * 1024) + b"\r\n\r\n")
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 431")


def test_normal_requests_and_keep_alive_still_work(fast_deadline, live_server):
    with httpx.Client(base_url=live_server.url, timeout=10) as client:
        for _ in range(3):  # one kept-alive connection, requests more than the deadline apart
            assert client.get("/healthz").status_code == 200
            time.sleep(0.6)
        big_but_fine = {"X-Fine": "b" * 8000}
        assert client.get("/healthz", headers=big_but_fine).status_code == 200

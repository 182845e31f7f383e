"""`fedtune leaderboard serve` as a user runs it: a separate process answering on a port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = pytest.mark.integration  # a real server in its own process


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_command(tmp_path):
    port = _free_port()
    env = {**os.environ, "FEDTUNE_LEADERBOARD_DIR": str(tmp_path / "board")}
    command = [sys.executable, "-m", "fedtune.cli", "leaderboard", "serve", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                reply = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stdout.read().decode()
                assert time.monotonic() < deadline, "the server did not answer within 60 s"
                time.sleep(0.2)
        assert reply.json() == {"ok": True, "entries": 19}
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert page.status_code == 200 and "ZeroOne.AI" in page.text
        assert (tmp_path / "board" / "leaderboard.sqlite3").is_file()
    finally:
        process.terminate()
        process.wait(timeout=20)

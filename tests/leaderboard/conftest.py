"""Leaderboard fixtures: well-formed submissions built in code, a real store, a real HTTP server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fedtune.leaderboard.store import Store

from .lb_submissions import make_submission


@pytest.fixture
def submission() -> Callable[..., dict[str, Any]]:
    """Factory: submission(team, correct=(stem, social, humanities), comm_bytes=…, track=…)."""
    return make_submission


@pytest.fixture
def store(tmp_path) -> Store:
    """A fresh SQLite store (already holding the published rows)."""
    return Store.in_dir(tmp_path / "leaderboard")


class LiveServer:
    """uvicorn serving the app on a loopback port in a background thread."""

    def __init__(self, store: Store) -> None:
        import uvicorn

        from fedtune.leaderboard.web.app import create_app
        from fedtune.leaderboard.web.server import server_config

        self.store = store
        self.token = store.new_token("tests")
        # Bound here and handed to uvicorn: no window in which another process can take the port.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = server_config(create_app(store), log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture
def live_server(store) -> Iterator[LiveServer]:
    """A running server over `store`, with an API token in `.token`."""
    server = LiveServer(store)
    server.start()
    yield server
    server.stop()

"""How the leaderboard is served: uvicorn's h11 protocol with limits a public server needs.

uvicorn bounds the wait between requests on a kept-alive connection, but not the time a client
may take to send a request, nor the size of a request head that arrives complete. A client could
hold connections open forever by sending a request a byte at a time, or send megabytes of
headers. `GuardedH11Protocol` adds both limits:
- a request (head and body) must arrive within `REQUEST_TIMEOUT_S` of its first byte (or of the
  connection opening), plus one second per `MIN_UPLOAD_BYTES_PER_S` its Content-Length declares
  (an adapter upload of 100 MiB gets 115 s): otherwise 408 and the connection is closed;
- its head must end within `MAX_HEAD_BYTES`: otherwise 431 and the connection is closed.
Bodies are limited by the app (413 above its `max_body_bytes`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from fedtune.units import MIB

REQUEST_TIMEOUT_S = 15.0
MIN_UPLOAD_BYTES_PER_S = MIB
MAX_HEAD_BYTES = 16 * 1024
KEEP_ALIVE_S = 5
LINGER_S = 1.0


def _plain_response(status: int, reason: str) -> bytes:
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\n"
        f"content-length: {len(reason)}\r\nconnection: close\r\n\r\n{reason}"
    ).encode()


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with a per-request deadline and a request-head size limit."""

    request_timeout_s = REQUEST_TIMEOUT_S
    max_head_bytes = MAX_HEAD_BYTES

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._head = bytearray()
        self._refused = False
        self._extended = False
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.request_timeout_s, self._too_slow)

    def _extend_for_body(self) -> None:
        """Give a large declared body the time a slow but steady client needs to send it."""
        self._extended = True
        headers = dict(getattr(self, "scope", {}).get("headers", ()))
        declared = headers.get(b"content-length", b"")
        if self._deadline is None or not (declared.isascii() and declared.isdigit()):
            return
        extra = int(declared) / MIN_UPLOAD_BYTES_PER_S
        if extra > 0:
            when = self._deadline.when() + extra
            self._deadline.cancel()
            self._deadline = self.loop.call_at(when, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _refuse(self, status: int, reason: str) -> None:
        """Answer `status` and close — after a short linger that reads and drops what the client
        is still sending, so that closing does not reset the connection before it reads why."""
        self._disarm()
        if self.transport.is_closing() or self._refused:
            return
        self._refused = True
        cycle = self.cycle
        if cycle is None or not cycle.response_started:  # nothing of a response has been sent
            self.transport.write(_plain_response(status, reason))
        self.loop.call_later(LINGER_S, self.transport.close)

    def _too_slow(self) -> None:
        self._deadline = None
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
            self._refuse(408, "Request Timeout")

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering before the close: read and drop
        if self.conn.their_state is h11.IDLE:
            self._extended = False
            self._arm()  # the first bytes of a request start its clock
            self._head += data[: self.max_head_bytes + 4 - len(self._head)]
            if self._head.find(b"\r\n\r\n") < 0 and len(self._head) > self.max_head_bytes:
                self._refuse(431, "Request Header Fields Too Large")
                return
        super().data_received(data)
        if self.conn.their_state is h11.SEND_BODY and not self._extended:
            self._extend_for_body()
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            self._head.clear()
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self._disarm()  # received in time; the response may take as long as it takes

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def server_config(app: Any, **options: Any) -> Any:
    """uvicorn.Config for the leaderboard app with the guarded protocol and its limits."""
    import uvicorn

    settings: dict[str, Any] = {
        "http": GuardedH11Protocol,
        "timeout_keep_alive": KEEP_ALIVE_S,
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES,
        "lifespan": "on",  # the app's lifespan starts and stops its checking processes
    }
    settings.update(options)
    return uvicorn.Config(app, **settings)

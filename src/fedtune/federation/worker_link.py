"""The ClientApp's side of a node worker (`fedtune.runtime.node_worker`): the wire format and
`forward`, which sends one message and its context to the worker on a Unix socket and returns its
reply.

Wire format, both ways: frames of an 8-byte big-endian length and a body. Request: the message
and the context as Flower's own protobufs. Reply: a status frame (b"ok" or b"error"), then the
reply message and the context (ok), or the error's text (error).
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

HEADER = struct.Struct(">Q")
MAX_FRAME = 1 << 34  # 16 GiB: far above any adapter message, below a corrupted length
CONNECT_WAIT_S = 60.0  # a ClientApp waits this long for a worker that is still starting


class WorkerError(RuntimeError):
    """The node's worker could not be reached, or it failed the message."""


def send(sock: socket.socket, *bodies: bytes) -> None:
    for body in bodies:
        sock.sendall(HEADER.pack(len(body)) + body)


def receive_exact(sock: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(min(size - got, 1 << 20))
        if not chunk:
            raise ConnectionError("the other side closed the connection mid-frame")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def receive(sock: socket.socket) -> bytes:
    (size,) = HEADER.unpack(receive_exact(sock, HEADER.size))
    if size > MAX_FRAME:
        raise ConnectionError(f"frame of {size:,} bytes refused (limit {MAX_FRAME:,})")
    return receive_exact(sock, size)


def forward(socket_path: str, msg: Any, context: Any, timeout_s: float) -> Any:
    """Send one message and its context to the worker; its reply (the node state in `context`
    is replaced by the worker's).

    Raises:
        WorkerError: no worker within CONNECT_WAIT_S, no answer within `timeout_s`, or the
            worker's own error.
    """
    from flwr.app import Message
    from flwr.common.serde import (
        context_from_proto,
        context_to_proto,
        message_from_proto,
        message_to_proto,
    )
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import Message as ProtoMessage

    deadline = time.monotonic() + CONNECT_WAIT_S
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(socket_path)
            break
        except OSError as exc:
            sock.close()
            if time.monotonic() > deadline:
                raise WorkerError(
                    f"no node worker at {socket_path} after {CONNECT_WAIT_S:.0f} s ({exc}); "
                    "start it with `fedtune federation worker --socket PATH`"
                ) from exc
            time.sleep(0.2)
    with sock:
        sock.settimeout(timeout_s)
        try:
            send(
                sock,
                message_to_proto(msg).SerializeToString(),
                context_to_proto(context).SerializeToString(),
            )
            status = receive(sock)
            if status == b"error":
                raise WorkerError(receive(sock).decode(errors="replace"))
            reply_proto, context_proto = ProtoMessage(), ProtoContext()
            reply_proto.ParseFromString(receive(sock))
            context_proto.ParseFromString(receive(sock))
        except (OSError, ConnectionError) as exc:  # socket.timeout is an OSError
            raise WorkerError(f"node worker at {socket_path}: {exc}") from exc
    reply = message_from_proto(reply_proto)
    context.state = context_from_proto(context_proto).state
    return Message(content=reply.content, reply_to=msg)

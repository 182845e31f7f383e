"""A warm client for Flower's deployment engine: one long-lived process per node that keeps the
base model, tokenizer and tokenized data across messages and rounds.

A SuperNode starts a fresh ClientApp process for every message, so a ClientApp that loads its
model itself pays the imports, the model load and the tokenization every round. When the node's
config names `worker-socket=PATH`, fedtune's ClientApp only forwards: it sends the message and
its context to the worker listening on that Unix socket, waits for the reply (bounded by the
run's `strategy.round-timeout-s`), and hands the reply and the updated node state back to Flower.
The worker runs the same `local_train` / `describe_node` the simulation runs, in its own
process, one message at a time.

The wire format and the ClientApp's side are in `fedtune.federation.worker_link`. The socket file
is created with mode 0600 (only the node's user can talk to its worker).
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from fedtune.federation.worker_link import WorkerError, receive, send


def handle(msg: Any, context: Any) -> Any:
    """One message, as the ClientApp would run it in-process."""
    from flwr.app import MessageType

    from fedtune.federation import client_app

    kind = msg.metadata.message_type
    if kind == MessageType.TRAIN:
        return client_app.local_train(msg, context)
    if kind == MessageType.QUERY:
        return client_app.describe_node(msg, context)
    raise ValueError(f"the node worker does not handle {kind!r} messages")


def serve(socket_path: Path, log: Any = None) -> None:
    """Answer messages on `socket_path` until SIGTERM/SIGINT; one at a time."""
    from flwr.common.serde import (
        context_from_proto,
        context_to_proto,
        message_from_proto,
        message_to_proto,
    )
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import Message as ProtoMessage

    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    socket_path = socket_path.resolve()
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    if socket_path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(socket_path))
        except OSError:
            socket_path.unlink()  # left by a worker that died
        else:
            probe.close()
            raise WorkerError(f"a node worker already listens on {socket_path}")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        server.bind(str(socket_path))
    finally:
        os.umask(old_umask)
    server.listen(8)
    log(f"fedtune node worker: listening on {socket_path} (pid {os.getpid()})")
    handled = 0
    try:
        while True:
            connection, _ = server.accept()
            with connection:
                started = time.perf_counter()
                try:
                    msg_proto, context_proto = ProtoMessage(), ProtoContext()
                    msg_proto.ParseFromString(receive(connection))
                    context_proto.ParseFromString(receive(connection))
                    msg = message_from_proto(msg_proto)
                    context = context_from_proto(context_proto)
                except Exception as exc:  # noqa: BLE001 - a bad request must not stop the node
                    log(f"fedtune node worker: unreadable request refused: {exc}")
                    continue
                kind = msg.metadata.message_type
                try:
                    reply = handle(msg, context)
                    body = [b"ok", message_to_proto(reply).SerializeToString()]
                    body.append(context_to_proto(context).SerializeToString())
                except Exception as exc:  # noqa: BLE001 - reported to the ClientApp, which raises
                    text = f"{type(exc).__name__}: {exc}"
                    log(f"fedtune node worker: {kind} failed: {traceback.format_exc()}")
                    body = [b"error", text.encode()]
                try:
                    send(connection, *body)
                except OSError as exc:
                    log(f"fedtune node worker: the ClientApp left before the reply: {exc}")
                handled += 1
                from fedtune.federation.client_app import MODEL_LOADS

                loads = MODEL_LOADS[0]
                log(
                    f"fedtune node worker: message {handled} ({kind}) in "
                    f"{time.perf_counter() - started:.2f} s; model loaded {loads} time(s)"
                )
    finally:
        server.close()
        socket_path.unlink(missing_ok=True)

"""The warm node worker answers exactly as the ClientApp would in-process, keeps its model across
messages, carries the node state both ways, and fails with a clear message."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    RecordDict,
)

from fedtune.config import build_config
from fedtune.federation import client_app, worker_link
from fedtune.federation.messages import ARRAYS, METRICS, NODE, RUN_CONFIG, STRATEGY_CONFIG
from fedtune.runtime import node_worker

pytestmark = pytest.mark.unit


@pytest.fixture
def worker_socket(tmp_path):
    """A node worker serving on a Unix socket in a thread of this process."""
    path = tmp_path / "w" / "worker.sock"
    thread = threading.Thread(target=node_worker.serve, args=(path, lambda _: None), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not path.exists():
        assert time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.01)
    return str(path)


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _message(content: RecordDict, kind: str) -> Message:
    """A message as a SuperNode hands it to its ClientApp (ids set)."""
    metadata = Metadata(
        run_id=1, message_id=f"{kind}-{time.monotonic_ns()}", src_node_id=0, dst_node_id=7,
        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600,
        message_type=kind,
    )  # fmt: skip
    return Message(content=content, metadata=metadata)


def _messages(tiny_model_dir):
    flat = build_config(
        {
            "model.name": str(tiny_model_dir),
            "model.lora.peft-lora-r": 4,
            "federation.num-clients": 4,
            "train.local-steps": 1,
            "train.batch-size": 2,
            "train.seq-length": 64,
            "compress.uplink": "delta,top-k=0.5,int8",
            "compress.error-feedback": True,
            "strategy.round-timeout-s": 120,
        }
    ).to_flat()
    query = _message(RecordDict({RUN_CONFIG: ConfigRecord(flat)}), MessageType.QUERY)
    client_app._WORKER.clear()
    from fedtune.model.adapters import adapter_state

    worker = client_app.get_worker(build_config(flat))
    initial = {k: v.detach().clone() for k, v in adapter_state(worker.model).items()}
    client_app._WORKER.clear()

    def train(server_round: int) -> Message:
        content = RecordDict(
            {
                ARRAYS: ArrayRecord(initial),
                STRATEGY_CONFIG: ConfigRecord({"server-round": server_round}),
                RUN_CONFIG: ConfigRecord(flat),
            }
        )
        return _message(content, MessageType.TRAIN)

    return query, train


def _arrays(reply: Message) -> dict[str, tuple[str, bytes]]:
    """Each encoded array as it travels: its serialization type and bytes."""
    return {k: (v.stype, v.data) for k, v in reply.content.array_records[ARRAYS].items()}


def test_warm_worker_replies_as_in_process_and_keeps_its_model(worker_socket, tiny_model_dir):
    query, train = _messages(tiny_model_dir)
    config = {"partition-id": 1, "num-partitions": 4}

    # In this process, as the simulation runs it: two rounds, the residual kept in the state.
    client_app._WORKER.clear()
    local_context = _context(config)
    local = [client_app.local_train(train(r), local_context) for r in (1, 2)]
    client_app._WORKER.clear()

    # Through a worker socket: the same replies to the bit, the same node state.
    warm_context = _context({**config, "worker-socket": worker_socket})
    loads = client_app.MODEL_LOADS[0]
    answer = client_app.query(query, warm_context)
    assert dict(answer.content.metric_records[NODE]) == {"partition-id": 1, "num-partitions": 4}
    remote = [client_app.train(train(r), warm_context) for r in (1, 2)]
    assert client_app.MODEL_LOADS[0] == loads + 1  # loaded once, for all three messages
    for mine, theirs in zip(local, remote, strict=True):
        assert theirs.metadata.message_type == MessageType.TRAIN
        a, b = _arrays(mine), _arrays(theirs)
        assert a == b and a
        m, t = mine.content.metric_records[METRICS], theirs.content.metric_records[METRICS]
        assert m["train-loss"] == t["train-loss"]
    # The node state (the error-feedback residual) came back from the worker as it is in-process.
    from flwr.common.serde import recorddict_to_proto

    assert (
        warm_context.state
        and recorddict_to_proto(warm_context.state).SerializeToString()
        == recorddict_to_proto(local_context.state).SerializeToString()
    )
    client_app._WORKER.clear()


def test_worker_errors_reach_the_client_as_errors(worker_socket, tiny_model_dir):
    query, _ = _messages(tiny_model_dir)
    context = _context({"num-partitions": 3, "worker-socket": worker_socket})  # no partition-id
    with pytest.raises(worker_link.WorkerError, match="partition-id"):
        client_app.query(query, context)
    client_app._WORKER.clear()


def test_no_worker_is_a_bounded_clear_error(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(worker_link, "CONNECT_WAIT_S", 0.3)
    query, _ = _messages(tiny_model_dir)
    context = _context(
        {"partition-id": 0, "num-partitions": 4, "worker-socket": str(tmp_path / "none.sock")}
    )
    started = time.monotonic()
    with pytest.raises(worker_link.WorkerError, match="no node worker at .*none.sock"):
        client_app.query(query, context)
    assert time.monotonic() - started < 5


def test_a_garbled_request_is_refused_and_the_worker_goes_on(worker_socket, tiny_model_dir):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(worker_socket)
        sock.sendall(worker_link.HEADER.pack(1 << 40))  # a length no frame may have
        sock.settimeout(10)
        assert sock.recv(16) == b""  # closed without an answer
    query, _ = _messages(tiny_model_dir)
    context = _context({"partition-id": 0, "num-partitions": 4, "worker-socket": worker_socket})
    answer = client_app.query(query, context)  # still serving
    assert answer.content.metric_records[NODE]["partition-id"] == 0
    client_app._WORKER.clear()


def test_a_second_worker_on_a_live_socket_is_refused(worker_socket):
    from pathlib import Path

    with pytest.raises(worker_link.WorkerError, match="already listens"):
        node_worker.serve(Path(worker_socket), lambda _: None)
    assert Path(worker_socket).stat().st_mode & 0o777 == 0o600

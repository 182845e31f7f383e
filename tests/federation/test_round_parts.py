"""The round's parts without an engine: reply schema, update checks, the norm rule, node waits,
seeded sampling, strategy state save/restore, resume points and status writes."""

from __future__ import annotations

import errno
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedtune.config import ConfigError, build_config, config_differences, with_num_clients
from fedtune.federation.messages import ReplyError, check_reply_metrics
from fedtune.federation.nodes import (
    ClientCountMismatch,
    NodeDirectory,
    NodeWaitTimeout,
    PartitionSampler,
    exchange,
    federation_clients,
)
from fedtune.federation.strategies import build_strategy, restore_strategy_state, strategy_state
from fedtune.federation.updates import ClientUpdate, drop_outliers, norm_reference, short_reason
from fedtune.model.loading import ModelError
from fedtune.rundir import RunDirectory, RunDirError

pytestmark = pytest.mark.usefixtures("task_identity")


GOOD = {
    "train-loss": 1.5,
    "num-examples": 50,
    "examples-seen": 8,
    "tokens": 900,
    "response-tokens": 300,
    "padded-tokens": 950,
    "learning-rate": 1e-3,
    "seconds": 2.0,
    "train-seconds": 1.5,
    "partition-id": 3,
}


def test_reply_metrics_schema():
    clean, extra = check_reply_metrics({**GOOD, "surprise": 1})
    assert clean["num-examples"] == 50 and isinstance(clean["num-examples"], int)
    assert extra == ["surprise"]
    for broken, reason in [
        ({k: v for k, v in GOOD.items() if k != "train-loss"}, "missing"),
        ({**GOOD, "num-examples": -333}, "below 1"),
        ({**GOOD, "num-examples": 0}, "below 1"),
        ({**GOOD, "num-examples": 2.5}, "not an integer"),
        ({**GOOD, "train-loss": float("nan")}, "not finite"),
        ({**GOOD, "tokens": True}, "not a number"),
    ]:
        with pytest.raises(ReplyError, match=reason):
            check_reply_metrics(broken)
    with pytest.raises(ReplyError, match="more than the 60 rows"):
        check_reply_metrics({**GOOD, "num-examples": 61}, max_examples=60)


def test_norm_rule_uses_history_else_the_cohorts_smallest():
    assert norm_reference([], [3.0, 1.0, 2000.0]) == 1.0
    assert norm_reference([[1.0, 3.0], [2.0]], [500.0]) == 2.0
    updates = [ClientUpdate(1, p, 1, norm=n) for p, n in enumerate([1.0, 1.2, 1000.0])]
    drop_outliers(updates, [], ratio=10)
    assert [u.usable for u in updates] == [True, True, False]
    assert "validate.update-norm-ratio" in (updates[2].problem or "")
    # Two clients, one ×1000: the smaller one sets the bar, the outlier goes.
    pair = [ClientUpdate(1, 0, 1, norm=2.0), ClientUpdate(2, 1, 1, norm=2000.0)]
    drop_outliers(pair, [], ratio=10)
    assert [u.usable for u in pair] == [True, False]
    off = [ClientUpdate(1, 0, 1, norm=1.0), ClientUpdate(2, 1, 1, norm=1e9)]
    drop_outliers(off, [], ratio=0)
    assert all(u.usable for u in off)


def test_short_reason_keeps_the_exception_line():
    trace = "Traceback (most recent call last):\n  File x\n    raise X\nRuntimeError: boom in p3\n"
    assert short_reason(trace) == "RuntimeError: boom in p3"
    assert len(short_reason("x" * 5000)) == 300


class FakeGrid:
    """Answers query messages for the nodes it holds; node ids as Flower's: arbitrary."""

    def __init__(
        self, partitions: dict[int, int], total: int, refusing: dict[int, str] | None = None
    ) -> None:
        self.partitions = partitions
        self.total = total
        self.refusing = refusing or {}  # node → the error its ClientApp raises
        self.asked: list[int] = []

    def get_node_ids(self):
        return [*self.partitions, *self.refusing]

    def push_messages(self, messages):
        """Flower's grids give each message an id as it is pushed; the answers wait for a pull."""
        from flwr.app import Error

        self.waiting = getattr(self, "waiting", {})
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"m{len(self.asked)}"
            node = message.metadata.dst_node_id
            self.asked.append(node)
            if node in self.refusing:
                reply = Message(Error(code=0, reason=self.refusing[node]), reply_to=message)
            else:
                record = MetricRecord(
                    {"partition-id": self.partitions[node], "num-partitions": self.total}
                )
                reply = Message(RecordDict({"node": record}), reply_to=message)
            self.waiting[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.waiting.pop(i) for i in list(message_ids) if i in self.waiting]


class _Clock:
    """A monotonic clock that advances only when the code under test sleeps."""

    def __init__(self):
        self.now = 0.0
        self.pauses: list[float] = []

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.pauses.append(seconds)
        self.now += seconds


class _LateGrid(FakeGrid):
    """A reply becomes visible only on the `late`-th pull after its message was pushed."""

    def __init__(self, late: dict[int, int], **kwargs):
        super().__init__(**kwargs)
        self.late = late  # node → pulls before its reply shows (absent: never answers)
        self.pulls = 0

    def pull_messages(self, message_ids):
        self.pulls += 1
        shown = []
        for i in list(message_ids):
            reply = self.waiting.get(i)
            if reply is not None and self.pulls >= self.late.get(reply.metadata.src_node_id, 1e9):
                shown.append(self.waiting.pop(i))
        return shown


def test_exchange_asks_soon_then_less_often_and_stops_at_its_timeout(monkeypatch):
    from flwr.app import ConfigRecord, MessageType

    from fedtune.federation import nodes as module

    def ask(grid, node_ids, timeout_s):
        messages = [
            Message(
                RecordDict({"q": ConfigRecord({})}), dst_node_id=n, message_type=MessageType.QUERY
            )
            for n in node_ids
        ]
        return exchange(grid, messages, timeout_s)

    clock = _Clock()
    monkeypatch.setattr(module, "time", clock)
    # Three nodes; the replies show on the 1st, 4th and 9th pull: all three, each once.
    grid = _LateGrid({1: 1, 2: 4, 3: 9}, partitions={1: 0, 2: 1, 3: 2}, total=3)
    replies = ask(grid, [1, 2, 3], timeout_s=60)
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3]
    assert grid.pulls == 9 and len(clock.pauses) == 8
    # The first pause is short, each later one longer, none longer than the cap.
    assert clock.pauses[0] == module.REPLY_POLL_FIRST_S
    assert all(b > a or b == module.REPLY_POLL_MAX_S for a, b in itertools.pairwise(clock.pauses))
    assert max(clock.pauses) == module.REPLY_POLL_MAX_S
    # A node that never answers: the wait ends at the timeout, with the replies that came.
    clock.now, clock.pauses = 0.0, []
    grid = _LateGrid({1: 2}, partitions={1: 0, 4: 3}, total=4)
    replies = ask(grid, [1, 4], timeout_s=5)
    assert [r.metadata.src_node_id for r in replies] == [1]
    assert clock.now == pytest.approx(5.0) and sum(clock.pauses) == pytest.approx(5.0)


def test_node_directory_maps_partitions_and_bounds_the_wait():
    grid = FakeGrid({9001: 2, 7: 0, 123456789: 1}, total=4)
    nodes = NodeDirectory(grid, {}, 4, wait_s=0.3, poll_s=0.05)
    assert nodes.available(need=3) == [0, 1, 2]
    assert nodes.node_of == {2: 9001, 0: 7, 1: 123456789}
    with pytest.raises(NodeWaitTimeout, match="waited 0 s for 4 nodes: 3 ready of 4; start"):
        nodes.available(need=4)
    assert nodes.available(need=4, minimum=2) == [0, 1, 2]  # settles when the wait runs out
    # A node leaves; its partition comes back under a new node id (a restarted node).
    del grid.partitions[9001]
    grid.partitions[55] = 2
    assert nodes.available(need=3) == [0, 1, 2] and nodes.node_of[2] == 55
    asked = len(grid.asked)
    nodes.available(need=3)
    assert len(grid.asked) == asked  # known nodes are not asked again
    # Nodes of another federation size: refused at their first answer, not after the wait.
    wrong = NodeDirectory(FakeGrid({1: 0}, total=2), {}, 20, wait_s=300)
    started = time.monotonic()
    with pytest.raises(ClientCountMismatch) as refused:
        wrong.available(need=1)
    assert time.monotonic() - started < 5
    message = str(refused.value)
    assert "hold 2 partitions but federation.num-clients is 20" in message
    assert 'federation.num-clients=2"' in message and "--num-supernodes 20" in message


def test_the_node_wait_tells_absent_nodes_from_nodes_that_answered_with_an_error():
    grid = FakeGrid({5: 0}, total=3, refusing={8: "Traceback …\nValueError: no GPU on this node"})
    nodes = NodeDirectory(grid, {}, 3, wait_s=0.2, poll_s=0.05)
    with pytest.raises(NodeWaitTimeout) as timeout:
        nodes.available(need=3)
    assert str(timeout.value).startswith(
        "waited 0 s for 3 nodes: 1 ready of 3; 1 more connected but answered with an error "
        "(node 8: ValueError: no GPU on this node)"
    )


def test_a_count_of_zero_is_the_federations():
    assert federation_clients(FakeGrid({4: 1, 9: 0}, total=2), {}, 1.0, lambda _: None) == 2
    with pytest.raises(NodeWaitTimeout, match="for 1 nodes: 0 ready;"):
        federation_clients(FakeGrid({}, total=2), {}, 0.1, lambda _: None)
    config = build_config({"federation.num-clients": 0})
    assert config.federation.auto_clients
    with pytest.raises(ConfigError, match="resolve it first"):
        _ = config.sampled_clients
    assert with_num_clients(config, 2).sampled_clients == 1  # 0.1 of 2, at least 1
    assert with_num_clients(config, 20).sampled_clients == 2
    with pytest.raises(ConfigError, match="3 clients per round but only 2"):
        with_num_clients(build_config({"strategy.clients-per-round": 3}), 2)
    assert (
        with_num_clients(build_config({"federation.num-clients": 7}), 2).federation.num_clients == 7
    )


def test_sampler_is_seeded_and_resumable():
    a, b = PartitionSampler(2024), PartitionSampler(2024)
    draws = [a.sample(list(range(20)), 2) for _ in range(5)]
    assert draws == [b.sample(list(range(20)), 2) for _ in range(5)]
    saved = json.loads(json.dumps(a.state()))
    after = [a.sample(list(range(20)), 2) for _ in range(3)]
    c = PartitionSampler(0)
    c.set_state(saved)
    assert [c.sample(list(range(20)), 2) for _ in range(3)] == after
    assert 5 not in PartitionSampler(1).sample(list(range(6)), 5, exclude={5})


def _reply(arrays: dict, weight: int) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": weight, "train-loss": 1.0}),
        }
    )
    msg = Message(content, dst_node_id=1, message_type="train")
    return Message(content, reply_to=msg)


@pytest.mark.parametrize(
    "name",
    [
        "fedavg",
        "fedavgm",
        "fedprox",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "fedmedian",
        "fedtrimmedavg",
    ],
)
def test_strategy_state_round_trips_exactly(name):
    config = build_config({"strategy.name": name})
    rng = np.random.default_rng(0)
    start = {
        "a": rng.normal(size=(4, 3)).astype(np.float32),
        "b": rng.normal(size=5).astype(np.float32),
    }

    def one_round(strategy, arrays, server_round):
        record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        strategy.configure_train(
            server_round, record, __import__("flwr").app.ConfigRecord(), FakeGrid({1: 0}, 1)
        )
        replies = [
            _reply(
                {
                    k: v + rng_round.normal(size=v.shape).astype(np.float32) * 0.01
                    for k, v in arrays.items()
                },
                w,
            )
            for w in (3, 5)
        ]
        out, _ = strategy.aggregate_train(server_round, replies)
        return {k: a.numpy() for k, a in out.items()}

    rng_round = np.random.default_rng(1)
    first = build_strategy(config)
    arrays = one_round(first, start, 1)
    tensors, described = strategy_state(first)
    if name in ("fedavg", "fedprox", "fedmedian", "fedtrimmedavg"):
        assert tensors == {}
    else:
        assert tensors, f"{name} keeps state between rounds"
    saved_rng = rng_round.bit_generator.state
    continued = one_round(first, arrays, 2)
    second = build_strategy(config)
    restore_strategy_state(second, tensors, described)
    rng_round.bit_generator.state = saved_rng
    resumed = one_round(second, arrays, 2)
    for key in continued:
        assert np.array_equal(continued[key], resumed[key]), key


def test_config_digest_ignores_run_keys_and_differences_are_named():
    a = build_config({"run.name": "x", "run.output-dir": "/tmp/a"})
    b = build_config({"run.name": "y", "run.resume": "/tmp/a/x"})
    assert a.digest() == b.digest()
    assert build_config({"train.seed": 1}).digest() != a.digest()
    assert config_differences(a.to_flat(), build_config({"num-server-rounds": 9}).to_flat()) == [
        "num-server-rounds: 5 → 9"
    ]
    # A run recorded before a key existed resumes under a fedtune that has it at its default.
    older = {k: v for k, v in a.to_flat().items() if k != "model.lora.client-ranks"}
    assert config_differences(older, a.to_flat()) == []
    assert config_differences(older, {**a.to_flat(), "model.lora.client-ranks": "4"}) == [
        "model.lora.client-ranks: '<unset>' → '4'"
    ]


def test_strategy_keys_are_checked():
    from fedtune.config import ConfigError

    with pytest.raises(
        ConfigError,
        match="strategy.name: must be one of fedavg, fedavgm, fedprox, scaffold, fedadam",
    ):
        build_config({"strategy.name": "fedsgd"})
    with pytest.raises(ConfigError, match="applies to strategy.name=fedavgm, not fedavg"):
        build_config({"strategy.fedavgm.server-momentum": 0.5})
    with pytest.raises(ConfigError, match="strategy.min-clients: must be in \\[1, 2\\]"):
        build_config({"strategy.min-clients": 3, "federation.num-clients": 20})


def test_resume_point_survives_a_half_written_successor(tmp_path):
    run_dir = RunDirectory(tmp_path)
    run_dir.write_resume_point(1, {"w": torch.arange(4.0)}, {"note": "one"})
    # A later point half written (killed before the pointer moved): the old one stands.
    stale = tmp_path / "checkpoints" / ".state-00002.tmp-999"
    stale.mkdir()
    (stale / "tensors.safetensors").write_bytes(b"half")
    state, tensors = run_dir.read_resume_point()
    assert state["round"] == 1 and torch.equal(tensors["w"], torch.arange(4.0))
    run_dir.write_resume_point(2, {"w": torch.ones(4)}, {"note": "two"})
    assert not stale.exists() and not (tmp_path / "checkpoints" / "state-00001").exists()
    (tmp_path / "checkpoints" / "state-00002" / "tensors.safetensors").write_bytes(b"changed")
    with pytest.raises(RunDirError, match="damaged"):
        run_dir.read_resume_point()


def test_logs_are_cut_back_to_the_resume_point(tmp_path):
    run_dir = RunDirectory(tmp_path)
    run_dir.log_round({"round": 1}, [{"round": 1}])
    positions = run_dir.log_positions()
    run_dir.log_round({"round": 2}, [{"round": 2}])
    dropped = run_dir.cut_logs(positions)
    assert dropped["metrics.jsonl"] > 0
    assert (tmp_path / "metrics.jsonl").read_text() == '{"round": 1}\n'
    with pytest.raises(RunDirError, match="changed after the run"):
        run_dir.cut_logs({"metrics.jsonl": 10_000})


def test_log_tail_reads_what_a_cut_drops_skipping_a_torn_line(tmp_path):
    run_dir = RunDirectory(tmp_path)
    run_dir.log_round({"round": 1}, [])
    position = run_dir.log_positions()["metrics.jsonl"]
    run_dir.log_round({"round": 2}, [])
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"round": 3, "tor')  # the write a kill interrupted
    assert run_dir.log_tail("metrics.jsonl", position) == [{"round": 2}]
    assert run_dir.log_tail("metrics.jsonl", 0) == [{"round": 1}, {"round": 2}]
    assert run_dir.log_tail("ledger.jsonl", 0) == []


def test_status_is_recorded_when_the_disk_is_full(tmp_path, monkeypatch):
    run_dir = RunDirectory(tmp_path)
    run_dir.set_status("running", rounds_completed=3, note="x" * 200)

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    run_dir.set_status("failed", error="No space left on device")
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "failed" and status["pid"] == os.getpid()


def test_resume_recognises_dead_live_and_finished_runs(tmp_path):
    run_dir = RunDirectory(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    run_dir.set_status("running")  # this process: alive, but it is us
    RunDirectory.open_for_resume(tmp_path)
    status = json.loads((tmp_path / "status.json").read_text())
    (tmp_path / "status.json").write_text(json.dumps({**status, "pid": 1}))  # init: alive
    with pytest.raises(RunDirError, match="still running"):
        RunDirectory.open_for_resume(tmp_path)
    (tmp_path / "status.json").write_text(json.dumps({**status, "pid": 2**22 + 7}))  # gone
    RunDirectory.open_for_resume(tmp_path)
    run_dir.set_status("completed")
    with pytest.raises(RunDirError, match="already ended"):
        RunDirectory.open_for_resume(tmp_path)


def test_a_resume_in_progress_is_claimed_and_refuses_a_second(tmp_path):
    run_dir = RunDirectory(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    run_dir.set_status("failed", rounds_completed=3, error="boom")
    RunDirectory.open_for_resume(tmp_path).claim_for_resume()
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "resuming" and status["rounds_completed"] == 3
    assert status["previous_state"] == "failed" and status["previous_error"] == "boom"
    (tmp_path / "status.json").write_text(json.dumps({**status, "pid": 1}))  # another, alive
    with pytest.raises(RunDirError, match="still running"):
        RunDirectory.open_for_resume(tmp_path)


def test_a_resume_point_the_disk_refuses_leaves_no_staging(tmp_path, monkeypatch):
    import safetensors.torch
    import torch

    run_dir = RunDirectory(tmp_path)
    run_dir.write_resume_point(1, {"w": torch.zeros(2)}, {"round": 1})

    def full(_tensors, filename, **_kwargs):
        Path(filename).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match="No space left"):
        run_dir.write_resume_point(2, {"w": torch.ones(2)}, {"round": 2})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "resume-point",
        "state-00001",
    ]
    state, tensors = run_dir.read_resume_point()
    assert state["round"] == 1 and tensors["w"].sum() == 0


def test_server_evaluations_are_due_before_every_n_rounds_and_after_the_last():
    from fedtune.federation.server_app import ServerEvaluator

    evaluator = ServerEvaluator(
        model=None,
        tokenizer=None,
        device="cpu",
        probe_examples=[],
        heldout_examples=["row"],
        mmlu_questions=["question"],
        mmlu_protocol="loglik",
        mmlu_every=4,
        num_rounds=7,
        heldout_every=3,
    )
    assert [r for r in range(8) if evaluator.heldout_due(r)] == [0, 3, 6, 7]
    assert [r for r in range(8) if evaluator.mmlu_due(r)] == [0, 4, 7]
    evaluator.heldout_examples = []
    assert not any(evaluator.heldout_due(r) for r in range(8))
    from fedtune.config import ConfigError

    with pytest.raises(ConfigError, match="eval.heldout-every-rounds"):
        build_config({"eval.heldout-every-rounds": 0})


@pytest.mark.parametrize(
    ("cores", "sampled", "client_cpus", "expected"),
    [
        (2, 2, None, 2.0),  # a 2-core machine: one worker, two threads
        (1, 2, None, 1.0),  # never more than the machine has (Ray could not place it)
        (16, 2, None, 8.0),  # the cores split over the round's clients
        (64, 20, None, 3.0),
        (16, 20, None, 2.0),  # Flower's floor of 2 cores per client
        (2, 2, 1.0, 1.0),  # --client-cpus wins
    ],
)
def test_simulation_workers_get_at_least_two_cores_on_cpu(
    monkeypatch: pytest.MonkeyPatch, cores: int, sampled: int, client_cpus: float | None, expected
) -> None:
    from fedtune.runtime.engine import backend_config

    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    backend = backend_config(sampled, client_cpus, None)
    assert backend["client_resources"]["num_cpus"] == expected
    assert backend["client_resources"]["num_gpus"] == 0.0
    assert backend["init_args"]["num_cpus"] == cores


def test_the_deployment_grid_gives_up_on_a_dead_superlink_within_the_link_wait(
    tmp_path, tiny_model_dir
):
    """Flower's HTTP grid retries a SuperLink that does not answer forever; fedtune bounds it
    (strategy.link-wait-s) and the run fails with a message that names the SuperLink."""
    from flwr.superlink.grid.http_grid import HttpGrid

    from fedtune.federation.progress import Progress
    from fedtune.federation.server_app import bound_link_wait, serve
    from fedtune.runtime.local import free_port

    grid = HttpGrid(f"127.0.0.1:{free_port()}", insecure=True, token="t")  # nothing listens
    errors = bound_link_wait(grid, 2.0)
    assert errors
    started = time.monotonic()
    with pytest.raises(errors):
        grid.get_node_ids()
    assert time.monotonic() - started < 10

    config = build_config(
        {
            "model.name": str(tiny_model_dir),
            "strategy.link-wait-s": 2.0,
            "federation.num-clients": 20,
            "data.heldout-examples": 0,
            "eval.probe-examples": 0,
            "run.output-dir": str(tmp_path),
        }
    )
    run_dir = RunDirectory.create(config, ["test"])

    grid = HttpGrid(f"127.0.0.1:{free_port()}", insecure=True, token="t")
    with pytest.raises(errors):
        serve(grid, config, run_dir, Progress(config.federation.num_rounds, lambda line: None))
    status = run_dir.status()
    assert status["state"] == "failed" and status["resumable"]
    assert "SuperLink did not answer for 2 s (strategy.link-wait-s)" in status["error"]


def test_the_simulation_grid_has_nothing_to_bound():
    from fedtune.federation.server_app import bound_link_wait

    assert bound_link_wait(object(), 2.0) == ()


@pytest.mark.parametrize(
    "error,resumable",
    [
        (RuntimeError("a node crashed"), True),
        (ModelError("model.name: cannot load 'x/y'"), False),
        (ClientCountMismatch("hold 2 partitions but federation.num-clients is 20"), False),
    ],
)
def test_a_failure_suggests_resuming_only_when_a_resume_can_cure_it(
    tmp_path, monkeypatch, error, resumable
):
    from fedtune.federation import server_app
    from fedtune.federation.progress import Progress

    def fail(*_args):
        raise error

    monkeypatch.setattr(server_app, "run_federation", fail)
    config = build_config({"federation.num-clients": 4, "run.output-dir": str(tmp_path)})
    run_dir = RunDirectory.create(config, ["test"])
    notes: list[str] = []
    with pytest.raises(type(error)):
        server_app.serve(object(), config, run_dir, Progress(1, notes.append))
    status = run_dir.status()
    assert status["state"] == "failed" and status["resumable"] is resumable
    assert str(error) in status["error"]
    assert any("--resume" in n for n in notes) is resumable

"""A real ClientApp that wraps fedtune's and injects faults, for tests through the simulation engine.

`fedtune run --client-app faultapp:app` (with tests/federation on PYTHONPATH) reads the faults from
the JSON list in FEDTUNE_TEST_FAULTS; each is {"round": R, "partition": P, "kind": K, ...}:
- raise, sleep (seconds), crash (the worker process dies), nan, shape, scale (×1000 adapter),
  no-loss (train-loss missing), extra-metric, negative-examples, huge-examples, nan-loss;
- kill-run: SIGKILL the `fedtune run` process (its pid is in the file FEDTUNE_TEST_PIDFILE)
  while this client trains (a kill mid-round).
Server side (this module is imported by the engine process too): {"kind": "kill-in-checkpoint",
"round": R} SIGKILLs `fedtune run` and the engine while round R's resume point is half written.
"""

from __future__ import annotations

import json
import os
import signal
import time

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune.federation import client_app as fedtune_client
from fedtune.federation.messages import ARRAYS, METRICS, STRATEGY_CONFIG

FAULTS = json.loads(os.environ.get("FEDTUNE_TEST_FAULTS", "[]"))
app = ClientApp()


def _kill_run() -> None:
    with open(os.environ["FEDTUNE_TEST_PIDFILE"]) as handle:
        os.kill(int(handle.read().strip()), signal.SIGKILL)


def _fault(server_round: int, partition: int) -> dict | None:
    for fault in FAULTS:
        if fault.get("round") == server_round and fault.get("partition") in (partition, None):
            return fault
    return None


@app.train()
def train(msg: Message, context: Context) -> Message:
    server_round = int(msg.content[STRATEGY_CONFIG]["server-round"])
    partition = int(context.node_config["partition-id"])
    fault = _fault(server_round, partition) or {}
    kind = fault.get("kind")
    if kind == "raise":
        raise RuntimeError(f"injected failure in partition {partition}")
    if kind == "crash":
        os._exit(3)
    if kind == "kill-run":
        _kill_run()
        time.sleep(30)
    reply = fedtune_client.local_train(msg, context)
    if kind == "sleep":
        time.sleep(float(fault["seconds"]))
    arrays = reply.content.array_records[ARRAYS]  # as the uplink codec encoded it
    metrics = dict(reply.content.metric_records[METRICS])
    if kind in ("nan", "shape", "scale"):  # (plain fp32 arrays only)
        state = arrays.to_torch_state_dict()
        first = sorted(state)[0]
        if kind == "nan":
            state[first].view(-1)[0] = float("nan")
        elif kind == "shape":
            state[first] = state[first][:-1]
        else:
            state = {k: v * 1000 for k, v in state.items()}
        arrays = ArrayRecord(state)
    elif kind == "no-loss":
        metrics.pop("train-loss")
    elif kind == "extra-metric":
        metrics["surprise"] = 1.0
    elif kind == "negative-examples":
        metrics["num-examples"] = -333
    elif kind == "huge-examples":
        metrics["num-examples"] = 10**12
    elif kind == "nan-loss":
        metrics["train-loss"] = float("nan")
    content = RecordDict({ARRAYS: arrays, METRICS: MetricRecord(metrics)})
    for name, record in reply.content.array_records.items():  # a strategy's extra records
        if name != ARRAYS:
            content[name] = record
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return fedtune_client.describe_node(msg, context)


def _patch_checkpoint_kill() -> None:
    rounds = {f["round"] for f in FAULTS if f.get("kind") == "kill-in-checkpoint"}
    if not rounds:
        return
    from fedtune.rundir import RunDirectory

    original = RunDirectory.write_resume_point

    def write_then_die(self, server_round, tensors, state):  # type: ignore[no-untyped-def]
        if server_round in rounds:
            staging = self.path / "checkpoints" / f".state-{server_round:05d}.tmp-{os.getpid()}"
            staging.mkdir(parents=True, exist_ok=True)
            (staging / "tensors.safetensors").write_bytes(b"half a file")
            _kill_run()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, server_round, tensors, state)

    RunDirectory.write_resume_point = write_then_die  # type: ignore[method-assign]


_patch_checkpoint_kill()

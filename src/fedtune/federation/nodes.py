"""Which node holds which partition, and which partitions train each round.

Flower's node ids are random (`os.urandom` in the simulation engine; assigned by the SuperLink in
deployment) and its `sample_nodes` draws from a set, so sampling nodes is not reproducible. fedtune
samples *partition ids* with its own seeded generator and maps them to nodes. The map is learned by
asking each node which partition it holds (a query message answered from its node config),
refreshed when nodes join or leave. Every wait for nodes is bounded by `strategy.node-wait-s`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from fedtune.federation.messages import NODE, RUN_CONFIG


class NodeWaitTimeout(RuntimeError):
    """Not enough nodes connected (or answered) within strategy.node-wait-s."""


class ClientCountMismatch(ValueError):
    """The federation's nodes hold another number of partitions than federation.num-clients."""


def simulation_size_command(supernodes: int) -> str:
    """Flower's command that gives its local simulation federation `supernodes` SuperNodes."""
    return f"flwr federation simulation-config --num-supernodes {supernodes}"


def count_mismatch_message(nodes: int, configured: int) -> str:
    """Both numbers and the two ways to make them agree."""
    return (
        f"the federation's SuperNodes hold {nodes} partitions but federation.num-clients is "
        f'{configured}. Either run with --run-config "federation.num-clients={nodes}" (or 0: '
        f"as many clients as the federation has), or give the federation {configured} SuperNodes: "
        f"`{simulation_size_command(configured)}` for Flower's local "
        f"simulation, `fedtune federation up --nodes {configured}` for a local deployment"
    )


# How often a wait for replies asks the SuperLink: soon after sending (a tiny round answers within
# a second), then less often, never more than REPLY_POLL_MAX_S apart.
REPLY_POLL_FIRST_S = 0.05
REPLY_POLL_MAX_S = 0.5


def exchange(grid: Any, messages: list[Any], timeout_s: float) -> list[Any]:
    """Send `messages`; their replies as they come, until all have come or `timeout_s` ran out.

    Flower's own `grid.send_and_receive` asks the deployment engine's SuperLink for replies
    every 3 s, so each round waits 1.5 s on average after its last reply arrived; this asks
    every 50 ms at first, backing off to 0.5 s (the simulation engine's grid answers from
    memory either way). The semantics are Flower's: replies to the messages sent, none twice.
    """
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout_s
    replies: list[Any] = []
    pause = REPLY_POLL_FIRST_S
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(reply.metadata.reply_to_message_id for reply in got)
        left = deadline - time.monotonic()
        if not pending or left <= 0:
            break
        time.sleep(min(pause, left))
        pause = min(pause * 1.5, REPLY_POLL_MAX_S)
    return replies


class NodeDirectory:
    """partition id ↔ node id for the nodes currently connected."""

    def __init__(
        self,
        grid: Any,
        run_config: dict[str, Any],
        num_partitions: int,
        wait_s: float,
        note: Callable[[str], None] = lambda _: None,
        poll_s: float = 1.0,
    ) -> None:
        self.grid = grid
        self.run_config = run_config
        self.num_partitions = num_partitions
        self.wait_s = wait_s
        self.note = note
        self.poll_s = poll_s
        self.node_of: dict[int, int] = {}  # partition → node
        self.partition_of: dict[int, int] = {}  # node → partition
        self.refused: dict[int, str] = {}  # node → the error it answered with (asked again)
        self.reported_total = 0  # the number of partitions the nodes report (0: none yet)

    def refresh(self, timeout_s: float) -> None:
        """Forget nodes that left; ask new nodes which partition they hold."""
        from flwr.app import ConfigRecord, Message, MessageType, RecordDict

        connected = set(self.grid.get_node_ids())
        for node in [n for n in self.partition_of if n not in connected]:
            self.node_of.pop(self.partition_of.pop(node), None)
        unknown = sorted(connected - set(self.partition_of))
        if not unknown:
            return
        content = RecordDict({RUN_CONFIG: ConfigRecord(self.run_config)})
        messages = [
            Message(content=content, dst_node_id=node, message_type=MessageType.QUERY)
            for node in unknown
        ]
        for reply in exchange(self.grid, messages, max(timeout_s, 1.0)):
            node = reply.metadata.src_node_id
            if reply.has_error() or NODE not in reply.content.metric_records:
                # Asked again on the next refresh; the wait's end says what it answered.
                reason = reply.error.reason if reply.has_error() else "no node record"
                self.refused[node] = str(reason).strip().splitlines()[-1][:300] if reason else "?"
                continue
            self.refused.pop(node, None)
            info = reply.content.metric_records[NODE]
            partition, total = int(info["partition-id"]), int(info["num-partitions"])  # type: ignore[arg-type]
            if self.num_partitions and total != self.num_partitions:
                raise ClientCountMismatch(count_mismatch_message(total, self.num_partitions))
            if self.reported_total and total != self.reported_total:
                raise ClientCountMismatch(
                    f"the federation's SuperNodes disagree: node {node} holds partition "
                    f"{partition} of {total}, others of {self.reported_total}"
                )
            self.reported_total = total
            if not 0 <= partition < total:
                raise ValueError(f"node {node} reports partition {partition} of {total}")
            previous = self.node_of.get(partition)
            if previous is not None and previous != node:
                # The same partition under a new node id: a node that restarted. Newest wins.
                self.partition_of.pop(previous, None)
            self.node_of[partition] = node
            self.partition_of[node] = partition

    def available(self, need: int, minimum: int | None = None) -> list[int]:
        """Partition ids with a connected node, as soon as `need` are known; when
        strategy.node-wait-s runs out, whatever is known if that is at least `minimum`.

        Raises:
            NodeWaitTimeout: fewer than `minimum` (default `need`) after the wait.
        """
        minimum = need if minimum is None else minimum
        deadline = time.monotonic() + self.wait_s
        announced = False
        while True:
            self.refresh(timeout_s=deadline - time.monotonic())
            if len(self.node_of) >= need:
                return sorted(self.node_of)
            left = deadline - time.monotonic()
            if left <= 0 and len(self.node_of) >= minimum:
                return sorted(self.node_of)
            if left <= 0:
                raise NodeWaitTimeout(self._timeout_message(minimum))
            if not announced:
                self.note(
                    f"waiting up to {self.wait_s:.0f} s for {need} nodes "
                    f"({len(self.node_of)} connected)"
                )
                announced = True
            time.sleep(min(self.poll_s, max(left, 0.0)))

    def _timeout_message(self, minimum: int) -> str:
        of = f" of {self.num_partitions}" if self.num_partitions else ""
        message = f"waited {self.wait_s:.0f} s for {minimum} nodes: {len(self.node_of)} ready{of}"
        if self.refused:
            node, reason = next(iter(self.refused.items()))
            message += (
                f"; {len(self.refused)} more connected but answered with an error (node {node}: "
                f"{reason})"
            )
        return message + "; start more nodes or raise strategy.node-wait-s"


def federation_clients(
    grid: Any, run_config: dict[str, Any], wait_s: float, note: Callable[[str], None]
) -> int:
    """How many partitions the federation's nodes hold (their node config's num-partitions):
    what `federation.num-clients = 0` becomes. Waits (up to `wait_s`) for one node to answer.

    Raises:
        NodeWaitTimeout: no node answered in time.
        ClientCountMismatch: nodes that disagree.
    """
    directory = NodeDirectory(grid, run_config, 0, wait_s, note=note)
    directory.available(1)
    return directory.reported_total


class PartitionSampler:
    """Seeded choice of partitions: same seed and same available partitions → same choice."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def sample(
        self, available: list[int], count: int, exclude: set[int] | None = None
    ) -> list[int]:
        pool = sorted(set(available) - (exclude or set()))
        return sorted(self.rng.sample(pool, min(count, len(pool))))

    def state(self) -> list[Any]:
        version, internal, gauss = self.rng.getstate()
        return [version, list(internal), gauss]

    def set_state(self, state: list[Any]) -> None:
        version, internal, gauss = state
        self.rng.setstate((version, tuple(internal), gauss))

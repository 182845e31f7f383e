"""Token-level plumbing shared by both protocols: the common prompt prefix, length buckets, the
prefix KV cache.

Every prompt of a protocol starts with the same tokens (flowertune: `<|im_start|>question\\nAnswer
the following multiple choice question.\\nQuestion:`, 13 tokens on SmolLM2; loglik: the subject
description, ~16 tokens). They are run through the model once and their keys/values reused for every
batch, so each question costs only its own tokens. Questions whose remainders still start alike
(several history questions on one source passage) get that shared part computed once as well. The
rest is grouped into buckets of (nearly) equal remaining length; with `pad_tolerance=0` a bucket
holds equal lengths only and no padding token is ever computed. On a CPU the buckets run side by
side on single-threaded workers, and the output layer is handed a contiguous input (see
`contiguous_head_input`).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by all sequences, leaving each at least one token
    of its own."""
    if not sequences:
        return 0
    first = sequences[0]
    length = min(len(s) for s in sequences) - 1
    for sequence in sequences[1:]:
        limit = min(length, len(sequence))
        position = 0
        while position < limit and sequence[position] == first[position]:
            position += 1
        length = position
        if length == 0:
            break
    return max(length, 0)


def shared_runs(
    sequences: Sequence[Sequence[int]], min_shared: int
) -> tuple[list[tuple[list[int], int]], list[int]]:
    """Find sequences that start with the same `min_shared`+ tokens (e.g. questions on one passage).

    Sorting puts sequences that share a start next to each other; a run keeps the longest start all
    its members share, always leaving each member at least one token of its own.

    Args:
        sequences: token lists.
        min_shared: the shortest shared start worth computing once (0 disables the search).

    Returns:
        (runs, alone): runs as (member indices, shared length), each with at least two members; the
        indices of the remaining sequences.
    """
    if min_shared <= 0:
        return [], list(range(len(sequences)))
    order = sorted(range(len(sequences)), key=lambda i: list(sequences[i]))
    runs: list[tuple[list[int], int]] = []
    alone: list[int] = []
    start = 0
    while start < len(order):
        first = sequences[order[start]]
        shared = len(first) - 1
        end = start + 1
        while end < len(order):
            other = sequences[order[end]]
            common = min(common_prefix_length([first, other]), len(other) - 1, shared)
            if common < min_shared:
                break
            shared, end = common, end + 1
        if end - start > 1:
            runs.append(([order[k] for k in range(start, end)], shared))
        else:
            alone.append(order[start])
        start = end
    return runs, alone


@dataclass(frozen=True)
class Bucket:
    """Indices of questions run together, and the length their suffixes are left-padded to."""

    indices: tuple[int, ...]
    length: int


def make_buckets(
    lengths: Sequence[int], *, max_batch: int, max_tokens: int, pad_tolerance: int = 0
) -> list[Bucket]:
    """Group items by length, longest first (`schedule` decides the order they run in).

    Args:
        lengths: token count of each item.
        max_batch: most items in one bucket.
        max_tokens: most tokens (items × padded length) in one bucket; an item longer than this runs
            alone.
        pad_tolerance: largest allowed difference between the longest and shortest item of a bucket
            (0: no padding).

    Returns:
        Buckets covering every index once.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    buckets: list[Bucket] = []
    current: list[int] = []
    for index in order:
        if current:
            longest = lengths[current[0]]
            fits = (
                len(current) < max_batch
                and longest - lengths[index] <= pad_tolerance
                and (len(current) + 1) * longest <= max_tokens
            )
            if not fits:
                buckets.append(Bucket(tuple(current), lengths[current[0]]))
                current = []
        current.append(index)
    if current:
        buckets.append(Bucket(tuple(current), lengths[current[0]]))
    return buckets


class PrefixCache:
    """The keys and values of a shared token prefix, computed once and handed out per batch."""

    def __init__(
        self, model: Any, prefix_ids: Sequence[int], base: PrefixCache | None = None
    ) -> None:
        """Run the prefix through the model once.

        Args:
            model: a causal LM (possibly PEFT-wrapped) in eval mode.
            prefix_ids: the shared prefix tokens (may be empty); with `base`, the tokens after it.
            base: an already computed shorter prefix that this one extends.
        """
        import torch

        self.length: int = len(prefix_ids) + (base.length if base else 0)
        self._config = _base_config(model)
        self._layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        if not prefix_ids:
            self._layers = list(base._layers) if base else []
            return
        device = _device_of(model)
        kwargs: dict[str, Any] = {}
        if base is not None and base.length:
            kwargs[_cache_argument(model)] = base.for_batch(1)
        with torch.inference_mode():
            out = model(
                input_ids=torch.tensor([list(prefix_ids)], device=device),
                use_cache=True,
                logits_to_keep=1,
                **kwargs,
            )
        cache = out.cache if "cache" in out else out.past_key_values
        self._layers = [(layer.keys, layer.values) for layer in cache.layers]

    def for_batch(self, batch_size: int) -> Any:
        """A fresh cache holding the prefix for `batch_size` rows (the model appends to it in
        place)."""
        from transformers import DynamicCache

        if not self._layers:
            return None
        # expand() shares the prefix memory; the first torch.cat in the model's update makes the
        # batch copy.
        data = [
            (k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1))
            for k, v in self._layers
        ]
        return DynamicCache(data, config=self._config)


def _base_config(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


def _cache_argument(model: Any) -> str:
    # transformers renamed `past_key_values` to `cache` (5.2x); the old name still works there, with
    # a warning.
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


def run_bucket(
    model: Any,
    prefix: PrefixCache,
    suffixes: Sequence[Sequence[int]],
    pad_id: int,
) -> torch.Tensor:
    """Next-token logits after each prompt of a bucket: one forward pass, logits at the last
    position only.

    The suffixes (prompt tokens after the shared prefix) are left-padded to the longest; padding
    sits between the prefix and the suffix, masked out, and position ids continue the prefix as if
    it were not there.

    Args:
        model: the causal LM.
        prefix: the shared prefix cache.
        suffixes: token ids of each prompt after the prefix (each non-empty).
        pad_id: the token written in padded slots (never attended to).

    Returns:
        float32 logits, shape [batch, vocab].
    """
    import torch

    device = _device_of(model)
    batch = len(suffixes)
    width = max(len(s) for s in suffixes)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, prefix.length + width), dtype=torch.long)
    mask[:, : prefix.length] = 1
    for row, suffix in enumerate(suffixes):
        ids[row, width - len(suffix) :] = torch.tensor(list(suffix), dtype=torch.long)
        mask[row, prefix.length + width - len(suffix) :] = 1
    kwargs: dict[str, Any] = {"input_ids": ids.to(device), "use_cache": True, "logits_to_keep": 1}
    cache = prefix.for_batch(batch)
    if cache is not None:
        kwargs[_cache_argument(model)] = cache
    if any(len(s) != width for s in suffixes):
        # positions count real tokens only: prefix.length, prefix.length + 1, ... for each row's
        # suffix.
        positions = (mask[:, prefix.length :].cumsum(dim=1) - 1).clamp(min=0) + prefix.length
        kwargs["attention_mask"] = mask.to(device)
        kwargs["position_ids"] = positions.to(device)
    with torch.inference_mode():
        logits = model(**kwargs).logits
    return logits[:, -1, :].float()


@dataclass(frozen=True)
class BatchPlan:
    """How prompts are batched.

    Attributes:
        max_batch: most prompts per forward pass.
        max_tokens: most suffix tokens (rows × padded width) per forward pass.
        pad_tolerance: largest length spread inside a batch, in tokens (CPU: 4; a compute-bound CPU
            gains little from wider batches, so padding must stay near zero).
        min_shared_tokens: prompts whose remainders after the common prefix still share this many
            leading tokens (MMLU history questions share source passages of 300–700 tokens; all
            moral_scenarios questions share a 40-token preamble) get that part computed once too.
        workers: forward passes run at once, each on `threads` intra-op threads (CPU: one worker
            per core, one thread each; a 135M model's matrices are too small for several threads
            to share one product well, so independent batches side by side keep the cores busier).
        threads: intra-op threads per worker (0: leave torch's setting alone).
    """

    max_batch: int = 16
    max_tokens: int = 4096
    pad_tolerance: int = 4
    min_shared_tokens: int = 32
    workers: int = 1
    threads: int = 0

    @classmethod
    def for_device(cls, device: str) -> BatchPlan:
        """CPU: near-equal-length buckets, one single-threaded worker per core (at most 16).
        GPU: wide batches, some padding to fill them, one stream."""
        if device.startswith("cuda"):
            return cls(max_batch=64, max_tokens=32768, pad_tolerance=32)
        import torch

        cores = max(1, torch.get_num_threads())
        workers = min(cores, 16)
        return cls(workers=workers, threads=max(1, cores // workers))


Task = Callable[[], list[tuple[int, "torch.Tensor"]]]


def _bucket_task(
    model: Any, cache: PrefixCache, items: Sequence[tuple[int, Sequence[int]]], pad_id: int
) -> Task:
    def task() -> list[tuple[int, torch.Tensor]]:
        logits = run_bucket(model, cache, [tokens for _, tokens in items], pad_id)
        return [(index, logits[row]) for row, (index, _) in enumerate(items)]

    return task


def _plan_tasks(
    model: Any,
    prompts: Sequence[Sequence[int]],
    groups: Sequence[Sequence[int]],
    plan: BatchPlan,
    pad_id: int,
) -> Iterator[Task]:
    """The forward passes, lazily, group by group: a group's prefix is computed when its first
    task is due, and freed once its last task is done. Groups run in a fixed mixed order too (few-shot
    groups are subjects, and their prompt lengths follow the category order they come in)."""
    order = list(range(len(groups)))
    random.Random(len(groups)).shuffle(order)
    for group in (groups[k] for k in order):
        if not group:
            continue
        token_lists = [prompts[i] for i in group]
        prefix_length = common_prefix_length(token_lists)
        prefix = PrefixCache(model, token_lists[0][:prefix_length])
        suffixes = [tokens[prefix_length:] for tokens in token_lists]
        runs, alone = shared_runs(suffixes, plan.min_shared_tokens)
        weighted = _buckets(model, prefix, [(group[i], suffixes[i]) for i in alone], plan, pad_id)
        for members, shared in runs:
            items = [(group[i], suffixes[i][shared:]) for i in members]
            task = _shared_run_task(
                model, prefix, suffixes[members[0]][:shared], items, plan, pad_id
            )
            weighted.append((shared + sum(len(tokens) for _, tokens in items), task))
        yield from schedule(weighted)


def schedule(weighted: Sequence[tuple[int, Task]]) -> list[Task]:
    """The order tasks run in: the heaviest first (a batch too big for memory fails at once), the
    rest in a fixed pseudo-random order, so the questions/s seen so far, and the ETA drawn from
    it, hold for what is left (longest-first would make the first minutes look several times
    slower than the whole).

    Args:
        weighted: (tokens computed, task) pairs.
    """
    if not weighted:
        return []
    first = max(range(len(weighted)), key=lambda k: weighted[k][0])
    rest = [task for k, (_, task) in enumerate(weighted) if k != first]
    random.Random(len(weighted)).shuffle(rest)
    return [weighted[first][1], *rest]


def _buckets(
    model: Any,
    cache: PrefixCache,
    items: Sequence[tuple[int, Sequence[int]]],
    plan: BatchPlan,
    pad_id: int,
) -> list[tuple[int, Task]]:
    buckets = make_buckets(
        [len(tokens) for _, tokens in items],
        max_batch=plan.max_batch,
        max_tokens=plan.max_tokens,
        pad_tolerance=plan.pad_tolerance,
    )
    return [
        (
            bucket.length * len(bucket.indices),
            _bucket_task(model, cache, [items[k] for k in bucket.indices], pad_id),
        )
        for bucket in buckets
    ]


def _shared_run_task(
    model: Any,
    prefix: PrefixCache,
    shared: Sequence[int],
    items: Sequence[tuple[int, Sequence[int]]],
    plan: BatchPlan,
    pad_id: int,
) -> Task:
    """One task for prompts sharing a passage: the passage once, then their buckets."""

    def task() -> list[tuple[int, torch.Tensor]]:
        extended = PrefixCache(model, shared, base=prefix)
        return [
            pair
            for _, bucket in _buckets(model, extended, items, plan, pad_id)
            for pair in bucket()
        ]

    return task


@contextmanager
def _intra_op_threads(threads: int) -> Iterator[None]:
    import torch

    if threads <= 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _execute(tasks: Iterator[Task], plan: BatchPlan) -> Iterator[list[tuple[int, torch.Tensor]]]:
    """Run tasks in order on `plan.workers` threads, yielding each task's results in submission
    order; at most two tasks per worker are queued ahead."""
    with _intra_op_threads(plan.threads):
        if plan.workers <= 1:
            for task in tasks:
                yield task()
            return
        pool = ThreadPoolExecutor(max_workers=plan.workers, thread_name_prefix="fedtune-eval")
        pending: deque[Future[list[tuple[int, torch.Tensor]]]] = deque()
        try:
            for task in tasks:
                pending.append(pool.submit(task))
                while len(pending) >= 2 * plan.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def iter_last_logits(
    model: Any,
    prompts: Sequence[Sequence[int]],
    groups: Sequence[Sequence[int]],
    plan: BatchPlan,
    pad_id: int,
    on_batch: Any = None,
) -> Any:
    """Yield (prompt index, next-token logits) for every prompt, batched by groups that share a
    prefix.

    Args:
        model: the causal LM in eval mode.
        prompts: token ids of every prompt.
        groups: lists of prompt indices whose common prefix is computed once (e.g. one per subject
            for few-shot prompts, or one for all flowertune prompts).
        plan: batching limits and workers.
        pad_id: padding token id.
        on_batch: called with the number of prompts done after each task (a forward pass, or a
            shared passage and its batches).

    Yields:
        (index, float32 logits [vocab]) in task order, not input order.
    """
    with contiguous_head_input(model):
        for results in _execute(_plan_tasks(model, prompts, groups, plan, pad_id), plan):
            yield from results
            if on_batch is not None:
                on_batch(len(results))


@contextmanager
def contiguous_head_input(model: Any) -> Iterator[None]:
    """Hand the output layer a contiguous input while inside.

    With `logits_to_keep=1` the model slices the last position out of [batch, length, hidden]
    and passes that strided view to the output layer; torch then multiplies it as `batch`
    separate vector products, each reading the whole [vocab, hidden] weight (113 MB on SmolLM2).
    A contiguous copy makes it one matrix product that reads the weight once: about 0.2 s less per
    8-row forward pass on the CPU. The logits are the same up to float summation order.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()

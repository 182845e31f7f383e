"""Prefix cache, length buckets and padded batches give the logits of a plain full forward pass."""

from __future__ import annotations

import pytest
import torch

from fedtune.evaluation.batching import (
    BatchPlan,
    PrefixCache,
    common_prefix_length,
    iter_last_logits,
    make_buckets,
    run_bucket,
    schedule,
    shared_runs,
)


def test_common_prefix_leaves_every_sequence_a_token():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix_length([[7, 1], [8, 1]]) == 0
    assert common_prefix_length([]) == 0


def test_buckets_cover_every_item_once_within_limits():
    lengths = [5, 9, 5, 5, 7, 9, 30, 6, 5, 8]
    exact = make_buckets(lengths, max_batch=3, max_tokens=100)
    assert sorted(i for b in exact for i in b.indices) == list(range(len(lengths)))
    for bucket in exact:
        assert {lengths[i] for i in bucket.indices} == {bucket.length}  # no padding at all
        assert len(bucket.indices) <= 3
    padded = make_buckets(lengths, max_batch=8, max_tokens=40, pad_tolerance=2)
    for bucket in padded:
        widths = [lengths[i] for i in bucket.indices]
        assert (
            max(widths) - min(widths) <= 2 and len(widths) * max(widths) <= 40 or len(widths) == 1
        )
    assert padded[0].length == 30  # longest first


@pytest.fixture
def model(tiny_llama):
    return tiny_llama(vocab_size=300)


def _full_last_logits(model, tokens):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([tokens])).logits[0, -1].float()


def test_prefix_cache_and_left_padding_match_full_forward(model):
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, 300, (7,), generator=generator).tolist()
    suffixes = [torch.randint(3, 300, (n,), generator=generator).tolist() for n in (4, 9, 6, 9)]
    cache = PrefixCache(model, prefix)
    batched = run_bucket(model, cache, suffixes, pad_id=2)  # widths differ: padding + position ids
    for row, suffix in enumerate(suffixes):
        expected = _full_last_logits(model, prefix + suffix)
        torch.testing.assert_close(batched[row], expected, atol=1e-4, rtol=1e-4)
    # the cache is reusable: a second batch sees the same prefix
    again = run_bucket(model, cache, suffixes[1:2], pad_id=2)
    torch.testing.assert_close(again[0], batched[1], atol=1e-4, rtol=1e-4)


def test_iter_last_logits_groups_and_order(model):
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 300, (n,), generator=generator).tolist() for n in (5, 8, 5, 12, 3)]
    prompts[1][:3] = prompts[0][:3]
    done = []
    seen = dict(
        iter_last_logits(
            model, prompts, [[0, 1], [2, 3, 4]], BatchPlan(max_batch=2), 2, done.append
        )
    )
    assert sorted(seen) == [0, 1, 2, 3, 4] and sum(done) == 5
    for index, tokens in enumerate(prompts):
        torch.testing.assert_close(
            seen[index], _full_last_logits(model, tokens), atol=1e-4, rtol=1e-4
        )


def test_shared_runs_find_common_passages():
    passage = list(range(100, 140))  # 40 shared tokens
    sequences = [passage + [1, 2], [5, 6, 7], passage + [3], passage[:35] + [9, 9], [5, 6, 8]]
    runs, alone = shared_runs(sequences, min_shared=32)
    assert runs == [([3, 0, 2], 35)] and sorted(alone) == [1, 4]
    assert shared_runs(sequences, min_shared=0) == ([], [0, 1, 2, 3, 4])
    # every member keeps at least one token of its own
    runs, _ = shared_runs([passage, passage + [1]], min_shared=32)
    assert runs == [([0, 1], 39)]


def test_extended_prefix_cache_matches_full_forward(model):
    generator = torch.Generator().manual_seed(2)
    head = torch.randint(3, 300, (5,), generator=generator).tolist()
    passage = torch.randint(3, 300, (40,), generator=generator).tolist()
    tails = [torch.randint(3, 300, (n,), generator=generator).tolist() for n in (3, 6)]
    extended = PrefixCache(model, passage, base=PrefixCache(model, head))
    assert extended.length == 45
    logits = run_bucket(model, extended, tails, pad_id=2)
    for row, tail in enumerate(tails):
        expected = _full_last_logits(model, head + passage + tail)
        torch.testing.assert_close(logits[row], expected, atol=1e-4, rtol=1e-4)


def test_iter_last_logits_with_shared_passages(model):
    generator = torch.Generator().manual_seed(3)
    head = [7, 8, 9]
    passage = torch.randint(3, 300, (40,), generator=generator).tolist()
    prompts = [head + passage + [n, n + 1] for n in (10, 20, 30)]
    prompts += [head + torch.randint(3, 300, (n,), generator=generator).tolist() for n in (4, 4, 9)]
    plan = BatchPlan(max_batch=4, pad_tolerance=0, min_shared_tokens=32)
    seen = dict(iter_last_logits(model, prompts, [list(range(len(prompts)))], plan, 2))
    for index, tokens in enumerate(prompts):
        torch.testing.assert_close(
            seen[index], _full_last_logits(model, tokens), atol=1e-4, rtol=1e-4
        )


def test_parallel_workers_give_the_same_logits_and_restore_threads(model):
    generator = torch.Generator().manual_seed(4)
    head = [7, 8, 9, 10]
    passage = torch.randint(3, 300, (40,), generator=generator).tolist()
    lengths = (3, 5, 5, 7, 2, 9, 4, 6, 6, 11)
    prompts = [head + torch.randint(3, 300, (n,), generator=generator).tolist() for n in lengths]
    prompts += [head + passage + [n] for n in (11, 12, 13)]
    groups = [list(range(len(prompts)))]
    serial = dict(iter_last_logits(model, prompts, groups, BatchPlan(max_batch=2), 2))
    threads_before = torch.get_num_threads()
    done: list[int] = []
    parallel_plan = BatchPlan(max_batch=2, workers=3, threads=1)
    parallel = dict(iter_last_logits(model, prompts, groups, parallel_plan, 2, done.append))
    assert torch.get_num_threads() == threads_before
    assert sorted(parallel) == list(range(len(prompts))) and sum(done) == len(prompts)
    for index, tokens in enumerate(prompts):
        torch.testing.assert_close(parallel[index], serial[index], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            parallel[index], _full_last_logits(model, tokens), atol=1e-4, rtol=1e-4
        )


def test_output_layer_hook_is_removed_after_iteration(model):
    head = model.get_output_embeddings()
    before = dict(head._forward_pre_hooks)
    prompts = [[5, 6, 7], [5, 6, 8, 9]]
    list(iter_last_logits(model, prompts, [[0, 1]], BatchPlan(), 2))
    assert dict(head._forward_pre_hooks) == before


def test_cpu_plan_runs_one_single_threaded_worker_per_core():
    plan = BatchPlan.for_device("cpu")
    assert plan.workers == min(torch.get_num_threads(), 16) and plan.threads >= 1
    assert BatchPlan.for_device("cuda:0").workers == 1


def test_schedule_runs_the_heaviest_first_then_a_fixed_mix():
    weighted = [(w, f"task-{w}") for w in (50, 400, 30, 30, 20, 10, 90, 60, 70, 80)]
    order = schedule(weighted)
    assert order[0] == "task-400" and sorted(order) == sorted(t for _, t in weighted)
    assert order == schedule(weighted)  # deterministic
    rest = [int(t.split("-")[1]) for t in order[1:]]
    assert rest != sorted(rest, reverse=True) and rest != sorted(rest)  # mixed, not by size
    assert schedule([]) == []

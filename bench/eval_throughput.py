"""Questions/s of the batched `flowertune` protocol against the official one-question-at-a-time loop.

Same model (the embedded SmolLM2-135M-Instruct, fp32), same questions (N per scored subject, the official
order), identical generations asserted. Also times `loglik` 0-shot (fedtune's batched scorer) on the same
questions. The CPU is shared, so the question list is cut into chunks and the two flowertune implementations
alternate chunk by chunk (official first on even chunks, batched first on odd ones): a load change hits both
alike. Two chunks by default: the batched path buckets prompts by length, so like `fedtune eval` (which
hands it a whole category at once) it needs a few hundred questions per call to fill its batches.

Also counts the work: prompt tokens the official loop computes against tokens fedtune computes (after the
shared prefix, shared passages and padding), on the sample and on the full scored split. Timings are
reported, never asserted.

    .venv/bin/python bench/eval_throughput.py --per-subject 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from fedtune.evaluation import flowertune, loglik
from fedtune.evaluation.batching import (
    BatchPlan,
    PrefixCache,
    common_prefix_length,
    make_buckets,
    run_bucket,
    shared_runs,
)
from fedtune.evaluation.sampling import select
from fedtune.model.loading import load_model, load_tokenizer, pick_device, resolve_model

RESULTS = Path(__file__).resolve().parent / "results"


def max_logit_difference(model, tokenizer, questions) -> float:
    """Largest |batched − one-at-a-time| next-token logit over the questions (justifies the recheck margin)."""
    prompts = [flowertune.encode_prompt(tokenizer, q) for q in questions]
    prefix_length = common_prefix_length(prompts)
    prefix = PrefixCache(model, prompts[0][:prefix_length])
    worst = 0.0
    for start in range(0, len(prompts), 8):
        chunk = prompts[start : start + 8]
        batched = run_bucket(
            model, prefix, [p[prefix_length:] for p in chunk], tokenizer.pad_token_id
        )
        for row, tokens in enumerate(chunk):
            with torch.inference_mode():
                single = (
                    model(input_ids=torch.tensor([tokens], device=model.device), logits_to_keep=1)
                    .logits[0, -1]
                    .float()
                )
            worst = max(worst, float((batched[row] - single).abs().max()))
    return worst


def work_tokens(prompts: list[list[int]], plan: BatchPlan) -> dict[str, int | float]:
    """Tokens the official loop computes (every prompt in full) against those fedtune's plan computes."""
    prefix_length = common_prefix_length(prompts)
    suffixes = [p[prefix_length:] for p in prompts]
    runs, alone = shared_runs(suffixes, plan.min_shared_tokens)
    pieces = [[suffixes[i] for i in alone]]
    computed = prefix_length
    for members, shared in runs:
        computed += shared
        pieces.append([suffixes[i][shared:] for i in members])
    for items in pieces:
        lengths = [len(t) for t in items]
        for bucket in make_buckets(
            lengths,
            max_batch=plan.max_batch,
            max_tokens=plan.max_tokens,
            pad_tolerance=plan.pad_tolerance,
        ):
            computed += bucket.length * len(bucket.indices)
    total = sum(len(p) for p in prompts)
    return {
        "prompt_tokens": total,
        "computed_tokens": computed,
        "ratio": round(total / computed, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--per-subject", type=int, default=10, help="questions per scored subject")
    parser.add_argument(
        "--sample", type=int, help="a stratified sample of about N questions instead"
    )
    parser.add_argument("--limit", type=int, help="only the first N questions of the selection")
    parser.add_argument(
        "--no-full-split",
        action="store_true",
        help="count the work on the sample only, not on the whole scored split",
    )
    parser.add_argument("--chunks", type=int, default=2, help="alternation chunks")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="float32, bfloat16, float16 or auto (fp32 on CPU, bf16 on GPU)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "eval_throughput.json")
    args = parser.parse_args(argv)

    source = resolve_model("embedded:smollm2-135m-instruct")
    device = pick_device() if args.device == "auto" else args.device
    tokenizer = load_tokenizer(source)
    model = load_model(source, dtype=args.dtype, device=device)
    model.eval()
    chosen = {"sample": args.sample} if args.sample else {"limit_per_subject": args.per_subject}
    questions = list(select(seed=args.seed, **chosen).questions)[: args.limit]
    tokens = [len(flowertune.encode_prompt(tokenizer, q)) for q in questions]
    plan = BatchPlan.for_device(device)
    load_before = os.getloadavg()

    official_s = batched_s = 0.0
    official, batched = [], []
    per_chunk: list[dict[str, float]] = []
    size = -(-len(questions) // args.chunks)
    for number, start in enumerate(range(0, len(questions), size)):
        chunk = questions[start : start + size]
        order = ("official", "batched") if number % 2 == 0 else ("batched", "official")
        seconds: dict[str, float] = {"questions": len(chunk)}
        for which in order:
            started = time.perf_counter()
            if which == "official":
                official += flowertune.generate_one_at_a_time(model, tokenizer, chunk)
            else:
                batched += flowertune.generate_batched(model, tokenizer, chunk, plan=plan)
            seconds[which] = round(time.perf_counter() - started, 1)
        official_s += seconds["official"]
        batched_s += seconds["batched"]
        per_chunk.append(seconds)
    identical = [g.output for g in official] == [g.output for g in batched]
    assert identical, "batched generations differ from the official loop"
    rechecked = sum(g.rechecked for g in batched)

    started = time.perf_counter()
    loglik.score_letters(model, tokenizer, questions, shots=0, plan=plan)
    loglik_s = time.perf_counter() - started
    worst = max_logit_difference(model, tokenizer, questions[:: max(1, len(questions) // 64)])

    work = {
        "sample": work_tokens([flowertune.encode_prompt(tokenizer, q) for q in questions], plan),
    }
    if not args.no_full_split:
        full = list(select().questions)
        work["full_scored_split"] = work_tokens(
            [flowertune.encode_prompt(tokenizer, q) for q in full], plan
        )

    n = len(questions)
    report = {
        "benchmark": "eval_throughput",
        "model": source.name,
        "device": device,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "n_questions": n,
        "per_subject": args.per_subject,
        "seed": args.seed,
        "prompt_tokens": {"mean": sum(tokens) / n, "max": max(tokens), "total": sum(tokens)},
        "plan": plan.__dict__,
        "identical_generations": identical,
        "rechecked_one_at_a_time": rechecked,
        "max_abs_logit_difference_batched_vs_single": worst,
        "recheck_margin": flowertune.default_margin(model),
        "seconds": {
            "official": round(official_s, 1),
            "batched": round(batched_s, 1),
            "loglik": round(loglik_s, 1),
        },
        "questions_per_s": {
            "official": round(n / official_s, 3),
            "batched": round(n / batched_s, 3),
            "loglik": round(n / loglik_s, 3),
        },
        "speedup": round(official_s / batched_s, 3),
        "per_chunk_seconds": per_chunk,
        "work": work,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
            "torch_threads": torch.get_num_threads(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "versions": {"torch": torch.__version__},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(
        f"MMLU flowertune, {n} questions ({args.per_subject} per scored subject), embedded SmolLM2-135M, {device}"
    )
    print(f"{'implementation':<34}{'seconds':>9}{'q/s':>8}")
    print(f"{'official loop (generate, 1 at a time)':<34}{official_s:>9.1f}{n / official_s:>8.2f}")
    print(f"{'fedtune batched (prefix cache)':<34}{batched_s:>9.1f}{n / batched_s:>8.2f}")
    print(f"{'fedtune loglik 0-shot':<34}{loglik_s:>9.1f}{n / loglik_s:>8.2f}")
    print(
        f"speed-up {official_s / batched_s:.2f}x; identical generations: {identical}; rechecked {rechecked}; "
        f"max |Δ logit| {worst:.2e}"
    )
    for name, counts in work.items():
        print(
            f"work on {name}: {counts['prompt_tokens']:,} prompt tokens, {counts['computed_tokens']:,} computed "
            f"({counts['ratio']:.3f}x fewer)"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training step time of the r×r adapter (`model.lora.variant=sb`) against LoRA at the same rank.

Same model (the embedded SmolLM2-135M-Instruct, fp32), same examples and batch shape, same targets
(q_proj, v_proj); for each rank, LoRA and the r×r adapter train `--steps` optimizer steps through
fedtune's client loop (`train_local`), alternating which goes first, after one warm-up step each.
Reported per step: seconds, real tokens per second, the model's training GFLOP/s as a fraction of
an fp32 matmul peak measured in the same process, and the ratio r×r / LoRA. The r×r adapter's
one-off initialisation (the first gradient and its SVD) is timed apart: it is paid once per
process, not per step.

    .venv/bin/python bench/sb_step_time.py --ranks 8,32 --steps 6

Writes bench/results/sb_step_time.json.
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

from fedtune.config import build_config
from fedtune.data.pipeline import sb_init_examples
from fedtune.data.prompts import tokenize_rows
from fedtune.model.adapters import prepare_adapter
from fedtune.model.loading import load_model, load_tokenizer, resolve_model
from fedtune.training.local import train_local

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODEL = "embedded:smollm2-135m-instruct"


def build(variant: str, rank: int, source, tokenizer):
    """The embedded model with a freshly prepared adapter; seconds the preparation took."""
    config = build_config(
        {
            "model.lora.variant": variant,
            "model.lora.peft-lora-r": rank,
            "model.lora.peft-lora-alpha": 2 * rank,
        }
    )
    model = load_model(source, dtype="float32", device="cpu")
    started = time.perf_counter()
    init = sb_init_examples(tokenizer, config, 16) if variant == "sb" else None
    peft_model = prepare_adapter(model, config.lora, 0, init, tokenizer.pad_token_id)
    return peft_model, time.perf_counter() - started


def steps_time(model, examples, steps: int, batch: int, pad_id: int) -> tuple[float, int]:
    """Seconds and real tokens of `steps` optimizer steps (one call of the client loop)."""
    started = time.perf_counter()
    result = train_local(
        model, examples, steps=steps, batch_size=batch, grad_accumulation=1,
        learning_rate=2e-4, seed=0, pad_id=pad_id,
    )  # fmt: skip
    return time.perf_counter() - started, result.tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="8,32")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per contestant")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--json", type=Path, default=RESULTS / "sb_step_time.json")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from train_throughput import lora_train_flops_per_token, matmul_peak_gflops, pick_rows

    source = resolve_model(MODEL)
    tokenizer = load_tokenizer(source)
    rows = pick_rows(args.batch * (args.steps + 1), seed=0)
    examples, _ = tokenize_rows(tokenizer, rows, args.seq)
    params = sum(p.numel() for p in load_model(source, device="cpu").parameters())
    per_token = lora_train_flops_per_token(params, False)
    peak = matmul_peak_gflops()
    ranks = [int(r) for r in args.ranks.split(",")]
    results = []
    for rank in ranks:
        models = {}
        for variant in ("lora", "sb"):
            model, prepare_s = build(variant, rank, source, tokenizer)
            steps_time(model, examples, 1, args.batch, tokenizer.pad_token_id)  # warm-up
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            models[variant] = (model, prepare_s, trainable)
        timed: dict[str, list[float]] = {"lora": [], "sb": []}
        tokens: dict[str, int] = {}
        for turn in range(2):  # each goes first once: a load change hits both alike
            for variant in ("lora", "sb") if turn == 0 else ("sb", "lora"):
                model = models[variant][0]
                seconds, count = steps_time(
                    model, examples, args.steps, args.batch, tokenizer.pad_token_id
                )
                timed[variant].append(seconds / args.steps)
                tokens[variant] = count
        row = {"rank": rank}
        for variant in ("lora", "sb"):
            step_s = min(timed[variant])
            tok_s = tokens[variant] / args.steps / step_s
            row[variant] = {
                "step_s": round(step_s, 4),
                "step_s_turns": [round(t, 4) for t in timed[variant]],
                "tokens_per_s": round(tok_s, 1),
                "fraction_of_peak": round(tok_s * per_token / 1e9 / peak, 4),
                "prepare_s": round(models[variant][1], 2),
                "trainable_parameters": models[variant][2],
            }
        row["sb_over_lora"] = round(row["sb"]["step_s"] / row["lora"]["step_s"], 3)
        results.append(row)
        print(
            f"r={rank:<3} LoRA {row['lora']['step_s']:.3f} s/step  r×r {row['sb']['step_s']:.3f} "
            f"s/step  ratio {row['sb_over_lora']:.2f}  (r×r set-up {row['sb']['prepare_s']:.1f} s)",
            flush=True,
        )
    report = {
        "benchmark": "sb_step_time",
        "model": MODEL,
        "batch": args.batch,
        "seq_length": args.seq,
        "steps": args.steps,
        "matmul_peak_gflops": round(peak, 1),
        "threads": torch.get_num_threads(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "torch": torch.__version__,
        "ranks": results,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"fp32 matmul peak {peak:.1f} GFLOP/s; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Local training throughput: fedtune's client loop vs the FlowerTune template's TRL SFTTrainer.

Same model (embedded SmolLM2-135M-Instruct + LoRA r=8/α=16 on q,v), same examples (the Alpaca-GPT4
sample, Alpaca prompt, loss on the response), the challenge's batch shape (16 examples per step,
sequences up to 512 tokens), AdamW at a constant rate. Throughput counts real tokens (prompt +
response, no padding) per second of training, next to an fp32 matmul peak measured in this process.

    .venv/bin/pip install -e ".[bench]"      # TRL, the reference
    .venv/bin/python bench/train_throughput.py --steps 3

Prints a table and writes bench/results/train_throughput.json.
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
from fedtune.data.prompts import format_prompt, tokenize_rows
from fedtune.data.sources import clean_rows, load_local_rows, resolve_data
from fedtune.model.adapters import attach_adapter
from fedtune.model.loading import load_model, load_tokenizer, resolve_model
from fedtune.training.local import draw_examples, train_local

RESULTS = Path(__file__).resolve().parent / "results"


def matmul_peak_gflops(size: int = 1024, seconds: float = 3.0) -> float:
    """Best fp32 GEMM rate of this process's threads (2·n³ FLOPs per n×n product)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        best = max(best, 5 * 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


def lora_train_flops_per_token(num_params: int, checkpointing: bool) -> float:
    """~4·N per token for LoRA: forward 2N, backward 2N for activation gradients only (the
    frozen base weights get no weight gradients); gradient checkpointing recomputes the forward
    (+2N). The adapter and attention are small at these lengths."""
    return (6.0 if checkpointing else 4.0) * num_params


def pick_rows(count: int, seed: int) -> list[dict[str, str]]:
    rows, _ = clean_rows(load_local_rows(resolve_data("embedded:alpaca-gpt4-sample")))
    return [rows[i] for i in draw_examples(len(rows), count, seed)]


def run_fedtune(
    rows, tokenizer, source, steps, batch, seq, checkpointing, device="cpu", dtype="float32"
) -> dict:
    config = build_config()
    examples, stats = tokenize_rows(tokenizer, rows, seq)
    model = load_model(source, dtype=dtype, device=device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = attach_adapter(model, config.lora, seed=0)
    # steps × batch examples, each seen once (draw_examples permutes them): the reference's set.
    started = time.perf_counter()
    result = train_local(
        model,
        examples,
        steps=steps,
        batch_size=batch,
        grad_accumulation=1,
        learning_rate=2e-4,
        seed=0,
        pad_id=tokenizer.pad_token_id,
        device=device,
    )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return {
        "tokens": result.tokens,
        "padded_tokens": result.padded_tokens,
        "seconds": elapsed,
        "tokens_per_s": result.tokens / elapsed,
        "loss": result.train_loss,
        "truncated": stats.truncated,
    }


def run_reference(
    rows, tokenizer, source, steps, batch, seq, checkpointing, device="cpu", dtype="float32"
) -> dict:
    """TRL's SFTTrainer with the FlowerTune template's arguments (prompt/completion, response loss)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from fedtune.model.adapters import peft_config

    data = Dataset.from_list(
        [{"prompt": format_prompt(r["instruction"]), "completion": r["output"]} for r in rows]
    )
    model = load_model(source, dtype=dtype, device=device)
    args = SFTConfig(
        output_dir=str(RESULTS / "trl-tmp"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        max_length=seq,
        gradient_checkpointing=checkpointing,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=device == "cpu",
        bf16=dtype == "bfloat16",
        fp16=False,
        completion_only_loss=True,
        packing=False,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=peft_config(build_config().lora),
    )
    # Real tokens the reference trains on: each batch's sequences, truncated to max_length.
    lengths = [min(len(ids), seq) for ids in trainer.train_dataset["input_ids"]]
    started = time.perf_counter()
    output = trainer.train()
    elapsed = time.perf_counter() - started
    # The data set holds exactly steps × batch examples, so one pass sees each of them once.
    assert len(lengths) == steps * batch
    tokens = sum(lengths)
    return {
        "tokens": round(tokens),
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
        "loss": float(output.training_loss),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per contestant")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    source = resolve_model("embedded:smollm2-135m-instruct")
    tokenizer = load_tokenizer(source)
    rows = pick_rows(args.steps * args.batch, seed=0)
    num_params = sum(p.numel() for p in load_model(source).parameters())
    peak = matmul_peak_gflops()
    runs = {}
    runs["fedtune"] = run_fedtune(rows, tokenizer, source, args.steps, args.batch, args.seq, False)
    runs["fedtune (gradient checkpointing)"] = run_fedtune(
        rows, tokenizer, source, args.steps, args.batch, args.seq, True
    )
    if not args.skip_reference:
        runs["TRL SFTTrainer (template, gradient checkpointing)"] = run_reference(
            rows, tokenizer, source, args.steps, args.batch, args.seq, True
        )
    reference = runs.get("TRL SFTTrainer (template, gradient checkpointing)")
    print(f"\nfp32 matmul peak: {peak:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    print(f"{'contestant':52} {'tokens':>8} {'s':>8} {'tok/s':>8} {'% peak':>7} {'vs ref':>7}")
    for name, run in runs.items():
        flops_per_token = lora_train_flops_per_token(num_params, "checkpointing" in name)
        run["model_gflops"] = run["tokens_per_s"] * flops_per_token / 1e9
        run["fraction_of_peak"] = run["model_gflops"] / peak
        if reference:
            run["speedup_vs_reference"] = run["tokens_per_s"] / reference["tokens_per_s"]
        print(
            f"{name:52} {run['tokens']:>8} {run['seconds']:>8.1f} {run['tokens_per_s']:>8.1f} "
            f"{100 * run['fraction_of_peak']:>6.1f}% "
            + (f"{run['speedup_vs_reference']:>6.2f}x" if reference else "")
        )
    RESULTS.mkdir(exist_ok=True)
    payload = {
        "benchmark": "train_throughput",
        "model": "embedded:smollm2-135m-instruct",
        "parameters": num_params,
        "lora": "r=8 alpha=16 q_proj,v_proj",
        "steps": args.steps,
        "batch": args.batch,
        "seq_length": args.seq,
        "matmul_peak_gflops": peak,
        "threads": torch.get_num_threads(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "runs": runs,
    }
    path = RESULTS / "train_throughput.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

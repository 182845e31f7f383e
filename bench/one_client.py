"""One client's training alone, in one process: what a client of the default job costs in memory.

Builds the run configuration (the defaults, plus any `--set KEY=VALUE`), loads the base model with
its adapter and partition 0's tokenized data exactly as a ClientApp does (`client_app.get_worker`,
`get_partition`), and runs one round of local training (`train_local`) — no server, no engine.
Measured with `bench/process_memory.py`, it is the yardstick the simulation's peak is compared
with:

    .venv/bin/python bench/process_memory.py --output bench/results/memory_one_client.json \
        -- .venv/bin/python bench/one_client.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    from fedtune.config import build_config, parse_assignment
    from fedtune.federation.client_app import get_partition, get_worker
    from fedtune.training.local import train_local

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE")
    args = parser.parse_args()
    config = build_config(dict(parse_assignment(item) for item in args.set))
    started = time.perf_counter()
    worker = get_worker(config)
    examples, _ = get_partition(worker, config, 0, config.federation.num_clients)
    train = config.train
    result = train_local(
        worker.model,
        examples,
        steps=train.local_steps,
        batch_size=train.batch_size,
        grad_accumulation=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate_max,
        seed=train.seed,
        pad_id=worker.tokenizer.pad_token_id,
        max_grad_norm=train.max_grad_norm,
        weight_decay=train.weight_decay,
        device=worker.device,
    )
    print(
        f"one client: {result.examples} examples, {result.tokens} tokens, loss "
        f"{result.train_loss:.4f}, {time.perf_counter() - started:.1f} s"
    )


if __name__ == "__main__":
    main()

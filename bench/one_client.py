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
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    import torch

    from fedtune.config import parse_assignment
    from worker_layout import train_clients

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE")
    args = parser.parse_args()
    started = time.perf_counter()
    settings = dict(parse_assignment(item) for item in args.set)
    (row,) = train_clients([0], torch.get_num_threads(), settings)
    print(
        f"one client: {row['tokens']} tokens, loss {row['loss']:.4f}, "
        f"{time.perf_counter() - started:.1f} s"
    )


if __name__ == "__main__":
    main()

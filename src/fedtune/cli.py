"""The `fedtune` command: run, eval, leaderboard.

Each command group lives beside the code it drives and registers its own sub-parser; heavy imports
(torch, transformers, flwr) happen inside the handlers so `fedtune --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module → registers one or more sub-commands through `register(subparsers)`.
COMMAND_MODULES = (
    "fedtune.federation.run_cli",
    "fedtune.evaluation.cli",
    "fedtune.leaderboard.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune",
        description="Federated LoRA instruction tuning on Flower, MMLU evaluation, leaderboard.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point. Handlers return an exit code; errors they expect print one line and exit 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    code = args.handler(args)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())

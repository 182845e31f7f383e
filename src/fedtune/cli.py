"""The `fedtune` command: run, eval, leaderboard, report, data.

Each command group lives beside the code it drives and registers its own sub-parser; heavy imports
(torch, transformers, flwr) happen inside the handlers so `fedtune --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from importlib import metadata
from typing import Any

# module → registers one or more sub-commands through `register(subparsers)`.
COMMAND_MODULES = (
    "fedtune.runtime.run_cli",
    "fedtune.evaluation.cli",
    "fedtune.leaderboard.cli",
    "fedtune.report",
    "fedtune.data.cli",
    "fedtune.runtime.local_cli",
)


# The packages whose versions decide what a run does; `fedtune --version` reports them.
VERSIONED_PACKAGES = ("flwr", "torch", "transformers", "peft")


def _installed(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def version_text() -> str:
    """`fedtune X` and, on a second line, the versions of flwr, torch, transformers and peft.

    Read from the installed packages' metadata: nothing is imported.
    """
    others = ", ".join(f"{name} {_installed(name)}" for name in VERSIONED_PACKAGES)
    return f"fedtune {_installed('fedtune')}\n{others}, Python {platform.python_version()}"


class _VersionAction(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune",
        description="Federated LoRA instruction tuning on Flower, MMLU evaluation, leaderboard.",
    )
    parser.add_argument(
        "--version",
        action=_VersionAction,
        help="print the versions of fedtune, flwr, torch, transformers and peft, and exit",
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

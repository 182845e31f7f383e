"""`fedtune data report`: how a data set splits over clients, before anything trains; `fedtune data
split`: one data file per node, for federations whose nodes hold their own data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "data",
        help="inspect how a data set splits over clients",
        description="Data sets and their partitions.",
    )
    commands = parser.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    report = _partition_parser(
        commands,
        "report",
        help="partition sizes, label histogram per client, heterogeneity (JSON + PNG)",
        description="Partition a local or embedded data set as `fedtune run` would, and write "
        "partitions.json and partitions.png: sizes, each client's label histogram, and its "
        "total-variation distance to the pooled label mix.",
        out_help="directory for partitions.json/.png (.)",
    )
    report.set_defaults(handler=handle_report)
    split = _partition_parser(
        commands,
        "split",
        help="one data file per node (and the held-out rows), with the partition report",
        description="Partition a local or embedded data set as `fedtune run` would and write "
        "node-NNN.jsonl.gz for each node (give node i its file: `data-path=…` in its node "
        "config), heldout.jsonl.gz (the rows no node trains on, for the server), split.json "
        "(what was written: rows and sha256 per file, the settings) and partitions.json/.png.",
        out_help="directory to write into (created; must not hold a split already)",
    )
    split.set_defaults(handler=handle_split)


def _partition_parser(
    commands: Any, name: str, *, help: str, description: str, out_help: str
) -> argparse.ArgumentParser:
    """A command that partitions DATA over --clients like `fedtune run` does."""
    parser: argparse.ArgumentParser = commands.add_parser(name, help=help, description=description)
    parser.add_argument(
        "data",
        metavar="DATA",
        help="a .json/.jsonl/.parquet file (optionally .gz) or embedded:NAME",
    )
    parser.add_argument("--clients", type=int, default=20, help="number of partitions (20)")
    parser.add_argument(
        "--partitioner", default="iid", help="iid, dirichlet, pathological, shard, linear, …"
    )
    parser.add_argument("--partition-by", default="", help="label column (dirichlet, pathological)")
    parser.add_argument(
        "--alpha", type=float, help="Dirichlet concentration (data.dirichlet-alpha)"
    )
    parser.add_argument(
        "--classes-per-partition", type=int, help="labels per client (pathological)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any other data.* key"
    )
    parser.add_argument("--out", default=".", help=out_help)
    return parser


def _config(args: argparse.Namespace) -> Any:
    """The run configuration the command's flags describe (data.* and the client count).

    Raises:
        ConfigError: a bad flag or --set.
    """
    from fedtune.config import ConfigError, build_config, parse_assignment

    flat: dict[str, Any] = {
        "data.name": args.data,
        "data.partitioner": args.partitioner,
        "data.partition-by": args.partition_by,
        "federation.num-clients": args.clients,
    }
    if args.alpha is not None:
        flat["data.dirichlet-alpha"] = args.alpha
    if args.classes_per_partition is not None:
        flat["data.classes-per-partition"] = args.classes_per_partition
    extra = dict(parse_assignment(item) for item in args.set)
    bad = sorted(k for k in extra if not k.startswith("data."))
    if bad:
        raise ConfigError(f"--set: only data.* keys apply here, not {', '.join(bad)}")
    return build_config({**flat, **extra})


def handle_report(args: argparse.Namespace) -> int:
    from datasets.utils.logging import disable_progress_bar

    from fedtune.config import ConfigError
    from fedtune.data.partition_report import build_report, describe, save
    from fedtune.data.sources import DataError

    disable_progress_bar()
    try:
        config = _config(args)
        report = build_report(config.data, config.federation.num_clients)
        if report is None:
            raise DataError(f"{args.data}: a hub data set; give a local file or embedded:NAME")
        json_path, png_path = save(report, Path(args.out))
    except (ConfigError, DataError, ValueError) as exc:
        print(f"fedtune data report: error: {exc}", file=sys.stderr)
        return 2
    print(describe(report))
    print(f"written: {json_path}, {png_path}")
    return 0


def handle_split(args: argparse.Namespace) -> int:
    from datasets.utils.logging import disable_progress_bar

    from fedtune.config import ConfigError
    from fedtune.data.sources import DataError
    from fedtune.data.split import write_split

    disable_progress_bar()
    try:
        manifest = write_split(_config(args), Path(args.out))
    except (ConfigError, DataError, ValueError, OSError) as exc:
        print(f"fedtune data split: error: {exc}", file=sys.stderr)
        return 2
    nodes = manifest["nodes"]
    sizes = [n["rows"] for n in nodes]
    print(
        f"{len(nodes)} node files of {min(sizes)}–{max(sizes)} rows, "
        f"{manifest['heldout']['rows']} held-out rows → {args.out}"
    )
    print(
        "give node i its file: flower-supernode … --node-config "
        f'"partition-id=i num-partitions={len(nodes)} data-path={args.out}/node-NNN.jsonl.gz"'
    )
    return 0

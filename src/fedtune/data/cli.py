"""`fedtune data report`: how a data set splits over clients, before anything trains."""

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
    report = commands.add_parser(
        "report",
        help="partition sizes, label histogram per client, heterogeneity (JSON + PNG)",
        description="Partition a local or embedded data set as `fedtune run` would, and write "
        "partitions.json and partitions.png: sizes, each client's label histogram, and its "
        "total-variation distance to the pooled label mix.",
    )
    report.add_argument(
        "data",
        metavar="DATA",
        help="a .json/.jsonl/.parquet file (optionally .gz) or embedded:NAME",
    )
    report.add_argument("--clients", type=int, default=20, help="number of partitions (20)")
    report.add_argument(
        "--partitioner", default="iid", help="iid, dirichlet, pathological, shard, linear, …"
    )
    report.add_argument("--partition-by", default="", help="label column (dirichlet, pathological)")
    report.add_argument(
        "--alpha", type=float, help="Dirichlet concentration (data.dirichlet-alpha)"
    )
    report.add_argument(
        "--classes-per-partition", type=int, help="labels per client (pathological)"
    )
    report.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any other data.* key"
    )
    report.add_argument("--out", default=".", help="directory for partitions.json/.png (.)")
    report.set_defaults(handler=handle_report)


def handle_report(args: argparse.Namespace) -> int:
    from datasets.utils.logging import disable_progress_bar

    from fedtune.config import ConfigError, build_config, parse_assignment
    from fedtune.data.partition_report import build_report, describe, save
    from fedtune.data.sources import DataError

    disable_progress_bar()
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
    try:
        extra = dict(parse_assignment(item) for item in args.set)
        bad = sorted(k for k in extra if not k.startswith("data."))
        if bad:
            raise ConfigError(f"--set: only data.* keys apply here, not {', '.join(bad)}")
        config = build_config({**flat, **extra})
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

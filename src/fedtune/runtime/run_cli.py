"""`fedtune run`: the Flower app on Flower's simulation engine, on this machine, with live progress.

Everything the configuration names is checked before the run directory is made: keys and values,
the model source, the data file (parsed) and whether it can be split over the clients. The engine
then runs in a supervised child process (`supervisor.py`), so that Ctrl-C, SIGTERM, a crash or a
hung client all end the command with a true status and no process left behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

# Flower, Ray and the hub clients call home or install dependencies unless told not to.
QUIET_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "UV_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def quiet_libraries() -> None:
    """Keep the terminal for fedtune's progress: library banners and bars go (use --verbose)."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")
    logging.getLogger("flwr").setLevel(logging.ERROR)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run federated fine-tuning on Flower's simulation engine",
        description="Run the fedtune Flower app on Flower's simulation engine (one machine).",
    )
    parser.add_argument("--config", metavar="FILE.toml", help="a preset or config file (TOML)")
    parser.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override one key (repeatable); FlowerTune template keys are accepted",
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a stopped, failed or killed run from its last resume point "
        "(--set/--config may only repeat its settings)",
    )
    parser.add_argument(
        "--client-app",
        metavar="MODULE:ATTR",
        help="a ClientApp of your own (e.g. one wrapping fedtune.federation.client_app:app)",
    )
    parser.add_argument("--client-cpus", type=float, help="CPU cores per simulated client")
    parser.add_argument("--client-gpus", type=float, help="GPU share per simulated client")
    parser.add_argument("--list-keys", action="store_true", help="list every config key and exit")
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    parser.set_defaults(handler=handle_run)


def fail(message: str, code: int = 2) -> int:
    print(f"fedtune run: error: {message}", file=sys.stderr)
    return code


def resolve_config(args: argparse.Namespace) -> Any:
    """The run's configuration; with --resume, the run's own, then --config/--set on top."""
    from fedtune.config import build_config, load_config_file, parse_assignment, with_num_clients
    from fedtune.rundir import read_run_config

    sources: list[dict[str, Any]] = []
    if args.resume:
        started_with, _ = read_run_config(Path(args.resume).expanduser().resolve())
        sources.append(started_with)
    if args.config:
        sources.append(load_config_file(args.config))
    sources.append(dict(parse_assignment(item) for item in args.set))
    if args.resume:
        sources.append({"run.resume": str(Path(args.resume).expanduser().resolve())})
    config = build_config(
        *sources, warn=lambda text: print(f"fedtune run: warning: {text}", file=sys.stderr)
    )
    return with_num_clients(config, simulation_clients(config))


def simulation_clients(config: Any) -> int:
    """How many SuperNodes `fedtune run` starts when federation.num-clients is 0: a split
    directory's node count, else the challenge's 20."""
    from fedtune.config import FLOWERTUNE_CLIENTS
    from fedtune.data.sources import read_manifest, resolve_data

    source = resolve_data(config.data.name)
    if source.kind == "split":
        return int(read_manifest(source.path)["num_nodes"])
    return FLOWERTUNE_CLIENTS


def check_data(config: Any) -> str:
    """Parse a local/embedded data set and check it splits over the clients; describe it."""
    from fedtune.data.partition import partition_dataset
    from fedtune.data.sources import (
        DataError,
        clean_rows,
        load_local_rows,
        read_manifest,
        resolve_data,
    )

    source = resolve_data(config.data.name)
    if source.kind == "hub":
        return f"hub data set {source.name} (loaded by each client through flwr-datasets)"
    if source.kind == "split":
        manifest = read_manifest(source.path, config.federation.num_clients)
        sizes = [int(node["rows"]) for node in manifest["nodes"]]
        if min(sizes) == 0:
            raise DataError(f"data.name: {sizes.count(0)} of the split's node files are empty")
        return (
            f"{source.name}: a split of {manifest['data']} into {len(sizes)} node files of "
            f"{min(sizes):,}–{max(sizes):,} rows, {manifest['heldout']['rows']} held out"
        )
    rows = load_local_rows(source)
    _, skipped = clean_rows(rows)
    partitioner = partition_dataset(rows, config.data, config.federation.num_clients)
    sizes = [len(partitioner.load_partition(i)) for i in range(config.federation.num_clients)]
    if min(sizes) == 0:
        raise DataError(f"data.partitioner: {sizes.count(0)} of the clients get no rows")
    return (
        f"{source.name}: {len(rows):,} rows ({skipped} with missing or empty fields will be "
        f"skipped), partitions of {min(sizes):,}–{max(sizes):,} rows"
    )


def handle_run(args: argparse.Namespace) -> int:
    from fedtune.config import ConfigError, describe_keys

    if args.list_keys:
        for key, doc, default in describe_keys():
            print(f"{key} = {default!r}\n    {doc}")
        return 0
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    from fedtune.data.sources import DataError
    from fedtune.federation.progress import stderr_emit
    from fedtune.federation.server_app import open_run, preflight
    from fedtune.model.adapters import AdapterMismatch
    from fedtune.model.loading import ModelError, ensure_embedded_cache, resolve_model
    from fedtune.rundir import RunDirectory, RunDirError

    try:
        config = resolve_config(args)
        preflight(config)
        data_note = check_data(config)
        if args.client_app:
            from fedtune.runtime.engine import load_client_app

            load_client_app(args.client_app)
        if not config.run.resume:
            RunDirectory.check_new(config)  # before a model conversion of half a minute
        source = resolve_model(config.model.name)
        if source.kind == "embedded":
            ensure_embedded_cache(source, progress=lambda t: stderr_emit(f"fedtune: {t}"))
        run_dir = open_run(config, command=["fedtune", *sys.argv[1:]])
    except (ConfigError, ModelError, DataError, RunDirError, AdapterMismatch) as exc:
        return fail(str(exc))
    except (ImportError, AttributeError) as exc:
        return fail(f"--client-app {args.client_app}: {exc}")
    stderr_emit(f"fedtune: run directory {run_dir.path}")
    stderr_emit(f"fedtune: data {data_note}")
    return launch(config, run_dir, args)


def launch(config: Any, run_dir: Any, args: argparse.Namespace) -> int:
    """Run the engine under supervision; report how the run ended."""
    from fedtune.federation.progress import stderr_emit
    from fedtune.rundir import ENDED_STATES, FINISHED_STATES, read_status, read_summary
    from fedtune.runtime.supervisor import engine_command, supervise
    from fedtune.units import format_gb

    command = engine_command(
        run_dir.path,
        config.to_flat(),
        args.client_app,
        args.client_cpus,
        args.client_gpus,
        args.verbose,
    )
    code = supervise(command, run_dir, stderr_emit)
    status = read_status(run_dir.path)
    if status["state"] not in ENDED_STATES:
        # Even status.json could not be written (a read-only disk): the messages above say why.
        return fail(
            f"run ended after {status.get('rounds_completed', 0)} rounds without recording "
            f"how (status.json could not be written); once the disk is writable again, "
            f"continue it with: fedtune run --resume {run_dir.path}",
            code=code if code not in (0, 2) else 1,
        )
    if status["state"] not in FINISHED_STATES:
        message = f"run {status['state']} after {status.get('rounds_completed', 0)} rounds"
        if status.get("error"):
            message += f": {status['error']}"
        if status.get("resumable"):
            message += f" (continue it with: fedtune run --resume {run_dir.path})"
        return fail(message, code=code if code not in (0, 2) else 1)
    summary = read_summary(run_dir.path)
    comm = summary["communication"]
    loss = summary["final_train_loss"]
    stderr_emit(
        f"fedtune: {summary['state']} {summary['rounds_completed']}/{summary['rounds_planned']} "
        f"rounds in {summary['seconds']:.0f} s; final train loss "
        + (f"{loss:.4f}" if isinstance(loss, float) else "n/a")
        + (
            f"; held-out loss {summary['final_heldout_loss']:.4f}"
            if isinstance(summary.get("final_heldout_loss"), float)
            else ""
        )
        + f"; communication {comm['total_bytes']:,} bytes = "
        f"{comm['total_mib']:.1f} MiB (board: {format_gb(comm['total_bytes'])})"
        + (f"; {summary['dropped_replies']} replies dropped" if summary["dropped_replies"] else "")
    )
    stderr_emit(f"fedtune: adapter {Path(run_dir.path) / 'adapter'}")
    return 0

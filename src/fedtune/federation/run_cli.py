"""`fedtune run`: the Flower app on Flower's simulation engine, on this machine, with live progress.

Everything the configuration names is checked before the run directory is made: keys and values,
the model source, the data file (parsed) and whether it can be split over the clients.
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
    parser.add_argument("--client-cpus", type=float, help="CPU cores per simulated client")
    parser.add_argument("--client-gpus", type=float, help="GPU share per simulated client")
    parser.add_argument("--list-keys", action="store_true", help="list every config key and exit")
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    parser.set_defaults(handler=handle_run)


def fail(message: str, code: int = 2) -> int:
    print(f"fedtune run: error: {message}", file=sys.stderr)
    return code


def resolve_config(args: argparse.Namespace) -> Any:
    from fedtune.config import build_config, load_config_file, parse_assignment

    sources = []
    if args.config:
        sources.append(load_config_file(args.config))
    sources.append(dict(parse_assignment(item) for item in args.set))
    return build_config(
        *sources, warn=lambda text: print(f"fedtune run: warning: {text}", file=sys.stderr)
    )


def check_data(config: Any) -> str:
    """Parse a local/embedded data set and check it splits over the clients; describe it."""
    from fedtune.data.partition import partition_dataset
    from fedtune.data.sources import DataError, clean_rows, load_local_rows, resolve_data

    source = resolve_data(config.data.name)
    if source.kind == "hub":
        return f"hub data set {source.name} (loaded by each client through flwr-datasets)"
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


def backend_config(config: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Ray resources: on CPU the cores are split over the clients of a round (they run at once)."""
    import torch

    cores = os.cpu_count() or 1
    k = config.federation.sampled_clients
    cpus = args.client_cpus or max(1.0, float(cores // k))
    gpus = (
        args.client_gpus
        if args.client_gpus is not None
        else (1.0 if torch.cuda.is_available() else 0.0)
    )
    return {
        "client_resources": {"num_cpus": cpus, "num_gpus": gpus},
        "init_args": {"num_cpus": cores},
    }


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
    from fedtune.federation.rundir import RunDirError
    from fedtune.federation.server_app import preflight
    from fedtune.model.adapters import AdapterMismatch
    from fedtune.model.loading import ModelError, ensure_embedded_cache, resolve_model

    try:
        config = resolve_config(args)
        preflight(config)
        data_note = check_data(config)
        source = resolve_model(config.model.name)
        if source.kind == "embedded":
            ensure_embedded_cache(source, progress=lambda t: stderr_emit(f"fedtune: {t}"))
        from fedtune.federation.rundir import RunDirectory

        run_dir = RunDirectory.create(config, command=["fedtune", *sys.argv[1:]])
    except (ConfigError, ModelError, DataError, RunDirError, AdapterMismatch) as exc:
        return fail(str(exc))
    stderr_emit(f"fedtune: run directory {run_dir.path}")
    stderr_emit(f"fedtune: data {data_note}")
    return launch(config, run_dir, args)


def launch(config: Any, run_dir: Any, args: argparse.Namespace) -> int:
    """Start the simulation engine with the bound ServerApp and the ClientApp; report the end."""
    import json

    from fedtune.federation.client_app import app as client_app
    from fedtune.federation.progress import stderr_emit
    from fedtune.federation.server_app import make_server_app

    if not args.verbose:
        quiet_libraries()
    from flwr.simulation import run_simulation

    backend = backend_config(config, args)
    if not args.verbose:
        backend["init_args"]["logging_level"] = "error"
        backend["init_args"]["log_to_driver"] = False
    try:
        run_simulation(
            server_app=make_server_app(config, run_dir, stderr_emit),
            client_app=client_app,
            num_supernodes=config.federation.num_clients,
            backend_config=backend,
        )
    except KeyboardInterrupt:
        run_dir.set_status("interrupted")
        return fail("interrupted", code=130)
    status = json.loads((run_dir.path / "status.json").read_text())
    if status["state"] not in ("completed", "stopped-budget"):
        return fail(f"run {status['state']}: {status.get('error', 'see the log above')}", code=1)
    summary = json.loads((run_dir.path / "summary.json").read_text())
    comm = summary["communication"]
    stderr_emit(
        f"fedtune: {summary['state']} {summary['rounds_completed']}/{summary['rounds_planned']} "
        f"rounds in {summary['seconds']:.0f} s; final train loss "
        f"{summary['final_train_loss']:.4f}; communication {comm['total_bytes']:,} bytes = "
        f"{comm['total_mib']:.1f} MiB (board: {comm['board_gb']} GB)"
    )
    stderr_emit(f"fedtune: adapter {Path(run_dir.path) / 'adapter'}")
    return 0

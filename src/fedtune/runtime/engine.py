"""The engine process of `fedtune run`: Flower's simulation engine with the bound ServerApp.

`fedtune run` validates everything, opens the run directory, then starts this module as a child
process in its own process group and supervises it (`supervisor.py`). Keeping the engine in a
child lets the command end honestly whatever happens inside: Flower runs the ServerApp in a
non-daemon thread and Ray keeps worker processes, so a signal to one process does not stop them.

    python -m fedtune.runtime.engine RUN_DIR --config-json '{...}' [--client-app MOD:ATTR]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any


def load_client_app(spec: str) -> Any:
    """`module:attribute` → the ClientApp object (fedtune's own by default)."""
    module_name, _, attribute = spec.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attribute or "app")


# Flower's default `client_resources.num_cpus` for a simulated client.
CPU_CORES_PER_CLIENT = 2


def backend_config(
    sampled_clients: int, client_cpus: float | None, client_gpus: float | None
) -> dict[str, Any]:
    """Ray resources: one simulation worker per `num_cpus` cores (per GPU when there is one).

    On CPU the cores are split over the clients of a round, but never below Flower's own default
    of 2 cores per client: every worker holds its own copy of the model and its training
    activations (about 2.5 GB on the embedded default), while a worker's torch threads use its
    cores about as well as separate workers would — so a 2-core machine runs one worker with two
    threads, not two workers with one (half the memory, `bench/process_memory.py`). Clients
    beyond the workers wait their turn within the round. `--client-cpus` overrides it.

    `max_restarts` reaches Ray's actor options: a worker process that dies (a segfault, the OOM
    killer, an `os._exit` in a ClientApp) is restarted, instead of staying in Flower's pool as a
    dead actor that fails every later message sent to it.
    """
    import torch

    cores = os.cpu_count() or 1
    cpus = client_cpus or float(min(cores, max(CPU_CORES_PER_CLIENT, cores // sampled_clients)))
    gpus = client_gpus if client_gpus is not None else (1.0 if torch.cuda.is_available() else 0.0)
    return {
        "client_resources": {"num_cpus": cpus, "num_gpus": gpus, "max_restarts": -1},
        "init_args": {"num_cpus": cores},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedtune.runtime.engine")
    parser.add_argument("run_dir")
    parser.add_argument("--config-json", required=True)
    parser.add_argument("--client-app", default="fedtune.federation.client_app:app")
    parser.add_argument("--client-cpus", type=float)
    parser.add_argument("--client-gpus", type=float)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)

    from fedtune.config import build_config
    from fedtune.federation.progress import stderr_emit
    from fedtune.federation.server_app import make_server_app
    from fedtune.rundir import FINISHED_STATES, RunDirectory
    from fedtune.runtime.run_cli import quiet_libraries

    config = build_config(json.loads(args.config_json))
    run_dir = RunDirectory(Path(args.run_dir))
    if not args.verbose:
        quiet_libraries()
    from flwr.simulation import run_simulation

    backend = backend_config(config.sampled_clients, args.client_cpus, args.client_gpus)
    if not args.verbose:
        backend["init_args"]["logging_level"] = "error"
        backend["init_args"]["log_to_driver"] = False
    code = 1
    try:
        run_simulation(
            server_app=make_server_app(config, run_dir, stderr_emit),
            client_app=load_client_app(args.client_app),
            num_supernodes=config.federation.num_clients,
            backend_config=backend,
        )
        code = 0 if run_dir.status()["state"] in FINISHED_STATES else 1
    except BaseException as exc:  # the ServerApp has recorded how the run ended
        if args.verbose:
            raise
        if not isinstance(exc, Exception):
            code = 130
    sys.stderr.flush()
    # Leave at once: a client still hung in a worker must not keep this process alive.
    os._exit(code)


if __name__ == "__main__":
    main()

"""`fedtune federation up|down|status|restart`: Flower's deployment engine on this machine;
`fedtune federation stop-local`: the local SuperLink `flwr run .` leaves running."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DEFAULT_DIR = ".fedtune-federation"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "federation",
        help="a SuperLink and SuperNodes on this machine (Flower's deployment engine)",
        description="Start, inspect and stop a local federation of separate processes.",
    )
    commands = parser.add_subparsers(dest="federation_command", required=True, metavar="COMMAND")
    up = commands.add_parser("up", help="start a SuperLink and N SuperNodes")
    up.add_argument("--nodes", type=int, required=True, help="number of SuperNodes")
    up.add_argument("--tls", action="store_true", help="TLS with a generated CA")
    up.add_argument(
        "--auth", action="store_true", help="SuperNode authentication (generated keys; needs --tls)"
    )
    up.add_argument(
        "--data", help="a `fedtune data split` directory: node i trains on its node file"
    )
    up.add_argument("--name", default="local-deployment", help="the connection's name for flwr run")
    up.add_argument(
        "--cold",
        action="store_true",
        help="no node workers: each message's ClientApp process loads the model itself",
    )
    up.set_defaults(handler=_up)
    down = commands.add_parser("down", help="stop exactly what `up` started")
    down.set_defaults(handler=_down)
    status = commands.add_parser("status", help="the recorded processes and the online nodes")
    status.set_defaults(handler=_status)
    restart = commands.add_parser(
        "restart",
        help="start a node or the SuperLink that died again (same key, data, database and "
        "log) and wait for it",
    )
    restart.add_argument("node", help="a node's name, e.g. node-1, or `superlink` (see `status`)")
    restart.add_argument(
        "--timeout", type=float, default=180.0, help="seconds to wait for it to be online (180)"
    )
    restart.set_defaults(handler=_restart)
    worker = commands.add_parser(
        "worker",
        help="a node's warm worker (model and data kept across messages) on a Unix socket",
        description="Serve fedtune's ClientApp for one SuperNode whose node config names "
        "worker-socket=PATH; runs until stopped. `up` starts one per node unless --cold.",
    )
    worker.add_argument("--socket", required=True, help="the Unix socket path to listen on")
    worker.set_defaults(handler=_worker)
    stop_local = commands.add_parser(
        "stop-local",
        help="stop the local SuperLink that `flwr run .` started (Flower leaves it running)",
        description="Stop Flower's managed local simulation SuperLink of this FLWR_HOME "
        "(default ~/.flwr) and the SuperExec it spawned; a later `flwr run .` starts a new one.",
    )
    stop_local.set_defaults(handler=_stop_local)
    for command in (up, down, status, restart):
        command.add_argument(
            "--dir", default=DEFAULT_DIR, help=f"the federation's directory ({DEFAULT_DIR})"
        )


def _up(args: argparse.Namespace) -> int:
    from fedtune.runtime.local import FederationError, up

    try:
        state = up(
            Path(args.dir),
            args.nodes,
            tls=args.tls,
            auth=args.auth,
            data_dir=Path(args.data) if args.data else None,
            connection=args.name,
            warm=not args.cold,
        )
    except FederationError as exc:
        print(f"fedtune federation up: error: {exc}", file=sys.stderr)
        return 2
    warm = "warm node workers" if state["warm"] else "cold ClientApps"
    secured = " + ".join(x for x, on in (("TLS", state["tls"]), ("node auth", state["auth"])) if on)
    print(
        f"SuperLink {state['address']} ({secured or 'insecure'}), {state['nodes']} SuperNodes "
        f"({warm}) "
        f"online after {state['nodes_online_s']} s; state in {Path(args.dir) / 'federation.json'}"
    )
    print(
        f"run on it:  FLWR_HOME={state['flwr_home']} "
        f"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flwr run . {state['connection']} --stream"
    )
    print(
        "            (fp32 LoRA as one object per message, lossless and ~5x less per-round "
        "overhead here: --run-config \"compress.downlink='fp32,zstd' compress.uplink='fp32,zstd'\")"
    )
    if args.data:
        print(
            f"its data:   the nodes train on their own files of {args.data}; give the server "
            f"the split too: --run-config \"data.name='{Path(args.data).resolve()}' "
            f'federation.num-clients={state["nodes"]}"'
        )
    print(f"stop it:    fedtune federation down --dir {args.dir}")
    return 0


def _down(args: argparse.Namespace) -> int:
    from fedtune.runtime.local import FederationError, down

    try:
        for line in down(Path(args.dir)):
            print(line)
    except FederationError as exc:
        print(f"fedtune federation down: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _stop_local(args: argparse.Namespace) -> int:
    from fedtune.runtime.flower_local import flwr_home, stop_local_superlink

    lines = stop_local_superlink()
    for line in lines:
        print(line)
    if not lines:
        print(f"no local SuperLink of {flwr_home()} is running")
    return 0


def _status(args: argparse.Namespace) -> int:
    from fedtune.runtime.local import FederationError, _group_alive, online_nodes, read_state

    try:
        state = read_state(Path(args.dir))
        for process in state.get("processes", []):
            alive = "running" if _group_alive(process["pgid"]) else "not running"
            node = f"  node id {process['node_id']}" if "node_id" in process else ""
            print(
                f"{process['name']:10} pid {process['pid']:>7}  {alive}{node}  log {process['log']}"
            )
        if not state.get("processes"):
            print(f"stopped at {state.get('stopped_at', '?')}")
            return 0
        print(f"{len(online_nodes(state))} of {state['nodes']} nodes online at {state['address']}")
    except FederationError as exc:
        print(f"fedtune federation status: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _restart(args: argparse.Namespace) -> int:
    from fedtune.runtime.local import FederationError, restart_node, restart_superlink

    print(f"restarting {args.node} (up to {args.timeout:.0f} s) …", file=sys.stderr, flush=True)
    try:
        if args.node == "superlink":
            process = restart_superlink(Path(args.dir), timeout_s=args.timeout)
        else:
            process = restart_node(Path(args.dir), args.node, timeout_s=args.timeout)
    except FederationError as exc:
        print(f"fedtune federation restart: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.node} online again after {process['rejoined_s']} s (pid {process['pid']})")
    return 0


def _worker(args: argparse.Namespace) -> int:
    import signal

    from fedtune.runtime.node_worker import WorkerError, serve

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        serve(Path(args.socket))
    except WorkerError as exc:
        print(f"fedtune federation worker: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0

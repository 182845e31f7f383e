"""A federation on this machine with Flower's deployment engine: one SuperLink and N SuperNodes as
separate processes, optionally with TLS and SuperNode authentication — the same pieces, flags and
files a user runs on separate machines.

`up` generates what is asked for (a CA and server certificate; one P-384 key per node, registered
with the SuperLink), starts the processes, waits until the SuperLink answers and every node is
online, and writes:
- `federation.json`: every process started (role, pid, process group, port, command, log), the
  address, what is secured — what `down` stops, and nothing else;
- `flwr-home/config.toml`: the connection `flwr run . NAME` uses (address, TLS root certificate);
- `certs/`, `keys/`, `logs/`.
Anything that fails during `up` stops what was already started. `down` sends SIGTERM to each
process group it recorded (nodes first, then the SuperLink), waits, then SIGKILLs what is left.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fedtune.rundir import process_alive
from fedtune.runtime.certs import make_node_key, make_tls

STATE_FILE = "federation.json"
HOST = "127.0.0.1"
# A node whose SuperLink is gone retries for at most this long, then exits (never forever).
NODE_MAX_WAIT_S = 600


class FederationError(RuntimeError):
    """The local federation could not be started, or is not in the state asked for."""


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment Flower's processes need: this interpreter's bin on PATH (Flower starts
    flower-superexec and the apps by name), the connection file, and no runtime installs."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }


def _alive(pid: int) -> bool:
    if not process_alive(pid):
        return False
    try:  # a zombie (exited, not yet reaped) is not alive
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return any(group == pgid for _, group in _process_table().values())


def _start(role: str, name: str, command: list[str], log: Path, env: dict[str, str]) -> dict:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return {"role": role, "name": name, "pid": process.pid, "pgid": process.pid,
            "command": command, "log": str(log)}  # fmt: skip


def _tail(path: str, lines: int = 5) -> str:
    try:
        return " | ".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_health(address: str, ca: Path | None, process: dict, timeout_s: float) -> float:
    import ssl

    import httpx

    scheme = "https" if ca else "http"
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca)) if ca else False
    started = time.monotonic()
    while True:
        try:
            reply = httpx.get(f"{scheme}://{address}/health", verify=verify, timeout=2)
            if reply.status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        if not _alive(process["pid"]):
            raise FederationError(f"the SuperLink exited: {_tail(process['log'])}")
        if time.monotonic() - started > timeout_s:
            raise FederationError(f"the SuperLink did not answer within {timeout_s:.0f} s")
        time.sleep(0.2)


def flwr_cli(args: list[str], env: dict[str, str], timeout_s: float = 60) -> Any:
    """Run `flwr ARGS --format json` and return its JSON answer.

    Raises:
        FederationError: it failed, timed out or did not answer JSON.
    """
    flwr = str(Path(sys.executable).parent / "flwr")
    try:
        done = subprocess.run(
            [flwr, *args, "--format", "json"], env=env, capture_output=True, text=True,
            timeout=timeout_s,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise FederationError(f"flwr {' '.join(args)} took over {timeout_s:.0f} s") from exc
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        answer = None
    if done.returncode != 0 or not isinstance(answer, dict) or not answer.get("success"):
        detail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        raise FederationError(f"flwr {' '.join(args)} failed: {' | '.join(detail)}")
    return answer


def node_statuses(state: dict, env: dict[str, str] | None = None) -> dict[int, str]:
    """node id → status (online, offline, registered …) as the SuperLink reports it."""
    env = env or flower_env(Path(state["flwr_home"]))
    answer = flwr_cli(["supernode", "ls", state["connection"]], env)
    return {int(n["node-id"]): str(n.get("status")) for n in answer.get("nodes", [])}


def online_nodes(state: dict, env: dict[str, str] | None = None) -> list[int]:
    """The ids of the SuperLink's nodes that are online (`flwr supernode ls`)."""
    return sorted(n for n, status in node_statuses(state, env).items() if status == "online")


def node_data_files(data_dir: Path, nodes: int) -> list[Path]:
    """Node i's file of a `fedtune data split` directory, checked to hold a split for `nodes`.

    Raises:
        FederationError: no split there, or one for another number of nodes.
    """
    from fedtune.data.sources import DataError, node_file, read_manifest

    try:
        read_manifest(data_dir, nodes)
    except DataError as exc:
        raise FederationError(str(exc).removeprefix("data.name: ")) from None
    return [(data_dir / node_file(i)).resolve() for i in range(nodes)]


def read_state(directory: Path) -> dict:
    """The recorded federation of `directory`.

    Raises:
        FederationError: none recorded there.
    """
    try:
        return json.loads((directory / STATE_FILE).read_text())
    except FileNotFoundError:
        raise FederationError(f"no federation recorded in {directory} ({STATE_FILE})") from None
    except ValueError as exc:
        raise FederationError(f"{directory / STATE_FILE} is not readable: {exc}") from exc


def _write_state(directory: Path, state: dict) -> None:
    temporary = directory / f".{STATE_FILE}.tmp"
    temporary.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(temporary, directory / STATE_FILE)


def up(
    directory: Path,
    nodes: int,
    *,
    tls: bool = False,
    auth: bool = False,
    data_dir: Path | None = None,
    connection: str = "local-deployment",
    timeout_s: float = 90.0,
    warm: bool = True,
) -> dict:
    """Start a SuperLink and `nodes` SuperNodes on this machine; the recorded state.

    With `warm`, each SuperNode runs beside a node worker (`fedtune federation worker`, in the
    node's process group) that keeps the model and data across messages; the node config's
    `worker-socket` tells fedtune's ClientApp where it listens.

    Raises:
        FederationError: bad arguments, a federation already running in `directory`, or a piece
            that did not start (everything started is stopped again first).
    """
    if nodes < 1:
        raise FederationError("--nodes must be at least 1")
    if auth and not tls:
        raise FederationError("SuperNode authentication needs TLS (--tls)")
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / STATE_FILE).exists():
        old = read_state(directory)
        if any(_group_alive(p["pgid"]) for p in old.get("processes", [])):
            raise FederationError(
                f"a federation is already running from {directory} (fedtune federation down)"
            )
    files = node_data_files(data_dir.resolve(), nodes) if data_dir else [None] * nodes
    flwr_home = directory / "flwr-home"
    flwr_home.mkdir(exist_ok=True)
    env = flower_env(flwr_home)
    port = free_port()
    address = f"{HOST}:{port}"
    ca = make_tls(directory / "certs") if tls else None
    state: dict[str, Any] = {
        "address": address, "connection": connection, "flwr_home": str(flwr_home),
        "tls": tls, "auth": auth, "warm": warm, "nodes": nodes, "processes": [],
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    bin_dir = Path(sys.executable).parent
    try:
        link = [str(bin_dir / "flower-superlink"), "--host", HOST, "--port", str(port),
                "--database", str(directory / "superlink.db"),
                "--disable-runtime-dependency-installation"]  # fmt: skip
        if ca:
            link += ["--ssl-ca-certfile", str(ca.ca_cert), "--ssl-certfile",
                     str(ca.server_cert), "--ssl-keyfile", str(ca.server_key)]  # fmt: skip
        else:
            link.append("--insecure")
        if auth:
            link.append("--enable-supernode-auth")
        superlink = _start(
            "superlink", "superlink", link, directory / "logs" / "superlink.log", env
        )
        state["processes"].append(superlink)
        _write_state(directory, state)
        state["superlink_ready_s"] = round(
            _wait_health(address, ca.ca_cert if ca else None, superlink, timeout_s), 2
        )
        _write_connection(flwr_home, connection, address, ca.ca_cert if ca else None)
        # Each node's key registered with the SuperLink (one `flwr` process each, all at once).
        keys = (
            [make_node_key(directory / "keys", f"node-{i}") for i in range(nodes)] if auth else []
        )
        with ThreadPoolExecutor(max_workers=max(len(keys), 1)) as pool:
            answers = list(pool.map(
                lambda key: flwr_cli(["supernode", "register", str(key[1]), connection], env), keys
            ))  # fmt: skip
        for i in range(nodes):
            name = f"node-{i}"
            node = [str(bin_dir / "flower-supernode"), "--superlink", address,
                    "--port", str(free_port()), "--max-wait-time", str(NODE_MAX_WAIT_S)]  # fmt: skip
            node += ["--root-certificates", str(ca.ca_cert)] if ca else ["--insecure"]
            node_id = None
            if auth:
                node_id = int(answers[i]["node-id"])
                node += ["--auth-supernode-private-key", str(keys[i][0])]
            config = f"partition-id={i} num-partitions={nodes}"
            if files[i] is not None:
                config += f' data-path="{files[i]}"'
            if warm:
                config += f' worker-socket="{worker_socket(directory, name)}"'
            node += ["--node-config", config]
            if warm:
                node = with_worker(node, worker_socket(directory, name))
            started = _start("supernode", name, node, directory / "logs" / f"{name}.log", env)
            if node_id is not None:
                started["node_id"] = node_id
            state["processes"].append(started)
            _write_state(directory, state)
        nodes_started = time.monotonic()
        deadline = nodes_started + timeout_s
        while len(online_nodes(state, env)) < nodes:
            dead = [p for p in state["processes"] if not _alive(p["pid"])]
            if dead:
                raise FederationError(f"{dead[0]['name']} exited: {_tail(dead[0]['log'])}")
            if time.monotonic() > deadline:
                raise FederationError(f"not every node came online within {timeout_s:.0f} s")
            time.sleep(0.5)
    except BaseException:
        down(directory)
        raise
    state["nodes_online_s"] = round(time.monotonic() - nodes_started, 2)
    _write_state(directory, state)
    return state


def _relaunch(directory: Path, state: dict, process: dict, env: dict[str, str]) -> None:
    """Start a recorded process again with its own command and log; its record updated."""
    fresh = _start(process["role"], process["name"], process["command"], Path(process["log"]), env)
    process.update(pid=fresh["pid"], pgid=fresh["pgid"], restarts=process.get("restarts", 0) + 1)
    _write_state(directory, state)


def restart_node(directory: Path, name: str, timeout_s: float = 180.0) -> dict:
    """Start a recorded SuperNode again that is no longer running (same command, key, data and
    log) and wait until it is online; its updated record.

    With authentication the SuperLink refuses a node's key while it still counts the old
    session as online (Flower marks a silent node offline within about 60 s), so the restart
    first waits for that. Every wait is bounded by `timeout_s`.

    Raises:
        FederationError: no such node, it is still running, or it did not come back in time.
    """
    directory = directory.resolve()
    state = read_state(directory)
    found = [
        p for p in state.get("processes", []) if p["name"] == name and p["role"] == "supernode"
    ]
    if not found:
        known = ", ".join(p["name"] for p in state.get("processes", []) if p["role"] == "supernode")
        raise FederationError(f"no node {name!r} in {directory} (nodes: {known or 'none'})")
    process = found[0]
    if _group_alive(process["pgid"]):
        raise FederationError(f"{name} is still running (pid {process['pid']})")
    env = flower_env(Path(state["flwr_home"]))
    started = time.monotonic()
    deadline = started + timeout_s
    node_id = process.get("node_id")
    if node_id is not None:
        while node_statuses(state, env).get(node_id) == "online":
            if time.monotonic() > deadline:
                raise FederationError(
                    f"the SuperLink still counts {name} (node {node_id}) as online after "
                    f"{timeout_s:.0f} s; it refuses the key until then"
                )
            time.sleep(1.0)
    before = set(online_nodes(state, env))
    _relaunch(directory, state, process, env)
    while True:
        online = set(online_nodes(state, env))
        if (node_id in online) if node_id is not None else bool(online - before):
            break
        if not _alive(process["pid"]):
            raise FederationError(f"{name} exited again: {_tail(process['log'])}")
        if time.monotonic() > deadline:
            raise FederationError(f"{name} did not come online within {timeout_s:.0f} s")
        time.sleep(0.5)
    process["rejoined_s"] = round(time.monotonic() - started, 2)
    _write_state(directory, state)
    return process


def restart_superlink(directory: Path, timeout_s: float = 180.0) -> dict:
    """Start the recorded SuperLink again after it died (same address, certificates and
    database, so the registered node keys and node ids survive); its updated record once it
    answers and every running node is connected again.

    SuperNodes keep retrying a lost SuperLink (with backoff, up to `--max-wait-time`) and
    reconnect by themselves; a run whose ServerApp died with the SuperLink is continued with
    `run.resume`. Every wait is bounded by `timeout_s`.

    Raises:
        FederationError: no SuperLink recorded, it is still running, or it or the nodes did not
            come back in time.
    """
    directory = directory.resolve()
    state = read_state(directory)
    found = [p for p in state.get("processes", []) if p["role"] == "superlink"]
    if not found:
        raise FederationError(f"no SuperLink recorded in {directory}")
    process = found[0]
    if _group_alive(process["pgid"]):
        raise FederationError(f"the SuperLink is still running (pid {process['pid']})")
    env = flower_env(Path(state["flwr_home"]))
    started = time.monotonic()
    _relaunch(directory, state, process, env)
    command = process["command"]
    flag = "--ssl-ca-certfile"
    ca = Path(command[command.index(flag) + 1]) if flag in command else None
    _wait_health(state["address"], ca, process, timeout_s)
    # The database still lists the nodes as it last saw them; what shows a node is back is its
    # own log: after its last failed connection attempt, a successful one.
    waiting = [
        p for p in state["processes"] if p["role"] == "supernode" and _group_alive(p["pgid"])
    ]
    deadline = started + timeout_s
    while waiting := [p for p in waiting if not _connected(p["log"])]:
        if time.monotonic() > deadline:
            names = ", ".join(p["name"] for p in waiting)
            raise FederationError(
                f"the SuperLink is back but {names} did not reconnect within {timeout_s:.0f} s"
            )
        time.sleep(0.5)
    process["rejoined_s"] = round(time.monotonic() - started, 2)
    _write_state(directory, state)
    return process


def _connected(path: str) -> bool:
    """Whether a SuperNode's log shows it connected: no failed connection attempt, or a
    successful one after the last failure (Flower's retry messages)."""
    try:
        text = Path(path).read_bytes()
    except OSError:
        return False
    failed = text.rfind(b"Connection attempt failed")
    return failed < 0 or text.rfind(b"Connection successful") > failed


def worker_socket(directory: Path, name: str) -> Path:
    """Where node `name`'s worker listens: in the federation's directory, or under the system's
    temporary directory when that path would pass the ~100-byte limit of Unix socket paths."""
    path = directory / "sockets" / f"{name}.sock"
    if len(str(path)) > 100:
        digest = hashlib.sha256(str(directory).encode()).hexdigest()[:12]
        path = Path(tempfile.gettempdir()) / f"fedtune-{digest}" / f"{name}.sock"
    return path


def with_worker(supernode: list[str], socket_path: Path) -> list[str]:
    """A command that starts the node worker in the background, then becomes the SuperNode
    (`exec`): both in one process group, so stopping or killing the node stops both."""
    worker = [sys.executable, "-m", "fedtune.cli", "federation", "worker", "--socket"]
    script = " ".join(shlex.quote(x) for x in worker) + ' "$0" & exec "$@"'
    return ["/bin/sh", "-c", script, str(socket_path), *supernode]


def _write_connection(flwr_home: Path, name: str, address: str, ca: Path | None) -> None:
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]",
             f'address = "{address}"', f"insecure = {'false' if ca else 'true'}"]  # fmt: skip
    if ca:
        lines.append(f'root-certificates = "{ca}"')
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def _stop_groups(pgids: list[int], timeout_s: float) -> list[str]:
    """SIGTERM process groups all at once, SIGKILL those left after `timeout_s`; how each
    ended. Together, because each takes its own time to shut down (a SuperNode says goodbye
    to its SuperLink first): the slowest sets the wait, not their sum."""
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while any(_group_alive(g) for g in pgids) and time.monotonic() < deadline:
        time.sleep(0.1)
    stubborn = [g for g in pgids if _group_alive(g)]
    for pgid in stubborn:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    while any(_group_alive(g) for g in stubborn) and time.monotonic() < deadline + 10:
        time.sleep(0.1)
    return [f"killed after {timeout_s:.0f} s" if g in stubborn else "stopped" for g in pgids]


def _process_table() -> dict[int, tuple[int, int]]:
    """pid → (parent pid, process group) of every live (non-zombie) process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                table[int(entry.name)] = (int(fields[1]), int(fields[2]))
    return table


def _detached_descendants(pgid: int) -> list[int]:
    """Descendants of a process group's members that live in another process group (a child
    started with a session of its own), which a signal to the group would miss."""
    table = _process_table()
    members = {pid for pid, (_, group) in table.items() if group == pgid}
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found: list[int] = []
    stack = list(members)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in members and child not in found:
                found.append(child)
                stack.append(child)
    return [pid for pid in found if table[pid][1] != pgid]


def _command_name(pid: int) -> str:
    try:
        words = [Path(w.decode(errors="replace")).name for w in
                 Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if w]  # fmt: skip
    except OSError:
        return "process"
    if len(words) > 1 and words[0].startswith("python") and not words[1].startswith("-"):
        return words[1]
    return words[0] if words else "process"


def down(directory: Path, timeout_s: float = 20.0) -> list[str]:
    """Stop every process group the federation of `directory` recorded: nodes first, then the
    SuperLink; SIGTERM, then SIGKILL after `timeout_s`. Returns what was stopped, as text.

    Raises:
        FederationError: no federation recorded there.
    """
    directory = directory.resolve()
    state = read_state(directory)
    report = []
    processes = state.get("processes", [])
    # The nodes together, then the SuperLink they were connected to.
    for batch in (
        [p for p in processes if p["role"] != "superlink"],
        [p for p in processes if p["role"] == "superlink"],
    ):
        live = [p for p in batch if _group_alive(p["pgid"])]
        # Flower starts a ServerApp in a session of its own: found now, stopped after its parent.
        detached = {p["pid"]: _detached_descendants(p["pgid"]) for p in live}
        stopped = _stop_groups([p["pgid"] for p in live], timeout_s)
        hows = dict(zip([p["pid"] for p in live], stopped, strict=True))
        for process in batch:
            if process["pid"] not in hows:
                report.append(f"{process['name']} (pid {process['pid']}): not running")
                continue
            how = hows[process["pid"]]
            for pid in detached[process["pid"]]:
                try:
                    group = os.getpgid(pid)
                except ProcessLookupError:
                    continue  # it ended with its parent
                name = _command_name(pid)
                how += f"; its detached {name} (pid {pid}) {_stop_groups([group], timeout_s)[0]}"
            report.append(f"{process['name']} (pid {process['pid']}): {how}")
    state["stopped_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    state["processes"] = []
    _write_state(directory, state)
    return report

"""Flower's managed local SuperLink: what `flwr run .` starts on this machine and leaves running.

With a connection whose address is `:local:` (Flower's default configuration), `flwr run` starts
`flower-superlink --simulation` detached, with its database and log under
`$FLWR_HOME/local-superlink/`, and reuses it for later runs; Flower has no command that stops it.
`fedtune federation stop-local` finds that process by its log path (so only the SuperLink of this
`FLWR_HOME` is touched) and stops it with the SuperExec it spawned: SIGTERM, a bounded wait, then
SIGKILL.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

STOP_WAIT_S = 10.0


def flwr_home() -> Path:
    """Flower's home directory (`FLWR_HOME`, else ~/.flwr), as Flower resolves it."""
    from flwr.common.config import get_flwr_home

    return Path(get_flwr_home())


def local_superlinks(home: Path | None = None) -> list[Any]:
    """The running `flower-superlink` processes whose log file is under `home`'s local-superlink."""
    import psutil

    marker = str((home or flwr_home()) / "local-superlink" / "superlink.log")
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if any(part.endswith("flower-superlink") for part in cmdline) and marker in cmdline:
            found.append(process)
    return found


def stop_local_superlink(home: Path | None = None, wait_s: float = STOP_WAIT_S) -> list[str]:
    """Stop the local SuperLink of `home` and its children; what was stopped, line by line."""
    import psutil

    lines = []
    for superlink in local_superlinks(home):
        with contextlib.suppress(psutil.NoSuchProcess):
            port = _option(superlink.cmdline(), "--port")
            tree = [superlink, *superlink.children(recursive=True)]
            for process in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.terminate()
            _, alive = psutil.wait_procs(tree, timeout=wait_s)
            for process in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            psutil.wait_procs(alive, timeout=wait_s)
            forced = f", {len(alive)} killed after {wait_s:.0f} s" if alive else ""
            lines.append(
                f"stopped Flower's local SuperLink (pid {superlink.pid}, port {port}) and "
                f"{len(tree) - 1} child process{'es' if len(tree) != 2 else ''}{forced}"
            )
    return lines


def _option(cmdline: list[str], name: str) -> str:
    return cmdline[cmdline.index(name) + 1] if name in cmdline[:-1] else "?"

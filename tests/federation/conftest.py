"""Fixtures for the federation tests: one tiny model directory, and uninterrupted reference runs
(one per strategy) that interrupted runs are compared with.

Both are made once per test session, also when the session runs in several pytest-xdist workers:
they live in a folder every worker sees, made under a file lock by the first worker that asks, so
that every run of the session (and its config digest) names the same model directory."""

from __future__ import annotations

import contextlib
import fcntl
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _session_dir(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's base temp folder: with pytest-xdist, the one above the workers' own."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if hasattr(config, "workerinput") else base


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (between the workers of a session)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def tiny_model_dir_module(pytestconfig, tmp_path_factory, smollm2_tokenizer):
    import importlib.util

    shared = _session_dir(pytestconfig, tmp_path_factory) / "federation-tiny"
    path = shared / "tiny-llama"
    shared.mkdir(exist_ok=True)
    with _locked(shared / ".lock"):
        if not (shared / "done").exists():
            spec = importlib.util.spec_from_file_location(
                "tests_conftest", HERE.parent / "conftest.py"
            )
            assert spec is not None and spec.loader is not None
            root_conftest = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(root_conftest)
            root_conftest.build_tiny_llama().save_pretrained(path)
            smollm2_tokenizer.save_pretrained(path)
            (shared / "done").touch()
    return path


@pytest.fixture(scope="session")
def reference_run(pytestconfig, tiny_model_dir_module, tmp_path_factory):
    """setup name (harness.SETUPS) → the directory of an uninterrupted run with fedtune's own
    ClientApp (made on first use, shared by the session)."""
    from harness import SETUPS, Run

    shared = _session_dir(pytestconfig, tmp_path_factory) / "federation-references"
    shared.mkdir(exist_ok=True)

    def get(setup: str = "fedavg") -> Path:
        made = shared / f"{setup}.path"
        with _locked(shared / f"{setup}.lock"):
            if not made.exists():
                tmp = Path(tmp_path_factory.mktemp(f"reference-{setup}"))
                run = Run(tmp, "ref", tiny_model_dir_module, *SETUPS[setup], wrap=False)
                code, err = run.wait()
                assert code == 0, err[-3000:]
                made.write_text(str(run.dir))
            return Path(made.read_text())

    return get

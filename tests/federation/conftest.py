"""Fixtures for the federation tests: one tiny model directory, and uninterrupted reference runs
(one per strategy) that interrupted runs are compared with."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


@pytest.fixture(scope="session")
def tiny_model_dir_module(tmp_path_factory, smollm2_tokenizer):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tests_conftest", HERE.parent / "conftest.py")
    assert spec is not None and spec.loader is not None
    root_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(root_conftest)
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    root_conftest.build_tiny_llama().save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def reference_run(tiny_model_dir_module, tmp_path_factory):
    """setup name (harness.SETUPS) → the directory of an uninterrupted run with fedtune's own
    ClientApp (made on first use, shared by the session)."""
    from harness import SETUPS, Run

    made: dict[str, Path] = {}

    def get(setup: str = "fedavg") -> Path:
        if setup not in made:
            tmp = tmp_path_factory.mktemp(f"reference-{setup}")
            run = Run(tmp, "ref", tiny_model_dir_module, *SETUPS[setup], wrap=False)
            code, err = run.wait()
            assert code == 0, err[-3000:]
            made[setup] = run.dir
        return made[setup]

    return get

"""Fixtures for the federation tests: one tiny model directory shared by a module's runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


@pytest.fixture(scope="module")
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

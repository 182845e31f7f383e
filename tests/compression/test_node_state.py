"""A node's error-feedback residuals: the newest from an earlier round, in memory and on disk."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fedtune.compression.settings import codec_specs
from fedtune.config import ConfigError, build_config
from fedtune.federation.node_state import NodeStateStore

pytestmark = pytest.mark.unit


def context(node_config=None):
    return Context(
        run_id=1, node_id=1, node_config=node_config or {}, state=RecordDict(), run_config={}
    )


def residual(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), value, dtype=np.float32)}


def test_a_redone_round_gets_the_residual_it_had_the_first_time(tmp_path):
    store = NodeStateStore.for_node(context(), str(tmp_path), 3)
    assert store.directory == tmp_path / "node-state" / "partition-3"
    assert store.load(1) is None
    store.save(1, residual(1.0))
    store.save(4, residual(4.0))
    assert store.load(4)["w"][0, 0] == 1.0  # round 4 uses what round 1 left
    assert store.load(5)["w"][0, 0] == 4.0
    # A resumed server redoes round 4 in a new process: the disk has what memory had.
    fresh = NodeStateStore.for_node(context(), str(tmp_path), 3)
    assert fresh.load(4)["w"][0, 0] == 1.0
    fresh.save(4, residual(4.5))  # the redo replaces round 4's residual
    assert fresh.load(5)["w"][0, 0] == 4.5
    store.save(7, residual(7.0))  # two files are kept: a node is at most one round ahead
    names = sorted(p.name for p in store.directory.iterdir())
    assert names == ["residual-00004.safetensors", "residual-00007.safetensors"]
    store.save(5, residual(5.0))  # files of later rounds than the one saved are stale
    names = sorted(p.name for p in store.directory.iterdir())
    assert names == ["residual-00004.safetensors", "residual-00005.safetensors"]


def test_a_node_config_state_dir_wins_and_no_directory_keeps_memory_only(tmp_path):
    store = NodeStateStore.for_node(context({"state-dir": str(tmp_path / "n")}), "/elsewhere", 0)
    assert store.directory == tmp_path / "n" / "partition-0"
    memory_only = NodeStateStore.for_node(context(), "", 0)
    memory_only.save(2, residual(2.0))
    assert memory_only.load(3)["w"][0, 0] == 2.0 and memory_only.load(2) is None


def test_compress_keys_are_checked_with_their_names():
    down, up = codec_specs(
        build_config({"compress.uplink": "delta,top-k=0.01,int4", "compress.block-size": 32})
    )
    assert down.identity and up.top_k == 0.01 and up.block_size == 32
    with pytest.raises(ConfigError, match="compress.downlink: .*uplink-only"):
        build_config({"compress.downlink": "delta,int8"})
    with pytest.raises(ConfigError, match="compress.error-feedback: .*lossy"):
        build_config({"compress.error-feedback": True})
    with pytest.raises(ConfigError, match="compress.uplink: .*unknown stage"):
        build_config({"compress.uplink": "int3"})
    with pytest.raises(ConfigError, match="compress.block-size"):
        build_config({"compress.block-size": 0, "compress.uplink": "int8"})

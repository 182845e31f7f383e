"""`fedtune data split`: one file per node holding exactly its partition, and a node trains on its
file as the simulation's client of that partition trains on its slice."""

from __future__ import annotations

import gzip
import hashlib
import json

import pytest

from fedtune.cli import main
from fedtune.config import build_config
from fedtune.data.partition import load_heldout, load_partition
from fedtune.data.pipeline import node_file_examples, partition_examples
from fedtune.data.sources import DataError, resolve_data
from fedtune.data.split import write_split
from fedtune.federation import client_app

pytestmark = pytest.mark.unit

SETTINGS = {
    "data.name": "embedded:dolly-15k",
    "data.partitioner": "dirichlet",
    "data.partition-by": "category",
    "data.dirichlet-alpha": 0.5,
    "federation.num-clients": 4,
    "data.heldout-examples": 50,
    "train.seq-length": 96,
}


def _rows(path):
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines()]


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    config = build_config(SETTINGS)
    out = tmp_path_factory.mktemp("split")
    return config, out, write_split(config, out)


def test_each_node_file_holds_exactly_its_partition(split):
    config, out, manifest = split
    source = resolve_data(config.data.name)
    assert [n["file"] for n in manifest["nodes"]] == [f"node-00{i}.jsonl.gz" for i in range(4)]
    for node in manifest["nodes"]:
        path = out / node["file"]
        expected = [dict(r) for r in load_partition(source, config.data, node["partition_id"], 4)]
        assert _rows(path) == expected and node["rows"] == len(expected)
        assert node["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    heldout = [dict(r) for r in load_heldout(source, config.data, 4)]
    assert _rows(out / "heldout.jsonl.gz") == heldout and len(heldout) == 50
    report = json.loads((out / "partitions.json").read_text())
    assert report["sizes"] == [n["rows"] for n in manifest["nodes"]]
    assert (out / "partitions.png").stat().st_size > 0
    assert manifest["data_settings"]["dirichlet_alpha"] == 0.5
    with pytest.raises(DataError, match="already holds a split"):
        write_split(config, out)


def test_a_node_trains_on_its_file_as_on_its_partition(split, smollm2_tokenizer):
    config, out, manifest = split
    from_file, counts = node_file_examples(
        smollm2_tokenizer, config, str(out / "node-002.jsonl.gz")
    )
    from_partition, expected_counts = partition_examples(smollm2_tokenizer, config, 2, 4)
    assert [e.input_ids for e in from_file] == [e.input_ids for e in from_partition]
    assert [e.label_mask for e in from_file] == [e.label_mask for e in from_partition]
    assert counts == expected_counts
    with pytest.raises(DataError, match="does not exist"):
        node_file_examples(smollm2_tokenizer, config, str(out / "node-009.jsonl.gz"))


def test_the_client_uses_its_data_path_when_its_node_config_names_one(split, smollm2_tokenizer):
    config, out, _ = split
    worker = client_app.ClientWorker(("key",), None, smollm2_tokenizer, "cpu")
    own = str(out / "node-001.jsonl.gz")
    examples, counts = client_app.get_partition(worker, config, 0, 4, own)
    assert counts["partition-rows"] == _rows(out / "node-001.jsonl.gz").__len__()
    assert examples is client_app.get_partition(worker, config, 0, 4, own)[0]  # tokenized once
    sliced, _ = client_app.get_partition(worker, config, 0, 4)
    assert [e.input_ids for e in sliced] != [e.input_ids for e in examples]


def test_the_command(tmp_path, capsys):
    args = ["data", "split", "embedded:alpaca-gpt4-sample", "--clients", "3", "--out"]
    assert main([*args, str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "3 node files of" in out and "200 held-out rows" in out and "data-path=" in out
    assert main([*args, str(tmp_path / "s")]) == 2
    assert "already holds a split" in capsys.readouterr().err
    bad = ["data", "split", "embedded:nothing", "--out", str(tmp_path / "t")]
    assert main(bad) == 2


def test_a_split_directory_is_a_data_source_for_server_and_clients(split, tmp_path):
    from fedtune.data.partition_report import build_report
    from fedtune.runtime.run_cli import check_data

    config, out, manifest = split
    original = resolve_data(config.data.name)
    on_split = build_config({**SETTINGS, "data.name": str(out)})
    source = resolve_data(str(out))
    assert source.kind == "split"
    # Each client's partition is its node file; the server's held-out set is the split's.
    for i in range(4):
        assert [dict(r) for r in load_partition(source, on_split.data, i, 4)] == [
            dict(r) for r in load_partition(original, config.data, i, 4)
        ]
    assert [dict(r) for r in load_heldout(source, on_split.data, 4)] == [
        dict(r) for r in load_heldout(original, config.data, 4)
    ]
    # The server's per-node bound and report come from the manifest and the saved report,
    # never from a node's file: delete them all and the report is unchanged.
    report = build_report(on_split.data, 4)
    assert report.sizes == [n["rows"] for n in manifest["nodes"]] and report.labels
    bare = tmp_path / "server-side"
    bare.mkdir()
    for name in ("split.json", "heldout.jsonl.gz"):
        (bare / name).write_bytes((out / name).read_bytes())
    server_only = build_report(build_config({**SETTINGS, "data.name": str(bare)}).data, 4)
    assert server_only.sizes == report.sizes and server_only.heldout_rows == 50
    assert "4 node files" in check_data(build_config({**SETTINGS, "data.name": str(bare)}))
    with pytest.raises(DataError, match="a split for 4 nodes, but federation.num-clients is 5"):
        load_partition(source, on_split.data, 0, 5)
    with pytest.raises(DataError, match="has no node-001.jsonl.gz"):
        load_partition(resolve_data(str(bare)), on_split.data, 1, 4)
    with pytest.raises(DataError, match="already a split"):
        write_split(on_split, tmp_path / "again")

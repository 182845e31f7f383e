"""Data sources, cleaning, and partitioning identical to the challenge's FederatedDataset."""

from __future__ import annotations

import gzip
import json

import pytest

from fedtune.config import build_config
from fedtune.data.partition import (
    hub_partitioner,
    load_heldout,
    load_partition,
    partition_dataset,
    split_heldout,
)
from fedtune.data.sources import (
    DataError,
    DataSource,
    clean_rows,
    load_local_rows,
    resolve_data,
)


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def synthetic(n):
    return [{"instruction": f"task {i}", "input": "", "output": f"answer {i}"} for i in range(n)]


def test_embedded_sample_loads_offline():
    source = resolve_data("embedded:alpaca-gpt4-sample")
    assert source.kind == "embedded"
    rows = load_local_rows(source)
    assert len(rows) == 999
    assert {"instruction", "input", "output"} <= set(rows.column_names)
    assert sum(bool(x) for x in rows["input"]) == 412


def test_resolve_classifies_and_checks(tmp_path):
    assert resolve_data("flwrlabs/alpaca-gpt4").kind == "hub"
    with pytest.raises(DataError, match="does not exist"):
        resolve_data(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="unknown embedded data set"):
        resolve_data("embedded:nope")
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="must end in one of"):
        resolve_data(str(tmp_path / "rows.csv"))
    with pytest.raises(DataError, match="neither an existing file nor a hub id"):
        resolve_data("just-a-name")


def test_json_array_jsonl_gz_and_parquet_read_the_same(tmp_path):
    records = synthetic(5)
    (tmp_path / "a.json").write_text(json.dumps(records))
    write_jsonl(tmp_path / "b.jsonl", records)
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as handle:
        handle.write("\n".join(json.dumps(r) for r in records))
    from datasets import Dataset

    Dataset.from_list(records).to_parquet(str(tmp_path / "d.parquet"))
    loaded = [
        load_local_rows(resolve_data(str(tmp_path / name)))["output"]
        for name in ("a.json", "b.jsonl", "c.jsonl.gz", "d.parquet")
    ]
    assert all(rows == [r["output"] for r in records] for rows in loaded)


def test_malformed_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    with pytest.raises(DataError, match="bad.jsonl: line 2 is not valid JSON"):
        load_local_rows(resolve_data(str(path)))
    path.write_text('{"instruction": "a", "output": "b"}\n[1, 2]\n')
    with pytest.raises(DataError, match="record 2 is not a JSON object"):
        load_local_rows(resolve_data(str(path)))


def test_dolly_spellings_are_mapped(tmp_path):
    path = write_jsonl(
        tmp_path / "dolly.jsonl",
        [{"instruction": "q", "context": "c", "response": "r", "category": "open_qa"}],
    )
    rows = load_local_rows(resolve_data(str(path)))
    assert rows[0]["input"] == "c" and rows[0]["output"] == "r" and rows[0]["category"] == "open_qa"
    path = write_jsonl(tmp_path / "noout.jsonl", [{"instruction": "q", "text": "t"}])
    with pytest.raises(DataError, match="no 'output' column"):
        load_local_rows(resolve_data(str(path)))


def test_rows_with_missing_or_empty_fields_are_skipped_and_counted(tmp_path):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"instruction": "ok", "input": "", "output": "yes"},
            {"instruction": "", "output": "no instruction"},
            {"instruction": "no output"},
            {"instruction": "blank", "output": "   "},
            {"instruction": "null input", "input": None, "output": "fine"},
            {"instruction": 5, "output": "not a string"},
        ],
    )
    rows, skipped = clean_rows(load_local_rows(resolve_data(str(path))))
    assert skipped == 4
    assert [r["instruction"] for r in rows] == ["ok", "null input"]
    assert rows[1]["input"] == ""


CHALLENGE_SPLIT = {"data.heldout-examples": 0}


def test_iid_shards_match_the_challenge_sizes():
    from datasets import Dataset

    config = build_config(CHALLENGE_SPLIT).data
    partitioner = partition_dataset(Dataset.from_list(synthetic(52_002)), config, 20)
    sizes = [len(partitioner.load_partition(i)) for i in range(20)]
    assert sizes == [2_601, 2_601] + [2_600] * 18


def test_partitions_equal_flwr_datasets_federated_dataset(tmp_path):
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import IidPartitioner

    path = write_jsonl(tmp_path / "rows.jsonl", synthetic(1_003))
    config = build_config(CHALLENGE_SPLIT).data
    reference = FederatedDataset(
        dataset="json", data_files=str(path), partitioners={"train": IidPartitioner(20)}
    )
    source = resolve_data(str(path))
    for partition_id in (0, 1, 7, 19):
        ours = load_partition(source, config, partition_id, 20)["instruction"]
        theirs = reference.load_partition(partition_id)["instruction"]
        assert ours == theirs


def test_hub_path_goes_through_federated_dataset(tmp_path):
    # The hub code path with a local fixture: the same FederatedDataset call, pointed at `json`.
    path = write_jsonl(tmp_path / "rows.jsonl", synthetic(300))
    config = build_config({"data.heldout-examples": 40}).data
    hub = hub_partitioner(DataSource("hub", "json", "json"), config, 20, data_files=str(path))
    local = load_partition(resolve_data(str(path)), config, 3, 20)
    assert hub.load_partition(3, "train")["instruction"] == local["instruction"]
    # The held-out split is the same rows on both paths.
    held_local = load_heldout(resolve_data(str(path)), config, 20)["instruction"]
    assert list(hub.load_split("heldout")["instruction"]) == list(held_local)
    assert len(held_local) == 40


def test_heldout_rows_are_disjoint_from_every_partition_and_cover_the_rest():
    from datasets import Dataset

    rows = Dataset.from_list(synthetic(1_003))
    config = build_config({"data.heldout-examples": 200}).data
    partitioner = partition_dataset(rows, config, 20)
    trained = [x for i in range(20) for x in partitioner.load_partition(i)["instruction"]]
    _, heldout = split_heldout(rows.shuffle(seed=config.seed), 200, 20)
    held = list(heldout["instruction"])
    assert len(held) == 200 and not set(held) & set(trained)
    assert sorted(trained + held) == sorted(rows["instruction"])
    # Held out after the challenge's shuffle: the clients' rows keep the challenge's order.
    challenge = partition_dataset(rows, build_config(CHALLENGE_SPLIT).data, 1).load_partition(0)
    assert trained == list(challenge["instruction"])[:803]
    with pytest.raises(DataError, match="fewer than one per client"):
        partition_dataset(rows, build_config({"data.heldout-examples": 990}).data, 20)


def test_label_partitioners_by_name():
    from datasets import Dataset

    rows = Dataset.from_list(
        [{"instruction": f"q{i}", "output": "a", "category": f"c{i % 4}"} for i in range(400)]
    )
    pathological = build_config(
        {
            "data.partitioner": "pathological",
            "data.partition-by": "category",
            "federation.num-clients": 4,
            **CHALLENGE_SPLIT,
        }
    ).data
    partitioner = partition_dataset(rows, pathological, 4)
    for i in range(4):
        assert len(set(partitioner.load_partition(i)["category"])) <= 2
    dirichlet = build_config(
        {
            "data.partitioner": "dirichlet",
            "data.partition-by": "category",
            "federation.num-clients": 4,
            **CHALLENGE_SPLIT,
        }
    ).data
    sizes = [len(partition_dataset(rows, dirichlet, 4).load_partition(i)) for i in range(4)]
    assert sum(sizes) == 400 and min(sizes) >= 1
    with pytest.raises(DataError, match="no column 'topic'"):
        partition_dataset(
            rows,
            build_config({"data.partitioner": "dirichlet", "data.partition-by": "topic"}).data,
            4,
        )


def test_too_few_rows_for_the_clients():
    from datasets import Dataset

    with pytest.raises(DataError, match="20 clients but only 5 rows"):
        partition_dataset(Dataset.from_list(synthetic(5)), build_config().data, 20)

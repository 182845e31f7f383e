"""Instruction data sources: a hub data set (through flwr-datasets), a local file, or the embedded sample.

Every source yields rows with three string columns, `instruction`, `input` and `output` (Dolly's
`context`/`response` and similar spellings are mapped), plus any other columns it has (labels for
non-IID partitioners). Rows are partitioned exactly as they come, then cleaned per partition, so the
shards equal the challenge's FederatedDataset shards.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_DATASETS = {
    "alpaca-gpt4-sample": "alpaca-gpt4/alpaca_gpt4_sample.jsonl.gz",
    "dolly-15k": "dolly-15k/dolly_train.jsonl.gz",  # with an 8-value `category` label
}
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".json.gz", ".jsonl.gz")

# Other spellings of the three fields, in order of preference.
FIELD_ALIASES = {
    "instruction": ("instruction", "prompt", "question"),
    "input": ("input", "context"),
    "output": ("output", "response", "answer", "completion"),
}


class DataError(ValueError):
    """Instruction data cannot be found, parsed or used as configured."""


@dataclass(frozen=True)
class DataSource:
    kind: str  # "embedded" | "local" | "hub"
    name: str  # as configured
    path: str  # file path, or the hub id


def embedded_path(key: str) -> Path:
    if key not in EMBEDDED_DATASETS:
        known = ", ".join(EMBEDDED_PREFIX + k for k in EMBEDDED_DATASETS)
        raise DataError(f"data.name: unknown embedded data set {key!r}; known: {known}")
    resource = resources.files("fedtune") / "resources" / EMBEDDED_DATASETS[key]
    return Path(str(resource))


# A `fedtune data split` directory (data/split.py writes it).
MANIFEST = "split.json"
HELDOUT_FILE = "heldout.jsonl.gz"


def node_file(partition_id: int) -> str:
    """The file name of a partition's rows in a split directory."""
    return f"node-{partition_id:03d}.jsonl.gz"


def read_manifest(directory: str | Path, num_nodes: int | None = None) -> dict[str, Any]:
    """The `split.json` of a split directory, checked to be for `num_nodes` nodes when given.

    Raises:
        DataError: no readable manifest, or one for another number of nodes.
    """
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        count = int(manifest["num_nodes"])
        rows = [int(node["rows"]) for node in manifest["nodes"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"data.name: {path} is not a readable `fedtune data split` manifest: {exc}"
        ) from None
    if len(rows) != count:
        raise DataError(f"data.name: {path} lists {len(rows)} node files for {count} nodes")
    if num_nodes is not None and count != num_nodes:
        raise DataError(
            f"data.name: {directory} is a split for {count} nodes, but federation.num-clients "
            f"is {num_nodes}"
        )
    return dict(manifest)


def resolve_data(name: str) -> DataSource:
    """Classify `data.name` and check what can be checked offline. A directory that holds a
    `fedtune data split` is kind "split": each client (node) has its own file, the server reads
    only the manifest (rows per node) and the held-out file.

    Raises:
        DataError: unknown embedded name, a missing local file, an unsupported file type.
    """
    name = name.strip()
    if name.startswith(EMBEDDED_PREFIX):
        return DataSource("embedded", name, str(embedded_path(name[len(EMBEDDED_PREFIX) :])))
    path = Path(name).expanduser()
    if path.is_dir() and (path / MANIFEST).is_file():
        return DataSource("split", name, str(path.resolve()))
    looks_local = name.startswith((".", "/", "~")) or name.lower().endswith(LOCAL_SUFFIXES)
    if path.exists() or looks_local:
        if not path.is_file():
            raise DataError(f"data.name: the file {name!r} does not exist")
        if not name.lower().endswith(LOCAL_SUFFIXES):
            raise DataError(f"data.name: {name!r} must end in one of {', '.join(LOCAL_SUFFIXES)}")
        return DataSource("local", name, str(path.resolve()))
    if name.count("/") != 1:
        raise DataError(f"data.name: {name!r} is neither an existing file nor a hub id (org/name)")
    return DataSource("hub", name, name)


def _read_json_records(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:  # type: ignore[operator]
        text = handle.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path.name}: not valid JSON ({exc})") from exc
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path.name}: line {number} is not valid JSON ({exc.msg})"
                ) from exc
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise DataError(f"{path.name}: record {number} is not a JSON object")
    return records


def normalize_columns(dataset: Dataset) -> Dataset:
    """Rename the source's columns to instruction/input/output; add an empty `input` if absent.

    Raises:
        DataError: no instruction or no output column.
    """
    columns = set(dataset.column_names)
    renames: dict[str, str] = {}
    for target, spellings in FIELD_ALIASES.items():
        found = next((s for s in spellings if s in columns), None)
        if found is None:
            if target == "input":
                continue
            raise DataError(
                f"data set has no {target!r} column (looked for {', '.join(spellings)}; "
                f"it has {', '.join(sorted(columns))})"
            )
        if found != target:
            renames[found] = target
    if renames:
        dataset = dataset.rename_columns(renames)
    if "input" not in dataset.column_names:
        dataset = dataset.add_column("input", [""] * len(dataset))
    return dataset


def load_local_rows(source: DataSource) -> Dataset:
    """All rows of a local or embedded file, columns normalized, in file order."""
    from datasets import Dataset

    path = Path(source.path)
    if path.name.endswith(".parquet"):
        try:
            dataset = Dataset.from_parquet(str(path))
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise DataError(f"{path.name}: cannot read as parquet ({exc})") from exc
    else:
        records = _read_json_records(path)
        if not records:
            raise DataError(f"{path.name}: holds no records")
        # Missing keys, and text fields that are not text, become None: such rows are skipped and
        # counted by clean_rows instead of failing the whole file on a column-type clash.
        keys = sorted({key for record in records for key in record})
        text_keys = {s for spellings in FIELD_ALIASES.values() for s in spellings}
        table = [
            {
                key: None
                if key in text_keys and not isinstance(record.get(key), str)
                else record.get(key)
                for key in keys
            }
            for record in records
        ]
        try:
            dataset = Dataset.from_list(table)
        except Exception as exc:  # pyarrow: a column holding values of several types
            raise DataError(f"{path.name}: a column mixes value types across rows ({exc})") from exc
    return normalize_columns(dataset)


def clean_rows(dataset: Dataset) -> tuple[list[dict[str, str]], int]:
    """Keep rows whose instruction and output are non-empty strings.

    Returns:
        (rows as dicts with instruction/input/output, number of rows skipped).
    """
    kept: list[dict[str, str]] = []
    skipped = 0
    for row in dataset:
        instruction, output, extra = row.get("instruction"), row.get("output"), row.get("input")
        if not (isinstance(instruction, str) and instruction.strip()):
            skipped += 1
            continue
        if not (isinstance(output, str) and output.strip()):
            skipped += 1
            continue
        kept.append(
            {
                "instruction": instruction,
                "input": extra if isinstance(extra, str) else "",
                "output": output,
            }
        )
    return kept, skipped

"""One data file per node: a data set partitioned exactly as `fedtune run` partitions it, written
out so that each node of a real federation can be handed its own file.

`write_split(config, out)` writes, into `out`:
- `node-000.jsonl.gz` … one per partition: the rows `fedtune run` would give that client (columns
  normalized, not yet cleaned or tokenized — the node does that as training always does);
- `heldout.jsonl.gz`: the `data.heldout-examples` rows no node trains on (the server's held-out set);
- `split.json`: what was written (rows and sha256 per file) and the data settings;
- `partitions.json` / `partitions.png`: the partition report.

A node then trains on its file (`data-path=…/node-NNN.jsonl.gz` in its node config) and gets the
same examples, in the same order, as the client of that partition in a simulation.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from fedtune.config import RunConfig
from fedtune.data.partition import load_heldout, partition_dataset
from fedtune.data.sources import (
    HELDOUT_FILE,
    MANIFEST,
    DataError,
    load_local_rows,
    node_file,
    resolve_data,
)

__all__ = ["HELDOUT_FILE", "MANIFEST", "node_file", "write_split"]


def _write_rows(path: Path, rows: Any) -> dict[str, Any]:
    """JSON Lines, gzip with a fixed header (the same rows give the same bytes); atomically."""
    lines = "".join(json.dumps(dict(row), ensure_ascii=False) + "\n" for row in rows)
    data = gzip.compress(lines.encode("utf-8"), compresslevel=6, mtime=0)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)
    return {"file": path.name, "rows": len(rows), "sha256": hashlib.sha256(data).hexdigest()}


def write_split(config: RunConfig, out: Path) -> dict[str, Any]:
    """Partition `config.data` over `config.federation.num_clients` nodes and write the files.

    Returns:
        The manifest written to `split.json`.
    Raises:
        DataError: a hub data set (split a local or embedded one), unreadable data, or `out`
            already holds a split.
    """
    from fedtune.data.partition_report import build_report, save

    source = resolve_data(config.data.name)
    if source.kind == "hub":
        raise DataError(f"{config.data.name}: a hub data set; download it to a file and split that")
    if source.kind == "split":
        raise DataError(f"{config.data.name}: already a split; split the data set it came from")
    if (out / MANIFEST).exists():
        raise DataError(f"{out} already holds a split ({MANIFEST}); choose another directory")
    out.mkdir(parents=True, exist_ok=True)
    count = config.federation.num_clients
    partitioner = partition_dataset(load_local_rows(source), config.data, count)
    nodes = []
    for partition_id in range(count):
        rows = partitioner.load_partition(partition_id)
        nodes.append(
            {"partition_id": partition_id, **_write_rows(out / node_file(partition_id), rows)}
        )
    heldout = _write_rows(out / HELDOUT_FILE, load_heldout(source, config.data, count))
    report = build_report(config.data, count)
    if report is not None:
        save(report, out)
    manifest = {
        "data": config.data.name,
        "num_nodes": count,
        "data_settings": config.data.model_dump(),
        "nodes": nodes,
        "heldout": heldout,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest

"""Partitioning with flwr-datasets partitioners, exactly as the challenge's FederatedDataset does.

The challenge: FederatedDataset(dataset="flwrlabs/alpaca-gpt4", partitioners={"train": IidPartitioner(20)})
shuffles the whole split with seed 42, then hands it to the partitioner; IID takes contiguous shards,
so a 52,002-row set gives 2 shards of 2,601 rows and 18 of 2,600.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.config import DataConfig
from fedtune.data.sources import (
    HELDOUT_FILE,
    DataError,
    DataSource,
    load_local_rows,
    node_file,
    normalize_columns,
    read_manifest,
)

if TYPE_CHECKING:
    from datasets import Dataset
    from flwr_datasets.partitioner import Partitioner


def make_partitioner(config: DataConfig, num_partitions: int) -> Partitioner:
    """The flwr-datasets partitioner named by `data.partitioner`."""
    from flwr_datasets import partitioner as fp

    name, label, seed = config.partitioner, config.partition_by, config.seed
    if name == "iid":
        return fp.IidPartitioner(num_partitions=num_partitions)
    if name == "dirichlet":
        return fp.DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=label,
            alpha=config.dirichlet_alpha,
            min_partition_size=1,
            seed=seed,
        )
    if name == "pathological":
        return fp.PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by=label,
            num_classes_per_partition=config.classes_per_partition,
            seed=seed,
        )
    if name == "shard":
        return fp.ShardPartitioner(
            num_partitions=num_partitions,
            partition_by=label,
            num_shards_per_partition=config.classes_per_partition,
            seed=seed,
        )
    if name == "linear":
        return fp.LinearPartitioner(num_partitions=num_partitions)
    if name == "square":
        return fp.SquarePartitioner(num_partitions=num_partitions)
    if name == "exponential":
        return fp.ExponentialPartitioner(num_partitions=num_partitions)
    if name == "natural-id":
        return fp.NaturalIdPartitioner(partition_by=label)
    raise DataError(f"data.partitioner: unknown partitioner {name!r}")


HELDOUT_SPLIT = "heldout"


def split_heldout(shuffled: Dataset, count: int, num_partitions: int) -> tuple[Dataset, Dataset]:
    """(rows the clients share, held-out rows): the last `count` rows of the shuffled split.

    Taken after the shuffle and before the partitioner, so `count` = 0 leaves the challenge's
    partitions exactly as they were, and any `count` leaves the order of the rest unchanged.

    Raises:
        DataError: too few rows left for the clients.
    """
    if len(shuffled) - count < num_partitions:
        raise DataError(
            f"data.heldout-examples: holding out {count:,} of {len(shuffled):,} rows leaves "
            f"fewer than one per client ({num_partitions})"
        )
    if count == 0:
        return shuffled, shuffled.select([])
    kept = len(shuffled) - count
    return shuffled.select(range(kept)), shuffled.select(range(kept, len(shuffled)))


def heldout_preprocessor(config: DataConfig, num_partitions: int) -> Any:
    """A FederatedDataset preprocessor adding the held-out split (hub data sets)."""

    def preprocess(splits: Any) -> Any:
        from datasets import DatasetDict

        train, heldout = split_heldout(
            splits[config.split], config.heldout_examples, num_partitions
        )
        return DatasetDict({**splits, config.split: train, HELDOUT_SPLIT: heldout})

    return preprocess


def partition_dataset(dataset: Dataset, config: DataConfig, num_partitions: int) -> Partitioner:
    """Shuffle with `data.seed` (as FederatedDataset does), hold out the last
    `data.heldout-examples` rows, and attach the partitioner to the rest.

    Raises:
        DataError: a label column that does not exist, or a natural-id split with the wrong count.
    """
    if config.partition_by and config.partition_by not in dataset.column_names:
        raise DataError(
            f"data.partition-by: the data set has no column {config.partition_by!r} "
            f"(it has {', '.join(dataset.column_names)})"
        )
    if len(dataset) < num_partitions:
        raise DataError(
            f"federation.num-clients: {num_partitions} clients but only {len(dataset)} rows"
        )
    partitioner = make_partitioner(config, num_partitions)
    shared, _ = split_heldout(
        dataset.shuffle(seed=config.seed), config.heldout_examples, num_partitions
    )
    partitioner.dataset = shared
    if config.partitioner == "natural-id" and partitioner.num_partitions != num_partitions:
        raise DataError(
            f"data.partition-by: {config.partition_by!r} has {partitioner.num_partitions} distinct "
            f"values but federation.num-clients is {num_partitions}"
        )
    return partitioner


def hub_partitioner(
    source: DataSource, config: DataConfig, num_partitions: int, **load_kwargs: Any
) -> Any:
    """A flwr-datasets FederatedDataset over a hub data set (load_kwargs reach `datasets`)."""
    from flwr_datasets import FederatedDataset

    return FederatedDataset(
        dataset=source.path,
        partitioners={config.split: make_partitioner(config, num_partitions)},
        preprocessor=heldout_preprocessor(config, num_partitions),
        shuffle=True,
        seed=config.seed,
        **load_kwargs,
    )


def load_partition(
    source: DataSource, config: DataConfig, partition_id: int, num_partitions: int
) -> Dataset:
    """Rows of one client's partition, columns normalized (not yet cleaned)."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    if source.kind == "split":  # the node's own file, as a node of a real federation holds it
        read_manifest(source.path, num_partitions)
        return _split_file(source, node_file(partition_id))
    if source.kind == "hub":
        federated = hub_partitioner(source, config, num_partitions)
        try:
            rows = federated.load_partition(partition_id, config.split)
        except Exception as exc:  # the hub is unreachable offline; say so plainly
            raise DataError(f"data.name: cannot load {source.name!r} from the hub: {exc}") from exc
        return normalize_columns(rows)
    return partition_dataset(load_local_rows(source), config, num_partitions).load_partition(
        partition_id
    )


def load_heldout(source: DataSource, config: DataConfig, num_partitions: int) -> Dataset:
    """The held-out rows (columns normalized, not yet cleaned); empty when none are held out."""
    if source.kind == "split":  # the split's own held-out file, whatever data.heldout-examples says
        read_manifest(source.path, num_partitions)
        return _split_file(source, HELDOUT_FILE)
    if source.kind == "hub":
        federated = hub_partitioner(source, config, num_partitions)
        try:
            rows = federated.load_split(HELDOUT_SPLIT)
        except Exception as exc:  # the hub is unreachable offline; say so plainly
            raise DataError(f"data.name: cannot load {source.name!r} from the hub: {exc}") from exc
        return normalize_columns(rows)
    dataset = load_local_rows(source)
    _, heldout = split_heldout(
        dataset.shuffle(seed=config.seed), config.heldout_examples, num_partitions
    )
    return heldout


def _split_file(source: DataSource, name: str) -> Dataset:
    path = Path(source.path) / name
    if not path.is_file():
        raise DataError(f"data.name: {source.name} has no {name}")
    return load_local_rows(DataSource("local", str(path), str(path)))

"""From `data.*` settings to one client's training examples: load → partition → clean → tokenize."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedtune.config import RunConfig
from fedtune.data.partition import load_heldout, load_partition
from fedtune.data.prompts import TokenizedExample, tokenize_rows
from fedtune.data.sources import DataError, clean_rows, resolve_data

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def partition_examples(
    tokenizer: PreTrainedTokenizerBase, config: RunConfig, partition_id: int, num_partitions: int
) -> tuple[list[TokenizedExample], dict[str, int]]:
    """Tokenized examples of one partition and the counts of what was dropped on the way.

    Raises:
        DataError: the partition has no usable example.
    """
    rows = load_partition(resolve_data(config.data.name), config.data, partition_id, num_partitions)
    clean, skipped = clean_rows(rows)
    examples, stats = tokenize_rows(
        tokenizer,
        clean,
        config.train.seq_length,
        include_input=config.data.include_input,
        append_eos=config.data.append_eos,
    )
    if not examples:
        raise DataError(
            f"partition {partition_id} has no usable example ({len(rows)} rows, {skipped} "
            f"skipped, {stats.dropped_no_response} without a response token after truncation "
            f"to train.seq-length={config.train.seq_length})"
        )
    counts: dict[str, Any] = {
        "partition-rows": len(rows),
        "skipped-rows": skipped,
        "truncated": stats.truncated,
        "dropped-no-response": stats.dropped_no_response,
    }
    return examples, counts


def heldout_examples(
    tokenizer: PreTrainedTokenizerBase, config: RunConfig
) -> list[TokenizedExample]:
    """The tokenized held-out rows (`data.heldout-examples`), cleaned and cut as training is;
    empty when none are held out."""
    if config.data.heldout_examples == 0:
        return []
    rows = load_heldout(resolve_data(config.data.name), config.data, config.federation.num_clients)
    clean, _ = clean_rows(rows)
    examples, _ = tokenize_rows(
        tokenizer,
        clean,
        config.train.seq_length,
        include_input=config.data.include_input,
        append_eos=config.data.append_eos,
    )
    return examples

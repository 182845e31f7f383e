"""From `data.*` settings to one client's training examples: load → partition → clean → tokenize."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedtune.config import RunConfig
from fedtune.data.partition import load_heldout, load_partition
from fedtune.data.prompts import TokenizedExample, tokenize_rows
from fedtune.data.sources import DataError, clean_rows, resolve_data

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def prepare_rows(
    tokenizer: PreTrainedTokenizerBase, config: RunConfig, rows: Any
) -> tuple[list[TokenizedExample], Any, int]:
    """Clean and tokenize rows as training does: (examples, tokenize stats, rows skipped)."""
    clean, skipped = clean_rows(rows)
    examples, stats = tokenize_rows(
        tokenizer,
        clean,
        config.train.seq_length,
        include_input=config.data.include_input,
        append_eos=config.data.append_eos,
    )
    return examples, stats, skipped


def partition_examples(
    tokenizer: PreTrainedTokenizerBase, config: RunConfig, partition_id: int, num_partitions: int
) -> tuple[list[TokenizedExample], dict[str, int]]:
    """Tokenized examples of one partition and the counts of what was dropped on the way.

    Raises:
        DataError: the partition has no usable example.
    """
    rows = load_partition(resolve_data(config.data.name), config.data, partition_id, num_partitions)
    examples, stats, skipped = prepare_rows(tokenizer, config, rows)
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


def node_file_examples(
    tokenizer: PreTrainedTokenizerBase, config: RunConfig, path: str
) -> tuple[list[TokenizedExample], dict[str, int]]:
    """Tokenized examples of a node's own data file (`data-path` in its node config, e.g. one
    that `fedtune data split` wrote), cleaned and cut as a partition is.

    Raises:
        DataError: the file is missing, unreadable, or has no usable example.
    """
    from fedtune.data.sources import load_local_rows

    source = resolve_data(path)
    if source.kind != "local":
        raise DataError(f"data-path: {path!r} is not a local data file")
    rows = load_local_rows(source)
    examples, stats, skipped = prepare_rows(tokenizer, config, rows)
    if not examples:
        raise DataError(f"data-path: {path} has no usable example ({len(rows)} rows)")
    counts = {
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
    return prepare_rows(tokenizer, config, rows)[0]


SB_INIT_DATA = "embedded:alpaca-gpt4-sample"


def sb_init_examples(
    tokenizer: PreTrainedTokenizerBase, config: RunConfig, wanted: int
) -> list[TokenizedExample]:
    """The public examples whose gradient sets the r×r adapter's frozen factors: a seeded draw
    from the embedded Alpaca-GPT4 sample (on every node, offline), without its held-out rows
    when the run holds them out of that same sample."""
    from fedtune.data.partition import split_heldout
    from fedtune.data.sources import load_local_rows

    rows = load_local_rows(resolve_data(SB_INIT_DATA)).shuffle(seed=config.data.seed)
    if config.data.name == SB_INIT_DATA and config.data.heldout_examples:
        rows, _ = split_heldout(rows, config.data.heldout_examples, 1)
    examples: list[TokenizedExample] = []
    for start in range(0, len(rows), 4 * wanted):  # rows whose response survives the cut
        chunk = rows.select(range(start, min(len(rows), start + 4 * wanted)))
        examples.extend(prepare_rows(tokenizer, config, chunk)[0])
        if len(examples) >= wanted:
            break
    if not examples:
        raise DataError(
            f"model.lora.sb-init-examples: no example keeps a response token within "
            f"train.seq-length={config.train.seq_length}"
        )
    return examples[:wanted]

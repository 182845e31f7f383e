"""The challenge's Alpaca training prompt and response-only token masks.

The prompt and the response are tokenized *together* (as the model sees them), and a token is a
label when its character span reaches into the response. Tokenizing the two parts separately would
put a different token at the seam than the model sees (BPE merges ": The" into ":" + " The"), and
searching for a response-template token sequence can miss it; offsets cannot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ALPACA_HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


def format_prompt(instruction: str, input_text: str = "", include_input: bool = False) -> str:
    """The prompt part, ending where the response begins.

    The challenge's baseline drops `input`; with include_input it is appended to the instruction
    after a space, as the FlowerTune template does for the tasks that keep it.
    """
    if include_input and input_text.strip():
        instruction = f"{instruction} {input_text}"
    return f"{ALPACA_HEADER}\n### Instruction:\n{instruction}\n### Response: "


@dataclass
class TokenizedExample:
    """One training example: token ids and which of them are predicted (response tokens)."""

    input_ids: list[int]
    label_mask: list[bool]

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_response_tokens(self) -> int:
        return sum(self.label_mask)


@dataclass
class TokenizeStats:
    examples: int = 0
    truncated: int = 0  # response cut short by train.seq-length
    dropped_no_response: int = 0  # prompt alone fills train.seq-length: nothing left to learn
    tokens: int = 0
    response_tokens: int = 0
    skipped_rows: int = 0  # missing/empty fields, counted by the source
    notes: list[str] = field(default_factory=list)


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    response: str,
    seq_length: int,
    append_eos: bool = True,
) -> tuple[TokenizedExample | None, bool]:
    """Tokenize prompt+response with a response-only label mask.

    Returns:
        (example or None when no response token survives truncation, whether it was truncated).
    """
    text = prompt + response
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids: list[int] = list(encoded["input_ids"])
    response_start = len(prompt)
    # Special tokens added by the tokenizer have (0, 0) spans: never labels.
    mask = [end > response_start and end > start for start, end in encoded["offset_mapping"]]
    if append_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        mask.append(True)
    truncated = len(ids) > seq_length
    ids, mask = ids[:seq_length], mask[:seq_length]
    # Position 0 is never predicted (nothing precedes it), so a label there cannot count.
    if not any(mask[1:]):
        return None, truncated
    return TokenizedExample(ids, mask), truncated


def tokenize_rows(
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, str]],
    seq_length: int,
    include_input: bool = False,
    append_eos: bool = True,
) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenize cleaned rows; count truncations and rows left with no response token."""
    stats = TokenizeStats()
    examples: list[TokenizedExample] = []
    for row in rows:
        prompt = format_prompt(row["instruction"], row.get("input", ""), include_input)
        example, truncated = tokenize_example(
            tokenizer, prompt, row["output"], seq_length, append_eos
        )
        stats.truncated += int(truncated)
        if example is None:
            stats.dropped_no_response += 1
            continue
        examples.append(example)
        stats.tokens += example.num_tokens
        stats.response_tokens += example.num_response_tokens
    stats.examples = len(examples)
    return examples, stats

"""The challenge's training prompt and response-only masks on SmolLM2's real BPE tokenizer."""

from __future__ import annotations

from fedtune.data.prompts import format_prompt, tokenize_example, tokenize_rows
from fedtune.data.sources import clean_rows, load_local_rows, resolve_data


def test_prompt_is_the_challenge_template():
    assert format_prompt("Name a color.", "ignored") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n### Instruction:\nName a color.\n### Response: "
    )
    assert "Name a color. red or blue" in format_prompt("Name a color.", "red or blue", True)
    assert "### Instruction:\nName a color.\n" in format_prompt("Name a color.", "   ", True)


def test_no_response_token_is_dropped_on_the_embedded_sample(smollm2_tokenizer):
    tok = smollm2_tokenizer
    rows, _ = clean_rows(load_local_rows(resolve_data("embedded:alpaca-gpt4-sample")))
    examples, stats = tokenize_rows(tok, rows, seq_length=10_000)
    assert stats.examples == len(rows) == 999 and stats.truncated == 0
    for row, example in zip(rows, examples, strict=True):
        labelled = [t for t, m in zip(example.input_ids, example.label_mask, strict=True) if m]
        unlabelled = [
            t for t, m in zip(example.input_ids, example.label_mask, strict=True) if not m
        ]
        # Every response character is covered by label tokens, and nothing of the prompt is.
        assert tok.decode(labelled).strip() == (row["output"] + tok.eos_token).strip()
        prompt = format_prompt(row["instruction"])
        assert tok.decode(unlabelled) in (prompt, prompt.rstrip(" "))
        assert labelled[-1] == tok.eos_token_id


def test_seam_token_belongs_to_the_response(smollm2_tokenizer):
    example, truncated = tokenize_example(smollm2_tokenizer, "### Response: ", "The end", 64)
    assert not truncated
    tokens = smollm2_tokenizer.convert_ids_to_tokens(example.input_ids)
    first = example.label_mask.index(True)
    # BPE merges the template's trailing space into the response's first word: "ĠThe".
    assert tokens[first] == "ĠThe" and tokens[first - 1] == ":"


def test_truncation_is_counted_and_empty_responses_dropped(smollm2_tokenizer):
    tok = smollm2_tokenizer
    rows = [
        {"instruction": "word " * 300, "input": "", "output": "answer"},
        {"instruction": "short", "input": "", "output": "long answer " * 100},
    ]
    examples, stats = tokenize_rows(tok, rows, seq_length=64)
    assert stats.dropped_no_response == 1 and stats.truncated == 2 and stats.examples == 1
    assert examples[0].num_tokens == 64 and examples[0].label_mask[-1]


def test_without_eos_the_last_label_is_the_response(smollm2_tokenizer):
    example, _ = tokenize_example(smollm2_tokenizer, "Q: ", "yes", 64, append_eos=False)
    assert example.input_ids[-1] != smollm2_tokenizer.eos_token_id
    assert (
        smollm2_tokenizer.decode(
            [t for t, m in zip(example.input_ids, example.label_mask, strict=True) if m]
        ).strip()
        == "yes"
    )

"""The board's prompt and parser, and the usual MMLU prompt of the loglik protocol."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from fedtune.evaluation.dataset import Question, dev_examples, load_split
from fedtune.evaluation.parser import is_correct, parse_prediction, predicted_letter
from fedtune.evaluation.prompts import flowertune_inner_prompt, flowertune_prompt, loglik_prompt

# Published FlowerTune generation files and the official scorer's accuracies (see SOURCE.md there).
GENERATIONS = Path(__file__).resolve().parents[1] / "fixtures" / "flowertune-generations"

Q = Question("anatomy", 0, "What is 2+2", ("3", "4", "None", "5"), "B")


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("Answer", "a"),
        ("Certainly", "c"),
        ("B", "b"),
        (" (b) because", "b"),
        ("The answer is B", "the answer is b"),
        ("", ""),
        ("\n", "\n"),
        ("E", "e"),
        ("Option\n## C\nD", "c"),
        ("x\n##\nB", "x\n##\nb"),  # the line after "\n##" is empty, so nothing is kept
        ("é", "é"),
    ],
)
def test_parser_follows_the_official_steps(output, expected):
    assert parse_prediction(output) == expected


def test_verdicts_and_letters():
    assert is_correct("Answer", "A") and not is_correct("Answer", "B")
    assert is_correct("b.", "B")
    assert not is_correct("The answer is B", "B")
    assert predicted_letter("Certainly") == "C"
    assert predicted_letter("E") is None and predicted_letter("") is None


def test_flowertune_prompt_exact_string():
    assert flowertune_prompt(Q) == (
        "<|im_start|>question\nAnswer the following multiple choice question.\n"
        "Question: What is 2+2?\n\nOptions:\nA. 3\nB. 4\nC. nan\nD. 5\nThe answer is:\n"
        "<|im_end|>\n<|im_start|>answer\n"
    )
    dotted = Question("anatomy", 0, "Pick one.", ("a", "b", "c", "d"), "A")
    assert "Question: Pick one.\n\n" in flowertune_inner_prompt(dotted)


@pytest.mark.skipif(not GENERATIONS.is_dir(), reason="published generations not present")
@pytest.mark.parametrize(
    ("folder", "category"), [("tni_smol135i", "stem"), ("tni_smol135", "social_sciences")]
)
def test_prompts_equal_the_published_ones(folder, category):
    """Every prompt, gold and subject of the board's published files, in the same order (3,153 / 3,077)."""
    rows = json.loads(
        gzip.decompress(
            (GENERATIONS / folder / f"generation_mmlu_{category}.jsonl.gz").read_bytes()
        )
    )
    questions = [q for q in load_split() if q.category == category]
    assert len(rows) == len(questions)
    for question, row in zip(questions, rows, strict=True):
        assert (flowertune_inner_prompt(question), question.answer, question.subject) == (
            row["prompt"],
            row["gold"],
            row["subset"],
        )


def test_loglik_prompt_zero_and_five_shot():
    assert loglik_prompt(Q) == (
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
        "What is 2+2\nA. 3\nB. 4\nC. None\nD. 5\nAnswer:"
    )
    shots = dev_examples()["anatomy"]
    five = loglik_prompt(Q, shots)
    assert five.count("\nAnswer: ") == 5 and five.endswith("D. 5\nAnswer:")
    first = shots[0]
    assert f"{first.question.strip()}\nA. {first.choices[0]}" in five
    assert five.index(first.question.strip()) < five.index(shots[4].question.strip())
    assert f"Answer: {shots[4].answer}\n\nWhat is 2+2" in five

"""Prompt strings of the two protocols. Both are fixed by their reference implementations; change
nothing here.

- `flowertune`: the board's evaluator (Flower `benchmarks/flowertune-llm/evaluation/general-nlp`). A
  `?` is appended to the question unless it ends in `?` or `.`, the options become `A. …` lines (an
  option pandas reads as missing, "None", is printed "nan", as there), and the whole is wrapped in
  literal `<|im_start|>` markers (no chat template). The published generation files store only the
  inner part.
- `loglik`: the usual MMLU format of lm-evaluation-harness's `mmlu` task: a subject description, `k`
  dev examples each followed by `" X"`, separated by blank lines, then the question ending in
  `Answer:`; the model's next-token log-probabilities of `" A"` … `" D"` decide.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedtune.evaluation.dataset import LETTERS, Question

FLOWERTUNE_INSTRUCTION = "Answer the following multiple choice question."
FLOWERTUNE_OPEN = "<|im_start|>question\n"
FLOWERTUNE_CLOSE = "<|im_end|>\n<|im_start|>answer\n"

# The board's evaluator reads MMLU through `lukaemon/mmlu`, whose loader parses the CSVs with
# pandas: a cell that equals one of pandas' default NA strings becomes NaN and is printed as "nan".
# In the test split this hits ten STEM options that read "None" (e.g. college_mathematics/8); the
# published prompts say "D. nan" there.
PANDAS_NA_STRINGS = frozenset(
    {
        "",
        "#N/A",
        "#N/A N/A",
        "#NA",
        "-1.#IND",
        "-1.#QNAN",
        "-NaN",
        "-nan",
        "1.#IND",
        "1.#QNAN",
        "<NA>",
        "N/A",
        "NA",
        "NULL",
        "NaN",
        "None",
        "n/a",
        "nan",
        "null",
    }
)


def flowertune_inner_prompt(question: Question) -> str:
    """The `prompt` field of the board's generation files: instruction, question, options, `The
    answer is:`."""
    text = question.question
    if not text.endswith("?") and not text.endswith("."):
        text += "?"
    choices = ["nan" if choice in PANDAS_NA_STRINGS else choice for choice in question.choices]
    options = "\n".join(
        f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices, strict=True)
    )
    return f"{FLOWERTUNE_INSTRUCTION}\nQuestion: {text}\n\nOptions:\n{options}\nThe answer is:\n"


def flowertune_wrap(inner: str) -> str:
    """The string the board's evaluator encodes (with the tokenizer's default special tokens)."""
    return f"{FLOWERTUNE_OPEN}{inner}{FLOWERTUNE_CLOSE}"


def flowertune_prompt(question: Question) -> str:
    """The full flowertune prompt of a question."""
    return flowertune_wrap(flowertune_inner_prompt(question))


def mmlu_description(subject: str) -> str:
    """lm-evaluation-harness's per-subject description line, with its blank line."""
    topic = subject.replace("_", " ")
    return f"The following are multiple choice questions (with answers) about {topic}.\n\n"


def mmlu_question_text(question: Question) -> str:
    """One question in the usual MMLU format, ending in `Answer:` (no trailing space)."""
    options = "\n".join(
        f"{letter}. {choice}" for letter, choice in zip(LETTERS, question.choices, strict=True)
    )
    return f"{question.question.strip()}\n{options}\nAnswer:"


def loglik_prompt(question: Question, shots: Sequence[Question] = ()) -> str:
    """The `loglik` prompt: description, the few-shot examples with their answers, then the
    question.

    Args:
        question: the question to score.
        shots: dev-split examples of the same subject (0 or 5 in practice), in order.

    Returns:
        The prompt, ending in `Answer:`; the continuation scored is `" A"` … `" D"`.
    """
    examples = "".join(f"{mmlu_question_text(shot)} {shot.answer}\n\n" for shot in shots)
    return f"{mmlu_description(question.subject)}{examples}{mmlu_question_text(question)}"


def loglik_choice_strings() -> tuple[str, ...]:
    """The continuations whose next-token log-probabilities are compared: `" A"` … `" D"`."""
    return tuple(f" {letter}" for letter in LETTERS)

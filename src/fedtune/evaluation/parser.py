"""The board's answer parser, reproduced step by step (Flower `general-nlp/utils.py`,
`format_answer` for "mcq").

On the lower-cased output: if it contains "\\n##", keep the first line after the first "\\n##"
(stripped); replace every character outside [a-zA-Z0-9] by a space, strip, collapse runs of spaces;
keep the first character (an empty string stays empty). If that character is one of a–e it is the
prediction; otherwise the prediction is the whole lower-cased output, compared as a string with the
lower-cased gold letter — so "Answer" counts as A, "Certainly" as C, and "The answer is B" as wrong.
This is the only implementation of the parser in fedtune.
"""

from __future__ import annotations

import re

_NON_ALNUM = re.compile(r"[^a-zA-Z0-9]")
_SPACES = re.compile(" +")
# The official list also holds "yes"/"no" (shared with a boolean answer type); after keeping one
# character they can never match, so a–e is the effective set.
_ACCEPTED = ("a", "b", "c", "d", "e", "yes", "no")


def parse_prediction(output: str) -> str:
    """What the board's scorer compares with the gold letter.

    Args:
        output: the model's raw decoded generation.

    Returns:
        A lower-case letter a–e when the parser recognises one, otherwise the whole lower-cased
        output.
    """
    full = output.lower()
    text = full
    if "\n##" in text:
        text = text.split("\n##")[1].split("\n")[0].strip().lower()
    text = _NON_ALNUM.sub(" ", text).strip()
    text = _SPACES.sub(" ", text)
    # clean_mcq_answer: drop non-ASCII (none is left after the substitution), keep the first
    # character.
    text = text.encode("ascii", "ignore").decode("ascii")[:1]
    return text if text in _ACCEPTED else full


def predicted_letter(output: str) -> str | None:
    """The letter A–D the board reads from an output, or None when it reads none (E counts as
    none)."""
    parsed = parse_prediction(output)
    return parsed.upper() if parsed in ("a", "b", "c", "d") else None


def is_correct(output: str, gold: str) -> bool:
    """The board's verdict for one generation.

    Args:
        output: the raw generation.
        gold: the gold letter (any case).
    """
    return parse_prediction(output) == gold.lower()

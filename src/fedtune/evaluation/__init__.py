"""MMLU evaluation: the board's `flowertune` protocol (batched, same predictions as the official loop), the
`loglik` protocol, re-scoring of published generations, and a small API for evaluation during training.

Importing this package loads no model and no torch; see docs/evaluation.md.
"""

from fedtune.evaluation.api import run_protocol, score_questions
from fedtune.evaluation.dataset import Question, load_split
from fedtune.evaluation.sampling import fixed_subset, select

__all__ = ["Question", "fixed_subset", "load_split", "run_protocol", "score_questions", "select"]

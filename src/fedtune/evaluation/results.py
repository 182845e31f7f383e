"""Result files: one self-describing JSON per evaluation, plus the board's own files in flowertune
mode.

- `mmlu_{protocol}_{shots}shot_{run}.json`: everything about the evaluation, in the typed format of
  `fedtune.evaluation.resultfile` (see also `docs/evaluation.md`).
- flowertune mode, per category: `acc_mmlu_{category}_{run}.txt` (`Accuracy: 0.2190…. `, exactly the
  official scorer's text) and `generation_mmlu_{category}_{run}.jsonl` (a JSON array of `{prompt,
  gold, subset, output}`, the official layout, which `fedtune eval rescore` reads back). A partial
  evaluation adds a second line to the accuracy file saying so.
- loglik mode: `predictions_mmlu_loglik_{shots}shot_{run}.jsonl`, one line per question (`subset`,
  `index`, `gold`, `predicted`), from which the leaderboard recounts every score.

All files of one evaluation are written to temporary names first and renamed into place only when
every one of them was written, so an interrupted evaluation leaves no half-written result.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedtune.evaluation.flowertune import Generation
from fedtune.evaluation.metrics import Verdict
from fedtune.evaluation.prompts import flowertune_inner_prompt
from fedtune.evaluation.subjects import ALL_CATEGORIES
from fedtune.provenance import git_commit, package_versions

RESULT_FORMAT = 1
_VERSIONED_PACKAGES = ("fedtune", "torch", "transformers", "peft", "datasets", "flwr", "lm-eval")


def safe_run_name(name: str) -> str:
    """A run name usable in file names (letters, digits, `.`, `_`, `-`)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return cleaned or "run"


def environment() -> dict[str, Any]:
    """Commit, versions, interpreter, machine and the command line."""
    return {
        "git": git_commit(),
        "versions": package_versions(_VERSIONED_PACKAGES),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "command": " ".join(sys.argv),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def generation_rows(generations: Sequence[Generation]) -> list[dict[str, str]]:
    """Rows in the board's published format: prompt (the inner part), gold, subset, output."""
    return [
        {
            "prompt": flowertune_inner_prompt(g.question),
            "gold": g.question.answer,
            "subset": g.question.subject,
            "output": g.output,
        }
        for g in generations
    ]


def board_files(
    generations: Sequence[Generation],
    categories: dict[str, dict[str, Any]],
    run: str,
    available: dict[str, int],
    seed: int,
) -> dict[str, str]:
    """File name → content of the board's per-category files.

    Args:
        generations: all generations of the evaluation.
        categories: the per-category metrics (accuracy, n).
        run: the run name in the file names.
        available: questions each category holds; fewer evaluated adds a "partial" line to the
            accuracy file.
        seed: the sampling seed, named in that line.
    """
    files: dict[str, str] = {}
    for category in ALL_CATEGORIES:
        if category not in categories:
            continue
        rows = generation_rows([g for g in generations if g.question.category == category])
        # pandas to_json(orient="records") writes compact JSON; ASCII escapes keep it byte-stable.
        files[f"generation_mmlu_{category}_{run}.jsonl"] = json.dumps(rows, separators=(",", ":"))
        text = f"Accuracy: {categories[category]['accuracy']}. "
        if len(rows) < available[category]:
            text += f"\npartial: {len(rows)} of {available[category]} questions (seed {seed})\n"
        files[f"acc_mmlu_{category}_{run}.txt"] = text
    return files


def predictions_file_name(protocol: str, shots: int, run: str) -> str:
    """The per-question predictions' file name (the loglik protocol's own outputs)."""
    return f"predictions_mmlu_{protocol}_{shots}shot_{run}.jsonl"


def prediction_rows(verdicts: Sequence[Verdict]) -> str:
    """One JSON line per question: `{"subset", "index", "gold", "predicted"}` — the question by its
    subject and row in the test split, the gold letter, and the letter the protocol read (`none`
    when it read none). With these a reader recounts every score without the model."""
    return "".join(
        json.dumps(
            {
                "subset": v.question.subject,
                "index": v.question.index,
                "gold": v.question.answer,
                "predicted": v.letter or "none",
            }
        )
        + "\n"
        for v in verdicts
    )


def result_file_name(protocol: str, shots: int, run: str) -> str:
    """The result JSON's file name (matched by `RESULT_FILE_GLOB`)."""
    return f"mmlu_{protocol}_{shots}shot_{run}.json"


RESULT_FILE_GLOB = "mmlu_*_*shot_*.json"


def write_atomically(directory: Path, files: dict[str, str]) -> list[Path]:
    """Write several text files so that either all appear or none does.

    Every file goes to a hidden temporary name first; the renames happen only after all writes
    succeeded.

    Returns:
        The final paths.

    Raises:
        OSError: the directory cannot be created or written (temporary files are removed).
    """
    directory.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []
    try:
        for name, content in files.items():
            final = directory / name
            temporary = directory / f".{name}.tmp-{os.getpid()}"
            temporary.write_text(content, encoding="utf-8")
            staged.append((temporary, final))
    except OSError:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
        raise
    for temporary, final in staged:
        os.replace(temporary, final)
    return [final for _, final in staged]

"""`fedtune eval`: MMLU evaluation of a base model with or without an adapter, and re-scoring of
saved generations.

    fedtune eval [--model NAME] [--adapter PATH|RUN_DIR] [--protocol flowertune|loglik]
    [--categories ...]
                 [--shots 0|5] [--limit-per-subject N | --sample N] [--seed S] [--output DIR]
                 [--run-name NAME]
    fedtune eval rescore FILE...

Handlers import torch/transformers lazily. Expected errors print one line to stderr and return 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

EXIT_USAGE = 2


def register(subparsers: Any) -> None:
    """Add the `eval` command (and its `rescore` sub-command)."""
    parser = subparsers.add_parser(
        "eval",
        help="MMLU evaluation (board protocol or log-likelihood); `eval rescore` re-scores",
        description="Evaluate a model (optionally with a LoRA adapter or a run directory) on MMLU. "
        "`fedtune eval rescore FILE...` re-scores generation files in the board's format.",
    )
    parser.add_argument(
        "--model",
        help="base model: embedded:NAME, a local HF directory or a hub id "
        "(default: the run's model.name, else embedded:smollm2-135m-instruct)",
    )
    parser.add_argument("--adapter", help="a PEFT adapter folder or a fedtune run directory")
    parser.add_argument(
        "--protocol",
        default="flowertune",
        choices=("flowertune", "loglik"),
        help="flowertune: the board's generation protocol; loglik: letter log-likelihood",
    )
    parser.add_argument(
        "--categories",
        default=None,
        help="comma-separated: stem,social_sciences,humanities,other or all "
        "(default: the three scored categories)",
    )
    parser.add_argument(
        "--subjects",
        default="",
        help="comma-separated MMLU subjects (default: all of the categories)",
    )
    parser.add_argument(
        "--shots", type=int, default=0, choices=(0, 5), help="few-shot examples (loglik only)"
    )
    parser.add_argument(
        "--limit-per-subject",
        type=int,
        default=None,
        metavar="N",
        help="at most N questions per subject (seeded; marks the result partial)",
    )
    parser.add_argument(
        "--sample",
        type=int,
        default=None,
        metavar="N",
        help="a stratified sample of about N questions, proportional to subject size (partial)",
    )
    parser.add_argument("--seed", type=int, default=2024, help="subsampling seed (default 2024)")
    parser.add_argument(
        "--data",
        default="embedded",
        metavar="SOURCE",
        help="MMLU source: embedded (default), hub[:NAME] or a directory in the CSV layout",
    )
    parser.add_argument(
        "--output",
        default=None,
        metavar="DIR",
        help="where to write results (default: RUN_DIR/eval for a run directory, else ./eval)",
    )
    parser.add_argument("--run-name", default=None, help="name in the result file names")
    parser.add_argument(
        "--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16")
    )
    parser.add_argument(
        "--batch-size", type=_at_least(1), default=None, help="most prompts per forward pass"
    )
    parser.add_argument(
        "--pad-tolerance",
        type=_at_least(0),
        default=None,
        help="largest length spread inside a batch, in tokens (CPU default 4, GPU 32)",
    )
    parser.add_argument(
        "--workers",
        type=_at_least(1),
        default=None,
        help="forward passes run side by side (CPU default: one single-threaded worker per core; GPU 1)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(handler=_handle_eval)

    sub = parser.add_subparsers(dest="eval_command", metavar="{rescore}")
    rescore = sub.add_parser(
        "rescore",
        help="re-score generation files with the official parser",
        description="Score files in the board's generation format (a JSON array of "
        "{prompt, gold, subset, output}, optionally gzipped) with the official parser.",
    )
    rescore.add_argument("files", nargs="+", metavar="FILE")
    rescore.add_argument("--json", action="store_true", help="print JSON instead of a table")
    rescore.set_defaults(handler=_handle_rescore)


def _fail(message: str) -> int:
    print(f"fedtune eval: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _handle_eval(args: argparse.Namespace) -> int:
    from fedtune.evaluation.runner import EvalRequest, evaluate, format_summary, load, prepare

    request = EvalRequest(
        model=args.model,
        adapter=args.adapter,
        protocol=args.protocol,
        categories=args.categories,
        subjects=args.subjects,
        shots=args.shots,
        limit_per_subject=args.limit_per_subject,
        sample=args.sample,
        seed=args.seed,
        source=args.data,
        output_dir=args.output,
        run_name=args.run_name,
        dtype=args.dtype,
        max_batch=args.batch_size,
        pad_tolerance=args.pad_tolerance,
        workers=args.workers,
        show_progress=not args.no_progress,
    )
    try:
        prepared = prepare(request)
        model, tokenizer = load(prepared)
        result, paths = evaluate(prepared, model, tokenizer)
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    print(format_summary(result))
    for path in paths:
        print(f"  wrote {path}")
    return 0


def _handle_rescore(args: argparse.Namespace) -> int:
    from fedtune.evaluation.rescore import GenerationFileError, rescore_file

    try:
        results = [rescore_file(path) for path in args.files]
    except GenerationFileError as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2))
        return 0
    for r in results:
        print(r.path)
        print(f"  {r.category or 'mixed'}: {r.correct}/{r.rows}  {r.official_line().strip()}")
        print("  predicted letters " + " ".join(f"{k}:{v}" for k, v in r.predicted_letters.items()))
    return 0


def _at_least(minimum: int) -> Any:
    """An argparse type: an integer ≥ `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse

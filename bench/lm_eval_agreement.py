"""Agreement of fedtune's `loglik` protocol with lm-evaluation-harness's `mmlu` task, same model, same questions.

lm-eval's own `mmlu` tasks read `cais/mmlu` from the hub; here each subject becomes a local task whose YAML is
lm-eval's `mmlu/default` template with `dataset_path: json` pointing at the embedded questions (written to a
temporary folder). Both sides score the same stratified sample; the script reports per-category accuracies,
their difference (target: within 0.5 points), per-question agreement, whether lm-eval's contexts equal fedtune's
prompts string for string, and the time each side took.

    .venv/bin/python bench/lm_eval_agreement.py --sample 1100 --shots 0
    (needs `pip install lm-eval`, the `bench` extra)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fedtune.evaluation.dataset import Question, dev_examples  # noqa: E402
from fedtune.evaluation.prompts import mmlu_description  # noqa: E402
from fedtune.evaluation.subjects import SCORED_CATEGORIES  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TEMPLATE = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
    dev: {dev}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
description: {description}
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _row(question: Question) -> dict[str, Any]:
    return {
        "question": question.question,
        "subject": question.subject,
        "choices": list(question.choices),
        "answer": "ABCD".index(question.answer),
        "key": question.key,
    }


def write_tasks(questions: Sequence[Question], folder: Path) -> dict[str, str]:
    """One lm-eval task per subject (lm-eval's mmlu template, local JSON data); returns subject → task."""
    shots = dev_examples()
    tasks = {}
    for subject in dict.fromkeys(q.subject for q in questions):
        test, dev = folder / f"{subject}_test.jsonl", folder / f"{subject}_dev.jsonl"
        rows = [_row(q) for q in questions if q.subject == subject]
        test.write_text("".join(json.dumps(r) + "\n" for r in rows))
        dev.write_text("".join(json.dumps(_row(q)) + "\n" for q in shots[subject]))
        task = f"fedtune_mmlu_{subject}"
        description = json.dumps(mmlu_description(subject))
        (folder / f"{task}.yaml").write_text(
            TEMPLATE.format(task=task, test=test, dev=dev, description=description)
        )
        tasks[subject] = task
    return tasks


def run_lm_eval(
    questions: Sequence[Question], model_dir: str, shots: int, batch_size: int
) -> tuple[dict[str, dict[str, Any]], float]:
    """Run lm-eval on the questions; returns key → {letter, context, logprobs} and the seconds it took."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="fedtune-lmeval-") as tmp:
        tasks = write_tasks(questions, Path(tmp))
        manager = TaskManager(include_path=tmp)
        started = time.perf_counter()
        output = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={model_dir},dtype=float32,device=cpu",
            tasks=list(tasks.values()),
            num_fewshot=shots,
            batch_size=batch_size,
            log_samples=True,
            task_manager=manager,
        )
        seconds = time.perf_counter() - started
    by_key: dict[str, dict[str, Any]] = {}
    for samples in output["samples"].values():
        for sample in samples:
            logprobs = [float(resp[0]) for resp in sample["filtered_resps"]]
            by_key[sample["doc"]["key"]] = {
                "letter": "ABCD"[max(range(4), key=lambda k: (logprobs[k], -k))],
                "context": sample["arguments"][0][0],
                "logprobs": logprobs,
            }
    return by_key, seconds


def run_fedtune(
    questions: Sequence[Question], model: Any, tokenizer: Any, shots: int
) -> tuple[list, float]:
    """fedtune's loglik scores and the seconds they took."""
    from fedtune.evaluation.loglik import score_letters

    started = time.perf_counter()
    scores = score_letters(model, tokenizer, questions, shots=shots)
    return scores, time.perf_counter() - started


def compare(
    questions: Sequence[Question], scores: list, reference: dict[str, dict[str, Any]], shots: int
) -> dict:
    """Per-category accuracies of both, their difference, agreement and context equality."""
    from fedtune.evaluation.loglik import build_prompts

    prompts = build_prompts(questions, shots)
    table: dict[str, dict[str, Any]] = {}
    same_letter = same_context = 0
    max_logprob_gap = 0.0
    for question, score, prompt in zip(questions, scores, prompts, strict=True):
        theirs = reference[question.key]
        cell = table.setdefault(question.category, {"n": 0, "fedtune": 0, "lm_eval": 0})
        cell["n"] += 1
        cell["fedtune"] += score.letter == question.answer
        cell["lm_eval"] += theirs["letter"] == question.answer
        same_letter += score.letter == theirs["letter"]
        same_context += theirs["context"] == prompt
        gap = max(abs(a - b) for a, b in zip(score.logprobs, theirs["logprobs"], strict=True))
        max_logprob_gap = max(max_logprob_gap, gap)
    for cell in table.values():
        cell["fedtune_accuracy"] = 100 * cell["fedtune"] / cell["n"]
        cell["lm_eval_accuracy"] = 100 * cell["lm_eval"] / cell["n"]
        cell["difference_points"] = cell["fedtune_accuracy"] - cell["lm_eval_accuracy"]
    return {
        "categories": {c: table[c] for c in SCORED_CATEGORIES if c in table},
        "same_prediction": same_letter,
        "same_context": same_context,
        "max_abs_logprob_difference": max_logprob_gap,
        "within_half_point": all(abs(c["difference_points"]) <= 0.5 for c in table.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sample", type=int, default=1100, help="stratified sample size (scored categories)"
    )
    parser.add_argument("--shots", type=int, default=0, choices=(0, 5))
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)

    from fedtune.evaluation.sampling import select
    from fedtune.model.loading import load_model, load_tokenizer, local_path, resolve_model

    source = resolve_model("embedded:smollm2-135m-instruct")
    tokenizer, model = load_tokenizer(source), load_model(source, dtype="float32", device="cpu")
    model.eval()
    questions = list(select(sample=args.sample, seed=args.seed).questions)
    load_before = os.getloadavg()
    scores, fedtune_s = run_fedtune(questions, model, tokenizer, args.shots)
    reference, lm_eval_s = run_lm_eval(questions, local_path(source), args.shots, args.batch_size)
    summary = compare(questions, scores, reference, args.shots)
    n = len(questions)
    report = {
        "benchmark": "lm_eval_agreement",
        "model": source.name,
        "shots": args.shots,
        "sample": args.sample,
        "seed": args.seed,
        "n_questions": n,
        **summary,
        "seconds": {"fedtune": round(fedtune_s, 1), "lm_eval": round(lm_eval_s, 1)},
        "questions_per_s": {"fedtune": round(n / fedtune_s, 2), "lm_eval": round(n / lm_eval_s, 2)},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"MMLU loglik {args.shots}-shot, {n} questions: fedtune vs lm-evaluation-harness")
    print(f"{'category':<18}{'n':>6}{'fedtune':>10}{'lm-eval':>10}{'diff':>8}")
    for category, cell in summary["categories"].items():
        print(
            f"{category:<18}{cell['n']:>6}{cell['fedtune_accuracy']:>10.2f}{cell['lm_eval_accuracy']:>10.2f}"
            f"{cell['difference_points']:>+8.2f}"
        )
    print(
        f"same prediction {summary['same_prediction']}/{n}, same context {summary['same_context']}/{n}, "
        f"max |Δ logprob| {summary['max_abs_logprob_difference']:.2e}"
    )
    print(
        f"time: fedtune {fedtune_s:.0f} s ({n / fedtune_s:.2f} q/s), lm-eval {lm_eval_s:.0f} s "
        f"({n / lm_eval_s:.2f} q/s)"
    )
    output = args.output or RESULTS / f"lm_eval_agreement_{args.shots}shot.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")
    return 0 if summary["within_half_point"] else 1


if __name__ == "__main__":
    sys.exit(main())

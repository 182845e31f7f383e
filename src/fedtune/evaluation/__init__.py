"""MMLU evaluation: the board's `flowertune` protocol (batched, same predictions as the official loop), the
`loglik` protocol, re-scoring of published generations, and a small API for evaluation during training.

Importing this package loads no model and no torch; see docs/evaluation.md. The package itself
re-exports `Question`, `fixed_subset`, `load_split`, `run_protocol`, `score_questions` and `select`
(`from fedtune.evaluation import fixed_subset, score_questions`); each is listed below under the
module it comes from.

Public API:

- adapters: what `--adapter` points at, loaded strictly
  - ADAPTER_CONFIG: the adapter's config file name, `adapter_config.json`
  - ADAPTER_WEIGHTS: the adapter's weights file name, `adapter_model.safetensors`
  - AdapterError: an adapter path that is not an adapter, or does not fit the model
  - AdapterSource: a resolved `--adapter`
  - apply_adapter: wraps a loaded base model with the adapter and checks it loaded completely
- api: scoring an already-loaded model, also during training
  - run_protocol: runs one protocol on loaded questions
  - score_questions: scores a loaded (optionally PEFT-wrapped) model on given questions
- batching: the shared prompt prefix, length buckets and the prefix KV cache
  - BatchPlan: how prompts are batched
  - PrefixCache: the keys and values of a shared token prefix
  - common_prefix_length: the longest token prefix all sequences share
  - make_buckets: groups items by length, longest first
  - run_bucket: next-token logits after each prompt of a bucket
  - shared_runs: sequences that start with the same tokens
- cli: `fedtune eval` and `fedtune eval rescore`
  - register: adds the `eval` command to the `fedtune` parser
- dataset: MMLU questions from the embedded copy, a CSV directory or the hub
  - EMBEDDED: the source name of the embedded copy
  - LETTERS: the answer letters A to D
  - Question: one MMLU question
  - dev_examples: the five dev-split questions per subject
  - load_split: all questions of one split, checked against the known counts
- flowertune: the board's generation-based protocol, batched
  - default_margin: the near-tie recheck margin for the model's compute dtype
  - encode_prompt: a question's prompt token ids, as the official loop encodes them
  - generate_batched: the official loop's generations, computed in batches
  - generate_one_at_a_time: the official loop itself, one `generate` call per question
- loglik: the log-likelihood protocol of lm-evaluation-harness's `mmlu` task
  - build_prompts: the loglik prompt of every question
  - score_letters: scores questions by the log-probabilities of the four letters
- metrics: accuracies per subject and category, the board's Average, answer bias
  - board_mean: the board's Average of per-category percents
  - constant_baselines: what answering the same letter every time would score
  - percent: a share in percent at full precision (100 · correct / total)
- parser: the board's answer parser
  - predicted_letter: the letter the board reads from an output, or None
- progress: a one-line progress bar on stderr
  - ProgressBar: questions done, questions per second and ETA
- prompts: prompt strings of the two protocols
  - flowertune_inner_prompt: the `prompt` field of the board's generation files
  - mmlu_description: lm-evaluation-harness's per-subject description line
- rescore: re-scoring saved generations with the official parser
  - GenerationFileError: a file that is not a generation file in the board's format
  - PREDICTION_FIELDS: the fields of a predictions row
  - QuestionSet: a multiset of (subject, prompt, gold letter)
  - RescoredFile: the official accuracy of one generation file
  - check_prediction_set: checks that predictions answer exactly the expected questions
  - check_question_set: checks that generation rows answer exactly the expected questions
  - decompress: raw bytes, or their gzip content, size-bounded
  - parse_generations: rows of a generation file's bytes
  - parse_predictions: rows of a predictions file's bytes
  - question_set: the QuestionSet a complete generation file of one category answers
  - rescore_predictions: counts predictions equal to the gold letter
  - rescore_rows: scores generation rows with the official parser
- resultfile: the typed evaluation result file (format 1)
  - EvalResultFile: one evaluation, as `fedtune eval` writes it
  - ResultFileError: a result file that is not a format-1 evaluation result
  - parse_result: parses a result file's content strictly
- results: writing the result files of an evaluation
  - RESULT_FILE_GLOB: the glob of the result files' names
- sampling: which questions an evaluation runs
  - fixed_subset: a fixed stratified subset for evaluation during training
  - select: the questions of an evaluation from the test split
- subjects: MMLU subjects and categories, as the board scores them
  - CATEGORY_SUBJECTS: category to its subjects
  - EXPECTED_TEST_QUESTIONS: questions per category in the test split
  - SCORED_CATEGORIES: the three categories of the board's Average
  - SUBJECT_CATEGORY: subject to its category
"""

from fedtune.evaluation.api import run_protocol as run_protocol
from fedtune.evaluation.api import score_questions as score_questions
from fedtune.evaluation.dataset import Question as Question
from fedtune.evaluation.dataset import load_split as load_split
from fedtune.evaluation.sampling import fixed_subset as fixed_subset
from fedtune.evaluation.sampling import select as select

__all__: list[str] = [
    "adapters",
    "api",
    "batching",
    "cli",
    "dataset",
    "flowertune",
    "loglik",
    "metrics",
    "parser",
    "progress",
    "prompts",
    "rescore",
    "resultfile",
    "results",
    "sampling",
    "subjects",
]

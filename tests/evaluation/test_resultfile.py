"""The one evaluation result format: what `fedtune eval` writes parses back, anything else is refused
with the field named, and the leaderboard's reader maps it to a submission's fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.evaluation.resultfile import EvalResultFile, ResultFileError, parse_result
from fedtune.evaluation.subjects import SUBJECT_CATEGORY
from fedtune.leaderboard.evalresults import EvalResultsError, find_results, read_results
from leaderboard.lb_rundir import always, make_run_dir, write_evaluation

pytestmark = pytest.mark.unit

METRIC_KEYS = (
    "n_questions",
    "average",
    "average_stderr",
    "weighted_mean",
    "board",
    "categories",
    "subjects",
    "predicted_letters",
    "gold_letters",
    "constant_baselines",
)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """A result file written by `fedtune eval`'s runner and writer (scripted answers: always B)."""
    run = make_run_dir(tmp_path_factory.mktemp("written"), evaluate=False)
    return write_evaluation(run, always("B"), limit_per_subject=1, categories="all")


@pytest.fixture
def document(written) -> dict:
    return json.loads(written.read_text(encoding="utf-8"))


def _refusal(document: dict, where: str = "eval/mmlu_flowertune_0shot_demo.json") -> str:
    with pytest.raises(ResultFileError) as caught:
        parse_result(json.dumps(document), where)
    message = str(caught.value)
    assert message.startswith(f"{where}: not an evaluation result file: "), message
    return message


def test_the_writers_file_parses_back_field_for_field(written):
    text = written.read_text(encoding="utf-8")
    result = parse_result(text, written)
    assert isinstance(result, EvalResultFile)
    assert (result.format, result.benchmark, result.protocol, result.shots) == (
        1,
        "mmlu",
        "flowertune",
        0,
    )
    assert result.protocol_version == "1" and result.partial is True
    assert result.model.name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    run = written.parent.parent
    summary = json.loads((run / "summary.json").read_text())
    assert result.adapter is not None
    assert result.adapter.sha256 == summary["adapter_sha256"]
    assert result.adapter.run_dir == str(run.resolve())
    assert result.data.split == "test" and result.data.source == "embedded"
    assert set(result.subjects) == set(SUBJECT_CATEGORY)  # all 57, one question each
    assert all(cell.n == 1 for cell in result.subjects.values())
    assert result.n_questions == result.selection.n_questions == 57
    assert sum(cell.n for cell in result.categories.values()) == 57
    assert result.predicted_letters == {"A": 0, "B": 57, "C": 0, "D": 0, "none": 0}
    assert sum(result.gold_letters.values()) == 57
    assert set(result.constant_baselines) == {"A", "B", "C", "D"}
    assert result.board.average is not None and result.rechecked_one_at_a_time is None
    assert result.files == sorted(result.files) and len(result.files) == 8  # 4 categories × 2
    # Written from the model: serializing the parsed file gives back the same bytes.
    assert result.to_json_text() == text
    assert "rechecked_one_at_a_time" not in text


def test_base_model_loglik_five_shot_parses_with_a_null_adapter(tmp_path):
    run = make_run_dir(tmp_path, evaluate=False)
    path = write_evaluation(
        run, always("A"), adapter=None, protocol="loglik", shots=5, limit_per_subject=1
    )
    assert path.name == "mmlu_loglik_5shot_demo.json"
    result = parse_result(path.read_bytes(), path)
    assert result.adapter is None and result.protocol == "loglik" and result.shots == 5
    assert result.files == ["predictions_mmlu_loglik_5shot_demo.jsonl"]
    assert "other" not in result.categories


def test_rechecked_count_is_kept_and_written_before_files(document):
    result = parse_result(json.dumps({**document, "rechecked_one_at_a_time": 3}), "x.json")
    assert result.rechecked_one_at_a_time == 3
    keys = list(json.loads(result.to_json_text()))
    assert keys[-2:] == ["rechecked_one_at_a_time", "files"]


def _without(document: dict, key: str) -> dict:
    return {k: v for k, v in document.items() if k != key}


def _legacy(document: dict) -> dict:
    """The metrics under a `metrics` key, a layout nothing writes."""
    doc = {k: v for k, v in document.items() if k not in METRIC_KEYS}
    doc["metrics"] = {k: document[k] for k in METRIC_KEYS}
    return doc


def _subject_cell(document: dict, **changes) -> dict:
    doc = json.loads(json.dumps(document))
    doc["subjects"]["anatomy"].update(changes)
    return doc


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: {**d, "extra_key": 1}, "extra_key: Extra inputs are not permitted"),
        (lambda d: _without(d, "protocol"), "protocol: Field required"),
        (lambda d: _without(d, "adapter"), "adapter: Field required"),
        (lambda d: {**d, "shots": "0"}, "shots: Input should be a valid integer"),
        (lambda d: {**d, "shots": 0.0}, "shots: Input should be a valid integer"),
        (lambda d: {**d, "partial": "false"}, "partial: Input should be a valid boolean"),
        (lambda d: {**d, "format": 2}, "format: format 2 is not 1"),
        (lambda d: {**d, "protocol": "lm-eval"}, "protocol: unknown protocol 'lm-eval'"),
        (lambda d: _subject_cell(d, n=1.5), "subjects.anatomy.n: Input should be a valid integer"),
        (lambda d: _subject_cell(d, n=True), "subjects.anatomy.n: Input should be a valid integer"),
        (lambda d: _subject_cell(d, n=-1), "subjects.anatomy.n: Input should be greater than"),
        (lambda d: _subject_cell(d, total=1), "subjects.anatomy.total: Extra inputs"),
        (
            lambda d: {**d, "subjects": {**d["subjects"], "astrology": d["subjects"]["anatomy"]}},
            "subjects: unknown MMLU subject 'astrology'",
        ),
        (
            lambda d: {**d, "predicted_letters": {**d["predicted_letters"], "E": 0}},
            "predicted_letters.E: Input should be",
        ),
        (lambda d: {**d, "model": {"base": "x"}}, "model.name: Field required"),
        (lambda d: _legacy(d), "n_questions: Field required"),
        (lambda d: [d], "Input should be an object"),
    ],
)
def test_anything_but_the_format_is_refused_with_the_field_named(document, edit, expected):
    assert expected in _refusal(edit(document))


def test_the_legacy_layout_is_refused_for_its_metrics_key_too(document):
    # `metrics` is one of the problems counted after the first.
    message = _refusal(_legacy(document))
    assert "more problems" in message
    with pytest.raises(ResultFileError, match="metrics: Extra inputs are not permitted"):
        parse_result(json.dumps({**document, "metrics": {}}), "x.json")


def test_not_json_is_refused_with_the_file_named():
    with pytest.raises(
        ResultFileError, match=r"^bad\.json: not an evaluation result file: Invalid"
    ):
        parse_result(b"{oops", "bad.json")


def test_read_results_maps_the_fields_a_submission_needs(written, document):
    results = read_results(written)
    assert results.path == written
    assert (results.protocol, results.protocol_version, results.split) == (
        "flowertune",
        "1",
        "test",
    )
    assert results.shots == 0 and results.complete is False
    assert results.subjects == {
        s: {"correct": c["correct"], "total": c["n"]} for s, c in document["subjects"].items()
    }
    assert results.answer_distribution == document["predicted_letters"]
    assert results.extra == pytest.approx(
        {
            "other": 100 * document["categories"]["other"]["accuracy"],
            "weighted_mean": 100 * document["weighted_mean"],
            "average_stderr": 100 * document["average_stderr"],
        }
    )
    assert results.adapter_path == document["adapter"]["path"]
    assert results.adapter_sha256 == document["adapter"]["sha256"]
    assert results.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert results.without_adapter is False


def test_read_results_of_the_base_model_alone(tmp_path):
    run = make_run_dir(tmp_path, evaluate=False)
    results = read_results(write_evaluation(run, always("C"), adapter=None, limit_per_subject=1))
    assert results.without_adapter is True
    assert results.adapter_path is None and results.adapter_sha256 is None
    assert "other" not in results.extra and results.complete is False


def test_read_results_refuses_a_file_that_does_not_parse(tmp_path, document):
    path = tmp_path / "eval" / "mmlu_flowertune_0shot_x.json"
    path.parent.mkdir()
    path.write_text(json.dumps(_legacy(document)))
    with pytest.raises(EvalResultsError, match=rf"{path.name}: .*n_questions: Field required"):
        read_results(path)


def test_find_results_looks_only_at_result_file_names(tmp_path, document):
    run = make_run_dir(tmp_path, evaluate=False)
    eval_dir = run / "eval"
    eval_dir.mkdir()
    # Names nothing writes are not looked at, whatever they hold.
    (eval_dir / "results.json").write_text(json.dumps(document))
    for name in ("summary.json", "metrics.json"):
        (eval_dir / name).write_text(json.dumps(_legacy(document)))
    (eval_dir / "old").mkdir()
    (eval_dir / "old" / "results.json").write_text(json.dumps(document))
    with pytest.raises(EvalResultsError, match="no evaluation results"):
        find_results(run)
    loglik = write_evaluation(run, always("A"), protocol="loglik", limit_per_subject=1)
    assert find_results(run) == loglik
    # An explicit name: a file name under eval/ or a path, read strictly like any other.
    assert find_results(run, "results.json") == eval_dir / "results.json"
    assert read_results(find_results(run, "results.json")).protocol == "flowertune"
    with pytest.raises(EvalResultsError, match="summary.json: not an evaluation result file"):
        read_results(find_results(run, "summary.json"))
    with pytest.raises(EvalResultsError, match="no evaluation result file nothing.json"):
        find_results(run, "nothing.json")


def test_find_results_prefers_the_boards_protocol_and_otherwise_asks(tmp_path):
    run = make_run_dir(tmp_path, evaluate=False)
    loglik = write_evaluation(run, always("A"), protocol="loglik", limit_per_subject=1)
    write_evaluation(run, always("A"), protocol="loglik", shots=5, limit_per_subject=1)
    with pytest.raises(EvalResultsError, match="several evaluations .* choose one with --eval"):
        find_results(run)
    assert find_results(run, loglik.name) == loglik
    assert find_results(run, str(loglik)) == loglik
    official = write_evaluation(run, always("A"), limit_per_subject=1)
    assert find_results(run) == official


def test_find_results_names_a_result_file_that_does_not_parse(tmp_path, document):
    run = make_run_dir(tmp_path, evaluate=False)
    write_evaluation(run, always("A"), limit_per_subject=1)
    broken = run / "eval" / "mmlu_loglik_0shot_old.json"
    broken.write_text(json.dumps({**document, "shots": "0"}))
    with pytest.raises(EvalResultsError, match=rf"{broken.name}: .*shots: Input should be"):
        find_results(run)

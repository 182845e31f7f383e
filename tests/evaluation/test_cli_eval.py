"""`fedtune eval` end to end on a tiny model with a run directory; bad inputs fail cleanly."""

from __future__ import annotations

import json

import pytest
import torch

from fedtune.cli import main
from fedtune.evaluation.rescore import rescore_file


def _save_adapter(model_dir, target, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    settings = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "init_lora_weights": False,
    }
    settings.update(lora)
    get_peft_model(base, LoraConfig(**settings)).save_pretrained(target)


@pytest.fixture
def run_dir(tmp_path, tiny_model_dir):
    run = tmp_path / "runs" / "r1"
    _save_adapter(tiny_model_dir, run / "adapter")
    (run / "config.json").write_text(
        json.dumps({"config": {"model.name": str(tiny_model_dir)}, "digest": "0" * 16})
    )
    return run


def test_eval_run_directory_writes_results_under_eval(run_dir, tiny_model_dir, capsys):
    args = [
        "eval",
        "--adapter",
        str(run_dir),
        "--categories",
        "stem,humanities",
        "--limit-per-subject",
        "2",
    ]
    assert main([*args, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "(PARTIAL)" in out
    result = json.loads((run_dir / "eval" / "mmlu_flowertune_0shot_r1.json").read_text())
    assert result["partial"] is True and result["n_questions"] == (19 + 13) * 2
    assert result["model"]["name"] == str(tiny_model_dir)
    assert result["adapter"]["run_dir"] == str(run_dir.resolve())
    assert result["protocol"] == "flowertune" and result["protocol_version"] == "1"
    assert result["selection"]["seed"] == 2024 and result["selection"]["limit_per_subject"] == 2
    assert set(result["environment"]["versions"]) >= {"torch", "transformers", "peft"}
    assert sum(result["predicted_letters"].values()) == result["n_questions"]
    assert result["files"] == sorted(
        f"{kind}_mmlu_{c}_r1.{ext}"
        for c in ("stem", "humanities")
        for kind, ext in (("acc", "txt"), ("generation", "jsonl"))
    )
    # the board's files read back through the official parser give the same accuracy
    rescored = rescore_file(run_dir / "eval" / "generation_mmlu_stem_r1.jsonl")
    assert rescored.accuracy == result["categories"]["stem"]["accuracy"]
    accuracy_file = (run_dir / "eval" / "acc_mmlu_stem_r1.txt").read_text()
    assert accuracy_file.startswith(f"Accuracy: {rescored.accuracy}. \npartial: 38 of 3153")


def test_eval_loglik_five_shot_bare_adapter(tmp_path, tiny_model_dir):
    adapter = tmp_path / "adapter"
    _save_adapter(tiny_model_dir, adapter)
    code = main([
        "eval", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--protocol", "loglik",
        "--shots", "5", "--subjects", "anatomy,virology", "--categories", "all", "--limit-per-subject", "3",
        "--output", str(tmp_path / "out"), "--run-name", "tiny", "--no-progress",
    ])  # fmt: skip
    assert code == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["mmlu_loglik_5shot_tiny.json", "predictions_mmlu_loglik_5shot_tiny.jsonl"]
    result = json.loads((tmp_path / "out" / written[0]).read_text())
    # One line per question: the predicted letter beside the gold one recounts every score.
    lines = (tmp_path / "out" / written[1]).read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == result["n_questions"]
    assert sum(r["predicted"] == r["gold"] for r in rows) == sum(
        s["correct"] for s in result["subjects"].values()
    )
    assert result["shots"] == 5 and set(result["subjects"]) == {"anatomy", "virology"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--categories", "science"], "unknown MMLU category"),
        (["--subjects", "astrology"], "unknown MMLU subject"),
        (["--protocol", "flowertune", "--shots", "5"], "zero-shot"),
        (["--adapter", "/nonexistent/adapter"], "neither a PEFT adapter"),
        (["--data", "/nonexistent/mmlu"], "not 'embedded'"),
    ],
)
def test_bad_options_fail_with_one_line(tmp_path, tiny_model_dir, capsys, extra, message):
    out = tmp_path / "out"
    code = main(
        ["eval", "--model", str(tiny_model_dir), "--output", str(out), "--no-progress", *extra]
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("fedtune eval: error: ")
    assert message in errors[0]
    assert not out.exists()


@pytest.mark.parametrize(
    ("lora", "message"),
    [({"target_modules": ["k_proj"]}, "does not fit"), ({}, "does not fit")],
    ids=["other-targets", "other-width"],
)
def test_adapter_that_does_not_fit_is_refused(
    tmp_path, tiny_model_dir, tiny_llama, capsys, lora, message
):
    if lora:  # an adapter whose keys differ: trained on k_proj, a model file pretending q/v
        adapter = tmp_path / "adapter"
        _save_adapter(tiny_model_dir, adapter, **lora)
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["target_modules"] = ["q_proj", "v_proj"]
        (adapter / "adapter_config.json").write_text(json.dumps(config))
    else:  # an adapter saved from a model of another hidden size
        other = tmp_path / "other-model"
        tiny_llama(hidden_size=32, intermediate_size=64).save_pretrained(other)
        adapter = tmp_path / "adapter"
        _save_adapter(other, adapter)
    out = tmp_path / "out"
    code = main([
        "eval", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--output", str(out),
        "--limit-per-subject", "1", "--no-progress",
    ])  # fmt: skip
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("fedtune eval: error: ")
    assert message in errors[0]
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--workers", "0"], "must be at least 1"), (["--batch-size", "many"], "expected an integer")],
)
def test_bad_numbers_are_refused_by_the_parser(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--output", str(out), *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_workers_option_shares_the_cores_between_workers():
    from fedtune.evaluation.runner import EvalRequest, _plan

    cores = torch.get_num_threads()
    one = _plan(EvalRequest(workers=1), "cpu")
    assert (one.workers, one.threads) == (1, cores)
    default = _plan(EvalRequest(), "cpu")
    assert default.workers == min(cores, 16) and default.max_batch == 16

"""Bad input to `fedtune run` fails at start-up: one line naming the problem, exit 2, no run directory."""

from __future__ import annotations

import json

import pytest

from fedtune.cli import main


@pytest.fixture
def output_dir(tmp_path):
    return tmp_path / "runs"


def run_cli(capsys, output_dir, *args):
    code = main(["run", "--set", f"run.output-dir={output_dir}", *args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "num-server-rounds=0"], "num-server-rounds: must be >= 1, got 0"),
        (["--set", "model.lora.peft-lora-r=0"], "model.lora.peft-lora-r: rank must be >= 1"),
        (["--set", "strategy.clients-per-round=30"], "30 clients per round but only 20 clients"),
        (["--set", "train.batch-size=big"], "expected an integer, got 'big'"),
        (["--set", "model.lora.rank=8"], "unknown config key 'model.lora.rank'"),
        (["--set", "novalue"], "--set expects key=value"),
        (
            ["--set", "model.name=/nonexistent/model"],
            "model.name: the path '/nonexistent/model' does not exist",
        ),
        (["--set", "model.name=embedded:gpt-5"], "unknown embedded model"),
        (["--set", "model.quantization=4"], "model.quantization=4 needs a CUDA GPU"),
        (
            ["--set", "data.name=/nonexistent/rows.jsonl"],
            "the file '/nonexistent/rows.jsonl' does not exist",
        ),
        (
            ["--config", "/nonexistent/preset.toml"],
            "config file '/nonexistent/preset.toml' does not exist",
        ),
    ],
)
def test_bad_input_fails_before_anything_is_written(capsys, output_dir, args, message):
    code, err = run_cli(capsys, output_dir, *args)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("fedtune run: error: ") and message in err[0]
    assert not output_dir.exists()


def test_malformed_rows_are_named(capsys, output_dir, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n{broken\n")
    code, err = run_cli(capsys, output_dir, "--set", f"data.name={rows}")
    assert code == 2 and "rows.jsonl: line 2 is not valid JSON" in err[0]
    assert not output_dir.exists()


def test_too_small_data_for_the_clients(capsys, output_dir, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n" for i in range(5))
    )
    code, err = run_cli(capsys, output_dir, "--set", f"data.name={rows}")
    assert code == 2 and "20 clients but only 5 rows" in err[0]


def test_existing_run_directory_is_not_overwritten(capsys, output_dir, tiny_model_dir):
    (output_dir / "taken").mkdir(parents=True)
    (output_dir / "taken" / "keep.txt").write_text("precious")
    # A local model: with the embedded one, a fresh machine would first convert it (~25 s).
    capsys.readouterr()  # what building the tiny model printed
    code, err = run_cli(
        capsys, output_dir, "--set", "run.name=taken", "--set", f"model.name={tiny_model_dir}"
    )
    assert code == 2 and "already exists" in err[0]
    assert (output_dir / "taken" / "keep.txt").read_text() == "precious"


def test_list_keys_documents_every_key(capsys):
    assert main(["run", "--list-keys"]) == 0
    out = capsys.readouterr().out
    assert "model.lora.peft-lora-r = 8" in out and "train.training-arguments.max-steps" in out

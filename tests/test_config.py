"""The run configuration: defaults, template keys, presets and the errors of bad values."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedtune.config import (
    ConfigError,
    app_config_table,
    build_config,
    defaults,
    describe_keys,
    flatten,
    load_config_file,
    parse_assignment,
    parse_cli_value,
)

ROOT = Path(__file__).resolve().parents[1]


def test_the_flower_app_config_is_generated_from_the_keys():
    text = (ROOT / "pyproject.toml").read_text()
    assert app_config_table() in text, (
        "pyproject.toml's [tool.flwr.app.config] is stale: replace it with "
        "python -c 'from fedtune.config import app_config_table as t; print(t())'"
    )
    tree = tomllib.loads(text)
    assert flatten(tree["tool"]["flwr"]["app"]["config"]) == defaults()


def test_every_key_is_documented():
    keys = list(describe_keys())
    assert {key for key, _, _ in keys} == set(defaults())
    assert all(doc for _, doc, _ in keys)


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_preset_parses_and_validates(preset):
    config = build_config(load_config_file(preset))
    assert config.federation.num_clients == 20


def test_baseline_preset_is_the_challenge_setup():
    config = build_config(load_config_file(ROOT / "configs" / "flowertune-baseline.toml"))
    assert config.model.quantization == 4
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (32, 64, 0.075)
    assert config.federation.num_rounds == 200 and config.sampled_clients == 2
    assert (config.train.local_steps, config.train.batch_size, config.train.seq_length) == (
        10,
        16,
        512,
    )
    assert (config.train.learning_rate_max, config.train.learning_rate_min) == (5e-5, 1e-6)
    assert config.data.heldout_examples == 0  # every row to the clients, as on the board


def test_template_keys_and_fedtune_aliases_mean_the_same():
    template = build_config(
        {
            "model.lora.peft-lora-r": 16,
            "train.training-arguments.per-device-train-batch-size": 8,
            "train.training-arguments.max-steps": 7,
            "train.save-every-round": 3,
            "static.dataset.name": "flwrlabs/alpaca-gpt4",
        }
    )
    short = build_config(
        {
            "model.lora.r": 16,
            "train.batch-size": 8,
            "train.local-steps": 7,
            "run.checkpoint-every": 3,
            "data.name": "flwrlabs/alpaca-gpt4",
        }
    )
    assert template == short
    assert template.lora.r == 16 and template.train.batch_size == 8


def test_inert_template_keys_warn_and_change_nothing():
    warnings: list[str] = []
    config = build_config(
        {"strategy.fraction-evaluate": 0.5, "train.training-arguments.num-train-epochs": 3},
        warn=warnings.append,
    )
    assert config == build_config()
    assert len(warnings) == 2 and "no effect" in warnings[0]


def test_later_sources_win():
    config = build_config({"num-server-rounds": 4}, {"num-server-rounds": 9})
    assert config.federation.num_rounds == 9


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"num-server-round": 3},
            "unknown config key 'num-server-round' (did you mean 'num-server-rounds'?)",
        ),
        ({"num-server-rounds": 0}, "num-server-rounds: must be >= 1, got 0"),
        ({"num-server-rounds": "ten"}, "num-server-rounds: expected an integer, got 'ten'"),
        ({"num-server-rounds": 2.5}, "num-server-rounds: expected an integer, got 2.5"),
        ({"model.lora.peft-lora-r": 0}, "model.lora.peft-lora-r: rank must be >= 1, got 0"),
        ({"model.lora.use-dora": "yes"}, "model.lora.use-dora: expected true or false, got 'yes'"),
        (
            {"strategy.clients-per-round": 21, "federation.num-clients": 20},
            "21 clients per round but only 20 clients",
        ),
        ({"strategy.fraction-train": 0.0}, "strategy.fraction-train: must be in (0, 1], got 0.0"),
        ({"model.quantization": 3}, "model.quantization: must be 0, 4 or 8, got 3"),
        ({"data.partitioner": "random"}, "data.partitioner: must be one of"),
        ({"data.partitioner": "dirichlet"}, "data.partition-by: dirichlet needs a label column"),
        (
            {"train.learning-rate-min": 1.0},
            "train.learning-rate-min: must be in [0, train.learning-rate-max]",
        ),
        ({"model.lora.target-modules": "q_proj, 1x"}, "not module names: ['1x']"),
        ({"train.training-arguments.lr-scheduler-type": "cosine"}, "only 'constant' is supported"),
        ({"run.name": "../escape"}, "run.name: may hold letters"),
        ({"train.seq-length": 4}, "train.seq-length: must be >= 16, got 4"),
        ({"model.quantization": False}, "model.quantization: expected an integer, got False"),
        ({"dp.delta": True}, "dp.delta: expected a number, got True"),
        ({"data.name": ""}, "data.name: must not be empty"),
        (
            {"data.partitioner": "dirichet"},
            "got 'dirichet' (did you mean 'dirichlet'?)",
        ),
        ({"strategy.name": "fedadm"}, "got 'fedadm' (did you mean 'fedadam'?)"),
        ({"model.lora.client-ranks": "4,x"}, "model.lora.client-ranks: 'x' is not an integer"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        build_config(overrides)
    assert message in str(error.value)


def test_clients_per_round_from_fraction_or_count():
    assert build_config({"federation.num-clients": 20}).sampled_clients == 2
    # 0 (the default): the federation's count, so a fraction is known only once it is.
    assert build_config().federation.auto_clients
    assert build_config({"strategy.clients-per-round": 4}).sampled_clients == 4
    assert build_config({"federation.num-clients": 30}).sampled_clients == 3
    assert build_config({"strategy.clients-per-round": 5}).sampled_clients == 5


def test_cli_values_are_toml_values():
    assert parse_cli_value("3") == 3 and parse_cli_value("2e-4") == 2e-4
    assert parse_cli_value("true") is True and parse_cli_value('"x"') == "x"
    assert parse_cli_value("q_proj,v_proj") == "q_proj,v_proj"
    assert parse_assignment("model.name = embedded:x") == ("model.name", "embedded:x")
    with pytest.raises(ConfigError, match="key=value"):
        parse_assignment("novalue")


def test_config_file_accepts_pyproject_shape(tmp_path):
    path = tmp_path / "pyproject.toml"
    path.write_text("[tool.flwr.app.config]\nnum-server-rounds = 7\nmodel.lora.peft-lora-r = 4\n")
    assert load_config_file(path) == {"num-server-rounds": 7, "model.lora.peft-lora-r": 4}
    bad = tmp_path / "bad.toml"
    bad.write_text("num-server-rounds = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config_file(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.toml")


def test_digest_identifies_a_setup():
    flat = build_config().to_flat()
    # The same setup in another key order (a TOML file written by hand) is the same digest.
    assert build_config(dict(reversed(list(flat.items())))).digest() == build_config().digest()
    assert build_config().digest() != build_config({"model.lora.peft-lora-r": 4}).digest()


def test_the_configuration_reference_is_generated_from_the_keys():
    from fedtune.config import configuration_reference, describe_keys

    text = (ROOT / "docs" / "configuration.md").read_text()
    assert text == configuration_reference(), (
        "docs/configuration.md is stale: regenerate it with "
        "python -c 'from fedtune.config import configuration_reference as r; "
        'open("docs/configuration.md", "w").write(r())\''
    )
    assert all(f"| `{key}` |" in text for key, _, _ in describe_keys())


def test_a_whole_number_written_as_a_float_is_the_integer():
    config = build_config({"num-server-rounds": 4.0, "model.quantization": 0.0})
    assert config.federation.num_rounds == 4 and type(config.federation.num_rounds) is int
    assert config.digest() == build_config({"num-server-rounds": 4}).digest()
    # and an integer given for a number is stored as the number (the digest is of the values)
    assert (
        type(build_config({"dp.delta": 1e-5, "train.weight-decay": 0}).train.weight_decay) is float
    )

"""A strategy or an adapter variant is one module: declared and registered here, in the test, the
configuration accepts and checks its keys, documents them, refuses them under another choice, and
the ServerApp's builder and the adapter code use it, with no other file changed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from fedtune.config import (
    STRATEGIES,
    ConfigError,
    RunConfig,
    Section,
    build_config,
    configuration_reference,
    describe_keys,
    setting,
)
from fedtune.federation.messages import ARRAYS, WEIGHT_KEY
from fedtune.federation.strategies import Strategy, build_strategy, register_strategy
from fedtune.model.adapters import attach_adapter, prepare_adapter, to_peft, travelling_keys
from fedtune.model.variants import ADAPTER_VARIANTS, AdapterVariant, register_variant

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("task_identity")]


# ---- the whole of a new strategy: its settings, how it is built, what it checks ---------------


class DampedSettings(Section):
    step: float = setting(
        "strategy.damped.step",
        0.5,
        "Damped: the fraction of the way from the global adapter to the clients' mean.",
        gt=0,
        le=1,
    )


class Damped(Strategy):
    name = "damped"
    section = DampedSettings

    def build(self, config: RunConfig, common: dict[str, Any], initial: Mapping[str, Any]) -> Any:
        from flwr.app import Array, ArrayRecord
        from flwr.serverapp.strategy import FedAvg

        step = config.params(DampedSettings).step

        class DampedFedAvg(FedAvg):
            def configure_train(self, server_round, arrays, config, grid):
                self.sent = {k: a.numpy() for k, a in arrays.items()}
                return super().configure_train(server_round, arrays, config, grid)

            def aggregate_train(self, server_round, replies):
                mean, metrics = super().aggregate_train(server_round, replies)
                moved = {
                    k: Array((x + step * (mean[k].numpy() - x)).astype(np.float32))
                    for k, x in self.sent.items()
                }
                return ArrayRecord(moved), metrics

        return DampedFedAvg(**common)

    def check(self, config: RunConfig) -> None:
        super().check(config)
        if config.strategy.min_clients < 2:
            raise ConfigError("strategy.min-clients: damped needs at least 2 replies a round")


@pytest.fixture
def damped():
    register_strategy(Damped())
    yield
    STRATEGIES.unregister("damped")


def test_a_strategy_registered_from_its_own_module_is_configured_documented_and_checked(damped):
    config = build_config(
        {"strategy.name": "damped", "strategy.damped.step": 0.25, "strategy.min-clients": 2}
    )
    assert config.params(DampedSettings).step == 0.25
    assert config.to_flat()["strategy.damped.step"] == 0.25
    assert ("strategy.damped.step", DampedSettings.model_fields["step"].description, 0.5) in list(
        describe_keys()
    )
    assert "| `strategy.damped.step` | `0.5` |" in configuration_reference()
    with pytest.raises(ConfigError, match=r"strategy.damped.step: must be in \(0, 1\], got 0"):
        build_config({"strategy.name": "damped", "strategy.damped.step": 0})
    with pytest.raises(ConfigError, match="damped needs at least 2 replies"):
        build_config({"strategy.name": "damped"})
    with pytest.raises(ConfigError, match="applies to strategy.name=damped, not fedavg"):
        build_config({"strategy.damped.step": 0.25})
    with pytest.raises(ConfigError, match=r"must be one of fedavg, .*, flexlora, damped"):
        build_config({"strategy.name": "dampened"})


def test_the_registered_strategy_is_what_the_server_builds_and_runs(damped):
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    config = build_config(
        {"strategy.name": "damped", "strategy.damped.step": 0.25, "strategy.min-clients": 2}
    )
    strategy = build_strategy(config)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    clients, weights = [x + 4.0, x - 2.0], [1, 3]

    class Grid:
        def get_node_ids(self):
            return [1, 2]

    strategy.configure_train(1, ArrayRecord({"w": Array(x)}), ConfigRecord(), Grid())
    replies = [
        Message(
            content=RecordDict(
                {
                    ARRAYS: ArrayRecord({"w": Array(c)}),
                    "metrics": MetricRecord({WEIGHT_KEY: w}),
                }
            ),
            dst_node_id=1,
            message_type="train",
        )
        for c, w in zip(clients, weights, strict=True)
    ]
    result, _ = strategy.aggregate_train(1, replies)
    mean = (clients[0] * 1 + clients[1] * 3) / 4
    np.testing.assert_allclose(result["w"].numpy(), x + 0.25 * (mean - x), rtol=1e-6)


def test_an_unregistered_strategy_and_its_keys_are_unknown_again():
    register_strategy(Damped())
    STRATEGIES.unregister("damped")
    with pytest.raises(ConfigError, match="unknown config key 'strategy.damped.step'"):
        build_config({"strategy.damped.step": 0.25})
    with pytest.raises(ValueError, match="registered already"):
        register_strategy(STRATEGIES.get("fedavg"))  # type: ignore[arg-type]


# ---- the whole of a new adapter variant -----------------------------------------------------


class FirstLayerSettings(Section):
    layer: int = setting(
        "model.lora.first-layer.index", 0, "first-layer: the layer whose adapter trains.", ge=0
    )


class FirstLayer(AdapterVariant):
    """Only one layer's adapter trains and travels; the others keep their initial values."""

    name = "first-layer"
    label = "LoRA (one layer)"
    section = FirstLayerSettings

    def travelling(self, keys):
        return [k for k in keys if ".layers.0." in k]

    def freeze(self, model) -> None:
        for name, parameter in model.named_parameters():
            if "lora_" in name and ".layers.0." not in name:
                parameter.requires_grad_(False)

    def to_peft(self, state):
        return {k: v for k, v in state.items()}

    def check(self, config: RunConfig) -> None:
        if config.lora.use_dora:
            raise ConfigError("model.lora.variant: first-layer does not combine with DoRA")


@pytest.fixture
def first_layer():
    register_variant(FirstLayer())
    yield
    ADAPTER_VARIANTS.unregister("first-layer")


def test_a_variant_registered_from_its_own_module_trains_and_travels_its_part(
    first_layer, tiny_llama
):
    config = build_config({"model.lora.variant": "first-layer"})
    assert config.params(FirstLayerSettings).layer == 0
    with pytest.raises(ConfigError, match="first-layer does not combine with DoRA"):
        build_config({"model.lora.variant": "first-layer", "model.lora.use-dora": True})
    with pytest.raises(ConfigError, match=r"must be one of lora, ffa, sb, first-layer"):
        build_config({"model.lora.variant": "first"})
    model = prepare_adapter(tiny_llama(), config.lora, config.train.seed)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".layers.0." in n for n in trained)
    keys = [n for n, _ in model.named_parameters() if "lora_" in n]
    travelling = travelling_keys("first-layer", keys)
    assert travelling and set(travelling) < set(keys)
    assert all(".layers.0." in k for k in travelling)
    assert to_peft({"a": 1}, "first-layer") == {"a": 1}
    plain = attach_adapter(tiny_llama(), build_config().lora, 0)
    assert all(p.requires_grad for n, p in plain.named_parameters() if "lora_" in n)

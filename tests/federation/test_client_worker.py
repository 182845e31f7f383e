"""A client keeps its base model and tokenized partition between rounds."""

from __future__ import annotations

from fedtune.config import build_config
from fedtune.federation import client_app


def test_worker_is_reused_until_the_model_setup_changes(tiny_model_dir):
    client_app._WORKER.clear()
    config = build_config({"model.name": str(tiny_model_dir), "train.seq-length": 128})
    first = client_app.get_worker(config)
    # A new round with the same setup (another learning rate, say) keeps the loaded model.
    again = client_app.get_worker(
        build_config({**config.to_flat(), "train.learning-rate-max": 1e-3})
    )
    assert again is first
    other = client_app.get_worker(build_config({**config.to_flat(), "model.lora.peft-lora-r": 4}))
    assert other is not first
    client_app._WORKER.clear()


def test_partition_is_tokenized_once(tiny_model_dir):
    client_app._WORKER.clear()
    config = build_config({"model.name": str(tiny_model_dir), "train.seq-length": 128})
    worker = client_app.get_worker(config)
    examples, counts = client_app.get_partition(worker, config, 3, 20)
    assert client_app.get_partition(worker, config, 3, 20)[0] is examples
    assert counts["partition-rows"] == 40 and counts["skipped-rows"] == 0  # 799 rows / 20
    assert counts["truncated"] + len(examples) >= 40 - counts["dropped-no-response"]
    assert all(e.num_tokens <= 128 for e in examples)
    client_app._WORKER.clear()

"""What `--adapter` points at: a PEFT adapter folder or a fedtune run directory; loading it
strictly.

A run directory holds `config.json` (`{"config": {"model.name": …}, "digest": …}`) and the final
adapter in `adapter/`; its base model is the run's `model.name` unless `--model` says otherwise.
PEFT's loader is non-strict (missing tensors keep their initial values), so after loading, the
adapter file's tensor names and shapes are compared with what the wrapped model expects, and any
difference is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.provenance import file_sha256
from fedtune.rundir import ADAPTER_DIR, CONFIG_FILE, RunDirError, read_run_config

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterError(ValueError):
    """An adapter path that is not an adapter, or an adapter that does not fit the model."""


@dataclass(frozen=True)
class AdapterSource:
    """A resolved `--adapter`.

    Attributes:
        path: the PEFT adapter folder.
        run_dir: the run directory it belongs to (None for a bare adapter folder).
        run_model: the run's `model.name` (None for a bare adapter folder).
        sha256: hash of the adapter weights file.
    """

    path: Path
    run_dir: Path | None
    run_model: str | None
    sha256: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready description for result files."""
        return {
            "path": str(self.path),
            "run_dir": str(self.run_dir) if self.run_dir else None,
            "sha256": self.sha256,
        }


def resolve_adapter(path: str | Path) -> AdapterSource:
    """Classify `--adapter` without loading anything.

    Raises:
        AdapterError: the path is neither a PEFT adapter folder nor a run directory with `adapter/`.
    """
    root = Path(path).expanduser().resolve()
    run_dir: Path | None = None
    run_model: str | None = None
    adapter = root
    if (root / ADAPTER_DIR / ADAPTER_CONFIG).is_file():
        run_dir, adapter = root, root / ADAPTER_DIR
        if (root / CONFIG_FILE).is_file():
            try:
                run_model = str(read_run_config(root)[0]["model.name"])
            except (RunDirError, KeyError) as exc:
                raise AdapterError(f"--adapter: {root} is not a fedtune run ({exc})") from exc
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise AdapterError(
            f"--adapter: {path} is neither a PEFT adapter folder ({ADAPTER_CONFIG}) "
            "nor a run directory with adapter/"
        )
    weights = adapter / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise AdapterError(f"--adapter: {adapter} has no {ADAPTER_WEIGHTS}")
    return AdapterSource(adapter, run_dir, run_model, file_sha256(weights))


def apply_adapter(model: Any, adapter: AdapterSource) -> Any:
    """Wrap a loaded base model with the adapter, for inference, and check it loaded completely.

    Returns:
        The PeftModel in eval mode.

    Raises:
        AdapterError: PEFT refuses it (target modules absent, shapes differ) or tensors are
            missing/unexpected.
    """
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors import safe_open

    try:
        wrapped = PeftModel.from_pretrained(model, str(adapter.path), is_trainable=False)
    except (ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AdapterError(f"--adapter: {adapter.path} does not fit the model: {first}") from exc
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(wrapped).items()}
    with safe_open(str(adapter.path / ADAPTER_WEIGHTS), framework="pt") as handle:
        stored = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    wrong = sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])
    if missing or unexpected or wrong:
        detail = (missing and f"missing {missing[0]}") or (
            unexpected and f"unexpected {unexpected[0]}"
        )
        detail = detail or f"shape of {wrong[0]}"
        raise AdapterError(f"--adapter: {adapter.path} does not fit the model ({detail})")
    wrapped.eval()
    return wrapped

"""What an adapter variant is to fedtune: which adapter tensors train and travel, how the adapter
is initialised and frozen, how it is saved for PEFT, what it checks.

A variant is one module: an `AdapterVariant` subclass (with its own `Section` of keys, or none)
and `register_variant(...)` at import. `fedtune.model.variants` imports fedtune's own (lora, ffa,
sb); another package's are found through the `fedtune.extensions` entry points.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, cast

from fedtune.config import ADAPTER_VARIANTS, RunConfig, Section

if TYPE_CHECKING:
    from peft import PeftModel


class AdapterVariant:
    """Plain LoRA's behaviour; a variant overrides what it changes."""

    name: ClassVar[str]
    # How the leaderboard and reports name the adapter.
    label: ClassVar[str]
    section: ClassVar[type[Section] | None] = None

    def travelling(self, keys: Iterable[str]) -> list[str]:
        """The adapter tensors that train, travel and are aggregated, in the adapter's order."""
        return list(keys)

    def init_examples(self, config: RunConfig) -> int:
        """How many public examples `initialise` needs (0: none)."""
        return 0

    def initialise(self, model: PeftModel, examples: list[Any], pad_id: int) -> None:
        """Set the freshly attached adapter up (after its seeded LoRA initialisation)."""

    def freeze(self, model: PeftModel) -> None:
        """Stop the tensors that keep their values from training."""

    def to_peft(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """The adapter as PEFT saves and loads it."""
        return dict(state)

    def check(self, config: RunConfig) -> None:
        """Raise ConfigError for a configuration this variant cannot run."""


def freeze_a_factors(model: PeftModel) -> None:
    """The A factors keep their values (no gradient, no update)."""
    for name, parameter in model.named_parameters():
        if ".lora_A." in name:
            parameter.requires_grad_(False)


def register_variant(variant: AdapterVariant) -> AdapterVariant:
    """Make `variant` selectable as `model.lora.variant`, its section's keys part of the config."""
    ADAPTER_VARIANTS.register(variant)
    return variant


def get_variant(name: str) -> AdapterVariant:
    """The registered variant called `name` (ConfigError naming the others if none)."""
    return cast(AdapterVariant, ADAPTER_VARIANTS.get(name))


def variant_label(name: str) -> str:
    """How a variant is named on the board; an unknown (unregistered) one by its own name."""
    return get_variant(name).label if name in ADAPTER_VARIANTS else name

"""FFA-LoRA: A stays at its seeded initial value on every node; only B trains, travels and is
aggregated (so averaging the B factors averages the updates exactly)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from fedtune.model.variants.base import AdapterVariant, freeze_a_factors, register_variant

if TYPE_CHECKING:
    from peft import PeftModel


class FfaVariant(AdapterVariant):
    name = "ffa"
    label = "FFA-LoRA"

    def travelling(self, keys: Iterable[str]) -> list[str]:
        return [k for k in keys if ".lora_A." not in k]

    def freeze(self, model: PeftModel) -> None:
        freeze_a_factors(model)


register_variant(FfaVariant())

"""LoRA: A and B train, travel and are aggregated."""

from __future__ import annotations

from fedtune.model.variants.base import AdapterVariant, register_variant


class LoraVariant(AdapterVariant):
    name = "lora"
    label = "LoRA"


register_variant(LoraVariant())

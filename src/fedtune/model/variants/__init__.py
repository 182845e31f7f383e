"""Adapter variants, one module each, registered by name (`model.lora.variant`).

`base.py` says what a variant is (`AdapterVariant`, `register_variant`); `lora.py` is plain LoRA,
`ffa.py` FFA-LoRA, `sb.py` the r×r adapter of LoRA-SB/Fed-SB. Importing this package registers
them in this order.
"""

import importlib

from fedtune.config import ADAPTER_VARIANTS
from fedtune.model.variants.base import (
    AdapterVariant,
    get_variant,
    register_variant,
    variant_label,
)

__all__ = ["ADAPTER_VARIANTS", "AdapterVariant", "get_variant", "register_variant", "variant_label"]

# fedtune's own, in the order errors and docs list them; each module registers itself.
BUILTIN = ("lora", "ffa", "sb")
for _module in BUILTIN:
    importlib.import_module(f"{__name__}.{_module}")

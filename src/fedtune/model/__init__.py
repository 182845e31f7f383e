"""The base model and its adapters: loading a hub model, a local directory or the embedded SmolLM2
GGUF; building, extracting, checking and loading LoRA/DoRA adapters, including the r×r adapter
(`model.lora.variant=sb`).

Public API:

- adapters: PEFT LoRA/DoRA adapters, built, extracted and loaded with explicit checks
  - AdapterMismatch: adapter tensors that do not fit the model
  - adapter_state: a CPU copy of the adapter tensors
  - attach_adapter: wraps the frozen base model with a fresh, seeded adapter
  - check_state: refuses received tensors whose keys, shapes or dtypes differ
  - count_parameters: the number of parameters in an adapter state
  - frozen_digest: sha256 over the adapter tensors that do not travel
  - load_adapter_state: checks, then copies received tensors into the model
  - parameter_names: saved-checkpoint keys to the model's parameter names
  - peft_config: the peft.LoraConfig for fedtune's LoRA settings
  - prepare_adapter: the adapter a variant trains, attached and initialised
  - state_spec: key to shape and dtype name of each tensor
  - to_peft: the adapter as PEFT saves and loads it
  - travelling_keys: the adapter tensors that train, travel and are aggregated
  - use_rank: makes the adapter of a given rank the one that trains
- loading: base model loading
  - ModelError: a model that cannot be found, converted or loaded as configured
  - check_hub_model: fails fast when a hub model is neither cached nor reachable
  - check_quantization: refuses 4/8-bit loading without a CUDA GPU
  - ensure_embedded_cache: converts the embedded GGUF once; the cache directory
  - load_model: the frozen base causal LM
  - load_tokenizer: the model's tokenizer
  - local_path: the directory or hub id `from_pretrained` reads
  - pick_device: `cuda` when available, else `cpu`
  - resolve_model: classifies `model.name` and checks what can be checked offline
- variants: adapter variants (lora, ffa, sb), one module each, registered by name
  - ADAPTER_VARIANTS: the registry `model.lora.variant` selects from
  - AdapterVariant: what a variant is (travelling tensors, set-up, freezing, PEFT form)
  - get_variant: the registered variant of a name
  - register_variant: makes a variant selectable
  - variant_label: how the board names a variant
"""

__all__: list[str] = ["adapters", "loading", "variants"]

"""Models: megatron-core GPTModel from Hugging Face configs, and the HF <-> Megatron weight mapping."""
from megatron_simko.models.gpt import (
    ModelArch,
    arch_from_hf_config,
    build_gpt_model,
    load_hf_config,
    padded_vocab_size,
    transformer_config,
    validate_parallelism,
)

__all__ = [
    "ModelArch",
    "arch_from_hf_config",
    "build_gpt_model",
    "load_hf_config",
    "padded_vocab_size",
    "transformer_config",
    "validate_parallelism",
]

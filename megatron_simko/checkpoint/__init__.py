"""Checkpoints: the native Megatron format the trainer loads, and HF <-> Megatron conversion (+ verifier).

    convert.hf_to_megatron(hf_dir, out_dir, tp, pp)      HF safetensors -> native checkpoint (streamed)
    convert.megatron_to_hf(meg_dir, out_dir)             native checkpoint -> HF directory
    native.load_into_model(model_chunk, meg_dir, ...)    native checkpoint (any TP/PP) -> a live model chunk
    native.load_hf_into_model(model_chunk, hf_dir, ...)  HF safetensors -> a live model chunk (sliced reads)
    verify.verify(hf_dir, tp, pp)                        bitwise round trip + logits parity with transformers
Names, layouts and TP splitting come from ``megatron_simko.models.hf_mapping``.
"""
from megatron_simko.checkpoint.native import (
    META_NAME,
    CheckpointMeta,
    NativeCheckpoint,
    load_hf_into_model,
    load_into_model,
    read_meta,
)
from megatron_simko.checkpoint.safetensors_io import CheckpointError

__all__ = [
    "META_NAME",
    "CheckpointError",
    "CheckpointMeta",
    "NativeCheckpoint",
    "load_hf_into_model",
    "load_into_model",
    "read_meta",
]

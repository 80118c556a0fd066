"""The one place a rollout backend is chosen (``rollout.backend``): vLLM (default) or transformers."""
from __future__ import annotations

from typing import Optional

import torch

from megatron_simko.rollout.base import RolloutEngine

BACKENDS = ("vllm", "transformers")


def build_engine(backend: str, model_dir: str, *, dtype: torch.dtype, device: torch.device, seed: int,
                 max_model_len: Optional[int] = None, tensor_parallel: Optional[int] = None,
                 gpu_memory_utilization: float = 0.5, cpu_kv_cache_gib: int = 1, max_batch_rows: int = 256,
                 kv_budget_gib: Optional[float] = None) -> RolloutEngine:
    """This rank's rollout engine, holding ``model_dir``'s weights in ``dtype`` (the trainer's).

    vllm: one vLLM worker per rank (``tensor_parallel`` consecutive ranks per replica; None = the trainer's
    TP), GPU memory bounded by ``gpu_memory_utilization``, ``cpu_kv_cache_gib`` on CPU. transformers: a full
    Hugging Face model on ``device`` (the trainer's device), TP 1. Call on every rank (collective for vLLM).
    """
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    if backend == "vllm":
        from megatron_simko.rollout.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine

        return VLLMRolloutEngine(VLLMEngineConfig(
            model_dir=model_dir, tensor_parallel=tensor_parallel, dtype=dtype_name,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
            cpu_kv_cache_gib=cpu_kv_cache_gib, seed=seed))
    if backend == "transformers":
        from megatron_simko.rollout.transformers_engine import TransformersEngineConfig, TransformersRolloutEngine

        if tensor_parallel not in (None, 1):
            raise ValueError(f"the transformers backend runs at tensor_parallel 1, got {tensor_parallel}")
        return TransformersRolloutEngine(TransformersEngineConfig(
            model_dir=model_dir, dtype=dtype_name, device=str(device), max_model_len=max_model_len,
            max_batch_rows=max_batch_rows, kv_budget_gib=kv_budget_gib))
    raise ValueError(f"unknown rollout backend {backend!r}; choose one of {', '.join(BACKENDS)}")

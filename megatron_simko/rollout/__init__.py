"""Rollouts: the engine interface, the vLLM and transformers backends, Megatron -> engine weight sync,
trainer/engine consistency, stop tokens.

    from megatron_simko.rollout import SamplingConfig, build_engine
    engine = build_engine("vllm" | "transformers", model_dir, dtype=..., device=..., seed=...)   # every rank
    results = generate_global(engine, prompts, n, SamplingConfig(...), RolloutLayout.current(engine.tensor_parallel))
    MegatronToEngineSync(model_chunks, arch, engine).sync()                 # after each optimizer step

vLLM and transformers are imported lazily (inside the engines), so importing this package requires neither.
"""
from megatron_simko.rollout.base import (
    RolloutEngine,
    RolloutResult,
    RolloutSample,
    SamplingConfig,
    request_seed,
)
from megatron_simko.rollout.consistency import logprob_mismatch, truncated_importance_weights
from megatron_simko.rollout.engines import BACKENDS, build_engine
from megatron_simko.rollout.sharding import RolloutLayout, dp_share, generate_global, shard_bounds
from megatron_simko.rollout.stop_tokens import model_eos_token_ids, stop_token_ids
from megatron_simko.rollout.transformers_engine import TransformersEngineConfig, TransformersRolloutEngine
from megatron_simko.rollout.vllm_engine import (
    CPU_SUPPORTED_HEAD_SIZES,
    EngineBuildError,
    VLLMEngineConfig,
    VLLMRolloutEngine,
)
from megatron_simko.rollout.weight_sync import (
    MegatronToEngineSync,
    MegatronToVLLMSync,
    SyncReport,
    WeightSyncConfig,
    WeightSyncError,
    tensor_checksum,
)

__all__ = [
    "BACKENDS",
    "CPU_SUPPORTED_HEAD_SIZES",
    "EngineBuildError",
    "MegatronToEngineSync",
    "MegatronToVLLMSync",
    "RolloutEngine",
    "RolloutLayout",
    "RolloutResult",
    "RolloutSample",
    "SamplingConfig",
    "SyncReport",
    "TransformersEngineConfig",
    "TransformersRolloutEngine",
    "VLLMEngineConfig",
    "VLLMRolloutEngine",
    "WeightSyncConfig",
    "WeightSyncError",
    "build_engine",
    "dp_share",
    "generate_global",
    "logprob_mismatch",
    "model_eos_token_ids",
    "request_seed",
    "shard_bounds",
    "stop_token_ids",
    "tensor_checksum",
    "truncated_importance_weights",
]

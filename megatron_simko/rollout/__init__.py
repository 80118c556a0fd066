"""Rollouts: the engine interface, the vLLM backend, Megatron -> vLLM weight sync, trainer/engine consistency.

    from megatron_simko.rollout import SamplingConfig, VLLMEngineConfig, VLLMRolloutEngine
    engine = VLLMRolloutEngine(VLLMEngineConfig(model_dir=...))            # on every rank
    results = generate_global(engine, prompts, n, SamplingConfig(...), RolloutLayout.current(engine.tensor_parallel))
    MegatronToVLLMSync(model_chunks, arch, engine).sync()                   # after each optimizer step

vLLM is imported lazily (inside the engine), so importing this package does not require it.
"""
from megatron_simko.rollout.base import (
    RolloutEngine,
    RolloutResult,
    RolloutSample,
    SamplingConfig,
    request_seed,
)
from megatron_simko.rollout.consistency import (
    RolloutTensors,
    logprob_mismatch,
    pack_rollouts,
    truncated_importance_weights,
)
from megatron_simko.rollout.sharding import RolloutLayout, dp_share, generate_global, shard_bounds
from megatron_simko.rollout.vllm_engine import (
    CPU_SUPPORTED_HEAD_SIZES,
    EngineBuildError,
    VLLMEngineConfig,
    VLLMRolloutEngine,
)
from megatron_simko.rollout.weight_sync import (
    MegatronToVLLMSync,
    SyncReport,
    WeightSyncConfig,
    WeightSyncError,
    tensor_checksum,
)

__all__ = [
    "CPU_SUPPORTED_HEAD_SIZES",
    "EngineBuildError",
    "MegatronToVLLMSync",
    "RolloutEngine",
    "RolloutLayout",
    "RolloutResult",
    "RolloutSample",
    "RolloutTensors",
    "SamplingConfig",
    "SyncReport",
    "VLLMEngineConfig",
    "VLLMRolloutEngine",
    "WeightSyncConfig",
    "WeightSyncError",
    "dp_share",
    "generate_global",
    "logprob_mismatch",
    "pack_rollouts",
    "request_seed",
    "shard_bounds",
    "tensor_checksum",
    "truncated_importance_weights",
]

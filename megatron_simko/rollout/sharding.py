"""Prompts across rollout replicas, results back to everyone: deterministic, layout-independent.

Every torchrun rank hosts one vLLM worker (SPMD, see docs/rollout.md). Consecutive groups of
``rollout_tp`` ranks form one rollout replica (vLLM's ``external_launcher`` convention: replica = RANK // TP),
so ``world / rollout_tp`` replicas each generate a contiguous shard of the global prompt list. The shards are
then all-gathered so that every rank holds the whole global batch, ordered by global prompt index; the
trainer takes its data-parallel share with :func:`shard_bounds` again. Because each request is seeded from
its global prompt index (``base.request_seed``), the global batch is identical for any number of replicas.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch.distributed as dist

from megatron_simko.rollout.base import RolloutEngine, RolloutResult, SamplingConfig


def shard_bounds(num_items: int, rank: int, world: int) -> Tuple[int, int]:
    """[lo, hi) of a contiguous, balanced split: the first ``num_items % world`` ranks take one extra item."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    base, extra = divmod(num_items, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


@dataclass(frozen=True)
class RolloutLayout:
    """This rank's place among rollout replicas (``rollout_tp`` consecutive ranks per replica)."""

    world_size: int
    rank: int
    rollout_tp: int

    def __post_init__(self):
        if self.rollout_tp < 1 or self.world_size % self.rollout_tp:
            raise ValueError(f"rollout tensor_parallel={self.rollout_tp} must divide the world size {self.world_size}")

    @classmethod
    def current(cls, rollout_tp: int = 1) -> "RolloutLayout":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_world_size(), dist.get_rank(), rollout_tp)
        return cls(1, 0, rollout_tp)

    @property
    def replica(self) -> int:
        return self.rank // self.rollout_tp

    @property
    def num_replicas(self) -> int:
        return self.world_size // self.rollout_tp

    @property
    def is_replica_leader(self) -> bool:
        return self.rank % self.rollout_tp == 0


def generate_global(engine: RolloutEngine, prompts: Sequence[Sequence[int]], n: int, params: SamplingConfig,
                    layout: RolloutLayout, *, step: int = 0, group=None, prompt_offset: int = 0) -> List[RolloutResult]:
    """Generate the global prompt list across all replicas; every rank returns all results, in prompt order.

    ``prompts`` must be the same global list on every rank. Collective over ``group`` (default: the world).
    ``prompt_offset``: the global index of ``prompts[0]`` (seeding and ``prompt_index``; dynamic sampling's later
    rounds of a step continue the numbering, so no two requests of a step share a seed).
    """
    lo, hi = shard_bounds(len(prompts), layout.replica, layout.num_replicas)
    local = engine.generate(prompts[lo:hi], n, params, step=step, prompt_offset=prompt_offset + lo)
    if layout.world_size == 1:
        return local
    gathered: List[Optional[List[RolloutResult]]] = [None] * layout.world_size
    # Ranks of one replica hold identical results: only the replica leader contributes them.
    dist.all_gather_object(gathered, local if layout.is_replica_leader else None, group=group)
    results = sorted((r for part in gathered if part for r in part), key=lambda r: r.prompt_index)
    if [r.prompt_index for r in results] != list(range(prompt_offset, prompt_offset + len(prompts))):
        raise RuntimeError(f"rollout gather is incomplete: got prompt indices {[r.prompt_index for r in results]}, "
                           f"expected {prompt_offset}..{prompt_offset + len(prompts) - 1}")
    return results


def dp_share(results: Sequence[RolloutResult], dp_rank: int, dp_size: int) -> List[RolloutResult]:
    """The trainer's data-parallel share of the global results (whole prompt groups, contiguous)."""
    lo, hi = shard_bounds(len(results), dp_rank, dp_size)
    return list(results[lo:hi])

"""Rollouts + rewards → the trainer's batch: one row per sampled response, grouped by prompt.

    results (n samples per prompt) ──decode──► rewards R ──grpo_advantages──► A (per response)
                                   └─pack──► RLBatch(tokens = prompt ‖ response, loss_mask on the response,
                                                     rollout_logprob = the engine's log-probs, advantages = A)
Rows keep prompt order and sample order (prompt p, sample j → row p·n + j), so a GRPO group is n consecutive
rows. ``old_logprob`` is left at zero here: the trainer recomputes it with the current (pre-update) policy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch

from megatron_simko.advantages import grpo_advantages
from megatron_simko.rollout.base import RolloutResult
from megatron_simko.rollout.consistency import pack_rollouts
from megatron_simko.trainer.batch import RLBatch


@dataclass
class Experience:
    batch: RLBatch
    rewards: torch.Tensor  # [B] float, per response
    response_lengths: torch.Tensor  # [B] int64
    truncated: torch.Tensor  # [B] bool: stopped by max_tokens rather than EOS
    responses: List[str]  # decoded text, for logging samples


def build_experience(results: Sequence[RolloutResult], rewards: Sequence[float], responses: Sequence[str],
                     pad_id: int) -> Experience:
    """Pack this rank's rollouts (all n samples of each prompt) with their rewards into an RLBatch."""
    samples = [s for r in results for s in r.samples]
    if len(samples) != len(rewards) or len(samples) != len(responses):
        raise ValueError(f"{len(samples)} samples but {len(rewards)} rewards / {len(responses)} responses")
    n = {len(r.samples) for r in results}
    if len(n) != 1:
        raise ValueError(f"every prompt needs the same number of samples, got {sorted(n)}")
    packed = pack_rollouts(results, pad_id)  # rows: prompt p, sample j -> p·n + j
    if packed.tokens.shape[1] < 2:
        raise ValueError("prompt + response must hold at least 2 tokens")
    rewards_t = torch.as_tensor(list(rewards), dtype=torch.float32)
    batch = RLBatch(tokens=packed.tokens, loss_mask=packed.loss_mask,
                    old_logprob=torch.zeros(packed.tokens.shape), advantages=grpo_advantages(rewards_t, n.pop()),
                    rollout_logprob=packed.rollout_logprob, lengths=packed.lengths)
    return Experience(
        batch=batch,
        rewards=rewards_t,
        response_lengths=torch.as_tensor([s.length for s in samples], dtype=torch.int64),
        truncated=torch.as_tensor([s.finish_reason == "length" for s in samples], dtype=torch.bool),
        responses=list(responses),
    )


def rollout_metrics(rewards: torch.Tensor, lengths: torch.Tensor, truncated: torch.Tensor,
                    group_size: int) -> Dict[str, float]:
    """Reward and length statistics of a (global) set of rollouts, n = group_size consecutive per prompt."""
    correct = (rewards > 0.5).view(-1, group_size)
    return {
        "reward/mean": float(rewards.mean()),
        "train/pass@1": float(correct.float().mean()),
        f"train/pass@{group_size}": float(correct.any(dim=1).float().mean()),
        "train/all_correct_fraction": float(correct.all(dim=1).float().mean()),
        "response/length_mean": float(lengths.float().mean()),
        "response/length_max": float(lengths.max()),
        "response/truncated_fraction": float(truncated.float().mean()),
    }

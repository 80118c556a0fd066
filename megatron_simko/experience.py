"""Rollouts + rewards → the trainer's batch: one row per sampled response, grouped by prompt.

    results (n samples per prompt) ──decode──► rewards R ──grpo_advantages──► A (per response)
                                   └─pack──► RLBatch(tokens = prompt ‖ response, loss_mask on the response,
                                                     rollout_logprob = the engine's log-probs, advantages = A)
Rows keep prompt order and sample order (prompt p, sample j → row p·n + j), so a GRPO group is n consecutive
rows. ``old_logprob`` is left at zero here: the trainer recomputes it with the current (pre-update) policy.
The batch is packed on the CPU and moved to the trainer's device once, here (``parallel/devices.py``).
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Sequence

import torch

from megatron_simko.advantages import grpo_advantages, mixed_groups
from megatron_simko.rollout.base import RolloutResult
from megatron_simko.trainer.batch import RLBatch


class RolloutTensors(NamedTuple):
    tokens: torch.Tensor  # [B, S] int64, prompt + response, right-padded with pad_id
    loss_mask: torch.Tensor  # [B, S] bool, True on response tokens
    rollout_logprob: torch.Tensor  # [B, S] float32, the engine's log-prob at response positions, 0 elsewhere
    lengths: torch.Tensor  # [B] int64, prompt + response length
    prompt_index: torch.Tensor  # [B] int64, global prompt index of each row (GRPO groups)


def pack_rollouts(results: Sequence[RolloutResult], pad_id: int = 0) -> RolloutTensors:
    """One row per (prompt, sample), in order, as right-padded tensors aligned like ``RLBatch``."""
    rows = [(r.prompt_index, r.prompt_token_ids, s) for r in results for s in r.samples]
    if not rows:
        raise ValueError("no rollouts to pack")
    S = max(len(p) + len(s.token_ids) for _, p, s in rows)
    B = len(rows)
    tokens = torch.full((B, S), int(pad_id), dtype=torch.int64)
    mask = torch.zeros(B, S, dtype=torch.bool)
    logprob = torch.zeros(B, S, dtype=torch.float32)
    lengths = torch.zeros(B, dtype=torch.int64)
    index = torch.zeros(B, dtype=torch.int64)
    for b, (pi, prompt, s) in enumerate(rows):
        P, R = len(prompt), len(s.token_ids)
        tokens[b, :P] = torch.tensor(prompt, dtype=torch.int64)
        if R:
            tokens[b, P:P + R] = torch.tensor(s.token_ids, dtype=torch.int64)
            logprob[b, P:P + R] = torch.tensor(s.logprobs, dtype=torch.float32)
            mask[b, P:P + R] = True
        lengths[b] = P + R
        index[b] = pi
    return RolloutTensors(tokens, mask, logprob, lengths, index)


def build_experience(results: Sequence[RolloutResult], rewards: Sequence[float], pad_id: int,
                     device: Optional[torch.device] = None) -> RLBatch:
    """Pack this rank's rollouts (all n samples of each prompt, rewards in the same order) into an RLBatch on
    ``device`` (the trainer's; None: the CPU)."""
    num_samples = sum(len(r.samples) for r in results)
    if num_samples != len(rewards):
        raise ValueError(f"{num_samples} samples but {len(rewards)} rewards")
    n = {len(r.samples) for r in results}
    if len(n) != 1:
        raise ValueError(f"every prompt needs the same number of samples, got {sorted(n)}")
    packed = pack_rollouts(results, pad_id)  # rows: prompt p, sample j -> p·n + j
    if packed.tokens.shape[1] < 2:
        raise ValueError("prompt + response must hold at least 2 tokens")
    rewards_t = torch.as_tensor(list(rewards), dtype=torch.float32)
    batch = RLBatch(tokens=packed.tokens, loss_mask=packed.loss_mask, old_logprob=torch.zeros(packed.tokens.shape),
                    advantages=grpo_advantages(rewards_t, n.pop()), rollout_logprob=packed.rollout_logprob,
                    lengths=packed.lengths)
    return batch if device is None else batch.to(device)


def rollout_metrics(rewards: torch.Tensor, lengths: torch.Tensor, truncated: torch.Tensor,
                    group_size: int) -> Dict[str, float]:
    """Reward and length statistics of a (global) set of rollouts, n = group_size consecutive per prompt; also
    ``gated/mixed_group_fraction``, the fraction of GRPO groups whose rewards are not all equal (the groups with
    any advantage ≠ 0: the signal SimKO has left, beside ``metrics.gated_metrics``)."""
    correct = (rewards > 0.5).view(-1, group_size)
    return {
        "reward/mean": float(rewards.mean()),
        "train/pass@1": float(correct.float().mean()),
        f"train/pass@{group_size}": float(correct.any(dim=1).float().mean()),
        "train/all_correct_fraction": float(correct.all(dim=1).float().mean()),
        "gated/mixed_group_fraction": float(mixed_groups(rewards, group_size).float().mean()),
        "response/length_mean": float(lengths.float().mean()),
        "response/length_max": float(lengths.max()),
        "response/truncated_fraction": float(truncated.float().mean()),
    }

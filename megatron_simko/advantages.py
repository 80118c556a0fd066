"""GRPO group advantages (SIMKO_SPEC.md, Notation): A = (R − mean_group R) / (std_group R + 1e-6).

The std is the unbiased one (torch.std, correction=1), as in the reference GRPO implementations. A group of
one response has no spread: its advantage is 0. The advantage is per response and broadcast over its tokens
by the loss.
"""
from __future__ import annotations

import torch

GRPO_EPS = 1e-6


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = GRPO_EPS) -> torch.Tensor:
    """rewards [G·n] ordered group by group (n = group_size consecutive responses per prompt) → advantages [G·n]."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [num_responses], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.to(torch.float64).view(-1, group_size)  # (G, n)
    if group_size == 1:
        return torch.zeros_like(rewards, dtype=torch.float32)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True)  # unbiased
    return ((r - mean) / (std + eps)).view(-1).to(torch.float32)


def mixed_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[G] bool: whether each GRPO group (n = group_size consecutive rewards) has unequal rewards — the groups
    whose advantages are not all 0, i.e. the only ones that give the loss any signal."""
    r = rewards.view(-1, group_size)
    return r.amax(dim=1) != r.amin(dim=1)


def minibatches_with_signal(rewards: torch.Tensor, group_size: int, dp: int, mini_batch_size: int) -> list[bool]:
    """For each optimizer mini-batch of a step, whether any of its GRPO groups has unequal rewards — if none
    has, every advantage in it is 0: the loss and its gradient are 0, and an Adam step would still move the
    weights (momentum, weight decay) with no signal. Needs only the global rewards every rank holds.

    rewards [P·n]: the step's global batch, prompt by prompt. The trainer's mini-batch j is, on DP rank r, the
    prompts r·P/dp + j·m … + m − 1 with m = mini_batch_size / dp (DP ranks own contiguous prompt shares)."""
    if rewards.numel() % group_size or (rewards.numel() // group_size) % mini_batch_size or mini_batch_size % dp:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}, mini-batches of "
                         f"{mini_batch_size} prompts and {dp} data-parallel shares")
    varies = mixed_groups(rewards, group_size)  # [P]
    m = mini_batch_size // dp
    return varies.view(dp, -1, m).any(dim=2).any(dim=0).tolist()  # [dp, mini-batches, m] → per mini-batch

"""Token selection of KL-Cov and Clip-Cov ("The Entropy Mechanism of RL for Reasoning LMs", arXiv 2505.22617).

Both act on the tokens whose centred covariance between advantage and current log-probability is large:

    cov_t = (A_t − Ā) · (log π(y_t) − mean log π)      detached; Ā, mean log π over the population's valid tokens

    kl_cov:   the k = max(1, ⌊N · kl_cov_ratio⌋) tokens of largest cov_t (N = valid tokens of the population)
    clip_cov: the candidates are valid tokens that PPO does not clip already and have lb < cov_t < ub; a uniformly
              random max(1, ⌊N · clip_cov_ratio⌋) of them (all of them if fewer) are chosen

The population. With `group=None` it is the tokens of this call (the authors' verl code: one loss call per
micro-batch per GPU). With `group` = the data-parallel group it is every valid token on every rank of the group:
the trainer passes the whole optimizer mini-batch (all its micro-batches) of each DP rank, so the choice does not
depend on how the mini-batch is cut into micro-batches or shared over DP ranks (trainer/token_stats.py). The two agree
when the mini-batch is one micro-batch on one DP rank.

Canonical order and ties. The population's valid tokens are numbered rank by rank over the group (DP rank 0
first), row-major inside a rank — the single-device order when ranks hold contiguous row blocks of the batch.
kl_cov breaks ties in cov by that number (lower first); clip_cov draws `torch.randperm(n_candidates)` from a CPU
generator seeded with `seed` and takes its first entries as candidate numbers, as the authors' code does with
its global RNG. Every rank thus selects identically (TP ranks see identical inputs; DP ranks gather counts).

Communication with a group: one all-gather of 2 counts per rank; kl_cov adds one all-gather of ≤ 2k numbers per
rank (each rank's own top-k candidates and their numbers: the global top-k is among them) and an all-reduce of 3
sums for the means. Statistics are accumulated in float64 so that the means do not depend on the summation order.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist


def _all_gather(t: torch.Tensor, group) -> torch.Tensor:
    """[R, *t.shape]: t from every rank of group (t itself when group is None)."""
    if group is None:
        return t.unsqueeze(0)
    out = torch.empty((dist.get_world_size(group) * t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype,
                      device=t.device)
    dist.all_gather_into_tensor(out, t.contiguous(), group=group)
    return out.view(dist.get_world_size(group), *t.shape)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def token_covariance(advantages: torch.Tensor, logprob: torch.Tensor, mask: torch.Tensor, group=None) -> torch.Tensor:
    """cov_t = (A_t − Ā)(log π_t − mean log π) [B, L] float64, 0 where masked; means over the population."""
    A, lp = advantages.detach().double(), logprob.detach().double()
    sums = torch.stack([torch.where(mask, A, 0.0).sum(), torch.where(mask, lp, 0.0).sum(), mask.sum().double()])
    if group is not None:
        dist.all_reduce(sums, group=group)
    n = sums[2].clamp(min=1.0)
    return torch.where(mask, (A - sums[0] / n) * (lp - sums[1] / n), 0.0)


def _counts(local: torch.Tensor, group) -> Tuple[torch.Tensor, torch.Tensor]:
    """(totals [C], this rank's offsets [C]) of per-rank counts local [C] (int64) over the group."""
    every = _all_gather(local, group)  # [R, C]
    return every.sum(dim=0), every[:_rank(group)].sum(dim=0)


def top_covariance_tokens(cov: torch.Tensor, mask: torch.Tensor, ratio: float, group=None) -> torch.Tensor:
    """kl_cov: bool [B, L], the k = max(1, ⌊N·ratio⌋) valid tokens of the population with the largest cov.

    Ties go to the lower canonical number (module docstring). N = 0 selects nothing.
    """
    device = cov.device
    values = cov[mask]  # [n] row-major: this rank's canonical order
    n_local = values.numel()
    (total,), (offset,) = _counts(torch.tensor([n_local], dtype=torch.int64, device=device), group)
    total, offset = int(total), int(offset)
    selected = torch.zeros_like(mask)
    if total == 0:
        return selected
    k = max(1, int(total * ratio))
    # This rank's own top-k (stable: ties keep the canonical order), as (value, global number) pairs padded to k.
    order = torch.sort(values, descending=True, stable=True).indices[:k]
    cand = torch.full((k, 2), float("-inf"), dtype=torch.float64, device=device)
    cand[:, 1] = float("inf")
    cand[:order.numel(), 0] = values[order]
    cand[:order.numel(), 1] = (order + offset).double()  # exact in float64 below 2^53
    every = _all_gather(cand, group).view(-1, 2)  # the global top-k is among these R·k pairs
    by_number = torch.sort(every[:, 1], stable=True).indices
    every = every[by_number]
    top = every[torch.sort(every[:, 0], descending=True, stable=True).indices[:k], 1]  # global numbers [k]
    mine = top[(top >= offset) & (top < offset + n_local)].long() - offset
    flat = torch.zeros(n_local, dtype=torch.bool, device=device)
    flat[mine] = True
    selected[mask] = flat
    return selected


def random_candidate_tokens(candidates: torch.Tensor, mask: torch.Tensor, ratio: float, seed: int,
                            group=None) -> torch.Tensor:
    """clip_cov: bool [B, L], max(1, ⌊N·ratio⌋) of the candidates (all if fewer), uniformly at random.

    N = valid tokens of the population (mask), the draw: the first entries of randperm(number of candidates) from a
    CPU generator seeded with `seed`, read as candidate numbers in canonical order (module docstring).
    """
    device = mask.device
    local = torch.tensor([int(mask.sum()), int(candidates.sum())], dtype=torch.int64, device=device)
    (n_valid, n_cand), (_, offset) = _counts(local, group)
    n_valid, n_cand, offset, n_mine = int(n_valid), int(n_cand), int(offset), int(local[1])
    selected = torch.zeros_like(mask)
    if n_cand == 0:
        return selected
    num = min(max(1, int(n_valid * ratio)), n_cand)
    chosen = torch.randperm(n_cand, generator=torch.Generator().manual_seed(seed))[:num].to(device)
    mine = chosen[(chosen >= offset) & (chosen < offset + n_mine)] - offset
    flat = torch.zeros(n_mine, dtype=torch.bool, device=device)
    flat[mine] = True
    selected[candidates] = flat
    return selected


def covariance_selection(mode: str, advantages: torch.Tensor, logprob: torch.Tensor, old_logprob: torch.Tensor,
                         mask: torch.Tensor, cfg, group=None, seed: int = 0) -> torch.Tensor:
    """The tokens kl_cov penalises / clip_cov zeroes, bool [B, L] (module docstring), from detached inputs.

    advantages [B, L] (as the loss sees them), logprob = log π(y_t) of the current policy, old_logprob, mask [B, L];
    cfg: the SimKOConfig (kl_cov_ratio; clip_cov_ratio, clip_cov_lb, clip_cov_ub, clip_low, clip_high).
    """
    cov = token_covariance(advantages, logprob, mask, group)
    if mode == "kl_cov":
        return top_covariance_tokens(cov, mask, cfg.kl_cov_ratio, group)
    if mode != "clip_cov":
        raise ValueError(f"covariance_selection is for kl_cov / clip_cov, got mode {mode!r}")
    A = advantages.detach().float()
    r = torch.exp(torch.where(mask, logprob.detach().float() - old_logprob.detach().float(), 0.0))
    already_clipped = -A * r.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high) > -A * r  # PPO's clipped branch
    candidates = mask & ~already_clipped & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)
    return random_candidate_tokens(candidates, mask, cfg.clip_cov_ratio, seed, group)

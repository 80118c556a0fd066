"""Plain single-device SimKO, written literally from SIMKO_SPEC.md: the oracle for tests, the naive baseline
for benchmarks/loss_bench.py. Autograd through log_softmax over the full vocabulary ([N, V] tensors
everywhere); no sharding, no chunking, no tricks. Do not use it for training at real vocabulary sizes.
"""
from __future__ import annotations

from typing import Optional

import torch

W_REINFORCE_POSITIVE_WEIGHT = 0.1  # restated, not imported: the reference stays independent of simko.py


def reference_simko_loss(logits_full: torch.Tensor, targets: torch.Tensor, old_logprob: torch.Tensor,
                         advantages: torch.Tensor, mask: torch.Tensor, *, mode: str = "simko", top_k: int = 3,
                         alpha: float = 0.01, lam: float = 1.1, tau: float = 0.8, clip_low: float = 0.2,
                         clip_high: float = 0.2, temperature: float = 1.0, vocab_size: Optional[int] = None,
                         old_topk_logprob: Optional[torch.Tensor] = None, token_normalizer: Optional[float] = None):
    """SimKO loss on the full logits [B, L, V_rows]; returns (loss, aux dict of per-token tensors).

    old_topk_logprob [B, L, K]: log π_old(c_k), arbitrary (default zeros) — the literal γ uses
    r_k = π(c_k)/π_old(c_k) and the spec says its value cancels; tests check that.
    """
    B, L, _ = logits_full.shape
    V = vocab_size if vocab_size is not None else logits_full.shape[-1]
    z = logits_full.float()[..., :V] / temperature  # padding rows ≥ vocab_size dropped
    logp_all = torch.log_softmax(z, dim=-1)  # [B, L, V]
    logp = logp_all.gather(-1, targets.clamp(0, V - 1).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1).detach()
    topk_ids = z.detach().topk(top_k, dim=-1).indices  # c_1..c_K of the current policy, detached
    topk_logp = logp_all.gather(-1, topk_ids)  # [B, L, K]
    is_rank1 = targets == z.detach().argmax(-1)

    # w: per response i, q_i = quantile of its valid tokens' entropies at tau, strict >.
    w = torch.zeros(B, L, dtype=torch.bool, device=logits_full.device)
    for i in range(B):
        if mask[i].any():
            q_i = torch.quantile(entropy[i][mask[i]], tau)
            w[i] = (entropy[i] > q_i) & mask[i]

    A = advantages.float()
    if A.dim() == 1:
        A = A[:, None].expand(B, L)
    A = torch.where(mask, A, 0.0)
    old = torch.where(mask, old_logprob.float(), 0.0)
    logp = torch.where(mask, logp, 0.0)
    if old_topk_logprob is None:
        old_topk_logprob = torch.zeros(B, L, top_k, device=logits_full.device)

    r = torch.exp(logp - old)
    gamma = r
    lam_applied = torch.zeros(B, L, dtype=torch.bool, device=logits_full.device)
    if mode == "simko":
        wf = w.float()
        r_k = torch.exp(topk_logp - old_topk_logprob)  # [B, L, K]
        literal = (1 - alpha * wf) * r + (alpha * wf / top_k) * ((r[..., None] / r_k).detach() * r_k).sum(-1)
        gamma = torch.where(A > 0, literal, r)
        lam_applied = (A < 0) & w & is_rank1
        A = torch.where(lam_applied, lam * A, A)
    elif mode == "psr":
        A = torch.where(A > 0, A, 0.0)
    elif mode == "nsr":
        A = torch.where(A < 0, A, 0.0)
    elif mode == "w_reinforce":
        A = torch.where(A > 0, W_REINFORCE_POSITIVE_WEIGHT * A, A)
    elif mode != "grpo":
        raise ValueError(f"unknown mode {mode!r}")

    loss_t = torch.maximum(-A * gamma, -A * gamma.clamp(1 - clip_low, 1 + clip_high))
    loss_t = torch.where(mask, loss_t, 0.0)
    denom = token_normalizer if token_normalizer is not None else max(int(mask.sum()), 1)
    loss = loss_t.sum() / denom
    aux = dict(logp=logp, entropy=entropy, topk_logp=topk_logp, topk_ids=topk_ids, is_rank1=is_rank1, w=w,
               gamma=gamma, r=r, advantages=A, lam_applied=lam_applied, loss_t=loss_t)
    return loss, aux

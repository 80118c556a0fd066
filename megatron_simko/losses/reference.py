"""Plain single-device SimKO, written literally from SIMKO_SPEC.md: the oracle for tests, the naive baseline
for benchmarks/loss_bench.py. Autograd through log_softmax over the full vocabulary ([N, V] tensors
everywhere); no sharding, no chunking, no tricks. Do not use it for training at real vocabulary sizes.

The exploration baselines follow their authors' definitions step by step: KL-Cov and Clip-Cov as in
PRIME-RL/Entropy-Mechanism-of-RL's compute_policy_loss_kl_cov / _clip_cov (one population = the call's valid
tokens, masked means, topk / nonzero + randperm; the randperm drawn from a generator seeded with selection_seed),
Entropy-Adv as in arXiv 2506.14758 (A + min(α·sg(H), |A|/κ)), the entropy bonus as verl's (pg_loss −
coef · token-mean H, H through autograd of −Σ p log p).
"""
from __future__ import annotations

from typing import Optional

import torch

W_REINFORCE_POSITIVE_WEIGHT = 0.1  # restated, not imported: the reference stays independent of simko.py


def reference_simko_loss(logits_full: torch.Tensor, targets: torch.Tensor, old_logprob: torch.Tensor,
                         advantages: torch.Tensor, mask: torch.Tensor, *, mode: str = "simko", top_k: int = 3,
                         alpha: float = 0.01, lam: float = 1.1, lam_form: str = "advantage", tau: float = 0.8,
                         clip_low: float = 0.2, clip_high: float = 0.2, temperature: float = 1.0,
                         vocab_size: Optional[int] = None,
                         old_topk_logprob: Optional[torch.Tensor] = None, token_normalizer: Optional[float] = None,
                         entropy_coef: float = 0.0, kl_cov_ratio: float = 0.002, kl_cov_coef: float = 1.0,
                         clip_cov_ratio: float = 0.0002, clip_cov_lb: float = 1.0, clip_cov_ub: float = 5.0,
                         selection_seed: int = 0, entropy_adv_alpha: float = 0.4, entropy_adv_kappa: float = 2.0,
                         cov_selected: Optional[torch.Tensor] = None):
    """SimKO loss on the full logits [B, L, V_rows]; returns (loss, aux dict of per-token tensors).

    old_topk_logprob [B, L, K]: log π_old(c_k), arbitrary (default zeros) — the literal γ uses
    r_k = π(c_k)/π_old(c_k) and the spec says its value cancels; tests check that. cov_selected [B, L] bool:
    use this KL-Cov / Clip-Cov selection instead of choosing among this call's tokens. lam_form: "advantage"
    (A ← λA, the released code) or "ratio" (γ ← λγ before the clip, the paper's v3).
    """
    B, L, _ = logits_full.shape
    V = vocab_size if vocab_size is not None else logits_full.shape[-1]
    z = logits_full.float()[..., :V] / temperature  # padding rows ≥ vocab_size dropped
    logp_all = torch.log_softmax(z, dim=-1)  # [B, L, V]
    logp = logp_all.gather(-1, targets.clamp(0, V - 1).unsqueeze(-1)).squeeze(-1)
    entropy_grad = -(logp_all.exp() * logp_all).sum(-1)  # [B, L], with its gradient (the bonus only)
    entropy = entropy_grad.detach()
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
        if lam_form == "ratio":
            gamma = torch.where(lam_applied, lam * gamma, gamma)
        elif lam_form == "advantage":
            A = torch.where(lam_applied, lam * A, A)
        else:
            raise ValueError(f"unknown lam_form {lam_form!r}")
    elif mode == "psr":
        A = torch.where(A > 0, A, 0.0)
    elif mode == "nsr":
        A = torch.where(A < 0, A, 0.0)
    elif mode == "w_reinforce":
        A = torch.where(A > 0, W_REINFORCE_POSITIVE_WEIGHT * A, A)
    elif mode == "entropy_adv":
        A = A + torch.where(mask, torch.min(entropy_adv_alpha * entropy, A.abs() / entropy_adv_kappa), 0.0)
    elif mode not in ("grpo", "kl_cov", "clip_cov"):
        raise ValueError(f"unknown mode {mode!r}")

    pg_losses1 = -A * gamma
    pg_losses2 = -A * gamma.clamp(1 - clip_low, 1 + clip_high)
    selected = torch.zeros(B, L, dtype=torch.bool, device=logits_full.device)
    if mode in ("kl_cov", "clip_cov"):
        valid_adv, valid_logp = A[mask], logp.detach()[mask]
        cov = torch.zeros(B, L, device=logits_full.device)
        cov[mask] = (valid_adv - valid_adv.mean()) * (valid_logp - valid_logp.mean())
        if cov_selected is not None:
            selected = cov_selected & mask
        elif mode == "kl_cov" and valid_adv.numel() > 0:
            k = max(1, int(valid_adv.numel() * kl_cov_ratio))
            top = torch.topk(cov[mask], k).indices  # positions among the valid tokens, row-major
            flat = torch.zeros(valid_adv.numel(), dtype=torch.bool, device=logits_full.device)
            flat[top] = True
            selected[mask] = flat
        elif mode == "clip_cov":
            clipped = (pg_losses2 > pg_losses1) & mask
            candidates = torch.nonzero(mask & ~clipped & (cov > clip_cov_lb) & (cov < clip_cov_ub))  # [n, 2]
            if len(candidates) > 0:
                clip_num = max(int(clip_cov_ratio * int(mask.sum())), 1)
                perm = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(selection_seed))
                chosen = candidates[perm[:min(clip_num, len(candidates))]]
                selected[chosen[:, 0], chosen[:, 1]] = True
    if mode == "kl_cov":
        loss_t = pg_losses1 + kl_cov_coef * (logp - old).abs() * selected
    elif mode == "clip_cov":
        loss_t = torch.maximum(pg_losses1, pg_losses2) * (~selected)
    else:
        loss_t = torch.maximum(pg_losses1, pg_losses2)
    loss_t = torch.where(mask, loss_t, 0.0)
    denom = token_normalizer if token_normalizer is not None else max(int(mask.sum()), 1)
    loss = loss_t.sum() / denom
    if entropy_coef != 0:
        loss = loss - entropy_coef * torch.where(mask, entropy_grad, 0.0).sum() / denom
    aux = dict(logp=logp, entropy=entropy, topk_logp=topk_logp, topk_ids=topk_ids, is_rank1=is_rank1, w=w,
               gamma=gamma, r=r, advantages=A, lam_applied=lam_applied, loss_t=loss_t, selected=selected)
    return loss, aux

"""Is the policy in vLLM the policy being trained? The per-step mismatch metric and (optional) truncated
importance sampling.

Alignment follows ``trainer/batch.py``: row b = prompt + response, right-padded; index t holds token t and
its log-prob *as predicted from position t − 1*; ``loss_mask`` is True on response tokens only.

Devices: rollouts arrive as Python lists; ``experience.pack_rollouts`` builds CPU tensors. The functions below
combine a trainer-side tensor (first argument) with rollout-side ones, compute on the trainer tensor's device
(the rollout side is moved there explicitly) and reduce over a group on its backend's device
(``parallel.devices``).

Temperature: the engine reports log softmax(z / T) of the distribution it sampled from (vLLM
``logprobs_mode="processed_logprobs"``), so the trainer must recompute with the SAME temperature
(``compute_token_stats(..., temperature=T)``) for the two to be comparable — and top-k / top-p must be off.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from megatron_simko.parallel.devices import all_reduce


def mismatch_sums(trainer_logprob: torch.Tensor, rollout_logprob: torch.Tensor,
                  mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Σ|Δ|, ΣΔ, count) [3] and max |Δ| [] in float64 over ``mask``, Δ = trainer − rollout, all [B, S]; on the
    trainer tensor's device (the rollout log-probs and the mask are moved there)."""
    if trainer_logprob.shape != rollout_logprob.shape or trainer_logprob.shape != mask.shape:
        raise ValueError(f"shapes differ: trainer {tuple(trainer_logprob.shape)}, rollout "
                         f"{tuple(rollout_logprob.shape)}, mask {tuple(mask.shape)}")
    device = trainer_logprob.device
    mask = mask.to(device)
    delta = torch.where(mask, trainer_logprob.double() - rollout_logprob.to(device).double(), 0.0)
    sums = torch.stack([delta.abs().sum(), delta.sum(), mask.sum(dtype=torch.float64)])
    return sums, delta.abs().amax() if delta.numel() else torch.zeros((), dtype=torch.float64, device=device)


def logprob_mismatch(trainer_logprob: torch.Tensor, rollout_logprob: torch.Tensor, mask: torch.Tensor,
                     group=None) -> Dict[str, float]:
    """Trainer vs engine log-probs of the sampled tokens, over ``mask`` — summed over ``group`` if one is given
    (e.g. the data-parallel group when each rank holds its share of the batch), else this rank's tensors only.

    mean_abs = mean |Δ|, max_abs = max |Δ|, token_mult_prob_error = exp(mean |Δ|) (1.0 = identical),
    mean_signed = mean (trainer − rollout). All [B, S]; Δ in float64 (:func:`mismatch_sums`).
    """
    sums, biggest = mismatch_sums(trainer_logprob, rollout_logprob, mask)
    if group is not None:
        sums, biggest = all_reduce(sums, group=group), all_reduce(biggest, op="max", group=group)
    s_abs, s_signed, count = sums.tolist()
    n = max(count, 1.0)
    mean_abs = s_abs / n
    return {"mismatch/mean_abs": mean_abs, "mismatch/max_abs": float(biggest),
            "mismatch/token_mult_prob_error": math.exp(mean_abs), "mismatch/mean_signed": s_signed / n,
            "mismatch/tokens": count}


def truncated_importance_weights(old_logprob: torch.Tensor, rollout_logprob: torch.Tensor,
                                 cap: Optional[float], mask: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Per-token min(exp(logp_old_trainer − logp_rollout), cap) [B, S], 0 off-mask; None when ``cap`` is None (off).

    Multiplies the per-token policy loss to correct for the trainer/engine mismatch (off by default). On the
    trainer tensor's device (``rollout_logprob`` and ``mask`` are moved there).
    """
    if cap is None:
        return None
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    device = old_logprob.device
    w = torch.exp(old_logprob.float() - rollout_logprob.to(device).float()).clamp(max=cap)
    return w if mask is None else torch.where(mask.to(device), w, torch.zeros_like(w))

"""The SimKO policy loss and its GRPO-family baselines (SIMKO_SPEC.md), on vocabulary-parallel logits.

Per valid token t of response i (symbols of SIMKO_SPEC.md):
    r   = exp(logp − old_logp)                                   importance ratio
    H   = entropy of softmax(z), z = logits / temperature        detached
    q_i = torch.quantile(H over response i's valid tokens, τ)   linear interpolation
    w   = 1[H > q_i]                                             strict: the "forking" tokens
    A > 0 (simko):  γ with value r and gradient r·[(1 − αw)∇log π(y_t) + (αw/K) Σ_k ∇log π(c_k)],
                    implemented as s = (1 − αw)·logp + (αw/K)·Σ_k log π(c_k),
                    γ = exp(sg(logp) − old_logp) · exp(s − sg(s))
                    (the literal γ = (1 − αw) r + (αw/K) Σ_k sg(r/r_k) r_k, whose old top-K log-probs cancel);
    A < 0 (simko), w = 1 and y_t rank-1:  A ← λ·A            (lam_form "advantage": the released code)
                                          γ ← λ·γ = λ·r       (lam_form "ratio": v3's pseudo-code, before the clip)
    otherwise:      γ = r, A unchanged
    loss_t = max(−A γ, −A clip(γ, 1 − ε_low, 1 + ε_high))
The loss is the token mean of loss_t over `mask` (or Σ loss_t / token_normalizer).

Baseline modes (GRPO family: same clipped-ratio loss with γ = r; α and λ are ignored):
    grpo         advantages as given
    psr          only A > 0 tokens contribute (A ← 0 elsewhere; they stay in the token-mean denominator)
    nsr          only A < 0 tokens contribute (same convention)
    w_reinforce  A ← 0.1·A where A > 0, A where A < 0 ("The Surprising Effectiveness of Negative
                 Reinforcement"), still through the clipped ratio
"simko" with alpha = 0 and lam = 1 reproduces "grpo" exactly (bitwise).
The two λ forms agree (value and gradient) except at λ-tokens where the clip is active in either form,
min(r, λ·r) < 1 − ε_low (A < 0: the upper clip never binds); there the advantage form is λ|A|·max(r, 1 − ε_low)
and the ratio form |A|·max(λ·r, 1 − ε_low).

The exploration baselines of the SimKO paper (γ = r; α and λ ignored; defaults: SimKOConfig):
    kl_cov       no ratio clipping; loss_t = −A r + β |log r| on the tokens `covariance.py` selects (the
                 kl_cov_ratio fraction of largest cov_t = (A − Ā)(log π − mean log π)), −A r elsewhere
    clip_cov     the clipped loss, except loss_t = 0 on a random clip_cov_ratio fraction of the unclipped tokens
                 with clip_cov_lb < cov_t < clip_cov_ub (`covariance.py`)
    entropy_adv  A ← A + min(α_H · sg(H), |A| / κ)  ("Reasoning with Exploration: An Entropy Perspective")
Any mode: entropy_coef > 0 subtracts entropy_coef · (token mean of H) with H differentiable (the vocab-parallel
backward carries ∂H/∂z); entropy_coef = 0 leaves the loss and its gradient bitwise unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from .triton_kernels import BACKENDS
from .covariance import covariance_selection
from .fused_linear import DEFAULT_FUSED_CHUNK_TOKENS
from .vocab_parallel import DEFAULT_CHUNK_TOKENS, TokenStats, token_statistics

LAM_FORMS = ("advantage", "ratio")  # where λ multiplies: A (the released code) or γ before clipping (v3, CaSP)
MODES = ("simko", "grpo", "psr", "nsr", "w_reinforce", "kl_cov", "clip_cov", "entropy_adv")
COVARIANCE_MODES = ("kl_cov", "clip_cov")  # modes whose token selection needs population statistics
W_REINFORCE_POSITIVE_WEIGHT = 0.1


@dataclass(frozen=True)
class SimKOConfig:
    """SimKO loss hyper-parameters (SIMKO_SPEC.md defaults).

    mode: one of MODES. top_k: K candidates c_1..c_K. alpha: α, share of the positive credit moved to the
    top-K at high-entropy tokens. lam: λ, extra push on wrong rank-1 high-entropy tokens (λ ≥ 1 in the paper;
    any λ > 0 accepted). lam_form: "advantage" (A ← λA, the released code; SIMKO_SPEC.md) or "ratio" (γ ← λγ
    before the clip, the paper's v3 pseudo-code; differs only where the clip is active). tau: τ, per-response
    entropy quantile. clip_low/clip_high: ε_low/ε_high.
    chunk_tokens: tokens per chunk of the vocab-parallel kernel (bounds its fp32 [chunk, V_local] buffer).
    backend: "auto" (Triton kernels on CUDA when Triton imports, else torch), "torch" or "triton".
    fused_linear: the trainer computes the statistics straight from the last hidden states and the output weight
    (losses/fused_linear.py; no [N, V/TP] logits) instead of from logits; fused_chunk_tokens: its tokens per GEMM
    chunk (bounds its [chunk, V_local] buffers). Same loss and gradients either way (fp32: to 1e-6).

    entropy_coef (any mode): loss −= entropy_coef · token-mean H. 0 = off (SimKO's and the KL/Clip-Cov recipes'
    setting; the SimKO authors' GRPO baseline for Qwen2.5-Math-7B uses verl's 0.001).
    kl_cov_ratio, kl_cov_coef: the fraction of valid tokens with the |log r| penalty and its weight β. Defaults: the
    authors' Qwen2.5-7B recipe (PRIME-RL/Entropy-Mechanism-of-RL recipe/dapo/7b_kl_cov.sh: k_percent=0.2, i.e.
    0.2 %, ppo_kl_coef=1; their 32B recipe uses 0.02 %).
    clip_cov_ratio, clip_cov_lb, clip_cov_ub: the fraction of valid tokens whose loss Clip-Cov zeroes, drawn from
    the unclipped tokens with lb < cov < ub. Defaults: the same repository's 7b_clip_cov.sh (clip_cov_ratio=0.0002,
    lb=1, ub=5), which also sets the PPO range clip_low = clip_high = 1 (examples/configs/clip_cov_qwen7b.yaml).
    entropy_adv_alpha, entropy_adv_kappa: α_H and κ of Entropy-Adv, the paper's GRPO setting (arXiv 2506.14758:
    α = 0.4, κ = 2; it uses α = 0.1 with PPO).
    """

    mode: str = "simko"
    top_k: int = 3
    alpha: float = 0.01
    lam: float = 1.1
    lam_form: str = "advantage"
    tau: float = 0.8
    clip_low: float = 0.2
    clip_high: float = 0.2
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    backend: str = "auto"
    fused_linear: bool = False
    fused_chunk_tokens: int = DEFAULT_FUSED_CHUNK_TOKENS
    entropy_coef: float = 0.0
    kl_cov_ratio: float = 0.002
    kl_cov_coef: float = 1.0
    clip_cov_ratio: float = 0.0002
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    entropy_adv_alpha: float = 0.4
    entropy_adv_kappa: float = 2.0
    grpo_warmup_steps: int = 0  # RL steps 1..N train with mode "grpo" first (losses/schedule.py; v3's logic recipe)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {self.top_k!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if not self.lam > 0.0:
            raise ValueError(f"lam must be > 0, got {self.lam!r}")
        if self.lam_form not in LAM_FORMS:
            raise ValueError(f"lam_form must be one of {LAM_FORMS}, got {self.lam_form!r}")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1], got {self.tau!r}")
        if not self.clip_low >= 0.0:
            raise ValueError(f"clip_low must be >= 0, got {self.clip_low!r}")
        if not self.clip_high >= 0.0:
            raise ValueError(f"clip_high must be >= 0, got {self.clip_high!r}")
        if isinstance(self.chunk_tokens, bool) or not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be an int >= 1, got {self.chunk_tokens!r}")
        if not isinstance(self.fused_linear, bool):
            raise ValueError(f"fused_linear must be true or false, got {self.fused_linear!r}")
        if (isinstance(self.fused_chunk_tokens, bool) or not isinstance(self.fused_chunk_tokens, int)
                or self.fused_chunk_tokens < 1):
            raise ValueError(f"fused_chunk_tokens must be an int >= 1, got {self.fused_chunk_tokens!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not (0.0 <= self.entropy_coef < math.inf):
            raise ValueError(f"entropy_coef must be a finite number >= 0, got {self.entropy_coef!r}")
        for name in ("kl_cov_ratio", "clip_cov_ratio"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1] (a fraction of the valid tokens), "
                                 f"got {getattr(self, name)!r}")
        if not self.kl_cov_coef >= 0.0:
            raise ValueError(f"kl_cov_coef must be >= 0, got {self.kl_cov_coef!r}")
        if not self.clip_cov_lb < self.clip_cov_ub:
            raise ValueError(f"clip_cov_lb must be < clip_cov_ub, got {self.clip_cov_lb!r} >= {self.clip_cov_ub!r}")
        if not self.entropy_adv_alpha >= 0.0:
            raise ValueError(f"entropy_adv_alpha must be >= 0, got {self.entropy_adv_alpha!r}")
        if not self.entropy_adv_kappa > 0.0:
            raise ValueError(f"entropy_adv_kappa must be > 0, got {self.entropy_adv_kappa!r}")
        if isinstance(self.grpo_warmup_steps, bool) or not isinstance(self.grpo_warmup_steps, int) \
                or self.grpo_warmup_steps < 0:
            raise ValueError(f"grpo_warmup_steps must be an int >= 0 (RL steps of plain GRPO first), got "
                             f"{self.grpo_warmup_steps!r}")


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """w [B, L] bool: H > q_i with q_i the τ-quantile (linear) of response i's valid H; False where masked."""
    h = torch.where(mask, entropy.detach(), float("nan"))
    q = torch.nanquantile(h, tau, dim=1, keepdim=True)  # [B, 1]; NaN for an empty response → w all False
    return (h > q) & mask


def mode_advantages(advantages: torch.Tensor, mode: str) -> torch.Tensor:
    """Apply the baseline mode's advantage selection/weighting (identity for simko and grpo)."""
    if mode == "psr":
        return torch.where(advantages > 0, advantages, 0.0)
    if mode == "nsr":
        return torch.where(advantages < 0, advantages, 0.0)
    if mode == "w_reinforce":
        return torch.where(advantages > 0, W_REINFORCE_POSITIVE_WEIGHT * advantages, advantages)
    return advantages


def entropy_advantage_bonus(advantages: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, alpha: float,
                            kappa: float) -> torch.Tensor:
    """Entropy-Adv's ψ = min(α·sg(H), |A|/κ) [B, L], 0 where masked (A' = A + ψ; ψ ≥ 0 never flips A's sign)."""
    return torch.where(mask, torch.minimum(alpha * entropy.detach(), advantages.abs() / kappa), 0.0)


def simko_gamma(logp, topk_logprob, old_logprob, alpha_w):
    """γ [B, L]: value exp(logp − old) = r; gradient r·[(1 − αw)∇logp + (αw/K) Σ_k ∇log π(c_k)].

    alpha_w is α·w on positive tokens and 0 elsewhere, where γ reduces to r (exp(s − sg(s)) = 1 exactly).
    """
    K = topk_logprob.shape[-1]
    s = (1.0 - alpha_w) * logp + (alpha_w / K) * topk_logprob.sum(dim=-1)
    return torch.exp(logp.detach() - old_logprob) * torch.exp(s - s.detach())


def _check_inputs(logits, targets, old_logprob, advantages, mask):
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, L, V_local], got shape {tuple(logits.shape)}")
    BL = tuple(logits.shape[:2])
    for name, t in (("targets", targets), ("old_logprob", old_logprob), ("mask", mask)):
        if tuple(t.shape) != BL:
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match logits [B, L] = {BL}")
    if tuple(advantages.shape) not in (BL[:1], BL):
        raise ValueError(f"advantages must be [B] or [B, L] = {BL[:1]} or {BL}, got {tuple(advantages.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask dtype must be torch.bool, got {mask.dtype}")
    for name, t in (("old_logprob", old_logprob), ("advantages", advantages)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def simko_loss(logits: torch.Tensor, targets: torch.Tensor, old_logprob: torch.Tensor, advantages: torch.Tensor,
               mask: torch.Tensor, cfg: SimKOConfig, tp_group=None, temperature: float = 1.0,
               vocab_size: Optional[int] = None, *, token_normalizer: Optional[float] = None,
               cov_selected: Optional[torch.Tensor] = None, selection_seed: int = 0,
               stats: Optional[TokenStats] = None):
    """SimKO (or baseline) policy loss on this rank's vocabulary shard; see the module docstring.

    Args: logits [B, L, V_local] (global ids [r·V_local, (r+1)·V_local) on TP rank r; never modified),
    targets [B, L] int64 global ids, old_logprob [B, L], advantages [B] or [B, L], mask [B, L] bool,
    tp_group (None: one device, full vocab), temperature (z = logits / T), vocab_size (ids ≥ it are padding
    rows), token_normalizer (keyword-only: if given, loss = Σ_mask loss_t / token_normalizer, e.g. the
    global-batch token count; else the token mean; an empty mask gives 0). kl_cov / clip_cov (keyword-only):
    cov_selected [B, L] bool, the covariance selection of the whole population (trainer/token_stats.py computes it over
    the optimizer mini-batch); None selects among this call's tokens (`covariance.py`, clip_cov's draw seeded
    with selection_seed). stats (keyword-only): the per-token statistics computed elsewhere — from the hidden
    states by losses/fused_linear.linear_token_statistics — with logits=None; they are not recomputed.

    Returns (loss, metrics): a scalar fp32 tensor whose gradient w.r.t. logits is the SimKO gradient, and a
    dict of Python floats — identical on every TP rank; all keys except "loss" and "num_tokens" are means over
    the valid tokens (aggregate micro-batches with `merge_metrics`):
      loss, pg_loss (token mean of loss_t), num_tokens, clip_fraction (clipped branch strictly larger),
      high_entropy_fraction (w), entropy_mean, lambda_1..lambda_K (Λ^(k) = mean log π(c_k)), ratio_mean (r),
      approx_kl (k1 estimator: mean of old_logp − logp), pos_fraction / neg_fraction (A > 0 / A < 0, raw
      advantages), rank1_fraction, lam_fraction (tokens where A ← λA), topk_credit_fraction (positive tokens
      with w = 1, i.e. where α moves credit to the top-K), cov_selected_fraction (kl_cov: tokens with the
      |log r| term; clip_cov: tokens zeroed), entropy_adv_bonus (mean ψ of entropy_adv).
    """
    _check_inputs(logits if stats is None else stats.topk_logprob, targets, old_logprob, advantages, mask)
    if token_normalizer is not None and not (isinstance(token_normalizer, (int, float)) and token_normalizer > 0):
        raise ValueError(f"token_normalizer must be a positive number, got {token_normalizer!r}")
    K = cfg.top_k
    if stats is None:
        stats = token_statistics(logits, targets, K, tp_group, temperature, vocab_size,
                                 mask=mask, chunk_tokens=cfg.chunk_tokens, backend=cfg.backend)

    maskf = mask.float()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1).expand_as(maskf)  # [B] → [B, L]
    adv_raw = torch.where(mask, advantages.float(), 0.0)
    old = torch.where(mask, old_logprob.float(), 0.0)  # masked positions may hold garbage (±inf, NaN)
    logp = torch.where(mask, stats.target_logprob, 0.0)
    w = high_entropy_mask(stats.entropy, mask, cfg.tau)  # [B, L] bool

    A = mode_advantages(adv_raw, cfg.mode)
    shaping = None
    if cfg.mode == "entropy_adv":
        shaping = entropy_advantage_bonus(A, stats.entropy, mask, cfg.entropy_adv_alpha, cfg.entropy_adv_kappa)
        A = A + shaping
    if cfg.mode == "simko":
        topk_credit = w & (A > 0)
        lam_applied = w & (A < 0) & stats.is_rank1
        gamma = simko_gamma(logp, stats.topk_logprob, old, cfg.alpha * topk_credit.float())
        if cfg.lam_form == "ratio":  # v3: ratio[adv < 0 & is_top1 & w] *= λ, then the clip below
            gamma = torch.where(lam_applied, cfg.lam * gamma, gamma)
        else:
            A = torch.where(lam_applied, cfg.lam * A, A)
    else:
        topk_credit = lam_applied = torch.zeros_like(mask)
        gamma = torch.exp(logp.detach() - old) * torch.exp(logp - logp.detach())  # = r, same graph as simko

    surr = -A * gamma
    surr_clipped = -A * gamma.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    selected = torch.zeros_like(mask)
    if cfg.mode in COVARIANCE_MODES:
        selected = cov_selected if cov_selected is not None else covariance_selection(
            cfg.mode, A, logp, old, mask, cfg, seed=selection_seed)
        if tuple(selected.shape) != tuple(mask.shape) or selected.dtype != torch.bool:
            raise ValueError(f"cov_selected must be a bool tensor of shape {tuple(mask.shape)}, got "
                             f"{selected.dtype} {tuple(selected.shape)}")
        selected = selected & mask
    if cfg.mode == "kl_cov":  # no clipping; the |log r| penalty on the selected tokens
        surr_clipped = surr
        loss_t = (surr + cfg.kl_cov_coef * (logp - old).abs() * selected.float()) * maskf
    elif cfg.mode == "clip_cov":  # the selected tokens contribute neither loss nor gradient
        loss_t = torch.maximum(surr, surr_clipped) * (mask & ~selected).float()
    else:
        loss_t = torch.maximum(surr, surr_clipped) * maskf  # [B, L]
    num_tokens = maskf.sum()
    loss_sum = loss_t.sum()
    denom = float(token_normalizer) if token_normalizer is not None else num_tokens.clamp(min=1.0)
    loss = loss_sum / denom
    if cfg.entropy_coef:  # the entropy bonus: H keeps its gradient here (and only here)
        loss = loss - cfg.entropy_coef * (torch.where(mask, stats.entropy, 0.0).sum() / denom)

    with torch.no_grad():
        ratio = torch.exp(logp - old)
        token_means = {
            "pg_loss": loss_t,
            "clip_fraction": (surr_clipped > surr) & mask,
            "high_entropy_fraction": w,
            "entropy_mean": stats.entropy.detach() * maskf,
            **{f"lambda_{k + 1}": stats.topk_logprob[..., k] * maskf for k in range(K)},
            "ratio_mean": ratio * maskf,
            "approx_kl": (old - logp) * maskf,
            "pos_fraction": (adv_raw > 0) & mask,
            "neg_fraction": (adv_raw < 0) & mask,
            "rank1_fraction": stats.is_rank1 & mask,
            "lam_fraction": lam_applied,
            "topk_credit_fraction": topk_credit,
            "cov_selected_fraction": selected,
            "entropy_adv_bonus": shaping if shaping is not None else torch.zeros_like(maskf),
        }
        sums = torch.stack([v.float().sum() for v in token_means.values()] + [num_tokens, loss.detach()])
        values = sums.tolist()  # one device sync for all metrics
    n = values[-2]
    metrics = {key: (v / n if n > 0 else 0.0) for key, v in zip(token_means, values)}
    metrics["num_tokens"] = n
    metrics["loss"] = values[-1]
    return loss, metrics


def merge_metrics(metrics_list: Iterable[dict]) -> dict:
    """Exact aggregate of per-micro-batch metrics: token-weighted means, summed num_tokens.

    "loss" is dropped (how micro-batch losses combine depends on the normaliser); use "pg_loss", the token
    mean of the per-token loss over everything merged.
    """
    metrics_list = list(metrics_list)
    total = sum(m["num_tokens"] for m in metrics_list)
    keys = [k for k in metrics_list[0] if k not in ("loss", "num_tokens")] if metrics_list else []
    merged = {k: (math.fsum(m[k] * m["num_tokens"] for m in metrics_list) / total if total > 0 else 0.0)
              for k in keys}
    merged["num_tokens"] = total
    return merged

"""Per-step metrics: a jsonl file (one JSON object per step), TensorBoard scalars and histograms, and a
concise console line. Only the logging rank (global rank 0) writes; other ranks get a no-op logger.
Also the token-level metrics of the trainer's statistics (:func:`token_metrics`), the diagnostics over
SimKO's gated tokens (:func:`gated_metrics`, keys ``gated/...``) and device memory.
Histograms also go to ``histograms.jsonl`` (one line per step and name: fixed bins ``HIST_BINS`` over
``HIST_RANGE``, values clamped into it, so steps and runs compare bin by bin; the study's plots read it).
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from typing import Dict, Mapping, Optional

import torch

from megatron_simko.losses.simko import high_entropy_mask
from megatron_simko.parallel.devices import all_reduce

HIST_RANGE = (0.0, 12.0)  # nats: entropy <= ln V < 12 for vocabularies up to 162k
HIST_BINS = 240  # 0.05 nats per bin


class MetricsLogger:
    def __init__(self, log_dir: str, enabled: bool = True, tensorboard: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.log_dir = log_dir
        self.jsonl_path = os.path.join(log_dir, "metrics.jsonl")
        self.hist_path = os.path.join(log_dir, "histograms.jsonl")
        self._tb = None
        self._history: list[Dict[str, float]] = []
        if not enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        for path in (self.jsonl_path, self.hist_path):
            if os.path.exists(path):
                self._truncate_after(path, resume_step)  # a resumed run rewrites the steps after its checkpoint
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=os.path.join(log_dir, "tensorboard"), purge_step=resume_step + 1)

    @staticmethod
    def _truncate_after(path: str, step: int) -> None:
        """Keep the complete records of steps <= ``step`` (0: none — a fresh run starts a fresh file). A hard
        kill can cut the last line short: that partial record is dropped, with a warning; a malformed line
        anywhere else is not something a kill leaves, so it is an error naming the line."""
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
        kept = []
        for no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if no == len(lines) and not line.endswith("\n"):
                    warnings.warn(f"{path}: dropped a partial last line (a run killed while writing)")
                    continue
                raise ValueError(f"{path}: line {no} is not valid JSON; fix or remove it, then resume")
            if record.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)

    def log(self, step: int, scalars: Mapping[str, float], histograms: Optional[Mapping[str, torch.Tensor]] = None):
        if not self.enabled:
            return
        record = {"step": step, "time": time.time()}
        record.update({k: float(v) for k, v in scalars.items()})
        self._history.append(record)
        with open(self.jsonl_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
        hists = {k: v.detach().float().cpu() for k, v in (histograms or {}).items() if v.numel() > 0}
        if hists:
            with open(self.hist_path, "a", encoding="utf-8") as f:
                for k, values in hists.items():
                    lo, hi = HIST_RANGE
                    counts = torch.histc(values.clamp(lo, hi), bins=HIST_BINS, min=lo, max=hi)
                    f.write(json.dumps({"step": step, "name": k, "range": list(HIST_RANGE), "bins": HIST_BINS,
                                        "counts": [int(c) for c in counts.tolist()]}) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                if v is not None and math.isfinite(float(v)):
                    self._tb.add_scalar(k, float(v), step)
            for k, values in hists.items():
                self._tb.add_histogram(k, values, step)
            self._tb.flush()

    def summary(self, keys=("reward/mean", "train/pass@1", "entropy/mean", "loss/clip_fraction")) -> str:
        """First → last value of the key metrics, one line each."""
        if not self._history:
            return "no steps logged"
        first, last = self._history[0], self._history[-1]
        lines = [f"steps logged: {len(self._history)} (last step {last['step']}); metrics: {self.jsonl_path}"]
        for k in keys:
            if k in first and k in last:
                lines.append(f"  {k:<24} {first[k]:.4f} -> {last[k]:.4f}")
        return "\n".join(lines)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def token_sums(stats, mask: torch.Tensor) -> torch.Tensor:
    """[3 + K] float64 on the statistics' (trainer) device: (token count, Σ entropy, Σ rank-1 flags,
    Σ Λ^(1..K) log-probs) over ``mask`` [B, S] (moved to that device). ``stats``: ``trainer.token_stats.PerTokenStats``."""
    device = stats.entropy.device
    m = mask.to(device)
    K = stats.topk_logprob.shape[-1]
    lam = torch.where(m.unsqueeze(-1), stats.topk_logprob.double(), 0.0).sum(dim=(0, 1))  # [K]
    head = torch.stack([m.sum(dtype=torch.float64), torch.where(m, stats.entropy.double(), 0.0).sum(),
                        (stats.is_rank1 & m).sum(dtype=torch.float64)])
    return torch.cat([head, lam]) if K else head


def token_metrics(stats, mask: torch.Tensor, group=None) -> Dict[str, float]:
    """Entropy, rank-1 fraction and Λ^(k) = mean log-prob of the rank-k candidate over the ``mask`` tokens,
    summed over ``group`` (e.g. data parallel) before dividing."""
    sums = all_reduce(token_sums(stats, mask), group=group) if group is not None else token_sums(stats, mask)
    values = sums.tolist()
    n = max(values[0], 1.0)
    out = {"entropy/mean": values[1] / n, "tokens/rank1_fraction": values[2] / n}
    out.update({f"lambda/{k + 1}": v / n for k, v in enumerate(values[3:])})
    return out


def reset_device_memory_peak(device: torch.device) -> None:
    """Start a new peak for :func:`device_memory_metrics` (CUDA; the CPU's peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ------------------------------------------------------------------------------------- gated diagnostics
GATED_SPLITS = ("all", "pos", "neg")  # every gated token; A > 0; A < 0 (A = 0 counts in "all" only)


def gated_sums(stats, targets: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, alpha: float,
               tau: float) -> torch.Tensor:
    """[3, 7 + 2K] float64 sums over the gated tokens, one row per split of ``GATED_SPLITS``; columns: count,
    Σ rank-1, Σ y ∈ top-K, Σ floor acting, Σ A²‖Δ‖², Σ A²·D_lo, Σ A²·D_hi, Σ p_1..p_K, Σ log p_1..p_K
    (:func:`gated_metrics` says what each is). On the statistics' (trainer) device; ``targets`` [B, S],
    ``mask`` [B, S] bool and ``advantages`` [B] or [B, S] are moved there. ``stats``: ``trainer.token_stats.PerTokenStats``
    or ``losses.TokenStats`` aligned with ``targets`` (values at masked positions are never read)."""
    device = stats.entropy.device
    m, y = mask.to(device), targets.to(device)
    A = advantages.to(device, torch.float64)
    A = A.unsqueeze(1).expand(m.shape) if A.dim() == 1 else A
    w = high_entropy_mask(stats.entropy, m, tau)  # [B, S] the loss's gate, in every loss mode
    K = stats.topk_logprob.shape[-1]
    logp_k = torch.where(w.unsqueeze(-1), stats.topk_logprob.double(), 0.0)  # [B, S, K]
    p_k = logp_k.exp()
    logp_y = torch.where(w, stats.target_logprob.double(), 0.0)
    cand_is_y = stats.topk_ids == y.unsqueeze(-1)  # [B, S, K]
    in_topk = cand_is_y.any(dim=-1)
    p_min = p_k.amin(dim=-1)  # p_K
    delta_sq = alpha ** 2 * ((K - 1) / K + (2.0 / K) * (~in_topk).double())  # ‖α((1/K)Σ_k e_ck − e_y)‖²
    d_lo = torch.expm1(logp_y) ** 2 + torch.where(cand_is_y, 0.0, p_k ** 2).sum(dim=-1)  # (1 − π_y)² + Σ_{c≠y} p²
    rest = (1.0 - p_k.sum(dim=-1) - torch.where(in_topk, 0.0, logp_y.exp())).clamp(min=0.0)  # mass outside C ∪ {y}
    a_sq = A * A
    cols = torch.cat([torch.stack([torch.ones_like(a_sq), (stats.is_rank1 & w).double(), in_topk.double(),
                                   (p_min < alpha / K).double(), a_sq * delta_sq, a_sq * d_lo,
                                   a_sq * (d_lo + p_min * rest)], dim=-1), p_k, logp_k], dim=-1)  # [B, S, 7 + 2K]
    splits = torch.stack([w, w & (A > 0), w & (A < 0)])  # [3, B, S]
    return torch.where(splits.unsqueeze(-1), cols.unsqueeze(0), 0.0).sum(dim=(1, 2))


def gated_metrics(stats, batch, loss_cfg, group=None) -> Dict[str, float]:
    """Diagnostics of SimKO's gated tokens (w = 1: SIMKO_SPEC.md's entropy gate, τ = ``loss_cfg.tau``,
    computed the same way in every loss mode, so GRPO runs report the same numbers as their comparison), from
    the pre-update statistics of the step's batch (the policy that generated its rollouts): what every update
    of the step starts from. Split by the sign of the GRPO advantage A: ``gated/pos/*`` (A > 0),
    ``gated/neg/*`` (A < 0), ``gated/all/*`` (every gated token, A = 0 included). Per split S:

      S/tokens             count of gated tokens (summed over the global batch)
      S/p_k, S/lambda_k    mean π(c_k) and mean log π(c_k) (Λ^(k) over the gated tokens), c_k = rank-k candidate
      S/rank1_fraction     target y is the rank-1 candidate
      S/in_topk_fraction   y is among c_1..c_K
      S/floor_fraction     some candidate is below SimKO's floor: p_K < α/K (α, K of ``loss_cfg`` / the stats)
      S/alpha_share_lo/hi  bounds on the share of the gradient that α moves (below)
    and ``gated/signal_tokens`` = pos + neg tokens (the gated tokens with A ≠ 0: where SimKO can act at all).

    α share. At a token, GRPO's gradient of log π(y) w.r.t. the logits is G = e_y − π; SimKO's positive branch
    replaces it by G + Δ with Δ = α((1/K)Σ_k e_ck − e_y). ‖Δ‖² is exact: α²(K−1)/K if y ∈ top-K, α²(1 + 1/K)
    otherwise. ‖G‖² = (1 − π_y)² + Σ_{j≠y} π_j² needs Σ over the whole vocabulary, which the statistics do not
    carry (adding it would change the kernels' all-gathered partials); its terms over C ∪ {y} are known, and
    the rest — ids outside the top-K, each with π_j ≤ p_K, of total mass R = 1 − π(C ∪ {y}) — lies in
    [0, p_K·R]. So ‖G‖² ∈ [D_lo, D_hi], D_lo = (1 − π_y)² + Σ_{c_k≠y} p_k², D_hi = D_lo + p_K·R: tight when
    the top-K holds most of the mass or p_K is small. The share reported is that of the step's whole
    logit-gradient over the split's tokens, each token weighted by its A as in the loss at the first update
    (r = 1, nothing clipped; the 1/N normaliser cancels): sqrt(Σ A²‖Δ‖² / Σ A²‖G‖²), bounded by
    alpha_share_lo = sqrt(Σ A²‖Δ‖² / Σ A² D_hi) ≤ share ≤ alpha_share_hi = sqrt(Σ A²‖Δ‖² / Σ A² D_lo). α acts
    on A > 0 in ``simko`` mode only; elsewhere the number is the size its term would have.

    Exact over the global batch: one all-reduce (SUM) of the float64 sums of :func:`gated_sums` over ``group``
    (data parallel), then ratios; every TP rank holds identical statistics (the top-K is global). An empty split
    reports 0 (its ``tokens`` says so). ``batch``: an ``RLBatch`` (tokens, loss_mask, advantages are read; call
    before truncated importance weights rescale the advantages).
    """
    sums = gated_sums(stats, batch.tokens, batch.loss_mask, batch.advantages, loss_cfg.alpha, loss_cfg.tau)
    rows = (all_reduce(sums, group=group) if group is not None else sums).tolist()
    K = stats.topk_logprob.shape[-1]
    out: Dict[str, float] = {}
    for split, (n, rank1, in_topk, floor, delta_sq, d_lo, d_hi, *rest) in zip(GATED_SPLITS, rows):
        means = {"rank1_fraction": rank1, "in_topk_fraction": in_topk, "floor_fraction": floor,
                 **{f"p_{k + 1}": rest[k] for k in range(K)}, **{f"lambda_{k + 1}": rest[K + k] for k in range(K)}}
        out[f"gated/{split}/tokens"] = n
        out.update({f"gated/{split}/{key}": (v / n if n > 0 else 0.0) for key, v in means.items()})
        out[f"gated/{split}/alpha_share_lo"] = _norm_ratio(delta_sq, d_hi)
        out[f"gated/{split}/alpha_share_hi"] = _norm_ratio(delta_sq, d_lo)
    out["gated/signal_tokens"] = out["gated/pos/tokens"] + out["gated/neg/tokens"]
    return out


def _norm_ratio(num_sq: float, den_sq: float) -> float:
    """sqrt(num_sq / den_sq); 0 when both are 0 (no weighted token), inf when only the denominator is."""
    if den_sq > 0:
        return math.sqrt(num_sq / den_sq)
    return math.inf if num_sq > 0 else 0.0


def device_memory_metrics(device: torch.device) -> Dict[str, float]:
    """Peak accelerator memory since the last :func:`reset_device_memory_peak` (the RL loop resets it at the start
    of every step, so this is the step's peak; GiB), or the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return {"memory/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "memory/peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    import resource

    return {"memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux

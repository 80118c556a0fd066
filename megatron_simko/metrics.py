"""Per-step metrics: a jsonl file (one JSON object per step), TensorBoard scalars and histograms, and a
concise console line. Only the logging rank (global rank 0) writes; other ranks get a no-op logger.
Also the token-level metrics of the trainer's statistics (:func:`token_metrics`) and device memory.
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
    Σ Λ^(1..K) log-probs) over ``mask`` [B, S] (moved to that device). ``stats``: ``trainer.step.PerTokenStats``."""
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


def device_memory_metrics(device: torch.device) -> Dict[str, float]:
    """Peak accelerator memory since the last :func:`reset_device_memory_peak` (the RL loop resets it at the start
    of every step, so this is the step's peak; GiB), or the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return {"memory/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "memory/peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    import resource

    return {"memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux

"""megatron-core optimizer (Adam, optional distributed optimizer, gradient clipping), LR schedule, and the
non-finite-update guard that ``train_step`` (trainer/step.py) applies around each update.

Precision: fp32 params and optimizer on CPU; on GPU bf16 params with fp32 main params, fp32 gradient buffers
(DDP ``grad_reduce_in_fp32``) and fp32 Adam state (megatron-core's mixed-precision optimizer).

No silent NaN: before each optimizer step, every rank checks its loss and the norms of its gradients, and
one all-reduce (MAX over the world) makes every rank agree. A non-finite value anywhere skips the update on
every rank (weights, Adam state and LR schedule untouched), and :class:`BadUpdateGuard` counts such updates:
after ``train.max_bad_steps`` consecutive ones the run stops with :class:`NonFiniteUpdateError`, naming the
step. Weights therefore never become NaN through an update, and no such weight reaches a checkpoint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

import torch

from megatron_simko.config import OptimizerConfig
from megatron_simko.parallel.cpu_shims import cuda_to_cpu
from megatron_simko.parallel.devices import all_reduce


def build_optimizer(model_chunks: List[torch.nn.Module], cfg: OptimizerConfig, use_distributed_optimizer: bool = False):
    """megatron-core's optimizer over the DDP-wrapped chunks (``trainer.model.wrap_with_ddp``), configured by
    the ``optimizer`` section of the config tree (``grad_clip`` 0 disables clipping)."""
    from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer

    model_config = model_chunks[0].config
    bf16 = model_config.params_dtype == torch.bfloat16
    opt_config = McoreOptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        # 0 disables clipping; megatron-core would then skip the norm too (and report 0.0): clip at +inf instead,
        # a no-op (clip coefficient inf / norm > 1) that still computes the real global norm.
        clip_grad=cfg.grad_clip if cfg.grad_clip > 0 else float("inf"),
        bf16=bf16,
        params_dtype=model_config.params_dtype,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    with cuda_to_cpu():
        optimizer = get_megatron_optimizer(opt_config, model_chunks)
    for chunk in model_chunks:  # megatron's schedules scale the last stage's loss by the loss scale (1 here)
        chunk.config.grad_scale_func = optimizer.scale_loss
    return optimizer


def build_scheduler(optimizer, cfg: OptimizerConfig, decay_steps: int = 1):
    """megatron-core ``OptimizerParamScheduler``, stepped once per update slot just BEFORE the update
    (``train_step``; a skipped update still takes its slot), so update k = 1, 2, ... runs at: lr·k/W during
    warmup (k ≤ W = ``cfg.warmup_steps``; the first update at lr/W, never 0), then lr (constant) or a decay
    to ``min_lr`` reached at update ``decay_steps`` (linear / cosine). Weight decay constant.

    On resume the CURRENT config wins (``override_opt_param_scheduler``): lr, min_lr, warmup, decay style
    and decay steps come from ``cfg``; only the update count comes from the checkpoint (``load_checkpoint``
    reports what changed)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    constant = cfg.lr_schedule == "constant"
    if not constant and decay_steps <= cfg.warmup_steps:
        raise ValueError(f"decay_steps ({decay_steps}) must exceed optimizer.warmup_steps ({cfg.warmup_steps})")
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if cfg.warmup_steps > 0 else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.lr if constant else cfg.min_lr,
        lr_warmup_steps=cfg.warmup_steps,
        lr_decay_steps=max(decay_steps, cfg.warmup_steps + 1),
        lr_decay_style=cfg.lr_schedule,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=1,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


class NonFiniteUpdateError(RuntimeError):
    """Too many consecutive optimizer updates had a non-finite loss or gradient norm (message names the step)."""


@dataclass
class BadUpdateGuard:
    """Counts optimizer updates skipped for non-finite values; ``max_consecutive`` in a row stop the run."""

    max_consecutive: int
    consecutive: int = 0
    skipped_total: int = 0

    def __post_init__(self):
        if self.max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {self.max_consecutive}")

    def record(self, skipped: bool, where: str) -> None:
        """Count one update (``where`` names it in the error); raises NonFiniteUpdateError at the limit."""
        if not skipped:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.skipped_total += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteUpdateError(
                f"{where}: non-finite loss or gradient norm in {self.consecutive} consecutive optimizer updates "
                f"(train.max_bad_steps={self.max_consecutive}); these updates were skipped, so the weights and "
                f"checkpoints hold no NaN. Lower optimizer.lr, check the data and rewards, or use fp32")


def nonfinite_anywhere(loss: float, model_chunks: List[torch.nn.Module]) -> bool:
    """True on every rank if any rank's loss or the norm of any of its final gradients (``main_grad``) is not
    finite. One MAX all-reduce over the world, on the backend's device."""
    grads = [p.main_grad for chunk in model_chunks for p in chunk.parameters()
             if getattr(p, "main_grad", None) is not None]
    device = grads[0].device if grads else torch.device("cpu")
    bad = torch.tensor(0.0 if math.isfinite(loss) else 1.0, device=device)
    if grads:
        norms = torch.stack(torch._foreach_norm(grads)).float()  # one norm per tensor; overflow -> inf
        bad = torch.maximum(bad, (~torch.isfinite(norms)).any().float())
    return bool(all_reduce(bad, op="max").item() > 0)

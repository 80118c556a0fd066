"""megatron-core optimizer (Adam, optional distributed optimizer, gradient clipping), LR schedule, train_step.

Precision: fp32 params and optimizer on CPU; on GPU bf16 params with fp32 main params, fp32 gradient buffers
(DDP ``grad_reduce_in_fp32``) and fp32 Adam state (megatron-core's mixed-precision optimizer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from megatron_simko.config import OptimizerConfig
from megatron_simko.losses import SimKOConfig
from megatron_simko.parallel.cpu_shims import cuda_to_cpu
from megatron_simko.trainer.batch import RLBatch
from megatron_simko.trainer.step import StepOutput, forward_backward, make_microbatches

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


@dataclass
class TrainStepOutput(StepOutput):
    """StepOutput plus grad_norm (global, before clipping; None if skipped), lr used, update_successful."""

    grad_norm: Optional[float] = None
    lr: float = 0.0
    update_successful: bool = True


def train_step(model_chunks: List[torch.nn.Module], optimizer, scheduler, batch: RLBatch, loss_cfg: SimKOConfig,
               vocab_size: int, temperature: float = 1.0, num_microbatches: Optional[int] = None,
               max_tokens: Optional[int] = None,
               grad_hook: Optional[Callable[[List[torch.nn.Module]], None]] = None) -> TrainStepOutput:
    """One optimizer step on this DP rank's share of the global batch (see step.py for the loss scaling).

    Micro-batching: ``num_microbatches`` equal splits, or ``max_tokens`` token-budget packing with the count
    agreed over DP. Default: one micro-batch. ``grad_hook(model_chunks)``, if given, runs after the gradients
    are final (reduced over DP, in each parameter's ``main_grad``) and before clipping and the update.
    """
    from megatron.core import parallel_state as mpu

    if num_microbatches is None and max_tokens is None:
        num_microbatches = 1
    microbatches = make_microbatches(batch, num_microbatches, max_tokens, dp_group=mpu.get_data_parallel_group())
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    out = forward_backward(model_chunks, microbatches, loss_cfg, vocab_size, temperature)
    if grad_hook is not None:
        grad_hook(model_chunks)
    scheduler.step(increment=1)  # this update's slot: update k runs at the schedule's lr(k) (build_scheduler)
    lr = current_lr(optimizer)
    with cuda_to_cpu():
        update_successful, grad_norm, _ = optimizer.step()
    return TrainStepOutput(loss=out.loss, metrics=out.metrics, num_tokens=out.num_tokens,
                           num_microbatches=out.num_microbatches,
                           grad_norm=None if grad_norm is None else float(grad_norm), lr=lr,
                           update_successful=bool(update_successful))

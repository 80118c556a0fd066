"""The training step: forward/backward of the SimKO loss over micro-batches with megatron-core's schedules
(``forward_backward``), and one optimizer update around it (``train_step``; the optimizer, LR schedule and
non-finite guard are trainer/optimizer.py's). Forward-only statistics: trainer/token_stats.py.

Loss scaling (the one thing to get right). The objective is the token-mean of the per-token SimKO loss over
the GLOBAL batch — all micro-batches on all data-parallel ranks — not a mean of per-micro-batch means:

    L = Σ_{dp ranks} Σ_{micro-batches} Σ_{response tokens} loss_t  /  N,    N = global count of response tokens

1. N is computed first: Σ loss_mask over this rank's micro-batches, all-reduced (SUM) over the DP group.
2. Each micro-batch's loss function returns ``simko_loss(..., token_normalizer=N)`` = Σ_mb loss_t / N, as the
   (loss, num_tokens, metrics) triple, with ``config.calculate_per_token_loss=True``: megatron-core's schedule
   then does NOT divide the loss by num_microbatches (it would with a (loss, metrics) pair or with
   calculate_per_token_loss=False), and DDP's gradient scaling factor is 1, so the DP reduction SUMS gradients
   instead of averaging them.
3. ``finalize_model_grads`` runs with ``num_tokens=None`` (our wrapper), so it does not divide by the
   schedule's token count a second time.
The gradient after the step is therefore ∇L exactly (verified against one device by the DP2 equivalence test).

Alignment: position t of the logits predicts token t + 1. The logits stay whole ([b, s, V/TP], a view all the way
into the loss) and the targets move instead: the per-token batch tensors (aligned with tokens, batch.py) are
shifted left by one (``_shifted``) and the last position, which predicts nothing, is masked out. Slicing the logits
(``logits[:, :-1]``) would copy them for b > 1 (the slice is not a view of a [b·(s−1), V] matrix) and make autograd
allocate a zero [b, s, V] gradient to copy into (issue 20 item 7; benchmarks/loss_memory_bench.py measures it).

KL-Cov / Clip-Cov (losses/covariance.py) choose tokens by statistics of a population. Here the population is the
optimizer mini-batch — every micro-batch on every DP rank — so the choice does not depend on the micro-batch split
or the DP size. Before the loss pass, ``forward_backward`` runs one forward-only pass over the same micro-batches
(the current policy's log π(y_t), detached), selects on the last stage with the DP group's statistics (an
all-gather of 2 counts, an all-reduce of 3 sums and, for KL-Cov, an all-gather of ≤ 2k numbers per rank) and
carries the selection in each micro-batch (``RLBatch.cov_select``). Cost: one extra forward-only pass per
optimizer step, in these two modes only. It reproduces the authors' per-call choice (verl: one loss call per
micro-batch per GPU) when the mini-batch is a single micro-batch on a single DP rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_simko.losses import SimKOConfig, merge_metrics, simko_loss
from megatron_simko.losses.simko import COVARIANCE_MODES
from megatron_simko.parallel.cpu_shims import cuda_to_cpu
from megatron_simko.parallel.devices import all_reduce
from megatron_simko.trainer.batch import RLBatch
from megatron_simko.trainer.optimizer import BadUpdateGuard, current_lr, nonfinite_anywhere
from megatron_simko.trainer.schedule import make_microbatches, run_schedule, shift_left, uniform_shapes
from megatron_simko.trainer.token_stats import last_stage_token_stats, with_covariance_selection


def _shifted(mb: RLBatch, device):
    """Targets and per-token tensors for the whole logits [b, s, V/TP]: position t ↔ index t + 1 of the batch.
    The last position has no target: masked out (target id 0, old log-prob 0, not selected)."""
    advantages = mb.advantages.to(device)
    if advantages.dim() == 2:
        advantages = shift_left(advantages, 0.0)
    cov_select = shift_left(mb.cov_select.to(device), False) if mb.cov_select is not None else None
    return (shift_left(mb.tokens.to(device), 0), shift_left(mb.old_logprob.to(device), 0.0), advantages,
            shift_left(mb.loss_mask.to(device), False), cov_select)


def _finalize_grads_without_token_scaling(model, num_tokens=None, **kwargs):
    """finalize_model_grads (DP reduction, tied-embedding and SP norm all-reduces) without the division by
    the schedule's token count: our losses are already normalised by the global count (module docstring)."""
    from megatron.core.distributed import finalize_model_grads

    return finalize_model_grads(model, None, **kwargs)


@dataclass
class StepOutput:
    """Same on every rank: loss = global token-mean SimKO loss; metrics = global token-weighted means
    (``merge_metrics`` keys plus "loss"); num_tokens = N (global response tokens); num_microbatches here."""

    loss: float
    metrics: Dict[str, float]
    num_tokens: int
    num_microbatches: int


def forward_backward(model_chunks: List[torch.nn.Module], microbatches: List[RLBatch], loss_cfg: SimKOConfig,
                     vocab_size: int, temperature: float = 1.0, selection_seed: int = 0) -> StepOutput:
    """Forward + backward of the SimKO loss over ``microbatches`` (this DP rank's share of the global batch).

    Gradients accumulate into the DDP ``main_grad`` buffers and are reduced over DP at the end (finalize).
    Zero them before calling (``train_step`` does). All ranks of a model replica pass the same micro-batches.
    kl_cov / clip_cov: the token selection over the whole mini-batch first (module docstring); Clip-Cov's draw
    is seeded with ``selection_seed`` (``train_step`` passes the optimizer-update count).
    """
    from megatron.core import parallel_state as mpu
    from megatron.core.utils import get_model_config

    config = get_model_config(model_chunks[0])
    if not config.calculate_per_token_loss:
        raise ValueError("the training step needs TransformerConfig(calculate_per_token_loss=True) "
                         "(use trainer.model.trainer_transformer_config)")
    dp_group = mpu.get_data_parallel_group()
    tp_group = mpu.get_tensor_model_parallel_group()

    # 1. the global token count N.
    n_local = sum(mb.num_loss_tokens for mb in microbatches)
    num_tokens = int(all_reduce(torch.tensor([n_local], dtype=torch.int64), group=dp_group).item())
    normalizer = float(max(num_tokens, 1))

    def loss_func(mb: RLBatch, output: torch.Tensor, head=None):
        targets, old_logprob, advantages, mask, cov_select = _shifted(mb, output.device)
        stats = None if head is None else last_stage_token_stats(
            output, head, targets, loss_cfg.top_k, tp_group, temperature, vocab_size, mask, loss_cfg.backend,
            loss_cfg.chunk_tokens, loss_cfg.fused_chunk_tokens)
        loss, metrics = simko_loss(output if head is None else None, targets, old_logprob, advantages, mask,
                                   loss_cfg, tp_group=tp_group, temperature=temperature, vocab_size=vocab_size,
                                   token_normalizer=normalizer, cov_selected=cov_select, stats=stats)
        count = torch.tensor(int(metrics["num_tokens"]), dtype=torch.int, device=output.device)
        return loss, count, metrics

    config.finalize_model_grads_func = _finalize_grads_without_token_scaling
    microbatches = uniform_shapes(model_chunks, microbatches)
    if loss_cfg.mode in COVARIANCE_MODES:
        microbatches = with_covariance_selection(model_chunks, microbatches, loss_cfg, vocab_size, temperature,
                                                 dp_group, selection_seed)
    per_mb = run_schedule(model_chunks, microbatches, loss_func, forward_only=False,
                           fused_linear=loss_cfg.fused_linear)
    loss_sum = sum(m["loss"] for m in per_mb)  # each already Σ/N: the sum is this rank's share of L
    metrics = merge_metrics(per_mb) if per_mb else {}
    metrics = _reduce_metrics_over_dp(metrics, loss_sum, dp_group)
    metrics = _broadcast_from_last_stage(metrics)
    return StepOutput(loss=metrics["loss"], metrics=metrics, num_tokens=num_tokens,
                      num_microbatches=len(microbatches))


def _reduce_metrics_over_dp(metrics: Dict[str, float], loss_sum: float, dp_group) -> Dict[str, float]:
    """Global metrics on last-stage ranks: token-weighted means over DP, the loss summed (already /N)."""
    from megatron.core import parallel_state as mpu

    if not mpu.is_pipeline_last_stage(ignore_virtual=True):
        return {}
    keys = sorted(k for k in metrics if k != "num_tokens")
    n = metrics.get("num_tokens", 0.0)
    packed = torch.tensor([float(metrics[k]) * n for k in keys] + [n, float(loss_sum)], dtype=torch.float64)
    values = all_reduce(packed, group=dp_group).tolist()
    total = values[-2]
    out = {k: (v / total if total > 0 else 0.0) for k, v in zip(keys, values)}
    out["num_tokens"] = total
    out["loss"] = values[-1]
    return out


def _broadcast_from_last_stage(obj):
    """The last pipeline stage's Python object on every stage of this pipeline."""
    from megatron.core import parallel_state as mpu

    if mpu.get_pipeline_model_parallel_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=mpu.get_pipeline_model_parallel_last_rank(),
                               group=mpu.get_pipeline_model_parallel_group())
    return holder[0]


@dataclass
class TrainStepOutput(StepOutput):
    """StepOutput plus grad_norm (global, before clipping; None if the optimizer gave none, NaN if the update
    was skipped for non-finite values), lr used, update_successful, skipped_nonfinite."""

    grad_norm: Optional[float] = None
    lr: float = 0.0
    update_successful: bool = True
    skipped_nonfinite: bool = False


def train_step(model_chunks: List[torch.nn.Module], optimizer, scheduler, batch: RLBatch, loss_cfg: SimKOConfig,
               vocab_size: int, temperature: float = 1.0, num_microbatches: Optional[int] = None,
               max_tokens: Optional[int] = None,
               grad_hook: Optional[Callable[[List[torch.nn.Module]], None]] = None,
               guard: Optional[BadUpdateGuard] = None, step: Optional[int] = None) -> TrainStepOutput:
    """One optimizer step on this DP rank's share of the global batch (module docstring: the loss scaling).

    Micro-batching: ``num_microbatches`` equal splits, or ``max_tokens`` token-budget packing with the count
    agreed over DP. Default: one micro-batch. ``grad_hook(model_chunks)``, if given, runs after the gradients
    are final (reduced over DP, in each parameter's ``main_grad``) and before clipping and the update.
    A non-finite loss or gradient norm on any rank skips the update everywhere (trainer/optimizer.py); ``guard``
    counts it and stops the run after too many in a row (``step``: the RL step, for its message).
    """
    from megatron.core import parallel_state as mpu

    if num_microbatches is None and max_tokens is None:
        num_microbatches = 1
    microbatches = make_microbatches(batch, num_microbatches, max_tokens, dp_group=mpu.get_data_parallel_group())
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    out = forward_backward(model_chunks, microbatches, loss_cfg, vocab_size, temperature,
                           selection_seed=scheduler.num_steps)  # Clip-Cov: a new draw per update
    if grad_hook is not None:
        grad_hook(model_chunks)
    skipped = nonfinite_anywhere(out.loss, model_chunks)
    if skipped:  # nothing moves, the LR schedule included (as megatron-core does for a skipped update)
        update_successful, grad_norm, lr = False, math.nan, current_lr(optimizer)
    else:
        scheduler.step(increment=1)  # this update's slot: update k runs at the schedule's lr(k) (build_scheduler)
        lr = current_lr(optimizer)
        with cuda_to_cpu():
            update_successful, grad_norm, _ = optimizer.step()
    if guard is not None:
        guard.record(skipped, f"RL step {step}" if step is not None else "train_step")
    return TrainStepOutput(loss=out.loss, metrics=out.metrics, num_tokens=out.num_tokens,
                           num_microbatches=out.num_microbatches,
                           grad_norm=None if grad_norm is None else float(grad_norm), lr=lr,
                           update_successful=bool(update_successful), skipped_nonfinite=skipped)

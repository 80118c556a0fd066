"""megatron-core's pipeline schedules over a list of micro-batches: micro-batching, the forward step of one
micro-batch, and one run of the schedule (no PP / 1F1B / interleaved, by the parallel state) whose last stage
hands its output to a loss function (trainer/step.py) or a statistics function (trainer/token_stats.py).

Alignment: position t of the model's output predicts token t + 1; ``shift_left`` moves per-token tensors (aligned
with the tokens, batch.py) to the output's positions.
"""
from __future__ import annotations

import contextlib
import functools
from typing import List, Optional

import torch

from megatron_simko.models.output_head import output_layer_bypassed
from megatron_simko.parallel.cpu_shims import cuda_to_cpu
from megatron_simko.parallel.devices import trainer_device
from megatron_simko.trainer.batch import RLBatch, token_budget_microbatches


def causal_attention_mask(seq_len: int, device) -> torch.Tensor:
    """[1, 1, s, s] bool, True = masked (megatron-core's convention): position i attends to j ≤ i only."""
    return torch.triu(torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)


def make_microbatches(batch: RLBatch, num_microbatches: Optional[int] = None, max_tokens: Optional[int] = None,
                      dp_group=None, min_microbatches: int = 1) -> List[RLBatch]:
    """Either ``num_microbatches`` equal splits or token-budget packing (``max_tokens``), not both. Packing
    under the interleaved pipeline schedule (virtual PP) makes a multiple of the PP size, as it requires."""
    from megatron.core import parallel_state as mpu

    if (num_microbatches is None) == (max_tokens is None):
        raise ValueError("give exactly one of num_microbatches or max_tokens")
    if num_microbatches is not None:
        return batch.split(num_microbatches)
    interleaved = (mpu.model_parallel_is_initialized()
                   and (mpu.get_virtual_pipeline_model_parallel_world_size() or 1) > 1)
    return token_budget_microbatches(batch, max_tokens, dp_group=dp_group, min_microbatches=min_microbatches,
                                     multiple_of=mpu.get_pipeline_model_parallel_world_size() if interleaved else 1)


def uniform_shapes(model_chunks, microbatches: List[RLBatch]) -> List[RLBatch]:
    """Pad micro-batches to one [b, s] when a pipeline runs without variable_seq_lengths (the interleaved
    schedule); otherwise return them unchanged."""
    from megatron.core import parallel_state as mpu
    from megatron.core.utils import get_model_config

    config = get_model_config(model_chunks[0])
    if mpu.get_pipeline_model_parallel_world_size() == 1 or config.variable_seq_lengths:
        return microbatches
    b = max(mb.batch_size for mb in microbatches)
    s = max(mb.seq_len for mb in microbatches)
    return [mb.pad_to(b, s) for mb in microbatches]


def _model_arg(model_chunks):
    return model_chunks if len(model_chunks) > 1 else model_chunks[0]


def _data_iterator(model_chunks, microbatches):
    if len(model_chunks) > 1:  # interleaved schedule: one iterator per chunk, same micro-batch order
        return [iter(microbatches) for _ in model_chunks]
    return iter(microbatches)


def _forward_step(data_iterator, model, *, loss_func_factory, fused_linear: bool = False):
    """megatron-core forward_step_func: one micro-batch through this stage; the loss closure for the last.
    fused_linear: the last stage returns hidden states and the closure gets the output weight (models/output_head)."""
    mb: RLBatch = next(data_iterator)
    device = trainer_device()
    tokens = mb.tokens.to(device)  # [b, s]
    b, s = tokens.shape
    position_ids = torch.arange(s, device=device).unsqueeze(0).expand(b, s)  # right padding: start at 0
    with output_layer_bypassed(model) if fused_linear else contextlib.nullcontext() as head:
        # last stage: [b, s, V/TP] logits, or [b, s, H] final-norm hidden states (fused_linear)
        output = model(input_ids=tokens, position_ids=position_ids, attention_mask=causal_attention_mask(s, device))
    return output, functools.partial(loss_func_factory, mb, head=head)


def run_schedule(model_chunks, microbatches: List[RLBatch], func, forward_only: bool, fused_linear: bool = False):
    """megatron-core's schedule (no PP / 1F1B / interleaved, by the parallel state) over ``microbatches``.

    ``func(mb, output, head=...)`` runs on the last stage: a loss function (forward_only=False) or a statistics
    function whose results the schedule collects (forward_only=True, ``collect_non_loss_data``). output = the
    logits and head = None, or with fused_linear the hidden states and the OutputHead holding the output weight."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    kwargs = dict(collect_non_loss_data=True) if forward_only else {}
    with cuda_to_cpu():
        return get_forward_backward_func()(
            forward_step_func=functools.partial(_forward_step, loss_func_factory=func, fused_linear=fused_linear),
            data_iterator=_data_iterator(model_chunks, microbatches),
            model=_model_arg(model_chunks),
            num_microbatches=len(microbatches),
            seq_length=max(mb.seq_len for mb in microbatches),
            micro_batch_size=max(mb.batch_size for mb in microbatches),
            forward_only=forward_only,
            **kwargs,
        )


def shift_left(t: torch.Tensor, fill) -> torch.Tensor:
    """[b, s, ...] → [b, s, ...]: out[:, i] = t[:, i + 1], the last position filled with ``fill``."""
    return torch.cat([t[:, 1:], t.new_full((t.shape[0], 1) + tuple(t.shape[2:]), fill)], dim=1)

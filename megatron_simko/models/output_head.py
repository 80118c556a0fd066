"""The one seam for the fused linear loss (issue 21): GPTModel returns the hidden states, not the logits.

megatron-core 0.16.1's ``GPTModel._postprocess`` ends in ``logits, _ = self.output_layer(hidden_states,
weight=output_weight, runtime_gather_output=...)`` (``output_weight`` = ``shared_embedding_or_output_weight()``
with tied embeddings, else None: the layer's own weight) and returns ``logits.transpose(0, 1).contiguous()``.
Inside ``output_layer_bypassed(model)`` that one call returns, instead of h Wᵀ, the layer's *input* prepared
exactly as ColumnParallelLinear prepares it for its GEMM:

    sequence parallel:  gather_from_sequence_parallel_region(h)   all-gather along s; backward reduce-scatter
    otherwise:          copy_to_tensor_model_parallel_region(h)   identity;          backward all-reduce over TP

so the model's output is the final-norm hidden states [b, s, H] (full sequence), and the gradient the loss hands
back for them is summed over the TP ranks (and scattered back to the sequence shards) by megatron-core's own
mappings, as the output layer's backward would do. The weight the layer would have used (the shared embedding
weight when tied — megatron-core's tied-gradient all-reduce across the first and last pipeline stage then works
unchanged — or ``output_layer.weight``) is recorded in the returned ``OutputHead``. Nothing else changes: the
model, its parameters, state dict and hooks stay megatron-core's. The override is an instance attribute removed on
exit, and only on stages with an output layer (``post_process``); elsewhere the context does nothing.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class OutputHead:
    """What the bypassed output layer would have multiplied by: its weight shard [V/TP, H] (None off the last
    stage, or before the model ran)."""

    weight: Optional[torch.Tensor] = None


def _gpt_model(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while not hasattr(model, "output_layer") and hasattr(model, "module"):
        model = model.module
    return model


def _check_supported(layer) -> None:
    """Refuse output-layer settings the bypass does not reproduce (one line each)."""
    config = layer.config
    if layer.bias is not None:
        raise ValueError("loss.fused_linear: the output layer has a bias; the fused loss supports bias-free output "
                         "layers only (set loss.fused_linear=false)")
    if getattr(config, "defer_embedding_wgrad_compute", False):
        raise ValueError("loss.fused_linear is incompatible with defer_embedding_wgrad_compute; turn one off")
    if getattr(layer, "explicit_expert_comm", False) or getattr(layer, "gather_output", False):
        raise ValueError("loss.fused_linear needs a vocabulary-parallel output layer (gather_output=False)")
    if getattr(config, "mtp_num_layers", None):
        raise ValueError("loss.fused_linear does not support multi-token prediction (mtp_num_layers)")


class _ContiguousGradient(torch.autograd.Function):
    """Identity forward; backward hands on a contiguous gradient. megatron-core's ``_reduce`` (the backward of
    copy_to_tensor_model_parallel_region) all-reduces ``grad.contiguous()`` and returns ``grad``: for the
    transposed gradient GPTModel's ``transpose(0, 1)`` sends back, the reduction would land in a discarded copy."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def output_layer_input(input_: torch.Tensor, sequence_parallel: bool, tp_group) -> torch.Tensor:
    """The output layer's input [s, b, H] as ColumnParallelLinear prepares it for its GEMM (module docstring):
    gathered along s under sequence parallelism (backward: reduce-scatter), else as is (backward: all-reduce)."""
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    if sequence_parallel:
        hidden = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True, group=tp_group)
    else:
        hidden = copy_to_tensor_model_parallel_region(input_, group=tp_group)
    return _ContiguousGradient.apply(hidden)


@contextlib.contextmanager
def output_layer_bypassed(model: torch.nn.Module):
    """Within the context the model's last stage returns [b, s, H] hidden states; yields the OutputHead."""
    head = OutputHead()
    gpt = _gpt_model(model)
    layer = getattr(gpt, "output_layer", None) if getattr(gpt, "post_process", False) else None
    if layer is None:
        yield head
        return
    _check_supported(layer)

    def forward(input_, weight=None, runtime_gather_output=None):
        head.weight = layer.weight if weight is None else weight
        # [s, b, H]; GPTModel transposes it to [b, s, H]
        return output_layer_input(input_, layer.sequence_parallel, layer.tp_group), None

    layer.forward = forward  # instance attribute: shadows ColumnParallelLinear.forward until exit
    try:
        yield head
    finally:
        del layer.forward

"""This rank's model chunks: the TransformerConfig the trainer needs, the GPTModel stage(s), the DDP wrapper.

One pipeline stage per rank (a list of one chunk), or ``vpp`` chunks with the interleaved schedule.
Every function here runs after :func:`megatron_simko.parallel.initialize_parallel`.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from megatron_simko.models.gpt import ModelArch, build_gpt_model, transformer_config
from megatron_simko.parallel.cpu_shims import cpu_mode, cuda_to_cpu


def trainer_transformer_config(arch: ModelArch, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                               virtual_pipeline_parallel: Optional[int] = None,
                               params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False,
                               **overrides):
    """``models.gpt.transformer_config`` plus what the training step relies on:

    calculate_per_token_loss=True  the schedule neither divides the loss by num_microbatches nor DDP the
                                   gradients by the DP size (the step normalises by the global token count);
    variable_seq_lengths (PP > 1)  micro-batches differ in [b, s]; stages exchange shapes before activations.
                                   Not with the interleaved schedule (VPP), whose shape exchange deadlocks on
                                   gloo: the step pads micro-batches to one shape instead (batch.py).
    """
    variable = pipeline_parallel > 1 and virtual_pipeline_parallel is None
    kwargs = dict(calculate_per_token_loss=True, variable_seq_lengths=variable)
    if variable:  # no MoE here; megatron-core rejects its default MoE dispatcher with variable lengths
        kwargs["moe_token_dispatcher_type"] = "alltoall"
    kwargs.update(overrides)
    return transformer_config(arch, tensor_parallel, pipeline_parallel, virtual_pipeline_parallel,
                              params_dtype=params_dtype, sequence_parallel=sequence_parallel, **kwargs)


def build_model_chunks(arch: ModelArch, config) -> List[torch.nn.Module]:
    """This rank's GPTModel chunk(s) (one per virtual stage), on this rank's device, not yet DDP-wrapped."""
    from megatron.core import parallel_state as mpu

    vpp = mpu.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for vp_stage in (range(vpp) if vpp is not None else [None]):
        pre = mpu.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = mpu.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        with cuda_to_cpu():
            model = build_gpt_model(arch, config, pre_process=pre, post_process=post, vp_stage=vp_stage)
        if not cpu_mode():
            model = model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks


def wrap_with_ddp(chunks: List[torch.nn.Module], use_distributed_optimizer: bool = False,
                  bucket_size: Optional[int] = None) -> List[torch.nn.Module]:
    """megatron-core DistributedDataParallel around each chunk: fp32 gradient buffers (``main_grad``),
    gradient reduction at the end of the step (no overlap: simpler, and the only mode gloo supports here),
    reduce-scatter instead of all-reduce with the distributed optimizer. Parameters are broadcast from DP
    rank 0 so replicas start identical."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        overlap_param_gather=False,
        use_distributed_optimizer=use_distributed_optimizer,
        bucket_size=bucket_size,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        with cuda_to_cpu():
            ddp = DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                          disable_bucketing=i > 0)
            ddp.broadcast_params()
        wrapped.append(ddp)
    return wrapped


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP (or the module itself)."""
    while hasattr(module, "module"):
        module = module.module
    return module

"""Process groups from torchrun's environment: torch.distributed + megatron-core parallel_state.

gloo on CPU, NCCL on GPU. ``initialize_parallel(tp, pp)`` is the one call a training or test script makes;
the data-parallel size is what is left of the world: ``world = tp * pp * dp``.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_simko.parallel.cpu_shims import cpu_mode, install_cpu_shims
from megatron_simko.parallel.devices import trainer_device


@dataclass(frozen=True)
class ParallelLayout:
    """This rank's place in the TP × PP × DP grid, and its trainer device (``devices.trainer_device``)."""

    world_size: int
    rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def free_port() -> int:
    """A TCP port that is free now on this machine (for a launch's MASTER_PORT; fixed ports collide)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: int = 30) -> None:
    """torch.distributed from torchrun's env (RANK, WORLD_SIZE, MASTER_ADDR/PORT); single process if unset
    (on a free port, so that concurrent single-process runs do not collide)."""
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        os.environ["MASTER_PORT"] = str(free_port())
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    if cpu_mode():
        backend = "gloo"
    else:
        backend = "nccl"
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def initialize_parallel(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    virtual_pipeline_parallel: Optional[int] = None,
    seed: int = 1234,
) -> ParallelLayout:
    """Initialize torch.distributed, megatron-core's parallel_state and its RNG tracker; return the layout."""
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel as mcore_tp

    install_cpu_shims()
    init_distributed()
    world = dist.get_world_size()
    if world % (tensor_parallel * pipeline_parallel) != 0:
        raise ValueError(
            f"world size {world} is not divisible by tensor_parallel ({tensor_parallel}) × "
            f"pipeline_parallel ({pipeline_parallel}); launch tp·pp·dp processes"
        )
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline_parallel,
    )
    # The inference tracker keeps RNG state on the CPU generator (no CUDA RNG needed); same streams on GPU.
    mcore_tp.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=cpu_mode())
    torch.manual_seed(seed)
    return current_layout()


def current_layout() -> ParallelLayout:
    from megatron.core import parallel_state as mpu

    return ParallelLayout(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tp=mpu.get_tensor_model_parallel_world_size(),
        pp=mpu.get_pipeline_model_parallel_world_size(),
        dp=mpu.get_data_parallel_world_size(),
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        dp_rank=mpu.get_data_parallel_rank(),
        device=trainer_device(),
    )


def destroy_parallel() -> None:
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

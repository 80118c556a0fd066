"""Where the RL loop's tensors live: one device policy, decided here.

* **Trainer device** (:func:`trainer_device`, also ``ParallelLayout.device``): this rank's GPU, or the CPU when
  there is none. Every per-step tensor the trainer touches lives there. The rollout side hands over plain
  Python lists (token ids, log-probs, rewards); ``experience.build_experience(..., device=)`` packs them and
  moves the resulting ``RLBatch`` to the trainer device once, so forward-only statistics, the batch and the
  loss meet on one device. Functions that still combine a trainer-side tensor with a rollout-side one
  (``rollout.consistency``, ``metrics.token_metrics``) move the rollout side to the trainer tensor's device
  explicitly.
* **Collective device** (:func:`collective_device`): a tensor handed to torch.distributed must be on its
  group's backend device — CUDA for NCCL, the CPU for gloo — whatever device it was computed on.
  :func:`all_reduce` moves it there and the result back.
* Python numbers (``float()``, ``.tolist()``) are read only from reduced results, once per metric group.

The CPU tests check the combining functions with trainer tensors on the ``meta`` device: like a CUDA tensor,
a meta tensor refuses to meet a (non-scalar) CPU tensor in one operation ("Tensor on device cpu is not on the
expected device meta"), so a forgotten move fails there instead of on the first GPU step.
"""
from __future__ import annotations

import gc
from typing import Optional

import torch
import torch.distributed as dist

from megatron_simko.parallel.cpu_shims import cpu_mode

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def trainer_device() -> torch.device:
    """This rank's GPU (torchrun sets it from LOCAL_RANK), or the CPU without one."""
    return torch.device("cpu") if cpu_mode() else torch.device("cuda", torch.cuda.current_device())


def release_allocator_cache() -> None:
    """Return PyTorch's cached device blocks to the driver: ``gc.collect()`` (drops unreachable tensors still
    holding blocks) then ``torch.cuda.empty_cache()``. The caching allocator keeps the training phase's peak
    reserved after the tensors die; a colocated engine that allocates outside it (vLLM's sleep-mode wake-up,
    its KV cache) cannot get that memory until it is released. No-op for the device cache on CPU."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def collective_device(group=None) -> torch.device:
    """The device a tensor must be on for a collective over ``group``: this rank's GPU for NCCL, else the CPU."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """The reduction of ``tensor`` over ``group`` (``op``: sum | max | min), returned on ``tensor``'s device.

    ``tensor`` itself is left unchanged: the reduction runs on a copy placed on the backend's device.
    Without an initialized process group (one process) the copy is returned as is."""
    if op not in _OPS:
        raise ValueError(f"op must be one of {sorted(_OPS)}, got {op!r}")
    if not (dist.is_available() and dist.is_initialized()):
        return tensor.clone()
    buf = tensor.detach().to(collective_device(group), copy=True)
    dist.all_reduce(buf, op=_OPS[op], group=group)
    return buf.to(tensor.device)


def check_same_device(what: str, **tensors: Optional[torch.Tensor]) -> torch.device:
    """The one device all given tensors (None skipped) are on; a ValueError naming each one's device if not."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"{what}: tensors are on different devices ({listed}); move them to one device first")
    return next(iter(devices.values())) if devices else torch.device("cpu")

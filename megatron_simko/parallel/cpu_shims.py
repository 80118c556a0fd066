"""CPU compatibility shims for megatron-core — the only place the project patches it.

megatron-core hard-codes CUDA in a few spots that no config flag reaches (../shared/ENVIRONMENT.md):
  1. ``GlobalMemoryBuffer.get_tensor`` and the pipeline p2p receive buffers use ``torch.cuda.current_device()``;
  2. the pipeline schedules allocate ``torch.zeros([], device="cuda")``;
  3. the optimizer (FP32Optimizer, clip_grads, the distributed optimizer) allocates on "cuda" and checks
     ``param.type() == 'torch.cuda.FloatTensor'`` (asserts, or raises TypeError, for a CPU tensor);
  4. with tied embeddings and PP > 1, GPTModel's constructor moves the shared embedding with
     ``weight.data.cuda()`` before all-reducing it between the first and last stage.
On a machine without a GPU we (1) answer ``torch.cuda.current_device()`` with the CPU device and make
``torch.cuda.synchronize()`` a no-op, and (2) run the schedule and the optimizer's construction / step under
:class:`CudaToCpuMode`, a ``TorchFunctionMode`` that rewrites ``device="cuda"`` to ``"cpu"`` for tensor
factories and (3) answers the query form ``t.type()`` of a CPU tensor with its CUDA name
("torch.FloatTensor" → "torch.cuda.FloatTensor"), so those checks see the dtype they test for, and (4)
turns ``t.cuda()`` into a no-op (the tensor stays on the CPU). Build the model under the same context.
Nothing here is active when CUDA is available.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False


def cpu_mode() -> bool:
    """True when megatron-core must run on the CPU (no usable CUDA device)."""
    return not torch.cuda.is_available()


def install_cpu_shims() -> None:
    """Process-wide patches of ``torch.cuda`` entry points megatron-core calls unconditionally (CPU only)."""
    global _INSTALLED
    if _INSTALLED or not cpu_mode():
        return
    torch.cuda.current_device = lambda: torch.device("cpu")  # used as `device=` for buffers
    torch.cuda.synchronize = lambda device=None: None
    _INSTALLED = True


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int)  # a bare ordinal means a CUDA device


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device=<cuda>`` keyword arguments to the CPU for every torch function called inside,
    reports a CPU tensor's ``t.type()`` (query form only) under its CUDA name, and makes ``t.cuda()`` return
    ``t`` (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": torch.device("cpu")}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not args[0].is_cuda else name
        return func(*args, **kwargs)


def cuda_to_cpu() -> contextlib.AbstractContextManager:
    """Context for megatron-core calls that allocate on "cuda" (the pipeline schedules); no-op with a GPU."""
    return CudaToCpuMode() if cpu_mode() else contextlib.nullcontext()


"""CPU compatibility shims for megatron-core — the only place the project patches it.

megatron-core hard-codes CUDA in a few spots that no config flag reaches (../shared/ENVIRONMENT.md):
  1. ``GlobalMemoryBuffer.get_tensor`` and the pipeline p2p receive buffers use ``torch.cuda.current_device()``;
  2. the pipeline schedules allocate ``torch.zeros([], device="cuda")``.
On a machine without a GPU we (1) answer ``torch.cuda.current_device()`` with the CPU device and make
``torch.cuda.synchronize()`` a no-op, and (2) run the schedule under :class:`CudaToCpuMode`, a
``TorchFunctionMode`` that rewrites ``device="cuda"`` to ``"cpu"`` for tensor factories.
Nothing here is active when CUDA is available.
"""
from __future__ import annotations

import contextlib
import functools

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
    """Rewrites ``device=<cuda>`` keyword arguments to the CPU for every torch function called inside."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": torch.device("cpu")}
        return func(*args, **kwargs)


def cuda_to_cpu() -> contextlib.AbstractContextManager:
    """Context for megatron-core calls that allocate on "cuda" (the pipeline schedules); no-op with a GPU."""
    return CudaToCpuMode() if cpu_mode() else contextlib.nullcontext()


def on_cpu_if_needed(fn):
    """Decorator form of :func:`cuda_to_cpu`, e.g. around ``get_forward_backward_func()``'s result."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with cuda_to_cpu():
            return fn(*args, **kwargs)

    return wrapper

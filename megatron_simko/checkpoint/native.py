"""The native Megatron checkpoint (what ``hf-to-megatron`` writes and the trainer loads), and model loaders.

Layout::

    MEG/megatron_simko_checkpoint.json     format version, arch, HF config, tp, pp, padded vocab, dtype, ...
    MEG/mp_rank_{tp:02d}_{pp:03d}/          one directory per model-parallel rank
        model-0000k-of-0000N.safetensors    that rank's Megatron parameters (TP shards; GLOBAL layer indices,
        model.safetensors.index.json        local-spec names, see models/hf_mapping/)

A tied model with PP > 1 stores ``output_layer.weight`` (the last stage's copy of the embedding) in the last stage.
Loaders take any model chunk (local or TE spelling, any PP stage / virtual chunk) and accept a checkpoint of a
different TP/PP: shards are merged and re-split through the mapping.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from megatron_simko.checkpoint.safetensors_io import CheckpointError, SafetensorsDir
from megatron_simko.models import hf_mapping as hm
from megatron_simko.models.gpt import ModelArch, padded_vocab_size

FORMAT_NAME = "megatron_simko.native"
FORMAT_VERSION = 1
META_NAME = "megatron_simko_checkpoint.json"


def rank_dir_name(tp_rank: int, pp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def stage_of(megatron_name: str, arch: ModelArch, pp: int) -> int:
    """The pipeline stage holding a (global) parameter with evenly divided layers."""
    pm = hm.mapping_for(megatron_name, arch)
    if pm.layer is not None:
        return pm.layer // (arch.num_layers // pp)
    if pm.megatron_name == "embedding.word_embeddings.weight":
        return 0
    return pp - 1  # final norm, output layer


def stage_param_names(arch: ModelArch, pp: int) -> List[List[str]]:
    """Megatron parameter names stored by each PP stage, in order."""
    stages: List[List[str]] = [[] for _ in range(pp)]
    for pm in hm.param_mappings(arch, include_tied_output=arch.tie_word_embeddings and pp > 1):
        stages[stage_of(pm.megatron_name, arch, pp)].append(pm.megatron_name)
    return stages


@dataclass
class CheckpointMeta:
    arch: ModelArch
    hf_config: dict
    tp: int
    pp: int
    padded_vocab_size: int
    dtype: str
    hf_tensor_names: List[str]  # the original HF checkpoint's tensor set (kept on the way back)
    hf_tensor_dtypes: Dict[str, str]
    source_hf_dir: Optional[str] = None
    extra: Optional[dict] = None

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "arch": self.arch.to_dict(),
            "hf_config": self.hf_config,
            "tensor_parallel": self.tp,
            "pipeline_parallel": self.pp,
            "padded_vocab_size": self.padded_vocab_size,
            "dtype": self.dtype,
            "layers_per_stage": self.arch.num_layers // self.pp,
            "rank_dirs": [rank_dir_name(t, p) for p in range(self.pp) for t in range(self.tp)],
            "hf_tensor_names": self.hf_tensor_names,
            "hf_tensor_dtypes": self.hf_tensor_dtypes,
            "source_hf_dir": self.source_hf_dir,
            **({"extra": self.extra} if self.extra else {}),
        }


def write_meta(directory: str, meta: CheckpointMeta) -> None:
    with open(os.path.join(directory, META_NAME), "w", encoding="utf-8") as f:
        json.dump(meta.to_json(), f, indent=2)


def read_meta(directory: str) -> CheckpointMeta:
    path = os.path.join(directory, META_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory!r} is not a megatron_simko checkpoint (no {META_NAME})")
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    if d.get("format") != FORMAT_NAME or int(d.get("format_version", -1)) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported format {d.get('format')!r} v{d.get('format_version')}")
    return CheckpointMeta(
        arch=ModelArch(**d["arch"]), hf_config=d["hf_config"], tp=int(d["tensor_parallel"]),
        pp=int(d["pipeline_parallel"]), padded_vocab_size=int(d["padded_vocab_size"]), dtype=d["dtype"],
        hf_tensor_names=list(d["hf_tensor_names"]), hf_tensor_dtypes=dict(d.get("hf_tensor_dtypes", {})),
        source_hf_dir=d.get("source_hf_dir"), extra=d.get("extra"),
    )


class NativeCheckpoint:
    """Read access to a native checkpoint: TP shards of any (global) parameter, lazily, rank dir by rank dir."""

    def __init__(self, directory: str):
        self.directory = directory
        self.meta = read_meta(directory)
        self.arch = self.meta.arch
        self._dirs: Dict[Tuple[int, int], SafetensorsDir] = {}
        for p in range(self.meta.pp):  # open every rank's index now: missing/truncated shards fail early
            for t in range(self.meta.tp):
                path = os.path.join(directory, rank_dir_name(t, p))
                if not os.path.isdir(path):
                    raise CheckpointError(f"checkpoint {directory!r} lacks rank directory {rank_dir_name(t, p)}")
                self._dirs[(t, p)] = SafetensorsDir(path)

    def has(self, megatron_name: str) -> bool:
        stage = stage_of(megatron_name, self.arch, self.meta.pp)
        return megatron_name in self._dirs[(0, stage)]

    def shard(self, megatron_name: str, tp_rank: int) -> torch.Tensor:
        stage = stage_of(megatron_name, self.arch, self.meta.pp)
        return self._dirs[(tp_rank, stage)].read(megatron_name)

    def shards(self, megatron_name: str) -> List[torch.Tensor]:
        """All TP shards (rank order) of a parameter. A tied model's ``output_layer.weight`` falls back to the
        embedding when this checkpoint has no separate copy (PP=1)."""
        name = hm.canonical_name(megatron_name)
        if name == "output_layer.weight" and self.arch.tie_word_embeddings and not self.has(name):
            name = "embedding.word_embeddings.weight"
        return [self.shard(name, t) for t in range(self.meta.tp)]

    def param_shard(self, megatron_name: str, tp_rank: int, tp: int) -> torch.Tensor:
        """This parameter's shard for a model at ``tp`` (re-split from the checkpoint's TP when they differ)."""
        name = hm.canonical_name(megatron_name)
        if tp == self.meta.tp:
            if name == "output_layer.weight" and self.arch.tie_word_embeddings and not self.has(name):
                name = "embedding.word_embeddings.weight"
            return self.shard(name, tp_rank)
        return hm.reshard(name, self.shards(name), self.arch, tp, tp_rank)


def _check_arch(model_arch: Optional[ModelArch], ckpt_arch: ModelArch) -> None:
    if model_arch is None:
        return
    a, b = model_arch.to_dict(), ckpt_arch.to_dict()
    diff = {k: (a[k], b[k]) for k in a if k not in ("max_position_embeddings",) and a[k] != b.get(k)}
    if diff:
        raise ValueError(f"checkpoint architecture differs from the model's: {diff} (model, checkpoint)")


@torch.no_grad()
def _copy_into(model_chunk: torch.nn.Module, shard_for, description: str) -> Dict[str, int]:
    """Fill every parameter of ``model_chunk`` from ``shard_for(global_name) -> tensor``; shapes must match."""
    loaded = 0
    for global_name, own_name, param in hm.global_named_parameters(model_chunk):
        tensor = shard_for(global_name)
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"{own_name} ({global_name}): {description} gives shape {tuple(tensor.shape)}, "
                             f"the model has {tuple(param.shape)} (mismatched TP or vocabulary padding?)")
        param.copy_(tensor.to(param.dtype))
        loaded += 1
    return {"parameters": loaded}


def load_into_model(model_chunk: torch.nn.Module, meg_dir: str, tp_rank: int, tp: int, pp_rank: int = 0, pp: int = 1,
                    arch: Optional[ModelArch] = None) -> Dict[str, int]:
    """Load a native checkpoint into one model chunk at (``tp_rank``/``tp``, ``pp_rank``/``pp``).

    The checkpoint may have been written at another TP/PP: names are global, shards are re-split as needed.
    ``pp_rank``/``pp`` are informational (the chunk's own layer numbers decide which layers it holds).
    Casts to the parameters' dtype. Raises ValueError on any architecture or shape mismatch.
    """
    ckpt = NativeCheckpoint(meg_dir)
    _check_arch(arch, ckpt.arch)
    if ckpt.meta.padded_vocab_size != padded_vocab_size(ckpt.arch.vocab_size, ckpt.meta.tp):
        raise CheckpointError(f"{meg_dir}: padded vocabulary {ckpt.meta.padded_vocab_size} is not the convention")
    return _copy_into(model_chunk, lambda name: ckpt.param_shard(name, tp_rank, tp),
                      f"checkpoint {meg_dir} (tp={ckpt.meta.tp}, pp={ckpt.meta.pp})")


def load_hf_into_model(model_chunk: torch.nn.Module, hf_dir: str, tp_rank: int, tp: int,
                       arch: Optional[ModelArch] = None) -> Dict[str, int]:
    """Load a Hugging Face safetensors checkpoint straight into one model chunk, reading only this rank's slices."""
    from megatron_simko.models.gpt import arch_from_hf_config

    hf_arch = arch_from_hf_config(hf_dir)
    _check_arch(arch, hf_arch)
    src = SafetensorsDir(hf_dir)
    return _copy_into(model_chunk, lambda name: hm.hf_to_megatron(name, src.read_slice, hf_arch, tp_rank, tp),
                      f"Hugging Face checkpoint {hf_dir}")

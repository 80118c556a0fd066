"""Hugging Face <-> Megatron weight mapping: names, fused layouts, vocabulary padding, TP split and merge.

The single source of truth shared by checkpoint conversion (``megatron_simko/checkpoint``) and the
Megatron -> vLLM weight sync. Pure tensor code: no process groups, no I/O.

Two modules, one API (this package; ``from megatron_simko.models import hf_mapping as hm``):

  names.py    which Megatron parameter is built from which HF tensors (``ParamMapping``, ``param_mappings``,
              ``mapping_for``), name spellings (TE, ``module.`` prefixes, global vs local layer index)
  tensors.py  the tensors: fused QKV / SwiGLU layouts, vocabulary padding, TP split / merge / reshard, and the
              HF <-> Megatron conversion of one parameter, all from one description (``shard_segments``)
"""
from megatron_simko.models.hf_mapping.names import (
    FC1,
    QKV,
    REPLICATED,
    ROW_PARALLEL,
    VOCAB,
    ParamMapping,
    canonical_name,
    global_named_parameters,
    hf_tensor_names,
    layer_offset,
    mapping_for,
    megatron_name_for_hf,
    model_param_name,
    param_mappings,
    to_global_name,
    to_local_name,
)
from megatron_simko.models.hf_mapping.tensors import (
    PAD,
    ReadFn,
    Segment,
    hf_shape,
    hf_to_megatron,
    iter_hf_tensors,
    megatron_shape,
    megatron_to_hf,
    merge_tp_shards,
    reshard,
    shard_segments,
    split_tp,
)

__all__ = [
    "ParamMapping", "Segment", "ReadFn", "VOCAB", "QKV", "FC1", "ROW_PARALLEL", "REPLICATED", "PAD",
    "canonical_name", "model_param_name", "to_global_name", "to_local_name", "layer_offset",
    "global_named_parameters", "param_mappings", "mapping_for", "hf_tensor_names", "megatron_name_for_hf",
    "shard_segments", "hf_to_megatron", "megatron_to_hf", "merge_tp_shards", "split_tp", "reshard",
    "megatron_shape", "hf_shape", "iter_hf_tensors",
]

"""Which Megatron parameter is built from which Hugging Face tensors, and the spellings of parameter names.

Megatron parameters (local-spec spelling, GLOBAL layer index ``i``), with ``d = head_dim``,
``nq`` query heads, ``ng`` KV groups, ``qpg = nq / ng`` query heads per group, ``f`` = FFN size:

  embedding.word_embeddings.weight                     [Vpad, h]   <- model.embed_tokens.weight [V, h] + zero rows
  decoder.layers.i.input_layernorm.weight              [h]         <- model.layers.i.input_layernorm.weight
  decoder.layers.i.self_attention.linear_qkv.weight    [(nq+2ng)·d, h]  per group g: [q_g (qpg·d); k_g (d); v_g (d)]
  decoder.layers.i.self_attention.linear_qkv.bias      [(nq+2ng)·d]     same interleave (Qwen2 only)
  decoder.layers.i.self_attention.linear_proj.weight   [h, nq·d]   <- o_proj.weight
  decoder.layers.i.pre_mlp_layernorm.weight            [h]         <- post_attention_layernorm.weight
  decoder.layers.i.mlp.linear_fc1.weight               [2f, h]     <- [gate_proj; up_proj]
  decoder.layers.i.mlp.linear_fc2.weight               [h, f]      <- down_proj.weight
  decoder.final_layernorm.weight                       [h]         <- model.norm.weight
  output_layer.weight                                  [Vpad, h]   <- lm_head.weight + zero rows (untied; tied
                                                                      + PP>1: the last stage's copy of the embedding)

The Transformer Engine spec spells the two pre-norms differently (fused into the following linear):
:func:`canonical_name` / :func:`model_param_name` translate.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from megatron_simko.models.gpt import ModelArch

# Kinds of Megatron parameters (how they are laid out and split).
VOCAB = "vocab"  # embedding / output rows, padded to Vpad, split on rows
QKV = "qkv"  # fused, per-group interleaved Q/K/V (weight or bias), split on rows
FC1 = "fc1"  # [gate; up], each split on rows, per-rank concatenation
ROW_PARALLEL = "row_parallel"  # RowParallelLinear weight (o_proj, down_proj): split on columns (dim 1)
REPLICATED = "replicated"  # norms: identical on every TP rank


@dataclass(frozen=True)
class ParamMapping:
    """One Megatron parameter and the Hugging Face tensors it is built from."""

    megatron_name: str  # global layer index, local-spec spelling
    hf_names: Tuple[str, ...]  # in layout order (q, k, v / gate, up / the single tensor)
    kind: str  # VOCAB | QKV | FC1 | ROW_PARALLEL | REPLICATED
    tp_dim: Optional[int]  # dimension split across TP ranks (None: replicated)
    layer: Optional[int]  # global layer index, None outside the decoder layers


# --------------------------------------------------------------------------------------------- names

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# Transformer Engine spelling -> local spelling (per-layer suffixes).
_TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_LOCAL_TO_TE = {v: k for k, v in _TE_TO_LOCAL.items()}


def _layer_table(arch: ModelArch) -> Dict[str, Tuple[Tuple[str, ...], str, Optional[int]]]:
    """Per-layer Megatron suffix -> (HF suffixes in layout order, kind, tp_dim)."""
    table = {
        "input_layernorm.weight": (("input_layernorm.weight",), REPLICATED, None),
        "self_attention.linear_qkv.weight": (
            ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), QKV, 0),
        "self_attention.linear_proj.weight": (("self_attn.o_proj.weight",), ROW_PARALLEL, 1),
        "pre_mlp_layernorm.weight": (("post_attention_layernorm.weight",), REPLICATED, None),
        "mlp.linear_fc1.weight": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), FC1, 0),
        "mlp.linear_fc2.weight": (("mlp.down_proj.weight",), ROW_PARALLEL, 1),
    }
    if arch.qkv_bias:
        table["self_attention.linear_qkv.bias"] = (
            ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), QKV, 0)
    return table


_LAYER_ORDER = (  # the order parameters (and HF tensors) are listed in, per layer
    "input_layernorm.weight",
    "self_attention.linear_qkv.weight",
    "self_attention.linear_qkv.bias",
    "self_attention.linear_proj.weight",
    "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.weight",
    "mlp.linear_fc2.weight",
)


def canonical_name(name: str) -> str:
    """A model parameter name in local-spec spelling: strips DDP/Float16 ``module.`` prefixes, maps TE fused norms."""
    while name.startswith("module."):
        name = name[len("module."):]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _TE_TO_LOCAL:
        return f"decoder.layers.{m.group(1)}.{_TE_TO_LOCAL[m.group(2)]}"
    return name


def model_param_name(canonical: str, transformer_engine: bool) -> str:
    """The inverse of :func:`canonical_name` for a model built with (``True``) or without the TE spec."""
    if not transformer_engine:
        return canonical
    m = _LAYER_RE.match(canonical)
    if m and m.group(2) in _LOCAL_TO_TE:
        return f"decoder.layers.{m.group(1)}.{_LOCAL_TO_TE[m.group(2)]}"
    return canonical


def to_global_name(local_name: str, layer_offset: int) -> str:
    """``decoder.layers.{local}.x`` -> ``decoder.layers.{local + offset}.x`` (other names unchanged)."""
    m = _LAYER_RE.match(local_name)
    if not m:
        return local_name
    return f"decoder.layers.{int(m.group(1)) + layer_offset}.{m.group(2)}"


def to_local_name(global_name: str, layer_offset: int) -> str:
    """Inverse of :func:`to_global_name`."""
    return to_global_name(global_name, -layer_offset)


def layer_offset(arch: ModelArch, pp_rank: int, pp: int, vp_stage: Optional[int] = None,
                 vp_size: Optional[int] = None) -> int:
    """Global index of a pipeline stage's (or virtual chunk's) first layer, for evenly divided layers."""
    chunks = pp * (vp_size or 1)
    per_chunk = arch.num_layers // chunks
    return ((vp_stage or 0) * pp + pp_rank) * per_chunk


def global_named_parameters(model_chunk: torch.nn.Module) -> Iterator[Tuple[str, str, torch.nn.Parameter]]:
    """``(global canonical name, model's own name, parameter)`` for a live GPTModel chunk (any PP/VPP stage).

    The global layer index is read from each TransformerLayer's ``layer_number`` (1-based, global), so no
    offset arithmetic is needed. Names may carry ``module.`` prefixes (DDP wrappers) and TE spelling.
    """
    module = model_chunk
    while hasattr(module, "module") and not hasattr(module, "decoder"):
        module = module.module
    layer_numbers: Dict[int, int] = {}
    decoder = getattr(module, "decoder", None)
    if decoder is not None and hasattr(decoder, "layers"):
        for local, layer in enumerate(decoder.layers):
            layer_numbers[local] = int(layer.layer_number) - 1
    for own_name, param in model_chunk.named_parameters():
        name = canonical_name(own_name)
        m = _LAYER_RE.match(name)
        if m:
            local = int(m.group(1))
            name = f"decoder.layers.{layer_numbers.get(local, local)}.{m.group(2)}"
        yield name, own_name, param


# ------------------------------------------------------------------------------------------ mappings

def param_mappings(arch: ModelArch, include_tied_output: bool = False) -> List[ParamMapping]:
    """Every Megatron parameter of the full model in a fixed order (embedding, layers 0..L-1, norm, output).

    ``include_tied_output``: also list ``output_layer.weight`` for a tied model (the copy the last pipeline stage
    keeps when PP > 1; it maps to the embedding's HF tensor).
    """
    out = [ParamMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB, 0, None)]
    table = _layer_table(arch)
    for i in range(arch.num_layers):
        for suffix in _LAYER_ORDER:
            if suffix not in table:
                continue
            hf, kind, dim = table[suffix]
            out.append(ParamMapping(f"decoder.layers.{i}.{suffix}",
                                    tuple(f"model.layers.{i}.{s}" for s in hf), kind, dim, i))
    out.append(ParamMapping("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED, None, None))
    if not arch.tie_word_embeddings:
        out.append(ParamMapping("output_layer.weight", ("lm_head.weight",), VOCAB, 0, None))
    elif include_tied_output:
        out.append(ParamMapping("output_layer.weight", ("model.embed_tokens.weight",), VOCAB, 0, None))
    return out


def mapping_for(megatron_name: str, arch: ModelArch) -> ParamMapping:
    """The :class:`ParamMapping` of one Megatron parameter (global index; TE spelling and prefixes accepted)."""
    name = canonical_name(megatron_name)
    if name == "embedding.word_embeddings.weight":
        return ParamMapping(name, ("model.embed_tokens.weight",), VOCAB, 0, None)
    if name == "decoder.final_layernorm.weight":
        return ParamMapping(name, ("model.norm.weight",), REPLICATED, None, None)
    if name == "output_layer.weight":
        hf = "model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"
        return ParamMapping(name, (hf,), VOCAB, 0, None)
    m = _LAYER_RE.match(name)
    table = _layer_table(arch)
    if m and m.group(2) in table:
        i = int(m.group(1))
        if not 0 <= i < arch.num_layers:
            raise KeyError(f"{megatron_name!r}: layer {i} outside 0..{arch.num_layers - 1}")
        hf, kind, dim = table[m.group(2)]
        return ParamMapping(name, tuple(f"model.layers.{i}.{s}" for s in hf), kind, dim, i)
    raise KeyError(f"{megatron_name!r} is not a parameter of a {arch.family} GPTModel")


def hf_tensor_names(arch: ModelArch) -> List[str]:
    """The Hugging Face tensor names of the model (no ``lm_head.weight`` when embeddings are tied)."""
    return [hf for m in param_mappings(arch) for hf in m.hf_names]


def megatron_name_for_hf(hf_name: str, arch: ModelArch) -> str:
    """The Megatron parameter an HF tensor belongs to (tied ``lm_head.weight`` -> the embedding)."""
    if hf_name == "lm_head.weight" and arch.tie_word_embeddings:
        return "embedding.word_embeddings.weight"
    m = _HF_LAYER_RE.match(hf_name)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        for suffix, (hf, _, _) in _layer_table(arch).items():
            if rest in hf:
                return f"decoder.layers.{i}.{suffix}"
    else:
        for pm in param_mappings(arch):
            if pm.layer is None and hf_name in pm.hf_names:
                return pm.megatron_name
    raise KeyError(f"{hf_name!r} is not a tensor of a {arch.family} Hugging Face checkpoint")

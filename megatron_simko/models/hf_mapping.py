"""Hugging Face <-> Megatron weight mapping: names, fused layouts, vocabulary padding, TP split and merge.

The single source of truth shared by checkpoint conversion (``megatron_simko/checkpoint``) and the
Megatron -> vLLM weight sync. Pure tensor code: no process groups, no I/O.

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

Tensor parallelism (megatron-core ``ColumnParallelLinear`` / ``RowParallelLinear`` / ``VocabParallelEmbedding``):
rank r holds the r-th of ``tp`` equal chunks along ``tp_dim`` (0 = rows, 1 = columns) of the full tensor, with one
exception: ``linear_fc1`` holds ``[gate chunk r; up chunk r]`` (megatron's SwiGLU does ``chunk(2)`` per rank).
QKV is chunked as the full fused tensor, which splits whole query groups when ``tp`` divides ``ng``.

Everything below derives from :func:`shard_segments`, which describes rank r's shard as a list of row/column
ranges of Hugging Face tensors (or of zero padding). ``hf_to_megatron`` reads those ranges, ``megatron_to_hf``
writes them back, and merge/split go through the same description, so the directions cannot disagree.
The Transformer Engine spec spells the two pre-norms differently (fused into the following linear):
:func:`canonical_name` / :func:`model_param_name` translate.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from megatron_simko.models.gpt import ModelArch, padded_vocab_size

# Kinds of Megatron parameters (how they are laid out and split).
VOCAB = "vocab"  # embedding / output rows, padded to Vpad, split on rows
QKV = "qkv"  # fused, per-group interleaved Q/K/V (weight or bias), split on rows
FC1 = "fc1"  # [gate; up], each split on rows, per-rank concatenation
ROW_PARALLEL = "row_parallel"  # RowParallelLinear weight (o_proj, down_proj): split on columns (dim 1)
REPLICATED = "replicated"  # norms: identical on every TP rank

PAD = "<pad>"  # pseudo tensor name for vocabulary padding rows in a segment list

ReadFn = Callable[[str, int, int, int], torch.Tensor]  # (hf_name, dim, start, stop) -> tensor slice


@dataclass(frozen=True)
class ParamMapping:
    """One Megatron parameter and the Hugging Face tensors it is built from."""

    megatron_name: str  # global layer index, local-spec spelling
    hf_names: Tuple[str, ...]  # in layout order (q, k, v / gate, up / the single tensor)
    kind: str  # VOCAB | QKV | FC1 | ROW_PARALLEL | REPLICATED
    tp_dim: Optional[int]  # dimension split across TP ranks (None: replicated)
    layer: Optional[int]  # global layer index, None outside the decoder layers


@dataclass(frozen=True)
class Segment:
    """``length`` entries along ``dim`` of HF tensor ``hf_name`` starting at ``start`` (``PAD``: zero rows)."""

    hf_name: str
    dim: int
    start: int
    length: int


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


# ------------------------------------------------------------------------------------------- layouts

def _hf_length(hf_name: str, arch: ModelArch) -> int:
    """Extent of an HF tensor along the dimension Megatron fuses/splits (dim 0, or dim 1 for row-parallel)."""
    d, nq, ng = arch.head_dim, arch.num_attention_heads, arch.num_query_groups
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return nq * d
    if hf_name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
        return ng * d
    if hf_name.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight")):
        return arch.ffn_hidden_size
    if hf_name.endswith("o_proj.weight"):
        return nq * d
    if hf_name in ("model.embed_tokens.weight", "lm_head.weight"):
        return arch.vocab_size
    return arch.hidden_size


def _full_segments(pm: ParamMapping, arch: ModelArch, padded_vocab: Optional[int]) -> List[Segment]:
    """The TP=1 (merged) layout of a parameter as HF ranges along its split dimension (dim 0 if replicated)."""
    dim = pm.tp_dim or 0
    if pm.kind == QKV:
        q, k, v = pm.hf_names
        d, qpg = arch.head_dim, arch.num_attention_heads // arch.num_query_groups
        segs = []
        for g in range(arch.num_query_groups):
            segs += [Segment(q, 0, g * qpg * d, qpg * d), Segment(k, 0, g * d, d), Segment(v, 0, g * d, d)]
        return segs
    if pm.kind == VOCAB:
        vp = padded_vocab if padded_vocab is not None else arch.vocab_size
        if vp < arch.vocab_size:
            raise ValueError(f"padded vocabulary {vp} is smaller than the real vocabulary {arch.vocab_size}")
        segs = [Segment(pm.hf_names[0], 0, 0, arch.vocab_size)]
        return segs + ([Segment(PAD, 0, 0, vp - arch.vocab_size)] if vp > arch.vocab_size else [])
    return [Segment(hf, dim, 0, _hf_length(hf, arch)) for hf in pm.hf_names]


def _cut(segments: Sequence[Segment], lo: int, hi: int) -> List[Segment]:
    """The part of a segment list covering positions [lo, hi) of the concatenation."""
    out, pos = [], 0
    for s in segments:
        a, b = max(lo, pos), min(hi, pos + s.length)
        if a < b:
            out.append(Segment(s.hf_name, s.dim, s.start + a - pos, b - a))
        pos += s.length
    return out


def shard_segments(megatron_name: Union[str, ParamMapping], arch: ModelArch, tp_rank: int = 0, tp: int = 1,
                   padded_vocab: Optional[int] = None) -> List[Segment]:
    """TP rank ``tp_rank``'s shard of a parameter, as the HF ranges concatenated along ``tp_dim`` (dim 0 if none).

    ``padded_vocab`` (vocabulary parameters only): rows of the full Megatron tensor, default
    ``padded_vocab_size(V, tp)``. Replicated parameters give the whole tensor on every rank.
    """
    pm = megatron_name if isinstance(megatron_name, ParamMapping) else mapping_for(megatron_name, arch)
    if not 0 <= tp_rank < tp:
        raise ValueError(f"tp_rank {tp_rank} outside 0..{tp - 1}")
    if pm.kind == VOCAB and padded_vocab is None:
        padded_vocab = padded_vocab_size(arch.vocab_size, tp)
    full = _full_segments(pm, arch, padded_vocab)
    if pm.kind == REPLICATED:
        return full
    if pm.kind == FC1:  # [gate_r; up_r]: each half chunked separately
        segs = []
        for s in full:
            if s.length % tp:
                raise ValueError(f"tensor_parallel={tp} does not divide {s.hf_name} ({s.length})")
            n = s.length // tp
            segs.append(Segment(s.hf_name, s.dim, tp_rank * n, n))
        return segs
    total = sum(s.length for s in full)
    if total % tp:
        raise ValueError(f"tensor_parallel={tp} does not divide {pm.megatron_name} ({total} along dim {pm.tp_dim})")
    n = total // tp
    return _cut(full, tp_rank * n, (tp_rank + 1) * n)


# ---------------------------------------------------------------------------------------- conversion

def _reader(hf_tensors: Union[Mapping[str, torch.Tensor], ReadFn]) -> ReadFn:
    if callable(hf_tensors) and not isinstance(hf_tensors, Mapping):
        return hf_tensors

    def read(name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        if name not in hf_tensors:
            raise KeyError(f"Hugging Face tensor {name!r} is missing")
        return hf_tensors[name].narrow(dim, start, stop - start)

    return read


def _assemble(segments: Sequence[Segment], read: ReadFn, ref_like: Optional[torch.Tensor] = None) -> torch.Tensor:
    pieces: List[Optional[torch.Tensor]] = []
    for s in segments:
        pieces.append(None if s.hf_name == PAD else read(s.hf_name, s.dim, s.start, s.start + s.length))
    ref = next((p for p in pieces if p is not None), ref_like)
    if ref is None:
        raise ValueError("a shard made only of padding needs a reference tensor for shape and dtype")
    dim = segments[0].dim
    for i, (s, p) in enumerate(zip(segments, pieces)):
        if p is None:
            shape = list(ref.shape)
            shape[dim] = s.length
            pieces[i] = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
    return pieces[0].clone() if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def hf_to_megatron(megatron_name: str, hf_tensors: Union[Mapping[str, torch.Tensor], ReadFn], arch: ModelArch,
                   tp_rank: int = 0, tp: int = 1, padded_vocab: Optional[int] = None) -> torch.Tensor:
    """TP rank ``tp_rank``'s shard of one Megatron parameter, built from Hugging Face tensors.

    ``hf_tensors``: a mapping HF name -> full tensor, or a reader ``read(hf_name, dim, start, stop)`` returning
    that slice (e.g. from ``safe_open(...).get_slice``), so only this rank's rows/columns are read.
    ``tp=1`` gives the full (merged) tensor. Returns a new tensor (never a view of the inputs) in the input dtype.
    """
    pm = mapping_for(megatron_name, arch)
    segs = shard_segments(pm, arch, tp_rank, tp, padded_vocab)
    read = _reader(hf_tensors)
    if all(s.hf_name == PAD for s in segs):  # a rank holding only padding rows (tiny vocab, large TP)
        ref = read(pm.hf_names[0], 0, 0, 1)
        return _assemble(segs, read, ref_like=ref)
    return _assemble(segs, read)


def _scatter(segments: Sequence[Segment], shard: torch.Tensor, into: Dict[str, List[Tuple[int, torch.Tensor]]]):
    dim = segments[0].dim
    expected = sum(s.length for s in segments)
    if shard.dim() <= dim or shard.shape[dim] != expected:
        raise ValueError(f"shard of shape {tuple(shard.shape)} does not match the layout: expected {expected} "
                         f"entries along dim {dim}")
    pos = 0
    for s in segments:
        into.setdefault(s.hf_name, []).append((s.start, shard.narrow(dim, pos, s.length)))
        pos += s.length


def _gather(pieces: List[Tuple[int, torch.Tensor]], dim: int, length: Optional[int], name: str) -> torch.Tensor:
    pieces = sorted(pieces, key=lambda p: p[0])
    pos = 0
    for start, p in pieces:
        if start != pos:
            raise ValueError(f"{name}: TP shards leave a gap or overlap at {pos} (next piece starts at {start})")
        pos += p.shape[dim]
    if length is not None and pos != length:
        raise ValueError(f"{name}: TP shards cover {pos} entries, expected {length}")
    return pieces[0][1].clone() if len(pieces) == 1 else torch.cat([p for _, p in pieces], dim=dim)


def _to_hf_space(pm: ParamMapping, shards: Sequence[torch.Tensor], arch: ModelArch
                 ) -> Tuple[Dict[str, List[Tuple[int, torch.Tensor]]], int]:
    """Place TP shards (rank order) into HF coordinates; returns pieces per HF name and the padded vocab."""
    tp = len(shards)
    padded_vocab = None
    if pm.kind == VOCAB:
        padded_vocab = sum(s.shape[0] for s in shards)
    if pm.kind == REPLICATED:
        shards = shards[:1]  # identical on every rank by construction
        tp = 1
    pieces: Dict[str, List[Tuple[int, torch.Tensor]]] = {}
    for r, shard in enumerate(shards):
        _scatter(shard_segments(pm, arch, r, tp, padded_vocab), shard, pieces)
    return pieces, padded_vocab


def megatron_to_hf(megatron_name: str, shards: Union[torch.Tensor, Sequence[torch.Tensor]], arch: ModelArch
                   ) -> List[Tuple[str, torch.Tensor]]:
    """Hugging Face ``(name, tensor)`` pairs of one Megatron parameter; padding rows are dropped.

    ``shards``: the full (TP-merged) tensor, or the list of all TP ranks' shards in rank order.
    ``output_layer.weight`` of a tied model (the last PP stage's copy) returns ``[]``: the embedding carries it.
    Returned tensors are fresh (contiguous, not views of the inputs).
    """
    pm = mapping_for(megatron_name, arch)
    if pm.megatron_name == "output_layer.weight" and arch.tie_word_embeddings:
        return []
    return _hf_pairs(pm, [shards] if isinstance(shards, torch.Tensor) else list(shards), arch)


def _hf_pairs(pm: ParamMapping, shards: Sequence[torch.Tensor], arch: ModelArch) -> List[Tuple[str, torch.Tensor]]:
    pieces, _ = _to_hf_space(pm, shards, arch)
    dim = pm.tp_dim or 0
    return [(hf, _gather(pieces[hf], dim, _hf_length(hf, arch), hf)) for hf in pm.hf_names]


def merge_tp_shards(megatron_name: str, shards: Sequence[torch.Tensor], arch: ModelArch) -> torch.Tensor:
    """All TP ranks' shards (rank order) -> the full Megatron tensor (the TP=1 layout; padding rows kept)."""
    pm = mapping_for(megatron_name, arch)
    if pm.kind == REPLICATED:
        return shards[0].clone()
    pieces, padded_vocab = _to_hf_space(pm, list(shards), arch)
    dim = pm.tp_dim or 0
    full = {name: _gather(p, dim, None, name) for name, p in pieces.items()}
    return _assemble(_full_segments(pm, arch, padded_vocab), _reader(full))


def split_tp(megatron_name: str, full: torch.Tensor, arch: ModelArch, tp: int, tp_rank: Optional[int] = None
             ) -> Union[torch.Tensor, List[torch.Tensor]]:
    """The full Megatron tensor -> TP shards (all, or only ``tp_rank``'s). Padding rows are kept as they are."""
    pm = mapping_for(megatron_name, arch)
    padded_vocab = full.shape[0] if pm.kind == VOCAB else None
    if padded_vocab is not None and padded_vocab % tp:
        raise ValueError(f"{megatron_name}: {padded_vocab} padded rows do not split over tensor_parallel={tp}")
    pieces, _ = _to_hf_space(pm, [full], arch)
    dim = pm.tp_dim or 0
    hf_space = {name: _gather(p, dim, None, name) for name, p in pieces.items()}
    read = _reader(hf_space)
    ranks = range(tp) if tp_rank is None else [tp_rank]
    out = [_assemble(shard_segments(pm, arch, r, tp, padded_vocab), read, ref_like=full) for r in ranks]
    return out if tp_rank is None else out[0]


def reshard(megatron_name: str, shards: Sequence[torch.Tensor], arch: ModelArch, tp: int,
            tp_rank: Optional[int] = None) -> Union[torch.Tensor, List[torch.Tensor]]:
    """Shards at one TP size -> shards at ``tp`` (vocabulary re-padded to ``padded_vocab_size(V, tp)``, zeros)."""
    pm = mapping_for(megatron_name, arch)
    if pm.kind == VOCAB:
        hf = dict(_hf_pairs(pm, list(shards), arch))
        ranks = range(tp) if tp_rank is None else [tp_rank]
        out = [hf_to_megatron(pm.megatron_name, hf, arch, r, tp) for r in ranks]
        return out if tp_rank is None else out[0]
    return split_tp(megatron_name, merge_tp_shards(megatron_name, shards, arch), arch, tp, tp_rank)


def megatron_shape(megatron_name: str, arch: ModelArch, tp: int = 1, padded_vocab: Optional[int] = None
                   ) -> Tuple[int, ...]:
    """Shape of one TP rank's shard (``tp=1``: the full tensor)."""
    pm = mapping_for(megatron_name, arch)
    h = arch.hidden_size
    n = sum(s.length for s in shard_segments(pm, arch, 0, tp, padded_vocab))
    if pm.kind == REPLICATED:
        return (h,)
    if pm.tp_dim == 1:
        return (h, n)
    if pm.megatron_name.endswith(".bias"):
        return (n,)
    return (n, h)


def hf_shape(hf_name: str, arch: ModelArch) -> Tuple[int, ...]:
    """Shape of a Hugging Face tensor of this architecture."""
    h = arch.hidden_size
    n = _hf_length(hf_name, arch)
    if hf_name.endswith(("o_proj.weight", "down_proj.weight")):
        return (h, n)
    if hf_name.endswith(".bias") or hf_name.endswith("norm.weight"):
        return (n,)
    return (n, h)


def iter_hf_tensors(named_params: Iterable[Tuple[str, torch.Tensor]], arch: ModelArch
                    ) -> Iterator[Tuple[str, torch.Tensor]]:
    """HF ``(name, tensor)`` pairs from ``(global Megatron name, full tensor or TP-shard list)`` pairs."""
    for name, value in named_params:
        yield from megatron_to_hf(name, value, arch)


__all__ = [
    "ParamMapping", "Segment", "ReadFn", "VOCAB", "QKV", "FC1", "ROW_PARALLEL", "REPLICATED", "PAD",
    "canonical_name", "model_param_name", "to_global_name", "to_local_name", "layer_offset",
    "global_named_parameters", "param_mappings", "mapping_for", "hf_tensor_names", "megatron_name_for_hf",
    "shard_segments", "hf_to_megatron", "megatron_to_hf", "merge_tp_shards", "split_tp", "reshard",
    "megatron_shape", "hf_shape", "iter_hf_tensors",
]

"""Hugging Face <-> Megatron tensors: fused layouts, vocabulary padding, TP split and merge, one parameter at a time
(the names: names.py). Pure tensor code: no process groups, no I/O.

Tensor parallelism (megatron-core ``ColumnParallelLinear`` / ``RowParallelLinear`` / ``VocabParallelEmbedding``):
rank r holds the r-th of ``tp`` equal chunks along ``tp_dim`` (0 = rows, 1 = columns) of the full tensor, with one
exception: ``linear_fc1`` holds ``[gate chunk r; up chunk r]`` (megatron's SwiGLU does ``chunk(2)`` per rank).
QKV is chunked as the full fused tensor, which splits whole query groups when ``tp`` divides ``ng``.

Everything below derives from :func:`shard_segments`, which describes rank r's shard as a list of row/column
ranges of Hugging Face tensors (or of zero padding). ``hf_to_megatron`` reads those ranges, ``megatron_to_hf``
writes them back, and merge/split go through the same description, so the directions cannot disagree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from megatron_simko.models.gpt import ModelArch, padded_vocab_size
from megatron_simko.models.hf_mapping.names import FC1, QKV, REPLICATED, VOCAB, ParamMapping, mapping_for

PAD = "<pad>"  # pseudo tensor name for vocabulary padding rows in a segment list

ReadFn = Callable[[str, int, int, int], torch.Tensor]  # (hf_name, dim, start, stop) -> tensor slice


@dataclass(frozen=True)
class Segment:
    """``length`` entries along ``dim`` of HF tensor ``hf_name`` starting at ``start`` (``PAD``: zero rows)."""

    hf_name: str
    dim: int
    start: int
    length: int


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

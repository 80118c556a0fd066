"""The per-token statistics of vocab_parallel.token_statistics straight from the last hidden states (issue 21).

The [N, V_local] logits are never materialised. Inputs: h [N, H], the hidden states after the final norm as the
output layer sees them (gathered over the sequence under sequence parallelism; models/output_head.py), and
W [V_local, H], this TP rank's rows [r·V_local, (r+1)·V_local) of the output weight (the shared embedding when
tied). Rows with global id ≥ vocab_size are padding: only W_real = W[:n_real] is ever multiplied.

Forward, per chunk of n = chunk_tokens tokens (symbols of vocab_parallel.py, z = x / T):
    x = h[a:b] W_realᵀ                         [n, n_real], the chunk's logits in h's dtype      (GEMM 1)
    partials[a:b] = local_partials(x)          top-K, Σ e^{z−m_r}, Σ e^{z−m_r}(z−m_r), target z  (torch / Triton)
then the same single all-gather of the [N, 2K+3] partials over TP and merge_partials: the only communication.
Saved: references to h and W, the targets, the top-K ids, log Z and H — O(N·K) new memory.

Backward, per vocabulary block of width nb = chunk_tokens·n_real / N (vocab_block_width: the same number of
elements as a forward chunk), no communication: the block's logits x = h W[v0:v1]ᵀ [N, nb] are recomputed (GEMM 2)
and their gradient formed in place by vocab_parallel.softmax_gradient_chunk (the same β and entropy-bonus formulas
as the logits path; the block is a sub-shard: an id's indicator is added by the block that holds it)
    G = ∂/∂x = (Σ_m β_m (1[j = m] − π_j) − g_H π_j (log π_j + H)) / T
    ∂h += G W[v0:v1]                              (GEMM 3)        ∂W[v0:v1] = Gᵀ h                  (GEMM 4)
Blocks over the vocabulary rather than chunks over the tokens: each ∂W row is written once by one GEMM over all N
tokens (no zero fill, no read-modify-write of the [V_local, H] ∂W per chunk, one rounding in bf16); what is
accumulated is ∂h [N, H] instead, N·H per block — smaller than V_local·H whenever N < V_local.
∂h is this shard's share only. The sum over TP ranks — an all-reduce, or a reduce-scatter along the sequence under
sequence parallelism — belongs to megatron-core's mapping in front of this Function (models/output_head.py), exactly
as ColumnParallelLinear's backward reduces the output layer's input gradient. Padding rows of W get a zero gradient.

Memory beyond h, W and their gradients ∂h, ∂W (the backward's outputs, allocated once): one buffer of
chunk_tokens·n_real elements in h's dtype, allocated once per pass and reused by every chunk/block (GEMM out=),
plus the fp32 work buffers of vocab_parallel of the same size (forward: none for fp32 — z − m_r is formed in the
chunk's own buffer, e^{z−m_r} 64 rows at a time —, one for bf16/fp16; backward: none for fp32 — the gradient is
formed in the recomputed logits' buffer —, one for bf16/fp16, one more with an entropy gradient; the Triton
kernel's gradient buffer instead) and O(N·K). The fp32 backward's peak is therefore ∂W + ∂h + one chunk
(benchmarks/loss_memory_bench.py --show-peak lists it; tests/test_loss_fused_linear.py checks it).
∂h is accumulated in h's dtype, one rounding per block (bf16: see docs/performance.md for the measured tolerance).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import triton_kernels
from . import vocab_parallel as vp

DEFAULT_FUSED_CHUNK_TOKENS = 128  # the measured choice: docs/performance.md "The default"


def _flat_buffer(numel: int, dtype, device) -> torch.Tensor:
    """One flat buffer for a loop's [rows, cols] chunks: every chunk is a contiguous view of its first rows·cols
    elements (a short last chunk included), so the loop allocates once and GEMMs write into it with out=."""
    return torch.empty(numel, dtype=dtype, device=device)


def _view(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return flat[: rows * cols].view(rows, cols)


def vocab_block_width(n_tokens: int, n_real: int, chunk_tokens: int) -> int:
    """The backward's vocabulary block: [N, width] holds as many elements as a [chunk_tokens, n_real] chunk."""
    return max(1, min(n_real, chunk_tokens * n_real // max(n_tokens, 1)))


def _own_chunk_partials(x, targets, top_k, shard, inv_t, rows=64) -> torch.Tensor:
    """vocab_parallel.local_partials of an fp32 chunk x [n, n_real] that the caller owns and lets go of: the same
    named steps (local_topk, local_target_logit, then S_r, E_r as local_exp_sums forms them), but y = z − m_r
    overwrites x, so the only new buffer is e^y for `rows` rows at a time (not two fp32 [n/2, n_real] buffers)."""
    values, ids = vp.local_topk(x, top_k, shard, inv_t)
    target_z = vp.local_target_logit(x, targets, shard, inv_t)
    y = torch.add(-values[:, :1], x, alpha=inv_t, out=x)  # z − m_r, in x's own buffer
    sum_exp = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    sum_exp_z = torch.empty_like(sum_exp)
    for a in range(0, x.shape[0], rows):
        e = torch.exp(y[a:a + rows])
        sum_exp[a:a + rows] = e.sum(dim=1)
        sum_exp_z[a:a + rows] = e.mul_(y[a:a + rows]).sum(dim=1)
    return vp.pack_partials(values, ids, sum_exp, sum_exp_z, target_z)


def fused_forward(hidden2d, weight, targets1d, top_k, tp_group, temperature, shard, chunk_tokens, backend):
    """Chunked GEMM + local partials → one all-gather → merge. Returns vocab_parallel._forward's 5-tuple."""
    N = hidden2d.shape[0]
    inv_t = 1.0 / temperature
    w_real_t = weight[: shard.n_real].t()  # [H, n_real] view
    partials = torch.empty((N, 2 * top_k + 3), dtype=torch.float64, device=hidden2d.device)
    flat = _flat_buffer(min(chunk_tokens, N) * shard.n_real, hidden2d.dtype, hidden2d.device)
    for a in range(0, N, chunk_tokens):
        b = min(a + chunk_tokens, N)
        x = torch.matmul(hidden2d[a:b], w_real_t, out=_view(flat, b - a, shard.n_real))  # GEMM 1: [n, n_real]
        if backend == "torch" and x.dtype == torch.float32 and shard.n_real > 0:
            partials[a:b] = _own_chunk_partials(x, targets1d[a:b], top_k, shard, inv_t)
        else:  # bf16/fp16 (z − m_r is formed in fp32) and the Triton kernel
            partials[a:b] = vp.local_partials(x, targets1d[a:b], top_k, shard, inv_t, chunk_tokens, backend)
    del flat
    return vp.gather_and_merge(partials, top_k, tp_group, shard)


def fused_backward(hidden2d, weight, ids, betas, lse, temperature, shard, chunk_tokens, backend,
                   grad_entropy=None, entropy=None):
    """(∂h [N, H] in h's dtype, ∂W [V_local, H] in W's dtype) from the per-token β [N, K+1] (ids [N, K+1]) and,
    with an entropy gradient, g_H and H [N]. Streams vocabulary blocks [N, width] (vocab_block_width: the
    elements of one [chunk_tokens, n_real] chunk); no [N, V_local] tensor. Each block's ∂W rows are written once
    (one GEMM over all N tokens); ∂h accumulates over the blocks."""
    N = hidden2d.shape[0]
    inv_t = 1.0 / temperature
    width = vocab_block_width(N, shard.n_real, chunk_tokens)
    grad_h = torch.empty_like(hidden2d)
    grad_w = torch.empty_like(weight)
    grad_w[shard.n_real:] = 0  # padding rows; every real row is written by its block's GEMM 4
    dev = hidden2d.device
    flat_x = _flat_buffer(N * width, hidden2d.dtype, dev)
    in_place = hidden2d.dtype == torch.float32  # fp32: the gradient is formed in the recomputed logits' buffer
    flat_p = None if in_place or backend == "triton" else _flat_buffer(N * width, torch.float32, dev)
    flat_work = _flat_buffer(N * width, torch.float32, dev) if grad_entropy is not None and backend != "triton" \
        else None
    for v0 in range(0, shard.n_real, width):
        v1 = min(v0 + width, shard.n_real)
        w_block = weight[v0:v1]  # [nb, H]
        block = vp._Shard(start=shard.start + v0, n_real=v1 - v0, tp_size=shard.tp_size)  # ids owned by this block
        x = torch.matmul(hidden2d, w_block.t(), out=_view(flat_x, N, v1 - v0))  # GEMM 2: [N, nb], recomputed
        if backend == "triton":
            g = triton_kernels.softmax_gradient(x, ids, betas, lse, inv_t, block,
                                                grad_entropy=grad_entropy, entropy=entropy)
        else:
            g = x  # the gradient overwrites the recomputed logits (softmax_gradient_chunk reads x once per entry)
            p_buf = x if in_place else _view(flat_p, N, v1 - v0)
            work = None if flat_work is None else _view(flat_work, N, v1 - v0)
            vp.softmax_gradient_chunk(x, g, p_buf, lse, inv_t, block, ids, betas,
                                      grad_entropy=grad_entropy, entropy=entropy, work=work)
        torch.matmul(g.t(), hidden2d, out=grad_w[v0:v1])  # GEMM 4: [nb, H], written once
        if v0 == 0:
            torch.matmul(g, w_block, out=grad_h)  # GEMM 3: [N, H]
        else:
            grad_h.addmm_(g, w_block)
        del x, g
    return grad_h, grad_w


class _FusedLinearTokenStats(torch.autograd.Function):
    """Sequences fused_forward / fused_backward; saves h, W (references) and per-token scalars/ids."""

    @staticmethod
    def forward(ctx, hidden2d, weight, targets1d, top_k, tp_group, temperature, shard, chunk_tokens, backend):
        target_lp, entropy, topk_lp, topk_ids, lse = fused_forward(
            hidden2d, weight, targets1d, top_k, tp_group, temperature, shard, chunk_tokens, backend)
        ctx.save_for_backward(hidden2d, weight, targets1d, topk_ids, lse, entropy)
        ctx.temperature, ctx.shard, ctx.chunk_tokens, ctx.backend = temperature, shard, chunk_tokens, backend
        ctx.mark_non_differentiable(topk_ids)
        ctx.set_materialize_grads(False)
        return target_lp, entropy, topk_lp, topk_ids

    @staticmethod
    def backward(ctx, grad_target_lp, grad_entropy, grad_topk_lp, _grad_ids):
        hidden2d, weight, targets1d, topk_ids, lse, entropy = ctx.saved_tensors
        none = (None,) * 7
        if ctx.shard.n_real == 0 or (grad_target_lp is None and grad_topk_lp is None and grad_entropy is None):
            return (torch.zeros_like(hidden2d), torch.zeros_like(weight)) + none
        ids, betas, g_h = vp.upstream_coefficients(grad_target_lp, grad_entropy, grad_topk_lp, targets1d, topk_ids,
                                                   lse)
        grad_h, grad_w = fused_backward(hidden2d, weight, ids, betas, lse, ctx.temperature, ctx.shard,
                                        ctx.chunk_tokens, ctx.backend, grad_entropy=g_h,
                                        entropy=None if g_h is None else entropy)
        return (grad_h, grad_w) + none


def linear_token_statistics(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, top_k: int,
                            tp_group=None, temperature: float = 1.0, vocab_size: Optional[int] = None, *,
                            mask: Optional[torch.Tensor] = None, chunk_tokens: int = DEFAULT_FUSED_CHUNK_TOKENS,
                            backend: str = "auto") -> vp.TokenStats:
    """vocab_parallel.token_statistics(h Wᵀ, targets, ...) without the logits (module docstring).

    hidden [B, L, H] (fp32/bf16/fp16; cast to W's dtype, the dtype the output layer multiplies in), weight
    [V_local, H] this rank's output-weight shard, targets [B, L] int64 global ids, mask [B, L] (optional, as
    token_statistics). chunk_tokens: tokens per GEMM chunk, bounding the [chunk_tokens, V_local] buffers.
    Gradients flow into hidden and weight; the hidden gradient is this rank's share (sum it over TP as
    ColumnParallelLinear does — models/output_head.py). Inputs are never modified.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, L, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight must be [V_local, H = {hidden.shape[2]}], got shape {tuple(weight.shape)}")
    if weight.dtype not in vp._FLOAT_DTYPES or hidden.dtype not in vp._FLOAT_DTYPES:
        raise ValueError(f"hidden/weight dtype must be float32/bfloat16/float16, got {hidden.dtype}/{weight.dtype}")
    if targets.shape != hidden.shape[:2] or targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 of shape {tuple(hidden.shape[:2])}, got {targets.dtype} "
                         f"{tuple(targets.shape)}")
    if mask is not None and (mask.shape != targets.shape or mask.dtype != torch.bool):
        raise ValueError(f"mask must be a bool tensor of shape {tuple(targets.shape)}, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an int >= 1, got {chunk_tokens!r}")
    shard, vocab_size = vp.resolve_shard(weight.t(), tp_group, vocab_size, top_k)  # reads V_local only
    vp.check_targets(targets, vocab_size, mask)
    backend = triton_kernels.resolve_backend(backend, weight.device, top_k)

    B, L, H = hidden.shape
    hidden2d = hidden.to(weight.dtype).reshape(B * L, H)  # [N, H]
    targets1d = targets.reshape(B * L)
    temperature = float(temperature)
    if torch.is_grad_enabled() and (hidden2d.requires_grad or weight.requires_grad):
        target_lp, entropy, topk_lp, topk_ids = _FusedLinearTokenStats.apply(
            hidden2d, weight, targets1d, top_k, tp_group, temperature, shard, chunk_tokens, backend)
    else:  # forward-only: no graph, nothing saved
        target_lp, entropy, topk_lp, topk_ids, _ = fused_forward(
            hidden2d.detach(), weight.detach(), targets1d, top_k, tp_group, temperature, shard, chunk_tokens,
            backend)
    return vp.TokenStats(
        target_logprob=target_lp.view(B, L),
        entropy=entropy.view(B, L),
        topk_logprob=topk_lp.view(B, L, top_k),
        topk_ids=topk_ids.view(B, L, top_k),
        is_rank1=(targets1d == topk_ids[:, 0]).view(B, L),
    )

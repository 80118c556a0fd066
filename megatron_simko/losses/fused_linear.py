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

Backward, per chunk, no communication: x is recomputed (GEMM 2), its gradient formed in place by
vocab_parallel.softmax_gradient_chunk (the same β and entropy-bonus formulas as the logits path)
    G = ∂/∂x = (Σ_m β_m (1[j = m] − π_j) − g_H π_j (log π_j + H)) / T
    ∂h[a:b] = G W_real                          (GEMM 3)        ∂W_real += Gᵀ h[a:b]             (GEMM 4)
∂h is this shard's share only. The sum over TP ranks — an all-reduce, or a reduce-scatter along the sequence under
sequence parallelism — belongs to megatron-core's mapping in front of this Function (models/output_head.py), exactly
as ColumnParallelLinear's backward reduces the output layer's input gradient. Padding rows of W get a zero gradient.

Memory beyond h, W and their gradients: the chunk's logits [chunk_tokens, n_real] in h's dtype plus the fp32
work buffers of vocab_parallel (forward: one fp32 [chunk_tokens, n_real]; backward: none for fp32 — the gradient
is formed in the recomputed logits' buffer —, one for bf16/fp16, one more with an entropy gradient) and O(N·K).
∂W is accumulated in W's dtype, one rounding per chunk (bf16: see docs/performance.md for the measured tolerance).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import triton_kernels
from . import vocab_parallel as vp

DEFAULT_FUSED_CHUNK_TOKENS = 512


def _chunk_logits(h_chunk: torch.Tensor, w_real: torch.Tensor) -> torch.Tensor:
    """x = h Wᵀ for one chunk: [n, n_real] in h's dtype, a fresh buffer the caller may overwrite."""
    return torch.matmul(h_chunk, w_real.t())


def fused_forward(hidden2d, weight, targets1d, top_k, tp_group, temperature, shard, chunk_tokens, backend):
    """Chunked GEMM + local partials → one all-gather → merge. Returns vocab_parallel._forward's 5-tuple."""
    N = hidden2d.shape[0]
    inv_t = 1.0 / temperature
    w_real = weight[: shard.n_real]
    partials = torch.empty((N, 2 * top_k + 3), dtype=torch.float64, device=hidden2d.device)
    for a in range(0, N, chunk_tokens):
        b = min(a + chunk_tokens, N)
        x = _chunk_logits(hidden2d[a:b], w_real)  # [n, n_real]
        partials[a:b] = vp.local_partials(x, targets1d[a:b], top_k, shard, inv_t, chunk_tokens, backend)
        del x
    return vp.gather_and_merge(partials, top_k, tp_group, shard)


def fused_backward(hidden2d, weight, ids, betas, lse, temperature, shard, chunk_tokens, backend,
                   grad_entropy=None, entropy=None):
    """(∂h [N, H] in h's dtype, ∂W [V_local, H] in W's dtype) from the per-token β [N, K+1] (ids [N, K+1]) and,
    with an entropy gradient, g_H and H [N]. Recomputes each chunk's logits; no [N, V_local] tensor."""
    N = hidden2d.shape[0]
    inv_t = 1.0 / temperature
    w_real = weight[: shard.n_real]
    grad_h = torch.empty_like(hidden2d)
    grad_w = torch.zeros_like(weight)  # padding rows stay 0
    grad_w_real = grad_w[: shard.n_real]
    f32 = dict(dtype=torch.float32, device=hidden2d.device)
    for a in range(0, N, chunk_tokens):
        b = min(a + chunk_tokens, N)
        x = _chunk_logits(hidden2d[a:b], w_real)  # [n, n_real], recomputed
        g_h = None if grad_entropy is None else grad_entropy[a:b]
        h_ent = None if grad_entropy is None else entropy[a:b]
        if backend == "triton":
            g = triton_kernels.softmax_gradient(x, ids[a:b], betas[a:b], lse[a:b], inv_t, shard,
                                                grad_entropy=g_h, entropy=h_ent)
        else:
            g = x  # the gradient overwrites the recomputed logits (softmax_gradient_chunk reads x once per entry)
            p_buf = x if x.dtype == torch.float32 else torch.empty(x.shape, **f32)
            work = torch.empty(x.shape, **f32) if g_h is not None else None
            vp.softmax_gradient_chunk(x, g, p_buf, lse[a:b], inv_t, shard, ids[a:b], betas[a:b],
                                      grad_entropy=g_h, entropy=h_ent, work=work)
            del p_buf, work
        torch.matmul(g, w_real, out=grad_h[a:b])  # GEMM 3: [n, H]
        grad_w_real.addmm_(g.t(), hidden2d[a:b])  # GEMM 4: [n_real, H]
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

"""Triton backend of the two local passes of losses/vocab_parallel.py, and the one place that picks a backend.

Same contract as the torch steps they replace (symbols of SIMKO_SPEC.md / vocab_parallel.py; z = logits / T,
this rank's real rows j < n_real, global id = start + j):

  local_partials     ONE streaming pass per row over tiles of the shard → the [N, 2K+3] float64 partials
                     that vocab_parallel._forward all-gathers and merge_partials merges unchanged:
                     local top-K of z (values descending, global ids; (−inf, −1) past n_real),
                     S_r = Σ_j e^{z_j − m_r}, E_r = Σ_j e^{z_j − m_r}(z_j − m_r) with m_r the local top-1 value,
                     and z[y_t] when this shard owns y_t, else 0.
                     Online softmax: per-lane accumulators rescaled by the running max, e^{d}(E + d·S) when the
                     max moves by d; since z is rounded monotonically, the final max equals the top-1 value
                     bitwise. The running top-K is updated only for tiles whose max beats the K-th value.
  softmax_gradient   ONE pass per row writing ∂/∂logits in the logits' dtype:
                         ∂/∂z_j = Σ_m β_m (1[j = m] − π_j)  −  g_H · π_j (log π_j + H),   ∂/∂logits = ∂/∂z / T
                     over the K+1 ids m (y_t, c_1..c_K), π_j = e^{z_j − lse} recomputed from the saved per-token
                     log-sum-exp, the indicator added only where this shard owns m; the entropy term (∂H/∂z_j
                     = −π_j (log π_j + H)) only when a per-token g_H is given (a constexpr: no cost otherwise);
                     padding rows (ids ≥ vocab_size) get 0.

Loads are masked on the logits' full (padded) width, not on n_real, and padding columns are set after the
load (−inf forward, gradient 0 backward): Triton specialises integer arguments divisible by 16, so with
Megatron's padded vocabulary (a multiple of 128·TP) the mask keeps 128-bit vector loads; a mask on n_real
(4099, or the last TP shard's real width) would fall back to scalar loads.

Memory: O(N·K) beyond the logits and the gradient; no fp32 copy of the logits, no [N, V] temporary (fp32
math happens tile by tile in registers). The logits are only read. Ties in the top-K: lower id first.
Logits are assumed finite (a −inf logit never enters the top-K here; the torch path would list it).

Interpreter (CPU, tests): set TRITON_INTERPRET=1 before this module is imported (the kernels are decorated
then). Kernels use only what both Triton 3.6 (the GPU machine's) and 3.9 (CI's interpreter) accept; both
compile them for sm_90 (tests/test_loss_triton.py checks the installed one).
"""
from __future__ import annotations  # kernel annotations stay strings: this module imports without Triton

from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: resolve_backend picks "torch"; nothing below is launched
    triton = tl = None

BACKENDS = ("auto", "torch", "triton")
MAX_TOP_K = 8  # the running top-K lives in registers
MAX_BLOCK = 2048  # vocabulary tile (columns per iteration) on the GPU, 8 warps: 8 columns per thread


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


def resolve_backend(backend: str, device: torch.device, top_k: int) -> str:
    """"torch" or "triton" for token_statistics' local passes — the only place the backend is chosen.

    "auto": Triton on CUDA tensors when Triton imports and top_k <= MAX_TOP_K, the torch backend otherwise.
    "triton" on CPU tensors needs Triton's interpreter (TRITON_INTERPRET=1 before this module is imported).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton is not None and top_k <= MAX_TOP_K else "torch"
    if backend == "triton":
        if triton is None:
            raise ValueError("backend='triton' needs the triton package (pip install triton); "
                             "or use backend='torch'")
        if top_k > MAX_TOP_K:
            raise ValueError(f"backend='triton' supports top_k <= {MAX_TOP_K}, got {top_k}; use backend='torch'")
        if device.type == "cpu" and not interpreted():
            raise ValueError("backend='triton' on CPU tensors runs in Triton's interpreter: set "
                             "TRITON_INTERPRET=1 before importing megatron_simko, or use backend='torch'")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' supports CUDA (or CPU, interpreted) tensors, got {device}")
    return backend


# --------------------------------------------------------------------------------------------------
# Kernels: one program per token row.
# --------------------------------------------------------------------------------------------------


@_jit
def _local_partials_kernel(logits_ptr, row_stride, targets_ptr, partials_ptr, n_cols, n_real, start, inv_t,
                           K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr):
    """partials[row] = (K values of z, K global ids, S_r, E_r, target z) — see local_partials."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK)
    slots = tl.arange(0, KP)
    prev_slot = slots[:, None] - 1 == slots[None, :]  # [KP, KP]: slot s reads slot s − 1 when shifting
    top_x = tl.full([KP], float("-inf"), tl.float32)  # running top-K of the raw logits (fp32), descending
    top_c = tl.full([KP], -1, tl.int32)  # their local columns; ties keep the lower column first
    kth = tl.max(top_x, axis=0)  # the K-th value so far: a tile must beat it to enter
    m = kth  # running max of z (scalar)
    s_acc = tl.zeros([BLOCK], tl.float32)  # per-lane Σ e^{z − m}
    e_acc = tl.zeros([BLOCK], tl.float32)  # per-lane Σ e^{z − m}(z − m)
    for c0 in range(0, n_real, BLOCK):
        c = c0 + cols
        valid = c < n_real
        # Load on the padded width (n_cols, a multiple of 16 for Megatron's padded vocabulary: 128-bit loads),
        # then −inf on the padding columns j ≥ n_real.
        x = tl.load(row_ptr + c, mask=c < n_cols, other=float("-inf")).to(tl.float32)  # [BLOCK]
        x = tl.where(valid, x, float("-inf"))
        tile_max = tl.max(x, axis=0)
        # Online softmax: rescale the accumulators to the new max m' (d = m − m' ≤ 0).
        m_new = tl.maximum(m, tile_max * inv_t)
        scale = tl.exp(m - m_new)
        d = tl.where(m == float("-inf"), 0.0, m - m_new)
        y = tl.where(valid, tl.fma(x, inv_t, -m_new), 0.0)  # z − m', one rounding (as torch.add(alpha=))
        e = tl.where(valid, tl.exp(y), 0.0)
        e_acc = scale * (e_acc + d * s_acc) + e * y
        s_acc = scale * s_acc + e
        m = m_new
        if tile_max > kth:  # this tile holds new top-K members: insert them one by one, best first
            xs = x
            v, j = tl.max(xs, axis=0, return_indices=True, return_indices_tie_break_left=True)
            while v > kth:  # a tie with the K-th keeps the earlier (lower) column; ≤ K rounds
                pos = tl.sum((top_x >= v).to(tl.int32), axis=0)  # after the equal ones (lower columns)
                shifted_x = tl.max(tl.where(prev_slot, top_x[None, :], float("-inf")), axis=1)
                shifted_c = tl.max(tl.where(prev_slot, top_c[None, :], -1), axis=1)
                top_x = tl.where(slots < pos, top_x, tl.where(slots == pos, v, shifted_x))
                top_c = tl.where(slots < pos, top_c, tl.where(slots == pos, c0 + j, shifted_c))
                top_x = tl.where(slots < K, top_x, float("-inf"))  # the old K-th falls out
                top_c = tl.where(slots < K, top_c, -1)
                kth = tl.max(tl.where(slots == K - 1, top_x, float("-inf")), axis=0)
                xs = tl.where(cols == j, float("-inf"), xs)
                v, j = tl.max(xs, axis=0, return_indices=True, return_indices_tie_break_left=True)
    sum_exp = tl.sum(s_acc, axis=0)
    sum_exp_z = tl.sum(e_acc, axis=0)
    target = tl.load(targets_ptr + row) - start  # local index of y_t (int64)
    owned = (target >= 0) & (target < n_real)
    x_t = tl.load(row_ptr + tl.where(owned, target, 0), mask=owned, other=0.0).to(tl.float32)
    target_z = tl.where(owned, x_t * inv_t, 0.0)
    ids = tl.where(top_c >= 0, top_c.to(tl.int64) + start, -1)
    out = partials_ptr + row * (2 * K + 3)
    tl.store(out + slots, (top_x * inv_t).to(tl.float64), mask=slots < K)
    tl.store(out + K + slots, ids.to(tl.float64), mask=slots < K)
    tl.store(out + 2 * K, sum_exp.to(tl.float64))
    tl.store(out + 2 * K + 1, sum_exp_z.to(tl.float64))
    tl.store(out + 2 * K + 2, target_z.to(tl.float64))


@_jit
def _softmax_gradient_kernel(logits_ptr, row_stride, grad_ptr, grad_row_stride, ids_ptr, betas_ptr, lse_ptr,
                             grad_entropy_ptr, entropy_ptr, n_cols, n_real, start, inv_t,
                             M: tl.constexpr, MP: tl.constexpr, HAS_ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
    """grad[row, j] = (Σ_m β_m (1[j = m] − π_j) − g_H π_j (log π_j + H)) / T for j < n_real, else 0."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    grad_row = grad_ptr + row * grad_row_stride
    cols = tl.arange(0, BLOCK)
    slots = tl.arange(0, MP)
    listed = slots < M
    local = tl.load(ids_ptr + row * M + slots, mask=listed, other=-1) - start  # [MP] local index of m
    betas = tl.load(betas_ptr + row * M + slots, mask=listed, other=0.0)  # [MP] β_m
    owned = listed & (local >= 0) & (local < n_real)
    local = tl.where(owned, local, -1)
    beta_owned = tl.where(owned, betas, 0.0)
    coef = -tl.sum(betas, axis=0) * inv_t  # every m contributes −β_m π_j, owned or not
    lse = tl.load(lse_ptr + row)
    h_coef = 0.0
    entropy = 0.0
    if HAS_ENTROPY:
        h_coef = -tl.load(grad_entropy_ptr + row) * inv_t
        entropy = tl.load(entropy_ptr + row)
    for c0 in range(0, n_cols, BLOCK):
        c = c0 + cols
        real = c < n_real
        x = tl.load(row_ptr + c, mask=c < n_cols, other=0.0).to(tl.float32)  # padded width: vector loads
        log_p = tl.fma(x, inv_t, -lse)  # z − lse, one rounding (as torch.add(alpha=))
        p = tl.exp(log_p)
        hit = tl.sum(tl.where(c[:, None] == local[None, :], beta_owned[None, :], 0.0), axis=1)  # Σ owned β at j
        g = p * coef + hit * inv_t
        if HAS_ENTROPY:
            g = g + h_coef * p * (log_p + entropy)
        g = tl.where(real, g, 0.0)
        tl.store(grad_row + c, g.to(grad_ptr.dtype.element_ty), mask=c < n_cols)


def interpreted() -> bool:
    """True when the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 when this module was imported)."""
    return triton is not None and not isinstance(_local_partials_kernel, triton.runtime.jit.JITFunction)


# --------------------------------------------------------------------------------------------------
# Wrappers: the drop-in replacements for the torch steps.
# --------------------------------------------------------------------------------------------------


def _pow2_at_least(n: int, floor: int = 2) -> int:
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


def _launch_shape(n_cols: int, block: Optional[int], num_warps: Optional[int]) -> tuple[int, int]:
    """(BLOCK, num_warps): a power-of-two tile ≤ MAX_BLOCK covering the row if it can, or the caller's
    (benchmarks/loss_bench.py --sweep times the alternatives on a GPU)."""
    if block is None:
        block = min(MAX_BLOCK, _pow2_at_least(n_cols, 16))
    elif block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    return block, num_warps or (8 if block >= 2048 else 4)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x itself when its rows are unit-stride (the normal case); a contiguous copy otherwise."""
    return x if x.stride(-1) == 1 else x.contiguous()


def local_partials(x: torch.Tensor, targets: torch.Tensor, top_k: int, shard, inv_t: float, *,
                   block: Optional[int] = None, num_warps: Optional[int] = None) -> torch.Tensor:
    """[N, 2K+3] float64 partials of logits x [N, V_local] (any float dtype, read only), targets [N] int64
    global ids; shard = vocab_parallel._Shard (start, n_real). Same layout as vocab_parallel.pack_partials."""
    x = _rows(x)
    N = x.shape[0]
    partials = torch.empty((N, 2 * top_k + 3), dtype=torch.float64, device=x.device)
    if N == 0:
        return partials
    BLOCK, warps = _launch_shape(shard.n_real, block, num_warps)
    _local_partials_kernel[(N,)](x, x.stride(0), targets.contiguous(), partials, x.shape[1], shard.n_real, shard.start,
                                 float(inv_t), K=top_k, KP=_pow2_at_least(top_k), BLOCK=BLOCK, num_warps=warps)
    return partials


def softmax_gradient(x: torch.Tensor, ids: torch.Tensor, betas: torch.Tensor, lse: torch.Tensor, inv_t: float,
                     shard, grad_entropy: Optional[torch.Tensor] = None, entropy: Optional[torch.Tensor] = None,
                     *, block: Optional[int] = None, num_warps: Optional[int] = None) -> torch.Tensor:
    """∂/∂logits [N, V_local] in x's dtype (see the module docstring).

    x [N, V_local] logits (read only); ids [N, K+1] int64 global ids (y_t, c_1..c_K); betas [N, K+1] fp32
    upstream gradients β_m; lse [N] fp32 per-token log-sum-exp of z over the real vocabulary; grad_entropy g_H
    [N] fp32 (None: no entropy term) with entropy H [N] fp32 (required with g_H)."""
    if (grad_entropy is None) != (entropy is None):
        raise ValueError("softmax_gradient: pass grad_entropy and entropy together (or neither)")
    x = _rows(x)
    N, V = x.shape
    grad = torch.empty((N, V), dtype=x.dtype, device=x.device)
    if N == 0:
        return grad
    M = ids.shape[1]
    has_entropy = grad_entropy is not None
    if not has_entropy:  # never read (HAS_ENTROPY is a constexpr); any fp32 pointer will do
        grad_entropy = entropy = lse
    BLOCK, warps = _launch_shape(V, block, num_warps)
    _softmax_gradient_kernel[(N,)](
        x, x.stride(0), grad, grad.stride(0), ids.contiguous(), betas.float().contiguous(), lse.float().contiguous(),
        grad_entropy.float().contiguous(), entropy.float().contiguous(), V, shard.n_real, shard.start, float(inv_t),
        M=M, MP=_pow2_at_least(M), HAS_ENTROPY=has_entropy, BLOCK=BLOCK, num_warps=warps)
    return grad

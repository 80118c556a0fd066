"""Per-token statistics of a vocabulary-parallel softmax, with an analytic, communication-free backward.

For every token this computes, over the *real* vocabulary (ids < vocab_size) of z = logits / temperature:

    target_logprob  log π(y_t)                    [B, L]     differentiable
    entropy         H = −Σ_j π_j log π_j          [B, L]     differentiable (for an entropy bonus; SimKO's gate
                                                             w detaches it, SIMKO_SPEC.md)
    topk_logprob    log π(c_k), k = 1..K          [B, L, K]  differentiable, c_k by descending z
    topk_ids        c_k as global vocabulary ids  [B, L, K]  int64
    is_rank1        y_t == c_1                    [B, L]     bool

Sharding (megatron convention): TP rank r = dist.get_rank(tp_group) holds the contiguous global ids
[r·V_local, (r+1)·V_local). Ids ≥ vocab_size are padding rows: they are sliced off before any math, so they
never enter the softmax, the entropy or the top-K.

Forward communication: ONE all-gather per call of (2K + 3) float64 numbers per token per rank — the local
top-K values and ids plus the local partial sums (Σ e^{z−m_r}, Σ e^{z−m_r}(z − m_r), target logit or 0),
taken relative to the local max m_r = the local top-1 value. Every rank then merges the TP partials
identically (so H, c_k and w agree bitwise across ranks). This replaces megatron-core's all-reduce(MAX) +
all-reduce(SUM) pair with a single collective (online-softmax merge). The vocabulary dimension is never
gathered. Local work per half chunk: a top-K over the raw logits, then fp32 z − m_r, exp, sums.

Backward: NO communication. With upstream gradients β_t (target), β_k (top-K) and g_H (entropy),
    ∂/∂z_j = Σ_m β_m (1[j = m] − π_j) − g_H π_j (log π_j + H)  over m ∈ {y_t, c_1..c_K},
    ∂/∂logits = ∂/∂z / temperature,
the indicator being added by the shard that owns id m (∂H/∂z_j = −π_j (log π_j + H) needs only the per-token
scalars H and log Z beside z_j, so the entropy term is local too). Only the logits reference, the per-token
log-sum-exp and entropy, the targets and the top-K ids are saved; π is recomputed chunk by chunk. Without an
entropy gradient (g_H = None) the backward is the β-only pass, unchanged.

Memory beyond the logits (and their gradient): the equivalent of one fp32 [chunk_tokens, V_local] buffer
plus O(tokens·K) (forward: two [chunk/2, V_local]; backward: one [chunk, V_local], none for fp32 logits,
whose backward works inside the gradient tensor itself; with an entropy gradient the backward needs one more
fp32 buffer and halves its chunk to stay within the same bound). z = logits·(1/T) in fp32 (bf16/fp16
logits are upcast per chunk, never as a whole).
The caller's logits are never modified in place.

backend="triton" swaps the two local passes (the chunked forward statistics, the backward) for the fused
one-pass kernels of losses/triton_kernels.py; the all-gather and merge_partials are shared.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist  # collectives are called as dist.<name> so tests can wrap them

from . import triton_kernels  # the Triton backend of the two local passes (imports without Triton)

DEFAULT_CHUNK_TOKENS = 2048
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class TokenStats(NamedTuple):
    """Per-token statistics of softmax(logits / temperature) over the real vocabulary (see module docstring)."""

    target_logprob: torch.Tensor  # [B, L] fp32, differentiable
    entropy: torch.Tensor  # [B, L] fp32, differentiable (detach it where H is a gate, SIMKO_SPEC.md)
    topk_logprob: torch.Tensor  # [B, L, K] fp32, differentiable
    topk_ids: torch.Tensor  # [B, L, K] int64 global ids
    is_rank1: torch.Tensor  # [B, L] bool


class _Shard(NamedTuple):
    """Where this rank's rows sit in the global vocabulary."""

    start: int  # global id of local row 0
    n_real: int  # local rows with global id < vocab_size (a prefix; the rest are padding)
    tp_size: int


# --------------------------------------------------------------------------------------------------
# Small named steps. Shapes: n = tokens in a chunk, V = V_local, R = tp size, K = top_k.
# --------------------------------------------------------------------------------------------------


def real_rows(logits_chunk: torch.Tensor, shard: _Shard) -> torch.Tensor:
    """View [n, n_real] of the chunk without the padding rows (ids >= vocab_size), in the logits dtype."""
    return logits_chunk[:, : shard.n_real]


def local_topk(x: torch.Tensor, top_k: int, shard: _Shard, inv_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Local top-K of z = x / T: fp32 values [n, K] and global ids [n, K], padded with (−inf, −1) if the
    shard has fewer than K real rows. Runs on the raw logits (ordering is unchanged by a positive scale)."""
    n = x.shape[0]
    values = torch.full((n, top_k), float("-inf"), dtype=torch.float32, device=x.device)
    ids = torch.full((n, top_k), -1, dtype=torch.int64, device=x.device)
    k = min(top_k, shard.n_real)
    if k > 0:
        v, i = torch.topk(x, k, dim=-1)
        values[:, :k] = v.float() * inv_t
        ids[:, :k] = i + shard.start
    return values, ids


def owned_local_index(global_ids: torch.Tensor, shard: _Shard) -> tuple[torch.Tensor, torch.Tensor]:
    """(clamped local index, owned mask) of global ids: owned ⇔ the id is a real row of this shard."""
    local = global_ids - shard.start
    owned = (local >= 0) & (local < shard.n_real)
    return local.clamp(0, max(shard.n_real - 1, 0)), owned


def local_target_logit(x: torch.Tensor, targets: torch.Tensor, shard: _Shard, inv_t: float) -> torch.Tensor:
    """z[y_t] if this shard owns y_t else 0, so that a SUM over ranks yields the target logit [n]."""
    if shard.n_real == 0:
        return torch.zeros(targets.shape, dtype=torch.float32, device=x.device)
    local, owned = owned_local_index(targets, shard)
    return torch.where(owned, x.gather(1, local.unsqueeze(1)).squeeze(1).float() * inv_t, 0.0)


def local_exp_sums(x: torch.Tensor, local_max: torch.Tensor, inv_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """S_r = Σ e^{z−m_r} and E_r = Σ e^{z−m_r}(z − m_r) over the shard's real rows (z = x / T)."""
    if x.shape[1] == 0:
        zeros = torch.zeros_like(local_max)
        return zeros, zeros
    # Two fp32 [n, V] buffers (the caller passes half a chunk): y = z − m_r in one pass over x (fp32 math
    # also for bf16 x), e = exp(y); then e·y in place.
    y = torch.add(-local_max.unsqueeze(1), x, alpha=inv_t)
    e = torch.exp(y)
    sum_exp = e.sum(dim=1)
    sum_exp_z = e.mul_(y).sum(dim=1)
    return sum_exp, sum_exp_z


def pack_partials(values, ids, sum_exp, sum_exp_z, target_z) -> torch.Tensor:
    """[n, 2K+3] float64 row per token: top-K values, top-K ids (exact in fp64), S_r, E_r, target logit."""
    return torch.cat(
        [values.double(), ids.double(), sum_exp.double().unsqueeze(1), sum_exp_z.double().unsqueeze(1),
         target_z.double().unsqueeze(1)], dim=1)


def merge_partials(gathered: torch.Tensor, top_k: int):
    """Merge the TP partials [R, N, 2K+3] into global per-token statistics (identical on every rank).

    With d_r = m_r − M (M = global max): S = Σ_r S_r e^{d_r},
    Σ_j e^{z_j−M}(z_j − M) = Σ_r e^{d_r}(E_r + d_r S_r), log Z = M + log S, H = log S − (Σ e^{z−M}(z−M))/S.
    Computed in float64, returned in float32.
    """
    K = top_k
    values, ids = gathered[..., :K], gathered[..., K:2 * K]  # [R, N, K]
    sum_exp, sum_exp_z, target_z = gathered[..., 2 * K], gathered[..., 2 * K + 1], gathered[..., 2 * K + 2]
    local_max = values[..., 0]  # [R, N]; −inf for a shard with no real rows
    global_max = local_max.max(dim=0).values  # [N]
    has_rows = sum_exp > 0
    d = torch.where(has_rows, local_max - global_max, 0.0)  # avoids (−inf)·0
    scale = torch.where(has_rows, d.exp(), 0.0)
    S = (scale * sum_exp).sum(dim=0)
    SE = (scale * (sum_exp_z + d * sum_exp)).sum(dim=0)
    log_S = S.log()
    entropy = log_S - SE / S
    lse = global_max + log_S
    target_logprob = (target_z.sum(dim=0) - global_max) - log_S
    # Global top-K among the R·K candidates (token-major so that topk runs over the last dim).
    cand_values = values.permute(1, 0, 2).reshape(values.shape[1], -1)  # [N, R·K]
    cand_ids = ids.permute(1, 0, 2).reshape(ids.shape[1], -1)
    top_values, pos = torch.topk(cand_values, K, dim=-1)
    topk_ids = cand_ids.gather(1, pos).long()
    topk_logprob = (top_values - global_max.unsqueeze(1)) - log_S.unsqueeze(1)
    f32 = torch.float32
    return target_logprob.to(f32), entropy.to(f32), topk_logprob.to(f32), topk_ids, lse.to(f32)


def softmax_gradient_chunk(x, grad_out, p_buf, lse, inv_t, shard, ids, betas, grad_entropy=None, entropy=None,
                           work=None):
    """grad_out[n, n_real] = (Σ_m β_m (1[j = m] − π_j) − g_H π_j (log π_j + H)) / T over the K+1 ids m.

    ids/betas [n, K+1]: global ids (target, c_1..c_K) and upstream gradients β_m. p_buf is an fp32 [n, n_real]
    buffer (it may be grad_out itself when the logits are fp32). grad_entropy (g_H) and entropy (H) [n]: the
    entropy term, None when H is unused; it then needs `work`, a second fp32 [n, n_real] buffer (for π while
    p_buf holds log π). Passes over the chunk: π (and log π), scale, indicator fix-up — one pass for both terms.
    """
    local, owned = owned_local_index(ids, shard)
    # Value at each listed position: the dense term there + (Σ of the β of owned ids at that position)/T. Entries
    # that share a position (y_t among the c_k; clamped non-owned ids) get the same value, so scatter_ is exact.
    same = local.unsqueeze(2) == local.unsqueeze(1)  # [n, K+1, K+1]
    beta_here = (same * torch.where(owned, betas, 0.0).unsqueeze(1)).sum(dim=2)
    if grad_entropy is None:
        p = torch.add(-lse.unsqueeze(1), x, alpha=inv_t, out=p_buf).exp_()  # π_j, recomputed; nothing [n, V] saved
        coef = -betas.sum(dim=1, keepdim=True) * inv_t  # [n, 1]
        fixed = p.gather(1, local) * coef + beta_here * inv_t  # [n, K+1]
        if grad_out is p:
            p.mul_(coef)
        else:
            torch.mul(p, coef, out=grad_out)  # fp32 math, one rounding to the logits dtype
    else:
        # −π_j (Σβ + g_H (H + log π_j)) / T = π_j · (a + b · log π_j), a = −(Σβ + g_H H)/T, b = −g_H/T  [n, 1]
        log_p = torch.add(-lse.unsqueeze(1), x, alpha=inv_t, out=p_buf)  # log π_j
        p = torch.exp(log_p, out=work)  # π_j
        a = (-(betas.sum(dim=1) + grad_entropy * entropy) * inv_t).unsqueeze(1)
        b = (-grad_entropy * inv_t).unsqueeze(1)
        dense = log_p.mul_(b).add_(a).mul_(p)  # fp32, in p_buf
        fixed = dense.gather(1, local) + beta_here * inv_t
        if grad_out is not dense:
            grad_out.copy_(dense)  # one rounding to the logits dtype
    grad_out.scatter_(1, local, fixed.to(grad_out.dtype))


# --------------------------------------------------------------------------------------------------
# Forward sequencing (shared by the autograd Function and the no-grad path) and the Function itself.
# --------------------------------------------------------------------------------------------------


def local_partials(logits2d, targets1d, top_k, shard, inv_t, chunk_tokens, backend="torch") -> torch.Tensor:
    """This rank's [N, 2K+3] float64 partials (pack_partials) of logits2d [N, ≥ n_real], chunk by chunk."""
    N = logits2d.shape[0]
    if backend == "triton":  # one streaming pass per row, same partials
        return triton_kernels.local_partials(logits2d, targets1d, top_k, shard, inv_t)
    partials = torch.empty((N, 2 * top_k + 3), dtype=torch.float64, device=logits2d.device)
    step = max(1, chunk_tokens // 2)  # local_exp_sums holds two fp32 [step, V] buffers = one [chunk, V]
    for a in range(0, N, step):
        b = min(a + step, N)
        x = real_rows(logits2d[a:b], shard)  # [n, n_real] view, logits dtype
        values, ids = local_topk(x, top_k, shard, inv_t)
        target_z = local_target_logit(x, targets1d[a:b], shard, inv_t)
        sum_exp, sum_exp_z = local_exp_sums(x, values[:, 0], inv_t)
        partials[a:b] = pack_partials(values, ids, sum_exp, sum_exp_z, target_z)
    return partials


def gather_and_merge(partials, top_k, tp_group, shard):
    """The one all-gather of the partials [N, 2K+3] over TP, then merge_partials (identical on every rank)."""
    N = partials.shape[0]
    if tp_group is None:
        gathered = partials.unsqueeze(0)  # [1, N, 2K+3]
    else:
        # The only communication: (2K+3) numbers per token per rank. Gloo wants the concatenated layout.
        gathered = torch.empty((shard.tp_size * N, 2 * top_k + 3), dtype=torch.float64, device=partials.device)
        dist.all_gather_into_tensor(gathered, partials, group=tp_group)
        gathered = gathered.view(shard.tp_size, N, 2 * top_k + 3)
    return merge_partials(gathered, top_k)


def _forward(logits2d, targets1d, top_k, tp_group, temperature, shard, chunk_tokens, backend="torch"):
    """Local pass → one all-gather → merge. Returns (target_logprob, entropy, topk_lp, topk_ids, lse)."""
    partials = local_partials(logits2d, targets1d, top_k, shard, 1.0 / temperature, chunk_tokens, backend)
    return gather_and_merge(partials, top_k, tp_group, shard)


def upstream_coefficients(grad_target_lp, grad_entropy, grad_topk_lp, targets1d, topk_ids, lse):
    """The backward's per-token coefficients: ids [N, K+1] = (y_t, c_1..c_K), their upstream gradients β [N, K+1]
    fp32 (a missing one is β = 0) and g_H [N] fp32 (None without an entropy gradient)."""
    N, K = topk_ids.shape
    beta_t = grad_target_lp.float() if grad_target_lp is not None else lse.new_zeros(N)
    beta_k = grad_topk_lp.float() if grad_topk_lp is not None else lse.new_zeros(N, K)
    ids = torch.cat([targets1d.unsqueeze(1), topk_ids], dim=1)  # [N, K+1]
    betas = torch.cat([beta_t.unsqueeze(1), beta_k], dim=1)
    g_h = grad_entropy.float() if grad_entropy is not None else None
    return ids, betas, g_h


class _VocabParallelTokenStats(torch.autograd.Function):
    """Sequences the named steps; saves only the logits reference and per-token scalars/ids."""

    @staticmethod
    def forward(ctx, logits2d, targets1d, top_k, tp_group, temperature, shard, chunk_tokens, backend):
        target_lp, entropy, topk_lp, topk_ids, lse = _forward(
            logits2d, targets1d, top_k, tp_group, temperature, shard, chunk_tokens, backend)
        ctx.save_for_backward(logits2d, targets1d, topk_ids, lse, entropy)
        ctx.temperature, ctx.shard, ctx.chunk_tokens, ctx.backend = temperature, shard, chunk_tokens, backend
        ctx.mark_non_differentiable(topk_ids)
        ctx.set_materialize_grads(False)
        return target_lp, entropy, topk_lp, topk_ids

    @staticmethod
    def backward(ctx, grad_target_lp, grad_entropy, grad_topk_lp, _grad_ids):
        logits2d, targets1d, topk_ids, lse, entropy = ctx.saved_tensors
        shard, T, chunk = ctx.shard, ctx.temperature, ctx.chunk_tokens
        if shard.n_real == 0 or (grad_target_lp is None and grad_topk_lp is None and grad_entropy is None):
            return torch.zeros_like(logits2d), None, None, None, None, None, None, None
        N = topk_ids.shape[0]
        ids, betas, g_h = upstream_coefficients(grad_target_lp, grad_entropy, grad_topk_lp, targets1d, topk_ids, lse)
        if ctx.backend == "triton":  # one pass per row, padding rows included
            grad = triton_kernels.softmax_gradient(logits2d, ids, betas, lse, 1.0 / T, shard,
                                                   grad_entropy=g_h, entropy=None if g_h is None else entropy)
            return grad, None, None, None, None, None, None, None
        grad = torch.empty_like(logits2d)  # real rows are all written below
        grad[:, shard.n_real:] = 0  # padding rows get a zero gradient
        in_place = grad.dtype == torch.float32  # fp32 logits: the gradient itself is the buffer
        # fp32 [n, V] work buffers beside the gradient: p_buf unless in place, plus one for π with the entropy
        # term. The chunk shrinks so that all of them together stay one [chunk_tokens, V] buffer.
        buffers = (0 if in_place else 1) + (1 if g_h is not None else 0)
        step = max(1, chunk // max(buffers, 1))
        for a in range(0, N, step):
            b = min(a + step, N)
            grad_out = real_rows(grad[a:b], shard)
            f32 = dict(dtype=torch.float32, device=grad.device)
            p_buf = grad_out if in_place else torch.empty(grad_out.shape, **f32)
            work = torch.empty(grad_out.shape, **f32) if g_h is not None else None
            softmax_gradient_chunk(real_rows(logits2d[a:b], shard), grad_out, p_buf, lse[a:b], 1.0 / T, shard,
                                   ids[a:b], betas[a:b],
                                   grad_entropy=None if g_h is None else g_h[a:b],
                                   entropy=None if g_h is None else entropy[a:b], work=work)
            del p_buf, work  # free before the next chunk allocates its own
        return grad, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def resolve_shard(logits: torch.Tensor, tp_group, vocab_size: Optional[int], top_k: int) -> tuple[_Shard, int]:
    """Validate the sharding and return (this rank's shard, real vocabulary size). Only logits.shape[-1] = V_local
    is read (losses/fused_linear.py passes the transposed weight shard)."""
    v_local = logits.shape[-1]
    if tp_group is None:
        tp_size, tp_rank = 1, 0
    else:
        tp_size, tp_rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    total_rows = v_local * tp_size
    if vocab_size is None:
        vocab_size = total_rows
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if vocab_size > total_rows:
        raise ValueError(
            f"vocab_size={vocab_size} exceeds the rows held by the tp_group: V_local={v_local} x tp_size={tp_size}"
            f" = {total_rows}; the tp_group size is inconsistent with the vocabulary shards")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    if top_k > vocab_size:
        raise ValueError(f"top_k={top_k} is larger than the real vocabulary (vocab_size={vocab_size})")
    start = tp_rank * v_local
    n_real = max(0, min(v_local, vocab_size - start))
    return _Shard(start=start, n_real=n_real, tp_size=tp_size), vocab_size


def check_targets(targets: torch.Tensor, vocab_size: int, mask: Optional[torch.Tensor]) -> None:
    """Raise ValueError if a (masked-in) target id is outside [0, vocab_size)."""
    bad = (targets < 0) | (targets >= vocab_size)
    if mask is not None:
        bad = bad & mask
    if bool(bad.any()):
        first = targets[bad][0].item()
        raise ValueError(f"target id out of range: got {first}, valid ids are [0, vocab_size={vocab_size})"
                         + (" at masked-in positions" if mask is not None else ""))


def token_statistics(logits: torch.Tensor, targets: torch.Tensor, top_k: int, tp_group=None,
                     temperature: float = 1.0, vocab_size: Optional[int] = None, *,
                     mask: Optional[torch.Tensor] = None,
                     chunk_tokens: int = DEFAULT_CHUNK_TOKENS, backend: str = "auto") -> TokenStats:
    """Per-token target log-prob, entropy, top-K log-probs/ids and rank-1 flag of softmax(logits / T).

    logits [B, L, V_local] (this rank's vocabulary shard; fp32/bf16/fp16, never modified), targets [B, L]
    int64 global ids. `mask` [B, L] (optional) restricts the target-range check to valid tokens; at other
    positions any target id is tolerated and its target_logprob is meaningless. Ties in the top-K are
    broken arbitrarily (as torch.topk does). Under torch.no_grad (or logits without requires_grad) no
    autograd state is built. Memory: the equivalent of one fp32 [chunk_tokens, V_local] buffer + O(B·L·K).
    backend: "torch", "triton" (losses/triton_kernels.py: fused kernels, no [chunk, V] buffer, chunk_tokens
    unused) or "auto" (Triton on CUDA when it imports) — the same statistics either way.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, L, V_local], got shape {tuple(logits.shape)}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"logits dtype must be float32/bfloat16/float16, got {logits.dtype}")
    if targets.shape != logits.shape[:2]:
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match logits [B, L] = "
                         f"{tuple(logits.shape[:2])}")
    if targets.dtype != torch.int64:
        raise ValueError(f"targets dtype must be int64, got {targets.dtype}")
    if mask is not None and (mask.shape != targets.shape or mask.dtype != torch.bool):
        raise ValueError(f"mask must be a bool tensor of shape {tuple(targets.shape)}, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an int >= 1, got {chunk_tokens!r}")
    shard, vocab_size = resolve_shard(logits, tp_group, vocab_size, top_k)
    check_targets(targets, vocab_size, mask)
    backend = triton_kernels.resolve_backend(backend, logits.device, top_k)

    B, L, V = logits.shape
    logits2d, targets1d = logits.reshape(B * L, V), targets.reshape(B * L)  # [N, V_local], [N]
    temperature = float(temperature)
    if torch.is_grad_enabled() and logits.requires_grad:
        target_lp, entropy, topk_lp, topk_ids = _VocabParallelTokenStats.apply(
            logits2d, targets1d, top_k, tp_group, temperature, shard, chunk_tokens, backend)
    else:  # forward-only (old log-probs, metrics): no graph, nothing saved
        target_lp, entropy, topk_lp, topk_ids, _ = _forward(
            logits2d, targets1d.detach(), top_k, tp_group, temperature, shard, chunk_tokens, backend)
    return TokenStats(
        target_logprob=target_lp.view(B, L),
        entropy=entropy.view(B, L),
        topk_logprob=topk_lp.view(B, L, top_k),
        topk_ids=topk_ids.view(B, L, top_k),
        is_rank1=(targets1d == topk_ids[:, 0]).view(B, L),
    )

"""Forward-only passes through the training schedule (trainer/schedule.py): per-token statistics of the current
policy — target log-prob, entropy, top-K, rank-1 flag — for the old-policy log-probs and the metrics
(``compute_token_stats``), and the KL-Cov / Clip-Cov token selection over the optimizer mini-batch that
``forward_backward`` runs before its loss pass (``with_covariance_selection``; trainer/step.py's docstring).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron_simko.losses import SimKOConfig, token_statistics
from megatron_simko.losses.covariance import covariance_selection
from megatron_simko.losses.fused_linear import DEFAULT_FUSED_CHUNK_TOKENS, linear_token_statistics
from megatron_simko.losses.vocab_parallel import DEFAULT_CHUNK_TOKENS
from megatron_simko.parallel.devices import collective_device, trainer_device
from megatron_simko.trainer.batch import RLBatch
from megatron_simko.trainer.schedule import make_microbatches, run_schedule, shift_left, uniform_shapes


def last_stage_token_stats(output: torch.Tensor, head, targets: torch.Tensor, top_k: int, tp_group,
                           temperature: float, vocab_size: int, mask: torch.Tensor, backend: str,
                           chunk_tokens: int, fused_chunk_tokens: int):
    """TokenStats of the last stage's output: from the logits [b, s, V/TP] (head None), or from the hidden states
    [b, s, H] and head.weight [V/TP, H] without logits (losses/fused_linear.py). Same statistics either way."""
    if head is None:
        return token_statistics(output, targets, top_k, tp_group=tp_group, temperature=temperature,
                                vocab_size=vocab_size, mask=mask, chunk_tokens=chunk_tokens, backend=backend)
    return linear_token_statistics(output, head.weight, targets, top_k, tp_group=tp_group, temperature=temperature,
                                   vocab_size=vocab_size, mask=mask, chunk_tokens=fused_chunk_tokens, backend=backend)


@dataclass
class PerTokenStats:
    """Per-token statistics aligned with ``batch.tokens`` (index t = token t predicted from position t − 1),
    on the trainer device (``parallel.devices.trainer_device``).

    target_logprob [B, S] f32, entropy [B, S] f32, topk_logprob [B, S, K] f32, topk_ids [B, S, K] int64
    (global vocabulary ids), is_rank1 [B, S] bool. Index 0 and padding positions (t ≥ lengths[b]) hold 0
    (ids: −1, is_rank1: False). Prompt positions 1..prompt_len−1 are filled too (any caller may mask them).
    """

    target_logprob: torch.Tensor
    entropy: torch.Tensor
    topk_logprob: torch.Tensor
    topk_ids: torch.Tensor
    is_rank1: torch.Tensor

    def fields(self):
        return [self.target_logprob, self.entropy, self.topk_logprob, self.topk_ids, self.is_rank1]


def empty_stats(B: int, S: int, K: int, device) -> PerTokenStats:
    return PerTokenStats(
        target_logprob=torch.zeros(B, S, dtype=torch.float32, device=device),
        entropy=torch.zeros(B, S, dtype=torch.float32, device=device),
        topk_logprob=torch.zeros(B, S, K, dtype=torch.float32, device=device),
        topk_ids=torch.full((B, S, K), -1, dtype=torch.int64, device=device),
        is_rank1=torch.zeros(B, S, dtype=torch.bool, device=device),
    )


def forward_only_token_stats(model_chunks, microbatches: List[RLBatch], top_k: int, vocab_size: int,
                              temperature: float, backend: str = "auto", fused_linear: bool = False,
                              fused_chunk_tokens: int = DEFAULT_FUSED_CHUNK_TOKENS):
    """One forward-only pass of the schedule: [(mb, valid [b, s−1], TokenStats)] on the last stage ([] elsewhere)."""
    from megatron.core import parallel_state as mpu

    tp_group = mpu.get_tensor_model_parallel_group()

    def stats_func(mb: RLBatch, output: torch.Tensor, head=None, non_loss_data: bool = True):
        b, s = mb.tokens.shape
        targets = shift_left(mb.tokens.to(output.device), 0)  # [b, s]: position t predicts token t + 1
        valid = torch.arange(1, s + 1, device=output.device) < mb.lengths.to(output.device).unsqueeze(1)  # [b, s]
        st = last_stage_token_stats(output, head, targets, top_k, tp_group, temperature, vocab_size, valid, backend,
                                    DEFAULT_CHUNK_TOKENS, fused_chunk_tokens)
        # the statistics of positions 0..s−2 (small [b, s(, K)] tensors; the last position predicts nothing)
        return mb, valid[:, :-1], type(st)(*(t[:, :-1] for t in st))

    for chunk in model_chunks:
        chunk.eval()
    try:
        outputs = run_schedule(model_chunks, microbatches, stats_func, forward_only=True, fused_linear=fused_linear)
    finally:
        for chunk in model_chunks:
            chunk.train()
    return outputs if mpu.is_pipeline_last_stage(ignore_virtual=True) else []


def scatter_stats(outputs, out: PerTokenStats) -> PerTokenStats:
    """Write the micro-batches' statistics into ``out`` (aligned with the batch the micro-batches index)."""
    device = out.target_logprob.device
    for mb, valid, st in outputs:
        real = (mb.indices >= 0).to(device)  # dummy rows from uniform_shapes carry index −1
        rows = mb.indices.to(device)[real]
        cols = slice(1, mb.seq_len)
        v, st = valid[real], type(st)(*(t[real] for t in st))
        out.target_logprob[rows, cols] = torch.where(v, st.target_logprob, 0.0)
        out.entropy[rows, cols] = torch.where(v, st.entropy, 0.0)
        out.topk_logprob[rows, cols] = torch.where(v.unsqueeze(-1), st.topk_logprob, 0.0)
        out.topk_ids[rows, cols] = torch.where(v.unsqueeze(-1), st.topk_ids, -1)
        out.is_rank1[rows, cols] = st.is_rank1 & v
    return out


@torch.no_grad()
def compute_token_stats(model_chunks: List[torch.nn.Module], batch: RLBatch, top_k: int, vocab_size: int,
                        temperature: float = 1.0, num_microbatches: Optional[int] = None,
                        max_tokens: Optional[int] = None,
                        broadcast_to_all_stages: bool = False, backend: str = "auto", fused_linear: bool = False,
                        fused_chunk_tokens: int = DEFAULT_FUSED_CHUNK_TOKENS) -> Optional[PerTokenStats]:
    """Forward-only pass through the same schedule: per-token target log-prob, entropy and top-K.

    Use it for the old-policy log-probs (``old_logprob = stats.target_logprob``) and for metrics (Λ^(k)).
    Micro-batching: ``num_microbatches`` equal splits, or ``max_tokens`` token-budget packing (default: one
    micro-batch). The last pipeline stage computes the statistics; other stages return None unless
    ``broadcast_to_all_stages`` (then every rank of this pipeline receives them: O(B·S·K) numbers per call).
    Every TP rank of the last stage returns identical statistics (the loss library merges the vocabulary
    shards). No DP communication: each DP rank computes its own batch. ``backend``: the loss backend
    (SimKOConfig.backend) of ``token_statistics``; ``fused_linear`` / ``fused_chunk_tokens``: statistics from the
    hidden states without logits (SimKOConfig.fused_linear / fused_chunk_tokens).
    """
    from megatron.core import parallel_state as mpu

    if num_microbatches is None and max_tokens is None:
        num_microbatches = 1
    microbatches = uniform_shapes(model_chunks, make_microbatches(batch, num_microbatches, max_tokens))
    device = trainer_device()
    outputs = forward_only_token_stats(model_chunks, microbatches, top_k, vocab_size, temperature, backend,
                                        fused_linear, fused_chunk_tokens)

    B, S = batch.tokens.shape
    is_last = mpu.is_pipeline_last_stage(ignore_virtual=True)
    if not is_last and not broadcast_to_all_stages:
        return None
    out = scatter_stats(outputs, empty_stats(B, S, top_k, device))
    if broadcast_to_all_stages and mpu.get_pipeline_model_parallel_world_size() > 1:
        src = mpu.get_pipeline_model_parallel_last_rank()
        group = mpu.get_pipeline_model_parallel_group()
        on = collective_device(group)
        for t in out.fields():
            buf = t.to(on, torch.uint8 if t.dtype == torch.bool else t.dtype)  # gloo has no bool collectives
            dist.broadcast(buf, src=src, group=group)
            if buf is not t:
                t.copy_(buf)
    return out


# --------------------------------------------------------------------------------------------------
# KL-Cov / Clip-Cov: the token selection over the optimizer mini-batch (module docstring)
# --------------------------------------------------------------------------------------------------


def _rows_of(microbatches: List[RLBatch], device):
    """This rank's mini-batch re-assembled from its micro-batches by ``indices``: (loss_mask, advantages,
    old_logprob) [B, S] aligned with tokens, B = rows, S = the longest micro-batch."""
    B = 1 + max(int(mb.indices.max()) for mb in microbatches)
    S = max(mb.seq_len for mb in microbatches)
    mask = torch.zeros(B, S, dtype=torch.bool, device=device)
    adv = torch.zeros(B, S, dtype=torch.float32, device=device)
    old = torch.zeros(B, S, dtype=torch.float32, device=device)
    for mb in microbatches:
        real = mb.indices >= 0
        rows, s = mb.indices[real].to(device), mb.seq_len
        a = mb.advantages[real].to(device, torch.float32)
        mask[rows, :s] = mb.loss_mask[real].to(device)
        adv[rows, :s] = a if a.dim() == 2 else a.unsqueeze(1).expand(-1, s)
        old[rows, :s] = mb.old_logprob[real].to(device, torch.float32)
    return mask, torch.where(mask, adv, 0.0), torch.where(mask, old, 0.0)


@torch.no_grad()
def with_covariance_selection(model_chunks, microbatches: List[RLBatch], loss_cfg: SimKOConfig, vocab_size: int,
                              temperature: float, dp_group, seed: int) -> List[RLBatch]:
    """The micro-batches with ``cov_select`` set on the last stage (unchanged elsewhere): the tokens KL-Cov
    penalises / Clip-Cov zeroes, chosen over all micro-batches of all DP ranks from the current policy's log π."""
    outputs = forward_only_token_stats(model_chunks, microbatches, loss_cfg.top_k, vocab_size, temperature,
                                        loss_cfg.backend, loss_cfg.fused_linear, loss_cfg.fused_chunk_tokens)
    if not outputs:  # not the last pipeline stage: no loss here
        return microbatches
    device = trainer_device()
    mask, adv, old = _rows_of(microbatches, device)
    stats = scatter_stats(outputs, empty_stats(mask.shape[0], mask.shape[1], loss_cfg.top_k, device))
    selected = covariance_selection(loss_cfg.mode, adv, stats.target_logprob, old, mask, loss_cfg, group=dp_group,
                                    seed=seed)  # [B, S], canonical order = rows of this rank, DP rank by rank
    out = []
    for mb in microbatches:
        sel = torch.zeros(mb.tokens.shape, dtype=torch.bool, device=mb.tokens.device)
        real = mb.indices >= 0
        sel[real] = selected[mb.indices[real].to(device), :mb.seq_len].to(sel.device)
        out.append(dataclasses.replace(mb, cov_select=sel))
    return out

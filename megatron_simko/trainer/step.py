"""Forward/backward over micro-batches with megatron-core's schedules, and forward-only token statistics.

Loss scaling (the one thing to get right). The objective is the token-mean of the per-token SimKO loss over
the GLOBAL batch — all micro-batches on all data-parallel ranks — not a mean of per-micro-batch means:

    L = Σ_{dp ranks} Σ_{micro-batches} Σ_{response tokens} loss_t  /  N,    N = global count of response tokens

1. N is computed first: Σ loss_mask over this rank's micro-batches, all-reduced (SUM) over the DP group.
2. Each micro-batch's loss function returns ``simko_loss(..., token_normalizer=N)`` = Σ_mb loss_t / N, as the
   (loss, num_tokens, metrics) triple, with ``config.calculate_per_token_loss=True``: megatron-core's schedule
   then does NOT divide the loss by num_microbatches (it would with a (loss, metrics) pair or with
   calculate_per_token_loss=False), and DDP's gradient scaling factor is 1, so the DP reduction SUMS gradients
   instead of averaging them.
3. ``finalize_model_grads`` runs with ``num_tokens=None`` (our wrapper), so it does not divide by the
   schedule's token count a second time.
The gradient after the step is therefore ∇L exactly (verified against one device by the DP2 equivalence test).

Alignment: position t of the logits predicts token t + 1. The logits stay whole ([b, s, V/TP], a view all the way
into the loss) and the targets move instead: the per-token batch tensors (aligned with tokens, batch.py) are
shifted left by one (``_shifted``) and the last position, which predicts nothing, is masked out. Slicing the logits
(``logits[:, :-1]``) would copy them for b > 1 (the slice is not a view of a [b·(s−1), V] matrix) and make autograd
allocate a zero [b, s, V] gradient to copy into (issue 20 item 7; benchmarks/loss_memory_bench.py measures it).

KL-Cov / Clip-Cov (losses/covariance.py) choose tokens by statistics of a population. Here the population is the
optimizer mini-batch — every micro-batch on every DP rank — so the choice does not depend on the micro-batch split
or the DP size. Before the loss pass, ``forward_backward`` runs one forward-only pass over the same micro-batches
(the current policy's log π(y_t), detached), selects on the last stage with the DP group's statistics (an
all-gather of 2 counts, an all-reduce of 3 sums and, for KL-Cov, an all-gather of ≤ 2k numbers per rank) and
carries the selection in each micro-batch (``RLBatch.cov_select``). Cost: one extra forward-only pass per
optimizer step, in these two modes only. It reproduces the authors' per-call choice (verl: one loss call per
micro-batch per GPU) when the mini-batch is a single micro-batch on a single DP rank.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_simko.losses import SimKOConfig, merge_metrics, simko_loss, token_statistics
from megatron_simko.losses.covariance import covariance_selection
from megatron_simko.losses.fused_linear import DEFAULT_FUSED_CHUNK_TOKENS, linear_token_statistics
from megatron_simko.losses.simko import COVARIANCE_MODES
from megatron_simko.losses.vocab_parallel import DEFAULT_CHUNK_TOKENS
from megatron_simko.parallel.cpu_shims import cuda_to_cpu
from megatron_simko.parallel.devices import all_reduce, collective_device, trainer_device
from megatron_simko.models.output_head import output_layer_bypassed
from megatron_simko.trainer.batch import RLBatch, token_budget_microbatches


def causal_attention_mask(seq_len: int, device) -> torch.Tensor:
    """[1, 1, s, s] bool, True = masked (megatron-core's convention): position i attends to j ≤ i only."""
    return torch.triu(torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)


def make_microbatches(batch: RLBatch, num_microbatches: Optional[int] = None, max_tokens: Optional[int] = None,
                      dp_group=None, min_microbatches: int = 1) -> List[RLBatch]:
    """Either ``num_microbatches`` equal splits or token-budget packing (``max_tokens``), not both. Packing
    under the interleaved pipeline schedule (virtual PP) makes a multiple of the PP size, as it requires."""
    from megatron.core import parallel_state as mpu

    if (num_microbatches is None) == (max_tokens is None):
        raise ValueError("give exactly one of num_microbatches or max_tokens")
    if num_microbatches is not None:
        return batch.split(num_microbatches)
    interleaved = (mpu.model_parallel_is_initialized()
                   and (mpu.get_virtual_pipeline_model_parallel_world_size() or 1) > 1)
    return token_budget_microbatches(batch, max_tokens, dp_group=dp_group, min_microbatches=min_microbatches,
                                     multiple_of=mpu.get_pipeline_model_parallel_world_size() if interleaved else 1)


def uniform_shapes(model_chunks, microbatches: List[RLBatch]) -> List[RLBatch]:
    """Pad micro-batches to one [b, s] when a pipeline runs without variable_seq_lengths (the interleaved
    schedule); otherwise return them unchanged."""
    from megatron.core import parallel_state as mpu
    from megatron.core.utils import get_model_config

    config = get_model_config(model_chunks[0])
    if mpu.get_pipeline_model_parallel_world_size() == 1 or config.variable_seq_lengths:
        return microbatches
    b = max(mb.batch_size for mb in microbatches)
    s = max(mb.seq_len for mb in microbatches)
    return [mb.pad_to(b, s) for mb in microbatches]


def _model_arg(model_chunks):
    return model_chunks if len(model_chunks) > 1 else model_chunks[0]


def _data_iterator(model_chunks, microbatches):
    if len(model_chunks) > 1:  # interleaved schedule: one iterator per chunk, same micro-batch order
        return [iter(microbatches) for _ in model_chunks]
    return iter(microbatches)


def _forward_step(data_iterator, model, *, loss_func_factory, fused_linear: bool = False):
    """megatron-core forward_step_func: one micro-batch through this stage; the loss closure for the last.
    fused_linear: the last stage returns hidden states and the closure gets the output weight (models/output_head)."""
    mb: RLBatch = next(data_iterator)
    device = trainer_device()
    tokens = mb.tokens.to(device)  # [b, s]
    b, s = tokens.shape
    position_ids = torch.arange(s, device=device).unsqueeze(0).expand(b, s)  # right padding: start at 0
    with output_layer_bypassed(model) if fused_linear else contextlib.nullcontext() as head:
        # last stage: [b, s, V/TP] logits, or [b, s, H] final-norm hidden states (fused_linear)
        output = model(input_ids=tokens, position_ids=position_ids, attention_mask=causal_attention_mask(s, device))
    return output, functools.partial(loss_func_factory, mb, head=head)


def _run_schedule(model_chunks, microbatches: List[RLBatch], func, forward_only: bool, fused_linear: bool = False):
    """megatron-core's schedule (no PP / 1F1B / interleaved, by the parallel state) over ``microbatches``.

    ``func(mb, output, head=...)`` runs on the last stage: a loss function (forward_only=False) or a statistics
    function whose results the schedule collects (forward_only=True, ``collect_non_loss_data``). output = the
    logits and head = None, or with fused_linear the hidden states and the OutputHead holding the output weight."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    kwargs = dict(collect_non_loss_data=True) if forward_only else {}
    with cuda_to_cpu():
        return get_forward_backward_func()(
            forward_step_func=functools.partial(_forward_step, loss_func_factory=func, fused_linear=fused_linear),
            data_iterator=_data_iterator(model_chunks, microbatches),
            model=_model_arg(model_chunks),
            num_microbatches=len(microbatches),
            seq_length=max(mb.seq_len for mb in microbatches),
            micro_batch_size=max(mb.batch_size for mb in microbatches),
            forward_only=forward_only,
            **kwargs,
        )


def shift_left(t: torch.Tensor, fill) -> torch.Tensor:
    """[b, s, ...] → [b, s, ...]: out[:, i] = t[:, i + 1], the last position filled with ``fill``."""
    return torch.cat([t[:, 1:], t.new_full((t.shape[0], 1) + tuple(t.shape[2:]), fill)], dim=1)


def _shifted(mb: RLBatch, device):
    """Targets and per-token tensors for the whole logits [b, s, V/TP]: position t ↔ index t + 1 of the batch.
    The last position has no target: masked out (target id 0, old log-prob 0, not selected)."""
    advantages = mb.advantages.to(device)
    if advantages.dim() == 2:
        advantages = shift_left(advantages, 0.0)
    cov_select = shift_left(mb.cov_select.to(device), False) if mb.cov_select is not None else None
    return (shift_left(mb.tokens.to(device), 0), shift_left(mb.old_logprob.to(device), 0.0), advantages,
            shift_left(mb.loss_mask.to(device), False), cov_select)


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


def _finalize_grads_without_token_scaling(model, num_tokens=None, **kwargs):
    """finalize_model_grads (DP reduction, tied-embedding and SP norm all-reduces) without the division by
    the schedule's token count: our losses are already normalised by the global count (module docstring)."""
    from megatron.core.distributed import finalize_model_grads

    return finalize_model_grads(model, None, **kwargs)


@dataclass
class StepOutput:
    """Same on every rank: loss = global token-mean SimKO loss; metrics = global token-weighted means
    (``merge_metrics`` keys plus "loss"); num_tokens = N (global response tokens); num_microbatches here."""

    loss: float
    metrics: Dict[str, float]
    num_tokens: int
    num_microbatches: int


def forward_backward(model_chunks: List[torch.nn.Module], microbatches: List[RLBatch], loss_cfg: SimKOConfig,
                     vocab_size: int, temperature: float = 1.0, selection_seed: int = 0) -> StepOutput:
    """Forward + backward of the SimKO loss over ``microbatches`` (this DP rank's share of the global batch).

    Gradients accumulate into the DDP ``main_grad`` buffers and are reduced over DP at the end (finalize).
    Zero them before calling (``train_step`` does). All ranks of a model replica pass the same micro-batches.
    kl_cov / clip_cov: the token selection over the whole mini-batch first (module docstring); Clip-Cov's draw
    is seeded with ``selection_seed`` (``train_step`` passes the optimizer-update count).
    """
    from megatron.core import parallel_state as mpu
    from megatron.core.utils import get_model_config

    config = get_model_config(model_chunks[0])
    if not config.calculate_per_token_loss:
        raise ValueError("the training step needs TransformerConfig(calculate_per_token_loss=True) "
                         "(use trainer.model.trainer_transformer_config)")
    dp_group = mpu.get_data_parallel_group()
    tp_group = mpu.get_tensor_model_parallel_group()

    # 1. the global token count N.
    n_local = sum(mb.num_loss_tokens for mb in microbatches)
    num_tokens = int(all_reduce(torch.tensor([n_local], dtype=torch.int64), group=dp_group).item())
    normalizer = float(max(num_tokens, 1))

    def loss_func(mb: RLBatch, output: torch.Tensor, head=None):
        targets, old_logprob, advantages, mask, cov_select = _shifted(mb, output.device)
        stats = None if head is None else last_stage_token_stats(
            output, head, targets, loss_cfg.top_k, tp_group, temperature, vocab_size, mask, loss_cfg.backend,
            loss_cfg.chunk_tokens, loss_cfg.fused_chunk_tokens)
        loss, metrics = simko_loss(output if head is None else None, targets, old_logprob, advantages, mask,
                                   loss_cfg, tp_group=tp_group, temperature=temperature, vocab_size=vocab_size,
                                   token_normalizer=normalizer, cov_selected=cov_select, stats=stats)
        count = torch.tensor(int(metrics["num_tokens"]), dtype=torch.int, device=output.device)
        return loss, count, metrics

    config.finalize_model_grads_func = _finalize_grads_without_token_scaling
    microbatches = uniform_shapes(model_chunks, microbatches)
    if loss_cfg.mode in COVARIANCE_MODES:
        microbatches = with_covariance_selection(model_chunks, microbatches, loss_cfg, vocab_size, temperature,
                                                 dp_group, selection_seed)
    per_mb = _run_schedule(model_chunks, microbatches, loss_func, forward_only=False,
                           fused_linear=loss_cfg.fused_linear)
    loss_sum = sum(m["loss"] for m in per_mb)  # each already Σ/N: the sum is this rank's share of L
    metrics = merge_metrics(per_mb) if per_mb else {}
    metrics = _reduce_metrics_over_dp(metrics, loss_sum, dp_group)
    metrics = _broadcast_from_last_stage(metrics)
    return StepOutput(loss=metrics["loss"], metrics=metrics, num_tokens=num_tokens,
                      num_microbatches=len(microbatches))


def _reduce_metrics_over_dp(metrics: Dict[str, float], loss_sum: float, dp_group) -> Dict[str, float]:
    """Global metrics on last-stage ranks: token-weighted means over DP, the loss summed (already /N)."""
    from megatron.core import parallel_state as mpu

    if not mpu.is_pipeline_last_stage(ignore_virtual=True):
        return {}
    keys = sorted(k for k in metrics if k != "num_tokens")
    n = metrics.get("num_tokens", 0.0)
    packed = torch.tensor([float(metrics[k]) * n for k in keys] + [n, float(loss_sum)], dtype=torch.float64)
    values = all_reduce(packed, group=dp_group).tolist()
    total = values[-2]
    out = {k: (v / total if total > 0 else 0.0) for k, v in zip(keys, values)}
    out["num_tokens"] = total
    out["loss"] = values[-1]
    return out


def _broadcast_from_last_stage(obj):
    """The last pipeline stage's Python object on every stage of this pipeline."""
    from megatron.core import parallel_state as mpu

    if mpu.get_pipeline_model_parallel_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=mpu.get_pipeline_model_parallel_last_rank(),
                               group=mpu.get_pipeline_model_parallel_group())
    return holder[0]


# --------------------------------------------------------------------------------------------------
# Forward-only statistics
# --------------------------------------------------------------------------------------------------


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


def _empty_stats(B: int, S: int, K: int, device) -> PerTokenStats:
    return PerTokenStats(
        target_logprob=torch.zeros(B, S, dtype=torch.float32, device=device),
        entropy=torch.zeros(B, S, dtype=torch.float32, device=device),
        topk_logprob=torch.zeros(B, S, K, dtype=torch.float32, device=device),
        topk_ids=torch.full((B, S, K), -1, dtype=torch.int64, device=device),
        is_rank1=torch.zeros(B, S, dtype=torch.bool, device=device),
    )


def _forward_only_token_stats(model_chunks, microbatches: List[RLBatch], top_k: int, vocab_size: int,
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
        outputs = _run_schedule(model_chunks, microbatches, stats_func, forward_only=True, fused_linear=fused_linear)
    finally:
        for chunk in model_chunks:
            chunk.train()
    return outputs if mpu.is_pipeline_last_stage(ignore_virtual=True) else []


def _scatter_stats(outputs, out: PerTokenStats) -> PerTokenStats:
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
    outputs = _forward_only_token_stats(model_chunks, microbatches, top_k, vocab_size, temperature, backend,
                                        fused_linear, fused_chunk_tokens)

    B, S = batch.tokens.shape
    is_last = mpu.is_pipeline_last_stage(ignore_virtual=True)
    if not is_last and not broadcast_to_all_stages:
        return None
    out = _scatter_stats(outputs, _empty_stats(B, S, top_k, device))
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
    outputs = _forward_only_token_stats(model_chunks, microbatches, loss_cfg.top_k, vocab_size, temperature,
                                        loss_cfg.backend, loss_cfg.fused_linear, loss_cfg.fused_chunk_tokens)
    if not outputs:  # not the last pipeline stage: no loss here
        return microbatches
    device = trainer_device()
    mask, adv, old = _rows_of(microbatches, device)
    stats = _scatter_stats(outputs, _empty_stats(mask.shape[0], mask.shape[1], loss_cfg.top_k, device))
    selected = covariance_selection(loss_cfg.mode, adv, stats.target_logprob, old, mask, loss_cfg, group=dp_group,
                                    seed=seed)  # [B, S], canonical order = rows of this rank, DP rank by rank
    out = []
    for mb in microbatches:
        sel = torch.zeros(mb.tokens.shape, dtype=torch.bool, device=mb.tokens.device)
        real = mb.indices >= 0
        sel[real] = selected[mb.indices[real].to(device), :mb.seq_len].to(sel.device)
        out.append(dataclasses.replace(mb, cov_select=sel))
    return out

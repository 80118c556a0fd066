"""The packed RL batch the trainer consumes, and how it is cut into micro-batches.

Shapes (B sequences, S = padded length; every sequence is prompt + response, right-padded):

    tokens           [B, S] int64   prompt tokens, then response tokens, then padding
    loss_mask        [B, S] bool    True on response tokens only (never on prompt or padding)
    old_logprob      [B, S] float   log π_old(tokens[b, t]) — the old policy's log-prob of token t
    advantages       [B] or [B, S]  float, per sequence (broadcast over its response) or per token
    rollout_logprob  [B, S] float   optional: the rollout engine's log-prob of token t (for diagnostics)
    lengths          [B] int64      prompt + response length; positions ≥ lengths[b] are padding
    cov_select       [B, S] bool    optional: the KL-Cov / Clip-Cov token selection of this optimizer step
                                    (trainer/token_stats.py computes it over the whole mini-batch; losses/covariance.py)

Alignment: every per-token tensor is aligned with ``tokens``; index t refers to token t *as predicted from
position t − 1*. Index 0 is therefore never a response token (loss_mask[:, 0] is False) and the model's
logits at position t − 1 score index t. The trainer keeps the logits whole and shifts these tensors left
instead (trainer/step.py ``_shifted``; the last position is masked).

Micro-batches. megatron-core's schedules run a fixed ``num_microbatches`` per step on every rank, and with
pipeline parallelism every stage must walk the same micro-batches in the same order. Two ways to cut:

* :meth:`RLBatch.split` — ``n`` equal micro-batches of B / n sequences (error if n does not divide B).
* :func:`token_budget_microbatches` — pack sequences by length so that each micro-batch holds at most
  ``max_tokens`` (padded) tokens, each trimmed to its own longest sequence. The count is made equal across
  data-parallel ranks (all-reduce MAX over the DP group, then the largest micro-batches are split until every
  rank has that many). All ranks of one model replica (its TP and PP ranks) hold the same batch, and the
  packing is deterministic, so they agree without communicating.

Micro-batches therefore differ in [b, s] shape; with pipeline parallelism the training step enables
megatron-core's ``variable_seq_lengths`` so stages exchange shapes before activations — except for the
interleaved (virtual) pipeline, whose shape exchange deadlocks on gloo: there every micro-batch is padded to
one [b_max, s_max] shape with dummy rows (:meth:`RLBatch.pad_to`; no loss tokens, ``indices`` −1).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import List, Optional, Sequence

import torch

from megatron_simko.parallel.devices import all_reduce, check_same_device


@dataclass
class RLBatch:
    """A packed RL batch (module docstring has the shapes). ``indices`` [B]: rows of the batch it came from.

    All fields live on one device (checked here); :meth:`to` moves them together."""

    tokens: torch.Tensor
    loss_mask: torch.Tensor
    old_logprob: torch.Tensor
    advantages: torch.Tensor
    rollout_logprob: Optional[torch.Tensor] = None
    lengths: Optional[torch.Tensor] = None
    indices: Optional[torch.Tensor] = None
    cov_select: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.tokens.dim() != 2 or self.tokens.dtype != torch.int64:
            raise ValueError(f"tokens must be int64 [B, S], got {self.tokens.dtype} {tuple(self.tokens.shape)}")
        check_same_device("RLBatch", **{f.name: getattr(self, f.name) for f in fields(self)})
        B, S = self.tokens.shape
        if B == 0 or S < 2:
            raise ValueError(f"a batch needs B ≥ 1 sequences of length ≥ 2, got [B, S] = [{B}, {S}]")
        for name in ("loss_mask", "old_logprob", "rollout_logprob", "cov_select"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (B, S):
                raise ValueError(f"{name} shape {tuple(t.shape)} must equal tokens' [B, S] = [{B}, {S}]")
        if self.loss_mask.dtype != torch.bool:
            raise ValueError(f"loss_mask must be bool, got {self.loss_mask.dtype}")
        if bool(self.loss_mask[:, 0].any()):
            raise ValueError("loss_mask[:, 0] must be False: token 0 has no preceding position to predict it")
        if tuple(self.advantages.shape) not in ((B,), (B, S)):
            raise ValueError(f"advantages must be [B] or [B, S], got {tuple(self.advantages.shape)}")
        if self.lengths is None:  # last response token + 1 (prompt-only rows: the full width)
            pos = torch.arange(S, device=self.tokens.device).expand(B, S)
            last = torch.where(self.loss_mask, pos, -1).max(dim=1).values
            self.lengths = torch.where(last >= 0, last + 1, torch.full_like(last, S))
        self.lengths = self.lengths.to(torch.int64)
        if tuple(self.lengths.shape) != (B,) or bool((self.lengths < 1).any()) or bool((self.lengths > S).any()):
            raise ValueError(f"lengths must be [B] with 1 ≤ length ≤ S = {S}")
        pos = torch.arange(S, device=self.tokens.device)
        if bool((self.loss_mask & (pos >= self.lengths.unsqueeze(1))).any()):
            raise ValueError("loss_mask is True beyond a sequence's length (on padding)")
        if self.indices is None:
            self.indices = torch.arange(B, dtype=torch.int64, device=self.tokens.device)

    # ----------------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def _per_row_fields(self):
        for f in fields(self):
            t = getattr(self, f.name)
            if t is not None:
                yield f.name, t

    def select(self, rows: Sequence[int]) -> "RLBatch":
        """The sub-batch of ``rows`` (in that order), trimmed to its longest sequence."""
        idx = torch.as_tensor(list(rows), dtype=torch.int64, device=self.tokens.device)
        width = max(int(self.lengths[idx].max()), 2)
        out = {}
        for name, t in self._per_row_fields():
            t = t.index_select(0, idx)
            if t.dim() == 2:
                t = t[:, :width]
            out[name] = t.contiguous()
        return RLBatch(**out)

    def split(self, num_microbatches: int) -> List["RLBatch"]:
        """``num_microbatches`` consecutive micro-batches of equal size B / num_microbatches."""
        B = self.batch_size
        if num_microbatches < 1 or B % num_microbatches != 0:
            raise ValueError(f"batch of {B} sequences is not divisible into {num_microbatches} micro-batches")
        size = B // num_microbatches
        return [self.select(range(i * size, (i + 1) * size)) for i in range(num_microbatches)]

    def pad_to(self, batch_size: int, seq_len: int) -> "RLBatch":
        """Right-pad to [batch_size, seq_len] with dummy rows (no loss tokens, length 1, index −1): for schedules
        that need every micro-batch in one shape (the interleaved pipeline on CPU/gloo, see step.py)."""
        B, S = self.tokens.shape
        if batch_size < B or seq_len < S:
            raise ValueError(f"cannot pad [{B}, {S}] down to [{batch_size}, {seq_len}]")
        out = {}
        for name, t in self._per_row_fields():
            fill = -1 if name == "indices" else (1 if name == "lengths" else 0)
            if t.dim() == 1:  # [B]
                out[name] = torch.full((batch_size,), fill, dtype=t.dtype, device=t.device)
                out[name][:B] = t
            else:  # [B, S]
                out[name] = torch.full((batch_size, seq_len), fill, dtype=t.dtype, device=t.device)
                out[name][:B, :S] = t
        return RLBatch(**out)

    def to(self, device) -> "RLBatch":
        """The same batch with every field on ``device`` (already validated: values do not change)."""
        out = copy.copy(self)
        for name, t in self._per_row_fields():
            setattr(out, name, t.to(device))
        return out


def padded_tokens(lengths: Sequence[int]) -> int:
    """Tokens a micro-batch of these sequences occupies once right-padded: count × longest."""
    return len(lengths) * max(lengths) if lengths else 0


def pack_by_token_budget(lengths: Sequence[int], max_tokens: int) -> List[List[int]]:
    """Row groups with padded_tokens ≤ max_tokens: sort by length (longest first), first-fit into groups.

    Deterministic (ties broken by row index). Rows come out sorted by length inside a group, so padding is
    small. Raises if a single sequence is longer than ``max_tokens``.
    """
    lengths = [int(n) for n in lengths]
    if lengths and max(lengths) > max_tokens:
        raise ValueError(f"a sequence of {max(lengths)} tokens exceeds the micro-batch budget max_tokens={max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: List[List[int]] = []
    for i in order:
        for g in groups:  # the group's longest is its first row (descending order), so the cost is (n+1)·L0
            if (len(g) + 1) * lengths[g[0]] <= max_tokens:
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def split_to_count(groups: List[List[int]], count: int) -> List[List[int]]:
    """Split the largest groups in halves until there are ``count`` (each half stays within the budget)."""
    groups = [list(g) for g in groups]
    while len(groups) < count:
        j = max(range(len(groups)), key=lambda k: (len(groups[k]), -k))
        g = groups[j]
        if len(g) < 2:
            raise ValueError(f"cannot make {count} micro-batches from {sum(map(len, groups))} sequences")
        groups[j:j + 1] = [g[: len(g) // 2], g[len(g) // 2:]]
    return groups


def token_budget_microbatches(batch: RLBatch, max_tokens: int, dp_group=None,
                              min_microbatches: int = 1, multiple_of: int = 1) -> List[RLBatch]:
    """Micro-batches of at most ``max_tokens`` padded tokens, the same number on every rank of ``dp_group``.

    dp_group: the data-parallel group (None: no DP agreement needed, e.g. one replica). The count is the max
    over DP ranks of the locally packed count (and ≥ ``min_microbatches``, e.g. the PP size for a full
    pipeline), rounded up to a multiple of ``multiple_of`` (the PP size under the interleaved schedule, which
    requires it); ranks with fewer split their largest micro-batches. Every DP rank needs at least that many
    sequences. Each micro-batch is trimmed to its longest sequence; ``RLBatch.indices`` maps rows back.
    """
    groups = pack_by_token_budget(batch.lengths.tolist(), max_tokens)
    count = max(len(groups), min_microbatches)
    if dp_group is not None:
        count = int(all_reduce(torch.tensor([count], dtype=torch.int64), op="max", group=dp_group).item())
    count = -(-count // multiple_of) * multiple_of  # after the DP max, so every DP rank rounds the same count
    groups = split_to_count(groups, count)
    return [batch.select(g) for g in groups]

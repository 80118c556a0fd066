"""The rollout interface the RL loop talks to, and the plain data it exchanges.

    engine.generate(prompt_token_ids, n, SamplingConfig(...), step=s)  -> [RolloutResult per prompt]
    engine.update_weights(iter((hf_name, tensor), ...))                -> new policy, in place
    engine.release_memory() / engine.resume_memory()                   -> around the training phase
    engine.shutdown()

Token ids in, token ids out: tokenization belongs to data/, detokenization to rewards/. Every sample carries
the log-probability the engine assigned to each token it sampled (``logprobs[t] = log π_rollout(token_ids[t])``),
computed from the same distribution it sampled from (temperature applied, see ``SamplingConfig``).

Seeding. Each (prompt, sample) is one request with its own seed, derived from
(``SamplingConfig.seed``, ``step``, global prompt index, sample index) by :func:`request_seed`. A rollout is
therefore the same whichever data-parallel rank generates it and whatever else is in the batch.
"""
from __future__ import annotations

import abc
import hashlib
from dataclasses import asdict, dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

FINISH_REASONS = ("stop", "length", "abort")


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample. ``top_k <= 0`` and ``top_p == 1`` mean off.

    The engine reports log-probs of the distribution it samples from: softmax(z / temperature), restricted
    and renormalised by top-k / top-p when those are on. The trainer computes log softmax(z / temperature)
    over the whole vocabulary, so the two agree exactly only with top-k and top-p off (the SimKO setting);
    :attr:`logprobs_match_trainer` says whether they do.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 256
    seed: int = 0  # global seed; per-request seeds come from request_seed()
    stop_token_ids: Tuple[int, ...] = ()
    ignore_eos: bool = False  # True: only stop_token_ids and max_tokens end a response

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (greedy decoding is not a rollout), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def logprobs_match_trainer(self) -> bool:
        return self.top_p == 1.0 and self.top_k <= 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RolloutSample:
    """One sampled response: token ids, the engine's log-prob of each, and why it ended."""

    token_ids: List[int]
    logprobs: List[float]  # logprobs[t] = log π_rollout(token_ids[t] | prompt, token_ids[:t])
    finish_reason: str  # "stop" (EOS / stop token) | "length" (max_tokens) | "abort"
    seed: Optional[int] = None  # the request seed it was drawn with

    @property
    def length(self) -> int:
        return len(self.token_ids)


@dataclass
class RolloutResult:
    """All samples of one prompt. ``prompt_index``: its index in the global (all-DP-ranks) batch."""

    prompt_index: int
    prompt_token_ids: List[int]
    samples: List[RolloutSample] = field(default_factory=list)


def request_seed(seed: int, step: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed for one (prompt, sample) request, independent of batching and data-parallel layout."""
    key = f"{int(seed)}/{int(step)}/{int(prompt_index)}/{int(sample_index)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)


class RolloutEngine(abc.ABC):
    """A generation engine holding a copy of the policy (see the module docstring)."""

    @abc.abstractmethod
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], n: int, params: SamplingConfig, *,
                 step: int = 0, prompt_offset: int = 0) -> List[RolloutResult]:
        """``n`` samples for each prompt; ``prompt_offset`` = global index of ``prompt_token_ids[0]`` (seeding)."""

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> dict:
        """Load full Hugging Face-named tensors in place (streamed; consumed once). Returns sync statistics."""

    def release_memory(self) -> None:
        """Free accelerator memory (weights, KV cache) before the training phase; no-op where unsupported."""

    def resume_memory(self, tags: Optional[Sequence[str]] = None) -> None:
        """Re-allocate what :meth:`release_memory` freed (``tags``: a subset, e.g. ("weights",) before a sync)."""

    def shutdown(self) -> None:
        """Release the engine for good."""

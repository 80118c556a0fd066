"""A rollout engine on a Hugging Face model in the trainer's process: runs wherever torch runs.

vLLM is the fast backend; this one exists so the RL loop runs — and is tested — where vLLM cannot be
installed (a GPU machine without network, platforms without a vLLM build). It implements the same
``RolloutEngine`` contract as ``vllm_engine.py``:

* ``n`` samples per prompt, temperature / top-k / top-p, stop token ids (kept as the last response token,
  finish reason "stop"; "length" at ``max_tokens`` or at ``max_model_len``);
* per-request seeds ``base.request_seed(seed, step, global prompt index, sample index)``: each sample draws
  its uniforms from its own CPU ``torch.Generator`` seeded with that value, so a sample does not depend on
  what else is in the batch, on the device, or on the data-parallel layout;
* processed log-probs of the sampled tokens: log softmax(z / T), renormalised over the top-k / top-p set when
  those are on — what vLLM reports with ``logprobs_mode="processed_logprobs"``;
* ``update_weights`` from the Hugging Face-named stream of ``weight_sync.MegatronToEngineSync``, in place, and
  ``weight_layout`` / ``weight_checksums`` over the parameters the model computes with, so the sync's
  checksum verification runs unchanged.

Every rank holds a full copy of the model on the trainer's device (rollout TP 1); ``sharding.generate_global``
splits the prompts over ranks as for vLLM replicas.

Decoding. Prompts are left-padded and prefilled once (positions from the attention mask, so padding changes
nothing but round-off); the prompt's KV cache is repeated for its ``n`` samples
(``DynamicCache.batch_repeat_interleave``); then one token per step for all unfinished rows, finished rows
dropped from the cache (``batch_select_indices``). Sampling is inverse-CDF on the float64 cumulative
distribution over the vocabulary with the row's next uniform.

Scale: a smoke-scale backend. Samples are decoded in chunks of whole prompt groups, at most ``max_batch_rows``
rows and at most what ``kv_budget_gib`` holds at full length (prompt + max_tokens, :func:`decode_rows`); a
budget that cannot hold one group of ``n`` rows is refused. transformers' ``DynamicCache`` grows by
concatenation, so every decoding step copies the chunk's cache (O(length²) copies per chunk: time, not
memory — the chunk's peak stays its full-length cache plus one layer); the model copy stays resident through
training. For 7B-scale rollouts use vLLM (``train --dry-run`` prints what each backend needs).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from megatron_simko.rollout.base import (
    RolloutEngine,
    RolloutResult,
    RolloutSample,
    SamplingConfig,
    request_seed,
)
from megatron_simko.rollout.stop_tokens import model_eos_token_ids

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class TransformersEngineConfig:
    """What the transformers backend is built from."""

    model_dir: str  # Hugging Face model folder (config.json + safetensors)
    dtype: str = "float32"  # float32 | bfloat16 | float16: the weights' dtype (the trainer's)
    device: Optional[str] = None  # None: this rank's GPU if there is one, else the CPU
    max_model_len: Optional[int] = None  # prompt + response tokens; None: the model's max_position_embeddings
    max_batch_rows: int = 256  # samples decoded together (KV-cache memory ∝ rows × length)
    kv_budget_gib: Optional[float] = None  # KV cache per chunk at full length; None: max_batch_rows only
    attn_implementation: str = "sdpa"  # transformers attention kernel ("sdpa" | "eager")

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {self.max_batch_rows}")
        if self.kv_budget_gib is not None and self.kv_budget_gib <= 0:
            raise ValueError(f"kv_budget_gib must be > 0 (or None), got {self.kv_budget_gib}")


def decode_rows(max_batch_rows: int, n: int, kv_bytes_per_row: float,
                kv_budget_bytes: Optional[float] = None) -> Tuple[int, str]:
    """Samples decoded together: whole prompt groups of ``n`` rows, at most ``max_batch_rows`` and at most
    ``kv_budget_bytes`` of KV cache at ``kv_bytes_per_row`` each. Returns (rows, problem); problem is a
    one-line reason (and rows = n, what one group needs) when not even one group fits."""
    cap = max_batch_rows
    if kv_budget_bytes is not None:
        cap = min(cap, int(kv_budget_bytes // max(kv_bytes_per_row, 1)))
    rows = cap // n * n
    if rows >= n:
        return rows, ""
    gib = kv_bytes_per_row / 2**30
    return n, (f"the transformers rollout backend cannot hold one prompt group: n_samples={n} rows of "
               f"{gib:.3g} GiB KV cache each (prompt + response at full length) exceed "
               + (f"rollout.kv_budget_gib={kv_budget_bytes / 2**30:.3g}" if cap < max_batch_rows
                  else f"rollout.max_batch_rows={max_batch_rows}")
               + "; raise it, shorten rollout.max_*_length, or use rollout.backend=vllm")


def sample_from_logits(logits: torch.Tensor, u: torch.Tensor, params: SamplingConfig) -> Tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """One token per row from ``logits`` [A, V] with uniforms ``u`` [A] in [0, 1): (token ids [A] int64,
    processed log-probs [A] float32 of those tokens). Processed = log softmax(z / T) restricted to the
    top-k / top-p set and renormalised there (identical to log softmax(z / T) with both off)."""
    z = logits.float() / params.temperature  # [A, V]
    if params.top_k > 0 or params.top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        keep = torch.ones_like(sorted_z, dtype=torch.bool)
        if params.top_k > 0:
            keep[:, params.top_k:] = False
        if params.top_p < 1.0:
            probs = torch.softmax(sorted_z, dim=-1)
            keep &= (probs.cumsum(dim=-1) - probs) < params.top_p  # the token that crosses top_p stays
        drop = torch.zeros_like(keep).scatter(-1, order, ~keep)
        z = z.masked_fill(drop, -math.inf)
    logp = torch.log_softmax(z, dim=-1)  # [A, V]
    cdf = logp.double().exp().cumsum(dim=-1)  # [A, V]; zero-probability ids never advance it
    x = (u.to(cdf.device, torch.float64) * cdf[:, -1]).unsqueeze(-1)  # [A, 1], strictly below the total
    tokens = torch.searchsorted(cdf, x, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _on_device(device: Optional[str]) -> torch.device:
    if device is not None:
        return torch.device(device)
    from megatron_simko.parallel.devices import trainer_device

    return trainer_device()


class TransformersRolloutEngine(RolloutEngine):
    """``RolloutEngine`` on ``transformers.AutoModelForCausalLM`` (see the module docstring)."""

    tensor_parallel = 1  # every rank holds the whole model

    def __init__(self, config: TransformersEngineConfig):
        from transformers import AutoModelForCausalLM

        from megatron_simko.rollout.vllm_engine import check_weights_present, read_model_config

        self.config = config
        cfg = read_model_config(config.model_dir)  # clear errors for a missing folder / config / weights
        check_weights_present(config.model_dir)
        self.device = _on_device(config.device)
        self.model_dtype = _DTYPES[config.dtype]
        self.eos_token_ids = model_eos_token_ids(config.model_dir)
        self.max_model_len = config.max_model_len or int(cfg.get("max_position_embeddings") or 1 << 30)
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"]))
        kv_heads = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
        # K and V of every layer, per token of one sequence, in the weights' dtype.
        self.kv_bytes_per_token = (2 * int(cfg["num_hidden_layers"]) * kv_heads * head_dim
                                   * torch.empty((), dtype=self.model_dtype).element_size())
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(config.model_dir, dtype=self.model_dtype,
                                                     attn_implementation=config.attn_implementation)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self._params: Dict[str, torch.nn.Parameter] = dict(self.model.named_parameters())  # tied: listed once
        self.init_seconds = time.perf_counter() - t0
        logger.info("transformers rollout engine: %s on %s (%s), %d tensors", config.model_dir, self.device,
                    config.dtype, len(self._params))

    # ------------------------------------------------------------------------------------------- generate
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], n: int, params: SamplingConfig, *,
                 step: int = 0, prompt_offset: int = 0) -> List[RolloutResult]:
        """``n`` samples per prompt, one seeded request each (layout-independent, see base.request_seed)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        prompts = [[int(t) for t in ids] for ids in prompt_token_ids]
        for i, ids in enumerate(prompts):
            if not ids:
                raise ValueError(f"prompt {prompt_offset + i} is empty")
            if len(ids) >= self.max_model_len:
                raise ValueError(f"prompt {prompt_offset + i} has {len(ids)} tokens, not less than max_model_len="
                                 f"{self.max_model_len}")
        stop = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        longest = min(self.max_model_len, max(len(p) for p in prompts) + params.max_tokens) if prompts else 0
        budget = None if self.config.kv_budget_gib is None else self.config.kv_budget_gib * 2**30
        rows, problem = decode_rows(self.config.max_batch_rows, n, self.kv_bytes_per_token * longest, budget)
        if problem:
            raise ValueError(problem)
        per_chunk = rows // n  # prompts decoded together
        results = []
        for lo in range(0, len(prompts), per_chunk):
            chunk = prompts[lo:lo + per_chunk]
            seeds = [request_seed(params.seed, step, prompt_offset + lo + i, j)
                     for i in range(len(chunk)) for j in range(n)]
            samples = self._decode(chunk, n, params, seeds, stop)
            for i, ids in enumerate(chunk):
                results.append(RolloutResult(prompt_index=prompt_offset + lo + i, prompt_token_ids=list(ids),
                                             samples=samples[i * n:(i + 1) * n]))
        return results

    @torch.no_grad()
    def _decode(self, prompts: List[List[int]], n: int, params: SamplingConfig, seeds: List[int],
                stop: set) -> List[RolloutSample]:
        """All ``n`` samples of each prompt (rows p·n + j), KV-cached, finished rows dropped as they end."""
        dev = self.device
        P, L = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(P, L, dtype=torch.int64)  # left-padded [P, L]
        mask = torch.zeros(P, L, dtype=torch.int64)
        for b, p in enumerate(prompts):
            ids[b, L - len(p):] = torch.tensor(p)
            mask[b, L - len(p):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [P, L]: each prompt starts at position 0
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1)
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)  # rows p·n + j share prompt p's KV
        logits = out.logits[:, -1].repeat_interleave(n, dim=0)  # [R, V]
        mask = mask.repeat_interleave(n, dim=0)  # [R, L]
        next_pos = positions[:, -1].repeat_interleave(n) + 1  # [R]
        prompt_len = torch.tensor([len(p) for p in prompts]).repeat_interleave(n)  # [R]

        R = P * n
        budget = [min(params.max_tokens, self.max_model_len - int(prompt_len[r])) for r in range(R)]
        steps = max(budget)
        # [R, max_tokens]: sample r's own stream, always max_tokens long so that it never depends on the batch.
        uniforms = torch.stack([torch.rand(params.max_tokens, generator=torch.Generator().manual_seed(s),
                                           dtype=torch.float64) for s in seeds]).to(dev)
        tokens: List[List[int]] = [[] for _ in range(R)]
        logprobs: List[List[float]] = [[] for _ in range(R)]
        reasons: List[Optional[str]] = [None] * R
        stop_ids = torch.tensor(sorted(stop), dtype=torch.int64, device=dev)
        budget_t = torch.tensor(budget, device=dev)
        active = torch.arange(R, device=dev)  # rows still decoding, in cache order
        for t in range(steps):
            tok, lp = sample_from_logits(logits, uniforms[active, t], params)  # [A]
            ended_stop = torch.isin(tok, stop_ids)
            ended = ended_stop | (budget_t[active] <= t + 1)
            for r, k, v, s, e in zip(active.tolist(), tok.tolist(), lp.tolist(), ended_stop.tolist(), ended.tolist()):
                tokens[r].append(k)
                logprobs[r].append(v)
                if e:
                    reasons[r] = "stop" if s else "length"
            keep = ~ended
            if not bool(keep.any()):
                break
            if not bool(keep.all()):
                kept = keep.nonzero().squeeze(-1)
                cache.batch_select_indices(kept)
                active, tok, mask, next_pos = active[kept], tok[kept], mask[kept], next_pos[kept]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = self.model(input_ids=tok.unsqueeze(-1), attention_mask=mask, position_ids=next_pos.unsqueeze(-1),
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache, logits, next_pos = out.past_key_values, out.logits[:, -1], next_pos + 1
        return [RolloutSample(token_ids=tokens[r], logprobs=logprobs[r], finish_reason=reasons[r] or "length",
                              seed=seeds[r]) for r in range(R)]

    @torch.no_grad()
    def score(self, sequences: Sequence[Sequence[int]]) -> List[List[float]]:
        """log π(token t | tokens < t) for t = 1..L−1 of each sequence, at temperature 1 (like the vLLM engine)."""
        scores = []
        for seq in sequences:
            ids = torch.tensor([[int(t) for t in seq]], device=self.device)
            logp = torch.log_softmax(self.model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            scores.append(logp.gather(-1, ids[0, 1:, None]).squeeze(-1).tolist())
        return scores

    # -------------------------------------------------------------------------------------------- weights
    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> dict:
        """Copy full Hugging Face-named tensors into the model's parameters, in place. The whole stream is
        consumed (it may be a collective generator) before unknown, missing or misshapen tensors are reported."""
        count = {"tensors": 0, "bytes": 0}
        seen, problems = set(), []
        t0 = time.perf_counter()
        for name, tensor in named_tensors:
            count["tensors"] += 1
            count["bytes"] += tensor.numel() * tensor.element_size()
            param = self._params.get(name)
            if param is None:
                problems.append(f"{name}: not a parameter of the rollout model")
            elif tuple(param.shape) != tuple(tensor.shape):
                problems.append(f"{name}: shape {tuple(tensor.shape)}, the rollout model has {tuple(param.shape)}")
            else:
                param.copy_(tensor.to(device=param.device, dtype=param.dtype))
                seen.add(name)
        problems += [f"{name}: not sent" for name in sorted(set(self._params) - seen)]
        if problems:
            raise RuntimeError("weight update of the transformers rollout engine failed:\n  " + "\n  ".join(problems))
        return {"tensors": count["tensors"], "bytes": count["bytes"], "seconds": time.perf_counter() - t0}

    def weight_layout(self) -> Dict[str, List[Tuple[int, int, int]]]:
        """Every parameter is held whole: {hf_name: [(0, 0, rows)]}."""
        return {name: [(0, 0, p.shape[0])] for name, p in self._params.items()}

    def weight_checksums(self) -> Dict[str, List[tuple]]:
        """Checksums of the parameters the model computes with: {hf_name: [(0, 0, rows, checksum)]}."""
        from megatron_simko.rollout.weight_sync import tensor_checksum

        return {name: [(0, 0, p.shape[0], tensor_checksum(p))] for name, p in self._params.items()}

    # ---------------------------------------------------------------------------------------------- memory
    def release_memory(self) -> None:
        """The KV cache lives only inside ``generate``; return the allocator's cached blocks to the device.
        The weights stay resident (a full copy; the trainer's optimizer state is usually far larger)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def shutdown(self) -> None:
        self.model, self._params = None, {}
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

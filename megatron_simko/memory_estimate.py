"""Per-GPU memory estimate for a training configuration (used by ``train --dry-run``; needs no GPU).

Assumptions (stated so the numbers can be checked):
- weights in the training dtype (bf16: 2 B/param, fp32: 4 B/param); gradients in fp32 main-grad buffers
  (4 B/param, megatron-core DDP); Adam: fp32 master copy (bf16 only) + m + v = 12 B/param (bf16) or
  8 B/param (fp32), divided by DP with the distributed optimizer.
- activations per layer and micro-batch of T tokens, no recomputation: T·h·(10 + 24/TP) bytes (Korthikanti
  et al. 2022, bf16), the first pipeline stage holding up to PP micro-batches in flight under 1F1B; plus the
  vocab-parallel logits T·V/TP in the training dtype and the loss's fp32 buffer (bounded by its token chunk,
  counted here at full T as a worst case). With loss.fused_linear (losses/fused_linear.py) no logits exist:
  the term is the fused loss's chunk buffers, fused_chunk_tokens·V/TP·(dtype bytes + 8) (`loss_output_bytes`).
- attention: with Transformer Engine (fused / flash attention) no s² term. Without it, megatron-core's local
  spec materialises the scores and the softmax probabilities [b, heads/TP, s, s] per layer, both kept for
  backward, in the training dtype: 2·b·s²·heads/TP·bytes = 2·T·s·heads/TP·bytes per layer (a micro-batch of
  T padded tokens holds b = T/s rows of s = max_prompt_length + max_response_length tokens at worst),
  times the layers and micro-batches in flight on the stage.
- rollout, colocated, as configured (`rollout.backend`):
  vLLM: `gpu_memory_utilization` × GPU memory while generating; asleep (level 1) during training: its
  weights are offloaded and its KV cache freed.
  transformers: a full Hugging Face copy of the model (TP 1) resident through training too, plus while
  generating its KV cache (rows decoded together × (prompt + response) tokens × 2·layers·KV heads·head_dim
  in the dtype; rows = `rollout.max_batch_rows`, cut to `rollout.kv_budget_gib`) and the sampler's
  [rows, V] temporaries (fp32 logits, log-probs, float64 cumulative distribution: ~28 B per entry).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_simko.models.gpt import ModelArch, padded_vocab_size

GIB = 1024**3


def parameter_counts(arch: ModelArch, tp: int = 1) -> dict:
    """Full-model parameter counts by part (the embedding/output rows padded for ``tp``)."""
    h, d = arch.hidden_size, arch.head_dim
    nq, nkv, f = arch.num_attention_heads, arch.num_query_groups, arch.ffn_hidden_size
    qkv_rows = (nq + 2 * nkv) * d
    per_layer = h * qkv_rows + (qkv_rows if arch.qkv_bias else 0) + nq * d * h + h * 2 * f + f * h + 2 * h
    vocab = padded_vocab_size(arch.vocab_size, tp)
    return {
        "embedding": vocab * h,
        "output": 0 if arch.tie_word_embeddings else vocab * h,
        "per_layer": per_layer,
        "layers": per_layer * arch.num_layers,
        "final_norm": h,
    }


@dataclass(frozen=True)
class RolloutMemory:
    """What the configured rollout backend holds on one GPU (bytes), and what it can decode."""

    backend: str  # "vllm" | "transformers"
    resident: float  # held through the training phase too (transformers: its model copy)
    generating: float  # added while generating (vLLM: its fraction; transformers: KV cache + sampler temporaries)
    rows: int = 0  # transformers: samples decoded together (0: not applicable)
    problem: str = ""  # non-empty: this backend cannot serve the configuration (the reason)


@dataclass
class MemoryEstimate:
    params_per_gpu: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    attention: float  # unfused attention scores + probabilities (0 with Transformer Engine)
    logits: float
    rollout: RolloutMemory
    fused_attention: bool = True
    logits_label: str = "logits + loss buffer"

    @property
    def train_phase(self) -> float:
        return (self.weights + self.grads + self.optimizer + self.activations + self.attention + self.logits
                + self.rollout.resident)

    @property
    def rollout_phase(self) -> float:
        return self.weights + self.grads + self.optimizer + self.rollout.resident + self.rollout.generating

    def fits(self, gpu_memory_gib: float) -> bool:
        return not self.rollout.problem and max(self.train_phase, self.rollout_phase) <= gpu_memory_gib * GIB

    def table(self, gpu_memory_gib: float) -> str:
        attention = "fused (Transformer Engine)" if self.fused_attention else "unfused scores + probs"
        if self.rollout.backend == "vllm":
            rollout_rows = [("vLLM (awake)", f"{self.rollout.generating / GIB:.1f} GiB")]
        else:
            rollout_rows = [("HF model copy (resident)", f"{self.rollout.resident / GIB:.1f} GiB"),
                            (f"KV cache + sampler ({self.rollout.rows} rows)", f"{self.rollout.generating / GIB:.1f} GiB")]
        rows = [
            ("parameters per GPU", f"{self.params_per_gpu / 1e9:.2f} B"),
            ("weights", f"{self.weights / GIB:.1f} GiB"),
            ("gradients (fp32)", f"{self.grads / GIB:.1f} GiB"),
            ("optimizer (Adam)", f"{self.optimizer / GIB:.1f} GiB"),
            ("activations (peak stage)", f"{self.activations / GIB:.1f} GiB"),
            (f"attention: {attention}", f"{self.attention / GIB:.1f} GiB"),
            (self.logits_label, f"{self.logits / GIB:.1f} GiB"),
            *rollout_rows,
            ("peak, training phase", f"{self.train_phase / GIB:.1f} GiB of {gpu_memory_gib:.0f}"),
            ("peak, rollout phase", f"{self.rollout_phase / GIB:.1f} GiB of {gpu_memory_gib:.0f}"),
        ]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"  {name:<{width}}  {value:>16}" for name, value in rows)


def kv_bytes_per_token(arch: ModelArch, dtype: str) -> int:
    """Bytes of a Hugging Face KV cache per token of one sequence: keys and values of every layer."""
    return 2 * arch.num_layers * arch.num_query_groups * arch.head_dim * (2 if dtype == "bf16" else 4)


def rollout_memory(arch: ModelArch, backend: str, dtype: str, gpu_memory_gib: float, *,
                   gpu_memory_utilization: float = 0.5, n_samples: int = 8, sequence_length: int = 4096,
                   max_batch_rows: int = 256, kv_budget_gib: Optional[float] = None) -> RolloutMemory:
    """What the rollout backend holds on one GPU (see the module docstring)."""
    if backend == "vllm":
        return RolloutMemory("vllm", resident=0.0, generating=gpu_memory_utilization * gpu_memory_gib * GIB)
    from megatron_simko.rollout.transformers_engine import decode_rows

    counts = parameter_counts(arch, 1)
    copy = (counts["embedding"] + counts["output"] + counts["layers"] + counts["final_norm"]) * (
        2 if dtype == "bf16" else 4)
    per_row = kv_bytes_per_token(arch, dtype) * sequence_length
    rows, problem = decode_rows(max_batch_rows, n_samples, per_row,
                                None if kv_budget_gib is None else kv_budget_gib * GIB)
    sampler = 28 * rows * arch.vocab_size
    return RolloutMemory("transformers", resident=copy, generating=rows * per_row + sampler, rows=rows,
                         problem=problem)


def configured_rollout_memory(cfg, arch: ModelArch, gpu_memory_gib: float) -> RolloutMemory:
    """:func:`rollout_memory` of the rollout backend a ``config.Config`` selects."""
    r = cfg.rollout
    return rollout_memory(arch, r.backend, cfg.model.dtype, gpu_memory_gib,
                          gpu_memory_utilization=r.gpu_memory_utilization, n_samples=r.n_samples,
                          sequence_length=r.max_prompt_length + r.max_response_length,
                          max_batch_rows=r.max_batch_rows, kv_budget_gib=r.kv_budget_gib)


def loss_output_bytes(micro_batch_tokens: int, vocab_local: int, wbytes: int,
                      fused_chunk_tokens: Optional[int] = None) -> float:
    """The output layer + loss term of a micro-batch of T tokens on one TP rank. Logits path: the logits
    T·V/TP in the training dtype + the loss's fp32 buffer (counted at T). Fused linear path (fused_chunk_tokens
    given): no logits; one chunk's recomputed logits in the training dtype + up to two fp32 work buffers of the
    backward (bf16 upcast, entropy bonus) — min(chunk, T)·V/TP·(dtype bytes + 8); O(T·K) per-token state aside."""
    if fused_chunk_tokens is None:
        return micro_batch_tokens * vocab_local * (wbytes + 4)
    return min(fused_chunk_tokens, micro_batch_tokens) * vocab_local * (wbytes + 8)


def estimate_memory(
    arch: ModelArch,
    tp: int,
    pp: int,
    dp: int,
    micro_batch_tokens: int,
    dtype: str = "bf16",
    distributed_optimizer: bool = True,
    rollout: Optional[RolloutMemory] = None,
    fused_attention: bool = True,
    sequence_length: int = 4096,
    fused_chunk_tokens: Optional[int] = None,
) -> MemoryEstimate:
    """Per-GPU bytes; ``rollout`` from :func:`rollout_memory` (default: vLLM at 0.5 of 80 GiB);
    ``fused_attention``: Transformer Engine present (else the local spec's s² term, sequences of
    ``sequence_length`` tokens); ``fused_chunk_tokens``: set when loss.fused_linear is on (its
    loss.fused_chunk_tokens), None for the logits path."""
    counts = parameter_counts(arch, tp)
    layers_per_stage = arch.num_layers // pp
    # The heaviest stage: the first holds the embedding, the last the output layer (both when pp == 1).
    first = counts["embedding"] + counts["per_layer"] * layers_per_stage
    last = counts["output"] + counts["per_layer"] * layers_per_stage + counts["final_norm"]
    per_gpu = (first + last - counts["per_layer"] * layers_per_stage if pp == 1 else max(first, last)) // tp
    wbytes = 2 if dtype == "bf16" else 4
    opt_bytes = (12 if dtype == "bf16" else 8) * per_gpu / (dp if distributed_optimizer else 1)
    in_flight = min(pp, 8)  # 1F1B warm-up depth on the first stage
    act = micro_batch_tokens * arch.hidden_size * (10 + 24 / tp) * layers_per_stage * in_flight * (wbytes / 2)
    vocab_local = padded_vocab_size(arch.vocab_size, tp) // tp
    logits = loss_output_bytes(micro_batch_tokens, vocab_local, wbytes, fused_chunk_tokens)
    s = min(sequence_length, micro_batch_tokens)
    attention = 0.0 if fused_attention else (
        2 * micro_batch_tokens * s * (arch.num_attention_heads / tp) * wbytes * layers_per_stage * in_flight)
    return MemoryEstimate(
        params_per_gpu=int(per_gpu),
        weights=per_gpu * wbytes,
        grads=per_gpu * 4,
        optimizer=opt_bytes,
        activations=act,
        attention=attention,
        logits=logits,
        rollout=rollout if rollout is not None else rollout_memory(arch, "vllm", dtype, 80.0),
        fused_attention=fused_attention,
        logits_label="logits + loss buffer" if fused_chunk_tokens is None else "fused loss chunk buffers",
    )

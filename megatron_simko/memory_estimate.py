"""Per-GPU memory estimate for a training configuration (used by ``train --dry-run``; needs no GPU).

Assumptions (stated so the numbers can be checked):
- weights in the training dtype (bf16: 2 B/param, fp32: 4 B/param); gradients in fp32 main-grad buffers
  (4 B/param, megatron-core DDP); Adam: fp32 master copy (bf16 only) + m + v = 12 B/param (bf16) or
  8 B/param (fp32), divided by DP with the distributed optimizer.
- activations per layer and micro-batch of T tokens, no recomputation, fused attention (no s² scores):
  T·h·(10 + 24/TP) bytes (Korthikanti et al. 2022, bf16), the first pipeline stage holding up to PP
  micro-batches in flight under 1F1B; plus the vocab-parallel logits T·V/TP in the training dtype and the
  loss's fp32 buffer (bounded by its token chunk, counted here at full T as a worst case). With
  loss.fused_linear (losses/fused_linear.py) no logits exist: the term is the fused loss's chunk buffers,
  fused_chunk_tokens·V/TP·(dtype bytes + 8) (`loss_output_bytes`).
- vLLM, colocated: `gpu_memory_utilization` × GPU memory while generating; asleep (level 1) during
  training: its weights are offloaded and its KV cache freed.
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


@dataclass
class MemoryEstimate:
    params_per_gpu: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    vllm: float
    logits_label: str = "logits + loss buffer"

    @property
    def train_phase(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.logits

    @property
    def rollout_phase(self) -> float:
        return self.weights + self.grads + self.optimizer + self.vllm

    def table(self, gpu_memory_gib: float) -> str:
        rows = [
            ("parameters per GPU", f"{self.params_per_gpu / 1e9:.2f} B"),
            ("weights", f"{self.weights / GIB:.1f} GiB"),
            ("gradients (fp32)", f"{self.grads / GIB:.1f} GiB"),
            ("optimizer (Adam)", f"{self.optimizer / GIB:.1f} GiB"),
            ("activations (peak stage)", f"{self.activations / GIB:.1f} GiB"),
            (self.logits_label, f"{self.logits / GIB:.1f} GiB"),
            ("vLLM (awake)", f"{self.vllm / GIB:.1f} GiB"),
            ("peak, training phase", f"{self.train_phase / GIB:.1f} GiB of {gpu_memory_gib:.0f}"),
            ("peak, rollout phase", f"{self.rollout_phase / GIB:.1f} GiB of {gpu_memory_gib:.0f}"),
        ]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"  {name:<{width}}  {value:>16}" for name, value in rows)


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
    vllm_gpu_memory_utilization: float = 0.5,
    gpu_memory_gib: float = 80.0,
    fused_chunk_tokens: Optional[int] = None,
) -> MemoryEstimate:
    """fused_chunk_tokens: set when loss.fused_linear is on (its loss.fused_chunk_tokens); None: logits path."""
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
    return MemoryEstimate(
        params_per_gpu=int(per_gpu),
        weights=per_gpu * wbytes,
        grads=per_gpu * 4,
        optimizer=opt_bytes,
        activations=act,
        logits=logits,
        vllm=vllm_gpu_memory_utilization * gpu_memory_gib * GIB,
        logits_label="logits + loss buffer" if fused_chunk_tokens is None else "fused loss chunk buffers",
    )

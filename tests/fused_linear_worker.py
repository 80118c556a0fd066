"""Multi-rank checks of the fused linear SimKO statistics (losses/fused_linear.py) against the logits path.

Run as a script, one process per TP rank (tests/test_loss_fused_linear.py launches it with loss_dist_worker.launch):
    python tests/fused_linear_worker.py --rank R --world W --port P --out DIR
Every rank builds the same hidden states h [B, L, H] and full output weight W [ROWS, H] from a seed and holds its
contiguous vocabulary shard of W. For each case it computes, on its shard,
  logits path   simko_loss(h W_shardᵀ, ...)                                    (the trainer's path without fusion)
  fused path    simko_loss(None, ..., stats=linear_token_statistics(h, W_shard, ...))
and compares the loss, ∂h (this rank's share) and ∂W_shard (1e-6 fp32; bf16 at the stated tolerance), the
metrics and the forward-only statistics. It then sums ∂h over the group and compares it with the one-device
(TP 1, full W) gradient. Sequence parallelism: the same with h sharded along the sequence and passed through
models/output_head.output_layer_input (megatron-core's gather_from_sequence_parallel_region: all-gather
forward, reduce-scatter backward), the trainer's seam; each rank's ∂h_local must equal its sequence slice of the one-device gradient.
Tied weights: W is also a vocabulary-parallel input embedding (each rank looks up the rows it owns; the sum over
TP — a reduce-scatter along s under SP — as megatron-core's embedding does), h = x + tanh(emb P): W receives both
gradients.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_simko.losses import SimKOConfig, simko_loss  # noqa: E402
from megatron_simko.losses.fused_linear import linear_token_statistics  # noqa: E402
from megatron_simko.losses.vocab_parallel import token_statistics  # noqa: E402
from megatron_simko.models.output_head import output_layer_input  # noqa: E402
from megatron_simko.parallel.cpu_shims import cuda_to_cpu, install_cpu_shims  # noqa: E402

ROWS, H = 64, 16
# FUSED_BACKEND=triton (with TRITON_INTERPRET=1 on CPU): the fused path's per-chunk passes run as the Triton kernels,
# against the torch logits path; FUSED_CASES=a,b limits the cases (the interpreter is slow).
FUSED_BACKEND = os.environ.get("FUSED_BACKEND", "torch")
FP32 = dict(rtol=1e-6, atol=1e-6)
# bf16: both paths multiply the same bf16 h and W; the logits path rounds h Wᵀ once to bf16 as a whole, the
# fused path per chunk — the same values. ∂h, ∂W are bf16 GEMM outputs of (near-)identical bf16 logit
# gradients; ∂h is accumulated over vocabulary blocks in bf16 (one rounding per block): a few bf16 ulps.
BF16 = dict(rtol=2.0 ** -5, atol=2e-3)
BASE = dict(B=4, L=12, vocab_size=ROWS, top_k=3, temperature=1.0, mode="simko", alpha=0.3, lam=2.0, adv="B",
            dtype="fp32", chunk=7, entropy_coef=0.0, sp=False, tied=False)
CASES = {name: {**BASE, **over} for name, over in {
    "simko": {},
    "one_chunk": dict(chunk=4096),
    "temperature_adv_BL": dict(temperature=0.7, adv="BL"),
    "padded_vocab": dict(vocab_size=ROWS - 5),
    "padded_two_shards": dict(vocab_size=ROWS - 19, temperature=1.3),
    "grpo": dict(mode="grpo"),
    "psr": dict(mode="psr", adv="BL"),
    "nsr": dict(mode="nsr", adv="BL"),
    "w_reinforce": dict(mode="w_reinforce", adv="BL"),
    "kl_cov": dict(mode="kl_cov", adv="BL"),
    "clip_cov": dict(mode="clip_cov", adv="BL"),
    "entropy_adv": dict(mode="entropy_adv", adv="BL"),
    "entropy_bonus": dict(entropy_coef=0.05, adv="BL", vocab_size=ROWS - 5),
    "entropy_bonus_grpo": dict(mode="grpo", entropy_coef=0.1, temperature=0.7),
    "tied": dict(tied=True, adv="BL"),
    "tied_entropy_bonus": dict(tied=True, entropy_coef=0.05),
    "sequence_parallel": dict(sp=True, adv="BL"),
    "sequence_parallel_tied_padded": dict(sp=True, tied=True, vocab_size=ROWS - 5, entropy_coef=0.02),
    "bf16": dict(dtype="bf16", adv="BL"),
    "bf16_entropy_bonus_padded": dict(dtype="bf16", entropy_coef=0.05, vocab_size=ROWS - 5, temperature=0.7),
}.items()}


def make_inputs(case, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, L, V = case["B"], case["L"], case["vocab_size"]
    ids = torch.randint(0, V, (B, L), generator=g)
    weight = torch.randn(ROWS, H, generator=g) * 0.8
    proj = torch.randn(H, H, generator=g) / H ** 0.5
    x = torch.randn(B, L, H, generator=g)
    targets = torch.randint(0, V, (B, L), generator=g)
    old = -torch.rand(B, L, generator=g) * 4
    adv = torch.randn(B, generator=g) if case["adv"] == "B" else torch.randn(B, L, generator=g)
    mask = torch.rand(B, L, generator=g) > 0.2
    mask[1] = False
    mask[1, 3] = True
    return ids, weight, proj, x, targets, old, adv, mask


def config_of(case):
    return SimKOConfig(mode=case["mode"], top_k=case["top_k"], alpha=case["alpha"], lam=case["lam"],
                       entropy_coef=case["entropy_coef"], kl_cov_ratio=0.1, clip_cov_ratio=0.1, clip_cov_lb=-5.0,
                       clip_cov_ub=5.0, fused_chunk_tokens=case["chunk"], chunk_tokens=case["chunk"])


def embed(ids_sb, w, rank, world):
    """This rank's part of a vocabulary-parallel embedding lookup (rows it does not own give 0), [s, b, H]."""
    v_local = w.shape[0]
    local = ids_sb - rank * v_local
    owned = (local >= 0) & (local < v_local)
    # contiguous: megatron-core's _reduce all-reduces a contiguous copy of a strided input and returns the input
    return (w[local.clamp(0, v_local - 1)] * owned.unsqueeze(-1)).contiguous()


def run(case, fused, rank, world, group):
    """(loss, metrics, ∂h_local, ∂W_shard, stats) on this rank. group None: one device, full W."""
    from megatron.core.tensor_parallel.mappings import (reduce_from_tensor_model_parallel_region,
                                                        reduce_scatter_to_sequence_parallel_region)

    dtype = torch.bfloat16 if case["dtype"] == "bf16" else torch.float32
    ids, weight, proj, x, targets, old, adv, mask = make_inputs(case)
    v_local = ROWS // world
    w = weight[rank * v_local:(rank + 1) * v_local].to(dtype).clone().requires_grad_()
    sp = case["sp"] and group is not None
    x_leaf = x.to(dtype).transpose(0, 1).contiguous()  # [s, b, H], megatron's layout
    if sp:
        s_local = x_leaf.shape[0] // world
        x_leaf = x_leaf[rank * s_local:(rank + 1) * s_local].clone()
    x_leaf.requires_grad_()
    h_in = x_leaf
    if case["tied"]:  # W is also the input embedding (vocabulary-parallel, as megatron-core's): W gets both grads
        e = embed(ids.t(), w, rank, world)
        if group is not None:  # forward: sum of the shards' lookups (reduce-scatter along s under SP)
            e = (reduce_scatter_to_sequence_parallel_region(e, group) if sp
                 else reduce_from_tensor_model_parallel_region(e, group))
        h_in = x_leaf + torch.tanh(e @ proj.to(dtype))
    h_sbh = h_in if group is None else output_layer_input(h_in, sp, group)  # the trainer's seam (output_head.py)
    h = h_sbh.transpose(0, 1)  # [b, s, H], as GPTModel returns it
    cfg = config_of(case)
    kw = dict(tp_group=group, temperature=case["temperature"], vocab_size=case["vocab_size"])
    if fused:
        cfg = dataclasses.replace(cfg, backend=FUSED_BACKEND)
        st = linear_token_statistics(h, w, targets, cfg.top_k, mask=mask, chunk_tokens=cfg.fused_chunk_tokens,
                                     backend=cfg.backend, **kw)
        loss, metrics = simko_loss(None, targets, old, adv, mask, cfg, stats=st, **kw)
    else:
        logits = torch.matmul(h.contiguous(), w.t())
        st = token_statistics(logits, targets, cfg.top_k, mask=mask, chunk_tokens=cfg.chunk_tokens, **kw)
        loss, metrics = simko_loss(logits, targets, old, adv, mask, cfg, **kw)
    loss.backward()
    return loss.detach(), metrics, x_leaf.grad, w.grad, st


def check_case(name, case, rank, world, group):
    failures = []

    def close(what, a, b, tol):
        try:
            torch.testing.assert_close(a.float(), b.float(), **tol)
        except AssertionError as e:
            failures.append(f"{name}: {what}: {str(e).splitlines()[0:4]}")

    tol = BF16 if case["dtype"] == "bf16" else FP32
    fused = run(case, True, rank, world, group)
    plain = run(case, False, rank, world, group)
    close("loss", fused[0], plain[0], FP32 if case["dtype"] == "fp32" else dict(rtol=1e-5, atol=1e-6))
    close("grad hidden (this rank's share, after the TP reduction)", fused[2], plain[2], tol)
    close("grad weight shard", fused[3], plain[3], tol)
    for k in plain[1]:
        if abs(fused[1][k] - plain[1][k]) > 1e-5 * max(1.0, abs(plain[1][k])):
            failures.append(f"{name}: metric {k}: {fused[1][k]} vs {plain[1][k]}")
    for field, a, b in zip(plain[4]._fields, fused[4], plain[4]):
        if a.dtype in (torch.int64, torch.bool):
            if not torch.equal(a, b) and case["dtype"] == "fp32":
                failures.append(f"{name}: stats {field} differ")
        else:
            close(f"stats {field}", a.detach(), b.detach(), FP32 if case["dtype"] == "fp32" else BF16)
    if world > 1 and case["dtype"] == "fp32":  # against one device with the full W
        one = run(case, True, 0, 1, None)
        close("loss vs one device", fused[0], one[0], FP32)
        v_local = ROWS // world
        close("grad weight shard vs one device", fused[3], one[3][rank * v_local:(rank + 1) * v_local], FP32)
        want = one[2]
        if case["sp"]:
            s_local = want.shape[0] // world
            want = want[rank * s_local:(rank + 1) * s_local]
        close("grad hidden vs one device", fused[2], want, FP32)
    return failures


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    install_cpu_shims()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank, world_size=a.world,
                            timeout=timedelta(seconds=60))
    group = dist.new_group(list(range(a.world)))
    results, t0 = {}, time.time()
    chosen = os.environ.get("FUSED_CASES")
    for name, case in CASES.items():
        if chosen and name not in chosen.split(","):
            continue
        try:
            with cuda_to_cpu():  # megatron-core's sequence-parallel mappings allocate on "cuda"
                results[name] = check_case(name, case, a.rank, a.world, group)
        except Exception as e:  # a crash in one case is that case's failure
            results[name] = [f"{name}: {type(e).__name__}: {e}"]
    results["_seconds"] = time.time() - t0
    with open(os.path.join(a.out, f"rank{a.rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""The Triton backend of the vocab-parallel statistics against the torch backend, in Triton's CPU interpreter.

Imported by tests/test_loss_triton.py (CASES) and run as a script, one process per TP rank, with
TRITON_INTERPRET=1 in the environment (set by the launcher, before anything imports Triton):
    python tests/loss_triton_worker.py --rank R --world W --port P --out DIR
Every rank runs all CASES in one gloo group and writes DIR/rank{R}.json = {case: [failure messages]}.
Per case, on this rank's contiguous shard of the same seeded full logits:
  1. the local passes alone, on identical inputs: triton_kernels.local_partials vs the torch steps
     (local_topk, local_target_logit, local_exp_sums, pack_partials); triton_kernels.softmax_gradient vs
     softmax_gradient_chunk for the same ids / β / lse;
  2. the entropy-bonus term of softmax_gradient (g_H, H) vs autograd of a plain full-vocabulary fp32 reference;
  3. end to end: token_statistics (every output, the gradient for random upstream gradients, the no-grad path,
     the collectives issued) and, where the case says so, simko_loss — backend "triton" vs "torch".
Tolerances. fp32: 1e-6 (rtol and atol): both backends do the same fp32 operations (z − m and z − lse as one
fused multiply-add, as torch.add(alpha=) does) in a different order, measured ≤ 3e-7. bf16 / fp16 logits: every
statistic is fp32 math on the same exactly-upcast values, so 1e-6 as well; the gradient is that fp32 value
rounded once to the logits dtype, and two fp32 values 1e-6 apart can round to neighbouring representable
numbers: one ulp, ≤ 2^-7 (bf16) / 2^-10 (fp16) relative, plus 1e-6 absolute.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (REPO, os.path.dirname(os.path.abspath(__file__))):
    if path not in sys.path:
        sys.path.insert(0, path)

from loss_dist_worker import CommRecorder, bitwise_equal  # noqa: E402
from megatron_simko.losses import SimKOConfig, simko_loss, token_statistics  # noqa: E402
from megatron_simko.losses import triton_kernels as tk  # noqa: E402
from megatron_simko.losses import vocab_parallel as vp  # noqa: E402

ROWS = 74  # vocabulary rows in all: V_local = 37 at TP 2 (odd, not a multiple of any tile)
FP32_TOL = dict(rtol=1e-6, atol=1e-6)
GRAD_TOL = {"fp32": FP32_TOL, "bf16": dict(rtol=2.0 ** -7, atol=1e-6), "fp16": dict(rtol=2.0 ** -10, atol=1e-6)}
GPU_MAX_BLOCK = tk.MAX_BLOCK
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

BASE = dict(B=2, L=7, vocab_size=ROWS, top_k=3, temperature=0.6, dtype="fp32", block=32, ties=False,
            pad_logit=None, loss=False)
CASES = {
    name: {**BASE, **over} for name, over in {
        # tiles of 32 (16) over V_local 37 (TP 2) or 74 (TP 1): full tiles plus a ragged last one.
        "fp32_k3_padded": dict(vocab_size=ROWS - 4, pad_logit=12.0),
        "fp32_k1_t1": dict(top_k=1, temperature=1.0),
        "fp32_k8": dict(top_k=8, temperature=1.3, block=16),  # K > the last tile's 5 columns
        "fp32_one_tile": dict(block=None, loss=True),  # the default tile (a whole row) + simko_loss end to end
        "bf16_k3_padded": dict(dtype="bf16", vocab_size=ROWS - 4, pad_logit=20.0),
        "fp16_k3": dict(dtype="fp16", loss=True),
        "bf16_ties_k3": dict(dtype="bf16", ties=True),
        "fp32_ties_k8": dict(top_k=8, ties=True, temperature=1.0),
        "empty_last_shard": dict(vocab_size=30, pad_logit=12.0),  # TP 2: rank 1 holds padding only
    }.items()
}


def make_inputs(case: dict, seed: int = 0):
    """Full logits [B, L, ROWS] in the case's dtype, targets (garbage where masked), mask, upstream gradients."""
    g = torch.Generator().manual_seed(seed)
    B, L, V, K = case["B"], case["L"], case["vocab_size"], case["top_k"]
    if case["ties"]:  # few distinct values: many exact ties, also across tiles and shards
        logits = torch.randint(-3, 3, (B, L, ROWS), generator=g).float()
    else:  # distinct multiples of 1/32 in [-4, 4): exact in bf16 / fp16, tie-free top-K
        logits = torch.stack([torch.randperm(256, generator=g)[:ROWS] for _ in range(B * L)]).view(B, L, ROWS)
        logits = (logits.float() - 128) / 32
    if case["pad_logit"] is not None:  # padding rows hold the largest logits: they must never count
        logits[..., V:] = case["pad_logit"]
    logits = logits.to(DTYPES[case["dtype"]])
    z = logits.float()[..., :V] / case["temperature"]
    targets = torch.where(torch.rand(B, L, generator=g) < 0.5, z.argmax(-1), torch.randint(0, V, (B, L), generator=g))
    targets[0, :4] = torch.tensor([0, ROWS // 2 - 1, ROWS // 2, V - 1]).clamp(max=V - 1)  # TP 2 shard edge, ends
    mask = torch.rand(B, L, generator=g) > 0.2
    mask[0, :4] = True
    targets[~mask] = torch.tensor([-1, V])[torch.arange(int((~mask).sum())) % 2]  # just out of range, masked
    grads = dict(target=torch.randn(B, L, generator=g), topk=torch.randn(B, L, K, generator=g),
                 betas=torch.randn(B * L, K + 1, generator=g), entropy=torch.randn(B * L, generator=g))
    return logits, targets, mask, grads


def check_case(name: str, case: dict, rank: int, world: int, group) -> list[str]:
    """Run one case on this rank; return failure messages (empty list = pass)."""
    failures = []

    def close(what, actual, expected, **tol):
        failures.extend(mismatch(what, actual, expected, **tol))

    K, T, ties = case["top_k"], case["temperature"], case["ties"]
    tk.MAX_BLOCK = case["block"] or GPU_MAX_BLOCK  # the tile of every kernel launch below, end to end too
    grad_tol = GRAD_TOL[case["dtype"]]
    logits_full, targets, mask, up = make_inputs(case)
    v_local = ROWS // world
    logits = logits_full[..., rank * v_local:(rank + 1) * v_local].contiguous()
    before = logits.clone()
    B, L = targets.shape
    N = B * L
    x, t1d = logits.view(N, v_local), targets.view(N)
    shard, _ = vp.resolve_shard(logits, group, case["vocab_size"], K)
    inv_t = 1.0 / T

    # 1a. forward local pass on identical inputs.
    part = tk.local_partials(x, t1d, K, shard, inv_t)
    xr = vp.real_rows(x, shard)
    values, ids = vp.local_topk(xr, K, shard, inv_t)
    ref = vp.pack_partials(values, ids, *vp.local_exp_sums(xr, values[:, 0], inv_t),
                           vp.local_target_logit(xr, t1d, shard, inv_t))
    if not torch.equal(part[:, :K], ref[:, :K]):
        failures.append("local top-K values differ")
    k = min(K, shard.n_real)  # documented tie rule: equal values in ascending id order = a stable sort
    stable = torch.sort(xr.float(), dim=1, descending=True, stable=True).indices[:, :k] + shard.start
    if not torch.equal(part[:, K:K + k].long(), stable) or not bool((part[:, K + k:2 * K] == -1).all()):
        failures.append("local top-K ids differ from a stable descending sort")
    failures += topk_ids_valid("local", part[:, K:2 * K].long(), part[:, :K], x, shard, inv_t)
    close("local Σe^(z−m), Σe^(z−m)(z−m), z[y]", part[:, 2 * K:], ref[:, 2 * K:], **FP32_TOL)

    # 1b. backward local pass on identical ids / β / lse (the torch backend's forward supplies ids and lse).
    _, entropy, _, topk_ids, lse = vp._forward(x, t1d, K, group, T, shard, 2048, "torch")
    all_ids = torch.cat([t1d.unsqueeze(1), topk_ids], dim=1)  # [N, K+1]
    betas = up["betas"]
    grad = tk.softmax_gradient(x, all_ids, betas, lse, inv_t, shard)
    expected = torch.zeros_like(x)
    if shard.n_real:
        out = vp.real_rows(expected, shard)
        vp.softmax_gradient_chunk(xr, out, out if x.dtype == torch.float32 else torch.empty(out.shape),
                                  lse, inv_t, shard, all_ids, betas)
    if grad.dtype != x.dtype:
        failures.append(f"gradient dtype {grad.dtype} != logits dtype {x.dtype}")
    close("local gradient", grad.float(), expected.float(), **grad_tol)

    # 2. entropy-bonus term vs autograd of the plain full-vocabulary reference (float64).
    in_range = (t1d >= 0) & (t1d < case["vocab_size"])
    betas_e = torch.cat([torch.where(in_range, betas[:, 0], 0.0).unsqueeze(1), betas[:, 1:]], dim=1)
    g_h = up["entropy"]
    grad_h = tk.softmax_gradient(x, all_ids, betas_e, lse, inv_t, shard, grad_entropy=g_h, entropy=entropy)
    full = logits_full.double().view(N, ROWS).requires_grad_()
    logp = torch.log_softmax(full[:, :case["vocab_size"]] / T, dim=-1)
    ent_ref = -(logp.exp() * logp).sum(-1)
    objective = (betas_e * logp.gather(1, all_ids.clamp(0, case["vocab_size"] - 1))).sum() + (g_h * ent_ref).sum()
    objective.backward()
    # fp32 bound: π_j = e^{z_j − lse} from fp32 z and lse is exact to ~1e-6 relative (|z| ≤ 7 here), and it
    # multiplies per-row coefficients of size ≤ row_scale = (Σ_m |β_m| + |g_H| (1 + H)) / T (π|log π| ≤ 1/e).
    row_scale = (betas_e.abs().sum(1) + g_h.abs() * (1 + ent_ref.detach())) / T
    ref_h = full.grad[:, rank * v_local:(rank + 1) * v_local]
    err = (grad_h.double() - ref_h).abs()
    dtype_rtol = grad_tol["rtol"] if case["dtype"] != "fp32" else 0.0
    bound = 1e-6 * row_scale.unsqueeze(1) + (1e-6 + dtype_rtol) * ref_h.abs()
    if bool((err > bound).any()):
        worst = (err / bound).argmax()
        failures.append(f"entropy-term gradient vs float64 autograd: error {err.flatten()[worst]:.3g} > bound "
                        f"{bound.flatten()[worst]:.3g} at flat index {int(worst)}")

    # 3. end to end: token_statistics with both backends.
    # The objective includes an entropy bonus where the Function's entropy output is differentiable (the
    # entropy-bonus backward, issue 12); where it is detached that term carries no gradient in either backend.
    results, g_h2 = {}, up["entropy"].view(B, L)
    for backend in ("torch", "triton"):
        leaf = logits.clone().requires_grad_()
        with CommRecorder() as rec:
            rec.phase = "forward"
            st = token_statistics(leaf, targets, K, group, T, case["vocab_size"], mask=mask, backend=backend)
            objective = (up["target"] * st.target_logprob).sum() + (up["topk"] * st.topk_logprob).sum()
            if st.entropy.requires_grad:
                objective = objective + (g_h2 * st.entropy).sum()
            rec.phase = "backward"
            objective.backward()
        with torch.no_grad():
            st_ng = token_statistics(logits, targets, K, group, T, case["vocab_size"], mask=mask, backend=backend)
        results[backend] = (st, leaf.grad, rec.calls, st_ng)
    (st_t, g_t, calls_t, _), (st, g, calls, st_ng) = results["torch"], results["triton"]
    m = mask
    close("target_logprob", st.target_logprob[m], st_t.target_logprob[m], **FP32_TOL)
    close("entropy", st.entropy, st_t.entropy, **FP32_TOL)
    close("topk_logprob", st.topk_logprob, st_t.topk_logprob, **FP32_TOL)
    if not ties:
        if not torch.equal(st.topk_ids, st_t.topk_ids):
            failures.append("topk_ids differ")
        if not torch.equal(st.is_rank1, st_t.is_rank1):
            failures.append("is_rank1 differs")
        close("gradient", g.float(), g_t.float(), **grad_tol)
    else:  # tied candidates may be listed in another order: check validity, and the gradient at these ids
        full_shard = vp._Shard(0, case["vocab_size"], 1)
        failures += topk_ids_valid("merged", st.topk_ids.view(N, K), st.topk_logprob.view(N, K) + lse.unsqueeze(1),
                                   logits_full.view(N, ROWS), full_shard, inv_t)
        ids_here = torch.cat([t1d.unsqueeze(1), st.topk_ids.view(N, K)], dim=1)
        betas_here = torch.cat([up["target"].view(N, 1), up["topk"].view(N, K)], dim=1)
        with_h = st.entropy.requires_grad
        at_ids = tk.softmax_gradient(x, ids_here, betas_here, lse, inv_t, shard,
                                     grad_entropy=g_h if with_h else None, entropy=entropy if with_h else None)
        close("gradient (at the Triton backend's ids)", g.view(N, v_local).float(), at_ids.float(), **FP32_TOL)
        if not with_h:  # (with the entropy term, 2. checks that term against autograd)
            expected = torch.zeros_like(x)
            if shard.n_real:
                out = vp.real_rows(expected, shard)
                vp.softmax_gradient_chunk(xr, out, out if x.dtype == torch.float32 else torch.empty(out.shape),
                                          lse, inv_t, shard, ids_here, betas_here)
            close("gradient vs the torch step at the same ids", g.view(N, v_local).float(), expected.float(),
                  **grad_tol)
    if g.dtype != logits.dtype:
        failures.append(f"end-to-end gradient dtype {g.dtype} != {logits.dtype}")
    padding = g[..., shard.n_real:]
    if padding.numel() and not bool((padding == 0).all()):
        failures.append("padding rows received a gradient")
    for field in st._fields:
        if not torch.equal(getattr(st_ng, field), getattr(st, field).detach()):
            failures.append(f"no-grad path: {field} differs from the autograd path")
    if [c[1:] for c in calls] != [c[1:] for c in calls_t] or any(c[0] == "backward" for c in calls):
        failures.append(f"collectives differ from the torch backend's (or run in backward): {calls} vs {calls_t}")
    if world > 1 and not calls:
        failures.append("no forward collective was recorded")

    if case["loss"]:
        failures += check_loss(logits, targets, mask, case, group, grad_tol)
    if not bitwise_equal(logits, before):
        failures.append("the caller's logits were modified")
    return failures


def mismatch(what, actual, expected, **tol) -> list[str]:
    """[] if torch.testing.assert_close passes, else its message prefixed with `what`."""
    try:
        torch.testing.assert_close(actual, expected, **tol)
    except AssertionError as e:
        return [f"{what}: {e}"]
    return []


def topk_ids_valid(what, ids, values, x, shard, inv_t) -> list[str]:
    """ids [N, K] are distinct real ids of this shard (or −1 past its real rows) whose z equal `values` [N, K]."""
    K = ids.shape[1]
    k = min(K, shard.n_real)
    local = ids[:, :k] - shard.start
    if k and not bool(((local >= 0) & (local < shard.n_real)).all()):
        return [f"{what} top-K ids outside the shard's real rows"]
    if bool((ids[:, k:] != -1).any()):
        return [f"{what} top-K ids past the real rows are not -1"]
    if any(len(set(row.tolist())) < k for row in ids[:, :k]):
        return [f"{what} top-K ids repeat"]
    z = x.float().gather(1, local) * inv_t
    if not torch.allclose(z.double(), values[:, :k].double(), rtol=1e-6, atol=1e-6):
        return [f"{what} top-K values are not the logits at the listed ids"]
    return []


def check_loss(logits, targets, mask, case, group, grad_tol) -> list[str]:
    """simko_loss with both backends: loss, metrics and gradient."""
    g = torch.Generator().manual_seed(7)
    B, L = targets.shape
    advantages = torch.randn(B, L, generator=g)
    with torch.no_grad():
        old = token_statistics(logits, targets, case["top_k"], group, case["temperature"], case["vocab_size"],
                               mask=mask, backend="torch").target_logprob + 0.3 * torch.randn(B, L, generator=g)
    out = {}
    for backend in ("torch", "triton"):
        leaf = logits.clone().requires_grad_()
        cfg = SimKOConfig(top_k=case["top_k"], alpha=0.3, lam=2.0, backend=backend)
        loss, metrics = simko_loss(leaf, targets, old, advantages, mask, cfg, tp_group=group,
                                   temperature=case["temperature"], vocab_size=case["vocab_size"])
        loss.backward()
        out[backend] = (loss.detach(), metrics, leaf.grad)
    failures = []
    (loss_t, met_t, grad_t), (loss, met, grad) = out["torch"], out["triton"]
    if abs(loss.item() - loss_t.item()) > 1e-6:
        failures.append(f"simko_loss {loss.item()} != torch backend {loss_t.item()}")
    bad = [k for k in met_t if abs(met[k] - met_t[k]) > 1e-6 * max(1.0, abs(met_t[k]))]
    if bad:
        failures.append(f"simko_loss metrics differ: {bad}")
    return failures + mismatch("simko_loss gradient", grad.float(), grad_t.float(), **grad_tol)


def main():
    p = argparse.ArgumentParser()
    for flag in ("--rank", "--world", "--port"):
        p.add_argument(flag, type=int, required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if not tk.interpreted():
        raise SystemExit("set TRITON_INTERPRET=1 (and install triton) before running this worker")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank,
                                         world_size=a.world, timeout=timedelta(seconds=120))
    group = torch.distributed.new_group(list(range(a.world)))
    results, t0 = {}, time.time()
    for name, case in CASES.items():
        results[name] = check_case(name, case, a.rank, a.world, group)
    results["_seconds"] = time.time() - t0
    with open(os.path.join(a.out, f"rank{a.rank}.json"), "w") as f:
        json.dump(results, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

"""SimKO loss forward+backward: the project's backends against peers and the memory-bandwidth bound.

    python benchmarks/loss_bench.py --device cuda --check --sweep --json OUT.json   # the whole GPU run (minutes)
    python benchmarks/loss_bench.py                                                 # CPU: N=2048, V=32768, fp32
    python benchmarks/loss_bench.py --check --dtype bfloat16 --tokens 512 --vocab 4099   # CPU check (interpreter)

Rows (each implementation in its own subprocess, so that peak memory is its own; one subprocess loops over V):
  expand_k      the SimKO authors' approach as issue 11 describes it: top-K log-probs from the logits expanded
                K times ([N, K, V] fp32 log-softmax in the graph); written here from that description
  naive         losses/reference.py: autograd through log_softmax over the full vocabulary
  megatron_ce   megatron-core vocab_parallel_cross_entropy (target log-prob only — the floor of what peers
                do; TP = 1 group); skipped when megatron-core does not import
  torch         simko_loss, backend="torch"
  triton        simko_loss, backend="triton" (CUDA only: on CPU Triton only interprets — no speed number)
  triton_stats  token_statistics alone (fused kernels + the merge), backend="triton", fwd+bwd
  copy          a device-to-device copy of the logits: bandwidth BW = 2·bytes / t; the bound of a fused
                fwd+bwd (read the logits twice, write the gradient once) is 3·bytes / BW = 1.5·t_copy
ms = median wall time of one fwd+bwd (CUDA synchronised); extra GiB = peak during the runs − memory held
after building the inputs (torch.cuda.max_memory_allocated; CPU: ru_maxrss − RSS at start), the returned
[N, V] gradient included. --check: Triton (compiled on CUDA, interpreted on CPU) vs torch backend, every output
and the gradient, tie-aware (check_verdict; tolerances CHECK_TOL and why), exit 1 on a failure. --sweep:
the two kernels alone per (tile, warps), each against its own bound (forward: read once; backward: read +
write). --json: everything as JSON too.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ("copy", "expand_k", "naive", "megatron_ce", "torch", "triton", "triton_stats")
SWEEP = ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16))


def make_inputs(torch, dev, dtype, N, V, B, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    L = N // B
    logits = (torch.randn(B, L, V, device=dev, generator=g) * 2).to(dtype)
    targets = torch.randint(0, V, (B, L), device=dev, generator=g)
    old_logprob = -torch.rand(B, L, device=dev, generator=g) * 5
    advantages = torch.randn(B, device=dev, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool, device=dev)
    mask[:, int(L * 0.9):] = False
    return logits, targets, old_logprob, advantages, mask


def expand_k_loss(torch, x, targets, old_logprob, advantages, mask, cfg):
    """SimKO with top-K log-probs from the logits expanded K times: [N, K, V] fp32 live in the graph."""
    from megatron_simko.losses.simko import high_entropy_mask, simko_gamma

    K = cfg.top_k
    z = x.float()
    logp_all = torch.log_softmax(z, dim=-1)  # [B, L, V]
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1).detach()
    ids = z.detach().topk(K, dim=-1).indices  # [B, L, K]
    is_rank1 = targets == ids[..., 0]
    expanded = torch.log_softmax(z.unsqueeze(2).expand(*z.shape[:2], K, z.shape[-1]), dim=-1)  # [B, L, K, V]
    topk_logp = expanded.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # [B, L, K]
    w = high_entropy_mask(entropy, mask, cfg.tau)
    A = torch.where(mask, advantages.unsqueeze(1).expand_as(logp), 0.0)
    A = torch.where(w & (A < 0) & is_rank1, cfg.lam * A, A)
    gamma = simko_gamma(torch.where(mask, logp, 0.0), topk_logp, torch.where(mask, old_logprob, 0.0),
                        cfg.alpha * (w & (A > 0)).float())
    loss_t = torch.maximum(-A * gamma, -A * gamma.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)) * mask
    return loss_t.sum() / mask.sum()


def megatron_ce_setup(torch, dev):
    """A TP = 1 megatron-core model-parallel state in this process; returns vocab_parallel_cross_entropy."""
    import socket

    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    return vocab_parallel_cross_entropy


def timed(torch, cuda, step, repeats):
    """(median ms, extra peak bytes) of step() after one warm-up."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        import psutil

        base = psutil.Process().memory_info().rss
    out = step()  # warm-up (and Triton compilation)
    del out
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = step()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
        del out
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base  # ru_maxrss is KiB on Linux
    return statistics.median(times), peak


def child(args) -> list:
    sys.path.insert(0, REPO)
    import torch

    from megatron_simko.losses import SimKOConfig, simko_loss, token_statistics
    from megatron_simko.losses.reference import reference_simko_loss

    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = dev.type == "cuda"
    cfg = SimKOConfig(top_k=args.top_k, chunk_tokens=args.chunk_tokens,
                      backend=args.impl if args.impl in ("torch", "triton") else "torch")
    ce = megatron_ce_setup(torch, dev) if args.impl == "megatron_ce" else None
    rows = []
    for V in args.vocabs:
        logits, targets, old_logprob, advantages, mask = make_inputs(torch, dev, dtype, args.tokens, V, args.responses)

        def step():
            if args.impl == "copy":
                return logits.clone()
            x = logits.detach().requires_grad_()
            if args.impl == "naive":
                loss, _ = reference_simko_loss(x, targets, old_logprob, advantages, mask, top_k=cfg.top_k,
                                               alpha=cfg.alpha, lam=cfg.lam, tau=cfg.tau)
            elif args.impl == "expand_k":
                loss = expand_k_loss(torch, x, targets, old_logprob, advantages, mask, cfg)
            elif args.impl == "megatron_ce":
                loss = (ce(x, targets) * mask).sum() / mask.sum()  # any leading layout; −log π(y_t)
            elif args.impl == "triton_stats":
                st = token_statistics(x, targets, cfg.top_k, mask=mask, backend="triton")
                loss = st.target_logprob.sum() + st.topk_logprob.sum()
            else:
                loss, _ = simko_loss(x, targets, old_logprob, advantages, mask, cfg)
            (grad,) = torch.autograd.grad(loss, x)
            return grad

        try:
            ms, peak = timed(torch, cuda, step, args.repeats)
            rows.append(dict(impl=args.impl, V=V, ms=ms, peak_gib=peak / 2 ** 30))
        except torch.cuda.OutOfMemoryError:
            rows.append(dict(impl=args.impl, V=V, ms=None, peak_gib=None, note="out of memory"))
        del logits
        if cuda:
            torch.cuda.empty_cache()
    return rows


# Tolerances of --check (Triton vs the torch backend). The CPU interpreter evaluates tl.exp with numpy's exp
# and no FMA contraction: the tests' 1e-6 holds there (tests/loss_triton_worker.py). Compiled for a GPU, tl.exp
# becomes ex2.approx (exp2 with ~2 ulp relative error after a multiply by log2 e) and the compiler contracts
# a*b+c into FMAs the torch path rounds twice: each e^{z−m} term is off by a few 1e-7 relative, the fp32 sums
# over V ≈ 1e5 terms by up to ~1e-6 relative and log-probabilities of magnitude up to ~30 by up to ~1e-5.
# So the GPU is held to 1e-5 (statistics: |Δ| ≤ tol·(1 + |value|), as the tests' atol = rtol) and to 1e-6 absolute
# + (1e-5 + one ulp of the logits dtype) relative on the gradient.
CHECK_TOL = {"cpu": dict(stat=1e-6, grad_abs=1e-6, grad_rel=1e-6), "cuda": dict(stat=1e-5, grad_abs=1e-6, grad_rel=1e-5)}
ULP = {"torch.float32": 0.0, "torch.bfloat16": 2.0 ** -7, "torch.float16": 2.0 ** -10}


def reference_gradient(torch, logits, targets, T, vocab, up_t, up_k, ids):
    """∂/∂logits of Σ up_t·log π(y_t) + Σ_k up_k·log π(ids_k), π = softmax(logits[..., :vocab] / T) in fp32
    (autograd; padding rows get 0): the gradient a correct backend must give for the ids it listed."""
    x = logits.detach().float().requires_grad_()
    logp = torch.log_softmax(x[..., :vocab] / T, dim=-1)
    obj = (up_t * logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)).sum() + (up_k * logp.gather(-1, ids)).sum()
    (g,) = torch.autograd.grad(obj, x)
    return g


def check_verdict(torch, logits, targets, T, vocab, up_t, up_k, ref, cand, tol) -> dict:
    """Tie-aware comparison of a candidate backend's (statistics, gradient) with the reference backend's, for the
    objective Σ up_t·target_logprob + Σ up_k·topk_logprob (the rule of tests/loss_triton_worker.py's tie cases).

    Top-K ids: equal logits may be listed in any order (bf16 logits tie often; CUDA's topk orders ties
    arbitrarily), so a row passes when its ids are distinct real ids whose logits are, position by position,
    exactly the logits at the reference's ids; statistics (top-K log-probs included) agree within
    tol["stat"]·(1 + |value|). Gradient: at
    rows where the ids agree, against the reference backend's; where tied ids were listed in another order,
    against an fp32 autograd reference at the candidate's ids (a different id order moves up_k's weights).
    Returns a row: max differences, rows with tied reordering, and "pass"."""
    (st_r, g_r), (st, g) = ref, cand
    K = st.topk_ids.shape[-1]
    row = {"dtype": str(logits.dtype), "K": K, "T": T}

    def excess(a, b):  # > 0 where |a − b| > stat·(1 + |b|): the tests' atol = rtol = stat rule
        return ((a - b).abs() - tol["stat"] * (1 + b.abs())).max().item()

    stats_ok = True
    for f in ("target_logprob", "entropy", "topk_logprob"):
        row[f] = (getattr(st, f) - getattr(st_r, f)).abs().max().item()
        stats_ok &= excess(getattr(st, f), getattr(st_r, f)) <= 0
    ids, ids_r = st.topk_ids, st_r.topk_ids
    same = (ids == ids_r).all(-1)  # [B, L]
    row["rows_ids_reordered_by_ties"] = int((~same).sum())
    in_range = bool(((ids >= 0) & (ids < vocab)).all())
    distinct = bool((ids.sort(-1).values.diff(dim=-1) != 0).all()) if K > 1 else True
    # The logits at the listed ids must be the reference's top-K logits, position by position — exactly: both
    # are the same input values, so a tied pair listed the other way round reads the same numbers.
    row["topk_ids_valid"] = in_range and distinct and torch.equal(
        logits.gather(-1, ids.clamp(0, vocab - 1)), logits.gather(-1, ids_r.clamp(0, vocab - 1)))
    expected = torch.where(same.unsqueeze(-1), g_r.float(),
                           reference_gradient(torch, logits, targets, T, vocab, up_t, up_k, ids).to(g.dtype).float())
    diff = (g.float() - expected).abs()
    rel = tol["grad_rel"] + ULP[str(logits.dtype)]
    row["grad_max_abs_diff"] = diff.max().item()
    row["grad_excess"] = (diff - tol["grad_abs"] - rel * expected.abs()).max().item()
    row["padding_grad_zero"] = bool((g[..., vocab:] == 0).all())
    row["pass"] = (stats_ok and row["topk_ids_valid"] and row["grad_excess"] <= 0 and row["padding_grad_zero"]
                   and g.dtype == logits.dtype)
    return row


CHECK_CASES = (("bfloat16", 3, 0.6), ("float32", 8, 1.0), ("float16", 1, 1.3))


def check(args) -> list:
    """Compiled (CUDA) or interpreted (CPU) Triton vs the torch backend: every output and the gradient, tie-aware
    (check_verdict), with CHECK_TOL for the device. Shapes: N = min(--tokens, 1024) tokens over the first --vocab
    width, the last V // 1000 + 1 columns padding rows with the largest logits; one case per dtype (--dtype: only
    that one)."""
    sys.path.insert(0, REPO)
    import torch

    from megatron_simko.losses import token_statistics

    dev, out = torch.device(args.device), []
    N, V = min(args.tokens, 1024), args.vocabs[0]
    cases = [c for c in CHECK_CASES if args.check_dtype is None or c[0] == args.check_dtype]
    for dtype_name, K, T in cases:
        dtype = getattr(torch, dtype_name)
        logits, targets, *_ = make_inputs(torch, dev, dtype, N, V, 8, seed=1)
        vocab = V - V // 1000 - 1  # padding rows at the end, with the largest logits
        logits[..., vocab:] = 30.0
        targets = targets.clamp(max=vocab - 1)
        g = torch.Generator(device=dev).manual_seed(2)
        up_t = torch.randn(targets.shape, device=dev, generator=g)
        up_k = torch.randn(*targets.shape, K, device=dev, generator=g)
        res = {}
        for backend in ("torch", "triton"):
            x = logits.detach().requires_grad_()
            st = token_statistics(x, targets, K, temperature=T, vocab_size=vocab, backend=backend)
            ((up_t * st.target_logprob).sum() + (up_k * st.topk_logprob).sum()).backward()
            res[backend] = (st, x.grad)
        out.append(check_verdict(torch, logits, targets, T, vocab, up_t, up_k, res["torch"], res["triton"],
                                 CHECK_TOL[dev.type]))
    return out


def sweep(args) -> list:
    """The two kernels alone (bf16, K = top_k) per (tile, warps), each against the measured copy time."""
    sys.path.insert(0, REPO)
    import torch

    from megatron_simko.losses import triton_kernels as tk
    from megatron_simko.losses.vocab_parallel import _Shard

    dev, out = torch.device(args.device), []
    for V in args.vocabs:
        logits, targets, *_ = make_inputs(torch, dev, torch.bfloat16, args.tokens, V, args.responses)
        x, t = logits.view(-1, V), targets.view(-1)
        shard, N, K = _Shard(0, V, 1), x.shape[0], args.top_k
        ids = torch.cat([t.unsqueeze(1), torch.randint(0, V, (N, K), device=dev)], 1)
        betas, lse = torch.randn(N, K + 1, device=dev), torch.logsumexp(x.float(), -1)
        cuda = dev.type == "cuda"
        copy_ms, _ = timed(torch, cuda, lambda: x.clone(), args.repeats)
        for block, warps in SWEEP:
            kw = dict(block=block, num_warps=warps)
            fwd, _ = timed(torch, cuda, lambda: tk.local_partials(x, t, K, shard, 1.0, **kw), args.repeats)
            bwd, _ = timed(torch, cuda, lambda: tk.softmax_gradient(x, ids, betas, lse, 1.0, shard, **kw), args.repeats)
            out.append(dict(V=V, block=block, warps=warps, fwd_ms=fwd, bwd_ms=bwd, fwd_x_bound=fwd / (copy_ms / 2),
                            bwd_x_bound=bwd / copy_ms))
        del logits, x
        if cuda:
            torch.cuda.empty_cache()
    return out


def run_child(args, impl, vocabs=None, env=None):
    """`impl` in a fresh process over `vocabs` (default all); a failure becomes a row saying so."""
    vocabs = vocabs or args.vocabs
    cmd = [sys.executable, os.path.abspath(__file__), "--impl", impl, "--device", args.device,
           "--tokens", str(args.tokens), "--vocab", ",".join(map(str, vocabs)), "--dtype", args.dtype,
           "--responses", str(args.responses), "--repeats", str(args.repeats), "--top-k", str(args.top_k),
           "--chunk-tokens", str(args.chunk_tokens)] + (["--check-dtype", args.check_dtype] if args.check_dtype else [])
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        return [dict(impl=impl, V=V, ms=None, peak_gib=None, note=f"failed: {r.stderr.strip().splitlines()[-1:]}")
                for V in vocabs]
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(allow_abbrev=False,
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--tokens", type=int, help="N (default 2048 on CPU, 8192 on CUDA)")
    p.add_argument("--vocab", help="comma-separated V_local values (default 32768 on CPU; 152064,76032,38016 "
                                   "on CUDA: Qwen2.5's vocabulary at TP 1/2/4)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--responses", type=int, default=8, help="B; L = N / B")
    p.add_argument("--repeats", type=int, help="timed runs after one warm-up (default 3 CPU, 10 CUDA)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--chunk-tokens", type=int, default=2048)
    p.add_argument("--check", action="store_true",
                   help="Triton vs torch backend first (CUDA: compiled; CPU: Triton's interpreter, keep shapes "
                        "small); tie-aware; exit 1 on a failure")
    p.add_argument("--sweep", action="store_true", help="CUDA: time the kernels per (tile, warps)")
    p.add_argument("--json", help="also write all results here")
    p.add_argument("--impl", choices=IMPLS + ("check", "sweep"), help=argparse.SUPPRESS)
    p.add_argument("--check-dtype", help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = args.device == "cuda"
    if args.impl is None:  # --check runs the case of an explicitly given --dtype only (all three otherwise)
        args.check_dtype = args.dtype
    args.tokens = args.tokens or (8192 if cuda else 2048)
    args.vocabs = [int(v) for v in (args.vocab or ("152064,76032,38016" if cuda else "32768")).split(",")]
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.repeats = args.repeats or (10 if cuda else 3)
    if args.impl:
        print(json.dumps({"check": check, "sweep": sweep}.get(args.impl, child)(args)))
        return

    t0, result = time.time(), {"device": args.device, "tokens": args.tokens, "dtype": args.dtype,
                               "top_k": args.top_k, "date": time.strftime("%Y-%m-%d")}
    if cuda:
        import torch

        result["gpu"] = torch.cuda.get_device_name()
        result["versions"] = {"torch": torch.__version__}
        try:
            import triton

            result["versions"]["triton"] = triton.__version__
        except ImportError:
            pass
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # CPU smoke runs of the Triton rows: no speed
    failed = False
    if args.check:  # CPU: the kernels run in Triton's interpreter (set for the check's process only)
        result["check"] = run_child(args, "check", [args.vocabs[0]], env=None if cuda else {"TRITON_INTERPRET": "1"})
        for row in result["check"]:
            print("check", row)
        failed = not result["check"] or not all(row.get("pass") for row in result["check"])
        print(f"check: {'FAIL' if failed else 'PASS'} (tolerances: {CHECK_TOL[args.device]}, + one ulp of the "
              f"logits dtype on the gradient; tied top-K ids may be listed in any order)")
    impls = [i for i in IMPLS if cuda or interpreted or not i.startswith("triton")]
    if cuda:  # one process per implementation; CPU: per (implementation, V), as ru_maxrss never decreases
        result["rows"] = [row for impl in impls for row in run_child(args, impl)]
    else:
        result["rows"] = [row for impl in impls for V in args.vocabs for row in run_child(args, impl, [V])]
    if args.sweep and (cuda or interpreted):
        result["sweep"] = run_child(args, "sweep")
    print_tables(args, result)
    print(f"total {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    if failed:
        sys.exit(1)


def print_tables(args, result):
    copy_ms = {r["V"]: r["ms"] for r in result["rows"] if r["impl"] == "copy" and r["ms"]}
    print(f"device={result.get('gpu', args.device)} N={args.tokens} dtype={args.dtype} K={args.top_k} "
          f"threads={os.environ.get('OMP_NUM_THREADS', 'default')} date={result['date']}")
    print("bound = 1.5 x copy (fused fwd+bwd reads the logits twice and writes the gradient once)")
    if args.device == "cpu":
        print("CPU: not the target hardware; Triton rows (TRITON_INTERPRET=1) are interpreter timings, not speed")
    print("| impl | V | fwd+bwd ms | x bound | extra peak GiB |")
    print("|---|---|---|---|---|")
    for V in args.vocabs:
        bound = 1.5 * copy_ms[V] if V in copy_ms else None
        if bound:
            bw = 2 * args.tokens * V * (2 if args.dtype == "bfloat16" else 4) / (copy_ms[V] * 1e-3) / 1e9
            print(f"| bound (copy {copy_ms[V]:.3f} ms, {bw:.0f} GB/s) | {V} | {bound:.3f} | 1.00 | 0 |")
        for r in result["rows"]:
            if r["V"] != V or r["impl"] == "copy":
                continue
            if r["ms"] is None:
                print(f"| {r['impl']} | {V} | {r.get('note', 'n/a')} | | |")
                continue
            ratio = f"{r['ms'] / bound:.2f}" if bound else ""
            print(f"| {r['impl']} | {V} | {r['ms']:.2f} | {ratio} | {r['peak_gib']:.2f} |")
    for r in result.get("sweep", []):
        print("sweep", r)


if __name__ == "__main__":
    main()

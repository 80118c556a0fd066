"""SimKO loss forward+backward: naive torch reference vs the vocab-parallel implementation (TP = 1).

    python benchmarks/loss_bench.py                      # CPU: N=2048 tokens, V=32768, fp32
    python benchmarks/loss_bench.py --device cuda        # GPU: N=8192 tokens, V=152064, bf16

Each implementation runs in its own subprocess so that peak memory is its own:
  peak MiB = peak during warm-up + timed runs − memory held right after building the inputs, i.e. the extra
  memory of one fwd+bwd, INCLUDING the [N, V] gradient that both must return (in the logits dtype).
  CUDA: torch.cuda.max_memory_allocated. CPU: getrusage ru_maxrss − RSS at baseline (psutil).
ms = median wall time of one fwd+bwd (CUDA synchronised).
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
IMPLS = ("naive", "simko")


def child(args) -> dict:
    sys.path.insert(0, REPO)
    import torch

    from megatron_simko.losses import SimKOConfig, simko_loss
    from megatron_simko.losses.reference import reference_simko_loss

    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    N, V, B = args.tokens, args.vocab, args.responses
    L = N // B
    g = torch.Generator(device=dev).manual_seed(0)
    logits = (torch.randn(B, L, V, device=dev, generator=g) * 2).to(dtype)
    targets = torch.randint(0, V, (B, L), device=dev, generator=g)
    old_logprob = -torch.rand(B, L, device=dev, generator=g) * 5
    advantages = torch.randn(B, device=dev, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool, device=dev)
    mask[:, int(L * 0.9):] = False
    cfg = SimKOConfig(chunk_tokens=args.chunk_tokens)

    def step():
        x = logits.detach().requires_grad_()
        if args.impl == "naive":
            loss, _ = reference_simko_loss(x, targets, old_logprob, advantages, mask, top_k=cfg.top_k,
                                           alpha=cfg.alpha, lam=cfg.lam, tau=cfg.tau)
        else:
            loss, _ = simko_loss(x, targets, old_logprob, advantages, mask, cfg)
        (grad,) = torch.autograd.grad(loss, x)
        return loss.item(), grad

    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        import psutil

        base = psutil.Process().memory_info().rss
    loss, grad = step()  # warm-up
    del grad
    times = []
    for _ in range(args.repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, grad = step()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
        del grad
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base  # ru_maxrss is KiB on Linux
    return dict(impl=args.impl, ms=statistics.median(times), peak_mib=peak / 2 ** 20, loss=loss)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--tokens", type=int, help="N (default 2048 on CPU, 8192 on CUDA)")
    p.add_argument("--vocab", type=int, help="V (default 32768 on CPU, 152064 on CUDA)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--responses", type=int, default=8, help="B; L = N / B")
    p.add_argument("--repeats", type=int, help="timed runs after one warm-up (default 3 CPU, 10 CUDA)")
    p.add_argument("--chunk-tokens", type=int, default=2048)
    p.add_argument("--impl", choices=IMPLS, help="run one implementation in this process (internal)")
    args = p.parse_args()
    cuda = args.device == "cuda"
    args.tokens = args.tokens or (8192 if cuda else 2048)
    args.vocab = args.vocab or (152064 if cuda else 32768)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.repeats = args.repeats or (10 if cuda else 3)
    if args.impl:
        print(json.dumps(child(args)))
        return

    rows = []
    for impl in IMPLS:
        cmd = [sys.executable, os.path.abspath(__file__), "--impl", impl] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "impl"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    shape = f"N={args.tokens} V={args.vocab}"
    print(f"device={args.device} threads={os.environ.get('OMP_NUM_THREADS', 'default')} "
          f"chunk_tokens={args.chunk_tokens} (peak = extra memory of one fwd+bwd, gradient included)")
    print("| impl  | shape | dtype | fwd+bwd ms | peak MiB | loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {shape} | {args.dtype} | {r['ms']:.1f} | {r['peak_mib']:.0f} | {r['loss']:.6f} |")


if __name__ == "__main__":
    main()

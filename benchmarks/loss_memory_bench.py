"""Peak extra memory and time of the output layer + SimKO loss, from the last hidden states, per path.

    python benchmarks/loss_memory_bench.py                  # CPU: N=4096 (8 × 512), H=512, V=32768, fp32, TP 1 and 2
    python benchmarks/loss_memory_bench.py --tp 1 --paths sliced whole --tokens 1024   # a quick look
    python benchmarks/loss_memory_bench.py --device cuda --dtype bfloat16 --tokens 8192 --hidden 3584 \
        --vocab 152064 --tp 1 --paths whole fused         # the 7B shape on one GPU, with the four-GEMM bound

Paths (forward + backward of logits = h Wᵀ and simko_loss, down to the gradients of h [b, s, H] and of this
rank's weight shard W [V/TP, H]):
  sliced   simko_loss(logits[:, :-1], tokens[:, 1:]): the trainer before issue 20 item 7. For b > 1 the slice
           is not a view of a [b·(s−1), V] matrix, so the loss copies it, and autograd allocates a zero
           [b, s, V] gradient to copy the sliced gradient into
  whole    simko_loss(logits, targets shifted left, the last position masked): the trainer's logits path
  fused    simko_loss(stats=linear_token_statistics(h, W)): the statistics straight from the hidden states,
           streamed in --fused-chunk-tokens chunks, no [N, V/TP] logits (losses/fused_linear.py, issue 21)

Every (path, TP) runs in its own process (TP 2: a torchrun of 2 gloo ranks, each holding V/2 rows; the figures
are the larger of the two ranks), so that each peak is its own. extra MiB = peak resident memory during the
runs − resident memory after building the inputs and a first step on 8 tokens per response (CPU: ru_maxrss −
RSS; CUDA: max_memory_allocated − memory_allocated), the returned gradients included; the first step pages in the
library code the path runs, which RSS counts (~15 MiB), then malloc_trim(0) hands back the heap it freed, so
that "extra" is the path's data; tensor MiB = the exact peak of live tensor bytes allocated
during one more (untimed) step, the returned gradients included (tensor_memory.TensorPeak: every aten op's new
storages until they are freed — CPU's counterpart of max_memory_allocated, without what the C allocator keeps
after a free; --show-peak lists what is alive then); ms = median wall time of one forward + backward after a
warm-up; ms CPU = median CPU time of this process per forward + backward (the larger rank's), which other jobs
on a shared CPU disturb far less than the wall time. Read the ratios, not the absolute ms.
On CUDA the bound of the fused path is printed beside it: four N·H·V/TP GEMMs (the forward logits, their
recomputation, ∂h, ∂W) at the GPU's dense bf16/fp32 peak given by --peak-tflops (default: H100 SXM bf16, 989).
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import statistics
import subprocess
import sys
import time

from loss_bench import timed  # the same timing and peak-memory rule as the loss benchmark (this folder)
from tensor_memory import TensorPeak, describe  # the exact tensor peak (this folder)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ("sliced", "whole", "fused")


def child(args) -> dict:
    sys.path.insert(0, REPO)
    import torch
    import torch.distributed as dist

    from megatron_simko.losses import SimKOConfig, simko_loss
    from megatron_simko.losses.fused_linear import linear_token_statistics
    from megatron_simko.trainer.step import shift_left

    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = dev.type == "cuda"
    tp_group, tp, rank = None, 1, 0
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo")
        tp_group, tp, rank = dist.group.WORLD, dist.get_world_size(), dist.get_rank()
        if cuda:
            torch.cuda.set_device(rank)
    cfg = SimKOConfig(top_k=args.top_k, chunk_tokens=args.chunk_tokens, backend=args.backend,
                      fused_chunk_tokens=args.fused_chunk_tokens)
    V, H, B = args.vocab, args.hidden, args.responses
    L = args.tokens // B
    g = torch.Generator().manual_seed(0)  # the same draw on every rank; each keeps its own rows of W
    hidden = torch.randn(B, L, H, generator=g).to(dev, dtype)
    v_local = -(-V // tp)
    weight = (torch.randn(V, H, generator=g) * (2.0 / H ** 0.5))[rank * v_local:(rank + 1) * v_local]
    weight = weight.to(dev, dtype).contiguous()
    targets = torch.randint(0, V, (B, L), generator=g).to(dev)
    old = (-torch.rand(B, L, generator=g) * 5).to(dev)
    adv = torch.randn(B, generator=g).to(dev)
    mask = torch.ones(B, L, dtype=torch.bool, device=dev)
    mask[:, int(L * 0.9):] = False
    mask[:, 0] = False
    kw = dict(tp_group=tp_group, vocab_size=V)

    def step(hidden=hidden, targets=targets, old=old, mask=mask):
        h = hidden.detach().requires_grad_()
        w = weight.detach().requires_grad_()
        if args.path == "sliced":
            logits = torch.matmul(h, w.t())  # [B, L, V/TP]
            loss, _ = simko_loss(logits[:, :-1], targets[:, 1:], old[:, 1:], adv, mask[:, 1:], cfg, **kw)
            del logits  # as in the trainer, only autograd holds the logits in backward (freed after the loss's)
        elif args.path == "whole":
            logits = torch.matmul(h, w.t())
            loss, _ = simko_loss(logits, shift_left(targets, 0), shift_left(old, 0.0), adv,
                                 shift_left(mask, False), cfg, **kw)
            del logits
        elif args.path == "fused":
            t, o, m = shift_left(targets, 0), shift_left(old, 0.0), shift_left(mask, False)
            st = linear_token_statistics(h, w, t, cfg.top_k, mask=m, chunk_tokens=cfg.fused_chunk_tokens,
                                         backend=cfg.backend, **kw)
            loss, _ = simko_loss(None, t, o, adv, m, cfg, stats=st, **kw)
        else:
            raise ValueError(f"unknown path {args.path!r}")
        loss.backward()
        return h.grad, w.grad

    # First use, on 8 tokens per response: the same ops page in their library code and initialise their
    # libraries (RSS counts code pages too) before the inputs' RSS is read, so that "extra" is the path's memory.
    first = step(*[x[:, :8].contiguous() for x in (hidden, targets, old, mask)])
    del first
    if not cuda:  # and glibc returns what that step freed, so that no free heap is counted into the base
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)

    if tp_group is not None:
        dist.barrier()
    cpu_ms = []

    def step_with_cpu_time():  # this process's own CPU time: robust to other jobs on a shared CPU
        t0 = time.process_time()
        out = step()
        cpu_ms.append((time.process_time() - t0) * 1e3)
        return out

    ms, peak = timed(torch, cuda, step_with_cpu_time, args.repeats)  # loss_bench's rule: median ms, extra peak
    with TensorPeak() as probe:  # one more step, untimed: the exact peak of live tensor bytes and what is alive then
        out = step()
    del out
    row = dict(path=args.path, tp=tp, rank=rank, ms=ms, cpu_ms=statistics.median(cpu_ms[1:]),
               extra_mib=peak / 2 ** 20, tensor_mib=probe.peak_bytes / 2 ** 20,
               at_peak=describe(probe.at_peak))
    if tp_group is not None:
        dist.destroy_process_group()
    return row


def launch(args, path: str, tp: int) -> dict:
    """One (path, TP) in its own process(es); the row of the rank with the larger figures."""
    common = ["--child", "--path", path, "--device", args.device, "--dtype", args.dtype, "--tokens", str(args.tokens),
              "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--responses", str(args.responses),
              "--top-k", str(args.top_k), "--chunk-tokens", str(args.chunk_tokens), "--backend", args.backend,
              "--fused-chunk-tokens", str(args.fused_chunk_tokens),
              "--repeats", str(args.repeats)]
    script = os.path.abspath(__file__)
    if tp == 1:
        cmd = [sys.executable, script] + common
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp}", script] + common
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rows = [json.loads(line[len("ROW "):]) for line in res.stdout.splitlines() if line.startswith("ROW ")]
    if res.returncode != 0 or len(rows) != tp:
        raise RuntimeError(f"{path} TP {tp} failed (exit {res.returncode}):\n{res.stdout[-2000:]}{res.stderr[-4000:]}")
    top = max(rows, key=lambda r: r["tensor_mib"])
    return dict(path=path, tp=tp, ms=max(r["ms"] for r in rows), cpu_ms=max(r["cpu_ms"] for r in rows),
                extra_mib=max(r["extra_mib"] for r in rows), tensor_mib=top["tensor_mib"], at_peak=top["at_peak"])


def parse_args(argv=None):
    sys.path.insert(0, REPO)
    from megatron_simko.losses.fused_linear import DEFAULT_FUSED_CHUNK_TOKENS

    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--tokens", type=int, default=4096, help="N = responses × length")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--responses", type=int, default=8, help="b (> 1: the sliced path copies)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--chunk-tokens", type=int, default=2048)
    p.add_argument("--fused-chunk-tokens", type=int, default=DEFAULT_FUSED_CHUNK_TOKENS, help="loss.fused_chunk_tokens")
    p.add_argument("--backend", default="torch", choices=["torch", "triton", "auto"])
    p.add_argument("--peak-tflops", type=float, default=989.0, help="CUDA: dense GEMM peak for the FLOP bound")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    p.add_argument("--show-peak", action="store_true", help="list the tensors (≥ 1 MiB) alive at each tensor peak")
    p.add_argument("--json", help="write the rows here too")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print("ROW " + json.dumps(child(args)), flush=True)
        return 0
    if args.tokens % args.responses:
        raise SystemExit(f"--tokens {args.tokens} must be a multiple of --responses {args.responses}")
    print(f"device {args.device}, {args.dtype}, N = {args.tokens} ({args.responses} × {args.tokens // args.responses}),"
          f" H = {args.hidden}, V = {args.vocab}, K = {args.top_k}, chunk_tokens = {args.chunk_tokens},"
          f" fused_chunk_tokens = {args.fused_chunk_tokens}")
    rows = []
    for tp in args.tp:
        for path in args.paths:
            rows.append(launch(args, path, tp))
            r = rows[-1]
            bound = ""
            if args.device.startswith("cuda") and path == "fused":
                flops = 4 * 2 * args.tokens * args.hidden * -(-args.vocab // tp)  # four N·H·V/TP GEMMs
                bound = f"  (four-GEMM bound {flops / (args.peak_tflops * 1e12) * 1e3:.2f} ms at " \
                        f"{args.peak_tflops:g} TFLOP/s: {r['ms'] / (flops / (args.peak_tflops * 1e9)):.2f}x)"
            print(f"TP {tp}  {path:7s}  {r['ms']:9.1f} ms  {r['cpu_ms']:9.1f} ms CPU  {r['extra_mib']:9.1f} MiB extra peak"
                  f"  {r['tensor_mib']:9.1f} MiB tensor peak{bound}", flush=True)
            if args.show_peak:
                print("\n".join("        " + line for line in r["at_peak"]), flush=True)
    print("\nratios against `whole` (the logits path) at the same TP (wall time, CPU time, extra peak memory, "
          "tensor peak):")
    for r in rows:
        base = next((b for b in rows if b["tp"] == r["tp"] and b["path"] == "whole"), None)
        if base is not None and r is not base:
            print(f"TP {r['tp']}  {r['path']:7s}  time {r['ms'] / base['ms']:.2f}x  CPU time "
                  f"{r['cpu_ms'] / base['cpu_ms']:.2f}x  memory "
                  f"{r['extra_mib'] / base['extra_mib']:.2f}x  tensor peak {r['tensor_mib'] / base['tensor_mib']:.2f}x")
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

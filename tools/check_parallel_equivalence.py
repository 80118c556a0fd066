#!/usr/bin/env python
"""Check that a TP × PP × DP run equals a single device: per-token statistics, SimKO loss, every gradient and
the parameters after one optimizer step.

    python tools/check_parallel_equivalence.py --tp 2 --pp 2 [--dp 1] [--vpp N] [--model-config PATH]
                                               [--dtype fp32|bf16] [--seed 1234] [--distributed-optimizer]
                                               [--loss mode=kl_cov --loss entropy_coef=0.01 ...]

One command, two phases:
  1. reference (this process, one device: TP1 PP1 DP1, a private one-process gloo group): builds the model
     (a small Qwen2, or --model-config scaled down), the global batch, and records the initial weights,
     per-token statistics, loss, gradients and the parameters after one Adam step;
  2. parallel (this file relaunched under torchrun with tp·pp·dp ranks): every rank loads the reference weights
     into its shard (global layer = local + stage offset; TP slices; SwiGLU's fc1 sliced per half; the
     vocabulary padding rows of the larger TP padding left alone), runs the same step on its DP share of the
     batch, and compares its shard of every quantity with the reference's slice.
The loss is SimKO with the defaults of SimKOConfig (top_k 3) unless ``--loss KEY=VALUE`` (repeatable) sets
SimKOConfig fields, e.g. another mode or an entropy bonus. KL-Cov / Clip-Cov select tokens over the whole
mini-batch (trainer/token_stats.py), so the single device and every layout must select the same tokens. The
reference always computes the loss from logits: ``--loss fused_linear=true`` checks the fused path
(losses/fused_linear.py, no logits) of the parallel run against it.
Prints a table (quantity, max abs diff, tolerance, pass/fail) and exits 1 on any failure (2 on bad arguments).
The harness (both phases, tolerances, the comparison) is megatron_simko/parallel/equivalence.py; this is its
command line.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

warnings.filterwarnings("ignore", category=UserWarning)  # megatron-core: "TE/apex not installed" etc.
warnings.filterwarnings("ignore", category=FutureWarning)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from megatron_simko.parallel import equivalence  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank (interleaved)")
    p.add_argument("--model-config", default=None, help="HF model dir or config.json (scaled down)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--distributed-optimizer", action="store_true")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="parallel run: token-budget micro-batches of ≤ N padded tokens (count agreed over DP) "
                        "instead of equal splits; the reference keeps equal splits")
    p.add_argument("--loss", action="append", default=[], metavar="KEY=VALUE",
                   help="a SimKOConfig field for the loss (repeatable), e.g. mode=kl_cov, entropy_coef=0.01 or "
                        "backend=triton (on CPU with TRITON_INTERPRET=1)")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--reference", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return equivalence.worker(args)
    try:  # every configuration error before any process-group work
        equivalence.validate(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return equivalence.launch(args, os.path.abspath(__file__))


if __name__ == "__main__":
    sys.exit(main())

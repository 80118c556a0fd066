#!/usr/bin/env python
"""The RL loop end to end on one device, checked: the GPU smoke run (``bash tools/gpu_smoke.sh``).

    python tools/gpu_smoke.py [--mode gpu|cpu] [--out-dir DIR]      # gpu: default when CUDA is available

0. pre-flight: every import the stages need, with versions printed (a missing one fails here, in seconds);
1. data: procedural one-digit sums in prompt templates of different lengths ("Calculate: 3 + 5 =", ...), so
   rollout batches are left-padded (the padded prefill path runs), gold answers, math reward (math-verify) —
   written as jsonl, no dataset download and no reasoning-gym needed;
2. tokenizer: a byte-level BPE trained locally (data/tokenizer.train_byte_level_bpe) with ChatML specials and
   a ChatML chat template, EOS = <|endoftext|> as on Qwen2.5 base models: responses must stop at the chat
   template's <|im_end|> (rollout/stop_tokens.py);
3. model: Qwen2 architecture built from a config — gpu: the real Qwen2.5 vocabulary size (151,936 rows), hidden
   896, 8 layers, tied embeddings (≈ 255 M parameters), saved in bf16; cpu: a tiny one in fp32 — then a short SFT
   warm start (megatron_simko.models.tiny.sft) so that sampled answers are sometimes right (mixed rewards);
4. RL: ``torchrun -m megatron_simko.train`` at TP=1 with ``rollout.backend=transformers`` (gpu: bf16): 2 steps
   with a checkpoint each, then a second launch that resumes from step 2 and runs step 3 (validation, HF export);
5. export: the step-3 checkpoint converted offline (``python -m megatron_simko.export``) must equal the live
   export bitwise and load in transformers;
6. a table per step (time by phase, tokens/s, this step's peak memory, loss and the loss backend that ran,
   mismatch, ...) and the checks; exit 1 if any check fails.

Every stage has a time limit (``STAGE_TIMEOUTS``; a hang fails that stage and the run goes on to the report),
subprocess output is streamed as it comes (and kept in ``<out-dir>/*.log``), and a JSON summary (versions,
stages with seconds and exit status, per-step rows, checks) is written to ``<out-dir>/summary.json`` and, when
the environment sets ``$OUT`` (the device machine's result folder), to ``$OUT/gpu_smoke_summary.json``.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_simko.smoke.build import MODES  # noqa: E402
from megatron_simko.smoke.check import run_smoke  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False,
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=sorted(MODES), default=None, help="default: gpu if CUDA is available, else cpu")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "runs", "gpu_smoke"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    return run_smoke(args.mode, args.out_dir, args.seed)


if __name__ == "__main__":
    sys.exit(main())

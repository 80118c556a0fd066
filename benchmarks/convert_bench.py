#!/usr/bin/env python
"""Conversion cost on a synthetic ≥1B-parameter Qwen2 checkpoint: wall time and peak RSS of each CLI run.

    python benchmarks/convert_bench.py [--hidden 2048 --layers 16 --ffn 11008 --tp 2 --workdir /tmp/convert_bench]

Writes random bf16 tensors shard by shard (never the whole model in memory), then times
``hf-to-megatron --tp T`` and ``megatron-to-hf`` as separate processes (peak RSS from ``os.wait4``'s rusage of
each child) and checks the round trip is bitwise exact. Everything under --workdir is deleted at the end
unless --keep. Note: the files were just written, so reads mostly come from the page cache.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_simko.checkpoint.safetensors_io import ShardedWriter  # noqa: E402
from megatron_simko.checkpoint.verify import compare_hf_dirs  # noqa: E402
from megatron_simko.models import hf_mapping as hm  # noqa: E402
from megatron_simko.models.gpt import arch_from_hf_config  # noqa: E402


def synth_config(args) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": args.hidden,
        "num_hidden_layers": args.layers, "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
        "intermediate_size": args.ffn, "vocab_size": args.vocab, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": args.tied, "hidden_act": "silu",
        "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645,
    }


def synthesize(hf_dir: str, cfg: dict, shard_bytes: int) -> int:
    """Random bf16 weights written shard by shard; returns the parameter count."""
    os.makedirs(hf_dir, exist_ok=True)
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    arch = arch_from_hf_config(cfg)
    writer = ShardedWriter(hf_dir, shard_bytes)
    gen = torch.Generator().manual_seed(0)
    n = 0
    for name in hm.hf_tensor_names(arch):
        shape = hm.hf_shape(name, arch)
        t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        writer.add(name, t)
        n += t.numel()
    writer.close()
    return n


def run_measured(cmd) -> tuple:
    """(wall seconds, peak RSS GiB) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd} failed with status {status}")
    return wall, usage.ru_maxrss / 1024 ** 2  # ru_maxrss is KiB on Linux


def dir_gib(path: str) -> float:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total / 1024 ** 3


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False,
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--tied", action="store_true")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--workdir", default="/tmp/convert_bench")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    hf, meg, back = (os.path.join(args.workdir, d) for d in ("hf", "meg", "hf_back"))
    if os.path.exists(args.workdir):
        shutil.rmtree(args.workdir)
    try:
        t0 = time.perf_counter()
        params = synthesize(hf, synth_config(args), 2 * 1024 ** 3)
        synth_s = time.perf_counter() - t0
        cli = [sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py")]
        rows = [("synthesize HF (bf16)", synth_s, float("nan"), dir_gib(hf))]
        w, rss = run_measured(cli + ["hf-to-megatron", "--hf-dir", hf, "--out-dir", meg, "--tp", str(args.tp),
                                     "--pp", str(args.pp), "--no-progress"])
        rows.append((f"hf-to-megatron tp={args.tp} pp={args.pp}", w, rss, dir_gib(meg)))
        w, rss = run_measured(cli + ["megatron-to-hf", "--megatron-dir", meg, "--out-dir", back, "--no-progress"])
        rows.append(("megatron-to-hf", w, rss, dir_gib(back)))
        t0 = time.perf_counter()
        ok, detail = compare_hf_dirs(hf, back)
        rows.append(("bitwise compare", time.perf_counter() - t0, float("nan"), float("nan")))

        print(f"\nmodel: Qwen2 hidden={args.hidden} layers={args.layers} ffn={args.ffn} vocab={args.vocab} "
              f"tied={args.tied}: {params / 1e9:.3f} B parameters, bf16; {os.cpu_count()} CPU cores")
        print(f"{'step':<28} {'wall s':>8} {'peak RSS GiB':>13} {'output GiB':>11}")
        for name, wall, rss, size in rows:
            print(f"{name:<28} {wall:>8.1f} {rss:>13.2f} {size:>11.2f}")
        print(f"round trip: {'bitwise identical' if ok else 'MISMATCH'} ({detail})")
        if not ok:
            raise SystemExit(1)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

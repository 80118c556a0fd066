#!/usr/bin/env python
"""Hugging Face <-> Megatron checkpoint conversion and its round-trip verifier.

    python tools/convert_checkpoint.py hf-to-megatron --hf-dir HF --out-dir MEG --tp T --pp P
    python tools/convert_checkpoint.py megatron-to-hf --megatron-dir MEG --out-dir HF2 [--hf-config-from HF]
    python tools/convert_checkpoint.py verify --hf-dir HF [--tp T --pp P]

See docs/checkpoint_conversion.md. Exit status: 0 success, 1 verification mismatch, 2 bad input.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _shard_bytes(text: str) -> int:
    units = {"k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}
    t = text.strip().lower().rstrip("b")
    return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(allow_abbrev=False,
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
        p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                       help="cast the weights (default: keep the source dtype)")
        p.add_argument("--allow-lossy", action="store_true", help="permit a --dtype cast that loses information")
        p.add_argument("--max-shard-size", type=_shard_bytes, default="2GB", help="per safetensors file (2GB)")
        p.add_argument("--no-progress", action="store_true")

    h2m = sub.add_parser("hf-to-megatron", allow_abbrev=False,
                         help="HF safetensors directory -> native Megatron checkpoint")
    h2m.add_argument("--hf-dir", required=True)
    h2m.add_argument("--out-dir", required=True)
    h2m.add_argument("--tp", type=int, default=1)
    h2m.add_argument("--pp", type=int, default=1)
    common(h2m)

    m2h = sub.add_parser("megatron-to-hf", allow_abbrev=False, help="native Megatron checkpoint -> HF directory")
    m2h.add_argument("--megatron-dir", required=True)
    m2h.add_argument("--out-dir", required=True)
    m2h.add_argument("--hf-config-from", default=None,
                     help="HF directory to take config/tokenizer/generation files from "
                          "(default: the source directory recorded in the checkpoint, if it still exists)")
    common(m2h)

    ver = sub.add_parser("verify", allow_abbrev=False,
                         help="round trip HF -> Megatron -> HF (bitwise) + logits vs transformers")
    ver.add_argument("--hf-dir", required=True)
    ver.add_argument("--tp", type=int, default=1)
    ver.add_argument("--pp", type=int, default=1)
    ver.add_argument("--work-dir", default=None, help="keep intermediate checkpoints here (default: a temp dir)")
    ver.add_argument("--tolerance", type=float, default=1e-5)
    ver.add_argument("--progress", action="store_true")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_simko.checkpoint import convert
    from megatron_simko.checkpoint.safetensors_io import CheckpointError

    try:
        if args.command == "hf-to-megatron":
            meta = convert.hf_to_megatron(args.hf_dir, args.out_dir, args.tp, args.pp, dtype=args.dtype,
                                          allow_lossy=args.allow_lossy, force=args.force,
                                          max_shard_bytes=args.max_shard_size, progress=not args.no_progress)
            print(f"wrote {args.out_dir}: {meta.arch.hf_architecture} tp={meta.tp} pp={meta.pp} "
                  f"dtype={meta.dtype} padded_vocab={meta.padded_vocab_size}")
        elif args.command == "megatron-to-hf":
            weight_map = convert.megatron_to_hf(args.megatron_dir, args.out_dir, args.hf_config_from,
                                                dtype=args.dtype, allow_lossy=args.allow_lossy, force=args.force,
                                                max_shard_bytes=args.max_shard_size, progress=not args.no_progress)
            print(f"wrote {args.out_dir}: {len(weight_map)} tensors in {len(set(weight_map.values()))} shard(s)")
        else:
            from megatron_simko.checkpoint.verify import verify

            ok, _ = verify(args.hf_dir, args.tp, args.pp, work_dir=args.work_dir, keep=args.work_dir is not None,
                           tolerance=args.tolerance, progress=args.progress)
            print("verify: PASS" if ok else "verify: FAIL")
            return 0 if ok else 1
    except (ValueError, CheckpointError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

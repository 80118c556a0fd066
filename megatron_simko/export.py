"""Hugging Face export of trained weights, for evaluation and serving (vLLM, transformers).

Two entry points, both through the one mapping package (``models/hf_mapping/``):

* :func:`export_live_model` — collective, at the end of training: the live TP/PP shards are gathered exactly as
  for the vLLM weight sync (``MegatronToEngineSync.iter_hf_tensors``) and global rank 0 writes the directory.
* ``python -m megatron_simko.export --checkpoint ROOT [--step N] --hf-dir HF --out-dir OUT`` — any training
  checkpoint (megatron-core ``dist_checkpointing``, saved at any TP/PP) loaded at TP = PP = 1 in one process
  and written as a Hugging Face directory. Needs the model in host memory once.

Output: safetensors shards + index, ``config.json`` (the original's, dtype updated), tokenizer and generation
files copied from the original Hugging Face directory; written to ``OUT.tmp-<pid>`` and renamed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterable, Optional, Tuple

import torch

from megatron_simko.checkpoint.convert import _copy_side_files, atomic_output_dir, dtype_str
from megatron_simko.checkpoint.safetensors_io import ShardedWriter
from megatron_simko.models.gpt import load_hf_config


def write_hf_dir(named_tensors: Iterable[Tuple[str, torch.Tensor]], out_dir: str, hf_dir: str,
                 force: bool = False) -> str:
    """Write ``(hf_name, tensor)`` pairs plus the original's config / tokenizer files as a HF model directory."""
    with atomic_output_dir(out_dir, force=force, protect=[hf_dir]) as tmp:
        writer = ShardedWriter(tmp)
        dtype = None
        for name, tensor in named_tensors:
            dtype = dtype or tensor.dtype
            writer.add(name, tensor.detach().to("cpu").contiguous())
        writer.close()
        _copy_side_files(hf_dir, tmp)
        cfg = load_hf_config(hf_dir)
        cfg["dtype" if "dtype" in cfg else "torch_dtype"] = dtype_str(dtype or torch.float32)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
    return out_dir


def export_live_model(sync, out_dir: str, hf_dir: str, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Collective over all ranks: gather the trained weights (HF names and layouts); rank 0 writes ``out_dir``."""
    import torch.distributed as dist

    tensors = sync.iter_hf_tensors(dtype)
    if dist.is_initialized() and dist.get_rank() != 0:
        for _ in tensors:  # take part in the gathers
            pass
        dist.barrier()
        return None
    write_hf_dir(tensors, out_dir, hf_dir, force=True)
    if dist.is_initialized():
        dist.barrier()
    return out_dir


def export_checkpoint(checkpoint_root: str, hf_dir: str, out_dir: str, step: Optional[int] = None,
                      force: bool = False) -> str:
    """One process: load a training checkpoint at TP = PP = 1 (dist_checkpointing reshards) and write HF."""
    from megatron_simko.models import hf_mapping as hm
    from megatron_simko.models.gpt import arch_from_hf_config
    from megatron_simko.parallel import destroy_parallel, initialize_parallel
    from megatron_simko.trainer.checkpointing import load_checkpoint
    from megatron_simko.trainer.model import build_model_chunks, trainer_transformer_config

    arch = arch_from_hf_config(hf_dir)
    initialize_parallel(1, 1)
    try:
        chunks = build_model_chunks(arch, trainer_transformer_config(arch))
        loaded = load_checkpoint(checkpoint_root, chunks, step=step, load_optimizer=False, load_rng=False)
        print(f"loaded step {loaded.step} (saved at layout {loaded.saved_layout})")

        def tensors():
            for name, _, param in hm.global_named_parameters(chunks[0]):
                if name == "output_layer.weight" and arch.tie_word_embeddings:
                    continue
                yield from hm.megatron_to_hf(name, param.detach(), arch)

        return write_hf_dir(tensors(), out_dir, hf_dir, force=force)
    finally:
        destroy_parallel()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False,
                                prog="python -m megatron_simko.export", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint root (<train.log_dir>/checkpoints)")
    p.add_argument("--step", type=int, default=None, help="step to export (default: latest)")
    p.add_argument("--hf-dir", required=True, help="the original Hugging Face directory (config, tokenizer)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--force", action="store_true", help="replace a non-empty --out-dir")
    args = p.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.hf_dir, args.out_dir, args.step, args.force)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

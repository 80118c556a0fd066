"""HF <-> native Megatron checkpoint conversion, streamed one parameter at a time.

Memory stays at about one parameter's HF tensors plus the shard buffers (bounded by ``max_shard_bytes`` in all),
so a 7B model converts in a few GiB. Output goes to ``OUT.tmp-<pid>`` and is renamed to ``OUT`` only when
complete: an interrupted run leaves no half checkpoint behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Dict, Iterator, List, Optional

import torch
from tqdm.auto import tqdm

from megatron_simko.checkpoint.native import (
    CheckpointMeta,
    NativeCheckpoint,
    rank_dir_name,
    stage_of,
    write_meta,
)
from megatron_simko.checkpoint.safetensors_io import (
    DTYPE_NAMES,
    CheckpointError,
    SafetensorsDir,
    ShardedWriter,
    WriterPool,
)
from megatron_simko.models import hf_mapping as hm
from megatron_simko.models.gpt import (
    ModelArch,
    arch_from_hf_config,
    load_hf_config,
    padded_vocab_size,
    validate_parallelism,
)

DEFAULT_MAX_SHARD_BYTES = 2 * 1024 ** 3
IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq",)  # recomputed buffers some old Llama checkpoints carry
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")

_DTYPE_ALIASES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}
# (from, to) casts that keep every value exactly.
_LOSSLESS = {(torch.bfloat16, torch.float32), (torch.float16, torch.float32)}


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name.lower() not in _DTYPE_ALIASES:
        raise ValueError(f"unknown dtype {name!r}: choose one of {sorted(_DTYPE_ALIASES)}")
    return _DTYPE_ALIASES[name.lower()]


def dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def needs_value_check(src: torch.dtype, dst: Optional[torch.dtype], allow_lossy: bool) -> bool:
    """True when a cast may change values (narrower type) and the caller did not allow that."""
    return not (dst is None or src == dst or (src, dst) in _LOSSLESS or allow_lossy)


def cast_exactly(tensor: torch.Tensor, dst: Optional[torch.dtype], allow_lossy: bool, what: str) -> torch.Tensor:
    """``tensor.to(dst)``, refusing (ValueError) a cast that changes any value unless ``allow_lossy``.

    Narrowing is judged by value, not by type: fp32 weights that came from bf16 go back to bf16 exactly.
    """
    if dst is None or tensor.dtype == dst:
        return tensor
    out = tensor.to(dst)
    if needs_value_check(tensor.dtype, dst, allow_lossy) and not torch.equal(out.to(tensor.dtype), tensor):
        raise ValueError(f"casting {what} from {dtype_str(tensor.dtype)} to {dtype_str(dst)} changes its values; "
                         f"pass --allow-lossy to do it anyway")
    return out


@contextlib.contextmanager
def atomic_output_dir(out_dir: str, force: bool = False, protect: Optional[List[str]] = None) -> Iterator[str]:
    """Yield ``OUT.tmp-<pid>``; on success replace ``out_dir`` with it, on any failure delete it."""
    out_dir = os.path.abspath(out_dir.rstrip("/"))
    for p in protect or []:
        p = os.path.abspath(p)
        if out_dir == p or p.startswith(out_dir + os.sep):
            raise ValueError(f"output directory {out_dir!r} would overwrite the input {p!r}")
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise FileExistsError(f"output path {out_dir!r} exists and is not a directory")
        if os.listdir(out_dir) and not force:
            raise FileExistsError(f"output directory {out_dir!r} exists and is not empty; pass --force to replace it")
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(out_dir):
        old = f"{out_dir}.old-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _hf_dtype(src: SafetensorsDir, names) -> torch.dtype:
    dtypes = {src.info(n).dtype for n in names}
    if len(dtypes) != 1:
        raise ValueError(f"tensors {list(names)} have different dtypes {dtypes}; pass --dtype to unify them")
    return dtypes.pop()


def check_hf_tensors(src: SafetensorsDir, arch: ModelArch) -> Dict[str, List[str]]:
    """The HF checkpoint has exactly the tensors (and shapes) this architecture needs; returns kept/dropped names."""
    expected = hm.hf_tensor_names(arch)
    present = src.names()
    allowed_extra = {"lm_head.weight"} if arch.tie_word_embeddings else set()
    missing = [n for n in expected if n not in src]
    dropped = [n for n in present if n.endswith(IGNORED_HF_SUFFIXES)]
    unexpected = [n for n in present if n not in expected and n not in allowed_extra and n not in dropped]
    if missing:
        raise CheckpointError(f"{src.directory}: {len(missing)} tensor(s) missing, e.g. {missing[:4]}")
    if unexpected:
        raise CheckpointError(f"{src.directory}: tensor(s) the {arch.family} mapping does not know: {unexpected[:6]}"
                              " (unsupported architecture variant?)")
    for n in present:
        if n in dropped:
            continue
        want = hm.hf_shape("model.embed_tokens.weight" if n == "lm_head.weight" else n, arch)
        if tuple(src.info(n).shape) != want:
            raise CheckpointError(f"{src.directory}: tensor {n!r} has shape {src.info(n).shape}, config implies {want}")
    kept = [n for n in present if n not in dropped]
    return {"kept": kept, "dropped": dropped}


def hf_to_megatron(hf_dir: str, out_dir: str, tp: int = 1, pp: int = 1, dtype: Optional[str] = None,
                   allow_lossy: bool = False, force: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                   progress: bool = True) -> CheckpointMeta:
    """Convert a Hugging Face checkpoint directory into a native checkpoint at ``tp``×``pp``."""
    arch = arch_from_hf_config(hf_dir)
    validate_parallelism(arch, tp, pp)
    target = parse_dtype(dtype)
    src = SafetensorsDir(hf_dir)
    names = check_hf_tensors(src, arch)
    vpad = padded_vocab_size(arch.vocab_size, tp)
    mappings = hm.param_mappings(arch, include_tied_output=arch.tie_word_embeddings and pp > 1)
    total = sum(src.info(h).end - src.info(h).begin for pm in mappings for h in pm.hf_names)

    with atomic_output_dir(out_dir, force, protect=[hf_dir]) as tmp:
        pool = WriterPool(max_shard_bytes)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"hf-to-megatron tp={tp} pp={pp}",
                   disable=not progress)
        out_dtype = None
        for pm in mappings:
            src_dtype = _hf_dtype(src, pm.hf_names)
            cast = target or src_dtype
            out_dtype = out_dtype or cast
            hf = {h: cast_exactly(src.read(h), cast, allow_lossy, h) for h in pm.hf_names}  # full, one param
            stage = stage_of(pm.megatron_name, arch, pp)
            for r in range(tp):
                shard = hm.hf_to_megatron(pm.megatron_name, hf, arch, r, tp, padded_vocab=vpad)
                d = os.path.join(tmp, rank_dir_name(r, stage))
                pool.add((r, stage), lambda d=d: ShardedWriter(d, max_shard_bytes), pm.megatron_name, shard)
            bar.update(sum(src.info(h).end - src.info(h).begin for h in pm.hf_names))
            del hf
        pool.close()
        bar.close()
        for p in range(pp):  # every rank directory exists, even a (hypothetical) empty one
            for r in range(tp):
                os.makedirs(os.path.join(tmp, rank_dir_name(r, p)), exist_ok=True)
        meta = CheckpointMeta(
            arch=arch, hf_config=load_hf_config(hf_dir), tp=tp, pp=pp, padded_vocab_size=vpad,
            dtype=dtype_str(target or out_dtype), hf_tensor_names=names["kept"],
            hf_tensor_dtypes={n: DTYPE_NAMES[src.info(n).dtype] for n in names["kept"]},
            source_hf_dir=os.path.abspath(hf_dir),
            extra={"dropped_hf_tensors": names["dropped"]} if names["dropped"] else None,
        )
        write_meta(tmp, meta)
    return meta


def _copy_side_files(source_dir: Optional[str], out_dir: str) -> List[str]:
    """Tokenizer, generation config and other small non-weight files of the original HF directory."""
    copied = []
    if not source_dir or not os.path.isdir(source_dir):
        return copied
    for fn in sorted(os.listdir(source_dir)):
        path = os.path.join(source_dir, fn)
        if not os.path.isfile(path) or fn.endswith(WEIGHT_SUFFIXES) or fn.endswith(".index.json") \
                or fn == "config.json":
            continue
        shutil.copy2(path, os.path.join(out_dir, fn))
        copied.append(fn)
    return copied


def _write_config(meta: CheckpointMeta, source_dir: Optional[str], out_dir: str, out_dtype: str) -> None:
    cfg = dict(meta.hf_config)
    if source_dir and os.path.isfile(os.path.join(source_dir, "config.json")):
        cfg = load_hf_config(source_dir)
        if arch_from_hf_config(cfg) != meta.arch:
            raise ValueError(f"{source_dir}/config.json describes another architecture than the checkpoint")
    key = "dtype" if "dtype" in cfg else "torch_dtype"
    cfg[key] = out_dtype
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    if not os.path.isfile(os.path.join(out_dir, "generation_config.json")):
        gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
        with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({**gen, "_from_model_config": True}, f, indent=2)


def megatron_to_hf(meg_dir: str, out_dir: str, hf_config_from: Optional[str] = None, dtype: Optional[str] = None,
                   allow_lossy: bool = False, force: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                   progress: bool = True) -> Dict[str, str]:
    """Convert a native checkpoint back to a Hugging Face directory (the original tensor set, padding removed)."""
    ckpt = NativeCheckpoint(meg_dir)
    meta, arch = ckpt.meta, ckpt.arch
    target = parse_dtype(dtype)
    wanted = list(meta.hf_tensor_names)
    source_dir = hf_config_from or meta.source_hf_dir
    if hf_config_from and not os.path.isdir(hf_config_from):
        raise FileNotFoundError(f"--hf-config-from {hf_config_from!r} is not a directory")
    mappings = hm.param_mappings(arch)
    with atomic_output_dir(out_dir, force, protect=[meg_dir] + ([hf_config_from] if hf_config_from else [])) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes)
        written: set = set()
        out_dtype = None
        for pm in tqdm(mappings, desc=f"megatron-to-hf (tp={meta.tp} pp={meta.pp})", unit="param",
                       disable=not progress):
            shards = ckpt.shards(pm.megatron_name)
            for hf_name, tensor in hm.megatron_to_hf(pm.megatron_name, shards, arch):
                tensor = cast_exactly(tensor, target, allow_lossy, hf_name)
                out_dtype = out_dtype or tensor.dtype
                writer.add(hf_name, tensor)
                written.add(hf_name)
                if hf_name == "model.embed_tokens.weight" and arch.tie_word_embeddings and "lm_head.weight" in wanted:
                    writer.add("lm_head.weight", tensor.clone())  # the original stored the tied head explicitly
                    written.add("lm_head.weight")
            del shards
        if set(written) != set(wanted):
            raise CheckpointError(f"tensor set differs from the original: missing {sorted(set(wanted) - set(written))},"
                                  f" extra {sorted(set(written) - set(wanted))}")
        weight_map = writer.close()
        copied = _copy_side_files(source_dir, tmp)
        if "config.json" in copied:
            copied.remove("config.json")
        _write_config(meta, source_dir, tmp, dtype_str(out_dtype))
    return weight_map

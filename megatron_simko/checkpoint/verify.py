"""Round-trip verifier: HF -> Megatron -> HF is bitwise exact, and Megatron's logits equal transformers'.

For TP=1/PP=1 and for the requested TP/PP:
  1. convert HF -> native -> HF in a scratch directory and compare every tensor with the original
     (same names, dtypes, shapes, bytes);
  2. in one launch per layout (torchrun with TP·PP processes, gloo on CPU), load the native checkpoint into a
     megatron-core GPTModel in fp32 and compare its logits on fixed tokens with transformers' fp32 logits.
At the requested layout the same launch also loads the TP=1 checkpoint (re-split on load) and the HF directory
directly (sliced reads), so all three loaders are checked. A results table is printed; ``ok`` is False on any
mismatch.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import List, Optional, Tuple

import torch

from megatron_simko.checkpoint import convert
from megatron_simko.checkpoint.safetensors_io import SafetensorsDir
from megatron_simko.models.gpt import arch_from_hf_config, validate_parallelism
from megatron_simko.parallel.initialize import free_port

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOGITS_TOLERANCE = 1e-5

Row = Tuple[str, str, bool, str]  # (check, layout, ok, detail)


def compare_hf_dirs(original: str, roundtrip: str, ignore: Tuple[str, ...] = ()) -> Tuple[bool, str]:
    """Same tensor names, dtypes, shapes and bytes, read one tensor at a time."""
    a, b = SafetensorsDir(original), SafetensorsDir(roundtrip)
    names_a = {n for n in a.names() if n not in ignore}
    names_b = set(b.names())
    if names_a != names_b:
        return False, f"names differ: missing {sorted(names_a - names_b)[:4]}, extra {sorted(names_b - names_a)[:4]}"
    bad = []
    for n in sorted(names_a):
        ia, ib = a.info(n), b.info(n)
        if ia.dtype != ib.dtype or ia.shape != ib.shape:
            bad.append(f"{n}: {ia.dtype}{list(ia.shape)} vs {ib.dtype}{list(ib.shape)}")
        elif not torch.equal(a.read(n).reshape(-1).view(torch.uint8), b.read(n).reshape(-1).view(torch.uint8)):
            bad.append(f"{n}: values differ")
    if bad:
        return False, f"{len(bad)} tensor(s) differ, e.g. {bad[:3]}"
    return True, f"{len(names_a)} tensors bitwise identical"


def reference_logits(hf_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' fp32 logits [B, S, V]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(tokens).logits.float()
    del model
    return logits


def reference_tokens(vocab_size: int, batch: int = 2, seq_len: int = 16) -> torch.Tensor:
    """Fixed pseudo-random token ids [B, S]."""
    return torch.randint(0, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))


def save_reference(hf_dir: str, path: str, batch: int = 2, seq_len: int = 16) -> torch.Tensor:
    """Write ``{"tokens", "logits"}`` (transformers, fp32) for the logits worker; returns the logits."""
    tokens = reference_tokens(arch_from_hf_config(hf_dir).vocab_size, batch, seq_len)
    logits = reference_logits(hf_dir, tokens)
    torch.save({"tokens": tokens, "logits": logits}, path)
    return logits


def run_logits_worker(tp: int, pp: int, checks: List[str], ref_path, result_path: str,
                      timeout: float = 900) -> list:
    """Launch ``verify_worker`` on tp·pp processes (plain python for one) and return its result list."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    n = tp * pp
    if n > 1:
        env.setdefault("OMP_NUM_THREADS", "1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
               "--master-port", str(free_port()), "-m", "megatron_simko.checkpoint.verify_worker"]
    else:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        cmd = [sys.executable, "-m", "megatron_simko.checkpoint.verify_worker"]
    cmd += ["--tp", str(tp), "--pp", str(pp), "--result", result_path]
    for ref in [ref_path] if isinstance(ref_path, str) else ref_path:  # one for all checks, or one per check
        cmd += ["--ref", ref]
    for c in checks:
        cmd += ["--check", c]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not os.path.isfile(result_path):
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"logits worker (tp={tp}, pp={pp}) failed with exit {proc.returncode}:\n{tail}")
    with open(result_path, encoding="utf-8") as f:
        return json.load(f)


def print_table(rows: List[Row], file=None) -> None:
    file = file or sys.stdout
    widths = [max(len(r[i]) for r in rows + [("check", "layout", True, "detail")]) for i in (0, 1)]
    print(f"{'check':<{widths[0]}}  {'layout':<{widths[1]}}  result    detail", file=file)
    print("-" * (widths[0] + widths[1] + 60), file=file)
    for check, layout, ok, detail in rows:
        print(f"{check:<{widths[0]}}  {layout:<{widths[1]}}  {'OK' if ok else 'MISMATCH':<8}  {detail}", file=file)


def verify(hf_dir: str, tp: int = 1, pp: int = 1, work_dir: Optional[str] = None, keep: bool = False,
           tolerance: float = LOGITS_TOLERANCE, batch: int = 2, seq_len: int = 16, progress: bool = False,
           print_rows: bool = True) -> Tuple[bool, List[Row]]:
    """Run all checks; returns (all passed, table rows)."""
    arch = arch_from_hf_config(hf_dir)
    validate_parallelism(arch, tp, pp)
    layouts = [(1, 1)] + ([(tp, pp)] if (tp, pp) != (1, 1) else [])
    scratch = work_dir or tempfile.mkdtemp(prefix="convert-verify-")
    os.makedirs(scratch, exist_ok=True)
    rows: List[Row] = []
    try:
        dropped = ()
        for t, p in layouts:
            meg = os.path.join(scratch, f"meg_tp{t}_pp{p}")
            back = os.path.join(scratch, f"hf_tp{t}_pp{p}")
            meta = convert.hf_to_megatron(hf_dir, meg, t, p, force=True, progress=progress)
            dropped = tuple((meta.extra or {}).get("dropped_hf_tensors", []))
            convert.megatron_to_hf(meg, back, force=True, progress=progress)
            ok, detail = compare_hf_dirs(hf_dir, back, ignore=dropped)
            rows.append(("HF -> Megatron -> HF tensors", f"tp={t} pp={p}", ok, detail))

        ref_path = os.path.join(scratch, "reference_logits.pt")
        ref = save_reference(hf_dir, ref_path, batch, seq_len)
        tokens = reference_tokens(arch.vocab_size, batch, seq_len)
        again = reference_logits(os.path.join(scratch, "hf_tp1_pp1"), tokens)
        same = torch.equal(ref, again)
        rows.append(("transformers loads round-tripped HF", "tp=1 pp=1", same,
                     "logits identical to the original's" if same else
                     f"logits differ by {(ref - again).abs().max().item():.3g}"))

        for t, p in layouts:
            checks = [f"native:{os.path.join(scratch, f'meg_tp{t}_pp{p}')}"]
            if (t, p) != (1, 1):
                checks += [f"native:{os.path.join(scratch, 'meg_tp1_pp1')}", f"hf:{hf_dir}"]
            result_path = os.path.join(scratch, f"logits_tp{t}_pp{p}.json")
            for r in run_logits_worker(t, p, checks, ref_path, result_path):
                diff = r["max_abs_diff"]
                ok = diff is not None and diff <= tolerance  # NaN fails
                source = "HF dir (sliced reads)" if r["check"] == "hf" else \
                    f"native tp={r['source_tp']} pp={r['source_pp']}"
                rows.append(("logits vs transformers (fp32)", f"tp={t} pp={p}", ok,
                             f"max|diff| {diff:.3g} (tol {tolerance:g}), loaded from {source}"))
    finally:
        if not keep and work_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    if print_rows:
        print_table(rows)
    return all(r[2] for r in rows), rows

#!/usr/bin/env python
"""The RL loop end to end on one device, checked: the GPU smoke run (``bash tools/gpu_smoke.sh``).

    python tools/gpu_smoke.py [--mode gpu|cpu] [--out-dir DIR]      # gpu: default when CUDA is available

1. data: procedural one-digit sums ("Calculate: 3 + 5 ="), gold answers, math reward (math-verify) — written as
   jsonl, no dataset download and no reasoning-gym needed;
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
6. a table per step (time by phase, tokens/s, peak memory, loss, mismatch, ...) and the checks; exit 1 if any
   check fails.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MODES = {
    # Qwen2.5-0.5B's layer shape with 8 of its 24 layers; its vocabulary rows (151,936).
    "gpu": dict(model=dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=8,
                           num_attention_heads=14, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                           max_position_embeddings=2048),
                dtype="bf16", save_dtype="bfloat16", sft=dict(steps=400, batch_size=32, lr=5e-4, target=0.15),
                rl=dict(prompts=16, n=8, max_response=48, lr=2e-6, micro_batch_tokens=8192),
                mismatch_bound=0.1),  # bf16 trainer vs bf16 engine: round-off of two implementations
    "cpu": dict(model=dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False,
                           max_position_embeddings=1024),
                dtype="fp32", save_dtype="float32", sft=dict(steps=500, batch_size=16, lr=3e-3, target=0.15),
                rl=dict(prompts=8, n=4, max_response=24, lr=1e-4, micro_batch_tokens=2048),
                mismatch_bound=1e-4),  # fp32: the tests' bound
}
PHASES = ("rollout", "reward", "old_logprob", "train", "sync", "step")


# ------------------------------------------------------------------------------------------------ build
def sum_examples(n: int, seed: int) -> list[dict]:
    """One-digit sums and differences, as prompt rows (data_source "math": the math-verify reward)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, op = rng.randint(0, 9), rng.randint(0, 9), rng.choice("+-")
        rows.append({"prompt": f"Calculate: {a} {op} {b} =", "answer": str(a + b if op == "+" else a - b),
                     "data_source": "math/sums"})
    return rows


def response_text(row: dict) -> str:
    """The SFT target: restate the expression, then the boxed answer (see megatron_simko.models.tiny.response_text)."""
    return f"{row['prompt'].split(':', 1)[1].strip()} \\boxed{{{row['answer']}}}."


def build_tokenizer(model_dir: str, rows: list[dict]):
    """Byte-level BPE on the rendered prompts and targets; EOS <|endoftext|>, ChatML template."""
    from transformers import PreTrainedTokenizerFast

    from megatron_simko.data import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM, render_chatml
    from megatron_simko.data.tokenizer import CHATML_TEMPLATE, train_byte_level_bpe

    texts = [DEFAULT_SYSTEM, DEFAULT_INSTRUCTION] + [t for r in rows for t in (r["prompt"], response_text(r))]
    texts += [render_chatml([{"role": r, "content": "."}]) for r in ("system", "user", "assistant")] * 50
    core = train_byte_level_bpe(texts, 512, SPECIAL_TOKENS)
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                            unk_token=None, additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                            chat_template=CHATML_TEMPLATE, clean_up_tokenization_spaces=False).save_pretrained(model_dir)
    return core


def build_model(model_dir: str, mode: str, core, device: str, seed: int) -> dict:
    """Tokenizer + Qwen2 from a config + SFT warm start, saved as a Hugging Face folder. Returns SFT info."""
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    from megatron_simko.models import tiny
    from megatron_simko.data import PromptExample, render_prompt
    from megatron_simko.data.tokenizer import load_tokenizer

    spec = MODES[mode]
    config = model_config(mode, eos_id=core.token_to_id("<|endoftext|>"))
    config.save_pretrained(model_dir)  # AutoTokenizer reads model_type from it
    tok = load_tokenizer(model_dir)
    im_end = tok.token_to_id("<|im_end|>")
    sample = render_prompt("Calculate: 3 + 5 =", tok) + "3 + 5 = \\boxed{8}."
    if tok.decode(tok.encode(sample)) != sample or len(tok.encode("<|im_end|>")) != 1:
        raise RuntimeError("the locally trained tokenizer does not round-trip its own prompt format")

    def encoded(rows):
        return [(tok.encode(render_prompt(PromptExample(r["prompt"], r["answer"], r["data_source"]), tok)),
                 tok.encode(response_text(r)) + [im_end]) for r in rows]

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float().to(device)  # SFT in fp32 (TF32 matmuls on a GPU)
    sft_cfg = spec["sft"]
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    val = encoded(sum_examples(64, seed + 1))
    info = tiny.sft(model, encoded(sum_examples(2000, seed)), tok.pad_id, sft_cfg["steps"], seed,
                    sft_cfg["batch_size"], sft_cfg["lr"], check=lambda m: tiny.expected_accuracy(m, val, tok.pad_id),
                    target=sft_cfg["target"], log_every=100)
    model.to(getattr(torch, spec["save_dtype"])).save_pretrained(model_dir, safe_serialization=True)
    GenerationConfig(eos_token_id=tok.eos_id, pad_token_id=tok.pad_id).save_pretrained(model_dir)
    info["parameters"] = sum(p.numel() for p in model.parameters())
    return info


def model_config(mode: str, eos_id: int = 0):
    """The smoke run's Qwen2Config (``MODES[mode]['model']``)."""
    from transformers import Qwen2Config

    spec = MODES[mode]
    return Qwen2Config(**spec["model"], hidden_act="silu", rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, use_sliding_window=False,
                       attention_dropout=0.0, dtype=spec["save_dtype"], architectures=["Qwen2ForCausalLM"],
                       eos_token_id=eos_id, pad_token_id=eos_id, bos_token_id=None)


def write_run_config(path: str, mode: str, out: str) -> None:
    import yaml

    rl = MODES[mode]["rl"]
    cfg = {
        "model": {"hf_dir": os.path.join(out, "model"), "dtype": MODES[mode]["dtype"]},
        "parallel": {"tensor_parallel": 1},
        "loss": {"mode": "simko", "top_k": 3, "alpha": 0.01, "lam": 1.1, "tau": 0.8},
        "optimizer": {"lr": rl["lr"], "grad_clip": 1.0},
        "rollout": {"backend": "transformers", "n_samples": rl["n"], "temperature": 1.0,
                    "max_prompt_length": 128, "max_response_length": rl["max_response"]},
        "data": {"train": os.path.join(out, "data", "train.jsonl"), "validation": os.path.join(out, "data", "val.jsonl"),
                 "validation_size": 8, "prompts_per_step": rl["prompts"]},
        "train": {"steps": 3, "mini_batch_size": rl["prompts"] // 2, "micro_batch_tokens": rl["micro_batch_tokens"],
                  "validate_every": 3, "log_dir": os.path.join(out, "run")},
        "checkpoint": {"save_every": 1, "keep_last": 2},
    }
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)


# -------------------------------------------------------------------------------------------------- run
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], log_path: str) -> tuple[int, float, str]:
    """Run a command (PYTHONPATH = the repo), tee its output to log_path; (exit code, seconds, output)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    with open(log_path, "w", encoding="utf-8") as f:
        f.write(proc.stdout + proc.stderr)
    return proc.returncode, time.perf_counter() - t0, proc.stdout + proc.stderr


def train(config: str, overrides: list[str], log_path: str) -> tuple[int, float, str]:
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port",
                str(free_port()), "-m", "megatron_simko.train", "--config", config, *overrides], log_path)


def safetensors_in(directory: str) -> dict:
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


# ------------------------------------------------------------------------------------------------ report
def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and (abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3)):
        return f"{v:.2e}"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def table(rows: list[dict], memory_key: str) -> str:
    cols = [("step", "step")] + [(f"{p} s", f"time/{p}") for p in PHASES] + [
        ("tokens/s", "throughput/tokens_per_s"), ("peak GiB", memory_key), ("loss", "loss/value"),
        ("|Δlogp| mean", "mismatch/mean_abs"), ("|Δlogp| max", "mismatch/max_abs"), ("reward", "reward/mean"),
        ("resp len", "response/length_mean"), ("truncated", "response/truncated_fraction"),
        ("grad norm", "grad_norm"), ("skipped", "optim/skipped_nonfinite_total")]
    cells = [[name for name, _ in cols]] + [[fmt(r.get(key)) for _, key in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False,
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=sorted(MODES), default=None, help="default: gpu if CUDA is available, else cpu")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "runs", "gpu_smoke"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import torch

    mode = args.mode or ("gpu" if torch.cuda.is_available() else "cpu")
    if mode == "gpu" and not torch.cuda.is_available():
        print("error: --mode gpu needs CUDA; use --mode cpu for the reduced run", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out_dir)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, "data"))
    os.makedirs(os.path.join(out, "model"))
    t_start = time.perf_counter()
    checks: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, detail: str = "") -> bool:
        checks.append((name, bool(ok), detail))
        return bool(ok)

    from megatron_simko.data import PromptExample, write_prompt_jsonl

    for split, n, seed in (("train", 2000, args.seed), ("val", 64, args.seed + 1)):
        write_prompt_jsonl(os.path.join(out, "data", f"{split}.jsonl"),
                           [PromptExample(r["prompt"], r["answer"], r["data_source"]) for r in sum_examples(n, seed)])
    print(f"== gpu_smoke ({mode}): {torch.__version__}, "
          + (torch.cuda.get_device_name() if mode == "gpu" else "CPU") + f"; output in {out}", flush=True)
    t0 = time.perf_counter()
    core = build_tokenizer(os.path.join(out, "model"), sum_examples(2000, args.seed))
    sft = build_model(os.path.join(out, "model"), mode, core, "cuda" if mode == "gpu" else "cpu", args.seed)
    build_s = time.perf_counter() - t0
    print(f"== model: {sft['parameters'] / 1e6:.1f} M parameters, vocab {MODES[mode]['model']['vocab_size']}; "
          f"SFT {sft['steps_run']} steps, expected accuracy {sft['stop_accuracy']:.3f}; {build_s:.1f} s", flush=True)
    if mode == "gpu":
        torch.cuda.empty_cache()

    config = os.path.join(out, "smoke.yaml")
    write_run_config(config, mode, out)
    rc1, s1, log1 = train(config, ["train.steps=2", "checkpoint.resume=none"], os.path.join(out, "train_1.log"))
    check("run 1 (steps 1-2, checkpoints) exits 0", rc1 == 0, f"{s1:.1f} s, log {out}/train_1.log")
    rc2, s2, log2 = (1, 0.0, "")
    if rc1 == 0:
        rc2, s2, log2 = train(config, ["train.steps=3", "checkpoint.resume=auto"], os.path.join(out, "train_2.log"))
        check("run 2 resumes from step 2 and runs step 3", rc2 == 0 and "resumed from" in log2 and "at step 2" in log2,
              f"{s2:.1f} s, log {out}/train_2.log")
    for rc, log in ((rc1, log1), (rc2, log2)):
        if rc != 0 and log:
            print(log[-6000:], file=sys.stderr)

    metrics_path = os.path.join(out, "run", "metrics.jsonl")
    rows = []
    if os.path.isfile(metrics_path):
        with open(metrics_path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    memory_key = "memory/peak_allocated_gib" if mode == "gpu" else "memory/peak_rss_gib"
    check("3 steps logged (1, 2 from run 1; 3 resumed)", [r["step"] for r in rows] == [1, 2, 3])
    nonfinite = sorted({k for r in rows for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)})
    check("every logged metric is finite", rows and not nonfinite, ", ".join(nonfinite))
    if rows:
        worst = max(r["mismatch/mean_abs"] for r in rows)
        bound = MODES[mode]["mismatch_bound"]
        check(f"trainer vs engine log-probs: mean |Δ| < {bound}", worst < bound, f"worst {worst:.2e}")
        check("weight sync checksum-verified every step", all(r.get("sync/verified") == 1.0 and
                                                              r.get("sync/mismatched_tensors") == 0.0 for r in rows))
        check("no update skipped for non-finite values", rows[-1].get("optim/skipped_nonfinite_total") == 0.0)
        check("responses stop at <|im_end|> (chat end-of-turn; EOS is <|endoftext|>)",
              min(r["response/truncated_fraction"] for r in rows) < 1.0,
              f"truncated fractions {[round(r['response/truncated_fraction'], 3) for r in rows]}")
        check("validation ran at step 3", "val/pass@1" in rows[-1])

    hf_final = os.path.join(out, "run", "hf_final")
    if rc2 == 0 and os.path.isdir(hf_final):
        offline = os.path.join(out, "hf_from_checkpoint")
        rc3, s3, _ = run([sys.executable, "-m", "megatron_simko.export", "--checkpoint",
                          os.path.join(out, "run", "checkpoints"), "--hf-dir", os.path.join(out, "model"),
                          "--out-dir", offline], os.path.join(out, "export.log"))
        if check("offline export of the step-3 checkpoint exits 0", rc3 == 0, f"{s3:.1f} s"):
            live, off = safetensors_in(hf_final), safetensors_in(offline)
            check("offline export == live export (bitwise)", set(live) == set(off) and all(
                torch.equal(live[k], off[k]) for k in live), f"{len(live)} tensors")
            check("exported weights are finite", all(bool(torch.isfinite(t.float()).all()) for t in live.values()))
            original = safetensors_in(os.path.join(out, "model"))
            check("training changed the weights", any(not torch.equal(live[k], original[k]) for k in live))
            from transformers import AutoModelForCausalLM

            try:
                AutoModelForCausalLM.from_pretrained(hf_final)
                check("the export loads in transformers", True)
            except Exception as e:  # noqa: BLE001 - reported as a failed check
                check("the export loads in transformers", False, f"{type(e).__name__}: {e}")

    print(f"\n== per step ({mode}, {MODES[mode]['dtype']}, TP=1, transformers rollouts; "
          f"{MODES[mode]['rl']['prompts']} prompts × {MODES[mode]['rl']['n']} samples, "
          f"≤ {MODES[mode]['rl']['max_response']} tokens)")
    print(table(rows, memory_key) if rows else "(no metrics)")
    print(f"\nmodel build + SFT {build_s:.1f} s; run 1 {s1:.1f} s; run 2 {s2:.1f} s; "
          f"total {time.perf_counter() - t_start:.1f} s")
    failed = [c for c in checks if not c[1]]
    for name, ok, detail in checks:
        print(f"  [{'ok' if ok else 'FAIL'}] {name}" + (f"  ({detail})" if detail else ""))
    print(f"== gpu_smoke ({mode}): {'FAILED' if failed else 'passed'} "
          f"({len(checks) - len(failed)}/{len(checks)} checks)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

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
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
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
# Seconds per stage (a hang must not eat the device window); the sum stays under the 10-minute device budget.
PREFLIGHT_TIMEOUT = 90  # before the mode is known (importing torch decides it)
STAGE_TIMEOUTS = {"gpu": dict(build=150, run1=150, run2=120, export=60),
                  "cpu": dict(build=300, run1=300, run2=300, export=120)}
# Imports the stages need: (module, distribution for the version, required).
PREFLIGHT = (("torch", "torch", True), ("transformers", "transformers", True), ("megatron.core", "megatron-core", True),
             ("safetensors", "safetensors", True), ("tokenizers", "tokenizers", True), ("yaml", "pyyaml", True),
             ("tensorboard", "tensorboard", True), ("sympy", "sympy", True), ("math_verify", "math-verify", True),
             ("triton", "triton", False))  # triton: the loss's fused kernels on CUDA; without it, the torch backend
# Prompt templates of different token lengths: a rollout batch mixes them, so prompts are left-padded.
TEMPLATES = ("Calculate: {e} =", "Compute the value of this expression: {e} =",
             "Work out the following sum or difference, then give the result: {e} =")


# ------------------------------------------------------------------------------------------------ build
def sum_examples(n: int, seed: int) -> list[dict]:
    """One-digit sums and differences, as prompt rows (data_source "math": the math-verify reward)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, op = rng.randint(0, 9), rng.randint(0, 9), rng.choice("+-")
        rows.append({"prompt": rng.choice(TEMPLATES).format(e=f"{a} {op} {b}"),
                     "answer": str(a + b if op == "+" else a - b), "data_source": "math/sums"})
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


def run(cmd: list[str], log_path: str, timeout: float) -> tuple[int, float, str]:
    """Run a command (PYTHONPATH = the repo) in its own process group, streaming its output line by line to
    stdout and log_path; killed (group) after ``timeout`` s, exit code 124 then. (exit code, seconds, output)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    lines: list[str] = []
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    timed_out = threading.Event()

    def kill():
        timed_out.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout, kill)
    timer.start()
    name = os.path.splitext(os.path.basename(log_path))[0]
    with open(log_path, "w", encoding="utf-8") as f:
        for line in proc.stdout:
            lines.append(line)
            f.write(line)
            f.flush()
            print(f"  [{name}] {line}", end="", flush=True)
    rc = proc.wait()
    timer.cancel()
    if timed_out.is_set():
        rc = 124
        msg = f"[gpu_smoke] {name}: killed after its {timeout:.0f} s stage limit\n"
        lines.append(msg)
        print(msg, end="", flush=True)
    return rc, time.perf_counter() - t0, "".join(lines)


class StageTimeout(Exception):
    pass


def in_process(seconds: float, fn, *args):
    """fn(*args) in this process with a SIGALRM time limit (StageTimeout past it)."""
    def expire(signum, frame):
        raise StageTimeout(f"stage exceeded its {seconds:.0f} s limit")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(max(1, int(seconds)))
    try:
        return fn(*args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def preflight() -> tuple[dict, list[str]]:
    """Import every module the stages need: ({module: version or None}, [missing required modules])."""
    import importlib
    import importlib.metadata

    versions, missing = {}, []
    for module, dist, required in PREFLIGHT:
        try:
            importlib.import_module(module)
            try:
                versions[module] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                versions[module] = "?"
        except Exception as e:  # noqa: BLE001 - reported
            versions[module] = None
            if required:
                missing.append(f"{module} ({type(e).__name__}: {e})")
    return versions, missing


def write_summary(out: str, summary: dict) -> list[str]:
    """summary.json in the output folder and, when $OUT is set, $OUT/gpu_smoke_summary.json (atomic writes)."""
    paths = [os.path.join(out, "summary.json")]
    if os.environ.get("OUT"):
        paths.append(os.path.join(os.environ["OUT"], "gpu_smoke_summary.json"))
    for path in paths:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1, default=str)
        os.replace(path + ".tmp", path)
    return paths


def train(config: str, overrides: list[str], log_path: str, timeout: float) -> tuple[int, float, str]:
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port",
                str(free_port()), "-m", "megatron_simko.train", "--config", config, *overrides], log_path, timeout)


def loss_backend_of(log: str) -> str:
    """The loss backend the trainer reported ("[megatron_simko] loss backend: triton (...)"), or "?"."""
    for line in log.splitlines():
        if "loss backend:" in line:
            return line.split("loss backend:", 1)[1].split()[0]
    return "?"


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
        ("loss backend", "loss_backend"),
        ("|Δlogp| mean", "mismatch/mean_abs"), ("|Δlogp| max", "mismatch/max_abs"), ("reward", "reward/mean"),
        ("resp len", "response/length_mean"), ("truncated", "response/truncated_fraction"),
        ("grad norm", "grad_norm"), ("skipped", "optim/skipped_nonfinite_total")]
    cells = [[name for name, _ in cols]] + [[fmt(r.get(key)) for _, key in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def prompt_lengths(out: str, n: int) -> list[int]:
    """Token lengths of the first n rendered training prompts (the tokenizer the run uses)."""
    from megatron_simko.data import PromptExample, render_prompt
    from megatron_simko.data.tokenizer import load_tokenizer

    tok = load_tokenizer(os.path.join(out, "model"))
    rows = sum_examples(n, 0)
    return [len(tok.encode(render_prompt(PromptExample(r["prompt"], r["answer"], r["data_source"]), tok)))
            for r in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False,
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=sorted(MODES), default=None, help="default: gpu if CUDA is available, else cpu")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "runs", "gpu_smoke"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    checks: list[tuple[str, bool, str]] = []
    stages: dict = {}
    summary: dict = {"checks": [], "stages": stages}

    def check(name: str, ok: bool, detail: str = "") -> bool:
        checks.append((name, bool(ok), detail))
        return bool(ok)

    # 0. pre-flight: before anything slow, every import with its version.
    t0 = time.perf_counter()
    try:
        versions, missing = in_process(PREFLIGHT_TIMEOUT, preflight)
    except StageTimeout as e:
        versions, missing = {}, [f"pre-flight imports: {e}"]
    stages["preflight"] = dict(seconds=round(time.perf_counter() - t0, 1), ok=not missing, limit=PREFLIGHT_TIMEOUT)
    summary["versions"] = versions
    print("== pre-flight: " + ", ".join(f"{m} {v or 'MISSING'}" for m, v in versions.items()), flush=True)
    import torch

    mode = args.mode or ("gpu" if torch.cuda.is_available() else "cpu")
    summary["mode"] = mode
    out = os.path.abspath(args.out_dir)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, "data"))
    os.makedirs(os.path.join(out, "model"))
    if missing or (mode == "gpu" and not torch.cuda.is_available()):
        why = ("missing imports: " + "; ".join(missing)) if missing else "--mode gpu needs CUDA; use --mode cpu"
        print(f"error: {why}", file=sys.stderr)
        summary["error"] = why
        write_summary(out, summary)
        return 2
    from megatron_simko.losses.triton_kernels import resolve_backend

    limits = STAGE_TIMEOUTS[mode]
    device = torch.device("cuda" if mode == "gpu" else "cpu")
    summary["device"] = torch.cuda.get_device_name() if mode == "gpu" else "CPU"
    summary["loss_backend_expected"] = resolve_backend("auto", device, 3)

    from megatron_simko.data import PromptExample, write_prompt_jsonl

    for split, n, seed in (("train", 2000, args.seed), ("val", 64, args.seed + 1)):
        write_prompt_jsonl(os.path.join(out, "data", f"{split}.jsonl"),
                           [PromptExample(r["prompt"], r["answer"], r["data_source"]) for r in sum_examples(n, seed)])
    print(f"== gpu_smoke ({mode}): {summary['device']}; loss backend (loss.backend=auto here): "
          f"{summary['loss_backend_expected']}; output in {out}", flush=True)

    # 1-3. tokenizer + model + SFT warm start, in this process, with a time limit.
    t0 = time.perf_counter()
    sft = None
    try:
        core = build_tokenizer(os.path.join(out, "model"), sum_examples(2000, args.seed))
        sft = in_process(limits["build"], build_model, os.path.join(out, "model"), mode, core, device.type, args.seed)
    except StageTimeout as e:
        check("model build + SFT within its time limit", False, str(e))
    build_s = time.perf_counter() - t0
    stages["build"] = dict(seconds=round(build_s, 1), ok=sft is not None, limit=limits["build"])
    if sft is not None:
        summary["model"] = dict(parameters=sft["parameters"], vocab=MODES[mode]["model"]["vocab_size"],
                                sft_steps=sft["steps_run"], sft_expected_accuracy=sft["stop_accuracy"])
        print(f"== model: {sft['parameters'] / 1e6:.1f} M parameters, vocab {MODES[mode]['model']['vocab_size']}; "
              f"SFT {sft['steps_run']} steps, expected accuracy {sft['stop_accuracy']:.3f}; {build_s:.1f} s", flush=True)
        lengths = prompt_lengths(out, MODES[mode]["rl"]["prompts"])
        check("prompts of different lengths in a rollout batch (left-padded prefill)", len(set(lengths)) > 1,
              f"token lengths {sorted(set(lengths))}")
    if mode == "gpu":
        torch.cuda.empty_cache()

    # 4. RL: two launches (resume between them).
    config = os.path.join(out, "smoke.yaml")
    write_run_config(config, mode, out)
    rc1 = rc2 = 1
    s1 = s2 = 0.0
    log1 = log2 = ""
    if sft is not None:
        rc1, s1, log1 = train(config, ["train.steps=2", "checkpoint.resume=none"], os.path.join(out, "train_1.log"),
                              limits["run1"])
        stages["run1"] = dict(seconds=round(s1, 1), ok=rc1 == 0, exit=rc1, limit=limits["run1"])
        check("run 1 (steps 1-2, checkpoints) exits 0", rc1 == 0, f"{s1:.1f} s, exit {rc1}, log {out}/train_1.log")
    if rc1 == 0:
        rc2, s2, log2 = train(config, ["train.steps=3", "checkpoint.resume=auto"], os.path.join(out, "train_2.log"),
                              limits["run2"])
        stages["run2"] = dict(seconds=round(s2, 1), ok=rc2 == 0, exit=rc2, limit=limits["run2"])
        check("run 2 resumes from step 2 and runs step 3", rc2 == 0 and "resumed from" in log2 and "at step 2" in log2,
              f"{s2:.1f} s, exit {rc2}, log {out}/train_2.log")
    backends = {1: loss_backend_of(log1), 2: loss_backend_of(log1), 3: loss_backend_of(log2)}

    metrics_path = os.path.join(out, "run", "metrics.jsonl")
    rows = []
    if os.path.isfile(metrics_path):
        with open(metrics_path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    for r in rows:
        r["loss_backend"] = backends.get(r.get("step"), "?")
    memory_key = "memory/peak_allocated_gib" if mode == "gpu" else "memory/peak_rss_gib"
    check("3 steps logged (1, 2 from run 1; 3 resumed)", [r["step"] for r in rows] == [1, 2, 3])
    nonfinite = sorted({k for r in rows for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)})
    check("every logged metric is finite", rows and not nonfinite, ", ".join(nonfinite))
    if rows:
        check("the loss backend is reported by every launch", "?" not in {r["loss_backend"] for r in rows},
              f"{sorted({r['loss_backend'] for r in rows})}")
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

    # 5. export.
    hf_final = os.path.join(out, "run", "hf_final")
    if rc2 == 0 and os.path.isdir(hf_final):
        offline = os.path.join(out, "hf_from_checkpoint")
        rc3, s3, _ = run([sys.executable, "-m", "megatron_simko.export", "--checkpoint",
                          os.path.join(out, "run", "checkpoints"), "--hf-dir", os.path.join(out, "model"),
                          "--out-dir", offline], os.path.join(out, "export.log"), limits["export"])
        stages["export"] = dict(seconds=round(s3, 1), ok=rc3 == 0, exit=rc3, limit=limits["export"])
        if check("offline export of the step-3 checkpoint exits 0", rc3 == 0, f"{s3:.1f} s, exit {rc3}"):
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
          f"≤ {MODES[mode]['rl']['max_response']} tokens; peak memory per step)")
    print(table(rows, memory_key) if rows else "(no metrics)")
    print(f"\nmodel build + SFT {build_s:.1f} s; run 1 {s1:.1f} s; run 2 {s2:.1f} s; "
          f"total {time.perf_counter() - t_start:.1f} s")
    failed = [c for c in checks if not c[1]]
    for name, ok, detail in checks:
        print(f"  [{'ok' if ok else 'FAIL'}] {name}" + (f"  ({detail})" if detail else ""))
    summary.update(rows=rows, checks=[dict(name=n, ok=ok, detail=d) for n, ok, d in checks],
                   passed=not failed, seconds=round(time.perf_counter() - t_start, 1))
    paths = write_summary(out, summary)
    print(f"== gpu_smoke ({mode}): {'FAILED' if failed else 'passed'} "
          f"({len(checks) - len(failed)}/{len(checks)} checks); summary {', '.join(paths)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""One RL step, side by side: this trainer in its layouts and rollout backends, and TRL's GRPOTrainer, on one
workload, each system in its own process(es), one after the other (issue 22).

    python benchmarks/rl_step_bench.py [--systems trl,tp1_transformers,tp1_vllm,tp2_vllm] [--steps 12]
        [--repeats 3] [--threads 2] [--work-dir runs/rl_step_bench] [--out results.json] [--model-dir DIR]
        [--trl-python PY]

Workload: the quickstart's tiny model (tools/make_tiny_model.py with the quickstart's arguments, built once in
<work-dir>/model unless --model-dir), reasoning-gym chain_sum as in examples/configs/quickstart.yaml; per RL step
16 prompts × 8 samples, ≤ 32 new tokens, temperature 1, then 2 optimizer steps of 8 prompts each with the GRPO
loss (token mean, clip ε = 0.2, no KL term), Adam lr 1e-4 constant, gradient clipping 1.0. Every process gets
OMP_NUM_THREADS = --threads / its process count. Each number is the median over steps 3..--steps.

Repeats: the systems run --repeats times, one pass after another, each pass starting one system later in the
list (so a slow drift of the machine's speed does not always land on the same system). A shared 2-core VM's
speed moves by tens of percent over minutes (measured: the matmul peak 100 vs 203 GFLOP/s ten minutes apart), so
one pass does not rank anything close. The table gives per system the median over passes of every column, and
the ratio to TRL as the median of the passes' own ratios (each against TRL's run in the same pass); the per-pass
ratios are printed under it and every pass is in --out.

- ours: `torchrun -m megatron_simko.train` as examples/quickstart.sh launches it, with the workload as config
  overrides (no validation, no checkpoint before the last step); phase times read from its metrics.jsonl
  (`time/rollout` — which includes the reward scoring, interleaved with generation under dynamic sampling —,
  `time/experience` — advantages and packing — in the reward column, `time/old_logprob`, `time/train`,
  `time/sync`: megatron_simko/train.py).
- trl: benchmarks/trl_grpo_peer.py (its docstring says which GRPOTrainer functions are timed) in its own
  environment, <work-dir>/trl-venv, made on first use: torch 2.13.0 (the machine's CPU wheel), trl TRL_VERSION,
  and the transformers and reasoning-gym versions of requirements/cpu.lock.txt. Never part of the package.
  Same prompts in the same order, the same reward function (megatron_simko.rewards.reasoning_gym_reward).

Columns: s / step = median wall-clock time between the ends of consecutive RL steps (everything included);
the phases are medians of their own (they need not add up to s / step); ratio = s / step ÷ TRL's; tokens/s =
(prompt + response tokens of the step's 128 sequences) ÷ that step's wall time. Model FLOP/s, with
P = the parameters of the model's matrix multiplications (every Linear: q, k, v, o, gate, up, down in each layer,
and the output head; not the embedding lookup, norms or biases) and T = the step's prompt + response tokens:
train = 6·P·T ÷ time/train (forward + backward, 2 updates × half the tokens each; an update ours skips for lack
of reward signal is not counted, and the output says how many were), old log-prob = 2·P·T ÷ time/old_logprob
(forward only), each the median over the steps. Attention's score and value products (≈ 4·layers·sequence·hidden
per token) are left out, as is padding. Beside them, the machine's own peak measured in the same run: the best of
repeated square fp32 matmuls (2·n³ FLOP) on --threads threads in one process — the whole machine's budget, which
the TP 2 rows share between two processes.
Exit status: 0 all systems ran, 1 some failed (their rows say why), 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_simko.cli import refuse_flags  # noqa: E402

TRL_VERSION = "1.16.0"
PROMPTS, SAMPLES, MAX_NEW_TOKENS, UPDATES_PER_STEP, LR, TEMPERATURE = 16, 8, 32, 2, 1e-4, 1.0
FIRST_TIMED_STEP = 3
PHASES = ("rollout", "reward", "old_logprob", "train", "sync")
# metrics.jsonl keys of a phase, first found wins: our trainer scores rewards inside time/rollout and logs the
# advantage + packing phase as time/experience (TRL's reward column likewise holds its advantage computation)
PHASE_KEYS = {p: (f"time/{p}",) for p in PHASES} | {"reward": ("time/reward", "time/experience")}
QUICKSTART_CONFIG = os.path.join(REPO, "examples", "configs", "quickstart.yaml")


@dataclass(frozen=True)
class System:
    name: str
    label: str
    processes: int = 1  # torchrun ranks (= TP); TRL runs in one process
    backend: str = ""  # our rollout.backend; "" for TRL


SYSTEMS = {s.name: s for s in (
    System("trl", f"TRL {TRL_VERSION} GRPOTrainer (one process, HF generate)"),
    System("tp1_transformers", "ours, TP 1, transformers backend", 1, "transformers"),
    System("tp1_vllm", "ours, TP 1, vLLM", 1, "vllm"),
    System("tp2_vllm", "ours, TP 2 (the quickstart's layout), vLLM", 2, "vllm"),
)}


# ------------------------------------------------------------------------------------------ pure parts


def matmul_params(hf_config: dict) -> int:
    """P: weights of every matrix multiplication of a Qwen2/Llama-style decoder (q, k, v, o, gate, up, down per
    layer, and the output head), from a Hugging Face config.json."""
    h, layers, ffn = hf_config["hidden_size"], hf_config["num_hidden_layers"], hf_config["intermediate_size"]
    heads = hf_config["num_attention_heads"]
    kv_heads = hf_config.get("num_key_value_heads") or heads
    head_dim = hf_config.get("head_dim") or h // heads
    attention = h * heads * head_dim + 2 * h * kv_heads * head_dim + heads * head_dim * h
    return layers * (attention + 3 * h * ffn) + h * hf_config["vocab_size"]


def model_flops(params: int, tokens: float, backward: bool) -> float:
    """6·P·T for forward + backward, 2·P·T for a forward pass alone."""
    return (6.0 if backward else 2.0) * params * tokens


def step_medians(path: str, first: int, last: int, params: int) -> Dict[str, Optional[float]]:
    """Medians over RL steps first..last of a metrics.jsonl (the trainer's format: one JSON object per step with
    "step", "time" = wall clock when logged, "time/<phase>", "time/step", "throughput/tokens_per_s", and ours
    "train/skipped_updates"): each phase (None if the file has no such key); "s_per_step" (wall time since the
    previous step's record); "tokens_per_step"; "tokens_per_s" (tokens ÷ that wall time); "train_gflops" and
    "logprob_gflops" (model FLOP/s of a P-parameter model, `model_flops`; the train count covers only the updates
    that ran — ours skips a mini-batch without reward signal — and steps where none ran are left out);
    "skipped_updates" (the window's total). ValueError naming what is missing."""
    if first < 2 or last < first:
        raise ValueError(f"steps {first}..{last}: need 2 <= first <= last (a step's wall time needs the step before)")
    records = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                records[int(rec["step"])] = rec
    missing = [s for s in range(first - 1, last + 1) if s not in records]
    if missing:
        raise ValueError(f"{path}: no record for step(s) {missing} (the run stopped early?)")
    steps = [records[s] for s in range(first, last + 1)]
    walls = [records[s]["time"] - records[s - 1]["time"] for s in range(first, last + 1)]
    tokens = [r["throughput/tokens_per_s"] * r["time/step"] for r in steps]
    skipped = [r.get("train/skipped_updates", 0.0) for r in steps]
    out: Dict[str, Optional[float]] = {}
    for p in PHASES:
        key = next((k for k in PHASE_KEYS[p] if all(k in r for r in steps)), None)
        out[p] = statistics.median(r[key] for r in steps) if key else None
    out["s_per_step"] = statistics.median(walls)
    out["tokens_per_step"] = statistics.median(tokens)
    out["tokens_per_s"] = statistics.median(t / w for t, w in zip(tokens, walls))
    trained = [(1 - k / UPDATES_PER_STEP) * model_flops(params, t, backward=True) / r["time/train"] / 1e9
               for r, t, k in zip(steps, tokens, skipped) if k < UPDATES_PER_STEP and r.get("time/train")]
    forward = [model_flops(params, t, backward=False) / r["time/old_logprob"] / 1e9
               for r, t in zip(steps, tokens) if r.get("time/old_logprob")]
    out["train_gflops"] = statistics.median(trained) if trained else None
    out["logprob_gflops"] = statistics.median(forward) if forward else None
    out["skipped_updates"] = float(sum(skipped))
    return out


def with_ratio(row: dict, trl_s_per_step: Optional[float]) -> dict:
    """A measured row plus its s / step as a multiple of TRL's (None without TRL)."""
    return {**row, "ratio_to_trl": row["s_per_step"] / trl_s_per_step if trl_s_per_step else None}


def combine_passes(passes: Sequence[Dict[str, dict]]) -> Dict[str, dict]:
    """Per system, the median over passes of each numeric column (None where a pass has None), skipped updates
    summed, and ratio_to_trl = the median of the passes' own ratios; a system that failed in any pass keeps
    that pass's error (its other passes stay in the JSON)."""
    out: Dict[str, dict] = {}
    for name in passes[0]:
        rows = [p[name] for p in passes]
        failed = next((r for r in rows if r.get("error")), None)
        if failed:
            out[name] = failed
            continue
        row = {"label": rows[0]["label"]}
        for key in rows[0]:
            if key == "label":
                continue
            values = [r.get(key) for r in rows]
            if key == "skipped_updates":
                row[key] = float(sum(values))
            elif any(v is None for v in values):
                row[key] = None
            else:
                row[key] = statistics.median(values)
        out[name] = row
    return out


def rotated(names: Sequence[str], k: int) -> List[str]:
    """The systems in pass k's order: the list started k places later."""
    k %= len(names)
    return list(names[k:]) + list(names[:k])


def format_table(rows: Sequence[dict], peak_gflops: Optional[float]) -> str:
    """Markdown table: one row per system (failed ones say why), GFLOP/s with their share of the peak."""
    def sec(v):
        return "–" if v is None else f"{v:.2f}"

    def flops(v):
        if v is None:
            return "–"
        return f"{v:.1f} ({100 * v / peak_gflops:.0f} %)" if peak_gflops else f"{v:.1f}"

    head = ("| system | s / step | rollout | reward / adv. | old log-prob | train | sync | ratio to TRL | tokens/s "
            "| train GFLOP/s (% peak) | old log-prob GFLOP/s (% peak) |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['label']} | failed: {r['error']} |" + " |" * (head.count(" | ") - 1))
            continue
        ratio = "–" if r.get("ratio_to_trl") is None else f"{r['ratio_to_trl']:.2f}"
        lines.append(f"| {r['label']} | {sec(r['s_per_step'])} | " + " | ".join(sec(r[p]) for p in PHASES)
                     + f" | {ratio} | {r['tokens_per_s']:.0f} | {flops(r['train_gflops'])} | "
                     f"{flops(r['logprob_gflops'])} |")
    return "\n".join(lines)


def lock_pins(path: str = os.path.join(REPO, "requirements", "cpu.lock.txt")) -> Dict[str, str]:
    """name -> version of the lock file's `name==version` lines (names lower-case, '-' as '_')."""
    pins = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, version = line.split("==", 1)
                pins[name.strip().lower().replace("-", "_")] = version.strip()
    return pins


def parse_systems(text: str) -> List[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SYSTEMS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"--systems {text!r}: give distinct names from {', '.join(SYSTEMS)}")
    return names


# ------------------------------------------------------------------------------------------ measuring


def matmul_peak_gflops(threads: int, n: int = 1024, reps: int = 20) -> float:
    """Best of `reps` square fp32 matmuls (2·n³ FLOP each) on `threads` threads, GFLOP/s."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(3):
            a @ b
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)
    return 2.0 * n ** 3 / best / 1e9


def machine_info() -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "load_avg_1_5_15": list(os.getloadavg()),
            "platform": platform.platform(), "python": platform.python_version()}


def _env(threads_per_process: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads_per_process), PYTHONUNBUFFERED="1",
               VLLM_LOGGING_LEVEL="ERROR", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run_logged(cmd: List[str], log_path: str, env: dict, timeout: float) -> None:
    """Runs cmd with its output in log_path; RuntimeError with the log's last line if it fails."""
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = [ln.strip() for ln in f.read().splitlines() if ln.strip()][-1:] or ["(no output)"]
        raise RuntimeError(f"exit {proc.returncode}: {tail[0][:200]} (log: {log_path})")


def ensure_model(work_dir: str) -> str:
    """The quickstart's tiny model, built as examples/quickstart.sh builds it (once per work dir)."""
    model = os.path.join(work_dir, "model")
    if not os.path.isfile(os.path.join(model, "config.json")):
        print(f"== making the quickstart's tiny model in {model} (tools/make_tiny_model.py, a few minutes)", flush=True)
        _run_logged([sys.executable, "tools/make_tiny_model.py", "--out-dir", model, "--force"],
                    os.path.join(work_dir, "make_tiny_model.log"), _env(1), timeout=3600)
    return model


def our_overrides(system: System, model_dir: str, log_dir: str, steps: int) -> List[str]:
    """The workload as config overrides of examples/configs/quickstart.yaml."""
    return [f"model.hf_dir={model_dir}", f"train.log_dir={log_dir}", "checkpoint.resume=none",
            f"parallel.tensor_parallel={system.processes}", f"rollout.backend={system.backend}", "loss.mode=grpo",
            f"train.steps={steps}", f"data.prompts_per_step={PROMPTS}", f"rollout.n_samples={SAMPLES}",
            f"rollout.max_response_length={MAX_NEW_TOKENS}", f"train.mini_batch_size={PROMPTS // UPDATES_PER_STEP}",
            "train.ppo_epochs=1", f"optimizer.lr={LR}", "optimizer.lr_schedule=constant",
            f"rollout.temperature={TEMPERATURE}", "data.validation=null", "train.validate_every=0",
            "checkpoint.save_every=0"]


def run_ours(system: System, model_dir: str, run_dir: str, steps: int, threads: int) -> str:
    """torchrun -m megatron_simko.train, as examples/quickstart.sh; returns the metrics.jsonl path."""
    with socket.socket() as s:  # a free port, as the quickstart picks one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc-per-node", str(system.processes), "--master-port", str(port), "-m",
           "megatron_simko.train", "--config", QUICKSTART_CONFIG, *our_overrides(system, model_dir, run_dir, steps)]
    _run_logged(cmd, os.path.join(run_dir, "run.log"), _env(max(1, threads // system.processes)), timeout=3600)
    return os.path.join(run_dir, "metrics.jsonl")


def ensure_trl_python(work_dir: str) -> str:
    """<work-dir>/trl-venv with torch 2.13.0 (the local CPU wheel: any other spec pulls a CUDA build), trl
    TRL_VERSION, and the lock file's transformers and reasoning-gym; made once (a stamp records the pins)."""
    pins = lock_pins()
    specs = ["torch==2.13.0", f"trl=={TRL_VERSION}", f"transformers=={pins['transformers']}",
             f"reasoning_gym=={pins['reasoning_gym']}"]
    venv = os.path.join(work_dir, "trl-venv")
    python, stamp = os.path.join(venv, "bin", "python"), os.path.join(venv, ".rl_step_bench_stamp")
    if os.path.isfile(stamp) and open(stamp, encoding="utf-8").read() == " ".join(specs):
        return python
    print(f"== installing {' '.join(specs[1:])} into {venv} (first use; a few minutes)", flush=True)
    log = os.path.join(work_dir, "trl_install.log")
    base = shutil.which("python3.11") or sys.executable
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for i, cmd in enumerate(([base, "-m", "venv", venv], pip + specs[:1], pip + specs)):  # torch alone first
        _run_logged(cmd, f"{log}.{i}", dict(os.environ), timeout=3600)
    with open(stamp, "w", encoding="utf-8") as f:
        f.write(" ".join(specs))
    return python


def write_trl_prompts(model_dir: str, path: str, steps: int) -> None:
    """The prompts our trainer trains on, step by step in its order (same dataset, filter and loader seed),
    rendered and tokenized as it does, with what the reward needs; jsonl, written atomically."""
    from megatron_simko.config import load_config
    from megatron_simko.data import PromptLoader, prompt_token_ids, render_prompt
    from megatron_simko.data.tokenizer import load_tokenizer
    from megatron_simko.train import load_datasets

    cfg = load_config(QUICKSTART_CONFIG, our_overrides(SYSTEMS["tp1_transformers"], model_dir, "unused", steps))
    tokenizer = load_tokenizer(model_dir)
    train, _ = load_datasets(cfg, tokenizer)
    loader = PromptLoader(train, cfg.data.prompts_per_step, seed=cfg.data.seed)
    d = cfg.data
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for _ in range(steps):
            for ex in loader.next_batch():
                f.write(json.dumps({
                    "prompt": render_prompt(ex, tokenizer, d.system_prompt, d.instruction),
                    "prompt_ids": prompt_token_ids(ex, tokenizer, d.system_prompt, d.instruction),
                    "question": ex.prompt, "answer": ex.answer, "data_source": ex.data_source,
                    "rg_entry_json": json.dumps(ex.metadata["rg_entry"]),
                    "rg_config_json": json.dumps(ex.metadata["rg_config"])}) + "\n")
    os.replace(tmp, path)


def run_trl(python: str, model_dir: str, run_dir: str, steps: int, threads: int) -> str:
    prompts = os.path.join(run_dir, "prompts.jsonl")
    write_trl_prompts(model_dir, prompts, steps)
    cmd = [python, os.path.join(REPO, "benchmarks", "trl_grpo_peer.py"), "--model-dir", model_dir,
           "--prompts", prompts, "--out-dir", run_dir, "--steps", str(steps), "--samples", str(SAMPLES),
           "--prompts-per-step", str(PROMPTS), "--updates-per-step", str(UPDATES_PER_STEP),
           "--max-new-tokens", str(MAX_NEW_TOKENS), "--lr", str(LR), "--temperature", str(TEMPERATURE)]
    _run_logged(cmd, os.path.join(run_dir, "run.log"), _env(threads), timeout=3600)
    return os.path.join(run_dir, "metrics.jsonl")


def write_json_atomic(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ CLI


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {', '.join(SYSTEMS)}")
    p.add_argument("--steps", type=int, default=12, help=f"RL steps per system; medians over {FIRST_TIMED_STEP}..steps")
    p.add_argument("--repeats", type=int, default=3, help="passes over the systems (module docstring)")
    p.add_argument("--threads", type=int, default=2, help="threads per system, split evenly over its processes")
    p.add_argument("--work-dir", default=os.path.join(REPO, "runs", "rl_step_bench"),
                   help="model, runs, logs and the TRL environment")
    p.add_argument("--out", default=None, help="also write the results as JSON here (atomically)")
    p.add_argument("--model-dir", default=None, help="use this tiny model instead of building one in the work dir")
    p.add_argument("--trl-python", default=None,
                   help="a Python that already has trl (instead of <work-dir>/trl-venv); trl system only")
    args = p.parse_args(argv)
    try:
        args.systems = parse_systems(args.systems)
    except ValueError as exc:
        p.error(str(exc))
    if args.steps < FIRST_TIMED_STEP:
        p.error(f"--steps {args.steps}: the medians start at step {FIRST_TIMED_STEP}; give at least that")
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: give at least 1")
    if args.threads < 1 or any(args.threads % SYSTEMS[s].processes for s in args.systems):
        p.error(f"--threads {args.threads}: must be >= 1 and divisible by every chosen system's process count")
    if args.model_dir and not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        p.error(f"--model-dir {args.model_dir}: no config.json there (a tools/make_tiny_model.py output)")
    if "trl" not in args.systems:
        refuse_flags(p, args, ("trl_python",), "applies to the trl system only (add trl to --systems)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    work = os.path.abspath(args.work_dir)
    os.makedirs(work, exist_ok=True)
    try:
        model = os.path.abspath(args.model_dir) if args.model_dir else ensure_model(work)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"error: building the tiny model failed: {exc}", file=sys.stderr)
        return 1
    with open(os.path.join(model, "config.json"), encoding="utf-8") as f:
        params = matmul_params(json.load(f))
    info = machine_info()
    print(f"== machine: {info['cpu']}, {info['cpus']} CPUs, load {info['load_avg_1_5_15']}; P = {params:,} matmul "
          f"parameters; {args.repeats} pass(es) over {', '.join(args.systems)}", flush=True)
    header = {"command": [os.path.relpath(__file__, REPO)] + list(argv if argv is not None else sys.argv[1:]),
              "machine": info, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
              "workload": {"prompts": PROMPTS, "samples": SAMPLES, "max_new_tokens": MAX_NEW_TOKENS,
                           "updates_per_step": UPDATES_PER_STEP, "lr": LR, "temperature": TEMPERATURE,
                           "steps": args.steps, "median_of_steps": [FIRST_TIMED_STEP, args.steps],
                           "threads": args.threads, "repeats": args.repeats},
              "model_dir": model, "matmul_params": params, "trl_version": TRL_VERSION}
    passes: List[Dict[str, dict]] = []
    peaks: List[float] = []
    for k in range(args.repeats):
        peaks.append(matmul_peak_gflops(args.threads))
        print(f"== pass {k + 1}/{args.repeats}: fp32 matmul peak on {args.threads} threads {peaks[-1]:.1f} GFLOP/s, "
              f"load {list(os.getloadavg())}", flush=True)
        measured = {name: measure(SYSTEMS[name], args, work, model, params) for name in rotated(args.systems, k)}
        passes.append(results({name: measured[name] for name in args.systems}))
        if args.out:  # after every pass: a run cut short keeps what finished
            write_json_atomic(args.out, {**header, "peak_gflops_per_pass": peaks, "passes": passes,
                                         "systems": combine_passes(passes)})
    rows = list(combine_passes(passes).values())
    peak = statistics.median(peaks)
    print(f"\nmedians over {args.repeats} pass(es) of the medians of steps {FIRST_TIMED_STEP}..{args.steps}; seconds; "
          f"GFLOP/s as a share of the {peak:.1f} GFLOP/s fp32 matmul peak on {args.threads} threads (median of "
          f"{', '.join(f'{x:.0f}' for x in peaks)})\n")
    print(format_table(rows, peak))
    if "trl" in args.systems and args.repeats > 1:
        for name in args.systems:
            ratios = [p[name].get("ratio_to_trl") for p in passes]
            if name != "trl" and all(r is not None for r in ratios):
                print(f"ratio to TRL per pass, {SYSTEMS[name].label}: {', '.join(f'{r:.2f}' for r in ratios)}")
    window = UPDATES_PER_STEP * (args.steps - FIRST_TIMED_STEP + 1) * args.repeats
    for r in rows:
        if r.get("skipped_updates"):
            print(f"note: {r['label']} skipped {r['skipped_updates']:.0f} of {window} updates in steps "
                  f"{FIRST_TIMED_STEP}..{args.steps} (every group all-correct or all-wrong: no signal); TRL steps "
                  "on such a batch, so this row did less work than TRL's")
    return 1 if any(r.get("error") for r in rows) else 0


def measure(system: System, args: argparse.Namespace, work: str, model: str, params: int) -> dict:
    """Runs one system in <work>/<name>; its medians, or {"label", "error"}."""
    run_dir = os.path.join(work, system.name)
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    print(f"== {system.label}: {args.steps} RL steps ...", flush=True)
    t = time.perf_counter()
    try:
        if system.name == "trl":
            python = args.trl_python or ensure_trl_python(work)
            metrics = run_trl(python, model, run_dir, args.steps, args.threads)
        else:
            metrics = run_ours(system, model, run_dir, args.steps, args.threads)
        row = {"label": system.label, **step_medians(metrics, FIRST_TIMED_STEP, args.steps, params)}
    except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired) as exc:
        row = {"label": system.label, "error": str(exc)}
    print(f"   {row.get('error') or 'done'} ({time.perf_counter() - t:.0f} s)", flush=True)
    return row


def results(measured: Dict[str, dict]) -> Dict[str, dict]:
    """The measured rows with their ratio to TRL (when TRL ran)."""
    trl_s = measured.get("trl", {}).get("s_per_step")
    return {n: r if r.get("error") else with_ratio(r, trl_s) for n, r in measured.items()}


if __name__ == "__main__":
    sys.exit(main())

"""The GPU smoke run end to end (tools/gpu_smoke.py is its command line; the stages in its docstring): build the
data, tokenizer and model (smoke/build.py), two RL launches with a resume between them, the offline export, then a
table per step and the checks (smoke/stages.py runs each stage under its time limit).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from typing import Optional

from megatron_simko.smoke.build import (
    MODES,
    build_model,
    build_tokenizer,
    prompt_lengths,
    sum_examples,
    write_run_config,
)
from megatron_simko.smoke.stages import (
    PREFLIGHT_TIMEOUT,
    STAGE_TIMEOUTS,
    StageTimeout,
    in_process,
    loss_backend_of,
    preflight,
    run,
    safetensors_in,
    train,
    write_summary,
)

PHASES = ("rollout", "reward", "old_logprob", "train", "sync", "step")


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


def run_smoke(mode: Optional[str], out_dir: str, seed: int = 0) -> int:
    """The whole run (``mode`` None: gpu if CUDA is available, else cpu), into ``out_dir`` (emptied first);
    0 if every check passed, 1 if one failed, 2 if the pre-flight or the mode's device is missing."""
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

    mode = mode or ("gpu" if torch.cuda.is_available() else "cpu")
    summary["mode"] = mode
    out = os.path.abspath(out_dir)
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

    for split, n, split_seed in (("train", 2000, seed), ("val", 64, seed + 1)):
        write_prompt_jsonl(os.path.join(out, "data", f"{split}.jsonl"),
                           [PromptExample(r["prompt"], r["answer"], r["data_source"])
                            for r in sum_examples(n, split_seed)])
    print(f"== gpu_smoke ({mode}): {summary['device']}; loss backend (loss.backend=auto here): "
          f"{summary['loss_backend_expected']}; output in {out}", flush=True)

    # 1-3. tokenizer + model + SFT warm start, in this process, with a time limit.
    t0 = time.perf_counter()
    sft = None
    try:
        core = build_tokenizer(os.path.join(out, "model"), sum_examples(2000, seed))
        sft = in_process(limits["build"], build_model, os.path.join(out, "model"), mode, core, device.type, seed)
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

#!/usr/bin/env python
"""Makes the tiny warm-started model of the quickstart and the toy pass@K study (megatron_simko/models/tiny.py).

    python tools/make_tiny_model.py --out-dir runs/tiny_model [--task chain_sum] [--task-config JSON] \
        [--prompt-style task|compact] [--sft-steps N] [--target-accuracy A] [--stop-metric expected|sampled] \
        [--num-layers L] [--seed S] [--force]

A local byte-level BPE tokenizer, a tiny Qwen2 (hidden 256, head_dim 64), then SFT until the accuracy on held-out
prompts reaches --target-accuracy (mixed rewards for RL). The folder is built in `<out-dir>.tmp-<pid>` and
renamed into place; an existing non-empty out-dir is refused unless --force. The RL run must use the task and
task config recorded in `<out-dir>/tiny_model.json`. Exit status: 0 success, 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_simko.models.tiny import (DEFAULT_TASK_CONFIGS, PROMPT_STYLES, STOP_METRICS,  # noqa: E402,F401
                                        TinyModelSpec, make_tiny_model)


def build_parser() -> argparse.ArgumentParser:
    d = TinyModelSpec()
    ap = argparse.ArgumentParser(allow_abbrev=False,
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", required=True, help="the model folder to create")
    ap.add_argument("--task", default=d.task, help="reasoning-gym task (default chain_sum)")
    ap.add_argument("--task-config", default=None,
                    help="JSON dict of reasoning-gym task options (default: the built-in one for the task: "
                         + "; ".join(f"{t}: {json.dumps(c)}" for t, c in DEFAULT_TASK_CONFIGS.items()) + ")")
    ap.add_argument("--prompt-style", choices=PROMPT_STYLES, default=d.prompt_style,
                    help="task: reasoning-gym's question; compact (countdown: 'Make 6 from 8, 1, 3.'; graph_color: "
                         "'Color 0-5 with 1-3. Edges: 0-3 2-5.') (RL and "
                         "evaluation must present problems the same way)")
    ap.add_argument("--num-layers", type=int, default=d.num_layers)
    ap.add_argument("--sft-steps", type=int, default=d.sft_steps,
                    help="maximum SFT steps (0 = random model: no SFT, no accuracy check)")
    ap.add_argument("--sft-batch-size", type=int, default=d.sft_batch_size)
    ap.add_argument("--sft-lr", type=float, default=d.sft_lr)
    ap.add_argument("--target-accuracy", type=float, default=d.target_accuracy,
                    help="stop SFT once the held-out accuracy reaches this (0 = run all steps); RL needs mixed "
                         "rewards, not a solved task")
    ap.add_argument("--stop-metric", choices=STOP_METRICS, default=None,
                    help="expected: probability of the reference response (one-answer tasks; chain_sum's default); "
                         "sampled: scored temperature-1 samples (tasks with many valid answers; the others' default)")
    ap.add_argument("--check-every", type=int, default=d.check_every, help="SFT steps between accuracy checks")
    ap.add_argument("--eval-prompts", type=int, default=d.eval_prompts, help="held-out prompts for the final "
                                                                              "accuracy measurement (0 = skip)")
    ap.add_argument("--eval-samples", type=int, default=d.eval_samples, help="samples per prompt at temperature 1.0")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")
    ap.add_argument("--force", action="store_true", help="replace an existing non-empty out-dir")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = os.path.abspath(args.out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not args.force:
        print(f"error: {args.out_dir} exists and is not empty; pass --force to replace it", file=sys.stderr)
        return 2
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        print(f"error: {args.out_dir} exists and is not a directory", file=sys.stderr)
        return 2
    try:
        task_config = json.loads(args.task_config) if args.task_config is not None else None
        if task_config is not None and not isinstance(task_config, dict):
            raise ValueError("--task-config must be a JSON object")
        spec = TinyModelSpec(task=args.task, task_config=task_config, prompt_style=args.prompt_style, seed=args.seed,
                             num_layers=args.num_layers,
                             sft_steps=args.sft_steps, sft_batch_size=args.sft_batch_size, sft_lr=args.sft_lr,
                             target_accuracy=args.target_accuracy, stop_metric=args.stop_metric,
                             check_every=args.check_every, eval_prompts=args.eval_prompts,
                             eval_samples=args.eval_samples, threads=args.threads).resolved()
    except json.JSONDecodeError as e:
        print(f"error: --task-config is not valid JSON: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    record = make_tiny_model(out_dir, spec, log=lambda msg: print(msg, flush=True))
    acc = "not measured" if record["eval"] is None else f"{record['eval']['accuracy']:.3f}"
    steps = 0 if record["sft"] is None else record["sft"]["steps_run"]
    print(f"wrote {args.out_dir}: vocab {record['vocab_size']}, {record['n_parameters'] / 1e6:.2f} M params, SFT "
          f"{steps} steps, accuracy {acc}, {record['seconds']:.1f} s total\n"
          f"RL data: train='reasoning_gym/{spec.task}', reasoning_gym_config={json.dumps(spec.task_config)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

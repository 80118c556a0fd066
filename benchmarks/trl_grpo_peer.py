#!/usr/bin/env python
"""The TRL peer of benchmarks/rl_step_bench.py: TRL's GRPOTrainer on the benchmark's workload, in one process,
with per-phase times. Runs in its own environment (rl_step_bench.py makes it: trl 1.16.0), this repository on
PYTHONPATH for the prompts' reward (megatron_simko.rewards.reasoning_gym_reward, the trainer's own).

    <trl-venv>/bin/python benchmarks/trl_grpo_peer.py --model-dir DIR --prompts prompts.jsonl --out-dir D \
        [--steps 12 --prompts-per-step 16 --samples 8 --updates-per-step 2 --max-new-tokens 32 --lr 1e-4]

One RL step = one TRL generation batch: prompts-per-step × samples completions generated (HF `model.generate`),
scored, then `updates-per-step` optimizer steps (per_device_train_batch_size = the completions of one update,
gradient_accumulation_steps = 1, steps_per_generation = updates-per-step). Because the second update trains on
samples of an older policy, TRL computes old log-probs itself. Loss: loss_type "dapo" (token mean over the
update's completion tokens, as ours), ε = 0.2, β = 0 (no KL, no reference model), group-scaled advantages; AdamW
with weight decay 0 (= Adam), constant lr, max_grad_norm 1; fp32 on the CPU; prompts in the file's order
(shuffle_dataset off: the file holds the trainer's prompts step by step).

Phases, timed by a GRPOTrainer subclass whose overrides call the originals (trl/trainer/grpo_trainer.py, 1.16):
- rollout: `GRPOTrainer._generate` (prompt tokenization, `model.generate`, completion decoding);
- old log-prob: `GRPOTrainer._get_per_token_logps_and_entropies` when called under `torch.no_grad()` (from
  `_generate_and_score_completions`: `old_per_token_logps`);
- reward: the rest of `GRPOTrainer._prepare_inputs` when it generates (`_calculate_rewards`, group advantages,
  shuffling and splitting the batch);
- train: from the Trainer's `on_step_begin` to `on_step_end` callback (forward with grad, loss, backward,
  gradient clipping, optimizer step, zero_grad), summed over the RL step's updates, minus `_prepare_inputs`;
- sync: none (generation uses the trained model itself).
Writes <out-dir>/metrics.jsonl in the trainer's format, one record per RL step: step, time (wall clock at the
step's last on_step_end), time/<phase>, time/step (their sum), throughput/tokens_per_s (prompt + completion
tokens of the step's sequences ÷ time/step), reward/mean, response/length_mean.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from megatron_simko.data import PromptExample
from megatron_simko.rewards import reasoning_gym_reward


def parse_args(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--prompts", required=True, help="jsonl written by rl_step_bench.py (prompt, prompt_ids, ...)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--updates-per-step", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def reward_fn(completions, question, answer, data_source, rg_entry_json, rg_config_json, **_):
    """1.0 / 0.0 per completion: the trainer's reasoning-gym reward on the same example."""
    return [reasoning_gym_reward(text, PromptExample(prompt=q, answer=a, data_source=src, metadata={
        "rg_entry": json.loads(entry), "rg_config": json.loads(config)}))
        for text, q, a, src, entry, config in zip(completions, question, answer, data_source, rg_entry_json,
                                                  rg_config_json)]


class PhaseTimes:
    """Seconds per phase of the current RL step, and the per-step records."""

    def __init__(self):
        self.current = dict.fromkeys(("rollout", "old_logprob", "prepare", "step"), 0.0)
        self.tokens = 0
        self.rewards: list = []
        self.lengths: list = []


class TimedGRPOTrainer(GRPOTrainer):
    times: PhaseTimes

    def _generate(self, prompts):
        t = time.perf_counter()
        try:
            return super()._generate(prompts)
        finally:
            self.times.current["rollout"] += time.perf_counter() - t

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        if torch.is_grad_enabled():  # the training forward: part of "train"
            return super()._get_per_token_logps_and_entropies(*args, **kwargs)
        t = time.perf_counter()
        try:
            return super()._get_per_token_logps_and_entropies(*args, **kwargs)
        finally:
            self.times.current["old_logprob"] += time.perf_counter() - t

    def _prepare_inputs(self, generation_batch):
        t = time.perf_counter()
        try:
            return super()._prepare_inputs(generation_batch)
        finally:
            self.times.current["prepare"] += time.perf_counter() - t

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        self.times.tokens += int(out["prompt_mask"].sum()) + int(out["completion_mask"].sum())
        self.times.lengths += out["completion_mask"].sum(dim=1).tolist()
        return out

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self.times.rewards += rewards.sum(dim=1).tolist()
        return rewards


class StepRecorder(TrainerCallback):
    """Times each optimizer step; after every `updates` of them writes one RL-step record."""

    def __init__(self, times: PhaseTimes, updates: int, path: str):
        self.times, self.updates, self.path = times, updates, path
        self._begin = 0.0
        open(path, "w").close()

    def on_step_begin(self, args, state, control, **kwargs):
        self._begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        c = self.times.current
        c["step"] += time.perf_counter() - self._begin
        if state.global_step % self.updates:
            return
        prepare = c["prepare"]
        phases = {"time/rollout": c["rollout"], "time/old_logprob": c["old_logprob"],
                  "time/reward": prepare - c["rollout"] - c["old_logprob"], "time/train": c["step"] - prepare}
        step_time = sum(phases.values())
        t = self.times
        record = {"step": state.global_step // self.updates, "time": time.time(), **phases, "time/step": step_time,
                  "throughput/tokens_per_s": t.tokens / step_time,
                  "reward/mean": sum(t.rewards) / max(len(t.rewards), 1),
                  "response/length_mean": sum(t.lengths) / max(len(t.lengths), 1)}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
        t.current = dict.fromkeys(c, 0.0)
        t.tokens, t.rewards, t.lengths = 0, [], []


def main(argv=None) -> int:
    args = parse_args(argv)
    with open(args.prompts, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    need = args.steps * args.prompts_per_step
    if len(rows) < need:
        print(f"error: {args.prompts} has {len(rows)} prompts, fewer than --steps × --prompts-per-step = {need}",
              file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
    for row in rows[:need]:  # TRL tokenizes text prompts itself: it must see the trainer's token ids
        ids = tokenizer(text=row["prompt"])["input_ids"]
        if ids != row["prompt_ids"]:
            print(f"error: TRL's tokenization of a prompt differs from the trainer's: {ids} vs {row['prompt_ids']}",
                  file=sys.stderr)
            return 2
    columns = ("prompt", "question", "answer", "data_source", "rg_entry_json", "rg_config_json")
    dataset = Dataset.from_dict({k: [r[k] for r in rows[:need]] for k in columns})
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, local_files_only=True)
    completions_per_update = args.prompts_per_step * args.samples // args.updates_per_step
    config = GRPOConfig(
        output_dir=args.out_dir, per_device_train_batch_size=completions_per_update, gradient_accumulation_steps=1,
        steps_per_generation=args.updates_per_step, num_generations=args.samples, num_iterations=1,
        max_completion_length=args.max_new_tokens, temperature=args.temperature, top_p=1.0, top_k=0,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch",
        beta=0.0, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        max_steps=args.steps * args.updates_per_step, shuffle_dataset=False, seed=args.seed,
        use_cpu=True, bf16=False, fp16=False, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, log_completions=False, dataloader_num_workers=0)
    trainer = TimedGRPOTrainer(model=model, reward_funcs=reward_fn, args=config, train_dataset=dataset,
                               processing_class=tokenizer)
    trainer.times = PhaseTimes()
    trainer.add_callback(StepRecorder(trainer.times, args.updates_per_step,
                                      os.path.join(args.out_dir, "metrics.jsonl")))
    print(f"trl GRPOTrainer: eos ids {trainer.eos_token_ids}, torch threads {torch.get_num_threads()}", flush=True)
    trainer.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())

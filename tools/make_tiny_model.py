#!/usr/bin/env python
"""Makes the quickstart's tiny model: a local tokenizer, a tiny Qwen2 from a config, and a short SFT warm start.

    python tools/make_tiny_model.py --out-dir runs/tiny_model [--task chain_sum] [--sft-steps N] [--seed S] [--force]

1. Tokenizer: a byte-level BPE (Qwen2's pre-tokenization) trained on reasoning-gym text plus the response format,
   saved as a Hugging Face tokenizer folder (ChatML symbols are single tokens; eos = <|im_end|>, pad =
   <|endoftext|>), and checked after reloading it the way vLLM and the trainer do (see `build_tokenizer`).
2. Model: Qwen2 with hidden 256, 4 query / 2 KV heads of head_dim 64 (vLLM's CPU attention needs head_dim 64,
   TP=2 divides both head counts and the FFN), untied embeddings, vocab = len(tokenizer), float32.
3. SFT warm start: a random model never writes a correct \\boxed{} answer, so RL would see all-zero rewards.
   AdamW steps on `<rendered prompt>3 + 5 = \\boxed{8}.<|im_end|>` (loss on the response only; prompts rendered
   exactly as the trainer renders them) until the expected accuracy at temperature 1.0 on held-out prompts
   reaches --target-accuracy (0.4; typically 400-600 steps, 30-45 s on 2 idle cores, at most --sft-steps):
   mixed rewards within a group, hence nonzero GRPO advantages. The sampled accuracy is then measured with the
   repo's reward function (32 held-out prompts x 4 samples) and recorded.

The RL run must use the same task and task config (recorded in `tiny_model.json`): for the default
`--task chain_sum` that is data.train = "reasoning_gym/chain_sum" with data.reasoning_gym_config =
{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}.

The folder is built in `<out-dir>.tmp-<pid>` and renamed into place at the end; an existing non-empty
out-dir is refused unless --force. Exit status: 0 success, 2 bad input (e.g. out-dir exists).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Difficulty per task: easy enough that < 60 s of SFT on 2 CPU cores gives a mixed accuracy at temperature 1.0.
# chain_sum with these options is "a ± b =" with one-digit operands (200 problems, answers -9..18).
DEFAULT_TASK_CONFIGS = {
    "chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
}

# The tiny architecture (see the module docstring for why these numbers).
MODEL_SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)
TOKENIZER_VOCAB = 512  # upper bound; a small corpus yields fewer (the byte alphabet alone is 256)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # pad, ChatML start, eos (ids 0, 1, 2)


def response_text(example, task: str) -> str:
    """The SFT target after the rendered prompt (eos <|im_end|> is appended as a token).

    chain_sum: restate the expression, then the boxed answer ("3 + 5 = \\boxed{8}."). With the operands a few
    tokens before the answer, a 2-layer model learns the sums in a few hundred steps; answering straight after
    the ~20-token instruction it stays near chance for as long. Other tasks: "The answer is \\boxed{...}.".
    """
    if task == "chain_sum":
        expr = example.prompt.rsplit(":", 1)[-1].strip()
        if expr.endswith("="):
            return f"{expr} \\boxed{{{example.answer}}}."
    return f"The answer is \\boxed{{{example.answer}}}."


# ----------------------------------------------------------------------------------------------- steps
def build_tokenizer(out_dir: str, task: str, task_config: dict, seed: int):
    """Trains the tokenizer on reasoning-gym text and the response format, saves the HF folder, returns the
    core tokenizer (the reference the saved folder is checked against once config.json is next to it).

    Why not the SentencePiece helpers of megatron_simko/data/tokenizer.py: with transformers 5, AutoTokenizer
    (used by vLLM and by HFTokenizer) loads any tokenizer in a folder whose config.json says model_type
    "qwen2" as `Qwen2Tokenizer`, which rebuilds a byte-level BPE pipeline around the stored vocabulary; a
    SentencePiece-unigram export then silently drops spaces, newlines and byte-fallback characters. A byte-level
    BPE built with Qwen2's own pipeline loads identically either way.
    """
    from transformers import PreTrainedTokenizerFast

    from megatron_simko.data import load_prompts, render_chatml
    from megatron_simko.data.tokenizer import CHATML_TEMPLATE, rg_corpus, train_byte_level_bpe

    texts = rg_corpus([task], per_task=500, seed=seed)
    # The configured difficulty, the exact response format and the chat roles, so all of them get merges.
    for ex in load_prompts(f"reasoning_gym/{task}", size=200, seed=seed, **task_config):
        texts += [ex.prompt, response_text(ex, task)]
    texts += [render_chatml([{"role": r, "content": "."}]) for r in ("system", "user", "assistant")] * 50
    core = train_byte_level_bpe(texts, TOKENIZER_VOCAB, SPECIAL_TOKENS)
    hf = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 unk_token=None, additional_special_tokens=["<|im_start|>"],
                                 chat_template=CHATML_TEMPLATE, model_max_length=MODEL_SHAPE["max_position_embeddings"],
                                 clean_up_tokenization_spaces=False)
    hf.save_pretrained(out_dir)
    return core


def tokenizer_samples(task: str, task_config: dict, seed: int) -> list[str]:
    """Texts for the saved-tokenizer check: full SFT sequences and a few awkward strings."""
    from megatron_simko.data import load_prompts, render_prompt

    texts = [render_prompt(ex) + response_text(ex, task) + "<|im_end|>"
             for ex in load_prompts(f"reasoning_gym/{task}", "validation", size=20, seed=seed, **task_config)]
    return texts + ["héllo 🙂 ünïcode  two  spaces\n\n\tx ", " lead", "Hi 12, -345.", "\\boxed{\\frac{1}{2}}"]


def check_tokenizer(out_dir: str, core, samples: list[str]):
    """Loads the saved folder as the trainer and vLLM do (AutoTokenizer, next to config.json) and checks it
    against the trained tokenizer: same ids, exact round trip, single-token ChatML symbols, eos <|im_end|>."""
    from megatron_simko.data.tokenizer import load_tokenizer

    tok = load_tokenizer(out_dir)
    for text in samples:
        ids = tok.encode(text)
        if ids != core.encode(text, add_special_tokens=False).ids or tok.decode(ids) != text:
            raise RuntimeError(f"{out_dir}: AutoTokenizer does not reproduce the trained tokenizer on {text!r:.60}")
    for sym in ("<|im_start|>", "<|im_end|>"):
        if len(tok.encode(sym)) != 1:
            raise RuntimeError(f"tokenizer splits {sym!r}: {tok.encode(sym)}")
    if tok.eos_id != tok.token_to_id("<|im_end|>") or tok.vocab_size != core.get_vocab_size():
        raise RuntimeError(f"tokenizer eos id {tok.eos_id} / size {tok.vocab_size} do not match the trained one")
    return tok


def build_model(core, seed: int):
    """A randomly initialised tiny Qwen2ForCausalLM (float32) whose vocabulary is exactly the tokenizer's."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=core.get_vocab_size(), **MODEL_SHAPE, hidden_act="silu", rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
        use_sliding_window=False, attention_dropout=0.0, dtype="float32", architectures=["Qwen2ForCausalLM"],
        eos_token_id=core.token_to_id("<|im_end|>"), pad_token_id=core.token_to_id("<|endoftext|>"),
        bos_token_id=None)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).float()


def encode_sft_example(ex, tok, task: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids + eos), the prompt rendered exactly as the trainer renders it."""
    from megatron_simko.data import render_prompt

    return tok.encode(render_prompt(ex, tok)), tok.encode(response_text(ex, task)) + [tok.eos_id]


def sft_data(tok, task: str, task_config: dict, size: int, seed: int,
             split: str = "train") -> list[tuple[list[int], list[int]]]:
    """Encoded (prompt, response + eos) pairs of one split of the task."""
    from megatron_simko.data import load_prompts

    return [encode_sft_example(ex, tok, task)
            for ex in load_prompts(f"reasoning_gym/{task}", split, size=size, seed=seed, **task_config)]


def pad_batch(seqs: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded (input_ids, attention_mask, labels), each (B, T); labels are -100 except on responses."""
    import torch

    B, T = len(seqs), max(len(p) + len(r) for p, r in seqs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, (p, r) in enumerate(seqs):
        n = len(p) + len(r)
        input_ids[b, :n] = torch.tensor(p + r)
        attn[b, :n] = 1
        labels[b, len(p):n] = torch.tensor(r)
    return input_ids, attn, labels


def response_logprobs(model, seqs, pad_id: int):
    """Sum of log p(response token) per sequence, (B,), and the mean per-token loss (scalar)."""
    import torch

    input_ids, attn, labels = (t.to(model.device) for t in pad_batch(seqs, pad_id))  # also on a GPU (gpu_smoke)
    logits = model(input_ids=input_ids, attention_mask=attn).logits[:, :-1]  # (B, T-1, V); t predicts t+1
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != -100
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logp = logp * mask  # (B, T-1)
    return logp.sum(-1), -logp.sum() / mask.sum()


def expected_accuracy(model, val, pad_id: int) -> float:
    """Mean probability of sampling the reference response at temperature 1.0: exp(sum of its token
    log-probs). A cheap, noise-free proxy for the sampled accuracy (other correct wordings are rare)."""
    import torch

    with torch.no_grad():
        seq_logp, _ = response_logprobs(model, val, pad_id)
    return seq_logp.exp().mean().item()


def sft(model, data, pad_id: int, steps: int, seed: int, batch_size: int, lr: float, val=None,
        target: float = 0.0, check_every: int = 25, log_every: int = 50) -> dict:
    """Plain-PyTorch SFT: AdamW, warmup + cosine over `steps`, cross-entropy on response tokens only.

    data, val: (prompt ids, response ids + eos) pairs. If `target` > 0, stops as soon as the expected
    accuracy on `val` (checked every `check_every` steps) reaches it: the step at which a tiny model "gets"
    the arithmetic varies a lot with the seed (e.g. 300 to 700 steps), so a fixed count would give anything
    from near-zero to near-perfect accuracy.
    """
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0, c0, losses, est, step = time.perf_counter(), time.process_time(), [], None, 0
    while step < steps:
        idx = torch.randint(len(data), (batch_size,), generator=gen).tolist()
        _, loss = response_logprobs(model, [data[i] for i in idx], pad_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        step += 1
        checked = val is not None and (step % check_every == 0 or step == steps)
        if checked:
            est = expected_accuracy(model, val, pad_id)
        if log_every and (step % log_every == 0 or step == steps or (checked and target and est >= target)):
            window = losses[-log_every:]
            print(f"  sft step {step:4d}/{steps}  loss {sum(window) / len(window):.4f}  "
                  f"lr {sched.get_last_lr()[0]:.2e}" + ("" if est is None else f"  expected acc {est:.3f}")
                  + f"  {time.perf_counter() - t0:5.1f} s (cpu {time.process_time() - c0:.1f} s)", flush=True)
        if checked and target and est >= target:
            break
    model.eval()
    return {"steps_run": step, "max_steps": steps, "batch_size": batch_size, "lr": lr, "target": target,
            "expected_accuracy": est, "first_loss": losses[0], "final_loss": losses[-1],
            "seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1)}


def measure_accuracy(model, tok, task: str, task_config: dict, n_prompts: int, n_samples: int, seed: int,
                     max_new_tokens: int = 24) -> float:
    """Per-response accuracy of temperature-1.0 samples (no top-k / top-p) on validation-split prompts,
    scored by the repo's reward function (the one RL uses)."""
    import torch
    from megatron_simko.data import load_prompts, render_prompt
    from megatron_simko.rewards import RewardScorer

    examples = list(load_prompts(f"reasoning_gym/{task}", "validation", size=n_prompts, seed=seed, **task_config))
    prompts = [tok.encode(render_prompt(ex, tok)) for ex in examples]
    T = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), T), tok.pad_id, dtype=torch.long)  # (P, T), left-padded
    attn = torch.zeros((len(prompts), T), dtype=torch.long)
    for b, p in enumerate(prompts):
        input_ids[b, T - len(p):] = torch.tensor(p)
        attn[b, T - len(p):] = 1
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0,
                             top_p=1.0, max_new_tokens=max_new_tokens, num_return_sequences=n_samples,
                             eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)  # (P * n_samples, T + new)
    responses = [tok.decode(row[T:].tolist(), skip_special_tokens=True) for row in out]
    with RewardScorer() as scorer:
        rewards = scorer.score(responses, [ex for ex in examples for _ in range(n_samples)])
    for r, x in list(zip(responses, rewards))[:: max(1, len(responses) // 4)]:
        print(f"  sample: {r!r} -> {x}")
    return sum(rewards) / len(rewards)


def save(model, tok, out_dir: str) -> None:
    """Weights (safetensors), config and generation_config.json next to the tokenizer files."""
    from transformers import GenerationConfig

    model.save_pretrained(out_dir, safe_serialization=True)
    # Only the stop / pad ids: vLLM takes default sampling settings from this file, so set none.
    GenerationConfig(eos_token_id=tok.eos_id, pad_token_id=tok.pad_id).save_pretrained(out_dir)


def install(tmp_dir: str, out_dir: str) -> None:
    """Renames tmp_dir to out_dir, replacing (after moving aside) an existing out_dir."""
    old = None
    if os.path.lexists(out_dir):
        old = f"{out_dir}.old-{os.getpid()}"
        os.rename(out_dir, old)
    os.rename(tmp_dir, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", required=True, help="the model folder to create")
    ap.add_argument("--task", default="chain_sum", help="reasoning-gym task (default chain_sum)")
    ap.add_argument("--task-config", default=None,
                    help="JSON dict of reasoning-gym task options (default: the built-in one for the task, e.g. "
                         + json.dumps(DEFAULT_TASK_CONFIGS["chain_sum"]) + ")")
    ap.add_argument("--sft-steps", type=int, default=800,
                    help="maximum SFT steps (0 = random model: no SFT, no accuracy check)")
    ap.add_argument("--sft-batch-size", type=int, default=16)
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--target-accuracy", type=float, default=0.4,
                    help="stop SFT once the expected temperature-1.0 accuracy on held-out prompts reaches this "
                         "(0 = run all steps); RL needs mixed rewards, not a solved task")
    ap.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts for the accuracy check (0 = skip)")
    ap.add_argument("--eval-samples", type=int, default=4, help="samples per prompt at temperature 1.0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
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
        task_config = (json.loads(args.task_config) if args.task_config is not None
                       else dict(DEFAULT_TASK_CONFIGS.get(args.task, {})))
    except json.JSONDecodeError as e:
        print(f"error: --task-config is not valid JSON: {e}", file=sys.stderr)
        return 2
    if not isinstance(task_config, dict):
        print("error: --task-config must be a JSON object", file=sys.stderr)
        return 2
    if args.sft_steps < 0:
        print("error: --sft-steps must be >= 0", file=sys.stderr)
        return 2

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    try:
        core = build_tokenizer(tmp_dir, args.task, task_config, args.seed)
        model = build_model(core, args.seed)
        model.config.save_pretrained(tmp_dir)  # AutoTokenizer picks the tokenizer class from config.json
        tok = check_tokenizer(tmp_dir, core, tokenizer_samples(args.task, task_config, args.seed))
        n_params = sum(p.numel() for p in model.parameters())
        print(f"tokenizer: {tok.vocab_size} tokens; model: {n_params / 1e6:.2f} M parameters "
              f"({MODEL_SHAPE['num_hidden_layers']} layers, hidden {MODEL_SHAPE['hidden_size']})", flush=True)
        sft_info, accuracy = None, None
        if args.sft_steps > 0:
            print(f"SFT on reasoning_gym/{args.task} {json.dumps(task_config)}: up to {args.sft_steps} steps × "
                  f"{args.sft_batch_size}, stopping at expected accuracy {args.target_accuracy}", flush=True)
            # For tiny task spaces 1000 problems already cover every one (chain_sum as configured has 200).
            data = sft_data(tok, args.task, task_config, max(1000, args.sft_steps * args.sft_batch_size // 4),
                            args.seed)
            val = sft_data(tok, args.task, task_config, 64, args.seed + 1, split="validation")
            sft_info = sft(model, data, tok.pad_id, args.sft_steps, args.seed, args.sft_batch_size, args.sft_lr,
                           val=val, target=args.target_accuracy)
            if args.eval_prompts > 0:
                t0 = time.perf_counter()
                accuracy = measure_accuracy(model, tok, args.task, task_config, args.eval_prompts,
                                            args.eval_samples, args.seed)
                print(f"accuracy at temperature 1.0: {accuracy:.3f} ({args.eval_prompts} held-out prompts × "
                      f"{args.eval_samples} samples, {time.perf_counter() - t0:.1f} s)", flush=True)
        save(model, tok, tmp_dir)
        record = {
            "task": args.task, "data_source": f"reasoning_gym/{args.task}", "reasoning_gym_config": task_config,
            "seed": args.seed, "sft": sft_info, "sft_steps": args.sft_steps,
            "eval": None if accuracy is None else {"accuracy": accuracy, "prompts": args.eval_prompts,
                                                   "samples_per_prompt": args.eval_samples, "temperature": 1.0,
                                                   "split": "validation"},
            "vocab_size": tok.vocab_size, "n_parameters": n_params, "model_shape": MODEL_SHAPE,
        }
        with open(os.path.join(tmp_dir, "tiny_model.json"), "w") as f:
            json.dump(record, f, indent=2)
        install(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    acc = "not measured" if accuracy is None else f"{accuracy:.3f}"
    steps = 0 if sft_info is None else sft_info["steps_run"]
    print(f"wrote {args.out_dir}: vocab {tok.vocab_size}, {n_params / 1e6:.2f} M params, SFT {steps} steps, "
          f"accuracy {acc}, {time.perf_counter() - t_start:.1f} s total\n"
          f"RL data: train='reasoning_gym/{args.task}', reasoning_gym_config={json.dumps(task_config)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

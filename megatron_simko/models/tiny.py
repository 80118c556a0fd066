"""The tiny warm-started model for CPU runs (quickstart, toy pass@K study): a local tokenizer, a tiny Qwen2 from a
config, and a short SFT warm start. CLI: ``tools/make_tiny_model.py``.

1. Tokenizer: a byte-level BPE (Qwen2's pre-tokenization) trained on reasoning-gym text plus the response format,
   saved as a Hugging Face tokenizer folder (ChatML symbols are single tokens; eos = <|im_end|>, pad =
   <|endoftext|>), and checked after reloading it the way vLLM and the trainer do (see `build_tokenizer`).
2. Model: Qwen2 with hidden 256, 4 query / 2 KV heads of head_dim 64 (vLLM's CPU attention needs head_dim 64,
   TP=2 divides both head counts and the FFN), `num_layers` layers (2), untied embeddings, vocab =
   len(tokenizer), float32.
3. SFT warm start: a random model never writes a correct \\boxed{} answer, so RL would see all-zero rewards.
   AdamW steps on `<rendered prompt><response_text>.<|im_end|>` (loss on the response only; prompts rendered
   exactly as the trainer renders them) until the accuracy on held-out prompts reaches `target_accuracy`
   (checked every `check_every` steps, at most `sft_steps`): mixed rewards within a group, hence nonzero GRPO
   advantages. The accuracy checked is `stop_metric`: "expected" — the probability of sampling the reference
   response at temperature 1.0 (cheap, noise-free; right for one-answer tasks such as chain_sum) — or
   "sampled" — temperature-1.0 samples scored by the reward function (tasks with many valid answers, e.g.
   countdown, where the reference is only one of them). The sampled accuracy is then measured with the
   repo's reward function (`eval_prompts` held-out prompts × `eval_samples`) and recorded.

The RL run must use the same task and task config (recorded in `tiny_model.json`).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

# Difficulty per task: easy enough that a few minutes of SFT on 2 CPU cores gives a mixed accuracy at temperature 1.
# chain_sum with these options is "a ± b =" with one-digit operands (200 problems, answers -9..18).
# countdown with these options: make a target (1..25) from three one-digit numbers with + and -; most problems
# have several valid answers (orders, sign patterns), the exploration the pass@K study is about.
DEFAULT_TASK_CONFIGS = {
    "chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    "countdown": {"min_numbers": 3, "max_numbers": 3, "min_value": 1, "max_value": 9, "min_target": 1,
                  "max_target": 25, "operators": ["+", "-"]},
    "graph_color": {"num_colors": 3, "min_num_vertices": 6, "max_num_vertices": 6, "edge_probability": 0.3},
}
STOP_METRICS = ("expected", "sampled")
PROMPT_STYLES = ("task", "compact")

# The tiny architecture (see the module docstring for why these numbers).
MODEL_SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)
TOKENIZER_VOCAB = 512  # upper bound; a small corpus yields fewer (the byte alphabet alone is 256)


def response_text(example, task: str) -> str:
    """The SFT target after the rendered prompt (eos <|im_end|> is appended as a token).

    chain_sum: restate the expression, then the boxed answer ("3 + 5 = \\boxed{8}."). With the operands a few
    tokens before the answer, a 2-layer model learns the sums in a few hundred steps; answering straight after
    the ~20-token instruction it stays near chance for as long. countdown (operators + and - only): the numbers in
    the given order with the signs that reach the target ("7, 5, 1 → 1" gives "\\boxed{7 - 5 - 1}."), so the
    model copies the numbers in order and only has to choose signs (any other order the checker accepts is
    left for RL to find). Other tasks: "The answer is \\boxed{...}.".
    """
    if task == "chain_sum":
        expr = example.prompt.rsplit(":", 1)[-1].strip()
        if expr.endswith("="):
            return f"{expr} \\boxed{{{example.answer}}}."
    if task == "countdown":
        meta = example.metadata["rg_entry"]["metadata"]
        expr = signed_sum(meta["numbers"], meta["target"])
        return f"\\boxed{{{expr if expr is not None else example.answer}}}."
    if task == "graph_color":
        return "\\boxed{" + json.dumps(uniform_coloring(example), separators=(",", ":")) + "}."
    return f"The answer is \\boxed{{{example.answer}}}."


def uniform_coloring(example) -> dict:
    """graph_color: a colouring drawn uniformly from ALL valid ones (fixed per problem: the RNG is seeded by the
    problem's split seed and index), {"0": c, ...} — so an SFT on it spreads the model over the valid colours at
    each vertex instead of teaching the greedy first colouring reasoning-gym stores."""
    import random

    puzzle = example.metadata["rg_entry"]["metadata"]["puzzle"]
    vertices, colors = puzzle["vertices"], puzzle["color_options"]
    valid = [c for c in itertools.product(colors, repeat=len(vertices))
             if all(c[vertices.index(u)] != c[vertices.index(v)] for u, v in puzzle["edges"])]
    rng = random.Random(f"{example.metadata.get('rg_seed')}-{example.metadata.get('rg_index')}")
    return {str(v): c for v, c in zip(vertices, rng.choice(valid))}


def signed_sum(numbers, target) -> Optional[str]:
    """"a - b + c": the numbers in order with signs summing to target (a leading + preferred), or None."""
    for signs in itertools.product((1, -1), repeat=len(numbers)):
        if sum(s * n for s, n in zip(signs, numbers)) == target:
            head = f"{'-' if signs[0] < 0 else ''}{numbers[0]}"
            return head + "".join(f" {'+' if s > 0 else '-'} {n}" for s, n in zip(signs[1:], numbers[1:]))
    return None


def restyle(example, task: str, style: str):
    """The prompt the model sees. "task": reasoning-gym's question as generated. "compact" (countdown only):
    "Make 6 from 8, 1, 3." — the same problem and checker (the entry stays in the metadata), ~10 tokens instead
    of the question's ~80 of fixed instructions, which every SFT, RL and evaluation token pays for on a CPU."""
    if style == "task":
        return example
    if style == "compact" and task == "countdown":
        meta = example.metadata["rg_entry"]["metadata"]
        numbers = ", ".join(map(str, meta["numbers"]))
        return dataclasses.replace(example, prompt=f"Make {meta['target']} from {numbers}.")
    if style == "compact" and task == "graph_color":  # "Color 0-5 with 1-3. Edges: 0-3 2-5 4-5."
        p = example.metadata["rg_entry"]["metadata"]["puzzle"]
        edges = " ".join(f"{u}-{v}" for u, v in p["edges"]) or "none"
        return dataclasses.replace(example, prompt=f"Color {p['vertices'][0]}-{p['vertices'][-1]} with "
                                                   f"{p['color_options'][0]}-{p['color_options'][-1]}. Edges: {edges}.")
    raise ValueError(f"prompt style {style!r} is not defined for task {task!r} (styles: task; compact for countdown "
                     f"and graph_color)")


def task_examples(task: str, task_config: dict, split: str, size: int, seed: int, style: str = "task") -> list:
    """PromptExamples of one reasoning-gym split, in the given prompt style."""
    from megatron_simko.data import load_prompts

    return [restyle(ex, task, style)
            for ex in load_prompts(f"reasoning_gym/{task}", split, size=size, seed=seed, **task_config)]


# ----------------------------------------------------------------------------------------------- steps
def build_tokenizer(out_dir: str, task: str, task_config: dict, seed: int, style: str = "task"):
    """Trains the tokenizer on reasoning-gym text and the response format, saves the HF folder, returns the
    core tokenizer (the reference the saved folder is checked against once config.json is next to it).

    Why not the SentencePiece helpers of megatron_simko/data/tokenizer.py: with transformers 5, AutoTokenizer
    (used by vLLM and by HFTokenizer) loads any tokenizer in a folder whose config.json says model_type
    "qwen2" as `Qwen2Tokenizer`, which rebuilds a byte-level BPE pipeline around the stored vocabulary; a
    SentencePiece-unigram export then silently drops spaces, newlines and byte-fallback characters. A byte-level
    BPE built with Qwen2's own pipeline loads identically either way.
    """
    from megatron_simko.data.tokenizer import build_chatml_bpe, rg_corpus

    texts = rg_corpus([task], per_task=500, seed=seed)
    # The configured difficulty, the exact response format and (build_chatml_bpe) the chat roles, so all of them
    # get merges. Special tokens: pad <|endoftext|>, ChatML start, eos <|im_end|> (ids 0, 1, 2).
    for ex in task_examples(task, task_config, "train", 200, seed, style):
        texts += [ex.prompt, response_text(ex, task)]
    return build_chatml_bpe(out_dir, texts, TOKENIZER_VOCAB, eos_token="<|im_end|>",
                            model_max_length=MODEL_SHAPE["max_position_embeddings"])


def tokenizer_samples(task: str, task_config: dict, seed: int, style: str = "task") -> list[str]:
    """Texts for the saved-tokenizer check: full SFT sequences and a few awkward strings."""
    from megatron_simko.data import render_prompt

    texts = [render_prompt(ex) + response_text(ex, task) + "<|im_end|>"
             for ex in task_examples(task, task_config, "validation", 20, seed, style)]
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


def build_model(core, seed: int, num_layers: int = MODEL_SHAPE["num_hidden_layers"]):
    """A randomly initialised tiny Qwen2ForCausalLM (float32) whose vocabulary is exactly the tokenizer's."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=core.get_vocab_size(), **{**MODEL_SHAPE, "num_hidden_layers": num_layers}, hidden_act="silu",
        rms_norm_eps=1e-6,
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


def sft_data(tok, task: str, task_config: dict, size: int, seed: int, split: str = "train",
             style: str = "task") -> list[tuple[list[int], list[int]]]:
    """Encoded (prompt, response + eos) pairs of one split of the task."""
    return [encode_sft_example(ex, tok, task) for ex in task_examples(task, task_config, split, size, seed, style)]


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


def sft(model, data, pad_id: int, steps: int, seed: int, batch_size: int, lr: float,
        check: Optional[Callable] = None, target: float = 0.0, check_every: int = 25, log_every: int = 50) -> dict:
    """Plain-PyTorch SFT: AdamW, warmup + cosine over `steps`, cross-entropy on response tokens only.

    data: (prompt ids, response ids + eos) pairs. check(model) -> accuracy, evaluated every `check_every`
    steps; if `target` > 0, stops as soon as it reaches the target: the step at which a tiny model "gets" the
    arithmetic varies a lot with the seed (e.g. 300 to 700 steps), so a fixed count would give anything from
    near-zero to near-perfect accuracy.
    """
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0, c0, losses, est, step, seen = time.perf_counter(), time.process_time(), [], None, 0, set()
    while step < steps:
        idx = torch.randint(len(data), (batch_size,), generator=gen).tolist()
        seen.update(idx)
        _, loss = response_logprobs(model, [data[i] for i in idx], pad_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        step += 1
        checked = check is not None and (step % check_every == 0 or step == steps)
        if checked:
            est = check(model)
            model.train()
        if log_every and (step % log_every == 0 or step == steps or (checked and target and est >= target)):
            window = losses[-log_every:]
            print(f"  sft step {step:4d}/{steps}  loss {sum(window) / len(window):.4f}  "
                  f"lr {sched.get_last_lr()[0]:.2e}" + ("" if est is None else f"  acc {est:.3f}")
                  + f"  {time.perf_counter() - t0:5.1f} s (cpu {time.process_time() - c0:.1f} s)", flush=True)
        if checked and target and est >= target:
            break
    model.eval()
    return {"steps_run": step, "max_steps": steps, "batch_size": batch_size, "lr": lr, "target": target,
            "stop_accuracy": est, "first_loss": losses[0], "final_loss": losses[-1],
            "seen_problems": sorted(seen),  # indices into data: what the model was trained on
            "seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1)}


def sample_responses(model, tok, prompts: list[list[int]], n_samples: int, seed: int, max_new_tokens: int = 32,
                     temperature: float = 1.0) -> list[list[int]]:
    """n_samples responses per prompt (prompt-major), sampled with Hugging Face generate (no top-k / top-p),
    each the generated ids up to and including eos (none if it never stopped). Deterministic for a seed."""
    import torch

    T = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), T), tok.pad_id, dtype=torch.long)  # (P, T), left-padded
    attn = torch.zeros((len(prompts), T), dtype=torch.long)
    for b, p in enumerate(prompts):
        input_ids[b, T - len(p):] = torch.tensor(p)
        attn[b, T - len(p):] = 1
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attn, do_sample=True, temperature=temperature,
                             top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, num_return_sequences=n_samples,
                             eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)  # (P * n_samples, T + new)
    responses = []
    for row in out[:, T:].tolist():
        responses.append(row[:row.index(tok.eos_id) + 1] if tok.eos_id in row else row)
    return responses


def measure_accuracy(model, tok, task: str, task_config: dict, n_prompts: int, n_samples: int, seed: int,
                     max_new_tokens: int = 48, verbose: bool = True, style: str = "task") -> float:
    """Per-response accuracy of temperature-1.0 samples (no top-k / top-p) on validation-split prompts,
    scored by the repo's reward function (the one RL uses)."""
    from megatron_simko.data import render_prompt
    from megatron_simko.rewards import RewardScorer

    examples = task_examples(task, task_config, "validation", n_prompts, seed, style)
    prompts = [tok.encode(render_prompt(ex, tok)) for ex in examples]
    responses = [tok.decode(r, skip_special_tokens=True)
                 for r in sample_responses(model, tok, prompts, n_samples, seed, max_new_tokens)]
    with RewardScorer() as scorer:
        rewards = scorer.score(responses, [ex for ex in examples for _ in range(n_samples)])
    for r, x in list(zip(responses, rewards))[:: max(1, len(responses) // 4)] if verbose else []:
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




# ---------------------------------------------------------------------------------------------- the whole
@dataclass
class TinyModelSpec:
    """What `make_tiny_model` builds (recorded in the folder's tiny_model.json)."""

    task: str = "chain_sum"
    task_config: Optional[dict] = None  # None: DEFAULT_TASK_CONFIGS[task] (or no options)
    prompt_style: str = "task"  # "task" | "compact" (countdown): see restyle(); RL and evaluation must use the same
    seed: int = 0
    num_layers: int = MODEL_SHAPE["num_hidden_layers"]
    sft_steps: int = 800  # maximum; 0 = random model (no SFT, no accuracy check)
    sft_batch_size: int = 16
    sft_lr: float = 3e-3
    target_accuracy: float = 0.4  # stop SFT once the stop metric reaches it (0 = run all steps)
    stop_metric: Optional[str] = None  # "expected" | "sampled"; None: expected for chain_sum, else sampled
    check_every: int = 25  # SFT steps between accuracy checks
    eval_prompts: int = 32  # held-out prompts of the final accuracy measurement (0 = skip)
    eval_samples: int = 4
    threads: int = 2

    def resolved(self) -> "TinyModelSpec":
        task_config = dict(DEFAULT_TASK_CONFIGS.get(self.task, {}) if self.task_config is None else self.task_config)
        metric = self.stop_metric or ("expected" if self.task == "chain_sum" else "sampled")
        if metric not in STOP_METRICS:
            raise ValueError(f"stop_metric must be one of {STOP_METRICS}, got {metric!r}")
        if self.prompt_style not in PROMPT_STYLES or (self.prompt_style == "compact"
                                                      and self.task not in ("countdown", "graph_color")):
            raise ValueError(f"prompt_style {self.prompt_style!r}: one of {PROMPT_STYLES}; compact is for countdown "
                             f"and graph_color")
        if self.sft_steps < 0 or self.num_layers < 1:
            raise ValueError("sft_steps must be >= 0 and num_layers >= 1")
        return TinyModelSpec(**{**asdict(self), "task_config": task_config, "stop_metric": metric})


def make_tiny_model(out_dir: str, spec: TinyModelSpec, log: Callable[[str], None] = print) -> dict:
    """Builds the folder in `<out_dir>.tmp-<pid>` and renames it into place (replacing out_dir); returns the
    tiny_model.json record."""
    import torch
    from transformers.utils import logging as hf_logging

    spec = spec.resolved()
    task, cfg = spec.task, spec.task_config
    hf_logging.disable_progress_bar()
    torch.set_num_threads(spec.threads)
    t_start = time.perf_counter()
    out_dir = os.path.abspath(out_dir)
    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    try:
        style = spec.prompt_style
        core = build_tokenizer(tmp_dir, task, cfg, spec.seed, style)
        model = build_model(core, spec.seed, spec.num_layers)
        model.config.save_pretrained(tmp_dir)  # AutoTokenizer picks the tokenizer class from config.json
        tok = check_tokenizer(tmp_dir, core, tokenizer_samples(task, cfg, spec.seed, style))
        n_params = sum(p.numel() for p in model.parameters())
        log(f"tokenizer: {tok.vocab_size} tokens; model: {n_params / 1e6:.2f} M parameters "
            f"({spec.num_layers} layers, hidden {MODEL_SHAPE['hidden_size']})")
        sft_info, accuracy = None, None
        if spec.sft_steps > 0:
            log(f"SFT on reasoning_gym/{task} {json.dumps(cfg)}: up to {spec.sft_steps} steps × "
                f"{spec.sft_batch_size}, stopping at {spec.stop_metric} accuracy {spec.target_accuracy}")
            # For tiny task spaces 1000 problems already cover every one (chain_sum as configured has 200).
            data = sft_data(tok, task, cfg, max(1000, spec.sft_steps * spec.sft_batch_size // 4), spec.seed,
                            style=style)
            if spec.stop_metric == "expected":
                val = sft_data(tok, task, cfg, 64, spec.seed + 1, split="validation", style=style)
                check = lambda m: expected_accuracy(m, val, tok.pad_id)  # noqa: E731
            else:
                check = lambda m: measure_accuracy(m, tok, task, cfg, 32, 4, spec.seed + 1,  # noqa: E731
                                                   verbose=False, style=style)
            sft_info = sft(model, data, tok.pad_id, spec.sft_steps, spec.seed, spec.sft_batch_size, spec.sft_lr,
                           check=check, target=spec.target_accuracy, check_every=spec.check_every)
            sft_info["stop_metric"] = spec.stop_metric
            sft_info["train_problems"] = len(data)
            if spec.eval_prompts > 0:
                t0 = time.perf_counter()
                accuracy = measure_accuracy(model, tok, task, cfg, spec.eval_prompts, spec.eval_samples, spec.seed,
                                            style=style)
                log(f"accuracy at temperature 1.0: {accuracy:.3f} ({spec.eval_prompts} held-out prompts × "
                    f"{spec.eval_samples} samples, {time.perf_counter() - t0:.1f} s)")
        save(model, tok, tmp_dir)
        record = {
            "task": task, "data_source": f"reasoning_gym/{task}", "reasoning_gym_config": cfg, "prompt_style": style,
            "seed": spec.seed, "sft": sft_info, "sft_steps": spec.sft_steps, "spec": asdict(spec),
            "eval": None if accuracy is None else {"accuracy": accuracy, "prompts": spec.eval_prompts,
                                                   "samples_per_prompt": spec.eval_samples, "temperature": 1.0,
                                                   "split": "validation"},
            "vocab_size": tok.vocab_size, "n_parameters": n_params,
            "model_shape": {**MODEL_SHAPE, "num_hidden_layers": spec.num_layers},
            "seconds": round(time.perf_counter() - t_start, 1),
        }
        with open(os.path.join(tmp_dir, "tiny_model.json"), "w") as f:
            json.dump(record, f, indent=2)
        install(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return record

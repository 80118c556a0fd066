"""The GPU smoke run's inputs (tools/gpu_smoke.py): procedural one-digit sums in prompt templates of different
lengths, a locally trained byte-level BPE tokenizer with ChatML specials, a Qwen2 model from a config per mode
(``MODES``: gpu — the real Qwen2.5 vocabulary, bf16; cpu — a tiny fp32 one) with a short SFT warm start, and the
training config of its RL launches.
"""
from __future__ import annotations

import os
import random

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
# Prompt templates of different token lengths: a rollout batch mixes them, so prompts are left-padded.
TEMPLATES = ("Calculate: {e} =", "Compute the value of this expression: {e} =",
             "Work out the following sum or difference, then give the result: {e} =")


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
    from megatron_simko.data import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM
    from megatron_simko.data.tokenizer import build_chatml_bpe

    texts = [DEFAULT_SYSTEM, DEFAULT_INSTRUCTION] + [t for r in rows for t in (r["prompt"], response_text(r))]
    return build_chatml_bpe(model_dir, texts, 512, eos_token="<|endoftext|>")


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


def prompt_lengths(out: str, n: int) -> list[int]:
    """Token lengths of the first n rendered training prompts (the tokenizer the run uses)."""
    from megatron_simko.data import PromptExample, render_prompt
    from megatron_simko.data.tokenizer import load_tokenizer

    tok = load_tokenizer(os.path.join(out, "model"))
    rows = sum_examples(n, 0)
    return [len(tok.encode(render_prompt(PromptExample(r["prompt"], r["answer"], r["data_source"]), tok)))
            for r in rows]

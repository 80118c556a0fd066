"""Tiny Hugging Face Qwen2 checkpoints for the rollout tests (random weights, no tokenizer: token-id prompts)."""
from __future__ import annotations

import os

import torch

# head_dim 64 (vLLM CPU attention supports it); 4 query heads / 2 KV groups so TP=2 splits whole groups (GQA).
TINY = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512,
            num_hidden_layers=2, vocab_size=500, max_position_embeddings=256)


def make_tiny_qwen2(path: str, tie: bool = False, seed: int = 0, eos_token_id=None, **overrides) -> str:
    """Save a random Qwen2ForCausalLM (fp32 safetensors) to ``path``; returns ``path``. Idempotent."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    from transformers import Qwen2Config, Qwen2ForCausalLM

    kwargs = {**TINY, **overrides}
    cfg = Qwen2Config(tie_word_embeddings=tie, eos_token_id=eos_token_id, bos_token_id=None, torch_dtype="float32",
                      **kwargs)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():  # larger logits than the default init, so sampling is far from uniform
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
        model.lm_head.weight.mul_(8.0) if not tie else model.model.embed_tokens.weight.mul_(4.0)
    model.save_pretrained(path)
    return path

"""Prompt data: files (jsonl / parquet), reasoning-gym tasks, the resumable loader, chat rendering, tokenizers."""
from .datasets import drop_long_prompts, load_prompts, prompt_token_ids
from .loader import PromptLoader
from .procedural import ReasoningGymPrompts, rg_splits, rg_task_names
from .prompts import (DEFAULT_INSTRUCTION, DEFAULT_SYSTEM, PromptExample, build_messages, load_prompt_file,
                      load_prompt_files, render_chatml, render_prompt, write_prompt_jsonl)

__all__ = ["DEFAULT_INSTRUCTION", "DEFAULT_SYSTEM", "PromptExample", "PromptLoader", "ReasoningGymPrompts",
           "build_messages", "drop_long_prompts", "load_prompt_file", "load_prompts", "load_prompt_files",
           "prompt_token_ids", "render_chatml", "render_prompt", "rg_splits", "rg_task_names", "write_prompt_jsonl"]

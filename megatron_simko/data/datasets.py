"""One entry point for a prompt dataset named in a config (a file, or a built-in reasoning-gym task), and the
load-time filter that drops prompts longer than the rollout's prompt budget."""
from __future__ import annotations

from typing import Any, Sequence

from .procedural import SOURCE_PREFIX, ReasoningGymPrompts, VAL_SEED_OFFSET
from .prompts import PromptExample, load_prompt_files, render_prompt


def load_prompts(spec: str | Sequence[str], split: str = "train", size: int | None = None, seed: int = 0,
                 data_source: str | None = None, skip_malformed: bool = False,
                 **rg_config: Any) -> Sequence[PromptExample]:
    """Prompts for `spec`:
    - "reasoning_gym/<task>": `size` generated problems (default 1000), seed `seed` for split "train" and
      `seed + VAL_SEED_OFFSET` for "validation"; rg_config goes to the task's config;
    - a .jsonl / .parquet path, or a list of them: all rows (the first `size` if given).
    """
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    if isinstance(spec, str) and spec.startswith(SOURCE_PREFIX):
        task_seed = seed if split == "train" else seed + VAL_SEED_OFFSET
        return ReasoningGymPrompts(spec[len(SOURCE_PREFIX):], size or 1000, task_seed, **rg_config)
    if rg_config:
        raise ValueError(f"options {sorted(rg_config)} only apply to reasoning_gym/<task> datasets")
    examples = load_prompt_files([spec] if isinstance(spec, str) else list(spec), data_source, skip_malformed)
    return examples[:size] if size else examples


def prompt_token_ids(example: PromptExample, tokenizer, system: str | None, instruction: str) -> list[int]:
    """The token ids the rollout engine is given for `example`: its chat rendering, tokenized."""
    return tokenizer.encode(render_prompt(example, tokenizer, system=system, instruction=instruction))


def drop_long_prompts(examples: Sequence[PromptExample], tokenizer, max_length: int, system: str | None,
                      instruction: str, name: str = "prompts") -> tuple[list[PromptExample], int]:
    """(the examples whose rendered prompt fits in `max_length` tokens, how many were dropped).

    Done once when a dataset loads, so an over-long prompt never reaches a rollout (and a resumed run, which
    filters the same way, never replays one). ValueError naming `name` if no prompt fits."""
    kept = [ex for ex in examples if len(prompt_token_ids(ex, tokenizer, system, instruction)) <= max_length]
    if not kept:
        raise ValueError(f"{name}: all {len(examples)} prompts are longer than rollout.max_prompt_length="
                         f"{max_length} tokens (after chat rendering); raise rollout.max_prompt_length")
    return kept, len(examples) - len(kept)

"""One entry point for a prompt dataset named in a config: a file, or a built-in reasoning-gym task."""
from __future__ import annotations

from typing import Any, Sequence

from .procedural import SOURCE_PREFIX, ReasoningGymPrompts, VAL_SEED_OFFSET
from .prompts import PromptExample, load_prompt_files


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

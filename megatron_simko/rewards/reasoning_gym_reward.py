"""Procedural-task reward: reasoning-gym's own scorer on the extracted answer, binarized (score == 1.0).

reasoning-gym gives partial credit (e.g. 0.01 for any attempt, 0.05 for a wrong countdown expression); RLVR
wants binary rewards, so only a full score counts.
"""
from __future__ import annotations

from ..data.procedural import SOURCE_PREFIX, rg_score_fn
from .extract import extract_answer


def rg_entry(example) -> dict:
    """The reasoning-gym entry the scorer needs: the generated one if kept, else rebuilt from a file row
    (question, answer, and the row's other fields as the entry's metadata)."""
    entry = example.metadata.get("rg_entry")
    if entry is not None:
        return entry
    return {"question": example.prompt, "answer": example.answer or None,
            "metadata": example.metadata.get("metadata", example.metadata)}


def reasoning_gym_reward(response: str, example) -> float:
    """1.0 if reasoning-gym scores the extracted answer (see `extract_answer`) as fully correct, else 0.0."""
    if not example.data_source.startswith(SOURCE_PREFIX):
        raise ValueError(f"data_source {example.data_source!r} is not a reasoning_gym/<task> source")
    answer = extract_answer(response)
    if answer is None:
        return 0.0
    score_fn = rg_score_fn(example.data_source[len(SOURCE_PREFIX):], example.metadata.get("rg_config"))
    try:
        score = float(score_fn(answer, rg_entry(example)))
    except Exception:
        return 0.0
    return 1.0 if score >= 1.0 - 1e-9 else 0.0

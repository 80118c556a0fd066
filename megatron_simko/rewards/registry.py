"""Reward functions by data_source: the longest registered prefix of an example's data_source wins.

    register_reward("my_task", my_module.my_reward)   # fn(response: str, example: PromptExample) -> float

Sources with no registered prefix use the math reward (the default instruction asks for \\boxed{} answers);
`get_reward_fn(source, strict=True)` raises instead. Functions must be importable module-level callables so
the isolated worker (rewards/worker.py) can run them.
"""
from __future__ import annotations

from typing import Callable

from .math_reward import math_reward
from .reasoning_gym_reward import reasoning_gym_reward

RewardFn = Callable[[str, object], float]

_REGISTRY: dict[str, RewardFn] = {
    "math": math_reward,
    "reasoning_gym/": reasoning_gym_reward,
}
DEFAULT_REWARD: RewardFn = math_reward


def register_reward(prefix: str, fn: RewardFn) -> None:
    """Score examples whose data_source starts with prefix with fn (replaces an earlier registration)."""
    _REGISTRY[prefix] = fn


def registered_prefixes() -> list[str]:
    return sorted(_REGISTRY)


def get_reward_fn(data_source: str, strict: bool = False) -> RewardFn:
    """The reward function for a data_source (longest matching prefix; else the default, or an error)."""
    matches = [p for p in _REGISTRY if data_source.startswith(p)]
    if matches:
        return _REGISTRY[max(matches, key=len)]
    if strict:
        raise KeyError(f"no reward registered for data_source {data_source!r}; prefixes: {registered_prefixes()}")
    return DEFAULT_REWARD


def score_response(response: str, example) -> float:
    """The reward of one response, computed in this process (no hard time limit: see worker.RewardScorer)."""
    return float(get_reward_fn(example.data_source)(response, example))

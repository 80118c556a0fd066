"""Verifiable rewards: math-verify on the last \\boxed{} answer, reasoning-gym's scorers, a registry by
data_source, and an isolated worker that enforces a hard time limit per response.

    scorer = RewardScorer(timeout_s=5.0)
    rewards = scorer.score(responses, examples)     # list[float], 1.0 / 0.0
"""
from .extract import extract_answer, last_boxed
from .math_reward import math_reward
from .reasoning_gym_reward import reasoning_gym_reward
from .registry import get_reward_fn, register_reward, registered_prefixes, score_response
from .worker import RewardScorer, compute_reward, compute_rewards

__all__ = ["RewardScorer", "compute_reward", "compute_rewards", "extract_answer", "get_reward_fn", "last_boxed",
           "math_reward", "reasoning_gym_reward", "register_reward", "registered_prefixes", "score_response"]

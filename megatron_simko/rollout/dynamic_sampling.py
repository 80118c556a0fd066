"""A step's rollouts, scored — with dynamic sampling (DAPO; verl's ``filter_groups``) when configured.

Without it a step generates for one loader batch of ``data.prompts_per_step`` prompts and trains on it. With
``rollout.dynamic_sampling: true`` a group whose n rewards are all equal (all correct or all wrong: every GRPO
advantage 0, no signal) is dropped and replaced: the step draws the next loader batch, generates and scores it,
and keeps its mixed groups, round after round, until it holds ``prompts_per_step`` mixed groups (surplus ones
of the last round are dropped, as in verl) or ``rollout.dynamic_sampling_max_rounds`` rounds ran. Then a short
batch goes on with what it has: every mixed group, topped up with the first uniform groups generated (their
advantages are 0: no gradient, placed last so that a mini-batch of only such groups is skipped by the trainer's
zero-signal rule), with a log line and ``rollout/short_groups`` > 0.

Determinism and resume: round k of step s draws the loader's next batch (the loader's position, extra prompts
included, is what the checkpoint saves) and numbers its prompts k·P … k·P + P − 1 for the per-request seeds
(``rollout.base.request_seed``), so a resumed step regenerates exactly. The keep decision reads the global
rewards every rank holds (scored and gathered before it), so all ranks agree on it without communicating,
for any DP size and any rollout backend.

Metrics: ``rollout/generation_rounds``, ``rollout/kept_group_fraction`` (mixed groups / groups generated),
``rollout/short_groups``, ``rollout/generated_reward_mean`` (over everything generated; ``reward/mean`` is the
trained batch's).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from megatron_simko.rollout.base import RolloutResult


@dataclass
class StepRollouts:
    """The step's prompt batch, in training order: examples, prompt ids, results (prompt_index = position in the
    batch), rewards [P·n] and the global reward-failure counts and dynamic-sampling metrics."""

    examples: list
    prompt_ids: List[List[int]]
    results: List[RolloutResult]
    rewards: torch.Tensor
    metrics: Dict[str, float]


def score_globally(scorer, tokenizer, results: Sequence[RolloutResult], examples: Sequence,
                   log: Callable[[str], None] = print) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Decode and score every response of the global batch: each rank scores a contiguous slice, then all
    ranks gather all rewards (so rollout metrics and the keep decision are global without further
    communication), and the global count of reward failures (reward/timeouts, reward/errors,
    reward/verify_timeouts: each scored 0.0). ``scorer``: a rewards.RewardScorer."""
    import torch.distributed as dist

    from megatron_simko.rollout.sharding import shard_bounds

    flat = [(p, s) for p, r in enumerate(results) for s in r.samples]
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    lo, hi = shard_bounds(len(flat), rank, world)
    texts = [tokenizer.decode(s.token_ids, skip_special_tokens=True) for _, s in flat[lo:hi]]
    before = scorer.counters()
    mine = scorer.score(texts, [examples[p] for p, _ in flat[lo:hi]])
    failed = {k: v - before[k] for k, v in scorer.counters().items()}
    parts = [(mine, failed)]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (mine, failed))
    rewards = [x for part, _ in parts for x in part]
    failures = {f"reward/{k}": float(sum(f[k] for _, f in parts)) for k in failed}
    if any(failures.values()):
        log(f"warning: {', '.join(f'{int(v)} {k[7:]}' for k, v in failures.items())} among {len(flat)} responses "
            f"(scored 0.0): raise data.reward_timeout_s, or check the reward function / the machine's load")
    return torch.tensor(rewards, dtype=torch.float32), failures


def mixed_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[P] bool: whether each group of ``group_size`` consecutive rewards holds two different values."""
    r = rewards.view(-1, group_size)
    return r.amax(dim=1) != r.amin(dim=1)


def fill_order(mixed_per_round: Sequence[torch.Tensor], batch_prompts: int) -> Tuple[List[Tuple[int, int]], int]:
    """Which generated groups make the step's batch: ([(round, group index)], number of uniform fill-ins).

    Mixed groups first, in generation order, at most ``batch_prompts``; if fewer, the first uniform groups
    generated fill the rest."""
    mixed = [(k, i) for k, m in enumerate(mixed_per_round) for i in range(len(m)) if m[i]]
    uniform = [(k, i) for k, m in enumerate(mixed_per_round) for i in range(len(m)) if not m[i]]
    short = max(0, batch_prompts - len(mixed))
    return mixed[:batch_prompts] + uniform[:short], short


def collect_step_rollouts(next_examples: Callable[[], list], encode: Callable[[list], List[List[int]]],
                          generate: Callable[[List[List[int]], int], List[RolloutResult]],
                          score: Callable[[List[RolloutResult], list], Tuple[torch.Tensor, Dict[str, float]]],
                          group_size: int, dynamic: bool, max_rounds: int,
                          log: Callable[[str], None] = print, step: int = 0) -> StepRollouts:
    """Generate and score the step's batch (module docstring). Collective (every rank calls it identically).

    next_examples(): the loader's next global batch; encode(examples) → prompt ids; generate(prompt_ids,
    prompt_offset) → results in prompt order, prompt_index from prompt_offset; score(results, examples) →
    (global rewards [P·n], reward-failure counts)."""
    rounds: List[Tuple[list, List[List[int]], List[RolloutResult], torch.Tensor]] = []
    failures: Dict[str, float] = {}
    batch_prompts = None
    while True:
        examples = next_examples()
        batch_prompts = batch_prompts or len(examples)
        ids = encode(examples)
        results = generate(ids, len(rounds) * batch_prompts)
        rewards, failed = score(results, examples)
        for key, value in failed.items():
            failures[key] = failures.get(key, 0.0) + value
        rounds.append((examples, ids, results, rewards))
        if not dynamic:
            return StepRollouts(examples, ids, results, rewards, failures)
        kept = sum(int(mixed_groups(r[3], group_size).sum()) for r in rounds)
        if kept >= batch_prompts or len(rounds) >= max_rounds:
            break

    mixed = [mixed_groups(r[3], group_size) for r in rounds]
    order, short = fill_order(mixed, batch_prompts)
    generated = sum(len(m) for m in mixed)
    if short:
        log(f"step {step}: dynamic sampling kept {batch_prompts - short} mixed-reward groups of {generated} "
            f"generated in {len(rounds)} rounds (rollout.dynamic_sampling_max_rounds={max_rounds}); the batch is "
            f"topped up with {short} all-equal groups (advantage 0, no gradient)")
    rewards = torch.cat([rounds[k][3].view(-1, group_size)[i] for k, i in order])
    results = [dataclasses.replace(rounds[k][2][i], prompt_index=p) for p, (k, i) in enumerate(order)]
    metrics = {**failures,
               "rollout/generation_rounds": float(len(rounds)),
               "rollout/kept_group_fraction": float(sum(int(m.sum()) for m in mixed)) / generated,
               "rollout/short_groups": float(short),
               "rollout/generated_reward_mean": float(torch.cat([r[3] for r in rounds]).float().mean())}
    return StepRollouts([rounds[k][0][i] for k, i in order], [rounds[k][1][i] for k, i in order], results,
                        rewards, metrics)

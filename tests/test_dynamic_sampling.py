"""rollout.dynamic_sampling (rollout/dynamic_sampling.py) and loss.grpo_warmup_steps (losses/schedule.py): the
keep/fill rule, the rounds cap, determinism and exact resume through the real PromptLoader's state, and the
warm-up's mode at each step (a function of the step number alone)."""
import pytest
import torch

from megatron_simko.config import ConfigError, config_from_dict
from megatron_simko.data.loader import PromptLoader
from megatron_simko.losses import SimKOConfig
from megatron_simko.losses.schedule import in_grpo_warmup, loss_config_at_step, warmup_log_line
from megatron_simko.rollout.base import RolloutResult, RolloutSample, request_seed
from megatron_simko.rollout.dynamic_sampling import collect_step_rollouts, fill_order, mixed_groups

N = 4  # samples per prompt


def test_mixed_groups_and_fill_order():
    rewards = torch.tensor([1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0.0])
    assert mixed_groups(rewards, N).tolist() == [False, True, False, True]
    rounds = [torch.tensor([False, True, False, True]), torch.tensor([True, True, False, False])]
    assert fill_order(rounds, 3) == ([(0, 1), (0, 3), (1, 0)], 0)  # surplus mixed (1, 1) dropped
    # too few mixed groups: all of them, then the first uniform groups generated
    assert fill_order(rounds, 6) == ([(0, 1), (0, 3), (1, 0), (1, 1), (0, 0), (0, 2)], 2)


class Dataset(list):
    """Prompts 0..P-1 as plain ints; a prompt's reward pattern is a deterministic function of (prompt, seed)."""


def _engine(examples_seen):
    """generate(ids, offset): results whose samples carry the per-request seed; score: reward 1 iff a bit of the
    prompt id and the seed say so — prompts divisible by 3 get all-equal rewards (uniform groups)."""

    def generate(ids, offset):
        return [RolloutResult(prompt_index=offset + i, prompt_token_ids=[p],
                              samples=[RolloutSample([p], [0.0], "stop", seed=request_seed(7, 5, offset + i, j))
                                       for j in range(N)]) for i, p in enumerate(ids)]

    def score(results, examples):
        examples_seen.extend(examples)
        out = []
        for r in results:
            p = r.prompt_token_ids[0]
            out += [0.0] * N if p % 3 == 0 else [float((s.seed >> 3) & 1) if j else 1.0 - (p % 2)
                                                 for j, s in enumerate(r.samples)]
        return torch.tensor(out), {"reward/timeouts": 0.0}

    return generate, score


def _collect(loader, dynamic=True, max_rounds=10, log=None):
    seen = []
    generate, score = _engine(seen)
    got = collect_step_rollouts(loader.next_batch, lambda ex: list(ex), generate, score, N, dynamic, max_rounds,
                                log=log or (lambda msg: None), step=5)
    return got, seen


def test_dynamic_sampling_fills_the_batch_with_mixed_groups_only():
    loader = PromptLoader(Dataset(range(60)), 6, seed=3)
    got, seen = _collect(loader)
    assert len(got.examples) == 6 and len(got.results) == 6 and got.rewards.numel() == 6 * N
    assert mixed_groups(got.rewards, N).all()
    assert all(p % 3 for p in got.examples)
    assert [r.prompt_index for r in got.results] == list(range(6))  # renumbered to batch positions
    rounds = got.metrics["rollout/generation_rounds"]
    assert rounds >= 2 and len(seen) == 6 * rounds  # every round drew one loader batch
    assert got.metrics["rollout/kept_group_fraction"] == sum(1 for p in seen if p % 3) / len(seen)
    assert got.metrics["rollout/short_groups"] == 0
    assert loader.consumed_prompts == 6 * rounds  # the extra prompts are part of the loader's position
    # each kept group is exactly what was generated for that prompt (rewards travel with their group)
    for i, (p, r) in enumerate(zip(got.examples, got.results)):
        assert r.prompt_token_ids == [p]


def test_rounds_cap_goes_on_with_what_it_has_and_says_so():
    loader = PromptLoader(Dataset([0, 3, 6, 9, 1, 2] * 10), 6, seed=0, shuffle=False)  # 2 mixed per batch
    lines = []
    got, _ = _collect(loader, max_rounds=2, log=lines.append)
    assert got.metrics["rollout/generation_rounds"] == 2 and got.metrics["rollout/short_groups"] == 2
    assert got.metrics["rollout/kept_group_fraction"] == 4 / 12
    assert mixed_groups(got.rewards, N).tolist() == [True] * 4 + [False] * 2  # uniform fill-ins last
    assert len(lines) == 1 and "topped up with 2 all-equal groups" in lines[0] and "step 5" in lines[0]


def test_without_dynamic_sampling_one_loader_batch_as_is():
    loader = PromptLoader(Dataset(range(60)), 6, seed=3)
    first = loader.global_indices()
    got, _ = _collect(loader, dynamic=False)
    assert got.examples == first and loader.consumed_prompts == 6
    assert "rollout/generation_rounds" not in got.metrics and got.metrics == {"reward/timeouts": 0.0}


def test_deterministic_and_exact_after_resume():
    """Two steps straight vs one step, loader state saved/restored into a fresh loader, the second step."""
    data = Dataset(range(60))
    straight = PromptLoader(data, 6, seed=3)
    a1, _ = _collect(straight)
    a2, _ = _collect(straight)
    first = PromptLoader(data, 6, seed=3)
    b1, _ = _collect(first)
    resumed = PromptLoader(data, 6, seed=3)
    resumed.load_state_dict(first.state_dict())
    b2, _ = _collect(resumed)
    for x, y in ((a1, b1), (a2, b2)):
        assert x.examples == y.examples and torch.equal(x.rewards, y.rewards) and x.metrics == y.metrics
    assert a1.examples != a2.examples


def test_dynamic_sampling_config_keys():
    cfg = config_from_dict({"rollout": {"dynamic_sampling": True, "dynamic_sampling_max_rounds": 3}})
    assert cfg.rollout.dynamic_sampling and cfg.rollout.dynamic_sampling_max_rounds == 3
    with pytest.raises(ConfigError, match="rollout.dynamic_sampling_max_rounds"):
        config_from_dict({"rollout": {"dynamic_sampling_max_rounds": 0}})


def test_grpo_warmup_mode_at_each_step():
    cfg = SimKOConfig(mode="simko", alpha=0.005, lam=1.05, grpo_warmup_steps=50, clip_high=0.28, entropy_coef=0.01)
    modes = [loss_config_at_step(cfg, s).mode for s in range(1, 101)]
    assert modes == ["grpo"] * 50 + ["simko"] * 50
    warm = loss_config_at_step(cfg, 50)
    assert (warm.clip_high, warm.entropy_coef, warm.alpha) == (0.28, 0.01, 0.005)  # only the mode changes
    assert loss_config_at_step(cfg, 51) is cfg
    assert [in_grpo_warmup(cfg, s) for s in (1, 50, 51)] == [True, True, False]
    # the log: the first step a process runs (a resume too) says where it stands; the switch is announced once
    assert "GRPO warm-up" in warmup_log_line(cfg, 1, 1) and warmup_log_line(cfg, 2, 1) is None
    assert "from step 51" in warmup_log_line(cfg, 30, 30)
    assert "warm-up over" in warmup_log_line(cfg, 51, 1) and "warm-up over" in warmup_log_line(cfg, 51, 51)
    assert warmup_log_line(cfg, 60, 60) is None
    assert all(warmup_log_line(SimKOConfig(), s, 1) is None for s in (1, 2))
    assert loss_config_at_step(SimKOConfig(), 1).mode == "simko"
    with pytest.raises(ValueError, match="grpo_warmup_steps must be an int >= 0"):
        SimKOConfig(grpo_warmup_steps=-1)
    with pytest.raises(ValueError, match="count from 1"):
        in_grpo_warmup(cfg, 0)

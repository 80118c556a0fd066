"""GRPO group advantages against a direct computation from SIMKO_SPEC.md's definition."""
import statistics

import pytest
import torch

from megatron_simko.advantages import grpo_advantages


def test_matches_definition():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    adv = grpo_advantages(rewards, group_size=4)
    for g in range(3):
        group = rewards[4 * g: 4 * g + 4].tolist()
        mean, std = statistics.mean(group), statistics.stdev(group)  # unbiased
        for j, r in enumerate(group):
            assert adv[4 * g + j].item() == pytest.approx((r - mean) / (std + 1e-6), abs=1e-7)
    assert torch.all(adv[4:8] == 0)  # all-correct group: no signal


def test_group_of_one_and_errors():
    assert torch.equal(grpo_advantages(torch.tensor([1.0, 0.0]), 1), torch.zeros(2))
    with pytest.raises(ValueError, match="groups of 3"):
        grpo_advantages(torch.ones(4), 3)
    with pytest.raises(ValueError, match="1-D"):
        grpo_advantages(torch.ones(2, 2), 2)

"""GRPO group advantages against a direct computation from SIMKO_SPEC.md's definition."""
import statistics

import pytest
import torch

from megatron_simko.advantages import grpo_advantages, minibatches_with_signal


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


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_minibatches_with_signal_match_the_trainers_minibatches(dp):
    """A mini-batch has signal iff some advantage in it is non-zero; mini-batch j on DP rank r holds the
    prompts r·P/dp + j·m … (m = mini_batch_size / dp): rebuilt here prompt by prompt from the advantages."""
    g = torch.Generator().manual_seed(dp)
    n, P, M = 4, 16, 8
    groups = [[1.0] * n, [0.0] * n, [1.0, 0.0, 0.0, 1.0]]
    choice = torch.randint(0, 2, (P,), generator=g).tolist()  # mostly all-correct / all-wrong groups
    choice[5] = 2  # one mixed group: mini-batch (5 % (P // dp)) // (M // dp) has signal
    rewards = torch.tensor([x for c in choice for x in groups[c]])
    adv = grpo_advantages(rewards, n).view(P, n)
    per_rank, m = P // dp, M // dp
    expected = [any(bool(adv[r * per_rank + j * m + k].ne(0).any()) for r in range(dp) for k in range(m))
                for j in range(per_rank // m)]
    assert minibatches_with_signal(rewards, n, dp, M) == expected and sum(expected) == 1
    assert minibatches_with_signal(torch.ones(P * n), n, dp, M) == [False] * (P // M)
    with pytest.raises(ValueError, match="mini-batches of 3 prompts"):
        minibatches_with_signal(rewards, n, dp, 3)

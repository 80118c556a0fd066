"""The ``gated/`` diagnostics (metrics.gated_metrics, experience.rollout_metrics) against an independent
full-vocabulary reference (tests/gated_dist_worker.py): in-process at TP 1, one gloo launch of 2 ranks for
TP 2 and DP 2; plus the device policy and the mixed-group fraction."""
import pytest
import torch

import gated_dist_worker as worker
import loss_dist_worker
from megatron_simko.experience import rollout_metrics
from megatron_simko.metrics import gated_sums
from megatron_simko.trainer.token_stats import PerTokenStats


@pytest.mark.parametrize("check", ["tp", "dp"])
@pytest.mark.parametrize("case", list(worker.CASES))
def test_tp1_matches_the_full_vocabulary_reference(case, check):
    run = worker.check_tp if check == "tp" else worker.check_dp
    failures = run(worker.CASES[case], 0, 1, None)
    assert not failures, "\n".join(failures)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return loss_dist_worker.launch(2, str(tmp_path_factory.mktemp("gated2")), script=worker.__file__)


@pytest.mark.parametrize("check", ["tp", "dp"])
@pytest.mark.parametrize("case", list(worker.CASES))
def test_tp2_and_dp2_match_the_full_vocabulary_reference(two_ranks, case, check):
    failures = two_ranks.get(f"{check}:{case}")
    assert failures is not None, f"{check}:{case} did not run"
    assert not failures, "\n".join(failures)


def test_gated_sums_compute_on_the_trainer_device():
    """Trainer statistics on ``meta`` (refuses CPU operands like CUDA), batch tensors on the CPU."""
    B, S, K = 3, 6, 2
    meta = torch.device("meta")
    st = PerTokenStats(target_logprob=torch.zeros(B, S, device=meta), entropy=torch.zeros(B, S, device=meta),
                       topk_logprob=torch.zeros(B, S, K, device=meta),
                       topk_ids=torch.zeros(B, S, K, dtype=torch.int64, device=meta),
                       is_rank1=torch.zeros(B, S, dtype=torch.bool, device=meta))
    out = gated_sums(st, torch.zeros(B, S, dtype=torch.int64), torch.ones(B, S, dtype=torch.bool), torch.ones(B),
                     alpha=0.1, tau=0.8)
    assert out.device == meta and out.shape == (3, 7 + 2 * K) and out.dtype == torch.float64


def test_mixed_group_fraction():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.2, 0.2, 0.2, 0.2])  # groups of 4
    m = rollout_metrics(rewards, torch.ones(12), torch.zeros(12, dtype=torch.bool), 4)
    assert m["gated/mixed_group_fraction"] == pytest.approx(2 / 3)  # partial credit that differs is mixed too

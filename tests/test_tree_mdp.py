"""The tabular tree-MDP toy (megatron_simko/toy/tree_mdp.py, docs/casp.md): exact table metrics, the loss it
trains with is the project's simko_loss (α = 0, λ = 1 is GRPO update for update, in both λ forms), and measured
properties of the declared grid's runs (seed 0, lr 0.2, 150 steps; docs/casp_toy/results.json): GRPO collapses,
the entropy bonus and CaSP at α = 1 (τ = 0) keep several modes."""
import math

import pytest
import torch

from megatron_simko.losses import SimKOConfig
from megatron_simko.toy.tree_mdp import (MODES, NUM_STATES, SEQUENCES, ToyRun, sequence_logprobs, state_index,
                                         table_metrics, train_toy)


def test_table_metrics_are_exact():
    theta = torch.zeros(NUM_STATES, 4)
    m = table_metrics(theta)  # uniform policy: every sequence 1/64
    assert m["accuracy"] == pytest.approx(6 / 64, abs=1e-12)
    assert m["effective_modes"] == pytest.approx(6.0, abs=1e-9)
    assert m["distinct_modes_1000"] == pytest.approx(6 * (1 - (1 - 1 / 64) ** 1000), abs=1e-9)
    # all mass on BDC: B at the root, D after B, C after BD
    theta = torch.full((NUM_STATES, 4), -1e4, dtype=torch.float64)
    theta[0, 1] = theta[state_index([1]), 3] = theta[state_index([1, 3]), 2] = 0.0
    m = table_metrics(theta)
    assert m["p_BDC"] == pytest.approx(1.0) and m["accuracy"] == pytest.approx(1.0)
    assert m["effective_modes"] == pytest.approx(1.0) and m["distinct_modes_1000"] == pytest.approx(1.0)
    assert sequence_logprobs(torch.randn(NUM_STATES, 4)).exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    assert len(SEQUENCES) == 64 and len(MODES) == 6


@pytest.mark.parametrize("form", ["advantage", "ratio"])
def test_alpha0_lambda1_is_grpo_update_for_update(form):
    runs = [ToyRun("x", loss=loss, lr=0.2, steps=20) for loss in
            (SimKOConfig(mode="grpo"), SimKOConfig(mode="simko", alpha=0.0, lam=1.0, lam_form=form))]
    grpo, simko = (train_toy(r, record_every=1) for r in runs)
    assert torch.equal(grpo["theta"], simko["theta"])
    assert grpo["history"] == simko["history"]
    assert not torch.equal(grpo["theta"], torch.zeros_like(grpo["theta"]))  # it did train


def test_grpo_collapses_and_the_levers_keep_modes():
    """Measured (docs/casp.md): after 150 steps at lr 0.2, seed 0, GRPO's effective number of modes is 1.11
    (bound 1.5, the declared collapse rule); the entropy bonus 0.2 keeps 5.66 and CaSP α = 1, τ = 0 keeps 3.90
    (bound 3 for both), all at accuracy > 0.99."""
    results = {name: train_toy(ToyRun(name, loss=loss, lr=0.2, seed=0, steps=150))["final"] for name, loss in {
        "grpo": SimKOConfig(mode="grpo"),
        "entropy": SimKOConfig(mode="grpo", entropy_coef=0.2),
        "casp": SimKOConfig(mode="simko", alpha=1.0, lam=1.1, tau=0.0),
    }.items()}
    assert results["grpo"]["effective_modes"] < 1.5
    assert results["entropy"]["effective_modes"] > 3.0 and results["casp"]["effective_modes"] > 3.0
    assert all(r["accuracy"] > 0.99 for r in results.values())
    assert all(math.isfinite(v) for r in results.values() for v in r.values())

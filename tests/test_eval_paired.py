"""Paired pass@k differences (eval/paired.py) against a direct computation."""
import numpy as np
import pytest

from megatron_simko.eval.paired import format_paired_table, paired_differences, pairs
from megatron_simko.eval.passk import pass_at_k

KS = [1, 4, 8]


def _counts(rng, P=12, n=8):
    return [(n, int(c)) for c in rng.integers(0, n + 1, size=P)]


def test_pairs_match_seeds_and_skip_the_reference_and_unseeded_models():
    got = pairs(["base", "grpo-s1", "grpo-s2", "simko-s1", "simko-s2", "simko-s3", "kl_cov-s7"], "grpo")
    assert got == {"simko": [(1, "simko-s1", "grpo-s1"), (2, "simko-s2", "grpo-s2")]}


def test_paired_differences_equal_the_direct_mean_and_the_band_brackets_it():
    rng = np.random.default_rng(0)
    pp = {(m, "heldout"): _counts(rng) for m in ["base", "grpo-s1", "grpo-s2", "simko-s1", "simko-s2"]}
    rows = paired_differences(pp, "grpo", KS, replicates=500)
    assert [(r["arm"], r["seed"]) for r in rows] == [("simko", 1), ("simko", 2), ("simko", "mean")]
    per_seed = []
    for s in (1, 2):
        a, r = pp[(f"simko-s{s}", "heldout")], pp[(f"grpo-s{s}", "heldout")]
        direct = {k: np.mean([pass_at_k(n, c, k) - pass_at_k(n2, c2, k) for (n, c), (n2, c2) in zip(a, r)])
                  for k in KS}
        per_seed.append(direct)
        for k in KS:
            diff, lo, hi = rows[s - 1][k]
            assert diff == pytest.approx(direct[k], abs=1e-12) and lo <= diff <= hi and lo < hi
    for k in KS:
        diff, lo, hi = rows[2][k]
        assert diff == pytest.approx((per_seed[0][k] + per_seed[1][k]) / 2, abs=1e-12) and lo <= diff <= hi


def test_identical_arms_give_a_zero_difference_with_a_zero_band():
    rng = np.random.default_rng(1)
    c = _counts(rng)
    rows = paired_differences({("grpo-s1", "heldout"): c, ("simko-s1", "heldout"): list(c)}, "grpo", KS,
                              replicates=100)
    assert all(rows[0][k] == (0.0, 0.0, 0.0) for k in KS)
    table = format_paired_table(rows, KS, "grpo")
    assert table.splitlines()[0].startswith("| arm − grpo | seed | Δ pass@1") and "| simko | 1 | +0.000" in table


def test_bad_inputs_are_named():
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match="no 'grpo-s<seed>' model"):
        paired_differences({("simko-s1", "heldout"): _counts(rng)}, "grpo", KS)
    with pytest.raises(ValueError, match="not a pair"):
        paired_differences({("grpo-s1", "heldout"): _counts(rng, P=5), ("simko-s1", "heldout"): _counts(rng, P=6)},
                           "grpo", KS)

"""pass@k: the unbiased estimator of Chen et al. (2021), "Evaluating Large Language Models Trained on Code".

With n samples of which c are correct, pass@k = 1 - C(n-c, k) / C(n, k): the probability that a random
k-subset of the n samples contains a correct one. Computed in product form,
    C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i),
which never forms the (huge) binomials and is exact to float rounding.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """pass@k of one problem with n samples, c correct (1 <= k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, plus n itself."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else ks + [n]


def pass_at_k_table(counts: Iterable[tuple[int, int]], ks: Sequence[int] | None = None) -> dict[int, float]:
    """{k: mean over problems of pass@k} from (n, c) per problem. All problems need n >= max(ks);
    by default ks = default_ks(min n)."""
    counts = [(int(n), int(c)) for n, c in counts]
    if not counts:
        raise ValueError("no problems")
    n_min = min(n for n, _ in counts)
    ks = list(ks) if ks is not None else default_ks(n_min)
    if max(ks) > n_min:
        raise ValueError(f"pass@{max(ks)} needs at least {max(ks)} samples per problem; a problem has {n_min}")
    return {k: float(np.mean([pass_at_k(n, c, k) for n, c in counts])) for k in ks}


def format_table(table: dict[int, float], title: str = "") -> str:
    """A small fixed-width text table: one row per k."""
    lines = [title] if title else []
    lines.append(f"{'k':>6}  {'pass@k':>8}")
    lines += [f"{k:>6}  {v:>8.4f}" for k, v in sorted(table.items())]
    return "\n".join(lines)


def pass_at_k_curve(n: int, c: int) -> np.ndarray:
    """[pass@1, ..., pass@n] of one problem."""
    return np.array([pass_at_k(n, c, k) for k in range(1, n + 1)])


def bootstrap_replicates(pk: np.ndarray, seed_idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap replicates of the mean pass@k curve over seeds and problems.

    pk: [S, P, K] pass@k of seed s (e.g. one trained model per seed) on problem p at the k-th k;
    seed_idx: [B, S] seeds drawn with replacement per replicate (zeros when S = 1: then only problems vary).
    Each replicate also draws P problems with replacement; returns [B, K], replicate b's mean over its draws.
    Sharing seed_idx across benchmarks lets a caller average replicates into the cross-benchmark mean.
    """
    B, P = seed_idx.shape[0], pk.shape[1]
    prob_idx = rng.integers(0, P, size=(B, P))
    return np.stack([pk[seed_idx[b]][:, prob_idx[b]].mean(axis=(0, 1)) for b in range(B)])


def percentile_band(replicates: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) percentile interval of [B, K] bootstrap replicates, per k."""
    tail = 50.0 * (1.0 - level)
    return np.percentile(replicates, tail, axis=0), np.percentile(replicates, 100.0 - tail, axis=0)

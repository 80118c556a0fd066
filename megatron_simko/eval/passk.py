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

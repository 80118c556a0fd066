"""Paired differences of pass@k between a study's arms and its reference arm, seed by seed.

Seed s of every arm shares the data, the prompt order and the rollout seeds (eval/study.py), so arm-s and
reference-s are a pair. For a pair the difference at k is the mean over problems p of
    pass@k(arm-s, p) − pass@k(reference-s, p),
with a 95% percentile band from resampling the problems with replacement (the same draws for arm and reference,
so the band is the paired one). "mean over pairs" averages the per-seed differences; its band resamples the
problems jointly for every pair.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np

from .passk import pass_at_k, percentile_band

SEEDED = re.compile(r"^(?P<arm>.+)-s(?P<seed>\d+)$")


def _pk(counts: Sequence[tuple[int, int]], ks: Sequence[int]) -> np.ndarray:
    """[P, K] pass@k per problem."""
    return np.array([[pass_at_k(n, c, k) for k in ks] for n, c in counts], dtype=np.float64)


def pairs(models: Sequence[str], reference: str) -> dict[str, list[tuple[int, str, str]]]:
    """{arm: [(seed, arm model, reference model), ...]} for every arm with a reference model of the same seed."""
    seeded = {}
    for name in models:
        m = SEEDED.match(name)
        if m:
            seeded.setdefault(m["arm"], {})[int(m["seed"])] = name
    ref = seeded.get(reference, {})
    return {arm: [(s, runs[s], ref[s]) for s in sorted(runs) if s in ref]
            for arm, runs in seeded.items() if arm != reference and any(s in ref for s in runs)}


def paired_differences(per_problem: Mapping[tuple[str, str], Sequence[tuple[int, int]]], reference: str,
                       ks: Sequence[int], benchmark: str = "heldout", replicates: int = 2000,
                       seed: int = 0) -> list[dict]:
    """Rows {arm, seed ("mean" for the mean over pairs), k: (diff, low, high)} against ``reference``.

    per_problem: {(model, benchmark): [(n, c) per problem, in problem order]} (results.read_per_problem_csv).
    Raises ValueError when the reference arm has no seeded models or a pair covers different problem counts."""
    models = [m for (m, b) in per_problem if b == benchmark]
    found = pairs(models, reference)
    if not any(SEEDED.match(m) and SEEDED.match(m)["arm"] == reference for m in models):
        raise ValueError(f"no '{reference}-s<seed>' model on benchmark {benchmark!r} (models: {sorted(models)})")
    rng = np.random.default_rng(seed)
    rows = []
    for arm, seeds in found.items():
        diffs = []
        for s, a, r in seeds:
            pa, pr = per_problem[(a, benchmark)], per_problem[(r, benchmark)]
            if len(pa) != len(pr):
                raise ValueError(f"{a} has {len(pa)} problems on {benchmark!r}, {r} has {len(pr)}: not a pair")
            diffs.append(_pk(pa, ks) - _pk(pr, ks))
        d = np.stack(diffs)                                    # [S, P, K]
        idx = rng.integers(0, d.shape[1], size=(replicates, d.shape[1]))
        boot = d[:, idx].mean(axis=2)                          # [S, B, K]
        for i, (s, _, _) in enumerate(seeds):
            lo, hi = percentile_band(boot[i])
            rows.append({"arm": arm, "seed": s, **{k: (float(d[i, :, j].mean()), float(lo[j]), float(hi[j]))
                                                   for j, k in enumerate(ks)}})
        lo, hi = percentile_band(boot.mean(axis=0))
        rows.append({"arm": arm, "seed": "mean", **{k: (float(d[:, :, j].mean()), float(lo[j]), float(hi[j]))
                                                    for j, k in enumerate(ks)}})
    return rows


def format_paired_table(rows: Sequence[Mapping], ks: Sequence[int], reference: str) -> str:
    """Markdown: one line per (arm, seed), the difference and its 95% band at each k."""
    head = (f"| arm − {reference} | seed | " + " | ".join(f"Δ pass@{k} [95% band]" for k in ks) + " |\n|---|---|"
            + "---|" * len(ks))
    lines = [f"| {r['arm']} | {r['seed']} | "
             + " | ".join(f"{r[k][0]:+.3f} [{r[k][1]:+.3f}, {r[k][2]:+.3f}]" for k in ks) + " |" for r in rows]
    return "\n".join([head] + lines)

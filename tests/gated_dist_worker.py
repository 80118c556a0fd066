"""The gated-token diagnostics (metrics.gated_metrics) against an independent full-vocabulary reference.

Imported by tests/test_gated_metrics.py (CASES, reference_gated, check_tp, check_dp) and run as a script, one
process per rank (the CLI and launcher of tests/loss_dist_worker.py):
    python tests/gated_dist_worker.py --rank R --world W --port P --out DIR
check_tp: the group is a tensor-parallel group — each rank feeds its vocabulary shard to token_statistics and
the diagnostics must equal the reference on the full logits. check_dp: the same group as a data-parallel group —
each rank holds a row block of the batch (full vocabulary), gated_metrics all-reduces over the group, and the
result must equal the reference over the whole batch. At world 1 both run in-process without a group.

The reference is plain torch on the full logits in float64, written from the definitions (SIMKO_SPEC.md's gate
via torch.quantile per response, sort for the top-K, the gradient vectors e_y − π and α((1/K)Σ e_ck − e_y)
built over the whole vocabulary), sharing no code with the implementation.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from datetime import timedelta
from types import SimpleNamespace

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import loss_dist_worker as base  # noqa: E402  (make_inputs, launch; it puts the repository on sys.path)
from megatron_simko.losses import SimKOConfig, token_statistics  # noqa: E402
from megatron_simko.metrics import gated_metrics  # noqa: E402

TOL = 1e-6  # fp32 statistics vs a float64 reference: rounding only
ROWS = base.ROWS  # vocabulary rows (divisible by the TP sizes tested)
BASE = dict(B=12, L=32, vocab_size=ROWS, top_k=3, temperature=1.0, alpha=0.3, tau=0.8, adv="B", pad_logit=None)
CASES = {
    name: {**BASE, **over} for name, over in {
        "basic": {},
        "per_token_adv_temperature": dict(adv="BL", temperature=0.85),
        "padded_vocab_temperature": dict(vocab_size=ROWS - 5, pad_logit=30.0, temperature=1.3),
        "k4_small_alpha": dict(top_k=4, adv="BL", alpha=0.05),
        "k1_tau_half": dict(top_k=1, tau=0.5, alpha=0.5),
    }.items()
}


def inputs_of(case: dict, seed: int = 0):
    """Full logits [B, L, ROWS], targets, mask, advantages. Most tokens have one clear favourite; ~30% are forks:
    2 or 3 ids (anywhere in the vocabulary, so on different TP shards) lifted by 6–7.5, so the gate opens mostly
    on forks, with near-ties, clear favourites and floors both acting (2-way) and not (3-way); targets are sampled from the distribution itself (rank 1, lower
    ranks and outside the top-K all occur); some advantages are exactly 0 (counted in "all", not in a split)."""
    g = torch.Generator().manual_seed(seed)
    B, L, V = case["B"], case["L"], case["vocab_size"]
    logits = torch.randn(B, L, ROWS, generator=g) * (0.5 + torch.rand(B, L, 1, generator=g))
    for b in range(B):
        for t in range(L):
            fork = bool(torch.rand(1, generator=g) < 0.3)
            width = (2 + int(torch.rand(1, generator=g) < 0.5)) if fork else 1
            ids = torch.randperm(V, generator=g)[:width]
            logits[b, t, ids] += (6.0 if fork else 7.0) + 1.5 * torch.rand(width, generator=g)
    if case["pad_logit"] is not None:  # padding rows: the largest logits, must never count
        logits[..., V:] = case["pad_logit"]
    probs = torch.softmax(logits[..., :V] / case["temperature"], dim=-1)
    targets = torch.multinomial(probs.view(-1, V), 1, generator=g).view(B, L)
    mask = torch.rand(B, L, generator=g) > 0.15
    mask[2] = False  # an empty response
    mask[3] = False
    mask[3, 0] = True  # a one-token response
    if case["adv"] == "B":
        advantages = torch.randn(B, generator=g)
        advantages[0], advantages[1], advantages[4] = 1.0, -1.0, 0.0
    else:
        advantages = torch.randn(B, L, generator=g)
        advantages[torch.rand(B, L, generator=g) < 0.2] = 0.0
    return logits, targets, mask, advantages


def reference_gated(logits, targets, mask, advantages, case: dict) -> tuple[dict, dict]:
    """(metrics with gated_metrics' keys, {split: exact α share}) from the full logits [B, L, ROWS]."""
    K, alpha, tau, V = case["top_k"], case["alpha"], case["tau"], case["vocab_size"]
    z = logits.double()[..., :V] / case["temperature"]
    pi = torch.softmax(z, dim=-1)  # [B, L, V]
    H = -(pi * torch.log_softmax(z, dim=-1)).sum(-1)
    B, L = targets.shape
    A = advantages.double() if advantages.dim() == 2 else advantages.double()[:, None].expand(B, L)
    w = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        if mask[b].any():
            w[b] = (H[b] > torch.quantile(H[b][mask[b]], tau)) & mask[b]
    p_sorted, ids = pi.sort(dim=-1, descending=True)
    acc = {s: dict(n=0.0, rank1=0.0, topk=0.0, floor=0.0, d2=0.0, g2=0.0, lo=0.0, hi=0.0, p=[0.0] * K, lp=[0.0] * K)
           for s in ("all", "pos", "neg")}
    for b, t in w.nonzero().tolist():
        y, a = int(targets[b, t]), float(A[b, t])
        cands = ids[b, t, :K].tolist()
        e = torch.zeros(V, dtype=torch.float64)
        e[y] = 1.0
        G = e - pi[b, t]  # GRPO's logit-gradient of log π(y)
        mean_c = torch.zeros(V, dtype=torch.float64)
        mean_c[cands] = 1.0 / K
        delta = alpha * (mean_c - e)  # what α adds
        known = sorted(set(cands) | {y})
        d_lo = float((G[known] ** 2).sum())
        d_hi = d_lo + float(p_sorted[b, t, K - 1]) * (1.0 - float(pi[b, t, known].sum()))
        for s in ("all", "pos" if a > 0 else "neg" if a < 0 else None):
            if s is None:
                continue
            r = acc[s]
            r["n"] += 1
            r["rank1"] += float(y == int(ids[b, t, 0]))
            r["topk"] += float(y in cands)
            r["floor"] += float(float(p_sorted[b, t, K - 1]) < alpha / K)
            r["d2"] += a * a * float((delta ** 2).sum())
            r["g2"] += a * a * float((G ** 2).sum())
            r["lo"] += a * a * d_lo
            r["hi"] += a * a * d_hi
            for k in range(K):
                r["p"][k] += float(p_sorted[b, t, k])
                r["lp"][k] += math.log(float(p_sorted[b, t, k]))
    out, exact = {}, {}
    for s, r in acc.items():
        n = r["n"]
        out[f"gated/{s}/tokens"] = n
        for key, v in (("rank1_fraction", r["rank1"]), ("in_topk_fraction", r["topk"]), ("floor_fraction", r["floor"]),
                       *((f"p_{k + 1}", r["p"][k]) for k in range(K)), *((f"lambda_{k + 1}", r["lp"][k]) for k in range(K))):
            out[f"gated/{s}/{key}"] = v / n if n else 0.0
        out[f"gated/{s}/alpha_share_lo"] = math.sqrt(r["d2"] / r["hi"]) if r["hi"] else 0.0
        out[f"gated/{s}/alpha_share_hi"] = math.sqrt(r["d2"] / r["lo"]) if r["lo"] else 0.0
        exact[s] = math.sqrt(r["d2"] / r["g2"]) if r["g2"] else 0.0
    out["gated/signal_tokens"] = acc["pos"]["n"] + acc["neg"]["n"]
    return out, exact


def compare(got: dict, want: dict, exact: dict, case: dict) -> list[str]:
    failures = [f"keys differ: {sorted(set(got) ^ set(want))}"] if set(got) != set(want) else []
    for key in sorted(set(got) & set(want)):
        if not math.isclose(got[key], want[key], rel_tol=TOL, abs_tol=TOL):
            failures.append(f"{key}: {got[key]!r} != reference {want[key]!r}")
    for s, share in exact.items():  # the bounds bracket the exact share (up to rounding)
        lo, hi = got[f"gated/{s}/alpha_share_lo"], got[f"gated/{s}/alpha_share_hi"]
        if not lo - TOL <= share <= hi + TOL:
            failures.append(f"{s}: exact α share {share} outside [{lo}, {hi}]")
    # the fixture must exercise what the metrics distinguish
    if not (want["gated/pos/tokens"] and want["gated/neg/tokens"]) or want["gated/all/tokens"] == want["gated/signal_tokens"]:
        failures.append("fixture: a split is empty or no gated token has A = 0")
    if case["top_k"] > 1 and not (0 < want["gated/all/in_topk_fraction"] < 1 and 0 < want["gated/all/floor_fraction"] < 1
                                  and 0 < want["gated/all/rank1_fraction"] < 1):
        failures.append("fixture: a fraction is 0 or 1 over all gated tokens")
    return failures


def config_of(case: dict) -> SimKOConfig:
    return SimKOConfig(mode="grpo", top_k=case["top_k"], alpha=case["alpha"], tau=case["tau"])


def check_tp(case: dict, rank: int, world: int, group) -> list[str]:
    """Vocabulary shards over ``group`` (TP): the diagnostics from token_statistics' global top-K == reference."""
    logits, targets, mask, advantages = inputs_of(case)
    v_local = ROWS // world
    shard = logits[..., rank * v_local:(rank + 1) * v_local]
    stats = token_statistics(shard, targets, case["top_k"], group, case["temperature"], case["vocab_size"], mask=mask)
    batch = SimpleNamespace(tokens=targets, loss_mask=mask, advantages=advantages)
    got = gated_metrics(stats, batch, config_of(case))
    failures = compare(got, *reference_gated(logits, targets, mask, advantages, case), case)
    if world > 1:
        every = [None] * world
        torch.distributed.all_gather_object(every, got, group=group)
        if any(g != every[0] for g in every):
            failures.append("metrics differ across TP ranks")
    return failures


def check_dp(case: dict, rank: int, world: int, group) -> list[str]:
    """Row blocks over ``group`` (DP, full vocabulary on each rank): the all-reduced diagnostics == reference."""
    case = {**case, "B": 13}
    logits, targets, mask, advantages = inputs_of(case, seed=5)
    bounds = {1: [0, 13], 2: [0, 3, 13]}[world]  # uneven blocks; rank 1 starts with the one-token response
    rows = slice(bounds[rank], bounds[rank + 1])
    stats = token_statistics(logits[rows], targets[rows], case["top_k"], None, case["temperature"],
                             case["vocab_size"], mask=mask[rows])
    batch = SimpleNamespace(tokens=targets[rows], loss_mask=mask[rows], advantages=advantages[rows])
    got = gated_metrics(stats, batch, config_of(case), group=group)
    return compare(got, *reference_gated(logits, targets, mask, advantages, case), case)


def main():
    p = argparse.ArgumentParser()
    for flag in ("--rank", "--world", "--port"):
        p.add_argument(flag, type=int, required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank,
                                         world_size=a.world, timeout=timedelta(seconds=60))
    group = torch.distributed.new_group(list(range(a.world)))
    results, t0 = {}, time.time()
    for name, case in CASES.items():
        results[f"tp:{name}"] = check_tp(case, a.rank, a.world, group)
        results[f"dp:{name}"] = check_dp(case, a.rank, a.world, group)
    results["_seconds"] = time.time() - t0
    with open(os.path.join(a.out, f"rank{a.rank}.json"), "w") as f:
        json.dump(results, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

"""Multi-rank checks of the vocab-parallel SimKO loss against the single-device reference.

Imported by tests (CASES, make_inputs, launch) and run as a script, one process per TP rank:
    python tests/loss_dist_worker.py --rank R --world W --port P --out DIR
Every rank runs all CASES inside one gloo process group (process start-up is the expensive part) and writes
DIR/rank{R}.json = {case: [failure messages]}. Each rank builds the same full logits from a seed, feeds its
contiguous vocabulary shard to simko_loss, and compares the loss and its gradient shard with
reference_simko_loss on the full logits. check_dp_selection uses the same group as a data-parallel group: each
rank holds a contiguous row block of one batch, and the KL-Cov / Clip-Cov token selection over the group must
equal the reference's selection on the whole batch.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_simko.losses import SimKOConfig, simko_loss, token_statistics  # noqa: E402
from megatron_simko.losses.covariance import covariance_selection  # noqa: E402
from megatron_simko.losses.reference import reference_simko_loss  # noqa: E402

ROWS = 64  # total vocabulary rows (divisible by every TP size tested)
# fp32: the implementation and the reference differ only by float rounding (~1e-7).
FP32_TOL = dict(rtol=1e-6, atol=1e-6)
# bf16: both sides do fp32 math on the same (exactly representable) values, so the fp32 gradients agree to
# ~1e-7 relative; each is then rounded once to bf16 (8-bit significand), which can split them by at most one
# bf16 ulp <= 2^-7 relative. The loss itself is fp32 in both and keeps the fp32 tolerance.
BF16_GRAD_TOL = dict(rtol=2.0 ** -7, atol=1e-6)
COMM_C, COMM_D = 3, 4  # forward bound: every collective carries <= COMM_C·K·TP + COMM_D elements per token

BASE = dict(B=5, L=20, vocab_size=ROWS, top_k=3, temperature=1.0, mode="simko", alpha=0.3, lam=2.0,
            lam_form="advantage", tau=0.8,
            adv="B", pad_logit=None, spread=False, zero_adv=False, dtype="fp32", chunk_tokens=2048,
            token_normalizer=None, entropy_coef=0.0, kl_cov_ratio=0.002, clip_cov_ratio=0.0002, clip_cov_lb=1.0,
            clip_cov_ub=5.0, selection_seed=0)
# The exploration baselines. Defaults (0.2 % / 0.02 % of ~80 tokens) select one token; the larger fractions and
# the lower Clip-Cov window select several (cov_t of this fixture is O(1)).
COV_WIDE = dict(clip_cov_ratio=0.1, clip_cov_lb=0.2, clip_cov_ub=3.0)
CASES = {
    name: {**BASE, **over} for name, over in {
        "simko_basic": {},
        "simko_defaults": dict(alpha=0.01, lam=1.1),
        # v3's ratio form: λ·r crosses 1 − ε_low on some λ-tokens (the fixture check below demands one)
        "simko_ratio_form": dict(lam_form="ratio", lam=1.5, adv="BL", B=16),
        "simko_ratio_form_padded_bf16": dict(lam_form="ratio", lam=1.3, dtype="bf16", vocab_size=ROWS - 5,
                                             pad_logit=20.0, temperature=0.7, entropy_coef=0.05, B=16),
        "temperature_adv_BL": dict(temperature=0.7, adv="BL"),
        "padded_vocab_last_shard": dict(vocab_size=ROWS - 5, pad_logit=10.0),
        "padded_vocab_two_shards": dict(vocab_size=ROWS - 19, pad_logit=10.0, temperature=1.3),
        "topk_spread_across_shards": dict(spread=True, top_k=4, adv="BL"),
        "all_zero_advantages": dict(zero_adv=True),
        "chunked_k5": dict(chunk_tokens=5, top_k=5),
        "token_normalizer": dict(token_normalizer=97.0, adv="BL"),
        "grpo": dict(mode="grpo", temperature=0.7),
        "psr": dict(mode="psr", adv="BL", vocab_size=ROWS - 5, pad_logit=10.0),
        "nsr": dict(mode="nsr", adv="BL"),
        "w_reinforce": dict(mode="w_reinforce", adv="BL", temperature=1.3),
        "bf16": dict(dtype="bf16", adv="BL"),
        "bf16_padded_temperature": dict(dtype="bf16", vocab_size=ROWS - 5, pad_logit=20.0, temperature=0.5),
        "entropy_bonus_simko": dict(entropy_coef=0.05, adv="BL"),  # top-K, target and entropy gradients at once
        "entropy_bonus_grpo_padded": dict(mode="grpo", entropy_coef=0.1, vocab_size=ROWS - 5, pad_logit=10.0,
                                          temperature=0.7),
        "entropy_bonus_chunked": dict(entropy_coef=0.1, chunk_tokens=5, top_k=4, spread=True),
        "entropy_bonus_bf16": dict(dtype="bf16", entropy_coef=0.1, chunk_tokens=7, vocab_size=ROWS - 5,
                                   pad_logit=20.0),
        "kl_cov_defaults": dict(mode="kl_cov"),
        "kl_cov_wide": dict(mode="kl_cov", adv="BL", kl_cov_ratio=0.1, temperature=1.3, vocab_size=ROWS - 5,
                            pad_logit=10.0),
        "clip_cov_defaults": dict(mode="clip_cov", adv="BL"),
        "clip_cov_wide": dict(mode="clip_cov", adv="BL", selection_seed=7, **COV_WIDE),
        "entropy_adv": dict(mode="entropy_adv", adv="BL"),
        "entropy_adv_bonus_bf16": dict(mode="entropy_adv", dtype="bf16", entropy_coef=0.02, adv="BL"),
    }.items()
}


def make_inputs(case: dict, seed: int = 0):
    """Full logits [B, L, ROWS] + targets, old_logprob, advantages, mask, arbitrary old top-K log-probs."""
    g = torch.Generator().manual_seed(seed)
    B, L, V, K = case["B"], case["L"], case["vocab_size"], case["top_k"]
    if case["dtype"] == "bf16":
        # Per token, ROWS distinct multiples of 1/32 in [-4, 4) (|integer| <= 128: exact in bf16), drawn from a
        # different subset each time: tie-free top-K and distinct entropies, so c_k and w are unambiguous.
        draws = torch.stack([torch.randperm(256, generator=g)[:ROWS] for _ in range(B * L)]).view(B, L, ROWS)
        logits = (draws.float() - 128) / 32
    else:
        logits = torch.randn(B, L, ROWS, generator=g) * 2.0
        logits[1] *= 0.3  # responses with different entropy scales
    if case["spread"]:  # top candidates in four different quarters (= different shards at TP 2 and 4)
        for b in range(B):
            for t in range(L):
                order = torch.randperm(4, generator=g)
                for q in range(4):
                    idx = min(q * ROWS // 4 + int(order[q]) + 2, V - 1)
                    logits[b, t, idx] += 6.0 - 0.5 * q
    if case["pad_logit"] is not None:  # padding rows: the largest logits, must never count
        logits[..., V:] = case["pad_logit"] + torch.arange(ROWS - V).float() / 8
    if case["dtype"] == "bf16":
        logits = logits.to(torch.bfloat16)
    z = logits.float()[..., :V] / case["temperature"]
    targets = torch.randint(0, V, (B, L), generator=g)
    rank1 = torch.rand(B, L, generator=g) < 0.6
    targets = torch.where(rank1, z.argmax(-1), targets)
    targets[0, :4] = torch.tensor([min(q * ROWS // 4 + 1, V - 1) for q in range(4)])  # one per quarter
    mask = torch.rand(B, L, generator=g) > 0.15
    mask[2] = False  # empty response
    mask[3] = False
    mask[3, 0] = True  # one-token response
    logp = torch.log_softmax(z, -1).gather(-1, targets[..., None])[..., 0]
    old_logprob = logp + 0.3 * torch.randn(B, L, generator=g)  # ratios spread beyond the clip range
    old_logprob[~mask] = float("nan")  # garbage where masked: must not leak
    if case["adv"] == "B":
        advantages = torch.randn(B, generator=g)
        advantages[0], advantages[1] = abs(advantages[0]), -abs(advantages[1])
    else:
        advantages = torch.randn(B, L, generator=g)
    if case["zero_adv"]:
        advantages = torch.zeros_like(advantages)
    old_topk = torch.randn(B, L, K, generator=g)
    return logits, targets, old_logprob, advantages, mask, old_topk


LOSS_KEYS = ("lam_form", "entropy_coef", "kl_cov_ratio", "clip_cov_ratio", "clip_cov_lb", "clip_cov_ub")


def config_of(case: dict) -> SimKOConfig:
    return SimKOConfig(mode=case["mode"], top_k=case["top_k"], alpha=case["alpha"], lam=case["lam"],
                       tau=case["tau"], chunk_tokens=case["chunk_tokens"], **{k: case[k] for k in LOSS_KEYS})


class CommRecorder:
    """Wraps torch.distributed collectives (module attributes) to record (phase, op, numel)."""

    OPS = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce_scatter",
           "broadcast", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single", "send", "recv",
           "isend", "irecv", "all_gather_object", "broadcast_object_list", "barrier")

    def __init__(self):
        self.phase, self.calls, self._orig = None, [], {}

    def __enter__(self):
        dist = torch.distributed
        for name in self.OPS:
            orig = getattr(dist, name, None)
            if orig is None:
                continue
            self._orig[name] = orig

            def wrapper(*args, _name=name, _orig=orig, **kwargs):
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                lists = [a for a in args if isinstance(a, list)]
                numel = max([t.numel() for t in tensors]
                            + [sum(t.numel() for t in lst if isinstance(t, torch.Tensor)) for lst in lists] + [0])
                self.calls.append((self.phase, _name, numel))
                return _orig(*args, **kwargs)

            setattr(dist, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(torch.distributed, name, orig)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN-safe, unlike torch.equal)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def check_case(name: str, case: dict, rank: int, world: int, group) -> list[str]:
    """Run one case on this rank; return failure messages (empty list = pass)."""
    failures = []

    def close(what, actual, expected, **tol):
        try:
            torch.testing.assert_close(actual, expected, **tol)
        except AssertionError as e:
            failures.append(f"{what}: {e}")

    logits_full, targets, old_logprob, advantages, mask, old_topk = make_inputs(case)
    v_local = ROWS // world
    shard = logits_full[..., rank * v_local:(rank + 1) * v_local].clone().requires_grad_()
    inputs = dict(logits=shard, targets=targets, old_logprob=old_logprob, advantages=advantages, mask=mask)
    before = {k: v.detach().clone() for k, v in inputs.items()}
    cfg, T, N = config_of(case), case["temperature"], targets.numel()

    with CommRecorder() as rec:
        rec.phase = "forward"
        loss, metrics = simko_loss(shard, targets, old_logprob, advantages, mask, cfg, tp_group=group,
                                   temperature=T, vocab_size=case["vocab_size"],
                                   token_normalizer=case["token_normalizer"], selection_seed=case["selection_seed"])
        rec.phase = "backward"
        loss.backward()

    ref_logits = logits_full.clone().requires_grad_()
    ref_loss, aux = reference_simko_loss(
        ref_logits, targets, old_logprob, advantages, mask, mode=case["mode"], top_k=case["top_k"],
        alpha=case["alpha"], lam=case["lam"], tau=case["tau"], temperature=T, vocab_size=case["vocab_size"],
        old_topk_logprob=old_topk, token_normalizer=case["token_normalizer"], selection_seed=case["selection_seed"],
        **{k: case[k] for k in LOSS_KEYS})
    ref_loss.backward()
    ref_grad = ref_logits.grad[..., rank * v_local:(rank + 1) * v_local]

    close("loss", loss.detach(), ref_loss.detach(), **FP32_TOL)
    if shard.grad is None:
        failures.append("no gradient reached the logits")
    else:
        grad_tol = BF16_GRAD_TOL if case["dtype"] == "bf16" else FP32_TOL
        if shard.grad.dtype != shard.dtype:
            failures.append(f"grad dtype {shard.grad.dtype} != logits dtype {shard.dtype}")
        close("grad shard", shard.grad.float(), ref_grad.float(), **grad_tol)
        if case["vocab_size"] < ROWS and not bool((shard.grad[..., max(case['vocab_size'] - rank * v_local, 0):]
                                                  == 0).all()):
            failures.append("padding rows received a gradient")

    # Metrics against the reference's per-token tensors.
    n = mask.sum().clamp(min=1).item()
    A, gamma = aux["advantages"], aux["gamma"].detach()
    clipped = (-A * gamma.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)) > (-A * gamma)
    expected = {"num_tokens": float(mask.sum()), "entropy_mean": (aux["entropy"] * mask).sum().item() / n,
                "high_entropy_fraction": aux["w"].sum().item() / n,
                "lam_fraction": aux["lam_applied"].sum().item() / n,
                "clip_fraction": (clipped & mask).sum().item() / n if case["mode"] != "kl_cov" else 0.0,
                "cov_selected_fraction": aux["selected"].sum().item() / n,
                **{f"lambda_{k + 1}": (aux["topk_logp"][..., k].detach() * mask).sum().item() / n
                   for k in range(case["top_k"])}}
    for key, value in expected.items():
        if abs(metrics[key] - value) > 1e-6:
            failures.append(f"metric {key}: {metrics[key]} != reference {value}")

    # Forward-only statistics (trainer's old-log-prob path) against the reference, at valid tokens.
    with torch.no_grad():
        stats = token_statistics(shard.detach(), targets, case["top_k"], group, T, case["vocab_size"], mask=mask)
    m = mask
    close("stats.target_logprob", stats.target_logprob[m], aux["logp"].detach()[m], **FP32_TOL)
    close("stats.entropy", stats.entropy[m], aux["entropy"][m], **FP32_TOL)
    close("stats.topk_logprob", stats.topk_logprob[m], aux["topk_logp"].detach()[m], **FP32_TOL)
    if not torch.equal(stats.topk_ids[m], aux["topk_ids"][m]):
        failures.append("topk_ids differ from the reference")
    if not torch.equal(stats.is_rank1[m], aux["is_rank1"][m]):
        failures.append("is_rank1 differs from the reference")
    if stats.target_logprob.grad_fn is not None:
        failures.append("no-grad statistics carry a graph")

    for key, value in inputs.items():
        if not bitwise_equal(value.detach(), before[key]):
            failures.append(f"input {key} was modified")

    # The case must exercise what it claims to (guards against a silently degenerate fixture).
    if not case["zero_adv"]:
        if metrics["clip_fraction"] == 0 and case["mode"] != "kl_cov":
            failures.append("fixture: no token is clipped")
        if case["mode"] in ("kl_cov", "clip_cov") and not aux["selected"].any():
            failures.append("fixture: the covariance selection is empty")
        if case["mode"] == "clip_cov" and case["clip_cov_ratio"] > 0.01 and aux["selected"].sum() < 2:
            failures.append("fixture: the wide Clip-Cov case selects fewer than 2 tokens")
        if case["mode"] == "entropy_adv":  # both branches of min(α·H, |A|/κ) must occur
            A_in = torch.where(mask, advantages if advantages.dim() == 2 else advantages[:, None].expand_as(mask), 0.0)
            by_entropy = mask & (cfg.entropy_adv_alpha * aux["entropy"] < A_in.abs() / cfg.entropy_adv_kappa)
            by_cap = mask & (A_in != 0) & ~by_entropy
            if not (by_entropy.any() and by_cap.any()):
                failures.append("fixture: Entropy-Adv does not exercise both branches of the min")
        if case["mode"] == "simko" and not (metrics["lam_fraction"] > 0 and metrics["topk_credit_fraction"] > 0):
            failures.append("fixture: no λ-scaled or no top-K-credit token")
        if case["lam_form"] == "ratio":  # where the forms differ: r < 1 − ε_low ≤ λ·r (clipped in one form only)
            r = aux["r"].detach()
            only_ratio_unclipped = aux["lam_applied"] & (r < 1 - cfg.clip_low) & (case["lam"] * r >= 1 - cfg.clip_low)
            if not only_ratio_unclipped.any():
                failures.append("fixture: no λ-token where the two λ forms differ")
    if case["spread"] and world > 1:
        shards_hit = [len(set((ids // v_local).tolist())) for ids in stats.topk_ids[mask]]
        if sum(s > 1 for s in shards_hit) < len(shards_hit) / 2:
            failures.append("fixture: top-K candidates are not spread across shards")

    K = case["top_k"]
    bound = COMM_C * K * world + COMM_D
    for phase, op, numel in rec.calls:
        if phase == "backward":
            failures.append(f"backward issued a collective: {op} ({numel} elements)")
        elif numel / N > bound:
            failures.append(f"forward {op} carries {numel / N:.1f} elements/token > {COMM_C}·K·TP+{COMM_D} = {bound}")
    forward_ops = [c for c in rec.calls if c[0] == "forward"]
    if world > 1 and not forward_ops:
        failures.append("no forward collective was recorded (is the recorder wired?)")

    # Metrics must agree bitwise across TP ranks (w, c_k and H are merged identically everywhere).
    if world > 1:
        every = [None] * world
        torch.distributed.all_gather_object(every, metrics, group=group)
        if any(m_ != every[0] for m_ in every):
            failures.append("metrics differ across TP ranks")
    return failures


def check_dp_selection(rank: int, world: int, group) -> list[str]:
    """KL-Cov / Clip-Cov selection over a data-parallel group == the reference's selection on the whole batch.

    Rank r holds a contiguous block of rows (uneven blocks; at TP 4 one rank holds only an empty response), the
    group gathers the statistics, and the union of the ranks' selections must equal the single-device one.
    """
    failures = []
    case = {**BASE, **COV_WIDE, "adv": "BL", "kl_cov_ratio": 0.1, "B": 7, "L": 16}
    logits, targets, old_logprob, advantages, mask, _ = make_inputs(case, seed=3)
    bounds = {1: [0, 7], 2: [0, 3, 7], 4: [0, 2, 3, 4, 7]}[world]  # rows 2 (empty) and 3 (one token) alone at 4
    rows = slice(bounds[rank], bounds[rank + 1])
    logp = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]
    logp, old = torch.where(mask, logp, 0.0), torch.where(mask, old_logprob, 0.0)
    for mode in ("kl_cov", "clip_cov"):
        cfg = SimKOConfig(mode=mode, **{k: case[k] for k in LOSS_KEYS})
        mine = covariance_selection(mode, advantages[rows], logp[rows], old[rows], mask[rows], cfg, group=group,
                                    seed=11)
        every = [None] * world
        torch.distributed.all_gather_object(every, mine)
        union = torch.cat(every)
        _, aux = reference_simko_loss(logits, targets, old_logprob, advantages, mask, mode=mode, selection_seed=11,
                                      **{k: case[k] for k in LOSS_KEYS})
        if not aux["selected"].any() or aux["selected"].sum() < 2:
            failures.append(f"{mode}: fixture selects fewer than 2 tokens")
        if not torch.equal(union, aux["selected"]):
            failures.append(f"{mode}: DP selection {union.nonzero().tolist()} != reference "
                            f"{aux['selected'].nonzero().tolist()}")
    return failures


def check_errors(rank: int, world: int, group) -> list[str]:
    """ValueErrors that need a real group: vocab_size larger than V_local·TP (raised before any collective)."""
    failures = []
    logits = torch.zeros(2, 3, ROWS // world)
    targets, mask = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool)
    try:
        token_statistics(logits, targets, 3, group, 1.0, ROWS + 1, mask=mask)
        failures.append("vocab_size > V_local·TP did not raise")
    except ValueError as e:
        if "tp_group" not in str(e):
            failures.append(f"unexpected message: {e}")
    return failures


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank,
                                         world_size=a.world, timeout=timedelta(seconds=60))
    group = torch.distributed.new_group(list(range(a.world)))  # a real (sub)group, not just WORLD
    results, t0 = {}, time.time()
    for name, case in CASES.items():
        results[name] = check_case(name, case, a.rank, a.world, group)
    results["errors"] = check_errors(a.rank, a.world, group)
    results["dp_selection"] = check_dp_selection(a.rank, a.world, group)
    results["_seconds"] = time.time() - t0
    with open(os.path.join(a.out, f"rank{a.rank}.json"), "w") as f:
        json.dump(results, f)
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, out_dir: str, timeout: float = 240.0, script: str = __file__, env: dict = None) -> dict:
    """Start `world` processes of `script` (a worker with this CLI; default: this one) with extra `env`, wait,
    and return {case: [failures of every rank]}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           **(env or {})}
    port = free_port()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(script), "--rank", str(r), "--world", str(world),
                               "--port", str(port), "--out", out_dir], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    outputs, deadline = [], time.time() + timeout
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(1.0, deadline - time.time()))[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    merged = {}
    for r, proc in enumerate(procs):
        path = os.path.join(out_dir, f"rank{r}.json")
        if proc.returncode != 0 or not os.path.exists(path):
            raise RuntimeError(f"TP={world} rank {r} exited with {proc.returncode}:\n{outputs[r][-4000:]}")
        with open(path) as f:
            for case, fails in json.load(f).items():
                if case != "_seconds":
                    merged.setdefault(case, []).extend(f"rank {r}: {msg}" for msg in fails)
    return merged


if __name__ == "__main__":
    main()

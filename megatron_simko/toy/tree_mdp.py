"""The paper's didactic toy (v3 §4.3): a tabular policy on a horizon-3 tree over {A, B, C, D}, trained with the
project's own GRPO advantages (``advantages.py``) and policy loss (``losses.simko_loss``) — every loss mode, the
entropy bonus and both λ forms, no copy of the loss.

Policy: one logit row per prefix state (1 root + 4 + 16 = 21 states × 4 actions), θ [21, 4]; a response is 3
actions, and its per-step logits rows θ[state(prefix_t)] are exactly the loss's ``logits`` [B, L = 3, V = 4].
Reward 1 for the six modes ACD, ACB, BDC, BDA, CAB, DBA, else 0. One step: sample ``groups`` groups of
``group_size`` responses from the table (temperature 1), GRPO advantages per group, then ``updates_per_batch``
optimizer steps on the same batch against the sampling policy's log-probs (so that importance ratios move off 1
and the clip — where the two λ forms differ — can bind).

Metrics come from the table exactly (all 64 sequences enumerated, nothing sampled): accuracy (mass on the six
modes), each mode's probability, the effective number of modes exp(H(mode | correct)), and the expected number
of distinct modes among 1,000 samples, Σ_m 1 − (1 − p_m)^1000.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Sequence

import torch

from megatron_simko.advantages import grpo_advantages
from megatron_simko.losses import SimKOConfig, simko_loss

ACTIONS = "ABCD"
MODES = ("ACD", "ACB", "BDC", "BDA", "CAB", "DBA")
HORIZON, NUM_ACTIONS, NUM_STATES = 3, 4, 21
COVERAGE_SAMPLES = 1000


def state_index(prefix: Sequence[int]) -> int:
    """Row of θ for a prefix of actions: () → 0, (a,) → 1 + a, (a, b) → 5 + 4a + b."""
    if len(prefix) == 0:
        return 0
    if len(prefix) == 1:
        return 1 + prefix[0]
    return 5 + 4 * prefix[0] + prefix[1]


SEQUENCES = torch.tensor(list(itertools.product(range(NUM_ACTIONS), repeat=HORIZON)))  # [64, 3]
SEQUENCE_STATES = torch.tensor([[state_index(s[:t].tolist()) for t in range(HORIZON)] for s in SEQUENCES])
MODE_ROWS = [int(((SEQUENCES == torch.tensor([ACTIONS.index(c) for c in m])).all(1)).nonzero()) for m in MODES]
REWARD = torch.zeros(len(SEQUENCES))
REWARD[MODE_ROWS] = 1.0


def sequence_logprobs(theta: torch.Tensor) -> torch.Tensor:
    """log π(sequence) of all 64 sequences [64], from the table θ [21, 4]."""
    logp = torch.log_softmax(theta, dim=-1)[SEQUENCE_STATES]  # [64, 3, 4]
    return logp.gather(-1, SEQUENCES.unsqueeze(-1)).squeeze(-1).sum(-1)


def table_metrics(theta: torch.Tensor) -> Dict[str, float]:
    """Exact metrics of the policy θ (module docstring)."""
    with torch.no_grad():
        p = sequence_logprobs(theta.double()).exp()
        modes = p[MODE_ROWS]  # [6]
        accuracy = float(modes.sum())
        q = modes / modes.sum()
        entropy = float(-(q * torch.log(q.clamp_min(1e-300))).sum())
        out = {"accuracy": accuracy, "effective_modes": math.exp(entropy),
               "distinct_modes_1000": float((1 - (1 - modes) ** COVERAGE_SAMPLES).sum())}
        out.update({f"p_{m}": float(v) for m, v in zip(MODES, modes)})
    return out


@dataclass(frozen=True)
class ToyRun:
    """One training run of the toy. loss: the SimKOConfig (mode, α, λ, λ form, τ, entropy_coef, clip)."""

    name: str
    loss: SimKOConfig = field(default_factory=lambda: SimKOConfig(mode="grpo"))
    lr: float = 0.1
    seed: int = 0
    steps: int = 150
    groups: int = 4
    group_size: int = 8
    updates_per_batch: int = 2
    optimizer: str = "adam"  # adam | sgd

    def __post_init__(self):
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be adam or sgd, got {self.optimizer!r}")
        if min(self.steps, self.groups, self.updates_per_batch) < 1 or self.group_size < 2:
            raise ValueError("steps, groups and updates_per_batch must be >= 1 and group_size >= 2")


def train_toy(run: ToyRun, record_every: int = 0) -> Dict[str, object]:
    """Train θ (zeros: the uniform policy) as ``run`` says; returns the final table metrics, the final θ and,
    if ``record_every`` > 0, the metrics every that many steps (``history``)."""
    gen = torch.Generator().manual_seed(run.seed)
    theta = torch.zeros(NUM_STATES, NUM_ACTIONS, requires_grad=True)
    opt = (torch.optim.Adam([theta], lr=run.lr) if run.optimizer == "adam"
           else torch.optim.SGD([theta], lr=run.lr))
    batch = run.groups * run.group_size
    mask = torch.ones(batch, HORIZON, dtype=torch.bool)
    history: List[Dict[str, float]] = []
    for step in range(1, run.steps + 1):
        with torch.no_grad():  # sample whole sequences from their exact probabilities (= sampling step by step)
            rows = torch.multinomial(sequence_logprobs(theta).exp(), batch, replacement=True, generator=gen)
            targets, states = SEQUENCES[rows], SEQUENCE_STATES[rows]  # [B, 3]
            rewards = REWARD[rows]
            advantages = grpo_advantages(rewards, run.group_size)  # [B], per group
            old_logprob = torch.log_softmax(theta[states], -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        for _ in range(run.updates_per_batch):
            logits = theta[states]  # [B, L = 3, V = 4]: the rows of the states each response visits
            loss, _ = simko_loss(logits, targets, old_logprob, advantages, mask, run.loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if record_every and (step % record_every == 0 or step == run.steps):
            history.append({"step": step, **table_metrics(theta)})
    return {"final": table_metrics(theta), "theta": theta.detach().clone(), "history": history}


# ------------------------------------------------------------------------------------------ the declared grid

CASP_ALPHAS = (0.01, 0.1, 0.3, 1.0)
CASP_TAUS = (0.8, 0.0)
ENTROPY_COEFS = (0.01, 0.05, 0.2)
LEARNING_RATES = (0.05, 0.2)
SEEDS = (0, 1, 2, 3, 4)
CASP_LAM = 1.1


def grid_methods() -> Dict[str, SimKOConfig]:
    """The methods of the declared grid (docs/casp.md), by name."""
    methods = {"grpo": SimKOConfig(mode="grpo")}
    methods.update({f"grpo+entropy {c}": SimKOConfig(mode="grpo", entropy_coef=c) for c in ENTROPY_COEFS})
    for tau in CASP_TAUS:
        for alpha in CASP_ALPHAS:
            methods[f"casp a={alpha} tau={tau}"] = SimKOConfig(mode="simko", alpha=alpha, lam=CASP_LAM, tau=tau)
    for alpha in CASP_ALPHAS:  # v3's λ form, at the default gate
        methods[f"casp a={alpha} tau=0.8 ratio-form"] = SimKOConfig(mode="simko", alpha=alpha, lam=CASP_LAM, tau=0.8,
                                                                    lam_form="ratio")
    return methods


def grid_runs(steps: int = 150) -> List[ToyRun]:
    return [ToyRun(name=name, loss=loss, lr=lr, seed=seed, steps=steps)
            for name, loss in grid_methods().items() for lr in LEARNING_RATES for seed in SEEDS]


def _run_one(run: ToyRun) -> Dict[str, object]:
    torch.set_num_threads(1)
    return {"name": run.name, "lr": run.lr, "seed": run.seed, **train_toy(run)["final"]}


def run_grid(runs: Sequence[ToyRun], workers: int = 2) -> List[Dict[str, object]]:
    """Every run's final metrics (one dict per run), in ``runs`` order; ``workers`` processes."""
    if workers <= 1:
        return [_run_one(r) for r in runs]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        return pool.map(_run_one, runs, chunksize=4)


# ------------------------------------------------------------------------------------- the pre-declared reading

ALL_SIX = 5.5  # expected distinct modes in 1,000 samples above this: every mode is kept (each p_m ≳ 0.005)
COLLAPSED = 1.5  # effective modes below this: one mode holds nearly all the correct mass
FULL_ACCURACY = 0.99
LEAKY_ACCURACY = 0.9
SEED_QUORUM = 4  # of 5 seeds


def verdicts(rows: Sequence[Dict[str, object]]) -> Dict[tuple, Dict[str, object]]:
    """Per (method, lr): the seed means and whether the claim that applies to that method holds in at least
    SEED_QUORUM seeds (docs/casp.md: the rules, declared before the runs)."""
    out = {}
    for key in dict.fromkeys((r["name"], r["lr"]) for r in rows):
        group = [r for r in rows if (r["name"], r["lr"]) == key]
        name = key[0]
        if name == "grpo":
            ok = [r["effective_modes"] < COLLAPSED for r in group]
            claim = "collapses to one mode"
        elif name.startswith("grpo+entropy"):
            ok = [r["distinct_modes_1000"] > ALL_SIX and r["accuracy"] < LEAKY_ACCURACY for r in group]
            claim = "keeps all six, leaks mass"
        else:
            ok = [r["distinct_modes_1000"] > ALL_SIX and r["accuracy"] >= FULL_ACCURACY for r in group]
            claim = "keeps all six at accuracy 1.00"
        mean = {k: sum(r[k] for r in group) / len(group)
                for k in ("accuracy", "effective_modes", "distinct_modes_1000", *(f"p_{m}" for m in MODES))}
        out[key] = {"claim": claim, "seeds_holding": sum(ok), "seeds": len(group),
                    "reproduces": sum(ok) >= SEED_QUORUM, **mean}
    return out


def format_table(rows: Sequence[Dict[str, object]]) -> str:
    """A markdown table: one line per (method, lr) with seed means, per-seed accuracy and the verdict."""
    lines = ["| method | lr | accuracy (mean; per seed) | eff. modes | distinct in 1000 | "
             + " | ".join(f"p({m})" for m in MODES) + " | claim | holds in |",
             "|---|---|---|---|---|" + "---|" * len(MODES) + "---|---|"]
    for (name, lr), v in verdicts(rows).items():
        per_seed = ", ".join(f"{r['accuracy']:.2f}" for r in rows if (r["name"], r["lr"]) == (name, lr))
        lines.append(f"| {name} | {lr} | {v['accuracy']:.3f}; {per_seed} | {v['effective_modes']:.2f} | "
                     f"{v['distinct_modes_1000']:.2f} | " + " | ".join(f"{v[f'p_{m}']:.3f}" for m in MODES)
                     + f" | {v['claim']} | {v['seeds_holding']}/{v['seeds']} |")
    return "\n".join(lines)


def run_as_dict(run: ToyRun) -> Dict[str, object]:
    return {**asdict(run), "loss": asdict(run.loss)}

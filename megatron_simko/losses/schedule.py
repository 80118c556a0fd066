"""Which loss an RL step trains with: ``loss.grpo_warmup_steps`` steps of plain GRPO, then the configured mode.

The paper's v3 logic recipe (SIMKO_SPEC.md, last section) runs 50 GRPO steps before CaSP. The switch is a
function of the RL step counter alone (steps count from 1), never of process state, so a run resumed from a
checkpoint switches at the same step as an uninterrupted one. Everything but the mode (clip range, entropy
bonus, top_k, ...) stays as configured during the warm-up.
"""
from __future__ import annotations

import dataclasses

from .simko import SimKOConfig


def in_grpo_warmup(cfg: SimKOConfig, step: int) -> bool:
    """True for RL steps 1..cfg.grpo_warmup_steps."""
    if step < 1:
        raise ValueError(f"RL steps count from 1, got step {step}")
    return step <= cfg.grpo_warmup_steps


def loss_config_at_step(cfg: SimKOConfig, step: int) -> SimKOConfig:
    """The loss configuration of RL step ``step``: mode "grpo" during the warm-up, ``cfg`` itself after it."""
    return dataclasses.replace(cfg, mode="grpo") if in_grpo_warmup(cfg, step) else cfg


def warmup_log_line(cfg: SimKOConfig, step: int, start_step: int) -> str | None:
    """The line to log at ``step`` (the first step this process runs is ``start_step``): where a warm-up is
    configured, the mode of the first step run and the switch itself; None on every other step."""
    if cfg.grpo_warmup_steps == 0 or cfg.mode == "grpo":
        return None
    if step == cfg.grpo_warmup_steps + 1:
        return f"step {step}: GRPO warm-up over ({cfg.grpo_warmup_steps} steps); loss.mode={cfg.mode} from now on"
    if step == start_step and in_grpo_warmup(cfg, step):
        return (f"step {step}: GRPO warm-up (loss.grpo_warmup_steps={cfg.grpo_warmup_steps}); "
                f"loss.mode={cfg.mode} from step {cfg.grpo_warmup_steps + 1}")
    return None

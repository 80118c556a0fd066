"""torchrun worker (2 ranks) for tests/test_nonfinite_guard.py: no silent NaN in train_step.

    torchrun --nproc-per-node 2 tests/nonfinite_worker.py --out result.json

1. TP=2: a NaN written into ONE rank's gradient shard (grad_hook, after the DP reduction, before the update):
   both ranks skip the update — weights, Adam state and LR schedule unchanged bitwise — and count it; a good
   update then resets the consecutive count and moves the weights.
2. DP=2: a NaN advantage in DP rank 1's batch only (a non-finite loss): both ranks skip.
3. train.max_bad_steps=2: the second consecutive bad update raises NonFiniteUpdateError naming the step, on
   both ranks.
Rank r writes its findings to result.json.rank{r}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_simko.config import OptimizerConfig  # noqa: E402
from megatron_simko.losses import SimKOConfig  # noqa: E402
from megatron_simko.models.gpt import arch_from_hf_config  # noqa: E402
from megatron_simko.parallel import initialize_parallel  # noqa: E402
from megatron_simko.trainer.batch import RLBatch  # noqa: E402
from megatron_simko.trainer.model import build_model_chunks, trainer_transformer_config, wrap_with_ddp  # noqa: E402
from megatron_simko.trainer.optimizer import (  # noqa: E402
    BadUpdateGuard,
    NonFiniteUpdateError,
    build_optimizer,
    build_scheduler,
)
from megatron_simko.trainer.step import train_step  # noqa: E402

ARCH = arch_from_hf_config(dict(
    architectures=["Qwen2ForCausalLM"], hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, num_hidden_layers=2, vocab_size=600, max_position_embeddings=128,
    tie_word_embeddings=False))
OPTIM = OptimizerConfig(lr=1e-3, grad_clip=1.0, lr_schedule="cosine", warmup_steps=1)


def make_batch(seed: int) -> RLBatch:
    g = torch.Generator().manual_seed(seed)
    B, S = 4, 12
    lengths = torch.tensor([12, 9, 11, 10])
    pos = torch.arange(S)
    tokens = torch.where(pos < lengths[:, None], torch.randint(0, ARCH.vocab_size, (B, S), generator=g), 0)
    return RLBatch(tokens=tokens, loss_mask=(pos >= 4) & (pos < lengths[:, None]),
                   old_logprob=-6.0 + 0.3 * torch.randn(B, S, generator=g),
                   advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]), lengths=lengths)


def state(chunks, optimizer, scheduler):
    """Weights, Adam moments and the scheduler's step count, cloned."""
    params = {n: p.detach().clone() for n, p in chunks[0].module.named_parameters()}
    torch_optimizers = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    moments = [v.detach().clone() for o in torch_optimizers for st in o.state.values() for v in st.values()
               if torch.is_tensor(v)]
    assert moments, "no optimizer state to compare"
    return params, moments, scheduler.num_steps


def same(a, b) -> bool:
    pa, ma, sa = a
    pb, mb, sb = b
    return sa == sb and all(torch.equal(pa[k], pb[k]) for k in pa) and all(torch.equal(x, y) for x, y in zip(ma, mb))


def poison_on(rank: int):
    def hook(chunks):
        if dist.get_rank() == rank:
            p = next(p for p in chunks[0].parameters() if p.main_grad is not None and p.main_grad.numel() > 1)
            p.main_grad.view(-1)[1] = float("nan")
    return hook


def run(tp: int, report: dict) -> None:
    initialize_parallel(tp, 1, seed=5)
    chunks = wrap_with_ddp(build_model_chunks(ARCH, trainer_transformer_config(ARCH, tp, 1)))
    optimizer = build_optimizer(chunks, OPTIM)
    scheduler = build_scheduler(optimizer, OPTIM, decay_steps=20)
    guard = BadUpdateGuard(max_consecutive=3)
    loss = SimKOConfig()
    key = f"tp{tp}"

    def step(batch, **kw):
        return train_step(chunks, optimizer, scheduler, batch, loss, ARCH.vocab_size, guard=guard, step=7, **kw)

    out = step(make_batch(1))  # a good update first, so the Adam state exists
    report[f"{key}/good_first"] = out.update_successful and not out.skipped_nonfinite
    before = state(chunks, optimizer, scheduler)
    if tp == 2:  # the NaN is in rank 1's shard only: rank 0 sees finite gradients locally
        out = step(make_batch(2), grad_hook=poison_on(1))
    else:  # DP rank 1's batch has a NaN advantage: the global loss is NaN
        batch = make_batch(2)
        if dist.get_rank() == 1:
            batch.advantages[0] = float("nan")
        out = step(batch)
    report[f"{key}/bad_skipped"] = out.skipped_nonfinite and not out.update_successful
    report[f"{key}/bad_grad_norm_nan"] = out.grad_norm is not None and math.isnan(out.grad_norm)
    report[f"{key}/unchanged_after_bad"] = same(before, state(chunks, optimizer, scheduler))
    report[f"{key}/counts_after_bad"] = [guard.consecutive, guard.skipped_total]
    out = step(make_batch(3))
    report[f"{key}/good_after"] = out.update_successful and not out.skipped_nonfinite
    report[f"{key}/changed_after_good"] = not same(before, state(chunks, optimizer, scheduler))
    report[f"{key}/counts_after_good"] = [guard.consecutive, guard.skipped_total]
    report[f"{key}/weights_finite"] = all(bool(torch.isfinite(p).all()) for p in chunks[0].parameters())

    if tp == 2:  # the limit: 2 in a row stop the run, on every rank
        guard.max_consecutive = 2
        step(make_batch(4), grad_hook=poison_on(0))
        try:
            step(make_batch(5), grad_hook=poison_on(0))
            report["limit_error"] = None
        except NonFiniteUpdateError as e:
            report["limit_error"] = str(e)
        report["weights_finite_at_limit"] = all(bool(torch.isfinite(p).all()) for p in chunks[0].parameters())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    report: dict = {}
    run(2, report)
    run(1, report)  # re-initialises the parallel state: DP=2
    with open(f"{args.out}.rank{dist.get_rank()}", "w") as f:
        json.dump(report, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""torchrun worker (2 ranks) for tests/test_parallel_checkpoint.py: dist_checkpointing save / resume / reshard.

    torchrun --nproc-per-node 2 tests/parallel_checkpoint_worker.py --root DIR --out result.json

1. TP2 × PP1: step 1, save (iter 1), step 2 → the uninterrupted run's step-2 loss and parameters.
2. A fresh TP2 model (other random weights) and optimizer, load iter 1, step 2 → loss and parameters must be
   bitwise identical to the uninterrupted run.
3. Resume iter 1 under a changed LR schedule (lr, min_lr, style, decay steps): the config wins.
4. Reload at TP1 × PP1 (DP2) and at TP1 × PP2: forward-only log-probs of iter 1's weights equal TP2's.
5. The gradient norm with clipping off (grad_clip=0) and with a clip far above it.
6. Interleaved PP2 × VPP2 with token-budget micro-batches whose natural count (3) is not a multiple of PP.
Also saves steps 1–3 with keep_last=2 into ROOT_prune to check pruning and the ``latest`` pointer; records the
lr of each update (with warmup the first one runs at lr / warmup_steps, not 0).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_simko.losses import SimKOConfig  # noqa: E402
from megatron_simko.models.gpt import arch_from_hf_config  # noqa: E402
from megatron_simko.parallel import destroy_parallel, initialize_parallel  # noqa: E402
from megatron_simko.trainer.batch import RLBatch  # noqa: E402
from megatron_simko.trainer.checkpointing import (  # noqa: E402
    latest_step,
    load_checkpoint,
    save_checkpoint,
    saved_steps,
)
from megatron_simko.trainer.model import build_model_chunks, trainer_transformer_config, wrap_with_ddp  # noqa: E402
from megatron_simko.config import OptimizerConfig  # noqa: E402
from megatron_simko.trainer.optimizer import build_optimizer, build_scheduler  # noqa: E402
from megatron_simko.trainer.step import train_step  # noqa: E402
from megatron_simko.trainer.token_stats import compute_token_stats  # noqa: E402

HF_CONFIG = dict(architectures=["Qwen2ForCausalLM"], hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, num_hidden_layers=2, vocab_size=600, max_position_embeddings=128,
                 tie_word_embeddings=False)
ARCH = arch_from_hf_config(HF_CONFIG)
OPTIM = OptimizerConfig(lr=1e-3, weight_decay=0.01, grad_clip=1.0, lr_schedule="cosine", warmup_steps=1)
DECAY_STEPS = 10
# Section 4: the resumed run's config changes every schedule setting.
OPTIM_RESUMED = OptimizerConfig(lr=2e-3, min_lr=1e-4, weight_decay=0.01, grad_clip=1.0, lr_schedule="linear",
                                warmup_steps=1)
DECAY_STEPS_RESUMED = 20
ARCH_VPP = arch_from_hf_config(dict(HF_CONFIG, num_hidden_layers=4))
LOSS = SimKOConfig()


def make_batch() -> RLBatch:
    g = torch.Generator().manual_seed(7)
    B, S = 4, 16
    lengths = torch.tensor([16, 11, 9, 14])
    prompt = torch.tensor([4, 3, 5, 4])
    pos = torch.arange(S)
    tokens = torch.where(pos < lengths[:, None], torch.randint(0, ARCH.vocab_size, (B, S), generator=g), 0)
    return RLBatch(tokens=tokens, loss_mask=(pos >= prompt[:, None]) & (pos < lengths[:, None]),
                   old_logprob=-6.0 + 0.3 * torch.randn(B, S, generator=g),
                   advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]), lengths=lengths)


def build(tp: int, pp: int, seed: int, optim=OPTIM, decay_steps=DECAY_STEPS, vpp=None, arch=ARCH):
    initialize_parallel(tp, pp, vpp, seed=seed)
    chunks = wrap_with_ddp(build_model_chunks(arch, trainer_transformer_config(arch, tp, pp, vpp)))
    optimizer = build_optimizer(chunks, optim)
    return chunks, optimizer, build_scheduler(optimizer, optim, decay_steps=decay_steps)


def params(chunks):
    return {n: p.detach().clone() for n, p in chunks[0].module.named_parameters()}


def step(chunks, optimizer, scheduler, batch):
    return train_step(chunks, optimizer, scheduler, batch, LOSS, ARCH.vocab_size, num_microbatches=2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--save-tp", type=int, default=2, help="TP of the saving run (1 for a one-GPU smoke run)")
    args = ap.parse_args()
    world = int(os.environ["WORLD_SIZE"])
    batch = make_batch()
    result = {}

    # 1. uninterrupted TP2 run, saving after step 1.
    chunks, optimizer, scheduler = build(args.save_tp, 1, seed=11)
    out1 = step(chunks, optimizer, scheduler, batch)
    result["first_update_lr"] = out1.lr
    save_checkpoint(args.root, 1, chunks, optimizer, scheduler, config=dict(note="tp2 step 1"))
    ref_stats = compute_token_stats(chunks, batch, 3, ARCH.vocab_size)
    out2 = step(chunks, optimizer, scheduler, batch)
    params2 = params(chunks)
    prune_root = args.root + "_prune"
    for s in (1, 2, 3):  # pruning: keep the newest two
        save_checkpoint(prune_root, s, chunks, optimizer, scheduler, keep_last=2)
    result["steps_after_prune"] = saved_steps(prune_root)
    result["latest"] = latest_step(prune_root)

    # 2. resume from iter 1 into a differently initialised model.
    chunks, optimizer, scheduler = build(args.save_tp, 1, seed=99)
    info = load_checkpoint(args.root, chunks, optimizer, scheduler, step=1)
    resumed = step(chunks, optimizer, scheduler, batch)
    result["resume"] = dict(step=info.step, config=info.config, loaded_optimizer=info.loaded_optimizer,
                            loaded_rng=info.loaded_rng, loss_uninterrupted=out2.loss, loss_resumed=resumed.loss,
                            lr_uninterrupted=out2.lr, lr_resumed=resumed.lr,
                            params_bitwise_equal=all(torch.equal(params2[n], p)
                                                     for n, p in params(chunks).items()))

    # 3. resume from iter 1 under a changed LR schedule: the current config's schedule, the saved update count.
    chunks, optimizer, scheduler = build(args.save_tp, 1, seed=99, optim=OPTIM_RESUMED,
                                         decay_steps=DECAY_STEPS_RESUMED)
    info = load_checkpoint(args.root, chunks, optimizer, scheduler, step=1)
    result["changed_schedule"] = dict(changes={k: list(v) for k, v in info.schedule_changes.items()},
                                      lr=step(chunks, optimizer, scheduler, batch).lr)

    # 4. the TP2 checkpoint at other layouts: model weights only.
    for tp, pp in [(t, p) for t, p in ((1, 1), (1, 2)) if world % (t * p) == 0]:
        chunks, optimizer, scheduler = build(tp, pp, seed=5)
        try:
            load_checkpoint(args.root, chunks, optimizer, scheduler, step=1)
            refused = False
        except ValueError:
            refused = True  # optimizer state is not resharded
        load_checkpoint(args.root, chunks, optimizer, scheduler, step=1, load_optimizer=False)
        stats = compute_token_stats(chunks, batch, 3, ARCH.vocab_size, broadcast_to_all_stages=True)
        valid = (torch.arange(batch.seq_len) >= 1) & (torch.arange(batch.seq_len) < batch.lengths[:, None])
        diff = lambda a, b: float(((a - b).abs() / b.abs().clamp(min=1)).cpu()[valid].max())  # noqa: E731
        result[f"tp{tp}_pp{pp}"] = dict(
            optimizer_refused=refused,
            logprob_err=diff(stats.target_logprob, ref_stats.target_logprob),
            entropy_err=diff(stats.entropy, ref_stats.entropy),
            topk_ids_equal=bool(torch.equal(stats.topk_ids.cpu()[valid], ref_stats.topk_ids.cpu()[valid])))

    # 5. clipping off still reports the real global gradient norm (the clipping path's norm, never clipping).
    norms = {}
    for clip in (0.0, 1e9):
        chunks, optimizer, scheduler = build(args.save_tp, 1, seed=11, optim=dataclasses.replace(OPTIM, grad_clip=clip))
        norms[str(clip)] = step(chunks, optimizer, scheduler, batch).grad_norm
    result["grad_norm"] = norms

    # 6. interleaved PP2 × VPP2: token-budget packing makes 3 micro-batches, the schedule needs a multiple of 2.
    if world == 2:
        chunks, optimizer, scheduler = build(1, 2, seed=5, vpp=2, arch=ARCH_VPP)
        budget = compute_token_stats(chunks, batch, 3, ARCH.vocab_size, max_tokens=24, broadcast_to_all_stages=True)
        even = compute_token_stats(chunks, batch, 3, ARCH.vocab_size, num_microbatches=2,
                                   broadcast_to_all_stages=True)
        out = train_step(chunks, optimizer, scheduler, batch, LOSS, ARCH.vocab_size, max_tokens=24)
        result["vpp"] = dict(logprob_maxdiff=float((budget.target_logprob - even.target_logprob).abs().max()),
                             num_microbatches=out.num_microbatches, loss=out.loss)

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(gathered, f, indent=1)
    destroy_parallel()


if __name__ == "__main__":
    main()

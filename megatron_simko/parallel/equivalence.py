"""The TP × PP × DP equivalence harness: a parallel run must equal a single device — per-token statistics, SimKO
loss, every gradient and the parameters after one optimizer step. Its command line is
``tools/check_parallel_equivalence.py`` (usage, the two phases and the ``--loss`` overrides there); ``args`` below
is that command's parsed namespace.

  1. ``reference``: one device (TP1 PP1 DP1, a private one-process gloo group) builds the model (a small Qwen2,
     or ``--model-config`` scaled down: ``scaled_arch``), the global batch (``make_batch``) and records the
     initial weights, per-token statistics, loss, gradients and the parameters after one Adam step;
  2. ``worker`` (every torchrun rank of ``launch``): loads the reference weights into its shard (``shard_of``),
     runs the same step on its DP share of the batch and compares its shard of every quantity with the
     reference's slice (``Comparison``); ``report`` prints the table and writes the JSON the launcher reads.
KL-Cov / Clip-Cov select tokens over the whole mini-batch (trainer/token_stats.py), so the single device and every
layout must select the same tokens. The reference always computes the loss from logits.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import torch

from megatron_simko.models.gpt import ModelArch, arch_from_hf_config, validate_parallelism


# Error measure: err = |parallel − reference| / max(1, |reference|) — the absolute difference for values up to 1
# (gradients, parameters, entropy of a small vocabulary), the relative one above (log-probs are O(log V) ≈ 12 at
# Qwen's vocabulary, where a single fp32 ulp is 9.5e-7, so a purely absolute 1e-6 would demand ≤ 1 ulp; the
# grad norm is a sum over every parameter). fp32 tolerance: 1e-6 everywhere — the layouts only reorder fp32
# reductions (row-parallel all-reduce of partial matmuls, vocabulary shards, DP and tied-embedding gradient sums).
# One argued exception: the gradient norm as megatron's clip_grads computes it, 1e-5. It accumulates in fp32
# (per-tensor norms, squared, summed over ranks, each layout splitting tensors differently): measured 1.4e-6 on
# the tiny model and 7.1e-7 on a Qwen2.5-0.5B-shaped model (151936-token vocabulary) at TP2×PP2, while the same
# norm recomputed in float64 from this layout's gradient shards agrees to 1.4e-8 / 4.1e-8 and is held to 1e-6.
# bf16: the same reorderings round activations to 8 mantissa bits (2^-8 ≈ 4e-3 relative per rounding), so
# log-probs move by up to ~1e-3 relative (measured 3e-4 at TP2×PP2, tolerance 1e-2); gradients accumulate in
# fp32 from bf16 activations (measured 1.2e-3, tolerance 1e-2); params are bf16 (ulp 2^-8 relative, 1e-3).
# bf16 logits tie often (8 mantissa bits), so in bf16 a top-K id / rank-1 mismatch counts only where the two
# layouts' log-probs of that slot differ by more than the log-prob tolerance (a reordered near-tie is not a bug).
TOLERANCES = {
    "fp32": dict(logprob=1e-6, entropy=1e-6, topk_logprob=1e-6, loss=1e-6, grad=1e-6, param=1e-6, grad_norm=1e-6,
                 grad_norm_fp32=1e-5),
    "bf16": dict(logprob=1e-2, entropy=1e-2, topk_logprob=1e-2, loss=1e-3, grad=1e-2, param=1e-3, grad_norm=1e-2,
                 grad_norm_fp32=1e-2),
}
TOP_K = 3
MICRO_BATCH_SIZE = 2
MICROBATCHES_PER_DP_RANK = 2
DEFAULT_MODEL = dict(  # Qwen2-like, tiny; vocab 600 → padded 640 at TP1, 768 at TP2: padding rows differ
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=64, num_attention_heads=4,
    num_key_value_heads=2, intermediate_size=128, num_hidden_layers=4, vocab_size=600,
    max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
)


# --------------------------------------------------------------------------------------------------
# Model and batch (identical in both phases)
# --------------------------------------------------------------------------------------------------


def scaled_arch(arch: ModelArch, tp: int, pp: int, vpp) -> ModelArch:
    """A small model with the config's family, vocabulary, tying, biases and RoPE, shaped for this layout:
    ≤ 4 layers (a multiple of pp·vpp), max(2, tp) KV groups with ≤ 4 query heads per group, head_dim ≤ 32,
    FFN = 2 · hidden."""
    from dataclasses import replace

    stages = pp * (vpp or 1)
    layers = max(stages, (min(arch.num_layers, 4) // stages) * stages)
    groups = max(2, tp)
    heads = groups * max(1, min(arch.num_attention_heads // arch.num_query_groups, 4))
    head_dim = min(arch.head_dim, 32)
    hidden = heads * head_dim
    return replace(arch, num_layers=layers, num_attention_heads=heads, num_query_groups=groups,
                   head_dim=head_dim, hidden_size=hidden, ffn_hidden_size=2 * hidden,
                   max_position_embeddings=min(arch.max_position_embeddings, 4096))


def make_arch(args) -> ModelArch:
    if args.model_config:
        return scaled_arch(arch_from_hf_config(args.model_config), args.tp, args.pp, args.vpp)
    return arch_from_hf_config(DEFAULT_MODEL)


def make_batch(arch: ModelArch, global_batch: int, seed: int):
    """Variable-length prompts and responses, right-padded; advantages of both signs; old log-probs are set
    later from the reference's own statistics plus noise (so some tokens are clipped)."""
    from megatron_simko.trainer.batch import RLBatch

    g = torch.Generator().manual_seed(seed + 1)
    S = 20
    prompt = torch.randint(3, 7, (global_batch,), generator=g)
    response = torch.randint(2, 13, (global_batch,), generator=g)
    lengths = torch.clamp(prompt + response, max=S)
    tokens = torch.randint(0, arch.vocab_size, (global_batch, S), generator=g)
    pos = torch.arange(S)
    tokens = torch.where(pos < lengths[:, None], tokens, 0)  # padding id 0 (never a loss token)
    loss_mask = (pos >= prompt[:, None]) & (pos < lengths[:, None])
    advantages = torch.randn(global_batch, generator=g)
    return RLBatch(tokens=tokens, loss_mask=loss_mask, old_logprob=torch.zeros(global_batch, S),
                   advantages=advantages, lengths=lengths)


def setup(arch: ModelArch, tp: int, pp: int, vpp, dtype: torch.dtype):
    from megatron_simko.trainer.model import build_model_chunks, trainer_transformer_config
    from megatron_simko.config import OptimizerConfig

    config = trainer_transformer_config(arch, tp, pp, vpp, params_dtype=dtype)
    chunks = build_model_chunks(arch, config)
    # adam_eps = 1e-3 (not 1e-8): Adam's first step is lr·g/(|g| + eps) per element, whose sensitivity to the
    # gradient is lr·eps/(|g| + eps)² ≤ lr/eps. With eps = 1e-8, a near-zero gradient element rounded differently
    # by 1e-8 (a legitimate reordering) would move its parameter by up to lr — Adam's conditioning, not the
    # layout's. With eps = 1e-3 the step amplifies gradient differences by at most lr/eps = 1.
    optim = OptimizerConfig(lr=1e-3, weight_decay=0.01, grad_clip=1.0, adam_eps=1e-3)
    return chunks, optim, config


def finish_setup(chunks, optim, distributed_optimizer: bool):
    from megatron_simko.trainer.model import wrap_with_ddp
    from megatron_simko.trainer.optimizer import build_optimizer, build_scheduler

    chunks = wrap_with_ddp(chunks, use_distributed_optimizer=distributed_optimizer)
    optimizer = build_optimizer(chunks, optim, use_distributed_optimizer=distributed_optimizer)
    return chunks, optimizer, build_scheduler(optimizer, optim)


def loss_config(overrides):
    """SimKOConfig(top_k=TOP_K) with ``KEY=VALUE`` overrides (values parsed as YAML scalars)."""
    import yaml

    from megatron_simko.losses import SimKOConfig

    fields = {"top_k": TOP_K}
    for item in overrides or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--loss {item!r} is not of the form KEY=VALUE (a SimKOConfig field)")
        fields[key.strip()] = yaml.safe_load(value)
    try:
        return SimKOConfig(**fields)
    except TypeError as e:
        raise ValueError(f"--loss: {e}") from None


def run_step(chunks, optimizer, scheduler, arch, batch, loss_cfg, num_microbatches=None, max_tokens=None):
    """Statistics (forward-only), then one train step; returns (stats, step output, {name: grad}).
    Micro-batches: ``num_microbatches`` equal splits, or token-budget packing with ``max_tokens``."""
    from megatron_simko.trainer.step import train_step
    from megatron_simko.trainer.token_stats import compute_token_stats

    stats = compute_token_stats(chunks, batch, TOP_K, arch.vocab_size, num_microbatches=num_microbatches,
                                max_tokens=max_tokens, backend=loss_cfg.backend, fused_linear=loss_cfg.fused_linear,
                                fused_chunk_tokens=loss_cfg.fused_chunk_tokens)
    grads = {}

    def grab(model_chunks):
        for c, chunk in enumerate(model_chunks):
            for name, p in chunk.module.named_parameters():
                # a copy: on the CPU .float().cpu() would alias main_grad, which clipping then scales in place
                grads[(c, name)] = p.main_grad.detach().to("cpu", torch.float32, copy=True)

    out = train_step(chunks, optimizer, scheduler, batch, loss_cfg, arch.vocab_size,
                     num_microbatches=num_microbatches, max_tokens=max_tokens, grad_hook=grab)
    return stats, out, grads


# --------------------------------------------------------------------------------------------------
# Phase 1: the single-device reference
# --------------------------------------------------------------------------------------------------


def reference(args, arch: ModelArch, path: str) -> None:
    """Phase 1, on global rank 0 before the job's process group exists: a private one-process gloo group."""
    import torch.distributed as dist

    from megatron_simko.parallel import destroy_parallel, initialize_parallel
    from megatron_simko.trainer.token_stats import compute_token_stats

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl", store=dist.HashStore(),
                            rank=0, world_size=1)
    initialize_parallel(1, 1, seed=args.seed)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    chunks, optim, _ = setup(arch, 1, 1, None, dtype)
    (model,) = chunks
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
               if not k.endswith("_extra_state")}
    chunks, optimizer, scheduler = finish_setup(chunks, optim, args.distributed_optimizer)

    global_batch = MICRO_BATCH_SIZE * MICROBATCHES_PER_DP_RANK * args.dp
    batch = make_batch(arch, global_batch, args.seed)
    ref_cfg = dataclasses.replace(loss_config(args.loss), fused_linear=False)  # the reference uses the logits
    first = compute_token_stats(chunks, batch, TOP_K, arch.vocab_size, num_microbatches=1, backend=ref_cfg.backend)
    g = torch.Generator().manual_seed(args.seed + 2)
    batch.old_logprob = first.target_logprob.cpu() + 0.3 * torch.randn(first.target_logprob.shape, generator=g)

    stats, out, grads = run_step(chunks, optimizer, scheduler, arch, batch, ref_cfg,
                                 num_microbatches=MICROBATCHES_PER_DP_RANK * args.dp)
    params = {name: p.detach().to("cpu", torch.float32, copy=True) for name, p in chunks[0].module.named_parameters()}
    tmp = path + ".tmp"
    torch.save(dict(arch=arch.to_dict(), weights=weights, batch=batch.__dict__,
                    stats={k: v.cpu() for k, v in stats.__dict__.items()},
                    loss=out.loss, grad_norm=out.grad_norm, metrics=out.metrics,
                    grads={name: g for (_, name), g in grads.items()}, params=params), tmp)
    os.replace(tmp, path)
    destroy_parallel()


# --------------------------------------------------------------------------------------------------
# Phase 2: the parallel run (a torchrun worker)
# --------------------------------------------------------------------------------------------------


def global_name(chunk_model, local_name: str, tied: bool) -> str:
    """Reference (TP1, one stage) name of a local parameter: layer index → global, tied output → embedding."""
    m = re.match(r"decoder\.layers\.(\d+)\.(.*)", local_name)
    if m:
        layer = chunk_model.decoder.layers[int(m.group(1))]
        return f"decoder.layers.{layer.layer_number - 1}.{m.group(2)}"
    if tied and local_name == "output_layer.weight":
        return "embedding.word_embeddings.weight"
    return local_name


def shard_of(full: torch.Tensor, param, name: str, tp: int, tp_rank: int, glu: bool) -> torch.Tensor:
    """This TP rank's slice of a reference tensor, float32. Vocabulary-parallel tensors whose padded row count
    exceeds the reference's are padded with NaN (rows that exist only in this layout: padding ids)."""
    full = full.float()
    if not getattr(param, "tensor_model_parallel", False) or tp == 1 and param.shape == full.shape:
        return full
    dim = param.partition_dim
    if glu and ".mlp.linear_fc1." in name:  # [gate; up] at TP1 → [gate_r; up_r] on rank r
        gate, up = full.chunk(2, dim)
        return torch.cat([gate.chunk(tp, dim)[tp_rank], up.chunk(tp, dim)[tp_rank]], dim)
    rows = param.shape[dim] * tp
    if full.shape[dim] < rows:
        pad_shape = list(full.shape)
        pad_shape[dim] = rows - full.shape[dim]
        full = torch.cat([full, torch.full(pad_shape, float("nan"))], dim)
    return full.chunk(tp, dim)[tp_rank]


def grad_norm_fp64(chunks, grads, layout, tied, dist, mpu) -> float:
    """‖∇‖ over the model from this layout's shards, in float64: each parameter counted once (TP-replicated
    ones on TP rank 0, the tied output-layer copy of the last stage not at all), summed over TP × PP."""
    total = torch.zeros(1, dtype=torch.float64)
    for c, chunk in enumerate(chunks):
        model = chunk.module
        for name, p in model.named_parameters():
            if tied and name == "output_layer.weight" and not model.pre_process:
                continue
            if not getattr(p, "tensor_model_parallel", False) and layout.tp_rank != 0:
                continue
            total += grads[(c, name)].double().pow(2).sum()
    total = total.to("cpu" if not torch.cuda.is_available() else "cuda")
    dist.all_reduce(total, group=mpu.get_model_parallel_group())
    return float(total.sqrt())


class Comparison:
    """Max abs diff per quantity on this rank; reduced over the world at the end."""

    def __init__(self, tolerances):
        self.tol = tolerances
        self.rows = {}  # quantity -> [max diff, tol key, compared count, worst item]

    def add(self, quantity: str, tol_key: str, diff: float, count: int, item: str = ""):
        row = self.rows.setdefault(quantity, [0.0, tol_key, 0, ""])
        if diff > row[0] or math.isnan(diff):
            row[0], row[3] = diff, item
        row[2] += count

    def scalar(self, quantity, tol_key, got: float, want: float):
        self.add(quantity, tol_key, abs(got - want) / max(1.0, abs(want)), 1)

    def tensor(self, quantity, tol_key, got, want, item="", nan_means_zero=False):
        """Elementwise err (module comment); NaN in ``want`` = a row only this layout has (padding): skipped,
        or expected to be exactly 0 with ``nan_means_zero`` (gradients of padding rows)."""
        got, want = got.detach().float().cpu(), want.float().cpu()
        known = ~torch.isnan(want)
        want = torch.where(known, want, 0.0)
        diff = (got - want).abs() / want.abs().clamp(min=1.0)
        if not nan_means_zero:
            diff = torch.where(known, diff, 0.0)
        self.add(quantity, tol_key, float(diff.max()) if diff.numel() else 0.0, int(known.sum()), item)


def worker(args, with_reference: bool = True, keep_process_group: bool = False) -> int:
    """Phase 2 on every rank. ``with_reference=False``: rank 0 already wrote ``args.reference`` (before this
    job's process group existed); ``keep_process_group``: leave the world group up for the caller's next case
    (one launch running several cases of the same world size: tests/parallel_equivalence_worker.py)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    from megatron_simko.parallel import destroy_parallel, initialize_parallel
    from megatron_simko.trainer.batch import RLBatch

    if with_reference and int(os.environ["RANK"]) == 0:  # the others wait in initialize_parallel meanwhile
        t0 = time.time()
        reference(args, make_arch(args), args.reference)
        print(f"reference (one device) computed in {time.time() - t0:.1f} s", flush=True)
    layout = initialize_parallel(args.tp, args.pp, args.vpp, seed=args.seed + 17)  # weights come from ref
    ref = torch.load(args.reference, weights_only=False)
    arch = ModelArch(**ref["arch"])
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    chunks, optim, config = setup(arch, args.tp, args.pp, args.vpp, dtype)
    tied, glu = arch.tie_word_embeddings, config.gated_linear_unit

    # 1. Reference weights into this rank's shard.
    with torch.no_grad():
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                want = shard_of(ref["weights"][global_name(chunk, name, tied)], p, name, args.tp, layout.tp_rank, glu)
                known = ~torch.isnan(want)
                p.copy_(torch.where(known.to(p.device), want.to(p.device, p.dtype), p))
    chunks, optimizer, scheduler = finish_setup(chunks, optim, args.distributed_optimizer)

    # 2. This DP rank's share of the global batch, the same step.
    full = RLBatch(**ref["batch"])
    per_rank = full.batch_size // layout.dp
    rows = list(range(layout.dp_rank * per_rank, (layout.dp_rank + 1) * per_rank))
    batch = full.select(rows)
    batch = RLBatch(tokens=batch.tokens, loss_mask=batch.loss_mask, old_logprob=batch.old_logprob,
                    advantages=batch.advantages, lengths=batch.lengths)  # fresh indices 0..per_rank−1
    loss_cfg = loss_config(args.loss)
    if args.max_tokens:
        stats, out, grads = run_step(chunks, optimizer, scheduler, arch, batch, loss_cfg, max_tokens=args.max_tokens)
    else:
        stats, out, grads = run_step(chunks, optimizer, scheduler, arch, batch, loss_cfg, MICROBATCHES_PER_DP_RANK)

    # 3. Compare shards.
    cmp = Comparison(TOLERANCES[args.dtype])
    if stats is not None:
        stats = type(stats)(*(t.cpu() for t in stats.fields()))
        rs = ref["stats"]
        S = batch.seq_len
        valid = (torch.arange(S) >= 1) & (torch.arange(S) < batch.lengths[:, None])  # [b, S]
        pick = lambda t: t[rows][:, :S]  # noqa: E731
        cmp.tensor("token log-prob", "logprob", stats.target_logprob[valid], pick(rs["target_logprob"])[valid])
        cmp.tensor("entropy", "entropy", stats.entropy[valid], pick(rs["entropy"])[valid])
        cmp.tensor("top-K log-probs", "topk_logprob", stats.topk_logprob[valid], pick(rs["topk_logprob"])[valid])
        ids_differ = stats.topk_ids[valid] != pick(rs["topk_ids"])[valid]  # [n, K]
        rank1_differ = stats.is_rank1[valid] != pick(rs["is_rank1"])[valid]  # [n]
        if args.dtype == "bf16":  # only mismatches that are not reordered near-ties (module comment)
            tie = cmp.tol["logprob"]
            ref_topk, ref_lp = pick(rs["topk_logprob"])[valid], pick(rs["target_logprob"])[valid]
            ids_differ &= (stats.topk_logprob[valid] - ref_topk).abs() > tie
            rank1_differ &= (ref_lp - ref_topk[:, 0]).abs() > tie
        mismatch = ids_differ.sum() + rank1_differ.sum()
        cmp.add("top-K ids, rank-1 flags (mismatches)", None, float(mismatch), int(valid.sum()))
    cmp.scalar("SimKO loss", "loss", out.loss, ref["loss"])
    if loss_cfg.mode in ("kl_cov", "clip_cov"):  # same tokens chosen over the whole mini-batch; none chosen = FAIL
        def chosen(metrics):
            return round(metrics["cov_selected_fraction"] * metrics["num_tokens"])
        diff = float(abs(chosen(out.metrics) - chosen(ref["metrics"])))
        cmp.add("covariance-selected tokens (count diff)", None, diff, chosen(ref["metrics"]) if layout.rank == 0 else 0)
    cmp.scalar("grad norm (megatron clip_grads, fp32)", "grad_norm_fp32", out.grad_norm, ref["grad_norm"])
    skip_grads = args.distributed_optimizer and layout.dp > 1  # main_grad holds only this rank's shard
    if not skip_grads:
        cmp.scalar("grad norm (float64 recomputation)", "grad_norm",
                   grad_norm_fp64(chunks, grads, layout, tied, dist, mpu),
                   math.sqrt(sum(float(g.double().pow(2).sum()) for g in ref["grads"].values())))
    covered = set()
    for c, chunk in enumerate(chunks):
        model = chunk.module
        for name, p in model.named_parameters():
            gname = global_name(model, name, tied)
            covered.add(gname)
            if not skip_grads:
                want = shard_of(ref["grads"][gname], p, name, args.tp, layout.tp_rank, glu)
                cmp.tensor("gradients", "grad", grads[(c, name)], want, item=gname, nan_means_zero=True)
            want = shard_of(ref["params"][gname], p, name, args.tp, layout.tp_rank, glu)
            cmp.tensor("params after one Adam step", "param", p.detach(), want, item=gname)

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (cmp.rows, sorted(covered)))
    if keep_process_group:
        mpu.destroy_model_parallel()
    else:
        destroy_parallel()
    return report(args, gathered, set(ref["grads"]), skip_grads, layout)


def report(args, gathered, expected, skip_grads, layout) -> int:
    """Reduce every rank's rows (max diff, summed counts) and the coverage to rank 0; print the table."""
    if layout.rank != 0:
        return 0
    rows, all_covered = {}, set()
    for rank_rows, rank_covered in gathered:
        all_covered.update(rank_covered)
        for q, (diff, key, count, item) in rank_rows.items():
            row = rows.setdefault(q, [0.0, key, 0, ""])
            if diff > row[0] or math.isnan(diff):
                row[0], row[3] = diff, item
            row[2] += count
    tol = TOLERANCES[args.dtype]
    missing = sorted(expected - all_covered)
    lines, ok, results = [], True, []
    title = (f"parallel equivalence: TP{args.tp} × PP{args.pp}" + (f" (VPP{args.vpp})" if args.vpp else "")
             + f" × DP{args.dp} vs one device, {args.dtype}"
             + (", distributed optimizer" if args.distributed_optimizer else "")
             + (f", token-budget micro-batches (≤ {args.max_tokens} tokens)" if args.max_tokens else "")
             + (f", loss {' '.join(args.loss)}" if args.loss else ""))
    lines.append(title)
    lines.append("err = |parallel − reference| / max(1, |reference|); top-K ids: count of mismatches")
    lines.append(f"{'quantity':40s} {'max err':>13s} {'tolerance':>10s} {'compared':>9s}  result")
    order = ["token log-prob", "entropy", "top-K log-probs", "top-K ids, rank-1 flags (mismatches)", "SimKO loss",
             "covariance-selected tokens (count diff)",
             "gradients", "grad norm (float64 recomputation)", "grad norm (megatron clip_grads, fp32)",
             "params after one Adam step"]
    for q, (diff, key, count, item) in sorted(rows.items(), key=lambda kv: order.index(kv[0])):
        t = 0.0 if key is None else tol[key]
        passed = diff <= t and count > 0
        ok &= passed
        results.append(dict(quantity=q, max_err=diff, tolerance=t, compared=count, passed=passed, worst=item))
        lines.append(f"{q:40s} {diff:13.3e} {t:10.1e} {count:9d}  {'PASS' if passed else 'FAIL'}"
                     + (f"  (worst: {item})" if not passed and item else ""))
    if skip_grads:
        lines.append(f"{'gradients':40s} {'skipped: the distributed optimizer shards them over DP':>40s}")
    passed = not missing
    ok &= passed
    lines.append(f"{'parameter coverage':40s} {len(all_covered):>13d} {len(expected):>10d} {'':9s}  "
                 f"{'PASS' if passed else 'FAIL: missing ' + ', '.join(missing)}")
    lines.append("RESULT: " + ("PASS" if ok else "FAIL"))
    print("\n".join(lines), flush=True)
    with open(args.json, "w", encoding="utf-8") as f:  # the launcher turns "ok" into the exit status
        json.dump(dict(ok=ok, rows=results, missing=missing, title=title), f, indent=1)
    return 0


def validate(args) -> None:
    """Every configuration error before any process-group work (ValueError / FileNotFoundError, one line)."""
    if min(args.tp, args.pp, args.dp) < 1 or (args.vpp is not None and args.vpp < 2):
        raise ValueError("--tp/--pp/--dp must be ≥ 1 and --vpp ≥ 2")
    if args.vpp and args.pp < 2:
        raise ValueError("--vpp needs --pp ≥ 2")
    arch = make_arch(args)
    validate_parallelism(arch, args.tp, args.pp, args.vpp)
    loss_config(args.loss)
    if args.max_tokens is not None and args.max_tokens < 20:
        raise ValueError("--max-tokens must be ≥ 20 (the longest sequence of the check's batch)")
    if args.vpp and args.max_tokens:
        raise ValueError("--max-tokens with --vpp is not supported by this check (micro-batch count must "
                         "be a multiple of --pp)")
    if args.vpp and MICROBATCHES_PER_DP_RANK % args.pp:
        raise ValueError(f"the interleaved schedule needs micro-batches ({MICROBATCHES_PER_DP_RANK}) "
                         f"divisible by --pp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, script: str) -> int:
    """Both phases: ``script --worker ...`` (the command line) under torchrun with tp·pp·dp ranks; rank 0 computes
    the reference first. 0 if every row passed, 1 otherwise (also when the run failed)."""
    world = args.tp * args.pp * args.dp
    with tempfile.TemporaryDirectory(prefix="parallel_equiv_") as tmp:
        ref_path = os.path.join(tmp, "reference.pt")
        result_path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
               f"--master-port={free_port()}", script, "--worker", "--reference", ref_path]
        for flag in ("tp", "pp", "dp", "vpp", "model_config", "dtype", "seed", "max_tokens"):
            value = getattr(args, flag)
            if value is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(value)]
        if args.distributed_optimizer:
            cmd.append("--distributed-optimizer")
        for item in args.loss:
            cmd += ["--loss", item]
        cmd += ["--json", result_path]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        t0 = time.time()
        rc = subprocess.call(cmd, env=env)
        if rc != 0 or not os.path.exists(result_path):
            print(f"error: the parallel run failed (torchrun exit {rc})", file=sys.stderr)
            return 1
        with open(result_path, encoding="utf-8") as f:
            result = json.load(f)
        print(f"wall time {time.time() - t0:.1f} s (torchrun launch, {world} ranks)")
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=1)
        return 0 if result["ok"] else 1


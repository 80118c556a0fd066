"""SimKO / GRPO-family RL training: ``python -m megatron_simko.train --config CONFIG.yaml [key=value ...]``.

One RL step, as the loop below runs it (every rank; torchrun provides the ranks):

    prompts ──rollout/ (vLLM or transformers, n samples each)──► responses ──rewards/──► R ──advantages──► A
        ──trainer/ forward-only──► old log-probs (and entropy, Λ^(k), trainer–engine mismatch)
        ──trainer/ train_step × mini-batches × epochs (losses/ SimKO, megatron-core optimizer)──►
        ──rollout/ weight sync (checksum-verified)──► metrics, validation, checkpoint

``--dry-run`` validates the configuration against the model's config.json and prints the parallel layout and a
per-GPU memory estimate without starting any process group (no GPU needed).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_simko.cli import refuse_flags
from megatron_simko.config import Config, ConfigError, config_to_dict, load_config, save_config
from megatron_simko.models.gpt import ModelArch, arch_from_hf_config, validate_parallelism

# ------------------------------------------------------------------------------------------------ CLI

# flags of the dry run only (a real launch takes its layout from torchrun and its memory from the GPUs)
DRY_RUN_ONLY = ("nodes", "gpus_per_node", "gpu_memory_gib", "te", "skip_data")


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(allow_abbrev=False,
                                prog="python -m megatron_simko.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML configuration file (examples/configs/)")
    p.add_argument("--dry-run", action="store_true", help="validate, print layout and memory estimate, exit")
    p.add_argument("--nodes", type=int, default=None, help="dry run: number of nodes (default: $NNODES or 1)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="dry run: GPUs per node (default: 8)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="dry run: memory per GPU")
    p.add_argument("--te", choices=("auto", "yes", "no"), default="auto",
                   help="dry run: Transformer Engine on the GPU nodes (fused attention); auto: probe this machine")
    p.add_argument("--skip-data", action="store_true",
                   help="dry run: do not read the datasets (by default every row is parsed and prompt lengths checked)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. loss.alpha=0.02")
    args = p.parse_intermixed_args(argv)  # options may follow key=value overrides
    if not args.dry_run:
        refuse_flags(p, args, DRY_RUN_ONLY, "applies to --dry-run only")
    return args


def check_parallel_config(cfg: Config, arch: ModelArch, world_size: int, on_this_machine: bool = True) -> int:
    """Everything about the layout that can be checked before any process group exists; returns DP."""
    par = cfg.parallel
    validate_parallelism(arch, par.tensor_parallel, par.pipeline_parallel, par.virtual_pipeline_parallel)
    model_parallel = par.tensor_parallel * par.pipeline_parallel
    if world_size % model_parallel:
        raise ConfigError(f"parallel: world size {world_size} is not divisible by tensor_parallel × pipeline_parallel"
                          f" = {model_parallel}")
    dp = world_size // model_parallel
    for key, value in (("data.prompts_per_step", cfg.data.prompts_per_step),
                       ("train.mini_batch_size", cfg.train.mini_batch_size)):
        if value % dp:
            raise ConfigError(f"{key}={value} must be divisible by the data-parallel size {dp}")
    rollout_tp = rollout_tensor_parallel(cfg)
    if world_size % rollout_tp or arch.num_query_groups % rollout_tp:
        raise ConfigError(f"rollout.tensor_parallel={rollout_tp} must divide the world size {world_size} and "
                          f"the KV heads {arch.num_query_groups}")
    if on_this_machine and cfg.model.dtype == "bf16" and not torch.cuda.is_available():
        raise ConfigError("model.dtype=bf16 needs a GPU; use model.dtype=fp32 on CPU")
    from megatron_simko.memory_estimate import configured_rollout_memory

    problem = configured_rollout_memory(cfg, arch, 80.0).problem
    if problem:
        raise ConfigError(f"rollout: {problem}")
    return dp


def rollout_tensor_parallel(cfg: Config) -> int:
    """Ranks per rollout replica: vLLM's TP (default: the trainer's); the transformers backend runs at 1."""
    if cfg.rollout.backend == "transformers":
        return 1
    return cfg.rollout.tensor_parallel or cfg.parallel.tensor_parallel


# ------------------------------------------------------------------------------------------- the trainer


@dataclass
class Components:
    """Everything the loop touches, built once by :func:`setup`."""

    cfg: Config
    arch: ModelArch
    layout: object  # parallel.ParallelLayout
    tokenizer: object
    model: list  # DDP-wrapped model chunks
    optimizer: object
    scheduler: object
    engine: object  # rollout.RolloutEngine (rollout.backend)
    sync: object
    stop_token_ids: tuple  # ids that end a response (rollout/stop_tokens.py)
    guard: object  # trainer.optimizer.BadUpdateGuard: non-finite updates skipped, counted, bounded
    loader: object
    val_prompts: Optional[list]
    scorer: object
    logger: object
    ckpt_dir: str


def _is_logging_rank() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def log(msg: str) -> None:
    if _is_logging_rank():
        print(f"[megatron_simko] {msg}", flush=True)


def load_datasets(cfg: Config, tokenizer=None):
    """(train prompts, validation prompts or None), read in full: a malformed row fails here, naming file and
    row. With a tokenizer, prompts longer than rollout.max_prompt_length after chat rendering are dropped and
    counted, once, so that none ever reaches a rollout (a resumed run filters the same way)."""
    from megatron_simko.data import drop_long_prompts, load_prompts

    d, limit = cfg.data, cfg.rollout.max_prompt_length

    def load(key: str, spec: str, split: str, size: int) -> list:
        if not spec.startswith("reasoning_gym/") and not os.path.isfile(spec):
            raise FileNotFoundError(f"{key}: no such file {spec!r} (a .jsonl / .parquet file or reasoning_gym/<task>)")
        rg_options = d.reasoning_gym_config if spec.startswith("reasoning_gym/") else {}
        prompts = load_prompts(spec, split, size=size, seed=d.seed, skip_malformed=d.skip_malformed, **rg_options)
        if tokenizer is None:
            return list(prompts)
        kept, dropped = drop_long_prompts(prompts, tokenizer, limit, d.system_prompt, d.instruction, key)
        if dropped:
            log(f"{key}: dropped {dropped} of {len(prompts)} prompts longer than rollout.max_prompt_length="
                f"{limit} tokens")
        return kept

    train = load("data.train", d.train, "train", d.train_size)
    val = load("data.validation", d.validation, "validation", d.validation_size) if d.validation else None
    return train, val


def setup(cfg: Config, arch: ModelArch) -> Components:
    from megatron_simko.checkpoint.native import load_hf_into_model, load_into_model
    from megatron_simko.data import PromptLoader
    from megatron_simko.data.tokenizer import load_tokenizer
    from megatron_simko.parallel import initialize_parallel
    from megatron_simko.parallel.failfast import register_cleanup
    from megatron_simko.rewards import RewardScorer
    from megatron_simko.rollout import MegatronToEngineSync, WeightSyncConfig, build_engine, stop_token_ids
    from megatron_simko.trainer.model import build_model_chunks, trainer_transformer_config, wrap_with_ddp
    from megatron_simko.trainer.optimizer import BadUpdateGuard, build_optimizer, build_scheduler

    par = cfg.parallel
    layout = initialize_parallel(par.tensor_parallel, par.pipeline_parallel, par.virtual_pipeline_parallel,
                                 seed=cfg.train.seed)
    log(f"layout: world {layout.world_size} = TP {layout.tp} × PP {layout.pp} × DP {layout.dp} on {layout.device}")
    from megatron_simko.losses.triton_kernels import resolve_backend

    log(f"loss backend: {resolve_backend(cfg.loss.backend, layout.device, cfg.loss.top_k)} "
        f"(loss.backend={cfg.loss.backend})")

    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.hf_dir)
    if tokenizer.vocab_size > arch.vocab_size:
        raise ConfigError(f"model.tokenizer has {tokenizer.vocab_size} ids but the model only {arch.vocab_size} "
                          f"embedding rows")

    # Model: this rank's stage(s), initial weights, DDP, optimizer, schedule.
    dtype = torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32
    tconfig = trainer_transformer_config(arch, par.tensor_parallel, par.pipeline_parallel,
                                         par.virtual_pipeline_parallel, params_dtype=dtype,
                                         sequence_parallel=par.sequence_parallel)
    chunks = build_model_chunks(arch, tconfig)
    for chunk in chunks:
        if cfg.model.megatron_dir:
            load_into_model(chunk, cfg.model.megatron_dir, layout.tp_rank, layout.tp, layout.pp_rank, layout.pp, arch)
        else:
            load_hf_into_model(chunk, cfg.model.hf_dir, layout.tp_rank, layout.tp, arch)
    model = wrap_with_ddp(chunks, use_distributed_optimizer=par.use_distributed_optimizer)
    # Rollout engine on every rank (rollout.backend), built before the optimizer state exists: on a GPU vLLM
    # sizes its memory share at construction.
    r = cfg.rollout
    engine = build_engine(r.backend, cfg.model.hf_dir, dtype=dtype, device=layout.device, seed=cfg.train.seed,
                          max_model_len=r.max_prompt_length + r.max_response_length, tensor_parallel=r.tensor_parallel,
                          gpu_memory_utilization=r.gpu_memory_utilization, cpu_kv_cache_gib=r.kv_cache_gib,
                          max_batch_rows=r.max_batch_rows, kv_budget_gib=r.kv_budget_gib)
    stop_ids = stop_token_ids(tokenizer, cfg.model.hf_dir, r.stop_token_ids)
    log(f"rollout: {r.backend} engine; responses end at token ids {list(stop_ids)}")
    updates_per_step = (cfg.data.prompts_per_step // cfg.train.mini_batch_size) * cfg.train.ppo_epochs
    optimizer = build_optimizer(model, cfg.optimizer, use_distributed_optimizer=par.use_distributed_optimizer)
    scheduler = build_scheduler(optimizer, cfg.optimizer, decay_steps=cfg.train.steps * updates_per_step)

    sync = MegatronToEngineSync(model, arch, engine, WeightSyncConfig(bucket_mb=r.sync_bucket_mb,
                                                                      verify_every=r.verify_sync_every))

    # Data: every rank holds the same global prompt batch (rollouts are sharded over rollout replicas and
    # gathered back); each DP rank then trains on its contiguous share.
    train_prompts, val_prompts = load_datasets(cfg, tokenizer)
    loader = PromptLoader(train_prompts, cfg.data.prompts_per_step, seed=cfg.data.seed)
    scorer = RewardScorer(timeout_s=cfg.data.reward_timeout_s)
    register_cleanup(scorer.close)  # on a failure or a signal (parallel/failfast.py)

    ckpt_dir = cfg.checkpoint.dir or os.path.join(cfg.train.log_dir, "checkpoints")
    return Components(cfg, arch, layout, tokenizer, model, optimizer, scheduler, engine, sync, stop_ids,
                      BadUpdateGuard(cfg.train.max_bad_steps), loader, val_prompts, scorer, logger=None,
                      ckpt_dir=ckpt_dir)


# ------------------------------------------------------------------------------------------- one RL step


def encode_prompts(c: Components, examples) -> List[List[int]]:
    from megatron_simko.data import prompt_token_ids

    ids = []
    for i, ex in enumerate(examples):
        tokens = prompt_token_ids(ex, c.tokenizer, c.cfg.data.system_prompt, c.cfg.data.instruction)
        if len(tokens) > c.cfg.rollout.max_prompt_length:  # load_datasets dropped these: a bug if it happens
            raise ValueError(f"prompt {i} of this batch has {len(tokens)} tokens, more than rollout.max_prompt_length"
                             f"={c.cfg.rollout.max_prompt_length}; raise the limit or filter the dataset")
        ids.append(tokens)
    return ids


def sampling_config(c: Components, step: int, validation: bool = False):
    from megatron_simko.rollout import SamplingConfig

    r = c.cfg.rollout
    return SamplingConfig(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_response_length,
                          seed=c.cfg.train.seed + (10**6 if validation else 0),
                          stop_token_ids=c.stop_token_ids)


def score_globally(c: Components, results, examples) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Global rewards [P·n] and reward-failure counts of the batch (every rank scores a slice, all gather)."""
    from megatron_simko.rollout.dynamic_sampling import score_globally as score

    return score(c.scorer, c.tokenizer, results, examples, log=log)


# Loss metrics already logged from the pre-update statistics of the whole batch (entropy/mean, lambda/k, ...).
_LOGGED_ELSEWHERE = ("loss", "entropy_mean", "rank1_fraction", "num_tokens")


def rl_step(c: Components, step: int) -> Dict[str, float]:
    from megatron.core import parallel_state as mpu

    from megatron_simko.advantages import minibatches_with_signal
    from megatron_simko.experience import build_experience, rollout_metrics
    from megatron_simko.losses.schedule import in_grpo_warmup, loss_config_at_step
    from megatron_simko.metrics import device_memory_metrics, gated_metrics, reset_device_memory_peak, token_metrics
    from megatron_simko.rollout import dp_share, generate_global, logprob_mismatch, truncated_importance_weights
    from megatron_simko.rollout.dynamic_sampling import collect_step_rollouts
    from megatron_simko.rollout.sharding import RolloutLayout
    from megatron_simko.trainer.step import train_step
    from megatron_simko.trainer.token_stats import compute_token_stats

    cfg, L = c.cfg, c.layout
    n = cfg.rollout.n_samples
    times: Dict[str, float] = {}
    reset_device_memory_peak(L.device)  # memory/peak_*: this step's peak, not the run's
    t = time.perf_counter()

    # 1. rollout + rewards: the global prompt batch, n samples each, sharded over rollout replicas, gathered to
    # all ranks, scored globally (with rollout.dynamic_sampling: more rounds until only mixed groups remain).
    def generate(ids, offset):
        return generate_global(c.engine, ids, n, sampling_config(c, step),
                               RolloutLayout.current(c.engine.tensor_parallel), step=step, prompt_offset=offset)

    got = collect_step_rollouts(c.loader.next_batch, lambda ex: encode_prompts(c, ex), generate,
                                lambda res, ex: score_globally(c, res, ex), n, cfg.rollout.dynamic_sampling,
                                cfg.rollout.dynamic_sampling_max_rounds, log=log, step=step)
    c.engine.release_memory()
    results, rewards, prompt_ids = got.results, got.rewards, got.prompt_ids
    times["time/rollout"] = time.perf_counter() - t
    t = time.perf_counter()

    # 2. GRPO advantages (per prompt group) and packing, inside build_experience. time/rollout includes the scoring
    # (dynamic sampling interleaves the two); time/experience is this phase.
    lengths = torch.tensor([s.length for r in results for s in r.samples])
    truncated = torch.tensor([s.finish_reason == "length" for r in results for s in r.samples])
    metrics = {**rollout_metrics(rewards, lengths, truncated, n), **got.metrics}
    mine = dp_share(results, L.dp_rank, L.dp)  # this DP rank's prompts (whole GRPO groups, contiguous)
    lo = mine[0].prompt_index  # results are in global prompt order
    batch = build_experience(mine, rewards[lo * n:(lo + len(mine)) * n].tolist(), c.tokenizer.pad_id, L.device)
    times["time/experience"] = time.perf_counter() - t
    t = time.perf_counter()

    # 3. old-policy log-probs (the policy that generated the rollouts, recomputed by the trainer) + metrics.
    stats = compute_token_stats(c.model, batch, cfg.loss.top_k, c.arch.vocab_size, cfg.rollout.temperature,
                                max_tokens=cfg.train.micro_batch_tokens, broadcast_to_all_stages=True,
                                backend=cfg.loss.backend, fused_linear=cfg.loss.fused_linear,
                                fused_chunk_tokens=cfg.loss.fused_chunk_tokens)
    batch.old_logprob = stats.target_logprob
    metrics.update(logprob_mismatch(stats.target_logprob, batch.rollout_logprob, batch.loss_mask,
                                    group=mpu.get_data_parallel_group()))
    metrics.update(token_metrics(stats, batch.loss_mask, group=mpu.get_data_parallel_group()))
    metrics.update(gated_metrics(stats, batch, cfg.loss, group=mpu.get_data_parallel_group()))  # before TIS
    entropy_hist = stats.entropy[batch.loss_mask].cpu()
    tis = truncated_importance_weights(stats.target_logprob, batch.rollout_logprob, cfg.rollout.tis_cap,
                                       batch.loss_mask)
    if tis is not None:  # loss is linear in A per token: scaling A by w ≥ 0 weights the token's loss by w
        batch.advantages = batch.advantages.unsqueeze(1) * tis
    times["time/old_logprob"] = time.perf_counter() - t
    t = time.perf_counter()

    # 4. PPO-style updates: epochs × mini-batches (whole prompt groups, in order), one optimizer step each —
    # except for a mini-batch whose groups are all-correct or all-wrong (every advantage 0): no Adam step, its
    # LR-schedule slot passes. Decided from the global rewards, so every rank agrees without communicating.
    # loss.grpo_warmup_steps: plain GRPO first (a function of the step number, so exact across a resume).
    loss_cfg, metrics["loss/grpo_warmup"] = loss_config_at_step(cfg.loss, step), float(in_grpo_warmup(cfg.loss, step))
    rows_per_mini = cfg.train.mini_batch_size // L.dp * n
    with_signal = minibatches_with_signal(rewards, n, L.dp, cfg.train.mini_batch_size)
    train_metrics: List[Dict[str, float]] = []
    for _epoch in range(cfg.train.ppo_epochs):
        for j, start in enumerate(range(0, batch.batch_size, rows_per_mini)):
            if not with_signal[j]:
                c.scheduler.step(increment=1)
                continue
            mini = batch.select(range(start, min(start + rows_per_mini, batch.batch_size)))
            out = train_step(c.model, c.optimizer, c.scheduler, mini, loss_cfg, c.arch.vocab_size,
                             temperature=cfg.rollout.temperature, max_tokens=cfg.train.micro_batch_tokens,
                             guard=c.guard, step=step)
            train_metrics.append({**{f"loss/{k}": v for k, v in out.metrics.items() if k not in _LOGGED_ELSEWHERE
                                     and not k.startswith("lambda_")},
                                  "loss/value": out.loss, "lr": out.lr,
                                  "grad_norm": float("nan") if out.grad_norm is None else out.grad_norm,
                                  "optim/skipped_nonfinite_fraction": float(out.skipped_nonfinite)})
    metrics["train/skipped_updates"] = float(with_signal.count(False) * cfg.train.ppo_epochs)
    for key in train_metrics[0] if train_metrics else ():  # averages over the updates that ran
        metrics[key] = sum(m[key] for m in train_metrics) / len(train_metrics)
    metrics["optim/skipped_nonfinite_total"] = float(c.guard.skipped_total)
    times["time/train"] = time.perf_counter() - t
    t = time.perf_counter()

    # 5. weight sync into the engine (checksum-verified every rollout.verify_sync_every steps). Each wake-up
    # first hands PyTorch's cached training peak back (gc.collect + empty_cache, inside resume_memory).
    c.engine.resume_memory(("weights",))
    report = c.sync.sync()
    c.engine.resume_memory(("kv_cache",))
    metrics.update(report.metrics())
    times["time/sync"] = time.perf_counter() - t

    step_time = sum(times.values())
    metrics.update(times)
    metrics["time/step"] = step_time
    metrics["throughput/tokens_per_s"] = float(lengths.sum() + sum(len(p) for p in prompt_ids) * n) / step_time
    metrics.update(device_memory_metrics(L.device))
    metrics["_entropy_hist"] = entropy_hist  # popped by the loop
    return metrics


def validate(c: Components, step: int) -> Dict[str, float]:
    """pass@k on the validation prompts (n = rollout.n_samples, the training sampling settings)."""
    from megatron_simko.eval.passk import pass_at_k_table
    from megatron_simko.rollout import generate_global
    from megatron_simko.rollout.sharding import RolloutLayout

    n = c.cfg.rollout.n_samples
    prompt_ids = encode_prompts(c, c.val_prompts)
    results = generate_global(c.engine, prompt_ids, n, sampling_config(c, step, validation=True),
                              RolloutLayout.current(c.engine.tensor_parallel), step=0)
    rewards, failures = score_globally(c, results, c.val_prompts)
    correct = (rewards > 0.5).view(-1, n).sum(dim=1).tolist()
    table = pass_at_k_table([(n, int(k)) for k in correct])
    return {**{f"val/pass@{k}": v for k, v in table.items()}, **{f"val/{k}": v for k, v in failures.items()}}


# ------------------------------------------------------------------------------------------- the loop


def train(cfg: Config, arch: ModelArch) -> int:
    from tqdm import tqdm

    from megatron_simko.export import export_live_model
    from megatron_simko.losses.schedule import warmup_log_line
    from megatron_simko.metrics import MetricsLogger
    from megatron_simko.parallel import destroy_parallel
    from megatron_simko.trainer.checkpointing import latest_step, load_checkpoint, save_checkpoint

    t_start = time.perf_counter()
    c = setup(cfg, arch)
    start_step = 0
    resume = cfg.checkpoint.resume
    if resume != "none":
        root = c.ckpt_dir if resume == "auto" else resume
        if latest_step(root) is not None:
            loaded = load_checkpoint(root, c.model, c.optimizer, c.scheduler)
            c.loader.load_state_dict(loaded.config["loader"])
            start_step = loaded.step
            log(f"resumed from {root} at step {start_step}")
            if loaded.schedule_changes:  # the rule: the current config wins (trainer/optimizer.build_scheduler)
                log("LR schedule from the current config, not the checkpoint's: " + ", ".join(
                    f"{k} {old} -> {new}" for k, (old, new) in loaded.schedule_changes.items()))
        elif resume != "auto":
            raise FileNotFoundError(f"checkpoint.resume={resume!r}: no complete checkpoint there")
    report = c.sync.sync(verify=True)  # the engine starts from the trainer's weights, verified
    log(f"initial weight sync: {report.tensors} tensors, {report.bytes / 2**20:.1f} MiB, "
        f"{report.seconds:.2f} s, checksums verified")
    if _is_logging_rank():
        save_config(cfg, os.path.join(cfg.train.log_dir, "config.yaml"))
    c.logger = MetricsLogger(cfg.train.log_dir, enabled=_is_logging_rank(), resume_step=start_step)

    def checkpoint(step: int) -> None:
        save_checkpoint(c.ckpt_dir, step, c.model, c.optimizer, c.scheduler,
                        config={"run": config_to_dict(cfg), "loader": c.loader.state_dict()},
                        keep_last=cfg.checkpoint.keep_last)

    bar = tqdm(range(start_step + 1, cfg.train.steps + 1), desc="RL steps", disable=not _is_logging_rank(),
               dynamic_ncols=True, file=sys.stdout)
    for step in bar:
        if warmup_log_line(cfg.loss, step, start_step + 1):
            log(warmup_log_line(cfg.loss, step, start_step + 1))
        metrics = rl_step(c, step)
        hist = metrics.pop("_entropy_hist")
        if cfg.train.validate_every and c.val_prompts and step % cfg.train.validate_every == 0:
            metrics.update(validate(c, step))
        c.logger.log(step, metrics, histograms={"entropy/response_tokens": hist})
        bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", H=f"{metrics['entropy/mean']:.3f}",
                        clip=f"{metrics.get('loss/clip_fraction', 0.0):.3f}",
                        mismatch=f"{metrics['mismatch/mean_abs']:.1e}", s=f"{metrics['time/step']:.1f}")
        if (cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0) or step == cfg.train.steps:
            checkpoint(step)
    bar.close()
    hf_out = os.path.join(cfg.train.log_dir, "hf_final")
    export_live_model(c.sync, hf_out, cfg.model.hf_dir)  # for pass@k evaluation and serving
    log(c.logger.summary())
    log(f"checkpoints: {c.ckpt_dir}; Hugging Face export: {hf_out}; wall time {time.perf_counter() - t_start:.1f} s")
    c.logger.close()
    c.scorer.close()
    c.engine.shutdown()
    destroy_parallel()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:  # everything checkable before process groups: a clear one-line error, exit code 2
        cfg = load_config(args.config, args.overrides).validate()
        arch = arch_from_hf_config(cfg.model.hf_dir)
        if args.dry_run:
            from megatron_simko.dry_run import dry_run

            nodes = args.nodes or int(os.environ.get("NNODES", "1"))
            return dry_run(cfg, arch, nodes, args.gpus_per_node or 8, args.gpu_memory_gib, not args.skip_data, args.te)
        check_parallel_config(cfg, arch, int(os.environ.get("WORLD_SIZE", "1")))
        from megatron_simko.versions import require_supported_versions

        require_supported_versions(vllm=cfg.rollout.backend == "vllm")  # one line, before any process group
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from megatron_simko.parallel.failfast import FailFast, register_cleanup
    from megatron_simko.rollout.cpu_shm import unlink_own_segments

    guard = FailFast.install()  # one rank's error or a SIGTERM / Ctrl-C ends the whole job, promptly
    register_cleanup(unlink_own_segments)  # an engine interrupted while being built
    try:
        code = train(cfg, arch)
    except BaseException as exc:
        guard.fail(exc)  # one line naming the rank, local clean-ups, the other ranks told; never returns
    guard.close()
    return code


if __name__ == "__main__":
    sys.exit(main())

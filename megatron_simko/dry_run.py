"""``python -m megatron_simko.train --dry-run``: the configuration checked against the model's config.json and
the data, the parallel layout and the per-GPU memory estimate printed — for the configured rollout backend and
attention, and for both backends with and without Transformer Engine — without any process group or GPU."""
from __future__ import annotations

import os
from dataclasses import replace

from megatron_simko.config import Config, ConfigError
from megatron_simko.models.gpt import ModelArch, padded_vocab_size
from megatron_simko.train import check_parallel_config, load_datasets, rollout_tensor_parallel


def dry_run_data(cfg: Config) -> str:
    """Read the datasets as the job would (every row parsed; prompt lengths checked when the tokenizer is at
    hand): bad data fails here, before the job holds the cluster. Returns a one-line summary."""
    from megatron_simko.data.tokenizer import load_tokenizer

    path = cfg.model.tokenizer or cfg.model.hf_dir
    has_tokenizer = path.endswith(".model") and os.path.isfile(path) or any(
        os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
    train, val = load_datasets(cfg, load_tokenizer(path) if has_tokenizer else None)
    if len(train) < cfg.data.prompts_per_step:
        raise ConfigError(f"data.train: {len(train)} usable prompts, fewer than data.prompts_per_step="
                          f"{cfg.data.prompts_per_step}")
    return (f"data OK: {len(train)} train prompts" + (f", {len(val)} validation prompts" if val is not None else "")
            + ("" if has_tokenizer else f" (prompt lengths not checked: no tokenizer in {path})"))


def dry_run(cfg: Config, arch: ModelArch, nodes: int, gpus_per_node: int, gpu_memory_gib: float,
            read_data: bool = True, attention: str = "auto") -> int:
    """``attention``: "auto" (Transformer Engine probed on this machine), "yes" / "no" (assumed)."""
    from megatron_simko.memory_estimate import GIB, configured_rollout_memory, estimate_memory, parameter_counts

    world = nodes * gpus_per_node
    dp = check_parallel_config(cfg, arch, world, on_this_machine=False)
    tp, pp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
    counts = parameter_counts(arch, tp)
    total = counts["embedding"] + counts["output"] + counts["layers"] + counts["final_norm"]
    rollout_tp = rollout_tensor_parallel(cfg)
    responses = cfg.data.prompts_per_step * cfg.rollout.n_samples
    print(f"config OK: {arch.hf_architecture} ({total / 1e9:.2f} B parameters, vocab {arch.vocab_size} padded to "
          f"{padded_vocab_size(arch.vocab_size, tp)})")
    print(f"layout: {nodes} node(s) × {gpus_per_node} GPUs = {world} ranks = TP {tp} × PP {pp} × DP {dp}"
          + (f" (virtual PP {cfg.parallel.virtual_pipeline_parallel})" if cfg.parallel.virtual_pipeline_parallel else ""))
    print(f"rollout: {world // rollout_tp} {cfg.rollout.backend} replicas of TP {rollout_tp}, colocated"
          + (" (sleep mode between phases)" if cfg.rollout.backend == "vllm" else " (a full model copy per rank)"))
    print(f"per step: {cfg.data.prompts_per_step} prompts × n={cfg.rollout.n_samples} = {responses} responses; "
          f"{cfg.data.prompts_per_step // cfg.train.mini_batch_size} optimizer step(s) × {cfg.train.ppo_epochs} "
          f"epoch(s); {cfg.data.prompts_per_step // dp} prompts per DP rank")
    print(f"loss: {cfg.loss}")
    try:
        print(dry_run_data(cfg) if read_data else "data: not read (--skip-data)")
    except FileNotFoundError as exc:  # the data usually lives on the cluster, not where the dry run is tried
        raise FileNotFoundError(f"{exc}; pass --skip-data to check the layout and memory without "
                                "the data") from None
    te = {"auto": None, "yes": True, "no": False}[attention]
    if te is None:
        from megatron_simko.models.gpt import transformer_engine_status

        te = transformer_engine_status()[0]
    print(f"per-GPU memory estimate, rollout.backend={cfg.rollout.backend}, attention "
          f"{'fused (Transformer Engine)' if te else 'unfused (local spec, no Transformer Engine)'} "
          f"(megatron_simko/memory_estimate.py states the assumptions):")
    ests = {}
    for backend in ("vllm", "transformers"):
        other = replace(cfg, rollout=replace(cfg.rollout, backend=backend, tensor_parallel=None))
        for fused in (True, False):
            ests[backend, fused] = estimate_memory(
                arch, tp, pp, dp, cfg.train.micro_batch_tokens, cfg.model.dtype,
                cfg.parallel.use_distributed_optimizer, configured_rollout_memory(other, arch, gpu_memory_gib),
                fused_attention=fused, sequence_length=cfg.rollout.max_prompt_length + cfg.rollout.max_response_length,
                fused_chunk_tokens=cfg.loss.fused_chunk_tokens if cfg.loss.fused_linear else None)
    est = ests[cfg.rollout.backend, te]
    print(est.table(gpu_memory_gib))
    print("peak GiB per GPU by rollout backend and attention (training phase / rollout phase):")
    for (backend, fused), e in ests.items():
        mark = "  <- this run" if (backend, fused) == (cfg.rollout.backend, te) else ""
        print(f"  {backend:<12} {'with TE (fused)   ' if fused else 'without TE (local)'}  "
              f"{e.train_phase / GIB:6.1f} / {e.rollout_phase / GIB:6.1f}  "
              f"{'fits' if e.fits(gpu_memory_gib) else 'does NOT fit'}{mark}")
    if est.rollout.problem:
        print(f"WARNING: {est.rollout.problem}")
    if est.fits(gpu_memory_gib):
        print("fits")
    else:
        print("WARNING: the estimate exceeds the GPU memory; "
              + ("install Transformer Engine (fused attention), " if not te else "")
              + ("use rollout.backend=vllm or lower rollout.max_batch_rows / kv_budget_gib, "
                 if cfg.rollout.backend == "transformers" else "")
              + "raise TP/PP or lower micro_batch_tokens")
    return 0

"""One torchrun launch of the logits check: build the Megatron model at TP×PP, load each requested checkpoint,
run a forward pass over the reference tokens and compare the (TP-gathered) logits with transformers' logits.

    torchrun --nproc-per-node TP*PP -m megatron_simko.checkpoint.verify_worker \
        --tp T --pp P --ref ref.pt --result result.json --check native:MEG_DIR --check hf:HF_DIR

``ref.pt`` holds ``tokens`` [B, S] and fp32 ``logits`` [B, S, V] from transformers (one ``--ref`` for all checks, or
one per ``--check``: a launch may check several models). The result JSON (written by global rank 0) lists, per
check, the max abs difference and the source's (tp, pp).
"""
from __future__ import annotations

import argparse
import json
import warnings

import torch
import torch.distributed as dist


def forward_logits(model, tokens: torch.Tensor, seq_length: int):
    """Full-vocabulary fp32 logits [B, S, Vpad] on the last PP stage (None elsewhere), through megatron's schedule."""
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_simko.parallel.cpu_shims import cuda_to_cpu

    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, -1)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None].expand(b, 1, s, s)  # True = hide
    captured = []

    def forward_step(data_iterator, model_chunk):
        toks = next(data_iterator)
        out = model_chunk(toks, position_ids, mask)

        def loss_func(output_tensor):
            captured.append(output_tensor.detach())
            return output_tensor.sum() * 0.0, {}

        return out, loss_func

    with torch.no_grad(), cuda_to_cpu():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([tokens]), model=[model], num_microbatches=1,
            seq_length=seq_length, micro_batch_size=b, forward_only=True)
    if not mpu.is_pipeline_last_stage():
        return None
    local = captured[0].float()  # [B, S, Vpad/TP]
    group = mpu.get_tensor_model_parallel_group()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=-1)  # [B, S, Vpad]


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--pp", type=int, required=True)
    ap.add_argument("--ref", action="append", required=True,
                    help="reference tokens+logits (.pt): once for all checks, or once per --check")
    ap.add_argument("--result", required=True)
    ap.add_argument("--check", action="append", required=True, help="native:DIR or hf:DIR")
    args = ap.parse_args()

    from megatron_simko.checkpoint.native import load_hf_into_model, load_into_model, read_meta
    from megatron_simko.models.gpt import arch_from_hf_config, build_gpt_model, transformer_config
    from megatron_simko.parallel.cpu_shims import cuda_to_cpu
    from megatron_simko.parallel.initialize import destroy_parallel, initialize_parallel

    layout = initialize_parallel(args.tp, args.pp)
    if len(args.ref) not in (1, len(args.check)):
        raise SystemExit("give --ref once, or once per --check")
    refs = args.ref * len(args.check) if len(args.ref) == 1 else args.ref
    results = []
    model = arch = None
    for check, ref_path in zip(args.check, refs):
        ref = torch.load(ref_path)
        tokens, ref_logits = ref["tokens"], ref["logits"]
        kind, path = check.split(":", 1)
        if kind == "native":
            meta = read_meta(path)
            src_arch, source = meta.arch, {"tp": meta.tp, "pp": meta.pp}
        else:
            src_arch, source = arch_from_hf_config(path), {"tp": "hf", "pp": "hf"}
        if model is None or src_arch != arch:  # one launch may check several models
            arch = src_arch
            config = transformer_config(arch, args.tp, args.pp, params_dtype=torch.float32)
            with cuda_to_cpu():  # tied embeddings + PP>1: the constructor calls .cuda() (parallel/cpu_shims.py)
                model = build_gpt_model(arch, config, pre_process=layout.is_first_stage,
                                        post_process=layout.is_last_stage).eval()
        for p in model.parameters():  # a load that misses a parameter must not pass on stale values
            p.data.fill_(float("nan"))
        if kind == "native":
            load_into_model(model, path, layout.tp_rank, args.tp, layout.pp_rank, args.pp, arch=arch)
        else:
            load_hf_into_model(model, path, layout.tp_rank, args.tp, arch=arch)
        logits = forward_logits(model, tokens, tokens.shape[1])
        diff = None
        if logits is not None:
            diff = (logits[..., : arch.vocab_size] - ref_logits).abs().max().item()  # NaN if anything stayed NaN
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, diff)
        diff = max(d for d in gathered if d is not None)
        results.append({"check": kind, "path": path, "source_tp": source["tp"], "source_pp": source["pp"],
                        "model_tp": args.tp, "model_pp": args.pp, "max_abs_diff": diff})
    if dist.get_rank() == 0:
        with open(args.result, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    destroy_parallel()


if __name__ == "__main__":
    main()

"""megatron-core ``GPTModel`` built from a Hugging Face ``config.json`` (Qwen2 / Qwen2.5 and Llama families).

Qwen2:  RMSNorm, SwiGLU MLP, grouped-query attention, QKV bias, RoPE(rope_theta), tied or untied embeddings.
Llama:  the same without QKV bias; Llama-3.x "llama3" RoPE scaling.
The embedding/output rows are padded to a multiple of 128·TP (Megatron's convention); the real vocabulary
size travels with the model (``ModelArch.vocab_size``) and is handed to the loss, which ignores padding rows.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F

SUPPORTED_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
VOCAB_PAD_MULTIPLE = 128


@dataclass(frozen=True)
class ModelArch:
    """The architecture facts we need from a Hugging Face config, validated."""

    family: str  # "qwen2" | "llama"
    hf_architecture: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int  # = num_key_value_heads
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int  # real vocabulary (HF rows)
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool
    rope_scaling_factor: Optional[float] = None  # Llama-3.x "llama3" scaling

    def to_dict(self) -> dict:
        return asdict(self)


def load_hf_config(source: Union[str, os.PathLike, Mapping[str, Any]]) -> dict:
    """A config dict from a HF model directory, a config.json path, or a dict."""
    if isinstance(source, Mapping):
        return dict(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no Hugging Face config at {path!r}: pass a model directory containing config.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def arch_from_hf_config(source: Union[str, os.PathLike, Mapping[str, Any]]) -> ModelArch:
    """Validate a HF config and extract the architecture; clear errors for anything we cannot represent."""
    cfg = load_hf_config(source)
    archs = cfg.get("architectures") or []
    arch_name = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch_name is None:
        model_type = cfg.get("model_type")
        by_type = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
        arch_name = by_type.get(model_type)
        if arch_name is None:
            raise ValueError(
                f"unsupported architecture {archs or model_type!r}: supported are {sorted(SUPPORTED_ARCHITECTURES)}"
            )
    family = SUPPORTED_ARCHITECTURES[arch_name]
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if cfg.get("head_dim") is None and hidden % heads != 0:
        raise ValueError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    kv = int(cfg.get("num_key_value_heads") or heads)
    if heads % kv != 0:
        raise ValueError(f"num_attention_heads {heads} is not divisible by num_key_value_heads {kv}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported (SwiGLU with silu only)")
    # transformers >= 5 writes RoPE settings as `rope_parameters` {rope_theta, rope_type, ...} instead of
    # top-level `rope_theta` / `rope_scaling`; read both spellings.
    rope_params = cfg.get("rope_parameters") or {}
    rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    rope_scaling = cfg.get("rope_scaling") or (
        rope_params if rope_params.get("rope_type", "default") != "default" else None)
    scaling_factor = None
    if rope_scaling:
        kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
        expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        if kind != "llama3" or any(float(rope_scaling.get(k, v)) != v for k, v in expected.items()):
            raise ValueError(
                f"rope_scaling {rope_scaling!r} is not supported: only Llama-3 style scaling with "
                f"{expected} (what megatron-core implements)"
            )
        scaling_factor = float(rope_scaling["factor"])
    qkv_bias = bool(cfg.get("attention_bias", family == "qwen2"))
    if family == "llama" and cfg.get("mlp_bias"):
        raise ValueError("Llama configs with mlp_bias=True are not supported")
    return ModelArch(
        family=family,
        hf_architecture=arch_name,
        hidden_size=hidden,
        num_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=heads,
        num_query_groups=kv,
        head_dim=head_dim,
        ffn_hidden_size=int(cfg["intermediate_size"]),
        vocab_size=int(cfg["vocab_size"]),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        rope_scaling_factor=scaling_factor,
    )


def padded_vocab_size(vocab_size: int, tensor_parallel: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    """Megatron pads embedding rows to a multiple of ``multiple · TP`` so every TP shard is equal and aligned."""
    step = multiple * tensor_parallel
    return ((vocab_size + step - 1) // step) * step


def validate_parallelism(arch: ModelArch, tensor_parallel: int, pipeline_parallel: int,
                         virtual_pipeline_parallel: Optional[int] = None) -> None:
    """Raise ValueError (before any process-group work) if TP/PP cannot shard this model."""
    tp, pp = tensor_parallel, pipeline_parallel
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor_parallel ({tp}) and pipeline_parallel ({pp}) must be ≥ 1")
    checks = [
        (arch.num_attention_heads, "num_attention_heads"),
        (arch.num_query_groups, "num_key_value_heads (query groups)"),
        (arch.ffn_hidden_size, "intermediate_size (FFN)"),
    ]
    for value, name in checks:
        if value % tp != 0:
            raise ValueError(f"tensor_parallel={tp} does not divide {name}={value}; choose a TP that divides it")
    stages = pp * (virtual_pipeline_parallel or 1)
    if arch.num_layers % stages != 0:
        raise ValueError(
            f"pipeline_parallel={pp}" + (f" × virtual={virtual_pipeline_parallel}" if virtual_pipeline_parallel else "")
            + f" does not divide num_hidden_layers={arch.num_layers}"
        )


def transformer_engine_status() -> Tuple[bool, str]:
    """Whether Transformer Engine's PyTorch API is usable, and why not: (ok, reason).

    Importing the top-level ``transformer_engine`` is not enough: a TE built against another torch imports,
    then fails when its ``pytorch`` extension loads (inside the layer spec, mid-build). So the probe loads
    ``transformer_engine.pytorch`` and touches the classes megatron-core's TE spec instantiates."""
    try:
        import transformer_engine.pytorch as te

        for name in ("Linear", "LayerNormLinear", "DotProductAttention"):
            getattr(te, name)
    except Exception as e:  # ImportError, OSError (undefined symbol), AttributeError, RuntimeError ...
        return False, f"transformer_engine.pytorch is not usable ({type(e).__name__}: {e})"
    return True, "transformer_engine.pytorch imports"


def transformer_engine_available(require_cuda: bool = True) -> bool:
    """TE's spec is used only on a GPU with a working ``transformer_engine.pytorch``; otherwise the local spec,
    with a warning when a GPU is present (the local attention materialises [b, heads, s, s] scores)."""
    if require_cuda and not torch.cuda.is_available():
        return False
    ok, reason = transformer_engine_status()
    if not ok:
        warnings.warn(f"{reason}: using megatron-core's local layer spec (unfused attention: more memory, see "
                      f"memory_estimate.py)", stacklevel=2)
    return ok


def layer_spec(arch: ModelArch, use_transformer_engine: Optional[bool] = None):
    """Transformer Engine spec when TE imports on a GPU, otherwise megatron-core's local spec (apex if present)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    if use_transformer_engine:
        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization="RMSNorm")


def transformer_config(
    arch: ModelArch,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    virtual_pipeline_parallel: Optional[int] = None,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    **overrides,
):
    """megatron-core ``TransformerConfig`` for ``arch`` (no dropout: RL log-probs must be deterministic)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    validate_parallelism(arch, tensor_parallel, pipeline_parallel, virtual_pipeline_parallel)
    on_cpu = not torch.cuda.is_available()
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline_parallel,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=on_cpu,
        batch_p2p_comm=not on_cpu,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_gpt_model(
    arch: ModelArch,
    config,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    use_transformer_engine: Optional[bool] = None,
):
    """One pipeline stage (or chunk, with ``vp_stage``) of the GPTModel; logits stay vocab-parallel."""
    from megatron.core.models.gpt import GPTModel

    from megatron_simko.parallel.cpu_shims import cuda_to_cpu

    tp = config.tensor_model_parallel_size
    with cuda_to_cpu():  # CPU: tied embeddings with PP > 1 call `.cuda()` in the constructor
        model = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(arch, use_transformer_engine),
            vocab_size=padded_vocab_size(arch.vocab_size, tp),
            max_sequence_length=arch.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(arch.rope_theta),
            rope_scaling=arch.rope_scaling_factor is not None,
            rope_scaling_factor=arch.rope_scaling_factor or 8.0,
            vp_stage=vp_stage,
        )
    if not torch.cuda.is_available():
        model = model.to(torch.device("cpu"))
    return model

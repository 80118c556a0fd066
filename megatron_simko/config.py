"""The one configuration tree: dataclasses, loaded from YAML with ``key.sub=value`` command-line overrides.

    cfg = load_config("examples/configs/quickstart.yaml", ["loss.alpha=0.02", "parallel.tensor_parallel=2"])

Every section validates itself in ``__post_init__`` (so a bad value fails at load time with the key named);
``Config.validate()`` adds cross-section checks. Unknown keys are errors, never silently ignored.
The resolved tree is saved next to the checkpoints (``save_config``) and printed at start-up.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import yaml

from megatron_simko.data.prompts import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM
from megatron_simko.losses import SimKOConfig
from megatron_simko.rollout.engines import BACKENDS as ROLLOUT_BACKENDS


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent; the message names the key."""


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclass
class ModelConfig:
    hf_dir: str = ""  # Hugging Face model directory (config.json, safetensors, tokenizer files)
    megatron_dir: Optional[str] = None  # a tools/convert_checkpoint.py output to start from instead of hf_dir weights
    tokenizer: Optional[str] = None  # tokenizer dir or SentencePiece .model; default: hf_dir
    dtype: str = "fp32"  # fp32 | bf16 (bf16 mixed precision needs a GPU)

    def __post_init__(self):
        _require(self.dtype in ("fp32", "bf16"), "model.dtype", f"must be fp32 or bf16, got {self.dtype!r}")


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_parallel: Optional[int] = None
    sequence_parallel: bool = False  # needs Transformer Engine or apex norms (GPU)
    use_distributed_optimizer: bool = False

    def __post_init__(self):
        _require(self.tensor_parallel >= 1, "parallel.tensor_parallel", "must be >= 1")
        _require(self.pipeline_parallel >= 1, "parallel.pipeline_parallel", "must be >= 1")
        _require(
            self.virtual_pipeline_parallel is None or self.virtual_pipeline_parallel >= 1,
            "parallel.virtual_pipeline_parallel", "must be >= 1 or null",
        )
        _require(
            not self.sequence_parallel or self.tensor_parallel > 1,
            "parallel.sequence_parallel", "only meaningful with tensor_parallel > 1",
        )


@dataclass
class OptimizerConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_schedule: str = "constant"  # constant | cosine | linear (decaying to min_lr over the whole run)
    warmup_steps: int = 0  # optimizer updates (an RL step makes prompts_per_step / mini_batch_size × ppo_epochs)
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient L2 norm; 0 disables clipping

    def __post_init__(self):
        _require(self.lr > 0, "optimizer.lr", f"must be > 0, got {self.lr}")
        _require(0 <= self.min_lr <= self.lr, "optimizer.min_lr", "must be in [0, lr]")
        _require(self.lr_schedule in ("constant", "cosine", "linear"), "optimizer.lr_schedule",
                 f"must be constant, cosine or linear, got {self.lr_schedule!r}")
        _require(self.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
        _require(self.grad_clip >= 0, "optimizer.grad_clip", "must be >= 0 (0 disables clipping)")


@dataclass
class RolloutConfig:
    backend: str = "vllm"  # vllm | transformers (in-process Hugging Face model, TP 1; runs wherever torch runs)
    n_samples: int = 8  # responses per prompt (the GRPO group; >= 2)
    temperature: float = 1.0
    top_p: float = 1.0  # must stay 1.0 for training (see __post_init__); evaluation tools take their own
    max_prompt_length: int = 1024
    max_response_length: int = 3072
    # Extra ids that end a response, on top of the tokenizer's EOS, the model's generation_config / config EOS
    # ids and the chat template's end-of-turn token (e.g. <|im_end|>), which are always stop tokens.
    stop_token_ids: List[int] = field(default_factory=list)
    tensor_parallel: Optional[int] = None  # vLLM TP; default: the trainer's TP (transformers backend: 1)
    gpu_memory_utilization: float = 0.5
    kv_cache_gib: int = 1  # CPU only (VLLM_CPU_KVCACHE_SPACE)
    # transformers backend (smoke scale): samples decoded together, and their KV cache at full length per rank
    # (None: max_batch_rows only); a budget that cannot hold one group of n_samples rows is refused at start-up.
    max_batch_rows: int = 256
    kv_budget_gib: Optional[float] = None
    sync_bucket_mb: int = 256
    verify_sync_every: int = 1  # checksum-verify the weight sync every N steps (0: never)
    tis_cap: Optional[float] = None  # truncated importance sampling cap; None = off
    # DAPO dynamic sampling (rollout/dynamic_sampling.py): drop groups whose rewards are all equal, generate for
    # the loader's next prompts until the step holds data.prompts_per_step mixed groups, at most this many rounds.
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 10

    def __post_init__(self):
        _require(self.backend in ROLLOUT_BACKENDS, "rollout.backend",
                 f"must be one of {', '.join(ROLLOUT_BACKENDS)}, got {self.backend!r}")
        _require(self.backend != "transformers" or self.tensor_parallel in (None, 1), "rollout.tensor_parallel",
                 "the transformers backend holds a full model copy on every rank: leave it unset (or 1)")
        _require(all(t >= 0 for t in self.stop_token_ids), "rollout.stop_token_ids", "ids must be >= 0")
        _require(self.n_samples >= 2, "rollout.n_samples",
                 f"must be >= 2, got {self.n_samples}: GRPO advantages compare a prompt's samples with each other, "
                 f"so with one sample every advantage is 0 and nothing is learned")
        _require(self.temperature > 0, "rollout.temperature", "must be > 0")
        _require(0 < self.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        # The trainer's log-probs (ratio, loss, trainer-vLLM mismatch) are over the whole vocabulary; vLLM would
        # sample from the renormalised nucleus, so every ratio would be biased. Evaluation (eval/) may use top_p.
        _require(self.top_p == 1, "rollout.top_p",
                 f"must be 1.0 for training rollouts, got {self.top_p}: the trainer's log-probs are over the full "
                 f"vocabulary, so nucleus-sampled rollouts would bias the importance ratios; use top_p only for "
                 f"evaluation (tools/eval_passk.py)")
        _require(self.max_prompt_length >= 1 and self.max_response_length >= 1, "rollout.max_*_length", "must be >= 1")
        _require(0 < self.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", "must be in (0, 1]")
        _require(self.max_batch_rows >= self.n_samples, "rollout.max_batch_rows",
                 f"must be >= n_samples={self.n_samples} (rows are decoded in whole prompt groups), "
                 f"got {self.max_batch_rows}")
        _require(self.kv_budget_gib is None or self.kv_budget_gib > 0, "rollout.kv_budget_gib", "must be > 0 or null")
        _require(self.tis_cap is None or self.tis_cap > 0, "rollout.tis_cap", "must be > 0 or null")
        _require(self.dynamic_sampling_max_rounds >= 1, "rollout.dynamic_sampling_max_rounds",
                 f"must be >= 1 (generation rounds per step), got {self.dynamic_sampling_max_rounds}")


@dataclass
class DataConfig:
    train: str = ""  # jsonl / parquet path, or "reasoning_gym/<task>"
    validation: Optional[str] = None  # same forms; None = no validation
    train_size: int = 10000  # procedural datasets only
    reasoning_gym_config: Dict[str, Any] = field(default_factory=dict)  # options of reasoning_gym/ datasets
    validation_size: int = 64
    prompts_per_step: int = 1024
    instruction: str = DEFAULT_INSTRUCTION  # appended to each problem (the paper's Qwen2.5-Math setup)
    system_prompt: str = DEFAULT_SYSTEM
    skip_malformed: bool = False
    seed: int = 1
    reward_timeout_s: float = 5.0  # hard per-response limit on reward computation

    def __post_init__(self):
        _require(self.prompts_per_step >= 1, "data.prompts_per_step", "must be >= 1")
        _require(self.reward_timeout_s > 0, "data.reward_timeout_s",
                 f"must be > 0 seconds, got {self.reward_timeout_s}: every response would time out and score 0")


@dataclass
class TrainConfig:
    steps: int = 100
    mini_batch_size: int = 256  # prompts per optimizer step (each with n_samples responses)
    ppo_epochs: int = 1
    micro_batch_tokens: int = 8192  # token budget per micro-batch (sequences packed by length)
    seed: int = 1234
    validate_every: int = 0  # steps; 0 = never (> 0 needs data.validation)
    log_dir: str = "runs/simko"
    # Optimizer updates with a non-finite loss or gradient norm are skipped (on every rank); this many in a row
    # stop the run with an error naming the step.
    max_bad_steps: int = 3

    def __post_init__(self):
        _require(self.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1")
        _require(self.steps >= 1, "train.steps", "must be >= 1")
        _require(self.mini_batch_size >= 1, "train.mini_batch_size", "must be >= 1")
        _require(self.ppo_epochs >= 1, "train.ppo_epochs", "must be >= 1")
        _require(self.micro_batch_tokens >= 1, "train.micro_batch_tokens", "must be >= 1")
        _require(self.validate_every >= 0, "train.validate_every", "must be >= 0 (0: never)")


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # default: <train.log_dir>/checkpoints
    save_every: int = 0  # steps; 0 = only at the end
    keep_last: int = 2
    resume: str = "auto"  # auto (latest if present) | none | <path to a checkpoint directory>

    def __post_init__(self):
        _require(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    loss: SimKOConfig = field(default_factory=SimKOConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self) -> "Config":
        """Cross-section checks that need no model files and no process groups."""
        _require(bool(self.model.hf_dir), "model.hf_dir",
                 "set the Hugging Face model directory (config, tokenizer; the weights unless model.megatron_dir)")
        _require(bool(self.data.train), "data.train", "set a dataset path or reasoning_gym/<task>")
        _require(
            self.data.prompts_per_step % self.train.mini_batch_size == 0,
            "train.mini_batch_size",
            f"must divide data.prompts_per_step ({self.data.prompts_per_step}), got {self.train.mini_batch_size}",
        )
        _require(not self.data.reasoning_gym_config or any(
            (spec or "").startswith("reasoning_gym/") for spec in (self.data.train, self.data.validation)),
            "data.reasoning_gym_config", "is set, but neither data.train nor data.validation is reasoning_gym/<task>")
        _require(not self.train.validate_every or bool(self.data.validation), "train.validate_every",
                 f"is {self.train.validate_every} but data.validation is not set: set a validation dataset, or "
                 f"train.validate_every=0")
        longest = self.rollout.max_prompt_length + self.rollout.max_response_length
        _require(
            self.train.micro_batch_tokens >= longest,
            "train.micro_batch_tokens",
            f"must fit one full sequence (max_prompt_length + max_response_length = {longest})",
        )
        return self


# --------------------------------------------------------------------------------------------- loading


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the dataclass field type ``tp`` (Optional, bool, int, float, str, list)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(value, args[0], key)
    if origin in (list, List, Sequence):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        try:
            out = tp(value) if not isinstance(value, str) else tp(float(value)) if tp is float else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls, data: Dict[str, Any], prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key(s) {', '.join(where + k for k in unknown)}; valid: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # e.g. SimKOConfig's own validation
        raise ConfigError(f"{prefix or 'config'}: {exc}") from None


def _apply_override(tree: Dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key.sub=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def config_from_dict(data: Dict[str, Any], overrides: Sequence[str] = ()) -> Config:
    tree = json.loads(json.dumps(data or {}))  # deep copy of plain data
    for ov in overrides:
        _apply_override(tree, ov)
    return _build(Config, tree, "")


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> Config:
    """Config from a YAML file (or defaults when ``path`` is None) plus ``key.sub=value`` overrides."""
    data: Dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {path!r} is not valid YAML: {exc}") from None
    return config_from_dict(data, overrides)


def config_to_dict(cfg: Config) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML atomically (temp file + rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config.", suffix=".yaml", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)  # nothing half-written left behind
        raise

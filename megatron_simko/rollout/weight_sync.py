"""Megatron -> rollout engine weight sync (vLLM or transformers), streamed in buckets, with checksum
verification of what the engine holds. The engine provides ``model_dtype``, ``update_weights`` (Hugging
Face-named full tensors), ``weight_layout`` and ``weight_checksums``; vLLM's side of the latter two is
``engine_hf_pieces`` below, the transformers engine reports its parameters whole.

    sync = MegatronToEngineSync(model_chunks, arch, engine, WeightSyncConfig(bucket_mb=256, verify_every=1))
    report = sync.sync()            # collective over the world; raises WeightSyncError on a checksum mismatch

Data path (every rank runs one vLLM worker, see docs/rollout.md):
  1. plan (once): every pipeline stage lists its parameters (global names from ``hf_mapping``); the lists are
     exchanged over the PP group so all ranks agree on one global order, cut into buckets of ``bucket_mb``
     (full-tensor bytes, each bucket owned by one stage);
  2. per bucket, on the owning stage: the TP shards are all-gathered over the TP group in one flat buffer and
     merged into Hugging Face tensors by ``hf_mapping.megatron_to_hf`` (the one source of names and layouts);
  3. PP > 1: the owning stage broadcasts the bucket's HF tensors over the PP group (one flat buffer), so every
     rank — each hosts an engine shard — holds the bucket's full tensors;
  4. the tensors are yielded, bucket by bucket, into ONE ``reload_weights`` call (vLLM cuts its own TP shard);
     then the prefix cache is reset. Peak extra memory: about one bucket (x TP during the gather).

Verification (every ``verify_every`` syncs): the engine reports which slices of which HF tensors it holds
(``engine_hf_pieces``; vLLM's fused qkv_proj / gate_up_proj are split back into q/k/v and gate/up), the
trainer side checksums the same slices of what it streamed, the engine checksums the weights it actually
computes with (on CPU vLLM repacks linear weights for oneDNN and empties ``.weight``; they are read back
exactly by multiplying the layer with an identity matrix). Any difference names the tensor.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_simko.models import hf_mapping as hm
from megatron_simko.models.gpt import ModelArch

Checksum = Tuple[float, float, float, float]  # (Σx, Σx², Σ w_i x_i, Σ|x|) in float64
Piece = Tuple[int, int, int]  # (dim, start, stop) of a full HF tensor
_CHECKSUM_CHUNK = 1 << 22  # elements per float64 chunk (bounded temporary memory)


class WeightSyncError(RuntimeError):
    """The engine's weights differ from the trainer's after a sync (names listed in the message)."""

    def __init__(self, mismatches: Sequence[str]):
        self.mismatches = list(mismatches)
        shown = "\n  ".join(self.mismatches[:20])
        more = f"\n  ... and {len(self.mismatches) - 20} more" if len(self.mismatches) > 20 else ""
        super().__init__(f"weight sync verification failed for {len(self.mismatches)} tensor(s):\n  {shown}{more}")


# --------------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def tensor_checksum(t: torch.Tensor) -> Checksum:
    """Sum, sum of squares, position-weighted sum (catches permutations) and Σ|x|, in float64."""
    flat = t.detach().reshape(-1)
    s1 = s2 = sw = sa = 0.0
    for a in range(0, flat.numel(), _CHECKSUM_CHUNK):
        x = flat[a:a + _CHECKSUM_CHUNK].to(torch.float64)
        w = (torch.arange(a, a + x.numel(), device=x.device, dtype=torch.int64) % 127 + 1).to(torch.float64)
        s1 += float(x.sum())
        s2 += float((x * x).sum())
        sw += float((x * w).sum())
        sa += float(x.abs().sum())
    return (s1, s2, sw, sa)


def checksums_match(a: Checksum, b: Checksum, rtol: float) -> bool:
    """Equal up to ``rtol`` relative to each statistic's natural scale (Σ|x|, Σx², 127·Σ|x|)."""
    scales = (max(a[3], b[3]), max(a[1], b[1]), 127.0 * max(a[3], b[3]), max(a[3], b[3]))
    return all(abs(x - y) <= rtol * s + 1e-300 for x, y, s in zip(a, b, scales))


def slice_piece(t: torch.Tensor, piece: Piece) -> torch.Tensor:
    dim, start, stop = piece
    return t.narrow(dim, start, stop - start)


# --------------------------------------------------------------------------------------------------
# Engine side: the vLLM model's weights as pieces of HF tensors (runs inside the vLLM worker)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def _linear_weight(module) -> torch.Tensor:
    """The [out, in] weight a vLLM linear layer computes with (read back through the kernel if repacked)."""
    w = module.weight
    if w.numel() > 0:
        return w.detach()
    # vLLM's CPU backend packs the weight for oneDNN / sgl kernels and leaves an empty .weight: read it back
    # exactly through the layer's own GEMM on the identity (one non-zero product per output).
    in_features = getattr(module, "input_size_per_partition", None) or module.input_size
    dtype = getattr(module, "params_dtype", None) or torch.get_default_dtype()
    eye = torch.eye(in_features, dtype=dtype, device=w.device)
    return module.quant_method.apply(module, eye, None).t().contiguous()  # [in, out] -> [out, in]


@torch.no_grad()
def _lm_head_weight(module) -> torch.Tensor:
    """[V_local, h] weight of a vLLM ParallelLMHead as its logits GEMM sees it (CPU: through the packed copy)."""
    from vllm.platforms import current_platform

    w = module.weight
    if not current_platform.is_cpu():
        return w.detach()  # the GPU GEMM reads .weight itself
    eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
    return module.quant_method.apply(module, eye, None).t().contiguous()  # [h, V_local] -> [V_local, h]


def _linear_pieces(module, hf_prefix: str, packed: Sequence[str]) -> List[Tuple[str, Piece, torch.Tensor]]:
    """(hf_name, piece, local tensor) for a vLLM LinearBase (column/row/merged/qkv/replicated)."""
    from vllm.model_executor.layers.linear import (
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )

    tp_rank, tp_size = getattr(module, "tp_rank", 0), getattr(module, "tp_size", 1)
    weight = _linear_weight(module)
    bias = getattr(module, "bias", None)
    out: List[Tuple[str, Piece, torch.Tensor]] = []
    parent, _, leaf = hf_prefix.rpartition(".")

    def emit(hf_leaf: str, row_start_local: int, rows: int, hf_row_start: int):
        name = f"{parent}.{hf_leaf}" if parent else hf_leaf
        out.append((f"{name}.weight", (0, hf_row_start, hf_row_start + rows),
                    weight.narrow(0, row_start_local, rows)))
        if bias is not None and bias.numel() > 0:
            out.append((f"{name}.bias", (0, hf_row_start, hf_row_start + rows),
                        bias.detach().narrow(0, row_start_local, rows)))

    if isinstance(module, QKVParallelLinear):
        q_rows = module.num_heads * module.head_size
        kv_rows = module.num_kv_heads * module.head_size
        v_rows = module.num_kv_heads * getattr(module, "v_head_size", module.head_size)
        kv_rank = tp_rank // getattr(module, "num_kv_head_replicas", 1)
        names = list(packed) if packed else ["q_proj", "k_proj", "v_proj"]
        emit(names[0], 0, q_rows, tp_rank * q_rows)
        emit(names[1], q_rows, kv_rows, kv_rank * kv_rows)
        emit(names[2], q_rows + kv_rows, v_rows, kv_rank * v_rows)
    elif isinstance(module, MergedColumnParallelLinear):
        pos = 0
        for hf_leaf, full in zip(packed, module.output_sizes):
            rows = full // tp_size
            emit(hf_leaf, pos, rows, tp_rank * rows)
            pos += rows
    elif isinstance(module, RowParallelLinear):
        cols = weight.shape[1]
        out.append((f"{hf_prefix}.weight", (1, tp_rank * cols, (tp_rank + 1) * cols), weight))
        if bias is not None and bias.numel() > 0:
            out.append((f"{hf_prefix}.bias", (0, 0, bias.shape[0]), bias.detach()))
    else:  # ColumnParallelLinear (rows split) or ReplicatedLinear (tp_size 1)
        emit(leaf, 0, weight.shape[0], tp_rank * weight.shape[0])
    return out


@torch.no_grad()
def engine_hf_pieces(model: torch.nn.Module, with_checksums: bool = True) -> Dict[str, list]:
    """{hf_name: [(dim, start, stop[, checksum]), ...]} for every weight of a vLLM model on this worker.

    Names follow vLLM's module tree, which for the supported families (Qwen2, Llama) is the HF naming once
    the fused modules in ``model.packed_modules_mapping`` are split back.
    """
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    packed_map = getattr(model, "packed_modules_mapping", {}) or {}
    items: List[Tuple[str, Piece, torch.Tensor]] = []
    tied_to: Dict[int, str] = {}  # id(embedding weight) -> its HF name (a tied lm_head shares the Parameter)
    for mod_name, module in model.named_modules():
        if isinstance(module, LinearBase):
            leaf = mod_name.rpartition(".")[2]
            items += _linear_pieces(module, mod_name, packed_map.get(leaf, ()))
        elif isinstance(module, VocabParallelEmbedding):
            idx = module.shard_indices
            rows = idx.num_org_elements  # local rows beyond these are vLLM's own padding
            piece = (0, idx.org_vocab_start_index, idx.org_vocab_end_index)
            if isinstance(module, ParallelLMHead):
                # The output projection: on CPU its GEMM runs on a packed copy made at load time, so read
                # what it computes with. A tied head is reported under the embedding's name (must match it).
                weight = _lm_head_weight(module)
                name = tied_to.get(id(module.weight), f"{mod_name}.weight")
            else:
                weight = module.weight.detach()
                name = f"{mod_name}.weight"
                tied_to[id(module.weight)] = name
            items.append((name, piece, weight.narrow(0, 0, rows)))
        else:
            for p_name, p in module.named_parameters(recurse=False):
                items.append((f"{mod_name}.{p_name}", (0, 0, p.shape[0]), p.detach()))
    out: Dict[str, list] = {}
    for name, piece, tensor in items:
        entry = piece + (tensor_checksum(tensor),) if with_checksums else piece
        out.setdefault(name, []).append(entry)
    return out


def compare_checksums(expected: Dict[str, List[Tuple[Piece, Checksum]]],
                      engine: Dict[str, list], rtol: float) -> List[str]:
    """Human-readable mismatches between trainer-side and engine-side checksums (empty: all equal)."""
    problems = []
    for name in sorted(set(engine) - set(expected)):
        problems.append(f"{name}: held by the engine but not sent by the trainer")
    for name in sorted(set(expected) - set(engine)):
        problems.append(f"{name}: sent by the trainer but unknown to the engine")
    for name in sorted(set(expected) & set(engine)):
        want_by_piece = {tuple(piece): want for piece, want in expected[name]}
        covered = set()
        # An HF tensor may appear more than once on the engine (a tied lm_head reads the embedding): check all.
        for entry in engine[name]:
            piece, have = tuple(entry[:3]), entry[3]
            want = want_by_piece.get(piece)
            if want is None:
                problems.append(f"{name}{list(piece)}: the engine holds a slice the trainer did not checksum")
                continue
            covered.add(piece)
            if not checksums_match(want, have, rtol):
                problems.append(f"{name}{list(piece)}: checksum mismatch (sum {want[0]:.9g} vs {have[0]:.9g}, "
                                f"sum of squares {want[1]:.9g} vs {have[1]:.9g})")
        for piece in set(want_by_piece) - covered:
            problems.append(f"{name}{list(piece)}: slice not found on the engine")
    return problems


# --------------------------------------------------------------------------------------------------
# Trainer side: Megatron shards -> full HF tensors, bucketed
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightSyncConfig:
    bucket_mb: float = 256.0  # full-tensor megabytes per transfer bucket
    verify_every: int = 1  # checksum-verify every N-th sync (0: never)
    checksum_rtol: float = 1e-9  # float64 statistics of identical tensors agree to round-off only
    raise_on_mismatch: bool = True

    def __post_init__(self):
        if self.bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {self.bucket_mb}")
        if self.verify_every < 0:
            raise ValueError(f"verify_every must be >= 0, got {self.verify_every}")


@dataclass(frozen=True)
class _Entry:
    name: str  # global Megatron name
    stage: int  # owning PP stage
    local_shape: Tuple[int, ...]
    tp_split: bool  # False: replicated across TP (norms)

    def full_numel(self, tp: int) -> int:
        n = 1
        for s in self.local_shape:
            n *= s
        return n * (tp if self.tp_split else 1)


@dataclass
class SyncReport:
    tensors: int = 0
    bytes: int = 0
    buckets: int = 0
    seconds: float = 0.0  # whole sync, verification included
    engine_seconds: float = 0.0  # inside reload_weights (includes gathers: the iterator is lazy)
    verified: bool = False
    verify_seconds: float = 0.0
    mismatches: List[str] = field(default_factory=list)

    def metrics(self) -> Dict[str, float]:
        return {"sync/seconds": self.seconds, "sync/megabytes": self.bytes / 2**20, "sync/buckets": self.buckets,
                "sync/verified": float(self.verified), "sync/mismatched_tensors": float(len(self.mismatches))}


def _groups():
    """(tp_group, tp, pp_group, pp, pp_rank, pp_global_ranks) from megatron-core, or trivial ones."""
    from megatron.core import parallel_state as mpu

    if not mpu.model_parallel_is_initialized():
        return None, 1, None, 1, 0, [0]
    pp_group = mpu.get_pipeline_model_parallel_group()
    pp = mpu.get_pipeline_model_parallel_world_size()
    ranks = dist.get_process_group_ranks(pp_group) if pp > 1 else [dist.get_rank() if dist.is_initialized() else 0]
    return (mpu.get_tensor_model_parallel_group(), mpu.get_tensor_model_parallel_world_size(), pp_group, pp,
            mpu.get_pipeline_model_parallel_rank(), ranks)


class MegatronToEngineSync:
    """Streams a live Megatron model (this rank's chunks) into a rollout engine. Collective on every rank."""

    def __init__(self, model_chunks: Sequence[torch.nn.Module], arch: ModelArch, engine,
                 config: WeightSyncConfig = WeightSyncConfig()):
        self.chunks = list(model_chunks)
        self.arch = arch
        self.engine = engine
        self.config = config
        self.tp_group, self.tp, self.pp_group, self.pp, self.pp_rank, self.pp_ranks = _groups()
        self._params = self._local_params()
        self._plan = self._global_plan()
        self._buckets = self._make_buckets()
        self._engine_layout: Optional[Dict[str, List[Piece]]] = None
        self.num_syncs = 0

    # ---------------------------------------------------------------------------------------------- plan
    def _local_params(self) -> Dict[str, torch.nn.Parameter]:
        params = {}
        for chunk in self.chunks:
            for name, _, p in hm.global_named_parameters(chunk):
                if name == "output_layer.weight" and self.arch.tie_word_embeddings:
                    continue  # the last stage's copy of the tied embedding: the embedding carries it
                params[name] = p
        return params

    def _global_plan(self) -> List[_Entry]:
        mine = [(name, tuple(p.shape), hm.mapping_for(name, self.arch).kind != hm.REPLICATED)
                for name, p in self._params.items()]
        per_stage = [mine]
        if self.pp > 1:
            per_stage = [None] * self.pp
            dist.all_gather_object(per_stage, mine, group=self.pp_group)
        return [_Entry(name, stage, shape, split) for stage, lst in enumerate(per_stage) for name, shape, split in lst]

    def _make_buckets(self) -> List[List[_Entry]]:
        limit = self.config.bucket_mb * 2**20
        itemsize = next(iter(self._params.values())).element_size() if self._params else 4
        buckets: List[List[_Entry]] = []
        size = 0.0
        for e in self._plan:
            nbytes = e.full_numel(self.tp) * itemsize
            if buckets and buckets[-1][-1].stage == e.stage and size + nbytes <= limit:
                buckets[-1].append(e)
                size += nbytes
            else:
                buckets.append([e])
                size = nbytes
        return buckets

    # ------------------------------------------------------------------------------------------- stream
    def _gather_bucket(self, bucket: List[_Entry], dtype: torch.dtype) -> List[Tuple[str, torch.Tensor]]:
        """On the owning stage: TP all-gather of the bucket (one flat buffer), merged to HF tensors."""
        shards: Dict[str, List[torch.Tensor]] = {}
        split = [e for e in bucket if e.tp_split and self.tp > 1]
        for e in bucket:
            if e not in split:
                shards[e.name] = [self._params[e.name].detach().to(dtype)]
        if split:
            local = torch.cat([self._params[e.name].detach().to(dtype).reshape(-1) for e in split])
            gathered = torch.empty(self.tp * local.numel(), dtype=dtype, device=local.device)
            dist.all_gather_into_tensor(gathered, local, group=self.tp_group)
            per_rank = gathered.view(self.tp, local.numel())
            pos = 0
            for e in split:
                n = self._params[e.name].numel()
                shards[e.name] = [per_rank[r, pos:pos + n].view(e.local_shape) for r in range(self.tp)]
                pos += n
        pairs = []
        for e in bucket:
            pairs += hm.megatron_to_hf(e.name, shards[e.name], self.arch)
        return pairs

    def _bucket_hf_shapes(self, bucket: List[_Entry]) -> List[Tuple[str, Tuple[int, ...]]]:
        out = []
        for e in bucket:
            for hf in hm.mapping_for(e.name, self.arch).hf_names:
                out.append((hf, tuple(hm.hf_shape(hf, self.arch))))
        return out

    def _broadcast_bucket(self, bucket: List[_Entry], pairs, dtype, device) -> List[Tuple[str, torch.Tensor]]:
        """PP > 1: the owning stage sends the bucket's HF tensors to every stage (one flat buffer)."""
        shapes = self._bucket_hf_shapes(bucket)
        numel = sum(int(torch.Size(s).numel()) for _, s in shapes)
        owner = bucket[0].stage
        if self.pp_rank == owner:
            if [n for n, _ in pairs] != [n for n, _ in shapes]:
                raise RuntimeError(f"bucket HF names differ from the plan: {[n for n, _ in pairs]} vs {shapes}")
            flat = torch.cat([t.reshape(-1) for _, t in pairs])
        else:
            flat = torch.empty(numel, dtype=dtype, device=device)
        dist.broadcast(flat, src=self.pp_ranks[owner], group=self.pp_group)
        out, pos = [], 0
        for name, shape in shapes:
            n = int(torch.Size(shape).numel())
            out.append((name, flat[pos:pos + n].view(shape)))
            pos += n
        return out

    def iter_hf_tensors(self, dtype: Optional[torch.dtype] = None) -> Iterator[Tuple[str, torch.Tensor]]:
        """Full HF tensors of the whole model, bucket by bucket, on every rank (a collective generator:
        every rank must consume it to the end, in step)."""
        any_param = next(iter(self._params.values()))
        dtype = dtype or any_param.dtype
        device = any_param.device
        for bucket in self._buckets:
            pairs = self._gather_bucket(bucket, dtype) if bucket[0].stage == self.pp_rank else None
            if self.pp > 1:
                pairs = self._broadcast_bucket(bucket, pairs, dtype, device)
            yield from pairs

    # --------------------------------------------------------------------------------------------- sync
    def should_verify(self) -> bool:
        k = self.config.verify_every
        return k > 0 and self.num_syncs % k == 0

    @torch.no_grad()
    def sync(self, verify: Optional[bool] = None,
             tensor_hook: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None) -> SyncReport:
        """Push the current weights into the engine; verify checksums if due (or if ``verify``).

        ``tensor_hook(name, tensor) -> tensor`` is applied to what the engine receives AFTER the trainer-side
        checksum was taken: a fault-injection point for tests (simulates corruption in transit).
        """
        verify = self.should_verify() if verify is None else verify
        report = SyncReport(verified=verify, buckets=len(self._buckets))
        t0 = time.perf_counter()
        dtype = self.engine.model_dtype
        if verify and self._engine_layout is None:
            self._engine_layout = self.engine.weight_layout()
        expected: Dict[str, List[Tuple[Piece, Checksum]]] = {}

        def stream():
            for name, tensor in self.iter_hf_tensors(dtype):
                if verify:
                    for piece in self._engine_layout.get(name, [(0, 0, tensor.shape[0])]):
                        expected.setdefault(name, []).append((piece, tensor_checksum(slice_piece(tensor, piece))))
                report.tensors += 1
                report.bytes += tensor.numel() * tensor.element_size()
                yield name, (tensor_hook(name, tensor) if tensor_hook is not None else tensor)

        t1 = time.perf_counter()
        self.engine.update_weights(stream())
        report.engine_seconds = time.perf_counter() - t1
        self.num_syncs += 1
        if verify:
            t2 = time.perf_counter()
            report.mismatches = compare_checksums(expected, self.engine.weight_checksums(), self.config.checksum_rtol)
            report.verify_seconds = time.perf_counter() - t2
            self._agree_on_mismatches(report)
        report.seconds = time.perf_counter() - t0
        if report.mismatches and self.config.raise_on_mismatch:
            raise WeightSyncError(report.mismatches)
        return report

    def _agree_on_mismatches(self, report: SyncReport) -> None:
        """Every rank learns every rank's mismatches (so all raise together, none hangs in a collective)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        everyone: List[Optional[List[str]]] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, report.mismatches)
        merged = []
        for rank, lst in enumerate(everyone):
            merged += [f"rank {rank}: {m}" for m in lst or []]
        report.mismatches = merged


MegatronToVLLMSync = MegatronToEngineSync  # its former name (vLLM was the only engine)

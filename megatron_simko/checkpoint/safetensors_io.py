"""Streaming safetensors I/O: lazy sliced reads from a sharded directory, bounded-memory sharded writes.

Why not ``safetensors.safe_open``: it memory-maps whole files, so reading a 15 GB checkpoint tensor by tensor
shows up as 15 GB of resident (file-backed) memory, and a truncated file fails with an opaque header error.
The format is simple (8-byte little-endian header length, a JSON header with dtype/shape/data_offsets, then raw
little-endian bytes), so this module reads exactly the bytes a slice needs with ``readinto`` and writes shards
itself. Files it writes load with ``safe_open``, ``transformers`` and vLLM (tested).
"""
from __future__ import annotations

import json
import os
import struct
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, truncated or inconsistent."""


class TensorInfo:
    __slots__ = ("name", "path", "dtype", "shape", "begin", "end")

    def __init__(self, name: str, path: str, dtype: torch.dtype, shape: Tuple[int, ...], begin: int, end: int):
        self.name, self.path, self.dtype, self.shape, self.begin, self.end = name, path, dtype, shape, begin, end


def read_header(path: str) -> Tuple[Dict[str, TensorInfo], Dict[str, str]]:
    """Parse one .safetensors header; checks the file is long enough for every tensor it declares."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise CheckpointError(f"shard {path!r} is missing") from None
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"shard {path!r} is truncated: {size} bytes, not even a header length")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"shard {path!r} is truncated or not safetensors: header of {n} bytes, file {size}")
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    infos, data_end = {}, data_start
    for name, h in header.items():
        if h["dtype"] not in DTYPES:
            raise CheckpointError(f"{path!r}: tensor {name!r} has unsupported dtype {h['dtype']}")
        b, e = h["data_offsets"]
        dtype = DTYPES[h["dtype"]]
        shape = tuple(int(s) for s in h["shape"])
        numel = 1
        for s in shape:
            numel *= s
        if e - b != numel * dtype.itemsize:
            raise CheckpointError(f"{path!r}: tensor {name!r} offsets {b}..{e} do not match shape {shape} {dtype}")
        infos[name] = TensorInfo(name, path, dtype, shape, data_start + b, data_start + e)
        data_end = max(data_end, data_start + e)
    if size < data_end:
        raise CheckpointError(
            f"shard {path!r} is truncated: the header describes {data_end} bytes, the file has {size}")
    return infos, meta


class SafetensorsDir:
    """All tensors of a directory of safetensors shards (via its index, or a single ``model.safetensors``).

    Nothing is read until asked; :meth:`read` and :meth:`read_slice` fetch only the requested bytes.
    """

    def __init__(self, directory: str, index_name: str = INDEX_NAME):
        self.directory = directory
        index_path = os.path.join(directory, index_name)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                weight_map: Dict[str, str] = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [fn for fn in files if not os.path.isfile(os.path.join(directory, fn))]
            if missing:
                raise CheckpointError(f"{index_path} names shard(s) that do not exist: {missing}")
        else:
            files = sorted(fn for fn in os.listdir(directory) if fn.endswith(".safetensors")) \
                if os.path.isdir(directory) else []
            if not files:
                raise CheckpointError(f"no safetensors weights in {directory!r} (no {index_name}, no *.safetensors)")
            weight_map = None
        self.tensors: Dict[str, TensorInfo] = {}
        for fn in files:
            infos, _ = read_header(os.path.join(directory, fn))
            for name, info in infos.items():
                if weight_map is not None and weight_map.get(name) != fn:
                    continue  # the index is authoritative about which file holds a name
                self.tensors[name] = info
        if weight_map is not None:
            absent = [n for n in weight_map if n not in self.tensors]
            if absent:
                raise CheckpointError(f"{index_path} lists tensors absent from their shard: {absent[:5]}"
                                      + (" ..." if len(absent) > 5 else ""))

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> List[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise CheckpointError(f"tensor {name!r} is not in {self.directory!r}")
        return self.tensors[name]

    def _read_bytes(self, path: str, offset: int, nbytes: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(offset)
            got = f.readinto(memoryview(buf.numpy())) if nbytes else 0
        if got != nbytes:
            raise CheckpointError(f"{path!r} is truncated: wanted {nbytes} bytes at {offset}, got {got}")
        return buf

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor (a fresh CPU tensor)."""
        info = self.info(name)
        buf = self._read_bytes(info.path, info.begin, info.end - info.begin)
        return buf.view(info.dtype).reshape(info.shape)

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """``tensor.narrow(dim, start, stop - start)``, reading only the needed bytes when ``dim == 0``."""
        info = self.info(name)
        if not 0 <= start <= stop <= info.shape[dim]:
            raise CheckpointError(f"slice {start}:{stop} of {name!r} dim {dim} outside its shape {info.shape}")
        if dim != 0:
            return self.read(name).narrow(dim, start, stop - start).contiguous()
        row = info.dtype.itemsize
        for s in info.shape[1:]:
            row *= s
        buf = self._read_bytes(info.path, info.begin + start * row, (stop - start) * row)
        return buf.view(info.dtype).reshape((stop - start,) + info.shape[1:])


def _header_bytes(entries: List[Tuple[str, torch.Tensor]], metadata: Dict[str, str]) -> bytes:
    header: Dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, t in entries:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(path: str, entries: List[Tuple[str, torch.Tensor]], metadata: Optional[Dict[str, str]] = None):
    """Write tensors to one .safetensors file without copying them into a byte string first."""
    with open(path, "wb") as f:
        f.write(_header_bytes(entries, metadata or {"format": "pt"}))
        for _, t in entries:
            t = t.detach().contiguous().cpu()
            if t.numel():
                f.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))


class ShardedWriter:
    """Writes ``name -> tensor`` pairs as ``model-0000k-of-0000N.safetensors`` shards of at most ``max_shard_bytes``
    (a single larger tensor gets a shard of its own) plus ``model.safetensors.index.json``.

    Tensors are buffered until a shard is full; :meth:`flush` writes the buffer early (memory pressure).
    """

    def __init__(self, directory: str, max_shard_bytes: int = 2 * 1024 ** 3, prefix: str = "model"):
        self.directory, self.max_shard_bytes, self.prefix = directory, max_shard_bytes, prefix
        os.makedirs(directory, exist_ok=True)
        self._buffer: List[Tuple[str, torch.Tensor]] = []
        self.buffered_bytes = 0
        self._files: List[Tuple[str, List[str]]] = []  # (temporary file name, tensor names)
        self._seen: set = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._seen:
            raise ValueError(f"tensor {name!r} written twice")
        self._seen.add(name)
        n = tensor.numel() * tensor.element_size()
        if self._buffer and self.buffered_bytes + n > self.max_shard_bytes:
            self.flush()
        self._buffer.append((name, tensor))
        self.buffered_bytes += n
        self.total_bytes += n

    def flush(self) -> None:
        if not self._buffer:
            return
        tmp_name = f"{self.prefix}-part{len(self._files) + 1:05d}.safetensors"
        write_safetensors(os.path.join(self.directory, tmp_name), self._buffer)
        self._files.append((tmp_name, [n for n, _ in self._buffer]))
        self._buffer, self.buffered_bytes = [], 0

    def close(self) -> Dict[str, str]:
        """Write the last shard, give shards their final ``-of-N`` names, write the index; returns the weight map."""
        self.flush()
        total = len(self._files)
        weight_map: Dict[str, str] = {}
        for k, (tmp_name, names) in enumerate(self._files, start=1):
            final = f"{self.prefix}-{k:05d}-of-{total:05d}.safetensors"
            os.replace(os.path.join(self.directory, tmp_name), os.path.join(self.directory, final))
            weight_map.update({n: final for n in names})
        with open(os.path.join(self.directory, INDEX_NAME), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=2)
        return weight_map


class WriterPool:
    """One :class:`ShardedWriter` per key (per model-parallel rank) under a shared memory budget:
    when all buffers together exceed ``budget_bytes`` the largest one is flushed as a (smaller) shard."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.writers: Dict[object, ShardedWriter] = {}

    def add(self, key, make_writer, name: str, tensor: torch.Tensor) -> None:
        if key not in self.writers:
            self.writers[key] = make_writer()
        self.writers[key].add(name, tensor)
        while sum(w.buffered_bytes for w in self.writers.values()) > self.budget_bytes:
            max(self.writers.values(), key=lambda w: w.buffered_bytes).flush()

    def close(self) -> Dict[object, Dict[str, str]]:
        return {k: w.close() for k, w in self.writers.items()}


def iter_tensors(directory: str, names: Optional[Iterable[str]] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(name, tensor)`` one at a time from a safetensors directory."""
    d = SafetensorsDir(directory)
    for name in (names if names is not None else d.names()):
        yield name, d.read(name)

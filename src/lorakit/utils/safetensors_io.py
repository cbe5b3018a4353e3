"""Read and write safetensors files tensor by tensor (format: https://github.com/huggingface/safetensors#format).

    u64 little-endian N | N bytes of JSON header {name: {"dtype", "shape", "data_offsets": [a, b]}, ...,
                        |                        "__metadata__": {...}} | data (row-major, offsets relative)

The reader hands out one tensor at a time, each in its own buffer, so memory holds only what the
caller keeps (the streaming loader's "peak = model + one tensor"); tensors named in `mapped` are
copy-on-write views of a memory map instead, read only when touched. The writer writes each
tensor's bytes straight from its memory, so a shard never exists twice. Dtype codes: lorakit.dtypes.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..dtypes import FROM_SAFETENSORS_CODE, SAFETENSORS_CODES

_MAX_HEADER = 100_000_000  # a header longer than this is not a safetensors file (the reference caps it too)


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header dict without __metadata__, byte offset of the data section)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def iter_safetensors(path: Path, mapped: frozenset = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) in file order, one at a time, each read into its own buffer, except the
    tensors named in `mapped`: copy-on-write views of a memory map of the file (module docstring)."""
    header, base = read_safetensors_header(path)
    view = None
    with open(path, "rb", buffering=0) as f:
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            dtype = FROM_SAFETENSORS_CODE.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            start, end = info["data_offsets"]
            size = dtype.itemsize
            if name in mapped and end > start and (base + start) % size == 0 and (end - start) % size == 0:
                if view is None:
                    view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # stays valid after close
                if base + end > len(view):
                    raise ValueError(f"{path}: truncated data for tensor {name!r}")
                yield name, torch.frombuffer(view, dtype=dtype, count=(end - start) // size,
                                             offset=base + start).reshape(info["shape"])
                continue
            buf = torch.empty(end - start, dtype=torch.uint8)
            f.seek(base + start)
            if f.readinto(memoryview(buf.numpy())) != end - start:
                raise ValueError(f"{path}: truncated data for tensor {name!r}")
            yield name, buf.view(dtype).reshape(info["shape"])
            del buf  # the caller's reference is now the only one: the next read may reuse the memory


def safetensors_header(specs: Iterable[tuple[str, torch.dtype, tuple]], path: Path, metadata: dict | None = None) -> bytes:
    """The header bytes of a safetensors file holding `specs` (name, dtype, shape) in that order:
    u64 length + JSON padded with spaces to a multiple of 8, as the reference writer does."""
    header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
    for name, dtype, shape in specs:
        if dtype not in SAFETENSORS_CODES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}, which safetensors cannot store")
        nbytes = dtype.itemsize * math.prod(shape)
        header[name] = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def write_safetensors_stream(path: Path, specs: list[tuple[str, torch.dtype, tuple]],
                             tensors: Iterable[torch.Tensor], metadata: dict | None = None) -> None:
    """One safetensors file whose tensors arrive one at a time (`tensors`, in the order of `specs`),
    so only the tensor being written is in memory. Each must match its spec exactly."""
    with open(path, "wb") as f:
        f.write(safetensors_header(specs, path, metadata))
        count = 0
        for t in tensors:  # not zip(): its reused result tuple would keep the previous tensor alive
            if count == len(specs):
                raise ValueError(f"{path}: more tensors than the {len(specs)} announced")
            name, dtype, shape = specs[count]
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{path}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, its header says {dtype} {tuple(shape)}")
            if t.numel():
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            count += 1
            del t  # before the producer makes the next one
        if count != len(specs):
            raise ValueError(f"{path}: {len(specs)} tensors announced, {count} written")


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """One safetensors file, written tensor by tensor: the header, then each tensor's bytes in order, row-major."""
    specs = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    write_safetensors_stream(path, specs, tensors.values(), metadata)

"""Optional fast paths for 4-bit quantization, behind one explicit registry.

Each op has a plain-PyTorch reference in lorakit.quant.nf4 (``quantize_4bit_reference``,
``dequantize_4bit_reference``) and zero or more fast kernels registered here, in priority order.
A kernel takes the reference's arguments and returns its result bit for bit, or None for inputs
it does not handle (another device, an unsupported size, a missing compiler), in which case the
next kernel and finally the reference run. tests/quant/test_kernels.py checks every registered
kernel against the reference.

    op                kernels (first that accepts wins)
    dequantize_4bit   "c-cpu": nf4_cpu.c, AVX-512 table look-up + OpenMP, built on first use
    quantize_4bit     "c-cpu": nf4_cpu.c, per-block absmax + branch-free nearest code + OpenMP

Choosing: the environment variable LORAKIT_KERNELS (read at each call) or ``set_backend``:
"auto" (default: every registered kernel) or "reference" (never a fast path); a run with
`model.fast_paths: false` sets "reference" for its duration (train/setup.py).

The C kernels are compiled on first use (logged, with the library's path) or ahead of time with
``build()``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

from . import cpu

OPS = ("dequantize_4bit", "quantize_4bit")
BACKENDS = ("auto", "reference")


@dataclass(frozen=True)
class Kernel:
    op: str
    name: str
    fn: Callable[..., Any]  # same arguments as the reference; returns None to decline


_REGISTRY: dict[str, list[Kernel]] = {op: [] for op in OPS}
_backend: dict[str, Optional[str]] = {"name": None}  # None: follow LORAKIT_KERNELS


def register(op: str, name: str, fn: Callable[..., Any]) -> None:
    """Add a fast kernel for `op` (lowest priority so far)."""
    if op not in _REGISTRY:
        raise ValueError(f"kernel op must be one of {OPS}, got {op!r}")
    if any(k.name == name for k in _REGISTRY[op]):
        raise ValueError(f"a kernel named {name!r} is already registered for {op}")
    _REGISTRY[op].append(Kernel(op, name, fn))


def kernels(op: str) -> list[Kernel]:
    """Every registered kernel of `op`, in priority order (whatever the backend)."""
    return list(_REGISTRY[op])


def backend() -> str:
    name = _backend["name"] or os.environ.get("LORAKIT_KERNELS", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"LORAKIT_KERNELS={name!r} is not allowed; choose one of {BACKENDS}")
    return name


def backend_override() -> Optional[str]:
    """The name set with set_backend, or None when the environment variable decides."""
    return _backend["name"]


def build() -> dict:
    """Compile (or find in the cache) every kernel library now instead of at first use; returns
    {kernel library: path, or None when it cannot be built here}."""
    lib = cpu.load()
    return {"c-cpu": str(cpu.library_path()) if lib is not None else None}


def set_backend(name: Optional[str]) -> None:
    """"auto", "reference", or None to follow the LORAKIT_KERNELS environment variable again."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS} (or None), got {name!r}")
    _backend["name"] = name


def dispatch(op: str, *args, **kwargs) -> Any:
    """The first enabled kernel's result for these arguments, or None (then run the reference)."""
    if backend() == "reference":
        return None
    for kernel in _REGISTRY[op]:
        out = kernel.fn(*args, **kwargs)
        if out is not None:
            return out
    return None


register("dequantize_4bit", "c-cpu", cpu.dequantize_4bit)
register("quantize_4bit", "c-cpu", cpu.quantize_4bit)

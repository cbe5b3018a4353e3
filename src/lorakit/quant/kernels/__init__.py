"""Optional fast paths for 4-bit quantization, behind one explicit registry.

Each op has a plain-PyTorch reference in lorakit.quant.nf4 (``quantize_4bit_reference``,
``dequantize_4bit_reference``, ``gemv_4bit_reference``) and zero or more fast kernels registered
here, in priority order. A kernel takes the reference's arguments and returns its result (bit for
bit, except gemv_4bit: a sum in another order), or None for inputs it does not handle (another
device, an unsupported size, a missing compiler or Triton), in which case the next kernel and
finally the reference run. tests/quant/test_kernels.py checks every CPU kernel against the
reference, tests/quant/test_triton_kernels.py every Triton kernel (under Triton's interpreter on a
machine without CUDA).

    op                kernels (first that accepts wins)
    dequantize_4bit   "c-cpu": nf4_cpu.c, AVX-512 table look-up + OpenMP, built on first use
                      "triton": triton_4bit.py, CUDA tensors, double-quant absmax decoded inline
    quantize_4bit     "c-cpu": nf4_cpu.c, per-block absmax + branch-free nearest code + OpenMP
                      "triton": triton_4bit.py, CUDA tensors (loading quantizes on the GPU)
    gemv_4bit         "triton": x [<= 16 rows, K] @ W^T with W decoded in registers (decoding:
                      generation, evaluation, chat); Linear4bit calls it on CUDA, else dequant + matmul

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

from . import cpu, gpu

OPS = ("dequantize_4bit", "quantize_4bit", "gemv_4bit")
BACKENDS = ("auto", "reference")


def _always() -> bool:
    return True


@dataclass(frozen=True)
class Kernel:
    op: str
    name: str
    fn: Callable[..., Any]  # same arguments as the reference; returns None to decline
    devices: tuple[str, ...] = ("cpu",)  # device types whose tensors it takes
    ready: Callable[[], bool] = _always  # can it run here (compiler, library)? checked by the planner


_REGISTRY: dict[str, list[Kernel]] = {op: [] for op in OPS}
_backend: dict[str, Optional[str]] = {"name": None}  # None: follow LORAKIT_KERNELS


def register(op: str, name: str, fn: Callable[..., Any], devices: tuple[str, ...] = ("cpu",),
             ready: Callable[[], bool] = _always) -> None:
    """Add a fast kernel for `op` (lowest priority so far) taking tensors of `devices`."""
    if op not in _REGISTRY:
        raise ValueError(f"kernel op must be one of {OPS}, got {op!r}")
    if any(k.name == name for k in _REGISTRY[op]):
        raise ValueError(f"a kernel named {name!r} is already registered for {op}")
    _REGISTRY[op].append(Kernel(op, name, fn, tuple(devices), ready))


def fast_kernel(op: str, device_type: str) -> Optional[str]:
    """Name of the kernel that will run `op` for tensors of `device_type` here, or None when the
    reference will (backend "reference", nothing registered, or no kernel ready: no C compiler, no
    Triton). Used by the memory planner, which must know what a dequantize allocates."""
    if backend() == "reference":
        return None
    return next((k.name for k in _REGISTRY[op] if device_type in k.devices and k.ready()), None)


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


def _c_ready() -> bool:
    return cpu.load() is not None


register("dequantize_4bit", "c-cpu", cpu.dequantize_4bit, ("cpu",), _c_ready)
register("quantize_4bit", "c-cpu", cpu.quantize_4bit, ("cpu",), _c_ready)
register("dequantize_4bit", "triton", gpu.dequantize_4bit, ("cuda",), lambda: gpu.available())
register("quantize_4bit", "triton", gpu.quantize_4bit, ("cuda",), lambda: gpu.available())
register("gemv_4bit", "triton", gpu.gemv_4bit, ("cuda",), lambda: gpu.available())

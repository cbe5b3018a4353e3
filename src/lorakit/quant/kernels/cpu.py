"""The C kernels of nf4_cpu.c: built with the system C compiler on first use, called via ctypes.

Why C through ctypes (measured on the project's 2-core AVX512 CI machine, torch 2.13):
  - builds in ~1 s with no torch headers (a torch C++ extension takes ~1 min to compile, and
    torch.compile / inductor needs a compiler too, plus ~10-30 s of compilation per process);
  - ctypes drops the GIL and the kernel runs on torch's own OpenMP pool (the library links
    libgomp.so.1, which resolves to the copy torch already loaded);
  - see bench/SPEED.md for the throughput of each option.

The shared library is cached under $LORAKIT_KERNEL_CACHE (default ~/.cache/lorakit/kernels) in a
folder named by a hash of the C source, the flags, the compiler and the CPU's feature flags, so a
home directory shared between different machines never runs code built for another CPU. When no
compiler works, `load()` returns None once, with a warning, and callers use the PyTorch reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

SOURCE = Path(__file__).with_name("nf4_cpu.c")
# Tried in order; the first that compiles wins. -ffp-contract=off keeps a*b+c as two roundings
# (bit-exact with PyTorch's separate mul and add); no -ffast-math for the same reason.
_FLAG_SETS = (
    ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"],
    ["-O3", "-march=native", "-ffp-contract=off"],
    ["-O3", "-ffp-contract=off"],
)
_lock = threading.Lock()
_state: dict = {}  # "lib": CDLL or None once tried, "path": the library file
log = logging.getLogger("lorakit")


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        import platform

        return platform.processor() + platform.machine()


def cache_dir() -> Path:
    root = os.environ.get("LORAKIT_KERNEL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lorakit" / "kernels"


def _build(cc: str) -> tuple[Optional[Path], str]:
    """Compile (or find cached) the library; returns (path or None, error text)."""
    source = SOURCE.read_bytes()
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(source + " ".join([cc, *flags]).encode() + _cpu_flags().encode()).hexdigest()[:16]
        target = cache_dir() / key / "liblorakit_nf4.so"
        if target.is_file():
            return target, ""
        log.info("lorakit: compiling the C 4-bit kernels (once per machine) into %s", target)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [cc, *flags, "-shared", "-fPIC", str(SOURCE), "-o", tmp, "-lm"]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            out = None
            errors.append(f"{' '.join(cmd)}: {e}")
        if out is not None and out.returncode == 0:
            os.replace(tmp, target)  # atomic: concurrent builders each write their own tmp
            return target, ""
        if out is not None:
            errors.append(f"{' '.join(cmd)}: {out.stderr.strip()[-500:]}")
        Path(tmp).unlink(missing_ok=True)
    return None, "\n".join(errors)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.lk_dequantize_4bit.argtypes = [p, i64, i64, p, p, p, p, p, f32, i64, p, p, i32]
    lib.lk_dequantize_4bit.restype = i32
    lib.lk_quantize_4bit.argtypes = [p, p, i64, i64, p, p, p, p, i32]
    lib.lk_quantize_4bit.restype = i32
    return lib


def load() -> Optional[ctypes.CDLL]:
    """The compiled library, building it on the first call; None (with one warning) if impossible."""
    if "lib" in _state:
        return _state["lib"]
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib, why = None, ""
        cc = _compiler()
        if cc is None:
            why = "no C compiler found (tried $CC, cc, gcc, clang)"
        elif not SOURCE.is_file():
            why = f"{SOURCE} is missing from the installed package"
        else:
            path, why = _build(cc)
            if path is not None:
                try:
                    lib = _declare(ctypes.CDLL(str(path)))
                    _state["path"] = path
                except OSError as e:
                    lib, why = None, f"{path}: {e}"
        if lib is None:
            warnings.warn(f"lorakit: the C 4-bit kernels are unavailable ({why}); using the PyTorch reference "
                          f"(~1 G weights/s per core instead of several). To get them: {install_hint()}. "
                          "Or set LORAKIT_KERNELS=reference to silence this.", RuntimeWarning, stacklevel=3)
        _state["lib"] = lib
        return lib


def install_hint(system: Optional[str] = None) -> str:
    """What to install for the C kernels on this OS (a C compiler; OpenMP is optional: without
    libgomp they build single-threaded)."""
    import platform

    system = system or platform.system()
    if system == "Darwin":
        return "install Apple's command line tools (xcode-select --install), then restart Python"
    if system == "Windows":
        return ("nothing to install on native Windows (the kernels are built for Linux and macOS); "
                "run under WSL2 with gcc installed to use them")
    return ("install gcc: sudo apt-get install gcc (Debian/Ubuntu), sudo dnf install gcc (Fedora/RHEL), "
            "apk add gcc musl-dev (Alpine); or set CC to a C compiler's path")


def library_path() -> Optional[Path]:
    """The compiled library's file, once load() has found or built it."""
    return _state.get("path")


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def dequantize_4bit(packed: torch.Tensor, state, dtype: Optional[torch.dtype] = None,
                    out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """C version of nf4.dequantize_4bit_reference (bit-identical); None for inputs it does not take
    (non-CPU tensors, odd sizes, a missing compiler), so the caller falls back to the reference.
    ``out`` (checked by the caller): written in place for bf16 / fp32, copied into for fp16."""
    dtype = dtype or state.dtype
    n = state.numel
    tensors = [packed, state.absmax, state.code] + ([state.absmax2, state.code2, state.offset] if state.nested else [])
    if n % 2 or state.blocksize % 32 or any(t.device.type != "cpu" for t in tensors):
        return None
    if packed.numel() * 2 < n or dtype not in (torch.bfloat16, torch.float32, torch.float16):
        return None
    lib = load()
    if lib is None:
        return None
    packed = packed.reshape(-1).contiguous()
    packed = packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)
    code = state.code.float().contiguous()
    if state.nested:
        absmax, codes = None, state.absmax.contiguous()
        absmax2, code2 = state.absmax2.float().contiguous(), state.code2.float().contiguous()
        offset, blocksize2 = float(state.offset), state.blocksize2
    else:
        absmax, codes, absmax2, code2, offset, blocksize2 = state.absmax.float().contiguous(), None, None, None, 0.0, 1
    direct = out is not None and dtype in (torch.bfloat16, torch.float32)
    buf = out.reshape(-1) if direct else torch.empty(n, dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    bf16 = buf.dtype == torch.bfloat16
    rc = lib.lk_dequantize_4bit(
        _ptr(packed), n, state.blocksize, _ptr(code), _ptr(absmax), _ptr(codes), _ptr(absmax2), _ptr(code2),
        offset, blocksize2, _ptr(buf) if bf16 else None, None if bf16 else _ptr(buf), torch.get_num_threads())
    if rc != 0:
        return None
    result = buf.view(state.shape)
    if out is not None and not direct:
        return out.view(state.shape).copy_(result)  # fp16: rounded from the fp32 values
    return result.to(dtype)  # fp16: rounded from the fp32 values, as the reference does


def quantize_4bit(tensor: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool):
    """C version of nf4.quantize_4bit_reference (byte-identical); None when it does not apply.
    Arguments are checked by the caller."""
    from ..nf4 import code_midpoints, finish_quantize_4bit, get_code

    if tensor.device.type != "cpu":
        return None
    lib = load()
    if lib is None:
        return None
    flat = tensor.detach().reshape(-1)
    flat = flat.contiguous() if flat.dtype == torch.bfloat16 else flat.float().contiguous()  # [n]
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    code = get_code(quant_type)
    midpoints, order = code_midpoints(code)
    midpoints, order = midpoints.contiguous(), order.to(torch.uint8).contiguous()
    packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8)  # [(n + 1) // 2, 1]
    absmax = torch.empty(n_blocks, dtype=torch.float32)
    is_bf16 = flat.dtype == torch.bfloat16
    rc = lib.lk_quantize_4bit(None if is_bf16 else _ptr(flat), _ptr(flat) if is_bf16 else None, n, blocksize,
                              _ptr(midpoints), _ptr(order), _ptr(packed), _ptr(absmax), torch.get_num_threads())
    if rc != 0:
        return None
    return packed, finish_quantize_4bit(tensor, quant_type, blocksize, double_quant, absmax, code)

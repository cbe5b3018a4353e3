"""The Triton kernels of triton_4bit.py behind the registry's calling convention (CUDA tensors).

Each function takes the reference's arguments and returns its result, or None to decline: tensors
not on one CUDA device, an unsupported dtype or shape, or Triton not installed (then one warning
names the package to install). Triton is imported on the first call that accepts its input, never
at `import lorakit`: it is an optional extra (`pip install "lorakit[gpu]"`).

Testing without a GPU: `allow_cpu_tensors(True)` (tests only) lets the kernels take CPU tensors while
TRITON_INTERPRET=1, so Triton's interpreter runs them on the CPU (tests/quant/test_triton_kernels.py).
In every other case CPU tensors are declined, and the C kernels (or the reference) handle them.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from typing import Optional

import torch

log = logging.getLogger("lorakit")

_OUT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # triton_4bit._convert's OUT
# Elements per dequantize / quantize program (BLOCKS = TILE // blocksize 4-bit blocks, at least 1).
TILE = 4096
# The fused matrix-vector product runs for at most this many rows of x (one 16-row tl.dot tile);
# more rows go through dequantize + matmul (compute-bound territory, where cuBLAS wins).
GEMV_MAX_ROWS = 16
GEMV_BLOCK_N = 32
GEMV_BLOCK_K = 256
_state: dict = {}  # "module": triton_4bit or None once tried; "cpu": the test switch; tables per device


def available() -> bool:
    """True when Triton can be imported here (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def allow_cpu_tensors(on: bool) -> None:
    """Tests only: accept CPU tensors while TRITON_INTERPRET=1 (module docstring)."""
    _state["cpu"] = bool(on)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _accepts(tensors: list) -> bool:
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _state.get("cpu", False) and _interpreting()


def _module():
    """triton_4bit, imported on first use; None (with one warning) when Triton is missing."""
    if "module" not in _state:
        try:
            from . import triton_4bit

            _state["module"] = triton_4bit
        except ImportError as e:
            _state["module"] = None
            warnings.warn(f"lorakit: Triton is not installed ({e}), so 4-bit layers on the GPU use the slower "
                          "PyTorch reference. Install it with: pip install \"lorakit[gpu]\" (or pip install triton)",
                          RuntimeWarning, stacklevel=4)
    return _state["module"]


def _device_scope(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else _Null()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _scale_args(state) -> tuple:
    """(absmax, absmax2, code2, offset, blocksize2, nested) as the kernels take them; unused pointers
    repeat absmax (never read when not nested)."""
    if state.nested:
        return (state.absmax.contiguous(), state.absmax2.float().contiguous(), state.code2.float().contiguous(),
                state.offset.float().reshape(1), int(state.blocksize2), True)
    absmax = state.absmax.float().contiguous()
    return absmax, absmax, absmax, absmax, 1, False


def _state_tensors(packed, state) -> list:
    return [packed, state.absmax, state.code] + ([state.absmax2, state.code2, state.offset] if state.nested else [])


def _as_kernel_out(buf: torch.Tensor) -> torch.Tensor:
    """bf16 is written as its int16 bits (triton_4bit._to_bf16_bits)."""
    return buf.view(torch.int16) if buf.dtype == torch.bfloat16 else buf


def dequantize_4bit(packed: torch.Tensor, state, dtype: Optional[torch.dtype] = None,
                    out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Triton version of nf4.dequantize_4bit_reference (bit-identical); None when it does not apply.
    ``out`` (checked by the caller) is written in place."""
    dtype = dtype or state.dtype
    n = state.numel
    if dtype not in _OUT_CODES or packed.numel() * 2 < n or not _accepts(_state_tensors(packed, state)):
        return None
    tk = _module()
    if tk is None:
        return None
    flat = packed.reshape(-1)
    flat = flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)
    result = out.reshape(-1) if out is not None else torch.empty(n, dtype=dtype, device=packed.device)  # [n]
    absmax, absmax2, code2, offset, blocksize2, nested = _scale_args(state)
    n_blocks = -(-n // state.blocksize)
    blocks = max(1, TILE // state.blocksize)
    with _device_scope(packed):
        tk.launch(tk.dequantize_4bit_kernel, (tk.cdiv(n_blocks, blocks),), flat.contiguous(),
                  state.code.float().contiguous(), absmax, absmax2, code2, offset, _as_kernel_out(result),
                  n, n_blocks, blocksize2, BLOCKSIZE=state.blocksize, BLOCKS=blocks, NESTED=nested, OUT=_OUT_CODES[dtype])
    return result.view(state.shape)


def _code_tables(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(code fp32 [16], sorted midpoints fp32 [15], sorted position -> index int32 [16]) on device, cached."""
    key = ("tables", quant_type, device)
    if key not in _state:
        from ..nf4 import code_midpoints, get_code

        code = get_code(quant_type)
        midpoints, order = code_midpoints(code)
        _state[key] = (code.to(device), midpoints.contiguous().to(device), order.to(torch.int32).to(device))
    return _state[key]


def quantize_4bit(tensor: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool):
    """Triton version of nf4.quantize_4bit_reference (byte-identical); None when it does not apply.
    The 4-bit codes and fp32 absmax come from the kernel; double quantization is the reference's
    (nf4.finish_quantize_4bit: n / blocksize values, a few PyTorch ops)."""
    from ..nf4 import finish_quantize_4bit

    if not _accepts([tensor]):
        return None
    tk = _module()
    if tk is None:
        return None
    flat = tensor.detach().reshape(-1).contiguous()  # [n] fp32 / bf16 / fp16, converted in the kernel
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    code, midpoints, order = _code_tables(quant_type, tensor.device)
    packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=tensor.device)  # [(n + 1) // 2, 1]
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=tensor.device)
    blocks = max(1, TILE // blocksize)
    with _device_scope(tensor):
        tk.launch(tk.quantize_4bit_kernel, (tk.cdiv(n_blocks, blocks),), flat, midpoints, order, packed, absmax,
                  n, n_blocks, BLOCKSIZE=blocksize, BLOCKS=blocks)
    return packed, finish_quantize_4bit(tensor, quant_type, blocksize, double_quant, absmax, code.clone())


def _splits(programs: int, k_tiles: int, device: torch.device) -> int:
    """Split K so that about 4 programs per SM run (deterministic: partial sums, then one sum)."""
    if device.type != "cuda":
        return min(2, k_tiles)  # the interpreter: exercise the split path, cheaply
    key = ("sms", device)
    if key not in _state:
        _state[key] = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, (4 * _state[key]) // max(1, programs))
    return max(1, min(want, k_tiles, 16))


def gemv_4bit(x: torch.Tensor, packed: torch.Tensor, state) -> Optional[torch.Tensor]:
    """y = x @ W^T for W = dequantize_4bit(packed, state, x.dtype) [N, K], x [..., K] with at most
    GEMV_MAX_ROWS rows, W decoded in registers and never written (nf4.gemv_4bit_reference is the
    definition; the sums are fp32 in another order than a GEMM's, so results agree to rounding).
    None when it does not apply: more rows, K % blocksize != 0, another dtype or device."""
    if x.dtype not in _OUT_CODES or len(state.shape) != 2 or x.shape[-1] != state.shape[1]:
        return None
    n_out, k = state.shape
    m = x.numel() // max(1, k)
    if m == 0 or m > GEMV_MAX_ROWS or k % state.blocksize or not _accepts([x] + _state_tensors(packed, state)):
        return None
    tk = _module()
    if tk is None:
        return None
    x2 = x.reshape(m, k).contiguous()  # [M, K]
    flat = packed.reshape(-1)
    flat = flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)
    absmax, absmax2, code2, offset, blocksize2, nested = _scale_args(state)
    programs = tk.cdiv(n_out, GEMV_BLOCK_N)
    k_tiles = tk.cdiv(k, GEMV_BLOCK_K)
    splits = _splits(programs, k_tiles, x.device)
    k_per_split = tk.cdiv(k_tiles, splits) * GEMV_BLOCK_K
    splits = tk.cdiv(k, k_per_split)
    parts = torch.empty(splits, m, n_out, dtype=torch.float32, device=x.device)  # [splits, M, N]
    with _device_scope(x):
        tk.launch(tk.gemv_4bit_kernel, (programs, splits), x2, flat.contiguous(), state.code.float().contiguous(),
                  absmax, absmax2, code2, offset, parts, m, n_out, k, -(-state.numel // state.blocksize), blocksize2,
                  k_per_split, BLOCKSIZE=state.blocksize, SUB=min(state.blocksize, GEMV_BLOCK_K), BLOCK_N=GEMV_BLOCK_N,
                  BLOCK_K=GEMV_BLOCK_K, BLOCK_M=16, NESTED=nested, DOT=_OUT_CODES[x.dtype],
                  UPCAST=_interpreting())
    y = parts[0] if splits == 1 else parts.sum(dim=0)  # [M, N] fp32
    return y.to(x.dtype).reshape(*x.shape[:-1], n_out)

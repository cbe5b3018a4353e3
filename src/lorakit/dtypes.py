"""The one table of floating-point dtypes and their names (config names, long names, safetensors codes).

    short   long        torch            bytes   safetensors
    bf16    bfloat16    torch.bfloat16   2       BF16
    fp16    float16     torch.float16    2       F16
    fp32    float32     torch.float32    4       F32

Config fields and flags use the short names (`train.precision: bf16`); files lorakit writes use
the long names (`"compute_dtype": "bfloat16"`, as transformers' config.json does). Both are
accepted wherever a dtype is read. The safetensors codes of every storable dtype (integers too)
follow the format spec (https://github.com/huggingface/safetensors#format).
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_LONG = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
SAFETENSORS_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
FROM_SAFETENSORS_CODE = {code: dtype for dtype, code in SAFETENSORS_CODES.items()}


def to_dtype(name: str | torch.dtype) -> torch.dtype:
    """A float dtype from a short ("bf16") or long ("bfloat16") name, or the dtype itself."""
    if isinstance(name, torch.dtype):
        if name not in _LONG:
            raise ValueError(f"dtype {name} is not allowed; choose one of {', '.join(FLOAT_DTYPES)}")
        return name
    if name in FLOAT_DTYPES:
        return FLOAT_DTYPES[name]
    for dtype, long in _LONG.items():
        if name == long:
            return dtype
    raise ValueError(f"dtype {name!r} is not allowed; choose one of {', '.join(FLOAT_DTYPES)} "
                     f"(or {', '.join(_LONG.values())})")


def short_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bf16"."""
    return next(k for k, v in FLOAT_DTYPES.items() if v == to_dtype(dtype))


def long_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return _LONG[to_dtype(dtype)]


def itemsize(name: str | torch.dtype) -> int:
    """Bytes per element: "bf16" -> 2."""
    return to_dtype(name).itemsize

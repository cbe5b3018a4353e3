"""8-bit "dynamic" blockwise quantization, byte-exact with bitsandbytes' CPU backend.

Used for (a) the second level of double quantization (the per-block absmax of a 4-bit
tensor is stored as 8-bit dynamic codes in blocks of 256) and (b) 8-bit optimizer states.

Format
------
A tensor is cut into flat blocks of ``blocksize`` consecutive elements (row-major order; the
last block may be partial). Each block stores one fp32 ``absmax = max|x|`` and one uint8
code per element: the index of a value in a sorted 256-entry ``code`` table that lies in
[-1, 1]. Dequantization is ``code[idx] * absmax`` computed in fp32, then cast to ``dtype``.

Rounding (why this is not a plain nearest-neighbour search)
-----------------------------------------------------------
bitsandbytes >= 0.50 on CPU (csrc/cpu_ops.cpp, ``quantize_cpu_impl`` / ``build_quantize_lut``)
does not search the table per element. It normalises ``v = x * (1 / absmax)`` (fp32),
clamps to [-1, 1], maps ``v`` to one of 65536 evenly spaced grid points
``g = trunc((v + 1) * 0.5 * 65535 + 0.5)`` and looks up the code index nearest to the grid
value ``-1 + 2 g / 65535``. That equals the nearest code except for values within half a grid
step (1.5e-5) of a midpoint between two codes, and codes closer together than a grid step
(the smallest entries of the unsigned map) cannot all be reached. We reproduce that exactly
so codes written here and by bitsandbytes are the same bytes. A block whose absmax is 0
stores index 0 for every element (bitsandbytes does the same).
"""

from __future__ import annotations

import math

import torch
from torch.utils.weak import WeakIdKeyDictionary

# bitsandbytes csrc/cpu_ops.cpp: kLUTSize = 65536 grid points over [-1, 1].
_LUT_SIZE = 65536


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The sorted 256-entry dynamic (exponent + fraction) code of Dettmers (2015),
    "8-Bit Approximations for Parallelism in Deep Learning", arXiv:1511.04561, with the
    same construction and fp32 rounding as ``bitsandbytes.functional.create_dynamic_map``.

    For exponent level i (0 .. max_exponent_bits-1) the magnitudes are the midpoints of an
    even grid on [0.1, 1] scaled by 10**(i - (max_exponent_bits - 1)); each level has twice
    the points of the previous one. Signed maps mirror every magnitude; 0 and 1.0 are
    appended; entries missing up to 256 are zeros. Returns fp32 [256], sorted ascending.
    """
    non_sign_bits = total_bits - 1
    extra_bits = 0 if signed else 1  # unsigned maps spend the sign bit on the fraction
    magnitudes: list[torch.Tensor] = []
    for level in range(max_exponent_bits):
        n_points = 2 ** (level + non_sign_bits - max_exponent_bits + extra_bits)
        magnitudes.append(_level_values(n_points, level, max_exponent_bits))
    # Codes with all exponent bits zero and no indicator bit: one more grid at the top level.
    additional = 2 ** (non_sign_bits - max_exponent_bits) - 1
    if additional > 0:
        magnitudes.append(_level_values(additional, max_exponent_bits - 1, max_exponent_bits))
    values: list[float] = []
    for mags in magnitudes:
        values += mags.tolist()
        if signed:
            values += (-mags).tolist()
    values += [0.0, 1.0]
    if len(values) != 2**total_bits:
        raise ValueError(
            f"create_dynamic_map: max_exponent_bits={max_exponent_bits}, total_bits={total_bits}, "
            f"signed={signed} gives {len(values)} values, expected 2**total_bits={2**total_bits}"
        )
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def _level_values(n_points: int, level: int, max_exponent_bits: int) -> torch.Tensor:
    """fp32 midpoints of an (n_points + 1)-point grid on [0.1, 1], times 10**(level - max_exp + 1)."""
    bounds = torch.linspace(0.1, 1, n_points + 1, dtype=torch.float32)
    means = (bounds[:-1] + bounds[1:]) / 2.0
    return (10 ** (-(max_exponent_bits - 1) + level)) * means


def _check_blocksize(blocksize: int) -> None:
    if not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")


# Two caches of the int64 [65536] tables below (512 KB each):
#   by values: (the code's fp32 bytes, device) -> table; a lookup needs the code on the host
#   by tensor: the code tensor object itself (weakly, by identity) -> (its _version, {device: table})
# The second answers without reading the code's values, so a code living on a GPU (the 8-bit
# optimizer's maps) costs no device-to-host copy and no sync per quantize_blockwise call: only the
# first call with a given tensor reads it (code-review B.5). An in-place change of the code bumps
# its _version and is noticed.
_LUT_BY_VALUES: dict[tuple[bytes, str], torch.Tensor] = {}
_LUT_BY_TENSOR = WeakIdKeyDictionary()


def clear_lookup_tables() -> None:
    """Drop the cached lookup tables (built again on the next quantize call)."""
    _LUT_BY_VALUES.clear()
    _LUT_BY_TENSOR.clear()


def _lookup_table(code: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The table below for `code`, on `device`, built once per (code values, device) and then reused
    (the 8-bit optimizer re-quantizes its state every step with the same two codes; double
    quantization uses the signed map for every weight)."""
    device = torch.device(device)
    version, tables = _LUT_BY_TENSOR.get(code, (None, None))
    if tables is not None and version == code._version and device in tables:
        return tables[device]
    key = (code.detach().to("cpu", torch.float32).numpy().tobytes(), str(device))  # reads the values once
    table = _LUT_BY_VALUES.get(key)
    if table is None:
        if len(_LUT_BY_VALUES) > 16:
            _LUT_BY_VALUES.clear()
        table = _LUT_BY_VALUES[key] = _build_lookup_table(code).to(device)
    if tables is None or version != code._version:
        tables = {}
        _LUT_BY_TENSOR[code] = (code._version, tables)
    tables[device] = table
    return table


def _build_lookup_table(code: torch.Tensor) -> torch.Tensor:
    """int64 [65536]: grid point g -> index of the code entry nearest to -1 + 2g/65535.

    Ties (grid value exactly on a midpoint) go to the lower index, as in bitsandbytes'
    build_quantize_lut (it advances while ``midpoint < value``).
    """
    code = code.detach().to("cpu", torch.float32)
    midpoints = 0.5 * (code[:-1] + code[1:])  # [255]
    grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / (_LUT_SIZE - 1)
    # number of midpoints strictly below each grid value
    return torch.searchsorted(midpoints, grid, side="left")


def _grid_index(normed: torch.Tensor) -> torch.Tensor:
    """trunc((v + 1) * 0.5 * 65535 + 0.5) in fp32 for v in [-1, 1], as bitsandbytes computes it.

    Whether the compiler fuses the last multiply-add (FMA) does not matter: 0.5 is a multiple
    of the fp32 spacing of every product >= 1, so ``round(p) + 0.5 == round(p + 0.5)``.
    """
    scaled = (normed + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5  # fp32 throughout
    return scaled.to(torch.int64)  # truncation toward zero (values are >= 0.5)


def _blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, int]:
    """Flatten x to fp32 and zero-pad to whole blocks: returns ([n_blocks, blocksize], n)."""
    flat = x.detach().reshape(-1).float()  # [n]
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, n_blocks * blocksize - n))  # [n_blocks * blocksize]
    return padded.view(n_blocks, blocksize), n  # [n_blocks, blocksize]


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to uint8 indices into ``code`` (sorted, 256 values in [-1, 1]).

    Returns ``(codes, absmax)``: codes uint8 with ``x.shape``; absmax fp32 [ceil(n / blocksize)].
    Byte-exact with ``bitsandbytes.functional.quantize_blockwise`` on CPU (see module docstring).
    """
    _check_blocksize(blocksize)
    if code.numel() != 256:
        raise ValueError(f"code must have 256 entries, got {code.numel()}")
    blocks, n = _blocks(x, blocksize)  # [n_blocks, blocksize]
    absmax = blocks.abs().amax(dim=1)  # [n_blocks] fp32
    zero_block = absmax == 0
    inv = 1.0 / torch.where(zero_block, torch.ones_like(absmax), absmax)  # fp32 reciprocal
    normed = (blocks * inv[:, None]).clamp(-1.0, 1.0)  # [n_blocks, blocksize]
    lut = _lookup_table(code, x.device)  # [65536] int64 on x's device, cached
    idx = lut[_grid_index(normed)]  # [n_blocks, blocksize]
    idx = idx.masked_fill(zero_block[:, None], 0)
    codes = idx.to(torch.uint8).reshape(-1)[:n].reshape(x.shape)
    return codes, absmax


def dequantize_blockwise(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int = 256,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code[codes] * absmax[block]`` in fp32, cast to dtype."""
    _check_blocksize(blocksize)
    n = codes.numel()
    n_blocks = math.ceil(n / blocksize)
    if absmax.numel() != n_blocks:
        raise ValueError(f"absmax has {absmax.numel()} entries, expected ceil({n}/{blocksize}) = {n_blocks}")
    table = code.to(device=codes.device, dtype=torch.float32)  # [256]
    values = table.index_select(0, codes.reshape(-1).to(torch.int32))  # [n]
    values = torch.nn.functional.pad(values, (0, n_blocks * blocksize - n))  # [n_blocks * blocksize]
    out = values.view(n_blocks, blocksize) * absmax.float().view(n_blocks, 1)  # [n_blocks, blocksize]
    return out.reshape(-1)[:n].reshape(codes.shape).to(dtype)

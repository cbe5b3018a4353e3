"""Triton kernels for 4-bit NF4 / FP4 weights (imported only by kernels/gpu.py, only when used).

Layouts are those of quant/nf4.py: packed uint8 [(n + 1) // 2], element 2j in the HIGH nibble of
byte j; blocks of BLOCKSIZE consecutive elements of the flattened weight, one fp32 absmax per block,
or (double quantization) one uint8 code per block into the signed dynamic map `code2` [256], with an
fp32 absmax2 per `blocksize2` blocks and one fp32 `offset`:

    absmax[b] = code2[codes[b]] * absmax2[b // blocksize2] + offset        two fp32 roundings
    value[i]  = code[idx[i]] * absmax[i // BLOCKSIZE]                       one fp32 rounding
    out[i]    = value[i] rounded to nearest-even in the output dtype

Bit-exactness with the PyTorch reference rests on three choices, each needed on the GPU or in the
interpreter:
  - every launch passes enable_fp_fusion=False: a fused multiply-add would round `a * b + c` once;
  - fp32 -> bf16 is rounded with integer arithmetic (_to_bf16_bits): Triton's interpreter truncates
    in that cast (its fp32 -> fp16 cast, like the GPU's, rounds to nearest-even);
  - quantize divides with tl.math.div_rn (IEEE division; a plain `/` may be approximate on the GPU).
Known difference: a GPU that flushes subnormal operands of the division (|x| < 1.2e-38, never seen
in real weights) may give FP4's +0 code 0 where the reference gives code 8 (both decode to 0.0).

Kernels are launched on the caller's current CUDA stream (Triton's default), so they are ordered
with the surrounding PyTorch work like any PyTorch op.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _to_bf16_bits(v):
    """fp32 -> the int16 bits of the nearest bf16, ties to even; NaN -> 0x7FC0 (PyTorch's)."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(v != v, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _convert(v, OUT: tl.constexpr):
    """fp32 values -> what the output pointer holds: OUT 0 fp32, 1 bf16 (as int16 bits), 2 fp16."""
    if OUT == 1:
        return _to_bf16_bits(v)
    elif OUT == 2:
        return v.to(tl.float16)
    else:
        return v


@triton.jit
def _block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, b, n_blocks, blocksize2, NESTED: tl.constexpr):
    """fp32 absmax of the 4-bit blocks `b` (any shape, int64), decoding double quantization inline."""
    ok = b < n_blocks
    if NESTED:
        q = tl.load(absmax_ptr + b, mask=ok, other=0).to(tl.int32)  # uint8 code of each block
        scaled = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + b // blocksize2, mask=ok, other=0.0)
        return scaled + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + b, mask=ok, other=0.0)


@triton.jit
def dequantize_4bit_kernel(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr,
                           n, n_blocks, blocksize2,
                           BLOCKSIZE: tl.constexpr, BLOCKS: tl.constexpr, NESTED: tl.constexpr, OUT: tl.constexpr):
    """One program: BLOCKS consecutive 4-bit blocks -> out[BLOCKS * BLOCKSIZE elements]."""
    HALF: tl.constexpr = BLOCKSIZE // 2
    b = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)  # [BLOCKS] block indices
    byte = b[:, None] * HALF + tl.arange(0, HALF)[None, :]  # [BLOCKS, HALF] byte indices
    q = tl.load(packed_ptr + byte, mask=byte * 2 < n, other=0)  # uint8
    scale = _block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, b, n_blocks, blocksize2, NESTED)
    hi = tl.load(code_ptr + (q >> 4).to(tl.int32)) * scale[:, None]  # [BLOCKS, HALF] elements 2j
    lo = tl.load(code_ptr + (q & 15).to(tl.int32)) * scale[:, None]  # [BLOCKS, HALF] elements 2j + 1
    values = tl.reshape(tl.join(hi, lo), (BLOCKS, BLOCKSIZE))  # [BLOCKS, HALF, 2] -> element order
    e = b[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # [BLOCKS, BLOCKSIZE] element indices
    tl.store(out_ptr + e, _convert(values, OUT), mask=e < n)


@triton.jit
def _nearest(s, mid_ptr, order_ptr):
    """Index into the 16-entry code of the value nearest to s (fp32 in [-1, 1]): the number of the 15
    sorted midpoints strictly below s (an exact midpoint goes to the lower value), then the sorted
    position -> code index table (FP4's code is not sorted)."""
    below = tl.zeros(s.shape, tl.int32)
    for j in tl.static_range(15):
        below += (s > tl.load(mid_ptr + j)).to(tl.int32)
    return tl.load(order_ptr + below)


@triton.jit
def quantize_4bit_kernel(x_ptr, mid_ptr, order_ptr, packed_ptr, absmax_ptr, n, n_blocks,
                         BLOCKSIZE: tl.constexpr, BLOCKS: tl.constexpr):
    """One program: BLOCKS consecutive blocks of x (fp32 / bf16 / fp16) -> their bytes and fp32 absmax.

    absmax = max |x| over the block (a partial last block: clamped to >= 1e-38, as stored);
    scaled = x * (1 / max(absmax, 1e-38)) in full blocks, x / absmax in the partial last block,
    clamped to [-1, 1] (bitsandbytes' rounding, quant/nf4.py)."""
    HALF: tl.constexpr = BLOCKSIZE // 2
    b = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)  # [BLOCKS]
    even = b[:, None] * BLOCKSIZE + 2 * tl.arange(0, HALF)[None, :]  # [BLOCKS, HALF] element 2j
    xe = tl.load(x_ptr + even, mask=even < n, other=0.0).to(tl.float32)
    xo = tl.load(x_ptr + even + 1, mask=even + 1 < n, other=0.0).to(tl.float32)  # padding: 0.0
    amax = tl.maximum(tl.max(tl.abs(xe), axis=1), tl.max(tl.abs(xo), axis=1))  # [BLOCKS]
    clamped = tl.maximum(amax, 1e-38)
    tail = (b + 1) * BLOCKSIZE > n  # the partial last block
    inv = tl.math.div_rn(tl.full(clamped.shape, 1.0, tl.float32), clamped)
    se = tl.where(tail[:, None], tl.math.div_rn(xe, clamped[:, None]), xe * inv[:, None])
    so = tl.where(tail[:, None], tl.math.div_rn(xo, clamped[:, None]), xo * inv[:, None])
    se = tl.minimum(tl.maximum(se, -1.0), 1.0)
    so = tl.minimum(tl.maximum(so, -1.0), 1.0)
    byte = (_nearest(se, mid_ptr, order_ptr) << 4) | _nearest(so, mid_ptr, order_ptr)
    tl.store(packed_ptr + even // 2, byte.to(tl.uint8), mask=even < n)
    tl.store(absmax_ptr + b, tl.where(tail, clamped, amax), mask=b < n_blocks)


@triton.jit
def gemv_4bit_kernel(x_ptr, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, part_ptr,
                     M, N, K, n_blocks, blocksize2, k_per_split,
                     BLOCKSIZE: tl.constexpr, SUB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, NESTED: tl.constexpr, DOT: tl.constexpr, UPCAST: tl.constexpr):
    """part[split, m, n] = sum over this split's K range of x[m, k] * W[n, k], fp32, for M <= BLOCK_M rows.

    W [N, K] is dequantized tile by tile in registers (never written to memory), each value rounded
    to x's dtype first, as the dense path's weight is: DOT 0 fp32 (ieee), 1 bf16, 2 fp16. UPCAST
    (the interpreter only, whose tl.dot multiplies bf16 operands as their integer bits) feeds the
    rounded 16-bit operands to an fp32 ieee dot instead: products of 16-bit values are exact in
    fp32 either way, so only the summation order differs from the tensor-core dot. Requires
    K % BLOCKSIZE == 0, so a tile's sub-blocks of SUB = min(BLOCKSIZE, BLOCK_K) columns each lie in
    one 4-bit block. Program (i, s): output features [i * BLOCK_N, +BLOCK_N), K range split s."""
    NB: tl.constexpr = BLOCK_K // SUB
    HALF: tl.constexpr = SUB // 2
    rn = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] rows of W
    rm = tl.arange(0, BLOCK_M)  # [BM] rows of x
    j = tl.arange(0, NB)  # [NB] sub-block within the tile
    c = tl.arange(0, HALF)  # [HALF] byte within the sub-block
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    k_start = tl.program_id(1) * k_per_split
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        col = k0 + j * SUB  # [NB] first column of each sub-block
        ok = (rn[:, None] < N) & (col[None, :] < K)  # [BN, NB]
        byte = rn[:, None, None] * (K // 2) + (col[None, :, None] // 2) + c[None, None, :]  # [BN, NB, HALF]
        q = tl.load(packed_ptr + byte, mask=ok[:, :, None], other=0)
        blk = (rn[:, None] * K + col[None, :]) // BLOCKSIZE  # [BN, NB]
        scale = _block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, n_blocks, blocksize2, NESTED)
        hi = tl.load(code_ptr + (q >> 4).to(tl.int32)) * scale[:, :, None]  # [BN, NB, HALF]
        lo = tl.load(code_ptr + (q & 15).to(tl.int32)) * scale[:, :, None]
        w = tl.reshape(tl.join(hi, lo), (BLOCK_N, BLOCK_K))  # [BN, BK] in column order
        k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        xt = tl.load(x_ptr + rm[None, :] * K + k[:, None], mask=(rm[None, :] < M) & (k[:, None] < K), other=0.0)
        if DOT == 1:
            w = _to_bf16_bits(w).to(tl.bfloat16, bitcast=True)
        elif DOT == 2:
            w = w.to(tl.float16)
        if UPCAST:
            acc += tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
        elif DOT != 0:
            acc += tl.dot(w, xt)  # [BN, BK] @ [BK, BM] in x's 16-bit dtype, fp32 accumulation
        else:
            acc += tl.dot(w, xt, input_precision="ieee")
    out = part_ptr + tl.program_id(1).to(tl.int64) * M * N + rm[None, :] * N + rn[:, None]
    tl.store(out, acc, mask=(rn[:, None] < N) & (rm[None, :] < M))


def launch(kernel, grid, *args, **meta) -> None:
    """Launch with the options bit-exactness needs (module docstring)."""
    kernel[grid](*args, enable_fp_fusion=False, **meta)


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)

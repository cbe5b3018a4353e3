"""Reference 4-bit NF4 / FP4 blockwise quantization with double quantization.

Byte-exact with ``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit`` (0.50, CPU).

Layout
------
The tensor is flattened row-major into n values and cut into blocks of ``blocksize``
consecutive values (the last block may be partial). Per block:

    absmax[b] = max |x| over the block                            (fp32)
    idx[i]    = index of the code value nearest to x[i] / absmax[b]  (4 bits)

Two indices share a byte, the first (even) element in the HIGH nibble:

    packed[j] = (idx[2j] << 4) | idx[2j + 1]          bits 7..4 = idx[2j], bits 3..0 = idx[2j+1]

``packed`` is uint8 of shape [(n + 1) // 2, 1] (bitsandbytes' shape); for odd n the low
nibble of the last byte encodes a padding 0.0. Dequantization is
``code[idx[i]] * absmax[b]`` in fp32, then cast to the requested dtype.

Rounding: values are scaled by ``x * (1 / absmax)`` for full blocks and ``x / absmax`` for a
partial last block (as bitsandbytes does), clamped to [-1, 1], and an exact midpoint goes to
the lower code value. An all-zero partial last block stores absmax 1e-38 (bitsandbytes clamps
it there), an all-zero full block stores 0.

Double quantization (QLoRA, Dettmers et al. 2023, sec. 3): the fp32 absmax vector is replaced
by ``quantize_blockwise(absmax - mean(absmax), signed dynamic map, blocksize=256)``: uint8
codes [n_blocks] + fp32 second-level absmax [ceil(n_blocks / 256)] + the fp32 mean (offset).
Storage per weight: 4 + 32/blocksize bits -> 4 + 8/blocksize + 32/(256*blocksize) bits
(4.5 -> 4.127 at blocksize 64).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .dynamic import create_dynamic_map, dequantize_blockwise, quantize_blockwise
from .state import QuantState

# NormalFloat4: the 16 values of QLoRA (Dettmers et al. 2023, arXiv:2305.14314, Appendix E),
# as hard-coded in bitsandbytes.functional.get_4bit_type("nf4") (fp32, sorted ascending).
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)  # fmt: skip

# FP4 (E2M1 with bitsandbytes' exponent bias), in bitsandbytes' index order: bit 3 is the sign;
# bits 2..0 give the magnitudes 0, 0.0625, 8, 12, 4, 6, 2, 3, normalised by the largest (12).
# Source: bitsandbytes.functional.get_4bit_type("fp4") (the same values as dDequantizeFP4 in
# csrc/cpu_ops.h). Index 8 (negative zero) is stored as +0.0, as bitsandbytes does.
FP4_CODE = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3], dtype=torch.float32) / 12.0

QUANT_TYPES = ("nf4", "fp4")
# bitsandbytes.functional.quantize_4bit accepts exactly these block sizes.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Double quantization: 8-bit blocks of 256 absmax values (QLoRA sec. 3 / bitsandbytes).
DOUBLE_QUANT_BLOCKSIZE = 256
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def get_code(quant_type: str) -> torch.Tensor:
    """The 16-entry fp32 code table of ``quant_type`` ("nf4" or "fp4")."""
    check_quant_args(quant_type, 64)
    return (NF4_CODE if quant_type == "nf4" else FP4_CODE).clone()


def check_quant_args(quant_type: str, blocksize: int) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")


def code_midpoints(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 [15] midpoints between the sorted code values, int64 [16] sorted position -> index)."""
    sorted_code, order = torch.sort(code, stable=True)  # FP4's two zeros: index 0 before 8
    return (sorted_code[:-1] + sorted_code[1:]) / 2, order  # [15], [16]


def _nearest_index(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """int64 index into ``code`` of the nearest value; an exact midpoint goes to the lower value."""
    midpoints, order = code_midpoints(code)
    return order[torch.searchsorted(midpoints, scaled, side="left")]


def _block_scale(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (absmax fp32 [n_blocks], scaled fp32 [n]) with bitsandbytes' rounding."""
    flat = x.detach().reshape(-1).float()  # [n]
    n = flat.numel()
    n_full, rem = divmod(n, blocksize)
    full = flat[: n_full * blocksize].view(n_full, blocksize)  # [n_full, blocksize]
    absmax = full.abs().amax(dim=1)  # [n_full]
    scaled = (full * (1.0 / absmax.clamp(min=1e-38))[:, None]).reshape(-1)  # [n_full * blocksize]
    if rem:
        tail = flat[n_full * blocksize :]  # [rem]
        tail_absmax = tail.abs().amax().clamp(min=1e-38)  # bitsandbytes clamps the tail block's absmax
        absmax = torch.cat([absmax, tail_absmax[None]])  # [n_blocks]
        scaled = torch.cat([scaled, tail / tail_absmax])  # [n]
    return absmax, scaled.clamp(-1.0, 1.0)


def pack_nibbles(idx: torch.Tensor) -> torch.Tensor:
    """int [n] 4-bit indices -> uint8 [(n + 1) // 2, 1]; element 2j in the high nibble of byte j."""
    idx = idx.reshape(-1).to(torch.uint8)
    if idx.numel() % 2:
        raise ValueError("pack_nibbles needs an even count; pad with the index of 0.0 first")
    pairs = idx.view(-1, 2)  # [n / 2, 2]
    return ((pairs[:, 0] << 4) | pairs[:, 1]).unsqueeze(1)  # [n / 2, 1]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 packed bytes (any shape) -> int64 [n] 4-bit indices (inverse of pack_nibbles)."""
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    pairs = torch.stack([flat >> 4, flat & 0xF], dim=1)  # [n_bytes, 2]
    return pairs.reshape(-1)[:n].long()  # [n]


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 absmax [n_blocks] -> (codes uint8 [n_blocks], absmax2 fp32 [ceil(n_blocks/256)], offset fp32 [], code2).

    The offset is the mean computed on the CPU whatever absmax's device: a reduction's rounding
    depends on its summation order, which differs between CPU and CUDA, and one ulp of offset
    changes codes. So a weight quantized on a GPU has the bytes it gets on the CPU (and from
    bitsandbytes on the CPU). Costs one copy of n/blocksize floats (3.7 MB for Llama-3-8B's
    largest matrix) at load time only."""
    code2 = create_dynamic_map(signed=True)  # [256] on the CPU: its lookup table is cached by value
    offset = absmax.detach().to("cpu", torch.float32).mean().to(absmax.device)
    codes, absmax2 = quantize_blockwise(absmax - offset, code2, DOUBLE_QUANT_BLOCKSIZE)
    return codes, absmax2, offset, code2.to(absmax.device)


def quantize_4bit(
    tensor: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True
) -> tuple[torch.Tensor, QuantState]:
    """Quantize a float tensor to packed 4-bit codes; see the module docstring for the layout.

    Returns ``(packed uint8 [(n + 1) // 2, 1], QuantState)``. Runs a registered fast kernel when
    one accepts the input (byte-identical, see quant/kernels), else the reference below.
    """
    check_quant_args(quant_type, blocksize)
    if tensor.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"quantize_4bit: tensor dtype must be one of {_FLOAT_DTYPES}, got {tensor.dtype}")
    if tensor.numel() == 0:
        raise ValueError("quantize_4bit: tensor is empty")
    from . import kernels

    out = kernels.dispatch("quantize_4bit", tensor, quant_type, blocksize, double_quant)
    return out if out is not None else quantize_4bit_reference(tensor, quant_type, blocksize, double_quant)


def quantize_4bit_reference(
    tensor: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True
) -> tuple[torch.Tensor, QuantState]:
    """The plain-PyTorch quantize_4bit (arguments already checked by quantize_4bit)."""
    code = get_code(quant_type).to(tensor.device)
    absmax, scaled = _block_scale(tensor, blocksize)  # [n_blocks], [n]
    scaled = torch.nn.functional.pad(scaled, (0, scaled.numel() % 2))  # [n rounded up to even]
    packed = pack_nibbles(_nearest_index(scaled, code))  # [(n + 1) // 2, 1]
    return packed, finish_quantize_4bit(tensor, quant_type, blocksize, double_quant, absmax, code)


def finish_quantize_4bit(
    tensor: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool, absmax: torch.Tensor, code: torch.Tensor
) -> QuantState:
    """The QuantState of `tensor` from its fp32 block absmax [n_blocks], double-quantized if asked."""
    if not double_quant:
        return QuantState(tensor.shape, tensor.dtype, blocksize, quant_type, absmax, code)
    codes, absmax2, offset, code2 = double_quantize(absmax)
    return QuantState(
        tensor.shape, tensor.dtype, blocksize, quant_type, codes, code,
        offset=offset, absmax2=absmax2, code2=code2, blocksize2=DOUBLE_QUANT_BLOCKSIZE,
    )  # fmt: skip


# Weights quantized per step by quantize_weight on the CPU: the reference quantize_4bit needs ~30
# bytes of temporaries per weight (fp32 copy, scaled values, int64 indices), so 2**18 weights bound
# them to ~8 MB. Small, same-sized temporaries also keep the allocator from fragmenting: on
# bench/bench_load.py's 336M-parameter model, whole-matrix quantization peaked at 1250-1550 MB RSS,
# chunks at ~623 MB.
QUANT_CHUNK_WEIGHTS = 2**18
# On a GPU the caching allocator reuses blocks (no fragmentation of the host heap) and every chunk
# costs ~15 kernel launches with the reference (1 with the Triton kernel), so chunks are 64x larger:
# Llama's 4096 x 14336 MLP matrix takes 4 chunks instead of 224; the reference's temporaries stay
# bounded at ~0.5 GB, the Triton kernel's at the chunk's outputs.
QUANT_CHUNK_WEIGHTS_GPU = 2**24


def quant_chunk_weights(device: torch.device) -> int:
    """Weights per quantize_weight chunk on `device` (the two constants above)."""
    return QUANT_CHUNK_WEIGHTS if torch.device(device).type == "cpu" else QUANT_CHUNK_WEIGHTS_GPU


def quantize_weight(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                    chunk_weights: Optional[int] = None) -> tuple[torch.Tensor, QuantState]:
    """``quantize_4bit(weight)`` for a 2-D weight [out, in], computed over chunks of whole rows.

    Byte-exact with quantize_4bit: each chunk holds a multiple of `blocksize` weights, so its
    blocks are the whole tensor's blocks (only the last chunk may end in a partial block, as
    the whole tensor does); each chunk goes through quantize_4bit without double quantization
    (so registered fast kernels run), and the fp32 absmax of all chunks is double-quantized at
    once, as quantize_4bit does. Returns (packed uint8 [out, in/2], QuantState). `chunk_weights`:
    default quant_chunk_weights(weight.device).
    """
    check_quant_args(quant_type, blocksize)
    chunk_weights = chunk_weights or quant_chunk_weights(weight.device)
    rows, cols = weight.shape
    if weight.numel() <= chunk_weights or cols % 2:
        packed, state = quantize_4bit(weight, quant_type, blocksize, double_quant)
        return packed.reshape(rows, -1) if cols % 2 == 0 else packed, state
    step = blocksize // math.gcd(cols, blocksize)  # rows per chunk must hold whole blocks
    chunk_rows = max(step, chunk_weights // cols // step * step)
    packed = torch.empty(rows, cols // 2, dtype=torch.uint8, device=weight.device)  # [out, in/2]
    absmax = torch.empty(math.ceil(weight.numel() / blocksize), dtype=torch.float32, device=weight.device)  # [n_blocks]
    code = get_code(quant_type).to(weight.device)
    for r0 in range(0, rows, chunk_rows):
        part = weight[r0:r0 + chunk_rows]  # [chunk_rows, in]
        part_packed, part_state = quantize_4bit(part, quant_type, blocksize, double_quant=False)
        packed[r0:r0 + part.shape[0]] = part_packed.view(part.shape[0], cols // 2)  # [(chunk_rows*in)/2, 1] -> rows
        b0 = r0 * cols // blocksize
        absmax[b0:b0 + part_state.absmax.numel()] = part_state.absmax
        del part_packed, part_state
    return packed, finish_quantize_4bit(weight, quant_type, blocksize, double_quant, absmax, code)


def block_absmax(state: QuantState) -> torch.Tensor:
    """fp32 [n_blocks] first-level absmax, undoing double quantization if present."""
    if not state.nested:
        return state.absmax.float()
    absmax = dequantize_blockwise(state.absmax, state.absmax2, state.code2, state.blocksize2)
    return absmax + state.offset


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: Optional[torch.dtype] = None,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``code[idx] * absmax[block]`` in fp32, cast to ``dtype`` (default: the original dtype),
    reshaped to ``state.shape``. Runs a registered fast kernel when one accepts the input
    (bit-identical, see quant/kernels), else the reference below. ``out``: a contiguous tensor of
    ``state.numel`` elements of that dtype on packed's device to write into (a reused buffer);
    the result is then a view of it."""
    n = state.numel
    if packed.numel() * 2 < n:
        raise ValueError(f"packed holds {packed.numel() * 2} codes, state.shape {tuple(state.shape)} needs {n}")
    dtype = dtype or state.dtype
    if out is not None and (out.dtype != dtype or out.numel() != n or not out.is_contiguous()
                            or out.device != packed.device):
        raise ValueError(f"out must be a contiguous {dtype} tensor of {n} elements on {packed.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device} (contiguous={out.is_contiguous()})")
    from . import kernels

    result = kernels.dispatch("dequantize_4bit", packed, state, dtype, out=out)
    return result if result is not None else dequantize_4bit_reference(packed, state, dtype, out=out)


# Weights per step of the reference dequantize on the CPU: its temporaries (int32 byte indices, fp32
# values: 6 B per weight) then stay in the L2 cache. Measured at 1 thread (bench/bench_step.py
# --kernels --threads 1, LORAKIT_KERNELS=reference), [4864, 896] bf16: 2**16 bytes per step 1.18 G
# weights/s, 2**18 0.93, the whole matrix at once 0.18 (fresh pages for 17 MB of temporaries).
# Other devices take the whole tensor in one step (each step is ~3 kernel launches).
DEQUANT_CHUNK_WEIGHTS = 2**17


def byte_table(code: torch.Tensor) -> torch.Tensor:
    """int64 [256]: entry b holds the two fp32 values (code[b >> 4], code[b & 15]) of packed byte b,
    as one 8-byte word (``.view(torch.float32)`` of a gather gives them back in element order)."""
    code = code.float()  # [16]
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)  # [256, 2]: hi, lo
    return pairs.contiguous().view(torch.int64).reshape(256)  # [256]


def reference_dequant_bytes_per_weight(device_type: str, out_bytes: int) -> int:
    """Peak bytes per weight dequantize_4bit_reference allocates (its output included) when it
    rebuilds a whole weight: on the CPU the output plus chunk temporaries (amortised to 0); on
    other devices, one step over the whole tensor: int32 byte indices (2 B per weight) beside the
    fp32 values (4 B), then the values beside the output."""
    return out_bytes if device_type == "cpu" else max(2 + 4, 4 + out_bytes)


def dequantize_4bit_reference(packed: torch.Tensor, state: QuantState, dtype: Optional[torch.dtype] = None,
                              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The plain-PyTorch dequantize_4bit (the definition every kernel is tested against):

        value[i] = (code[idx[i]] * absmax[i // blocksize]).to(dtype)     fp32 product, one rounding

    computed per step of DEQUANT_CHUNK_WEIGHTS weights (CPU) as: packed byte -> two fp32 code values
    through the 256-entry byte_table (one int32-indexed gather per byte), times the block's absmax
    (broadcast over [blocks, blocksize]), written into the output's dtype by the multiply itself
    (``torch.mul(..., out=)`` computes in fp32 and rounds once, as ``.to(dtype)`` does).
    tests/quant/test_nf4.py checks it bit for bit against the direct formulation (unpack nibbles,
    gather, pad, multiply, cast)."""
    dtype = dtype or state.dtype
    n, bs = state.numel, state.blocksize
    device = packed.device
    flat = packed.reshape(-1)
    flat = flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)  # [(n + 1) // 2] bytes
    absmax = block_absmax(state).to(device)  # [n_blocks] fp32
    table = byte_table(state.code.to(device))  # [256] int64
    result = out.reshape(-1) if out is not None else torch.empty(n, dtype=dtype, device=device)  # [n]
    n_full = n // bs
    step = max(1, DEQUANT_CHUNK_WEIGHTS // bs) if device.type == "cpu" else max(1, n_full)  # blocks per step
    for b0 in range(0, n_full, step):
        b1 = min(n_full, b0 + step)
        words = table.index_select(0, flat[b0 * bs // 2:b1 * bs // 2].to(torch.int32))  # [(b1 - b0) * bs / 2] int64
        values = words.view(torch.float32).view(b1 - b0, bs)  # [blocks, bs]: the code values in element order
        torch.mul(values, absmax[b0:b1, None], out=result[b0 * bs:b1 * bs].view(b1 - b0, bs))
    if n_full * bs < n:  # a partial last block (blocksize is even, so it starts at a byte boundary)
        start = n_full * bs
        words = table.index_select(0, flat[start // 2:(n + 1) // 2].to(torch.int32))  # [ceil((n - start) / 2)]
        torch.mul(words.view(torch.float32)[: n - start], absmax[n_full], out=result[start:n])
    return result.view(state.shape)


def gemv_4bit_reference(x: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """y = x @ W^T with W = dequantize_4bit_reference(packed, state, x.dtype) [N, K]: x [..., K] -> y [..., N].
    The definition of the "gemv_4bit" kernels (quant/kernels), which compute it for a few rows of x
    without writing W; their fp32 sums run in another order, so they agree to rounding, not bits."""
    return x @ dequantize_4bit_reference(packed, state, x.dtype).t()  # [..., N]

"""llama.cpp's K-quants Q4_K, Q5_K and Q6_K in PyTorch, vectorised over super-blocks.

The algorithm is ggml's reference quantizer (`quantize_row_q{4,5,6}_K_ref` in ggml/src/ggml-quants.c,
which `llama-quantize` runs when no importance matrix is given), step for step, on all super-blocks
at once instead of one at a time; gguf-py's `gguf.quants.dequantize` decodes what it writes
(tests/export/test_kquants.py). Weights are quantized row by row in super-blocks of QK_K = 256
consecutive values of a row (the row length must be a multiple of 256).

Q4_K (144 bytes / 256 values = 4.5 bits per weight), 8 sub-blocks of 32:
    d    fp16   super-block scale of the sub-block scales     \
    dmin fp16   super-block scale of the sub-block mins        | value = d * sc_j * q - dmin * m_j
    scales[12]  sc_j, m_j (6 bits each, j = 0..7):            /  q in 0..15
                  bytes 0-3:  sc_0..3 (bits 0-5), high 2 bits of sc_4..7 (bits 6-7)
                  bytes 4-7:  m_0..3  (bits 0-5), high 2 bits of m_4..7  (bits 6-7)
                  bytes 8-11: low 4 bits of sc_4..7 (bits 0-3), low 4 bits of m_4..7 (bits 4-7)
    qs[128]     for each 64-value chunk c: 32 bytes, byte l = q[64c + l] | q[64c + 32 + l] << 4
Q5_K (176 bytes = 5.5 bits): d, dmin, scales[12] as Q4_K, then
    qh[32]      bit 2c of byte l = high bit of q[64c + l], bit 2c+1 = high bit of q[64c + 32 + l]
    qs[128]     the low 4 bits as Q4_K's qs; q in 0..31
Q6_K (210 bytes = 6.5625 bits), 16 sub-blocks of 16, value = d * sc_j * (q - 32), q in 0..63:
    ql[128]     for each 128-value half h, 64 bytes: byte l (l < 32) = low4(q[128h + l]) | low4(q[128h + 64 + l]) << 4,
                byte 32 + l = low4(q[128h + 32 + l]) | low4(q[128h + 96 + l]) << 4
    qh[64]      for each half, 32 bytes: byte l = hi2(q[128h + l]) | hi2(q[+32]) << 2 | hi2(q[+64]) << 4 | hi2(q[+96]) << 6
    scales[16]  int8 sc_j
    d    fp16

The search for each sub-block's scale and min (ggml's make_qkx2_quants / make_qx_quants) tries a
fixed grid of candidate inverse scales and keeps the weighted least-squares best; the error of a
candidate is computed here in closed form from the sums the fit already has (the C code re-sums it),
which is the same number up to float rounding.
"""

from __future__ import annotations

import numpy as np
import torch

QK_K = 256
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
GROUP_MAX_EPS = 1e-15  # ggml-quants.c: below this a group counts as all zero
_CHUNK = 1 << 18  # values quantized at once: temporaries of ~1 MB each stay in cache, on any tensor size


def _round(x: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: round half to even (the FPU mode its 1.5 * 2^23 trick relies on)."""
    return torch.round(x)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """GGML_FP32_TO_FP16 then back: round to nearest even in half precision."""
    return x.half().float()


def make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml's make_qkx2_quants on every row of x [G, n] with weights w [G, n]: the (scale, min) that
    minimise sum w (scale * L + min - x)^2 with L = clamp(round(iscale * (x - min)), 0, nmax), over
    iscale = (nmax + rmin + rdelta * k) / (max - min), k = 0..nstep, each refit by least squares.
    Returns (scale [G], -min [G] >= 0, L [G, n] of the best candidate)."""
    f32 = np.float32
    mn = torch.clamp(x.amin(-1), max=0.0)                           # [G]  min(x), at most 0
    mx = x.amax(-1)                                                 # [G]
    rng = mx - mn
    flat = rng == 0
    rng = torch.where(flat, torch.ones_like(rng), rng)
    sum_w, sum_x = w.sum(-1), (w * x).sum(-1)                       # [G]
    sum_wx2 = (w * x * x).sum(-1)
    # the first candidate: iscale = nmax / (max - min), scale = 1 / iscale, min as is
    iscale = nmax / rng
    scale = 1.0 / iscale
    L = torch.clamp(_round(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    wl = w * L
    s_l, s_l2, s_xl = wl.sum(-1), (wl * L).sum(-1), (wl * x).sum(-1)
    best = _sq_error(scale, mn, s_l, s_l2, s_xl, sum_w, sum_x, sum_wx2)
    best_iscale, best_shift = iscale.clone(), mn.clone()  # what produced L: L = round(iscale * (x - shift))
    cur_min = mn.clone()  # ggml updates `min` in place, so later candidates quantize x - (best min so far)
    la = torch.empty_like(x)
    wl = torch.empty_like(x)
    for k in range(nstep + 1):
        isc = float(f32(f32(rmin) + f32(rdelta) * f32(k)) + f32(nmax)) / rng     # [G]
        # la = clamp(round(isc * (x - cur_min)), 0, nmax), written in place: 3 passes, no allocation
        torch.addcmul((-cur_min * isc)[:, None], x, isc[:, None], out=la)
        la.round_().clamp_(0, nmax)
        torch.mul(w, la, out=wl)
        s_l = wl.sum(-1)
        s_l2 = torch.linalg.vecdot(wl, la)                          # sum w l^2
        s_xl = torch.linalg.vecdot(wl, x)                           # sum w l x
        D = sum_w * s_l2 - s_l * s_l
        ok = D > 0
        Dsafe = torch.where(ok, D, torch.ones_like(D))
        this_scale = (sum_w * s_xl - sum_x * s_l) / Dsafe
        this_min = (s_l2 * sum_x - s_l * s_xl) / Dsafe
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, s_xl / torch.where(s_l2 > 0, s_l2, torch.ones_like(s_l2)), this_scale)
        err = _sq_error(this_scale, this_min, s_l, s_l2, s_xl, sum_w, sum_x, sum_wx2)
        better = ok & (err < best)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        best_iscale = torch.where(better, isc, best_iscale)
        best_shift = torch.where(better, cur_min, best_shift)
        cur_min = torch.where(better, this_min, cur_min)
    L = torch.clamp(_round(best_iscale[:, None] * (x - best_shift[:, None])), 0, nmax)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    L = torch.where(flat[:, None], torch.zeros_like(L), L)
    the_min = torch.where(flat, -mn, -cur_min)
    return scale, the_min, L


def _sq_error(s, m, s_l, s_l2, s_xl, sum_w, sum_x, sum_wx2):
    """sum w (s L + m - x)^2 expanded: s^2 Swl2 + 2 s m Swl - 2 s Swlx + m^2 Sw - 2 m Swx + Swx2,
    in fp64 (per sub-block, cheap) so the cancellation costs no precision."""
    s, m = s.double(), m.double()
    return (s * s * s_l2.double() + 2 * s * m * s_l.double() - 2 * s * s_xl.double() + m * m * sum_w.double()
            - 2 * m * sum_x.double() + sum_wx2.double())


def make_qx_quants(x: torch.Tensor, nmax: int):
    """ggml's make_qx_quants(rmse_type=1) on every row of x [G, n]: a symmetric scale with
    L = clamp(round(iscale * x), -nmax, nmax - 1), iscale = -(nmax + 0.1 k) / max (max = the value of
    largest magnitude), k = 0, -9..9, weights x^2; the best by weighted least squares.
    Returns (scale [G] (signed), L + nmax [G, n])."""
    f32 = np.float32
    idx = x.abs().argmax(-1, keepdim=True)                          # first largest |x|, as ggml's strict '>'
    mx = torch.gather(x, -1, idx).squeeze(-1)                       # [G], signed
    zero = mx.abs() < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    w = x * x
    wx = w * x

    l = torch.empty_like(x)
    wl = torch.empty_like(x)

    def fit(iscale):
        torch.mul(x, iscale[:, None], out=l)
        l.round_().clamp_(-nmax, nmax - 1)
        torch.mul(w, l, out=wl)
        return torch.linalg.vecdot(wx, l), torch.linalg.vecdot(wl, l)  # sum w x l, sum w l^2

    iscale = -nmax / mx
    sumlx, suml2 = fit(iscale)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)), torch.zeros_like(suml2))
    best = scale * sumlx
    best_iscale = iscale
    for k in range(-9, 10):
        if k == 0:
            continue
        isc = -float(f32(nmax) + f32(0.1) * f32(k)) / mx
        slx, sl2 = fit(isc)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        sc = slx / torch.where(sl2 > 0, sl2, torch.ones_like(sl2))
        scale = torch.where(better, sc, scale)
        best = torch.where(better, sc * slx, best)
        best_iscale = torch.where(better, isc, best_iscale)
    L = torch.clamp(_round(best_iscale[:, None] * x), -nmax, nmax - 1) + nmax
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero[:, None], torch.zeros_like(L), L)
    return scale, L


def _superblocks(weight: torch.Tensor) -> torch.Tensor:
    w = weight.detach().float().reshape(-1)
    if weight.shape[-1] % QK_K:
        raise ValueError(f"K-quants need rows that are a multiple of {QK_K} values; this tensor's rows have {weight.shape[-1]}")
    return w.reshape(-1, QK_K)                                      # [B, 256]


def _pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """6-bit sc_j / m_j [B, 8] -> the 12 scale bytes of Q4_K/Q5_K (layout: module docstring)."""
    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    out = torch.empty(ls.shape[0], 12, dtype=torch.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def _quantize_k_asym(x: torch.Tensor, nmax: int, rmin: float, nstep: int):
    """The Q4_K / Q5_K body on super-blocks x [B, 256]: (d, dmin fp16 [B], ls, lm [B, 8], q [B, 256])."""
    B = x.shape[0]
    sub = x.reshape(B * 8, 32)                                      # [B*8, 32] sub-blocks
    av = torch.sqrt((sub * sub).sum(-1) / 32)                       # [B*8]
    w = av[:, None] + sub.abs()                                     # ggml's weights: rms + |x|
    scales, mins, L = make_qkx2_quants(sub, w, nmax, rmin, 0.1, nstep)
    scales, mins, L = scales.view(B, 8), mins.view(B, 8), L.view(B, 8, 32)
    max_scale = torch.clamp(scales.amax(-1), min=0.0)               # [B]
    max_min = torch.clamp(mins.amax(-1), min=0.0)
    inv_scale = torch.where(max_scale > 0, 63.0 / torch.where(max_scale > 0, max_scale, torch.ones_like(max_scale)), torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, 63.0 / torch.where(max_min > 0, max_min, torch.ones_like(max_min)), torch.zeros_like(max_min))
    ls = _as_uint8_min63(_round(inv_scale[:, None] * scales))      # [B, 8] 6-bit
    lm = _as_uint8_min63(_round(inv_min[:, None] * mins))
    d = _fp16(max_scale / 63.0)
    dmin = _fp16(max_min / 63.0)
    dj = d[:, None] * ls                                            # [B, 8]
    dm = dmin[:, None] * lm
    has = dj != 0
    q = torch.clamp(_round((x.view(B, 8, 32) + dm[..., None]) / torch.where(has, dj, torch.ones_like(dj))[..., None]), 0, nmax)
    q = torch.where(has[..., None], q, L)                           # ggml keeps the search's L where d_j == 0
    return d, dmin, ls, lm, q.reshape(B, QK_K).to(torch.uint8)


def _as_uint8_min63(v: torch.Tensor) -> torch.Tensor:
    """ggml's `uint8_t l = nearest_int(..); l = MIN(63, l)`: a negative value wraps modulo 256 first."""
    return torch.clamp(torch.where(v < 0, torch.remainder(v, 256), v), max=63)


def _q4_k_blocks(x: torch.Tensor) -> torch.Tensor:
    d, dmin, ls, lm, q = _quantize_k_asym(x, 15, -1.0, 20)
    B = x.shape[0]
    q = q.view(B, 4, 2, 32)                                         # [B, chunk, low/high half, 32]
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(B, 128)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_scales_k4(ls, lm), qs], dim=1)


def _q5_k_blocks(x: torch.Tensor) -> torch.Tensor:
    d, dmin, ls, lm, q = _quantize_k_asym(x, 31, -0.5, 15)
    B = x.shape[0]
    q = q.view(B, 4, 2, 32)                                         # [B, chunk c, half, 32]
    low = q & 0xF
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(B, 128)
    hi = (q >> 4).to(torch.int32)                                   # [B, 4, 2, 32] one bit each
    shift = (2 * torch.arange(4).view(1, 4, 1, 1) + torch.arange(2).view(1, 1, 2, 1))  # bit 2c + half
    qh = (hi << shift).sum(dim=(1, 2)).to(torch.uint8)              # [B, 32]
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_scales_k4(ls, lm), qh, qs], dim=1)


def _q6_k_blocks(x: torch.Tensor) -> torch.Tensor:
    B = x.shape[0]
    sub = x.reshape(B * 16, 16)                                     # [B*16, 16]
    scales, L = make_qx_quants(sub, 32)
    scales, L = scales.view(B, 16), L.view(B, 16, 16)
    idx = scales.abs().argmax(-1, keepdim=True)
    max_scale = torch.gather(scales, -1, idx).squeeze(-1)           # [B] signed, largest |scale|
    zero = max_scale.abs() < GROUP_MAX_EPS
    safe = torch.where(zero, torch.ones_like(max_scale), max_scale)
    iscale = -128.0 / safe
    d = _fp16(1.0 / iscale)
    sc = torch.clamp(_round(iscale[:, None] * scales), max=127)      # [B, 16] int8 range
    dj = d[:, None] * sc
    has = dj != 0
    q = torch.clamp(_round(x.view(B, 16, 16) / torch.where(has, dj, torch.ones_like(dj))[..., None]), -32, 31) + 32
    q = torch.where(has[..., None], q, L).reshape(B, QK_K)
    q = torch.where(zero[:, None], torch.zeros_like(q), q).to(torch.uint8)
    d = torch.where(zero, torch.zeros_like(d), d)
    sc = torch.where(zero[:, None], torch.zeros_like(sc), sc)
    q = q.view(B, 2, 4, 32)                                         # [B, half h, quarter, 32]
    low, hi = q & 0xF, q >> 4
    ql = torch.stack([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=2)  # [B, 2, 2, 32]
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)                     # [B, 2, 32]
    return torch.cat([ql.reshape(B, 128), qh.reshape(B, 64), sc.to(torch.int8).view(torch.uint8), _f16_bytes(d)], dim=1)


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    return v.half().view(torch.uint8).view(-1, 2)                   # [B] fp16 -> [B, 2] little-endian bytes


_BLOCKS = {"Q4_K": _q4_k_blocks, "Q5_K": _q5_k_blocks, "Q6_K": _q6_k_blocks}


@torch.no_grad()
def quantize(weight: torch.Tensor, qtype: str, workers: int | None = None) -> torch.Tensor:
    """`weight` [rows, cols] (any float dtype, cols % 256 == 0) -> uint8 [rows, cols / 256 * block
    bytes] in llama.cpp's `qtype` layout ("Q4_K", "Q5_K" or "Q6_K"), ready for GGUFWriter with
    raw_dtype. Chunks of _CHUNK values (small temporaries) go to `workers` threads (default: torch's
    thread count), each running single-threaded ops: on a busy machine torch's own intra-op
    threads spin-wait on each other and the many small ops here ran 10-20x slower."""
    if qtype not in _BLOCKS:
        raise ValueError(f"K-quant type {qtype!r} is not one lorakit writes; choose one of {sorted(_BLOCKS)}")
    rows = weight.shape[0] if weight.ndim > 1 else 1
    blocks = _superblocks(weight)                                   # [B, 256]
    step = max(1, _CHUNK // QK_K)
    out = torch.empty(blocks.shape[0], BLOCK_BYTES[qtype], dtype=torch.uint8)
    starts = range(0, blocks.shape[0], step)

    def run(i: int) -> None:
        out[i:i + step] = _BLOCKS[qtype](blocks[i:i + step])

    workers = workers or torch.get_num_threads()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if workers > 1 and len(starts) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(workers, len(starts))) as pool:
                list(pool.map(run, starts))
        else:
            for i in starts:
                run(i)
    finally:
        torch.set_num_threads(threads)
    return out.view(rows, -1)


@torch.no_grad()
def dequantize(data: torch.Tensor, qtype: str, shape: tuple) -> torch.Tensor:
    """The PyTorch decoder of the layouts above (the values llama.cpp computes): uint8 blocks ->
    fp32 `shape`. Tested against gguf-py's own decoder."""
    raw = data.reshape(-1, BLOCK_BYTES[qtype])
    B = raw.shape[0]
    if qtype == "Q6_K":
        ql, qh, sc = raw[:, :128].view(B, 2, 2, 32), raw[:, 128:192].view(B, 2, 32), raw[:, 192:208].view(torch.int8)
        d = raw[:, 208:210].contiguous().view(torch.float16).float()        # [B, 1]
        low = torch.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], dim=2)  # [B, 2, 4, 32]
        hi = torch.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=2)
        q = (low | (hi << 4)).float().reshape(B, 16, 16) - 32
        return (d[:, :, None] * sc.float()[:, :, None] * q).reshape(shape)
    d = raw[:, 0:2].contiguous().view(torch.float16).float()                # [B, 1]
    dmin = raw[:, 2:4].contiguous().view(torch.float16).float()
    s = raw[:, 4:16]
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], dim=1).float()  # [B, 8]
    m = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1).float()
    qs = raw[:, -128:].view(B, 4, 32)
    q = torch.stack([qs & 0xF, qs >> 4], dim=2)                             # [B, 4, 2, 32]
    if qtype == "Q5_K":
        qh = raw[:, 16:48]                                                  # [B, 32]
        bits = torch.stack([torch.stack([(qh >> (2 * c + h)) & 1 for h in range(2)], dim=1) for c in range(4)], dim=1)
        q = q | (bits << 4)
    q = q.float().reshape(B, 8, 32)
    return (d[:, :, None] * sc[:, :, None] * q - dmin[:, :, None] * m[:, :, None]).reshape(shape)

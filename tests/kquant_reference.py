"""ggml's reference K-quantizers (ggml/src/ggml-quants.c: make_qkx2_quants, make_qx_quants,
quantize_row_q4_K_ref / q5_K_ref / q6_K_ref) transliterated loop for loop in float32 scalars: the
slow reference that lorakit's vectorised quantizer (lorakit/export/kquants.py) is checked against.
One super-block of 256 values at a time; returns the block's bytes (numpy uint8)."""

import numpy as np

F = np.float32
QK_K = 256


def nearest_int(v):
    return int(np.rint(F(v)))  # ggml: round half to even (the FPU's mode)


def fp16(v):
    return np.float16(F(v))


def make_qkx2_quants(n, nmax, x, weights, rmin, rdelta, nstep, use_mad=False):
    L = [0] * n
    mn, mx = F(x[0]), F(x[0])
    sum_w = F(weights[0])
    sum_x = F(sum_w * x[0])
    for i in range(1, n):
        mn = min(mn, F(x[i]))
        mx = max(mx, F(x[i]))
        sum_w = F(sum_w + weights[i])
        sum_x = F(sum_x + F(weights[i] * x[i]))
    if mn > 0:
        mn = F(0)
    if mx == mn:
        return F(0), F(-mn), [0] * n
    iscale = F(F(nmax) / F(mx - mn))
    scale = F(F(1) / iscale)
    best_error = F(0)
    for i in range(n):
        l = max(0, min(nmax, nearest_int(iscale * F(x[i] - mn))))
        L[i] = l
        diff = F(F(scale * F(l)) + mn) - F(x[i])
        best_error = F(best_error + F(weights[i]) * F(diff * diff))
    for k in range(nstep + 1):
        iscale = F(F(F(F(rmin) + F(F(rdelta) * F(k))) + F(nmax)) / F(mx - mn))
        sum_l = sum_l2 = sum_xl = F(0)
        laux = [0] * n
        for i in range(n):
            l = max(0, min(nmax, nearest_int(iscale * F(x[i] - mn))))
            laux[i] = l
            w = F(weights[i])
            sum_l = F(sum_l + F(w * F(l)))
            sum_l2 = F(sum_l2 + F(F(w * F(l)) * F(l)))
            sum_xl = F(sum_xl + F(F(w * F(l)) * F(x[i])))
        D = F(F(sum_w * sum_l2) - F(sum_l * sum_l))
        if D > 0:
            this_scale = F(F(F(sum_w * sum_xl) - F(sum_x * sum_l)) / D)
            this_min = F(F(F(sum_l2 * sum_x) - F(sum_l * sum_xl)) / D)
            if this_min > 0:
                this_min = F(0)
                this_scale = F(sum_xl / sum_l2)
            cur = F(0)
            for i in range(n):
                diff = F(F(F(this_scale * F(laux[i])) + this_min) - F(x[i]))
                cur = F(cur + F(F(weights[i]) * F(diff * diff)))
            if cur < best_error:
                L, best_error, scale, mn = list(laux), cur, this_scale, this_min
    return scale, F(-mn), L


def make_qx_quants(n, nmax, x):
    """rmse_type = 1, no importance weights (what quantize_row_q6_K_ref calls)."""
    amax, mx = F(0), F(0)
    for i in range(n):
        if abs(F(x[i])) > amax:
            amax, mx = abs(F(x[i])), F(x[i])
    if amax < F(1e-15):
        return F(0), [0] * n
    iscale = F(F(-nmax) / mx)
    L = [0] * n
    sumlx = suml2 = F(0)
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nearest_int(iscale * F(x[i]))))
        L[i] = l + nmax
        w = F(F(x[i]) * F(x[i]))
        sumlx = F(sumlx + F(F(w * F(x[i])) * F(l)))
        suml2 = F(suml2 + F(F(w * F(l)) * F(l)))
    scale = F(sumlx / suml2) if suml2 else F(0)
    best = F(scale * sumlx)
    for k in range(-9, 10):
        if k == 0:
            continue
        iscale = F(F(-F(F(nmax) + F(F(0.1) * F(k)))) / mx)
        sumlx = suml2 = F(0)
        for i in range(n):
            l = max(-nmax, min(nmax - 1, nearest_int(iscale * F(x[i]))))
            w = F(F(x[i]) * F(x[i]))
            sumlx = F(sumlx + F(F(w * F(x[i])) * F(l)))
            suml2 = F(suml2 + F(F(w * F(l)) * F(l)))
        if suml2 > 0 and F(sumlx * sumlx) > F(best * suml2):
            for i in range(n):
                L[i] = nmax + max(-nmax, min(nmax - 1, nearest_int(iscale * F(x[i]))))
            scale = F(sumlx / suml2)
            best = F(scale * sumlx)
    return scale, L


def _k4_scales(ls, lm):
    s = [0] * 12
    for j in range(8):
        if j < 4:
            s[j] = ls[j]
            s[j + 4] = lm[j]
        else:
            s[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            s[j - 4] |= (ls[j] >> 4) << 6
            s[j] |= (lm[j] >> 4) << 6
    return s


def _k4_body(x, nmax, rmin, nstep):
    scales, mins, L = [], [], []
    for j in range(8):
        sub = [F(v) for v in x[32 * j: 32 * j + 32]]
        sum_x2 = F(0)
        for v in sub:
            sum_x2 = F(sum_x2 + F(v * v))
        av = F(np.sqrt(F(sum_x2 / F(32))))
        w = [F(av + abs(v)) for v in sub]
        sc, m, l = make_qkx2_quants(32, nmax, sub, w, rmin, 0.1, nstep)
        scales.append(sc)
        mins.append(m)
        L += l
    max_scale = max([F(0)] + scales)
    max_min = max([F(0)] + mins)
    inv_scale = F(F(63) / max_scale) if max_scale > 0 else F(0)
    inv_min = F(F(63) / max_min) if max_min > 0 else F(0)
    ls = [min(63, nearest_int(inv_scale * s) % 256) for s in scales]
    lm = [min(63, nearest_int(inv_min * m) % 256) for m in mins]
    d, dmin = fp16(max_scale / F(63)), fp16(max_min / F(63))
    for j in range(8):
        dj = F(F(d) * F(ls[j]))
        if not dj:
            continue
        dm = F(F(dmin) * F(lm[j]))
        for i in range(32):
            L[32 * j + i] = max(0, min(nmax, nearest_int(F(F(x[32 * j + i]) + dm) / dj)))
    return d, dmin, _k4_scales(ls, lm), L


def q4_k_block(x):
    d, dmin, scales, L = _k4_body(x, 15, -1.0, 20)
    qs = []
    for j in range(0, QK_K, 64):
        qs += [L[j + l] | (L[j + l + 32] << 4) for l in range(32)]
    return np.concatenate([np.array([d, dmin], np.float16).view(np.uint8), np.array(scales + qs, np.uint8)])


def q5_k_block(x):
    d, dmin, scales, L = _k4_body(x, 31, -0.5, 15)
    qh, ql = [0] * 32, []
    m1, m2 = 1, 2
    for n in range(0, QK_K, 64):
        for j in range(32):
            l1, l2 = L[n + j], L[n + j + 32]
            if l1 > 15:
                l1 -= 16
                qh[j] |= m1
            if l2 > 15:
                l2 -= 16
                qh[j] |= m2
            ql.append(l1 | (l2 << 4))
        m1 <<= 2
        m2 <<= 2
    return np.concatenate([np.array([d, dmin], np.float16).view(np.uint8), np.array(scales + qh + ql, np.uint8)])


def q6_k_block(x):
    scales, L = [], []
    for ib in range(16):
        sc, l = make_qx_quants(16, 32, x[16 * ib: 16 * ib + 16])
        scales.append(sc)
        L += l
    max_scale, max_abs = F(0), F(0)
    for s in scales:
        if abs(s) > max_abs:
            max_abs, max_scale = abs(s), s
    if max_abs < F(1e-15):
        return np.zeros(210, np.uint8)
    iscale = F(F(-128) / max_scale)
    d = fp16(F(1) / iscale)
    sc = [min(127, nearest_int(iscale * s)) for s in scales]
    for j in range(16):
        dj = F(F(d) * F(sc[j]))
        if not dj:
            continue
        for i in range(16):
            L[16 * j + i] = max(-32, min(31, nearest_int(F(x[16 * j + i]) / dj))) + 32
    ql, qh = [0] * 128, [0] * 64
    for h, j in enumerate(range(0, QK_K, 128)):
        for l in range(32):
            q1, q2, q3, q4 = (L[j + l + o] & 0xF for o in (0, 32, 64, 96))
            ql[64 * h + l] = q1 | (q3 << 4)
            ql[64 * h + l + 32] = q2 | (q4 << 4)
            qh[32 * h + l] = (L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6)
    return np.concatenate([np.array(ql + qh, np.uint8), np.array(sc, np.int8).view(np.uint8),
                           np.array([d], np.float16).view(np.uint8)])


BLOCKS = {"Q4_K": q4_k_block, "Q5_K": q5_k_block, "Q6_K": q6_k_block}


def quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    """x: float32, size a multiple of 256 -> uint8 [n_blocks, block bytes]."""
    x = np.asarray(x, np.float32).reshape(-1, QK_K)
    return np.stack([BLOCKS[qtype](list(b)) for b in x])

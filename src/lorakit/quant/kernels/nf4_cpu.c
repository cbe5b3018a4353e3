/* lorakit: CPU kernels for 4-bit (NF4 / FP4) blockwise dequantization and quantization.
 *
 * Built on first use by lorakit/quant/kernels/cpu.py (cc -O3 -march=native -ffp-contract=off
 * -fopenmp) and called through ctypes. Every result is bit-identical to the PyTorch reference in
 * lorakit/quant/nf4.py: the same fp32 operations in the same order, no fused multiply-add
 * (-ffp-contract=off), no fast-math, and fp32 -> bf16 rounding done exactly as PyTorch does it
 * (round to nearest even; NaN -> 0x7FC0).
 *
 * Packed layout (see nf4.py): byte j holds element 2j in bits 7..4 and element 2j+1 in bits 3..0.
 * Block b covers elements [b*blocksize, (b+1)*blocksize); blocksize is a multiple of 32.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LK_AVX512 1
#endif

static inline uint16_t f32_to_bf16(float f) {
    /* c10::BFloat16's round_to_nearest_even */
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

#ifdef LK_AVX512
/* bf16(code[k] * scale) for k < 16 in the low 16 words of the result, rounded as f32_to_bf16 */
static inline __m512i table_bf16(const float* code, float scale) {
    __m512 v = _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(scale));
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_castsi256_si512(_mm512_cvtepi32_epi16(r));
}
#endif

/* out[i] = bf16(code[idx[i]] * scale) for the 2*nbytes elements held in src; returns nothing. */
static void block_bf16(const uint8_t* src, int64_t nbytes, const float* code, float scale, uint16_t* dst) {
    int64_t j = 0;
#ifdef LK_AVX512
    __m512i tab = table_bf16(code, scale);
    __m512i low4 = _mm512_set1_epi32(0xF);
    for (; j + 16 <= nbytes; j += 16) {
        __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(src + j)));   /* 16 x u32 */
        /* 32 x u16 indices: lane 2j = byte >> 4 (element 2j), lane 2j+1 = byte & 15 */
        __m512i idx = _mm512_or_si512(_mm512_srli_epi32(x, 4), _mm512_slli_epi32(_mm512_and_si512(x, low4), 16));
        _mm512_storeu_si512((void*)(dst + 2 * j), _mm512_permutexvar_epi16(idx, tab));
    }
    if (j == nbytes) return;
#endif
    uint16_t table[16];
    for (int k = 0; k < 16; k++) table[k] = f32_to_bf16(code[k] * scale);
    for (; j < nbytes; j++) {
        uint8_t v = src[j];
        dst[2 * j] = table[v >> 4];
        dst[2 * j + 1] = table[v & 15];
    }
}

static void block_f32(const uint8_t* src, int64_t nbytes, const float* code, float scale, float* dst) {
    int64_t j = 0;
#ifdef LK_AVX512
    __m512 tab = _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(scale));
    __m512i low4 = _mm512_set1_epi32(0xF);
    for (; j + 8 <= nbytes; j += 8) {
        /* 16 x u32 indices from 8 bytes: lane 2j = byte j >> 4, lane 2j+1 = byte j & 15 */
        __m512i x = _mm512_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(src + j)));  /* lanes 0..7 used */
        __m512i hi = _mm512_srli_epi32(x, 4), lo = _mm512_and_si512(x, low4);
        __m512i idx = _mm512_permutex2var_epi32(
            hi, _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0), lo);
        _mm512_storeu_ps(dst + 2 * j, _mm512_permutexvar_ps(idx, tab));
    }
    if (j == nbytes) return;
#endif
    float table[16];
    for (int k = 0; k < 16; k++) table[k] = code[k] * scale;
    for (; j < nbytes; j++) {
        uint8_t v = src[j];
        dst[2 * j] = table[v >> 4];
        dst[2 * j + 1] = table[v & 15];
    }
}

/* Dequantize n elements (n even, n_blocks = ceil(n / blocksize)); out_bf16 or out_f32 is written.
 * The scale of block b is absmax[b] (stored fp32) or, double-quantized,
 * code2[codes[b]] * absmax2[b / blocksize2] + offset (two separate fp32 roundings). Blocks are
 * walked in groups of blocksize2 (256 without double quantization) that share absmax2[group]. */
int lk_dequantize_4bit(const uint8_t* packed, int64_t n, int64_t blocksize, const float* code,
                       const float* absmax, const uint8_t* codes, const float* absmax2, const float* code2,
                       float offset, int64_t blocksize2, uint16_t* out_bf16, float* out_f32, int nthreads) {
    if (n % 2 || blocksize % 32 || (codes != NULL && blocksize2 < 1)) return 1;
    int64_t n_blocks = (n + blocksize - 1) / blocksize;
    int64_t group = codes != NULL ? blocksize2 : 256;
    int64_t n_groups = (n_blocks + group - 1) / group;
    (void)nthreads;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1 && n_blocks > 1024)
    for (int64_t g = 0; g < n_groups; g++) {
        float scale2 = codes != NULL ? absmax2[g] : 0.0f;
        int64_t last = (g + 1) * group < n_blocks ? (g + 1) * group : n_blocks;
        for (int64_t b = g * group; b < last; b++) {
            float scale = codes != NULL ? code2[codes[b]] * scale2 + offset : absmax[b];
            int64_t start = b * blocksize, len = n - start < blocksize ? n - start : blocksize;
            if (out_bf16) block_bf16(packed + start / 2, len / 2, code, scale, out_bf16 + start);
            else block_f32(packed + start / 2, len / 2, code, scale, out_f32 + start);
        }
    }
    return 0;
}

/* index of the code value nearest to v: order[number of midpoints < v] (ties go to the lower) */
static inline uint8_t nearest(float v, const float* mid, const uint8_t* order) {
    int c = 0;
    for (int k = 0; k < 15; k++) c += mid[k] < v;
    return order[c];
}

/* idx[i] = nearest(clamp(buf[i] * inv, -1, 1)) for a full block (len a multiple of 16) */
static void full_block_indices(const float* buf, int64_t len, float inv, const float* mid, const uint8_t* order,
                               uint8_t* idx) {
    int64_t i = 0;
#ifdef LK_AVX512
    int32_t order32[16];
    for (int k = 0; k < 16; k++) order32[k] = order[k];
    __m512i ord = _mm512_loadu_si512((const void*)order32), one = _mm512_set1_epi32(1);
    __m512 vinv = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-1.0f), hi = _mm512_set1_ps(1.0f);
    for (; i + 16 <= len; i += 16) {
        __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(buf + i), vinv), lo), hi);
        __m512i count = _mm512_setzero_si512();
        for (int k = 0; k < 15; k++) {
            __mmask16 below = _mm512_cmp_ps_mask(_mm512_set1_ps(mid[k]), v, _CMP_LT_OQ);
            count = _mm512_mask_add_epi32(count, below, count, one);
        }
        _mm_storeu_si128((__m128i*)(idx + i), _mm512_cvtepi32_epi8(_mm512_permutexvar_epi32(count, ord)));
    }
#endif
    for (; i < len; i++) {
        float v = buf[i] * inv;
        v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
        idx[i] = nearest(v, mid, order);
    }
}

/* max |buf[i]| (inputs are finite; a NaN is ignored here where torch.amax would propagate it) */
static float block_absmax(const float* buf, int64_t len) {
    float amax = 0.0f;
    int64_t i = 0;
#ifdef LK_AVX512
    __m512 m = _mm512_setzero_ps();
    for (; i + 16 <= len; i += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(buf + i)));
    amax = _mm512_reduce_max_ps(m);
#endif
    for (; i < len; i++) {
        float a = fabsf(buf[i]);
        amax = a > amax ? a : amax; /* not fmaxf: that is a libm call without -ffast-math */
    }
    return amax;
}

/* Quantize n elements of x (fp32 x32 or bf16 x16) into packed[(n+1)/2] and absmax[n_blocks],
 * with bitsandbytes' rounding as nf4.py documents it: full blocks scale by x * (1 / absmax),
 * a partial last block by x / max(absmax, 1e-38) and stores that clamped absmax; then clamp to
 * [-1, 1]; an odd n pads the last low nibble with the index of 0.0. */
int lk_quantize_4bit(const float* x32, const uint16_t* x16, int64_t n, int64_t blocksize, const float* mid,
                     const uint8_t* order, uint8_t* packed, float* absmax, int nthreads) {
    if (blocksize % 2 || blocksize > 4096) return 1;
    int64_t n_blocks = (n + blocksize - 1) / blocksize;
    (void)nthreads;
#pragma omp parallel for schedule(dynamic, 64) num_threads(nthreads) if (nthreads > 1 && n_blocks > 256)
    for (int64_t b = 0; b < n_blocks; b++) {
        int64_t start = b * blocksize, len = n - start < blocksize ? n - start : blocksize;
        float buf[4096];
        uint8_t idx[4096 + 1];
        if (x32) {
            memcpy(buf, x32 + start, len * sizeof(float));
        } else {
            for (int64_t i = 0; i < len; i++) {
                uint32_t u = (uint32_t)x16[start + i] << 16; /* bf16 -> fp32 is exact */
                memcpy(buf + i, &u, 4);
            }
        }
        float amax = block_absmax(buf, len);
        float tiny = 1e-38f;
        float clamped = amax > tiny ? amax : tiny;
        if (len == blocksize) {
            absmax[b] = amax;
            full_block_indices(buf, len, 1.0f / clamped, mid, order, idx);
        } else {
            absmax[b] = clamped;
            for (int64_t i = 0; i < len; i++) {
                float v = buf[i] / clamped;
                v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
                idx[i] = nearest(v, mid, order);
            }
            if (len % 2) idx[len] = nearest(0.0f, mid, order);
        }
        for (int64_t j = 0; j < (len + 1) / 2; j++) packed[start / 2 + j] = (uint8_t)((idx[2 * j] << 4) | idx[2 * j + 1]);
    }
    return 0;
}

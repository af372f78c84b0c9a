/* strata's CPU matmuls on packed quantized weights: y = x @ W^T, x [M, K] and y [M, N] float32,
 * row-major and contiguous (the Python wrappers in cpu_quant.py check this).
 *
 * w4: W [N, K] as 4-bit codes in groups of 32 along K, w = q * scale + min. qweight [N, K/2]: each
 *     block of 64 codes (two groups) is 8 little-endian 32-bit words, word L's nibble s (bits 4s..4s+3)
 *     holding code 8s + L of the block; where K is an odd number of groups, the last group is 4
 *     words, word L's nibble s holding code 4s + L. So 8 consecutive codes sit in one nibble of 8
 *     words: a 256-bit load, one mask (or shift) and a conversion give 8 floats, without the byte
 *     shuffles of GGML's byte order. scale_min [N, K/32, 2] float32.
 * w8: W [N, K] as int8 codes in groups of `group` (a multiple of 8) along K, w = q * scale;
 *     scales [N, K/group] float32.
 *
 * The matmuls are for decode-sized M: each weight row is unpacked once into registers and used
 * for every row of x. For 1-3 rows of x the scale multiplies a group's partial dot product and the
 * min the group's sum of x; the codes are masked in place (code * 16^s, exact in float) and
 * multiplied by x scaled by 16^-s beforehand (exact: a power of two), which gives the very
 * products code * x without a shift per 8 codes. From 4 rows on, each group is dequantized once
 * as the reference does (q * scale, then + min) and multiplies every row. Rows of W are split
 * over OpenMP threads; built against torch's own libgomp (same soname), so one thread pool.
 * The dequantizers give q * scale + min rounded exactly as the torch reference (mul, then add:
 * the file is compiled with -ffp-contract=off), for the tiled path of larger M.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define STRATA_AVX2 1
#endif

#define ROWS_PER_PASS 4   /* rows of x sharing one unpacked weight row: accumulators fit in registers */
#ifndef W4_BLOCK_MIN_ROWS
#ifdef STRATA_AVX2
#define W4_BLOCK_MIN_ROWS 4   /* from this many rows of x, w4 uses w4_block */
#else
#define W4_BLOCK_MIN_ROWS ((int64_t)1 << 40)   /* no w4_block: the row kernel takes every m */
#endif
#endif
#ifndef W8_BLOCK_MIN_ROWS
#define W8_BLOCK_MIN_ROWS 8   /* and w8 w8_block: at 4 rows w8_rows was faster (one thread, CPU time) */
#endif

/* Where code j of a packed w4 row sits (see the layout above): its 32-bit word and nibble. */
static inline void w4_place(int64_t k, int64_t j, int64_t *word, int *nibble) {
    int64_t full = k - k % 64;
    if (j < full) {
        *word = j / 64 * 8 + j % 8;
        *nibble = (int)(j % 64 / 8);
    } else {
        *word = full / 8 + (j - full) % 4;
        *nibble = (int)((j - full) / 4);
    }
}

/* The nibble slot x[j] meets in the row kernels (0: no scaling; the last group of an odd count and
 * the top nibble of a block are shifted out instead of masked in place). */
static inline int w4_scaled_slot(int64_t k, int64_t j) {
    int64_t word;
    int nibble;
    w4_place(k, j, &word, &nibble);
    return j < k - k % 64 && nibble < 7 ? nibble : 0;
}

/* Where the scaled x starts in prep: on a 64-byte boundary (from an aligned prep), so that no
 * 32-byte load of it straddles two cache lines. */
static inline int64_t w4_xs_at(int64_t m, int64_t k) {
    return (m * (k / 16) + 15) / 16 * 16;
}

/* prep's size in floats, a multiple of 16 (so per-thread buffers laid end to end stay aligned). */
int64_t strata_w4_prep_floats(int64_t m, int64_t k) {
    return (w4_xs_at(m, k) + (m < W4_BLOCK_MIN_ROWS ? m * k : 0) + 15) / 16 * 16;
}

/* What the w4 row kernels need besides x, for x [m, k]: the sum of each group of 32 of x at the
 * odd places of [m, k/16] (zeros at the even ones: one dot product with a row's (scale, min)
 * pairs gives its min term), then, from w4_xs_at(m, k), x scaled by 16^-s for the nibble s it
 * meets ([m, k]): an exact power-of-two scaling. prep holds strata_w4_prep_floats(m, k) floats;
 * the blocked kernels (m >= W4_BLOCK_MIN_ROWS) need none of it. */
void strata_w4_prepare(const float *x, int64_t m, int64_t k, float *prep) {
    static const float pow16[8] = {1.f, 0x1p-4f, 0x1p-8f, 0x1p-12f, 0x1p-16f, 0x1p-20f, 0x1p-24f, 1.f};
    if (m >= W4_BLOCK_MIN_ROWS) return;
    for (int64_t i = 0; i < m; i++)
        for (int64_t g = 0; g < k / 32; g++) {
            float s = 0.f;
            for (int j = 0; j < 32; j++) s += x[i * k + g * 32 + j];
            prep[i * (k / 16) + 2 * g] = 0.f;
            prep[i * (k / 16) + 2 * g + 1] = s;
        }
    float *xs = prep + w4_xs_at(m, k);
    for (int64_t j = 0; j < k; j++) {
        float f = pow16[w4_scaled_slot(k, j)];
        for (int64_t i = 0; i < m; i++) xs[i * k + j] = x[i * k + j] * f;
    }
}

#ifdef STRATA_AVX2
/* The one-row kernels (a single stream's step) stream W from memory and do little work per byte,
 * so the hardware prefetcher alone leaves them waiting on memory at each new stretch of rows: they
 * ask for the bytes this far ahead of the ones they read. The stretch past a thread's share (or the
 * array's end) is harmless: a prefetch never faults. */
#ifndef STREAM_PREFETCH
#define STREAM_PREFETCH 1024
#endif
static inline void prefetch_ahead(const void *p) {
    _mm_prefetch((const char *)p + STREAM_PREFETCH, _MM_HINT_T0);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* Codes 4s..4s+3 and 4s+4..4s+7 of a last odd group (its 16 bytes in both halves of v): 8 codes. */
static inline __m256i w4_tail_codes(__m256i v, int s) {
    return _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(4 * s, 4 * s, 4 * s, 4 * s, 4 * s + 4, 4 * s + 4,
                                                                    4 * s + 4, 4 * s + 4)),
                            _mm256_set1_epi32(0x0F));
}

/* The pieces of the row kernels below, shared so that every 4-bit row kernel computes a row's
 * dot product with the same operations in the same order. */

/* Nibble n of every word of v masked in place: code * 16^n as a float, exactly (nibble 7 is
 * shifted down instead: in place it would reach the sign bit of the int32 conversion). */
static inline __m256 w4_masked(__m256i v, int n) {
    return _mm256_cvtepi32_ps(n == 7 ? _mm256_srli_epi32(v, 28) : _mm256_and_si256(v, _mm256_set1_epi32(0x0F << (4 * n))));
}

/* A last odd group's 32 codes, shifted down, as 4 vectors of 8 (q: its 16 bytes). */
static inline void w4_tail_group(const uint8_t *q, __m256 c[4]) {
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)q));
    for (int n = 0; n < 4; n++) c[n] = _mm256_cvtepi32_ps(w4_tail_codes(v, 2 * n));
}

/* acc + (x . c over one group of 32, in two chains) * scale; x0..x3: the group's 32 values of x. */
static inline __m256 w4_group(__m256 acc, __m256 x0, __m256 x1, __m256 x2, __m256 x3, const __m256 c[4],
                              __m256 scale) {
    __m256 t0 = _mm256_mul_ps(x0, c[0]), t1 = _mm256_mul_ps(x1, c[1]);
    t0 = _mm256_fmadd_ps(x2, c[2], t0);
    t1 = _mm256_fmadd_ps(x3, c[3], t1);
    return _mm256_fmadd_ps(_mm256_add_ps(t0, t1), scale, acc);
}

static inline __m256 w4_group_at(__m256 acc, const float *xg, const __m256 c[4], __m256 scale) {
    return w4_group(acc, _mm256_loadu_ps(xg), _mm256_loadu_ps(xg + 8), _mm256_loadu_ps(xg + 16),
                    _mm256_loadu_ps(xg + 24), c, scale);
}

/* The row's sum: acc plus its min terms, (scale, min) pairs against (0, group sum of x) pairs. */
static inline float w4_row_sum(__m256 acc, const float *sm, const float *xsum, int64_t pairs) {
    const int64_t tail = pairs % 8;
    int64_t c = 0;
    for (; c + 8 <= pairs; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(sm + c), _mm256_loadu_ps(xsum + c), acc);
    if (tail) {
        const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)tail), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        acc = _mm256_fmadd_ps(_mm256_maskload_ps(sm + c, mask), _mm256_maskload_ps(xsum + c, mask), acc);
    }
    return hsum(acc);
}

/* ROWS is a constant at every call (w4_row's switch), so the loops over it unroll and the
 * accumulators stay in registers. xs: x scaled as strata_w4_prepare does; codes masked in place
 * (nibble s: code * 16^s as a float, exactly) times xs are exactly code * x. */
static inline __attribute__((always_inline)) void
w4_rows(const int ROWS, const float *xs, const float *xsum, int64_t k, const uint8_t *q,
        const float *sm, float *y, int64_t n_total) {
    const int64_t groups = k / 32, blocks = k / 64;
    __m256 acc[ROWS_PER_PASS];
    for (int i = 0; i < ROWS; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t blk = 0; blk < blocks; blk++) {
        prefetch_ahead(q + 32 * blk);
        if (blk % 4 == 0) prefetch_ahead(sm + 4 * blk);
        __m256i v = _mm256_loadu_si256((const __m256i *)(q + 32 * blk));
        __m256 c[8];
        for (int n = 0; n < 8; n++) c[n] = w4_masked(v, n);
        for (int h = 0; h < 2; h++) {   /* the block's two groups */
            __m256 scale = _mm256_set1_ps(sm[4 * blk + 2 * h]);
            for (int i = 0; i < ROWS; i++) acc[i] = w4_group_at(acc[i], xs + i * k + 64 * blk + 32 * h, c + 4 * h, scale);
        }
    }
    if (groups % 2) {   /* the last group of an odd count: codes shifted down, xs unscaled there */
        __m256 c[4];
        w4_tail_group(q + 32 * blocks, c);
        __m256 scale = _mm256_set1_ps(sm[2 * (groups - 1)]);
        for (int i = 0; i < ROWS; i++) acc[i] = w4_group_at(acc[i], xs + i * k + 64 * blocks, c, scale);
    }
    for (int i = 0; i < ROWS; i++) y[i * n_total] = w4_row_sum(acc[i], sm, xsum + i * 2 * groups, 2 * groups);
}

static void w4_row(const float *xs, const float *xsum, int64_t rows, int64_t k, const uint8_t *q,
                   const float *sm, float *y, int64_t n_total) {
    switch (rows) {
    case 1: w4_rows(1, xs, xsum, k, q, sm, y, n_total); break;
    case 2: w4_rows(2, xs, xsum, k, q, sm, y, n_total); break;
    default: w4_rows(3, xs, xsum, k, q, sm, y, n_total); break;
    }
}

/* One row of x against two rows of W (a single stream's step): each load of x serves both rows,
 * and each row's arithmetic is w4_rows(1)'s. q, sm: the first row's. */
static void w4_one_row_pair(const float *xs, const float *xsum, int64_t k, const uint8_t *q, const float *sm,
                            float *y) {
    const int64_t groups = k / 32, blocks = k / 64, half = k / 2;
    const float *sm1 = sm + k / 16;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t blk = 0; blk < blocks; blk++) {
        prefetch_ahead(q + 32 * blk);
        prefetch_ahead(q + half + 32 * blk);
        if (blk % 4 == 0) prefetch_ahead(sm + 4 * blk);
        const __m256i v0 = _mm256_loadu_si256((const __m256i *)(q + 32 * blk));
        const __m256i v1 = _mm256_loadu_si256((const __m256i *)(q + half + 32 * blk));
        #pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            const float *xg = xs + 64 * blk + 32 * h;
            const __m256 x0 = _mm256_loadu_ps(xg), x1 = _mm256_loadu_ps(xg + 8);
            const __m256 x2 = _mm256_loadu_ps(xg + 16), x3 = _mm256_loadu_ps(xg + 24);
            __m256 c[4];
            for (int n = 0; n < 4; n++) c[n] = w4_masked(v0, 4 * h + n);
            acc0 = w4_group(acc0, x0, x1, x2, x3, c, _mm256_set1_ps(sm[4 * blk + 2 * h]));
            for (int n = 0; n < 4; n++) c[n] = w4_masked(v1, 4 * h + n);
            acc1 = w4_group(acc1, x0, x1, x2, x3, c, _mm256_set1_ps(sm1[4 * blk + 2 * h]));
        }
    }
    if (groups % 2) {   /* the last group of an odd count, as in w4_rows */
        __m256 c[4];
        w4_tail_group(q + 32 * blocks, c);
        acc0 = w4_group_at(acc0, xs + 64 * blocks, c, _mm256_set1_ps(sm[2 * (groups - 1)]));
        w4_tail_group(q + half + 32 * blocks, c);
        acc1 = w4_group_at(acc1, xs + 64 * blocks, c, _mm256_set1_ps(sm1[2 * (groups - 1)]));
    }
    y[0] = w4_row_sum(acc0, sm, xsum, 2 * groups);
    y[1] = w4_row_sum(acc1, sm1, xsum, 2 * groups);
}
#define HAVE_W4_ONE_ROW_PAIR 1

/* 8 dequantized weights: codes (as int32) * scale, then + min, as the reference rounds them. */
static inline __m256 w4_dequant8(__m256i codes, __m256 scale, __m256 min) {
    return _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(codes), scale), min);
}

/* Nibble n of every word of v: 8 consecutive codes of a block. */
static inline __m256i w4_nibble(__m256i v, int n) {
    return n == 7 ? _mm256_srli_epi32(v, 28) : _mm256_and_si256(_mm256_srli_epi32(v, 4 * n), _mm256_set1_epi32(0x0F));
}

/* Batches (4 rows of x and more): each group of W is dequantized once in registers, exactly as
 * the reference dequantizes it (q * scale, then + min), and multiplies up to BLOCK_ROWS rows of x:
 * four FMAs per row per group, against five operations and a scalar min term per row per group
 * in w4_rows. A different summation order from w4_rows, so the two agree to rounding. */
#define BLOCK_ROWS 8

/* The blocked kernels take their count of x rows (1..BLOCK_ROWS) as a constant, so that their
 * loops over it unroll and the accumulators stay in registers: one call per count. */
#define CALL_WITH_ROWS(rows, KERNEL, ...)                            \
    switch (rows) {                                                  \
    case 1: KERNEL(1, __VA_ARGS__); break;                           \
    case 2: KERNEL(2, __VA_ARGS__); break;                           \
    case 3: KERNEL(3, __VA_ARGS__); break;                           \
    case 4: KERNEL(4, __VA_ARGS__); break;                           \
    case 5: KERNEL(5, __VA_ARGS__); break;                           \
    case 6: KERNEL(6, __VA_ARGS__); break;                           \
    case 7: KERNEL(7, __VA_ARGS__); break;                           \
    default: KERNEL(BLOCK_ROWS, __VA_ARGS__); break;                 \
    }
static inline __attribute__((always_inline)) void
w4_block(const int ROWS, const float *x, int64_t k, const uint8_t *q, const float *sm, float *y,
         int64_t n_total) {
    const int64_t groups = k / 32, blocks = k / 64;
    __m256 acc[BLOCK_ROWS];
    for (int i = 0; i < ROWS; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t blk = 0; blk < blocks; blk++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(q + 32 * blk));
        #pragma GCC unroll 8   /* constant shifts and group offsets: GCC kept n as a loop counter */
        for (int n = 0; n < 8; n++) {
            const float *params = sm + 4 * blk + 2 * (n / 4);
            __m256 w = w4_dequant8(w4_nibble(v, n), _mm256_set1_ps(params[0]), _mm256_set1_ps(params[1]));
            for (int i = 0; i < ROWS; i++)
                acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * k + 64 * blk + 8 * n), w, acc[i]);
        }
    }
    if (groups % 2) {
        __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(q + 32 * blocks)));
        __m256 scale = _mm256_set1_ps(sm[2 * (groups - 1)]), min = _mm256_set1_ps(sm[2 * (groups - 1) + 1]);
        for (int n = 0; n < 4; n++) {
            __m256 w = w4_dequant8(w4_tail_codes(v, 2 * n), scale, min);
            for (int i = 0; i < ROWS; i++)
                acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * k + 64 * blocks + 8 * n), w, acc[i]);
        }
    }
    for (int i = 0; i < ROWS; i++) y[i * n_total] = hsum(acc[i]);
}

static void w4_block_rows(const float *x, int64_t rows, int64_t k, const uint8_t *q, const float *sm,
                          float *y, int64_t n_total) {
    CALL_WITH_ROWS(rows, w4_block, x, k, q, sm, y, n_total)
}
#define HAVE_W4_BLOCK 1

#ifdef __AVX512VL__
/* Two rows of W at once (decode batches; prefill below the GEMM): each dequantized vector of W
 * meets up to BLOCK_ROWS rows of x, and each load of x both rows of W, so a pass loads half as
 * much x per FMA as w4_block, which at 8 rows of x is bound by its loads (and at K = 1536 by
 * loads from L2: x's 8 rows outgrow L1). Every output's arithmetic is w4_block's (the same chain
 * of FMAs, the same reduction), so the results are identical. It needs AVX-512VL's 32 vector
 * registers (16 accumulators, both rows' vectors and scales): with AVX2's 16 it spills and loses
 * to w4_block. Measured on SmolLM2's shapes, one thread (docs/cpu_speed.md, step 14): 1.17x
 * w4_block's rate at 16 and 24 rows of x, 1.2x at 12, even at 8. */
#define HAVE_W4_BLOCK_PAIR 1
#ifndef W4_PAIR_MIN_ROWS
#define W4_PAIR_MIN_ROWS 9
#endif
static inline __attribute__((always_inline)) void
w4_block_pair(const int ROWS, const float *x, int64_t k, const uint8_t *q, const float *sm, float *y,
              int64_t n_total) {
    const int64_t groups = k / 32, blocks = k / 64, half = k / 2;
    const float *sm1 = sm + k / 16;
    __m256 acc0[BLOCK_ROWS], acc1[BLOCK_ROWS];
    for (int i = 0; i < ROWS; i++) acc0[i] = acc1[i] = _mm256_setzero_ps();
    for (int64_t blk = 0; blk < blocks; blk++) {
        const __m256i v0 = _mm256_loadu_si256((const __m256i *)(q + 32 * blk));
        const __m256i v1 = _mm256_loadu_si256((const __m256i *)(q + half + 32 * blk));
        #pragma GCC unroll 8
        for (int n = 0; n < 8; n++) {
            const float *p0 = sm + 4 * blk + 2 * (n / 4), *p1 = sm1 + 4 * blk + 2 * (n / 4);
            const __m256 w0 = w4_dequant8(w4_nibble(v0, n), _mm256_set1_ps(p0[0]), _mm256_set1_ps(p0[1]));
            const __m256 w1 = w4_dequant8(w4_nibble(v1, n), _mm256_set1_ps(p1[0]), _mm256_set1_ps(p1[1]));
            for (int i = 0; i < ROWS; i++) {
                const __m256 xv = _mm256_loadu_ps(x + i * k + 64 * blk + 8 * n);
                acc0[i] = _mm256_fmadd_ps(xv, w0, acc0[i]);
                acc1[i] = _mm256_fmadd_ps(xv, w1, acc1[i]);
            }
        }
    }
    if (groups % 2) {
        const __m256i v0 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(q + 32 * blocks)));
        const __m256i v1 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(q + half + 32 * blocks)));
        const float *p0 = sm + 2 * (groups - 1), *p1 = sm1 + 2 * (groups - 1);
        for (int n = 0; n < 4; n++) {
            const __m256 w0 = w4_dequant8(w4_tail_codes(v0, 2 * n), _mm256_set1_ps(p0[0]), _mm256_set1_ps(p0[1]));
            const __m256 w1 = w4_dequant8(w4_tail_codes(v1, 2 * n), _mm256_set1_ps(p1[0]), _mm256_set1_ps(p1[1]));
            for (int i = 0; i < ROWS; i++) {
                const __m256 xv = _mm256_loadu_ps(x + i * k + 64 * blocks + 8 * n);
                acc0[i] = _mm256_fmadd_ps(xv, w0, acc0[i]);
                acc1[i] = _mm256_fmadd_ps(xv, w1, acc1[i]);
            }
        }
    }
    for (int i = 0; i < ROWS; i++) {
        y[i * n_total] = hsum(acc0[i]);
        y[i * n_total + 1] = hsum(acc1[i]);
    }
}

static void w4_block_pair_rows(const float *x, int64_t rows, int64_t k, const uint8_t *q, const float *sm,
                               float *y, int64_t n_total) {
    CALL_WITH_ROWS(rows, w4_block_pair, x, k, q, sm, y, n_total)
}
#endif

/* 8 weights of a w8 row as floats. */
static inline __m256 w8_load8(const int8_t *q) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q)));
}

/* The same for grouped int8 (the LM head of a batch): w = q * scale dequantized once per 8 values,
 * one FMA per row of x. */
static inline __attribute__((always_inline)) void
w8_block(const int ROWS, const float *x, int64_t k, const int8_t *q, const float *scales, int64_t group,
         float *y, int64_t n_total) {
    __m256 acc[BLOCK_ROWS];
    for (int i = 0; i < ROWS; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < k / group; g++) {
        __m256 scale = _mm256_set1_ps(scales[g]);
        for (int64_t j = g * group; j < (g + 1) * group; j += 8) {
            __m256 w = _mm256_mul_ps(w8_load8(q + j), scale);
            for (int i = 0; i < ROWS; i++) acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * k + j), w, acc[i]);
        }
    }
    for (int i = 0; i < ROWS; i++) y[i * n_total] = hsum(acc[i]);
}

static void w8_block_rows(const float *x, int64_t rows, int64_t k, const int8_t *q, const float *scales,
                          int64_t group, float *y, int64_t n_total) {
    CALL_WITH_ROWS(rows, w8_block, x, k, q, scales, group, y, n_total)
}

static inline __attribute__((always_inline)) void
w8_rows(const int ROWS, const float *x, int64_t k, const int8_t *q, const float *scales,
        int64_t group, float *y, int64_t n_total) {
    __m256 acc[ROWS_PER_PASS];
    for (int i = 0; i < ROWS; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < k / group; g++) {
        __m256 t[ROWS_PER_PASS];
        for (int i = 0; i < ROWS; i++) t[i] = _mm256_setzero_ps();
        for (int64_t j = g * group; j < (g + 1) * group; j += 8) {
            __m256 w = w8_load8(q + j);
            for (int i = 0; i < ROWS; i++) t[i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * k + j), w, t[i]);
        }
        __m256 scale = _mm256_set1_ps(scales[g]);
        for (int i = 0; i < ROWS; i++) acc[i] = _mm256_fmadd_ps(t[i], scale, acc[i]);
    }
    for (int i = 0; i < ROWS; i++) y[i * n_total] = hsum(acc[i]);
}

/* One row of x (the LM head of a single stream): w8_rows' chain of FMAs through one partial sum
 * per group is bound by the FMA's latency there, not by the FMA units. Two groups at a time,
 * each in two partial sums, keep four independent chains in flight. */
static void w8_one_row(const float *x, int64_t k, const int8_t *q, const float *scales, int64_t group, float *y) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    const int64_t groups = k / group;
    int64_t g = 0;
    if (group % 16 == 0) {
        for (; g + 2 <= groups; g += 2) {
            const int8_t *qa = q + g * group, *qb = qa + group;
            const float *xa = x + g * group, *xb = xa + group;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
            for (int64_t j = 0; j < group; j += 16) {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xa + j), w8_load8(qa + j), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xa + j + 8), w8_load8(qa + j + 8), a1);
                b0 = _mm256_fmadd_ps(_mm256_loadu_ps(xb + j), w8_load8(qb + j), b0);
                b1 = _mm256_fmadd_ps(_mm256_loadu_ps(xb + j + 8), w8_load8(qb + j + 8), b1);
            }
            acc0 = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(scales[g]), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_add_ps(b0, b1), _mm256_set1_ps(scales[g + 1]), acc1);
        }
    }
    for (; g < groups; g++) {
        __m256 t = _mm256_setzero_ps();
        for (int64_t j = g * group; j < (g + 1) * group; j += 8)
            t = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), w8_load8(q + j), t);
        acc0 = _mm256_fmadd_ps(t, _mm256_set1_ps(scales[g]), acc0);
    }
    *y = hsum(_mm256_add_ps(acc0, acc1));
}

static inline __attribute__((always_inline)) void
f32_rows(const int ROWS, const float *x, int64_t k, const float *w, float *y, int64_t n_total) {
    __m256 acc[ROWS_PER_PASS];
    for (int i = 0; i < ROWS; i++) acc[i] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= k; j += 8) {
        __m256 wv = _mm256_loadu_ps(w + j);
        for (int i = 0; i < ROWS; i++) acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * k + j), wv, acc[i]);
    }
    for (int i = 0; i < ROWS; i++) {
        float sum = hsum(acc[i]);
        for (int64_t jj = j; jj < k; jj++) sum += x[i * k + jj] * w[jj];
        y[i * n_total] = sum;
    }
}

static void f32_row(const float *x, int64_t rows, int64_t k, const float *w, float *y, int64_t n_total) {
    switch (rows) {
    case 1: f32_rows(1, x, k, w, y, n_total); break;
    case 2: f32_rows(2, x, k, w, y, n_total); break;
    case 3: f32_rows(3, x, k, w, y, n_total); break;
    default: f32_rows(4, x, k, w, y, n_total); break;
    }
}

static void w8_row(const float *x, int64_t rows, int64_t k, const int8_t *q, const float *scales,
                   int64_t group, float *y, int64_t n_total) {
    switch (rows) {
    case 1: w8_one_row(x, k, q, scales, group, y); break;
    case 2: w8_rows(2, x, k, q, scales, group, y, n_total); break;
    case 3: w8_rows(3, x, k, q, scales, group, y, n_total); break;
    default: w8_rows(4, x, k, q, scales, group, y, n_total); break;
    }
}
#else
/* Code j of a packed w4 row (the layout above), read bytewise. */
static inline float w4_code(const uint8_t *row, int64_t k, int64_t j) {
    int64_t word;
    int nibble;
    w4_place(k, j, &word, &nibble);
    return (float)((row[4 * word + nibble / 2] >> (4 * (nibble & 1))) & 0x0F);
}

static void w4_row(const float *x, const float *xsum, int64_t rows, int64_t k, const uint8_t *q,
                   const float *sm, float *y, int64_t n_total) {
    const int64_t groups = k / 32;
    for (int64_t i = 0; i < rows; i++) {
        float acc = 0.f, min_acc = 0.f;
        for (int64_t g = 0; g < groups; g++) {
            float t = 0.f;
            for (int64_t j = g * 32; j < g * 32 + 32; j++) t += x[i * k + j] * w4_code(q, k, j);
            acc += t * sm[2 * g];
            min_acc += sm[2 * g + 1] * xsum[i * 2 * groups + 2 * g + 1];
        }
        y[i * n_total] = acc + min_acc;
    }
}

static void f32_row(const float *x, int64_t rows, int64_t k, const float *w, float *y, int64_t n_total) {
    for (int64_t i = 0; i < rows; i++) {
        float sum = 0.f;
        for (int64_t j = 0; j < k; j++) sum += x[i * k + j] * w[j];
        y[i * n_total] = sum;
    }
}

static void w8_row(const float *x, int64_t rows, int64_t k, const int8_t *q, const float *scales,
                   int64_t group, float *y, int64_t n_total) {
    for (int64_t i = 0; i < rows; i++) {
        float acc = 0.f;
        for (int64_t g = 0; g < k / group; g++) {
            float t = 0.f;
            for (int64_t j = g * group; j < (g + 1) * group; j++) t += x[i * k + j] * (float)q[j];
            acc += t * scales[g];
        }
        y[i * n_total] = acc;
    }
}
#endif

/* The row kernels write y[i * ldy + r] for the rows i of x they take: with ldy a multiple of 1024
 * floats (gate_up's 3072, a 49152-row LM head) every row's store lands in the same L1 set and more
 * than 8 rows thrash it. So W's rows go in tiles: within a tile, each block of x's rows runs
 * over the tile's consecutive r (stores along a row of y), and the tile stays in cache for the
 * next block. The order of the arithmetic for each output is unchanged. */
#ifdef STRATA_AVX2
/* ---- many rows of x: W dequantized into panels for the GEMM tile ------------------------------
 * From W4_GEMM_MIN_ROWS or W8_GEMM_MIN_ROWS rows of x (prefill, decode batches) a thread's rows
 * of W are taken 16 at a time: dequantized exactly as the reference (q * scale, then + min;
 * q * scale for int8), 8 rows x 8 values at a time through an 8 x 8 transpose, into a panel
 * [k][16] that the GEMM tile (cpu_gemm.c) multiplies by 6 rows of x at a time: 8 loads per 96
 * multiply-adds, where the blocked kernels load x once per 8. Rows of W past the range are
 * zeros in the panel.
 * Thresholds measured on SmolLM2's shapes, 2 threads, 30 layers' weights streaming from memory
 * (docs/cpu_speed.md): against the blocked kernel, the 4-bit layers take 1.3x the time at 16
 * rows, the same at 24-32 and 0.8x at 48; the int8 LM head 0.9x at 48. */
#ifndef W4_GEMM_MIN_ROWS
#ifdef __AVX512VL__
#define W4_GEMM_MIN_ROWS 48   /* w4_block_pair below: 1.04x the GEMM at 40 rows, 0.95x at 48 */
#else
#define W4_GEMM_MIN_ROWS 40
#endif
#endif
#ifndef W8_GEMM_MIN_ROWS
#define W8_GEMM_MIN_ROWS 48
#endif
#define HAVE_GEMM 1

/* r[c] <- (r[0][c], ..., r[7][c]): column c of the 8 x 8 block. */
static inline void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

/* Values j0..j0+7 of 8 rows (8 floats each in v) go to panel rows j0..j0+7, columns c0..c0+7. */
static inline void panel_store8(__m256 v[8], float *panel, int64_t j0, int c0) {
    transpose8(v);
    for (int c = 0; c < 8; c++) _mm256_storeu_ps(panel + 16 * (j0 + c) + c0, v[c]);
}

static void w4_fill_panel(const uint8_t *q, const float *sm, int64_t k, int64_t width, float *panel) {
    const int64_t blocks = k / 64, groups = k / 32;
    for (int c0 = 0; c0 < 16; c0 += 8) {
        for (int64_t blk = 0; blk < blocks; blk++)
            for (int n = 0; n < 8; n++) {
                __m256 v[8];
                for (int i = 0; i < 8; i++) {
                    const int64_t r = c0 + i;
                    if (r >= width) { v[i] = _mm256_setzero_ps(); continue; }
                    const __m256i words = _mm256_loadu_si256((const __m256i *)(q + r * (k / 2) + 32 * blk));
                    const float *params = sm + r * (k / 16) + 4 * blk + 2 * (n / 4);
                    v[i] = w4_dequant8(w4_nibble(words, n), _mm256_set1_ps(params[0]), _mm256_set1_ps(params[1]));
                }
                panel_store8(v, panel, 64 * blk + 8 * n, c0);
            }
        if (groups % 2)
            for (int n = 0; n < 4; n++) {
                __m256 v[8];
                for (int i = 0; i < 8; i++) {
                    const int64_t r = c0 + i;
                    if (r >= width) { v[i] = _mm256_setzero_ps(); continue; }
                    const __m256i words = _mm256_broadcastsi128_si256(
                        _mm_loadu_si128((const __m128i *)(q + r * (k / 2) + 32 * blocks)));
                    const float *params = sm + r * (k / 16) + 2 * (groups - 1);
                    v[i] = w4_dequant8(w4_tail_codes(words, 2 * n), _mm256_set1_ps(params[0]), _mm256_set1_ps(params[1]));
                }
                panel_store8(v, panel, 64 * blocks + 8 * n, c0);
            }
    }
}

static void w8_fill_panel(const int8_t *q, const float *scales, int64_t group, int64_t k, int64_t width,
                          float *panel) {
    for (int c0 = 0; c0 < 16; c0 += 8)
        for (int64_t j = 0; j < k; j += 8) {
            __m256 v[8];
            for (int i = 0; i < 8; i++) {
                const int64_t r = c0 + i;
                v[i] = r < width ? _mm256_mul_ps(w8_load8(q + r * k + j), _mm256_set1_ps(scales[r * (k / group) + j / group]))
                                 : _mm256_setzero_ps();
            }
            panel_store8(v, panel, j, c0);
        }
}

/* Rows [r0, r1) of y = x @ W^T for all m rows of x, a panel of 16 rows of W at a time (fill:
 * w4 or w8). Returns nonzero when out of memory (nothing written then). */
typedef struct {
    const uint8_t *q4;
    const int8_t *q8;
    const float *params;   /* w4: scale_min [n, k/32, 2]; w8: scales [n, k/group] */
    int64_t group;         /* w8 */
} packed_weight;

static int gemm_rows(const float *x, int64_t m, int64_t k, const packed_weight *w, float *y, int64_t ldy,
                     int64_t r0, int64_t r1) {
    float *panel = malloc(sizeof(float) * (size_t)(16 * k)), *edge = malloc(sizeof(float) * (size_t)(16 * m));
    if (panel == NULL || edge == NULL) {
        free(panel);
        free(edge);
        return 1;
    }
    for (int64_t p = r0; p < r1; p += 16) {
        const int64_t width = r1 - p < 16 ? r1 - p : 16;
        if (w->q4 != NULL)
            w4_fill_panel(w->q4 + p * (k / 2), w->params + p * (k / 16), k, width, panel);
        else
            w8_fill_panel(w->q8 + p * k, w->params + p * (k / w->group), w->group, k, width, panel);
        float *out = width == 16 ? y + p : edge;
        const int64_t ldo = width == 16 ? ldy : 16;
        for (int64_t i = 0; i < m; i += GEMM_TILE_ROWS) {
            const int tile = (int)(m - i < GEMM_TILE_ROWS ? m - i : GEMM_TILE_ROWS);
            strata_gemm_tile(tile, x + i * k, k, panel, 16, k, out + i * ldo, ldo, 0);
        }
        if (width < 16)
            for (int64_t i = 0; i < m; i++) memcpy(y + i * ldy + p, edge + i * 16, sizeof(float) * (size_t)width);
    }
    free(panel);
    free(edge);
    return 0;
}
#endif

#define W_TILE_ROWS 64

#define FOR_TILES(BLOCK, BODY)                                                               \
    for (int64_t t0 = r0; t0 < r1; t0 += W_TILE_ROWS) {                                      \
        int64_t t1 = t0 + W_TILE_ROWS < r1 ? t0 + W_TILE_ROWS : r1;                          \
        for (int64_t i0 = 0; i0 < m; i0 += (BLOCK)) {                                        \
            int64_t rows = m - i0 < (BLOCK) ? m - i0 : (BLOCK);                              \
            for (int64_t r = t0; r < t1; r++) { BODY; }                                      \
        }                                                                                    \
    }

void strata_w4_range(const float *x, const float *prep, int64_t m, int64_t k, const uint8_t *q,
                     const float *scale_min, float *y, int64_t ldy, int64_t r0, int64_t r1) {
    const float *xsum = prep;
#ifdef HAVE_GEMM
    const packed_weight w = {q, NULL, scale_min, 0};
    if (m >= W4_GEMM_MIN_ROWS && gemm_rows(x, m, k, &w, y, ldy, r0, r1) == 0) return;
#endif
#ifdef HAVE_W4_BLOCK_PAIR
    if (m >= W4_PAIR_MIN_ROWS) {   /* FOR_TILES' order, W's rows two at a time */
        for (int64_t t0 = r0; t0 < r1; t0 += W_TILE_ROWS) {
            const int64_t t1 = t0 + W_TILE_ROWS < r1 ? t0 + W_TILE_ROWS : r1;
            for (int64_t i0 = 0; i0 < m; i0 += BLOCK_ROWS) {
                const int64_t rows = m - i0 < BLOCK_ROWS ? m - i0 : BLOCK_ROWS;
                const float *xi = x + i0 * k;
                float *yi = y + i0 * ldy;
                int64_t r = t0;
                for (; r + 2 <= t1; r += 2)
                    w4_block_pair_rows(xi, rows, k, q + r * (k / 2), scale_min + r * (k / 16), yi + r, ldy);
                if (r < t1) w4_block_rows(xi, rows, k, q + r * (k / 2), scale_min + r * (k / 16), yi + r, ldy);
            }
        }
        return;
    }
#endif
#ifdef HAVE_W4_BLOCK
    if (m >= W4_BLOCK_MIN_ROWS) {
        FOR_TILES(BLOCK_ROWS, w4_block_rows(x + i0 * k, rows, k, q + r * (k / 2), scale_min + r * (k / 16),
                                            y + i0 * ldy + r, ldy))
        return;
    }
    const float *xr = prep + w4_xs_at(m, k);   /* x scaled for the in-place codes */
    const int per_pass = W4_BLOCK_MIN_ROWS - 1;
#else
    const float *xr = x;
    const int per_pass = ROWS_PER_PASS;
#endif
#ifdef HAVE_W4_ONE_ROW_PAIR
    if (m == 1) {
        int64_t r = r0;
        for (; r + 2 <= r1; r += 2) w4_one_row_pair(xr, xsum, k, q + r * (k / 2), scale_min + r * (k / 16), y + r);
        if (r < r1) w4_row(xr, xsum, 1, k, q + r * (k / 2), scale_min + r * (k / 16), y + r, ldy);
        return;
    }
#endif
    FOR_TILES(per_pass, w4_row(xr + i0 * k, xsum + i0 * (k / 16), rows, k, q + r * (k / 2),
                               scale_min + r * (k / 16), y + i0 * ldy + r, ldy))
}

void strata_w8_range(const float *x, int64_t m, int64_t k, const int8_t *q, const float *scales,
                     int64_t group, float *y, int64_t ldy, int64_t r0, int64_t r1) {
#ifdef HAVE_GEMM
    const packed_weight w = {NULL, q, scales, group};
    if (m >= W8_GEMM_MIN_ROWS && gemm_rows(x, m, k, &w, y, ldy, r0, r1) == 0) return;
#endif
#ifdef HAVE_W4_BLOCK
    if (m >= W8_BLOCK_MIN_ROWS) {
        FOR_TILES(BLOCK_ROWS, w8_block_rows(x + i0 * k, rows, k, q + r * k, scales + r * (k / group), group,
                                            y + i0 * ldy + r, ldy))
        return;
    }
#endif
    FOR_TILES(ROWS_PER_PASS, w8_row(x + i0 * k, rows, k, q + r * k, scales + r * (k / group), group,
                                    y + i0 * ldy + r, ldy))
}

void strata_f32_range(const float *x, int64_t m, int64_t k, const float *w, float *y, int64_t ldy,
                      int64_t r0, int64_t r1) {
    FOR_TILES(ROWS_PER_PASS, f32_row(x + i0 * k, rows, k, w + r * k, y + i0 * ldy + r, ldy))
}

/* Each thread takes a contiguous share of W's rows. */
#define SHARE(n, r0, r1) \
    int nt_ = omp_get_num_threads(), t_ = omp_get_thread_num(); \
    int64_t r0 = (n) * t_ / nt_, r1 = (n) * (t_ + 1) / nt_

int strata_w4_matmul(const float *x, int64_t m, int64_t k, const uint8_t *q, const float *scale_min,
                     float *y, int64_t n, int nthreads) {
    float *prep = aligned_alloc(64, sizeof(float) * (size_t)(strata_w4_prep_floats(m, k) + 16));
    if (prep == NULL) return 1;
    strata_w4_prepare(x, m, k, prep);
    #pragma omp parallel num_threads(nthreads)
    {
        SHARE(n, r0, r1);
        strata_w4_range(x, prep, m, k, q, scale_min, y, n, r0, r1);
    }
    free(prep);
    return 0;
}

/* Whether the matmuls run long steps as GEMM tiles (0: a build without AVX2): the Python side
 * sends prefill-sized x to them only then. */
int strata_has_gemm_tiles(void) {
#ifdef HAVE_GEMM
    return 1;
#else
    return 0;
#endif
}

/* Whether the build has the paths that need AVX-512VL's 32 vector registers (w4_block_pair here,
 * three query heads per attention pass in cpu_ops.c), for the startup line. */
int strata_has_avx512_paths(void) {
#ifdef __AVX512VL__
    return 1;
#else
    return 0;
#endif
}

int strata_w8_matmul(const float *x, int64_t m, int64_t k, const int8_t *q, const float *scales,
                     int64_t group, float *y, int64_t n, int nthreads) {
    #pragma omp parallel num_threads(nthreads)
    {
        SHARE(n, r0, r1);
        strata_w8_range(x, m, k, q, scales, group, y, n, r0, r1);
    }
    return 0;
}

/* Row r of W, q * scale + min: a multiply, then an add (as the reference). */
void strata_w4_dequantize_row(const uint8_t *q, const float *sm, int64_t k, float *out) {
    int64_t j = 0;
#ifdef STRATA_AVX2
    for (int64_t blk = 0; blk < k / 64; blk++, j += 64) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(q + 32 * blk));
        for (int n = 0; n < 8; n++) {
            const float *params = sm + 4 * blk + 2 * (n / 4);
            _mm256_storeu_ps(out + j + 8 * n, w4_dequant8(w4_nibble(v, n), _mm256_set1_ps(params[0]),
                                                          _mm256_set1_ps(params[1])));
        }
    }
    if (j < k) {
        __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(q + j / 2)));
        __m256 scale = _mm256_set1_ps(sm[j / 16]), min = _mm256_set1_ps(sm[j / 16 + 1]);
        for (int n = 0; n < 4; n++) _mm256_storeu_ps(out + j + 8 * n, w4_dequant8(w4_tail_codes(v, 2 * n), scale, min));
    }
#else
    for (; j < k; j++) out[j] = w4_code(q, k, j) * sm[2 * (j / 32)] + sm[2 * (j / 32) + 1];
#endif
}

/* The dequantizers serve whole matrices (loading, prefill) and single rows (the embedding lookup
 * of a decode step, a few hundred floats): a parallel region for those would cost more than the
 * row, waking threads that sleep between steps, so small calls stay on the caller's thread. */
#define DEQUANTIZE_PARALLEL_MIN 65536   /* weights */

void strata_w4_dequantize(const uint8_t *q, const float *scale_min, int64_t n, int64_t k, float *out,
                          int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (n * k >= DEQUANTIZE_PARALLEL_MIN)
    for (int64_t r = 0; r < n; r++) strata_w4_dequantize_row(q + r * (k / 2), scale_min + r * (k / 16), k, out + r * k);
}

void strata_w8_dequantize_row(const int8_t *q, const float *scales, int64_t group, int64_t k, float *out) {
    for (int64_t j = 0; j < k; j++) out[j] = (float)q[j] * scales[j / group];
}

void strata_w8_dequantize(const int8_t *q, const float *scales, int64_t group, int64_t n, int64_t k,
                          float *out, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (n * k >= DEQUANTIZE_PARALLEL_MIN)
    for (int64_t r = 0; r < n; r++) strata_w8_dequantize_row(q + r * k, scales + r * (k / group), group, k, out + r * k);
}

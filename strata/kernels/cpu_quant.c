/* strata's CPU matmuls on packed quantized weights: y = x @ W^T, x [M, K] and y [M, N] float32,
 * row-major and contiguous (the Python wrappers in cpu_quant.py check this).
 *
 * w4: W [N, K] as 4-bit codes in groups of 32 along K, w = q * scale + min. qweight [N, K/2]: in
 *     each group's 16 bytes, byte j holds code j in its low nibble and code j + 16 in its high
 *     one (GGML's Q4_0/Q4_1 order: a group unpacks into two runs of 16 with one mask and one
 *     shift). scale_min [N, K/32, 2] float32.
 * w8: W [N, K] as int8 codes in groups of `group` (a multiple of 8) along K, w = q * scale;
 *     scales [N, K/group] float32.
 *
 * The matmuls are for decode-sized M: each weight row is unpacked once into registers and used
 * for every row of x, the scale multiplies a group's partial dot product and the min the group's
 * sum of x, so a group of 32 costs its unpacking plus five FMAs per row of x. Rows of W are split
 * over OpenMP threads; built against torch's own libgomp (same soname), so one thread pool.
 * The dequantizers give q * scale + min rounded exactly as the torch reference (mul, then add:
 * the file is compiled with -ffp-contract=off), for the tiled path of larger M.
 */
#include <stdint.h>
#include <stdlib.h>

#include "cpu_kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define STRATA_AVX2 1
#endif

#define ROWS_PER_PASS 4   /* rows of x sharing one unpacked weight row: accumulators fit in registers */
#ifndef W4_BLOCK_MIN_ROWS
#define W4_BLOCK_MIN_ROWS 4   /* from this many rows of x, w4 uses w4_block (AVX2 builds) */
#endif
#ifndef W8_BLOCK_MIN_ROWS
#define W8_BLOCK_MIN_ROWS 8   /* and w8 w8_block: at 4 rows w8_rows was faster (one thread, CPU time) */
#endif

void strata_group_sums(const float *x, int64_t m, int64_t k, float *xsum) {
    for (int64_t i = 0; i < m; i++)
        for (int64_t g = 0; g < k / 32; g++) {
            float s = 0.f;
            for (int j = 0; j < 32; j++) s += x[i * k + g * 32 + j];
            xsum[i * (k / 32) + g] = s;
        }
}

#ifdef STRATA_AVX2
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* ROWS is a constant at every call (w4_row's switch), so the loops over it unroll and the
 * accumulators stay in registers. */
static inline __attribute__((always_inline)) void
w4_rows(const int ROWS, const float *x, const float *xsum, int64_t k, const uint8_t *q,
        const float *sm, float *y, int64_t n_total) {
    const int64_t groups = k / 32;
    __m256 acc[ROWS_PER_PASS];
    float min_acc[ROWS_PER_PASS];
    for (int i = 0; i < ROWS; i++) { acc[i] = _mm256_setzero_ps(); min_acc[i] = 0.f; }
    const __m128i mask = _mm_set1_epi8(0x0F);
    for (int64_t g = 0; g < groups; g++) {
        __m128i b = _mm_loadu_si128((const __m128i *)(q + g * 16));
        __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
        __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        __m256 scale = _mm256_set1_ps(sm[2 * g]);
        float min = sm[2 * g + 1];
        for (int i = 0; i < ROWS; i++) {
            const float *xg = x + i * k + g * 32;
            __m256 t = _mm256_mul_ps(_mm256_loadu_ps(xg), w0);
            t = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 8), w1, t);
            t = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 16), w2, t);
            t = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 24), w3, t);
            acc[i] = _mm256_fmadd_ps(t, scale, acc[i]);
            min_acc[i] += min * xsum[i * groups + g];
        }
    }
    for (int i = 0; i < ROWS; i++) y[i * n_total] = hsum(acc[i]) + min_acc[i];
}

static void w4_row(const float *x, const float *xsum, int64_t rows, int64_t k, const uint8_t *q,
                   const float *sm, float *y, int64_t n_total) {
    switch (rows) {
    case 1: w4_rows(1, x, xsum, k, q, sm, y, n_total); break;
    case 2: w4_rows(2, x, xsum, k, q, sm, y, n_total); break;
    case 3: w4_rows(3, x, xsum, k, q, sm, y, n_total); break;
    default: w4_rows(4, x, xsum, k, q, sm, y, n_total); break;
    }
}

/* Batches (4 rows of x and more): each group of W is dequantized once in registers, exactly as
 * the reference dequantizes it (q * scale, then + min), and multiplies up to BLOCK_ROWS rows of x:
 * four FMAs per row per group, against five operations and a scalar min term per row per group
 * in w4_rows. A different summation order from w4_rows, so the two agree to rounding. */
#define BLOCK_ROWS 8
static inline __attribute__((always_inline)) void
w4_block(const int ROWS, const float *x, int64_t k, const uint8_t *q, const float *sm, float *y,
         int64_t n_total) {
    __m256 acc[BLOCK_ROWS];
    for (int i = 0; i < ROWS; i++) acc[i] = _mm256_setzero_ps();
    const __m128i mask = _mm_set1_epi8(0x0F);
    for (int64_t g = 0; g < k / 32; g++) {
        __m128i b = _mm_loadu_si128((const __m128i *)(q + g * 16));
        __m128i halves[2] = {_mm_and_si128(b, mask), _mm_and_si128(_mm_srli_epi16(b, 4), mask)};
        __m256 scale = _mm256_set1_ps(sm[2 * g]), min = _mm256_set1_ps(sm[2 * g + 1]);
        for (int c = 0; c < 4; c++) {
            __m128i codes = (c & 1) ? _mm_srli_si128(halves[c >> 1], 8) : halves[c >> 1];
            __m256 w = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes)), scale), min);
            for (int i = 0; i < ROWS; i++)
                acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * k + g * 32 + 8 * c), w, acc[i]);
        }
    }
    for (int i = 0; i < ROWS; i++) y[i * n_total] = hsum(acc[i]);
}

static void w4_block_rows(const float *x, int64_t rows, int64_t k, const uint8_t *q, const float *sm,
                          float *y, int64_t n_total) {
    switch (rows) {
    case 1: w4_block(1, x, k, q, sm, y, n_total); break;
    case 2: w4_block(2, x, k, q, sm, y, n_total); break;
    case 3: w4_block(3, x, k, q, sm, y, n_total); break;
    case 4: w4_block(4, x, k, q, sm, y, n_total); break;
    case 5: w4_block(5, x, k, q, sm, y, n_total); break;
    case 6: w4_block(6, x, k, q, sm, y, n_total); break;
    case 7: w4_block(7, x, k, q, sm, y, n_total); break;
    default: w4_block(8, x, k, q, sm, y, n_total); break;
    }
}
#define HAVE_W4_BLOCK 1

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
            __m256 w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + j)))),
                                     scale);
            for (int i = 0; i < ROWS; i++) acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * k + j), w, acc[i]);
        }
    }
    for (int i = 0; i < ROWS; i++) y[i * n_total] = hsum(acc[i]);
}

static void w8_block_rows(const float *x, int64_t rows, int64_t k, const int8_t *q, const float *scales,
                          int64_t group, float *y, int64_t n_total) {
    switch (rows) {
    case 1: w8_block(1, x, k, q, scales, group, y, n_total); break;
    case 2: w8_block(2, x, k, q, scales, group, y, n_total); break;
    case 3: w8_block(3, x, k, q, scales, group, y, n_total); break;
    case 4: w8_block(4, x, k, q, scales, group, y, n_total); break;
    case 5: w8_block(5, x, k, q, scales, group, y, n_total); break;
    case 6: w8_block(6, x, k, q, scales, group, y, n_total); break;
    case 7: w8_block(7, x, k, q, scales, group, y, n_total); break;
    default: w8_block(8, x, k, q, scales, group, y, n_total); break;
    }
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
            __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + j))));
            for (int i = 0; i < ROWS; i++) t[i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * k + j), w, t[i]);
        }
        __m256 scale = _mm256_set1_ps(scales[g]);
        for (int i = 0; i < ROWS; i++) acc[i] = _mm256_fmadd_ps(t[i], scale, acc[i]);
    }
    for (int i = 0; i < ROWS; i++) y[i * n_total] = hsum(acc[i]);
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
    case 1: w8_rows(1, x, k, q, scales, group, y, n_total); break;
    case 2: w8_rows(2, x, k, q, scales, group, y, n_total); break;
    case 3: w8_rows(3, x, k, q, scales, group, y, n_total); break;
    default: w8_rows(4, x, k, q, scales, group, y, n_total); break;
    }
}
#else
static void w4_row(const float *x, const float *xsum, int64_t rows, int64_t k, const uint8_t *q,
                   const float *sm, float *y, int64_t n_total) {
    const int64_t groups = k / 32;
    for (int64_t i = 0; i < rows; i++) {
        float acc = 0.f, min_acc = 0.f;
        for (int64_t g = 0; g < groups; g++) {
            const float *xg = x + i * k + g * 32;
            float t = 0.f;
            for (int j = 0; j < 16; j++)
                t += xg[j] * (float)(q[g * 16 + j] & 0x0F) + xg[j + 16] * (float)(q[g * 16 + j] >> 4);
            acc += t * sm[2 * g];
            min_acc += sm[2 * g + 1] * xsum[i * groups + g];
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
#define W_TILE_ROWS 64

#define FOR_TILES(BLOCK, BODY)                                                               \
    for (int64_t t0 = r0; t0 < r1; t0 += W_TILE_ROWS) {                                      \
        int64_t t1 = t0 + W_TILE_ROWS < r1 ? t0 + W_TILE_ROWS : r1;                          \
        for (int64_t i0 = 0; i0 < m; i0 += (BLOCK)) {                                        \
            int64_t rows = m - i0 < (BLOCK) ? m - i0 : (BLOCK);                              \
            for (int64_t r = t0; r < t1; r++) { BODY; }                                      \
        }                                                                                    \
    }

void strata_w4_range(const float *x, const float *xsum, int64_t m, int64_t k, const uint8_t *q,
                     const float *scale_min, float *y, int64_t ldy, int64_t r0, int64_t r1) {
#ifdef HAVE_W4_BLOCK
    if (m >= W4_BLOCK_MIN_ROWS) {
        FOR_TILES(BLOCK_ROWS, w4_block_rows(x + i0 * k, rows, k, q + r * (k / 2), scale_min + r * (k / 16),
                                            y + i0 * ldy + r, ldy))
        return;
    }
#endif
    FOR_TILES(ROWS_PER_PASS, w4_row(x + i0 * k, xsum + i0 * (k / 32), rows, k, q + r * (k / 2),
                                    scale_min + r * (k / 16), y + i0 * ldy + r, ldy))
}

void strata_w8_range(const float *x, int64_t m, int64_t k, const int8_t *q, const float *scales,
                     int64_t group, float *y, int64_t ldy, int64_t r0, int64_t r1) {
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
    float *xsum = malloc(sizeof(float) * (size_t)(m * (k / 32) + 1));
    if (xsum == NULL) return 1;
    strata_group_sums(x, m, k, xsum);
    #pragma omp parallel num_threads(nthreads)
    {
        SHARE(n, r0, r1);
        strata_w4_range(x, xsum, m, k, q, scale_min, y, n, r0, r1);
    }
    free(xsum);
    return 0;
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

/* The 32 values of one w4 group, q * scale + min: a multiply, then an add (as the reference). */
static void w4_group(const uint8_t *b, float scale, float min, float *o) {
#ifdef STRATA_AVX2
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m128i bytes = _mm_loadu_si128((const __m128i *)b);
    __m128i halves[2] = {_mm_and_si128(bytes, mask), _mm_and_si128(_mm_srli_epi16(bytes, 4), mask)};
    __m256 s = _mm256_set1_ps(scale), m = _mm256_set1_ps(min);
    for (int h = 0; h < 2; h++) {
        __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(halves[h]));
        __m256 q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(halves[h], 8)));
        _mm256_storeu_ps(o + 16 * h, _mm256_add_ps(_mm256_mul_ps(q0, s), m));
        _mm256_storeu_ps(o + 16 * h + 8, _mm256_add_ps(_mm256_mul_ps(q1, s), m));
    }
#else
    for (int j = 0; j < 16; j++) {
        o[j] = (float)(b[j] & 0x0F) * scale + min;
        o[j + 16] = (float)(b[j] >> 4) * scale + min;
    }
#endif
}

void strata_w4_dequantize(const uint8_t *q, const float *scale_min, int64_t n, int64_t k, float *out,
                          int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < n; r++)
        for (int64_t g = 0; g < k / 32; g++)
            w4_group(q + r * (k / 2) + g * 16, scale_min[r * (k / 16) + 2 * g],
                     scale_min[r * (k / 16) + 2 * g + 1], out + r * k + g * 32);
}

void strata_w8_dequantize(const int8_t *q, const float *scales, int64_t group, int64_t n, int64_t k,
                          float *out, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < n; r++)
        for (int64_t j = 0; j < k; j++) out[r * k + j] = (float)q[r * k + j] * scales[r * (k / group) + j / group];
}

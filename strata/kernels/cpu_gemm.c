/* A float32 GEMM tile for the CPU's long steps (prefill): y[i][0..15] = sum_p x_i[p] * b[p][0..15]
 * for up to GEMM_TILE_ROWS rows of x, with the 6 x 16 block of y in twelve AVX2 registers.
 *
 * Per p it loads two vectors of b and broadcasts one value of each row of x: 8 loads for 12
 * FMAs, so the FMA units, not the loads, set the pace (~75% of a Zen 3 core's peak measured, as
 * MKL's SGEMM reaches on these shapes). Callers arrange b as rows of 16 floats (a packed panel,
 * ldb = 16) or take 16 columns of a wider row-major matrix in place (ldb = its row length).
 * GCC keeps arrays of __m256 accumulators on the stack across the loop, so the twelve are named.
 */
#include <stdint.h>
#include <string.h>

#include "cpu_kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#define ROW_FMA(a, r0, r1) \
    r0 = _mm256_fmadd_ps(a, b0, r0); \
    r1 = _mm256_fmadd_ps(a, b1, r1)

void strata_gemm_tile(int rows, const float *x, int64_t ldx, const float *b, int64_t ldb, int64_t k,
                      float *y, int64_t ldy, int accumulate) {
    /* Rows past `rows` repeat the last one: computed, never stored. */
    const float *x0 = x, *x1 = x + (rows > 1 ? 1 : 0) * ldx, *x2 = x + (rows > 2 ? 2 : rows - 1) * ldx,
                *x3 = x + (rows > 3 ? 3 : rows - 1) * ldx, *x4 = x + (rows > 4 ? 4 : rows - 1) * ldx,
                *x5 = x + (rows > 5 ? 5 : rows - 1) * ldx;
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
           c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int64_t p = 0; p < k; p++) {
        const __m256 b0 = _mm256_loadu_ps(b + p * ldb), b1 = _mm256_loadu_ps(b + p * ldb + 8);
        __m256 a;
        a = _mm256_broadcast_ss(x0 + p); ROW_FMA(a, c00, c01);
        a = _mm256_broadcast_ss(x1 + p); ROW_FMA(a, c10, c11);
        a = _mm256_broadcast_ss(x2 + p); ROW_FMA(a, c20, c21);
        a = _mm256_broadcast_ss(x3 + p); ROW_FMA(a, c30, c31);
        a = _mm256_broadcast_ss(x4 + p); ROW_FMA(a, c40, c41);
        a = _mm256_broadcast_ss(x5 + p); ROW_FMA(a, c50, c51);
    }
    __m256 out[12] = {c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51};
    for (int i = 0; i < rows; i++) {
        float *yi = y + i * ldy;
        __m256 lo = out[2 * i], hi = out[2 * i + 1];
        if (accumulate) {
            lo = _mm256_add_ps(lo, _mm256_loadu_ps(yi));
            hi = _mm256_add_ps(hi, _mm256_loadu_ps(yi + 8));
        }
        _mm256_storeu_ps(yi, lo);
        _mm256_storeu_ps(yi + 8, hi);
    }
}
#else
void strata_gemm_tile(int rows, const float *x, int64_t ldx, const float *b, int64_t ldb, int64_t k,
                      float *y, int64_t ldy, int accumulate) {
    for (int i = 0; i < rows; i++) {
        float acc[16] = {0};
        for (int64_t p = 0; p < k; p++)
            for (int j = 0; j < 16; j++) acc[j] += x[i * ldx + p] * b[p * ldb + j];
        for (int j = 0; j < 16; j++) y[i * ldy + j] = accumulate ? y[i * ldy + j] + acc[j] : acc[j];
    }
}
#endif

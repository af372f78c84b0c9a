/* strata's CPU kernels for the non-matmul work of a step, float32 throughout: fused residual add
 * and RMSNorm, rotary embedding with the KV-cache write, attention over the paged cache, SiLU-and-
 * multiply. Each replaces several eager torch ops (and their allocations and dispatch, which at
 * decode cost more than the arithmetic); the torch code in strata/layers and strata/attention is
 * the reference they are tested against (cpu_ops.py wraps and checks them).
 *
 * Compiled with the matmuls in cpu_quant.c (one library, -ffp-contract=off): the rotation is a
 * multiply, a multiply and an add, rounded exactly as the torch reference. The norm's sum of
 * squares, softmax and exp sum in another order than torch's, so those agree to float rounding.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define STRATA_AVX2 1
#endif

/* ---- exp, vectorised -------------------------------------------------------------------------
 * exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 in two parts (Cody-Waite), exp(r)
 * by its degree-6 Taylor polynomial: relative error under 2e-7 over the float range, like
 * libm's expf to a unit or two in the last place. Inputs below -87.3 give 0 (softmax tails). */
#ifdef STRATA_AVX2
static inline __m256 exp8(__m256 x) {
    const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.3365447504019f);
    __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

/* out[i] = exp(x[i] - shift) for i < n; returns their sum. */
static float exp_shifted(const float *x, float shift, int64_t n, float *out) {
    int64_t i = 0;
    float sum = 0.f;
#ifdef STRATA_AVX2
    __m256 s8 = _mm256_setzero_ps(), sh = _mm256_set1_ps(shift);
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh));
        _mm256_storeu_ps(out + i, e);
        s8 = _mm256_add_ps(s8, e);
    }
    sum = hsum8(s8);
#endif
    for (; i < n; i++) {
        out[i] = expf(x[i] - shift);
        sum += out[i];
    }
    return sum;
}

/* x[i] = softmax(x)[i] for i < n, the max subtracted first (as strata_attend does per group). */
void strata_softmax_row(float *x, int64_t n) {
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; j++) mx = x[j] > mx ? x[j] : mx;
    float inv = 1.f / exp_shifted(x, mx, n, x);
    for (int64_t j = 0; j < n; j++) x[j] *= inv;
}

/* ---- greedy sampling -------------------------------------------------------------------------
 * out[r] = the index of row r's largest value, as torch.argmax picks it: the first of equal
 * maxima, and the first NaN where the row has one (NaN counts as the largest). One pass for the
 * maximum (and whether a NaN is there), one to find its first position: torch's CPU argmax took
 * ~45 us for a 49,152-word row, this ~5. */
static int64_t argmax_row(const float *x, int64_t n) {
    float mx = -INFINITY;
    int nan = 0;
    int64_t i = 0;
#ifdef STRATA_AVX2
    __m256 m8 = _mm256_set1_ps(-INFINITY), nan8 = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        m8 = _mm256_max_ps(v, m8);                 /* a NaN in v leaves m8 as it was */
        nan8 = _mm256_or_ps(nan8, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, m8);
    for (int j = 0; j < 8; j++) mx = lanes[j] > mx ? lanes[j] : mx;
    nan = _mm256_movemask_ps(nan8) != 0;
#endif
    for (; i < n; i++) {
        mx = x[i] > mx ? x[i] : mx;
        nan |= x[i] != x[i];
    }
    for (i = 0; i < n; i++)
        if (nan ? x[i] != x[i] : x[i] == mx) return i;
    return 0;   /* n == 0 */
}

void strata_argmax_rows(const float *x, int64_t rows, int64_t n, int64_t *out) {
    for (int64_t r = 0; r < rows; r++) out[r] = argmax_row(x + r * n, n);
}

/* ---- fused residual add + RMSNorm ------------------------------------------------------------
 * residual_in NULL: out = norm(x) * w. Else r = x + residual_in is written to residual_out and
 * out = norm(r) * w. norm(r) = r * (1 / sqrt(mean(r^2) + eps)), then times w (torch's order). */
void strata_rms_norm_row(const float *x, const float *residual_in, float *residual_out, const float *w,
                         float *out, int64_t d, float eps) {
    const float *r = x;
    if (residual_in != NULL) {
        for (int64_t j = 0; j < d; j++) residual_out[j] = x[j] + residual_in[j];
        r = residual_out;
    }
    int64_t j = 0;
    float ss = 0.f;
#ifdef STRATA_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; j + 8 <= d; j += 8) {
        __m256 v = _mm256_loadu_ps(r + j);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
    }
    ss = hsum8(acc);
#endif
    for (; j < d; j++) ss += r[j] * r[j];
    float inv = 1.f / sqrtf(ss / (float)d + eps);
    for (j = 0; j < d; j++) out[j] = w[j] * (r[j] * inv);
}

void strata_rms_norm(const float *x, const float *residual_in, float *residual_out, const float *w,
                     float *out, int64_t n, int64_t d, float eps, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (n * d >= 65536)
    for (int64_t row = 0; row < n; row++)
        strata_rms_norm_row(x + row * d, residual_in ? residual_in + row * d : NULL,
                            residual_in ? residual_out + row * d : NULL, w, out + row * d, d, eps);
}

/* ---- SiLU(gate) * up over x = [gate | up] rows of 2d ------------------------------------------ */
void strata_silu_mul_span(const float *g, const float *u, float *o, int64_t n) {
    int64_t j = 0;
#ifdef STRATA_AVX2
    const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) {
        __m256 gv = _mm256_loadu_ps(g + j);
        __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, gv))));
        _mm256_storeu_ps(o + j, _mm256_mul_ps(silu, _mm256_loadu_ps(u + j)));
    }
#endif
    for (; j < n; j++) o[j] = g[j] / (1.f + expf(-g[j])) * u[j];
}

void strata_silu_and_mul(const float *x, float *out, int64_t n, int64_t d, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (n * d >= 65536)
    for (int64_t row = 0; row < n; row++) strata_silu_mul_span(x + row * 2 * d, x + row * 2 * d + d, out + row * d, d);
}

/* ---- rotary embedding (rotate-half) and the KV-cache write ------------------------------------
 * q [n, heads, head_dim] rows q_stride apart: rotated into q_out [n, heads, head_dim]. k, v [n, kv_heads, head_dim] rows
 * k_stride / v_stride apart: k rotated and v copied into cache slot slot_mapping[t]; the cache is
 * [2, slots, kv_heads, head_dim] with the V plane plane_stride floats after the K plane. cos/sin
 * [max_position, rot_dim]; dims past rot_dim are left as they are. Element j < rot_dim / 2 and
 * its partner j + rot_dim / 2: a' = a cos_j - b sin_j, b' = b cos_j' + a sin_j' (the reference's
 * x * cos + rotate_half(x) * sin, term by term). */
static void rotate(const float *restrict src, float *restrict dst, const float *c, const float *s, int64_t head_dim,
                   int64_t rot_dim) {
    const int64_t half = rot_dim / 2;
    for (int64_t j = 0; j < half; j++) {
        float a = src[j], b = src[j + half];
        dst[j] = a * c[j] + (-b) * s[j];
        dst[j + half] = b * c[j + half] + a * s[j + half];
    }
    memcpy(dst + rot_dim, src + rot_dim, sizeof(float) * (size_t)(head_dim - rot_dim));
}

/* One head: rotated (or copied, without rotary dims) from src to dst. */
static void rope_head(const float *src, float *dst, const float *c, const float *s, int64_t head_dim, int64_t rot_dim) {
    if (rot_dim > 0) rotate(src, dst, c, s, head_dim, rot_dim);
    else memcpy(dst, src, sizeof(float) * (size_t)head_dim);
}

void strata_rope_kv_head(const float *q, float *q_out, const float *k, const float *v, const float *c,
                         const float *s, int64_t kvh, int64_t groups, int64_t head_dim, int64_t rot_dim,
                         float *kc, int64_t plane_stride) {
    for (int64_t h = kvh * groups; h < (kvh + 1) * groups; h++)
        rope_head(q + h * head_dim, q_out + h * head_dim, c, s, head_dim, rot_dim);
    rope_head(k + kvh * head_dim, kc + kvh * head_dim, c, s, head_dim, rot_dim);
    memcpy(kc + plane_stride + kvh * head_dim, v + kvh * head_dim, sizeof(float) * (size_t)head_dim);
}

void strata_rope_token(const float *q, float *q_out, const float *k, const float *v, const float *c,
                       const float *s, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t rot_dim,
                       float *kc, int64_t plane_stride) {
    for (int64_t kvh = 0; kvh < kv_heads; kvh++)
        strata_rope_kv_head(q, q_out, k, v, c, s, kvh, heads / kv_heads, head_dim, rot_dim, kc, plane_stride);
}

int strata_rope_write_kv(const float *q, int64_t q_stride, float *q_out, const float *k, int64_t k_stride,
                         const float *v, int64_t v_stride, const int64_t *positions, const float *cos_table,
                         const float *sin_table, int64_t max_position, int64_t n, int64_t heads,
                         int64_t kv_heads, int64_t head_dim, int64_t rot_dim, float *kv_cache,
                         int64_t plane_stride, const int64_t *slot_mapping, int nthreads) {
    if (rot_dim > 0)   /* a position past the tables would read outside them: refuse the step */
        for (int64_t t = 0; t < n; t++)
            if (positions[t] < 0 || positions[t] >= max_position) return 1;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (n >= 64)
    for (int64_t t = 0; t < n; t++)
        strata_rope_token(q + t * q_stride, q_out + t * heads * head_dim, k + t * k_stride, v + t * v_stride,
                          rot_dim ? cos_table + positions[t] * rot_dim : NULL,
                          rot_dim ? sin_table + positions[t] * rot_dim : NULL, heads, kv_heads, head_dim,
                          rot_dim, kv_cache + slot_mapping[t] * kv_heads * head_dim, plane_stride);
    return 0;
}

/* ---- attention over the paged cache ----------------------------------------------------------
 * One work item is a query token and a KV head: the `groups` query heads sharing that KV head
 * read each key and value once. Token t of sequence s (query_start_loc[s] <= t < [s + 1]) sits at
 * position seq_lens[s] - q_len + (t - query_start_loc[s]) and sees the keys up to it (causal; a
 * decode token sees the whole context). Scores go to a per-thread buffer, then a softmax with
 * the max subtracted, then the weighted sum of values. q [n, heads, head_dim] rows q_stride
 * apart; out [n, heads, head_dim] contiguous. */
static float dot(const float *a, const float *b, int64_t d) {
    int64_t j = 0;
    float sum = 0.f;
#ifdef STRATA_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; j + 8 <= d; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc);
    sum = hsum8(acc);
#endif
    for (; j < d; j++) sum += a[j] * b[j];
    return sum;
}

static void axpy(float a, const float *x, float *y, int64_t d) {
    int64_t j = 0;
#ifdef STRATA_AVX2
    __m256 av = _mm256_set1_ps(a);
    for (; j + 8 <= d; j += 8) _mm256_storeu_ps(y + j, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j)));
#endif
    for (; j < d; j++) y[j] += a * x[j];
}

/* The cache rows of one sequence and KV head, key after key: a block-table step per block_size
 * keys instead of a division per key (which cost as much as the key's arithmetic). */
typedef struct {
    const float *base;               /* the plane's start, offset to kvh */
    const int32_t *table;
    int64_t off, block_size, row_stride, block_stride;
} row_walk;

static inline row_walk walk_start(const strata_cache_view *cv, const int32_t *table, int64_t kvh, int64_t plane) {
    row_walk w = {NULL, table, 0, cv->block_size, cv->kv_heads * cv->head_dim, 0};
    w.block_stride = cv->block_size * w.row_stride;
    w.base = cv->kv_cache + plane + kvh * cv->head_dim;
    return w;
}

static inline const float *walk_next(row_walk *w) {
    const float *row = w->base + (int64_t)w->table[0] * w->block_stride + w->off * w->row_stride;
    if (++w->off == w->block_size) {
        w->off = 0;
        w->table++;
    }
    return row;
}

#ifdef STRATA_AVX2
/* The 8 sums of a[0..7]'s lanes, in order, as one vector. */
static inline __m256 hsum8x8(const __m256 a[8]) {
    __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
    __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
    __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

/* Query heads sharing a KV head that take each key (and value) vector together: 3 with AVX-512VL's
 * 32 vector registers (24 accumulators), 1 with AVX2's 16. */
#ifdef __AVX512VL__
#define HEADS_PER_PASS 3
#else
#define HEADS_PER_PASS 1
#endif

/* scores[g * ctx + j] = q_g . key_j * scale for 8 keys and NG <= 3 query heads (head_dim a
 * multiple of 8): one accumulator per key and head, each key's vectors loaded once for all NG
 * heads, the 8 keys of a head reduced together (a horizontal sum per key cost as much again). */
static inline __attribute__((always_inline)) void
scores8(const int NG, const float *q, int64_t d, const float *const keys[8], float scale, float *scores,
        int64_t ctx) {
    __m256 acc[3][8];
    for (int g = 0; g < NG; g++)
        for (int j = 0; j < 8; j++) acc[g][j] = _mm256_setzero_ps();
    for (int64_t c = 0; c < d; c += 8) {
        __m256 qc[3];
        for (int g = 0; g < NG; g++) qc[g] = _mm256_loadu_ps(q + g * d + c);
        for (int j = 0; j < 8; j++) {
            const __m256 kj = _mm256_loadu_ps(keys[j] + c);
            for (int g = 0; g < NG; g++) acc[g][j] = _mm256_fmadd_ps(qc[g], kj, acc[g][j]);
        }
    }
    for (int g = 0; g < NG; g++)
        _mm256_storeu_ps(scores + g * ctx, _mm256_mul_ps(hsum8x8(acc[g]), _mm256_set1_ps(scale)));
}

/* out[g] = sum_i p[g * ctx + i] value_i for NG <= 3 query heads of head_dim 8 * VECS (NG * VECS
 * <= 24 accumulators, with AVX-512VL's 32 registers): each value row is read once for all NG.
 * Per head the same chain of FMAs over i as one head at a time. */
static inline __attribute__((always_inline)) void
values_heads(const int NG, const int VECS, const strata_cache_view *cv, const int32_t *table, int64_t kvh,
             const float *p, int64_t ctx, float *out) {
    __m256 acc[24];
    for (int a = 0; a < NG * VECS; a++) acc[a] = _mm256_setzero_ps();
    row_walk values = walk_start(cv, table, kvh, cv->plane_stride);
    for (int64_t i = 0; i < ctx; i++) {
        const float *value = walk_next(&values);
        __m256 pg[3];
        for (int g = 0; g < NG; g++) pg[g] = _mm256_set1_ps(p[g * ctx + i]);
        for (int c = 0; c < VECS; c++) {
            const __m256 v = _mm256_loadu_ps(value + 8 * c);
            for (int g = 0; g < NG; g++) acc[g * VECS + c] = _mm256_fmadd_ps(pg[g], v, acc[g * VECS + c]);
        }
    }
    for (int g = 0; g < NG; g++)
        for (int c = 0; c < VECS; c++) _mm256_storeu_ps(out + g * cv->head_dim + 8 * c, acc[g * VECS + c]);
}
#endif

void strata_attend(const strata_cache_view *cv, const float *q, float *out, int64_t seq, int64_t ctx,
                   int64_t kvh, float *scores) {
    const int64_t d = cv->head_dim, G = cv->groups;
    const int32_t *table = cv->block_tables + seq * cv->bt_stride;
    row_walk keys_walk = walk_start(cv, table, kvh, 0);
    int64_t j = 0;
#ifdef STRATA_AVX2
    if (d % 8 == 0)
        for (; j + 8 <= ctx; j += 8) {
            const float *keys[8];
            for (int i = 0; i < 8; i++) keys[i] = walk_next(&keys_walk);
            for (int64_t g = 0; g < G; g += HEADS_PER_PASS) {
                const float *qg = q + g * d;
                float *sg = scores + g * ctx + j;
                if (HEADS_PER_PASS == 3 && G - g >= 3) scores8(3, qg, d, keys, cv->scale, sg, ctx);
                else if (HEADS_PER_PASS == 3 && G - g == 2) scores8(2, qg, d, keys, cv->scale, sg, ctx);
                else scores8(1, qg, d, keys, cv->scale, sg, ctx);
            }
        }
#endif
    for (; j < ctx; j++) {
        const float *key = walk_next(&keys_walk);
        for (int64_t g = 0; g < G; g++) scores[g * ctx + j] = dot(q + g * d, key, d) * cv->scale;
    }
    for (int64_t g = 0; g < G; g++) {
        float *sg = scores + g * ctx, mx = -INFINITY;
        for (int64_t i = 0; i < ctx; i++) mx = sg[i] > mx ? sg[i] : mx;
        float inv = 1.f / exp_shifted(sg, mx, ctx, sg);
        for (int64_t i = 0; i < ctx; i++) sg[i] *= inv;
    }
#ifdef STRATA_AVX2
#if HEADS_PER_PASS == 3
    if (d == 64) {   /* three query heads' outputs in registers at a time */
        for (int64_t g = 0; g < G; g += 3) {
            if (G - g >= 3) values_heads(3, 8, cv, table, kvh, scores + g * ctx, ctx, out + g * d);
            else if (G - g == 2) values_heads(2, 8, cv, table, kvh, scores + g * ctx, ctx, out + g * d);
            else values_heads(1, 8, cv, table, kvh, scores + g * ctx, ctx, out + g * d);
        }
        return;
    }
#endif
    if (d % 8 == 0 && d <= 128) {   /* a head's output in registers over all values */
        const int64_t vecs = d / 8;
        for (int64_t g = 0; g < G; g++) {
            __m256 acc[16];
            for (int64_t c = 0; c < vecs; c++) acc[c] = _mm256_setzero_ps();
            row_walk values = walk_start(cv, table, kvh, cv->plane_stride);
            for (int64_t i = 0; i < ctx; i++) {
                const float *value = walk_next(&values);
                __m256 p = _mm256_set1_ps(scores[g * ctx + i]);
                for (int64_t c = 0; c < vecs; c++) acc[c] = _mm256_fmadd_ps(p, _mm256_loadu_ps(value + 8 * c), acc[c]);
            }
            for (int64_t c = 0; c < vecs; c++) _mm256_storeu_ps(out + g * d + 8 * c, acc[c]);
        }
        return;
    }
#endif
    for (int64_t g = 0; g < G; g++) memset(out + g * d, 0, sizeof(float) * (size_t)d);
    row_walk values = walk_start(cv, table, kvh, cv->plane_stride);
    for (int64_t i = 0; i < ctx; i++) {
        const float *value = walk_next(&values);
        for (int64_t g = 0; g < G; g++) axpy(scores[g * ctx + i], value, out + g * d, d);
    }
}

int strata_attention_items(const int32_t *seq_lens, const int32_t *query_start_loc, int64_t num_seqs,
                           int64_t kv_heads, int64_t groups, int chunk, int nthreads,
                           strata_attention_item item, const void *arg) {
    const int64_t n = query_start_loc[num_seqs];
    int64_t max_ctx = 1;
    for (int64_t s = 0; s < num_seqs; s++) max_ctx = seq_lens[s] > max_ctx ? seq_lens[s] : max_ctx;
    int64_t *seq_of = malloc(sizeof(int64_t) * (size_t)(n + 1));
    if (seq_of == NULL) return 1;
    for (int64_t s = 0; s < num_seqs; s++)
        for (int64_t t = query_start_loc[s]; t < query_start_loc[s + 1]; t++) seq_of[t] = s;
    int failed = 0;
    #pragma omp parallel num_threads(nthreads) if (n * kv_heads > 1)
    {
        float *scores = malloc(sizeof(float) * (size_t)(max_ctx * groups));
        if (scores == NULL) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, chunk)
        for (int64_t it = 0; it < n * kv_heads; it++) {
            if (scores == NULL) continue;
            int64_t t = it / kv_heads, kvh = it % kv_heads, s = seq_of[t];
            int64_t q_len = query_start_loc[s + 1] - query_start_loc[s];
            item(arg, t, s, seq_lens[s] - q_len + (t - query_start_loc[s]) + 1, kvh, scores);
        }
        free(scores);
    }
    free(seq_of);
    return failed;
}

typedef struct {
    strata_cache_view cv;
    const float *q;
    float *out;
    int64_t q_stride, heads;
} float_attention;

static void float_attention_item(const void *arg, int64_t t, int64_t s, int64_t ctx, int64_t kvh, float *scores) {
    const float_attention *a = arg;
    const int64_t groups = a->cv.groups, d = a->cv.head_dim;
    strata_attend(&a->cv, a->q + t * a->q_stride + kvh * groups * d, a->out + (t * a->heads + kvh * groups) * d,
                  s, ctx, kvh, scores);
}

int strata_paged_attention(const float *q, int64_t q_stride, float *out, const float *kv_cache,
                           int64_t plane_stride, int64_t block_size, int64_t heads, int64_t kv_heads,
                           int64_t head_dim, const int32_t *block_tables, int64_t bt_stride,
                           const int32_t *seq_lens, const int32_t *query_start_loc, int64_t num_seqs,
                           float scale, int nthreads) {
    const int64_t groups = heads / kv_heads;
    float_attention a = {{kv_cache, plane_stride, block_size, kv_heads, head_dim, groups, bt_stride, block_tables,
                          scale}, q, out, q_stride, heads};
    return strata_attention_items(seq_lens, query_start_loc, num_seqs, kv_heads, groups, 4, nthreads,
                                  float_attention_item, &a);
}

/* ---- attention for long query chunks (prefill), as GEMM tiles -----------------------------------
 * The same attention as strata_paged_attention, organised for many query tokens per sequence:
 * each (sequence, KV head) has its keys gathered once into panels of 16 keys laid out
 * [head_dim][16] and its values into rows [keys][head_dim] (zero past the context), then each
 * tile of GEMM_TILE_ROWS query tokens of one query head takes its scores against the keys it
 * may see as GEMM tiles (strata_gemm_tile), a softmax per row (scaled scores, max subtracted),
 * and its output as GEMM tiles of the probabilities times 16 columns of the values. A causal
 * tile reads only the key panels up to its last token. head_dim must be a multiple of 16.
 * A sequence with fewer than TILED_MIN_QUERY query tokens (a decode beside a prompt) is not
 * gathered: its tokens attend as in strata_paged_attention (one item per token and KV head), as
 * gathering a whole context for one row costs about what attending over it does. */
#define TILED_MIN_QUERY 16
typedef struct {
    const float *q;
    float *out, *packed;            /* packed: the window's gathered keys and values */
    const int64_t *packed_at;
    int64_t packed_from;            /* packed_at of the window's first sequence */
    int64_t q_stride, heads, groups, head_dim, max_ctx16;
    const int32_t *seq_lens, *query_start_loc;
    float scale;
} tiled_attention;

static inline int64_t query_len(const int32_t *query_start_loc, int64_t s) {
    return query_start_loc[s + 1] - query_start_loc[s];
}

static inline int64_t round16(int64_t n) {
    return (n + 15) / 16 * 16;
}

/* The end of the window of sequences from s0: those whose gathered keys and values fit
 * max_floats together, one at least. */
static int64_t window_end(const int64_t *packed_at, int64_t num_seqs, int64_t s0, int64_t max_floats) {
    int64_t s1 = s0 + 1;
    while (s1 < num_seqs && packed_at[s1 + 1] - packed_at[s0] <= max_floats) s1++;
    return s1;
}

static void gather_keys_values(const strata_cache_view *cv, int64_t s, int64_t kvh, int64_t ctx, float *kp, float *vr) {
    const int64_t d = cv->head_dim, ctx16 = round16(ctx);
    row_walk keys = walk_start(cv, cv->block_tables + s * cv->bt_stride, kvh, 0);
    row_walk values = walk_start(cv, cv->block_tables + s * cv->bt_stride, kvh, cv->plane_stride);
    for (int64_t j = 0; j < ctx; j++) {
        const float *key = walk_next(&keys);
        float *panel = kp + (j / 16) * 16 * d + j % 16;
        for (int64_t c = 0; c < d; c++) panel[16 * c] = key[c];
        memcpy(vr + j * d, walk_next(&values), sizeof(float) * (size_t)d);
    }
    for (int64_t j = ctx; j < ctx16; j++) {
        float *panel = kp + (j / 16) * 16 * d + j % 16;
        for (int64_t c = 0; c < d; c++) panel[16 * c] = 0.f;
        memset(vr + j * d, 0, sizeof(float) * (size_t)d);
    }
}

static void attention_tile(const tiled_attention *a, int64_t s, int64_t head, int64_t t0, float *scores) {
    const int64_t d = a->head_dim, kvh = head / a->groups;
    const int64_t first = a->query_start_loc[s], q_len = query_len(a->query_start_loc, s);
    const int64_t ctx = a->seq_lens[s], past = ctx - q_len;
    const int rows = (int)(q_len - t0 < GEMM_TILE_ROWS ? q_len - t0 : GEMM_TILE_ROWS);
    const int64_t seen16 = round16(past + t0 + rows), lds = a->max_ctx16, ctx16 = round16(ctx);
    const float *kp = a->packed + (a->packed_at[s] - a->packed_from) + kvh * 2 * ctx16 * d, *vr = kp + ctx16 * d;
    const float *q = a->q + (first + t0) * a->q_stride + head * d;
    for (int64_t j = 0; j < seen16; j += 16)
        strata_gemm_tile(rows, q, a->q_stride, kp + j * d, 16, d, scores + j, lds, 0);
    for (int i = 0; i < rows; i++) {
        float *row = scores + i * lds;
        const int64_t visible = past + t0 + i + 1;
        for (int64_t j = 0; j < visible; j++) row[j] *= a->scale;
        strata_softmax_row(row, visible);
        memset(row + visible, 0, sizeof(float) * (size_t)(seen16 - visible));
    }
    float *out = a->out + ((first + t0) * a->heads + head) * d;
    for (int64_t c = 0; c < d; c += 16)
        strata_gemm_tile(rows, scores, lds, vr + c, d, seen16, out + c, a->heads * d, 0);
}

int strata_tiled_attention(const float *q, int64_t q_stride, float *out, const float *kv_cache, int64_t plane_stride,
                           int64_t block_size, int64_t heads, int64_t kv_heads, int64_t head_dim,
                           const int32_t *block_tables, int64_t bt_stride, const int32_t *seq_lens,
                           const int32_t *query_start_loc, int64_t num_seqs, float scale, int nthreads,
                           int64_t max_packed_floats) {
    const int64_t groups = heads / kv_heads, d = head_dim;
    if (d % 16) return 2;
    const strata_cache_view cv = {kv_cache, plane_stride, block_size, kv_heads, d, groups, bt_stride, block_tables, scale};
    /* packed_at[s]: sequence s's gathered keys and values (none for a short query); tile_at[s]:
     * its first work item (heads x tiles, or tokens x KV heads for a short query). */
    int64_t *packed_at = malloc(sizeof(int64_t) * (size_t)(2 * num_seqs + 2));
    if (packed_at == NULL) return 1;
    int64_t *tile_at = packed_at + num_seqs + 1;
    int64_t max_ctx16 = 16;
    packed_at[0] = tile_at[0] = 0;
    for (int64_t s = 0; s < num_seqs; s++) {
        const int64_t ctx16 = round16(seq_lens[s]), q_len = query_len(query_start_loc, s);
        const int tiled = q_len >= TILED_MIN_QUERY;
        max_ctx16 = ctx16 > max_ctx16 ? ctx16 : max_ctx16;
        packed_at[s + 1] = packed_at[s] + (tiled ? kv_heads * 2 * ctx16 * d : 0);
        tile_at[s + 1] = tile_at[s] + (tiled ? heads * ((q_len + GEMM_TILE_ROWS - 1) / GEMM_TILE_ROWS) : q_len * kv_heads);
    }
    /* Sequences go in windows whose gathered keys and values fit max_packed_floats (at least one
     * sequence a window), so a step of many long contexts does not gather all of them at once. */
    int64_t window = 1;
    for (int64_t s0 = 0, s1; s0 < num_seqs; s0 = s1) {
        s1 = window_end(packed_at, num_seqs, s0, max_packed_floats);
        window = packed_at[s1] - packed_at[s0] > window ? packed_at[s1] - packed_at[s0] : window;
    }
    float *packed = malloc(sizeof(float) * (size_t)window);
    if (packed == NULL) {
        free(packed_at);
        return 1;
    }
    int failed = 0;
    for (int64_t s0 = 0, s1; s0 < num_seqs && !failed; s0 = s1) {
        s1 = window_end(packed_at, num_seqs, s0, max_packed_floats);
        tiled_attention a = {q, out, packed, packed_at, packed_at[s0], q_stride, heads, groups, d, max_ctx16,
                             seq_lens, query_start_loc, scale};
        #pragma omp parallel num_threads(nthreads)
        {
            #pragma omp for schedule(static)
            for (int64_t it = s0 * kv_heads; it < s1 * kv_heads; it++) {
                const int64_t s = it / kv_heads, kvh = it % kv_heads, ctx = seq_lens[s], ctx16 = round16(ctx);
                if (query_len(query_start_loc, s) < TILED_MIN_QUERY) continue;
                float *kp = packed + (packed_at[s] - packed_at[s0]) + kvh * 2 * ctx16 * d;
                gather_keys_values(&cv, s, kvh, ctx, kp, kp + ctx16 * d);
            }
            const int64_t rows = GEMM_TILE_ROWS > groups ? GEMM_TILE_ROWS : groups;
            float *scores = malloc(sizeof(float) * (size_t)(rows * max_ctx16));
            if (scores == NULL) {
                #pragma omp atomic write
                failed = 1;
            }
            /* Last tiles first: under the causal mask they see the most keys. */
            #pragma omp for schedule(dynamic, 1)
            for (int64_t it = tile_at[s1] - 1; it >= tile_at[s0]; it--) {
                if (scores == NULL) continue;
                int64_t s = s0, hi = s1 - 1;   /* the sequence whose items hold item it */
                while (s < hi) {
                    const int64_t mid = (s + hi + 1) / 2;
                    if (tile_at[mid] <= it) s = mid; else hi = mid - 1;
                }
                const int64_t local = it - tile_at[s], q_len = query_len(query_start_loc, s);
                if (q_len >= TILED_MIN_QUERY) {
                    attention_tile(&a, s, local % heads, (local / heads) * GEMM_TILE_ROWS, scores);
                } else {
                    const int64_t t = query_start_loc[s] + local / kv_heads, kvh = local % kv_heads;
                    strata_attend(&cv, q + t * q_stride + kvh * groups * d, out + (t * heads + kvh * groups) * d, s,
                                  seq_lens[s] - q_len + local / kv_heads + 1, kvh, scores);
                }
            }
            free(scores);
        }
    }
    free(packed);
    free(packed_at);
    return failed;
}

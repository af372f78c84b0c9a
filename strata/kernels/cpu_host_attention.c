/* Attention over a paged KV cache held in 16-bit floats (bfloat16 or float16), or in int8 codes
 * with scales (kv_cache_dtype int8, at the end of this file), in host RAM:
 * offloading's host KV tier (strata/attention/host_tier.py), where the CPU attends for the
 * sequences whose cache lives in RAM while the GPU goes on with other work.
 *
 * A block holds its keys token-major (each key's heads side by side) or head-major (each head's
 * keys side by side, the host tier's layout: one run per head and block); the kernels take the
 * layout as strides. The cache is read in place through the block tables, each key and value
 * converted to float32 in registers as it is used: upcasting the gathered context first (what
 * the torch path does) writes and reads the whole context once more, and the context is most of
 * the bytes a decode step touches. q and out are float32 (a step's queries are small). Work
 * items are (token, KV head) pairs over OpenMP threads; the query heads sharing a KV head (GQA)
 * score each key while it is in registers. Token t of sequence s sees the keys up to its own
 * position (causal; a decode token sees the whole context), as in strata_paged_attention
 * (cpu_ops.c). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HOST_AVX2 1
#endif

enum { KV_BF16 = 1, KV_F16 = 2 };

static float half_to_float(uint16_t h, int kind) {
    uint32_t bits;
    if (kind == KV_BF16) {
        bits = (uint32_t)h << 16;
    } else {   /* IEEE half: sign, 5-bit exponent, 10-bit mantissa */
        uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
        if (exp == 0x1f) {
            bits = sign | 0x7f800000u | (man << 13);
        } else if (exp != 0) {
            bits = sign | ((exp + 112) << 23) | (man << 13);
        } else if (man == 0) {
            bits = sign;
        } else {   /* subnormal: value = man * 2^-24 */
            float f = (float)man * 5.9604644775390625e-8f;
            memcpy(&bits, &f, 4);
            bits |= sign;
        }
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#ifdef HOST_AVX2
static inline __m256 load8(const uint16_t *p, int kind) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
#ifdef __F16C__
    if (kind == KV_F16) return _mm256_cvtph_ps(h);
#else
    if (kind == KV_F16) {
        float tmp[8];
        for (int i = 0; i < 8; i++) tmp[i] = half_to_float(p[i], kind);
        return _mm256_loadu_ps(tmp);
    }
#endif
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

#ifdef HOST_AVX2
/* Calls fn(args..., G) with G a compile-time constant for 1, 2, 4 and 8 query heads per KV head
 * (the register paths are written for one; an always-inline function is compiled once per
 * constant), with the run-time G for other counts up to 8, and returns; falls through past 8. */
#define WITH_CONSTANT_G(fn, ...) do {                                                               \
        switch (G) {                                                                                \
            case 1: fn(__VA_ARGS__, 1); return;                                                     \
            case 2: fn(__VA_ARGS__, 2); return;                                                     \
            case 4: fn(__VA_ARGS__, 4); return;                                                     \
            case 8: fn(__VA_ARGS__, 8); return;                                                     \
            default: if (G < 8) { fn(__VA_ARGS__, G); return; }                                     \
        }                                                                                           \
    } while (0)
/* Calls fn(args..., G) with G a compile-time 1, 2 or 4 (paths written for those only; the caller
 * has checked G), and goes on after it. */
#define WITH_G_1_2_4(fn, ...) do {                                                                  \
        switch (G) {                                                                                \
            case 1: fn(__VA_ARGS__, 1); break;                                                      \
            case 2: fn(__VA_ARGS__, 2); break;                                                      \
            default: fn(__VA_ARGS__, 4); break;                                                     \
        }                                                                                           \
    } while (0)
#endif

typedef struct {
    const uint16_t *kv;
    int64_t plane_stride, block_size, kv_heads, head_dim, groups, bt_stride;
    int64_t key_stride, head_stride;   /* elements between a head's consecutive keys / between heads */
    const int32_t *block_tables;
    float scale;
    int kind;
} half_view;

static inline const uint16_t *token_row(const half_view *v, const int32_t *table, int64_t j, int64_t kvh) {
    return v->kv + (int64_t)table[j / v->block_size] * v->block_size * v->kv_heads * v->head_dim
        + j % v->block_size * v->key_stride + kvh * v->head_stride;
}

#ifdef HOST_AVX2
/* Keys ahead of the one in use whose rows are fetched into the cache: blocks lie at random
 * addresses and a head's row is a few lines of a wider token row, so the hardware prefetcher
 * does not see them coming (without it a key or value row took an L3/DRAM latency each).
 *
 * The helpers that prefetch are always inlined: GCC (12) finds a function whose only effect is
 * a prefetch "looping const" and deletes the calls, so built as plain static inline functions
 * these helpers prefetched nothing at all. */
#ifndef PREFETCH_KEYS
#define PREFETCH_KEYS 16
#endif
#define PREFETCHING static inline __attribute__((always_inline))

PREFETCHING void prefetch_row(const uint16_t *row, int64_t d) {
    for (int64_t off = 0; off < d; off += 32) _mm_prefetch((const char *)(row + off), _MM_HINT_T0);
}

/* The row of key j + PREFETCH_KEYS (block base `base` holds n keys from j0; `next` is the next
 * block's base, NULL at the end of the context). */
PREFETCHING const uint16_t *row_ahead(const uint16_t *base, const uint16_t *next, int64_t j, int64_t n,
                                      int64_t row, int64_t ctx_left) {
    const int64_t a = j + PREFETCH_KEYS;
    if (a < n) return base + a * row;
    if (next == NULL || a - n >= ctx_left - n) return NULL;
    return next + (a - n) * row;
}

/* The row of head kvh of the block holding key j0 (its first key), in the K (plane 0) or V
 * (plane 1) half of the cache; NULL past the context. */
static inline const uint16_t *block_rows(const half_view *v, const int32_t *table, int64_t j0, int64_t ctx,
                                         int64_t kvh, int plane) {
    if (j0 >= ctx) return NULL;
    return v->kv + plane * v->plane_stride
        + (int64_t)table[j0 / v->block_size] * v->block_size * v->kv_heads * v->head_dim + kvh * v->head_stride;
}

/* At a block's start, the next block's rows of this head into L2 (n of them; next NULL: none),
 * a block's time ahead of the L1 fetches above: on an H100 host's 15 threads +4-7% (bf16, batch
 * 96 and 235, 2 rounds). */
PREFETCHING void prefetch_block_l2(const uint16_t *next, int64_t n, int64_t row, int64_t d) {
    if (next)
        for (int64_t j = 0; j < n; j++)
            for (int64_t off = 0; off < d; off += 32) _mm_prefetch((const char *)(next + j * row + off), _MM_HINT_T1);
}

/* Fetch the row PREFETCH_KEYS keys after key j of the block at base (n keys from j0). */
PREFETCHING void prefetch_ahead(const uint16_t *base, const uint16_t *next, int64_t j, int64_t n, int64_t row,
                                int64_t ctx_left, int64_t d) {
    const uint16_t *p = row_ahead(base, next, j, n, row, ctx_left);
    if (p) prefetch_row(p, d);
}

/* The register paths below are written for a compile-time G (the switch in score_keys and
 * weigh_values inlines them with G = 1, 2, 4 or 8), so the accumulators stay in registers.
 * Keys are walked block by block: no division per key. */
static inline __attribute__((always_inline)) void score_keys_g(const half_view *v, const int32_t *table,
                                                                int64_t ctx, int64_t kvh, const float *q,
                                                                float *scores, const int64_t G) {
    const int64_t d = v->head_dim, bs = v->block_size, row = v->key_stride;
    for (int64_t j0 = 0; j0 < ctx; j0 += bs) {
        const uint16_t *base = block_rows(v, table, j0, ctx, kvh, 0), *next = block_rows(v, table, j0 + bs, ctx, kvh, 0);
        const int64_t n = ctx - j0 < bs ? ctx - j0 : bs;
        int64_t j = 0;
        for (; j + 2 <= n; j += 2) {   /* two keys at once: twice the independent FMA chains */
            const uint16_t *k0 = base + j * row, *k1 = k0 + row;
            prefetch_ahead(base, next, j, n, row, ctx - j0, d);
            prefetch_ahead(base, next, j + 1, n, row, ctx - j0, d);
            __m256 a0[8], a1[8];
            for (int64_t g = 0; g < G; g++) a0[g] = a1[g] = _mm256_setzero_ps();
            for (int64_t c = 0; c < d; c += 8) {
                __m256 x0 = load8(k0 + c, v->kind), x1 = load8(k1 + c, v->kind);
                for (int64_t g = 0; g < G; g++) {
                    __m256 qg = _mm256_loadu_ps(q + g * d + c);
                    a0[g] = _mm256_fmadd_ps(qg, x0, a0[g]);
                    a1[g] = _mm256_fmadd_ps(qg, x1, a1[g]);
                }
            }
            for (int64_t g = 0; g < G; g++) {
                scores[g * ctx + j0 + j] = sum8(a0[g]) * v->scale;
                scores[g * ctx + j0 + j + 1] = sum8(a1[g]) * v->scale;
            }
        }
        for (; j < n; j++) {
            const uint16_t *k0 = base + j * row;
            __m256 a0[8];
            for (int64_t g = 0; g < G; g++) a0[g] = _mm256_setzero_ps();
            for (int64_t c = 0; c < d; c += 8) {
                __m256 x0 = load8(k0 + c, v->kind);
                for (int64_t g = 0; g < G; g++) a0[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * d + c), x0, a0[g]);
            }
            for (int64_t g = 0; g < G; g++) scores[g * ctx + j0 + j] = sum8(a0[g]) * v->scale;
        }
    }
}

/* out [G, d]: 16 columns at a time over every key, 2 * G accumulators in registers (the value
 * rows of one item stay in L1/L2 between column passes). */
static inline __attribute__((always_inline)) void weigh_values_g(const half_view *v, const int32_t *table,
                                                                  int64_t ctx, int64_t kvh, const float *w,
                                                                  float *out, const int64_t G) {
    const int64_t d = v->head_dim, bs = v->block_size, row = v->key_stride;
    for (int64_t c = 0; c < d; c += 16) {
        const int two = c + 16 <= d;
        __m256 lo[8], hi[8];
        for (int64_t g = 0; g < G; g++) lo[g] = hi[g] = _mm256_setzero_ps();
        for (int64_t j0 = 0; j0 < ctx; j0 += bs) {
            const uint16_t *base = block_rows(v, table, j0, ctx, kvh, 1) + c;
            const uint16_t *next = c == 0 ? block_rows(v, table, j0 + bs, ctx, kvh, 1) : NULL;
            const int64_t n = ctx - j0 < bs ? ctx - j0 : bs;
            prefetch_block_l2(next, ctx - j0 - bs < bs ? ctx - j0 - bs : bs, row, d);
            for (int64_t j = 0; j < n; j++) {
                if (c == 0)   /* the first column pass brings the rows in; the others find them */
                    prefetch_ahead(base, next, j, n, row, ctx - j0, d);
                __m256 x0 = load8(base + j * row, v->kind);
                __m256 x1 = two ? load8(base + j * row + 8, v->kind) : _mm256_setzero_ps();
                for (int64_t g = 0; g < G; g++) {
                    __m256 wg = _mm256_broadcast_ss(w + g * ctx + j0 + j);
                    lo[g] = _mm256_fmadd_ps(wg, x0, lo[g]);
                    hi[g] = _mm256_fmadd_ps(wg, x1, hi[g]);
                }
            }
        }
        for (int64_t g = 0; g < G; g++) {
            _mm256_storeu_ps(out + g * d + c, lo[g]);
            if (two) _mm256_storeu_ps(out + g * d + c + 8, hi[g]);
        }
    }
}
#endif

/* bfloat16 keys and values without widening each 8 separately: one 256-bit load holds 16 values,
 * lane i has value 2i in its low half and 2i + 1 in its high half, so a shift gives the even
 * values as float32 and a mask the odd ones (a load and two ALU ops per 16, against two loads
 * and four ops). The scores pair them with q permuted the same way (qp: per 16 columns, the 8
 * even then the 8 odd values); the outputs come out even/odd and are interleaved once at the end.
 * Two keys' G <= 4 scores are summed across lanes together (one transposed reduction instead of
 * a horizontal sum per score). */
#ifdef HOST_AVX2
enum { BF16_MAX_D = 256 };

static inline __m256 reduce8(__m256 v0, __m256 v1, __m256 v2, __m256 v3, __m256 v4, __m256 v5, __m256 v6,
                             __m256 v7) {
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(v4, v5), _mm256_hadd_ps(v6, v7));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* Two keys' 16 values from column c (lo: 8 of them, hi: the other 8, as floats) times the same 16
 * columns of the G query rows q + g * d, laid out as the keys' values are, into the keys'
 * accumulators a0[g] and a1[g]. */
static inline __attribute__((always_inline)) void fma_key_pair(const float *q, int64_t d, int64_t c, __m256 lo0,
                                                                __m256 hi0, __m256 lo1, __m256 hi1, __m256 *a0,
                                                                __m256 *a1, const int64_t G) {
    for (int64_t g = 0; g < G; g++) {
        const __m256 ql = _mm256_loadu_ps(q + g * d + c), qh = _mm256_loadu_ps(q + g * d + c + 8);
        a0[g] = _mm256_fmadd_ps(ql, lo0, a0[g]);
        a1[g] = _mm256_fmadd_ps(ql, lo1, a1[g]);
        a0[g] = _mm256_fmadd_ps(qh, hi0, a0[g]);
        a1[g] = _mm256_fmadd_ps(qh, hi1, a1[g]);
    }
}

/* scores[g * ctx + j] = the sum of a0[g]'s lanes times s0, and (pair) scores[g * ctx + j + 1] = a1[g]'s
 * times s1: for G = 4 the two keys' 8 sums in one transposed reduction. */
static inline __attribute__((always_inline)) void store_pair_scores(const __m256 *a0, const __m256 *a1, float s0,
                                                                     float s1, int pair, float *scores, int64_t ctx,
                                                                     int64_t j, const int64_t G) {
    if (G == 4) {
        float sums[8];
        _mm256_storeu_ps(sums, reduce8(a0[0], a0[1], a0[2], a0[3], a1[0], a1[1], a1[2], a1[3]));
        for (int64_t g = 0; g < 4; g++) {
            scores[g * ctx + j] = sums[g] * s0;
            if (pair) scores[g * ctx + j + 1] = sums[4 + g] * s1;
        }
        return;
    }
    for (int64_t g = 0; g < G; g++) {
        scores[g * ctx + j] = sum8(a0[g]) * s0;
        if (pair) scores[g * ctx + j + 1] = sum8(a1[g]) * s1;
    }
}

static inline void bf16_even_odd(const uint16_t *p, __m256 *even, __m256 *odd) {
    const __m256i x = _mm256_loadu_si256((const __m256i *)p);
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
    *odd = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32((int)0xFFFF0000u)));
}

static inline __attribute__((always_inline)) void score_keys_bf16_g(const half_view *v, const int32_t *table,
                                                                     int64_t ctx, int64_t kvh, const float *qp,
                                                                     float *scores, const int64_t G) {
    const int64_t d = v->head_dim, bs = v->block_size, row = v->key_stride;
    for (int64_t j0 = 0; j0 < ctx; j0 += bs) {
        const uint16_t *base = block_rows(v, table, j0, ctx, kvh, 0), *next = block_rows(v, table, j0 + bs, ctx, kvh, 0);
        const int64_t n = ctx - j0 < bs ? ctx - j0 : bs;
        prefetch_block_l2(next, ctx - j0 - bs < bs ? ctx - j0 - bs : bs, row, d);
        for (int64_t j = 0; j < n; j += 2) {
            const int pair = j + 1 < n;
            const uint16_t *k0 = base + j * row, *k1 = pair ? k0 + row : k0;
            prefetch_ahead(base, next, j, n, row, ctx - j0, d);
            prefetch_ahead(base, next, j + 1, n, row, ctx - j0, d);
            __m256 a0[4], a1[4];
            for (int64_t g = 0; g < G; g++) a0[g] = a1[g] = _mm256_setzero_ps();
            for (int64_t c = 0; c < d; c += 16) {
                __m256 e0, o0, e1, o1;
                bf16_even_odd(k0 + c, &e0, &o0);
                bf16_even_odd(k1 + c, &e1, &o1);
                fma_key_pair(qp, d, c, e0, o0, e1, o1, a0, a1, G);
            }
            store_pair_scores(a0, a1, v->scale, v->scale, pair, scores, ctx, j0 + j, G);
        }
    }
}

static inline __attribute__((always_inline)) void weigh_values_bf16_g(const half_view *v, const int32_t *table,
                                                                       int64_t ctx, int64_t kvh, const float *w,
                                                                       float *out, const int64_t G) {
    const int64_t d = v->head_dim, bs = v->block_size, row = v->key_stride;
    for (int64_t c = 0; c < d; c += 16) {
        __m256 even[4], odd[4];
        for (int64_t g = 0; g < G; g++) even[g] = odd[g] = _mm256_setzero_ps();
        for (int64_t j0 = 0; j0 < ctx; j0 += bs) {
            const uint16_t *base = block_rows(v, table, j0, ctx, kvh, 1);
            const uint16_t *next = c == 0 ? block_rows(v, table, j0 + bs, ctx, kvh, 1) : NULL;
            const int64_t n = ctx - j0 < bs ? ctx - j0 : bs;
            prefetch_block_l2(next, ctx - j0 - bs < bs ? ctx - j0 - bs : bs, row, d);
            for (int64_t j = 0; j < n; j++) {
                if (c == 0)   /* the first column pass brings the rows in; the others find them */
                    prefetch_ahead(base, next, j, n, row, ctx - j0, d);
                __m256 e, o;
                bf16_even_odd(base + j * row + c, &e, &o);
                for (int64_t g = 0; g < G; g++) {
                    const __m256 wg = _mm256_broadcast_ss(w + g * ctx + j0 + j);
                    even[g] = _mm256_fmadd_ps(wg, e, even[g]);
                    odd[g] = _mm256_fmadd_ps(wg, o, odd[g]);
                }
            }
        }
        for (int64_t g = 0; g < G; g++) {   /* lanes (2i, 2i + 1) back in column order */
            const __m256 lo = _mm256_unpacklo_ps(even[g], odd[g]), hi = _mm256_unpackhi_ps(even[g], odd[g]);
            _mm256_storeu_ps(out + g * d + c, _mm256_permute2f128_ps(lo, hi, 0x20));
            _mm256_storeu_ps(out + g * d + c + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
        }
    }
}

/* The bfloat16 register path for G = 1, 2 or 4 query heads per KV head, d a multiple of 16 up to
 * BF16_MAX_D; returns 0 where it does not apply. */
static int attend_bf16(const half_view *v, const int32_t *table, int64_t ctx, int64_t kvh, const float *q,
                       float *scores, float *out) {
    const int64_t d = v->head_dim, G = v->groups;
    if (v->kind != KV_BF16 || d % 16 != 0 || d > BF16_MAX_D || (G != 1 && G != 2 && G != 4)) return 0;
    float qp[4 * BF16_MAX_D];
    for (int64_t g = 0; g < G; g++)
        for (int64_t c = 0; c < d; c += 16)
            for (int64_t i = 0; i < 8; i++) {
                qp[g * d + c + i] = q[g * d + c + 2 * i];
                qp[g * d + c + 8 + i] = q[g * d + c + 2 * i + 1];
            }
    WITH_G_1_2_4(score_keys_bf16_g, v, table, ctx, kvh, qp, scores);
    for (int64_t g = 0; g < G; g++) strata_softmax_row(scores + g * ctx, ctx);
    WITH_G_1_2_4(weigh_values_bf16_g, v, table, ctx, kvh, scores, out);
    return 1;
}
#endif

#if defined(HOST_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__)
#define HOST_AVX512 1

/* The sum of x's two 256-bit halves (16 partial sums to 8, for store_pair_scores). */
static inline __m256 half_sum(__m512 x) {
    return _mm256_add_ps(_mm512_castps512_ps256(x), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
}
#endif

/* AVX-512 with BF16 (Sapphire Rapids, Zen 4): the scores by vdpbf16ps, 32 products of a key row
 * and the query per instruction, where the 8-wide path takes four FMAs and the conversions; the
 * weighted values by the 16-wide form of the even/odd split above. On an H100 host (Xeon, 15
 * threads, bf16, batch 96 and 235) it attended 8% faster than the 8-wide path (55 against 51
 * GiB/s, 2 rounds): less than its instruction count promises, as the memory's latency is most
 * of what a thread waits for.
 *
 * The query goes in as bfloat16: exact for the host tier's queries, which are a bfloat16 model's
 * values sent down as float32 (a float32 query would be rounded here; the 8-wide path keeps it).
 * Products of two bfloat16 values are exact in float32, so only the order of the float32
 * additions differs from the 8-wide path. Used for bfloat16 caches with G = 1, 2 or 4 and d a
 * multiple of 32 up to BF16_MAX_D. */
#if defined(HOST_AVX512) && defined(__AVX512BF16__)
#define HOST_AVX512_BF16 1

static inline __attribute__((always_inline)) void score_keys_dp_g(const half_view *v, const int32_t *table,
                                                                   int64_t ctx, int64_t kvh, const __m512bh *qb,
                                                                   float *scores, const int64_t G) {
    const int64_t d = v->head_dim, bs = v->block_size, row = v->key_stride, chunks = d / 32;
    for (int64_t j0 = 0; j0 < ctx; j0 += bs) {
        const uint16_t *base = block_rows(v, table, j0, ctx, kvh, 0), *next = block_rows(v, table, j0 + bs, ctx, kvh, 0);
        const int64_t n = ctx - j0 < bs ? ctx - j0 : bs;
        prefetch_block_l2(next, ctx - j0 - bs < bs ? ctx - j0 - bs : bs, row, d);
        for (int64_t j = 0; j < n; j += 2) {
            const int pair = j + 1 < n;
            const uint16_t *k0 = base + j * row, *k1 = pair ? k0 + row : k0;
            prefetch_ahead(base, next, j, n, row, ctx - j0, d);
            prefetch_ahead(base, next, j + 1, n, row, ctx - j0, d);
            __m512 a0[4], a1[4];
            for (int64_t g = 0; g < G; g++) a0[g] = a1[g] = _mm512_setzero_ps();
            for (int64_t c = 0; c < chunks; c++) {
                const __m512bh x0 = (__m512bh)_mm512_loadu_si512(k0 + 32 * c);
                const __m512bh x1 = (__m512bh)_mm512_loadu_si512(k1 + 32 * c);
                for (int64_t g = 0; g < G; g++) {
                    a0[g] = _mm512_dpbf16_ps(a0[g], qb[g * chunks + c], x0);
                    a1[g] = _mm512_dpbf16_ps(a1[g], qb[g * chunks + c], x1);
                }
            }
            __m256 h0[4], h1[4];
            for (int64_t g = 0; g < G; g++) {
                h0[g] = half_sum(a0[g]);
                h1[g] = half_sum(a1[g]);
            }
            store_pair_scores(h0, h1, v->scale, v->scale, pair, scores, ctx, j0 + j, G);
        }
    }
}

/* out [G, d]: 32 columns at a time, their even and odd values in 2 * G accumulators. */
static inline __attribute__((always_inline)) void weigh_values_512_g(const half_view *v, const int32_t *table,
                                                                      int64_t ctx, int64_t kvh, const float *w,
                                                                      float *out, const int64_t G) {
    const int64_t d = v->head_dim, bs = v->block_size, row = v->key_stride;
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
    for (int64_t c = 0; c < d; c += 32) {
        __m512 even[4], odd[4];
        for (int64_t g = 0; g < G; g++) even[g] = odd[g] = _mm512_setzero_ps();
        for (int64_t j0 = 0; j0 < ctx; j0 += bs) {
            const uint16_t *base = block_rows(v, table, j0, ctx, kvh, 1);
            const uint16_t *next = c == 0 ? block_rows(v, table, j0 + bs, ctx, kvh, 1) : NULL;
            const int64_t n = ctx - j0 < bs ? ctx - j0 : bs;
            prefetch_block_l2(next, ctx - j0 - bs < bs ? ctx - j0 - bs : bs, row, d);
            for (int64_t j = 0; j < n; j++) {
                if (c == 0)   /* the first column pass brings the rows in; the others find them */
                    prefetch_ahead(base, next, j, n, row, ctx - j0, d);
                const __m512i x = _mm512_loadu_si512(base + j * row + c);
                const __m512 e = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
                const __m512 o = _mm512_castsi512_ps(_mm512_and_si512(x, high));
                for (int64_t g = 0; g < G; g++) {
                    const __m512 wg = _mm512_set1_ps(w[g * ctx + j0 + j]);
                    even[g] = _mm512_fmadd_ps(wg, e, even[g]);
                    odd[g] = _mm512_fmadd_ps(wg, o, odd[g]);
                }
            }
        }
        for (int64_t g = 0; g < G; g++) {   /* lanes (2i, 2i + 1) back in column order */
            float e[16], o[16];
            _mm512_storeu_ps(e, even[g]);
            _mm512_storeu_ps(o, odd[g]);
            for (int64_t i = 0; i < 16; i++) {
                out[g * d + c + 2 * i] = e[i];
                out[g * d + c + 2 * i + 1] = o[i];
            }
        }
    }
}

/* The AVX-512 BF16 path; returns 0 where it does not apply. */
static int attend_bf16_512(const half_view *v, const int32_t *table, int64_t ctx, int64_t kvh, const float *q,
                           float *scores, float *out) {
    const int64_t d = v->head_dim, G = v->groups, chunks = d / 32;
    if (v->kind != KV_BF16 || d % 32 != 0 || d > BF16_MAX_D || (G != 1 && G != 2 && G != 4)) return 0;
    __m512bh qb[4 * BF16_MAX_D / 32];
    for (int64_t g = 0; g < G; g++)
        for (int64_t c = 0; c < chunks; c++)   /* (lo, hi) halves: bf16 i of the pair is q[32c + i] */
            qb[g * chunks + c] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + g * d + 32 * c + 16),
                                                     _mm512_loadu_ps(q + g * d + 32 * c));
    WITH_G_1_2_4(score_keys_dp_g, v, table, ctx, kvh, qb, scores);
    for (int64_t g = 0; g < G; g++) strata_softmax_row(scores + g * ctx, ctx);
    WITH_G_1_2_4(weigh_values_512_g, v, table, ctx, kvh, scores, out);
    return 1;
}
#endif

/* scores[g * ctx + j] = q_g . key_j * scale for the groups' query heads q [groups, d]. */
static void score_keys(const half_view *v, const int32_t *table, int64_t ctx, int64_t kvh, const float *q,
                       float *scores) {
    const int64_t d = v->head_dim, G = v->groups;
#ifdef HOST_AVX2
    if (d % 8 == 0) {
        WITH_CONSTANT_G(score_keys_g, v, table, ctx, kvh, q, scores);
    }
#endif
    for (int64_t j = 0; j < ctx; j++) {
        const uint16_t *key = token_row(v, table, j, kvh);
        for (int64_t g = 0; g < G; g++) {
            float sum = 0.f;
            for (int64_t c = 0; c < d; c++) sum += q[g * d + c] * half_to_float(key[c], v->kind);
            scores[g * ctx + j] = sum * v->scale;
        }
    }
}

/* out [groups, d] = sum over j of weights[g * ctx + j] * value_j. */
static void weigh_values(const half_view *v, const int32_t *table, int64_t ctx, int64_t kvh, const float *weights,
                         float *out) {
    const int64_t d = v->head_dim, G = v->groups;
#ifdef HOST_AVX2
    if (d % 8 == 0) {
        WITH_CONSTANT_G(weigh_values_g, v, table, ctx, kvh, weights, out);
    }
#endif
    memset(out, 0, sizeof(float) * (size_t)(G * d));
    for (int64_t j = 0; j < ctx; j++) {
        const uint16_t *value = token_row(v, table, j, kvh) + v->plane_stride;
        for (int64_t c = 0; c < d; c++) {
            float x = half_to_float(value[c], v->kind);
            for (int64_t g = 0; g < G; g++) out[g * d + c] += weights[g * ctx + j] * x;
        }
    }
}

typedef struct {
    half_view view;
    const float *q;
    float *out;
    int64_t q_stride, heads;
} half_attention;

static void half_attention_item(const void *arg, int64_t t, int64_t s, int64_t ctx, int64_t kvh, float *scores) {
    const half_attention *a = arg;
    const int64_t groups = a->view.groups, d = a->view.head_dim;
    const int32_t *table = a->view.block_tables + s * a->view.bt_stride;
#ifdef HOST_AVX512_BF16
    if (attend_bf16_512(&a->view, table, ctx, kvh, a->q + t * a->q_stride + kvh * groups * d, scores,
                        a->out + (t * a->heads + kvh * groups) * d))
        return;
#endif
#ifdef HOST_AVX2
    if (attend_bf16(&a->view, table, ctx, kvh, a->q + t * a->q_stride + kvh * groups * d, scores,
                    a->out + (t * a->heads + kvh * groups) * d))
        return;
#endif
    score_keys(&a->view, table, ctx, kvh, a->q + t * a->q_stride + kvh * groups * d, scores);
    for (int64_t g = 0; g < groups; g++) strata_softmax_row(scores + g * ctx, ctx);
    weigh_values(&a->view, table, ctx, kvh, scores, a->out + (t * a->heads + kvh * groups) * d);
}

/* q [n, heads, head_dim] float32 (rows q_stride floats apart), out [n, heads, head_dim] float32;
 * kv_cache [2, num_blocks, block_size, kv_heads, head_dim] of 16-bit floats (kind: 1 bfloat16,
 * 2 float16), plane_stride elements between K and V; a block's keys of one head key_stride
 * elements apart and its heads head_stride apart (kv_heads * head_dim and head_dim when the
 * block is token-major, head_dim and block_size * head_dim when head-major). Returns nonzero
 * when out of memory. */
int strata_paged_attention_half(const float *q, int64_t q_stride, float *out, const uint16_t *kv_cache,
                                int64_t plane_stride, int64_t block_size, int64_t heads, int64_t kv_heads,
                                int64_t head_dim, const int32_t *block_tables, int64_t bt_stride,
                                const int32_t *seq_lens, const int32_t *query_start_loc, int64_t num_seqs,
                                float scale, int kind, int64_t key_stride, int64_t head_stride, int nthreads) {
    const int64_t groups = heads / kv_heads;
    half_attention a = {{kv_cache, plane_stride, block_size, kv_heads, head_dim, groups, bt_stride, key_stride,
                         head_stride, block_tables, scale, kind}, q, out, q_stride, heads};
    return strata_attention_items(seq_lens, query_start_loc, num_seqs, kv_heads, groups, 2, nthreads,
                                  half_attention_item, &a);
}

/* An 8-bit cache (kv_cache_dtype int8, strata/quant/kv.py): codes [2, blocks, block_size,
 * kv_heads, d] int8 and one float32 scale per (plane, slot, KV head), a value being code * scale.
 * It is half the bytes of a 16-bit cache, and the bytes are what a decode's attention over host
 * RAM waits for. The scales stay out of the inner loops: a key's score is its scale times
 * q . codes, and a value enters the output weighted by its softmax weight times its scale.
 * Blocks are token-major or head-major, codes and scales alike (as strata_paged_attention_half's). */
typedef struct {
    const int8_t *codes;
    const float *scales;
    int64_t plane_stride, scale_plane_stride, block_size, kv_heads, head_dim, groups, bt_stride;
    int64_t key_stride, head_stride;               /* codes between a head's keys / a block's heads */
    int64_t scale_key_stride, scale_head_stride;   /* the same for the scales */
    const int32_t *block_tables;
    float scale;
    const float *q;
    float *out;
    int64_t q_stride, heads;
} int8_attention;

/* The code rows of head kvh of the block holding key j0, plane 0 (K) or 1 (V): key j0 + j's at
 * [j * key_stride]. */
static inline const int8_t *block_codes(const int8_attention *a, const int32_t *table, int64_t j0, int64_t kvh,
                                        int plane) {
    return a->codes + plane * a->plane_stride
        + (int64_t)table[j0 / a->block_size] * a->block_size * a->kv_heads * a->head_dim + kvh * a->head_stride;
}

/* Their scales: key j0 + j's at [j * scale_key_stride]. */
static inline const float *block_scales(const int8_attention *a, const int32_t *table, int64_t j0, int64_t kvh,
                                        int plane) {
    return a->scales + plane * a->scale_plane_stride
        + (int64_t)table[j0 / a->block_size] * a->block_size * a->kv_heads + kvh * a->scale_head_stride;
}

/* Code row and scale of key j, plane 0 (K) or 1 (V). */
static inline const int8_t *int8_row(const int8_attention *a, const int32_t *table, int64_t j, int64_t kvh,
                                     int plane, float *scale) {
    const int64_t r = j % a->block_size;
    *scale = block_scales(a, table, j - r, kvh, plane)[r * a->scale_key_stride];
    return block_codes(a, table, j - r, kvh, plane) + r * a->key_stride;
}

#ifdef HOST_AVX2
/* Keys ahead of the one in use whose code rows are fetched (the scores' pass; the values' pass
 * fetches a whole block ahead). Of 4, 8, 16, 24 and 32 over shuffled blocks, 16 ran best on a
 * 2-core EPYC (19.6 ms against 27-40); on an H100 host 8, 16 and 24 ran alike (26-38 GiB/s). */
#ifndef INT8_AHEAD
#define INT8_AHEAD 16
#endif
/* 16 codes as two vectors of 8 floats. */
static inline void int8_load16(const int8_t *p, __m256 *lo, __m256 *hi) {
    const __m128i x = _mm_loadu_si128((const __m128i *)p);
    *lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(x));
    *hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(x, 8)));
}

PREFETCHING void prefetch_bytes(const int8_t *row, int64_t n) {
    for (int64_t off = 0; off < n; off += 64) _mm_prefetch((const char *)(row + off), _MM_HINT_T0);
}

/* At a block's start of the scores' pass: the next block's key scales (a line, or one per two
 * keys when each key's heads lie side by side). */
PREFETCHING void prefetch_scales(const int8_attention *a, const int32_t *table, int64_t j0, int64_t ctx,
                                 int64_t kvh) {
    if (j0 + a->block_size >= ctx) return;
    const float *next = block_scales(a, table, j0 + a->block_size, kvh, 0);
    const int64_t step = a->scale_key_stride >= 16 ? 1 : 16 / a->scale_key_stride;
    for (int64_t j = 0; j < a->block_size; j += step)
        _mm_prefetch((const char *)(next + j * a->scale_key_stride), _MM_HINT_T0);
}

/* The code rows of the keys INT8_AHEAD and INT8_AHEAD + 1 after key j (block base holds n keys
 * from j0, next is the next block's base or NULL; ctx_left keys from j0 on). */
PREFETCHING void prefetch_codes_ahead(const int8_t *base, const int8_t *next, int64_t j, int64_t n, int64_t row,
                                      int64_t ctx_left, int64_t d) {
    for (int64_t p = j + INT8_AHEAD; p < j + INT8_AHEAD + 2; p++) {
        const int8_t *ahead = p < n ? base + p * row : next && p - n < ctx_left - n ? next + (p - n) * row : NULL;
        if (ahead) prefetch_bytes(ahead, d);
    }
}

/* At a block's start of the values' pass: the next block's code rows. */
PREFETCHING void prefetch_next_values(const int8_attention *a, const int32_t *table, int64_t j0, int64_t ctx,
                                      int64_t kvh) {
    if (j0 + a->block_size >= ctx) return;
    const int8_t *next = block_codes(a, table, j0 + a->block_size, kvh, 1);
    for (int64_t j = 0; j < a->block_size && j0 + a->block_size + j < ctx; j++)
        prefetch_bytes(next + j * a->key_stride, a->head_dim);
}

/* Two keys' codes (k0, k1) against the G query rows q [G, d]: their partial sums, 8 lanes a row
 * (h0[g], h1[g]; store_pair_scores adds the lanes up). */
static inline __attribute__((always_inline)) void code_pair_sums_8(const int8_t *k0, const int8_t *k1, const float *q,
                                                                    int64_t d, __m256 *h0, __m256 *h1,
                                                                    const int64_t G) {
    for (int64_t g = 0; g < G; g++) h0[g] = h1[g] = _mm256_setzero_ps();
    for (int64_t c = 0; c < d; c += 16) {
        __m256 l0, u0, l1, u1;
        int8_load16(k0 + c, &l0, &u0);
        int8_load16(k1 + c, &l1, &u1);
        fma_key_pair(q, d, c, l0, u0, l1, u1, h0, h1, G);
    }
}

#ifdef HOST_AVX512
static inline __m512 int8_widen16(__m128i x) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(x));
}

/* code_pair_sums_8 16 lanes wide (AVX-512: a load, a sign extension and a conversion per 16
 * codes, where the 8-wide path takes two of each), the halves added into 8 lanes at the end. */
static inline __attribute__((always_inline)) void code_pair_sums_16(const int8_t *k0, const int8_t *k1,
                                                                     const float *q, int64_t d, __m256 *h0,
                                                                     __m256 *h1, const int64_t G) {
    __m512 a0[4], a1[4];
    for (int64_t g = 0; g < G; g++) a0[g] = a1[g] = _mm512_setzero_ps();
    for (int64_t c = 0; c < d; c += 16) {
        const __m512 x0 = int8_widen16(_mm_loadu_si128((const __m128i *)(k0 + c)));
        const __m512 x1 = int8_widen16(_mm_loadu_si128((const __m128i *)(k1 + c)));
        for (int64_t g = 0; g < G; g++) {
            const __m512 qg = _mm512_loadu_ps(q + g * d + c);
            a0[g] = _mm512_fmadd_ps(qg, x0, a0[g]);
            a1[g] = _mm512_fmadd_ps(qg, x1, a1[g]);
        }
    }
    for (int64_t g = 0; g < G; g++) {
        h0[g] = half_sum(a0[g]);
        h1[g] = half_sum(a1[g]);
    }
}
#endif

/* scores[g * ctx + j] = q_g . key_j * scale, blockwise as score_keys_g, two keys at once; wide
 * (a constant): the pairs' sums 16 lanes wide (AVX-512 builds, G <= 4). */
static inline __attribute__((always_inline)) void score_codes_g(const int8_attention *a, const int32_t *table,
                                                                 int64_t ctx, int64_t kvh, const float *q,
                                                                 float *scores, const int wide, const int64_t G) {
    const int64_t d = a->head_dim, bs = a->block_size, row = a->key_stride;
    for (int64_t j0 = 0; j0 < ctx; j0 += bs) {
        const int8_t *base = block_codes(a, table, j0, kvh, 0);
        const int8_t *next = j0 + bs < ctx ? block_codes(a, table, j0 + bs, kvh, 0) : NULL;
        const float *ks = block_scales(a, table, j0, kvh, 0);
        const int64_t n = ctx - j0 < bs ? ctx - j0 : bs;
        prefetch_scales(a, table, j0, ctx, kvh);
        for (int64_t j = 0; j < n; j += 2) {
            const int pair = j + 1 < n;
            const int8_t *k0 = base + j * row, *k1 = pair ? k0 + row : k0;
            prefetch_codes_ahead(base, next, j, n, row, ctx - j0, d);
            __m256 h0[8], h1[8];
#ifdef HOST_AVX512
            if (wide)
                code_pair_sums_16(k0, k1, q, d, h0, h1, G);
            else
#endif
                code_pair_sums_8(k0, k1, q, d, h0, h1, G);
            const float s0 = ks[j * a->scale_key_stride] * a->scale;
            const float s1 = pair ? ks[(j + 1) * a->scale_key_stride] * a->scale : 0.f;
            store_pair_scores(h0, h1, s0, s1, pair, scores, ctx, j0 + j, G);
        }
    }
}

/* out [G, d] = sum over j of w[g * ctx + j] * codes_j (weights already times the value scales). */
static inline __attribute__((always_inline)) void weigh_codes_g(const int8_attention *a, const int32_t *table,
                                                                 int64_t ctx, int64_t kvh, const float *w,
                                                                 float *out, const int64_t G) {
    const int64_t d = a->head_dim, bs = a->block_size, row = a->key_stride;
    for (int64_t c = 0; c < d; c += 16) {
        __m256 lo[8], hi[8];
        for (int64_t g = 0; g < G; g++) lo[g] = hi[g] = _mm256_setzero_ps();
        for (int64_t j0 = 0; j0 < ctx; j0 += bs) {
            const int8_t *base = block_codes(a, table, j0, kvh, 1) + c;
            const int64_t n = ctx - j0 < bs ? ctx - j0 : bs;
            if (c == 0)   /* the first column pass brings the rows in */
                prefetch_next_values(a, table, j0, ctx, kvh);
            for (int64_t j = 0; j < n; j++) {
                __m256 x0, x1;
                int8_load16(base + j * row, &x0, &x1);
                for (int64_t g = 0; g < G; g++) {
                    const __m256 wg = _mm256_broadcast_ss(w + g * ctx + j0 + j);
                    lo[g] = _mm256_fmadd_ps(wg, x0, lo[g]);
                    hi[g] = _mm256_fmadd_ps(wg, x1, hi[g]);
                }
            }
        }
        for (int64_t g = 0; g < G; g++) {
            _mm256_storeu_ps(out + g * d + c, lo[g]);
            _mm256_storeu_ps(out + g * d + c + 8, hi[g]);
        }
    }
}
#endif

/* AVX-512: the weighted values 16 lanes wide, 32 columns a pass. Used for G = 1, 2 or 4 and d a
 * multiple of 32. */
#ifdef HOST_AVX512
/* out [G, d]: 32 columns at a time over every key, 2 * G accumulators. */
static inline __attribute__((always_inline)) void weigh_codes_512_g(const int8_attention *a, const int32_t *table,
                                                                     int64_t ctx, int64_t kvh, const float *w,
                                                                     float *out, const int64_t G) {
    const int64_t d = a->head_dim, bs = a->block_size, row = a->key_stride;
    for (int64_t c = 0; c < d; c += 32) {
        __m512 lo[4], hi[4];
        for (int64_t g = 0; g < G; g++) lo[g] = hi[g] = _mm512_setzero_ps();
        for (int64_t j0 = 0; j0 < ctx; j0 += bs) {
            const int8_t *base = block_codes(a, table, j0, kvh, 1) + c;
            const int64_t n = ctx - j0 < bs ? ctx - j0 : bs;
            if (c == 0)   /* the first column pass brings the rows in */
                prefetch_next_values(a, table, j0, ctx, kvh);
            for (int64_t j = 0; j < n; j++) {
                const __m256i x = _mm256_loadu_si256((const __m256i *)(base + j * row));
                const __m512 x0 = int8_widen16(_mm256_castsi256_si128(x));
                const __m512 x1 = int8_widen16(_mm256_extracti128_si256(x, 1));
                for (int64_t g = 0; g < G; g++) {
                    const __m512 wg = _mm512_set1_ps(w[g * ctx + j0 + j]);
                    lo[g] = _mm512_fmadd_ps(wg, x0, lo[g]);
                    hi[g] = _mm512_fmadd_ps(wg, x1, hi[g]);
                }
            }
        }
        for (int64_t g = 0; g < G; g++) {
            _mm512_storeu_ps(out + g * d + c, lo[g]);
            _mm512_storeu_ps(out + g * d + c + 16, hi[g]);
        }
    }
}
#endif

static void score_codes(const int8_attention *a, const int32_t *table, int64_t ctx, int64_t kvh, const float *q,
                        float *scores) {
    const int64_t d = a->head_dim, G = a->groups;
#ifdef HOST_AVX512
    if (d % 32 == 0 && (G == 1 || G == 2 || G == 4)) {
        WITH_G_1_2_4(score_codes_g, a, table, ctx, kvh, q, scores, 1);
        return;
    }
#endif
#ifdef HOST_AVX2
    if (d % 16 == 0) {
        WITH_CONSTANT_G(score_codes_g, a, table, ctx, kvh, q, scores, 0);
    }
#endif
    for (int64_t j = 0; j < ctx; j++) {
        float ks;
        const int8_t *key = int8_row(a, table, j, kvh, 0, &ks);
        for (int64_t g = 0; g < G; g++) {
            float sum = 0.f;
            for (int64_t c = 0; c < d; c++) sum += q[g * d + c] * (float)key[c];
            scores[g * ctx + j] = sum * ks * a->scale;
        }
    }
}

static void weigh_codes(const int8_attention *a, const int32_t *table, int64_t ctx, int64_t kvh, const float *w,
                        float *out) {
    const int64_t d = a->head_dim, G = a->groups;
#ifdef HOST_AVX512
    if (d % 32 == 0 && (G == 1 || G == 2 || G == 4)) {
        WITH_G_1_2_4(weigh_codes_512_g, a, table, ctx, kvh, w, out);
        return;
    }
#endif
#ifdef HOST_AVX2
    if (d % 16 == 0) {
        WITH_CONSTANT_G(weigh_codes_g, a, table, ctx, kvh, w, out);
    }
#endif
    memset(out, 0, sizeof(float) * (size_t)(G * d));
    for (int64_t j = 0; j < ctx; j++) {
        float unused;
        const int8_t *value = int8_row(a, table, j, kvh, 1, &unused);
        for (int64_t c = 0; c < d; c++)
            for (int64_t g = 0; g < G; g++) out[g * d + c] += w[g * ctx + j] * (float)value[c];
    }
}

static void int8_attention_item(const void *arg, int64_t t, int64_t s, int64_t ctx, int64_t kvh, float *scores) {
    const int8_attention *a = arg;
    const int64_t G = a->groups, d = a->head_dim;
    const int32_t *table = a->block_tables + s * a->bt_stride;
    score_codes(a, table, ctx, kvh, a->q + t * a->q_stride + kvh * G * d, scores);
    for (int64_t g = 0; g < G; g++) strata_softmax_row(scores + g * ctx, ctx);
    for (int64_t j0 = 0; j0 < ctx; j0 += a->block_size) {   /* the value scales into the weights */
        const float *vs = block_scales(a, table, j0, kvh, 1);
        const int64_t n = ctx - j0 < a->block_size ? ctx - j0 : a->block_size;
        for (int64_t j = 0; j < n; j++)
            for (int64_t g = 0; g < G; g++) scores[g * ctx + j0 + j] *= vs[j * a->scale_key_stride];
    }
    weigh_codes(a, table, ctx, kvh, scores, a->out + (t * a->heads + kvh * G) * d);
}

/* strata_paged_attention_half over an int8 cache: codes as kv_cache (plane_stride codes between
 * K and V, key_stride and head_stride as there), scales [2, blocks, block_size, kv_heads] float32
 * (scale_plane_stride floats between K's and V's; a block's keys scale_key_stride apart and its
 * heads scale_head_stride). Returns nonzero when out of memory. */
int strata_paged_attention_int8(const float *q, int64_t q_stride, float *out, const int8_t *codes,
                                int64_t plane_stride, int64_t block_size, int64_t heads, int64_t kv_heads,
                                int64_t head_dim, const int32_t *block_tables, int64_t bt_stride,
                                const int32_t *seq_lens, const int32_t *query_start_loc, int64_t num_seqs,
                                float scale, const float *scales, int64_t scale_plane_stride, int64_t key_stride,
                                int64_t head_stride, int64_t scale_key_stride, int64_t scale_head_stride,
                                int nthreads) {
    const int64_t groups = heads / kv_heads;
    int8_attention a = {codes, scales, plane_stride, scale_plane_stride, block_size, kv_heads, head_dim, groups,
                        bt_stride, key_stride, head_stride, scale_key_stride, scale_head_stride, block_tables, scale,
                        q, out, q_stride, heads};
    return strata_attention_items(seq_lens, query_start_loc, num_seqs, kv_heads, groups, 2, nthreads,
                                  int8_attention_item, &a);
}

/* The host tier's KV-cache write (torch's index_copy_ moved 2 KiB rows at about 1.3 GiB/s on one
 * core, a prefill's whole K and V per layer): src row t (src_stride bytes apart) goes to slot
 * slots[t] of dst, whose slot s is key s % block_size of block s / block_size (block_bytes
 * apart). A row is `pieces` pieces (heads) of piece_bytes, packed in src; in dst a block's keys
 * are key_bytes apart and their pieces head_bytes apart (token-major: one piece, the whole row;
 * head-major: a piece per head). Slots out of [0, num_slots) are refused (returns 1, nothing
 * written). */
int strata_scatter_rows(uint8_t *dst, const uint8_t *src, const int64_t *slots, int64_t n, int64_t pieces,
                        int64_t piece_bytes, int64_t src_stride, int64_t block_size, int64_t block_bytes,
                        int64_t key_bytes, int64_t head_bytes, int64_t num_slots, int nthreads) {
    for (int64_t t = 0; t < n; t++)
        if (slots[t] < 0 || slots[t] >= num_slots) return 1;
    /* Dynamic chunks: beside a GPU the host's cores are all taken (these threads, the thread
     * queuing GPU work, the driver's), and a static share waits for its slowest thread. */
    #pragma omp parallel for num_threads(nthreads) schedule(dynamic, 32) if (n * pieces * piece_bytes >= (1 << 20))
    for (int64_t t = 0; t < n; t++) {
        uint8_t *row = dst + slots[t] / block_size * block_bytes + slots[t] % block_size * key_bytes;
        const uint8_t *from = src + t * src_stride;
        for (int64_t p = 0; p < pieces; p++) {
            uint8_t *to = row + p * head_bytes;
            if (piece_bytes == 4)   /* an int8 cache's scales, one per head: no call per 4 bytes */
                memcpy(to, from + p * 4, 4);
            else
                memcpy(to, from + p * piece_bytes, (size_t)piece_bytes);
        }
    }
    return 0;
}

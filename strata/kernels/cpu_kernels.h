/* What the C files of strata's CPU kernels share: the single-threaded pieces that the one-op
 * entry points (cpu_quant.c, cpu_ops.c) and the fused decoder layer (cpu_decoder.c) are built
 * from, so both compute every value with the same operations in the same order. */
#ifndef STRATA_CPU_KERNELS_H
#define STRATA_CPU_KERNELS_H
#include <stdint.h>

#ifdef _OPENMP
#include <omp.h>
#else   /* built without OpenMP (a compiler without it): one thread */
static inline int omp_get_num_threads(void) { return 1; }
static inline int omp_get_thread_num(void) { return 0; }
#endif

/* Matmul pieces: output rows [r0, r1) of y = x @ W^T for all m rows of x [m, k]; y has ldy
 * floats per row (a segment of a wider output starts at its column). */
int64_t strata_w4_prep_floats(int64_t m, int64_t k);
void strata_w4_prepare(const float *x, int64_t m, int64_t k, float *prep);   /* group sums, scaled x */
void strata_w4_range(const float *x, const float *prep, int64_t m, int64_t k, const uint8_t *q,
                     const float *scale_min, float *y, int64_t ldy, int64_t r0, int64_t r1);
void strata_w8_range(const float *x, int64_t m, int64_t k, const int8_t *q, const float *scales,
                     int64_t group, float *y, int64_t ldy, int64_t r0, int64_t r1);
void strata_f32_range(const float *x, int64_t m, int64_t k, const float *w, float *y, int64_t ldy,
                      int64_t r0, int64_t r1);

/* One row of W in float32 (an embedding lookup): 4-bit codes (q [k/2], scale_min [k/32, 2]) or
 * grouped int8 (q [k], scales [k/group]). */
void strata_w4_dequantize_row(const uint8_t *q, const float *scale_min, int64_t k, float *out);
void strata_w8_dequantize_row(const int8_t *q, const float *scales, int64_t group, int64_t k, float *out);

/* y[i][0..15] (accumulate: +=) sum over p < k of x[i * ldx + p] * b[p * ldb + 0..15], for rows
 * i < rows <= GEMM_TILE_ROWS (cpu_gemm.c). */
#define GEMM_TILE_ROWS 6
void strata_gemm_tile(int rows, const float *x, int64_t ldx, const float *b, int64_t ldb, int64_t k,
                      float *y, int64_t ldy, int accumulate);

/* One row of RMSNorm (r = x + residual_in into residual_out first, when residual_in is given). */
void strata_rms_norm_row(const float *x, const float *residual_in, float *residual_out, const float *w,
                         float *out, int64_t d, float eps);
/* silu(g[j]) * u[j] for j < n. */
void strata_silu_mul_span(const float *g, const float *u, float *out, int64_t n);
/* The part of a token's rotation and cache write that belongs to KV head kvh: its `groups` query
 * heads, its key and its value (the same values strata_rope_token gives them). */
void strata_rope_kv_head(const float *q, float *q_out, const float *k, const float *v, const float *c,
                         const float *s, int64_t kvh, int64_t groups, int64_t head_dim, int64_t rot_dim,
                         float *kv_slot, int64_t plane_stride);
/* Token t's rotation and cache write (see strata_rope_write_kv). */
void strata_rope_token(const float *q, float *q_out, const float *k, const float *v, const float *c,
                       const float *s, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t rot_dim,
                       float *kv_slot, int64_t plane_stride);

typedef struct {
    const float *kv_cache;
    int64_t plane_stride, block_size, kv_heads, head_dim, groups, bt_stride;
    const int32_t *block_tables;
    float scale;
} strata_cache_view;

/* The query heads of KV head kvh, for one token of sequence seq seeing ctx keys; scores holds
 * ctx * groups floats. */
void strata_attend(const strata_cache_view *cv, const float *q, float *out, int64_t seq, int64_t ctx,
                   int64_t kvh, float *scores);
/* x = softmax(x) over n values (max subtracted; cpu_ops.c's vectorised exp). */
void strata_softmax_row(float *x, int64_t n);

/* One (token t of sequence s, KV head kvh) item of a paged attention: ctx keys visible, scores a
 * buffer of max context * groups floats owned by the calling thread. */
typedef void (*strata_attention_item)(const void *arg, int64_t t, int64_t s, int64_t ctx, int64_t kvh,
                                      float *scores);
/* Runs item for every token of the query_start_loc ranges and every KV head on nthreads threads
 * (dynamic schedule in chunks of chunk items: under a causal mask later tokens see more keys).
 * Returns nonzero when out of memory. */
int strata_attention_items(const int32_t *seq_lens, const int32_t *query_start_loc, int64_t num_seqs,
                           int64_t kv_heads, int64_t groups, int chunk, int nthreads,
                           strata_attention_item item, const void *arg);
#endif

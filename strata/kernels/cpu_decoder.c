/* A whole Llama-style decoder layer in one call, for decode-sized steps on the CPU:
 *
 *   r = x + residual; h = rmsnorm(r) w1; qkv = h Wqkv^T (+ bias); rotate q, k; write k, v to the
 *   paged cache; a = attention(q); r = a Wo^T + r; h = rmsnorm(r) w2; out = (silu(h Wg^T) *
 *   (h Wu^T)) Wd^T; returns out and r (the next layer's x and residual).
 *
 * At one token a layer's arithmetic takes tens of microseconds, and the eager path around it (a
 * dozen module calls, allocations, one parallel region per op) about as much again; here it is
 * one parallel region whose threads split each stage and meet at a barrier between stages. Every
 * value is computed by the same single-threaded pieces (cpu_kernels.h) as the one-op kernels the
 * modules call, in the same order, so the result is bit-identical to the module path.
 *
 * Weights of a linear are up to STRATA_MAX_SEGMENTS segments stacked along the output rows, each
 * 4-bit (w4), grouped int8 (w8) or float32, in the layouts of cpu_quant.c.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

#define STRATA_MAX_SEGMENTS 4

enum { SEG_W4 = 1, SEG_W8 = 2, SEG_F32 = 3 };

typedef struct {
    int64_t kind, n, group;          /* rows of W in this segment; int8 group size */
    const void *q;                   /* w4: uint8 [n, k/2]; w8: int8 [n, k]; f32: float [n, k] */
    const float *s;                  /* w4: scale_min [n, k/32, 2]; w8: scales [n, k/group] */
} strata_segment;

typedef struct {
    int64_t n, k, num_segments;
    strata_segment seg[STRATA_MAX_SEGMENTS];
    const float *bias;               /* [n] or NULL */
} strata_linear;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate, rot_dim, max_position;
    float eps1, eps2, scale;
    const float *norm1, *norm2, *cos_table, *sin_table;
    strata_linear qkv, o, gate_up, down;
} strata_layer;

typedef struct {
    int64_t m, num_seqs, plane_stride, block_size, bt_stride;
    const int64_t *positions, *slot_mapping;
    float *kv_cache;
    const int32_t *block_tables, *seq_lens, *query_start_loc;
} strata_step;

/* This thread's share of y = x @ W^T (+ bias), x [m, k], y [m, n]; prep is this thread's own
 * buffer for what the w4 kernels need besides x (strata_w4_prepare). */
static void linear_share(const strata_linear *L, const float *x, int64_t m, float *y, float *prep) {
    int nt = omp_get_num_threads(), t = omp_get_thread_num();
    int64_t r0 = L->n * t / nt, r1 = L->n * (t + 1) / nt, first = 0;
    int sums_done = 0;
    for (int64_t i = 0; i < L->num_segments; first += L->seg[i].n, i++) {
        const strata_segment *sg = &L->seg[i];
        int64_t a = r0 > first ? r0 - first : 0, b = r1 - first < sg->n ? r1 - first : sg->n;
        if (a >= b) continue;
        float *ys = y + first;
        if (sg->kind == SEG_W4) {
            if (!sums_done) strata_w4_prepare(x, m, L->k, prep);
            sums_done = 1;
            strata_w4_range(x, prep, m, L->k, sg->q, sg->s, ys, L->n, a, b);
        } else if (sg->kind == SEG_W8) {
            strata_w8_range(x, m, L->k, sg->q, sg->s, sg->group, ys, L->n, a, b);
        } else {
            strata_f32_range(x, m, L->k, sg->q, ys, L->n, a, b);
        }
    }
    if (L->bias != NULL)
        for (int64_t i = 0; i < m; i++)
            for (int64_t r = r0; r < r1; r++) y[i * L->n + r] += L->bias[r];
}

/* The widest input of the layer's linears (o takes heads * head_dim). */
static int64_t layer_kmax(const strata_layer *L) {
    int64_t k = L->hidden > L->intermediate ? L->hidden : L->intermediate;
    return k > L->heads * L->head_dim ? k : L->heads * L->head_dim;
}

/* Floats of workspace the layer needs for m tokens and nthreads threads (see the layout below). */
int64_t strata_decoder_workspace(const strata_layer *L, int64_t m, int nthreads) {
    int64_t kmax = layer_kmax(L);
    return m * (L->hidden + L->qkv.n + 2 * L->heads * L->head_dim + L->gate_up.n + L->intermediate)
           + (int64_t)nthreads * (strata_w4_prep_floats(m, kmax) + 16);
}

/* What the stages of a step share, set up once per call (for every layer of a stack). */
typedef struct {
    int64_t *seq_of;                 /* [m]: the sequence of each token */
    float *scores;                   /* [nthreads, max_ctx * groups]: attention scores */
    int64_t max_ctx;
    int decode_only;                 /* every sequence has one query token this step */
    int64_t *items_from;             /* decode_only: thread i's attention items, [items_from[i], [i + 1]) */
    int split_threads;               /* the team size items_from was made for (0: none) */
    /* Fewer items than twice the threads (a single stream: 3 KV heads on 2 threads gave one
     * thread twice the other's keys to read): the items only rotate and write the cache, and
     * after a barrier each thread attends for a run of (token, query head) units, heads_from. */
    int split_heads;
    int64_t *heads_from;
} step_scratch;

/* A decode step's attention items (token t, KV head kvh at t * kv_heads + kvh; per_token =
 * kv_heads) or query-head units (per_token = heads) in nthreads contiguous runs of about equal
 * cost (the keys each reads, plus a fixed part), so that every thread knows its own items before
 * the layer starts: it asks for the cache rows it will write while the qkv matmul runs
 * (decode_prefetch_rows). A cache row written cold costs a read of its lines from memory first:
 * at 32 sequences the writes inside the attention were 150-300 us of a 450-600 us stage a layer
 * (docs/cpu_speed.md, step 15). */
static void split_decode_items(const strata_step *S, int64_t per_token, int nthreads, int64_t *from) {
    int64_t total = 0;
    for (int64_t t = 0; t < S->m; t++) total += S->seq_lens[t] + 16;   /* a decode step: token t is sequence t */
    total *= per_token;
    int64_t item = 0, cost = 0;
    from[0] = 0;
    for (int i = 1; i < nthreads; i++) {   /* thread i starts at the first item past i/nthreads of the cost */
        while (item < S->m * per_token && cost + (S->seq_lens[item / per_token] + 16) <= total * i / nthreads)
            cost += S->seq_lens[item++ / per_token] + 16;
        from[i] = item;
    }
    from[nthreads] = S->m * per_token;
}

static void scratch_free(step_scratch *sc);

static int scratch_init(const strata_layer *L, const strata_step *S, int nthreads, step_scratch *sc) {
    const int64_t m = S->m, groups = L->heads / L->kv_heads;
    for (int64_t t = 0; t < m; t++)
        if (L->rot_dim > 0 && (S->positions[t] < 0 || S->positions[t] >= L->max_position)) return 1;
    sc->max_ctx = 1;
    for (int64_t s = 0; s < S->num_seqs; s++) sc->max_ctx = S->seq_lens[s] > sc->max_ctx ? S->seq_lens[s] : sc->max_ctx;
    sc->seq_of = malloc(sizeof(int64_t) * (size_t)(m + 2 * (nthreads + 1)));
    sc->scores = malloc(sizeof(float) * (size_t)(nthreads * sc->max_ctx * groups));
    if (sc->seq_of == NULL || sc->scores == NULL) {
        scratch_free(sc);
        return 2;
    }
    sc->items_from = sc->seq_of + m;
    sc->heads_from = sc->items_from + nthreads + 1;
    sc->decode_only = 1;
    for (int64_t s = 0; s < S->num_seqs; s++) {
        for (int64_t t = S->query_start_loc[s]; t < S->query_start_loc[s + 1]; t++) sc->seq_of[t] = s;
        sc->decode_only &= S->query_start_loc[s + 1] - S->query_start_loc[s] == 1;
    }
    sc->split_threads = sc->decode_only ? nthreads : 0;
    sc->split_heads = sc->decode_only && groups > 1 && m * L->kv_heads < 2 * (int64_t)nthreads;
    if (sc->decode_only) split_decode_items(S, L->kv_heads, nthreads, sc->items_from);
    if (sc->split_heads) split_decode_items(S, L->heads, nthreads, sc->heads_from);
    return 0;
}

static void scratch_free(step_scratch *sc) {
    free(sc->seq_of);
    free(sc->scores);
}

/* Token t's rotation and cache write for KV heads [kvh0, kvh1): their query heads into qr, their
 * keys (rotated) and values into the cache slot (strata_rope_kv_head; all heads: strata_rope_token). */
static void rope_heads(const strata_layer *L, const strata_step *S, const float *qkv, float *qr, float *kv_cache,
                       int64_t t, int64_t kvh0, int64_t kvh1) {
    const int64_t d = L->head_dim, q_size = L->heads * d, kv_size = L->kv_heads * d, pos = S->positions[t];
    const float *row = qkv + t * L->qkv.n;
    for (int64_t kvh = kvh0; kvh < kvh1; kvh++)
        strata_rope_kv_head(row, qr + t * q_size, row + q_size, row + q_size + kv_size,
                            L->rot_dim ? L->cos_table + pos * L->rot_dim : NULL,
                            L->rot_dim ? L->sin_table + pos * L->rot_dim : NULL, kvh, L->heads / L->kv_heads, d,
                            L->rot_dim, kv_cache + S->slot_mapping[t] * kv_size, S->plane_stride);
}

/* Attention item `item` (token t = item / kv_heads, KV head kvh = item % kv_heads): in a step of
 * decodes with its rotation and cache write first (a token attends only to its own sequence's
 * keys, its own the last). */
static void attention_item(const strata_layer *L, const strata_step *S, const step_scratch *sc,
                           const strata_cache_view *cv, const float *qkv, float *qr, float *attn, float *kv_cache,
                           int64_t item, float *scores) {
    const int64_t t = item / L->kv_heads, kvh = item % L->kv_heads, s = sc->seq_of[t];
    const int64_t d = L->head_dim, q_size = L->heads * d, groups = L->heads / L->kv_heads;
    if (sc->decode_only) rope_heads(L, S, qkv, qr, kv_cache, t, kvh, kvh + 1);
    const int64_t q_len = S->query_start_loc[s + 1] - S->query_start_loc[s];
    const int64_t ctx = S->seq_lens[s] - q_len + (t - S->query_start_loc[s]) + 1;
    strata_attend(cv, qr + t * q_size + kvh * groups * d, attn + t * q_size + kvh * groups * d, s, ctx, kvh, scores);
}

/* Query-head units [u0, u1) of a decode step (token t, head h at t * heads + h), rotated and
 * written already: each KV head's share of them in one call, as attention_item makes it for all
 * its heads (per head the same arithmetic: bit-identical). */
static void attention_heads(const strata_layer *L, const strata_step *S, const step_scratch *sc,
                            const strata_cache_view *cv, const float *qr, float *attn, int64_t u0, int64_t u1,
                            float *scores) {
    const int64_t d = L->head_dim, q_size = L->heads * d, groups = L->heads / L->kv_heads;
    while (u0 < u1) {
        const int64_t t = u0 / L->heads, h = u0 % L->heads, kvh = h / groups;
        const int64_t n = (kvh + 1) * groups - h < u1 - u0 ? (kvh + 1) * groups - h : u1 - u0;
        strata_cache_view some = *cv;
        some.groups = n;
        strata_attend(&some, qr + t * q_size + h * d, attn + t * q_size + h * d, sc->seq_of[t], S->seq_lens[sc->seq_of[t]],
                      kvh, scores);
        u0 += n;
    }
}

/* Ask for the K and V cache rows this thread's decode items write (split_decode_items) with the
 * intent to write them, so that their lines are on their way while the qkv matmul runs. Always
 * inlined: GCC (12) finds a function that only prefetches "looping const" and deletes its calls. */
static inline __attribute__((always_inline)) void decode_prefetch_rows(
        const strata_layer *L, const strata_step *S, const float *kv_cache, const step_scratch *sc, int tid) {
    const int64_t d = L->head_dim, kv_size = L->kv_heads * d, row_bytes = d * (int64_t)sizeof(float);
    for (int64_t item = sc->items_from[tid]; item < sc->items_from[tid + 1]; item++) {
        const char *k = (const char *)(kv_cache + S->slot_mapping[item / L->kv_heads] * kv_size + item % L->kv_heads * d);
        const char *v = k + S->plane_stride * (int64_t)sizeof(float);
        for (int64_t b = 0; b < row_bytes; b += 64) {
            __builtin_prefetch(k + b, 1, 3);
            __builtin_prefetch(v + b, 1, 3);
        }
    }
}

/* One layer, run by every thread of the enclosing parallel region; no barrier after the last
 * stage (the caller's). x may be out (x is read by the first stage only) and res_in res_out
 * (each value is read, then written, by one thread). */
static void layer_stages(const strata_layer *L, const strata_step *S, float *kv_cache, const float *x,
                         const float *res_in, float *res_out, float *out, float *work, const step_scratch *sc) {
    const int64_t m = S->m, H = L->hidden, d = L->head_dim, qkv_n = L->qkv.n, I = L->intermediate;
    const int64_t q_size = L->heads * d, groups = L->heads / L->kv_heads;
    const int64_t kmax = layer_kmax(L);
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    /* workspace: h [m, H] | qkv [m, qkv_n] (later the second norm's output) | q rotated [m, q_size] |
     * attention output [m, q_size] | gate_up [m, 2I] | act [m, I] | per thread: w4 prep */
    float *h = work, *qkv = h + m * H, *qr = qkv + m * qkv_n, *attn = qr + m * q_size;
    float *gu = attn + m * q_size, *act = gu + m * L->gate_up.n, *sums_base = act + m * I;
    float *prep = sums_base + (int64_t)tid * (strata_w4_prep_floats(m, kmax) + 16);
    strata_cache_view cv = {kv_cache, S->plane_stride, S->block_size, L->kv_heads, d, groups, S->bt_stride,
                            S->block_tables, L->scale};
    /* The split is for the team asked for; a smaller one (OpenMP may give fewer threads) shares
     * the items out as they come. */
    const int own_items = sc->split_threads == nt;
    if (own_items) decode_prefetch_rows(L, S, kv_cache, sc, tid);
    for (int64_t t = tid; t < m; t += nt)
        strata_rms_norm_row(x + t * H, res_in ? res_in + t * H : NULL, res_in ? res_out + t * H : NULL,
                            L->norm1, h + t * H, H, L->eps1);
    if (res_in == NULL)
        for (int64_t t = tid; t < m; t += nt) memcpy(res_out + t * H, x + t * H, sizeof(float) * (size_t)H);
    #pragma omp barrier
    linear_share(&L->qkv, h, m, qkv, prep);
    #pragma omp barrier
    /* Rotation and cache write: a step of decodes does each KV head's part in its attention item
     * (attention_item), on the thread whose items split_decode_items gave it; a step with a prompt
     * in a stage of its own, since a prompt's tokens attend to each other's keys, and its items
     * shared out as they come. */
    float *scores = sc->scores + (int64_t)tid * sc->max_ctx * groups;
    if (own_items && sc->split_heads) {
        for (int64_t item = sc->items_from[tid]; item < sc->items_from[tid + 1]; item++)
            rope_heads(L, S, qkv, qr, kv_cache, item / L->kv_heads, item % L->kv_heads, item % L->kv_heads + 1);
        #pragma omp barrier
        attention_heads(L, S, sc, &cv, qr, attn, sc->heads_from[tid], sc->heads_from[tid + 1], scores);
        #pragma omp barrier
    } else if (own_items) {
        for (int64_t item = sc->items_from[tid]; item < sc->items_from[tid + 1]; item++)
            attention_item(L, S, sc, &cv, qkv, qr, attn, kv_cache, item, scores);
        #pragma omp barrier
    } else {
        if (!sc->decode_only) {
            for (int64_t t = tid; t < m; t += nt) rope_heads(L, S, qkv, qr, kv_cache, t, 0, L->kv_heads);
            #pragma omp barrier
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < m * L->kv_heads; item++)
            attention_item(L, S, sc, &cv, qkv, qr, attn, kv_cache, item, scores);
        /* implicit barrier */
    }
    linear_share(&L->o, attn, m, h, prep);
    #pragma omp barrier
    for (int64_t t = tid; t < m; t += nt)
        strata_rms_norm_row(h + t * H, res_out + t * H, res_out + t * H, L->norm2, qkv + t * H, H, L->eps2);
    #pragma omp barrier
    linear_share(&L->gate_up, qkv, m, gu, prep);
    #pragma omp barrier
    {   /* in units of 8 columns, so spans split a row where the one-op kernel's vectors do */
        int64_t units = (I + 7) / 8, a = m * units * tid / nt, b = m * units * (tid + 1) / nt;
        while (a < b) {
            int64_t row = a / units, u0 = a % units, u1 = units < u0 + (b - a) ? units : u0 + (b - a);
            int64_t col = 8 * u0, len = (8 * u1 < I ? 8 * u1 : I) - col;
            strata_silu_mul_span(gu + row * 2 * I + col, gu + row * 2 * I + I + col, act + row * I + col, len);
            a += u1 - u0;
        }
    }
    #pragma omp barrier
    linear_share(&L->down, act, m, out, prep);
}

int strata_decoder_layer(const strata_layer *L, const strata_step *S, const float *x, const float *res_in,
                         float *res_out, float *out, float *work, int nthreads) {
    step_scratch sc;
    int status = scratch_init(L, S, nthreads, &sc);
    if (status) return status;
    #pragma omp parallel num_threads(nthreads)
    layer_stages(L, S, S->kv_cache, x, res_in, res_out, out, work, &sc);
    scratch_free(&sc);
    return 0;
}

/* A whole model's step around the stack, for a model whose every decoder layer is in it: the
 * first hidden states are rows of the token table (as the embedding module's lookup dequantizes
 * them) and the last layer's output goes through the final norm, so that Python is not called
 * between them. */
typedef struct {
    strata_segment table;            /* the token table [vocab, hidden]: w4, w8 or f32 rows */
    const int64_t *input_ids;        /* [m] */
    const float *final_norm;         /* [hidden] */
    float final_eps;
} strata_model_ends;

static void table_row(const strata_segment *T, int64_t id, int64_t H, float *out) {
    if (T->kind == SEG_W4)
        strata_w4_dequantize_row((const uint8_t *)T->q + id * (H / 2), T->s + id * (H / 16), H, out);
    else if (T->kind == SEG_W8)
        strata_w8_dequantize_row((const int8_t *)T->q + id * H, T->s + id * (H / T->group), T->group, H, out);
    else
        memcpy(out, (const float *)T->q + id * H, sizeof(float) * (size_t)H);
}

/* Layers [0, n_layers) in one parallel region: at decode a layer's arithmetic is tens of
 * microseconds, and a Python call per layer (and a parallel region per layer, whose worker
 * threads wait for the main thread meanwhile) about as much again. hidden [m, H] is the first
 * layer's input and the last one's output; residual [m, H] likewise (has_residual 0: the first
 * layer starts without one, as LlamaDecoderLayer does). Every layer has the same shapes (the
 * caller checks) and its own KV cache, kv_caches[i].
 *
 * ends (NULL: none): hidden's first value is looked up from ends->input_ids (has_residual must be
 * 0), and on return hidden holds rmsnorm(last output + residual) * final_norm and residual that
 * sum. Returns 3 (nothing computed) for a token id outside the table. */
int strata_decoder_stack(const strata_layer *const *layers, int64_t n_layers, const strata_step *S,
                         float *const *kv_caches, float *hidden, float *residual, int has_residual, float *work,
                         int nthreads, const strata_model_ends *ends) {
    const int64_t H = layers[0]->hidden, m = S->m;
    if (ends != NULL)
        for (int64_t t = 0; t < m; t++)
            if (ends->input_ids[t] < 0 || ends->input_ids[t] >= ends->table.n) return 3;
    step_scratch sc;
    int status = scratch_init(layers[0], S, nthreads, &sc);
    if (status) return status;
    #pragma omp parallel num_threads(nthreads)
    {
        const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
        if (ends != NULL) {
            for (int64_t t = tid; t < m; t += nt) table_row(&ends->table, ends->input_ids[t], H, hidden + t * H);
            #pragma omp barrier
        }
        for (int64_t i = 0; i < n_layers; i++) {
            layer_stages(layers[i], S, kv_caches[i], hidden, (i > 0 || has_residual) ? residual : NULL, residual,
                         hidden, work, &sc);
            #pragma omp barrier
        }
        if (ends != NULL)
            for (int64_t t = tid; t < m; t += nt)
                strata_rms_norm_row(hidden + t * H, residual + t * H, residual + t * H, ends->final_norm,
                                    hidden + t * H, H, ends->final_eps);
    }
    scratch_free(&sc);
    return 0;
}

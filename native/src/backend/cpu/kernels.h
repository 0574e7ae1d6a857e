/* kernels.h: the CPU compute layer. The cpu and sim backends (backend.h) are built on these, and
 * moe.c calls cpu_experts directly for the experts a MoE layer computes on the host.
 *
 * Conventions
 * - Activations f32, row-major; weights in a tide_matrix of any tide_type (f32, f16, bf16, q8_0,
 *   q4_0, q4_k, q5_k, q6_k), expanded to f32 inside the dot product (blocks.h's exact values);
 *   every sum accumulates in f32. Activations are never quantized.
 * - pool may be NULL everywhere: one thread, the SIMD level of this CPU. With a pool, the SIMD
 *   level is the pool's (tide_pool_features), fixed when the pool was made.
 * - Row determinism (backend.h): the result for one token row never depends on how many rows the
 *   call has, which other rows are in it, or the thread count. Threads split output rows, tokens
 *   or (head, query) pairs; no reduction is ever split across threads, and every dot product of
 *   length K uses one canonical order per code path: AVX2: one 8-lane f32 accumulator,
 *   acc = fma(w[8c..], x[8c..], acc) for chunks c = 0, 1, ..., the last chunk zero-padded, then a
 *   fixed horizontal sum; AVX-512 (matmul, and the experts and attention scores built on it;
 *   chosen when the CPU has F+BW+VL): the same with 16 lanes, then lanes 0-7 + 8-15 and the
 *   8-lane sum; scalar: 8 lanes with separate multiply and add; AMX (cpu_matmul only, not the
 *   experts or attention; chosen when the CPU has AMX-BF16 and the OS grants it): each f32 value
 *   split into three bf16 parts, six of the nine part products summed by the tile unit in f32,
 *   chunk by chunk of 32 columns (matmul_amx.c: as accurate as f32, its own order). The path is
 *   fixed per pool (see threadpool.h), so one machine always gives the same bits. Because f16,
 *   bf16 and q8_0 values (d * q: 11 x 8 significant bits) are exact in f32, a matmul over any type
 *   gives bit for bit what the f32 matmul over its dequantized matrix gives.
 * - Elementwise ops (add, silu_mul, moe_combine, rmsnorm's scaling) are bit-identical between
 *   the code paths; dot products, exp-based ops and reductions are not (each path is
 *   deterministic; a machine uses one). CUDA kernels will not match these bits either.
 * - Functions that can fail (bad arguments, out of memory) return tide_status; nothing aborts.
 *   Kernels that need scratch memory allocate it per call (malloc) and return TIDE_ERR_NOMEM
 *   when that fails: scratch is small next to the weights the call reads.
 */
#ifndef TIDE_CPU_KERNELS_H
#define TIDE_CPU_KERNELS_H

#include "backend/backend.h"
#include "threadpool.h"
#include <stddef.h>
#include <stdint.h>

/* ---- types and conversions (convert_types.c) ------------------------------------------------ */
/* ggml's block_q8_0: value i = f16(d) * qs[i]. sizeof == 34, no padding. */
typedef struct {
    uint16_t d;
    int8_t qs[TIDE_QK8_0];
} tide_block_q8_0;

/* 1 for the types the kernels compute: f32, f16, bf16, q8_0, q4_0, q4_k, q5_k, q6_k. */
int tide_type_valid(int32_t type);
/* Values [i0, i0 + n) of a row of a quantized type as f32, by blocks.h's rule (scalar). */
void cpu_block_values(int32_t type, const void *row, int64_t i0, int n, float *out);
/* A whole row of any valid type as f32 (scalar reference; cols a block multiple). */
void cpu_dequantize_row(int32_t type, const void *row, int64_t cols, float *out);
/* Bytes of one row (backend.h); 0 for an unknown type or q8_0 with cols % 32 != 0. */

/* Exact scalar conversions. f32 -> f16/bf16 round to nearest even, keep NaN a NaN, overflow to
 * inf (f16). */
float tide_f16_to_f32(uint16_t h);
uint16_t tide_f32_to_f16(float f);
float tide_bf16_to_f32(uint16_t h);
uint16_t tide_f32_to_bf16(float f);

/* Row conversions, vectorized when f->avx2 (identical results to the scalar ones). f may be NULL
 * (scalar). */
void cpu_f16_to_f32_row(const tide_cpu_features *f, const uint16_t *x, float *y, int64_t n);
void cpu_f32_to_f16_row(const tide_cpu_features *f, const float *x, uint16_t *y, int64_t n);
void cpu_bf16_to_f32_row(const tide_cpu_features *f, const uint16_t *x, float *y, int64_t n);
void cpu_f32_to_bf16_row(const tide_cpu_features *f, const float *x, uint16_t *y, int64_t n);

/* Quantize one row to q8_0 exactly as ggml / gguf.quants (d = amax/127 in f32, q = round half
 * away from zero of x/d, d stored as f16). cols % 32 == 0. For tests and tools. */
tide_status cpu_quantize_row_q8_0(const float *x, int64_t cols, void *out);

/* One row of f32 -> any computable type (quantize.c: ggml's reference quantizers, byte for
 * byte). TIDE_ERR_ARG for an unknown type or cols not a block multiple. */
tide_status cpu_quantize_row(int32_t type, const float *x, int64_t cols, void *out);
/* rows x cols of src_type (any computable type) -> dst_type; threads split rows. */
tide_status cpu_quantize(tide_pool *pool, int32_t dst_type, int32_t src_type, const void *src,
                         int64_t rows, int64_t cols, void *dst);

/* Embedding lookup: out[i] = f32(W[rows[i]]) for i < n (rows of w->cols floats). TIDE_ERR_ARG
 * for a row index outside [0, w->rows). */
tide_status cpu_get_rows(tide_pool *pool, const tide_matrix *w, const int32_t *rows, int32_t n,
                         float *out);

/* ---- dot products and matmul (dot.c, matmul.c) --------------------------------------------- */
/* The canonical f32 dot product (see above). */
float cpu_dot_f32(const tide_cpu_features *f, const float *a, const float *b, int64_t n);

/* y[t][r] = dot(W[r], x[t]) for t < n, r < w->rows; x [n, w->cols], y [n, w->rows].
 * Each weight row is read from memory once per block of up to 64 tokens (blocks of rows stay in
 * L2 while groups of 4 tokens pass); threads split the rows in groups of 4. On an AMX machine
 * every call goes to the tiles (matmul_amx.c), whatever n: rows in panels of 16, each decoded
 * once per call. */
tide_status cpu_matmul(tide_pool *pool, const tide_matrix *w, const float *x, int32_t n, float *y);

/* ---- norms, rope, attention (norm_rope.c, attention.c) --------------------------------------- */
/* y[r] = x[r] * (1/sqrtf(mean(x[r]^2) + eps)) * weight, rows of dim; y may equal x.
 * weight NULL means all ones (no scaling). */
tide_status cpu_rmsnorm(tide_pool *pool, const float *x, const float *weight, int32_t n_rows,
                        int32_t dim, float eps, float *y);
/* Per-head RMSNorm (QK norm): each of the n_head heads of head_dim floats in each of the n_tok
 * rows (row stride `stride` floats) is normed in place with weight[head_dim]. */
tide_status cpu_rmsnorm_heads(tide_pool *pool, float *x, int32_t n_tok, int64_t stride,
                              int32_t n_head, int32_t head_dim, const float *weight, float eps);
/* In-place NeoX RoPE (backend.h): first rope_dim dims of each head, pairs (j, j + rope_dim/2),
 * angle = (float)pos * inv_freq[j], inv_freq[j] = 1 / powf(theta, 2j/rope_dim), all in f32 as
 * HF computes it. rope_dim even, <= head_dim. */
tide_status cpu_rope(tide_pool *pool, float *x, int32_t n_tok, int64_t stride, int32_t n_head,
                     int32_t head_dim, int32_t rope_dim, int32_t pos0, float theta);
/* Block-causal GQA attention (tide_attn_shape in backend.h). Per (head, query): scores
 * s_j = dot(q, k_j) * (1/sqrtf(head_dim)) over the visible keys, f32 softmax (max-subtracted),
 * out = (sum_j e_j v_j) / sum_j e_j, keys in ascending order, in tiles of 64 keys with an
 * online softmax (attention.c). Threads split (query chunk, kv head) items; the query heads and
 * queries of one item share each K/V load. Scratch: one tile of scores per row of an item per
 * thread, allocated per call. A query that sees no key gets zeros. */
tide_status cpu_attention(tide_pool *pool, const tide_attn_shape *s, const float *q,
                          const void *k, const void *v, float *out);

/* ---- elementwise (norm_rope.c) -------------------------------------------------------------- */
void cpu_add(tide_pool *pool, float *y, const float *x, int64_t n);        /* y += x */
void cpu_silu_mul(tide_pool *pool, float *g, const float *u, int64_t n);   /* g = g/(1+e^-g) * u */
/* dst[i] = src[rows[i]], rows of dim floats */
void cpu_gather_rows(tide_pool *pool, float *dst, const float *src, const int32_t *rows,
                     int32_t n_rows, int32_t dim);

/* ---- MoE (experts.c) ------------------------------------------------------------------------ */
/* backend.h's experts op: for every job j and pair p of it,
 * out[pair_dest[p]] = down_j(silu(gate_j x[pair_token[p]]) * up_j x[pair_token[p]]), x and out
 * rows of dim floats. Each expert's matrices are read once for all its pairs. Two phases over the
 * pool: (job, gate/up row) work items, then (job, down row) items; threads split the items.
 * Scratch: n_pairs * max(gate rows) floats for the hidden activations, allocated per call
 * (TIDE_ERR_NOMEM if that fails). Checks shapes: gate/up cols == dim, down rows == dim,
 * down cols == gate rows == up rows (TIDE_ERR_ARG). */
tide_status cpu_experts(tide_pool *pool, const tide_expert_batch *b, const float *x, int32_t dim,
                        float *out);
/* out[t] += s, s = sum_k w[t*n_used+k] * pairs[t*n_used+k] accumulated from k = 0 up (s starts
 * at 0; multiply then add, no fma). */
void cpu_moe_combine(tide_pool *pool, const float *pairs, const float *w, int32_t n_tok,
                     int32_t n_used, int32_t dim, float *out);

/* ---- the head (head.c) ---------------------------------------------------------------------- */
/* Per row: the first index of the max and its softmax probability 1 / sum_j exp(l_j - max)
 * (f32). Threads split rows. NaN logits are never the max; a row of all -inf/NaN gives token 0,
 * prob 0. */
void cpu_argmax_prob(tide_pool *pool, const float *logits, int32_t n, int32_t n_vocab,
                     int32_t *out_token, float *out_prob);

/* The counter-based generator of CONTRACTS.md section 2: the (counter+1)-th output of a
 * splitmix64 stream seeded with seed, i.e. z = seed + (counter + 1) * 0x9E3779B97F4A7C15, then
 * splitmix64's mix of z. */
uint64_t tide_splitmix64(uint64_t seed, uint64_t counter);
/* u in [0, 1): (tide_splitmix64(seed, position) >> 11) * 2^-53. */
double tide_uniform(uint64_t seed, int32_t position);

/* Bytes of scratch cpu_sample_row needs for a vocabulary of n_vocab. */
size_t cpu_sample_scratch_bytes(int32_t n_vocab);
/* Sample one row (CONTRACTS.md section 2, as LLaDA2's _sample_with_temperature_topk_topp):
 * - greedy (temperature 0, no top-k (top_k <= 0 or >= n_vocab), top_p >= 1): cpu_argmax_prob's
 *   token and prob;
 * - l = logits / temperature when temperature > 0 and != 1 (f32 division);
 * - top-k (top_k > 0): keep l >= the k-th largest value (ties at the boundary all kept);
 * - top-p (top_p < 1): sort the kept logits descending (ties: lower index first), cumulative
 *   softmax c_i (f32 probabilities, summed in double and rounded to f32 as torch's CPU cumsum);
 *   drop i >= 1 when c_{i-1} > top_p (HF's shifted mask: the first token past top_p is kept,
 *   the first token always is). Only the prefix of the order down to the cutoff is sorted
 *   (tokens bucketed by logit first), so this is cheap for 157k;
 * - p = softmax over the kept tokens; temperature > 0: draw by inverse CDF over the kept tokens
 *   in ascending token id with u = tide_uniform(seed, position): the first token whose cumulative
 *   sum of exp(l - max) exceeds u * total (sums in double, exps as cpu_argmax_prob's: the vector
 *   exp on AVX2, expf on the scalar path); temperature 0 with a
 *   filter: the first argmax. NaN logits count as -inf.
 * *prob = the token's probability under the filtered distribution. scratch: at least
 * cpu_sample_scratch_bytes(n_vocab) bytes, any alignment of 8. TIDE_ERR_ARG for a negative or
 * NaN temperature, n_vocab < 1, NULL pointers. */
tide_status cpu_sample_row(const tide_cpu_features *f, const float *logits, int32_t n_vocab,
                           const tide_sampling *s, int32_t position, int32_t *out_token,
                           float *out_prob, void *scratch);
/* cpu_sample_row for n rows in parallel; row i uses position positions[i] (NULL: i).
 * Scratch allocated per call. */
tide_status cpu_sample(tide_pool *pool, const float *logits, int32_t n, int32_t n_vocab,
                       const tide_sampling *s, const int32_t *positions, int32_t *out_token,
                       float *out_prob);

#endif /* TIDE_CPU_KERNELS_H */

/* backend.h: the seam between the forward pass and the hardware, split as ggml splits it:
 *   device  (tide_backend_device_i)  what the hardware is and can do: name, capability flags,
 *                                    free memory
 *   buffer  (tide_backend_buffer_i)  its memory and the copies between it and the host
 *   ops     (tide_backend_ops_i)     the compute, enqueued on its stream
 * forward.c and moe/ call only these function pointers for device-side work and ask the
 * capability flags, never which backend it is. One folder per backend: cpu/ (whose kernels the
 * host side of every backend uses too), sim/, cuda/.
 *
 * Conventions
 * - Activations are f32, row-major [n_rows, dim], in the backend's memory ("device pointers";
 *   for cpu and sim they are host pointers).
 * - A weight matrix (tide_matrix) has `rows` output rows of `cols` inputs, stored row by row in
 *   its tide_type (ggml layout: ne0 = cols, ne1 = rows). y[t][r] = dot(W[r], x[t]).
 * - Every op is enqueued in order on the backend's compute stream and may return before it runs
 *   (CUDA); `synchronize` waits for all of it. Host code reads device results only after a
 *   download, which is synchronous.
 * - Row determinism: the result for one token row never depends on how many rows are in the call
 *   or on the thread count. This is what makes placement (device or host) and batching unable to
 *   change a bit on cpu/sim.
 * - Every op returns TIDE_OK or an error with the message written by tide_backend_error().
 */
#ifndef TIDE_BACKEND_H
#define TIDE_BACKEND_H

#include "common.h"
#include "tide.h"
#include <stdint.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tide_backend tide_backend;
struct tide_pool; /* threadpool.h */

typedef struct {
    int32_t type;   /* tide_type */
    int64_t rows;   /* output dimension (ne1) */
    int64_t cols;   /* input dimension (ne0), a multiple of 32 for q8_0 */
    size_t nbytes;  /* rows * row_bytes */
    void *data;     /* in the memory of whoever computes with it */
} tide_matrix;

/* q8_0 (ggml's layout): blocks of 32 values, an f16 scale then 32 int8, 34 bytes. */
#define TIDE_QK8_0 32
#define TIDE_Q8_0_BLOCK_BYTES 34

/* Values per block and bytes per block of a weight type (1 and the element size for the plain
 * types); 0, 0 for a type the engine does not compute. The quantized layouts: blocks.h. */
static inline void tide_type_block(int32_t type, int64_t *elems, size_t *bytes) {
    switch (type) {
    case TIDE_TYPE_F32: *elems = 1; *bytes = 4; return;
    case TIDE_TYPE_F16:
    case TIDE_TYPE_BF16: *elems = 1; *bytes = 2; return;
    case TIDE_TYPE_Q8_0: *elems = TIDE_QK8_0; *bytes = TIDE_Q8_0_BLOCK_BYTES; return;
    case TIDE_TYPE_Q4_0: *elems = 32; *bytes = 18; return;
    case TIDE_TYPE_Q4_K: *elems = 256; *bytes = 144; return;
    case TIDE_TYPE_Q5_K: *elems = 256; *bytes = 176; return;
    case TIDE_TYPE_Q6_K: *elems = 256; *bytes = 210; return;
    default: *elems = 0; *bytes = 0; return;
    }
}

/* The one row-size rule, for the C kernels, the CUDA kernels and the model loader: bytes of one
 * row of `cols` values of `type`; 0 for an unknown type, negative cols, or a quantized row that
 * is not a whole number of blocks (such a row has no valid layout). */
static inline size_t tide_row_bytes(int32_t type, int64_t cols) {
    int64_t elems;
    size_t bytes;
    tide_type_block(type, &elems, &bytes);
    if (cols < 0 || elems == 0 || cols % elems) return 0;
    return (size_t)(cols / elems) * bytes;
}

/* One MoE layer's work for one backend: a list of experts, each with the pairs routed to it.
 * Pair p of job j (p in pair_start[j] .. pair_start[j+1]-1) reads input row x[pair_token[p]]
 * and writes its expert output (before the router weight) into out row pair_dest[p], where
 * pair_dest = token * n_expert_used + k (k = the rank in the router's choice). */
typedef struct {
    int32_t n_jobs;
    const tide_matrix *gate; /* [n_jobs], weights where this backend reads them */
    const tide_matrix *up;   /* [n_jobs] */
    const tide_matrix *down; /* [n_jobs] */
    const int32_t *pair_start; /* [n_jobs + 1] (host memory) */
    const int32_t *pair_token; /* [n_pairs] (host memory) */
    const int32_t *pair_dest;  /* [n_pairs] (host memory) */
} tide_expert_batch;

/* Attention of n_q query rows at absolute positions q_pos0 .. q_pos0+n_q-1 against keys/values
 * at positions 0 .. n_kv-1 (the cache, current rows already written into it). Key j is visible to
 * query i iff j / block_length <= (q_pos0 + i) / block_length. q: [n_q, n_head*head_dim],
 * k, v: [n_kv, n_head_kv*head_dim] of kv_type (row stride kv_stride values), out: [n_q, n_head*head_dim].
 * GQA: head h reads kv head h / (n_head / n_head_kv). Scale 1/sqrt(head_dim). Softmax in f32. */
typedef struct {
    int32_t n_q, q_pos0, n_kv, block_length;
    int32_t n_head, n_head_kv, head_dim;
    int64_t kv_stride;
    int32_t kv_type; /* tide_type of k and v: f32 (0), f16 or bf16; kv_stride counts values */
} tide_attn_shape;

/* What a backend can do; the core asks these, never which backend it is. */
enum {
    /* Its memory is host memory, read in place: weights are used from the mapping (no copy),
     * host experts write straight into the pair buffer, nothing is ever resident. (cpu) */
    TIDE_BACKEND_HOST_MEMORY = 1u << 0,
    /* Ops and copies are enqueued and return before they run: host clocks around them time the
     * enqueue only, so per-phase timers stay off. (cuda) */
    TIDE_BACKEND_ASYNC = 1u << 1,
    /* pin_host makes host memory fast and asynchronous to copy from (cudaHostRegister); worth
     * registering the experts' host ranges once. (cuda) */
    TIDE_BACKEND_PINNABLE_HOST = 1u << 2,
};

typedef struct {
    const char *name;
    uint32_t caps;                  /* TIDE_BACKEND_* */
    void (*free)(tide_backend *be);
    /* Bytes free on the device now (cpu/sim: host RAM available). */
    tide_status (*mem_free)(tide_backend *be, uint64_t *free_bytes, uint64_t *total_bytes);
} tide_backend_device_i;

typedef struct {
    tide_status (*alloc)(tide_backend *be, size_t n, void **ptr);     /* device memory */
    void (*dealloc)(tide_backend *be, void *ptr);
    tide_status (*upload)(tide_backend *be, void *dst, const void *src, size_t n);   /* sync */
    tide_status (*download)(tide_backend *be, void *dst, const void *src, size_t n); /* sync, waits for compute */
    /* Weight upload at load time. cpu returns src itself (zero copy) in *dst; sim and cuda copy.
     * *copied tells whether bytes moved (for weights_h2d_bytes). */
    tide_status (*upload_weight)(tide_backend *be, const void *src, size_t n, void **dst, int *copied);
    /* Expert transfer on the transfer stream from pinned (or registered) host memory; returns at
     * once on cuda. transfer_fence() records a point on that stream; compute_wait_fence() makes
     * later compute wait for it (an event, no device-wide sync). transfer_sync() waits on the host. */
    tide_status (*upload_async)(tide_backend *be, void *dst, const void *src, size_t n);
    tide_status (*transfer_fence)(tide_backend *be, int32_t *fence);
    tide_status (*compute_wait_fence)(tide_backend *be, int32_t fence);
    tide_status (*transfer_sync)(tide_backend *be);
    /* Make [ptr, ptr+n) of host memory fast to copy from (TIDE_BACKEND_PINNABLE_HOST); a no-op
     * elsewhere. */
    tide_status (*pin_host)(tide_backend *be, void *ptr, size_t n);
} tide_backend_buffer_i;

typedef struct {
    /* Wait for every op enqueued so far. */
    tide_status (*synchronize)(tide_backend *be);
    /* ---- ops (device pointers) ---- */
    /* y[n, w.rows] = x[n, w.cols] @ W^T */
    tide_status (*matmul)(tide_backend *be, const tide_matrix *w, const float *x, int32_t n, float *y);
    /* y[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * weight, rows of dim; y may equal x */
    tide_status (*rmsnorm)(tide_backend *be, const float *x, const float *weight, int32_t n_rows,
                           int32_t dim, float eps, float *y);
    /* In-place NeoX RoPE on the first rope_dim dims of each head of x[n_tok, n_head*head_dim]
     * (row stride `stride` floats), token i at position pos0 + i; pairs (j, j + rope_dim/2),
     * inv_freq[j] = theta^(-2j/rope_dim). */
    tide_status (*rope)(tide_backend *be, float *x, int32_t n_tok, int64_t stride, int32_t n_head,
                        int32_t head_dim, int32_t rope_dim, int32_t pos0, float theta);
    tide_status (*attention)(tide_backend *be, const tide_attn_shape *s, const float *q,
                             const void *k, const void *v, float *out);
    /* y[i] += x[i] */
    tide_status (*add)(tide_backend *be, float *y, const float *x, int64_t n);
    /* g[i] = silu(g[i]) * u[i] */
    tide_status (*silu_mul)(tide_backend *be, float *g, const float *u, int64_t n);
    /* dst[i] = src[rows[i]] for rows of dim floats; rows in host memory */
    tide_status (*gather_rows)(tide_backend *be, float *dst, const float *src, const int32_t *rows,
                               int32_t n_rows, int32_t dim);
    /* Expert FFNs: out[pair_dest[p]] = down(silu(gate(x)) * up(x)) for every pair of every job. */
    tide_status (*experts)(tide_backend *be, const tide_expert_batch *b, const float *x,
                           int32_t dim, float *out);
    /* out[t] += sum_k w[t*n_used + k] * pairs[t*n_used + k] in k order (w in host memory). */
    tide_status (*moe_combine)(tide_backend *be, const float *pairs, const float *w, int32_t n_tok,
                               int32_t n_used, int32_t dim, float *out);
    /* Greedy head: for each row of logits[n, n_vocab], the first index of the max and its softmax
     * probability, into host arrays. */
    tide_status (*argmax_prob)(tide_backend *be, const float *logits, int32_t n, int32_t n_vocab,
                               int32_t *out_token, float *out_prob);
    /* y[i] = x[i] stored as `type` (f32: a copy; f16, bf16: round to nearest even), n values:
     * the store into a half-precision KV cache */
    tide_status (*convert)(tide_backend *be, const float *x, int64_t n, int32_t type, void *y);
} tide_backend_ops_i;

struct tide_backend {
    const tide_backend_device_i *dev;
    const tide_backend_buffer_i *buf;
    const tide_backend_ops_i *ops;
    struct tide_pool *pool;  /* the host thread pool of the cpu kernels (cpu, sim); NULL for cuda */
    void *impl;              /* backend private state */
    char err[512];           /* last error message */
};

/* The cpu backend's ops, which the sim backend computes with too (backend_cpu.c). */
extern const tide_backend_ops_i tide_cpu_ops;
/* Host RAM available and total (cpu/sim free memory). */
tide_status tide_host_mem(uint64_t *free_bytes, uint64_t *total_bytes);
/* The transfers of host memory, complete when they return (cpu; sim around its allocator):
 * memcpy, fences that are already passed, nothing to wait for or pin. */
tide_status tide_host_copy(tide_backend *be, void *dst, const void *src, size_t n);
tide_status tide_host_fence(tide_backend *be, int32_t *fence);
tide_status tide_host_wait_fence(tide_backend *be, int32_t fence);
tide_status tide_host_nop(tide_backend *be);
tide_status tide_host_pin(tide_backend *be, void *ptr, size_t n);

/* Constructors. The cpu kernels run on `pool` (the context's). */
tide_status tide_backend_cpu_new(struct tide_pool *pool, tide_backend **out);
tide_status tide_backend_sim_new(struct tide_pool *pool, uint64_t memory, tide_backend **out);
#ifdef TIDE_CUDA
tide_status tide_backend_cuda_new(int32_t device, uint64_t memory, tide_backend **out, char *err, size_t err_len);
int tide_backend_cuda_available(char *err, size_t err_len);
#endif

#ifdef __cplusplus
}
#endif
#endif /* TIDE_BACKEND_H */

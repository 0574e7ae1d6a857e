/* cuda_common.cuh: what every file of the CUDA backend shares: the backend's private state, error
 * handling (every CUDA error becomes a tide_status with a message, nothing aborts), the small
 * "parameter arena" that carries host-side metadata (row lists, router weights, expert tables) to
 * the device in one async copy, and the launchers each kernel file provides. The weight-type
 * decoders and the shared inner loop of the weight products are in rowdot.cuh.
 *
 * Streams: `compute` runs every op in order; `transfer` runs expert uploads (upload_async) and
 * is joined to compute only through fences (events), never through a device-wide sync.
 */
#ifndef TIDE_CUDA_COMMON_CUH
#define TIDE_CUDA_COMMON_CUH

#include <stdint.h>
#include <stddef.h>
#ifdef TIDE_CUDA_EMU
#include "emu_cuda.h" /* native/tests/emu: runs these kernels on the CPU to check them without a GPU */
#else
#include <cuda_runtime.h>
#include <cuda_fp16.h>
/* kernel<<<grid, block, smem, stream>>>(args), written so the emulator can stand in for it */
#define TCU_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define TCU_DYN_SHARED(type, name) extern __shared__ type name[]
#endif

extern "C" {
#include "backend/backend.h"
}

#include <unordered_map>
#include <vector>

namespace tide_cuda {

enum { N_FENCES = 64, ARENA_SEGS = 4, STAGE_BUFS = 2 };

struct host_region {
    uintptr_t lo, hi; /* registered [lo, hi) */
};

struct state {
    int device;
    int sm_count;
    cudaStream_t compute, transfer;

    /* transfer fences: a ring of events; a fence number f lives in event f % N_FENCES (reusing an
     * event only makes a late waiter wait for more, which is still correct). */
    cudaEvent_t fences[N_FENCES];
    int32_t n_fences;

    /* device memory accounting against the budget */
    uint64_t budget, used;
    std::unordered_map<void *, size_t> *allocs;

    /* host ranges registered with cudaHostRegister (pin_host) */
    std::vector<host_region> *pinned;

    /* staging buffers for upload_async from memory that could not be registered */
    void *stage[STAGE_BUFS];
    cudaEvent_t stage_ev[STAGE_BUFS];
    size_t stage_bytes;
    int stage_next;

    /* parameter arena: pinned host ring + device mirror of the same size */
    char *arena_h, *arena_d;
    size_t arena_bytes;          /* ARENA_SEGS segments of arena_bytes / ARENA_SEGS */
    int arena_seg;               /* segment in use */
    size_t arena_seg_off;        /* bytes used in it */
    cudaEvent_t arena_ev[ARENA_SEGS]; /* recorded on compute when a segment is left */

    /* scratch on the device, grown on demand (growth synchronizes the compute stream) */
    float *hidden;         /* experts: [n_pairs, n_ff] */
    size_t hidden_bytes;
    void *head_d;          /* argmax: [n] int32 + [n] float */
    void *head_h;          /* pinned copy of the same */
    size_t head_bytes;
};

static inline state *S(tide_backend *be) { return (state *)be->impl; }

/* Write "what: CUDA's message (name)" into be->err and return TIDE_ERR_DEVICE. */
tide_status fail(tide_backend *be, cudaError_t e, const char *what);

#define TCU_CHECK(be, what, call)                                                                  \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) return ::tide_cuda::fail((be), e_, (what));                          \
    } while (0)

/* After a kernel launch: configuration errors (and earlier asynchronous ones) surface here. */
#define TCU_LAUNCHED(be, what) TCU_CHECK(be, what, cudaGetLastError())

/* Make this thread's current device the backend's (cheap when it already is). */
tide_status use_device(tide_backend *be);

/* Device memory inside the budget (internal scratch counts too). */
tide_status dev_alloc(tide_backend *be, size_t n, void **ptr);
void dev_free(tide_backend *be, void *ptr);

/* Copy n bytes of host memory into the arena and enqueue their upload on the compute stream;
 * *dptr is where the kernels find them. The host memory may be reused as soon as this returns. */
tide_status arena_put(tide_backend *be, const void *src, size_t n, void **dptr);
/* Pinned host bytes in the arena for n bytes (16-byte aligned); *off is their offset, valid in
 * both arena_h and arena_d. The caller copies into arena_h + *off and enqueues the upload. */
tide_status arena_reserve(tide_backend *be, size_t n, size_t *off);
/* Same with several pieces packed into one upload; dptrs[i] receive the device addresses
 * (each piece 16-byte aligned). */
tide_status arena_put_many(tide_backend *be, int count, const void *const *srcs, const size_t *ns,
                           void **dptrs);

/* Make sure a scratch buffer holds n bytes (synchronizes the compute stream when it grows). */
tide_status scratch_reserve(tide_backend *be, void **buf, size_t *have, size_t n);

static inline unsigned div_up(int64_t a, int64_t b) { return (unsigned)((a + b - 1) / b); }

/* ---- launchers, one per file (each checks its arguments and the launch) ---- */
tide_status launch_matmul(tide_backend *be, const tide_matrix *w, const float *x, int32_t n, float *y);
tide_status launch_experts(tide_backend *be, const tide_expert_batch *b, const float *x, int32_t dim,
                           float *out);
tide_status launch_rmsnorm(tide_backend *be, const float *x, const float *weight, int32_t n_rows,
                           int32_t dim, float eps, float *y);
tide_status launch_rope(tide_backend *be, float *x, int32_t n_tok, int64_t stride, int32_t n_head,
                        int32_t head_dim, int32_t rope_dim, int32_t pos0, float theta);
tide_status launch_attention(tide_backend *be, const tide_attn_shape *s, const float *q,
                             const void *k, const void *v, float *out);
/* y = x stored as f32, f16 or bf16 (the KV cache's store; attention.cu) */
tide_status launch_convert(tide_backend *be, const float *x, int64_t n, int32_t type, void *y);
tide_status launch_add(tide_backend *be, float *y, const float *x, int64_t n);
tide_status launch_silu_mul(tide_backend *be, float *g, const float *u, int64_t n);
tide_status launch_gather_rows(tide_backend *be, float *dst, const float *src, const int32_t *rows,
                               int32_t n_rows, int32_t dim);
tide_status launch_moe_combine(tide_backend *be, const float *pairs, const float *w, int32_t n_tok,
                               int32_t n_used, int32_t dim, float *out);
tide_status launch_argmax_prob(tide_backend *be, const float *logits, int32_t n, int32_t n_vocab,
                               int32_t *out_token, float *out_prob);

} // namespace tide_cuda

#endif /* TIDE_CUDA_COMMON_CUH */

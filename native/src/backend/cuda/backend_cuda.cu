/* backend_cuda.cu: the CUDA implementation of tide_backend_i: the table, device memory inside a
 * budget, the compute and transfer streams, transfer fences (a ring of events), pinned and
 * registered host memory, and the parameter arena. The kernels live in the other files.
 *
 * Memory. `memory` bytes may be used on the device (0: free memory at creation minus 512 MiB);
 * every cudaMalloc, internal scratch included, is counted against it, and an allocation past it
 * fails with "device out of memory: needed X MiB, free Y MiB (budget Z MiB)".
 *
 * Expert transfers. pin_host registers the mmapped expert range with cudaHostRegister (read-only
 * where the driver allows, so a private file mapping is not copied on write). When registration
 * fails (no support, RLIMIT_MEMLOCK, file larger than RAM), upload_async copies through two
 * pinned staging buffers of 8 MiB: while the DMA of one runs, the host fills the other. The
 * upload still returns before the last chunk's DMA ends, but it costs the host a memcpy.
 *
 * Ordering rules the forward pass relies on: every op runs in order on the compute stream;
 * upload_async runs on the transfer stream and becomes visible to compute only after
 * transfer_fence + compute_wait_fence; upload, download and argmax_prob are synchronous for the
 * host. An expert slot must not be overwritten by upload_async while queued compute still reads
 * it: the forward pass ensures this (it refreshes residency after a synchronous download).
 */
#include "cuda_common.cuh"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <new>

namespace tide_cuda {

static const uint64_t RESERVE = 512ull << 20;   /* left free when memory = 0 */
static const size_t STAGE_BYTES = 8u << 20;     /* per staging buffer */
static const size_t ARENA_MIN = 256u << 10;     /* initial parameter arena (grows) */
static const size_t SMALL_UPLOAD = 32u << 10;   /* sync uploads up to this go through the arena */

static double mib(uint64_t b) { return (double)b / (1024.0 * 1024.0); }

tide_status fail(tide_backend *be, cudaError_t e, const char *what) {
    return tide_errf(be->err, sizeof be->err, TIDE_ERR_DEVICE, "%s: %s (%s)", what,
                     cudaGetErrorString(e), cudaGetErrorName(e));
}

tide_status use_device(tide_backend *be) {
    TCU_CHECK(be, "cudaSetDevice", cudaSetDevice(S(be)->device));
    return TIDE_OK;
}

/* ---- device memory inside the budget ------------------------------------------------------ */
static tide_status out_of_memory(tide_backend *be, size_t need) {
    state *st = S(be);
    size_t dev_free = 0, dev_total = 0;
    if (cudaMemGetInfo(&dev_free, &dev_total) != cudaSuccess) (void)cudaGetLastError();
    uint64_t left = st->budget > st->used ? st->budget - st->used : 0;
    uint64_t free_now = left < (uint64_t)dev_free ? left : (uint64_t)dev_free;
    return tide_errf(be->err, sizeof be->err, TIDE_ERR_DEVICE, "device out of memory: needed %.1f MiB, free %.1f MiB (budget %.1f MiB)",
                 mib(need), mib(free_now), mib(st->budget));
}

tide_status dev_alloc(tide_backend *be, size_t n, void **ptr) {
    state *st = S(be);
    *ptr = nullptr;
    size_t rounded = ((n ? n : 1) + 255) & ~(size_t)255;
    if (st->used + rounded > st->budget) return out_of_memory(be, rounded);
    void *p = nullptr;
    cudaError_t e = cudaMalloc(&p, rounded);
    if (e == cudaErrorMemoryAllocation) {
        (void)cudaGetLastError();
        return out_of_memory(be, rounded);
    }
    if (e != cudaSuccess) return fail(be, e, "cudaMalloc");
    try {
        (*st->allocs)[p] = rounded;
    } catch (...) {
        cudaFree(p);
        return tide_errf(be->err, sizeof be->err, TIDE_ERR_NOMEM, "host out of memory (allocation table)");
    }
    st->used += rounded;
    *ptr = p;
    return TIDE_OK;
}

void dev_free(tide_backend *be, void *ptr) {
    state *st = S(be);
    if (!ptr) return;
    auto it = st->allocs->find(ptr);
    if (it == st->allocs->end()) return; /* not ours: ignore rather than corrupt the heap */
    st->used -= it->second;
    st->allocs->erase(it);
    if (cudaFree(ptr) != cudaSuccess) (void)cudaGetLastError();
}

tide_status scratch_reserve(tide_backend *be, void **buf, size_t *have, size_t n) {
    if (n <= *have && *buf) return TIDE_OK;
    state *st = S(be);
    size_t want = n + n / 4; /* a little headroom: the next forward may route a few more pairs */
    TCU_CHECK(be, "scratch: cudaStreamSynchronize", cudaStreamSynchronize(st->compute));
    dev_free(be, *buf);
    *buf = nullptr;
    *have = 0;
    tide_status rc = dev_alloc(be, want, buf);
    if (rc != TIDE_OK) return rc;
    *have = want;
    return TIDE_OK;
}

/* ---- parameter arena ---------------------------------------------------------------------- */
static tide_status arena_alloc(tide_backend *be, size_t bytes) {
    state *st = S(be);
    void *h = nullptr, *d = nullptr;
    TCU_CHECK(be, "arena: cudaMallocHost", cudaMallocHost(&h, bytes));
    tide_status rc = dev_alloc(be, bytes, &d);
    if (rc != TIDE_OK) {
        cudaFreeHost(h);
        return rc;
    }
    st->arena_h = (char *)h;
    st->arena_d = (char *)d;
    st->arena_bytes = bytes;
    st->arena_seg = 0;
    st->arena_seg_off = 0;
    return TIDE_OK;
}

tide_status arena_reserve(tide_backend *be, size_t n, size_t *off) {
    state *st = S(be);
    n = (n + 15) & ~(size_t)15;
    size_t seg = st->arena_bytes / ARENA_SEGS;
    if (n > seg) {
        /* grow: wait for every copy out of the old arena, then replace it */
        size_t bytes = st->arena_bytes;
        while (bytes / ARENA_SEGS < n) bytes *= 2;
        TCU_CHECK(be, "arena: cudaStreamSynchronize", cudaStreamSynchronize(st->compute));
        cudaFreeHost(st->arena_h);
        dev_free(be, st->arena_d);
        st->arena_h = st->arena_d = nullptr;
        st->arena_bytes = 0;
        tide_status rc = arena_alloc(be, bytes);
        if (rc != TIDE_OK) return rc;
        seg = st->arena_bytes / ARENA_SEGS;
    }
    if (st->arena_seg_off + n > seg) {
        /* leave this segment (mark its last copy), enter the next once its old copies are done */
        TCU_CHECK(be, "arena: cudaEventRecord", cudaEventRecord(st->arena_ev[st->arena_seg], st->compute));
        st->arena_seg = (st->arena_seg + 1) % ARENA_SEGS;
        TCU_CHECK(be, "arena: cudaEventSynchronize", cudaEventSynchronize(st->arena_ev[st->arena_seg]));
        st->arena_seg_off = 0;
    }
    *off = (size_t)st->arena_seg * seg + st->arena_seg_off;
    st->arena_seg_off += n;
    return TIDE_OK;
}

tide_status arena_put_many(tide_backend *be, int count, const void *const *srcs, const size_t *ns,
                           void **dptrs) {
    state *st = S(be);
    size_t total = 0;
    for (int i = 0; i < count; i++) total += (ns[i] + 15) & ~(size_t)15;
    size_t off = 0;
    tide_status rc = arena_reserve(be, total, &off);
    if (rc != TIDE_OK) return rc;
    size_t o = off;
    for (int i = 0; i < count; i++) {
        if (ns[i]) memcpy(st->arena_h + o, srcs[i], ns[i]);
        dptrs[i] = st->arena_d + o;
        o += (ns[i] + 15) & ~(size_t)15;
    }
    if (total)
        TCU_CHECK(be, "arena: cudaMemcpyAsync", cudaMemcpyAsync(st->arena_d + off, st->arena_h + off, total,
                                                               cudaMemcpyHostToDevice, st->compute));
    return TIDE_OK;
}

tide_status arena_put(tide_backend *be, const void *src, size_t n, void **dptr) {
    return arena_put_many(be, 1, &src, &n, dptr);
}

/* ---- the table ---------------------------------------------------------------------------- */
static void be_free(tide_backend *be);

static tide_status be_alloc(tide_backend *be, size_t n, void **ptr) {
    tide_status rc = use_device(be);
    return rc != TIDE_OK ? rc : dev_alloc(be, n, ptr);
}

static void be_dealloc(tide_backend *be, void *ptr) {
    if (use_device(be) == TIDE_OK) dev_free(be, ptr);
}

static tide_status be_upload(tide_backend *be, void *dst, const void *src, size_t n) {
    tide_status rc = use_device(be);
    if (rc != TIDE_OK || n == 0) return rc;
    state *st = S(be);
    if (n <= SMALL_UPLOAD) {
        /* through the pinned arena: the caller may reuse src at once, the host does not wait */
        size_t off = 0;
        rc = arena_reserve(be, n, &off);
        if (rc != TIDE_OK) return rc;
        memcpy(st->arena_h + off, src, n);
        TCU_CHECK(be, "upload: cudaMemcpyAsync",
                  cudaMemcpyAsync(dst, st->arena_h + off, n, cudaMemcpyHostToDevice, st->compute));
        return TIDE_OK;
    }
    TCU_CHECK(be, "upload: cudaMemcpyAsync", cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, st->compute));
    TCU_CHECK(be, "upload: cudaStreamSynchronize", cudaStreamSynchronize(st->compute));
    return TIDE_OK;
}

static tide_status be_download(tide_backend *be, void *dst, const void *src, size_t n) {
    tide_status rc = use_device(be);
    if (rc != TIDE_OK || n == 0) return rc;
    state *st = S(be);
    TCU_CHECK(be, "download: cudaMemcpyAsync", cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, st->compute));
    /* errors of earlier asynchronous ops surface here */
    TCU_CHECK(be, "download: waiting for the device (an earlier op may have failed)",
              cudaStreamSynchronize(st->compute));
    return TIDE_OK;
}

static tide_status be_upload_weight(tide_backend *be, const void *src, size_t n, void **dst, int *copied) {
    *dst = nullptr;
    if (copied) *copied = 0;
    tide_status rc = be_alloc(be, n, dst);
    if (rc != TIDE_OK) return rc;
    state *st = S(be);
    cudaError_t e = cudaMemcpyAsync(*dst, src, n, cudaMemcpyHostToDevice, st->compute);
    if (e == cudaSuccess) e = cudaStreamSynchronize(st->compute);
    if (e != cudaSuccess) {
        dev_free(be, *dst);
        *dst = nullptr;
        return fail(be, e, "upload_weight");
    }
    if (copied) *copied = 1;
    return TIDE_OK;
}

static bool is_registered(state *st, const void *src, size_t n) {
    uintptr_t lo = (uintptr_t)src, hi = lo + n;
    for (const host_region &r : *st->pinned)
        if (lo >= r.lo && hi <= r.hi) return true;
    return false;
}

static tide_status be_upload_async(tide_backend *be, void *dst, const void *src, size_t n) {
    tide_status rc = use_device(be);
    if (rc != TIDE_OK || n == 0) return rc;
    state *st = S(be);
    if (is_registered(st, src, n)) {
        TCU_CHECK(be, "upload_async: cudaMemcpyAsync",
                  cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, st->transfer));
        return TIDE_OK;
    }
    /* not registered: double-buffered pinned staging */
    if (!st->stage[0]) {
        for (int b = 0; b < STAGE_BUFS; b++)
            TCU_CHECK(be, "upload_async: cudaMallocHost (staging)", cudaMallocHost(&st->stage[b], STAGE_BYTES));
        st->stage_bytes = STAGE_BYTES;
    }
    for (size_t off = 0; off < n; off += st->stage_bytes) {
        size_t c = n - off < st->stage_bytes ? n - off : st->stage_bytes;
        int b = st->stage_next;
        st->stage_next = (b + 1) % STAGE_BUFS;
        TCU_CHECK(be, "upload_async: cudaEventSynchronize (staging)", cudaEventSynchronize(st->stage_ev[b]));
        memcpy(st->stage[b], (const char *)src + off, c);
        TCU_CHECK(be, "upload_async: cudaMemcpyAsync",
                  cudaMemcpyAsync((char *)dst + off, st->stage[b], c, cudaMemcpyHostToDevice, st->transfer));
        TCU_CHECK(be, "upload_async: cudaEventRecord", cudaEventRecord(st->stage_ev[b], st->transfer));
    }
    return TIDE_OK;
}

static tide_status be_transfer_fence(tide_backend *be, int32_t *fence) {
    tide_status rc = use_device(be);
    if (rc != TIDE_OK) return rc;
    state *st = S(be);
    int32_t f = st->n_fences;
    TCU_CHECK(be, "transfer_fence: cudaEventRecord", cudaEventRecord(st->fences[f % N_FENCES], st->transfer));
    st->n_fences = f == INT32_MAX ? 0 : f + 1;
    *fence = f;
    return TIDE_OK;
}

static tide_status be_compute_wait_fence(tide_backend *be, int32_t fence) {
    tide_status rc = use_device(be);
    if (rc != TIDE_OK) return rc;
    state *st = S(be);
    if (fence < 0) return tide_errf(be->err, sizeof be->err, TIDE_ERR_ARG, "compute_wait_fence: bad fence %d", fence);
    /* a fence older than the ring waits on a later point of the transfer stream: still correct */
    TCU_CHECK(be, "compute_wait_fence: cudaStreamWaitEvent",
              cudaStreamWaitEvent(st->compute, st->fences[fence % N_FENCES], 0));
    return TIDE_OK;
}

static tide_status be_transfer_sync(tide_backend *be) {
    tide_status rc = use_device(be);
    if (rc != TIDE_OK) return rc;
    TCU_CHECK(be, "transfer_sync: cudaStreamSynchronize", cudaStreamSynchronize(S(be)->transfer));
    return TIDE_OK;
}

static tide_status be_pin_host(tide_backend *be, void *ptr, size_t n) {
    tide_status rc = use_device(be);
    if (rc != TIDE_OK || !ptr || n == 0) return rc;
    state *st = S(be);
    if (is_registered(st, ptr, n)) return TIDE_OK;
    long ps = sysconf(_SC_PAGESIZE);
    uintptr_t page = ps > 0 ? (uintptr_t)ps : 4096;
    uintptr_t lo = (uintptr_t)ptr & ~(page - 1);
    uintptr_t hi = ((uintptr_t)ptr + n + page - 1) & ~(page - 1);
    cudaError_t e = cudaHostRegister((void *)lo, hi - lo, cudaHostRegisterPortable | cudaHostRegisterReadOnly);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        e = cudaHostRegister((void *)lo, hi - lo, cudaHostRegisterPortable);
    }
    if (e != cudaSuccess) {
        /* not fatal: upload_async falls back to the staging buffers */
        (void)cudaGetLastError();
        return TIDE_OK;
    }
    try {
        st->pinned->push_back(host_region{lo, hi});
    } catch (...) {
        cudaHostUnregister((void *)lo);
        return tide_errf(be->err, sizeof be->err, TIDE_ERR_NOMEM, "host out of memory (pinned region table)");
    }
    return TIDE_OK;
}

static tide_status be_synchronize(tide_backend *be) {
    tide_status rc = use_device(be);
    if (rc != TIDE_OK) return rc;
    state *st = S(be);
    TCU_CHECK(be, "synchronize (compute stream)", cudaStreamSynchronize(st->compute));
    TCU_CHECK(be, "synchronize (transfer stream)", cudaStreamSynchronize(st->transfer));
    return TIDE_OK;
}

static tide_status be_mem_free(tide_backend *be, uint64_t *free_bytes, uint64_t *total_bytes) {
    tide_status rc = use_device(be);
    if (rc != TIDE_OK) return rc;
    state *st = S(be);
    size_t f = 0, t = 0;
    TCU_CHECK(be, "cudaMemGetInfo", cudaMemGetInfo(&f, &t));
    uint64_t left = st->budget > st->used ? st->budget - st->used : 0;
    if (free_bytes) *free_bytes = left < (uint64_t)f ? left : (uint64_t)f;
    if (total_bytes) *total_bytes = st->budget;
    return TIDE_OK;
}

#define TCU_OP(call)                                                                               \
    do {                                                                                           \
        tide_status rc_ = use_device(be);                                                          \
        if (rc_ != TIDE_OK) return rc_;                                                            \
        return (call);                                                                             \
    } while (0)

static tide_status be_matmul(tide_backend *be, const tide_matrix *w, const float *x, int32_t n, float *y) {
    TCU_OP(launch_matmul(be, w, x, n, y));
}
static tide_status be_rmsnorm(tide_backend *be, const float *x, const float *weight, int32_t n_rows,
                              int32_t dim, float eps, float *y) {
    TCU_OP(launch_rmsnorm(be, x, weight, n_rows, dim, eps, y));
}
static tide_status be_rope(tide_backend *be, float *x, int32_t n_tok, int64_t stride, int32_t n_head,
                           int32_t head_dim, int32_t rope_dim, int32_t pos0, float theta) {
    TCU_OP(launch_rope(be, x, n_tok, stride, n_head, head_dim, rope_dim, pos0, theta));
}
static tide_status be_attention(tide_backend *be, const tide_attn_shape *s, const float *q, const void *k,
                                const void *v, float *out) {
    TCU_OP(launch_attention(be, s, q, k, v, out));
}
static tide_status be_convert(tide_backend *be, const float *x, int64_t n, int32_t type, void *y) {
    TCU_OP(launch_convert(be, x, n, type, y));
}
static tide_status be_add(tide_backend *be, float *y, const float *x, int64_t n) {
    TCU_OP(launch_add(be, y, x, n));
}
static tide_status be_silu_mul(tide_backend *be, float *g, const float *u, int64_t n) {
    TCU_OP(launch_silu_mul(be, g, u, n));
}
static tide_status be_gather_rows(tide_backend *be, float *dst, const float *src, const int32_t *rows,
                                  int32_t n_rows, int32_t dim) {
    TCU_OP(launch_gather_rows(be, dst, src, rows, n_rows, dim));
}
static tide_status be_experts(tide_backend *be, const tide_expert_batch *b, const float *x, int32_t dim,
                              float *out) {
    TCU_OP(launch_experts(be, b, x, dim, out));
}
static tide_status be_moe_combine(tide_backend *be, const float *pairs, const float *w, int32_t n_tok,
                                  int32_t n_used, int32_t dim, float *out) {
    TCU_OP(launch_moe_combine(be, pairs, w, n_tok, n_used, dim, out));
}
static tide_status be_argmax_prob(tide_backend *be, const float *logits, int32_t n, int32_t n_vocab,
                                  int32_t *out_token, float *out_prob) {
    TCU_OP(launch_argmax_prob(be, logits, n, n_vocab, out_token, out_prob));
}

/* C++17 has no designated initializers: the fields in declaration order (backend.h). */
static const tide_backend_device_i CUDA_DEVICE = {
    /* name */ "cuda",
    /* caps */ TIDE_BACKEND_ASYNC | TIDE_BACKEND_PINNABLE_HOST,
    /* free */ be_free,
    /* mem_free */ be_mem_free,
};

static const tide_backend_buffer_i CUDA_BUFFER = {
    /* alloc */ be_alloc,
    /* dealloc */ be_dealloc,
    /* upload */ be_upload,
    /* download */ be_download,
    /* upload_weight */ be_upload_weight,
    /* upload_async */ be_upload_async,
    /* transfer_fence */ be_transfer_fence,
    /* compute_wait_fence */ be_compute_wait_fence,
    /* transfer_sync */ be_transfer_sync,
    /* pin_host */ be_pin_host,
};

static const tide_backend_ops_i CUDA_OPS = {
    /* synchronize */ be_synchronize,
    /* matmul */ be_matmul,
    /* rmsnorm */ be_rmsnorm,
    /* rope */ be_rope,
    /* attention */ be_attention,
    /* add */ be_add,
    /* silu_mul */ be_silu_mul,
    /* gather_rows */ be_gather_rows,
    /* experts */ be_experts,
    /* moe_combine */ be_moe_combine,
    /* argmax_prob */ be_argmax_prob,
    /* convert */ be_convert,
};

static void be_free(tide_backend *be) {
    if (!be) return;
    state *st = S(be);
    if (st) {
        if (cudaSetDevice(st->device) != cudaSuccess) (void)cudaGetLastError();
        if (st->compute && cudaStreamSynchronize(st->compute) != cudaSuccess) (void)cudaGetLastError();
        if (st->transfer && cudaStreamSynchronize(st->transfer) != cudaSuccess) (void)cudaGetLastError();
        if (st->pinned) {
            for (const host_region &r : *st->pinned) cudaHostUnregister((void *)r.lo);
            delete st->pinned;
        }
        if (st->allocs) {
            for (auto &kv : *st->allocs) cudaFree(kv.first);
            delete st->allocs;
        }
        if (st->arena_h) cudaFreeHost(st->arena_h);
        if (st->head_h) cudaFreeHost(st->head_h);
        for (int b = 0; b < STAGE_BUFS; b++) {
            if (st->stage[b]) cudaFreeHost(st->stage[b]);
            if (st->stage_ev[b]) cudaEventDestroy(st->stage_ev[b]);
        }
        for (int i = 0; i < N_FENCES; i++)
            if (st->fences[i]) cudaEventDestroy(st->fences[i]);
        for (int i = 0; i < ARENA_SEGS; i++)
            if (st->arena_ev[i]) cudaEventDestroy(st->arena_ev[i]);
        if (st->compute) cudaStreamDestroy(st->compute);
        if (st->transfer) cudaStreamDestroy(st->transfer);
        (void)cudaGetLastError();
        delete st;
    }
    free(be);
}

__global__ void k_probe() {}

/* "no usable CUDA GPU" reasons, shared by available() and the constructor. */
static int probe_devices(int *count, char *err, size_t err_len) {
    *count = 0;
    cudaError_t e = cudaGetDeviceCount(count);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        if (err && err_len)
            snprintf(err, err_len, "%s (%s)",
                     e == cudaErrorInsufficientDriver ? "no NVIDIA driver, or one too old for this build's CUDA runtime"
                                                      : cudaGetErrorString(e),
                     cudaGetErrorName(e));
        *count = 0;
        return 0;
    }
    if (*count <= 0) {
        if (err && err_len) snprintf(err, err_len, "no CUDA device found");
        return 0;
    }
    return 1;
}

} // namespace tide_cuda

using namespace tide_cuda;

extern "C" int tide_backend_cuda_available(char *err, size_t err_len) {
    if (err && err_len) err[0] = '\0';
    int count = 0;
    if (!probe_devices(&count, err, err_len)) return 0;
    for (int d = 0; d < count; d++) {
        int major = 0;
        if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, d) == cudaSuccess && major >= 8)
            return 1;
    }
    (void)cudaGetLastError();
    if (err && err_len)
        snprintf(err, err_len, "no CUDA device of compute capability 8.0 or newer (%d found)", count);
    return 0;
}

extern "C" tide_status tide_backend_cuda_new(int32_t device, uint64_t memory, tide_backend **out, char *err,
                                             size_t err_len) {
    if (err && err_len) err[0] = '\0';
    if (!out) return TIDE_ERR_ARG;
    *out = nullptr;
    char why[256];
    int count = 0;
    if (!probe_devices(&count, why, sizeof why)) {
        if (err && err_len) snprintf(err, err_len, "no CUDA GPU: %s", why);
        return TIDE_ERR_DEVICE;
    }
    if (device < 0 || device >= count) {
        if (err && err_len) snprintf(err, err_len, "CUDA device %d does not exist (%d found)", device, count);
        return TIDE_ERR_ARG;
    }
    cudaDeviceProp prop;
    cudaError_t e = cudaGetDeviceProperties(&prop, device);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        if (err && err_len) snprintf(err, err_len, "cudaGetDeviceProperties: %s", cudaGetErrorString(e));
        return TIDE_ERR_DEVICE;
    }
    if (prop.major < 8) {
        if (err && err_len)
            snprintf(err, err_len, "CUDA device %d (%s) has compute capability %d.%d; tide.cpp needs 8.0 or newer",
                     device, prop.name, prop.major, prop.minor);
        return TIDE_ERR_UNSUPPORTED;
    }

    tide_backend *be = (tide_backend *)calloc(1, sizeof *be);
    state *st = new (std::nothrow) state();
    if (!be || !st) {
        free(be);
        delete st;
        if (err && err_len) snprintf(err, err_len, "host out of memory");
        return TIDE_ERR_NOMEM;
    }
    be->dev = &CUDA_DEVICE;
    be->buf = &CUDA_BUFFER;
    be->ops = &CUDA_OPS;
    be->impl = st;
    st->device = device;
    st->sm_count = prop.multiProcessorCount > 0 ? prop.multiProcessorCount : 1;
    st->allocs = new (std::nothrow) std::unordered_map<void *, size_t>();
    st->pinned = new (std::nothrow) std::vector<host_region>();

    tide_status rc = TIDE_OK;
    size_t dev_free_b = 0, dev_total_b = 0;
    cudaFuncAttributes fa;
    if (!st->allocs || !st->pinned) {
        rc = tide_errf(be->err, sizeof be->err, TIDE_ERR_NOMEM, "host out of memory");
        goto fail;
    }
#define NEW_CHECK(what, call)                                                                      \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) {                                                                   \
            rc = fail(be, e_, what);                                                               \
            goto fail;                                                                             \
        }                                                                                          \
    } while (0)
    NEW_CHECK("cudaSetDevice", cudaSetDevice(device));
    e = cudaFuncGetAttributes(&fa, k_probe);
    if (e == cudaErrorNoKernelImageForDevice || e == cudaErrorInvalidDeviceFunction) {
        (void)cudaGetLastError();
        rc = tide_errf(be->err, sizeof be->err, TIDE_ERR_UNSUPPORTED,
                   "this build has no kernels for %s (compute capability %d.%d): rebuild with CUDA_ARCHS "
                   "naming sm_%d%d",
                   prop.name, prop.major, prop.minor, prop.major, prop.minor);
        goto fail;
    }
    NEW_CHECK("probe kernel", e);
    NEW_CHECK("cudaStreamCreate (compute)", cudaStreamCreateWithFlags(&st->compute, cudaStreamNonBlocking));
    NEW_CHECK("cudaStreamCreate (transfer)", cudaStreamCreateWithFlags(&st->transfer, cudaStreamNonBlocking));
    for (int i = 0; i < N_FENCES; i++)
        NEW_CHECK("cudaEventCreate", cudaEventCreateWithFlags(&st->fences[i], cudaEventDisableTiming));
    for (int i = 0; i < ARENA_SEGS; i++)
        NEW_CHECK("cudaEventCreate", cudaEventCreateWithFlags(&st->arena_ev[i], cudaEventDisableTiming));
    for (int b = 0; b < STAGE_BUFS; b++)
        NEW_CHECK("cudaEventCreate", cudaEventCreateWithFlags(&st->stage_ev[b], cudaEventDisableTiming));
    NEW_CHECK("cudaMemGetInfo", cudaMemGetInfo(&dev_free_b, &dev_total_b));
#undef NEW_CHECK
    if (memory == 0)
        st->budget = (uint64_t)dev_free_b > RESERVE ? (uint64_t)dev_free_b - RESERVE : 0;
    else
        st->budget = memory;
    rc = arena_alloc(be, ARENA_MIN);
    if (rc != TIDE_OK) goto fail;
    *out = be;
    return TIDE_OK;

fail:
    if (err && err_len) snprintf(err, err_len, "%s", be->err);
    be_free(be);
    return rc;
}

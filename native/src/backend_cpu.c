/* backend_cpu.c: tide_backend_i over the CPU kernels. "Device" memory is host memory, weights are
 * used in place (zero copy from the mapping), every op runs to completion on the thread pool
 * before it returns. backend_sim.c reuses these ops over its own allocations. */
#include "backend.h"
#include "cpu/kernels.h"
#include "threadpool.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Shared by cpu and sim: the first member of either backend's impl. */
typedef struct {
    tide_pool *pool;
} tide_host_impl;

#define POOL(be) (((tide_host_impl *)(be)->impl)->pool)

static tide_status be_fail(tide_backend *be, tide_status st, const char *what) {
    snprintf(be->err, sizeof be->err, "%s failed (status %d)", what, (int)st);
    return st;
}

static void cpu_free(tide_backend *be) {
    if (!be) return;
    free(be->impl);
    free(be);
}

static tide_status cpu_alloc(tide_backend *be, size_t n, void **ptr) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? n : 64) != 0) {
        snprintf(be->err, sizeof be->err, "out of host memory allocating %zu bytes", n);
        return TIDE_ERR_NOMEM;
    }
    *ptr = p;
    return TIDE_OK;
}

static void cpu_dealloc(tide_backend *be, void *ptr) { free(ptr); }

static tide_status host_copy(tide_backend *be, void *dst, const void *src, size_t n) {
    if (n) memcpy(dst, src, n);
    return TIDE_OK;
}

static tide_status cpu_upload_weight(tide_backend *be, const void *src, size_t n, void **dst,
                                     int *copied) {
    *dst = (void *)src;
    *copied = 0;
    return TIDE_OK;
}

static tide_status host_fence(tide_backend *be, int32_t *fence) {
    *fence = 0;
    return TIDE_OK;
}
static tide_status host_wait_fence(tide_backend *be, int32_t fence) { return TIDE_OK; }
static tide_status host_nop(tide_backend *be) { return TIDE_OK; }
static tide_status host_pin(tide_backend *be, void *ptr, size_t n) { return TIDE_OK; }

/* Host RAM available (MemAvailable), total (MemTotal). */
tide_status tide_host_mem(uint64_t *free_bytes, uint64_t *total_bytes) {
    FILE *f = fopen("/proc/meminfo", "r");
    unsigned long long tot = 0, avail = 0, v;
    char line[256];
    if (f) {
        while (fgets(line, sizeof line, f)) {
            if (sscanf(line, "MemTotal: %llu kB", &v) == 1) tot = v * 1024;
            else if (sscanf(line, "MemAvailable: %llu kB", &v) == 1) avail = v * 1024;
        }
        fclose(f);
    }
    *free_bytes = avail;
    *total_bytes = tot;
    return TIDE_OK;
}

static tide_status cpu_mem_free(tide_backend *be, uint64_t *free_bytes, uint64_t *total_bytes) {
    return tide_host_mem(free_bytes, total_bytes);
}

/* ---- ops ---- */
static tide_status op_matmul(tide_backend *be, const tide_matrix *w, const float *x, int32_t n,
                             float *y) {
    tide_status st = cpu_matmul(POOL(be), w, x, n, y);
    return st == TIDE_OK ? st : be_fail(be, st, "matmul");
}
static tide_status op_rmsnorm(tide_backend *be, const float *x, const float *weight, int32_t n_rows,
                              int32_t dim, float eps, float *y) {
    tide_status st = cpu_rmsnorm(POOL(be), x, weight, n_rows, dim, eps, y);
    return st == TIDE_OK ? st : be_fail(be, st, "rmsnorm");
}
static tide_status op_rope(tide_backend *be, float *x, int32_t n_tok, int64_t stride, int32_t n_head,
                           int32_t head_dim, int32_t rope_dim, int32_t pos0, float theta) {
    tide_status st = cpu_rope(POOL(be), x, n_tok, stride, n_head, head_dim, rope_dim, pos0, theta);
    return st == TIDE_OK ? st : be_fail(be, st, "rope");
}
static tide_status op_attention(tide_backend *be, const tide_attn_shape *s, const float *q,
                                const float *k, const float *v, float *out) {
    tide_status st = cpu_attention(POOL(be), s, q, k, v, out);
    return st == TIDE_OK ? st : be_fail(be, st, "attention");
}
static tide_status op_add(tide_backend *be, float *y, const float *x, int64_t n) {
    cpu_add(POOL(be), y, x, n);
    return TIDE_OK;
}
static tide_status op_silu_mul(tide_backend *be, float *g, const float *u, int64_t n) {
    cpu_silu_mul(POOL(be), g, u, n);
    return TIDE_OK;
}
static tide_status op_copy(tide_backend *be, float *dst, const float *src, int64_t n) {
    cpu_copy(POOL(be), dst, src, n);
    return TIDE_OK;
}
static tide_status op_gather_rows(tide_backend *be, float *dst, const float *src,
                                  const int32_t *rows, int32_t n_rows, int32_t dim) {
    cpu_gather_rows(POOL(be), dst, src, rows, n_rows, dim);
    return TIDE_OK;
}
static tide_status op_experts(tide_backend *be, const tide_expert_batch *b, const float *x,
                              int32_t dim, float *out) {
    tide_status st = cpu_experts(POOL(be), b, x, dim, out);
    return st == TIDE_OK ? st : be_fail(be, st, "experts");
}
static tide_status op_moe_combine(tide_backend *be, const float *pairs, const float *w,
                                  int32_t n_tok, int32_t n_used, int32_t dim, float *out) {
    cpu_moe_combine(POOL(be), pairs, w, n_tok, n_used, dim, out);
    return TIDE_OK;
}
static tide_status op_argmax_prob(tide_backend *be, const float *logits, int32_t n, int32_t n_vocab,
                                  int32_t *out_token, float *out_prob) {
    cpu_argmax_prob(POOL(be), logits, n, n_vocab, out_token, out_prob);
    return TIDE_OK;
}

/* The ops every host-memory backend shares (sim overrides the memory functions). */
void tide_backend_host_ops(tide_backend_i *i) {
    memset(i, 0, sizeof *i);
    i->name = "cpu";
    i->free = cpu_free;
    i->alloc = cpu_alloc;
    i->dealloc = cpu_dealloc;
    i->upload = host_copy;
    i->download = host_copy;
    i->upload_weight = cpu_upload_weight;
    i->upload_async = host_copy;
    i->transfer_fence = host_fence;
    i->compute_wait_fence = host_wait_fence;
    i->transfer_sync = host_nop;
    i->pin_host = host_pin;
    i->synchronize = host_nop;
    i->mem_free = cpu_mem_free;
    i->matmul = op_matmul;
    i->rmsnorm = op_rmsnorm;
    i->rope = op_rope;
    i->attention = op_attention;
    i->add = op_add;
    i->silu_mul = op_silu_mul;
    i->copy = op_copy;
    i->gather_rows = op_gather_rows;
    i->experts = op_experts;
    i->moe_combine = op_moe_combine;
    i->argmax_prob = op_argmax_prob;
}

typedef struct {
    tide_host_impl host;
    tide_backend_i ops;
} tide_cpu_backend;

tide_status tide_backend_cpu_new(int32_t n_threads, struct tide_pool *pool, tide_backend **out) {
    *out = NULL;
    tide_backend *be = calloc(1, sizeof *be);
    tide_cpu_backend *impl = calloc(1, sizeof *impl);
    if (!be || !impl) {
        free(be);
        free(impl);
        return TIDE_ERR_NOMEM;
    }
    impl->host.pool = pool;
    tide_backend_host_ops(&impl->ops);
    be->i = &impl->ops;
    be->impl = impl;
    *out = be;
    return TIDE_OK;
}

/* backend_cpu.c: the cpu backend over the CPU kernels. "Device" memory is host memory, weights
 * are used in place (zero copy from the mapping), every op runs to completion on the thread pool
 * (be->pool) before it returns. The sim backend computes with these ops (tide_cpu_ops) over its
 * own memory. */
#include "backend/backend.h"
#include "backend/cpu/kernels.h"
#include "threadpool.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static tide_status be_fail(tide_backend *be, tide_status st, const char *what) {
    return tide_errf(be->err, sizeof be->err, st, "%s failed (status %d)", what, (int)st);
}

static void cpu_free(tide_backend *be) { free(be); }

static tide_status cpu_alloc(tide_backend *be, size_t n, void **ptr) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? n : 64) != 0) {
        return tide_errf(be->err, sizeof be->err, TIDE_ERR_NOMEM,
                         "out of host memory allocating %zu bytes", n);
    }
    *ptr = p;
    return TIDE_OK;
}

static void cpu_dealloc(tide_backend *be, void *ptr) { free(ptr); }

tide_status tide_host_copy(tide_backend *be, void *dst, const void *src, size_t n) {
    if (n) memcpy(dst, src, n);
    return TIDE_OK;
}

static tide_status cpu_upload_weight(tide_backend *be, const void *src, size_t n, void **dst,
                                     int *copied) {
    *dst = (void *)src;
    *copied = 0;
    return TIDE_OK;
}

tide_status tide_host_fence(tide_backend *be, int32_t *fence) {
    *fence = 0;
    return TIDE_OK;
}
tide_status tide_host_wait_fence(tide_backend *be, int32_t fence) { return TIDE_OK; }
tide_status tide_host_nop(tide_backend *be) { return TIDE_OK; }
tide_status tide_host_pin(tide_backend *be, void *ptr, size_t n) { return TIDE_OK; }

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
    tide_status st = cpu_matmul(be->pool, w, x, n, y);
    return st == TIDE_OK ? st : be_fail(be, st, "matmul");
}
static tide_status op_rmsnorm(tide_backend *be, const float *x, const float *weight, int32_t n_rows,
                              int32_t dim, float eps, float *y) {
    tide_status st = cpu_rmsnorm(be->pool, x, weight, n_rows, dim, eps, y);
    return st == TIDE_OK ? st : be_fail(be, st, "rmsnorm");
}
static tide_status op_rope(tide_backend *be, float *x, int32_t n_tok, int64_t stride, int32_t n_head,
                           int32_t head_dim, int32_t rope_dim, int32_t pos0, float theta) {
    tide_status st = cpu_rope(be->pool, x, n_tok, stride, n_head, head_dim, rope_dim, pos0, theta);
    return st == TIDE_OK ? st : be_fail(be, st, "rope");
}
static tide_status op_attention(tide_backend *be, const tide_attn_shape *s, const float *q,
                                const void *k, const void *v, float *out) {
    tide_status st = cpu_attention(be->pool, s, q, k, v, out);
    return st == TIDE_OK ? st : be_fail(be, st, "attention");
}
static tide_status op_convert(tide_backend *be, const float *x, int64_t n, int32_t type, void *y) {
    tide_cpu_features f = tide_pool_features(be->pool);
    switch (type) {
    case TIDE_TYPE_F32: memmove(y, x, (size_t)n * sizeof(float)); return TIDE_OK;
    case TIDE_TYPE_F16: cpu_f32_to_f16_row(&f, x, y, n); return TIDE_OK;
    case TIDE_TYPE_BF16: cpu_f32_to_bf16_row(&f, x, y, n); return TIDE_OK;
    }
    return tide_errf(be->err, sizeof be->err, TIDE_ERR_ARG,
                     "convert: type %d is not f32, f16 or bf16", (int)type);
}
static tide_status op_add(tide_backend *be, float *y, const float *x, int64_t n) {
    cpu_add(be->pool, y, x, n);
    return TIDE_OK;
}
static tide_status op_silu_mul(tide_backend *be, float *g, const float *u, int64_t n) {
    cpu_silu_mul(be->pool, g, u, n);
    return TIDE_OK;
}
static tide_status op_gather_rows(tide_backend *be, float *dst, const float *src,
                                  const int32_t *rows, int32_t n_rows, int32_t dim) {
    cpu_gather_rows(be->pool, dst, src, rows, n_rows, dim);
    return TIDE_OK;
}
static tide_status op_experts(tide_backend *be, const tide_expert_batch *b, const float *x,
                              int32_t dim, float *out) {
    tide_status st = cpu_experts(be->pool, b, x, dim, out);
    return st == TIDE_OK ? st : be_fail(be, st, "experts");
}
static tide_status op_moe_combine(tide_backend *be, const float *pairs, const float *w,
                                  int32_t n_tok, int32_t n_used, int32_t dim, float *out) {
    cpu_moe_combine(be->pool, pairs, w, n_tok, n_used, dim, out);
    return TIDE_OK;
}
static tide_status op_argmax_prob(tide_backend *be, const float *logits, int32_t n, int32_t n_vocab,
                                  int32_t *out_token, float *out_prob) {
    cpu_argmax_prob(be->pool, logits, n, n_vocab, out_token, out_prob);
    return TIDE_OK;
}

static const tide_backend_device_i CPU_DEVICE = {
    .name = "cpu", .caps = TIDE_BACKEND_HOST_MEMORY, .free = cpu_free, .mem_free = cpu_mem_free};

static const tide_backend_buffer_i CPU_BUFFER = {
    .alloc = cpu_alloc,
    .dealloc = cpu_dealloc,
    .upload = tide_host_copy,
    .download = tide_host_copy,
    .upload_weight = cpu_upload_weight,
    .upload_async = tide_host_copy,
    .transfer_fence = tide_host_fence,
    .compute_wait_fence = tide_host_wait_fence,
    .transfer_sync = tide_host_nop,
    .pin_host = tide_host_pin,
};

const tide_backend_ops_i tide_cpu_ops = {
    .synchronize = tide_host_nop,
    .matmul = op_matmul,
    .rmsnorm = op_rmsnorm,
    .rope = op_rope,
    .attention = op_attention,
    .convert = op_convert,
    .add = op_add,
    .silu_mul = op_silu_mul,
    .gather_rows = op_gather_rows,
    .experts = op_experts,
    .moe_combine = op_moe_combine,
    .argmax_prob = op_argmax_prob,
};

tide_status tide_backend_cpu_new(struct tide_pool *pool, tide_backend **out) {
    *out = NULL;
    tide_backend *be = calloc(1, sizeof *be);
    if (!be) return TIDE_ERR_NOMEM;
    be->dev = &CPU_DEVICE;
    be->buf = &CPU_BUFFER;
    be->ops = &tide_cpu_ops;
    be->pool = pool;
    *out = be;
    return TIDE_OK;
}

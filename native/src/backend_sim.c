/* backend_sim.c: a simulated device over host memory. The same kernels as the cpu backend, but
 * the device has its own allocations (weights and expert slots are real copies), a memory budget
 * that runs out with a clear error, and byte counters, so residency, policies and counters are
 * exercised for real on machines without a GPU. */
#include "backend.h"
#include "threadpool.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void tide_backend_host_ops(tide_backend_i *i);            /* backend_cpu.c */
tide_status tide_host_mem(uint64_t *free_bytes, uint64_t *total_bytes);

typedef struct {
    tide_pool *pool;      /* first member: the host ops find the pool here */
    tide_backend_i ops;
    uint64_t budget;      /* bytes the device has */
    uint64_t used;        /* bytes allocated now */
    uint64_t peak;
    uint64_t h2d_bytes, d2h_bytes; /* every byte that crossed the simulated bus */
} tide_sim;

#define SIM(be) ((tide_sim *)(be)->impl)
#define HDR 64 /* each allocation carries its size in front, 64-byte aligned */

static tide_status sim_alloc(tide_backend *be, size_t n, void **ptr) {
    tide_sim *s = SIM(be);
    if (n > s->budget - s->used) {
        snprintf(be->err, sizeof be->err,
                 "simulated device out of memory: %zu bytes asked, %llu of %llu free", n,
                 (unsigned long long)(s->budget - s->used), (unsigned long long)s->budget);
        return TIDE_ERR_DEVICE;
    }
    void *p = NULL;
    if (posix_memalign(&p, 64, n + HDR) != 0) {
        snprintf(be->err, sizeof be->err, "out of host memory allocating %zu bytes", n);
        return TIDE_ERR_NOMEM;
    }
    *(size_t *)p = n;
    s->used += n;
    if (s->used > s->peak) s->peak = s->used;
    *ptr = (char *)p + HDR;
    return TIDE_OK;
}

static void sim_dealloc(tide_backend *be, void *ptr) {
    if (!ptr) return;
    char *p = (char *)ptr - HDR;
    SIM(be)->used -= *(size_t *)p;
    free(p);
}

static tide_status sim_upload(tide_backend *be, void *dst, const void *src, size_t n) {
    if (n) memcpy(dst, src, n);
    SIM(be)->h2d_bytes += n;
    return TIDE_OK;
}

static tide_status sim_download(tide_backend *be, void *dst, const void *src, size_t n) {
    if (n) memcpy(dst, src, n);
    SIM(be)->d2h_bytes += n;
    return TIDE_OK;
}

static tide_status sim_upload_weight(tide_backend *be, const void *src, size_t n, void **dst,
                                     int *copied) {
    tide_status st = sim_alloc(be, n, dst);
    if (st != TIDE_OK) return st;
    sim_upload(be, *dst, src, n);
    *copied = 1;
    return TIDE_OK;
}

static tide_status sim_mem_free(tide_backend *be, uint64_t *free_bytes, uint64_t *total_bytes) {
    *free_bytes = SIM(be)->budget - SIM(be)->used;
    *total_bytes = SIM(be)->budget;
    return TIDE_OK;
}

static void sim_free(tide_backend *be) {
    if (!be) return;
    free(be->impl);
    free(be);
}

tide_status tide_backend_sim_new(int32_t n_threads, struct tide_pool *pool, uint64_t memory,
                                 tide_backend **out) {
    *out = NULL;
    tide_backend *be = calloc(1, sizeof *be);
    tide_sim *s = calloc(1, sizeof *s);
    if (!be || !s) {
        free(be);
        free(s);
        return TIDE_ERR_NOMEM;
    }
    s->pool = pool;
    tide_backend_host_ops(&s->ops);
    s->ops.name = "sim";
    s->ops.free = sim_free;
    s->ops.alloc = sim_alloc;
    s->ops.dealloc = sim_dealloc;
    s->ops.upload = sim_upload;
    s->ops.download = sim_download;
    s->ops.upload_weight = sim_upload_weight;
    s->ops.upload_async = sim_upload;
    s->ops.mem_free = sim_mem_free;
    if (memory == 0) {
        /* no budget given: the host's available memory, as a real device's free memory */
        uint64_t avail = 0, total = 0;
        tide_host_mem(&avail, &total);
        memory = avail ? avail : ((uint64_t)1 << 34);
    }
    s->budget = memory;
    be->i = &s->ops;
    be->impl = s;
    *out = be;
    return TIDE_OK;
}

/* backend_sim.c: a simulated device over host memory. The same kernels as the cpu backend, but
 * the device has its own allocations (weights and expert slots are real copies), a memory budget
 * that runs out with a clear error, so residency, policies and counters are
 * exercised for real on machines without a GPU. */
#include "backend/backend.h"

#include <stdlib.h>

typedef struct {
    uint64_t budget;      /* bytes the device has */
    uint64_t used;        /* bytes allocated now */
} tide_sim;

#define SIM(be) ((tide_sim *)(be)->impl)
#define HDR 64 /* each allocation carries its size in front, 64-byte aligned */

static tide_status sim_alloc(tide_backend *be, size_t n, void **ptr) {
    tide_sim *s = SIM(be);
    if (n > s->budget - s->used) {
        return tide_errf(be->err, sizeof be->err, TIDE_ERR_DEVICE,
                         "simulated device out of memory: %zu bytes asked, %llu of %llu free", n,
                         (unsigned long long)(s->budget - s->used),
                         (unsigned long long)s->budget);
    }
    void *p = NULL;
    if (posix_memalign(&p, 64, n + HDR) != 0) {
        return tide_errf(be->err, sizeof be->err, TIDE_ERR_NOMEM,
                         "out of host memory allocating %zu bytes", n);
    }
    *(size_t *)p = n;
    s->used += n;
    *ptr = (char *)p + HDR;
    return TIDE_OK;
}

static void sim_dealloc(tide_backend *be, void *ptr) {
    if (!ptr) return;
    char *p = (char *)ptr - HDR;
    SIM(be)->used -= *(size_t *)p;
    free(p);
}


static tide_status sim_upload_weight(tide_backend *be, const void *src, size_t n, void **dst,
                                     int *copied) {
    tide_status st = sim_alloc(be, n, dst);
    if (st != TIDE_OK) return st;
    tide_host_copy(be, *dst, src, n);
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

/* Copies complete before they return, like the ops: no capability flag. */
static const tide_backend_device_i SIM_DEVICE = {
    .name = "sim", .caps = 0, .free = sim_free, .mem_free = sim_mem_free};

static const tide_backend_buffer_i SIM_BUFFER = {
    .alloc = sim_alloc,
    .dealloc = sim_dealloc,
    /* the simulated bus: host copies that complete before they return, as the cpu's */
    .upload = tide_host_copy,
    .download = tide_host_copy,
    .upload_weight = sim_upload_weight,
    .upload_async = tide_host_copy,
    .transfer_fence = tide_host_fence,
    .compute_wait_fence = tide_host_wait_fence,
    .transfer_sync = tide_host_nop,
    .pin_host = tide_host_pin,
};

tide_status tide_backend_sim_new(struct tide_pool *pool, uint64_t memory, tide_backend **out) {
    *out = NULL;
    tide_backend *be = calloc(1, sizeof *be);
    tide_sim *s = calloc(1, sizeof *s);
    if (!be || !s) {
        free(be);
        free(s);
        return TIDE_ERR_NOMEM;
    }
    if (memory == 0) {
        /* no budget given: the host's available memory, as a real device's free memory */
        uint64_t avail = 0, total = 0;
        tide_host_mem(&avail, &total);
        memory = avail ? avail : ((uint64_t)1 << 34);
    }
    s->budget = memory;
    be->dev = &SIM_DEVICE;
    be->buf = &SIM_BUFFER;
    be->ops = &tide_cpu_ops; /* the cpu kernels over this backend's memory, on `pool` */
    be->pool = pool;
    be->impl = s;
    *out = be;
    return TIDE_OK;
}

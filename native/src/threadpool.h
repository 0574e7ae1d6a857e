/* threadpool.h: a persistent pool of worker threads for the CPU kernels, and the CPU feature
 * choice that goes with it.
 *
 * A pool of n threads runs a function on every thread, the caller included (ith = 0; workers are
 * 1..n-1), and returns when all have finished. Workers spin briefly after each job (a kernel call
 * usually follows another within microseconds) and then sleep on a condition variable, so an idle
 * pool costs no CPU.
 *
 * Threading rule: one caller thread at a time per pool. tide_pool_run / tide_pool_for are not
 * reentrant (fn must not call them on the same pool) and two threads must not call them on the
 * same pool concurrently; give each concurrent caller its own pool.
 *
 * The pool also carries the SIMD level the kernels use (tide_cpu_features), detected once when
 * the pool is made, so one pool always computes with one code path: results are reproducible for
 * the lifetime of the pool and identical for every pool on the same machine.
 *
 * No global state: everything lives in the tide_pool object (except the memo of cpuid's answer).
 */
#ifndef TIDE_THREADPOOL_H
#define TIDE_THREADPOOL_H

#include "tide.h"
#include <stdint.h>

typedef struct tide_pool tide_pool;

/* The SIMD level a kernel may use. Filled by tide_cpu_detect; a copy lives in every pool. */
typedef struct {
    int avx2;   /* AVX2 + FMA + F16C usable: the vector code paths */
    int avx512; /* AVX-512 F + BW + VL usable (implies avx2): the 16-lane matmul tiles */
    int amx;    /* AMX tiles with bf16 + AVX-512 BF16 usable, the OS granting this process the tile
                 * state (implies avx512): the dense matmul on tiles (matmul_amx.c) */
} tide_cpu_features;

/* What this CPU supports (cpuid + xgetbv), memoized in a function-static (a pure function of
 * the machine; cpuid is slow under a hypervisor). No environment variable is consulted; tests
 * force a narrower path with tide_pool_set_features. */
void tide_cpu_detect(tide_cpu_features *f);

/* n_threads <= 0: the number of online CPUs. Spawns n_threads - 1 workers. */
tide_status tide_pool_new(int n_threads, tide_pool **out);
void tide_pool_free(tide_pool *pool); /* NULL is fine; joins the workers */
int tide_pool_size(const tide_pool *pool); /* 1 for NULL */

/* The features the kernels use with this pool (detected at tide_pool_new). A NULL pool gives
 * the detected features of this CPU. */
tide_cpu_features tide_pool_features(const tide_pool *pool);
/* Restrict the kernels of this pool to f (e.g. scalar for tests). Features the CPU lacks are
 * ignored. Not to be called while the pool runs a job. */
void tide_pool_set_features(tide_pool *pool, const tide_cpu_features *f);

/* Run fn(arg, ith, nth) on every thread of the pool (ith = 0 is the calling thread) and return
 * when all have returned. A NULL pool runs fn(arg, 0, 1) inline. */
void tide_pool_run(tide_pool *pool, void (*fn)(void *arg, int ith, int nth), void *arg);

/* Static chunking of [0, n): thread ith calls fn(arg, begin, end) on its chunk (skipped when
 * empty). Chunk ith is [n*ith/nth, n*(ith+1)/nth). */
void tide_pool_for(tide_pool *pool, int64_t n, void (*fn)(void *arg, int64_t begin, int64_t end),
                   void *arg);

/* The chunk of [0, n) that thread ith of nth gets (the rule tide_pool_for uses). */
static inline void tide_chunk(int64_t n, int ith, int nth, int64_t *begin, int64_t *end) {
    *begin = n * ith / nth;
    *end = n * (ith + 1) / nth;
}

#endif /* TIDE_THREADPOOL_H */

/* threadpool.c: persistent workers; spin briefly, then sleep on a condition variable. */
#include "threadpool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/syscall.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define TIDE_CPU_RELAX() _mm_pause()
#else
#define TIDE_CPU_RELAX() ((void)0)
#endif

/* Spin iterations before sleeping: a few tens of microseconds, long enough to catch the next
 * kernel of a forward pass, short enough not to steal a shared core for long. */
#define TIDE_SPIN 2000

struct tide_pool {
    int n;                       /* threads including the caller */
    pthread_t *threads;          /* n - 1 workers */
    tide_cpu_features features;

    void (*fn)(void *, int, int);
    void *arg;

    atomic_uint gen;             /* bumped once per job; workers wait for a change */
    atomic_int remaining;        /* workers still running the current job */
    atomic_int stop;
    atomic_int sleepers;         /* workers blocked (or about to block) on wake */
    atomic_int caller_sleeping;

    pthread_mutex_t mu;
    pthread_cond_t wake;         /* job posted */
    pthread_cond_t done;         /* last worker finished */
};

typedef struct {
    tide_pool *pool;
    int ith;
} worker_arg;

/* cpuid directly (not __builtin_cpu_supports, which some clang versions lack "f16c" for):
 * AVX2 (leaf 7 EBX bit 5), FMA (leaf 1 ECX bit 12), F16C (bit 29), AVX (bit 28), and the OS
 * saving YMM state (OSXSAVE bit 27, XCR0 bits 1-2). */
static void cpu_detect_uncached(tide_cpu_features *f) {
    f->avx2 = 0;
    f->avx512 = 0;
    f->amx = 0;
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return;
    int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1;
    if (!(fma && osxsave && avx && f16c))
        return;
    unsigned xlo, xhi;
    __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
    if ((xlo & 6) != 6)
        return;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return;
    f->avx2 = (b >> 5) & 1;
    /* AVX-512 F (EBX bit 16), BW (30), VL (31), and the OS saving opmask + ZMM state (XCR0 5-7) */
    f->avx512 = f->avx2 && ((b >> 16) & 1) && ((b >> 30) & 1) && ((b >> 31) & 1) &&
                (xlo & 0xe0) == 0xe0;
    /* AMX-BF16 (EDX bit 22), AMX-TILE (24), AVX512-BF16 (leaf 7.1 EAX bit 5), the tile state in
     * XCR0 (bits 17-18), and Linux's per-process permission for it, asked once here */
    int amx = f->avx512 && ((d >> 22) & 1) && ((d >> 24) & 1) && (xlo & 0x60000) == 0x60000;
    if (amx && __get_cpuid_count(7, 1, &a, &b, &c, &d))
        amx = (a >> 5) & 1;
#ifdef __linux__
    f->amx = amx && syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                            18 /* XFEATURE_XTILEDATA */) == 0;
#else
    (void)amx; /* elsewhere the tile state's permission is not asked for: no AMX */
#endif
#endif
}

/* cpuid traps to the hypervisor in a VM (microseconds), so the answer is memoized in a
 * function-static: a pure function of the machine, written once, identical for every caller. */
void tide_cpu_detect(tide_cpu_features *f) {
    static atomic_int memo; /* 0: not yet; else 1 | avx2 << 1 | avx512 << 2 | amx << 3 */
    int m = atomic_load_explicit(&memo, memory_order_relaxed);
    if (!m) {
        tide_cpu_features d;
        cpu_detect_uncached(&d);
        m = 1 | (d.avx2 ? 2 : 0) | (d.avx512 ? 4 : 0) | (d.amx ? 8 : 0);
        atomic_store_explicit(&memo, m, memory_order_relaxed);
    }
    f->avx2 = (m >> 1) & 1;
    f->avx512 = (m >> 2) & 1;
    f->amx = (m >> 3) & 1;
}

static void *worker_main(void *p) {
    worker_arg *wa = p;
    tide_pool *pool = wa->pool;
    int ith = wa->ith;
    free(wa);
    /* gen is 0 until the first job, which cannot be posted before tide_pool_new returns; reading
     * gen here instead could see that first job's bump and then wait for the next one forever. */
    unsigned seen = 0;
    for (;;) {
        unsigned g;
        int spins = 0;
        while ((g = atomic_load(&pool->gen)) == seen && spins < TIDE_SPIN) {
            TIDE_CPU_RELAX();
            spins++;
        }
        if (g == seen) {
            /* sleepers++ before re-checking gen under the mutex: the poster bumps gen, then
             * reads sleepers (both seq_cst), so one of the two sees the other (no lost wake). */
            pthread_mutex_lock(&pool->mu);
            atomic_fetch_add(&pool->sleepers, 1);
            while ((g = atomic_load(&pool->gen)) == seen)
                pthread_cond_wait(&pool->wake, &pool->mu);
            atomic_fetch_sub(&pool->sleepers, 1);
            pthread_mutex_unlock(&pool->mu);
        }
        seen = g;
        if (atomic_load(&pool->stop))
            return NULL;
        pool->fn(pool->arg, ith, pool->n);
        if (atomic_fetch_sub(&pool->remaining, 1) == 1 && atomic_load(&pool->caller_sleeping)) {
            pthread_mutex_lock(&pool->mu);
            pthread_cond_signal(&pool->done);
            pthread_mutex_unlock(&pool->mu);
        }
    }
}

static int online_cpus(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n >= 1 ? (int)n : 1;
}

tide_status tide_pool_new(int n_threads, tide_pool **out) {
    if (!out)
        return TIDE_ERR_ARG;
    *out = NULL;
    if (n_threads <= 0)
        n_threads = online_cpus();
    if (n_threads > 1024)
        return TIDE_ERR_ARG;
    tide_pool *pool = calloc(1, sizeof *pool);
    if (!pool)
        return TIDE_ERR_NOMEM;
    pool->n = n_threads;
    tide_cpu_detect(&pool->features);
    atomic_init(&pool->gen, 0);
    atomic_init(&pool->remaining, 0);
    atomic_init(&pool->stop, 0);
    atomic_init(&pool->sleepers, 0);
    atomic_init(&pool->caller_sleeping, 0);
    if (pthread_mutex_init(&pool->mu, NULL) != 0) {
        free(pool);
        return TIDE_ERR_NOMEM;
    }
    pthread_cond_init(&pool->wake, NULL);
    pthread_cond_init(&pool->done, NULL);
    if (n_threads > 1) {
        pool->threads = calloc((size_t)(n_threads - 1), sizeof(pthread_t));
        if (!pool->threads) {
            pool->n = 1;
            tide_pool_free(pool);
            return TIDE_ERR_NOMEM;
        }
    }
    for (int i = 1; i < n_threads; i++) {
        worker_arg *wa = malloc(sizeof *wa);
        if (wa) {
            wa->pool = pool;
            wa->ith = i;
        }
        if (!wa || pthread_create(&pool->threads[i - 1], NULL, worker_main, wa) != 0) {
            free(wa);
            pool->n = i; /* workers 1..i-1 exist: free joins exactly those */
            tide_pool_free(pool);
            return TIDE_ERR_NOMEM;
        }
    }
    *out = pool;
    return TIDE_OK;
}

void tide_pool_free(tide_pool *pool) {
    if (!pool)
        return;
    if (pool->n > 1) {
        atomic_store(&pool->stop, 1);
        pthread_mutex_lock(&pool->mu);
        atomic_fetch_add(&pool->gen, 1);
        pthread_cond_broadcast(&pool->wake);
        pthread_mutex_unlock(&pool->mu);
        for (int i = 1; i < pool->n; i++)
            pthread_join(pool->threads[i - 1], NULL);
    }
    pthread_cond_destroy(&pool->wake);
    pthread_cond_destroy(&pool->done);
    pthread_mutex_destroy(&pool->mu);
    free(pool->threads);
    free(pool);
}

int tide_pool_size(const tide_pool *pool) { return pool ? pool->n : 1; }

tide_cpu_features tide_pool_features(const tide_pool *pool) {
    tide_cpu_features f;
    if (pool)
        return pool->features;
    tide_cpu_detect(&f);
    return f;
}

void tide_pool_set_features(tide_pool *pool, const tide_cpu_features *f) {
    if (!pool || !f)
        return;
    tide_cpu_features have;
    tide_cpu_detect(&have);
    pool->features.avx2 = f->avx2 && have.avx2;
    pool->features.avx512 = f->avx512 && have.avx512 && pool->features.avx2;
    pool->features.amx = f->amx && have.amx && pool->features.avx512;
}

void tide_pool_run(tide_pool *pool, void (*fn)(void *arg, int ith, int nth), void *arg) {
    if (!pool || pool->n == 1) {
        fn(arg, 0, 1);
        return;
    }
    pool->fn = fn;
    pool->arg = arg;
    atomic_store(&pool->remaining, pool->n - 1);
    atomic_fetch_add(&pool->gen, 1); /* publishes fn/arg (seq_cst) */
    if (atomic_load(&pool->sleepers) > 0) {
        pthread_mutex_lock(&pool->mu);
        pthread_cond_broadcast(&pool->wake);
        pthread_mutex_unlock(&pool->mu);
    }
    fn(arg, 0, pool->n);
    int spins = 0;
    while (atomic_load(&pool->remaining) > 0 && spins < TIDE_SPIN) {
        TIDE_CPU_RELAX();
        spins++;
    }
    if (atomic_load(&pool->remaining) > 0) {
        /* Same handshake as the workers': flag first, then re-check under the mutex. */
        pthread_mutex_lock(&pool->mu);
        atomic_store(&pool->caller_sleeping, 1);
        while (atomic_load(&pool->remaining) > 0)
            pthread_cond_wait(&pool->done, &pool->mu);
        atomic_store(&pool->caller_sleeping, 0);
        pthread_mutex_unlock(&pool->mu);
    }
}

typedef struct {
    int64_t n;
    void (*fn)(void *, int64_t, int64_t);
    void *arg;
} for_job;

static void for_thunk(void *p, int ith, int nth) {
    for_job *j = p;
    int64_t b, e;
    tide_chunk(j->n, ith, nth, &b, &e);
    if (b < e)
        j->fn(j->arg, b, e);
}

void tide_pool_for(tide_pool *pool, int64_t n, void (*fn)(void *arg, int64_t begin, int64_t end),
                   void *arg) {
    if (n <= 0)
        return;
    if (!pool || pool->n == 1 || n == 1) {
        fn(arg, 0, n);
        return;
    }
    for_job j = {n, fn, arg};
    tide_pool_run(pool, for_thunk, &j);
}

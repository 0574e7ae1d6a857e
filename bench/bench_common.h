/* bench_common.h: what the CPU benchmarks (bench_kernels.c, bench_quant.c) share: the clocks,
 * and this machine's read bandwidth, the figure their matmul GB/s are held against (a matmul
 * bound by memory reads at best as fast as summing a buffer of the same size).
 *
 * Static functions in a header: each benchmark is one standalone program built by the command
 * at the top of its file, so there is no object file to share.
 */
#ifndef TIDE_BENCH_COMMON_H
#define TIDE_BENCH_COMMON_H

#include "threadpool.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}
/* CPU seconds of the whole process: on a shared machine, wall time includes time when our
 * threads were not running; CPU time / threads is what the kernel would take on idle cores. */
static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---- read bandwidth: sum a buffer ----------------------------------------------------------- */
typedef struct {
    const float *buf;
    int64_t n;
    double sums[64]; /* one a thread, kept so the compiler cannot drop the reads */
} sum_job;

#if defined(__x86_64__)
/* Four independent accumulators, so the loop is bound by the loads and not by add latency. */
__attribute__((target("avx2"))) static double sum_avx2(const float *p, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_add_ps(a0, _mm256_load_ps(p + i));
        a1 = _mm256_add_ps(a1, _mm256_load_ps(p + i + 8));
        a2 = _mm256_add_ps(a2, _mm256_load_ps(p + i + 16));
        a3 = _mm256_add_ps(a3, _mm256_load_ps(p + i + 24));
    }
    float t[8];
    _mm256_storeu_ps(t, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    double s = 0;
    for (int k = 0; k < 8; k++)
        s += t[k];
    for (; i < n; i++)
        s += p[i];
    return s;
}
#endif

/* Threads take whole 32-float (128-byte) pieces, so every thread's start stays 64-byte aligned
 * for the aligned loads. */
static void sum_thread(void *p, int ith, int nth) {
    sum_job *j = p;
    int64_t b, e;
    tide_chunk(j->n / 32, ith, nth, &b, &e);
#if defined(__x86_64__)
    j->sums[ith] = sum_avx2(j->buf + b * 32, (e - b) * 32);
#else
    double s = 0;
    for (int64_t i = b * 32; i < e * 32; i++)
        s += j->buf[i];
    j->sums[ith] = s;
#endif
}

/* Benchmark memory for weights and for the read bandwidth, alike: 2 MiB aligned and asking the
 * kernel for transparent huge pages. The engine maps its GGUF; on this project's machine (Linux
 * 6.18, ext4) that mapping is on 2 MiB pages without asking (/proc/PID/smaps: FilePmdMapped), and
 * 4 KiB pages cost a memory-bound read 10-20% there (the read bandwidth 25-29 -> 31-32 GB/s). Where
 * the kernel declines, both stay on 4 KiB pages, so matmul and bandwidth are still held alike.
 * Free with free(). NULL when there is no memory. */
static void *bench_alloc(size_t bytes) {
    const size_t huge = (size_t)2 << 20;
    size_t n = (bytes + huge - 1) / huge * huge;
    void *p = aligned_alloc(huge, n ? n : huge);
#ifdef MADV_HUGEPAGE
    if (p)
        madvise(p, n, MADV_HUGEPAGE);
#endif
    return p;
}

/* The share of this process's anonymous memory on huge pages, in MiB (-1 where unknown): printed
 * beside the bandwidth so a figure says which page size it had. */
static long bench_huge_mib(void) {
    FILE *f = fopen("/proc/self/smaps_rollup", "r");
    char line[256];
    long kb = -1;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "AnonHugePages: %ld kB", &kb) == 1)
            break;
    if (f)
        fclose(f);
    return kb < 0 ? -1 : kb / 1024;
}

/* A buffer of `bytes` to read (a multiple of 64), bench_alloc's; NULL when there is no memory. */
static float *membw_buffer(size_t bytes) {
    float *buf = bench_alloc(bytes);
    if (buf)
        for (size_t i = 0; i < bytes / 4; i++)
            buf[i] = (float)(i & 1023);
    return buf;
}

/* The best of `reps` passes of all the pool's threads over buf (the pass least disturbed on a
 * shared machine): wall seconds in *wall, CPU seconds per thread in *cpu. */
static void membw_time(tide_pool *pool, const float *buf, size_t bytes, int reps, double *wall,
                       double *cpu) {
    sum_job j = {buf, (int64_t)(bytes / 4), {0}};
    int nth = tide_pool_size(pool);
    double best = 1e30, cbest = 1e30;
    for (int rep = 0; rep < reps; rep++) {
        double t0 = now(), c0 = cpu_now();
        tide_pool_run(pool, sum_thread, &j);
        double dt = now() - t0, dc = (cpu_now() - c0) / nth;
        if (dt < best)
            best = dt;
        if (dc < cbest)
            cbest = dc;
    }
    *wall = best;
    *cpu = cbest;
}

#endif

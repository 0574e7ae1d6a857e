/* bench_quant.c: GB/s of cpu_matmul per weight type on LLaDA2.0 expert shapes, beside this
 * machine's read bandwidth. Weight bytes read / time; many matrices cycled so weights come
 * from DRAM as in a forward pass (each weight read once per forward).
 *
 * Build and run (from the repository root):
 *   cc -O3 -std=c11 -D_GNU_SOURCE -pthread -Inative/include -Inative/src bench/bench_quant.c \
 *      native/src/threadpool.c native/src/common.c native/src/backend/cpu/[a-z]*.c -lm \
 *      -o /tmp/bench_quant
 *   /tmp/bench_quant [threads (default: all)] [working set MiB (default 768)] [rows n (default 1,32)]
 *                    [type name or all (default)] [avx2: the expert shapes with AVX-512 off]
 * With more than one row, the output projection's shape is timed too (GFLOP/s is its figure); with
 * one, a layer's experts for one token through the experts op (the one-row step's expert reads).
 */
#include "backend/cpu/kernels.h"
#include "bench_common.h"
#include "threadpool.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Best of 7 passes over a buffer of `bytes`: the read bandwidth the matmuls are held against. */
static double membw(tide_pool *pool, size_t bytes) {
    float *buf = membw_buffer(bytes);
    if (!buf) return 0;
    double best, cbest;
    membw_time(pool, buf, bytes, 7, &best, &cbest);
    free(buf);
    printf("read bandwidth: %.1f GB/s wall, %.1f GB/s cpu-time\n", bytes / best / 1e9, bytes / cbest / 1e9);
    return bytes / best / 1e9;
}

static const char *tname(int32_t t) {
    switch (t) {
    case TIDE_TYPE_F32: return "f32";
    case TIDE_TYPE_F16: return "f16";
    case TIDE_TYPE_BF16: return "bf16";
    case TIDE_TYPE_Q8_0: return "q8_0";
    case TIDE_TYPE_Q4_0: return "q4_0";
    case TIDE_TYPE_Q4_K: return "q4_k";
    case TIDE_TYPE_Q5_K: return "q5_k";
    case TIDE_TYPE_Q6_K: return "q6_k";
    default: return "?";
    }
}

/* Matrices of rows x cols filling about `set` bytes, cycled; prints the best pass's GB/s. */
static void bench(tide_pool *pool, const char *label, int32_t type, int64_t rows, int64_t cols,
                  size_t set, int n, double bw) {
    size_t rb = tide_row_bytes(type, cols), mb = rb * (size_t)rows;
    int count = (int)(set / mb) + 1;
    char *data = malloc(mb * (size_t)count);
    float *src = malloc(sizeof(float) * (size_t)cols);
    if (!data || !src) { printf("no memory\n"); exit(1); }
    uint64_t s = 88172645463325252ull;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = 0; i < cols; i++) {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            src[i] = (float)((int64_t)(s % 2001) - 1000) * 1e-5f;
        }
        cpu_quantize_row(type, src, cols, data + (size_t)r * rb);
    }
    for (int i = 1; i < count; i++) memcpy(data + mb * (size_t)i, data, mb);
    /* x 64-byte aligned as the engine's activations (the CPU backend's buffers): malloc's 16-byte
     * offset splits every 16-lane load of x across two cache lines (lm_head n=32: 250 vs 193 ms) */
    float *x = NULL, *y = malloc(sizeof(float) * (size_t)(n * rows));
    if (posix_memalign((void **)&x, 64, sizeof(float) * (size_t)(n * cols)) != 0 || !y) { printf("no memory\n"); exit(1); }
    for (int64_t i = 0; i < n * cols; i++) x[i] = (float)((i * 37) % 101) * 0.01f - 0.5f;
    double per = 1e30, cper = 1e30, start = now();
    int i = 0, nth = tide_pool_size(pool);
    do {
        int calls = 0;
        double t0 = now(), c0 = cpu_now(), dt;
        do {
            tide_matrix m = {type, rows, cols, mb, data + mb * (size_t)i};
            cpu_matmul(pool, &m, x, n, y);
            i = (i + 1) % count;
            calls++;
            dt = now() - t0;
        } while (dt < 0.1 || calls < count);
        double dc = (cpu_now() - c0) / nth;
        if (dt / calls < per) per = dt / calls;
        if (dc / calls < cper) cper = dc / calls;
    } while (now() - start < 1.0);
    double gbs = mb / per / 1e9;
    printf("%-22s %-5s n=%-2d %8.3f ms  %6.1f GB/s  %5.1f%% of read bw  %7.1f GFLOP/s | cpu-time %6.1f GB/s\n",
           label, tname(type), n, per * 1e3, gbs, 100.0 * gbs / bw, 2.0 * rows * cols * n / per / 1e9,
           mb / cper / 1e9);
    fflush(stdout);
    free(data); free(src); free(x); free(y);
}

/* One token's routed experts of a LLaDA2.0-mini MoE layer through the experts op (the engine's
 * one-row step: 8 experts of gate/up [512 x 2048] and down [2048 x 512], two pool runs), sets of
 * 8 distinct experts cycled so the weights come from DRAM; GB/s of expert weights read. */
static void bench_layer(tide_pool *pool, int32_t type, size_t set, double bw) {
    enum { USED = 8, FF = 512, DIM = 2048 };
    size_t gb = tide_row_bytes(type, DIM) * FF, db = tide_row_bytes(type, FF) * DIM;
    size_t eb = 2 * gb + db, lb = USED * eb;   /* one expert, one layer's 8 */
    int count = (int)(set / lb) + 1;
    char *data = malloc(lb * (size_t)count);
    float *src = malloc(sizeof(float) * DIM);
    float *x = NULL, *out = malloc(sizeof(float) * USED * DIM);
    if (!data || !src || !out || posix_memalign((void **)&x, 64, sizeof(float) * DIM) != 0) {
        printf("no memory\n");
        exit(1);
    }
    uint64_t s = 88172645463325252ull;
    for (size_t off = 0; off < eb;) {   /* one expert's rows, then copies */
        int64_t cols = off < 2 * gb ? DIM : FF;
        for (int64_t i = 0; i < cols; i++) {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            src[i] = (float)((int64_t)(s % 2001) - 1000) * 1e-5f;
        }
        cpu_quantize_row(type, src, cols, data + off);
        off += tide_row_bytes(type, cols);
    }
    for (size_t e = 1; e < (size_t)USED * (size_t)count; e++) memcpy(data + eb * e, data, eb);
    for (int64_t i = 0; i < DIM; i++) x[i] = (float)((i * 37) % 101) * 0.01f - 0.5f;
    tide_matrix g[USED], u[USED], d[USED];
    int32_t start[USED + 1], tok[USED], dest[USED];
    for (int k = 0; k <= USED; k++) start[k] = k;
    for (int k = 0; k < USED; k++) tok[k] = 0, dest[k] = k;
    tide_expert_batch b = {USED, g, u, d, start, tok, dest};
    double per = 1e30, cper = 1e30, begin = now();
    int i = 0, nth = tide_pool_size(pool);
    do {
        int calls = 0;
        double t0 = now(), c0 = cpu_now(), dt;
        do {
            for (int k = 0; k < USED; k++) {
                char *e = data + lb * (size_t)i + eb * (size_t)k;
                g[k] = (tide_matrix){type, FF, DIM, gb, e};
                u[k] = (tide_matrix){type, FF, DIM, gb, e + gb};
                d[k] = (tide_matrix){type, DIM, FF, db, e + 2 * gb};
            }
            cpu_experts(pool, &b, x, DIM, out);
            i = (i + 1) % count;
            calls++;
            dt = now() - t0;
        } while (dt < 0.1 || calls < count);
        double dc = (cpu_now() - c0) / nth;
        if (dt / calls < per) per = dt / calls;
        if (dc / calls < cper) cper = dc / calls;
    } while (now() - begin < 1.0);
    double gbs = lb / per / 1e9;
    printf("experts layer 8 of 1 tok %-5s       %8.3f ms  %6.1f GB/s  %5.1f%% of read bw  %7.1f GFLOP/s | cpu-time %6.1f GB/s\n",
           tname(type), per * 1e3, gbs, 100.0 * gbs / bw, 2.0 * 3 * USED * FF * DIM / per / 1e9, lb / cper / 1e9);
    fflush(stdout);
    free(data); free(src); free(x); free(out);
}

int main(int argc, char **argv) {
    int nt = argc > 1 ? atoi(argv[1]) : 0;
    size_t set = (size_t)(argc > 2 ? atoi(argv[2]) : 768) << 20;
    int ns[2] = {1, 32}, n_ns = 2;
    if (argc > 3) { ns[0] = atoi(argv[3]); n_ns = 1; }
    tide_pool *pool = NULL, *epool = NULL;
    if (tide_pool_new(nt, &pool) != TIDE_OK || tide_pool_new(nt, &epool) != TIDE_OK) return 1;
    /* the expert shapes on the path the experts op takes: its tiles never go to AMX (only the
     * dense matmuls do, matmul_amx.c), so the expert pool has it off */
    tide_cpu_features f = tide_pool_features(pool), fe = f;
    fe.amx = 0;
    if (argc > 5 && strcmp(argv[5], "avx2") == 0) /* the expert shapes on an AVX2 machine's path */
        fe.avx512 = 0;
    tide_pool_set_features(epool, &fe);
    double bw = membw(pool, set);
    printf("threads %d, experts %s, lm_head %s, read bandwidth %.1f GB/s (best of 7 passes over %zu MiB)\n",
           tide_pool_size(pool), fe.avx512 ? "avx512" : fe.avx2 ? "avx2" : "scalar",
           f.amx ? "amx" : f.avx512 ? "avx512" : f.avx2 ? "avx2" : "scalar", bw, set >> 20);
    const int32_t types[] = {TIDE_TYPE_BF16, TIDE_TYPE_Q8_0, TIDE_TYPE_Q6_K, TIDE_TYPE_Q5_K,
                             TIDE_TYPE_Q4_K, TIDE_TYPE_Q4_0};
    const char *only = argc > 4 && strcmp(argv[4], "all") != 0 ? argv[4] : NULL; /* one type by name */
    for (int k = 0; k < n_ns; k++)
        for (size_t t = 0; t < sizeof types / sizeof types[0]; t++) {
            if (only && strcmp(only, tname(types[t])) != 0) continue;
            /* LLaDA2.0-mini routed expert: gate/up [512 x 2048], down [2048 x 512] */
            bench(epool, "expert gate 512x2048", types[t], 512, 2048, set, ns[k], bw);
            bench(epool, "expert down 2048x512", types[t], 2048, 512, set, ns[k], bw);
            if (ns[k] == 1)
                bench_layer(epool, types[t], set, bw);
            /* the output projection (157184 x 2048; q6_k in a q4_k_m file) on all the rows of
             * a step: the largest matmul of a many-token step, bound by its FMAs, not DRAM */
            if (ns[k] > 1)
                bench(pool, "lm_head 157184x2048", types[t], 157184, 2048, set, ns[k], bw);
        }
    tide_pool_free(pool);
    tide_pool_free(epool);
    return 0;
}

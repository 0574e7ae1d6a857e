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
    printf("read bandwidth: %.1f GB/s wall, %.1f GB/s cpu-time (%ld of %zu MiB on huge pages)\n",
           bytes / best / 1e9, bytes / cbest / 1e9, bench_huge_mib(), bytes >> 20);
    free(buf);
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

/* `rows` rows of `cols` random values in [-0.01, 0.01] quantized to `type` at dst (state s). */
static void random_rows(int32_t type, int64_t rows, int64_t cols, char *dst, uint64_t *s) {
    float *src = malloc(sizeof(float) * (size_t)cols);
    if (!src) { printf("no memory\n"); exit(1); }
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = 0; i < cols; i++) {
            *s ^= *s << 13; *s ^= *s >> 7; *s ^= *s << 17;
            src[i] = (float)((int64_t)(*s % 2001) - 1000) * 1e-5f;
        }
        cpu_quantize_row(type, src, cols, dst + (size_t)r * tide_row_bytes(type, cols));
    }
    free(src);
}

/* n values of x, 64-byte aligned as the engine's activations (the CPU backend's buffers): malloc's
 * 16-byte offset splits every 16-lane load of x across two cache lines (lm_head n=32: 250 vs 193 ms) */
static float *activations(int64_t n) {
    float *x = NULL;
    if (posix_memalign((void **)&x, 64, sizeof(float) * (size_t)n) != 0) { printf("no memory\n"); exit(1); }
    for (int64_t i = 0; i < n; i++) x[i] = (float)((i * 37) % 101) * 0.01f - 0.5f;
    return x;
}

/* call(ctx, i) on copies i = 0, 1, ..., count - 1, 0, ... for passes of at least 0.1 s and every
 * copy, for 1 s: the best pass's seconds per call, wall and CPU time per thread. */
static void time_calls(tide_pool *pool, int count, void (*call)(void *, int), void *ctx, double *per,
                       double *cper) {
    double start = now();
    int i = 0, nth = tide_pool_size(pool);
    *per = *cper = 1e30;
    do {
        int calls = 0;
        double t0 = now(), c0 = cpu_now(), dt;
        do {
            call(ctx, i);
            i = (i + 1) % count;
            calls++;
            dt = now() - t0;
        } while (dt < 0.1 || calls < count);
        double dc = (cpu_now() - c0) / nth;
        if (dt / calls < *per) *per = dt / calls;
        if (dc / calls < *cper) *cper = dc / calls;
    } while (now() - start < 1.0);
}

static void report(const char *label, int32_t type, int n, double per, double cper, size_t bytes,
                   double flops, double bw) {
    double gbs = bytes / per / 1e9;
    printf("%-22s %-5s n=%-2d %8.3f ms  %6.1f GB/s  %5.1f%% of read bw  %7.1f GFLOP/s | cpu-time %6.1f GB/s\n",
           label, tname(type), n, per * 1e3, gbs, 100.0 * gbs / bw, flops / per / 1e9, bytes / cper / 1e9);
    fflush(stdout);
}

typedef struct {
    tide_pool *pool;
    tide_matrix m;
    const char *data;
    const float *x;
    int n;
    float *y;
} matmul_ctx;

static void matmul_call(void *p, int i) {
    matmul_ctx *c = p;
    c->m.data = (char *)c->data + c->m.nbytes * (size_t)i;
    cpu_matmul(c->pool, &c->m, c->x, c->n, c->y);
}

/* Matrices of rows x cols filling about `set` bytes, cycled; prints the best pass's GB/s. */
static void bench(tide_pool *pool, const char *label, int32_t type, int64_t rows, int64_t cols,
                  size_t set, int n, double bw) {
    size_t mb = tide_row_bytes(type, cols) * (size_t)rows;
    int count = (int)(set / mb) + 1;
    char *data = bench_alloc(mb * (size_t)count);
    float *x = activations((int64_t)n * cols), *y = malloc(sizeof(float) * (size_t)(n * rows));
    if (!data || !y) { printf("no memory\n"); exit(1); }
    uint64_t s = 88172645463325252ull;
    random_rows(type, rows, cols, data, &s);
    for (int i = 1; i < count; i++) memcpy(data + mb * (size_t)i, data, mb);
    matmul_ctx c = {pool, {type, rows, cols, mb, NULL}, data, x, n, y};
    double per, cper;
    time_calls(pool, count, matmul_call, &c, &per, &cper);
    report(label, type, n, per, cper, mb, 2.0 * rows * cols * n, bw);
    free(data); free(x); free(y);
}

/* One token's routed experts of a LLaDA2.0-mini MoE layer through the experts op (the engine's
 * one-row step: 8 experts of gate/up [512 x 2048] and down [2048 x 512], two pool runs). The
 * weights lie as in a GGUF, one tensor per role holding every expert, and each call takes 8
 * experts scattered over them (a fixed shuffle; ascending, as the host plan lists them), so no
 * expert follows the one before it in memory and each comes from DRAM; GB/s of expert weights. */
enum { L_USED = 8, L_FF = 512, L_DIM = 2048 };
typedef struct {
    tide_pool *pool;
    int32_t type;
    const char *gate, *up, *down; /* [n_exp] matrices each */
    size_t gb, db;                /* bytes of a gate (= up) and a down matrix */
    const int32_t *pick;          /* [calls][L_USED] expert ids, ascending within a call */
    const float *x;
    float *out;
} layer_ctx;

static void layer_call(void *p, int i) {
    layer_ctx *c = p;
    tide_matrix g[L_USED], u[L_USED], d[L_USED];
    int32_t start[L_USED + 1], tok[L_USED], dest[L_USED];
    for (int k = 0; k < L_USED; k++) {
        size_t e = (size_t)c->pick[L_USED * i + k];
        g[k] = (tide_matrix){c->type, L_FF, L_DIM, c->gb, (char *)c->gate + c->gb * e};
        u[k] = (tide_matrix){c->type, L_FF, L_DIM, c->gb, (char *)c->up + c->gb * e};
        d[k] = (tide_matrix){c->type, L_DIM, L_FF, c->db, (char *)c->down + c->db * e};
        start[k] = k, tok[k] = 0, dest[k] = k;
    }
    start[L_USED] = L_USED;
    tide_expert_batch b = {L_USED, g, u, d, start, tok, dest};
    cpu_experts(c->pool, &b, c->x, L_DIM, c->out);
}

static int cmp_i32(const void *a, const void *b) {
    return (*(const int32_t *)a > *(const int32_t *)b) - (*(const int32_t *)a < *(const int32_t *)b);
}

static void bench_layer(tide_pool *pool, int32_t type, size_t set, double bw) {
    size_t gb = tide_row_bytes(type, L_DIM) * L_FF, db = tide_row_bytes(type, L_FF) * L_DIM;
    size_t lb = L_USED * (2 * gb + db); /* one call's weights */
    int count = (int)(set / lb) + 1;
    size_t n_exp = (size_t)L_USED * (size_t)count;
    char *data = bench_alloc((2 * gb + db) * n_exp);
    int32_t *pick = malloc(sizeof(int32_t) * n_exp);
    float *x = activations(L_DIM), *out = malloc(sizeof(float) * L_USED * L_DIM);
    if (!data || !pick || !out) { printf("no memory\n"); exit(1); }
    char *gate = data, *up = data + gb * n_exp, *down = data + 2 * gb * n_exp;
    uint64_t s = 88172645463325252ull;
    random_rows(type, L_FF, L_DIM, gate, &s);
    random_rows(type, L_FF, L_DIM, up, &s);
    random_rows(type, L_DIM, L_FF, down, &s);
    for (size_t e = 1; e < n_exp; e++) {
        memcpy(gate + gb * e, gate, gb);
        memcpy(up + gb * e, up, gb);
        memcpy(down + db * e, down, db);
    }
    for (size_t e = 0; e < n_exp; e++) pick[e] = (int32_t)e;
    for (size_t e = n_exp - 1; e > 0; e--) { /* Fisher-Yates with the same xorshift */
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        size_t k = (size_t)(s % (e + 1));
        int32_t t = pick[e]; pick[e] = pick[k]; pick[k] = t;
    }
    for (int i = 0; i < count; i++) qsort(pick + L_USED * i, L_USED, sizeof(int32_t), cmp_i32);
    layer_ctx c = {pool, type, gate, up, down, gb, db, pick, x, out};
    double per, cper;
    time_calls(pool, count, layer_call, &c, &per, &cper);
    report("experts layer, 1 tok", type, 1, per, cper, lb, 2.0 * 3 * L_USED * L_FF * L_DIM, bw);
    free(data); free(pick); free(x); free(out);
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

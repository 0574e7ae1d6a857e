/* test_kernels.c: the CPU kernels against naive double-precision references, row determinism
 * (a row alone vs in a batch, 1 vs 2 threads: bit-identical), both code paths (scalar and AVX2
 * where the CPU has it), the attention mask rule, sampling, conversions and the thread pool.
 *
 *   cc -O2 -std=c11 -D_GNU_SOURCE -pthread -Inative/include -Inative/src \
 *      native/tests/test_kernels.c native/src/threadpool.c native/src/common.c \
 *      native/src/backend/cpu/[a-z]*.c -lm -o /tmp/tk
 */
#include "backend/cpu/kernels.h"
#include "threadpool.h"

#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check.h"

static void check(int ok, const char *what) { CHECK(ok, "%s", what); }

/* ---- data ----------------------------------------------------------------------------------- */
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rnd64(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}
static float rndf(void) { return (float)((rnd64() >> 11) * 0x1.0p-53 * 2.0 - 1.0); } /* [-1, 1) */
static void fill(float *x, int64_t n, float scale) {
    for (int64_t i = 0; i < n; i++)
        x[i] = rndf() * scale;
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) {
        printf("out of memory\n");
        exit(2);
    }
    return p;
}

#define N_TYPES 8
static const int32_t TYPES[N_TYPES] = {TIDE_TYPE_F32, TIDE_TYPE_F16, TIDE_TYPE_BF16, TIDE_TYPE_Q8_0,
                                       TIDE_TYPE_Q4_0, TIDE_TYPE_Q4_K, TIDE_TYPE_Q5_K, TIDE_TYPE_Q6_K};

/* Independent reference conversions (not the library's). */
static double ref_f16(uint16_t h) {
    int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v = e == 0 ? ldexp(m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexp(1024 + m, e - 25);
    return s ? -v : v;
}
static double ref_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Independent decoders of ggml's block layouts (written from the layout, not from blocks.h):
 * value i of the row, in double. */
static double ref_h(const uint8_t *p) { return ref_f16((uint16_t)(p[0] | (p[1] << 8))); }
static double ref_block_value(int32_t type, const uint8_t *row, int64_t i) {
    if (type == TIDE_TYPE_Q4_0) {
        const uint8_t *b = row + (i / 32) * 18;
        int j = (int)(i % 32);
        int q = j < 16 ? b[2 + j] % 16 : b[2 + j - 16] / 16;
        return ref_h(b) * (q - 8);
    }
    int j = (int)(i % 256);
    if (type == TIDE_TYPE_Q6_K) {
        const uint8_t *b = row + (i / 256) * 210;
        int half = j / 128, l = j % 32, quarter = (j % 128) / 32;
        const uint8_t *ql = b + 64 * half, *qh = b + 128 + 32 * half;
        const int8_t *sc = (const int8_t *)(b + 192) + 8 * half;
        int lo = quarter == 0 ? ql[l] % 16 : quarter == 1 ? ql[l + 32] % 16 : quarter == 2 ? ql[l] / 16 : ql[l + 32] / 16;
        int hi = (qh[l] / (1 << (2 * quarter))) % 4;
        return ref_h(b + 208) * sc[l / 16 + 2 * quarter] * (lo + 16 * hi - 32);
    }
    int k5 = type == TIDE_TYPE_Q5_K;
    const uint8_t *b = row + (i / 256) * (k5 ? 176 : 144);
    const uint8_t *s = b + 4, *qs = b + (k5 ? 48 : 16);
    int sub = j / 32, g = j / 64, l = j % 32;
    int sc, m;
    if (sub < 4) {
        sc = s[sub] % 64;
        m = s[sub + 4] % 64;
    } else {
        sc = s[sub + 4] % 16 + 16 * (s[sub - 4] / 64);
        m = s[sub + 4] / 16 + 16 * (s[sub] / 64);
    }
    int q = sub % 2 == 0 ? qs[32 * g + l] % 16 : qs[32 * g + l] / 16;
    if (k5) q += 16 * ((b[16 + l] >> sub) & 1);
    return ref_h(b) * sc * q - ref_h(b + 2) * m;
}

/* A matrix of `type` made from random f32 values, plus its dequantized values in double. */
typedef struct {
    tide_matrix m;
    double *deq; /* rows * cols */
    float *deqf; /* the same in f32 (exact) */
} test_mat;

static void make_mat(test_mat *t, int32_t type, int64_t rows, int64_t cols, float scale) {
    size_t rb = tide_row_bytes(type, cols);
    t->m.type = type;
    t->m.rows = rows;
    t->m.cols = cols;
    t->m.nbytes = rb * (size_t)rows;
    t->m.data = xmalloc(t->m.nbytes);
    t->deq = xmalloc(sizeof(double) * (size_t)(rows * cols));
    t->deqf = xmalloc(sizeof(float) * (size_t)(rows * cols));
    float *src = xmalloc(sizeof(float) * (size_t)cols);
    for (int64_t r = 0; r < rows; r++) {
        fill(src, cols, scale);
        char *row = (char *)t->m.data + (size_t)r * rb;
        double *d = t->deq + r * cols;
        switch (type) {
        case TIDE_TYPE_F32:
            memcpy(row, src, (size_t)cols * 4);
            for (int64_t i = 0; i < cols; i++)
                d[i] = src[i];
            break;
        case TIDE_TYPE_F16:
            for (int64_t i = 0; i < cols; i++) {
                ((uint16_t *)row)[i] = tide_f32_to_f16(src[i]);
                d[i] = ref_f16(((uint16_t *)row)[i]);
            }
            break;
        case TIDE_TYPE_BF16:
            for (int64_t i = 0; i < cols; i++) {
                ((uint16_t *)row)[i] = tide_f32_to_bf16(src[i]);
                d[i] = ref_bf16(((uint16_t *)row)[i]);
            }
            break;
        case TIDE_TYPE_Q8_0:
            cpu_quantize_row_q8_0(src, cols, row);
            for (int64_t i = 0; i < cols; i++) {
                const tide_block_q8_0 *b = (const tide_block_q8_0 *)row + i / 32;
                d[i] = ref_f16(b->d) * b->qs[i % 32];
            }
            break;
        default:
            if (cpu_quantize_row(type, src, cols, row) != TIDE_OK) {
                fprintf(stderr, "quantize %s failed\n", type_name(type));
                exit(2);
            }
            for (int64_t i = 0; i < cols; i++)
                d[i] = ref_block_value(type, (const uint8_t *)row, i);
            break;
        }
        for (int64_t i = 0; i < cols; i++)
            t->deqf[r * cols + i] = (float)d[i];
    }
    free(src);
}

static void free_mat(test_mat *t) {
    free(t->m.data);
    free(t->deq);
    free(t->deqf);
}

/* |y - ref| <= tol * sum|w x| (+ a tiny absolute floor) */
static int close_dot(float y, double ref, double absum, double tol) {
    return fabs((double)y - ref) <= tol * absum + 1e-30;
}

/* ---- pools: index 0 = NULL (1 thread), 1 = 1 thread, 2 = 2 threads, 3 = 3 threads (the CPU's
 * best path: AMX tiles for cpu_matmul where it has them); the scalar (S), AVX2 (A) and AVX-512
 * without AMX (X) variants of the same ------------------------------------------------------- */
static tide_pool *P1, *P2, *P3, *S1, *S2, *A1, *A2, *X1, *X2;
static int have_avx2;

/* The single-thread pool with the same code path as `pool` (rows computed alone use it). */
static tide_pool *alone_for(tide_pool *pool) {
    if (pool == S1 || pool == S2)
        return S1;
    if (pool == A1 || pool == A2)
        return A1;
    if (pool == X1 || pool == X2)
        return X1;
    return NULL;
}

/* ---- tests ---------------------------------------------------------------------------------- */
static void test_conversions(void) {
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = tide_f16_to_f32((uint16_t)h);
        double r = ref_f16((uint16_t)h);
        if (isnan(r)) {
            if (!isnan(f) || (tide_f32_to_f16(f) & 0x7c00) != 0x7c00 || !(tide_f32_to_f16(f) & 0x3ff))
                bad++;
            continue;
        }
        if ((double)f != r || tide_f32_to_f16(f) != h)
            bad++;
    }
    check(bad == 0, "f16 <-> f32 round trip of all 65536 halves");
    bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = tide_bf16_to_f32((uint16_t)h);
        if (f == f && tide_f32_to_bf16(f) != h)
            bad++;
    }
    check(bad == 0, "bf16 <-> f32 round trip of all 65536 values");
    /* f32 -> f16: correctly rounded (compare with the nearest of the two neighbours in double) */
    bad = 0;
    for (int i = 0; i < 200000; i++) {
        uint32_t u = (uint32_t)rnd64();
        if (i % 3 == 0)
            u = (u & 0x80000000u) | (0x33000000u + (u % (0x47800000u - 0x33000000u)));
        float f;
        memcpy(&f, &u, 4);
        if (f != f)
            continue;
        uint16_t h = tide_f32_to_f16(f);
        double v = ref_f16(h), x = f;
        if (isinf(v)) {
            if (fabs(x) < 65520.0)
                bad++;
            continue;
        }
        /* neighbours */
        uint16_t up = (uint16_t)(h + 1), dn = (uint16_t)(h - 1);
        double vu = (h & 0x7fff) == 0x7bff ? INFINITY : ref_f16(up);
        double vd = (h & 0x7fff) == 0 ? -ref_f16(h ^ 1) : ref_f16(dn);
        double err = fabs(v - x);
        if ((h & 0x7fff) != 0x7bff && fabs(vu - x) < err)
            bad++;
        if ((h & 0x7fff) != 0 && fabs(vd - x) < err)
            bad++;
        if ((h & 0x7fff) == 0 && fabs(x) > ldexp(1, -25))
            bad++;
    }
    check(bad == 0, "f32 -> f16 rounds to nearest");
    check(tide_f32_to_f16(65520.0f) == 0x7c00 && tide_f32_to_f16(65519.0f) == 0x7bff &&
              tide_f32_to_f16(ldexp(1, -25)) == 0 && tide_f32_to_f16(ldexp(1.5, -25)) == 1 &&
              tide_f32_to_f16(-0.0f) == 0x8000,
          "f32 -> f16 edge values");
    check(tide_f32_to_bf16(1.00390625f) == 0x3f80 && tide_f32_to_bf16(1.01171875f) == 0x3f82 &&
              (tide_f32_to_bf16(NAN) & 0x7fc0) == 0x7fc0,
          "f32 -> bf16 ties to even, NaN stays NaN");
    /* row versions: vector == scalar */
    enum { N = 1003 };
    float x[N], y1[N], y2[N];
    uint16_t h1[N], h2[N];
    for (int i = 0; i < N; i++) {
        uint32_t u = (uint32_t)rnd64();
        u = (u & 0x80000000u) | (0x30000000u + (u % (0x48000000u - 0x30000000u)));
        memcpy(&x[i], &u, 4);
    }
    tide_cpu_features sc = {0}, hw;
    tide_cpu_detect(&hw);
    cpu_f32_to_f16_row(&sc, x, h1, N);
    cpu_f32_to_f16_row(&hw, x, h2, N);
    check(memcmp(h1, h2, sizeof h1) == 0, "f32 -> f16 row: vector == scalar");
    cpu_f16_to_f32_row(&sc, h1, y1, N);
    cpu_f16_to_f32_row(&hw, h1, y2, N);
    check(memcmp(y1, y2, sizeof y1) == 0, "f16 -> f32 row: vector == scalar");
    cpu_f32_to_bf16_row(&sc, x, h1, N);
    cpu_bf16_to_f32_row(&sc, h1, y1, N);
    cpu_bf16_to_f32_row(&hw, h1, y2, N);
    check(memcmp(y1, y2, sizeof y1) == 0, "bf16 -> f32 row: vector == scalar");
}

static void test_q8_0(void) {
    float x[64];
    tide_block_q8_0 b[2];
    for (int i = 0; i < 64; i++)
        x[i] = (float)(i - 20) * 0.37f;
    x[40] = 0.0f;
    check(cpu_quantize_row_q8_0(x, 64, b) == TIDE_OK, "quantize q8_0");
    int ok = 1;
    for (int k = 0; k < 2; k++) {
        float amax = 0;
        for (int i = 0; i < 32; i++)
            amax = fmaxf(amax, fabsf(x[k * 32 + i]));
        float d = amax / 127.0f, id = 1.0f / d;
        ok &= b[k].d == tide_f32_to_f16(d);
        for (int i = 0; i < 32; i++)
            ok &= b[k].qs[i] == (int8_t)roundf(x[k * 32 + i] * id);
    }
    check(ok, "q8_0 block: d = amax/127 as f16, q = round(x/d)");
    float z[32] = {0};
    check(cpu_quantize_row_q8_0(z, 32, b) == TIDE_OK && b[0].d == 0 && b[0].qs[5] == 0,
          "q8_0 of zeros");
    check(cpu_quantize_row_q8_0(x, 40, b) == TIDE_ERR_ARG, "q8_0 rejects cols % 32");
    check(tide_row_bytes(TIDE_TYPE_Q8_0, 64) == 68 && tide_row_bytes(TIDE_TYPE_BF16, 7) == 14 &&
              tide_row_bytes(TIDE_TYPE_F32, 3) == 12 && tide_row_bytes(TIDE_TYPE_Q8_0, 33) == 0 &&
              tide_row_bytes(99, 32) == 0 && tide_row_bytes(TIDE_TYPE_Q4_0, 64) == 36 &&
              tide_row_bytes(TIDE_TYPE_Q4_K, 512) == 288 && tide_row_bytes(TIDE_TYPE_Q5_K, 256) == 176 &&
              tide_row_bytes(TIDE_TYPE_Q6_K, 256) == 210 && tide_row_bytes(TIDE_TYPE_Q4_K, 288) == 0 &&
              tide_row_bytes(TIDE_TYPE_Q4_0, 48) == 0,
          "tide_row_bytes");
    /* get_rows dequantizes any type */
    for (int ti = 0; ti < N_TYPES; ti++) {
        test_mat t;
        make_mat(&t, TYPES[ti], 9, 256, 1.0f);
        int32_t rows[3] = {8, 0, 3};
        float out[3 * 256];
        int same = cpu_get_rows(P2, &t.m, rows, 3, out) == TIDE_OK;
        for (int i = 0; i < 3; i++)
            same &= memcmp(out + i * 256, t.deqf + rows[i] * 256, 256 * sizeof(float)) == 0;
        int32_t badrow = 9;
        same &= cpu_get_rows(P2, &t.m, &badrow, 1, out) == TIDE_ERR_ARG;
        char what[64];
        snprintf(what, sizeof what, "get_rows %s", type_name(TYPES[ti]));
        check(same, what);
        free_mat(&t);
    }
}

static void test_matmul(void) {
    /* 130x2048: the f32 panel path of many tokens; 11x1003: a panel with a tail of 3 columns;
     * 6x4608: too wide for a panel. 8, 10, 11, 33 tokens: panels whose last token group (3 on
     * AVX2, 6 on AVX-512) is short by every count */
    const int64_t shapes[][2] = {{37, 64}, {16, 203}, {9, 35}, {64, 256}, {5, 1}, {130, 2048},
                                 {11, 1003}, {6, 4608}};
    const int32_t ns[] = {1, 2, 3, 4, 5, 8, 10, 11, 33};
    tide_pool *pools[7] = {NULL, P2, P3, S1, S2, A2, X2};
    for (int ti = 0; ti < N_TYPES; ti++) {
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
            int64_t rows = shapes[si][0], cols = shapes[si][1];
            if (tide_row_bytes(TYPES[ti], cols) == 0)
                continue; /* not whole blocks */
            test_mat t;
            make_mat(&t, TYPES[ti], rows, cols, 1.0f);
            test_mat tf = t; /* the dequantized matrix as f32 */
            tf.m.type = TIDE_TYPE_F32;
            tf.m.data = t.deqf;
            for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ni++) {
                int32_t n = ns[ni];
                float *x = xmalloc(sizeof(float) * (size_t)(n * cols));
                fill(x, n * cols, 1.0f);
                for (int pi = 0; pi < 7; pi++) {
                    tide_pool *pool = pools[pi];
                    float *y = xmalloc(sizeof(float) * (size_t)(n * rows));
                    float *yf = xmalloc(sizeof(float) * (size_t)(n * rows));
                    float *y1 = xmalloc(sizeof(float) * (size_t)rows);
                    int ok = cpu_matmul(pool, &t.m, x, n, y) == TIDE_OK;
                    int acc = 1, det = 1, exact = 1;
                    for (int32_t k = 0; k < n; k++)
                        for (int64_t r = 0; r < rows; r++) {
                            double ref = 0, ab = 0;
                            for (int64_t i = 0; i < cols; i++) {
                                double p = t.deq[r * cols + i] * (double)x[k * cols + i];
                                ref += p;
                                ab += fabs(p);
                            }
                            acc &= close_dot(y[k * rows + r], ref, ab, 4e-6 * sqrt((double)cols));
                        }
                    /* each token alone, single thread: bit-identical to the batch */
                    tide_pool *alone = alone_for(pool);
                    for (int32_t k = 0; k < n; k++) {
                        ok &= cpu_matmul(alone, &t.m, x + k * cols, 1, y1) == TIDE_OK;
                        det &= memcmp(y1, y + k * rows, sizeof(float) * (size_t)rows) == 0;
                    }
                    /* any type == f32 over its dequantized matrix, bit for bit */
                    ok &= cpu_matmul(pool, &tf.m, x, n, yf) == TIDE_OK;
                    exact = memcmp(y, yf, sizeof(float) * (size_t)(n * rows)) == 0;
                    char what[160];
                    snprintf(what, sizeof what, "matmul %s %lldx%lld n=%d pool=%d: accuracy",
                             type_name(TYPES[ti]), (long long)rows, (long long)cols, n, pi);
                    check(ok && acc, what);
                    snprintf(what, sizeof what, "matmul %s %lldx%lld n=%d pool=%d: row alone == in batch",
                             type_name(TYPES[ti]), (long long)rows, (long long)cols, n, pi);
                    check(det, what);
                    snprintf(what, sizeof what, "matmul %s %lldx%lld n=%d pool=%d: == f32 of dequantized",
                             type_name(TYPES[ti]), (long long)rows, (long long)cols, n, pi);
                    check(exact, what);
                    free(y);
                    free(yf);
                    free(y1);
                }
                free(x);
            }
            free_mat(&t);
        }
    }
    /* argument errors */
    tide_matrix bad = {TIDE_TYPE_Q8_0, 4, 40, 0, (void *)&bad};
    float x[80], y[8];
    check(cpu_matmul(P2, &bad, x, 1, y) == TIDE_ERR_ARG, "matmul rejects q8_0 cols % 32");
    bad.type = 77;
    bad.cols = 32;
    check(cpu_matmul(P2, &bad, x, 1, y) == TIDE_ERR_ARG, "matmul rejects an unknown type");
    float a[19], b[19];
    fill(a, 19, 1);
    fill(b, 19, 1);
    tide_cpu_features hw;
    tide_cpu_detect(&hw);
    double r = 0, ab = 0;
    for (int i = 0; i < 19; i++) {
        r += (double)a[i] * b[i];
        ab += fabs((double)a[i] * b[i]);
    }
    check(close_dot(cpu_dot_f32(&hw, a, b, 19), r, ab, 1e-6), "cpu_dot_f32");
}

static void test_rmsnorm_rope(void) {
    enum { NR = 7, DIM = 203 };
    float x[NR * DIM], w[DIM], y[NR * DIM], y1[DIM];
    fill(x, NR * DIM, 3.0f);
    fill(w, DIM, 1.0f);
    tide_pool *pools[3] = {NULL, P2, S2};
    for (int pi = 0; pi < 3; pi++) {
        int ok = cpu_rmsnorm(pools[pi], x, w, NR, DIM, 1e-6f, y) == TIDE_OK;
        for (int r = 0; r < NR; r++) {
            double ss = 0;
            for (int i = 0; i < DIM; i++)
                ss += (double)x[r * DIM + i] * x[r * DIM + i];
            double sc = 1.0 / sqrt(ss / DIM + 1e-6);
            for (int i = 0; i < DIM; i++) {
                double ref = x[r * DIM + i] * sc * w[i];
                ok &= fabs(y[r * DIM + i] - ref) <= 1e-5 * fabs(ref) + 1e-6;
            }
            ok &= cpu_rmsnorm(alone_for(pools[pi]), x + r * DIM, w, 1, DIM, 1e-6f, y1) == TIDE_OK;
            ok &= memcmp(y1, y + r * DIM, sizeof y1) == 0;
        }
        float z[NR * DIM];
        memcpy(z, x, sizeof z);
        ok &= cpu_rmsnorm(pools[pi], z, w, NR, DIM, 1e-6f, z) == TIDE_OK; /* in place */
        ok &= memcmp(z, y, sizeof z) == 0;
        char what[64];
        snprintf(what, sizeof what, "rmsnorm pool=%d", pi);
        check(ok, what);
    }
    /* per-head norm */
    {
        enum { T = 3, H = 4, HD = 20, ST = 90 };
        float q[T * ST], q0[T * ST], hw[HD];
        fill(q, T * ST, 2.0f);
        fill(hw, HD, 1.0f);
        memcpy(q0, q, sizeof q);
        int ok = cpu_rmsnorm_heads(P2, q, T, ST, H, HD, hw, 1e-6f) == TIDE_OK;
        for (int t = 0; t < T; t++)
            for (int h = 0; h < H; h++) {
                const float *s = q0 + t * ST + h * HD;
                double ss = 0;
                for (int i = 0; i < HD; i++)
                    ss += (double)s[i] * s[i];
                double sc = 1.0 / sqrt(ss / HD + 1e-6);
                for (int i = 0; i < HD; i++)
                    ok &= fabs(q[t * ST + h * HD + i] - s[i] * sc * hw[i]) < 1e-5;
            }
        for (int t = 0; t < T; t++)
            for (int i = H * HD; i < ST; i++)
                ok &= q[t * ST + i] == q0[t * ST + i];
        check(ok, "rmsnorm_heads (stride > n_head*head_dim untouched)");
    }
    /* rope */
    {
        enum { T = 5, H = 3, HD = 16, RD = 8, ST = 50 };
        const int pos0 = 1000;
        const float theta = 600000.0f;
        float q[T * ST], q0[T * ST];
        fill(q, T * ST, 1.0f);
        memcpy(q0, q, sizeof q);
        int ok = cpu_rope(P2, q, T, ST, H, HD, RD, pos0, theta) == TIDE_OK;
        for (int t = 0; t < T; t++)
            for (int h = 0; h < H; h++) {
                const float *s = q0 + t * ST + h * HD;
                const float *d = q + t * ST + h * HD;
                for (int i = 0; i < RD / 2; i++) {
                    double invf = 1.0 / pow(theta, 2.0 * i / RD), a = (pos0 + t) * invf;
                    double r0 = s[i] * cos(a) - s[i + RD / 2] * sin(a);
                    double r1 = s[i + RD / 2] * cos(a) + s[i] * sin(a);
                    ok &= fabs(d[i] - r0) < 2e-4 && fabs(d[i + RD / 2] - r1) < 2e-4;
                }
                for (int i = RD; i < HD; i++)
                    ok &= d[i] == s[i];
            }
        for (int t = 0; t < T; t++)
            for (int i = H * HD; i < ST; i++)
                ok &= q[t * ST + i] == q0[t * ST + i];
        /* token t alone at position pos0 + t: identical */
        for (int t = 0; t < T; t++) {
            float one[ST];
            memcpy(one, q0 + t * ST, sizeof one);
            ok &= cpu_rope(NULL, one, 1, ST, H, HD, RD, pos0 + t, theta) == TIDE_OK;
            ok &= memcmp(one, q + t * ST, sizeof one) == 0;
        }
        check(ok, "rope NeoX partial");
        check(cpu_rope(P2, q, T, ST, H, HD, 7, 0, theta) == TIDE_ERR_ARG, "rope rejects odd rope_dim");
    }
    /* elementwise */
    {
        enum { N = 100003 };
        float *a = xmalloc(N * 4), *b = xmalloc(N * 4), *c = xmalloc(N * 4);
        fill(a, N, 4.0f);
        fill(b, N, 4.0f);
        memcpy(c, a, N * 4);
        cpu_add(P2, c, b, N);
        int ok = 1;
        for (int i = 0; i < N; i++)
            ok &= c[i] == a[i] + b[i];
        check(ok, "add");
        memcpy(c, a, N * 4);
        cpu_silu_mul(P2, c, b, N);
        ok = 1;
        for (int i = 0; i < N; i++) {
            double g = a[i], ref = g / (1 + exp(-g)) * b[i];
            ok &= fabs(c[i] - ref) <= 1e-6 * fabs(ref) + 1e-7;
        }
        check(ok, "silu_mul");
        int32_t rows[3] = {2, 0, 2};
        float g[3 * 7];
        cpu_gather_rows(P2, g, a, rows, 3, 7);
        check(memcmp(g, a + 14, 28) == 0 && memcmp(g + 7, a, 28) == 0 && memcmp(g + 14, a + 14, 28) == 0,
              "gather_rows");
        free(a);
        free(b);
        free(c);
    }
}

/* Double-precision reference attention for one (head, query). */
static void ref_attention(const tide_attn_shape *s, const float *q, const float *k, const float *v,
                          int i, int h, double *out) {
    int hd = s->head_dim, kvh = h / (s->n_head / s->n_head_kv);
    const float *qh = q + (int64_t)i * s->n_head * hd + h * hd;
    double *sc = xmalloc(sizeof(double) * (size_t)(s->n_kv + 1));
    double m = -INFINITY;
    int any = 0;
    for (int j = 0; j < s->n_kv; j++) {
        if (j / s->block_length > (s->q_pos0 + i) / s->block_length) {
            sc[j] = -INFINITY;
            continue;
        }
        double d = 0;
        for (int c = 0; c < hd; c++)
            d += (double)qh[c] * k[(int64_t)j * s->kv_stride + kvh * hd + c];
        sc[j] = d / sqrt((double)hd);
        if (sc[j] > m)
            m = sc[j];
        any = 1;
    }
    for (int c = 0; c < hd; c++)
        out[c] = 0;
    if (any) {
        double z = 0;
        for (int j = 0; j < s->n_kv; j++)
            if (sc[j] > -INFINITY) {
                double e = exp(sc[j] - m);
                z += e;
                for (int c = 0; c < hd; c++)
                    out[c] += e * v[(int64_t)j * s->kv_stride + kvh * hd + c];
            }
        for (int c = 0; c < hd; c++)
            out[c] /= z;
    }
    free(sc);
}

static void test_attention(void) {
    struct {
        int n_q, q_pos0, n_kv, bl, nh, nkv, hd, extra;
    } cases[] = {
        {8, 0, 8, 1, 4, 2, 16, 0},      /* causal */
        {8, 8, 16, 1, 2, 2, 20, 3},     /* causal, offset, odd head dim, padded kv rows */
        {12, 4, 16, 4, 4, 1, 32, 0},    /* block 4, queries spanning 3 blocks */
        {32, 32, 64, 32, 4, 2, 128, 0}, /* a step: block 32 against a cache of one block */
        {5, 64, 69, 32, 2, 1, 40, 8},   /* partial block */
        {40, 0, 40, 32, 2, 2, 8, 0},    /* prefill of 1.25 blocks */
        {32, 4096, 4128, 32, 8, 2, 128, 0}, /* a step after 4096 cached: many tiles */
        {64, 4160, 4224, 32, 4, 1, 64, 5},  /* two blocks of a prefill micro-batch, long cache */
    };
    tide_pool *pools[5] = {NULL, P2, P3, S2, A2};
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        tide_attn_shape s = {cases[ci].n_q, cases[ci].q_pos0, cases[ci].n_kv, cases[ci].bl,
                             cases[ci].nh, cases[ci].nkv, cases[ci].hd, 0, TIDE_TYPE_F32};
        s.kv_stride = (int64_t)s.n_head_kv * s.head_dim + cases[ci].extra;
        int64_t qn = (int64_t)s.n_q * s.n_head * s.head_dim;
        float *q = xmalloc(sizeof(float) * (size_t)qn), *o = xmalloc(sizeof(float) * (size_t)qn);
        float *o1 = xmalloc(sizeof(float) * (size_t)(s.n_head * s.head_dim));
        float *k = xmalloc(sizeof(float) * (size_t)(s.n_kv * s.kv_stride));
        float *v = xmalloc(sizeof(float) * (size_t)(s.n_kv * s.kv_stride));
        double *ref = xmalloc(sizeof(double) * (size_t)s.head_dim);
        fill(q, qn, 2.0f);
        fill(k, s.n_kv * s.kv_stride, 2.0f);
        fill(v, s.n_kv * s.kv_stride, 1.0f);
        for (int pi = 0; pi < 5; pi++) {
            int ok = cpu_attention(pools[pi], &s, q, k, v, o) == TIDE_OK, det = 1;
            for (int i = 0; i < s.n_q; i++)
                for (int h = 0; h < s.n_head; h++) {
                    ref_attention(&s, q, k, v, i, h, ref);
                    for (int c = 0; c < s.head_dim; c++)
                        ok &= fabs(o[((int64_t)i * s.n_head + h) * s.head_dim + c] - ref[c]) < 2e-5;
                }
            /* each query alone (n_q = 1 at its position): bit-identical */
            for (int i = 0; i < s.n_q; i++) {
                tide_attn_shape one = s;
                one.n_q = 1;
                one.q_pos0 = s.q_pos0 + i;
                ok &= cpu_attention(alone_for(pools[pi]), &one,
                                    q + (int64_t)i * s.n_head * s.head_dim, k, v, o1) == TIDE_OK;
                det &= memcmp(o1, o + (int64_t)i * s.n_head * s.head_dim,
                              sizeof(float) * (size_t)(s.n_head * s.head_dim)) == 0;
            }
            char what[128];
            snprintf(what, sizeof what, "attention case %zu (block %d) pool=%d: accuracy", ci, s.block_length, pi);
            check(ok, what);
            snprintf(what, sizeof what, "attention case %zu (block %d) pool=%d: query alone == in batch", ci, s.block_length, pi);
            check(det, what);
        }
        free(q); free(o); free(o1); free(k); free(v); free(ref);
    }
    /* the mask rule itself: a key in a later block must not matter, one in the same block must */
    {
        tide_attn_shape s = {4, 4, 12, 4, 1, 1, 8, 8, TIDE_TYPE_F32};
        float q[4 * 8], k[12 * 8], v[12 * 8], o[4 * 8], o2[4 * 8];
        fill(q, 32, 1);
        fill(k, 96, 1);
        fill(v, 96, 1);
        cpu_attention(P2, &s, q, k, v, o);
        for (int c = 0; c < 8; c++) {
            k[8 * 8 + c] = 100.0f; /* key 8: block 2, invisible to queries at positions 4..7 */
            v[8 * 8 + c] = 1e6f;
        }
        cpu_attention(P2, &s, q, k, v, o2);
        check(memcmp(o, o2, sizeof o) == 0, "attention: keys of a later block are invisible");
        v[7 * 8] += 1.0f; /* key 7: same block as query 0 at position 4 */
        cpu_attention(P2, &s, q, k, v, o2);
        check(o2[0] != o[0], "attention: keys later in the same block are visible");
    }
    tide_attn_shape bad = {1, 0, 1, 4, 3, 2, 8, 16, TIDE_TYPE_F32};
    float z[64] = {0};
    check(cpu_attention(P2, &bad, z, z, z, z) == TIDE_ERR_ARG, "attention rejects n_head % n_head_kv");
}

static double silu_d(double g) { return g / (1 + exp(-g)); }

static void test_experts(void) {
    enum { DIM = 64, FF = 96, NTOK = 9, NUSED = 3, NJOB = 4 };
    for (int ti = 0; ti < 4; ti++) {
        test_mat g[NJOB], u[NJOB], d[NJOB];
        tide_matrix gm[NJOB], um[NJOB], dm[NJOB];
        for (int j = 0; j < NJOB; j++) {
            make_mat(&g[j], TYPES[ti], FF, DIM, 0.5f);
            make_mat(&u[j], TYPES[ti], FF, DIM, 0.5f);
            make_mat(&d[j], TYPES[ti], DIM, FF, 0.5f);
            gm[j] = g[j].m;
            um[j] = u[j].m;
            dm[j] = d[j].m;
        }
        float x[NTOK * DIM];
        fill(x, NTOK * DIM, 1.0f);
        /* routing: token t picks experts (t + k) % 4 for k < 3, except job 3 gets nobody when
         * we drop it below; build pairs grouped by job */
        int32_t start[NJOB + 1], tokv[NTOK * NUSED], dest[NTOK * NUSED];
        int np = 0;
        for (int j = 0; j < NJOB; j++) {
            start[j] = np;
            for (int t = 0; t < NTOK; t++)
                for (int k = 0; k < NUSED; k++)
                    if ((t + k) % NJOB == j && !(j == 2 && t % 2)) {
                        tokv[np] = t;
                        dest[np] = t * NUSED + k;
                        np++;
                    }
        }
        start[NJOB] = np;
        tide_expert_batch b = {NJOB, gm, um, dm, start, tokv, dest};
        tide_pool *pools[5] = {NULL, P2, P3, S2, A2};
        float out[NTOK * NUSED * DIM], out1[NTOK * NUSED * DIM];
        for (int pi = 0; pi < 5; pi++) {
            for (int i = 0; i < NTOK * NUSED * DIM; i++)
                out[i] = out1[i] = -7.0f; /* pairs never routed keep this */
            int ok = cpu_experts(pools[pi], &b, x, DIM, out) == TIDE_OK, det = 1;
            for (int j = 0; j < NJOB; j++)
                for (int p = start[j]; p < start[j + 1]; p++) {
                    const float *xt = x + tokv[p] * DIM;
                    double h[FF];
                    for (int r = 0; r < FF; r++) {
                        double gg = 0, uu = 0;
                        for (int c = 0; c < DIM; c++) {
                            gg += g[j].deq[r * DIM + c] * xt[c];
                            uu += u[j].deq[r * DIM + c] * xt[c];
                        }
                        h[r] = silu_d(gg) * uu;
                    }
                    for (int r = 0; r < DIM; r++) {
                        double ref = 0, ab = 0;
                        for (int c = 0; c < FF; c++) {
                            ref += d[j].deq[r * FF + c] * h[c];
                            ab += fabs(d[j].deq[r * FF + c] * h[c]);
                        }
                        ok &= close_dot(out[dest[p] * DIM + r], ref, ab, 1e-4);
                    }
                }
            for (int t = 0; t < NTOK; t++) /* token 1 of job 2 dropped: (1+1)%4 == 2, k = 1 */
                if (t % 2 && (t + 1) % NJOB == 2)
                    ok &= out[(t * NUSED + 1) * DIM] == -7.0f;
            /* each pair alone: one job, one pair */
            for (int j = 0; j < NJOB; j++)
                for (int p = start[j]; p < start[j + 1]; p++) {
                    int32_t st1[2] = {0, 1};
                    tide_expert_batch b1 = {1, &gm[j], &um[j], &dm[j], st1, &tokv[p], &dest[p]};
                    ok &= cpu_experts(alone_for(pools[pi]), &b1, x, DIM, out1) == TIDE_OK;
                    det &= memcmp(out1 + dest[p] * DIM, out + dest[p] * DIM, DIM * sizeof(float)) == 0;
                }
            char what[96];
            snprintf(what, sizeof what, "experts %s pool=%d: accuracy", type_name(TYPES[ti]), pi);
            check(ok, what);
            snprintf(what, sizeof what, "experts %s pool=%d: pair alone == in batch", type_name(TYPES[ti]), pi);
            check(det, what);
        }
        for (int j = 0; j < NJOB; j++) {
            free_mat(&g[j]);
            free_mat(&u[j]);
            free_mat(&d[j]);
        }
    }
    /* a job without pairs is skipped (its matrices are never read: NULL data is fine) */
    {
        test_mat g1, u1, d1;
        make_mat(&g1, TIDE_TYPE_BF16, 32, 16, 1);
        make_mat(&u1, TIDE_TYPE_BF16, 32, 16, 1);
        make_mat(&d1, TIDE_TYPE_BF16, 16, 32, 1);
        tide_matrix gm[2] = {{TIDE_TYPE_BF16, 32, 16, 0, NULL}, g1.m};
        tide_matrix um[2] = {{TIDE_TYPE_BF16, 32, 16, 0, NULL}, u1.m};
        tide_matrix dm[2] = {{TIDE_TYPE_BF16, 16, 32, 0, NULL}, d1.m};
        int32_t st[3] = {0, 0, 2}, tk[2] = {1, 0}, ds[2] = {0, 1};
        tide_expert_batch b = {2, gm, um, dm, st, tk, ds};
        float x[2 * 16], o[2 * 16], o1[2 * 16];
        fill(x, 32, 1);
        int ok = cpu_experts(P2, &b, x, 16, o) == TIDE_OK;
        int32_t st1[2] = {0, 1};
        tide_expert_batch b1 = {1, &g1.m, &u1.m, &d1.m, st1, &tk[1], &ds[1]};
        ok &= cpu_experts(NULL, &b1, x, 16, o1) == TIDE_OK &&
              memcmp(o1 + 16, o + 16, 16 * sizeof(float)) == 0;
        check(ok, "experts: a job with no pairs is skipped");
        free_mat(&g1);
        free_mat(&u1);
        free_mat(&d1);
    }
    /* shape errors */
    test_mat g, u, d;
    make_mat(&g, TIDE_TYPE_F32, 8, 16, 1);
    make_mat(&u, TIDE_TYPE_F32, 8, 16, 1);
    make_mat(&d, TIDE_TYPE_F32, 16, 7, 1);
    int32_t st[2] = {0, 1}, tk = 0, ds = 0;
    tide_expert_batch b = {1, &g.m, &u.m, &d.m, st, &tk, &ds};
    float x[16], o[16];
    check(cpu_experts(P2, &b, x, 16, o) == TIDE_ERR_ARG, "experts rejects down cols != ff");
    free_mat(&g);
    free_mat(&u);
    free_mat(&d);

    /* combine: exact, k order */
    enum { T = 5, K = 8, D = 33 };
    float pairs[T * K * D], w[T * K], base[T * D], c1[T * D];
    fill(pairs, T * K * D, 1);
    fill(w, T * K, 1);
    fill(base, T * D, 1);
    memcpy(c1, base, sizeof base);
    cpu_moe_combine(P2, pairs, w, T, K, D, c1);
    int ok = 1;
    for (int t = 0; t < T; t++)
        for (int i = 0; i < D; i++) {
            float s = 0;
            for (int k = 0; k < K; k++)
                s += w[t * K + k] * pairs[(t * K + k) * D + i];
            ok &= c1[t * D + i] == base[t * D + i] + s;
        }
    check(ok, "moe_combine in k order");
}

/* ---- head ----------------------------------------------------------------------------------- */
static void test_argmax(void) {
    enum { V = 1001, N = 6 };
    float *l = xmalloc(sizeof(float) * N * V);
    fill(l, N * V, 8.0f);
    l[1 * V + 5] = l[1 * V + 700] = 50.0f; /* tie: the first wins */
    l[2 * V + 3] = NAN;
    for (int i = 0; i < V; i++)
        l[3 * V + i] = -INFINITY;
    l[3 * V + 17] = 1.0f;
    int32_t tok[N];
    float prob[N];
    tide_pool *pools[3] = {NULL, P2, S2};
    for (int pi = 0; pi < 3; pi++) {
        cpu_argmax_prob(pools[pi], l, N, V, tok, prob);
        int ok = 1;
        for (int r = 0; r < N; r++) {
            const float *x = l + r * V;
            int best = -1;
            double m = -INFINITY, z = 0;
            for (int i = 0; i < V; i++)
                if (x[i] > m) {
                    m = x[i];
                    best = i;
                }
            for (int i = 0; i < V; i++)
                if (x[i] == x[i])
                    z += exp((double)x[i] - m);
            ok &= tok[r] == best && fabs(prob[r] - 1.0 / z) < 1e-5 * (1.0 / z) + 1e-7;
        }
        ok &= tok[1] == 5 && tok[3] == 17 && prob[3] == 1.0f;
        char what[64];
        snprintf(what, sizeof what, "argmax_prob pool=%d", pi);
        check(ok, what);
    }
    free(l);
}

static const double *ref_l;
static int ref_cmp(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    if (ref_l[x] != ref_l[y])
        return ref_l[x] > ref_l[y] ? -1 : 1;
    return (x > y) - (x < y);
}

/* Reference filter: kept[i] and the filtered probabilities, in double, as HF. */
static void ref_filter(const float *logits, int V, float temp, int top_k, float top_p, int *kept,
                       double *p) {
    double *l = xmalloc(sizeof(double) * V);
    for (int i = 0; i < V; i++) {
        float v = logits[i];
        if (temp > 0 && temp != 1.0f)
            v = v / temp;
        l[i] = v;
        kept[i] = 1;
    }
    if (top_k > 0 && top_k < V) {
        /* k-th largest by counting */
        double kth = 0;
        for (int i = 0; i < V; i++) {
            int greater = 0, geq = 0;
            for (int j = 0; j < V; j++) {
                greater += l[j] > l[i];
                geq += l[j] >= l[i];
            }
            if (greater < top_k && geq >= top_k)
                kth = l[i];
        }
        for (int i = 0; i < V; i++)
            kept[i] = l[i] >= kth;
    }
    double m = -INFINITY;
    for (int i = 0; i < V; i++)
        if (kept[i] && l[i] > m)
            m = l[i];
    if (top_p < 1.0f) {
        double z = 0;
        for (int i = 0; i < V; i++)
            if (kept[i])
                z += exp(l[i] - m);
        /* order: descending logit, then ascending index */
        int *ord = xmalloc(sizeof(int) * V), n = 0;
        for (int i = 0; i < V; i++)
            if (kept[i])
                ord[n++] = i;
        ref_l = l;
        qsort(ord, (size_t)n, sizeof(int), ref_cmp);
        double c = 0;
        int cut = 0;
        for (int a = 0; a < n; a++) {
            if (cut)
                kept[ord[a]] = 0;
            c += exp(l[ord[a]] - m) / z;
            if (c > top_p)
                cut = 1;
        }
        free(ord);
    }
    double z = 0;
    for (int i = 0; i < V; i++)
        if (kept[i])
            z += exp(l[i] - m);
    for (int i = 0; i < V; i++)
        p[i] = kept[i] ? exp(l[i] - m) / z : 0;
    free(l);
}

static void test_sampling(void) {
    enum { V = 300 };
    float l[V];
    fill(l, V, 4.0f);
    void *scr = xmalloc(cpu_sample_scratch_bytes(V));
    tide_cpu_features hw, sc = {0};
    tide_cpu_detect(&hw);
    int32_t tok, tok2;
    float prob, prob2;

    /* splitmix64 known values: the first outputs of splitmix64 seeded with 0 */
    check(tide_splitmix64(0, 0) == 0xE220A8397B1DCDAFull && tide_splitmix64(0, 1) == 0x6E789E6AA1B965F4ull,
          "splitmix64 reference values");
    double mean = 0;
    for (int i = 0; i < 100000; i++)
        mean += tide_uniform(42, i);
    mean /= 100000;
    check(fabs(mean - 0.5) < 0.005, "uniform mean");

    /* greedy == argmax_prob */
    tide_sampling g = {0.0f, 0, 1.0f, 7};
    int32_t at;
    float ap;
    cpu_argmax_prob(NULL, l, 1, V, &at, &ap);
    check(cpu_sample_row(&hw, l, V, &g, 0, &tok, &prob, scr) == TIDE_OK && tok == at && prob == ap,
          "sample: greedy == argmax_prob");

    struct {
        float t;
        int k;
        float p;
    } cfg[] = {{1.0f, 0, 1.0f},  {0.7f, 0, 1.0f},  {1.3f, 10, 1.0f}, {0.8f, 0, 0.9f},
               {1.0f, 20, 0.5f}, {2.0f, 0, 0.05f}, {0.5f, 1, 1.0f},  {1.0f, 0, 0.0f},
               {0.0f, 5, 1.0f},  {0.0f, 0, 0.6f},  {1.0f, 299, 0.97f}, {1.0f, 300, 1.0f}};
    for (size_t ci = 0; ci < sizeof cfg / sizeof cfg[0]; ci++) {
        tide_sampling s = {cfg[ci].t, cfg[ci].k, cfg[ci].p, 1234};
        int kept[V];
        double p[V];
        ref_filter(l, V, s.temperature, s.top_k, s.top_p, kept, p);
        int ok = 1, repro = 1, nkept = 0;
        int *hits = calloc(V, sizeof(int));
        const int DRAWS = 4000;
        for (int pos = 0; pos < DRAWS; pos++) {
            const tide_cpu_features *f = pos % 2 ? &hw : &sc;
            ok &= cpu_sample_row(f, l, V, &s, pos, &tok, &prob, scr) == TIDE_OK;
            ok &= tok >= 0 && tok < V && kept[tok] && fabs(prob - p[tok]) <= 1e-5 * p[tok] + 1e-7;
            ok &= cpu_sample_row(f, l, V, &s, pos, &tok2, &prob2, scr) == TIDE_OK;
            repro &= tok2 == tok && prob2 == prob;
            if (tok >= 0 && tok < V)
                hits[tok]++;
        }
        if (s.temperature == 0.0f) {
            ok &= hits[at] == DRAWS;
        } else {
            /* frequencies follow p: every token with p > 2% is within 5 sigma */
            for (int i = 0; i < V; i++) {
                nkept += kept[i];
                double e = p[i] * DRAWS, sd = sqrt(DRAWS * p[i] * (1 - p[i]));
                if (p[i] > 0.02)
                    ok &= fabs(hits[i] - e) <= 5 * sd + 1;
                if (!kept[i])
                    ok &= hits[i] == 0;
            }
        }
        free(hits);
        char what[128];
        snprintf(what, sizeof what, "sample t=%.2f k=%d p=%.2f: kept set, probs, frequencies", cfg[ci].t, cfg[ci].k, cfg[ci].p);
        check(ok, what);
        snprintf(what, sizeof what, "sample t=%.2f k=%d p=%.2f: reproducible", cfg[ci].t, cfg[ci].k, cfg[ci].p);
        check(repro, what);
        (void)nkept;
    }
    /* edge cases */
    tide_sampling s1 = {1.0f, 1, 1.0f, 9};
    check(cpu_sample_row(&hw, l, V, &s1, 3, &tok, &prob, scr) == TIDE_OK && tok == at && prob == 1.0f,
          "top_k = 1 is the argmax with prob 1");
    tide_sampling sp = {1.0f, 0, 1e-6f, 9};
    check(cpu_sample_row(&hw, l, V, &sp, 3, &tok, &prob, scr) == TIDE_OK && tok == at && prob == 1.0f,
          "tiny top_p keeps only the first");
    float tie[6] = {1, 5, 5, 2, 5, 0};
    tide_sampling sk = {0.0f, 2, 1.0f, 0};
    check(cpu_sample_row(&hw, tie, 6, &sk, 0, &tok, &prob, scr) == TIDE_OK && tok == 1 &&
              fabsf(prob - 1.0f / 3.0f) < 1e-6f,
          "top_k ties at the boundary are all kept (3 of k=2), argmax is the first");
    /* top-p boundary: probs 0.5, 0.3, 0.2 (logits ln p); top_p 0.6: c0 = 0.5 is not > 0.6, c1 is:
     * the second is kept (it crosses), the third goes */
    float lp[3] = {logf(0.5f), logf(0.3f), logf(0.2f)};
    tide_sampling sb = {0.0f, 0, 0.6f, 0};
    check(cpu_sample_row(&hw, lp, 3, &sb, 0, &tok, &prob, scr) == TIDE_OK && tok == 0 &&
              fabsf(prob - 0.625f) < 1e-5f,
          "top_p keeps the token that crosses the threshold");
    sb.top_p = 0.4f;
    check(cpu_sample_row(&hw, lp, 3, &sb, 0, &tok, &prob, scr) == TIDE_OK && tok == 0 && prob == 1.0f,
          "top_p below the first prob keeps one");
    float nanl[4] = {NAN, 1.0f, NAN, 0.5f};
    tide_sampling sn = {1.0f, 0, 1.0f, 5};
    int ok = 1;
    for (int pos = 0; pos < 50; pos++)
        ok &= cpu_sample_row(&hw, nanl, 4, &sn, pos, &tok, &prob, scr) == TIDE_OK && (tok == 1 || tok == 3);
    check(ok, "NaN logits are never drawn");
    tide_sampling neg = {-1.0f, 0, 1.0f, 0};
    check(cpu_sample_row(&hw, l, V, &neg, 0, &tok, &prob, scr) == TIDE_ERR_ARG, "negative temperature rejected");
    /* top_k above the heap limit (4096): the quickselect path, with ties */
    {
        enum { MV = 6000 };
        float *ml = xmalloc(sizeof(float) * MV);
        void *mscr = xmalloc(cpu_sample_scratch_bytes(MV));
        for (int i = 0; i < MV; i++)
            ml[i] = (float)((i * 7919) % 300) * 0.01f; /* 20 copies of each value */
        int *kept = xmalloc(sizeof(int) * MV);
        double *mp = xmalloc(sizeof(double) * MV);
        tide_sampling sk5 = {1.0f, 4510, 0.95f, 3};
        ref_filter(ml, MV, 1.0f, 4510, 0.95f, kept, mp);
        ok = 1;
        for (int pos = 0; pos < 200; pos++) {
            ok &= cpu_sample_row(&hw, ml, MV, &sk5, pos, &tok, &prob, mscr) == TIDE_OK;
            ok &= tok >= 0 && tok < MV && kept[tok] && fabs(prob - mp[tok]) <= 1e-5 * mp[tok];
        }
        tide_sampling sk0 = {0.0f, 4510, 1.0f, 3};
        ref_filter(ml, MV, 0.0f, 4510, 1.0f, kept, mp);
        int32_t am;
        float amp;
        cpu_argmax_prob(NULL, ml, 1, MV, &am, &amp);
        ok &= cpu_sample_row(&hw, ml, MV, &sk0, 0, &tok, &prob, mscr) == TIDE_OK && tok == am &&
              fabs(prob - mp[am]) <= 1e-5 * mp[am];
        check(ok, "top_k 4510 of 6000 (quickselect path, ties): kept set and probs");
        free(ml);
        free(mscr);
        free(kept);
        free(mp);
    }
    /* a large vocabulary, flat logits, top_p near 1: the candidate threshold must widen */
    {
        enum { BV = 157184 };
        float *bl = xmalloc(sizeof(float) * BV);
        void *bscr = xmalloc(cpu_sample_scratch_bytes(BV));
        for (int i = 0; i < BV; i++)
            bl[i] = (float)((i * 7919) % 1000) * 0.03f;
        int *kept = xmalloc(sizeof(int) * BV);
        double *bp = xmalloc(sizeof(double) * BV);
        ok = 1;
        const float tps[3] = {0.5f, 0.9999f, 0.99999994f};
        for (int pi = 0; pi < 3; pi++) {
            tide_sampling sf = {1.0f, 0, tps[pi], 77};
            ref_filter(bl, BV, 1.0f, 0, tps[pi], kept, bp);
            for (int pos = 0; pos < 10; pos++) {
                ok &= cpu_sample_row(&hw, bl, BV, &sf, pos, &tok, &prob, bscr) == TIDE_OK;
                ok &= tok >= 0 && tok < BV && kept[tok] && fabs(prob - bp[tok]) <= 1e-4 * bp[tok];
            }
        }
        free(bp);
        check(ok, "sampling on a 157184 vocabulary: kept set and probs as the reference");
        ok = 1;
        /* batch == rows alone */
        int32_t toks[8], toks1;
        float probs[8], probs1;
        int32_t posv[8] = {3, 1, 4, 1, 5, 9, 2, 6};
        float *rows8 = xmalloc(sizeof(float) * 8 * 1000);
        fill(rows8, 8 * 1000, 3.0f);
        tide_sampling s8 = {0.9f, 50, 0.9f, 99};
        ok &= cpu_sample(P2, rows8, 8, 1000, &s8, posv, toks, probs) == TIDE_OK;
        for (int r = 0; r < 8; r++) {
            ok &= cpu_sample_row(&hw, rows8 + r * 1000, 1000, &s8, posv[r], &toks1, &probs1, bscr) == TIDE_OK;
            ok &= toks1 == toks[r] && probs1 == probs[r];
        }
        check(ok, "cpu_sample (2 threads) == rows alone");
        free(rows8);
        free(kept);
        free(bl);
        free(bscr);
    }
    free(scr);
}

/* ---- thread pool ---------------------------------------------------------------------------- */
typedef struct {
    atomic_int calls[8];
    atomic_long covered;
} pool_probe;

static void probe_run(void *p, int ith, int nth) {
    pool_probe *pp = p;
    atomic_fetch_add(&pp->calls[ith], 1);
    (void)nth;
}
static void probe_for(void *p, int64_t b, int64_t e) {
    pool_probe *pp = p;
    atomic_fetch_add(&pp->covered, (long)(e - b));
}

static void test_pool(void) {
    tide_pool *pools[3] = {P1, P2, P3};
    for (int pi = 0; pi < 3; pi++) {
        int n = tide_pool_size(pools[pi]), ok = 1;
        pool_probe pp;
        for (int i = 0; i < 8; i++)
            atomic_init(&pp.calls[i], 0);
        atomic_init(&pp.covered, 0);
        const int R = 20000;
        for (int r = 0; r < R; r++)
            tide_pool_run(pools[pi], probe_run, &pp);
        for (int i = 0; i < n; i++)
            ok &= atomic_load(&pp.calls[i]) == R;
        long want = 0;
        for (int r = 0; r < 2000; r++) {
            int64_t len = (int64_t)(rnd64() % 50);
            tide_pool_for(pools[pi], len, probe_for, &pp);
            want += len;
        }
        ok &= atomic_load(&pp.covered) == want;
        char what[64];
        snprintf(what, sizeof what, "pool of %d: every thread once per run, for covers exactly", n);
        check(ok, what);
    }
    check(tide_pool_size(NULL) == 1, "NULL pool has size 1");
    tide_pool *p0 = NULL;
    check(tide_pool_new(0, &p0) == TIDE_OK && tide_pool_size(p0) >= 1, "pool of 0 = online CPUs");
    tide_pool_free(p0);
    /* a pool that sleeps (idle past the spin) wakes up for the next job */
    tide_pool *p = NULL;
    tide_pool_new(2, &p);
    pool_probe pp;
    for (int i = 0; i < 8; i++)
        atomic_init(&pp.calls[i], 0);
    int ok = 1;
    for (int r = 0; r < 5; r++) {
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
        tide_pool_run(p, probe_run, &pp);
        ok &= atomic_load(&pp.calls[1]) == r + 1;
    }
    tide_pool_free(p);
    check(ok, "pool wakes from sleep");
}

int main(void) {
    tide_cpu_features hw, scalar = {0, 0, 0}, avx2 = {1, 0, 0}, avx512 = {1, 1, 0};
    tide_cpu_detect(&hw);
    have_avx2 = hw.avx2;
    printf("cpu: avx2+fma+f16c %s, avx512 f+bw+vl %s, amx-bf16 %s (paths tested: scalar%s%s%s)\n",
           hw.avx2 ? "yes" : "no", hw.avx512 ? "yes" : "no", hw.amx ? "yes" : "no",
           hw.avx2 ? ", avx2" : "", hw.avx512 ? ", avx512" : "", hw.amx ? ", amx" : "");
    if (tide_pool_new(1, &P1) || tide_pool_new(2, &P2) || tide_pool_new(3, &P3) ||
        tide_pool_new(1, &S1) || tide_pool_new(2, &S2) || tide_pool_new(1, &A1) ||
        tide_pool_new(2, &A2) || tide_pool_new(1, &X1) || tide_pool_new(2, &X2)) {
        printf("pool creation failed\n");
        return 2;
    }
    tide_pool_set_features(S1, &scalar);
    tide_pool_set_features(S2, &scalar);
    tide_pool_set_features(A1, &avx2); /* the AVX2 path even where AVX-512 is there */
    tide_pool_set_features(A2, &avx2);
    tide_pool_set_features(X1, &avx512); /* the AVX-512 tiles even where AMX is there */
    tide_pool_set_features(X2, &avx512);

    test_pool();
    test_conversions();
    test_q8_0();
    test_matmul();
    test_rmsnorm_rope();
    test_attention();
    test_experts();
    test_argmax();
    test_sampling();

    tide_pool_free(P1);
    tide_pool_free(P2);
    tide_pool_free(P3);
    tide_pool_free(S1);
    tide_pool_free(S2);
    tide_pool_free(A1);
    tide_pool_free(A2);
    tide_pool_free(X1);
    tide_pool_free(X2);
    return check_report("test_kernels");
}

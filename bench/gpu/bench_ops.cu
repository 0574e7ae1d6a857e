/* bench_ops.cu: speed of the CUDA backend's ops at LLaDA2.0-mini's shapes, through the backend
 * table (launch overhead included, as the forward pass sees it). Prints microseconds per call and
 * the weight bytes per second against the H200's 4.8 TB/s.
 *
 *   nvcc -O2 -std=c++17 -arch=sm_90 -Inative/include -Inative/src -DTIDE_CUDA=1
 *        bench/gpu/bench_ops.cu build/cuda-on/backend/cuda/*.o build/cuda-on/common.o \
 *        -o build/bench_ops && build/bench_ops
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <random>
#include <vector>

extern "C" {
#include "backend/backend.h"
}

#define OK(call)                                                                                   \
    do {                                                                                           \
        tide_status s_ = (call);                                                                   \
        if (s_ != TIDE_OK) {                                                                       \
            printf("FAIL %s: %s\n", #call, be->err);                                               \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

static const double HBM = 4.8e12;
static tide_backend *be;
static std::mt19937 rng(7);

static double now() {
    timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static size_t rowb(int type, int64_t cols) {
    return type == TIDE_TYPE_F32 ? cols * 4 : type == TIDE_TYPE_Q8_0 ? cols / 32 * 34 : cols * 2;
}
static const char *tn(int t) {
    return t == TIDE_TYPE_F32 ? "f32" : t == TIDE_TYPE_F16 ? "f16" : t == TIDE_TYPE_BF16 ? "bf16" : "q8_0";
}

/* Weight bytes that decode to small finite values for every type. */
static void *weight(int type, int64_t rows, int64_t cols, size_t *nbytes) {
    size_t n = rowb(type, cols) * rows;
    std::vector<uint8_t> h(n);
    if (type == TIDE_TYPE_Q8_0) {
        for (size_t i = 0; i < n; i++) h[i] = (uint8_t)rng();
        for (int64_t r = 0; r < rows; r++)
            for (int64_t b = 0; b < cols / 32; b++) {
                uint16_t d = 0x2000; /* f16 ~0.0078 */
                memcpy(&h[r * rowb(type, cols) + b * 34], &d, 2);
            }
    } else if (type == TIDE_TYPE_F32) {
        for (size_t i = 0; i < n / 4; i++) {
            float f = (float)(rng() % 2001 - 1000) * 1e-5f;
            memcpy(&h[i * 4], &f, 4);
        }
    } else {
        for (size_t i = 0; i < n / 2; i++) {
            uint16_t v = (uint16_t)(0x3c00 | (rng() & 0x83ff)); /* |x| in [0.0078, 0.0156) bf16; f16 ~1 */
            memcpy(&h[i * 2], &v, 2);
        }
    }
    void *d;
    int copied;
    OK(be->buf->upload_weight(be, h.data(), n, &d, &copied));
    *nbytes = n;
    return d;
}

static float *acts(size_t n) {
    std::vector<float> h(n);
    for (auto &x : h) x = (float)(rng() % 2001 - 1000) * 1e-3f;
    void *d;
    OK(be->buf->alloc(be, n * 4, &d));
    OK(be->buf->upload(be, d, h.data(), n * 4));
    return (float *)d;
}

template <class F> static double time_us(F f, int reps) {
    f();
    OK(be->ops->synchronize(be));
    double t = now();
    for (int i = 0; i < reps; i++) f();
    OK(be->ops->synchronize(be));
    return (now() - t) / reps * 1e6;
}

static void bench_matmul(int type, int64_t rows, int64_t cols, const char *what) {
    size_t nb;
    void *w = weight(type, rows, cols, &nb);
    tide_matrix m = {type, rows, cols, nb, w};
    float *x = acts(64 * cols), *y = acts(64 * rows);
    for (int n : {1, 8, 32}) {
        double us = time_us([&] { OK(be->ops->matmul(be, &m, x, n, y)); }, rows > 100000 ? 20 : 200);
        double bw = nb / (us * 1e-6);
        printf("matmul %-4s %-10s %6lldx%-5lld n=%-2d %9.1f us %8.0f GB/s (%4.1f%% of HBM), %6.2f TFLOP/s\n", tn(type),
               what, (long long)rows, (long long)cols, n, us, bw / 1e9, 100 * bw / HBM,
               2.0 * rows * cols * n / (us * 1e-6) / 1e12);
    }
    be->buf->dealloc(be, w);
    be->buf->dealloc(be, x);
    be->buf->dealloc(be, y);
}

/* One MoE layer's device experts: 32 tokens x 8 routed, spread over n_jobs experts. */
static void bench_experts(int type, int n_jobs) {
    const int dim = 2048, ff = 512, n_tok = 32, used = 8;
    std::vector<tide_matrix> G(n_jobs), U(n_jobs), D(n_jobs);
    std::vector<void *> mem;
    size_t bytes = 0;
    for (int j = 0; j < n_jobs; j++) {
        size_t a, b, c;
        void *g = weight(type, ff, dim, &a), *u = weight(type, ff, dim, &b), *d = weight(type, dim, ff, &c);
        G[j] = {type, ff, dim, a, g};
        U[j] = {type, ff, dim, b, u};
        D[j] = {type, dim, ff, c, d};
        mem.push_back(g); mem.push_back(u); mem.push_back(d);
        bytes += a + b + c;
    }
    /* pairs: token t, rank k -> job (t * 7 + k * 13) % n_jobs, grouped by job */
    std::vector<std::vector<std::pair<int, int>>> by(n_jobs);
    for (int t = 0; t < n_tok; t++)
        for (int k = 0; k < used; k++) by[(t * 7 + k * 13) % n_jobs].push_back({t, t * used + k});
    std::vector<int32_t> start{0}, tok, dest;
    for (auto &v : by) {
        for (auto &p : v) { tok.push_back(p.first); dest.push_back(p.second); }
        start.push_back((int32_t)tok.size());
    }
    tide_expert_batch b = {n_jobs, G.data(), U.data(), D.data(), start.data(), tok.data(), dest.data()};
    float *x = acts((size_t)n_tok * dim), *out = acts((size_t)n_tok * used * dim);
    double us = time_us([&] { OK(be->ops->experts(be, &b, x, dim, out)); }, 50);
    double bw = bytes / (us * 1e-6);
    printf("experts %-4s %3d experts, 256 pairs      %9.1f us %8.0f GB/s (%4.1f%% of HBM)\n", tn(type), n_jobs, us,
           bw / 1e9, 100 * bw / HBM);
    for (void *p : mem) be->buf->dealloc(be, p);
    be->buf->dealloc(be, x);
    be->buf->dealloc(be, out);
}

static void bench_attention(int n_kv) {
    tide_attn_shape s = {32, n_kv - 32, n_kv, 32, 16, 4, 128, 4 * 128};
    float *q = acts((size_t)32 * 16 * 128), *k = acts((size_t)n_kv * 512), *v = acts((size_t)n_kv * 512),
          *o = acts((size_t)32 * 16 * 128);
    double us = time_us([&] { OK(be->ops->attention(be, &s, q, k, v, o)); }, 20);
    printf("attention 32 queries x %5d keys, 16/4 heads  %9.1f us (K+V %.1f MB, read %.0f GB/s from L2/HBM per block)\n",
           n_kv, us, n_kv * 512 * 8 / 1e6, 128.0 * n_kv * 1024 / (us * 1e-6) / 1e9);
    be->buf->dealloc(be, q); be->buf->dealloc(be, k); be->buf->dealloc(be, v); be->buf->dealloc(be, o);
}

int main() {
    char err[256];
    if (tide_backend_cuda_new(0, 0, &be, err, sizeof err) != TIDE_OK) {
        printf("no backend: %s\n", err);
        return 77;
    }
    for (int t : {TIDE_TYPE_BF16, TIDE_TYPE_Q8_0, TIDE_TYPE_F32}) {
        bench_matmul(t, 2048, 2048, "attn_q/out");
        bench_matmul(t, 512, 2048, "attn_k/v");
        bench_matmul(t, 5120, 2048, "dense_up");
        bench_matmul(t, 2048, 5120, "dense_down");
        if (t != TIDE_TYPE_F32) bench_matmul(t, 157184, 2048, "lm_head");
    }
    for (int t : {TIDE_TYPE_BF16, TIDE_TYPE_Q8_0})
        for (int j : {8, 64, 160}) bench_experts(t, j);
    for (int n : {1024, 4096, 16384}) bench_attention(n);
    float *l = acts((size_t)32 * 157184);
    std::vector<int32_t> tok(32);
    std::vector<float> prob(32);
    double us = time_us([&] { OK(be->ops->argmax_prob(be, l, 32, 157184, tok.data(), prob.data())); }, 50);
    printf("argmax_prob 32 x 157184 (incl. copy back)  %9.1f us %8.0f GB/s\n", us, 32 * 157184 * 4 / (us * 1e-6) / 1e9);
    be->buf->dealloc(be, l);
    be->dev->free(be);
    return 0;
}

/* test_backend_ops.cu: every op of a backend against a plain host reference, through the
 * backend tables of backend.h only (no model, no forward pass), so a kernel bug shows up here and
 * not as a wrong token three layers later (llama.cpp's test-backend-ops, for tide's ops). One
 * source, four builds, all run by `make test-native`:
 *
 *   cpu, sim   C++ over the C backends:        test_backend_ops cpu | sim
 *   emulated   the CUDA sources compiled as C++ against native/tests/emu/emu_cuda.h
 *              (-DTIDE_CUDA_EMU: threads as fibers, device memory = host memory), on any
 *              machine:                        test_backend_ops_emu cuda --quick
 *   cuda       nvcc, a real GPU; without one it prints SKIP and why, exit 77
 *
 * `--quick`: small shapes only (the emulator switches fibers at every shuffle).
 *
 * Tolerance: results are compared with a double-precision reference over the same (dequantized)
 * weights; |got - ref| <= 1e-4 * max|ref| + 1e-6 for products and attention (f32 accumulation in
 * another order), tighter for element-wise ops. Exit status 0 when everything passes.
 */
#if defined(TIDE_CUDA_EMU)
#include "emu_cuda.h"
#elif defined(TIDE_CUDA)
#include <cuda_fp16.h>
#endif
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

extern "C" {
#include "backend/backend.h"
#include "backend/cpu/kernels.h"
#include "threadpool.h"
}

#include "check.h" /* type_name; this test counts its results itself (report, below) */

static int g_fail = 0, g_pass = 0;
static std::mt19937_64 rng(1234);

static float frand() { return std::uniform_real_distribution<float>(-1.0f, 1.0f)(rng); }

#define CHECK_OK(be, call)                                                                         \
    do {                                                                                           \
        tide_status s_ = (call);                                                                   \
        if (s_ != TIDE_OK) {                                                                       \
            printf("FAIL %s:%d %s -> %d: %s\n", __FILE__, __LINE__, #call, (int)s_, (be)->err);     \
            exit(2);                                                                               \
        }                                                                                          \
    } while (0)

static void report(const char *name, double err, double scale, double tol) {
    bool ok = err <= tol * scale + 1e-6 && !isnan(err);
    printf("%s %-48s max err %.3g (scale %.3g, tol %.1g)\n", ok ? "PASS" : "FAIL", name, err, scale, tol);
    if (ok) g_pass++; else g_fail++;
}

static double compare(const std::vector<float> &got, const std::vector<double> &ref, double *scale) {
    double e = 0, s = 0;
    for (size_t i = 0; i < ref.size(); i++) {
        s = fmax(s, fabs(ref[i]));
        double d = fabs((double)got[i] - ref[i]);
        if (isnan(got[i])) d = INFINITY;
        e = fmax(e, d);
    }
    *scale = s;
    return e;
}

/* ---- host encodings of weights ---- */
static uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}
static float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
/* f16 by the core's exact conversions (round to nearest even), as the converter writes it. */
static uint16_t to_f16(float f) { return tide_f32_to_f16(f); }
static float from_f16(uint16_t u) { return tide_f16_to_f32(u); }

/* Encode rows x cols values in `type`; `deq` receives what the kernels must see. */
static std::vector<uint8_t> encode(int type, int64_t rows, int64_t cols, const std::vector<float> &v,
                                   std::vector<float> &deq) {
    std::vector<uint8_t> out;
    deq.assign(v.size(), 0.0f);
    if (type == TIDE_TYPE_F32) {
        out.resize(v.size() * 4);
        memcpy(out.data(), v.data(), out.size());
        deq = v;
    } else if (type == TIDE_TYPE_F16 || type == TIDE_TYPE_BF16) {
        out.resize(v.size() * 2);
        for (size_t i = 0; i < v.size(); i++) {
            uint16_t h = type == TIDE_TYPE_F16 ? to_f16(v[i]) : to_bf16(v[i]);
            memcpy(&out[i * 2], &h, 2);
            deq[i] = type == TIDE_TYPE_F16 ? from_f16(h) : from_bf16(h);
        }
    } else if (type != TIDE_TYPE_Q8_0) { /* q4_0, k-quants: the core's quantizer and decoder */
        size_t rb = tide_row_bytes(type, cols);
        out.resize(rb * rows);
        for (int64_t r = 0; r < rows; r++) {
            if (cpu_quantize_row(type, &v[r * cols], cols, &out[r * rb]) != TIDE_OK) {
                printf("FAIL quantizing %lld values to type %d\n", (long long)cols, type);
                exit(1);
            }
            cpu_dequantize_row(type, &out[r * rb], cols, &deq[r * cols]);
        }
    } else { /* q8_0 */
        size_t rb = (size_t)(cols / 32) * 34;
        out.resize(rb * rows);
        for (int64_t r = 0; r < rows; r++)
            for (int64_t b = 0; b < cols / 32; b++) {
                const float *x = &v[r * cols + b * 32];
                float amax = 0;
                for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(x[i]));
                float d = amax / 127.0f;
                uint16_t dh = to_f16(d);
                float dd = from_f16(dh);
                uint8_t *blk = &out[r * rb + b * 34];
                memcpy(blk, &dh, 2);
                for (int i = 0; i < 32; i++) {
                    int q = d ? (int)roundf(x[i] / d) : 0;
                    q = q > 127 ? 127 : (q < -128 ? -128 : q);
                    blk[2 + i] = (uint8_t)(int8_t)q;
                    deq[r * cols + b * 32 + i] = dd * (float)q;
                }
            }
    }
    return out;
}

static float *dev_floats(tide_backend *be, const std::vector<float> &h) {
    void *d = nullptr;
    CHECK_OK(be, be->buf->alloc(be, h.size() * 4 + 16, &d));
    if (!h.empty()) CHECK_OK(be, be->buf->upload(be, d, h.data(), h.size() * 4));
    return (float *)d;
}
/* Bytes in the backend's own memory (weights: upload_weight may keep the host pointer). */
static void *dev_bytes(tide_backend *be, const std::vector<uint8_t> &h) {
    void *d = nullptr;
    CHECK_OK(be, be->buf->alloc(be, h.size(), &d));
    CHECK_OK(be, be->buf->upload(be, d, h.data(), h.size()));
    return d;
}
static std::vector<float> get_floats(tide_backend *be, const float *d, size_t n) {
    std::vector<float> h(n);
    CHECK_OK(be, be->buf->download(be, h.data(), d, n * 4));
    return h;
}
static std::vector<float> rand_vec(size_t n, float scale = 1.0f) {
    std::vector<float> v(n);
    for (auto &x : v) x = frand() * scale;
    return v;
}

/* ---- tests ---- */
static void test_matmul(tide_backend *be, int type, int64_t rows, int64_t cols, int n, bool misalign_x) {
    std::vector<float> w = rand_vec(rows * cols), deq;
    std::vector<uint8_t> enc = encode(type, rows, cols, w, deq);
    void *wd = dev_bytes(be, enc);
    tide_matrix m = {type, rows, cols, enc.size(), wd};
    std::vector<float> x = rand_vec((size_t)n * cols + 1);
    float *xd = dev_floats(be, x);
    const float *xin = xd + (misalign_x ? 1 : 0);
    float *yd = dev_floats(be, std::vector<float>((size_t)n * rows));
    CHECK_OK(be, be->ops->matmul(be, &m, xin, n, yd));
    std::vector<float> y = get_floats(be, yd, (size_t)n * rows);
    std::vector<double> ref((size_t)n * rows);
    const float *xh = x.data() + (misalign_x ? 1 : 0);
    for (int t = 0; t < n; t++)
        for (int64_t r = 0; r < rows; r++) {
            double s = 0;
            for (int64_t c = 0; c < cols; c++) s += (double)deq[r * cols + c] * xh[t * cols + c];
            ref[(size_t)t * rows + r] = s;
        }
    double scale, e = compare(y, ref, &scale);
    char name[128];
    snprintf(name, sizeof name, "matmul %s %lldx%lld n=%d%s", type_name(type), (long long)rows, (long long)cols, n,
             misalign_x ? " (x misaligned)" : "");
    report(name, e, scale, 1e-5);
    be->buf->dealloc(be, wd);
    be->buf->dealloc(be, xd);
    be->buf->dealloc(be, yd);
}

static void test_experts(tide_backend *be, int type, int dim, int n_ff, int n_tok, int n_used, int n_expert,
                         int type_d = -1) {
    if (type_d < 0) type_d = type; /* down may be finer than gate/up (a quantization mix) */
    /* route each token to n_used distinct experts; jobs = experts with pairs, ascending id */
    std::vector<std::vector<std::pair<int, int>>> by_e(n_expert); /* (token, dest) */
    for (int t = 0; t < n_tok; t++) {
        std::vector<int> ids(n_expert);
        for (int e = 0; e < n_expert; e++) ids[e] = e;
        std::shuffle(ids.begin(), ids.end(), rng);
        for (int k = 0; k < n_used; k++) by_e[ids[k]].push_back({t, t * n_used + k});
    }
    std::vector<std::vector<float>> deq_g(n_expert), deq_u(n_expert), deq_d(n_expert);
    std::vector<tide_matrix> G, U, D;
    std::vector<int32_t> pstart{0}, ptok, pdest;
    std::vector<int> job_e;
    std::vector<void *> to_free;
    for (int e = 0; e < n_expert; e++) {
        auto gw = rand_vec((size_t)n_ff * dim), uw = rand_vec((size_t)n_ff * dim), dw = rand_vec((size_t)dim * n_ff);
        auto ge = encode(type, n_ff, dim, gw, deq_g[e]);
        auto ue = encode(type, n_ff, dim, uw, deq_u[e]);
        auto de = encode(type_d, dim, n_ff, dw, deq_d[e]);
        if (by_e[e].empty()) continue;
        void *gd = dev_bytes(be, ge), *ud = dev_bytes(be, ue), *dd = dev_bytes(be, de);
        to_free.push_back(gd); to_free.push_back(ud); to_free.push_back(dd);
        G.push_back({type, n_ff, dim, ge.size(), gd});
        U.push_back({type, n_ff, dim, ue.size(), ud});
        D.push_back({type_d, dim, n_ff, de.size(), dd});
        for (auto &p : by_e[e]) { ptok.push_back(p.first); pdest.push_back(p.second); }
        pstart.push_back((int32_t)ptok.size());
        job_e.push_back(e);
    }
    tide_expert_batch b = {(int32_t)G.size(), G.data(), U.data(), D.data(), pstart.data(), ptok.data(), pdest.data()};
    std::vector<float> x = rand_vec((size_t)n_tok * dim);
    float *xd = dev_floats(be, x);
    float *od = dev_floats(be, std::vector<float>((size_t)n_tok * n_used * dim, NAN));
    CHECK_OK(be, be->ops->experts(be, &b, xd, dim, od));
    std::vector<float> o = get_floats(be, od, (size_t)n_tok * n_used * dim);
    std::vector<double> ref((size_t)n_tok * n_used * dim);
    for (size_t j = 0; j < job_e.size(); j++) {
        int e = job_e[j];
        for (int p = pstart[j]; p < pstart[j + 1]; p++) {
            const float *xr = &x[(size_t)ptok[p] * dim];
            std::vector<double> h(n_ff);
            for (int r = 0; r < n_ff; r++) {
                double g = 0, u = 0;
                for (int c = 0; c < dim; c++) {
                    g += (double)deq_g[e][(size_t)r * dim + c] * xr[c];
                    u += (double)deq_u[e][(size_t)r * dim + c] * xr[c];
                }
                h[r] = g / (1 + exp(-g)) * u;
            }
            for (int r = 0; r < dim; r++) {
                double s = 0;
                for (int c = 0; c < n_ff; c++) s += (double)deq_d[e][(size_t)r * n_ff + c] * h[c];
                ref[(size_t)pdest[p] * dim + r] = s;
            }
        }
    }
    double scale, err = compare(o, ref, &scale);
    char name[128];
    snprintf(name, sizeof name, "experts %s%s%s dim=%d ff=%d tok=%d used=%d E=%d", type_name(type),
             type_d != type ? "/down " : "", type_d != type ? type_name(type_d) : "", dim, n_ff, n_tok, n_used,
             n_expert);
    report(name, err, scale, 1e-5);
    for (void *p : to_free) be->buf->dealloc(be, p);
    be->buf->dealloc(be, xd);
    be->buf->dealloc(be, od);
}

/* The row rule of backend.h holds on every backend: a q8_0 row that is not a whole number of
 * 32-value blocks has no layout, and matmul and experts refuse it. */
static void test_q8_0_partial_rows(tide_backend *be) {
    const int64_t rows = 4, cols = 48;
    std::vector<uint8_t> raw((size_t)rows * 34 * 2);
    void *wd = dev_bytes(be, raw);
    tide_matrix m = {TIDE_TYPE_Q8_0, rows, cols, raw.size(), wd};
    float *xd = dev_floats(be, rand_vec((size_t)cols)), *yd = dev_floats(be, rand_vec((size_t)rows));
    tide_status st = be->ops->matmul(be, &m, xd, 1, yd);
    printf("%s matmul refuses q8_0 rows of %lld values: %s\n", st != TIDE_OK ? "PASS" : "FAIL",
           (long long)cols, be->err);
    st != TIDE_OK ? g_pass++ : g_fail++;
    tide_matrix down = {TIDE_TYPE_Q8_0, cols, rows * 8, raw.size(), wd};
    tide_matrix gate = {TIDE_TYPE_Q8_0, rows * 8, cols, raw.size(), wd};
    int32_t start[2] = {0, 1}, tok[1] = {0}, dest[1] = {0};
    tide_expert_batch b = {1, &gate, &gate, &down, start, tok, dest};
    float *od = dev_floats(be, rand_vec((size_t)cols));
    st = be->ops->experts(be, &b, xd, (int32_t)cols, od);
    printf("%s experts refuse q8_0 rows of %lld values: %s\n", st != TIDE_OK ? "PASS" : "FAIL",
           (long long)cols, be->err);
    st != TIDE_OK ? g_pass++ : g_fail++;
    be->ops->synchronize(be);
    be->buf->dealloc(be, wd);
    be->buf->dealloc(be, xd);
    be->buf->dealloc(be, yd);
    be->buf->dealloc(be, od);
}

static void test_rmsnorm(tide_backend *be, int rows, int dim, bool inplace) {
    auto x = rand_vec((size_t)rows * dim, 3.0f), w = rand_vec(dim);
    float *xd = dev_floats(be, x), *wd = dev_floats(be, w);
    float *yd = inplace ? xd : dev_floats(be, std::vector<float>((size_t)rows * dim));
    CHECK_OK(be, be->ops->rmsnorm(be, xd, wd, rows, dim, 1e-6f, yd));
    auto y = get_floats(be, yd, (size_t)rows * dim);
    std::vector<double> ref((size_t)rows * dim);
    for (int r = 0; r < rows; r++) {
        double ss = 0;
        for (int i = 0; i < dim; i++) ss += (double)x[r * dim + i] * x[r * dim + i];
        double inv = 1.0 / sqrt(ss / dim + 1e-6);
        for (int i = 0; i < dim; i++) ref[r * dim + i] = x[r * dim + i] * inv * w[i];
    }
    double scale, e = compare(y, ref, &scale);
    char name[96];
    snprintf(name, sizeof name, "rmsnorm rows=%d dim=%d%s", rows, dim, inplace ? " in place" : "");
    report(name, e, scale, 1e-5);
    be->buf->dealloc(be, xd);
    be->buf->dealloc(be, wd);
    if (!inplace) be->buf->dealloc(be, yd);
}

static void test_rope(tide_backend *be, int n_tok, int n_head, int hd, int rope_dim, int pos0, int64_t stride) {
    auto x = rand_vec((size_t)n_tok * stride);
    float *xd = dev_floats(be, x);
    CHECK_OK(be, be->ops->rope(be, xd, n_tok, stride, n_head, hd, rope_dim, pos0, 600000.0f));
    auto y = get_floats(be, xd, x.size());
    std::vector<double> ref(x.begin(), x.end());
    int half = rope_dim / 2;
    for (int t = 0; t < n_tok; t++)
        for (int h = 0; h < n_head; h++)
            for (int j = 0; j < half; j++) {
                float inv = (float)(1.0 / pow(600000.0, 2.0 * j / rope_dim));
                float ang = (float)(pos0 + t) * inv;
                double c = cos((double)ang), s = sin((double)ang);
                size_t o = (size_t)t * stride + (size_t)h * hd;
                double x0 = x[o + j], x1 = x[o + j + half];
                ref[o + j] = x0 * c - x1 * s;
                ref[o + j + half] = x1 * c + x0 * s;
            }
    double scale, e = compare(y, ref, &scale);
    char name[96];
    snprintf(name, sizeof name, "rope tok=%d heads=%d hd=%d rot=%d pos0=%d", n_tok, n_head, hd, rope_dim, pos0);
    /* the angle pos * inv_freq is an f32: an ulp of inv_freq (powf differs by one between
     * libraries) moves it by pos * 2^-24 relative, which grows with the position */
    report(name, e, scale, 1e-5 + (pos0 + n_tok) * 6e-8);
    be->buf->dealloc(be, xd);
}

/* kv_type f16/bf16: K and V stored through the backend's convert op (the KV cache's store);
 * the reference reads the host-rounded values, so it also checks the op's rounding. */
static void test_attention(tide_backend *be, int n_q, int q_pos0, int n_kv, int B, int nh, int nkv, int hd,
                           int32_t kv_type = TIDE_TYPE_F32) {
    tide_attn_shape s = {n_q, q_pos0, n_kv, B, nh, nkv, hd, (int64_t)nkv * hd + 3, kv_type};
    auto q = rand_vec((size_t)n_q * nh * hd, 2.0f), k = rand_vec((size_t)n_kv * s.kv_stride, 2.0f),
         v = rand_vec((size_t)n_kv * s.kv_stride);
    float *qd = dev_floats(be, q), *kd = dev_floats(be, k), *vd = dev_floats(be, v);
    float *od = dev_floats(be, std::vector<float>((size_t)n_q * nh * hd));
    const void *kx = kd, *vx = vd;
    void *kh = nullptr, *vh = nullptr;
    if (kv_type != TIDE_TYPE_F32) {
        const size_t n = k.size();
        CHECK_OK(be, be->buf->alloc(be, n * 2, &kh));
        CHECK_OK(be, be->buf->alloc(be, n * 2, &vh));
        CHECK_OK(be, be->ops->convert(be, kd, (int64_t)n, kv_type, kh));
        CHECK_OK(be, be->ops->convert(be, vd, (int64_t)n, kv_type, vh));
        kx = kh;
        vx = vh;
        for (auto *h : {&k, &v})
            for (auto &x : *h) {
                if (kv_type == TIDE_TYPE_F16) {
                    x = from_f16(to_f16(x));
                } else {
                    uint32_t u = (uint32_t)to_bf16(x) << 16;
                    memcpy(&x, &u, 4);
                }
            }
    }
    CHECK_OK(be, be->ops->attention(be, &s, qd, kx, vx, od));
    auto o = get_floats(be, od, (size_t)n_q * nh * hd);
    std::vector<double> ref((size_t)n_q * nh * hd);
    int G = nh / nkv;
    for (int i = 0; i < n_q; i++)
        for (int h = 0; h < nh; h++) {
            int kh = h / G, pos = q_pos0 + i;
            int lim = std::min(n_kv, (pos / B + 1) * B);
            std::vector<double> sc(lim);
            double mx = -INFINITY;
            for (int j = 0; j < lim; j++) {
                double d = 0;
                for (int c = 0; c < hd; c++)
                    d += (double)q[((size_t)i * nh + h) * hd + c] * k[(size_t)j * s.kv_stride + kh * hd + c];
                sc[j] = d / sqrt((double)hd);
                mx = fmax(mx, sc[j]);
            }
            double sum = 0;
            for (int j = 0; j < lim; j++) sum += (sc[j] = exp(sc[j] - mx));
            for (int c = 0; c < hd; c++) {
                double acc = 0;
                for (int j = 0; j < lim; j++) acc += sc[j] * v[(size_t)j * s.kv_stride + kh * hd + c];
                ref[((size_t)i * nh + h) * hd + c] = acc / sum;
            }
        }
    double scale, e = compare(o, ref, &scale);
    char name[128];
    snprintf(name, sizeof name, "attention q=%d@%d kv=%d B=%d heads=%d/%d hd=%d%s", n_q, q_pos0, n_kv, B, nh, nkv, hd,
             kv_type == TIDE_TYPE_F16 ? " f16 kv" : kv_type == TIDE_TYPE_BF16 ? " bf16 kv" : "");
    report(name, e, scale, 1e-5);
    /* a query alone at its position gives the bits it gets in the batch (row determinism: what
     * makes a multi-block commit write the cache a commit per block writes) */
    bool same = true;
    const size_t row = (size_t)nh * hd;
    for (int i = 0; i < n_q && same; i += (n_q > 8 ? n_q / 8 : 1)) {
        tide_attn_shape one = s;
        one.n_q = 1;
        one.q_pos0 = q_pos0 + i;
        float *q1 = dev_floats(be, std::vector<float>(q.begin() + i * row, q.begin() + (i + 1) * row));
        float *o1 = dev_floats(be, std::vector<float>(row));
        CHECK_OK(be, be->ops->attention(be, &one, q1, kx, vx, o1));
        auto got = get_floats(be, o1, row);
        same = memcmp(got.data(), o.data() + i * row, row * sizeof(float)) == 0;
        be->buf->dealloc(be, q1);
        be->buf->dealloc(be, o1);
    }
    snprintf(name, sizeof name, "attention q=%d@%d kv=%d: a query alone == in the batch", n_q, q_pos0, n_kv);
    report(name, same ? 0.0 : INFINITY, 1.0, 0.0);
    be->buf->dealloc(be, qd);
    be->buf->dealloc(be, kd);
    be->buf->dealloc(be, vd);
    be->buf->dealloc(be, od);
    if (kh) be->buf->dealloc(be, kh);
    if (vh) be->buf->dealloc(be, vh);
}

static void test_elementwise(tide_backend *be) {
    const int n_tok = 7, n_used = 3, dim = 100;
    int64_t n = (int64_t)n_tok * dim;
    auto a = rand_vec(n), b = rand_vec(n);
    float *ad = dev_floats(be, a), *bd = dev_floats(be, b);
    CHECK_OK(be, be->ops->add(be, ad, bd, n));
    auto r = get_floats(be, ad, n);
    std::vector<double> ref(n);
    for (int64_t i = 0; i < n; i++) ref[i] = (double)a[i] + b[i];
    double scale, e = compare(r, ref, &scale);
    report("add", e, scale, 1e-6);

    CHECK_OK(be, be->buf->upload(be, ad, a.data(), n * 4));
    CHECK_OK(be, be->ops->silu_mul(be, ad, bd, n));
    r = get_floats(be, ad, n);
    for (int64_t i = 0; i < n; i++) ref[i] = a[i] / (1 + exp(-(double)a[i])) * b[i];
    e = compare(r, ref, &scale);
    report("silu_mul", e, scale, 1e-6);

    std::vector<int32_t> rows = {6, 0, 3, 3, 5};
    float *gd = dev_floats(be, std::vector<float>(rows.size() * dim));
    CHECK_OK(be, be->buf->upload(be, ad, a.data(), n * 4));
    CHECK_OK(be, be->ops->gather_rows(be, gd, ad, rows.data(), (int32_t)rows.size(), dim));
    auto g = get_floats(be, gd, rows.size() * dim);
    std::vector<double> gref(rows.size() * dim);
    for (size_t i = 0; i < rows.size(); i++)
        for (int d = 0; d < dim; d++) gref[i * dim + d] = a[(size_t)rows[i] * dim + d];
    e = compare(g, gref, &scale);
    report("gather_rows", e, scale, 0);

    auto pairs = rand_vec((size_t)n_tok * n_used * dim), w = rand_vec((size_t)n_tok * n_used);
    float *pd = dev_floats(be, pairs);
    CHECK_OK(be, be->buf->upload(be, ad, a.data(), n * 4));
    CHECK_OK(be, be->ops->moe_combine(be, pd, w.data(), n_tok, n_used, dim, ad));
    r = get_floats(be, ad, n);
    for (int t = 0; t < n_tok; t++)
        for (int d = 0; d < dim; d++) {
            double s = 0;
            for (int k = 0; k < n_used; k++) s += (double)w[t * n_used + k] * pairs[((size_t)t * n_used + k) * dim + d];
            ref[(size_t)t * dim + d] = a[(size_t)t * dim + d] + s;
        }
    e = compare(r, ref, &scale);
    report("moe_combine", e, scale, 1e-6);
    be->buf->dealloc(be, ad);
    be->buf->dealloc(be, bd);
    be->buf->dealloc(be, gd);
    be->buf->dealloc(be, pd);
}

static void test_argmax(tide_backend *be, int n, int n_vocab, bool misalign) {
    auto l = rand_vec((size_t)n * n_vocab + 1, 8.0f);
    const int off = misalign ? 1 : 0;
    /* ties: row 0 gets two equal maxima, the first must win */
    if (n_vocab > 10) {
        l[off + 3] = 50.0f;
        l[off + n_vocab - 2] = 50.0f;
    }
    float *ld = dev_floats(be, l);
    std::vector<int32_t> tok(n);
    std::vector<float> prob(n);
    CHECK_OK(be, be->ops->argmax_prob(be, ld + off, n, n_vocab, tok.data(), prob.data()));
    int bad = 0;
    double perr = 0;
    for (int r = 0; r < n; r++) {
        const float *x = &l[off + (size_t)r * n_vocab];
        int best = 0;
        for (int i = 1; i < n_vocab; i++)
            if (x[i] > x[best]) best = i;
        double s = 0;
        for (int i = 0; i < n_vocab; i++) s += exp((double)x[i] - x[best]);
        if (tok[r] != best) bad++;
        perr = fmax(perr, fabs(prob[r] - 1.0 / s) / (1.0 / s));
    }
    char name[96];
    snprintf(name, sizeof name, "argmax_prob n=%d vocab=%d%s (tokens wrong: %d)", n, n_vocab,
             misalign ? " misaligned" : "", bad);
    /* host softmax: a vector exp within 2 ulp per term, summed over up to 157184 terms */
    report(name, bad ? 1.0 : perr, 1, 5e-5);
    be->buf->dealloc(be, ld);
}

static void test_transfers(tide_backend *be) {
    const size_t n = (size_t)20 << 20; /* 20 MiB: three staging chunks */
    static std::vector<uint8_t> host(n + 8192); /* stays registered until the backend is freed */
    uint8_t *src = (uint8_t *)(((uintptr_t)host.data() + 4095) & ~(uintptr_t)4095);
    for (size_t i = 0; i < n; i++) src[i] = (uint8_t)(i * 2654435761u >> 13);
    void *d1, *d2;
    CHECK_OK(be, be->buf->alloc(be, n, &d1));
    CHECK_OK(be, be->buf->alloc(be, n, &d2));
    /* unregistered: staging path */
    CHECK_OK(be, be->buf->upload_async(be, d1, src, n));
    int32_t f1;
    CHECK_OK(be, be->buf->transfer_fence(be, &f1));
    /* registered: direct path */
    CHECK_OK(be, be->buf->pin_host(be, src, n));
    CHECK_OK(be, be->buf->upload_async(be, d2, src, n));
    int32_t f2;
    CHECK_OK(be, be->buf->transfer_fence(be, &f2));
    CHECK_OK(be, be->buf->compute_wait_fence(be, f1));
    CHECK_OK(be, be->buf->compute_wait_fence(be, f2));
    std::vector<uint8_t> back(n);
    CHECK_OK(be, be->buf->download(be, back.data(), d1, n));
    report("upload_async staging + fence", memcmp(back.data(), src, n) ? 1.0 : 0.0, 1, 0);
    CHECK_OK(be, be->buf->download(be, back.data(), d2, n));
    report("upload_async registered + fence", memcmp(back.data(), src, n) ? 1.0 : 0.0, 1, 0);
    CHECK_OK(be, be->buf->transfer_sync(be));
    CHECK_OK(be, be->ops->synchronize(be));
    be->buf->dealloc(be, d1);
    be->buf->dealloc(be, d2);
    /* many small uploads through the arena, interleaved with compute, must all land */
    std::vector<float> vals(1000);
    float *vd = dev_floats(be, std::vector<float>(1000 * 64));
    for (int it = 0; it < 1000; it++) {
        for (int i = 0; i < 64; i++) vals[i] = (float)(it * 64 + i);
        CHECK_OK(be, be->buf->upload(be, vd + it * 64, vals.data(), 64 * 4));
    }
    auto all = get_floats(be, vd, 1000 * 64);
    int bad = 0;
    for (int i = 0; i < 64000; i++) bad += all[i] != (float)i;
    report("1000 small uploads (arena ring)", bad, 1, 0);
    be->buf->dealloc(be, vd);
}

#ifdef TIDE_CUDA
static void test_cuda_oom() {
    char err[256];
    tide_backend *be = nullptr;
    tide_status st = tide_backend_cuda_new(0, 64ull << 20, &be, err, sizeof err);
    if (st != TIDE_OK) {
        printf("FAIL oom: backend with 64 MiB: %s\n", err);
        g_fail++;
        return;
    }
    void *p = nullptr;
    st = be->buf->alloc(be, 128ull << 20, &p);
    bool ok = st == TIDE_ERR_DEVICE && strstr(be->err, "device out of memory: needed 128.0 MiB") &&
              strstr(be->err, "free") && strstr(be->err, "budget 64.0 MiB");
    printf("%s oom message: %s\n", ok ? "PASS" : "FAIL", be->err);
    ok ? g_pass++ : g_fail++;
    uint64_t f = 0, t = 0;
    CHECK_OK(be, be->dev->mem_free(be, &f, &t));
    ok = t == (64ull << 20) && f < t;
    printf("%s mem_free within budget: free %llu total %llu\n", ok ? "PASS" : "FAIL", (unsigned long long)f,
           (unsigned long long)t);
    ok ? g_pass++ : g_fail++;
    be->dev->free(be);
}
#endif

/* The simulated device runs out of memory with a message that names the numbers. */
static void test_sim_oom(tide_pool *pool) {
    tide_backend *be = nullptr;
    if (tide_backend_sim_new(pool, 64ull << 20, &be) != TIDE_OK) {
        printf("FAIL oom: sim backend with 64 MiB\n");
        g_fail++;
        return;
    }
    void *p = nullptr;
    tide_status st = be->buf->alloc(be, 128ull << 20, &p);
    bool ok = st == TIDE_ERR_DEVICE && strstr(be->err, "simulated device out of memory") &&
              strstr(be->err, "67108864");
    printf("%s oom message: %s\n", ok ? "PASS" : "FAIL", be->err);
    ok ? g_pass++ : g_fail++;
    be->dev->free(be);
}

static int usage() {
    printf("usage: test_backend_ops cpu|sim|cuda [--quick]\n");
    return 2;
}

int main(int argc, char **argv) {
    if (argc < 2) return usage();
    const char *name = argv[1];
    /* --quick: small shapes only (the CPU emulator in CI switches fibers at every shuffle) */
    const bool quick = argc > 2 && strcmp(argv[2], "--quick") == 0;
    char err[256];
    tide_backend *be = nullptr;
    tide_pool *pool = nullptr;
    if (strcmp(name, "cuda") == 0) {
#ifdef TIDE_CUDA
        if (!tide_backend_cuda_available(err, sizeof err)) {
            printf("SKIP no CUDA GPU: %s\n", err);
            return 77;
        }
        if (tide_backend_cuda_new(0, 0, &be, err, sizeof err) != TIDE_OK) {
            printf("FAIL tide_backend_cuda_new: %s\n", err);
            return 1;
        }
#else
        printf("SKIP this build has no CUDA backend\n");
        return 77;
#endif
    } else if (strcmp(name, "cpu") == 0 || strcmp(name, "sim") == 0) {
        if (tide_pool_new(2, &pool) != TIDE_OK) return 1;
        tide_status st = name[0] == 'c' ? tide_backend_cpu_new(pool, &be)
                                        : tide_backend_sim_new(pool, 0, &be);
        if (st != TIDE_OK) {
            printf("FAIL creating the %s backend\n", name);
            return 1;
        }
    } else {
        return usage();
    }
    printf("backend %s%s\n", be->dev->name, quick ? " (quick)" : "");
    const int types[4] = {TIDE_TYPE_F32, TIDE_TYPE_F16, TIDE_TYPE_BF16, TIDE_TYPE_Q8_0};
    const int block_types[4] = {TIDE_TYPE_Q4_0, TIDE_TYPE_Q4_K, TIDE_TYPE_Q5_K, TIDE_TYPE_Q6_K};
#ifdef TIDE_CUDA_EMU
    const int big_rows = 300, big_cols = 512, tall_rows = 2000;
#else
    const int big_rows = 3000, big_cols = 2048, tall_rows = 70000;
#endif
    for (int t : types) {
        if (!quick) {
            test_matmul(be, t, big_rows, big_cols, 32, false);
            test_matmul(be, t, tall_rows, 256, 5, false);
            test_experts(be, t, 256, 64, 32, 8, 40);
        }
        test_matmul(be, t, 37, 64, 1, false);
        test_matmul(be, t, 21, 2048, 9, false); /* 4 warps split the columns */
        test_matmul(be, t, 129, 96, 13, true);
        if (t != TIDE_TYPE_Q8_0) test_matmul(be, t, 33, 44, 9, false); /* cols not a multiple of 8 */
        test_experts(be, t, 64, 32, 3, 2, 4);
        test_experts(be, t, 128, 64, 6, 4, 9);
    }
    for (int t : block_types) { /* rows of whole 256-value blocks */
        if (!quick) {
            test_matmul(be, t, big_rows, big_cols, 32, false);
            test_experts(be, t, 512, 256, 32, 8, 40);
        }
        test_matmul(be, t, 37, 256, 1, false);
        test_matmul(be, t, 21, 2048, 9, false);
        test_matmul(be, t, 129, 512, 13, true);
        test_experts(be, t, 256, 256, 3, 2, 4);
    }
    test_matmul(be, TIDE_TYPE_Q4_0, 9, 96, 5, false); /* q4_0: 32-value blocks */
    test_experts(be, TIDE_TYPE_Q4_K, 256, 256, 6, 4, 9, TIDE_TYPE_Q6_K); /* the q4_k_m experts */
    test_experts(be, TIDE_TYPE_Q5_K, 256, 512, 5, 2, 4, TIDE_TYPE_Q6_K);
    test_q8_0_partial_rows(be);
    test_rmsnorm(be, quick ? 4 : 32, 2048, false);
    test_rmsnorm(be, quick ? 16 : 512, 128, true);
    test_rmsnorm(be, 3, 50, false);
    test_rope(be, quick ? 4 : 32, 16, 128, 64, 4000, 16 * 128 + 8 * 128);
    test_rope(be, 5, 4, 16, 8, 0, 64);
    if (!quick) {
        test_attention(be, 32, 64, 96, 32, 16, 4, 128);
        test_attention(be, 32, 2048, 2080, 32, 32, 4, 128); /* flash-like: 8 query heads per kv head */
    }
    test_attention(be, 32, 0, 32, 32, 4, 4, 16);
    test_attention(be, 7, 3, 10, 1, 8, 2, 64); /* causal */
    test_attention(be, 4, 30, 33, 8, 2, 1, 40);
    test_attention(be, 3, 17, 20, 4, 16, 2, 128);
    test_attention(be, 40, 600, 640, 32, 8, 2, 64); /* a prefill micro-batch after a long cache */
    test_attention(be, 256, 0, 256, 32, 16, 2, 32); /* enough chunks for 16 rows a block (cuda) */
    test_attention(be, 40, 600, 640, 32, 8, 2, 64, TIDE_TYPE_F16); /* half-precision KV caches */
    test_attention(be, 7, 3, 10, 1, 8, 2, 128, TIDE_TYPE_BF16);
    test_elementwise(be);
    test_argmax(be, quick ? 2 : 32, 157184, false);
    test_argmax(be, 3, 1001, true);
    test_argmax(be, 1, 5, false);
    test_transfers(be);
    CHECK_OK(be, be->ops->synchronize(be));
    be->dev->free(be);
#ifdef TIDE_CUDA
    if (strcmp(name, "cuda") == 0) test_cuda_oom();
#endif
    if (strcmp(name, "sim") == 0) test_sim_oom(pool);
    tide_pool_free(pool);
    printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}

/* cpu_internal.h: helpers shared by the files of native/src/cpu/ only (not part of kernels.h).
 * The canonical dot-product order lives here: every kernel that reduces over a row uses it. */
#ifndef TIDE_CPU_INTERNAL_H
#define TIDE_CPU_INTERNAL_H

#include "backend/cpu/kernels.h"
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TIDE_X86 1
#define TIDE_AVX2 __attribute__((target("avx2,fma,f16c")))
/* compilers that know the AMX and AVX512-BF16 intrinsics (gcc 11, clang 12); where the CPU has
 * them is a run-time question (tide_cpu_features.amx) */
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11)
#define TIDE_AMX 1
#endif
#endif
#define TIDE_INLINE static inline __attribute__((always_inline))

/* A set of token rows for the matmul core: row t of x is x + (x_idx ? x_idx[t] : t) * x_stride,
 * row t of y likewise; y[t][r] = dot(W[r], x[t]). */
typedef struct {
    const float *x;
    int64_t x_stride;
    const int32_t *x_idx;
    float *y;
    int64_t y_stride;
    const int32_t *y_idx;
    int32_t n;
} cpu_tokens;

/* A weight matrix seen as rows of `cols` values of `type`, row i at data + i * rb (rb may exceed
 * tide_row_bytes: e.g. the keys of one KV head in a KV cache row). */
typedef struct {
    int32_t type;
    const char *data;
    size_t rb;
    int64_t cols;
} cpu_wview;

/* One thread: rows [r0, r1) of w against every token of ts (matmul.c). */
void cpu_matmul_view_rows(const tide_cpu_features *f, const cpu_wview *w, int64_t r0, int64_t r1,
                          const cpu_tokens *ts);
/* One thread: rows [r0, r1) of w against every token of ts (matmul.c). w is valid. */
void cpu_matmul_rows(const tide_cpu_features *f, const tide_matrix *w, int64_t r0, int64_t r1,
                     const cpu_tokens *ts);
#ifdef TIDE_X86
/* A row of w (cols values of type) as f32, the values every path uses (matmul.c). */
void cpu_decode_row_avx2(int32_t type, const char *row, int64_t cols, float *out);
#endif
#ifdef TIDE_AMX
/* cpu_matmul on AMX tiles where tide_cpu_features.amx says so (matmul_amx.c); w valid, n > 0. */
tide_status cpu_matmul_amx(tide_pool *pool, const tide_matrix *w, const float *x, int32_t n,
                           float *y);
#endif
/* Argument check shared by matmul and experts: type, cols, data. */
int cpu_matrix_ok(const tide_matrix *w);

/* The fixed horizontal sum of 8 lanes: ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)). */
TIDE_INLINE float cpu_hsum8_scalar(const float l[8]) {
    float a0 = l[0] + l[4], a1 = l[1] + l[5], a2 = l[2] + l[6], a3 = l[3] + l[7];
    float b0 = a0 + a2, b1 = a1 + a3;
    return b0 + b1;
}

#ifdef TIDE_X86
TIDE_AVX2 TIDE_INLINE float cpu_hsum8_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
/* Lanes [0, n) of p, zeros above (n in 0..8). */
TIDE_AVX2 TIDE_INLINE __m256 cpu_load_partial_avx2(const float *p, int n) {
    static const int32_t m[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return _mm256_maskload_ps(p, _mm256_loadu_si256((const __m256i *)(m + 8 - n)));
}
/* exp(x) for f32 lanes, x <= 0 typical (softmax); relative error ~2 ulp; exp(-inf) = 0, large
 * negative flushes to 0. Cody-Waite range reduction and a degree-6 polynomial. */
TIDE_AVX2 TIDE_INLINE __m256 cpu_exp_avx2(__m256 x) {
    const __m256 hi = _mm256_set1_ps(88.0f), lo = _mm256_set1_ps(-87.3365447504f);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    __m256 x2 = _mm256_mul_ps(x, x);
    y = _mm256_fmadd_ps(y, x2, _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(under, y);
}
#endif

#endif /* TIDE_CPU_INTERNAL_H */

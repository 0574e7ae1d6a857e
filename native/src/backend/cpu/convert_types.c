/* convert_types.c: f16/bf16 <-> f32, q8_0 rows, row sizes, embedding lookup. */
#include "backend/cpu/kernels.h"
#include "backend/blocks.h"

#include <math.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TIDE_X86 1
#endif

_Static_assert(sizeof(tide_block_q8_0) == TIDE_Q8_0_BLOCK_BYTES, "block_q8_0 must be 34 bytes as in ggml");

int tide_type_valid(int32_t type) {
    int64_t elems;
    size_t bytes;
    tide_type_block(type, &elems, &bytes);
    return elems > 0;
}

/* Values [i0, i0 + n) of a row of a block type, decoded by blocks.h's rule (scalar). */
void cpu_block_values(int32_t type, const void *row, int64_t i0, int n, float *out) {
    const uint8_t *r = row;
    for (int l = 0; l < n; l++) {
        int64_t i = i0 + l;
        switch (type) {
        case TIDE_TYPE_Q4_0:
            out[l] = tide_q4_0_value(r + (i >> 5) * TIDE_Q4_0_BLOCK_BYTES, (int)(i & 31));
            break;
        case TIDE_TYPE_Q4_K:
            out[l] = tide_q4_k_value(r + (i >> 8) * TIDE_Q4_K_BLOCK_BYTES, (int)(i & 255));
            break;
        case TIDE_TYPE_Q5_K:
            out[l] = tide_q5_k_value(r + (i >> 8) * TIDE_Q5_K_BLOCK_BYTES, (int)(i & 255));
            break;
        case TIDE_TYPE_Q6_K:
            out[l] = tide_q6_k_value(r + (i >> 8) * TIDE_Q6_K_BLOCK_BYTES, (int)(i & 255));
            break;
        default: {
            const tide_block_q8_0 *b = (const tide_block_q8_0 *)row + (i >> 5);
            out[l] = tide_f16_to_f32(b->d) * (float)b->qs[i & 31];
        }
        }
    }
}

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static inline float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float tide_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    if (exp == 0x1f) /* inf / NaN (keep the payload) */
        return bits_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        if (man == 0)
            return bits_f32(sign);
        /* subnormal: man * 2^-24, exact in f32 */
        float v = (float)man * 0x1p-24f;
        return sign ? -v : v;
    }
    return bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

uint16_t tide_f32_to_f16(float f) {
    uint32_t x = f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) /* NaN: quiet, keep the top payload bits */
        return (uint16_t)(sign | 0x7e00 | ((ax >> 13) & 0x3ff));
    if (ax >= 0x477ff000u) /* >= 65520 rounds to inf */
        return (uint16_t)(sign | 0x7c00);
    if (ax < 0x38800000u) { /* below the smallest normal 2^-14: subnormal or zero */
        if (ax < 0x33000000u) /* < 2^-25: rounds to zero (2^-25 exactly ties to even 0) */
            return sign;
        uint32_t e = ax >> 23;           /* biased f32 exponent, 102..112 */
        uint32_t m = (ax & 0x7fffff) | 0x800000;
        uint32_t shift = 126 - e;        /* value = m * 2^(e-150); f16 units 2^-24 */
        uint32_t q = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1);
        uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1)))
            q++;
        return (uint16_t)(sign | q);
    }
    /* normal: rebias and round the 13 dropped bits to nearest even (carry may reach inf: ok) */
    uint32_t r = ax - 0x38000000u; /* exponent -112 */
    uint32_t q = r >> 13;
    uint32_t rem = r & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (q & 1)))
        q++;
    return (uint16_t)(sign | q);
}

float tide_bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

uint16_t tide_f32_to_bf16(float f) {
    uint32_t x = f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) /* NaN: quiet it, never round to inf */
        return (uint16_t)((x >> 16) | 0x40);
    x += 0x7fffu + ((x >> 16) & 1); /* round to nearest even */
    return (uint16_t)(x >> 16);
}

/* ---- rows ---------------------------------------------------------------------------------- */
#ifdef TIDE_X86
__attribute__((target("avx2,fma,f16c"))) static void f16_to_f32_avx2(const uint16_t *x, float *y,
                                                                      int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i))));
    for (; i < n; i++)
        y[i] = tide_f16_to_f32(x[i]);
}
__attribute__((target("avx2,fma,f16c"))) static void f32_to_f16_avx2(const float *x, uint16_t *y,
                                                                      int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128((__m128i *)(y + i), h);
    }
    for (; i < n; i++)
        y[i] = tide_f32_to_f16(x[i]);
}
__attribute__((target("avx2,fma,f16c"))) static void bf16_to_f32_avx2(const uint16_t *x, float *y,
                                                                       int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(x + i)));
        _mm256_storeu_ps(y + i, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
    }
    for (; i < n; i++)
        y[i] = tide_bf16_to_f32(x[i]);
}
#endif

void cpu_f16_to_f32_row(const tide_cpu_features *f, const uint16_t *x, float *y, int64_t n) {
#ifdef TIDE_X86
    if (f && f->avx2) {
        f16_to_f32_avx2(x, y, n);
        return;
    }
#endif
    for (int64_t i = 0; i < n; i++)
        y[i] = tide_f16_to_f32(x[i]);
}

void cpu_f32_to_f16_row(const tide_cpu_features *f, const float *x, uint16_t *y, int64_t n) {
#ifdef TIDE_X86
    if (f && f->avx2) {
        /* vcvtps2ph quiets NaNs the same way only for quiet inputs; the scalar path is the
         * reference. Finite values and infinities convert identically. */
        f32_to_f16_avx2(x, y, n);
        return;
    }
#endif
    for (int64_t i = 0; i < n; i++)
        y[i] = tide_f32_to_f16(x[i]);
}

void cpu_bf16_to_f32_row(const tide_cpu_features *f, const uint16_t *x, float *y, int64_t n) {
#ifdef TIDE_X86
    if (f && f->avx2) {
        bf16_to_f32_avx2(x, y, n);
        return;
    }
#endif
    for (int64_t i = 0; i < n; i++)
        y[i] = tide_bf16_to_f32(x[i]);
}

void cpu_f32_to_bf16_row(const tide_cpu_features *f, const float *x, uint16_t *y, int64_t n) {
    (void)f; /* the scalar loop vectorizes well enough; bf16 writes are rare (tests, tools) */
    for (int64_t i = 0; i < n; i++)
        y[i] = tide_f32_to_bf16(x[i]);
}

/* One row to f32 with the features given (cpuid is slow in a VM: not once per row). */
static void row_to_f32(const tide_cpu_features *fp, int32_t type, const void *row, int64_t cols,
                       float *out) {
    tide_cpu_features f = *fp;
    switch (type) {
    case TIDE_TYPE_F32: memcpy(out, row, (size_t)cols * 4); break;
    case TIDE_TYPE_F16: cpu_f16_to_f32_row(&f, row, out, cols); break;
    case TIDE_TYPE_BF16: cpu_bf16_to_f32_row(&f, row, out, cols); break;
    default: cpu_dequantize_row(type, row, cols, out); break;
    }
}

void cpu_dequantize_row(int32_t type, const void *row, int64_t cols, float *out) {
    switch (type) {
    case TIDE_TYPE_F32: memcpy(out, row, (size_t)cols * 4); break;
    case TIDE_TYPE_F16: cpu_f16_to_f32_row(NULL, row, out, cols); break;
    case TIDE_TYPE_BF16: cpu_bf16_to_f32_row(NULL, row, out, cols); break;
    default:
        for (int64_t i = 0; i < cols; i += 256) {
            int n = cols - i < 256 ? (int)(cols - i) : 256;
            cpu_block_values(type, row, i, n, out + i);
        }
    }
}

tide_status cpu_quantize_row_q8_0(const float *x, int64_t cols, void *out) {
    if (!x || !out || cols < 0 || cols % TIDE_QK8_0)
        return TIDE_ERR_ARG;
    tide_block_q8_0 *b = out;
    for (int64_t i = 0; i < cols / TIDE_QK8_0; i++) {
        const float *xb = x + i * TIDE_QK8_0;
        float amax = 0.0f;
        for (int j = 0; j < TIDE_QK8_0; j++) {
            float a = fabsf(xb[j]);
            if (a > amax)
                amax = a;
        }
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = tide_f32_to_f16(d);
        for (int j = 0; j < TIDE_QK8_0; j++)
            b[i].qs[j] = (int8_t)roundf(xb[j] * id); /* half away from zero, as ggml/numpy's np_roundf */
    }
    return TIDE_OK;
}

typedef struct {
    tide_cpu_features f;
    const tide_matrix *w;
    const int32_t *rows;
    float *out;
    size_t rb;
} get_rows_job;

static void get_rows_range(void *p, int64_t b, int64_t e) {
    get_rows_job *j = p;
    for (int64_t i = b; i < e; i++)
        row_to_f32(&j->f, j->w->type, (const char *)j->w->data + (size_t)j->rows[i] * j->rb,
                   j->w->cols, j->out + i * j->w->cols);
}

tide_status cpu_get_rows(tide_pool *pool, const tide_matrix *w, const int32_t *rows, int32_t n,
                         float *out) {
    if (!w || (n > 0 && (!rows || !out || !w->data)) || n < 0)
        return TIDE_ERR_ARG;
    size_t rb = tide_row_bytes(w->type, w->cols);
    if (rb == 0 || !tide_type_valid(w->type))
        return TIDE_ERR_ARG;
    for (int32_t i = 0; i < n; i++)
        if (rows[i] < 0 || rows[i] >= w->rows)
            return TIDE_ERR_ARG;
    get_rows_job j = {tide_pool_features(pool), w, rows, out, rb};
    tide_pool_for(pool, n, get_rows_range, &j);
    return TIDE_OK;
}

/* quantize.c: f32 rows -> q4_0, q4_k, q5_k, q6_k (and the plain types), in ggml's layouts.
 *
 * The search each type makes for its scales is ggml's reference quantizer (the path llama.cpp's
 * quantizer takes without an importance matrix), written here operation for operation in f32 with
 * no contraction and no reassociation, so the bytes are the same as ggml's: the same quality by
 * construction, and a file quantized here or by llama-quantize is the same file. Rounding to the
 * nearest integer is round-half-even (the magic-number addition, as ggml rounds), f16 scales
 * are tide_f32_to_f16 (round to nearest even).
 *
 * Threads split rows (tide_pool_for); a row's bytes never depend on the thread count.
 */
#include "backend/blocks.h"
#include "backend/cpu/kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define EPS_ALL_ZERO 1e-15f /* a group whose largest |x| is below this is all zeros */

/* Round to nearest, ties to even, for |v| < 2^22: adding 1.5 * 2^23 leaves the rounded integer
 * in the low mantissa bits (the FPU rounds the addition); no libm call, as fast as a cast. */
static inline int round_int(float v) {
    float t = v + 12582912.f;
    int32_t i;
    memcpy(&i, &t, 4);
    return (i & 0x007fffff) - 0x00400000;
}
static inline int clampi(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

/* ---- q4_0 ------------------------------------------------------------------------------------ */
static void q4_0_row(const float *x, int64_t cols, uint8_t *y) {
    for (int64_t i = 0; i < cols / 32; i++, x += 32, y += TIDE_Q4_0_BLOCK_BYTES) {
        float amax = 0.0f, max = 0.0f; /* the value of largest magnitude, its sign kept */
        for (int j = 0; j < 32; j++)
            if (amax < fabsf(x[j])) {
                amax = fabsf(x[j]);
                max = x[j];
            }
        float d = max / -8;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        uint16_t dh = tide_f32_to_f16(d);
        memcpy(y, &dh, 2);
        for (int j = 0; j < 16; j++) {
            int lo = (int8_t)(x[j] * id + 8.5f), hi = (int8_t)(x[j + 16] * id + 8.5f);
            y[2 + j] = (uint8_t)((lo < 15 ? lo : 15) | ((hi < 15 ? hi : 15) << 4));
        }
    }
}

/* ---- the scale/min search of q4_k, q5_k ------------------------------------------------------ */
/* Fit x[0..n) ~ scale * L - min_neg (L in 0..nmax) with weights w: start from the range, then
 * try nstep+1 stretched grids and keep the one of least weighted squared error (each with its
 * own least-squares scale and min). Returns scale; *min_out = the min (>= 0, subtracted). */
static float fit_scale_min(int n, int nmax, const float *x, const float *w, uint8_t *L,
                           float *min_out, float rmin, float rdelta, int nstep) {
    uint8_t Laux[32];
    float lo = x[0], hi = x[0], sum_w = w[0], sum_x = sum_w * x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] < lo) lo = x[i];
        if (x[i] > hi) hi = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (lo > 0) lo = 0;
    if (hi == lo) {
        memset(L, 0, (size_t)n);
        *min_out = -lo;
        return 0.0f;
    }
    float iscale = nmax / (hi - lo), scale = 1 / iscale, best = 0;
    for (int i = 0; i < n; i++) {
        L[i] = (uint8_t)clampi(round_int(iscale * (x[i] - lo)), 0, nmax);
        float diff = scale * L[i] + lo - x[i];
        best += w[i] * (diff * diff);
    }
    for (int is = 0; is <= nstep; is++) {
        iscale = (rmin + rdelta * is + nmax) / (hi - lo);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; i++) {
            int l = clampi(round_int(iscale * (x[i] - lo)), 0, nmax);
            Laux[i] = (uint8_t)l;
            sum_l += w[i] * l;
            sum_l2 += w[i] * l * l;
            sum_xl += w[i] * l * x[i];
        }
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float s = (sum_w * sum_xl - sum_x * sum_l) / D;
            float m = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (m > 0) {
                m = 0;
                s = sum_xl / sum_l2;
            }
            float err = 0;
            for (int i = 0; i < n; i++) {
                float diff = s * Laux[i] + m - x[i];
                err += w[i] * (diff * diff);
            }
            if (err < best) {
                memcpy(L, Laux, (size_t)n);
                best = err;
                scale = s;
                lo = m;
            }
        }
    }
    *min_out = -lo;
    return scale;
}

/* Pack the 6-bit scale and min of sub-block j into a k-quant's 12 scale bytes (the inverse of
 * tide_k4_scale_min). */
static void k4_pack(uint8_t *s, int j, int ls, int lm) {
    if (j < 4) {
        s[j] = (uint8_t)ls;
        s[j + 4] = (uint8_t)lm;
    } else {
        s[j + 4] = (uint8_t)((ls & 0xF) | ((lm & 0xF) << 4));
        s[j - 4] |= (uint8_t)((ls >> 4) << 6);
        s[j] |= (uint8_t)((lm >> 4) << 6);
    }
}

/* One 256-value super-block of q4_k (nmax 15) or q5_k (nmax 31): L gets the final quants. */
static void k_min_block(const float *x, int nmax, uint8_t *blk, uint8_t L[256]) {
    float scales[8], mins[8], w[32], max_scale = 0, max_min = 0;
    const float rmin = nmax == 15 ? -1.0f : -0.5f;
    const int nstep = nmax == 15 ? 20 : 15;
    for (int j = 0; j < 8; j++) {
        const float *xs = x + 32 * j;
        float sum_x2 = 0;
        for (int l = 0; l < 32; l++) sum_x2 += xs[l] * xs[l];
        float av_x = sqrtf(sum_x2 / 32);
        for (int l = 0; l < 32; l++) w[l] = av_x + fabsf(xs[l]);
        scales[j] = fit_scale_min(32, nmax, xs, w, L + 32 * j, &mins[j], rmin, 0.1f, nstep);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    uint8_t *s = blk + TIDE_K_OFF_SCALES;
    memset(s, 0, 12);
    for (int j = 0; j < 8; j++) {
        uint8_t ls = (uint8_t)round_int(inv_scale * scales[j]), lm = (uint8_t)round_int(inv_min * mins[j]);
        k4_pack(s, j, ls < 63 ? ls : 63, lm < 63 ? lm : 63);
    }
    uint16_t dh = tide_f32_to_f16(max_scale / 63.f), mh = tide_f32_to_f16(max_min / 63.f);
    memcpy(blk, &dh, 2);
    memcpy(blk + 2, &mh, 2);
    /* requantize against the stored (rounded) scales */
    for (int j = 0; j < 8; j++) {
        int sc, m;
        tide_k4_scale_min(j, s, &sc, &m);
        float d = tide_f16_to_f32(dh) * sc;
        if (d == 0.0f) continue;
        float dm = tide_f16_to_f32(mh) * m;
        for (int l = 0; l < 32; l++)
            L[32 * j + l] = (uint8_t)clampi(round_int((x[32 * j + l] + dm) / d), 0, nmax);
    }
}

static void q4_k_row(const float *x, int64_t cols, uint8_t *y) {
    uint8_t L[256];
    for (int64_t i = 0; i < cols / 256; i++, x += 256, y += TIDE_Q4_K_BLOCK_BYTES) {
        k_min_block(x, 15, y, L);
        uint8_t *q = y + TIDE_Q4K_OFF_QS;
        for (int g = 0; g < 4; g++)
            for (int l = 0; l < 32; l++)
                q[32 * g + l] = (uint8_t)(L[64 * g + l] | (L[64 * g + l + 32] << 4));
    }
}

static void q5_k_row(const float *x, int64_t cols, uint8_t *y) {
    uint8_t L[256];
    for (int64_t i = 0; i < cols / 256; i++, x += 256, y += TIDE_Q5_K_BLOCK_BYTES) {
        k_min_block(x, 31, y, L);
        uint8_t *qh = y + TIDE_Q5K_OFF_QH, *ql = y + TIDE_Q5K_OFF_QS;
        memset(qh, 0, 32);
        for (int g = 0; g < 4; g++)
            for (int l = 0; l < 32; l++) {
                int a = L[64 * g + l], b = L[64 * g + l + 32];
                if (a > 15) { a -= 16; qh[l] |= (uint8_t)(1u << (2 * g)); }
                if (b > 15) { b -= 16; qh[l] |= (uint8_t)(1u << (2 * g + 1)); }
                ql[32 * g + l] = (uint8_t)(a | (b << 4));
            }
    }
}

/* ---- q6_k ------------------------------------------------------------------------------------ */
/* Symmetric fit of 16 values to L - nmax (L in 0..2 nmax - 1), weights x^2: the scale from the
 * largest magnitude, refined by least squares over 18 nearby grids. Returns the scale. */
static float fit_scale_sym(int n, int nmax, const float *x, int8_t *L) {
    float max = 0, amax = 0;
    for (int i = 0; i < n; i++)
        if (fabsf(x[i]) > amax) {
            amax = fabsf(x[i]);
            max = x[i];
        }
    if (amax < EPS_ALL_ZERO) {
        memset(L, 0, (size_t)n);
        return 0.f;
    }
    float iscale = -nmax / max, sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; i++) {
        int l = clampi(round_int(iscale * x[i]), -nmax, nmax - 1);
        L[i] = (int8_t)(l + nmax);
        float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    float scale = suml2 != 0 ? sumlx / suml2 : 0.0f, best = scale * sumlx;
    for (int is = -9; is <= 9; is++) {
        if (is == 0) continue;
        iscale = -(nmax + 0.1f * is) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; i++) {
            int l = clampi(round_int(iscale * x[i]), -nmax, nmax - 1);
            float w = x[i] * x[i];
            sumlx += w * x[i] * l;
            suml2 += w * l * l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; i++)
                L[i] = (int8_t)(nmax + clampi(round_int(iscale * x[i]), -nmax, nmax - 1));
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

static void q6_k_row(const float *x, int64_t cols, uint8_t *y) {
    int8_t L[256];
    float scales[16];
    for (int64_t i = 0; i < cols / 256; i++, x += 256, y += TIDE_Q6_K_BLOCK_BYTES) {
        float max_scale = 0, max_abs = 0;
        for (int ib = 0; ib < 16; ib++) {
            scales[ib] = fit_scale_sym(16, 32, x + 16 * ib, L + 16 * ib);
            if (fabsf(scales[ib]) > max_abs) {
                max_abs = fabsf(scales[ib]);
                max_scale = scales[ib];
            }
        }
        memset(y, 0, TIDE_Q6_K_BLOCK_BYTES);
        if (max_abs < EPS_ALL_ZERO) continue; /* all zeros: d = 0 */
        float iscale = -128.f / max_scale;
        uint16_t dh = tide_f32_to_f16(1 / iscale);
        memcpy(y + TIDE_Q6K_OFF_D, &dh, 2);
        int8_t *sc = (int8_t *)(y + TIDE_Q6K_OFF_SCALES);
        for (int ib = 0; ib < 16; ib++) {
            int v = round_int(iscale * scales[ib]);
            sc[ib] = (int8_t)(v < 127 ? v : 127);
        }
        for (int j = 0; j < 16; j++) {
            float d = tide_f16_to_f32(dh) * sc[j];
            if (d == 0.0f) continue;
            for (int l = 0; l < 16; l++)
                L[16 * j + l] = (int8_t)(clampi(round_int(x[16 * j + l] / d), -32, 31) + 32);
        }
        for (int n = 0; n < 2; n++) {
            uint8_t *ql = y + 64 * n, *qh = y + TIDE_Q6K_OFF_QH + 32 * n;
            const int8_t *Ln = L + 128 * n;
            for (int l = 0; l < 32; l++) {
                int a = Ln[l], b = Ln[l + 32], c = Ln[l + 64], e = Ln[l + 96];
                ql[l] = (uint8_t)((a & 0xF) | ((c & 0xF) << 4));
                ql[l + 32] = (uint8_t)((b & 0xF) | ((e & 0xF) << 4));
                qh[l] = (uint8_t)((a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6));
            }
        }
    }
}

/* ---- rows ------------------------------------------------------------------------------------ */
tide_status cpu_quantize_row(int32_t type, const float *x, int64_t cols, void *out) {
    if (!x || !out || tide_row_bytes(type, cols) == 0)
        return TIDE_ERR_ARG;
    switch (type) {
    case TIDE_TYPE_F32: memcpy(out, x, (size_t)cols * 4); return TIDE_OK;
    case TIDE_TYPE_F16: cpu_f32_to_f16_row(NULL, x, out, cols); return TIDE_OK;
    case TIDE_TYPE_BF16: cpu_f32_to_bf16_row(NULL, x, out, cols); return TIDE_OK;
    case TIDE_TYPE_Q8_0: return cpu_quantize_row_q8_0(x, cols, out);
    case TIDE_TYPE_Q4_0: q4_0_row(x, cols, out); return TIDE_OK;
    case TIDE_TYPE_Q4_K: q4_k_row(x, cols, out); return TIDE_OK;
    case TIDE_TYPE_Q5_K: q5_k_row(x, cols, out); return TIDE_OK;
    case TIDE_TYPE_Q6_K: q6_k_row(x, cols, out); return TIDE_OK;
    default: return TIDE_ERR_ARG;
    }
}

typedef struct {
    int32_t dst_type, src_type;
    const char *src;
    size_t src_rb, dst_rb;
    int64_t cols;
    char *dst;
    int failed; /* a thread could not get its scratch row */
} quantize_job;

static void quantize_range(void *p, int64_t r0, int64_t r1) {
    quantize_job *j = p;
    float *tmp = j->src_type == TIDE_TYPE_F32 ? NULL : malloc((size_t)j->cols * sizeof(float));
    if (j->src_type != TIDE_TYPE_F32 && !tmp) {
        __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    for (int64_t r = r0; r < r1; r++) {
        const char *s = j->src + (size_t)r * j->src_rb;
        const float *x = (const float *)s;
        if (tmp) {
            cpu_dequantize_row(j->src_type, s, j->cols, tmp);
            x = tmp;
        }
        cpu_quantize_row(j->dst_type, x, j->cols, j->dst + (size_t)r * j->dst_rb);
    }
    free(tmp);
}

tide_status cpu_quantize(tide_pool *pool, int32_t dst_type, int32_t src_type, const void *src,
                         int64_t rows, int64_t cols, void *dst) {
    size_t src_rb = tide_row_bytes(src_type, cols), dst_rb = tide_row_bytes(dst_type, cols);
    if (rows < 0 || src_rb == 0 || dst_rb == 0 || (rows > 0 && (!src || !dst)))
        return TIDE_ERR_ARG;
    quantize_job j = {dst_type, src_type, src, src_rb, dst_rb, cols, dst, 0};
    tide_pool_for(pool, rows, quantize_range, &j);
    return j.failed ? TIDE_ERR_NOMEM : TIDE_OK;
}

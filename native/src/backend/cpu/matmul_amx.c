/* matmul_amx.c: the dense matmul (cpu_matmul) on AMX tiles, as accurate as f32.
 *
 * Why: a 32-row step's lm_head (157184 x 2048, 20.6 GFLOP) on f32 FMAs is most of that step on a
 * CPU, and Sapphire Rapids' tile unit multiplies bf16 pairs into f32 sums at about 8x the FMA
 * rate. bf16 alone would drop 16 of f32's 24 bits, so every f32 value v (a weight, decoded to f32
 * exactly as the other paths decode it, or an activation) is split into three bf16 parts,
 * v = v1 + v2 + v3 exactly. Activations (split once per call): v1 = v rounded to nearest bf16,
 * v2 = (v - v1) rounded, v3 the rest (|v2| <= 2^-8 |v|, |v3| <= 2^-17 |v|, at most 7 bits: exact).
 * Weights (split once per weight per call, where the ops count): each part the rest truncated to
 * its top 8 significant bits (|w2| < 2^-7 |w|, |w3| < 2^-15 |w|, at most 8 bits: exact). w . x is
 * then the sum of the part products wi xj with i + j <= 4: six of the nine, the three left out
 * (w2 x3, w3 x2, w3 x3) together below 2^-22 |w x|, a few units of f32's rounding. Each product
 * is exact in f32 and the tile unit sums in f32, so a dot carries f32's rounding, in another order
 * than the FMA paths: not their bits (docs/CONTRACTS.md, numerics).
 *
 * Row-deterministic: each output is its row's and its token's dot in one fixed order (chunks of
 * 32 columns, the six products in a fixed order), whatever the batch, the rows beside it or the
 * threads. Every weight type goes through it, decoded to f32 first, so a quantized matrix still
 * equals the f32 matrix of its dequantized values bit for bit. bf16 takes a shortcut that keeps
 * this: its value is its own first part and the other two are zeros, so whole panels of whole
 * chunks load their A tiles from the weights as stored and sum only the three products of the
 * first part (matmul_amx_thread): no decode, no split, half the tile work. The tile unit treats
 * subnormal bf16 inputs as zero and flushes subnormal sums (parts below 2^-126); an inf weight
 * or activation gives NaN (inf - inf in the split; an inf bf16 weight, not split, inf or NaN).
 *
 * Layout: A = a panel of 16 weight rows (the three part planes, row-major bf16), B = 16 tokens'
 * activations in the tile unit's pair layout (B[p][t] = the parts of x[t][2p], x[t][2p + 1]),
 * built once per call for all threads; C = 16 rows x 16 tokens of f32 sums, two token groups at a
 * time: 2 C + 3 A + 3 B tiles, the eight tile registers.
 */
#include "backend/cpu/cpu_internal.h"

#include "backend/cpu/decode_simd.h"

#include <stdlib.h>

#ifdef TIDE_AMX
#define TIDE_AMX_FN \
    __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")))

enum {
    AMX_ROWS = 16, /* weight rows of an A and a C tile */
    AMX_COLS = 32, /* columns (bf16) of an A tile row: 64 bytes */
    AMX_TOK = 16,  /* tokens of a B and a C tile */
    AMX_PARTS = 3, /* bf16 parts of an f32 value */
    AMX_TILE = AMX_ROWS * AMX_COLS, /* bf16 of a 1 KiB A or B tile */
};

/* The tile registers' shapes (palette 1): all eight 16 rows of 64 bytes. */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

TIDE_AMX_FN TIDE_INLINE __m512 bf16x16_to_f32(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* 32 f32 activations (a: 0-15, b: 16-31) as three vectors of 32 bf16 parts, in order, each
 * part rounded to nearest from the rest. */
TIDE_AMX_FN TIDE_INLINE void split_x(__m512 a, __m512 b, __m512i out[AMX_PARTS]) {
    for (int p = 0; p < AMX_PARTS - 1; p++) {
        __m512i h = (__m512i)_mm512_cvtne2ps_pbh(b, a);
        out[p] = h;
        a = _mm512_sub_ps(a, bf16x16_to_f32(_mm512_castsi512_si256(h)));
        b = _mm512_sub_ps(b, bf16x16_to_f32(_mm512_extracti64x4_epi64(h, 1)));
    }
    out[AMX_PARTS - 1] = (__m512i)_mm512_cvtne2ps_pbh(b, a);
}

/* The same for 32 weights, each part truncated from the rest (the top 16 bits of the f32 rest:
 * half the ops of split_x, which matters here, once per weight per call). */
TIDE_AMX_FN TIDE_INLINE void split_w(__m512 a, __m512 b, __m512i out[AMX_PARTS]) {
    const __m512i hi16 = _mm512_set1_epi32((int)0xffff0000u);
    const __m512i odd = _mm512_setr_epi32(0x30001, 0x70005, 0xb0009, 0xf000d, 0x130011, 0x170015,
                                          0x1b0019, 0x1f001d, 0x230021, 0x270025, 0x2b0029,
                                          0x2f002d, 0x330031, 0x370035, 0x3b0039, 0x3f003d);
    for (int p = 0; p < AMX_PARTS; p++) {
        __m512 ha = a, hb = b;
        if (p < AMX_PARTS - 1) {
            ha = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), hi16));
            hb = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(b), hi16));
            a = _mm512_sub_ps(a, ha);
            b = _mm512_sub_ps(b, hb);
        }
        out[p] = _mm512_permutex2var_epi16(_mm512_castps_si512(ha), odd, _mm512_castps_si512(hb));
    }
}

typedef struct {
    const tide_matrix *w;
    const float *x;
    int32_t n;
    float *y;
    int64_t kpad;   /* cols rounded up to AMX_COLS; the columns above cols are zeros */
    size_t rb;      /* bytes of a weight row */
    int64_t ps;     /* a part plane's row stride (bf16): kpad and one 64-byte line, so that the
                     * 16 rows of an A tile do not share one L1 set when kpad is a power of 2 */
    int32_t groups; /* token groups of AMX_TOK; the tokens above n are zeros */
    uint16_t *xb;   /* B tiles: [group][chunk][part] */
    char *scratch;  /* per thread: the f32 row, a C tile, a panel's part planes */
    size_t scratch_bytes;
} amx_job;

static inline uint16_t *b_tile(const amx_job *j, int64_t g, int64_t kc, int part) {
    return j->xb + ((g * (j->kpad / AMX_COLS) + kc) * AMX_PARTS + part) * AMX_TILE;
}

/* Tokens [t0, t1) of x into B tiles: the parts of x[t][2p..2p+1] at row p, column t % 16. */
TIDE_AMX_FN static void build_b(amx_job *j, int64_t t0, int64_t t1) {
    const int64_t cols = j->w->cols, nkc = j->kpad / AMX_COLS;
    const __m512i rows = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(AMX_TOK));
    for (int64_t t = t0; t < t1; t++) {
        const float *xt = j->x + t * cols;
        for (int64_t kc = 0; kc < nkc; kc++) {
            int64_t c = kc * AMX_COLS, left = cols - c;
            __mmask16 ma = left >= 16 ? 0xffff : (__mmask16)((1u << (left > 0 ? left : 0)) - 1);
            __mmask16 mb = left >= 32 ? 0xffff
                                      : (__mmask16)((1u << (left > 16 ? left - 16 : 0)) - 1);
            __m512i parts[AMX_PARTS];
            split_x(_mm512_maskz_loadu_ps(ma, xt + c), _mm512_maskz_loadu_ps(mb, xt + c + 16), parts);
            for (int p = 0; p < AMX_PARTS; p++)
                _mm512_i32scatter_epi32((int *)b_tile(j, t / AMX_TOK, kc, p) + t % AMX_TOK, rows,
                                        parts[p], 4);
        }
    }
}

static void build_b_thread(void *p, int ith, int nth) {
    amx_job *j = p;
    int64_t t0, t1;
    tide_chunk(j->n, ith, nth, &t0, &t1);
    if (t0 < t1)
        build_b(j, t0, t1);
}

/* A k-quant row's part planes without the f32 row between: 32 values at a time (a q4_k / q5_k
 * sub-block, half a q6_k group of 64), decoded as decode_simd.h's block decoders decode them (the
 * same quants and scales, the same one rounding), then split in registers. */
TIDE_AMX_FN static void kquant_row_planes(int32_t type, const uint8_t *row, int64_t cols,
                                          uint16_t *p0, int64_t plane) {
    const size_t bb = dec_block_bytes(type);
    for (int64_t blk = 0; blk < cols / 256; blk++) {
        const uint8_t *b = row + blk * bb;
        float d = tide_blk_f16(type == TIDE_TYPE_Q6_K ? b + TIDE_Q6K_OFF_D : b);
        float dmin = type == TIDE_TYPE_Q6_K ? 0.0f : tide_blk_f16(b + 2);
        for (int j = 0; j < 8; j++) {
            __m512 lo, hi;
            if (type == TIDE_TYPE_Q6_K) {
                const int8_t *sc = (const int8_t *)(b + TIDE_Q6K_OFF_SCALES);
                __m256i q = q6_k_quants32_avx2(b, j / 4, j % 4);
                lo = _mm512_mul_ps(_mm512_set1_ps(d * (float)sc[2 * j]),
                                   _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))));
                hi = _mm512_mul_ps(_mm512_set1_ps(d * (float)sc[2 * j + 1]),
                                   _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1))));
            } else {
                int sc, m;
                tide_k4_scale_min(j, b + TIDE_K_OFF_SCALES, &sc, &m);
                __m256i q = k_min_quants32_avx2(b, j, type == TIDE_TYPE_Q5_K);
                __m512 D = _mm512_set1_ps(d * (float)sc), M = _mm512_set1_ps(dmin * (float)m);
                lo = _mm512_fmsub_ps(D, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(q))), M);
                hi = _mm512_fmsub_ps(D, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(q, 1))), M);
            }
            __m512i parts[AMX_PARTS];
            split_w(lo, hi, parts);
            for (int p = 0; p < AMX_PARTS; p++)
                _mm512_store_si512(p0 + p * plane + blk * 256 + 32 * j, parts[p]);
        }
    }
}

/* Row r (< 16) of the panel at r0 with nr valid rows, decoded and split into the three part
 * planes [part][16][ps] of `planes`; a row at or above nr is zeros. */
TIDE_AMX_FN static void build_a_row(const amx_job *j, int64_t r0, int64_t nr, int64_t r, float *row,
                                    uint16_t *planes) {
    const tide_matrix *w = j->w;
    const int64_t kpad = j->kpad;
    if (r >= nr) {
        for (int p = 0; p < AMX_PARTS; p++)
            memset(planes + (p * AMX_ROWS + r) * j->ps, 0, (size_t)kpad * 2);
        return;
    }
    const size_t rb = j->rb;
    if (w->type == TIDE_TYPE_Q4_K || w->type == TIDE_TYPE_Q5_K || w->type == TIDE_TYPE_Q6_K) {
        kquant_row_planes(w->type, (const uint8_t *)w->data + (size_t)(r0 + r) * rb, w->cols,
                          planes + r * j->ps, AMX_ROWS * j->ps);
        return;
    }
    cpu_decode_row_avx2(w->type, (const char *)w->data + (size_t)(r0 + r) * rb, w->cols, row);
    for (int64_t c = 0; c < kpad; c += AMX_COLS) {
        __m512i parts[AMX_PARTS];
        split_w(_mm512_load_ps(row + c), _mm512_load_ps(row + c + 16), parts);
        for (int p = 0; p < AMX_PARTS; p++)
            _mm512_store_si512(planes + (p * AMX_ROWS + r) * j->ps + c, parts[p]);
    }
}

/* A C tile stored in cbuf (rows r0.., the tokens of group g) to y: its valid rows and tokens. */
TIDE_AMX_FN static void store_c(const amx_job *j, float *cbuf, int64_t r0, int64_t nr, int64_t g) {
    const int64_t rows = j->w->rows;
    for (int64_t t = g * AMX_TOK; t < j->n && t < (g + 1) * AMX_TOK; t++)
        for (int64_t r = 0; r < nr; r++)
            j->y[t * rows + r0 + r] = cbuf[r * AMX_TOK + t % AMX_TOK];
}

/* One chunk of 32 columns of the six part products into C tile `C` from B tiles of group g. A
 * macro: tile numbers are immediates. Smallest products first. SPLIT 0: a bf16 panel as stored
 * (A tile 2 only), whose second and third parts are zeros: the three products that are not,
 * in the same order. */
#define AMX_CHUNK(C, SPLIT)                                                                       \
    do {                                                                                          \
        _tile_loadd(5, b_tile(j, g, kc, 0), 64);                                                  \
        _tile_loadd(6, b_tile(j, g, kc, 1), 64);                                                  \
        _tile_loadd(7, b_tile(j, g, kc, 2), 64);                                                  \
        if (SPLIT) {                                                                              \
            _tile_dpbf16ps(C, 4, 5);                                                              \
            _tile_dpbf16ps(C, 3, 6);                                                              \
        }                                                                                         \
        _tile_dpbf16ps(C, 2, 7);                                                                  \
        if (SPLIT)                                                                                \
            _tile_dpbf16ps(C, 3, 5);                                                              \
        _tile_dpbf16ps(C, 2, 6);                                                                  \
        _tile_dpbf16ps(C, 2, 5);                                                                  \
    } while (0)

/* The thread's panels of 16 rows: each decoded and split, then its products with every token
 * group, two groups at a time. (Decoding the next panel a row at a time between this one's
 * products gained nothing: the tile unit's products and the vector ops hardly overlap here.) */
TIDE_AMX_FN static void matmul_amx_thread(void *p, int ith, int nth) {
    amx_job *j = p;
    const int64_t rows = j->w->rows, nkc = j->kpad / AMX_COLS;
    int64_t b0, b1;
    tide_chunk((rows + AMX_ROWS - 1) / AMX_ROWS, ith, nth, &b0, &b1);
    if (b0 >= b1)
        return;
    char *s = j->scratch + (size_t)ith * j->scratch_bytes;
    float *row = (float *)s, *cbuf = row + j->kpad;
    uint16_t *planes = (uint16_t *)(cbuf + AMX_ROWS * AMX_TOK);
    const uint16_t *a0 = planes, *a1 = a0 + AMX_ROWS * j->ps, *a2 = a1 + AMX_ROWS * j->ps;
    for (int64_t c = j->w->cols; c < j->kpad; c++)
        row[c] = 0.0f;

    amx_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
    const size_t stride = (size_t)j->ps * 2;
    /* bf16 panels as stored (top of file): only rows of whole chunks, so a tile reads nothing
     * past a row's end. */
    const int bf16_rows = j->w->type == TIDE_TYPE_BF16 && j->w->cols == j->kpad;
    for (int64_t pb = b0; pb < b1; pb++) {
        int64_t r0 = pb * AMX_ROWS, nr = rows - r0 < AMX_ROWS ? rows - r0 : AMX_ROWS;
        const int as_stored = bf16_rows && nr == AMX_ROWS;
        const char *wa = (const char *)j->w->data + (size_t)r0 * j->rb;
        for (int64_t r = 0; r < AMX_ROWS && !as_stored; r++)
            build_a_row(j, r0, nr, r, row, planes);
        for (int64_t g0 = 0; g0 < j->groups; g0 += 2) {
            int two = g0 + 1 < j->groups;
            _tile_zero(0);
            _tile_zero(1);
            for (int64_t kc = 0; kc < nkc; kc++) {
                if (as_stored) {
                    _tile_loadd(2, wa + kc * AMX_COLS * 2, j->rb);
                } else {
                    _tile_loadd(2, a0 + kc * AMX_COLS, stride);
                    _tile_loadd(3, a1 + kc * AMX_COLS, stride);
                    _tile_loadd(4, a2 + kc * AMX_COLS, stride);
                }
                int64_t g = g0;
                AMX_CHUNK(0, !as_stored);
                if (two) {
                    g = g0 + 1;
                    AMX_CHUNK(1, !as_stored);
                }
            }
            _tile_stored(0, cbuf, AMX_TOK * sizeof(float));
            store_c(j, cbuf, r0, nr, g0);
            if (two) {
                _tile_stored(1, cbuf, AMX_TOK * sizeof(float));
                store_c(j, cbuf, r0, nr, g0 + 1);
            }
        }
    }
    _tile_release();
}

tide_status cpu_matmul_amx(tide_pool *pool, const tide_matrix *w, const float *x, int32_t n,
                           float *y) {
    int64_t kpad = (w->cols + AMX_COLS - 1) / AMX_COLS * AMX_COLS;
    amx_job j = {w, x, n, y, kpad, tide_row_bytes(w->type, w->cols), kpad + AMX_COLS,
                 (n + AMX_TOK - 1) / AMX_TOK, NULL, NULL, 0};
    size_t xb_bytes = (size_t)j.groups * (size_t)j.kpad * AMX_TOK * AMX_PARTS * 2;
    j.scratch_bytes = ((size_t)j.kpad * sizeof(float) + AMX_ROWS * AMX_TOK * sizeof(float) +
                       (size_t)AMX_PARTS * AMX_ROWS * j.ps * 2 + 63) / 64 * 64;
    size_t total = xb_bytes + (size_t)tide_pool_size(pool) * j.scratch_bytes;
    char *buf = aligned_alloc(64, total);
    if (!buf)
        return TIDE_ERR_NOMEM;
    j.xb = (uint16_t *)buf;
    j.scratch = buf + xb_bytes;
    if (n % AMX_TOK) /* the last group's tokens above n: zero columns */
        memset(b_tile(&j, j.groups - 1, 0, 0), 0, xb_bytes / (size_t)j.groups);
    tide_pool_run(pool, build_b_thread, &j);
    tide_pool_run(pool, matmul_amx_thread, &j);
    free(buf);
    return TIDE_OK;
}
#endif /* TIDE_AMX */

/* matmul.c: y[t][r] = dot(W[r], x[t]) for every weight type, and the canonical f32 dot.
 *
 * Memory-bound by design: a group of 4 weight rows is loaded (and expanded to f32) once per chunk
 * of 8 columns and used for up to 4 tokens in registers; the 4 rows stay in L1/L2 while the
 * other tokens of the block pass. Every (row, token) dot has its own accumulator and the
 * canonical order of cpu_internal.h, so tiling never changes a bit.
 */
#include "backend/cpu/cpu_internal.h"
#include "backend/cpu/decode_simd.h"

#include <stdlib.h>

int cpu_matrix_ok(const tide_matrix *w) {
    if (!w || !tide_type_valid(w->type) || w->rows < 0 || w->cols < 1)
        return 0;
    if (tide_row_bytes(w->type, w->cols) == 0)
        return 0;
    return w->rows == 0 || w->data != NULL;
}

/* ---- scalar path ---------------------------------------------------------------------------- */
/* Weights c*8 .. c*8+7 (those < cols) as f32; returns how many are valid. */
static inline int w_chunk_scalar(int32_t type, const char *row, int64_t cols, int64_t c,
                                 float w[8]) {
    int64_t i0 = c * 8;
    int n = cols - i0 < 8 ? (int)(cols - i0) : 8;
    switch (type) {
    case TIDE_TYPE_F32:
        memcpy(w, (const float *)row + i0, (size_t)n * 4);
        break;
    case TIDE_TYPE_F16:
        for (int l = 0; l < n; l++)
            w[l] = tide_f16_to_f32(((const uint16_t *)row)[i0 + l]);
        break;
    case TIDE_TYPE_BF16:
        for (int l = 0; l < n; l++)
            w[l] = tide_bf16_to_f32(((const uint16_t *)row)[i0 + l]);
        break;
    default:
        cpu_block_values(type, row, i0, n, w);
        break;
    }
    return n;
}

/* One weight row against nt (<= 4) tokens. */
static void tile_scalar(int32_t type, const char *row, int64_t cols, const float *const *xs,
                        int nt, float *out) {
    float lanes[4][8] = {{0}};
    int64_t nc = (cols + 7) / 8;
    for (int64_t c = 0; c < nc; c++) {
        float w[8];
        int n = w_chunk_scalar(type, row, cols, c, w);
        for (int t = 0; t < nt; t++) {
            const float *x = xs[t] + c * 8;
            for (int l = 0; l < n; l++)
                lanes[t][l] += w[l] * x[l];
        }
    }
    for (int t = 0; t < nt; t++)
        out[t] = cpu_hsum8_scalar(lanes[t]);
}

static void matmul_rows_scalar(const cpu_wview *w, int64_t r0, int64_t r1, const cpu_tokens *ts,
                               int32_t t0, int32_t t1) {
    for (int64_t r = r0; r < r1; r++) {
        const char *row = w->data + (size_t)r * w->rb;
        for (int32_t t = t0; t < t1; t += 4) {
            int nt = t1 - t < 4 ? t1 - t : 4;
            const float *xs[4];
            float out[4];
            for (int i = 0; i < nt; i++)
                xs[i] = ts->x + (int64_t)(ts->x_idx ? ts->x_idx[t + i] : t + i) * ts->x_stride;
            tile_scalar(w->type, row, w->cols, xs, nt, out);
            for (int i = 0; i < nt; i++)
                ts->y[(int64_t)(ts->y_idx ? ts->y_idx[t + i] : t + i) * ts->y_stride + r] = out[i];
        }
    }
}

float cpu_dot_f32(const tide_cpu_features *f, const float *a, const float *b, int64_t n);

/* ---- AVX2 path ------------------------------------------------------------------------------ */
#ifdef TIDE_X86
/* Weights of full chunk c (8 values) as f32. */
TIDE_AVX2 TIDE_INLINE __m256 w_chunk_avx2(int32_t type, const char *row, int64_t c) {
    switch (type) {
    case TIDE_TYPE_F16:
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + c * 8)));
    case TIDE_TYPE_BF16: {
        __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + c * 8)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    }
    case TIDE_TYPE_Q8_0: {
        const tide_block_q8_0 *b = (const tide_block_q8_0 *)row + (c >> 2);
        __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b->qs + (c & 3) * 8)));
        float d = _cvtsh_ss(b->d);
        return _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(q));
    }
    default:
        return _mm256_loadu_ps((const float *)row + c * 8);
    }
}

/* The zero-padded last chunk of a row whose cols % 8 != 0 (f32, f16, bf16 only). */
TIDE_AVX2 TIDE_INLINE __m256 w_tail_avx2(int32_t type, const char *row, int64_t c, int n) {
    if (type == TIDE_TYPE_F32)
        return cpu_load_partial_avx2((const float *)row + c * 8, n);
    uint16_t tmp[8] = {0};
    memcpy(tmp, (const uint16_t *)row + c * 8, (size_t)n * 2);
    if (type == TIDE_TYPE_F16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)tmp));
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)tmp));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

/* Share `step` of n_steps of a streaming tile's prefetch: `bytes` from `next` (the rows after the
 * tile's, which are contiguous with them), the first `tile` of them (the next tile) into L1, the
 * rest (the tile after it) into L2. A tile that streams its rows spreads this over its blocks or
 * chunks, so each tile's rows reach L2 two tiles ahead and L1 one tile ahead. The hardware
 * prefetcher alone lags: each row is a separate stream, too short for it to catch when rows are
 * 512 values (measured on the 2048x512 expert matrices: q8_0 from 5 to 14 GB/s with 2 threads). Two
 * levels because an L1 prefetch holds one of the core's few L1 miss buffers until its line comes
 * from DRAM, which capped the lines in flight, while the L1 prefetch of lines already in L2 is
 * short. One token's experts of a layer (bench_quant, 2 threads, AVX-512), against the tile after
 * next into L1 alone and fetched past a matrix's end: bf16 20.3-20.5 -> 22.7 GB/s, q6_k 15.9-16.1 ->
 * 17.2-17.4, q4_k 13.3-13.5 -> 17.8-18.0 (bench/results/quant_kernels_avx512.txt); on the AVX2
 * path (the next tile into L1 before) bf16 and q8_0 gain 10%, the decode-bound k-quants 0-10%. */
TIDE_INLINE void prefetch_share(const char *next, size_t bytes, size_t tile, int64_t n_steps,
                                int64_t step) {
    if (!bytes)
        return;
    /* each step the same share of both tiles, line l of the next and line l of the one after (all
     * of the next tile's lines first, then the other's, cost q4_k 15%: the L2 lead shrank) */
    const char *line0 = (const char *)((uintptr_t)next & ~(uintptr_t)63);
    size_t lead = (size_t)(next - line0), stop = lead + bytes;
    size_t n_lines = (lead + tile + 63) / 64;
    size_t per = (n_lines + (size_t)n_steps - 1) / (size_t)n_steps;
    size_t end = ((size_t)step + 1) * per < n_lines ? ((size_t)step + 1) * per : n_lines;
    for (size_t l = (size_t)step * per; l < end; l++) {
        if (64 * l < stop)
            _mm_prefetch(line0 + 64 * l, _MM_HINT_T0);
        if (tile + 64 * l < stop)
            _mm_prefetch(line0 + tile + 64 * l, _MM_HINT_T1);
    }
}

/* The bytes after a tile of R rows that it prefetches (prefetch_share): the rows of the next two
 * tiles, as many of them as the thread reads (`after`: its rows after this tile's; a matrix's last
 * tiles would otherwise fetch what lies past its end, not the next expert's rows, which are
 * elsewhere), when the rows are read once (a single token group) and packed (not the strided K/V
 * rows of attention); else 0. One rule for the AVX2 and the AVX-512 tiles. */
TIDE_INLINE size_t stream_prefetch_bytes(int32_t type, int64_t cols, size_t rb, int R, int64_t after) {
    if (after <= 0 || rb != tide_row_bytes(type, cols))
        return 0;
    return (size_t)(after < 2 * R ? after : 2 * R) * rb;
}

/* Block blk of row r of a tile (q4_0 / k-quants): its address, the first `lines` 64-byte lines
 * of the block 4 blocks ahead prefetched, and (when `scales`) its scales unpacked to f32 into
 * D, M (block_scales_avx2). One rule for every tile that walks rows block by block. */
TIDE_AVX2 TIDE_INLINE const uint8_t *tile_block_avx2(int32_t type, const char *row, size_t rb, int r,
                                                     int64_t blk, size_t BB, int lines, int scales,
                                                     float *D, float *M) {
    const uint8_t *b = (const uint8_t *)row + r * rb + blk * BB;
    for (int l = 0; l < lines; l++)
        _mm_prefetch((const char *)b + 4 * BB + 64 * l, _MM_HINT_T0);
    if (scales)
        block_scales_avx2(type, b, D, M);
    return b;
}

/* R rows (stride rb) x T tokens; out[r*T + t]. R, T are constants after inlining. One token
 * takes 8 rows: each (row, token) dot is one chain of dependent FMAs (the canonical order allows
 * no second accumulator), so a one-token step needs 8 rows in flight to cover the FMA latency. */
TIDE_AVX2 TIDE_INLINE void tile_avx2(int32_t type, const char *row, size_t rb, int64_t cols,
                                     const float *const *xs, float *out, const int R, const int T,
                                     int64_t after) {
    __m256 acc[8][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++)
            acc[r][t] = _mm256_setzero_ps();
    int64_t nc = cols / 8;
    const int QB = dec_block_elems(type);
    /* streaming (after > 0: the rows are read once, by a single token group): the next two
     * tiles' rows, as far as the thread's rows go, prefetched a share a step (prefetch_share),
     * where rows are packed (not the strided K/V rows of attention).
     * With more token groups the rows come again from L2 for each (MATMUL_BLOCK_BODY), and the
     * prefetch would only evict their x rows from L1. */
    const char *next = row + (size_t)R * rb;
    const size_t next_bytes = stream_prefetch_bytes(type, cols, rb, R, after);
    if (QB) {
        /* q4_0 / k-quants: per block each row's scales to f32 once and its k-quants to bytes
         * (decode_simd.h's 32-quant helpers, 32 at a time with 256-bit byte ops), then each
         * 8-value chunk widened from those bytes into a register (blocks.h's exact values) and
         * used for all T tokens; the canonical 8-lane chunk order; rows are whole blocks, so no
         * tail. Assembling the k-quants 16 at a time per chunk cost q4_k / q5_k / q6_k 14% /
         * 27% / 15% of a token's speed; q4_0's 32-value blocks stay in registers (through bytes
         * they measured 10% slower). */
        const size_t BB = dec_block_bytes(type);
        float D[8][16], M[8][16];
        _Alignas(32) uint8_t qb[8][256];
        const int64_t nb = cols / QB;
        for (int64_t blk = 0; blk < nb; blk++) {
            const uint8_t *bp[8];
            prefetch_share(next, next_bytes, (size_t)R * rb, nb, blk);
            int ahead = next_bytes ? 0 : 2;   /* not streaming: lines of each row's own blocks */
            for (int r = 0; r < R; r++) {
                bp[r] = tile_block_avx2(type, row, rb, r, blk, BB, ahead, 1, D[r], M[r]);
                if (type != TIDE_TYPE_Q4_0)
                    dec_quant_bytes_avx2(type, bp[r], qb[r]);
            }
            /* row by row: one row's 16 values widened and used for every token at once, so
             * only the accumulators and a few temporaries are live (decoding all R rows first,
             * then the FMAs, kept 8 rows' values at once and spilled most of them); the x
             * chunks are reloaded per row from L1. Per (row, token) the same chunk order. */
            for (int w0 = 0; w0 < QB; w0 += 16) {
                const int64_t col = blk * QB + w0;
                for (int r = 0; r < R; r++) {
                    __m128i q0, q1;
                    if (type == TIDE_TYPE_Q4_0) {
                        /* 32 values, in registers (the half not taken is dead code once this
                         * two-chunk loop is unrolled); 8 rows' halves held across it would spill */
                        __m128i qlo, qhi;
                        q4_0_quants32_avx2(bp[r], &qlo, &qhi);
                        q0 = w0 ? qhi : qlo;
                        q1 = _mm_srli_si128(q0, 8);
                    } else {
                        q0 = _mm_loadl_epi64((const __m128i *)(qb[r] + w0));
                        q1 = _mm_loadl_epi64((const __m128i *)(qb[r] + w0 + 8));
                    }
                    __m256 lo = dec_values8(type, q0, D[r], M[r], w0);
                    __m256 hi = dec_values8(type, q1, D[r], M[r], w0);
                    for (int t = 0; t < T; t++) {
                        acc[r][t] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xs[t] + col), acc[r][t]);
                        acc[r][t] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xs[t] + col + 8), acc[r][t]);
                    }
                }
            }
        }
        nc = 0;
    } else if (type == TIDE_TYPE_Q8_0) {
        /* block by block: the scale is converted once per block; the same chunk order and the
         * same w = d * q as w_chunk_avx2, so the bits are those of the chunk loop */
        const int64_t nb = nc / 4;
        for (int64_t blk = 0; blk < nb; blk++) {
            __m256 d[8];
            const tide_block_q8_0 *bp[8];
            prefetch_share(next, next_bytes, (size_t)R * rb, nb, blk);
            for (int r = 0; r < R; r++) {
                bp[r] = (const tide_block_q8_0 *)(row + r * rb) + blk;
                d[r] = _mm256_set1_ps(_cvtsh_ss(bp[r]->d));
                if (!next_bytes)   /* not streaming: ~1 KiB ahead in each row */
                    _mm_prefetch((const char *)(bp[r] + 32), _MM_HINT_T0);
            }
            for (int sub = 0; sub < 4; sub++) {
                __m256 wv[8];
                for (int r = 0; r < R; r++)
                    wv[r] = _mm256_mul_ps(d[r], _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                                    _mm_loadl_epi64((const __m128i *)(bp[r]->qs + sub * 8)))));
                int64_t c = blk * 4 + sub;
                for (int t = 0; t < T; t++) {
                    __m256 xv = _mm256_loadu_ps(xs[t] + c * 8);
                    for (int r = 0; r < R; r++)
                        acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
                }
            }
        }
        nc = 0; /* q8_0 rows are whole blocks: no chunk loop, no tail */
    }
    for (int64_t c = 0; c < nc; c++) {
        __m256 wv[8];
        prefetch_share(next, next_bytes, (size_t)R * rb, nc, c);
        for (int r = 0; r < R; r++)
            wv[r] = w_chunk_avx2(type, row + r * rb, c);
        for (int t = 0; t < T; t++) {
            __m256 xv = _mm256_loadu_ps(xs[t] + c * 8);
            for (int r = 0; r < R; r++)
                acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
        }
    }
    if (type == TIDE_TYPE_Q8_0 || QB)
        nc = cols / 8;
    int tail = (int)(cols - nc * 8);
    if (tail) {
        __m256 wv[8];
        for (int r = 0; r < R; r++)
            wv[r] = w_tail_avx2(type, row + r * rb, nc, tail);
        for (int t = 0; t < T; t++) {
            __m256 xv = cpu_load_partial_avx2(xs[t] + nc * 8, tail);
            for (int r = 0; r < R; r++)
                acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++)
            out[r * T + t] = cpu_hsum8_avx2(acc[r][t]);
}

/* Dispatch a (R, T) tile with constant shape; the type is a constant of the caller. */
TIDE_AVX2 TIDE_INLINE void tile_any_avx2(int32_t type, const char *row, size_t rb, int64_t cols,
                                         const float *const *xs, float *out, int R, int T,
                                         int64_t after) {
#define TILE(r_, t_) \
    if (R == r_ && T == t_) { tile_avx2(type, row, rb, cols, xs, out, r_, t_, after); return; }
    TILE(2, 4) TILE(2, 3) TILE(4, 2) TILE(8, 1) TILE(4, 1)
    TILE(1, 4) TILE(1, 3) TILE(1, 2) TILE(1, 1)
#undef TILE
}

/* In MATMUL_BLOCK_BODY: what a tile ending at row r + e streams ahead, the thread's rows after it
 * (0: not streaming). */
#define STREAM_AFTER(e) (stream ? r1 - (r + (e)) : 0)

/* Tokens in [t0, t1), rows [r0, r1). Rows go in blocks that stay in L2 (<= 256 KiB); within a
 * block, each group of 4 tokens (their x rows in L1) meets every row of the block, so x is read
 * from L1 and weights from L2 (from DRAM once, on the first token group). Tiles: 4 rows at a
 * time; 4 tokens as two 2x4 tiles, 3 as two 2x3, 2 as one 4x2, 1 as one 4x1 (8x1 on AVX2);
 * leftover rows one at a time. One body for the AVX2 and the AVX-512 tiles (a macro: the target
 * attributes of the two must not mix). */
#define MATMUL_BLOCK_BODY(TILE_ANY, BIG)                                                          \
    size_t rb = w->rb;                                                                            \
    int64_t cols = w->cols;                                                                       \
    int stream = t1 - t0 <= 4; /* one token group: each row is read once, from DRAM */            \
    int64_t rowblk = (int64_t)((256 * 1024) / (rb ? rb : 1)) / 4 * 4;                              \
    if (rowblk < 4)                                                                               \
        rowblk = 4;                                                                               \
    for (int64_t b0 = r0; b0 < r1; b0 += rowblk) {                                                \
        int64_t b1 = r1 - b0 < rowblk ? r1 : b0 + rowblk;                                         \
        for (int32_t t = t0; t < t1; t += 4) {                                                    \
            int nt = t1 - t < 4 ? t1 - t : 4;                                                     \
            const float *xs[4];                                                                   \
            float *ys[4];                                                                         \
            for (int i = 0; i < nt; i++) {                                                        \
                xs[i] = ts->x + (int64_t)(ts->x_idx ? ts->x_idx[t + i] : t + i) * ts->x_stride;   \
                ys[i] = ts->y + (int64_t)(ts->y_idx ? ts->y_idx[t + i] : t + i) * ts->y_stride;   \
            }                                                                                     \
            for (int64_t r = b0; r < b1;) {                                                       \
                int rg = !(BIG) && nt == 1 && b1 - r >= 8 ? 8 : b1 - r >= 4 ? 4 : 1;              \
                const char *row = w->data + (size_t)r * rb;                                       \
                float out[16];                                                                    \
                if (rg == 8) {                                                                    \
                    TILE_ANY(type, row, rb, cols, xs, out, 8, 1, STREAM_AFTER(8));                     \
                } else if (rg == 4) {                                                             \
                    if (nt >= 3 && !(BIG)) {                                                      \
                        TILE_ANY(type, row, rb, cols, xs, out, 2, nt, STREAM_AFTER(2));                \
                        TILE_ANY(type, row + 2 * rb, rb, cols, xs, out + 2 * nt, 2, nt, STREAM_AFTER(4)); \
                    } else {                                                                      \
                        TILE_ANY(type, row, rb, cols, xs, out, 4, nt, STREAM_AFTER(4));                \
                    }                                                                             \
                } else {                                                                          \
                    TILE_ANY(type, row, rb, cols, xs, out, 1, nt, STREAM_AFTER(1));                    \
                }                                                                                 \
                for (int i = 0; i < nt; i++)                                                      \
                    for (int k = 0; k < rg; k++)                                                  \
                        ys[i][r + k] = out[k * nt + i];                                           \
                r += rg;                                                                          \
            }                                                                                     \
        }                                                                                         \
    }

/* ---- AVX2, many tokens: each weight row decoded once into an f32 panel ------------------------
 * The tiles above decode (widen bf16, unpack k-quants) a row once per group of <= 4 tokens; with
 * a prefill micro-batch or an expert's 16 pairs that decode is repeated many times, and it competes
 * with the FMAs for the same ports. Here a panel of rows is decoded to f32 once per token block
 * (dec_block_avx2 / w_chunk_avx2: the exact values the tiles use) and 4-row x 3-token tiles of f32
 * FMAs run over it, the weight operand loaded straight from the panel. Per (row, token) the same
 * canonical chunk order and horizontal sum, so the bits are those of the tiles above: the batch
 * size still never changes a result. */
#define PANEL_FLOATS 65536      /* 256 KiB on the thread's stack: the panel stays in L2 */
#define PANEL_MAX_ROWS 64       /* bounds the running sums' buffer beside it (24 KiB) */
#define PANEL_SLICE 1024        /* columns a tile covers before the next tile: see below */
#define PANEL_MIN_TOKENS 6      /* below that a decode per 4 tokens costs no more */
#define TG_AVX2 3               /* tokens of an AVX2 f32 panel tile (4 x 3 of 16 ymm registers) */
#define TG_AVX512 6             /* tokens of an AVX-512 one (4 x 6 of 32 zmm registers) */
#define ACC_SLOT 16             /* floats a running sum takes in acc_buf (a zmm; a ymm uses half) */

TIDE_AVX2 TIDE_INLINE void decode_row_avx2(int32_t type, const char *row, int64_t cols, float *out) {
    const int QB = dec_block_elems(type);
    if (QB) {
        const size_t BB = dec_block_bytes(type);
        for (int64_t b = 0; b < cols / QB; b++)
            dec_block_avx2(type, (const uint8_t *)row + b * BB, out + b * QB);
        return;
    }
    int64_t nc = cols / 8;
    for (int64_t c = 0; c < nc; c++)
        _mm256_storeu_ps(out + c * 8, w_chunk_avx2(type, row, c));
    int tail = (int)(cols - nc * 8);
    if (tail) {
        float tmp[8];
        _mm256_storeu_ps(tmp, w_tail_avx2(type, row, nc, tail));
        memcpy(out + nc * 8, tmp, (size_t)tail * 4);
    }
}

TIDE_AVX2 void cpu_decode_row_avx2(int32_t type, const char *row, int64_t cols, float *out) {
    decode_row_avx2(type, row, cols, out);
}

/* R rows of f32 (stride ws floats) x T tokens over columns [c0, c1) of cols: the running sums
 * start at zero when c0 == 0, else from acc_buf[(r * TG_AVX2 + t) * ACC_SLOT ..] where the slice
 * before left them, and go back there, or on the last slice (c1 == cols) their sums to
 * out[r*T + t]. 12 accumulators, 3 x registers and one weight register: the 16 ymm registers of
 * AVX2. Not tile_avx2 with type f32: it loads the R weight chunks first, which at 4x3 needs 17. */
TIDE_AVX2 TIDE_INLINE void tile_f32_avx2(const float *w, int64_t ws, int64_t cols, int64_t c0,
                                         int64_t c1, const float *const *xs, float *acc_buf,
                                         float *out, const int R, const int T) {
    __m256 acc[4][TG_AVX2];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++)
            acc[r][t] = c0 ? _mm256_load_ps(acc_buf + (r * TG_AVX2 + t) * ACC_SLOT) : _mm256_setzero_ps();
    int64_t nc = c1 / 8;
    for (int64_t c = c0 / 8; c < nc; c++) {
        __m256 xv[TG_AVX2];
        for (int t = 0; t < T; t++)
            xv[t] = _mm256_loadu_ps(xs[t] + c * 8);
        for (int r = 0; r < R; r++) {
            __m256 wv = _mm256_loadu_ps(w + r * ws + c * 8);
            for (int t = 0; t < T; t++)
                acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
        }
    }
    if (c1 < cols) {
        for (int r = 0; r < R; r++)
            for (int t = 0; t < T; t++)
                _mm256_store_ps(acc_buf + (r * TG_AVX2 + t) * ACC_SLOT, acc[r][t]);
        return;
    }
    int tail = (int)(cols - nc * 8);
    if (tail) {
        for (int r = 0; r < R; r++) {
            __m256 wv = cpu_load_partial_avx2(w + r * ws + nc * 8, tail);
            for (int t = 0; t < T; t++)
                acc[r][t] = _mm256_fmadd_ps(wv, cpu_load_partial_avx2(xs[t] + nc * 8, tail), acc[r][t]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++)
            out[r * T + t] = cpu_hsum8_avx2(acc[r][t]);
}

TIDE_AVX2 TIDE_INLINE void tile_f32_any_avx2(const float *w, int64_t ws, int64_t cols, int64_t c0,
                                             int64_t c1, const float *const *xs, float *acc_buf,
                                             float *out, int R, int T) {
#define TILE(r_, t_) \
    if (R == r_ && T == t_) { tile_f32_avx2(w, ws, cols, c0, c1, xs, acc_buf, out, r_, t_); return; }
    TILE(4, 3) TILE(4, 2) TILE(4, 1) TILE(1, 3) TILE(1, 2)
#undef TILE
    tile_f32_avx2(w, ws, cols, c0, c1, xs, acc_buf, out, 1, 1);
}

static int panel_fits(int32_t type, const cpu_wview *w, int32_t n_tok) {
    return n_tok >= PANEL_MIN_TOKENS && 4 * w->cols <= PANEL_FLOATS &&
           (type != TIDE_TYPE_F32 || w->rb % sizeof(float) == 0);
}

/* Rows [r0, r1) x tokens [t0, t1) through f32 panels: a panel's rows decoded once, then tiles of
 * 4 rows x TG tokens (TILE_F32_ANY) over it. Per token group the columns go in slices of
 * PANEL_SLICE, each over all the panel's rows before the next, the running sums kept in acc_buf
 * between slices: the group's x slice (24 KiB at 6 tokens) then stays in L1 for every row of the
 * panel, where a whole x row per tile came from L2 each time. With panels of 8 -> 32 rows, q6_k,
 * 32 tokens, 2 threads, interleaved: 16384x2048 84-117 -> 97-138 GFLOP/s, lm_head (157184x2048)
 * 176-219 -> 159-182 ms; slices of 512 or 256 columns were slower, 64-row panels no faster
 * (slices alone, with 8-row panels, had measured slower still). The panel and its sums take
 * 280 KiB of stack: the pool's threads get the system's default (8 MiB on Linux), as do Python's.
 * The chunks still go in order, so the bits are the tiles'. The panel is 64-byte aligned: a
 * 16-lane load that straddles two cache lines costs two. One body for the AVX2 and the AVX-512
 * tiles (a macro, as MATMUL_BLOCK_BODY); both decode with the AVX2 block decoders (a 16-lane
 * decode of q4_k and q6_k measured 10-25% slower on Sapphire Rapids: its widening conversions
 * take the one shuffle port). */
#define MATMUL_PANEL_BODY(TILE_F32_ANY, TG)                                                       \
    _Alignas(64) float panel[PANEL_FLOATS];                                                       \
    _Alignas(64) float acc_buf[PANEL_MAX_ROWS * (TG) * ACC_SLOT];                                 \
    const int64_t cols = w->cols;                                                                 \
    int64_t prows = PANEL_FLOATS / cols / 4 * 4;                                                  \
    prows = prows < PANEL_MAX_ROWS ? prows : PANEL_MAX_ROWS;                                      \
    for (int64_t b0 = r0; b0 < r1; b0 += prows) {                                                 \
        int64_t nr = r1 - b0 < prows ? r1 - b0 : prows;                                           \
        const float *pw = panel;                                                                  \
        int64_t ws = cols;                                                                        \
        if (type == TIDE_TYPE_F32) { /* already f32: tile the rows where they are */              \
            pw = (const float *)(w->data + (size_t)b0 * w->rb);                                   \
            ws = (int64_t)(w->rb / sizeof(float));                                                \
        } else {                                                                                  \
            for (int64_t r = 0; r < nr; r++)                                                      \
                decode_row_avx2(type, w->data + (size_t)(b0 + r) * w->rb, cols, panel + r * cols); \
        }                                                                                         \
        /* the next panel's rows, fetched into cache a slice per token group while this one is    \
         * computed: decoding it then waits on no DRAM read */                                    \
        const char *next = w->data + (size_t)(b0 + nr) * w->rb;                                   \
        size_t next_lines = b0 + nr < r1 ? ((size_t)(r1 - b0 - nr < prows ? r1 - b0 - nr : prows) * \
                                            w->rb + 63) / 64 : 0;                                 \
        size_t groups = (size_t)(t1 - t0 + (TG) - 1) / (TG);                                      \
        size_t per_group = (next_lines + groups - 1) / groups;                                    \
        size_t fetched = 0;                                                                       \
        for (int32_t t = t0; t < t1; t += (TG)) {                                                 \
            for (size_t k = 0; k < per_group && fetched < next_lines; k++, fetched++)             \
                _mm_prefetch(next + fetched * 64, _MM_HINT_T0);                                   \
            int nt = t1 - t < (TG) ? t1 - t : (TG);                                               \
            const float *xs[TG];                                                                  \
            float *ys[TG];                                                                        \
            for (int i = 0; i < nt; i++) {                                                        \
                xs[i] = ts->x + (int64_t)(ts->x_idx ? ts->x_idx[t + i] : t + i) * ts->x_stride;   \
                ys[i] = ts->y + (int64_t)(ts->y_idx ? ts->y_idx[t + i] : t + i) * ts->y_stride;   \
            }                                                                                     \
            for (int64_t c0 = 0; c0 < cols; c0 += PANEL_SLICE) {                                  \
                int64_t c1 = cols - c0 > PANEL_SLICE ? c0 + PANEL_SLICE : cols;                   \
                for (int64_t r = 0; r < nr;) {                                                    \
                    int rg = nr - r >= 4 ? 4 : 1;                                                 \
                    float out[4 * (TG)];                                                          \
                    TILE_F32_ANY(pw + r * ws, ws, cols, c0, c1, xs, acc_buf + r * (TG) * ACC_SLOT, out, rg, nt); \
                    if (c1 == cols)                                                               \
                        for (int i = 0; i < nt; i++)                                              \
                            for (int k = 0; k < rg; k++)                                          \
                                ys[i][b0 + r + k] = out[k * nt + i];                              \
                    r += rg;                                                                      \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }

TIDE_AVX2 TIDE_INLINE void matmul_panel_avx2(const int32_t type, const cpu_wview *w, int64_t r0,
                                             int64_t r1, const cpu_tokens *ts, int32_t t0,
                                             int32_t t1) {
    MATMUL_PANEL_BODY(tile_f32_any_avx2, TG_AVX2)
}

TIDE_AVX2 TIDE_INLINE void matmul_block_avx2(const int32_t type, const cpu_wview *w, int64_t r0,
                                             int64_t r1, const cpu_tokens *ts, int32_t t0,
                                             int32_t t1) {
    if (panel_fits(type, w, t1 - t0)) {
        matmul_panel_avx2(type, w, r0, r1, ts, t0, t1);
        return;
    }
    MATMUL_BLOCK_BODY(tile_any_avx2, 0)
}

TIDE_AVX2 static void matmul_block_f32(const cpu_wview *w, int64_t r0, int64_t r1,
                                       const cpu_tokens *ts, int32_t t0, int32_t t1) {
    matmul_block_avx2(TIDE_TYPE_F32, w, r0, r1, ts, t0, t1);
}
TIDE_AVX2 static void matmul_block_f16(const cpu_wview *w, int64_t r0, int64_t r1,
                                       const cpu_tokens *ts, int32_t t0, int32_t t1) {
    matmul_block_avx2(TIDE_TYPE_F16, w, r0, r1, ts, t0, t1);
}
TIDE_AVX2 static void matmul_block_bf16(const cpu_wview *w, int64_t r0, int64_t r1,
                                        const cpu_tokens *ts, int32_t t0, int32_t t1) {
    matmul_block_avx2(TIDE_TYPE_BF16, w, r0, r1, ts, t0, t1);
}
TIDE_AVX2 static void matmul_block_q4_0(const cpu_wview *w, int64_t r0, int64_t r1,
                                const cpu_tokens *ts, int32_t t0, int32_t t1) {
    matmul_block_avx2(TIDE_TYPE_Q4_0, w, r0, r1, ts, t0, t1);
}
TIDE_AVX2 static void matmul_block_q4_k(const cpu_wview *w, int64_t r0, int64_t r1,
                                const cpu_tokens *ts, int32_t t0, int32_t t1) {
    matmul_block_avx2(TIDE_TYPE_Q4_K, w, r0, r1, ts, t0, t1);
}
TIDE_AVX2 static void matmul_block_q5_k(const cpu_wview *w, int64_t r0, int64_t r1,
                                const cpu_tokens *ts, int32_t t0, int32_t t1) {
    matmul_block_avx2(TIDE_TYPE_Q5_K, w, r0, r1, ts, t0, t1);
}
TIDE_AVX2 static void matmul_block_q6_k(const cpu_wview *w, int64_t r0, int64_t r1,
                                const cpu_tokens *ts, int32_t t0, int32_t t1) {
    matmul_block_avx2(TIDE_TYPE_Q6_K, w, r0, r1, ts, t0, t1);
}
TIDE_AVX2 static void matmul_block_q8_0(const cpu_wview *w, int64_t r0, int64_t r1,
                                        const cpu_tokens *ts, int32_t t0, int32_t t1) {
    matmul_block_avx2(TIDE_TYPE_Q8_0, w, r0, r1, ts, t0, t1);
}

/* ---- AVX-512 path (F + BW + VL): the same tiles with 16-lane chunks. Its canonical order is
 * the 16-lane analogue: acc = fma(w[16c..], x[16c..], acc), the last chunk zero-padded, then
 * lanes 0-7 + 8-15 and the 8-lane sum above. A machine with AVX-512 uses it for every matmul
 * (and the attention scores and experts built on it); cpu_dot_f32 stays 8-lane. */
#define TIDE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

TIDE_AVX512 TIDE_INLINE float hsum16_avx512(__m512 v) {
    __m256 lo = _mm512_castps512_ps256(v);
    __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return cpu_hsum8_avx2(_mm256_add_ps(lo, hi));
}

/* The scales of a q4_k / q5_k block as f32, interleaved: DM[2j] = d * sc_j, DM[2j + 1] = dmin * m_j
 * (block_scales_avx2's products, so the same bits), by decode_simd.h's KS_* rule on all 16 lanes
 * at once. The scalar unpacking this replaced was a third of a one-token q4_k tile's time (64x2048
 * in L2, one thread: 19-22 -> 15-18 ns a block-row). */
TIDE_AVX512 TIDE_INLINE void k_scales_avx512(const uint8_t *b, float *DM) {
    const __m512i idx = _mm512_setr_epi32(KS_IDX(0, 0), KS_IDX(0, 1), KS_IDX(1, 0), KS_IDX(1, 1),
                                          KS_IDX(2, 0), KS_IDX(2, 1), KS_IDX(3, 0), KS_IDX(3, 1),
                                          KS_IDX(4, 0), KS_IDX(4, 1), KS_IDX(5, 0), KS_IDX(5, 1),
                                          KS_IDX(6, 0), KS_IDX(6, 1), KS_IDX(7, 0), KS_IDX(7, 1));
    const __m512i a = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 4, 0, 4, 0, 4);
    const __m512i ma = _mm512_setr_epi32(63, 63, 63, 63, 63, 63, 63, 63, 15, 15, 15, 15, 15, 15, 15, 15);
    __m512i v = _mm512_shuffle_epi8(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)b)), idx);
    /* the KS_* rule's (A & ma) | (B & mb) as one bit select, ma ? A : B (0xE4): B = v >> 10 is 0
     * for j < 4 (the shuffle zeroes bytes 1-3) and at most bits 0-5 for j >= 4, so B & ~ma is
     * B & mb in every lane */
    __m512i q = _mm512_ternarylogic_epi32(_mm512_srlv_epi32(v, a), _mm512_srli_epi32(v, KS_HI_SHIFT),
                                          ma, 0xE4);
    int32_t dd;   /* d and dmin (two f16) in every dword: lane 2j gets d, lane 2j + 1 dmin */
    memcpy(&dd, b, 4);
    __m512 dm = _mm512_cvtph_ps(_mm256_set1_epi32(dd));
    _mm512_storeu_ps(DM, _mm512_mul_ps(dm, _mm512_cvtepi32_ps(q)));
}
TIDE_AVX512 TIDE_INLINE __m512 w16_chunk(int32_t type, const char *row, int64_t c) {
    switch (type) {
    case TIDE_TYPE_F16:
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + c * 16)));
    case TIDE_TYPE_BF16:
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + c * 16))), 16));
    default:
        return _mm512_loadu_ps((const float *)row + c * 16);
    }
}

/* lanes [0, n) of chunk c, zeros above; masked-off lanes are never read (no fault past the end) */
TIDE_AVX512 TIDE_INLINE __m512 w16_tail(int32_t type, const char *row, int64_t c, int n) {
    __mmask16 m = (__mmask16)((1u << n) - 1u);
    switch (type) {
    case TIDE_TYPE_F16:
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)row + c * 16));
    case TIDE_TYPE_BF16:
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)row + c * 16)), 16));
    default:
        return _mm512_maskz_loadu_ps(m, (const float *)row + c * 16);
    }
}

TIDE_AVX512 TIDE_INLINE void tile_avx512(int32_t type, const char *row, size_t rb, int64_t cols,
                                         const float *const *xs, float *out, const int R,
                                         const int T, int64_t after) {
    __m512 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++)
            acc[r][t] = _mm512_setzero_ps();
    int64_t nc = cols / 16;
    const int QB = dec_block_elems(type);
    /* streaming (after > 0): as the AVX2 tile, a share of the next two tiles' rows a step;
     * otherwise each row's own blocks a few ahead (`ahead` lines of each) */
    const char *next = row + (size_t)R * rb;
    const size_t next_bytes = stream_prefetch_bytes(type, cols, rb, R, after);
    const int ahead = next_bytes ? 0 : 2;
    if (QB) {
        /* as the AVX2 tile, with 16-value chunks */
        const size_t BB = dec_block_bytes(type);
        if (type == TIDE_TYPE_Q4_K || type == TIDE_TYPE_Q4_0) {
            /* 4-bit quants through a 16-entry table per sub-block: table[k] = the exact value
             * of quant k (fmsub(D, k, M), or d * (k - 8)), picked by vpermps from the quant
             * bytes widened to 32 bits (it reads only their low 4 bits, so the low nibble needs
             * no mask). Half the vector ops of converting each quant; the same values. */
            const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            const int k4 = type == TIDE_TYPE_Q4_K;
            for (int64_t blk = 0; blk < cols / QB; blk++) {
                const uint8_t *bp[4];
                float DM[4][16];
                prefetch_share(next, next_bytes, (size_t)R * rb, cols / QB, blk);
                for (int r = 0; r < R; r++) {
                    bp[r] = tile_block_avx2(type, row, rb, r, blk, BB, ahead, 0, NULL, NULL);
                    if (k4)
                        k_scales_avx512(bp[r], DM[r]);
                }
                for (int g = 0; g < QB / 64 + !k4; g++) {
                    __m512 tlo[4], thi[4];
                    __m512i v0[4], v1[4];
                    for (int r = 0; r < R; r++) {
                        if (k4) {
                            tlo[r] = _mm512_fmsub_ps(_mm512_set1_ps(DM[r][4 * g]), iota, _mm512_set1_ps(DM[r][4 * g + 1]));
                            thi[r] = _mm512_fmsub_ps(_mm512_set1_ps(DM[r][4 * g + 2]), iota, _mm512_set1_ps(DM[r][4 * g + 3]));
                            const uint8_t *qs = bp[r] + TIDE_Q4K_OFF_QS + 32 * g;
                            v0[r] = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)qs));
                            v1[r] = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qs + 16)));
                        } else {
                            tlo[r] = thi[r] = _mm512_mul_ps(_mm512_set1_ps(f16_at(bp[r])),
                                                            _mm512_sub_ps(iota, _mm512_set1_ps(8.0f)));
                            v0[r] = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(bp[r] + 2)));
                        }
                    }
                    /* chunks in column order: k4: low nibbles of bytes 0-15, 16-31, then the
                     * high nibbles; q4_0 (one 32-value block): low then high nibbles of 0-15 */
                    for (int k = 0; k < (k4 ? 4 : 2); k++) {
                        __m512 wv[4];
                        for (int r = 0; r < R; r++) {
                            __m512i v = k4 ? ((k & 1) ? v1[r] : v0[r]) : v0[r];
                            int hi = k4 ? k >= 2 : k == 1;
                            wv[r] = hi ? _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), thi[r])
                                       : _mm512_permutexvar_ps(v, tlo[r]);
                        }
                        int64_t col = blk * QB + (k4 ? 64 * g : 0) + 16 * k;
                        for (int t = 0; t < T; t++) {
                            __m512 xv = _mm512_loadu_ps(xs[t] + col);
                            for (int r = 0; r < R; r++)
                                acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
                        }
                    }
                    if (!k4)
                        break;
                }
            }
        } else if (type == TIDE_TYPE_Q5_K) {
            /* 5-bit quants through a 32-entry table per sub-block, tlo | thi = fmsub(D, k, M) for
             * k = 0..31, picked by vpermt2ps (bit 4 of its index chooses thi). The indices are
             * assembled as bytes, 128 at a time with 512-bit ops (a pair of groups: qs's 64
             * bytes, qh in both 256-bit halves shifted per half so the groups' two bits land at
             * bits 0-1 of each byte): nibble in bits 0-3, the qh bit in bit 4, the bits above
             * not read. Stored, then each 16-value chunk widened from there (a load and one
             * shuffle, no extracts). About 86 vector ops a block and row against 108 when each
             * chunk's index was assembled in 32-bit lanes (one token's q5_k experts 14.6-15.0 ->
             * 16.6-17.5 GB/s); the same values. */
            const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            const __m512 iota16 = _mm512_add_ps(iota, _mm512_set1_ps(16.0f));
            const __m512i m4 = _mm512_set1_epi8(15);
            /* qh word shifts: group 2p's bits (2g, 2g + 1) in the low half, group 2p + 1's in the high */
            const __m512i qh_shift[2] = {
                _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1),
                _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(6), 1)};
            /* idx[r][p][h]: bytes 0-31 sub-block 4p + h, 32-63 sub-block 4p + 2 + h */
            _Alignas(64) uint8_t idx[4][2][2][64];
            for (int64_t blk = 0; blk < cols / QB; blk++) {
                const uint8_t *bp[4];
                float DM[4][16];
                prefetch_share(next, next_bytes, (size_t)R * rb, cols / QB, blk);
                for (int r = 0; r < R; r++) {
                    bp[r] = tile_block_avx2(type, row, rb, r, blk, BB, ahead, 0, NULL, NULL);
                    k_scales_avx512(bp[r], DM[r]);
                    const __m512i qh = _mm512_broadcast_i64x4(
                        _mm256_loadu_si256((const __m256i *)(bp[r] + TIDE_Q5K_OFF_QH)));
                    for (int p = 0; p < 2; p++) {
                        __m512i qs = _mm512_loadu_si512(bp[r] + TIDE_Q5K_OFF_QS + 64 * p);
                        __m512i sh = _mm512_srlv_epi16(qh, qh_shift[p]);
                        /* 0xE4: m4 ? nibble : high bit (bits 4-7 of the second operand) */
                        _mm512_store_si512(idx[r][p][0],
                                           _mm512_ternarylogic_epi32(qs, _mm512_slli_epi16(sh, 4), m4, 0xE4));
                        _mm512_store_si512(idx[r][p][1],
                                           _mm512_ternarylogic_epi32(_mm512_srli_epi16(qs, 4),
                                                                     _mm512_slli_epi16(sh, 3), m4, 0xE4));
                    }
                }
                for (int j = 0; j < 8; j++) {
                    /* sub-block j = 2g + h: group g = 2p + q lies in pair p, half q */
                    const int g = j >> 1, h = j & 1, pp = g >> 1, q = g & 1;
                    __m512 tlo[4], thi[4];
                    for (int r = 0; r < R; r++) {
                        __m512 D = _mm512_set1_ps(DM[r][2 * j]), M = _mm512_set1_ps(DM[r][2 * j + 1]);
                        tlo[r] = _mm512_fmsub_ps(D, iota, M);
                        thi[r] = _mm512_fmsub_ps(D, iota16, M);
                    }
                    for (int part = 0; part < 2; part++) {
                        __m512 wv[4];
                        for (int r = 0; r < R; r++) {
                            __m512i ix = _mm512_cvtepu8_epi32(
                                _mm_load_si128((const __m128i *)(idx[r][pp][h] + 32 * q + 16 * part)));
                            wv[r] = _mm512_permutex2var_ps(tlo[r], ix, thi[r]);
                        }
                        int64_t col = blk * QB + 32 * j + 16 * part;
                        for (int t = 0; t < T; t++) {
                            __m512 xv = _mm512_loadu_ps(xs[t] + col);
                            for (int r = 0; r < R; r++)
                                acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
                        }
                    }
                }
            }
        } else if (type == TIDE_TYPE_Q6_K) {
            /* 64 quants of a row at a time with 512-bit byte ops (a quarter pair u, u + 1 of a
             * half: ql's 64 bytes, qh's 32 in both 256-bit halves, shifted per half so each
             * quarter's two bits land at bits 4-5), stored as bytes q - 32; then each 16-value
             * chunk sign-extended from there, converted and scaled. Storing and reloading the
             * bytes keeps the widening off the shuffle port's extracts. */
            _Alignas(64) int8_t qb[4][64];
            float D[4][16], M[4][16];
            const __m512i m4 = _mm512_set1_epi8(15), m2 = _mm512_set1_epi8(0x30), k32 = _mm512_set1_epi8(32);
            /* word shifts of qh per 256-bit half: quarters 0 / 1 (bits 0-1 / 2-3) left by 4 / 2,
             * quarters 2 / 3 (bits 4-5 / 6-7) right by 0 / 2 */
            const __m512i lo_pair = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
            const __m512i hi_pair = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
            /* not streaming: 4 lines of each row's own 210-byte blocks ahead (q6_k's lead from
             * before the streaming prefetch; the other types take `ahead`) */
            const int ahead_q6 = next_bytes ? 0 : 4;
            for (int64_t blk = 0; blk < cols / QB; blk++) {
                const uint8_t *bp[4];
                prefetch_share(next, next_bytes, (size_t)R * rb, cols / QB, blk);
                for (int r = 0; r < R; r++) {
                    bp[r] = tile_block_avx2(type, row, rb, r, blk, BB, ahead_q6, 1, D[r], M[r]);
                }
                for (int n = 0; n < 2; n++) {
                    for (int pair = 0; pair < 2; pair++) {   /* quarters 2 pair, 2 pair + 1 */
                        for (int r = 0; r < R; r++) {
                            __m512i ql = _mm512_loadu_si512(bp[r] + 64 * n);
                            __m512i qh = _mm512_broadcast_i64x4(
                                _mm256_loadu_si256((const __m256i *)(bp[r] + TIDE_Q6K_OFF_QH + 32 * n)));
                            ql = pair ? _mm512_srli_epi16(ql, 4) : ql;
                            qh = pair ? _mm512_srlv_epi16(qh, hi_pair) : _mm512_sllv_epi16(qh, lo_pair);
                            /* (ql & 15) | (qh & 0x30): 0xEC is (A & C) | B */
                            __m512i q = _mm512_ternarylogic_epi32(ql, _mm512_and_si512(qh, m2), m4, 0xEC);
                            _mm512_store_si512(qb[r], _mm512_sub_epi8(q, k32));
                        }
                        for (int c = 0; c < 4; c++) {
                            const int w0 = 128 * n + 64 * pair + 16 * c;
                            __m512 wv[4];
                            for (int r = 0; r < R; r++)
                                wv[r] = _mm512_mul_ps(_mm512_set1_ps(D[r][w0 >> 4]), _mm512_cvtepi32_ps(
                                    _mm512_cvtepi8_epi32(_mm_load_si128((const __m128i *)(qb[r] + 16 * c)))));
                            int64_t col = blk * QB + w0;
                            for (int t = 0; t < T; t++) {
                                __m512 xv = _mm512_loadu_ps(xs[t] + col);
                                for (int r = 0; r < R; r++)
                                    acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
                            }
                        }
                    }
                }
            }
        }
    } else if (type == TIDE_TYPE_Q8_0) {
        for (int64_t blk = 0; blk < nc / 2; blk++) {
            __m512 d[4];
            const tide_block_q8_0 *bp[4];
            prefetch_share(next, next_bytes, (size_t)R * rb, nc / 2, blk);
            for (int r = 0; r < R; r++) {
                bp[r] = (const tide_block_q8_0 *)(row + r * rb) + blk;
                d[r] = _mm512_set1_ps(_cvtsh_ss(bp[r]->d));
                if (!next_bytes)   /* not streaming: ~1 KiB ahead in each row */
                    _mm_prefetch((const char *)(bp[r] + 32), _MM_HINT_T0);
            }
            for (int sub = 0; sub < 2; sub++) {
                __m512 wv[4];
                for (int r = 0; r < R; r++)
                    wv[r] = _mm512_mul_ps(d[r], _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                    _mm_loadu_si128((const __m128i *)(bp[r]->qs + sub * 16)))));
                int64_t c = blk * 2 + sub;
                for (int t = 0; t < T; t++) {
                    __m512 xv = _mm512_loadu_ps(xs[t] + c * 16);
                    for (int r = 0; r < R; r++)
                        acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
                }
            }
        }
    } else {
        for (int64_t c = 0; c < nc; c++) {
            __m512 wv[4];
            prefetch_share(next, next_bytes, (size_t)R * rb, nc, c);
            for (int r = 0; r < R; r++)
                wv[r] = w16_chunk(type, row + r * rb, c);
            for (int t = 0; t < T; t++) {
                __m512 xv = _mm512_loadu_ps(xs[t] + c * 16);
                for (int r = 0; r < R; r++)
                    acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
            }
        }
        int tail = (int)(cols - nc * 16);
        if (tail) {
            __mmask16 m = (__mmask16)((1u << tail) - 1u);
            __m512 wv[4];
            for (int r = 0; r < R; r++)
                wv[r] = w16_tail(type, row + r * rb, nc, tail);
            for (int t = 0; t < T; t++) {
                __m512 xv = _mm512_maskz_loadu_ps(m, xs[t] + nc * 16);
                for (int r = 0; r < R; r++)
                    acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++)
            out[r * T + t] = hsum16_avx512(acc[r][t]);
}

TIDE_AVX512 TIDE_INLINE void tile_any_avx512(int32_t type, const char *row, size_t rb, int64_t cols,
                                             const float *const *xs, float *out, int R, int T,
                                             int64_t after) {
#define TILE(r_, t_) \
    if (R == r_ && T == t_) { tile_avx512(type, row, rb, cols, xs, out, r_, t_, after); return; }
    TILE(4, 4) TILE(4, 3) TILE(4, 2) TILE(4, 1)
    TILE(1, 4) TILE(1, 3) TILE(1, 2) TILE(1, 1)
#undef TILE
}

/* tile_f32_avx2 with 16-lane chunks: 4 x 6 takes 24 accumulators, 6 x registers and one weight
 * register of the 32 zmm registers; each chunk loads 10 vectors for 24 FMAs. The canonical 16-lane
 * order of tile_avx512, so the bits are those of its tiles. Its panels hold q5_k / q6_k rows only
 * (matmul_block_avx512), whole 256-value blocks: cols % 16 == 0, no tail chunk. */
TIDE_AVX512 TIDE_INLINE void tile_f32_avx512(const float *w, int64_t ws, int64_t cols, int64_t c0,
                                             int64_t c1, const float *const *xs, float *acc_buf,
                                             float *out, const int R, const int T) {
    __m512 acc[4][TG_AVX512];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++)
            acc[r][t] = c0 ? _mm512_load_ps(acc_buf + (r * TG_AVX512 + t) * ACC_SLOT) : _mm512_setzero_ps();
    for (int64_t c = c0 / 16; c < c1 / 16; c++) {
        __m512 xv[TG_AVX512];
        for (int t = 0; t < T; t++)
            xv[t] = _mm512_loadu_ps(xs[t] + c * 16);
        for (int r = 0; r < R; r++) {
            __m512 wv = _mm512_loadu_ps(w + r * ws + c * 16);
            for (int t = 0; t < T; t++)
                acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) {
            if (c1 < cols)
                _mm512_store_ps(acc_buf + (r * TG_AVX512 + t) * ACC_SLOT, acc[r][t]);
            else
                out[r * T + t] = hsum16_avx512(acc[r][t]);
        }
}

TIDE_AVX512 TIDE_INLINE void tile_f32_any_avx512(const float *w, int64_t ws, int64_t cols, int64_t c0,
                                                 int64_t c1, const float *const *xs, float *acc_buf,
                                                 float *out, int R, int T) {
#define TILE(r_, t_) \
    if (R == r_ && T == t_) { tile_f32_avx512(w, ws, cols, c0, c1, xs, acc_buf, out, r_, t_); return; }
    TILE(4, 6) TILE(4, 5) TILE(4, 4) TILE(4, 3) TILE(4, 2) TILE(4, 1)
    TILE(1, 6) TILE(1, 5) TILE(1, 4) TILE(1, 3) TILE(1, 2)
#undef TILE
    tile_f32_avx512(w, ws, cols, c0, c1, xs, acc_buf, out, 1, 1);
}

TIDE_AVX512 TIDE_INLINE void matmul_panel_avx512(const int32_t type, const cpu_wview *w, int64_t r0,
                                                 int64_t r1, const cpu_tokens *ts, int32_t t0,
                                                 int32_t t1) {
    MATMUL_PANEL_BODY(tile_f32_any_avx512, TG_AVX512)
}

TIDE_AVX512 TIDE_INLINE void matmul_block_avx512(const int32_t type, const cpu_wview *w, int64_t r0,
                                                 int64_t r1, const cpu_tokens *ts, int32_t t0,
                                                 int32_t t1) {
    /* the panel only where a chunk's decode in registers is dear: q5_k's high bits, q6_k's two
     * planes. The other types decode in a few ops (q4_k and q4_0 by their value table) and the
     * 4x4 tiles run their FMAs as fast as the panel's 4x6, so decoding once gains nothing there.
     * 16384x2048, 32 tokens, 2 threads (ms, tiles -> panel): q6_k 31-35 -> 26, q5_k 35-37 -> 28-29,
     * q4_k 22-23 -> 30-32, bf16 10.3 -> 12.6-13.2, q8_0 12 -> 12.5-14.3 (8192 rows for the last two) */
    if ((type == TIDE_TYPE_Q5_K || type == TIDE_TYPE_Q6_K) && panel_fits(type, w, t1 - t0)) {
        /* (tile_f32_avx512 takes no tail chunk: widen this to f32/f16/bf16 and give it one) */
        matmul_panel_avx512(type, w, r0, r1, ts, t0, t1);
        return;
    }
    MATMUL_BLOCK_BODY(tile_any_avx512, 1)
}

TIDE_AVX512 static void matmul_block512_f32(const cpu_wview *w, int64_t r0, int64_t r1,
                                            const cpu_tokens *ts, int32_t t0, int32_t t1) {
    matmul_block_avx512(TIDE_TYPE_F32, w, r0, r1, ts, t0, t1);
}
TIDE_AVX512 static void matmul_block512_f16(const cpu_wview *w, int64_t r0, int64_t r1,
                                            const cpu_tokens *ts, int32_t t0, int32_t t1) {
    matmul_block_avx512(TIDE_TYPE_F16, w, r0, r1, ts, t0, t1);
}
TIDE_AVX512 static void matmul_block512_bf16(const cpu_wview *w, int64_t r0, int64_t r1,
                                             const cpu_tokens *ts, int32_t t0, int32_t t1) {
    matmul_block_avx512(TIDE_TYPE_BF16, w, r0, r1, ts, t0, t1);
}
TIDE_AVX512 static void matmul_block512_q4_0(const cpu_wview *w, int64_t r0, int64_t r1,
                                const cpu_tokens *ts, int32_t t0, int32_t t1) {
    matmul_block_avx512(TIDE_TYPE_Q4_0, w, r0, r1, ts, t0, t1);
}
TIDE_AVX512 static void matmul_block512_q4_k(const cpu_wview *w, int64_t r0, int64_t r1,
                                const cpu_tokens *ts, int32_t t0, int32_t t1) {
    matmul_block_avx512(TIDE_TYPE_Q4_K, w, r0, r1, ts, t0, t1);
}
TIDE_AVX512 static void matmul_block512_q5_k(const cpu_wview *w, int64_t r0, int64_t r1,
                                const cpu_tokens *ts, int32_t t0, int32_t t1) {
    matmul_block_avx512(TIDE_TYPE_Q5_K, w, r0, r1, ts, t0, t1);
}
TIDE_AVX512 static void matmul_block512_q6_k(const cpu_wview *w, int64_t r0, int64_t r1,
                                const cpu_tokens *ts, int32_t t0, int32_t t1) {
    matmul_block_avx512(TIDE_TYPE_Q6_K, w, r0, r1, ts, t0, t1);
}
TIDE_AVX512 static void matmul_block512_q8_0(const cpu_wview *w, int64_t r0, int64_t r1,
                                             const cpu_tokens *ts, int32_t t0, int32_t t1) {
    matmul_block_avx512(TIDE_TYPE_Q8_0, w, r0, r1, ts, t0, t1);
}

TIDE_AVX2 static float dot_f32_avx2(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t nc = n / 8;
    for (int64_t c = 0; c < nc; c++)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + c * 8), _mm256_loadu_ps(b + c * 8), acc);
    int tail = (int)(n - nc * 8);
    if (tail)
        acc = _mm256_fmadd_ps(cpu_load_partial_avx2(a + nc * 8, tail),
                              cpu_load_partial_avx2(b + nc * 8, tail), acc);
    return cpu_hsum8_avx2(acc);
}
#endif /* TIDE_X86 */

float cpu_dot_f32(const tide_cpu_features *f, const float *a, const float *b, int64_t n) {
#ifdef TIDE_X86
    if (f && f->avx2)
        return dot_f32_avx2(a, b, n);
#endif
    (void)f;
    float lanes[8] = {0};
    for (int64_t i = 0; i < n; i++)
        lanes[i & 7] += a[i] * b[i];
    return cpu_hsum8_scalar(lanes);
}

/* Tokens per block: the x rows of a block stay in L2 (about 512 KiB) while the rows pass. */
static int32_t token_block(int64_t cols) {
    int64_t tb = (512 * 1024) / (cols * 4);
    tb = tb / 4 * 4;
    if (tb < 4)
        tb = 4;
    if (tb > 64)
        tb = 64;
    return (int32_t)tb;
}

void cpu_matmul_rows(const tide_cpu_features *f, const tide_matrix *m, int64_t r0, int64_t r1,
                     const cpu_tokens *ts) {
    cpu_wview v = {m->type, m->data, tide_row_bytes(m->type, m->cols), m->cols};
    cpu_matmul_view_rows(f, &v, r0, r1, ts);
}

void cpu_matmul_view_rows(const tide_cpu_features *f, const cpu_wview *w, int64_t r0, int64_t r1,
                          const cpu_tokens *ts) {
    int32_t tb = token_block(w->cols);
    for (int32_t t0 = 0; t0 < ts->n; t0 += tb) {
        int32_t t1 = ts->n - t0 < tb ? ts->n : t0 + tb;
#ifdef TIDE_X86
        if (f && f->avx512) {
            switch (w->type) {
            case TIDE_TYPE_F32: matmul_block512_f32(w, r0, r1, ts, t0, t1); break;
            case TIDE_TYPE_F16: matmul_block512_f16(w, r0, r1, ts, t0, t1); break;
            case TIDE_TYPE_BF16: matmul_block512_bf16(w, r0, r1, ts, t0, t1); break;
            case TIDE_TYPE_Q8_0: matmul_block512_q8_0(w, r0, r1, ts, t0, t1); break;
            case TIDE_TYPE_Q4_0: matmul_block512_q4_0(w, r0, r1, ts, t0, t1); break;
            case TIDE_TYPE_Q4_K: matmul_block512_q4_k(w, r0, r1, ts, t0, t1); break;
            case TIDE_TYPE_Q5_K: matmul_block512_q5_k(w, r0, r1, ts, t0, t1); break;
            case TIDE_TYPE_Q6_K: matmul_block512_q6_k(w, r0, r1, ts, t0, t1); break;
            }
            continue;
        }
        if (f && f->avx2) {
            switch (w->type) {
            case TIDE_TYPE_F32: matmul_block_f32(w, r0, r1, ts, t0, t1); break;
            case TIDE_TYPE_F16: matmul_block_f16(w, r0, r1, ts, t0, t1); break;
            case TIDE_TYPE_BF16: matmul_block_bf16(w, r0, r1, ts, t0, t1); break;
            case TIDE_TYPE_Q8_0: matmul_block_q8_0(w, r0, r1, ts, t0, t1); break;
            case TIDE_TYPE_Q4_0: matmul_block_q4_0(w, r0, r1, ts, t0, t1); break;
            case TIDE_TYPE_Q4_K: matmul_block_q4_k(w, r0, r1, ts, t0, t1); break;
            case TIDE_TYPE_Q5_K: matmul_block_q5_k(w, r0, r1, ts, t0, t1); break;
            case TIDE_TYPE_Q6_K: matmul_block_q6_k(w, r0, r1, ts, t0, t1); break;
            }
            continue;
        }
#endif
        matmul_rows_scalar(w, r0, r1, ts, t0, t1);
    }
}

typedef struct {
    tide_cpu_features f;
    const tide_matrix *w;
    cpu_tokens ts;
} matmul_job;

static void matmul_range(void *p, int64_t r0, int64_t r1) {
    matmul_job *j = p;
    cpu_matmul_rows(&j->f, j->w, r0, r1, &j->ts);
}

/* Rows per thread chunk are rounded to groups of 4 so every thread uses full tiles. */
static void matmul_thread(void *p, int ith, int nth) {
    matmul_job *j = p;
    int64_t groups = (j->w->rows + 3) / 4, b, e;
    tide_chunk(groups, ith, nth, &b, &e);
    b *= 4;
    e *= 4;
    if (e > j->w->rows)
        e = j->w->rows;
    if (b < e)
        matmul_range(j, b, e);
}

tide_status cpu_matmul(tide_pool *pool, const tide_matrix *w, const float *x, int32_t n, float *y) {
    if (!cpu_matrix_ok(w) || n < 0 || (n > 0 && (!x || !y)))
        return TIDE_ERR_ARG;
    if (n == 0 || w->rows == 0)
        return TIDE_OK;
    matmul_job j = {tide_pool_features(pool), w, {x, w->cols, NULL, y, w->rows, NULL, n}};
#ifdef TIDE_AMX
    if (j.f.amx)
        return cpu_matmul_amx(pool, w, x, n, y);
#endif
    tide_pool_run(pool, matmul_thread, &j);
    return TIDE_OK;
}

/* blocks.h: ggml's quantized block layouts, byte for byte, and the one rule that turns a block's
 * bytes into f32 weights. Shared by the C kernels, the quantizer, the loader and the CUDA kernels
 * (TIDE_HD marks the decoders host + device there).
 *
 * Layouts (little endian, no padding; d, dmin are IEEE f16):
 *   q4_0 (32 values, 18 bytes): d, qs[16]; value j < 16 = d * ((qs[j] & 15) - 8),
 *        value j + 16 = d * ((qs[j] >> 4) - 8).
 *   q4_k (256 values, 144 bytes): d, dmin, scales[12], qs[128]. Eight sub-blocks of 32 with a
 *        6-bit scale sc and a 6-bit min m each (packed as tide_k4_scale_min reads them);
 *        value = (d * sc) * q - (dmin * m), q a nibble: for group g = i / 64, i % 64 < 32 reads
 *        the low nibble of qs[32g + i % 32] (sub-block 2g), else the high one (sub-block 2g + 1).
 *   q5_k (256 values, 176 bytes): d, dmin, scales[12], qh[32], qs[128]; as q4_k with a fifth
 *        bit: bit (2g) of qh[i % 32] for the low nibbles of group g, bit (2g + 1) for the high.
 *   q6_k (256 values, 210 bytes): ql[128], qh[64], scales[16] (int8), d. Halves n = i / 128 of
 *        64 ql, 32 qh and 8 scales; within a half j = i % 128, l = j % 32, quarter u = j / 32:
 *        low 4 bits from ql[l + 32 (u & 1)] (low nibble for u < 2, high for u >= 2), high 2 bits
 *        from qh[l] >> 2u; q = those 6 bits - 32; value = (d * scales[l / 16 + 2u]) * q.
 *
 * Exactness: every product above is exact in f32 (an 11-bit f16 times a <= 8-bit scale times a
 * <= 6-bit quant fits in 24 bits), so the only rounding is the final subtraction of q4_k / q5_k.
 * Hence fma(d*sc, q, -(dmin*m)), a separate multiply and subtract, ggml's dequantize_row_* and
 * gguf.quants.dequantize all give the same f32 bits: the weight every backend multiplies with.
 */
#ifndef TIDE_BACKEND_BLOCKS_H
#define TIDE_BACKEND_BLOCKS_H

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__) || defined(TIDE_CUDA_EMU)
#define TIDE_HD __host__ __device__ __forceinline__
#else
#define TIDE_HD static inline
#endif

#define TIDE_QK4_0 32
#define TIDE_Q4_0_BLOCK_BYTES 18
#define TIDE_QK_K 256
#define TIDE_Q4_K_BLOCK_BYTES 144
#define TIDE_Q5_K_BLOCK_BYTES 176
#define TIDE_Q6_K_BLOCK_BYTES 210

/* Byte offsets inside the blocks (the structs would need packing pragmas for q6_k's trailing d). */
enum {
    TIDE_K_OFF_SCALES = 4,   /* q4_k, q5_k: after d, dmin */
    TIDE_Q4K_OFF_QS = 16,
    TIDE_Q5K_OFF_QH = 16,
    TIDE_Q5K_OFF_QS = 48,
    TIDE_Q6K_OFF_QH = 128,
    TIDE_Q6K_OFF_SCALES = 192,
    TIDE_Q6K_OFF_D = 208,
};

/* IEEE f16 bits -> f32, exact (one implementation for host and device decoders). */
TIDE_HD float tide_blk_f16(const uint8_t *p) {
    uint32_t h = (uint32_t)p[0] | ((uint32_t)p[1] << 8);
    uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Scale and min of sub-block j (0..7) of a q4_k / q5_k block's 12 scale bytes. */
TIDE_HD void tide_k4_scale_min(int j, const uint8_t *s, int *sc, int *m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* Value i (0..31) of a q4_0 block. */
TIDE_HD float tide_q4_0_value(const uint8_t *b, int i) {
    int q = i < 16 ? (b[2 + i] & 15) : (b[2 + i - 16] >> 4);
    return tide_blk_f16(b) * (float)(q - 8);
}

/* The quant (0..15 / 0..31) and sub-block of value i (0..255) of a q4_k / q5_k block. */
TIDE_HD int tide_q4_k_quant(const uint8_t *b, int i) {
    int g = i >> 6, l = i & 63;
    const uint8_t *qs = b + TIDE_Q4K_OFF_QS + 32 * g;
    return l < 32 ? (qs[l] & 15) : (qs[l - 32] >> 4);
}
TIDE_HD int tide_q5_k_quant(const uint8_t *b, int i) {
    int g = i >> 6, l = i & 63, hi = l >= 32, ll = l & 31;
    int q = b[TIDE_Q5K_OFF_QS + 32 * g + ll];
    q = hi ? q >> 4 : q & 15;
    return q | (((b[TIDE_Q5K_OFF_QH + ll] >> (2 * g + hi)) & 1) << 4);
}

/* Value i of a q4_k / q5_k block: (d * sc) * q - (dmin * m). */
TIDE_HD float tide_k_min_value(const uint8_t *b, int i, int q) {
    int sc, m;
    tide_k4_scale_min(i >> 5, b + TIDE_K_OFF_SCALES, &sc, &m);
    float D = tide_blk_f16(b) * (float)sc, M = tide_blk_f16(b + 2) * (float)m;
    return D * (float)q - M;
}
TIDE_HD float tide_q4_k_value(const uint8_t *b, int i) { return tide_k_min_value(b, i, tide_q4_k_quant(b, i)); }
TIDE_HD float tide_q5_k_value(const uint8_t *b, int i) { return tide_k_min_value(b, i, tide_q5_k_quant(b, i)); }

/* The quant (-32..31) and the scale index of value i (0..255) of a q6_k block. */
TIDE_HD int tide_q6_k_quant(const uint8_t *b, int i, int *is) {
    int n = i >> 7, j = i & 127, l = j & 31, u = j >> 5;
    const uint8_t *ql = b + 64 * n, *qh = b + TIDE_Q6K_OFF_QH + 32 * n;
    int lo = ql[l + 32 * (u & 1)];
    lo = u >= 2 ? lo >> 4 : lo & 15;
    *is = 8 * n + (l >> 4) + 2 * u;
    return (lo | (((qh[l] >> (2 * u)) & 3) << 4)) - 32;
}
TIDE_HD float tide_q6_k_value(const uint8_t *b, int i) {
    int is, q = tide_q6_k_quant(b, i, &is);
    float D = tide_blk_f16(b + TIDE_Q6K_OFF_D) * (float)(int8_t)b[TIDE_Q6K_OFF_SCALES + is];
    return D * (float)q;
}

#endif /* TIDE_BACKEND_BLOCKS_H */

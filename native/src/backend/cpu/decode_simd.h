/* decode_simd.h: one quantized block -> its f32 weights with AVX2, for matmul.c's block tiles.
 * The values are blocks.h's, bit for bit: products are exact in f32, and the one rounding of
 * q4_k / q5_k is fmsub(d*sc, q, dmin*m) = round(d*sc*q - dmin*m), what the scalar rule gives.
 * Each decoder writes the whole block (32 or 256 floats) into out (any alignment). */
#ifndef TIDE_CPU_DECODE_SIMD_H
#define TIDE_CPU_DECODE_SIMD_H

#include "backend/blocks.h"
#include "backend/cpu/cpu_internal.h"

#ifdef TIDE_X86

/* 8 unsigned bytes -> 8 f32 */
TIDE_AVX2 TIDE_INLINE __m256 dec_u8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
TIDE_AVX2 TIDE_INLINE __m256 dec_i8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }

/* 32 quants (bytes of q) times D minus M, into out[0..32). */
TIDE_AVX2 TIDE_INLINE void dec_store32(__m256i q, __m256 D, __m256 M, float *out, int sub_min) {
    __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    __m128i p[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int k = 0; k < 4; k++) {
        __m256 f = dec_u8x8(p[k]);
        _mm256_storeu_ps(out + 8 * k, sub_min ? _mm256_fmsub_ps(D, f, M) : _mm256_mul_ps(D, f));
    }
}

/* The 32 signed quants of a q4_0 block (q - 8): the low nibbles (values 0-15), then the high. */
TIDE_AVX2 TIDE_INLINE void q4_0_quants32_avx2(const uint8_t *b, __m128i *lo, __m128i *hi) {
    const __m128i m4 = _mm_set1_epi8(15), e8 = _mm_set1_epi8(8);
    __m128i qs = _mm_loadu_si128((const __m128i *)(b + 2));
    *lo = _mm_sub_epi8(_mm_and_si128(qs, m4), e8);
    *hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(qs, 4), m4), e8);
}

TIDE_AVX2 TIDE_INLINE void dec_q4_0_avx2(const uint8_t *b, float *out) {
    __m256 d = _mm256_set1_ps(tide_blk_f16(b));
    __m128i lo, hi;
    q4_0_quants32_avx2(b, &lo, &hi);
    _mm256_storeu_ps(out, _mm256_mul_ps(d, dec_i8x8(lo)));
    _mm256_storeu_ps(out + 8, _mm256_mul_ps(d, dec_i8x8(_mm_srli_si128(lo, 8))));
    _mm256_storeu_ps(out + 16, _mm256_mul_ps(d, dec_i8x8(hi)));
    _mm256_storeu_ps(out + 24, _mm256_mul_ps(d, dec_i8x8(_mm_srli_si128(hi, 8))));
}

/* The 32 unsigned quants of sub-block j (0-7) of a q4_k or q5_k (with_high = 1) block: per group
 * of 64 values, the low nibbles (sub-block 2g) then the high, and q5_k's bit j of each qh byte. */
TIDE_AVX2 TIDE_INLINE __m256i k_min_quants32_avx2(const uint8_t *b, int j, const int with_high) {
    const __m256i m4 = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1);
    const uint8_t *qs = b + (with_high ? TIDE_Q5K_OFF_QS : TIDE_Q4K_OFF_QS);
    __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * (j / 2)));
    __m256i q = _mm256_and_si256((j & 1) ? _mm256_srli_epi16(v, 4) : v, m4);
    if (with_high) {
        __m256i qh = _mm256_loadu_si256((const __m256i *)(b + TIDE_Q5K_OFF_QH));
        __m256i bit = _mm256_and_si256(_mm256_srli_epi16(qh, j), one);
        q = _mm256_or_si256(q, _mm256_slli_epi16(bit, 4));
    }
    return q;
}

/* q4_k and q5_k (with_high = 1): sub-block j's 32 values are d * sc_j * q - dmin * m_j. */
TIDE_AVX2 TIDE_INLINE void dec_k_min_avx2(const uint8_t *b, float *out, const int with_high) {
    float d = tide_blk_f16(b), dmin = tide_blk_f16(b + 2);
    for (int j = 0; j < 8; j++) {
        int sc, m;
        tide_k4_scale_min(j, b + TIDE_K_OFF_SCALES, &sc, &m);
        dec_store32(k_min_quants32_avx2(b, j, with_high), _mm256_set1_ps(d * (float)sc),
                    _mm256_set1_ps(dmin * (float)m), out + 32 * j, 1);
    }
}

/* The 32 signed quants of group u (0-3) of half n (0-1) of a q6_k block: values 128n + 32u + i,
 * i < 16 with scale sc[8n + 2u], i >= 16 with sc[8n + 2u + 1]. */
TIDE_AVX2 TIDE_INLINE __m256i q6_k_quants32_avx2(const uint8_t *b, int n, int u) {
    const __m256i m4 = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3), e32 = _mm256_set1_epi8(32);
    __m256i src = _mm256_loadu_si256((const __m256i *)(b + 64 * n + 32 * (u & 1)));
    __m256i H = _mm256_loadu_si256((const __m256i *)(b + TIDE_Q6K_OFF_QH + 32 * n));
    __m256i lo = _mm256_and_si256(u >= 2 ? _mm256_srli_epi16(src, 4) : src, m4);
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(H, 2 * u), m3);
    return _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), e32);
}

TIDE_AVX2 TIDE_INLINE void dec_q6_k_avx2(const uint8_t *b, float *out) {
    float d = tide_blk_f16(b + TIDE_Q6K_OFF_D);
    const int8_t *sc = (const int8_t *)(b + TIDE_Q6K_OFF_SCALES);
    for (int n = 0; n < 2; n++)
        for (int u = 0; u < 4; u++) {
            __m256i q = q6_k_quants32_avx2(b, n, u);
            __m128i q0 = _mm256_castsi256_si128(q), q1 = _mm256_extracti128_si256(q, 1);
            float *o = out + 128 * n + 32 * u;
            __m256 D0 = _mm256_set1_ps(d * (float)sc[8 * n + 2 * u]);
            __m256 D1 = _mm256_set1_ps(d * (float)sc[8 * n + 2 * u + 1]);
            _mm256_storeu_ps(o, _mm256_mul_ps(D0, dec_i8x8(q0)));
            _mm256_storeu_ps(o + 8, _mm256_mul_ps(D0, dec_i8x8(_mm_srli_si128(q0, 8))));
            _mm256_storeu_ps(o + 16, _mm256_mul_ps(D1, dec_i8x8(q1)));
            _mm256_storeu_ps(o + 24, _mm256_mul_ps(D1, dec_i8x8(_mm_srli_si128(q1, 8))));
        }
}

/* The block decoder of a block type (type is a compile-time constant after inlining). */
TIDE_AVX2 TIDE_INLINE void dec_block_avx2(int32_t type, const uint8_t *b, float *out) {
    switch (type) {
    case TIDE_TYPE_Q4_0: dec_q4_0_avx2(b, out); break;
    case TIDE_TYPE_Q4_K: dec_k_min_avx2(b, out, 0); break;
    case TIDE_TYPE_Q5_K: dec_k_min_avx2(b, out, 1); break;
    case TIDE_TYPE_Q6_K: dec_q6_k_avx2(b, out); break;
    }
}

/* ---- chunk decoders: the values of one 8-value chunk straight into a register -----------------
 * Per block, block_scales_avx2() first turns the block's scales into f32 (D, M: one per sub-block of
 * 32 for q4_k/q5_k, of 16 for q6_k, one for q4_0) and dec_quant_bytes_avx2() a k-quant's quants
 * into bytes (q4_0's come from q4_0_quants32_avx2 in registers), so a chunk costs a widening, a
 * conversion and one fmsub/mul: the same exact values as the block decoders above. */
/* The f16 at p as f32 (F16C: exact, as tide_blk_f16). */
TIDE_AVX2 TIDE_INLINE float f16_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* The k-quant 6-bit scales in 32-bit lanes, tide_k4_scale_min's rule for SIMD: the block's first
 * 16 bytes (d, dmin, then the 12 scale bytes) in each 128-bit lane; per lane (sub-block j, t = 0 for
 * its scale sc, 1 for its min m) a pshufb by KS_IDX(j, t) brings the byte with the low bits to byte
 * 0 and, for j >= 4, the byte whose top two bits are bits 4-5 to byte 1 (0x80: a zero byte); then
 * ((v >> a) & ma) | ((v >> KS_HI_SHIFT) & mb), with a = 4 for the mins of j >= 4 (their low bits
 * are a high nibble), ma = 63 / 15 and mb = 0 / 0x30 for j < 4 / j >= 4. */
#define KS_LO(j, t) ((j) < 4 ? 4 + (j) + 4 * (t) : 8 + (j))
#define KS_HI(j, t) ((j) < 4 ? 0x80 : (j) + 4 * (t))
#define KS_IDX(j, t) ((int)(KS_LO(j, t) | KS_HI(j, t) << 8 | 0x8080u << 16))
#define KS_HI_SHIFT 10   /* byte 1's bits 6-7 to bits 4-5 */

/* The block's scales as f32: d * (float)sc and dmin * (float)m (F16C's conversion is exact like
 * tide_blk_f16, the products are blocks.h's); the k-quants' by the KS_* rule above. */
TIDE_AVX2 TIDE_INLINE void block_scales_avx2(int32_t type, const uint8_t *b, float *D, float *M) {
    if (type == TIDE_TYPE_Q4_0) {
        uint16_t h;
        memcpy(&h, b, 2);
        D[0] = _cvtsh_ss(h);
    } else if (type == TIDE_TYPE_Q6_K) {
        uint16_t h;
        memcpy(&h, b + TIDE_Q6K_OFF_D, 2);
        __m256 d = _mm256_set1_ps(_cvtsh_ss(h));
        __m128i sc = _mm_loadu_si128((const __m128i *)(b + TIDE_Q6K_OFF_SCALES));
        _mm256_storeu_ps(D, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc))));
        _mm256_storeu_ps(D + 8, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8)))));
    } else {
        const __m256i idx_sc = _mm256_setr_epi32(KS_IDX(0, 0), KS_IDX(1, 0), KS_IDX(2, 0), KS_IDX(3, 0),
                                                 KS_IDX(4, 0), KS_IDX(5, 0), KS_IDX(6, 0), KS_IDX(7, 0));
        const __m256i idx_m = _mm256_setr_epi32(KS_IDX(0, 1), KS_IDX(1, 1), KS_IDX(2, 1), KS_IDX(3, 1),
                                                KS_IDX(4, 1), KS_IDX(5, 1), KS_IDX(6, 1), KS_IDX(7, 1));
        const __m256i a_m = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
        const __m256i ma = _mm256_setr_epi32(63, 63, 63, 63, 15, 15, 15, 15);
        const __m256i mb = _mm256_setr_epi32(0, 0, 0, 0, 48, 48, 48, 48);
        __m256i hdr = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)b));
        __m256i vs = _mm256_shuffle_epi8(hdr, idx_sc), vm = _mm256_shuffle_epi8(hdr, idx_m);
        __m256i sc = _mm256_or_si256(_mm256_and_si256(vs, ma), _mm256_and_si256(_mm256_srli_epi32(vs, KS_HI_SHIFT), mb));
        __m256i m = _mm256_or_si256(_mm256_and_si256(_mm256_srlv_epi32(vm, a_m), ma),
                                    _mm256_and_si256(_mm256_srli_epi32(vm, KS_HI_SHIFT), mb));
        _mm256_storeu_ps(D, _mm256_mul_ps(_mm256_set1_ps(f16_at(b)), _mm256_cvtepi32_ps(sc)));
        _mm256_storeu_ps(M, _mm256_mul_ps(_mm256_set1_ps(f16_at(b + 2)), _mm256_cvtepi32_ps(m)));
    }
}

/* A k-quant block's 256 quants as bytes, in value order: q4_k / q5_k unsigned
 * (k_min_quants32_avx2), q6_k as q - 32 (q6_k_quants32_avx2). */
TIDE_AVX2 TIDE_INLINE void dec_quant_bytes_avx2(int32_t type, const uint8_t *b, uint8_t *out) {
    if (type == TIDE_TYPE_Q6_K) {
        for (int n = 0; n < 2; n++)
            for (int u = 0; u < 4; u++)
                _mm256_storeu_si256((__m256i *)(out + 128 * n + 32 * u), q6_k_quants32_avx2(b, n, u));
    } else {
        for (int j = 0; j < 8; j++)
            _mm256_storeu_si256((__m256i *)(out + 32 * j),
                                k_min_quants32_avx2(b, j, type == TIDE_TYPE_Q5_K));
    }
}

/* f32 values of 8 quant bytes (the low 8 of q) with the scales of their sub-block. */
TIDE_AVX2 TIDE_INLINE __m256 dec_values8(int32_t type, __m128i q, const float *D, const float *M, int w0) {
    if (type == TIDE_TYPE_Q4_0)
        return _mm256_mul_ps(_mm256_set1_ps(D[0]), dec_i8x8(q));
    if (type == TIDE_TYPE_Q6_K)
        return _mm256_mul_ps(_mm256_broadcast_ss(D + (w0 >> 4)), dec_i8x8(q));
    return _mm256_fmsub_ps(_mm256_broadcast_ss(D + (w0 >> 5)), dec_u8x8(q), _mm256_broadcast_ss(M + (w0 >> 5)));
}

#endif /* TIDE_X86 */

/* Values and bytes per block of the types decoded block by block (0 for the others). */
TIDE_INLINE int dec_block_elems(int32_t type) {
    return type == TIDE_TYPE_Q4_0 ? 32 : (type == TIDE_TYPE_Q4_K || type == TIDE_TYPE_Q5_K || type == TIDE_TYPE_Q6_K) ? 256 : 0;
}
TIDE_INLINE size_t dec_block_bytes(int32_t type) {
    switch (type) {
    case TIDE_TYPE_Q4_0: return TIDE_Q4_0_BLOCK_BYTES;
    case TIDE_TYPE_Q4_K: return TIDE_Q4_K_BLOCK_BYTES;
    case TIDE_TYPE_Q5_K: return TIDE_Q5_K_BLOCK_BYTES;
    case TIDE_TYPE_Q6_K: return TIDE_Q6_K_BLOCK_BYTES;
    default: return 0;
    }
}

#endif /* TIDE_CPU_DECODE_SIMD_H */

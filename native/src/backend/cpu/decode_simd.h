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

TIDE_AVX2 TIDE_INLINE void dec_q4_0_avx2(const uint8_t *b, float *out) {
    __m256 d = _mm256_set1_ps(tide_blk_f16(b));
    __m128i qs = _mm_loadu_si128((const __m128i *)(b + 2)), m4 = _mm_set1_epi8(15), e8 = _mm_set1_epi8(8);
    __m128i lo = _mm_sub_epi8(_mm_and_si128(qs, m4), e8);
    __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(qs, 4), m4), e8);
    _mm256_storeu_ps(out, _mm256_mul_ps(d, dec_i8x8(lo)));
    _mm256_storeu_ps(out + 8, _mm256_mul_ps(d, dec_i8x8(_mm_srli_si128(lo, 8))));
    _mm256_storeu_ps(out + 16, _mm256_mul_ps(d, dec_i8x8(hi)));
    _mm256_storeu_ps(out + 24, _mm256_mul_ps(d, dec_i8x8(_mm_srli_si128(hi, 8))));
}

/* q4_k and q5_k (with_high = 1): per group of 64, the low nibbles (sub-block 2g) then the high. */
TIDE_AVX2 TIDE_INLINE void dec_k_min_avx2(const uint8_t *b, float *out, const int with_high) {
    float d = tide_blk_f16(b), dmin = tide_blk_f16(b + 2);
    const __m256i m4 = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1);
    const uint8_t *qs = b + (with_high ? TIDE_Q5K_OFF_QS : TIDE_Q4K_OFF_QS);
    __m256i qh = with_high ? _mm256_loadu_si256((const __m256i *)(b + TIDE_Q5K_OFF_QH)) : _mm256_setzero_si256();
    for (int g = 0; g < 4; g++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * g));
        for (int h = 0; h < 2; h++) {
            int sc, m;
            tide_k4_scale_min(2 * g + h, b + TIDE_K_OFF_SCALES, &sc, &m);
            __m256i q = _mm256_and_si256(h ? _mm256_srli_epi16(v, 4) : v, m4);
            if (with_high) {
                __m256i bit = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * g + h), one);
                q = _mm256_or_si256(q, _mm256_slli_epi16(bit, 4));
            }
            dec_store32(q, _mm256_set1_ps(d * (float)sc), _mm256_set1_ps(dmin * (float)m),
                        out + 64 * g + 32 * h, 1);
        }
    }
}

TIDE_AVX2 TIDE_INLINE void dec_q6_k_avx2(const uint8_t *b, float *out) {
    float d = tide_blk_f16(b + TIDE_Q6K_OFF_D);
    const int8_t *sc = (const int8_t *)(b + TIDE_Q6K_OFF_SCALES);
    const __m256i m4 = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3), e32 = _mm256_set1_epi8(32);
    for (int n = 0; n < 2; n++) {
        const uint8_t *ql = b + 64 * n, *qhp = b + TIDE_Q6K_OFF_QH + 32 * n;
        __m256i A = _mm256_loadu_si256((const __m256i *)ql);
        __m256i B = _mm256_loadu_si256((const __m256i *)(ql + 32));
        __m256i H = _mm256_loadu_si256((const __m256i *)qhp);
        for (int u = 0; u < 4; u++) {
            __m256i src = (u & 1) ? B : A;
            __m256i lo = _mm256_and_si256(u >= 2 ? _mm256_srli_epi16(src, 4) : src, m4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(H, 2 * u), m3);
            __m256i q = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), e32);
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

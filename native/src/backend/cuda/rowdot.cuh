/* rowdot.cuh: the one inner loop of every weight product on the device (dense matmul, lm_head,
 * expert FFNs): a warp computes R output rows for T token rows, y[t][r] = dot(W[r], x[t]).
 *
 * - The 32 lanes split the row's columns: lane l takes columns [8l, 8l+8), then +256, ... (the
 *   block types q8_0, q4_0, q4_k, q5_k, q6_k: 32 columns per lane, [32l, 32l+32), then +1024,
 *   ...: one q8_0/q4_0 block or one k-quant sub-block, so a lane reads its scales once). Several warps may split a
 *   row further (part / nparts), their sums then added in warp order by the caller. Weights are read with 16-byte
 *   loads where the row is 16-byte aligned, expanded to f32 in registers and used for all T
 *   tokens, so each weight byte is read once per T tokens.
 * - Accumulation is f32 with a fixed order: each lane sums its columns in order, then a xor
 *   butterfly over the lanes (every lane ends with bit-identical totals). Nothing depends on the
 *   launch shape other than R and T, no atomics: runs are reproducible.
 */
#ifndef TIDE_CUDA_ROWDOT_CUH
#define TIDE_CUDA_ROWDOT_CUH

#include "cuda_common.cuh"
#include "backend/blocks.h"

namespace tide_cuda {

#define TCU_FULL 0xffffffffu

__device__ __forceinline__ float bf16_bits_to_f32(uint32_t h16) { return __uint_as_float(h16 << 16); }
__device__ __forceinline__ float f16_bits_to_f32(uint32_t h16) {
    return __half2float(__ushort_as_half((unsigned short)h16));
}

/* The types stored in blocks of 32 or 256 values (rows are whole blocks). */
__host__ __device__ constexpr bool blocked_type(int wt) {
    return wt == TIDE_TYPE_Q8_0 || wt == TIDE_TYPE_Q4_0 || wt == TIDE_TYPE_Q4_K || wt == TIDE_TYPE_Q5_K ||
           wt == TIDE_TYPE_Q6_K;
}

/* Eight values of a q4_0 / k-quant row, columns c .. c+7 (c a multiple of 8), by blocks.h's
 * rule: the sub-block's scales once, then (d sc) q - (dmin m) or (d sc) q per value (nvcc's fma
 * of an exact product rounds as the separate subtraction does: the same f32 values). */
template <int WT>
__device__ __forceinline__ void kq_load8(const char *row, int64_t c, float w[8]) {
    const uint8_t *r = (const uint8_t *)row;
    if (WT == TIDE_TYPE_Q4_0) {
        const uint8_t *b = r + (c >> 5) * TIDE_Q4_0_BLOCK_BYTES;
        const float d = tide_blk_f16(b);
        const int i0 = (int)(c & 31);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int j = i0 + i;
            const int q = j < 16 ? (b[2 + j] & 15) : (b[2 + j - 16] >> 4);
            w[i] = d * (float)(q - 8);
        }
        return;
    }
    const int i0 = (int)(c & 255);
    if (WT == TIDE_TYPE_Q6_K) {
        const uint8_t *b = r + (c >> 8) * TIDE_Q6_K_BLOCK_BYTES;
        int is;
        tide_q6_k_quant(b, i0, &is); /* the 8 values share one scale */
        const float D = tide_blk_f16(b + TIDE_Q6K_OFF_D) * (float)(int8_t)b[TIDE_Q6K_OFF_SCALES + is];
#pragma unroll
        for (int i = 0; i < 8; i++) w[i] = D * (float)tide_q6_k_quant(b, i0 + i, &is);
        return;
    }
    const uint8_t *b = r + (c >> 8) * (WT == TIDE_TYPE_Q5_K ? TIDE_Q5_K_BLOCK_BYTES : TIDE_Q4_K_BLOCK_BYTES);
    int sc, m;
    tide_k4_scale_min(i0 >> 5, b + TIDE_K_OFF_SCALES, &sc, &m);
    const float D = tide_blk_f16(b) * (float)sc, M = tide_blk_f16(b + 2) * (float)m;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int q = WT == TIDE_TYPE_Q5_K ? tide_q5_k_quant(b, i0 + i) : tide_q4_k_quant(b, i0 + i);
        w[i] = D * (float)q - M;
    }
}

/* One weight value, column c of a row (any alignment). */
template <int WT>
__device__ __forceinline__ float w_load1(const char *row, int64_t c) {
    if (WT == TIDE_TYPE_F32) return __ldg((const float *)row + c);
    if (WT == TIDE_TYPE_F16) return f16_bits_to_f32(__ldg((const unsigned short *)row + c));
    if (WT == TIDE_TYPE_BF16) return bf16_bits_to_f32(__ldg((const unsigned short *)row + c));
    /* q8_0: block of 34 bytes = f16 scale d, 32 int8 */
    const char *blk = row + (c >> 5) * 34;
    float d = f16_bits_to_f32(__ldg((const unsigned short *)blk));
    return d * (float)(signed char)__ldg((const char *)blk + 2 + (c & 31));
}

/* Eight weight values, columns c .. c+7 (c a multiple of 8). `vec`: the row is 16-byte aligned
 * (q8_0: ignored, its blocks are only 2-byte aligned). `full`: all eight are inside the row. */
template <int WT>
__device__ __forceinline__ void w_load8(const char *row, int64_t c, bool vec, bool full, int64_t cols,
                                        float w[8]) {
    if (WT == TIDE_TYPE_Q4_0 || WT == TIDE_TYPE_Q4_K || WT == TIDE_TYPE_Q5_K || WT == TIDE_TYPE_Q6_K) {
        kq_load8<WT>(row, c, w); /* rows are whole blocks: a chunk is always full */
        return;
    }
    if (WT == TIDE_TYPE_Q8_0) {
        /* cols is a multiple of 32 for q8_0, so a chunk is always full */
        const char *blk = row + (c >> 5) * 34;
        float d = f16_bits_to_f32(__ldg((const unsigned short *)blk));
        const unsigned short *q = (const unsigned short *)(blk + 2 + (c & 31));
#pragma unroll
        for (int i = 0; i < 4; i++) {
            unsigned short two = __ldg(q + i);
            w[2 * i] = d * (float)(signed char)(two & 0xff);
            w[2 * i + 1] = d * (float)(signed char)(two >> 8);
        }
        return;
    }
    if (vec && full) {
        if (WT == TIDE_TYPE_F32) {
            const float4 *p = (const float4 *)(row + c * 4);
            float4 a = __ldg(p), b = __ldg(p + 1);
            w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
            w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
        } else {
            uint4 u = __ldg((const uint4 *)(row + c * 2));
            uint32_t v[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
            for (int i = 0; i < 4; i++) {
                if (WT == TIDE_TYPE_BF16) {
                    w[2 * i] = __uint_as_float(v[i] << 16);
                    w[2 * i + 1] = __uint_as_float(v[i] & 0xffff0000u);
                } else {
                    w[2 * i] = f16_bits_to_f32(v[i] & 0xffffu);
                    w[2 * i + 1] = f16_bits_to_f32(v[i] >> 16);
                }
            }
        }
        return;
    }
#pragma unroll
    for (int i = 0; i < 8; i++) w[i] = (c + i < cols) ? w_load1<WT>(row, c + i) : 0.0f;
}

/* Eight activations x[c .. c+7] (zeros past the end). */
__device__ __forceinline__ void x_load8(const float *x, int64_t c, bool vec, bool full, int64_t cols,
                                        float xv[8]) {
    if (vec && full) {
        const float4 *p = (const float4 *)(x + c);
        float4 a = __ldg(p), b = __ldg(p + 1);
        xv[0] = a.x; xv[1] = a.y; xv[2] = a.z; xv[3] = a.w;
        xv[4] = b.x; xv[5] = b.y; xv[6] = b.z; xv[7] = b.w;
        return;
    }
#pragma unroll
    for (int i = 0; i < 8; i++) xv[i] = (c + i < cols) ? __ldg(x + c + i) : 0.0f;
}

/* acc[r][t] = dot(W row rows[r], xs[t]) over `cols` columns, reduced over the warp (every lane
 * gets the totals). rows[] and xs[] must point at valid memory (callers clamp out-of-range
 * indices to a valid row and drop the result). With nparts > 1 the warp computes only part
 * `part` of the columns (chunks part, part + nparts, ...); the caller sums the parts in order. */
template <int WT, int R, int T, int UNROLL = 1>
__device__ __forceinline__ void warp_rowdot(const char *const rows[R], const float *const xs[T],
                                            int64_t cols, bool vec, float acc[R][T], int part = 0,
                                            int nparts = 1) {
    const int lane = threadIdx.x & 31;
    constexpr int SPAN = blocked_type(WT) ? 32 : 8;
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < T; t++) acc[r][t] = 0.0f;

#pragma unroll(UNROLL) /* UNROLL = 2: two chunks' weight loads in flight per warp */
    for (int64_t c0 = ((int64_t)part * 32 + lane) * SPAN; c0 < cols; c0 += (int64_t)nparts * 32 * SPAN) {
#pragma unroll
        for (int s = 0; s < SPAN / 8; s++) {
            const int64_t c = c0 + 8 * s;
            const bool full = c + 8 <= cols;
            float w[R][8];
#pragma unroll
            for (int r = 0; r < R; r++) w_load8<WT>(rows[r], c, vec, full, cols, w[r]);
#pragma unroll
            for (int t = 0; t < T; t++) {
                float xv[8];
                x_load8(xs[t], c, vec, full, cols, xv);
#pragma unroll
                for (int r = 0; r < R; r++)
#pragma unroll
                    for (int i = 0; i < 8; i++) acc[r][t] = fmaf(w[r][i], xv[i], acc[r][t]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < T; t++)
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) acc[r][t] += __shfl_xor_sync(TCU_FULL, acc[r][t], o);
}

/* f(std::integral_constant<int, T>()) for the weight type T = type, so a launcher is written once
 * for every type; TIDE_ERR_UNSUPPORTED (the caller names the op) for a type with no kernel. */
template <int T> struct wtype { static constexpr int value = T; };
template <class F>
static inline tide_status with_weight_type(int32_t type, F f) {
    switch (type) {
    case TIDE_TYPE_F32: return f(wtype<TIDE_TYPE_F32>());
    case TIDE_TYPE_F16: return f(wtype<TIDE_TYPE_F16>());
    case TIDE_TYPE_BF16: return f(wtype<TIDE_TYPE_BF16>());
    case TIDE_TYPE_Q8_0: return f(wtype<TIDE_TYPE_Q8_0>());
    case TIDE_TYPE_Q4_0: return f(wtype<TIDE_TYPE_Q4_0>());
    case TIDE_TYPE_Q4_K: return f(wtype<TIDE_TYPE_Q4_K>());
    case TIDE_TYPE_Q5_K: return f(wtype<TIDE_TYPE_Q5_K>());
    case TIDE_TYPE_Q6_K: return f(wtype<TIDE_TYPE_Q6_K>());
    }
    return TIDE_ERR_UNSUPPORTED;
}

} // namespace tide_cuda

#endif /* TIDE_CUDA_ROWDOT_CUH */

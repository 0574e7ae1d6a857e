/* attention.cu: block-causal GQA attention, f32 throughout.
 *
 * One block per (kv head, chunk of queries): its rows are the chunk's queries times the query
 * heads of the GQA group, up to 16 (LLaDA2.0-mini: 4 queries x 4 heads) or 8 for short batches. The block's warps split
 * the visible keys (warp w takes keys w, w + n_warps, ...); for each key a warp computes q.k for
 * every row that sees it (lane l holds dims l, l+32, ...), and keeps an online softmax (max,
 * sum, weighted V) per row. The warps' partial results are then merged in warp order through
 * shared memory: a fixed order, so runs are reproducible, and a row's arithmetic does not depend
 * on the other rows of its block (a query alone or in a batch gives the same bits). Each key and
 * value row is read once per (kv head, chunk), shared by all its rows.
 */
#include "cuda_common.cuh"

#include <math.h>

namespace tide_cuda {

/* Value idx of a K or V row of type kt (f32, f16 or bf16), as f32. kt is the same for every
 * thread of a launch, so the branch costs no divergence. */
__device__ __forceinline__ float kv_load(const void *base, int64_t idx, int kt) {
    if (kt == TIDE_TYPE_F32) return __ldg((const float *)base + idx);
    const unsigned short h = __ldg((const unsigned short *)base + idx);
    if (kt == TIDE_TYPE_BF16) return __uint_as_float((uint32_t)h << 16);
    return __half2float(__ushort_as_half(h));
}

/* f32 -> bf16, round to nearest even, NaN stays NaN (as the CPU's tide_f32_to_bf16) */
__device__ __forceinline__ unsigned short f32_to_bf16_bits(float f) {
    const uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40);
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

__global__ void k_convert(const float *__restrict__ x, int64_t n, int type, void *__restrict__ y) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        if (type == TIDE_TYPE_F32)
            ((float *)y)[i] = x[i];
        else if (type == TIDE_TYPE_BF16)
            ((unsigned short *)y)[i] = f32_to_bf16_bits(x[i]);
        else
            ((unsigned short *)y)[i] = __half_as_ushort(__float2half_rn(x[i]));
    }
}

tide_status launch_convert(tide_backend *be, const float *x, int64_t n, int32_t type, void *y) {
    if (type != TIDE_TYPE_F32 && type != TIDE_TYPE_F16 && type != TIDE_TYPE_BF16)
        return tide_errf(be->err, sizeof be->err, TIDE_ERR_ARG,
                         "convert: type %d is not f32, f16 or bf16", (int)type);
    if (n <= 0) return TIDE_OK;
    const int64_t want = (n + 255) / 256;
    const unsigned blocks = (unsigned)(want < 4096 ? want : 4096);
    TCU_LAUNCH(k_convert, blocks, 256, 0, S(be)->compute)(x, n, (int)type, y);
    TCU_LAUNCHED(be, "convert kernel launch");
    return TIDE_OK;
}

/* rows of a block: (query, head) pairs, at most AT_MAXR; the shared-memory merge takes them
 * AT_MERGE at a time */
enum { AT_WARPS = 8, AT_MAXG = 8, AT_MERGE = 8 };

/* DPL: dims per lane (head_dim <= 32 * DPL); AT_MAXR: rows per block (8 or 16). The arithmetic
 * of a row is written with explicit fmaf, so both row counts give the same bits. */
template <int DPL, int AT_MAXR>
__global__ void __launch_bounds__(AT_WARPS * 32)
k_attention(tide_attn_shape s, int qb, const float *__restrict__ q, const void *__restrict__ k,
            const void *__restrict__ v, float *__restrict__ out, float scale) {
    TCU_DYN_SHARED(float, sh); /* [AT_WARPS][AT_MERGE][hd] acc, then [AT_WARPS][AT_MERGE] max, sum */
    const int G = s.n_head / s.n_head_kv;
    const int hd = s.head_dim;
    const int kvh = blockIdx.x, q0 = blockIdx.y * qb;
    const int nq = min(qb, s.n_q - q0), R = nq * G;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int lim[AT_MAXR];
    int limit = 0;
#pragma unroll
    for (int r = 0; r < AT_MAXR; r++) {
        const int pos = s.q_pos0 + q0 + r / G;
        const int64_t vis = ((int64_t)(pos / s.block_length) + 1) * s.block_length;
        lim[r] = r < R ? (int)(vis < s.n_kv ? vis : s.n_kv) : 0;
        limit = max(limit, lim[r]);
    }

    float qv[AT_MAXR][DPL], acc[AT_MAXR][DPL], m[AT_MAXR], l[AT_MAXR];
#pragma unroll
    for (int r = 0; r < AT_MAXR; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
        const int64_t qrow = ((int64_t)(q0 + r / G) * s.n_head + kvh * G + r % G) * hd;
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            const int d = lane + 32 * i;
            qv[r][i] = (r < R && d < hd) ? q[qrow + d] : 0.0f;
            acc[r][i] = 0.0f;
        }
    }

    /* each key and value row is read once for the block's R rows: the queries of the chunk
     * times the GQA group */
#pragma unroll 2 /* lets the next key's loads start before this key's shuffles */
    for (int j = warp; j < limit; j += AT_WARPS) {
        const int64_t row = (int64_t)j * s.kv_stride + (int64_t)kvh * hd;
        float kv[DPL], vv[DPL];
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            const int d = lane + 32 * i;
            kv[i] = d < hd ? kv_load(k, row + d, s.kv_type) : 0.0f;
            vv[i] = d < hd ? kv_load(v, row + d, s.kv_type) : 0.0f;
        }
#pragma unroll
        for (int r = 0; r < AT_MAXR; r++) {
            if (j < lim[r]) { /* r < R, and the key is visible to its query */
                float dot = 0.0f;
#pragma unroll
                for (int i = 0; i < DPL; i++) dot = fmaf(qv[r][i], kv[i], dot);
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
                const float sc = dot * scale;
                const float mn = fmaxf(m[r], sc);
                const float corr = expf(m[r] - mn); /* 0 for the first key (m = -inf) */
                const float p = expf(sc - mn);
                l[r] = fmaf(l[r], corr, p);
#pragma unroll
                for (int i = 0; i < DPL; i++) acc[r][i] = fmaf(p, vv[i], acc[r][i] * corr);
                m[r] = mn;
            }
        }
    }

    /* merge the warps' partial results in warp order (fixed: reproducible), AT_MERGE rows at a
     * time through shared memory */
    float *sh_acc = sh;
    float *sh_m = sh + AT_WARPS * AT_MERGE * hd;
    float *sh_l = sh_m + AT_WARPS * AT_MERGE;
#pragma unroll
    for (int r0 = 0; r0 < AT_MAXR; r0 += AT_MERGE) {
        if (r0 >= R) break; /* uniform across the block */
#pragma unroll
        for (int rr = 0; rr < AT_MERGE; rr++) {
            const int r = r0 + rr;
            if (r < R) {
#pragma unroll
                for (int i = 0; i < DPL; i++) {
                    const int d = lane + 32 * i;
                    if (d < hd) sh_acc[(warp * AT_MERGE + rr) * hd + d] = acc[r][i];
                }
                if (lane == 0) {
                    sh_m[warp * AT_MERGE + rr] = m[r];
                    sh_l[warp * AT_MERGE + rr] = l[r];
                }
            }
        }
        __syncthreads();
        const int nr = min((int)AT_MERGE, R - r0);
        for (int idx = threadIdx.x; idx < nr * hd; idx += blockDim.x) {
            const int rr = idx / hd, d = idx % hd, r = r0 + rr;
            float mx = -INFINITY;
            for (int w = 0; w < AT_WARPS; w++) mx = fmaxf(mx, sh_m[w * AT_MERGE + rr]);
            float sum = 0.0f, o = 0.0f;
            for (int w = 0; w < AT_WARPS; w++) {
                const float mw = sh_m[w * AT_MERGE + rr];
                if (mw == -INFINITY) continue; /* a warp that saw no key */
                const float f = expf(mw - mx);
                sum = fmaf(sh_l[w * AT_MERGE + rr], f, sum);
                o = fmaf(sh_acc[(w * AT_MERGE + rr) * hd + d], f, o);
            }
            const int64_t orow = ((int64_t)(q0 + r / G) * s.n_head + kvh * G + r % G) * hd;
            out[orow + d] = sum > 0.0f ? o / sum : 0.0f;
        }
        __syncthreads();
    }
}

tide_status launch_attention(tide_backend *be, const tide_attn_shape *s, const float *q, const void *k,
                             const void *v, float *out) {
    if (!s || !q || !k || !v || !out)
        return tide_errf(be->err, sizeof be->err, TIDE_ERR_ARG, "attention: NULL argument");
    if (s->n_q < 0 || s->n_kv <= 0 || s->block_length <= 0 || s->n_head <= 0 || s->n_head_kv <= 0 ||
        s->n_head % s->n_head_kv != 0 || s->head_dim <= 0 || s->q_pos0 < 0 ||
        s->kv_stride < (int64_t)s->n_head_kv * s->head_dim ||
        (s->kv_type != TIDE_TYPE_F32 && s->kv_type != TIDE_TYPE_F16 && s->kv_type != TIDE_TYPE_BF16))
        return tide_errf(be->err, sizeof be->err, TIDE_ERR_ARG,
                     "attention: bad shape (n_q %d, n_kv %d, block %d, heads %d/%d, head_dim %d, stride %lld, kv type %d)",
                     s->n_q, s->n_kv, s->block_length, s->n_head, s->n_head_kv, s->head_dim,
                     (long long)s->kv_stride, (int)s->kv_type);
    if (s->n_q == 0) return TIDE_OK;
    const int G = s->n_head / s->n_head_kv;
    if (G > AT_MAXG || s->head_dim > 128 || s->n_head_kv > 65535)
        return tide_errf(be->err, sizeof be->err, TIDE_ERR_UNSUPPORTED,
                     "attention: %d query heads per kv head (at most %d), head_dim %d (at most 128)",
                     G, AT_MAXG, s->head_dim);
    /* rows per block: 16 (LLaDA2.0: 4 queries x 4 heads share each K/V load) when that still
     * leaves 256 blocks (a prefill micro-batch), else 8, for more blocks over a short batch */
    int maxr = 16, qb = 16 / G > 0 ? 16 / G : 1;
    if ((int64_t)((s->n_q + qb - 1) / qb) * s->n_head_kv < 256) {
        maxr = 8;
        qb = 8 / G > 0 ? 8 / G : 1;
    }
    const int n_chunks = (s->n_q + qb - 1) / qb;
    if (n_chunks > 65535)
        return tide_errf(be->err, sizeof be->err, TIDE_ERR_UNSUPPORTED,
                         "attention: n_q %d (at most %d)", s->n_q, 65535 * qb);
    const size_t smem = sizeof(float) * ((size_t)AT_WARPS * AT_MERGE * s->head_dim + 2 * (size_t)AT_WARPS * AT_MERGE);
    const float scale = 1.0f / sqrtf((float)s->head_dim);
    dim3 grid((unsigned)s->n_head_kv, (unsigned)n_chunks);
    cudaStream_t cs = S(be)->compute;
#define AT_LAUNCH(DPL)                                                                        \
    do {                                                                                      \
        auto *kern = maxr == 16 ? k_attention<DPL, 16> : k_attention<DPL, 8>;                 \
        TCU_LAUNCH(kern, grid, AT_WARPS * 32, smem, cs)(*s, qb, q, k, v, out, scale);         \
    } while (0)
    if (s->head_dim <= 32)
        AT_LAUNCH(1);
    else if (s->head_dim <= 64)
        AT_LAUNCH(2);
    else
        AT_LAUNCH(4);
#undef AT_LAUNCH
    TCU_LAUNCHED(be, "attention kernel launch");
    return TIDE_OK;
}

} // namespace tide_cuda

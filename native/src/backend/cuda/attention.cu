/* attention.cu: block-causal GQA attention, f32 throughout.
 *
 * One block per (kv head, query). The block's warps split the visible keys (warp w takes keys
 * w, w + n_warps, ...); for each key a warp computes q.k for every query head of the GQA group
 * (lane l holds dims l, l+32, ...), and keeps an online softmax (max, sum, weighted V) per head.
 * The warps' partial results are then merged in warp order through shared memory: a fixed order,
 * so runs are reproducible. Each key and value row is read once per (kv head, query), shared by
 * the group's query heads.
 */
#include "cuda_common.cuh"

#include <math.h>

namespace tide_cuda {

enum { AT_WARPS = 8, AT_MAXG = 8 };

template <int DPL> /* dims per lane: head_dim <= 32 * DPL */
__global__ void __launch_bounds__(AT_WARPS * 32)
k_attention(tide_attn_shape s, const float *__restrict__ q, const float *__restrict__ k,
            const float *__restrict__ v, float *__restrict__ out, float scale) {
    TCU_DYN_SHARED(float, sh); /* [AT_WARPS][G][hd] acc, then [AT_WARPS][G] max, [AT_WARPS][G] sum */
    const int G = s.n_head / s.n_head_kv;
    const int hd = s.head_dim;
    const int kvh = blockIdx.x, qi = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int pos = s.q_pos0 + qi;
    const int64_t vis = ((int64_t)(pos / s.block_length) + 1) * s.block_length;
    const int limit = (int)(vis < s.n_kv ? vis : s.n_kv);
    const int64_t qrow = (int64_t)qi * s.n_head * hd;

    float qv[AT_MAXG][DPL], acc[AT_MAXG][DPL], m[AT_MAXG], l[AT_MAXG];
#pragma unroll
    for (int g = 0; g < AT_MAXG; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            const int d = lane + 32 * i;
            qv[g][i] = (g < G && d < hd) ? q[qrow + (int64_t)(kvh * G + g) * hd + d] : 0.0f;
            acc[g][i] = 0.0f;
        }
    }

#pragma unroll 2 /* lets the next key's loads start before this key's shuffles */
    for (int j = warp; j < limit; j += AT_WARPS) {
        const float *kr = k + (int64_t)j * s.kv_stride + (int64_t)kvh * hd;
        const float *vr = v + (int64_t)j * s.kv_stride + (int64_t)kvh * hd;
        float kv[DPL], vv[DPL];
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            const int d = lane + 32 * i;
            kv[i] = d < hd ? __ldg(kr + d) : 0.0f;
            vv[i] = d < hd ? __ldg(vr + d) : 0.0f;
        }
#pragma unroll
        for (int g = 0; g < AT_MAXG; g++) {
            if (g < G) {
                float dot = 0.0f;
#pragma unroll
                for (int i = 0; i < DPL; i++) dot = fmaf(qv[g][i], kv[i], dot);
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
                const float sc = dot * scale;
                const float mn = fmaxf(m[g], sc);
                const float corr = expf(m[g] - mn); /* 0 for the first key (m = -inf) */
                const float p = expf(sc - mn);
                l[g] = l[g] * corr + p;
#pragma unroll
                for (int i = 0; i < DPL; i++) acc[g][i] = acc[g][i] * corr + p * vv[i];
                m[g] = mn;
            }
        }
    }

    float *sh_acc = sh;
    float *sh_m = sh + AT_WARPS * G * hd;
    float *sh_l = sh_m + AT_WARPS * G;
#pragma unroll
    for (int g = 0; g < AT_MAXG; g++) {
        if (g < G) {
#pragma unroll
            for (int i = 0; i < DPL; i++) {
                const int d = lane + 32 * i;
                if (d < hd) sh_acc[(warp * G + g) * hd + d] = acc[g][i];
            }
            if (lane == 0) {
                sh_m[warp * G + g] = m[g];
                sh_l[warp * G + g] = l[g];
            }
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < G * hd; idx += blockDim.x) {
        const int g = idx / hd, d = idx % hd;
        float mx = -INFINITY;
        for (int w = 0; w < AT_WARPS; w++) mx = fmaxf(mx, sh_m[w * G + g]);
        float sum = 0.0f, o = 0.0f;
        for (int w = 0; w < AT_WARPS; w++) {
            const float mw = sh_m[w * G + g];
            if (mw == -INFINITY) continue; /* a warp that saw no key */
            const float f = expf(mw - mx);
            sum += sh_l[w * G + g] * f;
            o += sh_acc[(w * G + g) * hd + d] * f;
        }
        out[qrow + (int64_t)(kvh * G + g) * hd + d] = o / sum;
    }
}

tide_status launch_attention(tide_backend *be, const tide_attn_shape *s, const float *q, const float *k,
                             const float *v, float *out) {
    if (!s || !q || !k || !v || !out)
        return tide_errf(be->err, sizeof be->err, TIDE_ERR_ARG, "attention: NULL argument");
    if (s->n_q < 0 || s->n_kv <= 0 || s->block_length <= 0 || s->n_head <= 0 || s->n_head_kv <= 0 ||
        s->n_head % s->n_head_kv != 0 || s->head_dim <= 0 || s->q_pos0 < 0 ||
        s->kv_stride < (int64_t)s->n_head_kv * s->head_dim)
        return tide_errf(be->err, sizeof be->err, TIDE_ERR_ARG,
                     "attention: bad shape (n_q %d, n_kv %d, block %d, heads %d/%d, head_dim %d, stride %lld)",
                     s->n_q, s->n_kv, s->block_length, s->n_head, s->n_head_kv, s->head_dim,
                     (long long)s->kv_stride);
    if (s->n_q == 0) return TIDE_OK;
    const int G = s->n_head / s->n_head_kv;
    if (G > AT_MAXG || s->head_dim > 128 || s->n_head_kv > 65535 || s->n_q > 65535)
        return tide_errf(be->err, sizeof be->err, TIDE_ERR_UNSUPPORTED,
                     "attention: %d query heads per kv head (at most %d), head_dim %d (at most 128), n_q %d",
                     G, AT_MAXG, s->head_dim, s->n_q);
    const size_t smem = sizeof(float) * ((size_t)AT_WARPS * G * s->head_dim + 2 * (size_t)AT_WARPS * G);
    const float scale = 1.0f / sqrtf((float)s->head_dim);
    dim3 grid((unsigned)s->n_head_kv, (unsigned)s->n_q);
    cudaStream_t cs = S(be)->compute;
    if (s->head_dim <= 32)
        TCU_LAUNCH(k_attention<1>, grid, AT_WARPS * 32, smem, cs)(*s, q, k, v, out, scale);
    else if (s->head_dim <= 64)
        TCU_LAUNCH(k_attention<2>, grid, AT_WARPS * 32, smem, cs)(*s, q, k, v, out, scale);
    else
        TCU_LAUNCH(k_attention<4>, grid, AT_WARPS * 32, smem, cs)(*s, q, k, v, out, scale);
    TCU_LAUNCHED(be, "attention kernel launch");
    return TIDE_OK;
}

} // namespace tide_cuda

/* head.cu: the greedy head without copying logits back: for each row of logits[n, n_vocab], the
 * first index of the max and its softmax probability 1 / sum(exp(x - max)), in one pass (an
 * online max/sum per thread, 16-byte loads), merged in a fixed order. A block per row. */
#include "cuda_common.cuh"

#include <limits.h>
#include <string.h>

namespace tide_cuda {

enum { HEAD_THREADS = 1024 };

struct msi {
    float m, s; /* running max, sum of exp(x - m) */
    int32_t i;  /* first index of the max */
};

__device__ __forceinline__ void msi_add(msi &a, float x, int32_t i) {
    if (x > a.m) { /* indices arrive in increasing order per thread: strict > keeps the first */
        a.s = a.s * expf(a.m - x) + 1.0f;
        a.m = x;
        a.i = i;
    } else {
        a.s += expf(x - a.m);
    }
}

/* Commutative, so a xor butterfly gives every lane the same bits. */
__device__ __forceinline__ msi msi_merge(msi a, msi b) {
    if (a.m == -INFINITY) return b.m == -INFINITY ? msi{a.m, a.s + b.s, min(a.i, b.i)} : b;
    if (b.m == -INFINITY) return a;
    msi r;
    r.m = fmaxf(a.m, b.m);
    r.s = a.s * expf(a.m - r.m) + b.s * expf(b.m - r.m);
    r.i = a.m > b.m ? a.i : (b.m > a.m ? b.i : min(a.i, b.i));
    return r;
}

__device__ __forceinline__ msi msi_warp(msi a) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        msi b;
        b.m = __shfl_xor_sync(0xffffffffu, a.m, o);
        b.s = __shfl_xor_sync(0xffffffffu, a.s, o);
        b.i = __shfl_xor_sync(0xffffffffu, a.i, o);
        a = msi_merge(a, b);
    }
    return a;
}

__global__ void __launch_bounds__(HEAD_THREADS)
k_argmax_prob(const float *__restrict__ logits, int32_t n_vocab, bool vec, int32_t *tok, float *prob) {
    __shared__ msi sh[32];
    const float *x = logits + (int64_t)blockIdx.x * n_vocab;
    msi a = {-INFINITY, 0.0f, INT_MAX};
    int32_t tail = 0;
    if (vec) {
        const int32_t n4 = n_vocab / 4;
        const float4 *x4 = (const float4 *)x;
        for (int32_t i = threadIdx.x; i < n4; i += blockDim.x) {
            float4 f = __ldg(x4 + i);
            msi_add(a, f.x, 4 * i);
            msi_add(a, f.y, 4 * i + 1);
            msi_add(a, f.z, 4 * i + 2);
            msi_add(a, f.w, 4 * i + 3);
        }
        tail = n4 * 4;
    }
    for (int32_t i = tail + threadIdx.x; i < n_vocab; i += blockDim.x) msi_add(a, __ldg(x + i), i);

    a = msi_warp(a);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) sh[warp] = a;
    __syncthreads();
    if (warp == 0) {
        msi b = lane < nw ? sh[lane] : msi{-INFINITY, 0.0f, INT_MAX};
        b = msi_warp(b);
        if (lane == 0) {
            tok[blockIdx.x] = b.i;
            prob[blockIdx.x] = 1.0f / b.s;
        }
    }
}

tide_status launch_argmax_prob(tide_backend *be, const float *logits, int32_t n, int32_t n_vocab,
                               int32_t *out_token, float *out_prob) {
    if (!logits || n < 0 || n_vocab <= 0 || (n > 0 && (!out_token || !out_prob)))
        return tide_errf(be->err, sizeof be->err, TIDE_ERR_ARG, "argmax_prob: bad arguments (n %d, n_vocab %d)", n, n_vocab);
    if (n == 0) return TIDE_OK;
    state *st = S(be);
    const size_t need = (size_t)n * 8;
    if (need > st->head_bytes || !st->head_h) {
        TCU_CHECK(be, "argmax_prob: cudaStreamSynchronize", cudaStreamSynchronize(st->compute));
        if (st->head_h) cudaFreeHost(st->head_h);
        st->head_h = nullptr;
        dev_free(be, st->head_d);
        st->head_d = nullptr;
        st->head_bytes = 0;
        size_t bytes = need < 4096 ? 4096 : need;
        TCU_CHECK(be, "argmax_prob: cudaMallocHost", cudaMallocHost(&st->head_h, bytes));
        tide_status rc = dev_alloc(be, bytes, &st->head_d);
        if (rc != TIDE_OK) return rc;
        st->head_bytes = bytes;
    }
    int32_t *tok_d = (int32_t *)st->head_d;
    float *prob_d = (float *)((char *)st->head_d + (size_t)n * 4);
    const bool vec = ((uintptr_t)logits & 15) == 0 && n_vocab % 4 == 0;
    TCU_LAUNCH(k_argmax_prob, (unsigned)n, HEAD_THREADS, 0, st->compute)(logits, n_vocab, vec, tok_d, prob_d);
    TCU_LAUNCHED(be, "argmax_prob kernel launch");
    TCU_CHECK(be, "argmax_prob: cudaMemcpyAsync",
              cudaMemcpyAsync(st->head_h, st->head_d, need, cudaMemcpyDeviceToHost, st->compute));
    TCU_CHECK(be, "argmax_prob: waiting for the device (an earlier op may have failed)",
              cudaStreamSynchronize(st->compute));
    memcpy(out_token, st->head_h, (size_t)n * 4);
    memcpy(out_prob, (char *)st->head_h + (size_t)n * 4, (size_t)n * 4);
    return TIDE_OK;
}

} // namespace tide_cuda

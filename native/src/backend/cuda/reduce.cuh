/* reduce.cuh: fixed-order block reductions (no atomics): a xor butterfly inside each warp, then
 * warp 0 combines the warps' values in the same way. Every thread gets the same bits back. */
#ifndef TIDE_CUDA_REDUCE_CUH
#define TIDE_CUDA_REDUCE_CUH

#include "cuda_common.cuh"

namespace tide_cuda {

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* Sum over the block (blockDim.x a multiple of 32, at most 1024). `sh` holds 33 floats. */
__device__ __forceinline__ float block_sum(float v, float *sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float w = lane < nw ? sh[lane] : 0.0f;
        w = warp_sum(w);
        if (lane == 0) sh[32] = w;
    }
    __syncthreads();
    float r = sh[32];
    __syncthreads(); /* sh may be reused by the caller */
    return r;
}

} // namespace tide_cuda

#endif /* TIDE_CUDA_REDUCE_CUH */

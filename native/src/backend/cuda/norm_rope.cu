/* norm_rope.cu: RMSNorm (a block per row, fixed-order sum of squares) and NeoX RoPE on the first
 * rope_dim dims of each head (a thread per rotated pair). Both are tiny next to the weight reads. */
#include "reduce.cuh"

namespace tide_cuda {

__global__ void k_rmsnorm(const float *x, const float *__restrict__ w, int32_t dim, float eps, float *y) {
    __shared__ float sh[33];
    const float *xr = x + (int64_t)blockIdx.x * dim;
    float *yr = y + (int64_t)blockIdx.x * dim;
    float ss = 0.0f;
    for (int32_t i = threadIdx.x; i < dim; i += blockDim.x) ss = fmaf(xr[i], xr[i], ss);
    ss = block_sum(ss, sh);
    /* x * rsqrt(mean(x^2) + eps) * weight, with an exact sqrt and division (rsqrtf is approximate) */
    const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    for (int32_t i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = xr[i] * inv * w[i];
}

tide_status launch_rmsnorm(tide_backend *be, const float *x, const float *weight, int32_t n_rows,
                           int32_t dim, float eps, float *y) {
    if (!x || !weight || !y || n_rows < 0 || dim <= 0)
        return tide_errf(be->err, sizeof be->err, TIDE_ERR_ARG, "rmsnorm: bad arguments (rows %d, dim %d)", n_rows, dim);
    if (n_rows == 0) return TIDE_OK;
    if (n_rows > 2147483647) return tide_errf(be->err, sizeof be->err, TIDE_ERR_ARG, "rmsnorm: too many rows");
    int threads = ((dim / 4 + 31) / 32) * 32;
    threads = threads < 32 ? 32 : (threads > 256 ? 256 : threads);
    TCU_LAUNCH(k_rmsnorm, (unsigned)n_rows, threads, 0, S(be)->compute)(x, weight, dim, eps, y);
    TCU_LAUNCHED(be, "rmsnorm kernel launch");
    return TIDE_OK;
}

__global__ void k_rope(float *x, int32_t n_tok, int64_t stride, int32_t n_head, int32_t head_dim,
                       int32_t rope_dim, int32_t pos0, float theta) {
    const int32_t half = rope_dim / 2;
    const int64_t total = (int64_t)n_tok * n_head * half;
    for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const int32_t j = (int32_t)(idx % half);
        const int32_t h = (int32_t)((idx / half) % n_head);
        const int32_t t = (int32_t)(idx / ((int64_t)half * n_head));
        /* inv_freq and the angle in f32 as the reference computes them; cos/sin of that f32 angle
         * in double so large positions lose nothing more */
        const float inv_freq = (float)(1.0 / pow((double)theta, (double)(2 * j) / (double)rope_dim));
        const float ang = (float)(pos0 + t) * inv_freq;
        double sd, cd;
        sincos((double)ang, &sd, &cd);
        const float c = (float)cd, s = (float)sd;
        float *p = x + (int64_t)t * stride + (int64_t)h * head_dim;
        const float x0 = p[j], x1 = p[j + half];
        p[j] = x0 * c - x1 * s;
        p[j + half] = x1 * c + x0 * s;
    }
}

tide_status launch_rope(tide_backend *be, float *x, int32_t n_tok, int64_t stride, int32_t n_head,
                        int32_t head_dim, int32_t rope_dim, int32_t pos0, float theta) {
    if (!x || n_tok < 0 || n_head <= 0 || head_dim <= 0 || rope_dim < 0 || rope_dim > head_dim ||
        rope_dim % 2 != 0 || stride < (int64_t)n_head * head_dim || pos0 < 0)
        return tide_errf(be->err, sizeof be->err, TIDE_ERR_ARG, "rope: bad arguments (n_tok %d, n_head %d, head_dim %d, rope_dim %d)",
                     n_tok, n_head, head_dim, rope_dim);
    const int64_t total = (int64_t)n_tok * n_head * (rope_dim / 2);
    if (total == 0) return TIDE_OK;
    unsigned blocks = div_up(total, 256);
    if (blocks > 65535u) blocks = 65535u;
    TCU_LAUNCH(k_rope, blocks, 256, 0, S(be)->compute)(x, n_tok, stride, n_head, head_dim, rope_dim, pos0, theta);
    TCU_LAUNCHED(be, "rope kernel launch");
    return TIDE_OK;
}

} // namespace tide_cuda

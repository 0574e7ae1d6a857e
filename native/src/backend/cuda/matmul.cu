/* matmul.cu: y[n, rows] = x[n, cols] @ W^T for weights f32 / f16 / bf16 / q8_0 and f32
 * activations, n small (a block of 32 tokens, the wanted rows for lm_head).
 *
 * One block of up to 4 warps per R = 4 consecutive output rows: the warps split the columns
 * (K), each runs the 4 rows over the tokens in groups of T = 8 (rowdot.cuh), and warp 0 adds the
 * warps' partial sums in warp order (shared memory, no atomics). A weight row is read from HBM
 * once and re-read from L1/L2 for the later token groups; each x value loaded serves 4 rows.
 * Splitting K keeps ~16 warps per multiprocessor even for 2048-row matrices.
 */
#include "rowdot.cuh"

namespace tide_cuda {

enum { MM_WARPS = 4, MM_R = 4, MM_T = 8 };

template <int WT>
__global__ void __launch_bounds__(MM_WARPS * 32)
k_matmul(const char *__restrict__ w, size_t rb, int64_t rows, int64_t cols,
         const float *__restrict__ x, int32_t n, float *__restrict__ y, bool vec) {
    __shared__ float part[MM_WARPS][MM_R][MM_T];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nparts = blockDim.x >> 5;
    const int64_t r0 = (int64_t)blockIdx.x * MM_R;
    const char *rp[MM_R];
#pragma unroll
    for (int r = 0; r < MM_R; r++) rp[r] = w + (size_t)min(r0 + r, rows - 1) * rb;

    for (int32_t t0 = 0; t0 < n; t0 += MM_T) {
        const float *xs[MM_T];
#pragma unroll
        for (int t = 0; t < MM_T; t++) xs[t] = x + (int64_t)min(t0 + t, n - 1) * cols;
        float acc[MM_R][MM_T];
        warp_rowdot<WT, MM_R, MM_T>(rp, xs, cols, vec, acc, warp, nparts);
        if (nparts > 1) {
#pragma unroll
            for (int r = 0; r < MM_R; r++)
#pragma unroll
                for (int t = 0; t < MM_T; t++)
                    if (((r * MM_T + t) & 31) == lane) part[warp][r][t] = acc[r][t];
            __syncthreads();
            if (warp == 0) {
#pragma unroll
                for (int r = 0; r < MM_R; r++)
#pragma unroll
                    for (int t = 0; t < MM_T; t++)
                        if (((r * MM_T + t) & 31) == lane) {
                            float s = part[0][r][t];
                            for (int k = 1; k < nparts; k++) s += part[k][r][t];
                            if (r0 + r < rows && t0 + t < n) y[(int64_t)(t0 + t) * rows + r0 + r] = s;
                        }
            }
            __syncthreads(); /* part is rewritten by the next token group */
        } else {
#pragma unroll
            for (int r = 0; r < MM_R; r++)
#pragma unroll
                for (int t = 0; t < MM_T; t++)
                    if (((r * MM_T + t) & 31) == lane && r0 + r < rows && t0 + t < n)
                        y[(int64_t)(t0 + t) * rows + r0 + r] = acc[r][t];
        }
    }
}

template <int WT>
static tide_status launch_typed(tide_backend *be, const tide_matrix *w, const float *x, int32_t n,
                                float *y, size_t rb, bool vec) {
    /* as many warps per row group as the columns give chunks to (at most 4) */
    const int64_t span = blocked_type(WT) ? 32 : 8;
    int64_t chunks = (w->cols + 32 * span - 1) / (32 * span);
    const int warps = (int)(chunks < (int64_t)MM_WARPS ? chunks : (int64_t)MM_WARPS);
    TCU_LAUNCH(k_matmul<WT>, div_up(w->rows, MM_R), warps * 32, 0, S(be)->compute)((const char *)w->data, rb, w->rows,
                                                                         w->cols, x, n, y, vec);
    TCU_LAUNCHED(be, "matmul kernel launch");
    return TIDE_OK;
}

tide_status launch_matmul(tide_backend *be, const tide_matrix *w, const float *x, int32_t n, float *y) {
    if (!w || !x || !y || n < 0 || w->rows <= 0 || w->cols <= 0)
        return tide_errf(be->err, sizeof be->err, TIDE_ERR_ARG, "matmul: bad arguments (n=%d)", n);
    if (n == 0) return TIDE_OK;
    size_t rb = tide_row_bytes(w->type, w->cols);
    if (rb == 0) /* the shared row rule: unknown type, or q8_0 not a whole number of blocks */
        return tide_errf(be->err, sizeof be->err, TIDE_ERR_UNSUPPORTED, "matmul: weight type %d with %lld columns not supported",
                     (int)w->type, (long long)w->cols);
    /* 16-byte loads when the activation rows and (plain types) the weight rows are 16-byte
     * aligned; block types read their weights bytewise */
    bool vec = ((uintptr_t)x & 15) == 0 && w->cols % 8 == 0;
    if (!blocked_type(w->type)) vec = vec && ((uintptr_t)w->data & 15) == 0 && rb % 16 == 0;
    tide_status st = with_weight_type(w->type, [&](auto wt) {
        return launch_typed<decltype(wt)::value>(be, w, x, n, y, rb, vec);
    });
    if (st == TIDE_ERR_UNSUPPORTED)
        return tide_errf(be->err, sizeof be->err, st, "matmul: unknown weight type %d", (int)w->type);
    return st;
}

} // namespace tide_cuda

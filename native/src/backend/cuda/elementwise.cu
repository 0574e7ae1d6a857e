/* elementwise.cu: add, silu_mul, gather_rows, moe_combine. Grid-stride loops, a thread per
 * element; host-side index lists and router weights travel through the parameter arena. */
#include "cuda_common.cuh"

namespace tide_cuda {

enum { EW_THREADS = 256 };

static unsigned ew_blocks(tide_backend *be, int64_t n) {
    unsigned b = div_up(n, EW_THREADS);
    unsigned cap = (unsigned)S(be)->sm_count * 16;
    return b < cap ? b : cap;
}

#define GRID_STRIDE(i, n)                                                                          \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                      \
         i += (int64_t)gridDim.x * blockDim.x)

__global__ void k_add(float *y, const float *x, int64_t n) {
    GRID_STRIDE(i, n) y[i] += x[i];
}

__global__ void k_silu_mul(float *g, const float *u, int64_t n) {
    GRID_STRIDE(i, n) {
        const float a = g[i];
        g[i] = a / (1.0f + expf(-a)) * u[i];
    }
}

__global__ void k_gather_rows(float *__restrict__ dst, const float *__restrict__ src,
                              const int32_t *__restrict__ rows, int32_t n_rows, int32_t dim) {
    const int64_t n = (int64_t)n_rows * dim;
    GRID_STRIDE(i, n) {
        const int64_t r = i / dim, d = i % dim;
        dst[i] = src[(int64_t)rows[r] * dim + d];
    }
}

/* out[t][d] += w[t,0] * pairs[t,0][d] + w[t,1] * pairs[t,1][d] + ... in k order */
__global__ void k_moe_combine(const float *__restrict__ pairs, const float *__restrict__ w, int32_t n_tok,
                              int32_t n_used, int32_t dim, float *__restrict__ out) {
    const int64_t n = (int64_t)n_tok * dim;
    GRID_STRIDE(i, n) {
        const int64_t t = i / dim, d = i % dim;
        float acc = 0.0f;
        for (int32_t k = 0; k < n_used; k++)
            acc += w[t * n_used + k] * pairs[(t * n_used + k) * dim + d];
        out[i] += acc;
    }
}

tide_status launch_add(tide_backend *be, float *y, const float *x, int64_t n) {
    if (n < 0 || (n > 0 && (!y || !x))) return tide_errf(be->err, sizeof be->err, TIDE_ERR_ARG, "add: bad arguments");
    if (n == 0) return TIDE_OK;
    TCU_LAUNCH(k_add, ew_blocks(be, n), EW_THREADS, 0, S(be)->compute)(y, x, n);
    TCU_LAUNCHED(be, "add kernel launch");
    return TIDE_OK;
}

tide_status launch_silu_mul(tide_backend *be, float *g, const float *u, int64_t n) {
    if (n < 0 || (n > 0 && (!g || !u))) return tide_errf(be->err, sizeof be->err, TIDE_ERR_ARG, "silu_mul: bad arguments");
    if (n == 0) return TIDE_OK;
    TCU_LAUNCH(k_silu_mul, ew_blocks(be, n), EW_THREADS, 0, S(be)->compute)(g, u, n);
    TCU_LAUNCHED(be, "silu_mul kernel launch");
    return TIDE_OK;
}

tide_status launch_gather_rows(tide_backend *be, float *dst, const float *src, const int32_t *rows,
                               int32_t n_rows, int32_t dim) {
    if (n_rows < 0 || dim <= 0 || (n_rows > 0 && (!dst || !src || !rows)))
        return tide_errf(be->err, sizeof be->err, TIDE_ERR_ARG, "gather_rows: bad arguments (rows %d, dim %d)", n_rows, dim);
    if (n_rows == 0) return TIDE_OK;
    for (int32_t i = 0; i < n_rows; i++)
        if (rows[i] < 0) return tide_errf(be->err, sizeof be->err, TIDE_ERR_ARG, "gather_rows: row %d is %d", i, rows[i]);
    void *rows_d = nullptr;
    tide_status rc = arena_put(be, rows, (size_t)n_rows * sizeof(int32_t), &rows_d);
    if (rc != TIDE_OK) return rc;
    const int64_t n = (int64_t)n_rows * dim;
    TCU_LAUNCH(k_gather_rows, ew_blocks(be, n), EW_THREADS, 0, S(be)->compute)(dst, src, (const int32_t *)rows_d,
                                                                      n_rows, dim);
    TCU_LAUNCHED(be, "gather_rows kernel launch");
    return TIDE_OK;
}

tide_status launch_moe_combine(tide_backend *be, const float *pairs, const float *w, int32_t n_tok,
                               int32_t n_used, int32_t dim, float *out) {
    if (n_tok < 0 || n_used <= 0 || dim <= 0 || (n_tok > 0 && (!pairs || !w || !out)))
        return tide_errf(be->err, sizeof be->err, TIDE_ERR_ARG, "moe_combine: bad arguments (n_tok %d, n_used %d, dim %d)", n_tok,
                     n_used, dim);
    if (n_tok == 0) return TIDE_OK;
    void *w_d = nullptr;
    tide_status rc = arena_put(be, w, (size_t)n_tok * n_used * sizeof(float), &w_d);
    if (rc != TIDE_OK) return rc;
    const int64_t n = (int64_t)n_tok * dim;
    TCU_LAUNCH(k_moe_combine, ew_blocks(be, n), EW_THREADS, 0, S(be)->compute)(pairs, (const float *)w_d, n_tok,
                                                                      n_used, dim, out);
    TCU_LAUNCHED(be, "moe_combine kernel launch");
    return TIDE_OK;
}

} // namespace tide_cuda

/* experts.cu: one MoE layer's device experts in two launches, whatever the number of experts.
 *
 *   1. gate/up: grid (row tile, job). A warp takes 4 rows of gate and the same 4 rows of up of
 *      its job's expert, runs them over the job's token rows 4 at a time (x rows gathered
 *      through pair_token), and writes hidden[p][r] = silu(gate) * up for each pair p of the job.
 *   2. down: grid (row tile, job). A warp takes 4 rows of down over the hidden rows of the job's
 *      pairs and writes them to out[pair_dest[p]].
 *
 * The batch metadata (the job table and the pair lists) goes to the device in one async copy
 * through the parameter arena. Every job must have the same shapes and weight types (one layer's
 * experts always do): gate and up of one type, down of one type (a quantization mix may keep
 * down finer); the kernels are memory-bound for the usual 1-8 pairs per expert.
 */
#include "rowdot.cuh"

#include <algorithm>

namespace tide_cuda {

enum { EX_WARPS = 4, EX_RGU = 4, EX_RD = 4, EX_T = 4 }; /* rows per warp: gate+up, down */

struct job_desc {
    const char *gate, *up, *down;
    int32_t p0, p1; /* pairs p0 .. p1-1 */
};

__device__ __forceinline__ float silu_f(float g) { return g / (1.0f + expf(-g)); }

template <int WT>
__global__ void __launch_bounds__(EX_WARPS * 32)
k_gate_up(const job_desc *__restrict__ jobs, const int32_t *__restrict__ pair_token,
          const float *__restrict__ x, int32_t dim, int32_t n_ff, size_t rb, bool vec,
          float *__restrict__ hidden) {
    const job_desc j = jobs[blockIdx.y];
    if (j.p0 >= j.p1) return;
    const int lane = threadIdx.x & 31;
    const int r0 = (blockIdx.x * EX_WARPS + (threadIdx.x >> 5)) * EX_RGU;
    if (r0 >= n_ff) return;
    const char *gp[EX_RGU], *up[EX_RGU];
#pragma unroll
    for (int r = 0; r < EX_RGU; r++) {
        size_t off = (size_t)min(r0 + r, n_ff - 1) * rb;
        gp[r] = j.gate + off;
        up[r] = j.up + off;
    }
    for (int p = j.p0; p < j.p1; p += EX_T) {
        const float *xs[EX_T];
#pragma unroll
        for (int t = 0; t < EX_T; t++) xs[t] = x + (int64_t)pair_token[min(p + t, j.p1 - 1)] * dim;
        /* gate, then up (the x rows come from L1 the second time); fusing both into one pass of
         * 8 rows needs ~210 registers and halves the warps per SM: no more bytes in flight */
        float g[EX_RGU][EX_T], u[EX_RGU][EX_T];
        warp_rowdot<WT, EX_RGU, EX_T, 2>(gp, xs, dim, vec, g);
        warp_rowdot<WT, EX_RGU, EX_T, 2>(up, xs, dim, vec, u);
#pragma unroll
        for (int r = 0; r < EX_RGU; r++)
#pragma unroll
            for (int t = 0; t < EX_T; t++)
                if (((r * EX_T + t) & 31) == lane && r0 + r < n_ff && p + t < j.p1)
                    hidden[(int64_t)(p + t) * n_ff + r0 + r] = silu_f(g[r][t]) * u[r][t];
    }
}

template <int WT>
__global__ void __launch_bounds__(EX_WARPS * 32)
k_down(const job_desc *__restrict__ jobs, const int32_t *__restrict__ pair_dest,
       const float *__restrict__ hidden, int32_t dim, int32_t n_ff, size_t rb, bool vec,
       float *__restrict__ out) {
    const job_desc j = jobs[blockIdx.y];
    if (j.p0 >= j.p1) return;
    const int lane = threadIdx.x & 31;
    const int r0 = (blockIdx.x * EX_WARPS + (threadIdx.x >> 5)) * EX_RD;
    if (r0 >= dim) return;
    const char *dp[EX_RD];
#pragma unroll
    for (int r = 0; r < EX_RD; r++) dp[r] = j.down + (size_t)min(r0 + r, dim - 1) * rb;
    for (int p = j.p0; p < j.p1; p += EX_T) {
        const float *hs[EX_T];
#pragma unroll
        for (int t = 0; t < EX_T; t++) hs[t] = hidden + (int64_t)min(p + t, j.p1 - 1) * n_ff;
        float acc[EX_RD][EX_T];
        warp_rowdot<WT, EX_RD, EX_T, 2>(dp, hs, n_ff, vec, acc);
#pragma unroll
        for (int r = 0; r < EX_RD; r++)
#pragma unroll
            for (int t = 0; t < EX_T; t++)
                if (((r * EX_T + t) & 31) == lane && r0 + r < dim && p + t < j.p1)
                    out[(int64_t)pair_dest[p + t] * dim + r0 + r] = acc[r][t];
    }
}

/* One kernel over grid (row tile, job): EX_WARPS warps a block, ROWS_PER_WARP of the `rows`
 * output rows a warp; `what` names the launch in the error message. */
template <int ROWS_PER_WARP, class Kernel, class... Args>
static tide_status launch_jobs(tide_backend *be, const char *what, Kernel kernel, int64_t rows, int32_t n_jobs,
                               Args... args) {
    dim3 grid(div_up(rows, EX_WARPS * ROWS_PER_WARP), (unsigned)n_jobs);
    TCU_LAUNCH(kernel, grid, EX_WARPS * 32, 0, S(be)->compute)(args...);
    TCU_LAUNCHED(be, what);
    return TIDE_OK;
}

tide_status launch_experts(tide_backend *be, const tide_expert_batch *b, const float *x, int32_t dim,
                           float *out) {
    if (!b || !x || !out || dim <= 0 || b->n_jobs < 0)
        return tide_errf(be->err, sizeof be->err, TIDE_ERR_ARG, "experts: bad arguments");
    if (b->n_jobs == 0) return TIDE_OK;
    if (b->n_jobs > 65535) return tide_errf(be->err, sizeof be->err, TIDE_ERR_ARG, "experts: %d jobs (at most 65535)", b->n_jobs);
    const int32_t n_jobs = b->n_jobs;
    const int32_t n_pairs = b->pair_start[n_jobs];
    if (b->pair_start[0] < 0 || n_pairs < b->pair_start[0])
        return tide_errf(be->err, sizeof be->err, TIDE_ERR_ARG, "experts: bad pair_start (%d .. %d)", b->pair_start[0], n_pairs);
    if (n_pairs == b->pair_start[0]) return TIDE_OK;
    for (int32_t p = b->pair_start[0]; p < n_pairs; p++)
        if (b->pair_token[p] < 0 || b->pair_dest[p] < 0)
            return tide_errf(be->err, sizeof be->err, TIDE_ERR_ARG, "experts: pair %d has token %d, dest %d", p, b->pair_token[p],
                         b->pair_dest[p]);

    /* every job: same types and shapes, gate/up [n_ff, dim], down [dim, n_ff] */
    const int32_t type = b->gate[0].type, type_d = b->down[0].type;
    const int64_t n_ff = b->gate[0].rows;
    if (n_ff <= 0 || n_ff > INT32_MAX) return tide_errf(be->err, sizeof be->err, TIDE_ERR_ARG, "experts: bad n_ff %lld", (long long)n_ff);
    bool aligned = true;
    std::vector<job_desc> jobs;
    try {
        jobs.resize((size_t)n_jobs);
    } catch (...) {
        return tide_errf(be->err, sizeof be->err, TIDE_ERR_NOMEM, "experts: host out of memory");
    }
    for (int32_t j = 0; j < n_jobs; j++) {
        const tide_matrix *g = &b->gate[j], *u = &b->up[j], *d = &b->down[j];
        if (g->type != type || u->type != type || d->type != type_d)
            return tide_errf(be->err, sizeof be->err, TIDE_ERR_UNSUPPORTED,
                         "experts: job %d has weight types (%d, %d, %d); gate and up must be the "
                         "first job's gate type %d, down its down type %d",
                         j, (int)g->type, (int)u->type, (int)d->type, (int)type, (int)type_d);
        if (g->rows != n_ff || u->rows != n_ff || g->cols != dim || u->cols != dim || d->rows != dim ||
            d->cols != n_ff)
            return tide_errf(be->err, sizeof be->err, TIDE_ERR_ARG,
                         "experts: job %d shapes gate %lldx%lld up %lldx%lld down %lldx%lld, expected "
                         "%lldx%d, %lldx%d, %dx%lld",
                         j, (long long)g->rows, (long long)g->cols, (long long)u->rows, (long long)u->cols,
                         (long long)d->rows, (long long)d->cols, (long long)n_ff, dim, (long long)n_ff,
                         dim, dim, (long long)n_ff);
        if (b->pair_start[j + 1] < b->pair_start[j])
            return tide_errf(be->err, sizeof be->err, TIDE_ERR_ARG, "experts: pair_start decreases at job %d", j);
        if (!g->data || !u->data || !d->data)
            return tide_errf(be->err, sizeof be->err, TIDE_ERR_ARG, "experts: job %d has a NULL weight", j);
        aligned = aligned && (((uintptr_t)g->data | (uintptr_t)u->data | (uintptr_t)d->data) & 15) == 0;
        jobs[(size_t)j] = job_desc{(const char *)g->data, (const char *)u->data, (const char *)d->data,
                                   b->pair_start[j], b->pair_start[j + 1]};
    }
    const size_t rb_gu = tide_row_bytes(type, dim), rb_d = tide_row_bytes(type_d, n_ff);
    if (rb_gu == 0 || rb_d == 0) /* the shared row rule (backend.h) */
        return tide_errf(be->err, sizeof be->err, TIDE_ERR_UNSUPPORTED, "experts: weight types %d, %d with dims %d, %lld not supported",
                     (int)type, (int)type_d, dim, (long long)n_ff);

    state *st = S(be);
    tide_status rc = scratch_reserve(be, (void **)&st->hidden, &st->hidden_bytes,
                                     (size_t)n_pairs * (size_t)n_ff * sizeof(float));
    if (rc != TIDE_OK) return rc;

    const void *srcs[3] = {jobs.data(), b->pair_token, b->pair_dest};
    const size_t ns[3] = {jobs.size() * sizeof(job_desc), (size_t)n_pairs * 4, (size_t)n_pairs * 4};
    void *dp[3];
    rc = arena_put_many(be, 3, srcs, ns, dp);
    if (rc != TIDE_OK) return rc;

    bool vec_gu = ((uintptr_t)x & 15) == 0 && dim % 8 == 0;
    bool vec_d = n_ff % 8 == 0; /* hidden comes from cudaMalloc: aligned */
    if (!blocked_type(type)) vec_gu = vec_gu && aligned && rb_gu % 16 == 0;
    if (!blocked_type(type_d)) vec_d = vec_d && aligned && rb_d % 16 == 0;
    const job_desc *jd = (const job_desc *)dp[0];
    const int32_t *td = (const int32_t *)dp[1], *dd = (const int32_t *)dp[2];
    rc = with_weight_type(type, [&](auto wt) {
        return launch_jobs<EX_RGU>(be, "experts gate/up kernel launch", k_gate_up<decltype(wt)::value>, n_ff,
                                   n_jobs, jd, td, x, dim, (int32_t)n_ff, rb_gu, vec_gu, st->hidden);
    });
    if (rc == TIDE_OK)
        rc = with_weight_type(type_d, [&](auto wt) {
            return launch_jobs<EX_RD>(be, "experts down kernel launch", k_down<decltype(wt)::value>, dim, n_jobs,
                                      jd, dd, st->hidden, dim, (int32_t)n_ff, rb_d, vec_d, out);
        });
    if (rc == TIDE_ERR_UNSUPPORTED)
        return tide_errf(be->err, sizeof be->err, rc, "experts: unknown weight type %d or %d", (int)type,
                         (int)type_d);
    return rc;
}

} // namespace tide_cuda

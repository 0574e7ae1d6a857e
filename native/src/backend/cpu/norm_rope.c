/* norm_rope.c: RMSNorm, per-head RMSNorm, NeoX RoPE and the elementwise ops. */
#include "backend/cpu/cpu_internal.h"

#include <math.h>

/* Below this many floats an elementwise op runs on the calling thread: waking workers costs
 * more than the work. */
#define ELEMWISE_PAR_MIN (1 << 16)

/* ---- rmsnorm -------------------------------------------------------------------------------- */
static void rmsnorm_row(const tide_cpu_features *f, const float *x, const float *w, int64_t dim,
                        float eps, float *y) {
    float ss = cpu_dot_f32(f, x, x, dim);
    float scale = 1.0f / sqrtf(ss / (float)dim + eps);
    if (w)
        for (int64_t i = 0; i < dim; i++)
            y[i] = (x[i] * scale) * w[i];
    else
        for (int64_t i = 0; i < dim; i++)
            y[i] = x[i] * scale;
}

typedef struct {
    tide_cpu_features f;
    const float *x, *w;
    float *y;
    int32_t dim;
    float eps;
} rmsnorm_job;

static void rmsnorm_range(void *p, int64_t b, int64_t e) {
    rmsnorm_job *j = p;
    for (int64_t r = b; r < e; r++)
        rmsnorm_row(&j->f, j->x + r * j->dim, j->w, j->dim, j->eps, j->y + r * j->dim);
}

tide_status cpu_rmsnorm(tide_pool *pool, const float *x, const float *weight, int32_t n_rows,
                        int32_t dim, float eps, float *y) {
    if (n_rows < 0 || dim < 1 || (n_rows > 0 && (!x || !y)))
        return TIDE_ERR_ARG;
    rmsnorm_job j = {tide_pool_features(pool), x, weight, y, dim, eps};
    if ((int64_t)n_rows * dim < ELEMWISE_PAR_MIN)
        rmsnorm_range(&j, 0, n_rows);
    else
        tide_pool_for(pool, n_rows, rmsnorm_range, &j);
    return TIDE_OK;
}

typedef struct {
    tide_cpu_features f;
    float *x;
    int64_t stride;
    int32_t n_head, head_dim;
    const float *w;
    float eps;
} rmsnorm_heads_job;

static void rmsnorm_heads_range(void *p, int64_t b, int64_t e) {
    rmsnorm_heads_job *j = p;
    for (int64_t i = b; i < e; i++) {
        float *h = j->x + (i / j->n_head) * j->stride + (i % j->n_head) * j->head_dim;
        rmsnorm_row(&j->f, h, j->w, j->head_dim, j->eps, h);
    }
}

tide_status cpu_rmsnorm_heads(tide_pool *pool, float *x, int32_t n_tok, int64_t stride,
                              int32_t n_head, int32_t head_dim, const float *weight, float eps) {
    if (n_tok < 0 || n_head < 1 || head_dim < 1 || stride < (int64_t)n_head * head_dim ||
        (n_tok > 0 && !x))
        return TIDE_ERR_ARG;
    rmsnorm_heads_job j = {tide_pool_features(pool), x, stride, n_head, head_dim, weight, eps};
    int64_t n = (int64_t)n_tok * n_head;
    if (n * head_dim < ELEMWISE_PAR_MIN)
        rmsnorm_heads_range(&j, 0, n);
    else
        tide_pool_for(pool, n, rmsnorm_heads_range, &j);
    return TIDE_OK;
}

/* ---- rope ----------------------------------------------------------------------------------- */
typedef struct {
    float *x;
    int64_t stride;
    int32_t n_head, head_dim, rope_dim, pos0;
    float theta;
} rope_job;

static void rope_range(void *p, int64_t b, int64_t e) {
    rope_job *j = p;
    int half = j->rope_dim / 2;
    float cs[512], sn[512]; /* half <= 512: checked by cpu_rope */
    for (int64_t t = b; t < e; t++) {
        float pos = (float)(j->pos0 + t);
        for (int i = 0; i < half; i++) {
            /* as HF: inv_freq = 1 / theta^(2i/d) in f32, freqs = pos * inv_freq in f32 */
            float inv_freq = 1.0f / powf(j->theta, (float)(2 * i) / (float)j->rope_dim);
            float a = pos * inv_freq;
            cs[i] = cosf(a);
            sn[i] = sinf(a);
        }
        float *row = j->x + t * j->stride;
        for (int h = 0; h < j->n_head; h++) {
            float *v = row + (int64_t)h * j->head_dim;
            for (int i = 0; i < half; i++) {
                float x0 = v[i], x1 = v[i + half];
                v[i] = x0 * cs[i] - x1 * sn[i];
                v[i + half] = x1 * cs[i] + x0 * sn[i];
            }
        }
    }
}

tide_status cpu_rope(tide_pool *pool, float *x, int32_t n_tok, int64_t stride, int32_t n_head,
                     int32_t head_dim, int32_t rope_dim, int32_t pos0, float theta) {
    if (n_tok < 0 || n_head < 1 || head_dim < 1 || rope_dim < 0 || rope_dim % 2 ||
        rope_dim > head_dim || rope_dim > 1024 || stride < (int64_t)n_head * head_dim ||
        pos0 < 0 || !(theta > 0.0f) || (n_tok > 0 && !x))
        return TIDE_ERR_ARG;
    if (rope_dim == 0 || n_tok == 0)
        return TIDE_OK;
    rope_job j = {x, stride, n_head, head_dim, rope_dim, pos0, theta};
    if ((int64_t)n_tok * n_head * rope_dim < ELEMWISE_PAR_MIN)
        rope_range(&j, 0, n_tok);
    else
        tide_pool_for(pool, n_tok, rope_range, &j);
    return TIDE_OK;
}

/* ---- elementwise ---------------------------------------------------------------------------- */
typedef struct {
    float *y;
    const float *x;
} ew_job;

static void add_range(void *p, int64_t b, int64_t e) {
    ew_job *j = p;
    for (int64_t i = b; i < e; i++)
        j->y[i] += j->x[i];
}

void cpu_add(tide_pool *pool, float *y, const float *x, int64_t n) {
    ew_job j = {y, x};
    if (n < ELEMWISE_PAR_MIN)
        add_range(&j, 0, n);
    else
        tide_pool_for(pool, n, add_range, &j);
}

static void silu_mul_range(void *p, int64_t b, int64_t e) {
    ew_job *j = p;
    for (int64_t i = b; i < e; i++) {
        float g = j->y[i];
        j->y[i] = (g / (1.0f + expf(-g))) * j->x[i];
    }
}

void cpu_silu_mul(tide_pool *pool, float *g, const float *u, int64_t n) {
    ew_job j = {g, u};
    if (n < ELEMWISE_PAR_MIN / 8)
        silu_mul_range(&j, 0, n);
    else
        tide_pool_for(pool, n, silu_mul_range, &j);
}

void cpu_gather_rows(tide_pool *pool, float *dst, const float *src, const int32_t *rows,
                     int32_t n_rows, int32_t dim) {
    (void)pool;
    for (int32_t i = 0; i < n_rows; i++)
        memmove(dst + (int64_t)i * dim, src + (int64_t)rows[i] * dim, (size_t)dim * sizeof(float));
}

/* experts.c: the routed-expert FFNs of one MoE layer (backend.h experts op) and the combine.
 *
 * Phase 1 (work items: every gate/up row of every job): H[p][r] = silu(gate_r . x_p) * (up_r . x_p)
 * for all pairs p of the job, reading each weight row once for all of them. Phase 2 (every down
 * row of every job): out[pair_dest[p]][r] = down_r . H[p]. Threads split the flattened rows of
 * each phase; every dot is the canonical one, so results never depend on the split.
 */
#include "backend/cpu/cpu_internal.h"

#include <math.h>
#include <stdlib.h>

typedef struct {
    tide_cpu_features f;
    const tide_expert_batch *b;
    const float *x;
    int32_t dim;
    float *out;
    int64_t ff;        /* max gate rows: stride of H and U */
    float *h;          /* [n_pairs, ff] */
    float *u;          /* [n_pairs, ff] */
    int64_t *row_off;  /* [n_jobs + 1]: prefix sums of the rows of the current phase */
    int phase;
} experts_job;

static void experts_thread(void *p, int ith, int nth) {
    experts_job *j = p;
    const tide_expert_batch *b = j->b;
    int64_t total = j->row_off[b->n_jobs], r0, r1;
    tide_chunk(total, ith, nth, &r0, &r1);
    if (r0 >= r1)
        return;
    /* first job whose row range contains r0 */
    int32_t job = 0;
    while (j->row_off[job + 1] <= r0)
        job++;
    for (; job < b->n_jobs && j->row_off[job] < r1; job++) {
        int64_t base = j->row_off[job];
        int64_t a = r0 > base ? r0 - base : 0;
        int64_t z = (r1 < j->row_off[job + 1] ? r1 : j->row_off[job + 1]) - base;
        int32_t p0 = b->pair_start[job], np = b->pair_start[job + 1] - p0;
        if (np <= 0 || a >= z)
            continue;
        if (j->phase == 1) {
            cpu_tokens g = {j->x, j->dim, b->pair_token + p0, j->h + (int64_t)p0 * j->ff, j->ff,
                            NULL, np};
            cpu_matmul_rows(&j->f, &b->gate[job], a, z, &g);
            cpu_tokens u = g;
            u.y = j->u + (int64_t)p0 * j->ff;
            cpu_matmul_rows(&j->f, &b->up[job], a, z, &u);
            for (int32_t q = 0; q < np; q++) {
                float *hh = j->h + (int64_t)(p0 + q) * j->ff;
                const float *uu = j->u + (int64_t)(p0 + q) * j->ff;
                for (int64_t r = a; r < z; r++) {
                    float gv = hh[r];
                    hh[r] = (gv / (1.0f + expf(-gv))) * uu[r];
                }
            }
        } else {
            cpu_tokens d = {j->h + (int64_t)p0 * j->ff, j->ff, NULL, j->out, j->dim,
                            b->pair_dest + p0, np};
            cpu_matmul_rows(&j->f, &b->down[job], a, z, &d);
        }
    }
}

tide_status cpu_experts(tide_pool *pool, const tide_expert_batch *b, const float *x, int32_t dim,
                        float *out) {
    if (!b || b->n_jobs < 0 || dim < 1)
        return TIDE_ERR_ARG;
    if (b->n_jobs == 0)
        return TIDE_OK;
    if (!b->gate || !b->up || !b->down || !b->pair_start || !x || !out)
        return TIDE_ERR_ARG;
    int64_t ff = 0;
    int32_t n_pairs = b->pair_start[b->n_jobs];
    if (b->pair_start[0] != 0 || n_pairs < 0)
        return TIDE_ERR_ARG;
    for (int32_t i = 0; i < b->n_jobs; i++) {
        const tide_matrix *g = &b->gate[i], *u = &b->up[i], *d = &b->down[i];
        if (b->pair_start[i + 1] < b->pair_start[i])
            return TIDE_ERR_ARG;
        if (b->pair_start[i + 1] == b->pair_start[i])
            continue; /* an expert with no pairs is never read */
        if (!cpu_matrix_ok(g) || !cpu_matrix_ok(u) || !cpu_matrix_ok(d) || g->cols != dim ||
            u->cols != dim || u->rows != g->rows || d->cols != g->rows || d->rows != dim)
            return TIDE_ERR_ARG;
        if (g->rows > ff)
            ff = g->rows;
    }
    if (n_pairs == 0)
        return TIDE_OK;
    if (!b->pair_token || !b->pair_dest)
        return TIDE_ERR_ARG;
    size_t hsz = (size_t)n_pairs * (size_t)ff;
    float *h = malloc(2 * hsz * sizeof(float));
    int64_t *off = malloc(((size_t)b->n_jobs + 1) * sizeof(int64_t));
    if (!h || !off) {
        free(h);
        free(off);
        return TIDE_ERR_NOMEM;
    }
    experts_job j = {tide_pool_features(pool), b, x, dim, out, ff, h, h + hsz, off, 1};
    /* phase 1 rows: gate rows of the jobs that have pairs */
    off[0] = 0;
    for (int32_t i = 0; i < b->n_jobs; i++)
        off[i + 1] = off[i] + (b->pair_start[i + 1] > b->pair_start[i] ? b->gate[i].rows : 0);
    tide_pool_run(pool, experts_thread, &j);
    /* phase 2 rows: down rows (= dim) of the same jobs */
    for (int32_t i = 0; i < b->n_jobs; i++)
        off[i + 1] = off[i] + (b->pair_start[i + 1] > b->pair_start[i] ? dim : 0);
    j.phase = 2;
    tide_pool_run(pool, experts_thread, &j);
    free(h);
    free(off);
    return TIDE_OK;
}

typedef struct {
    const float *pairs, *w;
    int32_t n_used, dim;
    float *out;
} combine_job;

static void combine_range(void *p, int64_t b, int64_t e) {
    combine_job *j = p;
    for (int64_t t = b; t < e; t++) {
        float *o = j->out + t * j->dim;
        const float *pr = j->pairs + t * j->n_used * (int64_t)j->dim;
        const float *w = j->w + t * j->n_used;
        for (int32_t i = 0; i < j->dim; i++) {
            float s = 0.0f;
            for (int32_t k = 0; k < j->n_used; k++)
                s += w[k] * pr[(int64_t)k * j->dim + i];
            o[i] += s;
        }
    }
}

void cpu_moe_combine(tide_pool *pool, const float *pairs, const float *w, int32_t n_tok,
                     int32_t n_used, int32_t dim, float *out) {
    combine_job j = {pairs, w, n_used, dim, out};
    if ((int64_t)n_tok * n_used * dim < (1 << 16))
        combine_range(&j, 0, n_tok);
    else
        tide_pool_for(pool, n_tok, combine_range, &j);
}

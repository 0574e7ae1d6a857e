/* attention.c: block-causal GQA attention.
 *
 * Work item: (kv head g, a chunk of up to ATTN_QB queries of one attention block). Queries of
 * one block see the same keys, so the chunk's scores are one matmul of the visible keys against
 * its ATTN_QB x group query heads (each key row read once for all of them), and the weighted sum
 * of V is the mirror image (each V row read once per key block for all of them). Per (query,
 * head) the arithmetic is fixed: canonical dot per key, scale, max, exp, 8-lane sum, then
 * o[d] = fma(p_j, v_j[d], o[d]) for j ascending from o = 0, times 1/sum. So a query gives the
 * same bits alone or in any batch, with any thread count.
 */
#include "backend/cpu/cpu_internal.h"

#include <math.h>
#include <stdlib.h>

#define ATTN_QB 4   /* queries per work item */
#define ATTN_JB 64  /* keys per pass of the weighted sum (their V rows stay in L1) */
#define TIDE_MAX_GROUP 64 /* query heads per kv head, at most (LLaDA2: 4 and 8) */
#define ATTN_MAXR (ATTN_QB * TIDE_MAX_GROUP)

typedef struct {
    tide_cpu_features f;
    const tide_attn_shape *s;
    const float *q, *k, *v;
    float *out;
    int64_t n_chunks;   /* query chunks */
    int32_t *chunk_q0;  /* [n_chunks + 1] first query of each chunk */
    float *scratch;     /* n_threads * ATTN_QB * group * n_kv */
} attn_job;

/* exp(s_j - m) in place for j < n, returns their sum (8 lanes, fixed order). */
static float softmax_exp_scalar(float *s, int64_t n, float m) {
    float lanes[8] = {0};
    for (int64_t j = 0; j < n; j++) {
        s[j] = expf(s[j] - m);
        lanes[j & 7] += s[j];
    }
    return cpu_hsum8_scalar(lanes);
}

/* o[r][d] += p[r][j] * v_j[d] for rows r < nr, keys j in [j0, j1), dims [d0, hd): one row at a
 * time, accumulators in memory (the leftovers of the blocked kernel, and the scalar path). */
static void pv_rows_scalar(float *const *o, const float *const *p, int nr, const float *v,
                           int64_t kv_stride, int64_t j0, int64_t j1, int32_t d0, int32_t hd) {
    for (int r = 0; r < nr; r++)
        for (int64_t j = j0; j < j1; j++) {
            const float *vj = v + j * kv_stride;
            float pj = p[r][j];
            for (int32_t d = d0; d < hd; d++)
                o[r][d] += pj * vj[d];
        }
}

#ifdef TIDE_X86
TIDE_AVX2 static float softmax_exp_avx2(float *s, int64_t n, float m) {
    __m256 mv = _mm256_set1_ps(m), acc = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 e = cpu_exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
        _mm256_storeu_ps(s + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    for (int l = 0; j < n; j++, l++) {
        __m256 e = cpu_exp_avx2(_mm256_set1_ps(s[j] - m)); /* the same exp, lane 0 */
        s[j] = _mm256_cvtss_f32(e);
        lanes[l] += s[j];
    }
    return cpu_hsum8_scalar(lanes);
}

/* The weighted sum for keys [j0, j1): pairs of rows x 32 dims with 8 register accumulators
 * (loaded from and stored to o around the key loop: the same values, the same fma order), the
 * rest one row at a time with fma. */
TIDE_AVX2 static void pv_block_avx2(float *const *o, const float *const *p, int nr,
                                    const float *v, int64_t kv_stride, int64_t j0, int64_t j1,
                                    int32_t hd) {
    int32_t hd32 = hd / 32 * 32;
    int nr2 = nr / 2 * 2;
    for (int r = 0; r < nr2; r += 2) {
        float *o0 = o[r], *o1 = o[r + 1];
        const float *p0 = p[r], *p1 = p[r + 1];
        for (int32_t d = 0; d < hd32; d += 32) {
            __m256 a0 = _mm256_loadu_ps(o0 + d), a1 = _mm256_loadu_ps(o0 + d + 8);
            __m256 a2 = _mm256_loadu_ps(o0 + d + 16), a3 = _mm256_loadu_ps(o0 + d + 24);
            __m256 b0 = _mm256_loadu_ps(o1 + d), b1 = _mm256_loadu_ps(o1 + d + 8);
            __m256 b2 = _mm256_loadu_ps(o1 + d + 16), b3 = _mm256_loadu_ps(o1 + d + 24);
            const float *vj = v + j0 * kv_stride + d;
            for (int64_t j = j0; j < j1; j++, vj += kv_stride) {
                __m256 v0 = _mm256_loadu_ps(vj), v1 = _mm256_loadu_ps(vj + 8);
                __m256 v2 = _mm256_loadu_ps(vj + 16), v3 = _mm256_loadu_ps(vj + 24);
                __m256 q0 = _mm256_broadcast_ss(p0 + j), q1 = _mm256_broadcast_ss(p1 + j);
                a0 = _mm256_fmadd_ps(q0, v0, a0);
                a1 = _mm256_fmadd_ps(q0, v1, a1);
                a2 = _mm256_fmadd_ps(q0, v2, a2);
                a3 = _mm256_fmadd_ps(q0, v3, a3);
                b0 = _mm256_fmadd_ps(q1, v0, b0);
                b1 = _mm256_fmadd_ps(q1, v1, b1);
                b2 = _mm256_fmadd_ps(q1, v2, b2);
                b3 = _mm256_fmadd_ps(q1, v3, b3);
            }
            _mm256_storeu_ps(o0 + d, a0);
            _mm256_storeu_ps(o0 + d + 8, a1);
            _mm256_storeu_ps(o0 + d + 16, a2);
            _mm256_storeu_ps(o0 + d + 24, a3);
            _mm256_storeu_ps(o1 + d, b0);
            _mm256_storeu_ps(o1 + d + 8, b1);
            _mm256_storeu_ps(o1 + d + 16, b2);
            _mm256_storeu_ps(o1 + d + 24, b3);
        }
    }
    for (int r = 0; r < nr; r++) {
        int32_t d0 = r < nr2 ? hd32 : 0;
        if (d0 == hd)
            continue;
        float *orow = o[r];
        for (int64_t j = j0; j < j1; j++) {
            const float *vj = v + j * kv_stride;
            float pj = p[r][j];
            __m256 pv = _mm256_set1_ps(pj);
            int32_t d = d0;
            for (; d + 8 <= hd; d += 8)
                _mm256_storeu_ps(orow + d, _mm256_fmadd_ps(pv, _mm256_loadu_ps(vj + d),
                                                           _mm256_loadu_ps(orow + d)));
            for (; d < hd; d++)
                orow[d] = fmaf(pj, vj[d], orow[d]);
        }
    }
}
#endif

static void attn_thread(void *p, int ith, int nth) {
    attn_job *j = p;
    const tide_attn_shape *s = j->s;
    int32_t group = s->n_head / s->n_head_kv, hd = s->head_dim;
    int64_t items = j->n_chunks * s->n_head_kv, b, e;
    tide_chunk(items, ith, nth, &b, &e);
    float *sc = j->scratch + (int64_t)ith * ATTN_QB * group * s->n_kv;
    float scale = 1.0f / sqrtf((float)hd);
    int32_t xidx[ATTN_MAXR];
    float *orow[ATTN_MAXR];
    const float *prow[ATTN_MAXR];
    for (int64_t it = b; it < e; it++) {
        /* kv head outer: consecutive items of a thread reuse the same K/V rows from cache */
        int32_t g = (int32_t)(it / j->n_chunks);
        int64_t c = it % j->n_chunks;
        int32_t q0 = j->chunk_q0[c], nq = j->chunk_q0[c + 1] - q0, nr = nq * group;
        /* every query of the chunk is in one attention block: key j visible iff
         * j / B <= (q_pos0 + i) / B */
        int64_t lim = ((int64_t)(s->q_pos0 + q0) / s->block_length + 1) * s->block_length;
        if (lim > s->n_kv)
            lim = s->n_kv;
        for (int32_t r = 0; r < nr; r++) {
            int32_t i = q0 + r / group, h = g * group + r % group;
            xidx[r] = i * s->n_head + h;
            orow[r] = j->out + (int64_t)xidx[r] * hd;
            prow[r] = sc + (int64_t)r * s->n_kv;
        }
        if (lim <= 0) {
            for (int32_t r = 0; r < nr; r++)
                memset(orow[r], 0, (size_t)hd * sizeof(float));
            continue;
        }
        cpu_wview kv = {TIDE_TYPE_F32, (const char *)(j->k + (int64_t)g * hd),
                        (size_t)s->kv_stride * sizeof(float), hd};
        cpu_tokens ts = {j->q, hd, xidx, sc, s->n_kv, NULL, nr};
        cpu_matmul_view_rows(&j->f, &kv, 0, lim, &ts);
        float inv[ATTN_MAXR];
        for (int32_t r = 0; r < nr; r++) {
            float *sh = sc + (int64_t)r * s->n_kv;
            float m = -INFINITY;
            for (int64_t k = 0; k < lim; k++) {
                sh[k] *= scale;
                if (sh[k] > m)
                    m = sh[k];
            }
#ifdef TIDE_X86
            if (j->f.avx2)
                inv[r] = 1.0f / softmax_exp_avx2(sh, lim, m);
            else
#endif
                inv[r] = 1.0f / softmax_exp_scalar(sh, lim, m);
            memset(orow[r], 0, (size_t)hd * sizeof(float));
        }
        const float *vg = j->v + (int64_t)g * hd;
        for (int64_t j0 = 0; j0 < lim; j0 += ATTN_JB) {
            int64_t j1 = j0 + ATTN_JB < lim ? j0 + ATTN_JB : lim;
#ifdef TIDE_X86
            if (j->f.avx2) {
                pv_block_avx2(orow, prow, nr, vg, s->kv_stride, j0, j1, hd);
                continue;
            }
#endif
            pv_rows_scalar(orow, prow, nr, vg, s->kv_stride, j0, j1, 0, hd);
        }
        for (int32_t r = 0; r < nr; r++)
            for (int32_t d = 0; d < hd; d++)
                orow[r][d] *= inv[r];
    }
}

tide_status cpu_attention(tide_pool *pool, const tide_attn_shape *s, const float *q,
                          const float *k, const float *v, float *out) {
    if (!s || s->n_q < 0 || s->n_kv < 0 || s->q_pos0 < 0 || s->block_length < 1 ||
        s->n_head < 1 || s->n_head_kv < 1 || s->n_head % s->n_head_kv ||
        s->n_head / s->n_head_kv > TIDE_MAX_GROUP || s->head_dim < 1 ||
        s->kv_stride < (int64_t)s->n_head_kv * s->head_dim)
        return TIDE_ERR_ARG;
    if (s->n_q == 0)
        return TIDE_OK;
    if (!q || !out || (s->n_kv > 0 && (!k || !v)))
        return TIDE_ERR_ARG;
    /* chunks: runs of <= ATTN_QB queries that never straddle an attention block */
    int32_t *q0s = malloc(((size_t)s->n_q + 1) * sizeof(int32_t));
    if (!q0s)
        return TIDE_ERR_NOMEM;
    int64_t nc = 0;
    for (int32_t i = 0; i < s->n_q;) {
        q0s[nc++] = i;
        int64_t blk = (int64_t)(s->q_pos0 + i) / s->block_length;
        int32_t end = i + ATTN_QB;
        while (i < end && i < s->n_q && (int64_t)(s->q_pos0 + i) / s->block_length == blk)
            i++;
    }
    q0s[nc] = s->n_q;
    int nth = tide_pool_size(pool);
    if (nc * s->n_head_kv < 2)
        nth = 1; /* one item: run inline */
    size_t per = (size_t)ATTN_QB * (size_t)(s->n_head / s->n_head_kv) *
                 (size_t)(s->n_kv > 0 ? s->n_kv : 1);
    float *scratch = malloc((size_t)nth * per * sizeof(float));
    if (!scratch) {
        free(q0s);
        return TIDE_ERR_NOMEM;
    }
    attn_job j = {tide_pool_features(pool), s, q, k, v, out, nc, q0s, scratch};
    if (nth == 1)
        attn_thread(&j, 0, 1);
    else
        tide_pool_run(pool, attn_thread, &j);
    free(scratch);
    free(q0s);
    return TIDE_OK;
}

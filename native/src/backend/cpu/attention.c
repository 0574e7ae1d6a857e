/* attention.c: block-causal GQA attention, tiled, with an online softmax (as flash attention).
 *
 * Work item: (kv head g, a chunk of up to 32 queries of one attention block). Queries of one
 * block see the same keys, so the item walks the visible keys in tiles of ATTN_T: the tile's
 * scores are one small matmul of its K rows against the chunk's queries x group query heads,
 * and the tile's weighted sum of V another (its V rows transposed once into scratch), both on
 * the matmul core, so each K/V row is read once per item (once per step and kv head for a
 * 32-token block), however long the context. Per (query, head) the arithmetic is fixed:
 * canonical dot per key, scale; per tile the running max, exp, 8-lane tile sum, alpha =
 * exp(old max - new max) when the max grew, o = o * alpha + (canonical dot of the tile's
 * weights with each V column), sum = sum * alpha + tile sum; finally o times 1/sum. Tiles start
 * at absolute key positions, so a query gives the same bits alone or in any batch, with any
 * thread count.
 */
#include "backend/cpu/cpu_internal.h"

#include <math.h>
#include <stdlib.h>

#define ATTN_T 64          /* keys per tile (a tile's K and V rows of one head stay in L1/L2) */
#define ATTN_QB_MAX 32     /* queries per work item, at most: a whole LLaDA2 block */
#define ATTN_QB_MIN 4      /* ... at least, when splitting further to feed the threads */
#define TIDE_MAX_GROUP 64  /* query heads per kv head, at most (LLaDA2: 4 and 8) */
#define ATTN_MAXR 256      /* query rows (queries x group) per work item, at most */

typedef struct {
    tide_cpu_features f;
    const tide_attn_shape *s;
    const float *q;
    const char *k, *v; /* of kv_type */
    size_t esize;      /* bytes of one cached value */
    float *out;
    int64_t n_chunks;   /* query chunks */
    int32_t *chunk_q0;  /* [n_chunks + 1] first query of each chunk */
    float *scratch;     /* n_threads * scratch_per: one tile of scores per row of an item */
    int64_t scratch_per;
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

/* s[j] *= scale for j < n; returns max(m, every s[j]). Max is exact in any order, so the
 * vector and scalar paths agree bit for bit. */
static float scale_max_scalar(float *s, int64_t n, float scale, float m) {
    for (int64_t j = 0; j < n; j++) {
        s[j] *= scale;
        if (s[j] > m)
            m = s[j];
    }
    return m;
}

#ifdef TIDE_X86
TIDE_AVX2 static float scale_max_avx2(float *s, int64_t n, float scale, float m) {
    __m256 sv = _mm256_set1_ps(scale), mv = _mm256_set1_ps(m);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 x = _mm256_mul_ps(_mm256_loadu_ps(s + j), sv);
        _mm256_storeu_ps(s + j, x);
        mv = _mm256_max_ps(mv, x);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, mv);
    for (int l = 0; l < 8; l++)
        if (lanes[l] > m)
            m = lanes[l];
    return scale_max_scalar(s + j, n - j, scale, m);
}

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

#endif

/* One work item: the nr = nq * group query rows of kv head g and queries q0 .. q0+nq-1 (one
 * attention block), against keys [0, lim), tile by tile. The tiles start at absolute key
 * positions 0, ATTN_T, 2 ATTN_T, ... whatever the batch, so a row's arithmetic depends on its
 * query, its lim and the cache only. */
static void attn_item(const attn_job *j, int32_t g, int32_t q0, int32_t nq, float *sc) {
    float *vtile = sc + (int64_t)ATTN_MAXR * ATTN_T; /* [hd][ATTN_T] */
    float *pv = vtile + (int64_t)j->s->head_dim * ATTN_T; /* [nr][hd] */
    const tide_attn_shape *s = j->s;
    const int32_t group = s->n_head / s->n_head_kv, hd = s->head_dim, nr = nq * group;
    const float scale = 1.0f / sqrtf((float)hd);
    int32_t xidx[ATTN_MAXR];
    float *orow[ATTN_MAXR];
    float m[ATTN_MAXR], l[ATTN_MAXR], alpha[ATTN_MAXR];
    /* key j visible to query i iff j / B <= (q_pos0 + i) / B: the block's end, for all nq */
    int64_t lim = ((int64_t)(s->q_pos0 + q0) / s->block_length + 1) * s->block_length;
    if (lim > s->n_kv)
        lim = s->n_kv;
    for (int32_t r = 0; r < nr; r++) {
        int32_t i = q0 + r / group, h = g * group + r % group;
        xidx[r] = i * s->n_head + h;
        orow[r] = j->out + (int64_t)xidx[r] * hd;
        m[r] = -INFINITY;
        l[r] = 0.0f;
        memset(orow[r], 0, (size_t)hd * sizeof(float));
    }
    const size_t es = j->esize, rb = (size_t)s->kv_stride * es; /* value, row bytes */
    const char *kg = j->k + (size_t)g * hd * es, *vg = j->v + (size_t)g * hd * es;
    for (int64_t t0 = 0; t0 < lim; t0 += ATTN_T) {
        int64_t tn = lim - t0 < ATTN_T ? lim - t0 : ATTN_T;
        /* scores of the tile: one small matmul, each key row read once for all nr rows */
        cpu_wview kv = {s->kv_type, kg + (size_t)t0 * rb, rb, hd};
        cpu_tokens ts = {j->q, hd, xidx, sc, ATTN_T, NULL, nr};
        cpu_matmul_view_rows(&j->f, &kv, 0, tn, &ts);
        /* online softmax: running max m, running sum l; alpha rescales what came before */
        for (int32_t r = 0; r < nr; r++) {
            float *sh = sc + (int64_t)r * ATTN_T, mt, sum;
#ifdef TIDE_X86
            if (j->f.avx2) {
                mt = scale_max_avx2(sh, tn, scale, m[r]);
                sum = softmax_exp_avx2(sh, tn, mt);
            } else
#endif
            {
                mt = scale_max_scalar(sh, tn, scale, m[r]);
                sum = softmax_exp_scalar(sh, tn, mt);
            }
            alpha[r] = mt > m[r] && m[r] > -INFINITY ? expf(m[r] - mt) : 1.0f;
            m[r] = mt;
            l[r] = l[r] * alpha[r] + sum;
        }
        /* the tile's weighted sum of V as a second small matmul: the tile's V rows transposed
         * (dims x keys), so each is read once for all nr rows by the matmul core */
        for (int64_t k = 0; k < tn; k++) {
            const char *vr = vg + (size_t)(t0 + k) * rb;
            float *row = pv; /* the row in f32 first (pv is free until the matmul below) */
            if (s->kv_type == TIDE_TYPE_F32)
                row = (float *)vr;
            else if (s->kv_type == TIDE_TYPE_F16)
                cpu_f16_to_f32_row(&j->f, (const uint16_t *)vr, row, hd);
            else
                cpu_bf16_to_f32_row(&j->f, (const uint16_t *)vr, row, hd);
            for (int32_t d = 0; d < hd; d++)
                vtile[(int64_t)d * ATTN_T + k] = row[d];
        }
        cpu_wview vw = {TIDE_TYPE_F32, (const char *)vtile, ATTN_T * sizeof(float), tn};
        cpu_tokens ps = {sc, ATTN_T, NULL, pv, hd, NULL, nr};
        cpu_matmul_view_rows(&j->f, &vw, 0, hd, &ps);
        for (int32_t r = 0; r < nr; r++) {
            float a = alpha[r], *o = orow[r];
            const float *t = pv + (int64_t)r * hd;
            for (int32_t d = 0; d < hd; d++)
                o[d] = o[d] * a + t[d];
        }
    }
    for (int32_t r = 0; r < nr && lim > 0; r++) {
        float inv = 1.0f / l[r];
        for (int32_t d = 0; d < hd; d++)
            orow[r][d] *= inv;
    }
}

static void attn_thread(void *p, int ith, int nth) {
    attn_job *j = p;
    int64_t items = j->n_chunks * j->s->n_head_kv, b, e;
    tide_chunk(items, ith, nth, &b, &e);
    float *sc = j->scratch + (int64_t)ith * j->scratch_per;
    for (int64_t it = b; it < e; it++) {
        /* kv head outer: consecutive items of a thread reuse the same K/V rows from cache */
        int32_t g = (int32_t)(it / j->n_chunks);
        int64_t c = it % j->n_chunks;
        attn_item(j, g, j->chunk_q0[c], j->chunk_q0[c + 1] - j->chunk_q0[c], sc);
    }
}

tide_status cpu_attention(tide_pool *pool, const tide_attn_shape *s, const float *q,
                          const void *k, const void *v, float *out) {
    if (!s || s->n_q < 0 || s->n_kv < 0 || s->q_pos0 < 0 || s->block_length < 1 ||
        s->n_head < 1 || s->n_head_kv < 1 || s->n_head % s->n_head_kv ||
        s->n_head / s->n_head_kv > TIDE_MAX_GROUP || s->head_dim < 1 ||
        s->kv_stride < (int64_t)s->n_head_kv * s->head_dim ||
        (s->kv_type != TIDE_TYPE_F32 && s->kv_type != TIDE_TYPE_F16 &&
         s->kv_type != TIDE_TYPE_BF16))
        return TIDE_ERR_ARG;
    if (s->n_q == 0)
        return TIDE_OK;
    if (!q || !out || (s->n_kv > 0 && (!k || !v)))
        return TIDE_ERR_ARG;
    const int32_t group = s->n_head / s->n_head_kv;
    int nth = tide_pool_size(pool);
    /* queries per item: as many as fit ATTN_MAXR rows (each K/V tile is then read once for all
     * of them), fewer when that would leave threads idle. Which rows share an item never
     * changes a row's result. */
    int32_t qb = ATTN_MAXR / group;
    if (qb > ATTN_QB_MAX)
        qb = ATTN_QB_MAX;
    while (qb > ATTN_QB_MIN && (int64_t)((s->n_q + qb - 1) / qb) * s->n_head_kv < 2 * nth)
        qb /= 2;
    /* chunks: runs of <= qb queries that never straddle an attention block */
    int32_t *q0s = malloc(((size_t)s->n_q + 1) * sizeof(int32_t));
    if (!q0s)
        return TIDE_ERR_NOMEM;
    int64_t nc = 0;
    for (int32_t i = 0; i < s->n_q;) {
        q0s[nc++] = i;
        int64_t blk = (int64_t)(s->q_pos0 + i) / s->block_length;
        int32_t end = i + qb;
        while (i < end && i < s->n_q && (int64_t)(s->q_pos0 + i) / s->block_length == blk)
            i++;
    }
    q0s[nc] = s->n_q;
    if (nc * s->n_head_kv < 2)
        nth = 1; /* one item: run inline */
    /* per thread: scores [ATTN_MAXR][ATTN_T], a V tile [hd][ATTN_T], its products [rows][hd] */
    size_t per = (size_t)ATTN_MAXR * ATTN_T + (size_t)s->head_dim * ATTN_T +
                 (size_t)qb * (size_t)group * (size_t)s->head_dim;
    float *scratch = malloc((size_t)nth * per * sizeof(float));
    if (!scratch) {
        free(q0s);
        return TIDE_ERR_NOMEM;
    }
    attn_job j = {tide_pool_features(pool), s, q, k, v, tide_row_bytes(s->kv_type, 1), out, nc,
                  q0s, scratch, (int64_t)per};
    if (nth == 1)
        attn_thread(&j, 0, 1);
    else
        tide_pool_run(pool, attn_thread, &j);
    free(scratch);
    free(q0s);
    return TIDE_OK;
}

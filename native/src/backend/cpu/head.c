/* head.c: greedy head (argmax + softmax prob) and sampling (CONTRACTS.md section 2). */
#include "backend/cpu/cpu_internal.h"

#include <math.h>
#include <stdlib.h>

/* ---- exp and sums over a row ---------------------------------------------------------------- */
/* e[i] = exp(l[i] - m) (NaN logits give 0) for i < n; returns the 8-lane f32 sum. e may be NULL
 * (sum only). */
static float exp_sum_scalar(const float *l, float *e, int64_t n, float m) {
    float lanes[8] = {0};
    for (int64_t i = 0; i < n; i++) {
        float v = l[i] == l[i] ? expf(l[i] - m) : 0.0f;
        if (e)
            e[i] = v;
        lanes[i & 7] += v;
    }
    return cpu_hsum8_scalar(lanes);
}

#ifdef TIDE_X86
TIDE_AVX2 static float exp_sum_avx2(const float *l, float *e, int64_t n, float m) {
    __m256 mv = _mm256_set1_ps(m), acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(l + i);
        __m256 ok = _mm256_cmp_ps(x, x, _CMP_ORD_Q);
        __m256 v = _mm256_and_ps(ok, cpu_exp_avx2(_mm256_sub_ps(x, mv)));
        if (e)
            _mm256_storeu_ps(e + i, v);
        acc = _mm256_add_ps(acc, v);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    for (int k = 0; i < n; i++, k++) {
        float v = l[i] == l[i] ? _mm256_cvtss_f32(cpu_exp_avx2(_mm256_set1_ps(l[i] - m))) : 0.0f;
        if (e)
            e[i] = v;
        lanes[k] += v;
    }
    return cpu_hsum8_scalar(lanes);
}
#endif

static float exp_sum(const tide_cpu_features *f, const float *l, float *e, int64_t n, float m) {
#ifdef TIDE_X86
    if (f && f->avx2)
        return exp_sum_avx2(l, e, n, m);
#endif
    (void)f;
    return exp_sum_scalar(l, e, n, m);
}

#ifdef TIDE_X86
/* The max of l (NaN ignored: maxps returns its second operand when the first is NaN). */
TIDE_AVX2 static float max_avx2(const float *l, int64_t n) {
    __m256 a0 = _mm256_set1_ps(-INFINITY), a1 = a0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_max_ps(_mm256_loadu_ps(l + i), a0);
        a1 = _mm256_max_ps(_mm256_loadu_ps(l + i + 8), a1);
    }
    float t[8], m = -INFINITY;
    _mm256_storeu_ps(t, _mm256_max_ps(a0, a1));
    for (int k = 0; k < 8; k++)
        m = t[k] > m ? t[k] : m;
    for (; i < n; i++)
        m = l[i] > m ? l[i] : m;
    return m;
}
#endif

/* First index of the max (NaN never the max); -1 when every value is NaN or -inf. */
static int64_t argmax_row_f(const tide_cpu_features *f, const float *l, int64_t n, float *max) {
#ifdef TIDE_X86
    if (f && f->avx2) {
        float m = max_avx2(l, n);
        *max = m;
        if (m == -INFINITY || m != m)
            return -1;
        for (int64_t i = 0; i < n; i++)
            if (l[i] == m)
                return i;
        return -1;
    }
#endif
    (void)f;
    float m = -INFINITY;
    int64_t idx = -1;
    for (int64_t i = 0; i < n; i++)
        if (l[i] > m) {
            m = l[i];
            idx = i;
        }
    *max = m;
    return idx;
}

static void argmax_prob_row(const tide_cpu_features *f, const float *l, int32_t n, int32_t *tok,
                            float *prob) {
    float m;
    int64_t idx = argmax_row_f(f, l, n, &m);
    if (idx < 0) {
        *tok = 0;
        *prob = 0.0f;
        return;
    }
    *tok = (int32_t)idx;
    *prob = 1.0f / exp_sum(f, l, NULL, n, m);
}

typedef struct {
    tide_cpu_features f;
    const float *logits;
    int32_t n_vocab;
    int32_t *tok;
    float *prob;
} argmax_job;

static void argmax_range(void *p, int64_t b, int64_t e) {
    argmax_job *j = p;
    for (int64_t r = b; r < e; r++)
        argmax_prob_row(&j->f, j->logits + r * j->n_vocab, j->n_vocab, j->tok + r, j->prob + r);
}

void cpu_argmax_prob(tide_pool *pool, const float *logits, int32_t n, int32_t n_vocab,
                     int32_t *out_token, float *out_prob) {
    if (n <= 0 || n_vocab <= 0)
        return;
    argmax_job j = {tide_pool_features(pool), logits, n_vocab, out_token, out_prob};
    tide_pool_for(pool, n, argmax_range, &j);
}

/* ---- the generator -------------------------------------------------------------------------- */
uint64_t tide_splitmix64(uint64_t seed, uint64_t counter) {
    uint64_t z = seed + (counter + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

double tide_uniform(uint64_t seed, int32_t position) {
    return (double)(tide_splitmix64(seed, (uint64_t)(int64_t)position) >> 11) * 0x1.0p-53;
}

/* ---- sampling ------------------------------------------------------------------------------- */
typedef struct {
    float l;
    int32_t i;
} lidx;

/* descending by logit, then ascending by index */
static int cmp_lidx(const void *a, const void *b) {
    const lidx *x = a, *y = b;
    if (x->l > y->l)
        return -1;
    if (x->l < y->l)
        return 1;
    return (x->i > y->i) - (x->i < y->i);
}

static int cmp_i32(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* The k-th largest (k >= 1, k <= n) of v[0..n), v reordered (3-way quickselect, NaN-free). */
static float kth_largest(float *v, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n, want = k - 1; /* index in descending order */
    uint64_t rng = 0x2545F4914F6CDD1Dull;
    while (hi - lo > 1) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        float pv = v[lo + (int64_t)(rng % (uint64_t)(hi - lo))];
        /* [lo, gt): > pv, [gt, i): == pv, [lt2, hi): < pv */
        int64_t gt = lo, i = lo, lt = hi;
        while (i < lt) {
            if (v[i] > pv) {
                float t = v[i]; v[i] = v[gt]; v[gt] = t;
                gt++; i++;
            } else if (v[i] < pv) {
                lt--;
                float t = v[i]; v[i] = v[lt]; v[lt] = t;
            } else {
                i++;
            }
        }
        if (want < gt)
            hi = gt;
        else if (want < lt)
            return pv;
        else
            lo = lt;
    }
    return v[lo];
}

/* The k-th largest of l[0..n) for small k: a min-heap of the k largest seen (most values fail
 * the first compare against the heap's minimum, so this is one pass). heap: k floats. NaN-free. */
static float kth_largest_heap(const float *l, int64_t n, int64_t k, float *heap) {
    int64_t h = 0;
    for (int64_t i = 0; i < n; i++) {
        float v = l[i];
        if (h < k) { /* sift up */
            int64_t c = h++;
            while (c > 0 && heap[(c - 1) / 2] > v) {
                heap[c] = heap[(c - 1) / 2];
                c = (c - 1) / 2;
            }
            heap[c] = v;
        } else if (v > heap[0]) { /* replace the minimum, sift down */
            int64_t c = 0;
            for (;;) {
                int64_t a = 2 * c + 1, b = a + 1, m = c;
                float mv = v;
                if (a < k && heap[a] < mv) { m = a; mv = heap[a]; }
                if (b < k && heap[b] < mv) { m = b; mv = heap[b]; }
                if (m == c)
                    break;
                heap[c] = heap[m];
                c = m;
            }
            heap[c] = v;
        }
    }
    return heap[0];
}

size_t cpu_sample_scratch_bytes(int32_t n_vocab) {
    size_t n = n_vocab > 0 ? (size_t)n_vocab : 1;
    /* scaled logits, exps, select copy / kept ids (4 bytes each), sort pairs (8) */
    return n * (4 + 4 + 4 + sizeof(lidx)) + 64;
}

tide_status cpu_sample_row(const tide_cpu_features *f, const float *logits, int32_t n_vocab,
                           const tide_sampling *s, int32_t position, int32_t *out_token,
                           float *out_prob, void *scratch) {
    if (!logits || !s || !out_token || !out_prob || !scratch || n_vocab < 1)
        return TIDE_ERR_ARG;
    float temp = s->temperature;
    if (!(temp >= 0.0f)) /* negative or NaN */
        return TIDE_ERR_ARG;
    int use_k = s->top_k > 0 && s->top_k < n_vocab;
    int use_p = s->top_p < 1.0f;
    if (temp == 0.0f && !use_k && !use_p) {
        argmax_prob_row(f, logits, n_vocab, out_token, out_prob);
        return TIDE_OK;
    }
    int64_t n = n_vocab;
    float *l = scratch;          /* [n] scaled logits, NaN -> -inf */
    float *e = l + n;            /* [n] exp(l - max) of the kept tokens, 0 elsewhere */
    int32_t *ids = (int32_t *)(e + n); /* [n] select copy, then the kept ids */
    lidx *pairs = (lidx *)(((uintptr_t)(ids + n) + 7) & ~(uintptr_t)7); /* [n] */

    for (int64_t i = 0; i < n; i++) {
        float v = logits[i];
        if (temp > 0.0f && temp != 1.0f)
            v = v / temp;
        l[i] = v == v ? v : -INFINITY;
    }
    float m;
    int64_t amax = argmax_row_f(f, l, n, &m);
    if (amax < 0) { /* nothing finite to choose from */
        *out_token = 0;
        *out_prob = 0.0f;
        return TIDE_OK;
    }
    /* top-k: keep l >= the k-th largest (ties at the boundary kept, as torch.where(l < kth)) */
    float kth = -INFINITY;
    if (use_k) {
        float *sel = (float *)ids;
        if (s->top_k <= 4096) {
            kth = kth_largest_heap(l, n, s->top_k, sel);
        } else {
            memcpy(sel, l, (size_t)n * sizeof(float));
            kth = kth_largest(sel, n, s->top_k);
        }
    }
    /* kept after top-k, in ascending id; exps relative to the max (which is always kept), by
     * the same exp as the greedy head (vector exp on AVX2, expf otherwise) */
    int64_t nk = 0;
    double z = 0.0;
    if (!use_k) {
        exp_sum(f, l, e, n, m);
        for (int64_t i = 0; i < n; i++)
            if (l[i] > -INFINITY) {
                ids[nk++] = (int32_t)i;
                z += e[i];
            }
    } else {
        for (int64_t i = 0; i < n; i++)
            if (l[i] >= kth && l[i] > -INFINITY) {
                ids[nk++] = (int32_t)i;
                exp_sum(f, &l[i], &e[i], 1, m);
                z += e[i];
            }
    }
    if (use_p) {
        /* Only a prefix of the descending order matters. Bucket the kept tokens by m - l (1/8
         * nat wide): every token of a bucket sorts after every token of the buckets above it.
         * Candidates = the buckets down to the one where the mass crosses top_p, plus one for
         * rounding; if the exact cutoff is not inside them after all, take every kept token. */
        enum { NB = 256 };
        double mass[NB] = {0};
        for (int64_t q = 0; q < nk; q++) {
            float dlt = (m - l[ids[q]]) * 8.0f;
            mass[dlt < NB - 1 ? (int)dlt : NB - 1] += e[ids[q]];
        }
        int last = NB - 1;
        double cum = 0.0;
        for (int b = 0; b < NB - 1; b++) {
            cum += mass[b];
            if (cum > (double)s->top_p * z) {
                last = b + 1;
                break;
            }
        }
        int widened = 0;
        for (;;) {
            int64_t nc = 0;
            for (int64_t q = 0; q < nk; q++) {
                int32_t i = ids[q];
                float dlt = (m - l[i]) * 8.0f;
                int b = dlt < NB - 1 ? (int)dlt : NB - 1;
                if (widened || b <= last) {
                    pairs[nc].l = l[i];
                    pairs[nc].i = i;
                    nc++;
                }
            }
            qsort(pairs, (size_t)nc, sizeof(lidx), cmp_lidx);
            /* as torch: f32 probabilities, cumsum accumulated in double (ATen's CPU acc type),
             * each partial sum rounded to f32 for the comparison */
            double c = 0.0;
            int64_t keep = -1;
            for (int64_t q = 0; q < nc; q++) {
                c += (float)(e[pairs[q].i] / z);
                if ((float)c > s->top_p) { /* HF's shifted mask: this one stays, the rest go */
                    keep = q + 1;
                    break;
                }
            }
            if (keep < 0 && nc < nk && !widened) {
                widened = 1;
                continue;
            }
            if (keep < 0)
                keep = nc; /* every kept token is within top_p */
            nk = keep;
            for (int64_t q = 0; q < nk; q++)
                ids[q] = pairs[q].i;
            qsort(ids, (size_t)nk, sizeof(int32_t), cmp_i32);
            z = 0.0;
            for (int64_t q = 0; q < nk; q++)
                z += e[ids[q]];
            break;
        }
    }
    if (temp == 0.0f) { /* a filter without temperature: the argmax, with its filtered prob */
        *out_token = (int32_t)amax;
        *out_prob = (float)(e[amax] / z);
        return TIDE_OK;
    }
    double target = tide_uniform(s->seed, position) * z, c = 0.0;
    int32_t tok = ids[nk - 1];
    for (int64_t q = 0; q < nk; q++) {
        c += e[ids[q]];
        if (c > target) {
            tok = ids[q];
            break;
        }
    }
    *out_token = tok;
    *out_prob = (float)(e[tok] / z);
    return TIDE_OK;
}

typedef struct {
    tide_cpu_features f;
    const float *logits;
    int32_t n, n_vocab;
    const tide_sampling *s;
    const int32_t *positions;
    int32_t *tok;
    float *prob;
    char *scratch;
    size_t sbytes;
    tide_status st[1024];
} sample_job;

static void sample_thread(void *p, int ith, int nth) {
    sample_job *j = p;
    int64_t b, e;
    tide_chunk(j->n, ith, nth, &b, &e);
    tide_status st = TIDE_OK;
    for (int64_t r = b; r < e; r++) {
        tide_status x = cpu_sample_row(&j->f, j->logits + r * j->n_vocab, j->n_vocab, j->s,
                                       j->positions ? j->positions[r] : (int32_t)r, j->tok + r,
                                       j->prob + r, j->scratch + (size_t)ith * j->sbytes);
        if (x != TIDE_OK)
            st = x;
    }
    j->st[ith] = st;
}

tide_status cpu_sample(tide_pool *pool, const float *logits, int32_t n, int32_t n_vocab,
                       const tide_sampling *s, const int32_t *positions, int32_t *out_token,
                       float *out_prob) {
    if (n < 0 || n_vocab < 1 || !s || (n > 0 && (!logits || !out_token || !out_prob)))
        return TIDE_ERR_ARG;
    if (n == 0)
        return TIDE_OK;
    int nth = tide_pool_size(pool);
    if (nth > 1024 || n < nth)
        nth = 1;
    size_t sb = (cpu_sample_scratch_bytes(n_vocab) + 63) & ~(size_t)63;
    sample_job *j = malloc(sizeof *j);
    char *scratch = malloc(sb * (size_t)nth);
    if (!j || !scratch) {
        free(j);
        free(scratch);
        return TIDE_ERR_NOMEM;
    }
    *j = (sample_job){tide_pool_features(pool), logits, n, n_vocab, s, positions, out_token,
                      out_prob, scratch, sb, {TIDE_OK}};
    if (nth == 1)
        sample_thread(j, 0, 1);
    else
        tide_pool_run(pool, sample_thread, j);
    tide_status st = TIDE_OK;
    for (int i = 0; i < nth; i++)
        if (j->st[i] != TIDE_OK)
            st = j->st[i];
    free(scratch);
    free(j);
    return st;
}

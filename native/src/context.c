/* context.c: a tide_context around a model: parameter checks, the backend, the device copies of
 * every non-expert weight, the KV cache, the step interface, counters and the trace. */
#include "model.h"
#include "cpu/kernels.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

double tide_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

tide_status tide_ctx_fail(tide_context *ctx, tide_status st, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx->err, sizeof ctx->err, fmt, ap);
    va_end(ap);
    return st;
}

tide_status tide_ctx_be_fail(tide_context *ctx, tide_status st, const char *what) {
    return tide_ctx_fail(ctx, st, "%s: %s", what, ctx->be->err[0] ? ctx->be->err : "backend error");
}


tide_context_params tide_context_default_params(void) {
    tide_context_params p;
    memset(&p, 0, sizeof p);
    p.device = TIDE_DEVICE_CPU;
    p.n_threads = 0;
    p.n_ctx = 0;
    p.policy = TIDE_POLICY_GPU;
    p.budget = 0;
    p.refresh_interval = 4;
    return p;
}

int tide_cuda_available(char *err, size_t err_len) {
#ifdef TIDE_CUDA
    return tide_backend_cuda_available(err, err_len);
#else
    tide_errf(err, err_len, TIDE_ERR_UNSUPPORTED, "this build of tide.cpp has no CUDA backend");
    return 0;
#endif
}

const char *tide_context_error(const tide_context *ctx) { return ctx ? ctx->err : ""; }

/* ---- device copies of the weights ------------------------------------------------------------ */

static tide_status upload_bytes(tide_context *ctx, const void *src, size_t n, void **dst) {
    int copied = 0;
    tide_status st = ctx->be->i->upload_weight(ctx->be, src, n, dst, &copied);
    if (st != TIDE_OK) return tide_ctx_be_fail(ctx, st, "uploading the weights");
    if (copied) {
        ctx->owned[ctx->n_owned++] = *dst;
        ctx->st.weights_h2d_bytes += n;
    }
    return TIDE_OK;
}

static tide_status upload_matrix(tide_context *ctx, const tide_matrix *src, tide_matrix *dst) {
    *dst = *src;
    if (src->rows == 0) return TIDE_OK;
    return upload_bytes(ctx, src->data, src->nbytes, &dst->data);
}

static tide_status upload_vec(tide_context *ctx, const float *src, int64_t n, const float **dst) {
    void *p = NULL;
    *dst = NULL;
    if (!src) return TIDE_OK;
    tide_status st = upload_bytes(ctx, src, (size_t)n * sizeof(float), &p);
    *dst = p;
    return st;
}

static tide_status upload_weights(tide_context *ctx) {
    const tide_model *m = ctx->model;
    const tide_hparams *hp = &m->hp;
    int32_t max_owned = 2 + hp->n_layer * 16; /* at most 11 device copies per layer */
    ctx->owned = calloc((size_t)max_owned, sizeof(void *));
    ctx->w.layers = calloc((size_t)hp->n_layer, sizeof *ctx->w.layers);
    if (!ctx->owned || !ctx->w.layers) return tide_ctx_fail(ctx, TIDE_ERR_NOMEM, "out of memory");
    tide_status st;
    ctx->w.token_embd = m->w.token_embd; /* the lookup runs on the host */
    if ((st = upload_vec(ctx, m->w.output_norm, hp->n_embd, &ctx->w.output_norm))) return st;
    if ((st = upload_matrix(ctx, &m->w.output, &ctx->w.output))) return st;
    for (int32_t il = 0; il < hp->n_layer; il++) {
        const tide_layer_weights *S = &m->w.layers[il];
        tide_layer_weights *D = &ctx->w.layers[il];
        *D = *S; /* experts stay host views */
        if ((st = upload_vec(ctx, S->attn_norm, hp->n_embd, &D->attn_norm))) return st;
        if ((st = upload_vec(ctx, S->q_norm, hp->head_dim, &D->q_norm))) return st;
        if ((st = upload_vec(ctx, S->k_norm, hp->head_dim, &D->k_norm))) return st;
        if ((st = upload_vec(ctx, S->ffn_norm, hp->n_embd, &D->ffn_norm))) return st;
        /* q, k, v are row ranges of one tensor: one upload, three views */
        void *qkv = NULL;
        size_t nqkv = S->wq.nbytes + S->wk.nbytes + S->wv.nbytes;
        if ((st = upload_bytes(ctx, S->wq.data, nqkv, &qkv))) return st;
        D->wq.data = qkv;
        D->wk.data = (char *)qkv + S->wq.nbytes;
        D->wv.data = (char *)qkv + S->wq.nbytes + S->wk.nbytes;
        if ((st = upload_matrix(ctx, &S->wo, &D->wo))) return st;
        if (il < hp->n_dense_lead) {
            if ((st = upload_matrix(ctx, &S->ffn_gate, &D->ffn_gate))) return st;
            if ((st = upload_matrix(ctx, &S->ffn_up, &D->ffn_up))) return st;
            if ((st = upload_matrix(ctx, &S->ffn_down, &D->ffn_down))) return st;
        } else {
            if ((st = upload_matrix(ctx, &S->router, &D->router))) return st;
            if ((st = upload_vec(ctx, S->router_bias, hp->n_expert, &D->router_bias))) return st;
            if ((st = upload_matrix(ctx, &S->shexp_gate, &D->shexp_gate))) return st;
            if ((st = upload_matrix(ctx, &S->shexp_up, &D->shexp_up))) return st;
            if ((st = upload_matrix(ctx, &S->shexp_down, &D->shexp_down))) return st;
        }
    }
    return TIDE_OK;
}

/* ---- run buffers ----------------------------------------------------------------------------- */

static void run_free(tide_context *ctx) {
    tide_run *r = &ctx->run;
    tide_backend *be = ctx->be;
    float **dev[] = {&r->x, &r->xb, &r->xb2, &r->q, &r->att, &r->hb, &r->hb2, &r->router_logits,
                     &r->pairs};
    for (size_t i = 0; i < sizeof dev / sizeof *dev; i++) {
        if (*dev[i]) be->i->dealloc(be, *dev[i]);
        *dev[i] = NULL;
    }
    if (!ctx->on_host) {
        free(r->h_x);
        free(r->h_pairs);
    }
    r->h_x = r->h_pairs = NULL;
    free(r->h_router);
    free(r->h_ids);
    free(r->h_w);
    free(r->h_rows);
    free(r->h_gather);
    r->h_router = r->h_w = NULL;
    r->h_ids = r->h_rows = r->h_gather = NULL;
    r->pairs_up = r->pairs_cat = NULL;
    r->cap = 0;
}

static void logits_free(tide_context *ctx) {
    if (ctx->run.logits) ctx->be->i->dealloc(ctx->be, ctx->run.logits);
    ctx->run.logits = NULL;
    ctx->run.logits_cap = 0;
    free(ctx->run.h_logits);
    ctx->run.h_logits = NULL;
    ctx->run.h_logits_cap = 0;
}

static tide_status dev_alloc(tide_context *ctx, size_t n, float **p) {
    tide_status st = ctx->be->i->alloc(ctx->be, n, (void **)p);
    if (st != TIDE_OK) return tide_ctx_be_fail(ctx, st, "allocating activations");
    return TIDE_OK;
}

/* Buffers for n token rows and n_logits rows of logits (grown, never shrunk). */
tide_status tide_run_reserve(tide_context *ctx, int32_t n, int32_t n_logits) {
    const tide_hparams *hp = &ctx->model->hp;
    tide_run *r = &ctx->run;
    tide_status st;
    if (n > r->cap) {
        run_free(ctx);
        int32_t cap = n < 32 ? 32 : n;
        size_t H = (size_t)hp->n_embd, nq = (size_t)hp->n_head * hp->head_dim;
        size_t ff = (size_t)hp->n_ff, fs = (size_t)hp->n_ff_exp * hp->n_expert_shared;
        if (fs > ff) ff = fs;
        if (ff < 1) ff = 1;
        size_t E = (size_t)hp->n_expert, K = (size_t)hp->n_expert_used, c = (size_t)cap, f = 4;
        if ((st = dev_alloc(ctx, c * H * f, &r->x)) || (st = dev_alloc(ctx, c * H * f, &r->xb)) ||
            (st = dev_alloc(ctx, c * H * f, &r->xb2)) || (st = dev_alloc(ctx, c * nq * f, &r->q)) ||
            (st = dev_alloc(ctx, c * nq * f, &r->att)) || (st = dev_alloc(ctx, c * ff * f, &r->hb)) ||
            (st = dev_alloc(ctx, c * ff * f, &r->hb2)) ||
            (st = dev_alloc(ctx, c * E * f, &r->router_logits)) ||
            (st = dev_alloc(ctx, 3 * c * K * H * f, &r->pairs))) {
            run_free(ctx);
            return st;
        }
        r->pairs_up = r->pairs + c * K * H;
        r->pairs_cat = r->pairs + 2 * c * K * H;
        if (ctx->on_host) {
            r->h_pairs = r->pairs; /* host pairs land where moe_combine reads them */
        } else {
            r->h_x = malloc(c * H * f);
            r->h_pairs = malloc(c * K * H * f);
        }
        r->h_router = malloc(c * E * f);
        r->h_ids = malloc(c * K * sizeof(int32_t));
        r->h_w = malloc(c * K * f);
        r->h_rows = malloc(c * sizeof(int32_t));
        r->h_gather = malloc(c * K * sizeof(int32_t));
        if ((!ctx->on_host && (!r->h_x || !r->h_pairs)) || !r->h_router || !r->h_ids || !r->h_w ||
            !r->h_rows || !r->h_gather) {
            run_free(ctx);
            return tide_ctx_fail(ctx, TIDE_ERR_NOMEM, "out of memory for activations");
        }
        r->cap = cap;
    }
    if (n_logits > r->logits_cap) {
        logits_free(ctx);
        size_t bytes = (size_t)n_logits * (size_t)hp->n_vocab * sizeof(float);
        if ((st = dev_alloc(ctx, bytes, &r->logits))) return st;
        r->logits_cap = n_logits;
    }
    return TIDE_OK;
}

/* ---- create / free ------------------------------------------------------------------------- */

void tide_context_free(tide_context *ctx) {
    if (!ctx) return;
    if (ctx->be) {
        ctx->be->i->synchronize(ctx->be);
        tide_moe_free(ctx);
        run_free(ctx);
        logits_free(ctx);
        for (int32_t il = 0; ctx->k_cache && il < ctx->model->hp.n_layer; il++) {
            if (ctx->k_cache[il]) ctx->be->i->dealloc(ctx->be, ctx->k_cache[il]);
            if (ctx->v_cache[il]) ctx->be->i->dealloc(ctx->be, ctx->v_cache[il]);
        }
        for (int32_t i = 0; i < ctx->n_owned; i++) ctx->be->i->dealloc(ctx->be, ctx->owned[i]);
        ctx->be->i->free(ctx->be);
    }
    free(ctx->k_cache);
    free(ctx->v_cache);
    free(ctx->owned);
    free(ctx->w.layers);
    tide_pool_free(ctx->pool);
    free(ctx);
}

static tide_status check_residency_args(const tide_model *m, int32_t policy, int32_t budget,
                                        const int32_t *budgets, int32_t n_budgets,
                                        int32_t refresh_interval, char *err, size_t err_len) {
    if (policy < TIDE_POLICY_GPU || policy > TIDE_POLICY_TIDE)
        return tide_errf(err, err_len, TIDE_ERR_ARG, "policy: unknown policy %d", policy);
    if (refresh_interval < 1)
        return tide_errf(err, err_len, TIDE_ERR_ARG, "refresh_interval: %d, must be >= 1",
                       refresh_interval);
    if (budgets) {
        if (n_budgets != m->n_moe)
            return tide_errf(err, err_len, TIDE_ERR_ARG,
                           "budgets: %d entries, the model has %d MoE layers", n_budgets, m->n_moe);
        for (int32_t i = 0; i < n_budgets; i++)
            if (budgets[i] < 0)
                return tide_errf(err, err_len, TIDE_ERR_ARG, "budgets[%d]: %d is negative", i,
                               budgets[i]);
    } else if (budget < 0) {
        return tide_errf(err, err_len, TIDE_ERR_ARG, "budget: %d is negative", budget);
    }
    return TIDE_OK;
}

tide_status tide_context_create(const tide_model *model, const tide_context_params *params,
                                tide_context **out, char *err, size_t err_len) {
    if (err && err_len) err[0] = 0;
    if (!out) return tide_errf(err, err_len, TIDE_ERR_ARG, "out is NULL");
    *out = NULL;
    if (!model) return tide_errf(err, err_len, TIDE_ERR_ARG, "model is NULL");
    tide_context_params p = params ? *params : tide_context_default_params();
    const tide_hparams *hp = &model->hp;
    if (p.device < TIDE_DEVICE_CPU || p.device > TIDE_DEVICE_CUDA)
        return tide_errf(err, err_len, TIDE_ERR_ARG, "device: unknown device %d", p.device);
    tide_status st = check_residency_args(model, p.policy, p.budget, p.budgets, p.n_budgets,
                                          p.refresh_interval, err, err_len);
    if (st != TIDE_OK) return st;
    if (p.n_ctx <= 0) p.n_ctx = hp->n_ctx_train < 4096 ? hp->n_ctx_train : 4096;
    if (p.n_ctx > (1 << 22)) return tide_errf(err, err_len, TIDE_ERR_ARG, "n_ctx: %d too large", p.n_ctx);
    if (p.prefetch < 0)
        return tide_errf(err, err_len, TIDE_ERR_ARG, "prefetch: %d is negative", p.prefetch);

    tide_context *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return tide_errf(err, err_len, TIDE_ERR_NOMEM, "out of memory");
    ctx->model = model;
    ctx->params = p;
    ctx->params.budgets = NULL; /* not kept: the caller's array */
    ctx->n_ctx = p.n_ctx;
    ctx->policy = p.policy;
    ctx->refresh_interval = p.refresh_interval;

    if ((st = tide_pool_new(p.n_threads, &ctx->pool)) != TIDE_OK) {
        tide_errf(err, err_len, st, "could not start %d threads", p.n_threads);
        goto fail;
    }
    switch (p.device) {
    case TIDE_DEVICE_CPU:
        st = tide_backend_cpu_new(p.n_threads, ctx->pool, &ctx->be);
        ctx->on_host = 1;
        ctx->policy = TIDE_POLICY_CPU; /* no device: every expert runs on the host */
        break;
    case TIDE_DEVICE_SIM:
        st = tide_backend_sim_new(p.n_threads, ctx->pool, p.device_memory, &ctx->be);
        break;
    case TIDE_DEVICE_CUDA:
#ifdef TIDE_CUDA
        st = tide_backend_cuda_new(p.cuda_device, p.device_memory, &ctx->be, err, err_len);
        if (st != TIDE_OK) goto fail;
#else
        st = tide_errf(err, err_len, TIDE_ERR_UNSUPPORTED,
                     "device: this build of tide.cpp has no CUDA backend (rebuild with nvcc)");
        goto fail;
#endif
        break;
    }
    if (st != TIDE_OK) {
        tide_errf(err, err_len, st, "could not create the backend");
        goto fail;
    }

    if ((st = upload_weights(ctx)) != TIDE_OK) goto fail_ctx;
    /* KV cache */
    size_t kv_bytes = (size_t)ctx->n_ctx * (size_t)hp->n_head_kv * (size_t)hp->head_dim * sizeof(float);
    ctx->k_cache = calloc((size_t)hp->n_layer, sizeof(float *));
    ctx->v_cache = calloc((size_t)hp->n_layer, sizeof(float *));
    if (!ctx->k_cache || !ctx->v_cache) {
        st = tide_ctx_fail(ctx, TIDE_ERR_NOMEM, "out of memory");
        goto fail_ctx;
    }
    for (int32_t il = 0; il < hp->n_layer; il++) {
        if ((st = ctx->be->i->alloc(ctx->be, kv_bytes, (void **)&ctx->k_cache[il])) ||
            (st = ctx->be->i->alloc(ctx->be, kv_bytes, (void **)&ctx->v_cache[il]))) {
            tide_ctx_be_fail(ctx, st, "allocating the KV cache");
            goto fail_ctx;
        }
    }
    if ((st = tide_moe_init(ctx)) != TIDE_OK) goto fail_ctx;
    if ((st = tide_moe_set_residency(ctx, ctx->policy, params ? params->budgets : NULL,
                                     p.refresh_interval)) != TIDE_OK)
        goto fail_ctx;
    if ((st = tide_run_reserve(ctx, 32, 1)) != TIDE_OK) goto fail_ctx;
    ctx->err[0] = 0;
    *out = ctx;
    return TIDE_OK;
fail_ctx:
    tide_errf(err, err_len, st, "%s", ctx->err);
fail:
    tide_context_free(ctx);
    return st;
}

/* ---- residency controls ---------------------------------------------------------------------- */

tide_status tide_set_residency(tide_context *ctx, int32_t policy, int32_t budget,
                               const int32_t *budgets, int32_t n_budgets, int32_t refresh_interval) {
    if (!ctx) return TIDE_ERR_ARG;
    tide_status st = check_residency_args(ctx->model, policy, budget, budgets, n_budgets,
                                          refresh_interval, ctx->err, sizeof ctx->err);
    if (st != TIDE_OK) return st;
    if (ctx->params.device == TIDE_DEVICE_CPU) {
        ctx->refresh_interval = refresh_interval;
        return TIDE_OK; /* no device: nothing is ever resident */
    }
    ctx->params.budget = budget;
    return tide_moe_set_residency(ctx, policy, budgets, refresh_interval);
}

/* ---- the step interface ---------------------------------------------------------------------- */

void tide_reset(tide_context *ctx) {
    if (ctx) ctx->n_past = 0;
}
int32_t tide_n_past(const tide_context *ctx) { return ctx ? ctx->n_past : 0; }
int32_t tide_n_ctx(const tide_context *ctx) { return ctx ? ctx->n_ctx : 0; }

static tide_status check_tokens(tide_context *ctx, const int32_t *tokens, int32_t n) {
    if (!tokens || n <= 0) return tide_ctx_fail(ctx, TIDE_ERR_ARG, "tokens: empty (n = %d)", n);
    int32_t V = ctx->model->hp.n_vocab;
    for (int32_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= V)
            return tide_ctx_fail(ctx, TIDE_ERR_ARG, "tokens[%d] = %d outside the vocabulary [0, %d)",
                                 i, tokens[i], V);
    return TIDE_OK;
}

static tide_status check_room(tide_context *ctx, int32_t n_past, int32_t n) {
    if ((int64_t)n_past + n > ctx->n_ctx)
        return tide_ctx_fail(ctx, TIDE_ERR_CONTEXT,
                             "context full: %d cached + %d new tokens > n_ctx %d", n_past, n,
                             ctx->n_ctx);
    return TIDE_OK;
}

tide_status tide_commit(tide_context *ctx, const int32_t *tokens, int32_t n) {
    if (!ctx) return TIDE_ERR_ARG;
    tide_status st;
    if ((st = check_tokens(ctx, tokens, n)) || (st = check_room(ctx, ctx->n_past, n))) return st;
    double t0 = tide_now();
    st = tide_forward(ctx, tokens, n, ctx->n_past + n, 1, -1, NULL, 0);
    if (st == TIDE_OK) ctx->n_past += n;
    ctx->st.t_total += tide_now() - t0;
    return st;
}

tide_status tide_step(tide_context *ctx, const int32_t *tokens, int32_t n, const uint8_t *want,
                      int32_t step_in_block, const tide_sampling *sampling, int32_t *out_token,
                      float *out_prob) {
    if (!ctx) return TIDE_ERR_ARG;
    tide_status st;
    if ((st = check_tokens(ctx, tokens, n)) || (st = check_room(ctx, ctx->n_past, n))) return st;
    if (!want || !out_token || !out_prob)
        return tide_ctx_fail(ctx, TIDE_ERR_ARG, "want, out_token and out_prob are required");
    if (step_in_block < 0)
        return tide_ctx_fail(ctx, TIDE_ERR_ARG, "step_in_block: %d is negative", step_in_block);
    tide_sampling greedy = {0.0f, 0, 1.0f, 0};
    const tide_sampling *s = sampling ? sampling : &greedy;
    if (!(s->temperature >= 0.0f) || isinf(s->temperature))
        return tide_ctx_fail(ctx, TIDE_ERR_ARG, "temperature: %g, must be >= 0", (double)s->temperature);
    if (!(s->top_p > 0.0f)) /* NaN too */
        return tide_ctx_fail(ctx, TIDE_ERR_ARG, "top_p: %g, must be > 0", (double)s->top_p);
    double t0 = tide_now();
    if ((st = tide_run_reserve(ctx, n, n)) != TIDE_OK) return st;
    int32_t n_want = 0;
    int32_t *rows = ctx->run.h_rows;
    for (int32_t i = 0; i < n; i++) {
        out_token[i] = -1;
        out_prob[i] = 0.0f;
        if (want[i]) rows[n_want++] = i;
    }
    ctx->st.steps++;
    st = tide_forward(ctx, tokens, n, ctx->n_past + n, 0, step_in_block, rows, n_want);
    if (st != TIDE_OK) goto done;
    if (n_want == 0) goto done;
    double th = tide_now();
    const int32_t V = ctx->model->hp.n_vocab;
    int greedy_path = s->temperature == 0.0f && s->top_k <= 0 && s->top_p >= 1.0f;
    int32_t *tok = ctx->run.h_ids; /* scratch: [cap * n_used] >= n_want */
    float *prob = ctx->run.h_w;
    if (greedy_path) {
        st = ctx->be->i->argmax_prob(ctx->be, ctx->run.logits, n_want, V, tok, prob);
        if (st != TIDE_OK) {
            tide_ctx_be_fail(ctx, st, "argmax");
            goto done;
        }
    } else {
        size_t bytes = (size_t)n_want * (size_t)V * sizeof(float);
        if (n_want > ctx->run.h_logits_cap) {
            free(ctx->run.h_logits);
            ctx->run.h_logits = malloc(bytes);
            ctx->run.h_logits_cap = ctx->run.h_logits ? n_want : 0;
            if (!ctx->run.h_logits) {
                st = tide_ctx_fail(ctx, TIDE_ERR_NOMEM, "out of memory for logits");
                goto done;
            }
        }
        st = ctx->be->i->download(ctx->be, ctx->run.h_logits, ctx->run.logits, bytes);
        if (st != TIDE_OK) {
            tide_ctx_be_fail(ctx, st, "downloading logits");
            goto done;
        }
        st = cpu_sample(ctx->pool, ctx->run.h_logits, n_want, V, s, rows, tok, prob);
        if (st != TIDE_OK) {
            st = tide_ctx_fail(ctx, st, "sampling failed (temperature %g, top_k %d, top_p %g)",
                               (double)s->temperature, s->top_k, (double)s->top_p);
            goto done;
        }
    }
    for (int32_t j = 0; j < n_want; j++) {
        out_token[rows[j]] = tok[j];
        out_prob[rows[j]] = prob[j];
    }
    ctx->st.t_lm_head += tide_now() - th;
done:
    ctx->st.t_total += tide_now() - t0;
    return st;
}

tide_status tide_logits(tide_context *ctx, const int32_t *tokens, int32_t n, int32_t block_length,
                        float *out) {
    if (!ctx) return TIDE_ERR_ARG;
    tide_status st;
    ctx->n_past = 0;
    if ((st = check_tokens(ctx, tokens, n)) || (st = check_room(ctx, 0, n))) return st;
    if (block_length < 1)
        return tide_ctx_fail(ctx, TIDE_ERR_ARG, "block_length: %d, must be >= 1", block_length);
    if (!out) return tide_ctx_fail(ctx, TIDE_ERR_ARG, "out is NULL");
    double t0 = tide_now();
    if ((st = tide_run_reserve(ctx, n, n)) != TIDE_OK) return st;
    for (int32_t i = 0; i < n; i++) ctx->run.h_rows[i] = i;
    st = tide_forward(ctx, tokens, n, block_length, 2, -1, ctx->run.h_rows, n);
    if (st == TIDE_OK) {
        size_t bytes = (size_t)n * (size_t)ctx->model->hp.n_vocab * sizeof(float);
        st = ctx->be->i->download(ctx->be, out, ctx->run.logits, bytes);
        if (st != TIDE_OK) tide_ctx_be_fail(ctx, st, "downloading logits");
    }
    ctx->n_past = 0;
    ctx->st.t_total += tide_now() - t0;
    return st;
}

/* ---- counters and trace ---------------------------------------------------------------------- */

void tide_get_stats(const tide_context *ctx, tide_stats *out) {
    if (!ctx || !out) return;
    *out = ctx->st;
    tide_moe_stats(ctx, out);
}

tide_status tide_get_layer_stats(const tide_context *ctx, int32_t moe_layer, tide_layer_stats *out) {
    if (!ctx || !out || moe_layer < 0 || moe_layer >= ctx->model->n_moe) return TIDE_ERR_ARG;
    tide_moe_layer_stats(ctx, moe_layer, out);
    return TIDE_OK;
}

void tide_stats_reset(tide_context *ctx) {
    if (!ctx) return;
    uint64_t w = ctx->st.weights_h2d_bytes;
    memset(&ctx->st, 0, sizeof ctx->st);
    ctx->st.weights_h2d_bytes = w; /* a fact about the context, not about the work since */
    tide_moe_reset_stats(ctx);
}

tide_status tide_last_hits(const tide_context *ctx, int32_t *out, size_t n) {
    if (!ctx || !out) return TIDE_ERR_ARG;
    const tide_model *m = ctx->model;
    size_t E = (size_t)m->hp.n_expert;
    if (!ctx->params.trace) return TIDE_ERR_ARG;
    if (n != (size_t)m->n_moe * E) return TIDE_ERR_ARG;
    for (int32_t i = 0; i < m->n_moe; i++)
        memcpy(out + (size_t)i * E, ctx->moe[i].last_hits, E * sizeof(int32_t));
    return TIDE_OK;
}

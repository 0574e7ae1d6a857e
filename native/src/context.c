/* context.c: a tide_context around a model (model.h): the backend, the device copies of every
 * non-expert weight, the KV cache, the MoE layers' residency, the run buffers. api.c has checked
 * the parameters before tide_context_open sees them. */
#include "model.h"
#include "moe/moe.h"

#include <stdlib.h>
#include <string.h>

/* ---- device copies of the weights ------------------------------------------------------------ */

static tide_status upload_bytes(tide_context *ctx, const void *src, size_t n, void **dst) {
    int copied = 0;
    tide_status st = ctx->be->buf->upload_weight(ctx->be, src, n, dst, &copied);
    if (st != TIDE_OK) return be_check(ctx, st, "uploading the weights");
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
    int32_t max_owned = 2 + hp->n_layer * 16; /* at most 13 device copies per layer */
    ctx->owned = calloc((size_t)max_owned, sizeof(void *));
    ctx->w.layers = calloc((size_t)hp->n_layer, sizeof *ctx->w.layers);
    if (!ctx->owned || !ctx->w.layers) return ctx_fail(ctx, TIDE_ERR_NOMEM, "out of memory");
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
        /* q, k, v: row ranges of one fused tensor or three tensors (model.c), uploaded apart */
        if ((st = upload_matrix(ctx, &S->wq, &D->wq))) return st;
        if ((st = upload_matrix(ctx, &S->wk, &D->wk))) return st;
        if ((st = upload_matrix(ctx, &S->wv, &D->wv))) return st;
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

/* ---- create / free ------------------------------------------------------------------------- */

void tide_context_close(tide_context *ctx) {
    if (!ctx) return;
    if (ctx->be) {
        ctx->be->ops->synchronize(ctx->be);
        moe_free(ctx);
        tide_run_free(ctx);
        for (int32_t il = 0; ctx->k_cache && il < ctx->model->hp.n_layer; il++) {
            if (ctx->k_cache[il]) ctx->be->buf->dealloc(ctx->be, ctx->k_cache[il]);
            if (ctx->v_cache[il]) ctx->be->buf->dealloc(ctx->be, ctx->v_cache[il]);
        }
        for (int32_t i = 0; i < ctx->n_owned; i++) ctx->be->buf->dealloc(ctx->be, ctx->owned[i]);
        ctx->be->dev->free(ctx->be);
    }
    free(ctx->k_cache);
    free(ctx->v_cache);
    free(ctx->tokens);
    free(ctx->owned);
    free(ctx->w.layers);
    tide_pool_free(ctx->pool);
    free(ctx);
}

static tide_status new_backend(tide_context *ctx, char *err, size_t err_len) {
    const tide_context_params *p = &ctx->params;
    tide_status st = TIDE_ERR_ARG;
    switch (p->device) {
    case TIDE_DEVICE_CPU: st = tide_backend_cpu_new(ctx->pool, &ctx->be); break;
    case TIDE_DEVICE_SIM: st = tide_backend_sim_new(ctx->pool, p->device_memory, &ctx->be); break;
    case TIDE_DEVICE_CUDA:
#ifdef TIDE_CUDA
        /* the CUDA constructor writes its own cause into err */
        return tide_backend_cuda_new(p->cuda_device, p->device_memory, &ctx->be, err, err_len);
#else
        return tide_errf(err, err_len, TIDE_ERR_UNSUPPORTED,
                         "device: this build of tide.cpp has no CUDA backend (rebuild with nvcc)");
#endif
    }
    if (st != TIDE_OK) return tide_errf(err, err_len, st, "could not create the backend");
    return TIDE_OK;
}

/* Bytes of cache one token takes: keys and values of every layer. */
static uint64_t cache_bytes_per_token(const tide_hparams *hp, int32_t cache_type) {
    return 2ull * (uint64_t)hp->n_layer *
           tide_row_bytes(cache_type, (int64_t)hp->n_head_kv * hp->head_dim);
}

uint64_t tide_context_cache_bytes(const tide_context *ctx) {
    return cache_bytes_per_token(&ctx->model->hp, ctx->cache_type) * (uint64_t)ctx->n_ctx;
}

/* The context length: the caller's, if its cache fits in the free memory (else an error naming
 * both), or by default the model's own, lowered to what fits in half of the free memory (the
 * rest stays for expert slots and activations), in steps of 256 tokens. */
static tide_status choose_n_ctx(tide_context *ctx) {
    const tide_hparams *hp = &ctx->model->hp;
    uint64_t per = cache_bytes_per_token(hp, ctx->cache_type), free_b = 0, total_b = 0;
    TRY(be_check(ctx, ctx->be->dev->mem_free(ctx->be, &free_b, &total_b), "free memory"));
    if (ctx->params.n_ctx > 0) {
        uint64_t need = per * (uint64_t)ctx->params.n_ctx;
        if (need > free_b)
            return ctx_fail(ctx, TIDE_ERR_NOMEM,
                            "n_ctx %d: the KV cache needs %llu bytes (%.2f GiB), %llu bytes "
                            "(%.2f GiB) free on %s",
                            ctx->params.n_ctx, (unsigned long long)need, need / 1073741824.0,
                            (unsigned long long)free_b, free_b / 1073741824.0,
                            ctx->be->dev->name);
        ctx->n_ctx = ctx->params.n_ctx;
        return TIDE_OK;
    }
    int64_t fit = (int64_t)(free_b / 2 / per);
    int64_t n = hp->n_ctx_train < fit ? hp->n_ctx_train : fit / 256 * 256;
    if (n < 1)
        return ctx_fail(ctx, TIDE_ERR_NOMEM,
                        "no room for a KV cache: %llu bytes a token, %llu bytes free on %s",
                        (unsigned long long)per, (unsigned long long)free_b, ctx->be->dev->name);
    if (n > (1 << 22)) n = 1 << 22;
    ctx->n_ctx = (int32_t)n;
    return TIDE_OK;
}

static tide_status alloc_kv_cache(tide_context *ctx) {
    const tide_hparams *hp = &ctx->model->hp;
    TRY(choose_n_ctx(ctx));
    size_t kv_bytes = (size_t)ctx->n_ctx *
                      tide_row_bytes(ctx->cache_type, (int64_t)hp->n_head_kv * hp->head_dim);
    ctx->tokens = calloc((size_t)ctx->n_ctx, sizeof(int32_t));
    ctx->k_cache = calloc((size_t)hp->n_layer, sizeof(void *));
    ctx->v_cache = calloc((size_t)hp->n_layer, sizeof(void *));
    if (!ctx->tokens || !ctx->k_cache || !ctx->v_cache)
        return ctx_fail(ctx, TIDE_ERR_NOMEM, "out of memory");
    for (int32_t il = 0; il < hp->n_layer; il++) {
        TRY(be_check(ctx, ctx->be->buf->alloc(ctx->be, kv_bytes, &ctx->k_cache[il]),
                     "allocating the KV cache"));
        TRY(be_check(ctx, ctx->be->buf->alloc(ctx->be, kv_bytes, &ctx->v_cache[il]),
                     "allocating the KV cache"));
    }
    return TIDE_OK;
}

/* Everything that records its failure on the context. */
static tide_status fill(tide_context *ctx, const int32_t *budgets) {
    TRY(upload_weights(ctx));
    TRY(alloc_kv_cache(ctx));
    TRY(moe_init(ctx));
    TRY(moe_set_residency(ctx, ctx->policy, budgets, ctx->params.refresh_interval));
    return tide_run_reserve(ctx, 32, 1);
}

tide_status tide_context_open(const tide_model *model, const tide_context_params *p,
                              const int32_t *budgets, tide_context **out, char *err,
                              size_t err_len) {
    tide_context *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return tide_errf(err, err_len, TIDE_ERR_NOMEM, "out of memory");
    ctx->model = model;
    ctx->params = *p;
    ctx->params.budgets = NULL; /* not kept: the caller's array */
    ctx->n_ctx = p->n_ctx;
    ctx->cache_type = p->cache_type;
    ctx->policy = p->policy;
    tide_status st = tide_pool_new(p->n_threads, &ctx->pool);
    if (st != TIDE_OK) {
        tide_errf(err, err_len, st, "could not start %d threads", p->n_threads);
        goto fail;
    }
    if ((st = new_backend(ctx, err, err_len)) != TIDE_OK) goto fail;
    /* no device: every expert runs on the host */
    if (ctx->be->dev->caps & TIDE_BACKEND_HOST_MEMORY) ctx->policy = TIDE_POLICY_CPU;
    if ((st = fill(ctx, budgets)) != TIDE_OK) {
        tide_errf(err, err_len, st, "%s", ctx->err);
        goto fail;
    }
    ctx->err[0] = 0;
    *out = ctx;
    return TIDE_OK;
fail:
    tide_context_close(ctx);
    return st;
}

/* forward.c: the LLaDA2.0 forward pass, layer by layer, through the backend's ops only, and the
 * run buffers it computes in. One call runs n tokens at positions n_past .. n_past+n-1: their
 * keys and values are written into the cache rows of those positions, and they attend to every
 * cached row before them plus each other under the block-causal rule. */
#include "model.h"
#include "backend/cpu/kernels.h"
#include "moe/moe.h"

#include <stdlib.h>

/* ---- run buffers ----------------------------------------------------------------------------- */

static void free_rows(tide_context *ctx) {
    tide_run *r = &ctx->run;
    tide_backend *be = ctx->be;
    float **dev[] = {&r->x, &r->xb, &r->xb2, &r->q, &r->att, &r->hb, &r->hb2, &r->router_logits,
                     &r->pairs};
    for (size_t i = 0; i < sizeof dev / sizeof *dev; i++) {
        if (*dev[i]) be->buf->dealloc(be, *dev[i]);
        *dev[i] = NULL;
    }
    if (!(be->dev->caps & TIDE_BACKEND_HOST_MEMORY)) {
        free(r->host_x);
        free(r->host_pairs);
    }
    r->host_x = r->host_pairs = NULL;
    free(r->host_router);
    free(r->host_ids);
    free(r->host_w);
    free(r->host_rows);
    free(r->host_gather);
    r->host_router = r->host_w = NULL;
    r->host_ids = r->host_rows = r->host_gather = NULL;
    r->pairs_from_host = r->pairs_cat = NULL;
    r->cap = 0;
}

static void free_logits(tide_context *ctx) {
    if (ctx->run.logits) ctx->be->buf->dealloc(ctx->be, ctx->run.logits);
    ctx->run.logits = NULL;
    ctx->run.logits_cap = 0;
    free(ctx->run.host_logits);
    ctx->run.host_logits = NULL;
    ctx->run.host_logits_cap = 0;
}

void tide_run_free(tide_context *ctx) {
    free_rows(ctx);
    free_logits(ctx);
}

static tide_status dev_alloc(tide_context *ctx, size_t n, float **p) {
    return be_check(ctx, ctx->be->buf->alloc(ctx->be, n, (void **)p), "allocating activations");
}

static tide_status reserve_rows(tide_context *ctx, int32_t n) {
    const tide_hparams *hp = &ctx->model->hp;
    const int in_place = (ctx->be->dev->caps & TIDE_BACKEND_HOST_MEMORY) != 0;
    tide_run *r = &ctx->run;
    tide_status st;
    free_rows(ctx);
    int32_t cap = n < 32 ? 32 : n;
    size_t H = (size_t)hp->n_embd, nq = (size_t)hp->n_head * hp->head_dim;
    size_t ff = (size_t)hp->n_ff, fs = (size_t)hp->n_ff_exp * hp->n_expert_shared;
    if (fs > ff) ff = fs;
    size_t nkv = (size_t)hp->n_head_kv * hp->head_dim;
    if (ff < nkv) ff = nkv; /* hb, hb2 also hold K and V before a half cache stores them */
    if (ff < 1) ff = 1;
    size_t E = (size_t)hp->n_expert, K = (size_t)hp->n_expert_used, c = (size_t)cap, f = 4;
    if ((st = dev_alloc(ctx, c * H * f, &r->x)) || (st = dev_alloc(ctx, c * H * f, &r->xb)) ||
        (st = dev_alloc(ctx, c * H * f, &r->xb2)) || (st = dev_alloc(ctx, c * nq * f, &r->q)) ||
        (st = dev_alloc(ctx, c * nq * f, &r->att)) || (st = dev_alloc(ctx, c * ff * f, &r->hb)) ||
        (st = dev_alloc(ctx, c * ff * f, &r->hb2)) ||
        (st = dev_alloc(ctx, c * E * f, &r->router_logits)) ||
        (st = dev_alloc(ctx, 3 * c * K * H * f, &r->pairs))) {
        free_rows(ctx);
        return st;
    }
    r->pairs_from_host = r->pairs + c * K * H;
    r->pairs_cat = r->pairs + 2 * c * K * H;
    if (in_place) {
        r->host_pairs = r->pairs; /* host pairs land where moe_combine reads them */
    } else {
        r->host_x = malloc(c * H * f);
        r->host_pairs = malloc(c * K * H * f);
    }
    r->host_router = malloc(c * E * f);
    r->host_ids = malloc(c * K * sizeof(int32_t));
    r->host_w = malloc(c * K * f);
    r->host_rows = malloc(c * sizeof(int32_t));
    r->host_gather = malloc(c * K * sizeof(int32_t));
    if ((!in_place && (!r->host_x || !r->host_pairs)) || !r->host_router || !r->host_ids ||
        !r->host_w || !r->host_rows || !r->host_gather) {
        free_rows(ctx);
        return ctx_fail(ctx, TIDE_ERR_NOMEM, "out of memory for activations");
    }
    r->cap = cap;
    return TIDE_OK;
}

tide_status tide_run_reserve(tide_context *ctx, int32_t n, int32_t n_logits) {
    tide_run *r = &ctx->run;
    if (n > r->cap) TRY(reserve_rows(ctx, n));
    if (n_logits > r->logits_cap) {
        free_logits(ctx);
        size_t bytes = (size_t)n_logits * (size_t)ctx->model->hp.n_vocab * sizeof(float);
        TRY(dev_alloc(ctx, bytes, &r->logits));
        r->logits_cap = n_logits;
    }
    return TIDE_OK;
}

/* ---- the layers ------------------------------------------------------------------------------ */

/* Attention sublayer of layer il: norm, Q/K/V (K and V straight into the cache), QK-norm, RoPE,
 * scores against every cached row and this forward's own rows, output projection, residual. */
static tide_status attention(tide_context *ctx, int32_t il, int32_t n, int32_t block_length) {
    const tide_hparams *hp = &ctx->model->hp;
    const tide_layer_weights *L = &ctx->w.layers[il];
    tide_backend *be = ctx->be;
    const tide_backend_ops_i *op = be->ops;
    tide_run *r = &ctx->run;
    const int32_t H = hp->n_embd, hd = hp->head_dim;
    const int32_t nq = hp->n_head * hd, nkv = hp->n_head_kv * hd, pos0 = ctx->n_past;
    /* this forward's cache rows; an f32 cache takes K and V straight from the matmul, a half
     * cache after computing them in f32 in the MLP buffers (free until the MLP) */
    const size_t row = tide_row_bytes(ctx->cache_type, nkv);
    char *k_rows = (char *)ctx->k_cache[il] + (size_t)pos0 * row;
    char *v_rows = (char *)ctx->v_cache[il] + (size_t)pos0 * row;
    const int f32 = ctx->cache_type == TIDE_TYPE_F32;
    float *k = f32 ? (float *)k_rows : r->hb;
    float *v = f32 ? (float *)v_rows : r->hb2;
    TRY(be_check(ctx, op->rmsnorm(be, r->x, L->attn_norm, n, H, hp->rms_eps, r->xb), "attn_norm"));
    TRY(be_check(ctx, op->matmul(be, &L->wq, r->xb, n, r->q), "q"));
    TRY(be_check(ctx, op->matmul(be, &L->wk, r->xb, n, k), "k"));
    TRY(be_check(ctx, op->matmul(be, &L->wv, r->xb, n, v), "v"));
    if (hp->qk_norm) {
        TRY(be_check(ctx, op->rmsnorm(be, r->q, L->q_norm, n * hp->n_head, hd, hp->rms_eps, r->q),
                     "q_norm"));
        TRY(be_check(ctx, op->rmsnorm(be, k, L->k_norm, n * hp->n_head_kv, hd, hp->rms_eps, k),
                     "k_norm"));
    }
    if (hp->rope_dim > 0) {
        TRY(be_check(ctx, op->rope(be, r->q, n, nq, hp->n_head, hd, hp->rope_dim, pos0,
                                   hp->rope_theta),
                     "rope q"));
        TRY(be_check(ctx, op->rope(be, k, n, nkv, hp->n_head_kv, hd, hp->rope_dim, pos0,
                                   hp->rope_theta),
                     "rope k"));
    }
    if (!f32) {
        TRY(be_check(ctx, op->convert(be, k, (int64_t)n * nkv, ctx->cache_type, k_rows),
                     "storing keys"));
        TRY(be_check(ctx, op->convert(be, v, (int64_t)n * nkv, ctx->cache_type, v_rows),
                     "storing values"));
    }
    tide_attn_shape s = {n, pos0, pos0 + n, block_length, hp->n_head, hp->n_head_kv, hd, nkv,
                         ctx->cache_type};
    TRY(be_check(ctx, op->attention(be, &s, r->q, ctx->k_cache[il], ctx->v_cache[il], r->att),
                 "attention"));
    TRY(be_check(ctx, op->matmul(be, &L->wo, r->att, n, r->xb2), "attn_output"));
    return be_check(ctx, op->add(be, r->x, r->xb2, (int64_t)n * H), "residual");
}

/* Dense MLP of a leading layer on the normed input r->xb, into the residual. */
static tide_status dense_mlp(tide_context *ctx, int32_t il, int32_t n) {
    const tide_hparams *hp = &ctx->model->hp;
    const tide_layer_weights *L = &ctx->w.layers[il];
    tide_backend *be = ctx->be;
    const tide_backend_ops_i *op = be->ops;
    tide_run *r = &ctx->run;
    TRY(be_check(ctx, op->matmul(be, &L->ffn_gate, r->xb, n, r->hb), "ffn_gate"));
    TRY(be_check(ctx, op->matmul(be, &L->ffn_up, r->xb, n, r->hb2), "ffn_up"));
    TRY(be_check(ctx, op->silu_mul(be, r->hb, r->hb2, (int64_t)n * hp->n_ff), "silu"));
    TRY(be_check(ctx, op->matmul(be, &L->ffn_down, r->hb, n, r->xb2), "ffn_down"));
    return be_check(ctx, op->add(be, r->x, r->xb2, (int64_t)n * hp->n_embd), "residual");
}

/* Final norm; lm_head only for the wanted rows. */
static tide_status lm_head(tide_context *ctx, int32_t n, const int32_t *want_rows, int32_t n_want) {
    const tide_hparams *hp = &ctx->model->hp;
    tide_backend *be = ctx->be;
    const tide_backend_ops_i *op = be->ops;
    tide_run *r = &ctx->run;
    const int32_t H = hp->n_embd;
    TRY(be_check(ctx, op->rmsnorm(be, r->x, ctx->w.output_norm, n, H, hp->rms_eps, r->xb),
                 "output_norm"));
    const float *h = r->xb;
    int all = n_want == n;
    for (int32_t i = 0; all && i < n; i++) all = want_rows[i] == i;
    if (!all) {
        TRY(be_check(ctx, op->gather_rows(be, r->xb2, r->xb, want_rows, n_want, H), "gather"));
        h = r->xb2;
    }
    return be_check(ctx, op->matmul(be, &ctx->w.output, h, n_want, r->logits), "lm_head");
}

tide_status tide_forward(tide_context *ctx, const int32_t *tokens, int32_t n, int32_t block_length,
                         tide_forward_kind kind, int32_t step_in_block, const int32_t *want_rows,
                         int32_t n_want) {
    const tide_hparams *hp = &ctx->model->hp;
    tide_backend *be = ctx->be;
    tide_run *r = &ctx->run;
    /* tide_run_reserve may move host_rows: callers size the buffers before filling want_rows */
    TRY(tide_run_reserve(ctx, n, n_want));
    /* async backends: the host clock would time the enqueue, not the work */
    const int timed = !(be->dev->caps & TIDE_BACKEND_ASYNC);
    const int in_place = (be->dev->caps & TIDE_BACKEND_HOST_MEMORY) != 0;
    double t;

    /* embedding: a row lookup on the host, then one upload */
    float *emb = in_place ? r->x : r->host_x;
    tide_status st = cpu_get_rows(ctx->pool, &ctx->w.token_embd, tokens, n, emb);
    if (st != TIDE_OK) return ctx_fail(ctx, st, "embedding lookup failed");
    if (!in_place)
        TRY(be_check(ctx, be->buf->upload(be, r->x, emb, (size_t)n * hp->n_embd * sizeof(float)),
                     "upload"));
    /* the first MoE layer's predicted promotions start copying now (the next ones are started
     * by the MoE layer before them) */
    if (kind == TIDE_FORWARD_STEP) TRY(moe_prefetch(ctx, 0, step_in_block));

    for (int32_t il = 0; il < hp->n_layer; il++) {
        t = tide_now();
        TRY(attention(ctx, il, n, block_length));
        if (timed) ctx->st.t_attention += tide_now() - t;
        TRY(be_check(ctx, be->ops->rmsnorm(be, r->x, ctx->w.layers[il].ffn_norm, n, hp->n_embd,
                                           hp->rms_eps, r->xb),
                     "ffn_norm"));
        if (il < hp->n_dense_lead) {
            t = tide_now();
            TRY(dense_mlp(ctx, il, n));
            if (timed) ctx->st.t_dense += tide_now() - t;
        } else {
            TRY(moe_forward(ctx, il - hp->n_dense_lead, r->xb, n, kind, step_in_block, r->x));
        }
    }
    if (n_want > 0) {
        t = tide_now();
        TRY(lm_head(ctx, n, want_rows, n_want));
        if (timed) ctx->st.t_lm_head += tide_now() - t;
    }
    ctx->st.forwards++;
    ctx->st.tokens_forwarded += (uint64_t)n;
    return TIDE_OK;
}

/* ---- the head of a step ---------------------------------------------------------------------- */

tide_status tide_forward_head(tide_context *ctx, int32_t n_want, const int32_t *rows,
                              const tide_sampling *s, int32_t *out_token, float *out_prob) {
    tide_backend *be = ctx->be;
    tide_run *r = &ctx->run;
    const int32_t V = ctx->model->hp.n_vocab;
    int32_t *tok = r->host_ids; /* scratch: [cap * n_used] >= n_want */
    float *prob = r->host_w;
    if (s->temperature == 0.0f && s->top_k <= 0 && s->top_p >= 1.0f) {
        TRY(be_check(ctx, be->ops->argmax_prob(be, r->logits, n_want, V, tok, prob), "argmax"));
    } else {
        size_t bytes = (size_t)n_want * (size_t)V * sizeof(float);
        if (n_want > r->host_logits_cap) {
            free(r->host_logits);
            r->host_logits = malloc(bytes);
            r->host_logits_cap = r->host_logits ? n_want : 0;
            if (!r->host_logits) return ctx_fail(ctx, TIDE_ERR_NOMEM, "out of memory for logits");
        }
        TRY(be_check(ctx, be->buf->download(be, r->host_logits, r->logits, bytes),
                     "downloading logits"));
        tide_status st = cpu_sample(ctx->pool, r->host_logits, n_want, V, s, rows, tok, prob);
        if (st != TIDE_OK)
            return ctx_fail(ctx, st, "sampling failed (temperature %g, top_k %d, top_p %g)",
                            (double)s->temperature, s->top_k, (double)s->top_p);
    }
    for (int32_t j = 0; j < n_want; j++) {
        out_token[rows[j]] = tok[j];
        out_prob[rows[j]] = prob[j];
    }
    return TIDE_OK;
}

/* forward.c: the LLaDA2.0 forward pass, top to bottom as LLADA2.md section 3 lists it, through the
 * backend's ops only. One call runs n tokens at positions n_past .. n_past+n-1: their keys and
 * values are written into the cache rows of those positions, and they attend to every cached row
 * before them plus each other under the block-causal rule. */
#include "model.h"
#include "cpu/kernels.h"

#define TRY(call, what)                                                                      \
    do {                                                                                     \
        tide_status st_ = (call);                                                            \
        if (st_ != TIDE_OK) return tide_ctx_be_fail(ctx, st_, what);                         \
    } while (0)

tide_status tide_forward(tide_context *ctx, const int32_t *tokens, int32_t n, int32_t block_length,
                         int kind, int32_t step_in_block, const int32_t *want_rows, int32_t n_want) {
    const tide_hparams *hp = &ctx->model->hp;
    tide_backend *be = ctx->be;
    const tide_backend_i *op = be->i;
    tide_run *r = &ctx->run;
    tide_status st;
    if ((st = tide_run_reserve(ctx, n, n_want)) != TIDE_OK) return st;
    /* tide_run_reserve may have moved h_rows: the caller's want_rows stay valid (copied first) */
    const int32_t H = hp->n_embd, hd = hp->head_dim;
    const int32_t nq = hp->n_head * hd, nkv = hp->n_head_kv * hd;
    const int32_t pos0 = ctx->n_past;
    const int timed = ctx->params.device != TIDE_DEVICE_CUDA; /* cuda ops are async */
    double t;

    /* embedding: a row lookup on the host, then one upload */
    float *emb = ctx->on_host ? r->x : r->h_x;
    st = cpu_get_rows(ctx->pool, &ctx->w.token_embd, tokens, n, emb);
    if (st != TIDE_OK) return tide_ctx_fail(ctx, st, "embedding lookup failed");
    if (!ctx->on_host) TRY(op->upload(be, r->x, emb, (size_t)n * H * sizeof(float)), "upload");
    /* the first MoE layer's predicted promotions start copying now (the next ones are started
     * by the MoE layer before them) */
    if (kind == 0 && (st = tide_moe_prefetch(ctx, 0, step_in_block)) != TIDE_OK) return st;

    for (int32_t il = 0; il < hp->n_layer; il++) {
        const tide_layer_weights *L = &ctx->w.layers[il];
        float *k = ctx->k_cache[il] + (size_t)pos0 * nkv; /* this forward's cache rows */
        float *v = ctx->v_cache[il] + (size_t)pos0 * nkv;
        t = tide_now();
        /* attention: norm, Q/K/V (K and V straight into the cache), QK-norm, RoPE */
        TRY(op->rmsnorm(be, r->x, L->attn_norm, n, H, hp->rms_eps, r->xb), "attn_norm");
        TRY(op->matmul(be, &L->wq, r->xb, n, r->q), "q");
        TRY(op->matmul(be, &L->wk, r->xb, n, k), "k");
        TRY(op->matmul(be, &L->wv, r->xb, n, v), "v");
        if (hp->qk_norm) {
            TRY(op->rmsnorm(be, r->q, L->q_norm, n * hp->n_head, hd, hp->rms_eps, r->q), "q_norm");
            TRY(op->rmsnorm(be, k, L->k_norm, n * hp->n_head_kv, hd, hp->rms_eps, k), "k_norm");
        }
        if (hp->rope_dim > 0) {
            TRY(op->rope(be, r->q, n, nq, hp->n_head, hd, hp->rope_dim, pos0, hp->rope_theta), "rope q");
            TRY(op->rope(be, k, n, nkv, hp->n_head_kv, hd, hp->rope_dim, pos0, hp->rope_theta), "rope k");
        }
        /* scores against every cached row and this forward's own rows */
        tide_attn_shape s = {n, pos0, pos0 + n, block_length, hp->n_head, hp->n_head_kv, hd, nkv};
        TRY(op->attention(be, &s, r->q, ctx->k_cache[il], ctx->v_cache[il], r->att), "attention");
        TRY(op->matmul(be, &L->wo, r->att, n, r->xb2), "attn_output");
        TRY(op->add(be, r->x, r->xb2, (int64_t)n * H), "residual");
        if (timed) ctx->st.t_attention += tide_now() - t;

        /* MLP: dense for the leading layers, MoE after */
        TRY(op->rmsnorm(be, r->x, L->ffn_norm, n, H, hp->rms_eps, r->xb), "ffn_norm");
        if (il < hp->n_dense_lead) {
            t = tide_now();
            TRY(op->matmul(be, &L->ffn_gate, r->xb, n, r->hb), "ffn_gate");
            TRY(op->matmul(be, &L->ffn_up, r->xb, n, r->hb2), "ffn_up");
            TRY(op->silu_mul(be, r->hb, r->hb2, (int64_t)n * hp->n_ff), "silu");
            TRY(op->matmul(be, &L->ffn_down, r->hb, n, r->xb2), "ffn_down");
            TRY(op->add(be, r->x, r->xb2, (int64_t)n * H), "residual");
            if (timed) ctx->st.t_dense += tide_now() - t;
        } else {
            st = tide_moe_forward(ctx, il - hp->n_dense_lead, r->xb, n, kind, step_in_block, r->x);
            if (st != TIDE_OK) return st;
        }
    }

    /* final norm; lm_head only for the wanted rows */
    if (n_want > 0) {
        t = tide_now();
        TRY(op->rmsnorm(be, r->x, ctx->w.output_norm, n, H, hp->rms_eps, r->xb), "output_norm");
        const float *h = r->xb;
        int all = n_want == n;
        for (int32_t i = 0; all && i < n; i++) all = want_rows[i] == i;
        if (!all) {
            TRY(op->gather_rows(be, r->xb2, r->xb, want_rows, n_want, H), "gather");
            h = r->xb2;
        }
        TRY(op->matmul(be, &ctx->w.output, h, n_want, r->logits), "lm_head");
        if (timed) ctx->st.t_lm_head += tide_now() - t;
    }
    ctx->st.forwards++;
    ctx->st.tokens_forwarded += (uint64_t)n;
    return TIDE_OK;
}

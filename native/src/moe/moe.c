/* moe.c: one MoE layer's forward (moe.h). The router runs on the device (one matmul with the f32
 * router weight), its logits come to the host, where the choice is taken exactly as
 * reference.route does; the residency policy plans the forward; its promotions are copied into
 * device slots on the transfer stream; resident experts run on the device, misses on the host
 * thread pool at the same time; the host outputs are uploaded in one copy into the device pair
 * buffer and every token's expert outputs are summed in the router's k order, so placement
 * cannot change a bit. */
#include "moe/moe.h"
#include "backend/cpu/kernels.h"

#include <stdlib.h>
#include <string.h>

/* One forward of one layer, as its steps pass it along. */
typedef struct {
    tide_context *ctx;
    int32_t ml, il;                 /* MoE layer, layer */
    const tide_layer_weights *weights;      /* where the backend reads them */
    const tide_layer_weights *host_weights; /* the mapping's views (routed experts) */
    tide_moe_layer *M;
    int32_t n;                      /* tokens */
    const float *xb;                /* normed input [n, H], device */
    const float *host_xb;           /* the same on the host (host experts read it) */
    tide_residency_plan plan;
    const uint8_t *served;          /* promotions a prefetch buffer already holds, or NULL */
    int32_t n_host_pairs;
} moe_pass;

/* Router logits on the device, the choice on the host; M->hits counts this forward's pairs. */
static tide_status route(moe_pass *f) {
    tide_context *ctx = f->ctx;
    const tide_hparams *hp = &ctx->model->hp;
    tide_run *r = &ctx->run;
    tide_backend *be = ctx->be;
    const int32_t E = hp->n_expert, K = hp->n_expert_used;
    double t0 = tide_now();
    TRY(be_check(ctx, be->ops->matmul(be, &f->weights->router, f->xb, f->n, r->router_logits), "router"));
    TRY(be_check(ctx, be->buf->download(be, r->host_router, r->router_logits,
                                      (size_t)f->n * E * sizeof(float)),
                 "router download"));
    for (int32_t t = 0; t < f->n; t++)
        moe_route(hp, r->host_router + (size_t)t * E, f->host_weights->router_bias,
                  r->host_ids + (size_t)t * K, r->host_w + (size_t)t * K);
    memset(f->M->hits, 0, (size_t)E * sizeof(int32_t));
    for (int32_t p = 0; p < f->n * K; p++) f->M->hits[r->host_ids[p]]++;
    if (ctx->params.trace) memcpy(f->M->last_hits, f->M->hits, (size_t)E * sizeof(int32_t));
    ctx->st.t_router += tide_now() - t0;
    return TIDE_OK;
}

/* The residency decision for this forward, before computing; the input's host copy when some
 * experts run on the host (taken before the device is busy). */
static tide_status plan(moe_pass *f, tide_forward_kind kind, int32_t step_in_block) {
    tide_context *ctx = f->ctx;
    const int is_step = kind == TIDE_FORWARD_STEP;
    tide_status st = residency_plan(&ctx->res, f->ml, f->M->hits, is_step,
                                    is_step ? step_in_block : -1, &f->plan);
    if (st != TIDE_OK) return ctx_fail(ctx, st, "residency: %s", residency_error(&ctx->res));
    f->served = NULL;
    if (f->M->n_prefetch > 0 && is_step) f->served = moe_take_prefetched(ctx, f->ml, &f->plan);
    f->host_xb = f->xb;
    if (!(ctx->be->dev->caps & TIDE_BACKEND_HOST_MEMORY) && f->plan.n_host > 0) {
        tide_run *r = &ctx->run;
        size_t bytes = (size_t)f->n * ctx->model->hp.n_embd * sizeof(float);
        TRY(be_check(ctx, ctx->be->buf->download(ctx->be, r->host_x, f->xb, bytes), "download"));
        f->host_xb = r->host_x;
    }
    return TIDE_OK;
}

static tide_status grow_pairs(tide_context *ctx, int32_t n_pairs) {
    tide_moe_work *w = &ctx->work;
    if (n_pairs <= w->cap_pairs) return TIDE_OK;
    int32_t **ps[] = {&w->pair_token_dev, &w->pair_dest_dev, &w->pair_token_host,
                      &w->pair_dest_host};
    for (size_t i = 0; i < 4; i++) {
        free(*ps[i]);
        *ps[i] = malloc((size_t)n_pairs * sizeof(int32_t));
        if (!*ps[i]) {
            w->cap_pairs = 0;
            return ctx_fail(ctx, TIDE_ERR_NOMEM, "out of memory for expert pairs");
        }
    }
    w->cap_pairs = n_pairs;
    return TIDE_OK;
}

/* Pairs grouped by expert: device jobs in the plan's order (waves, ascending id), host jobs in
 * ascending id; tokens ascending within an expert. host_gather says where pairs_cat finds each
 * pair: in the device pair buffer, or among the packed host rows after it. */
static tide_status group_pairs(moe_pass *f) {
    tide_context *ctx = f->ctx;
    const int32_t E = ctx->model->hp.n_expert, K = ctx->model->hp.n_expert_used, n = f->n;
    const int in_place = (ctx->be->dev->caps & TIDE_BACKEND_HOST_MEMORY) != 0;
    const tide_residency_plan *p = &f->plan;
    tide_moe_work *w = &ctx->work;
    tide_run *r = &ctx->run;
    TRY(grow_pairs(ctx, n * K));
    int32_t pd = 0, ph = 0;
    for (int32_t e = 0; e < E; e++) w->job_of[e] = -1;
    for (int32_t j = 0; j < p->n_device; j++) {
        int32_t e = p->device[j].expert, s = p->device[j].slot;
        w->gate_dev[j] = f->M->slot_gate[s];
        w->up_dev[j] = f->M->slot_up[s];
        w->down_dev[j] = f->M->slot_down[s];
        w->pair_start_dev[j] = pd;
        w->cursor[e] = pd;
        w->job_of[e] = j;
        pd += f->M->hits[e];
    }
    w->pair_start_dev[p->n_device] = pd;
    for (int32_t j = 0; j < p->n_host; j++) {
        int32_t e = p->host[j];
        w->gate_host[j] = f->host_weights->exp_gate[e];
        w->up_host[j] = f->host_weights->exp_up[e];
        w->down_host[j] = f->host_weights->exp_down[e];
        w->pair_start_host[j] = ph;
        w->cursor[e] = ph;
        ph += f->M->hits[e];
    }
    w->pair_start_host[p->n_host] = ph;
    if (pd + ph != n * K)
        return ctx_fail(ctx, TIDE_ERR_DEVICE, "residency plan of layer %d covers %d of %d pairs",
                        f->il, pd + ph, n * K);
    for (int32_t t = 0; t < n; t++) {
        for (int32_t k = 0; k < K; k++) {
            int32_t e = r->host_ids[t * K + k];
            int32_t at = w->cursor[e]++;
            if (w->job_of[e] >= 0) {
                w->pair_token_dev[at] = t;
                w->pair_dest_dev[at] = t * K + k;
                r->host_gather[t * K + k] = t * K + k;
            } else { /* with a device, host rows are packed (one upload) and gathered after */
                w->pair_token_host[at] = t;
                w->pair_dest_host[at] = in_place ? t * K + k : at;
                r->host_gather[t * K + k] = r->cap * K + at; /* row `at` of pairs_from_host */
            }
        }
    }
    f->n_host_pairs = ph;
    return TIDE_OK;
}

/* Device work (async where the backend is): per wave its promotions, a fence, its experts. */
static tide_status device_experts(moe_pass *f, double *t_wait, double *t_dev) {
    tide_context *ctx = f->ctx;
    tide_backend *be = ctx->be;
    const tide_residency_plan *p = &f->plan;
    tide_moe_work *w = &ctx->work;
    double t1;
    for (int32_t wave = 0, j0 = 0; wave < p->n_waves; wave++) {
        t1 = tide_now();
        if (wave > 0) /* this wave's copies overwrite slots the last wave computed with */
            TRY(be_check(ctx, be->ops->synchronize(be), "synchronize"));
        int moved = 0;
        for (int32_t i = 0; i < p->n_moves; i++)
            moved |= p->moves[i].wave == wave && p->moves[i].kind == RESIDENCY_PROMOTE;
        if (moved) { /* this wave's computes wait for its copies (an event, not a sync) */
            TRY(moe_copy_wave(ctx, f->ml, p, wave, f->served));
            int32_t fence = 0;
            TRY(be_check(ctx, be->buf->transfer_fence(be, &fence), "transfer fence"));
            TRY(be_check(ctx, be->buf->compute_wait_fence(be, fence), "fence wait"));
        }
        *t_wait += tide_now() - t1;
        t1 = tide_now();
        int32_t j1 = j0;
        while (j1 < p->n_device && p->device[j1].wave == wave) j1++;
        if (j1 > j0) {
            /* the wave's jobs as a batch of their own: pair offsets rebased to its first pair */
            const int32_t p0 = w->pair_start_dev[j0];
            int32_t *start = w->pair_start_dev + j0;
            if (j0 > 0) { /* j1 - j0 < E here: w->cursor (E entries) holds the rebased offsets */
                for (int32_t j = j0; j <= j1; j++) w->cursor[j - j0] = w->pair_start_dev[j] - p0;
                start = w->cursor;
            }
            tide_expert_batch b = {j1 - j0, w->gate_dev + j0, w->up_dev + j0, w->down_dev + j0,
                                   start, w->pair_token_dev + p0, w->pair_dest_dev + p0};
            TRY(be_check(ctx, be->ops->experts(be, &b, f->xb, ctx->model->hp.n_embd,
                                             ctx->run.pairs),
                         "device experts"));
        }
        j0 = j1;
        *t_dev += tide_now() - t1;
    }
    return TIDE_OK;
}

/* The shared experts on the device; *acc is where the routed sum goes (straight into the
 * residual when there is no shared expert). */
static tide_status shared_experts(moe_pass *f, float *out, float **acc) {
    tide_context *ctx = f->ctx;
    const tide_hparams *hp = &ctx->model->hp;
    tide_backend *be = ctx->be;
    tide_run *r = &ctx->run;
    *acc = out;
    if (hp->n_expert_shared == 0) return TIDE_OK;
    const int64_t fs = (int64_t)hp->n_ff_exp * hp->n_expert_shared;
    TRY(be_check(ctx, be->ops->matmul(be, &f->weights->shexp_gate, f->xb, f->n, r->hb), "shared gate"));
    TRY(be_check(ctx, be->ops->matmul(be, &f->weights->shexp_up, f->xb, f->n, r->hb2), "shared up"));
    TRY(be_check(ctx, be->ops->silu_mul(be, r->hb, r->hb2, (int64_t)f->n * fs), "shared silu"));
    TRY(be_check(ctx, be->ops->matmul(be, &f->weights->shexp_down, r->hb, f->n, r->xb2), "shared down"));
    *acc = r->xb2;
    return TIDE_OK;
}

/* The misses on the host thread pool, then their rows up in one copy; one gather puts every
 * pair in t*K+k order, device rows as computed: placement cannot change a bit. Returns the
 * buffer moe_combine reads. */
static tide_status host_experts(moe_pass *f, const float **pairs) {
    tide_context *ctx = f->ctx;
    tide_backend *be = ctx->be;
    tide_run *r = &ctx->run;
    tide_moe_work *w = &ctx->work;
    const int32_t H = ctx->model->hp.n_embd, K = ctx->model->hp.n_expert_used;
    if (f->plan.n_host > 0) {
        tide_expert_batch b = {f->plan.n_host, w->gate_host, w->up_host, w->down_host,
                               w->pair_start_host, w->pair_token_host, w->pair_dest_host};
        tide_status st = cpu_experts(ctx->pool, &b, f->host_xb, H, r->host_pairs);
        if (st != TIDE_OK) return ctx_fail(ctx, st, "host experts of layer %d failed", f->il);
    }
    *pairs = r->pairs;
    if (!(be->dev->caps & TIDE_BACKEND_HOST_MEMORY) && f->n_host_pairs > 0) {
        TRY(be_check(ctx, be->buf->upload(be, r->pairs_from_host, r->host_pairs,
                                        (size_t)f->n_host_pairs * H * sizeof(float)),
                     "pair upload"));
        TRY(be_check(ctx, be->ops->gather_rows(be, r->pairs_cat, r->pairs, r->host_gather,
                                             f->n * K, H),
                     "pair gather"));
        *pairs = r->pairs_cat;
    }
    return TIDE_OK;
}

tide_status moe_forward(tide_context *ctx, int32_t ml, const float *xb, int32_t n,
                        tide_forward_kind kind, int32_t step_in_block, float *out) {
    const tide_hparams *hp = &ctx->model->hp;
    const int32_t il = ml + hp->n_dense_lead;
    tide_backend *be = ctx->be;
    moe_pass f = {ctx, ml, il, &ctx->w.layers[il], &ctx->model->w.layers[il], &ctx->moe[ml], n,
                  xb, xb, {0}, NULL, 0};
    TRY(route(&f));
    TRY(plan(&f, kind, step_in_block));
    TRY(group_pairs(&f));
    double t_wait = 0.0, t_dev = 0.0, t1;
    TRY(device_experts(&f, &t_wait, &t_dev));
    /* the next MoE layer's predicted promotions, behind this layer's own copies */
    if (kind == TIDE_FORWARD_STEP) TRY(moe_prefetch(ctx, ml + 1, step_in_block));
    t1 = tide_now();
    float *acc = out;
    TRY(shared_experts(&f, out, &acc));
    t_dev += tide_now() - t1;
    t1 = tide_now();
    const float *pairs = NULL;
    TRY(host_experts(&f, &pairs));
    double t_host = tide_now() - t1;
    tide_moe_layer *M = f.M;
    if (!(be->dev->caps & TIDE_BACKEND_ASYNC)) { /* async: the host clock would time the enqueue */
        M->st.t_device_experts += t_dev;
        ctx->st.t_device_experts += t_dev;
    }
    M->st.t_transfer_wait += t_wait;
    ctx->st.t_transfer_wait += t_wait;
    M->st.t_host_experts += t_host;
    ctx->st.t_host_experts += t_host;
    /* sum in k order, then the residual */
    TRY(be_check(ctx, be->ops->moe_combine(be, pairs, ctx->run.host_w, n, hp->n_expert_used,
                                         hp->n_embd, acc),
                 "moe combine"));
    if (acc != out) TRY(be_check(ctx, be->ops->add(be, out, acc, (int64_t)n * hp->n_embd), "residual"));
    return TIDE_OK;
}

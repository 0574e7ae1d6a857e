/* moe.c: one MoE layer. The router runs on the device (one matmul with the f32 router weight),
 * its logits come to the host, where the sigmoid group-limited top-k is taken exactly as
 * reference.route does; the token-expert pairs are grouped by expert; the residency policy says
 * which experts are resident (promotions are copied into device slots on the transfer stream);
 * resident experts run on the device, misses on the host thread pool at the same time; the host
 * outputs are uploaded row by row into the device pair buffer and every token's expert outputs
 * are summed in the router's k order, so placement cannot change a bit. */
#include "model.h"
#include "cpu/kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define ALIGN_UP(x, a) (((x) + (a) - 1) / (a) * (a))

#define TRY(call, what)                                                                      \
    do {                                                                                     \
        tide_status st_ = (call);                                                            \
        if (st_ != TIDE_OK) return tide_ctx_be_fail(ctx, st_, what);                         \
    } while (0)

static int32_t layer_index(const tide_context *ctx, int32_t moe_layer) {
    return moe_layer + ctx->model->hp.n_dense_lead;
}

static tide_status res_fail(tide_context *ctx, tide_status st) {
    return tide_ctx_fail(ctx, st, "residency: %s", residency_error(&ctx->res));
}

/* Bytes of one expert slot: gate, up and down, each 256-byte aligned. */
static size_t slot_bytes_of(const tide_layer_weights *L) {
    return ALIGN_UP(L->exp_gate[0].nbytes, 256) + ALIGN_UP(L->exp_up[0].nbytes, 256) +
           ALIGN_UP(L->exp_down[0].nbytes, 256);
}

/* Copy expert e's three matrices from host memory into a slot's (or a buffer's) views, async
 * on the transfer stream. */
static tide_status upload_expert(tide_backend *be, const tide_layer_weights *L, int32_t e,
                                 const tide_matrix *gate, const tide_matrix *up,
                                 const tide_matrix *down) {
    tide_status st = be->i->upload_async(be, gate->data, L->exp_gate[e].data, L->exp_gate[e].nbytes);
    if (st == TIDE_OK) st = be->i->upload_async(be, up->data, L->exp_up[e].data, L->exp_up[e].nbytes);
    if (st == TIDE_OK)
        st = be->i->upload_async(be, down->data, L->exp_down[e].data, L->exp_down[e].nbytes);
    return st;
}

/* Execute the moves of one wave of a plan: promotions are copies into slots (transfer stream),
 * except those of experts marked in `served` (already in their slot from a prefetch buffer). */
static tide_status run_moves(tide_context *ctx, int32_t ml, const tide_residency_plan *p,
                             int32_t wave, const uint8_t *served) {
    tide_moe_layer *M = &ctx->moe[ml];
    const tide_layer_weights *L = &ctx->model->w.layers[layer_index(ctx, ml)];
    tide_backend *be = ctx->be;
    for (int32_t i = 0; i < p->n_moves; i++) {
        const tide_residency_move *mv = &p->moves[i];
        if (mv->wave != wave || mv->kind != RESIDENCY_PROMOTE) continue;
        int32_t e = mv->expert, s = mv->slot;
        if (served && served[e]) continue;
        if (s < 0 || s >= M->budget)
            return tide_ctx_fail(ctx, TIDE_ERR_DEVICE, "residency: slot %d outside %d slots", s,
                                 M->budget);
        TRY(upload_expert(be, L, e, &M->slot_gate[s], &M->slot_up[s], &M->slot_down[s]),
            "expert upload");
    }
    return TIDE_OK;
}

/* Uploads that the residency module promoted outside a forward (gpu, profiled static). */
static tide_status upload_pending(tide_context *ctx) {
    for (int32_t i = 0; i < ctx->model->n_moe; i++) {
        tide_residency_plan p;
        tide_status st = residency_take_pending(&ctx->res, i, &p);
        if (st != TIDE_OK) return res_fail(ctx, st);
        if ((st = run_moves(ctx, i, &p, 0, NULL)) != TIDE_OK) return st;
    }
    TRY(ctx->be->i->transfer_sync(ctx->be), "transfer sync");
    return TIDE_OK;
}

/* ---- init / policy switch -------------------------------------------------------------------- */

static void free_slots(tide_context *ctx, tide_moe_layer *M) {
    if (M->slot_mem) ctx->be->i->dealloc(ctx->be, M->slot_mem);
    M->slot_mem = NULL;
    free(M->slot_gate);
    free(M->slot_up);
    free(M->slot_down);
    M->slot_gate = M->slot_up = M->slot_down = NULL;
    M->budget = 0;
    if (M->prefetch_mem) ctx->be->i->dealloc(ctx->be, M->prefetch_mem);
    M->prefetch_mem = NULL;
    free(M->pf_gate);
    free(M->pf_up);
    free(M->pf_down);
    free(M->pf_expert);
    M->pf_gate = M->pf_up = M->pf_down = NULL;
    M->pf_expert = NULL;
    M->n_prefetch = 0;
}

void tide_moe_free(tide_context *ctx) {
    if (ctx->moe) {
        for (int32_t i = 0; i < ctx->model->n_moe; i++) {
            tide_moe_layer *M = &ctx->moe[i];
            free_slots(ctx, M);
            free(M->hits);
            free(M->last_hits);
        }
        free(ctx->moe);
        ctx->moe = NULL;
    }
    if (ctx->res_ready) residency_free(&ctx->res);
    ctx->res_ready = 0;
    tide_moe_work *w = &ctx->work;
    void *ps[] = {w->pair_start_d, w->pair_token_d, w->pair_dest_d, w->pair_start_h,
                  w->pair_token_h, w->pair_dest_h, w->gate_d, w->up_d, w->down_d, w->gate_h,
                  w->up_h, w->down_h, w->count, w->cursor, w->job_of, w->served,
                  w->predicted};
    for (size_t i = 0; i < sizeof ps / sizeof *ps; i++) free(ps[i]);
    memset(w, 0, sizeof *w);
}

tide_status tide_moe_init(tide_context *ctx) {
    const tide_model *m = ctx->model;
    const size_t E = (size_t)m->hp.n_expert;
    if (m->n_moe == 0) return TIDE_OK;
    ctx->moe = calloc((size_t)m->n_moe, sizeof *ctx->moe);
    if (!ctx->moe) return tide_ctx_fail(ctx, TIDE_ERR_NOMEM, "out of memory");
    for (int32_t i = 0; i < m->n_moe; i++) {
        ctx->moe[i].hits = calloc(E, sizeof(int32_t));
        ctx->moe[i].last_hits = calloc(E, sizeof(int32_t));
        if (!ctx->moe[i].hits || !ctx->moe[i].last_hits)
            return tide_ctx_fail(ctx, TIDE_ERR_NOMEM, "out of memory");
    }
    tide_moe_work *w = &ctx->work;
    w->pair_start_d = malloc((E + 1) * sizeof(int32_t));
    w->pair_start_h = malloc((E + 1) * sizeof(int32_t));
    w->gate_d = malloc(E * sizeof(tide_matrix));
    w->up_d = malloc(E * sizeof(tide_matrix));
    w->down_d = malloc(E * sizeof(tide_matrix));
    w->gate_h = malloc(E * sizeof(tide_matrix));
    w->up_h = malloc(E * sizeof(tide_matrix));
    w->down_h = malloc(E * sizeof(tide_matrix));
    w->count = malloc(E * sizeof(int32_t));
    w->cursor = malloc(E * sizeof(int32_t));
    w->job_of = malloc(E * sizeof(int32_t));
    w->served = calloc(E, 1);
    w->predicted = malloc(E * sizeof(int32_t));
    if (!w->pair_start_d || !w->pair_start_h || !w->gate_d || !w->up_d || !w->down_d ||
        !w->gate_h || !w->up_h || !w->down_h || !w->count || !w->cursor || !w->job_of ||
        !w->served || !w->predicted)
        return tide_ctx_fail(ctx, TIDE_ERR_NOMEM, "out of memory");
    /* the experts' host ranges: registered once so copies from them can run asynchronously */
    if (ctx->params.device == TIDE_DEVICE_CUDA) {
        for (int32_t i = 0; i < m->n_moe; i++)
            TRY(ctx->be->i->pin_host(ctx->be, (void *)m->expert_range[i], m->expert_range_bytes[i]),
                "registering the experts' host memory");
    }
    return TIDE_OK;
}

/* Prefetch buffers of a layer with b slots under the current policy. */
static int32_t n_prefetch_for(const tide_context *ctx, int32_t policy, int32_t b) {
    int32_t p = ctx->params.prefetch;
    if (policy != TIDE_POLICY_TIDE || p <= 0 || b <= 0) return 0;
    return p < b ? p : b;
}

/* n matrices views of one expert's gate/up/down, `bytes` apart, from base. */
static void slot_views(const tide_layer_weights *L, char *base, size_t bytes, int32_t n,
                       tide_matrix *gate, tide_matrix *up, tide_matrix *down) {
    for (int32_t s = 0; s < n; s++) {
        char *at = base + (size_t)s * bytes;
        gate[s] = L->exp_gate[0];
        gate[s].data = at;
        up[s] = L->exp_up[0];
        up[s].data = at + ALIGN_UP(L->exp_gate[0].nbytes, 256);
        down[s] = L->exp_down[0];
        down[s].data = (char *)up[s].data + ALIGN_UP(L->exp_up[0].nbytes, 256);
    }
}

/* Slots (and prefetch buffers) of every layer for the residency module's budgets (old ones
 * freed first). */
static tide_status make_slots(tide_context *ctx) {
    const tide_model *m = ctx->model;
    for (int32_t i = 0; i < m->n_moe; i++) {
        tide_moe_layer *M = &ctx->moe[i];
        free_slots(ctx, M);
        int32_t b = residency_budget(&ctx->res, i);
        const tide_layer_weights *L = &m->w.layers[layer_index(ctx, i)];
        M->budget = b;
        M->st.budget = b;
        if (b <= 0) continue;
        M->slot_bytes = slot_bytes_of(L);
        tide_status st = ctx->be->i->alloc(ctx->be, (size_t)b * M->slot_bytes, &M->slot_mem);
        if (st != TIDE_OK) {
            M->budget = 0;
            return tide_ctx_be_fail(ctx, st, "allocating expert slots");
        }
        M->slot_gate = malloc((size_t)b * sizeof(tide_matrix));
        M->slot_up = malloc((size_t)b * sizeof(tide_matrix));
        M->slot_down = malloc((size_t)b * sizeof(tide_matrix));
        if (!M->slot_gate || !M->slot_up || !M->slot_down)
            return tide_ctx_fail(ctx, TIDE_ERR_NOMEM, "out of memory");
        slot_views(L, M->slot_mem, M->slot_bytes, b, M->slot_gate, M->slot_up, M->slot_down);
        int32_t np = n_prefetch_for(ctx, ctx->policy, b);
        if (np == 0) continue;
        st = ctx->be->i->alloc(ctx->be, (size_t)np * M->slot_bytes, &M->prefetch_mem);
        if (st != TIDE_OK) return tide_ctx_be_fail(ctx, st, "allocating prefetch buffers");
        M->pf_gate = malloc((size_t)np * sizeof(tide_matrix));
        M->pf_up = malloc((size_t)np * sizeof(tide_matrix));
        M->pf_down = malloc((size_t)np * sizeof(tide_matrix));
        M->pf_expert = malloc((size_t)np * sizeof(int32_t));
        if (!M->pf_gate || !M->pf_up || !M->pf_down || !M->pf_expert)
            return tide_ctx_fail(ctx, TIDE_ERR_NOMEM, "out of memory");
        slot_views(L, M->prefetch_mem, M->slot_bytes, np, M->pf_gate, M->pf_up, M->pf_down);
        for (int32_t p = 0; p < np; p++) M->pf_expert[p] = -1;
        M->n_prefetch = np;
    }
    return TIDE_OK;
}

/* ---- prefetch -------------------------------------------------------------------------------- */

/* Before MoE layer ml runs in a step that refreshes it: copy the experts its refresh would
 * promote if its hits were those of its last forward (adjacent steps route alike, LLADA2.md
 * section 5) into the layer's prefetch buffers, on the transfer stream, so the copies run while
 * the layers before it compute. Called at the start of a step for the first MoE layer and, for
 * the next one, by each MoE layer once its own promotions are queued (they go first). */
tide_status tide_moe_prefetch(tide_context *ctx, int32_t ml, int32_t step_in_block) {
    if (ml < 0 || ml >= ctx->model->n_moe) return TIDE_OK;
    tide_moe_layer *M = &ctx->moe[ml];
    if (M->n_prefetch == 0) return TIDE_OK;
    const tide_layer_weights *L = &ctx->model->w.layers[layer_index(ctx, ml)];
    tide_backend *be = ctx->be;
    int32_t *pred = ctx->work.predicted;
    int32_t n = residency_predict_promotions(&ctx->res, ml, M->hits, 1, step_in_block, pred,
                                             M->n_prefetch);
    for (int32_t p = 0; p < M->n_prefetch; p++) M->pf_expert[p] = p < n ? pred[p] : -1;
    for (int32_t p = 0; p < n; p++) {
        int32_t e = pred[p];
        TRY(upload_expert(be, L, e, &M->pf_gate[p], &M->pf_up[p], &M->pf_down[p]),
            "prefetch upload");
        M->st.prefetch_bytes += ctx->model->hp.expert_bytes;
    }
    return TIDE_OK;
}

/* A promotion of expert e into slot s whose copy is already in prefetch buffer p takes the
 * buffer as its slot (views swapped, the slot's old memory becomes the buffer): no copy. Safe:
 * the slot was last read by this layer's previous forward, which finished before this one's
 * router logits came back, and the buffer is written again only at a later refresh. The
 * fence this layer's computes wait for comes after every queued copy, prefetches included.
 * Unused prefetched copies are dropped. Marks the served experts in ctx->work.served. */
static void take_prefetched(tide_context *ctx, tide_moe_layer *M, const tide_residency_plan *p) {
    uint8_t *served = ctx->work.served;
    memset(served, 0, (size_t)ctx->model->hp.n_expert);
    for (int32_t i = 0; i < p->n_moves; i++) {
        const tide_residency_move *mv = &p->moves[i];
        if (mv->kind != RESIDENCY_PROMOTE) continue;
        for (int32_t b = 0; b < M->n_prefetch; b++) {
            if (M->pf_expert[b] != mv->expert) continue;
            int32_t s = mv->slot;
            tide_matrix t;
            t = M->slot_gate[s], M->slot_gate[s] = M->pf_gate[b], M->pf_gate[b] = t;
            t = M->slot_up[s], M->slot_up[s] = M->pf_up[b], M->pf_up[b] = t;
            t = M->slot_down[s], M->slot_down[s] = M->pf_down[b], M->pf_down[b] = t;
            served[mv->expert] = 1;
            M->st.prefetch_used++;
            break;
        }
    }
    for (int32_t b = 0; b < M->n_prefetch; b++) M->pf_expert[b] = -1;
}

tide_status tide_moe_set_residency(tide_context *ctx, int32_t policy, const int32_t *budgets,
                                   int32_t refresh_interval) {
    const tide_model *m = ctx->model;
    const int32_t E = m->hp.n_expert;
    if (m->n_moe == 0) {
        ctx->policy = policy;
        ctx->refresh_interval = refresh_interval;
        return TIDE_OK;
    }
    tide_status st;
    int32_t b_all[m->n_moe];
    uint64_t need = 0, held = 0;
    for (int32_t i = 0; i < m->n_moe; i++) {
        int32_t b = budgets ? budgets[i] : ctx->params.budget;
        if (policy == TIDE_POLICY_GPU) b = E;
        if (policy == TIDE_POLICY_CPU) b = 0;
        if (b > E) b = E;
        b_all[i] = b;
        const tide_layer_weights *L = &m->w.layers[layer_index(ctx, i)];
        uint64_t sb = slot_bytes_of(L);
        need += (uint64_t)(b + n_prefetch_for(ctx, policy, b)) * sb;
        held += (uint64_t)(ctx->moe[i].budget + ctx->moe[i].n_prefetch) * ctx->moe[i].slot_bytes;
    }
    /* refuse before anything changes when the slots cannot fit */
    if (need > 0) {
        uint64_t fr = 0, tot = 0;
        TRY(ctx->be->i->mem_free(ctx->be, &fr, &tot), "device memory query");
        if (need > fr + held)
            return tide_ctx_fail(ctx, TIDE_ERR_DEVICE,
                                 "policy %s: the expert slots need %llu bytes of device memory, "
                                 "%llu are free",
                                 policy == TIDE_POLICY_GPU ? "gpu (every expert resident)"
                                                           : "with these budgets",
                                 (unsigned long long)need, (unsigned long long)(fr + held));
    }
    /* slots about to be freed may still be read or written */
    TRY(ctx->be->i->transfer_sync(ctx->be), "transfer sync");
    TRY(ctx->be->i->synchronize(ctx->be), "synchronize");
    if (!ctx->res_ready) {
        st = residency_init(&ctx->res, m->n_moe, E, policy, b_all, refresh_interval,
                            m->hp.expert_bytes);
        if (st != TIDE_OK) return res_fail(ctx, st);
        ctx->res_ready = 1;
    } else if ((st = residency_set_policy(&ctx->res, policy, b_all, refresh_interval)) != TIDE_OK) {
        return res_fail(ctx, st);
    }
    ctx->policy = policy;
    ctx->refresh_interval = refresh_interval;
    if ((st = make_slots(ctx)) != TIDE_OK) {
        /* stay consistent: no slots, nothing resident (the message of the failure is kept) */
        residency_set_policy(&ctx->res, TIDE_POLICY_CPU, NULL, refresh_interval);
        make_slots(ctx);
        ctx->policy = TIDE_POLICY_CPU;
        return st;
    }
    return upload_pending(ctx);
}

tide_status tide_set_popularity(tide_context *ctx, const float *counts, size_t n) {
    if (!ctx) return TIDE_ERR_ARG;
    const tide_model *m = ctx->model;
    const int32_t E = m->hp.n_expert;
    if (!counts || n != (size_t)m->n_moe * (size_t)E)
        return tide_ctx_fail(ctx, TIDE_ERR_ARG, "popularity: %zu counts, expected %d x %d", n,
                             m->n_moe, E);
    if (m->n_moe == 0) return TIDE_OK;
    TRY(ctx->be->i->transfer_sync(ctx->be), "transfer sync");
    TRY(ctx->be->i->synchronize(ctx->be), "synchronize");
    tide_status st = residency_set_popularity(&ctx->res, counts, n);
    if (st != TIDE_OK) return res_fail(ctx, st);
    return upload_pending(ctx);
}

tide_status tide_resident(const tide_context *ctx, int32_t moe_layer, uint8_t *out, size_t n) {
    if (!ctx || !out || moe_layer < 0 || moe_layer >= ctx->model->n_moe) return TIDE_ERR_ARG;
    if (n != (size_t)ctx->model->hp.n_expert) return TIDE_ERR_ARG;
    return residency_resident(&ctx->res, moe_layer, out, n);
}

/* Counters: the residency module's, per layer and summed. */
void tide_moe_stats(const tide_context *ctx, tide_stats *out) {
    out->h2d_bytes = out->experts_promoted = out->experts_demoted = 0;
    out->device_expert_tokens = out->host_expert_tokens = 0;
    out->prefetch_bytes = out->prefetch_used = 0;
    for (int32_t i = 0; ctx->moe && i < ctx->model->n_moe; i++) {
        out->prefetch_bytes += ctx->moe[i].st.prefetch_bytes;
        out->prefetch_used += ctx->moe[i].st.prefetch_used;
    }
    for (int32_t i = 0; ctx->res_ready && i < ctx->model->n_moe; i++) {
        const tide_residency_counters *c = residency_counters(&ctx->res, i);
        out->h2d_bytes += c->h2d_bytes;
        out->experts_promoted += c->experts_promoted;
        out->experts_demoted += c->experts_demoted;
        out->device_expert_tokens += c->device_expert_tokens;
        out->host_expert_tokens += c->host_expert_tokens;
    }
}

void tide_moe_layer_stats(const tide_context *ctx, int32_t i, tide_layer_stats *out) {
    *out = ctx->moe[i].st;
    const tide_residency_counters *c = residency_counters(&ctx->res, i);
    out->h2d_bytes = c->h2d_bytes;
    out->experts_promoted = c->experts_promoted;
    out->experts_demoted = c->experts_demoted;
    out->device_expert_tokens = c->device_expert_tokens;
    out->host_expert_tokens = c->host_expert_tokens;
    out->budget = residency_budget(&ctx->res, i);
    out->resident = residency_n_resident(&ctx->res, i);
}

void tide_moe_reset_stats(tide_context *ctx) {
    if (ctx->res_ready) residency_reset_counters(&ctx->res);
    for (int32_t i = 0; ctx->moe && i < ctx->model->n_moe; i++)
        memset(&ctx->moe[i].st, 0, sizeof ctx->moe[i].st);
}

/* ---- the router ------------------------------------------------------------------------------ */

/* One token: sigmoid scores, biased choice, group-limited top-k (ties lower id, k order =
 * descending biased score), weights = unbiased scores, normalized, scaled. */
static void route(const tide_hparams *hp, const float *logit, const float *bias, int32_t *ids,
                  float *w) {
    const int32_t E = hp->n_expert, K = hp->n_expert_used, G = hp->n_expert_groups;
    const int32_t gs = E / G;
    float s[E], c[E];
    for (int32_t e = 0; e < E; e++) {
        s[e] = 1.0f / (1.0f + expf(-logit[e]));
        c[e] = s[e] + bias[e];
    }
    if (G > 1) {
        float gscore[G];
        uint8_t keep[G];
        for (int32_t g = 0; g < G; g++) {
            float a = -INFINITY, b = -INFINITY; /* the two largest of the group */
            for (int32_t j = 0; j < gs; j++) {
                float v = c[g * gs + j];
                if (v > a) {
                    b = a;
                    a = v;
                } else if (v > b) {
                    b = v;
                }
            }
            gscore[g] = gs >= 2 ? a + b : a;
            keep[g] = 0;
        }
        for (int32_t n = 0; n < hp->n_group_used; n++) {
            int32_t best = -1;
            for (int32_t g = 0; g < G; g++)
                if (!keep[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
            keep[best] = 1;
        }
        for (int32_t g = 0; g < G; g++)
            if (!keep[g])
                for (int32_t j = 0; j < gs; j++) c[g * gs + j] = -INFINITY;
    }
    uint8_t taken[E];
    memset(taken, 0, (size_t)E);
    for (int32_t k = 0; k < K; k++) {
        int32_t best = -1;
        for (int32_t e = 0; e < E; e++)
            if (!taken[e] && (best < 0 || c[e] > c[best])) best = e;
        taken[best] = 1;
        ids[k] = best;
        w[k] = s[best];
    }
    if (K > 1 && hp->expert_weights_norm) {
        float sum = 0.0f;
        for (int32_t k = 0; k < K; k++) sum += w[k];
        for (int32_t k = 0; k < K; k++) w[k] = w[k] / (sum + 1e-20f);
    }
    for (int32_t k = 0; k < K; k++) w[k] *= hp->expert_weights_scale;
}

static tide_status grow_pairs(tide_context *ctx, int32_t n_pairs) {
    tide_moe_work *w = &ctx->work;
    if (n_pairs <= w->cap_pairs) return TIDE_OK;
    int32_t **ps[] = {&w->pair_token_d, &w->pair_dest_d, &w->pair_token_h, &w->pair_dest_h};
    for (size_t i = 0; i < 4; i++) {
        free(*ps[i]);
        *ps[i] = malloc((size_t)n_pairs * sizeof(int32_t));
        if (!*ps[i]) {
            w->cap_pairs = 0;
            return tide_ctx_fail(ctx, TIDE_ERR_NOMEM, "out of memory for expert pairs");
        }
    }
    w->cap_pairs = n_pairs;
    return TIDE_OK;
}

/* ---- one MoE layer --------------------------------------------------------------------------- */

tide_status tide_moe_forward(tide_context *ctx, int32_t ml, const float *xb, int32_t n, int kind,
                             int32_t step_in_block, float *out) {
    const tide_model *m = ctx->model;
    const tide_hparams *hp = &m->hp;
    const int32_t il = layer_index(ctx, ml);
    const tide_layer_weights *L = &ctx->w.layers[il];     /* device weights */
    const tide_layer_weights *Lh = &m->w.layers[il];      /* host views (experts) */
    tide_moe_layer *M = &ctx->moe[ml];
    tide_backend *be = ctx->be;
    const tide_backend_i *op = be->i;
    tide_run *r = &ctx->run;
    tide_moe_work *w = &ctx->work;
    const int32_t E = hp->n_expert, K = hp->n_expert_used, H = hp->n_embd;
    const int timed = ctx->params.device != TIDE_DEVICE_CUDA;
    tide_status st;
    double t0 = tide_now(), t1;

    /* router: logits on the device, selection on the host */
    TRY(op->matmul(be, &L->router, xb, n, r->router_logits), "router");
    TRY(op->download(be, r->h_router, r->router_logits, (size_t)n * E * sizeof(float)), "router download");
    for (int32_t t = 0; t < n; t++)
        route(hp, r->h_router + (size_t)t * E, Lh->router_bias, r->h_ids + (size_t)t * K,
              r->h_w + (size_t)t * K);
    memset(M->hits, 0, (size_t)E * sizeof(int32_t));
    for (int32_t p = 0; p < n * K; p++) M->hits[r->h_ids[p]]++;
    if (ctx->params.trace) memcpy(M->last_hits, M->hits, (size_t)E * sizeof(int32_t));
    ctx->st.t_router += tide_now() - t0;

    /* the residency decision for this forward, before computing */
    tide_residency_plan plan;
    st = residency_plan(&ctx->res, ml, M->hits, kind == 0, kind == 0 ? step_in_block : -1, &plan);
    if (st != TIDE_OK) return res_fail(ctx, st);

    const uint8_t *served = NULL;
    if (M->n_prefetch > 0 && kind == 0) {
        take_prefetched(ctx, M, &plan);
        served = w->served;
    }

    const float *h_x = xb;
    if (!ctx->on_host && plan.n_host > 0) { /* the misses' input, before the device is busy */
        TRY(op->download(be, r->h_x, xb, (size_t)n * H * sizeof(float)), "download");
        h_x = r->h_x;
    }

    /* pairs grouped by expert: device jobs in the plan's order (waves, ascending id), host jobs
     * in ascending id; tokens ascending within an expert */
    if ((st = grow_pairs(ctx, n * K)) != TIDE_OK) return st;
    int32_t pd = 0, ph = 0;
    for (int32_t e = 0; e < E; e++) w->job_of[e] = -1;
    for (int32_t j = 0; j < plan.n_device; j++) {
        int32_t e = plan.device[j].expert, s = plan.device[j].slot;
        w->gate_d[j] = M->slot_gate[s];
        w->up_d[j] = M->slot_up[s];
        w->down_d[j] = M->slot_down[s];
        w->pair_start_d[j] = pd;
        w->cursor[e] = pd;
        w->job_of[e] = j;
        pd += M->hits[e];
    }
    w->pair_start_d[plan.n_device] = pd;
    for (int32_t j = 0; j < plan.n_host; j++) {
        int32_t e = plan.host[j];
        w->gate_h[j] = Lh->exp_gate[e];
        w->up_h[j] = Lh->exp_up[e];
        w->down_h[j] = Lh->exp_down[e];
        w->pair_start_h[j] = ph;
        w->cursor[e] = ph;
        ph += M->hits[e];
    }
    w->pair_start_h[plan.n_host] = ph;
    if (pd + ph != n * K)
        return tide_ctx_fail(ctx, TIDE_ERR_DEVICE, "residency plan of layer %d covers %d of %d pairs",
                             il, pd + ph, n * K);
    for (int32_t t = 0; t < n; t++) {
        for (int32_t k = 0; k < K; k++) {
            int32_t e = r->h_ids[t * K + k];
            int32_t at = w->cursor[e]++;
            if (w->job_of[e] >= 0) {
                w->pair_token_d[at] = t;
                w->pair_dest_d[at] = t * K + k;
                r->h_gather[t * K + k] = t * K + k;
            } else { /* with a device, host rows are packed (one upload) and gathered after */
                w->pair_token_h[at] = t;
                w->pair_dest_h[at] = ctx->on_host ? t * K + k : at;
                r->h_gather[t * K + k] = r->cap * K + at; /* row `at` of pairs_up */
            }
        }
    }

    /* device work first (async on cuda): per wave its promotions, a fence, its experts */
    double t_wait = 0.0, t_dev = 0.0;
    for (int32_t wave = 0, j0 = 0; wave < plan.n_waves; wave++) {
        t1 = tide_now();
        if (wave > 0) /* this wave's copies overwrite slots the last wave computed with */
            TRY(op->synchronize(be), "synchronize");
        int moved = 0;
        for (int32_t i = 0; i < plan.n_moves; i++)
            moved |= plan.moves[i].wave == wave && plan.moves[i].kind == RESIDENCY_PROMOTE;
        if (moved) { /* this wave's computes wait for its copies (an event, not a sync) */
            if ((st = run_moves(ctx, ml, &plan, wave, served)) != TIDE_OK) return st;
            int32_t fence = 0;
            TRY(op->transfer_fence(be, &fence), "transfer fence");
            TRY(op->compute_wait_fence(be, fence), "fence wait");
        }
        t_wait += tide_now() - t1;
        t1 = tide_now();
        int32_t j1 = j0;
        while (j1 < plan.n_device && plan.device[j1].wave == wave) j1++;
        if (j1 > j0) {
            /* the wave's jobs as a batch of their own: pair offsets rebased to its first pair */
            const int32_t p0 = w->pair_start_d[j0];
            int32_t *start = w->pair_start_d + j0;
            if (j0 > 0) { /* j1 - j0 < E here: w->cursor (E entries) holds the rebased offsets */
                for (int32_t j = j0; j <= j1; j++) w->cursor[j - j0] = w->pair_start_d[j] - p0;
                start = w->cursor;
            }
            tide_expert_batch b = {j1 - j0, w->gate_d + j0, w->up_d + j0, w->down_d + j0,
                                   start, w->pair_token_d + p0, w->pair_dest_d + p0};
            TRY(op->experts(be, &b, xb, H, r->pairs), "device experts");
        }
        j0 = j1;
        t_dev += tide_now() - t1;
    }
    /* the next MoE layer's predicted promotions, behind this layer's own copies */
    if (kind == 0 && (st = tide_moe_prefetch(ctx, ml + 1, step_in_block)) != TIDE_OK) return st;
    t1 = tide_now();
    float *acc = out; /* without a shared expert the routed sum goes straight into the residual */
    if (hp->n_expert_shared > 0) {
        const int64_t fs = (int64_t)hp->n_ff_exp * hp->n_expert_shared;
        TRY(op->matmul(be, &L->shexp_gate, xb, n, r->hb), "shared gate");
        TRY(op->matmul(be, &L->shexp_up, xb, n, r->hb2), "shared up");
        TRY(op->silu_mul(be, r->hb, r->hb2, (int64_t)n * fs), "shared silu");
        TRY(op->matmul(be, &L->shexp_down, r->hb, n, r->xb2), "shared down");
        acc = r->xb2;
    }
    t_dev += tide_now() - t1;
    /* host work meanwhile: the misses, on the thread pool */
    t1 = tide_now();
    if (plan.n_host > 0) {
        tide_expert_batch b = {plan.n_host, w->gate_h, w->up_h, w->down_h, w->pair_start_h,
                               w->pair_token_h, w->pair_dest_h};
        st = cpu_experts(ctx->pool, &b, h_x, H, r->h_pairs);
        if (st != TIDE_OK) return tide_ctx_fail(ctx, st, "host experts of layer %d failed", il);
    }
    const float *pairs = r->pairs;
    if (!ctx->on_host && ph > 0) {
        /* the miss rows go up in one copy; one gather then puts every pair in t*K+k order,
         * device rows as computed: placement cannot change a bit */
        TRY(op->upload(be, r->pairs_up, r->h_pairs, (size_t)ph * H * sizeof(float)), "pair upload");
        TRY(op->gather_rows(be, r->pairs_cat, r->pairs, r->h_gather, n * K, H), "pair gather");
        pairs = r->pairs_cat;
    }
    double t_host = tide_now() - t1;
    if (timed) {
        M->st.t_device_experts += t_dev;
        ctx->st.t_device_experts += t_dev;
    }
    M->st.t_transfer_wait += t_wait;
    ctx->st.t_transfer_wait += t_wait;
    M->st.t_host_experts += t_host;
    ctx->st.t_host_experts += t_host;
    /* sum in k order, then the residual */
    TRY(op->moe_combine(be, pairs, r->h_w, n, K, H, acc), "moe combine");
    if (acc != out) TRY(op->add(be, out, acc, (int64_t)n * H), "residual");
    return TIDE_OK;
}

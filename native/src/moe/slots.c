/* slots.c: the device side of expert residency (moe.h). Each MoE layer has `budget` slots of
 * device memory, one expert (gate, up, down) each, and, under tide with prefetch, a few
 * slot-sized buffers that a refresh's predicted promotions are copied into ahead of time.
 * residency.c decides who sits where; this file owns the memory, checks that a policy fits
 * before switching to it, and issues the copies. */
#include "moe/moe.h"

#include <stdlib.h>
#include <string.h>

#define ALIGN_UP(x, a) (((x) + (a) - 1) / (a) * (a))

static int32_t layer_index(const tide_context *ctx, int32_t moe_layer) {
    return moe_layer + ctx->model->hp.n_dense_lead;
}

static tide_status residency_failed(tide_context *ctx, tide_status st) {
    return ctx_fail(ctx, st, "residency: %s", residency_error(&ctx->res));
}

/* Bytes of one expert slot: gate, up and down, each 256-byte aligned. */
static size_t slot_bytes_of(const tide_layer_weights *L) {
    return ALIGN_UP(L->exp_gate[0].nbytes, 256) + ALIGN_UP(L->exp_up[0].nbytes, 256) +
           ALIGN_UP(L->exp_down[0].nbytes, 256);
}

/* Prefetch buffers of a layer with b slots under `policy`. */
static int32_t n_prefetch_for(const tide_context *ctx, int32_t policy, int32_t b) {
    int32_t p = ctx->params.prefetch;
    if (policy != TIDE_POLICY_TIDE || p <= 0 || b <= 0) return 0;
    return p < b ? p : b;
}

/* Copy expert e's three matrices from host memory into a slot's (or a buffer's) views, async
 * on the transfer stream. */
static tide_status copy_expert(tide_backend *be, const tide_layer_weights *L, int32_t e,
                               const tide_matrix *gate, const tide_matrix *up,
                               const tide_matrix *down) {
    TRY(be->buf->upload_async(be, gate->data, L->exp_gate[e].data, L->exp_gate[e].nbytes));
    TRY(be->buf->upload_async(be, up->data, L->exp_up[e].data, L->exp_up[e].nbytes));
    return be->buf->upload_async(be, down->data, L->exp_down[e].data, L->exp_down[e].nbytes);
}

tide_status moe_copy_wave(tide_context *ctx, int32_t ml, const tide_residency_plan *p,
                          int32_t wave, const uint8_t *served) {
    tide_moe_layer *M = &ctx->moe[ml];
    const tide_layer_weights *L = &ctx->model->w.layers[layer_index(ctx, ml)];
    for (int32_t i = 0; i < p->n_moves; i++) {
        const tide_residency_move *mv = &p->moves[i];
        if (mv->wave != wave || mv->kind != RESIDENCY_PROMOTE) continue;
        int32_t e = mv->expert, s = mv->slot;
        if (served && served[e]) continue;
        if (s < 0 || s >= M->budget)
            return ctx_fail(ctx, TIDE_ERR_DEVICE, "residency: slot %d outside %d slots", s,
                            M->budget);
        TRY(be_check(ctx, copy_expert(ctx->be, L, e, &M->slot_gate[s], &M->slot_up[s],
                                      &M->slot_down[s]),
                     "expert upload"));
    }
    return TIDE_OK;
}

/* Copies of the promotions residency.c made outside a forward (gpu, profiled static). */
static tide_status copy_pending(tide_context *ctx) {
    for (int32_t i = 0; i < ctx->model->n_moe; i++) {
        tide_residency_plan p;
        tide_status st = residency_take_pending(&ctx->res, i, &p);
        if (st != TIDE_OK) return residency_failed(ctx, st);
        TRY(moe_copy_wave(ctx, i, &p, 0, NULL));
    }
    return be_check(ctx, ctx->be->buf->transfer_sync(ctx->be), "transfer sync");
}

/* ---- memory ---------------------------------------------------------------------------------- */

static void free_slots(tide_context *ctx, tide_moe_layer *M) {
    if (M->slot_mem) ctx->be->buf->dealloc(ctx->be, M->slot_mem);
    M->slot_mem = NULL;
    free(M->slot_gate);
    free(M->slot_up);
    free(M->slot_down);
    M->slot_gate = M->slot_up = M->slot_down = NULL;
    M->budget = 0;
    if (M->prefetch_mem) ctx->be->buf->dealloc(ctx->be, M->prefetch_mem);
    M->prefetch_mem = NULL;
    free(M->pf_gate);
    free(M->pf_up);
    free(M->pf_down);
    free(M->pf_expert);
    M->pf_gate = M->pf_up = M->pf_down = NULL;
    M->pf_expert = NULL;
    M->n_prefetch = 0;
}

void moe_free(tide_context *ctx) {
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
    void *ps[] = {w->pair_start_dev, w->pair_token_dev, w->pair_dest_dev, w->pair_start_host,
                  w->pair_token_host, w->pair_dest_host, w->gate_dev, w->up_dev, w->down_dev,
                  w->gate_host, w->up_host, w->down_host, w->cursor, w->job_of, w->served,
                  w->predicted};
    for (size_t i = 0; i < sizeof ps / sizeof *ps; i++) free(ps[i]);
    memset(w, 0, sizeof *w);
}

tide_status moe_init(tide_context *ctx) {
    const tide_model *m = ctx->model;
    const size_t E = (size_t)m->hp.n_expert;
    if (m->n_moe == 0) return TIDE_OK;
    ctx->moe = calloc((size_t)m->n_moe, sizeof *ctx->moe);
    if (!ctx->moe) return ctx_fail(ctx, TIDE_ERR_NOMEM, "out of memory");
    for (int32_t i = 0; i < m->n_moe; i++) {
        ctx->moe[i].hits = calloc(E, sizeof(int32_t));
        ctx->moe[i].last_hits = calloc(E, sizeof(int32_t));
        if (!ctx->moe[i].hits || !ctx->moe[i].last_hits)
            return ctx_fail(ctx, TIDE_ERR_NOMEM, "out of memory");
    }
    tide_moe_work *w = &ctx->work;
    w->pair_start_dev = malloc((E + 1) * sizeof(int32_t));
    w->pair_start_host = malloc((E + 1) * sizeof(int32_t));
    w->gate_dev = malloc(E * sizeof(tide_matrix));
    w->up_dev = malloc(E * sizeof(tide_matrix));
    w->down_dev = malloc(E * sizeof(tide_matrix));
    w->gate_host = malloc(E * sizeof(tide_matrix));
    w->up_host = malloc(E * sizeof(tide_matrix));
    w->down_host = malloc(E * sizeof(tide_matrix));
    w->cursor = malloc(E * sizeof(int32_t));
    w->job_of = malloc(E * sizeof(int32_t));
    w->served = calloc(E, 1);
    w->predicted = malloc(E * sizeof(int32_t));
    if (!w->pair_start_dev || !w->pair_start_host || !w->gate_dev || !w->up_dev ||
        !w->down_dev || !w->gate_host || !w->up_host || !w->down_host || !w->cursor ||
        !w->job_of || !w->served || !w->predicted)
        return ctx_fail(ctx, TIDE_ERR_NOMEM, "out of memory");
    /* the experts' host ranges: registered once so copies from them can run asynchronously */
    if (ctx->be->dev->caps & TIDE_BACKEND_PINNABLE_HOST) {
        for (int32_t i = 0; i < m->n_moe; i++)
            TRY(be_check(ctx, ctx->be->buf->pin_host(ctx->be, (void *)m->expert_range[i],
                                                  m->expert_range_bytes[i]),
                         "registering the experts' host memory"));
    }
    return TIDE_OK;
}

/* n views of one expert's gate/up/down, `bytes` apart, from base. */
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

/* `n` slot-sized pieces of device memory with their views. */
static tide_status alloc_views(tide_context *ctx, const tide_layer_weights *L, size_t bytes,
                               int32_t n, void **mem, tide_matrix **gate, tide_matrix **up,
                               tide_matrix **down, const char *what) {
    TRY(be_check(ctx, ctx->be->buf->alloc(ctx->be, (size_t)n * bytes, mem), what));
    *gate = malloc((size_t)n * sizeof(tide_matrix));
    *up = malloc((size_t)n * sizeof(tide_matrix));
    *down = malloc((size_t)n * sizeof(tide_matrix));
    if (!*gate || !*up || !*down) return ctx_fail(ctx, TIDE_ERR_NOMEM, "out of memory");
    slot_views(L, *mem, bytes, n, *gate, *up, *down);
    return TIDE_OK;
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
        if (b <= 0) continue;
        M->slot_bytes = slot_bytes_of(L);
        TRY(alloc_views(ctx, L, M->slot_bytes, b, &M->slot_mem, &M->slot_gate, &M->slot_up,
                        &M->slot_down, "allocating expert slots"));
        M->budget = b;
        int32_t np = n_prefetch_for(ctx, ctx->policy, b);
        if (np == 0) continue;
        TRY(alloc_views(ctx, L, M->slot_bytes, np, &M->prefetch_mem, &M->pf_gate, &M->pf_up,
                        &M->pf_down, "allocating prefetch buffers"));
        M->pf_expert = malloc((size_t)np * sizeof(int32_t));
        if (!M->pf_expert) return ctx_fail(ctx, TIDE_ERR_NOMEM, "out of memory");
        for (int32_t p = 0; p < np; p++) M->pf_expert[p] = -1;
        M->n_prefetch = np;
    }
    return TIDE_OK;
}

/* Refuse a policy whose slots and prefetch buffers cannot fit the device, before anything
 * changes: the memory the current ones hold counts as free. */
static tide_status check_fits(tide_context *ctx, int32_t policy, const int32_t *budgets) {
    const tide_model *m = ctx->model;
    uint64_t need = 0, held = 0;
    for (int32_t i = 0; i < m->n_moe; i++) {
        int32_t b = residency_clamp_budget(policy, budgets ? budgets[i] : ctx->params.budget,
                                           m->hp.n_expert);
        uint64_t sb = slot_bytes_of(&m->w.layers[layer_index(ctx, i)]);
        need += (uint64_t)(b + n_prefetch_for(ctx, policy, b)) * sb;
        held += (uint64_t)(ctx->moe[i].budget + ctx->moe[i].n_prefetch) * ctx->moe[i].slot_bytes;
    }
    if (need == 0) return TIDE_OK;
    uint64_t fr = 0, tot = 0;
    TRY(be_check(ctx, ctx->be->dev->mem_free(ctx->be, &fr, &tot), "device memory query"));
    if (need > fr + held)
        return ctx_fail(ctx, TIDE_ERR_DEVICE,
                        "policy %s: the expert slots need %llu bytes of device memory, %llu are "
                        "free",
                        policy == TIDE_POLICY_GPU ? "gpu (every expert resident)"
                                                  : "with these budgets",
                        (unsigned long long)need, (unsigned long long)(fr + held));
    return TIDE_OK;
}

/* Wait for every copy and compute: slots about to be freed or refilled may still be in use. */
static tide_status quiesce(tide_context *ctx) {
    TRY(be_check(ctx, ctx->be->buf->transfer_sync(ctx->be), "transfer sync"));
    return be_check(ctx, ctx->be->ops->synchronize(ctx->be), "synchronize");
}

tide_status moe_set_residency(tide_context *ctx, int32_t policy, const int32_t *budgets,
                              int32_t refresh_interval) {
    const tide_model *m = ctx->model;
    if (m->n_moe == 0) {
        ctx->policy = policy;
        return TIDE_OK;
    }
    int32_t b_all[m->n_moe];
    for (int32_t i = 0; i < m->n_moe; i++) b_all[i] = budgets ? budgets[i] : ctx->params.budget;
    TRY(check_fits(ctx, policy, b_all));
    TRY(quiesce(ctx));
    tide_status st;
    if (!ctx->res_ready) {
        st = residency_init(&ctx->res, m->n_moe, m->hp.n_expert, policy, b_all,
                            refresh_interval, m->hp.expert_bytes);
        if (st != TIDE_OK) return residency_failed(ctx, st);
        ctx->res_ready = 1;
    } else if ((st = residency_set_policy(&ctx->res, policy, b_all, refresh_interval))) {
        return residency_failed(ctx, st);
    }
    ctx->policy = policy;
    if ((st = make_slots(ctx)) != TIDE_OK) {
        /* stay consistent: no slots, nothing resident (the message of the failure is kept) */
        residency_set_policy(&ctx->res, TIDE_POLICY_CPU, NULL, refresh_interval);
        make_slots(ctx);
        ctx->policy = TIDE_POLICY_CPU;
        return st;
    }
    return copy_pending(ctx);
}

tide_status moe_set_popularity(tide_context *ctx, const float *counts, size_t n) {
    if (ctx->model->n_moe == 0) return TIDE_OK;
    TRY(quiesce(ctx));
    tide_status st = residency_set_popularity(&ctx->res, counts, n);
    if (st != TIDE_OK) return residency_failed(ctx, st);
    return copy_pending(ctx);
}

/* ---- prefetch -------------------------------------------------------------------------------- */

/* Before MoE layer ml runs in a step that refreshes it: copy the experts its refresh would
 * promote if its hits were those of its last forward (adjacent steps route alike) into the
 * layer's prefetch buffers, on the transfer stream, so the copies run while the layers before
 * it compute. Called at the start of a step for the first MoE layer and, for the next one, by
 * each MoE layer once its own promotions are queued (they go first). */
tide_status moe_prefetch(tide_context *ctx, int32_t ml, int32_t step_in_block) {
    if (ml < 0 || ml >= ctx->model->n_moe) return TIDE_OK;
    tide_moe_layer *M = &ctx->moe[ml];
    if (M->n_prefetch == 0) return TIDE_OK;
    const tide_layer_weights *L = &ctx->model->w.layers[layer_index(ctx, ml)];
    int32_t *pred = ctx->work.predicted;
    int32_t n = residency_predict_promotions(&ctx->res, ml, M->hits, 1, step_in_block, pred,
                                             M->n_prefetch);
    for (int32_t p = 0; p < M->n_prefetch; p++) M->pf_expert[p] = p < n ? pred[p] : -1;
    for (int32_t p = 0; p < n; p++) {
        TRY(be_check(ctx, copy_expert(ctx->be, L, pred[p], &M->pf_gate[p], &M->pf_up[p],
                                      &M->pf_down[p]),
                     "prefetch upload"));
        M->st.prefetch_bytes += ctx->model->hp.expert_bytes;
    }
    return TIDE_OK;
}

/* A promotion of expert e into slot s whose copy is already in prefetch buffer b takes the
 * buffer as its slot (views swapped, the slot's old memory becomes the buffer): no copy. Safe:
 * the slot was last read by this layer's previous forward, which finished before this one's
 * router logits came back, and the buffer is written again only at a later refresh. The
 * fence this layer's computes wait for comes after every queued copy, prefetches included.
 * Unused prefetched copies are dropped. */
const uint8_t *moe_take_prefetched(tide_context *ctx, int32_t ml, const tide_residency_plan *p) {
    tide_moe_layer *M = &ctx->moe[ml];
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
    return served;
}

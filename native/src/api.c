/* api.c: every TIDE_API entry of tide.h, and nothing else: the argument checks (each written
 * once, here), the error a call leaves on its context, the timers around whole calls. The work
 * is done below: model.c (loading), context.c (create/free), forward.c (the pass and its head),
 * moe/ (residency execution), residency.c (the policies). */
#include "model.h"
#include "moe/moe.h"
#include "backend/cpu/kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int tide_abi_version(void) { return TIDE_ABI_VERSION; }

/* ---- model ----------------------------------------------------------------------------------- */

tide_status tide_model_load(const char *path, tide_model **out, char *err, size_t err_len) {
    if (err && err_len) err[0] = 0;
    if (!out) return tide_errf(err, err_len, TIDE_ERR_ARG, "out is NULL");
    if (!path) return tide_errf(err, err_len, TIDE_ERR_ARG, "path is NULL");
    return tide_model_open(path, out, err, err_len);
}

void tide_model_free(tide_model *model) { tide_model_close(model); }

void tide_model_hparams(const tide_model *model, tide_hparams *out) {
    if (model && out) *out = model->hp;
}

tide_status tide_model_meta_string(const tide_model *model, const char *key, const char **out,
                                   size_t *len) {
    if (!model || !key || !out || !len) return TIDE_ERR_ARG;
    if (gguf_find_key(model->gguf, key) < 0) return TIDE_ERR_ARG;
    if (gguf_get_str(model->gguf, key, out, len, NULL, 0) != TIDE_OK) return TIDE_ERR_ARG;
    return TIDE_OK;
}

/* ---- context --------------------------------------------------------------------------------- */

tide_context_params tide_context_default_params(void) {
    tide_context_params p;
    memset(&p, 0, sizeof p);
    p.device = TIDE_DEVICE_CPU;
    p.policy = TIDE_POLICY_GPU;
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

/* The public contract on residency settings: what residency_check_args checks, plus one budget
 * per MoE layer when budgets are given, a non-negative shared budget otherwise, and an interval
 * >= 1 under every policy (a later switch to tide keeps it). */
static tide_status check_residency_args(int32_t n_moe, int32_t policy, int32_t budget,
                                        const int32_t *budgets, int32_t n_budgets,
                                        int32_t refresh_interval, char *err, size_t err_len) {
    if (budgets && n_budgets != n_moe)
        return tide_errf(err, err_len, TIDE_ERR_ARG, "budgets: %d entries, but the model has %d MoE layers",
                         n_budgets, n_moe);
    if (!budgets && budget < 0)
        return tide_errf(err, err_len, TIDE_ERR_ARG, "budget: %d is negative", budget);
    if (refresh_interval < 1)
        return tide_errf(err, err_len, TIDE_ERR_ARG, "refresh_interval: %d, must be >= 1",
                         refresh_interval);
    return residency_check_args(n_moe, policy, budgets, refresh_interval, err, err_len);
}

tide_status tide_context_create(const tide_model *model, const tide_context_params *params,
                                tide_context **out, char *err, size_t err_len) {
    if (err && err_len) err[0] = 0;
    if (!out) return tide_errf(err, err_len, TIDE_ERR_ARG, "out is NULL");
    *out = NULL;
    if (!model) return tide_errf(err, err_len, TIDE_ERR_ARG, "model is NULL");
    tide_context_params p = params ? *params : tide_context_default_params();
    if (p.device < TIDE_DEVICE_CPU || p.device > TIDE_DEVICE_CUDA)
        return tide_errf(err, err_len, TIDE_ERR_ARG, "device: unknown device %d", p.device);
    TRY(check_residency_args(model->n_moe, p.policy, p.budget, p.budgets, p.n_budgets,
                             p.refresh_interval, err, err_len));
    if (p.n_ctx < 0) p.n_ctx = 0; /* the model's own, as memory allows (context.c) */
    if (p.n_ctx > (1 << 22))
        return tide_errf(err, err_len, TIDE_ERR_ARG, "n_ctx: %d too large", p.n_ctx);
    if (p.prefetch < 0)
        return tide_errf(err, err_len, TIDE_ERR_ARG, "prefetch: %d is negative", p.prefetch);
    if (p.n_batch <= 0) p.n_batch = 512;
    if (p.cache_type != TIDE_TYPE_F32 && p.cache_type != TIDE_TYPE_F16 &&
        p.cache_type != TIDE_TYPE_BF16)
        return tide_errf(err, err_len, TIDE_ERR_ARG,
                         "cache_type: %d, expected f32 (%d), f16 (%d) or bf16 (%d)", p.cache_type,
                         TIDE_TYPE_F32, TIDE_TYPE_F16, TIDE_TYPE_BF16);
    return tide_context_open(model, &p, p.budgets, out, err, err_len);
}

void tide_context_free(tide_context *ctx) { tide_context_close(ctx); }

/* ---- residency controls ---------------------------------------------------------------------- */

tide_status tide_set_residency(tide_context *ctx, int32_t policy, int32_t budget,
                               const int32_t *budgets, int32_t n_budgets, int32_t refresh_interval) {
    if (!ctx) return TIDE_ERR_ARG;
    TRY(check_residency_args(ctx->model->n_moe, policy, budget, budgets, n_budgets,
                             refresh_interval, ctx->err, sizeof ctx->err));
    if (ctx->be->dev->caps & TIDE_BACKEND_HOST_MEMORY) return TIDE_OK; /* nothing is ever resident */
    ctx->params.budget = budget;
    ctx->params.refresh_interval = refresh_interval;
    return moe_set_residency(ctx, policy, budgets, refresh_interval);
}

tide_status tide_set_popularity(tide_context *ctx, const float *counts, size_t n) {
    if (!ctx) return TIDE_ERR_ARG;
    const tide_model *m = ctx->model;
    if (!counts || n != (size_t)m->n_moe * (size_t)m->hp.n_expert)
        return ctx_fail(ctx, TIDE_ERR_ARG, "popularity: %zu counts, expected %d x %d", n, m->n_moe,
                        m->hp.n_expert);
    return moe_set_popularity(ctx, counts, n);
}

tide_status tide_resident(const tide_context *ctx, int32_t moe_layer, uint8_t *out, size_t n) {
    if (!ctx || !out || moe_layer < 0 || moe_layer >= ctx->model->n_moe) return TIDE_ERR_ARG;
    if (n != (size_t)ctx->model->hp.n_expert) return TIDE_ERR_ARG;
    return residency_resident(&ctx->res, moe_layer, out, n);
}

/* ---- the step interface ---------------------------------------------------------------------- */

void tide_reset(tide_context *ctx) {
    if (ctx) ctx->n_past = ctx->cache_block = 0;
}
int32_t tide_n_past(const tide_context *ctx) { return ctx ? ctx->n_past : 0; }
int32_t tide_n_ctx(const tide_context *ctx) { return ctx ? ctx->n_ctx : 0; }
uint64_t tide_cache_bytes(const tide_context *ctx) {
    return ctx ? tide_context_cache_bytes(ctx) : 0;
}

static tide_status check_tokens(tide_context *ctx, const int32_t *tokens, int32_t n) {
    if (!tokens || n <= 0) return ctx_fail(ctx, TIDE_ERR_ARG, "tokens: empty (n = %d)", n);
    int32_t V = ctx->model->hp.n_vocab;
    for (int32_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= V)
            return ctx_fail(ctx, TIDE_ERR_ARG, "tokens[%d] = %d outside the vocabulary [0, %d)", i,
                            tokens[i], V);
    return TIDE_OK;
}

static tide_status check_room(tide_context *ctx, int32_t n_past, int32_t n) {
    if ((int64_t)n_past + n > ctx->n_ctx)
        return ctx_fail(ctx, TIDE_ERR_CONTEXT, "context full: %d cached + %d new tokens > n_ctx %d",
                        n_past, n, ctx->n_ctx);
    return TIDE_OK;
}

static tide_status check_sampling(tide_context *ctx, const tide_sampling *s) {
    if (!(s->temperature >= 0.0f) || isinf(s->temperature))
        return ctx_fail(ctx, TIDE_ERR_ARG, "temperature: %g, must be >= 0", (double)s->temperature);
    if (!(s->top_p > 0.0f)) /* NaN too */
        return ctx_fail(ctx, TIDE_ERR_ARG, "top_p: %g, must be > 0", (double)s->top_p);
    return TIDE_OK;
}

/* One forward that appends tokens[0..n) to the cache at n_past under blocks of block_length;
 * the ids are remembered beside their keys and values. */
static tide_status commit_forward(tide_context *ctx, const int32_t *tokens, int32_t n,
                                  int32_t block_length, int32_t blocks_of) {
    TRY(tide_forward(ctx, tokens, n, block_length, TIDE_FORWARD_COMMIT, -1, NULL, 0));
    /* rows keep one block structure only while every commit starts on a block boundary of it */
    if (ctx->n_past == 0)
        ctx->cache_block = blocks_of;
    else if (ctx->cache_block != blocks_of || ctx->n_past % blocks_of)
        ctx->cache_block = -1;
    memcpy(ctx->tokens + ctx->n_past, tokens, (size_t)n * sizeof(int32_t));
    ctx->n_past += n;
    return TIDE_OK;
}

tide_status tide_commit(tide_context *ctx, const int32_t *tokens, int32_t n) {
    if (!ctx) return TIDE_ERR_ARG;
    TRY(check_tokens(ctx, tokens, n));
    TRY(check_room(ctx, ctx->n_past, n));
    double t0 = tide_now();
    /* one block: every token sees every other */
    tide_status st = commit_forward(ctx, tokens, n, ctx->n_past + n, n);
    ctx->st.t_total += tide_now() - t0;
    return st;
}

/* The micro-batch rule (tide.h): whole blocks up to n_batch rows, at least one block. */
static int32_t batch_end(int32_t n_past, int32_t n, int32_t block_length, int32_t n_batch) {
    /* the end of the first block */
    int64_t first_end = ((int64_t)n_past / block_length + 1) * block_length;
    int64_t limit = (int64_t)n_past + n_batch;
    int64_t end = limit / block_length * block_length;
    if (end < first_end) end = first_end;
    if (end > (int64_t)n_past + n) end = (int64_t)n_past + n;
    return (int32_t)(end - n_past);
}

int32_t tide_commit_batch_end(const tide_context *ctx, int32_t n, int32_t block_length) {
    if (!ctx || n <= 0 || block_length < 1) return 0;
    return batch_end(ctx->n_past, n, block_length, ctx->params.n_batch);
}

tide_status tide_commit_blocks(tide_context *ctx, const int32_t *tokens, int32_t n,
                               int32_t block_length) {
    if (!ctx) return TIDE_ERR_ARG;
    TRY(check_tokens(ctx, tokens, n));
    TRY(check_room(ctx, ctx->n_past, n));
    if (block_length < 1)
        return ctx_fail(ctx, TIDE_ERR_ARG, "block_length: %d, must be >= 1", block_length);
    double t0 = tide_now();
    tide_status st = TIDE_OK;
    for (int32_t done = 0; done < n && st == TIDE_OK;) {
        int32_t m = batch_end(ctx->n_past, n - done, block_length, ctx->params.n_batch);
        st = commit_forward(ctx, tokens + done, m, block_length, block_length);
        done += m;
    }
    ctx->st.t_total += tide_now() - t0;
    return st;
}

tide_status tide_truncate(tide_context *ctx, int32_t n) {
    if (!ctx) return TIDE_ERR_ARG;
    if (n < 0 || n > ctx->n_past)
        return ctx_fail(ctx, TIDE_ERR_ARG, "truncate: %d tokens, the cache holds %d", n,
                        ctx->n_past);
    ctx->n_past = n; /* rows past n are overwritten by the next commit before anything reads them */
    if (n == 0) ctx->cache_block = 0;
    return TIDE_OK;
}

int32_t tide_cache_block_length(const tide_context *ctx) { return ctx ? ctx->cache_block : 0; }

tide_status tide_cache_tokens(const tide_context *ctx, int32_t *out, int32_t n) {
    if (!ctx || !out || n < ctx->n_past) return TIDE_ERR_ARG;
    memcpy(out, ctx->tokens, (size_t)ctx->n_past * sizeof(int32_t));
    return TIDE_OK;
}

tide_status tide_state_save(tide_context *ctx, const char *path) {
    if (!ctx) return TIDE_ERR_ARG;
    if (!path || !path[0]) return ctx_fail(ctx, TIDE_ERR_ARG, "state: no path");
    return tide_state_write(ctx, path);
}

tide_status tide_state_load(tide_context *ctx, const char *path) {
    if (!ctx) return TIDE_ERR_ARG;
    if (!path || !path[0]) return ctx_fail(ctx, TIDE_ERR_ARG, "state: no path");
    return tide_state_read(ctx, path);
}

static tide_status step(tide_context *ctx, const int32_t *tokens, int32_t n, const uint8_t *want,
                        int32_t step_in_block, const tide_sampling *s, int32_t *out_token,
                        float *out_prob) {
    TRY(tide_run_reserve(ctx, n, n));
    int32_t n_want = 0;
    int32_t *rows = ctx->run.host_rows;
    for (int32_t i = 0; i < n; i++) {
        out_token[i] = -1;
        out_prob[i] = 0.0f;
        if (want[i]) rows[n_want++] = i;
    }
    ctx->st.steps++;
    TRY(tide_forward(ctx, tokens, n, ctx->n_past + n, TIDE_FORWARD_STEP, step_in_block, rows,
                     n_want));
    if (n_want == 0) return TIDE_OK;
    double th = tide_now();
    TRY(tide_forward_head(ctx, n_want, rows, s, out_token, out_prob));
    ctx->st.t_lm_head += tide_now() - th;
    return TIDE_OK;
}

tide_status tide_step(tide_context *ctx, const int32_t *tokens, int32_t n, const uint8_t *want,
                      int32_t step_in_block, const tide_sampling *sampling, int32_t *out_token,
                      float *out_prob) {
    if (!ctx) return TIDE_ERR_ARG;
    TRY(check_tokens(ctx, tokens, n));
    TRY(check_room(ctx, ctx->n_past, n));
    if (!want || !out_token || !out_prob)
        return ctx_fail(ctx, TIDE_ERR_ARG, "want, out_token and out_prob are required");
    if (step_in_block < 0)
        return ctx_fail(ctx, TIDE_ERR_ARG, "step_in_block: %d is negative", step_in_block);
    tide_sampling greedy = {0.0f, 0, 1.0f, 0};
    const tide_sampling *s = sampling ? sampling : &greedy;
    TRY(check_sampling(ctx, s));
    double t0 = tide_now();
    tide_status st = step(ctx, tokens, n, want, step_in_block, s, out_token, out_prob);
    ctx->st.t_total += tide_now() - t0;
    return st;
}

tide_status tide_logits(tide_context *ctx, const int32_t *tokens, int32_t n, int32_t block_length,
                        float *out) {
    if (!ctx) return TIDE_ERR_ARG;
    ctx->n_past = ctx->cache_block = 0;
    TRY(check_tokens(ctx, tokens, n));
    TRY(check_room(ctx, 0, n));
    if (block_length < 1)
        return ctx_fail(ctx, TIDE_ERR_ARG, "block_length: %d, must be >= 1", block_length);
    if (!out) return ctx_fail(ctx, TIDE_ERR_ARG, "out is NULL");
    double t0 = tide_now();
    tide_status st = tide_run_reserve(ctx, n, n);
    if (st == TIDE_OK) {
        for (int32_t i = 0; i < n; i++) ctx->run.host_rows[i] = i;
        st = tide_forward(ctx, tokens, n, block_length, TIDE_FORWARD_LOGITS, -1,
                          ctx->run.host_rows, n);
    }
    if (st == TIDE_OK) {
        size_t bytes = (size_t)n * (size_t)ctx->model->hp.n_vocab * sizeof(float);
        st = be_check(ctx, ctx->be->buf->download(ctx->be, out, ctx->run.logits, bytes),
                      "downloading logits");
    }
    ctx->n_past = 0;
    ctx->st.t_total += tide_now() - t0;
    return st;
}

/* ---- counters and trace ---------------------------------------------------------------------- */

/* The residency counters, budget and resident count of layer l into out (its timers stay). */
static void residency_stats(const tide_residency *r, int32_t l, tide_layer_stats *out) {
    const tide_residency_counters *c = residency_counters(r, l);
    out->h2d_bytes = c->h2d_bytes;
    out->experts_promoted = c->experts_promoted;
    out->experts_demoted = c->experts_demoted;
    out->device_expert_tokens = c->device_expert_tokens;
    out->host_expert_tokens = c->host_expert_tokens;
    out->budget = residency_budget(r, l);
    out->resident = residency_n_resident(r, l);
}

void tide_get_stats(const tide_context *ctx, tide_stats *out) {
    if (!ctx || !out) return;
    *out = ctx->st;
    out->h2d_bytes = out->experts_promoted = out->experts_demoted = 0;
    out->device_expert_tokens = out->host_expert_tokens = 0;
    out->prefetch_bytes = out->prefetch_used = 0;
    for (int32_t i = 0; ctx->moe && i < ctx->model->n_moe; i++) {
        out->prefetch_bytes += ctx->moe[i].st.prefetch_bytes;
        out->prefetch_used += ctx->moe[i].st.prefetch_used;
    }
    for (int32_t i = 0; ctx->res_ready && i < ctx->model->n_moe; i++) {
        tide_layer_stats l;
        residency_stats(&ctx->res, i, &l);
        out->h2d_bytes += l.h2d_bytes;
        out->experts_promoted += l.experts_promoted;
        out->experts_demoted += l.experts_demoted;
        out->device_expert_tokens += l.device_expert_tokens;
        out->host_expert_tokens += l.host_expert_tokens;
    }
}

tide_status tide_get_layer_stats(const tide_context *ctx, int32_t moe_layer, tide_layer_stats *out) {
    if (!ctx || !out || moe_layer < 0 || moe_layer >= ctx->model->n_moe) return TIDE_ERR_ARG;
    *out = ctx->moe[moe_layer].st;
    residency_stats(&ctx->res, moe_layer, out);
    return TIDE_OK;
}

void tide_stats_reset(tide_context *ctx) {
    if (!ctx) return;
    uint64_t w = ctx->st.weights_h2d_bytes;
    memset(&ctx->st, 0, sizeof ctx->st);
    ctx->st.weights_h2d_bytes = w; /* a fact about the context, not about the work since */
    if (ctx->res_ready) residency_reset_counters(&ctx->res);
    for (int32_t i = 0; ctx->moe && i < ctx->model->n_moe; i++)
        memset(&ctx->moe[i].st, 0, sizeof ctx->moe[i].st);
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

/* ---- the residency state machine ------------------------------------------------------------- */

tide_status tide_residency_new(int32_t n_layers, int32_t n_expert, int32_t policy,
                               const int32_t *budgets, int32_t n_budgets,
                               int32_t refresh_interval, uint64_t expert_bytes,
                               tide_residency **out, char *err, size_t err_len) {
    if (err && err_len) err[0] = 0;
    if (!out) return tide_errf(err, err_len, TIDE_ERR_ARG, "out is NULL");
    *out = NULL;
    TRY(check_residency_args(n_layers, policy, 0, budgets, n_budgets, refresh_interval, err,
                             err_len));
    tide_residency *r = calloc(1, sizeof *r);
    if (!r) return tide_errf(err, err_len, TIDE_ERR_NOMEM, "out of memory");
    tide_status st = residency_init(r, n_layers, n_expert, policy, budgets, refresh_interval,
                                    expert_bytes);
    if (st != TIDE_OK) {
        tide_errf(err, err_len, st, "%s", r->err);
        free(r);
        return st;
    }
    *out = r;
    return TIDE_OK;
}

void tide_residency_free(tide_residency *r) {
    if (!r) return;
    residency_free(r);
    free(r);
}

const char *tide_residency_error(const tide_residency *r) { return r ? residency_error(r) : ""; }

tide_status tide_residency_set_policy(tide_residency *r, int32_t policy, const int32_t *budgets,
                                      int32_t n_budgets, int32_t refresh_interval) {
    if (!r) return TIDE_ERR_ARG;
    TRY(check_residency_args(r->n_layers, policy, 0, budgets, n_budgets, refresh_interval, r->err,
                             sizeof r->err));
    return residency_set_policy(r, policy, budgets, refresh_interval);
}

tide_status tide_residency_set_popularity(tide_residency *r, const float *counts, size_t n) {
    if (!r) return TIDE_ERR_ARG;
    return residency_set_popularity(r, counts, n);
}

tide_status tide_residency_forward(tide_residency *r, const int32_t *hits, size_t n, int32_t kind,
                                   int32_t step_in_block, tide_residency_delta *out) {
    if (!r) return TIDE_ERR_ARG;
    const size_t E = (size_t)r->n_expert;
    if (!hits || n != (size_t)r->n_layers * E)
        return tide_errf(r->err, sizeof r->err, TIDE_ERR_ARG, "hits: %zu entries, expected %d x %d",
                         n, r->n_layers, r->n_expert);
    if (kind < TIDE_FORWARD_STEP || kind > TIDE_FORWARD_LOGITS)
        return tide_errf(r->err, sizeof r->err, TIDE_ERR_ARG, "kind: %d, expected 0, 1 or 2", kind);
    const int is_step = kind == TIDE_FORWARD_STEP;
    if (is_step && step_in_block < 0)
        return tide_errf(r->err, sizeof r->err, TIDE_ERR_ARG, "step_in_block: %d is negative",
                         step_in_block);
    for (int32_t l = 0; l < r->n_layers; l++) {
        const tide_residency_counters before = *residency_counters(r, l);
        tide_residency_plan p;
        TRY(residency_plan(r, l, hits + (size_t)l * E, is_step, is_step ? step_in_block : -1, &p));
        if (!out) continue;
        const tide_residency_counters *c = residency_counters(r, l);
        out[l].promoted = (int64_t)(c->experts_promoted - before.experts_promoted);
        out[l].demoted = (int64_t)(c->experts_demoted - before.experts_demoted);
        out[l].device_pairs = (int64_t)(c->device_expert_tokens - before.device_expert_tokens);
        out[l].host_pairs = (int64_t)(c->host_expert_tokens - before.host_expert_tokens);
        out[l].device_experts = p.n_device;
        out[l].host_experts = p.n_host;
    }
    return TIDE_OK;
}

tide_status tide_residency_layer_stats(const tide_residency *r, int32_t layer,
                                       tide_layer_stats *out) {
    if (!r || !out || layer < 0 || layer >= r->n_layers) return TIDE_ERR_ARG;
    memset(out, 0, sizeof *out);
    residency_stats(r, layer, out);
    return TIDE_OK;
}

tide_status tide_residency_resident(const tide_residency *r, int32_t layer, uint8_t *out,
                                    size_t n) {
    if (!r || !out || layer < 0 || layer >= r->n_layers || n != (size_t)r->n_expert)
        return TIDE_ERR_ARG;
    return residency_resident(r, layer, out, n);
}

/* ---- weight types and quantization ----------------------------------------------------------- */

size_t tide_type_row_bytes(int32_t type, int64_t cols) { return tide_row_bytes(type, cols); }

static tide_status check_rows(int32_t type, const char *what, int64_t rows, int64_t cols,
                              char *err, size_t err_len) {
    int64_t elems;
    size_t bytes;
    tide_type_block(type, &elems, &bytes);
    if (elems == 0)
        return tide_errf(err, err_len, TIDE_ERR_ARG, "%s: type %d is not one this build computes",
                         what, type);
    if (rows < 0 || cols < 1)
        return tide_errf(err, err_len, TIDE_ERR_ARG, "%s: shape [%lld, %lld] is empty or negative",
                         what, (long long)cols, (long long)rows);
    if (cols % elems)
        return tide_errf(err, err_len, TIDE_ERR_ARG,
                         "%s: row length %lld is not a multiple of the type's block (%lld values)",
                         what, (long long)cols, (long long)elems);
    return TIDE_OK;
}

tide_status tide_quantize(int32_t dst_type, int32_t src_type, const void *src, int64_t rows,
                          int64_t cols, void *dst, size_t dst_size, int32_t n_threads, char *err,
                          size_t err_len) {
    if (err && err_len) err[0] = 0;
    if (src_type != TIDE_TYPE_F32 && src_type != TIDE_TYPE_F16 && src_type != TIDE_TYPE_BF16)
        return tide_errf(err, err_len, TIDE_ERR_ARG, "source type %d: f32, f16 or bf16 expected",
                         src_type);
    TRY(check_rows(dst_type, "destination", rows, cols, err, err_len));
    if (rows > 0 && (!src || !dst)) return tide_errf(err, err_len, TIDE_ERR_ARG, "src or dst is NULL");
    if (dst_size / tide_row_bytes(dst_type, cols) < (uint64_t)rows)
        return tide_errf(err, err_len, TIDE_ERR_ARG, "dst: %zu bytes, %lld rows need %llu", dst_size,
                         (long long)rows, (unsigned long long)rows * tide_row_bytes(dst_type, cols));
    tide_pool *pool = NULL;
    if (tide_pool_new(n_threads, &pool) != TIDE_OK)
        return tide_errf(err, err_len, TIDE_ERR_NOMEM, "cannot start %d threads", n_threads);
    tide_status st = cpu_quantize(pool, dst_type, src_type, src, rows, cols, dst);
    tide_pool_free(pool);
    if (st != TIDE_OK) return tide_errf(err, err_len, st, "out of memory for a row of %lld values", (long long)cols);
    return TIDE_OK;
}

tide_status tide_dequantize(int32_t type, const void *src, int64_t rows, int64_t cols, float *dst,
                            size_t dst_count, char *err, size_t err_len) {
    if (err && err_len) err[0] = 0;
    TRY(check_rows(type, "source", rows, cols, err, err_len));
    if (rows > 0 && (!src || !dst)) return tide_errf(err, err_len, TIDE_ERR_ARG, "src or dst is NULL");
    if (dst_count / (uint64_t)cols < (uint64_t)rows)
        return tide_errf(err, err_len, TIDE_ERR_ARG, "dst: %zu floats, %lld rows need %lld",
                         dst_count, (long long)rows, (long long)(rows * cols));
    size_t rb = tide_row_bytes(type, cols);
    for (int64_t r = 0; r < rows; r++)
        cpu_dequantize_row(type, (const char *)src + (size_t)r * rb, cols, dst + r * cols);
    return TIDE_OK;
}

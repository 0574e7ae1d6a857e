/* moe.h: the MoE layers of a context, in three files, lowest first:
 *
 *   router.c  the router's choice for one token (pure arithmetic, reference.route)
 *   slots.c   device memory of the expert slots and prefetch buffers, the one budget and memory
 *             rule of a policy change, the copies a residency plan asks for, prefetch
 *   moe.c     one MoE layer's forward: plan -> copies -> device experts -> shared experts ->
 *             host experts -> combine
 *
 * residency.c decides; these files execute its decisions. */
#ifndef TIDE_MOE_H
#define TIDE_MOE_H

#include "model.h"

/* ---- router.c ---- */
/* One token: sigmoid scores, biased choice, group-limited top-k (ties lower id, k order =
 * descending biased score), weights = unbiased scores, normalized, scaled. ids[K], w[K]. */
void moe_route(const tide_hparams *hp, const float *logit, const float *bias, int32_t *ids,
               float *w);

/* ---- slots.c ---- */
/* Per-layer state and work lists (host memory), the experts' host ranges pinned when the
 * backend can pin. No slots yet: moe_set_residency makes them. */
tide_status moe_init(tide_context *ctx);
void moe_free(tide_context *ctx);
/* Policy, budgets (NULL: params.budget each) and interval for every MoE layer: refuses before
 * anything changes when the slots do not fit the device, then reallocates the slots and copies
 * the experts the new policy promotes at once. */
tide_status moe_set_residency(tide_context *ctx, int32_t policy, const int32_t *budgets,
                              int32_t refresh_interval);
/* Popularity profile for `static` (counts[n_moe * n_expert]); copies what it promotes. */
tide_status moe_set_popularity(tide_context *ctx, const float *counts, size_t n);
/* Copy MoE layer ml's predicted promotions into its prefetch buffers (no-op without them). */
tide_status moe_prefetch(tide_context *ctx, int32_t ml, int32_t step_in_block);
/* Promotions of plan p whose expert waits in a prefetch buffer take the buffer as their slot;
 * returns the served experts ([n_expert] flags, ctx->work.served). */
const uint8_t *moe_take_prefetched(tide_context *ctx, int32_t ml, const tide_residency_plan *p);
/* The promotions of one wave of plan p, as async copies into their slots, except those in
 * `served` (may be NULL). */
tide_status moe_copy_wave(tide_context *ctx, int32_t ml, const tide_residency_plan *p,
                          int32_t wave, const uint8_t *served);

/* ---- moe.c ---- */
/* Routed + shared experts of MoE layer ml on the normed input xb [n, H]; adds into out [n, H]. */
tide_status moe_forward(tide_context *ctx, int32_t ml, const float *xb, int32_t n,
                        tide_forward_kind kind, int32_t step_in_block, float *out);

#endif /* TIDE_MOE_H */

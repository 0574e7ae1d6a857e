/* residency.h: which routed experts sit in device slots, per MoE layer (CONTRACTS.md section 3).
 *
 * Pure decision logic: no device memory, no copies. moe/slots.c owns the device slots and
 * executes what this module decides. It is the only implementation of the policies: tide.h
 * exports it as tide_residency_* (api.c) and tide_cpp/replay.py replays traces through it.
 *
 * Slots. Layer l has residency_budget(r, l) slots numbered 0..B-1. A resident expert occupies
 * exactly one slot; residency_slot(r, l, e) says which (-1: not resident, its weights are only in
 * host memory). Promoting e into slot s means "copy expert e's weights into slot s"; demoting
 * means "slot s no longer holds e" (no copy; the slot is free for a later promote).
 *
 * One forward of MoE layer l, as moe.c runs it:
 *
 *     tide_residency_plan p;
 *     residency_plan(r, l, hits, is_step, step_in_block, &p);   // hits = H[e] of this forward
 *     for (w = 0; w < p.n_waves; w++) {
 *         for each move m in p.moves with m.wave == w, in order:
 *             promote: upload expert m.expert into slot m.slot (async, transfer stream)
 *             demote:  nothing to copy
 *         compute on the device every job j in p.device with j.wave == w (weights in j.slot)
 *     }
 *     compute on the host every expert in p.host (any time: they never touch a slot)
 *
 * Waves exist only for `swap`, where one forward may need more experts than it has slots: an
 * expert computed in wave w-1 may be demoted and its slot refilled in wave w. So a promote of
 * wave w > 0 overwrites a slot that wave w-1's device compute reads: moe.c must not start that
 * copy before wave w-1's compute has finished (cuda: synchronize, or an event on the compute
 * stream that the transfer stream waits for). Every other policy has one wave (n_waves = 1): all
 * moves, then all computes. Moves and jobs are listed in wave order; jobs within a wave in
 * ascending expert id.
 *
 * Pending promotions. `gpu` (at init or a policy change) and `static` with a popularity profile
 * (when the profile is set) promote at once, outside any forward: the experts count as promoted
 * there and then, and their uploads are "pending" until moe.c asks for them with
 * residency_take_pending (at context creation, to upload eagerly) or, at the latest, at the start
 * of the next residency_plan of that layer (wave 0, before anything else).
 *
 * Counters (per layer, exact): experts_promoted, experts_demoted, h2d_bytes (= promoted *
 * expert_bytes), device_expert_tokens (pairs of experts computed in a slot), host_expert_tokens
 * (the other pairs). residency_plan counts this forward's pairs as it plans them.
 *
 * Errors: functions return a tide_status and leave a message in residency_error(r).
 * No global state; not thread-safe per tide_residency (one forward at a time, as the core runs).
 */
#ifndef TIDE_RESIDENCY_H
#define TIDE_RESIDENCY_H

#include "tide.h"
#include <stddef.h>
#include <stdint.h>

typedef enum {
    RESIDENCY_DEMOTE = 0,  /* `expert` leaves `slot` */
    RESIDENCY_PROMOTE = 1, /* `expert` is copied into `slot` */
} tide_residency_move_kind;

typedef struct {
    int32_t kind;   /* tide_residency_move_kind */
    int32_t expert;
    int32_t slot;
    int32_t wave;   /* runs after the device computes of wave-1, before those of wave */
} tide_residency_move;

/* A device compute: expert `expert`, its weights in `slot`, in wave `wave`. */
typedef struct {
    int32_t expert;
    int32_t slot;
    int32_t wave;
} tide_residency_job;

/* The decisions for one forward of one layer. The arrays belong to the tide_residency and stay
 * valid until its next residency_plan / residency_take_pending / residency_set_* call. */
typedef struct {
    const tide_residency_move *moves;
    int32_t n_moves;
    const tide_residency_job *device; /* experts with hits computed in a slot */
    int32_t n_device;
    const int32_t *host;              /* experts with hits computed on the host, ascending id */
    int32_t n_host;
    int32_t n_waves;                  /* >= 1 */
} tide_residency_plan;

typedef struct {
    uint64_t experts_promoted, experts_demoted, h2d_bytes;
    uint64_t device_expert_tokens, host_expert_tokens;
} tide_residency_counters;

/* Per MoE layer state (internal; read it through the functions below). */
typedef struct {
    int32_t budget;      /* slots B */
    int32_t n_resident;
    int32_t *slot_of;    /* [n_expert] slot or -1 */
    int32_t *expert_in;  /* [n_expert] expert in slot s (s < budget) or -1 */
    uint64_t *last_use;  /* [n_expert] swap: tick of the last use */
    uint64_t tick;       /* swap: per-layer use counter */
    int32_t chosen;      /* static: the set is fixed */
    int32_t pending;     /* every resident expert still waits for its upload */
    tide_residency_counters c;
} tide_residency_layer;

struct tide_residency { /* typedef in tide.h */
    int32_t n_layers, n_expert;
    int32_t policy;            /* tide_policy */
    int32_t refresh_interval;  /* tide: tau >= 1 */
    uint64_t expert_bytes;
    tide_residency_layer *layers;
    float *popularity;         /* [n_layers * n_expert] or NULL (static profile) */
    /* scratch for one plan */
    tide_residency_move *moves; /* [3 * n_expert] */
    tide_residency_job *jobs;   /* [n_expert] */
    int32_t *host;              /* [n_expert] */
    int32_t *wave_of;           /* [n_expert] swap: wave of this forward's use, -1 unused */
    uint64_t *keys;             /* [n_expert] sort keys */
    int32_t n_moves, n_jobs, n_host;
    char err[256];
};

/* The one budget rule. The slots a layer gets, and reports (tide_layer_stats.budget), under
 * `policy` for a requested budget b >= 0: gpu n_expert whatever b; cpu 0 whatever b (it never
 * fills a slot, so it holds none); static, swap, tide min(b, n_expert) (more slots than experts
 * change nothing). */
int32_t residency_clamp_budget(int32_t policy, int32_t budget, int32_t n_expert);

/* The one check of residency settings: a known policy, budgets[n_layers] (may be NULL) >= 0,
 * and refresh_interval >= 1 under `tide` (the only policy that reads it). TIDE_ERR_ARG with the
 * cause in err. */
tide_status residency_check_args(int32_t n_layers, int32_t policy, const int32_t *budgets,
                                 int32_t refresh_interval, char *err, size_t err_len);

/* Set up n_layers MoE layers of n_expert experts under `policy` with budgets[n_layers] requested
 * slots (NULL: 0 each), clamped by residency_clamp_budget. refresh_interval must be >= 1 for
 * `tide` (ignored otherwise). gpu promotes every expert here (counted; pending uploads).
 * On failure everything is freed and the message is in r->err. */
tide_status residency_init(tide_residency *r, int32_t n_layers, int32_t n_expert, int32_t policy,
                           const int32_t *budgets, int32_t refresh_interval,
                           uint64_t expert_bytes);
void residency_free(tide_residency *r);
const char *residency_error(const tide_residency *r);

/* Switch policy, budgets (NULL: 0 each) and interval: every resident expert is demoted
 * (counted), then the new policy starts from R = {} (gpu, and static with a profile, promote at
 * once, as pending uploads). Counters are kept. Afterwards every slot counts as empty: the
 * demotions here are not handed out as moves. Budgets change here only: moe.c resizes its slots
 * after this. On failure nothing changes. */
tide_status residency_set_policy(tide_residency *r, int32_t policy, const int32_t *budgets,
                                 int32_t refresh_interval);

/* Popularity profile for `static`: counts[n_layers * n_expert] (finite, >= 0), copied. Under
 * static it restarts the policy as residency_set_policy does (demote all, counted, slots empty;
 * then R = top-B by count with count > 0, promoted at once as pending uploads); under another
 * policy it is only kept, for a later switch to static. */
tide_status residency_set_popularity(tide_residency *r, const float *counts, size_t n);

/* The pending uploads of layer l (see above) as a plan with only moves (wave 0); empty if none.
 * They are handed out once. */
tide_status residency_take_pending(tide_residency *r, int32_t layer, tide_residency_plan *out);

/* Apply the policy to one forward of layer l before it computes. hits[n_expert] >= 0 are this
 * forward's token-expert pairs per expert (all tokens; committed positions count too);
 * is_step = 1 for tide_step (with step_in_block >= 0), 0 for commits and logits calls.
 * Fills *out and updates the layer's counters. */
tide_status residency_plan(tide_residency *r, int32_t layer, const int32_t *hits, int32_t is_step,
                           int32_t step_in_block, tide_residency_plan *out);

/* The experts a refresh of layer l would promote if this forward's hits were `hits`: for tide
 * at a refresh (is_step and step_in_block % tau == 0), T \ R best first (most hits, then lower
 * id); nothing for other policies or forwards. Writes at most `max` ids to out, returns how
 * many. Changes no state: moe.c copies these ahead (prefetch) from the layer's previous hits,
 * and residency_plan still decides from the real ones. */
int32_t residency_predict_promotions(tide_residency *r, int32_t layer, const int32_t *hits,
                                     int32_t is_step, int32_t step_in_block, int32_t *out,
                                     int32_t max);

/* ---- queries ------------------------------------------------------------------------------- */
/* Slot of expert e in layer l, -1 if not resident (or out of range). */
int32_t residency_slot(const tide_residency *r, int32_t layer, int32_t e);
/* Slots of layer l (residency_clamp_budget of its requested budget), -1 if out of range. */
int32_t residency_budget(const tide_residency *r, int32_t layer);
int32_t residency_n_resident(const tide_residency *r, int32_t layer);
/* out[n_expert] = 1 if resident; n must be >= n_expert. */
tide_status residency_resident(const tide_residency *r, int32_t layer, uint8_t *out, size_t n);
/* Counters of layer l (NULL if out of range). */
const tide_residency_counters *residency_counters(const tide_residency *r, int32_t layer);
/* Zero every layer's counters (tide_stats_reset); the resident sets stay. */
void residency_reset_counters(tide_residency *r);

#endif /* TIDE_RESIDENCY_H */

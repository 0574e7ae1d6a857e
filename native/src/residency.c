/* residency.c: the expert residency policies of CONTRACTS.md section 3 (see residency.h).
 *
 * Orderings use one trick throughout: a (value, expert id) pair packs into a uint64 key whose
 * ascending order is the order the contract asks for, so "sort by (-H, id)" or "lowest H first,
 * ties lower id" is one qsort of integers with no ties left to break.
 */
#include "residency.h"
#include "common.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

const char *residency_error(const tide_residency *r) { return r->err; }

/* ---- keys ---------------------------------------------------------------------------------- */

static int res_cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static void res_sort(uint64_t *keys, int32_t n) {
    if (n > 1) qsort(keys, (size_t)n, sizeof *keys, res_cmp_u64);
}

static int32_t res_key_expert(uint64_t key) { return (int32_t)(key & 0xffffffffu); }

/* Most hits first, ties lower id. */
static uint64_t res_key_most(uint32_t value, int32_t e) {
    return ((uint64_t)(UINT32_MAX - value) << 32) | (uint32_t)e;
}

/* Fewest hits first, ties lower id. */
static uint64_t res_key_fewest(uint32_t value, int32_t e) {
    return ((uint64_t)value << 32) | (uint32_t)e;
}

/* Bits of a finite float >= 0 order as the floats do. */
static uint32_t res_float_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}

/* ---- slots --------------------------------------------------------------------------------- */

static tide_residency_layer *res_layer(const tide_residency *r, int32_t l) {
    return l >= 0 && l < r->n_layers ? &r->layers[l] : NULL;
}

static void res_record(tide_residency *r, int32_t kind, int32_t e, int32_t slot, int32_t wave) {
    tide_residency_move *m = &r->moves[r->n_moves++];
    m->kind = kind;
    m->expert = e;
    m->slot = slot;
    m->wave = wave;
}

/* Put e into the lowest free slot; `wave` < 0: outside a forward (not recorded as a move). */
static void res_promote(tide_residency *r, tide_residency_layer *L, int32_t e, int32_t wave) {
    int32_t s = 0;
    while (L->expert_in[s] >= 0) s++; /* callers guarantee n_resident < budget */
    L->expert_in[s] = e;
    L->slot_of[e] = s;
    L->n_resident++;
    L->c.experts_promoted++;
    L->c.h2d_bytes += r->expert_bytes;
    if (wave >= 0) res_record(r, RESIDENCY_PROMOTE, e, s, wave);
}

static void res_demote(tide_residency *r, tide_residency_layer *L, int32_t e, int32_t wave) {
    int32_t s = L->slot_of[e];
    L->expert_in[s] = -1;
    L->slot_of[e] = -1;
    L->n_resident--;
    L->c.experts_demoted++;
    if (wave >= 0) res_record(r, RESIDENCY_DEMOTE, e, s, wave);
}

static void res_demote_all(tide_residency *r, tide_residency_layer *L) {
    for (int32_t e = 0; e < r->n_expert; e++)
        if (L->slot_of[e] >= 0) res_demote(r, L, e, -1);
    L->pending = 0;
}

/* The keys of the top-`budget` experts by value (value > 0), ascending = best first; returns
 * how many. values are hits (int32 >= 0) or, with floats != NULL, popularity counts. */
static int32_t res_top(tide_residency *r, const int32_t *hits, const float *floats,
                       int32_t budget) {
    int32_t n = 0;
    for (int32_t e = 0; e < r->n_expert; e++) {
        uint32_t v = floats ? (floats[e] > 0 ? res_float_bits(floats[e]) : 0) : (uint32_t)hits[e];
        if (v > 0) r->keys[n++] = res_key_most(v, e);
    }
    res_sort(r->keys, n);
    return n < budget ? n : budget;
}

/* R = top-B of `counts` from R = {}, promoted outside a forward (pending uploads). */
static void res_promote_profile(tide_residency *r, int32_t l) {
    tide_residency_layer *L = &r->layers[l];
    const float *counts = r->popularity + (size_t)l * (size_t)r->n_expert;
    int32_t n = res_top(r, NULL, counts, L->budget);
    for (int32_t i = 0; i < n; i++) res_promote(r, L, res_key_expert(r->keys[i]), -1);
    L->chosen = 1;
    L->pending = L->n_resident > 0;
}

/* ---- setup --------------------------------------------------------------------------------- */

tide_status residency_check_args(int32_t n_layers, int32_t policy, const int32_t *budgets,
                                 int32_t refresh_interval, char *err, size_t err_len) {
    if (policy < TIDE_POLICY_GPU || policy > TIDE_POLICY_TIDE)
        return tide_errf(err, err_len, TIDE_ERR_ARG, "policy: unknown policy %d", policy);
    if (policy == TIDE_POLICY_TIDE && refresh_interval < 1)
        return tide_errf(err, err_len, TIDE_ERR_ARG, "refresh_interval: %d, must be >= 1",
                         refresh_interval);
    for (int32_t l = 0; budgets && l < n_layers; l++)
        if (budgets[l] < 0)
            return tide_errf(err, err_len, TIDE_ERR_ARG, "budgets: layer %d: %d is negative",
                             l, budgets[l]);
    return TIDE_OK;
}

static tide_status res_check_policy(tide_residency *r, int32_t policy, const int32_t *budgets,
                                    int32_t refresh_interval) {
    return residency_check_args(r->n_layers, policy, budgets, refresh_interval, r->err,
                                sizeof r->err);
}

int32_t residency_clamp_budget(int32_t policy, int32_t budget, int32_t n_expert) {
    if (policy == TIDE_POLICY_GPU) return n_expert;
    if (policy == TIDE_POLICY_CPU || budget < 0) return 0;
    return budget < n_expert ? budget : n_expert;
}

static int32_t res_budget_for(const tide_residency *r, int32_t policy, const int32_t *budgets,
                              int32_t l) {
    return residency_clamp_budget(policy, budgets ? budgets[l] : 0, r->n_expert);
}

/* Start `policy` in every layer from R = {} (after demoting what is resident). */
static void res_start(tide_residency *r) {
    for (int32_t l = 0; l < r->n_layers; l++) {
        tide_residency_layer *L = &r->layers[l];
        res_demote_all(r, L);
        L->tick = 0;
        L->chosen = 0;
        memset(L->last_use, 0, (size_t)r->n_expert * sizeof *L->last_use);
        if (r->policy == TIDE_POLICY_GPU) {
            for (int32_t e = 0; e < r->n_expert; e++) res_promote(r, L, e, -1);
            L->pending = L->n_resident > 0;
        } else if (r->policy == TIDE_POLICY_STATIC && r->popularity) {
            res_promote_profile(r, l);
        }
    }
}

tide_status residency_set_policy(tide_residency *r, int32_t policy, const int32_t *budgets,
                                 int32_t refresh_interval) {
    tide_status st = res_check_policy(r, policy, budgets, refresh_interval);
    if (st != TIDE_OK) return st;
    /* demote under the old budgets (slots past a smaller new budget must be emptied first) */
    for (int32_t l = 0; l < r->n_layers; l++) res_demote_all(r, &r->layers[l]);
    r->policy = policy;
    r->refresh_interval = refresh_interval;
    for (int32_t l = 0; l < r->n_layers; l++)
        r->layers[l].budget = res_budget_for(r, policy, budgets, l);
    res_start(r);
    r->n_moves = r->n_jobs = r->n_host = 0;
    return TIDE_OK;
}

static tide_status res_alloc(tide_residency *r) {
    size_t L = (size_t)r->n_layers, E = (size_t)r->n_expert;
    r->layers = calloc(L, sizeof *r->layers);
    int32_t *slot_of = malloc(L * E * sizeof *slot_of);
    int32_t *expert_in = malloc(L * E * sizeof *expert_in);
    uint64_t *last_use = calloc(L * E, sizeof *last_use);
    r->moves = malloc(3 * E * sizeof *r->moves);
    r->jobs = malloc(E * sizeof *r->jobs);
    r->host = malloc(E * sizeof *r->host);
    r->wave_of = malloc(E * sizeof *r->wave_of);
    r->keys = malloc(E * sizeof *r->keys);
    if (r->layers) { /* layer 0 owns the blocks, so residency_free finds them even if one failed */
        r->layers[0].slot_of = slot_of;
        r->layers[0].expert_in = expert_in;
        r->layers[0].last_use = last_use;
    }
    if (!r->layers || !slot_of || !expert_in || !last_use || !r->moves || !r->jobs || !r->host ||
        !r->wave_of || !r->keys) {
        if (!r->layers) free(slot_of), free(expert_in), free(last_use);
        return tide_errf(r->err, sizeof r->err, TIDE_ERR_NOMEM, "residency: out of memory for %d layers x %d experts",
                        r->n_layers, r->n_expert);
    }
    for (size_t l = 0; l < L; l++) {
        r->layers[l].slot_of = slot_of + l * E;
        r->layers[l].expert_in = expert_in + l * E;
        r->layers[l].last_use = last_use + l * E;
    }
    for (size_t i = 0; i < L * E; i++) slot_of[i] = expert_in[i] = -1;
    return TIDE_OK;
}

tide_status residency_init(tide_residency *r, int32_t n_layers, int32_t n_expert, int32_t policy,
                           const int32_t *budgets, int32_t refresh_interval,
                           uint64_t expert_bytes) {
    memset(r, 0, sizeof *r);
    if (n_layers < 1 || n_expert < 1 || n_expert > (1 << 24))
        return tide_errf(r->err, sizeof r->err, TIDE_ERR_ARG, "residency: %d MoE layers of %d experts", n_layers,
                        n_expert);
    r->n_layers = n_layers;
    r->n_expert = n_expert;
    r->expert_bytes = expert_bytes;
    tide_status st = res_check_policy(r, policy, budgets, refresh_interval);
    if (st == TIDE_OK) st = res_alloc(r);
    if (st == TIDE_OK) st = residency_set_policy(r, policy, budgets, refresh_interval);
    if (st != TIDE_OK) {
        char msg[sizeof r->err];
        memcpy(msg, r->err, sizeof msg);
        residency_free(r);
        memcpy(r->err, msg, sizeof msg);
    }
    return st;
}

void residency_free(tide_residency *r) {
    if (r->layers) {
        free(r->layers[0].slot_of);
        free(r->layers[0].expert_in);
        free(r->layers[0].last_use);
    }
    free(r->layers);
    free(r->popularity);
    free(r->moves);
    free(r->jobs);
    free(r->host);
    free(r->wave_of);
    free(r->keys);
    memset(r, 0, sizeof *r);
}

tide_status residency_set_popularity(tide_residency *r, const float *counts, size_t n) {
    size_t want = (size_t)r->n_layers * (size_t)r->n_expert;
    if (!counts || n != want)
        return tide_errf(r->err, sizeof r->err, TIDE_ERR_ARG, "popularity: %zu counts, expected %d layers x %d "
                        "experts = %zu", counts ? n : 0, r->n_layers, r->n_expert, want);
    for (size_t i = 0; i < n; i++)
        if (!isfinite(counts[i]) || counts[i] < 0)
            return tide_errf(r->err, sizeof r->err, TIDE_ERR_ARG, "popularity: count %g of layer %zu expert %zu is "
                            "not a finite number >= 0", (double)counts[i], i / (size_t)r->n_expert,
                            i % (size_t)r->n_expert);
    if (!r->popularity && !(r->popularity = malloc(want * sizeof *r->popularity)))
        return tide_errf(r->err, sizeof r->err, TIDE_ERR_NOMEM, "popularity: out of memory");
    memcpy(r->popularity, counts, want * sizeof *counts);
    if (r->policy == TIDE_POLICY_STATIC) res_start(r);
    r->n_moves = r->n_jobs = r->n_host = 0;
    return TIDE_OK;
}

/* ---- one forward --------------------------------------------------------------------------- */

static void res_emit_pending(tide_residency *r, tide_residency_layer *L) {
    if (!L->pending) return;
    for (int32_t e = 0; e < r->n_expert; e++)
        if (L->slot_of[e] >= 0) res_record(r, RESIDENCY_PROMOTE, e, L->slot_of[e], 0);
    L->pending = 0;
}

static void res_fill_plan(const tide_residency *r, int32_t n_waves, tide_residency_plan *out) {
    out->moves = r->moves;
    out->n_moves = r->n_moves;
    out->device = r->jobs;
    out->n_device = r->n_jobs;
    out->host = r->host;
    out->n_host = r->n_host;
    out->n_waves = n_waves;
}

/* static without a profile: at the first step, R = top-B by this forward's hits, for good. */
static void res_plan_static(tide_residency *r, tide_residency_layer *L, const int32_t *hits,
                            int32_t is_step) {
    if (L->chosen || !is_step) return;
    int32_t *chosen = r->wave_of; /* scratch: 1 if in the set */
    memset(chosen, 0, (size_t)r->n_expert * sizeof *chosen);
    int32_t n = res_top(r, hits, NULL, L->budget);
    for (int32_t i = 0; i < n; i++) chosen[res_key_expert(r->keys[i])] = 1;
    for (int32_t e = 0; e < r->n_expert; e++) /* ascending id: slots follow the ids */
        if (chosen[e]) res_promote(r, L, e, 0);
    L->chosen = 1;
}

/* tide: at a step with s % tau == 0, T = top-B by hits; demote just enough of R \ T (fewest
 * hits first) to make room, then promote T \ R. */
static void res_plan_tide(tide_residency *r, tide_residency_layer *L, const int32_t *hits,
                          int32_t is_step, int32_t step_in_block) {
    if (!is_step || step_in_block % r->refresh_interval != 0) return;
    int32_t *in_t = r->wave_of; /* scratch: 1 if in T */
    memset(in_t, 0, (size_t)r->n_expert * sizeof *in_t);
    int32_t n_t = res_top(r, hits, NULL, L->budget), n_new = 0;
    for (int32_t i = 0; i < n_t; i++) {
        int32_t e = res_key_expert(r->keys[i]);
        in_t[e] = 1;
        n_new += L->slot_of[e] < 0;
    }
    int32_t excess = L->n_resident + n_new - L->budget, n_out = 0;
    if (excess > 0) {
        for (int32_t e = 0; e < r->n_expert; e++)
            if (L->slot_of[e] >= 0 && !in_t[e]) r->keys[n_out++] = res_key_fewest((uint32_t)hits[e], e);
        res_sort(r->keys, n_out); /* n_out >= excess: |T| <= B */
        for (int32_t i = 0; i < excess; i++) res_demote(r, L, res_key_expert(r->keys[i]), 0);
    }
    for (int32_t e = 0; e < r->n_expert; e++)
        if (in_t[e] && L->slot_of[e] < 0) res_promote(r, L, e, 0);
}

/* Every pair of an expert with a slot runs on the device (wave 0), the rest on the host. */
static void res_split(tide_residency *r, tide_residency_layer *L, const int32_t *hits) {
    for (int32_t e = 0; e < r->n_expert; e++) {
        if (hits[e] <= 0) continue;
        if (L->slot_of[e] >= 0) {
            r->jobs[r->n_jobs++] = (tide_residency_job){e, L->slot_of[e], 0};
            L->c.device_expert_tokens += (uint64_t)hits[e];
        } else {
            r->host[r->n_host++] = e;
            L->c.host_expert_tokens += (uint64_t)hits[e];
        }
    }
}

/* The resident expert used longest ago (ties lower id). */
static int32_t res_lru(const tide_residency *r, const tide_residency_layer *L) {
    int32_t victim = -1;
    for (int32_t e = 0; e < r->n_expert; e++)
        if (L->slot_of[e] >= 0 && (victim < 0 || L->last_use[e] < L->last_use[victim])) victim = e;
    return victim;
}

/* swap: every needed expert, ascending id, is brought in before use (LRU out) and computed on
 * the device. A victim already computed in the current wave closes it: its slot can be refilled
 * only after that wave's compute. Returns the number of waves. */
static int32_t res_plan_swap(tide_residency *r, tide_residency_layer *L, const int32_t *hits) {
    if (L->budget == 0) {
        res_split(r, L, hits); /* nothing can come in: all on the host */
        return 1;
    }
    int32_t wave = 0;
    for (int32_t e = 0; e < r->n_expert; e++) r->wave_of[e] = -1;
    for (int32_t e = 0; e < r->n_expert; e++) {
        if (hits[e] <= 0) continue;
        if (L->slot_of[e] < 0) {
            if (L->n_resident >= L->budget) {
                int32_t victim = res_lru(r, L);
                if (r->wave_of[victim] == wave) wave++;
                res_demote(r, L, victim, wave);
            }
            res_promote(r, L, e, wave);
        }
        L->last_use[e] = ++L->tick;
        r->wave_of[e] = wave;
        r->jobs[r->n_jobs++] = (tide_residency_job){e, L->slot_of[e], wave};
        L->c.device_expert_tokens += (uint64_t)hits[e];
    }
    return wave + 1;
}

static tide_status res_check_plan(tide_residency *r, int32_t layer, const int32_t *hits,
                                  int32_t is_step, int32_t step_in_block,
                                  tide_residency_plan *out) {
    if (!res_layer(r, layer))
        return tide_errf(r->err, sizeof r->err, TIDE_ERR_ARG, "residency: MoE layer %d out of range (%d layers)", layer,
                        r->n_layers);
    if (!hits || !out) return tide_errf(r->err, sizeof r->err, TIDE_ERR_ARG, "residency: hits or plan is NULL");
    if (is_step && step_in_block < 0)
        return tide_errf(r->err, sizeof r->err, TIDE_ERR_ARG, "residency: step_in_block %d is negative",
                        step_in_block);
    for (int32_t e = 0; e < r->n_expert; e++)
        if (hits[e] < 0)
            return tide_errf(r->err, sizeof r->err, TIDE_ERR_ARG, "residency: layer %d expert %d has %d hits", layer,
                            e, hits[e]);
    return TIDE_OK;
}

tide_status residency_plan(tide_residency *r, int32_t layer, const int32_t *hits, int32_t is_step,
                           int32_t step_in_block, tide_residency_plan *out) {
    tide_status st = res_check_plan(r, layer, hits, is_step, step_in_block, out);
    if (st != TIDE_OK) return st;
    tide_residency_layer *L = &r->layers[layer];
    r->n_moves = r->n_jobs = r->n_host = 0;
    res_emit_pending(r, L);
    int32_t n_waves = 1;
    switch (r->policy) {
    case TIDE_POLICY_STATIC: res_plan_static(r, L, hits, is_step); break;
    case TIDE_POLICY_TIDE: res_plan_tide(r, L, hits, is_step, step_in_block); break;
    case TIDE_POLICY_SWAP: n_waves = res_plan_swap(r, L, hits); break;
    default: break; /* gpu, cpu: R never changes */
    }
    if (r->policy != TIDE_POLICY_SWAP) res_split(r, L, hits);
    res_fill_plan(r, n_waves, out);
    return TIDE_OK;
}

tide_status residency_take_pending(tide_residency *r, int32_t layer, tide_residency_plan *out) {
    if (!res_layer(r, layer) || !out)
        return tide_errf(r->err, sizeof r->err, TIDE_ERR_ARG, "residency: MoE layer %d out of range (%d layers)", layer,
                        r->n_layers);
    r->n_moves = r->n_jobs = r->n_host = 0;
    res_emit_pending(r, &r->layers[layer]);
    res_fill_plan(r, 1, out);
    return TIDE_OK;
}

int32_t residency_predict_promotions(tide_residency *r, int32_t layer, const int32_t *hits,
                                     int32_t is_step, int32_t step_in_block, int32_t *out,
                                     int32_t max) {
    const tide_residency_layer *L = res_layer(r, layer);
    if (!L || !hits || r->policy != TIDE_POLICY_TIDE || !is_step || step_in_block < 0 ||
        step_in_block % r->refresh_interval != 0)
        return 0;
    int32_t n_t = res_top(r, hits, NULL, L->budget), n = 0;
    for (int32_t i = 0; i < n_t && n < max; i++) {
        int32_t e = res_key_expert(r->keys[i]);
        if (L->slot_of[e] < 0) out[n++] = e;
    }
    return n;
}

/* ---- queries ------------------------------------------------------------------------------- */

int32_t residency_slot(const tide_residency *r, int32_t layer, int32_t e) {
    const tide_residency_layer *L = res_layer(r, layer);
    return L && e >= 0 && e < r->n_expert ? L->slot_of[e] : -1;
}

int32_t residency_budget(const tide_residency *r, int32_t layer) {
    const tide_residency_layer *L = res_layer(r, layer);
    return L ? L->budget : -1;
}

int32_t residency_n_resident(const tide_residency *r, int32_t layer) {
    const tide_residency_layer *L = res_layer(r, layer);
    return L ? L->n_resident : -1;
}

tide_status residency_resident(const tide_residency *r, int32_t layer, uint8_t *out, size_t n) {
    const tide_residency_layer *L = res_layer(r, layer);
    if (!L || !out || n < (size_t)r->n_expert) return TIDE_ERR_ARG;
    for (int32_t e = 0; e < r->n_expert; e++) out[e] = L->slot_of[e] >= 0;
    return TIDE_OK;
}

const tide_residency_counters *residency_counters(const tide_residency *r, int32_t layer) {
    const tide_residency_layer *L = res_layer(r, layer);
    return L ? &L->c : NULL;
}

void residency_reset_counters(tide_residency *r) {
    for (int32_t l = 0; l < r->n_layers; l++) memset(&r->layers[l].c, 0, sizeof r->layers[l].c);
}

/* test_residency.c: the residency policies (CONTRACTS.md section 3) on hand-made hit sequences.
 *
 * Each case states the expected resident set and counters after each forward. Every plan is also
 * executed on a model of the slots (moves of a wave, then its device jobs), which checks that
 * each job finds its expert in its slot and that the final slots agree with residency_slot.
 */
#include "residency.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

#define MAXE 64
#define XB 1000 /* expert_bytes */

/* The device slots as moe.c would hold them: slots[l][s] = expert or -1. */
static int32_t slots[4][MAXE];

static void slots_clear(void) { memset(slots, 0xff, sizeof slots); }

/* Run a plan on the slot model; returns 0 if any step is inconsistent. */
static int execute(const tide_residency *r, int32_t l, const tide_residency_plan *p) {
    int ok = 1, mi = 0, ji = 0;
    for (int32_t w = 0; w < p->n_waves; w++) {
        for (; mi < p->n_moves && p->moves[mi].wave == w; mi++) {
            const tide_residency_move *m = &p->moves[mi];
            if (m->kind == RESIDENCY_DEMOTE) {
                ok &= slots[l][m->slot] == m->expert;
                slots[l][m->slot] = -1;
            } else {
                ok &= slots[l][m->slot] == -1; /* never overwrite a live slot */
                slots[l][m->slot] = m->expert;
            }
        }
        for (; ji < p->n_device && p->device[ji].wave == w; ji++)
            ok &= slots[l][p->device[ji].slot] == p->device[ji].expert;
    }
    ok &= mi == p->n_moves && ji == p->n_device; /* lists are in wave order */
    for (int32_t s = 0; s < MAXE; s++)
        if (slots[l][s] >= 0) ok &= residency_slot(r, l, slots[l][s]) == s;
    for (int32_t e = 0; e < r->n_expert; e++) {
        int32_t s = residency_slot(r, l, e);
        if (s >= 0) ok &= s < residency_budget(r, l) && slots[l][s] == e;
    }
    return ok;
}

/* Resident set of layer l as a string of ids, e.g. "0 2 3". */
static const char *set_str(const tide_residency *r, int32_t l) {
    static char buf[512];
    uint8_t m[MAXE];
    residency_resident(r, l, m, MAXE);
    buf[0] = '\0';
    for (int32_t e = 0; e < r->n_expert; e++)
        if (m[e]) snprintf(buf + strlen(buf), sizeof buf - strlen(buf), "%s%d", buf[0] ? " " : "", e);
    return buf;
}

/* One forward: plan, execute on the slot model, check the set and the counter totals. */
static void fwd(tide_residency *r, int32_t l, const int32_t *h, int is_step, int s,
                const char *want_set, uint64_t prom, uint64_t dem, uint64_t dev, uint64_t host,
                int line) {
    tide_residency_plan p;
    tide_status st = residency_plan(r, l, h, is_step, s, &p);
    CHECK(st == TIDE_OK, "line %d: plan: %s", line, residency_error(r));
    if (st != TIDE_OK) return;
    CHECK(execute(r, l, &p), "line %d: plan does not execute", line);
    const char *got = set_str(r, l);
    CHECK(strcmp(got, want_set) == 0, "line %d: resident {%s}, want {%s}", line, got, want_set);
    const tide_residency_counters *c = residency_counters(r, l);
    CHECK(c->experts_promoted == prom && c->experts_demoted == dem, "line %d: promoted %llu "
          "demoted %llu, want %llu %llu", line, (unsigned long long)c->experts_promoted,
          (unsigned long long)c->experts_demoted, (unsigned long long)prom,
          (unsigned long long)dem);
    CHECK(c->device_expert_tokens == dev && c->host_expert_tokens == host, "line %d: device %llu "
          "host %llu, want %llu %llu", line, (unsigned long long)c->device_expert_tokens,
          (unsigned long long)c->host_expert_tokens, (unsigned long long)dev,
          (unsigned long long)host);
    CHECK(c->h2d_bytes == c->experts_promoted * XB, "line %d: h2d", line);
}

#define FWD(r, l, is_step, s, set, prom, dem, dev, host, ...)                                     \
    do {                                                                                          \
        const int32_t h_[] = {__VA_ARGS__};                                                       \
        fwd(r, l, h_, is_step, s, set, prom, dem, dev, host, __LINE__);                           \
    } while (0)
#define STEP(r, l, s, set, prom, dem, dev, host, ...) FWD(r, l, 1, s, set, prom, dem, dev, host, __VA_ARGS__)
#define COMMIT(r, l, set, prom, dem, dev, host, ...) FWD(r, l, 0, 0, set, prom, dem, dev, host, __VA_ARGS__)

static tide_residency make(int32_t n_layers, int32_t E, int32_t policy, const int32_t *budgets,
                           int32_t tau) {
    tide_residency r;
    tide_status st = residency_init(&r, n_layers, E, policy, budgets, tau, XB);
    CHECK(st == TIDE_OK, "init: %s", residency_error(&r));
    slots_clear();
    return r;
}

/* Upload the pending promotions of every layer into the slot model. */
static void take_pending(tide_residency *r) {
    for (int32_t l = 0; l < r->n_layers; l++) {
        tide_residency_plan p;
        CHECK(residency_take_pending(r, l, &p) == TIDE_OK, "take_pending");
        CHECK(p.n_device == 0 && p.n_host == 0, "pending has no jobs");
        CHECK(execute(r, l, &p), "pending executes");
    }
}

/* ---- policies ------------------------------------------------------------------------------ */

static void test_cpu(void) {
    int32_t b[1] = {3};
    tide_residency r = make(1, 4, TIDE_POLICY_CPU, b, 4);
    CHECK(residency_budget(&r, 0) == 0, "cpu holds no slots whatever its budget");
    CHECK(residency_clamp_budget(TIDE_POLICY_CPU, 3, 4) == 0, "the one budget rule: cpu");
    CHECK(residency_clamp_budget(TIDE_POLICY_GPU, 0, 4) == 4, "the one budget rule: gpu");
    CHECK(residency_clamp_budget(TIDE_POLICY_TIDE, 9, 4) == 4, "the one budget rule: clamp");
    STEP(&r, 0, 0, "", 0, 0, 0, 6, 1, 2, 3, 0);
    COMMIT(&r, 0, "", 0, 0, 0, 16, 4, 0, 0, 6);
    residency_free(&r);
}

static void test_gpu(void) {
    int32_t b[2] = {1, 0};
    tide_residency r = make(2, 4, TIDE_POLICY_GPU, b, 4);
    CHECK(residency_budget(&r, 0) == 4 && residency_budget(&r, 1) == 4, "gpu budget = E");
    const tide_residency_counters *c = residency_counters(&r, 1);
    CHECK(c->experts_promoted == 4 && c->h2d_bytes == 4 * XB, "gpu promotes at init");
    tide_residency_plan p;
    residency_take_pending(&r, 0, &p);
    CHECK(p.n_moves == 4 && p.moves[3].kind == RESIDENCY_PROMOTE && p.moves[3].expert == 3 &&
              p.moves[3].slot == 3, "gpu pending uploads");
    CHECK(execute(&r, 0, &p), "execute pending");
    residency_take_pending(&r, 0, &p);
    CHECK(p.n_moves == 0, "pending handed out once");
    STEP(&r, 0, 0, "0 1 2 3", 4, 0, 6, 0, 1, 2, 3, 0);
    /* layer 1's uploads were not taken: the first plan emits them before anything else */
    tide_residency_plan q;
    const int32_t h[4] = {0, 0, 0, 2};
    residency_plan(&r, 1, h, 0, 0, &q);
    CHECK(q.n_moves == 4 && q.n_device == 1 && q.device[0].expert == 3 && q.device[0].slot == 3,
          "pending in plan");
    CHECK(execute(&r, 1, &q), "execute");
    residency_free(&r);
}

static void test_static_first_step(void) {
    int32_t b[1] = {2};
    tide_residency r = make(1, 5, TIDE_POLICY_STATIC, b, 4);
    /* commits before the first step leave R = {} */
    COMMIT(&r, 0, "", 0, 0, 0, 7, 3, 0, 4, 0, 0);
    /* first step: top-2 by (-H, id); 1 and 3 tie at 4: lower id (1) wins over 3 */
    STEP(&r, 0, 3, "1 4", 2, 0, 9, 7 + 4, 0, 4, 0, 4, 5);
    /* never changes afterwards, whatever the hits */
    STEP(&r, 0, 0, "1 4", 2, 0, 9, 11 + 10, 5, 0, 5, 0, 0);
    COMMIT(&r, 0, "1 4", 2, 0, 11, 21, 0, 2, 0, 0, 0);
    residency_free(&r);

    /* a first step with fewer experts hit than slots: the set stays short, for good */
    r = make(1, 5, TIDE_POLICY_STATIC, b, 4);
    STEP(&r, 0, 0, "2", 1, 0, 3, 0, 0, 0, 3, 0, 0);
    STEP(&r, 0, 1, "2", 1, 0, 4, 4, 1, 1, 1, 1, 1);
    residency_free(&r);
}

static void test_static_profile(void) {
    int32_t b[2] = {2, 3};
    tide_residency r = make(2, 4, TIDE_POLICY_STATIC, b, 4);
    /* layer 0: 2 and 3 tie at 5.0: lower id; layer 1: only two positive counts for 3 slots */
    const float pop[8] = {1.0f, 0.5f, 5.0f, 5.0f, 0.0f, 2.0f, 0.0f, 0.25f};
    CHECK(residency_set_popularity(&r, pop, 8) == TIDE_OK, "%s", residency_error(&r));
    CHECK(strcmp(set_str(&r, 0), "2 3") == 0, "profile set 0: %s", set_str(&r, 0));
    CHECK(strcmp(set_str(&r, 1), "1 3") == 0, "profile set 1: %s", set_str(&r, 1));
    CHECK(residency_counters(&r, 1)->experts_promoted == 2, "promoted when set");
    take_pending(&r);
    /* the profile's set is fixed: the first step does not choose again */
    STEP(&r, 0, 0, "2 3", 2, 0, 1, 9, 9, 0, 0, 1);
    STEP(&r, 1, 0, "1 3", 2, 0, 2, 4, 4, 2, 0, 0);
    /* a new profile restarts static: all demoted (counted), the new top-B promoted */
    const float pop2[8] = {0, 0, 0, 1, 1, 1, 1, 1};
    CHECK(residency_set_popularity(&r, pop2, 8) == TIDE_OK, "set again");
    CHECK(strcmp(set_str(&r, 0), "3") == 0 && strcmp(set_str(&r, 1), "0 1 2") == 0,
          "new profile");
    const tide_residency_counters *c = residency_counters(&r, 0);
    CHECK(c->experts_promoted == 3 && c->experts_demoted == 2, "restart counted");
    slots_clear();
    take_pending(&r);
    STEP(&r, 0, 1, "3", 3, 2, 2, 9, 0, 0, 0, 1);
    residency_free(&r);

    /* a profile given under another policy is kept and used on the switch to static */
    r = make(1, 4, TIDE_POLICY_CPU, b, 4);
    const float pop3[4] = {0, 3, 0, 2};
    residency_set_popularity(&r, pop3, 4);
    CHECK(strcmp(set_str(&r, 0), "") == 0, "cpu ignores the profile");
    residency_set_policy(&r, TIDE_POLICY_STATIC, b, 4);
    CHECK(strcmp(set_str(&r, 0), "1 3") == 0, "static with profile on switch");
    residency_free(&r);
}

static void test_swap(void) {
    int32_t b[1] = {2};
    tide_residency r = make(1, 6, TIDE_POLICY_SWAP, b, 4);
    /* 0, 1 fill the slots; 2 evicts 0, which this wave already computed: a second wave */
    tide_residency_plan p;
    const int32_t h1[6] = {1, 2, 3, 0, 0, 0};
    CHECK(residency_plan(&r, 0, h1, 0, 0, &p) == TIDE_OK, "plan");
    CHECK(p.n_waves == 2 && p.n_device == 3 && p.n_host == 0, "waves %d", p.n_waves);
    CHECK(p.device[2].expert == 2 && p.device[2].slot == 0 && p.device[2].wave == 1, "job 2");
    CHECK(p.n_moves == 4 && p.moves[2].kind == RESIDENCY_DEMOTE && p.moves[2].expert == 0 &&
              p.moves[2].wave == 1 && p.moves[3].kind == RESIDENCY_PROMOTE &&
              p.moves[3].expert == 2 && p.moves[3].slot == 0, "moves");
    CHECK(execute(&r, 0, &p), "execute");
    CHECK(strcmp(set_str(&r, 0), "1 2") == 0, "after first");
    /* last_use: 1 -> 2, 2 -> 3. Hit 1 (tick 4); 3 evicts the LRU, 2 (not used this forward) */
    STEP(&r, 0, 0, "1 3", 4, 2, 6 + 2, 0, 0, 1, 0, 1, 0, 0);
    /* last_use: 1 -> 4, 3 -> 5. Needs 0..4: LRU out each time; three waves */
    const int32_t h3[6] = {1, 1, 1, 1, 1, 0};
    residency_plan(&r, 0, h3, 1, 2, &p);
    CHECK(p.n_waves == 3, "three waves: %d", p.n_waves);
    int32_t want[5][3] = {{0, 1, 0}, {1, 0, 0}, {2, 1, 1}, {3, 0, 1}, {4, 1, 2}};
    int ok = p.n_device == 5;
    for (int i = 0; ok && i < 5; i++)
        ok &= p.device[i].expert == want[i][0] && p.device[i].slot == want[i][1] &&
              p.device[i].wave == want[i][2];
    CHECK(ok, "swap jobs");
    CHECK(execute(&r, 0, &p), "execute");
    CHECK(strcmp(set_str(&r, 0), "3 4") == 0, "after third: %s", set_str(&r, 0));
    const tide_residency_counters *c = residency_counters(&r, 0);
    CHECK(c->experts_promoted == 9 && c->experts_demoted == 7 && c->host_expert_tokens == 0 &&
              c->device_expert_tokens == 8 + 5, "counters");
    /* commits swap too; a resident hit only refreshes its last use */
    COMMIT(&r, 0, "3 4", 9, 7, 13 + 3, 0, 0, 0, 0, 2, 1, 0);
    COMMIT(&r, 0, "4 5", 10, 8, 16 + 1, 0, 0, 0, 0, 0, 0, 1);
    residency_free(&r);

    /* B = 0: everything on the host, nothing moves */
    int32_t b0[1] = {0};
    r = make(1, 3, TIDE_POLICY_SWAP, b0, 4);
    STEP(&r, 0, 0, "", 0, 0, 0, 6, 1, 2, 3);
    residency_free(&r);
}

static void test_tide(void) {
    int32_t b[1] = {3};
    tide_residency r = make(1, 6, TIDE_POLICY_TIDE, b, 2);
    COMMIT(&r, 0, "", 0, 0, 0, 4, 1, 1, 1, 1, 0, 0);
    /* s = 0: T = top-3 by (-H, id) = {0, 2, 3} (2 and 3 tie at 3) */
    STEP(&r, 0, 0, "0 2 3", 3, 0, 11, 5, 5, 0, 3, 3, 1, 0);
    /* s = 1: no refresh (tau = 2) */
    STEP(&r, 0, 1, "0 2 3", 3, 0, 11, 23, 0, 9, 0, 0, 0, 9);
    /* s = 2: T = {1, 4, 3}; two must go from R \ T = {0 (H 1), 2 (H 0)}: 2 first, then 0 */
    tide_residency_plan p;
    const int32_t h[6] = {1, 4, 0, 2, 4, 0};
    residency_plan(&r, 0, h, 1, 2, &p);
    CHECK(p.n_moves == 4 && p.moves[0].kind == RESIDENCY_DEMOTE && p.moves[0].expert == 2 &&
              p.moves[1].expert == 0 && p.moves[2].kind == RESIDENCY_PROMOTE &&
              p.moves[2].expert == 1 && p.moves[3].expert == 4, "demotion order");
    CHECK(execute(&r, 0, &p), "execute");
    CHECK(strcmp(set_str(&r, 0), "1 3 4") == 0, "after s=2: %s", set_str(&r, 0));
    /* s = 4: T = {5}; one must go from {1, 3, 4}, all with H = 0: lowest id */
    STEP(&r, 0, 4, "3 4 5", 6, 3, 11 + 10 + 7, 24, 0, 0, 0, 0, 0, 7);
    /* s = 6: fewer hit experts than slots: T = {2}, one demoted (3, lowest id of the H = 0) */
    STEP(&r, 0, 6, "2 4 5", 7, 4, 28 + 2, 24, 0, 0, 2, 0, 0, 0);
    /* commits never refresh, whatever the step counter says */
    COMMIT(&r, 0, "2 4 5", 7, 4, 30 + 9, 24 + 18, 9, 9, 9, 0, 0, 0);
    /* s = 3: no refresh */
    STEP(&r, 0, 3, "2 4 5", 7, 4, 39, 42 + 5, 5, 0, 0, 0, 0, 0);
    residency_free(&r);

    /* room to spare: no demotion until R + new exceeds B */
    int32_t b4[1] = {4};
    r = make(1, 6, TIDE_POLICY_TIDE, b4, 1);
    STEP(&r, 0, 0, "0 1", 2, 0, 2, 0, 1, 1, 0, 0, 0, 0);
    STEP(&r, 0, 1, "0 1 2", 3, 0, 3, 0, 0, 0, 1, 0, 0, 0); /* tau = 1: every step */
    STEP(&r, 0, 2, "1 2 3 4", 5, 1, 6, 0, 0, 0, 1, 1, 1, 0); /* one of {0, 1} (H 0) goes: 0 */
    /* B = 0: never anything */
    int32_t b0[1] = {0};
    residency_set_policy(&r, TIDE_POLICY_TIDE, b0, 1);
    slots_clear(); /* a switch empties every slot: moe.c starts them afresh */
    CHECK(residency_counters(&r, 0)->experts_demoted == 5, "switch demotes all");
    STEP(&r, 0, 0, "", 5, 5, 6, 3, 3, 0, 0, 0, 0, 0);
    residency_free(&r);
}

/* Layers are independent; budgets above E are clamped; a switch keeps the counters. */
static void test_layers_and_switch(void) {
    int32_t b[2] = {1, 10};
    tide_residency r = make(2, 4, TIDE_POLICY_TIDE, b, 4);
    CHECK(residency_budget(&r, 0) == 1 && residency_budget(&r, 1) == 4, "clamp");
    CHECK(residency_budget(&r, 2) == -1, "out of range");
    STEP(&r, 0, 0, "2", 1, 0, 5, 2, 1, 1, 5, 0);
    STEP(&r, 1, 0, "0 1 2", 3, 0, 7, 0, 1, 1, 5, 0);
    CHECK(residency_n_resident(&r, 0) == 1 && residency_n_resident(&r, 1) == 3, "n_resident");
    int32_t nb[2] = {2, 2};
    CHECK(residency_set_policy(&r, TIDE_POLICY_SWAP, nb, 4) == TIDE_OK, "switch");
    const tide_residency_counters *c = residency_counters(&r, 1);
    CHECK(c->experts_promoted == 3 && c->experts_demoted == 3 && c->device_expert_tokens == 7,
          "counters kept, demotions counted");
    CHECK(strcmp(set_str(&r, 1), "") == 0 && residency_budget(&r, 1) == 2, "R = {}");
    slots_clear();
    COMMIT(&r, 1, "2 3", 5, 3, 7 + 2, 0, 0, 0, 1, 1);
    CHECK(residency_set_policy(&r, TIDE_POLICY_GPU, NULL, 0) == TIDE_OK, "to gpu");
    CHECK(residency_counters(&r, 1)->experts_promoted == 5 + 4 &&
              residency_counters(&r, 1)->experts_demoted == 5, "gpu promotes all on switch");
    residency_reset_counters(&r);
    CHECK(residency_counters(&r, 1)->experts_promoted == 0 && residency_n_resident(&r, 1) == 4,
          "reset counters keeps the set");
    residency_free(&r);
}

static void test_errors(void) {
    tide_residency r;
    int32_t b[2] = {1, -1};
    CHECK(residency_init(&r, 2, 4, 9, b, 4, XB) == TIDE_ERR_ARG &&
              strstr(residency_error(&r), "unknown policy 9"), "%s", residency_error(&r));
    CHECK(residency_init(&r, 2, 4, TIDE_POLICY_TIDE, b, 4, XB) == TIDE_ERR_ARG &&
              strstr(residency_error(&r), "budgets: layer 1: -1 is negative"), "%s",
          residency_error(&r));
    b[1] = 2;
    CHECK(residency_init(&r, 2, 4, TIDE_POLICY_TIDE, b, 0, XB) == TIDE_ERR_ARG &&
              strstr(residency_error(&r), "refresh_interval: 0"), "%s", residency_error(&r));
    CHECK(residency_init(&r, 0, 4, TIDE_POLICY_CPU, b, 0, XB) == TIDE_ERR_ARG, "no layers");
    CHECK(residency_init(&r, 2, 4, TIDE_POLICY_SWAP, b, 0, XB) == TIDE_OK, "swap ignores tau");
    tide_residency_plan p;
    int32_t h[4] = {0, -1, 0, 0};
    CHECK(residency_plan(&r, 0, h, 0, 0, &p) == TIDE_ERR_ARG &&
              strstr(residency_error(&r), "expert 1 has -1 hits"), "%s", residency_error(&r));
    h[1] = 0;
    CHECK(residency_plan(&r, 2, h, 0, 0, &p) == TIDE_ERR_ARG &&
              strstr(residency_error(&r), "MoE layer 2 out of range"), "%s", residency_error(&r));
    CHECK(residency_plan(&r, 0, h, 1, -1, &p) == TIDE_ERR_ARG, "negative step");
    float pop[8] = {0};
    CHECK(residency_set_popularity(&r, pop, 7) == TIDE_ERR_ARG &&
              strstr(residency_error(&r), "7 counts, expected 2 layers x 4 experts = 8"), "%s",
          residency_error(&r));
    pop[5] = -1.0f;
    CHECK(residency_set_popularity(&r, pop, 8) == TIDE_ERR_ARG &&
              strstr(residency_error(&r), "layer 1 expert 1"), "%s", residency_error(&r));
    CHECK(residency_set_policy(&r, TIDE_POLICY_TIDE, b, -3) == TIDE_ERR_ARG, "tau");
    CHECK(residency_budget(&r, 0) == 1, "a refused switch changes nothing");
    CHECK(residency_slot(&r, 5, 0) == -1 && residency_slot(&r, 0, 99) == -1 &&
              residency_counters(&r, 9) == NULL && residency_budget(&r, -1) == -1, "oob queries");
    uint8_t m[2];
    CHECK(residency_resident(&r, 0, m, 2) == TIDE_ERR_ARG, "short mask");
    residency_free(&r);
}

/* Random hits through every policy: the invariants that hold whatever the sequence. */
static void test_random(void) {
    uint64_t seed = 12345;
    int bad = 0;
    for (int trial = 0; trial < 200; trial++) {
        int32_t E = 1 + (int32_t)(trial % 17) * 3, policy = trial % 5;
        int32_t b[2] = {trial % (E + 2), (trial * 7) % (E + 1)};
        int32_t tau = 1 + trial % 4;
        tide_residency r = make(2, E, policy, b, tau);
        take_pending(&r);
        uint64_t tot[2] = {0, 0};
        for (int f = 0; f < 30; f++) {
            for (int32_t l = 0; l < 2; l++) {
                int32_t h[MAXE];
                for (int32_t e = 0; e < E; e++) {
                    seed = seed * 6364136223846793005ull + 1442695040888963407ull;
                    h[e] = (seed >> 33) % 4 == 0 ? (int32_t)((seed >> 40) % 9) : 0;
                    tot[l] += (uint64_t)h[e];
                }
                tide_residency_plan p;
                if (residency_plan(&r, l, h, f % 3 != 2, f % 5, &p) != TIDE_OK || !execute(&r, l, &p))
                    bad++;
                const tide_residency_counters *c = residency_counters(&r, l);
                if (c->device_expert_tokens + c->host_expert_tokens != tot[l] ||
                    c->experts_promoted - c->experts_demoted != (uint64_t)residency_n_resident(&r, l) ||
                    residency_n_resident(&r, l) > residency_budget(&r, l) ||
                    (policy == TIDE_POLICY_SWAP && residency_budget(&r, l) > 0 && c->host_expert_tokens))
                    bad++;
            }
        }
        residency_free(&r);
    }
    CHECK(bad == 0, "%d random forwards broke an invariant", bad);
}

/* residency_predict_promotions: at a refresh, exactly the promotions the plan then makes for
 * the same hits (best first; the plan lists them by ascending id), nothing elsewhere; no state
 * changes. */
static void test_predict(void) {
    int32_t b[1] = {3};
    tide_residency r = make(1, 8, TIDE_POLICY_TIDE, b, 2);
    uint64_t seed = 7;
    for (int it = 0; it < 200; it++) {
        int32_t h[8];
        for (int e = 0; e < 8; e++) {
            seed = seed * 6364136223846793005ull + 1442695040888963407ull;
            h[e] = (int32_t)((seed >> 33) % 4);
        }
        int32_t s = it % 5, pred[8], pred2[8];
        char before[64];
        snprintf(before, sizeof before, "%s", set_str(&r, 0));
        int32_t n = residency_predict_promotions(&r, 0, h, 1, s, pred, 8);
        CHECK(strcmp(before, set_str(&r, 0)) == 0, "predict changed R");
        CHECK(residency_predict_promotions(&r, 0, h, 0, s, pred2, 8) == 0, "commits: nothing");
        int32_t m = residency_predict_promotions(&r, 0, h, 1, s, pred2, 1);
        CHECK(m == (n > 0) && (m == 0 || pred2[0] == pred[0]), "max caps the list, best first");
        for (int32_t i = 1; i < n; i++)
            CHECK(h[pred[i - 1]] > h[pred[i]] || (h[pred[i - 1]] == h[pred[i]] && pred[i - 1] < pred[i]),
                  "best first");
        tide_residency_plan p;
        CHECK(residency_plan(&r, 0, h, 1, s, &p) == TIDE_OK, "plan");
        int32_t n_prom = 0;
        for (int32_t i = 0; i < p.n_moves; i++) {
            if (p.moves[i].kind != RESIDENCY_PROMOTE) continue;
            int found = 0;
            for (int32_t j = 0; j < n; j++) found |= pred[j] == p.moves[i].expert;
            CHECK(found, "it %d: promoted %d not predicted", it, p.moves[i].expert);
            n_prom++;
        }
        CHECK(n_prom == n, "it %d: %d promoted, %d predicted", it, n_prom, n);
        CHECK(execute(&r, 0, &p), "execute");
    }
    residency_free(&r);
    r = make(1, 8, TIDE_POLICY_SWAP, b, 1);
    const int32_t h[8] = {1, 1, 1, 1, 0, 0, 0, 0};
    int32_t pred[8];
    CHECK(residency_predict_promotions(&r, 0, h, 1, 0, pred, 8) == 0, "swap: no prediction");
    residency_free(&r);
}

int main(void) {
    test_cpu();
    test_gpu();
    test_static_first_step();
    test_static_profile();
    test_swap();
    test_tide();
    test_predict();
    test_layers_and_switch();
    test_errors();
    test_random();
    return check_report("test_residency");
}

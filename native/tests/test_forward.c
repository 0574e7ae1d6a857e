/* test_forward.c: the whole native core through tide.h, for `make sanitize` (ASan + UBSan) and
 * `make test-native`: load a tiny converted GGUF, run logits / commit / step on the cpu backend
 * and on the simulated device under every policy, check sim == cpu bit for bit, the counters'
 * invariants, the error paths (bad arguments, context full, bad settings), and free everything;
 * and the same weights in llama.cpp's layout (merged experts, split attention, 32-byte
 * alignment: tide_cpp/convert/llama_layout.py) give the same outputs bit for bit.
 *
 * The GGUF is made by Python (tests/hf_checkpoint.py + tide_cpp/convert/): $TIDE_PYTHON, else
 * .venv/bin/python; without either the test is skipped (exit 0), but a Python that fails to
 * build it fails the test (a skip there would hide a broken converter). Numerics against the
 * PyTorch reference are tests/test_forward.py's job.
 */
#include "tide.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"

/* 0: made; 1: no Python (skip); -1: Python failed (a failure, not a skip). */
static int make_gguf(const char *path) {
    const char *py = getenv("TIDE_PYTHON");
    if (!py || !*py) py = access(".venv/bin/python", X_OK) == 0 ? ".venv/bin/python" : NULL;
    if (!py) return 1;
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "%s -c \"import sys, tempfile; sys.path[:0] = ['tests', '.']; "
             "import hf_checkpoint as h; from tide_cpp.convert import convert; "
             "d = tempfile.mkdtemp(); h.make_checkpoint(d, shape='wide', num_hidden_layers=4); "
             "convert(d, '%s', outtype='bf16', progress=False); import shutil; shutil.rmtree(d); "
             "from tide_cpp.convert.llama_layout import convert as to_llama; "
             "to_llama('%s', '%s.llama', split_attention=True, alignment=32)\"",
             py, path, path, path);
    return system(cmd) == 0 ? 0 : -1;
}

enum { N = 24, BL = 8 };

/* Logits of tokens, then commit of block 0 and a step of block 1: outputs into the arrays. */
static int run(tide_context *ctx, const int32_t *tok, float *logits, int32_t *step_tok,
               float *step_prob) {
    uint8_t want[BL];
    for (int i = 0; i < BL; i++) want[i] = (uint8_t)(i % 3 != 0);
    if (tide_logits(ctx, tok, N, 4, logits) != TIDE_OK) return -1;
    if (tide_commit(ctx, tok, BL) != TIDE_OK) return -1;
    for (int s = 0; s < 3; s++)
        if (tide_step(ctx, tok + BL, BL, want, s, NULL, step_tok + s * BL, step_prob + s * BL) != TIDE_OK)
            return -1;
    if (tide_commit(ctx, tok + BL, BL) != TIDE_OK) return -1;
    return 0;
}

int main(void) {
    char dir[] = "/tmp/tide_test_forward_XXXXXX";
    if (!mkdtemp(dir)) return 1;
    char path[256];
    snprintf(path, sizeof path, "%s/wide.gguf", dir);
    int made = make_gguf(path);
    if (made == 1) {
        printf("test_forward: SKIP (no Python to build the tiny GGUF)\n");
        return 0;
    }
    if (made != 0) {
        printf("test_forward: FAIL (building the tiny GGUF with Python failed)\n");
        return 1;
    }
    char err[512];
    tide_model *model = NULL;
    CHECK(tide_model_load("/nonexistent.gguf", &model, err, sizeof err) == TIDE_ERR_IO && !model,
          "%s", err);
    CHECK(tide_model_load(path, &model, err, sizeof err) == TIDE_OK, "%s", err);
    if (!model) return 1;
    tide_hparams hp;
    tide_model_hparams(model, &hp);
    CHECK(hp.n_expert == 16 && hp.n_embd == 128 && hp.n_layer == 4 && hp.expert_type == TIDE_TYPE_BF16,
          "hparams");
    const char *s;
    size_t len;
    CHECK(tide_model_meta_string(model, "tokenizer.chat_template", &s, &len) == TIDE_OK && len > 0,
          "chat template");
    CHECK(tide_model_meta_string(model, "no.such.key", &s, &len) == TIDE_ERR_ARG, "absent key");

    const int32_t V = hp.n_vocab, E = hp.n_expert, n_moe = hp.n_layer - hp.n_dense_lead;
    int32_t tok[N];
    for (int i = 0; i < N; i++) tok[i] = (i * 37 + 11) % (V - 20);
    float *ref_logits = malloc(sizeof(float) * N * V), *logits = malloc(sizeof(float) * N * V);
    int32_t ref_tok[3 * BL], step_tok[3 * BL];
    float ref_prob[3 * BL], step_prob[3 * BL];

    /* the cpu backend: the reference for the rest */
    tide_context_params p = tide_context_default_params();
    p.n_threads = 2;
    tide_context *ctx = NULL;
    CHECK(tide_context_create(model, &p, &ctx, err, sizeof err) == TIDE_OK, "%s", err);
    CHECK(run(ctx, tok, ref_logits, ref_tok, ref_prob) == 0, "%s", tide_context_error(ctx));
    CHECK(tide_n_past(ctx) == 2 * BL, "n_past %d", tide_n_past(ctx));
    for (int i = 0; i < BL; i++)
        CHECK((i % 3 == 0) == (ref_tok[i] == -1) && ref_prob[i] >= 0.0f && ref_prob[i] <= 1.0f,
              "step output %d", i);
    /* error paths: nothing changes, a message names the cause */
    int32_t bad[2] = {0, V};
    CHECK(tide_commit(ctx, bad, 2) == TIDE_ERR_ARG && strstr(tide_context_error(ctx), "vocabulary"),
          "%s", tide_context_error(ctx));
    CHECK(tide_logits(ctx, tok, 4, 0, logits) == TIDE_ERR_ARG, "block_length 0");
    tide_stats st;
    tide_get_stats(ctx, &st);
    CHECK(st.h2d_bytes == 0 && st.device_expert_tokens == 0 && st.weights_h2d_bytes == 0,
          "cpu moves nothing");
    CHECK(st.host_expert_tokens == st.tokens_forwarded * (uint64_t)hp.n_expert_used * n_moe,
          "every pair on the host");
    CHECK(st.steps == 3 && st.forwards == 6, "steps %llu forwards %llu",
          (unsigned long long)st.steps, (unsigned long long)st.forwards);
    CHECK(tide_last_hits(ctx, (int32_t *)logits, (size_t)n_moe * E) == TIDE_ERR_ARG, "no trace");
    tide_context_free(ctx);

    /* llama.cpp's layout: the same outputs on cpu, and on sim with experts copied from slices */
    {
        char lpath[300];
        snprintf(lpath, sizeof lpath, "%s.llama", path);
        tide_model *lm = NULL;
        CHECK(tide_model_load(lpath, &lm, err, sizeof err) == TIDE_OK, "%s", err);
        tide_hparams lhp;
        if (lm) tide_model_hparams(lm, &lhp);
        CHECK(lm && lhp.expert_bytes == hp.expert_bytes && lhp.nonexpert_bytes == hp.nonexpert_bytes,
              "llama layout: expert bytes");
        for (int dev = 0; lm && dev < 2; dev++) {
            tide_context_params lp = p;
            lp.device = dev ? TIDE_DEVICE_SIM : TIDE_DEVICE_CPU;
            lp.policy = dev ? TIDE_POLICY_TIDE : TIDE_POLICY_GPU;
            lp.budget = 3;
            tide_context *lc = NULL;
            CHECK(tide_context_create(lm, &lp, &lc, err, sizeof err) == TIDE_OK, "%s", err);
            if (!lc) continue;
            CHECK(run(lc, tok, logits, step_tok, step_prob) == 0, "%s", tide_context_error(lc));
            CHECK(memcmp(logits, ref_logits, sizeof(float) * N * V) == 0 &&
                      memcmp(step_tok, ref_tok, sizeof step_tok) == 0 &&
                      memcmp(step_prob, ref_prob, sizeof step_prob) == 0,
                  "llama layout on %s: outputs differ", dev ? "sim" : "cpu");
            tide_context_free(lc);
        }
        tide_model_free(lm);
        unlink(lpath);
    }

    /* bad settings */
    int32_t budgets[3] = {1, 2, 3};
    tide_context_params q = p;
    q.budget = -1;
    CHECK(tide_context_create(model, &q, &ctx, err, sizeof err) == TIDE_ERR_ARG && !ctx &&
              strstr(err, "budget"), "%s", err);
    q = p;
    q.policy = 9;
    CHECK(tide_context_create(model, &q, &ctx, err, sizeof err) == TIDE_ERR_ARG && strstr(err, "policy"),
          "%s", err);
    q = p;
    q.refresh_interval = 0;
    CHECK(tide_context_create(model, &q, &ctx, err, sizeof err) == TIDE_ERR_ARG &&
              strstr(err, "refresh_interval"), "%s", err);
    q = p;
    q.budgets = budgets;
    q.n_budgets = 2; /* the model has 3 MoE layers */
    CHECK(tide_context_create(model, &q, &ctx, err, sizeof err) == TIDE_ERR_ARG && strstr(err, "budgets"),
          "%s", err);
    q = p;
    q.n_ctx = 12;
    CHECK(tide_context_create(model, &q, &ctx, err, sizeof err) == TIDE_OK, "%s", err);
    CHECK(tide_logits(ctx, tok, N, 4, logits) == TIDE_ERR_CONTEXT &&
              strstr(tide_context_error(ctx), "n_ctx 12"), "%s", tide_context_error(ctx));
    tide_context_free(ctx);
    q = p;
    q.device = TIDE_DEVICE_SIM;
    q.device_memory = 4096;
    CHECK(tide_context_create(model, &q, &ctx, err, sizeof err) == TIDE_ERR_DEVICE && !ctx &&
              strstr(err, "out of memory"), "%s", err);

    /* the simulated device under every policy: bit-identical to cpu (the last case: tide with
     * 2 prefetch buffers per layer) */
    const int policies[] = {TIDE_POLICY_GPU, TIDE_POLICY_CPU, TIDE_POLICY_STATIC, TIDE_POLICY_SWAP,
                            TIDE_POLICY_TIDE, TIDE_POLICY_TIDE};
    const int budget_list[] = {0, 1, 3, 16};
    for (size_t pi = 0; pi < 6; pi++) {
        for (size_t bi = 0; bi < 4; bi++) {
            q = p;
            q.device = TIDE_DEVICE_SIM;
            q.policy = policies[pi];
            q.budget = budget_list[bi];
            q.refresh_interval = 2;
            q.trace = 1;
            q.prefetch = pi == 5 ? 2 : 0;
            ctx = NULL;
            CHECK(tide_context_create(model, &q, &ctx, err, sizeof err) == TIDE_OK, "%s", err);
            if (!ctx) continue;
            CHECK(run(ctx, tok, logits, step_tok, step_prob) == 0, "%s", tide_context_error(ctx));
            CHECK(memcmp(logits, ref_logits, sizeof(float) * N * V) == 0, "logits, policy %d B %d",
                  policies[pi], budget_list[bi]);
            CHECK(memcmp(step_tok, ref_tok, sizeof step_tok) == 0 &&
                      memcmp(step_prob, ref_prob, sizeof step_prob) == 0,
                  "steps, policy %d B %d", policies[pi], budget_list[bi]);
            tide_get_stats(ctx, &st);
            CHECK(st.device_expert_tokens + st.host_expert_tokens ==
                      st.tokens_forwarded * (uint64_t)hp.n_expert_used * n_moe, "pairs");
            CHECK(st.h2d_bytes == st.experts_promoted * hp.expert_bytes, "h2d bytes");
            if (pi == 5 && budget_list[bi] > 0)
                CHECK(st.prefetch_bytes > 0, "prefetch ran, B %d", budget_list[bi]);
            int32_t *hits = malloc(sizeof(int32_t) * n_moe * E);
            CHECK(tide_last_hits(ctx, hits, (size_t)n_moe * E) == TIDE_OK, "hits");
            int64_t sum = 0;
            for (int i = 0; i < n_moe * E; i++) sum += hits[i];
            CHECK(sum == (int64_t)BL * hp.n_expert_used * n_moe, "hits of the last commit %lld",
                  (long long)sum);
            free(hits);
            uint8_t res[16];
            tide_layer_stats ls;
            CHECK(tide_resident(ctx, 0, res, 16) == TIDE_OK, "resident");
            CHECK(tide_get_layer_stats(ctx, 0, &ls) == TIDE_OK, "layer stats");
            int n_res = 0;
            for (int e = 0; e < 16; e++) n_res += res[e];
            CHECK(n_res == ls.resident && ls.resident <= ls.budget, "resident %d/%d/%d", n_res,
                  ls.resident, ls.budget);
            if (policies[pi] == TIDE_POLICY_GPU)
                CHECK(st.experts_promoted == (uint64_t)E * n_moe && st.host_expert_tokens == 0, "gpu");
            /* switch the policy on the fly, then a popularity profile */
            CHECK(tide_set_residency(ctx, TIDE_POLICY_SWAP, 2, NULL, 0, 1) == TIDE_OK, "%s",
                  tide_context_error(ctx));
            CHECK(tide_set_residency(ctx, TIDE_POLICY_TIDE, 0, budgets, 2, 1) == TIDE_ERR_ARG,
                  "budgets length");
            float pop[48] = {0}; /* 3 MoE layers x 16 experts; layer 0 gets a profile */
            pop[3] = 2.0f;
            pop[9] = 1.0f;
            CHECK(tide_set_residency(ctx, TIDE_POLICY_STATIC, 1, NULL, 0, 1) == TIDE_OK, "static");
            CHECK(tide_set_popularity(ctx, pop, 48) == TIDE_OK, "%s", tide_context_error(ctx));
            CHECK(tide_resident(ctx, 0, res, 16) == TIDE_OK && res[3] == 1 && res[9] == 0, "profile");
            CHECK(tide_set_popularity(ctx, pop, 47) == TIDE_ERR_ARG, "popularity size");
            tide_reset(ctx);
            CHECK(run(ctx, tok, logits, step_tok, step_prob) == 0, "%s", tide_context_error(ctx));
            CHECK(memcmp(step_tok, ref_tok, sizeof step_tok) == 0, "steps after the switches");
            tide_stats_reset(ctx);
            tide_get_stats(ctx, &st);
            CHECK(st.forwards == 0 && st.experts_promoted == 0, "reset");
            tide_context_free(ctx);
        }
    }
    /* a gpu policy that cannot fit is refused with a message */
    q = p;
    q.device = TIDE_DEVICE_SIM;
    q.policy = TIDE_POLICY_GPU;
    q.n_ctx = 64;
    q.device_memory = (uint64_t)hp.nonexpert_bytes + 16 * hp.expert_bytes / 2;
    ctx = NULL;
    CHECK(tide_context_create(model, &q, &ctx, err, sizeof err) == TIDE_ERR_DEVICE && !ctx, "%s", err);
    CHECK(tide_cuda_available(err, sizeof err) == 0 || 1, "cuda query");

    free(ref_logits);
    free(logits);
    tide_model_free(model);
    unlink(path);
    rmdir(dir);
    return check_report("test_forward");
}

/* model.h: where every value of a running LLaDA2.0 model lives, at a glance (calm's model.h).
 *
 *   tide_model    the mmapped GGUF, its hyperparameters, and views of every tensor (host memory)
 *   tide_weights  the same tensors as the backend computes with them ("device" copies; on the cpu
 *                 backend the views themselves); routed experts stay in the host mapping
 *   tide_run      the activations of one forward, on the device, sized for up to `cap` tokens
 *   tide_moe_state the per-MoE-layer residency: slots on the device, the resident set, counters
 *   tide_context  all of the above for one backend, plus the KV cache, stats and the trace
 */
#ifndef TIDE_MODEL_H
#define TIDE_MODEL_H

#include "backend/backend.h"
#include "common.h"
#include "gguf.h"
#include "residency.h"
#include "threadpool.h"
#include "tide.h"

#include <stdint.h>

/* ---- weights: one pointer per tensor, per layer arrays ------------------------------------- */
typedef struct {
    /* attention */
    const float *attn_norm;     /* [H] input_layernorm */
    tide_matrix wq, wk, wv;     /* [nQ*hd, H], [nKV*hd, H], [nKV*hd, H]: row ranges of attn_qkv,
                                   or attn_q, attn_k, attn_v */
    const float *q_norm;        /* [hd] (NULL when !qk_norm) */
    const float *k_norm;        /* [hd] */
    tide_matrix wo;             /* attn_output [H, nQ*hd] */
    const float *ffn_norm;      /* [H] post_attention_layernorm */
    /* dense MLP (layers < n_dense_lead) */
    tide_matrix ffn_gate, ffn_up, ffn_down; /* [n_ff, H], [n_ff, H], [H, n_ff] */
    /* MoE (layers >= n_dense_lead) */
    tide_matrix router;         /* ffn_gate_inp [E, H], f32 */
    const float *router_bias;   /* exp_probs_b [E] */
    tide_matrix shexp_gate, shexp_up, shexp_down; /* shared experts; rows 0 when none */
    /* routed experts, always host views into the mapping: [n_expert] each; one tensor per
     * expert matrix, or slice e of the merged ffn_{gate,up,down}_exps (the same views) */
    tide_matrix *exp_gate, *exp_up, *exp_down;
} tide_layer_weights;

typedef struct {
    tide_matrix token_embd;     /* [vocab, H] (host: the lookup runs on the host) */
    const float *output_norm;   /* [H] */
    tide_matrix output;         /* lm_head [vocab, H] */
    tide_layer_weights *layers; /* [n_layer] */
} tide_weights;

struct tide_model {
    gguf_file *gguf;
    tide_hparams hp;
    tide_weights w;             /* views into the mapping */
    int32_t n_moe;              /* MoE layers: n_layer - n_dense_lead */
    /* per MoE layer: the host range that holds all its experts, per-expert or merged tensors
     * (pinned once per context) */
    const void **expert_range;  /* [n_moe] */
    size_t *expert_range_bytes; /* [n_moe] */
};

/* model.c: parse and validate; on failure err names the cause. */
tide_status tide_model_open(const char *path, tide_model **out, char *err, size_t err_len);
void tide_model_close(tide_model *model);

/* What a forward is for: the residency policy refreshes on steps only, and the trace records it
 * (CONTRACTS.md section 4 uses the same numbers). */
typedef enum {
    TIDE_FORWARD_STEP = 0,   /* tide_step: the active block against the cache */
    TIDE_FORWARD_COMMIT = 1, /* tide_commit: a finished block appended to the cache */
    TIDE_FORWARD_LOGITS = 2, /* tide_logits: a whole sequence from position 0 */
} tide_forward_kind;

/* ---- run state: every activation buffer, named for what it holds (device memory) ----------- */
typedef struct {
    int32_t cap;                /* rows every buffer below holds */
    float *x;                   /* [cap, H] the residual stream */
    float *xb;                  /* [cap, H] normed input of the current sublayer */
    float *xb2;                 /* [cap, H] output of the current sublayer */
    float *q;                   /* [cap, nQ*hd] */
    float *att;                 /* [cap, nQ*hd] attention output before wo */
    float *hb, *hb2;            /* [cap, max(n_ff, shared rows)] MLP hidden */
    float *router_logits;       /* [cap, E] */
    float *pairs;               /* [cap * n_used, H] routed expert outputs (device pair buffer); */
    float *pairs_from_host;     /* [cap * n_used, H] right after it: host outputs, packed, uploaded */
    float *pairs_cat;           /* [cap * n_used, H] both merged in pair order (gather_rows) */
    float *logits;              /* [logits_cap, vocab] */
    int32_t logits_cap;
    /* host memory */
    float *host_x;              /* [cap, H] host copy of the MoE input (host experts read it) */
    float *host_pairs;          /* [cap * n_used, H] host pair buffer (packed unless the backend
                                   computes in host memory) */
    int32_t *host_gather;       /* [cap * n_used] source row of each pair for pairs_cat */
    float *host_router;         /* [cap, E] router logits, downloaded */
    int32_t *host_ids;          /* [cap * n_used] chosen experts, k order */
    float *host_w;              /* [cap * n_used] their weights */
    int32_t *host_rows;         /* [cap] scratch row list (wanted rows) */
    float *host_logits;         /* [logits_cap, vocab] host logits for sampling */
    int32_t host_logits_cap;
} tide_run;

/* ---- per MoE layer: residency and its counters --------------------------------------------- */
typedef struct {
    int32_t budget;             /* slots */
    void *slot_mem;             /* device memory of `budget` slots, slot_bytes each */
    size_t slot_bytes;          /* gate + up + down of one expert, each row_bytes aligned */
    tide_matrix *slot_gate, *slot_up, *slot_down; /* [budget] views into slot_mem */
    /* prefetch buffers (tide, params.prefetch > 0): slot-sized device memory that a refresh's
     * predicted promotions are copied into ahead of the layer; a promotion that finds its
     * expert there swaps the buffer with its slot instead of copying */
    int32_t n_prefetch;
    void *prefetch_mem;
    tide_matrix *pf_gate, *pf_up, *pf_down; /* [n_prefetch] */
    int32_t *pf_expert;         /* [n_prefetch] expert copied into buffer p, -1: none */
    int32_t *hits;              /* [n_expert] H of the current forward (of the last, until the
                                   router of this one has run) */
    int32_t *last_hits;         /* [n_expert] H of the last forward (trace) */
    tide_layer_stats st;        /* timers here; counters come from the residency module */
} tide_moe_layer;

/* The work lists moe.c builds per layer (host memory, sized once): the pairs of experts computed
 * on the device (_dev) and on the host (_host), grouped by expert. */
typedef struct {
    int32_t *pair_start_dev, *pair_token_dev, *pair_dest_dev;
    int32_t *pair_start_host, *pair_token_host, *pair_dest_host;
    tide_matrix *gate_dev, *up_dev, *down_dev, *gate_host, *up_host, *down_host; /* [n_expert] */
    int32_t *cursor;            /* [n_expert] */
    int32_t *job_of;            /* [n_expert] device job index of an expert, -1: host */
    uint8_t *served;            /* [n_expert] promotions served by a prefetch buffer */
    int32_t *predicted;         /* [n_expert] prefetch: predicted promotions */
    int32_t cap_pairs;
} tide_moe_work;

struct tide_context {
    const tide_model *model;
    tide_context_params params;
    tide_backend *be;
    tide_pool *pool;
    int on_host;                /* backend memory is host memory read directly (cpu backend) */
    tide_weights w;             /* weights where the backend reads them */
    void **owned;               /* device copies to free */
    int32_t n_owned;
    /* KV cache, per layer [n_ctx, nKV*hd] of cache_type on the device */
    int32_t n_ctx, n_past;
    void **k_cache, **v_cache;  /* rows of cache_type (f32, f16 or bf16) */
    int32_t cache_type;
    int32_t *tokens;            /* [n_ctx] the token ids behind cache rows 0 .. n_past-1 (host) */
    int32_t cache_block;        /* the block length every cached row was committed under; 0:
                                   empty, -1: mixed (tide_cache_block_length) */
    tide_run run;
    /* residency */
    int32_t policy;             /* tide_policy in force (cpu on the cpu backend) */
    tide_residency res;         /* residency.h: who is in which slot, policy state, counters */
    int res_ready;
    tide_moe_layer *moe;        /* [n_moe] */
    tide_moe_work work;
    /* counters */
    tide_stats st;
    char err[512];
};

/* Record a formatted message on the context and return st. */
#define ctx_fail(ctx, st, ...) tide_errf((ctx)->err, sizeof (ctx)->err, (st), __VA_ARGS__)

/* st unchanged; when it is an error, the backend's message (prefixed by `what`) goes on the
 * context. Used as TRY(be_check(ctx, op->matmul(...), "q")). */
static inline tide_status be_check(tide_context *ctx, tide_status st, const char *what) {
    if (st == TIDE_OK) return TIDE_OK;
    return ctx_fail(ctx, st, "%s: %s", what, ctx->be->err[0] ? ctx->be->err : "backend error");
}

/* forward.c: one forward of n tokens at positions n_past.. against the cache; writes K/V rows
 * n_past..n_past+n-1. want_rows (n_want of them) select rows for lm_head; logits of the wanted
 * rows land in run.logits [n_want, vocab]. step_in_block for steps (else -1). */
tide_status tide_forward(tide_context *ctx, const int32_t *tokens, int32_t n, int32_t block_length,
                         tide_forward_kind kind, int32_t step_in_block, const int32_t *want_rows,
                         int32_t n_want);
/* The head of a step: token and probability of each of the n_want rows of run.logits, greedy
 * through the backend or sampled on the host, into out_token[rows[j]] / out_prob[rows[j]]. */
tide_status tide_forward_head(tide_context *ctx, int32_t n_want, const int32_t *rows,
                              const tide_sampling *s, int32_t *out_token, float *out_prob);
/* Grow the run buffers to n token rows and n_logits rows of logits (never shrunk). */
tide_status tide_run_reserve(tide_context *ctx, int32_t n, int32_t n_logits);
void tide_run_free(tide_context *ctx);

/* context.c: a context over a model with checked parameters (api.c checks them); the caller's
 * err buffer gets the cause of a failure. */
tide_status tide_context_open(const tide_model *model, const tide_context_params *p,
                              const int32_t *budgets, tide_context **out, char *err,
                              size_t err_len);
void tide_context_close(tide_context *ctx);
/* Bytes of the KV cache (every layer, keys and values, n_ctx tokens). */
uint64_t tide_context_cache_bytes(const tide_context *ctx);

/* state.c: the cache (ids, keys, values) to and from a file; format and checks there. */
tide_status tide_state_write(tide_context *ctx, const char *path);
tide_status tide_state_read(tide_context *ctx, const char *path);

#endif /* TIDE_MODEL_H */

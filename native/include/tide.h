/* tide.h: the public C API of tide.cpp, the whole contract between the native core and Python.
 *
 * A tide_model is a mmapped, validated GGUF (weights, hyperparameters, tokenizer metadata).
 * A tide_context runs it: a backend (CPU, simulated device, CUDA), the KV cache of finished
 * blocks, the expert residency of every MoE layer, counters. Every function that can fail returns
 * a tide_status; the message of the last error is kept on the context (tide_context_error) or
 * written into the caller's buffer for calls that have no context yet. Nothing here aborts.
 * No global state: everything lives in these two objects.
 */
#ifndef TIDE_H
#define TIDE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define TIDE_API __declspec(dllexport)
#else
#define TIDE_API __attribute__((visibility("default")))
#endif

#define TIDE_ABI_VERSION 4

typedef enum {
    TIDE_OK = 0,
    TIDE_ERR_IO = 1,          /* file missing, unreadable, mmap failed */
    TIDE_ERR_FORMAT = 2,      /* not a valid GGUF, or a value out of bounds */
    TIDE_ERR_MODEL = 3,       /* valid GGUF but not a usable llada2 model (key, tensor, shape) */
    TIDE_ERR_ARG = 4,         /* bad argument from the caller */
    TIDE_ERR_NOMEM = 5,       /* host allocation failed */
    TIDE_ERR_DEVICE = 6,      /* device missing, device error, device out of memory */
    TIDE_ERR_UNSUPPORTED = 7, /* built without this feature (e.g. CUDA) */
    TIDE_ERR_CONTEXT = 8,     /* sequence longer than the context */
} tide_status;

/* Weight types, numbered as ggml's so GGUF type ids pass through unchanged. */
typedef enum {
    TIDE_TYPE_F32 = 0,
    TIDE_TYPE_F16 = 1,
    TIDE_TYPE_Q4_0 = 2,  /* ggml's block layouts, byte for byte (native/src/backend/blocks.h) */
    TIDE_TYPE_Q8_0 = 8,
    TIDE_TYPE_Q4_K = 12,
    TIDE_TYPE_Q5_K = 13,
    TIDE_TYPE_Q6_K = 14,
    TIDE_TYPE_BF16 = 30,
} tide_type;

typedef enum {
    TIDE_DEVICE_CPU = 0,  /* no device: everything on the host */
    TIDE_DEVICE_SIM = 1,  /* simulated device over host memory, same kernels: tests anywhere */
    TIDE_DEVICE_CUDA = 2, /* an NVIDIA GPU */
} tide_device;

typedef enum {
    TIDE_POLICY_GPU = 0,    /* every routed expert resident */
    TIDE_POLICY_CPU = 1,    /* no routed expert resident */
    TIDE_POLICY_STATIC = 2, /* fixed set: popularity profile, else the first step's routing */
    TIDE_POLICY_SWAP = 3,   /* every needed expert brought in before use, LRU out */
    TIDE_POLICY_TIDE = 4,   /* top-B by hits at step 0 of a block and every refresh_interval steps */
} tide_policy;

typedef struct tide_model tide_model;
typedef struct tide_context tide_context;
typedef struct tide_residency tide_residency;

/* Hyperparameters as read from the GGUF (llada2.* keys). */
typedef struct {
    int32_t n_layer, n_embd, n_ff, n_ff_exp;
    int32_t n_expert, n_expert_used, n_expert_shared, n_expert_groups, n_group_used;
    int32_t n_dense_lead; /* leading dense blocks; MoE layers are n_dense_lead .. n_layer-1 */
    int32_t n_head, n_head_kv, head_dim, rope_dim;
    int32_t n_ctx_train, n_vocab;
    int32_t qk_norm;          /* 1: per-head RMSNorm on Q and K before RoPE */
    int32_t expert_weights_norm;
    float expert_weights_scale, rms_eps, rope_theta;
    int32_t bos_id, eos_id, pad_id, mask_id;
    int32_t expert_type;      /* tide_type of the routed experts' ffn_gate (up, down may differ) */
    uint64_t expert_bytes;    /* bytes of one routed expert (gate + up + down) */
    uint64_t nonexpert_bytes; /* bytes of every tensor that is not a routed expert */
} tide_hparams;

typedef struct {
    int32_t device;           /* tide_device */
    int32_t n_threads;        /* host threads; <= 0: all cores */
    int32_t n_ctx;            /* KV cache length in tokens; refused (naming the bytes needed and
                                 free) when its cache does not fit in the free memory. <= 0: the
                                 model's own (n_ctx_train), lowered in steps of 256 to what fits
                                 in half of the free memory (tide_n_ctx tells) */
    int32_t policy;           /* tide_policy */
    int32_t budget;           /* resident expert slots per MoE layer (when budgets == NULL) */
    const int32_t *budgets;   /* optional: one budget per MoE layer, n_budgets entries */
    int32_t n_budgets;
    int32_t refresh_interval; /* tide: refresh every this many steps (>= 1) */
    int32_t trace;            /* 1: keep the hits of the last forward for tide_last_hits */
    uint64_t device_memory;   /* bytes the engine may use on the device; 0: free memory - reserve */
    int32_t cuda_device;      /* CUDA device ordinal */
    int32_t prefetch;         /* tide: experts per MoE layer copied ahead of a refresh, chosen
                                 from the layer's previous hits, while the layers before it
                                 compute (0: off). Changes where bytes move, never the result. */
    int32_t n_batch;          /* rows per forward of a multi-block commit (a prefill micro-batch,
                                 rounded to whole blocks); <= 0: 512 */
    int32_t cache_type;       /* tide_type of the KV cache: TIDE_TYPE_F32 (0, the default: exact),
                                 TIDE_TYPE_F16 or TIDE_TYPE_BF16 (half the memory; keys and values
                                 rounded when stored, so results change in the last bits) */
} tide_context_params;

/* Sampling of one step: temperature 0 with top_k <= 0 and top_p >= 1 is greedy. */
typedef struct {
    float temperature;
    int32_t top_k;   /* <= 0: off */
    float top_p;     /* >= 1: off */
    uint64_t seed;   /* draws are a pure function of (seed, position in the block) */
} tide_sampling;

/* Counters, exact. Totals since the context was made (or tide_stats_reset). */
typedef struct {
    uint64_t forwards;          /* every forward: steps + commits + logits calls */
    uint64_t steps;             /* tide_step calls */
    uint64_t tokens_forwarded;  /* token rows through the layers */
    uint64_t h2d_bytes;         /* routed-expert bytes copied host -> device */
    uint64_t weights_h2d_bytes; /* non-expert weights copied to the device once at start */
    uint64_t experts_promoted, experts_demoted;
    uint64_t device_expert_tokens; /* token-expert pairs computed on the device */
    uint64_t host_expert_tokens;   /* token-expert pairs computed on the host */
    double t_total, t_attention, t_dense, t_router, t_device_experts, t_host_experts,
        t_transfer_wait, t_lm_head; /* seconds */
    /* prefetch (params.prefetch): bytes copied ahead, and promotions they served (counted in
     * experts_promoted and h2d_bytes as well, which stay the residency's own counts) */
    uint64_t prefetch_bytes, prefetch_used;
} tide_stats;

typedef struct {
    uint64_t h2d_bytes, experts_promoted, experts_demoted;
    uint64_t device_expert_tokens, host_expert_tokens;
    int32_t budget, resident; /* slots, experts resident now */
    double t_device_experts, t_host_experts, t_transfer_wait;
    uint64_t prefetch_bytes, prefetch_used;
} tide_layer_stats;

/* ---- model -------------------------------------------------------------------------------- */
TIDE_API int tide_abi_version(void);
/* mmap and validate a GGUF; on failure *out = NULL and err holds the cause. */
TIDE_API tide_status tide_model_load(const char *path, tide_model **out, char *err, size_t err_len);
TIDE_API void tide_model_free(tide_model *model);
TIDE_API void tide_model_hparams(const tide_model *model, tide_hparams *out);
/* A string metadata value (tokenizer.huggingface.json, tokenizer.chat_template, ...), not
 * NUL-terminated: *out points into the mapping. TIDE_ERR_ARG when absent or not a string. */
TIDE_API tide_status tide_model_meta_string(const tide_model *model, const char *key,
                                            const char **out, size_t *len);

/* ---- context ------------------------------------------------------------------------------ */
TIDE_API tide_context_params tide_context_default_params(void);
TIDE_API tide_status tide_context_create(const tide_model *model, const tide_context_params *params,
                                         tide_context **out, char *err, size_t err_len);
TIDE_API void tide_context_free(tide_context *ctx);
/* Message of the last failed call on this context ("" if none). */
TIDE_API const char *tide_context_error(const tide_context *ctx);
/* 1 if this build has CUDA and a usable GPU is present; 0 otherwise (reason in err). */
TIDE_API int tide_cuda_available(char *err, size_t err_len);

/* Change policy, budgets and interval of a live context (the planner's `auto` uses it). */
TIDE_API tide_status tide_set_residency(tide_context *ctx, int32_t policy, int32_t budget,
                                        const int32_t *budgets, int32_t n_budgets,
                                        int32_t refresh_interval);
/* Popularity profile for `static`: counts[n_moe_layers * n_expert]; resident set = top-B. */
TIDE_API tide_status tide_set_popularity(tide_context *ctx, const float *counts, size_t n);

/* ---- the step interface -------------------------------------------------------------------- */
/* Forget the KV cache (n_past = 0). Residency and counters stay. */
TIDE_API void tide_reset(tide_context *ctx);
TIDE_API int32_t tide_n_past(const tide_context *ctx);
TIDE_API int32_t tide_n_ctx(const tide_context *ctx);
/* Bytes of the KV cache: keys and values of every layer for n_ctx tokens. */
TIDE_API uint64_t tide_cache_bytes(const tide_context *ctx);
/* Forward one finished block (all n tokens see each other and the cache) at positions
 * n_past .. n_past+n-1 and append its keys/values to the cache. Prefill is one call per block. */
TIDE_API tide_status tide_commit(tide_context *ctx, const int32_t *tokens, int32_t n);
/* Commit n tokens at n_past .. n_past+n-1 that span any number of blocks of block_length
 * (aligned at position 0): a token sees the cache, its own block and every earlier one. Runs as
 * micro-batches (tide_commit_batch_end), each one forward: one residency forward, one set of
 * hits. The keys and values written are bit-identical to one tide_commit per block. */
TIDE_API tide_status tide_commit_blocks(tide_context *ctx, const int32_t *tokens, int32_t n,
                                        int32_t block_length);
/* Tokens of the first micro-batch of a tide_commit_blocks of n tokens at n_past: the most whole
 * blocks that fit in params.n_batch rows (at least the first block; all n when they fit).
 * 0 on bad arguments. Callers that record each forward (the trace) commit batch by batch. */
TIDE_API int32_t tide_commit_batch_end(const tide_context *ctx, int32_t n, int32_t block_length);
/* Keep the first n cached tokens and forget the rest (n <= n_past): the cache of a common prefix
 * serves the next prompt. */
TIDE_API tide_status tide_truncate(tide_context *ctx, int32_t n);
/* The block length every cached row was committed under (a tide_commit of n tokens counts as
 * blocks of n): 0 when the cache is empty, -1 when commits mixed block lengths or started off a
 * block boundary. A prefix of the cache serves a new prompt only under the same block length. */
TIDE_API int32_t tide_cache_block_length(const tide_context *ctx);
/* The token ids behind the cache: out[0 .. n_past) (n >= n_past). */
TIDE_API tide_status tide_cache_tokens(const tide_context *ctx, int32_t *out, int32_t n);
/* Write the cache (token ids, keys, values of every layer) to path atomically (a temporary file
 * beside it, fsync, rename), or read it back: n_past and the cache become the file's. A file of
 * another model, build, cache type or a longer context is refused with the reason. */
TIDE_API tide_status tide_state_save(tide_context *ctx, const char *path);
TIDE_API tide_status tide_state_load(tide_context *ctx, const char *path);
/* Forward the active block against the cache without changing it. For each i with want[i] != 0,
 * out_token[i] / out_prob[i] get the sampled (or top) token and its probability; other entries
 * are -1 / 0. step_in_block (0-based) drives the residency policy's refresh. */
TIDE_API tide_status tide_step(tide_context *ctx, const int32_t *tokens, int32_t n,
                               const uint8_t *want, int32_t step_in_block,
                               const tide_sampling *sampling, int32_t *out_token, float *out_prob);
/* Full block-causal forward of tokens[0..n) from position 0 (blocks of block_length aligned at
 * 0; the last may be partial), all logits into out[n * n_vocab]. Clears the cache. For tests. */
TIDE_API tide_status tide_logits(tide_context *ctx, const int32_t *tokens, int32_t n,
                                 int32_t block_length, float *out);

/* ---- counters and trace ------------------------------------------------------------------- */
TIDE_API void tide_get_stats(const tide_context *ctx, tide_stats *out);
TIDE_API tide_status tide_get_layer_stats(const tide_context *ctx, int32_t moe_layer,
                                          tide_layer_stats *out);
TIDE_API void tide_stats_reset(tide_context *ctx);
/* Hits of the last forward: out[n_moe_layers * n_expert] token-expert pairs per expert.
 * Needs params.trace = 1. */
TIDE_API tide_status tide_last_hits(const tide_context *ctx, int32_t *out, size_t n);
/* Resident experts of a MoE layer now: out[n_expert] = 1 if resident. */
TIDE_API tide_status tide_resident(const tide_context *ctx, int32_t moe_layer, uint8_t *out,
                                   size_t n);

/* ---- the residency state machine --------------------------------------------------------- */
/* The expert residency policies of CONTRACTS.md section 3, the same code a context runs, on its
 * own: fed the hits of each forward (a routing trace), it makes the decisions and keeps the
 * counters a context would, without weights or device memory. tide_cpp/replay.py replays
 * traces through it. The object allocates what it needs when made and nothing after.
 *
 * Budgets: the slots a layer gets (and reports as `budget`) for a requested budget b >= 0 are
 * n_expert under gpu, 0 under cpu (it never fills a slot), min(b, n_expert) otherwise. */
typedef struct {
    int64_t promoted, demoted;            /* experts moved before this forward computed */
    int64_t device_pairs, host_pairs;     /* token-expert pairs on each side */
    int64_t device_experts, host_experts; /* distinct experts with pairs on each side */
} tide_residency_delta;

/* n_layers MoE layers of n_expert experts under `policy` with budgets[n_layers] (NULL: 0
 * each); refresh_interval >= 1. gpu promotes every expert here (counted). On failure *out =
 * NULL and err holds the cause. */
TIDE_API tide_status tide_residency_new(int32_t n_layers, int32_t n_expert, int32_t policy,
                                        const int32_t *budgets, int32_t n_budgets,
                                        int32_t refresh_interval, uint64_t expert_bytes,
                                        tide_residency **out, char *err, size_t err_len);
TIDE_API void tide_residency_free(tide_residency *r);
/* Message of the last failed call on r. */
TIDE_API const char *tide_residency_error(const tide_residency *r);
/* Switch policy, budgets and interval as tide_set_residency does: every resident expert is
 * demoted (counted) and the new policy starts from nothing resident. Counters are kept. */
TIDE_API tide_status tide_residency_set_policy(tide_residency *r, int32_t policy,
                                               const int32_t *budgets, int32_t n_budgets,
                                               int32_t refresh_interval);
/* Popularity profile for `static`, as tide_set_popularity: counts[n_layers * n_expert]. */
TIDE_API tide_status tide_residency_set_popularity(tide_residency *r, const float *counts,
                                                   size_t n);
/* One forward of every layer: hits[n_layers * n_expert] token-expert pairs per expert, kind
 * 0 step / 1 commit / 2 logits (CONTRACTS.md section 4), step_in_block for steps. out[n_layers]
 * (may be NULL) gets what this forward did in each layer. */
TIDE_API tide_status tide_residency_forward(tide_residency *r, const int32_t *hits, size_t n,
                                            int32_t kind, int32_t step_in_block,
                                            tide_residency_delta *out);
/* Counters of one layer since r was made (setup promotions included), its budget and how many
 * experts are resident now; the timers of tide_layer_stats stay 0. */
TIDE_API tide_status tide_residency_layer_stats(const tide_residency *r, int32_t layer,
                                                tide_layer_stats *out);
/* Resident experts of a layer now: out[n_expert] = 1 if resident. */
TIDE_API tide_status tide_residency_resident(const tide_residency *r, int32_t layer,
                                             uint8_t *out, size_t n);

/* ---- weight types and quantization --------------------------------------------------------- */
/* Bytes of one row of `cols` values of `type`; 0 for a type the engine does not compute or a
 * row that is not a whole number of its blocks (32 values for q8_0 / q4_0, 256 for k-quants). */
TIDE_API size_t tide_type_row_bytes(int32_t type, int64_t cols);
/* rows x cols values of src_type (f32, f16 or bf16, row-major) -> dst_type (any computable
 * type) in ggml's layout: the same bytes as ggml's reference quantizer (llama.cpp without an
 * importance matrix). dst holds dst_size >= rows * tide_type_row_bytes(dst_type, cols) bytes.
 * Threads split rows (n_threads <= 0: every CPU); the bytes never depend on the thread count. */
TIDE_API tide_status tide_quantize(int32_t dst_type, int32_t src_type, const void *src,
                                   int64_t rows, int64_t cols, void *dst, size_t dst_size,
                                   int32_t n_threads, char *err, size_t err_len);
/* rows x cols values of any computable type -> f32: the weights the kernels multiply with. */
TIDE_API tide_status tide_dequantize(int32_t type, const void *src, int64_t rows, int64_t cols,
                                     float *dst, size_t dst_count, char *err, size_t err_len);

#ifdef __cplusplus
}
#endif
#endif /* TIDE_H */

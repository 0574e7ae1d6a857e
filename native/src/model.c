/* model.c: GGUF -> a validated tide_model. Every llada2.* key is required and range-checked, and
 * every tensor's presence, type and shape is checked against the hyperparameters before anything
 * computes with it, so the forward pass can trust what it reads. */
#include "model.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- hyperparameters ------------------------------------------------------------------------ */

static tide_status get_i32(gguf_file *g, const char *key, int32_t *out, int32_t lo, int32_t hi,
                           char *err, size_t err_len) {
    uint32_t v;
    tide_status st = gguf_get_u32(g, key, &v, err, err_len);
    if (st != TIDE_OK) return st;
    if ((int64_t)v < lo || (int64_t)v > hi)
        return tide_errf(err, err_len, TIDE_ERR_MODEL, "key '%s' = %u, expected %d..%d", key, v, lo, hi);
    *out = (int32_t)v;
    return TIDE_OK;
}

static tide_status get_tok_id(gguf_file *g, const char *key, int32_t n_vocab, int required,
                              int32_t *out, char *err, size_t err_len) {
    *out = -1;
    if (!required && gguf_find_key(g, key) < 0) return TIDE_OK;
    return get_i32(g, key, out, 0, n_vocab - 1, err, err_len);
}

/* The llada2.* keys that a file may leave out, and what the engine assumes then.
 *
 * Every key the engine reads is spelled as llama.cpp spells it (llama-arch.cpp: block_count,
 * expert_group_count, attention.key_length, ...), so one name serves files of both writers. What
 * differs is presence: this project's converter writes every key, while llama.cpp's loader reads
 * the keys below as optional, and a file from llama.cpp's writer may lack them. An absent key
 * takes the value llama.cpp's loader assumes, so both engines read such a file alike.
 * `attention.qk_norm` is this project's own key (llama.cpp's graph always normalises Q and K):
 * absent, it follows the presence of the norm tensors. */
typedef enum {
    ABSENT_HEAD_DIM,      /* n_embd / n_head (llama.cpp's n_embd_head_k / _v) */
    ABSENT_KEY_LENGTH,    /* rope.dimension_count: the head's key length (llama.cpp's n_rot) */
    ABSENT_ONE,           /* expert groups: one group, so no group selection */
    ABSENT_ZERO,          /* nextn_predict_layers */
    ABSENT_FALSE,         /* expert_weights_norm */
    ABSENT_TOKEN_COUNT,   /* vocab_size: the entries of tokenizer.ggml.tokens */
    ABSENT_Q_NORM_TENSOR, /* attention.qk_norm: blk.0.attn_q_norm.weight is present */
} absent_rule;

static const struct {
    const char *key; /* after "llada2." */
    absent_rule rule;
} OPTIONAL_KEYS[] = {
    {"attention.key_length", ABSENT_HEAD_DIM},
    {"attention.value_length", ABSENT_HEAD_DIM},
    {"rope.dimension_count", ABSENT_KEY_LENGTH},
    {"expert_group_count", ABSENT_ONE},
    {"expert_group_used_count", ABSENT_ONE},
    {"nextn_predict_layers", ABSENT_ZERO},
    {"expert_weights_norm", ABSENT_FALSE},
    {"vocab_size", ABSENT_TOKEN_COUNT},
    {"attention.qk_norm", ABSENT_Q_NORM_TENSOR},
};

/* *present = 0 and *value = what stands in for `key` (without the prefix) when the file lacks it,
 * else *present = 1; a key outside OPTIONAL_KEYS is required. */
static tide_status absent_value(gguf_file *g, const tide_hparams *hp, const char *key,
                                int *present, int32_t *value, char *err, size_t err_len) {
    char full[96];
    snprintf(full, sizeof full, "llada2.%s", key);
    *present = gguf_find_key(g, full) >= 0;
    if (*present) return TIDE_OK;
    for (size_t i = 0; i < sizeof OPTIONAL_KEYS / sizeof OPTIONAL_KEYS[0]; i++) {
        if (strcmp(OPTIONAL_KEYS[i].key, key) != 0) continue;
        switch (OPTIONAL_KEYS[i].rule) {
        case ABSENT_HEAD_DIM:
            if (hp->n_embd % hp->n_head)
                return tide_errf(err, err_len, TIDE_ERR_MODEL,
                                 "key '%s' is absent and embedding_length %d is not a multiple of "
                                 "head_count %d", full, hp->n_embd, hp->n_head);
            *value = hp->n_embd / hp->n_head;
            return TIDE_OK;
        case ABSENT_KEY_LENGTH: *value = hp->head_dim; return TIDE_OK;
        case ABSENT_ONE: *value = 1; return TIDE_OK;
        case ABSENT_ZERO:
        case ABSENT_FALSE: *value = 0; return TIDE_OK;
        case ABSENT_TOKEN_COUNT: {
            int32_t et;
            uint64_t n;
            if (gguf_find_key(g, "tokenizer.ggml.tokens") < 0)
                return tide_errf(err, err_len, TIDE_ERR_MODEL,
                                 "key '%s' not found, nor tokenizer.ggml.tokens to count", full);
            TRY(gguf_get_arr_info(g, "tokenizer.ggml.tokens", &et, &n, err, err_len));
            if (n < 1 || n > (1u << 24))
                return tide_errf(err, err_len, TIDE_ERR_MODEL,
                                 "key '%s' is absent and tokenizer.ggml.tokens has %llu entries",
                                 full, (unsigned long long)n);
            *value = (int32_t)n;
            return TIDE_OK;
        }
        case ABSENT_Q_NORM_TENSOR:
            *value = gguf_find_tensor(g, "blk.0.attn_q_norm.weight") != NULL;
            return TIDE_OK;
        }
    }
    return tide_errf(err, err_len, TIDE_ERR_MODEL, "key '%s' not found", full);
}

/* An integer key in lo..hi, or its stand-in when absent (OPTIONAL_KEYS). */
static tide_status key_i32(gguf_file *g, const tide_hparams *hp, const char *key, int32_t *out,
                           int32_t lo, int32_t hi, char *err, size_t err_len) {
    int present;
    TRY(absent_value(g, hp, key, &present, out, err, err_len));
    if (!present) return TIDE_OK;
    char full[96];
    snprintf(full, sizeof full, "llada2.%s", key);
    return get_i32(g, full, out, lo, hi, err, err_len);
}

/* A boolean key, or its stand-in when absent (OPTIONAL_KEYS). */
static tide_status key_bool(gguf_file *g, const tide_hparams *hp, const char *key, int32_t *out,
                            char *err, size_t err_len) {
    int present;
    TRY(absent_value(g, hp, key, &present, out, err, err_len));
    if (!present) return TIDE_OK;
    char full[96];
    snprintf(full, sizeof full, "llada2.%s", key);
    return gguf_get_bool(g, full, out, err, err_len);
}

static tide_status read_hparams(gguf_file *g, tide_hparams *hp, char *err, size_t err_len) {
    const char *arch;
    size_t arch_len;
    tide_status st = gguf_get_str(g, "general.architecture", &arch, &arch_len, err, err_len);
    if (st != TIDE_OK) return st;
    if (arch_len != 6 || memcmp(arch, "llada2", 6) != 0)
        return tide_errf(err, err_len, TIDE_ERR_MODEL,
                    "general.architecture is '%.*s', expected 'llada2'", (int)(arch_len > 64 ? 64 : arch_len), arch);
    memset(hp, 0, sizeof *hp);
    const int32_t BIG = 1 << 24;
#define U(key, field, lo, hi) TRY(key_i32(g, hp, key, &hp->field, lo, hi, err, err_len))
    int32_t n_block, n_nextn;
    TRY(key_i32(g, hp, "block_count", &n_block, 1, 4096, err, err_len));
    /* multi-token-prediction layers come last in block_count; llama.cpp's graph skips them too */
    TRY(key_i32(g, hp, "nextn_predict_layers", &n_nextn, 0, n_block - 1, err, err_len));
    hp->n_layer = n_block - n_nextn;
    U("context_length", n_ctx_train, 1, BIG);
    U("embedding_length", n_embd, 1, BIG);
    U("feed_forward_length", n_ff, 0, BIG);
    U("expert_feed_forward_length", n_ff_exp, 1, BIG);
    U("expert_count", n_expert, 1, 65536);
    U("expert_used_count", n_expert_used, 1, hp->n_expert);
    U("expert_shared_count", n_expert_shared, 0, 64);
    U("expert_group_count", n_expert_groups, 1, hp->n_expert);
    U("expert_group_used_count", n_group_used, 1, hp->n_expert_groups);
    U("leading_dense_block_count", n_dense_lead, 0, hp->n_layer);
    U("attention.head_count", n_head, 1, 65536);
    U("attention.head_count_kv", n_head_kv, 1, hp->n_head);
    U("attention.key_length", head_dim, 2, 65536);
    int32_t v_len;
    TRY(key_i32(g, hp, "attention.value_length", &v_len, 1, 65536, err, err_len));
    U("rope.dimension_count", rope_dim, 0, hp->head_dim);
    U("vocab_size", n_vocab, 1, BIG);
    int32_t gating;
    TRY(key_i32(g, hp, "expert_gating_func", &gating, 0, 1000, err, err_len));
#undef U
    TRY(key_bool(g, hp, "expert_weights_norm", &hp->expert_weights_norm, err, err_len));
    TRY(key_bool(g, hp, "attention.qk_norm", &hp->qk_norm, err, err_len));
#define F(key, field)                                                               \
    do {                                                                            \
        st = gguf_get_f32(g, "llada2." key, &hp->field, err, err_len);              \
        if (st != TIDE_OK) return st;                                               \
    } while (0)
    F("expert_weights_scale", expert_weights_scale);
    F("attention.layer_norm_rms_epsilon", rms_eps);
    F("rope.freq_base", rope_theta);
#undef F
    /* relations between values */
    if (gating != 2)
        return tide_errf(err, err_len, TIDE_ERR_MODEL,
                    "key 'llada2.expert_gating_func' = %d: only 2 (sigmoid) is supported", gating);
    if (v_len != hp->head_dim)
        return tide_errf(err, err_len, TIDE_ERR_MODEL,
                    "key 'llada2.attention.value_length' = %d differs from key_length %d", v_len,
                    hp->head_dim);
    if (hp->n_head % hp->n_head_kv)
        return tide_errf(err, err_len, TIDE_ERR_MODEL,
                    "key 'llada2.attention.head_count' = %d is not a multiple of head_count_kv %d",
                    hp->n_head, hp->n_head_kv);
    if (hp->rope_dim % 2)
        return tide_errf(err, err_len, TIDE_ERR_MODEL, "key 'llada2.rope.dimension_count' = %d is odd",
                    hp->rope_dim);
    if (hp->n_expert % hp->n_expert_groups)
        return tide_errf(err, err_len, TIDE_ERR_MODEL,
                    "key 'llada2.expert_count' = %d is not a multiple of expert_group_count %d",
                    hp->n_expert, hp->n_expert_groups);
    if (hp->n_expert_used > hp->n_group_used * (hp->n_expert / hp->n_expert_groups))
        return tide_errf(err, err_len, TIDE_ERR_MODEL,
                    "key 'llada2.expert_used_count' = %d exceeds the experts of %d groups of %d",
                    hp->n_expert_used, hp->n_group_used, hp->n_expert / hp->n_expert_groups);
    if (hp->n_dense_lead > 0 && hp->n_ff < 1)
        return tide_errf(err, err_len, TIDE_ERR_MODEL,
                    "key 'llada2.feed_forward_length' = %d but there are %d dense layers", hp->n_ff,
                    hp->n_dense_lead);
    if (!(hp->rms_eps > 0.0f) || !(hp->rms_eps < 1.0f))
        return tide_errf(err, err_len, TIDE_ERR_MODEL,
                    "key 'llada2.attention.layer_norm_rms_epsilon' = %g out of (0, 1)", (double)hp->rms_eps);
    if (!(hp->rope_theta > 0.0f) || hp->rope_theta != hp->rope_theta)
        return tide_errf(err, err_len, TIDE_ERR_MODEL, "key 'llada2.rope.freq_base' = %g, expected > 0",
                    (double)hp->rope_theta);
    if (hp->expert_weights_scale != hp->expert_weights_scale)
        return tide_errf(err, err_len, TIDE_ERR_MODEL, "key 'llada2.expert_weights_scale' is NaN");
    /* tokenizer ids: EOS and mask drive generation; BOS and PAD are informative */
    st = get_tok_id(g, "tokenizer.ggml.eos_token_id", hp->n_vocab, 1, &hp->eos_id, err, err_len);
    if (st != TIDE_OK) return st;
    st = get_tok_id(g, "tokenizer.ggml.mask_token_id", hp->n_vocab, 1, &hp->mask_id, err, err_len);
    if (st != TIDE_OK) return st;
    st = get_tok_id(g, "tokenizer.ggml.bos_token_id", hp->n_vocab, 0, &hp->bos_id, err, err_len);
    if (st != TIDE_OK) return st;
    st = get_tok_id(g, "tokenizer.ggml.padding_token_id", hp->n_vocab, 0, &hp->pad_id, err, err_len);
    if (st != TIDE_OK) return st;
    return TIDE_OK;
}

/* ---- tensors -------------------------------------------------------------------------------- */

static const char *type_name(int32_t t) { return gguf_type_name(t); }

/* Look a tensor up and check it: 1-D f32 of ne0 (ne1 < 0), a matrix [ne0, ne1] (ne2 == 0), or a
 * stack of ne2 such matrices [ne0, ne1, ne2] (llama.cpp's merged experts), of a computable type
 * (only f32 when f32_only). The bytes of a matrix follow the one row rule, tide_row_bytes. */
static tide_status tensor(gguf_file *g, const char *name, int64_t ne0, int64_t ne1, int64_t ne2,
                          int f32_only, const gguf_tensor_info **out, char *err, size_t err_len) {
    const gguf_tensor_info *t = gguf_find_tensor(g, name);
    if (!t) return tide_errf(err, err_len, TIDE_ERR_MODEL, "tensor '%s' is missing", name);
    int want_dims = ne1 < 0 ? 1 : ne2 > 0 ? 3 : 2;
    int64_t want[3] = {ne0, ne1 < 0 ? 1 : ne1, ne2 > 0 ? ne2 : 1};
    int ok_shape = t->n_dims <= want_dims && t->ne[3] == 1;
    for (int d = 0; d < 3; d++) ok_shape = ok_shape && t->ne[d] == want[d];
    if (!ok_shape) {
        char got[96], exp[96];
        int n = 0, k = 0;
        for (int d = 0; d < t->n_dims; d++)
            n += snprintf(got + n, sizeof got - (size_t)n, "%s%lld", d ? ", " : "", (long long)t->ne[d]);
        for (int d = 0; d < want_dims; d++)
            k += snprintf(exp + k, sizeof exp - (size_t)k, "%s%lld", d ? ", " : "", (long long)want[d]);
        return tide_errf(err, err_len, TIDE_ERR_MODEL, "tensor '%s': shape [%s], expected [%s]", name,
                    got, exp);
    }
    int is_vec = want_dims == 1;
    if ((is_vec || f32_only) && t->type != TIDE_TYPE_F32)
        return tide_errf(err, err_len, TIDE_ERR_MODEL, "tensor '%s': type %s (%d), expected f32", name,
                    type_name(t->type), t->type);
    if (!is_vec) {
        int64_t block_elems;
        size_t block_bytes;
        tide_type_block(t->type, &block_elems, &block_bytes);
        if (block_elems == 0)
            return tide_errf(err, err_len, TIDE_ERR_MODEL,
                        "tensor '%s': type %s (%d) is not supported by this build (f32, f16, bf16, "
                        "q8_0, q4_0, q4_k, q5_k, q6_k)", name, type_name(t->type), t->type);
        size_t rb = tide_row_bytes(t->type, ne0);
        if (rb == 0)
            return tide_errf(err, err_len, TIDE_ERR_MODEL,
                        "tensor '%s': row length %lld is not a multiple of the %s block (%zu values)",
                        name, (long long)ne0, type_name(t->type), gguf_block_size(t->type));
        if ((uint64_t)rb * (uint64_t)want[1] * (uint64_t)want[2] != t->nbytes)
            return tide_errf(err, err_len, TIDE_ERR_MODEL,
                        "tensor '%s': %llu bytes do not make [%lld, %lld, %lld] of %s", name,
                        (unsigned long long)t->nbytes, (long long)ne0, (long long)want[1],
                        (long long)want[2], type_name(t->type));
    } else if (t->nbytes != (uint64_t)ne0 * 4) {
        return tide_errf(err, err_len, TIDE_ERR_MODEL, "tensor '%s': %llu bytes, expected %lld", name,
                    (unsigned long long)t->nbytes, (long long)ne0 * 4);
    }
    if (((uintptr_t)t->data & 3) != 0)
        return tide_errf(err, err_len, TIDE_ERR_MODEL, "tensor '%s': data not 4-byte aligned", name);
    *out = t;
    return TIDE_OK;
}

static tide_matrix as_matrix(const gguf_tensor_info *t) {
    tide_matrix m = {t->type, t->ne[1], t->ne[0], (size_t)t->nbytes, (void *)t->data};
    return m;
}

/* Rows [r0, r0 + n) of m: a contiguous byte range. */
static tide_matrix row_range(tide_matrix m, int64_t r0, int64_t n) {
    size_t rb = tide_row_bytes(m.type, m.cols);
    tide_matrix s = {m.type, n, m.cols, rb * (size_t)n, (char *)m.data + rb * (size_t)r0};
    return s;
}

/* Matrix e of a stack [cols, rows, n] (ggml order): rows * row_bytes bytes at e times that. */
static tide_matrix stack_slice(const gguf_tensor_info *t, int64_t e) {
    size_t bytes = tide_row_bytes(t->type, t->ne[0]) * (size_t)t->ne[1];
    tide_matrix s = {t->type, t->ne[1], t->ne[0], bytes, (char *)t->data + bytes * (size_t)e};
    return s;
}

void tide_model_close(tide_model *m) {
    if (!m) return;
    if (m->w.layers) {
        for (int32_t il = 0; il < m->hp.n_layer; il++) {
            free(m->w.layers[il].exp_gate);
            free(m->w.layers[il].exp_up);
            free(m->w.layers[il].exp_down);
        }
    }
    free(m->w.layers);
    free(m->expert_range);
    free(m->expert_range_bytes);
    gguf_close(m->gguf);
    free(m);
}

/* Binding tensors of one file: where messages go, and the running sum of non-expert bytes. */
typedef struct {
    gguf_file *g;
    char *err;
    size_t err_len;
    uint64_t nonexpert;
} binder;

/* The tensor named by fmt, checked by tensor() (ne1 < 0: a vector; ne2 > 0: a stack). */
static tide_status find(binder *b, int64_t ne0, int64_t ne1, int64_t ne2, int f32_only,
                        const gguf_tensor_info **t, const char *fmt, ...)
    __attribute__((format(printf, 7, 8)));
static tide_status find(binder *b, int64_t ne0, int64_t ne1, int64_t ne2, int f32_only,
                        const gguf_tensor_info **t, const char *fmt, ...) {
    char name[128];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    return tensor(b->g, name, ne0, ne1, ne2, f32_only, t, b->err, b->err_len);
}

/* Whether the tensor named by fmt is in the file (which of two layouts a layer uses). */
static int has(const binder *b, const char *fmt, int32_t il) __attribute__((format(printf, 2, 0)));
static int has(const binder *b, const char *fmt, int32_t il) {
    char name[128];
    snprintf(name, sizeof name, fmt, il);
    return gguf_find_tensor(b->g, name) != NULL;
}

#define MATRIX(out, ne0, ne1, f32_only, ...)                                                  \
    do {                                                                                      \
        const gguf_tensor_info *t_;                                                           \
        TRY(find(b, ne0, ne1, 0, f32_only, &t_, __VA_ARGS__));                                \
        (out) = as_matrix(t_);                                                                \
        b->nonexpert += t_->nbytes;                                                           \
    } while (0)
#define VECTOR(out, n, ...)                                                                   \
    do {                                                                                      \
        const gguf_tensor_info *t_;                                                           \
        TRY(find(b, n, -1, 0, 1, &t_, __VA_ARGS__));                                          \
        (out) = t_->data;                                                                     \
        b->nonexpert += t_->nbytes;                                                           \
    } while (0)

/* Attention tensors and the two norms of layer il. Q, K and V are one fused tensor attn_qkv
 * (its rows: the Q heads, the K heads, the V heads), or three tensors attn_q, attn_k, attn_v. */
static tide_status bind_attention(binder *b, const tide_hparams *hp, int32_t il,
                                  tide_layer_weights *L) {
    const int64_t H = hp->n_embd, hd = hp->head_dim;
    const int64_t nq = hp->n_head * hd, nkv = (int64_t)hp->n_head_kv * hd;
    VECTOR(L->attn_norm, H, "blk.%d.attn_norm.weight", il);
    if (has(b, "blk.%d.attn_qkv.weight", il) || !has(b, "blk.%d.attn_q.weight", il)) {
        tide_matrix qkv;
        MATRIX(qkv, H, nq + 2 * nkv, 0, "blk.%d.attn_qkv.weight", il);
        L->wq = row_range(qkv, 0, nq);
        L->wk = row_range(qkv, nq, nkv);
        L->wv = row_range(qkv, nq + nkv, nkv);
    } else {
        MATRIX(L->wq, H, nq, 0, "blk.%d.attn_q.weight", il);
        MATRIX(L->wk, H, nkv, 0, "blk.%d.attn_k.weight", il);
        MATRIX(L->wv, H, nkv, 0, "blk.%d.attn_v.weight", il);
    }
    if (hp->qk_norm) {
        VECTOR(L->q_norm, hd, "blk.%d.attn_q_norm.weight", il);
        VECTOR(L->k_norm, hd, "blk.%d.attn_k_norm.weight", il);
    }
    MATRIX(L->wo, nq, H, 0, "blk.%d.attn_output.weight", il);
    VECTOR(L->ffn_norm, H, "blk.%d.ffn_norm.weight", il);
    return TIDE_OK;
}

static tide_status bind_dense(binder *b, const tide_hparams *hp, int32_t il, tide_layer_weights *L) {
    const int64_t H = hp->n_embd;
    MATRIX(L->ffn_gate, H, hp->n_ff, 0, "blk.%d.ffn_gate.weight", il);
    MATRIX(L->ffn_up, H, hp->n_ff, 0, "blk.%d.ffn_up.weight", il);
    MATRIX(L->ffn_down, hp->n_ff, H, 0, "blk.%d.ffn_down.weight", il);
    return TIDE_OK;
}

/* Router and shared experts of MoE layer il (the routed experts: bind_experts). */
static tide_status bind_moe(binder *b, const tide_hparams *hp, int32_t il, tide_layer_weights *L) {
    const int64_t H = hp->n_embd, E = hp->n_expert;
    const int64_t fs = (int64_t)hp->n_ff_exp * hp->n_expert_shared;
    MATRIX(L->router, H, E, 1, "blk.%d.ffn_gate_inp.weight", il);
    VECTOR(L->router_bias, E, "blk.%d.exp_probs_b.bias", il);
    if (fs > 0) {
        MATRIX(L->shexp_gate, H, fs, 0, "blk.%d.ffn_gate_shexp.weight", il);
        MATRIX(L->shexp_up, H, fs, 0, "blk.%d.ffn_up_shexp.weight", il);
        MATRIX(L->shexp_down, fs, H, 0, "blk.%d.ffn_down_shexp.weight", il);
    }
    return TIDE_OK;
}

/* The three tensors of expert e of layer il: one tensor per matrix (this project's layout) or
 * slice e of the merged tensors ffn_{gate,up,down}_exps (llama.cpp's; merged != NULL). */
static tide_status expert_tensors(binder *b, const tide_hparams *hp, int32_t il, int64_t e,
                                  const gguf_tensor_info *const *merged,
                                  const gguf_tensor_info *ts[3], tide_matrix mx[3]) {
    const int64_t H = hp->n_embd, fe = hp->n_ff_exp;
    if (merged) {
        for (int k = 0; k < 3; k++) {
            ts[k] = merged[k];
            mx[k] = stack_slice(merged[k], e);
        }
        return TIDE_OK;
    }
    TRY(find(b, H, fe, 0, 0, &ts[0], "blk.%d.ffn_gate.%lld.weight", il, (long long)e));
    TRY(find(b, H, fe, 0, 0, &ts[1], "blk.%d.ffn_up.%lld.weight", il, (long long)e));
    TRY(find(b, fe, H, 0, 0, &ts[2], "blk.%d.ffn_down.%lld.weight", il, (long long)e));
    for (int k = 0; k < 3; k++) mx[k] = as_matrix(ts[k]);
    return TIDE_OK;
}

/* The routed experts of MoE layer il, as the same per-expert views whichever the layout. down may
 * differ in type from gate and up (a quantization mix keeps ffn_down finer), but each of the three
 * has one type for every expert of every layer (expert_type[3], -1 until the first), so all
 * experts have the same bytes (*expert_bytes: one slot size for the residency); and the host range
 * that holds them all (the three merged tensors, or every expert tensor). */
static tide_status bind_experts(binder *b, tide_model *m, int32_t il, int32_t *expert_type,
                                uint64_t *expert_bytes) {
    const tide_hparams *hp = &m->hp;
    tide_layer_weights *L = &m->w.layers[il];
    const int64_t H = hp->n_embd, E = hp->n_expert, fe = hp->n_ff_exp;
    L->exp_gate = calloc((size_t)E, sizeof(tide_matrix));
    L->exp_up = calloc((size_t)E, sizeof(tide_matrix));
    L->exp_down = calloc((size_t)E, sizeof(tide_matrix));
    if (!L->exp_gate || !L->exp_up || !L->exp_down)
        return tide_errf(b->err, b->err_len, TIDE_ERR_NOMEM, "out of memory");
    const gguf_tensor_info *merged[3] = {NULL, NULL, NULL};
    if (has(b, "blk.%d.ffn_gate_exps.weight", il)) {
        TRY(find(b, H, fe, E, 0, &merged[0], "blk.%d.ffn_gate_exps.weight", il));
        TRY(find(b, H, fe, E, 0, &merged[1], "blk.%d.ffn_up_exps.weight", il));
        TRY(find(b, fe, H, E, 0, &merged[2], "blk.%d.ffn_down_exps.weight", il));
    }
    const char *lo = NULL, *hi = NULL;
    for (int64_t e = 0; e < E; e++) {
        const gguf_tensor_info *ts[3];
        tide_matrix mx[3];
        TRY(expert_tensors(b, hp, il, e, merged[0] ? merged : NULL, ts, mx));
        if (ts[1]->type != ts[0]->type)
            return tide_errf(b->err, b->err_len, TIDE_ERR_MODEL,
                             "tensor '%s': type %s, but its expert's ffn_gate is %s (gate and up "
                             "of an expert must have one type)", ts[1]->name,
                             type_name(ts[1]->type), type_name(ts[0]->type));
        for (int k = 0; k < 3; k++) {
            if (expert_type[k] < 0) expert_type[k] = ts[k]->type;
            if (ts[k]->type != expert_type[k])
                return tide_errf(b->err, b->err_len, TIDE_ERR_MODEL,
                                 "tensor '%s': type %s, but the other routed experts' %s are %s "
                                 "(every expert must have the same bytes)",
                                 ts[k]->name, type_name(ts[k]->type),
                                 k == 0 ? "ffn_gate" : k == 1 ? "ffn_up" : "ffn_down",
                                 type_name(expert_type[k]));
            const char *a = ts[k]->data, *z = a + ts[k]->nbytes;
            if (!lo || a < lo) lo = a;
            if (!hi || z > hi) hi = z;
        }
        L->exp_gate[e] = mx[0];
        L->exp_up[e] = mx[1];
        L->exp_down[e] = mx[2];
        if (*expert_bytes == 0) *expert_bytes = mx[0].nbytes + mx[1].nbytes + mx[2].nbytes;
    }
    m->expert_range[il - hp->n_dense_lead] = lo;
    m->expert_range_bytes[il - hp->n_dense_lead] = (size_t)(hi - lo);
    return TIDE_OK;
}

/* The tokenizer's vocabulary must match the model's. */
static tide_status check_vocab(gguf_file *g, int64_t n_vocab, char *err, size_t err_len) {
    if (gguf_find_key(g, "tokenizer.ggml.tokens") < 0) return TIDE_OK;
    int32_t et;
    uint64_t n;
    TRY(gguf_get_arr_info(g, "tokenizer.ggml.tokens", &et, &n, err, err_len));
    if (n != (uint64_t)n_vocab)
        return tide_errf(err, err_len, TIDE_ERR_MODEL,
                         "tokenizer.ggml.tokens has %llu entries, expected vocab_size %lld",
                         (unsigned long long)n, (long long)n_vocab);
    return TIDE_OK;
}

/* Every tensor of the model, checked, as views into the mapping. */
static tide_status bind_weights(tide_model *m, char *err, size_t err_len) {
    tide_hparams *hp = &m->hp;
    binder bind = {m->gguf, err, err_len, 0}, *b = &bind;
    const int64_t H = hp->n_embd, V = hp->n_vocab;
    MATRIX(m->w.token_embd, H, V, 0, "token_embd.weight");
    VECTOR(m->w.output_norm, H, "output_norm.weight");
    MATRIX(m->w.output, H, V, 0, "output.weight");
    int32_t expert_type[3] = {-1, -1, -1};
    uint64_t expert_bytes = 0;
    for (int32_t il = 0; il < hp->n_layer; il++) {
        tide_layer_weights *L = &m->w.layers[il];
        TRY(bind_attention(b, hp, il, L));
        if (il < hp->n_dense_lead) {
            TRY(bind_dense(b, hp, il, L));
        } else {
            TRY(bind_moe(b, hp, il, L));
            TRY(bind_experts(b, m, il, expert_type, &expert_bytes));
        }
    }
    hp->expert_type = expert_type[0] < 0 ? TIDE_TYPE_F32 : expert_type[0];
    hp->expert_bytes = expert_bytes;
    hp->nonexpert_bytes = b->nonexpert;
    return TIDE_OK;
}

tide_status tide_model_open(const char *path, tide_model **out, char *err, size_t err_len) {
    *out = NULL;
    if (!path) return tide_errf(err, err_len, TIDE_ERR_ARG, "path is NULL");
    tide_model *m = calloc(1, sizeof *m);
    if (!m) return tide_errf(err, err_len, TIDE_ERR_NOMEM, "out of memory");
    tide_status st = gguf_open(path, &m->gguf, err, err_len);
    if (st != TIDE_OK) {
        free(m);
        return st;
    }
    tide_hparams *hp = &m->hp;
    if ((st = read_hparams(m->gguf, hp, err, err_len)) != TIDE_OK) goto fail;
    m->n_moe = hp->n_layer - hp->n_dense_lead;
    m->w.layers = calloc((size_t)hp->n_layer, sizeof *m->w.layers);
    m->expert_range = calloc((size_t)(m->n_moe > 0 ? m->n_moe : 1), sizeof *m->expert_range);
    m->expert_range_bytes = calloc((size_t)(m->n_moe > 0 ? m->n_moe : 1), sizeof(size_t));
    if (!m->w.layers || !m->expert_range || !m->expert_range_bytes) {
        st = tide_errf(err, err_len, TIDE_ERR_NOMEM, "out of memory");
        goto fail;
    }
    if ((st = check_vocab(m->gguf, hp->n_vocab, err, err_len)) != TIDE_OK) goto fail;
    if ((st = bind_weights(m, err, err_len)) != TIDE_OK) goto fail;
    *out = m;
    return TIDE_OK;
fail:
    tide_model_close(m);
    return st;
}

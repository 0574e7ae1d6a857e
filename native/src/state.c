/* state.c: a context's cache to and from a file, so a long prompt's keys and values outlive the
 * process (tide_state_save / tide_state_load).
 *
 * File, little endian:
 *   "TIDESTAT"  u32 format   u32 abi    u64 build id    u64 model id
 *   u32 cache type (tide_type of the stored rows: f32, f16, bf16)   u32 n_layer
 *   u32 values a row (nKV*hd)
 *   u32 n_tokens   i32 block length of the rows (tide_cache_block_length)   u32 0
 *   i32 ids[n_tokens]
 *   per layer: K rows [n_tokens][row], then V rows [n_tokens][row], of the cache type
 * The build id is a hash of the library file itself (the kernels that wrote the rows), the model
 * id a hash of the hyperparameters, the file's size, its metadata and the first and last bytes
 * of its tensor data. A file whose ids differ was computed by other code or weights: refused,
 * never silently mixed.
 */
#include "model.h"

#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define STATE_MAGIC "TIDESTAT"
#define STATE_FORMAT 1u
#define SAMPLE_BYTES (64u << 10)

typedef struct {
    char magic[8];
    uint32_t format, abi;
    uint64_t build_id, model_id;
    uint32_t cache_type, n_layer, row, n_tokens;
    int32_t cache_block;
    uint32_t reserved;
} state_header;

static uint64_t fnv1a(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

#define FNV_OFFSET 0xcbf29ce484222325ull

/* Hash of the shared library holding this code; 0 when it cannot be read. */
static uint64_t build_id(void) {
    Dl_info info;
    if (!dladdr((void *)build_id, &info) || !info.dli_fname) return 0;
    FILE *f = fopen(info.dli_fname, "rb");
    if (!f) return 0;
    uint64_t h = FNV_OFFSET;
    unsigned char buf[1 << 16];
    size_t got;
    while ((got = fread(buf, 1, sizeof buf, f)) > 0) h = fnv1a(h, buf, got);
    fclose(f);
    return h;
}

static uint64_t model_id(const tide_model *m) {
    const gguf_file *g = m->gguf;
    uint64_t size = gguf_file_size(g), data = gguf_data_offset(g);
    uint64_t h = fnv1a(FNV_OFFSET, &m->hp, sizeof m->hp);
    h = fnv1a(h, &size, sizeof size);
    const unsigned char *base = gguf_file_base(g);
    h = fnv1a(h, base, (size_t)data); /* header, metadata, tensor infos */
    uint64_t tail = size - data;
    uint64_t n = tail < SAMPLE_BYTES ? tail : SAMPLE_BYTES;
    h = fnv1a(h, base + data, (size_t)n);
    h = fnv1a(h, base + size - n, (size_t)n);
    return h;
}

static const char *type_name(uint32_t t) {
    return t == TIDE_TYPE_F32    ? "f32"
           : t == TIDE_TYPE_F16  ? "f16"
           : t == TIDE_TYPE_BF16 ? "bf16"
                                 : "?";
}

static void header_of(const tide_context *ctx, uint64_t build, state_header *hd) {
    const tide_hparams *hp = &ctx->model->hp;
    memset(hd, 0, sizeof *hd);
    memcpy(hd->magic, STATE_MAGIC, 8);
    hd->format = STATE_FORMAT;
    hd->abi = TIDE_ABI_VERSION;
    hd->build_id = build;
    hd->model_id = model_id(ctx->model);
    hd->cache_type = (uint32_t)ctx->cache_type;
    hd->n_layer = (uint32_t)hp->n_layer;
    hd->row = (uint32_t)(hp->n_head_kv * hp->head_dim);
    hd->n_tokens = (uint32_t)ctx->n_past;
    hd->cache_block = ctx->cache_block;
}

static tide_status io_fail(tide_context *ctx, const char *path, const char *what) {
    return ctx_fail(ctx, TIDE_ERR_IO, "state %s: %s: %s", path, what, strerror(errno));
}

tide_status tide_state_write(tide_context *ctx, const char *path) {
    state_header hd;
    header_of(ctx, build_id(), &hd);
    size_t row_bytes = tide_row_bytes(ctx->cache_type, hd.row), rows = hd.n_tokens;
    size_t tmp_len = strlen(path) + 32;
    char *tmp = malloc(tmp_len);
    char *stage = malloc(rows * row_bytes + 1);
    if (!tmp || !stage) {
        free(tmp);
        free(stage);
        return ctx_fail(ctx, TIDE_ERR_NOMEM, "state %s: out of memory", path);
    }
    snprintf(tmp, tmp_len, "%s.tmp.%ld", path, (long)getpid());
    tide_status st = TIDE_OK;
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        st = io_fail(ctx, tmp, "cannot create");
        goto done;
    }
    int ok = fwrite(&hd, sizeof hd, 1, f) == 1 &&
             fwrite(ctx->tokens, sizeof(int32_t), rows, f) == rows;
    for (int32_t il = 0; ok && il < (int32_t)hd.n_layer; il++) {
        void *src[2] = {ctx->k_cache[il], ctx->v_cache[il]};
        for (int kv = 0; ok && kv < 2; kv++) {
            st = be_check(ctx, ctx->be->buf->download(ctx->be, stage, src[kv], rows * row_bytes),
                          "state: downloading the cache");
            if (st != TIDE_OK) break;
            ok = fwrite(stage, row_bytes, rows, f) == rows;
        }
        if (st != TIDE_OK) break;
    }
    if (st == TIDE_OK && (!ok || fflush(f) != 0 || fsync(fileno(f)) != 0))
        st = io_fail(ctx, tmp, "write failed");
    if (fclose(f) != 0 && st == TIDE_OK) st = io_fail(ctx, tmp, "write failed");
    if (st == TIDE_OK && rename(tmp, path) != 0) st = io_fail(ctx, path, "cannot rename into place");
    if (st != TIDE_OK) remove(tmp);
done:
    free(tmp);
    free(stage);
    return st;
}

tide_status tide_state_read(tide_context *ctx, const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return io_fail(ctx, path, "cannot open");
    state_header hd, want;
    tide_status st = TIDE_OK;
    char *stage = NULL;
    if (fread(&hd, sizeof hd, 1, f) != 1 || memcmp(hd.magic, STATE_MAGIC, 8) != 0) {
        st = ctx_fail(ctx, TIDE_ERR_FORMAT, "state %s: not a tide.cpp state file", path);
        goto done;
    }
    header_of(ctx, build_id(), &want);
    if (hd.format != STATE_FORMAT || hd.abi != want.abi) {
        st = ctx_fail(ctx, TIDE_ERR_FORMAT,
                      "state %s: format %u / ABI %u, this build reads format %u / ABI %u", path,
                      hd.format, hd.abi, STATE_FORMAT, want.abi);
        goto done;
    }
    if (hd.model_id != want.model_id || hd.n_layer != want.n_layer || hd.row != want.row) {
        st = ctx_fail(ctx, TIDE_ERR_ARG,
                      "state %s: written for another model (model id %016llx, this model %016llx)",
                      path, (unsigned long long)hd.model_id, (unsigned long long)want.model_id);
        goto done;
    }
    if (hd.build_id != want.build_id) {
        st = ctx_fail(ctx, TIDE_ERR_ARG,
                      "state %s: written by another build of tide.cpp (build id %016llx, this "
                      "build %016llx): its cache may differ in the last bits; recompute it",
                      path, (unsigned long long)hd.build_id, (unsigned long long)want.build_id);
        goto done;
    }
    if (hd.cache_type != want.cache_type) {
        st = ctx_fail(ctx, TIDE_ERR_ARG, "state %s: cache type %s, this context's is %s", path,
                      type_name(hd.cache_type), type_name(want.cache_type));
        goto done;
    }
    if (hd.n_tokens > (uint32_t)ctx->n_ctx) {
        st = ctx_fail(ctx, TIDE_ERR_CONTEXT, "state %s: %u tokens, more than n_ctx %d", path,
                      hd.n_tokens, ctx->n_ctx);
        goto done;
    }
    size_t rows = hd.n_tokens, row_bytes = tide_row_bytes(ctx->cache_type, hd.row);
    /* the size must be exact before anything is overwritten */
    long expect = (long)(sizeof hd + rows * sizeof(int32_t) + 2 * hd.n_layer * rows * row_bytes);
    if (fseek(f, 0, SEEK_END) != 0 || ftell(f) != expect) {
        st = ctx_fail(ctx, TIDE_ERR_FORMAT, "state %s: %ld bytes, expected %ld (truncated?)", path,
                      ftell(f), expect);
        goto done;
    }
    fseek(f, (long)sizeof hd, SEEK_SET);
    stage = malloc(rows * row_bytes + 1);
    if (!stage) {
        st = ctx_fail(ctx, TIDE_ERR_NOMEM, "state %s: out of memory", path);
        goto done;
    }
    ctx->n_past = ctx->cache_block = 0; /* until every row is in */
    if (fread(ctx->tokens, sizeof(int32_t), rows, f) != rows) {
        st = io_fail(ctx, path, "read failed");
        goto done;
    }
    for (size_t i = 0; i < rows; i++)
        if (ctx->tokens[i] < 0 || ctx->tokens[i] >= ctx->model->hp.n_vocab) {
            st = ctx_fail(ctx, TIDE_ERR_FORMAT, "state %s: token %d at %zu outside the vocabulary",
                          path, ctx->tokens[i], i);
            goto done;
        }
    for (int32_t il = 0; il < (int32_t)hd.n_layer; il++) {
        void *dst[2] = {ctx->k_cache[il], ctx->v_cache[il]};
        for (int kv = 0; kv < 2; kv++) {
            if (fread(stage, row_bytes, rows, f) != rows) {
                st = io_fail(ctx, path, "read failed");
                goto done;
            }
            st = be_check(ctx, ctx->be->buf->upload(ctx->be, dst[kv], stage, rows * row_bytes),
                          "state: uploading the cache");
            if (st != TIDE_OK) goto done;
        }
    }
    ctx->n_past = (int32_t)rows;
    ctx->cache_block = rows ? hd.cache_block : 0;
done:
    free(stage);
    fclose(f);
    return st;
}

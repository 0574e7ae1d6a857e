/* test_gguf.c: the GGUF reader on files built byte by byte here.
 *
 * A tiny writer builds one valid file and remembers where its fields are ("marks"); each bad-file
 * case patches one field of a copy and checks the status and the message. Every parse runs on an
 * exact-size heap copy so AddressSanitizer (make sanitize) catches any read past the end.
 */
#include "gguf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"

/* ---- the writer ---------------------------------------------------------------------------- */

typedef struct {
    uint8_t *p;
    size_t n, cap;
    struct {
        const char *name;
        size_t pos;
    } marks[64];
    int n_marks;
} wbuf;

static void w_bytes(wbuf *b, const void *src, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        if (!b->p) abort();
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}
static void w_u8(wbuf *b, uint8_t v) { w_bytes(b, &v, 1); }
static void w_u32(wbuf *b, uint32_t v) { w_bytes(b, &v, 4); }
static void w_u64(wbuf *b, uint64_t v) { w_bytes(b, &v, 8); }
static void w_str(wbuf *b, const char *s) {
    w_u64(b, strlen(s));
    w_bytes(b, s, strlen(s));
}
static void w_pad(wbuf *b, size_t align) {
    while (b->n % align) w_u8(b, 0);
}
static void mark(wbuf *b, const char *name) {
    b->marks[b->n_marks].name = name;
    b->marks[b->n_marks].pos = b->n;
    b->n_marks++;
}
static size_t at(const wbuf *b, const char *name) {
    for (int i = 0; i < b->n_marks; i++)
        if (strcmp(b->marks[i].name, name) == 0) return b->marks[i].pos;
    fprintf(stderr, "no mark %s\n", name);
    abort();
}

static void kv_key(wbuf *b, const char *key, uint32_t type) {
    w_str(b, key);
    w_u32(b, type);
}

typedef struct {
    const char *name;
    uint32_t n_dims;
    uint64_t ne[4];
    uint32_t type;
} tspec;

static uint64_t tspec_bytes(const tspec *t) {
    uint64_t n = 1;
    for (uint32_t d = 0; d < t->n_dims; d++) n *= t->ne[d];
    return n / gguf_block_size((int32_t)t->type) * gguf_type_size((int32_t)t->type);
}

static const tspec TENSORS[] = {
    {"a", 2, {4, 2}, 0},            /* f32 */
    {"b", 1, {8}, 1},               /* f16 */
    {"c", 2, {32, 2}, 8},           /* q8_0 */
    {"blk.0.attn_qkv.weight", 4, {2, 2, 2, 2}, 30}, /* bf16 */
};
#define N_TENSORS 4
#define ALIGN 64

/* The valid file: version 3, alignment 64, every metadata type, four tensors whose data fill
 * the file to its last byte (so every proper prefix is invalid). Data byte j of tensor i is
 * (i * 16 + j) & 0xff. */
static wbuf build_valid(uint32_t version) {
    wbuf b = {0};
    w_bytes(&b, "GGUF", 4);
    mark(&b, "version");
    w_u32(&b, version);
    mark(&b, "n_tensors");
    w_u64(&b, N_TENSORS);
    mark(&b, "n_kv");
    w_u64(&b, 14);
    mark(&b, "kv0");
    kv_key(&b, "general.architecture", 8);
    mark(&b, "kv0.value");
    w_str(&b, "llada2");
    kv_key(&b, "general.alignment", 4);
    mark(&b, "alignment.value");
    w_u32(&b, ALIGN);
    kv_key(&b, "test.u8", 0);
    w_u8(&b, 200);
    kv_key(&b, "test.i8", 1);
    w_u8(&b, (uint8_t)-5);
    kv_key(&b, "test.u16", 2);
    w_bytes(&b, &(uint16_t){60000}, 2);
    kv_key(&b, "test.i16", 3);
    w_bytes(&b, &(int16_t){-300}, 2);
    kv_key(&b, "test.f32", 6);
    w_bytes(&b, &(float){1.5f}, 4);
    mark(&b, "bool");
    kv_key(&b, "test.bool", 7);
    w_u8(&b, 1);
    kv_key(&b, "test.u64", 10);
    w_u64(&b, 1ull << 40);
    kv_key(&b, "test.i64", 11);
    w_u64(&b, (uint64_t)-7);
    kv_key(&b, "test.f64", 12);
    w_bytes(&b, &(double){0.25}, 8);
    mark(&b, "arr_i32");
    kv_key(&b, "test.arr_i32", 9);
    mark(&b, "arr_i32.elem_type");
    w_u32(&b, 5);
    mark(&b, "arr_i32.n");
    w_u64(&b, 3);
    w_u32(&b, 1);
    w_u32(&b, (uint32_t)-2);
    w_u32(&b, 3);
    mark(&b, "arr_str");
    kv_key(&b, "test.arr_str", 9); /* same key length as test.arr_i32: duplicate by patching */
    w_u32(&b, 8);
    mark(&b, "arr_str.n");
    w_u64(&b, 3);
    w_str(&b, "a");
    w_str(&b, "bc");
    w_str(&b, "");
    kv_key(&b, "test.empty_arr", 9);
    w_u32(&b, 6);
    w_u64(&b, 0);
    static const char *tmark[N_TENSORS][5] = {
        {"t0", "t0.n_dims", "t0.ne", "t0.type", "t0.offset"},
        {"t1", "t1.n_dims", "t1.ne", "t1.type", "t1.offset"},
        {"t2", "t2.n_dims", "t2.ne", "t2.type", "t2.offset"},
        {"t3", "t3.n_dims", "t3.ne", "t3.type", "t3.offset"},
    };
    uint64_t off = 0;
    for (int i = 0; i < N_TENSORS; i++) {
        const tspec *t = &TENSORS[i];
        mark(&b, tmark[i][0]);
        w_str(&b, t->name);
        mark(&b, tmark[i][1]);
        w_u32(&b, t->n_dims);
        mark(&b, tmark[i][2]);
        for (uint32_t d = 0; d < t->n_dims; d++) w_u64(&b, t->ne[d]);
        mark(&b, tmark[i][3]);
        w_u32(&b, t->type);
        mark(&b, tmark[i][4]);
        w_u64(&b, off);
        off += (tspec_bytes(t) + ALIGN - 1) / ALIGN * ALIGN;
    }
    w_pad(&b, ALIGN);
    mark(&b, "data");
    for (int i = 0; i < N_TENSORS; i++) {
        uint64_t nb = tspec_bytes(&TENSORS[i]);
        for (uint64_t j = 0; j < nb; j++) w_u8(&b, (uint8_t)(i * 16 + j));
        if (i + 1 < N_TENSORS) w_pad(&b, ALIGN);
    }
    return b;
}

static void patch_u32(wbuf *b, size_t pos, uint32_t v) { memcpy(b->p + pos, &v, 4); }
static void patch_u64(wbuf *b, size_t pos, uint64_t v) { memcpy(b->p + pos, &v, 8); }

/* Parse an exact-size heap copy of the first n bytes. */
static tide_status parse(const uint8_t *p, size_t n, gguf_file **out, char *err, size_t len) {
    uint8_t *copy = malloc(n ? n : 1);
    memcpy(copy, p, n);
    gguf_file *f = NULL;
    tide_status st = gguf_open_memory(copy, n, &f, err, len);
    if (out && st == TIDE_OK) {
        *out = f; /* leaks `copy` for the caller's lifetime: tests only */
        return st;
    }
    gguf_close(f);
    free(copy);
    return st;
}

/* Expect the patched file `b` to fail with `want_st` and a message containing `want`. */
static void expect_bad(const char *what, wbuf *b, tide_status want_st, const char *want) {
    char err[512] = "";
    tide_status st = parse(b->p, b->n, NULL, err, sizeof err);
    CHECK(st == want_st, "%s: status %d, want %d (%s)", what, st, want_st, err);
    CHECK(strstr(err, want) != NULL, "%s: message '%s' lacks '%s'", what, err, want);
}

static wbuf copy_valid(void) { return build_valid(3); }

/* ---- good files ---------------------------------------------------------------------------- */

static void test_valid_metadata(const gguf_file *f) {
    char err[256];
    uint32_t u32;
    int32_t i32;
    uint64_t u64;
    float f32;
    int bl;
    const char *s;
    size_t len;
    CHECK(gguf_n_kv(f) == 14, "n_kv %lld", (long long)gguf_n_kv(f));
    CHECK(gguf_alignment(f) == ALIGN, "alignment");
    CHECK(gguf_find_key(f, "general.architecture") == 0, "find_key");
    CHECK(gguf_find_key(f, "nope") == -1, "absent key");
    CHECK(gguf_find_key(f, "general.architecturex") == -1, "prefix key");
    CHECK(gguf_get_str(f, "general.architecture", &s, &len, err, sizeof err) == TIDE_OK &&
              len == 6 && memcmp(s, "llada2", 6) == 0, "str: %s", err);
    CHECK(gguf_get_u32(f, "test.u8", &u32, err, sizeof err) == TIDE_OK && u32 == 200, "u8->u32");
    CHECK(gguf_get_u32(f, "test.u16", &u32, err, sizeof err) == TIDE_OK && u32 == 60000, "u16");
    CHECK(gguf_get_u32(f, "general.alignment", &u32, err, sizeof err) == TIDE_OK && u32 == ALIGN,
          "u32");
    CHECK(gguf_get_i32(f, "test.i8", &i32, err, sizeof err) == TIDE_OK && i32 == -5, "i8");
    CHECK(gguf_get_i32(f, "test.i16", &i32, err, sizeof err) == TIDE_OK && i32 == -300, "i16");
    CHECK(gguf_get_i32(f, "test.i64", &i32, err, sizeof err) == TIDE_OK && i32 == -7, "i64->i32");
    CHECK(gguf_get_u32(f, "test.i8", &u32, err, sizeof err) == TIDE_ERR_MODEL &&
              strstr(err, "'test.i8' = -5 does not fit in uint32"), "neg u32: %s", err);
    CHECK(gguf_get_u32(f, "test.u64", &u32, err, sizeof err) == TIDE_ERR_MODEL &&
              strstr(err, "does not fit in uint32"), "big u32: %s", err);
    CHECK(gguf_get_u64(f, "test.u64", &u64, err, sizeof err) == TIDE_OK && u64 == 1ull << 40,
          "u64");
    CHECK(gguf_get_u64(f, "test.i64", &u64, err, sizeof err) == TIDE_ERR_MODEL, "neg u64");
    CHECK(gguf_get_f32(f, "test.f32", &f32, err, sizeof err) == TIDE_OK && f32 == 1.5f, "f32");
    CHECK(gguf_get_f32(f, "test.f64", &f32, err, sizeof err) == TIDE_OK && f32 == 0.25f, "f64");
    CHECK(gguf_get_bool(f, "test.bool", &bl, err, sizeof err) == TIDE_OK && bl == 1, "bool");
    /* type mismatches name the key and both types */
    CHECK(gguf_get_u32(f, "general.architecture", &u32, err, sizeof err) == TIDE_ERR_MODEL &&
              strstr(err, "key 'general.architecture' has type string, expected an integer"),
          "mismatch: %s", err);
    CHECK(gguf_get_f32(f, "test.u8", &f32, err, sizeof err) == TIDE_ERR_MODEL &&
              strstr(err, "has type uint8, expected float32"), "f32 mismatch: %s", err);
    CHECK(gguf_get_bool(f, "test.u8", &bl, err, sizeof err) == TIDE_ERR_MODEL, "bool mismatch");
    CHECK(gguf_get_str(f, "test.arr_str", &s, &len, err, sizeof err) == TIDE_ERR_MODEL &&
              strstr(err, "is an array of string, expected string"), "str of arr: %s", err);
    CHECK(gguf_get_u32(f, "missing.key", &u32, err, sizeof err) == TIDE_ERR_MODEL &&
              strstr(err, "key 'missing.key' not found"), "missing: %s", err);
    /* arrays */
    int32_t et;
    uint64_t n;
    CHECK(gguf_get_arr_info(f, "test.arr_i32", &et, &n, err, sizeof err) == TIDE_OK &&
              et == GGUF_TYPE_INT32 && n == 3, "arr info");
    int32_t vals[3];
    CHECK(gguf_get_arr_data(f, "test.arr_i32", GGUF_TYPE_INT32, vals, 3, err, sizeof err) ==
                  TIDE_OK && vals[0] == 1 && vals[1] == -2 && vals[2] == 3, "arr data");
    CHECK(gguf_get_arr_data(f, "test.arr_i32", GGUF_TYPE_UINT32, vals, 3, err, sizeof err) ==
                  TIDE_ERR_MODEL && strstr(err, "array of int32, expected an array of uint32"),
          "arr type: %s", err);
    CHECK(gguf_get_arr_data(f, "test.arr_i32", GGUF_TYPE_INT32, vals, 2, err, sizeof err) ==
              TIDE_ERR_MODEL, "arr n");
    CHECK(gguf_get_arr_data(f, "test.empty_arr", GGUF_TYPE_FLOAT32, NULL, 0, err, sizeof err) ==
              TIDE_OK, "empty arr: %s", err);
    CHECK(gguf_get_arr_info(f, "test.u8", &et, &n, err, sizeof err) == TIDE_ERR_MODEL &&
              strstr(err, "expected an array"), "not arr: %s", err);
    CHECK(gguf_get_arr_str(f, "test.arr_str", 1, &s, &len, err, sizeof err) == TIDE_OK &&
              len == 2 && memcmp(s, "bc", 2) == 0, "arr str 1");
    CHECK(gguf_get_arr_str(f, "test.arr_str", 2, &s, &len, err, sizeof err) == TIDE_OK &&
              len == 0, "arr str 2");
    CHECK(gguf_get_arr_str(f, "test.arr_str", 3, &s, &len, err, sizeof err) == TIDE_ERR_ARG,
          "arr str oob");
    CHECK(gguf_get_arr_str(f, "test.arr_i32", 0, &s, &len, err, sizeof err) == TIDE_ERR_MODEL,
          "arr str of ints");
    /* listing */
    size_t kl;
    const char *k = gguf_kv_key(f, 13, &kl);
    CHECK(k && kl == 14 && memcmp(k, "test.empty_arr", 14) == 0, "kv_key");
    CHECK(gguf_kv_type(f, 13) == GGUF_TYPE_ARRAY && gguf_kv_type(f, 14) == -1, "kv_type");
    CHECK(gguf_kv_key(f, -1, &kl) == NULL, "kv_key oob");
}

static void test_valid_tensors(const gguf_file *f, size_t file_size) {
    CHECK(gguf_n_tensors(f) == N_TENSORS, "n_tensors");
    CHECK(gguf_file_size(f) == file_size, "file size");
    CHECK(gguf_data_offset(f) % ALIGN == 0, "data offset aligned");
    CHECK((const uint8_t *)gguf_data_base(f) ==
              (const uint8_t *)gguf_file_base(f) + gguf_data_offset(f), "data base");
    for (int i = 0; i < N_TENSORS; i++) {
        const gguf_tensor_info *t = gguf_find_tensor(f, TENSORS[i].name);
        CHECK(t == gguf_tensor(f, i), "find %s", TENSORS[i].name);
        if (!t) continue;
        CHECK(strcmp(t->name, TENSORS[i].name) == 0, "name");
        CHECK(t->n_dims == (int32_t)TENSORS[i].n_dims, "n_dims");
        CHECK(t->type == (int32_t)TENSORS[i].type, "type");
        CHECK(t->nbytes == tspec_bytes(&TENSORS[i]), "nbytes %s", t->name);
        CHECK(t->offset % ALIGN == 0, "offset aligned");
        CHECK(t->file_offset == gguf_data_offset(f) + t->offset, "file offset");
        for (int d = 0; d < 4; d++)
            CHECK(t->ne[d] == (d < t->n_dims ? (int64_t)TENSORS[i].ne[d] : 1), "ne");
        const uint8_t *p = t->data;
        CHECK(p[0] == (uint8_t)(i * 16) && p[t->nbytes - 1] == (uint8_t)(i * 16 + t->nbytes - 1),
              "data of %s", t->name);
    }
    const gguf_tensor_info *q = gguf_find_tensor(f, "c");
    CHECK(q && q->nbytes == 2 * 34 && q->n_elements == 64, "q8_0 size");
    CHECK(gguf_find_tensor(f, "z") == NULL && gguf_find_tensor_index(f, "blk.0") == -1, "absent");
    CHECK(gguf_tensor(f, N_TENSORS) == NULL && gguf_tensor(f, -1) == NULL, "tensor oob");
    const uint8_t *last = (const uint8_t *)gguf_tensor(f, N_TENSORS - 1)->data +
                          gguf_tensor(f, N_TENSORS - 1)->nbytes;
    CHECK(last == (const uint8_t *)gguf_file_base(f) + file_size, "last tensor ends the file");
}

static void test_valid(void) {
    for (uint32_t version = 2; version <= 3; version++) {
        wbuf b = build_valid(version);
        gguf_file *f = NULL;
        char err[256] = "";
        tide_status st = parse(b.p, b.n, &f, err, sizeof err);
        CHECK(st == TIDE_OK, "valid v%u: %s", version, err);
        if (st == TIDE_OK) {
            CHECK(gguf_version(f) == version, "version");
            test_valid_metadata(f);
            test_valid_tensors(f, b.n);
            free((void *)gguf_file_base(f));
            gguf_close(f);
        }
        free(b.p);
    }
}

/* The same file through gguf_open (mmap), and the I/O errors. */
static void test_file(void) {
    wbuf b = build_valid(3);
    char path[] = "/tmp/test_gguf_XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0, "mkstemp");
    if (fd < 0) return;
    CHECK(write(fd, b.p, b.n) == (ssize_t)b.n, "write");
    close(fd);
    gguf_file *f = NULL;
    char err[512] = "";
    CHECK(gguf_open(path, &f, err, sizeof err) == TIDE_OK, "open: %s", err);
    if (f) {
        test_valid_tensors(f, b.n);
        uint32_t a;
        CHECK(gguf_get_u32(f, "general.alignment", &a, err, sizeof err) == TIDE_OK && a == ALIGN,
              "alignment via mmap");
        gguf_close(f);
    }
    /* truncated files on disk, down to empty (mmap of 0 bytes must not be attempted) */
    size_t cuts[] = {0, 3, 23, 24, 100, b.n - 1};
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        CHECK(truncate(path, (off_t)cuts[i]) == 0, "truncate");
        f = (gguf_file *)1;
        tide_status st = gguf_open(path, &f, err, sizeof err);
        CHECK(st == TIDE_ERR_FORMAT && f == NULL, "truncated file %zu: %d %s", cuts[i], st, err);
    }
    unlink(path);
    CHECK(gguf_open(path, &f, err, sizeof err) == TIDE_ERR_IO && strstr(err, "cannot open") &&
              strstr(err, path), "missing: %s", err);
    CHECK(gguf_open("/tmp", &f, err, sizeof err) == TIDE_ERR_IO &&
              strstr(err, "not a regular file"), "dir: %s", err);
    CHECK(gguf_open(NULL, &f, err, sizeof err) == TIDE_ERR_ARG, "null path");
    CHECK(gguf_open(path, &f, NULL, 0) == TIDE_ERR_IO, "no err buffer");
    gguf_close(NULL);
    free(b.p);
}

/* ---- bad files ----------------------------------------------------------------------------- */

/* Every proper prefix of the valid file is rejected as a format error, without a crash. */
static void test_truncated(void) {
    wbuf b = build_valid(3);
    int bad = 0;
    for (size_t n = 0; n < b.n; n++) {
        char err[512] = "";
        tide_status st = parse(b.p, n, NULL, err, sizeof err);
        if (st != TIDE_ERR_FORMAT || err[0] == '\0') {
            if (bad++ < 5) fprintf(stderr, "prefix %zu: status %d '%s'\n", n, st, err);
        }
    }
    CHECK(bad == 0, "%d of %zu prefixes not rejected cleanly", bad, b.n);
    char err[512];
    parse(b.p, at(&b, "t0") - 2, NULL, err, sizeof err);
    CHECK(strstr(err, "kv 13 ('test.empty_arr')") && strstr(err, "needs 8 bytes, file ends after 6"),
          "%s", err);
    parse(b.p, at(&b, "data") + 10, NULL, err, sizeof err);
    CHECK(strstr(err, "tensor 'a': data [offset 0, size 32]") &&
              strstr(err, "extends past end of file"), "%s", err);
    free(b.p);
}

static void test_header(void) {
    wbuf b = copy_valid();
    memcpy(b.p, "GGML", 4);
    expect_bad("magic", &b, TIDE_ERR_FORMAT, "bad magic 'GGML'");
    memcpy(b.p, "GGUF", 4);
    patch_u32(&b, at(&b, "version"), 1);
    expect_bad("version 1", &b, TIDE_ERR_FORMAT, "GGUF version 1 is not supported");
    patch_u32(&b, at(&b, "version"), 4);
    expect_bad("version 4", &b, TIDE_ERR_FORMAT, "GGUF version 4 is not supported");
    patch_u32(&b, at(&b, "version"), 0x03000000u);
    expect_bad("big endian", &b, TIDE_ERR_FORMAT, "big-endian");
    patch_u32(&b, at(&b, "version"), 3);
    patch_u64(&b, at(&b, "n_kv"), 1ull << 62);
    expect_bad("huge n_kv", &b, TIDE_ERR_FORMAT, "n_kv = 4611686018427387904 cannot fit");
    patch_u64(&b, at(&b, "n_kv"), UINT64_MAX);
    expect_bad("max n_kv", &b, TIDE_ERR_FORMAT, "cannot fit");
    patch_u64(&b, at(&b, "n_kv"), 14);
    patch_u64(&b, at(&b, "n_tensors"), 1ull << 60);
    expect_bad("huge n_tensors", &b, TIDE_ERR_FORMAT, "n_tensors = 1152921504606846976");
    patch_u64(&b, at(&b, "n_tensors"), 10); /* fits the crude bound but not the file */
    expect_bad("too many tensors", &b, TIDE_ERR_FORMAT, "tensor 4");
    patch_u64(&b, at(&b, "n_tensors"), N_TENSORS);
    patch_u64(&b, at(&b, "n_kv"), 15); /* one kv more than there are: eats the first tensor */
    expect_bad("n_kv too big", &b, TIDE_ERR_FORMAT, "name of tensor 0");
    free(b.p);
}

static void test_strings_arrays(void) {
    wbuf b = copy_valid();
    patch_u64(&b, at(&b, "kv0"), 1000000);
    expect_bad("key length", &b, TIDE_ERR_FORMAT,
               "key of kv 0: string length 1000000 at offset 24 extends past end of file");
    patch_u64(&b, at(&b, "kv0"), UINT64_MAX);
    expect_bad("key length max", &b, TIDE_ERR_FORMAT, "string length 18446744073709551615");
    patch_u64(&b, at(&b, "kv0"), 0);
    expect_bad("empty key", &b, TIDE_ERR_FORMAT, "kv 0: empty key");
    free(b.p);

    b = copy_valid();
    patch_u64(&b, at(&b, "kv0.value"), 1ull << 40);
    expect_bad("value length", &b, TIDE_ERR_FORMAT,
               "kv 0 ('general.architecture'): string length 1099511627776");
    patch_u64(&b, at(&b, "kv0.value"), 6);
    patch_u32(&b, at(&b, "kv0.value") - 4, 13);
    expect_bad("value type", &b, TIDE_ERR_FORMAT,
               "kv 0 ('general.architecture'): unknown value type 13");
    free(b.p);

    b = copy_valid();
    patch_u64(&b, at(&b, "arr_i32.n"), 1ull << 62);
    expect_bad("array count", &b, TIDE_ERR_FORMAT,
               "kv 11 ('test.arr_i32'): array of 4611686018427387904 int32");
    patch_u64(&b, at(&b, "arr_i32.n"), 3);
    patch_u32(&b, at(&b, "arr_i32.elem_type"), 9);
    expect_bad("nested array", &b, TIDE_ERR_FORMAT, "arrays of arrays are not supported");
    patch_u32(&b, at(&b, "arr_i32.elem_type"), 77);
    expect_bad("array elem type", &b, TIDE_ERR_FORMAT, "unknown array element type 77");
    patch_u32(&b, at(&b, "arr_i32.elem_type"), 5);
    patch_u64(&b, at(&b, "arr_str.n"), 1ull << 61);
    expect_bad("string array count", &b, TIDE_ERR_FORMAT,
               "array of 2305843009213693952 strings");
    patch_u64(&b, at(&b, "arr_str.n"), 3);
    patch_u64(&b, at(&b, "arr_str.n") + 8 + 8 + 1, 1ull << 33); /* length of "bc" */
    expect_bad("string in array", &b, TIDE_ERR_FORMAT, "string length 8589934592");
    free(b.p);

    b = copy_valid(); /* "test.arr_str" -> "test.arr_i32": a duplicate key */
    memcpy(b.p + at(&b, "arr_str") + 8 + 9, "i32", 3);
    expect_bad("duplicate key", &b, TIDE_ERR_FORMAT,
               "kv 12 ('test.arr_i32'): duplicate key (also kv 11)");
    free(b.p);
}

static void test_alignment(void) {
    uint32_t bad[] = {0, 3, 48, 0x80000001u};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        wbuf b = copy_valid();
        patch_u32(&b, at(&b, "alignment.value"), bad[i]);
        expect_bad("alignment", &b, TIDE_ERR_FORMAT, "is not a power of two");
        free(b.p);
    }
    wbuf b = copy_valid(); /* alignment as a float: refused */
    patch_u32(&b, at(&b, "alignment.value") - 4, GGUF_TYPE_FLOAT32);
    expect_bad("alignment type", &b, TIDE_ERR_FORMAT,
               "general.alignment has type float32, expected an integer");
    free(b.p);
    b = copy_valid(); /* alignment 128: the offsets (multiples of 64) are now misaligned */
    patch_u32(&b, at(&b, "alignment.value"), 128);
    expect_bad("alignment 128", &b, TIDE_ERR_FORMAT,
               "tensor 'b': data offset 64 is not a multiple of the alignment 128");
    free(b.p);
}

static void test_tensor_infos(void) {
    wbuf b = copy_valid();
    size_t off3 = at(&b, "t3.offset");
    patch_u64(&b, off3, 1ull << 20);
    expect_bad("offset oob", &b, TIDE_ERR_FORMAT,
               "tensor 'blk.0.attn_qkv.weight': data [offset 1048576, size 32]");
    patch_u64(&b, off3, UINT64_MAX - 63);
    expect_bad("offset max", &b, TIDE_ERR_FORMAT, "extends past end of file");
    patch_u64(&b, off3, 193);
    expect_bad("misaligned", &b, TIDE_ERR_FORMAT,
               "tensor 'blk.0.attn_qkv.weight': data offset 193 is not a multiple of the "
               "alignment 64");
    free(b.p);

    b = copy_valid();
    patch_u32(&b, at(&b, "t1.type"), 99);
    expect_bad("unknown type", &b, TIDE_ERR_FORMAT, "tensor 'b': unknown ggml type 99");
    patch_u32(&b, at(&b, "t1.type"), 4); /* a retired ggml id */
    expect_bad("retired type", &b, TIDE_ERR_FORMAT, "unknown ggml type 4");
    patch_u32(&b, at(&b, "t1.type"), 0x80000000u);
    expect_bad("negative type", &b, TIDE_ERR_FORMAT, "unknown ggml type 2147483648");
    free(b.p);

    b = copy_valid();
    patch_u64(&b, at(&b, "t2.ne"), 16); /* q8_0 row of 16 */
    expect_bad("q8_0 row", &b, TIDE_ERR_FORMAT,
               "tensor 'c': row length 16 is not a multiple of the q8_0 block size 32");
    free(b.p);

    uint32_t bad_dims[] = {0, 5, 0xffffffffu};
    for (size_t i = 0; i < 3; i++) {
        b = copy_valid();
        patch_u32(&b, at(&b, "t0.n_dims"), bad_dims[i]);
        expect_bad("n_dims", &b, TIDE_ERR_FORMAT, "tensor 'a': n_dims");
        expect_bad("n_dims", &b, TIDE_ERR_FORMAT, "is not in 1..4");
        free(b.p);
    }

    b = copy_valid();
    size_t ne = at(&b, "t3.ne");
    patch_u64(&b, ne, 1ull << 32);
    patch_u64(&b, ne + 8, 1ull << 32);
    expect_bad("dims overflow", &b, TIDE_ERR_FORMAT,
               "tensor 'blk.0.attn_qkv.weight': element count overflows at dim 1");
    patch_u64(&b, ne, 1ull << 31);
    patch_u64(&b, ne + 8, 1ull << 31);
    patch_u64(&b, ne + 16, 1ull << 31); /* 2^93 elements */
    expect_bad("dims overflow 3", &b, TIDE_ERR_FORMAT, "element count overflows at dim 2");
    patch_u64(&b, ne, 0);
    expect_bad("zero dim", &b, TIDE_ERR_FORMAT, "dim 0 = 0 is not a positive int64");
    patch_u64(&b, ne, UINT64_MAX);
    expect_bad("huge dim", &b, TIDE_ERR_FORMAT, "is not a positive int64");
    free(b.p);

    b = copy_valid();
    size_t bytes = (1ull << 62) / 34 * 32; /* elements fit int64, bytes (blocks * 34) do not */
    patch_u64(&b, at(&b, "t2.ne") + 8, bytes / 32 * 2); /* ne1: elements = 32 * ne1 */
    expect_bad("bytes overflow", &b, TIDE_ERR_FORMAT, "extends past end of file");
    free(b.p);

    b = copy_valid(); /* tensor "b" renamed "a" */
    b.p[at(&b, "t1") + 8] = 'a';
    expect_bad("duplicate tensor", &b, TIDE_ERR_FORMAT,
               "tensor 'a': duplicate tensor name (tensors 0 and 1)");
    b.p[at(&b, "t1") + 8] = '\0';
    expect_bad("NUL in name", &b, TIDE_ERR_FORMAT, "holds a NUL byte");
    patch_u64(&b, at(&b, "t1"), 0);
    expect_bad("empty name", &b, TIDE_ERR_FORMAT, "tensor 1: name of 0 bytes");
    free(b.p);
}

/* A few thousand tensors, each found by name (the index, not a scan). */
static void test_many_tensors(void) {
    enum { N = 3 * 256 + 5 };
    wbuf b = {0};
    w_bytes(&b, "GGUF", 4);
    w_u32(&b, 3);
    w_u64(&b, N);
    w_u64(&b, 0);
    char name[64];
    for (int i = 0; i < N; i++) {
        snprintf(name, sizeof name, "blk.1.ffn_%s.%d.weight", (const char *[]){"gate", "up", "down"}[i % 3], i / 3);
        w_str(&b, name);
        w_u32(&b, 1);
        w_u64(&b, 8);
        w_u32(&b, 0);
        w_u64(&b, (uint64_t)i * 32);
    }
    w_pad(&b, 32);
    for (int i = 0; i < N * 32; i++) w_u8(&b, (uint8_t)i);
    gguf_file *f = NULL;
    char err[256] = "";
    CHECK(parse(b.p, b.n, &f, err, sizeof err) == TIDE_OK, "many: %s", err);
    if (f) {
        int ok = 0;
        for (int i = 0; i < N; i++) {
            snprintf(name, sizeof name, "blk.1.ffn_%s.%d.weight", (const char *[]){"gate", "up", "down"}[i % 3], i / 3);
            const gguf_tensor_info *t = gguf_find_tensor(f, name);
            ok += t && t == gguf_tensor(f, i) && t->offset == (uint64_t)i * 32;
        }
        CHECK(ok == N, "found %d of %d", ok, N);
        CHECK(gguf_alignment(f) == 32, "default alignment");
        free((void *)gguf_file_base(f));
        gguf_close(f);
    }
    free(b.p);
}

/* A file with no tensors ends right after its metadata: valid, empty data section. */
static void test_no_tensors(void) {
    wbuf b = {0};
    w_bytes(&b, "GGUF", 4);
    w_u32(&b, 3);
    w_u64(&b, 0);
    w_u64(&b, 1);
    kv_key(&b, "general.name", 8);
    w_str(&b, "x");
    gguf_file *f = NULL;
    char err[256] = "";
    CHECK(parse(b.p, b.n, &f, err, sizeof err) == TIDE_OK, "no tensors: %s", err);
    if (f) {
        CHECK(gguf_n_tensors(f) == 0 && gguf_find_tensor(f, "a") == NULL, "empty");
        CHECK((const uint8_t *)gguf_data_base(f) <= (const uint8_t *)gguf_file_base(f) + b.n,
              "data base inside");
        free((void *)gguf_file_base(f));
        gguf_close(f);
    }
    free(b.p);
}

static void test_types(void) {
    CHECK(gguf_type_size(0) == 4 && gguf_block_size(0) == 1, "f32");
    CHECK(gguf_type_size(1) == 2 && gguf_block_size(1) == 1, "f16");
    CHECK(gguf_type_size(8) == 34 && gguf_block_size(8) == 32, "q8_0");
    CHECK(gguf_type_size(30) == 2 && gguf_block_size(30) == 1, "bf16");
    CHECK(gguf_type_size(4) == 0 && gguf_type_size(-1) == 0 && gguf_type_size(1000) == 0, "bad");
    CHECK(strcmp(gguf_type_name(8), "q8_0") == 0 && strcmp(gguf_type_name(5), "unknown") == 0,
          "names");
    CHECK(strcmp(gguf_value_type_name(GGUF_TYPE_STRING), "string") == 0, "value names");
}

int main(void) {
    test_types();
    test_valid();
    test_file();
    test_truncated();
    test_header();
    test_strings_arrays();
    test_alignment();
    test_tensor_infos();
    test_many_tensors();
    test_no_tensors();
    return check_report("test_gguf");
}

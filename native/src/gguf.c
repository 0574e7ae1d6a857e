/* gguf.c: the validating GGUF reader (see gguf.h).
 *
 * The parser walks the image with a bounds-checked cursor: every read first checks that the
 * bytes are there, every length is compared with the bytes left before it is multiplied or
 * added, so no arithmetic on file-controlled numbers can overflow and no read leaves the image.
 * Only then are tensors turned into pointers.
 */
#if !defined(_GNU_SOURCE) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L /* mmap, fstat, O_CLOEXEC under a strict -std=c11 */
#endif
#include "gguf.h"
#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define GGUF_HEADER_BYTES 24u /* magic, version, n_tensors, n_kv */
/* Smallest encodings, used to refuse counts the file cannot hold before allocating for them:
 * a kv is key length (8) + value type (4) + a 1-byte value; a tensor info is name length (8) +
 * a 1-byte name + n_dims (4) + one dim (8) + type (4) + offset (8). */
#define GGUF_MIN_KV_BYTES 13u
#define GGUF_MIN_TENSOR_BYTES 33u

typedef struct {
    const char *key;
    size_t key_len;
    int32_t type;       /* gguf_value_type */
    uint64_t off;       /* scalars: the value; strings: the bytes; arrays: the first element */
    uint64_t len;       /* strings: byte length; arrays: element count */
    int32_t elem_type;  /* arrays only */
    uint64_t *str_offs; /* string arrays: offset of each element's length prefix */
} gguf_kv;

/* Open-addressing table of indices (+1, 0 = empty) over names; size a power of two. */
typedef struct {
    uint32_t *slots;
    uint64_t mask;
} gguf_index;

struct gguf_file {
    const uint8_t *base;
    uint64_t size;
    bool mapped; /* munmap at close (gguf_open) or not (gguf_open_memory) */
    uint32_t version;
    uint64_t alignment;
    uint64_t data_offset;
    int64_t n_kv;
    gguf_kv *kv;
    gguf_index kv_index;
    int64_t n_tensors;
    gguf_tensor_info *tensors;
    gguf_index tensor_index;
    char *names; /* NUL-terminated tensor names, back to back */
};

/* ---- messages ------------------------------------------------------------------------------ */

typedef unsigned long long ull;

/* ---- ggml types ---------------------------------------------------------------------------- */

typedef struct {
    const char *name;
    uint16_t block_elems; /* elements per block */
    uint16_t bytes;       /* bytes per block */
} gguf_type_desc;

/* Indexed by ggml type id; {NULL} entries are ids ggml retired or never used. */
static const gguf_type_desc gguf_types[] = {
    [0] = {"f32", 1, 4},        [1] = {"f16", 1, 2},        [2] = {"q4_0", 32, 18},
    [3] = {"q4_1", 32, 20},     [6] = {"q5_0", 32, 22},     [7] = {"q5_1", 32, 24},
    [8] = {"q8_0", 32, 34},     [9] = {"q8_1", 32, 40},     [10] = {"q2_k", 256, 84},
    [11] = {"q3_k", 256, 110},  [12] = {"q4_k", 256, 144},  [13] = {"q5_k", 256, 176},
    [14] = {"q6_k", 256, 210},  [15] = {"q8_k", 256, 292},  [16] = {"iq2_xxs", 256, 66},
    [17] = {"iq2_xs", 256, 74}, [18] = {"iq3_xxs", 256, 98}, [19] = {"iq1_s", 256, 50},
    [20] = {"iq4_nl", 32, 18},  [21] = {"iq3_s", 256, 110}, [22] = {"iq2_s", 256, 82},
    [23] = {"iq4_xs", 256, 136}, [24] = {"i8", 1, 1},       [25] = {"i16", 1, 2},
    [26] = {"i32", 1, 4},       [27] = {"i64", 1, 8},       [28] = {"f64", 1, 8},
    [29] = {"iq1_m", 256, 56},  [30] = {"bf16", 1, 2},      [34] = {"tq1_0", 256, 54},
    [35] = {"tq2_0", 256, 66},  [39] = {"mxfp4", 32, 17},   [40] = {"nvfp4", 64, 36},
    [41] = {"q1_0", 128, 18},
};
#define GGUF_N_TYPES ((int32_t)(sizeof gguf_types / sizeof gguf_types[0]))

static const gguf_type_desc *gguf_type_desc_of(int32_t type) {
    if (type < 0 || type >= GGUF_N_TYPES || !gguf_types[type].name) return NULL;
    return &gguf_types[type];
}

size_t gguf_type_size(int32_t type) {
    const gguf_type_desc *d = gguf_type_desc_of(type);
    return d ? d->bytes : 0;
}

size_t gguf_block_size(int32_t type) {
    const gguf_type_desc *d = gguf_type_desc_of(type);
    return d ? d->block_elems : 0;
}

const char *gguf_type_name(int32_t type) {
    const gguf_type_desc *d = gguf_type_desc_of(type);
    return d ? d->name : "unknown";
}

/* ---- metadata value types ------------------------------------------------------------------ */

static const char *const gguf_value_names[GGUF_TYPE_COUNT] = {
    "uint8", "int8", "uint16", "int16", "uint32", "int32", "float32",
    "bool", "string", "array", "uint64", "int64", "float64",
};

const char *gguf_value_type_name(int32_t type) {
    return type >= 0 && type < GGUF_TYPE_COUNT ? gguf_value_names[type] : "unknown";
}

/* Bytes of one scalar of the type; 0 for string and array (variable size). */
static uint64_t gguf_scalar_size(int32_t type) {
    switch (type) {
    case GGUF_TYPE_UINT8: case GGUF_TYPE_INT8: case GGUF_TYPE_BOOL: return 1;
    case GGUF_TYPE_UINT16: case GGUF_TYPE_INT16: return 2;
    case GGUF_TYPE_UINT32: case GGUF_TYPE_INT32: case GGUF_TYPE_FLOAT32: return 4;
    case GGUF_TYPE_UINT64: case GGUF_TYPE_INT64: case GGUF_TYPE_FLOAT64: return 8;
    default: return 0;
    }
}

/* ---- the bounded cursor -------------------------------------------------------------------- */

typedef struct {
    const uint8_t *p;
    uint64_t size;
    uint64_t pos;
    char *err;
    size_t err_len;
} gguf_reader;

static uint64_t gguf_left(const gguf_reader *r) { return r->size - r->pos; }

/* Claim n bytes at the cursor; `what` names them in the message. */
static tide_status gguf_take(gguf_reader *r, uint64_t n, uint64_t *at, const char *what) {
    if (n > gguf_left(r))
        return tide_errf(r->err, r->err_len, TIDE_ERR_FORMAT,
                         "%s at offset %llu: needs %llu bytes, file ends after %llu "
                         "(size %llu)",
                         what, (ull)r->pos, (ull)n, (ull)gguf_left(r), (ull)r->size);
    if (at) *at = r->pos;
    r->pos += n;
    return TIDE_OK;
}

static tide_status gguf_read_u32(gguf_reader *r, uint32_t *v, const char *what) {
    uint64_t at = 0;
    tide_status st = gguf_take(r, 4, &at, what);
    if (st == TIDE_OK) memcpy(v, r->p + at, 4);
    return st;
}

static tide_status gguf_read_u64(gguf_reader *r, uint64_t *v, const char *what) {
    uint64_t at = 0;
    tide_status st = gguf_take(r, 8, &at, what);
    if (st == TIDE_OK) memcpy(v, r->p + at, 8);
    return st;
}

/* A GGUF string: u64 length, then the bytes. *off = offset of the bytes. */
static tide_status gguf_read_str(gguf_reader *r, uint64_t *off, uint64_t *len, const char *what) {
    uint64_t start = r->pos;
    tide_status st = gguf_read_u64(r, len, what);
    if (st != TIDE_OK) return st;
    if (*len > gguf_left(r))
        return tide_errf(r->err, r->err_len, TIDE_ERR_FORMAT,
                         "%s: string length %llu at offset %llu extends past end of file "
                         "(size %llu)",
                         what, (ull)*len, (ull)start, (ull)r->size);
    return gguf_take(r, *len, off, what);
}

/* ---- name index ---------------------------------------------------------------------------- */

static uint64_t gguf_hash(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 1099511628211ull;
    return h;
}

static tide_status gguf_index_init(gguf_index *ix, int64_t n) {
    uint64_t cap = 8;
    while (cap < (uint64_t)n * 2) cap <<= 1; /* load <= 1/2 keeps probes short */
    ix->slots = calloc(cap, sizeof *ix->slots);
    ix->mask = cap - 1;
    return ix->slots ? TIDE_OK : TIDE_ERR_NOMEM;
}

typedef struct {
    const char *s;
    size_t n;
} gguf_name;

/* Find `name` among the indexed names (get(ctx, i) gives name i). Returns the slot where it is
 * or where it would go; *found = index or -1. */
typedef gguf_name (*gguf_name_fn)(const gguf_file *f, int64_t i);

static uint64_t gguf_index_probe(const gguf_index *ix, const gguf_file *f, gguf_name_fn get,
                                 const char *s, size_t n, int64_t *found) {
    uint64_t h = gguf_hash(s, n) & ix->mask;
    *found = -1;
    while (ix->slots[h]) {
        int64_t i = (int64_t)ix->slots[h] - 1;
        gguf_name other = get(f, i);
        if (other.n == n && memcmp(other.s, s, n) == 0) {
            *found = i;
            break;
        }
        h = (h + 1) & ix->mask;
    }
    return h;
}

static gguf_name gguf_kv_name(const gguf_file *f, int64_t i) {
    return (gguf_name){f->kv[i].key, f->kv[i].key_len};
}

static gguf_name gguf_tensor_name(const gguf_file *f, int64_t i) {
    return (gguf_name){f->tensors[i].name, strlen(f->tensors[i].name)};
}

/* ---- metadata parsing ---------------------------------------------------------------------- */

/* Printable prefix of a key for messages (keys are not NUL-terminated and may hold anything). */
static void gguf_quote(char *dst, size_t dst_len, const char *s, uint64_t n) {
    size_t j = 0;
    for (uint64_t i = 0; i < n && j + 4 < dst_len; i++) {
        unsigned char c = (unsigned char)s[i];
        dst[j++] = (c >= 32 && c < 127) ? (char)c : '?';
    }
    if (n > 0 && j < n && j + 4 >= dst_len) {
        memcpy(dst + j, "...", 3);
        j += 3;
    }
    dst[j] = '\0';
}

static tide_status gguf_parse_array(gguf_reader *r, gguf_kv *kv, const char *what) {
    uint32_t et;
    tide_status st = gguf_read_u32(r, &et, what);
    if (st == TIDE_OK) st = gguf_read_u64(r, &kv->len, what);
    if (st != TIDE_OK) return st;
    kv->elem_type = (int32_t)et;
    if (et == GGUF_TYPE_ARRAY)
        return tide_errf(r->err, r->err_len, TIDE_ERR_FORMAT,
                         "%s: arrays of arrays are not supported", what);
    if (et >= GGUF_TYPE_COUNT)
        return tide_errf(r->err, r->err_len, TIDE_ERR_FORMAT,
                         "%s: unknown array element type %u", what, et);
    kv->off = r->pos;
    if (et != GGUF_TYPE_STRING) {
        uint64_t es = gguf_scalar_size((int32_t)et);
        if (kv->len > gguf_left(r) / es) /* division first: no overflow */
            return tide_errf(r->err, r->err_len, TIDE_ERR_FORMAT,
                             "%s: array of %llu %s at offset %llu extends past end of file "
                             "(size %llu)",
                             what, (ull)kv->len, gguf_value_type_name((int32_t)et), (ull)r->pos,
                             (ull)r->size);
        return gguf_take(r, kv->len * es, NULL, what);
    }
    if (kv->len > gguf_left(r) / 8) /* each string takes at least its 8-byte length */
        return tide_errf(r->err, r->err_len, TIDE_ERR_FORMAT,
                         "%s: array of %llu strings at offset %llu cannot fit in the file "
                         "(size %llu)",
                         what, (ull)kv->len, (ull)r->pos, (ull)r->size);
    kv->str_offs = malloc((kv->len ? kv->len : 1) * sizeof *kv->str_offs);
    if (!kv->str_offs)
        return tide_errf(r->err, r->err_len, TIDE_ERR_NOMEM,
                         "%s: out of memory indexing %llu strings", what, (ull)kv->len);
    for (uint64_t i = 0; i < kv->len; i++) {
        uint64_t off, len;
        kv->str_offs[i] = r->pos;
        st = gguf_read_str(r, &off, &len, what);
        if (st != TIDE_OK) return st;
    }
    return TIDE_OK;
}

static tide_status gguf_parse_value(gguf_reader *r, gguf_kv *kv, const char *what) {
    if (kv->type == GGUF_TYPE_STRING) return gguf_read_str(r, &kv->off, &kv->len, what);
    if (kv->type == GGUF_TYPE_ARRAY) return gguf_parse_array(r, kv, what);
    return gguf_take(r, gguf_scalar_size(kv->type), &kv->off, what);
}

static tide_status gguf_parse_kv(gguf_file *f, gguf_reader *r, int64_t i) {
    gguf_kv *kv = &f->kv[i];
    char what[192], q[96];
    snprintf(what, sizeof what, "key of kv %lld", (long long)i);
    uint64_t koff, klen;
    tide_status st = gguf_read_str(r, &koff, &klen, what);
    if (st != TIDE_OK) return st;
    if (klen == 0)
        return tide_errf(r->err, r->err_len, TIDE_ERR_FORMAT, "kv %lld: empty key", (long long)i);
    kv->key = (const char *)r->p + koff;
    kv->key_len = (size_t)klen;
    gguf_quote(q, sizeof q, kv->key, klen);
    snprintf(what, sizeof what, "kv %lld ('%s')", (long long)i, q);
    uint32_t type;
    st = gguf_read_u32(r, &type, what);
    if (st != TIDE_OK) return st;
    if (type >= GGUF_TYPE_COUNT)
        return tide_errf(r->err, r->err_len, TIDE_ERR_FORMAT, "%s: unknown value type %u", what,
                         type);
    kv->type = (int32_t)type;
    st = gguf_parse_value(r, kv, what);
    if (st != TIDE_OK) return st;
    int64_t dup;
    uint64_t slot = gguf_index_probe(&f->kv_index, f, gguf_kv_name, kv->key, kv->key_len, &dup);
    if (dup >= 0)
        return tide_errf(r->err, r->err_len, TIDE_ERR_FORMAT, "%s: duplicate key (also kv %lld)",
                         what, (long long)dup);
    f->kv_index.slots[slot] = (uint32_t)(i + 1);
    return TIDE_OK;
}

/* Integer value of kv (any integer type) as a signed/unsigned pair; false if not an integer. */
static bool gguf_kv_int(const gguf_file *f, const gguf_kv *kv, bool *neg, uint64_t *mag) {
    const uint8_t *p = f->base + kv->off;
    int64_t s = 0;
    uint64_t u = 0;
    bool is_signed = true;
    switch (kv->type) {
    case GGUF_TYPE_UINT8: { uint8_t v; memcpy(&v, p, 1); u = v; is_signed = false; break; }
    case GGUF_TYPE_UINT16: { uint16_t v; memcpy(&v, p, 2); u = v; is_signed = false; break; }
    case GGUF_TYPE_UINT32: { uint32_t v; memcpy(&v, p, 4); u = v; is_signed = false; break; }
    case GGUF_TYPE_UINT64: { memcpy(&u, p, 8); is_signed = false; break; }
    case GGUF_TYPE_INT8: { int8_t v; memcpy(&v, p, 1); s = v; break; }
    case GGUF_TYPE_INT16: { int16_t v; memcpy(&v, p, 2); s = v; break; }
    case GGUF_TYPE_INT32: { int32_t v; memcpy(&v, p, 4); s = v; break; }
    case GGUF_TYPE_INT64: { memcpy(&s, p, 8); break; }
    default: return false;
    }
    if (is_signed) {
        *neg = s < 0;
        *mag = s < 0 ? (uint64_t)(-(s + 1)) + 1 : (uint64_t)s; /* no overflow at INT64_MIN */
    } else {
        *neg = false;
        *mag = u;
    }
    return true;
}

static tide_status gguf_parse_alignment(gguf_file *f, gguf_reader *r) {
    f->alignment = GGUF_DEFAULT_ALIGNMENT;
    int64_t i = gguf_find_key(f, "general.alignment");
    if (i < 0) return TIDE_OK;
    bool neg;
    uint64_t v;
    if (!gguf_kv_int(f, &f->kv[i], &neg, &v))
        return tide_errf(r->err, r->err_len, TIDE_ERR_FORMAT,
                         "general.alignment has type %s, expected an integer",
                         gguf_value_type_name(f->kv[i].type));
    if (neg || v == 0 || (v & (v - 1)) != 0 || v > UINT32_MAX)
        return tide_errf(r->err, r->err_len, TIDE_ERR_FORMAT,
                         "general.alignment = %s%llu is not a power of two in [1, 2^31]",
                         neg ? "-" : "", (ull)v);
    f->alignment = v;
    return TIDE_OK;
}

/* ---- tensor infos -------------------------------------------------------------------------- */

static tide_status gguf_parse_dims(gguf_reader *r, gguf_tensor_info *t, const char *what) {
    uint32_t n_dims;
    tide_status st = gguf_read_u32(r, &n_dims, what);
    if (st != TIDE_OK) return st;
    if (n_dims < 1 || n_dims > GGUF_MAX_DIMS)
        return tide_errf(r->err, r->err_len, TIDE_ERR_FORMAT, "%s: n_dims %u is not in 1..%d",
                         what, n_dims, GGUF_MAX_DIMS);
    t->n_dims = (int32_t)n_dims;
    int64_t n_el = 1;
    for (int d = 0; d < GGUF_MAX_DIMS; d++) t->ne[d] = 1;
    for (uint32_t d = 0; d < n_dims; d++) {
        uint64_t ne;
        st = gguf_read_u64(r, &ne, what);
        if (st != TIDE_OK) return st;
        if (ne == 0 || ne > (uint64_t)INT64_MAX)
            return tide_errf(r->err, r->err_len, TIDE_ERR_FORMAT,
                             "%s: dim %u = %llu is not a positive int64", what, d, (ull)ne);
        if ((uint64_t)n_el > (uint64_t)INT64_MAX / ne)
            return tide_errf(r->err, r->err_len, TIDE_ERR_FORMAT,
                             "%s: element count overflows at dim %u (= %llu)", what, d, (ull)ne);
        t->ne[d] = (int64_t)ne;
        n_el *= (int64_t)ne;
    }
    t->n_elements = n_el;
    return TIDE_OK;
}

static tide_status gguf_parse_type(gguf_reader *r, gguf_tensor_info *t, const char *what) {
    uint32_t type;
    tide_status st = gguf_read_u32(r, &type, what);
    if (st != TIDE_OK) return st;
    const gguf_type_desc *d = type <= INT32_MAX ? gguf_type_desc_of((int32_t)type) : NULL;
    if (!d)
        return tide_errf(r->err, r->err_len, TIDE_ERR_FORMAT, "%s: unknown ggml type %u", what,
                         type);
    t->type = (int32_t)type;
    if (t->ne[0] % d->block_elems != 0)
        return tide_errf(r->err, r->err_len, TIDE_ERR_FORMAT,
                         "%s: row length %lld is not a multiple of the %s block size %u", what,
                         (long long)t->ne[0], d->name, (unsigned)d->block_elems);
    uint64_t blocks = (uint64_t)t->n_elements / d->block_elems;
    if (blocks > UINT64_MAX / d->bytes)
        return tide_errf(r->err, r->err_len, TIDE_ERR_FORMAT, "%s: byte size overflows", what);
    t->nbytes = blocks * d->bytes;
    return TIDE_OK;
}

static tide_status gguf_parse_tensor(gguf_file *f, gguf_reader *r, int64_t i, char **names_end) {
    gguf_tensor_info *t = &f->tensors[i];
    char what[GGUF_MAX_NAME + 64];
    snprintf(what, sizeof what, "name of tensor %lld", (long long)i);
    uint64_t noff, nlen;
    tide_status st = gguf_read_str(r, &noff, &nlen, what);
    if (st != TIDE_OK) return st;
    const char *raw = (const char *)r->p + noff;
    if (nlen == 0 || nlen > GGUF_MAX_NAME || memchr(raw, '\0', (size_t)nlen))
        return tide_errf(r->err, r->err_len, TIDE_ERR_FORMAT,
                         "tensor %lld: name of %llu bytes is empty, longer than %d or holds a "
                         "NUL byte",
                         (long long)i, (ull)nlen, GGUF_MAX_NAME);
    memcpy(*names_end, raw, (size_t)nlen);
    (*names_end)[nlen] = '\0';
    t->name = *names_end;
    *names_end += nlen + 1;
    char q[GGUF_MAX_NAME + 8];
    gguf_quote(q, sizeof q, t->name, nlen);
    snprintf(what, sizeof what, "tensor '%s'", q);
    int64_t dup;
    uint64_t slot = gguf_index_probe(&f->tensor_index, f, gguf_tensor_name, t->name,
                                     (size_t)nlen, &dup);
    if (dup >= 0)
        return tide_errf(r->err, r->err_len, TIDE_ERR_FORMAT,
                         "%s: duplicate tensor name (tensors %lld and %lld)", what,
                         (long long)dup, (long long)i);
    if ((st = gguf_parse_dims(r, t, what)) != TIDE_OK) return st;
    if ((st = gguf_parse_type(r, t, what)) != TIDE_OK) return st;
    if ((st = gguf_read_u64(r, &t->offset, what)) != TIDE_OK) return st;
    if (t->offset % f->alignment != 0)
        return tide_errf(r->err, r->err_len, TIDE_ERR_FORMAT,
                         "%s: data offset %llu is not a multiple of the alignment %llu", what,
                         (ull)t->offset, (ull)f->alignment);
    f->tensor_index.slots[slot] = (uint32_t)(i + 1);
    return TIDE_OK;
}

typedef struct {
    uint64_t offset;
    int64_t index;
} gguf_span;

static int gguf_span_cmp(const void *a, const void *b) {
    const gguf_span *x = a, *y = b;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

/* No two tensors' data may share bytes: a tensor whose type or shape claims more bytes than its
 * writer gave it runs into the next one (e.g. q4_k data declared q6_k), which the file's size
 * alone cannot show. */
static tide_status gguf_check_overlaps(gguf_file *f, char *err, size_t err_len) {
    if (f->n_tensors < 2) return TIDE_OK;
    gguf_span *s = malloc((size_t)f->n_tensors * sizeof *s);
    if (!s) return tide_errf(err, err_len, TIDE_ERR_NOMEM, "out of memory for %lld tensor spans",
                             (long long)f->n_tensors);
    for (int64_t i = 0; i < f->n_tensors; i++) s[i] = (gguf_span){f->tensors[i].offset, i};
    qsort(s, (size_t)f->n_tensors, sizeof *s, gguf_span_cmp);
    tide_status st = TIDE_OK;
    for (int64_t k = 0; k + 1 < f->n_tensors; k++) {
        const gguf_tensor_info *a = &f->tensors[s[k].index], *b = &f->tensors[s[k + 1].index];
        if (a->nbytes > b->offset - a->offset) {
            st = tide_errf(err, err_len, TIDE_ERR_FORMAT,
                           "tensor '%s': %llu bytes of %s [%lld, %lld] at offset %llu run into "
                           "tensor '%s' at offset %llu: the type or shape does not match the data",
                           a->name, (ull)a->nbytes, gguf_type_name(a->type), (long long)a->ne[0],
                           (long long)a->ne[1], (ull)a->offset, b->name, (ull)b->offset);
            break;
        }
    }
    free(s);
    return st;
}

/* Place every tensor's data once the data section's start is known. */
static tide_status gguf_place_tensors(gguf_file *f, char *err, size_t err_len) {
    for (int64_t i = 0; i < f->n_tensors; i++) {
        gguf_tensor_info *t = &f->tensors[i];
        uint64_t room = f->data_offset <= f->size ? f->size - f->data_offset : 0;
        if (t->offset > room || t->nbytes > room - t->offset)
            return tide_errf(err, err_len, TIDE_ERR_FORMAT,
                             "tensor '%s': data [offset %llu, size %llu] (data section at %llu) "
                             "extends past end of file (size %llu)",
                             t->name, (ull)t->offset, (ull)t->nbytes, (ull)f->data_offset,
                             (ull)f->size);
        t->file_offset = f->data_offset + t->offset;
        t->data = f->base + t->file_offset;
    }
    return gguf_check_overlaps(f, err, err_len);
}

/* ---- the whole file ------------------------------------------------------------------------ */

static tide_status gguf_parse_header(gguf_file *f, gguf_reader *r, uint64_t *n_tensors,
                                     uint64_t *n_kv) {
    if (r->size < GGUF_HEADER_BYTES)
        return tide_errf(r->err, r->err_len, TIDE_ERR_FORMAT,
                         "file is %llu bytes, shorter than the %u-byte GGUF header",
                         (ull)r->size, GGUF_HEADER_BYTES);
    if (memcmp(r->p, GGUF_MAGIC, 4) != 0) {
        char q[8];
        gguf_quote(q, sizeof q, (const char *)r->p, 4);
        return tide_errf(r->err, r->err_len, TIDE_ERR_FORMAT,
                         "bad magic '%s' (%02x %02x %02x %02x): not a GGUF file", q, r->p[0],
                         r->p[1], r->p[2], r->p[3]);
    }
    r->pos = 4;
    gguf_read_u32(r, &f->version, "version");
    if (f->version != 2 && f->version != 3)
        return tide_errf(r->err, r->err_len, TIDE_ERR_FORMAT,
                         "GGUF version %u is not supported (2 and 3 are%s)", f->version,
                         f->version == 0x03000000u || f->version == 0x02000000u
                             ? "; this looks like a big-endian file"
                             : "");
    gguf_read_u64(r, n_tensors, "n_tensors");
    gguf_read_u64(r, n_kv, "n_kv");
    uint64_t left = gguf_left(r);
    if (*n_kv > left / GGUF_MIN_KV_BYTES)
        return tide_errf(r->err, r->err_len, TIDE_ERR_FORMAT,
                         "header: n_kv = %llu cannot fit in a file of %llu bytes", (ull)*n_kv,
                         (ull)r->size);
    if (*n_tensors > left / GGUF_MIN_TENSOR_BYTES ||
        *n_kv * GGUF_MIN_KV_BYTES + *n_tensors * GGUF_MIN_TENSOR_BYTES > left)
        return tide_errf(r->err, r->err_len, TIDE_ERR_FORMAT,
                         "header: n_tensors = %llu (with n_kv = %llu) cannot fit in a file of "
                         "%llu bytes",
                         (ull)*n_tensors, (ull)*n_kv, (ull)r->size);
    return TIDE_OK;
}

static tide_status gguf_alloc_tables(gguf_file *f, gguf_reader *r, uint64_t n_tensors,
                                     uint64_t n_kv) {
    /* counts are bounded by the file size (gguf_parse_header), so these sizes cannot overflow;
     * indices are stored +1 in uint32 slots, so refuse more than that can hold */
    if (n_kv >= UINT32_MAX || n_tensors >= UINT32_MAX)
        return tide_errf(r->err, r->err_len, TIDE_ERR_FORMAT, "header: too many entries");
    f->kv = calloc(n_kv ? n_kv : 1, sizeof *f->kv);
    f->tensors = calloc(n_tensors ? n_tensors : 1, sizeof *f->tensors);
    /* names: at most GGUF_MAX_NAME + 1 each, and never more than the file holds */
    uint64_t names = n_tensors * (GGUF_MAX_NAME + 1);
    if (names > r->size + n_tensors) names = r->size + n_tensors;
    f->names = malloc(names ? names : 1);
    if (!f->kv || !f->tensors || !f->names || gguf_index_init(&f->kv_index, (int64_t)n_kv) ||
        gguf_index_init(&f->tensor_index, (int64_t)n_tensors))
        return tide_errf(r->err, r->err_len, TIDE_ERR_NOMEM,
                         "out of memory for %llu kvs and %llu tensors", (ull)n_kv,
                         (ull)n_tensors);
    return TIDE_OK;
}

static tide_status gguf_parse(gguf_file *f, char *err, size_t err_len) {
    gguf_reader r = {f->base, f->size, 0, err, err_len};
    uint64_t n_tensors = 0, n_kv = 0;
    tide_status st = gguf_parse_header(f, &r, &n_tensors, &n_kv);
    if (st == TIDE_OK) st = gguf_alloc_tables(f, &r, n_tensors, n_kv);
    for (uint64_t i = 0; st == TIDE_OK && i < n_kv; i++) {
        st = gguf_parse_kv(f, &r, (int64_t)i);
        f->n_kv = (int64_t)i + 1; /* so that gguf_close frees what this kv allocated */
    }
    if (st == TIDE_OK) st = gguf_parse_alignment(f, &r);
    char *names_end = f->names;
    for (uint64_t i = 0; st == TIDE_OK && i < n_tensors; i++)
        st = gguf_parse_tensor(f, &r, (int64_t)i, &names_end);
    if (st != TIDE_OK) return st;
    f->n_tensors = (int64_t)n_tensors;
    /* the data section starts at the next multiple of the alignment (r.pos <= size < 2^63 and
     * alignment <= 2^32: no overflow) */
    f->data_offset = (r.pos + f->alignment - 1) / f->alignment * f->alignment;
    return gguf_place_tensors(f, err, err_len);
}

tide_status gguf_open_memory(const void *data, size_t size, gguf_file **out, char *err,
                             size_t err_len) {
    if (err && err_len) err[0] = '\0';
    if (!out) return tide_errf(err, err_len, TIDE_ERR_ARG, "gguf_open_memory: out is NULL");
    *out = NULL;
    if (!data && size)
        return tide_errf(err, err_len, TIDE_ERR_ARG, "gguf_open_memory: data is NULL");
    gguf_file *f = calloc(1, sizeof *f);
    if (!f) return tide_errf(err, err_len, TIDE_ERR_NOMEM, "out of memory");
    f->base = data;
    f->size = size;
    tide_status st = gguf_parse(f, err, err_len);
    if (st != TIDE_OK) {
        gguf_close(f);
        return st;
    }
    *out = f;
    return TIDE_OK;
}

tide_status gguf_open(const char *path, gguf_file **out, char *err, size_t err_len) {
    if (err && err_len) err[0] = '\0';
    if (!out) return tide_errf(err, err_len, TIDE_ERR_ARG, "gguf_open: out is NULL");
    *out = NULL;
    if (!path) return tide_errf(err, err_len, TIDE_ERR_ARG, "gguf_open: path is NULL");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return tide_errf(err, err_len, TIDE_ERR_IO, "cannot open '%s': %s", path,
                                 strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int e = errno;
        close(fd);
        return tide_errf(err, err_len, TIDE_ERR_IO, "cannot stat '%s': %s", path, strerror(e));
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        return tide_errf(err, err_len, TIDE_ERR_IO, "'%s' is not a regular file", path);
    }
    uint64_t size = (uint64_t)sb.st_size;
    if (size < GGUF_HEADER_BYTES) {
        close(fd);
        return tide_errf(err, err_len, TIDE_ERR_FORMAT,
                         "'%s': file is %llu bytes, shorter than the %u-byte GGUF header", path,
                         (ull)size, GGUF_HEADER_BYTES);
    }
    void *map = mmap(NULL, (size_t)size, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd); /* the mapping keeps the file */
    if (map == MAP_FAILED)
        return tide_errf(err, err_len, TIDE_ERR_IO, "cannot mmap '%s' (%llu bytes): %s", path,
                         (ull)size, strerror(e));
#ifdef MADV_HUGEPAGE
    /* The weights are read once a step from DRAM, and on 2 MiB pages those reads take fewer TLB
     * misses: one-token forwards' expert reads 16.0-16.6 -> 18.9-20.1 GB/s in q4_k_m on this
     * project's machine (bench/results/bench_onerow_cpu_2core.txt). Linux with large page-cache
     * folios (6.x, ext4 / xfs) then reads the file in 2 MiB pieces and maps them whole. Only a
     * hint: where the kernel declines, nothing changes. */
    madvise(map, (size_t)size, MADV_HUGEPAGE);
#endif
    tide_status st = gguf_open_memory(map, (size_t)size, out, err, err_len);
    if (st != TIDE_OK) {
        munmap(map, (size_t)size);
        return st;
    }
    (*out)->mapped = true;
    return TIDE_OK;
}

void gguf_close(gguf_file *f) {
    if (!f) return;
    for (int64_t i = 0; f->kv && i < f->n_kv; i++) free(f->kv[i].str_offs);
    free(f->kv);
    free(f->kv_index.slots);
    free(f->tensors);
    free(f->tensor_index.slots);
    free(f->names);
    if (f->mapped) munmap((void *)f->base, (size_t)f->size);
    free(f);
}

/* ---- file accessors ------------------------------------------------------------------------ */

uint32_t gguf_version(const gguf_file *f) { return f->version; }
uint64_t gguf_file_size(const gguf_file *f) { return f->size; }
const void *gguf_file_base(const gguf_file *f) { return f->base; }
uint64_t gguf_alignment(const gguf_file *f) { return f->alignment; }
uint64_t gguf_data_offset(const gguf_file *f) { return f->data_offset; }

const void *gguf_data_base(const gguf_file *f) {
    /* with no tensors the padded start may lie past the end: point at the end instead */
    return f->base + (f->data_offset <= f->size ? f->data_offset : f->size);
}

/* ---- metadata accessors -------------------------------------------------------------------- */

int64_t gguf_n_kv(const gguf_file *f) { return f->n_kv; }

int64_t gguf_find_key(const gguf_file *f, const char *key) {
    if (!key || !f->kv_index.slots) return -1;
    int64_t found;
    gguf_index_probe(&f->kv_index, f, gguf_kv_name, key, strlen(key), &found);
    return found;
}

const char *gguf_kv_key(const gguf_file *f, int64_t i, size_t *len) {
    if (i < 0 || i >= f->n_kv) {
        if (len) *len = 0;
        return NULL;
    }
    if (len) *len = f->kv[i].key_len;
    return f->kv[i].key;
}

int32_t gguf_kv_type(const gguf_file *f, int64_t i) {
    return i >= 0 && i < f->n_kv ? f->kv[i].type : -1;
}

/* The kv of `key`, or an error naming it; `want` describes the expected type. */
static tide_status gguf_lookup(const gguf_file *f, const char *key, const gguf_kv **kv,
                               char *err, size_t err_len) {
    int64_t i = gguf_find_key(f, key);
    if (i < 0) return tide_errf(err, err_len, TIDE_ERR_MODEL, "key '%s' not found", key);
    *kv = &f->kv[i];
    return TIDE_OK;
}

static tide_status gguf_mismatch(const gguf_kv *kv, const char *key, const char *want,
                                 char *err, size_t err_len) {
    if (kv->type == GGUF_TYPE_ARRAY)
        return tide_errf(err, err_len, TIDE_ERR_MODEL,
                         "key '%s' is an array of %s, expected %s", key,
                         gguf_value_type_name(kv->elem_type), want);
    return tide_errf(err, err_len, TIDE_ERR_MODEL, "key '%s' has type %s, expected %s", key,
                     gguf_value_type_name(kv->type), want);
}

/* Integer value of key within [lo, hi] (as sign + magnitude bounds). */
static tide_status gguf_get_int(const gguf_file *f, const char *key, bool *neg, uint64_t *mag,
                                char *err, size_t err_len) {
    const gguf_kv *kv = NULL;
    tide_status st = gguf_lookup(f, key, &kv, err, err_len);
    if (st != TIDE_OK) return st;
    if (!gguf_kv_int(f, kv, neg, mag)) return gguf_mismatch(kv, key, "an integer", err, err_len);
    return TIDE_OK;
}

tide_status gguf_get_u32(const gguf_file *f, const char *key, uint32_t *out, char *err,
                         size_t err_len) {
    bool neg;
    uint64_t v;
    tide_status st = gguf_get_int(f, key, &neg, &v, err, err_len);
    if (st != TIDE_OK) return st;
    if (neg || v > UINT32_MAX)
        return tide_errf(err, err_len, TIDE_ERR_MODEL, "key '%s' = %s%llu does not fit in uint32",
                         key, neg ? "-" : "", (ull)v);
    *out = (uint32_t)v;
    return TIDE_OK;
}

tide_status gguf_get_i32(const gguf_file *f, const char *key, int32_t *out, char *err,
                         size_t err_len) {
    bool neg;
    uint64_t v;
    tide_status st = gguf_get_int(f, key, &neg, &v, err, err_len);
    if (st != TIDE_OK) return st;
    if (neg ? v > (uint64_t)INT32_MAX + 1 : v > INT32_MAX)
        return tide_errf(err, err_len, TIDE_ERR_MODEL, "key '%s' = %s%llu does not fit in int32",
                         key, neg ? "-" : "", (ull)v);
    *out = neg ? (int32_t)(-(int64_t)v) : (int32_t)v;
    return TIDE_OK;
}

tide_status gguf_get_u64(const gguf_file *f, const char *key, uint64_t *out, char *err,
                         size_t err_len) {
    bool neg;
    uint64_t v;
    tide_status st = gguf_get_int(f, key, &neg, &v, err, err_len);
    if (st != TIDE_OK) return st;
    if (neg)
        return tide_errf(err, err_len, TIDE_ERR_MODEL, "key '%s' = -%llu is negative", key,
                         (ull)v);
    *out = v;
    return TIDE_OK;
}

tide_status gguf_get_f32(const gguf_file *f, const char *key, float *out, char *err,
                         size_t err_len) {
    const gguf_kv *kv = NULL;
    tide_status st = gguf_lookup(f, key, &kv, err, err_len);
    if (st != TIDE_OK) return st;
    if (kv->type == GGUF_TYPE_FLOAT32) {
        memcpy(out, f->base + kv->off, 4);
    } else if (kv->type == GGUF_TYPE_FLOAT64) {
        double d;
        memcpy(&d, f->base + kv->off, 8);
        *out = (float)d;
    } else {
        return gguf_mismatch(kv, key, "float32", err, err_len);
    }
    return TIDE_OK;
}

tide_status gguf_get_bool(const gguf_file *f, const char *key, int *out, char *err,
                          size_t err_len) {
    const gguf_kv *kv = NULL;
    tide_status st = gguf_lookup(f, key, &kv, err, err_len);
    if (st != TIDE_OK) return st;
    if (kv->type != GGUF_TYPE_BOOL) return gguf_mismatch(kv, key, "bool", err, err_len);
    *out = f->base[kv->off] != 0;
    return TIDE_OK;
}

tide_status gguf_get_str(const gguf_file *f, const char *key, const char **s, size_t *len,
                         char *err, size_t err_len) {
    const gguf_kv *kv = NULL;
    tide_status st = gguf_lookup(f, key, &kv, err, err_len);
    if (st != TIDE_OK) return st;
    if (kv->type != GGUF_TYPE_STRING) return gguf_mismatch(kv, key, "string", err, err_len);
    *s = (const char *)f->base + kv->off;
    *len = (size_t)kv->len;
    return TIDE_OK;
}

static tide_status gguf_lookup_array(const gguf_file *f, const char *key, const gguf_kv **kv,
                                     char *err, size_t err_len) {
    tide_status st = gguf_lookup(f, key, kv, err, err_len);
    if (st != TIDE_OK) return st;
    if ((*kv)->type != GGUF_TYPE_ARRAY) return gguf_mismatch(*kv, key, "an array", err, err_len);
    return TIDE_OK;
}

tide_status gguf_get_arr_info(const gguf_file *f, const char *key, int32_t *elem_type,
                              uint64_t *n, char *err, size_t err_len) {
    const gguf_kv *kv = NULL;
    tide_status st = gguf_lookup_array(f, key, &kv, err, err_len);
    if (st != TIDE_OK) return st;
    if (elem_type) *elem_type = kv->elem_type;
    if (n) *n = kv->len;
    return TIDE_OK;
}

tide_status gguf_get_arr_data(const gguf_file *f, const char *key, int32_t elem_type, void *dst,
                              uint64_t n, char *err, size_t err_len) {
    const gguf_kv *kv = NULL;
    tide_status st = gguf_lookup_array(f, key, &kv, err, err_len);
    if (st != TIDE_OK) return st;
    if (kv->elem_type != elem_type || elem_type == GGUF_TYPE_STRING)
        return tide_errf(err, err_len, TIDE_ERR_MODEL,
                         "key '%s' is an array of %s, expected an array of %s", key,
                         gguf_value_type_name(kv->elem_type), gguf_value_type_name(elem_type));
    if (n != kv->len)
        return tide_errf(err, err_len, TIDE_ERR_MODEL,
                         "key '%s' has %llu elements, the caller expects %llu", key,
                         (ull)kv->len, (ull)n);
    if (n) memcpy(dst, f->base + kv->off, (size_t)(n * gguf_scalar_size(elem_type)));
    return TIDE_OK;
}

tide_status gguf_get_arr_str(const gguf_file *f, const char *key, uint64_t i, const char **s,
                             size_t *len, char *err, size_t err_len) {
    const gguf_kv *kv = NULL;
    tide_status st = gguf_lookup_array(f, key, &kv, err, err_len);
    if (st != TIDE_OK) return st;
    if (kv->elem_type != GGUF_TYPE_STRING)
        return tide_errf(err, err_len, TIDE_ERR_MODEL,
                         "key '%s' is an array of %s, expected an array of string", key,
                         gguf_value_type_name(kv->elem_type));
    if (i >= kv->len)
        return tide_errf(err, err_len, TIDE_ERR_ARG, "key '%s': index %llu past its %llu strings",
                         key, (ull)i, (ull)kv->len);
    uint64_t n;
    memcpy(&n, f->base + kv->str_offs[i], 8);
    *s = (const char *)f->base + kv->str_offs[i] + 8;
    *len = (size_t)n;
    return TIDE_OK;
}

/* ---- tensor accessors ---------------------------------------------------------------------- */

int64_t gguf_n_tensors(const gguf_file *f) { return f->n_tensors; }

const gguf_tensor_info *gguf_tensor(const gguf_file *f, int64_t i) {
    return i >= 0 && i < f->n_tensors ? &f->tensors[i] : NULL;
}

int64_t gguf_find_tensor_index(const gguf_file *f, const char *name) {
    if (!name || !f->tensor_index.slots) return -1;
    int64_t found;
    gguf_index_probe(&f->tensor_index, f, gguf_tensor_name, name, strlen(name), &found);
    return found;
}

const gguf_tensor_info *gguf_find_tensor(const gguf_file *f, const char *name) {
    return gguf_tensor(f, gguf_find_tensor_index(f, name));
}

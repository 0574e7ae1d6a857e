/* gguf.h: a validating, read-only GGUF reader (format versions 2 and 3, little endian).
 *
 * gguf_open mmaps the file and checks everything before anything else trusts it: header, counts
 * against the file size, every string and array length, every value type, every tensor's name,
 * dims, type, alignment and data range (inside the file, no two tensors sharing bytes), duplicate
 * keys and tensor names. After a successful open
 * every accessor below is bounds-safe: pointers it returns lie inside the mapping, lengths are
 * exact. Failures return a tide_status (TIDE_ERR_IO: open/stat/mmap; TIDE_ERR_FORMAT: the bytes
 * are not a valid GGUF) and a message naming the cause in the caller's buffer; nothing aborts.
 *
 * Conventions
 * - `err`/`err_len`: the caller's message buffer; may be NULL/0 (then no message is written).
 *   The message is always NUL-terminated and truncated to fit.
 * - Metadata strings are NOT NUL-terminated: they are (pointer, length) pairs into the mapping,
 *   valid until gguf_close. Tensor names ARE NUL-terminated (copies owned by the gguf_file).
 * - Getters look a key up by its exact name. An absent key, or a value of the wrong type, is
 *   TIDE_ERR_MODEL (the file is a valid GGUF, just not what the caller needs) with a message
 *   naming the key and both types. Use gguf_find_key first for optional keys.
 * - Numeric metadata values and array elements are read with memcpy: they sit at arbitrary byte
 *   offsets in the file, so never cast a pointer into the mapping to int32_t* / float*.
 * - Tensor data starts at a multiple of general.alignment (default 32) from gguf_data_base, and
 *   the mapping's base is page-aligned, so `data` is aligned for alignments up to the page size.
 *
 * Typical use (model.c):
 *     gguf_file *g; char err[256];
 *     if (gguf_open(path, &g, err, sizeof err) != TIDE_OK) return ...;   // err names the cause
 *     uint32_t n_layer;
 *     st = gguf_get_u32(g, "llada2.block_count", &n_layer, err, sizeof err);
 *     const gguf_tensor_info *t = gguf_find_tensor(g, "blk.0.attn_qkv.weight");  // NULL: absent
 *     ... t->ne[0], t->type, t->data, t->nbytes ...
 *     gguf_close(g);
 */
#ifndef TIDE_GGUF_H
#define TIDE_GGUF_H

#include "tide.h"
#include <stddef.h>
#include <stdint.h>

#define GGUF_MAGIC "GGUF"
#define GGUF_DEFAULT_ALIGNMENT 32
#define GGUF_MAX_DIMS 4
#define GGUF_MAX_NAME 256 /* tensor names longer than this (bytes, without NUL) are refused */

/* Metadata value types, numbered as in the GGUF specification. */
typedef enum {
    GGUF_TYPE_UINT8 = 0,
    GGUF_TYPE_INT8 = 1,
    GGUF_TYPE_UINT16 = 2,
    GGUF_TYPE_INT16 = 3,
    GGUF_TYPE_UINT32 = 4,
    GGUF_TYPE_INT32 = 5,
    GGUF_TYPE_FLOAT32 = 6,
    GGUF_TYPE_BOOL = 7,
    GGUF_TYPE_STRING = 8,
    GGUF_TYPE_ARRAY = 9,
    GGUF_TYPE_UINT64 = 10,
    GGUF_TYPE_INT64 = 11,
    GGUF_TYPE_FLOAT64 = 12,
    GGUF_TYPE_COUNT
} gguf_value_type;

typedef struct gguf_file gguf_file;

/* One tensor, as validated at open. */
typedef struct {
    const char *name;          /* NUL-terminated, owned by the gguf_file */
    int32_t n_dims;            /* 1..4 */
    int64_t ne[GGUF_MAX_DIMS]; /* ggml order: ne[0] = row length; dims past n_dims are 1 */
    int32_t type;              /* ggml type id (tide_type for the ones the engine computes) */
    uint64_t offset;           /* from gguf_data_base; a multiple of the alignment */
    uint64_t file_offset;      /* from the start of the file (gguf_data_base + offset) */
    uint64_t nbytes;           /* bytes of the data, > 0 */
    int64_t n_elements;        /* ne[0] * ne[1] * ne[2] * ne[3] */
    const void *data;          /* into the mapping, [data, data + nbytes) inside the file */
} gguf_tensor_info;

/* ---- open / close ------------------------------------------------------------------------- */
/* mmap `path` read-only and validate it. On failure *out = NULL. */
tide_status gguf_open(const char *path, gguf_file **out, char *err, size_t err_len);
/* Parse a GGUF image already in memory (tests, fuzzing). The buffer is not copied: it must
 * outlive the gguf_file, and every pointer handed out points into it. */
tide_status gguf_open_memory(const void *data, size_t size, gguf_file **out, char *err,
                             size_t err_len);
/* Unmap and free; NULL is fine. */
void gguf_close(gguf_file *f);

/* ---- file ---------------------------------------------------------------------------------- */
uint32_t gguf_version(const gguf_file *f);
uint64_t gguf_file_size(const gguf_file *f);
const void *gguf_file_base(const gguf_file *f);   /* the first byte of the mapping */
uint64_t gguf_alignment(const gguf_file *f);      /* general.alignment, or 32 */
/* Offset of the tensor data section from the start of the file (a multiple of the alignment),
 * and a pointer to it. With no tensors the section may be empty and lie at the end of the file. */
uint64_t gguf_data_offset(const gguf_file *f);
const void *gguf_data_base(const gguf_file *f);

/* ---- metadata ------------------------------------------------------------------------------ */
int64_t gguf_n_kv(const gguf_file *f);
/* Index of `key`, or -1 if absent. O(n_kv) (n_kv is small: tens of keys). */
int64_t gguf_find_key(const gguf_file *f, const char *key);
/* Key text (not NUL-terminated) and value type of entry i (0 <= i < gguf_n_kv). */
const char *gguf_kv_key(const gguf_file *f, int64_t i, size_t *len);
int32_t gguf_kv_type(const gguf_file *f, int64_t i); /* gguf_value_type */
/* Name of a value type ("uint32", "string", ...; "unknown" out of range). */
const char *gguf_value_type_name(int32_t type);

/* Any integer type (u8..u64, i8..i64) whose value fits in the destination. */
tide_status gguf_get_u32(const gguf_file *f, const char *key, uint32_t *out, char *err,
                         size_t err_len);
tide_status gguf_get_i32(const gguf_file *f, const char *key, int32_t *out, char *err,
                         size_t err_len);
tide_status gguf_get_u64(const gguf_file *f, const char *key, uint64_t *out, char *err,
                         size_t err_len);
/* float32, or float64 (converted). */
tide_status gguf_get_f32(const gguf_file *f, const char *key, float *out, char *err,
                         size_t err_len);
/* bool only; any nonzero byte reads as true. */
tide_status gguf_get_bool(const gguf_file *f, const char *key, int *out, char *err,
                          size_t err_len);
/* string: *s points into the mapping, not NUL-terminated. */
tide_status gguf_get_str(const gguf_file *f, const char *key, const char **s, size_t *len,
                         char *err, size_t err_len);

/* Arrays. Nested arrays are refused at open, so an element type is never GGUF_TYPE_ARRAY. */
tide_status gguf_get_arr_info(const gguf_file *f, const char *key, int32_t *elem_type,
                              uint64_t *n, char *err, size_t err_len);
/* Copy a numeric (or bool) array whose element type is exactly `elem_type` into dst, which
 * holds n elements: n must equal the array's length (a copy, because elements are unaligned). */
tide_status gguf_get_arr_data(const gguf_file *f, const char *key, int32_t elem_type, void *dst,
                              uint64_t n, char *err, size_t err_len);
/* Element i of a string array: O(1) (offsets are indexed at open). */
tide_status gguf_get_arr_str(const gguf_file *f, const char *key, uint64_t i, const char **s,
                             size_t *len, char *err, size_t err_len);

/* ---- tensors ------------------------------------------------------------------------------- */
int64_t gguf_n_tensors(const gguf_file *f);
/* Tensor i in file order (0 <= i < gguf_n_tensors), NULL out of range. */
const gguf_tensor_info *gguf_tensor(const gguf_file *f, int64_t i);
/* Tensor by name (hash table, O(1)); NULL if absent. */
const gguf_tensor_info *gguf_find_tensor(const gguf_file *f, const char *name);
/* Index of the tensor by name, -1 if absent. */
int64_t gguf_find_tensor_index(const gguf_file *f, const char *name);

/* ---- ggml types ---------------------------------------------------------------------------- */
/* Bytes of one block of `type` and elements per block; 0 for a type this reader does not know.
 * Row bytes of n elements = n / gguf_block_size * gguf_type_size (n a multiple of the block). */
size_t gguf_type_size(int32_t type);
size_t gguf_block_size(int32_t type);
const char *gguf_type_name(int32_t type); /* "f32", "q8_0", ...; "unknown" */

#endif /* TIDE_GGUF_H */

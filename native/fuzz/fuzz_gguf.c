/* fuzz_gguf.c: libFuzzer target for the GGUF reader (make fuzz).
 *
 * Parses the input with gguf_open_memory (libFuzzer's buffer is exactly the input's size, so
 * AddressSanitizer sees any read past the end), then walks every accessor over what was accepted
 * and touches the first and last byte of every tensor and string it hands out.
 */
#include "gguf.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

static volatile uint8_t fuzz_sink;

static void fuzz_touch(const void *p, size_t n) {
    if (n == 0) return;
    fuzz_sink ^= ((const uint8_t *)p)[0] ^ ((const uint8_t *)p)[n - 1];
}

static void fuzz_kv(const gguf_file *f, int64_t i) {
    char key[512], err[256];
    size_t klen;
    const char *k = gguf_kv_key(f, i, &klen);
    if (!k || klen >= sizeof key) return;
    memcpy(key, k, klen);
    key[klen] = '\0';
    uint32_t u32; int32_t i32; uint64_t u64; float f32; int b;
    const char *s; size_t len;
    gguf_get_u32(f, key, &u32, err, sizeof err);
    gguf_get_i32(f, key, &i32, err, sizeof err);
    gguf_get_u64(f, key, &u64, err, sizeof err);
    gguf_get_f32(f, key, &f32, err, sizeof err);
    gguf_get_bool(f, key, &b, err, sizeof err);
    if (gguf_get_str(f, key, &s, &len, err, sizeof err) == TIDE_OK) fuzz_touch(s, len);
    int32_t et;
    uint64_t n;
    if (gguf_get_arr_info(f, key, &et, &n, err, sizeof err) != TIDE_OK) return;
    if (et == GGUF_TYPE_STRING) {
        for (uint64_t j = 0; j < n && j < 4096; j++)
            if (gguf_get_arr_str(f, key, j, &s, &len, err, sizeof err) == TIDE_OK)
                fuzz_touch(s, len);
    } else {
        uint8_t buf[1024];
        if (n <= 128) gguf_get_arr_data(f, key, et, buf, n, err, sizeof err);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    gguf_file *f = NULL;
    char err[512];
    if (gguf_open_memory(data, size, &f, err, sizeof err) != TIDE_OK) return 0;
    for (int64_t i = 0; i < gguf_n_kv(f); i++) fuzz_kv(f, i);
    for (int64_t i = 0; i < gguf_n_tensors(f); i++) {
        const gguf_tensor_info *t = gguf_tensor(f, i);
        fuzz_touch(t->data, (size_t)t->nbytes);
        if (gguf_find_tensor(f, t->name) != t) __builtin_trap(); /* names are unique */
    }
    gguf_close(f);
    return 0;
}

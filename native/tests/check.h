/* check.h: the few lines every native test shares: count checks, print failures, report, name
 * weight types in messages. C11 and C++17 (test_backend_ops.cu includes it too). */
#ifndef TIDE_TEST_CHECK_H
#define TIDE_TEST_CHECK_H

#include <stdint.h>
#include <stdio.h>

#include "tide.h"

static int n_pass, n_fail;

/* CHECK(cond, fmt, ...): count cond; on failure print where, the condition and the message. */
#define CHECK(cond, ...)                                                                      \
    do {                                                                                      \
        if (cond) {                                                                           \
            n_pass++;                                                                         \
        } else {                                                                              \
            n_fail++;                                                                         \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);                   \
            fprintf(stderr, __VA_ARGS__);                                                     \
            fprintf(stderr, "\n");                                                            \
        }                                                                                     \
    } while (0)

/* The closing line test runners read ("N passed, M failed"); the exit status. */
static inline int check_report(const char *name) {
    printf("%s: %d passed, %d failed\n", name, n_pass, n_fail);
    return n_fail ? 1 : 0;
}

/* The name of a weight type, for messages. The tests' own rather than the library's
 * gguf_type_name: the backend-ops test links the backends alone, without the GGUF reader. */
static inline const char *type_name(int32_t t) {
    switch (t) {
    case TIDE_TYPE_F32: return "f32";
    case TIDE_TYPE_F16: return "f16";
    case TIDE_TYPE_BF16: return "bf16";
    case TIDE_TYPE_Q4_0: return "q4_0";
    case TIDE_TYPE_Q4_K: return "q4_k";
    case TIDE_TYPE_Q5_K: return "q5_k";
    case TIDE_TYPE_Q6_K: return "q6_k";
    default: return "q8_0";
    }
}

#endif

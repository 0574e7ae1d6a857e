/* common.h: the bottom of the native stack, included by every other source: the one error
 * formatter, the one clock, and the one early-return macro. Nothing here knows a model, a
 * context or a backend. */
#ifndef TIDE_COMMON_H
#define TIDE_COMMON_H

#include "tide.h"

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Write a formatted message into err[err_len] (skipped when err is NULL or err_len is 0) and
 * return st. Every error message of the core is written by this function: into the caller's
 * buffer, a context's, a backend's or a residency state machine's. */
tide_status tide_errf(char *err, size_t err_len, tide_status st, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Seconds on a monotonic clock (the stats timers). */
double tide_now(void);

#ifdef __cplusplus
}
#endif

/* Return the status of `call` when it is not TIDE_OK. Callers wrap the call in whatever records
 * the message (e.g. TRY(be_check(ctx, op(...), "what"))), so the macro stays one line of logic. */
#define TRY(call)                                                                            \
    do {                                                                                     \
        tide_status try_st_ = (call);                                                        \
        if (try_st_ != TIDE_OK) return try_st_;                                              \
    } while (0)

#endif /* TIDE_COMMON_H */

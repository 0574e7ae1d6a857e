/* common.c: the error formatter and the clock (common.h). */
#include "common.h"

#include <stdarg.h>
#include <stdio.h>
#include <time.h>

tide_status tide_errf(char *err, size_t err_len, tide_status st, const char *fmt, ...) {
    if (err && err_len) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, err_len, fmt, ap);
        va_end(ap);
    }
    return st;
}

double tide_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

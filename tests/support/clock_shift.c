/* A host whose wall clock is wrong: preloaded into a process (LD_PRELOAD), it moves the wall
   clock (CLOCK_REALTIME, gettimeofday, time) by RECEIPTS_TEST_CLOCK_SHIFT seconds and leaves
   the monotonic clock and every sleep and wait alone, as a mis-set NTP-less host would. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

static long shift(void) {
    static long offset;
    static int ready;
    if (!ready) {
        const char *text = getenv("RECEIPTS_TEST_CLOCK_SHIFT");
        offset = text ? atol(text) : 0;
        ready = 1;
    }
    return offset;
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    static int (*real)(clockid_t, struct timespec *);
    if (!real) real = dlsym(RTLD_NEXT, "clock_gettime");
    int rc = real(id, ts);
    if (rc == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) ts->tv_sec += shift();
    return rc;
}

int gettimeofday(struct timeval *tv, void *tz) {
    static int (*real)(struct timeval *, void *);
    if (!real) real = dlsym(RTLD_NEXT, "gettimeofday");
    int rc = real(tv, tz);
    if (rc == 0 && tv) tv->tv_sec += shift();
    return rc;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}

/* Shifts CLOCK_REALTIME (and nothing else) of the process it is preloaded
 * into, by the number of seconds written in the file named by
 * FAILOVERD_TEST_CLOCK_OFFSET_FILE, read again at most every 20 ms of
 * CLOCK_MONOTONIC: writing the file steps the wall clock of every process of
 * a lab host at once, as an NTP step or an operator's `date -s` would.
 *
 * Linux time namespaces offset only CLOCK_MONOTONIC and CLOCK_BOOTTIME, and
 * libfaketime also rewrites sleeps and timeouts; this touches only what
 * clock_gettime(CLOCK_REALTIME*), gettimeofday() and time() return.
 *
 *   gcc -shared -fPIC -O2 -o clockshift.so clockshift.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

typedef int (*clock_gettime_fn)(clockid_t, struct timespec *);

static clock_gettime_fn real_clock_gettime;
static long long offset_ns;
static long long next_read_ns = -1;

static long long ns_of(const struct timespec *ts) { return (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec; }

static void refresh(void) {
    struct timespec now;
    if (real_clock_gettime(CLOCK_MONOTONIC, &now) != 0 || ns_of(&now) < next_read_ns) return;
    next_read_ns = ns_of(&now) + 20000000LL;
    const char *path = getenv("FAILOVERD_TEST_CLOCK_OFFSET_FILE");
    FILE *f = path ? fopen(path, "re") : NULL;
    if (!f) return;
    double seconds;
    if (fscanf(f, "%lf", &seconds) == 1) offset_ns = (long long)(seconds * 1e9);
    fclose(f);
}

static void shift(struct timespec *ts) {
    long long ns = ns_of(ts) + offset_ns;
    ts->tv_sec = ns / 1000000000LL;
    ts->tv_nsec = ns % 1000000000LL;
}

int clock_gettime(clockid_t clock, struct timespec *ts) {
    if (!real_clock_gettime) real_clock_gettime = (clock_gettime_fn)dlsym(RTLD_NEXT, "clock_gettime");
    int rc = real_clock_gettime(clock, ts);
    if (rc == 0 && (clock == CLOCK_REALTIME || clock == CLOCK_REALTIME_COARSE)) {
        refresh();
        shift(ts);
    }
    return rc;
}

int gettimeofday(struct timeval *tv, void *tz) {
    struct timespec ts;
    (void)tz;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) return -1;
    struct timeval *out = tv; /* glibc declares tv nonnull; callers may still pass NULL */
    __asm__("" : "+r"(out));
    if (out) {
        out->tv_sec = ts.tv_sec;
        out->tv_usec = ts.tv_nsec / 1000;
    }
    return 0;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}

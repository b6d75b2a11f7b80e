/*
 * Helpers shared by the benchmark programs: clock, errors, the watchdog,
 * statistics and output, groups, the BENCH_*_ONLY filter.
 *
 * Every test/bench/NAME.c is built as a program of its own from that one file
 * (see the Makefile), so everything here is static inline and there is no
 * bench.c. Before including it, a program defines
 *   BENCH_NAME      its name, the prefix of its error messages;
 *   BENCH_ONLY_ENV  the variable that selects what runs (selected());
 * and may define BENCH_TARGET_DIGITS, the significant digits note_target()
 * prints (default 6).
 */
#ifndef COALESCE_BENCH_H
#define COALESCE_BENCH_H

#if !defined(BENCH_NAME) || !defined(BENCH_ONLY_ENV)
#    error "define BENCH_NAME and BENCH_ONLY_ENV before including bench.h"
#endif
#ifndef BENCH_TARGET_DIGITS
#    define BENCH_TARGET_DIGITS 6
#endif

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <coalesce.h>

/* --- Clock, errors, watchdog ---------------------------------------------- */

static inline int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void sleep_ns(int64_t ns)
{
    struct timespec ts = {(time_t)(ns / 1000000000), (long)(ns % 1000000000)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

static inline void die(const char *what, int rc)
{
    fprintf(stderr, BENCH_NAME ": %s: %s (%d, %s)\n", what,
            coalesce_err_name(rc), rc, coalesce_strerror(rc));
    exit(1);
}

/* Library calls that must succeed. */
#define CHECK(call)                                                            \
    do {                                                                       \
        int rc_ = (call);                                                      \
        if (rc_ != 0)                                                          \
            die(#call, rc_);                                                   \
    } while (0)

static inline void fail(const char *msg)
{
    fprintf(stderr, BENCH_NAME ": %s\n", msg);
    exit(1);
}

static inline void *xmalloc(size_t n)
{
    void *p = malloc(n);
    if (!p)
        fail("out of memory");
    return p;
}

static atomic_llong wd_deadline; /* ns; 0 when no phase runs */
static _Atomic(const char *) wd_phase;

static inline void *watchdog_main(void *arg)
{
    (void)arg;
    for (;;) {
        sleep_ns(200 * 1000000);
        long long d = atomic_load(&wd_deadline);
        if (d && now_ns() > d) {
            fprintf(stderr,
                    BENCH_NAME ": phase '%s' did not finish in time "
                               "(hang?); aborting\n",
                    atomic_load(&wd_phase));
            _exit(2);
        }
    }
    return NULL;
}

/* From now on the watchdog aborts the program if name runs over seconds. */
static inline void phase(const char *name, int seconds)
{
    atomic_store(&wd_phase, name);
    atomic_store(&wd_deadline, now_ns() + (int64_t)seconds * 1000000000);
}

static inline void
spawn(pthread_t *t, void *(*fn)(void *), void *arg, size_t stack)
{
    pthread_attr_t a;
    pthread_attr_init(&a);
    if (stack)
        pthread_attr_setstacksize(&a, stack);
    int e = pthread_create(t, &a, fn, arg);
    pthread_attr_destroy(&a);
    if (e) {
        fprintf(stderr, BENCH_NAME ": pthread_create: %s\n", strerror(e));
        exit(1);
    }
}

/* Starts the (detached) watchdog thread; no phase runs yet. */
static inline void watchdog_start(size_t stack)
{
    pthread_t wd;
    spawn(&wd, watchdog_main, NULL, stack);
    pthread_detach(wd);
}

/* --- Statistics and output ------------------------------------------------ */

static inline int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static inline double median(const double *v, int n)
{
    double s[64];
    if (n < 1 || n > 64)
        fail("median: bad count");
    memcpy(s, v, (size_t)n * sizeof(*s));
    qsort(s, (size_t)n, sizeof(*s), cmp_double);
    return n % 2 ? s[n / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
}

static inline void bench_line(const char *name, double value, const char *unit)
{
    printf("BENCH %s %.6g %s\n", name, value, unit);
}

static inline void
note_target(const char *name, double value, double target, int at_most)
{
    int met = at_most ? value <= target : value >= target;
    printf("# %s: target %s %.*g: %s\n", name,
           at_most ? "<=" : ">=", BENCH_TARGET_DIGITS, target,
           met ? "met" : "MISSED");
}

static inline void print_load(const char *when)
{
    FILE *fp = fopen("/proc/loadavg", "r");
    char line[128];
    if (fp && fgets(line, sizeof(line), fp))
        printf("# load average %s: %s", when, line);
    if (fp)
        fclose(fp);
}

/* The end of a run: no phase any more, the load and the total time. */
static inline void bench_finish(int64_t start)
{
    atomic_store(&wd_deadline, 0);
    print_load("at end");
    printf("# " BENCH_NAME ": total %.1f s\n",
           (double)(now_ns() - start) / 1e9);
}

/* 1 if the benchmark name runs: BENCH_ONLY_ENV unset, empty or naming it. */
static inline int selected(const char *name)
{
    const char *only = getenv(BENCH_ONLY_ENV);
    return !only || !*only || strstr(only, name) != NULL;
}

/* --- Groups --------------------------------------------------------------- */

static inline flight_group_t *bench_group(const flight_opts_t *o)
{
    flight_group_t *g = NULL;
    CHECK(flight_group_new(&g, o));
    return g;
}

static inline flight_stats_t group_stats(flight_group_t *g)
{
    flight_stats_t s;
    memset(&s, 0, sizeof(s));
    CHECK(flight_group_stats(g, &s, sizeof(s)));
    return s;
}

#endif

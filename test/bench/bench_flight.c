/*
 * Benchmarks of flight groups (issue 2).
 *
 * Prints one line per figure, "BENCH <name> <median> <unit>", where the
 * median is taken over repetitions measured in this run, plus "#" lines with
 * details. Every figure is measured here; nothing is assumed.
 *
 * Each blocking phase runs under a watchdog, so a library that hangs makes
 * the program fail with a message instead of blocking "make bench".
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <coalesce.h>

/* BENCH_FLIGHT_ONLY=distinct,fanout runs only those (for perf). */
#define BENCH_NAME     "bench_flight"
#define BENCH_ONLY_ENV "BENCH_FLIGHT_ONLY"
#include "bench.h"

#define KIB ((size_t)1024)
#define MIB (1024 * KIB)

#define SMALL_STACK (64 * KIB)

/* --- Process figures and statistics ------------------------------------- */

/* Context switches of the whole process so far (every thread). */
static long context_switches(void)
{
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0)
        return 0;
    return ru.ru_nvcsw + ru.ru_nivcsw;
}

/* What an uncontended pthread mutex lock + unlock costs here, in ns. */
static double mutex_pair_ns(void)
{
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    const long n = 5000000;
    int64_t t0 = now_ns();
    for (long i = 0; i < n; i++) {
        pthread_mutex_lock(&m);
        pthread_mutex_unlock(&m);
    }
    return (double)(now_ns() - t0) / (double)n;
}

/* Nearest-rank percentile of a sorted array. */
static double percentile(const double *sorted, int n, double p)
{
    int k = (int)(p / 100.0 * n + 0.999999);
    if (k < 1)
        k = 1;
    if (k > n)
        k = n;
    return sorted[k - 1];
}

static void print_list(const char *label, const double *v, int n)
{
    printf("%s", label);
    for (int i = 0; i < n; i++)
        printf(" %.2f", v[i]);
}

/* --- Allocator hook: live and peak bytes ---------------------------------- */

/*
 * Each block carries a header holding its size, with the top bit set when
 * the block was allocated while tracking was on. Only tracked blocks move
 * the counters, so phases that do not measure memory pay for no shared
 * atomic (which would distort the multi-threaded timings).
 */
#define HDR     16
#define TRACKED ((size_t)1 << (sizeof(size_t) * 8 - 1))
_Static_assert(_Alignof(max_align_t) <= HDR, "header keeps alignment");

static atomic_bool track_on;
static atomic_llong live_bytes;
static atomic_llong peak_bytes;
static atomic_llong tracked_allocs;

static void account(long long delta)
{
    long long now =
        atomic_fetch_add_explicit(&live_bytes, delta, memory_order_relaxed) +
        delta;
    if (delta <= 0)
        return;
    atomic_fetch_add_explicit(&tracked_allocs, 1, memory_order_relaxed);
    long long p = atomic_load_explicit(&peak_bytes, memory_order_relaxed);
    while (now > p && !atomic_compare_exchange_weak(&peak_bytes, &p, now))
        ;
}

static void *tag_block(unsigned char *p, size_t n)
{
    size_t tag = n;
    if (atomic_load_explicit(&track_on, memory_order_relaxed)) {
        tag |= TRACKED;
        account((long long)n);
    }
    memcpy(p, &tag, sizeof(tag));
    return p + HDR;
}

static void *b_malloc(size_t n)
{
    if (n > (SIZE_MAX >> 1) - HDR)
        return NULL;
    unsigned char *p = malloc(n + HDR);
    return p ? tag_block(p, n) : NULL;
}

static void *b_calloc(size_t c, size_t n)
{
    if (n && c > ((SIZE_MAX >> 1) - HDR) / n)
        return NULL;
    unsigned char *p = calloc(1, c * n + HDR);
    return p ? tag_block(p, c * n) : NULL;
}

static void *b_realloc(void *ptr, size_t n)
{
    if (!ptr)
        return b_malloc(n);
    if (n > (SIZE_MAX >> 1) - HDR)
        return NULL;
    unsigned char *p = (unsigned char *)ptr - HDR;
    size_t tag;
    memcpy(&tag, p, sizeof(tag));
    p = realloc(p, n + HDR);
    if (!p)
        return NULL;
    if (tag & TRACKED) {
        account((long long)n - (long long)(tag & ~TRACKED));
        tag = n | TRACKED;
    } else {
        tag = n;
    }
    memcpy(p, &tag, sizeof(tag));
    return p + HDR;
}

static void b_free(void *ptr)
{
    if (!ptr)
        return;
    unsigned char *p = (unsigned char *)ptr - HDR;
    size_t tag;
    memcpy(&tag, p, sizeof(tag));
    if (tag & TRACKED)
        account(-(long long)(tag & ~TRACKED));
    free(p);
}

static void track_start(void)
{
    atomic_store(&peak_bytes, atomic_load(&live_bytes));
    atomic_store(&track_on, true);
}

static void track_stop(void)
{
    atomic_store(&track_on, false);
}

/* --- Shared pieces -------------------------------------------------------- */

static atomic_long fetch_errors;

/* A fetch that ends at once with no body. */
static int fetch_end_now(flight_writer_t *w, void *data)
{
    (void)data;
    if (flight_end(w, 0) != 0)
        atomic_fetch_add(&fetch_errors, 1);
    return FLIGHT_FETCH_DONE;
}

static flight_group_t *group_new(uint64_t max_lag, uint64_t retain)
{
    flight_opts_t o;
    flight_opts_init(&o);
    o.max_lag = max_lag;
    o.retain_limit = retain;
    return bench_group(&o);
}

static uint64_t mix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* --- flight_do_distinct_ns ------------------------------------------------ */

#define DISTINCT_N    1000000
#define DISTINCT_REPS 9
#define KEYLEN        16

/* One repetition: n full cycles on distinct keys; ns per cycle. */
static double distinct_rep(flight_group_t *g,
                           unsigned char (*keys)[KEYLEN],
                           long count,
                           long *done)
{
    int64_t t0 = now_ns(), limit = t0 + 3000000000LL;
    long n;
    for (n = 0; n < count; n++) {
        flight_reader_t *r;
        int rc = flight_do(g, keys[n], KEYLEN, fetch_end_now, NULL, &r);
        if (rc != 0)
            die("flight_do", rc);
        flight_reader_close(r);
        if ((n & 65535) == 65535 && now_ns() > limit) {
            n++;
            break;
        }
    }
    *done += n;
    return (double)(now_ns() - t0) / (double)n;
}

/*
 * headline 0: the process has no other thread yet. glibc then makes
 * uncontended mutexes cheaper (no bus lock), which a multi-threaded host never
 * sees, so that figure is only printed as information.
 */
static void bench_distinct(int headline)
{
    unsigned char(*keys)[KEYLEN] = malloc((size_t)DISTINCT_N * KEYLEN);
    if (!keys)
        fail("out of memory");
    for (uint64_t i = 0; i < DISTINCT_N; i++) {
        uint64_t a = mix64(i), b = mix64(i ^ 0xABCDEF);
        memcpy(keys[i], &a, 8);
        memcpy(keys[i] + 8, &b, 8);
    }
    flight_group_t *g = group_new(64 * MIB, 16 * MIB);
    int reps = headline ? DISTINCT_REPS : 5;
    double ns[DISTINCT_REPS];
    long total = 0;
    distinct_rep(g, keys, DISTINCT_N, &total); /* warm-up: pools, caches */
    for (int rep = 0; rep < reps; rep++)
        ns[rep] = distinct_rep(g, keys, DISTINCT_N, &total);
    /* Allocations per cycle, counted apart from the timed runs. */
    long long before = atomic_load(&tracked_allocs);
    track_start();
    long counted = 0;
    distinct_rep(g, keys, 100000, &counted);
    track_stop();
    total += counted;
    double allocs =
        (double)(atomic_load(&tracked_allocs) - before) / (double)counted;
    flight_stats_t s = group_stats(g);
    flight_group_close(g);
    free(keys);
    if (atomic_load(&fetch_errors))
        fail("flight_end failed in the distinct benchmark");
    double m = median(ns, reps);
    double pair = mutex_pair_ns();
    if (!headline) {
        printf("# flight_do_distinct: %.1f ns per cycle in a single-threaded "
               "process (measured before any other thread existed, when an "
               "uncontended mutex lock+unlock costs %.1f ns; not the "
               "headline)\n",
               m, pair);
        return;
    }
    printf("# flight_do_distinct: an uncontended pthread mutex lock+unlock "
           "costs %.1f ns in this (multi-threaded) process; a cycle takes "
           "three (flight_do, flight_end, flight_reader_close)\n",
           pair);
    printf("# flight_do_distinct: %d reps of %d cycles, 16-byte keys, in a "
           "multi-threaded process; %.2f allocations per cycle; "
           "flights_started %llu of %ld calls, joins %llu, "
           "flights_active %llu, readers_open %llu\n",
           reps, DISTINCT_N, allocs, (unsigned long long)s.flights_started,
           total, (unsigned long long)s.joins,
           (unsigned long long)s.flights_active,
           (unsigned long long)s.readers_open);
    if (s.flights_started != (uint64_t)total || s.joins != 0)
        printf("# flight_do_distinct: UNEXPECTED: every call should have "
               "started its own flight\n");
    bench_line("flight_do_distinct_ns", m, "ns");
    note_target("flight_do_distinct_ns", m, 50, 1);
}

/* --- flight_do_same_key_2t_ns --------------------------------------------- */

#define SAME_N    1000000
#define SAME_REPS 7

struct same_arg {
    flight_group_t *g;
    pthread_barrier_t *bar;
    long calls, joins;
    int64_t t_start, t_end;
};

static void *same_key_main(void *p)
{
    struct same_arg *a = p;
    static const char key[KEYLEN] = "same-key-bench!";
    pthread_barrier_wait(a->bar);
    a->t_start = now_ns();
    int64_t limit = a->t_start + 3000000000LL;
    long n, joins = 0;
    for (n = 0; n < SAME_N; n++) {
        flight_reader_t *r;
        int rc = flight_do(a->g, key, KEYLEN, fetch_end_now, NULL, &r);
        if (rc != 0)
            die("flight_do", rc);
        joins += flight_reader_shared(r);
        flight_reader_close(r);
        if ((n & 16383) == 16383 && now_ns() > limit) {
            n++;
            break;
        }
    }
    a->t_end = now_ns();
    a->calls = n;
    a->joins = joins;
    return NULL;
}

static void bench_same_key(void)
{
    phase("flight_do_same_key_2t", 60);
    flight_group_t *g = group_new(64 * MIB, 16 * MIB);
    double ns[SAME_REPS];
    long calls = 0, joins = 0, csw = 0;
    for (int rep = -1; rep < SAME_REPS; rep++) {
        if (rep == 0)
            csw = context_switches(); /* after the warm-up */
        pthread_barrier_t bar;
        pthread_barrier_init(&bar, NULL, 2);
        struct same_arg a[2];
        pthread_t t[2];
        for (int i = 0; i < 2; i++) {
            memset(&a[i], 0, sizeof(a[i]));
            a[i].g = g;
            a[i].bar = &bar;
            spawn(&t[i], same_key_main, &a[i], 0);
        }
        for (int i = 0; i < 2; i++)
            pthread_join(t[i], NULL);
        pthread_barrier_destroy(&bar);
        int64_t t0 = a[0].t_start < a[1].t_start ? a[0].t_start : a[1].t_start;
        int64_t t1 = a[0].t_end > a[1].t_end ? a[0].t_end : a[1].t_end;
        if (rep >= 0) {
            ns[rep] = (double)(t1 - t0) / (double)(a[0].calls + a[1].calls);
            calls += a[0].calls + a[1].calls;
            joins += a[0].joins + a[1].joins;
        }
    }
    csw = context_switches() - csw;
    flight_stats_t s = group_stats(g);
    flight_group_close(g);
    if (atomic_load(&fetch_errors))
        fail("flight_end failed in the same-key benchmark");
    double m = median(ns, SAME_REPS);
    printf("# flight_do_same_key_2t: 2 threads x up to %d calls x %d reps; "
           "%.1f%% of measured calls joined a flight (%ld of %ld); "
           "group totals: flights_started %llu, joins %llu; %.3f context "
           "switches per call (contended shard mutex sleeping in futex)\n",
           SAME_N, SAME_REPS, calls ? 100.0 * (double)joins / (double)calls : 0,
           joins, calls, (unsigned long long)s.flights_started,
           (unsigned long long)s.joins, (double)csw / (double)calls);
    bench_line("flight_do_same_key_2t_ns", m, "ns");
    note_target("flight_do_same_key_2t_ns", m, 60, 1);
}

/* --- collapse_1000 -------------------------------------------------------- */

#define COLL_THREADS 1000
#define COLL_REPS    5
#define COLL_BODY    1024

struct coll_res {
    int64_t t_joined; /* flight_do() returned */
    int64_t t_eof;
    int leader;
    int status;
    size_t bytes;
    int bad;
};

struct coll {
    flight_group_t *g;
    pthread_barrier_t bar;
    atomic_int ready;
    atomic_int fetches;
    atomic_llong t_fetch_start, t_fetch_end; /* the first fetch */
    struct coll_res res[COLL_THREADS];
};

struct coll_arg {
    struct coll *c;
    int idx;
};

static unsigned char coll_byte(size_t i)
{
    return (unsigned char)(i * 7 + 3);
}

/* The leader's upstream: 10 ms of latency, then a 1 KiB body. */
static int fetch_slow(flight_writer_t *w, void *data)
{
    struct coll *c = data;
    unsigned char body[COLL_BODY];
    int first = atomic_fetch_add(&c->fetches, 1) == 0;
    if (first)
        atomic_store(&c->t_fetch_start, now_ns());
    sleep_ns(10 * 1000000);
    for (size_t i = 0; i < sizeof(body); i++)
        body[i] = coll_byte(i);
    int rc = flight_write(w, body, sizeof(body));
    if (rc != 0)
        return rc;
    rc = flight_end(w, 0);
    if (first)
        atomic_store(&c->t_fetch_end, now_ns());
    return rc != 0 ? rc : FLIGHT_FETCH_DONE;
}

static void *coll_main(void *p)
{
    struct coll_arg *a = p;
    struct coll *c = a->c;
    struct coll_res *res = &c->res[a->idx];
    static const char key[] = "/collapse/one-key";
    unsigned char buf[2 * COLL_BODY];

    atomic_fetch_add(&c->ready, 1);
    pthread_barrier_wait(&c->bar);
    flight_reader_t *r;
    int rc = flight_do(c->g, key, sizeof(key) - 1, fetch_slow, c, &r);
    if (rc != 0)
        die("flight_do", rc);
    res->t_joined = now_ns();
    res->leader = !flight_reader_shared(r);
    for (int i = 0; i < 1000; i++) {
        size_t n = 0;
        rc = flight_read(r, buf, sizeof(buf), -1, &n);
        if (rc != 0)
            break;
        for (size_t k = 0; k < n; k++)
            if (res->bytes + k >= COLL_BODY ||
                buf[k] != coll_byte(res->bytes + k))
                res->bad = 1;
        res->bytes += n;
    }
    res->t_eof = now_ns();
    res->status = rc;
    flight_reader_close(r);
    return NULL;
}

/*
 * The same 1000 threads without the library, to show what the machine
 * costs: release from the barrier to running, and a condition-variable
 * broadcast to 1000 blocked threads (each re-takes the mutex, as a woken
 * reader does) until each is running again.
 */
struct base {
    pthread_barrier_t bar;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int go;
    atomic_int ready, waiting;
    int64_t t_run[COLL_THREADS], t_woke[COLL_THREADS];
};

struct base_arg {
    struct base *b;
    int idx;
};

static void *base_main(void *p)
{
    struct base_arg *a = p;
    struct base *b = a->b;
    atomic_fetch_add(&b->ready, 1);
    pthread_barrier_wait(&b->bar);
    b->t_run[a->idx] = now_ns();
    pthread_mutex_lock(&b->mu);
    atomic_fetch_add(&b->waiting, 1);
    for (int i = 0; i < 100000 && !b->go; i++)
        pthread_cond_wait(&b->cv, &b->mu);
    pthread_mutex_unlock(&b->mu);
    b->t_woke[a->idx] = now_ns();
    return NULL;
}

static void collapse_baseline(void)
{
    struct base *b = calloc(1, sizeof(*b));
    struct base_arg *args = calloc(COLL_THREADS, sizeof(*args));
    pthread_t *t = calloc(COLL_THREADS, sizeof(*t));
    double *v = calloc(COLL_THREADS, sizeof(*v));
    if (!b || !args || !t || !v)
        fail("out of memory");
    pthread_barrier_init(&b->bar, NULL, COLL_THREADS + 1);
    pthread_mutex_init(&b->mu, NULL);
    pthread_cond_init(&b->cv, NULL);
    for (int i = 0; i < COLL_THREADS; i++) {
        args[i].b = b;
        args[i].idx = i;
        spawn(&t[i], base_main, &args[i], SMALL_STACK);
    }
    for (int i = 0; i < 5000 && atomic_load(&b->ready) < COLL_THREADS; i++)
        sleep_ns(1000000);
    sleep_ns(20 * 1000000);
    int64_t t0 = now_ns();
    pthread_barrier_wait(&b->bar);
    for (int i = 0; i < 5000 && atomic_load(&b->waiting) < COLL_THREADS; i++)
        sleep_ns(1000000);
    sleep_ns(10 * 1000000);
    pthread_mutex_lock(&b->mu);
    int64_t t1 = now_ns();
    b->go = 1;
    pthread_cond_broadcast(&b->cv);
    pthread_mutex_unlock(&b->mu);
    for (int i = 0; i < COLL_THREADS; i++)
        pthread_join(t[i], NULL);
    for (int i = 0; i < COLL_THREADS; i++)
        v[i] = (double)(b->t_run[i] - t0) / 1e6;
    qsort(v, COLL_THREADS, sizeof(*v), cmp_double);
    printf("# collapse_1000 baseline without the library: barrier release "
           "to running p50 %.3f p99 %.3f max %.3f ms;",
           percentile(v, COLL_THREADS, 50), percentile(v, COLL_THREADS, 99),
           v[COLL_THREADS - 1]);
    for (int i = 0; i < COLL_THREADS; i++)
        v[i] = (double)(b->t_woke[i] - t1) / 1e6;
    qsort(v, COLL_THREADS, sizeof(*v), cmp_double);
    printf(" cond broadcast to 1000 waiters, back from pthread_cond_wait: "
           "p50 %.3f p99 %.3f max %.3f ms\n",
           percentile(v, COLL_THREADS, 50), percentile(v, COLL_THREADS, 99),
           v[COLL_THREADS - 1]);
    pthread_barrier_destroy(&b->bar);
    pthread_mutex_destroy(&b->mu);
    pthread_cond_destroy(&b->cv);
    free(b);
    free(args);
    free(t);
    free(v);
}

static void bench_collapse(void)
{
    phase("collapse_1000", 60);
    double fetches[COLL_REPS], leader_ms[COLL_REPS], p50[COLL_REPS],
        p99[COLL_REPS], gap[COLL_REPS], maxw[COLL_REPS];
    struct coll *c = calloc(1, sizeof(*c));
    struct coll_arg *args = calloc(COLL_THREADS, sizeof(*args));
    pthread_t *t = calloc(COLL_THREADS, sizeof(*t));
    double *w = calloc(COLL_THREADS, sizeof(*w));
    double *j = calloc(COLL_THREADS, sizeof(*j));
    if (!c || !args || !t || !w || !j)
        fail("out of memory");
    int errors = 0;
    for (int rep = 0; rep < COLL_REPS; rep++) {
        memset(c, 0, sizeof(*c));
        c->g = group_new(64 * MIB, 16 * MIB);
        pthread_barrier_init(&c->bar, NULL, COLL_THREADS + 1);
        for (int i = 0; i < COLL_THREADS; i++) {
            args[i].c = c;
            args[i].idx = i;
            spawn(&t[i], coll_main, &args[i], SMALL_STACK);
        }
        /* Everybody parked in the barrier, so that this thread arrives last
         * and its clock reading is the release time. */
        for (int i = 0; i < 5000 && atomic_load(&c->ready) < COLL_THREADS; i++)
            sleep_ns(1000000);
        if (atomic_load(&c->ready) < COLL_THREADS)
            fail("collapse: threads did not start");
        sleep_ns(20 * 1000000);
        int64_t t0 = now_ns();
        pthread_barrier_wait(&c->bar);
        for (int i = 0; i < COLL_THREADS; i++)
            pthread_join(t[i], NULL);
        pthread_barrier_destroy(&c->bar);

        double lead = -1;
        int nw = 0, leaders = 0;
        for (int i = 0; i < COLL_THREADS; i++) {
            struct coll_res *res = &c->res[i];
            double ms = (double)(res->t_eof - t0) / 1e6;
            j[i] = (double)(res->t_joined - t0) / 1e6;
            if (res->status != COALESCE_EOF || res->bytes != COLL_BODY ||
                res->bad)
                errors++;
            if (res->leader) {
                leaders++;
                if (lead < 0 || ms < lead)
                    lead = ms;
            } else {
                w[nw++] = ms;
            }
        }
        flight_stats_t s = group_stats(c->g);
        flight_group_close(c->g);
        qsort(w, (size_t)nw, sizeof(*w), cmp_double);
        qsort(j, COLL_THREADS, sizeof(*j), cmp_double);
        fetches[rep] = atomic_load(&c->fetches);
        leader_ms[rep] = lead;
        p50[rep] = nw ? percentile(w, nw, 50) : 0;
        p99[rep] = nw ? percentile(w, nw, 99) : 0;
        maxw[rep] = nw ? w[nw - 1] : 0;
        gap[rep] = p99[rep] - lead;
        printf("# collapse_1000 rep %d: fetches %d (stats: flights_started "
               "%llu, joins %llu), leaders %d, waiters %d, leader %.3f ms, "
               "waiter p50 %.3f p99 %.3f max %.3f ms\n",
               rep, atomic_load(&c->fetches),
               (unsigned long long)s.flights_started,
               (unsigned long long)s.joins, leaders, nw, lead, p50[rep],
               p99[rep], maxw[rep]);
        printf("# collapse_1000 rep %d: flight_do returned at p50 %.3f p99 "
               "%.3f max %.3f ms; fetch ran %.3f..%.3f ms (flight_end)\n",
               rep, percentile(j, COLL_THREADS, 50),
               percentile(j, COLL_THREADS, 99), j[COLL_THREADS - 1],
               (double)(atomic_load(&c->t_fetch_start) - t0) / 1e6,
               (double)(atomic_load(&c->t_fetch_end) - t0) / 1e6);
    }
    free(j);
    free(c);
    free(args);
    free(t);
    free(w);
    if (errors)
        printf("# collapse_1000: %d readers did not get the exact 1 KiB body "
               "followed by COALESCE_EOF\n",
               errors);
    printf("# collapse_1000: %d threads (64 KiB stacks) released by one "
           "barrier; times from release to EOF; leader fetch sleeps 10 ms "
           "then writes 1 KiB\n",
           COLL_THREADS);
    collapse_baseline();
    double mf = median(fetches, COLL_REPS);
    double mg = median(gap, COLL_REPS);
    bench_line("collapse_1000_fetches", mf, "fetches");
    bench_line("collapse_1000_leader_ms", median(leader_ms, COLL_REPS), "ms");
    bench_line("collapse_1000_waiter_p50_ms", median(p50, COLL_REPS), "ms");
    bench_line("collapse_1000_waiter_p99_ms", median(p99, COLL_REPS), "ms");
    bench_line("collapse_1000_waiter_p99_minus_leader_ms", mg, "ms");
    double worst = 0;
    for (int i = 0; i < COLL_REPS; i++)
        if (fetches[i] > worst)
            worst = fetches[i];
    printf("# collapse_1000_fetches: target 1 in every rep: %s (max %.0f)\n",
           worst == 1 ? "met" : "MISSED", worst);
    note_target("collapse_1000_waiter_p99_minus_leader_ms", mg, 0.5, 1);
    if (errors)
        fail("collapse: wrong bodies");
}

/* --- Fan-out -------------------------------------------------------------- */

#define FAN_READERS   100
#define FAN_CHUNK     (64 * KIB)
#define FAN_TOTAL     (64 * MIB)
#define FAN_REPS      7
#define FAN_COPY_REPS 5

/* Byte at body offset off: constant within a 64 KiB chunk. */
static unsigned char fan_byte(uint64_t off)
{
    return (unsigned char)((off / FAN_CHUNK) * 131 + 17);
}

struct fan {
    flight_group_t *g;
    flight_writer_t *w;
    int n;
    flight_reader_t *r[FAN_READERS];
    coalesce_buf_t **bufs;
    size_t nbufs;
    int64_t t0;     /* first write */
    bool keep_refs; /* the writer keeps its buffer references until
                     * fan_teardown() */
    atomic_int started;
    atomic_int fast_done;
    int64_t t_eof[FAN_READERS];
    uint64_t bytes[FAN_READERS];
    int status[FAN_READERS];
    int bad[FAN_READERS];
};

static int fetch_keep_writer(flight_writer_t *w, void *data)
{
    *(flight_writer_t **)data = w;
    return FLIGHT_FETCH_ASYNC;
}

/*
 * n readers on one flight whose leader kept its writer (FLIGHT_FETCH_ASYNC),
 * and the whole body already "received from upstream" in buffers.
 */
static void
fan_setup(struct fan *f, int n, size_t total, uint64_t max_lag, uint64_t retain)
{
    static const char key[] = "/fanout/object";
    memset(f, 0, sizeof(*f));
    f->g = group_new(max_lag, retain);
    f->n = n;
    int leaders = 0;
    for (int i = 0; i < n; i++) {
        CHECK(flight_do(f->g, key, sizeof(key) - 1, fetch_keep_writer, &f->w,
                        &f->r[i]));
        leaders += !flight_reader_shared(f->r[i]);
    }
    if (leaders != 1 || !f->w)
        fail("fan-out setup: expected exactly one leader");
    f->nbufs = total / FAN_CHUNK;
    f->bufs = malloc(f->nbufs * sizeof(*f->bufs));
    if (!f->bufs)
        fail("out of memory");
    for (size_t i = 0; i < f->nbufs; i++) {
        CHECK(coalesce_buf_new(&f->bufs[i], FAN_CHUNK));
        void *p = coalesce_buf_mutable(f->bufs[i]);
        if (!p)
            fail("coalesce_buf_mutable returned NULL for a new buffer");
        memset(p, fan_byte(i * FAN_CHUNK), FAN_CHUNK);
    }
}

/* The writer: zero-copy writes of the pre-filled buffers, then the end. */
static void fan_write_all(struct fan *f)
{
    f->t0 = now_ns();
    for (size_t i = 0; i < f->nbufs; i++) {
        CHECK(flight_write_buf(f->w, f->bufs[i], 0, FAN_CHUNK));
        if (!f->keep_refs) {
            coalesce_buf_unref(f->bufs[i]);
            f->bufs[i] = NULL;
        }
    }
    CHECK(flight_end(f->w, 0));
    flight_writer_release(f->w);
    f->w = NULL;
}

/* Checks the first and last byte of a chunk read at offset off. */
static int chunk_ok(const unsigned char *d, size_t len, uint64_t off)
{
    return d[0] == fan_byte(off) && d[len - 1] == fan_byte(off + len - 1);
}

/* Returns the number of readers that did not read the exact body. */
static int fan_finish(struct fan *f, size_t total, int nreaders, double *ms_out)
{
    int bad = 0;
    int64_t end = 0;
    for (int i = 0; i < nreaders; i++) {
        if (f->status[i] != COALESCE_EOF || f->bytes[i] != total || f->bad[i]) {
            if (!bad)
                fprintf(stderr,
                        "bench_flight: reader %d: status %s, %llu bytes, "
                        "bad %d\n",
                        i, coalesce_err_name(f->status[i]),
                        (unsigned long long)f->bytes[i], f->bad[i]);
            bad++;
        }
        if (f->t_eof[i] > end)
            end = f->t_eof[i];
    }
    *ms_out = (double)(end - f->t0) / 1e6;
    return bad;
}

static void fan_teardown(struct fan *f)
{
    for (int i = 0; i < f->n; i++)
        flight_reader_close(f->r[i]);
    for (size_t i = 0; i < f->nbufs; i++)
        coalesce_buf_unref(f->bufs[i]);
    free(f->bufs);
    flight_group_close(f->g);
}

/* Readers on their own threads: blocking zero-copy or copying reads. */
struct fan_thr {
    struct fan *f;
    int idx;
    int copy;
};

static void *fan_reader_main(void *p)
{
    struct fan_thr *a = p;
    struct fan *f = a->f;
    int i = a->idx;
    flight_reader_t *r = f->r[i];
    unsigned char *buf = NULL;
    int rc;
    if (a->copy && !(buf = malloc(FAN_CHUNK)))
        fail("out of memory");
    atomic_fetch_add(&f->started, 1);
    for (long it = 0; it < 10000000; it++) {
        const void *d;
        size_t len = 0;
        if (a->copy) {
            rc = flight_read(r, buf, FAN_CHUNK, -1, &len);
            d = buf;
        } else {
            rc = flight_peek(r, -1, &d, &len, NULL);
        }
        if (rc != 0)
            break;
        if (!chunk_ok(d, len, f->bytes[i]))
            f->bad[i] = 1;
        if (!a->copy && (rc = flight_consume(r, len)) != 0)
            break;
        f->bytes[i] += len;
    }
    f->t_eof[i] = now_ns();
    f->status[i] = rc;
    flight_reader_close(r);
    f->r[i] = NULL;
    free(buf);
    return NULL;
}

/* Starts one thread per reader and waits until they all run. */
static void fan_start_threads(
    struct fan *f, struct fan_thr *a, pthread_t *t, int n, int copy)
{
    for (int i = 0; i < n; i++) {
        a[i].f = f;
        a[i].idx = i;
        a[i].copy = copy;
        spawn(&t[i], fan_reader_main, &a[i], SMALL_STACK);
    }
    /* f->n: a slow reader thread, if any, counts as well. */
    for (int i = 0; i < 5000 && atomic_load(&f->started) < f->n; i++)
        sleep_ns(1000000);
    /* Let them block in their first read, which has nothing to return. */
    sleep_ns(20 * 1000000);
}

static double fan_run_threads(int copy)
{
    struct fan f;
    struct fan_thr a[FAN_READERS];
    pthread_t t[FAN_READERS];
    fan_setup(&f, FAN_READERS, FAN_TOTAL, FLIGHT_UNLIMITED, FLIGHT_UNLIMITED);
    fan_start_threads(&f, a, t, FAN_READERS, copy);
    fan_write_all(&f);
    for (int i = 0; i < FAN_READERS; i++)
        pthread_join(t[i], NULL);
    double ms;
    if (fan_finish(&f, FAN_TOTAL, FAN_READERS, &ms))
        fail("fan-out (threads): readers got a wrong body");
    fan_teardown(&f);
    return ms;
}

/*
 * Readers on one thread, as an event loop would run them: non-blocking
 * peeks, and a one-shot notify that queues the reader and wakes the loop.
 */
struct loop;

struct loop_rd {
    struct loop *l;
    int idx;
};

struct loop {
    struct fan *f;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int queue[FAN_READERS];
    int nq;
    bool sleeping;
    atomic_int armed_once;
    struct loop_rd rd[FAN_READERS];
    bool use_meta;
    bool meta_done[FAN_READERS];
    long wakeups, notifies, spurious;
};

static void loop_notify(flight_reader_t *r, void *data)
{
    (void)r;
    struct loop_rd *x = data;
    struct loop *l = x->l;
    pthread_mutex_lock(&l->mu);
    if (l->nq < FAN_READERS)
        l->queue[l->nq++] = x->idx;
    l->notifies++;
    if (l->sleeping)
        pthread_cond_signal(&l->cv);
    pthread_mutex_unlock(&l->mu);
}

/*
 * Reads what reader idx has; 1 when it reached its end (and is closed).
 * With use_meta the reader first waits for the meta, as a host that sends
 * the response headers would.
 */
static int loop_drain(struct loop *l, int idx)
{
    struct fan *f = l->f;
    flight_reader_t *r = f->r[idx];
    bool ready_said = false; /* flight_reader_notify() returned 1 */
    int rc;
    if (!r)
        return 0;
    for (long it = 0; it < 10000000; it++) {
        if (l->use_meta && !l->meta_done[idx]) {
            rc = flight_meta(r, 0, NULL, NULL);
            if (rc == 0) {
                l->meta_done[idx] = true;
                continue;
            }
        } else {
            const void *d;
            size_t len;
            rc = flight_peek(r, 0, &d, &len, NULL);
            if (rc == 0) {
                ready_said = false;
                if (!chunk_ok(d, len, f->bytes[idx]))
                    f->bad[idx] = 1;
                if ((rc = flight_consume(r, len)) != 0)
                    break;
                f->bytes[idx] += len;
                continue;
            }
        }
        if (rc != COALESCE_EAGAIN)
            break;
        if (ready_said)
            l->spurious++; /* "ready now", yet nothing to read */
        rc = flight_reader_notify(r, loop_notify, &l->rd[idx]);
        if (rc == 0)
            return 0; /* armed: the writer will queue it */
        if (rc != 1)
            break; /* error */
        ready_said = true;
    }
    f->t_eof[idx] = now_ns();
    f->status[idx] = rc;
    flight_reader_close(r);
    f->r[idx] = NULL;
    return 1;
}

static void *loop_main(void *p)
{
    struct loop *l = p;
    int local[FAN_READERS], nlocal = l->f->n, done = 0;
    for (int i = 0; i < nlocal; i++)
        local[i] = i;
    int64_t limit = now_ns() + 20000000000LL;
    for (int pass = 0; pass < 100000000; pass++) {
        for (int k = 0; k < nlocal; k++)
            done += loop_drain(l, local[k]);
        atomic_store(&l->armed_once, 1);
        if (done == l->f->n)
            break;
        pthread_mutex_lock(&l->mu);
        while (l->nq == 0) {
            if (now_ns() > limit)
                fail("fan-out (loop): no progress for 20 s");
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += 100 * 1000000;
            if (ts.tv_nsec >= 1000000000) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000;
            }
            l->sleeping = true;
            pthread_cond_timedwait(&l->cv, &l->mu, &ts);
            l->sleeping = false;
            l->wakeups++;
        }
        memcpy(local, l->queue, (size_t)l->nq * sizeof(int));
        nlocal = l->nq;
        l->nq = 0;
        pthread_mutex_unlock(&l->mu);
    }
    return NULL;
}

struct loop_result {
    double ms;
    double peak_mib;
    double start_mib;
    long wakeups, notifies, spurious;
    long long leaked;
};

static struct loop_result fan_run_loop(bool use_meta)
{
    struct loop_result res;
    struct fan f;
    struct loop *l = calloc(1, sizeof(*l));
    pthread_t t;
    if (!l)
        fail("out of memory");
    /* Everything the library allocates for this run is tracked, including
     * the pre-filled body buffers (coalesce_buf_new). */
    long long live_before = atomic_load(&live_bytes);
    track_start();
    fan_setup(&f, FAN_READERS, FAN_TOTAL, FLIGHT_UNLIMITED, FLIGHT_UNLIMITED);
    res.start_mib = (double)(atomic_load(&live_bytes) - live_before) / MIB;
    l->f = &f;
    l->use_meta = use_meta;
    pthread_mutex_init(&l->mu, NULL);
    pthread_cond_init(&l->cv, NULL);
    for (int i = 0; i < FAN_READERS; i++) {
        l->rd[i].l = l;
        l->rd[i].idx = i;
    }
    spawn(&t, loop_main, l, 0);
    for (int i = 0; i < 5000 && !atomic_load(&l->armed_once); i++)
        sleep_ns(1000000);
    sleep_ns(5 * 1000000);
    fan_write_all(&f);
    pthread_join(t, NULL);
    if (fan_finish(&f, FAN_TOTAL, FAN_READERS, &res.ms))
        fail("fan-out (loop): readers got a wrong body");
    fan_teardown(&f);
    track_stop();
    res.peak_mib = (double)(atomic_load(&peak_bytes) - live_before) / MIB;
    res.leaked = atomic_load(&live_bytes) - live_before;
    res.wakeups = l->wakeups;
    res.notifies = l->notifies;
    res.spurious = l->spurious;
    pthread_mutex_destroy(&l->mu);
    pthread_cond_destroy(&l->cv);
    free(l);
    return res;
}

static void bench_fanout(void)
{
    double loop_ms[FAN_REPS], peak[FAN_REPS], thr_ms[FAN_REPS],
        copy_ms[FAN_COPY_REPS];
    struct loop_result lr = {0, 0, 0, 0, 0, 0, 0};
    long long leaked = 0;

    phase("fanout_64MiB_100r (loop)", 60);
    for (int rep = 0; rep < FAN_REPS; rep++) {
        lr = fan_run_loop(true);
        loop_ms[rep] = lr.ms;
        peak[rep] = lr.peak_mib;
        if (lr.leaked > leaked)
            leaked = lr.leaked;
    }
    phase("fanout_64MiB_100r (threads)", 60);
    long csw = context_switches();
    for (int rep = 0; rep < FAN_REPS; rep++)
        thr_ms[rep] = fan_run_threads(0);
    csw = context_switches() - csw;
    phase("fanout_64MiB_100r (copy)", 90);
    for (int rep = 0; rep < FAN_COPY_REPS; rep++)
        copy_ms[rep] = fan_run_threads(1);

    printf("# fanout_64MiB_100r: one writer (main thread) writes 64 MiB as "
           "1024 pre-filled 64 KiB buffers with flight_write_buf; "
           "max_lag and retain_limit FLIGHT_UNLIMITED; time from first write "
           "to the last reader's COALESCE_EOF\n");
    printf("# fanout_64MiB_100r_ms: 100 zero-copy readers on ONE reader "
           "thread, event-loop style (flight_meta then flight_peek with "
           "timeout 0, flight_reader_notify + condition variable); last rep: "
           "%ld notifies, %ld loop wake-ups, %ld times notify returned 1 "
           "(ready) but the next read had nothing\n",
           lr.notifies, lr.wakeups, lr.spurious);
    printf("# fanout_64MiB_100r_threads_ms: 100 reader threads, blocking "
           "flight_peek(-1)/flight_consume; %ld context switches per run "
           "(%.1f per 64 KiB write)\n",
           csw / FAN_REPS,
           (double)csw / FAN_REPS / (double)(FAN_TOTAL / FAN_CHUNK));
    printf("# fanout_64MiB_100r_copy_ms: 100 reader threads, blocking "
           "flight_read(-1) into a private 64 KiB buffer each\n");
    printf("# fanout_64MiB_100r_peak_mib: peak live bytes allocated through "
           "the library allocator during the loop run, pre-filled body "
           "buffers (%.2f MiB at start) included; bytes still live after "
           "teardown: %lld\n",
           lr.start_mib, leaked);
    print_list("# fanout_64MiB_100r per rep (ms): loop", loop_ms, FAN_REPS);
    print_list("; threads", thr_ms, FAN_REPS);
    print_list("; copy", copy_ms, FAN_COPY_REPS);
    printf("\n");
    double m = median(loop_ms, FAN_REPS);
    double mp = median(peak, FAN_REPS);
    bench_line("fanout_64MiB_100r_ms", m, "ms");
    bench_line("fanout_64MiB_100r_threads_ms", median(thr_ms, FAN_REPS), "ms");
    bench_line("fanout_64MiB_100r_copy_ms", median(copy_ms, FAN_COPY_REPS),
               "ms");
    bench_line("fanout_64MiB_100r_peak_mib", mp, "MiB");
    note_target("fanout_64MiB_100r_ms", m, 15, 1);
    note_target("fanout_64MiB_100r_threads_ms", median(thr_ms, FAN_REPS), 15,
                1);
    note_target("fanout_64MiB_100r_peak_mib", mp, 1.1 * 64, 1);
}

/* --- slow_reader_ratio ---------------------------------------------------- */

#define SLOW_TOTAL (32 * MIB)
#define SLOW_FAST  9
#define SLOW_REPS  11

struct slow_arg {
    struct fan *f;
    int idx;
    uint64_t offset;
    int status;
    long reads;
};

/* Reads 4 KiB, sleeps 1 ms, until the fast readers are done. */
static void *slow_reader_main(void *p)
{
    struct slow_arg *a = p;
    struct fan *f = a->f;
    flight_reader_t *r = f->r[a->idx];
    unsigned char buf[4 * KIB];
    int rc = 0;
    atomic_fetch_add(&f->started, 1);
    for (long it = 0; it < 100000 && !atomic_load(&f->fast_done); it++) {
        size_t n = 0;
        rc = flight_read(r, buf, sizeof(buf), 100, &n);
        if (rc == COALESCE_EAGAIN)
            continue;
        if (rc != 0)
            break;
        a->reads++;
        sleep_ns(1000000);
    }
    a->offset = flight_reader_offset(r);
    a->status = rc;
    flight_reader_close(r);
    f->r[a->idx] = NULL;
    return NULL;
}

static double slow_run(int with_slow, bool keep_refs, struct slow_arg *sa)
{
    struct fan f;
    struct fan_thr a[SLOW_FAST];
    pthread_t t[SLOW_FAST], st;
    int n = SLOW_FAST + (with_slow ? 1 : 0);
    fan_setup(&f, n, SLOW_TOTAL, FLIGHT_UNLIMITED, FLIGHT_UNLIMITED);
    f.keep_refs = keep_refs;
    if (with_slow) {
        memset(sa, 0, sizeof(*sa));
        sa->f = &f;
        sa->idx = SLOW_FAST;
        spawn(&st, slow_reader_main, sa, SMALL_STACK);
    }
    fan_start_threads(&f, a, t, SLOW_FAST, 0);
    fan_write_all(&f);
    for (int i = 0; i < SLOW_FAST; i++)
        pthread_join(t[i], NULL);
    atomic_store(&f.fast_done, 1);
    if (with_slow)
        pthread_join(st, NULL);
    double ms;
    if (fan_finish(&f, SLOW_TOTAL, SLOW_FAST, &ms))
        fail("slow reader: fast readers got a wrong body");
    fan_teardown(&f);
    return ms;
}

struct slow_result {
    double with, without, pair_ratio;
    uint64_t min_off, max_off;
    int lagged;
};

static struct slow_result slow_pairs(bool keep_refs, const char *label)
{
    double with[SLOW_REPS], without[SLOW_REPS], ratio[SLOW_REPS];
    struct slow_arg sa;
    struct slow_result res = {0, 0, 0, UINT64_MAX, 0, 0};
    /* Pairs, in alternating order, so that drifting machine load and
     * warm-up effects hit both cases alike. */
    for (int rep = 0; rep < SLOW_REPS; rep++) {
        if (rep % 2) {
            with[rep] = slow_run(1, keep_refs, &sa);
            without[rep] = slow_run(0, keep_refs, NULL);
        } else {
            without[rep] = slow_run(0, keep_refs, NULL);
            with[rep] = slow_run(1, keep_refs, &sa);
        }
        ratio[rep] = with[rep] / without[rep];
        if (sa.offset < res.min_off)
            res.min_off = sa.offset;
        if (sa.offset > res.max_off)
            res.max_off = sa.offset;
        if (sa.status == FLIGHT_ELAGGED)
            res.lagged++;
    }
    res.with = median(with, SLOW_REPS);
    res.without = median(without, SLOW_REPS);
    res.pair_ratio = median(ratio, SLOW_REPS);
    printf("# slow_reader (%s): fast readers' completion median %.3f ms "
           "with the slow reader, %.3f ms without: ratio %.3f (median of "
           "per-pair ratios %.3f); per pair (with/without, ms):",
           label, res.with, res.without, res.with / res.without,
           res.pair_ratio);
    for (int rep = 0; rep < SLOW_REPS; rep++)
        printf(" %.2f/%.2f", with[rep], without[rep]);
    printf("\n");
    return res;
}

static void bench_slow_reader(void)
{
    phase("slow_reader_ratio", 60);
    /*
     * Without a slow reader the fast ones free each segment as they pass it
     * (the last reference), so 32 MiB of free() falls inside their timed
     * window; the slow reader defers all of it until it closes. To measure
     * the slow reader's interference alone, the headline keeps the writer's
     * buffer references until after the run in both cases.
     */
    struct slow_result c = slow_pairs(true, "writer keeps its references");
    struct slow_result u = slow_pairs(false, "writer drops its references");
    printf("# slow_reader: 32 MiB flight, 9 fast threaded zero-copy readers "
           "(blocking peek/consume); slow reader reads 4 KiB then sleeps "
           "1 ms and closes when the fast ones are done; max_lag "
           "FLIGHT_UNLIMITED (%d detaches); slow reader reached %llu..%llu "
           "bytes\n",
           c.lagged + u.lagged,
           (unsigned long long)(c.min_off < u.min_off ? c.min_off : u.min_off),
           (unsigned long long)(c.max_off > u.max_off ? c.max_off : u.max_off));
    printf("# slow_reader_ratio: headline = the runs where no buffer is "
           "freed inside the timed window in either case; with the "
           "references dropped (the fast readers then free each segment "
           "inside the window unless the slow reader still holds it) the "
           "ratio is %.3f\n",
           u.with / u.without);
    bench_line("slow_reader_ratio", c.with / c.without, "x");
    note_target("slow_reader_ratio", c.with / c.without, 1.2, 1);
}

/* --- Contract probe ------------------------------------------------------ */

static atomic_int probe_fired;

static void probe_cb(flight_reader_t *r, void *data)
{
    (void)r;
    (void)data;
    atomic_fetch_add(&probe_fired, 1);
}

/*
 * flight.h: flight_reader_notify() returns 1 "if the reader is ready now
 * (nothing armed: read again)". Checks that for a reader that read every
 * byte written so far and never asked for the meta, since the event-loop
 * benchmark below depends on it.
 */
static void probe_notify_contract(void)
{
    flight_group_t *g = group_new(64 * MIB, 16 * MIB);
    flight_writer_t *w = NULL;
    flight_reader_t *r;
    const void *d;
    size_t len = 0;
    CHECK(flight_do(g, "probe", 5, fetch_keep_writer, &w, &r));
    CHECK(flight_write(w, "abc", 3));
    CHECK(flight_peek(r, 0, &d, &len, NULL));
    CHECK(flight_consume(r, len));
    int peek = flight_peek(r, 0, &d, &len, NULL);
    int arm = flight_reader_notify(r, probe_cb, NULL);
    int peek2 = flight_peek(r, 0, &d, &len, NULL);
    CHECK(flight_meta(r, 0, NULL, NULL));
    int arm2 = flight_reader_notify(r, probe_cb, NULL);
    CHECK(flight_end(w, 0));
    flight_writer_release(w);
    flight_reader_close(r);
    flight_group_close(g);
    if (peek == COALESCE_EAGAIN && arm == 1 && peek2 == COALESCE_EAGAIN)
        printf("# LIBRARY CONTRACT: flight_reader_notify() returned 1 "
               "(\"ready now, read again\") for a reader that had consumed "
               "every byte and never called flight_meta(), yet flight_peek(r, "
               "0) then returned %s again (after flight_meta() it armed: "
               "%d); an event loop that never asks for the meta would spin. "
               "The loop benchmark below calls flight_meta() first.\n",
               coalesce_err_name(peek2), arm2);
    else
        printf("# contract probe: flight_reader_notify() after draining: %d "
               "(peek %s); after flight_meta(): %d\n",
               arm, coalesce_err_name(peek), arm2);
}

/* --- main ----------------------------------------------------------------- */

int main(void)
{
    /* Before any other library call: the hook cannot change later. */
    CHECK(coalesce_replace_allocator(b_malloc, b_realloc, b_calloc, b_free));
    setvbuf(stdout, NULL, _IOLBF, 0);

    int64_t start = now_ns();
    printf("# bench_flight: libcoalesce %s, %ld online CPUs; allocator hook "
           "installed (16-byte header per block)\n",
           coalesce_version_string(), sysconf(_SC_NPROCESSORS_ONLN));
    print_load("at start");

    /* First, while this is the only thread (bounded by count and time). */
    if (selected("distinct"))
        bench_distinct(0);

    watchdog_start(SMALL_STACK);
    phase("contract probe", 10);
    probe_notify_contract();

    if (selected("distinct")) {
        phase("flight_do_distinct", 60);
        bench_distinct(1);
    }
    if (selected("same_key"))
        bench_same_key();
    if (selected("collapse"))
        bench_collapse();
    if (selected("fanout"))
        bench_fanout();
    if (selected("slow_reader"))
        bench_slow_reader();

    bench_finish(start);
    return 0;
}

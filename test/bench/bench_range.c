/*
 * Benchmarks of range flights (flight_do_range).
 *
 * Prints one line per figure, "BENCH <name> <median> <unit>", where the
 * median is taken over repetitions measured in this run, plus "#" lines with
 * details. Every figure is measured here; nothing is assumed.
 *
 * The "upstream" is simulated: a range fetch callback hands its writer to
 * the harness (FLIGHT_FETCH_ASYNC), and once every caller of a scenario has
 * registered (its flight_do_range() returned), one upstream thread per fetch
 * reports the range and writes the object's pattern bytes for it, generated
 * on the fly in 64 KiB pieces (so a 1 GiB object is never allocated).
 * Every byte a reader delivers is checked against that pattern.
 *
 * Each blocking phase runs under a watchdog, so a library that hangs makes
 * the program fail with a message instead of blocking "make bench".
 *
 * BENCH_RANGE_ONLY=far_apart,random50,early_reader,join,lead_sync runs only
 * those.
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
#include <time.h>
#include <unistd.h>

#include <coalesce.h>

#define BENCH_NAME          "bench_range"
#define BENCH_ONLY_ENV      "BENCH_RANGE_ONLY"
#define BENCH_TARGET_DIGITS 10
#include "bench.h"

#define KIB ((uint64_t)1024)
#define MIB (1024 * KIB)
#define GIB (1024 * MIB)

#define SMALL_STACK (256 * 1024)
#define PIECE       (64 * 1024) /* upstream write and reader buffer size */

static const char VALIDATOR[] = "\"etag-v1\"";
#define VLEN (sizeof(VALIDATOR) - 1)

/* --- Clock, output, groups ----------------------------------------------- */

/* Sleeps until the monotonic clock reads @p t (ns). */
static void sleep_until_ns(int64_t t)
{
    struct timespec ts = {(time_t)(t / 1000000000), (long)(t % 1000000000)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

static void print_list(const char *label, const double *v, int n)
{
    printf("%s", label);
    for (int i = 0; i < n; i++)
        printf(" %.6g", v[i]);
}

/* Whole numbers (bytes) printed exactly. */
static void bench_line_int(const char *name, double value, const char *unit)
{
    printf("BENCH %s %.0f %s\n", name, value, unit);
}

static flight_group_t *group_new(uint64_t chunk_size)
{
    flight_opts_t o;
    flight_opts_init(&o);
    o.chunk_size = chunk_size;
    return bench_group(&o);
}

/* After every reader closed and every writer released, gauges must be 0. */
static void check_gauges(const char *name, flight_group_t *g)
{
    flight_stats_t s = group_stats(g);
    if (s.flights_active || s.readers_open || s.segments_held || s.bytes_held)
        printf("# %s: UNEXPECTED: gauges not back to 0 after everything was "
               "closed: flights_active %llu, readers_open %llu, "
               "segments_held %llu, bytes_held %llu\n",
               name, (unsigned long long)s.flights_active,
               (unsigned long long)s.readers_open,
               (unsigned long long)s.segments_held,
               (unsigned long long)s.bytes_held);
}

/* --- The object's bytes --------------------------------------------------- */

/*
 * Byte o of every object is byte (o & 7) of word(o >> 3) as stored in
 * memory. Not periodic, so a shifted or misplaced piece never matches.
 */
static uint64_t pat_word(uint64_t k)
{
    uint64_t x = (k + 1) * 0x9E3779B97F4A7C15ull;
    return x ^ (x >> 29);
}

static void pat_fill(unsigned char *dst, uint64_t off, size_t n)
{
    uint64_t k = off >> 3;
    size_t skip = (size_t)(off & 7);
    while (n) {
        uint64_t w = pat_word(k++);
        unsigned char t[8];
        memcpy(t, &w, 8);
        size_t take = 8 - skip < n ? 8 - skip : n;
        memcpy(dst, t + skip, take);
        dst += take;
        n -= take;
        skip = 0;
    }
}

/* Index of the first wrong byte, or n when all match; @p tmp holds n. */
static size_t
pat_check(const unsigned char *p, uint64_t off, size_t n, unsigned char *tmp)
{
    pat_fill(tmp, off, n);
    if (memcmp(p, tmp, n) == 0)
        return n;
    size_t i = 0;
    while (p[i] == tmp[i])
        i++;
    return i;
}

/* --- Scenario: concurrent range callers against a simulated upstream ------ */

#define MAX_CALLERS 64
#define MAX_FETCHES 1024

struct scen;

struct caller {
    struct scen *s;
    int idx;
    uint64_t first, last; /* asked for, inclusive; within the object */
    flight_reader_t *r;   /* preset: flight_do_range() done by main */
    bool preset;
    /* results */
    int rc_do;                         /* flight_do_range() */
    int rc_meta, rc_range;             /* flight_meta(), _reader_range() */
    uint64_t r_first, r_last, r_total; /* flight_reader_range() */
    int rc_end;                        /* last flight_read() status */
    uint64_t delivered, offset;        /* bytes; flight_reader_offset() */
    int shared;                        /* flight_reader_shared() */
    int bad;                           /* a delivered byte was wrong */
    uint64_t bad_at;                   /* its object offset */
    int64_t t_done;                    /* end status returned, ns */
};

struct fetch_rec {
    flight_writer_t *w;
    uint64_t first, last; /* as the callback was told */
    int caller;           /* whose flight_do_range() ran it */
    int order;            /* callback order in this scenario */
};

struct scen {
    flight_group_t *g;
    const char *key;
    size_t keylen;
    uint64_t total;  /* object size (upstream knows it) */
    int64_t pace_ns; /* per PIECE per fetch; 0: as fast as possible */
    int n;
    struct caller c[MAX_CALLERS];
    pthread_barrier_t bar;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int registered; /* flight_do_range() calls that returned */
    struct fetch_rec f[MAX_FETCHES];
    int nf, overflow;
    int64_t t0; /* the upstream starts; the reference time */
    atomic_ullong written;
    atomic_int up_errors;
    char up_err[256];
};

static void up_error(struct scen *s, const char *what, int rc)
{
    if (atomic_fetch_add(&s->up_errors, 1) == 0)
        snprintf(s->up_err, sizeof(s->up_err), "%s: %s (%d)", what,
                 coalesce_err_name(rc), rc);
}

static int
range_fetch(flight_writer_t *w, uint64_t first, uint64_t last, void *data)
{
    struct caller *c = data;
    struct scen *s = c->s;
    int ok = 0;
    pthread_mutex_lock(&s->mu);
    if (s->nf < MAX_FETCHES) {
        struct fetch_rec *f = &s->f[s->nf];
        f->w = w;
        f->first = first;
        f->last = last;
        f->caller = c->idx;
        f->order = s->nf++;
        ok = 1;
    } else {
        s->overflow++;
    }
    pthread_mutex_unlock(&s->mu);
    return ok ? FLIGHT_FETCH_ASYNC : COALESCE_EUPSTREAM;
}

/* Bytes the upstream returns for what a callback was told. */
static uint64_t fetch_len(const struct scen *s, const struct fetch_rec *f)
{
    uint64_t last = f->last;
    if (last == FLIGHT_RANGE_END || last > s->total - 1)
        last = s->total - 1;
    return f->first > last ? 0 : last - f->first + 1;
}

struct up_arg {
    struct scen *s;
    struct fetch_rec *f;
};

/* One upstream connection: a 206 with the bytes asked for, paced or not. */
static void *upstream_main(void *p)
{
    struct up_arg *a = p;
    struct scen *s = a->s;
    struct fetch_rec *f = a->f;
    flight_writer_t *w = f->w;
    int rc;
    if (f->first >= s->total) {
        rc = flight_set_range(w, FLIGHT_RANGE_END, FLIGHT_RANGE_END, s->total,
                              VALIDATOR, VLEN);
        up_error(s, "fetch starting past the end (416 reported)", rc);
        flight_writer_release(w);
        return NULL;
    }
    uint64_t last = f->first + fetch_len(s, f) - 1;
    rc = flight_set_range(w, f->first, last, s->total, VALIDATOR, VLEN);
    if (rc != 0) {
        up_error(s, "flight_set_range", rc);
        flight_writer_release(w);
        return NULL;
    }
    unsigned char *buf = xmalloc(PIECE);
    uint64_t off = f->first;
    for (int64_t k = 1; off <= last; k++) {
        size_t n = last - off + 1 < PIECE ? (size_t)(last - off + 1) : PIECE;
        pat_fill(buf, off, n);
        if (s->pace_ns)
            sleep_until_ns(s->t0 + k * s->pace_ns);
        rc = flight_write(w, buf, n);
        if (rc != 0)
            break;
        atomic_fetch_add(&s->written, n);
        off += n;
    }
    if (rc != 0)
        up_error(s, "flight_write", rc);
    else if ((rc = flight_end(w, 0)) != 0)
        up_error(s, "flight_end", rc);
    flight_writer_release(w);
    free(buf);
    return NULL;
}

/* Reads the caller's reader to its end, checking every byte. */
static void consume(struct caller *c)
{
    flight_reader_t *r = c->r;
    unsigned char *buf = xmalloc(PIECE), *tmp = xmalloc(PIECE);
    c->rc_meta = flight_meta(r, -1, NULL, NULL);
    c->rc_range = flight_reader_range(r, &c->r_first, &c->r_last, &c->r_total);
    int rc = c->rc_meta;
    while (rc == 0) {
        size_t n = 0;
        rc = flight_read(r, buf, PIECE, -1, &n);
        if (rc != 0)
            break;
        uint64_t off = c->first + c->delivered;
        size_t ok = pat_check(buf, off, n, tmp);
        if (ok != n && !c->bad) {
            c->bad = 1;
            c->bad_at = off + ok;
        }
        c->delivered += n;
    }
    c->t_done = now_ns();
    c->rc_end = rc;
    c->offset = flight_reader_offset(r);
    c->shared = flight_reader_shared(r);
    flight_reader_close(r);
    c->r = NULL;
    free(buf);
    free(tmp);
}

static void registered_one(struct scen *s)
{
    pthread_mutex_lock(&s->mu);
    s->registered++;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

static void *caller_main(void *p)
{
    struct caller *c = p;
    struct scen *s = c->s;
    if (!c->preset) {
        pthread_barrier_wait(&s->bar);
        c->rc_do = flight_do_range(s->g, s->key, s->keylen, c->first, c->last,
                                   range_fetch, c, &c->r);
        registered_one(s);
        if (c->rc_do != 0)
            return NULL;
    }
    consume(c);
    return NULL;
}

struct scen_res {
    uint64_t fetched; /* sum of the callbacks' ranges (clipped) */
    uint64_t written; /* bytes the upstream threads wrote */
    int nfetch;
    flight_stats_t st;
};

/*
 * Runs s->c[0 .. s->n) against a fresh group. ordered: main calls
 * flight_do_range() for callers 0, 1, ... in that order; otherwise each
 * caller thread calls it, all released together by a barrier. Either way
 * the upstream starts only once every call returned. Fails on any error or
 * wrong byte; returns the figures.
 */
static struct scen_res
scen_run(struct scen *s, const char *name, uint64_t chunk, bool ordered)
{
    struct scen_res res;
    memset(&res, 0, sizeof(res));
    s->g = group_new(chunk);
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    pthread_barrier_init(&s->bar, NULL, (unsigned)s->n);
    s->registered = 0;
    s->nf = s->overflow = 0;
    atomic_store(&s->written, 0);
    atomic_store(&s->up_errors, 0);
    s->up_err[0] = 0;
    pthread_t ct[MAX_CALLERS];
    for (int i = 0; i < s->n; i++) {
        struct caller *c = &s->c[i];
        uint64_t first = c->first, last = c->last;
        memset(c, 0, sizeof(*c));
        c->s = s;
        c->idx = i;
        c->first = first;
        c->last = last;
        c->preset = ordered;
        if (ordered) {
            c->rc_do = flight_do_range(s->g, s->key, s->keylen, first, last,
                                       range_fetch, c, &c->r);
            if (c->rc_do != 0) {
                fprintf(stderr,
                        "bench_range: %s: caller %d flight_do_range(%llu, "
                        "%llu): %s (%d)\n",
                        name, i, (unsigned long long)first,
                        (unsigned long long)last, coalesce_err_name(c->rc_do),
                        c->rc_do);
                exit(1);
            }
            s->registered++;
        }
    }
    for (int i = 0; i < s->n; i++)
        spawn(&ct[i], caller_main, &s->c[i], SMALL_STACK);
    /* Every call registered: its callbacks (if any) have run. */
    pthread_mutex_lock(&s->mu);
    while (s->registered < s->n)
        pthread_cond_wait(&s->cv, &s->mu);
    int nf = s->nf;
    pthread_mutex_unlock(&s->mu);

    s->t0 = now_ns();
    pthread_t *ut = xmalloc((size_t)(nf ? nf : 1) * sizeof(*ut));
    struct up_arg *ua = xmalloc((size_t)(nf ? nf : 1) * sizeof(*ua));
    for (int i = 0; i < nf; i++) {
        ua[i].s = s;
        ua[i].f = &s->f[i];
        spawn(&ut[i], upstream_main, &ua[i], SMALL_STACK);
    }
    for (int i = 0; i < nf; i++)
        pthread_join(ut[i], NULL);
    for (int i = 0; i < s->n; i++)
        pthread_join(ct[i], NULL);
    free(ut);
    free(ua);

    res.nfetch = nf;
    for (int i = 0; i < nf; i++)
        res.fetched += fetch_len(s, &s->f[i]);
    res.written = atomic_load(&s->written);
    res.st = group_stats(s->g);

    int errors = 0;
    if (s->overflow) {
        fprintf(stderr, "bench_range: %s: more than %d fetch callbacks\n", name,
                MAX_FETCHES);
        errors++;
    }
    if (atomic_load(&s->up_errors)) {
        fprintf(stderr, "bench_range: %s: upstream: %d error(s), first: %s\n",
                name, atomic_load(&s->up_errors), s->up_err);
        errors++;
    }
    for (int i = 0; i < s->n; i++) {
        struct caller *c = &s->c[i];
        uint64_t want = c->last - c->first + 1;
        const char *why = NULL;
        if (c->rc_do != 0)
            why = "flight_do_range failed";
        else if (c->rc_meta != 0)
            why = "flight_meta failed";
        else if (c->rc_range != 0)
            why = "flight_reader_range failed";
        else if (c->r_first != c->first || c->r_last != c->last ||
                 c->r_total != s->total)
            why = "flight_reader_range reports another range";
        else if (c->rc_end != COALESCE_EOF)
            why = "the reader did not end with COALESCE_EOF";
        else if (c->bad)
            why = "wrong byte delivered";
        else if (c->delivered != want)
            why = "wrong number of bytes delivered";
        else if (c->offset != c->delivered)
            why = "flight_reader_offset differs from the bytes delivered";
        if (!why)
            continue;
        errors++;
        fprintf(stderr,
                "bench_range: %s: caller %d [%llu, %llu]: %s: do_range %s, "
                "meta %s, reader_range %s (%llu, %llu, total %llu), end %s, "
                "%llu of %llu bytes delivered, offset %llu%s%llu\n",
                name, i, (unsigned long long)c->first,
                (unsigned long long)c->last, why, coalesce_err_name(c->rc_do),
                coalesce_err_name(c->rc_meta), coalesce_err_name(c->rc_range),
                (unsigned long long)c->r_first, (unsigned long long)c->r_last,
                (unsigned long long)c->r_total, coalesce_err_name(c->rc_end),
                (unsigned long long)c->delivered, (unsigned long long)want,
                (unsigned long long)c->offset,
                c->bad ? ", first wrong byte at object offset " : "",
                c->bad ? (unsigned long long)c->bad_at : 0ULL);
    }
    if (errors) {
        for (int i = 0; i < nf; i++)
            fprintf(stderr,
                    "bench_range: %s: fetch %d by caller %d: [%llu, "
                    "%llu]\n",
                    name, i, s->f[i].caller, (unsigned long long)s->f[i].first,
                    (unsigned long long)s->f[i].last);
        exit(1);
    }
    check_gauges(name, s->g);
    flight_group_close(s->g);
    s->g = NULL;
    pthread_barrier_destroy(&s->bar);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    return res;
}

/* The cross-checks every scenario shares; 1 if something is off. */
static int
scen_crosscheck(const char *name, const struct scen_res *r, uint64_t requested)
{
    int off = 0;
    if (r->fetched != r->st.range_bytes_fetched || r->fetched != r->written) {
        printf("# %s: UNEXPECTED: callbacks asked for %llu bytes, the "
               "upstream wrote %llu, stats.range_bytes_fetched %llu\n",
               name, (unsigned long long)r->fetched,
               (unsigned long long)r->written,
               (unsigned long long)r->st.range_bytes_fetched);
        off = 1;
    }
    if (r->st.range_fetches != (uint64_t)r->nfetch) {
        printf("# %s: UNEXPECTED: %d fetch callbacks ran, "
               "stats.range_fetches %llu\n",
               name, r->nfetch, (unsigned long long)r->st.range_fetches);
        off = 1;
    }
    if (r->st.range_bytes_requested != requested) {
        printf("# %s: UNEXPECTED: the calls asked for %llu bytes, "
               "stats.range_bytes_requested %llu\n",
               name, (unsigned long long)requested,
               (unsigned long long)r->st.range_bytes_requested);
        off = 1;
    }
    if (r->st.range_mismatches) {
        printf("# %s: UNEXPECTED: stats.range_mismatches %llu\n", name,
               (unsigned long long)r->st.range_mismatches);
        off = 1;
    }
    return off;
}

/* --- range_far_apart_fetched_bytes ---------------------------------------- */

#define FAR_REPS 7

static void bench_far_apart(void)
{
    phase("range_far_apart", 120);
    static struct scen s;
    static const char key[] = "/far/apart/object";
    double fetched[FAR_REPS], ms[FAR_REPS];
    const uint64_t asked[3][2] = {
        {0, MIB - 1}, {MIB, 2 * MIB - 1}, {GIB, GIB + MIB - 1}};
    const uint64_t want = 3 * MIB;
    int off = 0;
    long joins = 0;
    for (int rep = 0; rep < FAR_REPS; rep++) {
        memset(&s, 0, sizeof(s));
        s.key = key;
        s.keylen = sizeof(key) - 1;
        s.total = GIB + MIB;
        s.n = 3;
        for (int i = 0; i < 3; i++) {
            s.c[i].first = asked[i][0];
            s.c[i].last = asked[i][1];
        }
        int64_t t0 = now_ns();
        struct scen_res r = scen_run(&s, "range_far_apart", 0, false);
        ms[rep] = (double)(now_ns() - t0) / 1e6;
        fetched[rep] = (double)r.fetched;
        off |= scen_crosscheck("range_far_apart", &r, want);
        joins += (long)r.st.chunk_joins;
        if (rep == 0) {
            printf("# range_far_apart: object %llu bytes (1 GiB + 1 MiB, "
                   "generated on the fly), chunk_size default (1 MiB); 3 "
                   "threads released by a barrier call flight_do_range for "
                   "[0, 1 MiB), [1 MiB, 2 MiB), [1 GiB, 1 GiB + 1 MiB); the "
                   "upstream starts once all 3 calls returned. Rep 1: %d "
                   "fetch(es):",
                   (unsigned long long)s.total, r.nfetch);
            for (int i = 0; i < r.nfetch; i++)
                printf(" [%llu, %llu] by caller %d%s",
                       (unsigned long long)s.f[i].first,
                       (unsigned long long)s.f[i].last, s.f[i].caller,
                       i + 1 < r.nfetch ? ";" : "");
            printf("\n");
        }
    }
    double m = median(fetched, FAR_REPS);
    printf("# range_far_apart: %d reps, every delivered byte checked; "
           "cross-checks (callbacks' sum = bytes written = "
           "stats.range_bytes_fetched; range_fetches; range_bytes_requested) "
           "%s; "
           "chunk_joins %ld in all (0 expected); ",
           FAR_REPS, off ? "FAILED (see above)" : "passed", joins);
    printf("bytes fetched per rep:");
    for (int i = 0; i < FAR_REPS; i++)
        printf(" %.0f", fetched[i]);
    print_list("; wall ms per rep:", ms, FAR_REPS);
    printf("\n# range_far_apart: expected %llu (3 chunks); fetching the span "
           "[0, 1 GiB + 1 MiB) would be 1074790400\n",
           (unsigned long long)want);
    bench_line_int("range_far_apart_fetched_bytes", m, "bytes");
    note_target("range_far_apart_fetched_bytes", m, (double)want, 1);
}

/* --- range_random50_overfetch_ratio ----------------------------------------
 */

#define R50_CALLERS 50
#define R50_REPS    7
#define R50_OBJECT  (64 * MIB)
#define R50_CHUNK   MIB

static uint64_t rng_state;

static uint64_t rng_next(void)
{
    /* splitmix64 */
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static int cmp_u64pair(const void *a, const void *b)
{
    const uint64_t *x = a, *y = b;
    return (x[0] > y[0]) - (x[0] < y[0]);
}

/* Bytes of the union of the inclusive ranges v[i][0..1]; sorts v. */
static uint64_t union_bytes(uint64_t (*v)[2], int n)
{
    qsort(v, (size_t)n, sizeof(*v), cmp_u64pair);
    uint64_t sum = 0, cf = v[0][0], cl = v[0][1];
    for (int i = 1; i < n; i++) {
        if (v[i][0] <= cl + 1) {
            if (v[i][1] > cl)
                cl = v[i][1];
        } else {
            sum += cl - cf + 1;
            cf = v[i][0];
            cl = v[i][1];
        }
    }
    return sum + (cl - cf + 1);
}

static void bench_random50(void)
{
    phase("range_random50", 120);
    static struct scen s;
    static const char key[] = "/random/50/object";
    double ratio[R50_REPS], exact[R50_REPS];
    int off = 0;
    for (int rep = 0; rep < R50_REPS; rep++) {
        memset(&s, 0, sizeof(s));
        s.key = key;
        s.keylen = sizeof(key) - 1;
        s.total = R50_OBJECT;
        s.n = R50_CALLERS;
        rng_state = 0x5EED0000ull + (uint64_t)rep; /* fixed seeds */
        bool chunk_used[R50_OBJECT / R50_CHUNK];
        memset(chunk_used, 0, sizeof(chunk_used));
        uint64_t ranges[R50_CALLERS][2], requested = 0, chunk_refs = 0;
        for (int i = 0; i < R50_CALLERS; i++) {
            uint64_t len = 64 * KIB + rng_next() % (4 * MIB - 64 * KIB + 1);
            uint64_t first = rng_next() % (R50_OBJECT - len + 1);
            s.c[i].first = ranges[i][0] = first;
            s.c[i].last = ranges[i][1] = first + len - 1;
            requested += len;
            for (uint64_t k = first / R50_CHUNK;
                 k <= (first + len - 1) / R50_CHUNK; k++) {
                chunk_used[k] = true;
                chunk_refs++;
            }
        }
        uint64_t chunk_union = 0, nchunks = 0;
        for (size_t k = 0; k < R50_OBJECT / R50_CHUNK; k++)
            if (chunk_used[k]) {
                chunk_union += R50_CHUNK; /* the object is whole chunks */
                nchunks++;
            }
        uint64_t byte_union = union_bytes(ranges, R50_CALLERS);
        struct scen_res r = scen_run(&s, "range_random50", R50_CHUNK, false);
        off |= scen_crosscheck("range_random50", &r, requested);
        ratio[rep] = (double)r.fetched / (double)chunk_union;
        exact[rep] = (double)r.fetched / (double)byte_union;
        uint64_t want_joins = chunk_refs - nchunks;
        if (r.fetched == chunk_union && r.st.chunk_joins != want_joins) {
            printf("# range_random50: UNEXPECTED: rep %d: every chunk was "
                   "fetched once, so chunk_joins should be %llu (chunk "
                   "references %llu - distinct chunks %llu), stats say "
                   "%llu\n",
                   rep + 1, (unsigned long long)want_joins,
                   (unsigned long long)chunk_refs, (unsigned long long)nchunks,
                   (unsigned long long)r.st.chunk_joins);
            off = 1;
        }
        if (rep == 0)
            printf("# range_random50: rep 1 (seed 0x5EED0000): 50 ranges of "
                   "64 KiB - 4 MiB in a 64 MiB object, 1 MiB chunks; %llu "
                   "bytes asked in all; union of their chunks %llu bytes "
                   "(%llu chunks), union of the exact ranges %llu bytes; %d "
                   "fetches, %llu bytes fetched; chunk_joins %llu\n",
                   (unsigned long long)requested,
                   (unsigned long long)chunk_union, (unsigned long long)nchunks,
                   (unsigned long long)byte_union, r.nfetch,
                   (unsigned long long)r.fetched,
                   (unsigned long long)r.st.chunk_joins);
    }
    double m = median(ratio, R50_REPS);
    printf("# range_random50: %d reps (seeds 0x5EED0000 + rep), 50 threads "
           "released by a barrier, upstream started once all 50 calls "
           "returned, every delivered byte checked; cross-checks %s; ",
           R50_REPS, off ? "FAILED (see above)" : "passed");
    print_list("ratio vs chunk union per rep:", ratio, R50_REPS);
    printf("\n# range_random50: bytes fetched / union of the exact byte "
           "ranges (chunk rounding included): median %.4f;",
           median(exact, R50_REPS));
    print_list(" per rep:", exact, R50_REPS);
    printf("\n");
    bench_line("range_random50_overfetch_ratio", m, "x");
    note_target("range_random50_overfetch_ratio", m, 1.0, 1);
}

/* --- range_early_reader_done_ms --------------------------------------------
 */

#define EARLY_REPS     5
#define EARLY_ALT_REPS 3
#define EARLY_PACE_NS  1250000 /* 64 KiB per 1.25 ms: 50 MiB/s */

struct early_res {
    double a_ms, b_ms;
    int nfetch;
};

/*
 * b_first: B's call comes first and leads the whole fetch, A joins its first
 * chunk; otherwise A leads chunk 0 and B leads the rest.
 */
static struct early_res early_rep(uint64_t object, bool b_first)
{
    static struct scen s;
    static const char key[] = "/early/reader/object";
    memset(&s, 0, sizeof(s));
    s.key = key;
    s.keylen = sizeof(key) - 1;
    s.total = object;
    s.pace_ns = EARLY_PACE_NS;
    s.n = 2;
    int ia = b_first ? 1 : 0, ib = 1 - ia;
    s.c[ia].first = 0;
    s.c[ia].last = 64 * KIB - 1;
    s.c[ib].first = 0;
    s.c[ib].last = object - 1;
    struct scen_res r = scen_run(&s, "range_early_reader", 0, true);
    scen_crosscheck("range_early_reader", &r, object + 64 * KIB);
    if (r.fetched != object)
        printf("# range_early_reader: UNEXPECTED: %llu bytes fetched for a "
               "%llu-byte object\n",
               (unsigned long long)r.fetched, (unsigned long long)object);
    struct early_res e;
    e.a_ms = (double)(s.c[ia].t_done - s.t0) / 1e6;
    e.b_ms = (double)(s.c[ib].t_done - s.t0) / 1e6;
    e.nfetch = r.nfetch;
    return e;
}

static void bench_early_reader(void)
{
    phase("range_early_reader", 120);
    double a[EARLY_REPS], b[EARLY_REPS], q[EARLY_REPS];
    int nfetch = 0;
    for (int rep = 0; rep < EARLY_REPS; rep++) {
        struct early_res e = early_rep(64 * MIB, true);
        a[rep] = e.a_ms;
        b[rep] = e.b_ms;
        q[rep] = e.a_ms / e.b_ms;
        nfetch = e.nfetch;
    }
    double ma = median(a, EARLY_REPS), mb = median(b, EARLY_REPS);
    printf("# range_early_reader: upstream paced at 50 MiB/s (64 KiB every "
           "1.25 ms against the monotonic clock, first piece at 1.25 ms); "
           "B calls first for [0, 64 MiB) of a 64 MiB object and leads, A "
           "then calls for [0, 64 KiB) and joins B's first chunk (%d "
           "fetch(es) in the last rep); times from the upstream's start to "
           "the reader's COALESCE_EOF, %d reps\n",
           nfetch, EARLY_REPS);
    print_list("# range_early_reader: A ms per rep:", a, EARLY_REPS);
    print_list("; B ms per rep:", b, EARLY_REPS);
    printf("\n# range_early_reader: expected: A about 1.25 ms (its own "
           "64 KiB at 50 MiB/s); waiting for its whole 1 MiB chunk would be "
           "about 20 ms, for the fetch about %.0f ms\n",
           64.0 * MIB / (64.0 * KIB) * EARLY_PACE_NS / 1e6);
    printf("# range_early_reader: B done (median) %.1f ms; A/B ratio "
           "(median of per-rep ratios) %.5f\n",
           mb, median(q, EARLY_REPS));
    bench_line("range_early_reader_done_ms", ma, "ms");
    bench_line("range_early_reader_b_done_ms", mb, "ms");
    bench_line("range_early_reader_ratio", median(q, EARLY_REPS), "x");

    /* A leads chunk 0; B joins it and leads chunks 1..15 (16 MiB object to
     * keep the run short). Two fetches, each paced at 50 MiB/s. */
    double a2[EARLY_ALT_REPS], b2[EARLY_ALT_REPS];
    for (int rep = 0; rep < EARLY_ALT_REPS; rep++) {
        struct early_res e = early_rep(16 * MIB, false);
        a2[rep] = e.a_ms;
        b2[rep] = e.b_ms;
        nfetch = e.nfetch;
    }
    printf("# range_early_reader (variant, A calls first and leads chunk 0, "
           "B joins it and leads the rest; 16 MiB object to keep make bench "
           "short; %d fetches, each paced at 50 MiB/s): A median %.3f ms, B "
           "median %.1f ms over %d reps",
           nfetch, median(a2, EARLY_ALT_REPS), median(b2, EARLY_ALT_REPS),
           EARLY_ALT_REPS);
    print_list("; A ms:", a2, EARLY_ALT_REPS);
    printf("\n");
}

/* --- range_join_ns and range_lead_sync_ns ----------------------------------
 */

#define TIGHT_REPS 7
#define TIGHT_N    200000

static atomic_long unexpected_fetches;

static int
fetch_keep(flight_writer_t *w, uint64_t first, uint64_t last, void *data)
{
    (void)first;
    (void)last;
    *(flight_writer_t **)data = w;
    return FLIGHT_FETCH_ASYNC;
}

static int
fetch_unexpected(flight_writer_t *w, uint64_t first, uint64_t last, void *data)
{
    (void)w;
    (void)first;
    (void)last;
    (void)data;
    atomic_fetch_add(&unexpected_fetches, 1);
    return COALESCE_EUPSTREAM;
}

static void bench_join(void)
{
    phase("range_join", 60);
    static const char key[] = "/join/object";
    const size_t kl = sizeof(key) - 1;
    flight_group_t *g = group_new(0);
    flight_writer_t *w = NULL;
    flight_reader_t *lr;
    unsigned char *buf = xmalloc(PIECE), *tmp = xmalloc(PIECE);
    /* A fetch of chunk 0 in progress: range reported, 64 KiB written. */
    CHECK(flight_do_range(g, key, kl, 0, MIB - 1, fetch_keep, &w, &lr));
    if (!w)
        fail("range_join: the leader's callback did not run");
    CHECK(flight_set_range(w, 0, MIB - 1, 64 * MIB, VALIDATOR, VLEN));
    pat_fill(buf, 0, PIECE);
    CHECK(flight_write(w, buf, PIECE));

    double ns[TIGHT_REPS];
    long total = 0, shared = 0;
    for (int rep = -1; rep < TIGHT_REPS; rep++) {
        int64_t t0 = now_ns(), limit = t0 + 1000000000LL;
        long n;
        for (n = 0; n < TIGHT_N; n++) {
            flight_reader_t *r;
            int rc = flight_do_range(g, key, kl, 0, 4095, fetch_unexpected,
                                     NULL, &r);
            if (rc != 0)
                die("range_join: flight_do_range", rc);
            if (n == 0)
                shared += flight_reader_shared(r);
            flight_reader_close(r);
            if ((n & 4095) == 4095 && now_ns() > limit) {
                n++;
                break;
            }
        }
        if (rep >= 0) {
            ns[rep] = (double)(now_ns() - t0) / (double)n;
            total += n;
        }
    }
    flight_stats_t s = group_stats(g);
    /* One joiner that reads: it gets chunk 0 from its start. */
    flight_reader_t *jr;
    CHECK(flight_do_range(g, key, kl, 0, 4095, fetch_unexpected, NULL, &jr));
    for (uint64_t off = PIECE; off < MIB; off += PIECE) {
        pat_fill(buf, off, PIECE);
        CHECK(flight_write(w, buf, PIECE));
    }
    CHECK(flight_end(w, 0));
    flight_writer_release(w);
    uint64_t got[2] = {0, 0};
    flight_reader_t *rr[2] = {jr, lr};
    int endrc[2] = {0, 0};
    for (int i = 0; i < 2; i++) {
        int rc;
        size_t n;
        while ((rc = flight_read(rr[i], buf, PIECE, -1, &n)) == 0) {
            if (pat_check(buf, got[i], n, tmp) != n)
                fail("range_join: wrong byte delivered");
            got[i] += n;
        }
        endrc[i] = rc;
        flight_reader_close(rr[i]);
    }
    if (endrc[0] != COALESCE_EOF || got[0] != 4096 ||
        endrc[1] != COALESCE_EOF || got[1] != MIB) {
        fprintf(stderr,
                "bench_range: range_join: joiner %llu bytes, %s; leader %llu "
                "bytes, %s\n",
                (unsigned long long)got[0], coalesce_err_name(endrc[0]),
                (unsigned long long)got[1], coalesce_err_name(endrc[1]));
        exit(1);
    }
    check_gauges("range_join", g);
    flight_group_close(g);
    free(buf);
    free(tmp);
    if (atomic_load(&unexpected_fetches))
        fail("range_join: a joiner's fetch callback ran (it should have "
             "joined the chunk in flight)");
    double m = median(ns, TIGHT_REPS);
    printf("# range_join: flight_do_range for [0, 4 KiB) joining chunk 0 of "
           "a fetch in progress (range reported, 64 KiB written), then "
           "flight_reader_close; %d reps of up to %d (1 s), %ld calls; "
           "shared flag %s; stats: range_fetches %llu, chunk_joins %llu; ",
           TIGHT_REPS, TIGHT_N, total, shared == TIGHT_REPS + 1 ? "1" : "NOT 1",
           (unsigned long long)s.range_fetches,
           (unsigned long long)s.chunk_joins);
    print_list("ns per rep:", ns, TIGHT_REPS);
    printf("\n");
    if (s.range_fetches != 1)
        printf("# range_join: UNEXPECTED: range_fetches should be 1\n");
    bench_line("range_join_ns", m, "ns");
}

#define LEAD_CHUNK 4096

static unsigned char lead_body[LEAD_CHUNK];

static int
fetch_sync(flight_writer_t *w, uint64_t first, uint64_t last, void *data)
{
    (void)data;
    int rc;
    if (first != 0 || last != LEAD_CHUNK - 1) {
        atomic_fetch_add(&unexpected_fetches, 1);
        return COALESCE_EUPSTREAM;
    }
    if ((rc = flight_set_range(w, 0, LEAD_CHUNK - 1, MIB, VALIDATOR, VLEN)))
        return rc;
    if ((rc = flight_write(w, lead_body, LEAD_CHUNK)))
        return rc;
    if ((rc = flight_end(w, 0)))
        return rc;
    return FLIGHT_FETCH_DONE;
}

/* The same cycle on an object flight, for comparison. */
static int fetch_obj_sync(flight_writer_t *w, void *data)
{
    (void)data;
    int rc;
    if ((rc = flight_write(w, lead_body, LEAD_CHUNK)))
        return rc;
    if ((rc = flight_end(w, 0)))
        return rc;
    return FLIGHT_FETCH_DONE;
}

/* ns per cycle: lead (fetch written synchronously), read all, close. */
static double lead_rep(flight_group_t *g, bool range, long *done)
{
    static const char key[] = "/lead/object";
    unsigned char buf[2 * LEAD_CHUNK];
    int64_t t0 = now_ns(), limit = t0 + 1000000000LL;
    long n;
    for (n = 0; n < TIGHT_N; n++) {
        flight_reader_t *r;
        int rc = range ? flight_do_range(g, key, sizeof(key) - 1, 0,
                                         LEAD_CHUNK - 1, fetch_sync, NULL, &r)
                       : flight_do(g, key, sizeof(key) - 1, fetch_obj_sync,
                                   NULL, &r);
        if (rc != 0)
            die("range_lead_sync: flight_do(_range)", rc);
        size_t got = 0, k;
        while ((rc = flight_read(r, buf + got, sizeof(buf) - got, -1, &k)) ==
               0) {
            got += k;
            if (got == sizeof(buf))
                break;
        }
        if (rc != COALESCE_EOF || got != LEAD_CHUNK ||
            memcmp(buf, lead_body, LEAD_CHUNK) != 0) {
            fprintf(stderr,
                    "bench_range: range_lead_sync (%s): %zu bytes, end %s, "
                    "content %s\n",
                    range ? "range" : "object", got, coalesce_err_name(rc),
                    got == LEAD_CHUNK && memcmp(buf, lead_body, got) == 0
                        ? "right"
                        : "wrong");
            exit(1);
        }
        flight_reader_close(r);
        if ((n & 1023) == 1023 && now_ns() > limit) {
            n++;
            break;
        }
    }
    *done += n;
    return (double)(now_ns() - t0) / (double)n;
}

static void bench_lead_sync(void)
{
    phase("range_lead_sync", 60);
    pat_fill(lead_body, 0, LEAD_CHUNK);
    flight_group_t *g = group_new(LEAD_CHUNK);
    double ns[TIGHT_REPS], obj[TIGHT_REPS];
    long total = 0, ototal = 0, warm = 0;
    lead_rep(g, true, &warm);
    lead_rep(g, false, &warm);
    for (int rep = 0; rep < TIGHT_REPS; rep++) {
        ns[rep] = lead_rep(g, true, &total);
        obj[rep] = lead_rep(g, false, &ototal);
    }
    flight_stats_t s = group_stats(g);
    check_gauges("range_lead_sync", g);
    flight_group_close(g);
    if (atomic_load(&unexpected_fetches))
        fail("range_lead_sync: a fetch callback was told an unexpected "
             "range");
    double m = median(ns, TIGHT_REPS);
    printf("# range_lead_sync: chunk_size 4 KiB, flight_do_range for [0, "
           "4 KiB) of a 1 MiB object, the fetch reports the range, writes "
           "4 KiB (flight_write) and ends inside the callback; then "
           "flight_read to COALESCE_EOF (content checked) and close; %d reps "
           "of up to %d (1 s); %ld range cycles, stats.range_fetches %llu "
           "(warm-up included); ",
           TIGHT_REPS, TIGHT_N, total, (unsigned long long)s.range_fetches);
    print_list("ns per rep:", ns, TIGHT_REPS);
    printf("\n# range_lead_sync: the same cycle with flight_do on an object "
           "flight (4 KiB body): median %.1f ns\n",
           median(obj, TIGHT_REPS));
    bench_line("range_lead_sync_ns", m, "ns");
}

/* --- main ----------------------------------------------------------------- */

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    int64_t start = now_ns();
    printf("# bench_range: libcoalesce %s, %ld online CPUs\n",
           coalesce_version_string(), sysconf(_SC_NPROCESSORS_ONLN));
    print_load("at start");

    watchdog_start(SMALL_STACK);

    if (selected("far_apart"))
        bench_far_apart();
    if (selected("random50"))
        bench_random50();
    if (selected("early_reader"))
        bench_early_reader();
    if (selected("join"))
        bench_join();
    if (selected("lead_sync"))
        bench_lead_sync();

    bench_finish(start);
    return 0;
}

/*
 * Tests for range flights (include/coalesce/flight.h: flight_do_range,
 * flight_set_range, flight_reader_range and the range parts of the reader
 * functions), following the semantics of the range spec (RG-1..RG-8).
 *
 * Rules (as in check_flight.c):
 *  - test_alloc_live() is back to its starting value at the end of every
 *    test, and the group's gauges are back to 0 (FINISH).
 *  - Worker threads never call ck_assert; they record, the main thread
 *    checks.
 *  - Concurrency is made deterministic with ASYNC writers held by the test
 *    (or an upstream thread that waits on a counter), barriers and counters;
 *    never with sleeps. Only the linger tests depend on time, by design.
 *  - An "object" is (key, seed, size); byte i is test_pattern(seed, i), and
 *    every body is checked byte by byte at its object offset.
 */
#include "helpers.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define END FLIGHT_RANGE_END
#define UNK FLIGHT_SIZE_UNKNOWN

static uint64_t min_u64(uint64_t a, uint64_t b)
{
    return a < b ? a : b;
}

/* --- Groups --------------------------------------------------------------- */

static flight_opts_t ropts(uint64_t cs)
{
    flight_opts_t o;
    flight_opts_init(&o);
    o.chunk_size = cs;
    return o;
}

static flight_group_t *rgroup(uint64_t cs)
{
    flight_opts_t o = ropts(cs);
    return group_with_opts(&o);
}

/* A linger scaled like the timeouts, so slow (valgrind) runs stay inside. */
static uint32_t linger_ms(uint32_t ms)
{
    return (uint32_t)(test_timeout(ms / 1000.0) * 1000.0 + 0.5);
}

/* --- Reading -------------------------------------------------------------- */

/*
 * Blocking reads of object bytes from start until an end, 701 bytes at a
 * time: less than a chunk, so that reads start and stop inside chunks.
 */
static readres_t rread_all(flight_reader_t *r, uint64_t seed, uint64_t start)
{
    return read_upto(r, PAT(seed), start, UINT64_MAX, 701, -1);
}

/* r delivers exactly n object bytes of seed from a, then status for good. */
#define ASSERT_ENDS(r, seed, a, n, status)                                     \
    do {                                                                       \
        ASSERT_BODY(rread_all((r), (seed), (a)), (status), (n));               \
        assert_terminal((r), (status));                                        \
    } while (0)

/* r delivers exactly object bytes [a, b] of seed, then EOF for good. */
#define ASSERT_READS(r, seed, a, b)                                            \
    do {                                                                       \
        ASSERT_ENDS((r), (seed), (a), (b) - (a) + 1, COALESCE_EOF);            \
        ck_assert_uint_eq(flight_reader_offset(r), (b) - (a) + 1);             \
    } while (0)

#define ASSERT_RANGE(r, f_, l_, t_)                                            \
    do {                                                                       \
        uint64_t rf_ = 1, rl_ = 2, rt_ = 3;                                    \
        ck_assert_int_eq(flight_reader_range((r), &rf_, &rl_, &rt_), 0);       \
        ck_assert_uint_eq(rf_, (f_));                                          \
        ck_assert_uint_eq(rl_, (l_));                                          \
        ck_assert_uint_eq(rt_, (t_));                                          \
    } while (0)

static void assert_meta(flight_reader_t *r, const char *want)
{
    const void *m = NULL;
    size_t ml = 99;
    ck_assert_int_eq(flight_meta(r, -1, &m, &ml), 0);
    ck_assert_uint_eq(ml, strlen(want));
    if (ml)
        ck_assert_mem_eq(m, want, ml);
}

/*
 * r's range reports the object's total: size when upstream told it, else
 * FLIGHT_SIZE_UNKNOWN, or size where the reply implied the end. Returns it.
 */
static uint64_t
assert_total(flight_reader_t *r, bool told, bool implied, uint64_t size)
{
    uint64_t t = 1;
    ck_assert_int_eq(flight_reader_range(r, NULL, NULL, &t), 0);
    if (told)
        ck_assert_uint_eq(t, size);
    else if (implied)
        ck_assert(t == UNK || t == size);
    else
        ck_assert_uint_eq(t, UNK);
    return t;
}

/* --- The range fetch callback --------------------------------------------- */

enum rmode {
    R_SYNC,  /* serves the fetch on the caller's thread (optionally in part) */
    R_ASYNC, /* keeps the writer in call[i].w, returns FLIGHT_FETCH_ASYNC */
    R_RET    /* returns ret without touching the writer */
};

#define MAXCALLS 128

typedef struct rcall {
    uint64_t first, last;
    flight_writer_t *w;
    pthread_t thread;
} rcall_t;

typedef struct rfetch {
    int mode;
    uint64_t seed, size;   /* the object upstream has */
    bool unknown_total;    /* reply with FLIGHT_SIZE_UNKNOWN */
    const char *validator; /* default "v1" */
    const char *meta;      /* set after the range, if not NULL */
    uint64_t limit;        /* R_SYNC: write at most this many bytes */
    bool end;              /* R_SYNC: flight_end(w, 0) after the body */
    int ret;               /* R_SYNC, R_RET: the return value */
    size_t piece;          /* bytes per flight_write */
    counter_t ncalls;      /* its mutex also guards call[] */
    rcall_t call[MAXCALLS];
    atomic_int serve_rc; /* R_SYNC: what serving returned (last call) */
} rfetch_t;

static void rfetch_init(rfetch_t *f, int mode, uint64_t seed, uint64_t size)
{
    memset(f, 0, sizeof(*f));
    f->mode = mode;
    f->seed = seed;
    f->size = size;
    f->validator = "v1";
    f->limit = UINT64_MAX;
    f->end = true;
    f->ret = FLIGHT_FETCH_DONE;
    f->piece = 300;
    counter_init(&f->ncalls);
    atomic_init(&f->serve_rc, 0);
}

static void rfetch_destroy(rfetch_t *f)
{
    counter_destroy(&f->ncalls);
}

/* Inits / destroys fetch contexts, closes readers; NULL-terminated lists. */
static void
rfetch_init_all(int mode, uint64_t seed, uint64_t size, rfetch_t *f, ...)
{
    va_list ap;
    va_start(ap, f);
    for (; f; f = va_arg(ap, rfetch_t *))
        rfetch_init(f, mode, seed, size);
    va_end(ap);
}

static void close_readers(flight_reader_t *r, ...)
{
    va_list ap;
    va_start(ap, r);
    for (; r; r = va_arg(ap, flight_reader_t *))
        flight_reader_close(r);
    va_end(ap);
}

static void rfetch_destroy_all(rfetch_t *f, ...)
{
    va_list ap;
    va_start(ap, f);
    for (; f; f = va_arg(ap, rfetch_t *))
        rfetch_destroy(f);
    va_end(ap);
}

/* What a correct upstream reports when asked for [first, last]. */
static int
rf_reply(rfetch_t *f, flight_writer_t *w, uint64_t first, uint64_t last)
{
    const char *v = f->validator;
    if (first >= f->size)
        return flight_set_range(w, END, END, f->size, v, strlen(v));
    return flight_set_range(w, first, min_u64(last, f->size - 1),
                            f->unknown_total ? UNK : f->size, v, strlen(v));
}

/* Reply, meta, up to limit body bytes, and the end if asked. */
static int rf_serve(rfetch_t *f,
                    flight_writer_t *w,
                    uint64_t first,
                    uint64_t last,
                    uint64_t limit,
                    bool end)
{
    int rc = rf_reply(f, w, first, last);
    if (rc != 0)
        return rc;
    if (f->meta && (rc = flight_set_meta(w, f->meta, strlen(f->meta))) != 0)
        return rc;
    uint64_t n = min_u64(last, f->size - 1) - first + 1;
    rc = write_pattern(w, f->seed, first, min_u64(n, limit), f->piece);
    if (rc == 0 && end)
        rc = flight_end(w, 0);
    return rc;
}

static int
rfetch_cb(flight_writer_t *w, uint64_t first, uint64_t last, void *data)
{
    rfetch_t *f = data;
    pthread_mutex_lock(&f->ncalls.mu);
    if (f->ncalls.n < MAXCALLS)
        f->call[f->ncalls.n] = (rcall_t){first, last, w, pthread_self()};
    f->ncalls.n++;
    pthread_cond_broadcast(&f->ncalls.cv);
    pthread_mutex_unlock(&f->ncalls.mu);
    if (f->mode == R_ASYNC)
        return FLIGHT_FETCH_ASYNC;
    if (f->mode == R_RET)
        return f->ret;
    atomic_store(&f->serve_rc, rf_serve(f, w, first, last, f->limit, f->end));
    return f->ret;
}

static long rf_ncalls(rfetch_t *f)
{
    pthread_mutex_lock(&f->ncalls.mu);
    long n = f->ncalls.n;
    pthread_mutex_unlock(&f->ncalls.mu);
    return n;
}

static rcall_t rf_call(rfetch_t *f, long i)
{
    ck_assert_int_lt(i, rf_ncalls(f));
    ck_assert_int_lt(i, MAXCALLS);
    pthread_mutex_lock(&f->ncalls.mu);
    rcall_t c = f->call[i];
    pthread_mutex_unlock(&f->ncalls.mu);
    return c;
}

#define ASSERT_CALL(f, i, a, b)                                                \
    do {                                                                       \
        rcall_t c_ = rf_call((f), (i));                                        \
        ck_assert_uint_eq(c_.first, (a));                                      \
        ck_assert_uint_eq(c_.last, (b));                                       \
    } while (0)

/* Serves ASYNC call i completely and releases its writer. */
static void rf_finish(rfetch_t *f, long i)
{
    rcall_t c = rf_call(f, i);
    ck_assert_int_eq(rf_serve(f, c.w, c.first, c.last, UINT64_MAX, true), 0);
    flight_writer_release(c.w);
}

/*
 * Serves ASYNC call i in part: the reply, the meta and the first limit
 * bytes; the writer, returned, stays open.
 */
static flight_writer_t *rf_start(rfetch_t *f, long i, uint64_t limit)
{
    rcall_t c = rf_call(f, i);
    ck_assert_int_eq(rf_serve(f, c.w, c.first, c.last, limit, false), 0);
    return c.w;
}

/*
 * Writes the rest of ASYNC call i's bytes from object offset from, ends the
 * fetch and releases its writer.
 */
static void rf_complete(rfetch_t *f, long i, uint64_t from)
{
    rcall_t c = rf_call(f, i);
    uint64_t end = min_u64(c.last, f->size - 1) + 1;
    ck_assert_int_eq(write_pattern(c.w, f->seed, from, end - from, f->piece),
                     0);
    ck_assert_int_eq(flight_end(c.w, 0), 0);
    flight_writer_release(c.w);
}

/* Writes object bytes [off, off + len) through ASYNC call i's writer. */
static void rf_write(rfetch_t *f, long i, uint64_t off, uint64_t len)
{
    ck_assert_int_eq(
        write_pattern(rf_call(f, i).w, f->seed, off, len, f->piece), 0);
}

static flight_writer_t *rf_w(rfetch_t *f, long i)
{
    return rf_call(f, i).w;
}

static flight_reader_t *rdo(flight_group_t *g,
                            const char *key,
                            uint64_t first,
                            uint64_t last,
                            rfetch_t *f)
{
    flight_reader_t *r = NULL;
    ck_assert_int_eq(
        flight_do_range(g, key, strlen(key), first, last, rfetch_cb, f, &r), 0);
    ck_assert_ptr_nonnull(r);
    return r;
}

/* --- Caller threads ------------------------------------------------------- */

typedef struct rthr {
    flight_group_t *g;
    const char *key;
    uint64_t first, last, seed;
    rfetch_t *f;
    pthread_barrier_t *bar;
    counter_t *have; /* incremented once the call returned */
    pthread_t self;
    int rc, shared, meta_rc, range_rc, again_rc;
    uint64_t rfirst, rlast, rtotal;
    char metabuf[32];
    readres_t res;
} rthr_t;

static void *rthr_main(void *p)
{
    rthr_t *a = p;
    if (a->bar)
        pthread_barrier_wait(a->bar);
    flight_reader_t *r = NULL;
    a->rc = flight_do_range(a->g, a->key, strlen(a->key), a->first, a->last,
                            rfetch_cb, a->f, &r);
    a->shared = a->rc == 0 ? flight_reader_shared(r) : -1;
    if (a->have)
        counter_add(a->have, 1);
    if (a->rc != 0)
        return NULL;
    const void *m = NULL;
    size_t ml = 0;
    a->meta_rc = flight_meta(r, -1, &m, &ml);
    if (a->meta_rc == 0 && ml < sizeof(a->metabuf)) {
        if (ml)
            memcpy(a->metabuf, m, ml);
        a->metabuf[ml] = 0;
    }
    a->range_rc = flight_reader_range(r, &a->rfirst, &a->rlast, &a->rtotal);
    a->res = rread_all(r, a->seed, a->first);
    a->again_rc = read_again(r, 0);
    flight_reader_close(r);
    return NULL;
}

static void rthr_start(rthr_t *a,
                       pthread_t *th,
                       flight_group_t *g,
                       const char *key,
                       uint64_t first,
                       uint64_t last,
                       rfetch_t *f,
                       pthread_barrier_t *bar,
                       counter_t *have)
{
    memset(a, 0, sizeof(*a));
    a->g = g;
    a->key = key;
    a->first = first;
    a->last = last;
    a->seed = f->seed;
    a->f = f;
    a->bar = bar;
    a->have = have;
    ck_assert_int_eq(pthread_create(th, NULL, rthr_main, a), 0);
    a->self = *th;
}

/* The thread read exactly [first, last] of a size-total object. */
static void
assert_thr(const rthr_t *a, uint64_t last, uint64_t total, const char *meta)
{
    ck_assert_int_eq(a->rc, 0);
    ck_assert_int_eq(a->meta_rc, 0);
    if (meta)
        ck_assert_str_eq(a->metabuf, meta);
    ck_assert_int_eq(a->range_rc, 0);
    ck_assert_uint_eq(a->rfirst, a->first);
    ck_assert_uint_eq(a->rlast, last);
    ck_assert_uint_eq(a->rtotal, total);
    ASSERT_BODY(a->res, COALESCE_EOF, last - a->first + 1);
    ck_assert_int_eq(a->again_rc, COALESCE_EOF);
}

#define MAXTHR 16

/* Callers started together: caller i asks rg[i], all behind one barrier. */
typedef struct crowd {
    int n;
    pthread_barrier_t bar;
    rthr_t a[MAXTHR];
    pthread_t th[MAXTHR];
} crowd_t;

static void crowd_start(crowd_t *c,
                        int n,
                        flight_group_t *g,
                        const char *key,
                        const uint64_t (*rg)[2],
                        rfetch_t *f,
                        counter_t *have)
{
    ck_assert_int_le(n, MAXTHR);
    c->n = n;
    pthread_barrier_init(&c->bar, NULL, (unsigned)n);
    for (int i = 0; i < n; i++)
        rthr_start(&c->a[i], &c->th[i], g, key, rg[i][0], rg[i][1], f, &c->bar,
                   have);
}

/*
 * Joins every caller; each read exactly its range of a size-total object
 * (and meta, if not NULL). Returns how many led (shared flag 0).
 */
static int crowd_join(crowd_t *c, uint64_t total, const char *meta)
{
    int leaders = 0;
    for (int i = 0; i < c->n; i++) {
        pthread_join(c->th[i], NULL);
        assert_thr(&c->a[i], c->a[i].last, total, meta);
        leaders += c->a[i].shared == 0;
    }
    pthread_barrier_destroy(&c->bar);
    return leaders;
}

/* --- Reference: collapse and linger --------------------------------------- */

/* Three callers, same range, started together: one fetch, three readers. */
START_TEST(test_rg_collapse_same_range)
{
    LEAK_START();
    flight_group_t *g = rgroup(1000);
    rfetch_t f;
    rfetch_init(&f, R_ASYNC, 101, 5000);
    f.meta = "206";
    counter_t have;
    counter_init(&have);
    static const uint64_t rg[3][2] = {{1000, 3499}, {1000, 3499}, {1000, 3499}};
    crowd_t cr;
    crowd_start(&cr, 3, g, "obj", rg, &f, &have);
    /* Nothing is written before all three are registered. */
    counter_wait(&have, 3);
    ck_assert_int_eq(rf_ncalls(&f), 1);
    ASSERT_CALL(&f, 0, 1000, 3999);
    ck_assert_uint_eq(flight_writer_readers(rf_w(&f, 0)), 3);
    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.range_fetches, 1);
    ck_assert_uint_eq(s.range_bytes_requested, 3 * 2500);
    ck_assert_uint_eq(s.range_bytes_fetched, 0);
    ck_assert_uint_eq(s.readers_open, 3);
    ck_assert_uint_eq(s.flights_started, 0);
    ck_assert_uint_eq(s.joins, 0);

    rcall_t c = rf_call(&f, 0);
    rf_finish(&f, 0);
    ck_assert_int_eq(crowd_join(&cr, 5000, "206"), 1);
    for (int i = 0; i < 3; i++) {
        if (cr.a[i].shared == 0)
            ck_assert_int_ne(pthread_equal(cr.a[i].self, c.thread), 0);
        else
            ck_assert_int_eq(cr.a[i].shared, 1);
    }
    s = stats_of(g);
    ck_assert_uint_eq(s.range_bytes_fetched, 3000);
    ck_assert_uint_eq(s.range_mismatches, 0);
    /* Counted once the chunks are written (the library counts lazily). */
    ck_assert_uint_eq(s.chunk_joins, 6);
    counter_destroy(&have);
    rfetch_destroy(&f);
    FINISH(g);
}
END_TEST

/*
 * Linger 50 ms, chunk 500: 0-999, 500-1999 and 1500-2999 together -> one
 * fetch of 0-2999. range_max_gap is one chunk: with 0, "1500-2999 first,
 * then 0-999" would legitimately leave chunk 2 between two lingering fetches
 * (two fetches); with one chunk allowed every arrival order gives one.
 */
START_TEST(test_rg_linger_union)
{
    LEAK_START();
    flight_opts_t o = ropts(500);
    o.range_linger_ms = linger_ms(50);
    o.range_max_gap = 500;
    flight_group_t *g = group_with_opts(&o);
    rfetch_t f;
    rfetch_init(&f, R_SYNC, 102, 5000);
    static const uint64_t rg[3][2] = {{0, 999}, {500, 1999}, {1500, 2999}};
    crowd_t cr;
    crowd_start(&cr, 3, g, "lg", rg, &f, NULL);
    int leaders = crowd_join(&cr, 5000, "");
    ck_assert_int_eq(rf_ncalls(&f), 1);
    ASSERT_CALL(&f, 0, 0, 2999);
    ck_assert_int_eq(atomic_load(&f.serve_rc), 0);
    ck_assert_int_eq(leaders, 1);
    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.range_fetches, 1);
    ck_assert_uint_eq(s.range_bytes_fetched, 3000);
    ck_assert_uint_eq(s.range_bytes_requested, 1000 + 1500 + 1500);
    rfetch_destroy(&f);
    FINISH(g);
}
END_TEST

/* Two callers lingering together: merged or not by gap and span. */
static const struct {
    uint64_t gap, span;
    uint64_t rg[2][2]; /* what the two callers ask */
    int nf;
    uint64_t fr[2][2];
} linger_cases[] = {
    {0, 0, {{0, 999}, {1000, 1999}}, 1, {{0, 1999}}},  /* touching */
    {0, 0, {{0, 1499}, {1000, 1999}}, 1, {{0, 1999}}}, /* overlap */
    {0, 1000, {{0, 999}, {1000, 1999}}, 2, {{0, 999}, {1000, 1999}}}, /* span */
    {1000, 0, {{0, 499}, {1500, 1999}}, 1, {{0, 1999}}}, /* gap ok */
    {500, 0, {{0, 499}, {1500, 1999}}, 2, {{0, 499}, {1500, 1999}}}, /* gap */
    {0, 0, {{0, 499}, {1000, 1499}}, 2, {{0, 499}, {1000, 1499}}},
};

START_TEST(test_rg_linger_gap_span)
{
    LEAK_START();
    flight_opts_t o = ropts(500);
    o.range_linger_ms = linger_ms(100);
    o.range_max_gap = linger_cases[_i].gap;
    o.range_max_span = linger_cases[_i].span;
    flight_group_t *g = group_with_opts(&o);
    rfetch_t f;
    rfetch_init(&f, R_SYNC, 103, 5000);
    crowd_t cr;
    crowd_start(&cr, 2, g, "lgs", linger_cases[_i].rg, &f, NULL);
    crowd_join(&cr, 5000, NULL);
    ck_assert_int_eq(rf_ncalls(&f), linger_cases[_i].nf);
    rcall_t c[2];
    uint64_t fetched = 0;
    for (int i = 0; i < linger_cases[_i].nf; i++)
        c[i] = rf_call(&f, i);
    if (linger_cases[_i].nf == 2 && c[0].first > c[1].first) {
        rcall_t t = c[0];
        c[0] = c[1];
        c[1] = t;
    }
    for (int i = 0; i < linger_cases[_i].nf; i++) {
        ck_assert_uint_eq(c[i].first, linger_cases[_i].fr[i][0]);
        ck_assert_uint_eq(c[i].last, linger_cases[_i].fr[i][1]);
        fetched += c[i].last - c[i].first + 1;
    }
    ck_assert_uint_eq(stats_of(g).range_bytes_fetched, fetched);
    ck_assert_uint_eq(stats_of(g).range_fetches, (uint64_t)linger_cases[_i].nf);
    rfetch_destroy(&f);
    FINISH(g);
}
END_TEST

/* A leader lingers; a caller that only joins does not. */
START_TEST(test_rg_linger_only_leaders_wait)
{
    LEAK_START();
    const uint32_t lms = linger_ms(200);
    flight_opts_t o = ropts(1000);
    o.range_linger_ms = lms;
    flight_group_t *g = group_with_opts(&o);
    rfetch_t f;
    rfetch_init(&f, R_ASYNC, 104, 5000);
    double t0 = now_ms();
    flight_reader_t *a = rdo(g, "lw", 0, 1999, &f);
    ck_assert(now_ms() - t0 >= lms * 0.95);
    t0 = now_ms();
    flight_reader_t *b = rdo(g, "lw", 500, 1500, &f);
    ck_assert(now_ms() - t0 < lms * 0.95);
    ck_assert_int_eq(rf_ncalls(&f), 1);
    ck_assert_int_eq(flight_reader_shared(b), 1);
    rf_finish(&f, 0);
    ASSERT_READS(a, f.seed, 0, 1999);
    ASSERT_READS(b, f.seed, 500, 1500);
    close_readers(a, b, NULL);
    rfetch_destroy(&f);
    FINISH(g);
}
END_TEST

/*
 * Far-apart ranges: fetched = asked rounded to chunks, no gap. _i 0: one
 * caller after the other, ASYNC; _i 1: together, lingering (gap 0).
 */
START_TEST(test_rg_far_apart_no_gap)
{
    LEAK_START();
    const uint64_t cs = 4096, size = 1 * MiB;
    static const uint64_t rg[3][2] = {
        {0, 99}, {500000, 500099}, {1000000, 1048575}};
    flight_opts_t o = ropts(cs);
    if (_i == 1)
        o.range_linger_ms = linger_ms(50);
    flight_group_t *g = group_with_opts(&o);
    rfetch_t f;
    rfetch_init(&f, _i == 0 ? R_ASYNC : R_SYNC, 105, size);
    f.piece = 4096;
    uint64_t want_fetched = 0, want_req = 0;
    if (_i == 0) {
        flight_reader_t *r[3];
        for (int i = 0; i < 3; i++)
            r[i] = rdo(g, "far", rg[i][0], rg[i][1], &f);
        for (int i = 0; i < 3; i++)
            rf_finish(&f, i);
        for (int i = 0; i < 3; i++) {
            ck_assert_int_eq(flight_reader_shared(r[i]), 0);
            ASSERT_READS(r[i], f.seed, rg[i][0], rg[i][1]);
            flight_reader_close(r[i]);
        }
    } else {
        crowd_t cr;
        crowd_start(&cr, 3, g, "far", rg, &f, NULL);
        crowd_join(&cr, size, NULL);
        for (int i = 0; i < 3; i++)
            ck_assert_int_eq(cr.a[i].shared, 0);
    }
    ck_assert_int_eq(rf_ncalls(&f), 3);
    bool seen[3] = {false, false, false};
    for (int k = 0; k < 3; k++) {
        rcall_t c = rf_call(&f, k);
        int i = c.first < 400000 ? 0 : c.first < 900000 ? 1 : 2;
        ck_assert(!seen[i]);
        seen[i] = true;
        if (_i == 0)
            ck_assert_int_eq(i, k); /* in call order */
        ck_assert_uint_eq(c.first, rg[i][0] / cs * cs);
        ck_assert_uint_eq(c.last, (rg[i][1] / cs + 1) * cs - 1);
    }
    for (int i = 0; i < 3; i++) {
        want_fetched += (rg[i][1] / cs + 1) * cs - rg[i][0] / cs * cs;
        want_req += rg[i][1] - rg[i][0] + 1;
    }
    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.range_bytes_fetched, want_fetched);
    ck_assert_uint_eq(s.range_bytes_requested, want_req);
    ck_assert_uint_eq(s.range_fetches, 3);
    ck_assert_uint_eq(s.chunk_joins, 0);
    rfetch_destroy(&f);
    FINISH(g);
}
END_TEST

/* --- Reference: errors ---------------------------------------------------- */

/*
 * An ASYNC fetch of 0-2999 fails after 1500 bytes. A (0-2999, leader) and
 * B (1000-2999) get the bytes that arrived then the error, once, for good;
 * C (0-999) got all its bytes before: EOF; D (1600-2999) only the error.
 */
static const struct {
    int kind; /* 0 end(EIO), 1 release without end, 2 end(EAGAIN) */
    int want;
} async_err_cases[] = {
    {0, COALESCE_EIO}, {1, COALESCE_EUPSTREAM}, {2, COALESCE_EUPSTREAM}};

START_TEST(test_rg_error_async_writer)
{
    LEAK_START();
    flight_group_t *g = rgroup(1000);
    rfetch_t f;
    rfetch_init(&f, R_ASYNC, 106, 5000);
    flight_reader_t *a = rdo(g, "err", 0, 2999, &f);
    flight_reader_t *b = rdo(g, "err", 1000, 2999, &f);
    flight_reader_t *c = rdo(g, "err", 0, 999, &f);
    flight_reader_t *d = rdo(g, "err", 1600, 2999, &f);
    ck_assert_int_eq(rf_ncalls(&f), 1);
    ASSERT_CALL(&f, 0, 0, 2999);
    flight_writer_t *w = rf_start(&f, 0, 1500);
    int want = async_err_cases[_i].want;
    if (async_err_cases[_i].kind == 0)
        ck_assert_int_eq(flight_end(w, COALESCE_EIO), 0);
    else if (async_err_cases[_i].kind == 2)
        ck_assert_int_eq(flight_end(w, COALESCE_EAGAIN), 0);
    flight_writer_release(w);
    ASSERT_ENDS(a, f.seed, 0, 1500, want);
    ASSERT_ENDS(b, f.seed, 1000, 500, want);
    ASSERT_READS(c, f.seed, 0, 999);
    ASSERT_ENDS(d, f.seed, 1600, 0, want);
    ck_assert_uint_eq(flight_reader_offset(a), 1500);
    ck_assert_uint_eq(flight_reader_offset(d), 0);
    close_readers(a, b, c, d, NULL);
    ck_assert_uint_eq(stats_of(g).range_mismatches, 0);
    rfetch_destroy(&f);
    FINISH(g);
}
END_TEST

/*
 * Failing fetch callbacks. X (1000-1999) is in flight (ASYNC); L (0-2999)
 * leads 0-999 and 2000-2999 with a callback that fails; L joins chunk 1.
 */
static const struct {
    int mode;       /* R_RET or R_SYNC (reply, then limit bytes, no end) */
    int ret;        /* the callback's return value */
    uint64_t bytes; /* bytes L gets before the error */
    int want;
} sync_err_cases[] = {
    {R_RET, COALESCE_EIO, 0, COALESCE_EIO},
    {R_RET, FLIGHT_FETCH_DONE, 0, COALESCE_EUPSTREAM},
    {R_RET, 7, 0, COALESCE_EINVAL},
    {R_RET, COALESCE_EAGAIN, 0, COALESCE_EUPSTREAM},
    {R_SYNC, FLIGHT_FETCH_DONE, 500, COALESCE_EUPSTREAM},
    {R_SYNC, COALESCE_EIO, 500, COALESCE_EIO},
};

START_TEST(test_rg_error_fetch_callback)
{
    LEAK_START();
    flight_group_t *g = rgroup(1000);
    rfetch_t fx, fl;
    rfetch_init(&fx, R_ASYNC, 107, 5000);
    rfetch_init(&fl, sync_err_cases[_i].mode, 107, 5000);
    fl.ret = sync_err_cases[_i].ret;
    fl.limit = 500;
    fl.end = false;
    flight_reader_t *x = rdo(g, "cbf", 1000, 1999, &fx);
    flight_reader_t *l = rdo(g, "cbf", 0, 2999, &fl);
    ck_assert_int_eq(rf_ncalls(&fl), 2);
    ASSERT_CALL(&fl, 0, 0, 999);
    ASSERT_CALL(&fl, 1, 2000, 2999);
    ck_assert_int_eq(atomic_load(&fl.serve_rc), 0);
    int want = sync_err_cases[_i].want;
    ASSERT_ENDS(l, fl.seed, 0, sync_err_cases[_i].bytes, want);
    /* The other caller's fetch is not affected. */
    rf_finish(&fx, 0);
    ASSERT_READS(x, fx.seed, 1000, 1999);
    close_readers(x, l, NULL);
    rfetch_destroy_all(&fx, &fl, NULL);
    FINISH(g);
}
END_TEST

/* A reader spanning three fetches: the middle one (another's) fails. */
START_TEST(test_rg_error_in_joined_chunk)
{
    LEAK_START();
    flight_group_t *g = rgroup(1000);
    rfetch_t fa, fb;
    rfetch_init_all(R_ASYNC, 108, 5000, &fa, &fb, NULL);
    flight_reader_t *a = rdo(g, "mid", 1000, 1999, &fa);
    flight_reader_t *b = rdo(g, "mid", 0, 2999, &fb);
    ck_assert_int_eq(flight_reader_shared(b), 1);
    ck_assert_int_eq(rf_ncalls(&fb), 2);
    ASSERT_CALL(&fb, 0, 0, 999);
    ASSERT_CALL(&fb, 1, 2000, 2999);
    rf_finish(&fb, 0);
    rf_finish(&fb, 1);
    ASSERT_CALL(&fa, 0, 1000, 1999);
    flight_writer_t *w = rf_start(&fa, 0, 300);
    ck_assert_int_eq(flight_end(w, COALESCE_EIO), 0);
    flight_writer_release(w);
    ASSERT_ENDS(b, fb.seed, 0, 1300, COALESCE_EIO);
    ASSERT_ENDS(a, fa.seed, 1000, 300, COALESCE_EIO);
    close_readers(a, b, NULL);
    rfetch_destroy_all(&fa, &fb, NULL);
    FINISH(g);
}
END_TEST

/* --- Upstream mismatches -------------------------------------------------- */

/*
 * R asks 2000-3499, J 2500-2999 (joins): the fetch is told 2000-3999 of a
 * 5000-byte object (size unknown at call time). Replies, good and bad.
 */
static const struct {
    uint64_t f, l, t;
    int want;
    uint64_t rlast, jlast; /* good replies: where R and J end */
} mm_cases[] = {
    {0, 4999, 5000, FLIGHT_EMISMATCH, 0, 0},    /* 200 instead of 206 */
    {2001, 3999, 5000, FLIGHT_EMISMATCH, 0, 0}, /* shifted */
    {1000, 3999, 5000, FLIGHT_EMISMATCH, 0, 0}, /* starts early */
    {2000, 2999, 5000, FLIGHT_EMISMATCH, 0, 0}, /* short, size known */
    {2000, 4999, 5000, FLIGHT_EMISMATCH, 0, 0}, /* more than asked */
    {2000, 3999, 5000, 0, 3499, 2999},
    {2000, 3999, UNK, 0, 3499, 2999},
    {2000, 3499, UNK, 0, 3499, 2999}, /* the object ends at 3499 */
    {2000, 2999, UNK, 0, 2999, 2999}, /* ends at 2999: R is clipped */
    {2000, 2599, UNK, 0, 2599, 2599}, /* ends inside J's range */
};

START_TEST(test_rg_mismatch_reply)
{
    LEAK_START();
    flight_group_t *g = rgroup(1000);
    rfetch_t f;
    rfetch_init(&f, R_ASYNC, 201, 5000);
    flight_reader_t *r = rdo(g, "mm", 2000, 3499, &f);
    flight_reader_t *j = rdo(g, "mm", 2500, 2999, &f);
    ck_assert_int_eq(rf_ncalls(&f), 1);
    ASSERT_CALL(&f, 0, 2000, 3999);
    flight_writer_t *w = rf_w(&f, 0);
    const uint64_t rf = mm_cases[_i].f, rl = mm_cases[_i].l;
    int rc = flight_set_range(w, rf, rl, mm_cases[_i].t, "v1", 2);
    ck_assert_int_eq(rc, mm_cases[_i].want);
    flight_stats_t s = stats_of(g);
    if (rc == FLIGHT_EMISMATCH) {
        unsigned char x[4] = {0};
        ck_assert_int_ne(flight_write(w, x, sizeof(x)), 0);
        flight_writer_release(w);
        ck_assert_uint_eq(s.range_mismatches, 1);
        ck_assert_int_eq(flight_meta(r, -1, NULL, NULL), FLIGHT_EMISMATCH);
        assert_terminal(r, FLIGHT_EMISMATCH);
        ASSERT_ENDS(j, f.seed, 2500, 0, FLIGHT_EMISMATCH);
        ck_assert_uint_eq(stats_of(g).range_bytes_fetched, 0);
    } else {
        ck_assert_uint_eq(s.range_mismatches, 0);
        ck_assert_int_eq(write_pattern(w, f.seed, rf, rl - rf + 1, 333), 0);
        ck_assert_int_eq(flight_end(w, 0), 0);
        flight_writer_release(w);
        /* Below 3999 the end is implied: known or not. */
        const bool told = mm_cases[_i].t != UNK;
        uint64_t t =
            assert_total(r, told, rl < 3999, told ? mm_cases[_i].t : rl + 1);
        ASSERT_RANGE(r, 2000, mm_cases[_i].rlast, t);
        ASSERT_READS(r, f.seed, 2000, mm_cases[_i].rlast);
        ASSERT_READS(j, f.seed, 2500, mm_cases[_i].jlast);
        ck_assert_uint_eq(stats_of(g).range_bytes_fetched, rl - rf + 1);
    }
    close_readers(r, j, NULL);
    rfetch_destroy(&f);
    FINISH(g);
}
END_TEST

/*
 * Two fetches of one object in flight at once report different validators
 * (_i 0) or sizes (_i 1): the second to report fails, the first does not.
 * A 0-999 (w1), B 2000-2999 (w2), C 0-2999 (joins 0, leads 1 = w3, joins 2).
 */
START_TEST(test_rg_mismatch_between_fetches)
{
    LEAK_START();
    flight_group_t *g = rgroup(1000);
    rfetch_t fa, fb, fc;
    rfetch_init_all(R_ASYNC, 202, 5000, &fa, &fb, &fc, NULL);
    flight_reader_t *a = rdo(g, "val", 0, 999, &fa);
    flight_reader_t *b = rdo(g, "val", 2000, 2999, &fb);
    flight_reader_t *c = rdo(g, "val", 0, 2999, &fc);
    ck_assert_int_eq(rf_ncalls(&fc), 1);
    ASSERT_CALL(&fc, 0, 1000, 1999);
    ASSERT_CALL(&fa, 0, 0, 999);
    ck_assert_int_eq(rf_reply(&fa, rf_w(&fa, 0), 0, 999), 0);
    ck_assert_int_eq(rf_reply(&fc, rf_w(&fc, 0), 1000, 1999), 0);
    /* _i 0: another validator; _i 1: another size. */
    ck_assert_int_eq(flight_set_range(rf_w(&fb, 0), 2000, 2999,
                                      _i == 0 ? 5000 : 6000,
                                      _i == 0 ? "v2" : "v1", 2),
                     FLIGHT_EMISMATCH);
    flight_writer_release(rf_w(&fb, 0));
    ck_assert_uint_eq(stats_of(g).range_mismatches, 1);
    ASSERT_ENDS(b, fb.seed, 2000, 0, FLIGHT_EMISMATCH);
    /* The first two fetches go on. */
    rf_complete(&fa, 0, 0);
    rf_complete(&fc, 0, 1000);
    ASSERT_READS(a, fa.seed, 0, 999);
    ASSERT_ENDS(c, fc.seed, 0, 2000, FLIGHT_EMISMATCH);
    ck_assert_uint_eq(stats_of(g).range_mismatches, 1);
    close_readers(a, b, c, NULL);
    rfetch_destroy_all(&fa, &fb, &fc, NULL);
    FINISH(g);
}
END_TEST

/* A body that ends early: EMISMATCH after the bytes that arrived, no EOF. */
START_TEST(test_rg_mismatch_short_body)
{
    LEAK_START();
    flight_group_t *g = rgroup(1000);
    rfetch_t f;
    rfetch_init(&f, R_ASYNC, 203, 5000);
    flight_reader_t *a = rdo(g, "short", 0, 2999, &f);
    flight_reader_t *b = rdo(g, "short", 0, 999, &f);
    flight_reader_t *c = rdo(g, "short", 1500, 2999, &f);
    flight_reader_t *d = rdo(g, "short", 1800, 2999, &f);
    ASSERT_CALL(&f, 0, 0, 2999);
    flight_writer_t *w = rf_start(&f, 0, 1700);
    ck_assert_int_eq(flight_end(w, 0), FLIGHT_EMISMATCH);
    flight_writer_release(w);
    ASSERT_ENDS(a, f.seed, 0, 1700, FLIGHT_EMISMATCH);
    ASSERT_READS(b, f.seed, 0, 999);
    ASSERT_ENDS(c, f.seed, 1500, 200, FLIGHT_EMISMATCH);
    ASSERT_ENDS(d, f.seed, 1800, 0, FLIGHT_EMISMATCH);
    ck_assert_uint_eq(stats_of(g).range_bytes_fetched, 1700);
    close_readers(a, b, c, d, NULL);
    /* The brief counts this as a failed validation (spec: ambiguous). */
    ck_assert_uint_eq(stats_of(g).range_mismatches, 1);
    rfetch_destroy(&f);
    FINISH(g);
}
END_TEST

/*
 * Excess bytes. _i 0: 1000 bytes reported and written, then one more.
 * _i 1: 999 written, then a 2-byte write crossing the end.
 */
START_TEST(test_rg_mismatch_excess_bytes)
{
    LEAK_START();
    flight_group_t *g = rgroup(1000);
    rfetch_t f;
    rfetch_init(&f, R_ASYNC, 204, 5000);
    flight_reader_t *a = rdo(g, "excess", 2000, 2999, &f);
    ASSERT_CALL(&f, 0, 2000, 2999);
    const uint64_t written = _i == 0 ? 1000 : 999, extra = _i == 0 ? 1 : 2;
    flight_writer_t *w = rf_start(&f, 0, written);
    unsigned char two[2];
    test_fill(two, f.seed, 2000 + written, extra);
    ck_assert_int_eq(flight_write(w, two, extra), FLIGHT_EMISMATCH);
    flight_writer_release(w);
    if (_i == 0) {
        ASSERT_READS(a, f.seed, 2000, 2999);
    } else {
        /* Either the fitting byte was kept (EOF), or none (EMISMATCH). */
        readres_t res = rread_all(a, f.seed, 2000);
        ck_assert_int_eq(res.ok, 1);
        if (res.status == COALESCE_EOF)
            ck_assert_uint_eq(res.got, 1000);
        else {
            ck_assert_int_eq(res.status, FLIGHT_EMISMATCH);
            ck_assert_uint_eq(res.got, 999);
        }
        assert_terminal(a, res.status);
    }
    flight_reader_close(a);
    ck_assert_uint_eq(stats_of(g).range_mismatches, 1);
    rfetch_destroy(&f);
    FINISH(g);
}
END_TEST

/* Writer misuse on range and object writers. */
START_TEST(test_rg_writer_misuse)
{
    LEAK_START();
    flight_group_t *g = rgroup(1000);
    rfetch_t f;
    rfetch_init(&f, R_ASYNC, 205, 5000);
    flight_reader_t *a = rdo(g, "wm", 0, 999, &f);
    flight_writer_t *w = rf_w(&f, 0);
    unsigned char x[16];
    test_fill(x, f.seed, 0, sizeof(x));
    /* Body before the range. */
    ck_assert_int_eq(flight_write(w, x, sizeof(x)), COALESCE_EINVAL);
    coalesce_buf_t *buf = NULL;
    ck_assert_int_eq(coalesce_buf_new(&buf, 16), 0);
    memcpy(coalesce_buf_mutable(buf), x, 16);
    ck_assert_int_eq(flight_write_buf(w, buf, 0, 16), COALESCE_EINVAL);
    coalesce_buf_unref(buf);
    ck_assert_int_eq(flight_set_range(NULL, 0, 999, 5000, "v1", 2),
                     COALESCE_EINVAL);
    ck_assert_int_eq(flight_set_range(w, 999, 0, 5000, "v1", 2),
                     COALESCE_EINVAL);
    /* Nothing changed: a correct reply still works, once. */
    ck_assert_int_eq(rf_reply(&f, w, 0, 999), 0);
    ck_assert_int_eq(rf_reply(&f, w, 0, 999), COALESCE_EINVAL);
    ck_assert_int_eq(flight_write(w, x, sizeof(x)), 0);
    ck_assert_int_eq(rf_reply(&f, w, 0, 999), COALESCE_EINVAL);
    rf_write(&f, 0, 16, 984);
    ck_assert_int_eq(flight_end(w, 0), 0);
    ck_assert_int_eq(rf_reply(&f, w, 0, 999), COALESCE_EINVAL);
    flight_writer_release(w);
    ASSERT_READS(a, f.seed, 0, 999);
    flight_reader_close(a);
    ck_assert_uint_eq(stats_of(g).range_mismatches, 0);

    /* An empty body after a range: short. */
    flight_reader_t *b = rdo(g, "wm", 0, 999, &f);
    ck_assert_int_eq(rf_ncalls(&f), 2);
    w = rf_w(&f, 1);
    ck_assert_int_eq(rf_reply(&f, w, 0, 999), 0);
    ck_assert_int_eq(flight_end(w, 0), FLIGHT_EMISMATCH);
    flight_writer_release(w);
    ASSERT_BODY(rread_all(b, f.seed, 0), FLIGHT_EMISMATCH, 0);
    flight_reader_close(b);

    /* An object writer is no range writer. */
    fetch_ctx_t of;
    fetch_init(&of, F_ASYNC, 0, 0);
    flight_reader_t *o = NULL;
    ck_assert_int_eq(flight_do(g, "wm", 2, fetch_cb, &of, &o), 0);
    ck_assert_int_eq(atomic_load(&of.calls), 1);
    w = writer_of(&of);
    ck_assert_int_eq(flight_set_range(w, 0, 9, 10, "v1", 2), COALESCE_EINVAL);
    ck_assert_int_eq(flight_end(w, 0), 0);
    flight_writer_release(w);
    ck_assert_int_eq(flight_reader_range(o, NULL, NULL, NULL), COALESCE_EINVAL);
    assert_terminal(o, COALESCE_EOF);
    flight_reader_close(o);
    rfetch_destroy(&f);
    FINISH(g);
}
END_TEST

/* --- Streaming: joiners, late callers, short ranges ------------------------
 */

/*
 * A fetch of 0-3999 streams; 1500 bytes are out. B asks 1200-5999: it joins
 * chunks 1..3 (no second fetch of them), leads 4000-5999, and reads from
 * byte 1200, in order, even though its own fetch finishes first.
 */
START_TEST(test_rg_join_mid_chunk)
{
    LEAK_START();
    flight_group_t *g = rgroup(1000);
    rfetch_t fa, fb;
    rfetch_init_all(R_ASYNC, 301, 8000, &fa, &fb, NULL);
    fa.meta = "M1";
    fb.meta = "M2";
    flight_reader_t *a = rdo(g, "jm", 0, 3999, &fa);
    ASSERT_CALL(&fa, 0, 0, 3999);
    flight_writer_t *w1 = rf_start(&fa, 0, 1500);
    flight_reader_t *b = rdo(g, "jm", 1200, 5999, &fb);
    ck_assert_int_eq(rf_ncalls(&fa), 1);
    ck_assert_int_eq(rf_ncalls(&fb), 1);
    ASSERT_CALL(&fb, 0, 4000, 5999); /* 8000 is known: nothing to clip */
    ck_assert_int_eq(flight_reader_shared(b), 1);
    ck_assert_uint_eq(stats_of(g).range_fetches, 2);
    ck_assert_uint_eq(flight_writer_readers(w1), 2);
    assert_meta(b, "M1");
    ASSERT_RANGE(b, 1200, 5999, 8000);
    ASSERT_BODY(drain(b, PAT(fb.seed), 1200), COALESCE_EAGAIN, 300);
    rf_finish(&fb, 0);
    ASSERT_BODY(drain(b, PAT(fb.seed), 1500), COALESCE_EAGAIN, 0);
    rf_complete(&fa, 0, 1500);
    ASSERT_ENDS(b, fb.seed, 1500, 4500, COALESCE_EOF);
    ck_assert_uint_eq(flight_reader_offset(b), 4800);
    ASSERT_READS(a, fa.seed, 0, 3999);
    ck_assert_uint_eq(stats_of(g).range_bytes_fetched, 6000);
    ck_assert_uint_eq(stats_of(g).chunk_joins, 3);
    close_readers(a, b, NULL);
    rfetch_destroy_all(&fa, &fb, NULL);
    FINISH(g);
}
END_TEST

/*
 * A (0-2999) streams, `written` bytes out; then C asks [cf, cl]. Chunks the
 * run completed are fetched again (by C, exactly those), the chunk being
 * written and later ones are joined. C's meta is that of its first byte's
 * fetch.
 */
static const struct {
    uint64_t written, cf, cl;
    int nf;
    uint64_t ff, fl;
    uint64_t joins;
} late_cases[] = {
    {1500, 0, 2999, 1, 0, 999, 2},  {1500, 500, 700, 1, 0, 999, 0},
    {1000, 0, 1999, 1, 0, 999, 1},  {2500, 0, 2999, 1, 0, 1999, 1},
    {2500, 2600, 2999, 0, 0, 0, 1}, {0, 0, 2999, 0, 0, 0, 3},
    {999, 0, 2999, 0, 0, 0, 3},     {1500, 1999, 2000, 0, 0, 0, 2},
};

START_TEST(test_rg_late_caller)
{
    LEAK_START();
    flight_group_t *g = rgroup(1000);
    rfetch_t fa, fc;
    rfetch_init_all(R_ASYNC, 302, 5000, &fa, &fc, NULL);
    fa.meta = "M1";
    fc.meta = "M2";
    const uint64_t cf = late_cases[_i].cf, cl = late_cases[_i].cl;
    flight_reader_t *a = rdo(g, "late", 0, 2999, &fa);
    ASSERT_CALL(&fa, 0, 0, 2999);
    rf_start(&fa, 0, late_cases[_i].written);
    flight_reader_t *c = rdo(g, "late", cf, cl, &fc);
    ck_assert_int_eq(rf_ncalls(&fa), 1);
    ck_assert_int_eq(rf_ncalls(&fc), late_cases[_i].nf);
    if (late_cases[_i].nf)
        ASSERT_CALL(&fc, 0, late_cases[_i].ff, late_cases[_i].fl);
    ck_assert_int_eq(flight_reader_shared(c), late_cases[_i].joins > 0);
    if (late_cases[_i].nf)
        rf_finish(&fc, 0);
    assert_meta(c, late_cases[_i].nf ? "M2" : "M1");
    ASSERT_RANGE(c, cf, cl, 5000);
    rf_complete(&fa, 0, late_cases[_i].written);
    ASSERT_READS(c, fc.seed, cf, cl);
    ASSERT_READS(a, fa.seed, 0, 2999);
    ck_assert_uint_eq(stats_of(g).chunk_joins, late_cases[_i].joins);
    close_readers(a, c, NULL);
    rfetch_destroy_all(&fa, &fc, NULL);
    FINISH(g);
}
END_TEST

/*
 * RG-3: A wants 0-99, B the whole 3500-byte object. Once 150 bytes are out,
 * A has its bytes and its EOF although the writer is far from done.
 * _i 0: B leads, A joins; _i 1: A leads 0-999, B joins it and leads the rest.
 */
START_TEST(test_rg3_short_range_ends_first)
{
    LEAK_START();
    flight_group_t *g = rgroup(1000);
    rfetch_t fa, fb;
    rfetch_init_all(R_ASYNC, 303, 3500, &fa, &fb, NULL);
    flight_reader_t *a, *b;
    rfetch_t *f1; /* whose fetch serves chunk 0 */
    if (_i == 0) {
        b = rdo(g, "rg3", 0, 3499, &fb);
        a = rdo(g, "rg3", 0, 99, &fa);
        ck_assert_int_eq(rf_ncalls(&fa), 0);
        ASSERT_CALL(&fb, 0, 0, 3999);
        f1 = &fb;
    } else {
        a = rdo(g, "rg3", 0, 99, &fa);
        b = rdo(g, "rg3", 0, 3499, &fb);
        ASSERT_CALL(&fa, 0, 0, 999);
        ASSERT_CALL(&fb, 0, 1000, 3999);
        f1 = &fa;
    }
    flight_writer_t *w1 = rf_start(f1, 0, 150);
    ASSERT_READS(a, fa.seed, 0, 99);
    ck_assert_uint_eq(flight_writer_readers(w1), 1);
    ASSERT_BODY(drain(b, PAT(fb.seed), 0), COALESCE_EAGAIN, 150);
    rf_complete(f1, 0, 150);
    if (_i == 1)
        rf_finish(&fb, 0);
    ASSERT_BODY(rread_all(b, fb.seed, 150), COALESCE_EOF, 3350);
    ASSERT_RANGE(b, 0, 3499, 3500);
    close_readers(a, b, NULL);
    rfetch_destroy_all(&fa, &fb, NULL);
    FINISH(g);
}
END_TEST

/* --- Edges: chunk boundaries, whole object, past the end -------------------
 */

/* One caller, a correct sync upstream, 4500-byte object, chunk 1000. */
static const struct {
    uint64_t a, b;   /* asked */
    bool unk;        /* upstream replies with an unknown total */
    uint64_t ff, fl; /* the fetch is told */
    uint64_t dl;     /* last byte delivered */
    int srv;         /* what serving the fetch returns */
    int err;         /* what the reader returns instead of bytes */
} edge_cases[] = {
    {0, 0, false, 0, 999, 0, 0, 0},
    {0, 999, false, 0, 999, 999, 0, 0},
    {1000, 1999, false, 1000, 1999, 1999, 0, 0},
    {1999, 1999, false, 1000, 1999, 1999, 0, 0},
    {999, 1000, false, 0, 1999, 1000, 0, 0},
    {1000, 2000, false, 1000, 2999, 2000, 0, 0},
    {4499, 4499, false, 4000, 4999, 4499, 0, 0},
    {3500, 4499, false, 3000, 4999, 4499, 0, 0},
    {0, 4499, false, 0, 4999, 4499, 0, 0},
    {4200, 9999, false, 4000, 9999, 4499, 0, 0},
    {0, END, false, 0, END, 4499, 0, 0},
    {2500, END, false, 2000, END, 4499, 0, 0},
    {0, END, true, 0, END, 4499, 0, 0},
    {4200, 9999, true, 4000, 9999, 4499, 0, 0},
    {1000, 1999, true, 1000, 1999, 1999, 0, 0},
    {4500, 4600, false, 4000, 4999, 0, 0, FLIGHT_ERANGE},
    {4500, END, true, 4000, END, 0, 0, FLIGHT_ERANGE},
    {6000, 6999, false, 6000, 6999, 0, FLIGHT_ERANGE, FLIGHT_ERANGE},
    {6000, END, false, 6000, END, 0, FLIGHT_ERANGE, FLIGHT_ERANGE},
};

START_TEST(test_rg_edges)
{
    LEAK_START();
    const uint64_t size = 4500;
    flight_group_t *g = rgroup(1000);
    rfetch_t f;
    rfetch_init(&f, R_SYNC, 401, size);
    f.unknown_total = edge_cases[_i].unk;
    const uint64_t a = edge_cases[_i].a, b = edge_cases[_i].b;
    flight_reader_t *r = rdo(g, "edge", a, b, &f);
    ck_assert_int_eq(rf_ncalls(&f), 1);
    ASSERT_CALL(&f, 0, edge_cases[_i].ff, edge_cases[_i].fl);
    ck_assert_int_eq(atomic_load(&f.serve_rc), edge_cases[_i].srv);
    ck_assert_int_eq(flight_reader_shared(r), 0);
    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.range_fetches, 1);
    ck_assert_uint_eq(s.range_bytes_fetched,
                      edge_cases[_i].srv
                          ? 0
                          : min_u64(edge_cases[_i].fl, size - 1) -
                                edge_cases[_i].ff + 1);
    if (b != END)
        ck_assert_uint_eq(s.range_bytes_requested, b - a + 1);
    if (edge_cases[_i].err) {
        ck_assert_int_eq(flight_meta(r, -1, NULL, NULL), edge_cases[_i].err);
        uint64_t t = 0;
        ck_assert_int_eq(flight_reader_range(r, NULL, NULL, &t),
                         edge_cases[_i].err);
        if (edge_cases[_i].err == FLIGHT_ERANGE) /* for "bytes (star)/size" */
            ck_assert_uint_eq(t, size);
        assert_terminal(r, edge_cases[_i].err);
        ck_assert_uint_eq(flight_reader_offset(r), 0);
    } else {
        const uint64_t dl = edge_cases[_i].dl;
        ck_assert_int_eq(flight_meta(r, -1, NULL, NULL), 0);
        bool implied = b == END ||
                       min_u64(edge_cases[_i].fl, size - 1) < edge_cases[_i].fl;
        uint64_t t = assert_total(r, !edge_cases[_i].unk, implied, size);
        ASSERT_RANGE(r, a, dl, t);
        readres_t res =
            _i % 2 ? peek_all(r, PAT(f.seed), a) : rread_all(r, f.seed, a);
        ASSERT_BODY(res, COALESCE_EOF, dl - a + 1);
        assert_terminal(r, COALESCE_EOF);
        ck_assert_uint_eq(flight_reader_offset(r), dl - a + 1);
    }
    flight_reader_close(r);
    rfetch_destroy(&f);
    FINISH(g);
}
END_TEST

/*
 * Size known at call time (a fetch of the object in flight reported it):
 * past-the-end calls fail at once, fetches are clipped to the end.
 */
START_TEST(test_rg_known_size_clip_and_erange)
{
    LEAK_START();
    flight_group_t *g = rgroup(1000);
    rfetch_t fa, f2;
    rfetch_init_all(R_ASYNC, 402, 5000, &fa, &f2, NULL);
    flight_reader_t *a = rdo(g, "ks", 0, 999, &fa);
    ck_assert_int_eq(rf_reply(&fa, rf_w(&fa, 0), 0, 999), 0);

    static const uint64_t bad[][2] = {{5000, 5999}, {7000, END}, {5000, 5000}};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        flight_reader_t *x = SENTINEL(flight_reader_t);
        ck_assert_int_eq(flight_do_range(g, "ks", 2, bad[i][0], bad[i][1],
                                         rfetch_cb, &f2, &x),
                         FLIGHT_ERANGE);
        ck_assert_ptr_eq(x, SENTINEL(flight_reader_t));
    }
    ck_assert_int_eq(rf_ncalls(&f2), 0);
    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.range_bytes_requested, 1000);
    ck_assert_uint_eq(s.range_fetches, 1);

    flight_reader_t *p = rdo(g, "ks", 4500, 9999, &f2);
    ASSERT_CALL(&f2, 0, 4000, 4999); /* clipped to the known end */
    flight_reader_t *q = rdo(g, "ks", 4200, END, &f2);
    ck_assert_int_eq(rf_ncalls(&f2), 1); /* chunk 4 is in flight: joined */
    flight_reader_t *z = rdo(g, "ks", 0, END, &f2);
    ck_assert_int_eq(rf_ncalls(&f2), 2);
    ASSERT_CALL(&f2, 1, 1000, 3999);
    s = stats_of(g);
    ck_assert_uint_eq(s.range_bytes_requested, 1000 + 500 + 800 + 5000);
    ASSERT_RANGE(z, 0, 4999, 5000);
    ASSERT_RANGE(a, 0, 999, 5000);
    rf_finish(&f2, 0);
    rf_finish(&f2, 1);
    rf_complete(&fa, 0, 0);
    ASSERT_READS(p, f2.seed, 4500, 4999);
    ASSERT_READS(q, f2.seed, 4200, 4999);
    ASSERT_READS(z, f2.seed, 0, 4999);
    ASSERT_READS(a, fa.seed, 0, 999);
    ASSERT_RANGE(p, 4500, 4999, 5000);
    ASSERT_RANGE(q, 4200, 4999, 5000);
    ck_assert_uint_eq(stats_of(g).chunk_joins, 1 + 2);
    close_readers(a, p, q, z, NULL);
    rfetch_destroy_all(&fa, &f2, NULL);
    FINISH(g);
}
END_TEST

/*
 * Open ranges whose end becomes known late. _i 0: R (0-END) joins chunk 0
 * of a fetch that reported an unknown size and leads 1000-END: while its own
 * fetch has not reported, R's last is FLIGHT_RANGE_END. _i 1: P (3000-4320)
 * leads 3000-4999; Q (3000-END) joins chunks 3-4 and leads 5000-END, which
 * upstream answers 416 (first): Q still reads 3000-4320 then EOF.
 */
START_TEST(test_rg_open_range_end_late)
{
    LEAK_START();
    flight_group_t *g = rgroup(1000);
    rfetch_t fa, fr;
    if (_i == 0) {
        rfetch_init_all(R_ASYNC, 403, 2500, &fa, &fr, NULL);
        fa.unknown_total = fr.unknown_total = true;
        flight_reader_t *a = rdo(g, "open", 0, 999, &fa);
        ck_assert_int_eq(rf_reply(&fa, rf_w(&fa, 0), 0, 999), 0);
        flight_reader_t *r = rdo(g, "open", 0, END, &fr);
        ck_assert_int_eq(rf_ncalls(&fr), 1);
        ASSERT_CALL(&fr, 0, 1000, END);
        rf_write(&fa, 0, 0, 10);
        ck_assert_int_eq(flight_meta(r, -1, NULL, NULL), 0);
        ASSERT_RANGE(r, 0, END, UNK);
        ck_assert_int_eq(rf_reply(&fr, rf_w(&fr, 0), 1000, END), 0);
        uint64_t t = assert_total(r, false, true, 2500);
        ASSERT_RANGE(r, 0, 2499, t);
        rf_complete(&fr, 0, 1000);
        rf_complete(&fa, 0, 10);
        ASSERT_READS(r, fr.seed, 0, 2499);
        ASSERT_READS(a, fa.seed, 0, 999);
        close_readers(a, r, NULL);
    } else {
        rfetch_init_all(R_ASYNC, 404, 4321, &fa, &fr, NULL);
        flight_reader_t *p = rdo(g, "open", 3000, 4320, &fa);
        ASSERT_CALL(&fa, 0, 3000, 4999);
        flight_reader_t *q = rdo(g, "open", 3000, END, &fr);
        ck_assert_int_eq(rf_ncalls(&fr), 1);
        ASSERT_CALL(&fr, 0, 5000, END);
        ck_assert_int_eq(rf_reply(&fr, rf_w(&fr, 0), 5000, END), FLIGHT_ERANGE);
        flight_writer_release(rf_w(&fr, 0));
        rf_finish(&fa, 0);
        ASSERT_READS(q, fr.seed, 3000, 4320);
        ASSERT_READS(p, fa.seed, 3000, 4320);
        ASSERT_RANGE(q, 3000, 4320, 4321);
        close_readers(p, q, NULL);
    }
    rfetch_destroy_all(&fa, &fr, NULL);
    FINISH(g);
}
END_TEST

/* --- RG-8: several readers, gaps, any reading order ------------------------
 */

typedef struct rg8_arg {
    flight_group_t *g;
    rfetch_t *f;
    counter_t *registered;
    int order;
    int rc1, rc2;
    readres_t res1, res2;
} rg8_arg_t;

static void *rg8_thread(void *p)
{
    rg8_arg_t *a = p;
    flight_reader_t *r1 = NULL, *r2 = NULL;
    a->rc1 = flight_do_range(a->g, "rg8", 3, 0, 7999, rfetch_cb, a->f, &r1);
    a->rc2 = flight_do_range(a->g, "rg8", 3, 2500, 5500, rfetch_cb, a->f, &r2);
    counter_add(a->registered, 1);
    if (a->rc1 == 0 && a->rc2 == 0) {
        if (a->order == 0) {
            a->res1 = rread_all(r1, a->f->seed, 0);
            a->res2 = rread_all(r2, a->f->seed, 2500);
        } else {
            a->res2 = rread_all(r2, a->f->seed, 2500);
            a->res1 = rread_all(r1, a->f->seed, 0);
        }
    }
    close_readers(r1, r2, NULL);
    return NULL;
}

/*
 * X (2000-2999) and Y (5000-5999) are in flight, ASYNC, unwritten. A thread
 * asks 0-7999 (leads 0-1999, 3000-4999, 6000-7999 synchronously, joins 2 and
 * 5), then 2500-5500 (joins 2 and 5, leads 3000-4999 again: that run is
 * over), and reads its two readers in order _i. The test writes X and Y only
 * once both readers exist. A hang is caught by the timeout.
 */
START_TEST(test_rg8_gaps_and_two_readers)
{
    LEAK_START();
    flight_group_t *g = rgroup(1000);
    rfetch_t fx, ft;
    rfetch_init(&fx, R_ASYNC, 501, 10000);
    rfetch_init(&ft, R_SYNC, 501, 10000);
    flight_reader_t *x = rdo(g, "rg8", 2000, 2999, &fx);
    flight_reader_t *y = rdo(g, "rg8", 5000, 5999, &fx);
    counter_t registered;
    counter_init(&registered);
    rg8_arg_t a = {.g = g, .f = &ft, .registered = &registered, .order = _i};
    pthread_t th;
    ck_assert_int_eq(pthread_create(&th, NULL, rg8_thread, &a), 0);
    counter_wait(&registered, 1);
    rf_finish(&fx, 0);
    rf_finish(&fx, 1);
    pthread_join(th, NULL);
    ck_assert_int_eq(a.rc1, 0);
    ck_assert_int_eq(a.rc2, 0);
    ASSERT_BODY(a.res1, COALESCE_EOF, 8000);
    ASSERT_BODY(a.res2, COALESCE_EOF, 3001);
    ck_assert_int_eq(rf_ncalls(&ft), 4);
    ASSERT_CALL(&ft, 0, 0, 1999);
    ASSERT_CALL(&ft, 1, 3000, 4999);
    ASSERT_CALL(&ft, 2, 6000, 7999);
    ASSERT_CALL(&ft, 3, 3000, 4999);
    ck_assert_int_eq(atomic_load(&ft.serve_rc), 0);
    ASSERT_READS(x, fx.seed, 2000, 2999);
    ASSERT_READS(y, fx.seed, 5000, 5999);
    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.chunk_joins, 4);
    ck_assert_uint_eq(s.range_fetches, 6);
    ck_assert_uint_eq(s.range_bytes_fetched, 2000 + 8000);
    close_readers(x, y, NULL);
    counter_destroy(&registered);
    rfetch_destroy_all(&fx, &ft, NULL);
    FINISH(g);
}
END_TEST

/* --- RG-7: lag, leaving, orphans, timeouts, notify, stats ------------------
 */

/*
 * Writes object bytes [off, off + len) through ASYNC call 0 of f, then
 * drains r (which reads from object offset 0 and has *got bytes): r must
 * have every byte written so far.
 */
static void write_and_drain(
    rfetch_t *f, flight_reader_t *r, uint64_t off, uint64_t len, uint64_t *got)
{
    rf_write(f, 0, off, len);
    readres_t res = drain(r, PAT(f->seed), *got);
    ck_assert_int_eq(res.ok, 1);
    *got += res.got;
    ck_assert_uint_eq(*got, off + len);
}

/*
 * max_lag 4000 counted across chunks. _i 0: A and B read one 0-19999
 * fetch; B reads 1234 bytes then stops: the write starting at 5500 (more
 * than 4000 past 1234) detaches it. _i 1: A leads 0-4999, B (0-9999) joins
 * it and leads 5000-9999; B has read nothing when its own fetch writes at
 * 5000: detached. A is never affected.
 */
START_TEST(test_rg7_max_lag_across_chunks)
{
    LEAK_START();
    flight_opts_t o = ropts(1000);
    o.max_lag = 4000;
    flight_group_t *g = group_with_opts(&o);
    rfetch_t fa, fb;
    rfetch_init_all(R_ASYNC, 601, 20000, &fa, &fb, NULL);
    fa.piece = fb.piece = 500;
    uint64_t got_a = 0;
    flight_reader_t *a, *b;
    if (_i == 0) {
        a = rdo(g, "lag", 0, 19999, &fa);
        b = rdo(g, "lag", 0, 19999, &fb);
        ck_assert_int_eq(rf_ncalls(&fb), 0);
        flight_writer_t *w = rf_w(&fa, 0);
        ck_assert_int_eq(rf_reply(&fa, w, 0, 19999), 0);
        for (uint64_t off = 0; off < 20000; off += 500) {
            write_and_drain(&fa, a, off, 500, &got_a);
            if (off == 1000)
                ASSERT_BODY(read_upto(b, PAT(fb.seed), 0, 1234, 1000, -1), 0,
                            1234);
            ck_assert_uint_eq(stats_of(g).lagged, off > 1234 + 4000 ? 1 : 0);
        }
        ck_assert_int_eq(flight_end(w, 0), 0);
        flight_writer_release(w);
        ck_assert_uint_eq(flight_reader_offset(b), 1234);
    } else {
        a = rdo(g, "lag", 0, 4999, &fa);
        b = rdo(g, "lag", 0, 9999, &fb);
        ASSERT_CALL(&fb, 0, 5000, 9999);
        flight_writer_t *w1 = rf_w(&fa, 0), *w2 = rf_w(&fb, 0);
        ck_assert_int_eq(rf_reply(&fa, w1, 0, 4999), 0);
        ck_assert_int_eq(rf_reply(&fb, w2, 5000, 9999), 0);
        rf_write(&fa, 0, 0, 1000);
        ck_assert_uint_eq(stats_of(g).lagged, 0);
        rf_write(&fb, 0, 5000, 500);
        ck_assert_uint_eq(stats_of(g).lagged, 1);
        ck_assert_uint_eq(flight_writer_readers(w2), 0);
        rf_complete(&fb, 0, 5500);
        /* A keeps up with its own fetch, so it is never detached. */
        for (uint64_t off = 1000; off < 5000; off += 500)
            write_and_drain(&fa, a, off, 500, &got_a);
        ck_assert_int_eq(flight_end(w1, 0), 0);
        flight_writer_release(w1);
    }
    assert_terminal(b, FLIGHT_ELAGGED);
    ck_assert_uint_eq(flight_reader_offset(b), _i == 0 ? 1234 : 0);
    uint64_t alast = _i == 0 ? 19999 : 4999;
    ASSERT_ENDS(a, fa.seed, got_a, alast + 1 - got_a, COALESCE_EOF);
    ck_assert_uint_eq(stats_of(g).lagged, 1);
    close_readers(a, b, NULL);
    rfetch_destroy_all(&fa, &fb, NULL);
    FINISH(g);
}
END_TEST

/* Readers that leave mid-body (the leader's included) disturb nobody. */
START_TEST(test_rg7_readers_leave_mid_body)
{
    LEAK_START();
    flight_group_t *g = rgroup(1000);
    rfetch_t f;
    rfetch_init(&f, R_ASYNC, 602, 5000);
    flight_reader_t *l = rdo(g, "leave", 0, 2999, &f);
    flight_reader_t *j1 = rdo(g, "leave", 0, 2999, &f);
    flight_reader_t *j2 = rdo(g, "leave", 1000, 1999, &f);
    flight_reader_t *j3 = rdo(g, "leave", 500, 2999, &f);
    ASSERT_CALL(&f, 0, 0, 2999);
    flight_writer_t *w = rf_start(&f, 0, 1500);
    ck_assert_uint_eq(flight_writer_readers(w), 4);
    flight_reader_close(l); /* the leader's reader, unread */
    ASSERT_BODY(read_upto(j1, PAT(f.seed), 0, 700, 300, -1), 0, 700);
    flight_reader_close(j1);
    ASSERT_BODY(read_upto(j2, PAT(f.seed), 1000, 300, 300, -1), 0, 300);
    ck_assert_uint_eq(flight_writer_readers(w), 2);
    rf_write(&f, 0, 1500, 500);
    /* j2 has all its bytes: it no longer waits for the writer. */
    ck_assert_uint_eq(flight_writer_readers(w), 1);
    ASSERT_BODY(rread_all(j2, f.seed, 1300), COALESCE_EOF, 700);
    flight_reader_close(j2);
    rf_write(&f, 0, 2000, 1000);
    ck_assert_int_eq(flight_end(w, 0), 0);
    ck_assert_uint_eq(flight_writer_readers(w), 0);
    flight_writer_release(w);
    ASSERT_READS(j3, f.seed, 500, 2999);
    flight_reader_close(j3);
    ck_assert_uint_eq(stats_of(g).range_bytes_fetched, 3000);
    rfetch_destroy(&f);
    FINISH(g);
}
END_TEST

/*
 * Orphans. _i 0: CANCEL, both readers close. _i 1: CANCEL, the remaining
 * reader needs only chunk 0: once it is written nobody waits, the next write
 * is canceled, the reader still gets its bytes and EOF. _i 2: CONTINUE.
 */
START_TEST(test_rg7_orphan_policy)
{
    LEAK_START();
    flight_opts_t o = ropts(1000);
    o.orphan_policy = _i == 2 ? FLIGHT_ORPHAN_CONTINUE : FLIGHT_ORPHAN_CANCEL;
    flight_group_t *g = group_with_opts(&o);
    rfetch_t f;
    rfetch_init(&f, R_ASYNC, 603, 5000);
    flight_reader_t *a = rdo(g, "orph", 0, 2999, &f);
    flight_reader_t *b = rdo(g, "orph", 0, 999, &f);
    ASSERT_CALL(&f, 0, 0, 2999);
    flight_writer_t *w = rf_start(&f, 0, 500);
    ck_assert_uint_eq(flight_writer_readers(w), 2);
    flight_reader_close(a);
    ck_assert_uint_eq(flight_writer_readers(w), 1);
    unsigned char x[100];
    test_fill(x, f.seed, 1000, sizeof(x));
    if (_i == 1) {
        rf_write(&f, 0, 500, 500);
        ck_assert_uint_eq(flight_writer_readers(w), 0);
        ck_assert_int_eq(flight_write(w, x, sizeof(x)), FLIGHT_ECANCELED);
        ck_assert_int_eq(flight_end(w, 0), FLIGHT_ECANCELED);
        flight_writer_release(w);
        ASSERT_READS(b, f.seed, 0, 999);
        flight_reader_close(b);
    } else {
        flight_reader_close(b);
        ck_assert_uint_eq(flight_writer_readers(w), 0);
        if (_i == 0) {
            ck_assert_int_eq(flight_write(w, x, sizeof(x)), FLIGHT_ECANCELED);
            ck_assert_int_eq(flight_write(w, x, sizeof(x)), FLIGHT_ECANCELED);
            ck_assert_int_eq(flight_end(w, 0), FLIGHT_ECANCELED);
        } else {
            rf_write(&f, 0, 500, 2500);
            ck_assert_int_eq(flight_end(w, 0), 0);
        }
        flight_writer_release(w);
    }
    assert_idle(g);
    /* The key is free: a new call fetches again. */
    flight_reader_t *c = rdo(g, "orph", 0, 2999, &f);
    ck_assert_int_eq(rf_ncalls(&f), 2);
    ASSERT_CALL(&f, 1, 0, 2999);
    rf_finish(&f, 1);
    ASSERT_READS(c, f.seed, 0, 2999);
    flight_reader_close(c);
    rfetch_destroy(&f);
    FINISH(g);
}
END_TEST

/* wait_timeout_ms applies to range readers whose first chunk is joined. */
START_TEST(test_rg7_wait_timeout)
{
    LEAK_START();
    const uint32_t wait_ms = 300;
    flight_opts_t o = ropts(1000);
    o.wait_timeout_ms = wait_ms;
    flight_group_t *g = group_with_opts(&o);
    rfetch_t fa, fc;
    rfetch_init_all(R_ASYNC, 604, 5000, &fa, &fc, NULL);
    fa.meta = "m";
    flight_reader_t *a = rdo(g, "wt", 0, 999, &fa);
    flight_reader_t *b = rdo(g, "wt", 0, 999, &fa);
    flight_reader_t *c = rdo(g, "wt", 500, 2999, &fc);
    ASSERT_CALL(&fc, 0, 1000, 2999);
    ck_assert_int_eq(flight_reader_deadline_ms(a), -1);
    int64_t d = flight_reader_deadline_ms(b);
    ck_assert_int_ge(d, 0);
    ck_assert_int_le(d, wait_ms);
    ck_assert_int_ge(flight_reader_deadline_ms(c), 0);
    ck_assert_int_eq(flight_reader_range(b, NULL, NULL, NULL), COALESCE_EAGAIN);
    ck_assert_int_eq(flight_meta(b, -1, NULL, NULL), FLIGHT_ETIMEDOUT);
    assert_terminal(b, FLIGHT_ETIMEDOUT);
    ck_assert_uint_eq(flight_reader_offset(b), 0);
    unsigned char buf[16];
    size_t n = 0;
    ck_assert_int_eq(flight_read(c, buf, sizeof(buf), -1, &n),
                     FLIGHT_ETIMEDOUT);
    /* The leader is no waiter. */
    ck_assert_int_eq(flight_meta(a, 0, NULL, NULL), COALESCE_EAGAIN);
    ck_assert_int_eq(flight_reader_deadline_ms(a), -1);
    /* Once the meta is known, a new joiner has no deadline. */
    ASSERT_CALL(&fa, 0, 0, 999);
    rf_start(&fa, 0, 0);
    flight_reader_t *e = rdo(g, "wt", 200, 999, &fa);
    ck_assert_int_eq(flight_reader_deadline_ms(e), -1);
    assert_meta(e, "m");
    ck_assert_int_eq(flight_read(e, buf, sizeof(buf), (int)wait_ms + 100, &n),
                     COALESCE_EAGAIN);
    rf_complete(&fa, 0, 0);
    rf_finish(&fc, 0);
    ASSERT_READS(a, fa.seed, 0, 999);
    ASSERT_READS(e, fa.seed, 200, 999);
    assert_terminal(b, FLIGHT_ETIMEDOUT);
    assert_terminal(c, FLIGHT_ETIMEDOUT);
    close_readers(a, b, c, e, NULL);
    rfetch_destroy_all(&fa, &fc, NULL);
    FINISH(g);
}
END_TEST

/* Notify on a range reader that joined mid-object (1000-2999 of 0-2999). */
START_TEST(test_rg7_notify)
{
    LEAK_START();
    flight_group_t *g = rgroup(1000);
    rfetch_t f;
    rfetch_init(&f, R_ASYNC, 605, 5000);
    flight_reader_t *a = rdo(g, "ntf", 0, 2999, &f);
    flight_reader_t *b = rdo(g, "ntf", 1000, 2999, &f);
    flight_writer_t *w = rf_w(&f, 0);
    notify_ctx_t n;
    notify_init(&n);
    ck_assert_int_eq(flight_reader_notify(b, notify_cb, &n), 0);
    ck_assert_int_eq(rf_reply(&f, w, 0, 2999), 0);
    ck_assert_int_eq(flight_set_meta(w, "m", 1), 0);
    ck_assert_int_eq(atomic_load(&n.fired), 1);
    ck_assert_ptr_eq(atomic_load(&n.reader), b);
    ck_assert_int_eq(flight_reader_notify(b, notify_cb, &n), 1);
    assert_meta(b, "m");
    ck_assert_int_eq(flight_reader_notify(b, notify_cb, &n), 0);
    rf_write(&f, 0, 0, 1500);
    ck_assert_int_eq(atomic_load(&n.fired), 2);
    ck_assert_ptr_eq(atomic_load(&n.reader), b);
    ck_assert_int_eq(flight_reader_notify(b, notify_cb, &n), 1);
    ASSERT_BODY(drain(b, PAT(f.seed), 1000), COALESCE_EAGAIN, 500);
    ck_assert_int_eq(flight_reader_notify(b, notify_cb, &n), 0);
    rf_write(&f, 0, 1500, 1500);
    ck_assert_int_eq(atomic_load(&n.fired), 3);
    ASSERT_BODY(drain(b, PAT(f.seed), 1500), COALESCE_EOF, 1500);
    ck_assert_int_eq(flight_reader_notify(b, notify_cb, &n), 1);
    ck_assert_int_eq(flight_end(w, 0), 0);
    flight_writer_release(w);
    ck_assert_int_eq(atomic_load(&n.fired), 3);
    flight_reader_close(b);
    ASSERT_READS(a, f.seed, 0, 2999);
    flight_reader_close(a);
    rfetch_destroy(&f);
    FINISH(g);
}
END_TEST

/* Exact counters in a small scenario (10000-byte object, chunk 1000). */
START_TEST(test_rg7_stats)
{
    LEAK_START();
    flight_group_t *g = rgroup(1000);
    rfetch_t fa, fb, fc;
    rfetch_init_all(R_ASYNC, 606, 10000, &fa, &fb, NULL);
    rfetch_init(&fc, R_SYNC, 606, 10000);
    flight_stats_t s0 = stats_of(g);
    ck_assert_uint_eq(s0.range_fetches, 0);
    ck_assert_uint_eq(s0.chunk_joins, 0);
    ck_assert_uint_eq(s0.range_bytes_requested, 0);
    ck_assert_uint_eq(s0.range_bytes_fetched, 0);
    ck_assert_uint_eq(s0.range_mismatches, 0);

    flight_reader_t *a = rdo(g, "st", 0, 2999, &fa);
    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.range_fetches, 1);
    ck_assert_uint_eq(s.chunk_joins, 0);
    ck_assert_uint_eq(s.range_bytes_requested, 3000);
    ck_assert_uint_eq(s.readers_open, 1);
    flight_reader_t *b = rdo(g, "st", 1500, 3499, &fb);
    ASSERT_CALL(&fb, 0, 3000, 3999);
    s = stats_of(g);
    ck_assert_uint_eq(s.range_fetches, 2);
    ck_assert_uint_eq(s.range_bytes_requested, 5000);
    ck_assert_uint_eq(s.readers_open, 2);
    ASSERT_CALL(&fa, 0, 0, 2999);
    rf_start(&fa, 0, 100);
    ck_assert_uint_ge(stats_of(g).flights_active, 1);
    /* Size known: an open range is clipped, past the end fails. */
    flight_reader_t *c = rdo(g, "st", 9500, END, &fc);
    ASSERT_CALL(&fc, 0, 9000, 9999);
    flight_reader_t *x = SENTINEL(flight_reader_t);
    ck_assert_int_eq(
        flight_do_range(g, "st", 2, 20000, 20999, rfetch_cb, &fc, &x),
        FLIGHT_ERANGE);
    flight_reader_t *e = rdo(g, "st", 2000, 2999, &fc);
    ck_assert_int_eq(rf_ncalls(&fc), 1);
    s = stats_of(g);
    ck_assert_uint_eq(s.range_fetches, 3);
    ck_assert_uint_eq(s.range_bytes_requested, 5000 + 500 + 1000);
    ck_assert_uint_eq(s.range_bytes_fetched, 100 + 1000);
    ck_assert_uint_eq(s.readers_open, 4);
    rf_complete(&fa, 0, 100);
    rf_finish(&fb, 0);
    s = stats_of(g);
    ck_assert_uint_eq(s.range_bytes_fetched, 5000);
    /* Nobody read anything yet: the bytes are held. */
    ck_assert_uint_ge(s.bytes_held, 3000);
    ck_assert_uint_ge(s.segments_held, 1);
    ck_assert_int_eq(flight_reader_shared(a), 0);
    ck_assert_int_eq(flight_reader_shared(b), 1);
    ck_assert_int_eq(flight_reader_shared(c), 0);
    ck_assert_int_eq(flight_reader_shared(e), 1);
    ASSERT_READS(a, fa.seed, 0, 2999);
    ASSERT_READS(b, fb.seed, 1500, 3499);
    ASSERT_READS(c, fc.seed, 9500, 9999);
    ASSERT_READS(e, fc.seed, 2000, 2999);
    close_readers(a, b, c, e, NULL);
    s = stats_of(g);
    ck_assert_uint_eq(s.range_fetches, 3);
    ck_assert_uint_eq(s.chunk_joins, 3);
    ck_assert_uint_eq(s.range_bytes_fetched, 5000);
    ck_assert_uint_eq(s.range_mismatches, 0);
    ck_assert_uint_eq(s.flights_started, 0);
    ck_assert_uint_eq(s.joins, 0);
    rfetch_destroy_all(&fa, &fb, &fc, NULL);
    FINISH(g);
}
END_TEST

/* --- Concurrency and keys ------------------------------------------------- */

#define HC_N      16
#define HC_CS     1000
#define HC_SIZE   40321 /* chunks 0..40, the last one partial */
#define HC_CHUNKS 41

static const uint64_t hc_ranges[HC_N][2] = {
    {0, 4999},      {0, 4999},      {2500, 9999},   {9000, 9000},
    {12000, 19999}, {12000, 19999}, {15500, 27999}, {30000, 40320},
    {39999, 40320}, {36000, 36999}, {5000, 5000},   {21000, 21999},
    {33333, 34444}, {100, 200},     {27999, 30000}, {40000, 40320},
};

typedef struct upstream {
    rfetch_t *f;
    counter_t *registered;
    int rc;
} upstream_t;

/* Waits until every caller is registered, then serves every fetch,
 * interleaving 300-byte writes across them. */
static void *upstream_main(void *p)
{
    upstream_t *u = p;
    rfetch_t *f = u->f;
    counter_wait(u->registered, HC_N);
    long n = rf_ncalls(f);
    if (n > MAXCALLS) {
        u->rc = -1000;
        n = MAXCALLS;
    }
    uint64_t off[MAXCALLS], end[MAXCALLS];
    rcall_t c[MAXCALLS];
    pthread_mutex_lock(&f->ncalls.mu);
    memcpy(c, f->call, sizeof(rcall_t) * (size_t)n);
    pthread_mutex_unlock(&f->ncalls.mu);
    for (long i = 0; i < n; i++) {
        int rc = rf_reply(f, c[i].w, c[i].first, c[i].last);
        if (rc == 0)
            rc = flight_set_meta(c[i].w, "up", 2);
        if (rc && !u->rc)
            u->rc = rc;
        off[i] = c[i].first;
        end[i] = rc ? off[i] : min_u64(c[i].last, f->size - 1) + 1;
    }
    for (bool more = true; more;) {
        more = false;
        for (long i = 0; i < n; i++) {
            if (off[i] >= end[i])
                continue;
            uint64_t k = min_u64(300, end[i] - off[i]);
            int rc = write_pattern(c[i].w, f->seed, off[i], k, 300);
            if (rc && !u->rc)
                u->rc = rc;
            off[i] = rc ? end[i] : off[i] + k;
            more = true;
        }
    }
    for (long i = 0; i < n; i++) {
        int rc = flight_end(c[i].w, 0);
        if (rc && !u->rc)
            u->rc = rc;
        flight_writer_release(c[i].w);
    }
    return NULL;
}

/*
 * 16 threads, same and overlapping ranges, ASYNC fetches served by an
 * upstream thread once all are registered (so no run completes early and
 * every chunk is fetched exactly once): fetches are disjoint, cover exactly
 * the union of the asked chunks, and every reader gets exactly its bytes.
 */
START_TEST(test_rg_high_concurrency)
{
    LEAK_START();
    flight_group_t *g = rgroup(HC_CS);
    rfetch_t f;
    rfetch_init(&f, R_ASYNC, 701, HC_SIZE);
    counter_t registered;
    counter_init(&registered);
    upstream_t u = {.f = &f, .registered = &registered};
    pthread_t up;
    ck_assert_int_eq(pthread_create(&up, NULL, upstream_main, &u), 0);
    crowd_t cr;
    crowd_start(&cr, HC_N, g, "hc", hc_ranges, &f, &registered);
    crowd_join(&cr, HC_SIZE, "up");
    pthread_join(up, NULL);
    ck_assert_int_eq(u.rc, 0);

    bool need[HC_N][HC_CHUNKS] = {{false}}, any[HC_CHUNKS] = {false};
    uint64_t slots = 0, requested = 0;
    for (int i = 0; i < HC_N; i++) {
        requested += hc_ranges[i][1] - hc_ranges[i][0] + 1;
        for (uint64_t k = hc_ranges[i][0] / HC_CS; k <= hc_ranges[i][1] / HC_CS;
             k++) {
            need[i][k] = any[k] = true;
            slots++;
        }
    }
    long n = rf_ncalls(&f);
    ck_assert_int_le(n, MAXCALLS);
    int led_by[HC_CHUNKS];
    for (int k = 0; k < HC_CHUNKS; k++)
        led_by[k] = -1;
    for (long c = 0; c < n; c++) {
        rcall_t call = rf_call(&f, c);
        ck_assert_uint_eq(call.first % HC_CS, 0);
        ck_assert_uint_eq((call.last + 1) % HC_CS, 0);
        int t = -1;
        for (int i = 0; i < HC_N; i++)
            if (pthread_equal(cr.a[i].self, call.thread))
                t = i;
        ck_assert_int_ge(t, 0);
        for (uint64_t k = call.first / HC_CS; k <= call.last / HC_CS; k++) {
            ck_assert_uint_lt(k, HC_CHUNKS);
            ck_assert_int_eq(led_by[k], -1); /* fetched once */
            ck_assert(need[t][k]);           /* by a caller that needs it */
            led_by[k] = t;
        }
    }
    uint64_t chunks = 0, bytes = 0;
    for (int k = 0; k < HC_CHUNKS; k++) {
        ck_assert_int_eq(led_by[k] >= 0, any[k]); /* no gap, no hole */
        if (any[k]) {
            chunks++;
            bytes += min_u64((uint64_t)(k + 1) * HC_CS, HC_SIZE) -
                     (uint64_t)k * HC_CS;
        }
    }
    ck_assert(!any[10] && !any[11]);
    for (int i = 0; i < HC_N; i++) {
        int shared = 0;
        for (int k = 0; k < HC_CHUNKS; k++)
            if (need[i][k] && led_by[k] != i)
                shared = 1;
        ck_assert_int_eq(cr.a[i].shared, shared);
    }
    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.range_fetches, (uint64_t)n);
    ck_assert_uint_eq(s.range_bytes_fetched, bytes);
    ck_assert_uint_eq(s.chunk_joins, slots - chunks);
    ck_assert_uint_eq(s.range_bytes_requested, requested);
    ck_assert_uint_eq(s.lagged, 0);
    counter_destroy(&registered);
    rfetch_destroy(&f);
    FINISH(g);
}
END_TEST

/* Two objects x two ranges, plus an object flight and a prefix key. */
START_TEST(test_rg_key_isolation)
{
    LEAK_START();
    flight_group_t *g = rgroup(1000);
    rfetch_t fa, fb, fp;
    rfetch_init(&fa, R_ASYNC, 801, 3000);
    rfetch_init(&fb, R_ASYNC, 802, 3000);
    rfetch_init(&fp, R_SYNC, 803, 3000);
    flight_reader_t *ra1 = rdo(g, "objA", 0, 1999, &fa);
    flight_reader_t *rb1 = rdo(g, "objB", 0, 1999, &fb);
    flight_reader_t *ra2 = rdo(g, "objA", 1000, 2999, &fa);
    flight_reader_t *rb2 = rdo(g, "objB", 1000, 2999, &fb);
    flight_reader_t *rp = rdo(g, "obj", 0, 2999, &fp);
    /* Binary keys: "objA\0" is another object again. */
    flight_reader_t *rz = NULL;
    ck_assert_int_eq(
        flight_do_range(g, "objA\0", 5, 0, 999, rfetch_cb, &fp, &rz), 0);
    ck_assert_int_eq(rf_ncalls(&fp), 2);
    ASSERT_CALL(&fp, 1, 0, 999);
    ck_assert_int_eq(rf_ncalls(&fa), 2);
    ASSERT_CALL(&fa, 0, 0, 1999);
    ASSERT_CALL(&fa, 1, 2000, 2999);
    ck_assert_int_eq(rf_ncalls(&fb), 2);
    ASSERT_CALL(&fb, 0, 0, 1999);
    ASSERT_CALL(&fb, 1, 2000, 2999);
    ck_assert_int_eq(flight_reader_shared(ra1), 0);
    ck_assert_int_eq(flight_reader_shared(ra2), 1);
    ck_assert_int_eq(flight_reader_shared(rb1), 0);
    ck_assert_int_eq(flight_reader_shared(rb2), 1);
    ck_assert_int_eq(flight_reader_shared(rp), 0);
    /* An object flight with the same key is unrelated. */
    fetch_ctx_t of;
    fetch_init(&of, F_BODY, 804, 100);
    of.chunk = 100;
    flight_reader_t *ro = join(g, "objA", &of, 0);
    ck_assert_int_eq(atomic_load(&of.calls), 1);
    ASSERT_BODY(rread_all(ro, 804, 0), COALESCE_EOF, 100);
    flight_reader_close(ro);
    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.flights_started, 1);
    ck_assert_uint_eq(s.joins, 0);
    ck_assert_uint_eq(s.range_fetches, 6);
    rf_finish(&fb, 1);
    rf_finish(&fb, 0);
    rf_finish(&fa, 1);
    rf_finish(&fa, 0);
    ASSERT_READS(ra1, 801, 0, 1999);
    ASSERT_READS(ra2, 801, 1000, 2999);
    ASSERT_READS(rb1, 802, 0, 1999);
    ASSERT_READS(rb2, 802, 1000, 2999);
    ASSERT_READS(rp, 803, 0, 2999);
    ASSERT_READS(rz, 803, 0, 999);
    ck_assert_uint_eq(stats_of(g).chunk_joins, 2);
    close_readers(ra1, ra2, rb1, rb2, rp, rz, NULL);
    rfetch_destroy_all(&fa, &fb, &fp, NULL);
    FINISH(g);
}
END_TEST

/* --- Bad input and closing ------------------------------------------------ */

START_TEST(test_rg_bad_args)
{
    LEAK_START();
    flight_group_t *g = rgroup(1000);
    rfetch_t f;
    rfetch_init(&f, R_ASYNC, 901, 5000);
    flight_reader_t *x = SENTINEL(flight_reader_t);
    ck_assert_int_eq(flight_do_range(NULL, "k", 1, 0, 9, rfetch_cb, &f, &x),
                     COALESCE_EINVAL);
    ck_assert_int_eq(flight_do_range(g, NULL, 1, 0, 9, rfetch_cb, &f, &x),
                     COALESCE_EINVAL);
    ck_assert_int_eq(flight_do_range(g, "k", 0, 0, 9, rfetch_cb, &f, &x),
                     COALESCE_EINVAL);
    ck_assert_int_eq(flight_do_range(g, "k", 1, 0, 9, NULL, &f, &x),
                     COALESCE_EINVAL);
    ck_assert_int_eq(flight_do_range(g, "k", 1, 0, 9, rfetch_cb, &f, NULL),
                     COALESCE_EINVAL);
    ck_assert_int_eq(flight_do_range(g, "k", 1, 10, 9, rfetch_cb, &f, &x),
                     COALESCE_EINVAL);
    ck_assert_int_eq(flight_do_range(g, "k", 1, END, 0, rfetch_cb, &f, &x),
                     COALESCE_EINVAL);
    const size_t big = (size_t)MiB + 1;
    char *key = calloc(1, big);
    ck_assert_ptr_nonnull(key);
    ck_assert_int_eq(flight_do_range(g, key, big, 0, 9, rfetch_cb, &f, &x),
                     COALESCE_EINVAL);
    ck_assert_ptr_eq(x, SENTINEL(flight_reader_t));
    ck_assert_int_eq(rf_ncalls(&f), 0);
    /* 1 MiB is allowed; one byte and first == last too. */
    ck_assert_int_eq(flight_do_range(g, key, big - 1, 0, 9, rfetch_cb, &f, &x),
                     0);
    free(key);
    flight_reader_t *r1 = x;
    flight_reader_t *r2 = rdo(g, "k", 7, 7, &f);
    ck_assert_int_eq(rf_ncalls(&f), 2);
    ASSERT_CALL(&f, 1, 0, 999);
    ck_assert_int_eq(flight_reader_range(r2, NULL, NULL, NULL),
                     COALESCE_EAGAIN);
    ck_assert_int_eq(flight_reader_range(NULL, NULL, NULL, NULL),
                     COALESCE_EINVAL);
    ck_assert_int_eq(flight_reader_shared(NULL), 0);
    ck_assert_uint_eq(flight_reader_offset(NULL), 0);
    ck_assert_uint_eq(flight_writer_readers(rf_w(&f, 1)), 1);
    rf_finish(&f, 0);
    rf_finish(&f, 1);
    ASSERT_READS(r1, f.seed, 0, 9);
    ASSERT_READS(r2, f.seed, 7, 7);
    ASSERT_RANGE(r2, 7, 7, 5000);
    close_readers(r1, r2, NULL);
    /* flight_reader_range on an object flight's reader. */
    fetch_ctx_t of;
    fetch_init(&of, F_BODY, 902, 10);
    of.chunk = 100;
    flight_reader_t *o = NULL;
    ck_assert_int_eq(flight_do(g, "k", 1, fetch_cb, &of, &o), 0);
    ck_assert_int_eq(flight_meta(o, -1, NULL, NULL), 0);
    ck_assert_int_eq(flight_reader_range(o, NULL, NULL, NULL), COALESCE_EINVAL);
    flight_reader_close(o);
    rfetch_destroy(&f);
    FINISH(g);
}
END_TEST

/* After close: no new range call, in-flight range fetches undisturbed. */
START_TEST(test_rg_group_closing)
{
    LEAK_START();
    flight_group_t *g = rgroup(1000);
    rfetch_t f;
    rfetch_init(&f, R_ASYNC, 903, 5000);
    flight_reader_t *a = rdo(g, "cl", 0, 1999, &f);
    flight_group_close(g);
    flight_reader_t *x = SENTINEL(flight_reader_t);
    ck_assert_int_eq(flight_do_range(g, "cl", 2, 0, 999, rfetch_cb, &f, &x),
                     COALESCE_ECLOSING);
    ck_assert_int_eq(flight_do_range(g, "cl", 2, 3000, 3999, rfetch_cb, &f, &x),
                     COALESCE_ECLOSING);
    ck_assert_int_eq(flight_do_range(g, "other", 5, 0, 9, rfetch_cb, &f, &x),
                     COALESCE_ECLOSING);
    ck_assert_ptr_eq(x, SENTINEL(flight_reader_t));
    ck_assert_int_eq(rf_ncalls(&f), 1);
    flight_writer_t *w = rf_w(&f, 0);
    ck_assert_int_eq(rf_serve(&f, w, 0, 1999, UINT64_MAX, true), 0);
    ASSERT_READS(a, f.seed, 0, 1999);
    flight_reader_close(a);
    flight_writer_release(w); /* the last one: frees the group */
    rfetch_destroy(&f);
    LEAK_CHECK();
}
END_TEST

/* --- Allocation failures -------------------------------------------------- */

/*
 * B (0-4999) joins chunk 1 of A's fetch and leads 0-999 and 2000-4999.
 * Failing B's n-th allocation: COALESCE_ENOMEM, no callback, nothing
 * registered, nothing leaked; the retry works.
 */
START_TEST(test_rg_alloc_do_range)
{
    LEAK_START();
    int injected = 0;
    bool done = false;
    for (long i = 0; i < MAX_INJECT && !done; i++) {
        flight_group_t *g = rgroup(1000);
        rfetch_t fa, fb;
        rfetch_init_all(R_ASYNC, 1001, 5000, &fa, &fb, NULL);
        flight_reader_t *a = rdo(g, "al", 1000, 1999, &fa);
        flight_reader_t *b = SENTINEL(flight_reader_t);
        test_alloc_fail_after(i);
        int rc = flight_do_range(g, "al", 2, 0, 4999, rfetch_cb, &fb, &b);
        int failed = test_alloc_failed();
        test_alloc_fail_after(-1);
        if (failed) {
            injected++;
            ck_assert_int_eq(rc, COALESCE_ENOMEM);
            ck_assert_ptr_eq(b, SENTINEL(flight_reader_t));
            ck_assert_int_eq(rf_ncalls(&fb), 0);
            flight_stats_t s = stats_of(g);
            ck_assert_uint_eq(s.range_fetches, 1);
            ck_assert_uint_eq(s.chunk_joins, 0);
            ck_assert_uint_eq(s.readers_open, 1);
            ck_assert_uint_eq(flight_writer_readers(rf_w(&fa, 0)), 1);
            b = rdo(g, "al", 0, 4999, &fb);
        } else {
            ck_assert_int_eq(rc, 0);
            done = true;
        }
        ck_assert_int_eq(rf_ncalls(&fb), 2);
        ASSERT_CALL(&fb, 0, 0, 999);
        ASSERT_CALL(&fb, 1, 2000, 4999);
        rf_finish(&fb, 1);
        rf_finish(&fa, 0);
        rf_finish(&fb, 0);
        ASSERT_READS(b, fb.seed, 0, 4999);
        ASSERT_READS(a, fa.seed, 1000, 1999);
        ck_assert_uint_eq(stats_of(g).chunk_joins, 1);
        close_readers(a, b, NULL);
        rfetch_destroy_all(&fa, &fb, NULL);
        FINISH(g);
    }
    ck_assert_int_eq(done, 1);
    ck_assert_int_gt(injected, 0);
}
END_TEST

/* A writer call that may fail once with the injected ENOMEM ("nothing
 * changed"): retried once, then it must succeed. */
#define RETRY_OK(call)                                                         \
    do {                                                                       \
        int rc_ = (call);                                                      \
        if (rc_ == COALESCE_ENOMEM && test_alloc_failed())                     \
            rc_ = (call);                                                      \
        ck_assert_int_eq(rc_, 0);                                              \
    } while (0)

static int
alloc_write(flight_writer_t *w, uint64_t seed, uint64_t off, uint64_t len)
{
    unsigned char tmp[400];
    for (uint64_t done = 0; done < len;) {
        size_t n = (size_t)min_u64(sizeof(tmp), len - done);
        test_fill(tmp, seed, off + done, n);
        int rc = flight_write(w, tmp, n);
        if (rc == COALESCE_ENOMEM && test_alloc_failed())
            rc = flight_write(w, tmp, n); /* nothing was appended: retry */
        if (rc)
            return rc;
        done += n;
    }
    return 0;
}

/* A reader may report an injected ENOMEM; otherwise exactly its bytes. */
static void
alloc_read(flight_reader_t *r, uint64_t seed, uint64_t a, uint64_t b)
{
    readres_t res = rread_all(r, seed, a);
    ck_assert_int_eq(res.ok, 1);
    if (res.status == COALESCE_ENOMEM) {
        ck_assert(test_alloc_failed());
        return;
    }
    ck_assert_int_eq(res.status, COALESCE_EOF);
    ck_assert_uint_eq(res.got, b - a + 1);
}

/*
 * The n-th allocation of the writing and reading side fails: set_range and
 * writes report ENOMEM with nothing changed (the writer retries), readers
 * get their bytes (or report ENOMEM), nothing leaks.
 */
START_TEST(test_rg_alloc_writer_and_readers)
{
    LEAK_START();
    int injected = 0;
    bool done = false;
    for (long i = 0; i < MAX_INJECT && !done; i++) {
        flight_group_t *g = rgroup(1000);
        rfetch_t f;
        rfetch_init(&f, R_ASYNC, 1002, 5000);
        flight_reader_t *a = rdo(g, "aw", 0, 2999, &f);
        flight_reader_t *b = rdo(g, "aw", 1000, 2999, &f);
        flight_reader_t *c = rdo(g, "aw", 500, 1500, &f);
        flight_writer_t *w = rf_w(&f, 0);
        test_alloc_fail_after(i);
        RETRY_OK(flight_set_range(w, 0, 2999, 5000, "v1", 2));
        RETRY_OK(flight_set_meta(w, "m", 1));
        ck_assert_int_eq(alloc_write(w, f.seed, 0, 1200), 0);
        ck_assert_int_eq(alloc_write(w, f.seed, 1200, 1800), 0);
        ck_assert_int_eq(flight_end(w, 0), 0);
        alloc_read(c, f.seed, 500, 1500);
        alloc_read(a, f.seed, 0, 2999);
        alloc_read(b, f.seed, 1000, 2999);
        int failed = test_alloc_failed();
        test_alloc_fail_after(-1);
        if (failed)
            injected++;
        else
            done = true;
        flight_writer_release(w);
        close_readers(a, b, c, NULL);
        rfetch_destroy(&f);
        FINISH(g);
    }
    ck_assert_int_eq(done, 1);
    ck_assert_int_gt(injected, 0);
}
END_TEST

/* --- Suite ---------------------------------------------------------------- */

#define NCASES(a) ((int)(sizeof(a) / sizeof((a)[0])))

/* --- Review regressions --------------------------------------------------- */

/*
 * The object changes while no fetch is in flight (an idle reader keeps the
 * range object alive): the next reply defines it anew instead of failing,
 * the old size neither clips nor refuses new calls, the idle reader keeps
 * its own range, and a reader straddling the versions fails where the new
 * one starts.
 */
START_TEST(test_rg_object_changes)
{
    LEAK_START();
    flight_group_t *g = rgroup(1000);
    rfetch_t f1, f2, f3;
    rfetch_init_all(R_ASYNC, 0, 0, &f1, &f2, &f3, NULL);
    rfetch_init(&f1, R_ASYNC, 901, 5000);
    rfetch_init(&f2, R_ASYNC, 902, 8000);
    rfetch_init(&f3, R_ASYNC, 903, 9000);
    f2.validator = "v2";
    f3.validator = "v3";
    flight_reader_t *a = rdo(g, "chg", 0, 999, &f1);
    rf_finish(&f1, 0); /* Done: nothing in flight vouches for 5000 now. */
    flight_reader_t *b = rdo(g, "chg", 6000, 6999, &f2);
    ck_assert_int_eq(rf_ncalls(&f2), 1);
    ASSERT_CALL(&f2, 0, 6000, 6999); /* Neither ERANGE nor clipped. */
    rf_finish(&f2, 0);
    ck_assert_int_eq(flight_meta(b, -1, NULL, NULL), 0);
    ASSERT_RANGE(b, 6000, 6999, 8000);
    ASSERT_READS(b, f2.seed, 6000, 6999);
    ck_assert_int_eq(flight_meta(a, -1, NULL, NULL), 0);
    ASSERT_RANGE(a, 0, 999, 5000);
    ASSERT_READS(a, f1.seed, 0, 999);
    /* x leads chunk 0 (v2); c joins it and leads chunk 1, which comes back
     * as v3 once chunk 0's fetch is over: c fails at byte 1000. */
    flight_reader_t *x = rdo(g, "chg", 0, 999, &f2);
    flight_reader_t *c = rdo(g, "chg", 0, 1999, &f3);
    ASSERT_CALL(&f3, 0, 1000, 1999);
    rf_finish(&f2, 1);
    rf_finish(&f3, 0);
    ASSERT_READS(x, f2.seed, 0, 999);
    ASSERT_ENDS(c, f2.seed, 0, 1000, FLIGHT_EMISMATCH);
    ck_assert_uint_eq(stats_of(g).range_mismatches, 0);
    close_readers(a, b, x, c, NULL);
    rfetch_destroy_all(&f1, &f2, &f3, NULL);
    FINISH(g);
}
END_TEST

/* Waits (bounded) until the group has n readers open. */
static void wait_readers(flight_group_t *g, uint64_t n)
{
    double until = now_ms() + test_timeout(5) * 1000;
    while (stats_of(g).readers_open < n && now_ms() < until)
        sched_yield();
    ck_assert_uint_eq(stats_of(g).readers_open, n);
}

/*
 * The reference's union in the worst arrival order, with range_max_gap 0:
 * 1500-2999 lingers, 0-999 lingers apart (a chunk between them), then
 * 500-1999 bridges the two: they go out as one fetch of 0-2999.
 */
START_TEST(test_rg_linger_bridge)
{
    LEAK_START();
    flight_opts_t o = ropts(500);
    o.range_linger_ms = linger_ms(300);
    flight_group_t *g = group_with_opts(&o);
    rfetch_t f;
    rfetch_init(&f, R_SYNC, 104, 5000);
    static const uint64_t rg[3][2] = {{1500, 2999}, {0, 999}, {500, 1999}};
    rthr_t a[3];
    pthread_t th[3];
    for (int i = 0; i < 3; i++) {
        rthr_start(&a[i], &th[i], g, "br", rg[i][0], rg[i][1], &f, NULL, NULL);
        wait_readers(g, (uint64_t)i + 1); /* Registered, lingering. */
    }
    for (int i = 0; i < 3; i++) {
        pthread_join(th[i], NULL);
        assert_thr(&a[i], rg[i][1], 5000, "");
    }
    ck_assert_int_eq(rf_ncalls(&f), 1);
    ASSERT_CALL(&f, 0, 0, 2999);
    ck_assert_uint_eq(stats_of(g).range_fetches, 1);
    rfetch_destroy(&f);
    FINISH(g);
}
END_TEST

static void count_cb(flight_reader_t *r, void *data)
{
    (void)r;
    atomic_fetch_add((atomic_int *)data, 1);
}

/*
 * CANCEL policy: a lag detach inside a write stops the last reader of two
 * fetches, which both end; the notification holds must all be returned (the
 * closed group is freed: FINISH checks no allocation is left).
 */
START_TEST(test_rg_lag_cancels_two_fetches)
{
    LEAK_START();
    flight_opts_t o = ropts(16);
    o.max_lag = 16;
    o.orphan_policy = FLIGHT_ORPHAN_CANCEL;
    flight_group_t *g = group_with_opts(&o);
    rfetch_t f;
    rfetch_init(&f, R_ASYNC, 905, 1000);
    flight_reader_t *ra = rdo(g, "k", 0, 31, &f);
    flight_reader_t *rb = rdo(g, "k", 32, 95, &f);
    flight_reader_t *x = rdo(g, "k", 0, 95, &f);
    close_readers(ra, rb, NULL); /* x is the last reader of both. */
    atomic_int fired = 0;
    ck_assert_int_eq(flight_reader_notify(x, count_cb, &fired), 0);
    ck_assert_int_eq(rf_reply(&f, rf_w(&f, 1), 32, 95), 0);
    rf_write(&f, 1, 32, 64); /* 32 bytes past x: detached, both canceled. */
    ck_assert_int_eq(atomic_load(&fired), 1);
    assert_terminal(x, FLIGHT_ELAGGED);
    ck_assert_int_eq(flight_write(rf_w(&f, 0), "z", 1), FLIGHT_ECANCELED);
    flight_writer_release(rf_w(&f, 0));
    flight_writer_release(rf_w(&f, 1));
    flight_reader_close(x);
    rfetch_destroy(&f);
    FINISH(g);
}
END_TEST

/*
 * CANCEL policy: the lag detach of a fetch's only reader frees the chunk
 * being written while the write is still in it (the shard's spare pool
 * full, so the chunk is really freed): nothing may touch it afterwards.
 */
START_TEST(test_rg_lag_frees_chunk_mid_write)
{
    LEAK_START();
    flight_opts_t o = ropts(64);
    o.max_lag = 16;
    o.retain_limit = 16;
    o.shards = 1;
    o.orphan_policy = FLIGHT_ORPHAN_CANCEL;
    flight_group_t *g = group_with_opts(&o);
    enum { NOBJ = 17 }; /* One more than the pool keeps. */
    fetch_ctx_t of[NOBJ];
    flight_reader_t *orr[NOBJ];
    for (int i = 0; i < NOBJ; i++) {
        char k[16];
        snprintf(k, sizeof(k), "o%d", i);
        fetch_init(&of[i], F_ASYNC, 0, 0);
        orr[i] = join(g, k, &of[i], 0);
    }
    rfetch_t f;
    rfetch_init(&f, R_ASYNC, 906, 64);
    flight_reader_t *x = rdo(g, "k", 0, 63, &f);
    flight_writer_t *w = rf_start(&f, 0, 20); /* Chunk 0 exists. */
    for (int i = 0; i < NOBJ; i++) {          /* Refill the pool. */
        flight_writer_t *ow = writer_of(&of[i]);
        ck_assert_int_eq(flight_end(ow, 0), 0);
        flight_writer_release(ow);
        flight_reader_close(orr[i]);
    }
    rf_write(&f, 0, 20, 10); /* x is 20 > 16 behind: stopped, canceled. */
    assert_terminal(x, FLIGHT_ELAGGED);
    ck_assert_uint_eq(stats_of(g).lagged, 1);
    ck_assert_int_eq(flight_write(w, "z", 1), FLIGHT_ECANCELED);
    flight_writer_release(w);
    flight_reader_close(x);
    rfetch_destroy(&f);
    FINISH(g);
}
END_TEST

/* Offsets at or past 2^63 are refused (no chunk arithmetic can wrap). */
START_TEST(test_rg_offset_limit)
{
    LEAK_START();
    flight_group_t *g = rgroup(1000);
    rfetch_t f;
    rfetch_init(&f, R_ASYNC, 907, 5000);
    flight_reader_t *r = NULL;
    const uint64_t top = 1ull << 63;
    ck_assert_int_eq(flight_do_range(g, "k", 1, top, END, rfetch_cb, &f, &r),
                     COALESCE_EINVAL);
    ck_assert_int_eq(flight_do_range(g, "k", 1, 0, top, rfetch_cb, &f, &r),
                     COALESCE_EINVAL);
    ck_assert_ptr_null(r);
    r = rdo(g, "k", top - 10, END, &f);
    ASSERT_CALL(&f, 0, (top - 10) / 1000 * 1000, END);
    flight_writer_t *w = rf_w(&f, 0);
    ck_assert_int_eq(flight_set_range(w, 0, top, UNK, NULL, 0),
                     COALESCE_EINVAL);
    ck_assert_int_eq(flight_set_range(w, 0, 9, top + 1, NULL, 0),
                     COALESCE_EINVAL);
    /* Not the range asked, and 0 bytes in a non-empty reply. */
    ck_assert_int_eq(
        flight_set_range(w, (top - 10) / 1000 * 1000, top - 1, 0, NULL, 0),
        FLIGHT_EMISMATCH);
    flight_writer_release(w);
    ASSERT_ENDS(r, f.seed, top - 10, 0, FLIGHT_EMISMATCH);
    flight_reader_close(r);
    rfetch_destroy(&f);
    FINISH(g);
}
END_TEST

/* For test_rg_fuzz_regressions: the first fetch registers a caller whose
 * range the next run covers, then reports a size that clips that run. */
typedef struct nest {
    flight_group_t *g;
    const char *key;
    flight_reader_t *z;
    flight_writer_t *w[2];
    int n;
} nest_t;

static int
nest_cb(flight_writer_t *w, uint64_t first, uint64_t last, void *data)
{
    nest_t *t = data;
    ck_assert_int_lt(t->n, 2);
    t->w[t->n++] = w;
    if (t->n == 1) {
        ck_assert_int_eq(flight_do_range(t->g, t->key, strlen(t->key), 30, 39,
                                         nest_cb, t, &t->z),
                         0);
        ck_assert_int_eq(flight_set_range(w, first, last, 25, "v1", 2), 0);
    }
    return FLIGHT_FETCH_ASYNC;
}

/*
 * Found by test/fuzz/fuzz_range.c. A consume of 0 bytes before any byte
 * came; a fetch callback returning COALESCE_EOF over a short body; a size
 * learnt by a later fetch, before the object changed; the rest of a range
 * past the end of a new version; a size recorded by a finished fetch that
 * a later reply of unknown size contradicts.
 */
START_TEST(test_rg_fuzz_regressions)
{
    LEAK_START();
    flight_group_t *g = rgroup(10);
    rfetch_t f, e;
    rfetch_init(&f, R_ASYNC, 908, 100);
    rfetch_init(&e, R_RET, 908, 100);
    e.ret = COALESCE_EOF;
    const char *v1 = "v1", *v2 = "v2";

    flight_reader_t *r = rdo(g, "c0", 0, 9, &f);
    ck_assert_int_eq(flight_consume(r, 0), 0);
    rf_finish(&f, 0);
    ASSERT_READS(r, f.seed, 0, 9);
    flight_reader_close(r);

    r = rdo(g, "eof", 0, 9, &e);
    ck_assert_int_eq(flight_meta(r, 0, NULL, NULL), FLIGHT_EMISMATCH);
    ck_assert_int_eq(flight_reader_range(r, NULL, NULL, NULL),
                     FLIGHT_EMISMATCH);
    ASSERT_ENDS(r, e.seed, 0, 0, FLIGHT_EMISMATCH);
    ck_assert_uint_eq(stats_of(g).range_mismatches, 1);
    flight_reader_close(r);

    /* X [0, 29]: leads 0-9, joins Y's 10-19, leads 20-29; only Y's fetch
     * tells the size (15), and the object changes before X looks. */
    flight_reader_t *y = rdo(g, "stale", 10, 19, &f);
    flight_reader_t *x = rdo(g, "stale", 0, 29, &f);
    ASSERT_CALL(&f, 2, 0, 9);
    ASSERT_CALL(&f, 3, 20, 29);
    ck_assert_int_eq(flight_set_range(rf_w(&f, 2), 0, 9, UNK, v1, 2), 0);
    ck_assert_int_eq(flight_set_range(rf_w(&f, 1), 10, 14, 15, v1, 2), 0);
    rf_write(&f, 1, 10, 5);
    ck_assert_int_eq(flight_set_range(rf_w(&f, 3), END, END, 15, v1, 2),
                     FLIGHT_ERANGE);
    rf_write(&f, 2, 0, 10);
    flight_reader_t *q = rdo(g, "stale", 0, 9, &f);
    ck_assert_int_eq(flight_set_range(rf_w(&f, 4), 0, 9, 100, v2, 2), 0);
    for (long i = 1; i <= 4; i++) {
        flight_end(rf_w(&f, i), 0);
        flight_writer_release(rf_w(&f, i));
    }
    ASSERT_READS(x, f.seed, 0, 14);
    close_readers(x, y, q, NULL);

    /* X [0, -] joins 0-9 and leads 10-: that reply is a 416 of another
     * version, X's rest is not "past the end" of its own. */
    y = rdo(g, "grow", 0, 9, &f);
    x = rdo(g, "grow", 0, END, &f);
    ASSERT_CALL(&f, 6, 10, END);
    ck_assert_int_eq(flight_set_range(rf_w(&f, 5), 0, 9, 100, v1, 2), 0);
    rf_write(&f, 5, 0, 10);
    ck_assert_int_eq(flight_set_range(rf_w(&f, 6), END, END, 5, v2, 2),
                     FLIGHT_ERANGE);
    ASSERT_ENDS(x, f.seed, 0, 10, FLIGHT_EMISMATCH);
    for (long i = 5; i <= 6; i++) {
        flight_end(rf_w(&f, i), 0);
        flight_writer_release(rf_w(&f, i));
    }
    close_readers(x, y, NULL);

    /* A reply ending early (size 15) from a fetch that has finished; a
     * later one has bytes 40-59, size not given: they are delivered. */
    r = rdo(g, "old", 0, 19, &f);
    ck_assert_int_eq(flight_set_range(rf_w(&f, 7), 0, 14, UNK, NULL, 0), 0);
    rf_write(&f, 7, 0, 15);
    ck_assert_int_eq(flight_end(rf_w(&f, 7), 0), 0);
    flight_writer_release(rf_w(&f, 7));
    x = rdo(g, "old", 40, 59, &f);
    ck_assert_int_eq(flight_set_range(rf_w(&f, 8), 40, 59, UNK, NULL, 0), 0);
    rf_complete(&f, 8, 40);
    ASSERT_READS(x, f.seed, 40, 59);
    close_readers(r, x, NULL);

    /* A reply ending early (size 6) while another fetch in flight has
     * replied bytes up to 49: a mismatch, not a smaller object. */
    x = rdo(g, "small", 20, 49, &f);
    ck_assert_int_eq(flight_set_range(rf_w(&f, 9), 20, 49, UNK, v1, 2), 0);
    y = rdo(g, "small", 0, 9, &f);
    ck_assert_int_eq(flight_set_range(rf_w(&f, 10), 0, 5, UNK, v1, 2),
                     FLIGHT_EMISMATCH);
    flight_writer_release(rf_w(&f, 10));
    ASSERT_ENDS(y, f.seed, 0, 0, FLIGHT_EMISMATCH);
    rf_complete(&f, 9, 20);
    ASSERT_READS(x, f.seed, 20, 49);
    close_readers(x, y, NULL);

    /* X [0, -] leads 0-9 and 20-; Z [30, 39] joins the second before it
     * starts, then the size (25) clips it to 20-24: Z waits for nothing
     * from it. */
    y = rdo(g, "nest", 10, 19, &f);
    nest_t t = {.g = g, .key = "nest"};
    ck_assert_int_eq(flight_do_range(g, "nest", 4, 0, END, nest_cb, &t, &x), 0);
    ck_assert_int_eq(t.n, 2);
    ck_assert_uint_eq(flight_writer_readers(t.w[1]), 1);
    ASSERT_ENDS(t.z, f.seed, 30, 0, FLIGHT_ERANGE);
    flight_writer_release(t.w[0]);
    flight_writer_release(t.w[1]);
    flight_writer_release(rf_w(&f, 11));
    close_readers(x, y, t.z, NULL);

    /* The same, then the first fetch ends and the second replies 20-24 of
     * another version (size 100): Z, at 30, gets EMISMATCH once those
     * bytes are written, also if the writer is then released unended (it
     * got EUPSTREAM if it had not looked in between). */
    y = rdo(g, "nest2", 10, 19, &f);
    t = (nest_t){.g = g, .key = "nest2"};
    ck_assert_int_eq(flight_do_range(g, "nest2", 5, 0, END, nest_cb, &t, &x),
                     0);
    ck_assert_int_eq(t.n, 2);
    ck_assert_int_eq(write_pattern(t.w[0], f.seed, 0, 10, f.piece), 0);
    ck_assert_int_eq(flight_end(t.w[0], 0), 0);
    flight_writer_release(t.w[0]);
    ck_assert_int_eq(flight_set_range(t.w[1], 20, 24, 100, v2, 2), 0);
    ck_assert_int_eq(write_pattern(t.w[1], f.seed, 20, 5, f.piece), 0);
    flight_writer_release(t.w[1]);
    ASSERT_ENDS(t.z, f.seed, 30, 0, FLIGHT_EMISMATCH);
    flight_writer_release(rf_w(&f, 12));
    close_readers(x, y, t.z, NULL);

    /* X [0, 19] read 0-9 from a fetch now over, and waits armed on its
     * own 10-19; that reply is another version: X is told at once (it
     * was not notified before the fix, only when the fetch ended). */
    y = rdo(g, "armed", 0, 9, &f);
    x = rdo(g, "armed", 0, 19, &f);
    ASSERT_CALL(&f, 14, 10, 19);
    ck_assert_int_eq(flight_set_range(rf_w(&f, 13), 0, 9, 100, v1, 2), 0);
    rf_complete(&f, 13, 0);
    ASSERT_BODY(drain(x, PAT(f.seed), 0), COALESCE_EAGAIN, 10);
    notify_ctx_t n;
    notify_init(&n);
    ck_assert_int_eq(flight_reader_notify(x, notify_cb, &n), 0);
    ck_assert_int_eq(flight_set_range(rf_w(&f, 14), 10, 19, 50, v2, 2), 0);
    ck_assert_int_eq(atomic_load(&n.fired), 1);
    ck_assert_ptr_eq(atomic_load(&n.reader), x);
    ASSERT_ENDS(x, f.seed, 10, 0, FLIGHT_EMISMATCH);
    flight_writer_release(rf_w(&f, 14));
    close_readers(x, y, NULL);

    /* A 416 whose size is past its own start contradicts itself: it fails
     * its fetch and the object keeps the size learnt before (30), which a
     * later reply without a size then reports. */
    r = rdo(g, "keep", 0, 9, &f);
    ck_assert_int_eq(flight_set_range(rf_w(&f, 15), 0, 9, 30, v1, 2), 0);
    rf_complete(&f, 15, 0);
    x = rdo(g, "keep", 40, 49, &f);
    ck_assert_int_eq(flight_set_range(rf_w(&f, 16), END, END, 45, v1, 2),
                     FLIGHT_EMISMATCH);
    flight_writer_release(rf_w(&f, 16));
    ASSERT_ENDS(x, f.seed, 40, 0, FLIGHT_EMISMATCH);
    y = rdo(g, "keep", 10, 19, &f);
    ck_assert_int_eq(flight_set_range(rf_w(&f, 17), 10, 19, UNK, v1, 2), 0);
    rf_complete(&f, 17, 10);
    ASSERT_RANGE(y, 10, 19, 30);
    ASSERT_READS(y, f.seed, 10, 19);
    ASSERT_READS(r, f.seed, 0, 9);
    close_readers(r, x, y, NULL);
    rfetch_destroy_all(&f, &e, NULL);
    FINISH(g);
}
END_TEST

Suite *make_range_suite(void)
{
    Suite *s = suite_create("range");
    TCase *tc;

    tc = tcase(s, "RG reference: collapse and linger", 10);
    tcase_add_test(tc, test_rg_collapse_same_range);
    tcase_add_test(tc, test_rg_linger_union);
    tcase_add_loop_test(tc, test_rg_linger_gap_span, 0, NCASES(linger_cases));
    tcase_add_test(tc, test_rg_linger_only_leaders_wait);
    tcase_add_loop_test(tc, test_rg_far_apart_no_gap, 0, 2);

    tc = tcase(s, "RG reference: errors", 5);
    tcase_add_loop_test(tc, test_rg_error_async_writer, 0,
                        NCASES(async_err_cases));
    tcase_add_loop_test(tc, test_rg_error_fetch_callback, 0,
                        NCASES(sync_err_cases));
    tcase_add_test(tc, test_rg_error_in_joined_chunk);

    tc = tcase(s, "RG upstream mismatches", 5);
    tcase_add_loop_test(tc, test_rg_mismatch_reply, 0, NCASES(mm_cases));
    tcase_add_loop_test(tc, test_rg_mismatch_between_fetches, 0, 2);
    tcase_add_test(tc, test_rg_mismatch_short_body);
    tcase_add_loop_test(tc, test_rg_mismatch_excess_bytes, 0, 2);
    tcase_add_test(tc, test_rg_writer_misuse);

    tc = tcase(s, "RG streaming joins", 5);
    tcase_add_test(tc, test_rg_join_mid_chunk);
    tcase_add_loop_test(tc, test_rg_late_caller, 0, NCASES(late_cases));
    tcase_add_loop_test(tc, test_rg3_short_range_ends_first, 0, 2);

    tc = tcase(s, "RG edges", 5);
    tcase_add_loop_test(tc, test_rg_edges, 0, NCASES(edge_cases));
    tcase_add_test(tc, test_rg_known_size_clip_and_erange);
    tcase_add_loop_test(tc, test_rg_open_range_end_late, 0, 2);

    tc = tcase(s, "RG-8 no deadlock", 5);
    tcase_add_loop_test(tc, test_rg8_gaps_and_two_readers, 0, 2);

    tc = tcase(s, "RG-7 readers and writers", 5);
    tcase_add_loop_test(tc, test_rg7_max_lag_across_chunks, 0, 2);
    tcase_add_test(tc, test_rg7_readers_leave_mid_body);
    tcase_add_loop_test(tc, test_rg7_orphan_policy, 0, 3);
    tcase_add_test(tc, test_rg7_wait_timeout);
    tcase_add_test(tc, test_rg7_notify);
    tcase_add_test(tc, test_rg7_stats);

    tc = tcase(s, "RG concurrency and keys", 10);
    tcase_add_test(tc, test_rg_high_concurrency);
    tcase_add_test(tc, test_rg_key_isolation);

    tc = tcase(s, "RG bad input", 5);
    tcase_add_test(tc, test_rg_bad_args);
    tcase_add_test(tc, test_rg_group_closing);

    tc = tcase(s, "RG allocation failures", 20);
    tcase_add_test(tc, test_rg_alloc_do_range);
    tcase_add_test(tc, test_rg_alloc_writer_and_readers);

    tc = tcase(s, "RG review regressions", 10);
    tcase_add_test(tc, test_rg_object_changes);
    tcase_add_test(tc, test_rg_linger_bridge);
    tcase_add_test(tc, test_rg_lag_cancels_two_fetches);
    tcase_add_test(tc, test_rg_lag_frees_chunk_mid_write);
    tcase_add_test(tc, test_rg_offset_limit);
    tcase_add_test(tc, test_rg_fuzz_regressions);

    return s;
}

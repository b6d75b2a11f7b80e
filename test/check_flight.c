/*
 * Tests for flight groups (include/coalesce/flight.h): issue 2, FL-1..FL-12.
 *
 * Rules followed by every test:
 *  - test_alloc_live() is recorded at the start and must be back to that
 *    value at the end: every reader closed, every writer released, every
 *    group closed.
 *  - Worker threads never call ck_assert (that is undefined with
 *    CK_FORK=no); they record what they saw and the main thread checks it.
 *  - Threads are synchronised with barriers, counters and the library's own
 *    blocking reads, never with sleeps.
 *  - Bodies are compared byte by byte with the deterministic test pattern.
 */
#include "helpers.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Defaults documented in flight.h. */
#define DEFAULT_MAX_LAG ((uint64_t)64 * MiB)
#define DEFAULT_RETAIN  ((uint64_t)16 * MiB)

/* --- Groups and bodies ---------------------------------------------------- */

static flight_group_t *
group_with(uint64_t max_lag, uint64_t retain, uint32_t wait_ms, int policy)
{
    flight_opts_t o;
    flight_opts_init(&o);
    o.max_lag = max_lag;
    o.retain_limit = retain;
    o.wait_timeout_ms = wait_ms;
    o.orphan_policy = policy;
    return group_with_opts(&o);
}

static unsigned char *pattern_new(uint64_t seed, size_t len)
{
    unsigned char *p = malloc(len ? len : 1);
    ck_assert_ptr_nonnull(p);
    test_fill(p, seed, 0, len);
    return p;
}

/* An ASYNC flight on key: returns the leader's reader; its writer in *w. */
static flight_reader_t *async_flight(flight_group_t *g,
                                     const char *key,
                                     fetch_ctx_t *f,
                                     uint64_t seed,
                                     flight_writer_t **w)
{
    fetch_init(f, F_ASYNC, seed, 0);
    flight_reader_t *l = join(g, key, f, 0);
    *w = writer_of(f);
    return l;
}

/* --- FL-1: collapse ------------------------------------------------------- */

#define NCOLLAPSE 16

typedef struct collapse_arg {
    flight_group_t *g;
    const char *key;
    fetch_ctx_t *f;
    pthread_barrier_t *bar;
    counter_t *have; /* threads holding a reader */
    uint64_t seed;
    const char *meta;
    int rc;
    int shared;
    int meta_rc;
    bool meta_ok;
    readres_t res;
    int again_rc;
    pthread_t self;
} collapse_arg_t;

static void *collapse_thread(void *p)
{
    collapse_arg_t *a = p;
    a->self = pthread_self();
    pthread_barrier_wait(a->bar);
    flight_reader_t *r = NULL;
    a->rc = flight_do(a->g, a->key, strlen(a->key), fetch_cb, a->f, &r);
    if (a->rc == 0)
        a->shared = flight_reader_shared(r);
    counter_add(a->have, 1);
    if (a->rc != 0)
        return NULL;
    const void *m = NULL;
    size_t ml = 0;
    a->meta_rc = flight_meta(r, -1, &m, &ml);
    if (a->meta) {
        a->meta_ok = a->meta_rc == 0 && m && ml == strlen(a->meta) &&
                     memcmp(m, a->meta, ml) == 0;
    } else {
        a->meta_ok = true;
    }
    a->res = read_all(r, PAT(a->seed), 0);
    a->again_rc = read_again(r, 0);
    flight_reader_close(r);
    return NULL;
}

static void collapse_run(flight_group_t *g,
                         collapse_arg_t *a,
                         pthread_t *th,
                         int n,
                         fetch_ctx_t *f,
                         counter_t *have,
                         pthread_barrier_t *bar,
                         const char *key,
                         const char *meta)
{
    for (int i = 0; i < n; i++) {
        memset(&a[i], 0, sizeof(a[i]));
        a[i].g = g;
        a[i].key = key;
        a[i].f = f;
        a[i].bar = bar;
        a[i].have = have;
        a[i].seed = f->seed;
        a[i].meta = meta;
        ck_assert_int_eq(pthread_create(&th[i], NULL, collapse_thread, &a[i]),
                         0);
    }
}

/* The leader's fetch blocks until the N-1 others hold their readers. */
START_TEST(test_fl1_collapse_sync_fetch)
{
    LEAK_START();
    flight_group_t *g = group_default();
    counter_t have;
    counter_init(&have);
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, NCOLLAPSE);
    fetch_ctx_t f;
    fetch_init(&f, F_BODY, 11, 200 * KiB + 77);
    f.meta = "HTTP/1.1 200 OK";
    f.gate = &have;
    f.gate_n = NCOLLAPSE - 1;

    collapse_arg_t a[NCOLLAPSE];
    pthread_t th[NCOLLAPSE];
    collapse_run(g, a, th, NCOLLAPSE, &f, &have, &bar, "collapse", f.meta);
    for (int i = 0; i < NCOLLAPSE; i++)
        pthread_join(th[i], NULL);

    ck_assert_int_eq(atomic_load(&f.calls), 1);
    ck_assert_int_eq(atomic_load(&f.bad_rc), 0);
    int leaders = 0;
    for (int i = 0; i < NCOLLAPSE; i++) {
        ck_assert_int_eq(a[i].rc, 0);
        ck_assert_int_eq(a[i].meta_rc, 0);
        ck_assert_int_eq(a[i].meta_ok, 1);
        ASSERT_BODY(a[i].res, COALESCE_EOF, f.len);
        ck_assert_int_eq(a[i].again_rc, COALESCE_EOF);
        if (a[i].shared == 0) {
            leaders++;
            ck_assert_int_ne(pthread_equal(a[i].self, f.thread), 0);
        } else {
            ck_assert_int_eq(a[i].shared, 1);
        }
    }
    ck_assert_int_eq(leaders, 1);
    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.flights_started, 1);
    ck_assert_uint_eq(s.joins, NCOLLAPSE - 1);
    ck_assert_uint_eq(s.bytes_written, f.len);
    ck_assert_uint_eq(s.bytes_delivered, (uint64_t)NCOLLAPSE * f.len);
    ck_assert_uint_eq(s.errors, 0);
    assert_idle(g);

    flight_group_close(g);
    pthread_barrier_destroy(&bar);
    counter_destroy(&have);
    LEAK_CHECK();
}
END_TEST

/* The fetch returns ASYNC; the test feeds the writer once all N hold readers.
 */
START_TEST(test_fl1_collapse_async_writer)
{
    LEAK_START();
    flight_group_t *g = group_default();
    counter_t have;
    counter_init(&have);
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, NCOLLAPSE);
    fetch_ctx_t f;
    fetch_init(&f, F_ASYNC, 12, 300 * KiB + 5);

    collapse_arg_t a[NCOLLAPSE];
    pthread_t th[NCOLLAPSE];
    collapse_run(g, a, th, NCOLLAPSE, &f, &have, &bar, "collapse-async",
                 "meta!");
    counter_wait(&have, NCOLLAPSE);

    flight_writer_t *w = writer_of(&f);
    ck_assert_int_eq(atomic_load(&f.calls), 1);
    ck_assert_uint_eq(flight_writer_readers(w), NCOLLAPSE);
    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.flights_started, 1);
    ck_assert_uint_eq(s.joins, NCOLLAPSE - 1);
    ck_assert_uint_eq(s.flights_active, 1);
    ck_assert_uint_eq(s.readers_open, NCOLLAPSE);

    ck_assert_int_eq(flight_set_meta(w, "meta!", 5), 0);
    ck_assert_int_eq(write_pattern(w, f.seed, 0, f.len, 16 * KiB), 0);
    ck_assert_int_eq(flight_end(w, 0), 0);
    flight_writer_release(w);
    for (int i = 0; i < NCOLLAPSE; i++)
        pthread_join(th[i], NULL);

    int leaders = 0;
    for (int i = 0; i < NCOLLAPSE; i++) {
        ck_assert_int_eq(a[i].rc, 0);
        ck_assert_int_eq(a[i].meta_ok, 1);
        ASSERT_BODY(a[i].res, COALESCE_EOF, f.len);
        ck_assert_int_eq(a[i].again_rc, COALESCE_EOF);
        leaders += a[i].shared == 0;
    }
    ck_assert_int_eq(leaders, 1);
    ck_assert_int_eq(atomic_load(&f.calls), 1);
    s = stats_of(g);
    ck_assert_uint_eq(s.bytes_delivered, (uint64_t)NCOLLAPSE * f.len);
    assert_idle(g);

    flight_group_close(g);
    pthread_barrier_destroy(&bar);
    counter_destroy(&have);
    LEAK_CHECK();
}
END_TEST

/* --- FL-2: streaming ------------------------------------------------------ */

typedef struct stream_arg {
    flight_group_t *g;
    fetch_ctx_t *f;
    counter_t *joined;
    counter_t *half_read;
    uint64_t half;
    int rc;
    int shared;
    readres_t first;
    readres_t rest;
    int again_rc;
} stream_arg_t;

static void *stream_waiter(void *p)
{
    stream_arg_t *a = p;
    flight_reader_t *r = NULL;
    a->rc = flight_do(a->g, "stream", 6, fetch_cb, a->f, &r);
    a->shared = a->rc == 0 ? flight_reader_shared(r) : -1;
    counter_add(a->joined, 1);
    if (a->rc != 0) {
        counter_add(a->half_read, 1);
        return NULL;
    }
    /* Blocking reads; the writer has written only the first half. */
    a->first = read_upto(r, PAT(a->f->seed), 0, a->half, 3000, -1);
    counter_add(a->half_read, 1);
    a->rest = read_all(r, PAT(a->f->seed), a->first.got);
    a->again_rc = read_again(r, -1);
    flight_reader_close(r);
    return NULL;
}

START_TEST(test_fl2_streaming)
{
    LEAK_START();
    flight_group_t *g = group_default();
    fetch_ctx_t f;
    fetch_init(&f, F_ASYNC, 21, 0);
    const uint64_t half = 100 * KiB + 123, rest = 150 * KiB + 7;
    counter_t joined, half_read;
    counter_init(&joined);
    counter_init(&half_read);

    flight_reader_t *lead = join(g, "stream", &f, 0);
    flight_writer_t *w = writer_of(&f);
    stream_arg_t a = {.g = g,
                      .f = &f,
                      .joined = &joined,
                      .half_read = &half_read,
                      .half = half};
    pthread_t th;
    ck_assert_int_eq(pthread_create(&th, NULL, stream_waiter, &a), 0);
    counter_wait(&joined, 1);

    ck_assert_int_eq(write_pattern(w, f.seed, 0, half, 10 * KiB), 0);
    /* The waiter must get the first half while the rest is unwritten. */
    counter_wait(&half_read, 1);
    ck_assert_int_eq(a.rc, 0);
    ck_assert_int_eq(a.shared, 1);
    ASSERT_BODY(a.first, 0, half);
    ck_assert_uint_eq(stats_of(g).bytes_written, half);

    ck_assert_int_eq(write_pattern(w, f.seed, half, rest, 10 * KiB), 0);
    ck_assert_int_eq(flight_end(w, 0), 0);
    flight_writer_release(w);
    pthread_join(th, NULL);
    ASSERT_BODY(a.rest, COALESCE_EOF, rest);
    ck_assert_int_eq(a.again_rc, COALESCE_EOF);

    ASSERT_BODY(read_all(lead, PAT(f.seed), 0), COALESCE_EOF, half + rest);
    assert_terminal(lead, COALESCE_EOF);
    flight_reader_close(lead);
    ck_assert_int_eq(atomic_load(&f.calls), 1);
    assert_idle(g);
    flight_group_close(g);
    counter_destroy(&joined);
    counter_destroy(&half_read);
    LEAK_CHECK();
}
END_TEST

/* --- FL-3: an idle reader delays nobody ----------------------------------- */

typedef struct fast_arg {
    flight_reader_t *r;
    const body_t *body;
    counter_t *go;
    readres_t res;
} fast_arg_t;

static void *fast_reader(void *p)
{
    fast_arg_t *a = p;
    counter_wait(a->go, 1);
    a->res = read_upto(a->r, a->body, 0, UINT64_MAX, 64 * KiB, -1);
    flight_reader_close(a->r);
    return NULL;
}

START_TEST(test_fl3_idle_reader_delays_nobody)
{
    LEAK_START();
    const size_t len = 8 * MiB, chunk = 64 * KiB;
    unsigned char *bytes = pattern_new(31, len);
    body_t body = {.seed = 31, .bytes = bytes, .len = len};
    flight_group_t *g = group_with(FLIGHT_UNLIMITED, FLIGHT_UNLIMITED, 0,
                                   FLIGHT_ORPHAN_CONTINUE);
    fetch_ctx_t f;
    fetch_init(&f, F_ASYNC, 31, len);
    flight_reader_t *lead = join(g, "idle", &f, 0);
    flight_writer_t *w = writer_of(&f);
    flight_reader_t *idle = join(g, "idle", &f, 1);
    counter_t go;
    counter_init(&go);
    fast_arg_t fa = {.r = join(g, "idle", &f, 1), .body = &body, .go = &go};
    pthread_t th;
    ck_assert_int_eq(pthread_create(&th, NULL, fast_reader, &fa), 0);

    /* Half the body while no reader reads at all: no write may wait. */
    size_t first = len / 2;
    for (size_t off = 0; off < first; off += chunk)
        ck_assert_int_eq(flight_write(w, bytes + off, chunk), 0);
    /* The rest while one reader reads concurrently and two idle. */
    counter_add(&go, 1);
    for (size_t off = first; off < len; off += chunk)
        ck_assert_int_eq(flight_write(w, bytes + off, chunk), 0);
    ck_assert_int_eq(flight_end(w, 0), 0);
    flight_writer_release(w);
    pthread_join(th, NULL);
    ASSERT_BODY(fa.res, COALESCE_EOF, len);

    /* Unlimited lag: the idle readers still hold everything. */
    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.lagged, 0);
    ck_assert_uint_eq(s.bytes_written, len);
    ck_assert_uint_eq(s.bytes_held, len);
    ASSERT_BODY(read_upto(idle, &body, 0, UINT64_MAX, 256 * KiB, 0),
                COALESCE_EOF, len);
    flight_reader_close(idle);
    flight_reader_close(lead);
    assert_idle(g);
    flight_group_close(g);
    counter_destroy(&go);
    free(bytes);
    LEAK_CHECK();
}
END_TEST

/* --- FL-4: max_lag -------------------------------------------------------- */

START_TEST(test_fl4_max_lag_detach_and_bound)
{
    LEAK_START();
    const uint64_t max_lag = 64 * KiB, retain = 16 * KiB;
    const size_t chunk = 8 * KiB, total = 2 * MiB;
    /* max(max_lag, retain_limit) plus the segment being written, which is
     * one write here (copied writes of chunk bytes). Without detaching, the
     * idle readers would hold the whole 2 MiB. */
    const uint64_t bound = max_lag + chunk;
    flight_group_t *g = group_with(max_lag, retain, 0, FLIGHT_ORPHAN_CONTINUE);
    fetch_ctx_t f;
    fetch_init(&f, F_ASYNC, 41, total);
    flight_reader_t *a = join(g, "lag", &f, 0);
    flight_writer_t *w = writer_of(&f);
    flight_reader_t *b = join(g, "lag", &f, 1);
    flight_reader_t *c = join(g, "lag", &f, 1);

    ck_assert_int_eq(write_pattern(w, f.seed, 0, 16 * KiB, chunk), 0);
    /* b reads 10000 bytes, then stops reading; c never reads. */
    ASSERT_BODY(read_upto(b, PAT(f.seed), 0, 10000, 4096, -1), 0, 10000);
    ck_assert_uint_eq(flight_reader_offset(b), 10000);
    uint64_t got_a = drain(a, PAT(f.seed), 0).got;
    ck_assert_uint_eq(got_a, 16 * KiB);

    uint64_t max_held = 0, max_segs = 0;
    for (size_t off = 16 * KiB; off < total; off += chunk) {
        ck_assert_int_eq(write_pattern(w, f.seed, off, chunk, chunk), 0);
        readres_t r = drain(a, PAT(f.seed), got_a);
        ck_assert_int_eq(r.status, COALESCE_EAGAIN);
        ck_assert_int_eq(r.ok, 1);
        got_a += r.got;
        ck_assert_uint_eq(got_a, off + chunk);
        flight_stats_t s = stats_of(g);
        if (s.bytes_held > max_held)
            max_held = s.bytes_held;
        if (s.segments_held > max_segs)
            max_segs = s.segments_held;
    }
    ck_assert_uint_le(max_held, bound);
    ck_assert_uint_le(max_segs, bound / chunk + 2);

    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.lagged, 2);
    /* Detached: the next calls return ELAGGED, offsets are kept. */
    assert_terminal(b, FLIGHT_ELAGGED);
    ck_assert_uint_eq(flight_reader_offset(b), 10000);
    assert_terminal(c, FLIGHT_ELAGGED);
    ck_assert_uint_eq(flight_reader_offset(c), 0);

    ck_assert_int_eq(flight_end(w, 0), 0);
    flight_writer_release(w);
    ck_assert_int_eq(drain(a, PAT(f.seed), got_a).status, COALESCE_EOF);
    ck_assert_uint_eq(flight_reader_offset(a), total);
    flight_reader_close(a);
    flight_reader_close(b);
    flight_reader_close(c);
    s = stats_of(g);
    ck_assert_uint_eq(s.lagged, 2);
    ck_assert_uint_eq(s.bytes_delivered, total + 10000);
    FINISH(g);
}
END_TEST

/* The leader's own reader is not detached while its sync fetch writes. */
START_TEST(test_fl4_leader_sync_fetch_not_lagged)
{
    LEAK_START();
    flight_group_t *g =
        group_with(64 * KiB, 16 * KiB, 0, FLIGHT_ORPHAN_CONTINUE);
    fetch_ctx_t f;
    fetch_init(&f, F_BODY, 42, 1 * MiB + 3);
    f.chunk = 16 * KiB;
    flight_reader_t *r = join(g, "sync-big", &f, 0);
    ck_assert_int_eq(atomic_load(&f.bad_rc), 0);
    ASSERT_BODY(read_all(r, PAT(f.seed), 0), COALESCE_EOF, f.len);
    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.lagged, 0);
    ck_assert_uint_eq(s.bytes_delivered, f.len);
    flight_reader_close(r);
    FINISH(g);
}
END_TEST

/* A detached reader's peeked bytes stay valid until its next call. */
START_TEST(test_fl4_peeked_bytes_survive_detach)
{
    LEAK_START();
    flight_group_t *g =
        group_with(64 * KiB, 16 * KiB, 0, FLIGHT_ORPHAN_CONTINUE);
    fetch_ctx_t f;
    flight_writer_t *w;
    flight_reader_t *a = async_flight(g, "peek-lag", &f, 43, &w);
    flight_reader_t *b = join(g, "peek-lag", &f, 1);
    ck_assert_int_eq(write_pattern(w, f.seed, 0, 16 * KiB, 16 * KiB), 0);

    const void *d = NULL;
    size_t n = 0;
    ck_assert_int_eq(flight_peek(b, 0, &d, &n, NULL), 0);
    ck_assert_ptr_nonnull(d);
    ck_assert_uint_gt(n, 100);
    ck_assert_uint_le(n, 16 * KiB);
    ck_assert_int_eq(test_check(d, f.seed, 0, n), 1);
    /* Partial consume: the rest of the same segment follows. */
    ck_assert_int_eq(flight_consume(b, 100), 0);
    ck_assert_uint_eq(flight_reader_offset(b), 100);
    const void *d2 = NULL;
    size_t n2 = 0;
    ck_assert_int_eq(flight_peek(b, 0, &d2, &n2, NULL), 0);
    ck_assert_ptr_eq(d2, (const unsigned char *)d + 100);
    ck_assert_uint_eq(n2, n - 100);

    /* The writer streams far past max_lag; a keeps up, b does not. */
    uint64_t got_a = 0;
    for (size_t off = 16 * KiB; off < 512 * KiB; off += 16 * KiB) {
        ck_assert_int_eq(write_pattern(w, f.seed, off, 16 * KiB, 16 * KiB), 0);
        got_a += drain(a, PAT(f.seed), got_a).got;
    }
    ck_assert_uint_eq(got_a, 512 * KiB);
    ck_assert_uint_eq(stats_of(g).lagged, 1);
    /* Still valid (ASan/valgrind would see a use after free). */
    ck_assert_int_eq(test_check(d2, f.seed, 100, n2), 1);
    ck_assert_int_eq(flight_consume(b, n2), FLIGHT_ELAGGED);
    assert_terminal(b, FLIGHT_ELAGGED);
    ck_assert_uint_eq(flight_reader_offset(b), 100);

    ck_assert_int_eq(flight_end(w, 0), 0);
    flight_writer_release(w);
    ck_assert_int_eq(drain(a, PAT(f.seed), got_a).status, COALESCE_EOF);
    flight_reader_close(b);
    flight_reader_close(a);
    FINISH(g);
}
END_TEST

/* --- FL-5: readers leaving ------------------------------------------------ */

START_TEST(test_fl5_reader_closes_mid_body)
{
    LEAK_START();
    flight_group_t *g = group_default();
    fetch_ctx_t f;
    fetch_init(&f, F_ASYNC, 51, 256 * KiB);
    flight_reader_t *lead = join(g, "mid", &f, 0);
    flight_writer_t *w = writer_of(&f);
    flight_reader_t *j1 = join(g, "mid", &f, 1);
    flight_reader_t *j2 = join(g, "mid", &f, 1);
    flight_reader_t *j3 = join(g, "mid", &f, 1);
    ck_assert_uint_eq(flight_writer_readers(w), 4);
    ck_assert_uint_eq(stats_of(g).readers_open, 4);

    ck_assert_int_eq(write_pattern(w, f.seed, 0, 64 * KiB, 8 * KiB), 0);
    ASSERT_BODY(read_upto(j1, PAT(f.seed), 0, 10 * KiB, 1000, -1), 0, 10 * KiB);
    /* j3 peeks and closes without consuming. */
    const void *d = NULL;
    size_t n = 0;
    ck_assert_int_eq(flight_peek(j3, -1, &d, &n, NULL), 0);
    flight_reader_close(j3);
    flight_reader_close(j1);
    ck_assert_uint_eq(flight_writer_readers(w), 2);
    ck_assert_uint_eq(stats_of(g).readers_open, 2);

    ck_assert_int_eq(write_pattern(w, f.seed, 64 * KiB, 192 * KiB, 8 * KiB), 0);
    ck_assert_int_eq(flight_end(w, 0), 0);
    flight_writer_release(w);
    ASSERT_BODY(read_all(lead, PAT(f.seed), 0), COALESCE_EOF, f.len);
    ASSERT_BODY(peek_all(j2, PAT(f.seed), 0), COALESCE_EOF, f.len);
    flight_reader_close(lead);
    flight_reader_close(j2);
    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.orphaned, 0);
    ck_assert_uint_eq(s.errors, 0);
    FINISH(g);
}
END_TEST

START_TEST(test_fl5_leader_reader_closes_early)
{
    LEAK_START();
    flight_group_t *g = group_default();
    fetch_ctx_t f;
    fetch_init(&f, F_ASYNC, 52, 100 * KiB);
    flight_reader_t *lead = join(g, "lead-gone", &f, 0);
    flight_writer_t *w = writer_of(&f);
    flight_reader_t *j1 = join(g, "lead-gone", &f, 1);
    flight_reader_close(lead); /* the leader's client went away */
    ck_assert_uint_eq(flight_writer_readers(w), 1);

    ck_assert_int_eq(flight_set_meta(w, "m", 1), 0);
    ck_assert_int_eq(write_pattern(w, f.seed, 0, 40 * KiB, 4 * KiB), 0);
    /* Still joinable after the leader's reader left. */
    flight_reader_t *j2 = join(g, "lead-gone", &f, 1);
    ck_assert_int_eq(write_pattern(w, f.seed, 40 * KiB, 60 * KiB, 4 * KiB), 0);
    ck_assert_int_eq(flight_end(w, 0), 0);
    flight_writer_release(w);
    ASSERT_BODY(read_all(j1, PAT(f.seed), 0), COALESCE_EOF, f.len);
    ASSERT_BODY(read_all(j2, PAT(f.seed), 0), COALESCE_EOF, f.len);
    flight_reader_close(j1);
    flight_reader_close(j2);
    ck_assert_int_eq(atomic_load(&f.calls), 1);
    ck_assert_uint_eq(stats_of(g).orphaned, 0);
    FINISH(g);
}
END_TEST

START_TEST(test_fl5_orphan_cancel)
{
    LEAK_START();
    flight_group_t *g =
        group_with(DEFAULT_MAX_LAG, DEFAULT_RETAIN, 0, FLIGHT_ORPHAN_CANCEL);
    fetch_ctx_t f;
    flight_writer_t *w;
    flight_reader_t *lead = async_flight(g, "orphan", &f, 53, &w);
    flight_reader_t *j = join(g, "orphan", &f, 1);
    ck_assert_int_eq(write_pattern(w, f.seed, 0, 1000, 1000), 0);
    ck_assert_uint_eq(flight_writer_readers(w), 2);
    flight_reader_close(lead);
    ck_assert_uint_eq(flight_writer_readers(w), 1);
    ck_assert_int_eq(write_pattern(w, f.seed, 1000, 1000, 1000), 0);
    flight_reader_close(j);
    ck_assert_uint_eq(flight_writer_readers(w), 0);
    ck_assert_uint_eq(stats_of(g).orphaned, 1);

    unsigned char x[16] = {0};
    ck_assert_int_eq(flight_write(w, x, sizeof(x)), FLIGHT_ECANCELED);
    ck_assert_int_eq(flight_write(w, x, sizeof(x)), FLIGHT_ECANCELED);
    ck_assert_int_eq(flight_end(w, 0), FLIGHT_ECANCELED);
    flight_writer_release(w);
    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.bytes_written, 2000);
    ck_assert_uint_eq(s.orphaned, 1);
    assert_idle(g);

    /* The canceled flight is over: the key starts a new one. */
    fetch_ctx_t f2;
    fetch_init(&f2, F_BODY, 54, 5000);
    flight_reader_t *r2 = join(g, "orphan", &f2, 0);
    ck_assert_int_eq(atomic_load(&f2.calls), 1);
    ASSERT_BODY(read_all(r2, PAT(f2.seed), 0), COALESCE_EOF, 5000);
    flight_reader_close(r2);
    ck_assert_uint_eq(stats_of(g).orphaned, 1);
    FINISH(g);
}
END_TEST

/*
 * A reader detached by max_lag receives nothing more, so it does not keep a
 * CANCEL-policy flight alive: once every reader is closed or detached, the
 * writer is told.
 */
START_TEST(test_fl5_orphan_by_detach)
{
    LEAK_START();
    flight_group_t *g = group_with(4 * KiB, 4 * KiB, 0, FLIGHT_ORPHAN_CANCEL);
    fetch_ctx_t f;
    flight_writer_t *w;
    flight_reader_t *lead = async_flight(g, "orphan-lag", &f, 55, &w);
    flight_reader_t *j = join(g, "orphan-lag", &f, 1);
    flight_reader_close(lead);
    ck_assert_uint_eq(flight_writer_readers(w), 1);
    /* j never reads: past 4 KiB behind it is detached, and nobody is left. */
    ck_assert_int_eq(write_pattern(w, f.seed, 0, 8 * KiB, 1 * KiB),
                     FLIGHT_ECANCELED);
    ck_assert_uint_eq(flight_writer_readers(w), 0);
    /* Lag counts up to the start of a write: the 6th write detaches. */
    ck_assert_uint_eq(stats_of(g).bytes_written, 6 * KiB);
    ck_assert_uint_eq(stats_of(g).lagged, 1);
    ck_assert_uint_eq(stats_of(g).orphaned, 1);
    unsigned char x[16] = {0};
    ck_assert_int_eq(flight_write(w, x, sizeof(x)), FLIGHT_ECANCELED);
    ck_assert_int_eq(flight_end(w, 0), FLIGHT_ECANCELED);
    flight_writer_release(w);
    assert_terminal(j, FLIGHT_ELAGGED);
    flight_reader_close(j);
    FINISH(g);
}
END_TEST

START_TEST(test_fl5_orphan_continue)
{
    LEAK_START();
    flight_group_t *g = group_default(); /* CONTINUE is the default */
    fetch_ctx_t f;
    fetch_init(&f, F_ASYNC, 55, 30 * KiB);
    flight_reader_t *lead = join(g, "bg-fill", &f, 0);
    flight_writer_t *w = writer_of(&f);
    ck_assert_int_eq(write_pattern(w, f.seed, 0, 10 * KiB, 1 * KiB), 0);
    flight_reader_close(lead);
    ck_assert_uint_eq(flight_writer_readers(w), 0);
    ck_assert_uint_eq(stats_of(g).orphaned, 1);
    /* Writes go on succeeding. */
    ck_assert_int_eq(write_pattern(w, f.seed, 10 * KiB, 10 * KiB, 1 * KiB), 0);
    /* Byte 0 is still held: a new caller joins the background fill. */
    flight_reader_t *j = join(g, "bg-fill", &f, 1);
    ck_assert_uint_eq(flight_writer_readers(w), 1);
    ck_assert_int_eq(write_pattern(w, f.seed, 20 * KiB, 10 * KiB, 1 * KiB), 0);
    ck_assert_int_eq(flight_end(w, 0), 0);
    flight_writer_release(w);
    ASSERT_BODY(read_all(j, PAT(f.seed), 0), COALESCE_EOF, f.len);
    flight_reader_close(j);
    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.flights_started, 1);
    ck_assert_uint_eq(s.bytes_written, f.len);
    ck_assert_uint_eq(s.errors, 0);
    FINISH(g);
}
END_TEST

/* --- FL-6: late joiners and reuse ----------------------------------------- */

START_TEST(test_fl6_late_joiner_reads_from_zero)
{
    LEAK_START();
    flight_group_t *g =
        group_with(DEFAULT_MAX_LAG, 64 * KiB, 0, FLIGHT_ORPHAN_CONTINUE);
    fetch_ctx_t f;
    fetch_init(&f, F_ASYNC, 61, 200 * KiB);
    flight_reader_t *lead = join(g, "late", &f, 0);
    flight_writer_t *w = writer_of(&f);
    ck_assert_int_eq(flight_set_meta(w, "hdrs", 4), 0);
    /* Joinable in the meta stage. */
    flight_reader_t *j0 = join(g, "late", &f, 1);
    ck_assert_int_eq(write_pattern(w, f.seed, 0, 32 * KiB, 4 * KiB), 0);
    ASSERT_BODY(read_upto(lead, PAT(f.seed), 0, 32 * KiB, 5000, -1), 0,
                32 * KiB);
    /* Joinable mid-body, within retain_limit. */
    flight_reader_t *j1 = join(g, "late", &f, 1);
    ck_assert_uint_eq(flight_reader_offset(j1), 0);
    const void *m = NULL;
    size_t ml = 0;
    ck_assert_int_eq(flight_meta(j1, 0, &m, &ml), 0);
    ck_assert_uint_eq(ml, 4);
    ck_assert_mem_eq(m, "hdrs", 4);
    ck_assert_int_eq(write_pattern(w, f.seed, 32 * KiB, 168 * KiB, 4 * KiB), 0);
    ck_assert_int_eq(flight_end(w, 0), 0);
    flight_writer_release(w);

    ASSERT_BODY(read_all(j1, PAT(f.seed), 0), COALESCE_EOF, f.len);
    ASSERT_BODY(read_all(j0, PAT(f.seed), 0), COALESCE_EOF, f.len);
    ASSERT_BODY(read_all(lead, PAT(f.seed), 32 * KiB), COALESCE_EOF,
                f.len - 32 * KiB);
    ck_assert_int_eq(atomic_load(&f.calls), 1);
    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.flights_started, 1);
    ck_assert_uint_eq(s.joins, 2);
    flight_reader_close(j0);
    flight_reader_close(j1);
    flight_reader_close(lead);
    FINISH(g);
}
END_TEST

START_TEST(test_fl6_beyond_retain_starts_new_flight)
{
    LEAK_START();
    flight_group_t *g =
        group_with(DEFAULT_MAX_LAG, 64 * KiB, 0, FLIGHT_ORPHAN_CONTINUE);
    fetch_ctx_t f1, f2;
    fetch_init(&f1, F_ASYNC, 62, 0);
    fetch_init(&f2, F_ASYNC, 63, 50 * KiB);
    flight_reader_t *r1 = join(g, "retain", &f1, 0);
    flight_writer_t *w1 = writer_of(&f1);
    uint64_t got = 0;
    for (size_t off = 0; off < 128 * KiB; off += 8 * KiB) {
        ck_assert_int_eq(write_pattern(w1, f1.seed, off, 8 * KiB, 8 * KiB), 0);
        got += drain(r1, PAT(f1.seed), got).got;
    }
    ck_assert_uint_eq(got, 128 * KiB);
    /* Byte 0 is gone: a new caller leads a new flight. */
    flight_reader_t *r2 = join(g, "retain", &f2, 0);
    ck_assert_int_eq(atomic_load(&f1.calls), 1);
    ck_assert_int_eq(atomic_load(&f2.calls), 1);
    flight_writer_t *w2 = writer_of(&f2);
    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.flights_started, 2);
    ck_assert_uint_eq(s.flights_active, 2);
    ck_assert_uint_eq(s.joins, 0);
    /* The key now leads to the new flight. */
    flight_reader_t *r3 = join(g, "retain", &f2, 1);
    ck_assert_uint_eq(flight_writer_readers(w2), 2);
    ck_assert_uint_eq(flight_writer_readers(w1), 1);

    ck_assert_int_eq(write_pattern(w1, f1.seed, 128 * KiB, 8 * KiB, 8 * KiB),
                     0);
    ck_assert_int_eq(flight_end(w1, 0), 0);
    flight_writer_release(w1);
    ck_assert_int_eq(write_pattern(w2, f2.seed, 0, f2.len, 8 * KiB), 0);
    ck_assert_int_eq(flight_end(w2, 0), 0);
    flight_writer_release(w2);
    ASSERT_BODY(read_all(r1, PAT(f1.seed), got), COALESCE_EOF, 8 * KiB);
    ASSERT_BODY(read_all(r2, PAT(f2.seed), 0), COALESCE_EOF, f2.len);
    ASSERT_BODY(read_all(r3, PAT(f2.seed), 0), COALESCE_EOF, f2.len);
    flight_reader_close(r1);
    flight_reader_close(r2);
    flight_reader_close(r3);
    FINISH(g);
}
END_TEST

START_TEST(test_fl6_sequential_reuse)
{
    LEAK_START();
    flight_group_t *g = group_default();
    fetch_ctx_t f;
    fetch_init(&f, F_BODY, 64, 3000);
    flight_reader_t *r = join(g, "seq", &f, 0);
    ASSERT_BODY(read_all(r, PAT(f.seed), 0), COALESCE_EOF, 3000);
    flight_reader_close(r);
    r = join(g, "seq", &f, 0);
    ck_assert_int_eq(atomic_load(&f.calls), 2);
    ASSERT_BODY(read_all(r, PAT(f.seed), 0), COALESCE_EOF, 3000);
    flight_reader_close(r);

    /* The key is free as soon as flight_end() returns, even while the
     * ended flight still has an unread reader. */
    fetch_ctx_t fa;
    fetch_init(&fa, F_ASYNC, 65, 0);
    flight_reader_t *ra = join(g, "seq", &fa, 0);
    flight_writer_t *wa = writer_of(&fa);
    ck_assert_int_eq(write_pattern(wa, fa.seed, 0, 4000, 4000), 0);
    ck_assert_int_eq(flight_end(wa, 0), 0);
    flight_reader_t *rb = join(g, "seq", &f, 0);
    ck_assert_int_eq(atomic_load(&f.calls), 3);
    ck_assert_int_eq(atomic_load(&fa.calls), 1);
    flight_writer_release(wa);
    ASSERT_BODY(read_all(ra, PAT(fa.seed), 0), COALESCE_EOF, 4000);
    ASSERT_BODY(read_all(rb, PAT(f.seed), 0), COALESCE_EOF, 3000);
    flight_reader_close(ra);
    flight_reader_close(rb);
    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.flights_started, 4);
    ck_assert_uint_eq(s.joins, 0);
    FINISH(g);
}
END_TEST

/* --- FL-7: errors --------------------------------------------------------- */

#define NERR 4

typedef struct err_arg {
    flight_group_t *g;
    fetch_ctx_t *f;
    pthread_barrier_t *bar;
    counter_t *have;
    int rc;
    int shared;
    int meta_rc;
    int read_rc[2];
    int peek_rc;
} err_arg_t;

static void *err_thread(void *p)
{
    err_arg_t *a = p;
    pthread_barrier_wait(a->bar);
    flight_reader_t *r = NULL;
    a->rc = flight_do(a->g, "fails", 5, fetch_cb, a->f, &r);
    a->shared = a->rc == 0 ? flight_reader_shared(r) : -1;
    counter_add(a->have, 1);
    if (a->rc != 0)
        return NULL;
    a->meta_rc = flight_meta(r, -1, NULL, NULL);
    unsigned char b[32];
    size_t n = 0;
    a->read_rc[0] = flight_read(r, b, sizeof(b), -1, &n);
    a->read_rc[1] = flight_read(r, b, sizeof(b), -1, &n);
    const void *d = NULL;
    a->peek_rc = flight_peek(r, -1, &d, &n, NULL);
    flight_reader_close(r);
    return NULL;
}

/* The fetch fails before the meta, with waiters already joined. */
START_TEST(test_fl7_fetch_error_before_meta)
{
    LEAK_START();
    flight_group_t *g = group_default();
    counter_t have;
    counter_init(&have);
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, NERR);
    fetch_ctx_t f;
    fetch_init(&f, F_RET, 71, 0);
    f.ret = COALESCE_EIO;
    f.gate = &have;
    f.gate_n = NERR - 1;
    err_arg_t a[NERR];
    pthread_t th[NERR];
    for (int i = 0; i < NERR; i++) {
        a[i] = (err_arg_t){.g = g, .f = &f, .bar = &bar, .have = &have};
        ck_assert_int_eq(pthread_create(&th[i], NULL, err_thread, &a[i]), 0);
    }
    for (int i = 0; i < NERR; i++)
        pthread_join(th[i], NULL);
    int leaders = 0;
    for (int i = 0; i < NERR; i++) {
        ck_assert_int_eq(a[i].rc, 0);
        ck_assert_int_eq(a[i].meta_rc, COALESCE_EIO);
        ck_assert_int_eq(a[i].read_rc[0], COALESCE_EIO);
        ck_assert_int_eq(a[i].read_rc[1], COALESCE_EIO);
        ck_assert_int_eq(a[i].peek_rc, COALESCE_EIO);
        leaders += a[i].shared == 0;
    }
    ck_assert_int_eq(leaders, 1);
    ck_assert_int_eq(atomic_load(&f.calls), 1);
    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.flights_started, 1);
    ck_assert_uint_eq(s.joins, NERR - 1);
    ck_assert_uint_eq(s.errors, 1);
    assert_idle(g);

    /* Alone, the leader gets it too; and the key is free again. */
    f.gate = NULL;
    f.ret = COALESCE_EUPSTREAM;
    flight_reader_t *r = join(g, "fails", &f, 0);
    ck_assert_int_eq(atomic_load(&f.calls), 2);
    ck_assert_int_eq(flight_meta(r, -1, NULL, NULL), COALESCE_EUPSTREAM);
    assert_terminal(r, COALESCE_EUPSTREAM);
    ck_assert_int_eq(flight_meta(r, 0, NULL, NULL), COALESCE_EUPSTREAM);
    flight_reader_close(r);
    ck_assert_uint_eq(stats_of(g).errors, 2);
    assert_idle(g);
    flight_group_close(g);
    pthread_barrier_destroy(&bar);
    counter_destroy(&have);
    LEAK_CHECK();
}
END_TEST

START_TEST(test_fl7_error_status_after_bytes)
{
    LEAK_START();
    flight_group_t *g = group_default();
    fetch_ctx_t f;
    fetch_init(&f, F_ASYNC, 72, 10007);
    flight_reader_t *lead = join(g, "midfail", &f, 0);
    flight_writer_t *w = writer_of(&f);
    flight_reader_t *j1 = join(g, "midfail", &f, 1);
    ck_assert_int_eq(flight_set_meta(w, "200", 3), 0);
    ck_assert_int_eq(write_pattern(w, f.seed, 0, 5000, 1000), 0);
    flight_reader_t *j2 = join(g, "midfail", &f, 1);
    ck_assert_int_eq(write_pattern(w, f.seed, 5000, f.len - 5000, 1000), 0);
    ck_assert_int_eq(flight_end(w, COALESCE_EIO), 0);
    flight_writer_release(w);

    const void *m = NULL;
    size_t ml = 0;
    ck_assert_int_eq(flight_meta(lead, 0, &m, &ml), 0);
    ck_assert_uint_eq(ml, 3);
    ck_assert_mem_eq(m, "200", 3);
    ASSERT_BODY(read_all(lead, PAT(f.seed), 0), COALESCE_EIO, f.len);
    assert_terminal(lead, COALESCE_EIO);
    ASSERT_BODY(peek_all(j1, PAT(f.seed), 0), COALESCE_EIO, f.len);
    assert_terminal(j1, COALESCE_EIO);
    ASSERT_BODY(read_upto(j2, PAT(f.seed), 0, UINT64_MAX, 10007, 0),
                COALESCE_EIO, f.len);
    assert_terminal(j2, COALESCE_EIO);
    flight_reader_close(lead);
    flight_reader_close(j1);
    flight_reader_close(j2);

    /* An error after the meta but before any body byte. */
    fetch_ctx_t f2;
    fetch_init(&f2, F_ASYNC, 73, 0);
    flight_reader_t *r2 = join(g, "midfail", &f2, 0);
    flight_writer_t *w2 = writer_of(&f2);
    ck_assert_int_eq(flight_set_meta(w2, "x", 1), 0);
    ck_assert_int_eq(flight_end(w2, COALESCE_ETIMEDOUT), 0);
    flight_writer_release(w2);
    ck_assert_int_eq(flight_meta(r2, -1, &m, &ml), 0);
    ck_assert_uint_eq(ml, 1);
    assert_terminal(r2, COALESCE_ETIMEDOUT);
    flight_reader_close(r2);

    /* An error ending an ASYNC flight before the meta. */
    fetch_ctx_t f3;
    fetch_init(&f3, F_ASYNC, 74, 0);
    flight_reader_t *r3 = join(g, "midfail", &f3, 0);
    flight_writer_t *w3 = writer_of(&f3);
    ck_assert_int_eq(flight_end(w3, COALESCE_EBACKEND), 0);
    flight_writer_release(w3);
    ck_assert_int_eq(flight_meta(r3, -1, &m, &ml), COALESCE_EBACKEND);
    assert_terminal(r3, COALESCE_EBACKEND);
    flight_reader_close(r3);

    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.errors, 3);
    ck_assert_uint_eq(s.flights_started, 3);
    FINISH(g);
}
END_TEST

START_TEST(test_fl7_writer_released_without_end)
{
    LEAK_START();
    flight_group_t *g = group_default();
    fetch_ctx_t f;
    fetch_init(&f, F_ASYNC, 75, 5000);
    flight_reader_t *lead = join(g, "forgot", &f, 0);
    flight_writer_t *w = writer_of(&f);
    flight_reader_t *j = join(g, "forgot", &f, 1);
    ck_assert_int_eq(write_pattern(w, f.seed, 0, 5000, 1024), 0);
    flight_writer_release(w);
    ASSERT_BODY(read_all(lead, PAT(f.seed), 0), COALESCE_EUPSTREAM, 5000);
    assert_terminal(lead, COALESCE_EUPSTREAM);
    ASSERT_BODY(peek_all(j, PAT(f.seed), 0), COALESCE_EUPSTREAM, 5000);
    assert_terminal(j, COALESCE_EUPSTREAM);
    ck_assert_int_eq(flight_meta(j, 0, NULL, NULL), 0);
    flight_reader_close(lead);
    flight_reader_close(j);

    /* Released before anything at all: meta too reports the error. */
    fetch_ctx_t f2;
    fetch_init(&f2, F_ASYNC, 76, 0);
    flight_reader_t *r2 = join(g, "forgot", &f2, 0);
    flight_writer_release(writer_of(&f2));
    ck_assert_int_eq(flight_meta(r2, -1, NULL, NULL), COALESCE_EUPSTREAM);
    assert_terminal(r2, COALESCE_EUPSTREAM);
    flight_reader_close(r2);

    ck_assert_uint_eq(stats_of(g).errors, 2);
    FINISH(g);
}
END_TEST

START_TEST(test_fl7_sync_fetch_without_end)
{
    LEAK_START();
    flight_group_t *g = group_default();
    /* DONE without flight_end(): EUPSTREAM after the bytes. */
    fetch_ctx_t f;
    fetch_init(&f, F_BODY, 77, 3000);
    f.end = false;
    flight_reader_t *r = join(g, "noend", &f, 0);
    ASSERT_BODY(read_all(r, PAT(f.seed), 0), COALESCE_EUPSTREAM, 3000);
    assert_terminal(r, COALESCE_EUPSTREAM);
    flight_reader_close(r);

    /* A negative return without flight_end(): that code after the bytes. */
    fetch_init(&f, F_BODY, 78, 3000);
    f.end = false;
    f.ret = COALESCE_EIO;
    r = join(g, "noend", &f, 0);
    ASSERT_BODY(read_all(r, PAT(f.seed), 0), COALESCE_EIO, 3000);
    assert_terminal(r, COALESCE_EIO);
    flight_reader_close(r);
    ck_assert_uint_eq(stats_of(g).errors, 2);

    /* A negative return after a clean flight_end(): the end stands. */
    fetch_init(&f, F_BODY, 79, 3000);
    f.ret = COALESCE_EIO;
    r = join(g, "noend", &f, 0);
    ASSERT_BODY(read_all(r, PAT(f.seed), 0), COALESCE_EOF, 3000);
    flight_reader_close(r);
    ck_assert_uint_eq(stats_of(g).errors, 2);
    FINISH(g);
}
END_TEST

/* --- FL-8: wait_timeout --------------------------------------------------- */

START_TEST(test_fl8_wait_timeout)
{
    LEAK_START();
    const uint32_t wait_ms = 200;
    flight_group_t *g = group_with(DEFAULT_MAX_LAG, DEFAULT_RETAIN, wait_ms,
                                   FLIGHT_ORPHAN_CONTINUE);
    fetch_ctx_t f;
    fetch_init(&f, F_ASYNC, 81, 20 * KiB);
    flight_reader_t *lead = join(g, "slow", &f, 0);
    flight_writer_t *w = writer_of(&f);
    ck_assert_int_eq(flight_reader_deadline_ms(lead), -1);

    flight_reader_t *wt = join(g, "slow", &f, 1);
    flight_reader_t *wt2 = join(g, "slow", &f, 1);
    int64_t d = flight_reader_deadline_ms(wt);
    ck_assert_int_ge(d, 0);
    ck_assert_int_le(d, wait_ms);
    ck_assert_int_eq(flight_meta(wt, 0, NULL, NULL), COALESCE_EAGAIN);
    ck_assert_int_eq(flight_meta(lead, 0, NULL, NULL), COALESCE_EAGAIN);

    /* The waiter's blocking meta call ends at the deadline. */
    ck_assert_int_eq(flight_meta(wt, -1, NULL, NULL), FLIGHT_ETIMEDOUT);
    ck_assert_int_eq(flight_meta(wt, 0, NULL, NULL), FLIGHT_ETIMEDOUT);
    assert_terminal(wt, FLIGHT_ETIMEDOUT);
    ck_assert_uint_eq(flight_reader_offset(wt), 0);
    ck_assert_uint_eq(stats_of(g).timeouts, 1);
    /* wt2's deadline passed too; a blocking read reports it. */
    unsigned char b[16];
    size_t n = 0;
    ck_assert_int_eq(flight_read(wt2, b, sizeof(b), -1, &n), FLIGHT_ETIMEDOUT);
    ck_assert_uint_eq(stats_of(g).timeouts, 2);
    flight_reader_close(wt2);
    /* The leader is no waiter. */
    ck_assert_int_eq(flight_meta(lead, 0, NULL, NULL), COALESCE_EAGAIN);
    ck_assert_int_eq(flight_reader_deadline_ms(lead), -1);

    /* The flight goes on. */
    ck_assert_int_eq(flight_set_meta(w, "late meta", 9), 0);
    flight_reader_t *j = join(g, "slow", &f, 1);
    ck_assert_int_eq(flight_reader_deadline_ms(j), -1);
    const void *m = NULL;
    size_t ml = 0;
    ck_assert_int_eq(flight_meta(j, 0, &m, &ml), 0);
    ck_assert_uint_eq(ml, 9);
    ck_assert_mem_eq(m, "late meta", 9);
    /* Waiting past wait_ms for body bytes is no timeout once meta is known. */
    ck_assert_int_eq(flight_read(j, b, sizeof(b), (int)wait_ms + 100, &n),
                     COALESCE_EAGAIN);
    ck_assert_uint_eq(flight_reader_offset(j), 0);
    ck_assert_int_eq(write_pattern(w, f.seed, 0, f.len, 4 * KiB), 0);
    ck_assert_int_eq(flight_end(w, 0), 0);
    flight_writer_release(w);
    ASSERT_BODY(read_all(j, PAT(f.seed), 0), COALESCE_EOF, f.len);
    ASSERT_BODY(read_all(lead, PAT(f.seed), 0), COALESCE_EOF, f.len);
    assert_terminal(wt, FLIGHT_ETIMEDOUT);
    flight_reader_close(j);
    flight_reader_close(lead);
    flight_reader_close(wt);

    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.timeouts, 2);
    ck_assert_uint_eq(s.flights_started, 1);
    ck_assert_uint_eq(s.joins, 3);
    ck_assert_uint_eq(s.errors, 0);
    FINISH(g);
}
END_TEST

/* A body byte (no meta set) also ends the meta stage. */
START_TEST(test_fl8_body_without_meta)
{
    LEAK_START();
    flight_group_t *g = group_with(DEFAULT_MAX_LAG, DEFAULT_RETAIN, 5000,
                                   FLIGHT_ORPHAN_CONTINUE);
    fetch_ctx_t f;
    fetch_init(&f, F_ASYNC, 82, 100);
    flight_reader_t *lead = join(g, "nometa", &f, 0);
    flight_writer_t *w = writer_of(&f);
    flight_reader_t *j = join(g, "nometa", &f, 1);
    ck_assert_int_gt(flight_reader_deadline_ms(j), 0);
    ck_assert_int_eq(write_pattern(w, f.seed, 0, 100, 100), 0);
    const void *m = &m;
    size_t ml = 99;
    ck_assert_int_eq(flight_meta(j, -1, &m, &ml), 0);
    ck_assert_ptr_null(m);
    ck_assert_uint_eq(ml, 0);
    ck_assert_int_eq(flight_reader_deadline_ms(j), -1);
    ck_assert_int_eq(flight_end(w, 0), 0);
    flight_writer_release(w);
    ASSERT_BODY(read_all(j, PAT(f.seed), 0), COALESCE_EOF, 100);
    ASSERT_BODY(read_all(lead, PAT(f.seed), 0), COALESCE_EOF, 100);
    flight_reader_close(j);
    flight_reader_close(lead);
    ck_assert_uint_eq(stats_of(g).timeouts, 0);
    FINISH(g);
}
END_TEST

/* --- FL-9: zero waiters --------------------------------------------------- */

START_TEST(test_fl9_zero_waiters_no_delay)
{
    LEAK_START();
    const uint32_t wait_ms = 3000;
    flight_group_t *g = group_with(DEFAULT_MAX_LAG, DEFAULT_RETAIN, wait_ms,
                                   FLIGHT_ORPHAN_CONTINUE);
    fetch_ctx_t f;
    fetch_init(&f, F_BODY, 91, 4 * KiB);
    f.meta = "204";
    double t0 = now_ms();
    for (int i = 0; i < 20; i++) {
        flight_reader_t *r = join(g, "alone", &f, 0);
        ck_assert_int_eq(flight_reader_deadline_ms(r), -1);
        ck_assert_int_eq(flight_meta(r, -1, NULL, NULL), 0);
        ASSERT_BODY(read_all(r, PAT(f.seed), 0), COALESCE_EOF, f.len);
        flight_reader_close(r);
    }
    int64_t elapsed = (int64_t)(now_ms() - t0);
    /* A generous bound: far below one wait_timeout for 20 flights. */
    ck_assert_int_lt(elapsed, wait_ms / 2);
    ck_assert_int_eq(atomic_load(&f.calls), 20);
    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.flights_started, 20);
    ck_assert_uint_eq(s.joins, 0);
    ck_assert_uint_eq(s.timeouts, 0);
    FINISH(g);
}
END_TEST

/* --- FL-10: keys ---------------------------------------------------------- */

typedef struct keyspec {
    const unsigned char *k;
    size_t len;
} keyspec_t;

START_TEST(test_fl10_binary_keys)
{
    LEAK_START();
    const size_t big = 64 * KiB;
    unsigned char *k64a = pattern_new(101, big);
    unsigned char *k64b = pattern_new(101, big);
    k64b[big - 1] ^= 1;
    static const unsigned char ka[] = {'a', 0, 'b'}, kb[] = {'a', 0, 'c'},
                               kc[] = {'a'}, kd[] = {'a', 0}, ke[] = {0},
                               kf[] = {0, 0};
    const keyspec_t keys[] = {{ka, 3},     {kb, 3},     {kc, 1},
                              {kd, 2},     {ke, 1},     {kf, 2},
                              {k64a, big}, {k64b, big}, {k64a, big - 1}};
    enum { NK = sizeof(keys) / sizeof(keys[0]) };
    flight_group_t *g = group_default();
    fetch_ctx_t f[NK];
    flight_reader_t *r[NK], *again[NK];
    for (int i = 0; i < NK; i++) {
        fetch_init(&f[i], F_ASYNC, 1000 + (uint64_t)i, 1000 + (size_t)i);
        ck_assert_int_eq(
            flight_do(g, keys[i].k, keys[i].len, fetch_cb, &f[i], &r[i]), 0);
        ck_assert_int_eq(flight_reader_shared(r[i]), 0);
        ck_assert_int_eq(atomic_load(&f[i].calls), 1);
    }
    /* Equal bytes at another address join the same flight. */
    for (int i = 0; i < NK; i++) {
        unsigned char *copy = malloc(keys[i].len);
        ck_assert_ptr_nonnull(copy);
        memcpy(copy, keys[i].k, keys[i].len);
        ck_assert_int_eq(
            flight_do(g, copy, keys[i].len, fetch_cb, &f[i], &again[i]), 0);
        free(copy);
        ck_assert_int_eq(flight_reader_shared(again[i]), 1);
        ck_assert_int_eq(atomic_load(&f[i].calls), 1);
    }
    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.flights_started, NK);
    ck_assert_uint_eq(s.joins, NK);
    for (int i = 0; i < NK; i++) {
        flight_writer_t *w = writer_of(&f[i]);
        ck_assert_uint_eq(flight_writer_readers(w), 2);
        ck_assert_int_eq(write_pattern(w, f[i].seed, 0, f[i].len, 300), 0);
        ck_assert_int_eq(flight_end(w, 0), 0);
        flight_writer_release(w);
    }
    for (int i = 0; i < NK; i++) {
        ASSERT_BODY(read_all(r[i], PAT(f[i].seed), 0), COALESCE_EOF, f[i].len);
        ASSERT_BODY(read_all(again[i], PAT(f[i].seed), 0), COALESCE_EOF,
                    f[i].len);
        flight_reader_close(r[i]);
        flight_reader_close(again[i]);
    }
    /* The largest key, 1 MiB, is accepted. */
    unsigned char *k1m = pattern_new(102, 1 * MiB);
    fetch_ctx_t fm;
    fetch_init(&fm, F_BODY, 103, 10);
    flight_reader_t *rm = NULL;
    ck_assert_int_eq(flight_do(g, k1m, 1 * MiB, fetch_cb, &fm, &rm), 0);
    ASSERT_BODY(read_all(rm, PAT(fm.seed), 0), COALESCE_EOF, 10);
    flight_reader_close(rm);
    free(k1m);

    assert_idle(g);
    flight_group_close(g);
    free(k64a);
    free(k64b);
    LEAK_CHECK();
}
END_TEST

#define ISO_KEYS 3
#define ISO_PER  4

typedef struct iso_arg {
    flight_group_t *g;
    const char *key;
    fetch_ctx_t *f;
    pthread_barrier_t *bar;
    counter_t *have;
    int rc;
    int shared;
    readres_t res;
} iso_arg_t;

static void *iso_thread(void *p)
{
    iso_arg_t *a = p;
    pthread_barrier_wait(a->bar);
    flight_reader_t *r = NULL;
    a->rc = flight_do(a->g, a->key, strlen(a->key), fetch_cb, a->f, &r);
    a->shared = a->rc == 0 ? flight_reader_shared(r) : -1;
    counter_add(a->have, 1);
    if (a->rc == 0) {
        a->res = read_all(r, PAT(a->f->seed), 0);
        flight_reader_close(r);
    }
    return NULL;
}

START_TEST(test_fl10_key_isolation_concurrent)
{
    LEAK_START();
    enum { N = ISO_KEYS * ISO_PER };
    static const char *const names[ISO_KEYS] = {"a", "b", "c"};
    flight_group_t *g = group_default();
    counter_t have;
    counter_init(&have);
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, N);
    fetch_ctx_t f[ISO_KEYS];
    for (int k = 0; k < ISO_KEYS; k++)
        fetch_init(&f[k], F_ASYNC, 110 + (uint64_t)k,
                   20 * KiB * (size_t)(k + 1));
    iso_arg_t a[N];
    pthread_t th[N];
    for (int i = 0; i < N; i++) {
        a[i] = (iso_arg_t){.g = g,
                           .key = names[i % ISO_KEYS],
                           .f = &f[i % ISO_KEYS],
                           .bar = &bar,
                           .have = &have};
        ck_assert_int_eq(pthread_create(&th[i], NULL, iso_thread, &a[i]), 0);
    }
    counter_wait(&have, N);
    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.flights_started, ISO_KEYS);
    ck_assert_uint_eq(s.joins, N - ISO_KEYS);
    for (int k = 0; k < ISO_KEYS; k++) {
        ck_assert_int_eq(atomic_load(&f[k].calls), 1);
        flight_writer_t *w = writer_of(&f[k]);
        ck_assert_uint_eq(flight_writer_readers(w), ISO_PER);
        ck_assert_int_eq(write_pattern(w, f[k].seed, 0, f[k].len, 4 * KiB), 0);
        ck_assert_int_eq(flight_end(w, 0), 0);
        flight_writer_release(w);
    }
    int leaders = 0;
    for (int i = 0; i < N; i++) {
        pthread_join(th[i], NULL);
        ck_assert_int_eq(a[i].rc, 0);
        ASSERT_BODY(a[i].res, COALESCE_EOF, a[i].f->len);
        leaders += a[i].shared == 0;
    }
    ck_assert_int_eq(leaders, ISO_KEYS);
    assert_idle(g);
    flight_group_close(g);
    pthread_barrier_destroy(&bar);
    counter_destroy(&have);
    LEAK_CHECK();
}
END_TEST

/* --- FL-11: stats --------------------------------------------------------- */

START_TEST(test_fl11_stats)
{
    LEAK_START();
    flight_group_t *g =
        group_with(64 * KiB, 16 * KiB, 50, FLIGHT_ORPHAN_CONTINUE);
    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.flights_started, 0);
    ck_assert_uint_eq(s.joins, 0);
    ck_assert_uint_eq(s.timeouts, 0);
    ck_assert_uint_eq(s.errors, 0);
    ck_assert_uint_eq(s.lagged, 0);
    ck_assert_uint_eq(s.bytes_written, 0);
    ck_assert_uint_eq(s.bytes_delivered, 0);
    ck_assert_uint_eq(s.orphaned, 0);
    assert_idle(g);

    /* A clean flight, step by step. */
    fetch_ctx_t f;
    fetch_init(&f, F_ASYNC, 121, 60000);
    flight_reader_t *l = join(g, "s1", &f, 0);
    flight_writer_t *w = writer_of(&f);
    s = stats_of(g);
    ck_assert_uint_eq(s.flights_started, 1);
    ck_assert_uint_eq(s.flights_active, 1);
    ck_assert_uint_eq(s.readers_open, 1);
    ck_assert_uint_eq(s.bytes_held, 0);
    flight_reader_t *j = join(g, "s1", &f, 1);
    s = stats_of(g);
    ck_assert_uint_eq(s.joins, 1);
    ck_assert_uint_eq(s.readers_open, 2);
    ck_assert_int_eq(flight_set_meta(w, "meta", 4), 0);
    ck_assert_int_eq(write_pattern(w, f.seed, 0, 30000, 10000), 0);
    s = stats_of(g);
    ck_assert_uint_eq(s.bytes_written, 30000);
    ck_assert_uint_eq(s.bytes_held, 30000);
    ck_assert_uint_ge(s.segments_held, 1);
    ck_assert_uint_le(s.segments_held, 3);
    ck_assert_uint_eq(s.bytes_delivered, 0);
    ASSERT_BODY(read_upto(l, PAT(f.seed), 0, 30000, 4096, -1), 0, 30000);
    ASSERT_BODY(read_upto(j, PAT(f.seed), 0, 12345, 4096, -1), 0, 12345);
    s = stats_of(g);
    ck_assert_uint_eq(s.bytes_delivered, 42345);
    /* j still needs bytes 12345..30000; the prefix may have gone (16 KiB
     * retain_limit). */
    ck_assert_uint_le(s.bytes_held, 30000);
    ck_assert_uint_ge(s.bytes_held, 30000 - 12345);
    ck_assert_int_eq(write_pattern(w, f.seed, 30000, 30000, 10000), 0);
    ck_assert_int_eq(flight_end(w, 0), 0);
    s = stats_of(g);
    ck_assert_uint_eq(s.flights_active, 0);
    ck_assert_uint_eq(s.bytes_written, 60000);
    flight_writer_release(w);
    ASSERT_BODY(read_all(l, PAT(f.seed), 30000), COALESCE_EOF, 30000);
    ASSERT_BODY(peek_all(j, PAT(f.seed), 12345), COALESCE_EOF, 60000 - 12345);
    s = stats_of(g);
    ck_assert_uint_eq(s.bytes_delivered, 120000);
    ck_assert_uint_eq(s.readers_open, 2);
    flight_reader_close(l);
    flight_reader_close(j);
    assert_idle(g);
    s = stats_of(g);
    ck_assert_uint_eq(s.errors, 0);
    ck_assert_uint_eq(s.timeouts, 0);
    ck_assert_uint_eq(s.lagged, 0);
    ck_assert_uint_eq(s.orphaned, 0);

    /* A timeout, a lagged reader, an error and an orphan in one flight. */
    fetch_ctx_t f2;
    fetch_init(&f2, F_ASYNC, 122, 0);
    flight_reader_t *l2 = join(g, "s2", &f2, 0);
    flight_writer_t *w2 = writer_of(&f2);
    flight_reader_t *waiter = join(g, "s2", &f2, 1);
    ck_assert_int_eq(flight_meta(waiter, -1, NULL, NULL), FLIGHT_ETIMEDOUT);
    ck_assert_int_eq(flight_set_meta(w2, "m", 1), 0);
    flight_reader_t *idle = join(g, "s2", &f2, 1);
    uint64_t got = 0;
    for (size_t off = 0; off < 256 * KiB; off += 8 * KiB) {
        ck_assert_int_eq(write_pattern(w2, f2.seed, off, 8 * KiB, 8 * KiB), 0);
        got += drain(l2, PAT(f2.seed), got).got;
    }
    flight_reader_close(l2);
    flight_reader_close(waiter);
    flight_reader_close(idle);
    ck_assert_uint_eq(flight_writer_readers(w2), 0);
    flight_writer_release(w2); /* -> COALESCE_EUPSTREAM, an error */
    s = stats_of(g);
    ck_assert_uint_eq(s.flights_started, 2);
    ck_assert_uint_eq(s.joins, 3);
    ck_assert_uint_eq(s.timeouts, 1);
    ck_assert_uint_eq(s.lagged, 1);
    ck_assert_uint_eq(s.errors, 1);
    ck_assert_uint_eq(s.orphaned, 1);
    ck_assert_uint_eq(s.bytes_written, 60000 + 256 * KiB);
    ck_assert_uint_eq(s.bytes_delivered, 120000 + got);
    assert_idle(g);

    /* A short size fills only that prefix. */
    flight_stats_t part;
    memset(&part, 0xA5, sizeof(part));
    ck_assert_int_eq(
        flight_group_stats(g, &part, offsetof(flight_stats_t, joins)), 0);
    ck_assert_uint_eq(part.flights_started, 2);
    ck_assert_uint_eq(part.joins, UINT64_C(0xA5A5A5A5A5A5A5A5));
    ck_assert_int_eq(flight_group_stats(NULL, &part, sizeof(part)),
                     COALESCE_EINVAL);
    ck_assert_int_eq(flight_group_stats(g, NULL, sizeof(part)),
                     COALESCE_EINVAL);
    flight_group_close(g);
    LEAK_CHECK();
}
END_TEST

/* --- FL-12: bad input ----------------------------------------------------- */

START_TEST(test_fl12_group_args)
{
    LEAK_START();
    flight_opts_t o;
    memset(&o, 0xEE, sizeof(o));
    flight_opts_init(&o);
    ck_assert_uint_eq(o.size, sizeof(flight_opts_t));
    ck_assert_uint_eq(o.max_lag, DEFAULT_MAX_LAG);
    ck_assert_uint_eq(o.retain_limit, DEFAULT_RETAIN);
    ck_assert_uint_eq(o.wait_timeout_ms, 0);
    ck_assert_uint_eq(o.shards, 64);
    ck_assert_int_eq(o.orphan_policy, FLIGHT_ORPHAN_CONTINUE);

    flight_group_t *g = SENTINEL(flight_group_t);
    ck_assert_int_eq(flight_group_new(NULL, NULL), COALESCE_EINVAL);
    ck_assert_int_eq(flight_group_new(NULL, &o), COALESCE_EINVAL);
    o.size = 0;
    ck_assert_int_eq(flight_group_new(&g, &o), COALESCE_EINVAL);
    o.size = 3;
    ck_assert_int_eq(flight_group_new(&g, &o), COALESCE_EINVAL);
    flight_opts_init(&o);
    o.orphan_policy = 7;
    ck_assert_int_eq(flight_group_new(&g, &o), COALESCE_EINVAL);
    o.orphan_policy = -1;
    ck_assert_int_eq(flight_group_new(&g, &o), COALESCE_EINVAL);
    ck_assert_ptr_eq(g, SENTINEL(flight_group_t));
    LEAK_CHECK();

    /* retain_limit above max_lag is clamped, not refused; odd shards. */
    flight_opts_init(&o);
    o.max_lag = 64 * KiB;
    o.retain_limit = FLIGHT_UNLIMITED;
    o.shards = 3;
    ck_assert_int_eq(flight_group_new(&g, &o), 0);
    ck_assert_ptr_null(flight_group_get_data(g));
    int tag;
    flight_group_set_data(g, &tag);
    ck_assert_ptr_eq(flight_group_get_data(g), &tag);
    flight_group_close(g);
    flight_group_close(NULL);
    LEAK_CHECK();
}
END_TEST

START_TEST(test_fl12_do_args)
{
    LEAK_START();
    flight_group_t *g = group_default();
    fetch_ctx_t f;
    fetch_init(&f, F_BODY, 131, 10);
    flight_reader_t *sentinel = SENTINEL(flight_reader_t);
    flight_reader_t *r = sentinel;
    ck_assert_int_eq(flight_do(NULL, "k", 1, fetch_cb, &f, &r),
                     COALESCE_EINVAL);
    ck_assert_int_eq(flight_do(g, NULL, 1, fetch_cb, &f, &r), COALESCE_EINVAL);
    ck_assert_int_eq(flight_do(g, "k", 0, fetch_cb, &f, &r), COALESCE_EINVAL);
    ck_assert_int_eq(flight_do(g, "k", 1, NULL, &f, &r), COALESCE_EINVAL);
    ck_assert_int_eq(flight_do(g, "k", 1, fetch_cb, &f, NULL), COALESCE_EINVAL);
    unsigned char *huge = calloc(1, MiB + 1);
    ck_assert_ptr_nonnull(huge);
    ck_assert_int_eq(flight_do(g, huge, MiB + 1, fetch_cb, &f, &r),
                     COALESCE_EINVAL);
    ck_assert_int_eq(flight_do(g, huge, SIZE_MAX, fetch_cb, &f, &r),
                     COALESCE_EINVAL);
    free(huge);
    ck_assert_ptr_eq(r, sentinel);
    ck_assert_int_eq(atomic_load(&f.calls), 0);
    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.flights_started, 0);
    ck_assert_uint_eq(s.joins, 0);
    FINISH(g);
}
END_TEST

/* flight_do after flight_group_close; the group lives on while a flight does.
 */
START_TEST(test_fl12_closing)
{
    LEAK_START();
    flight_group_t *g = group_default();
    fetch_ctx_t f, f2;
    fetch_init(&f, F_ASYNC, 132, 5000);
    fetch_init(&f2, F_BODY, 133, 10);
    flight_reader_t *r = join(g, "alive", &f, 0);
    flight_writer_t *w = writer_of(&f);
    flight_reader_t *r2 = join(g, "ended", &f2, 0); /* ended, still open */
    flight_group_close(g);

    flight_reader_t *sentinel = SENTINEL(flight_reader_t);
    flight_reader_t *x = sentinel;
    ck_assert_int_eq(flight_do(g, "alive", 5, fetch_cb, &f, &x),
                     COALESCE_ECLOSING);
    ck_assert_int_eq(flight_do(g, "other", 5, fetch_cb, &f2, &x),
                     COALESCE_ECLOSING);
    ck_assert_ptr_eq(x, sentinel);
    ck_assert_int_eq(atomic_load(&f.calls), 1);
    ck_assert_int_eq(atomic_load(&f2.calls), 1);

    /* The flights are undisturbed. */
    ck_assert_int_eq(write_pattern(w, f.seed, 0, f.len, 1000), 0);
    ck_assert_int_eq(flight_end(w, 0), 0);
    ASSERT_BODY(read_all(r, PAT(f.seed), 0), COALESCE_EOF, f.len);
    flight_reader_close(r);
    ASSERT_BODY(read_all(r2, PAT(f2.seed), 0), COALESCE_EOF, f2.len);
    flight_reader_close(r2);
    flight_writer_release(w); /* the last one: frees the group */
    LEAK_CHECK();

    /* Closing an idle group frees it at once. */
    g = group_default();
    flight_group_close(g);
    LEAK_CHECK();
}
END_TEST

START_TEST(test_fl12_writer_misuse)
{
    LEAK_START();
    flight_group_t *g = group_default();
    fetch_ctx_t f;
    fetch_init(&f, F_ASYNC, 134, 3000);
    flight_reader_t *r = join(g, "misuse", &f, 0);
    flight_writer_t *w = writer_of(&f);
    unsigned char data[3000];
    test_fill(data, f.seed, 0, sizeof(data));

    ck_assert_int_eq(flight_set_meta(NULL, "m", 1), COALESCE_EINVAL);
    ck_assert_int_eq(flight_set_meta(w, NULL, 5), COALESCE_EINVAL);
    ck_assert_int_eq(flight_write(NULL, data, 1), COALESCE_EINVAL);
    ck_assert_int_eq(flight_write(w, NULL, 5), COALESCE_EINVAL);
    ck_assert_int_eq(flight_write_buf(NULL, NULL, 0, 1), COALESCE_EINVAL);
    ck_assert_int_eq(flight_write_buf(w, NULL, 0, 1), COALESCE_EINVAL);
    ck_assert_int_eq(flight_end(NULL, 0), COALESCE_EINVAL);
    ck_assert_int_eq(flight_end(w, 1), COALESCE_EINVAL);
    ck_assert_int_eq(flight_end(w, 12345), COALESCE_EINVAL);
    ck_assert_int_eq(flight_write(w, data, 0), 0); /* no-op */
    ck_assert_uint_eq(stats_of(g).bytes_written, 0);

    coalesce_buf_t *b = NULL;
    ck_assert_int_eq(coalesce_buf_new(&b, 100), 0);
    ck_assert_int_eq(flight_write_buf(w, b, 101, 1), COALESCE_EINVAL);
    ck_assert_int_eq(flight_write_buf(w, b, 50, 51), COALESCE_EINVAL);
    ck_assert_int_eq(flight_write_buf(w, b, 1, SIZE_MAX), COALESCE_EINVAL);
    ck_assert_int_eq(flight_write_buf(w, b, SIZE_MAX, 2), COALESCE_EINVAL);

    ck_assert_int_eq(flight_set_meta(w, "meta", 4), 0);
    ck_assert_int_eq(flight_set_meta(w, "meta", 4), COALESCE_EINVAL);
    ck_assert_int_eq(flight_write(w, data, 1000), 0);
    ck_assert_int_eq(flight_set_meta(w, "late", 4), COALESCE_EINVAL);
    ck_assert_int_eq(flight_write(w, data + 1000, 2000), 0);
    ck_assert_int_eq(flight_end(w, 0), 0);
    /* After the end. */
    ck_assert_int_eq(flight_end(w, 0), COALESCE_EINVAL);
    ck_assert_int_eq(flight_end(w, COALESCE_EIO), COALESCE_EINVAL);
    ck_assert_int_eq(flight_write(w, data, 10), COALESCE_EINVAL);
    ck_assert_int_eq(flight_write_buf(w, b, 0, 10), COALESCE_EINVAL);
    ck_assert_int_eq(flight_set_meta(w, "x", 1), COALESCE_EINVAL);
    coalesce_buf_unref(b);
    flight_writer_release(w);
    flight_writer_release(NULL);

    /* None of the refused calls changed the stream. */
    const void *m = NULL;
    size_t ml = 0;
    ck_assert_int_eq(flight_meta(r, 0, &m, &ml), 0);
    ck_assert_uint_eq(ml, 4);
    ck_assert_mem_eq(m, "meta", 4);
    ASSERT_BODY(read_all(r, PAT(f.seed), 0), COALESCE_EOF, 3000);
    flight_reader_close(r);
    ck_assert_uint_eq(stats_of(g).bytes_written, 3000);
    ck_assert_uint_eq(stats_of(g).errors, 0);
    FINISH(g);
}
END_TEST

static void never_cb(flight_reader_t *r, void *data)
{
    (void)r;
    atomic_fetch_add((atomic_int *)data, 1);
}

START_TEST(test_fl12_reader_misuse)
{
    LEAK_START();
    flight_group_t *g = group_default();
    fetch_ctx_t f;
    fetch_init(&f, F_ASYNC, 135, 2000);
    flight_reader_t *r = join(g, "rmisuse", &f, 0);
    flight_writer_t *w = writer_of(&f);
    unsigned char buf[64];
    size_t n = 0;
    const void *d = NULL;
    coalesce_buf_t *owner = NULL;
    atomic_int fired;
    atomic_init(&fired, 0);

    ck_assert_int_eq(flight_meta(NULL, 0, NULL, NULL), COALESCE_EINVAL);
    ck_assert_int_eq(flight_read(NULL, buf, sizeof(buf), 0, &n),
                     COALESCE_EINVAL);
    ck_assert_int_eq(flight_read(r, NULL, sizeof(buf), 0, &n), COALESCE_EINVAL);
    ck_assert_int_eq(flight_read(r, buf, 0, 0, &n), COALESCE_EINVAL);
    ck_assert_int_eq(flight_read(r, buf, sizeof(buf), 0, NULL),
                     COALESCE_EINVAL);
    ck_assert_int_eq(flight_peek(NULL, 0, &d, &n, &owner), COALESCE_EINVAL);
    ck_assert_int_eq(flight_peek(r, 0, NULL, &n, &owner), COALESCE_EINVAL);
    ck_assert_int_eq(flight_peek(r, 0, &d, NULL, &owner), COALESCE_EINVAL);
    ck_assert_int_eq(flight_consume(NULL, 0), COALESCE_EINVAL);
    ck_assert_int_eq(flight_consume(r, 1), COALESCE_EINVAL); /* no peek */
    ck_assert_int_eq(flight_reader_notify(NULL, never_cb, &fired),
                     COALESCE_EINVAL);
    ck_assert_int_eq(flight_reader_notify(r, NULL, &fired), COALESCE_EINVAL);
    ck_assert_uint_eq(flight_reader_offset(NULL), 0);
    ck_assert_int_eq(flight_reader_shared(NULL), 0);
    flight_reader_close(NULL);

    ck_assert_int_eq(write_pattern(w, f.seed, 0, 1000, 1000), 0);
    ck_assert_int_eq(flight_peek(r, 0, &d, &n, &owner), 0);
    ck_assert_uint_eq(n, 1000);
    ck_assert_int_eq(flight_consume(r, n + 1), COALESCE_EINVAL);
    ck_assert_uint_eq(flight_reader_offset(r), 0);
    ck_assert_int_eq(flight_consume(r, 400), 0);
    ck_assert_int_eq(flight_consume(r, 601), COALESCE_EINVAL);
    ck_assert_uint_eq(flight_reader_offset(r), 400);
    ck_assert_int_eq(write_pattern(w, f.seed, 1000, 1000, 1000), 0);
    ck_assert_int_eq(flight_end(w, 0), 0);
    flight_writer_release(w);
    ASSERT_BODY(read_all(r, PAT(f.seed), 400), COALESCE_EOF, 1600);
    ck_assert_int_eq(atomic_load(&fired), 0);
    flight_reader_close(r);
    FINISH(g);
}
END_TEST

/* --- Allocation failures -------------------------------------------------- */

START_TEST(test_alloc_group_new)
{
    LEAK_START();
    int injected = 0;
    bool done = false;
    flight_opts_t o;
    flight_opts_init(&o);
    for (long i = 0; i < MAX_INJECT && !done; i++) {
        flight_group_t *g = SENTINEL(flight_group_t);
        test_alloc_fail_after(i);
        int rc = flight_group_new(&g, &o);
        int failed = test_alloc_failed();
        test_alloc_fail_after(-1);
        if (failed) {
            injected++;
            ck_assert_int_eq(rc, COALESCE_ENOMEM);
            ck_assert_ptr_eq(g, SENTINEL(flight_group_t));
            LEAK_CHECK();
        } else {
            ck_assert_int_eq(rc, 0);
            done = true;
            flight_group_close(g);
            LEAK_CHECK();
        }
    }
    ck_assert_int_eq(done, 1);
    ck_assert_int_gt(injected, 0);
    LEAK_CHECK();
}
END_TEST

START_TEST(test_alloc_do_leader)
{
    LEAK_START();
    int injected = 0;
    bool done = false;
    for (long i = 0; i < MAX_INJECT && !done; i++) {
        flight_group_t *g = group_default();
        fetch_ctx_t f;
        fetch_init(&f, F_ASYNC, 141, 0);
        flight_reader_t *r = SENTINEL(flight_reader_t);
        test_alloc_fail_after(i);
        int rc = flight_do(g, "lead", 4, fetch_cb, &f, &r);
        int failed = test_alloc_failed();
        test_alloc_fail_after(-1);
        if (failed) {
            injected++;
            ck_assert_int_eq(rc, COALESCE_ENOMEM);
            ck_assert_int_eq(atomic_load(&f.calls), 0);
            ck_assert_ptr_eq(r, SENTINEL(flight_reader_t));
            flight_stats_t s = stats_of(g);
            ck_assert_uint_eq(s.flights_started, 0);
            ck_assert_uint_eq(s.joins, 0);
            assert_idle(g);
            /* Usable: a retry leads a fresh flight. */
            r = join(g, "lead", &f, 0);
        } else {
            ck_assert_int_eq(rc, 0);
            done = true;
        }
        ck_assert_int_eq(atomic_load(&f.calls), 1);
        flight_writer_t *w = writer_of(&f);
        ck_assert_int_eq(write_pattern(w, 141, 0, 100, 100), 0);
        ck_assert_int_eq(flight_end(w, 0), 0);
        flight_writer_release(w);
        ASSERT_BODY(read_all(r, PAT(141), 0), COALESCE_EOF, 100);
        flight_reader_close(r);
        assert_idle(g);
        flight_group_close(g);
        LEAK_CHECK();
    }
    ck_assert_int_eq(done, 1);
    ck_assert_int_gt(injected, 0);
}
END_TEST

START_TEST(test_alloc_do_joiner)
{
    LEAK_START();
    bool done = false;
    for (long i = 0; i < MAX_INJECT && !done; i++) {
        flight_group_t *g = group_default();
        fetch_ctx_t f;
        fetch_init(&f, F_ASYNC, 142, 0);
        flight_reader_t *lead = join(g, "joiner", &f, 0);
        flight_writer_t *w = writer_of(&f);
        ck_assert_int_eq(write_pattern(w, 142, 0, 500, 500), 0);
        flight_reader_t *r = SENTINEL(flight_reader_t);
        test_alloc_fail_after(i);
        int rc = flight_do(g, "joiner", 6, fetch_cb, &f, &r);
        int failed = test_alloc_failed();
        test_alloc_fail_after(-1);
        if (failed) {
            ck_assert_int_eq(rc, COALESCE_ENOMEM);
            ck_assert_ptr_eq(r, SENTINEL(flight_reader_t));
            ck_assert_int_eq(atomic_load(&f.calls), 1);
            ck_assert_uint_eq(flight_writer_readers(w), 1);
            flight_stats_t s = stats_of(g);
            ck_assert_uint_eq(s.joins, 0);
            ck_assert_uint_eq(s.readers_open, 1);
            ck_assert_uint_eq(s.flights_started, 1);
            r = join(g, "joiner", &f, 1);
        } else {
            ck_assert_int_eq(rc, 0);
            ck_assert_int_eq(flight_reader_shared(r), 1);
            done = true;
        }
        ck_assert_int_eq(atomic_load(&f.calls), 1);
        ck_assert_uint_eq(flight_writer_readers(w), 2);
        ck_assert_int_eq(write_pattern(w, 142, 500, 500, 500), 0);
        ck_assert_int_eq(flight_end(w, 0), 0);
        flight_writer_release(w);
        ASSERT_BODY(read_all(r, PAT(142), 0), COALESCE_EOF, 1000);
        ASSERT_BODY(read_all(lead, PAT(142), 0), COALESCE_EOF, 1000);
        flight_reader_close(r);
        flight_reader_close(lead);
        assert_idle(g);
        flight_group_close(g);
        LEAK_CHECK();
    }
    ck_assert_int_eq(done, 1);
}
END_TEST

/* op 0: flight_write, 1: flight_write_buf, 2: flight_set_meta. */
static void alloc_writer_op(int op)
{
    LEAK_START();
    const size_t first = 1000, big = 256 * KiB;
    bool done = false;
    unsigned char *data = pattern_new(143, first + big);
    for (long i = 0; i < MAX_INJECT && !done; i++) {
        flight_group_t *g = group_default();
        fetch_ctx_t f;
        fetch_init(&f, F_ASYNC, 143, 0);
        flight_reader_t *r = join(g, "wr", &f, 0);
        flight_writer_t *w = writer_of(&f);
        flight_reader_t *j = join(g, "wr", &f, 1);
        coalesce_buf_t *b = NULL;
        if (op == 1) {
            ck_assert_int_eq(coalesce_buf_new(&b, big + 10), 0);
            memcpy((unsigned char *)coalesce_buf_mutable(b) + 10, data + first,
                   big);
        }
        static const char meta[] = "HTTP/1.1 200 OK\r\nX-Long: "
                                   "0123456789012345678901234567890123456789";
        if (op != 2)
            ck_assert_int_eq(flight_write(w, data, first), 0);
        flight_stats_t before = stats_of(g);

        test_alloc_fail_after(i);
        int rc;
        if (op == 0)
            rc = flight_write(w, data + first, big);
        else if (op == 1)
            rc = flight_write_buf(w, b, 10, big);
        else
            rc = flight_set_meta(w, meta, sizeof(meta));
        int failed = test_alloc_failed();
        test_alloc_fail_after(-1);
        if (failed) {
            ck_assert_int_eq(rc, COALESCE_ENOMEM);
            flight_stats_t s = stats_of(g);
            ck_assert_uint_eq(s.bytes_written, before.bytes_written);
            ck_assert_uint_eq(s.bytes_held, before.bytes_held);
            ck_assert_uint_eq(s.segments_held, before.segments_held);
            if (op == 2)
                ck_assert_int_eq(flight_meta(j, 0, NULL, NULL),
                                 COALESCE_EAGAIN);
            /* Nothing changed: the retry succeeds. */
            if (op == 0)
                rc = flight_write(w, data + first, big);
            else if (op == 1)
                rc = flight_write_buf(w, b, 10, big);
            else
                rc = flight_set_meta(w, meta, sizeof(meta));
        } else {
            done = true;
        }
        ck_assert_int_eq(rc, 0);
        coalesce_buf_unref(b);
        if (op == 2)
            ck_assert_int_eq(flight_write(w, data, first + big), 0);
        ck_assert_int_eq(flight_end(w, 0), 0);
        flight_writer_release(w);
        if (op == 2) {
            const void *m = NULL;
            size_t ml = 0;
            ck_assert_int_eq(flight_meta(r, 0, &m, &ml), 0);
            ck_assert_uint_eq(ml, sizeof(meta));
            ck_assert_mem_eq(m, meta, sizeof(meta));
        }
        ASSERT_BODY(read_all(r, PAT(143), 0), COALESCE_EOF, first + big);
        ASSERT_BODY(peek_all(j, PAT(143), 0), COALESCE_EOF, first + big);
        flight_reader_close(r);
        flight_reader_close(j);
        assert_idle(g);
        flight_group_close(g);
        LEAK_CHECK();
    }
    free(data);
    ck_assert_int_eq(done, 1);
}

START_TEST(test_alloc_write)
{
    alloc_writer_op(0);
}
END_TEST

START_TEST(test_alloc_write_buf)
{
    alloc_writer_op(1);
}
END_TEST

START_TEST(test_alloc_set_meta)
{
    alloc_writer_op(2);
}
END_TEST

/* --- Zero copy ------------------------------------------------------------ */

static void count_free(void *ptr, void *data)
{
    (void)ptr;
    atomic_fetch_add((atomic_int *)data, 1);
}

START_TEST(test_zero_copy_peek)
{
    LEAK_START();
    const size_t off = 100, len = 30000;
    flight_group_t *g = group_default();
    fetch_ctx_t f;
    flight_writer_t *w;
    flight_reader_t *l = async_flight(g, "zc", &f, 151, &w);
    flight_reader_t *j1 = join(g, "zc", &f, 1);
    flight_reader_t *j2 = join(g, "zc", &f, 1);

    coalesce_buf_t *b = NULL;
    ck_assert_int_eq(coalesce_buf_new(&b, 64 * KiB), 0);
    unsigned char *mut = coalesce_buf_mutable(b);
    ck_assert_ptr_nonnull(mut);
    memset(mut, 0xCC, 64 * KiB);
    test_fill(mut + off, f.seed, 0, len);
    ck_assert_int_eq(flight_write_buf(w, b, off, len), 0);
    ck_assert_ptr_null(coalesce_buf_mutable(b)); /* published */
    const unsigned char *base = coalesce_buf_data(b);
    coalesce_buf_unref(b); /* the flight holds its own reference */

    /* Then a copied write and a wrapped buffer. */
    ck_assert_int_eq(write_pattern(w, f.seed, len, 5000, 5000), 0);
    static unsigned char wrapped[4000];
    test_fill(wrapped, f.seed, len + 5000, sizeof(wrapped));
    atomic_int freed;
    atomic_init(&freed, 0);
    coalesce_buf_t *wb = NULL;
    ck_assert_int_eq(coalesce_buf_new_wrap(&wb, wrapped, sizeof(wrapped),
                                           count_free, &freed),
                     0);
    ck_assert_int_eq(flight_write_buf(w, wb, 0, sizeof(wrapped)), 0);
    coalesce_buf_unref(wb);
    ck_assert_int_eq(flight_end(w, 0), 0);
    flight_writer_release(w);
    const uint64_t total = len + 5000 + sizeof(wrapped);

    /* Every reader borrows the writer's bytes. */
    flight_reader_t *rs[3] = {l, j1, j2};
    for (int i = 0; i < 3; i++) {
        const void *d = NULL;
        size_t n = 0;
        coalesce_buf_t *o = NULL;
        ck_assert_int_eq(flight_peek(rs[i], 0, &d, &n, &o), 0);
        ck_assert_ptr_eq(d, base + off);
        ck_assert_uint_eq(n, len);
        ck_assert_ptr_eq(o, b);
        ck_assert_ptr_eq(coalesce_buf_data(o), base);
    }
    ck_assert_int_eq(flight_consume(j1, 1000), 0);
    const void *d = NULL;
    size_t n = 0;
    ck_assert_int_eq(flight_peek(j1, 0, &d, &n, NULL), 0);
    ck_assert_ptr_eq(d, base + off + 1000);
    ck_assert_uint_eq(n, len - 1000);
    ASSERT_BODY(peek_all(j1, PAT(f.seed), 1000), COALESCE_EOF, total - 1000);

    /* j2 keeps the owner past consume and close. */
    coalesce_buf_t *o = NULL;
    ck_assert_int_eq(flight_peek(j2, 0, &d, &n, &o), 0);
    coalesce_buf_t *kept = coalesce_buf_ref(o);
    const unsigned char *kd = d;
    ck_assert_int_eq(flight_consume(j2, n), 0);
    while (flight_reader_offset(j2) < len + 5000) {
        uint64_t at = flight_reader_offset(j2);
        ck_assert_int_eq(flight_peek(j2, 0, &d, &n, &o), 0);
        ck_assert_ptr_ne(o, kept);
        ck_assert_uint_le(n, len + 5000 - at);
        ck_assert_int_eq(test_check(d, f.seed, at, n), 1);
        ck_assert_int_eq(flight_consume(j2, n), 0);
    }
    ck_assert_int_eq(flight_peek(j2, 0, &d, &n, &o), 0);
    ck_assert_ptr_eq(d, wrapped);
    ck_assert_uint_eq(n, sizeof(wrapped));
    ck_assert_int_eq(flight_consume(j2, n), 0);
    ck_assert_int_eq(flight_peek(j2, 0, &d, &n, &o), COALESCE_EOF);
    ASSERT_BODY(read_all(l, PAT(f.seed), 0), COALESCE_EOF, total);
    flight_reader_close(l);
    flight_reader_close(j1);
    flight_reader_close(j2);
    assert_idle(g);
    flight_group_close(g);
    ck_assert_int_eq(atomic_load(&freed), 1);
    /* The kept reference still holds the bytes. */
    ck_assert_ptr_eq(coalesce_buf_data(kept), base);
    ck_assert_int_eq(test_check(kd, f.seed, 0, len), 1);
    coalesce_buf_unref(kept);
    LEAK_CHECK();
}
END_TEST

/* --- Notify --------------------------------------------------------------- */

START_TEST(test_notify_basic)
{
    LEAK_START();
    flight_group_t *g = group_default();
    fetch_ctx_t f;
    flight_writer_t *w;
    flight_reader_t *r = async_flight(g, "notify", &f, 161, &w);
    notify_ctx_t n, n1, n2;
    notify_init(&n);
    notify_init(&n1);
    notify_init(&n2);

    ck_assert_int_eq(flight_reader_notify(r, notify_cb, &n), 0);
    ck_assert_int_eq(flight_set_meta(w, "m", 1), 0);
    ck_assert_int_eq(atomic_load(&n.fired), 1);
    ck_assert_ptr_eq(atomic_load(&n.reader), r);
    ck_assert_int_ne(pthread_equal(n.thread, pthread_self()), 0);
    ck_assert_int_eq(flight_reader_notify(r, notify_cb, &n), 1);
    ck_assert_int_eq(flight_meta(r, 0, NULL, NULL), 0);
    ck_assert_int_eq(flight_reader_notify(r, notify_cb, &n), 0);
    ck_assert_int_eq(write_pattern(w, f.seed, 0, 1000, 1000), 0);
    ck_assert_int_eq(atomic_load(&n.fired), 2);
    ck_assert_int_eq(write_pattern(w, f.seed, 1000, 1000, 1000), 0);
    ck_assert_int_eq(atomic_load(&n.fired), 2); /* one shot */
    ck_assert_int_eq(flight_reader_notify(r, notify_cb, &n), 1);
    readres_t rr = drain(r, PAT(f.seed), 0);
    ck_assert_int_eq(rr.status, COALESCE_EAGAIN);
    ck_assert_uint_eq(rr.got, 2000);
    /* Arming replaces the previous arming. */
    ck_assert_int_eq(flight_reader_notify(r, notify_cb, &n1), 0);
    ck_assert_int_eq(flight_reader_notify(r, notify_cb, &n2), 0);
    ck_assert_int_eq(write_pattern(w, f.seed, 2000, 10, 10), 0);
    ck_assert_int_eq(atomic_load(&n1.fired), 0);
    ck_assert_int_eq(atomic_load(&n2.fired), 1);
    rr = drain(r, PAT(f.seed), 2000);
    ck_assert_uint_eq(rr.got, 10);
    /* The end wakes it. */
    ck_assert_int_eq(flight_reader_notify(r, notify_cb, &n), 0);
    ck_assert_int_eq(flight_end(w, 0), 0);
    ck_assert_int_eq(atomic_load(&n.fired), 3);
    ck_assert_int_eq(flight_reader_notify(r, notify_cb, &n), 1);
    assert_terminal(r, COALESCE_EOF);
    ck_assert_int_eq(flight_reader_notify(r, notify_cb, &n), 1);
    flight_writer_release(w);
    ck_assert_int_eq(atomic_load(&n.fired), 3);
    ck_assert_int_eq(atomic_load(&n1.fired), 0);
    flight_reader_close(r);
    FINISH(g);
}
END_TEST

/* Detach and a released writer also wake an armed reader. */
START_TEST(test_notify_detach_and_error)
{
    LEAK_START();
    flight_group_t *g =
        group_with(64 * KiB, 16 * KiB, 0, FLIGHT_ORPHAN_CONTINUE);
    fetch_ctx_t f;
    flight_writer_t *w;
    flight_reader_t *l = async_flight(g, "nd", &f, 162, &w);
    flight_reader_t *j = join(g, "nd", &f, 1);
    notify_ctx_t nl, nj;
    notify_init(&nl);
    notify_init(&nj);
    ck_assert_int_eq(flight_reader_notify(l, notify_cb, &nl), 0);
    ck_assert_int_eq(flight_reader_notify(j, notify_cb, &nj), 0);
    /* One write of more than max_lag detaches nobody who had caught up: it
     * notifies them of the data. */
    ck_assert_int_eq(write_pattern(w, f.seed, 0, 128 * KiB, 128 * KiB), 0);
    ck_assert_int_eq(atomic_load(&nl.fired), 1);
    ck_assert_int_eq(atomic_load(&nj.fired), 1);
    ck_assert_uint_eq(stats_of(g).lagged, 0);
    /* Neither reads: the next write finds both more than max_lag behind its
     * start (ASYNC, so max_lag applies to the leader's reader too). */
    ck_assert_int_eq(write_pattern(w, f.seed, 128 * KiB, 1000, 1000), 0);
    ck_assert_uint_eq(stats_of(g).lagged, 2);
    ck_assert_int_eq(flight_reader_notify(j, notify_cb, &nj), 1);
    assert_terminal(j, FLIGHT_ELAGGED);
    ck_assert_int_eq(flight_reader_notify(l, notify_cb, &nl), 1);
    assert_terminal(l, FLIGHT_ELAGGED);
    ck_assert_int_eq(write_pattern(w, f.seed, 128 * KiB + 1000, 1000, 1000), 0);
    ck_assert_int_eq(flight_end(w, 0), 0);
    flight_writer_release(w);
    ck_assert_int_eq(atomic_load(&nl.fired), 1);
    ck_assert_int_eq(atomic_load(&nj.fired), 1);
    flight_reader_close(j);
    flight_reader_close(l);

    /* A writer released without flight_end(): EUPSTREAM wakes the reader. */
    fetch_ctx_t f2;
    fetch_init(&f2, F_ASYNC, 164, 0);
    flight_reader_t *l2 = join(g, "nd2", &f2, 0);
    notify_ctx_t n2;
    notify_init(&n2);
    ck_assert_int_eq(flight_reader_notify(l2, notify_cb, &n2), 0);
    flight_writer_release(writer_of(&f2));
    ck_assert_int_eq(atomic_load(&n2.fired), 1);
    ck_assert_int_eq(flight_reader_notify(l2, notify_cb, &n2), 1);
    assert_terminal(l2, COALESCE_EUPSTREAM);
    flight_reader_close(l2);
    ck_assert_int_eq(atomic_load(&n2.fired), 1);
    FINISH(g);
}
END_TEST

/*
 * A reader that reads the body and never calls flight_meta() (no meta was
 * set): once it has read everything, nothing is new, so arming must
 * succeed; otherwise an event-loop host spins on "ready" while every read
 * returns COALESCE_EAGAIN.
 */
START_TEST(test_notify_body_reader_without_meta)
{
    LEAK_START();
    flight_group_t *g = group_default();
    fetch_ctx_t f;
    flight_writer_t *w;
    flight_reader_t *r = async_flight(g, "nometa-notify", &f, 165, &w);
    notify_ctx_t n;
    notify_init(&n);
    ck_assert_int_eq(write_pattern(w, f.seed, 0, 1000, 1000), 0);
    ASSERT_BODY(drain(r, PAT(f.seed), 0), COALESCE_EAGAIN, 1000);
    ck_assert_int_eq(flight_reader_notify(r, notify_cb, &n), 0);
    ck_assert_int_eq(write_pattern(w, f.seed, 1000, 1000, 1000), 0);
    ck_assert_int_eq(atomic_load(&n.fired), 1);
    ASSERT_BODY(drain(r, PAT(f.seed), 1000), COALESCE_EAGAIN, 1000);
    ck_assert_int_eq(flight_end(w, 0), 0);
    flight_writer_release(w);
    assert_terminal(r, COALESCE_EOF);
    flight_reader_close(r);
    FINISH(g);
}
END_TEST

typedef struct wthread_arg {
    flight_writer_t *w;
    uint64_t seed;
    uint64_t off;
    size_t len;
    size_t chunk;
    bool end;
    bool release;
    int rc;
    pthread_t self;
} wthread_arg_t;

static void *writer_thread(void *p)
{
    wthread_arg_t *a = p;
    a->self = pthread_self();
    a->rc = write_pattern(a->w, a->seed, a->off, a->len, a->chunk);
    if (a->rc == 0 && a->end)
        a->rc = flight_end(a->w, 0);
    if (a->release)
        flight_writer_release(a->w);
    return NULL;
}

/* The callback runs on the writer's thread, once per arming. */
START_TEST(test_notify_from_writer_thread)
{
    LEAK_START();
    flight_group_t *g = group_default();
    fetch_ctx_t f;
    flight_writer_t *w;
    flight_reader_t *r = async_flight(g, "nt", &f, 163, &w);
    notify_ctx_t n;
    notify_init(&n);
    ck_assert_int_eq(flight_reader_notify(r, notify_cb, &n), 0);
    wthread_arg_t a = {.w = w, .seed = f.seed, .len = 3000, .chunk = 1000};
    pthread_t th;
    ck_assert_int_eq(pthread_create(&th, NULL, writer_thread, &a), 0);
    pthread_join(th, NULL);
    ck_assert_int_eq(a.rc, 0);
    ck_assert_int_eq(atomic_load(&n.fired), 1);
    ck_assert_int_ne(pthread_equal(n.thread, a.self), 0);
    ck_assert_ptr_eq(atomic_load(&n.reader), r);

    /* An event-loop style reader: read with timeout 0, arm, wait. */
    counter_t sig;
    counter_init(&sig);
    notify_ctx_t n2;
    notify_init(&n2);
    n2.signal = &sig;
    wthread_arg_t b = {.w = w,
                       .seed = f.seed,
                       .off = 3000,
                       .len = 200 * KiB,
                       .chunk = 1000,
                       .end = true,
                       .release = true};
    ck_assert_int_eq(pthread_create(&th, NULL, writer_thread, &b), 0);
    uint64_t got = 0;
    long waits = 0;
    int status;
    for (;;) {
        readres_t rr = drain(r, PAT(f.seed), got);
        ck_assert_int_eq(rr.ok, 1);
        got += rr.got;
        if (rr.status != COALESCE_EAGAIN) {
            status = rr.status;
            break;
        }
        int armed = flight_reader_notify(r, notify_cb, &n2);
        ck_assert_int_ge(armed, 0);
        if (armed == 0)
            counter_wait(&sig, ++waits);
    }
    pthread_join(th, NULL);
    ck_assert_int_eq(b.rc, 0);
    ck_assert_int_eq(status, COALESCE_EOF);
    ck_assert_uint_eq(got, 3000 + 200 * KiB);
    ck_assert_int_eq(atomic_load(&n2.fired), waits);
    flight_reader_close(r);
    assert_idle(g);
    flight_group_close(g);
    counter_destroy(&sig);
    LEAK_CHECK();
}
END_TEST

#define RACE_READERS 100
#define RACE_CHUNK   256

typedef struct paced_arg {
    flight_writer_t *w;
    counter_t *go;
    int rc;
} paced_arg_t;

/* Writes 4 chunks each time go is incremented, racing the main thread. */
static void *paced_writer(void *p)
{
    paced_arg_t *a = p;
    unsigned char buf[RACE_CHUNK];
    uint64_t off = 0;
    for (long i = 1; i <= RACE_READERS && a->rc == 0; i++) {
        counter_wait(a->go, i);
        for (int c = 0; c < 4 && a->rc == 0; c++) {
            test_fill(buf, 171, off, sizeof(buf));
            a->rc = flight_write(a->w, buf, sizeof(buf));
            off += sizeof(buf);
        }
    }
    int rc = flight_end(a->w, 0);
    if (a->rc == 0)
        a->rc = rc;
    flight_writer_release(a->w);
    return NULL;
}

/*
 * Never a callback after flight_reader_close() returned: each reader is
 * armed, then the writer thread is let go while the main thread closes the
 * reader; the callback checks that the close has not returned yet.
 */
START_TEST(test_notify_never_after_close)
{
    LEAK_START();
    flight_group_t *g = group_with(FLIGHT_UNLIMITED, FLIGHT_UNLIMITED, 0,
                                   FLIGHT_ORPHAN_CONTINUE);
    fetch_ctx_t f;
    fetch_init(&f, F_ASYNC, 171, 0);
    flight_reader_t *rs[RACE_READERS];
    rs[0] = join(g, "race", &f, 0);
    for (int i = 1; i < RACE_READERS; i++)
        rs[i] = join(g, "race", &f, 1);
    notify_ctx_t *n = calloc(RACE_READERS, sizeof(*n));
    ck_assert_ptr_nonnull(n);
    atomic_int violations;
    atomic_init(&violations, 0);
    counter_t go;
    counter_init(&go);
    paced_arg_t pa = {.w = writer_of(&f), .go = &go};
    pthread_t th;
    ck_assert_int_eq(pthread_create(&th, NULL, paced_writer, &pa), 0);

    for (int i = 0; i < RACE_READERS; i++) {
        notify_init(&n[i]);
        n[i].violations = &violations;
        n[i].spin = true;
        uint64_t got = 0;
        int armed = 1;
        for (long tries = 0; armed == 1; tries++) {
            ck_assert_int_lt(tries, 1000000);
            readres_t rr =
                read_upto(rs[i], PAT(171), got, UINT64_MAX, 64 * KiB, 0);
            ck_assert_int_eq(rr.ok, 1);
            ck_assert_int_eq(rr.status, COALESCE_EAGAIN);
            got += rr.got;
            /* As a host would: take the meta (none here) once it is known,
             * so the meta stage is not "something new" (see
             * test_notify_body_reader_without_meta). */
            int mrc = flight_meta(rs[i], 0, NULL, NULL);
            ck_assert(mrc == 0 || mrc == COALESCE_EAGAIN);
            armed = flight_reader_notify(rs[i], notify_cb, &n[i]);
            ck_assert_int_ge(armed, 0);
        }
        ck_assert_uint_le(got, (uint64_t)i * 4 * RACE_CHUNK);
        counter_add(&go, 1);        /* the writer wakes this reader ... */
        flight_reader_close(rs[i]); /* ... while it is being closed */
        atomic_store(&n[i].closed, 1);
        ck_assert_int_eq(atomic_load(&n[i].in_cb), 0);
    }
    pthread_join(th, NULL);
    ck_assert_int_eq(pa.rc, 0);
    ck_assert_int_eq(atomic_load(&violations), 0);
    for (int i = 0; i < RACE_READERS; i++)
        ck_assert_int_le(atomic_load(&n[i].fired), 1);
    free(n);
    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.bytes_written, RACE_READERS * 4 * RACE_CHUNK);
    /* 0 if the writer ended before the last close, else 1. */
    ck_assert_uint_le(s.orphaned, 1);
    assert_idle(g);
    flight_group_close(g);
    counter_destroy(&go);
    LEAK_CHECK();
}
END_TEST

/* flight_reader_close() from inside the reader's own notify callback. */
START_TEST(test_notify_close_from_callback)
{
    LEAK_START();
    flight_group_t *g = group_default();
    fetch_ctx_t f;
    fetch_init(&f, F_ASYNC, 172, 10000);
    flight_reader_t *l = join(g, "cfc", &f, 0);
    flight_writer_t *w = writer_of(&f);
    flight_reader_t *j = join(g, "cfc", &f, 1);
    flight_reader_t *j2 = join(g, "cfc", &f, 1);
    notify_ctx_t n, n2;
    notify_init(&n);
    notify_init(&n2);
    n.close_self = true;
    n2.close_self = true;
    ck_assert_int_eq(flight_reader_notify(j, notify_cb, &n), 0);
    /* On the writer's (this) thread. */
    ck_assert_int_eq(write_pattern(w, f.seed, 0, 5000, 5000), 0);
    ck_assert_int_eq(atomic_load(&n.fired), 1);
    ck_assert_int_eq(atomic_load(&n.closed), 1);
    ck_assert_uint_eq(flight_writer_readers(w), 2);
    /* On another thread. */
    ASSERT_BODY(drain(j2, PAT(f.seed), 0), COALESCE_EAGAIN, 5000);
    ck_assert_int_eq(flight_meta(j2, 0, NULL, NULL), 0);
    ck_assert_int_eq(flight_reader_notify(j2, notify_cb, &n2), 0);
    wthread_arg_t a = {
        .w = w, .seed = f.seed, .off = 5000, .len = 5000, .chunk = 5000};
    pthread_t th;
    ck_assert_int_eq(pthread_create(&th, NULL, writer_thread, &a), 0);
    pthread_join(th, NULL);
    ck_assert_int_eq(a.rc, 0);
    ck_assert_int_eq(atomic_load(&n2.fired), 1);
    ck_assert_int_eq(atomic_load(&n2.closed), 1);
    ck_assert_uint_eq(flight_writer_readers(w), 1);
    ck_assert_int_eq(flight_end(w, 0), 0);
    flight_writer_release(w);
    ASSERT_BODY(read_all(l, PAT(f.seed), 0), COALESCE_EOF, 10000);
    flight_reader_close(l);
    FINISH(g);
}
END_TEST

/* --- Group closed from inside the fetch callback -------------------------- */

START_TEST(test_fetch_closes_group)
{
    LEAK_START();
    flight_group_t *g = group_default();
    fetch_ctx_t f;
    fetch_init(&f, F_BODY, 181, 10 * KiB);
    f.close_group = g;
    flight_reader_t *r = join(g, "closer", &f, 0);
    ASSERT_BODY(read_all(r, PAT(f.seed), 0), COALESCE_EOF, f.len);
    flight_reader_t *x = NULL;
    fetch_ctx_t f2;
    fetch_init(&f2, F_BODY, 182, 10);
    ck_assert_int_eq(flight_do(g, "closer", 6, fetch_cb, &f2, &x),
                     COALESCE_ECLOSING);
    ck_assert_ptr_null(x);
    ck_assert_int_eq(atomic_load(&f2.calls), 0);
    flight_reader_close(r); /* the last one: frees the group */
    LEAK_CHECK();

    /* ASYNC: the writer outlives the reader and frees the group. */
    g = group_default();
    fetch_init(&f, F_ASYNC, 183, 0);
    f.close_group = g;
    r = join(g, "closer", &f, 0);
    flight_writer_t *w = writer_of(&f);
    ck_assert_int_eq(write_pattern(w, f.seed, 0, 1000, 100), 0);
    ck_assert_int_eq(flight_end(w, 0), 0);
    ASSERT_BODY(read_all(r, PAT(f.seed), 0), COALESCE_EOF, 1000);
    flight_reader_close(r);
    flight_writer_release(w);
    LEAK_CHECK();
}
END_TEST

/* --- Readers and writers handed between threads; timeouts ----------------- */

typedef struct rthread_arg {
    flight_reader_t *r;
    uint64_t seed;
    uint64_t start;
    uint64_t limit;
    bool close;
    readres_t res;
} rthread_arg_t;

static void *reader_thread(void *p)
{
    rthread_arg_t *a = p;
    a->res = read_upto(a->r, PAT(a->seed), a->start, a->limit, 3333, -1);
    if (a->close)
        flight_reader_close(a->r);
    return NULL;
}

START_TEST(test_handoff_and_timeouts)
{
    LEAK_START();
    flight_group_t *g = group_default();
    fetch_ctx_t f;
    flight_writer_t *w;
    flight_reader_t *r = async_flight(g, "handoff", &f, 191, &w);
    unsigned char buf[128];
    size_t n = 0;
    const void *d = NULL;

    /* Nothing yet: timeout 0 and a short timeout return EAGAIN. */
    ck_assert_int_eq(flight_meta(r, 0, NULL, NULL), COALESCE_EAGAIN);
    ck_assert_int_eq(flight_read(r, buf, sizeof(buf), 0, &n), COALESCE_EAGAIN);
    ck_assert_int_eq(flight_peek(r, 0, &d, &n, NULL), COALESCE_EAGAIN);
    ck_assert_int_eq(flight_read(r, buf, sizeof(buf), 20, &n), COALESCE_EAGAIN);
    ck_assert_int_eq(flight_meta(r, 20, NULL, NULL), COALESCE_EAGAIN);
    ck_assert_uint_eq(flight_reader_offset(r), 0);

    /* Writer on thread W1, reader on thread R1, concurrently. */
    const uint64_t part = 50 * KiB, total = 120 * KiB;
    wthread_arg_t wa = {.w = w, .seed = f.seed, .len = part, .chunk = 2000};
    rthread_arg_t ra = {.r = r, .seed = f.seed, .limit = part};
    pthread_t tw, tr;
    ck_assert_int_eq(pthread_create(&tw, NULL, writer_thread, &wa), 0);
    ck_assert_int_eq(pthread_create(&tr, NULL, reader_thread, &ra), 0);
    pthread_join(tw, NULL);
    pthread_join(tr, NULL);
    ck_assert_int_eq(wa.rc, 0);
    ASSERT_BODY(ra.res, 0, part);
    ck_assert_uint_eq(flight_reader_offset(r), part);
    ck_assert_int_eq(flight_read(r, buf, sizeof(buf), 0, &n), COALESCE_EAGAIN);

    /* Both handed on to new threads, which finish the stream. */
    wthread_arg_t wb = {.w = w,
                        .seed = f.seed,
                        .off = part,
                        .len = total - part,
                        .chunk = 3000,
                        .end = true,
                        .release = true};
    rthread_arg_t rb = {.r = r,
                        .seed = f.seed,
                        .start = part,
                        .limit = UINT64_MAX,
                        .close = true};
    ck_assert_int_eq(pthread_create(&tr, NULL, reader_thread, &rb), 0);
    ck_assert_int_eq(pthread_create(&tw, NULL, writer_thread, &wb), 0);
    pthread_join(tw, NULL);
    pthread_join(tr, NULL);
    ck_assert_int_eq(wb.rc, 0);
    ASSERT_BODY(rb.res, COALESCE_EOF, total - part);
    FINISH(g);
}
END_TEST

/* --- High concurrency ----------------------------------------------------- */

#define HC_THREADS 64
#define HC_ROUNDS  4
#define HC_KEYS    4
#define HC_LEN     (256 * KiB)

typedef struct hc_shared {
    flight_group_t *g;
    pthread_barrier_t bar;
    fetch_ctx_t f[HC_ROUNDS][HC_KEYS];
    unsigned char *body[HC_ROUNDS][HC_KEYS];
    atomic_int bad;
    atomic_int leaders;
    atomic_ullong delivered;
} hc_shared_t;

typedef struct hc_arg {
    hc_shared_t *s;
    int id;
} hc_arg_t;

static void *hc_thread(void *p)
{
    hc_arg_t *a = p;
    hc_shared_t *s = a->s;
    for (int round = 0; round < HC_ROUNDS; round++) {
        int k = (a->id + round) % HC_KEYS;
        char key[32];
        int kl = snprintf(key, sizeof(key), "hc/%d/%d", round, k);
        pthread_barrier_wait(&s->bar);
        flight_reader_t *r = NULL;
        if (flight_do(s->g, key, (size_t)kl, fetch_cb, &s->f[round][k], &r)) {
            atomic_fetch_add(&s->bad, 1);
            continue;
        }
        if (flight_reader_shared(r) == 0)
            atomic_fetch_add(&s->leaders, 1);
        const void *m = NULL;
        size_t ml = 0;
        if (flight_meta(r, -1, &m, &ml) != 0 || ml != 2 ||
            memcmp(m, "ok", 2) != 0)
            atomic_fetch_add(&s->bad, 1);
        body_t b = {.bytes = s->body[round][k], .len = HC_LEN};
        readres_t res = (a->id & 1) ? peek_all(r, &b, 0)
                                    : read_upto(r, &b, 0, UINT64_MAX,
                                                16 * KiB + (size_t)a->id, -1);
        if (res.status != COALESCE_EOF || res.got != HC_LEN || !res.ok)
            atomic_fetch_add(&s->bad, 1);
        atomic_fetch_add(&s->delivered, res.got);
        flight_reader_close(r);
    }
    return NULL;
}

START_TEST(test_high_concurrency)
{
    LEAK_START();
    hc_shared_t *s = calloc(1, sizeof(*s));
    ck_assert_ptr_nonnull(s);
    s->g = group_default();
    pthread_barrier_init(&s->bar, NULL, HC_THREADS);
    atomic_init(&s->bad, 0);
    atomic_init(&s->leaders, 0);
    atomic_init(&s->delivered, 0);
    for (int round = 0; round < HC_ROUNDS; round++)
        for (int k = 0; k < HC_KEYS; k++) {
            uint64_t seed = 2000 + (uint64_t)(round * HC_KEYS + k);
            fetch_init(&s->f[round][k], F_BODY, seed, HC_LEN);
            s->f[round][k].meta = "ok";
            s->f[round][k].body = s->body[round][k] = pattern_new(seed, HC_LEN);
        }
    hc_arg_t a[HC_THREADS];
    pthread_t th[HC_THREADS];
    for (int i = 0; i < HC_THREADS; i++) {
        a[i] = (hc_arg_t){.s = s, .id = i};
        ck_assert_int_eq(pthread_create(&th[i], NULL, hc_thread, &a[i]), 0);
    }
    for (int i = 0; i < HC_THREADS; i++)
        pthread_join(th[i], NULL);

    ck_assert_int_eq(atomic_load(&s->bad), 0);
    uint64_t fetches = 0;
    for (int round = 0; round < HC_ROUNDS; round++)
        for (int k = 0; k < HC_KEYS; k++) {
            int c = atomic_load(&s->f[round][k].calls);
            ck_assert_int_ge(c, 1);
            ck_assert_int_eq(atomic_load(&s->f[round][k].bad_rc), 0);
            fetches += (uint64_t)c;
        }
    flight_stats_t st = stats_of(s->g);
    const uint64_t calls = (uint64_t)HC_THREADS * HC_ROUNDS;
    ck_assert_uint_eq(st.flights_started, fetches);
    ck_assert_uint_eq((uint64_t)atomic_load(&s->leaders), fetches);
    ck_assert_uint_eq(st.flights_started + st.joins, calls);
    ck_assert_uint_eq(st.bytes_written, fetches * HC_LEN);
    ck_assert_uint_eq(st.bytes_delivered, calls * HC_LEN);
    ck_assert_uint_eq(atomic_load(&s->delivered), calls * HC_LEN);
    ck_assert_uint_eq(st.errors, 0);
    ck_assert_uint_eq(st.lagged, 0);
    assert_idle(s->g);
    flight_group_close(s->g);
    pthread_barrier_destroy(&s->bar);
    for (int round = 0; round < HC_ROUNDS; round++)
        for (int k = 0; k < HC_KEYS; k++)
            free(s->body[round][k]);
    free(s);
    LEAK_CHECK();
}
END_TEST

/* --- Regressions found in review -------------------------------------- */

/* The callback ends and releases its writer, then (wrongly but harmlessly)
 * says ASYNC: no writer reference may be left behind. */
static int fetch_release_then_async(flight_writer_t *w, void *data)
{
    (void)data;
    ck_assert_int_eq(flight_write(w, "ab", 2), 0);
    ck_assert_int_eq(flight_end(w, 0), 0);
    flight_writer_release(w);
    return FLIGHT_FETCH_ASYNC;
}

START_TEST(test_review_release_inside_callback)
{
    LEAK_START();
    flight_group_t *g = group_default();
    flight_reader_t *r;
    ck_assert_int_eq(flight_do(g, "rel", 3, fetch_release_then_async, NULL, &r),
                     0);
    unsigned char b[8];
    size_t n = 0;
    ck_assert_int_eq(flight_read(r, b, sizeof(b), -1, &n), 0);
    ck_assert_uint_eq(n, 2);
    ck_assert_int_eq(flight_read(r, b, sizeof(b), -1, &n), COALESCE_EOF);
    flight_reader_close(r);
    FINISH(g); /* The leak check fails if the flight was kept. */
}
END_TEST

/* After FLIGHT_FETCH_ASYNC the leader's reader is allowed max_lag on top of
 * the callback's backlog, not an unbounded lag. */
static int fetch_one_byte_async(flight_writer_t *w, void *data)
{
    *(flight_writer_t **)data = w;
    ck_assert_int_eq(flight_write(w, "x", 1), 0);
    return FLIGHT_FETCH_ASYNC;
}

START_TEST(test_review_leader_async_lag_bounded)
{
    LEAK_START();
    flight_group_t *g = group_with(4 * KiB, 4 * KiB, 0, FLIGHT_ORPHAN_CONTINUE);
    flight_writer_t *w = NULL;
    flight_reader_t *r;
    ck_assert_int_eq(flight_do(g, "lag", 3, fetch_one_byte_async, &w, &r), 0);
    ck_assert_int_eq(write_pattern(w, 7, 1, 64 * KiB, 1 * KiB), 0);
    flight_stats_t st = stats_of(g);
    ck_assert_uint_eq(st.lagged, 1);
    ck_assert_uint_le(st.bytes_held, 4 * KiB + 2 * KiB + 1);
    assert_terminal(r, FLIGHT_ELAGGED);
    ck_assert_uint_eq(flight_reader_offset(r), 0);
    ck_assert_int_eq(flight_end(w, 0), 0);
    flight_writer_release(w);
    flight_reader_close(r);
    FINISH(g);
}
END_TEST

/* End codes that readers use for a live stream are translated: EAGAIN would
 * otherwise leave every reader waiting, EOF is a clean end. */
START_TEST(test_review_end_status_translation)
{
    LEAK_START();
    flight_group_t *g = group_default();
    fetch_ctx_t f;
    flight_writer_t *w;
    flight_reader_t *r = async_flight(g, "eagain", &f, 181, &w);
    ck_assert_int_eq(flight_end(w, COALESCE_EAGAIN), 0);
    flight_writer_release(w);
    const void *m;
    size_t ml;
    ck_assert_int_eq(flight_meta(r, -1, &m, &ml), COALESCE_EUPSTREAM);
    assert_terminal(r, COALESCE_EUPSTREAM);
    flight_reader_close(r);

    fetch_ctx_t f2;
    fetch_init(&f2, F_RET, 182, 0);
    f2.ret = COALESCE_EAGAIN;
    flight_reader_t *r2 = join(g, "eagain2", &f2, 0);
    assert_terminal(r2, COALESCE_EUPSTREAM);
    flight_reader_close(r2);

    fetch_ctx_t f3;
    fetch_init(&f3, F_RET, 183, 0);
    f3.ret = COALESCE_EOF;
    flight_reader_t *r3 = join(g, "eof", &f3, 0);
    ck_assert_int_eq(flight_meta(r3, -1, &m, &ml), 0);
    assert_terminal(r3, COALESCE_EOF);
    flight_reader_close(r3);
    ck_assert_uint_eq(stats_of(g).errors, 2);
    FINISH(g);
}
END_TEST

/* A notify that answers "ready" leaves nothing armed, not even an older
 * arming. */
START_TEST(test_review_ready_disarms)
{
    LEAK_START();
    flight_group_t *g =
        group_with(DEFAULT_MAX_LAG, DEFAULT_RETAIN, 20, FLIGHT_ORPHAN_CONTINUE);
    fetch_ctx_t f;
    flight_writer_t *w;
    flight_reader_t *l = async_flight(g, "disarm", &f, 184, &w);
    flight_reader_t *j = join(g, "disarm", &f, 1);
    notify_ctx_t a, b;
    notify_init(&a);
    notify_init(&b);
    ck_assert_int_eq(flight_reader_notify(j, notify_cb, &a), 0);
    /* The library's own wait runs out the waiter's deadline. */
    ck_assert_int_eq(flight_meta(j, 5000, NULL, NULL), FLIGHT_ETIMEDOUT);
    ck_assert_int_eq(atomic_load(&a.fired), 0); /* Not inside its own call. */
    ck_assert_int_eq(flight_reader_notify(j, notify_cb, &b), 1);
    ck_assert_int_eq(flight_set_meta(w, "m", 1), 0);
    ck_assert_int_eq(atomic_load(&a.fired), 0);
    ck_assert_int_eq(atomic_load(&b.fired), 0);
    ck_assert_int_eq(flight_end(w, 0), 0);
    flight_writer_release(w);
    flight_reader_close(j);
    flight_reader_close(l);
    FINISH(g);
}
END_TEST

/*
 * Many armed readers whose owner re-arms them while the writer's
 * notifications are still being delivered: every write must return (the
 * writer never waits for readers) and every reader gets everything.
 */
#define REARM_READERS 100
#define REARM_WRITES  50

typedef struct rearm {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    flight_reader_t *r[REARM_READERS];
    int ready[REARM_READERS];
    atomic_long callbacks;
    counter_t armed;
} rearm_t;

typedef struct rearm_slot {
    rearm_t *x;
    int i;
} rearm_slot_t;

static void rearm_cb(flight_reader_t *r, void *data)
{
    (void)r;
    rearm_slot_t *s = data;
    atomic_fetch_add(&s->x->callbacks, 1);
    pthread_mutex_lock(&s->x->mu);
    s->x->ready[s->i] = 1;
    pthread_cond_signal(&s->x->cv);
    pthread_mutex_unlock(&s->x->mu);
}

static void *rearm_owner(void *p)
{
    rearm_t *x = p;
    rearm_slot_t slots[REARM_READERS];
    uint64_t got[REARM_READERS] = {0};
    int done = 0, first = 1;
    for (int i = 0; i < REARM_READERS; i++)
        slots[i] = (rearm_slot_t){x, i};
    while (done < REARM_READERS) {
        int todo[REARM_READERS];
        pthread_mutex_lock(&x->mu);
        if (!first) {
            int any = 0;
            for (int i = 0; i < REARM_READERS; i++)
                any |= x->ready[i];
            while (!any) {
                pthread_cond_wait(&x->cv, &x->mu);
                for (int i = 0; i < REARM_READERS; i++)
                    any |= x->ready[i];
            }
        }
        for (int i = 0; i < REARM_READERS; i++) {
            todo[i] = first || x->ready[i];
            x->ready[i] = 0;
        }
        pthread_mutex_unlock(&x->mu);
        for (int i = 0; i < REARM_READERS; i++) {
            if (!todo[i] || !x->r[i])
                continue;
            for (;;) {
                const void *d;
                size_t n;
                int rc = flight_peek(x->r[i], 0, &d, &n, NULL);
                if (rc == 0) {
                    ck_assert(test_check(d, 185, got[i], n));
                    got[i] += n;
                    ck_assert_int_eq(flight_consume(x->r[i], n), 0);
                    continue;
                }
                if (rc == COALESCE_EAGAIN &&
                    flight_reader_notify(x->r[i], rearm_cb, &slots[i]) == 1)
                    continue;
                if (rc != COALESCE_EAGAIN) {
                    ck_assert_int_eq(rc, COALESCE_EOF);
                    ck_assert_uint_eq(got[i], REARM_WRITES * KiB);
                    flight_reader_close(x->r[i]);
                    x->r[i] = NULL;
                    done++;
                }
                break;
            }
        }
        if (first)
            counter_add(&x->armed, 1);
        first = 0;
    }
    return NULL;
}

START_TEST(test_review_many_armed_rearm)
{
    LEAK_START();
    flight_group_t *g = group_with(FLIGHT_UNLIMITED, FLIGHT_UNLIMITED, 0,
                                   FLIGHT_ORPHAN_CONTINUE);
    rearm_t x;
    memset(&x, 0, sizeof(x));
    pthread_mutex_init(&x.mu, NULL);
    pthread_cond_init(&x.cv, NULL);
    counter_init(&x.armed);
    fetch_ctx_t f;
    flight_writer_t *w;
    flight_reader_t *l = async_flight(g, "rearm", &f, 185, &w);
    for (int i = 0; i < REARM_READERS; i++)
        x.r[i] = join(g, "rearm", &f, 1);
    flight_reader_close(l);
    pthread_t t;
    ck_assert_int_eq(pthread_create(&t, NULL, rearm_owner, &x), 0);
    counter_wait(&x.armed, 1);
    for (int k = 0; k < REARM_WRITES; k++)
        ck_assert_int_eq(write_pattern(w, 185, (uint64_t)k * KiB, KiB, KiB), 0);
    ck_assert_int_eq(flight_end(w, 0), 0);
    flight_writer_release(w);
    pthread_join(t, NULL);
    /* At most one callback per reader per event (writes and the end). */
    ck_assert_int_le(atomic_load(&x.callbacks),
                     (long)REARM_READERS * (REARM_WRITES + 1));
    counter_destroy(&x.armed);
    pthread_cond_destroy(&x.cv);
    pthread_mutex_destroy(&x.mu);
    FINISH(g);
}
END_TEST

/* --- Suite ---------------------------------------------------------------- */

Suite *make_flight_suite(void)
{
    Suite *s = suite_create("flight");
    TCase *tc;

    tc = tcase(s, "FL-1 collapse", 5);
    tcase_add_test(tc, test_fl1_collapse_sync_fetch);
    tcase_add_test(tc, test_fl1_collapse_async_writer);

    tc = tcase(s, "FL-2 streaming", 5);
    tcase_add_test(tc, test_fl2_streaming);

    tc = tcase(s, "FL-3 idle reader", 10);
    tcase_add_test(tc, test_fl3_idle_reader_delays_nobody);

    tc = tcase(s, "FL-4 max_lag", 5);
    tcase_add_test(tc, test_fl4_max_lag_detach_and_bound);
    tcase_add_test(tc, test_fl4_leader_sync_fetch_not_lagged);
    tcase_add_test(tc, test_fl4_peeked_bytes_survive_detach);

    tc = tcase(s, "FL-5 readers leaving", 5);
    tcase_add_test(tc, test_fl5_reader_closes_mid_body);
    tcase_add_test(tc, test_fl5_leader_reader_closes_early);
    tcase_add_test(tc, test_fl5_orphan_cancel);
    tcase_add_test(tc, test_fl5_orphan_continue);
    tcase_add_test(tc, test_fl5_orphan_by_detach);

    tc = tcase(s, "FL-6 late joiners", 5);
    tcase_add_test(tc, test_fl6_late_joiner_reads_from_zero);
    tcase_add_test(tc, test_fl6_beyond_retain_starts_new_flight);
    tcase_add_test(tc, test_fl6_sequential_reuse);

    tc = tcase(s, "FL-7 errors", 5);
    tcase_add_test(tc, test_fl7_fetch_error_before_meta);
    tcase_add_test(tc, test_fl7_error_status_after_bytes);
    tcase_add_test(tc, test_fl7_writer_released_without_end);
    tcase_add_test(tc, test_fl7_sync_fetch_without_end);

    tc = tcase(s, "FL-8 wait_timeout", 5);
    tcase_add_test(tc, test_fl8_wait_timeout);
    tcase_add_test(tc, test_fl8_body_without_meta);

    tc = tcase(s, "FL-9 zero waiters", 5);
    tcase_add_test(tc, test_fl9_zero_waiters_no_delay);

    tc = tcase(s, "FL-10 keys", 5);
    tcase_add_test(tc, test_fl10_binary_keys);
    tcase_add_test(tc, test_fl10_key_isolation_concurrent);

    tc = tcase(s, "FL-11 stats", 5);
    tcase_add_test(tc, test_fl11_stats);

    tc = tcase(s, "FL-12 bad input", 5);
    tcase_add_test(tc, test_fl12_group_args);
    tcase_add_test(tc, test_fl12_do_args);
    tcase_add_test(tc, test_fl12_closing);
    tcase_add_test(tc, test_fl12_writer_misuse);
    tcase_add_test(tc, test_fl12_reader_misuse);

    tc = tcase(s, "FL-12 allocation failures", 10);
    tcase_add_test(tc, test_alloc_group_new);
    tcase_add_test(tc, test_alloc_do_leader);
    tcase_add_test(tc, test_alloc_do_joiner);
    tcase_add_test(tc, test_alloc_write);
    tcase_add_test(tc, test_alloc_write_buf);
    tcase_add_test(tc, test_alloc_set_meta);

    tc = tcase(s, "zero copy", 5);
    tcase_add_test(tc, test_zero_copy_peek);

    tc = tcase(s, "notify", 5);
    tcase_add_test(tc, test_notify_basic);
    tcase_add_test(tc, test_notify_detach_and_error);
    tcase_add_test(tc, test_notify_body_reader_without_meta);
    tcase_add_test(tc, test_notify_from_writer_thread);
    tcase_add_test(tc, test_notify_never_after_close);
    tcase_add_test(tc, test_notify_close_from_callback);

    tc = tcase(s, "review regressions", 10);
    tcase_add_test(tc, test_review_release_inside_callback);
    tcase_add_test(tc, test_review_leader_async_lag_bounded);
    tcase_add_test(tc, test_review_end_status_translation);
    tcase_add_test(tc, test_review_ready_disarms);
    tcase_add_test(tc, test_review_many_armed_rearm);

    tc = tcase(s, "group closed in fetch", 5);
    tcase_add_test(tc, test_fetch_closes_group);

    tc = tcase(s, "handoff and timeouts", 5);
    tcase_add_test(tc, test_handoff_and_timeouts);

    tc = tcase(s, "high concurrency", 10);
    tcase_add_test(tc, test_high_concurrency);

    return s;
}

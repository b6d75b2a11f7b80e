/*
 * Tests for the libuv adapter (include/coalesce/uv.h).
 *
 * Every test ends with every handle closed: uv_loop_close() must return 0,
 * the group idle and nothing leaked. Loops stop because their last handle
 * closed, never because a timer gave up waiting. Worker threads record what
 * they saw; the main thread asserts.
 */
#include "helpers.h"

#include <coalesce/uv.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { CLOSE_NONE, CLOSE_IN_META, CLOSE_IN_DATA, CLOSE_IN_END };

struct world;

/* One loop reader and what it saw. */
typedef struct rd {
    struct world *w;
    flight_uv_reader_t *ur;
    uint64_t seed;  /* the body's pattern */
    uint64_t start; /* object offset of the reader's first byte */
    uint64_t got;
    long metas, datas, ends, after; /* callbacks; after = past end/close */
    int status;
    bool bad;    /* a byte, an order or a zero-copy pointer was wrong */
    bool closed; /* closed by the test */
    bool done;   /* counted in w->finished */
    int close_at;
    uint64_t close_after;   /* CLOSE_IN_DATA: once this many bytes arrived */
    struct rd *close_other; /* closed from this reader's first data cb */
    long stop_at_data;      /* read_stop after this data callback */
    const unsigned char *zc_base; /* expected data address of offset 0 */
    coalesce_buf_t *zc_owner;
    double t_end;        /* now_ms() of the end callback */
    uint64_t end_offset; /* flight_reader_offset() in the end callback */
    int restart_rc;      /* flight_uv_read_start() from the end callback */
} rd_t;

/* A loop, its adapter and the readers it serves (on the loop's thread). */
typedef struct world {
    uv_loop_t loop;
    flight_uv_t *u;
    rd_t *rds;
    int n;
    int finished; /* ended or closed */
    bool keep;    /* do not close the adapter when all finished */
    int close_rc; /* flight_uv_close() when all finished */
    pthread_t thread;
    uv_prepare_t turns; /* counts loop turns */
    long nturns;
} world_t;

static void finish(rd_t *x);

static void world_init(world_t *w, rd_t *rds, int n)
{
    memset(w, 0, sizeof(*w));
    ck_assert_int_eq(uv_loop_init(&w->loop), 0);
    ck_assert_int_eq(flight_uv_new(&w->u, &w->loop), 0);
    w->rds = rds;
    w->n = n;
    memset(rds, 0, sizeof(*rds) * (size_t)n);
    for (int i = 0; i < n; i++) {
        rds[i].w = w;
        rds[i].status = 1;
    }
}

static void on_turn(uv_prepare_t *h)
{
    ((world_t *)h->data)->nturns++;
}

static void count_turns(world_t *w)
{
    uv_prepare_init(&w->loop, &w->turns);
    w->turns.data = w;
    uv_prepare_start(&w->turns, on_turn);
}

/* All readers finished: close the readers, then the adapter, so that the
 * loop runs out of handles and uv_run() returns. */
static void world_wind_down(world_t *w)
{
    for (int i = 0; i < w->n; i++) {
        if (!w->rds[i].closed) {
            w->rds[i].closed = true;
            flight_uv_reader_close(w->rds[i].ur);
        }
    }
    if (uv_is_active((uv_handle_t *)&w->turns))
        uv_close((uv_handle_t *)&w->turns, NULL);
    if (!w->keep)
        w->close_rc = flight_uv_close(w->u);
}

static void finish(rd_t *x)
{
    if (x->done)
        return;
    x->done = true;
    if (++x->w->finished == x->w->n)
        world_wind_down(x->w);
}

static void close_rd(rd_t *x)
{
    x->closed = true;
    flight_uv_reader_close(x->ur);
    finish(x);
}

static void on_meta(flight_uv_reader_t *ur, const void *meta, size_t len)
{
    rd_t *x = flight_uv_reader_get_data(ur);
    (void)meta;
    (void)len;
    if (x->closed || x->ends)
        x->after++;
    if (x->datas)
        x->bad = true; /* meta after data */
    x->metas++;
    if (x->close_at == CLOSE_IN_META)
        close_rd(x);
}

static void on_data(flight_uv_reader_t *ur,
                    const void *data,
                    size_t len,
                    coalesce_buf_t *owner)
{
    rd_t *x = flight_uv_reader_get_data(ur);
    if (x->closed || x->ends)
        x->after++;
    if (len == 0 || !test_check(data, x->seed, x->start + x->got, len))
        x->bad = true;
    if (x->zc_base && ((const unsigned char *)data != x->zc_base + x->got ||
                       owner != x->zc_owner))
        x->bad = true;
    x->got += len;
    x->datas++;
    if (x->close_other && !x->close_other->closed) {
        close_rd(x->close_other);
        x->close_other = NULL;
    }
    if (x->stop_at_data && x->datas == x->stop_at_data)
        flight_uv_read_stop(ur);
    if (x->close_at == CLOSE_IN_DATA && x->got >= x->close_after)
        close_rd(x);
}

static void on_end(flight_uv_reader_t *ur, int status)
{
    rd_t *x = flight_uv_reader_get_data(ur);
    if (x->closed || x->ends)
        x->after++;
    x->ends++;
    x->status = status;
    x->t_end = now_ms();
    x->end_offset = flight_reader_offset(flight_uv_reader_flight(ur));
    x->restart_rc = flight_uv_read_start(ur, on_meta, on_data, on_end);
    if (x->close_at == CLOSE_IN_END)
        close_rd(x);
    else
        finish(x);
}

/* Adopts r into a loop reader of w and starts it (any thread: no assert). */
static int rd_start_rc(world_t *w, int i, flight_reader_t *r, uint64_t seed)
{
    rd_t *x = &w->rds[i];
    x->seed = seed;
    int rc = flight_uv_reader_new(&x->ur, w->u, r);
    if (rc != 0)
        return rc;
    flight_uv_reader_set_data(x->ur, x);
    if (flight_uv_reader_flight(x->ur) != r)
        x->bad = true;
    return flight_uv_read_start(x->ur, on_meta, on_data, on_end);
}

static void rd_start(world_t *w, int i, flight_reader_t *r, uint64_t seed)
{
    ck_assert_int_eq(rd_start_rc(w, i, r, seed), 0);
}

static void world_run(world_t *w)
{
    ck_assert_int_eq(uv_run(&w->loop, UV_RUN_DEFAULT), 0);
    ck_assert_int_eq(w->close_rc, 0);
    ck_assert_int_eq(uv_loop_close(&w->loop), 0);
}

static void *world_thread(void *arg)
{
    world_t *w = arg;
    uv_run(&w->loop, UV_RUN_DEFAULT);
    return NULL;
}

#define ASSERT_RD(x, want_status, want_got)                                    \
    do {                                                                       \
        ck_assert_int_eq((x)->bad, 0);                                         \
        ck_assert_int_eq((x)->after, 0);                                       \
        ck_assert_int_eq((x)->ends, 1);                                        \
        ck_assert_int_eq((x)->restart_rc, COALESCE_EINVAL);                    \
        ck_assert_int_eq((x)->status, (want_status));                          \
        ck_assert_uint_eq((x)->got, (want_got));                               \
    } while (0)

/* --- A writer on another thread ------------------------------------------- */

typedef struct feeder {
    flight_writer_t *w;
    coalesce_buf_t *buf; /* the whole body, written by slices */
    size_t piece;
    int end_status;
    int rc;
} feeder_t;

static void *feed_thread(void *arg)
{
    feeder_t *f = arg;
    f->rc = flight_set_meta(f->w, "200", 3);
    size_t len = coalesce_buf_len(f->buf);
    for (size_t off = 0; off < len && f->rc == 0; off += f->piece) {
        size_t n = len - off < f->piece ? len - off : f->piece;
        f->rc = flight_write_buf(f->w, f->buf, off, n);
    }
    if (f->rc == 0)
        f->rc = flight_end(f->w, f->end_status);
    flight_writer_release(f->w);
    return NULL;
}

static coalesce_buf_t *pattern_buf(uint64_t seed, size_t len)
{
    coalesce_buf_t *b;
    ck_assert_int_eq(coalesce_buf_new(&b, len), 0);
    test_fill(coalesce_buf_mutable(b), seed, 0, len);
    return b;
}

/* n readers of one ASYNC flight: the leader's first. */
static void join_n(flight_group_t *g,
                   const char *key,
                   fetch_ctx_t *f,
                   flight_reader_t **rs,
                   int n)
{
    fetch_init(f, F_ASYNC, 0, 0);
    rs[0] = join(g, key, f, 0);
    for (int i = 1; i < n; i++)
        rs[i] = join(g, key, f, 1);
}

/* --- Tests ------------------------------------------------------------------
 */

/* Readers on a loop, the writer on another thread: every byte in order,
 * borrowed from the writer's own buffer, meta first, end once. */
START_TEST(uv_stream_cross_thread)
{
    LEAK_START();
    flight_group_t *g = group_default();
    enum { N = 8 };
    const size_t len = 2 * MiB + 123;
    rd_t rds[N];
    world_t w;
    world_init(&w, rds, N);
    fetch_ctx_t f;
    flight_reader_t *rs[N];
    join_n(g, "k", &f, rs, N);
    coalesce_buf_t *body = pattern_buf(7, len);
    for (int i = 0; i < N; i++) {
        rd_start(&w, i, rs[i], 7);
        rds[i].zc_base = coalesce_buf_data(body);
        rds[i].zc_owner = body;
    }
    feeder_t fd = {.w = writer_of(&f), .buf = body, .piece = 16 * KiB};
    pthread_t t;
    pthread_create(&t, NULL, feed_thread, &fd);
    world_run(&w);
    pthread_join(t, NULL);
    ck_assert_int_eq(fd.rc, 0);
    for (int i = 0; i < N; i++) {
        ASSERT_RD(&rds[i], 0, len);
        ck_assert_int_eq(rds[i].metas, 1);
    }
    coalesce_buf_unref(body);
    FINISH(g);
}
END_TEST

/* 64 readers, 200 writes: the loop turns about once per write, not once per
 * reader per write. */
START_TEST(uv_wakeups_coalesced)
{
    LEAK_START();
    flight_group_t *g = group_default();
    enum { N = 64, WRITES = 200 };
    const size_t piece = KiB;
    rd_t *rds = calloc(N, sizeof(*rds));
    world_t w;
    world_init(&w, rds, N);
    count_turns(&w);
    fetch_ctx_t f;
    flight_reader_t *rs[N];
    join_n(g, "k", &f, rs, N);
    for (int i = 0; i < N; i++)
        rd_start(&w, i, rs[i], 3);
    coalesce_buf_t *body = pattern_buf(3, piece * WRITES);
    feeder_t fd = {.w = writer_of(&f), .buf = body, .piece = piece};
    pthread_t t;
    pthread_create(&t, NULL, feed_thread, &fd);
    world_run(&w);
    pthread_join(t, NULL);
    long datas = 0;
    for (int i = 0; i < N; i++) {
        ASSERT_RD(&rds[i], 0, piece * WRITES);
        datas += rds[i].datas;
    }
    printf("uv_wakeups_coalesced: %d readers x %d writes: %ld data callbacks "
           "in %ld loop turns\n",
           N, WRITES, datas, w.nturns);
    /* At most one wake-up per write (plus start and end): a wake-up per
     * reader would be N times that. */
    ck_assert_int_le(w.nturns, WRITES + 8);
    coalesce_buf_unref(body);
    free(rds);
    FINISH(g);
}
END_TEST

/* Readers are served round robin within a turn: with the whole body there
 * at once, every reader gets its first bytes before any gets more, and no
 * callback carries more than a round (64 KiB) even from a larger write. */
static int rr_order[4096], rr_n;

static void on_data_order(flight_uv_reader_t *ur,
                          const void *data,
                          size_t len,
                          coalesce_buf_t *owner)
{
    rd_t *x = flight_uv_reader_get_data(ur);
    if (rr_n < 4096)
        rr_order[rr_n++] = (int)(x - x->w->rds);
    if (len > 64 * KiB)
        x->bad = true;
    on_data(ur, data, len, owner);
}

START_TEST(uv_round_robin)
{
    LEAK_START();
    flight_group_t *g = group_default();
    enum { N = 8 };
    rd_t rds[N];
    world_t w;
    world_init(&w, rds, N);
    fetch_ctx_t f;
    flight_reader_t *rs[N];
    join_n(g, "k", &f, rs, N);
    flight_writer_t *wr = writer_of(&f);
    ck_assert_int_eq(write_pattern(wr, 29, 0, 2 * MiB, 512 * KiB), 0);
    ck_assert_int_eq(flight_end(wr, 0), 0);
    flight_writer_release(wr);
    rr_n = 0;
    for (int i = 0; i < N; i++) {
        rd_start(&w, i, rs[i], 29);
        ck_assert_int_eq(
            flight_uv_read_start(rds[i].ur, on_meta, on_data_order, on_end), 0);
    }
    world_run(&w);
    for (int i = 0; i < N; i++)
        ASSERT_RD(&rds[i], 0, 2 * MiB);
    /* 32 rounds of 64 KiB: round k is callbacks [8k, 8k + 8), one each. */
    ck_assert_int_eq(rr_n, N * 32);
    for (int k = 0; k < 32; k++) {
        int seen = 0;
        for (int i = 0; i < N; i++)
            seen |= 1 << rr_order[k * N + i];
        ck_assert_int_eq(seen, (1 << N) - 1);
    }
    FINISH(g);
}
END_TEST

/* Stopping from the data callback holds delivery for any number of turns;
 * starting again delivers the rest in order. */
typedef struct resume_ctx {
    rd_t *x;
    long turns_left;
    long datas_when_stopped;
    bool moved; /* something arrived while stopped */
} resume_ctx_t;

static void on_idle_resume(uv_idle_t *h)
{
    resume_ctx_t *c = h->data;
    if (c->x->datas < c->datas_when_stopped)
        return; /* not stopped yet */
    if (c->x->datas != c->datas_when_stopped)
        c->moved = true;
    if (--c->turns_left > 0)
        return;
    uv_idle_stop(h);
    uv_close((uv_handle_t *)h, NULL);
    ck_assert_int_eq(flight_uv_read_start(c->x->ur, on_meta, on_data, on_end),
                     0);
}

START_TEST(uv_backpressure)
{
    LEAK_START();
    flight_opts_t o;
    flight_opts_init(&o);
    flight_group_t *g = group_with_opts(&o);
    rd_t rds[1];
    world_t w;
    world_init(&w, rds, 1);
    fetch_ctx_t f;
    flight_reader_t *r;
    join_n(g, "k", &f, &r, 1);
    /* The whole body is there before the loop runs. */
    flight_writer_t *wr = writer_of(&f);
    ck_assert_int_eq(write_pattern(wr, 5, 0, 512 * KiB, 4 * KiB), 0);
    ck_assert_int_eq(flight_end(wr, 0), 0);
    flight_writer_release(wr);
    rd_start(&w, 0, r, 5);
    rds[0].stop_at_data = 3;
    resume_ctx_t c = {.x = &rds[0], .turns_left = 50, .datas_when_stopped = 3};
    uv_idle_t idle;
    uv_idle_init(&w.loop, &idle);
    idle.data = &c;
    uv_idle_start(&idle, on_idle_resume);
    world_run(&w);
    ck_assert_int_eq(c.moved, 0);
    ASSERT_RD(&rds[0], 0, 512 * KiB);
    ck_assert_int_eq(rds[0].datas, 128);
    FINISH(g);
}
END_TEST

/* A stopped reader falls behind: max_lag detaches it, and on restart the
 * end callback says so, with the offset to resume from. The writer runs on
 * the loop's thread. */
START_TEST(uv_lagged_reader)
{
    LEAK_START();
    flight_opts_t o;
    flight_opts_init(&o);
    o.max_lag = 256 * KiB;
    o.retain_limit = 64 * KiB;
    flight_group_t *g = group_with_opts(&o);
    rd_t rds[1];
    world_t w;
    world_init(&w, rds, 1);
    fetch_ctx_t f;
    flight_reader_t *r;
    join_n(g, "k", &f, &r, 1);
    flight_writer_t *wr = writer_of(&f);
    ck_assert_int_eq(write_pattern(wr, 9, 0, 16 * KiB, 16 * KiB), 0);
    rd_start(&w, 0, r, 9);
    rds[0].stop_at_data = 1;
    w.keep = true;
    /* Turn until the first callback has run and stopped the reader. */
    while (rds[0].datas == 0)
        uv_run(&w.loop, UV_RUN_ONCE);
    ck_assert_int_eq(write_pattern(wr, 9, 16 * KiB, MiB, 16 * KiB), 0);
    ck_assert_int_eq(flight_end(wr, 0), 0);
    flight_writer_release(wr);
    ck_assert_int_eq(flight_uv_read_start(rds[0].ur, on_meta, on_data, on_end),
                     0);
    while (rds[0].ends == 0)
        uv_run(&w.loop, UV_RUN_ONCE);
    ASSERT_RD(&rds[0], FLIGHT_ELAGGED, 16 * KiB);
    ck_assert_uint_eq(rds[0].end_offset, 16 * KiB);
    ck_assert_int_eq(flight_uv_close(w.u), 0);
    world_run(&w);
    ck_assert_uint_eq(stats_of(g).lagged, 1);
    FINISH(g);
}
END_TEST

/* A waiter's deadline fires from a uv timer, with nothing else happening;
 * a waiter whose meta comes first is not timed out. */
typedef struct meta_later {
    flight_writer_t *w;
    int rc;
} meta_later_t;

static void on_meta_timer(uv_timer_t *t)
{
    meta_later_t *m = t->data;
    m->rc = flight_set_meta(m->w, "m", 1);
    if (m->rc == 0)
        m->rc = flight_end(m->w, 0);
    flight_writer_release(m->w);
    uv_close((uv_handle_t *)t, NULL);
}

START_TEST(uv_waiter_deadline)
{
    LEAK_START();
    flight_opts_t o;
    flight_opts_init(&o);
    o.wait_timeout_ms = 100;
    flight_group_t *g = group_with_opts(&o);
    rd_t rds[2];
    world_t w;
    world_init(&w, rds, 2);
    fetch_ctx_t f1, f2;
    double t0 = now_ms();
    flight_reader_t *l1 =
        join(g, "slow", (fetch_init(&f1, F_ASYNC, 0, 0), &f1), 0);
    flight_reader_t *j1 = join(g, "slow", &f1, 1);
    flight_reader_t *l2 =
        join(g, "fast", (fetch_init(&f2, F_ASYNC, 0, 0), &f2), 0);
    flight_reader_t *j2 = join(g, "fast", &f2, 1);
    rd_start(&w, 0, j1, 0);
    rd_start(&w, 1, j2, 0);
    /* "fast" gets its meta at 10 ms on the loop: due before the deadline,
     * so it runs first even on a late turn. */
    meta_later_t m = {.w = writer_of(&f2)};
    uv_timer_t t;
    uv_timer_init(&w.loop, &t);
    t.data = &m;
    uv_timer_start(&t, on_meta_timer, 10, 0);
    world_run(&w);
    ck_assert_int_eq(m.rc, 0);
    ASSERT_RD(&rds[0], FLIGHT_ETIMEDOUT, 0);
    ck_assert_int_eq(rds[0].metas, 0);
    ck_assert_double_ge(rds[0].t_end - t0, 100.0);
    ASSERT_RD(&rds[1], 0, 0);
    ck_assert_int_eq(rds[1].metas, 1);
    ck_assert_uint_eq(stats_of(g).timeouts, 1);
    /* The leader of "slow" is not affected. */
    flight_writer_t *w1 = writer_of(&f1);
    ck_assert_int_eq(flight_end(w1, 0), 0);
    flight_writer_release(w1);
    ck_assert_int_eq(flight_meta(l1, 0, NULL, NULL), 0);
    flight_reader_close(l1);
    flight_reader_close(l2);
    FINISH(g);
}
END_TEST

/* An upstream error after some bytes reaches every reader once, after the
 * bytes; a reader of a flight that failed before its meta gets only the
 * end. */
START_TEST(uv_error_once)
{
    LEAK_START();
    flight_group_t *g = group_default();
    enum { N = 5 };
    rd_t rds[N];
    world_t w;
    world_init(&w, rds, N);
    fetch_ctx_t f, f2;
    flight_reader_t *rs[N];
    join_n(g, "k", &f, rs, N - 1);
    fetch_init(&f2, F_RET, 0, 0);
    f2.ret = COALESCE_EUPSTREAM;
    rs[N - 1] = join(g, "failed", &f2, 0);
    for (int i = 0; i < N; i++)
        rd_start(&w, i, rs[i], 11);
    coalesce_buf_t *body = pattern_buf(11, 100 * KiB);
    feeder_t fd = {.w = writer_of(&f),
                   .buf = body,
                   .piece = 8 * KiB,
                   .end_status = COALESCE_EUPSTREAM};
    pthread_t t;
    pthread_create(&t, NULL, feed_thread, &fd);
    world_run(&w);
    pthread_join(t, NULL);
    for (int i = 0; i < N - 1; i++) {
        ASSERT_RD(&rds[i], COALESCE_EUPSTREAM, 100 * KiB);
        ck_assert_int_eq(rds[i].metas, 1);
    }
    ASSERT_RD(&rds[N - 1], COALESCE_EUPSTREAM, 0);
    ck_assert_int_eq(rds[N - 1].metas, 0);
    coalesce_buf_unref(body);
    FINISH(g);
}
END_TEST

/* Closing from every callback, and closing another reader that is queued
 * in the same turn: no callback after a close, nothing freed twice (ASan),
 * nothing leaked. */
START_TEST(uv_close_in_callbacks)
{
    LEAK_START();
    flight_group_t *g = group_default();
    enum { N = 6 };
    rd_t rds[N];
    world_t w;
    world_init(&w, rds, N);
    fetch_ctx_t f;
    flight_reader_t *rs[N];
    join_n(g, "k", &f, rs, N);
    /* The whole body first: all six are served in one turn, so reader 5 is
     * still queued when reader 4 closes it. */
    flight_writer_t *wr = writer_of(&f);
    ck_assert_int_eq(flight_set_meta(wr, "m", 1), 0);
    ck_assert_int_eq(write_pattern(wr, 13, 0, 256 * KiB, 4 * KiB), 0);
    ck_assert_int_eq(flight_end(wr, 0), 0);
    flight_writer_release(wr);
    for (int i = 0; i < N; i++)
        rd_start(&w, i, rs[i], 13);
    rds[0].close_at = CLOSE_IN_META;
    rds[1].close_at = CLOSE_IN_DATA;
    rds[1].close_after = 1;
    rds[2].close_at = CLOSE_IN_DATA;
    rds[2].close_after = 200 * KiB;
    rds[3].close_at = CLOSE_IN_END;
    rds[4].close_other = &rds[5]; /* queued behind it in the same turn */
    world_run(&w);
    for (int i = 0; i < N; i++) {
        ck_assert_int_eq(rds[i].bad, 0);
        ck_assert_int_eq(rds[i].after, 0);
    }
    ck_assert_int_eq(rds[0].datas, 0);
    ck_assert_uint_ge(rds[2].got, 200 * KiB);
    ASSERT_RD(&rds[3], 0, 256 * KiB);
    ASSERT_RD(&rds[4], 0, 256 * KiB);
    ck_assert_int_eq(rds[5].ends, 0);
    FINISH(g);
}
END_TEST

/*
 * A leader's fetch driven from a loop: flight_do() runs on a worker thread,
 * the fetch posts its start to loop A, and a uv timer on loop A feeds the
 * writer. Readers: two on loop A (joined from loop A), two on loop B (its
 * own thread) and the worker's blocking reader.
 */
typedef struct driven {
    world_t *a;
    flight_uv_t *post_to;
    flight_writer_t *w;
    uv_timer_t timer;
    uint64_t off, len;
    int rc;
    flight_group_t *g;
    rd_t *rds_a;
    counter_t *joined_b;
} driven_t;

static void drive_tick(uv_timer_t *t)
{
    driven_t *d = t->data;
    size_t n = d->len - d->off < 64 * KiB ? d->len - d->off : 64 * KiB;
    if (d->rc == 0)
        d->rc = write_pattern(d->w, 17, d->off, n, n);
    d->off += n;
    if (d->off < d->len && d->rc == 0)
        return;
    if (d->rc == 0)
        d->rc = flight_end(d->w, 0);
    flight_writer_release(d->w);
    uv_timer_stop(t);
    uv_close((uv_handle_t *)t, NULL);
}

/* On loop A: join two loop readers, then start feeding. */
static void drive_start(void *arg)
{
    driven_t *d = arg;
    world_t *a = d->a;
    for (int i = 0; i < 2; i++) {
        flight_reader_t *r;
        d->rc = flight_do(d->g, "driven", 6, fetch_cb, NULL, &r);
        if (d->rc != 0)
            return;
        rd_start(a, i, r, 17);
    }
    d->rc = flight_set_meta(d->w, "ok", 2);
    uv_timer_init(&a->loop, &d->timer);
    d->timer.data = d;
    uv_timer_start(&d->timer, drive_tick, 0, 1);
}

static int driven_fetch(flight_writer_t *w, void *data)
{
    driven_t *d = data;
    d->w = w;
    int rc = flight_uv_post(d->post_to, drive_start, d);
    return rc == 0 ? FLIGHT_FETCH_ASYNC : rc;
}

typedef struct worker {
    driven_t *d;
    world_t *b;
    counter_t *loops_ready;
    readres_t res;
    int join_rc;
} worker_t;

static void join_b(void *arg)
{
    worker_t *k = arg;
    for (int i = 0; i < 2; i++) {
        flight_reader_t *r;
        if (flight_do(k->d->g, "driven", 6, fetch_cb, NULL, &r) != 0) {
            k->join_rc = -1;
            return;
        }
        if (rd_start_rc(k->b, i, r, 17) != 0)
            k->join_rc = -1;
    }
}

static void *worker_thread(void *arg)
{
    worker_t *k = arg;
    flight_reader_t *r;
    k->join_rc = flight_do(k->d->g, "driven", 6, driven_fetch, k->d, &r);
    if (k->join_rc != 0)
        return NULL;
    /* Loop B's readers join while the flight is young. */
    flight_uv_post(k->b->u, join_b, k);
    k->res = read_all(r, PAT(17), 0);
    flight_reader_close(r);
    return NULL;
}

START_TEST(uv_writer_driven_from_loop)
{
    LEAK_START();
    flight_opts_t o;
    flight_opts_init(&o);
    flight_group_t *g = group_with_opts(&o);
    rd_t ra[2], rb[2];
    world_t a, b;
    world_init(&a, ra, 2);
    world_init(&b, rb, 2);
    const uint64_t len = 4 * MiB;
    driven_t d = {.a = &a, .post_to = a.u, .len = len, .g = g};
    worker_t k = {.d = &d, .b = &b};
    pthread_t tb, tw;
    pthread_create(&tb, NULL, world_thread, &b);
    pthread_create(&tw, NULL, worker_thread, &k);
    world_run(&a);
    pthread_join(tw, NULL);
    pthread_join(tb, NULL);
    ck_assert_int_eq(uv_loop_close(&b.loop), 0);
    ck_assert_int_eq(k.join_rc, 0);
    ck_assert_int_eq(d.rc, 0);
    ASSERT_BODY(k.res, COALESCE_EOF, len);
    for (int i = 0; i < 2; i++) {
        ASSERT_RD(&ra[i], 0, len);
        ASSERT_RD(&rb[i], 0, len);
    }
    ck_assert_uint_eq(stats_of(g).flights_started, 1);
    FINISH(g);
}
END_TEST

/* flight_uv_post from four threads: every task runs once, on the loop's
 * thread, in each thread's order; flight_uv_close runs what is pending. */
typedef struct post_ctx {
    flight_uv_t *u;
    pthread_t loop_thread;
    long next[4];
    atomic_long ran;
    bool bad;
    int fails;
} post_ctx_t;

typedef struct post_item {
    post_ctx_t *c;
    int thread;
    long seq;
} post_item_t;

static void post_task(void *arg)
{
    post_item_t *it = arg;
    post_ctx_t *c = it->c;
    if (!pthread_equal(pthread_self(), c->loop_thread) ||
        it->seq != c->next[it->thread])
        c->bad = true;
    c->next[it->thread]++;
    if (atomic_fetch_add(&c->ran, 1) + 1 == 4 * 1000)
        ck_assert_int_eq(flight_uv_close(c->u), 0);
    free(it);
}

typedef struct poster {
    post_ctx_t *c;
    int id;
} poster_t;

static void *post_thread(void *arg)
{
    poster_t *p = arg;
    for (long i = 0; i < 1000; i++) {
        post_item_t *it = malloc(sizeof(*it));
        *it = (post_item_t){p->c, p->id, i};
        if (flight_uv_post(p->c->u, post_task, it) != 0) {
            free(it);
            p->c->fails++;
        }
    }
    return NULL;
}

static void count_task(void *arg)
{
    (*(int *)arg)++;
}

/* A task that closes the adapter: the tasks after it run inside the close. */
typedef struct closer {
    flight_uv_t *u;
    int ran;
    int ran_at_close; /* tasks run when flight_uv_close() returned */
    int close_rc, post_rc;
} closer_t;

static void close_task(void *arg)
{
    closer_t *c = arg;
    c->ran++;
    c->close_rc = flight_uv_close(c->u);
    c->ran_at_close = c->ran;
    c->post_rc = flight_uv_post(c->u, count_task, &c->ran);
}

static void closer_count(void *arg)
{
    ((closer_t *)arg)->ran++;
}

START_TEST(uv_post)
{
    LEAK_START();
    uv_loop_t loop;
    ck_assert_int_eq(uv_loop_init(&loop), 0);
    post_ctx_t c = {.loop_thread = pthread_self()};
    ck_assert_int_eq(flight_uv_new(&c.u, &loop), 0);
    pthread_t t[4];
    poster_t p[4];
    for (int i = 0; i < 4; i++) {
        p[i] = (poster_t){&c, i};
        pthread_create(&t[i], NULL, post_thread, &p[i]);
    }
    ck_assert_int_eq(uv_run(&loop, UV_RUN_DEFAULT), 0);
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    ck_assert_int_eq(c.fails, 0);
    ck_assert_int_eq(c.bad, 0);
    ck_assert_int_eq(atomic_load(&c.ran), 4000);
    ck_assert_int_eq(uv_loop_close(&loop), 0);

    /* Pending tasks run in flight_uv_close; later posts are refused. */
    ck_assert_int_eq(uv_loop_init(&loop), 0);
    flight_uv_t *u;
    ck_assert_int_eq(flight_uv_new(&u, &loop), 0);
    int n = 0;
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(flight_uv_post(u, count_task, &n), 0);
    ck_assert_int_eq(n, 0);
    ck_assert_int_eq(flight_uv_close(u), 0);
    ck_assert_int_eq(n, 3);
    ck_assert_int_eq(flight_uv_post(u, count_task, &n), COALESCE_ECLOSING);
    ck_assert_int_eq(uv_run(&loop, UV_RUN_DEFAULT), 0);
    ck_assert_int_eq(uv_loop_close(&loop), 0);

    /* Closed from a task: the two tasks behind it run inside the close. */
    ck_assert_int_eq(uv_loop_init(&loop), 0);
    closer_t cl = {0};
    ck_assert_int_eq(flight_uv_new(&cl.u, &loop), 0);
    ck_assert_int_eq(flight_uv_post(cl.u, close_task, &cl), 0);
    ck_assert_int_eq(flight_uv_post(cl.u, closer_count, &cl), 0);
    ck_assert_int_eq(flight_uv_post(cl.u, closer_count, &cl), 0);
    ck_assert_int_eq(uv_run(&loop, UV_RUN_DEFAULT), 0);
    ck_assert_int_eq(cl.close_rc, 0);
    ck_assert_int_eq(cl.ran_at_close, 3);
    ck_assert_int_eq(cl.ran, 3);
    ck_assert_int_eq(cl.post_rc, COALESCE_ECLOSING);
    ck_assert_int_eq(uv_loop_close(&loop), 0);
    LEAK_CHECK();
}
END_TEST

/* Bad arguments, EBUSY, and allocation failure at every site. */
START_TEST(uv_api_errors)
{
    LEAK_START();
    flight_group_t *g = group_default();
    uv_loop_t loop;
    ck_assert_int_eq(uv_loop_init(&loop), 0);
    flight_uv_t *u = SENTINEL(flight_uv_t);
    ck_assert_int_eq(flight_uv_new(NULL, &loop), COALESCE_EINVAL);
    ck_assert_int_eq(flight_uv_new(&u, NULL), COALESCE_EINVAL);
    ck_assert_ptr_eq(u, SENTINEL(flight_uv_t));
    for (long n = 0;; n++) {
        test_alloc_fail_after(n);
        int rc = flight_uv_new(&u, &loop);
        test_alloc_fail_after(-1);
        if (rc == 0)
            break;
        ck_assert_int_eq(rc, COALESCE_ENOMEM);
        ck_assert_ptr_eq(u, SENTINEL(flight_uv_t));
        ck_assert_int_lt(n, MAX_INJECT);
    }
    ck_assert_int_eq(flight_uv_close(NULL), 0);
    ck_assert_int_eq(flight_uv_post(NULL, count_task, NULL), COALESCE_EINVAL);
    ck_assert_int_eq(flight_uv_post(u, NULL, NULL), COALESCE_EINVAL);
    int ran = 0;
    test_alloc_fail_after(0);
    ck_assert_int_eq(flight_uv_post(u, count_task, &ran), COALESCE_ENOMEM);
    test_alloc_fail_after(-1);

    fetch_ctx_t f;
    fetch_init(&f, F_BODY, 1, 1000);
    flight_reader_t *r = join(g, "k", &f, 0);
    flight_uv_reader_t *ur = SENTINEL(flight_uv_reader_t);
    ck_assert_int_eq(flight_uv_reader_new(NULL, u, r), COALESCE_EINVAL);
    ck_assert_int_eq(flight_uv_reader_new(&ur, NULL, r), COALESCE_EINVAL);
    ck_assert_int_eq(flight_uv_reader_new(&ur, u, NULL), COALESCE_EINVAL);
    test_alloc_fail_after(0);
    ck_assert_int_eq(flight_uv_reader_new(&ur, u, r), COALESCE_ENOMEM);
    test_alloc_fail_after(-1);
    ck_assert_ptr_eq(ur, SENTINEL(flight_uv_reader_t));
    ck_assert_int_eq(flight_uv_reader_new(&ur, u, r), 0);
    ck_assert_int_eq(flight_uv_read_start(NULL, NULL, on_data, on_end),
                     COALESCE_EINVAL);
    ck_assert_int_eq(flight_uv_read_start(ur, NULL, NULL, on_end),
                     COALESCE_EINVAL);
    ck_assert_int_eq(flight_uv_read_start(ur, NULL, on_data, NULL),
                     COALESCE_EINVAL);
    ck_assert_int_eq(flight_uv_read_stop(NULL), COALESCE_EINVAL);
    ck_assert_int_eq(flight_uv_read_stop(ur), 0);
    ck_assert_ptr_null(flight_uv_reader_flight(NULL));
    ck_assert_ptr_null(flight_uv_reader_get_data(NULL));
    flight_uv_reader_set_data(NULL, NULL);
    flight_uv_reader_close(NULL);
    ck_assert_int_eq(flight_uv_close(u), COALESCE_EBUSY);
    ck_assert_int_eq(ran, 0); /* EBUSY changed nothing */
    flight_uv_reader_close(ur);
    ck_assert_int_eq(flight_uv_close(u), 0);
    /* A second close before the loop freed it is refused, not a crash. */
    ck_assert_int_eq(flight_uv_close(u), COALESCE_ECLOSING);
    ck_assert_int_eq(uv_run(&loop, UV_RUN_DEFAULT), 0);
    ck_assert_int_eq(uv_loop_close(&loop), 0);
    FINISH(g);
}
END_TEST

/* A range reader on a loop: meta, then exactly its bytes. */
static int
range_fetch(flight_writer_t *w, uint64_t first, uint64_t last, void *data)
{
    flight_writer_t **out = data;
    (void)first;
    (void)last;
    *out = w;
    return FLIGHT_FETCH_ASYNC;
}

typedef struct range_seen {
    int rc;
    uint64_t first, last, total;
} range_seen_t;

static range_seen_t range_seen;

static void on_range_meta(flight_uv_reader_t *ur, const void *m, size_t len)
{
    range_seen.rc =
        flight_reader_range(flight_uv_reader_flight(ur), &range_seen.first,
                            &range_seen.last, &range_seen.total);
    on_meta(ur, m, len);
}

START_TEST(uv_range_reader)
{
    LEAK_START();
    flight_opts_t o;
    flight_opts_init(&o);
    o.chunk_size = 64 * KiB;
    flight_group_t *g = group_with_opts(&o);
    rd_t rds[1];
    world_t w;
    world_init(&w, rds, 1);
    flight_writer_t *wr = NULL;
    flight_reader_t *r;
    ck_assert_int_eq(
        flight_do_range(g, "obj", 3, 100000, 299999, range_fetch, &wr, &r), 0);
    ck_assert_ptr_nonnull(wr);
    rds[0].start = 100000;
    rd_start(&w, 0, r, 21);
    ck_assert_int_eq(
        flight_uv_read_start(rds[0].ur, on_range_meta, on_data, on_end), 0);
    /* Chunks 1..4 = bytes 65536..327679 of a 1 MB object. */
    ck_assert_int_eq(flight_set_range(wr, 65536, 327679, 1000000, "v", 1), 0);
    ck_assert_int_eq(flight_set_meta(wr, "206", 3), 0);
    ck_assert_int_eq(write_pattern(wr, 21, 65536, 327679 - 65536 + 1, 10000),
                     0);
    ck_assert_int_eq(flight_end(wr, 0), 0);
    flight_writer_release(wr);
    world_run(&w);
    ASSERT_RD(&rds[0], 0, 200000);
    ck_assert_int_eq(range_seen.rc, 0);
    ck_assert_uint_eq(range_seen.first, 100000);
    ck_assert_uint_eq(range_seen.last, 299999);
    ck_assert_uint_eq(range_seen.total, 1000000);
    FINISH(g);
}
END_TEST

/* Four loops on four threads, 16 readers each, one writer: bounded. */
START_TEST(uv_many_loops)
{
    LEAK_START();
    flight_group_t *g = group_default();
    enum { LOOPS = 4, PER = 16 };
    world_t w[LOOPS];
    rd_t rds[LOOPS][PER];
    fetch_ctx_t f;
    flight_reader_t *rs[LOOPS * PER];
    join_n(g, "k", &f, rs, LOOPS * PER);
    for (int l = 0; l < LOOPS; l++) {
        world_init(&w[l], rds[l], PER);
        for (int i = 0; i < PER; i++)
            rd_start(&w[l], i, rs[l * PER + i], 23);
    }
    const size_t len = 4 * MiB;
    coalesce_buf_t *body = pattern_buf(23, len);
    feeder_t fd = {.w = writer_of(&f), .buf = body, .piece = 4 * KiB};
    pthread_t t[LOOPS], tf;
    for (int l = 0; l < LOOPS; l++)
        pthread_create(&t[l], NULL, world_thread, &w[l]);
    pthread_create(&tf, NULL, feed_thread, &fd);
    pthread_join(tf, NULL);
    for (int l = 0; l < LOOPS; l++) {
        pthread_join(t[l], NULL);
        ck_assert_int_eq(uv_loop_close(&w[l].loop), 0);
        for (int i = 0; i < PER; i++)
            ASSERT_RD(&rds[l][i], 0, len);
    }
    ck_assert_int_eq(fd.rc, 0);
    coalesce_buf_unref(body);
    FINISH(g);
}
END_TEST

Suite *make_uv_suite(void)
{
    Suite *s = suite_create("uv");
    TCase *tc = tcase(s, "uv", 30);
    tcase_add_test(tc, uv_stream_cross_thread);
    tcase_add_test(tc, uv_wakeups_coalesced);
    tcase_add_test(tc, uv_round_robin);
    tcase_add_test(tc, uv_backpressure);
    tcase_add_test(tc, uv_lagged_reader);
    tcase_add_test(tc, uv_waiter_deadline);
    tcase_add_test(tc, uv_error_once);
    tcase_add_test(tc, uv_close_in_callbacks);
    tcase_add_test(tc, uv_writer_driven_from_loop);
    tcase_add_test(tc, uv_post);
    tcase_add_test(tc, uv_api_errors);
    tcase_add_test(tc, uv_range_reader);
    tcase_add_test(tc, uv_many_loops);
    return s;
}

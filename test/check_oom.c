/*
 * Allocation failure at every allocation site, one site at a time, in the
 * manner of SQLite's malloc tests.
 *
 * Each scenario calls every public function of a module. It runs once
 * without failures (the reference run), then again with allocation n
 * failing, for n = 0, 1, 2, ... until a run no longer reaches allocation n.
 * In every run:
 *  - each call returns 0, its documented code, or COALESCE_ENOMEM, and
 *    ENOMEM only when the injected failure happened inside that call;
 *  - after an ENOMEM the same call is made again and must succeed: the
 *    object stayed usable;
 *  - the run observes what the reference run observed (bytes read, flight
 *    stats, revisions, cache contents), so a failure the library absorbs
 *    (a table that does not grow, a cache apply the watch repairs) must
 *    not show;
 *  - nothing stays allocated afterwards.
 * Only one thread allocates at a time: flights are driven from the test's
 * thread, store watch deliveries are held while the test calls the API
 * and released with the test waiting (settle()), so allocation n is the
 * same allocation in every run.
 */
#include "helpers.h"

#include <coalesce/uv.h>

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

/* A scenario with more failure points than this is a runaway loop. */
#define OOM_MAX 20000

/* --- Injection ------------------------------------------------------------ */

/*
 * Allocation n of a run fails, counting only while armed: a scenario may
 * pause the count around setup that other scenarios already cover.
 */
static struct {
    long n;        /* -1 for the reference run. */
    long left;     /* Allocations to go before the failing one. */
    long armed_at; /* test_alloc_count() when last armed. */
    bool on;
    bool hit;     /* The failure happened. */
    long retried; /* Calls that returned ENOMEM and were made again. */
} inj;

static void inj_resume(void)
{
    if (inj.on)
        return;
    inj.on = true;
    inj.armed_at = test_alloc_count();
    test_alloc_fail_after(!inj.hit && inj.left >= 0 ? inj.left : -1);
}

static void inj_pause(void)
{
    if (!inj.on)
        return;
    inj.hit = inj.hit || test_alloc_failed();
    if (!inj.hit && inj.left >= 0)
        inj.left -= test_alloc_count() - inj.armed_at;
    test_alloc_fail_after(-1);
    inj.on = false;
}

static void inj_begin(long n)
{
    memset(&inj, 0, sizeof(inj));
    inj.n = n;
    inj.left = n;
    inj_resume();
}

static bool inj_failed(void)
{
    return inj.hit || (inj.on && test_alloc_failed());
}

/*
 * A call that may meet the injected failure: it returns want, or ENOMEM
 * if the failure happened inside it, and then the same call again returns
 * want. expr is evaluated twice in that case.
 */
#define CALL(want, expr)                                                       \
    do {                                                                       \
        bool pre_ = inj_failed();                                              \
        int rc_ = (expr);                                                      \
        if (rc_ == COALESCE_ENOMEM && (want) != COALESCE_ENOMEM) {             \
            ck_assert_msg(!pre_ && inj_failed(),                               \
                          "n=%ld line %d: %s: ENOMEM with no failed "          \
                          "allocation in it",                                  \
                          inj.n, __LINE__, #expr);                             \
            inj.retried++;                                                     \
            rc_ = (expr);                                                      \
        }                                                                      \
        ck_assert_msg(rc_ == (want), "n=%ld line %d: %s: %s, want %s", inj.n,  \
                      __LINE__, #expr, coalesce_err_name(rc_),                 \
                      coalesce_err_name(want));                                \
    } while (0)
#define OK(expr) CALL(0, expr)

/* --- Observations --------------------------------------------------------- */

#define OBS_MAX 8192

/* What a run saw, in order; later runs must see the same. */
static struct {
    bool ref;
    size_t n, nref;
    uint64_t v[OBS_MAX];
    const char *what[OBS_MAX];
} obs;

static void see(const char *what, uint64_t v)
{
    ck_assert_msg(obs.n < OBS_MAX, "more than %d observations", OBS_MAX);
    if (obs.ref) {
        obs.v[obs.n] = v;
        obs.what[obs.n] = what;
    } else {
        ck_assert_msg(obs.n < obs.nref,
                      "n=%ld: observation %zu (%s) past the reference's %zu",
                      inj.n, obs.n, what, obs.nref);
        ck_assert_msg(strcmp(obs.what[obs.n], what) == 0 && obs.v[obs.n] == v,
                      "n=%ld: observation %zu: %s = %" PRIu64
                      ", the reference saw %s = %" PRIu64,
                      inj.n, obs.n, what, v, obs.what[obs.n], obs.v[obs.n]);
    }
    obs.n++;
}

static void see_rc(const char *what, int rc)
{
    see(what, (uint64_t)(int64_t)rc);
}

#define FNV0 0xcbf29ce484222325ull

static uint64_t fnv(uint64_t h, const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

static uint64_t fnv_u64(uint64_t h, uint64_t v)
{
    return fnv(h, &v, sizeof(v));
}

/* --- The driver ----------------------------------------------------------- */

typedef void (*scenario_t)(void);

/* Failure points, and calls that returned ENOMEM (the other failures
 * were absorbed by the library), per module. */
typedef struct points {
    long points, enomem;
} points_t;

/* Runs fn for the reference, then with each allocation failing in turn. */
static void drive(points_t *pt, const char *name, scenario_t fn)
{
    const long base = test_alloc_live();
    const bool verbose = getenv("OOM_VERBOSE") != NULL;
    obs.ref = true;
    obs.n = 0;
    inj_begin(-1);
    fn();
    inj_pause();
    obs.nref = obs.n;
    ck_assert_msg(test_alloc_live() == base, "%s: the reference run leaked %ld",
                  name, test_alloc_live() - base);
    obs.ref = false;
    for (long n = 0;; n++) {
        ck_assert_msg(n < OOM_MAX, "%s: more than %d failure points", name,
                      OOM_MAX);
        if (verbose)
            fprintf(stderr, "oom: %s: n=%ld\n", name, n);
        obs.n = 0;
        inj_begin(n);
        fn();
        inj_pause();
        ck_assert_msg(obs.n == obs.nref,
                      "%s n=%ld: %zu observations, the reference made %zu",
                      name, n, obs.n, obs.nref);
        ck_assert_msg(test_alloc_live() == base, "%s n=%ld: %ld blocks leaked",
                      name, n, test_alloc_live() - base);
        if (!inj.hit)
            break;
        pt->points++;
        pt->enomem += inj.retried;
    }
}

static void report_points(const char *module, const points_t *pt)
{
    printf("oom: %s: %ld failure points (%ld returned ENOMEM and were "
           "retried, the rest were absorbed)\n",
           module, pt->points, pt->enomem);
    fflush(stdout);
}

/* Sleeps ms milliseconds. */
static void nap_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* =========================================================================
 * Buffers
 * ========================================================================= */

static void count_free(void *p, void *data)
{
    (void)p;
    (*(int *)data)++;
}

static void sc_buf(void)
{
    coalesce_buf_t *b = NULL, *z = NULL, *w = NULL;
    OK(coalesce_buf_new(&b, 100));
    unsigned char *p = coalesce_buf_mutable(b);
    ck_assert_ptr_nonnull(p);
    test_fill(p, 9, 0, 100);
    OK(coalesce_buf_truncate(b, 60));
    see("len", coalesce_buf_len(b));
    see("bytes", test_check(coalesce_buf_data(b), 9, 0, 60));
    coalesce_buf_unref(coalesce_buf_ref(b));
    coalesce_buf_unref(b);

    OK(coalesce_buf_new(&z, 0));
    see("empty len", coalesce_buf_len(z));
    coalesce_buf_unref(z);

    /* A failed wrap must not call the destructor: it runs once, at the
     * last unref. */
    static const char text[] = "wrapped";
    int freed = 0;
    OK(coalesce_buf_new_wrap(&w, text, 7, count_free, &freed));
    see("freed early", (uint64_t)freed);
    see("wrap mutable", coalesce_buf_mutable(w) == NULL);
    coalesce_buf_unref(w);
    see("freed", (uint64_t)freed);
    OK(coalesce_buf_new_wrap(&w, NULL, 0, NULL, NULL));
    coalesce_buf_unref(w);

    /* Too large to allocate at all. */
    coalesce_buf_t *big = SENTINEL(coalesce_buf_t);
    CALL(COALESCE_ENOMEM, coalesce_buf_new(&big, SIZE_MAX));
    ck_assert_ptr_eq(big, SENTINEL(coalesce_buf_t));
}

START_TEST(oom_buf)
{
    points_t pt = {0, 0};
    drive(&pt, "buf", sc_buf);
    report_points("buf", &pt);
}
END_TEST

/* =========================================================================
 * Flight groups
 * ========================================================================= */

#define FCHUNK 1000

static void free_cb(void *p, void *data)
{
    (void)data;
    free(p);
}

/*
 * Pattern bytes [off, off + len) of seed, in pieces, each way of writing in
 * turn: a copy, a slice of a library buffer, wrapped caller memory.
 */
static void write_body(
    flight_writer_t *w, uint64_t seed, uint64_t off, uint64_t len, size_t piece)
{
    static unsigned char tmp[4096];
    ck_assert_uint_le(piece, sizeof(tmp));
    unsigned k = 0;
    for (uint64_t done = 0; done < len; k++) {
        size_t n = len - done < piece ? (size_t)(len - done) : piece;
        uint64_t at = off + done;
        coalesce_buf_t *b = NULL;
        if (k % 3 == 0) {
            test_fill(tmp, seed, at, n);
            OK(flight_write(w, tmp, n));
        } else if (k % 3 == 1) {
            OK(coalesce_buf_new(&b, n + 6));
            test_fill((unsigned char *)coalesce_buf_mutable(b) + 3, seed, at,
                      n);
            OK(flight_write_buf(w, b, 3, n));
            ck_assert_ptr_null(coalesce_buf_mutable(b)); /* Published. */
            coalesce_buf_unref(b);
        } else {
            unsigned char *m = malloc(n);
            ck_assert_ptr_nonnull(m);
            test_fill(m, seed, at, n);
            OK(coalesce_buf_new_wrap(&b, m, n, free_cb, NULL));
            OK(flight_write_buf(w, b, 0, n));
            coalesce_buf_unref(b);
        }
        done += n;
    }
}

/* An object fetch: the whole body at once, or the writer kept. */
typedef struct job {
    uint64_t seed;
    uint64_t len;
    const char *meta;
    int calls;
    flight_writer_t *w;
} job_t;

static int fetch_body(flight_writer_t *w, void *data)
{
    job_t *j = data;
    j->calls++;
    if (j->meta)
        OK(flight_set_meta(w, j->meta, strlen(j->meta)));
    write_body(w, j->seed, 0, j->len, 400);
    OK(flight_end(w, 0));
    return FLIGHT_FETCH_DONE;
}

static int fetch_keep(flight_writer_t *w, void *data)
{
    job_t *j = data;
    j->calls++;
    j->w = w;
    return FLIGHT_FETCH_ASYNC;
}

static int fetch_none(flight_writer_t *w, void *data)
{
    (void)w;
    (void)data;
    ck_abort_msg("n=%ld: a joiner's fetch ran", inj.n);
    return COALESCE_EINVAL;
}

/* A range fetch of an object whose byte i is the pattern's byte i. */
typedef struct rjob {
    uint64_t seed, total;
    bool keep;
    int calls;
    flight_writer_t *w;
} rjob_t;

static int rfetch(flight_writer_t *w, uint64_t first, uint64_t last, void *data)
{
    rjob_t *j = data;
    j->calls++;
    see("range fetch first", first);
    see("range fetch last", last);
    if (j->keep) {
        j->w = w;
        return FLIGHT_FETCH_ASYNC;
    }
    uint64_t l = last < j->total ? last : j->total - 1;
    OK(flight_set_range(w, first, l, j->total, "v1", 2));
    OK(flight_set_meta(w, "206", 3));
    write_body(w, j->seed, first, l - first + 1, 700);
    OK(flight_end(w, 0));
    return FLIGHT_FETCH_DONE;
}

static int
rfetch_none(flight_writer_t *w, uint64_t first, uint64_t last, void *data)
{
    (void)w;
    (void)first;
    (void)last;
    (void)data;
    ck_abort_msg("n=%ld: a range fetch ran for a joiner", inj.n);
    return COALESCE_EINVAL;
}

static void note_cb(flight_reader_t *r, void *data)
{
    (void)r;
    (*(int *)data)++;
}

enum { RD_COPY, RD_PEEK };

/*
 * Reads what r has now (never waits) from body offset *pos, checking the
 * bytes, and records it; returns what stopped it (COALESCE_EAGAIN in the
 * middle of a body).
 */
static int see_body(flight_reader_t *r, uint64_t seed, uint64_t *pos, int how)
{
    unsigned char buf[777];
    uint64_t got = 0;
    bool ok = true;
    int rc, peeks = 0;
    for (;;) {
        if (how == RD_PEEK) {
            const void *d = NULL;
            size_t n = 0;
            coalesce_buf_t *owner = NULL;
            rc = flight_peek(r, 0, &d, &n, &owner);
            if (rc)
                break;
            /* Every other peek is consumed in part. */
            size_t take = n > 1 && peeks++ % 2 ? n / 2 : n;
            ok = ok && owner && test_check(d, seed, *pos + got, take);
            OK(flight_consume(r, take));
            got += take;
        } else {
            size_t n = 0;
            rc = flight_read(r, buf, sizeof(buf), 0, &n);
            if (rc)
                break;
            ok = ok && n > 0 && test_check(buf, seed, *pos + got, n);
            got += n;
        }
    }
    *pos += got;
    see("body bytes", got);
    see_rc("body status", rc);
    see("body ok", ok);
    return rc;
}

static void see_range(flight_reader_t *r)
{
    uint64_t first = 0, last = 0, total = 0;
    see_rc("range rc", flight_reader_range(r, &first, &last, &total));
    see("range first", first);
    see("range last", last);
    see("range total", total);
}

static void see_meta(flight_reader_t *r)
{
    const void *m = NULL;
    size_t len = 0;
    OK(flight_meta(r, 0, &m, &len));
    see("meta", fnv(FNV0, m, len));
}

static void see_stats(const flight_stats_t *st)
{
    see("flights_started", st->flights_started);
    see("joins", st->joins);
    see("timeouts", st->timeouts);
    see("errors", st->errors);
    see("lagged", st->lagged);
    see("bytes_written", st->bytes_written);
    see("bytes_delivered", st->bytes_delivered);
    see("flights_active", st->flights_active);
    see("readers_open", st->readers_open);
    see("segments_held", st->segments_held);
    see("bytes_held", st->bytes_held);
    see("orphaned", st->orphaned);
    see("range_fetches", st->range_fetches);
    see("chunk_joins", st->chunk_joins);
    see("range_bytes_requested", st->range_bytes_requested);
    see("range_bytes_fetched", st->range_bytes_fetched);
    see("range_mismatches", st->range_mismatches);
}

static void sc_flight(void)
{
    flight_opts_t o;
    flight_opts_init(&o);
    o.shards = 1; /* Every flight in one table, which has to grow. */
    o.retain_limit = 3000;
    o.max_lag = 6000;
    o.chunk_size = FCHUNK;
    flight_group_t *g = NULL;
    OK(flight_group_new(&g, &o));
    flight_group_set_data(g, &o);
    ck_assert_ptr_eq(flight_group_get_data(g), &o);

    /* A synchronous leader, with a key too long to live in the flight. */
    char lkey[100];
    memset(lkey, 'L', sizeof(lkey));
    job_t j1 = {.seed = 11, .len = 2500, .meta = "200 OK"};
    flight_reader_t *r1 = NULL;
    OK(flight_do(g, lkey, sizeof(lkey), fetch_body, &j1, &r1));
    see("calls", (uint64_t)j1.calls);
    see("shared", (uint64_t)flight_reader_shared(r1));
    see_meta(r1);
    uint64_t p1 = 0;
    see_body(r1, 11, &p1, RD_COPY);
    see("offset", flight_reader_offset(r1));
    flight_reader_close(r1);

    /* An asynchronous leader and a waiter, notified and reading as the
     * body comes. */
    job_t j2 = {.seed = 22};
    flight_reader_t *lr = NULL, *wr = NULL;
    OK(flight_do(g, "async", 5, fetch_keep, &j2, &lr));
    OK(flight_do(g, "async", 5, fetch_none, NULL, &wr));
    see("calls", (uint64_t)j2.calls);
    see("shared", (uint64_t)flight_reader_shared(wr));
    int fired = 0;
    CALL(0, flight_reader_notify(wr, note_cb, &fired));
    see("deadline", (uint64_t)flight_reader_deadline_ms(wr));
    see("writer readers", flight_writer_readers(j2.w));
    OK(flight_set_meta(j2.w, "meta two", 8));
    see("fired", (uint64_t)fired);
    CALL(1, flight_reader_notify(wr, note_cb, &fired)); /* The meta is new. */
    see_meta(wr);
    CALL(0, flight_reader_notify(wr, note_cb, &fired));
    uint64_t woff = 0, lpos = 0, wpos = 0;
    for (int i = 0; i < 3; i++) {
        write_body(j2.w, 22, woff, 900, 300);
        woff += 900;
        see("fired", (uint64_t)fired);
        ck_assert_int_eq(see_body(lr, 22, &lpos, RD_COPY), COALESCE_EAGAIN);
        ck_assert_int_eq(see_body(wr, 22, &wpos, RD_PEEK), COALESCE_EAGAIN);
        CALL(0, flight_reader_notify(wr, note_cb, &fired));
    }
    OK(flight_end(j2.w, 0));
    flight_writer_release(j2.w);
    see("fired", (uint64_t)fired);
    see_body(lr, 22, &lpos, RD_COPY);
    see_body(wr, 22, &wpos, RD_PEEK);
    flight_reader_close(lr);
    flight_reader_close(wr);

    /* Retention and lag: a late joiner starts at byte 0 while the prefix
     * is held; past retain_limit the key is free for a new flight; a
     * reader that does not read is detached. */
    job_t j3 = {.seed = 33};
    flight_reader_t *l3 = NULL, *slow = NULL, *late = NULL, *nr = NULL;
    OK(flight_do(g, "lag", 3, fetch_keep, &j3, &l3));
    OK(flight_do(g, "lag", 3, fetch_none, NULL, &slow));
    uint64_t p3 = 0, plate = 0, pslow = 0;
    write_body(j3.w, 33, 0, 2000, 500);
    see_body(l3, 33, &p3, RD_COPY);
    OK(flight_do(g, "lag", 3, fetch_none, NULL, &late));
    write_body(j3.w, 33, 2000, 2000, 500);
    see_body(l3, 33, &p3, RD_COPY);
    see_body(late, 33, &plate, RD_PEEK);
    job_t j4 = {.seed = 44, .len = 100};
    OK(flight_do(g, "lag", 3, fetch_body, &j4, &nr));
    see("new flight calls", (uint64_t)j4.calls);
    see("new flight shared", (uint64_t)flight_reader_shared(nr));
    uint64_t p4 = 0;
    see_body(nr, 44, &p4, RD_PEEK);
    flight_reader_close(nr);
    for (uint64_t at = 4000; at < 8500; at += 1500) {
        write_body(j3.w, 33, at, 1500, 500);
        see_body(l3, 33, &p3, RD_COPY);
        see_body(late, 33, &plate, RD_PEEK);
    }
    OK(flight_end(j3.w, 0));
    flight_writer_release(j3.w);
    see_body(l3, 33, &p3, RD_COPY);
    see_body(late, 33, &plate, RD_PEEK);
    see_body(slow, 33, &pslow, RD_COPY);
    see("slow offset", flight_reader_offset(slow));
    flight_reader_close(l3);
    flight_reader_close(late);
    flight_reader_close(slow);

    /* Twenty flights at once in the one shard: its table grows. */
    job_t jt[20];
    flight_reader_t *rt[20];
    for (int i = 0; i < 20; i++) {
        char k[16];
        snprintf(k, sizeof(k), "t%02d", i);
        memset(&jt[i], 0, sizeof(jt[i]));
        OK(flight_do(g, k, 3, fetch_keep, &jt[i], &rt[i]));
    }
    for (int i = 0; i < 20; i++) {
        char b[8];
        size_t n = 0;
        OK(flight_write(jt[i].w, "xyz", 3));
        OK(flight_end(jt[i].w, 0));
        flight_writer_release(jt[i].w);
        OK(flight_read(rt[i], b, sizeof(b), 0, &n));
        see("table flight bytes", n);
        CALL(COALESCE_EOF, flight_read(rt[i], b, sizeof(b), 0, &n));
        flight_reader_close(rt[i]);
    }

    flight_stats_t st;
    OK(flight_group_stats(g, &st, sizeof(st)));
    see_stats(&st);
    flight_group_close(g);

    /* Range flights, in a group of their own so that its chunk flights
     * are allocated, not recycled: a run in flight; a call that joins it
     * and leads the runs on either side; a call that joins a chunk being
     * written; an open-ended range. Keys too long to live in the object. */
    OK(flight_group_new(&g, &o));
    char rkey[64];
    memset(rkey, 'R', sizeof(rkey));
    rjob_t ka = {.seed = 55, .total = 6000, .keep = true};
    rjob_t kb = {.seed = 55, .total = 6000};
    flight_reader_t *ra = NULL, *rb = NULL, *rc = NULL, *rd = NULL, *rx = NULL;
    OK(flight_do_range(g, rkey, sizeof(rkey), 2000, 3999, rfetch, &ka, &ra));
    OK(flight_do_range(g, rkey, sizeof(rkey), 0, 5999, rfetch, &kb, &rb));
    see("range calls", (uint64_t)ka.calls);
    see("range calls", (uint64_t)kb.calls);
    see("range shared", (uint64_t)flight_reader_shared(rb));
    see("range writer readers", flight_writer_readers(ka.w));
    OK(flight_set_range(ka.w, 2000, 3999, 6000, "v1", 2));
    CALL(FLIGHT_ERANGE, flight_do_range(g, rkey, sizeof(rkey), 7000, 7999,
                                        rfetch_none, NULL, &rx));
    OK(flight_set_meta(ka.w, "206 a", 5));
    write_body(ka.w, 55, 2000, 600, 200);
    OK(flight_do_range(g, rkey, sizeof(rkey), 2500, 2999, rfetch_none, NULL,
                       &rc));
    write_body(ka.w, 55, 2600, 1400, 700); /* Pieces across chunks. */
    OK(flight_end(ka.w, 0));
    flight_writer_release(ka.w);
    uint64_t pa = 2000, pb = 0, pc = 2500, pd = 5000;
    see_body(ra, 55, &pa, RD_COPY);
    see_meta(rb);
    see_body(rb, 55, &pb, RD_PEEK);
    see_body(rc, 55, &pc, RD_COPY);
    see_range(ra);
    see_range(rb);
    see_range(rc);
    flight_reader_close(ra);
    flight_reader_close(rb);
    flight_reader_close(rc);
    rjob_t kd = {.seed = 55, .total = 6000};
    OK(flight_do_range(g, rkey, sizeof(rkey), 5000, FLIGHT_RANGE_END, rfetch,
                       &kd, &rd));
    see_body(rd, 55, &pd, RD_PEEK);
    see_range(rd);
    flight_reader_close(rd);

    OK(flight_group_stats(g, &st, sizeof(st)));
    see_stats(&st);
    flight_group_close(g);
}

START_TEST(oom_flight)
{
    points_t pt = {0, 0};
    drive(&pt, "flight", sc_flight);
    report_points("flight", &pt);
}
END_TEST

/* =========================================================================
 * The libuv adapter
 * ========================================================================= */

typedef struct uvrec {
    uint64_t seed, got, mhash;
    bool ok, ended, meta, stop_once, stopped;
    int status;
} uvrec_t;

static void uv_meta(flight_uv_reader_t *ur, const void *meta, size_t len)
{
    uvrec_t *x = flight_uv_reader_get_data(ur);
    x->meta = true;
    x->mhash = fnv(FNV0, meta, len);
}

static void uv_data(flight_uv_reader_t *ur,
                    const void *data,
                    size_t len,
                    coalesce_buf_t *owner)
{
    uvrec_t *x = flight_uv_reader_get_data(ur);
    x->ok = x->ok && owner && test_check(data, x->seed, x->got, len);
    x->got += len;
    if (x->stop_once) { /* Backpressure once: started again by the test. */
        x->stop_once = false;
        x->stopped = true;
        ck_assert_int_eq(flight_uv_read_stop(ur), 0);
    }
}

static void uv_end(flight_uv_reader_t *ur, int status)
{
    uvrec_t *x = flight_uv_reader_get_data(ur);
    x->ended = true;
    x->status = status;
}

/* The writer, fed from posted tasks on the loop. */
typedef struct uvjob {
    flight_writer_t *w;
    uint64_t seed, off;
} uvjob_t;

static void task_meta(void *data)
{
    uvjob_t *j = data;
    OK(flight_set_meta(j->w, "uv meta", 7));
}

static void task_write(void *data)
{
    uvjob_t *j = data;
    write_body(j->w, j->seed, j->off, 1000, 300);
    j->off += 1000;
}

static void task_end(void *data)
{
    uvjob_t *j = data;
    OK(flight_end(j->w, 0));
    flight_writer_release(j->w);
}

static void task_never(void *data)
{
    (void)data;
    ck_abort_msg("n=%ld: a post refused with ECLOSING ran", inj.n);
}

static void sc_uv(void)
{
    uv_loop_t loop;
    ck_assert_int_eq(uv_loop_init(&loop), 0);
    /* The waiter gets a deadline, so its loop reader arms a timer (which
     * never fires). */
    flight_opts_t fo;
    flight_opts_init(&fo);
    fo.wait_timeout_ms = 600000;
    flight_group_t *g = NULL;
    OK(flight_group_new(&g, &fo));
    flight_uv_t *u = NULL;
    OK(flight_uv_new(&u, &loop));
    job_t j = {0};
    flight_reader_t *r1 = NULL, *r2 = NULL;
    OK(flight_do(g, "uv", 2, fetch_keep, &j, &r1));
    OK(flight_do(g, "uv", 2, fetch_none, NULL, &r2));
    uvrec_t x1 = {.seed = 66, .ok = true};
    uvrec_t x2 = {.seed = 66, .ok = true, .stop_once = true};
    flight_uv_reader_t *u1 = NULL, *u2 = NULL;
    OK(flight_uv_reader_new(&u1, u, r1));
    OK(flight_uv_reader_new(&u2, u, r2));
    flight_uv_reader_set_data(u1, &x1);
    flight_uv_reader_set_data(u2, &x2);
    ck_assert_ptr_eq(flight_uv_reader_flight(u1), r1);
    OK(flight_uv_read_start(u1, uv_meta, uv_data, uv_end));
    OK(flight_uv_read_start(u2, NULL, uv_data, uv_end));
    /* One turn before anything is written: the waiter arms its deadline
     * timer. */
    uv_run(&loop, UV_RUN_NOWAIT);
    see("uv deadline armed", flight_reader_deadline_ms(r2) > 0);
    uvjob_t jb = {j.w, 66, 0};
    OK(flight_uv_post(u, task_meta, &jb));
    for (int i = 0; i < 4; i++)
        OK(flight_uv_post(u, task_write, &jb));
    OK(flight_uv_post(u, task_end, &jb));
    while (!x1.ended || !x2.ended) {
        if (x2.stopped) {
            x2.stopped = false;
            OK(flight_uv_read_start(u2, NULL, uv_data, uv_end));
        }
        uv_run(&loop, UV_RUN_ONCE);
    }
    see("uv bytes", x1.got);
    see("uv ok", x1.ok);
    see_rc("uv status", x1.status);
    see("uv meta", x1.meta);
    see("uv meta hash", x1.mhash);
    see("uv bytes", x2.got);
    see("uv ok", x2.ok);
    see_rc("uv status", x2.status);
    CALL(COALESCE_EBUSY, flight_uv_close(u));
    flight_uv_reader_close(u1);
    flight_uv_reader_close(u2);
    OK(flight_uv_close(u));
    /* Refused after the close, and what it allocated is freed. */
    CALL(COALESCE_ECLOSING, flight_uv_post(u, task_never, NULL));
    ck_assert_int_eq(uv_run(&loop, UV_RUN_DEFAULT), 0);
    ck_assert_int_eq(uv_loop_close(&loop), 0);
    flight_group_close(g);
}

START_TEST(oom_uv)
{
    points_t pt = {0, 0};
    drive(&pt, "uv", sc_uv);
    report_points("uv", &pt);
}
END_TEST

/* =========================================================================
 * The in-memory store
 * ========================================================================= */

/* What a watch delivered, as counts and a hash of every event. */
typedef struct wlog {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    long events, responses, progress;
    int error;
    int64_t compact;
    uint64_t hash;
    bool over;
} wlog_t;

static void wlog_init(wlog_t *l)
{
    memset(l, 0, sizeof(*l));
    pthread_mutex_init(&l->mu, NULL);
    pthread_cond_init(&l->cv, NULL);
    l->hash = FNV0;
}

static void wlog_destroy(wlog_t *l)
{
    pthread_cond_destroy(&l->cv);
    pthread_mutex_destroy(&l->mu);
}

static uint64_t kv_hash(uint64_t h, const cache_kv_t *kv, bool with_value)
{
    h = fnv(h, kv->key, kv->keylen);
    h = fnv_u64(h, (uint64_t)kv->mod_rev);
    if (!with_value)
        return h;
    h = fnv(fnv_u64(h, kv->vallen), kv->value, kv->vallen);
    h = fnv_u64(h, (uint64_t)kv->create_rev);
    h = fnv_u64(h, (uint64_t)kv->version);
    return fnv_u64(h, (uint64_t)kv->lease);
}

static void wlog_cb(void *data, const cache_watch_resp_t *r)
{
    wlog_t *l = data;
    pthread_mutex_lock(&l->mu);
    if (r->error) {
        l->over = true;
        l->error = r->error;
        l->compact = r->compact_revision;
    } else if (!r->n) {
        l->progress++;
    } else {
        l->responses++;
        l->hash = fnv_u64(l->hash, (uint64_t)r->revision);
        for (size_t i = 0; i < r->n; i++) {
            const cache_event_t *e = &r->events[i];
            l->hash = fnv_u64(l->hash, (uint64_t)e->type);
            l->hash = kv_hash(l->hash, &e->kv, e->type == CACHE_EV_PUT);
        }
        l->events += (long)r->n;
    }
    pthread_cond_broadcast(&l->cv);
    pthread_mutex_unlock(&l->mu);
}

/* Waits for the watch's canceling response, then records the log. */
static void see_wlog(wlog_t *l)
{
    double until = now_ms() + test_timeout(10) * 1000;
    pthread_mutex_lock(&l->mu);
    while (!l->over && now_ms() < until) {
        pthread_mutex_unlock(&l->mu);
        nap_ms(1);
        pthread_mutex_lock(&l->mu);
    }
    bool over = l->over;
    pthread_mutex_unlock(&l->mu);
    ck_assert_msg(over, "n=%ld: a watch did not end", inj.n);
    see("watch events", (uint64_t)l->events);
    see("watch responses", (uint64_t)l->responses);
    see("watch progress", (uint64_t)l->progress);
    see_rc("watch error", l->error);
    see("watch compact", (uint64_t)l->compact);
    see("watch hash", l->hash);
}

static cache_op_t put_op(const char *k, const char *v, int64_t lease)
{
    cache_op_t o = {.type = CACHE_OP_PUT,
                    .key = k,
                    .keylen = strlen(k),
                    .value = v,
                    .vallen = strlen(v),
                    .lease = lease};
    return o;
}

static cache_op_t del_op(const char *k, const char *end)
{
    cache_op_t o = {.type = CACHE_OP_DELETE,
                    .key = k,
                    .keylen = strlen(k),
                    .end = end,
                    .endlen = end ? strlen(end) : 0};
    return o;
}

/* A store transaction; what it did is recorded when it succeeds. */
static int m_txn(cache_store_t *s,
                 const cache_cmp_t *cmps,
                 size_t ncmps,
                 const cache_op_t *ops,
                 size_t nops)
{
    cache_op_result_t res[CACHE_TXN_MAX_OPS];
    int ok = -1;
    int64_t rev = 0;
    int rc = s->ops->txn(s, cmps, ncmps, ops, nops, &ok, &rev, res);
    if (rc)
        return rc;
    see("txn succeeded", (uint64_t)ok);
    see("txn rev", (uint64_t)rev);
    uint64_t h = FNV0;
    for (size_t i = 0; ok && i < nops; i++) {
        h = fnv_u64(h, (uint64_t)res[i].deleted);
        h = fnv_u64(h, (uint64_t)res[i].has_prev);
        h = fnv_u64(h, (uint64_t)res[i].prev_create_rev);
        h = fnv_u64(h, (uint64_t)res[i].prev_version);
    }
    see("txn results", h);
    return 0;
}

static int m_put(cache_store_t *s, const char *k, const char *v, int64_t lease)
{
    cache_op_t o = put_op(k, v, lease);
    return m_txn(s, NULL, 0, &o, 1);
}

static uint64_t kvl_hash(const kvlist_t *l, bool lease_ids)
{
    uint64_t h = FNV0;
    for (size_t i = 0; i < l->n; i++) {
        const kvrec_t *r = &l->v[i];
        h = fnv(fnv_u64(h, r->keylen), r->key, r->keylen);
        h = fnv(fnv_u64(h, r->vallen), r->val, r->vallen);
        h = fnv_u64(h, (uint64_t)r->meta.create_rev);
        h = fnv_u64(h, (uint64_t)r->meta.mod_rev);
        h = fnv_u64(h, (uint64_t)r->meta.version);
        /* Lease IDs differ once a grant was revoked after a failed put. */
        h = fnv_u64(h,
                    lease_ids ? (uint64_t)r->meta.lease : r->meta.lease != 0);
    }
    return h;
}

/* A store range, recorded when it succeeds. */
static int m_range(cache_store_t *s,
                   const char *k,
                   size_t kl,
                   const char *end,
                   size_t el,
                   int64_t rev,
                   size_t limit)
{
    kvlist_t l = {0};
    int64_t hdr = 0;
    int more = -1;
    int rc = s->ops->range(s, k, kl, end, el, rev, limit, kvl_store_cb, &l,
                           &hdr, &more);
    if (!rc) {
        see("range keys", l.n);
        see("range hash", kvl_hash(&l, true));
        see("range rev", (uint64_t)hdr);
        see("range more", (uint64_t)more);
    }
    kvl_free(&l);
    return rc;
}

static void sc_memstore(void)
{
    cache_store_t *s = NULL;
    OK(cache_memstore_new(&s, NULL));
    see("rev", (uint64_t)cache_memstore_revision(s));
    wlog_t wa, wb, wc, wd;
    wlog_init(&wa);
    wlog_init(&wb);
    wlog_init(&wc);
    wlog_init(&wd);
    cache_watch_t *ha = NULL, *hb = NULL, *hc = NULL, *hd = NULL;
    OK(s->ops->watch(s, "", 0, "\0", 1, 0, wlog_cb, &wa, &ha));
    OK(s->ops->watch(s, "k", 1, "l", 1, 0, wlog_cb, &wb, &hb));

    /* Ten new keys in one write: the plan outgrows its stack space. */
    static char keys[CACHE_TXN_MAX_OPS][16];
    cache_op_t ops[CACHE_TXN_MAX_OPS];
    for (int i = 0; i < 10; i++) {
        snprintf(keys[i], sizeof(keys[i]), "k%02d", i);
        ops[i] = put_op(keys[i], "v0", 0);
    }
    OK(m_txn(s, NULL, 0, ops, 10));
    /* One key, version after version: its version list grows. */
    static const char *const vals[] = {"v0", "v1", "v2", "v3", "v4"};
    for (int i = 1; i <= 4; i++)
        OK(m_put(s, "k00", vals[i], 0));
    /* Compares that hold and that fail; deletes. */
    cache_cmp_t cmp = {.key = "k00",
                       .keylen = 3,
                       .target = CACHE_CMP_VERSION,
                       .result = CACHE_CMP_EQUAL,
                       .number = 5};
    cache_op_t one = put_op("k01", "vc", 0);
    OK(m_txn(s, &cmp, 1, &one, 1));
    cmp.number = 1;
    OK(m_txn(s, &cmp, 1, &one, 1));
    cache_cmp_t vcmp = {.key = "k01",
                        .keylen = 3,
                        .target = CACHE_CMP_VALUE,
                        .result = CACHE_CMP_EQUAL,
                        .value = "vc",
                        .vallen = 2};
    cache_op_t del = del_op("k05", "k08");
    OK(m_txn(s, &vcmp, 1, &del, 1));
    cache_op_t absent = del_op("zz", NULL);
    OK(m_txn(s, NULL, 0, &absent, 1)); /* Changes nothing: no revision. */
    cache_op_t dup[2] = {put_op("k01", "a", 0), put_op("k01", "b", 0)};
    CALL(COALESCE_EINVAL, m_txn(s, NULL, 0, dup, 2));

    OK(m_range(s, "", 0, "\0", 1, 0, 0));
    OK(m_range(s, "k", 1, "l", 1, 0, 3));
    OK(m_range(s, "k00", 3, NULL, 0, 3, 0));

    /* Seventeen leases outgrow the lease table and the expiry heap. */
    int64_t ids[17];
    for (int i = 0; i < 17; i++) {
        OK(s->ops->lease_grant(s, 600000, &ids[i]));
        see("lease", (uint64_t)ids[i]);
    }
    OK(m_put(s, "lk1", "x", ids[0]));
    OK(m_put(s, "lk2", "y", ids[0]));
    CALL(COALESCE_ENOENT, m_put(s, "lk3", "z", 999999));
    OK(s->ops->lease_revoke(s, ids[0]));
    see("rev after revoke", (uint64_t)cache_memstore_revision(s));
    CALL(COALESCE_ENOENT, s->ops->lease_revoke(s, ids[0]));
    for (int i = 1; i < 17; i++)
        OK(s->ops->lease_revoke(s, ids[i]));

    /* A watch from an old revision starts with a catch-up batch. */
    OK(s->ops->watch(s, "", 0, "\0", 1, 2, wlog_cb, &wc, &hc));
    /* Held deliveries: released in one batch, one by one, dropped. */
    OK(cache_memstore_hold(s, 1));
    OK(m_put(s, "h1", "a", 0));
    OK(m_put(s, "h2", "b", 0));
    OK(cache_memstore_progress(s));
    OK(cache_memstore_flush(s, CACHE_FLUSH_BATCH));
    OK(m_put(s, "h3", "c", 0));
    OK(cache_memstore_flush(s, CACHE_FLUSH_EACH));
    OK(m_put(s, "h4", "d", 0));
    OK(cache_memstore_flush(s, CACHE_FLUSH_DROP));
    OK(cache_memstore_hold(s, 0));

    /* Many keys (set up without failures: the puts are covered above):
     * a range of them outgrows its stack space, one delete of them all
     * outgrows the log. Three versions each leave room for the delete. */
    inj_pause();
    static char bkeys[128][16];
    for (int v = 0; v < 3; v++) {
        for (int i = 0; i < 128; i++) {
            snprintf(bkeys[i], sizeof(bkeys[i]), "b%03d", i);
            ops[i] = put_op(bkeys[i], vals[v], 0);
        }
        int ok = 0;
        ck_assert_int_eq(s->ops->txn(s, NULL, 0, ops, 128, &ok, NULL, NULL), 0);
    }
    inj_resume();
    OK(m_range(s, "b", 1, "c", 1, 0, 0));
    cache_op_t dall = del_op("b", "c");
    OK(m_txn(s, NULL, 0, &dall, 1));

    /* Compaction, by hand and automatic. */
    int64_t now = cache_memstore_revision(s);
    OK(cache_memstore_compact(s, now - 2));
    CALL(COALESCE_ECOMPACTED, m_range(s, "", 0, "\0", 1, now - 3, 0));
    CALL(COALESCE_ECOMPACTED, cache_memstore_compact(s, now - 2));
    OK(s->ops->watch(s, "", 0, "\0", 1, 2, wlog_cb, &wd, &hd));
    see("watches", (uint64_t)cache_memstore_watches(s));
    cache_memstore_opts_t mo;
    cache_memstore_opts_init(&mo);
    mo.auto_compact_revs = 2;
    cache_store_t *s2 = NULL;
    OK(cache_memstore_new(&s2, &mo));
    for (int i = 0; i < 4; i++)
        OK(m_put(s2, "a", vals[i], 0));
    CALL(COALESCE_ECOMPACTED, m_range(s2, "a", 1, NULL, 0, 2, 0));
    OK(m_range(s2, "a", 1, NULL, 0, 0, 0));
    cache_store_free(s2);

    /* A cut ends every watch, after what each was sent. */
    OK(cache_memstore_cut(s, COALESCE_EIO));
    see_wlog(&wa);
    see_wlog(&wb);
    see_wlog(&wc);
    see_wlog(&wd);
    s->ops->watch_cancel(s, ha);
    s->ops->watch_cancel(s, hb);
    s->ops->watch_cancel(s, hc);
    s->ops->watch_cancel(s, hd);
    see("watches", (uint64_t)cache_memstore_watches(s));
    cache_store_free(s);
    wlog_destroy(&wa);
    wlog_destroy(&wb);
    wlog_destroy(&wc);
    wlog_destroy(&wd);
}

/*
 * Lease expiry, on the store's own thread: while the test waits, that
 * thread is the only one allocating, so it meets the failure, and must
 * try again.
 */
static void sc_memstore_expiry(void)
{
    inj_pause();
    cache_store_t *s = NULL;
    ck_assert_int_eq(cache_memstore_new(&s, NULL), 0);
    wlog_t wl;
    wlog_init(&wl);
    cache_watch_t *h = NULL;
    ck_assert_int_eq(s->ops->watch(s, "", 0, "\0", 1, 0, wlog_cb, &wl, &h), 0);
    /* Short, so that runs are quick; longer if the machine was too slow
     * to put the key before it expired (setup: no failures counted). */
    int64_t id = 0, before = 0;
    int rc = COALESCE_ENOENT;
    for (int ttl = (int)(test_timeout(0.05) * 1000);
         rc == COALESCE_ENOENT && ttl < 60000; ttl *= 2) {
        ck_assert_int_eq(s->ops->lease_grant(s, ttl, &id), 0);
        cache_op_t op = put_op("e1", "expires", id);
        int ok = 0;
        rc = s->ops->txn(s, NULL, 0, &op, 1, &ok, &before, NULL);
    }
    ck_assert_int_eq(rc, 0);
    inj_resume(); /* Had it expired already, this run just meets no failure. */
    double until = now_ms() + test_timeout(10) * 1000;
    while (cache_memstore_revision(s) == before && now_ms() < until)
        nap_ms(1);
    inj_pause();
    see("expired", (uint64_t)(cache_memstore_revision(s) - before));
    CALL(COALESCE_ENOENT, s->ops->lease_revoke(s, id));
    OK(m_range(s, "e1", 2, NULL, 0, 0, 0));
    OK(cache_memstore_cut(s, COALESCE_EIO));
    see_wlog(&wl);
    s->ops->watch_cancel(s, h);
    cache_store_free(s);
    wlog_destroy(&wl);
}

START_TEST(oom_memstore)
{
    points_t pt = {0, 0};
    drive(&pt, "memstore", sc_memstore);
    drive(&pt, "memstore expiry", sc_memstore_expiry);
    report_points("memstore", &pt);
}
END_TEST

/* =========================================================================
 * The write-through cache (over the in-memory store)
 * ========================================================================= */

static replog_t rlog;

/* The cache's copy of everything under pfx equals the store's, and is
 * recorded. */
static void see_cache(cache_t *c, cache_store_t *s, const char *pfx)
{
    kvlist_t a = {0}, b = {0};
    size_t len = strlen(pfx);
    char end[16];
    ck_assert_uint_lt(len, sizeof(end));
    memcpy(end, pfx, len);
    end[len - 1]++;
    OK(cache_scan(c, pfx, len, kvl_scan_cb, &a));
    int64_t hdr = 0;
    int more = 0;
    OK(s->ops->range(s, pfx, len, end, len, 0, 0, kvl_store_cb, &b, &hdr,
                     &more));
    char msg[400];
    ck_assert_msg(kvl_diff(&a, &b, msg, sizeof(msg)) == 0,
                  "n=%ld: the cache differs from the store: %s", inj.n, msg);
    see("cache entries", a.n);
    see("cache hash", kvl_hash(&a, false));
    cache_health_t h;
    OK(cache_health(c, &h, sizeof(h)));
    see("health entries", h.entries);
    kvl_free(&a);
    kvl_free(&b);
}

/*
 * Lets the held watch deliver everything up to the store's revision and
 * waits until the cache has applied it, then holds again. A watch that
 * broke on the failure resumes from its last applied revision: more
 * progress notifications bring it up to date.
 */
static void settle(cache_t *c, cache_store_t *s)
{
    int64_t rev = cache_memstore_revision(s);
    OK(cache_memstore_progress(s));
    ck_assert_int_eq(cache_memstore_hold(s, 0), 0);
    double until = now_ms() + test_timeout(10) * 1000;
    int rc;
    while ((rc = cache_wait_fresh(c, rev, 20)) == COALESCE_ETIMEDOUT &&
           now_ms() < until)
        OK(cache_memstore_progress(s));
    ck_assert_msg(rc == 0,
                  "n=%ld: the cache did not reach revision %" PRId64 ": %s",
                  inj.n, rev, coalesce_err_name(rc));
    ck_assert_int_eq(cache_memstore_hold(s, 1), 0);
}

/* Waits until the watch was resumed and relisted that many times. */
static void wait_running(cache_t *c, uint64_t reconnects, uint64_t relists)
{
    double until = now_ms() + test_timeout(10) * 1000;
    cache_health_t h;
    for (;;) {
        ck_assert_int_eq(cache_health(c, &h, sizeof(h)), 0);
        if ((h.reconnects >= reconnects && h.relists >= relists &&
             h.state == CACHE_RUNNING) ||
            now_ms() >= until)
            break;
        nap_ms(1);
    }
    ck_assert_msg(h.state == CACHE_RUNNING && h.reconnects >= reconnects &&
                      h.relists >= relists,
                  "n=%ld: state %d, %" PRIu64 " reconnects, %" PRIu64
                  " relists",
                  inj.n, h.state, h.reconnects, h.relists);
}

/*
 * A store that forwards to an in-memory store and can hold a cache's
 * relist after its last page while the test writes through the cache, so
 * that the relist has writes newer than its list to merge.
 */
typedef struct gstore {
    cache_store_t base;
    cache_store_t *in;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool armed; /* The next last page waits for gs_release(). */
    bool held;
} gstore_t;

static gstore_t *GS(cache_store_t *s)
{
    return (gstore_t *)(void *)s;
}

static int gs_range(cache_store_t *s,
                    const void *key,
                    size_t keylen,
                    const void *end,
                    size_t endlen,
                    int64_t rev,
                    size_t limit,
                    cache_kv_cb cb,
                    void *data,
                    int64_t *header_rev,
                    int *more)
{
    gstore_t *g = GS(s);
    int m = 0;
    int rc = g->in->ops->range(g->in, key, keylen, end, endlen, rev, limit, cb,
                               data, header_rev, &m);
    if (more)
        *more = m;
    pthread_mutex_lock(&g->mu);
    if (g->armed && !rc && !m) {
        g->armed = false;
        g->held = true;
        pthread_cond_broadcast(&g->cv);
        while (g->held)
            pthread_cond_wait(&g->cv, &g->mu);
    }
    pthread_mutex_unlock(&g->mu);
    return rc;
}

static int gs_txn(cache_store_t *s,
                  const cache_cmp_t *cmps,
                  size_t ncmps,
                  const cache_op_t *ops,
                  size_t nops,
                  int *succeeded,
                  int64_t *rev,
                  cache_op_result_t *results)
{
    cache_store_t *in = GS(s)->in;
    return in->ops->txn(in, cmps, ncmps, ops, nops, succeeded, rev, results);
}

static int gs_watch(cache_store_t *s,
                    const void *key,
                    size_t keylen,
                    const void *end,
                    size_t endlen,
                    int64_t start_rev,
                    cache_watch_cb cb,
                    void *data,
                    cache_watch_t **out)
{
    cache_store_t *in = GS(s)->in;
    return in->ops->watch(in, key, keylen, end, endlen, start_rev, cb, data,
                          out);
}

static void gs_watch_cancel(cache_store_t *s, cache_watch_t *w)
{
    cache_store_t *in = GS(s)->in;
    in->ops->watch_cancel(in, w);
}

static int gs_lease_grant(cache_store_t *s, int64_t ttl_ms, int64_t *id)
{
    cache_store_t *in = GS(s)->in;
    return in->ops->lease_grant(in, ttl_ms, id);
}

static int gs_lease_revoke(cache_store_t *s, int64_t id)
{
    cache_store_t *in = GS(s)->in;
    return in->ops->lease_revoke(in, id);
}

static void gs_destroy(cache_store_t *s)
{
    (void)s; /* The test frees both stores itself. */
}

static const cache_store_ops_t gs_ops = {
    .version = CACHE_STORE_OPS_VERSION,
    .range = gs_range,
    .txn = gs_txn,
    .watch = gs_watch,
    .watch_cancel = gs_watch_cancel,
    .lease_grant = gs_lease_grant,
    .lease_revoke = gs_lease_revoke,
    .destroy = gs_destroy,
};

static void gs_init(gstore_t *g, cache_store_t *in)
{
    memset(g, 0, sizeof(*g));
    g->base.ops = &gs_ops;
    g->in = in;
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, NULL);
}

static void gs_fini(gstore_t *g)
{
    pthread_cond_destroy(&g->cv);
    pthread_mutex_destroy(&g->mu);
}

static void gs_arm(gstore_t *g)
{
    pthread_mutex_lock(&g->mu);
    g->armed = true;
    pthread_mutex_unlock(&g->mu);
}

/* Waits until a range is held. */
static void gs_wait_held(gstore_t *g)
{
    double until = now_ms() + test_timeout(10) * 1000;
    pthread_mutex_lock(&g->mu);
    while (!g->held && now_ms() < until) {
        pthread_mutex_unlock(&g->mu);
        nap_ms(1);
        pthread_mutex_lock(&g->mu);
    }
    bool held = g->held;
    pthread_mutex_unlock(&g->mu);
    ck_assert_msg(held, "n=%ld: the relist did not come", inj.n);
}

static void gs_release(gstore_t *g)
{
    pthread_mutex_lock(&g->mu);
    g->held = false;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

static void sc_cache(void)
{
    cache_store_t *s = NULL;
    OK(cache_memstore_new(&s, NULL));
    /* Loaded in pages of three; one key longer than the others. */
    static const char *const init[] = {"p/a", "p/b", "p/c",  "p/d",
                                       "p/e", "p/f", "p/g",  "p/h",
                                       "p/i", "p/j", "p/hh", "q/x"};
    cache_op_t ops[12];
    for (int i = 0; i < 12; i++)
        ops[i] = put_op(init[i], init[i], 0);
    OK(m_txn(s, NULL, 0, ops, 12));
    cache_opts_t o;
    cache_opts_init(&o);
    o.page_size = 3;
    o.backoff_min_ms = 1;
    o.backoff_max_ms = 2;
    o.report = replog_cb;
    o.report_data = &rlog;
    gstore_t gs;
    gs_init(&gs, s);
    cache_t *c = NULL;
    OK(cache_new(&c, &gs.base, "p/", 2, &o));
    CALL(COALESCE_ENOTSTARTED, cache_get(c, "p/a", 3, NULL, NULL));
    /* Deliveries are held while the test calls the cache, so that only
     * this thread allocates; settle() lets the watch catch up. */
    OK(cache_memstore_hold(s, 1));
    OK(cache_start(c));
    CALL(COALESCE_EBUSY, cache_start(c));
    see_cache(c, s, "p/");
    coalesce_buf_t *v = NULL;
    cache_meta_t m, bm, dm, fm, gm;
    OK(cache_get(c, "p/a", 3, &v, &m));
    see("get value", fnv(FNV0, coalesce_buf_data(v), coalesce_buf_len(v)));
    see("get mod", (uint64_t)m.mod_rev);
    coalesce_buf_unref(v);
    CALL(COALESCE_ENOENT, cache_get(c, "p/zz", 4, NULL, NULL));
    CALL(COALESCE_EINVAL, cache_get(c, "q/x", 3, NULL, NULL));
    OK(cache_get(c, "p/b", 3, NULL, &bm));
    OK(cache_get(c, "p/d", 3, NULL, &dm));
    OK(cache_get(c, "p/f", 3, NULL, &fm));
    OK(cache_get(c, "p/g", 3, NULL, &gm));

    /* First, a delete of a key the watch has not brought yet: memory
     * keeps a tombstone for it (the first tombstone of this copy). */
    int64_t rev = 0, deleted = 0;
    OK(m_put(s, "p/o2", "unseen", 0));
    OK(cache_delete(c, "p/o2", 4, &deleted, &rev));
    see("deleted", (uint64_t)deleted);
    see("rev", (uint64_t)rev);
    settle(c, s);
    see_cache(c, s, "p/");

    /* Every kind of write. */
    OK(cache_put(c, "p/n1", 4, "new", 3, NULL, &rev));
    see("rev", (uint64_t)rev);
    OK(cache_create(c, "p/n2", 4, "created", 7, NULL, &rev));
    see("rev", (uint64_t)rev);
    CALL(COALESCE_EEXIST, cache_create(c, "p/n2", 4, "again", 5, NULL, &rev));
    see("rev", (uint64_t)rev);
    OK(cache_update(c, "p/b", 3, "updated", 7, bm.mod_rev, NULL, &rev));
    see("rev", (uint64_t)rev);
    CALL(COALESCE_ECONFLICT,
         cache_update(c, "p/b", 3, "stale", 5, bm.mod_rev, NULL, &rev));
    OK(cache_delete(c, "p/c", 3, &deleted, &rev));
    see("deleted", (uint64_t)deleted);
    OK(cache_delete_value(c, "p/d", 3, dm.mod_rev, &rev));
    see("rev", (uint64_t)rev);
    OK(cache_delete_prefix(c, "p/e", 3, &deleted, &rev));
    see("deleted", (uint64_t)deleted);
    cache_put_opts_t po = {.ttl_ms = 600000};
    OK(cache_put(c, "p/l1", 4, "leased", 6, &po, &rev));
    see("rev", (uint64_t)rev);
    settle(c, s);
    see_cache(c, s, "p/");
    OK(cache_get(c, "p/l1", 4, NULL, &m));
    cache_put_opts_t po2 = {.lease = m.lease};
    OK(cache_put(c, "p/l2", 4, "same lease", 10, &po2, &rev));

    /* One transaction of every kind of operation. */
    cache_txn_op_t tx[6] = {
        {CACHE_TXN_PUT, "p/t1", 4, "t1", 2, 0, NULL},
        {CACHE_TXN_CREATE, "p/t2", 4, "t2", 2, 0, &po},
        {CACHE_TXN_UPDATE, "p/f", 3, "f2", 2, fm.mod_rev, NULL},
        {CACHE_TXN_DELETE, "p/h", 3, NULL, 0, 0, NULL},
        {CACHE_TXN_DELETE_VALUE, "p/g", 3, NULL, 0, gm.mod_rev, NULL},
        {CACHE_TXN_DELETE_PREFIX, "p/i", 3, NULL, 0, 0, NULL},
    };
    OK(cache_txn(c, tx, 6, &rev));
    see("rev", (uint64_t)rev);
    settle(c, s);
    see_cache(c, s, "p/");

    /* Another writer: the watch brings its changes. */
    cache_op_t other[3] = {put_op("p/o1", "other", 0),
                           put_op("p/a", "changed", 0), del_op("p/j", NULL)};
    OK(m_txn(s, NULL, 0, other, 3));
    settle(c, s);
    see_cache(c, s, "p/");
    CALL(COALESCE_ETIMEDOUT,
         cache_wait_fresh(c, cache_memstore_revision(s) + 1, 0));

    /* A cut watch resumes after what it applied. */
    cache_health_t h;
    OK(cache_health(c, &h, sizeof(h)));
    see("watch rev", (uint64_t)h.watch_rev);
    OK(cache_memstore_cut(s, COALESCE_EIO));
    wait_running(c, h.reconnects + 1, h.relists);
    OK(m_put(s, "p/o3", "after the cut", 0));
    settle(c, s);
    see_cache(c, s, "p/");

    /* A cut after a compaction past what the cache has seen: it relists
     * on its own thread. Its last page is held while the test writes
     * through, so the relist also merges writes newer than its list. */
    OK(cache_health(c, &h, sizeof(h)));
    OK(m_put(s, "p/o4", "lost", 0));
    OK(m_put(s, "p/o5", "lost too", 0));
    OK(cache_memstore_compact(s, cache_memstore_revision(s)));
    gs_arm(&gs);
    OK(cache_memstore_cut(s, COALESCE_EIO));
    gs_wait_held(&gs);
    OK(cache_put(c, "p/r1", 4, "during the relist", 17, NULL, &rev));
    see("rev", (uint64_t)rev);
    OK(cache_delete_prefix(c, "p/o1", 4, &deleted, &rev));
    see("deleted", (uint64_t)deleted);
    gs_release(&gs);
    wait_running(c, h.reconnects + 1, h.relists + 1);
    settle(c, s);
    see_cache(c, s, "p/");

    /* Stopped, and started again. */
    cache_stop(c);
    CALL(COALESCE_ENOTSTARTED, cache_put(c, "p/x", 3, "x", 1, NULL, &rev));
    OK(cache_start(c));
    settle(c, s);
    see_cache(c, s, "p/");
    cache_free(c);
    gs_fini(&gs);
    cache_store_free(s);
}

/*
 * Sizes past the first allocations (set up without failures): the 385th
 * key grows the hash table, a scan of them all outgrows its stack space,
 * and a delete of 336 keys at one revision outgrows the tombstone list and
 * the watch's stack space for one response.
 */
static void sc_cache_bulk(void)
{
    inj_pause();
    cache_store_t *s = NULL;
    ck_assert_int_eq(cache_memstore_new(&s, NULL), 0);
    cache_t *c = NULL;
    ck_assert_int_eq(cache_new(&c, s, "p/", 2, NULL), 0);
    ck_assert_int_eq(cache_memstore_hold(s, 1), 0);
    ck_assert_int_eq(cache_start(c), 0);
    static char keys[384][16];
    cache_op_t ops[CACHE_TXN_MAX_OPS];
    for (int i = 0; i < 384; i++)
        snprintf(keys[i], sizeof(keys[i]), i < 48 ? "p/s%02d" : "p/z%03d",
                 i < 48 ? i : i - 48);
    int ok = 0;
    for (int i = 0; i < 48; i++)
        ops[i] = put_op(keys[i], "small", 0);
    ck_assert_int_eq(s->ops->txn(s, NULL, 0, ops, 48, &ok, NULL, NULL), 0);
    /* Three versions each: their delete needs no room in the store. */
    static const char *const vals[] = {"z0", "z1", "z2"};
    for (int v = 0; v < 3; v++) {
        for (int at = 48; at < 384; at += 112) {
            for (int i = 0; i < 112; i++)
                ops[i] = put_op(keys[at + i], vals[v], 0);
            ck_assert_int_eq(s->ops->txn(s, NULL, 0, ops, 112, &ok, NULL, NULL),
                             0);
        }
    }
    settle(c, s);
    inj_resume();

    int64_t rev = 0, deleted = 0;
    OK(cache_put(c, "p/s48", 5, "grows", 5, NULL, &rev));
    see("rev", (uint64_t)rev);
    settle(c, s);
    see_cache(c, s, "p/");
    OK(cache_delete_prefix(c, "p/z", 3, &deleted, &rev));
    see("deleted", (uint64_t)deleted);
    settle(c, s);
    see_cache(c, s, "p/");

    inj_pause();
    cache_free(c);
    cache_store_free(s);
}

START_TEST(oom_cache)
{
    replog_init(&rlog);
    points_t pt = {0, 0};
    drive(&pt, "cache", sc_cache);
    drive(&pt, "cache bulk", sc_cache_bulk);
    report_points("cache", &pt);
    replog_destroy(&rlog);
}
END_TEST

/* =========================================================================
 * Thread creation
 * ========================================================================= */

static struct rlimit as_saved;

/*
 * Lowers the address-space limit so that `threads` more thread stacks fit
 * and no more: the one way to make pthread_create() fail, which the
 * library reports as COALESCE_ENOMEM. glibc reuses the stacks of joined
 * threads without mapping anything, so this works only in a process that
 * has joined none yet: best effort, and each call checks both outcomes.
 */
static void as_limit(int threads)
{
    pthread_attr_t a;
    size_t stack = 0;
    ck_assert_int_eq(pthread_attr_init(&a), 0);
    ck_assert_int_eq(pthread_attr_getstacksize(&a, &stack), 0);
    pthread_attr_destroy(&a);
    unsigned long pages = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(fscanf(f, "%lu", &pages), 1);
    fclose(f);
    rlim_t vm = (rlim_t)pages * (rlim_t)sysconf(_SC_PAGESIZE);
    ck_assert_int_eq(getrlimit(RLIMIT_AS, &as_saved), 0);
    struct rlimit r = as_saved;
    r.rlim_cur = vm + (rlim_t)threads * (stack + (1u << 20)) + stack / 2;
    ck_assert_int_eq(setrlimit(RLIMIT_AS, &r), 0);
}

static void as_restore(void)
{
    ck_assert_int_eq(setrlimit(RLIMIT_AS, &as_saved), 0);
}

static int threads_failed, threads_tried;

/* A call made with a thread creation failing, if the limit worked. */
static int thread_call(int rc)
{
    as_restore();
    ck_assert_msg(rc == 0 || rc == COALESCE_ENOMEM, "%s",
                  coalesce_err_name(rc));
    threads_tried++;
    threads_failed += rc == COALESCE_ENOMEM;
    return rc;
}

START_TEST(oom_threads)
{
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
    printf("oom: threads: skipped (a sanitizer needs the address space)\n");
    return;
#endif
    const char *vg = getenv("CK_VALGRIND"), *fork = getenv("CK_FORK");
    if ((vg && *vg == '1') || (fork && strcmp(fork, "no") == 0)) {
        printf("oom: threads: skipped (needs a process of its own)\n");
        return;
    }
    LEAK_START();
    /* The store's lease thread. */
    cache_store_t *s = NULL;
    as_limit(0);
    if (thread_call(cache_memstore_new(&s, NULL)))
        ck_assert_int_eq(cache_memstore_new(&s, NULL), 0);
    cache_op_t op = put_op("p/k", "v", 0);
    int ok = 0;
    ck_assert_int_eq(s->ops->txn(s, NULL, 0, &op, 1, &ok, NULL, NULL), 0);

    /* A watch's thread; its catch-up response goes with it. */
    wlog_t wl;
    wlog_init(&wl);
    cache_watch_t *h = NULL;
    as_limit(0);
    if (!thread_call(s->ops->watch(s, "", 0, "\0", 1, 2, wlog_cb, &wl, &h)))
        s->ops->watch_cancel(s, h);
    ck_assert_int_eq(cache_memstore_watches(s), 0);
    wlog_destroy(&wl);

    /* cache_start(): the reporter thread; then, with room for the watch's
     * thread only, the supervisor. Either way the cache stays stopped and
     * starts later. */
    cache_opts_t o;
    cache_opts_init(&o);
    o.report = replog_cb;
    o.report_data = &rlog;
    replog_init(&rlog);
    cache_t *c = NULL, *c2 = NULL;
    ck_assert_int_eq(cache_new(&c, s, "p/", 2, &o), 0);
    ck_assert_int_eq(cache_new(&c2, s, "p/", 2, NULL), 0);
    cache_health_t hh;
    as_limit(0);
    if (!thread_call(cache_start(c)))
        cache_stop(c);
    ck_assert_int_eq(cache_health(c, &hh, sizeof(hh)), 0);
    ck_assert_int_eq(hh.state, CACHE_STOPPED);
    as_limit(1);
    if (!thread_call(cache_start(c2)))
        cache_stop(c2);
    ck_assert_int_eq(cache_health(c2, &hh, sizeof(hh)), 0);
    ck_assert_int_eq(hh.state, CACHE_STOPPED);
    ck_assert_int_eq(cache_memstore_watches(s), 0);
    ck_assert_int_eq(cache_start(c), 0);
    ck_assert_int_eq(cache_start(c2), 0);
    ck_assert_int_eq(cache_get(c, "p/k", 3, NULL, NULL), 0);
    ck_assert_int_eq(cache_get(c2, "p/k", 3, NULL, NULL), 0);
    cache_free(c);
    cache_free(c2);
    cache_store_free(s);
    replog_destroy(&rlog);
    LEAK_CHECK();
    printf("oom: threads: %d of %d thread creations failed\n", threads_failed,
           threads_tried);
    fflush(stdout);
}
END_TEST

Suite *make_oom_suite(void)
{
    Suite *s = suite_create("oom");
    tcase_add_test(tcase(s, "oom_buf", 30), oom_buf);
    tcase_add_test(tcase(s, "oom_flight", 120), oom_flight);
    tcase_add_test(tcase(s, "oom_uv", 60), oom_uv);
    tcase_add_test(tcase(s, "oom_memstore", 120), oom_memstore);
    tcase_add_test(tcase(s, "oom_cache", 120), oom_cache);
    tcase_add_test(tcase(s, "oom_threads", 30), oom_threads);
    return s;
}

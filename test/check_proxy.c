/*
 * End-to-end tests of the example proxy (examples/proxy.c) in front of the
 * example origin (examples/origin.c), both run as child processes on
 * 127.0.0.1 through the harness in e2e.h.
 *
 * Each test starts its own origin and proxy with the flags it needs and
 * stops them at its end: the proxy must exit with status 0 (its loop
 * closed; under ASan, nothing leaked). What the proxy did is read from the
 * responses, from its /__coalesce/stats and from the origin's
 * /__origin/stats, never assumed from timing. Counters that settle after a
 * client has gone are polled a bounded number of times.
 */
#include "helpers.h"

#include "e2e.h"

#include <arpa/inet.h>
#include <errno.h>
#include <http_parser.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* The client side of every run gives up after this (ms); the client is
 * this process, slowed down under valgrind. */
#define RUN_MS ((int)test_timeout(20) * 1000)

/* --- Processes ------------------------------------------------------------ */

typedef struct world {
    e2e_proc_t origin, proxy;
} world_t;

/* Starts an origin and a proxy in front of it; flags are extra proxy
 * arguments (NULL-terminated), or NULL. */
static void world_up(world_t *w, const char *const *flags)
{
    const char *oargv[] = {e2e_bin("origin"), "--listen", "127.0.0.1:0", NULL};
    ck_assert_int_eq(e2e_spawn(&w->origin, oargv), 0);

    char upstream[64];
    snprintf(upstream, sizeof(upstream), "http://127.0.0.1:%d", w->origin.port);
    const char *pargv[24] = {e2e_bin("proxy"), "--listen", "127.0.0.1:0",
                             "--upstream", upstream};
    size_t n = 5;
    for (size_t i = 0; flags && flags[i]; i++) {
        ck_assert_uint_lt(n, sizeof(pargv) / sizeof(pargv[0]) - 1);
        pargv[n++] = flags[i];
    }
    pargv[n] = NULL;
    ck_assert_int_eq(e2e_spawn(&w->proxy, pargv), 0);
}

/* SIGTERM to both: each must close its loop and exit 0. */
static void world_down(world_t *w)
{
    ck_assert_int_eq(e2e_stop(&w->proxy), 0);
    ck_assert_int_eq(e2e_stop(&w->origin), 0);
}

static void nap_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* --- Counters ------------------------------------------------------------- */

static char *get_json(int port, const char *path)
{
    char *body = NULL;
    int status = 0;
    ck_assert_msg(e2e_get(port, path, &body, &status) == 0, "GET %s failed",
                  path);
    ck_assert_int_eq(status, 200);
    return body;
}

static uint64_t json_num(const char *json, const char *key)
{
    uint64_t v = 0;
    ck_assert_msg(e2e_json_u64(json, key, &v) == 0, "no number at %s in %s",
                  key, json);
    return v;
}

/* A counter of the proxy's /__coalesce/stats, e.g. "flight.joins". */
static uint64_t proxy_stat(const world_t *w, const char *key)
{
    char *json = get_json(w->proxy.port, "/__coalesce/stats");
    uint64_t v = json_num(json, key);
    free(json);
    return v;
}

/* A per-path counter of the origin: requests, gets, heads, body_bytes. */
static uint64_t origin_stat(const world_t *w, const char *path, const char *k)
{
    char key[256];
    snprintf(key, sizeof(key), "paths.%s.%s", path, k);
    char *json = get_json(w->origin.port, "/__origin/stats");
    uint64_t v = json_num(json, key);
    free(json);
    return v;
}

/*
 * Polls a proxy counter until it equals want (at most ~4 s) and returns its
 * last value: for gauges that settle once the proxy has seen a client go
 * or an upstream transfer end, which no response tells us about.
 */
static uint64_t settle(const world_t *w, const char *key, uint64_t want)
{
    uint64_t v = 0;
    for (int i = 0; i < 400; i++) {
        if ((v = proxy_stat(w, key)) == want)
            break;
        nap_ms(10);
    }
    return v;
}

/* Everything the proxy held for clients is released. The stats request
 * itself is the one connection left open. */
static void assert_proxy_idle(const world_t *w)
{
    ck_assert_uint_eq(settle(w, "flight.readers_open", 0), 0);
    ck_assert_uint_eq(settle(w, "flight.flights_active", 0), 0);
    ck_assert_uint_eq(settle(w, "conns_open", 1), 1);
}

typedef struct span {
    uint64_t first, last; /* last is UINT64_MAX for "a-" */
} span_t;

/*
 * The Range values the origin received for path, each "a-b" or "a-"
 * (asserted). Returns how many, at most cap.
 */
static size_t
origin_ranges(const world_t *w, const char *path, span_t *out, size_t cap)
{
    char *json = get_json(w->origin.port, "/__origin/stats");
    char pat[256];
    snprintf(pat, sizeof(pat), "\"%s\":{", path);
    const char *p = strstr(json, pat);
    ck_assert_msg(p != NULL, "origin stats lack %s: %s", path, json);
    p = strstr(p, "\"ranges\":[");
    ck_assert_ptr_nonnull(p);
    p += strlen("\"ranges\":[");
    size_t n = 0;
    while (*p == '"') {
        unsigned long long a, b;
        int used = 0;
        ck_assert_uint_lt(n, cap);
        if (sscanf(p, "\"%llu-%llu\"%n", &a, &b, &used) == 2 && used) {
            out[n].first = a;
            out[n].last = b;
        } else if (sscanf(p, "\"%llu-\"%n", &a, &used) == 1 && used) {
            out[n].first = a;
            out[n].last = UINT64_MAX;
        } else {
            ck_abort_msg("unexpected origin range at %.40s", p);
        }
        n++;
        p += used;
        if (*p == ',')
            p++;
    }
    ck_assert_int_eq(*p, ']');
    free(json);
    return n;
}

/* --- Requests ------------------------------------------------------------- */

static void
req_init(e2e_req_t *r, const world_t *w, const char *method, const char *path)
{
    memset(r, 0, sizeof(*r));
    r->port = w->proxy.port;
    r->method = method;
    r->path = path;
    r->verify = 1;
}

/* A whole object arrived, byte for byte. */
static void assert_full(const e2e_req_t *r, uint64_t size)
{
    ck_assert_msg(r->error == E2E_OK && r->complete,
                  "%s: error %d complete %d after %" PRIu64 " bytes", r->path,
                  r->error, r->complete, r->body_bytes);
    ck_assert_int_eq(r->status, 200);
    ck_assert_int_eq(r->content_length, (int64_t)size);
    ck_assert_uint_eq(r->body_bytes, size);
    ck_assert_uint_eq(r->mismatches, 0);
}

/* The proxy is still running (a crash would otherwise show only as
 * clients cut short). */
static void assert_alive(const world_t *w)
{
    int st = 0;
    pid_t pid = waitpid(w->proxy.pid, &st, WNOHANG);
    ck_assert_msg(pid == 0, "the proxy is gone: %s %d",
                  WIFSIGNALED(st) ? "signal" : "exit status",
                  WIFSIGNALED(st) ? WTERMSIG(st) : WEXITSTATUS(st));
}

/* Runs the requests together; returns how many failed. */
static int run(const world_t *w, e2e_req_t *r, size_t n)
{
    int failed = e2e_run(r, n, RUN_MS);
    ck_assert_int_ge(failed, 0);
    assert_alive(w);
    return failed;
}

/* One request, run alone. */
static void run_one(const world_t *w, e2e_req_t *r)
{
    run(w, r, 1);
}

/* --- 1. Cold GETs collapse into one upstream fetch ------------------------ */

START_TEST(proxy_collapse_cold_gets)
{
    enum { N = 100 };
    const uint64_t size = 4 * MiB;
    const char *path = "/t1-collapse?size=4194304&ttfb=50&rate=67108864";
    world_t w;
    world_up(&w, NULL);

    static e2e_req_t r[N];
    for (int i = 0; i < N; i++)
        req_init(&r[i], &w, NULL, path);
    ck_assert_int_eq(run(&w, r, N), 0);

    int leader = -1, collapsed = 0;
    for (int i = 0; i < N; i++) {
        assert_full(&r[i], size);
        if (!strcmp(r[i].x_cache, "MISS")) {
            ck_assert_msg(leader < 0, "two leaders: %d and %d", leader, i);
            leader = i;
        } else {
            ck_assert_str_eq(r[i].x_cache, "COLLAPSED");
            collapsed++;
        }
    }
    ck_assert_int_ge(leader, 0);
    ck_assert_int_eq(collapsed, N - 1);

    /* Streaming, not store-and-forward: every waiter had its first byte
     * before the leader had its last (a cache lock would hold them all
     * until the leader's fill is done), indeed before the leader was half
     * way through. */
    double ttfb[N];
    size_t nw = 0;
    int64_t half = r[leader].t_first_body +
                   (r[leader].t_done - r[leader].t_first_body) / 2;
    for (int i = 0; i < N; i++) {
        if (i == leader)
            continue;
        ck_assert_msg(
            r[i].t_first_body < r[leader].t_done && r[i].t_first_body < half,
            "waiter %d first byte at %" PRId64 " us, leader first at %" PRId64
            " us, done at %" PRId64 " us",
            i, r[i].t_first_body, r[leader].t_first_body, r[leader].t_done);
        ttfb[nw++] = (double)r[i].t_first_body / 1000;
    }
    double p99 = e2e_percentile(ttfb, nw, 99);
    printf("proxy: waiter ttfb p99 - leader ttfb = %.2f ms (leader ttfb "
           "%.2f ms, leader done %.2f ms)\n",
           p99 - (double)r[leader].t_first_body / 1000,
           (double)r[leader].t_first_body / 1000,
           (double)r[leader].t_done / 1000);
    fflush(stdout);

    ck_assert_uint_eq(origin_stat(&w, "/t1-collapse", "requests"), 1);
    ck_assert_uint_eq(proxy_stat(&w, "upstream_requests"), 1);
    ck_assert_uint_eq(proxy_stat(&w, "flight.flights_started"), 1);
    ck_assert_uint_eq(proxy_stat(&w, "flight.joins"), N - 1);
    ck_assert_uint_eq(proxy_stat(&w, "misses"), 1);
    ck_assert_uint_eq(proxy_stat(&w, "collapsed"), N - 1);
    assert_proxy_idle(&w);
    world_down(&w);
}
END_TEST

/* --- 2. Concurrent ranges fetch each byte once ---------------------------- */

static uint64_t rng_next(uint64_t *s)
{
    uint64_t x = (*s += 0x9E3779B97F4A7C15ull);
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

START_TEST(proxy_ranges_fetch_once)
{
    enum { N = 50, NCHUNK = 8 };
    const uint64_t C = MiB, size = NCHUNK * MiB;
    const char *path = "/t2-ranges?size=8388608&ttfb=50&rate=33554432";
    /* Chunks 4 and 5 are never asked for: fetching them would show. */
    static const int small_chunks[] = {0, 1, 2, 3, 6, 7};
    static const int boundaries[] = {1, 2, 3, 7}; /* chunk k-1 | chunk k */
    world_t w;
    world_up(&w, (const char *[]){"--chunk-size", "1048576", NULL});

    static e2e_req_t r[N];
    static char hdr[N][64];
    span_t want[N];
    int touched[NCHUNK] = {0};
    uint64_t seed = 42;
    for (int i = 0; i < N; i++) {
        uint64_t a, b = 0;
        int open = 0;
        switch (i % 3) {
        case 0: { /* small, inside one chunk */
            int k = small_chunks[rng_next(&seed) % 6];
            uint64_t len = 1 + rng_next(&seed) % 4096;
            a = k * C + rng_next(&seed) % (C - len);
            b = a + len - 1;
            break;
        }
        case 1: { /* across a chunk boundary */
            int k = boundaries[rng_next(&seed) % 4];
            a = k * C - 1 - rng_next(&seed) % 200000;
            b = k * C + rng_next(&seed) % 200000;
            break;
        }
        default: /* open-ended, from chunk 6 or 7 */
            a = 6 * C + rng_next(&seed) % (2 * C);
            open = 1;
            break;
        }
        if (open) {
            snprintf(hdr[i], sizeof(hdr[i]), "Range: bytes=%" PRIu64 "-\r\n",
                     a);
            b = size - 1;
        } else {
            snprintf(hdr[i], sizeof(hdr[i]),
                     "Range: bytes=%" PRIu64 "-%" PRIu64 "\r\n", a, b);
        }
        want[i].first = a;
        want[i].last = b;
        for (uint64_t k = a / C; k <= b / C; k++)
            touched[k] = 1;
        req_init(&r[i], &w, NULL, path);
        r[i].headers = hdr[i];
    }
    ck_assert_int_eq(run(&w, r, N), 0);

    for (int i = 0; i < N; i++) {
        char cr[80];
        uint64_t len = want[i].last - want[i].first + 1;
        snprintf(cr, sizeof(cr), "bytes %" PRIu64 "-%" PRIu64 "/%" PRIu64,
                 want[i].first, want[i].last, size);
        ck_assert_int_eq(r[i].status, 206);
        ck_assert_str_eq(r[i].content_range, cr);
        ck_assert_int_eq(r[i].content_length, (int64_t)len);
        ck_assert_int_eq(r[i].complete, 1);
        ck_assert_uint_eq(r[i].body_bytes, len);
        ck_assert_uint_eq(r[i].mismatches, 0);
    }

    /* The origin sent exactly the chunks touched, each once. */
    uint64_t union_bytes = 0;
    for (int k = 0; k < NCHUNK; k++)
        if (touched[k])
            union_bytes += (k + 1) * C <= size ? C : size - k * C;
    ck_assert_uint_lt(union_bytes, size); /* some chunks are never needed */
    ck_assert_uint_eq(origin_stat(&w, "/t2-ranges", "body_bytes"), union_bytes);

    span_t got[64];
    size_t n = origin_ranges(&w, "/t2-ranges", got, 64);
    ck_assert_uint_gt(n, 0);
    for (size_t i = 0; i < n; i++) {
        /* Past the end, a request has no bytes to overlap with. */
        uint64_t li = got[i].last < size ? got[i].last : size - 1;
        for (size_t j = i + 1; j < n; j++) {
            uint64_t lj = got[j].last < size ? got[j].last : size - 1;
            ck_assert_msg(got[i].first > lj || got[j].first > li,
                          "origin ranges %zu and %zu overlap", i, j);
        }
    }
    ck_assert_uint_eq(proxy_stat(&w, "flight.range_mismatches"), 0);
    assert_proxy_idle(&w);
    world_down(&w);
}
END_TEST

/* --- 3. A slow client holds up nobody ------------------------------------- */

START_TEST(proxy_slow_client)
{
    enum { N = 21 };
    const uint64_t size = 2 * MiB;
    /* About 0.5 s of upstream transfer. */
    const char *path = "/t3-slow?size=2097152&rate=4194304";
    world_t w;
    world_up(&w, NULL);

    static e2e_req_t r[N];
    for (int i = 0; i < N; i++)
        req_init(&r[i], &w, NULL, path);
    r[0].read_rate = 1024;
    r[0].close_when_others_done = 1;
    ck_assert_int_eq(run(&w, r, N), 1);

    ck_assert_int_eq(r[0].error, E2E_EABORTED);
    ck_assert_uint_lt(r[0].body_bytes_at_others_done, 64 * KiB);
    ck_assert_uint_eq(r[0].mismatches, 0);
    for (int i = 1; i < N; i++)
        assert_full(&r[i], size);
    ck_assert_uint_eq(origin_stat(&w, "/t3-slow", "requests"), 1);

    /* The slow one is closed: nothing of it stays in the proxy. */
    assert_proxy_idle(&w);
    world_down(&w);
}
END_TEST

/* --- 4. Clients leaving mid-body ------------------------------------------ */

START_TEST(proxy_clients_leave)
{
    enum { N = 30, NABORT = 10 };
    const uint64_t size = 2 * MiB;
    const char *path = "/t4-leave?size=2097152&ttfb=50&rate=8388608";
    world_t w;
    world_up(&w, NULL);

    /* The first connections are the likeliest leaders: make them leave. */
    static e2e_req_t r[N];
    for (int i = 0; i < N; i++) {
        req_init(&r[i], &w, NULL, path);
        if (i < NABORT)
            r[i].abort_after = 100 * KiB;
    }
    run(&w, r, N);

    int leader = -1;
    for (int i = 0; i < N; i++) {
        if (!strcmp(r[i].x_cache, "MISS"))
            leader = i;
        if (i < NABORT) {
            ck_assert_msg(r[i].error == E2E_EABORTED,
                          "request %d: error %d status %d after %" PRIu64
                          " bytes",
                          i, r[i].error, r[i].status, r[i].body_bytes);
            ck_assert_uint_eq(r[i].body_bytes, 100 * KiB);
            ck_assert_uint_eq(r[i].mismatches, 0);
        } else {
            assert_full(&r[i], size);
        }
    }
    ck_assert_int_ge(leader, 0);
    printf("proxy: clients_leave: the leader was request %d (%s)\n", leader,
           leader < NABORT ? "left" : "stayed");
    fflush(stdout);
    ck_assert_uint_eq(origin_stat(&w, "/t4-leave", "requests"), 1);
    assert_proxy_idle(&w);

    /* The fill completed although clients left: the next GET is a hit. */
    e2e_req_t again;
    req_init(&again, &w, NULL, path);
    run_one(&w, &again);
    assert_full(&again, size);
    ck_assert_str_eq(again.x_cache, "HIT");
    ck_assert_uint_eq(origin_stat(&w, "/t4-leave", "requests"), 1);
    world_down(&w);
}
END_TEST

/* --- 5. Upstream failure before the headers ------------------------------- */

START_TEST(proxy_fail_before_headers)
{
    enum { N = 20 };
    const char *path = "/t5-fail?fail=before&ttfb=100";
    world_t w;
    world_up(&w, NULL);

    static e2e_req_t r[N];
    for (int i = 0; i < N; i++)
        req_init(&r[i], &w, NULL, path);
    ck_assert_int_eq(run(&w, r, N), 0);
    for (int i = 0; i < N; i++) {
        ck_assert_int_eq(r[i].status, 502);
        ck_assert_int_eq(r[i].complete, 1);
    }
    /* The failure was collapsed too. */
    ck_assert_uint_eq(origin_stat(&w, "/t5-fail", "requests"), 1);
    assert_proxy_idle(&w);

    /* Failures are not remembered: the next request tries again. */
    e2e_req_t again;
    req_init(&again, &w, NULL, path);
    run_one(&w, &again);
    ck_assert_int_eq(again.status, 502);
    ck_assert_uint_eq(origin_stat(&w, "/t5-fail", "requests"), 2);
    world_down(&w);
}
END_TEST

/* --- 6. Upstream failure after the headers -------------------------------- */

/* Status 200, correct bytes, then a cut: never a clean short body. */
static void assert_cut(const e2e_req_t *r, uint64_t sent)
{
    ck_assert_int_eq(r->status, 200);
    ck_assert_msg(r->error == E2E_ERESET || r->error == E2E_EEOF,
                  "error %d after %" PRIu64 " bytes", r->error, r->body_bytes);
    ck_assert_int_eq(r->complete, 0);
    ck_assert_uint_le(r->body_bytes, sent);
    ck_assert_uint_eq(r->mismatches, 0);
}

START_TEST(proxy_fail_after_headers)
{
    enum { N = 20 };
    const uint64_t sent = 300000;
    const char *path = "/t6-cut?size=2097152&ttfb=50&fail=after:300000";
    world_t w;
    world_up(&w, NULL);

    static e2e_req_t r[N];
    for (int i = 0; i < N; i++)
        req_init(&r[i], &w, NULL, path);
    ck_assert_int_eq(run(&w, r, N), N);
    for (int i = 0; i < N; i++)
        assert_cut(&r[i], sent);
    ck_assert_uint_eq(origin_stat(&w, "/t6-cut", "requests"), 1);
    assert_proxy_idle(&w);

    /* Not cached: the same URL goes upstream again. */
    e2e_req_t again;
    req_init(&again, &w, NULL, path);
    run_one(&w, &again);
    assert_cut(&again, sent);
    ck_assert_str_eq(again.x_cache, "MISS");
    ck_assert_uint_eq(origin_stat(&w, "/t6-cut", "requests"), 2);
    ck_assert_uint_eq(proxy_stat(&w, "cache_objects"), 0);
    world_down(&w);
}
END_TEST

/* --- 7. HEAD and GET together --------------------------------------------- */

START_TEST(proxy_head_and_get)
{
    enum { N = 20 };
    const uint64_t size = MiB;
    const char *path = "/t7-head?size=1048576&ttfb=100";
    world_t w;
    world_up(&w, NULL);

    static e2e_req_t r[N];
    for (int i = 0; i < N; i++)
        req_init(&r[i], &w, i % 2 ? "HEAD" : "GET", path);
    ck_assert_int_eq(run(&w, r, N), 0);
    int head_miss = 0, get_miss = 0;
    for (int i = 0; i < N; i++) {
        if (i % 2) {
            ck_assert_int_eq(r[i].status, 200);
            ck_assert_int_eq(r[i].complete, 1);
            ck_assert_int_eq(r[i].content_length, (int64_t)size);
            ck_assert_uint_eq(r[i].body_bytes, 0);
            head_miss += !strcmp(r[i].x_cache, "MISS");
        } else {
            assert_full(&r[i], size);
            get_miss += !strcmp(r[i].x_cache, "MISS");
        }
    }
    /* Two flights, one per method, each with one leader. */
    ck_assert_int_eq(head_miss, 1);
    ck_assert_int_eq(get_miss, 1);
    ck_assert_uint_eq(origin_stat(&w, "/t7-head", "gets"), 1);
    ck_assert_uint_eq(origin_stat(&w, "/t7-head", "heads"), 1);
    assert_proxy_idle(&w);

    /* The GET filled the cache, which answers HEAD too. */
    e2e_req_t h;
    req_init(&h, &w, "HEAD", path);
    run_one(&w, &h);
    ck_assert_int_eq(h.status, 200);
    ck_assert_int_eq(h.complete, 1);
    ck_assert_str_eq(h.x_cache, "HIT");
    ck_assert_int_eq(h.content_length, (int64_t)size);
    ck_assert_uint_eq(h.body_bytes, 0);
    ck_assert_uint_eq(origin_stat(&w, "/t7-head", "requests"), 2);
    world_down(&w);
}
END_TEST

/* --- 8. Hits, ranges of hits, suffixes, 416 and 404 ----------------------- */

/* One ranged request of an object of 100000 bytes: status, X-Cache and
 * Content-Range as expected; a 206 carries the right bytes, a 200 all of
 * them. */
static void check_range(const world_t *w,
                        const char *path,
                        const char *range,
                        int status,
                        const char *xcache,
                        const char *content_range)
{
    char hdr[96];
    e2e_req_t r;
    snprintf(hdr, sizeof(hdr), "Range: %s\r\n", range);
    req_init(&r, w, NULL, path);
    r.headers = hdr;
    run_one(w, &r);
    ck_assert_msg(r.status == status && r.complete && r.error == E2E_OK,
                  "%s %s: status %d complete %d error %d", path, range,
                  r.status, r.complete, r.error);
    ck_assert_msg(!strcmp(r.x_cache, xcache) &&
                      !strcmp(r.content_range, content_range),
                  "%s %s: X-Cache %s, Content-Range %s", path, range, r.x_cache,
                  r.content_range);
    if (status == 200)
        assert_full(&r, 100000);
    if (status == 206) {
        unsigned long long a, b;
        ck_assert_int_eq(sscanf(content_range, "bytes %llu-%llu", &a, &b), 2);
        ck_assert_int_eq(r.content_length, (int64_t)(b - a + 1));
        ck_assert_uint_eq(r.body_bytes, b - a + 1);
        ck_assert_uint_eq(r.mismatches, 0);
    }
}

START_TEST(proxy_hits_and_ranges)
{
    const uint64_t size = 100000;
    const char *obj = "/t8-obj?size=100000";
    world_t w;
    world_up(&w, NULL);

    e2e_req_t r;
    req_init(&r, &w, NULL, obj);
    run_one(&w, &r);
    assert_full(&r, size);
    ck_assert_str_eq(r.x_cache, "MISS");
    /* The object is cached once its flight is over. */
    assert_proxy_idle(&w);
    req_init(&r, &w, NULL, obj);
    run_one(&w, &r);
    assert_full(&r, size);
    ck_assert_str_eq(r.x_cache, "HIT");

    check_range(&w, obj, "bytes=1000-1999", 206, "HIT",
                "bytes 1000-1999/100000");
    check_range(&w, obj, "bytes=99000-", 206, "HIT",
                "bytes 99000-99999/100000");
    check_range(&w, obj, "bytes=-100", 206, "HIT", "bytes 99900-99999/100000");
    check_range(&w, obj, "bytes=-200000", 206, "HIT", "bytes 0-99999/100000");
    /* Not a single satisfiable range we serve: the whole object. */
    check_range(&w, obj, "bytes=0-1,5-6", 200, "HIT", "");
    check_range(&w, obj, "bytes=abc", 200, "HIT", "");
    check_range(&w, obj, "bytes=0-9\r\nIf-Range: \"x\"", 200, "HIT", "");
    ck_assert_uint_eq(origin_stat(&w, "/t8-obj", "requests"), 1);

    /* Cold: a suffix needs the size: a HEAD, then the last chunk only. */
    check_range(&w, "/t8-suffix?size=3000000", "bytes=-100", 206, "MISS",
                "bytes 2999900-2999999/3000000");
    ck_assert_uint_eq(origin_stat(&w, "/t8-suffix", "requests"), 2);
    ck_assert_uint_eq(origin_stat(&w, "/t8-suffix", "heads"), 1);
    ck_assert_uint_eq(origin_stat(&w, "/t8-suffix", "body_bytes"),
                      3000000 - 2 * 1048576);
    /* Cold and unsatisfiable: the origin's 416 says the size. */
    check_range(&w, "/t8-416?size=100000", "bytes=200000-", 416, "MISS",
                "bytes */100000");

    /* A 404 passes through, uncached. */
    for (uint64_t i = 1; i <= 2; i++) {
        req_init(&r, &w, NULL, "/t8-404?status=404");
        r.verify = 0;
        run_one(&w, &r);
        ck_assert_int_eq(r.status, 404);
        ck_assert_int_eq(r.complete, 1);
        ck_assert_str_ne(r.x_cache, "HIT");
        ck_assert_uint_eq(origin_stat(&w, "/t8-404", "requests"), i);
        assert_proxy_idle(&w);
    }

    /* Last, so that a wrong X-Cache does not hide the checks above. */
    check_range(&w, obj, "bytes=100000-", 416, "HIT", "bytes */100000");
    ck_assert_uint_eq(origin_stat(&w, "/t8-obj", "requests"), 1);
    world_down(&w);
}
END_TEST

/* --- 9. A lagging client is resumed --------------------------------------- */

/*
 * One client reads at 2 MiB/s while two read at full speed; the origin
 * sends 3 MiB in about 0.2 s. The proxy's send buffer is small, so the slow
 * client falls max_lag behind the flight and is detached; it must still get
 * every byte, from an upstream range request (no cache) or from the cache.
 * The proxy stops feeding a client with 1 MiB queued and resumes it (and so
 * sees the detach) once that queue is down to 256 KiB, about 0.4 s later at
 * 2 MiB/s: by then the object is complete, which makes the cache variant
 * deterministic. An unlimited origin would race the two.
 */
static void lag_run(const world_t *w, const char *path, uint64_t size)
{
    enum { N = 3 };
    e2e_req_t r[N];
    for (int i = 0; i < N; i++)
        req_init(&r[i], w, NULL, path);
    r[0].read_rate = 2 * MiB;
    ck_assert_int_eq(run(w, r, N), 0);
    for (int i = 0; i < N; i++)
        assert_full(&r[i], size);
    ck_assert_uint_ge(proxy_stat(w, "resumed"), 1);
    ck_assert_uint_ge(proxy_stat(w, "flight.lagged"), 1);
    assert_proxy_idle(w);
}

START_TEST(proxy_lag_resume_upstream)
{
    const char *path = "/t9-lag?size=3145728&rate=16777216";
    world_t w;
    /* Chunks below max_lag, so that a resumed piece (whole chunks, at most
     * max_lag) cannot lag out again and be fetched twice. */
    world_up(&w,
             (const char *[]){"--max-lag", "524288", "--chunk-size", "262144",
                              "--cache-size", "0", "--sndbuf", "65536", NULL});
    lag_run(&w, path, 3 * MiB);
    ck_assert_uint_eq(proxy_stat(&w, "resumed_from_cache"), 0);

    /* The rest came with a range request from where the client was. */
    span_t got[64];
    size_t n = origin_ranges(&w, "/t9-lag", got, 64);
    int resumed = 0;
    for (size_t i = 0; i < n; i++)
        resumed += got[i].first > 0;
    ck_assert_uint_ge(resumed, 1);
    ck_assert_uint_eq(origin_stat(&w, "/t9-lag", "gets"), 1 + n);
    /* Resumed in pieces that make progress, not a resume loop refetching
     * the tail: a client is detached once at most (a piece is no longer
     * than max_lag, so it cannot lag out), and each detach costs the origin
     * at most the rest of the object plus one chunk. On a loaded machine
     * the fast clients can be detached too (a burst of upstream reads). */
    uint64_t resumes = proxy_stat(&w, "resumed");
    ck_assert_uint_le(resumes, 3);
    ck_assert_uint_le(origin_stat(&w, "/t9-lag", "body_bytes"),
                      (1 + resumes) * 3 * MiB + resumes * 262144);
    world_down(&w);
}
END_TEST

START_TEST(proxy_lag_resume_cache)
{
    const char *path = "/t9-lagc?size=3145728&rate=16777216";
    world_t w;
    world_up(
        &w, (const char *[]){"--max-lag", "524288", "--sndbuf", "65536", NULL});
    lag_run(&w, path, 3 * MiB);
    ck_assert_uint_ge(proxy_stat(&w, "resumed_from_cache"), 1);
    /* A client detached before the object completed (the usual case on a
     * loaded machine) resumes with range pieces until the cache has it;
     * the origin sees nothing else. */
    span_t got[64];
    size_t nr = origin_ranges(&w, "/t9-lagc", got, 64);
    ck_assert_uint_eq(origin_stat(&w, "/t9-lagc", "requests"), 1 + nr);
    world_down(&w);
}
END_TEST

/* --- 10. Robustness ------------------------------------------------------- */

/* Responses parsed from one connection's bytes. */
typedef struct raw_resp {
    int status;
    int chunked; /* Transfer-Encoding: chunked */
    char body[4096];
    size_t body_len;
} raw_resp_t;

typedef struct raw_parse {
    raw_resp_t resp[4];
    int n, complete;
    long total; /* responses parsed, all of them */
} raw_parse_t;

static int raw_on_headers(http_parser *p)
{
    raw_parse_t *rp = p->data;
    if (rp->n < 4) {
        rp->resp[rp->n].status = p->status_code;
        rp->resp[rp->n].chunked = (p->flags & F_CHUNKED) != 0;
    }
    return 0;
}

static int raw_on_body(http_parser *p, const char *at, size_t len)
{
    raw_parse_t *rp = p->data;
    raw_resp_t *r = &rp->resp[rp->n < 4 ? rp->n : 3];
    size_t room = sizeof(r->body) - r->body_len;
    size_t k = len < room ? len : room;
    memcpy(r->body + r->body_len, at, k);
    r->body_len += k;
    return 0;
}

static int raw_on_complete(http_parser *p)
{
    raw_parse_t *rp = p->data;
    if (rp->n < 4)
        rp->n++;
    rp->complete = rp->n;
    rp->total++;
    return 0;
}

typedef struct raw_send {
    int fd;
    const char *req;
    size_t len;
    ssize_t sent;
} raw_send_t;

static void *raw_send_thread(void *arg)
{
    raw_send_t *rs = arg;
    rs->sent = send(rs->fd, rs->req, rs->len, MSG_NOSIGNAL);
    return NULL;
}

/*
 * Writes req on a fresh blocking socket (from a thread, so that a large
 * pipelined batch cannot deadlock against its own responses), reads until
 * the proxy closes the connection (5 s without data at most) and parses
 * the responses.
 */
static void raw_exchange(int port, const char *req, size_t len, raw_parse_t *rp)
{
    static const http_parser_settings s = {
        .on_headers_complete = raw_on_headers,
        .on_body = raw_on_body,
        .on_message_complete = raw_on_complete,
    };
    struct sockaddr_in addr = {.sin_family = AF_INET,
                               .sin_port = htons((uint16_t)port)};
    struct timeval tv = {5, 0};
    http_parser parser;
    char buf[16384];
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    ck_assert_int_ge(fd, 0);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    ck_assert_int_eq(connect(fd, (struct sockaddr *)&addr, sizeof(addr)), 0);
    raw_send_t rs = {fd, req, len, 0};
    pthread_t t;
    pthread_create(&t, NULL, raw_send_thread, &rs);

    memset(rp, 0, sizeof(*rp));
    http_parser_init(&parser, HTTP_RESPONSE);
    parser.data = rp;
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof(buf), 0);
        if (n < 0 && errno == EINTR)
            continue;
        ck_assert_msg(n >= 0, "recv: %s", strerror(errno));
        http_parser_execute(&parser, &s, buf, (size_t)n);
        ck_assert_msg(HTTP_PARSER_ERRNO(&parser) == HPE_OK, "bad response: %s",
                      http_errno_name(HTTP_PARSER_ERRNO(&parser)));
        if (n == 0)
            break;
    }
    pthread_join(t, NULL);
    ck_assert_int_eq(rs.sent, (ssize_t)len);
    close(fd);
}

static void raw_status(const world_t *w, const char *req, int status)
{
    raw_parse_t rp;
    raw_exchange(w->proxy.port, req, strlen(req), &rp);
    ck_assert_int_eq(rp.n, 1);
    ck_assert_int_eq(rp.resp[0].status, status);
}

/* The body is bytes [0, len) of the object at path. */
static void assert_object(const raw_resp_t *r, const char *path, size_t len)
{
    uint32_t seed = e2e_path_seed(path);
    ck_assert_int_eq(r->status, 200);
    ck_assert_uint_eq(r->body_len, len);
    for (size_t i = 0; i < len; i++)
        ck_assert_int_eq((uint8_t)r->body[i], e2e_content_byte(seed, i));
}

START_TEST(proxy_robustness)
{
    world_t w;
    world_up(&w, NULL);

    raw_status(&w,
               "POST /t10-post HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
               "Connection: close\r\n\r\nhi",
               405);

    enum { LONG = 9000 };
    static char big[LONG + 128];
    int n = snprintf(big, sizeof(big), "GET /t10-");
    memset(big + n, 'a', LONG - (size_t)n);
    snprintf(big + LONG, sizeof(big) - LONG,
             " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    raw_status(&w, big, 414);

    raw_status(&w, "\x01\x02 garbage \xff\r\n\r\n", 400);

    /* Pipelined: both requests in one write, answered in order. */
    raw_parse_t rp;
    const char *two = "GET /t10-a?size=1000 HTTP/1.1\r\nHost: x\r\n\r\n"
                      "GET /t10-b?size=2000 HTTP/1.1\r\nHost: x\r\n"
                      "Connection: close\r\n\r\n";
    raw_exchange(w.proxy.port, two, strlen(two), &rp);
    ck_assert_int_eq(rp.n, 2);
    assert_object(&rp.resp[0], "/t10-a", 1000);
    assert_object(&rp.resp[1], "/t10-b", 2000);

    /* A 204 has no body and no framing headers: the response after it on
     * the same connection parses. */
    const char *nc = "GET /t10-204?status=204 HTTP/1.1\r\nHost: x\r\n\r\n"
                     "GET /t10-c?size=100 HTTP/1.1\r\nHost: x\r\n"
                     "Connection: close\r\n\r\n";
    raw_exchange(w.proxy.port, nc, strlen(nc), &rp);
    ck_assert_int_eq(rp.n, 2);
    ck_assert_int_eq(rp.resp[0].status, 204);
    ck_assert_int_eq(rp.resp[0].chunked, 0);
    ck_assert_uint_eq(rp.resp[0].body_len, 0);
    assert_object(&rp.resp[1], "/t10-c", 100);

    /* 50,000 pipelined requests behind a slow miss are answered one after
     * the other, without recursion (a stack overflow once). */
    enum { FLOOD = 50000 };
    static const char head[] =
        "GET /t10-slow?size=10&ttfb=300 HTTP/1.1\r\nHost: x\r\n\r\n";
    static const char put[] = "PUT / HTTP/1.1\r\n\r\n";
    static const char tail[] = "GET /t10-d?size=10 HTTP/1.1\r\nHost: x\r\n"
                               "Connection: close\r\n\r\n";
    size_t flen = strlen(head) + FLOOD * strlen(put) + strlen(tail);
    char *flood = malloc(flen + 1);
    ck_assert_ptr_nonnull(flood);
    char *p = flood + sprintf(flood, "%s", head);
    for (int i = 0; i < FLOOD; i++)
        p += sprintf(p, "%s", put);
    sprintf(p, "%s", tail);
    raw_exchange(w.proxy.port, flood, flen, &rp);
    free(flood);
    ck_assert_int_eq(rp.total, FLOOD + 2);
    ck_assert_int_eq(rp.resp[1].status, 405);
    assert_alive(&w);

    /* Every counter is there. */
    static const char keys[] =
        "requests hits misses collapsed resumed resumed_from_cache "
        "errors_sent aborted client_gone upstream_requests "
        "upstream_bytes conns_open idle_closed cache_objects cache_bytes "
        "flight.flights_started flight.joins flight.timeouts "
        "flight.errors flight.lagged flight.bytes_written "
        "flight.bytes_delivered flight.flights_active "
        "flight.readers_open flight.segments_held flight.bytes_held "
        "flight.orphaned flight.range_fetches flight.chunk_joins "
        "flight.range_bytes_requested flight.range_bytes_fetched "
        "flight.range_mismatches";
    char *json = get_json(w.proxy.port, "/__coalesce/stats");
    char key[64];
    for (const char *k = keys; *k;) {
        size_t len = strcspn(k, " ");
        snprintf(key, sizeof(key), "%.*s", (int)len, k);
        (void)json_num(json, key);
        k += len + (k[len] == ' ');
    }
    free(json);
    assert_proxy_idle(&w);
    world_down(&w);
}
END_TEST

/* A client that sends nothing is reset after --idle-timeout. */
START_TEST(proxy_idle_timeout)
{
    world_t w;
    world_up(&w, (const char *[]){"--idle-timeout", "200", NULL});
    struct sockaddr_in addr = {.sin_family = AF_INET,
                               .sin_port = htons((uint16_t)w.proxy.port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct timeval tv = {5, 0};
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    ck_assert_int_ge(fd, 0);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    ck_assert_int_eq(connect(fd, (struct sockaddr *)&addr, sizeof(addr)), 0);
    char c;
    ssize_t n;
    while ((n = recv(fd, &c, 1, 0)) < 0 && errno == EINTR)
        ;
    /* Closed by the proxy (RST or FIN), not by our 5 s receive timeout. */
    ck_assert_msg(n == 0 || errno == ECONNRESET, "recv: %zd %s", n,
                  strerror(errno));
    close(fd);
    ck_assert_uint_eq(proxy_stat(&w, "idle_closed"), 1);
    world_down(&w);
}
END_TEST

/* --- 11. What the fuzzer found ------------------------------------------- */

/* Every byte of one exchange on a fresh connection, until the proxy closes
 * it (5 s without data at most); NUL-terminated. Returns the length. */
static size_t raw_bytes(int port, const char *req, char *buf, size_t cap)
{
    struct sockaddr_in addr = {.sin_family = AF_INET,
                               .sin_port = htons((uint16_t)port)};
    struct timeval tv = {5, 0};
    size_t len = 0;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    ck_assert_int_ge(fd, 0);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    ck_assert_int_eq(connect(fd, (struct sockaddr *)&addr, sizeof(addr)), 0);
    ck_assert_int_eq(send(fd, req, strlen(req), MSG_NOSIGNAL),
                     (ssize_t)strlen(req));
    for (;;) {
        ssize_t n = recv(fd, buf + len, cap - 1 - len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        ck_assert_msg(n >= 0, "recv: %s", strerror(errno));
        if (n == 0 || (len += (size_t)n) == cap - 1)
            break;
    }
    close(fd);
    buf[len] = 0;
    return len;
}

/*
 * An origin that misbehaves in set ways, on a thread of this process: for
 * each connection it reads one request head and writes the reply canned
 * for its path, whatever the method, then closes.
 */
typedef struct canned {
    const char *path;
    const char *reply; /* NULL: close without a reply */
} canned_t;

static const canned_t canned[] = {
    /* A CR inside a header line (libcurl splits lines at LF only). */
    {"/ctl", "HTTP/1.1 200 OK\r\nX-Bad: a\rb\r\nX-Good: c\r\n"
             "Content-Length: 2\r\n\r\nhi"},
    /* Answers about ranges nobody asked for. */
    {"/206", "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-1/10\r\n"
             "Content-Length: 2\r\n\r\nhi"},
    {"/416", "HTTP/1.1 416 Range Not Satisfiable\r\n"
             "Content-Range: bytes */10\r\nContent-Length: 0\r\n\r\n"},
    {"/999", "HTTP/1.1 999 Odd\r\nContent-Length: 2\r\n\r\nhi"},
    /* A 204 with a Content-Length, which must not be passed on. */
    {"/204", "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"},
    /* A header line that looks like a status line is not one. */
    {"/mid", "HTTP/1.1 200 OK\r\nHTTP/1.1 404: Nope\r\nContent-Length: 2\r\n"
             "\r\nhi"},
    /* A name that only starts like Transfer-Encoding. */
    {"/te", "HTTP/1.1 200 OK\r\nTransfer-Encodingx: y\r\nX-Good: c\r\n"
            "Content-Length: 2\r\n\r\nhi"},
    {"/fail", NULL},
};

typedef struct bad_origin {
    int fd, port;
    pthread_t thread;
} bad_origin_t;

static void *bad_origin_main(void *arg)
{
    bad_origin_t *o = arg;
    for (;;) {
        int fd = accept(o->fd, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            return NULL; /* shut down */
        }
        char req[8192];
        size_t len = 0;
        while (len < sizeof(req) - 1) {
            ssize_t n = recv(fd, req + len, sizeof(req) - 1 - len, 0);
            if (n <= 0)
                break;
            len += (size_t)n;
            req[len] = 0;
            if (strstr(req, "\r\n\r\n"))
                break;
        }
        req[len] = 0;
        const char *path = strchr(req, ' ');
        for (size_t i = 0; path && i < sizeof(canned) / sizeof(canned[0]);
             i++) {
            size_t pl = strlen(canned[i].path);
            if (!strncmp(path + 1, canned[i].path, pl) &&
                (path[1 + pl] == ' ' || path[1 + pl] == '?') && canned[i].reply)
                send(fd, canned[i].reply, strlen(canned[i].reply),
                     MSG_NOSIGNAL);
        }
        close(fd);
    }
}

static void bad_origin_up(bad_origin_t *o)
{
    struct sockaddr_in addr = {.sin_family = AF_INET};
    socklen_t alen = sizeof(addr);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    o->fd = socket(AF_INET, SOCK_STREAM, 0);
    ck_assert_int_ge(o->fd, 0);
    ck_assert_int_eq(bind(o->fd, (struct sockaddr *)&addr, sizeof(addr)), 0);
    ck_assert_int_eq(listen(o->fd, 16), 0);
    ck_assert_int_eq(getsockname(o->fd, (struct sockaddr *)&addr, &alen), 0);
    o->port = ntohs(addr.sin_port);
    ck_assert_int_eq(pthread_create(&o->thread, NULL, bad_origin_main, o), 0);
}

static void bad_origin_down(bad_origin_t *o)
{
    shutdown(o->fd, SHUT_RDWR); /* wakes accept() */
    pthread_join(o->thread, NULL);
    close(o->fd);
}

/* The response head (up to the blank line) and the bytes after it. */
static void split_head(char *all, char **body)
{
    char *end = strstr(all, "\r\n\r\n");
    ck_assert_msg(end != NULL, "no complete head in: %s", all);
    *body = end + 4;
    end[2] = 0; /* the head keeps its last CRLF */
}

START_TEST(proxy_bad_origin)
{
    static char buf[65536];
    char *body;
    bad_origin_t o;
    bad_origin_up(&o);
    world_t w;
    char upstream[64];
    snprintf(upstream, sizeof(upstream), "http://127.0.0.1:%d", o.port);
    const char *pargv[] = {e2e_bin("proxy"), "--listen", "127.0.0.1:0",
                           "--upstream",     upstream,   NULL};
    w.origin.pid = 0;
    ck_assert_int_eq(e2e_spawn(&w.proxy, pargv), 0);

    /* The broken line is dropped, the rest goes through. */
    raw_bytes(w.proxy.port,
              "GET /ctl HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", buf,
              sizeof(buf));
    split_head(buf, &body);
    ck_assert_msg(!strncmp(buf, "HTTP/1.1 200 ", 13), "%s", buf);
    ck_assert_ptr_nonnull(strstr(buf, "\r\nX-Good: c\r\n"));
    ck_assert_ptr_null(strstr(buf, "X-Bad"));
    for (const char *cr = strchr(buf, '\r'); cr; cr = strchr(cr + 1, '\r'))
        ck_assert_msg(cr[1] == '\n', "a bare CR in: %s", buf);
    ck_assert_str_eq(body, "hi");

    /* What cannot be passed on is a 502. */
    static const char *const bad[] = {"/206", "/416", "/999"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char req[128];
        snprintf(req, sizeof(req),
                 "GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                 bad[i]);
        raw_bytes(w.proxy.port, req, buf, sizeof(buf));
        ck_assert_msg(!strncmp(buf, "HTTP/1.1 502 ", 13), "%s: %s", bad[i],
                      buf);
    }
    /* A line that looks like a status line is not one: dropped. */
    raw_bytes(w.proxy.port,
              "GET /mid HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", buf,
              sizeof(buf));
    split_head(buf, &body);
    ck_assert_msg(!strncmp(buf, "HTTP/1.1 200 ", 13), "%s", buf);
    ck_assert_ptr_null(strstr(buf, "Nope"));
    ck_assert_str_eq(body, "hi");

    /* Dropped too: http_parser-based clients would refuse the response. */
    raw_bytes(w.proxy.port,
              "GET /te HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", buf,
              sizeof(buf));
    split_head(buf, &body);
    ck_assert_msg(!strncmp(buf, "HTTP/1.1 200 ", 13), "%s", buf);
    ck_assert_ptr_nonnull(strstr(buf, "\r\nX-Good: c\r\n"));
    ck_assert_ptr_null(strstr(buf, "Transfer-Encoding"));
    ck_assert_str_eq(body, "hi");

    /* HEAD: a 204 without Content-Length, and a 502 without a body. */
    raw_bytes(w.proxy.port,
              "HEAD /204 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", buf,
              sizeof(buf));
    split_head(buf, &body);
    ck_assert_msg(!strncmp(buf, "HTTP/1.1 204 ", 13), "%s", buf);
    ck_assert_ptr_null(strstr(buf, "Content-Length"));
    ck_assert_str_eq(body, "");
    raw_bytes(w.proxy.port,
              "HEAD /fail HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
              buf, sizeof(buf));
    split_head(buf, &body);
    ck_assert_msg(!strncmp(buf, "HTTP/1.1 502 ", 13), "%s", buf);
    ck_assert_ptr_nonnull(strstr(buf, "Content-Length: "));
    ck_assert_str_eq(body, "");
    /* The same for an answer of the proxy's own. */
    raw_bytes(
        w.proxy.port,
        "HEAD http://x/abs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        buf, sizeof(buf));
    split_head(buf, &body);
    ck_assert_msg(!strncmp(buf, "HTTP/1.1 400 ", 13), "%s", buf);
    ck_assert_str_eq(body, "");

    ck_assert_int_eq(e2e_stop(&w.proxy), 0);
    bad_origin_down(&o);
}
END_TEST

/*
 * A range past the end of an object whose size a fetch in flight already
 * knows is refused before any fetch: its 416 still says the size.
 */
START_TEST(proxy_416_known_size)
{
    /* 100 bytes at 40 B/s: the first request's flight lasts ~2 s. */
    const char *path = "/t12-416?size=100&rate=40";
    world_t w;
    world_up(&w, NULL);
    struct sockaddr_in addr = {.sin_family = AF_INET,
                               .sin_port = htons((uint16_t)w.proxy.port)};
    struct timeval tv = {5, 0};
    char req[256], buf[4096];
    size_t len = 0;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    ck_assert_int_ge(fd, 0);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    ck_assert_int_eq(connect(fd, (struct sockaddr *)&addr, sizeof(addr)), 0);
    int n =
        snprintf(req, sizeof(req),
                 "GET %s HTTP/1.1\r\nHost: x\r\nRange: bytes=0-\r\n\r\n", path);
    ck_assert_int_eq(send(fd, req, (size_t)n, MSG_NOSIGNAL), n);
    /* Its head: the flight knows the size now, and is still going. */
    while (len < sizeof(buf) - 1) {
        ssize_t k = recv(fd, buf + len, sizeof(buf) - 1 - len, 0);
        ck_assert_msg(k > 0, "recv: %zd %s", k, strerror(errno));
        len += (size_t)k;
        buf[len] = 0;
        if (strstr(buf, "\r\n\r\n"))
            break;
    }
    ck_assert_msg(!strncmp(buf, "HTTP/1.1 206 ", 13), "%s", buf);
    check_range(&w, path, "bytes=200-", 416, "MISS", "bytes */100");
    check_range(&w, path, "bytes=100-150", 416, "MISS", "bytes */100");
    close(fd);
    world_down(&w);
}
END_TEST

/* --- 12. Soak ------------------------------------------------------------- */

/*
 * Bounded load: rounds of SOAK_CLIENTS concurrent clients, each request one
 * of cold GETs (a new query string is a new cache key for the same origin
 * object), repeated GETs (hits once cached), ranges (416 past the end),
 * HEADs, and clients that leave: right after sending (RST or FIN), in the
 * middle of the response head, in the middle of the body. The choices come
 * from a fixed seed, so every run asks for the same things. Afterwards the
 * proxy must go back to nothing held for clients, with counters that add
 * up, and exit cleanly.
 */
enum { SOAK_CLIENTS = 50, SOAK_ROUNDS = 80 };

typedef struct soak_obj {
    const char *path; /* the origin query, without the cache-busting v= */
    uint64_t size;
} soak_obj_t;

static const soak_obj_t soak_objs[] = {
    {"/soak-a?size=16384", 16384},
    {"/soak-b?size=262144&ttfb=5", 262144},
    {"/soak-c?size=1048576&rate=134217728", 1048576},
    {"/soak-d?size=1000", 1000},
};

enum { SOAK_GET, SOAK_RANGE, SOAK_HEAD, SOAK_LEAVE };

typedef struct soak_req {
    int kind;
    uint64_t size, first, last; /* SOAK_RANGE: the 206 expected, or 416 */
    char path[96], hdr[64];
} soak_req_t;

/* The proxy's stats, counting the requests that ask for them (they count
 * in "requests" too). */
static char *soak_stats(const world_t *w, uint64_t *calls)
{
    ++*calls;
    return get_json(w->proxy.port, "/__coalesce/stats");
}

/* Polls until nothing is held for clients (a deadline of about 4 s, short
 * naps, no fixed sleep). Returns the last stats; the stats request itself
 * is the one connection open. */
static char *soak_quiesce(const world_t *w, uint64_t *calls)
{
    static const char *const gauges[] = {
        "flight.readers_open", "flight.flights_active", "flight.segments_held",
        "flight.bytes_held"};
    char *json = NULL;
    for (int i = 0; i < 400; i++) {
        free(json);
        json = soak_stats(w, calls);
        bool idle = json_num(json, "conns_open") == 1;
        for (size_t k = 0; k < sizeof(gauges) / sizeof(gauges[0]); k++)
            idle = idle && json_num(json, gauges[k]) == 0;
        if (idle)
            break;
        nap_ms(i < 10 ? 2 : 10);
    }
    return json;
}

static void soak_pick(
    soak_req_t *q, e2e_req_t *r, const world_t *w, uint64_t *seed, int round)
{
    const soak_obj_t *o = &soak_objs[rng_next(seed) % 4];
    /* New keys keep appearing, so cold GETs happen in every round. */
    uint64_t v = rng_next(seed) % (uint64_t)(8 + round);
    uint64_t pick = rng_next(seed) % 100;
    snprintf(q->path, sizeof(q->path), "%s&v=%" PRIu64, o->path, v);
    q->size = o->size;
    q->hdr[0] = 0;
    req_init(r, w, NULL, q->path);
    if (pick < 40) {
        q->kind = SOAK_GET;
    } else if (pick < 65) {
        q->kind = SOAK_RANGE;
        uint64_t a = rng_next(seed) % (o->size + o->size / 8); /* some 416 */
        uint64_t n = 1 + rng_next(seed) % 200000;
        switch (rng_next(seed) % 3) {
        case 0: /* a-b */
            q->first = a;
            q->last = a + n - 1 < o->size ? a + n - 1 : o->size - 1;
            snprintf(q->hdr, sizeof(q->hdr),
                     "Range: bytes=%" PRIu64 "-%" PRIu64 "\r\n", a, a + n - 1);
            break;
        case 1: /* a- */
            q->first = a;
            q->last = o->size - 1;
            snprintf(q->hdr, sizeof(q->hdr), "Range: bytes=%" PRIu64 "-\r\n",
                     a);
            break;
        default: /* -n */
            q->first = n < o->size ? o->size - n : 0;
            q->last = o->size - 1;
            snprintf(q->hdr, sizeof(q->hdr), "Range: bytes=-%" PRIu64 "\r\n",
                     n);
            break;
        }
        r->headers = q->hdr;
    } else if (pick < 80) {
        q->kind = SOAK_HEAD;
        r->method = "HEAD";
    } else {
        q->kind = SOAK_LEAVE;
        if (pick < 85)
            r->abort_at_send = 1; /* RST */
        else if (pick < 90)
            r->abort_at_send = 2; /* FIN */
        else if (pick < 95)
            r->abort_after_head = 1 + rng_next(seed) % 100; /* < any head */
        else
            r->abort_after = 1 + rng_next(seed) % (o->size - 1);
    }
}

/* Each request got what it asked for, or left as it meant to. */
static void soak_check(const soak_req_t *q, const e2e_req_t *r)
{
    /* Bodies of 200 and 206 responses are the object's bytes. */
    ck_assert_msg(r->mismatches == 0 || (r->status != 200 && r->status != 206),
                  "%s %s(kind %d): %" PRIu64 " bytes of %" PRIu64
                  " differ; status %d, Content-Range %s, X-Cache %s, "
                  "error %d",
                  r->path, q->hdr, q->kind, r->mismatches, r->body_bytes,
                  r->status, r->content_range, r->x_cache, r->error);
    if (q->kind == SOAK_LEAVE) {
        ck_assert_msg(r->error == E2E_EABORTED, "%s: error %d status %d",
                      r->path, r->error, r->status);
        return;
    }
    ck_assert_msg(r->error == E2E_OK && r->complete,
                  "%s %s: error %d complete %d status %d", r->path, q->hdr,
                  r->error, r->complete, r->status);
    ck_assert_msg(!strcmp(r->x_cache, "MISS") ||
                      !strcmp(r->x_cache, "COLLAPSED") ||
                      !strcmp(r->x_cache, "HIT"),
                  "X-Cache: %s", r->x_cache);
    if (q->kind == SOAK_RANGE && q->first >= q->size) {
        char cr[64];
        snprintf(cr, sizeof(cr), "bytes */%" PRIu64, q->size);
        ck_assert_int_eq(r->status, 416);
        ck_assert_str_eq(r->content_range, cr);
    } else if (q->kind == SOAK_RANGE) {
        char cr[96];
        snprintf(cr, sizeof(cr), "bytes %" PRIu64 "-%" PRIu64 "/%" PRIu64,
                 q->first, q->last, q->size);
        ck_assert_msg(r->status == 206 && !strcmp(r->content_range, cr),
                      "%s %s: status %d, Content-Range %s", r->path, q->hdr,
                      r->status, r->content_range);
        ck_assert_uint_eq(r->body_bytes, q->last - q->first + 1);
    } else {
        ck_assert_int_eq(r->status, 200);
        ck_assert_int_eq(r->content_length, (int64_t)q->size);
        ck_assert_uint_eq(r->body_bytes, q->kind == SOAK_HEAD ? 0 : q->size);
    }
}

static void soak(const char *const *flags, bool cached)
{
    static e2e_req_t r[SOAK_CLIENTS];
    static soak_req_t q[SOAK_CLIENTS];
    uint64_t seed = 20240601, calls = 0;
    uint64_t sent = 0, ok = 0, leave = 0, leave_unread = 0, e416 = 0;
    world_t w;
    world_up(&w, flags);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int round = 0; round < SOAK_ROUNDS; round++) {
        for (int i = 0; i < SOAK_CLIENTS; i++)
            soak_pick(&q[i], &r[i], &w, &seed, round);
        run(&w, r, SOAK_CLIENTS);
        for (int i = 0; i < SOAK_CLIENTS; i++) {
            soak_check(&q[i], &r[i]);
            sent++;
            ok += q[i].kind != SOAK_LEAVE;
            leave += q[i].kind == SOAK_LEAVE;
            leave_unread += r[i].abort_at_send != 0;
            e416 += q[i].kind == SOAK_RANGE && q[i].first >= q[i].size;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);

    char *json = soak_quiesce(&w, &calls);
    const char *held[] = {"flight.readers_open", "flight.flights_active",
                          "flight.segments_held", "flight.bytes_held"};
    for (size_t k = 0; k < sizeof(held) / sizeof(held[0]); k++)
        ck_assert_msg(json_num(json, held[k]) == 0, "%s: %s", held[k], json);
    ck_assert_uint_eq(json_num(json, "conns_open"), 1);
    /* The cache holds the flights' buffers, not their segments: what it
     * keeps shows in cache_bytes, never in segments_held. */
    if (cached)
        ck_assert_uint_gt(json_num(json, "cache_bytes"), 0);
    else
        ck_assert_uint_eq(json_num(json, "cache_objects"), 0);

    /* Every request the proxy read is counted once; a client that left
     * right after sending may have gone before the proxy read it. */
    uint64_t handled = json_num(json, "requests") - calls;
    ck_assert_uint_le(handled, sent);
    ck_assert_uint_ge(handled, sent - leave_unread);
    /* Each response from the cache or a flight counts once (a 416 decided
     * before any flight does not). */
    uint64_t served = json_num(json, "hits") + json_num(json, "misses") +
                      json_num(json, "collapsed");
    ck_assert_uint_ge(served, ok - e416);
    ck_assert_uint_le(served, handled);
    ck_assert_uint_ge(json_num(json, "misses"), 1);
    if (cached)
        ck_assert_uint_ge(json_num(json, "hits"), 1);
    ck_assert_uint_le(json_num(json, "client_gone"), leave);
    /* A healthy origin: nothing failed, nothing was cut by the proxy. */
    ck_assert_uint_eq(json_num(json, "errors_sent"), 0);
    ck_assert_uint_eq(json_num(json, "aborted"), 0);
    ck_assert_uint_eq(json_num(json, "idle_closed"), 0);
    /* Only range fetches past the end fail (FLIGHT_ERANGE, a 416). */
    ck_assert_msg(json_num(json, "flight.errors") <= e416,
                  "flight.errors %" PRIu64 ", 416s %" PRIu64,
                  json_num(json, "flight.errors"), e416);
    ck_assert_uint_eq(json_num(json, "flight.range_mismatches"), 0);
    /* Every upstream request reached the origin. */
    char *ojson = get_json(w.origin.port, "/__origin/stats");
    ck_assert_uint_eq(json_num(json, "upstream_requests"),
                      json_num(ojson, "requests"));

    double secs = (double)(t1.tv_sec - t0.tv_sec) +
                  (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("proxy: soak%s: %" PRIu64 " requests (%" PRIu64 " left early) in "
           "%.2f s; handled %" PRIu64 ", hits %" PRIu64 ", misses %" PRIu64
           ", collapsed %" PRIu64 ", client_gone %" PRIu64 ", upstream %" PRIu64
           ", cache %" PRIu64 " B; after: readers %" PRIu64 ", flights %" PRIu64
           ", segments %" PRIu64 "\n",
           cached ? "" : " (no cache)", sent, leave, secs, handled,
           json_num(json, "hits"), json_num(json, "misses"),
           json_num(json, "collapsed"), json_num(json, "client_gone"),
           json_num(json, "upstream_requests"), json_num(json, "cache_bytes"),
           json_num(json, "flight.readers_open"),
           json_num(json, "flight.flights_active"),
           json_num(json, "flight.segments_held"));
    fflush(stdout);
    free(ojson);
    free(json);
    world_down(&w); /* exit status 0: under ASan, nothing leaked */
}

START_TEST(proxy_soak)
{
    /* Chunks smaller than most ranges, so ranges span and share them. */
    soak((const char *[]){"--chunk-size", "65536", NULL}, true);
}
END_TEST

START_TEST(proxy_soak_nocache)
{
    soak((const char *[]){"--chunk-size", "65536", "--cache-size", "0", NULL},
         false);
}
END_TEST

Suite *make_proxy_suite(void)
{
    /* One case per test, so that CK_RUN_CASE can pick one. */
    const struct {
        const char *name;
        const TTest *test;
    } cases[] = {
        {"collapse", proxy_collapse_cold_gets},
        {"ranges", proxy_ranges_fetch_once},
        {"slow_client", proxy_slow_client},
        {"clients_leave", proxy_clients_leave},
        {"fail_before", proxy_fail_before_headers},
        {"fail_after", proxy_fail_after_headers},
        {"head_and_get", proxy_head_and_get},
        {"hits_and_ranges", proxy_hits_and_ranges},
        {"lag_upstream", proxy_lag_resume_upstream},
        {"lag_cache", proxy_lag_resume_cache},
        {"robustness", proxy_robustness},
        {"idle_timeout", proxy_idle_timeout},
    };
    Suite *s = suite_create("proxy");
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        tcase_add_test(tcase(s, cases[i].name, 40), cases[i].test);
    /* Last, with room for a loaded machine: each is a few seconds. */
    tcase_add_test(tcase(s, "bad_origin", 40), proxy_bad_origin);
    tcase_add_test(tcase(s, "416_known_size", 40), proxy_416_known_size);
    tcase_add_test(tcase(s, "soak", 120), proxy_soak);
    tcase_add_test(tcase(s, "soak_nocache", 120), proxy_soak_nocache);
    return s;
}

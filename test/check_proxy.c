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
    return s;
}

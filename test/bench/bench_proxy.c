/*
 * Benchmarks of the example proxy (examples/proxy.c) in front of the example
 * origin (examples/origin.c), both started here as child processes on
 * 127.0.0.1 and driven through the end-to-end harness (test/e2e.h).
 *
 * Prints one line per figure, "BENCH <name> <value> <unit>", plus "#" lines
 * with details. Every figure is measured here; nothing is assumed.
 *
 *  - collapse: 100 concurrent GETs of a cold 8 MiB object (origin: 50 ms to
 *    the first byte, 64 MiB/s), a fresh path per repetition.
 *    proxy_collapse_100_origin_hits is the origin's request count for the
 *    path (target 1); proxy_waiter_ttfb_delta_ms the p99 of the waiters'
 *    (X-Cache: COLLAPSED) time to the first body byte minus the leader's
 *    (MISS) in the same run (target <= 5 ms): waiters stream with the
 *    leader instead of waiting for its fill. The leader's total time is what
 *    a waiter behind a cache lock (nginx's proxy_cache_lock) would wait at
 *    least. The spread of all first body bytes is printed too: the leader
 *    is not necessarily served first, so the delta alone can hide how long
 *    the proxy takes to start every reader. Bodies are not verified here
 *    (the test suite does), so that the client's own work does not distort
 *    its clock.
 *  - hit: proxy_hit_rps, wrk (-t2 -c4 -d10s, two connections per core) on a
 *    cached 4 KiB object; wrk's latency p50 and p99 as "#" lines.
 *  - ranges: proxy_ranges_50_origin_bytes_ratio, 50 concurrent ranges of a
 *    cold 8 MiB object (1 MiB chunks): the origin's body bytes over the
 *    bytes of the chunks the ranges touch (target 1: each byte fetched
 *    once, nothing else fetched).
 *
 * Medians are over repetitions, each on a fresh cold path. wrk is required
 * (Debian package wrk): without it, the program says so and exits 1. Each
 * phase runs under a watchdog. The whole run takes about 15 s.
 *
 * BENCH_PROXY_ONLY=collapse,hit,ranges runs only those.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define BENCH_NAME     "bench_proxy"
#define BENCH_ONLY_ENV "BENCH_PROXY_ONLY"
#include "bench.h"

#include "e2e.h"

#define KIB ((uint64_t)1024)
#define MIB (1024 * KIB)

#define SMALL_STACK (64 * 1024)
#define RUN_MS      30000 /* one e2e_run; the watchdog is the real bound */

static e2e_proc_t origin, proxy;

/* --- Processes and counters ----------------------------------------------- */

static void start_servers(void)
{
    const char *oargv[] = {e2e_bin("origin"), "--listen", "127.0.0.1:0", NULL};
    if (e2e_spawn(&origin, oargv) != 0)
        fail("could not start the origin (built with the benchmarks?)");
    char upstream[64];
    snprintf(upstream, sizeof(upstream), "http://127.0.0.1:%d", origin.port);
    const char *pargv[] = {e2e_bin("proxy"), "--listen", "127.0.0.1:0",
                           "--upstream",     upstream,   "--chunk-size",
                           "1048576",        NULL};
    if (e2e_spawn(&proxy, pargv) != 0)
        fail("could not start the proxy");
    printf("# " BENCH_NAME ": origin on port %d, proxy on port %d (pids %d, "
           "%d)\n",
           origin.port, proxy.port, (int)origin.pid, (int)proxy.pid);
}

/* A number from a JSON stats endpoint; the program fails without it. */
static uint64_t stat_of(int port, const char *path, const char *key)
{
    char *body = NULL;
    int status = 0;
    uint64_t v = 0;
    if (e2e_get(port, path, &body, &status) != 0 || status != 200 ||
        e2e_json_u64(body, key, &v) != 0) {
        fprintf(stderr, BENCH_NAME ": no %s in %s (status %d): %s\n", key, path,
                status, body ? body : "(no body)");
        exit(1);
    }
    free(body);
    return v;
}

static uint64_t origin_stat(const char *path, const char *field)
{
    char key[256];
    snprintf(key, sizeof(key), "paths.%s.%s", path, field);
    return stat_of(origin.port, "/__origin/stats", key);
}

static uint64_t proxy_stat(const char *key)
{
    return stat_of(proxy.port, "/__coalesce/stats", key);
}

static void req_init(e2e_req_t *r, const char *path)
{
    memset(r, 0, sizeof(*r));
    r->port = proxy.port;
    r->path = path;
}

/* Runs the requests; the program fails if any did not end well. */
static void run_all(e2e_req_t *r, size_t n, const char *what)
{
    int failed = e2e_run(r, n, RUN_MS);
    if (failed != 0) {
        for (size_t i = 0; i < n; i++)
            if (r[i].error)
                fprintf(stderr,
                        BENCH_NAME ": %s: request %zu: error %d, status "
                                   "%d, %llu body bytes\n",
                        what, i, r[i].error, r[i].status,
                        (unsigned long long)r[i].body_bytes);
        fail("requests failed");
    }
}

/* --- collapse ------------------------------------------------------------- */

#define COLLAPSE_N    100
#define COLLAPSE_REPS 5
#define COLLAPSE_SIZE (8 * MIB)

typedef struct collapse_rep {
    double origin_hits;
    double delta_ms; /* waiters' ttfb p99 - leader's ttfb */
    double leader_ttfb, leader_total;
    double w_ttfb_p50, w_ttfb_p99, w_total_p50, w_total_p99;
    double spread;      /* last first body byte - first one, all clients */
    double leader_rank; /* clients whose first body byte came before the
                           leader's */
} collapse_rep_t;

static collapse_rep_t collapse_rep(int rep)
{
    static e2e_req_t r[COLLAPSE_N];
    char path[128], opath[64];
    snprintf(opath, sizeof(opath), "/bench-collapse-%d", rep);
    snprintf(path, sizeof(path), "%s?size=%llu&ttfb=50&rate=%llu", opath,
             (unsigned long long)COLLAPSE_SIZE, (unsigned long long)(64 * MIB));
    for (int i = 0; i < COLLAPSE_N; i++)
        req_init(&r[i], path);
    run_all(r, COLLAPSE_N, "collapse");

    int leader = -1;
    for (int i = 0; i < COLLAPSE_N; i++) {
        if (r[i].status != 200 || !r[i].complete ||
            r[i].body_bytes != COLLAPSE_SIZE)
            fail("collapse: a response was not a complete 200");
        if (!strcmp(r[i].x_cache, "MISS")) {
            if (leader >= 0)
                fail("collapse: more than one MISS");
            leader = i;
        }
    }
    if (leader < 0)
        fail("collapse: no MISS (the path was not cold?)");

    double ttfb[COLLAPSE_N], total[COLLAPSE_N];
    size_t n = 0;
    int64_t lo = r[leader].t_first_body, hi = lo;
    collapse_rep_t c;
    c.leader_rank = 0;
    for (int i = 0; i < COLLAPSE_N; i++) {
        if (i == leader)
            continue;
        ttfb[n] = (double)r[i].t_first_body / 1000;
        total[n++] = (double)r[i].t_done / 1000;
        lo = r[i].t_first_body < lo ? r[i].t_first_body : lo;
        hi = r[i].t_first_body > hi ? r[i].t_first_body : hi;
        c.leader_rank += r[i].t_first_body < r[leader].t_first_body;
    }
    c.spread = (double)(hi - lo) / 1000;
    c.leader_ttfb = (double)r[leader].t_first_body / 1000;
    c.leader_total = (double)r[leader].t_done / 1000;
    c.w_ttfb_p50 = e2e_percentile(ttfb, n, 50);
    c.w_ttfb_p99 = e2e_percentile(ttfb, n, 99);
    c.w_total_p50 = e2e_percentile(total, n, 50);
    c.w_total_p99 = e2e_percentile(total, n, 99);
    c.delta_ms = c.w_ttfb_p99 - c.leader_ttfb;
    c.origin_hits = (double)origin_stat(opath, "requests");
    printf("# collapse rep %d: origin requests %.0f; ttfb leader %.2f ms, "
           "waiters p50 %.2f p99 %.2f ms (delta %.2f ms); total leader "
           "%.1f ms, waiters p50 %.1f p99 %.1f ms; first bytes spread over "
           "%.2f ms, %.0f waiters before the leader\n",
           rep, c.origin_hits, c.leader_ttfb, c.w_ttfb_p50, c.w_ttfb_p99,
           c.delta_ms, c.leader_total, c.w_total_p50, c.w_total_p99, c.spread,
           c.leader_rank);
    return c;
}

/* The median over the reps of the field at offset off. */
static double med_of(const collapse_rep_t *c, size_t off)
{
    double v[COLLAPSE_REPS];
    for (int i = 0; i < COLLAPSE_REPS; i++)
        memcpy(&v[i], (const char *)&c[i] + off, sizeof(double));
    return median(v, COLLAPSE_REPS);
}

#define MED(field) med_of(c, offsetof(collapse_rep_t, field))

static void bench_collapse(void)
{
    collapse_rep_t c[COLLAPSE_REPS];
    phase("collapse", 90);
    for (int i = 0; i < COLLAPSE_REPS; i++)
        c[i] = collapse_rep(i);

    printf("# collapse: %d concurrent cold GETs of %llu MiB (origin ttfb 50 "
           "ms, 64 MiB/s), medians over %d reps\n",
           COLLAPSE_N, (unsigned long long)(COLLAPSE_SIZE / MIB),
           COLLAPSE_REPS);
    printf("# collapse: leader ttfb %.2f ms, waiter ttfb p50 %.2f ms p99 %.2f "
           "ms\n",
           MED(leader_ttfb), MED(w_ttfb_p50), MED(w_ttfb_p99));
    printf("# collapse: first body bytes of all %d clients within %.2f ms "
           "(the order in which the proxy serves its readers)\n",
           COLLAPSE_N, MED(spread));
    printf("# collapse: total leader %.1f ms, waiters p50 %.1f ms p99 %.1f "
           "ms\n",
           MED(leader_total), MED(w_total_p50), MED(w_total_p99));
    printf("# collapse: a waiter behind a cache lock (nginx proxy_cache_lock) "
           "would see no byte before the leader's fill is done: at least "
           "%.1f ms\n",
           MED(leader_total));
    double hits = MED(origin_hits), delta = MED(delta_ms);
    bench_line("proxy_collapse_100_origin_hits", hits, "requests");
    note_target("proxy_collapse_100_origin_hits", hits, 1, 1);
    bench_line("proxy_waiter_ttfb_delta_ms", delta, "ms");
    note_target("proxy_waiter_ttfb_delta_ms", delta, 5, 1);
    /* The stricter reading: no client's first byte more than 5 ms after
     * any other's, leader or not. */
    bench_line("proxy_first_byte_spread_ms", MED(spread), "ms");
    note_target("proxy_first_byte_spread_ms", MED(spread), 5, 1);
}

/* --- hit ------------------------------------------------------------------ */

/* 1 if an executable wrk is on PATH. */
static int wrk_available(void)
{
    const char *path = getenv("PATH");
    char dir[4096];
    if (!path || !*path)
        path = "/usr/local/bin:/usr/bin:/bin";
    while (*path) {
        size_t n = strcspn(path, ":");
        if (n > 0 && n < sizeof(dir) - 5) {
            memcpy(dir, path, n);
            memcpy(dir + n, "/wrk", 5);
            if (access(dir, X_OK) == 0)
                return 1;
        }
        path += n + (path[n] == ':');
    }
    return 0;
}

/*
 * Runs wrk with argv and its standard output into out (NUL-terminated,
 * truncated). Returns its exit status, or -1. The watchdog bounds it; wrk
 * dies with this thread if we are killed.
 */
static int run_wrk(const char *const argv[], char *out, size_t cap)
{
    int fds[2];
    pid_t parent = getpid();
    if (pipe(fds) != 0)
        return -1;
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
        dup2(fds[1], STDOUT_FILENO);
        close(fds[0]);
        close(fds[1]);
        execvp(argv[0], (char *const *)argv);
        _exit(127);
    }
    close(fds[1]);
    size_t len = 0;
    for (;;) {
        ssize_t n = read(fds[0], out + len, cap - 1 - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        len += (size_t)n;
        if (len == cap - 1)
            len = 0; /* keep the tail, which has the summary */
    }
    out[len] = '\0';
    close(fds[0]);
    int st;
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR)
            return -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* wrk's latency at a percentile line ("    99%    1.23ms"), in ms. */
static double wrk_latency_ms(const char *out, const char *pct)
{
    const char *p = out;
    while ((p = strstr(p, pct)) != NULL) {
        double v;
        char unit[8];
        /* Only a line that starts with the percentile (after blanks). */
        const char *q = p;
        while (q > out && q[-1] == ' ')
            q--;
        if ((q == out || q[-1] == '\n') &&
            sscanf(p + strlen(pct), " %lf%7s", &v, unit) == 2) {
            if (!strcmp(unit, "us"))
                return v / 1000;
            if (!strcmp(unit, "ms"))
                return v;
            if (!strcmp(unit, "s"))
                return v * 1000;
        }
        p += strlen(pct);
    }
    return -1;
}

static void bench_hit(void)
{
    const char *path = "/bench-hit?size=4096";
    phase("hit (warm up)", 20);
    e2e_req_t r;
    for (int i = 0; i < 2; i++) {
        req_init(&r, path);
        r.verify = 1;
        run_all(&r, 1, "hit warm-up");
        if (r.status != 200 || r.body_bytes != 4096 || r.mismatches)
            fail("hit: the warm-up GET failed");
    }
    if (strcmp(r.x_cache, "HIT") != 0)
        fail("hit: the object is not cached after a GET");
    uint64_t hits0 = proxy_stat("hits"), misses0 = proxy_stat("misses");

    phase("hit (wrk)", 40);
    char url[128];
    snprintf(url, sizeof(url), "http://127.0.0.1:%d%s", proxy.port, path);
    const char *argv[] = {"wrk", "-t2", "-c4", "-d10s", "--latency", url, NULL};
    static char out[65536];
    int st = run_wrk(argv, out, sizeof(out));
    const char *rps_at = strstr(out, "Requests/sec:");
    double rps;
    if (st != 0 || !rps_at || sscanf(rps_at, "Requests/sec: %lf", &rps) != 1) {
        fprintf(stderr, BENCH_NAME ": wrk failed (status %d):\n%s\n", st, out);
        exit(1);
    }
    if (strstr(out, "Non-2xx") || strstr(out, "Socket errors"))
        printf("# hit: wrk reported errors:\n%s", out);
    uint64_t hits = proxy_stat("hits") - hits0;
    uint64_t misses = proxy_stat("misses") - misses0;
    if (misses != 0)
        fail("hit: some wrk requests were not answered from the cache");
    printf("# hit: wrk -t2 -c4 -d10s --latency on a cached 4 KiB object "
           "(one 10 s run): %llu hits, latency p50 %.3f ms p99 %.3f ms\n",
           (unsigned long long)hits, wrk_latency_ms(out, "50%"),
           wrk_latency_ms(out, "99%"));
    bench_line("proxy_hit_rps", rps, "req/s");
}

/* --- ranges --------------------------------------------------------------- */

#define RANGES_N    50
#define RANGES_REPS 3
#define NCHUNK      8

static uint64_t rng_next(uint64_t *s)
{
    uint64_t x = (*s += 0x9E3779B97F4A7C15ull);
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/*
 * One rep: small ranges, ranges across chunk boundaries and open-ended ones
 * (as in the test suite, chunks 4 and 5 untouched). Returns the origin's
 * body bytes over the bytes of the chunks touched.
 */
static double ranges_rep(int rep)
{
    static e2e_req_t r[RANGES_N];
    static char hdr[RANGES_N][64];
    static const int small_chunks[] = {0, 1, 2, 3, 6, 7};
    static const int boundaries[] = {1, 2, 3, 7};
    const uint64_t C = MIB, size = NCHUNK * MIB;
    char path[128], opath[64];
    int touched[NCHUNK] = {0};
    uint64_t seed = 42 + (uint64_t)rep;
    snprintf(opath, sizeof(opath), "/bench-ranges-%d", rep);
    snprintf(path, sizeof(path), "%s?size=%llu&ttfb=50&rate=%llu", opath,
             (unsigned long long)size, (unsigned long long)(32 * MIB));
    for (int i = 0; i < RANGES_N; i++) {
        uint64_t a, b;
        if (i % 3 == 0) {
            int k = small_chunks[rng_next(&seed) % 6];
            uint64_t len = 1 + rng_next(&seed) % 4096;
            a = k * C + rng_next(&seed) % (C - len);
            b = a + len - 1;
            snprintf(hdr[i], sizeof(hdr[i]), "Range: bytes=%llu-%llu\r\n",
                     (unsigned long long)a, (unsigned long long)b);
        } else if (i % 3 == 1) {
            int k = boundaries[rng_next(&seed) % 4];
            a = k * C - 1 - rng_next(&seed) % 200000;
            b = k * C + rng_next(&seed) % 200000;
            snprintf(hdr[i], sizeof(hdr[i]), "Range: bytes=%llu-%llu\r\n",
                     (unsigned long long)a, (unsigned long long)b);
        } else {
            a = 6 * C + rng_next(&seed) % (2 * C);
            b = size - 1;
            snprintf(hdr[i], sizeof(hdr[i]), "Range: bytes=%llu-\r\n",
                     (unsigned long long)a);
        }
        for (uint64_t k = a / C; k <= b / C; k++)
            touched[k] = 1;
        req_init(&r[i], path);
        r[i].headers = hdr[i];
        r[i].verify = 1;
    }
    run_all(r, RANGES_N, "ranges");
    for (int i = 0; i < RANGES_N; i++)
        if (r[i].status != 206 || !r[i].complete || r[i].mismatches)
            fail("ranges: a response was not a complete, correct 206");
    uint64_t want = 0;
    for (int k = 0; k < NCHUNK; k++)
        if (touched[k])
            want += (k + 1) * C <= size ? C : size - k * C;
    uint64_t got = origin_stat(opath, "body_bytes");
    printf("# ranges rep %d: origin sent %llu bytes in %llu requests; the "
           "chunks touched hold %llu\n",
           rep, (unsigned long long)got,
           (unsigned long long)origin_stat(opath, "requests"),
           (unsigned long long)want);
    return (double)got / (double)want;
}

static void bench_ranges(void)
{
    double v[RANGES_REPS];
    phase("ranges", 60);
    for (int i = 0; i < RANGES_REPS; i++)
        v[i] = ranges_rep(i);
    double ratio = median(v, RANGES_REPS);
    bench_line("proxy_ranges_50_origin_bytes_ratio", ratio, "ratio");
    note_target("proxy_ranges_50_origin_bytes_ratio", ratio, 1, 1);
}

/* --- main ----------------------------------------------------------------- */

int main(void)
{
    int64_t start = now_ns();
    setvbuf(stdout, NULL, _IOLBF, 0);
    bool collapse = selected("collapse"), hit = selected("hit"),
         ranges = selected("ranges");
    if (hit && !wrk_available()) {
        fprintf(stderr,
                "\n" BENCH_NAME
                ": ***********************************************"
                "\n" BENCH_NAME ": wrk is NOT installed: proxy_hit_rps cannot "
                "be measured.\n" BENCH_NAME ": Install it with 'apt-get "
                "install wrk' (make bench does).\n" BENCH_NAME
                ": ***********************************************\n\n");
        return 1;
    }
    printf("# " BENCH_NAME ": %ld online CPUs\n",
           sysconf(_SC_NPROCESSORS_ONLN));
    print_load("at start");
    watchdog_start(SMALL_STACK);

    phase("start origin and proxy", 30);
    start_servers();
    if (collapse)
        bench_collapse();
    if (hit)
        bench_hit();
    if (ranges)
        bench_ranges();

    phase("stop", 20);
    int ps = e2e_stop(&proxy), os = e2e_stop(&origin);
    if (ps != 0 || os != 0) {
        fprintf(stderr,
                BENCH_NAME ": unclean exit: proxy %d, origin %d (-1: killed "
                           "by a signal)\n",
                ps, os);
        return 1;
    }
    bench_finish(start);
    return 0;
}

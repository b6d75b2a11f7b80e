/*
 * demo.c: what `make demo` runs.
 *
 * Starts the example origin (50 ms to first byte, 64 MiB/s) and the
 * collapsing proxy in front of it on 127.0.0.1, then:
 *  1. 100 concurrent GETs of one cold 8 MiB object;
 *  2. 50 concurrent Range requests of another 8 MiB object.
 * Every body byte is checked, and the origin's counters show how much work
 * reached it. Exits 0 only if every check passed.
 */
#define _POSIX_C_SOURCE 200809L

#include "e2e.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define OBJECT_SIZE (8u << 20)
#define CHUNK       (1u << 20) /* the proxy's --chunk-size */
#define NCHUNKS     (OBJECT_SIZE / CHUNK)
#define N_GETS      100
#define N_RANGES    50
#define TIMEOUT_MS  30000
#define MIB         (1024.0 * 1024.0)

#define OBJECT_PATH "/demo/object.bin"
#define RANGES_PATH "/demo/ranges.bin"
#define SIZE_QUERY  "?size=8388608"

static int failures;

static void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("   FAILED: ");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    failures++;
}

/* What one phase's responses add up to. */
struct summary {
    size_t ok, verified, miss, collapsed, hit;
    uint64_t client_bytes;
    double lead_first[N_GETS], lead_done[N_GETS];
    double wait_first[N_GETS], wait_done[N_GETS];
    size_t nlead, nwait;
};

/* Expected status, body start and length of each request. */
struct expect {
    int status;
    uint64_t first, len;
};

static void
summarize(e2e_req_t *r, const struct expect *want, size_t n, struct summary *s)
{
    memset(s, 0, sizeof(*s));
    for (size_t i = 0; i < n; i++) {
        char range[80] = "";
        if (want[i].status == 206)
            snprintf(range, sizeof(range), "bytes %llu-%llu/%u",
                     (unsigned long long)want[i].first,
                     (unsigned long long)(want[i].first + want[i].len - 1),
                     OBJECT_SIZE);
        int ok = r[i].error == E2E_OK && r[i].complete &&
                 r[i].status == want[i].status &&
                 r[i].content_length == (int64_t)want[i].len &&
                 strcmp(r[i].content_range, range) == 0;
        s->ok += ok;
        s->verified +=
            ok && r[i].body_bytes == want[i].len && r[i].mismatches == 0;
        s->client_bytes += r[i].body_bytes;
        if (!ok && failures < 10)
            fail("request %zu: status %d (want %d), Content-Range \"%s\" "
                 "(want \"%s\"), Content-Length %lld, error %d",
                 i, r[i].status, want[i].status, r[i].content_range, range,
                 (long long)r[i].content_length, r[i].error);
        double first = (double)r[i].t_first_body / 1000;
        double done = (double)r[i].t_done / 1000;
        if (strcmp(r[i].x_cache, "MISS") == 0) {
            s->miss++;
            s->lead_first[s->nlead] = first;
            s->lead_done[s->nlead++] = done;
        } else if (strcmp(r[i].x_cache, "COLLAPSED") == 0) {
            s->collapsed++;
            s->wait_first[s->nwait] = first;
            s->wait_done[s->nwait++] = done;
        } else if (strcmp(r[i].x_cache, "HIT") == 0) {
            s->hit++;
        }
    }
    if (s->verified != n)
        fail("%zu of %zu bodies not verified", n - s->verified, n);
}

/* "51.2 ms" for one value, "p50 51.2 / p99 53.0 ms" for several. */
static const char *times(char *buf, size_t cap, double *v, size_t n)
{
    if (n == 0)
        snprintf(buf, cap, "-");
    else if (n == 1)
        snprintf(buf, cap, "%.1f ms", v[0]);
    else
        snprintf(buf, cap, "p50 %.1f / p99 %.1f ms", e2e_percentile(v, n, 50),
                 e2e_percentile(v, n, 99));
    return buf;
}

static void print_summary(const struct summary *cs, size_t n, const char *ok)
{
    struct summary s = *cs; /* the percentiles sort in place */
    const char *lead = s.nlead > 1 ? "leaders" : "leader";
    char a[64], b[64];
    printf("   responses:  %zu/%zu %s, %zu/%zu bodies verified\n", s.ok, n, ok,
           s.verified, n);
    printf("   X-Cache:    %zu MISS, %zu COLLAPSED, %zu HIT\n", s.miss,
           s.collapsed, s.hit);
    printf("   first byte: %-7s %-25s waiters %s\n", lead,
           times(a, sizeof(a), s.lead_first, s.nlead),
           times(b, sizeof(b), s.wait_first, s.nwait));
    printf("   complete:   %-7s %-25s waiters %s\n", lead,
           times(a, sizeof(a), s.lead_done, s.nlead),
           times(b, sizeof(b), s.wait_done, s.nwait));
}

/* The origin's GET and body byte counts for one path. */
static void
origin_counts(int port, const char *path, uint64_t *gets, uint64_t *bytes)
{
    char key[128], *stats = NULL;
    int status = 0;
    *gets = *bytes = 0;
    if (e2e_get(port, "/__origin/stats", &stats, &status) != 0 ||
        status != 200) {
        fail("cannot read the origin's counters");
        free(stats);
        return;
    }
    snprintf(key, sizeof(key), "paths.%s.gets", path);
    int rc = e2e_json_u64(stats, key, gets);
    snprintf(key, sizeof(key), "paths.%s.body_bytes", path);
    if (rc != 0 || e2e_json_u64(stats, key, bytes) != 0)
        fail("no counters for %s at the origin", path);
    free(stats);
}

/* A fixed-seed generator (splitmix64), so every run asks the same ranges. */
static uint64_t rng_state = 42;
static uint64_t rng(void)
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* A length from 1 B to 2 MiB, spread evenly over the powers of two. */
static uint64_t rng_len(void)
{
    uint64_t e = rng() % 22;
    uint64_t len = (1ull << e) + rng() % (1ull << e);
    return len > (2u << 20) ? (2u << 20) : len;
}

/* Chunks 3 and 4 are never asked for, so the union is visibly smaller than
 * the object. */
static int touches_gap(uint64_t first, uint64_t last)
{
    return first < 5 * (uint64_t)CHUNK && last >= 3 * (uint64_t)CHUNK;
}

/* Range i: single bytes and small ranges, ranges up to 2 MiB, ranges that
 * end at, start at or straddle a chunk boundary, and open-ended "bytes=N-".
 * No suffix ranges ("bytes=-N"): the proxy learns the size with a HEAD
 * first, so their fetch starts a round trip later and may find the last
 * chunks already done, fetched again; the proxy suite tests them. */
static void make_range(size_t i, char *hdr, size_t cap, struct expect *want)
{
    uint64_t first, last, len;
    want->status = 206;
    switch (i % 5) {
    case 3: /* bytes=N- */
    case 4:
        first = 5 * (uint64_t)CHUNK + rng() % (3 * (uint64_t)CHUNK);
        snprintf(hdr, cap, "Range: bytes=%llu-\r\n", (unsigned long long)first);
        want->first = first;
        want->len = OBJECT_SIZE - first;
        return;
    }
    do {
        /* boundary >= 1 MiB >= len / 2, so first never wraps below 0. */
        uint64_t boundary = (1 + rng() % (NCHUNKS - 1)) * (uint64_t)CHUNK;
        uint64_t how = rng() % 3;
        len = i % 5 == 0 ? 1 + rng() % 4096 : rng_len();
        if (i % 5 != 2)
            first = rng() % (OBJECT_SIZE - len + 1);
        else if (how == 0 || len > boundary)
            first = boundary; /* starts a chunk */
        else if (how == 1 || len == 1)
            first = boundary - len; /* ends at a chunk's last byte */
        else
            first = boundary - len / 2; /* straddles a boundary */
        last = first + len - 1;
    } while (last >= OBJECT_SIZE || touches_gap(first, last));
    snprintf(hdr, cap, "Range: bytes=%llu-%llu\r\n", (unsigned long long)first,
             (unsigned long long)last);
    want->first = first;
    want->len = len;
}

int main(void)
{
    static e2e_req_t reqs[N_GETS];
    static struct expect want[N_GETS];
    static char range_hdr[N_RANGES][64];
    struct summary s1, s2;
    e2e_proc_t origin, proxy;
    uint8_t chunks[NCHUNKS] = {0};
    uint64_t gets, bytes, union_bytes = 0;
    char upstream[64], *pstats = NULL;
    int st;

    const char *oargv[] = {e2e_bin("origin"), "--listen", "127.0.0.1:0",
                           "--ttfb",          "50",       "--rate",
                           "67108864",        NULL};
    if (e2e_spawn(&origin, oargv) != 0) {
        fprintf(stderr, "demo: cannot start %s\n", oargv[0]);
        return 1;
    }
    snprintf(upstream, sizeof(upstream), "http://127.0.0.1:%d", origin.port);
    const char *pargv[] = {e2e_bin("proxy"), "--listen",     "127.0.0.1:0",
                           "--upstream",     upstream,       "--cache-size",
                           "268435456",      "--chunk-size", "1048576",
                           "--max-lag",      "67108864",     NULL};
    if (e2e_spawn(&proxy, pargv) != 0) {
        fprintf(stderr, "demo: cannot start %s\n", pargv[0]);
        e2e_stop(&origin);
        return 1;
    }
    printf("libcoalesce demo: origin on 127.0.0.1:%d (50 ms to first byte, "
           "64 MiB/s),\nproxy on 127.0.0.1:%d (1 MiB chunks); every body "
           "byte is checked.\n\n",
           origin.port, proxy.port);

    /* 1. One cold object, 100 clients at once. */
    printf("1) %d concurrent GETs of one cold 8 MiB object\n", N_GETS);
    for (size_t i = 0; i < N_GETS; i++) {
        reqs[i] = (e2e_req_t){
            .port = proxy.port, .path = OBJECT_PATH SIZE_QUERY, .verify = 1};
        want[i] = (struct expect){200, 0, OBJECT_SIZE};
    }
    e2e_run(reqs, N_GETS, TIMEOUT_MS);
    summarize(reqs, want, N_GETS, &s1);
    origin_counts(origin.port, OBJECT_PATH, &gets, &bytes);
    print_summary(&s1, N_GETS, "200 OK");
    printf("   origin:     %llu GET, %.1f MiB sent for the %.1f MiB object "
           "(clients got %.0f MiB)\n",
           (unsigned long long)gets, (double)bytes / MIB, OBJECT_SIZE / MIB,
           (double)s1.client_bytes / MIB);
    if (gets != 1)
        fail("the origin saw %llu GETs for the cold object, not 1",
             (unsigned long long)gets);
    if (s1.nlead == 1 && s1.nwait > 0) {
        /* nginx wakes lock waiters on a 500 ms timer once the entry is
         * complete. */
        double lead = s1.lead_done[0];
        double poll = 500 * (double)(int)(lead / 500 + 1);
        struct summary s = s1;
        printf("   With nginx's proxy_cache_lock the %zu waiters would get "
               "nothing until the leader\n   had cached the whole body "
               "(%.1f ms here), noticed on a 500 ms timer: first byte\n"
               "   after about %.0f ms instead of %.1f ms (p50).\n",
               s.nwait, lead, poll, e2e_percentile(s.wait_first, s.nwait, 50));
    }

    /* 2. Another object, 50 ranges at once. */
    printf("\n2) %d concurrent Range requests of another 8 MiB object: "
           "1 B to 2 MiB,\n   including open-ended ones\n",
           N_RANGES);
    for (size_t i = 0; i < N_RANGES; i++) {
        make_range(i, range_hdr[i], sizeof(range_hdr[i]), &want[i]);
        reqs[i] = (e2e_req_t){.port = proxy.port,
                              .path = RANGES_PATH SIZE_QUERY,
                              .headers = range_hdr[i],
                              .verify = 1};
        for (uint64_t c = want[i].first / CHUNK;
             c <= (want[i].first + want[i].len - 1) / CHUNK; c++)
            chunks[c] = 1;
    }
    for (size_t c = 0; c < NCHUNKS; c++)
        union_bytes += chunks[c] ? CHUNK : 0;
    e2e_run(reqs, N_RANGES, TIMEOUT_MS);
    summarize(reqs, want, N_RANGES, &s2);
    origin_counts(origin.port, RANGES_PATH, &gets, &bytes);
    print_summary(&s2, N_RANGES, "206 with the right Content-Range");
    printf("   origin:     %llu GETs, %.1f MiB sent; the ranges cover %.1f MiB "
           "in 1 MiB chunks\n               (clients got %.1f MiB)\n",
           (unsigned long long)gets, (double)bytes / MIB,
           (double)union_bytes / MIB, (double)s2.client_bytes / MIB);
    if (bytes != union_bytes)
        fail("the origin sent %llu bytes for the ranges, not %llu",
             (unsigned long long)bytes, (unsigned long long)union_bytes);

    /* The proxy's own view, for the curious. */
    uint64_t joins = 0, upstream_requests = 0;
    if (e2e_get(proxy.port, "/__coalesce/stats", &pstats, &st) == 0 &&
        st == 200 && e2e_json_u64(pstats, "flight.joins", &joins) == 0 &&
        e2e_json_u64(pstats, "upstream_requests", &upstream_requests) == 0)
        printf("\nproxy: %llu upstream requests, %llu joins of a flight in "
               "progress (GET /__coalesce/stats)\n",
               (unsigned long long)upstream_requests,
               (unsigned long long)joins);
    free(pstats);

    if (e2e_stop(&proxy) != 0)
        fail("the proxy did not exit cleanly on SIGTERM");
    if (e2e_stop(&origin) != 0)
        fail("the origin did not exit cleanly on SIGTERM");
    if (failures) {
        printf("\ndemo: %d check%s failed\n", failures,
               failures == 1 ? "" : "s");
        return 1;
    }
    printf("\nAll checks passed: every body verified, one origin GET for "
           "the cold object,\nand each 1 MiB chunk of the ranges fetched "
           "once.\n");
    return 0;
}

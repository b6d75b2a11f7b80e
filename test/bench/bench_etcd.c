/*
 * Benchmarks of the write-through cache over the etcd store (etcd.h),
 * against a one-member etcd that this program starts on loopback
 * (test/etcd_env.h; data dir under /dev/shm, progress notifications every
 * 100 ms).
 *
 * Prints one line per figure, "BENCH <name> <value> <unit>", plus "#"
 * lines with details. Every figure is measured here; nothing is assumed.
 *
 *  - put: etcd_put_us, the median cache_put round trip (one key, 100-byte
 *    value, a started cache on the prefix), against the same key and value
 *    from bare libcurl on one reused easy handle: etcd_raw_put_us (POST
 *    /v3/kv/put, the floor any client over the JSON gateway pays),
 *    etcd_raw_put_prev_kv_us (the request cache_put sends: a put with
 *    prev_kv, which the cache needs to stamp the entry's version and create
 *    revision) and etcd_raw_txn_us (the same put as a txn). The kinds run
 *    in batches in rotating order, so that machine noise hits each alike;
 *    each figure is the median over the batches of the per-batch median.
 *    etcd_put_overhead_pct is the library's own cost, against the same
 *    request: (put - raw put+prev_kv) / raw put+prev_kv * 100;
 *    etcd_put_vs_bare_put_pct adds etcd's cost of prev_kv.
 *  - watch: etcd_watch_propagation_p50_ms and _p99_ms, from the start of a
 *    cache_put in this process to the value being readable in another
 *    process's cache (a child with its own store and cache on the same
 *    prefix; it blocks in cache_wait_fresh() for the next revision and
 *    checks the key). CLOCK_MONOTONIC is shared by both processes.
 *  - get: etcd_get_ns, cache_get of 100,000 keys (shuffled) on a cache
 *    loaded from etcd, and etcd_get_mem_ns, the same keys on a cache over
 *    the in-memory store, measured in alternating reps; etcd_get_ratio is
 *    their quotient (about 1: reads never touch the store).
 *
 * If etcd is not installed, it says so loudly and exits with status 1.
 * Each phase runs under a watchdog. The whole run takes about 15 s.
 *
 * BENCH_ETCD_ONLY=put,watch,get runs only those.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <curl/curl.h>

#include <coalesce.h>
#include <coalesce/etcd.h>

#include "etcd_env.h"

#define BENCH_NAME     "bench_etcd"
#define BENCH_ONLY_ENV "BENCH_ETCD_ONLY"
#include "bench.h"

#define SMALL_STACK (256 * 1024)
#define VLEN        100 /* value bytes everywhere */

/* --- Small helpers -------------------------------------------------------- */

static uint64_t rng_state = 0x5EEDE7CD00000001ull;

static uint64_t rnd(void) /* splitmix64 */
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile; sorts v. */
static double pct(double *v, size_t n, double p)
{
    qsort(v, n, sizeof(*v), cmp_d);
    size_t k = (size_t)(p / 100.0 * (double)n + 0.999999);
    k = k < 1 ? 1 : k > n ? n : k;
    return v[k - 1];
}

static void print_list(const char *label, const double *v, int n)
{
    printf("%s", label);
    for (int i = 0; i < n; i++)
        printf(" %.4g", v[i]);
}

/* A failed etcd call: the code and etcd's (or libcurl's) message. */
static void die_etcd(const char *what, int rc)
{
    fprintf(stderr, BENCH_NAME ": %s: %s (%d): %s\n", what,
            coalesce_err_name(rc), rc, cache_etcd_last_error());
    exit(1);
}

#define ECHECK(call)                                                           \
    do {                                                                       \
        int rc_ = (call);                                                      \
        if (rc_ != 0)                                                          \
            die_etcd(#call, rc_);                                              \
    } while (0)

static cache_store_t *etcd_store(const char *endpoints)
{
    cache_etcd_opts_t o;
    cache_etcd_opts_init(&o);
    o.endpoints = endpoints;
    cache_store_t *s = NULL;
    ECHECK(cache_etcd_new(&s, &o));
    return s;
}

static cache_t *started_cache(cache_store_t *s, const char *prefix)
{
    cache_t *c = NULL;
    CHECK(cache_new(&c, s, prefix, strlen(prefix), NULL));
    ECHECK(cache_start(c));
    return c;
}

static cache_health_t health(cache_t *c)
{
    cache_health_t h;
    memset(&h, 0, sizeof(h));
    CHECK(cache_health(c, &h, sizeof(h)));
    return h;
}

static void b64(const unsigned char *p, size_t n, char *out)
{
    static const char a[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)p[i + 1] << 8;
        if (i + 2 < n)
            v |= p[i + 2];
        out[o++] = a[(v >> 18) & 63];
        out[o++] = a[(v >> 12) & 63];
        out[o++] = i + 1 < n ? a[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? a[v & 63] : '=';
    }
    out[o] = 0;
}

/* --- put: etcd_put_us, etcd_raw_put_us ------------------------------------ */

#define PUT_REPS 9   /* batches of each kind */
#define PUT_OPS  200 /* puts per batch */
#define PUT_WARM 20  /* untimed puts of each kind first */

/* The three kinds, timed in rotating order. */
enum { K_CACHE, K_RAW_PUT, K_RAW_TXN, K_RAW_PREV, K_N };
static const char *const kind_name[K_N] = {"cache_put", "raw put", "raw txn",
                                           "raw put+prev_kv"};

/* A bare libcurl client: one reused easy handle, one fixed request. */
struct raw {
    CURL *h;
    struct curl_slist *hd;
    char body[1024];
    char reply[4096];
    size_t rlen;
};

static size_t raw_write(char *p, size_t size, size_t n, void *ud)
{
    struct raw *r = ud;
    size_t len = size * n, room = sizeof(r->reply) - 1 - r->rlen;
    memcpy(r->reply + r->rlen, p, len < room ? len : room);
    r->rlen += len < room ? len : room;
    r->reply[r->rlen] = 0;
    return len;
}

/* txn 0: POST /v3/kv/put {key, value}; txn 1: POST /v3/kv/txn, one put
 * with prev_kv; txn 2: POST /v3/kv/put with prev_kv, what the etcd store
 * sends for cache_put (the cache needs the previous version and create
 * revision to stamp the new entry). */
static void raw_init(struct raw *r,
                     const char *endpoint,
                     int txn,
                     const char *key,
                     const unsigned char *val)
{
    char url[600], k64[128], v64[4 * VLEN / 3 + 8];
    memset(r, 0, sizeof(*r));
    b64((const unsigned char *)key, strlen(key), k64);
    b64(val, VLEN, v64);
    if (txn == 2)
        snprintf(r->body, sizeof(r->body),
                 "{\"key\":\"%s\",\"value\":\"%s\",\"prev_kv\":true}", k64,
                 v64);
    else if (txn)
        snprintf(r->body, sizeof(r->body),
                 "{\"compare\":[],\"success\":[{\"request_put\":{\"key\":"
                 "\"%s\",\"value\":\"%s\",\"prev_kv\":true}}]}",
                 k64, v64);
    else
        snprintf(r->body, sizeof(r->body), "{\"key\":\"%s\",\"value\":\"%s\"}",
                 k64, v64);
    /* The first endpoint (there is one member). */
    snprintf(url, sizeof(url), "%.*s/v3/kv/%s", (int)strcspn(endpoint, ","),
             endpoint, txn == 1 ? "txn" : "put");
    if (!(r->h = curl_easy_init()))
        fail("libcurl init failed");
    r->hd = curl_slist_append(NULL, "Content-Type: application/json");
    r->hd = curl_slist_append(r->hd, "Expect:");
    curl_easy_setopt(r->h, CURLOPT_URL, url);
    curl_easy_setopt(r->h, CURLOPT_HTTPHEADER, r->hd);
    curl_easy_setopt(r->h, CURLOPT_POSTFIELDS, r->body);
    curl_easy_setopt(r->h, CURLOPT_POSTFIELDSIZE, (long)strlen(r->body));
    curl_easy_setopt(r->h, CURLOPT_WRITEFUNCTION, raw_write);
    curl_easy_setopt(r->h, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(r->h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(r->h, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(r->h, CURLOPT_TIMEOUT_MS, 10000L);
}

static void raw_post(struct raw *r)
{
    r->rlen = 0;
    CURLcode cc = curl_easy_perform(r->h);
    long status = 0;
    curl_easy_getinfo(r->h, CURLINFO_RESPONSE_CODE, &status);
    if (cc != CURLE_OK || status != 200 || !strstr(r->reply, "\"revision\"")) {
        fprintf(stderr, BENCH_NAME ": raw request: %s, HTTP %ld: %.200s\n",
                curl_easy_strerror(cc), status, r->reply);
        exit(1);
    }
}

static void raw_free(struct raw *r)
{
    curl_slist_free_all(r->hd);
    curl_easy_cleanup(r->h);
}

/* One batch of n requests of one kind; fills lat (us), returns the median. */
static double put_batch(cache_t *c,
                        struct raw *raw,
                        int kind,
                        int n,
                        const char *key,
                        const unsigned char *val,
                        double *lat)
{
    for (int i = 0; i < n; i++) {
        int64_t t0 = now_ns();
        if (kind == K_CACHE)
            ECHECK(cache_put(c, key, strlen(key), val, VLEN, NULL, NULL));
        else
            raw_post(&raw[kind - 1]);
        lat[i] = (double)(now_ns() - t0) / 1e3;
    }
    double tmp[PUT_OPS];
    memcpy(tmp, lat, (size_t)n * sizeof(*lat));
    return pct(tmp, (size_t)n, 50);
}

static void bench_put(const char *endpoint)
{
    phase("etcd_put", 60);
    static const char prefix[] = "/bench/put/", key[] = "/bench/put/k";
    unsigned char val[VLEN];
    for (int i = 0; i < VLEN; i++)
        val[i] = (unsigned char)('a' + i % 26);
    cache_store_t *s = etcd_store(endpoint);
    cache_t *c = started_cache(s, prefix);
    struct raw raw[K_N - 1];
    for (int k = 0; k < K_N - 1; k++)
        raw_init(&raw[k], endpoint, k, key, val);
    static double all[K_N][PUT_REPS * PUT_OPS];
    double med[K_N][PUT_REPS], lat[PUT_OPS];
    for (int k = 0; k < K_N; k++)
        put_batch(c, raw, k, PUT_WARM, key, val, lat);
    for (int rep = 0; rep < PUT_REPS; rep++) {
        /* Rotate which kind goes first, so drift hits each kind alike. */
        for (int j = 0; j < K_N; j++) {
            int k = (rep + j) % K_N;
            med[k][rep] = put_batch(c, raw, k, PUT_OPS, key, val, lat);
            memcpy(all[k] + rep * PUT_OPS, lat, sizeof(lat));
        }
    }
    /* Read-your-writes, outside the timing: the last batch may be raw, so
     * one more cache_put first. */
    ECHECK(cache_put(c, key, strlen(key), val, VLEN, NULL, NULL));
    coalesce_buf_t *v = NULL;
    int grc = cache_get(c, key, strlen(key), &v, NULL);
    if (grc || coalesce_buf_len(v) != VLEN ||
        memcmp(coalesce_buf_data(v), val, VLEN))
        printf("# etcd_put: UNEXPECTED: the key is not in memory after "
               "cache_put (%s)\n",
               coalesce_err_name(grc));
    coalesce_buf_unref(v);
    printf("# etcd_put: %d rounds of one batch of %d requests of each kind "
           "(rotating order) after %d warm-up requests; key %s, %d-byte "
           "value. cache_put sends POST /v3/kv/put with prev_kv; raw put is "
           "a bare libcurl POST /v3/kv/put; raw put+prev_kv is cache_put's "
           "request from bare libcurl; raw txn is the same put as a txn\n",
           PUT_REPS, PUT_OPS, PUT_WARM, key, VLEN);
    double m[K_N];
    size_t n = (size_t)PUT_REPS * PUT_OPS;
    for (int k = 0; k < K_N; k++) {
        m[k] = median(med[k], PUT_REPS);
        printf("# etcd_put: %-15s median %.0f us; ", kind_name[k], m[k]);
        print_list("per-batch medians:", med[k], PUT_REPS);
        double p99 = pct(all[k], n, 99);
        printf("; over all %zu: p99 %.0f us, max %.0f us\n", n, p99,
               all[k][n - 1]);
    }
    printf("# etcd_put: etcd's own cost of prev_kv (raw put+prev_kv vs raw "
           "put): %+.0f us; of the txn path (raw txn vs raw put+prev_kv): "
           "%+.0f us\n",
           m[K_RAW_PREV] - m[K_RAW_PUT], m[K_RAW_TXN] - m[K_RAW_PREV]);
    bench_line("etcd_put_us", m[K_CACHE], "us");
    bench_line("etcd_raw_put_us", m[K_RAW_PUT], "us");
    bench_line("etcd_raw_put_prev_kv_us", m[K_RAW_PREV], "us");
    bench_line("etcd_raw_txn_us", m[K_RAW_TXN], "us");
    /* The library's own cost: cache_put against the same request sent by
     * bare libcurl. Against the bare put it also pays etcd's prev_kv. */
    bench_line("etcd_put_overhead_pct",
               (m[K_CACHE] - m[K_RAW_PREV]) / m[K_RAW_PREV] * 100, "%");
    bench_line("etcd_put_vs_bare_put_pct",
               (m[K_CACHE] - m[K_RAW_PUT]) / m[K_RAW_PUT] * 100, "%");
    for (int k = 0; k < K_N - 1; k++)
        raw_free(&raw[k]);
    cache_free(c);
    cache_store_free(s);
}

/* --- watch: etcd_watch_propagation_p50_ms / _p99_ms ----------------------- */

#define PROP_N       200
#define PROP_WAIT_MS 5000

static const char PROP_PREFIX[] = "/bench/prop/";

/* Parent to child, per write: which key and which tag to expect. */
struct prop_msg {
    int32_t i, tag;
};

static int read_all(int fd, void *p, size_t n)
{
    for (size_t o = 0; o < n;) {
        ssize_t r = read(fd, (char *)p + o, n - o);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        o += (size_t)r;
    }
    return 0;
}

static int write_all(int fd, const void *p, size_t n)
{
    for (size_t o = 0; o < n;) {
        ssize_t r = write(fd, (const char *)p + o, n - o);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        o += (size_t)r;
    }
    return 0;
}

static void prop_key(char *k, size_t len, int i)
{
    snprintf(k, len, "%sk%03d", PROP_PREFIX, i % 16);
}

/*
 * The child: forked before any thread exists. Reads the endpoints, starts
 * its own store and cache, says ready (0), then for each message answers
 * the CLOCK_MONOTONIC time at which key i held tag (or -1 after
 * PROP_WAIT_MS). Exits when the pipe closes.
 */
static void prop_child(int rfd, int wfd)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    uint32_t len;
    char ep[512];
    if (read_all(rfd, &len, sizeof(len)) || len >= sizeof(ep) ||
        read_all(rfd, ep, len))
        _exit(0); /* not needed this run */
    ep[len] = 0;
    cache_store_t *s = etcd_store(ep);
    cache_t *c = started_cache(s, PROP_PREFIX);
    int64_t t = 0;
    if (write_all(wfd, &t, sizeof(t)))
        _exit(1);
    struct prop_msg m;
    while (read_all(rfd, &m, sizeof(m)) == 0) {
        char k[64];
        prop_key(k, sizeof(k), m.i);
        int64_t deadline = now_ns() + (int64_t)PROP_WAIT_MS * 1000000;
        t = -1;
        while (now_ns() < deadline) {
            /* Wait for the next revision W + 1, then look at the key. */
            int64_t w = health(c).watch_rev;
            coalesce_buf_t *v = NULL;
            if (cache_get(c, k, strlen(k), &v, NULL) == 0 &&
                coalesce_buf_len(v) == VLEN &&
                memcmp(coalesce_buf_data(v), &m.tag, sizeof(m.tag)) == 0) {
                t = now_ns();
                coalesce_buf_unref(v);
                break;
            }
            coalesce_buf_unref(v);
            cache_wait_fresh(c, w + 1, 100);
        }
        if (write_all(wfd, &t, sizeof(t)))
            break;
    }
    cache_free(c);
    cache_store_free(s);
    _exit(0);
}

static pid_t prop_pid = -1;
static int prop_w = -1, prop_r = -1;

static void prop_fork(void)
{
    int down[2], up[2];
    if (pipe(down) || pipe(up))
        fail("pipe failed");
    fflush(stdout);
    fflush(stderr);
    prop_pid = fork();
    if (prop_pid < 0)
        fail("fork failed");
    if (prop_pid == 0) {
        close(down[1]);
        close(up[0]);
        prop_child(down[0], up[1]);
    }
    close(down[0]);
    close(up[1]);
    prop_w = down[1];
    prop_r = up[0];
}

static void prop_reap(void)
{
    if (prop_pid <= 0)
        return;
    close(prop_w);
    prop_w = -1;
    int st = 0;
    for (int i = 0; i < 50; i++) { /* 5 s, then SIGKILL */
        pid_t p = waitpid(prop_pid, &st, WNOHANG);
        if (p == prop_pid) {
            prop_pid = -1;
            break;
        }
        sleep_ns(100 * 1000000);
    }
    if (prop_pid > 0) {
        kill(prop_pid, SIGKILL);
        waitpid(prop_pid, &st, 0);
        prop_pid = -1;
        printf("# etcd_watch_propagation: UNEXPECTED: the child did not "
               "exit; killed\n");
    }
    close(prop_r);
}

static void bench_watch(const char *endpoint)
{
    phase("etcd_watch_propagation", 60);
    uint32_t len = (uint32_t)strlen(endpoint);
    int64_t t;
    if (write_all(prop_w, &len, sizeof(len)) ||
        write_all(prop_w, endpoint, len) || read_all(prop_r, &t, sizeof(t)))
        fail("the propagation child did not start");
    cache_store_t *s = etcd_store(endpoint);
    cache_t *c = started_cache(s, PROP_PREFIX);
    double prop[PROP_N], after_ack[PROP_N];
    int lost = 0;
    unsigned char val[VLEN];
    memset(val, 'v', sizeof(val));
    for (int i = 0; i < PROP_N; i++) {
        struct prop_msg m = {i, (int32_t)(0x51000000 + i)};
        memcpy(val, &m.tag, sizeof(m.tag));
        char k[64];
        prop_key(k, sizeof(k), i);
        if (write_all(prop_w, &m, sizeof(m)))
            fail("the propagation child is gone");
        /* Let the child read the message and block in its wait first. */
        sleep_ns(2 * 1000000);
        int64_t t0 = now_ns();
        ECHECK(cache_put(c, k, strlen(k), val, VLEN, NULL, NULL));
        int64_t t1 = now_ns();
        if (read_all(prop_r, &t, sizeof(t)))
            fail("the propagation child is gone");
        if (t < 0) {
            lost++;
            prop[i] = after_ack[i] = (double)PROP_WAIT_MS;
            continue;
        }
        prop[i] = (double)(t - t0) / 1e6;
        after_ack[i] = (double)(t - t1) / 1e6;
    }
    prop_reap();
    double p50 = pct(prop, PROP_N, 50), p99 = pct(prop, PROP_N, 99);
    double a50 = pct(after_ack, PROP_N, 50), a99 = pct(after_ack, PROP_N, 99);
    printf("# etcd_watch_propagation: %d cache_puts (16 keys, %d-byte "
           "values) in this process, each awaited by a child process "
           "blocked in cache_wait_fresh(W + 1) on its own store and cache; "
           "time from the start of cache_put to the child reading the new "
           "value: min %.3f, p50 %.3f, p99 %.3f, max %.3f ms; from "
           "cache_put's return: p50 %.3f, p99 %.3f ms (negative: the watch "
           "was faster than the reply)\n",
           PROP_N, VLEN, prop[0], p50, p99, prop[PROP_N - 1], a50, a99);
    if (lost)
        printf("# etcd_watch_propagation: UNEXPECTED: %d of %d writes never "
               "reached the child within %d ms\n",
               lost, PROP_N, PROP_WAIT_MS);
    bench_line("etcd_watch_propagation_p50_ms", p50, "ms");
    bench_line("etcd_watch_propagation_p99_ms", p99, "ms");
    cache_free(c);
    cache_store_free(s);
}

/* --- get: etcd_get_ns, etcd_get_mem_ns, etcd_get_ratio -------------------- */

#define GET_KEYS 100000
#define GET_REPS 7
#define KEY_MAX  48

static const char GET_PREFIX[] = "/bench/get/";

struct keys {
    char *arena; /* GET_KEYS keys of KEY_MAX bytes at most */
    uint8_t *len;
    uint32_t *order; /* a random permutation, for the timed gets */
};

static const char *gkey(const struct keys *k, size_t i)
{
    return k->arena + i * KEY_MAX;
}

static void keys_gen(struct keys *k)
{
    static const char alnum[] = "abcdefghijklmnopqrstuvwxyz0123456789";
    k->arena = xmalloc((size_t)GET_KEYS * KEY_MAX);
    k->len = xmalloc(GET_KEYS);
    k->order = xmalloc(GET_KEYS * sizeof(uint32_t));
    for (size_t i = 0; i < GET_KEYS; i++) {
        char *p = k->arena + i * KEY_MAX;
        int n = snprintf(p, KEY_MAX, "%s%08x", GET_PREFIX,
                         (unsigned)i * 0x9E3779B1u);
        size_t l = (size_t)n + rnd() % (KEY_MAX - (size_t)n);
        for (size_t j = (size_t)n; j < l; j++)
            p[j] = alnum[rnd() % (sizeof(alnum) - 1)];
        k->len[i] = (uint8_t)l;
        k->order[i] = (uint32_t)i;
    }
    for (size_t i = GET_KEYS - 1; i > 0; i--) {
        size_t j = (size_t)(rnd() % (i + 1));
        uint32_t t = k->order[i];
        k->order[i] = k->order[j];
        k->order[j] = t;
    }
}

static void val_fill(unsigned char *v, uint32_t i)
{
    memcpy(v, &i, 4);
    for (size_t j = 4; j < VLEN; j++)
        v[j] = (unsigned char)(i * 31 + j * 7);
}

/* All keys into s, CACHE_TXN_MAX_OPS puts per txn; returns the ms taken. */
static double fill(cache_store_t *s, const struct keys *k, bool is_etcd)
{
    static unsigned char vals[CACHE_TXN_MAX_OPS][VLEN];
    cache_op_t ops[CACHE_TXN_MAX_OPS];
    int64_t t0 = now_ns();
    for (size_t i = 0; i < GET_KEYS; i += CACHE_TXN_MAX_OPS) {
        size_t m =
            GET_KEYS - i < CACHE_TXN_MAX_OPS ? GET_KEYS - i : CACHE_TXN_MAX_OPS;
        for (size_t j = 0; j < m; j++) {
            val_fill(vals[j], (uint32_t)(i + j));
            memset(&ops[j], 0, sizeof(ops[j]));
            ops[j].type = CACHE_OP_PUT;
            ops[j].key = gkey(k, i + j);
            ops[j].keylen = k->len[i + j];
            ops[j].value = vals[j];
            ops[j].vallen = VLEN;
        }
        int ok = 0;
        int64_t rev = 0;
        int rc = s->ops->txn(s, NULL, 0, ops, m, &ok, &rev, NULL);
        if (rc && is_etcd)
            die_etcd("txn of puts", rc);
        CHECK(rc);
        if (!ok)
            fail("a txn without compares did not succeed");
    }
    return (double)(now_ns() - t0) / 1e6;
}

/* One pass of cache_get over every key, shuffled; ns per get. */
static double get_pass(cache_t *c, const struct keys *k)
{
    int64_t t0 = now_ns();
    for (size_t n = 0; n < GET_KEYS; n++) {
        uint32_t i = k->order[n];
        coalesce_buf_t *v;
        int rc = cache_get(c, gkey(k, i), k->len[i], &v, NULL);
        if (rc != 0)
            die("cache_get of a loaded key", rc);
        coalesce_buf_unref(v);
    }
    return (double)(now_ns() - t0) / GET_KEYS;
}

/* Every key's value, outside the timing; returns the wrong keys. */
static long get_check(cache_t *c, const struct keys *k)
{
    long bad = 0;
    unsigned char want[VLEN];
    for (uint32_t i = 0; i < GET_KEYS; i++) {
        coalesce_buf_t *v = NULL;
        cache_meta_t m;
        val_fill(want, i);
        if (cache_get(c, gkey(k, i), k->len[i], &v, &m) != 0 ||
            coalesce_buf_len(v) != VLEN ||
            memcmp(coalesce_buf_data(v), want, VLEN) || m.version < 1)
            bad++;
        coalesce_buf_unref(v);
    }
    return bad;
}

static void bench_get(const char *endpoint)
{
    phase("etcd_get: fill", 60);
    struct keys k;
    keys_gen(&k);
    cache_store_t *es = etcd_store(endpoint), *ms = NULL;
    CHECK(cache_memstore_new(&ms, NULL));
    double fill_e = fill(es, &k, true), fill_m = fill(ms, &k, false);

    phase("etcd_get: load", 60);
    cache_t *ce = NULL, *cm = NULL;
    CHECK(cache_new(&ce, es, GET_PREFIX, strlen(GET_PREFIX), NULL));
    CHECK(cache_new(&cm, ms, GET_PREFIX, strlen(GET_PREFIX), NULL));
    int64_t t0 = now_ns();
    ECHECK(cache_start(ce));
    double load_e = (double)(now_ns() - t0) / 1e6;
    t0 = now_ns();
    CHECK(cache_start(cm));
    double load_m = (double)(now_ns() - t0) / 1e6;
    printf("# etcd_get: %d keys of %zu-%d bytes, %d-byte values, written "
           "with txns of %d puts: into etcd in %.0f ms (%.0f puts/s), into "
           "the memory store in %.0f ms; cache_start (paged load, 500 keys "
           "a page): from etcd %.0f ms, from memory %.0f ms\n",
           GET_KEYS, strlen(GET_PREFIX) + 8, KEY_MAX - 1, VLEN,
           CACHE_TXN_MAX_OPS, fill_e, GET_KEYS / fill_e * 1e3, fill_m, load_e,
           load_m);
    cache_health_t he = health(ce), hm = health(cm);
    long bad_e = get_check(ce, &k), bad_m = get_check(cm, &k);
    if (he.entries != GET_KEYS || hm.entries != GET_KEYS || bad_e || bad_m ||
        he.bytes != hm.bytes)
        printf("# etcd_get: UNEXPECTED: entries %llu (etcd) and %llu "
               "(memory), bytes %llu and %llu, wrong keys %ld and %ld\n",
               (unsigned long long)he.entries, (unsigned long long)hm.entries,
               (unsigned long long)he.bytes, (unsigned long long)hm.bytes,
               bad_e, bad_m);

    phase("etcd_get: gets", 60);
    double ge[GET_REPS], gm[GET_REPS];
    get_pass(ce, &k); /* warm-up */
    get_pass(cm, &k);
    for (int rep = 0; rep < GET_REPS; rep++) {
        if (rep % 2) {
            gm[rep] = get_pass(cm, &k);
            ge[rep] = get_pass(ce, &k);
        } else {
            ge[rep] = get_pass(ce, &k);
            gm[rep] = get_pass(cm, &k);
        }
    }
    double me = median(ge, GET_REPS), mm = median(gm, GET_REPS);
    printf("# etcd_get: cache_get (value ref + unref, no meta) of the %d "
           "keys in shuffled order, %d alternating reps after a warm-up "
           "pass; ",
           GET_KEYS, GET_REPS);
    print_list("ns per get, etcd cache:", ge, GET_REPS);
    print_list("; memory-store cache:", gm, GET_REPS);
    printf("\n");
    bench_line("etcd_get_ns", me, "ns");
    bench_line("etcd_get_mem_ns", mm, "ns");
    bench_line("etcd_get_ratio", me / mm, "x");

    /* Context for the load figure: etcd 3.4 counts every key left in the
     * range for each page, so larger pages load faster. */
    phase("etcd_get: load with larger pages", 60);
    static const size_t pages[] = {5000, 50000};
    printf("# etcd_get: cache_start from etcd with larger pages:");
    for (size_t i = 0; i < sizeof(pages) / sizeof(pages[0]); i++) {
        cache_opts_t o;
        cache_opts_init(&o);
        o.page_size = pages[i];
        cache_t *cp = NULL;
        CHECK(cache_new(&cp, es, GET_PREFIX, strlen(GET_PREFIX), &o));
        t0 = now_ns();
        ECHECK(cache_start(cp));
        printf(" page_size %zu: %.0f ms (%llu entries);", pages[i],
               (double)(now_ns() - t0) / 1e6,
               (unsigned long long)health(cp).entries);
        cache_free(cp);
    }
    printf("\n");

    phase("etcd_get: teardown", 30);
    cache_free(ce);
    cache_free(cm);
    cache_store_free(es);
    cache_store_free(ms);
    free(k.arena);
    free(k.len);
    free(k.order);
}

/* --- main ----------------------------------------------------------------- */

int main(void)
{
    int64_t start = now_ns();
    setvbuf(stdout, NULL, _IOLBF, 0);
    bool put = selected("put"), watch = selected("watch"),
         get = selected("get");
    /* Before any thread: libcurl's global init is not thread-safe in
     * every version. */
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
        fail("curl_global_init failed");
    if (!etcd_env_available()) {
        fprintf(stderr,
                "\n" BENCH_NAME ": ******************************************"
                "*****\n" BENCH_NAME ": etcd is NOT available: the etcd "
                "benchmarks did not run.\n" BENCH_NAME ": Install it with "
                "'apt-get install etcd-server'.\n" BENCH_NAME
                ": ***********************************************\n\n");
        return 1;
    }
    /* The child exists before any thread does (fork is then safe). */
    if (watch)
        prop_fork();
    watchdog_start(SMALL_STACK);

    phase("etcd start", 60);
    etcd_env_t env;
    etcd_env_opts_t eo;
    memset(&eo, 0, sizeof(eo));
    eo.members = 1;
    eo.progress_ms = 100;
    if (etcd_env_start(&env, &eo) != 0) {
        fprintf(stderr, BENCH_NAME ": could not start etcd (see above)\n");
        return 1;
    }
    printf("# " BENCH_NAME ": etcd at %s (one member, data dir under %s, "
           "progress notifications every %d ms)\n",
           env.endpoints, env.dir, eo.progress_ms);
    print_load("at start");

    if (put)
        bench_put(env.endpoints);
    if (watch)
        bench_watch(env.endpoints);
    if (get)
        bench_get(env.endpoints);

    phase("etcd stop", 30);
    etcd_env_stop(&env);
    bench_finish(start);
    return 0;
}

/*
 * Tests for the etcd store (include/coalesce/etcd.h): its contract against
 * the shared etcd, faults on real servers (kill/restart, a cut watch plus
 * compaction, a 3-member cluster losing its leader, two processes), bad
 * input from a fake etcd, and authentication and TLS.
 *
 * Rules (as in check_cache.c):
 *  - Every test uses its own key prefix (mkpfx).
 *  - No sleeps as synchronisation: counters, the watch recorder's and the
 *    report log's condition variables, cache_wait_fresh(). nap_ms() only
 *    paces polls where time itself is the subject (lease and token expiry)
 *    and the retry backoff of writers whose outcome is unknown.
 *  - Worker threads (and watch callbacks) never call ck_assert: they
 *    record, the main thread checks.
 *  - Special servers (own etcd, cluster, auth, TLS, proxies, fake servers)
 *    are started by the test itself and registered (live_*), so that the
 *    checked teardown stops them by PID if an assertion fails in no-fork
 *    mode; in fork mode the members die with the test process
 *    (PR_SET_PDEATHSIG) and the next etcd_env_start() removes their dirs.
 *  - The etcd store allocates with malloc, so test_alloc_live() only sees
 *    the caches; the ASan build sees the rest.
 *
 * Tests:
 *  basics (shared etcd): options; paging at a pinned revision; every
 *    compare target x operator, op results, failed compares; gRPC error
 *    mapping with etcd's message; watch events, catch-up, progress,
 *    compacted start; leases (grant, ttl, keepalive, expiry, revoke);
 *    endpoint failover (refused, silent); a start while unreachable (X13).
 *  faults: a stalled network (request and watch idle timeouts); etcd
 *    killed and restarted under a cache; writes and a compaction while
 *    the watch is cut (relist); two processes (propagation latency).
 *  cluster: the leader of 3 members killed under two writing caches.
 *  bad server (fake etcd): bad replies and error codes; a watch stream
 *    split across chunks; every way a stream can end; a cache that meets
 *    undecodable data and recovers.
 *  auth and TLS: credentials, wrong password, read-only user, token
 *    expiry; TLS certificates; TLS with auth.
 */
#include "helpers.h"

#include "etcd_env.h"

#include <coalesce/etcd.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* --- Small utilities ------------------------------------------------------ */

#define ASSERT_RC(expr, want)                                                  \
    do {                                                                       \
        int rc_ = (expr);                                                      \
        int want_ = (want);                                                    \
        ck_assert_msg(rc_ == want_, "%s: %s (%d), want %s; last error: %s",    \
                      #expr, coalesce_err_name(rc_), rc_,                      \
                      coalesce_err_name(want_), cache_etcd_last_error());      \
    } while (0)
#define ASSERT_OK(expr) ASSERT_RC(expr, 0)

/* cache_etcd_last_error() contains needle. */
#define ASSERT_LAST_ERROR_HAS(needle)                                          \
    ck_assert_msg(strstr(cache_etcd_last_error(), (needle)) != NULL,           \
                  "last error \"%s\" lacks \"%s\"", cache_etcd_last_error(),   \
                  (needle))

/* A wait bound, scaled like the test timeouts (valgrind). */
static int ms_scaled(int ms)
{
    return (int)(test_timeout(ms / 1000.0) * 1000.0 + 0.5);
}

static void abs_after(struct timespec *ts, int ms)
{
    clock_gettime(CLOCK_REALTIME, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

/* Only where time is the subject (expiry polls) and for retry backoff. */
static void nap_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

/* Waits until the counter reaches v, at most ms: true if it did. */
static bool cnt_wait(counter_t *c, long v, int ms)
{
    struct timespec ts;
    abs_after(&ts, ms_scaled(ms));
    pthread_mutex_lock(&c->mu);
    int rc = 0;
    while (c->n < v && rc == 0)
        rc = pthread_cond_timedwait(&c->cv, &c->mu, &ts);
    bool ok = c->n >= v;
    pthread_mutex_unlock(&c->mu);
    return ok;
}

static long cnt_get(counter_t *c)
{
    pthread_mutex_lock(&c->mu);
    long n = c->n;
    pthread_mutex_unlock(&c->mu);
    return n;
}

/* Results worth reading in the log: flushed at once (a failing
 * assertion in a forked test exits without flushing stdout). */
__attribute__((format(printf, 1, 2))) static void note(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    fflush(stdout);
}

/* A unique key prefix per test. */
static unsigned pfx_seq;

static void mkpfx(char *out, size_t cap, const char *tag)
{
    snprintf(out, cap, "/ce%ld.%u.%s/", (long)getpid(), pfx_seq++, tag);
}

/* Keys: prefix + formatted suffix, from a ring of thread-local buffers. */
static _Thread_local char kring[32][256];
static _Thread_local unsigned kring_i;

__attribute__((format(printf, 2, 3))) static const char *
key_of(const char *pfx, const char *fmt, ...)
{
    char *b = kring[kring_i++ % 32];
    size_t n = strlen(pfx);
    memcpy(b, pfx, n);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b + n, sizeof(kring[0]) - n, fmt, ap);
    va_end(ap);
    return b;
}

/* etcd's prefix end: the last byte below 0xff incremented, the rest cut;
 * all 0xff: "\0" (no upper bound). */
static size_t prefix_end(const void *p, size_t n, char *out)
{
    memcpy(out, p, n);
    while (n > 0) {
        unsigned char b = (unsigned char)out[n - 1];
        if (b < 0xff) {
            out[n - 1] = (char)(b + 1);
            return n;
        }
        n--;
    }
    out[0] = 0;
    return 1;
}

/* Standard padded base64 of a string (for scripted replies). */
static void b64(const char *in, char *out)
{
    static const char a[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const unsigned char *p = (const unsigned char *)in;
    size_t n = strlen(in), i = 0, o = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16 | (uint32_t)p[i + 1] << 8 | p[i + 2];
        out[o++] = a[v >> 18];
        out[o++] = a[(v >> 12) & 63];
        out[o++] = a[(v >> 6) & 63];
        out[o++] = a[v & 63];
    }
    if (i < n) {
        uint32_t v = (uint32_t)p[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)p[i + 1] << 8;
        out[o++] = a[v >> 18];
        out[o++] = a[(v >> 12) & 63];
        out[o++] = i + 1 < n ? a[(v >> 6) & 63] : '=';
        out[o++] = '=';
    }
    out[o] = 0;
}

/* The port of "http://127.0.0.1:PORT" (the first endpoint of a list). */
static int port_of(const char *url)
{
    const char *p = strstr(url, "127.0.0.1:");
    ck_assert_ptr_nonnull(p);
    return atoi(p + strlen("127.0.0.1:"));
}

/* --- Servers started by tests (stopped by the teardown if a test fails) -- */

/* Servers a test started: an etcd, a proxy or a fake server each, with
 * how to stop it. */
#define MAX_LIVE 12

typedef struct live {
    void *p;
    void (*stop)(void *p);
} live_t;

static live_t live[MAX_LIVE];

static void *live_add(void *p, void (*stop)(void *p))
{
    for (int i = 0; i < MAX_LIVE; i++)
        if (!live[i].p) {
            live[i] = (live_t){p, stop};
            return p;
        }
    stop(p);
    ck_abort_msg("too many servers started by one test");
    return NULL;
}

/* Stops p now (NULL: everything still running). */
static void live_stop(void *p)
{
    for (int i = 0; i < MAX_LIVE; i++)
        if (live[i].p && (!p || live[i].p == p)) {
            live_t l = live[i];
            live[i].p = NULL;
            l.stop(l.p);
        }
}

static void stop_env(void *p)
{
    etcd_env_stop(p);
    free(p);
}

static void stop_proxy(void *p)
{
    tcp_proxy_stop(p);
}

static void stop_fake(void *p)
{
    fake_http_stop(p);
}

static etcd_env_t *env_up(const etcd_env_opts_t *o)
{
    ck_assert_msg(etcd_env_available(), "etcd is not installed (see above)");
    etcd_env_t *e = calloc(1, sizeof(*e));
    ck_assert_ptr_nonnull(e);
    if (etcd_env_start(e, o) != 0) {
        free(e);
        ck_abort_msg("etcd_env_start failed (see stderr)");
    }
    return live_add(e, stop_env);
}

static void env_down(etcd_env_t *e)
{
    live_stop(e);
}

static tcp_proxy_t *proxy_up(int port)
{
    tcp_proxy_t *p = NULL;
    ck_assert_int_eq(tcp_proxy_start(&p, port), 0);
    return live_add(p, stop_proxy);
}

static void proxy_down(tcp_proxy_t *p)
{
    live_stop(p);
}

static fake_http_t *fake_up(fake_handler_t h, void *data)
{
    fake_http_t *f = NULL;
    ck_assert_int_eq(fake_http_start(&f, h, data), 0);
    return live_add(f, stop_fake);
}

static void fake_down(fake_http_t *f)
{
    live_stop(f);
}

/* Checked teardown: whatever a failed test left running. */
static void live_teardown(void)
{
    live_stop(NULL);
}

/* --- Stores --------------------------------------------------------------- */

static cache_etcd_opts_t eopts(const char *eps)
{
    cache_etcd_opts_t o;
    cache_etcd_opts_init(&o);
    o.endpoints = eps;
    /* A TLS handshake under valgrind can take longer than 1 s. */
    o.connect_timeout_ms = ms_scaled(1000);
    o.request_timeout_ms = ms_scaled(10000);
    return o;
}

static cache_store_t *store_with(const cache_etcd_opts_t *o)
{
    cache_store_t *s = NULL;
    ASSERT_OK(cache_etcd_new(&s, o));
    ck_assert_ptr_nonnull(s);
    return s;
}

static cache_store_t *store_at(const char *eps)
{
    cache_etcd_opts_t o = eopts(eps);
    return store_with(&o);
}

static const char *shared_eps(void)
{
    const char *e = test_etcd_endpoints();
    ck_assert_msg(e != NULL, "etcd is not running (see the message above)");
    return e;
}

static cache_store_t *shared_store(void)
{
    return store_at(shared_eps());
}

/* One put (lease 0: none) as a transaction; the rc, *rev the commit. */
static int s_put_rc(
    cache_store_t *s, const char *k, const char *v, int64_t lease, int64_t *rev)
{
    cache_op_t op = {.type = CACHE_OP_PUT,
                     .key = k,
                     .keylen = strlen(k),
                     .value = v,
                     .vallen = strlen(v),
                     .lease = lease};
    int ok = 0;
    int64_t r = 0;
    int rc = s->ops->txn(s, NULL, 0, &op, 1, &ok, &r, NULL);
    if (!rc && !ok)
        rc = COALESCE_ECONFLICT;
    if (rev)
        *rev = r;
    return rc;
}

static int64_t s_put(cache_store_t *s, const char *k, const char *v)
{
    int64_t r = 0;
    ASSERT_OK(s_put_rc(s, k, v, 0, &r));
    ck_assert_int_gt(r, 0);
    return r;
}

/* Delete one key; returns the revision (asserts success). */
static int64_t s_del(cache_store_t *s, const char *k)
{
    cache_op_t op = {.type = CACHE_OP_DELETE, .key = k, .keylen = strlen(k)};
    int ok = 0;
    int64_t r = 0;
    cache_op_result_t res;
    ASSERT_OK(s->ops->txn(s, NULL, 0, &op, 1, &ok, &r, &res));
    ck_assert_int_eq(ok, 1);
    return r;
}

static int64_t s_rev(cache_store_t *s)
{
    int64_t r = 0;
    ASSERT_OK(cache_etcd_revision(s, &r));
    ck_assert_int_gt(r, 0);
    return r;
}

/* One key read straight from etcd. */
typedef struct sget {
    int n;
    char val[256];
    size_t vallen;
    cache_kv_t kv; /* numbers only */
} sget_t;

static int sget_cb(void *data, const cache_kv_t *kv)
{
    sget_t *g = data;
    g->n++;
    g->kv = *kv;
    g->vallen = kv->vallen;
    size_t n =
        kv->vallen < sizeof(g->val) - 1 ? kv->vallen : sizeof(g->val) - 1;
    if (n)
        memcpy(g->val, kv->value, n);
    g->val[n] = 0;
    return 0;
}

static int s_get_rc(cache_store_t *s, const char *k, sget_t *g)
{
    memset(g, 0, sizeof(*g));
    int64_t h;
    int more;
    return s->ops->range(s, k, strlen(k), NULL, 0, 0, 0, sget_cb, g, &h, &more);
}

static sget_t s_get(cache_store_t *s, const char *k)
{
    sget_t g;
    ASSERT_OK(s_get_rc(s, k, &g));
    return g;
}

/* --- A cache's scan against etcd's range (kvlist_t: helpers.h) --------- */

/* Every key of etcd under pfx, at revision rev (0: latest). */
static int store_list_rc(
    cache_store_t *s, const char *pfx, int64_t rev, kvlist_t *out, int64_t *hdr)
{
    memset(out, 0, sizeof(*out));
    char end[300];
    size_t el = prefix_end(pfx, strlen(pfx), end);
    int64_t h = 0;
    int more = 0;
    int rc = s->ops->range(s, pfx, strlen(pfx), end, el, rev, 0, kvl_store_cb,
                           out, &h, &more);
    if (!rc && more)
        rc = COALESCE_EBACKEND; /* no limit was given */
    if (hdr)
        *hdr = h;
    return rc;
}

static void store_list(cache_store_t *s, const char *pfx, kvlist_t *out)
{
    ASSERT_OK(store_list_rc(s, pfx, 0, out, NULL));
}

static int cache_list(cache_t *c, const char *pfx, kvlist_t *out)
{
    memset(out, 0, sizeof(*out));
    return cache_scan(c, pfx, strlen(pfx), kvl_scan_cb, out);
}

/*
 * The cache holds exactly what etcd holds under pfx (keys, values, create
 * and mod revisions, versions, leases), once fresh at etcd's revision.
 */
static void assert_cache_is_etcd(cache_t *c,
                                 cache_store_t *s,
                                 const char *pfx,
                                 int wait_ms,
                                 const char *what)
{
    int64_t rev = s_rev(s);
    int rc = cache_wait_fresh(c, rev, ms_scaled(wait_ms));
    ck_assert_msg(rc == 0, "%s: cache_wait_fresh(%" PRId64 "): %s", what, rev,
                  coalesce_err_name(rc));
    kvlist_t a, b;
    store_list(s, pfx, &a);
    rc = cache_list(c, pfx, &b);
    char msg[600] = "";
    int d = rc ? 1 : kvl_diff(&a, &b, msg, sizeof(msg));
    int dis = b.disorder;
    kvl_free(&a);
    kvl_free(&b);
    ASSERT_OK(rc);
    ck_assert_msg(d == 0, "%s: etcd vs cache: %s", what, msg);
    ck_assert_msg(!dis, "%s: cache scan not in byte order", what);
}

/* --- Caches and their reports --------------------------------------------- */

static cache_t *cache_over(cache_store_t *s, const char *pfx, replog_t *log)
{
    cache_opts_t o;
    cache_opts_init(&o);
    o.backoff_min_ms = 10;
    o.backoff_max_ms = 200;
    o.page_size = 7; /* several pages for the larger prefixes */
    if (log) {
        o.report = replog_cb;
        o.report_data = log;
    }
    cache_t *c = NULL;
    ASSERT_OK(cache_new(&c, s, pfx, strlen(pfx), &o));
    ck_assert_ptr_nonnull(c);
    return c;
}

static cache_health_t health_of(cache_t *c)
{
    cache_health_t h;
    memset(&h, 0, sizeof(h));
    ASSERT_OK(cache_health(c, &h, sizeof(h)));
    return h;
}

/* A cached value as a string (rc of cache_get). */
static int
cget(cache_t *c, const char *k, char *val, size_t cap, cache_meta_t *m)
{
    coalesce_buf_t *b = NULL;
    int rc = cache_get(c, k, strlen(k), &b, m);
    if (!rc) {
        size_t n = coalesce_buf_len(b);
        if (n >= cap)
            n = cap - 1;
        memcpy(val, coalesce_buf_data(b), n);
        val[n] = 0;
        coalesce_buf_unref(b);
    }
    return rc;
}

#define ASSERT_CACHED(c, k, want)                                              \
    do {                                                                       \
        char v_[256];                                                          \
        ASSERT_OK(cget((c), (k), v_, sizeof(v_), NULL));                       \
        ck_assert_str_eq(v_, (want));                                          \
    } while (0)

/* --- A watch recorder ----------------------------------------------------- */

#define WR_MAXEV 256

typedef struct wev {
    int type;
    char key[160];
    char val[160];
    size_t keylen, vallen;
    int has_value;
    int64_t create, mod, version, lease;
    int64_t resp_rev;
    long resp_no;
} wev_t;

typedef struct wrec {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    long resps;        /* every callback */
    long ev_resps;     /* responses with events */
    long progress;     /* progress notifications */
    long cancels;      /* canceling responses */
    long after_cancel; /* callbacks after a canceling one */
    long late;         /* callbacks after watch_cancel returned */
    int stopped;
    long nev;
    wev_t ev[WR_MAXEV];
    int64_t last_progress;
    int64_t top; /* highest event revision delivered */
    int catchup; /* an events response stamped past its last event */
    int bad;     /* a response that breaks store.h's rules (why) */
    char why[200];
    int error;
    int64_t compact;
} wrec_t;

static void wrec_init(wrec_t *w)
{
    memset(w, 0, sizeof(*w));
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
}

static void wrec_destroy(wrec_t *w)
{
    pthread_cond_destroy(&w->cv);
    pthread_mutex_destroy(&w->mu);
}

static void wrec_bad(wrec_t *w, const char *why)
{
    if (!w->bad++)
        snprintf(w->why, sizeof(w->why), "%s", why);
}

static void wrec_cb(void *data, const cache_watch_resp_t *r)
{
    wrec_t *w = data;
    pthread_mutex_lock(&w->mu);
    if (w->stopped)
        w->late++;
    if (w->cancels)
        w->after_cancel++;
    w->resps++;
    if (r->error) {
        w->cancels++;
        w->error = r->error;
        w->compact = r->compact_revision;
        if (r->n)
            wrec_bad(w, "a canceling response with events");
    } else if (r->n) {
        w->ev_resps++;
        if (!r->events)
            wrec_bad(w, "events NULL");
        for (size_t i = 0; r->events && i < r->n; i++) {
            const cache_event_t *e = &r->events[i];
            if (e->kv.mod_rev < w->top ||
                (i == 0 && e->kv.mod_rev == w->top && w->top))
                wrec_bad(w, "event revisions not increasing across responses");
            if (e->kv.mod_rev > r->revision)
                wrec_bad(w, "an event past its response's revision");
            if (e->kv.mod_rev > w->top)
                w->top = e->kv.mod_rev;
            if (w->nev == WR_MAXEV) {
                wrec_bad(w, "too many events");
                continue;
            }
            wev_t *d = &w->ev[w->nev++];
            d->type = e->type;
            d->keylen = e->kv.keylen < sizeof(d->key) - 1 ? e->kv.keylen
                                                          : sizeof(d->key) - 1;
            memcpy(d->key, e->kv.key, d->keylen);
            d->key[d->keylen] = 0;
            d->has_value = e->kv.value != NULL;
            d->vallen = e->kv.vallen < sizeof(d->val) - 1 ? e->kv.vallen
                                                          : sizeof(d->val) - 1;
            if (d->vallen)
                memcpy(d->val, e->kv.value, d->vallen);
            d->val[d->vallen] = 0;
            d->create = e->kv.create_rev;
            d->mod = e->kv.mod_rev;
            d->version = e->kv.version;
            d->lease = e->kv.lease;
            d->resp_rev = r->revision;
            d->resp_no = w->resps;
        }
        if (r->events && r->revision > r->events[r->n - 1].kv.mod_rev)
            w->catchup = 1;
    } else {
        w->progress++;
        if (r->revision < w->top)
            wrec_bad(w, "a progress notification below a delivered event");
        w->last_progress = r->revision;
    }
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

/* Waits until *field >= n (a field of w): true if it got there. */
static bool wrec_wait(wrec_t *w, const long *field, long n, int ms)
{
    struct timespec ts;
    abs_after(&ts, ms_scaled(ms));
    pthread_mutex_lock(&w->mu);
    int rc = 0;
    while (*field < n && rc == 0)
        rc = pthread_cond_timedwait(&w->cv, &w->mu, &ts);
    bool ok = *field >= n;
    pthread_mutex_unlock(&w->mu);
    return ok;
}

static long wrec_get(wrec_t *w, const long *field)
{
    pthread_mutex_lock(&w->mu);
    long n = *field;
    pthread_mutex_unlock(&w->mu);
    return n;
}

static int watch_pfx(cache_store_t *s,
                     const char *pfx,
                     int64_t start,
                     wrec_t *w,
                     cache_watch_t **out)
{
    char end[300];
    size_t el = prefix_end(pfx, strlen(pfx), end);
    return s->ops->watch(s, pfx, strlen(pfx), end, el, start, wrec_cb, w, out);
}

static void watch_stop(cache_store_t *s, cache_watch_t *cw, wrec_t *w)
{
    s->ops->watch_cancel(s, cw);
    pthread_mutex_lock(&w->mu);
    w->stopped = 1;
    pthread_mutex_unlock(&w->mu);
}

#define ASSERT_EV(w, i, typ, k, v, modrev)                                     \
    do {                                                                       \
        const wev_t *e_ = &(w)->ev[(i)];                                       \
        ck_assert_int_eq(e_->type, (typ));                                     \
        ck_assert_str_eq(e_->key, (k));                                        \
        if ((typ) == CACHE_EV_PUT) {                                           \
            ck_assert_int_eq(e_->has_value, 1);                                \
            ck_assert_str_eq(e_->val, (v));                                    \
        } else {                                                               \
            ck_assert_int_eq(e_->has_value, 0);                                \
        }                                                                      \
        ck_assert_int_eq(e_->mod, (modrev));                                   \
    } while (0)

/* ==========================================================================
 * 1. Store basics against the shared etcd
 * ========================================================================== */

START_TEST(test_new_options)
{
    const long base = test_alloc_live();
    cache_etcd_opts_t o;
    cache_etcd_opts_init(&o);
    ck_assert_uint_eq(o.size, sizeof(o));
    ck_assert_ptr_null(o.endpoints);
    ck_assert_ptr_null(o.username);
    ck_assert_int_eq(o.connect_timeout_ms, 1000);
    ck_assert_int_eq(o.request_timeout_ms, 10000);
    ck_assert_int_eq(o.watch_idle_ms, 0);
    ck_assert_uint_eq(o.max_idle_conns, 4);

    cache_store_t *s = SENTINEL(cache_store_t);
    o.endpoints = "http://127.0.0.1:1";
    ASSERT_RC(cache_etcd_new(NULL, &o), COALESCE_EINVAL);
    ASSERT_RC(cache_etcd_new(&s, NULL), COALESCE_EINVAL);
    ck_assert_ptr_null(s);

    static const char *const bad[] = {
        NULL,
        "",
        " , ",
        "ftp://127.0.0.1:2379",
        "127.0.0.1:2379",
        "unix:///tmp/etcd.sock",
        "http://",
        "https://",
        "http://127.0.0.1:2379,ftp://127.0.0.1:2380",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        o.endpoints = bad[i];
        s = SENTINEL(cache_store_t);
        int rc = cache_etcd_new(&s, &o);
        ck_assert_msg(rc == COALESCE_EINVAL, "endpoints \"%s\": %s",
                      bad[i] ? bad[i] : "(null)", coalesce_err_name(rc));
        ck_assert_ptr_null(s);
    }
    o.endpoints = "http://127.0.0.1:1";
    o.password = "secret"; /* without a username */
    s = SENTINEL(cache_store_t);
    ASSERT_RC(cache_etcd_new(&s, &o), COALESCE_EINVAL);
    ck_assert_ptr_null(s);
    o.password = NULL;
    const size_t sizes[] = {0, sizeof(o) - 1, sizeof(o) / 2};
    for (size_t i = 0; i < 3; i++) {
        o.size = sizes[i];
        s = SENTINEL(cache_store_t);
        ASSERT_RC(cache_etcd_new(&s, &o), COALESCE_EINVAL);
        ck_assert_ptr_null(s);
    }
    o.size = sizeof(o);

    /* Valid ones contact no server: a dead address is fine. */
    static const char *const good[] = {
        "http://127.0.0.1:1",
        "https://127.0.0.1:1",
        "http://127.0.0.1:1/, http://127.0.0.1:2",
    };
    for (size_t i = 0; i < 3; i++) {
        o.endpoints = good[i];
        s = NULL;
        ASSERT_OK(cache_etcd_new(&s, &o));
        ck_assert_ptr_nonnull(s);
        cache_store_free(s);
    }
    o.endpoints = "http://127.0.0.1:1";
    o.username = "u";
    o.password = "p";
    o.ca_file = "/nonexistent/ca.pem";
    s = NULL;
    ASSERT_OK(cache_etcd_new(&s, &o));
    cache_store_free(s);

    /* The etcd-only calls refuse another kind of store. */
    cache_store_t *m = NULL;
    ASSERT_OK(cache_memstore_new(&m, NULL));
    int64_t r = 0;
    ASSERT_RC(cache_etcd_revision(m, &r), COALESCE_EINVAL);
    ASSERT_RC(cache_etcd_compact(m, 5), COALESCE_EINVAL);
    ASSERT_RC(cache_etcd_lease_ttl(m, 5, &r), COALESCE_EINVAL);
    ASSERT_RC(cache_etcd_lease_keepalive(m, 5, &r), COALESCE_EINVAL);
    ASSERT_RC(cache_etcd_revision(NULL, &r), COALESCE_EINVAL);
    cache_store_free(m);
    ck_assert_int_eq(test_alloc_live(), base);
}
END_TEST

START_TEST(test_range_paging)
{
    cache_store_t *s = shared_store();
    char pfx[64], end[80];
    mkpfx(pfx, sizeof(pfx), "page");
    size_t pl = strlen(pfx), el = prefix_end(pfx, pl, end);

    /* Seven keys in one transaction: one revision R. */
    char keys[7][96], vals[7][16];
    cache_op_t ops[7];
    for (int i = 0; i < 7; i++) {
        snprintf(keys[i], sizeof(keys[i]), "%s%c", pfx, 'a' + i);
        snprintf(vals[i], sizeof(vals[i]), "v%d", i);
        ops[i] = (cache_op_t){.type = CACHE_OP_PUT,
                              .key = keys[i],
                              .keylen = strlen(keys[i]),
                              .value = vals[i],
                              .vallen = strlen(vals[i])};
    }
    int ok = 0;
    int64_t R = 0;
    ASSERT_OK(s->ops->txn(s, NULL, 0, ops, 7, &ok, &R, NULL));
    ck_assert_int_eq(ok, 1);
    /* Later changes, which a read pinned at R must not see. */
    int64_t Rins = s_put(s, key_of(pfx, "c2"), "new");
    int64_t Rupd = s_put(s, keys[4], "changed");
    int64_t Rdel = s_del(s, keys[1]);
    ck_assert_int_gt(Rdel, Rupd);
    ck_assert_int_gt(Rupd, Rins);
    ck_assert_int_gt(Rins, R);

    /* Pages of 3 at R: a b c | d e f | g. */
    kvlist_t all = {0};
    char from[128];
    size_t fromlen = pl;
    memcpy(from, pfx, pl);
    int64_t hdrs[5];
    int mores[5], sizes[5], pages = 0;
    for (;;) {
        ck_assert_int_lt(pages, 5);
        kvlist_t pg = {0};
        int64_t h = -1;
        int more = -1;
        ASSERT_OK(s->ops->range(s, from, fromlen, end, el, R, 3, kvl_store_cb,
                                &pg, &h, &more));
        hdrs[pages] = h;
        mores[pages] = more;
        sizes[pages] = (int)pg.n;
        pages++;
        for (size_t i = 0; i < pg.n; i++)
            kvl_add(&all, pg.v[i].key, pg.v[i].keylen, pg.v[i].val,
                    pg.v[i].vallen, &pg.v[i].meta);
        if (pg.n) {
            memcpy(from, pg.v[pg.n - 1].key, pg.v[pg.n - 1].keylen);
            fromlen = pg.v[pg.n - 1].keylen;
            from[fromlen++] = 0; /* the next key after it */
        }
        kvl_free(&pg);
        if (!more)
            break;
    }
    ck_assert_int_eq(pages, 3);
    ck_assert_int_eq(sizes[0], 3);
    ck_assert_int_eq(sizes[1], 3);
    ck_assert_int_eq(sizes[2], 1);
    ck_assert_int_eq(mores[0], 1);
    ck_assert_int_eq(mores[1], 1);
    ck_assert_int_eq(mores[2], 0);
    ck_assert_uint_eq(all.n, 7);
    ck_assert_int_eq(all.disorder, 0);
    for (int i = 0; i < 7; i++) {
        ck_assert_str_eq(all.v[i].key, keys[i]);
        ck_assert_str_eq(all.v[i].val, vals[i]); /* e before its update */
        ck_assert_int_eq(all.v[i].meta.mod_rev, R);
        ck_assert_int_eq(all.v[i].meta.create_rev, R);
        ck_assert_int_eq(all.v[i].meta.version, 1);
        ck_assert_int_eq(all.v[i].meta.lease, 0);
    }
    kvl_free(&all);

    /* The latest revision: b gone, c2 there, e updated; header = now. */
    kvlist_t now;
    int64_t h = 0;
    ASSERT_OK(store_list_rc(s, pfx, 0, &now, &h));
    ck_assert_int_ge(h, Rdel); /* the current revision */
    ck_assert_uint_eq(now.n, 7);
    ck_assert_str_eq(now.v[1].key, key_of(pfx, "c"));
    ck_assert_str_eq(now.v[2].key, key_of(pfx, "c2"));
    ck_assert_int_eq(now.v[2].meta.mod_rev, Rins);
    ck_assert_str_eq(now.v[4].val, "changed");
    ck_assert_int_eq(now.v[4].meta.mod_rev, Rupd);
    ck_assert_int_eq(now.v[4].meta.create_rev, R);
    ck_assert_int_eq(now.v[4].meta.version, 2);
    kvl_free(&now);

    /* Latest, limit 2: more set, header the current revision. */
    kvlist_t lim = {0};
    int more = -1;
    ASSERT_OK(s->ops->range(s, pfx, pl, end, el, 0, 2, kvl_store_cb, &lim, &h,
                            &more));
    ck_assert_uint_eq(lim.n, 2);
    ck_assert_int_eq(more, 1);
    ck_assert_int_ge(h, Rdel); /* the current revision */
    kvl_free(&lim);

    /* One key (empty end); an absent key; a callback that stops. */
    sget_t g = s_get(s, key_of(pfx, "c2"));
    ck_assert_int_eq(g.n, 1);
    ck_assert_str_eq(g.val, "new");
    g = s_get(s, keys[1]);
    ck_assert_int_eq(g.n, 0);
    kvlist_t one = {0};
    ASSERT_OK(s->ops->range(s, keys[5], strlen(keys[5]), "", 1, 0, 2,
                            kvl_store_cb, &one, &h, &more));
    /* End "\0": no upper bound; f and g are the first two keys from f. */
    ck_assert_uint_eq(one.n, 2);
    ck_assert_str_eq(one.v[0].key, keys[5]);
    ck_assert_str_eq(one.v[1].key, keys[6]);
    kvl_free(&one);

    /* Pinned pages report the revision they read (store.h: "*header_rev
     * to the revision read"), as the in-memory store does. */
    ck_assert_msg(hdrs[0] == R && hdrs[1] == R && hdrs[2] == R,
                  "pinned range at %" PRId64 ": header revisions %" PRId64
                  ", %" PRId64 ", %" PRId64 " (etcd's current is %" PRId64 ")",
                  R, hdrs[0], hdrs[1], hdrs[2], Rdel);
    cache_store_free(s);
}
END_TEST

typedef struct cmpcase {
    int target, result;
    int64_t number;
    const char *value;
    int on; /* 0: key k (v2, version 2), 1: key l (leased), 2: absent */
    int want;
} cmpcase_t;

START_TEST(test_txn_compares)
{
    cache_store_t *s = shared_store();
    char pfx[64];
    mkpfx(pfx, sizeof(pfx), "txn");
    char k[96], l[96], absent[96], out[96];
    snprintf(k, sizeof(k), "%sk", pfx);
    snprintf(l, sizeof(l), "%sl", pfx);
    snprintf(absent, sizeof(absent), "%sabsent", pfx);
    snprintf(out, sizeof(out), "%sout", pfx);
    int64_t r1 = s_put(s, k, "v1");
    int64_t r2 = s_put(s, k, "v2");
    int64_t L = 0;
    ASSERT_OK(s->ops->lease_grant(s, 60000, &L));
    ck_assert_int_gt(L, 0);
    ASSERT_OK(s_put_rc(s, l, "x", L, NULL));

    const cmpcase_t cs[] = {
        {CACHE_CMP_VERSION, CACHE_CMP_EQUAL, 2, NULL, 0, 1},
        {CACHE_CMP_VERSION, CACHE_CMP_EQUAL, 1, NULL, 0, 0},
        {CACHE_CMP_VERSION, CACHE_CMP_GREATER, 1, NULL, 0, 1},
        {CACHE_CMP_VERSION, CACHE_CMP_GREATER, 2, NULL, 0, 0},
        {CACHE_CMP_VERSION, CACHE_CMP_LESS, 3, NULL, 0, 1},
        {CACHE_CMP_VERSION, CACHE_CMP_LESS, 2, NULL, 0, 0},
        {CACHE_CMP_VERSION, CACHE_CMP_NOT_EQUAL, 1, NULL, 0, 1},
        {CACHE_CMP_VERSION, CACHE_CMP_NOT_EQUAL, 2, NULL, 0, 0},
        {CACHE_CMP_CREATE, CACHE_CMP_EQUAL, r1, NULL, 0, 1},
        {CACHE_CMP_CREATE, CACHE_CMP_EQUAL, r2, NULL, 0, 0},
        {CACHE_CMP_CREATE, CACHE_CMP_GREATER, r1 - 1, NULL, 0, 1},
        {CACHE_CMP_CREATE, CACHE_CMP_GREATER, r1, NULL, 0, 0},
        {CACHE_CMP_CREATE, CACHE_CMP_LESS, r1 + 1, NULL, 0, 1},
        {CACHE_CMP_CREATE, CACHE_CMP_LESS, r1, NULL, 0, 0},
        {CACHE_CMP_CREATE, CACHE_CMP_NOT_EQUAL, r2, NULL, 0, 1},
        {CACHE_CMP_CREATE, CACHE_CMP_NOT_EQUAL, r1, NULL, 0, 0},
        {CACHE_CMP_MOD, CACHE_CMP_EQUAL, r2, NULL, 0, 1},
        {CACHE_CMP_MOD, CACHE_CMP_EQUAL, r1, NULL, 0, 0},
        {CACHE_CMP_MOD, CACHE_CMP_GREATER, r1, NULL, 0, 1},
        {CACHE_CMP_MOD, CACHE_CMP_GREATER, r2, NULL, 0, 0},
        {CACHE_CMP_MOD, CACHE_CMP_LESS, r2 + 1, NULL, 0, 1},
        {CACHE_CMP_MOD, CACHE_CMP_LESS, r2, NULL, 0, 0},
        {CACHE_CMP_MOD, CACHE_CMP_NOT_EQUAL, r1, NULL, 0, 1},
        {CACHE_CMP_MOD, CACHE_CMP_NOT_EQUAL, r2, NULL, 0, 0},
        {CACHE_CMP_VALUE, CACHE_CMP_EQUAL, 0, "v2", 0, 1},
        {CACHE_CMP_VALUE, CACHE_CMP_EQUAL, 0, "v1", 0, 0},
        {CACHE_CMP_VALUE, CACHE_CMP_GREATER, 0, "v1", 0, 1},
        {CACHE_CMP_VALUE, CACHE_CMP_GREATER, 0, "v3", 0, 0},
        {CACHE_CMP_VALUE, CACHE_CMP_LESS, 0, "v3", 0, 1},
        {CACHE_CMP_VALUE, CACHE_CMP_LESS, 0, "v1", 0, 0},
        {CACHE_CMP_VALUE, CACHE_CMP_NOT_EQUAL, 0, "v1", 0, 1},
        {CACHE_CMP_VALUE, CACHE_CMP_NOT_EQUAL, 0, "v2", 0, 0},
        {CACHE_CMP_LEASE, CACHE_CMP_EQUAL, L, NULL, 1, 1},
        {CACHE_CMP_LEASE, CACHE_CMP_EQUAL, 0, NULL, 1, 0},
        {CACHE_CMP_LEASE, CACHE_CMP_GREATER, 0, NULL, 1, 1},
        {CACHE_CMP_LEASE, CACHE_CMP_GREATER, L, NULL, 1, 0},
        {CACHE_CMP_LEASE, CACHE_CMP_LESS, L + 1, NULL, 1, 1},
        {CACHE_CMP_LEASE, CACHE_CMP_LESS, L, NULL, 1, 0},
        {CACHE_CMP_LEASE, CACHE_CMP_NOT_EQUAL, 0, NULL, 1, 1},
        {CACHE_CMP_LEASE, CACHE_CMP_NOT_EQUAL, L, NULL, 1, 0},
        {CACHE_CMP_LEASE, CACHE_CMP_EQUAL, 0, NULL, 0, 1}, /* no lease */
        /* A missing key has every number 0. */
        {CACHE_CMP_VERSION, CACHE_CMP_EQUAL, 0, NULL, 2, 1},
        {CACHE_CMP_CREATE, CACHE_CMP_EQUAL, 0, NULL, 2, 1},
        {CACHE_CMP_MOD, CACHE_CMP_EQUAL, 0, NULL, 2, 1},
        {CACHE_CMP_VERSION, CACHE_CMP_GREATER, 0, NULL, 2, 0},
    };
    const char *const on[] = {k, l, absent};
    char last_ok[32] = "";
    int64_t last_mod = 0;
    for (size_t i = 0; i < sizeof(cs) / sizeof(cs[0]); i++) {
        const cmpcase_t *c = &cs[i];
        cache_cmp_t cmp = {.key = on[c->on],
                           .keylen = strlen(on[c->on]),
                           .target = c->target,
                           .result = c->result,
                           .number = c->number,
                           .value = c->value,
                           .vallen = c->value ? strlen(c->value) : 0};
        char val[32];
        snprintf(val, sizeof(val), "case%zu", i);
        cache_op_t op = {.type = CACHE_OP_PUT,
                         .key = out,
                         .keylen = strlen(out),
                         .value = val,
                         .vallen = strlen(val)};
        int ok = -1;
        int64_t rev = -1;
        cache_op_result_t res;
        memset(&res, 0x55, sizeof(res));
        /* Revisions are bounded by reads before and after, not counted:
         * leases left by other suites may expire on the shared etcd. */
        int64_t cur = s_rev(s);
        ASSERT_OK(s->ops->txn(s, &cmp, 1, &op, 1, &ok, &rev, &res));
        int64_t now = s_rev(s);
        ck_assert_msg(ok == c->want,
                      "case %zu (target %d result %d number %" PRId64
                      " value %s): succeeded %d, want %d",
                      i, c->target, c->result, c->number,
                      c->value ? c->value : "-", ok, c->want);
        if (ok) {
            ck_assert_int_gt(rev, cur);
            ck_assert_int_le(rev, now);
            ck_assert_int_eq(res.has_prev, last_ok[0] != 0);
            last_mod = rev;
            snprintf(last_ok, sizeof(last_ok), "%s", val);
        } else {
            ck_assert_msg(rev >= cur && rev <= now,
                          "case %zu: failed txn rev %" PRId64
                          ", want the current one (%" PRId64 "..%" PRId64 ")",
                          i, rev, cur, now);
        }
        sget_t g = s_get(s, out);
        ck_assert_str_eq(g.val, last_ok);
        ck_assert_int_eq(g.kv.mod_rev, last_mod); /* nothing else wrote */
    }

    /* What each operation did. */
    char p1[96], n1[96], d1[96], gone[96], dr[96], drend[96];
    snprintf(p1, sizeof(p1), "%sp1", pfx);
    snprintf(n1, sizeof(n1), "%sn1", pfx);
    snprintf(d1, sizeof(d1), "%sd1", pfx);
    snprintf(gone, sizeof(gone), "%sgone", pfx);
    snprintf(dr, sizeof(dr), "%sdr/", pfx);
    size_t drel = prefix_end(dr, strlen(dr), drend);
    drend[drel] = 0;
    int64_t rp1 = s_put(s, p1, "a");
    s_put(s, p1, "b");
    s_put(s, d1, "x");
    for (int i = 0; i < 3; i++)
        s_put(s, key_of(dr, "%d", i), "y");
    int64_t before = s_rev(s);
    cache_cmp_t guard = {.key = p1,
                         .keylen = strlen(p1),
                         .target = CACHE_CMP_VERSION,
                         .result = CACHE_CMP_EQUAL,
                         .number = 2};
    cache_op_t ops[5] = {
        {.type = CACHE_OP_PUT,
         .key = p1,
         .keylen = strlen(p1),
         .value = "c",
         .vallen = 1},
        {.type = CACHE_OP_PUT,
         .key = n1,
         .keylen = strlen(n1),
         .value = "",
         .vallen = 0},
        {.type = CACHE_OP_DELETE, .key = d1, .keylen = strlen(d1)},
        {.type = CACHE_OP_DELETE, .key = gone, .keylen = strlen(gone)},
        {.type = CACHE_OP_DELETE,
         .key = dr,
         .keylen = strlen(dr),
         .end = drend,
         .endlen = drel},
    };
    cache_op_result_t res[5];
    memset(res, 0x55, sizeof(res));
    int ok = 0;
    int64_t rev = 0;
    ASSERT_OK(s->ops->txn(s, &guard, 1, ops, 5, &ok, &rev, res));
    ck_assert_int_eq(ok, 1);
    ck_assert_int_gt(rev, before);
    ck_assert_int_eq(res[0].has_prev, 1);
    ck_assert_int_eq(res[0].prev_version, 2);
    ck_assert_int_eq(res[0].prev_create_rev, rp1);
    ck_assert_int_eq(res[1].has_prev, 0);
    ck_assert_int_eq(res[1].prev_version, 0);
    ck_assert_int_eq(res[1].prev_create_rev, 0);
    ck_assert_int_eq(res[2].deleted, 1);
    ck_assert_int_eq(res[3].deleted, 0);
    ck_assert_int_eq(res[4].deleted, 3);
    sget_t g = s_get(s, p1);
    ck_assert_str_eq(g.val, "c");
    ck_assert_int_eq(g.kv.version, 3);
    ck_assert_int_eq(g.kv.create_rev, rp1);
    ck_assert_int_eq(g.kv.mod_rev, rev);
    g = s_get(s, n1);
    ck_assert_int_eq(g.n, 1);
    ck_assert_uint_eq(g.vallen, 0); /* an empty value (omitted on the wire) */
    ck_assert_int_eq(g.kv.version, 1);
    ck_assert_int_eq(s_get(s, d1).n, 0);
    kvlist_t left;
    store_list(s, dr, &left);
    ck_assert_uint_eq(left.n, 0);
    kvl_free(&left);

    /* The same guard fails now (version 3): nothing changes, the current
     * revision comes back; results may be NULL. */
    int64_t done = rev;
    ok = -1;
    ASSERT_OK(s->ops->txn(s, &guard, 1, ops, 2, &ok, &rev, NULL));
    ck_assert_int_eq(ok, 0);
    ck_assert_int_ge(rev, done);
    ck_assert_int_le(rev, s_rev(s));
    ck_assert_str_eq(s_get(s, p1).val, "c");
    ck_assert_int_eq(s_get(s, p1).kv.mod_rev, done);
    /* No operation at all: compares only. */
    guard.number = 3;
    ASSERT_OK(s->ops->txn(s, &guard, 1, NULL, 0, &ok, &rev, NULL));
    ck_assert_int_eq(ok, 1);
    ASSERT_OK(s->ops->lease_revoke(s, L));
    cache_store_free(s);
}
END_TEST

START_TEST(test_error_mapping)
{
    cache_store_t *s = shared_store();
    char pfx[64];
    mkpfx(pfx, sizeof(pfx), "err");
    const char *k = key_of(pfx, "k");
    int ok = -1;
    int64_t rev = 0;

    /* InvalidArgument: a key twice in one txn; a put inside a delete. */
    cache_op_t dup[2] = {
        {.type = CACHE_OP_PUT,
         .key = k,
         .keylen = strlen(k),
         .value = "1",
         .vallen = 1},
        {.type = CACHE_OP_PUT,
         .key = k,
         .keylen = strlen(k),
         .value = "2",
         .vallen = 1},
    };
    ASSERT_RC(s->ops->txn(s, NULL, 0, dup, 2, &ok, &rev, NULL),
              COALESCE_EINVAL);
    ASSERT_LAST_ERROR_HAS("duplicate key");
    char end[80];
    size_t el = prefix_end(pfx, strlen(pfx), end);
    dup[1] = (cache_op_t){.type = CACHE_OP_DELETE,
                          .key = pfx,
                          .keylen = strlen(pfx),
                          .end = end,
                          .endlen = el};
    ASSERT_RC(s->ops->txn(s, NULL, 0, dup, 2, &ok, &rev, NULL),
              COALESCE_EINVAL);
    ck_assert_int_eq(s_get(s, k).n, 0);

    /* OutOfRange: compacted and future revisions. */
    int64_t r1 = s_put(s, k, "1");
    int64_t r2 = s_put(s, k, "2");
    int64_t r3 = s_put(s, k, "3");
    ASSERT_OK(cache_etcd_compact(s, r2));
    kvlist_t l = {0};
    int64_t h;
    int more;
    ASSERT_RC(s->ops->range(s, k, strlen(k), NULL, 0, r1, 0, kvl_store_cb, &l,
                            &h, &more),
              COALESCE_ECOMPACTED);
    ASSERT_LAST_ERROR_HAS("compacted");
    ck_assert_uint_eq(l.n, 0); /* no callback on failure */
    sget_t g;
    memset(&g, 0, sizeof(g));
    ASSERT_OK(
        s->ops->range(s, k, strlen(k), NULL, 0, r2, 0, sget_cb, &g, &h, &more));
    ck_assert_str_eq(g.val, "2"); /* the compact revision itself is kept */
    ASSERT_RC(s->ops->range(s, k, strlen(k), NULL, 0, r3 + 1000, 0, sget_cb, &g,
                            &h, &more),
              COALESCE_ECOMPACTED);
    ASSERT_LAST_ERROR_HAS("future");
    ASSERT_RC(cache_etcd_compact(s, r2), COALESCE_ECOMPACTED);
    ASSERT_LAST_ERROR_HAS("compacted");
    ASSERT_RC(cache_etcd_compact(s, r1), COALESCE_ECOMPACTED);
    ASSERT_RC(cache_etcd_compact(s, r3 + 1000), COALESCE_ECOMPACTED);
    ASSERT_LAST_ERROR_HAS("future");

    /* NotFound: unknown leases. */
    const int64_t nolease = 0x0badc0ffee0ddf00LL;
    ASSERT_RC(s->ops->lease_revoke(s, nolease), COALESCE_ENOENT);
    ASSERT_LAST_ERROR_HAS("lease not found");
    int64_t ttl = 77;
    ASSERT_RC(cache_etcd_lease_ttl(s, nolease, &ttl), COALESCE_ENOENT);
    ASSERT_RC(cache_etcd_lease_keepalive(s, nolease, &ttl), COALESCE_ENOENT);
    ASSERT_RC(s_put_rc(s, k, "4", nolease, NULL), COALESCE_ENOENT);
    ASSERT_LAST_ERROR_HAS("lease not found");
    ck_assert_str_eq(s_get(s, k).val, "3");

    /* Requests refused before etcd is asked. */
    ASSERT_RC(s->ops->lease_grant(s, 0, &ttl), COALESCE_EINVAL);
    ASSERT_RC(s->ops->lease_grant(s, -5, &ttl), COALESCE_EINVAL);
    ASSERT_RC(cache_etcd_compact(s, 0), COALESCE_EINVAL);
    cache_op_t many[CACHE_TXN_MAX_OPS + 1];
    for (int i = 0; i <= CACHE_TXN_MAX_OPS; i++)
        many[i] =
            (cache_op_t){.type = CACHE_OP_DELETE,
                         .key = key_of(pfx, "m%d", i),
                         .keylen = strlen(pfx) + 2 + (i >= 10) + (i >= 100)};
    ASSERT_RC(
        s->ops->txn(s, NULL, 0, many, CACHE_TXN_MAX_OPS + 1, &ok, &rev, NULL),
        COALESCE_EINVAL);
    cache_store_free(s);
}
END_TEST

START_TEST(test_watch_events)
{
    cache_store_t *s = shared_store();
    char pfx[64], outside[96];
    mkpfx(pfx, sizeof(pfx), "watch");
    snprintf(outside, sizeof(outside), "%.*sX", (int)strlen(pfx) - 1, pfx);
    const char *a = key_of(pfx, "a"), *b = key_of(pfx, "b");
    wrec_t w;
    wrec_init(&w);
    cache_watch_t *cw = NULL;
    ASSERT_OK(watch_pfx(s, pfx, s_rev(s) + 1, &w, &cw));
    int64_t ra = s_put(s, a, "1");
    int64_t rb = s_put(s, b, "2");
    int64_t rd = s_del(s, a);
    s_put(s, outside, "not watched");
    int64_t rb2 = s_put(s, b, "3");
    bool got = wrec_wait(&w, &w.nev, 4, 5000);
    /* Progress notifications (every 100 ms on the shared etcd) come on. */
    long p0 = wrec_get(&w, &w.progress);
    bool prog = wrec_wait(&w, &w.progress, p0 + 2, 5000);
    watch_stop(s, cw, &w);
    ck_assert_msg(got, "4 events, got %ld", w.nev);
    ck_assert_msg(prog, "no progress notifications (%ld)", w.progress);
    ck_assert_msg(!w.bad, "%s", w.why);
    ck_assert_int_eq(w.nev, 4); /* each once; none for the outside key */
    ASSERT_EV(&w, 0, CACHE_EV_PUT, a, "1", ra);
    ck_assert_int_eq(w.ev[0].create, ra);
    ck_assert_int_eq(w.ev[0].version, 1);
    ASSERT_EV(&w, 1, CACHE_EV_PUT, b, "2", rb);
    ASSERT_EV(&w, 2, CACHE_EV_DELETE, a, "", rd);
    ASSERT_EV(&w, 3, CACHE_EV_PUT, b, "3", rb2);
    ck_assert_int_eq(w.ev[3].create, rb);
    ck_assert_int_eq(w.ev[3].version, 2);
    ck_assert_int_ge(w.last_progress, rb2);
    ck_assert_int_eq(w.cancels, 0);
    ck_assert_int_eq(w.late, 0);
    wrec_destroy(&w);

    /* A catch-up batch: events from a past revision, in one response
     * stamped with the current revision. */
    const char *x = key_of(pfx, "x"), *y = key_of(pfx, "y");
    s_put(s, y, "0");
    int64_t c1 = s_put(s, x, "1");
    int64_t c2 = s_put(s, x, "2");
    int64_t c3 = s_del(s, y);
    int64_t c4 = s_put(s, outside, "later");
    wrec_init(&w);
    ASSERT_OK(watch_pfx(s, pfx, c1, &w, &cw));
    got = wrec_wait(&w, &w.nev, 3, 5000);
    int64_t c5 = s_put(s, x, "3");
    bool got2 = wrec_wait(&w, &w.nev, 4, 5000);
    watch_stop(s, cw, &w);
    ck_assert_msg(got && got2, "catch-up: %ld events", w.nev);
    ck_assert_msg(!w.bad, "%s", w.why);
    ck_assert_int_eq(w.nev, 4);
    ASSERT_EV(&w, 0, CACHE_EV_PUT, x, "1", c1);
    ck_assert_int_eq(w.ev[0].version, 1);
    ASSERT_EV(&w, 1, CACHE_EV_PUT, x, "2", c2);
    ck_assert_int_eq(w.ev[1].version, 2);
    ASSERT_EV(&w, 2, CACHE_EV_DELETE, y, "", c3);
    ASSERT_EV(&w, 3, CACHE_EV_PUT, x, "3", c5);
    ck_assert_msg(w.catchup, "no catch-up response stamped past its events");
    ck_assert_int_ge(w.ev[2].resp_rev, c4);
    wrec_destroy(&w);

    /* A compacted start revision: one canceling response, ERANGE, with
     * the compact revision; exactly at the compact revision: accepted. */
    int64_t k1 = s_put(s, x, "4");
    s_put(s, x, "5");
    int64_t k3 = s_put(s, x, "6");
    ASSERT_OK(cache_etcd_compact(s, k3));
    wrec_init(&w);
    int rc = watch_pfx(s, pfx, k1, &w, &cw);
    ck_assert_msg(rc == 0,
                  "watch at a compacted revision: %s (want a "
                  "canceling response)",
                  coalesce_err_name(rc));
    got = wrec_wait(&w, &w.cancels, 1, 5000);
    watch_stop(s, cw, &w);
    ck_assert_msg(got, "no canceling response");
    ck_assert_int_eq(w.error, COALESCE_ECOMPACTED);
    ck_assert_int_eq(w.compact, k3);
    ck_assert_int_eq(w.nev, 0);
    ck_assert_int_eq(w.resps, 1);
    ck_assert_int_eq(w.late, 0);
    wrec_destroy(&w);
    wrec_init(&w);
    ASSERT_OK(watch_pfx(s, pfx, k3, &w, &cw));
    got = wrec_wait(&w, &w.nev, 1, 5000);
    watch_stop(s, cw, &w);
    ck_assert(got);
    ASSERT_EV(&w, 0, CACHE_EV_PUT, x, "6", k3);
    ck_assert_int_eq(w.cancels, 0);
    wrec_destroy(&w);
    cache_store_free(s);
}
END_TEST

START_TEST(test_leases)
{
    cache_store_t *s = shared_store();
    char pfx[64];
    mkpfx(pfx, sizeof(pfx), "lease");
    const char *k = key_of(pfx, "k"), *ke = key_of(pfx, "short");
    int64_t id = 0, shortid = 0, ttl = 0;
    ASSERT_OK(s->ops->lease_grant(s, 1000, &shortid));
    ASSERT_OK(s_put_rc(s, ke, "brief", shortid, NULL));
    ASSERT_OK(s->ops->lease_grant(s, 4000, &id));
    ck_assert_int_ne(id, 0);
    ck_assert_int_ne(id, shortid);
    ASSERT_OK(cache_etcd_lease_ttl(s, id, &ttl));
    ck_assert_int_gt(ttl, 0);
    ck_assert_int_le(ttl, 4000);
    int64_t r = 0;
    ASSERT_OK(s_put_rc(s, k, "leased", id, &r));
    sget_t g = s_get(s, k);
    ck_assert_int_eq(g.kv.lease, id);
    ck_assert_int_eq(s_get(s, ke).kv.lease, shortid);

    /* Time is the subject: wait (bounded) until the long lease has run
     * down to 2 s and the short one expired, taking its key. */
    double deadline = now_ms() + ms_scaled(8000);
    int64_t left = ttl;
    int short_gone = 0;
    while (now_ms() < deadline) {
        ASSERT_OK(cache_etcd_lease_ttl(s, id, &left));
        short_gone = s_get(s, ke).n == 0;
        if (left <= 2000 && short_gone)
            break;
        nap_ms(100);
    }
    ck_assert_msg(left <= 2000, "lease ttl still %" PRId64 " ms", left);
    ck_assert_msg(short_gone, "a key on an expired lease is still there");
    ASSERT_RC(cache_etcd_lease_ttl(s, shortid, &ttl), COALESCE_ENOENT);
    ASSERT_RC(cache_etcd_lease_keepalive(s, shortid, &ttl), COALESCE_ENOENT);

    /* A keepalive renews it to its granted TTL. */
    int64_t after = 0;
    ASSERT_OK(cache_etcd_lease_keepalive(s, id, &after));
    ck_assert_msg(after >= 3000 && after <= 4000,
                  "ttl after keepalive %" PRId64 " (was %" PRId64 ")", after,
                  left);
    ASSERT_OK(cache_etcd_lease_keepalive(s, id, NULL));
    ck_assert_str_eq(s_get(s, k).val, "leased");

    /* Revoke deletes its keys; then the lease is gone. */
    ASSERT_OK(s->ops->lease_revoke(s, id));
    ck_assert_int_eq(s_get(s, k).n, 0);
    ASSERT_RC(cache_etcd_lease_ttl(s, id, &ttl), COALESCE_ENOENT);
    ASSERT_RC(cache_etcd_lease_keepalive(s, id, &ttl), COALESCE_ENOENT);
    ASSERT_RC(s->ops->lease_revoke(s, id), COALESCE_ENOENT);
    cache_store_free(s);
}
END_TEST

/*
 * A listening socket whose accept queue is full: the kernel drops further
 * SYNs, so a connect to it hangs until the client's connect timeout, as
 * for a host that is down.
 */
typedef struct blackhole {
    int lfd;
    int fill[16];
    int nfill;
    int port;
} blackhole_t;

static int bh_connect_nb(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    fcntl(fd, F_SETFL, O_NONBLOCK);
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0 &&
        errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    return fd;
}

/* 1 if a connect to port completes within ms. */
static int bh_connects(int port, int ms)
{
    int fd = bh_connect_nb(port);
    if (fd < 0)
        return 1;
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    int r = poll(&p, 1, ms);
    int err = 0;
    socklen_t len = sizeof(err);
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    close(fd);
    return r > 0 && err == 0;
}

static void bh_open(blackhole_t *b)
{
    memset(b, 0, sizeof(*b));
    b->lfd = socket(AF_INET, SOCK_STREAM, 0);
    ck_assert_int_ge(b->lfd, 0);
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    ck_assert_int_eq(bind(b->lfd, (struct sockaddr *)&a, sizeof(a)), 0);
    ck_assert_int_eq(listen(b->lfd, 0), 0);
    ck_assert_int_eq(getsockname(b->lfd, (struct sockaddr *)&a, &len), 0);
    b->port = ntohs(a.sin_port);
    while (b->nfill < 16) {
        int fd = bh_connect_nb(b->port);
        ck_assert_int_ge(fd, 0);
        b->fill[b->nfill++] = fd;
        if (b->nfill >= 2 && !bh_connects(b->port, 200))
            return;
    }
    ck_abort_msg("could not fill the accept queue of a listening socket");
}

static void bh_close(blackhole_t *b)
{
    for (int i = 0; i < b->nfill; i++)
        close(b->fill[i]);
    close(b->lfd);
}

START_TEST(test_endpoints)
{
    char pfx[64], eps[700];
    mkpfx(pfx, sizeof(pfx), "eps");
    const char *k = key_of(pfx, "k");

    /* The first endpoint refuses connections: everything still works. */
    snprintf(eps, sizeof(eps), "http://127.0.0.1:1,%s", shared_eps());
    cache_store_t *s = store_at(eps);
    int64_t r1 = s_put(s, k, "1");
    ck_assert_str_eq(s_get(s, k).val, "1");
    wrec_t w;
    wrec_init(&w);
    cache_watch_t *cw = NULL;
    ASSERT_OK(watch_pfx(s, pfx, r1, &w, &cw));
    int64_t r2 = s_put(s, k, "2");
    bool got = wrec_wait(&w, &w.nev, 2, 5000);
    watch_stop(s, cw, &w);
    ck_assert(got);
    ck_assert_int_eq(w.nev, 2);
    ASSERT_EV(&w, 0, CACHE_EV_PUT, k, "1", r1);
    ASSERT_EV(&w, 1, CACHE_EV_PUT, k, "2", r2);
    wrec_destroy(&w);
    int64_t id = 0;
    ASSERT_OK(s->ops->lease_grant(s, 5000, &id));
    ASSERT_OK(cache_etcd_lease_keepalive(s, id, NULL));
    ASSERT_OK(s->ops->lease_revoke(s, id));
    cache_t *c = cache_over(s, pfx, NULL);
    ASSERT_OK(cache_start(c));
    ASSERT_CACHED(c, k, "2");
    int64_t r3 = 0;
    ASSERT_OK(cache_put(c, k, strlen(k), "3", 1, NULL, &r3));
    ASSERT_CACHED(c, k, "3");                            /* the write-through */
    ASSERT_OK(cache_wait_fresh(c, r3, ms_scaled(5000))); /* its echo */
    cache_free(c);
    cache_store_free(s);

    /* Every endpoint refuses: COALESCE_EIO at once. */
    cache_etcd_opts_t o = eopts("http://127.0.0.1:1,http://127.0.0.1:2");
    o.connect_timeout_ms = 300;
    s = store_with(&o);
    double t0 = now_ms();
    sget_t g;
    ASSERT_RC(s_get_rc(s, k, &g), COALESCE_EIO);
    ck_assert_str_ne(cache_etcd_last_error(), "");
    ASSERT_RC(s_put_rc(s, k, "x", 0, NULL), COALESCE_EIO);
    int64_t rev = 0;
    ASSERT_RC(cache_etcd_revision(s, &rev), COALESCE_EIO);
    ASSERT_RC(s->ops->lease_grant(s, 5000, &id), COALESCE_EIO);
    wrec_init(&w);
    cw = NULL;
    ASSERT_RC(watch_pfx(s, pfx, 0, &w, &cw), COALESCE_EIO);
    ck_assert_int_eq(w.resps, 0);
    wrec_destroy(&w);
    double dt = now_ms() - t0;
    ck_assert_msg(dt < ms_scaled(3000), "refused endpoints took %.0f ms", dt);
    cache_store_free(s);

    /* Endpoints that drop SYNs: each costs the connect timeout, no more. */
    blackhole_t b1, b2;
    bh_open(&b1);
    bh_open(&b2);
    snprintf(eps, sizeof(eps), "http://127.0.0.1:%d,http://127.0.0.1:%d",
             b1.port, b2.port);
    o = eopts(eps);
    o.connect_timeout_ms = 300;
    s = store_with(&o);
    t0 = now_ms();
    int rr = s_get_rc(s, k, &g);
    double dr = now_ms() - t0;
    t0 = now_ms();
    int rp = s_put_rc(s, k, "x", 0, NULL);
    double dp = now_ms() - t0;
    t0 = now_ms();
    wrec_init(&w);
    cw = NULL;
    int rwa = watch_pfx(s, pfx, 0, &w, &cw);
    if (rwa == 0)
        watch_stop(s, cw, &w);
    wrec_destroy(&w);
    double dwa = now_ms() - t0;
    cache_store_free(s);
    /* A silent first endpoint, then the live one: a write goes through
     * (it cannot have reached the first one). */
    snprintf(eps, sizeof(eps), "http://127.0.0.1:%d,%s", b1.port, shared_eps());
    o = eopts(eps);
    o.connect_timeout_ms = 300;
    s = store_with(&o);
    t0 = now_ms();
    int64_t r4 = 0;
    int rw = s_put_rc(s, k, "4", 0, &r4);
    double dw = now_ms() - t0;
    cache_store_free(s);
    bh_close(&b1);
    bh_close(&b2);
    note("etcd endpoints: silent x2 (connect timeout 300 ms): range %s in "
         "%.0f ms, txn %s in %.0f ms, watch %s in %.0f ms; silent then live: "
         "txn %s in %.0f ms\n",
         coalesce_err_name(rr), dr, coalesce_err_name(rp), dp,
         coalesce_err_name(rwa), dwa, coalesce_err_name(rw), dw);
    /* Nothing was sent anywhere: unreachable (EIO), not an unknown
     * outcome (ETIMEDOUT), within about one connect timeout each. */
    ck_assert_msg(dr < ms_scaled(2000), "range took %.0f ms", dr);
    ck_assert_msg(dp < ms_scaled(2000), "txn took %.0f ms", dp);
    ck_assert_msg(dwa < ms_scaled(2000), "watch took %.0f ms", dwa);
    ck_assert_msg(
        rr == COALESCE_EIO && rp == COALESCE_EIO && rwa == COALESCE_EIO,
        "silent endpoints (connect timeouts): range %s, txn %s, "
        "watch %s; want COALESCE_EIO (unreachable: nothing was sent)",
        coalesce_err_name(rr), coalesce_err_name(rp), coalesce_err_name(rwa));
    ck_assert_msg(rw == 0,
                  "txn with a silent first endpoint (connect timeout) and a "
                  "live second one: %s, want 0 (etcd.h: a request that cannot "
                  "connect is tried on the next endpoint)",
                  coalesce_err_name(rw));
    ck_assert_int_gt(r4, r3);
}
END_TEST

/* X13 with a real server: start fails while etcd is unreachable, a later
 * start works without a stop. */
START_TEST(test_start_unreachable_then_ok)
{
    char pfx[64], eps[64];
    mkpfx(pfx, sizeof(pfx), "x13");
    const long base = test_alloc_live();
    tcp_proxy_t *p = proxy_up(port_of(shared_eps()));
    tcp_proxy_block(p, 1);
    snprintf(eps, sizeof(eps), "http://127.0.0.1:%d", tcp_proxy_port(p));
    cache_store_t *x = shared_store();
    cache_store_t *s = store_at(eps);
    s_put(x, key_of(pfx, "a"), "1");
    replog_t log;
    replog_init(&log);
    cache_t *c = cache_over(s, pfx, &log);
    double t0 = now_ms();
    ASSERT_RC(cache_start(c), COALESCE_EIO);
    ck_assert_msg(now_ms() - t0 < ms_scaled(3000), "start took %.0f ms",
                  now_ms() - t0);
    char v[32];
    ASSERT_RC(cget(c, key_of(pfx, "a"), v, sizeof(v), NULL),
              COALESCE_ENOTSTARTED);
    ck_assert_int_eq(health_of(c).state, CACHE_STOPPED);
    ASSERT_RC(cache_start(c), COALESCE_EIO);
    tcp_proxy_block(p, 0);
    ASSERT_OK(cache_start(c));
    ck_assert_int_eq(health_of(c).state, CACHE_RUNNING);
    ASSERT_CACHED(c, key_of(pfx, "a"), "1");
    const char *b = key_of(pfx, "b");
    ASSERT_OK(cache_put(c, b, strlen(b), "2", 1, NULL, NULL));
    s_put(x, key_of(pfx, "c"), "3");
    assert_cache_is_etcd(c, x, pfx, 5000, "after a second start");
    ck_assert_int_ge(tcp_proxy_accepted(p), 3);
    cache_free(c);
    replog_destroy(&log);
    cache_store_free(s);
    cache_store_free(x);
    proxy_down(p);
    ck_assert_int_eq(test_alloc_live(), base);
}
END_TEST

/* A silent network (the proxy stalls every byte): a request ends with
 * COALESCE_ETIMEDOUT after request_timeout_ms; a watch that hears
 * nothing, not even progress notifications, for watch_idle_ms ends with
 * COALESCE_EIO. */
START_TEST(test_stalled_network)
{
    char pfx[64], eps[64];
    mkpfx(pfx, sizeof(pfx), "stall");
    tcp_proxy_t *p = proxy_up(port_of(shared_eps()));
    snprintf(eps, sizeof(eps), "http://127.0.0.1:%d", tcp_proxy_port(p));
    cache_etcd_opts_t o = eopts(eps);
    o.request_timeout_ms = 500;
    o.watch_idle_ms = 600; /* progress comes every 100 ms */
    cache_store_t *s = store_with(&o);
    const char *k = key_of(pfx, "k");
    int64_t r = s_put(s, k, "1");
    wrec_t w;
    wrec_init(&w);
    cache_watch_t *cw = NULL;
    ASSERT_OK(watch_pfx(s, pfx, r, &w, &cw));
    bool flowing = wrec_wait(&w, &w.progress, 3, 5000);
    tcp_proxy_stall(p, 1);
    double t0 = now_ms();
    bool ended = wrec_wait(&w, &w.cancels, 1, 5000);
    double dwatch = now_ms() - t0;
    t0 = now_ms();
    sget_t g;
    int rr = s_get_rc(s, k, &g);
    double dr = now_ms() - t0;
    t0 = now_ms();
    int rw = s_put_rc(s, k, "2", 0, NULL);
    double dw = now_ms() - t0;
    tcp_proxy_stall(p, 0);
    watch_stop(s, cw, &w);
    cache_store_free(s);
    proxy_down(p);
    note("etcd stalled network: watch ended after %.0f ms (%s), range %s in "
         "%.0f ms, txn %s in %.0f ms\n",
         dwatch, coalesce_err_name(w.error), coalesce_err_name(rr), dr,
         coalesce_err_name(rw), dw);
    ck_assert(flowing);
    ck_assert_int_eq(w.nev, 1);
    ck_assert_msg(ended, "the idle watch did not end");
    ck_assert_int_eq(w.cancels, 1);
    ck_assert_int_eq(w.error, COALESCE_EIO);
    ck_assert_msg(dwatch < ms_scaled(2500), "idle watch ended after %.0f ms",
                  dwatch);
    ck_assert_int_eq(rr, COALESCE_ETIMEDOUT);
    ck_assert_msg(dr < ms_scaled(2000), "range took %.0f ms", dr);
    ck_assert_int_eq(rw, COALESCE_ETIMEDOUT);
    ck_assert_msg(dw < ms_scaled(2000), "txn took %.0f ms", dw);
    wrec_destroy(&w);
}
END_TEST

/* ==========================================================================
 * 2. Faults: memory ends equal to etcd, nothing lost or resurrected
 * ========================================================================== */

START_TEST(test_kill_restart)
{
    const long base = test_alloc_live();
    etcd_env_opts_t eo = {.members = 1};
    etcd_env_t *env = env_up(&eo);
    char pfx[64];
    mkpfx(pfx, sizeof(pfx), "kill");
    cache_etcd_opts_t o = eopts(env->endpoints);
    o.connect_timeout_ms = 300;
    o.request_timeout_ms = 3000;
    cache_store_t *s = store_with(&o);
    cache_store_t *x = store_with(&o);
    for (int i = 0; i < 10; i++)
        s_put(x, key_of(pfx, "k%02d", i), "before");
    replog_t log;
    replog_init(&log);
    cache_t *c = cache_over(s, pfx, &log);
    ASSERT_OK(cache_start(c));
    assert_cache_is_etcd(c, x, pfx, 5000, "before the kill");
    int64_t w0 = health_of(c).watch_rev;

    ck_assert_int_eq(etcd_env_kill(env, 0), 0);
    bool disc = replog_wait(&log, CACHE_REPORT_DISCONNECTED, 1, 10000);
    /* etcd is down: writes fail (EIO), reads serve memory. */
    const char *k0 = key_of(pfx, "k00");
    int rc_down = cache_put(c, k0, strlen(k0), "lost", 4, NULL, NULL);
    char v[32];
    int rc_read = cget(c, k0, v, sizeof(v), NULL);
    bool failed = replog_wait(&log, CACHE_REPORT_FAILED, 1, 5000);
    int state_down = health_of(c).state;
    int rs = etcd_env_restart(env, 0);
    ck_assert_msg(disc, "no DISCONNECTED report after the kill");
    ck_assert_msg(rc_down == COALESCE_EIO || rc_down == COALESCE_ETIMEDOUT,
                  "write while etcd is down: %s", coalesce_err_name(rc_down));
    ASSERT_OK(rc_read);
    ck_assert_str_eq(v, "before");
    ck_assert_msg(failed, "no FAILED report for resumes while etcd is down");
    ck_assert_int_eq(state_down, CACHE_RECONNECTING);
    ck_assert_int_eq(rs, 0);

    /* After the restart an external writer changes things. */
    for (int i = 0; i < 5; i++)
        s_put(x, key_of(pfx, "k%02d", i), "after");
    for (int i = 5; i < 8; i++)
        s_del(x, key_of(pfx, "k%02d", i));
    for (int i = 10; i < 14; i++)
        s_put(x, key_of(pfx, "k%02d", i), "new");
    assert_cache_is_etcd(c, x, pfx, 15000, "after the restart");
    cache_health_t h = health_of(c);
    ck_assert_uint_gt(h.reconnects, 0);
    ck_assert_int_eq(h.state, CACHE_RUNNING);
    ck_assert_int_gt(h.watch_rev, w0);
    ck_assert_uint_eq(h.entries, 11);
    ASSERT_CACHED(c, k0, "after");
    ASSERT_RC(cget(c, key_of(pfx, "k06"), v, sizeof(v), NULL), COALESCE_ENOENT);
    /* The cache writes again. */
    int64_t r = 0;
    ASSERT_OK(cache_put(c, k0, strlen(k0), "again", 5, NULL, &r));
    ck_assert_str_eq(s_get(x, k0).val, "again");
    cache_free(c);
    replog_destroy(&log);
    cache_store_free(s);
    cache_store_free(x);
    env_down(env);
    ck_assert_int_eq(test_alloc_live(), base);
}
END_TEST

START_TEST(test_compaction_while_cut)
{
    const long base = test_alloc_live();
    char pfx[64], eps[64];
    mkpfx(pfx, sizeof(pfx), "cut");
    tcp_proxy_t *p = proxy_up(port_of(shared_eps()));
    snprintf(eps, sizeof(eps), "http://127.0.0.1:%d", tcp_proxy_port(p));
    cache_store_t *s = store_at(eps);
    cache_store_t *x = shared_store();
    for (int i = 0; i < 20; i++)
        s_put(x, key_of(pfx, "k%02d", i), "v0");
    replog_t log;
    replog_init(&log);
    cache_t *c = cache_over(s, pfx, &log);
    ASSERT_OK(cache_start(c));
    assert_cache_is_etcd(c, x, pfx, 5000, "before the cut");

    tcp_proxy_block(p, 1);
    tcp_proxy_cut(p);
    ck_assert(replog_wait(&log, CACHE_REPORT_DISCONNECTED, 1, 5000));
    /* While cut: updates, deletes, new keys, then a compaction. */
    for (int i = 0; i < 5; i++)
        s_put(x, key_of(pfx, "k%02d", i), "v1");
    for (int i = 5; i < 10; i++)
        s_del(x, key_of(pfx, "k%02d", i));
    for (int i = 20; i < 25; i++)
        s_put(x, key_of(pfx, "k%02d", i), "v1");
    ASSERT_OK(cache_etcd_compact(x, s_rev(x)));
    ck_assert_uint_eq(health_of(c).relists, 0);
    tcp_proxy_block(p, 0);

    bool relisted = replog_wait(&log, CACHE_REPORT_RELISTED, 1, 10000);
    ck_assert_msg(relisted, "no RELISTED report after the compaction");
    assert_cache_is_etcd(c, x, pfx, 10000, "after the relist");
    cache_health_t h = health_of(c);
    ck_assert_uint_ge(h.relists, 1);
    ck_assert_uint_eq(h.entries, 20);
    char v[32];
    for (int i = 5; i < 10; i++)
        ASSERT_RC(cget(c, key_of(pfx, "k%02d", i), v, sizeof(v), NULL),
                  COALESCE_ENOENT);
    ASSERT_CACHED(c, key_of(pfx, "k03"), "v1");
    ASSERT_CACHED(c, key_of(pfx, "k22"), "v1");
    /* And it follows new writes. */
    s_put(x, key_of(pfx, "k05"), "back");
    assert_cache_is_etcd(c, x, pfx, 5000, "after the relist, new writes");
    cache_free(c);
    replog_destroy(&log);
    cache_store_free(s);
    cache_store_free(x);
    proxy_down(p);
    ck_assert_int_eq(test_alloc_live(), base);
}
END_TEST

/* --- 2c. A 3-member cluster losing its leader under two writers ---------- */

#define CW_KEYS 12
#define CW_NMAX 3000

typedef struct cmodel {
    int present;
    char val[48];
    int64_t rev;
} cmodel_t;

/* How many operations each writer may start (the test's phases), and
 * the end. */
typedef struct cgate {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    long budget[2];
    int done;
} cgate_t;

static void cgate_budget(cgate_t *g, long b0, long b1)
{
    pthread_mutex_lock(&g->mu);
    g->budget[0] = b0;
    g->budget[1] = b1;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

static void cgate_end(cgate_t *g)
{
    pthread_mutex_lock(&g->mu);
    g->done = 1;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

/* Waits until writer id may start operation n; true once done. */
static bool cgate_pass(cgate_t *g, int id, long n)
{
    pthread_mutex_lock(&g->mu);
    while (n >= g->budget[id] && !g->done)
        pthread_cond_wait(&g->cv, &g->mu);
    bool done = g->done;
    pthread_mutex_unlock(&g->mu);
    return done;
}

typedef struct cworker {
    int id;
    cache_t *c;
    cache_store_t *s;
    const char *pfx;
    cmodel_t k[CW_KEYS];
    counter_t acked;
    cgate_t *gate;
    double deadline;
    long attempts, unknown, resolved;
    int last_rc;
    char last_err[160];
    int fail;
    char msg[300];
    pthread_t th;
} cworker_t;

static void cw_fail(cworker_t *w, const char *what, long n, int rc)
{
    if (!w->fail++)
        snprintf(w->msg, sizeof(w->msg), "worker %d op %ld: %s: %s (%s)", w->id,
                 n, what, coalesce_err_name(rc), cache_etcd_last_error());
}

static bool unknown_outcome(int rc)
{
    return rc == COALESCE_EIO || rc == COALESCE_ETIMEDOUT;
}

static void *cw_main(void *p)
{
    cworker_t *w = p;
    for (long n = 0; n < CW_NMAX && !w->fail && !cgate_pass(w->gate, w->id, n);
         n++) {
        int i = (int)(n % CW_KEYS);
        char key[160];
        snprintf(key, sizeof(key), "%sw%d-k%02d", w->pfx, w->id, i);
        size_t kl = strlen(key);
        cmodel_t *m = &w->k[i];
        int kind = !m->present ? 0 : (n / CW_KEYS) % 3 == 2 ? 2 : 1;
        char val[48];
        snprintf(val, sizeof(val), "w%d-n%ld", w->id, n);
        bool unknown = false;
        for (int att = 0;; att++) {
            if (now_ms() > w->deadline || att > 1000) {
                cw_fail(w, "no answer before the deadline", n, 0);
                break;
            }
            w->attempts++;
            int64_t rev = 0, deleted = 0;
            int rc;
            if (kind == 0)
                rc = cache_put(w->c, key, kl, val, strlen(val), NULL, &rev);
            else if (kind == 1)
                rc = cache_update(w->c, key, kl, val, strlen(val), m->rev, NULL,
                                  &rev);
            else
                rc = cache_delete(w->c, key, kl, &deleted, &rev);
            if (rc == 0) {
                m->present = kind != 2;
                snprintf(m->val, sizeof(m->val), "%s", val);
                m->rev = rev;
                break;
            }
            w->last_rc = rc;
            snprintf(w->last_err, sizeof(w->last_err), "%s",
                     cache_etcd_last_error());
            if (unknown_outcome(rc)) {
                /* It may or may not have committed: retry. */
                w->unknown += !unknown;
                unknown = true;
                nap_ms(20); /* backoff, not synchronisation */
                continue;
            }
            if (rc == COALESCE_ECONFLICT && kind == 1 && unknown) {
                /* Did the attempt with the unknown outcome commit? */
                sget_t g;
                int r2 = s_get_rc(w->s, key, &g);
                if (unknown_outcome(r2)) {
                    nap_ms(20);
                    continue;
                }
                if (r2 == 0 && g.n == 1 && strcmp(g.val, val) == 0) {
                    m->present = 1;
                    snprintf(m->val, sizeof(m->val), "%s", val);
                    m->rev = g.kv.mod_rev;
                    w->resolved++;
                    break;
                }
                cw_fail(w, "update conflict not explained by a retry", n, rc);
                break;
            }
            cw_fail(w,
                    kind == 0   ? "put"
                    : kind == 1 ? "update"
                                : "delete",
                    n, rc);
            break;
        }
        counter_add(&w->acked, 1);
    }
    return NULL;
}

/* Waits until each worker acknowledged at least its mark + more. */
static bool cw_wait_more(cworker_t *w, const long *mark, long more, int ms)
{
    for (int i = 0; i < 2; i++)
        if (!cnt_wait(&w[i].acked, mark[i] + more, ms))
            return false;
    return true;
}

START_TEST(test_cluster_leader_kill)
{
    const long base = test_alloc_live();
    etcd_env_opts_t eo = {.members = 3};
    etcd_env_t *env = env_up(&eo);
    char pfx[64], eps1[600], eps2[600];
    mkpfx(pfx, sizeof(pfx), "cluster");
    snprintf(eps1, sizeof(eps1), "%s,%s,%s", env->m[0].client_url,
             env->m[1].client_url, env->m[2].client_url);
    snprintf(eps2, sizeof(eps2), "%s,%s,%s", env->m[2].client_url,
             env->m[0].client_url, env->m[1].client_url);
    cache_etcd_opts_t o1 = eopts(eps1), o2 = eopts(eps2), ox = eopts(eps1);
    o1.connect_timeout_ms = o2.connect_timeout_ms = 300;
    o1.request_timeout_ms = o2.request_timeout_ms = 3000;
    cache_store_t *s1 = store_with(&o1), *s2 = store_with(&o2);
    cache_store_t *x = store_with(&ox);
    replog_t log1, log2;
    replog_init(&log1);
    replog_init(&log2);
    cache_t *c1 = cache_over(s1, pfx, &log1), *c2 = cache_over(s2, pfx, &log2);
    ASSERT_OK(cache_start(c1));
    ASSERT_OK(cache_start(c2));

    cgate_t gate = {.budget = {30, 30}, .done = 0};
    pthread_mutex_init(&gate.mu, NULL);
    pthread_cond_init(&gate.cv, NULL);
    cworker_t w[2];
    memset(w, 0, sizeof(w));
    for (int i = 0; i < 2; i++) {
        w[i].id = i;
        w[i].c = i ? c2 : c1;
        w[i].s = i ? s2 : s1;
        w[i].pfx = pfx;
        w[i].gate = &gate;
        w[i].deadline = now_ms() + ms_scaled(40000);
        counter_init(&w[i].acked);
        ck_assert_int_eq(pthread_create(&w[i].th, NULL, cw_main, &w[i]), 0);
    }
    long zero[2] = {0, 0}, mark[2];
    bool warm = cw_wait_more(w, zero, 30, 10000);
    /* Writes in flight while the leader dies: room for 400 more each,
     * far more than fit in the time the kill takes. */
    cgate_budget(&gate, 430, 430);
    int leader = warm ? etcd_env_leader(env) : -1;
    int killed = leader >= 0 ? etcd_env_kill(env, leader) : -1;
    double t_kill = now_ms();
    mark[0] = cnt_get(&w[0].acked);
    mark[1] = cnt_get(&w[1].acked);
    /* Writes go on once a new leader is elected. */
    bool through = killed == 0 && cw_wait_more(w, mark, 25, 30000);
    double t_through = now_ms() - t_kill;
    /* The writers pause while the member restarts, then go on against
     * the whole cluster. */
    cgate_budget(&gate, 0, 0);
    int restarted = killed == 0 ? etcd_env_restart(env, leader) : -1;
    mark[0] = cnt_get(&w[0].acked);
    mark[1] = cnt_get(&w[1].acked);
    cgate_budget(&gate, mark[0] + 30, mark[1] + 30);
    bool after = restarted == 0 && cw_wait_more(w, mark, 30, 20000);
    cgate_end(&gate);
    for (int i = 0; i < 2; i++)
        pthread_join(w[i].th, NULL);
    pthread_cond_destroy(&gate.cv);
    pthread_mutex_destroy(&gate.mu);
    note("etcd cluster: leader m%d killed; 25 more writes each %.0f ms "
         "later; worker 0: %ld ops, %ld attempts, %ld unknown outcomes "
         "(%ld resolved by reading); worker 1: %ld ops, %ld attempts, %ld "
         "unknown (%ld resolved)\n",
         leader, t_through, cnt_get(&w[0].acked), w[0].attempts, w[0].unknown,
         w[0].resolved, cnt_get(&w[1].acked), w[1].attempts, w[1].unknown,
         w[1].resolved);
    for (int i = 0; i < 2; i++)
        if (!after || w[i].fail)
            note("etcd cluster: worker %d: last failure %s (%s)\n", i,
                 coalesce_err_name(w[i].last_rc), w[i].last_err);
    for (int i = 0; i < 2; i++)
        ck_assert_msg(!w[i].fail, "%s", w[i].msg);
    ck_assert_msg(warm, "the writers did not start");
    ck_assert_msg(leader >= 0 && killed == 0, "no leader to kill");
    ck_assert_msg(through, "writes did not resume after the leader died");
    ck_assert_int_eq(restarted, 0);
    ck_assert_msg(after, "writes stalled after the restart");

    /* Every acknowledged write is there, with its value and revision;
     * every deleted key is absent. */
    for (int i = 0; i < 2; i++) {
        for (int j = 0; j < CW_KEYS; j++) {
            const char *key = key_of(pfx, "w%d-k%02d", i, j);
            sget_t g = s_get(x, key);
            const cmodel_t *m = &w[i].k[j];
            if (m->present) {
                ck_assert_msg(g.n == 1, "%s: acknowledged put lost", key);
                ck_assert_str_eq(g.val, m->val);
                ck_assert_int_eq(g.kv.mod_rev, m->rev);
            } else {
                ck_assert_msg(g.n == 0, "%s: deleted key present (\"%s\")", key,
                              g.val);
            }
        }
    }
    assert_cache_is_etcd(c1, x, pfx, 20000, "cache 1");
    assert_cache_is_etcd(c2, x, pfx, 20000, "cache 2");
    cache_free(c1);
    cache_free(c2);
    for (int i = 0; i < 2; i++)
        counter_destroy(&w[i].acked);
    replog_destroy(&log1);
    replog_destroy(&log2);
    cache_store_free(s1);
    cache_store_free(s2);
    cache_store_free(x);
    env_down(env);
    ck_assert_int_eq(test_alloc_live(), base);
}
END_TEST

/* --- 2d. Two processes ---------------------------------------------------- */

#define XP_ROUNDS 50

typedef struct xmsg {
    int kind; /* XM_* */
    int i;
    int64_t rev;
    double t0;  /* when the writer started the write (CLOCK_MONOTONIC) */
    double lat; /* SEEN: the reader's latency */
    int ok;
} xmsg_t;

enum { XM_READY = 1, XM_WROTE, XM_SEEN, XM_FAIL };

static int xp_send(int fd, const xmsg_t *m)
{
    const char *p = (const char *)m;
    size_t left = sizeof(*m);
    while (left) {
        ssize_t k = write(fd, p, left);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return -1;
        p += k;
        left -= (size_t)k;
    }
    return 0;
}

/* 0, or -1 on EOF, error or ms without a message. */
static int xp_recv(int fd, xmsg_t *m, int ms)
{
    char *p = (char *)m;
    size_t left = sizeof(*m);
    double end = now_ms() + ms;
    while (left) {
        struct pollfd pf = {.fd = fd, .events = POLLIN};
        int wait = (int)(end - now_ms());
        if (wait <= 0 || poll(&pf, 1, wait) <= 0)
            return -1;
        ssize_t k = read(fd, p, left);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return -1;
        p += k;
        left -= (size_t)k;
    }
    return 0;
}

static const char *xp_key(const char *pfx, int i)
{
    return key_of(pfx, "k%02d", i);
}

/*
 * One side of the exchange: in round i, the parent (side 0) writes when i
 * is even, the child (side 1) when odd; the other waits for the revision
 * it is sent, reads the key from its cache, and answers with the latency.
 * Returns 0 or a description of what failed (no ck_assert: the child is
 * not a Check test). lat[] gets the latencies this side learned.
 */
static const char *
xp_run(int side, cache_t *c, const char *pfx, int rfd, int wfd, double *lat)
{
    static _Thread_local char err[200];
    for (int i = 0; i < XP_ROUNDS; i++) {
        const char *key = xp_key(pfx, i);
        char val[32];
        snprintf(val, sizeof(val), "from%d-%d", i % 2, i);
        xmsg_t m;
        memset(&m, 0, sizeof(m));
        if (i % 2 == side) {
            m.kind = XM_WROTE;
            m.i = i;
            m.t0 = now_ms();
            int rc =
                cache_put(c, key, strlen(key), val, strlen(val), NULL, &m.rev);
            if (rc) {
                snprintf(err, sizeof(err), "round %d: put: %s", i,
                         coalesce_err_name(rc));
                m.kind = XM_FAIL;
                xp_send(wfd, &m);
                return err;
            }
            if (xp_send(wfd, &m) || xp_recv(rfd, &m, ms_scaled(10000))) {
                snprintf(err, sizeof(err), "round %d: no answer", i);
                return err;
            }
            if (m.kind != XM_SEEN || m.i != i || !m.ok) {
                snprintf(err, sizeof(err),
                         "round %d: the other side did not see the write "
                         "(kind %d ok %d)",
                         i, m.kind, m.ok);
                return err;
            }
            lat[i] = m.lat;
        } else {
            if (xp_recv(rfd, &m, ms_scaled(10000)) || m.kind != XM_WROTE ||
                m.i != i) {
                snprintf(err, sizeof(err), "round %d: no write announced", i);
                return err;
            }
            int rc = cache_wait_fresh(c, m.rev, ms_scaled(5000));
            double t1 = now_ms();
            char got[32] = "";
            cache_meta_t meta = {0};
            int rg = rc ? rc : cget(c, key, got, sizeof(got), &meta);
            m.kind = XM_SEEN;
            m.lat = t1 - m.t0;
            m.ok = rc == 0 && rg == 0 && strcmp(got, val) == 0 &&
                   meta.mod_rev == m.rev;
            lat[i] = m.lat;
            if (xp_send(wfd, &m)) {
                snprintf(err, sizeof(err), "round %d: pipe", i);
                return err;
            }
            if (!m.ok) {
                snprintf(err, sizeof(err),
                         "round %d: wait_fresh %s, get %s \"%s\" mod %" PRId64
                         " (want rev %" PRId64 ")",
                         i, coalesce_err_name(rc), coalesce_err_name(rg), got,
                         meta.mod_rev, m.rev);
                return err;
            }
        }
    }
    return NULL;
}

static void xp_child(const char *pfx, int rfd, int wfd)
{
    alarm(60); /* never outlive a broken parent for long */
    cache_store_t *s = NULL;
    cache_etcd_opts_t o = eopts(test_etcd_endpoints());
    cache_t *c = NULL;
    xmsg_t m = {.kind = XM_READY};
    double lat[XP_ROUNDS];
    int status = 1;
    if (o.endpoints && cache_etcd_new(&s, &o) == 0 &&
        cache_new(&c, s, pfx, strlen(pfx), NULL) == 0 && cache_start(c) == 0 &&
        xp_send(wfd, &m) == 0) {
        const char *err = xp_run(1, c, pfx, rfd, wfd, lat);
        if (err)
            fprintf(stderr, "etcd two processes, child: %s\n", err);
        status = err ? 1 : 0;
    } else {
        m.kind = XM_FAIL;
        xp_send(wfd, &m);
    }
    cache_free(c);
    cache_store_free(s);
    close(wfd);
    close(rfd);
    _exit(status);
}

static int dbl_cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

START_TEST(test_two_processes)
{
    char pfx[64];
    mkpfx(pfx, sizeof(pfx), "xproc");
    shared_eps();
    int p2c[2], c2p[2];
    ck_assert_int_eq(pipe(p2c), 0);
    ck_assert_int_eq(pipe(c2p), 0);
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        close(p2c[1]);
        close(c2p[0]);
        xp_child(pfx, p2c[0], c2p[1]);
    }
    close(p2c[0]);
    close(c2p[1]);
    cache_store_t *s = shared_store();
    cache_t *c = cache_over(s, pfx, NULL);
    int rc = cache_start(c);
    xmsg_t m = {0};
    int ready = rc == 0 ? xp_recv(c2p[0], &m, ms_scaled(10000)) : -1;
    double lat[XP_ROUNDS];
    memset(lat, 0, sizeof(lat));
    const char *err = NULL;
    if (ready == 0 && m.kind == XM_READY)
        err = xp_run(0, c, pfx, c2p[0], p2c[1], lat);
    else
        err = "the child did not get ready";
    close(p2c[1]); /* the child sees EOF if it still waits */
    /* The child exits by itself (bounded: alarm); wait for its EOF, and
     * kill it if it does not come. */
    struct pollfd pf = {.fd = c2p[0], .events = POLLIN};
    char drain[64];
    double end = now_ms() + ms_scaled(10000);
    bool eof = false;
    while (!eof && now_ms() < end) {
        if (poll(&pf, 1, (int)(end - now_ms())) <= 0)
            break;
        ssize_t k = read(c2p[0], drain, sizeof(drain));
        eof = k == 0 || (k < 0 && errno != EINTR);
    }
    if (!eof)
        kill(pid, SIGKILL);
    int st = 0;
    pid_t wp;
    while ((wp = waitpid(pid, &st, 0)) < 0 && errno == EINTR) {
    }
    close(c2p[0]);
    if (!err) {
        double sorted[XP_ROUNDS];
        memcpy(sorted, lat, sizeof(lat));
        qsort(sorted, XP_ROUNDS, sizeof(double), dbl_cmp);
        note("etcd two processes: propagation latency (write start -> "
             "visible in the other process's cache) over %d writes: p50 "
             "%.2f ms, p90 %.2f ms, max %.2f ms\n",
             XP_ROUNDS, sorted[XP_ROUNDS / 2], sorted[XP_ROUNDS * 9 / 10],
             sorted[XP_ROUNDS - 1]);
        /* Each cache holds all 50 keys, as etcd does. */
        assert_cache_is_etcd(c, s, pfx, 5000, "parent");
        ck_assert_uint_eq(health_of(c).entries, XP_ROUNDS);
    }
    cache_free(c);
    cache_store_free(s);
    ASSERT_OK(rc);
    ck_assert_msg(err == NULL, "parent: %s", err);
    ck_assert_int_eq(wp, pid);
    ck_assert_msg(eof, "the child did not exit");
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0,
                  "child status %d (see stderr)", st);
}
END_TEST

/* ==========================================================================
 * 3. Bad input from a fake etcd
 * ========================================================================== */

enum { P_END = 0, P_CHUNK, P_RAW, P_ABORT, P_FIN, P_ENDCHUNKED, P_HOLD };

typedef struct piece {
    int kind;
    char s[1024];
} piece_t;

#define MAXPIECES 12

typedef struct fscript {
    pthread_mutex_t mu;
    int range_status;
    char range_body[2048];
    int range_abort; /* reset the connection instead of replying */
    int txn_status;
    char txn_body[1024];
    int txn_abort;
    /* /v3/watch: a plain reply (status != 0), else the pieces. */
    int watch_status;
    char watch_body[512];
    piece_t watch[MAXPIECES];
    char last_watch_req[1024];
} fscript_t;

static void fs_init(fscript_t *f)
{
    memset(f, 0, sizeof(*f));
    pthread_mutex_init(&f->mu, NULL);
}

static void fs_destroy(fscript_t *f)
{
    pthread_mutex_destroy(&f->mu);
}

static void fs_range(fscript_t *f, int status, const char *body)
{
    pthread_mutex_lock(&f->mu);
    f->range_status = status;
    snprintf(f->range_body, sizeof(f->range_body), "%s", body);
    pthread_mutex_unlock(&f->mu);
}

static void fs_txn(fscript_t *f, int status, const char *body)
{
    pthread_mutex_lock(&f->mu);
    f->txn_status = status;
    snprintf(f->txn_body, sizeof(f->txn_body), "%s", body);
    pthread_mutex_unlock(&f->mu);
}

/* Append a piece (kind, optional text). */
static void fs_piece(fscript_t *f, int kind, const char *s)
{
    int i = 0;
    while (i < MAXPIECES && f->watch[i].kind != P_END)
        i++;
    ck_assert_int_lt(i, MAXPIECES - 1);
    f->watch[i].kind = kind;
    snprintf(f->watch[i].s, sizeof(f->watch[i].s), "%s", s ? s : "");
}

static int fs_play(fake_http_t *srv, int fd, const piece_t *p)
{
    if (fake_http_start_chunked(fd, 200))
        return 1;
    for (; p->kind != P_END; p++) {
        switch (p->kind) {
        case P_CHUNK:
            if (fake_http_chunk(fd, p->s, strlen(p->s)))
                return 1;
            break;
        case P_RAW:
            if (fake_http_send(fd, p->s, strlen(p->s)))
                return 1;
            break;
        case P_ABORT:
            fake_http_abort(fd);
            return 1;
        case P_FIN:
            return 1;
        case P_ENDCHUNKED:
            fake_http_end_chunked(fd);
            return 1;
        case P_HOLD:
            fake_http_hold(srv, fd, 15000);
            return 1;
        default:
            return 1;
        }
    }
    return 1;
}

static int fs_handler(void *data, fake_http_t *srv, const fake_req_t *req)
{
    fscript_t *f = data;
    int st, ab;
    char body[2048];
    bool range = !strncmp(req->path, "/v3/kv/range", 12);
    if (range || !strncmp(req->path, "/v3/kv/txn", 10) ||
        !strncmp(req->path, "/v3/kv/put", 10) ||
        !strncmp(req->path, "/v3/kv/deleterange", 18)) {
        pthread_mutex_lock(&f->mu);
        st = range ? f->range_status : f->txn_status;
        ab = range ? f->range_abort : f->txn_abort;
        snprintf(body, sizeof(body), "%s", range ? f->range_body : f->txn_body);
        pthread_mutex_unlock(&f->mu);
        if (ab) {
            fake_http_abort(req->fd);
            return 1;
        }
        fake_http_reply_json(req->fd, st, body);
        return 0;
    }
    if (!strncmp(req->path, "/v3/watch", 9)) {
        pthread_mutex_lock(&f->mu);
        snprintf(f->last_watch_req, sizeof(f->last_watch_req), "%s", req->body);
        st = f->watch_status;
        snprintf(body, sizeof(body), "%s", f->watch_body);
        pthread_mutex_unlock(&f->mu);
        if (st) {
            fake_http_reply_json(req->fd, st, body);
            return 0;
        }
        return fs_play(srv, req->fd, f->watch);
    }
    fake_http_reply_json(
        req->fd, 404, "{\"error\":\"nope\",\"message\":\"nope\",\"code\":12}");
    return 0;
}

/* Write requests the fake received (a put alone may use /v3/kv/put). */
static long fake_writes(fake_http_t *srv)
{
    return fake_http_requests(srv, "/v3/kv/txn") +
           fake_http_requests(srv, "/v3/kv/put") +
           fake_http_requests(srv, "/v3/kv/deleterange");
}

static cache_store_t *fake_store(fake_http_t *srv, int twice)
{
    char eps[128];
    int port = fake_http_port(srv);
    if (twice)
        snprintf(eps, sizeof(eps), "http://127.0.0.1:%d,http://127.0.0.1:%d",
                 port, port);
    else
        snprintf(eps, sizeof(eps), "http://127.0.0.1:%d", port);
    cache_etcd_opts_t o = eopts(eps);
    o.request_timeout_ms = 5000;
    return store_with(&o);
}

typedef struct errcase {
    int status;
    const char *body;
    int want;
    const char *msg; /* in cache_etcd_last_error(), or NULL */
} errcase_t;

START_TEST(test_fake_unary)
{
    fscript_t f;
    fs_init(&f);
    fake_http_t *srv = fake_up(fs_handler, &f);
    cache_store_t *s = fake_store(srv, 0);
    char k64[64], v64[64], body[1024];
    b64("/fake/k", k64);
    b64("val", v64);

    /* A good reply, so that the fake is known to speak etcd. */
    snprintf(body, sizeof(body),
             "{\"header\":{\"cluster_id\":\"1\",\"member_id\":\"2\","
             "\"revision\":\"7\",\"raft_term\":\"2\"},\"kvs\":[{\"key\":\"%s\","
             "\"create_revision\":\"3\",\"mod_revision\":\"6\",\"version\":"
             "\"2\",\"value\":\"%s\",\"lease\":\"0\"},{\"key\":\"%s\","
             "\"create_revision\":\"4\",\"mod_revision\":\"4\",\"version\":"
             "\"1\"}],\"more\":true,\"count\":\"3\"}",
             k64, v64, k64);
    fs_range(&f, 200, body);
    kvlist_t l = {0};
    int64_t h = 0;
    int more = 0;
    ASSERT_OK(s->ops->range(s, "/fake/", 6, "/fake0", 6, 0, 2, kvl_store_cb, &l,
                            &h, &more));
    ck_assert_uint_eq(l.n, 2);
    ck_assert_str_eq(l.v[0].key, "/fake/k");
    ck_assert_str_eq(l.v[0].val, "val");
    ck_assert_int_eq(l.v[0].meta.create_rev, 3);
    ck_assert_int_eq(l.v[0].meta.mod_rev, 6);
    ck_assert_int_eq(l.v[0].meta.version, 2);
    ck_assert_uint_eq(l.v[1].vallen, 0); /* value omitted: empty */
    ck_assert_int_eq(h, 7);
    ck_assert_int_eq(more, 1);
    kvl_free(&l);

    /* Undecodable replies: COALESCE_EDECODE, and no callback. */
    char badkv[1024];
    const char *const decode[] = {
        "{\"header\":{\"revision\":\"7\"},\"kvs\":[",
        "[1,2,3]",
        "",
        "{\"header\":{\"revision\":\"x7\"}}",
        "{\"header\":{\"revision\":\"7\"},\"kvs\":{}}",
        "{\"header\":{\"revision\":\"7\"},\"more\":\"yes\"}",
        NULL, /* bad base64 key */
        NULL, /* unpadded value */
        NULL, /* no mod_revision */
        /* No header: no revision to report. */
        "{\"kvs\":[]}",
        /* Non-canonical base64 ("QR==" has padding bits set; "QQ==" is
         * "A"): two spellings must not decode to one key. */
        "{\"header\":{\"revision\":\"7\"},\"kvs\":[{\"key\":\"QR==\","
        "\"mod_revision\":\"6\"}]}",
    };
    for (size_t i = 0; i < sizeof(decode) / sizeof(decode[0]); i++) {
        const char *b = decode[i];
        if (!b) {
            const char *key = i == 6 ? "L2Zh$2Uvaw==" : k64;
            const char *val = i == 7 ? "dmFsdQ" : v64;
            snprintf(
                badkv, sizeof(badkv),
                "{\"header\":{\"revision\":\"7\"},\"kvs\":[{\"key\":\"%s\","
                "\"create_revision\":\"3\",\"mod_revision\":\"6\","
                "\"version\":\"1\",\"value\":\"%s\"},{\"key\":\"%s\","
                "\"create_revision\":\"3\"%s,\"version\":\"1\"}]}",
                k64, v64, key, i == 8 ? "" : ",\"mod_revision\":\"6\"");
            if (i == 7)
                snprintf(badkv, sizeof(badkv),
                         "{\"header\":{\"revision\":\"7\"},\"kvs\":[{\"key\":"
                         "\"%s\",\"mod_revision\":\"6\",\"value\":\"%s\"}]}",
                         k64, val);
            b = badkv;
        }
        fs_range(&f, 200, b);
        memset(&l, 0, sizeof(l));
        int rc = s->ops->range(s, "/fake/", 6, "/fake0", 6, 0, 0, kvl_store_cb,
                               &l, &h, &more);
        ck_assert_msg(rc == COALESCE_EDECODE, "reply %zu \"%.60s\": %s", i, b,
                      coalesce_err_name(rc));
        ck_assert_msg(l.n == 0, "reply %zu: %zu callbacks before the error", i,
                      l.n);
        ck_assert_str_ne(cache_etcd_last_error(), "");
        kvl_free(&l);
    }

    /* Errors map by etcd's code, never by the HTTP status. */
    const errcase_t ec[] = {
        {500, "{\"error\":\"msg3\",\"message\":\"msg3\",\"code\":3}",
         COALESCE_EINVAL, "msg3"},
        {400, "{\"error\":\"msg11\",\"message\":\"msg11\",\"code\":11}",
         COALESCE_ECOMPACTED, "msg11"},
        {503, "{\"error\":\"msg14\",\"message\":\"msg14\",\"code\":14}",
         COALESCE_EIO, "msg14"},
        {400, "{\"error\":\"msg5\",\"message\":\"msg5\",\"code\":5}",
         COALESCE_ENOENT, "msg5"},
        {503, "{\"error\":\"m3\",\"message\":\"m3 on 503\",\"code\":3}",
         COALESCE_EINVAL, "m3 on 503"},
        {404, "{\"error\":\"m14\",\"message\":\"m14 on 404\",\"code\":14}",
         COALESCE_EIO, "m14 on 404"},
        {500, "{\"error\":\"msg7\",\"message\":\"msg7\",\"code\":7}",
         COALESCE_EACCES, "msg7"},
        {504, "{\"error\":\"msg4\",\"message\":\"msg4\",\"code\":4}",
         COALESCE_ETIMEDOUT, "msg4"},
        {412, "{\"error\":\"msg9\",\"message\":\"msg9\",\"code\":9}",
         COALESCE_EBACKEND, "msg9"},
        {500, "{\"error\":\"msg2\",\"message\":\"msg2\",\"code\":2}",
         COALESCE_EBACKEND, "msg2"},
        {502, "<html><body>502 Bad Gateway</body></html>", COALESCE_EBACKEND,
         NULL},
        {500, "", COALESCE_EBACKEND, NULL},
        {400, "{\"error\":\"no code\"}", COALESCE_EBACKEND, NULL},
    };
    /* Two kinds of write: a put alone (which the store may send to
     * /v3/kv/put) and a conditional transaction (/v3/kv/txn). */
    cache_op_t op = {.type = CACHE_OP_PUT,
                     .key = "/fake/k",
                     .keylen = 7,
                     .value = "v",
                     .vallen = 1};
    cache_cmp_t cmp = {.key = "/fake/k",
                       .keylen = 7,
                       .target = CACHE_CMP_VERSION,
                       .result = CACHE_CMP_EQUAL,
                       .number = 0};
    int ok = -1;
    int64_t rev = -1;
    for (size_t i = 0; i < sizeof(ec) / sizeof(ec[0]); i++) {
        fs_range(&f, ec[i].status, ec[i].body);
        fs_txn(&f, ec[i].status, ec[i].body);
        memset(&l, 0, sizeof(l));
        int rc = s->ops->range(s, "/fake/", 6, "/fake0", 6, 0, 0, kvl_store_cb,
                               &l, &h, &more);
        ck_assert_msg(rc == ec[i].want, "range, HTTP %d %s: %s, want %s",
                      ec[i].status, ec[i].body, coalesce_err_name(rc),
                      coalesce_err_name(ec[i].want));
        ck_assert_uint_eq(l.n, 0);
        if (ec[i].msg)
            ASSERT_LAST_ERROR_HAS(ec[i].msg);
        for (int form = 0; form < 2; form++) {
            rc = s->ops->txn(s, &cmp, (size_t)form, &op, 1, &ok, &rev, NULL);
            ck_assert_msg(rc == ec[i].want, "%s, HTTP %d %s: %s, want %s",
                          form ? "txn" : "put", ec[i].status, ec[i].body,
                          coalesce_err_name(rc), coalesce_err_name(ec[i].want));
            if (ec[i].msg)
                ASSERT_LAST_ERROR_HAS(ec[i].msg);
        }
    }
    /* Bad write replies. */
    const struct {
        size_t ncmps;
        const char *body;
        int want, ok;
    } wr[] = {
        {1, "{\"header\":{\"revision\":\"9\"},\"succeeded\":\"yes\"}",
         COALESCE_EDECODE, 0},
        /* Succeeded with one op, but no response for it. */
        {1, "{\"header\":{\"revision\":\"9\"},\"succeeded\":true}",
         COALESCE_EDECODE, 0},
        {1,
         "{\"header\":{\"revision\":\"9\"},\"succeeded\":true,"
         "\"responses\":{}}",
         COALESCE_EDECODE, 0},
        {1, "{\"header\":{\"revision\":\"9\"}}", 0, 0}, /* omitted: false */
        {1,
         "{\"header\":{\"revision\":\"9\"},\"succeeded\":true,"
         "\"responses\":[{\"response_put\":{\"header\":{\"revision\":"
         "\"9\"}}}]}",
         0, 1},
        {0, "{\"header\":{\"revision\":\"x9\"}}", COALESCE_EDECODE, 0},
        {0, "{\"header\":", COALESCE_EDECODE, 0},
        {0, "{\"header\":{\"revision\":\"9\"}}", 0, 1},
    };
    for (size_t i = 0; i < sizeof(wr) / sizeof(wr[0]); i++) {
        fs_txn(&f, 200, wr[i].body);
        ok = -1;
        rev = -1;
        int rc = s->ops->txn(s, &cmp, wr[i].ncmps, &op, 1, &ok, &rev, NULL);
        ck_assert_msg(rc == wr[i].want, "write reply %s: %s, want %s",
                      wr[i].body, coalesce_err_name(rc),
                      coalesce_err_name(wr[i].want));
        if (!rc) {
            ck_assert_int_eq(ok, wr[i].ok);
            ck_assert_int_eq(rev, 9);
        }
    }
    cache_store_free(s);

    /* Retries, with the same fake twice as two endpoints. Unavailable:
     * a read is tried on the next endpoint, a write never. */
    s = fake_store(srv, 1);
    const char *unavail =
        "{\"error\":\"no leader\",\"message\":\"no leader\",\"code\":14}";
    fs_range(&f, 503, unavail);
    fs_txn(&f, 503, unavail);
    long r0 = fake_http_requests(srv, "/v3/kv/range");
    ASSERT_RC(s->ops->range(s, "/fake/", 6, NULL, 0, 0, 0, kvl_store_cb, &l, &h,
                            &more),
              COALESCE_EIO);
    ck_assert_int_eq(fake_http_requests(srv, "/v3/kv/range") - r0, 2);
    for (int form = 0; form < 2; form++) {
        long t0 = fake_writes(srv);
        ASSERT_RC(s->ops->txn(s, &cmp, (size_t)form, &op, 1, &ok, &rev, NULL),
                  COALESCE_EIO);
        ck_assert_int_eq(fake_writes(srv) - t0, 1);
    }
    /* The connection reset after the request arrived, on a connection
     * that served a request before (libcurl resends a request that got
     * no byte back on a reused connection): the outcome of a write is
     * unknown, so it must be sent exactly once. */
    long sent[2];
    int wrc[2];
    for (int form = 0; form < 2; form++) {
        pthread_mutex_lock(&f.mu);
        f.txn_abort = f.range_abort = 0;
        pthread_mutex_unlock(&f.mu);
        fs_range(&f, 200, "{\"header\":{\"revision\":\"7\"}}");
        ASSERT_OK(s->ops->range(s, "/fake/", 6, NULL, 0, 0, 0, kvl_store_cb, &l,
                                &h, &more));
        pthread_mutex_lock(&f.mu);
        f.txn_abort = 1;
        pthread_mutex_unlock(&f.mu);
        long t0 = fake_writes(srv);
        wrc[form] = s->ops->txn(s, &cmp, (size_t)form, &op, 1, &ok, &rev, NULL);
        sent[form] = fake_writes(srv) - t0;
    }
    pthread_mutex_lock(&f.mu);
    f.range_abort = 1;
    pthread_mutex_unlock(&f.mu);
    r0 = fake_http_requests(srv, "/v3/kv/range");
    int rr = s->ops->range(s, "/fake/", 6, NULL, 0, 0, 0, kvl_store_cb, &l, &h,
                           &more);
    long r1 = fake_http_requests(srv, "/v3/kv/range");
    cache_store_free(s);
    fake_down(srv);
    fs_destroy(&f);
    ck_assert_msg(rr == COALESCE_EIO, "range, connection reset: %s",
                  coalesce_err_name(rr));
    ck_assert_int_ge(r1 - r0, 2); /* a read is retried */
    ck_assert_msg(wrc[0] == COALESCE_EIO && wrc[1] == COALESCE_EIO,
                  "put, txn on a reset connection: %s, %s",
                  coalesce_err_name(wrc[0]), coalesce_err_name(wrc[1]));
    ck_assert_msg(sent[0] == 1 && sent[1] == 1,
                  "a write whose connection was reset after it was sent "
                  "reached the server %ld times (put) and %ld times (txn) "
                  "(etcd.h: a write that may have reached the server is "
                  "never retried)",
                  sent[0], sent[1]);
}
END_TEST

/* Watch lines for the fake: /fake/a, /fake/b. */
static void line_created(char *out, size_t cap, int64_t rev)
{
    snprintf(out, cap,
             "{\"result\":{\"header\":{\"cluster_id\":\"1\",\"member_id\":"
             "\"2\",\"revision\":\"%" PRId64
             "\",\"raft_term\":\"2\"},\"created\":true}}\n",
             rev);
}

static void line_put(char *out,
                     size_t cap,
                     int64_t hdr,
                     const char *key,
                     const char *val,
                     int64_t create,
                     int64_t mod,
                     int64_t version)
{
    char k64[128], v64[128];
    b64(key, k64);
    b64(val, v64);
    snprintf(out, cap,
             "{\"result\":{\"header\":{\"revision\":\"%" PRId64
             "\"},\"events\":[{\"kv\":{\"key\":\"%s\",\"create_revision\":"
             "\"%" PRId64 "\",\"mod_revision\":\"%" PRId64
             "\",\"version\":\"%" PRId64 "\",\"value\":\"%s\"}}]}}\n",
             hdr, k64, create, mod, version, v64);
}

/* Plays f's pieces to a watch of /fake/ from 11: watch()'s code; if 0,
 * waits for a canceling response (or want_resps responses), then cancels
 * the watch. */
static int fake_watch(fscript_t *f, wrec_t *w, long want_resps, long *reqs)
{
    fake_http_t *srv = fake_up(fs_handler, f);
    cache_store_t *s = fake_store(srv, 0);
    cache_watch_t *cw = NULL;
    int rc = s->ops->watch(s, "/fake/", 6, "/fake0", 6, 11, wrec_cb, w, &cw);
    if (rc == 0) {
        if (want_resps > 0)
            wrec_wait(w, &w->resps, want_resps, 5000);
        else
            wrec_wait(w, &w->cancels, 1, 5000);
        watch_stop(s, cw, w);
    }
    cache_store_free(s);
    *reqs = fake_http_requests(srv, "/v3/watch");
    fake_down(srv);
    return rc;
}

START_TEST(test_fake_watch_stream)
{
    fscript_t f;
    fs_init(&f);
    char created[256], l1[1024], l2[512], l3[128], k64[64];
    line_created(created, sizeof(created), 10);
    char a64[64], b64s[64], v64[64];
    b64("/fake/a", a64);
    b64("/fake/b", b64s);
    b64("hello", v64);
    snprintf(
        l1, sizeof(l1),
        "{\"result\":{\"header\":{\"revision\":\"12\"},\"events\":[{\"kv\":"
        "{\"key\":\"%s\",\"create_revision\":\"11\",\"mod_revision\":"
        "\"11\",\"version\":\"1\",\"value\":\"%s\"}},{\"type\":\"DELETE\","
        "\"kv\":{\"key\":\"%s\",\"mod_revision\":\"12\"}}]}}\n",
        a64, v64, b64s);
    line_put(l2, sizeof(l2), 13, "/fake/a", "world", 11, 13, 2);
    snprintf(l3, sizeof(l3),
             "{\"result\":{\"header\":{\"revision\":\"14\"}}}\n");
    /* l1 split in the middle of the key's base64, in the middle of a
     * number, and before its newline; l2 and l3 in one chunk. */
    size_t cut1 = (size_t)(strstr(l1, a64) - l1) + 3;
    size_t cut2 = (size_t)(strstr(l1, "\"12\"}}]") - l1) + 2;
    size_t len1 = strlen(l1);
    char part[1024];
    fs_piece(&f, P_CHUNK, created);
    snprintf(part, sizeof(part), "%.*s", (int)cut1, l1);
    fs_piece(&f, P_CHUNK, part);
    snprintf(part, sizeof(part), "%.*s", (int)(cut2 - cut1), l1 + cut1);
    fs_piece(&f, P_CHUNK, part);
    snprintf(part, sizeof(part), "%.*s", (int)(len1 - 1 - cut2), l1 + cut2);
    fs_piece(&f, P_CHUNK, part);
    fs_piece(&f, P_CHUNK, "\n");
    snprintf(part, sizeof(part), "%s%s", l2, l3);
    fs_piece(&f, P_CHUNK, part);
    fs_piece(&f, P_HOLD, NULL);
    wrec_t w;
    wrec_init(&w);
    long reqs = 0;
    ASSERT_OK(fake_watch(&f, &w, 3, &reqs));
    ck_assert_msg(!w.bad, "%s", w.why);
    ck_assert_int_eq(w.resps, 3); /* each once */
    ck_assert_int_eq(w.ev_resps, 2);
    ck_assert_int_eq(w.progress, 1);
    ck_assert_int_eq(w.cancels, 0);
    ck_assert_int_eq(w.late, 0);
    ck_assert_int_eq(w.nev, 3);
    ASSERT_EV(&w, 0, CACHE_EV_PUT, "/fake/a", "hello", 11);
    ck_assert_int_eq(w.ev[0].create, 11);
    ck_assert_int_eq(w.ev[0].version, 1);
    ck_assert_int_eq(w.ev[0].resp_rev, 12);
    ASSERT_EV(&w, 1, CACHE_EV_DELETE, "/fake/b", "", 12);
    ASSERT_EV(&w, 2, CACHE_EV_PUT, "/fake/a", "world", 13);
    ck_assert_int_eq(w.ev[2].version, 2);
    ck_assert_int_eq(w.last_progress, 14);
    ck_assert_int_eq(reqs, 1);
    /* What was asked: the range, the start revision, progress notify. */
    b64("/fake/", k64);
    ck_assert_ptr_nonnull(strstr(f.last_watch_req, k64));
    b64("/fake0", k64);
    ck_assert_ptr_nonnull(strstr(f.last_watch_req, k64));
    ck_assert_ptr_nonnull(strstr(f.last_watch_req, "start_revision"));
    ck_assert_ptr_nonnull(strstr(f.last_watch_req, "11"));
    ck_assert_ptr_nonnull(strstr(f.last_watch_req, "progress_notify"));
    wrec_destroy(&w);
    fs_destroy(&f);
}
END_TEST

/* One scripted stream that ends the watch: code and events expected. */
typedef struct endcase {
    const char *name;
    int kind_after; /* piece after created + one good event */
    const char *text;
    int then; /* a piece after that (P_HOLD, P_ABORT...) or P_END */
    int want;
    int64_t want_compact;
} endcase_t;

START_TEST(test_fake_watch_endings)
{
    char bad64[700], good[512], later[512], rawcut[128];
    line_put(good, sizeof(good), 11, "/fake/a", "one", 11, 11, 1);
    line_put(later, sizeof(later), 13, "/fake/a", "three", 11, 13, 3);
    /* An event whose key is not base64. */
    snprintf(
        bad64, sizeof(bad64),
        "{\"result\":{\"header\":{\"revision\":\"12\"},\"events\":[{\"kv\":"
        "{\"key\":\"L2Zh*2Uv\",\"create_revision\":\"11\","
        "\"mod_revision\":\"12\",\"version\":\"2\",\"value\":\"dHdv\"}}]}}"
        "\n");
    /* A chunk announced as 0x80 bytes, cut after a few. */
    snprintf(rawcut, sizeof(rawcut), "80\r\n{\"result\":{\"header\":{\"rev");
    const endcase_t cs[] = {
        {"bad base64", P_CHUNK, bad64, P_HOLD, COALESCE_EDECODE, 0},
        {"not JSON", P_CHUNK, "this is not json\n", P_HOLD, COALESCE_EDECODE,
         0},
        {"neither result nor error", P_CHUNK, "{\"hello\":1}\n", P_HOLD,
         COALESCE_EDECODE, 0},
        {"error line", P_CHUNK,
         "{\"error\":{\"grpc_code\":14,\"http_code\":503,\"message\":"
         "\"transport is closing\",\"http_status\":\"Service "
         "Unavailable\"}}\n",
         P_HOLD, COALESCE_EIO, 0},
        {"compacted", P_CHUNK,
         "{\"result\":{\"header\":{\"cluster_id\":\"1\",\"member_id\":\"2\","
         "\"raft_term\":\"2\"},\"canceled\":true,\"compact_revision\":"
         "\"16\"}}\n",
         P_HOLD, COALESCE_ECOMPACTED, 16},
        {"canceled", P_CHUNK,
         "{\"result\":{\"header\":{\"revision\":\"12\"},\"canceled\":true,"
         "\"cancel_reason\":\"going away\"}}\n",
         P_HOLD, COALESCE_EIO, 0},
        {"cut mid-chunk (RST)", P_RAW, rawcut, P_ABORT, COALESCE_EIO, 0},
        {"cut mid-chunk (FIN)", P_RAW, rawcut, P_FIN, COALESCE_EIO, 0},
        {"cut mid-line (FIN)", P_CHUNK, "{\"result\":{\"header\":{", P_FIN,
         COALESCE_EIO, 0},
        {"cut at a line end (RST)", P_CHUNK, "\n", P_ABORT, COALESCE_EIO, 0},
        {"end of stream", P_CHUNK, "\n", P_ENDCHUNKED, COALESCE_EIO, 0},
    };
    for (size_t i = 0; i < sizeof(cs) / sizeof(cs[0]); i++) {
        fscript_t f;
        fs_init(&f);
        char created[256];
        line_created(created, sizeof(created), 10);
        fs_piece(&f, P_CHUNK, created);
        fs_piece(&f, P_CHUNK, good);
        fs_piece(&f, cs[i].kind_after, cs[i].text);
        if (cs[i].then == P_HOLD) /* nothing after the end is delivered */
            fs_piece(&f, P_CHUNK, later);
        fs_piece(&f, cs[i].then, NULL);
        wrec_t w;
        wrec_init(&w);
        long reqs = 0;
        int rc = fake_watch(&f, &w, 0, &reqs);
        ck_assert_msg(rc == 0, "%s: watch: %s", cs[i].name,
                      coalesce_err_name(rc));
        ck_assert_msg(!w.bad, "%s: %s", cs[i].name, w.why);
        ck_assert_msg(w.cancels == 1 && w.error == cs[i].want,
                      "%s: %ld canceling responses, error %s, want one with %s",
                      cs[i].name, w.cancels, coalesce_err_name(w.error),
                      coalesce_err_name(cs[i].want));
        ck_assert_int_eq(w.compact, cs[i].want_compact);
        ck_assert_msg(w.nev == 1 && w.resps == 2,
                      "%s: %ld events in %ld responses, want the one good "
                      "event, then the cancel",
                      cs[i].name, w.nev, w.resps);
        ASSERT_EV(&w, 0, CACHE_EV_PUT, "/fake/a", "one", 11);
        ck_assert_int_eq(w.after_cancel, 0);
        ck_assert_int_eq(w.late, 0);
        ck_assert_int_eq(reqs, 1);
        wrec_destroy(&w);
        fs_destroy(&f);
    }

    /* Failures before the watch is created: watch() fails, no callback. */
    const struct {
        const char *name;
        int status;
        const char *body;
        int want;
    } pre[] = {
        {"HTTP 500 code 2", 500,
         "{\"error\":\"bad request\",\"message\":\"bad request\",\"code\":2}",
         COALESCE_EBACKEND},
        {"HTTP 400 code 3", 400,
         "{\"error\":\"bad\",\"message\":\"bad\",\"code\":3}", COALESCE_EINVAL},
        {"HTTP 502 HTML", 502, "<html>bad gateway</html>", COALESCE_EBACKEND},
    };
    for (size_t i = 0; i < sizeof(pre) / sizeof(pre[0]); i++) {
        fscript_t f;
        fs_init(&f);
        f.watch_status = pre[i].status;
        snprintf(f.watch_body, sizeof(f.watch_body), "%s", pre[i].body);
        wrec_t w;
        wrec_init(&w);
        long reqs = 0;
        int rc = fake_watch(&f, &w, 0, &reqs);
        ck_assert_msg(rc == pre[i].want, "%s: watch: %s, want %s", pre[i].name,
                      coalesce_err_name(rc), coalesce_err_name(pre[i].want));
        ck_assert_int_eq(w.resps, 0);
        wrec_destroy(&w);
        fs_destroy(&f);
    }
    /* Events before "created": not what etcd sends. */
    fscript_t f;
    fs_init(&f);
    fs_piece(&f, P_CHUNK, good);
    fs_piece(&f, P_HOLD, NULL);
    wrec_t w;
    wrec_init(&w);
    long reqs = 0;
    int rc = fake_watch(&f, &w, 0, &reqs);
    ck_assert_msg(rc == COALESCE_EDECODE, "events before created: %s",
                  coalesce_err_name(rc));
    ck_assert_int_eq(w.resps, 0);
    wrec_destroy(&w);
    fs_destroy(&f);
}
END_TEST

/*
 * A cache over the fake: the first watch gets a line it cannot decode,
 * later ones good data. The cache reports the decode error, resumes and
 * ends up with the good data.
 */
typedef struct fcache {
    pthread_mutex_t mu;
    int watches;
    int rev; /* 10, then 11 once the good event is served */
    char pfx[32];
} fcache_t;

static int fc_handler(void *data, fake_http_t *srv, const fake_req_t *req)
{
    fcache_t *f = data;
    char body[1024], k64[64], v64[64];
    if (!strncmp(req->path, "/v3/kv/range", 12)) {
        pthread_mutex_lock(&f->mu);
        int rev = f->rev;
        pthread_mutex_unlock(&f->mu);
        char a[64];
        snprintf(a, sizeof(a), "%sa", f->pfx);
        b64(a, k64);
        b64("1", v64);
        int n = snprintf(body, sizeof(body),
                         "{\"header\":{\"revision\":\"%d\"},\"kvs\":[{\"key\":"
                         "\"%s\",\"create_revision\":\"5\",\"mod_revision\":"
                         "\"5\",\"version\":\"1\",\"value\":\"%s\"}",
                         rev, k64, v64);
        if (rev >= 11) {
            snprintf(a, sizeof(a), "%sb", f->pfx);
            b64(a, k64);
            b64("2", v64);
            n += snprintf(body + n, sizeof(body) - (size_t)n,
                          ",{\"key\":\"%s\",\"create_revision\":\"11\","
                          "\"mod_revision\":\"11\",\"version\":\"1\","
                          "\"value\":\"%s\"}",
                          k64, v64);
        }
        snprintf(body + n, sizeof(body) - (size_t)n, "],\"count\":\"%d\"}",
                 rev >= 11 ? 2 : 1);
        fake_http_reply_json(req->fd, 200, body);
        return 0;
    }
    if (!strncmp(req->path, "/v3/watch", 9)) {
        pthread_mutex_lock(&f->mu);
        int n = f->watches++;
        if (n > 0)
            f->rev = 11;
        int rev = f->rev;
        pthread_mutex_unlock(&f->mu);
        if (fake_http_start_chunked(req->fd, 200))
            return 1;
        line_created(body, sizeof(body), rev);
        fake_http_chunk(req->fd, body, strlen(body));
        char b[64];
        snprintf(b, sizeof(b), "%sb", f->pfx);
        if (n == 0) {
            b64(b, k64);
            snprintf(body, sizeof(body),
                     "{\"result\":{\"header\":{\"revision\":\"11\"},\"events\":"
                     "[{\"kv\":{\"key\":\"%s\",\"create_revision\":\"11\","
                     "\"mod_revision\":\"11\",\"version\":\"1\",\"value\":"
                     "\"!!\"}}]}}\n",
                     k64);
        } else {
            line_put(body, sizeof(body), 11, b, "2", 11, 11, 1);
        }
        fake_http_chunk(req->fd, body, strlen(body));
        snprintf(body, sizeof(body),
                 "{\"result\":{\"header\":{\"revision\":\"11\"}}}\n");
        fake_http_chunk(req->fd, body, strlen(body));
        fake_http_hold(srv, req->fd, 15000);
        return 1;
    }
    fake_http_reply_json(
        req->fd, 404, "{\"error\":\"nope\",\"message\":\"nope\",\"code\":12}");
    return 0;
}

START_TEST(test_fake_cache_decode_recovers)
{
    const long base = test_alloc_live();
    fcache_t f;
    memset(&f, 0, sizeof(f));
    pthread_mutex_init(&f.mu, NULL);
    f.rev = 10;
    snprintf(f.pfx, sizeof(f.pfx), "/fk/");
    fake_http_t *srv = fake_up(fc_handler, &f);
    cache_store_t *s = fake_store(srv, 0);
    replog_t log;
    replog_init(&log);
    cache_t *c = cache_over(s, f.pfx, &log);
    ASSERT_OK(cache_start(c));
    bool dec = replog_wait(&log, CACHE_REPORT_DECODE, 1, 5000);
    int fr = cache_wait_fresh(c, 11, ms_scaled(5000));
    char va[16] = "", vb[16] = "";
    cache_meta_t mb = {0};
    int ra = cget(c, "/fk/a", va, sizeof(va), NULL);
    int rb = cget(c, "/fk/b", vb, sizeof(vb), &mb);
    cache_health_t h = health_of(c);
    pthread_mutex_lock(&log.mu);
    int code = log.code[CACHE_REPORT_DECODE];
    pthread_mutex_unlock(&log.mu);
    cache_free(c);
    replog_destroy(&log);
    cache_store_free(s);
    long watches = fake_http_requests(srv, "/v3/watch");
    fake_down(srv);
    pthread_mutex_destroy(&f.mu);
    ck_assert_msg(dec, "no DECODE report");
    ck_assert_int_eq(code, COALESCE_EDECODE);
    ASSERT_OK(fr);
    ASSERT_OK(ra);
    ck_assert_str_eq(va, "1");
    ASSERT_OK(rb);
    ck_assert_str_eq(vb, "2");
    ck_assert_int_eq(mb.mod_rev, 11);
    /* Running (the state may still say reconnecting for a moment after
     * the resumed watch delivered). */
    ck_assert_msg(h.state == CACHE_RUNNING || h.state == CACHE_RECONNECTING,
                  "state %d", h.state);
    ck_assert_uint_eq(h.entries, 2);
    ck_assert_int_ge(watches, 2);
    ck_assert_int_eq(test_alloc_live(), base);
}
END_TEST

/* ==========================================================================
 * 4. Authentication and TLS
 * ========================================================================== */

/* A raw HTTP/1.1 POST on loopback (plain http), to probe tokens without
 * the store: the HTTP status, the reply (headers and body) in out. */
static int raw_post(int port,
                    const char *path,
                    const char *token,
                    const char *body,
                    char *out,
                    size_t cap)
{
    out[0] = 0;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    char req[2048];
    int n = snprintf(req, sizeof(req),
                     "POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                     "Content-Type: application/json\r\nContent-Length: %zu\r\n"
                     "%s%s%sConnection: close\r\n\r\n%s",
                     path, port, strlen(body), token ? "Authorization: " : "",
                     token ? token : "", token ? "\r\n" : "", body);
    if (n < 0 || (size_t)n >= sizeof(req) || write(fd, req, (size_t)n) != n) {
        close(fd);
        return -1;
    }
    size_t got = 0;
    for (;;) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 5000) <= 0)
            break;
        ssize_t k = read(fd, out + got, cap - 1 - got);
        if (k <= 0)
            break;
        got += (size_t)k;
        if (got == cap - 1)
            break;
    }
    out[got] = 0;
    close(fd);
    int st = -1;
    if (sscanf(out, "HTTP/1.1 %d", &st) != 1)
        st = -1;
    return st;
}

static int raw_token(int port, char *tok, size_t cap)
{
    char out[4096];
    int st = raw_post(port, "/v3/auth/authenticate", NULL,
                      "{\"name\":\"" ETCD_ENV_ROOT_USER
                      "\",\"password\":\"" ETCD_ENV_ROOT_PASS "\"}",
                      out, sizeof(out));
    const char *t = strstr(out, "\"token\":\"");
    if (st != 200 || !t)
        return -1;
    t += strlen("\"token\":\"");
    size_t n = strcspn(t, "\"");
    if (n >= cap)
        return -1;
    memcpy(tok, t, n);
    tok[n] = 0;
    return 0;
}

static cache_store_t *
auth_store(const etcd_env_t *e, const char *user, const char *pass)
{
    cache_etcd_opts_t o = eopts(e->endpoints);
    o.username = user;
    o.password = pass;
    if (e->o.tls) {
        o.ca_file = e->ca_file;
        o.cert_file = e->cert_file;
        o.key_file = e->key_file;
    }
    return store_with(&o);
}

/* A cache over s starts, writes through, and follows x's writes. */
static void end_to_end(cache_store_t *s, cache_store_t *x, const char *pfx)
{
    s_put(x, key_of(pfx, "pre"), "0");
    cache_t *c = cache_over(s, pfx, NULL);
    ASSERT_OK(cache_start(c));
    ASSERT_CACHED(c, key_of(pfx, "pre"), "0");
    const char *k = key_of(pfx, "mine");
    int64_t r = 0;
    ASSERT_OK(cache_put(c, k, strlen(k), "1", 1, NULL, &r));
    ck_assert_str_eq(s_get(x, k).val, "1");
    s_put(x, key_of(pfx, "theirs"), "2");
    assert_cache_is_etcd(c, x, pfx, 5000, "end to end");
    cache_free(c);

    wrec_t w;
    wrec_init(&w);
    cache_watch_t *cw = NULL;
    ASSERT_OK(watch_pfx(s, pfx, r, &w, &cw));
    bool got = wrec_wait(&w, &w.nev, 2, 5000);
    watch_stop(s, cw, &w);
    ck_assert(got);
    ASSERT_EV(&w, 0, CACHE_EV_PUT, k, "1", r);
    wrec_destroy(&w);
}

START_TEST(test_auth)
{
    const long base = test_alloc_live();
    etcd_env_opts_t eo = {.auth = 1};
    etcd_env_t *env = env_up(&eo);
    char pfx[64];
    mkpfx(pfx, sizeof(pfx), "auth");
    cache_store_t *root =
        auth_store(env, ETCD_ENV_ROOT_USER, ETCD_ENV_ROOT_PASS);
    cache_store_t *x = auth_store(env, ETCD_ENV_ROOT_USER, ETCD_ENV_ROOT_PASS);
    end_to_end(root, x, pfx);

    /* Wrong password: every call fails with EACCES, saying why. */
    cache_store_t *bad = auth_store(env, ETCD_ENV_ROOT_USER, "wrong");
    sget_t g;
    ASSERT_RC(s_get_rc(bad, key_of(pfx, "pre"), &g), COALESCE_EACCES);
    ASSERT_LAST_ERROR_HAS("authentication");
    ck_assert_int_eq(g.n, 0);
    ASSERT_RC(s_put_rc(bad, key_of(pfx, "x"), "x", 0, NULL), COALESCE_EACCES);
    ASSERT_LAST_ERROR_HAS("authentication");
    int64_t id = 0;
    ASSERT_RC(bad->ops->lease_grant(bad, 5000, &id), COALESCE_EACCES);
    cache_t *c = cache_over(bad, pfx, NULL);
    ASSERT_RC(cache_start(c), COALESCE_EACCES);
    cache_free(c);
    ck_assert_int_eq(s_get(x, key_of(pfx, "x")).n, 0);
    /* The message of a failed watch() reaches the calling thread. */
    s_get(x, key_of(pfx, "pre")); /* a success: the message is cleared */
    wrec_t w;
    wrec_init(&w);
    cache_watch_t *cw = NULL;
    ASSERT_RC(watch_pfx(bad, pfx, 0, &w, &cw), COALESCE_EACCES);
    ck_assert_int_eq(w.resps, 0);
    wrec_destroy(&w);
    char werr[512];
    snprintf(werr, sizeof(werr), "%s", cache_etcd_last_error());
    cache_store_free(bad);
    /* No credentials at all. */
    cache_store_t *anon = store_at(env->endpoints);
    ASSERT_RC(s_get_rc(anon, key_of(pfx, "pre"), &g), COALESCE_EACCES);
    ASSERT_RC(s_put_rc(anon, key_of(pfx, "x"), "x", 0, NULL), COALESCE_EACCES);
    cache_store_free(anon);

    /* The read-only user reads and watches, and may not write. */
    cache_store_t *rd =
        auth_store(env, ETCD_ENV_READER_USER, ETCD_ENV_READER_PASS);
    ck_assert_str_eq(s_get(rd, key_of(pfx, "pre")).val, "0");
    ASSERT_RC(s_put_rc(rd, key_of(pfx, "x"), "x", 0, NULL), COALESCE_EACCES);
    ASSERT_LAST_ERROR_HAS("permission denied");
    c = cache_over(rd, pfx, NULL);
    ASSERT_OK(cache_start(c));
    ASSERT_CACHED(c, key_of(pfx, "mine"), "1");
    const char *k = key_of(pfx, "x");
    ASSERT_RC(cache_put(c, k, strlen(k), "x", 1, NULL, NULL), COALESCE_EACCES);
    s_put(x, key_of(pfx, "seen"), "by reader");
    assert_cache_is_etcd(c, x, pfx, 5000, "reader's cache");
    cache_free(c);
    cache_store_free(rd);
    cache_store_free(root);
    cache_store_free(x);
    env_down(env);
    ck_assert_msg(strstr(werr, "authentication") != NULL,
                  "watch() with a wrong password: last error \"%s\" does not "
                  "say why (etcd.h: the message of the calling thread's last "
                  "failed call)",
                  werr);
    ck_assert_int_eq(test_alloc_live(), base);
}
END_TEST

/* --auth-token-ttl: etcd 3.4 expires simple tokens that were not used for
 * that long (checked below with a raw request); the store renews them. */
START_TEST(test_auth_token_expiry)
{
    const long base = test_alloc_live();
    const int ttl_s = 2;
    etcd_env_opts_t eo = {.auth = 1, .token_ttl_s = ttl_s};
    etcd_env_t *env = env_up(&eo);
    char pfx[64];
    mkpfx(pfx, sizeof(pfx), "authttl");
    cache_store_t *root =
        auth_store(env, ETCD_ENV_ROOT_USER, ETCD_ENV_ROOT_PASS);
    cache_store_t *x = auth_store(env, ETCD_ENV_ROOT_USER, ETCD_ENV_ROOT_PASS);
    cache_store_t *later =
        auth_store(env, ETCD_ENV_ROOT_USER, ETCD_ENV_ROOT_PASS);
    /* The read-only cache reaches etcd through a proxy, to cut its watch
     * once the token expired: it must resume with a new token. */
    tcp_proxy_t *p = proxy_up(env->m[0].client_port);
    char peps[64];
    snprintf(peps, sizeof(peps), "http://127.0.0.1:%d", tcp_proxy_port(p));
    cache_etcd_opts_t po = eopts(peps);
    po.username = ETCD_ENV_ROOT_USER;
    po.password = ETCD_ENV_ROOT_PASS;
    cache_store_t *reader = store_with(&po);
    s_put(x, key_of(pfx, "pre"), "0");
    /* A writing cache and a read-only one, both watching. */
    cache_t *c = cache_over(root, pfx, NULL);
    ASSERT_OK(cache_start(c));
    replog_t log;
    replog_init(&log);
    cache_t *rc_cache = cache_over(reader, pfx, &log);
    ASSERT_OK(cache_start(rc_cache));
    s_get(later, key_of(pfx, "pre")); /* authenticates */
    char tok[256];
    ck_assert_int_eq(raw_token(env->m[0].client_port, tok, sizeof(tok)), 0);
    /* Time is the subject: wait past the TTL (and etcd's 1 s check). */
    double until = now_ms() + (ttl_s + 2) * 1000.0;
    while (now_ms() < until)
        nap_ms(100);
    char out[4096];
    int st = raw_post(env->m[0].client_port, "/v3/kv/range", tok,
                      "{\"key\":\"AA==\"}", out, sizeof(out));
    ck_assert_msg(st != 200 && strstr(out, "invalid auth token"),
                  "etcd did not expire a token after %d s: HTTP %d %.300s",
                  ttl_s, st, out);
    /* Reads and writes (the cache's txn) renew the token. */
    ck_assert_str_eq(s_get(root, key_of(pfx, "pre")).val, "0");
    const char *kt = key_of(pfx, "after-expiry");
    int64_t r = 0;
    ASSERT_OK(cache_put(c, kt, strlen(kt), "ok", 2, NULL, &r));
    /* The watches created before the expiry still follow. */
    s_put(x, key_of(pfx, "after-expiry-2"), "ext");
    assert_cache_is_etcd(c, x, pfx, 5000, "writer, after the token expired");
    assert_cache_is_etcd(rc_cache, x, pfx, 5000,
                         "reader, after the token expired");
    /* A new watch with the expired token: renewed too. */
    wrec_t w;
    wrec_init(&w);
    cache_watch_t *cw = NULL;
    int wrc = watch_pfx(later, pfx, r, &w, &cw);
    bool got = false;
    if (wrc == 0) {
        got = wrec_wait(&w, &w.nev, 1, 5000);
        watch_stop(later, cw, &w);
    }
    /* The read-only cache's watch breaks: it resumes (its store made no
     * request since the expiry) and follows new writes. */
    tcp_proxy_cut(p);
    bool disc = replog_wait(&log, CACHE_REPORT_DISCONNECTED, 1, 5000);
    int64_t r2 = s_put(x, key_of(pfx, "after-cut"), "ext");
    int fr = cache_wait_fresh(rc_cache, r2, ms_scaled(10000));
    cache_health_t h = health_of(rc_cache);
    long failed = 0;
    pthread_mutex_lock(&log.mu);
    failed = log.n[CACHE_REPORT_FAILED];
    int fcode = log.code[CACHE_REPORT_FAILED];
    pthread_mutex_unlock(&log.mu);
    cache_free(c);
    cache_free(rc_cache);
    replog_destroy(&log);
    cache_store_free(later);
    proxy_down(p);
    cache_store_free(reader);
    cache_store_free(root);
    cache_store_free(x);
    env_down(env);
    ck_assert_msg(wrc == 0,
                  "watch() with an expired token: %s (want the store to "
                  "authenticate again)",
                  coalesce_err_name(wrc));
    ck_assert(got);
    ASSERT_EV(&w, 0, CACHE_EV_PUT, kt, "ok", r);
    wrec_destroy(&w);
    ck_assert(disc);
    ck_assert_msg(fr == 0,
                  "a read-only cache whose watch broke after its token "
                  "expired did not resume: wait_fresh %s, state %d, %ld "
                  "failed resumes (last %s)",
                  coalesce_err_name(fr), h.state, failed,
                  coalesce_err_name(fcode));
    ck_assert_uint_ge(h.reconnects, 1);
    ck_assert_int_eq(test_alloc_live(), base);
}
END_TEST

START_TEST(test_tls)
{
    const long base = test_alloc_live();
    etcd_env_opts_t eo = {.tls = 1};
    etcd_env_t *env = env_up(&eo);
    char pfx[64];
    mkpfx(pfx, sizeof(pfx), "tls");
    ck_assert_ptr_nonnull(strstr(env->endpoints, "https://"));
    cache_store_t *s = auth_store(env, NULL, NULL);
    cache_store_t *x = auth_store(env, NULL, NULL);
    end_to_end(s, x, pfx);

    /* etcd.h: a server certificate that does not verify is
     * COALESCE_EACCES; a client certificate the server rejects is
     * COALESCE_EACCES, or COALESCE_EIO when the server's reset beats its
     * TLS alert (TLS 1.3 checks it after the handshake), and then the
     * message says what to suspect. Each case is tried several times (a
     * new handshake each time), with reads, writes and watches. */
    struct {
        const char *name;
        const char *ca, *cert, *key;
        int eio_ok; /* EIO allowed, with a hint in the message */
        int n, eacces, eio, eio_hint;
        int other; /* the first code that was neither */
        char err[300];
    } bad[] = {
        {"untrusted server (bad CA)", env->bad_ca_file, env->cert_file,
         env->key_file, 0, 0, 0, 0, 0, 0, ""},
        {"no CA (system roots)", NULL, env->cert_file, env->key_file, 0, 0, 0,
         0, 0, 0, ""},
        {"client cert from another CA", env->ca_file, env->bad_cert_file,
         env->bad_key_file, 1, 0, 0, 0, 0, 0, ""},
        {"no client cert", env->ca_file, NULL, NULL, 1, 0, 0, 0, 0, 0, ""},
    };
    const char *k = key_of(pfx, "pre");
    for (size_t i = 0; i < 4; i++) {
        cache_etcd_opts_t o = eopts(env->endpoints);
        o.ca_file = bad[i].ca;
        o.cert_file = bad[i].cert;
        o.key_file = bad[i].key;
        cache_store_t *b = store_with(&o);
        for (int t = 0; t < 9; t++) {
            int rc;
            if (t % 3 == 0) {
                sget_t g;
                rc = s_get_rc(b, k, &g);
            } else if (t % 3 == 1) {
                rc = s_put_rc(b, key_of(pfx, "bad%zu", i), "x", 0, NULL);
            } else {
                wrec_t w;
                wrec_init(&w);
                cache_watch_t *cw = NULL;
                rc = watch_pfx(b, pfx, 0, &w, &cw);
                if (rc == 0)
                    watch_stop(b, cw, &w);
                wrec_destroy(&w);
            }
            bad[i].n++;
            if (rc == COALESCE_EACCES) {
                bad[i].eacces++;
            } else if (rc == COALESCE_EIO && bad[i].eio_ok) {
                bad[i].eio++;
                if (strstr(cache_etcd_last_error(), "client certificate"))
                    bad[i].eio_hint++;
                snprintf(bad[i].err, sizeof(bad[i].err), "%s",
                         cache_etcd_last_error());
            } else if (!bad[i].other) {
                bad[i].other = rc ? rc : 1;
                snprintf(bad[i].err, sizeof(bad[i].err), "%s",
                         cache_etcd_last_error());
            }
        }
        note("etcd TLS: %s: EACCES %d of %d, EIO %d%s%s%s%s\n", bad[i].name,
             bad[i].eacces, bad[i].n, bad[i].eio, bad[i].other ? ", else " : "",
             bad[i].other ? coalesce_err_name(bad[i].other) : "",
             bad[i].err[0] ? "; " : "", bad[i].err);
        cache_store_free(b);
    }
    ck_assert_int_eq(s_get(x, key_of(pfx, "bad1")).n, 0);
    ck_assert_int_eq(s_get(x, key_of(pfx, "bad2")).n, 0);
    cache_store_free(s);
    cache_store_free(x);
    env_down(env);
    for (size_t i = 0; i < 4; i++) {
        ck_assert_msg(bad[i].eacces + bad[i].eio == bad[i].n,
                      "%s: %d of %d calls failed with COALESCE_EACCES%s; "
                      "another: %s (%s)",
                      bad[i].name, bad[i].eacces, bad[i].n,
                      bad[i].eio_ok ? " or COALESCE_EIO" : "",
                      coalesce_err_name(bad[i].other), bad[i].err);
        ck_assert_msg(bad[i].eio_hint == bad[i].eio,
                      "%s: %d of %d COALESCE_EIO without a hint about the "
                      "client certificate (%s)",
                      bad[i].name, bad[i].eio - bad[i].eio_hint, bad[i].eio,
                      bad[i].err);
    }
    ck_assert_int_eq(test_alloc_live(), base);
}
END_TEST

START_TEST(test_tls_auth)
{
    const long base = test_alloc_live();
    etcd_env_opts_t eo = {.tls = 1, .auth = 1};
    etcd_env_t *env = env_up(&eo);
    char pfx[64];
    mkpfx(pfx, sizeof(pfx), "tlsauth");
    cache_store_t *s = auth_store(env, ETCD_ENV_ROOT_USER, ETCD_ENV_ROOT_PASS);
    cache_store_t *x = auth_store(env, ETCD_ENV_ROOT_USER, ETCD_ENV_ROOT_PASS);
    end_to_end(s, x, pfx);
    cache_store_t *rd =
        auth_store(env, ETCD_ENV_READER_USER, ETCD_ENV_READER_PASS);
    ck_assert_str_eq(s_get(rd, key_of(pfx, "mine")).val, "1");
    ASSERT_RC(s_put_rc(rd, key_of(pfx, "x"), "x", 0, NULL), COALESCE_EACCES);
    cache_store_t *bad = auth_store(env, ETCD_ENV_ROOT_USER, "wrong");
    sget_t g;
    ASSERT_RC(s_get_rc(bad, key_of(pfx, "mine"), &g), COALESCE_EACCES);
    ASSERT_LAST_ERROR_HAS("authentication");
    cache_store_free(bad);
    cache_store_free(rd);
    cache_store_free(s);
    cache_store_free(x);
    env_down(env);
    ck_assert_int_eq(test_alloc_live(), base);
}
END_TEST

/*
 * Replies that are not what etcd sends are refused, never misread (found by
 * test/fuzz/fuzz_etcd.c): an event type that is not a name (a number was
 * taken for a PUT), a result that is not an object (delivered as progress),
 * a null key (a NULL key pointer), a null or non-object prev_kv (taken for
 * a previous key with revision 0).
 */
START_TEST(test_fake_strict_decode)
{
    char good[512];
    line_put(good, sizeof(good), 11, "/fake/a", "one", 11, 11, 1);
    const char *const lines[] = {
        "{\"result\":{\"header\":{\"revision\":\"12\"},\"events\":[{\"type\":"
        "1,\"kv\":{\"key\":\"L2Zha2UvYg==\",\"mod_revision\":\"12\"}}]}}\n",
        "{\"result\":\"L2Zha2UvYg==\"}\n",
        "{\"result\":{\"header\":{\"revision\":\"12\"},\"events\":[{\"kv\":"
        "{\"key\":null,\"mod_revision\":\"12\"}}]}}\n",
    };
    for (size_t i = 0; i < sizeof(lines) / sizeof(lines[0]); i++) {
        fscript_t f;
        fs_init(&f);
        char created[256];
        line_created(created, sizeof(created), 10);
        fs_piece(&f, P_CHUNK, created);
        fs_piece(&f, P_CHUNK, good);
        fs_piece(&f, P_CHUNK, lines[i]);
        fs_piece(&f, P_HOLD, NULL);
        wrec_t w;
        wrec_init(&w);
        long reqs = 0;
        ASSERT_OK(fake_watch(&f, &w, 0, &reqs));
        ck_assert_msg(!w.bad, "line %zu: %s", i, w.why);
        ck_assert_msg(w.cancels == 1 && w.error == COALESCE_EDECODE &&
                          w.nev == 1 && w.resps == 2,
                      "line %zu: %ld events in %ld responses, %ld cancels "
                      "(%s); want the good event, then COALESCE_EDECODE",
                      i, w.nev, w.resps, w.cancels, coalesce_err_name(w.error));
        wrec_destroy(&w);
        fs_destroy(&f);
    }

    fscript_t f;
    fs_init(&f);
    fake_http_t *srv = fake_up(fs_handler, &f);
    cache_store_t *s = fake_store(srv, 0);
    kvlist_t l = {0};
    int64_t h = 0;
    int more = 0;
    fs_range(&f, 200,
             "{\"header\":{\"revision\":\"7\"},\"kvs\":[{\"key\":null,"
             "\"mod_revision\":\"6\"}]}");
    ASSERT_RC(s->ops->range(s, "/fake/", 6, "/fake0", 6, 0, 0, kvl_store_cb, &l,
                            &h, &more),
              COALESCE_EDECODE);
    ck_assert_uint_eq(l.n, 0);
    cache_op_t op = {.type = CACHE_OP_PUT,
                     .key = "/fake/k",
                     .keylen = 7,
                     .value = "v",
                     .vallen = 1};
    cache_op_result_t res;
    int ok = -1;
    int64_t rev = -1;
    fs_txn(&f, 200, "{\"header\":{\"revision\":\"9\"},\"prev_kv\":null}");
    ASSERT_OK(s->ops->txn(s, NULL, 0, &op, 1, &ok, &rev, &res));
    ck_assert_int_eq(ok, 1);
    ck_assert_int_eq(rev, 9);
    ck_assert_int_eq(res.has_prev, 0);
    fs_txn(&f, 200, "{\"header\":{\"revision\":\"9\"},\"prev_kv\":\"x\"}");
    ASSERT_RC(s->ops->txn(s, NULL, 0, &op, 1, &ok, &rev, &res),
              COALESCE_EDECODE);
    cache_store_free(s);
    fake_down(srv);
    fs_destroy(&f);
}
END_TEST

/* --- Registration --------------------------------------------------------- */

static TCase *tcase_live(Suite *s, const char *name, double timeout)
{
    TCase *tc = tcase(s, name, timeout);
    tcase_add_checked_fixture(tc, NULL, live_teardown);
    return tc;
}

Suite *make_etcd_suite(void)
{
    Suite *s = suite_create("etcd");
    TCase *tc = tcase_live(s, "basics", 30);
    tcase_add_test(tc, test_new_options);
    tcase_add_test(tc, test_range_paging);
    tcase_add_test(tc, test_txn_compares);
    tcase_add_test(tc, test_error_mapping);
    tcase_add_test(tc, test_watch_events);
    tcase_add_test(tc, test_leases);
    tcase_add_test(tc, test_endpoints);
    tcase_add_test(tc, test_start_unreachable_then_ok);

    tc = tcase_live(s, "faults", 40);
    tcase_add_test(tc, test_stalled_network);
    tcase_add_test(tc, test_kill_restart);
    tcase_add_test(tc, test_compaction_while_cut);
    tcase_add_test(tc, test_two_processes);
    tc = tcase_live(s, "cluster", 90);
    tcase_add_test(tc, test_cluster_leader_kill);

    tc = tcase_live(s, "bad server", 30);
    tcase_add_test(tc, test_fake_unary);
    tcase_add_test(tc, test_fake_watch_stream);
    tcase_add_test(tc, test_fake_watch_endings);
    tcase_add_test(tc, test_fake_cache_decode_recovers);
    tcase_add_test(tc, test_fake_strict_decode);

    tc = tcase_live(s, "auth and TLS", 40);
    tcase_add_test(tc, test_auth);
    tcase_add_test(tc, test_auth_token_expiry);
    tcase_add_test(tc, test_tls);
    tcase_add_test(tc, test_tls_auth);
    return s;
}

/*
 * Tests for the write-through cache (include/coalesce/cache.h) over a store
 * (include/coalesce/store.h), following the cache issue (WC-1..WC-11) and
 * the reference's rules (cache-reference.md §A.11 R1..R15): its tests (§B.1,
 * §B.2), the tests it lacks (§B.4 X1..X20) and a randomized model test.
 *
 * Rules:
 *  - Every test runs against a store fixture (fixtures[] below): a
 *    constructor and capabilities. Tests that need the in-memory store's
 *    hooks (hold, flush, cut, progress, compact) are registered only for
 *    fixtures with CAP_HOOKS; the others run against every store, so the
 *    etcd store can reuse them by adding one line to fixtures[].
 *  - A wrapper store (wrap_t) forwards to the fixture's store and adds what
 *    any store can be made to do: count calls, fail the next calls, block a
 *    txn after it committed (a write-through in flight), block watch()
 *    calls (a resume held back), block a range after it read (a relist in
 *    progress) and pause watch responses above a revision, split one
 *    revision per response. External writers use the fixture's store
 *    directly, never the cache.
 *  - Worker threads never call ck_assert; they record, the main thread
 *    checks.
 *  - No sleeps as synchronisation: gates, counters, cache_wait_fresh() and
 *    the report log's condition variable. Timed waits only bound how long
 *    a broken implementation can make a test wait; only the TTL test polls,
 *    with a deadline, because lease expiry is time-based.
 *  - test_alloc_live() is back to its starting value at the end of every
 *    test (t_finish), and no watch is left on the store.
 */
#include "helpers.h"

#include <coalesce/etcd.h>

#include <inttypes.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* --- Small utilities ------------------------------------------------------ */

/* A wait bound, scaled like the test timeouts (valgrind). */
static int ms_scaled(int ms)
{
    return (int)(test_timeout(ms / 1000.0) * 1000.0 + 0.5);
}

#define WAIT_MS 5000

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

#define ASSERT_RC(expr, want)                                                  \
    do {                                                                       \
        int rc_ = (expr);                                                      \
        int want_ = (want);                                                    \
        ck_assert_msg(rc_ == want_, "%s: %s (%d), want %s", #expr,             \
                      coalesce_err_name(rc_), rc_, coalesce_err_name(want_));  \
    } while (0)
#define ASSERT_OK(expr) ASSERT_RC(expr, 0)

static uint64_t rnd_next(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

/* --- Store fixtures ------------------------------------------------------- */

enum {
    CAP_HOOKS = 1u << 0 /* cache_memstore_hold/flush/cut/progress/compact */
};

typedef struct store_fixture {
    const char *name;
    cache_store_t *(*make)(void);
    unsigned caps;
    /* Asks for a progress notification on every watch (NULL: the store
     * sends them by itself); lets W reach a revision made outside the
     * prefix. */
    int (*progress)(cache_store_t *s);
    int ttl_ms; /* a short TTL the store honours (etcd: whole seconds) */
    int (*compact)(cache_store_t *s, int64_t rev);
} store_fixture_t;

static cache_store_t *make_memstore(void)
{
    cache_store_t *s = NULL;
    ck_assert_int_eq(cache_memstore_new(&s, NULL), 0);
    ck_assert_ptr_nonnull(s);
    return s;
}

/* Over the shared etcd (helpers.h); its progress notifications come every
 * 100 ms by themselves. */
static cache_store_t *make_etcd(void)
{
    const char *eps = test_etcd_endpoints();
    ck_assert_msg(eps != NULL, "etcd is not running (see the message above)");
    cache_etcd_opts_t o;
    cache_etcd_opts_init(&o);
    o.endpoints = eps;
    /* Valgrind runs threads one at a time: a busy test thread can hold a
     * request past the default 10 s. */
    o.request_timeout_ms = ms_scaled(10000);
    cache_store_t *s = NULL;
    ck_assert_int_eq(cache_etcd_new(&s, &o), 0);
    return s;
}

static const store_fixture_t fixtures[] = {
    {"memstore", make_memstore, CAP_HOOKS, cache_memstore_progress, 50,
     cache_memstore_compact},
    {"etcd", make_etcd, 0, NULL, 1000, cache_etcd_compact},
};
#define NFIX ((int)(sizeof(fixtures) / sizeof(fixtures[0])))

/* --- The wrapper store ---------------------------------------------------- */

typedef struct wrap wrap_t;

typedef struct wrap_watch {
    wrap_t *w;
    cache_watch_cb cb;
    void *data;
    cache_watch_t *inner;
} wrap_watch_t;

#define MAX_STARTS 256

struct wrap {
    cache_store_t base; /* first: the cache sees a cache_store_t */
    cache_store_t *inner;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    /* Calls seen (watch_calls counts attempts, live the watches open). */
    long range_calls, txn_calls, watch_calls, cancels, grants, revokes;
    long responses;
    int live;
    int64_t starts[MAX_STARTS]; /* start revision of each watch() call */
    int nstarts;
    /* Failure injection: skip calls pass, then n calls fail with code. */
    int range_fail_skip, range_fail_n, range_fail_code;
    int txn_fail_n, txn_fail_code;
    int watch_fail_n, watch_fail_code;
    /* Gates: while on, the calls wait (txn and range after the store
     * answered, watch before the store is asked). */
    int txn_gate, range_gate, watch_gate;
    int txn_blocked, range_blocked, watch_blocked;
    /* >= 0: responses with a revision above it wait, and responses are
     * split one revision each so that the pause falls between them. */
    int64_t pause_after;
    int paused;
    /* Split parts keep the response's header revision, past their events,
     * as etcd's partial catch-up batches do (C.2-2). */
    int keep_header;
    /* Set by tests once cache_stop() returned: no callback may follow. */
    int stopped;
    long late;
    /* A store written for 0.4: compaction is COALESCE_ERANGE. */
    int legacy_erange;
};

static void wrap_lock(wrap_t *w)
{
    pthread_mutex_lock(&w->mu);
}

static void wrap_unlock(wrap_t *w)
{
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

static int wrap_take_failure(int *skip, int *n, int code)
{
    if (*n <= 0)
        return 0;
    if (skip && *skip > 0) {
        (*skip)--;
        return 0;
    }
    (*n)--;
    return code;
}

static void wrap_block(wrap_t *w, const int *gate, int *blocked)
{
    if (!*gate)
        return;
    (*blocked)++;
    pthread_cond_broadcast(&w->cv);
    while (*gate)
        pthread_cond_wait(&w->cv, &w->mu);
    (*blocked)--;
}

static int w_range(cache_store_t *s,
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
    wrap_t *w = (wrap_t *)(void *)s;
    wrap_lock(w);
    w->range_calls++;
    int fail = wrap_take_failure(&w->range_fail_skip, &w->range_fail_n,
                                 w->range_fail_code);
    wrap_unlock(w);
    if (fail)
        return fail;
    int rc = w->inner->ops->range(w->inner, key, keylen, end, endlen, rev,
                                  limit, cb, data, header_rev, more);
    wrap_lock(w);
    wrap_block(w, &w->range_gate, &w->range_blocked);
    wrap_unlock(w);
    return rc;
}

static int w_txn(cache_store_t *s,
                 const cache_cmp_t *cmps,
                 size_t ncmps,
                 const cache_op_t *ops,
                 size_t nops,
                 int *succeeded,
                 int64_t *rev,
                 cache_op_result_t *results)
{
    wrap_t *w = (wrap_t *)(void *)s;
    wrap_lock(w);
    w->txn_calls++;
    int fail = wrap_take_failure(NULL, &w->txn_fail_n, w->txn_fail_code);
    wrap_unlock(w);
    if (fail)
        return fail;
    int rc = w->inner->ops->txn(w->inner, cmps, ncmps, ops, nops, succeeded,
                                rev, results);
    wrap_lock(w);
    wrap_block(w, &w->txn_gate, &w->txn_blocked);
    wrap_unlock(w);
    return rc;
}

/* The highest revision a response carries (0 for a cancel). */
static int64_t resp_top(const cache_watch_resp_t *r)
{
    if (r->error != 0)
        return 0;
    if (r->n > 0)
        return r->events[r->n - 1].kv.mod_rev;
    return r->revision;
}

static void wrap_deliver(wrap_watch_t *ww, const cache_watch_resp_t *r)
{
    wrap_t *w = ww->w;
    cache_watch_resp_t old;
    if (w->legacy_erange && r->error == COALESCE_ECOMPACTED) {
        old = *r;
        old.error = COALESCE_ERANGE;
        r = &old;
    }
    wrap_lock(w);
    while (w->pause_after >= 0 && resp_top(r) > w->pause_after) {
        w->paused = 1;
        pthread_cond_broadcast(&w->cv);
        pthread_cond_wait(&w->cv, &w->mu);
    }
    w->paused = 0;
    w->responses++;
    if (w->stopped)
        w->late++;
    wrap_unlock(w);
    ww->cb(ww->data, r);
}

static void w_watch_cb(void *data, const cache_watch_resp_t *r)
{
    wrap_watch_t *ww = data;
    wrap_t *w = ww->w;
    wrap_lock(w);
    int split = w->pause_after >= 0 && r->error == 0 && r->n > 1;
    wrap_unlock(w);
    if (!split) {
        wrap_deliver(ww, r);
        return;
    }
    for (size_t i = 0; i < r->n;) {
        size_t j = i;
        int64_t rev = r->events[i].kv.mod_rev;
        while (j < r->n && r->events[j].kv.mod_rev == rev)
            j++;
        cache_watch_resp_t sub = *r;
        sub.events = r->events + i;
        sub.n = j - i;
        wrap_lock(w);
        if (j < r->n && !w->keep_header)
            sub.revision = rev;
        wrap_unlock(w);
        wrap_deliver(ww, &sub);
        i = j;
    }
}

static int w_watch(cache_store_t *s,
                   const void *key,
                   size_t keylen,
                   const void *end,
                   size_t endlen,
                   int64_t start_rev,
                   cache_watch_cb cb,
                   void *data,
                   cache_watch_t **out)
{
    wrap_t *w = (wrap_t *)(void *)s;
    wrap_lock(w);
    w->watch_calls++;
    if (w->nstarts < MAX_STARTS)
        w->starts[w->nstarts++] = start_rev;
    wrap_block(w, &w->watch_gate, &w->watch_blocked);
    int fail = wrap_take_failure(NULL, &w->watch_fail_n, w->watch_fail_code);
    wrap_unlock(w);
    if (fail)
        return fail;
    wrap_watch_t *ww = calloc(1, sizeof(*ww));
    if (!ww)
        return COALESCE_ENOMEM;
    ww->w = w;
    ww->cb = cb;
    ww->data = data;
    int rc = w->inner->ops->watch(w->inner, key, keylen, end, endlen, start_rev,
                                  w_watch_cb, ww, &ww->inner);
    if (rc != 0) {
        free(ww);
        return w->legacy_erange && rc == COALESCE_ECOMPACTED ? COALESCE_ERANGE
                                                             : rc;
    }
    wrap_lock(w);
    w->live++;
    wrap_unlock(w);
    *out = (cache_watch_t *)(void *)ww;
    return 0;
}

static void w_watch_cancel(cache_store_t *s, cache_watch_t *cw)
{
    wrap_t *w = (wrap_t *)(void *)s;
    wrap_watch_t *ww = (wrap_watch_t *)(void *)cw;
    w->inner->ops->watch_cancel(w->inner, ww->inner);
    wrap_lock(w);
    w->live--;
    w->cancels++;
    wrap_unlock(w);
    free(ww);
}

static int w_lease_grant(cache_store_t *s, int64_t ttl_ms, int64_t *id)
{
    wrap_t *w = (wrap_t *)(void *)s;
    int rc = w->inner->ops->lease_grant(w->inner, ttl_ms, id);
    if (rc == 0) {
        wrap_lock(w);
        w->grants++;
        wrap_unlock(w);
    }
    return rc;
}

static int w_lease_revoke(cache_store_t *s, int64_t id)
{
    wrap_t *w = (wrap_t *)(void *)s;
    wrap_lock(w);
    w->revokes++;
    wrap_unlock(w);
    return w->inner->ops->lease_revoke(w->inner, id);
}

static void w_destroy(cache_store_t *s)
{
    wrap_t *w = (wrap_t *)(void *)s;
    pthread_cond_destroy(&w->cv);
    pthread_mutex_destroy(&w->mu);
    free(w);
}

static const cache_store_ops_t wrap_ops = {
    CACHE_STORE_OPS_VERSION, w_range,       w_txn,          w_watch,
    w_watch_cancel,          w_lease_grant, w_lease_revoke, w_destroy,
};

static wrap_t *wrap_new(cache_store_t *inner)
{
    wrap_t *w = calloc(1, sizeof(*w));
    ck_assert_ptr_nonnull(w);
    w->base.ops = &wrap_ops;
    w->inner = inner;
    w->pause_after = -1;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    return w;
}

/* Sets an int field of the wrapper under its lock (and wakes waiters). */
static void wrap_set(wrap_t *w, int *field, int v)
{
    wrap_lock(w);
    *field = v;
    wrap_unlock(w);
}

static void wrap_pause(wrap_t *w, int64_t after)
{
    wrap_lock(w);
    w->pause_after = after;
    wrap_unlock(w);
}

static long wrap_get(wrap_t *w, const long *field)
{
    wrap_lock(w);
    long v = *field;
    wrap_unlock(w);
    return v;
}

/* Waits until *field >= n; false on timeout. */
static bool wrap_wait(wrap_t *w, const int *field, int n, int ms)
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

/* --- Test context --------------------------------------------------------- */

enum { T_WRAP = 1u << 0 };

typedef struct tctx {
    const store_fixture_t *fx;
    cache_store_t *inner; /* the fixture's store: external writes, hooks */
    wrap_t *w;            /* the wrapper, with T_WRAP */
    cache_store_t *store; /* what the cache uses */
    cache_t *c;
    cache_opts_t opts;
    replog_t log;
    char pfx[64];
    size_t pfxlen;
    long leak_base;
} tctx_t;

static unsigned prefix_seq;

static void t_init(tctx_t *t, int fix, unsigned flags)
{
    memset(t, 0, sizeof(*t));
    t->leak_base = test_alloc_live();
    t->fx = &fixtures[fix];
    t->inner = t->fx->make();
    t->store = t->inner;
    if (flags & T_WRAP) {
        t->w = wrap_new(t->inner);
        t->store = &t->w->base;
    }
    replog_init(&t->log);
    cache_opts_init(&t->opts);
    ck_assert_uint_eq(t->opts.size, sizeof(cache_opts_t));
    t->opts.backoff_min_ms = 1;
    t->opts.backoff_max_ms = 20;
    t->opts.report = replog_cb;
    t->opts.report_data = &t->log;
    /* Unique per test, for stores shared between tests (etcd). */
    snprintf(t->pfx, sizeof(t->pfx), "/ct%ld.%u/", (long)getpid(),
             prefix_seq++);
    t->pfxlen = strlen(t->pfx);
}

#define TINIT(flags)                                                           \
    tctx_t t_ctx_;                                                             \
    tctx_t *t = &t_ctx_;                                                       \
    t_init(t, _i, (flags))

static bool has_hooks(const tctx_t *t)
{
    return (t->fx->caps & CAP_HOOKS) != 0;
}

static cache_t *t_new_cache(tctx_t *t, const cache_opts_t *o)
{
    cache_t *c = NULL;
    ASSERT_OK(cache_new(&c, t->store, t->pfx, t->pfxlen, o));
    ck_assert_ptr_nonnull(c);
    return c;
}

static void t_start(tctx_t *t)
{
    if (!t->c)
        t->c = t_new_cache(t, &t->opts);
    ASSERT_OK(cache_start(t->c));
}

static void t_release(tctx_t *t)
{
    if (!t->w)
        return;
    wrap_lock(t->w);
    t->w->txn_gate = t->w->range_gate = t->w->watch_gate = 0;
    t->w->pause_after = -1;
    t->w->keep_header = 0;
    wrap_unlock(t->w);
}

static void t_finish(tctx_t *t)
{
    t_release(t);
    replog_set(&t->log, &t->log.block, 0);
    cache_free(t->c);
    t->c = NULL;
    if (t->w)
        ck_assert_int_eq(t->w->live, 0);
    if (has_hooks(t)) {
        ASSERT_OK(cache_memstore_hold(t->inner, 0));
        ck_assert_int_eq(cache_memstore_watches(t->inner), 0);
    }
    if (t->w)
        cache_store_free(&t->w->base);
    cache_store_free(t->inner);
    replog_destroy(&t->log);
    ck_assert_int_eq(test_alloc_live(), t->leak_base);
}

/* Keys: the cache prefix followed by a suffix (ring of thread buffers). */
static _Thread_local char key_ring[16][512];
static _Thread_local unsigned key_ring_i;

static const char *tkey(const tctx_t *t, const char *sfx)
{
    char *b = key_ring[key_ring_i++ % 16];
    size_t n = strlen(sfx);
    ck_assert_uint_lt(t->pfxlen + n, sizeof(key_ring[0]));
    memcpy(b, t->pfx, t->pfxlen);
    memcpy(b + t->pfxlen, sfx, n + 1);
    return b;
}

/* Binary suffix. */
static const char *tkeyb(const tctx_t *t, const void *sfx, size_t n)
{
    char *b = key_ring[key_ring_i++ % 16];
    memcpy(b, t->pfx, t->pfxlen);
    memcpy(b + t->pfxlen, sfx, n);
    b[t->pfxlen + n] = 0;
    return b;
}

#define KEY(sfx)     tkey(t, (sfx)), (t->pfxlen + strlen(sfx))
#define KEYB(sfx, n) tkeyb(t, (sfx), (n)), (t->pfxlen + (n))
#define STR(s)       (s), strlen(s)

/* --- Reading the cache and the store -------------------------------------- */

typedef struct got {
    int rc;
    char val[512];
    size_t len;
    cache_meta_t meta;
} got_t;

static got_t cget_b(cache_t *c, const void *key, size_t keylen)
{
    got_t g;
    memset(&g, 0, sizeof(g));
    coalesce_buf_t *b = NULL;
    g.rc = cache_get(c, key, keylen, &b, &g.meta);
    if (g.rc == 0) {
        if (!b) {
            g.rc = 1; /* success without a value: reported as wrong */
            return g;
        }
        g.len = coalesce_buf_len(b);
        size_t n = g.len < sizeof(g.val) - 1 ? g.len : sizeof(g.val) - 1;
        memcpy(g.val, coalesce_buf_data(b), n);
        g.val[n] = 0;
        coalesce_buf_unref(b);
    }
    return g;
}

#define CGET(sfx) cget_b(t->c, KEY(sfx))

#define ASSERT_VAL(expr, want)                                                 \
    do {                                                                       \
        got_t g_ = (expr);                                                     \
        ck_assert_msg(g_.rc == 0, "%s: %s (%d)", #expr,                        \
                      coalesce_err_name(g_.rc), g_.rc);                        \
        ck_assert_str_eq(g_.val, (want));                                      \
    } while (0)

#define ASSERT_ABSENT(expr) ASSERT_RC((expr).rc, COALESCE_ENOENT)

static int kv_first_cb(void *data, const cache_kv_t *kv)
{
    got_t *g = data;
    g->rc = 0;
    g->len = kv->vallen;
    size_t n = g->len < sizeof(g->val) - 1 ? g->len : sizeof(g->val) - 1;
    memcpy(g->val, kv->value, n);
    g->val[n] = 0;
    g->meta.create_rev = kv->create_rev;
    g->meta.mod_rev = kv->mod_rev;
    g->meta.version = kv->version;
    g->meta.lease = kv->lease;
    return 1;
}

/* The store's view of one key (not through the cache). */
static got_t sget_b(tctx_t *t, const void *key, size_t keylen)
{
    got_t g;
    memset(&g, 0, sizeof(g));
    g.rc = COALESCE_ENOENT;
    int64_t hdr = 0;
    int more = 0;
    ASSERT_OK(t->inner->ops->range(t->inner, key, keylen, NULL, 0, 0, 0,
                                   kv_first_cb, &g, &hdr, &more));
    return g;
}

#define SGET(sfx) sget_b(t, KEY(sfx))

static int kv_none_cb(void *data, const cache_kv_t *kv)
{
    (void)data;
    (void)kv;
    return 1;
}

/* The store's current revision, through the ops (any store). */
static int64_t store_rev(tctx_t *t)
{
    int64_t hdr = 0;
    int more = 0;
    ASSERT_OK(t->inner->ops->range(t->inner, t->pfx, t->pfxlen, NULL, 0, 0, 1,
                                   kv_none_cb, NULL, &hdr, &more));
    return hdr;
}

static int
ext_txn_rc(cache_store_t *s, const cache_op_t *ops, size_t n, int64_t *rev)
{
    int ok = 0;
    int rc = s->ops->txn(s, NULL, 0, ops, n, &ok, rev, NULL);
    if (rc == 0 && !ok)
        rc = 1;
    return rc;
}

static int64_t ext_txn(tctx_t *t, const cache_op_t *ops, size_t n)
{
    int64_t rev = 0;
    ASSERT_OK(ext_txn_rc(t->inner, ops, n, &rev));
    ck_assert_int_gt(rev, 0);
    return rev;
}

static int64_t ext_put_b(tctx_t *t,
                         const void *key,
                         size_t keylen,
                         const void *val,
                         size_t vallen,
                         int64_t lease)
{
    cache_op_t op;
    memset(&op, 0, sizeof(op));
    op.type = CACHE_OP_PUT;
    op.key = key;
    op.keylen = keylen;
    op.value = val;
    op.vallen = vallen;
    op.lease = lease;
    return ext_txn(t, &op, 1);
}

static int64_t ext_put(tctx_t *t, const char *sfx, const char *val)
{
    return ext_put_b(t, KEY(sfx), STR(val), 0);
}

static int64_t ext_del_b(
    tctx_t *t, const void *key, size_t keylen, const void *end, size_t endlen)
{
    cache_op_t op;
    memset(&op, 0, sizeof(op));
    op.type = CACHE_OP_DELETE;
    op.key = key;
    op.keylen = keylen;
    op.end = end;
    op.endlen = endlen;
    return ext_txn(t, &op, 1);
}

static int64_t ext_del(tctx_t *t, const char *sfx)
{
    return ext_del_b(t, KEY(sfx), NULL, 0);
}

/* A write outside the cache's prefix: raises the store's revision only. */
static int64_t ext_put_outside(tctx_t *t, const char *val)
{
    char key[96];
    snprintf(key, sizeof(key), "/ct-outside%ld/%.40s", (long)getpid(), t->pfx);
    return ext_put_b(t, STR(key), STR(val), 0);
}

/* [key, end) of every key starting with p (etcd's prefix end; "\0" for
 * an all-0xff prefix: every key from p on). */
static size_t prefix_end(const void *p, size_t n, char *out)
{
    const unsigned char *b = p;
    while (n > 0 && b[n - 1] == 0xff)
        n--;
    if (n == 0) {
        out[0] = 0;
        return 1;
    }
    memcpy(out, b, n);
    out[n - 1] = (char)(b[n - 1] + 1);
    return n;
}

static void fresh(tctx_t *t, int64_t rev)
{
    int rc = cache_wait_fresh(t->c, rev, ms_scaled(WAIT_MS));
    ck_assert_msg(rc == 0, "cache_wait_fresh(%" PRId64 "): %s (W %" PRId64 ")",
                  rev, coalesce_err_name(rc), (int64_t)0);
}

static cache_health_t health_of(cache_t *c)
{
    cache_health_t h;
    memset(&h, 0xA5, sizeof(h));
    ASSERT_OK(cache_health(c, &h, sizeof(h)));
    return h;
}

#define HEALTH() health_of(t->c)

/*
 * Waits until cond (on hw_, the cache's health) holds. Only for what the
 * supervisor updates right after a watch is back (state, reconnects), which
 * the new watch's events can overtake: nothing to wait on but the health.
 */
#define WAIT_HEALTH(c, cond)                                                   \
    do {                                                                       \
        double d_ = now_ms() + ms_scaled(WAIT_MS);                             \
        for (;;) {                                                             \
            cache_health_t hw_ = health_of(c);                                 \
            if (cond)                                                          \
                break;                                                         \
            ck_assert_msg(now_ms() < d_, "timed out waiting for %s", #cond);   \
            sched_yield();                                                     \
        }                                                                      \
    } while (0)

/* Memstore hooks (CAP_HOOKS tests only). */
static void hold(tctx_t *t, int on)
{
    ASSERT_OK(cache_memstore_hold(t->inner, on));
}

static void flush(tctx_t *t, int how)
{
    ASSERT_OK(cache_memstore_flush(t->inner, how));
}

static void cut(tctx_t *t, int error)
{
    ASSERT_OK(cache_memstore_cut(t->inner, error));
}

static void progress(tctx_t *t)
{
    ASSERT_OK(cache_memstore_progress(t->inner));
}

/* --- Writing through the cache -------------------------------------------- */

static int64_t put_ok(tctx_t *t, const char *sfx, const char *val)
{
    int64_t rev = 0;
    ASSERT_OK(cache_put(t->c, KEY(sfx), STR(val), NULL, &rev));
    ck_assert_int_gt(rev, 0);
    return rev;
}

static int64_t del_ok(tctx_t *t, const char *sfx, int64_t want_deleted)
{
    int64_t rev = 0, deleted = -1;
    ASSERT_OK(cache_delete(t->c, KEY(sfx), &deleted, &rev));
    ck_assert_int_eq(deleted, want_deleted);
    ck_assert_int_gt(rev, 0);
    return rev;
}

static cache_txn_op_t
txop(int type, const char *key, size_t keylen, const char *val, int64_t expect)
{
    cache_txn_op_t op;
    memset(&op, 0, sizeof(op));
    op.type = type;
    op.key = key;
    op.keylen = keylen;
    op.value = val;
    op.vallen = val ? strlen(val) : 0;
    op.expect = expect;
    return op;
}

/* Every key of the store starting with p. */
static void store_list(tctx_t *t, const void *p, size_t n, kvlist_t *out)
{
    memset(out, 0, sizeof(*out));
    char end[600];
    size_t endlen = prefix_end(p, n, end);
    int64_t hdr = 0;
    int more = 0;
    ASSERT_OK(t->inner->ops->range(t->inner, p, n, end, endlen, 0, 0,
                                   kvl_store_cb, out, &hdr, &more));
    ck_assert_int_eq(more, 0);
}

static int cache_list(cache_t *c, const void *p, size_t n, kvlist_t *out)
{
    memset(out, 0, sizeof(*out));
    out->rc = cache_scan(c, p, n, kvl_scan_cb, out);
    return out->rc;
}

/* The cache holds exactly what the store holds under p (once fresh). */
static void assert_same_under(tctx_t *t, const void *p, size_t n)
{
    if (t->fx->progress)
        ASSERT_OK(t->fx->progress(t->inner));
    fresh(t, store_rev(t));
    kvlist_t s, c;
    store_list(t, p, n, &s);
    ASSERT_OK(cache_list(t->c, p, n, &c));
    char msg[600];
    int d = kvl_diff(&s, &c, msg, sizeof(msg));
    int dis = c.disorder;
    kvl_free(&s);
    kvl_free(&c);
    ck_assert_msg(d == 0, "store vs cache: %s", msg);
    ck_assert_msg(!dis, "cache scan not in byte order");
}

static void assert_same(tctx_t *t)
{
    assert_same_under(t, t->pfx, t->pfxlen);
}

/* Live entries and their bytes as health reports them. */
static void assert_health_counts(tctx_t *t)
{
    kvlist_t c;
    ASSERT_OK(cache_list(t->c, t->pfx, t->pfxlen, &c));
    uint64_t bytes = 0;
    for (size_t i = 0; i < c.n; i++)
        bytes += c.v[i].keylen + c.v[i].vallen;
    cache_health_t h = HEALTH();
    ck_assert_uint_eq(h.entries, c.n);
    ck_assert_uint_eq(h.bytes, bytes);
    kvl_free(&c);
}

/* --- Calls on another thread ---------------------------------------------- */

enum { A_PUT, A_CREATE, A_DELETE, A_DELETE_PREFIX, A_WAIT_FRESH, A_START };

typedef struct async_op {
    pthread_t th;
    cache_t *c;
    int kind;
    char key[512];
    size_t keylen;
    char val[64];
    int64_t arg;
    int timeout_ms;
    cache_put_opts_t popts;
    int use_opts;
    int rc;
    int64_t rev, deleted;
    atomic_int done;
} async_op_t;

static void *async_main(void *p)
{
    async_op_t *a = p;
    switch (a->kind) {
    case A_PUT:
        a->rc = cache_put(a->c, a->key, a->keylen, STR(a->val),
                          a->use_opts ? &a->popts : NULL, &a->rev);
        break;
    case A_CREATE:
        a->rc = cache_create(a->c, a->key, a->keylen, STR(a->val),
                             a->use_opts ? &a->popts : NULL, &a->rev);
        break;
    case A_DELETE:
        a->rc = cache_delete(a->c, a->key, a->keylen, &a->deleted, &a->rev);
        break;
    case A_DELETE_PREFIX:
        a->rc =
            cache_delete_prefix(a->c, a->key, a->keylen, &a->deleted, &a->rev);
        break;
    case A_WAIT_FRESH:
        a->rc = cache_wait_fresh(a->c, a->arg, a->timeout_ms);
        break;
    case A_START:
        a->rc = cache_start(a->c);
        break;
    default:
        a->rc = -1;
    }
    atomic_store(&a->done, 1);
    return NULL;
}

static void
async_run(async_op_t *a, tctx_t *t, int kind, const char *sfx, const char *val)
{
    memset(a, 0, sizeof(*a));
    a->c = t->c;
    a->kind = kind;
    if (sfx) {
        const char *k = tkey(t, sfx);
        a->keylen = strlen(k);
        memcpy(a->key, k, a->keylen);
    }
    snprintf(a->val, sizeof(a->val), "%s", val ? val : "");
    atomic_init(&a->done, 0);
    ck_assert_int_eq(pthread_create(&a->th, NULL, async_main, a), 0);
}

static void async_join(async_op_t *a)
{
    pthread_join(a->th, NULL);
}

/* Starts an op and waits until the wrapper holds its txn (committed). */
static void async_gated(
    async_op_t *a, tctx_t *t, int kind, const char *sfx, const char *val)
{
    int before = 0;
    wrap_lock(t->w);
    before = t->w->txn_blocked;
    t->w->txn_gate = 1;
    wrap_unlock(t->w);
    async_run(a, t, kind, sfx, val);
    ck_assert_msg(wrap_wait(t->w, &t->w->txn_blocked, before + 1, WAIT_MS),
                  "the write never reached the store");
}

/* =========================================================================
 * §B.1: the reference's TestCache
 * ========================================================================= */

/* 1: a key written before the cache exists is there after start, stamped
 * with its own mod revision; W is R0. */
START_TEST(test_b1_get_existing)
{
    TINIT(0);
    int64_t r1 = ext_put(t, "some", "value");
    int64_t r0 = ext_put_outside(t, "later");
    ck_assert_int_gt(r0, r1);
    t_start(t);
    got_t g = CGET("some");
    ASSERT_VAL(g, "value");
    ck_assert_int_eq(g.meta.mod_rev, r1);
    ck_assert_int_eq(g.meta.create_rev, r1);
    ck_assert_int_eq(g.meta.version, 1);
    ck_assert_int_eq(g.meta.lease, 0);
    cache_health_t h = HEALTH();
    ck_assert_int_eq(h.state, CACHE_RUNNING);
    ck_assert_int_eq(h.watch_rev, r0);
    ck_assert_uint_eq(h.entries, 1);
    t_finish(t);
}
END_TEST

/* 2: a value read stays as it was when the key changes; metadata follows
 * every write-through. */
START_TEST(test_b1_get_distinct)
{
    TINIT(0);
    t_start(t);
    int64_t r1 = put_ok(t, "k", "one");
    coalesce_buf_t *b1 = NULL;
    cache_meta_t m1;
    ASSERT_OK(cache_get(t->c, KEY("k"), &b1, &m1));
    ck_assert_int_eq(m1.version, 1);
    ck_assert_int_eq(m1.mod_rev, r1);
    ck_assert_int_eq(m1.create_rev, r1);
    int64_t r2 = put_ok(t, "k", "two");
    ck_assert_int_gt(r2, r1);
    ck_assert_uint_eq(coalesce_buf_len(b1), 3);
    ck_assert_int_eq(memcmp(coalesce_buf_data(b1), "one", 3), 0);
    got_t g = CGET("k");
    ASSERT_VAL(g, "two");
    ck_assert_int_eq(g.meta.version, 2);
    ck_assert_int_eq(g.meta.mod_rev, r2);
    ck_assert_int_eq(g.meta.create_rev, r1);
    /* Two reads give the same bytes; NULL out-parameters are allowed. */
    ASSERT_VAL(CGET("k"), "two");
    ASSERT_OK(cache_get(t->c, KEY("k"), NULL, NULL));
    coalesce_buf_unref(b1);
    t_finish(t);
}
END_TEST

/* 3: another writer's put and delete show up through the watch; an update
 * from the watched mod revision succeeds. */
START_TEST(test_b1_updates_via_watch)
{
    TINIT(0);
    t_start(t);
    int64_t r1 = ext_put(t, "k", "external");
    fresh(t, r1);
    got_t g = CGET("k");
    ASSERT_VAL(g, "external");
    ck_assert_int_eq(g.meta.mod_rev, r1);
    ck_assert_int_eq(g.meta.version, 1);
    int64_t r2 = 0;
    ASSERT_OK(
        cache_update(t->c, KEY("k"), STR("mine"), g.meta.mod_rev, NULL, &r2));
    ck_assert_int_gt(r2, r1);
    got_t g2 = CGET("k");
    ASSERT_VAL(g2, "mine");
    ck_assert_int_eq(g2.meta.version, 2);
    ck_assert_int_eq(g2.meta.mod_rev, r2);
    ck_assert_str_ne(g2.val, g.val);
    int64_t r3 = ext_del(t, "k");
    fresh(t, r3);
    ASSERT_ABSENT(CGET("k"));
    t_finish(t);
}
END_TEST

/* 4: not found; outside the prefix is refused rather than "not found". */
START_TEST(test_b1_not_found)
{
    TINIT(0);
    t_start(t);
    ASSERT_ABSENT(CGET("foo"));
    ASSERT_RC(cache_get(t->c, STR("foo"), NULL, NULL), COALESCE_EINVAL);
    t_finish(t);
}
END_TEST

typedef struct scan_stop {
    int calls;
    int stop_after;
} scan_stop_t;

static int scan_stop_cb(void *data,
                        const void *key,
                        size_t keylen,
                        coalesce_buf_t *value,
                        const cache_meta_t *meta)
{
    (void)key;
    (void)keylen;
    (void)value;
    (void)meta;
    scan_stop_t *s = data;
    return ++s->calls >= s->stop_after;
}

/* 5: prefix scans return exactly the keys under the prefix, in order,
 * with their metadata. */
START_TEST(test_b1_get_prefix)
{
    TINIT(0);
    t_start(t);
    const char *sfx[] = {"foo/bar", "foo/baz", "bar/foo", "bar/baz"};
    int64_t revs[4];
    for (int i = 0; i < 4; i++)
        revs[i] = put_ok(t, sfx[i], sfx[i]);
    kvlist_t l;
    ASSERT_OK(cache_list(t->c, KEY("foo/"), &l));
    ck_assert_uint_eq(l.n, 2);
    ck_assert_str_eq((char *)l.v[0].key, tkey(t, "foo/bar"));
    ck_assert_str_eq((char *)l.v[0].val, "foo/bar");
    ck_assert_int_eq(l.v[0].meta.mod_rev, revs[0]);
    ck_assert_int_eq(l.v[0].meta.version, 1);
    ck_assert_str_eq((char *)l.v[1].key, tkey(t, "foo/baz"));
    ck_assert_int_eq(l.v[1].meta.mod_rev, revs[1]);
    ck_assert_int_eq(l.v[1].meta.version, 1);
    kvl_free(&l);
    ASSERT_OK(cache_list(t->c, t->pfx, t->pfxlen, &l));
    ck_assert_uint_eq(l.n, 4);
    ck_assert_str_eq((char *)l.v[0].key, tkey(t, "bar/baz"));
    ck_assert_str_eq((char *)l.v[1].key, tkey(t, "bar/foo"));
    ck_assert_str_eq((char *)l.v[2].key, tkey(t, "foo/bar"));
    ck_assert_str_eq((char *)l.v[3].key, tkey(t, "foo/baz"));
    ck_assert_int_eq(l.disorder, 0);
    kvl_free(&l);
    /* "foo" without the slash matches too: exactly the bytes given. */
    ASSERT_OK(cache_list(t->c, KEY("foo"), &l));
    ck_assert_uint_eq(l.n, 2);
    kvl_free(&l);
    ASSERT_OK(cache_list(t->c, KEY("nothing/"), &l));
    ck_assert_uint_eq(l.n, 0);
    kvl_free(&l);
    /* The callback stops the scan; still 0. */
    scan_stop_t st = {0, 1};
    ASSERT_OK(cache_scan(t->c, t->pfx, t->pfxlen, scan_stop_cb, &st));
    ck_assert_int_eq(st.calls, 1);
    /* NULL, 0 scans the whole cache (no memcmp on NULL: UBSan). */
    st.calls = 0;
    ASSERT_OK(cache_scan(t->c, NULL, 0, scan_stop_cb, &st));
    ck_assert_int_eq(st.calls, 1);
    assert_same(t);
    t_finish(t);
}
END_TEST

/* 6: a put is in the cache and in the store, with the same metadata. */
START_TEST(test_b1_put_successful)
{
    TINIT(0);
    t_start(t);
    int64_t r = put_ok(t, "k", "v");
    got_t c = CGET("k"), s = SGET("k");
    ASSERT_VAL(c, "v");
    ASSERT_VAL(s, "v");
    ck_assert_int_eq(c.meta.mod_rev, r);
    ck_assert_mem_eq(&c.meta, &s.meta, sizeof(c.meta));
    ck_assert_int_eq(store_rev(t), r);
    t_finish(t);
}
END_TEST

/* 7: a failed update changes nothing and reports the current revision. */
START_TEST(test_b1_failed_update)
{
    TINIT(0);
    t_start(t);
    int64_t r0 = store_rev(t);
    int64_t rev = -1;
    ASSERT_RC(cache_update(t->c, KEY("k"), STR("v"), 1, NULL, &rev),
              COALESCE_ECONFLICT);
    ck_assert_int_eq(rev, r0);
    ASSERT_ABSENT(CGET("k"));
    ASSERT_ABSENT(SGET("k"));
    ck_assert_int_eq(store_rev(t), r0);
    /* On a present key with a wrong expectation too. */
    int64_t r1 = put_ok(t, "k", "v1");
    ASSERT_RC(cache_update(t->c, KEY("k"), STR("v2"), r1 + 1000, NULL, &rev),
              COALESCE_ECONFLICT);
    ck_assert_int_eq(rev, r1);
    got_t g = CGET("k");
    ASSERT_VAL(g, "v1");
    ck_assert_int_eq(g.meta.mod_rev, r1);
    ASSERT_VAL(SGET("k"), "v1");
    t_finish(t);
}
END_TEST

/* 8: create, then create again: EEXIST and nothing changes. */
START_TEST(test_b1_create)
{
    TINIT(0);
    t_start(t);
    int64_t r1 = 0, rev = 0;
    ASSERT_OK(cache_create(t->c, KEY("k"), STR("first"), NULL, &r1));
    got_t g = CGET("k");
    ASSERT_VAL(g, "first");
    ck_assert_int_eq(g.meta.version, 1);
    ck_assert_int_eq(g.meta.create_rev, r1);
    ASSERT_VAL(SGET("k"), "first");
    ASSERT_RC(cache_create(t->c, KEY("k"), STR("second"), NULL, &rev),
              COALESCE_EEXIST);
    ck_assert_int_eq(rev, r1);
    ASSERT_VAL(CGET("k"), "first");
    ASSERT_VAL(SGET("k"), "first");
    ck_assert_int_eq(store_rev(t), r1);
    t_finish(t);
}
END_TEST

/* 9: a put inside a transaction. */
START_TEST(test_b1_txn_put)
{
    TINIT(0);
    t_start(t);
    cache_txn_op_t op = txop(CACHE_TXN_PUT, KEY("k"), "in-txn", 0);
    int64_t rev = 0;
    ASSERT_OK(cache_txn(t->c, &op, 1, &rev));
    got_t g = CGET("k");
    ASSERT_VAL(g, "in-txn");
    ck_assert_int_eq(g.meta.version, 1);
    ck_assert_int_eq(g.meta.mod_rev, rev);
    got_t s = SGET("k");
    ASSERT_VAL(s, "in-txn");
    ck_assert_mem_eq(&g.meta, &s.meta, sizeof(g.meta));
    t_finish(t);
}
END_TEST

/* 10: delete an existing key. */
START_TEST(test_b1_delete_exists)
{
    TINIT(0);
    t_start(t);
    int64_t r1 = put_ok(t, "k", "v");
    ASSERT_VAL(CGET("k"), "v");
    int64_t r2 = del_ok(t, "k", 1);
    ck_assert_int_gt(r2, r1);
    ASSERT_ABSENT(CGET("k"));
    ASSERT_ABSENT(SGET("k"));
    t_finish(t);
}
END_TEST

/* 11: delete an absent key: count 0, no error, a revision. */
START_TEST(test_b1_delete_absent)
{
    TINIT(0);
    t_start(t);
    ext_put_outside(t, "x");
    del_ok(t, "k", 0);
    ASSERT_ABSENT(CGET("k"));
    ASSERT_OK(cache_delete(t->c, KEY("k"), NULL, NULL));
    t_finish(t);
}
END_TEST

/* 12: delete inside a transaction. */
START_TEST(test_b1_delete_txn)
{
    TINIT(0);
    t_start(t);
    put_ok(t, "k", "v");
    cache_txn_op_t op = txop(CACHE_TXN_DELETE, KEY("k"), NULL, 0);
    int64_t rev = 0;
    ASSERT_OK(cache_txn(t->c, &op, 1, &rev));
    ck_assert_int_gt(rev, 0);
    ASSERT_ABSENT(CGET("k"));
    ASSERT_ABSENT(SGET("k"));
    t_finish(t);
}
END_TEST

static void put_four(tctx_t *t)
{
    put_ok(t, "foo/bar", "1");
    put_ok(t, "foo/baz", "2");
    put_ok(t, "bar/foo", "3");
    put_ok(t, "bar/baz", "4");
}

static void assert_only_foo(tctx_t *t)
{
    kvlist_t l;
    ASSERT_OK(cache_list(t->c, t->pfx, t->pfxlen, &l));
    ck_assert_uint_eq(l.n, 2);
    ck_assert_str_eq((char *)l.v[0].key, tkey(t, "foo/bar"));
    ck_assert_str_eq((char *)l.v[1].key, tkey(t, "foo/baz"));
    kvl_free(&l);
    assert_same(t);
}

/* 13: delete by prefix. */
START_TEST(test_b1_delete_prefix)
{
    TINIT(0);
    t_start(t);
    put_four(t);
    int64_t deleted = 0, rev = 0;
    ASSERT_OK(cache_delete_prefix(t->c, KEY("bar/"), &deleted, &rev));
    ck_assert_int_eq(deleted, 2);
    ck_assert_int_eq(rev, store_rev(t));
    ASSERT_ABSENT(CGET("bar/foo"));
    ASSERT_ABSENT(CGET("bar/baz"));
    assert_only_foo(t);
    t_finish(t);
}
END_TEST

/* 14: delete by prefix inside a transaction. */
START_TEST(test_b1_delete_prefix_txn)
{
    TINIT(0);
    t_start(t);
    put_four(t);
    cache_txn_op_t op = txop(CACHE_TXN_DELETE_PREFIX, KEY("bar/"), NULL, 0);
    int64_t rev = 0;
    ASSERT_OK(cache_txn(t->c, &op, 1, &rev));
    ASSERT_ABSENT(CGET("bar/foo"));
    ASSERT_ABSENT(CGET("bar/baz"));
    assert_only_foo(t);
    t_finish(t);
}
END_TEST

/* 15: delete_value with the right mod revision; 0 expects absence. */
START_TEST(test_b1_delete_value_ok)
{
    TINIT(0);
    t_start(t);
    int64_t r1 = put_ok(t, "k", "v");
    int64_t rev = 0;
    ASSERT_OK(cache_delete_value(t->c, KEY("k"), r1, &rev));
    ck_assert_int_gt(rev, r1);
    ASSERT_ABSENT(CGET("k"));
    ASSERT_ABSENT(SGET("k"));
    /* An absent key expected absent: fine; expected present: conflict. */
    ASSERT_OK(cache_delete_value(t->c, KEY("absent"), 0, &rev));
    ASSERT_RC(cache_delete_value(t->c, KEY("absent"), 5, &rev),
              COALESCE_ECONFLICT);
    t_finish(t);
}
END_TEST

/* 16: delete_value with an old mod revision fails; nothing changes. */
START_TEST(test_b1_delete_value_fail)
{
    TINIT(0);
    t_start(t);
    int64_t r1 = put_ok(t, "k", "v1");
    int64_t r2 = ext_put(t, "k", "v2");
    int64_t rev = 0;
    ASSERT_RC(cache_delete_value(t->c, KEY("k"), r1, &rev), COALESCE_ECONFLICT);
    ck_assert_int_eq(rev, r2);
    fresh(t, r2);
    got_t g = CGET("k");
    ASSERT_VAL(g, "v2");
    ck_assert_int_eq(g.meta.version, 2);
    ASSERT_VAL(SGET("k"), "v2");
    /* And through the cache's own put. */
    int64_t r3 = put_ok(t, "k", "v3");
    ASSERT_RC(cache_delete_value(t->c, KEY("k"), r2, &rev), COALESCE_ECONFLICT);
    ck_assert_int_eq(rev, r3);
    ASSERT_VAL(CGET("k"), "v3");
    t_finish(t);
}
END_TEST

/* 17: delete_value inside a transaction. */
START_TEST(test_b1_delete_value_txn)
{
    TINIT(0);
    t_start(t);
    int64_t r1 = put_ok(t, "k", "v");
    cache_txn_op_t op = txop(CACHE_TXN_DELETE_VALUE, KEY("k"), NULL, r1 + 7);
    int64_t rev = 0;
    ASSERT_RC(cache_txn(t->c, &op, 1, &rev), COALESCE_ECONFLICT);
    ASSERT_VAL(CGET("k"), "v");
    op.expect = r1;
    ASSERT_OK(cache_txn(t->c, &op, 1, &rev));
    ASSERT_ABSENT(CGET("k"));
    ASSERT_ABSENT(SGET("k"));
    t_finish(t);
}
END_TEST

/* =========================================================================
 * §B.2: the reference's ordering tests, through the public API
 * ========================================================================= */

/* 1: a write-through put lands after the watch delivered a newer delete:
 * no resurrection (the W guard: the key's entry is gone). */
START_TEST(test_b2_stale_put_after_watch_delete)
{
    TINIT(T_WRAP);
    t_start(t);
    int64_t r0 = ext_put(t, "foo", "old");
    fresh(t, r0);
    async_op_t a;
    async_gated(&a, t, A_PUT, "foo", "stale");
    int64_t r2 = ext_del(t, "foo");
    fresh(t, r2);
    ASSERT_ABSENT(CGET("foo"));
    wrap_set(t->w, &t->w->txn_gate, 0);
    async_join(&a);
    ASSERT_OK(a.rc);
    ck_assert_int_eq(a.rev, r2 - 1);
    ASSERT_ABSENT(CGET("foo"));
    cache_health_t h = HEALTH();
    ck_assert_uint_eq(h.entries, 0);
    ck_assert_uint_eq(h.tombstones, 0);
    assert_same(t);
    t_finish(t);
}
END_TEST

/* 2: a write-through delete lands after the watch delivered a newer put:
 * the value stays (no stale erase). */
START_TEST(test_b2_stale_delete_after_watch_put)
{
    TINIT(T_WRAP);
    t_start(t);
    int64_t r0 = put_ok(t, "foo", "old");
    fresh(t, r0);
    async_op_t a;
    async_gated(&a, t, A_DELETE, "foo", NULL);
    int64_t r2 = ext_put(t, "foo", "new");
    fresh(t, r2);
    wrap_set(t->w, &t->w->txn_gate, 0);
    async_join(&a);
    ASSERT_OK(a.rc);
    ck_assert_int_eq(a.deleted, 1);
    ck_assert_int_eq(a.rev, r2 - 1);
    got_t g = CGET("foo");
    ASSERT_VAL(g, "new");
    ck_assert_int_eq(g.meta.mod_rev, r2);
    ck_assert_int_eq(g.meta.create_rev, r2);
    ck_assert_int_eq(g.meta.version, 1);
    assert_same(t);
    t_finish(t);
}
END_TEST

/* 3: a write-through delete leaves a tombstone that blocks the watch's
 * older put of the same key. */
START_TEST(test_b2_tombstone_blocks_stale_put)
{
    TINIT(T_WRAP);
    t_start(t);
    wrap_pause(t->w, HEALTH().watch_rev);
    int64_t r1 = ext_put(t, "foo", "old");
    int64_t r2 = del_ok(t, "foo", 1);
    ASSERT_ABSENT(CGET("foo"));
    ck_assert_uint_eq(HEALTH().tombstones, 1);
    wrap_pause(t->w, r1); /* the put reaches the cache, the delete not */
    fresh(t, r1);
    ASSERT_ABSENT(CGET("foo"));
    cache_health_t h = HEALTH();
    ck_assert_int_eq(h.watch_rev, r1);
    ck_assert_uint_eq(h.tombstones, 1);
    ck_assert_uint_eq(h.entries, 0);
    wrap_pause(t->w, -1);
    fresh(t, r2);
    ASSERT_ABSENT(CGET("foo"));
    ck_assert_uint_eq(HEALTH().tombstones, 0);
    t_finish(t);
}
END_TEST

/* 4: a tombstone does not block a newer put (the watch delivers the delete
 * and the re-create in one catch-up batch). */
START_TEST(test_b2_tombstone_allows_newer_put)
{
    TINIT(0);
    t_start(t);
    int64_t r1 = put_ok(t, "foo", "old");
    fresh(t, r1);
    hold(t, 1);
    del_ok(t, "foo", 1);
    int64_t r3 = ext_put(t, "foo", "recreated");
    ASSERT_ABSENT(CGET("foo"));
    ck_assert_uint_eq(HEALTH().tombstones, 1);
    flush(t, CACHE_FLUSH_BATCH);
    fresh(t, r3);
    got_t g = CGET("foo");
    ASSERT_VAL(g, "recreated");
    ck_assert_int_eq(g.meta.mod_rev, r3);
    ck_assert_int_eq(g.meta.create_rev, r3);
    ck_assert_int_eq(g.meta.version, 1);
    ck_assert_uint_eq(HEALTH().tombstones, 0);
    hold(t, 0);
    assert_same(t);
    t_finish(t);
}
END_TEST

/* 5: a write-through delete is seen at once with one tombstone; the watch's
 * echo of it removes the tombstone. */
START_TEST(test_b2_delete_then_watch_event)
{
    TINIT(T_WRAP);
    t_start(t);
    int64_t r1 = put_ok(t, "foo", "v");
    fresh(t, r1);
    wrap_pause(t->w, r1);
    int64_t r2 = del_ok(t, "foo", 1);
    ASSERT_ABSENT(CGET("foo"));
    cache_health_t h = HEALTH();
    ck_assert_uint_eq(h.tombstones, 1);
    ck_assert_int_eq(h.watch_rev, r1);
    wrap_pause(t->w, -1);
    fresh(t, r2);
    ASSERT_ABSENT(CGET("foo"));
    ck_assert_uint_eq(HEALTH().tombstones, 0);
    t_finish(t);
}
END_TEST

/* =========================================================================
 * §B.4: the tests the reference lacks
 * ========================================================================= */

/* X1: a catch-up batch with two puts of one key keeps the newer one (each
 * event stamped with its own mod revision, not the batch's). */
START_TEST(test_x1_catch_up_batch)
{
    TINIT(0);
    t_start(t);
    hold(t, 1);
    int64_t r1 = ext_put(t, "k", "v1");
    int64_t r2 = ext_put(t, "k", "v2");
    int64_t r3 = ext_put(t, "other", "x");
    flush(t, CACHE_FLUSH_BATCH);
    fresh(t, r3);
    got_t g = CGET("k");
    ASSERT_VAL(g, "v2");
    ck_assert_int_eq(g.meta.mod_rev, r2);
    ck_assert_int_eq(g.meta.create_rev, r1);
    ck_assert_int_eq(g.meta.version, 2);
    ck_assert_int_eq(CGET("other").meta.mod_rev, r3);
    /* A write-through newer than the batch's first put, applied before the
     * batch arrives, is not overwritten by it. */
    int64_t r4 = ext_put(t, "j", "j1");
    int64_t r5 = put_ok(t, "j", "j2");
    g = CGET("j");
    ASSERT_VAL(g, "j2");
    ck_assert_int_eq(g.meta.mod_rev, r5);
    ck_assert_int_eq(g.meta.create_rev, r4);
    ck_assert_int_eq(g.meta.version, 2);
    int64_t r6 = ext_put(t, "other", "y");
    flush(t, CACHE_FLUSH_BATCH);
    fresh(t, r6);
    g = CGET("j");
    ASSERT_VAL(g, "j2");
    ck_assert_int_eq(g.meta.mod_rev, r5);
    ck_assert_int_eq(g.meta.version, 2);
    hold(t, 0);
    /* No livelock: the mod revision read works as a precondition. */
    int64_t rev = 0;
    ASSERT_OK(cache_update(t->c, KEY("j"), STR("j3"), r5, NULL, &rev));
    ASSERT_OK(cache_update(t->c, KEY("k"), STR("v3"), r2, NULL, &rev));
    assert_same(t);
    t_finish(t);
}
END_TEST

/* X1b: a catch-up batch delivered in parts, each stamped with the store's
 * revision past its events (etcd's partial batches): W follows the events
 * applied, never the header. */
START_TEST(test_x1_partial_batch_header)
{
    TINIT(T_WRAP);
    t_start(t);
    hold(t, 1);
    int64_t r1 = ext_put(t, "a", "1");
    ext_put(t, "b", "2");
    int64_t r3 = ext_put(t, "c", "3");
    ext_put_outside(t, "x");
    wrap_set(t->w, &t->w->keep_header, 1);
    wrap_pause(t->w, r1);
    flush(t, CACHE_FLUSH_BATCH);
    fresh(t, r1);
    ck_assert(wrap_wait(t->w, &t->w->paused, 1, WAIT_MS));
    ck_assert_int_eq(HEALTH().watch_rev, r1);
    ASSERT_RC(cache_wait_fresh(t->c, r3, 0), COALESCE_ETIMEDOUT);
    ASSERT_VAL(CGET("a"), "1");
    ASSERT_ABSENT(CGET("c"));
    wrap_pause(t->w, -1);
    fresh(t, r3);
    ASSERT_VAL(CGET("c"), "3");
    hold(t, 0);
    assert_same(t);
    t_finish(t);
}
END_TEST

/* X2a: W is R0 after loading an empty prefix. */
START_TEST(test_x2_empty_load_sets_w)
{
    TINIT(0);
    ext_put(t, "k", "deleted before the load");
    ext_del(t, "k");
    int64_t r0 = ext_put_outside(t, "x");
    t_start(t);
    cache_health_t h = HEALTH();
    ck_assert_int_eq(h.watch_rev, r0);
    ck_assert_uint_eq(h.entries, 0);
    ASSERT_OK(cache_wait_fresh(t->c, r0, 0));
    ASSERT_ABSENT(CGET("k"));
    t_finish(t);
}
END_TEST

/* X2b: a write-through of a key deleted before the (re)load of an empty
 * prefix lands after it: W = R1 keeps it out. */
START_TEST(test_x2_delayed_write_through_after_empty_relist)
{
    TINIT(T_WRAP);
    t_start(t);
    hold(t, 1);
    async_op_t a;
    async_gated(&a, t, A_PUT, "k", "stale");
    int64_t r2 = ext_del(t, "k");
    wrap_set(t->w, &t->w->watch_gate, 1);
    cut(t, COALESCE_EIO);
    ck_assert(wrap_wait(t->w, &t->w->watch_blocked, 1, WAIT_MS));
    ASSERT_OK(cache_memstore_compact(t->inner, r2));
    hold(t, 0);
    wrap_set(t->w, &t->w->watch_gate, 0);
    ck_assert(replog_wait(&t->log, CACHE_REPORT_RELISTED, 1, WAIT_MS));
    fresh(t, r2);
    ck_assert_int_ge(HEALTH().watch_rev, r2);
    wrap_set(t->w, &t->w->txn_gate, 0);
    async_join(&a);
    ASSERT_OK(a.rc);
    ck_assert_int_eq(a.rev, r2 - 1);
    ASSERT_ABSENT(CGET("k"));
    ck_assert_uint_eq(HEALTH().entries, 0);
    assert_same(t);
    t_finish(t);
}
END_TEST

/* X2c: the same across a stop and a start: the write-through was sent
 * before the stop, lands after the reload of the (now empty) prefix. */
START_TEST(test_x2_delayed_write_through_after_empty_load)
{
    TINIT(T_WRAP);
    t_start(t);
    async_op_t a;
    async_gated(&a, t, A_PUT, "k", "stale");
    int64_t r2 = ext_del(t, "k");
    cache_stop(t->c);
    ASSERT_OK(cache_start(t->c));
    ck_assert_int_eq(HEALTH().watch_rev, r2);
    ck_assert_uint_eq(HEALTH().entries, 0);
    wrap_set(t->w, &t->w->txn_gate, 0);
    async_join(&a);
    ck_assert_msg(a.rc == 0 || a.rc == COALESCE_ENOTSTARTED, "%s",
                  coalesce_err_name(a.rc));
    ASSERT_ABSENT(CGET("k"));
    ck_assert_uint_eq(HEALTH().entries, 0);
    assert_same(t);
    t_finish(t);
}
END_TEST

/* X3: delete_prefix while an older put of a key the cache has not seen is
 * still on its way: the key never shows up (range tombstone). */
START_TEST(test_x3_delete_prefix_blocks_unseen_put)
{
    TINIT(T_WRAP);
    t_start(t);
    wrap_pause(t->w, HEALTH().watch_rev);
    int64_t r1 = ext_put(t, "q/x", "unseen");
    int64_t deleted = 0, r2 = 0;
    ASSERT_OK(cache_delete_prefix(t->c, KEY("q/"), &deleted, &r2));
    ck_assert_int_eq(deleted, 1);
    ck_assert_int_gt(r2, r1);
    ASSERT_ABSENT(CGET("q/x"));
    ck_assert_uint_ge(HEALTH().range_tombstones, 1);
    wrap_pause(t->w, r1);
    fresh(t, r1);
    ASSERT_ABSENT(CGET("q/x"));
    kvlist_t l;
    ASSERT_OK(cache_list(t->c, KEY("q/"), &l));
    ck_assert_uint_eq(l.n, 0);
    kvl_free(&l);
    ck_assert_int_eq(HEALTH().watch_rev, r1);
    wrap_pause(t->w, -1);
    fresh(t, r2);
    ASSERT_ABSENT(CGET("q/x"));
    cache_health_t h = HEALTH();
    ck_assert_uint_eq(h.range_tombstones, 0);
    ck_assert_uint_eq(h.tombstones, 0);
    assert_same(t);
    t_finish(t);
}
END_TEST

typedef struct watcher {
    cache_t *c;
    const char *key;
    size_t keylen;
    atomic_int stop;
    long reads, visible, errors;
} watcher_t;

static void *watcher_main(void *p)
{
    watcher_t *w = p;
    while (!atomic_load(&w->stop)) {
        got_t g = cget_b(w->c, w->key, w->keylen);
        w->reads++;
        if (g.rc == 0)
            w->visible++;
        else if (g.rc != COALESCE_ENOENT)
            w->errors++;
    }
    return NULL;
}

/* X3 with the memstore's hold: a reader never sees the key while the held
 * responses are flushed one revision each. */
START_TEST(test_x3_delete_prefix_held_reader)
{
    TINIT(0);
    t_start(t);
    hold(t, 1);
    ext_put(t, "q/x", "unseen");
    ext_put(t, "q/y", "unseen");
    int64_t deleted = 0, r2 = 0;
    ASSERT_OK(cache_delete_prefix(t->c, KEY("q/"), &deleted, &r2));
    ck_assert_int_eq(deleted, 2);
    watcher_t w;
    memset(&w, 0, sizeof(w));
    w.c = t->c;
    w.key = tkey(t, "q/y");
    w.keylen = strlen(w.key);
    atomic_init(&w.stop, 0);
    pthread_t th;
    ck_assert_int_eq(pthread_create(&th, NULL, watcher_main, &w), 0);
    flush(t, CACHE_FLUSH_EACH);
    fresh(t, r2);
    atomic_store(&w.stop, 1);
    pthread_join(th, NULL);
    ck_assert_int_eq(w.visible, 0);
    ck_assert_int_eq(w.errors, 0);
    ASSERT_ABSENT(CGET("q/x"));
    hold(t, 0);
    assert_same(t);
    t_finish(t);
}
END_TEST

/* X4: delete_prefix deletes exactly the keys starting with the bytes given
 * ("/q/a" covers "/q/ab"), in the cache as in the store. */
START_TEST(test_x4_delete_prefix_exact_bytes)
{
    TINIT(0);
    t_start(t);
    put_ok(t, "q/a", "1");
    put_ok(t, "q/ab", "2");
    put_ok(t, "q/a/c", "3");
    put_ok(t, "q/b", "4");
    put_ok(t, "q/", "5");
    int64_t deleted = 0, rev = 0;
    ASSERT_OK(cache_delete_prefix(t->c, KEY("q/a"), &deleted, &rev));
    ck_assert_int_eq(deleted, 3);
    ASSERT_ABSENT(CGET("q/a"));
    ASSERT_ABSENT(CGET("q/ab"));
    ASSERT_ABSENT(CGET("q/a/c"));
    ASSERT_ABSENT(SGET("q/ab"));
    ASSERT_VAL(CGET("q/b"), "4");
    ASSERT_VAL(CGET("q/"), "5");
    assert_same(t);
    /* Once the watch passed it, still the same. */
    fresh(t, rev);
    ck_assert_uint_eq(HEALTH().range_tombstones, 0);
    assert_same(t);
    t_finish(t);
}
END_TEST

/* X5: the watch is cut, writes and a compaction happen, the resume finds
 * its revision compacted: relist, report, state equals the store. */
static void x5_compaction_relist(int _i, int legacy)
{
    TINIT(T_WRAP);
    t->w->legacy_erange = legacy;
    ext_put(t, "a", "a1");
    ext_put(t, "gone", "g");
    ext_put(t, "same", "s");
    t_start(t);
    wrap_set(t->w, &t->w->watch_gate, 1);
    cut(t, COALESCE_EIO);
    ck_assert(wrap_wait(t->w, &t->w->watch_blocked, 1, WAIT_MS));
    ck_assert(replog_wait(&t->log, CACHE_REPORT_DISCONNECTED, 1, WAIT_MS));
    ck_assert_int_eq(HEALTH().state, CACHE_RECONNECTING);
    ext_put(t, "a", "a2");
    ext_del(t, "gone");
    int64_t r = ext_put(t, "c", "c1");
    ASSERT_OK(cache_memstore_compact(t->inner, r));
    /* Until it knows, the old copy is served. */
    ASSERT_VAL(CGET("a"), "a1");
    ASSERT_VAL(CGET("gone"), "g");
    wrap_set(t->w, &t->w->watch_gate, 0);
    ck_assert(replog_wait(&t->log, CACHE_REPORT_RELISTED, 1, WAIT_MS));
    pthread_mutex_lock(&t->log.mu);
    int64_t r1 = t->log.rev[CACHE_REPORT_RELISTED];
    pthread_mutex_unlock(&t->log.mu);
    ck_assert_int_ge(r1, r);
    fresh(t, r1);
    ASSERT_VAL(CGET("a"), "a2");
    ASSERT_ABSENT(CGET("gone"));
    ASSERT_VAL(CGET("c"), "c1");
    assert_same(t);
    ck_assert_uint_eq(HEALTH().relists, 1);
    WAIT_HEALTH(t->c, hw_.state == CACHE_RUNNING);
    /* And the new watch works. */
    int64_t r2 = ext_put(t, "after", "x");
    fresh(t, r2);
    ASSERT_VAL(CGET("after"), "x");
    t_finish(t);
}

START_TEST(test_x5_compaction_relist)
{
    x5_compaction_relist(_i, 0);
}
END_TEST

/* The same with a store written for 0.4, whose compaction code was
 * COALESCE_ERANGE: the cache still relists. */
START_TEST(test_x5_compaction_relist_legacy_erange)
{
    x5_compaction_relist(_i, 1);
}
END_TEST

/* X5b: while relisting, reads serve the old copy; a write-through newer
 * than the relist's revision survives the swap. */
START_TEST(test_x5_relist_keeps_newer_write_through)
{
    TINIT(T_WRAP);
    ext_put(t, "a", "a1");
    t_start(t);
    wrap_set(t->w, &t->w->watch_gate, 1);
    cut(t, COALESCE_EIO);
    ck_assert(wrap_wait(t->w, &t->w->watch_blocked, 1, WAIT_MS));
    ext_put(t, "a", "a2");
    int64_t r = ext_put(t, "b", "b1");
    ASSERT_OK(cache_memstore_compact(t->inner, r));
    wrap_set(t->w, &t->w->range_gate, 1);
    hold(t, 1);
    wrap_set(t->w, &t->w->watch_gate, 0);
    ck_assert(wrap_wait(t->w, &t->w->range_blocked, 1, WAIT_MS));
    ck_assert_int_eq(HEALTH().state, CACHE_RELISTING);
    ASSERT_VAL(CGET("a"), "a1");
    ASSERT_ABSENT(CGET("b"));
    int64_t rd = put_ok(t, "d", "d1");
    ck_assert_int_gt(rd, r);
    ASSERT_VAL(CGET("d"), "d1");
    wrap_set(t->w, &t->w->range_gate, 0);
    ck_assert(replog_wait(&t->log, CACHE_REPORT_RELISTED, 1, WAIT_MS));
    pthread_mutex_lock(&t->log.mu);
    int64_t r1 = t->log.rev[CACHE_REPORT_RELISTED];
    pthread_mutex_unlock(&t->log.mu);
    ck_assert_int_eq(r1, r);
    fresh(t, r1);
    /* The watch from r1 + 1 is held: d is there because it was kept. */
    got_t g = CGET("d");
    ASSERT_VAL(g, "d1");
    ck_assert_int_eq(g.meta.mod_rev, rd);
    ASSERT_VAL(CGET("a"), "a2");
    ASSERT_VAL(CGET("b"), "b1");
    hold(t, 0);
    assert_same(t);
    t_finish(t);
}
END_TEST

/* X5c: a prefix delete written through while a relist is in progress
 * still hides the keys the relist listed before it (range tombstone kept
 * across the swap must apply to the new copy's older entries). */
START_TEST(test_x5_relist_keeps_prefix_delete)
{
    TINIT(T_WRAP);
    ext_put(t, "g/seen", "1");
    t_start(t);
    wrap_set(t->w, &t->w->watch_gate, 1);
    cut(t, COALESCE_EIO);
    ck_assert(wrap_wait(t->w, &t->w->watch_blocked, 1, WAIT_MS));
    ext_put(t, "g/unseen", "2"); /* the cache never saw it */
    int64_t r = ext_put(t, "other", "3");
    ASSERT_OK(cache_memstore_compact(t->inner, r));
    wrap_set(t->w, &t->w->range_gate, 1);
    hold(t, 1);
    wrap_set(t->w, &t->w->watch_gate, 0);
    /* The relist read the store at r (g/unseen included) and waits. */
    ck_assert(wrap_wait(t->w, &t->w->range_blocked, 1, WAIT_MS));
    int64_t deleted = 0, rd = 0;
    ASSERT_OK(cache_delete_prefix(t->c, KEY("g/"), &deleted, &rd));
    ck_assert_int_eq(deleted, 2);
    ASSERT_ABSENT(CGET("g/seen"));
    ASSERT_ABSENT(CGET("g/unseen"));
    wrap_set(t->w, &t->w->range_gate, 0);
    ck_assert(replog_wait(&t->log, CACHE_REPORT_RELISTED, 1, WAIT_MS));
    fresh(t, r);
    /* The watch from r + 1 is held: only the kept tombstones decide. */
    ASSERT_ABSENT(CGET("g/seen"));
    ASSERT_ABSENT(CGET("g/unseen"));
    kvlist_t l;
    ASSERT_OK(cache_list(t->c, KEY("g/"), &l));
    ck_assert_uint_eq(l.n, 0);
    kvl_free(&l);
    ASSERT_VAL(CGET("other"), "3");
    hold(t, 0);
    fresh(t, rd);
    assert_same(t);
    t_finish(t);
}
END_TEST

/* X6: a cut watch resumes from the last applied revision + 1: nothing lost,
 * nothing applied twice. */
START_TEST(test_x6_resume_after_cut)
{
    TINIT(T_WRAP);
    t_start(t);
    int64_t r0 = ext_put(t, "x", "0");
    fresh(t, r0);
    cache_health_t h0 = HEALTH();
    ck_assert_int_eq(h0.watch_rev, r0);
    hold(t, 1);
    ext_put(t, "a", "1");
    ext_put(t, "b", "2");
    int64_t r3 = ext_put(t, "a", "3");
    wrap_lock(t->w);
    int n0 = t->w->nstarts;
    wrap_unlock(t->w);
    cut(t, COALESCE_EIO);
    hold(t, 0);
    fresh(t, r3);
    ck_assert(replog_wait(&t->log, CACHE_REPORT_DISCONNECTED, 1, WAIT_MS));
    wrap_lock(t->w);
    int n1 = t->w->nstarts;
    int64_t start = t->w->starts[n0];
    wrap_unlock(t->w);
    ck_assert_int_eq(n1, n0 + 1);
    ck_assert_int_eq(start, r0 + 1);
    WAIT_HEALTH(t->c, hw_.reconnects >= h0.reconnects + 1);
    cache_health_t h = HEALTH();
    ck_assert_uint_eq(h.events, h0.events + 3);
    ck_assert_uint_eq(h.reconnects, h0.reconnects + 1);
    ck_assert_int_eq(h.last_error, COALESCE_EIO);
    pthread_mutex_lock(&t->log.mu);
    int code = t->log.code[CACHE_REPORT_DISCONNECTED];
    pthread_mutex_unlock(&t->log.mu);
    ck_assert_int_eq(code, COALESCE_EIO);
    got_t g = CGET("a");
    ASSERT_VAL(g, "3");
    ck_assert_int_eq(g.meta.version, 2);
    ASSERT_VAL(CGET("b"), "2");
    assert_same(t);
    t_finish(t);
}
END_TEST

/* X7: a put on an absent key has version 1 (also after a delete), and its
 * mod revision works as an update precondition. */
START_TEST(test_x7_put_absent_version_one)
{
    TINIT(0);
    t_start(t);
    put_ok(t, "k", "a");
    put_ok(t, "k", "b");
    ck_assert_int_eq(CGET("k").meta.version, 2);
    del_ok(t, "k", 1);
    int64_t r = put_ok(t, "k", "c");
    got_t g = CGET("k");
    ASSERT_VAL(g, "c");
    ck_assert_int_eq(g.meta.version, 1);
    ck_assert_int_eq(g.meta.create_rev, r);
    ck_assert_int_eq(g.meta.mod_rev, r);
    int64_t rev = 0;
    ASSERT_OK(cache_update(t->c, KEY("k"), STR("d"), r, NULL, &rev));
    g = CGET("k");
    ck_assert_int_eq(g.meta.version, 2);
    ck_assert_int_eq(g.meta.create_rev, r);
    /* Deleted by another writer, put again by us: version 1. */
    fresh(t, ext_del(t, "k"));
    r = put_ok(t, "k", "e");
    g = CGET("k");
    ck_assert_int_eq(g.meta.version, 1);
    ck_assert_int_eq(g.meta.create_rev, r);
    assert_same(t);
    t_finish(t);
}
END_TEST

/* X8: data the store cannot decode is reported; the cache recovers and
 * skips nothing. */
START_TEST(test_x8_decode_error_reported)
{
    TINIT(0);
    t_start(t);
    hold(t, 1);
    int64_t r = ext_put(t, "k", "v");
    cut(t, COALESCE_EDECODE);
    hold(t, 0);
    ck_assert(replog_wait(&t->log, CACHE_REPORT_DECODE, 1, WAIT_MS));
    pthread_mutex_lock(&t->log.mu);
    int code = t->log.code[CACHE_REPORT_DECODE];
    pthread_mutex_unlock(&t->log.mu);
    ck_assert_int_eq(code, COALESCE_EDECODE);
    fresh(t, r);
    ASSERT_VAL(CGET("k"), "v");
    ck_assert_int_eq(HEALTH().last_error, COALESCE_EDECODE);
    assert_same(t);
    t_finish(t);
}
END_TEST

/* X9: a transaction of three operations is seen all or none. */
typedef struct x9 {
    tctx_t *t;
    atomic_int done;
    long scans, partial, bad_rc, both;
    char msg[256];
} x9_t;

static int x9_scan_cb(void *data,
                      const void *key,
                      size_t keylen,
                      coalesce_buf_t *value,
                      const cache_meta_t *meta)
{
    (void)key;
    (void)keylen;
    (void)meta;
    char(*vals)[32] = data;
    const char *k = key;
    char last = k[keylen - 1];
    if (last >= 'a' && last <= 'c') {
        size_t n = coalesce_buf_len(value);
        n = n < 31 ? n : 31;
        memcpy(vals[last - 'a'], coalesce_buf_data(value), n);
        vals[last - 'a'][n] = 0;
    }
    return 0;
}

static void *x9_reader(void *p)
{
    x9_t *x = p;
    tctx_t *t = x->t;
    const char *pfx = tkey(t, "x9/");
    size_t len = strlen(pfx);
    while (!atomic_load(&x->done)) {
        char vals[3][32] = {{0}, {0}, {0}};
        int rc = cache_scan(t->c, pfx, len, x9_scan_cb, vals);
        x->scans++;
        /* Valgrind runs one thread at a time: let the writer run. */
        sched_yield();
        if (rc != 0) {
            x->bad_rc++;
            continue;
        }
        int present = (vals[0][0] != 0) + (vals[1][0] != 0) + (vals[2][0] != 0);
        if (present == 3 && strcmp(vals[0], vals[1]) == 0 &&
            strcmp(vals[1], vals[2]) == 0) {
            x->both++;
            continue;
        }
        if (present == 0)
            continue;
        if (x->partial++ == 0)
            snprintf(x->msg, sizeof(x->msg), "a=\"%s\" b=\"%s\" c=\"%s\"",
                     vals[0], vals[1], vals[2]);
    }
    return NULL;
}

START_TEST(test_x9_txn_all_or_none)
{
    TINIT(0);
    t_start(t);
    x9_t x;
    memset(&x, 0, sizeof(x));
    x.t = t;
    atomic_init(&x.done, 0);
    pthread_t th;
    ck_assert_int_eq(pthread_create(&th, NULL, x9_reader, &x), 0);
    char ka[3][128];
    for (int k = 0; k < 3; k++)
        snprintf(ka[k], sizeof(ka[k]), "%sx9/%c", t->pfx, 'a' + k);
    int64_t last = 0;
    for (int i = 1; i <= 300; i++) {
        char v[32];
        snprintf(v, sizeof(v), "%d", i);
        if (i % 3 == 0) {
            /* The cache's own txn: delete all three. */
            cache_txn_op_t ops[3];
            for (int k = 0; k < 3; k++)
                ops[k] = txop(CACHE_TXN_DELETE, ka[k], strlen(ka[k]), NULL, 0);
            ASSERT_OK(cache_txn(t->c, ops, 3, &last));
        } else if (i % 3 == 1) {
            cache_txn_op_t ops[3];
            for (int k = 0; k < 3; k++)
                ops[k] = txop(CACHE_TXN_PUT, ka[k], strlen(ka[k]), v, 0);
            ASSERT_OK(cache_txn(t->c, ops, 3, &last));
        } else {
            /* Another writer's txn, seen through the watch. */
            cache_op_t ops[3];
            memset(ops, 0, sizeof(ops));
            for (int k = 0; k < 3; k++) {
                ops[k].type = CACHE_OP_PUT;
                ops[k].key = ka[k];
                ops[k].keylen = strlen(ka[k]);
                ops[k].value = v;
                ops[k].vallen = strlen(v);
            }
            last = ext_txn(t, ops, 3);
        }
    }
    fresh(t, last);
    atomic_store(&x.done, 1);
    pthread_join(th, NULL);
    ck_assert_msg(x.partial == 0, "%ld of %ld scans saw part of a txn: %s",
                  x.partial, x.scans, x.msg);
    ck_assert_int_eq(x.bad_rc, 0);
    assert_same(t);
    t_finish(t);
}
END_TEST

/* X10: keys outside the prefix are refused before the store is contacted;
 * reads outside it too. */
START_TEST(test_x10_outside_prefix)
{
    TINIT(T_WRAP);
    t_start(t);
    put_ok(t, "in", "v");
    const char *out = "/elsewhere/k";
    /* The prefix without its last byte covers keys outside the cache. */
    size_t shortlen = t->pfxlen - 1;
    int64_t rev0 = store_rev(t);
    long txns0 = wrap_get(t->w, &t->w->txn_calls);
    long grants0 = wrap_get(t->w, &t->w->grants);
    cache_put_opts_t ttl = {.ttl_ms = 60000};
    int64_t rev = 0, deleted = 0;
    ASSERT_RC(cache_put(t->c, STR(out), STR("v"), NULL, &rev), COALESCE_EINVAL);
    ASSERT_RC(cache_put(t->c, STR(out), STR("v"), &ttl, &rev), COALESCE_EINVAL);
    ASSERT_RC(cache_create(t->c, STR(out), STR("v"), &ttl, &rev),
              COALESCE_EINVAL);
    ASSERT_RC(cache_update(t->c, STR(out), STR("v"), 1, NULL, &rev),
              COALESCE_EINVAL);
    ASSERT_RC(cache_delete(t->c, STR(out), &deleted, &rev), COALESCE_EINVAL);
    ASSERT_RC(cache_delete_value(t->c, STR(out), 1, &rev), COALESCE_EINVAL);
    ASSERT_RC(cache_delete_prefix(t->c, STR("/elsewhere/"), &deleted, &rev),
              COALESCE_EINVAL);
    ASSERT_RC(cache_delete_prefix(t->c, t->pfx, shortlen, &deleted, &rev),
              COALESCE_EINVAL);
    ASSERT_RC(cache_put(t->c, t->pfx, shortlen, STR("v"), NULL, &rev),
              COALESCE_EINVAL);
    ASSERT_RC(cache_put(t->c, "", 0, STR("v"), NULL, &rev), COALESCE_EINVAL);
    ASSERT_RC(cache_put(t->c, NULL, 5, STR("v"), NULL, &rev), COALESCE_EINVAL);
    cache_txn_op_t ops[2] = {
        txop(CACHE_TXN_PUT, KEY("in2"), "v", 0),
        txop(CACHE_TXN_PUT, STR(out), "v", 0),
    };
    ops[0].opts = &ttl;
    ASSERT_RC(cache_txn(t->c, ops, 2, &rev), COALESCE_EINVAL);
    ops[1] = txop(CACHE_TXN_DELETE_PREFIX, t->pfx, shortlen, NULL, 0);
    ASSERT_RC(cache_txn(t->c, ops, 2, &rev), COALESCE_EINVAL);
    ck_assert_int_eq(wrap_get(t->w, &t->w->txn_calls), txns0);
    ck_assert_int_eq(wrap_get(t->w, &t->w->grants), grants0);
    ck_assert_int_eq(store_rev(t), rev0);
    ASSERT_ABSENT(CGET("in2"));
    /* Reads. */
    ASSERT_RC(cache_get(t->c, STR(out), NULL, NULL), COALESCE_EINVAL);
    ASSERT_RC(cache_get(t->c, t->pfx, shortlen, NULL, NULL), COALESCE_EINVAL);
    kvlist_t l;
    ASSERT_RC(cache_list(t->c, STR("/elsewhere/"), &l), COALESCE_EINVAL);
    ck_assert_uint_eq(l.n, 0);
    kvl_free(&l);
    /* A prefix of the cache's prefix scans the whole cache. */
    ASSERT_OK(cache_list(t->c, t->pfx, shortlen, &l));
    ck_assert_uint_eq(l.n, 1);
    kvl_free(&l);
    ASSERT_OK(cache_list(t->c, t->pfx, 1, &l));
    ck_assert_uint_eq(l.n, 1);
    kvl_free(&l);
    t_finish(t);
}
END_TEST

/* X11: scans in byte order, bytes >= 0x80 included, and prefixes made of
 * 0xff bytes. */
static const struct {
    const char *b;
    size_t n;
} x11_keys[] = {
    {"b", 1},
    {"\xff\xff\xff", 3},
    {"a\xff", 2},
    {"\x80", 1},
    {"\xff", 1},
    {"\xff\xff", 2},
    {"\x00", 1},
    {"a", 1},
    {"\xff\xff\x00", 3},
    {"\xc3\xa9", 2},
    {"\x7f", 1},
    {"a\x00", 2},
    {"\xff\xfe\xff", 3},
    {"\x01", 1},
    {"\xff\xff\xff\xff", 4},
};
#define X11_N ((int)(sizeof(x11_keys) / sizeof(x11_keys[0])))

static int x11_count(tctx_t *t, const void *sfx, size_t n)
{
    int count = 0;
    for (int i = 0; i < X11_N; i++)
        if (x11_keys[i].n >= n && memcmp(x11_keys[i].b, sfx, n) == 0)
            count++;
    (void)t;
    return count;
}

static void x11_check_scan(tctx_t *t, const void *sfx, size_t n)
{
    kvlist_t l;
    ASSERT_OK(cache_list(t->c, KEYB(sfx, n), &l));
    ck_assert_int_eq((int)l.n, x11_count(t, sfx, n));
    ck_assert_int_eq(l.disorder, 0);
    kvl_free(&l);
    assert_same_under(t, KEYB(sfx, n));
}

START_TEST(test_x11_byte_order)
{
    TINIT(0);
    /* A third before the load, a third through the watch, a third written
     * through the cache. */
    for (int i = 0; i < X11_N; i += 3)
        ext_put_b(t, KEYB(x11_keys[i].b, x11_keys[i].n), STR("load"), 0);
    t_start(t);
    int64_t last = 0;
    for (int i = 1; i < X11_N; i += 3)
        last =
            ext_put_b(t, KEYB(x11_keys[i].b, x11_keys[i].n), STR("watch"), 0);
    for (int i = 2; i < X11_N; i += 3) {
        int64_t rev = 0;
        ASSERT_OK(cache_put(t->c, KEYB(x11_keys[i].b, x11_keys[i].n),
                            STR("write"), NULL, &rev));
    }
    fresh(t, last);
    kvlist_t l;
    ASSERT_OK(cache_list(t->c, t->pfx, t->pfxlen, &l));
    ck_assert_int_eq((int)l.n, X11_N);
    ck_assert_int_eq(l.disorder, 0);
    /* Byte order: unsigned, a shorter key before its extensions. */
    ck_assert_int_eq(memcmp(l.v[0].key + t->pfxlen, "\x00", 1), 0);
    ck_assert_uint_eq(l.v[X11_N - 1].keylen, t->pfxlen + 4);
    kvl_free(&l);
    assert_same(t);
    x11_check_scan(t, "\xff", 1);
    x11_check_scan(t, "\xff\xff", 2);
    x11_check_scan(t, "\xff\xff\xff", 3);
    x11_check_scan(t, "\xff\xff\xff\xff", 4);
    x11_check_scan(t, "a", 1);
    x11_check_scan(t, "\x80", 1);
    x11_check_scan(t, "\x00", 1);
    /* Deleting an all-0xff prefix deletes exactly its keys. */
    int64_t deleted = 0, rev = 0;
    ASSERT_OK(cache_delete_prefix(t->c, KEYB("\xff\xff", 2), &deleted, &rev));
    ck_assert_int_eq(deleted, x11_count(t, "\xff\xff", 2));
    ASSERT_VAL(cget_b(t->c, KEYB("\xff\xfe\xff", 3)), "load");
    assert_same(t);
    ck_assert_int_eq(cget_b(t->c, KEYB("\xff", 1)).rc, 0);
    ASSERT_ABSENT(cget_b(t->c, KEYB("\xff\xff\x00", 3)));
    t_finish(t);
}
END_TEST

/* X11b: a cache whose prefix is all 0xff bytes (its range has no end). */
START_TEST(test_x11_all_ff_cache_prefix)
{
    TINIT(0);
    memcpy(t->pfx, "\xff\xff", 3);
    t->pfxlen = 2;
    ext_put_b(t, "\xff\xff", 2, STR("exact"), 0);
    ext_put_b(t, "\xff\xff\x00", 3, STR("zero"), 0);
    ext_put_b(t, "\xff\xfe\xff", 3, STR("outside"), 0);
    ext_put_b(t, "\xff", 1, STR("outside"), 0);
    t_start(t);
    int64_t r = ext_put_b(t, "\xff\xff\xff\xff", 4, STR("watch"), 0);
    ext_put_b(t, "\xff\xfe", 2, STR("outside"), 0);
    ext_put_b(t, "\xfe\xff\xff", 3, STR("outside"), 0);
    int64_t rev = 0;
    ASSERT_OK(cache_put(t->c, "\xff\xff\x80", 3, STR("write"), NULL, &rev));
    ASSERT_RC(cache_put(t->c, "\xff\xfe\xff", 3, STR("x"), NULL, &rev),
              COALESCE_EINVAL);
    ASSERT_RC(cache_get(t->c, "\xff", 1, NULL, NULL), COALESCE_EINVAL);
    fresh(t, r);
    kvlist_t l;
    ASSERT_OK(cache_list(t->c, t->pfx, t->pfxlen, &l));
    ck_assert_uint_eq(l.n, 4);
    ck_assert_int_eq(l.disorder, 0);
    ck_assert_str_eq((char *)l.v[0].val, "exact");
    ck_assert_str_eq((char *)l.v[1].val, "zero");
    ck_assert_str_eq((char *)l.v[2].val, "write");
    ck_assert_str_eq((char *)l.v[3].val, "watch");
    kvl_free(&l);
    assert_same(t);
    t_finish(t);
}
END_TEST

/* X12: stop while events flow: no watch callback and no report after
 * cache_stop() returns, no watch left; start again reloads cleanly. */
typedef struct flow {
    tctx_t *t;
    atomic_int stop;
    counter_t writes;
    long errors;
    int cutter; /* also cut the watch now and then (hooks) */
} flow_t;

static void *flow_writer(void *p)
{
    flow_t *f = p;
    tctx_t *t = f->t;
    for (long i = 0; !atomic_load(&f->stop) && i < 1000000; i++) {
        char sfx[32], val[32];
        snprintf(sfx, sizeof(sfx), "f/%02ld", i % 32);
        snprintf(val, sizeof(val), "%ld", i);
        cache_op_t op;
        memset(&op, 0, sizeof(op));
        op.type = i % 7 == 6 ? CACHE_OP_DELETE : CACHE_OP_PUT;
        op.key = tkey(t, sfx);
        op.keylen = strlen(op.key);
        op.value = val;
        op.vallen = strlen(val);
        int64_t rev = 0;
        if (i % 3 == 1) {
            /* Through the cache, which may be stopped right now. */
            int rc = op.type == CACHE_OP_PUT
                         ? cache_put(t->c, op.key, op.keylen, op.value,
                                     op.vallen, NULL, &rev)
                         : cache_delete(t->c, op.key, op.keylen, NULL, &rev);
            if (rc != 0 && rc != COALESCE_ENOTSTARTED)
                f->errors++;
        } else if (ext_txn_rc(t->inner, &op, 1, &rev) != 0) {
            f->errors++;
        }
        if (f->cutter && i % 97 == 0 &&
            cache_memstore_cut(t->inner, COALESCE_EIO) != 0)
            f->errors++;
        counter_add(&f->writes, 1);
    }
    return NULL;
}

static long flow_count(flow_t *f)
{
    pthread_mutex_lock(&f->writes.mu);
    long n = f->writes.n;
    pthread_mutex_unlock(&f->writes.mu);
    return n;
}

START_TEST(test_x12_stop_during_flow)
{
    TINIT(T_WRAP);
    t_start(t);
    flow_t f;
    memset(&f, 0, sizeof(f));
    f.t = t;
    f.cutter = has_hooks(t);
    atomic_init(&f.stop, 0);
    counter_init(&f.writes);
    pthread_t th;
    ck_assert_int_eq(pthread_create(&th, NULL, flow_writer, &f), 0);
    for (int round = 0; round < 3; round++) {
        counter_wait(&f.writes, flow_count(&f) + 200);
        int rc = cache_wait_fresh(t->c, store_rev(t), ms_scaled(WAIT_MS));
        ck_assert_msg(rc == 0, "round %d: %s", round, coalesce_err_name(rc));
        cache_stop(t->c);
        wrap_set(t->w, &t->w->stopped, 1);
        replog_set(&t->log, &t->log.stopped, 1);
        ck_assert_int_eq(t->w->live, 0);
        ck_assert_int_eq(HEALTH().state, CACHE_STOPPED);
        ASSERT_RC(CGET("f/01").rc, COALESCE_ENOTSTARTED);
        counter_wait(&f.writes, flow_count(&f) + 200);
        ck_assert_int_eq(wrap_get(t->w, &t->w->late), 0);
        pthread_mutex_lock(&t->log.mu);
        long after = t->log.after_stop;
        pthread_mutex_unlock(&t->log.mu);
        ck_assert_int_eq(after, 0);
        ck_assert_int_eq(t->w->live, 0);
        wrap_set(t->w, &t->w->stopped, 0);
        replog_set(&t->log, &t->log.stopped, 0);
        ASSERT_OK(cache_start(t->c));
    }
    atomic_store(&f.stop, 1);
    pthread_join(th, NULL);
    ck_assert_int_eq(f.errors, 0);
    assert_same(t);
    assert_health_counts(t);
    counter_destroy(&f.writes);
    t_finish(t);
}
END_TEST

/* X13: a failed start leaves the cache stopped, with no watch, and a
 * second start works without a stop: first range, a later page, the
 * watch. */
START_TEST(test_x13_start_failure_then_start)
{
    TINIT(T_WRAP);
    for (int i = 0; i < 5; i++) {
        char sfx[32];
        snprintf(sfx, sizeof(sfx), "k%d", i);
        ext_put(t, sfx, "v");
    }
    t->opts.page_size = 2;
    t->c = t_new_cache(t, &t->opts);
    for (int mode = 0; mode < 3; mode++) {
        wrap_lock(t->w);
        if (mode == 0) {
            t->w->range_fail_n = 1;
            t->w->range_fail_code = COALESCE_EIO;
        } else if (mode == 1) {
            t->w->range_fail_skip = 1; /* the second page fails */
            t->w->range_fail_n = 1;
            t->w->range_fail_code = COALESCE_EBACKEND;
        } else {
            t->w->watch_fail_n = 1;
            t->w->watch_fail_code = COALESCE_EIO;
        }
        wrap_unlock(t->w);
        int rc = cache_start(t->c);
        ck_assert_msg(rc == (mode == 1 ? COALESCE_EBACKEND : COALESCE_EIO),
                      "mode %d: %s", mode, coalesce_err_name(rc));
        cache_health_t h = HEALTH();
        ck_assert_int_eq(h.state, CACHE_STOPPED);
        ck_assert_uint_eq(h.entries, 0);
        ck_assert_int_eq(t->w->live, 0);
        ASSERT_RC(CGET("k0").rc, COALESCE_ENOTSTARTED);
        ASSERT_OK(cache_start(t->c));
        ck_assert_uint_eq(HEALTH().entries, 5);
        ASSERT_VAL(CGET("k4"), "v");
        assert_same(t);
        cache_stop(t->c);
    }
    t_finish(t);
}
END_TEST

/* X13b: the store compacts between two pages of the load: the load starts
 * over at the latest revision instead of failing (R1, R10). */
START_TEST(test_x13_compacted_between_pages)
{
    TINIT(T_WRAP);
    for (int i = 0; i < 5; i++) {
        char sfx[32];
        snprintf(sfx, sizeof(sfx), "k%d", i);
        ext_put(t, sfx, "v");
    }
    t->opts.page_size = 2;
    t->c = t_new_cache(t, &t->opts);
    wrap_set(t->w, &t->w->range_gate, 1);
    async_op_t a;
    async_run(&a, t, A_START, NULL, NULL);
    ck_assert(wrap_wait(t->w, &t->w->range_blocked, 1, WAIT_MS));
    ext_put(t, "k5", "new");
    int64_t r = ext_del(t, "k0");
    ASSERT_OK(t->fx->compact(t->inner, r));
    wrap_set(t->w, &t->w->range_gate, 0);
    async_join(&a);
    ASSERT_OK(a.rc);
    ck_assert_int_eq(HEALTH().state, CACHE_RUNNING);
    ASSERT_ABSENT(CGET("k0"));
    ASSERT_VAL(CGET("k5"), "new");
    ck_assert_uint_eq(HEALTH().entries, 5);
    assert_same(t);
    t_finish(t);
}
END_TEST

/* X14: a TTL put is visible, then gone once its lease expired; a shared
 * lease revoked takes its keys with it. */
START_TEST(test_x14_ttl)
{
    TINIT(T_WRAP);
    t_start(t);
    double t0 = now_ms();
    cache_put_opts_t o = {.ttl_ms = t->fx->ttl_ms};
    int64_t rev = 0;
    ASSERT_OK(cache_put(t->c, KEY("ttl"), STR("short"), &o, &rev));
    got_t g = CGET("ttl");
    ASSERT_VAL(g, "short");
    ck_assert_int_ne(g.meta.lease, 0);
    got_t s = SGET("ttl");
    ASSERT_VAL(s, "short");
    ck_assert_int_eq(s.meta.lease, g.meta.lease);
    ck_assert_int_eq(wrap_get(t->w, &t->w->grants), 1);
    /* Time-based: poll the cache, waiting for its next event each time. */
    double deadline = now_ms() + ms_scaled(10000);
    int rc;
    while ((rc = CGET("ttl").rc) == 0 && now_ms() < deadline)
        (void)cache_wait_fresh(t->c, HEALTH().watch_rev + 1, 100);
    ASSERT_RC(rc, COALESCE_ENOENT);
    ck_assert_double_ge(now_ms() - t0, t->fx->ttl_ms);
    ASSERT_ABSENT(SGET("ttl"));
    /* An existing lease, shared by two keys. */
    int64_t id = 0;
    ASSERT_OK(t->inner->ops->lease_grant(t->inner, 60000, &id));
    cache_put_opts_t lo = {.lease = id};
    ASSERT_OK(cache_put(t->c, KEY("l1"), STR("a"), &lo, &rev));
    ASSERT_OK(cache_create(t->c, KEY("l2"), STR("b"), &lo, &rev));
    ck_assert_int_eq(CGET("l1").meta.lease, id);
    ck_assert_int_eq(CGET("l2").meta.lease, id);
    ck_assert_int_eq(wrap_get(t->w, &t->w->grants), 1);
    ASSERT_OK(t->inner->ops->lease_revoke(t->inner, id));
    fresh(t, store_rev(t));
    ASSERT_ABSENT(CGET("l1"));
    ASSERT_ABSENT(CGET("l2"));
    assert_same(t);
    t_finish(t);
}
END_TEST

/* X15: tombstones go on a quiet prefix once a progress notification
 * raises W past them, without seeing the matching events. */
START_TEST(test_x15_tombstone_gc_progress)
{
    TINIT(0);
    t_start(t);
    int64_t r1 = put_ok(t, "k", "v");
    fresh(t, r1);
    hold(t, 1);
    int64_t r2 = del_ok(t, "k", 1);
    ck_assert_uint_eq(HEALTH().tombstones, 1);
    flush(t, CACHE_FLUSH_DROP);
    progress(t);
    flush(t, CACHE_FLUSH_EACH);
    fresh(t, r2);
    ck_assert_uint_eq(HEALTH().tombstones, 0);
    ASSERT_ABSENT(CGET("k"));
    /* A delete of an absent key: no event at all. */
    ext_put_outside(t, "a");
    ext_put_outside(t, "b");
    del_ok(t, "never", 0);
    ck_assert_uint_le(HEALTH().tombstones, 1);
    progress(t);
    flush(t, CACHE_FLUSH_EACH);
    fresh(t, store_rev(t));
    ck_assert_uint_eq(HEALTH().tombstones, 0);
    /* Range tombstones too. */
    put_ok(t, "q/x", "v");
    int64_t deleted = 0, r3 = 0;
    ASSERT_OK(cache_delete_prefix(t->c, KEY("q/"), &deleted, &r3));
    ck_assert_int_eq(deleted, 1);
    ck_assert_uint_ge(HEALTH().range_tombstones, 1);
    flush(t, CACHE_FLUSH_DROP);
    progress(t);
    flush(t, CACHE_FLUSH_EACH);
    fresh(t, r3);
    cache_health_t h = HEALTH();
    ck_assert_uint_eq(h.range_tombstones, 0);
    ck_assert_uint_eq(h.tombstones, 0);
    ck_assert_int_ge(h.watch_rev, r3);
    hold(t, 0);
    assert_same(t);
    t_finish(t);
}
END_TEST

/* X16: delete and re-create, then an update or delete_value from the old
 * incarnation's mod revision is refused (no ABA on version). */
START_TEST(test_x16_no_aba)
{
    TINIT(0);
    t_start(t);
    int64_t r1 = put_ok(t, "k", "one");
    del_ok(t, "k", 1);
    int64_t r3 = put_ok(t, "k", "two");
    ck_assert_int_eq(CGET("k").meta.version, 1);
    int64_t rev = 0;
    ASSERT_RC(cache_update(t->c, KEY("k"), STR("three"), r1, NULL, &rev),
              COALESCE_ECONFLICT);
    ck_assert_int_eq(rev, r3);
    ASSERT_RC(cache_delete_value(t->c, KEY("k"), r1, &rev), COALESCE_ECONFLICT);
    ASSERT_VAL(CGET("k"), "two");
    ASSERT_VAL(SGET("k"), "two");
    /* Another writer deletes and re-creates. */
    ext_del(t, "k");
    int64_t r5 = ext_put(t, "k", "ext");
    fresh(t, r5);
    ASSERT_RC(cache_update(t->c, KEY("k"), STR("x"), r3, NULL, &rev),
              COALESCE_ECONFLICT);
    ASSERT_OK(cache_update(t->c, KEY("k"), STR("x"), r5, NULL, &rev));
    ASSERT_VAL(CGET("k"), "x");
    assert_same(t);
    t_finish(t);
}
END_TEST

/* X17: a progress notification raises W; a write-through at or below W is
 * skipped (its event was lost on purpose, so skipping is observable). */
START_TEST(test_x17_progress_raises_w)
{
    TINIT(T_WRAP);
    t_start(t);
    int64_t r1 = ext_put_outside(t, "x");
    ck_assert_int_lt(HEALTH().watch_rev, r1);
    progress(t);
    fresh(t, r1);
    ck_assert_int_eq(HEALTH().watch_rev, r1);
    hold(t, 1);
    async_op_t a;
    async_gated(&a, t, A_PUT, "k", "v");
    int64_t r2 = store_rev(t);
    flush(t, CACHE_FLUSH_DROP);
    progress(t);
    flush(t, CACHE_FLUSH_EACH);
    fresh(t, r2);
    wrap_set(t->w, &t->w->txn_gate, 0);
    async_join(&a);
    ASSERT_OK(a.rc);
    ck_assert_int_eq(a.rev, r2);
    ASSERT_ABSENT(CGET("k"));
    hold(t, 0);
    t_finish(t);
}
END_TEST

/* X19: cache_wait_fresh() returns once W reaches the revision (another
 * writer: the store directly, or a second cache), times out otherwise,
 * and a stop wakes a waiter. */
START_TEST(test_x19_wait_fresh)
{
    TINIT(T_WRAP);
    t_start(t);
    int64_t w0 = HEALTH().watch_rev;
    ASSERT_OK(cache_wait_fresh(t->c, w0, 0));
    ASSERT_OK(cache_wait_fresh(t->c, 0, 0));
    wrap_pause(t->w, w0);
    int64_t r = ext_put(t, "k", "v");
    ASSERT_RC(cache_wait_fresh(t->c, r, 0), COALESCE_ETIMEDOUT);
    double t0 = now_ms();
    ASSERT_RC(cache_wait_fresh(t->c, r, 30), COALESCE_ETIMEDOUT);
    ck_assert_double_ge(now_ms() - t0, 25.0);
    async_op_t a;
    memset(&a, 0, sizeof(a));
    a.c = t->c;
    a.kind = A_WAIT_FRESH;
    a.arg = r;
    a.timeout_ms = -1;
    atomic_init(&a.done, 0);
    ck_assert_int_eq(pthread_create(&a.th, NULL, async_main, &a), 0);
    ck_assert(wrap_wait(t->w, &t->w->paused, 1, WAIT_MS));
    ck_assert_int_eq(atomic_load(&a.done), 0);
    wrap_pause(t->w, -1);
    async_join(&a);
    ASSERT_OK(a.rc);
    ASSERT_VAL(CGET("k"), "v");
    /* A second cache on the same store writes. */
    cache_t *c2 = t_new_cache(t, &t->opts);
    ASSERT_OK(cache_start(c2));
    int64_t r2 = 0;
    ASSERT_OK(cache_put(c2, KEY("k2"), STR("from c2"), NULL, &r2));
    ASSERT_OK(cache_wait_fresh(t->c, r2, ms_scaled(WAIT_MS)));
    ASSERT_VAL(CGET("k2"), "from c2");
    cache_free(c2);
    /* A waiter for a revision that never comes is woken by a stop. */
    memset(&a, 0, sizeof(a));
    a.c = t->c;
    a.kind = A_WAIT_FRESH;
    a.arg = store_rev(t) + 1000;
    a.timeout_ms = ms_scaled(10000);
    atomic_init(&a.done, 0);
    t0 = now_ms();
    ck_assert_int_eq(pthread_create(&a.th, NULL, async_main, &a), 0);
    cache_stop(t->c);
    async_join(&a);
    ASSERT_RC(a.rc, COALESCE_ENOTSTARTED);
    ck_assert_double_lt(now_ms() - t0, ms_scaled(10000) - 100);
    ASSERT_RC(cache_wait_fresh(t->c, 1, 0), COALESCE_ENOTSTARTED);
    t_finish(t);
}
END_TEST

/* X20: a report callback that blocks (or none at all) never holds the
 * watch back. */
START_TEST(test_x20_slow_report_never_blocks_watch)
{
    TINIT(0);
    t_start(t);
    replog_set(&t->log, &t->log.block, 1);
    cut(t, COALESCE_EIO);
    ck_assert(replog_wait(&t->log, -1, 1, WAIT_MS));
    for (int i = 0; i < 3; i++) {
        char v[32];
        snprintf(v, sizeof(v), "%d", i);
        int64_t r = ext_put(t, "k", v);
        int rc = cache_wait_fresh(t->c, r, ms_scaled(2000));
        ck_assert_msg(rc == 0,
                      "round %d: the watch waits for the report "
                      "callback (%s)",
                      i, coalesce_err_name(rc));
        ASSERT_VAL(CGET("k"), v);
        cut(t, COALESCE_EIO);
    }
    pthread_mutex_lock(&t->log.mu);
    int blocked = t->log.blocked;
    pthread_mutex_unlock(&t->log.mu);
    ck_assert_int_ge(blocked, 1);
    replog_set(&t->log, &t->log.block, 0);
    ck_assert_int_eq(t->log.block_timeouts, 0);
    /* No callback at all. */
    cache_opts_t o = t->opts;
    o.report = NULL;
    o.report_data = NULL;
    cache_t *c2 = t_new_cache(t, &o);
    ASSERT_OK(cache_start(c2));
    cut(t, COALESCE_EIO);
    int64_t r = ext_put(t, "k", "last");
    ASSERT_OK(cache_wait_fresh(c2, r, ms_scaled(WAIT_MS)));
    ASSERT_VAL(cget_b(c2, KEY("k")), "last");
    WAIT_HEALTH(c2, hw_.reconnects >= 1);
    cache_free(c2);
    fresh(t, r);
    assert_same(t);
    t_finish(t);
}
END_TEST

/* =========================================================================
 * WC requirements
 * ========================================================================= */

/* WC-1, WC-3: reads and writes on a stopped cache; start, stop, restart;
 * bad arguments. */
START_TEST(test_wc_lifecycle)
{
    TINIT(T_WRAP);
    cache_t *c = NULL;
    ASSERT_RC(cache_new(NULL, t->store, t->pfx, t->pfxlen, NULL),
              COALESCE_EINVAL);
    ASSERT_RC(cache_new(&c, NULL, t->pfx, t->pfxlen, NULL), COALESCE_EINVAL);
    ASSERT_RC(cache_new(&c, t->store, t->pfx, 0, NULL), COALESCE_EINVAL);
    ASSERT_RC(cache_new(&c, t->store, NULL, 3, NULL), COALESCE_EINVAL);
    char *big = malloc(65 * KiB);
    ck_assert_ptr_nonnull(big);
    memset(big, 'p', 65 * KiB);
    ASSERT_RC(cache_new(&c, t->store, big, 64 * KiB + 1, NULL),
              COALESCE_EINVAL);
    ASSERT_OK(cache_new(&c, t->store, big, 64 * KiB, NULL));
    cache_free(c);
    free(big);
    /* A store built against a later store.h (methods appended) is
     * accepted; version 0 is not a store. The ops are restored at once. */
    const cache_store_ops_t *ops0 = t->store->ops;
    cache_store_ops_t later = *ops0;
    t->store->ops = &later;
    later.version = CACHE_STORE_OPS_VERSION + 1;
    ASSERT_OK(cache_new(&c, t->store, t->pfx, t->pfxlen, NULL));
    cache_free(c);
    later.version = 0;
    ASSERT_RC(cache_new(&c, t->store, t->pfx, t->pfxlen, NULL),
              COALESCE_EINVAL);
    t->store->ops = ops0;
    cache_free(NULL);
    cache_store_free(NULL);

    t->c = t_new_cache(t, &t->opts);
    cache_health_t h = HEALTH();
    ck_assert_int_eq(h.state, CACHE_STOPPED);
    ck_assert_uint_eq(h.entries, 0);
    long txns0 = wrap_get(t->w, &t->w->txn_calls);
    int64_t rev = 0, deleted = 0;
    for (int round = 0; round < 2; round++) {
        ASSERT_RC(CGET("a").rc, COALESCE_ENOTSTARTED);
        kvlist_t l;
        ASSERT_RC(cache_list(t->c, t->pfx, t->pfxlen, &l),
                  COALESCE_ENOTSTARTED);
        kvl_free(&l);
        ASSERT_RC(cache_put(t->c, KEY("a"), STR("v"), NULL, &rev),
                  COALESCE_ENOTSTARTED);
        ASSERT_RC(cache_create(t->c, KEY("a"), STR("v"), NULL, &rev),
                  COALESCE_ENOTSTARTED);
        ASSERT_RC(cache_update(t->c, KEY("a"), STR("v"), 1, NULL, &rev),
                  COALESCE_ENOTSTARTED);
        ASSERT_RC(cache_delete(t->c, KEY("a"), &deleted, &rev),
                  COALESCE_ENOTSTARTED);
        ASSERT_RC(cache_delete_value(t->c, KEY("a"), 1, &rev),
                  COALESCE_ENOTSTARTED);
        ASSERT_RC(cache_delete_prefix(t->c, KEY("a"), &deleted, &rev),
                  COALESCE_ENOTSTARTED);
        cache_txn_op_t op = txop(CACHE_TXN_PUT, KEY("a"), "v", 0);
        ASSERT_RC(cache_txn(t->c, &op, 1, &rev), COALESCE_ENOTSTARTED);
        ASSERT_RC(cache_wait_fresh(t->c, 1, 0), COALESCE_ENOTSTARTED);
        ck_assert_int_eq(wrap_get(t->w, &t->w->txn_calls), txns0);
        if (round == 0) {
            ext_put(t, "a", "1");
            ASSERT_OK(cache_start(t->c));
            ASSERT_RC(cache_start(t->c), COALESCE_EBUSY);
            ASSERT_VAL(CGET("a"), "1");
            ck_assert_int_eq(HEALTH().state, CACHE_RUNNING);
            cache_stop(t->c);
            cache_stop(t->c);
            h = HEALTH();
            ck_assert_int_eq(h.state, CACHE_STOPPED);
            ck_assert_uint_eq(h.entries, 0);
            ck_assert_int_eq(t->w->live, 0);
        }
    }
    /* Restart reloads what changed while stopped. */
    ext_put(t, "b", "2");
    ext_put(t, "a", "3");
    ASSERT_OK(cache_start(t->c));
    ASSERT_VAL(CGET("a"), "3");
    ASSERT_VAL(CGET("b"), "2");
    assert_same(t);
    ASSERT_RC(cache_health(t->c, NULL, sizeof(h)), COALESCE_EINVAL);
    ASSERT_RC(cache_health(NULL, &h, sizeof(h)), COALESCE_EINVAL);
    /* t_finish frees a running cache. */
    t_finish(t);
}
END_TEST

typedef struct startstop {
    cache_t *c;
    const char *key;
    long bad;
    int last_bad;
} startstop_t;

static void *startstop_main(void *p)
{
    startstop_t *s = p;
    for (int i = 0; i < 40; i++) {
        int rc = cache_start(s->c);
        if (rc != 0 && rc != COALESCE_EBUSY) {
            s->bad++;
            s->last_bad = rc;
        }
        got_t g = cget_b(s->c, s->key, strlen(s->key));
        if (g.rc != 0 && g.rc != COALESCE_ENOTSTARTED) {
            s->bad++;
            s->last_bad = g.rc;
        }
        if (i % 3 != 0)
            cache_stop(s->c);
    }
    return NULL;
}

/* WC-1: concurrent starts and stops are serialized. */
START_TEST(test_wc_concurrent_start_stop)
{
    TINIT(T_WRAP);
    ext_put(t, "a", "1");
    t->c = t_new_cache(t, &t->opts);
    startstop_t s[3];
    pthread_t th[3];
    for (int i = 0; i < 3; i++) {
        memset(&s[i], 0, sizeof(s[i]));
        s[i].c = t->c;
        s[i].key = tkey(t, "a");
        ck_assert_int_eq(pthread_create(&th[i], NULL, startstop_main, &s[i]),
                         0);
    }
    for (int i = 0; i < 3; i++) {
        pthread_join(th[i], NULL);
        ck_assert_msg(s[i].bad == 0, "thread %d: %s", i,
                      coalesce_err_name(s[i].last_bad));
    }
    cache_stop(t->c);
    ck_assert_int_eq(t->w->live, 0);
    ASSERT_OK(cache_start(t->c));
    assert_same(t);
    t_finish(t);
}
END_TEST

static int ref_scan_cb(void *data,
                       const void *key,
                       size_t keylen,
                       coalesce_buf_t *value,
                       const cache_meta_t *meta)
{
    (void)key;
    (void)keylen;
    (void)meta;
    coalesce_buf_t **out = data;
    *out = coalesce_buf_ref(value);
    return 1;
}

/* WC-2: a value a reader holds stays valid and unchanged after the key
 * changes, is deleted, and after the cache and the store are gone. */
START_TEST(test_wc_values_outlive_changes)
{
    TINIT(0);
    t_start(t);
    put_ok(t, "k", "first");
    coalesce_buf_t *b1 = NULL, *b2 = NULL;
    ASSERT_OK(cache_get(t->c, KEY("k"), &b1, NULL));
    ASSERT_OK(cache_scan(t->c, KEY("k"), ref_scan_cb, &b2));
    ck_assert_ptr_nonnull(b2);
    put_ok(t, "k", "second, longer");
    fresh(t, ext_put(t, "k", "third"));
    del_ok(t, "k", 1);
    int64_t deleted = 0, rev = 0;
    ASSERT_OK(cache_delete_prefix(t->c, t->pfx, t->pfxlen, &deleted, &rev));
    cache_stop(t->c);
    cache_free(t->c);
    t->c = NULL;
    for (int i = 0; i < 2; i++) {
        coalesce_buf_t *b = i ? b2 : b1;
        ck_assert_uint_eq(coalesce_buf_len(b), 5);
        ck_assert_int_eq(memcmp(coalesce_buf_data(b), "first", 5), 0);
    }
    coalesce_buf_unref(b1);
    coalesce_buf_unref(b2);
    t_finish(t);
}
END_TEST

/* WC-4: a prefix delete's tombstones block an older put of a key the
 * cache had seen. */
START_TEST(test_wc_range_tombstone_blocks_seen_key)
{
    TINIT(T_WRAP);
    t_start(t);
    int64_t r1 = ext_put(t, "g/k", "v1");
    fresh(t, r1);
    wrap_pause(t->w, r1);
    int64_t r2 = ext_put(t, "g/k", "v2");
    int64_t deleted = 0, r3 = 0;
    ASSERT_OK(cache_delete_prefix(t->c, KEY("g/"), &deleted, &r3));
    ck_assert_int_eq(deleted, 1);
    ASSERT_ABSENT(CGET("g/k"));
    wrap_pause(t->w, r2);
    fresh(t, r2);
    ASSERT_ABSENT(CGET("g/k"));
    wrap_pause(t->w, -1);
    fresh(t, r3);
    ASSERT_ABSENT(CGET("g/k"));
    cache_health_t h = HEALTH();
    ck_assert_uint_eq(h.tombstones, 0);
    ck_assert_uint_eq(h.range_tombstones, 0);
    assert_same(t);
    t_finish(t);
}
END_TEST

/* WC-3, WC-7, R9: transactions are validated before the store is
 * contacted; a failed compare changes nothing; effects in op order. */
START_TEST(test_wc_txn_validation)
{
    TINIT(T_WRAP);
    t_start(t);
    int64_t ra = put_ok(t, "a", "v");
    put_ok(t, "g/1", "v");
    put_ok(t, "g/2", "v");
    int64_t rev0 = store_rev(t);
    long txns0 = wrap_get(t->w, &t->w->txn_calls);
    long grants0 = wrap_get(t->w, &t->w->grants);
    cache_put_opts_t ttl = {.ttl_ms = 60000};
    int64_t rev = 0;
    cache_txn_op_t ops[CACHE_TXN_MAX_OPS + 1];
    ASSERT_RC(cache_txn(t->c, NULL, 1, &rev), COALESCE_EINVAL);
    ASSERT_RC(cache_txn(t->c, ops, 0, &rev), COALESCE_EINVAL);
    /* A key twice. */
    ops[0] = txop(CACHE_TXN_PUT, KEY("a"), "x", 0);
    ops[0].opts = &ttl;
    ops[1] = txop(CACHE_TXN_DELETE, KEY("a"), NULL, 0);
    ASSERT_RC(cache_txn(t->c, ops, 2, &rev), COALESCE_EINVAL);
    ops[1] = txop(CACHE_TXN_UPDATE, KEY("a"), "y", ra);
    ASSERT_RC(cache_txn(t->c, ops, 2, &rev), COALESCE_EINVAL);
    /* A key inside a DELETE_PREFIX of the same txn, in either order. */
    ops[0] = txop(CACHE_TXN_DELETE_PREFIX, KEY("g/"), NULL, 0);
    ops[1] = txop(CACHE_TXN_PUT, KEY("g/3"), "x", 0);
    ops[1].opts = &ttl;
    ASSERT_RC(cache_txn(t->c, ops, 2, &rev), COALESCE_EINVAL);
    ops[2] = ops[0];
    ASSERT_RC(cache_txn(t->c, ops + 1, 2, &rev), COALESCE_EINVAL);
    ops[1] = txop(CACHE_TXN_DELETE, KEY("g/1"), NULL, 0);
    ASSERT_RC(cache_txn(t->c, ops, 2, &rev), COALESCE_EINVAL);
    /* An unknown type. */
    ops[0] = txop(99, KEY("b"), "x", 0);
    ASSERT_RC(cache_txn(t->c, ops, 1, &rev), COALESCE_EINVAL);
    /* Too many operations. */
    static char keys[CACHE_TXN_MAX_OPS + 1][96];
    for (int i = 0; i <= CACHE_TXN_MAX_OPS; i++) {
        snprintf(keys[i], sizeof(keys[i]), "%sm/%03d", t->pfx, i);
        ops[i] = txop(CACHE_TXN_PUT, keys[i], strlen(keys[i]), "m", 0);
    }
    ops[5].opts = &ttl;
    ASSERT_RC(cache_txn(t->c, ops, CACHE_TXN_MAX_OPS + 1, &rev),
              COALESCE_EINVAL);
    ck_assert_int_eq(wrap_get(t->w, &t->w->txn_calls), txns0);
    ck_assert_int_eq(wrap_get(t->w, &t->w->grants), grants0);
    ck_assert_int_eq(store_rev(t), rev0);
    ASSERT_VAL(CGET("a"), "v");
    /* Exactly the limit works, all at one revision. */
    ops[5].opts = NULL;
    ASSERT_OK(cache_txn(t->c, ops, CACHE_TXN_MAX_OPS, &rev));
    ck_assert_int_eq(rev, rev0 + 1);
    for (int i = 0; i < CACHE_TXN_MAX_OPS; i += 17) {
        got_t g = cget_b(t->c, keys[i], strlen(keys[i]));
        ASSERT_VAL(g, "m");
        ck_assert_int_eq(g.meta.mod_rev, rev);
    }
    ASSERT_ABSENT(
        cget_b(t->c, keys[CACHE_TXN_MAX_OPS], strlen(keys[CACHE_TXN_MAX_OPS])));
    /* A failed compare changes nothing, and reports the current revision. */
    int64_t cur = store_rev(t);
    ops[0] = txop(CACHE_TXN_PUT, KEY("n1"), "x", 0);
    ops[1] = txop(CACHE_TXN_UPDATE, KEY("a"), "y", ra + 1000);
    ops[2] = txop(CACHE_TXN_DELETE_PREFIX, KEY("g/"), NULL, 0);
    ASSERT_RC(cache_txn(t->c, ops, 3, &rev), COALESCE_ECONFLICT);
    ck_assert_int_eq(rev, cur);
    ops[1] = txop(CACHE_TXN_CREATE, KEY("a"), "y", 0);
    ASSERT_RC(cache_txn(t->c, ops, 3, &rev), COALESCE_ECONFLICT);
    ASSERT_ABSENT(CGET("n1"));
    ASSERT_ABSENT(SGET("n1"));
    ASSERT_VAL(CGET("g/1"), "v");
    ASSERT_VAL(CGET("a"), "v");
    ck_assert_int_eq(store_rev(t), cur);
    /* Every type at once. */
    ops[1] = txop(CACHE_TXN_UPDATE, KEY("a"), "y", ra);
    ops[3] = txop(CACHE_TXN_CREATE, KEY("c"), "new", 0);
    ops[4] = txop(CACHE_TXN_DELETE_VALUE, keys[0], strlen(keys[0]), NULL, cur);
    ops[5] = txop(CACHE_TXN_DELETE, keys[1], strlen(keys[1]), NULL, 0);
    ASSERT_OK(cache_txn(t->c, ops, 6, &rev));
    ck_assert_int_eq(rev, cur + 1);
    ASSERT_VAL(CGET("n1"), "x");
    got_t g = CGET("a");
    ASSERT_VAL(g, "y");
    ck_assert_int_eq(g.meta.version, 2);
    ck_assert_int_eq(g.meta.create_rev, ra);
    ASSERT_ABSENT(CGET("g/1"));
    ASSERT_ABSENT(CGET("g/2"));
    ASSERT_VAL(CGET("c"), "new");
    ASSERT_ABSENT(cget_b(t->c, keys[0], strlen(keys[0])));
    ASSERT_ABSENT(cget_b(t->c, keys[1], strlen(keys[1])));
    assert_same(t);
    t_finish(t);
}
END_TEST

/* WC-8: a TTL put whose write fails revokes the lease it granted. */
START_TEST(test_wc_ttl_lease_not_leaked)
{
    TINIT(T_WRAP);
    t_start(t);
    int64_t r1 = put_ok(t, "k", "v");
    cache_put_opts_t o = {.ttl_ms = 60000};
    long g0 = wrap_get(t->w, &t->w->grants);
    long v0 = wrap_get(t->w, &t->w->revokes);
    int64_t rev = 0;
    ASSERT_RC(cache_create(t->c, KEY("k"), STR("x"), &o, &rev),
              COALESCE_EEXIST);
    ASSERT_RC(cache_update(t->c, KEY("k"), STR("x"), r1 + 100, &o, &rev),
              COALESCE_ECONFLICT);
    cache_txn_op_t ops[2] = {
        txop(CACHE_TXN_PUT, KEY("n"), "x", 0),
        txop(CACHE_TXN_UPDATE, KEY("k"), "y", r1 + 100),
    };
    ops[0].opts = &o;
    ASSERT_RC(cache_txn(t->c, ops, 2, &rev), COALESCE_ECONFLICT);
    wrap_lock(t->w);
    t->w->txn_fail_n = 1;
    t->w->txn_fail_code = COALESCE_EIO;
    wrap_unlock(t->w);
    ASSERT_RC(cache_put(t->c, KEY("m"), STR("x"), &o, &rev), COALESCE_EIO);
    long grants = wrap_get(t->w, &t->w->grants) - g0;
    long revokes = wrap_get(t->w, &t->w->revokes) - v0;
    ck_assert_int_ge(grants, 1);
    ck_assert_int_eq(grants, revokes);
    ASSERT_VAL(CGET("k"), "v");
    ASSERT_ABSENT(CGET("n"));
    ASSERT_ABSENT(CGET("m"));
    ASSERT_ABSENT(SGET("m"));
    /* A TTL put that succeeds keeps its lease. */
    ASSERT_OK(cache_put(t->c, KEY("m"), STR("x"), &o, &rev));
    ck_assert_int_eq(wrap_get(t->w, &t->w->grants) - g0, grants + 1);
    ck_assert_int_eq(wrap_get(t->w, &t->w->revokes) - v0, revokes);
    ck_assert_int_ne(CGET("m").meta.lease, 0);
    assert_same(t);
    t_finish(t);
}
END_TEST

/* WC-11: max_entries exceeded by a write-through, then by the watch:
 * degraded, reported, reads refused until restarted. */
START_TEST(test_wc_bounds_entries)
{
    TINIT(0);
    ext_put(t, "k1", "v");
    ext_put(t, "k2", "v");
    t->opts.max_entries = 3;
    t_start(t);
    put_ok(t, "k3", "v");
    ck_assert_int_eq(HEALTH().state, CACHE_RUNNING);
    int64_t rev = 0;
    int rc = cache_put(t->c, KEY("k4"), STR("v"), NULL, &rev);
    ck_assert_msg(rc == 0 || rc == COALESCE_EOVERFLOW, "%s",
                  coalesce_err_name(rc));
    ASSERT_VAL(SGET("k4"), "v");
    ck_assert(replog_wait(&t->log, CACHE_REPORT_OVERFLOW, 1, WAIT_MS));
    ck_assert_int_eq(HEALTH().state, CACHE_DEGRADED);
    ASSERT_RC(CGET("k1").rc, COALESCE_EOVERFLOW);
    kvlist_t l;
    ASSERT_RC(cache_list(t->c, t->pfx, t->pfxlen, &l), COALESCE_EOVERFLOW);
    kvl_free(&l);
    ck_assert_int_eq(HEALTH().last_error, COALESCE_EOVERFLOW);
    /* Restarted with few enough keys. */
    cache_stop(t->c);
    ext_del(t, "k1");
    ext_del(t, "k2");
    ASSERT_OK(cache_start(t->c));
    ck_assert_int_eq(HEALTH().state, CACHE_RUNNING);
    ASSERT_VAL(CGET("k4"), "v");
    /* Exceeded through the watch. */
    ext_put(t, "k5", "v");
    int64_t r = ext_put(t, "k6", "v");
    ck_assert(replog_wait(&t->log, CACHE_REPORT_OVERFLOW, 2, WAIT_MS));
    (void)r;
    ck_assert_int_eq(HEALTH().state, CACHE_DEGRADED);
    ASSERT_RC(CGET("k4").rc, COALESCE_EOVERFLOW);
    t_finish(t);
}
END_TEST

/* WC-11: max_bytes, and a load that is already too big. */
START_TEST(test_wc_bounds_bytes_and_load)
{
    TINIT(0);
    char big[300];
    memset(big, 'b', sizeof(big) - 1);
    big[sizeof(big) - 1] = 0;
    t->opts.max_bytes = 200;
    t_start(t);
    put_ok(t, "small", "v");
    ck_assert_int_eq(HEALTH().state, CACHE_RUNNING);
    int64_t rev = 0;
    int rc = cache_put(t->c, KEY("big"), STR(big), NULL, &rev);
    ck_assert_msg(rc == 0 || rc == COALESCE_EOVERFLOW, "%s",
                  coalesce_err_name(rc));
    ck_assert(replog_wait(&t->log, CACHE_REPORT_OVERFLOW, 1, WAIT_MS));
    ck_assert_int_eq(HEALTH().state, CACHE_DEGRADED);
    ASSERT_RC(CGET("small").rc, COALESCE_EOVERFLOW);
    cache_free(t->c);
    /* Too many keys at load. */
    cache_opts_t o = t->opts;
    o.max_bytes = 0;
    o.max_entries = 1;
    t->c = t_new_cache(t, &o);
    rc = cache_start(t->c);
    ck_assert_msg(rc == 0, "start over the bound: %s", coalesce_err_name(rc));
    ck_assert_int_eq(HEALTH().state, CACHE_DEGRADED);
    ck_assert(replog_wait(&t->log, CACHE_REPORT_OVERFLOW, 2, WAIT_MS));
    ASSERT_RC(CGET("small").rc, COALESCE_EOVERFLOW);
    t_finish(t);
}
END_TEST

/* WC-10: cache_health's fields, and a partial size. */
START_TEST(test_wc_health)
{
    TINIT(0);
    ext_put(t, "a", "12345");
    int64_t r0 = ext_put(t, "bb", "1");
    t->c = t_new_cache(t, &t->opts);
    cache_health_t h = HEALTH();
    ck_assert_int_eq(h.state, CACHE_STOPPED);
    ck_assert_int_eq(h.last_error, 0);
    ck_assert_uint_eq(h.entries, 0);
    ck_assert_uint_eq(h.bytes, 0);
    ASSERT_OK(cache_start(t->c));
    h = HEALTH();
    ck_assert_int_eq(h.state, CACHE_RUNNING);
    ck_assert_int_eq(h.last_error, 0);
    ck_assert_int_eq(h.watch_rev, r0);
    ck_assert_uint_eq(h.entries, 2);
    ck_assert_uint_eq(h.bytes, 2 * t->pfxlen + 1 + 5 + 2 + 1);
    ck_assert_uint_eq(h.tombstones, 0);
    ck_assert_uint_eq(h.range_tombstones, 0);
    ck_assert_uint_eq(h.relists, 0);
    ck_assert_uint_eq(h.reconnects, 0);
    ck_assert_uint_eq(h.events, 0);
    int64_t r1 = ext_put(t, "c", "xy");
    fresh(t, r1);
    h = HEALTH();
    ck_assert_uint_eq(h.events, 1);
    ck_assert_int_eq(h.watch_rev, r1);
    ck_assert_uint_eq(h.entries, 3);
    assert_health_counts(t);
    put_ok(t, "a", "1");
    del_ok(t, "bb", 1);
    assert_health_counts(t);
    /* A partial read fills only the bytes asked for. */
    cache_health_t p;
    memset(&p, 0xA5, sizeof(p));
    size_t part = offsetof(cache_health_t, watch_rev);
    ASSERT_OK(cache_health(t->c, &p, part));
    ck_assert_int_eq(p.state, CACHE_RUNNING);
    unsigned char *raw = (unsigned char *)&p;
    for (size_t i = part; i < sizeof(p); i++)
        ck_assert_uint_eq(raw[i], 0xA5);
    t_finish(t);
}
END_TEST

/* =========================================================================
 * Randomized model test
 * ========================================================================= */

#define M_KEYS    64
#define M_GROUP   16
#define M_WORKERS 4

typedef struct model {
    tctx_t *t;
    uint64_t seed;
    atomic_int done;
    atomic_long ops;
    double deadline;
    long max_ops;
    int chaos; /* hooks available */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    long nerr;
    char err[768];
    atomic_long reads, writes, conflicts, ext_writes, chaos_actions;
} model_t;

typedef struct mworker {
    model_t *m;
    int id;
    uint64_t rng;
    pthread_t th;
    int64_t floor[M_KEYS]; /* a present read must have mod_rev >= floor */
    int64_t lastm[M_KEYS]; /* the newest mod_rev known present */
} mworker_t;

static void m_fail(model_t *m, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void m_fail(model_t *m, const char *fmt, ...)
{
    pthread_mutex_lock(&m->mu);
    if (m->nerr++ == 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(m->err, sizeof(m->err), fmt, ap);
        va_end(ap);
    }
    pthread_mutex_unlock(&m->mu);
}

static void m_sfx(char *out, size_t cap, int idx)
{
    snprintf(out, cap, "g%d/k%02d", idx / M_GROUP, idx);
}

/* The key index of a full key of this test, or -1. */
static int m_idx(const tctx_t *t, const void *key, size_t keylen)
{
    const char *k = key;
    if (keylen != t->pfxlen + 6 || memcmp(k, t->pfx, t->pfxlen) != 0)
        return -1;
    k += t->pfxlen;
    if (k[0] != 'g' || k[2] != '/' || k[3] != 'k')
        return -1;
    int idx = (k[4] - '0') * 10 + (k[5] - '0');
    return idx >= 0 && idx < M_KEYS && idx / M_GROUP == k[1] - '0' ? idx : -1;
}

static void mw_present(mworker_t *w,
                       int idx,
                       const cache_meta_t *meta,
                       const void *val,
                       size_t vallen,
                       const char *how)
{
    model_t *m = w->m;
    if (meta->mod_rev < w->floor[idx])
        m_fail(m,
               "worker %d, %s of key %d: mod_rev %" PRId64
               " older than %" PRId64 " already known (seed %" PRIu64 ")",
               w->id, how, idx, meta->mod_rev, w->floor[idx], m->seed);
    if (meta->create_rev <= 0 || meta->create_rev > meta->mod_rev ||
        meta->version < 1)
        m_fail(m,
               "worker %d, %s of key %d: bad meta create %" PRId64
               " mod %" PRId64 " version %" PRId64,
               w->id, how, idx, meta->create_rev, meta->mod_rev, meta->version);
    char want[32];
    snprintf(want, sizeof(want), "k%02d:", idx);
    if (vallen < 4 || memcmp(val, want, 4) != 0)
        m_fail(m, "worker %d, %s of key %d: value of another key", w->id, how,
               idx);
    if (meta->mod_rev > w->floor[idx])
        w->floor[idx] = meta->mod_rev;
    if (meta->mod_rev > w->lastm[idx])
        w->lastm[idx] = meta->mod_rev;
}

static void mw_absent(mworker_t *w, int idx)
{
    /* Deleted after the newest put known: anything later is newer. */
    if (w->lastm[idx] + 1 > w->floor[idx])
        w->floor[idx] = w->lastm[idx] + 1;
}

static void mw_put_done(mworker_t *w, int idx, int64_t rev)
{
    if (rev > w->floor[idx])
        w->floor[idx] = rev;
    if (rev > w->lastm[idx])
        w->lastm[idx] = rev;
}

static void mw_del_done(mworker_t *w, int idx, int64_t rev)
{
    if (rev + 1 > w->floor[idx])
        w->floor[idx] = rev + 1;
}

/* Reads key idx and checks it; returns its mod_rev (0 if absent). */
static int64_t mw_get(mworker_t *w, int idx)
{
    tctx_t *t = w->m->t;
    char sfx[32];
    m_sfx(sfx, sizeof(sfx), idx);
    got_t g = CGET(sfx);
    atomic_fetch_add(&w->m->reads, 1);
    if (g.rc == 0) {
        mw_present(w, idx, &g.meta, g.val, g.len, "get");
        return g.meta.mod_rev;
    }
    if (g.rc == COALESCE_ENOENT) {
        mw_absent(w, idx);
        return 0;
    }
    m_fail(w->m, "worker %d: get: %s", w->id, coalesce_err_name(g.rc));
    return 0;
}

typedef struct mscan {
    mworker_t *w;
    unsigned char seen[M_KEYS];
    int bad;
} mscan_t;

static int mw_scan_cb(void *data,
                      const void *key,
                      size_t keylen,
                      coalesce_buf_t *value,
                      const cache_meta_t *meta)
{
    mscan_t *s = data;
    int idx = m_idx(s->w->m->t, key, keylen);
    if (idx < 0) {
        s->bad++;
        return 0;
    }
    s->seen[idx] = 1;
    mw_present(s->w, idx, meta, coalesce_buf_data(value),
               coalesce_buf_len(value), "scan");
    return 0;
}

static void mw_scan(mworker_t *w, int group)
{
    tctx_t *t = w->m->t;
    mscan_t s;
    memset(&s, 0, sizeof(s));
    s.w = w;
    char sfx[32];
    snprintf(sfx, sizeof(sfx), "g%d/", group);
    int rc = group < 0 ? cache_scan(t->c, t->pfx, t->pfxlen, mw_scan_cb, &s)
                       : cache_scan(t->c, KEY(sfx), mw_scan_cb, &s);
    atomic_fetch_add(&w->m->reads, 1);
    if (rc != 0) {
        m_fail(w->m, "worker %d: scan: %s", w->id, coalesce_err_name(rc));
        return;
    }
    if (s.bad)
        m_fail(w->m, "worker %d: scan returned a foreign key", w->id);
    for (int i = 0; i < M_KEYS; i++)
        if ((group < 0 || i / M_GROUP == group) && !s.seen[i])
            mw_absent(w, i);
}

static void mw_value(mworker_t *w, int idx, long n, char *out, size_t cap)
{
    snprintf(out, cap, "k%02d:w%d:%ld", idx, w->id, n);
}

static void mw_txn(mworker_t *w, long n)
{
    tctx_t *t = w->m->t;
    cache_txn_op_t ops[5];
    char keys[5][128], vals[5][48];
    int idxs[5];
    int nops = 0;
    unsigned char used[M_KEYS] = {0};
    int dp = -1;
    if (rnd_next(&w->rng) % 4 == 0) {
        dp = (int)(rnd_next(&w->rng) % (M_KEYS / M_GROUP));
        snprintf(keys[0], sizeof(keys[0]), "%sg%d/", t->pfx, dp);
        ops[0] =
            txop(CACHE_TXN_DELETE_PREFIX, keys[0], strlen(keys[0]), NULL, 0);
        idxs[0] = -1;
        nops = 1;
        for (int i = dp * M_GROUP; i < (dp + 1) * M_GROUP; i++)
            used[i] = 1;
    }
    int want = nops + 1 + (int)(rnd_next(&w->rng) % 3);
    for (int tries = 0; tries < 10 && nops < want; tries++) {
        int idx = (int)(rnd_next(&w->rng) % M_KEYS);
        if (used[idx])
            continue;
        used[idx] = 1;
        int type = (int)(rnd_next(&w->rng) % 5); /* PUT .. DELETE_VALUE */
        int64_t expect = 0;
        if (type == CACHE_TXN_UPDATE || type == CACHE_TXN_DELETE_VALUE)
            expect = mw_get(w, idx);
        char sfx[32];
        m_sfx(sfx, sizeof(sfx), idx);
        snprintf(keys[nops], sizeof(keys[nops]), "%s%s", t->pfx, sfx);
        mw_value(w, idx, n, vals[nops], sizeof(vals[nops]));
        ops[nops] = txop(type, keys[nops], strlen(keys[nops]),
                         type <= CACHE_TXN_UPDATE ? vals[nops] : NULL, expect);
        idxs[nops] = idx;
        nops++;
    }
    int64_t rev = 0;
    int rc = cache_txn(t->c, ops, (size_t)nops, &rev);
    if (rc == COALESCE_ECONFLICT) {
        atomic_fetch_add(&w->m->conflicts, 1);
        return;
    }
    if (rc != 0) {
        m_fail(w->m, "worker %d: txn: %s", w->id, coalesce_err_name(rc));
        return;
    }
    atomic_fetch_add(&w->m->writes, 1);
    for (int i = 0; i < nops; i++) {
        if (ops[i].type == CACHE_TXN_DELETE_PREFIX) {
            for (int k = dp * M_GROUP; k < (dp + 1) * M_GROUP; k++)
                mw_del_done(w, k, rev);
        } else if (ops[i].type <= CACHE_TXN_UPDATE) {
            mw_put_done(w, idxs[i], rev);
        } else {
            mw_del_done(w, idxs[i], rev);
        }
    }
}

static void mw_write_rc(mworker_t *w, const char *what, int rc, int ok2)
{
    if (rc == 0)
        atomic_fetch_add(&w->m->writes, 1);
    else if (rc == ok2)
        atomic_fetch_add(&w->m->conflicts, 1);
    else
        m_fail(w->m, "worker %d: %s: %s", w->id, what, coalesce_err_name(rc));
}

static void *m_worker(void *p)
{
    mworker_t *w = p;
    model_t *m = w->m;
    tctx_t *t = m->t;
    for (long n = 0; n < m->max_ops && !atomic_load(&m->done); n++) {
        if (now_ms() > m->deadline)
            break;
        int idx = (int)(rnd_next(&w->rng) % M_KEYS);
        char sfx[32], val[48];
        m_sfx(sfx, sizeof(sfx), idx);
        mw_value(w, idx, n, val, sizeof(val));
        unsigned op = (unsigned)(rnd_next(&w->rng) % 100);
        int64_t rev = 0, deleted = 0;
        int rc;
        if (op < 30) {
            mw_get(w, idx);
        } else if (op < 38) {
            mw_scan(w, op % 5 == 0 ? -1 : (int)(op % (M_KEYS / M_GROUP)));
        } else if (op < 53) {
            cache_put_opts_t o = {.ttl_ms = 60000};
            rc =
                cache_put(t->c, KEY(sfx), STR(val), op == 52 ? &o : NULL, &rev);
            mw_write_rc(w, "put", rc, 1);
            if (rc == 0)
                mw_put_done(w, idx, rev);
        } else if (op < 58) {
            rc = cache_create(t->c, KEY(sfx), STR(val), NULL, &rev);
            mw_write_rc(w, "create", rc, COALESCE_EEXIST);
            if (rc == 0)
                mw_put_done(w, idx, rev);
        } else if (op < 68) {
            int64_t expect = mw_get(w, idx);
            rc = cache_update(t->c, KEY(sfx), STR(val), expect, NULL, &rev);
            mw_write_rc(w, "update", rc, COALESCE_ECONFLICT);
            if (rc == 0)
                mw_put_done(w, idx, rev);
        } else if (op < 75) {
            rc = cache_delete(t->c, KEY(sfx), &deleted, &rev);
            mw_write_rc(w, "delete", rc, 1);
            if (rc == 0)
                mw_del_done(w, idx, rev);
        } else if (op < 80) {
            int64_t expect = mw_get(w, idx);
            rc = cache_delete_value(t->c, KEY(sfx), expect, &rev);
            mw_write_rc(w, "delete_value", rc, COALESCE_ECONFLICT);
            if (rc == 0)
                mw_del_done(w, idx, rev);
        } else if (op < 83) {
            int g = idx / M_GROUP;
            char gs[32];
            snprintf(gs, sizeof(gs), "g%d/", g);
            rc = cache_delete_prefix(t->c, KEY(gs), &deleted, &rev);
            mw_write_rc(w, "delete_prefix", rc, 1);
            if (rc == 0)
                for (int k = g * M_GROUP; k < (g + 1) * M_GROUP; k++)
                    mw_del_done(w, k, rev);
        } else {
            mw_txn(w, n);
        }
        long total = atomic_fetch_add(&m->ops, 1) + 1;
        if (total % 4 == 0) {
            pthread_mutex_lock(&m->mu);
            pthread_cond_broadcast(&m->cv);
            pthread_mutex_unlock(&m->mu);
        }
        if (n % 16 == 15)
            sched_yield(); /* let the chaos and external threads in */
    }
    return NULL;
}

/* Waits until the workers did `target` operations in all (or the end). */
static bool m_wait_ops(model_t *m, long target)
{
    pthread_mutex_lock(&m->mu);
    while (!atomic_load(&m->done) && atomic_load(&m->ops) < target) {
        struct timespec ts;
        abs_after(&ts, 20);
        pthread_cond_timedwait(&m->cv, &m->mu, &ts);
    }
    pthread_mutex_unlock(&m->mu);
    return !atomic_load(&m->done);
}

/* Another writer, straight to the store, paced by the workers. */
static void *m_external(void *p)
{
    model_t *m = p;
    tctx_t *t = m->t;
    uint64_t rng = m->seed ^ 0xE7E7E7E7ull;
    for (long n = 1; m_wait_ops(m, n * 3); n++) {
        int idx = (int)(rnd_next(&rng) % M_KEYS);
        char key[128], val[48], end[128];
        snprintf(key, sizeof(key), "%sg%d/k%02d", t->pfx, idx / M_GROUP, idx);
        snprintf(val, sizeof(val), "k%02d:x:%ld", idx, n);
        cache_op_t ops[3];
        memset(ops, 0, sizeof(ops));
        size_t nops = 1;
        unsigned op = (unsigned)(rnd_next(&rng) % 100);
        ops[0].key = key;
        ops[0].keylen = strlen(key);
        if (op < 60) {
            ops[0].type = CACHE_OP_PUT;
            ops[0].value = val;
            ops[0].vallen = strlen(val);
        } else if (op < 92) {
            ops[0].type = CACHE_OP_DELETE;
        } else if (op < 95) {
            /* Delete the whole group. */
            ops[0].type = CACHE_OP_DELETE;
            ops[0].keylen = t->pfxlen + 3;
            memcpy(end, key, ops[0].keylen);
            end[ops[0].keylen - 1] = '/' + 1;
            ops[0].end = end;
            ops[0].endlen = ops[0].keylen;
        } else {
            /* Three puts in one txn. */
            static _Thread_local char k3[3][128], v3[3][48];
            for (int i = 0; i < 3; i++) {
                int j = (idx + i * 7) % M_KEYS;
                snprintf(k3[i], sizeof(k3[i]), "%sg%d/k%02d", t->pfx,
                         j / M_GROUP, j);
                snprintf(v3[i], sizeof(v3[i]), "k%02d:x:%ld", j, n);
                ops[i].type = CACHE_OP_PUT;
                ops[i].key = k3[i];
                ops[i].keylen = strlen(k3[i]);
                ops[i].value = v3[i];
                ops[i].vallen = strlen(v3[i]);
            }
            nops = 3;
        }
        int64_t rev = 0;
        int rc = ext_txn_rc(t->inner, ops, nops, &rev);
        if (rc != 0)
            m_fail(m, "external writer: %s", coalesce_err_name(rc));
        atomic_fetch_add(&m->ext_writes, 1);
    }
    return NULL;
}

/* What a network and a server do to the watch (memstore hooks): episodes
 * separated by quiet stretches, each leaving the watch unheld. */
static void *m_chaos(void *p)
{
    model_t *m = p;
    tctx_t *t = m->t;
    cache_store_t *s = t->inner;
    uint64_t rng = m->seed ^ 0xC4A05ull;
    int64_t compacted = 0;
    while (m_wait_ops(m, atomic_load(&m->ops) + 10 +
                             (long)(rnd_next(&rng) % 50))) {
        int rc = 0;
        unsigned a = (unsigned)(rnd_next(&rng) % 100);
        long span = 5 + (long)(rnd_next(&rng) % 40);
        if (a < 30) {
            /* Delayed, then delivered per revision or as one batch. */
            rc = cache_memstore_hold(s, 1);
            m_wait_ops(m, atomic_load(&m->ops) + span);
            if (!rc && rnd_next(&rng) % 2)
                rc = cache_memstore_flush(s, CACHE_FLUSH_BATCH);
            if (!rc && rnd_next(&rng) % 2)
                rc = cache_memstore_progress(s);
        } else if (a < 42) {
            rc = cache_memstore_progress(s);
        } else if (a < 52) {
            rc = cache_memstore_cut(s, COALESCE_EIO);
        } else if (a < 62) {
            /* A connection that loses what was in flight, then breaks. */
            rc = cache_memstore_hold(s, 1);
            m_wait_ops(m, atomic_load(&m->ops) + span);
            if (!rc)
                rc = cache_memstore_flush(s, CACHE_FLUSH_DROP);
            if (!rc)
                rc = cache_memstore_cut(s, COALESCE_EIO);
        } else if (a < 72) {
            /* Down long enough for a compaction: the resume relists. */
            rc = cache_memstore_hold(s, 1);
            m_wait_ops(m, atomic_load(&m->ops) + span);
            int64_t cur = store_rev(t);
            if (!rc && cur > compacted) {
                rc = cache_memstore_compact(s, cur);
                compacted = cur;
            }
            if (!rc)
                rc = cache_memstore_cut(s, COALESCE_EIO);
        } else if (a < 77) {
            rc = cache_memstore_cut(s, COALESCE_EDECODE);
        } else if (a < 82) {
            /* History trimmed under a live watch: no effect on it. */
            int64_t cur = store_rev(t);
            if (cur > compacted + 1) {
                int64_t to =
                    compacted + 1 +
                    (int64_t)(rnd_next(&rng) % (uint64_t)(cur - compacted));
                rc = cache_memstore_compact(s, to);
                compacted = to;
            }
        }
        if (rc == 0)
            rc = cache_memstore_hold(s, 0);
        if (rc != 0)
            m_fail(m, "chaos episode %u: %s", a, coalesce_err_name(rc));
        atomic_fetch_add(&m->chaos_actions, 1);
    }
    if (cache_memstore_hold(s, 0) != 0)
        m_fail(m, "chaos: hold(0) failed");
    return NULL;
}

START_TEST(test_model_random)
{
    TINIT(0);
    t_start(t);
    model_t m;
    memset(&m, 0, sizeof(m));
    m.t = t;
    const char *env = getenv("CACHE_MODEL_SEED");
    m.seed = env ? strtoull(env, NULL, 0)
                 : ((uint64_t)time(NULL) << 16) ^ (uint64_t)getpid();
    if (m.seed == 0)
        m.seed = 1;
    atomic_init(&m.done, 0);
    atomic_init(&m.ops, 0);
    m.max_ops = 4000;
    m.deadline = now_ms() + 3000;
    m.chaos = has_hooks(t) && !getenv("CACHE_MODEL_NO_CHAOS");
    pthread_mutex_init(&m.mu, NULL);
    pthread_cond_init(&m.cv, NULL);
    mworker_t w[M_WORKERS];
    for (int i = 0; i < M_WORKERS; i++) {
        memset(&w[i], 0, sizeof(w[i]));
        w[i].m = &m;
        w[i].id = i;
        w[i].rng = m.seed * (uint64_t)(2 * i + 3) + 0x9E3779B97F4A7C15ull;
        ck_assert_int_eq(pthread_create(&w[i].th, NULL, m_worker, &w[i]), 0);
    }
    pthread_t ext, chaos;
    ck_assert_int_eq(pthread_create(&ext, NULL, m_external, &m), 0);
    if (m.chaos)
        ck_assert_int_eq(pthread_create(&chaos, NULL, m_chaos, &m), 0);
    for (int i = 0; i < M_WORKERS; i++)
        pthread_join(w[i].th, NULL);
    atomic_store(&m.done, 1);
    pthread_mutex_lock(&m.mu);
    pthread_cond_broadcast(&m.cv);
    pthread_mutex_unlock(&m.mu);
    pthread_join(ext, NULL);
    if (m.chaos)
        pthread_join(chaos, NULL);
    if (getenv("CACHE_MODEL_VERBOSE")) {
        cache_health_t hv = HEALTH();
        fprintf(stderr,
                "model seed %" PRIu64 ": %ld ops, %ld reads, %ld writes, "
                "%ld conflicts, %ld external, %ld chaos; relists %" PRIu64
                ", reconnects %" PRIu64 ", events %" PRIu64 "\n",
                m.seed, atomic_load(&m.ops), atomic_load(&m.reads),
                atomic_load(&m.writes), atomic_load(&m.conflicts),
                atomic_load(&m.ext_writes), atomic_load(&m.chaos_actions),
                hv.relists, hv.reconnects, hv.events);
    }
    ck_assert_msg(m.nerr == 0, "%ld violations (seed %" PRIu64 "); first: %s",
                  m.nerr, m.seed, m.err);
    ck_assert_int_gt(atomic_load(&m.writes), 0);
    ck_assert_int_gt(atomic_load(&m.reads), 0);
    /* An event after everything: the watch is back and caught up. */
    int64_t last = ext_put(t, "sentinel", "k99:");
    int rc = cache_wait_fresh(t->c, last, ms_scaled(20000));
    ck_assert_msg(rc == 0, "final wait_fresh: %s (seed %" PRIu64 ")",
                  coalesce_err_name(rc), m.seed);
    kvlist_t s, c;
    store_list(t, t->pfx, t->pfxlen, &s);
    ASSERT_OK(cache_list(t->c, t->pfx, t->pfxlen, &c));
    char msg[600];
    int d = kvl_diff(&s, &c, msg, sizeof(msg));
    kvl_free(&s);
    kvl_free(&c);
    ck_assert_msg(d == 0, "store vs cache after the run (seed %" PRIu64 "): %s",
                  m.seed, msg);
    WAIT_HEALTH(t->c, hw_.state == CACHE_RUNNING);
    cache_health_t h = HEALTH();
    ck_assert_uint_eq(h.tombstones, 0);
    ck_assert_uint_eq(h.range_tombstones, 0);
    assert_health_counts(t);
    pthread_cond_destroy(&m.cv);
    pthread_mutex_destroy(&m.mu);
    t_finish(t);
}
END_TEST

/* =========================================================================
 * Allocation failures
 * ========================================================================= */

START_TEST(test_oom_new_start_write)
{
    TINIT(0);
    ext_put(t, "a", "1");
    ext_put(t, "b", "2");
    for (long n = 0; n < MAX_INJECT; n++) {
        cache_t *c = NULL;
        test_alloc_fail_after(n);
        int rc = cache_new(&c, t->store, t->pfx, t->pfxlen, &t->opts);
        int failed = test_alloc_failed();
        test_alloc_fail_after(-1);
        if (rc == 0) {
            cache_free(c);
            if (!failed)
                break;
        } else {
            ASSERT_RC(rc, COALESCE_ENOMEM);
        }
    }
    t->c = t_new_cache(t, &t->opts);
    for (long n = 0; n < MAX_INJECT; n++) {
        test_alloc_fail_after(n);
        int rc = cache_start(t->c);
        int failed = test_alloc_failed();
        test_alloc_fail_after(-1);
        if (rc == 0) {
            cache_stop(t->c);
            if (!failed)
                break;
        } else {
            ASSERT_RC(rc, COALESCE_ENOMEM);
            ck_assert_int_eq(HEALTH().state, CACHE_STOPPED);
        }
    }
    ASSERT_OK(cache_start(t->c));
    assert_same(t);
    for (long n = 0; n < MAX_INJECT; n++) {
        char v[32];
        snprintf(v, sizeof(v), "%ld", n);
        int64_t rev = 0;
        test_alloc_fail_after(n);
        int rc = cache_put(t->c, KEY("a"), STR(v), NULL, &rev);
        int failed = test_alloc_failed();
        test_alloc_fail_after(-1);
        ck_assert_msg(rc == 0 || rc == COALESCE_ENOMEM, "put %ld: %s", n,
                      coalesce_err_name(rc));
        if (rc == 0 && !failed)
            break;
    }
    for (long n = 0; n < MAX_INJECT; n++) {
        cache_txn_op_t ops[2] = {
            txop(CACHE_TXN_PUT, KEY("c"), "3", 0),
            txop(CACHE_TXN_DELETE, KEY("b"), NULL, 0),
        };
        int64_t rev = 0;
        test_alloc_fail_after(n);
        int rc = cache_txn(t->c, ops, 2, &rev);
        int failed = test_alloc_failed();
        test_alloc_fail_after(-1);
        ck_assert_msg(rc == 0 || rc == COALESCE_ENOMEM, "txn %ld: %s", n,
                      coalesce_err_name(rc));
        if (rc == 0 && !failed)
            break;
    }
    assert_same(t);
    t_finish(t);
}
END_TEST

/* A relist while degraded keeps no copy but still moves W to its revision:
 * the watch goes on from there, and a resume must not ask for less (found
 * by test/fuzz/fuzz_cache.c, seed bug_degraded_relist_keeps_w). */
START_TEST(test_wc_degraded_relist_moves_w)
{
    TINIT(0);
    ext_put(t, "k1", "v");
    ext_put(t, "k2", "v");
    t->opts.max_entries = 1;
    t_start(t);
    ck_assert(replog_wait(&t->log, CACHE_REPORT_OVERFLOW, 1, WAIT_MS));
    ck_assert_int_eq(HEALTH().state, CACHE_DEGRADED);
    /* The store moves on outside the prefix and is compacted past W + 1. */
    ext_put_outside(t, "x");
    int64_t r = ext_put_outside(t, "y");
    ASSERT_OK(cache_memstore_compact(t->inner, r));
    cut(t, COALESCE_EIO);
    ck_assert(replog_wait(&t->log, CACHE_REPORT_RELISTED, 1, WAIT_MS));
    pthread_mutex_lock(&t->log.mu);
    int64_t r1 = t->log.rev[CACHE_REPORT_RELISTED];
    pthread_mutex_unlock(&t->log.mu);
    ck_assert_int_ge(r1, r);
    ck_assert_int_eq(HEALTH().watch_rev, r1);
    ASSERT_OK(cache_wait_fresh(t->c, r1, 0));
    ck_assert_int_eq(HEALTH().state, CACHE_DEGRADED);
    t_finish(t);
}
END_TEST

/* =========================================================================
 * The suite
 * ========================================================================= */

/* Adds tt once per fixture that has the capabilities needed. */
static void add_fx(TCase *tc, const TTest *tt, unsigned need)
{
    for (int i = 0; i < NFIX; i++)
        if ((fixtures[i].caps & need) == need)
            tcase_add_loop_test(tc, tt, i, i + 1);
}

#define ADD(tc, tt)       add_fx((tc), (tt), 0)
#define ADD_HOOKS(tc, tt) add_fx((tc), (tt), CAP_HOOKS)

Suite *make_cache_suite(void)
{
    Suite *s = suite_create("cache");

    TCase *tc = tcase(s, "B.1 reference", 10);
    ADD(tc, test_b1_get_existing);
    ADD(tc, test_b1_get_distinct);
    ADD(tc, test_b1_updates_via_watch);
    ADD(tc, test_b1_not_found);
    ADD(tc, test_b1_get_prefix);
    ADD(tc, test_b1_put_successful);
    ADD(tc, test_b1_failed_update);
    ADD(tc, test_b1_create);
    ADD(tc, test_b1_txn_put);
    ADD(tc, test_b1_delete_exists);
    ADD(tc, test_b1_delete_absent);
    ADD(tc, test_b1_delete_txn);
    ADD(tc, test_b1_delete_prefix);
    ADD(tc, test_b1_delete_prefix_txn);
    ADD(tc, test_b1_delete_value_ok);
    ADD(tc, test_b1_delete_value_fail);
    ADD(tc, test_b1_delete_value_txn);

    tc = tcase(s, "B.2 ordering", 10);
    ADD(tc, test_b2_stale_put_after_watch_delete);
    ADD(tc, test_b2_stale_delete_after_watch_put);
    ADD(tc, test_b2_tombstone_blocks_stale_put);
    ADD_HOOKS(tc, test_b2_tombstone_allows_newer_put);
    ADD(tc, test_b2_delete_then_watch_event);

    tc = tcase(s, "X1-X4 batches, loads, prefix deletes", 10);
    ADD_HOOKS(tc, test_x1_catch_up_batch);
    ADD_HOOKS(tc, test_x1_partial_batch_header);
    ADD(tc, test_x2_empty_load_sets_w);
    ADD_HOOKS(tc, test_x2_delayed_write_through_after_empty_relist);
    ADD(tc, test_x2_delayed_write_through_after_empty_load);
    ADD(tc, test_x3_delete_prefix_blocks_unseen_put);
    ADD_HOOKS(tc, test_x3_delete_prefix_held_reader);
    ADD(tc, test_x4_delete_prefix_exact_bytes);

    tc = tcase(s, "X5-X8 watch recovery", 15);
    ADD_HOOKS(tc, test_x5_compaction_relist);
    ADD_HOOKS(tc, test_x5_compaction_relist_legacy_erange);
    ADD_HOOKS(tc, test_x5_relist_keeps_newer_write_through);
    ADD_HOOKS(tc, test_x5_relist_keeps_prefix_delete);
    ADD_HOOKS(tc, test_x6_resume_after_cut);
    ADD(tc, test_x7_put_absent_version_one);
    ADD_HOOKS(tc, test_x8_decode_error_reported);

    tc = tcase(s, "X9-X13 txns, prefixes, order, lifecycle", 20);
    ADD(tc, test_x9_txn_all_or_none);
    ADD(tc, test_x10_outside_prefix);
    ADD(tc, test_x11_byte_order);
    ADD(tc, test_x11_all_ff_cache_prefix);
    ADD(tc, test_x12_stop_during_flow);
    ADD(tc, test_x13_start_failure_then_start);
    ADD(tc, test_x13_compacted_between_pages);

    tc = tcase(s, "X14-X20 TTL, GC, freshness, reports", 20);
    ADD(tc, test_x14_ttl);
    ADD_HOOKS(tc, test_x15_tombstone_gc_progress);
    ADD(tc, test_x16_no_aba);
    ADD_HOOKS(tc, test_x17_progress_raises_w);
    ADD(tc, test_x19_wait_fresh);
    ADD_HOOKS(tc, test_x20_slow_report_never_blocks_watch);

    tc = tcase(s, "WC requirements", 15);
    ADD(tc, test_wc_lifecycle);
    ADD(tc, test_wc_concurrent_start_stop);
    ADD(tc, test_wc_values_outlive_changes);
    ADD(tc, test_wc_range_tombstone_blocks_seen_key);
    ADD(tc, test_wc_txn_validation);
    ADD(tc, test_wc_ttl_lease_not_leaked);
    ADD(tc, test_wc_bounds_entries);
    ADD(tc, test_wc_bounds_bytes_and_load);
    ADD(tc, test_wc_health);

    tc = tcase(s, "model", 90);
    ADD(tc, test_model_random);

    tc = tcase(s, "allocation failures", 60);
    ADD(tc, test_oom_new_start_write);

    tc = tcase(s, "regressions", 15);
    ADD_HOOKS(tc, test_wc_degraded_relist_moves_w);

    return s;
}

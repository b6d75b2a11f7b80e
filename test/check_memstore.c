/*
 * Tests for the in-memory store (include/coalesce/store.h): revisions and
 * metadata, ranges (paging, past revisions, compaction), transactions,
 * watches, the test hooks, leases, concurrency and allocation failures.
 *
 * Rules (as in check_flight.c):
 *  - test_alloc_live() is back to its starting value at the end of every
 *    test: every watch canceled, the store freed.
 *  - Watch callbacks run on store threads and never call ck_assert; they
 *    record what they saw (wrec_t) and the main thread checks it.
 *  - Threads are synchronised with counters and barriers, never sleeps; a
 *    test waits for the responses it expects, bounded by the TCase timeout.
 */
#include "helpers.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ALL_KEY ""
#define ALL_END "\0"

/* --- Store helpers -------------------------------------------------------- */

static cache_store_t *store_new(int64_t auto_compact)
{
    cache_memstore_opts_t o;
    cache_memstore_opts_init(&o);
    o.auto_compact_revs = auto_compact;
    cache_store_t *s = NULL;
    ck_assert_int_eq(cache_memstore_new(&s, &o), 0);
    ck_assert_ptr_nonnull(s);
    return s;
}

static int64_t rev_of(cache_store_t *s)
{
    return cache_memstore_revision(s);
}

static cache_op_t op_put(const char *key, const char *val, int64_t lease)
{
    cache_op_t o;
    memset(&o, 0, sizeof(o));
    o.type = CACHE_OP_PUT;
    o.key = key;
    o.keylen = strlen(key);
    o.value = val;
    o.vallen = strlen(val);
    o.lease = lease;
    return o;
}

/* end NULL: the key only. */
static cache_op_t op_del(const char *key, const char *end)
{
    cache_op_t o;
    memset(&o, 0, sizeof(o));
    o.type = CACHE_OP_DELETE;
    o.key = key;
    o.keylen = strlen(key);
    o.end = end;
    o.endlen = end ? (strlen(end) ? strlen(end) : 1) : 0;
    return o;
}

static int txn_ops(cache_store_t *s,
                   const cache_op_t *ops,
                   size_t n,
                   int64_t *rev,
                   cache_op_result_t *res)
{
    int ok = -1;
    int rc = s->ops->txn(s, NULL, 0, ops, n, &ok, rev, res);
    if (rc == 0)
        ck_assert_int_eq(ok, 1);
    return rc;
}

static int64_t
put_lease(cache_store_t *s, const char *key, const char *val, int64_t lease)
{
    cache_op_t o = op_put(key, val, lease);
    int64_t rev = 0;
    ck_assert_int_eq(txn_ops(s, &o, 1, &rev, NULL), 0);
    return rev;
}

static int64_t put(cache_store_t *s, const char *key, const char *val)
{
    return put_lease(s, key, val, 0);
}

/* Deletes key (end NULL) or [key, end); returns the keys deleted. */
static int64_t
del(cache_store_t *s, const char *key, const char *end, int64_t *rev)
{
    cache_op_t o = op_del(key, end);
    cache_op_result_t res;
    memset(&res, 0, sizeof(res));
    ck_assert_int_eq(txn_ops(s, &o, 1, rev, &res), 0);
    return res.deleted;
}

/* A key and its metadata, copied out of a range. */
typedef struct kv {
    char key[48];
    size_t keylen;
    char val[48];
    size_t vallen;
    int64_t create, mod, version, lease;
} kv_t;

typedef struct ms_list {
    kv_t *v;
    size_t n, cap;
    size_t stop_after; /* 0: never stop */
} ms_list_t;

static int kvlist_cb(void *data, const cache_kv_t *kv)
{
    ms_list_t *l = data;
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 64;
        l->v = realloc(l->v, l->cap * sizeof(*l->v));
        ck_assert_ptr_nonnull(l->v);
    }
    kv_t *o = &l->v[l->n++];
    memset(o, 0, sizeof(*o));
    ck_assert_uint_lt(kv->keylen, sizeof(o->key));
    ck_assert_uint_lt(kv->vallen, sizeof(o->val));
    ck_assert_ptr_nonnull(kv->value);
    memcpy(o->key, kv->key, kv->keylen);
    o->keylen = kv->keylen;
    memcpy(o->val, kv->value, kv->vallen);
    o->vallen = kv->vallen;
    o->create = kv->create_rev;
    o->mod = kv->mod_rev;
    o->version = kv->version;
    o->lease = kv->lease;
    return l->stop_after && l->n >= l->stop_after;
}

static void kvlist_free(ms_list_t *l)
{
    free(l->v);
    memset(l, 0, sizeof(*l));
}

static int range(cache_store_t *s,
                 const char *key,
                 size_t keylen,
                 const char *end,
                 size_t endlen,
                 int64_t rev,
                 size_t limit,
                 ms_list_t *out,
                 int64_t *hdr,
                 int *more)
{
    return s->ops->range(s, key, keylen, end, endlen, rev, limit, kvlist_cb,
                         out, hdr, more);
}

/* The key at rev: 1 and *out if it exists then, 0 if not. */
static int get(cache_store_t *s, const char *key, int64_t rev, kv_t *out)
{
    ms_list_t l = {0};
    int64_t hdr = -1;
    int more = -1;
    ck_assert_int_eq(
        range(s, key, strlen(key), NULL, 0, rev, 0, &l, &hdr, &more), 0);
    ck_assert_int_eq(more, 0);
    ck_assert_uint_le(l.n, 1);
    int found = l.n == 1;
    if (found) {
        ck_assert_uint_eq(l.v[0].keylen, strlen(key));
        ck_assert_mem_eq(l.v[0].key, key, strlen(key));
        if (out)
            *out = l.v[0];
    }
    kvlist_free(&l);
    return found;
}

static void assert_meta(const kv_t *kv,
                        const char *val,
                        int64_t create,
                        int64_t mod,
                        int64_t version,
                        int64_t lease)
{
    ck_assert_uint_eq(kv->vallen, strlen(val));
    ck_assert_mem_eq(kv->val, val, strlen(val));
    ck_assert_int_eq(kv->create, create);
    ck_assert_int_eq(kv->mod, mod);
    ck_assert_int_eq(kv->version, version);
    ck_assert_int_eq(kv->lease, lease);
}

/* --- Watch recorder ------------------------------------------------------- */

typedef struct evrec {
    int type;
    char key[48];
    size_t keylen;
    char val[48];
    size_t vallen;
    bool has_val;
    int64_t create, mod, version, lease;
} evrec_t;

typedef struct resprec {
    int64_t revision;
    int error;
    int64_t compact;
    size_t n;
    size_t first; /* Index of its first event. */
} resprec_t;

typedef struct wrec {
    pthread_mutex_t mu;
    resprec_t *r;
    size_t nr, maxr;
    evrec_t *e;
    size_t ne, maxe;
    counter_t resps;     /* +1 per response */
    counter_t events;    /* +n per response */
    int64_t last_mod;    /* Highest event revision seen. */
    atomic_int problems; /* Out of order, split revision, overflow... */
    atomic_int in_cb;
    atomic_bool closed;      /* Set once watch_cancel returned. */
    atomic_int after_close;  /* Callbacks after that: must stay 0. */
    atomic_int after_cancel; /* Callbacks after a canceling one. */
    bool ended;              /* A canceling response came. */
    bool spin;               /* Widen the callback. */
} wrec_t;

static void wrec_init(wrec_t *w, size_t maxr, size_t maxe)
{
    memset(w, 0, sizeof(*w));
    pthread_mutex_init(&w->mu, NULL);
    w->maxr = maxr;
    w->maxe = maxe;
    w->r = calloc(maxr, sizeof(*w->r));
    w->e = calloc(maxe, sizeof(*w->e));
    ck_assert_ptr_nonnull(w->r);
    ck_assert_ptr_nonnull(w->e);
    counter_init(&w->resps);
    counter_init(&w->events);
}

static void wrec_destroy(wrec_t *w)
{
    free(w->r);
    free(w->e);
    counter_destroy(&w->resps);
    counter_destroy(&w->events);
    pthread_mutex_destroy(&w->mu);
}

static void wrec_cb(void *data, const cache_watch_resp_t *resp)
{
    wrec_t *w = data;
    atomic_fetch_add(&w->in_cb, 1);
    if (atomic_load(&w->closed))
        atomic_fetch_add(&w->after_close, 1);
    if (w->spin)
        for (volatile int k = 0; k < 20000; k = k + 1) {
        }
    pthread_mutex_lock(&w->mu);
    if (w->ended)
        atomic_fetch_add(&w->after_cancel, 1);
    if (resp->error)
        w->ended = true;
    if (w->nr < w->maxr) {
        resprec_t *r = &w->r[w->nr++];
        r->revision = resp->revision;
        r->error = resp->error;
        r->compact = resp->compact_revision;
        r->n = resp->n;
        r->first = w->ne;
    } else {
        atomic_fetch_add(&w->problems, 1);
    }
    if ((resp->n && !resp->events) || (resp->error && resp->n))
        atomic_fetch_add(&w->problems, 1);
    for (size_t i = 0; i < resp->n; i++) {
        const cache_event_t *ev = &resp->events[i];
        /* Revisions rise across responses; one revision never spans two. */
        if (ev->kv.mod_rev < w->last_mod ||
            (i == 0 && ev->kv.mod_rev == w->last_mod))
            atomic_fetch_add(&w->problems, 1);
        w->last_mod = ev->kv.mod_rev;
        if (w->ne >= w->maxe || ev->kv.keylen >= sizeof(w->e->key) ||
            ev->kv.vallen >= sizeof(w->e->val)) {
            atomic_fetch_add(&w->problems, 1);
            continue;
        }
        evrec_t *e = &w->e[w->ne++];
        e->type = ev->type;
        memcpy(e->key, ev->kv.key, ev->kv.keylen);
        e->keylen = ev->kv.keylen;
        e->has_val = ev->kv.value != NULL;
        if (ev->kv.value)
            memcpy(e->val, ev->kv.value, ev->kv.vallen);
        e->vallen = ev->kv.vallen;
        e->create = ev->kv.create_rev;
        e->mod = ev->kv.mod_rev;
        e->version = ev->kv.version;
        e->lease = ev->kv.lease;
    }
    pthread_mutex_unlock(&w->mu);
    atomic_fetch_sub(&w->in_cb, 1);
    counter_add(&w->events, (long)resp->n);
    counter_add(&w->resps, 1);
}

static cache_watch_t *watch_on(cache_store_t *s,
                               const char *key,
                               size_t keylen,
                               const char *end,
                               size_t endlen,
                               int64_t start,
                               wrec_t *w)
{
    cache_watch_t *h = NULL;
    ck_assert_int_eq(
        s->ops->watch(s, key, keylen, end, endlen, start, wrec_cb, w, &h), 0);
    ck_assert_ptr_nonnull(h);
    return h;
}

static cache_watch_t *watch_all(cache_store_t *s, int64_t start, wrec_t *w)
{
    return watch_on(s, ALL_KEY, 0, ALL_END, 1, start, w);
}

/* Response i, once it arrived. */
static resprec_t resp_at(wrec_t *w, size_t i)
{
    counter_wait(&w->resps, (long)i + 1);
    pthread_mutex_lock(&w->mu);
    ck_assert_uint_gt(w->nr, i);
    resprec_t r = w->r[i];
    pthread_mutex_unlock(&w->mu);
    return r;
}

static evrec_t ev_at(wrec_t *w, size_t i)
{
    pthread_mutex_lock(&w->mu);
    ck_assert_uint_gt(w->ne, i);
    evrec_t e = w->e[i];
    pthread_mutex_unlock(&w->mu);
    return e;
}

static size_t nresps(wrec_t *w)
{
    pthread_mutex_lock(&w->mu);
    size_t n = w->nr;
    pthread_mutex_unlock(&w->mu);
    return n;
}

static void
assert_event(const evrec_t *e, int type, const char *key, int64_t mod)
{
    ck_assert_int_eq(e->type, type);
    ck_assert_uint_eq(e->keylen, strlen(key));
    ck_assert_mem_eq(e->key, key, strlen(key));
    ck_assert_int_eq(e->mod, mod);
    if (type == CACHE_EV_DELETE) {
        ck_assert_int_eq(e->has_val, 0);
        ck_assert_int_eq(e->create, 0);
        ck_assert_int_eq(e->version, 0);
    } else {
        ck_assert_int_eq(e->has_val, 1);
    }
}

/* Response i carries events of one revision rev, n of them. */
static resprec_t assert_resp(wrec_t *w, size_t i, int64_t rev, size_t n)
{
    resprec_t r = resp_at(w, i);
    ck_assert_int_eq(r.error, 0);
    ck_assert_int_eq(r.revision, rev);
    ck_assert_uint_eq(r.n, n);
    return r;
}

static void cancel(cache_store_t *s, cache_watch_t *h, wrec_t *w)
{
    s->ops->watch_cancel(s, h);
    atomic_store(&w->closed, true);
    ck_assert_int_eq(atomic_load(&w->in_cb), 0);
    ck_assert_int_eq(atomic_load(&w->problems), 0);
    ck_assert_int_eq(atomic_load(&w->after_cancel), 0);
}

/* --- Revisions and metadata ----------------------------------------------- */

START_TEST(ms_revisions_and_metadata)
{
    LEAK_START();
    cache_store_t *s = store_new(0);
    kv_t kv;
    ck_assert_int_eq(rev_of(s), 1); /* etcd: a new store is at 1 */

    ck_assert_int_eq(put(s, "a", "1"), 2);
    ck_assert_int_eq(get(s, "a", 0, &kv), 1);
    assert_meta(&kv, "1", 2, 2, 1, 0);

    ck_assert_int_eq(put(s, "a", "2"), 3);
    ck_assert_int_eq(get(s, "a", 0, &kv), 1);
    assert_meta(&kv, "2", 2, 3, 2, 0);

    ck_assert_int_eq(put(s, "b", ""), 4);
    ck_assert_int_eq(get(s, "b", 0, &kv), 1);
    assert_meta(&kv, "", 4, 4, 1, 0);

    int64_t rev = 0;
    ck_assert_int_eq(del(s, "a", NULL, &rev), 1);
    ck_assert_int_eq(rev, 5);
    ck_assert_int_eq(get(s, "a", 0, NULL), 0);

    /* Deleting what is not there changes nothing: no new revision. */
    ck_assert_int_eq(del(s, "a", NULL, &rev), 0);
    ck_assert_int_eq(rev, 5);
    ck_assert_int_eq(del(s, "x", "z", &rev), 0);
    ck_assert_int_eq(rev, 5);
    ck_assert_int_eq(rev_of(s), 5);

    /* An empty txn succeeds at the current revision. */
    int ok = 0;
    ck_assert_int_eq(s->ops->txn(s, NULL, 0, NULL, 0, &ok, &rev, NULL), 0);
    ck_assert_int_eq(ok, 1);
    ck_assert_int_eq(rev, 5);

    /* Re-created: a new life, version 1. */
    ck_assert_int_eq(put(s, "a", "3"), 6);
    ck_assert_int_eq(get(s, "a", 0, &kv), 1);
    assert_meta(&kv, "3", 6, 6, 1, 0);

    /* History. */
    ck_assert_int_eq(get(s, "a", 1, NULL), 0);
    ck_assert_int_eq(get(s, "a", 2, &kv), 1);
    assert_meta(&kv, "1", 2, 2, 1, 0);
    ck_assert_int_eq(get(s, "a", 4, &kv), 1);
    assert_meta(&kv, "2", 2, 3, 2, 0);
    ck_assert_int_eq(get(s, "a", 5, NULL), 0);
    ck_assert_int_eq(get(s, "b", 3, NULL), 0);
    ck_assert_int_eq(get(s, "b", 6, &kv), 1);
    assert_meta(&kv, "", 4, 4, 1, 0);

    cache_store_free(s);
    cache_store_free(NULL);
    LEAK_CHECK();
}
END_TEST

/* --- Ranges --------------------------------------------------------------- */

START_TEST(ms_range_paging)
{
    LEAK_START();
    cache_store_t *s = store_new(0);
    enum { N = 1000, PAGE = 100 };
    char keys[N][16];
    put(s, "o", "before");
    for (int b = 0; b < N / 100; b++) {
        cache_op_t ops[100];
        for (int i = 0; i < 100; i++) {
            int k = b * 100 + i;
            snprintf(keys[k], sizeof(keys[k]), "p/%04d", k);
            ops[i] = op_put(keys[k], keys[k], 0);
        }
        ck_assert_int_eq(txn_ops(s, ops, 100, NULL, NULL), 0);
    }
    put(s, "q", "after");
    put(s, "p", "prefix itself"); /* Before "p/" in byte order. */

    /* First page at the latest revision pins R0. */
    ms_list_t l = {0};
    int64_t r0 = 0;
    int more = 0;
    ck_assert_int_eq(range(s, "p/", 2, "p0", 2, 0, PAGE, &l, &r0, &more), 0);
    ck_assert_int_eq(r0, rev_of(s));
    ck_assert_int_eq(more, 1);
    ck_assert_uint_eq(l.n, PAGE);

    /* Writes after R0 must not show in the pinned pages. */
    int64_t rev;
    ck_assert_int_eq(del(s, "p/0500", "p/0600", &rev), 100);
    put(s, "p/0001", "changed");
    put(s, "p/9999", "new");

    while (more) {
        char from[32];
        size_t fl = l.v[l.n - 1].keylen;
        memcpy(from, l.v[l.n - 1].key, fl);
        from[fl++] = 0; /* The next key after the last one. */
        int64_t hdr = 0;
        ck_assert_int_eq(range(s, from, fl, "p0", 2, r0, PAGE, &l, &hdr, &more),
                         0);
        ck_assert_int_eq(hdr, r0);
    }
    ck_assert_uint_eq(l.n, N);
    for (int i = 0; i < N; i++) {
        ck_assert_uint_eq(l.v[i].keylen, 6);
        ck_assert_mem_eq(l.v[i].key, keys[i], 6);
        ck_assert_mem_eq(l.v[i].val, keys[i], 6);
    }
    kvlist_free(&l);

    /* more: exactly at the limit is not more. */
    ck_assert_int_eq(range(s, "p/", 2, "p0", 2, r0, N, &l, NULL, &more), 0);
    ck_assert_uint_eq(l.n, N);
    ck_assert_int_eq(more, 0);
    kvlist_free(&l);
    ck_assert_int_eq(range(s, "p/", 2, "p0", 2, r0, N - 1, &l, NULL, &more), 0);
    ck_assert_uint_eq(l.n, N - 1);
    ck_assert_int_eq(more, 1);
    kvlist_free(&l);

    /* The latest revision: 100 deleted, one added. */
    ck_assert_int_eq(range(s, "p/", 2, "p0", 2, 0, 0, &l, NULL, &more), 0);
    ck_assert_uint_eq(l.n, N - 100 + 1);
    ck_assert_int_eq(more, 0);
    for (size_t i = 1; i < l.n; i++)
        ck_assert_int_lt(memcmp(l.v[i - 1].key, l.v[i].key, 6), 0);
    kvlist_free(&l);

    /* A single key at R0 and now. */
    kv_t kv;
    ck_assert_int_eq(get(s, "p/0001", r0, &kv), 1);
    ck_assert_mem_eq(kv.val, "p/0001", 6);
    ck_assert_int_eq(get(s, "p/0001", 0, &kv), 1);
    ck_assert_mem_eq(kv.val, "changed", 7);

    /* "\0" as the end: every key from the start key on. */
    ck_assert_int_eq(range(s, "p/9", 3, "\0", 1, 0, 0, &l, NULL, &more), 0);
    ck_assert_uint_eq(l.n, 2);
    ck_assert_mem_eq(l.v[0].key, "p/9999", 6);
    ck_assert_mem_eq(l.v[1].key, "q", 1);
    kvlist_free(&l);
    /* Everything: empty start, "\0" end; shorter keys first. */
    ck_assert_int_eq(range(s, "", 0, "\0", 1, 0, 3, &l, NULL, &more), 0);
    ck_assert_uint_eq(l.n, 3);
    ck_assert_int_eq(more, 1);
    ck_assert_mem_eq(l.v[0].key, "o", 1);
    ck_assert_mem_eq(l.v[1].key, "p", 1);
    ck_assert_uint_eq(l.v[1].keylen, 1);
    ck_assert_mem_eq(l.v[2].key, "p/0000", 6);
    kvlist_free(&l);

    /* An end before the key: nothing. */
    ck_assert_int_eq(range(s, "q", 1, "p", 1, 0, 0, &l, NULL, &more), 0);
    ck_assert_uint_eq(l.n, 0);

    /* The callback stops the range. */
    l.stop_after = 3;
    ck_assert_int_eq(range(s, "p/", 2, "p0", 2, 0, 0, &l, NULL, &more), 0);
    ck_assert_uint_eq(l.n, 3);
    kvlist_free(&l);

    /* Bad revisions and arguments. */
    int64_t hdr = 77;
    ck_assert_int_eq(
        range(s, "p/", 2, "p0", 2, rev_of(s) + 1, 0, &l, &hdr, &more),
        COALESCE_ECOMPACTED);
    ck_assert_int_eq(hdr, 77);
    ck_assert_int_eq(range(s, "p/", 2, "p0", 2, -1, 0, &l, NULL, NULL),
                     COALESCE_EINVAL);
    ck_assert_int_eq(range(s, "", 0, NULL, 0, 0, 0, &l, NULL, NULL),
                     COALESCE_EINVAL);
    ck_assert_int_eq(range(s, NULL, 3, NULL, 0, 0, 0, &l, NULL, NULL),
                     COALESCE_EINVAL);
    ck_assert_uint_eq(l.n, 0);
    /* No callback: only the header and more. */
    ck_assert_int_eq(
        s->ops->range(s, "p/", 2, "p0", 2, 0, 1, NULL, NULL, &hdr, &more), 0);
    ck_assert_int_eq(more, 1);
    ck_assert_int_eq(hdr, rev_of(s));

    cache_store_free(s);
    LEAK_CHECK();
}
END_TEST

START_TEST(ms_range_compaction)
{
    LEAK_START();
    cache_store_t *s = store_new(0);
    kv_t kv;
    int64_t rev;
    put(s, "a", "v1");       /* 2 */
    put(s, "a", "v2");       /* 3 */
    put(s, "b", "b1");       /* 4 */
    del(s, "b", NULL, &rev); /* 5 */
    put(s, "c", "c1");       /* 6 */
    put(s, "a", "v3");       /* 7 */
    ck_assert_int_eq(rev, 5);

    ck_assert_int_eq(cache_memstore_compact(s, 5), 0);
    ms_list_t l = {0};
    ck_assert_int_eq(range(s, "a", 1, NULL, 0, 4, 0, &l, NULL, NULL),
                     COALESCE_ECOMPACTED);
    ck_assert_int_eq(range(s, "", 0, "\0", 1, 1, 0, &l, NULL, NULL),
                     COALESCE_ECOMPACTED);
    ck_assert_uint_eq(l.n, 0);
    /* At the compact revision itself every key reads as it was. */
    ck_assert_int_eq(get(s, "a", 5, &kv), 1);
    assert_meta(&kv, "v2", 2, 3, 2, 0);
    ck_assert_int_eq(get(s, "b", 5, NULL), 0);
    ck_assert_int_eq(get(s, "c", 5, NULL), 0);
    ck_assert_int_eq(get(s, "c", 6, &kv), 1);
    assert_meta(&kv, "c1", 6, 6, 1, 0);
    ck_assert_int_eq(get(s, "a", 7, &kv), 1);
    assert_meta(&kv, "v3", 2, 7, 3, 0);

    /* Compacting again there, below, or in the future. */
    ck_assert_int_eq(cache_memstore_compact(s, 5), COALESCE_ECOMPACTED);
    ck_assert_int_eq(cache_memstore_compact(s, 4), COALESCE_ECOMPACTED);
    ck_assert_int_eq(cache_memstore_compact(s, 8), COALESCE_ECOMPACTED);
    ck_assert_int_eq(cache_memstore_compact(s, 7), 0);
    ck_assert_int_eq(range(s, "a", 1, NULL, 0, 6, 0, &l, NULL, NULL),
                     COALESCE_ECOMPACTED);
    ck_assert_int_eq(range(s, "", 0, "\0", 1, 7, 0, &l, NULL, NULL), 0);
    ck_assert_uint_eq(l.n, 2); /* a, c */
    kvlist_free(&l);

    /* A key deleted before the compaction starts a new life. */
    ck_assert_int_eq(put(s, "b", "b2"), 8);
    ck_assert_int_eq(get(s, "b", 0, &kv), 1);
    assert_meta(&kv, "b2", 8, 8, 1, 0);
    ck_assert_int_eq(del(s, "", "\0", &rev), 3); /* "": from the first */
    ck_assert_int_eq(rev, 9);
    ck_assert_int_eq(cache_memstore_compact(s, 9), 0);
    ck_assert_int_eq(range(s, "", 0, "\0", 1, 0, 0, &l, NULL, NULL), 0);
    ck_assert_uint_eq(l.n, 0);
    ck_assert_int_eq(rev_of(s), 9);

    /* Not an in-memory store. */
    static const cache_store_ops_t other_ops = {.version =
                                                    CACHE_STORE_OPS_VERSION};
    cache_store_t other = {&other_ops};
    ck_assert_int_eq(cache_memstore_compact(&other, 1), COALESCE_EINVAL);
    ck_assert_int_eq(cache_memstore_revision(&other), COALESCE_EINVAL);
    ck_assert_int_eq(cache_memstore_hold(&other, 1), COALESCE_EINVAL);
    ck_assert_int_eq(cache_memstore_flush(&other, 0), COALESCE_EINVAL);
    ck_assert_int_eq(cache_memstore_cut(&other, COALESCE_EIO), COALESCE_EINVAL);
    ck_assert_int_eq(cache_memstore_progress(&other), COALESCE_EINVAL);
    ck_assert_int_eq(cache_memstore_watches(&other), COALESCE_EINVAL);
    ck_assert_int_eq(cache_memstore_compact(NULL, 1), COALESCE_EINVAL);
    cache_store_free(&other); /* No destroy: a no-op. */

    cache_store_free(s);
    LEAK_CHECK();
}
END_TEST

START_TEST(ms_auto_compact)
{
    LEAK_START();
    cache_store_t *s = store_new(3);
    for (int i = 0; i < 10; i++)
        put(s, "k", "v");
    ck_assert_int_eq(rev_of(s), 11);
    kv_t kv;
    ck_assert_int_eq(get(s, "k", 8, &kv), 1);
    ck_assert_int_eq(kv.mod, 8);
    ms_list_t l = {0};
    ck_assert_int_eq(range(s, "k", 1, NULL, 0, 7, 0, &l, NULL, NULL),
                     COALESCE_ECOMPACTED);
    /* A watch from the compacted part is canceled, one at its edge runs. */
    wrec_t a, b;
    wrec_init(&a, 8, 8);
    wrec_init(&b, 8, 8);
    cache_watch_t *wa = watch_all(s, 7, &a);
    cache_watch_t *wb = watch_all(s, 8, &b);
    resprec_t r = resp_at(&a, 0);
    ck_assert_int_eq(r.error, COALESCE_ECOMPACTED);
    ck_assert_int_eq(r.compact, 8);
    r = assert_resp(&b, 0, 11, 4);
    cancel(s, wa, &a);
    cancel(s, wb, &b);
    wrec_destroy(&a);
    wrec_destroy(&b);
    cache_store_free(s);

    /* Options. */
    cache_memstore_opts_t o;
    cache_memstore_opts_init(&o);
    ck_assert_uint_eq(o.size, sizeof(o));
    ck_assert_int_eq(o.auto_compact_revs, 0);
    cache_memstore_opts_init(NULL);
    o.auto_compact_revs = -1;
    ck_assert_int_eq(cache_memstore_new(&s, &o), COALESCE_EINVAL);
    cache_memstore_opts_init(&o);
    o.size = 1;
    ck_assert_int_eq(cache_memstore_new(&s, &o), COALESCE_EINVAL);
    ck_assert_int_eq(cache_memstore_new(NULL, NULL), COALESCE_EINVAL);
    ck_assert_int_eq(cache_memstore_new(&s, NULL), 0);
    ck_assert_int_eq(s->ops->version, CACHE_STORE_OPS_VERSION);
    cache_store_free(s);
    LEAK_CHECK();
}
END_TEST

/* --- Transactions --------------------------------------------------------- */

static cache_cmp_t cmp_num(const char *key, int target, int result, int64_t n)
{
    cache_cmp_t c;
    memset(&c, 0, sizeof(c));
    c.key = key;
    c.keylen = strlen(key);
    c.target = target;
    c.result = result;
    c.number = n;
    return c;
}

static cache_cmp_t cmp_val(const char *key, int result, const char *v)
{
    cache_cmp_t c = cmp_num(key, CACHE_CMP_VALUE, result, 0);
    c.value = v;
    c.vallen = strlen(v);
    return c;
}

/* Runs cmp with a put of "side"; checks that exactly a success changed
 * anything. Returns succeeded. */
static int try_cmp(cache_store_t *s, const cache_cmp_t *c)
{
    int64_t before = rev_of(s);
    cache_op_t o = op_put("side", "x", 0);
    cache_op_result_t res;
    memset(&res, 0x5A, sizeof(res));
    int ok = -1;
    int64_t rev = 0;
    ck_assert_int_eq(s->ops->txn(s, c, 1, &o, 1, &ok, &rev, &res), 0);
    ck_assert(ok == 0 || ok == 1);
    if (ok) {
        ck_assert_int_eq(rev, before + 1);
        ck_assert_int_eq(res.has_prev, before > 4); /* side exists */
    } else {
        cache_op_result_t untouched;
        memset(&untouched, 0x5A, sizeof(untouched));
        ck_assert_int_eq(rev, before);
        ck_assert_mem_eq(&res, &untouched, sizeof(res));
    }
    ck_assert_int_eq(rev_of(s), before + ok);
    return ok;
}

START_TEST(ms_txn_compares)
{
    LEAK_START();
    cache_store_t *s = store_new(0);
    int64_t lease = 0;
    ck_assert_int_eq(s->ops->lease_grant(s, 600000, &lease), 0);
    put(s, "k", "mm");              /* 2: create 2 */
    put(s, "other", "o");           /* 3 */
    put_lease(s, "k", "mm", lease); /* 4: version 2, mod 4 */

    static const int targets[] = {CACHE_CMP_VERSION, CACHE_CMP_CREATE,
                                  CACHE_CMP_MOD, CACHE_CMP_LEASE};
    const int64_t have[] = {2, 2, 4, lease};
    for (int t = 0; t < 4; t++) {
        for (int64_t d = -1; d <= 1; d++) {
            int64_t n = have[t] + d; /* The key's value compared with n. */
            cache_cmp_t c;
            c = cmp_num("k", targets[t], CACHE_CMP_EQUAL, n);
            ck_assert_int_eq(try_cmp(s, &c), d == 0);
            c = cmp_num("k", targets[t], CACHE_CMP_NOT_EQUAL, n);
            ck_assert_int_eq(try_cmp(s, &c), d != 0);
            c = cmp_num("k", targets[t], CACHE_CMP_GREATER, n);
            ck_assert_int_eq(try_cmp(s, &c), d < 0);
            c = cmp_num("k", targets[t], CACHE_CMP_LESS, n);
            ck_assert_int_eq(try_cmp(s, &c), d > 0);
        }
    }
    /* Values compare as bytes; a prefix is less. */
    static const struct {
        const char *v;
        int sign; /* sign of compare("mm", v) */
    } vals[] = {{"ml", 1}, {"mm", 0},   {"mn", -1},
                {"m", 1},  {"mmm", -1}, {"", 1}};
    for (size_t i = 0; i < sizeof(vals) / sizeof(vals[0]); i++) {
        cache_cmp_t c;
        int sg = vals[i].sign;
        c = cmp_val("k", CACHE_CMP_EQUAL, vals[i].v);
        ck_assert_int_eq(try_cmp(s, &c), sg == 0);
        c = cmp_val("k", CACHE_CMP_NOT_EQUAL, vals[i].v);
        ck_assert_int_eq(try_cmp(s, &c), sg != 0);
        c = cmp_val("k", CACHE_CMP_GREATER, vals[i].v);
        ck_assert_int_eq(try_cmp(s, &c), sg > 0);
        c = cmp_val("k", CACHE_CMP_LESS, vals[i].v);
        ck_assert_int_eq(try_cmp(s, &c), sg < 0);
    }

    /* A missing key: numbers are 0; a value compare always fails (etcd). */
    cache_cmp_t c;
    c = cmp_num("nope", CACHE_CMP_VERSION, CACHE_CMP_EQUAL, 0);
    ck_assert_int_eq(try_cmp(s, &c), 1);
    c = cmp_num("nope", CACHE_CMP_CREATE, CACHE_CMP_LESS, 1);
    ck_assert_int_eq(try_cmp(s, &c), 1);
    c = cmp_num("nope", CACHE_CMP_MOD, CACHE_CMP_GREATER, 0);
    ck_assert_int_eq(try_cmp(s, &c), 0);
    c = cmp_num("nope", CACHE_CMP_LEASE, CACHE_CMP_EQUAL, 0);
    ck_assert_int_eq(try_cmp(s, &c), 1);
    c = cmp_val("nope", CACHE_CMP_EQUAL, "");
    ck_assert_int_eq(try_cmp(s, &c), 0);
    c = cmp_val("nope", CACHE_CMP_NOT_EQUAL, "x");
    ck_assert_int_eq(try_cmp(s, &c), 0);
    /* A deleted key is missing. */
    int64_t rev;
    put(s, "gone", "g");
    del(s, "gone", NULL, &rev);
    c = cmp_num("gone", CACHE_CMP_CREATE, CACHE_CMP_EQUAL, 0);
    ck_assert_int_eq(try_cmp(s, &c), 1);

    /* Every compare must hold; a failure changes nothing at all. */
    int64_t before = rev_of(s);
    cache_cmp_t two[2] = {
        cmp_num("k", CACHE_CMP_VERSION, CACHE_CMP_EQUAL, 2),
        cmp_val("other", CACHE_CMP_EQUAL, "not it"),
    };
    cache_op_t ops[3] = {op_put("k", "changed", 0), op_del("other", NULL),
                         op_put("fresh", "f", 0)};
    int ok = -1;
    ck_assert_int_eq(s->ops->txn(s, two, 2, ops, 3, &ok, &rev, NULL), 0);
    ck_assert_int_eq(ok, 0);
    ck_assert_int_eq(rev, before);
    ck_assert_int_eq(rev_of(s), before);
    kv_t kv;
    ck_assert_int_eq(get(s, "k", 0, &kv), 1);
    assert_meta(&kv, "mm", 2, 4, 2, lease);
    ck_assert_int_eq(get(s, "other", 0, NULL), 1);
    ck_assert_int_eq(get(s, "fresh", 0, NULL), 0);
    two[1] = cmp_val("other", CACHE_CMP_EQUAL, "o");
    ck_assert_int_eq(s->ops->txn(s, two, 2, ops, 3, &ok, &rev, NULL), 0);
    ck_assert_int_eq(ok, 1);
    ck_assert_int_eq(rev, before + 1);
    ck_assert_int_eq(get(s, "other", 0, NULL), 0);
    ck_assert_int_eq(get(s, "fresh", 0, &kv), 1);
    assert_meta(&kv, "f", before + 1, before + 1, 1, 0);
    /* A put without a lease drops the key's lease. */
    ck_assert_int_eq(get(s, "k", 0, &kv), 1);
    assert_meta(&kv, "changed", 2, before + 1, 3, 0);

    /* Bad compares. */
    c = cmp_num("k", 5, CACHE_CMP_EQUAL, 0);
    ck_assert_int_eq(s->ops->txn(s, &c, 1, NULL, 0, &ok, &rev, NULL),
                     COALESCE_EINVAL);
    c = cmp_num("k", CACHE_CMP_MOD, 4, 0);
    ck_assert_int_eq(s->ops->txn(s, &c, 1, NULL, 0, &ok, &rev, NULL),
                     COALESCE_EINVAL);
    c = cmp_num("", CACHE_CMP_MOD, CACHE_CMP_EQUAL, 0);
    ck_assert_int_eq(s->ops->txn(s, &c, 1, NULL, 0, &ok, &rev, NULL),
                     COALESCE_EINVAL);
    ck_assert_int_eq(s->ops->txn(s, NULL, 1, NULL, 0, &ok, &rev, NULL),
                     COALESCE_EINVAL);

    cache_store_free(s);
    LEAK_CHECK();
}
END_TEST

START_TEST(ms_txn_limits)
{
    LEAK_START();
    cache_store_t *s = store_new(0);
    enum { MAXOPS = CACHE_TXN_MAX_OPS };
    static char keys[MAXOPS + 1][16];
    static cache_op_t ops[MAXOPS + 1];
    static cache_cmp_t cmps[MAXOPS + 1];
    for (int i = 0; i <= MAXOPS; i++) {
        snprintf(keys[i], sizeof(keys[i]), "k%03d", i);
        ops[i] = op_put(keys[i], "v", 0);
        cmps[i] = cmp_num(keys[i], CACHE_CMP_VERSION, CACHE_CMP_EQUAL, 0);
    }
    int ok = -1;
    int64_t rev = 0;
    ck_assert_int_eq(s->ops->txn(s, NULL, 0, ops, MAXOPS + 1, &ok, &rev, NULL),
                     COALESCE_EINVAL);
    ck_assert_int_eq(
        s->ops->txn(s, cmps, MAXOPS + 1, ops, MAXOPS, &ok, &rev, NULL),
        COALESCE_EINVAL);
    ck_assert_int_eq(rev_of(s), 1);
    /* 128 of each is fine, all at one revision. */
    ck_assert_int_eq(s->ops->txn(s, cmps, MAXOPS, ops, MAXOPS, &ok, &rev, NULL),
                     0);
    ck_assert_int_eq(ok, 1);
    ck_assert_int_eq(rev, 2);
    ms_list_t l = {0};
    ck_assert_int_eq(range(s, "k", 1, "l", 1, 0, 0, &l, NULL, NULL), 0);
    ck_assert_uint_eq(l.n, MAXOPS);
    for (size_t i = 0; i < l.n; i++)
        ck_assert_int_eq(l.v[i].mod, 2);
    kvlist_free(&l);

    /* A key put twice, a put inside a delete of the same txn. */
    cache_op_t bad[3];
    bad[0] = op_put("a", "1", 0);
    bad[1] = op_put("b", "1", 0);
    bad[2] = op_put("a", "2", 0);
    ck_assert_int_eq(txn_ops(s, bad, 3, NULL, NULL), COALESCE_EINVAL);
    bad[2] = op_del("k000", "k200");
    bad[1] = op_put("k100", "1", 0);
    ck_assert_int_eq(txn_ops(s, bad, 3, NULL, NULL), COALESCE_EINVAL);
    bad[1] = op_put("k", "1", 0); /* Before the range: fine below. */
    bad[2] = op_del("a", NULL);   /* The same key, deleted. */
    ck_assert_int_eq(txn_ops(s, bad, 3, NULL, NULL), COALESCE_EINVAL);
    bad[2] = op_del("", "\0"); /* Everything. */
    ck_assert_int_eq(txn_ops(s, bad, 3, NULL, NULL), COALESCE_EINVAL);
    ck_assert_int_eq(rev_of(s), 2);

    /* Overlapping deletes are fine; a key is deleted once. */
    cache_op_result_t res[3];
    bad[0] = op_del("k000", "k010");
    bad[1] = op_del("k005", "k020");
    bad[2] = op_put("k", "1", 0);
    ck_assert_int_eq(txn_ops(s, bad, 3, &rev, res), 0);
    ck_assert_int_eq(rev, 3);
    ck_assert_int_eq(res[0].deleted, 10);
    ck_assert_int_eq(res[1].deleted, 10);
    ck_assert_int_eq(res[2].has_prev, 0);

    /* Malformed ops. */
    cache_op_t o = op_put("", "v", 0);
    ck_assert_int_eq(txn_ops(s, &o, 1, NULL, NULL), COALESCE_EINVAL);
    o = op_del("", NULL);
    ck_assert_int_eq(txn_ops(s, &o, 1, NULL, NULL), COALESCE_EINVAL);
    o = op_put("x", "v", 0);
    o.type = 7;
    ck_assert_int_eq(txn_ops(s, &o, 1, NULL, NULL), COALESCE_EINVAL);
    o = op_put("x", "v", 0);
    o.value = NULL;
    ck_assert_int_eq(txn_ops(s, &o, 1, NULL, NULL), COALESCE_EINVAL);
    o = op_put("x", "v", -3);
    ck_assert_int_eq(txn_ops(s, &o, 1, NULL, NULL), COALESCE_EINVAL);
    o = op_del("x", NULL);
    o.endlen = 3;
    ck_assert_int_eq(txn_ops(s, &o, 1, NULL, NULL), COALESCE_EINVAL);
    ck_assert_int_eq(s->ops->txn(s, NULL, 0, NULL, 2, &ok, &rev, NULL),
                     COALESCE_EINVAL);

    /* An unknown lease fails the whole txn. */
    bad[0] = op_put("x", "1", 0);
    bad[1] = op_put("y", "1", 999);
    ck_assert_int_eq(txn_ops(s, bad, 2, NULL, NULL), COALESCE_ENOENT);
    ck_assert_int_eq(get(s, "x", 0, NULL), 0);
    ck_assert_int_eq(rev_of(s), 3);

    cache_store_free(s);
    LEAK_CHECK();
}
END_TEST

START_TEST(ms_txn_results)
{
    LEAK_START();
    cache_store_t *s = store_new(0);
    put(s, "a", "a1"); /* 2 */
    put(s, "b", "b1"); /* 3 */
    put(s, "b", "b2"); /* 4 */
    put(s, "c1", "c"); /* 5 */
    put(s, "d1", "d"); /* 6 */
    wrec_t w;
    wrec_init(&w, 8, 16);
    cache_watch_t *h = watch_all(s, 0, &w);

    cache_op_t ops[5] = {op_put("b", "b3", 0), op_put("n", "n1", 0),
                         op_del("a", NULL), op_del("c", "e"),
                         op_del("zz", NULL)};
    cache_op_result_t res[5];
    memset(res, 0x5A, sizeof(res));
    int64_t rev = 0;
    ck_assert_int_eq(txn_ops(s, ops, 5, &rev, res), 0);
    ck_assert_int_eq(rev, 7);
    ck_assert_int_eq(res[0].has_prev, 1);
    ck_assert_int_eq(res[0].prev_create_rev, 3);
    ck_assert_int_eq(res[0].prev_version, 2);
    ck_assert_int_eq(res[1].has_prev, 0);
    ck_assert_int_eq(res[1].prev_create_rev, 0);
    ck_assert_int_eq(res[1].prev_version, 0);
    ck_assert_int_eq(res[2].deleted, 1);
    ck_assert_int_eq(res[3].deleted, 2);
    ck_assert_int_eq(res[4].deleted, 0);
    kv_t kv;
    ck_assert_int_eq(get(s, "b", 0, &kv), 1);
    assert_meta(&kv, "b3", 3, 7, 3, 0);
    ck_assert_int_eq(get(s, "n", 0, &kv), 1);
    assert_meta(&kv, "n1", 7, 7, 1, 0);

    /* One response, the txn's events in op order. */
    assert_resp(&w, 0, 7, 5);
    evrec_t e = ev_at(&w, 0);
    assert_event(&e, CACHE_EV_PUT, "b", 7);
    ck_assert_int_eq(e.create, 3);
    ck_assert_int_eq(e.version, 3);
    ck_assert_mem_eq(e.val, "b3", 2);
    e = ev_at(&w, 1);
    assert_event(&e, CACHE_EV_PUT, "n", 7);
    ck_assert_int_eq(e.create, 7);
    ck_assert_int_eq(e.version, 1);
    e = ev_at(&w, 2);
    assert_event(&e, CACHE_EV_DELETE, "a", 7);
    e = ev_at(&w, 3);
    assert_event(&e, CACHE_EV_DELETE, "c1", 7);
    e = ev_at(&w, 4);
    assert_event(&e, CACHE_EV_DELETE, "d1", 7);

    cancel(s, h, &w);
    wrec_destroy(&w);
    cache_store_free(s);
    LEAK_CHECK();
}
END_TEST

/* --- Watches -------------------------------------------------------------- */

START_TEST(ms_watch_catch_up)
{
    LEAK_START();
    cache_store_t *s = store_new(0);
    put(s, "w/1", "1"); /* 2 */
    put(s, "w/2", "2"); /* 3 */
    put(s, "x", "x");   /* 4: outside */
    put(s, "w/1", "3"); /* 5 */
    int64_t rev;
    del(s, "w/2", NULL, &rev); /* 6 */
    put(s, "x", "y");          /* 7 */

    wrec_t w;
    wrec_init(&w, 16, 16);
    cache_watch_t *h = watch_on(s, "w/", 2, "w0", 2, 3, &w);
    /* One batch, stamped with the current revision. */
    assert_resp(&w, 0, 7, 3);
    evrec_t e = ev_at(&w, 0);
    assert_event(&e, CACHE_EV_PUT, "w/2", 3);
    e = ev_at(&w, 1);
    assert_event(&e, CACHE_EV_PUT, "w/1", 5);
    ck_assert_int_eq(e.create, 2);
    ck_assert_int_eq(e.version, 2);
    ck_assert_mem_eq(e.val, "3", 1);
    e = ev_at(&w, 2);
    assert_event(&e, CACHE_EV_DELETE, "w/2", 6);

    /* Then live, one revision per response, only the watched range. */
    put(s, "x", "z");   /* 8 */
    put(s, "w/3", "3"); /* 9 */
    assert_resp(&w, 1, 9, 1);
    e = ev_at(&w, 3);
    assert_event(&e, CACHE_EV_PUT, "w/3", 9);

    /* A watch from the current revision gets its last change. */
    wrec_t w2;
    wrec_init(&w2, 8, 8);
    cache_watch_t *h2 = watch_on(s, "w/3", 3, NULL, 0, 9, &w2);
    assert_resp(&w2, 0, 9, 1);
    put(s, "w/3", "again"); /* 10 */
    assert_resp(&w2, 1, 10, 1);
    assert_resp(&w, 2, 10, 1);

    ck_assert_int_eq(cache_memstore_watches(s), 2);
    cancel(s, h, &w);
    cancel(s, h2, &w2);
    ck_assert_int_eq(cache_memstore_watches(s), 0);
    wrec_destroy(&w);
    wrec_destroy(&w2);
    cache_store_free(s);
    LEAK_CHECK();
}
END_TEST

START_TEST(ms_watch_from_now_and_future)
{
    LEAK_START();
    cache_store_t *s = store_new(0);
    put(s, "a", "1"); /* 2 */
    wrec_t w, f;
    wrec_init(&w, 8, 8);
    wrec_init(&f, 8, 8);
    cache_watch_t *h = watch_on(s, "a", 1, NULL, 0, 0, &w);
    cache_watch_t *hf = watch_all(s, 5, &f); /* Not there yet. */
    put(s, "a", "2");                        /* 3 */
    put(s, "b", "1");                        /* 4 */
    put(s, "a", "3");                        /* 5 */
    /* In order: had 2 or 4 come, they would be first. */
    assert_resp(&w, 0, 3, 1);
    assert_resp(&w, 1, 5, 1);
    assert_resp(&f, 0, 5, 1);
    evrec_t e = ev_at(&w, 0);
    assert_event(&e, CACHE_EV_PUT, "a", 3);
    ck_assert_int_eq(e.version, 2);
    cancel(s, h, &w);
    cancel(s, hf, &f);

    /* Bad arguments. */
    cache_watch_t *x = SENTINEL(cache_watch_t);
    ck_assert_int_eq(s->ops->watch(s, "a", 1, NULL, 0, -1, wrec_cb, &w, &x),
                     COALESCE_EINVAL);
    ck_assert_int_eq(s->ops->watch(s, "a", 1, NULL, 0, 0, NULL, &w, &x),
                     COALESCE_EINVAL);
    ck_assert_int_eq(s->ops->watch(s, "", 0, NULL, 0, 0, wrec_cb, &w, &x),
                     COALESCE_EINVAL);
    ck_assert_int_eq(s->ops->watch(s, "a", 1, NULL, 0, 0, wrec_cb, &w, NULL),
                     COALESCE_EINVAL);
    ck_assert_ptr_eq(x, SENTINEL(cache_watch_t));
    wrec_destroy(&w);
    wrec_destroy(&f);
    cache_store_free(s);
    LEAK_CHECK();
}
END_TEST

START_TEST(ms_watch_compacted)
{
    LEAK_START();
    cache_store_t *s = store_new(0);
    for (int i = 0; i < 5; i++)
        put(s, "k", "v"); /* 2..6 */
    ck_assert_int_eq(cache_memstore_compact(s, 5), 0);

    wrec_t c, a, b;
    wrec_init(&c, 8, 8);
    wrec_init(&a, 8, 8);
    wrec_init(&b, 8, 8);
    cache_watch_t *hc = watch_all(s, 3, &c);
    resprec_t r = resp_at(&c, 0);
    ck_assert_int_eq(r.error, COALESCE_ECOMPACTED);
    ck_assert_int_eq(r.compact, 5);
    ck_assert_uint_eq(r.n, 0);

    /* Exactly at the compact revision: accepted, from that revision. */
    cache_watch_t *ha = watch_all(s, 5, &a);
    assert_resp(&a, 0, 6, 2);
    evrec_t e = ev_at(&a, 0);
    assert_event(&e, CACHE_EV_PUT, "k", 5);
    ck_assert_int_eq(e.version, 4);

    /* A running watch is not canceled by a later compaction. */
    cache_watch_t *hb = watch_all(s, 0, &b);
    put(s, "k", "v"); /* 7 */
    put(s, "k", "v"); /* 8 */
    ck_assert_int_eq(cache_memstore_compact(s, 8), 0);
    assert_resp(&b, 0, 7, 1);
    assert_resp(&b, 1, 8, 1);
    assert_resp(&a, 1, 7, 1);
    assert_resp(&a, 2, 8, 1);

    /* The canceled one heard nothing more; it lives until canceled. */
    ck_assert_uint_eq(nresps(&c), 1);
    ck_assert_int_eq(cache_memstore_watches(s), 3);
    cancel(s, hc, &c);
    cancel(s, ha, &a);
    cancel(s, hb, &b);
    ck_assert_int_eq(cache_memstore_watches(s), 0);
    wrec_destroy(&c);
    wrec_destroy(&a);
    wrec_destroy(&b);
    cache_store_free(s);
    LEAK_CHECK();
}
END_TEST

/* --- Hooks ---------------------------------------------------------------- */

START_TEST(ms_hold_and_flush)
{
    LEAK_START();
    cache_store_t *s = store_new(0);
    wrec_t w;
    wrec_init(&w, 32, 32);
    cache_watch_t *h = watch_all(s, 0, &w);

    ck_assert_int_eq(cache_memstore_hold(s, 1), 0);
    put(s, "a", "1"); /* 2 */
    put(s, "b", "1"); /* 3 */
    put(s, "c", "1"); /* 4 */
    ck_assert_uint_eq(nresps(&w), 0);
    /* EACH: one response per revision; still holding. */
    ck_assert_int_eq(cache_memstore_flush(s, CACHE_FLUSH_EACH), 0);
    assert_resp(&w, 0, 2, 1);
    assert_resp(&w, 1, 3, 1);
    assert_resp(&w, 2, 4, 1);

    /* BATCH: everything held in one response, stamped now. */
    cache_op_t two[2] = {op_put("d", "1", 0), op_put("e", "1", 0)};
    ck_assert_int_eq(txn_ops(s, two, 2, NULL, NULL), 0); /* 5 */
    put(s, "f", "1");                                    /* 6 */
    ck_assert_int_eq(cache_memstore_flush(s, CACHE_FLUSH_BATCH), 0);
    assert_resp(&w, 3, 6, 3);
    evrec_t e = ev_at(&w, 3);
    assert_event(&e, CACHE_EV_PUT, "d", 5);
    e = ev_at(&w, 4);
    assert_event(&e, CACHE_EV_PUT, "e", 5);
    e = ev_at(&w, 5);
    assert_event(&e, CACHE_EV_PUT, "f", 6);

    /* DROP: lost; the watch goes on after them. */
    put(s, "g", "1"); /* 7 */
    ck_assert_int_eq(cache_memstore_flush(s, CACHE_FLUSH_DROP), 0);
    put(s, "h", "1"); /* 8 */
    ck_assert_int_eq(cache_memstore_flush(s, CACHE_FLUSH_BATCH), 0);
    assert_resp(&w, 4, 8, 1);
    e = ev_at(&w, 6);
    assert_event(&e, CACHE_EV_PUT, "h", 8);

    /* A held catch-up comes out one revision per response too. */
    wrec_t c;
    wrec_init(&c, 32, 32);
    cache_watch_t *hc = watch_all(s, 6, &c);
    put(s, "i", "1"); /* 9 */
    put(s, "j", "1"); /* 10 */
    ck_assert_int_eq(cache_memstore_hold(s, 0), 0);
    assert_resp(&w, 5, 9, 1);
    assert_resp(&w, 6, 10, 1);
    assert_resp(&c, 0, 6, 1);
    assert_resp(&c, 1, 7, 1); /* Dropped for w only. */
    assert_resp(&c, 2, 8, 1);
    assert_resp(&c, 3, 9, 1);
    assert_resp(&c, 4, 10, 1);

    /* Not holding: straight through. */
    put(s, "k", "1"); /* 11 */
    assert_resp(&w, 7, 11, 1);
    assert_resp(&c, 5, 11, 1);
    /* Flushing with nothing held is harmless. */
    ck_assert_int_eq(cache_memstore_flush(s, CACHE_FLUSH_BATCH), 0);
    ck_assert_int_eq(cache_memstore_flush(s, 3), COALESCE_EINVAL);
    ck_assert_int_eq(cache_memstore_flush(s, -1), COALESCE_EINVAL);

    cancel(s, h, &w);
    cancel(s, hc, &c);
    wrec_destroy(&w);
    wrec_destroy(&c);
    cache_store_free(s);
    LEAK_CHECK();
}
END_TEST

START_TEST(ms_cut)
{
    LEAK_START();
    cache_store_t *s = store_new(0);
    wrec_t w, w2;
    wrec_init(&w, 8, 8);
    wrec_init(&w2, 8, 8);
    cache_watch_t *h = watch_all(s, 0, &w);
    put(s, "a", "1"); /* 2: delivered */
    ck_assert_int_eq(cache_memstore_hold(s, 1), 0);
    put(s, "b", "1"); /* 3: held, lost by the cut */
    ck_assert_int_eq(cache_memstore_cut(s, COALESCE_EIO), 0);
    assert_resp(&w, 0, 2, 1);
    resprec_t r = resp_at(&w, 1);
    ck_assert_int_eq(r.error, COALESCE_EIO);
    ck_assert_uint_eq(r.n, 0);
    ck_assert_int_eq(cache_memstore_hold(s, 0), 0);

    /* The cache opens a new watch from its resume point. */
    put(s, "c", "1"); /* 4 */
    cache_watch_t *h2 = watch_all(s, 3, &w2);
    assert_resp(&w2, 0, 4, 2);
    evrec_t e = ev_at(&w2, 0);
    assert_event(&e, CACHE_EV_PUT, "b", 3);
    ck_assert_int_eq(cache_memstore_watches(s), 2);
    cancel(s, h, &w);
    ck_assert_uint_eq(nresps(&w), 2);
    ck_assert_int_eq(cache_memstore_watches(s), 1);

    /* Not holding: what was queued comes first, then the cancel. */
    put(s, "d", "1"); /* 5 */
    ck_assert_int_eq(cache_memstore_cut(s, COALESCE_EDECODE), 0);
    assert_resp(&w2, 1, 5, 1);
    r = resp_at(&w2, 2);
    ck_assert_int_eq(r.error, COALESCE_EDECODE);
    /* Over: nothing more, even a second cut or progress. */
    ck_assert_int_eq(cache_memstore_cut(s, COALESCE_EIO), 0);
    ck_assert_int_eq(cache_memstore_progress(s), 0);
    put(s, "e", "1");
    ck_assert_int_eq(cache_memstore_cut(s, 0), COALESCE_EINVAL);
    cancel(s, h2, &w2);
    ck_assert_uint_eq(nresps(&w2), 3);
    wrec_destroy(&w);
    wrec_destroy(&w2);
    cache_store_free(s);
    LEAK_CHECK();
}
END_TEST

START_TEST(ms_progress)
{
    LEAK_START();
    cache_store_t *s = store_new(0);
    wrec_t w;
    wrec_init(&w, 16, 16);
    cache_watch_t *h = watch_on(s, "a", 1, "b", 1, 0, &w);
    ck_assert_int_eq(cache_memstore_progress(s), 0);
    assert_resp(&w, 0, 1, 0);
    put(s, "a", "1"); /* 2 */
    put(s, "z", "1"); /* 3: outside, but progress covers it */
    ck_assert_int_eq(cache_memstore_progress(s), 0);
    assert_resp(&w, 1, 2, 1);
    assert_resp(&w, 2, 3, 0);

    /* Held progress keeps its place among the events. */
    ck_assert_int_eq(cache_memstore_hold(s, 1), 0);
    put(s, "a", "2"); /* 4 */
    ck_assert_int_eq(cache_memstore_progress(s), 0);
    put(s, "a", "3"); /* 5 */
    ck_assert_int_eq(cache_memstore_hold(s, 0), 0);
    assert_resp(&w, 3, 4, 1);
    assert_resp(&w, 4, 4, 0);
    assert_resp(&w, 5, 5, 1);

    /* BATCH: the events, then the progress notifications. */
    ck_assert_int_eq(cache_memstore_hold(s, 1), 0);
    put(s, "a", "4"); /* 6 */
    ck_assert_int_eq(cache_memstore_progress(s), 0);
    put(s, "a", "5"); /* 7 */
    ck_assert_int_eq(cache_memstore_flush(s, CACHE_FLUSH_BATCH), 0);
    assert_resp(&w, 6, 7, 2);
    assert_resp(&w, 7, 6, 0);
    /* DROP takes held progress with it. */
    put(s, "a", "6"); /* 8 */
    ck_assert_int_eq(cache_memstore_progress(s), 0);
    ck_assert_int_eq(cache_memstore_flush(s, CACHE_FLUSH_DROP), 0);
    ck_assert_int_eq(cache_memstore_hold(s, 0), 0);
    ck_assert_int_eq(cache_memstore_progress(s), 0);
    assert_resp(&w, 8, 8, 0);

    cancel(s, h, &w);
    wrec_destroy(&w);
    cache_store_free(s);
    LEAK_CHECK();
}
END_TEST

/* --- Leases --------------------------------------------------------------- */

START_TEST(ms_lease_expiry)
{
    LEAK_START();
    cache_store_t *s = store_new(0);
    int64_t shortl = 0, longl = 0, x = 0;
    ck_assert_int_eq(s->ops->lease_grant(s, -1, &x), COALESCE_EINVAL);
    /* As etcd: a TTL of 0 is refused, not rounded up. */
    ck_assert_int_eq(s->ops->lease_grant(s, 0, &x), COALESCE_EINVAL);
    ck_assert_int_eq(s->ops->lease_grant(s, 1, NULL), COALESCE_EINVAL);
    ck_assert_int_eq(s->ops->lease_grant(s, 600000, &longl), 0);
    ck_assert_int_eq(s->ops->lease_grant(s, 60000, &x), 0);
    wrec_t w;
    wrec_init(&w, 32, 32);
    cache_watch_t *h = watch_all(s, 0, &w);
    /* The writes happen before the short lease exists, so they cannot lose
     * a race with its expiry. */
    put_lease(s, "c", "1", longl); /* 2 */
    put_lease(s, "d", "1", x);     /* 3 */
    ck_assert_int_eq(s->ops->lease_grant(s, 100, &shortl), 0);
    cache_op_t ops[2] = {op_put("a", "1", shortl), op_put("b", "1", shortl)};
    int rc = txn_ops(s, ops, 2, NULL, NULL);
    if (rc == COALESCE_ENOENT) {
        /* Expired already (a very slow machine): the test cannot run. */
        cancel(s, h, &w);
        wrec_destroy(&w);
        cache_store_free(s);
        return;
    }
    ck_assert_int_eq(rc, 0); /* 4 */
    kv_t kv;
    ck_assert_int_eq(get(s, "a", 0, &kv), 1);
    ck_assert_int_eq(kv.lease, shortl);

    /* Expiry: both keys in one new revision. */
    assert_resp(&w, 0, 2, 1);
    assert_resp(&w, 1, 3, 1);
    assert_resp(&w, 2, 4, 2);
    assert_resp(&w, 3, 5, 2);
    evrec_t e = ev_at(&w, 4);
    ck_assert_int_eq(e.type, CACHE_EV_DELETE);
    e = ev_at(&w, 5);
    ck_assert_int_eq(e.type, CACHE_EV_DELETE);
    ck_assert_int_eq(get(s, "a", 0, NULL), 0);
    ck_assert_int_eq(get(s, "b", 0, NULL), 0);
    ck_assert_int_eq(get(s, "c", 0, NULL), 1);
    ck_assert_int_eq(s->ops->lease_revoke(s, shortl), COALESCE_ENOENT);
    cache_op_t o = op_put("a", "2", shortl);
    ck_assert_int_eq(txn_ops(s, &o, 1, NULL, NULL), COALESCE_ENOENT);

    /* Revoke: the key goes at a new revision. */
    ck_assert_int_eq(s->ops->lease_revoke(s, longl), 0);
    assert_resp(&w, 4, 6, 1);
    e = ev_at(&w, 6);
    assert_event(&e, CACHE_EV_DELETE, "c", 6);
    ck_assert_int_eq(get(s, "c", 0, NULL), 0);
    ck_assert_int_eq(s->ops->lease_revoke(s, longl), COALESCE_ENOENT);
    ck_assert_int_eq(s->ops->lease_revoke(s, 0), COALESCE_ENOENT);

    /* A key moved to another lease, or to none, leaves the first. */
    int64_t l2 = 0, l3 = 0;
    ck_assert_int_eq(s->ops->lease_grant(s, 600000, &l2), 0);
    ck_assert_int_eq(s->ops->lease_grant(s, 600000, &l3), 0);
    put_lease(s, "m", "1", l2); /* 7 */
    put_lease(s, "m", "2", l3); /* 8 */
    put_lease(s, "d", "2", 0);  /* 9 */
    ck_assert_int_eq(s->ops->lease_revoke(s, l2), 0);
    ck_assert_int_eq(s->ops->lease_revoke(s, x), 0);
    ck_assert_int_eq(rev_of(s), 9); /* No keys: no revision. */
    ck_assert_int_eq(get(s, "m", 0, &kv), 1);
    ck_assert_int_eq(kv.lease, l3);
    ck_assert_int_eq(get(s, "d", 0, NULL), 1);
    ck_assert_int_eq(s->ops->lease_revoke(s, l3), 0);
    ck_assert_int_eq(get(s, "m", 0, NULL), 0);
    ck_assert_int_eq(rev_of(s), 10);

    /* A lease still pending when the store goes is freed with it. */
    ck_assert_int_eq(s->ops->lease_grant(s, 600000, &x), 0);
    put_lease(s, "p", "1", x);
    cancel(s, h, &w);
    wrec_destroy(&w);
    cache_store_free(s);
    LEAK_CHECK();
}
END_TEST

START_TEST(ms_lease_many_expire_in_order)
{
    LEAK_START();
    cache_store_t *s = store_new(0);
    wrec_t w;
    wrec_init(&w, 64, 64);
    cache_watch_t *h = watch_all(s, 0, &w);
    /* Granted in reverse deadline order: the heap must sort them. */
    enum { NL = 20 };
    int64_t ids[NL];
    char keys[NL][16];
    for (int i = 0; i < NL; i++)
        ck_assert_int_eq(s->ops->lease_grant(s, 600000 - i, &ids[i]), 0);
    for (int i = 0; i < NL; i++) {
        snprintf(keys[i], sizeof(keys[i]), "k%02d", i);
        put_lease(s, keys[i], "v", ids[i]);
    }
    /* Revoke half (from the middle of the heap), let short ones expire. */
    for (int i = 0; i < NL; i += 2)
        ck_assert_int_eq(s->ops->lease_revoke(s, ids[i]), 0);
    counter_wait(&w.resps, NL + NL / 2);
    int64_t t1 = 0, t2 = 0;
    ck_assert_int_eq(s->ops->lease_grant(s, 30, &t1), 0);
    ck_assert_int_eq(s->ops->lease_grant(s, 1, &t2), 0);
    cache_op_t ops[2] = {op_put("t1", "v", t1), op_put("t2", "v", t2)};
    int rc = txn_ops(s, ops, 2, NULL, NULL);
    if (rc == 0) {
        counter_wait(&w.resps, NL + NL / 2 + 1 + 2);
        ck_assert_int_eq(get(s, "t1", 0, NULL), 0);
        ck_assert_int_eq(get(s, "t2", 0, NULL), 0);
    } else {
        ck_assert_int_eq(rc, COALESCE_ENOENT); /* t2 expired first */
    }
    ms_list_t l = {0};
    ck_assert_int_eq(range(s, "k", 1, "l", 1, 0, 0, &l, NULL, NULL), 0);
    ck_assert_uint_eq(l.n, NL / 2);
    kvlist_free(&l);
    cancel(s, h, &w);
    wrec_destroy(&w);
    cache_store_free(s);
    LEAK_CHECK();
}
END_TEST

/* --- Concurrency ---------------------------------------------------------- */

enum { NWRITERS = 8, NTXN = 300 };

typedef struct writer {
    cache_store_t *s;
    pthread_barrier_t *bar;
    int id;
    int bad;
    long changes;
} writer_t;

static void *writer_main(void *p)
{
    writer_t *a = p;
    char key[32], prev[32] = "";
    pthread_barrier_wait(a->bar);
    for (int i = 0; i < NTXN; i++) {
        cache_op_t o;
        if (i % 10 == 9) {
            o = op_del(prev, NULL);
        } else {
            snprintf(key, sizeof(key), "c/%d/%d", a->id, i);
            o = op_put(key, key, 0);
            memcpy(prev, key, sizeof(key));
        }
        int ok = 0;
        int64_t rev = 0;
        cache_op_result_t res;
        if (a->s->ops->txn(a->s, NULL, 0, &o, 1, &ok, &rev, &res) || !ok)
            a->bad++;
        a->changes++; /* Every op changes a key: the delete's was put. */
        if (i % 50 == 0) {
            int more;
            int64_t hdr;
            if (a->s->ops->range(a->s, "c/", 2, "c0", 2, 0, 10, NULL, NULL,
                                 &hdr, &more))
                a->bad++;
        }
    }
    return NULL;
}

START_TEST(ms_concurrent_writers)
{
    LEAK_START();
    cache_store_t *s = store_new(0);
    wrec_t w;
    wrec_init(&w, NWRITERS * NTXN + 8, NWRITERS * NTXN + 8);
    cache_watch_t *h = watch_on(s, "c/", 2, "c0", 2, 0, &w);
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, NWRITERS);
    pthread_t th[NWRITERS];
    writer_t a[NWRITERS];
    for (int i = 0; i < NWRITERS; i++) {
        a[i] = (writer_t){s, &bar, i, 0, 0};
        pthread_create(&th[i], NULL, writer_main, &a[i]);
    }
    long total = 0;
    for (int i = 0; i < NWRITERS; i++) {
        pthread_join(th[i], NULL);
        ck_assert_int_eq(a[i].bad, 0);
        total += a[i].changes;
    }
    pthread_barrier_destroy(&bar);
    ck_assert_int_eq(rev_of(s), 1 + total);
    counter_wait(&w.events, total);
    /* Every revision once, in order, one per response. */
    pthread_mutex_lock(&w.mu);
    ck_assert_uint_eq(w.nr, (size_t)total);
    for (size_t i = 0; i < w.nr; i++) {
        ck_assert_uint_eq(w.r[i].n, 1);
        ck_assert_int_eq(w.r[i].revision, (int64_t)i + 2);
        ck_assert_int_eq(w.e[i].mod, (int64_t)i + 2);
    }
    pthread_mutex_unlock(&w.mu);
    cancel(s, h, &w);
    wrec_destroy(&w);
    cache_store_free(s);
    LEAK_CHECK();
}
END_TEST

typedef struct flow {
    cache_store_t *s;
    atomic_bool stop;
    int bad;
} flow_t;

static void *flow_main(void *p)
{
    flow_t *f = p;
    char key[32];
    /* Bounded in count too; the store keeps 1000 revisions (below). */
    for (long i = 0; !atomic_load(&f->stop) && i < 10000000; i++) {
        if (i % 64 == 0)
            sched_yield(); /* Valgrind runs one thread at a time. */
        snprintf(key, sizeof(key), "f%ld", i % 64);
        cache_op_t o = op_put(key, "v", 0);
        int ok = 0;
        if (f->s->ops->txn(f->s, NULL, 0, &o, 1, &ok, NULL, NULL) || !ok)
            f->bad++;
    }
    return NULL;
}

START_TEST(ms_cancel_while_flowing)
{
    LEAK_START();
    cache_store_t *s = store_new(1000); /* History stays bounded. */
    flow_t f = {.s = s};
    atomic_init(&f.stop, false);
    pthread_t th;
    pthread_create(&th, NULL, flow_main, &f);
    const char *vg = getenv("CK_VALGRIND");
    const int rounds = vg && *vg == '1' ? 4 : 20;
    for (int round = 0; round < rounds; round++) {
        wrec_t w;
        wrec_init(&w, 100000, 100000);
        w.spin = round % 2 == 1;
        /* Half from a past revision: the cancel can hit the catch-up. */
        int64_t from = round % 2 ? rev_of(s) - 5 : 0;
        cache_watch_t *h = watch_all(s, from > 0 ? from : 0, &w);
        /* Five responses, or fewer if the store ended the watch first: on
         * a loaded machine the writer can pass the 1000 revisions of
         * history before a slow watch catches up (a compaction cancel). */
        for (long k = 1; k <= 5; k++) {
            counter_wait(&w.resps, k);
            pthread_mutex_lock(&w.mu);
            bool ended = w.ended;
            pthread_mutex_unlock(&w.mu);
            if (ended)
                break;
        }
        cancel(s, h, &w);
        long seen = (long)nresps(&w);
        /* Later writes reach nothing. */
        put(s, "after", "v");
        ck_assert_int_eq(atomic_load(&w.after_close), 0);
        ck_assert_int_eq((long)nresps(&w), seen);
        wrec_destroy(&w);
    }
    atomic_store(&f.stop, true);
    pthread_join(th, NULL);
    ck_assert_int_eq(f.bad, 0);
    ck_assert_int_eq(cache_memstore_watches(s), 0);
    cache_store_free(s);
    LEAK_CHECK();
}
END_TEST

/* A watch left open, a pending lease: the store cleans up after both. */
START_TEST(ms_free_with_watches)
{
    LEAK_START();
    cache_store_t *s = store_new(0);
    wrec_t w;
    wrec_init(&w, 8, 8);
    watch_all(s, 0, &w);
    int64_t id = 0;
    ck_assert_int_eq(s->ops->lease_grant(s, 600000, &id), 0);
    put_lease(s, "a", "1", id);
    ck_assert_int_eq(cache_memstore_hold(s, 1), 0);
    put(s, "b", "1");
    counter_wait(&w.resps, 1);
    cache_store_free(s);
    wrec_destroy(&w);
    LEAK_CHECK();
}
END_TEST

/* --- Scale ---------------------------------------------------------------- */

typedef struct tally {
    counter_t events;
    int64_t last;
    atomic_int problems;
} tally_t;

static void tally_cb(void *data, const cache_watch_resp_t *resp)
{
    tally_t *t = data;
    for (size_t i = 0; i < resp->n; i++) {
        if (resp->events[i].kv.mod_rev < t->last)
            atomic_fetch_add(&t->problems, 1);
        t->last = resp->events[i].kv.mod_rev;
    }
    if (resp->error)
        atomic_fetch_add(&t->problems, 1);
    counter_add(&t->events, (long)resp->n);
}

START_TEST(ms_bulk_load_paged)
{
    LEAK_START();
    const char *vg = getenv("CK_VALGRIND");
    const int n = vg && *vg == '1' ? 5000 : 200000;
    cache_store_t *s = store_new(0);
    tally_t w = {.last = 0};
    counter_init(&w.events);
    atomic_init(&w.problems, 0);
    cache_watch_t *h = NULL;
    ck_assert_int_eq(
        s->ops->watch(s, "bulk/", 5, "bulk0", 5, 0, tally_cb, &w, &h), 0);
    static char keys[128][32];
    cache_op_t ops[128];
    double t0 = now_ms();
    for (int i = 0; i < n;) {
        int m = 0;
        for (; m < 128 && i < n; m++, i++) {
            /* A scattered order: inserts land all over the list. */
            long k = (long)(((uint64_t)i * 7919) % (uint64_t)n);
            snprintf(keys[m], sizeof(keys[m]), "bulk/%08ld", k);
            ops[m] = op_put(keys[m], "value-value-value", 0);
        }
        ck_assert_int_eq(txn_ops(s, ops, (size_t)m, NULL, NULL), 0);
    }
    double t1 = now_ms();
    /* The cache's load: pages of 500 at the first page's revision. */
    ms_list_t l = {0};
    int64_t r0 = 0;
    int more = 1;
    char from[32] = "bulk/";
    size_t fl = 5;
    size_t pages = 0;
    while (more) {
        size_t before = l.n;
        int64_t hdr = 0;
        ck_assert_int_eq(
            range(s, from, fl, "bulk0", 5, r0, 500, &l, &hdr, &more), 0);
        if (!r0)
            r0 = hdr;
        ck_assert_uint_le(l.n - before, 500);
        pages++;
        if (more) {
            memcpy(from, l.v[l.n - 1].key, l.v[l.n - 1].keylen);
            fl = l.v[l.n - 1].keylen;
            from[fl++] = 0;
        }
    }
    double t2 = now_ms();
    ck_assert_uint_eq(l.n, (size_t)n);
    ck_assert_uint_eq(pages, ((size_t)n + 499) / 500);
    for (size_t i = 1; i < l.n; i++)
        ck_assert_int_lt(memcmp(l.v[i - 1].key, l.v[i].key, 13), 0);
    kvlist_free(&l);
    counter_wait(&w.events, n);
    ck_assert_int_eq(cache_memstore_compact(s, r0), 0);
    fprintf(stderr, "memstore: %d keys loaded in %.0f ms, paged in %.0f ms\n",
            n, t1 - t0, t2 - t1);
    s->ops->watch_cancel(s, h);
    ck_assert_int_eq(atomic_load(&w.problems), 0);
    counter_destroy(&w.events);
    cache_store_free(s);
    LEAK_CHECK();
}
END_TEST

/* --- Allocation failures -------------------------------------------------- */

static void nomem_ok(int rc)
{
    ck_assert_msg(rc == 0 || rc == COALESCE_ENOMEM, "rc %d", rc);
}

/* Every main call with each allocation failing in turn: COALESCE_ENOMEM,
 * nothing changed, nothing leaked. */
START_TEST(ms_alloc_failures)
{
    LEAK_START();
    int completed = 0;
    for (long fail = 0; fail < MAX_INJECT && !completed; fail++) {
        test_alloc_fail_after(fail);
        cache_store_t *s = NULL;
        int rc = cache_memstore_new(&s, NULL);
        if (rc) {
            ck_assert_int_eq(rc, COALESCE_ENOMEM);
            test_alloc_fail_after(-1);
            LEAK_CHECK();
            continue;
        }
        wrec_t w, w2;
        wrec_init(&w, 64, 64);
        wrec_init(&w2, 64, 64);
        cache_watch_t *h = NULL, *h2 = NULL;
        rc = s->ops->watch(s, "", 0, "\0", 1, 0, wrec_cb, &w, &h);
        nomem_ok(rc);

        /* Puts of new keys, a second version, a delete: all or nothing. */
        static const char *const keys[] = {"a", "b", "c", "d", "e",
                                           "f", "g", "h", "i", "j"};
        cache_op_t ops[10];
        for (int i = 0; i < 10; i++)
            ops[i] = op_put(keys[i], "value", 0);
        int64_t before = rev_of(s);
        rc = txn_ops(s, ops, 10, NULL, NULL);
        nomem_ok(rc);
        ck_assert_int_eq(rev_of(s), before + (rc == 0));
        ms_list_t l = {0};
        if (rc) {
            ck_assert_int_eq(range(s, "", 0, "\0", 1, 0, 0, &l, NULL, NULL), 0);
            ck_assert_uint_eq(l.n, 0);
        }
        cache_op_t mix[3] = {op_put("a", "v2", 0), op_put("z", "new", 0),
                             op_del("b", "e")};
        before = rev_of(s);
        rc = txn_ops(s, mix, 3, NULL, NULL);
        nomem_ok(rc);
        ck_assert_int_eq(rev_of(s), before + (rc == 0));

        rc = range(s, "", 0, "\0", 1, 0, 0, &l, NULL, NULL);
        nomem_ok(rc);
        kvlist_free(&l);

        int64_t id = 0;
        rc = s->ops->lease_grant(s, 600000, &id);
        nomem_ok(rc);
        if (rc == 0) {
            cache_op_t lo = op_put("leased", "v", id);
            nomem_ok(txn_ops(s, &lo, 1, NULL, NULL));
            before = rev_of(s);
            rc = s->ops->lease_revoke(s, id);
            nomem_ok(rc);
            if (rc)
                ck_assert_int_eq(rev_of(s), before);
        }

        /* A catch-up from the start, the hooks, compaction. */
        rc = s->ops->watch(s, "", 0, "\0", 1, 2, wrec_cb, &w2, &h2);
        nomem_ok(rc);
        ck_assert_int_eq(cache_memstore_hold(s, 1), 0);
        cache_op_t p2[2] = {op_put("h1", "v", 0), op_put("h2", "v", 0)};
        nomem_ok(txn_ops(s, &p2[0], 1, NULL, NULL));
        nomem_ok(txn_ops(s, &p2[1], 1, NULL, NULL));
        nomem_ok(cache_memstore_progress(s));
        nomem_ok(cache_memstore_flush(s, CACHE_FLUSH_BATCH));
        ck_assert_int_eq(cache_memstore_hold(s, 0), 0);
        if (rev_of(s) > 2)
            ck_assert_int_eq(cache_memstore_compact(s, rev_of(s) - 1), 0);
        ck_assert_int_eq(cache_memstore_cut(s, COALESCE_EIO), 0);

        completed = !test_alloc_failed();
        test_alloc_fail_after(-1);
        if (id)
            s->ops->lease_revoke(s, id); /* May be gone already. */
        if (h)
            s->ops->watch_cancel(s, h);
        if (h2)
            s->ops->watch_cancel(s, h2);
        ck_assert_int_eq(atomic_load(&w.problems), 0);
        ck_assert_int_eq(atomic_load(&w2.problems), 0);
        cache_store_free(s);
        wrec_destroy(&w);
        wrec_destroy(&w2);
        LEAK_CHECK();
    }
    ck_assert_int_eq(completed, 1);
}
END_TEST

Suite *make_memstore_suite(void)
{
    Suite *s = suite_create("memstore");
    TCase *tc;

    tc = tcase(s, "revisions", 5);
    tcase_add_test(tc, ms_revisions_and_metadata);

    tc = tcase(s, "range", 10);
    tcase_add_test(tc, ms_range_paging);
    tcase_add_test(tc, ms_range_compaction);
    tcase_add_test(tc, ms_auto_compact);

    tc = tcase(s, "txn", 5);
    tcase_add_test(tc, ms_txn_compares);
    tcase_add_test(tc, ms_txn_limits);
    tcase_add_test(tc, ms_txn_results);

    tc = tcase(s, "watch", 5);
    tcase_add_test(tc, ms_watch_catch_up);
    tcase_add_test(tc, ms_watch_from_now_and_future);
    tcase_add_test(tc, ms_watch_compacted);

    tc = tcase(s, "hooks", 5);
    tcase_add_test(tc, ms_hold_and_flush);
    tcase_add_test(tc, ms_cut);
    tcase_add_test(tc, ms_progress);

    tc = tcase(s, "leases", 10);
    tcase_add_test(tc, ms_lease_expiry);
    tcase_add_test(tc, ms_lease_many_expire_in_order);

    tc = tcase(s, "concurrency", 20);
    tcase_add_test(tc, ms_concurrent_writers);
    tcase_add_test(tc, ms_cancel_while_flowing);
    tcase_add_test(tc, ms_free_with_watches);

    tc = tcase(s, "scale", 30);
    tcase_add_test(tc, ms_bulk_load_paged);

    tc = tcase(s, "alloc failures", 30);
    tcase_add_test(tc, ms_alloc_failures);

    return s;
}

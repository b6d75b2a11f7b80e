/*
 * libFuzzer harness: the write-through cache (cache.h) against a model of
 * etcd (store.h).
 *
 * The store is a fake written here, and it is the model: one global
 * revision, per-key history (create/mod revision, version, lease), the txn
 * rules, leases, compaction, and watches from a revision. Its watches never
 * deliver by themselves: the input decides when pending events go out, how
 * many revisions one response carries, whether it is stamped with the
 * current revision (a catch-up batch), when a progress notification comes,
 * when the watch is cut (EIO, EDECODE) and when history is compacted (a
 * lagging watch, or a resume below the compact revision, is canceled with
 * COALESCE_ECOMPACTED or refused outright). It can also compact between two
 * pages of a list, fail the next watch() or range() once, deliver a write's
 * echo before the cache applies the write, and hold a relist's last page
 * while writes go through the cache.
 *
 * Threads. Deliveries run on the fuzzing thread. A canceling response wakes
 * the cache's supervisor, which cancels, resumes or relists; the harness
 * waits on the store's condition variable for the new watch before it goes
 * on. The supervisor touches the store only in that window, so the store
 * never changes under it and runs are deterministic. Started caches are
 * kept across runs (see the pool below). A failed resume or relist costs
 * the cache's backoff, 1 ms at least, and the fuzzer soon favours inputs
 * that reach it: a refused resume and a one-shot failure of watch() or
 * range() are tried only with FUZZ_CACHE_SLOW=1 in the environment.
 *
 * Checks:
 *  - writes: the code each cache write returns (EINVAL before the store is
 *    contacted, EEXIST / ECONFLICT from the compares, ENOENT for a dead
 *    lease), the revision it reports, that the store holds exactly the
 *    write at that revision, the deleted counts, and that leases granted for
 *    a failed write are revoked;
 *  - reads (get, scan): every key returned is a version the store had, and
 *    each key's answer is the store's state at some revision at or after a
 *    floor lo[k], which rises with this cache's acknowledged writes (read
 *    your writes, no resurrection of a deleted key), with what it read
 *    before (no going back) and with the watch revision W; a value held
 *    over the run never changes;
 *  - the watch: W (cache_health, cache_wait_fresh) follows the events'
 *    revisions, never a catch-up batch's header; a resume starts at W + 1, a
 *    relist at the revision it read + 1; the reconnect, relist and event
 *    counters and the report callback's sequence match;
 *  - quiescent points (everything delivered, a progress notification at the
 *    store's revision, and after each relist or start): a full scan and a
 *    get of every key equal the store under the prefix, metadata included,
 *    with no tombstone left and the entry and byte counts right; with
 *    bounds, a cache over them is degraded and stays so until restarted.
 *
 * FUZZ_CACHE_TRACE=1 in the environment prints each step.
 */
#define _POSIX_C_SOURCE 200809L

#include <coalesce/cache.h>
#include <coalesce/store.h>

#include "fuzz.h"

#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Coverage guides by the library's code; instrumenting the model's loops
 * as well would double the cost of a run for little guidance. */
#pragma clang attribute push(__attribute__((no_sanitize("coverage"))),         \
                             apply_to = function)

#define MAX_OPS   16 /* Steps per input: keeps an execution short. */
#define NIN       8  /* Keys under the cache's prefix. */
#define NOUT      3  /* Keys outside it. */
#define NKEY      (NIN + NOUT)
#define NSUB      6 /* Prefixes for scans and prefix deletes. */
#define KEYCAP    8
#define VALCAP    4
#define VER_MAX   160
#define LOG_MAX   1536
#define LEASE_MAX 512
#define HLEASES   16
#define WATCH_MAX 4
#define REP_MAX   512
#define TXN_BIG   (CACHE_TXN_MAX_OPS + 1)
#define BOGUS     999999 /* A lease never granted. */
#define UNSET     (-7)   /* An output the cache must leave alone. */

static bool trace;
static bool slow; /* FUZZ_CACHE_SLOW: also the paths that cost a backoff. */

#define TR(...)                                                                \
    do {                                                                       \
        if (trace)                                                             \
            fprintf(stderr, __VA_ARGS__);                                      \
    } while (0)

typedef struct bytes {
    unsigned char b[KEYCAP];
    size_t len;
} bytes_t;

static bytes_t mkbytes(const char *s, size_t n)
{
    bytes_t x;
    memset(&x, 0, sizeof(x));
    memcpy(x.b, s, n);
    x.len = n;
    return x;
}
#define LIT(s) mkbytes((s), sizeof(s) - 1)

static int kcmp(const void *a, size_t al, const void *b, size_t bl)
{
    size_t n = al < bl ? al : bl;
    int c = n ? memcmp(a, b, n) : 0;
    if (c)
        return c;
    return al < bl ? -1 : al > bl;
}

static bool starts(const void *k, size_t l, const void *p, size_t pl)
{
    return l >= pl && (!pl || memcmp(k, p, pl) == 0);
}

/* etcd's ranges: an empty end is the key alone, "\0" no upper bound. */
static bool span_has(const void *key,
                     size_t kl,
                     const void *end,
                     size_t el,
                     const void *k,
                     size_t l)
{
    if (!el)
        return kcmp(k, l, key, kl) == 0;
    if (kcmp(k, l, key, kl) < 0)
        return false;
    if (el == 1 && ((const unsigned char *)end)[0] == 0)
        return true;
    return kcmp(k, l, end, el) < 0;
}

/* The end of the range of keys starting with p (etcd's GetPrefixRangeEnd). */
static bytes_t prefix_end(const bytes_t *p)
{
    bytes_t e = *p;
    while (e.len && e.b[e.len - 1] == 0xff)
        e.len--;
    if (!e.len)
        return LIT("\0");
    e.b[e.len - 1]++;
    return e;
}

/* --- The fake store: the model of etcd ------------------------------------ */

enum { D_NONE, D_EVENTS, D_CANCEL }; /* What a delivery did. */

typedef struct fver {
    int64_t mod, create, version, lease;
    bool tomb;
    uint8_t vallen;
    unsigned char val[VALCAP];
} fver_t;

typedef struct fkey {
    bytes_t k;
    bool in; /* Under the cache's prefix. */
    int nver;
    fver_t ver[VER_MAX]; /* Oldest first; append-only during a run. */
} fkey_t;

typedef struct flog {
    int k, v;
    int64_t rev;
} flog_t;

typedef struct fwatch {
    cache_watch_cb cb;
    void *data;
    int64_t next; /* First revision not delivered yet. */
    int doom;     /* Nonzero: the next response cancels with this code. */
    int64_t doom_compact;
    bool over; /* A canceling response went out; waits for watch_cancel. */
    bool in_cb;
} fwatch_t;

typedef struct fstore {
    cache_store_t base;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int64_t rev, compact;
    fkey_t key[NKEY]; /* In byte order: ranges walk it. */
    flog_t log[LOG_MAX];
    int nlog;
    int64_t lease[LEASE_MAX];
    bool lease_live[LEASE_MAX];
    int nlease;
    fwatch_t *w[WATCH_MAX];
    int nw;
    bytes_t wkey, wend; /* The range every watch must ask for. */
    uint64_t gen;       /* Watches opened. */
    int64_t last_start;
    bool sync_erange;     /* Refuse a compacted resume in watch() itself. */
    bool doom_on_compact; /* Compaction cancels a watch it outran. */
    bool page_fault;      /* The next page after the first: write, compact. */
    bool echo;            /* The next cache txn's events go out before it
                             returns (the echo beats the write-through). */
    int64_t echo_last;    /* What that delivered, for the model. */
    int gate;             /* 1: the next final page of a list waits (2)
                             for the harness to open it (0). */
    int64_t gate_rev;     /* The revision that page read. */
    bool fail_watch, fail_range; /* The next call fails with EIO. */
    long refused, failed, txns, ranges, grants, revokes, page_faults;
    long events; /* Watch events delivered. */
} fstore_t;

/* The store of the cache in use (see the pool below). */
static fstore_t *S;

static void lock(void)
{
    pthread_mutex_lock(&S->mu);
}

static void unlock(void)
{
    pthread_mutex_unlock(&S->mu);
}

static int key_find(const void *k, size_t l)
{
    for (int i = 0; l && i < NKEY; i++)
        if (S->key[i].k.len == l && memcmp(S->key[i].k.b, k, l) == 0)
            return i;
    return -1;
}

static const fver_t *ver_at(const fkey_t *k, int64_t at)
{
    for (int i = k->nver - 1; i >= 0; i--)
        if (k->ver[i].mod <= at)
            return &k->ver[i];
    return NULL;
}

static const fver_t *live_at(const fkey_t *k, int64_t at)
{
    const fver_t *v = ver_at(k, at);
    return v && !v->tomb ? v : NULL;
}

static const fver_t *live_now(int ki)
{
    return live_at(&S->key[ki], S->rev);
}

static int64_t mod_now(int ki)
{
    const fver_t *v = live_now(ki);
    return v ? v->mod : 0;
}

static bool lease_live(int64_t id)
{
    for (int i = 0; i < S->nlease; i++)
        if (S->lease[i] == id)
            return S->lease_live[i];
    return false;
}

static void push(int ki, const fver_t *v)
{
    fkey_t *k = &S->key[ki];
    FUZZ_CHECK(k->nver < VER_MAX && S->nlog < LOG_MAX, "model full");
    k->ver[k->nver] = *v;
    S->log[S->nlog++] = (flog_t){ki, k->nver, v->mod};
    k->nver++;
}

static int cmp_holds(const cache_cmp_t *c)
{
    int ki = key_find(c->key, c->keylen);
    const fver_t *v = ki >= 0 ? live_now(ki) : NULL;
    int r;
    switch (c->target) {
    case CACHE_CMP_VALUE:
        if (!v)
            return 0; /* etcd: a missing key fails a value compare. */
        r = kcmp(v->val, v->vallen, c->value, c->vallen);
        break;
    case CACHE_CMP_VERSION:
    case CACHE_CMP_CREATE:
    case CACHE_CMP_MOD:
    case CACHE_CMP_LEASE: {
        int64_t x = !v                               ? 0
                    : c->target == CACHE_CMP_VERSION ? v->version
                    : c->target == CACHE_CMP_CREATE  ? v->create
                    : c->target == CACHE_CMP_MOD     ? v->mod
                                                     : v->lease;
        r = (x > c->number) - (x < c->number);
        break;
    }
    default:
        return -1;
    }
    switch (c->result) {
    case CACHE_CMP_EQUAL:
        return r == 0;
    case CACHE_CMP_GREATER:
        return r > 0;
    case CACHE_CMP_LESS:
        return r < 0;
    case CACHE_CMP_NOT_EQUAL:
        return r != 0;
    default:
        return -1;
    }
}

/* etcd's txn, under the lock: checks, compares, then every op at one new
 * revision if anything changes (deleting absent keys changes nothing). */
static int txn_locked(const cache_cmp_t *cmps,
                      size_t ncmps,
                      const cache_op_t *ops,
                      size_t nops,
                      int *succeeded,
                      int64_t *rev,
                      cache_op_result_t *results)
{
    if (nops > CACHE_TXN_MAX_OPS || (!ops && nops) || (!cmps && ncmps))
        return COALESCE_EINVAL;
    int kix[CACHE_TXN_MAX_OPS];
    for (size_t i = 0; i < nops; i++) {
        const cache_op_t *o = &ops[i];
        kix[i] = -1;
        if (o->type == CACHE_OP_PUT) {
            kix[i] = key_find(o->key, o->keylen);
            FUZZ_CHECK(kix[i] >= 0, "a put of a key nobody wrote");
            FUZZ_CHECK(o->vallen <= VALCAP && (o->value || !o->vallen),
                       "a put of a value nobody wrote");
        } else {
            FUZZ_CHECK(o->type == CACHE_OP_DELETE, "op type %d", o->type);
        }
        /* etcd's checkIntervals: a key put twice, or put inside a deleted
         * range; overlapping deletes are fine. */
        for (size_t j = 0; j < i; j++) {
            const cache_op_t *p = &ops[j];
            bool op = o->type == CACHE_OP_PUT, pp = p->type == CACHE_OP_PUT;
            if (op && pp && kix[i] == kix[j])
                return COALESCE_EINVAL;
            if (op && !pp &&
                span_has(p->key, p->keylen, p->end, p->endlen, o->key,
                         o->keylen))
                return COALESCE_EINVAL;
            if (!op && pp &&
                span_has(o->key, o->keylen, o->end, o->endlen, p->key,
                         p->keylen))
                return COALESCE_EINVAL;
        }
    }
    bool ok = true;
    for (size_t i = 0; i < ncmps; i++) {
        int h = cmp_holds(&cmps[i]);
        if (h < 0)
            return COALESCE_EINVAL;
        ok = ok && h;
    }
    if (!ok) {
        if (succeeded)
            *succeeded = 0;
        if (rev)
            *rev = S->rev;
        return 0;
    }
    /* Leases are checked on the branch taken, after the compares. */
    for (size_t i = 0; i < nops; i++)
        if (ops[i].type == CACHE_OP_PUT && ops[i].lease &&
            !lease_live(ops[i].lease))
            return COALESCE_ENOENT;
    int64_t nr = S->rev + 1;
    bool changed = false;
    for (size_t i = 0; i < nops; i++) {
        const cache_op_t *o = &ops[i];
        cache_op_result_t res;
        memset(&res, 0, sizeof(res));
        if (o->type == CACHE_OP_PUT) {
            /* Keys of one txn are distinct: this is the state before it. */
            const fver_t *prev = live_now(kix[i]);
            fver_t v;
            memset(&v, 0, sizeof(v));
            v.mod = nr;
            v.create = prev ? prev->create : nr;
            v.version = prev ? prev->version + 1 : 1;
            v.lease = o->lease;
            v.vallen = (uint8_t)o->vallen;
            if (o->vallen)
                memcpy(v.val, o->value, o->vallen);
            res.has_prev = prev != NULL;
            res.prev_create_rev = prev ? prev->create : 0;
            res.prev_version = prev ? prev->version : 0;
            push(kix[i], &v);
            changed = true;
        } else {
            for (int k = 0; k < NKEY; k++) {
                if (!span_has(o->key, o->keylen, o->end, o->endlen,
                              S->key[k].k.b, S->key[k].k.len) ||
                    !live_now(k))
                    continue;
                fver_t v;
                memset(&v, 0, sizeof(v));
                v.mod = nr;
                v.tomb = true;
                push(k, &v);
                res.deleted++;
                changed = true;
            }
        }
        if (results)
            results[i] = res;
    }
    if (changed)
        S->rev = nr;
    if (succeeded)
        *succeeded = 1;
    if (rev)
        *rev = S->rev;
    return 0;
}

static fwatch_t *live_locked(void);
static fwatch_t *live_or_null_locked(void);
static int deliver_locked(int nrev, bool stamp_now, int64_t *last);

static int fs_txn(cache_store_t *s,
                  const cache_cmp_t *cmps,
                  size_t ncmps,
                  const cache_op_t *ops,
                  size_t nops,
                  int *succeeded,
                  int64_t *rev,
                  cache_op_result_t *results)
{
    FUZZ_CHECK(s == &S->base, "txn on another store");
    lock();
    S->txns++;
    int64_t before = S->rev;
    int rc = txn_locked(cmps, ncmps, ops, nops, succeeded, rev, results);
    fwatch_t *w = S->echo ? live_or_null_locked() : NULL;
    if (!rc && S->rev != before && w && !w->doom) {
        /* On this thread, between the commit and the cache applying it,
         * as a store thread could. */
        S->echo = false;
        int64_t last = 0;
        if (deliver_locked(0, false, &last) == D_EVENTS)
            S->echo_last = last;
    }
    unlock();
    return rc;
}

/* Another writer between two pages of a list, then a compaction up to it:
 * the next page's revision is gone. */
static void page_fault_locked(void)
{
    S->page_fault = false;
    S->page_faults++;
    int ki = -1;
    for (int i = 0; i < NKEY && ki < 0; i++)
        if (S->key[i].in)
            ki = i;
    cache_op_t op = {
        CACHE_OP_PUT, S->key[ki].k.b, S->key[ki].k.len, NULL, 0, "pf", 2, 0};
    int ok = 0;
    FUZZ_CHECK(txn_locked(NULL, 0, &op, 1, &ok, NULL, NULL) == 0 && ok,
               "page fault write");
    S->compact = S->rev;
}

static int fs_range(cache_store_t *s,
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
    FUZZ_CHECK(s == &S->base, "range on another store");
    if ((!key && keylen) || (!end && endlen) || (!keylen && !endlen) || rev < 0)
        return COALESCE_EINVAL;
    cache_kv_t kv[NKEY];
    size_t n = 0;
    int m = 0;
    lock();
    S->ranges++;
    if (S->fail_range) {
        S->fail_range = false;
        S->failed++;
        unlock();
        return COALESCE_EIO;
    }
    if (rev && S->page_fault)
        page_fault_locked();
    int64_t at = rev ? rev : S->rev;
    if (at > S->rev || at < S->compact) {
        unlock();
        return COALESCE_ECOMPACTED;
    }
    for (int i = 0; i < NKEY; i++) {
        const fkey_t *k = &S->key[i];
        const fver_t *v;
        if (!span_has(key, keylen, end, endlen, k->k.b, k->k.len) ||
            !(v = live_at(k, at)))
            continue;
        if (limit && n == limit) {
            m = 1;
            break;
        }
        /* Versions are append-only: the pointers stay valid unlocked. */
        kv[n++] = (cache_kv_t){k->k.b,    k->k.len, v->val,     v->vallen,
                               v->create, v->mod,   v->version, v->lease};
    }
    if (!m && S->gate == 1) {
        /* The snapshot is taken; writes may land before the cache gets
         * it (the harness makes them, then opens the gate). */
        S->gate = 2;
        S->gate_rev = at;
        pthread_cond_broadcast(&S->cv);
        while (S->gate)
            pthread_cond_wait(&S->cv, &S->mu);
    }
    unlock();
    if (header_rev)
        *header_rev = at;
    if (more)
        *more = m;
    for (size_t i = 0; i < n && cb; i++)
        if (cb(data, &kv[i]))
            break;
    return 0;
}

static int fs_watch(cache_store_t *s,
                    const void *key,
                    size_t keylen,
                    const void *end,
                    size_t endlen,
                    int64_t start_rev,
                    cache_watch_cb cb,
                    void *data,
                    cache_watch_t **out)
{
    FUZZ_CHECK(s == &S->base, "watch on another store");
    FUZZ_CHECK(kcmp(key, keylen, S->wkey.b, S->wkey.len) == 0 &&
                   kcmp(end, endlen, S->wend.b, S->wend.len) == 0,
               "the watch is not over the prefix's range");
    FUZZ_CHECK(cb && out && start_rev > 0, "watch from %" PRId64, start_rev);
    lock();
    if (S->fail_watch) {
        S->fail_watch = false;
        S->failed++;
        unlock();
        return COALESCE_EIO;
    }
    if (start_rev < S->compact && S->sync_erange) {
        S->refused++;
        unlock();
        return COALESCE_ECOMPACTED;
    }
    FUZZ_CHECK(S->nw < WATCH_MAX, "watches pile up");
    fwatch_t *w = calloc(1, sizeof(*w));
    FUZZ_CHECK(w, "calloc");
    w->cb = cb;
    w->data = data;
    w->next = start_rev;
    if (start_rev < S->compact) { /* etcd: created, then canceled. */
        w->doom = COALESCE_ECOMPACTED;
        w->doom_compact = S->compact;
    }
    S->w[S->nw++] = w;
    S->gen++;
    S->last_start = start_rev;
    pthread_cond_broadcast(&S->cv);
    unlock();
    *out = (void *)w;
    return 0;
}

static void fs_watch_cancel(cache_store_t *s, cache_watch_t *cw)
{
    FUZZ_CHECK(s == &S->base, "cancel on another store");
    fwatch_t *w = (void *)cw;
    lock();
    while (w->in_cb) /* A response being delivered: let it finish. */
        pthread_cond_wait(&S->cv, &S->mu);
    int i = 0;
    while (i < S->nw && S->w[i] != w)
        i++;
    FUZZ_CHECK(i < S->nw, "cancel of an unknown watch");
    S->w[i] = S->w[--S->nw];
    unlock();
    free(w);
}

static int fs_lease_grant(cache_store_t *s, int64_t ttl_ms, int64_t *id)
{
    FUZZ_CHECK(s == &S->base && ttl_ms > 0 && id, "lease_grant");
    lock();
    FUZZ_CHECK(S->nlease < LEASE_MAX, "too many leases");
    S->lease[S->nlease] = 1000 + S->nlease;
    S->lease_live[S->nlease] = true;
    *id = S->lease[S->nlease++];
    S->grants++;
    unlock();
    return 0;
}

static int fs_lease_revoke(cache_store_t *s, int64_t id)
{
    FUZZ_CHECK(s == &S->base, "lease_revoke on another store");
    lock();
    S->revokes++;
    int i = 0;
    while (i < S->nlease && S->lease[i] != id)
        i++;
    if (i == S->nlease || !S->lease_live[i]) {
        unlock();
        return COALESCE_ENOENT;
    }
    S->lease_live[i] = false;
    bool any = false;
    for (int k = 0; k < NKEY; k++) {
        const fver_t *v = live_now(k);
        if (!v || v->lease != id)
            continue;
        fver_t t;
        memset(&t, 0, sizeof(t));
        t.mod = S->rev + 1;
        t.tomb = true;
        push(k, &t);
        any = true;
    }
    if (any)
        S->rev++;
    unlock();
    return 0;
}

static void fs_destroy(cache_store_t *s)
{
    (void)s;
    FUZZ_CHECK(0, "the harness owns the store");
}

static const cache_store_ops_t fs_ops = {
    CACHE_STORE_OPS_VERSION, fs_range,       fs_txn,          fs_watch,
    fs_watch_cancel,         fs_lease_grant, fs_lease_revoke, fs_destroy};

/* --- Watch deliveries (the fuzzing thread) -------------------------------- */

static bool log_watched(const flog_t *e)
{
    const fkey_t *k = &S->key[e->k];
    return span_has(S->wkey.b, S->wkey.len, S->wend.b, S->wend.len, k->k.b,
                    k->k.len);
}

/* The cache's watch: the one not canceled by a response (none while the
 * supervisor replaces it). */
static fwatch_t *live_or_null_locked(void)
{
    fwatch_t *l = NULL;
    for (int i = 0; i < S->nw; i++) {
        if (S->w[i]->over)
            continue;
        FUZZ_CHECK(!l, "two live watches");
        l = S->w[i];
    }
    return l;
}

static fwatch_t *live_locked(void)
{
    fwatch_t *l = live_or_null_locked();
    FUZZ_CHECK(l, "no live watch");
    return l;
}

/* First watched revision at or after w->next, 0 if none. */
static int64_t first_pending(const fwatch_t *w)
{
    for (int i = 0; i < S->nlog; i++)
        if (S->log[i].rev >= w->next && log_watched(&S->log[i]))
            return S->log[i].rev;
    return 0;
}

/* Under the lock, which is dropped while the callback runs. */
static void call_cb(fwatch_t *w, const cache_watch_resp_t *r)
{
    w->in_cb = true;
    unlock();
    w->cb(w->data, r);
    lock();
    w->in_cb = false;
    pthread_cond_broadcast(&S->cv);
}

static void cancel_locked(fwatch_t *w, int err, int64_t compact)
{
    cache_watch_resp_t r;
    memset(&r, 0, sizeof(r));
    r.error = err;
    r.compact_revision = compact;
    w->over = true;
    call_cb(w, &r);
}

static cache_event_t evbuf[LOG_MAX];

/* Up to nrev revisions (0: all) of pending events in one response; a
 * doomed watch gets its cancel instead. */
static int deliver_locked(int nrev, bool stamp_now, int64_t *last)
{
    fwatch_t *w = live_locked();
    if (w->doom) {
        cancel_locked(w, w->doom, w->doom_compact);
        return D_CANCEL;
    }
    size_t n = 0;
    int nr = 0;
    int64_t lr = 0;
    for (int i = 0; i < S->nlog; i++) {
        const flog_t *e = &S->log[i];
        if (e->rev < w->next || !log_watched(e))
            continue;
        if (e->rev != lr) { /* A revision is never split. */
            if (nrev && nr == nrev)
                break;
            nr++;
            lr = e->rev;
        }
        const fkey_t *k = &S->key[e->k];
        const fver_t *v = &k->ver[e->v];
        cache_event_t *ev = &evbuf[n++];
        memset(ev, 0, sizeof(*ev));
        ev->type = v->tomb ? CACHE_EV_DELETE : CACHE_EV_PUT;
        ev->kv.key = k->k.b;
        ev->kv.keylen = k->k.len;
        ev->kv.mod_rev = v->mod;
        if (!v->tomb) {
            ev->kv.value = v->val;
            ev->kv.vallen = v->vallen;
            ev->kv.create_rev = v->create;
            ev->kv.version = v->version;
            ev->kv.lease = v->lease;
        }
    }
    if (!n)
        return D_NONE;
    cache_watch_resp_t r;
    memset(&r, 0, sizeof(r));
    /* A catch-up batch is stamped with the store's revision, even when
     * more events are still to come. */
    r.revision = stamp_now ? S->rev : lr;
    r.events = evbuf;
    r.n = n;
    w->next = lr + 1;
    S->events += (long)n;
    call_cb(w, &r);
    *last = lr;
    return D_EVENTS;
}

static int deliver(int nrev, bool stamp_now, int64_t *last)
{
    lock();
    int d = deliver_locked(nrev, stamp_now, last);
    unlock();
    return d;
}

/* A progress notification, as late as is true: the store's revision, or
 * just before the first event not delivered yet. -1 if none was sent. */
static int64_t progress(void)
{
    lock();
    fwatch_t *w = live_locked();
    if (w->doom) {
        unlock();
        return -1;
    }
    int64_t p = first_pending(w);
    int64_t r = p ? p - 1 : S->rev;
    cache_watch_resp_t resp;
    memset(&resp, 0, sizeof(resp));
    resp.revision = r;
    if (r + 1 > w->next)
        w->next = r + 1;
    call_cb(w, &resp);
    unlock();
    return r;
}

static void cut(int err)
{
    lock();
    cancel_locked(live_locked(), err, 0);
    unlock();
}

static void compact_at(int64_t at)
{
    lock();
    S->compact = at;
    if (S->doom_on_compact) {
        /* etcd cancels an unsynced watch whose events are gone. */
        fwatch_t *w = live_locked();
        int64_t p = first_pending(w);
        if (!w->doom && p && p < at) {
            w->doom = COALESCE_ECOMPACTED;
            w->doom_compact = at;
        }
    }
    unlock();
    TR("  compact at %" PRId64 "\n", at);
}

/* --- The harness's state -------------------------------------------------- */

typedef struct rep {
    int what, code;
    int64_t rev; /* -1: not known to the model. */
} rep_t;

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    rep_t r[REP_MAX];
    int n;
} R = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static struct {
    cache_t *c;
    bytes_t p, pend;
    bytes_t sub[NSUB]; /* P, Pa, Pb, P\xff, P shortened, outside. */
    int inside[NIN], outside[NOUT];
    int64_t lo[NKEY]; /* The cache's answer for a key is at lo or later. */
    int64_t wm;       /* W as the model knows it. */
    int streak;       /* Decode errors since the last event response. */
    bool bounds;
    uint64_t max_entries, max_bytes;
    uint64_t base_relists, base_reconnects, base_dropped; /* At setup. */
    uint64_t base_events;
    long events0;
    bool degraded; /* A read saw EOVERFLOW since the last start. */
    long overflow_episodes, exp_relists, exp_reconnects;
    rep_t exp[REP_MAX];
    int nexp;
    int64_t hl[HLEASES]; /* Leases other writers may use and revoke. */
    int nhl;
    uint8_t seq;
    int step;
    coalesce_buf_t *held; /* A value read early, held over the run. */
    bytes_t held_val;
} H;

static void on_report(void *data, int what, int code, int64_t rev)
{
    (void)data;
    pthread_mutex_lock(&R.mu);
    FUZZ_CHECK(R.n < REP_MAX, "too many reports");
    R.r[R.n++] = (rep_t){what, code, rev};
    pthread_cond_broadcast(&R.cv);
    pthread_mutex_unlock(&R.mu);
}

static void expect_report(int what, int code, int64_t rev)
{
    FUZZ_CHECK(H.nexp < REP_MAX, "too many reports expected");
    H.exp[H.nexp++] = (rep_t){what, code, rev};
}

static const bytes_t *K(int ki)
{
    return &S->key[ki].k;
}

static bool in_cache(const void *k, size_t l)
{
    return k && starts(k, l, H.p.b, H.p.len);
}

static cache_health_t health(void)
{
    cache_health_t h;
    FUZZ_CHECK(cache_health(H.c, &h, sizeof(h)) == 0, "cache_health");
    return h;
}

static bool degraded_now(void)
{
    return H.bounds && health().state == CACHE_DEGRADED;
}

static void raise_lo(int ki, int64_t r)
{
    if (r > H.lo[ki])
        H.lo[ki] = r;
}

static void raise_all(int64_t r)
{
    for (int i = 0; i < NKEY; i++)
        raise_lo(i, r);
}

/* A read found key ki: the store had this version, current at some
 * revision at or after lo[ki]. */
static void seen_present(int ki,
                         const void *val,
                         size_t vallen,
                         const cache_meta_t *m,
                         const char *how)
{
    const fkey_t *k = &S->key[ki];
    int i = 0;
    while (i < k->nver && k->ver[i].mod != m->mod_rev)
        i++;
    FUZZ_CHECK(i < k->nver && !k->ver[i].tomb,
               "%s of key %d: mod_rev %" PRId64 " was never a put of it", how,
               ki, m->mod_rev);
    const fver_t *v = &k->ver[i];
    FUZZ_CHECK(kcmp(val, vallen, v->val, v->vallen) == 0,
               "%s of key %d: the value differs from the put at %" PRId64, how,
               ki, v->mod);
    FUZZ_CHECK(m->create_rev == v->create && m->version == v->version &&
                   m->lease == v->lease,
               "%s of key %d at %" PRId64 ": meta create %" PRId64
               " version %" PRId64 " lease %" PRId64 ", want %" PRId64
               " %" PRId64 " %" PRId64,
               how, ki, v->mod, m->create_rev, m->version, m->lease, v->create,
               v->version, v->lease);
    int64_t next = i + 1 < k->nver ? k->ver[i + 1].mod : INT64_MAX;
    FUZZ_CHECK(next > H.lo[ki],
               "%s of key %d: stale, the put at %" PRId64
               " was replaced at %" PRId64 ", but the cache is at %" PRId64
               " or later",
               how, ki, v->mod, next, H.lo[ki]);
    raise_lo(ki, v->mod);
}

/* A read did not find key ki: the store had it absent at some revision at
 * or after lo[ki]. */
static void seen_absent(int ki, const char *how)
{
    const fkey_t *k = &S->key[ki];
    const fver_t *v = ver_at(k, H.lo[ki]);
    if (!v || v->tomb)
        return;
    for (int i = 0; i < k->nver; i++) {
        if (k->ver[i].mod > H.lo[ki] && k->ver[i].tomb) {
            H.lo[ki] = k->ver[i].mod;
            return;
        }
    }
    FUZZ_CHECK(0,
               "%s of key %d: not found, but it exists at %" PRId64
               " (put at %" PRId64 ") and was never deleted since",
               how, ki, H.lo[ki], v->mod);
}

static void saw_overflow(const char *how)
{
    FUZZ_CHECK(H.bounds, "%s: EOVERFLOW without bounds", how);
    FUZZ_CHECK(degraded_now(), "%s: EOVERFLOW but not degraded", how);
    H.degraded = true;
}

static int hget(int ki, cache_meta_t *meta)
{
    const bytes_t *k = K(ki);
    coalesce_buf_t *v = NULL;
    cache_meta_t m;
    memset(&m, 0, sizeof(m));
    int rc = cache_get(H.c, k->b, k->len, &v, &m);
    TR("  get %d -> %s\n", ki, coalesce_err_name(rc));
    if (!S->key[ki].in) {
        FUZZ_CHECK(rc == COALESCE_EINVAL, "get outside the prefix: %s",
                   coalesce_err_name(rc));
    } else if (rc == COALESCE_EOVERFLOW) {
        saw_overflow("get");
    } else {
        FUZZ_CHECK(!H.degraded, "get: %s after EOVERFLOW",
                   coalesce_err_name(rc));
        FUZZ_CHECK(rc == 0 || rc == COALESCE_ENOENT, "get: %s",
                   coalesce_err_name(rc));
        if (rc == 0)
            seen_present(ki, coalesce_buf_data(v), coalesce_buf_len(v), &m,
                         "get");
        else
            seen_absent(ki, "get");
    }
    if (rc == 0 && !H.held) { /* Kept to the end: its bytes never change. */
        H.held = v;
        H.held_val = mkbytes(coalesce_buf_data(v), coalesce_buf_len(v));
        v = NULL;
    }
    coalesce_buf_unref(v);
    if (meta)
        *meta = m;
    return rc;
}

typedef struct scan {
    const bytes_t *pfx; /* What keys must start with. */
    int stop_after;     /* 0: never stop. */
    int n;
    int ki[NKEY];
    bytes_t val[NKEY];
    cache_meta_t meta[NKEY];
} scan_t;

static int scan_cb(void *data,
                   const void *key,
                   size_t keylen,
                   coalesce_buf_t *value,
                   const cache_meta_t *meta)
{
    scan_t *s = data;
    int ki = key_find(key, keylen);
    FUZZ_CHECK(ki >= 0, "scan: a key nobody wrote");
    FUZZ_CHECK(S->key[ki].in && starts(key, keylen, s->pfx->b, s->pfx->len),
               "scan: key %d is outside the scanned prefix", ki);
    FUZZ_CHECK(s->n < NKEY && (!s->n || s->ki[s->n - 1] < ki),
               "scan: key %d out of order or twice", ki);
    size_t vl = coalesce_buf_len(value);
    FUZZ_CHECK(vl <= VALCAP, "scan: a value nobody wrote");
    s->ki[s->n] = ki;
    s->val[s->n] = mkbytes(coalesce_buf_data(value), vl);
    s->meta[s->n] = *meta;
    s->n++;
    return s->stop_after && s->n >= s->stop_after;
}

/* Scan sub (NULL, 0 allowed); check and return what came. */
static int hscan(const void *sub, size_t len, int stop_after, scan_t *s)
{
    bytes_t eff = H.p;
    if (len > H.p.len)
        eff = mkbytes(sub, len);
    bool valid = starts(H.p.b, H.p.len, sub, len) || in_cache(sub, len);
    memset(s, 0, sizeof(*s));
    s->pfx = &eff;
    s->stop_after = stop_after;
    int rc = cache_scan(H.c, sub, len, scan_cb, s);
    TR("  scan %zu bytes -> %s, %d keys\n", len, coalesce_err_name(rc), s->n);
    if (!valid) {
        FUZZ_CHECK(rc == COALESCE_EINVAL && !s->n,
                   "scan outside the prefix: %s", coalesce_err_name(rc));
        return rc;
    }
    if (rc == COALESCE_EOVERFLOW) {
        FUZZ_CHECK(!s->n, "scan: EOVERFLOW after keys");
        saw_overflow("scan");
        return rc;
    }
    FUZZ_CHECK(rc == 0, "scan: %s", coalesce_err_name(rc));
    FUZZ_CHECK(!H.degraded, "scan: works again after EOVERFLOW");
    for (int i = 0; i < s->n; i++)
        seen_present(s->ki[i], s->val[i].b, s->val[i].len, &s->meta[i], "scan");
    if (stop_after && s->n >= stop_after)
        return rc; /* Stopped: what was not visited says nothing. */
    for (int i = 0, j = 0; i < NKEY; i++) {
        if (!S->key[i].in || !starts(K(i)->b, K(i)->len, eff.b, eff.len))
            continue;
        while (j < s->n && s->ki[j] < i)
            j++;
        if (j == s->n || s->ki[j] != i)
            seen_absent(i, "scan");
    }
    s->pfx = NULL;
    return rc;
}

/* W as health and cache_wait_fresh() tell it. */
static void check_w(const char *when)
{
    cache_health_t h = health();
    FUZZ_CHECK(h.watch_rev == H.wm, "%s: W is %" PRId64 ", want %" PRId64, when,
               h.watch_rev, H.wm);
    FUZZ_CHECK(cache_wait_fresh(H.c, H.wm, 0) == 0, "%s: not fresh at W", when);
    FUZZ_CHECK(cache_wait_fresh(H.c, H.wm + 1, 0) == COALESCE_ETIMEDOUT,
               "%s: fresh past W", when);
}

/*
 * The cache has everything up to the store's revision (started, relisted,
 * or quiescent): its contents are exactly the store's under the prefix, by
 * scan and by get, with no tombstone left.
 */
static void check_equal(const char *when)
{
    cache_health_t h = health();
    TR("  check_equal (%s) at %" PRId64 ", state %d\n", when, S->rev, h.state);
    if (h.state == CACHE_DEGRADED) {
        FUZZ_CHECK(H.bounds, "%s: degraded without bounds", when);
        scan_t s;
        FUZZ_CHECK(hscan(H.p.b, H.p.len, 0, &s) == COALESCE_EOVERFLOW,
                   "%s: degraded, but the scan works", when);
        return;
    }
    FUZZ_CHECK(h.state != CACHE_STOPPED, "%s: stopped", when);
    FUZZ_CHECK(!H.degraded, "%s: no longer degraded", when);
    FUZZ_CHECK(H.wm == S->rev, "harness: W %" PRId64 " not at %" PRId64, H.wm,
               S->rev);
    check_w(when);
    raise_all(S->rev);
    scan_t s;
    FUZZ_CHECK(hscan(H.p.b, H.p.len, 0, &s) == 0, "%s: scan", when);
    int n = 0;
    uint64_t bytes = 0;
    for (int i = 0; i < NKEY; i++) {
        const fver_t *v = live_now(i);
        if (!S->key[i].in || !v)
            continue;
        FUZZ_CHECK(n < s.n && s.ki[n] == i, "%s: key %d missing from the scan",
                   when, i);
        n++;
        bytes += K(i)->len + v->vallen;
    }
    FUZZ_CHECK(n == s.n, "%s: scan has %d keys, the store %d", when, s.n, n);
    for (int i = 0; i < NIN; i++) /* The hash index agrees. */
        hget(H.inside[i], NULL);
    FUZZ_CHECK(h.entries == (uint64_t)n && h.bytes == bytes,
               "%s: health says %" PRIu64 " entries, %" PRIu64
               " bytes; want %d, %" PRIu64,
               when, h.entries, h.bytes, n, bytes);
    FUZZ_CHECK(h.tombstones == 0 && h.range_tombstones == 0,
               "%s: %" PRIu64 " tombstones and %" PRIu64
               " range tombstones left with W at the store's revision",
               when, h.tombstones, h.range_tombstones);
    FUZZ_CHECK(!(H.max_entries && h.entries > H.max_entries) &&
                   !(H.max_bytes && h.bytes > H.max_bytes),
               "%s: over bounds but not degraded", when);
}

/* The store's counters before a cancel, and whether the cache was
 * degraded (a relist then keeps W). */
typedef struct snap {
    uint64_t gen;
    long refused, failed;
    bool deg;
} snap_t;

static snap_t snapshot(void)
{
    snap_t sn;
    lock();
    sn.gen = S->gen;
    sn.refused = S->refused;
    sn.failed = S->failed;
    unlock();
    sn.deg = degraded_now();
    return sn;
}

/*
 * A canceling response went out. The supervisor resumes from W + 1, or
 * relists (compacted, or the third decode error in a row) and watches
 * from the new revision + 1; wait for that watch and check which it was.
 * r1: the revision a relist read, if writes came after it (else -1).
 */
static void after_cancel(int err, snap_t sn, int64_t r1)
{
    bool relist = err == COALESCE_ECOMPACTED;
    int64_t wrep = H.wm;
    if (err == COALESCE_EDECODE) {
        relist = ++H.streak >= 3; /* cache.c's DECODE_RELIST */
        expect_report(CACHE_REPORT_DECODE, err, wrep);
    } else if (err == COALESCE_EIO) {
        expect_report(CACHE_REPORT_DISCONNECTED, err, wrep);
    }
    lock();
    while (S->gen == sn.gen)
        pthread_cond_wait(&S->cv, &S->mu);
    bool refused = S->refused != sn.refused;
    bool failed = S->failed != sn.failed;
    int64_t start = S->last_start;
    unlock();
    if (failed) /* A one-shot EIO from watch() or range(): retried. */
        expect_report(CACHE_REPORT_FAILED, COALESCE_EIO, wrep);
    TR("  rewatched from %" PRId64 " (relist %d, refused %d)\n", start, relist,
       refused);
    FUZZ_CHECK(!(relist && refused), "a relist's watch was refused");
    if (relist || refused) {
        bool raced = r1 >= 0;
        if (!raced)
            r1 = S->rev;
        expect_report(CACHE_REPORT_RELISTED, 0, r1);
        FUZZ_CHECK(start == r1 + 1,
                   "relisted: watch from %" PRId64 ", want %" PRId64, start,
                   r1 + 1);
        H.wm = r1; /* The watch goes on from r1 + 1, degraded or not. */
        if (sn.deg) {
            check_w("degraded relist");
        } else {
            H.exp_relists++;
            if (raced) /* Writes landed past it: it is not all there is. */
                raise_all(r1);
            else
                check_equal("relist");
        }
    } else {
        H.exp_reconnects++;
        FUZZ_CHECK(start == H.wm + 1,
                   "resumed from %" PRId64 ", want W + 1 = %" PRId64, start,
                   H.wm + 1);
    }
}

static void events_delivered(int64_t last)
{
    H.streak = 0;
    if (last > H.wm)
        H.wm = last;
    raise_all(H.wm);
    check_w("events");
}

static void progress_delivered(int64_t r)
{
    if (r > H.wm)
        H.wm = r;
    raise_all(H.wm);
    check_w("progress");
}

static void op_deliver(int nrev, bool stamp_now)
{
    snap_t sn = snapshot();
    int64_t last = 0;
    int d = deliver(nrev, stamp_now, &last);
    TR("  deliver %d revs%s -> %d, last %" PRId64 "\n", nrev,
       stamp_now ? " stamped now" : "", d, last);
    if (d == D_CANCEL)
        after_cancel(COALESCE_ECOMPACTED, sn, -1);
    else if (d == D_EVENTS)
        events_delivered(last);
}

static void op_cut(int err)
{
    snap_t sn = snapshot();
    TR("  cut %s\n", coalesce_err_name(err));
    cut(err);
    after_cancel(err, sn, -1);
}

static void op_progress(void)
{
    int64_t r = progress();
    TR("  progress %" PRId64 "\n", r);
    if (r >= 0)
        progress_delivered(r);
}

/* Everything out, then a progress notification at the store's revision. */
static void quiesce(void)
{
    for (int guard = 0;; guard++) {
        FUZZ_CHECK(guard < 8, "no quiescence");
        snap_t sn = snapshot();
        int64_t last = 0;
        int d = deliver(0, false, &last);
        if (d == D_CANCEL)
            after_cancel(COALESCE_ECOMPACTED, sn, -1);
        else if (d == D_EVENTS)
            events_delivered(last);
        else
            break;
    }
    int64_t r = progress();
    FUZZ_CHECK(r == S->rev, "quiet watch: progress at %" PRId64, r);
    progress_delivered(r);
    check_equal("quiescent");
}

/* --- Writes through the cache --------------------------------------------- */

/* What cache.h and the store say a write must do: its code, the revision
 * it reports, the leases it grants. */
static int predict(const cache_txn_op_t *ops,
                   size_t n,
                   int conflict,
                   int64_t *rev,
                   long *grants)
{
    *grants = 0;
    *rev = S->rev;
    if (!n || n > CACHE_TXN_MAX_OPS)
        return COALESCE_EINVAL;
    for (size_t i = 0; i < n; i++) {
        const cache_txn_op_t *a = &ops[i];
        if (!in_cache(a->key, a->keylen))
            return COALESCE_EINVAL;
        for (size_t j = 0; j < i; j++) {
            const cache_txn_op_t *b = &ops[j];
            bool ap = a->type == CACHE_TXN_DELETE_PREFIX;
            bool bp = b->type == CACHE_TXN_DELETE_PREFIX;
            if (ap && bp)
                continue;
            if (ap || bp) {
                const cache_txn_op_t *pre = ap ? a : b, *k = ap ? b : a;
                if (starts(k->key, k->keylen, pre->key, pre->keylen))
                    return COALESCE_EINVAL;
            } else if (kcmp(a->key, a->keylen, b->key, b->keylen) == 0) {
                return COALESCE_EINVAL;
            }
        }
    }
    for (size_t i = 0; i < n; i++)
        if (ops[i].opts && ops[i].opts->ttl_ms > 0)
            (*grants)++;
    for (size_t i = 0; i < n; i++) {
        const cache_txn_op_t *a = &ops[i];
        int ki = key_find(a->key, a->keylen);
        int64_t mod = ki >= 0 ? mod_now(ki) : 0;
        if ((a->type == CACHE_TXN_CREATE && mod) ||
            ((a->type == CACHE_TXN_UPDATE ||
              a->type == CACHE_TXN_DELETE_VALUE) &&
             mod != a->expect))
            return conflict;
    }
    bool changes = false;
    for (size_t i = 0; i < n; i++) {
        const cache_txn_op_t *a = &ops[i];
        switch (a->type) {
        case CACHE_TXN_PUT:
        case CACHE_TXN_CREATE:
        case CACHE_TXN_UPDATE:
            if (a->opts && a->opts->ttl_ms <= 0 && a->opts->lease &&
                !lease_live(a->opts->lease))
                return COALESCE_ENOENT;
            changes = true;
            break;
        case CACHE_TXN_DELETE_PREFIX:
            for (int k = 0; k < NKEY; k++)
                if (live_now(k) &&
                    starts(K(k)->b, K(k)->len, a->key, a->keylen))
                    changes = true;
            break;
        default:
            if (mod_now(key_find(a->key, a->keylen)))
                changes = true;
        }
    }
    *rev = S->rev + changes;
    return 0;
}

static int64_t count_deleted(const cache_txn_op_t *a)
{
    int64_t d = 0;
    for (int k = 0; k < NKEY; k++)
        if (live_now(k) &&
            (a->type == CACHE_TXN_DELETE_PREFIX
                 ? starts(K(k)->b, K(k)->len, a->key, a->keylen)
                 : kcmp(K(k)->b, K(k)->len, a->key, a->keylen) == 0))
            d++;
    return d;
}

enum { W_PUT, W_CREATE, W_UPDATE, W_DELETE, W_DELVAL, W_DELPFX, W_TXN };

static const char *const wnames[] = {
    "put", "create", "update", "delete", "delval", "delete_prefix", "txn"};

/* Run one cache write and check it against the model. */
static void do_write(int kind, const cache_txn_op_t *ops, size_t n)
{
    int conflict = kind == W_CREATE ? COALESCE_EEXIST : COALESCE_ECONFLICT;
    int64_t want_rev;
    long grants;
    int want = predict(ops, n, conflict, &want_rev, &grants);
    int64_t want_del = n ? count_deleted(&ops[0]) : 0;
    long t0 = S->txns, g0 = S->grants, v0 = S->revokes;
    int l0 = S->nlease;
    int64_t rev0 = S->rev, rev = UNSET, del = UNSET;
    const cache_txn_op_t *a = &ops[0];
    int rc = 0;
    switch (kind) {
    case W_PUT:
        rc = cache_put(H.c, a->key, a->keylen, a->value, a->vallen, a->opts,
                       &rev);
        break;
    case W_CREATE:
        rc = cache_create(H.c, a->key, a->keylen, a->value, a->vallen, a->opts,
                          &rev);
        break;
    case W_UPDATE:
        rc = cache_update(H.c, a->key, a->keylen, a->value, a->vallen,
                          a->expect, a->opts, &rev);
        break;
    case W_DELETE:
        rc = cache_delete(H.c, a->key, a->keylen, &del, &rev);
        break;
    case W_DELVAL:
        rc = cache_delete_value(H.c, a->key, a->keylen, a->expect, &rev);
        break;
    case W_DELPFX:
        rc = cache_delete_prefix(H.c, a->key, a->keylen, &del, &rev);
        break;
    default:
        rc = cache_txn(H.c, ops, n, &rev);
    }
    if (S->echo_last) { /* The store delivered the echo first. */
        TR("  echo delivered up to %" PRId64 "\n", S->echo_last);
        events_delivered(S->echo_last);
        S->echo_last = 0;
    }
    TR("  %s x%zu -> %s, rev %" PRId64 " (want %s, %" PRId64 ")\n",
       wnames[kind], n, coalesce_err_name(rc), rev, coalesce_err_name(want),
       want_rev);
    FUZZ_CHECK(rc == want, "%s: %s, want %s", wnames[kind],
               coalesce_err_name(rc), coalesce_err_name(want));
    FUZZ_CHECK(S->txns - t0 == (want == COALESCE_EINVAL ? 0 : 1),
               "%s: %ld store txns", wnames[kind], S->txns - t0);
    FUZZ_CHECK(S->grants - g0 == grants && S->revokes - v0 == (rc ? grants : 0),
               "%s: %ld leases granted, %ld revoked; want %ld, %ld",
               wnames[kind], S->grants - g0, S->revokes - v0, grants,
               rc ? grants : 0);
    if (rc == 0 || rc == conflict)
        FUZZ_CHECK(rev == want_rev,
                   "%s: reports revision %" PRId64 ", want %" PRId64,
                   wnames[kind], rev, want_rev);
    else
        FUZZ_CHECK(rev == UNSET, "%s failed but set a revision", wnames[kind]);
    FUZZ_CHECK(S->rev == (rc ? rev0 : want_rev), "%s: store at %" PRId64,
               wnames[kind], S->rev);
    if (kind == W_DELETE || kind == W_DELPFX)
        FUZZ_CHECK(del == (rc ? 0 : want_del),
                   "%s: deleted %" PRId64 ", want %" PRId64, wnames[kind], del,
                   rc ? 0 : want_del);
    if (rc) {
        for (int i = l0; i < S->nlease; i++)
            FUZZ_CHECK(!S->lease_live[i], "a failed write kept its lease");
        return;
    }
    /* Accepted: the store holds it at that revision; this cache reads it
     * or something newer from now on. */
    for (size_t i = 0; i < n; i++) {
        const cache_txn_op_t *o = &ops[i];
        if (o->type == CACHE_TXN_DELETE_PREFIX) {
            for (int k = 0; k < NKEY; k++) {
                if (!starts(K(k)->b, K(k)->len, o->key, o->keylen))
                    continue;
                FUZZ_CHECK(!live_now(k), "prefix delete left key %d", k);
                raise_lo(k, want_rev);
            }
            continue;
        }
        int ki = key_find(o->key, o->keylen);
        const fver_t *v = live_now(ki);
        if (o->type == CACHE_TXN_DELETE || o->type == CACHE_TXN_DELETE_VALUE) {
            FUZZ_CHECK(!v, "delete left key %d", ki);
        } else {
            FUZZ_CHECK(v && v->mod == want_rev &&
                           kcmp(v->val, v->vallen, o->value, o->vallen) == 0,
                       "put of key %d is not in the store", ki);
            if (o->opts && o->opts->ttl_ms > 0) {
                bool mine = false;
                for (int l = l0; l < S->nlease; l++)
                    mine =
                        mine || (S->lease[l] == v->lease && S->lease_live[l]);
                FUZZ_CHECK(mine, "put with a TTL: lease %" PRId64, v->lease);
                if (H.nhl < HLEASES)
                    H.hl[H.nhl++] = v->lease; /* Others may revoke it. */
            } else {
                FUZZ_CHECK(v->lease == (o->opts ? o->opts->lease : 0),
                           "put: lease %" PRId64, v->lease);
            }
        }
        raise_lo(ki, want_rev);
    }
    /* Read your writes, at once. */
    for (size_t i = 0; i < n; i++)
        if (ops[i].type != CACHE_TXN_DELETE_PREFIX)
            hget(key_find(ops[i].key, ops[i].keylen), NULL);
}

static int pick_key(uint8_t b)
{
    return (b & 7) == 7 ? H.outside[(b >> 3) % NOUT] : H.inside[(b >> 3) % NIN];
}

static unsigned char vals[TXN_BIG][VALCAP];
static cache_put_opts_t popts[TXN_BIG];
static cache_txn_op_t tops[TXN_BIG];

/* A value: 0 to 3 bytes, the first one a write counter. */
static void gen_value(uint8_t b, int i, cache_txn_op_t *o)
{
    o->vallen = b & 3;
    vals[i][0] = ++H.seq;
    vals[i][1] = b;
    vals[i][2] = (unsigned char)(b >> 2);
    o->value = !o->vallen && (b & 0x80) ? NULL : vals[i];
}

static void gen_opts(uint8_t b, int i, cache_txn_op_t *o)
{
    cache_put_opts_t *po = &popts[i];
    memset(po, 0, sizeof(*po));
    o->opts = NULL;
    switch (b % 16) {
    case 13:
        po->ttl_ms = 1500;
        o->opts = po;
        break;
    case 14: /* A lease of another writer's: live, or revoked. */
        po->lease = H.nhl ? H.hl[(b >> 4) % H.nhl] : 0;
        o->opts = po;
        break;
    case 15:
        po->lease = BOGUS;
        o->opts = po;
        break;
    default:
        break;
    }
}

/* An expected mod revision: the cache's view, right, or wrong. */
static int64_t gen_expect(int ki, uint8_t b)
{
    int64_t mod = mod_now(ki);
    switch (b % 6) {
    case 0: {
        cache_meta_t m;
        return S->key[ki].in && hget(ki, &m) == 0 ? m.mod_rev : 0;
    }
    case 1:
    case 2:
        return mod;
    case 3:
        return mod + 1;
    case 4:
        return mod ? mod - 1 : S->rev;
    default:
        return 0;
    }
}

static void gen_op(fuzz_in_t *in, int type, int i)
{
    cache_txn_op_t *o = &tops[i];
    memset(o, 0, sizeof(*o));
    o->type = type;
    uint8_t kb = fuzz_u8(in);
    if (type == CACHE_TXN_DELETE_PREFIX) {
        const bytes_t *sp = &H.sub[kb % NSUB];
        o->key = sp->b;
        o->keylen = sp->len;
        return;
    }
    int ki = pick_key(kb);
    o->key = K(ki)->b;
    o->keylen = K(ki)->len;
    if (type == CACHE_TXN_PUT || type == CACHE_TXN_CREATE ||
        type == CACHE_TXN_UPDATE) {
        gen_value(fuzz_u8(in), i, o);
        gen_opts(fuzz_u8(in), i, o);
    }
    if (type == CACHE_TXN_UPDATE || type == CACHE_TXN_DELETE_VALUE)
        o->expect = gen_expect(ki, fuzz_u8(in));
}

static void op_write(fuzz_in_t *in, int kind)
{
    static const int single[] = {
        CACHE_TXN_PUT,    CACHE_TXN_CREATE,       CACHE_TXN_UPDATE,
        CACHE_TXN_DELETE, CACHE_TXN_DELETE_VALUE, CACHE_TXN_DELETE_PREFIX};
    size_t n = 1;
    if (kind != W_TXN) {
        gen_op(in, single[kind], 0);
    } else {
        uint8_t b = fuzz_u8(in);
        n = b % 16 == 0 ? 0 : b % 16 == 15 ? TXN_BIG : 1 + b % 4;
        if (n == TXN_BIG) { /* Too many: refused before the store. */
            gen_op(in, CACHE_TXN_PUT, 0);
            for (size_t i = 1; i < n; i++)
                tops[i] = tops[0];
        } else {
            for (size_t i = 0; i < n; i++)
                gen_op(in, fuzz_u8(in) % 6, (int)i);
        }
    }
    do_write(kind, tops, n);
}

/* The resume or the relist after a cut fails once (EIO) and is retried
 * after the backoff (FUZZ_CACHE_SLOW). */
static void op_flaky(fuzz_in_t *in)
{
    bool range = fuzz_u8(in) & 1;
    lock();
    if (range) { /* A relist's list. */
        S->fail_range = true;
        live_locked()->doom = COALESCE_ECOMPACTED;
        live_locked()->doom_compact = S->compact;
    } else {
        S->fail_watch = true;
    }
    unlock();
    TR("  next %s fails\n", range ? "range" : "watch");
    if (range)
        op_deliver(0, false);
    else
        op_cut(COALESCE_EIO);
    FUZZ_CHECK(!S->fail_range && !S->fail_watch, "the failure never came");
}

/* Writes through the cache while a relist holds its snapshot: the swap
 * must keep them, being newer than what it read. */
static void op_relist_race(fuzz_in_t *in)
{
    static const int kinds[8] = {W_PUT,    W_CREATE, W_UPDATE, W_DELETE,
                                 W_DELVAL, W_DELPFX, W_TXN,    W_PUT};
    snap_t sn = snapshot();
    if (S->rev > S->compact)
        compact_at(S->rev);
    lock();
    S->gate = 1;
    cancel_locked(live_locked(), COALESCE_ECOMPACTED, S->compact);
    while (S->gate != 2)
        pthread_cond_wait(&S->cv, &S->mu);
    int64_t r1 = S->gate_rev;
    unlock();
    TR("  relist holds its snapshot at %" PRId64 "\n", r1);
    for (int i = 0, n = 1 + fuzz_u8(in) % 3; i < n; i++)
        op_write(in, kinds[fuzz_u8(in) % 8]);
    sn.deg = degraded_now(); /* Those writes may have degraded it. */
    lock();
    S->gate = 0;
    pthread_cond_broadcast(&S->cv);
    unlock();
    after_cancel(COALESCE_ECOMPACTED, sn, r1);
}

/* --- Other writers: straight to the store --------------------------------- */

static void other_txn(const cache_op_t *ops, size_t n)
{
    int ok = 0;
    int64_t r = 0;
    lock();
    int rc = txn_locked(NULL, 0, ops, n, &ok, &r, NULL);
    unlock();
    TR("  other writer x%zu -> %s, rev %" PRId64 "\n", n, coalesce_err_name(rc),
       r);
    FUZZ_CHECK(rc == 0 && ok, "other writer: %s", coalesce_err_name(rc));
}

static void op_other(fuzz_in_t *in, int what)
{
    static unsigned char ov[4][VALCAP];
    static bytes_t oend;
    cache_op_t ops[3];
    memset(ops, 0, sizeof(ops));
    if (what == 0 || what == 2) { /* Puts (several keys: one revision). */
        uint8_t b = fuzz_u8(in);
        size_t n = what == 0 ? 1 : 2 + b % 2;
        int used[3] = {-1, -1, -1};
        size_t m = 0;
        for (size_t i = 0; i < n; i++) {
            uint8_t kb = fuzz_u8(in), vb = fuzz_u8(in);
            int ki = (kb & 3) == 3 ? H.outside[(kb >> 2) % NOUT]
                                   : H.inside[(kb >> 2) % NIN];
            if (ki == used[0] || ki == used[1])
                continue;
            used[m] = ki;
            cache_op_t *o = &ops[m];
            o->key = K(ki)->b;
            o->keylen = K(ki)->len;
            if (what == 2 && (vb & 0x40)) {
                o->type = CACHE_OP_DELETE;
            } else {
                o->type = CACHE_OP_PUT;
                ov[m][0] = ++H.seq;
                ov[m][1] = vb;
                o->value = ov[m];
                o->vallen = vb & 3;
                if ((vb & 0x30) == 0x30 && H.nhl &&
                    lease_live(H.hl[(vb >> 2) % H.nhl]))
                    o->lease = H.hl[(vb >> 2) % H.nhl];
            }
            m++;
        }
        other_txn(ops, m);
    } else { /* Delete a key, or a range: inside, over, or outside. */
        uint8_t b = fuzz_u8(in);
        if (b & 1) {
            int ki = pick_key(b >> 1);
            ops[0] = (cache_op_t){
                CACHE_OP_DELETE, K(ki)->b, K(ki)->len, NULL, 0, NULL, 0, 0};
        } else {
            const bytes_t *sp = &H.sub[(b >> 1) % NSUB];
            oend = prefix_end(sp);
            ops[0] = (cache_op_t){CACHE_OP_DELETE,
                                  sp->len ? sp->b : (const unsigned char *)"",
                                  sp->len,
                                  oend.b,
                                  oend.len,
                                  NULL,
                                  0,
                                  0};
        }
        other_txn(ops, 1);
    }
}

static void op_lease(uint8_t b)
{
    if (b & 1) {
        if (H.nhl >= HLEASES)
            return;
        int64_t id = 0;
        FUZZ_CHECK(fs_lease_grant(&S->base, 60000, &id) == 0, "grant");
        H.hl[H.nhl++] = id;
        TR("  other writer: lease %" PRId64 "\n", id);
    } else if (H.nhl) {
        int64_t id = H.hl[(b >> 1) % H.nhl];
        int rc = fs_lease_revoke(&S->base, id);
        TR("  other writer: revoke %" PRId64 " -> %s, rev %" PRId64 "\n", id,
           coalesce_err_name(rc), S->rev);
    }
}

static void op_compact(uint8_t b)
{
    if (b & 0x80) { /* Compaction between two pages of the next list. */
        lock();
        S->page_fault = true;
        unlock();
        TR("  page fault armed\n");
    } else if (S->rev > S->compact) {
        compact_at(S->compact + 1 + b % (S->rev - S->compact));
    }
}

/* --- Life ----------------------------------------------------------------- */

static void start_cache(void)
{
    int rc = cache_start(H.c);
    TR("  start -> %s at %" PRId64 "\n", coalesce_err_name(rc), S->rev);
    FUZZ_CHECK(rc == 0, "cache_start: %s", coalesce_err_name(rc));
    FUZZ_CHECK(S->last_start == S->rev + 1,
               "started: watch from %" PRId64 ", want %" PRId64, S->last_start,
               S->rev + 1);
    H.wm = S->rev;
    H.streak = 0;
    H.degraded = false;
    raise_all(S->rev);
    check_equal("start");
}

static void op_restart(void)
{
    TR("  restart\n");
    if (degraded_now())
        H.overflow_episodes++;
    cache_stop(H.c);
    FUZZ_CHECK(S->nw == 0, "a watch outlived cache_stop");
    FUZZ_CHECK(health().state == CACHE_STOPPED, "stopped: state");
    const bytes_t *k = K(H.inside[0]);
    FUZZ_CHECK(cache_get(H.c, k->b, k->len, NULL, NULL) == COALESCE_ENOTSTARTED,
               "get while stopped");
    long t0 = S->txns;
    FUZZ_CHECK(cache_put(H.c, k->b, k->len, "x", 1, NULL, NULL) ==
                       COALESCE_ENOTSTARTED &&
                   S->txns == t0,
               "put while stopped");
    FUZZ_CHECK(cache_wait_fresh(H.c, 1, 0) == COALESCE_ENOTSTARTED,
               "wait_fresh while stopped");
    start_cache();
    FUZZ_CHECK(cache_start(H.c) == COALESCE_EBUSY, "second start");
}

/*
 * Starting a cache costs a thread (or two) and so does stopping it, more
 * than a whole run under ASan. So each set of cache options keeps its
 * cache and store across runs, and every run leaves them as a fresh start
 * would: the store empty with no history, the cache empty, W at the
 * store's revision, no tombstone, no decode streak (wipe()). Only the
 * revision numbers differ from a fresh start, and the cache depends on
 * their order alone.
 */
#define NPC    4 /* Prefixes. */
#define NPAGE  3
#define NBOUND 3
#define NCONF  (NPC * NPAGE * NBOUND)

static struct {
    cache_t *c;
    fstore_t *st;
} pool[NCONF];

static void pool_free(void)
{
    for (int i = 0; i < NCONF; i++) {
        if (!pool[i].c)
            continue;
        S = pool[i].st;
        cache_free(pool[i].c);
        FUZZ_CHECK(S->nw == 0, "a watch outlived cache_free");
        pthread_mutex_destroy(&S->mu);
        pthread_cond_destroy(&S->cv);
        free(S);
        pool[i].c = NULL;
    }
    S = NULL;
}

/* Delete everything (a put first: the events response resets the decode
 * streak), deliver it, then forget the history. */
static void wipe(void)
{
    cache_op_t put = {CACHE_OP_PUT,
                      K(H.inside[0])->b,
                      K(H.inside[0])->len,
                      NULL,
                      0,
                      "w",
                      1,
                      0};
    cache_op_t del = {CACHE_OP_DELETE, "", 0, "\0", 1, NULL, 0, 0};
    other_txn(&put, 1);
    other_txn(&del, 1);
    int64_t last = 0;
    FUZZ_CHECK(deliver(0, false, &last) == D_EVENTS, "wipe: no events");
    events_delivered(last);
    progress_delivered(progress());
    cache_health_t h = health();
    FUZZ_CHECK(h.state == CACHE_DEGRADED ||
                   (h.entries == 0 && h.bytes == 0 && h.tombstones == 0 &&
                    h.range_tombstones == 0 && h.watch_rev == S->rev),
               "wiped, but %" PRIu64 " entries and %" PRIu64
               " tombstones left, W %" PRId64 " at %" PRId64,
               h.entries, h.tombstones, h.watch_rev, S->rev);
    lock();
    fwatch_t *w = live_locked();
    FUZZ_CHECK(!w->doom && w->next == S->rev + 1, "wiped: watch at %" PRId64,
               w->next);
    for (int i = 0; i < NKEY; i++)
        S->key[i].nver = 0;
    S->nlog = 0;
    S->nlease = 0;
    S->compact = S->rev; /* Nobody reads or watches below it any more. */
    S->page_fault = false;
    S->echo = false;
    unlock();
}

/* --- The driver ----------------------------------------------------------- */

static void setup_keys(int pc)
{
    bytes_t out[NOUT];
    switch (pc) {
    case 0:
        H.p = LIT("p/");
        out[0] = LIT("p");
        out[1] = LIT("p.z");
        out[2] = LIT("p0");
        break;
    case 1:
        H.p = LIT("k");
        out[0] = LIT("j\xff");
        out[1] = LIT("l");
        out[2] = LIT("\x01");
        break;
    case 2: /* No upper bound: the range ends with "\0". */
        H.p = LIT("\xff");
        out[0] = LIT("\xfe");
        out[1] = LIT("\xfe\xff");
        out[2] = LIT("a");
        break;
    default:
        H.p = LIT("p\xff");
        out[0] = LIT("p");
        out[1] = LIT("p\xfe\xff");
        out[2] = LIT("q");
        break;
    }
    H.pend = prefix_end(&H.p);
    static const struct {
        const char *s;
        size_t n;
    } sfx[NIN] = {{"", 0},  {"a", 1},     {"a\0", 2},  {"ab", 2},
                  {"b", 1}, {"b\xff", 2}, {"\xff", 1}, {"\xff\xff", 2}};
    bytes_t all[NKEY];
    for (int i = 0; i < NIN; i++) {
        all[i] = H.p;
        memcpy(all[i].b + H.p.len, sfx[i].s, sfx[i].n);
        all[i].len += sfx[i].n;
    }
    for (int i = 0; i < NOUT; i++)
        all[NIN + i] = out[i];
    /* The store keeps keys in byte order. */
    for (int i = 1; i < NKEY; i++)
        for (int j = i; j > 0 && kcmp(all[j].b, all[j].len, all[j - 1].b,
                                      all[j - 1].len) < 0;
             j--) {
            bytes_t t = all[j];
            all[j] = all[j - 1];
            all[j - 1] = t;
        }
    int ni = 0, no = 0;
    for (int i = 0; i < NKEY; i++) {
        S->key[i].k = all[i];
        S->key[i].in = starts(all[i].b, all[i].len, H.p.b, H.p.len);
        S->key[i].nver = 0;
        if (S->key[i].in)
            H.inside[ni++] = i;
        else
            H.outside[no++] = i;
    }
    FUZZ_CHECK(ni == NIN && no == NOUT, "key table");
    for (int i = 0; i < 4; i++) {
        static const char *const s4[4] = {"", "a", "b", "\xff"};
        H.sub[i] = H.p;
        H.sub[i].b[H.p.len] = (unsigned char)s4[i][0];
        H.sub[i].len += i > 0;
    }
    H.sub[4] = H.p; /* Shorter than the prefix: the whole cache for scans. */
    H.sub[4].len--;
    H.sub[5] = out[2]; /* Outside. */
}

static void on_exit_free(void)
{
    pool_free();
}

/*
 * Header: h0 picks the cache (prefix, page size, bounds) and whether
 * compaction cancels a lagging watch; h1 the keys other writers put before
 * the run, a compaction, how the cache catches up with them (one catch-up
 * batch, a response per revision, left pending, or a relist) and whether
 * the store refuses a compacted resume in watch() itself (FUZZ_CACHE_SLOW).
 */
static void setup(fuzz_in_t *in)
{
    static const size_t pages[4] = {1, 3, 0, 0};
    uint8_t h0 = fuzz_u8(in), h1 = fuzz_u8(in);
    int pc = h0 & 3, page = h0 >> 2 & 3, bound = h0 >> 4 & 3;
    if (page > 2)
        page = 2;
    if (bound > 2)
        bound = 0;
    int conf = (pc * NPAGE + page) * NBOUND + bound;
    R.n = 0;
    memset(&H, 0, sizeof(H));
    H.bounds = bound != 0;
    H.max_entries = bound == 1 ? 3 : 0;
    H.max_bytes = bound == 2 ? 12 : 0;
    bool fresh = !pool[conf].c;
    if (fresh) {
        fstore_t *st = calloc(1, sizeof(*st));
        FUZZ_CHECK(st, "calloc");
        pthread_mutex_init(&st->mu, NULL);
        pthread_cond_init(&st->cv, NULL);
        st->base.ops = &fs_ops;
        st->rev = 1;     /* etcd: the first write makes 2. */
        st->compact = 1; /* As wipe() leaves it: runs depend on no number. */
        pool[conf].st = st;
    }
    S = pool[conf].st;
    setup_keys(pc);
    S->wkey = H.p;
    S->wend = H.pend;
    S->doom_on_compact = h0 >> 6 & 1;
    S->sync_erange = slow && (h1 >> 6) == 3;
    if (fresh) {
        cache_opts_t o;
        cache_opts_init(&o);
        o.page_size = pages[page];
        o.backoff_min_ms = 1; /* Paid only when a resume is refused. */
        o.backoff_max_ms = 1;
        o.max_entries = H.max_entries;
        o.max_bytes = H.max_bytes;
        o.report = on_report;
        o.report_data = &R;
        FUZZ_CHECK(cache_new(&pool[conf].c, &S->base, H.p.b, H.p.len, &o) == 0,
                   "cache_new");
        H.c = pool[conf].c;
        start_cache();
    }
    H.c = pool[conf].c;
    /* The state may still say RELISTING or RECONNECTING: the supervisor
     * sets RUNNING after the new watch is open. */
    cache_health_t h = health();
    FUZZ_CHECK(h.state != CACHE_STOPPED && h.state != CACHE_DEGRADED &&
                   h.watch_rev == S->rev && h.entries == 0 &&
                   h.tombstones == 0 && h.range_tombstones == 0 && S->nw == 1,
               "not as a fresh start: state %d, W %" PRId64 " at %" PRId64
               ", %" PRIu64 " entries",
               h.state, h.watch_rev, S->rev, h.entries);
    H.base_relists = h.relists;
    H.base_reconnects = h.reconnects;
    H.base_dropped = h.reports_dropped;
    H.base_events = h.events;
    H.events0 = S->events;
    H.wm = S->rev;
    raise_all(S->rev);
    TR("setup: conf %d (prefix %d, page %zu, bounds %d), doom %d, "
       "sync_erange %d, at %" PRId64 "\n",
       conf, pc, pages[page], bound, S->doom_on_compact, S->sync_erange,
       S->rev);

    /* Keys other writers put before the run. */
    for (int i = 0, n = h1 & 7; i < n; i++)
        op_other(in, 0);
    if (h1 & 0x20 && S->rev > S->compact)
        compact_at(S->rev);
    switch (h1 >> 3 & 3) {
    case 0: /* One catch-up batch. */
        op_deliver(0, true);
        op_progress();
        break;
    case 1: /* A response per revision. */
        for (int i = 0; i < 8; i++)
            op_deliver(1, false);
        op_progress();
        break;
    case 2: /* Left for the run to deliver. */
        break;
    default: /* Compacted: relist (what a start would list). */
        if (!S->nlog)
            break; /* Nothing to list. */
        if (S->rev > S->compact)
            compact_at(S->rev);
        lock();
        live_locked()->doom = COALESCE_ECOMPACTED;
        live_locked()->doom_compact = S->compact;
        unlock();
        op_deliver(0, false);
        break;
    }
}

/* Until cond holds: the supervisor counts a resume after the new watch is
 * open. The deadline only bounds a broken cache. */
static void wait_counters(long relists, long reconnects, cache_health_t *h)
{
    int64_t t0 = 0;
    for (long spins = 0;; spins++) {
        *h = health();
        if ((long)(h->relists - H.base_relists) == relists &&
            (long)(h->reconnects - H.base_reconnects) == reconnects)
            return;
        FUZZ_CHECK((long)(h->relists - H.base_relists) <= relists &&
                       (long)(h->reconnects - H.base_reconnects) <= reconnects,
                   "%" PRIu64 " relists and %" PRIu64
                   " reconnects, want %ld and %ld",
                   h->relists - H.base_relists,
                   h->reconnects - H.base_reconnects, relists, reconnects);
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        int64_t now = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
        if (!t0)
            t0 = now;
        FUZZ_CHECK(now - t0 < 5000000000,
                   "%" PRIu64 " relists and %" PRIu64
                   " reconnects, want %ld and %ld",
                   h->relists - H.base_relists,
                   h->reconnects - H.base_reconnects, relists, reconnects);
        sched_yield();
    }
}

/* The reports of this run, once the reporter thread delivered them. */
static void check_reports(uint64_t dropped)
{
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += 5;
    long want = H.nexp + H.overflow_episodes - (long)dropped;
    pthread_mutex_lock(&R.mu);
    while (R.n < want)
        if (pthread_cond_timedwait(&R.cv, &R.mu, &dl)) {
            FUZZ_CHECK(R.n >= want, "%d reports, want %ld", R.n, want);
        }
    int n = 0, over = 0;
    for (int i = 0; i < R.n; i++) {
        if (R.r[i].what == CACHE_REPORT_OVERFLOW) {
            over++;
            continue;
        }
        const rep_t *g = &R.r[i], *w = n < H.nexp ? &H.exp[n] : NULL;
        if (!dropped)
            FUZZ_CHECK(w && g->what == w->what && g->code == w->code &&
                           (w->rev < 0 || g->rev == w->rev),
                       "report %d: %d %s %" PRId64 ", want %d %s %" PRId64, n,
                       g->what, coalesce_err_name(g->code), g->rev,
                       w ? w->what : -1, coalesce_err_name(w ? w->code : 0),
                       w ? w->rev : -1);
        n++;
    }
    if (!dropped)
        FUZZ_CHECK(n == H.nexp && over == H.overflow_episodes,
                   "%d reports and %d overflows, want %d and %ld", n, over,
                   H.nexp, H.overflow_episodes);
    else
        FUZZ_CHECK(R.n == want, "%d reports, want %ld", R.n, want);
    R.n = 0;
    pthread_mutex_unlock(&R.mu);
}

static void finish(void)
{
    quiesce();
    if (H.held) {
        FUZZ_CHECK(kcmp(coalesce_buf_data(H.held), coalesce_buf_len(H.held),
                        H.held_val.b, H.held_val.len) == 0,
                   "a value held by a reader changed");
        coalesce_buf_unref(H.held);
        H.held = NULL;
    }
    cache_health_t h;
    wait_counters(H.exp_relists, H.exp_reconnects, &h);
    bool deg = h.state == CACHE_DEGRADED;
    /* Every event delivered counts, applied or not by the rule (without
     * bounds: a degraded cache counts none). */
    FUZZ_CHECK(H.bounds ||
                   (long)(h.events - H.base_events) == S->events - H.events0,
               "%" PRIu64 " events counted, %ld delivered",
               h.events - H.base_events, S->events - H.events0);
    wipe();
    if (deg) { /* Sticky until restarted: restart on the empty store. */
        op_restart();
        h = health();
    }
    check_reports(h.reports_dropped - H.base_dropped);
}

enum {
    O_PUT,
    O_CREATE,
    O_UPDATE,
    O_DELETE,
    O_DELVAL,
    O_DELPFX,
    O_TXN,
    O_GET,
    O_SCAN,
    O_OPUT,
    O_ODEL,
    O_OMULTI,
    O_LEASE,
    O_DELIVER,
    O_PROGRESS,
    O_CUT,
    O_COMPACT,
    O_QUIESCE,
    O_ECHO
};

/* Opcode byte -> step, weighted toward the common ones. */
static const uint8_t optab[32] = {
    O_PUT,     O_PUT,     O_PUT,     O_CREATE,  O_CREATE,  O_UPDATE,   O_UPDATE,
    O_DELETE,  O_DELETE,  O_DELVAL,  O_DELPFX,  O_TXN,     O_TXN,      O_GET,
    O_GET,     O_GET,     O_SCAN,    O_OPUT,    O_OPUT,    O_OPUT,     O_ODEL,
    O_OMULTI,  O_LEASE,   O_DELIVER, O_DELIVER, O_DELIVER, O_PROGRESS, O_CUT,
    O_COMPACT, O_QUIESCE, O_DELIVER, O_ECHO};

static void step(fuzz_in_t *in)
{
    uint8_t opb = fuzz_u8(in);
    int op = optab[opb % 32];
    TR("step %d: op %d\n", H.step, op);
    H.step++;
    switch (op) {
    case O_PUT:
    case O_CREATE:
    case O_UPDATE:
    case O_DELETE:
    case O_DELVAL:
    case O_DELPFX:
    case O_TXN:
        op_write(in, op - O_PUT + W_PUT);
        break;
    case O_GET:
        hget(pick_key(fuzz_u8(in)), NULL);
        break;
    case O_SCAN: {
        uint8_t b = fuzz_u8(in);
        const bytes_t *sp = &H.sub[b % NSUB];
        scan_t s;
        hscan(sp->len ? sp->b : (b & 0x40 ? NULL : H.p.b), sp->len,
              b & 0x80 ? 1 : 0, &s);
        break;
    }
    case O_OPUT:
        op_other(in, 0);
        break;
    case O_ODEL:
        op_other(in, 1);
        break;
    case O_OMULTI:
        op_other(in, 2);
        break;
    case O_LEASE:
        op_lease(fuzz_u8(in));
        break;
    case O_DELIVER: {
        uint8_t b = fuzz_u8(in);
        op_deliver(b & 3, b & 4);
        break;
    }
    case O_PROGRESS:
        op_progress();
        break;
    case O_CUT: {
        uint8_t b = fuzz_u8(in) % 16;
        if (b == 15)
            op_restart(); /* Rare: it costs threads. */
        else if (b >= 12)
            op_relist_race(in);
        else if (b == 11 && slow)
            op_flaky(in);
        else
            op_cut(b < 6 ? COALESCE_EIO : COALESCE_EDECODE);
        break;
    }
    case O_ECHO:
        lock();
        S->echo = true;
        unlock();
        TR("  echo armed\n");
        break;
    case O_COMPACT:
        op_compact(fuzz_u8(in));
        break;
    default:
        quiesce();
        break;
    }
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    trace = getenv("FUZZ_CACHE_TRACE") != NULL;
    slow = getenv("FUZZ_CACHE_SLOW") != NULL;
    atexit(on_exit_free); /* Runs before LeakSanitizer's check. */
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_in_t in = fuzz_in(data, size);
    setup(&in);
    for (int i = 0; i < MAX_OPS && fuzz_left(&in); i++)
        step(&in);
    finish();
    return 0;
}

#pragma clang attribute pop

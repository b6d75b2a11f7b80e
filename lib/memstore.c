/*
 * In-memory store: etcd v3's MVCC semantics in process (store.h).
 *
 * Revisions. A fresh store is at revision 1 and its first write makes 2, as
 * in etcd. A transaction, lease revoke or lease expiry takes a new revision
 * only if it changes a key (deleting absent keys changes nothing).
 *
 * Data. Every key is a node (knode_t) of a skip list in byte order. A node
 * holds its versions (rec_t), oldest first, one per change; a delete is a
 * tombstone version. A read at revision R takes the newest version at or
 * below R, so lookups and ranges cost O(log n + k). The log lists every
 * change (node, version) in revision order, for watch catch-up and for
 * compaction, which walks only the part of the log it drops and trims those
 * nodes: it costs what it frees, not the whole key space.
 *
 * Watches. Each has a thread and a queue of responses built by the commit
 * that caused them, under the store lock, holding references on the nodes
 * and versions they carry. So a slow callback only lengthens its own queue,
 * and compaction never takes an event from under a running watch (etcd
 * cancels only a watch that starts below the compact revision). While the
 * store is held, responses go to a second queue per watch, which the test
 * hooks release, batch or drop.
 *
 * Locking. One mutex guards everything. A commit makes every allocation it
 * needs before its first change, so it either happens whole or fails with
 * COALESCE_ENOMEM having changed nothing. Callbacks (range, watch) run with
 * no lock held, on references taken under it.
 */
#include "coalesce_int.h"

#include <pthread.h>
#include <string.h>

#define MAXH      24  /* Skip list levels; p = 1/4 serves 4^24 keys. */
#define LOG_MIN   256 /* First log allocation, in changes. */
#define LEASE_MIN 16  /* First lease hash size. */
#define RANGE_MIN 64  /* Range results held on the stack. */
#define PLAN_MIN  8   /* Changes of a plan held on the stack. */
#define RETRY_NS  (10 * 1000000) /* Lease expiry retry after ENOMEM. */

typedef struct rec rec_t;
typedef struct knode knode_t;
typedef struct lease lease_t;
typedef struct witem witem_t;
typedef struct memstore memstore_t;

/* One version of a key; immutable once committed. */
struct rec {
    unsigned refs; /* Its node's version list, responses, ranges, a plan. */
    bool tomb;
    int64_t create_rev;
    int64_t mod_rev;
    int64_t version;
    int64_t lease;
    size_t vallen;
    unsigned char val[];
};

struct knode {
    unsigned refs; /* 1 while in the skip list, + responses and ranges. */
    bool linked;
    uint8_t height;
    uint32_t nv, capv;
    rec_t **v; /* Versions, oldest first; &vinl while capv is 1. */
    rec_t *vinl;
    lease_t *lease;         /* The lease of its live version, if any. */
    knode_t *lprev, *lnext; /* In lease->keys. */
    uint64_t mark;  /* Stamp of the plan or compaction that last saw it. */
    knode_t *znext; /* Compaction: unlinked, released after the pass. */
    /* Last, next to the bytes a seek reads. */
    size_t keylen;
    const unsigned char *key; /* Bytes after next[]. */
    /* Before it is linked: its predecessors when the plan was made. */
    knode_t *next[];
};

struct lease {
    int64_t id;
    int64_t deadline; /* Monotonic ns. */
    size_t hidx;      /* In the expiry heap. */
    lease_t *hnext;   /* Hash chain. */
    knode_t *keys;    /* Attached nodes. */
};

/* A change in the log, or a reference that keeps an event's bytes. */
typedef struct lent {
    knode_t *k;
    rec_t *r;
} lent_t;

/*
 * [key, end): end empty is the key only, "\0" every key from key on. An
 * empty key with an end starts at the first key (etcd wants "\0" there).
 */
typedef struct span {
    const unsigned char *key;
    size_t keylen;
    const unsigned char *end;
    size_t endlen;
    bool open;
} span_t;

enum { W_EVENTS, W_PROGRESS, W_CANCEL };

/* One queued watch response. */
struct witem {
    witem_t *next;
    int kind;
    bool split;    /* Deliver one revision per response. */
    bool embedded; /* The watch's own cancel item: not allocated. */
    int error;
    int64_t revision;
    int64_t compact_rev;
    size_t n;
    cache_event_t *ev;
    lent_t *refs; /* n references keeping ev's bytes alive. */
};

typedef struct wq {
    witem_t *head, **tail;
} wq_t;

struct cache_watch {
    memstore_t *st;
    cache_watch_t *prev, *next; /* In st->watches. */
    cache_watch_cb cb;
    void *data;
    span_t span;
    int64_t min_rev;  /* Events below it are not for this watch. */
    wq_t dq;          /* For the thread to deliver. */
    wq_t hq;          /* Held by cache_memstore_hold(). */
    witem_t *pending; /* Built by a commit that has not happened yet. */
    witem_t cancel;
    bool over; /* Its canceling response is queued: nothing follows. */
    atomic_bool stop;
    pthread_t th;
    pthread_cond_t cv;
    unsigned char bytes[]; /* Key and end. */
};

struct memstore {
    cache_store_t base;
    pthread_mutex_t mu;
    int64_t rev;
    int64_t compact_rev; /* 0: nothing compacted yet. */
    int64_t auto_compact;
    uint64_t stamp;
    uint64_t rng;
    knode_t *head;
    int level;
    lent_t *log; /* Changes [lhead, lend), revision >= compact_rev. */
    size_t lhead, lend, lcap;
    lease_t **lb; /* Lease hash buckets. */
    size_t lmask, nleases;
    lease_t **heap; /* Leases by deadline. */
    size_t heapcap;
    int64_t next_lease;
    bool lstop;
    pthread_t lth;
    pthread_cond_t lcv;
    pthread_condattr_t cattr;
    cache_watch_t *watches;
    int nwatches;
    bool holding;
};

static const cache_store_ops_t ms_ops;

static memstore_t *MS(cache_store_t *s)
{
    return (memstore_t *)s;
}

static memstore_t *as_memstore(cache_store_t *s)
{
    return s && s->ops == &ms_ops ? MS(s) : NULL;
}

/* --- Keys and spans ------------------------------------------------------- */

/* Byte order; a prefix sorts first. */
static int
keycmp(const unsigned char *a, size_t alen, const unsigned char *b, size_t blen)
{
    size_t n = alen < blen ? alen : blen;
    int c = n ? memcmp(a, b, n) : 0;
    if (c)
        return c;
    return alen < blen ? -1 : alen > blen;
}

static void span_make(
    span_t *sp, const void *key, size_t keylen, const void *end, size_t endlen)
{
    sp->key = key;
    sp->keylen = keylen;
    sp->end = end;
    sp->endlen = endlen;
    sp->open = endlen == 1 && sp->end[0] == 0;
}

/* Key k is after every key of sp (the scan from sp->key can stop). */
static bool span_past(const span_t *sp, const unsigned char *k, size_t kl)
{
    if (!sp->endlen)
        return keycmp(k, kl, sp->key, sp->keylen) > 0;
    return !sp->open && keycmp(k, kl, sp->end, sp->endlen) >= 0;
}

static bool span_has(const span_t *sp, const unsigned char *k, size_t kl)
{
    if (!sp->endlen)
        return keycmp(k, kl, sp->key, sp->keylen) == 0;
    return keycmp(k, kl, sp->key, sp->keylen) >= 0 && !span_past(sp, k, kl);
}

/* --- Versions and nodes --------------------------------------------------- */

static rec_t *rec_new(const void *val, size_t vallen)
{
    if (vallen > SIZE_MAX - sizeof(rec_t))
        return NULL;
    rec_t *r = coalesce__malloc(sizeof(*r) + vallen);
    if (!r)
        return NULL;
    memset(r, 0, sizeof(*r));
    r->refs = 1;
    r->vallen = vallen;
    if (vallen)
        memcpy(r->val, val, vallen);
    return r;
}

static void rec_unref(rec_t *r)
{
    if (--r->refs == 0)
        coalesce__free(r);
}

static uint8_t random_height(memstore_t *st)
{
    uint64_t x = st->rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    st->rng = x;
    uint8_t h = 1;
    while (h < MAXH && (x & 3) == 0) {
        h++;
        x >>= 2;
    }
    return h;
}

static knode_t *knode_new(memstore_t *st, const void *key, size_t keylen)
{
    uint8_t h = random_height(st);
    size_t head = sizeof(knode_t) + h * sizeof(knode_t *);
    if (keylen > SIZE_MAX - head)
        return NULL;
    knode_t *k = coalesce__malloc(head + keylen);
    if (!k)
        return NULL;
    memset(k, 0, head);
    k->height = h;
    k->v = &k->vinl;
    k->capv = 1;
    unsigned char *kb = (unsigned char *)(void *)(k->next + h);
    memcpy(kb, key, keylen);
    k->key = kb;
    k->keylen = keylen;
    return k;
}

/* Versions are gone: it left the skip list with none. */
static void knode_free(knode_t *k)
{
    if (k->v != &k->vinl)
        coalesce__free(k->v);
    coalesce__free(k);
}

static void knode_unref(knode_t *k)
{
    if (--k->refs == 0)
        knode_free(k);
}

static void lent_release(const lent_t *e)
{
    rec_unref(e->r);
    knode_unref(e->k);
}

/* Room for one more version. */
static int vers_reserve(knode_t *k)
{
    if (k->nv < k->capv)
        return 0;
    uint32_t cap = k->capv * 2;
    rec_t **v;
    if (k->v == &k->vinl) {
        if (!(v = coalesce__malloc(cap * sizeof(*v))))
            return COALESCE_ENOMEM;
        v[0] = k->vinl;
    } else if (!(v = coalesce__realloc(k->v, cap * sizeof(*v)))) {
        return COALESCE_ENOMEM;
    }
    k->v = v;
    k->capv = cap;
    return 0;
}

/* The newest version at or below rev, or NULL. */
static rec_t *at_rev(const knode_t *k, int64_t rev)
{
    if (!k->nv || k->v[0]->mod_rev > rev)
        return NULL;
    size_t lo = 0, hi = k->nv; /* v[lo] <= rev < v[hi] */
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if (k->v[mid]->mod_rev <= rev)
            lo = mid;
        else
            hi = mid;
    }
    return k->v[lo];
}

static rec_t *live_at(const knode_t *k, int64_t rev)
{
    rec_t *r = at_rev(k, rev);
    return r && !r->tomb ? r : NULL;
}

static rec_t *latest(const knode_t *k)
{
    rec_t *r = k->nv ? k->v[k->nv - 1] : NULL;
    return r && !r->tomb ? r : NULL;
}

/* --- Skip list ------------------------------------------------------------ */

/* First node >= key; its predecessors on every level in pre if given. */
static knode_t *
sl_seek(const memstore_t *st, const void *key, size_t len, knode_t **pre)
{
    knode_t *x = st->head, *n;
    for (int i = st->level - 1; i >= 0; i--) {
        while ((n = x->next[i]) && keycmp(n->key, n->keylen, key, len) < 0)
            x = n;
        if (pre)
            pre[i] = x;
    }
    return x->next[0];
}

static knode_t *sl_find(const memstore_t *st, const void *key, size_t len)
{
    knode_t *k = sl_seek(st, key, len, NULL);
    return k && keycmp(k->key, k->keylen, key, len) == 0 ? k : NULL;
}

/* The predecessors of a new node k, kept in k->next until it is linked:
 * a put then seeks once. */
static void sl_remember(memstore_t *st, knode_t *k, knode_t **pre)
{
    for (int i = 0; i < k->height; i++)
        k->next[i] = i < st->level ? pre[i] : st->head;
}

/* Nodes are linked in plan order and none leaves the list meanwhile, so a
 * remembered predecessor is still before k: only nodes linked since can
 * lie between them. */
static void sl_link(memstore_t *st, knode_t *k)
{
    if (k->height > st->level)
        st->level = k->height;
    for (int i = 0; i < k->height; i++) {
        knode_t *x = k->next[i], *n;
        while ((n = x->next[i]) &&
               keycmp(n->key, n->keylen, k->key, k->keylen) < 0)
            x = n;
        k->next[i] = n;
        x->next[i] = k;
    }
    k->linked = true;
    k->refs++;
}

/* Out of the list; the list's reference is the caller's to drop. */
static void sl_unlink(memstore_t *st, knode_t *k)
{
    knode_t *pre[MAXH];
    sl_seek(st, k->key, k->keylen, pre);
    for (int i = 0; i < k->height; i++)
        if (pre[i]->next[i] == k)
            pre[i]->next[i] = k->next[i];
    k->linked = false;
}

/* --- Leases: hash by ID, heap by deadline --------------------------------- */

static size_t lease_slot(const memstore_t *st, int64_t id)
{
    return (size_t)(((uint64_t)id * 0x9E3779B97F4A7C15ull) >> 32) & st->lmask;
}

static lease_t *lease_find(const memstore_t *st, int64_t id)
{
    if (id <= 0)
        return NULL;
    for (lease_t *l = st->lb[lease_slot(st, id)]; l; l = l->hnext)
        if (l->id == id)
            return l;
    return NULL;
}

static void heap_set(memstore_t *st, size_t i, lease_t *l)
{
    st->heap[i] = l;
    l->hidx = i;
}

static void heap_up(memstore_t *st, size_t i)
{
    lease_t *l = st->heap[i];
    while (i) {
        size_t p = (i - 1) / 2;
        if (st->heap[p]->deadline <= l->deadline)
            break;
        heap_set(st, i, st->heap[p]);
        i = p;
    }
    heap_set(st, i, l);
}

static void heap_down(memstore_t *st, size_t i)
{
    lease_t *l = st->heap[i];
    size_t n = st->nleases;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && st->heap[c + 1]->deadline < st->heap[c]->deadline)
            c++;
        if (l->deadline <= st->heap[c]->deadline)
            break;
        heap_set(st, i, st->heap[c]);
        i = c;
    }
    heap_set(st, i, l);
}

/* The lease leaves the hash and the heap; its keys are gone already. */
static void lease_remove(memstore_t *st, lease_t *l)
{
    lease_t **pp = &st->lb[lease_slot(st, l->id)];
    while (*pp != l)
        pp = &(*pp)->hnext;
    *pp = l->hnext;
    size_t i = l->hidx;
    lease_t *last = st->heap[--st->nleases];
    if (i < st->nleases) {
        heap_set(st, i, last);
        heap_up(st, i);
        heap_down(st, last->hidx);
    }
    coalesce__free(l);
}

static int lease_grow(memstore_t *st)
{
    size_t n = st->nleases + 1;
    if (n > st->heapcap) {
        size_t cap = st->heapcap ? st->heapcap * 2 : LEASE_MIN;
        lease_t **h = coalesce__realloc(st->heap, cap * sizeof(*h));
        if (!h)
            return COALESCE_ENOMEM;
        st->heap = h;
        st->heapcap = cap;
    }
    if (n > st->lmask + 1) {
        size_t nb = (st->lmask + 1) * 2;
        lease_t **b = coalesce__calloc(nb, sizeof(*b));
        if (!b)
            return COALESCE_ENOMEM;
        lease_t **old = st->lb;
        size_t on = st->lmask + 1;
        st->lb = b;
        st->lmask = nb - 1;
        for (size_t i = 0; i < on; i++) {
            for (lease_t *l = old[i], *next; l; l = next) {
                next = l->hnext;
                size_t j = lease_slot(st, l->id);
                l->hnext = b[j];
                b[j] = l;
            }
        }
        coalesce__free(old);
    }
    return 0;
}

/* Node k follows the lease of its new live version (NULL: none). */
static void lease_set(knode_t *k, lease_t *l)
{
    if (k->lease == l)
        return;
    if (k->lease) {
        if (k->lprev)
            k->lprev->lnext = k->lnext;
        else
            k->lease->keys = k->lnext;
        if (k->lnext)
            k->lnext->lprev = k->lprev;
    }
    k->lease = l;
    k->lprev = NULL;
    k->lnext = NULL;
    if (l) {
        k->lnext = l->keys;
        if (l->keys)
            l->keys->lprev = k;
        l->keys = k;
    }
}

/* --- Watch queues --------------------------------------------------------- */

static void wq_init(wq_t *q)
{
    q->head = NULL;
    q->tail = &q->head;
}

static void wq_push(wq_t *q, witem_t *it)
{
    it->next = NULL;
    *q->tail = it;
    q->tail = &it->next;
}

static witem_t *wq_pop(wq_t *q)
{
    witem_t *it = q->head;
    if (it && !(q->head = it->next))
        q->tail = &q->head;
    return it;
}

static witem_t *item_new(int kind, size_t n)
{
    size_t each = sizeof(cache_event_t) + sizeof(lent_t);
    if (n > (SIZE_MAX - sizeof(witem_t)) / each)
        return NULL;
    witem_t *it = coalesce__malloc(sizeof(*it) + n * each);
    if (!it)
        return NULL;
    memset(it, 0, sizeof(*it));
    it->kind = kind;
    it->n = n;
    it->ev = (cache_event_t *)(void *)(it + 1);
    it->refs = (lent_t *)(void *)(it->ev + n);
    return it;
}

/* Event i of it is version r of node k, which it keeps alive. */
static void item_set(witem_t *it, size_t i, knode_t *k, rec_t *r)
{
    k->refs++;
    r->refs++;
    it->refs[i] = (lent_t){k, r};
    cache_event_t *e = &it->ev[i];
    memset(e, 0, sizeof(*e));
    e->kv.key = k->key;
    e->kv.keylen = k->keylen;
    e->kv.mod_rev = r->mod_rev;
    if (r->tomb) {
        e->type = CACHE_EV_DELETE;
        return;
    }
    e->type = CACHE_EV_PUT;
    e->kv.value = r->val;
    e->kv.vallen = r->vallen;
    e->kv.create_rev = r->create_rev;
    e->kv.version = r->version;
    e->kv.lease = r->lease;
}

/* With unref false the references moved to another item. */
static void item_free(witem_t *it, bool unref)
{
    if (unref)
        for (size_t i = 0; i < it->n; i++)
            lent_release(&it->refs[i]);
    if (!it->embedded)
        coalesce__free(it);
}

static void wq_clear(wq_t *q)
{
    witem_t *it;
    while ((it = wq_pop(q)))
        item_free(it, true);
}

/* A new response: held while the store is held, except a cancel. */
static void watch_queue(memstore_t *st, cache_watch_t *w, witem_t *it)
{
    if (st->holding && it->kind != W_CANCEL) {
        it->split = it->kind == W_EVENTS;
        wq_push(&w->hq, it);
        return;
    }
    wq_push(&w->dq, it);
    pthread_cond_signal(&w->cv);
}

/* The watch ends with a canceling response after what is queued. */
static void watch_end(cache_watch_t *w, int error, int64_t compact_rev)
{
    w->cancel.kind = W_CANCEL;
    w->cancel.embedded = true;
    w->cancel.error = error;
    w->cancel.compact_rev = compact_rev;
    w->over = true;
    wq_push(&w->dq, &w->cancel);
    pthread_cond_signal(&w->cv);
}

static void pending_drop(memstore_t *st)
{
    for (cache_watch_t *w = st->watches; w; w = w->next) {
        if (w->pending)
            item_free(w->pending, false);
        w->pending = NULL;
    }
}

/* --- Log and compaction --------------------------------------------------- */

static int log_reserve(memstore_t *st, size_t n)
{
    if (n <= st->lcap - st->lend)
        return 0;
    size_t live = st->lend - st->lhead;
    /* Sliding down pays only when it frees at least half. */
    if (st->lhead >= st->lcap / 2 && n <= st->lcap - live) {
        memmove(st->log, st->log + st->lhead, live * sizeof(*st->log));
        st->lhead = 0;
        st->lend = live;
        return 0;
    }
    size_t cap = st->lcap ? st->lcap : LOG_MIN;
    while (cap - st->lend < n) {
        if (cap > SIZE_MAX / 2 / sizeof(*st->log))
            return COALESCE_ENOMEM;
        cap *= 2;
    }
    lent_t *v = coalesce__realloc(st->log, cap * sizeof(*v));
    if (!v)
        return COALESCE_ENOMEM;
    st->log = v;
    st->lcap = cap;
    return 0;
}

/* First log index with a revision >= rev. */
static size_t log_find(const memstore_t *st, int64_t rev)
{
    size_t lo = st->lhead, hi = st->lend;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (st->log[mid].r->mod_rev < rev)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Drop the versions of k that no read at or after c can see. */
static void trim(knode_t *k, int64_t c)
{
    size_t j = 0; /* The newest version at or below c. */
    while (j + 1 < k->nv && k->v[j + 1]->mod_rev <= c)
        j++;
    if (k->v[j]->mod_rev > c)
        return;
    /* A delete below c is invisible at c; one at c is still in the log. */
    if (k->v[j]->tomb && k->v[j]->mod_rev < c)
        j++;
    if (!j)
        return;
    for (size_t i = 0; i < j; i++)
        rec_unref(k->v[i]);
    memmove(k->v, k->v + j, (k->nv - j) * sizeof(*k->v));
    k->nv -= (uint32_t)j;
}

/*
 * The nodes that hold history below c are exactly those of the log entries
 * below c: every version but a node's oldest live one has a log entry until
 * it is trimmed. A node left with nothing leaves the list, but is freed only
 * after the pass, since later entries may still name it.
 */
static void compact_locked(memstore_t *st, int64_t c)
{
    uint64_t stamp = ++st->stamp;
    knode_t *gone = NULL;
    /* Found first: trimming frees versions that later entries name. */
    size_t end = log_find(st, c);
    st->compact_rev = c;
    for (size_t i = st->lhead; i < end; i++) {
        knode_t *k = st->log[i].k;
        if (k->mark == stamp)
            continue;
        k->mark = stamp;
        trim(k, c);
        if (!k->nv) {
            sl_unlink(st, k);
            k->znext = gone;
            gone = k;
        }
    }
    st->lhead = end;
    if (st->lhead == st->lend)
        st->lhead = st->lend = 0;
    while (gone) {
        knode_t *k = gone;
        gone = k->znext;
        knode_unref(k);
    }
}

/* --- Commits -------------------------------------------------------------- */

/*
 * The changes of one write, made ready before the first one happens: new
 * versions (each holding one reference for the node's list), new nodes (not
 * linked yet), room in version lists and the log, and the watches'
 * responses.
 */
typedef struct plan {
    memstore_t *st;
    int64_t rev;
    uint64_t stamp; /* Marks the nodes the plan changes. */
    lent_t *v;
    size_t n, cap;
    rec_t *tomb; /* Every delete of a write has the same version. */
    lent_t small[PLAN_MIN];
} plan_t;

static void plan_init(plan_t *p, memstore_t *st)
{
    p->st = st;
    p->rev = st->rev + 1;
    p->stamp = ++st->stamp;
    p->v = p->small;
    p->n = 0;
    p->cap = PLAN_MIN;
    p->tomb = NULL;
}

static int plan_push(plan_t *p, knode_t *k, rec_t *r)
{
    if (p->n == p->cap) {
        if (p->cap > SIZE_MAX / 2 / sizeof(*p->v))
            return COALESCE_ENOMEM;
        lent_t *v = coalesce__malloc(p->cap * 2 * sizeof(*v));
        if (!v)
            return COALESCE_ENOMEM;
        memcpy(v, p->v, p->n * sizeof(*v));
        if (p->v != p->small)
            coalesce__free(p->v);
        p->v = v;
        p->cap *= 2;
    }
    p->v[p->n++] = (lent_t){k, r};
    k->mark = p->stamp;
    return 0;
}

static void plan_finish(plan_t *p)
{
    if (p->tomb)
        rec_unref(p->tomb);
    if (p->v != p->small)
        coalesce__free(p->v);
}

static void plan_abort(plan_t *p)
{
    for (size_t i = 0; i < p->n; i++) {
        rec_unref(p->v[i].r);
        if (!p->v[i].k->linked)
            knode_free(p->v[i].k);
    }
    pending_drop(p->st);
    plan_finish(p);
}

static int plan_put(plan_t *p, const cache_op_t *op, cache_op_result_t *res)
{
    memstore_t *st = p->st;
    if (op->lease && !lease_find(st, op->lease))
        return COALESCE_ENOENT;
    knode_t *pre[MAXH];
    knode_t *k = sl_seek(st, op->key, op->keylen, pre);
    if (k && keycmp(k->key, k->keylen, op->key, op->keylen) != 0)
        k = NULL;
    rec_t *prev = k ? latest(k) : NULL;
    rec_t *r = rec_new(op->value, op->vallen);
    if (!r)
        return COALESCE_ENOMEM;
    r->mod_rev = p->rev;
    r->create_rev = prev ? prev->create_rev : p->rev;
    r->version = prev ? prev->version + 1 : 1;
    r->lease = op->lease;
    bool fresh = !k;
    int rc = 0;
    if (fresh && !(k = knode_new(st, op->key, op->keylen)))
        rc = COALESCE_ENOMEM;
    if (!rc && fresh)
        sl_remember(st, k, pre);
    if (!rc && !fresh)
        rc = vers_reserve(k);
    if (!rc)
        rc = plan_push(p, k, r);
    if (rc) {
        rec_unref(r);
        if (fresh && k)
            knode_free(k);
        return rc;
    }
    res->has_prev = prev != NULL;
    res->prev_create_rev = prev ? prev->create_rev : 0;
    res->prev_version = prev ? prev->version : 0;
    return 0;
}

/* k (live, not yet in the plan) is deleted. */
static int plan_tomb(plan_t *p, knode_t *k)
{
    if (!p->tomb) {
        if (!(p->tomb = rec_new(NULL, 0)))
            return COALESCE_ENOMEM;
        p->tomb->tomb = true;
        p->tomb->mod_rev = p->rev;
    }
    int rc = vers_reserve(k);
    if (!rc)
        rc = plan_push(p, k, p->tomb);
    if (!rc)
        p->tomb->refs++;
    return rc;
}

static int plan_delete(plan_t *p, const span_t *sp, int64_t *deleted)
{
    for (knode_t *k = sl_seek(p->st, sp->key, sp->keylen, NULL);
         k && !span_past(sp, k->key, k->keylen); k = k->next[0]) {
        if (k->mark == p->stamp || !latest(k))
            continue; /* Deleted by an earlier op, or absent. */
        int rc = plan_tomb(p, k);
        if (rc)
            return rc;
        (*deleted)++;
    }
    return 0;
}

/* Room in the log and every watch's response. */
static int plan_prepare(plan_t *p)
{
    memstore_t *st = p->st;
    if (!p->n)
        return 0;
    if (log_reserve(st, p->n))
        return COALESCE_ENOMEM;
    for (cache_watch_t *w = st->watches; w; w = w->next) {
        if (w->over || p->rev < w->min_rev)
            continue;
        size_t m = 0;
        for (size_t i = 0; i < p->n; i++)
            m += span_has(&w->span, p->v[i].k->key, p->v[i].k->keylen);
        if (m && !(w->pending = item_new(W_EVENTS, m))) {
            pending_drop(st);
            return COALESCE_ENOMEM;
        }
    }
    return 0;
}

static void plan_commit(plan_t *p)
{
    memstore_t *st = p->st;
    if (!p->n) {
        plan_finish(p);
        return;
    }
    st->rev = p->rev;
    for (size_t i = 0; i < p->n; i++) {
        knode_t *k = p->v[i].k;
        rec_t *r = p->v[i].r;
        if (!k->linked)
            sl_link(st, k);
        k->v[k->nv++] = r; /* The plan's reference. */
        lease_set(k, r->tomb ? NULL : lease_find(st, r->lease));
        st->log[st->lend++] = p->v[i];
    }
    for (cache_watch_t *w = st->watches; w; w = w->next) {
        witem_t *it = w->pending;
        if (!it)
            continue;
        w->pending = NULL;
        size_t j = 0;
        for (size_t i = 0; i < p->n; i++) {
            knode_t *k = p->v[i].k;
            if (span_has(&w->span, k->key, k->keylen))
                item_set(it, j++, k, p->v[i].r);
        }
        it->revision = p->rev;
        watch_queue(st, w, it);
    }
    plan_finish(p);
    if (st->auto_compact && st->rev - st->auto_compact > st->compact_rev)
        compact_locked(st, st->rev - st->auto_compact);
}

/* --- Range ---------------------------------------------------------------- */

static int ms_range(cache_store_t *s,
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
    memstore_t *st = MS(s);
    if (!s || (!key && keylen) || (!end && endlen) || (!keylen && !endlen) ||
        rev < 0)
        return COALESCE_EINVAL;
    span_t sp;
    span_make(&sp, key, keylen, end, endlen);
    lent_t small[RANGE_MIN], *v = small;
    size_t n = 0, cap = RANGE_MIN;
    int m = 0, rc = 0;

    /* References, not copies: the callbacks run after the lock. */
    pthread_mutex_lock(&st->mu);
    int64_t at = rev ? rev : st->rev;
    if (at > st->rev || at < st->compact_rev)
        rc = COALESCE_ECOMPACTED;
    for (knode_t *k = rc ? NULL : sl_seek(st, key, keylen, NULL);
         k && !span_past(&sp, k->key, k->keylen); k = k->next[0]) {
        rec_t *r = live_at(k, at);
        if (!r)
            continue;
        if (limit && n == limit) {
            m = 1;
            break;
        }
        if (n == cap) {
            lent_t *nv = cap <= SIZE_MAX / 2 / sizeof(*v)
                             ? coalesce__malloc(cap * 2 * sizeof(*v))
                             : NULL;
            if (!nv) {
                rc = COALESCE_ENOMEM;
                break;
            }
            memcpy(nv, v, n * sizeof(*v));
            if (v != small)
                coalesce__free(v);
            v = nv;
            cap *= 2;
        }
        k->refs++;
        r->refs++;
        v[n++] = (lent_t){k, r};
    }
    pthread_mutex_unlock(&st->mu);

    for (size_t i = 0; i < n && !rc && cb; i++) {
        const rec_t *r = v[i].r;
        cache_kv_t kv = {v[i].k->key,   v[i].k->keylen, r->val,     r->vallen,
                         r->create_rev, r->mod_rev,     r->version, r->lease};
        if (cb(data, &kv))
            break;
    }
    if (n) {
        pthread_mutex_lock(&st->mu);
        for (size_t i = 0; i < n; i++)
            lent_release(&v[i]);
        pthread_mutex_unlock(&st->mu);
    }
    if (v != small)
        coalesce__free(v);
    if (!rc) {
        if (header_rev)
            *header_rev = at;
        if (more)
            *more = m;
    }
    return rc;
}

/* --- Txn ------------------------------------------------------------------ */

static int txn_check(const cache_cmp_t *cmps,
                     size_t ncmps,
                     const cache_op_t *ops,
                     size_t nops)
{
    if ((ncmps && !cmps) || (nops && !ops) || ncmps > CACHE_TXN_MAX_OPS ||
        nops > CACHE_TXN_MAX_OPS)
        return COALESCE_EINVAL;
    for (size_t i = 0; i < ncmps; i++) {
        const cache_cmp_t *c = &cmps[i];
        if (!c->key || !c->keylen || c->target < CACHE_CMP_VERSION ||
            c->target > CACHE_CMP_LEASE || c->result < CACHE_CMP_EQUAL ||
            c->result > CACHE_CMP_NOT_EQUAL ||
            (c->target == CACHE_CMP_VALUE && !c->value && c->vallen))
            return COALESCE_EINVAL;
    }
    for (size_t i = 0; i < nops; i++) {
        const cache_op_t *o = &ops[i];
        if (!o->key && o->keylen)
            return COALESCE_EINVAL;
        if (o->type == CACHE_OP_PUT) {
            if (!o->keylen || (!o->value && o->vallen) || o->lease < 0)
                return COALESCE_EINVAL;
        } else if (o->type != CACHE_OP_DELETE || (!o->end && o->endlen) ||
                   (!o->keylen && !o->endlen)) {
            return COALESCE_EINVAL;
        }
    }
    /* etcd's checkIntervals: a key is put at most once and never inside a
     * delete of the same txn; deletes may overlap each other. */
    for (size_t i = 0; i < nops; i++) {
        const cache_op_t *a = &ops[i];
        if (a->type != CACHE_OP_PUT)
            continue;
        for (size_t j = 0; j < nops; j++) {
            const cache_op_t *b = &ops[j];
            if (b->type == CACHE_OP_PUT) {
                if (j < i && keycmp(a->key, a->keylen, b->key, b->keylen) == 0)
                    return COALESCE_EINVAL;
                continue;
            }
            span_t sp;
            span_make(&sp, b->key, b->keylen, b->end, b->endlen);
            if (span_has(&sp, a->key, a->keylen))
                return COALESCE_EINVAL;
        }
    }
    return 0;
}

static bool cmp_holds(const memstore_t *st, const cache_cmp_t *c)
{
    knode_t *k = sl_find(st, c->key, c->keylen);
    rec_t *r = k ? latest(k) : NULL;
    int x;
    if (c->target == CACHE_CMP_VALUE) {
        /* etcd: a value compare on a missing key always fails. */
        if (!r)
            return false;
        x = keycmp(r->val, r->vallen, c->value, c->vallen);
    } else {
        int64_t have = 0;
        if (r) {
            switch (c->target) {
            case CACHE_CMP_VERSION:
                have = r->version;
                break;
            case CACHE_CMP_CREATE:
                have = r->create_rev;
                break;
            case CACHE_CMP_MOD:
                have = r->mod_rev;
                break;
            default:
                have = r->lease;
                break;
            }
        }
        x = have < c->number ? -1 : have > c->number;
    }
    switch (c->result) {
    case CACHE_CMP_EQUAL:
        return x == 0;
    case CACHE_CMP_GREATER:
        return x > 0;
    case CACHE_CMP_LESS:
        return x < 0;
    default:
        return x != 0;
    }
}

static int ms_txn(cache_store_t *s,
                  const cache_cmp_t *cmps,
                  size_t ncmps,
                  const cache_op_t *ops,
                  size_t nops,
                  int *succeeded,
                  int64_t *rev,
                  cache_op_result_t *results)
{
    memstore_t *st = MS(s);
    if (!s)
        return COALESCE_EINVAL;
    int rc = txn_check(cmps, ncmps, ops, nops);
    if (rc)
        return rc;
    cache_op_result_t res[CACHE_TXN_MAX_OPS];
    if (nops)
        memset(res, 0, nops * sizeof(*res));
    bool ok = true;

    pthread_mutex_lock(&st->mu);
    for (size_t i = 0; i < ncmps && ok; i++)
        ok = cmp_holds(st, &cmps[i]);
    if (ok) {
        plan_t p;
        plan_init(&p, st);
        for (size_t i = 0; i < nops && !rc; i++) {
            const cache_op_t *o = &ops[i];
            if (o->type == CACHE_OP_PUT) {
                rc = plan_put(&p, o, &res[i]);
            } else {
                span_t sp;
                span_make(&sp, o->key, o->keylen, o->end, o->endlen);
                rc = plan_delete(&p, &sp, &res[i].deleted);
            }
        }
        if (!rc)
            rc = plan_prepare(&p);
        if (rc)
            plan_abort(&p);
        else
            plan_commit(&p);
    }
    int64_t r = st->rev;
    pthread_mutex_unlock(&st->mu);

    if (rc)
        return rc;
    if (succeeded)
        *succeeded = ok;
    if (rev)
        *rev = r;
    if (ok && results && nops)
        memcpy(results, res, nops * sizeof(*results));
    return 0;
}

/* --- Watches -------------------------------------------------------------- */

static void deliver(cache_watch_t *w, const witem_t *it)
{
    cache_watch_resp_t r;
    memset(&r, 0, sizeof(r));
    if (it->kind == W_CANCEL) {
        r.error = it->error;
        r.compact_revision = it->compact_rev;
        w->cb(w->data, &r);
        return;
    }
    if (it->kind == W_PROGRESS || !it->split) {
        r.revision = it->revision;
        r.events = it->n ? it->ev : NULL;
        r.n = it->n;
        w->cb(w->data, &r);
        return;
    }
    for (size_t i = 0, j; i < it->n; i = j) {
        int64_t rev = it->ev[i].kv.mod_rev;
        for (j = i + 1; j < it->n && it->ev[j].kv.mod_rev == rev; j++)
            ;
        if (i && atomic_load(&w->stop))
            return;
        r.revision = rev;
        r.events = it->ev + i;
        r.n = j - i;
        w->cb(w->data, &r);
    }
}

static void *watch_main(void *arg)
{
    cache_watch_t *w = arg;
    memstore_t *st = w->st;
    pthread_mutex_lock(&st->mu);
    for (;;) {
        while (!atomic_load(&w->stop) && !w->dq.head)
            pthread_cond_wait(&w->cv, &st->mu);
        if (atomic_load(&w->stop))
            break;
        witem_t *it = wq_pop(&w->dq);
        pthread_mutex_unlock(&st->mu);
        deliver(w, it);
        pthread_mutex_lock(&st->mu);
        bool last = it->kind == W_CANCEL;
        item_free(it, true);
        if (last)
            break;
    }
    pthread_mutex_unlock(&st->mu);
    return NULL;
}

/* Everything in [start_rev, now] as one response stamped now (etcd's
 * catch-up batch). */
static int catch_up(memstore_t *st, cache_watch_t *w, int64_t start_rev)
{
    size_t i0 = log_find(st, start_rev), m = 0;
    for (size_t i = i0; i < st->lend; i++)
        m += span_has(&w->span, st->log[i].k->key, st->log[i].k->keylen);
    if (!m)
        return 0;
    witem_t *it = item_new(W_EVENTS, m);
    if (!it)
        return COALESCE_ENOMEM;
    size_t j = 0;
    for (size_t i = i0; i < st->lend; i++) {
        knode_t *k = st->log[i].k;
        if (span_has(&w->span, k->key, k->keylen))
            item_set(it, j++, k, st->log[i].r);
    }
    it->revision = st->rev;
    watch_queue(st, w, it);
    return 0;
}

static int ms_watch(cache_store_t *s,
                    const void *key,
                    size_t keylen,
                    const void *end,
                    size_t endlen,
                    int64_t start_rev,
                    cache_watch_cb cb,
                    void *data,
                    cache_watch_t **out)
{
    memstore_t *st = MS(s);
    if (!s || !cb || !out || (!key && keylen) || (!end && endlen) ||
        (!keylen && !endlen) || start_rev < 0 || keylen > SIZE_MAX / 4 ||
        endlen > SIZE_MAX / 4)
        return COALESCE_EINVAL;
    cache_watch_t *w = coalesce__calloc(1, sizeof(*w) + keylen + endlen);
    if (!w)
        return COALESCE_ENOMEM;
    if (keylen)
        memcpy(w->bytes, key, keylen);
    if (endlen)
        memcpy(w->bytes + keylen, end, endlen);
    span_make(&w->span, w->bytes, keylen, w->bytes + keylen, endlen);
    w->st = st;
    w->cb = cb;
    w->data = data;
    wq_init(&w->dq);
    wq_init(&w->hq);
    atomic_init(&w->stop, false);
    if (pthread_cond_init(&w->cv, NULL)) {
        coalesce__free(w);
        return COALESCE_ENOMEM;
    }

    int rc = 0;
    pthread_mutex_lock(&st->mu);
    if (start_rev && start_rev < st->compact_rev) {
        watch_end(w, COALESCE_ECOMPACTED, st->compact_rev);
    } else {
        w->min_rev = start_rev ? start_rev : st->rev + 1;
        if (start_rev && start_rev <= st->rev)
            rc = catch_up(st, w, start_rev);
    }
    /* The thread waits for the lock before it looks at the watch. */
    if (!rc && pthread_create(&w->th, NULL, watch_main, w))
        rc = COALESCE_ENOMEM;
    if (rc) {
        wq_clear(&w->dq);
        wq_clear(&w->hq);
        pthread_mutex_unlock(&st->mu);
        pthread_cond_destroy(&w->cv);
        coalesce__free(w);
        return rc;
    }
    w->next = st->watches;
    if (st->watches)
        st->watches->prev = w;
    st->watches = w;
    st->nwatches++;
    pthread_mutex_unlock(&st->mu);
    *out = w;
    return 0;
}

static void ms_watch_cancel(cache_store_t *s, cache_watch_t *w)
{
    memstore_t *st = MS(s);
    if (!s || !w)
        return;
    pthread_mutex_lock(&st->mu);
    /* Out of the list first: no commit queues anything for it any more. */
    if (w->prev)
        w->prev->next = w->next;
    else
        st->watches = w->next;
    if (w->next)
        w->next->prev = w->prev;
    st->nwatches--;
    atomic_store(&w->stop, true);
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&st->mu);
    pthread_join(w->th, NULL);
    pthread_mutex_lock(&st->mu);
    wq_clear(&w->dq);
    wq_clear(&w->hq);
    pthread_mutex_unlock(&st->mu);
    pthread_cond_destroy(&w->cv);
    coalesce__free(w);
}

/* --- Leases --------------------------------------------------------------- */

static int ms_lease_grant(cache_store_t *s, int64_t ttl_ms, int64_t *id)
{
    memstore_t *st = MS(s);
    if (!s || !id || ttl_ms <= 0)
        return COALESCE_EINVAL; /* As etcd, which refuses a TTL of 0. */
    int64_t now = coalesce__now_ns();
    int64_t deadline = ttl_ms > (INT64_MAX - now) / 1000000
                           ? INT64_MAX
                           : now + ttl_ms * 1000000;
    lease_t *l = coalesce__calloc(1, sizeof(*l));
    if (!l)
        return COALESCE_ENOMEM;
    l->deadline = deadline;
    pthread_mutex_lock(&st->mu);
    if (lease_grow(st)) {
        pthread_mutex_unlock(&st->mu);
        coalesce__free(l);
        return COALESCE_ENOMEM;
    }
    l->id = st->next_lease++;
    size_t b = lease_slot(st, l->id);
    l->hnext = st->lb[b];
    st->lb[b] = l;
    st->heap[st->nleases] = l;
    heap_up(st, st->nleases++);
    if (st->heap[0] == l)
        pthread_cond_signal(&st->lcv); /* An earlier deadline. */
    *id = l->id;
    pthread_mutex_unlock(&st->mu);
    return 0;
}

/* Deletes the lease's keys in one revision, then the lease. */
static int revoke_locked(memstore_t *st, lease_t *l)
{
    plan_t p;
    plan_init(&p, st);
    int rc = 0;
    for (knode_t *k = l->keys; k && !rc; k = k->lnext)
        rc = plan_tomb(&p, k);
    if (!rc)
        rc = plan_prepare(&p);
    if (rc) {
        plan_abort(&p);
        return rc;
    }
    plan_commit(&p);
    lease_remove(st, l);
    return 0;
}

static int ms_lease_revoke(cache_store_t *s, int64_t id)
{
    memstore_t *st = MS(s);
    if (!s)
        return COALESCE_EINVAL;
    pthread_mutex_lock(&st->mu);
    lease_t *l = lease_find(st, id);
    int rc = l ? revoke_locked(st, l) : COALESCE_ENOENT;
    pthread_mutex_unlock(&st->mu);
    return rc;
}

static void wait_until(memstore_t *st, int64_t ns)
{
    struct timespec ts = {(time_t)(ns / 1000000000), (long)(ns % 1000000000)};
    pthread_cond_timedwait(&st->lcv, &st->mu, &ts);
}

/* Expires leases: sleeps on a timed wait until the earliest deadline. */
static void *lease_main(void *arg)
{
    memstore_t *st = arg;
    pthread_mutex_lock(&st->mu);
    while (!st->lstop) {
        if (!st->nleases) {
            pthread_cond_wait(&st->lcv, &st->mu);
            continue;
        }
        int64_t now = coalesce__now_ns();
        lease_t *l = st->heap[0];
        if (l->deadline > now)
            wait_until(st, l->deadline);
        else if (revoke_locked(st, l))
            wait_until(st, now + RETRY_NS); /* Out of memory: try again. */
    }
    pthread_mutex_unlock(&st->mu);
    return NULL;
}

/* --- Store ---------------------------------------------------------------- */

static void ms_destroy(cache_store_t *s)
{
    memstore_t *st = MS(s);
    if (!s)
        return;
    pthread_mutex_lock(&st->mu);
    st->lstop = true;
    pthread_cond_signal(&st->lcv);
    pthread_mutex_unlock(&st->mu);
    pthread_join(st->lth, NULL);
    while (st->watches)
        ms_watch_cancel(s, st->watches);
    for (knode_t *k = st->head->next[0], *next; k; k = next) {
        next = k->next[0];
        for (uint32_t i = 0; i < k->nv; i++)
            rec_unref(k->v[i]);
        knode_free(k);
    }
    for (size_t i = 0; i < st->nleases; i++)
        coalesce__free(st->heap[i]);
    coalesce__free(st->heap);
    coalesce__free(st->lb);
    coalesce__free(st->log);
    coalesce__free(st->head);
    pthread_cond_destroy(&st->lcv);
    pthread_condattr_destroy(&st->cattr);
    pthread_mutex_destroy(&st->mu);
    coalesce__free(st);
}

static const cache_store_ops_t ms_ops = {
    .version = CACHE_STORE_OPS_VERSION,
    .range = ms_range,
    .txn = ms_txn,
    .watch = ms_watch,
    .watch_cancel = ms_watch_cancel,
    .lease_grant = ms_lease_grant,
    .lease_revoke = ms_lease_revoke,
    .destroy = ms_destroy,
};

void cache_store_free(cache_store_t *s)
{
    if (s && s->ops && s->ops->destroy)
        s->ops->destroy(s);
}

void cache_memstore_opts_init(cache_memstore_opts_t *o)
{
    if (!o)
        return;
    memset(o, 0, sizeof(*o));
    o->size = sizeof(*o);
    o->auto_compact_revs = 0;
}

int cache_memstore_new(cache_store_t **out, const cache_memstore_opts_t *opts)
{
    cache_memstore_opts_t o;
    cache_memstore_opts_init(&o);
    if (!out)
        return COALESCE_EINVAL;
    if (opts) {
        /* One layout so far; older sizes will be accepted as they appear. */
        if (opts->size != sizeof(o))
            return COALESCE_EINVAL;
        memcpy(&o, opts, sizeof(o));
    }
    if (o.auto_compact_revs < 0)
        return COALESCE_EINVAL;
    memstore_t *st = coalesce__calloc(1, sizeof(*st));
    if (!st)
        return COALESCE_ENOMEM;
    st->head = coalesce__calloc(1, sizeof(knode_t) + MAXH * sizeof(knode_t *));
    st->lb = coalesce__calloc(LEASE_MIN, sizeof(*st->lb));
    if (!st->head || !st->lb) {
        coalesce__free(st->head);
        coalesce__free(st->lb);
        coalesce__free(st);
        return COALESCE_ENOMEM;
    }
    st->base.ops = &ms_ops;
    st->rev = 1; /* etcd: a new store is at 1; the first write makes 2. */
    st->auto_compact = o.auto_compact_revs;
    st->rng = 0x2545F4914F6CDD1Dull ^ (uint64_t)(uintptr_t)st;
    if (!st->rng)
        st->rng = 1;
    st->level = 1;
    st->lmask = LEASE_MIN - 1;
    st->next_lease = 1;
    pthread_mutex_init(&st->mu, NULL);
    pthread_condattr_init(&st->cattr);
    pthread_condattr_setclock(&st->cattr, CLOCK_MONOTONIC);
    pthread_cond_init(&st->lcv, &st->cattr);
    if (pthread_create(&st->lth, NULL, lease_main, st)) {
        pthread_cond_destroy(&st->lcv);
        pthread_condattr_destroy(&st->cattr);
        pthread_mutex_destroy(&st->mu);
        coalesce__free(st->head);
        coalesce__free(st->lb);
        coalesce__free(st);
        return COALESCE_ENOMEM;
    }
    *out = &st->base;
    return 0;
}

int64_t cache_memstore_revision(cache_store_t *s)
{
    memstore_t *st = as_memstore(s);
    if (!st)
        return COALESCE_EINVAL;
    pthread_mutex_lock(&st->mu);
    int64_t rev = st->rev;
    pthread_mutex_unlock(&st->mu);
    return rev;
}

int cache_memstore_compact(cache_store_t *s, int64_t rev)
{
    memstore_t *st = as_memstore(s);
    if (!st)
        return COALESCE_EINVAL;
    int rc = 0;
    pthread_mutex_lock(&st->mu);
    if (rev <= st->compact_rev || rev > st->rev)
        rc = COALESCE_ECOMPACTED;
    else
        compact_locked(st, rev);
    pthread_mutex_unlock(&st->mu);
    return rc;
}

/* --- Test hooks ----------------------------------------------------------- */

/* What is held goes to the thread, one revision per response. */
static void release(cache_watch_t *w)
{
    if (!w->hq.head)
        return;
    *w->dq.tail = w->hq.head;
    w->dq.tail = w->hq.tail;
    wq_init(&w->hq);
    pthread_cond_signal(&w->cv);
}

int cache_memstore_hold(cache_store_t *s, int hold)
{
    memstore_t *st = as_memstore(s);
    if (!st)
        return COALESCE_EINVAL;
    pthread_mutex_lock(&st->mu);
    if (!hold)
        for (cache_watch_t *w = st->watches; w; w = w->next)
            release(w);
    st->holding = hold != 0;
    pthread_mutex_unlock(&st->mu);
    return 0;
}

/* Held events of w as one response stamped now, then held progress
 * notifications in their order. w->pending is the merged item if needed. */
static void release_batch(memstore_t *st, cache_watch_t *w)
{
    witem_t *b = w->pending, *it;
    size_t j = 0;
    wq_t rest;
    wq_init(&rest);
    w->pending = NULL;
    while ((it = wq_pop(&w->hq))) {
        if (it->kind != W_EVENTS) {
            wq_push(&rest, it);
        } else if (!b) {
            b = it; /* The only one: it becomes the batch. */
        } else {
            memcpy(b->ev + j, it->ev, it->n * sizeof(*it->ev));
            memcpy(b->refs + j, it->refs, it->n * sizeof(*it->refs));
            j += it->n;
            item_free(it, false);
        }
    }
    if (b) {
        b->split = false;
        b->revision = st->rev;
        wq_push(&w->dq, b);
    }
    while ((it = wq_pop(&rest)))
        wq_push(&w->dq, it);
    pthread_cond_signal(&w->cv);
}

int cache_memstore_flush(cache_store_t *s, int how)
{
    memstore_t *st = as_memstore(s);
    if (!st || how < CACHE_FLUSH_EACH || how > CACHE_FLUSH_DROP)
        return COALESCE_EINVAL;
    int rc = 0;
    pthread_mutex_lock(&st->mu);
    for (cache_watch_t *w = st->watches; w && how == CACHE_FLUSH_BATCH;
         w = w->next) {
        size_t ni = 0, ne = 0;
        for (witem_t *it = w->hq.head; it; it = it->next)
            if (it->kind == W_EVENTS) {
                ni++;
                ne += it->n;
            }
        if (ni > 1 && !(w->pending = item_new(W_EVENTS, ne))) {
            pending_drop(st);
            rc = COALESCE_ENOMEM;
            break;
        }
    }
    for (cache_watch_t *w = st->watches; w && !rc; w = w->next) {
        if (how == CACHE_FLUSH_EACH)
            release(w);
        else if (how == CACHE_FLUSH_DROP)
            wq_clear(&w->hq);
        else
            release_batch(st, w);
    }
    pthread_mutex_unlock(&st->mu);
    return rc;
}

int cache_memstore_cut(cache_store_t *s, int error)
{
    memstore_t *st = as_memstore(s);
    if (!st || error >= 0)
        return COALESCE_EINVAL;
    pthread_mutex_lock(&st->mu);
    for (cache_watch_t *w = st->watches; w; w = w->next) {
        if (w->over)
            continue;
        wq_clear(&w->hq); /* Lost with the connection. */
        watch_end(w, error, 0);
    }
    pthread_mutex_unlock(&st->mu);
    return 0;
}

int cache_memstore_progress(cache_store_t *s)
{
    memstore_t *st = as_memstore(s);
    if (!st)
        return COALESCE_EINVAL;
    int rc = 0;
    pthread_mutex_lock(&st->mu);
    for (cache_watch_t *w = st->watches; w; w = w->next) {
        if (!w->over && !(w->pending = item_new(W_PROGRESS, 0))) {
            pending_drop(st);
            rc = COALESCE_ENOMEM;
            break;
        }
    }
    for (cache_watch_t *w = st->watches; w && !rc; w = w->next) {
        witem_t *it = w->pending;
        if (!it)
            continue;
        w->pending = NULL;
        it->revision = st->rev;
        watch_queue(st, w, it);
    }
    pthread_mutex_unlock(&st->mu);
    return rc;
}

int cache_memstore_watches(cache_store_t *s)
{
    memstore_t *st = as_memstore(s);
    if (!st)
        return COALESCE_EINVAL;
    pthread_mutex_lock(&st->mu);
    int n = st->nwatches;
    pthread_mutex_unlock(&st->mu);
    return n;
}

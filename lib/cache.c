/*
 * Write-through cache: a copy of one prefix of a store, kept coherent by a
 * watch, written through the store.
 *
 * Memory. A key is a node (knode_t) found by a hash table (open addressing,
 * linear probing) and linked into a skip list in key order. The node points
 * at an immutable entry: a coalesce buffer whose value is what readers get,
 * with the metadata and the key in a head before the value (one allocation
 * per version of a key). A change makes a new entry and swaps the pointer,
 * so a reader's reference stays valid. A deleted key keeps its node with a
 * tombstone entry until the watch passes the delete's revision.
 *
 * Locking. One rwlock: reads share it, every change (watch responses,
 * write-through results, relist swaps) takes it exclusively, so a
 * transaction's effects appear at once. No store call and no user callback
 * runs under it. A supervisor thread owns the watch's life: it resumes a
 * broken watch with backoff and relists after a compaction, so the watch
 * callback never blocks.
 */
#include "coalesce_int.h"

#include <pthread.h>
#include <sched.h>
#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#define PREFIX_MAX     (64u << 10)
#define KEY_MAX        (1u << 20)
#define MAXH           24
#define DEFAULT_PAGE   500
#define DEFAULT_BO_MIN 100
#define DEFAULT_BO_MAX 30000
#define DECODE_RELIST  3 /* Decode errors in a row before a relist. */
#define REPORT_RING    64
#define WATCH_CHUNK    256 /* Events applied per critical section. */
#define HASH_SEED      0x9E3779B97F4A7C15ull

/* --- The lock --------------------------------------------------------------
 *
 * Reads must scale across threads, and one shared reader count (a
 * pthread rwlock) makes every read write the same cache line. So readers
 * count themselves in one of RSLOTS padded slots picked per thread, and a
 * writer raises a flag and waits for every slot to drain. Writers win: a
 * reader that sees the flag steps back until it is down. Writers hold the
 * lock briefly (a chunk of a watch response, one transaction's effects).
 */

#define RSLOTS 16

typedef struct rslot {
    atomic_uint n;
    char pad[64 - sizeof(atomic_uint)]; /* One counter per cache line. */
} rslot_t;

typedef struct brlock {
    rslot_t r[RSLOTS];
    atomic_bool writer;
    pthread_mutex_t wmu; /* Writers, one at a time. */
} brlock_t;

static atomic_uint next_rslot;
static _Thread_local unsigned my_rslot = RSLOTS; /* RSLOTS: not yet. */
static _Thread_local unsigned writing; /* Write locks this thread holds. */

static rslot_t *br_slot(brlock_t *l)
{
    if (my_rslot == RSLOTS)
        my_rslot = atomic_fetch_add(&next_rslot, 1) % RSLOTS;
    return &l->r[my_rslot];
}

static void br_init(brlock_t *l)
{
    for (int i = 0; i < RSLOTS; i++)
        atomic_init(&l->r[i].n, 0);
    atomic_init(&l->writer, false);
    pthread_mutex_init(&l->wmu, NULL);
}

static void br_destroy(brlock_t *l)
{
    pthread_mutex_destroy(&l->wmu);
}

static void br_rdlock(brlock_t *l)
{
    rslot_t *s = br_slot(l);
    for (;;) {
        /* seq_cst pairs with the writer: either it sees our count, or we
         * see its flag. */
        atomic_fetch_add(&s->n, 1);
        if (!atomic_load(&l->writer))
            return;
        atomic_fetch_sub(&s->n, 1);
        while (atomic_load(&l->writer))
            sched_yield();
    }
}

static void br_wrlock(brlock_t *l)
{
    pthread_mutex_lock(&l->wmu);
    atomic_store(&l->writer, true);
    for (int i = 0; i < RSLOTS; i++)
        while (atomic_load(&l->r[i].n))
            sched_yield();
    writing++;
}

static void br_unlock(brlock_t *l)
{
    if (writing) {
        writing--;
        atomic_store(&l->writer, false);
        pthread_mutex_unlock(&l->wmu);
    } else {
        atomic_fetch_sub(&br_slot(l)->n, 1);
    }
}

/* --- Entries ---------------------------------------------------------------
 */

struct knode;

/* Before the value. meta and key never change; node and tomb change under
 * the write lock and are read under the read lock only. */
typedef struct ehead {
    cache_meta_t meta;
    struct knode *node; /* The key's node, while this is its entry. */
    uint32_t keylen;
    bool tomb; /* The key is deleted (this entry keeps the key only). */
    unsigned char key[];
} ehead_t;

static ehead_t *EH(coalesce_buf_t *b)
{
    return coalesce__buf_head(b);
}

static coalesce_buf_t *entry_new(const void *key,
                                 size_t keylen,
                                 const void *val,
                                 size_t vallen,
                                 const cache_meta_t *meta,
                                 bool tomb)
{
    coalesce_buf_t *b;
    if (coalesce__buf_new_headed(&b, sizeof(ehead_t) + keylen, val, vallen))
        return NULL;
    ehead_t *h = EH(b);
    h->meta = *meta;
    h->node = NULL;
    h->keylen = (uint32_t)keylen;
    h->tomb = tomb;
    memcpy(h->key, key, keylen);
    return b;
}

static int keycmp(const void *a, size_t alen, const void *b, size_t blen)
{
    int c = memcmp(a, b, alen < blen ? alen : blen);
    if (c)
        return c;
    return alen < blen ? -1 : alen > blen;
}

/* --- The index: hash table + skip list -------------------------------------
 */

typedef struct knode {
    coalesce_buf_t *e; /* Live or tombstone entry. */
    uint64_t hash;
    int64_t rev; /* The entry's mod revision (the delete's, if a tombstone). */
    uint8_t height;
    bool tomb;
    bool in_tl; /* In the index's tombstone list. */
    struct knode *next[];
} knode_t;

typedef struct rtomb {
    unsigned char *key; /* Prefix deleted at rev. */
    size_t len;
    int64_t rev;
} rtomb_t;

/* A hash slot points straight at the entry: a read costs the slot and the
 * entry, not the node. */
typedef struct slot {
    uint64_t hash;
    coalesce_buf_t *e; /* NULL: empty. */
} slot_t;

typedef struct index {
    slot_t *slots;
    size_t mask, used;
    knode_t *head; /* Skip list sentinel, MAXH tall. */
    int level;
    uint64_t rng;
    uint64_t live, bytes, ntomb;
    knode_t **tombs; /* Tombstoned nodes, for collection. */
    size_t ntombs, captombs;
    int64_t tomb_min; /* Lowest revision in tombs (0: none). */
    rtomb_t *rt;
    size_t nrt, caprt;
} index_t;

static const unsigned char *nkey(const knode_t *n, size_t *len)
{
    ehead_t *h = EH(n->e);
    *len = h->keylen;
    return h->key;
}

static uint64_t khash(const void *key, size_t len)
{
    return XXH3_64bits_withSeed(key, len, HASH_SEED);
}

static index_t *index_new(void)
{
    index_t *ix = coalesce__calloc(1, sizeof(*ix));
    if (!ix)
        return NULL;
    ix->slots = coalesce__calloc(64, sizeof(slot_t));
    ix->head = coalesce__calloc(1, sizeof(knode_t) + MAXH * sizeof(knode_t *));
    if (!ix->slots || !ix->head) {
        coalesce__free(ix->slots);
        coalesce__free(ix->head);
        coalesce__free(ix);
        return NULL;
    }
    ix->mask = 63;
    ix->level = 1;
    ix->rng = 0x2545F4914F6CDD1Dull;
    return ix;
}

/* Nodes and entries go; returns the entries' buffers in a list so that the
 * caller can drop them after the lock (a reader may hold the last ref). */
static void index_free(index_t *ix)
{
    if (!ix)
        return;
    for (knode_t *n = ix->head->next[0], *next; n; n = next) {
        next = n->next[0];
        coalesce_buf_unref(n->e);
        coalesce__free(n);
    }
    for (size_t i = 0; i < ix->nrt; i++)
        coalesce__free(ix->rt[i].key);
    coalesce__free(ix->rt);
    coalesce__free(ix->tombs);
    coalesce__free(ix->slots);
    coalesce__free(ix->head);
    coalesce__free(ix);
}

static size_t slot_of(const index_t *ix, uint64_t h)
{
    return (size_t)(h >> 16) & ix->mask;
}

/* The slot holding key's entry, or NULL. */
static slot_t *
slot_find(const index_t *ix, const void *key, size_t len, uint64_t h)
{
    for (size_t i = slot_of(ix, h);; i = (i + 1) & ix->mask) {
        slot_t *sl = &ix->slots[i];
        if (!sl->e)
            return NULL;
        if (sl->hash != h)
            continue;
        ehead_t *eh = EH(sl->e);
        if (eh->keylen == len && memcmp(eh->key, key, len) == 0)
            return sl;
    }
}

static knode_t *
index_find(const index_t *ix, const void *key, size_t len, uint64_t h)
{
    slot_t *sl = slot_find(ix, key, len, h);
    return sl ? EH(sl->e)->node : NULL;
}

/* The slot of node n (its current entry). */
static slot_t *slot_of_node(const index_t *ix, const knode_t *n)
{
    for (size_t i = slot_of(ix, n->hash);; i = (i + 1) & ix->mask)
        if (ix->slots[i].e == n->e)
            return &ix->slots[i];
}

static int slots_grow(index_t *ix)
{
    size_t n = (ix->mask + 1) * 2;
    slot_t *ns = coalesce__calloc(n, sizeof(*ns));
    if (!ns)
        return COALESCE_ENOMEM;
    slot_t *os = ix->slots;
    size_t on = ix->mask + 1;
    ix->slots = ns;
    ix->mask = n - 1;
    for (size_t i = 0; i < on; i++) {
        if (!os[i].e)
            continue;
        size_t j = slot_of(ix, os[i].hash);
        while (ns[j].e)
            j = (j + 1) & ix->mask;
        ns[j] = os[i];
    }
    coalesce__free(os);
    return 0;
}

static void slot_remove(index_t *ix, knode_t *n)
{
    size_t i = (size_t)(slot_of_node(ix, n) - ix->slots);
    /* Backward shift: keep every probe sequence unbroken. */
    for (size_t j = i;;) {
        j = (j + 1) & ix->mask;
        slot_t *k = &ix->slots[j];
        if (!k->e)
            break;
        size_t home = slot_of(ix, k->hash);
        bool movable =
            i <= j ? (home <= i || home > j) : (home <= i && home > j);
        if (movable) {
            ix->slots[i] = *k;
            i = j;
        }
    }
    ix->slots[i].e = NULL;
    ix->slots[i].hash = 0;
    ix->used--;
}

static uint8_t random_height(index_t *ix)
{
    uint64_t x = ix->rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    ix->rng = x;
    uint8_t h = 1;
    while (h < MAXH && (x & 3) == 0) { /* p = 1/4 */
        h++;
        x >>= 2;
    }
    return h;
}

/* Predecessors of key at every level. */
static void sl_preds(index_t *ix, const void *key, size_t len, knode_t **pre)
{
    knode_t *x = ix->head;
    for (int i = ix->level - 1; i >= 0; i--) {
        for (;;) {
            knode_t *n = x->next[i];
            size_t nl;
            const unsigned char *nk;
            if (!n || (nk = nkey(n, &nl), keycmp(nk, nl, key, len) >= 0))
                break;
            x = n;
        }
        pre[i] = x;
    }
    for (int i = ix->level; i < MAXH; i++)
        pre[i] = ix->head;
}

/* First node with key >= key. */
static knode_t *sl_seek(const index_t *ix, const void *key, size_t len)
{
    knode_t *x = ix->head;
    for (int i = ix->level - 1; i >= 0; i--) {
        for (;;) {
            knode_t *n = x->next[i];
            size_t nl;
            const unsigned char *nk;
            if (!n || (nk = nkey(n, &nl), keycmp(nk, nl, key, len) >= 0))
                break;
            x = n;
        }
    }
    return x->next[0];
}

/* A new node for entry e (its key); NULL on allocation failure. */
static knode_t *index_insert(index_t *ix, coalesce_buf_t *e, uint64_t h)
{
    if ((ix->used + 1) * 4 > (ix->mask + 1) * 3 && slots_grow(ix))
        return NULL;
    uint8_t height = random_height(ix);
    knode_t *n = coalesce__malloc(sizeof(*n) + height * sizeof(knode_t *));
    if (!n)
        return NULL;
    ehead_t *eh = EH(e);
    n->e = e;
    n->hash = h;
    n->rev = eh->meta.mod_rev;
    n->height = height;
    n->tomb = false;
    n->in_tl = false;
    knode_t *pre[MAXH];
    sl_preds(ix, eh->key, eh->keylen, pre);
    if (height > ix->level)
        ix->level = height;
    for (int i = 0; i < height; i++) {
        n->next[i] = pre[i]->next[i];
        pre[i]->next[i] = n;
    }
    size_t j = slot_of(ix, h);
    while (ix->slots[j].e)
        j = (j + 1) & ix->mask;
    ix->slots[j].hash = h;
    ix->slots[j].e = e;
    eh->node = n;
    ix->used++;
    return n;
}

/* Unlink and free n. Entries carry no user destructor, so dropping the
 * last reference under the lock only costs a free(). */
static void index_remove(index_t *ix, knode_t *n)
{
    size_t len;
    const unsigned char *key = nkey(n, &len);
    knode_t *pre[MAXH];
    sl_preds(ix, key, len, pre);
    for (int i = 0; i < n->height; i++)
        if (pre[i]->next[i] == n)
            pre[i]->next[i] = n->next[i];
    slot_remove(ix, n);
    if (n->tomb)
        ix->ntomb--;
    coalesce_buf_unref(n->e);
    coalesce__free(n);
}

/* --- Memory accounting and tombstones --------------------------------------
 */

static uint64_t entry_bytes(coalesce_buf_t *e)
{
    return EH(e)->keylen + coalesce_buf_len(e);
}

/* n (new, or live or a tombstone) becomes live with entry e (adopted). */
static void node_live(index_t *ix, knode_t *n, coalesce_buf_t *e, bool fresh)
{
    if (!fresh) {
        if (n->tomb)
            ix->ntomb--;
        else
            ix->bytes -= entry_bytes(n->e);
        if (!n->tomb)
            ix->live--;
        slot_of_node(ix, n)->e = e;
        EH(n->e)->node = NULL;
        coalesce_buf_unref(n->e);
    }
    EH(e)->node = n;
    EH(e)->tomb = false;
    n->e = e;
    n->rev = EH(e)->meta.mod_rev;
    n->tomb = false;
    ix->live++;
    ix->bytes += entry_bytes(e);
}

/* Room for one more node in the tombstone list. */
static int tombs_reserve(index_t *ix)
{
    if (ix->ntombs < ix->captombs)
        return 0;
    size_t cap = ix->captombs ? ix->captombs * 2 : 16;
    knode_t **t = coalesce__realloc(ix->tombs, cap * sizeof(*t));
    if (!t)
        return COALESCE_ENOMEM;
    ix->tombs = t;
    ix->captombs = cap;
    return 0;
}

/* n becomes a tombstone at rev; it keeps its entry for the key. Nodes are
 * freed only by tomb_gc(), so the list never points at freed memory. */
static int node_tomb(index_t *ix, knode_t *n, int64_t rev)
{
    if (!n->in_tl) {
        if (tombs_reserve(ix))
            return COALESCE_ENOMEM;
        ix->tombs[ix->ntombs++] = n;
        n->in_tl = true;
    }
    if (!n->tomb) {
        ix->live--;
        ix->bytes -= entry_bytes(n->e);
        ix->ntomb++;
    }
    n->tomb = true;
    EH(n->e)->tomb = true;
    n->rev = rev;
    if (!ix->tomb_min || rev < ix->tomb_min)
        ix->tomb_min = rev;
    return 0;
}

/* Tombstones at or below w can go: nothing older can arrive any more. */
static void tomb_gc(index_t *ix, int64_t w)
{
    if (ix->nrt) {
        size_t k = 0;
        for (size_t i = 0; i < ix->nrt; i++) {
            if (ix->rt[i].rev <= w)
                coalesce__free(ix->rt[i].key);
            else
                ix->rt[k++] = ix->rt[i];
        }
        ix->nrt = k;
    }
    if (!ix->ntombs || ix->tomb_min > w)
        return;
    size_t k = 0;
    int64_t min = 0;
    for (size_t i = 0; i < ix->ntombs; i++) {
        knode_t *n = ix->tombs[i];
        if (!n->tomb) {
            n->in_tl = false; /* Came back to life. */
        } else if (n->rev <= w) {
            index_remove(ix, n);
        } else {
            ix->tombs[k++] = n;
            if (!min || n->rev < min)
                min = n->rev;
        }
    }
    ix->ntombs = k;
    ix->tomb_min = min;
}

/* Keys under prefix older than rev become tombstones, and a range
 * tombstone blocks older puts of keys memory has not seen. */
static void
apply_prefix_delete(index_t *ix, const void *prefix, size_t len, int64_t rev);

/* A prefix delete at rev or later covers key. */
static bool
rt_blocks(const index_t *ix, const void *key, size_t len, int64_t rev)
{
    for (size_t i = 0; i < ix->nrt; i++)
        if (ix->rt[i].rev >= rev && ix->rt[i].len <= len &&
            memcmp(ix->rt[i].key, key, ix->rt[i].len) == 0)
            return true;
    return false;
}

static int rt_add(index_t *ix, const void *prefix, size_t len, int64_t rev)
{
    if (ix->nrt == ix->caprt) {
        size_t cap = ix->caprt ? ix->caprt * 2 : 4;
        rtomb_t *t = coalesce__realloc(ix->rt, cap * sizeof(*t));
        if (!t)
            return COALESCE_ENOMEM;
        ix->rt = t;
        ix->caprt = cap;
    }
    unsigned char *k = coalesce__malloc(len ? len : 1);
    if (!k)
        return COALESCE_ENOMEM;
    memcpy(k, prefix, len);
    ix->rt[ix->nrt++] = (rtomb_t){k, len, rev};
    return 0;
}

/*
 * The one rule. A PUT at rev (entry e, adopted when used: *used set) or a
 * DELETE at rev of key applies only if newer than what the node holds and
 * no prefix delete at or after rev covers the key. An equal revision is the
 * same mutation seen twice (a write-through and its watch echo): the PUT
 * refreshes the entry, the DELETE keeps the tombstone. With tomb_absent, a
 * DELETE of an unknown key leaves a tombstone (write-through: an older PUT
 * may still be on its way); the watch has no such need.
 */
static int apply_one(index_t *ix,
                     bool put,
                     const void *key,
                     size_t len,
                     int64_t rev,
                     coalesce_buf_t *e,
                     bool tomb_absent,
                     bool *used)
{
    uint64_t h = khash(key, len);
    knode_t *n = index_find(ix, key, len, h);
    *used = false;
    if (n) {
        if (rev < n->rev || (rev == n->rev && !put))
            return 0;
        if (put) {
            if (rev == n->rev && n->tomb)
                return 0; /* Our delete's echo came first: stays deleted. */
            node_live(ix, n, e, false);
            *used = true;
            return 0;
        }
        return node_tomb(ix, n, rev);
    }
    if (put) {
        if (rt_blocks(ix, key, len, rev))
            return 0;
        if (!(n = index_insert(ix, e, h)))
            return COALESCE_ENOMEM;
        node_live(ix, n, e, true);
        *used = true;
        return 0;
    }
    if (!tomb_absent || rt_blocks(ix, key, len, rev))
        return 0;
    /* Room first: a node inserted below must become a tombstone, or it
     * would stay a live key holding a tombstone entry. */
    if (tombs_reserve(ix))
        return COALESCE_ENOMEM;
    cache_meta_t m = {0, rev, 0, 0};
    coalesce_buf_t *t = entry_new(key, len, NULL, 0, &m, true);
    if (!t)
        return COALESCE_ENOMEM;
    if (!(n = index_insert(ix, t, h))) {
        coalesce_buf_unref(t);
        return COALESCE_ENOMEM;
    }
    n->e = t;
    n->rev = rev;
    n->tomb = false;
    ix->live++; /* node_tomb() moves it to the tombstones. */
    ix->bytes += entry_bytes(t);
    return node_tomb(ix, n, rev);
}

static void
apply_prefix_delete(index_t *ix, const void *prefix, size_t len, int64_t rev)
{
    for (knode_t *k = sl_seek(ix, prefix, len); k; k = k->next[0]) {
        size_t kl;
        const unsigned char *kk = nkey(k, &kl);
        if (kl < len || memcmp(kk, prefix, len) != 0)
            break;
        if (k->rev < rev)
            node_tomb(ix, k, rev); /* Without memory: the watch brings it. */
    }
    rt_add(ix, prefix, len, rev);
}

/* --- The cache ----------------------------------------------------------- */

struct cache {
    cache_store_t *store;
    unsigned char *prefix, *pend; /* The prefix and its range end. */
    size_t plen, pendlen;
    cache_opts_t o;

    brlock_t lk; /* Guards ix, w, state, counters below. */
    index_t *ix;
    int64_t w; /* W: everything up to it has been applied. */
    int state;
    int last_error;
    uint64_t relists, reconnects, events;
    unsigned decode_streak;

    pthread_mutex_t life; /* Serialises start and stop. */
    pthread_mutex_t mu;   /* Guards what follows; cv signals it. */
    pthread_cond_t cv;
    int64_t w_pub; /* W, for cache_wait_fresh(). */
    bool stop_req;
    bool broken; /* The watch ended: the supervisor takes over. */
    int werr;
    int64_t compact_rev;
    cache_watch_t *watch; /* Owned by start/stop and the supervisor. */
    pthread_t sup;
    /* Reports wait in a ring for their own thread, so a slow callback
     * never holds back the watch or its recovery. */
    struct {
        int what, code;
        int64_t rev;
    } ring[REPORT_RING];
    unsigned rhead, rcount;
    uint64_t rdropped;
    bool rstop, reporting;
    pthread_cond_t rcv;
    pthread_t reporter;
};

static void report(cache_t *c, int what, int code, int64_t rev)
{
    if (code) {
        br_wrlock(&c->lk);
        c->last_error = code;
        br_unlock(&c->lk);
    }
    pthread_mutex_lock(&c->mu);
    if (c->reporting) {
        if (c->rcount == REPORT_RING) {
            c->rdropped++; /* The state and counters still tell. */
        } else {
            unsigned i = (c->rhead + c->rcount++) % REPORT_RING;
            c->ring[i].what = what;
            c->ring[i].code = code;
            c->ring[i].rev = rev;
            pthread_cond_signal(&c->rcv);
        }
    }
    pthread_mutex_unlock(&c->mu);
}

static void *reporter(void *data)
{
    cache_t *c = data;
    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (!c->rcount && !c->rstop)
            pthread_cond_wait(&c->rcv, &c->mu);
        if (!c->rcount)
            break; /* Stopping, and everything was delivered. */
        int what = c->ring[c->rhead].what, code = c->ring[c->rhead].code;
        int64_t rev = c->ring[c->rhead].rev;
        c->rhead = (c->rhead + 1) % REPORT_RING;
        c->rcount--;
        pthread_mutex_unlock(&c->mu);
        c->o.report(c->o.report_data, what, code, rev);
        pthread_mutex_lock(&c->mu);
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

static void publish_w(cache_t *c, int64_t w)
{
    pthread_mutex_lock(&c->mu);
    if (w > c->w_pub)
        c->w_pub = w;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

/* The smallest key greater than every key starting with p: p's last byte
 * below 0xff incremented, the rest cut; all 0xff: no bound ("\0"). */
static size_t prefix_end(const unsigned char *p, size_t len, unsigned char *out)
{
    while (len && p[len - 1] == 0xff)
        len--;
    if (!len) {
        out[0] = 0;
        return 1;
    }
    memcpy(out, p, len);
    out[len - 1]++;
    return len;
}

static bool in_prefix(const cache_t *c, const void *key, size_t len)
{
    return key && len >= c->plen && len <= KEY_MAX &&
           memcmp(key, c->prefix, c->plen) == 0;
}

/* Over a bound: the copy would be wrong if it evicted, so it says so. */
static bool over_bounds(const cache_t *c, const index_t *ix)
{
    return (c->o.max_entries && ix->live > c->o.max_entries) ||
           (c->o.max_bytes && ix->bytes > c->o.max_bytes);
}

/* Under the write lock: drop the copy and go degraded. Returns the index
 * to free after the lock. */
static index_t *degrade(cache_t *c)
{
    index_t *old = c->ix;
    c->ix = NULL;
    c->state = CACHE_DEGRADED;
    c->last_error = COALESCE_EOVERFLOW;
    return old;
}

/* --- Loading ---------------------------------------------------------------
 */

typedef struct load {
    cache_t *c;
    index_t *ix;
    int err;
    unsigned char *last; /* Last key seen, for the next page. */
    size_t lastlen, lastcap;
} load_t;

static int load_kv(void *data, const cache_kv_t *kv)
{
    load_t *l = data;
    cache_meta_t m = {kv->create_rev, kv->mod_rev, kv->version, kv->lease};
    coalesce_buf_t *e =
        entry_new(kv->key, kv->keylen, kv->value, kv->vallen, &m, false);
    bool used = false;
    if (!e || apply_one(l->ix, true, kv->key, kv->keylen, kv->mod_rev, e, false,
                        &used)) {
        coalesce_buf_unref(e);
        l->err = COALESCE_ENOMEM;
        return 1;
    }
    if (!used)
        coalesce_buf_unref(e);
    if (kv->keylen + 1 > l->lastcap) {
        unsigned char *k = coalesce__realloc(l->last, kv->keylen + 1);
        if (!k) {
            l->err = COALESCE_ENOMEM;
            return 1;
        }
        l->last = k;
        l->lastcap = kv->keylen + 1;
    }
    memcpy(l->last, kv->key, kv->keylen);
    l->lastlen = kv->keylen;
    return 0;
}

/* List the prefix at one revision into a new index (paged, each page from
 * the last key + "\0" at the first page's revision). */
static int list_once(cache_t *c, index_t **out, int64_t *rev);

/* A store's "revision compacted" code: stores written for 0.4 and before
 * said COALESCE_ERANGE; both are understood, ECOMPACTED is passed on. */
static int compacted_rc(int rc)
{
    return rc == COALESCE_ERANGE ? COALESCE_ECOMPACTED : rc;
}

/* A page at a revision compacted meanwhile: start again at the latest. */
static int list(cache_t *c, index_t **out, int64_t *rev)
{
    int rc;
    for (int tries = 0; tries < 5; tries++)
        if ((rc = compacted_rc(list_once(c, out, rev))) != COALESCE_ECOMPACTED)
            break;
    return rc;
}

static int list_once(cache_t *c, index_t **out, int64_t *rev)
{
    load_t l = {.c = c};
    if (!(l.ix = index_new()))
        return COALESCE_ENOMEM;
    const cache_store_ops_t *ops = c->store->ops;
    int64_t r = 0;
    const unsigned char *from = c->prefix;
    size_t fromlen = c->plen;
    int rc;
    for (;;) {
        int64_t hdr = 0;
        int more = 0;
        rc = ops->range(c->store, from, fromlen, c->pend, c->pendlen, r,
                        c->o.page_size, load_kv, &l, &hdr, &more);
        if (!rc && l.err)
            rc = l.err;
        if (rc)
            break;
        if (!r)
            r = hdr;
        if (!more)
            break;
        if (l.lastlen + 1 > l.lastcap) {
            unsigned char *k = coalesce__realloc(l.last, l.lastlen + 1);
            if (!k) {
                rc = COALESCE_ENOMEM;
                break;
            }
            l.last = k;
            l.lastcap = l.lastlen + 1;
        }
        l.last[l.lastlen] = 0; /* The next key after the last one. */
        from = l.last;
        fromlen = l.lastlen + 1;
        bool stop;
        pthread_mutex_lock(&c->mu);
        stop = c->stop_req;
        pthread_mutex_unlock(&c->mu);
        if (stop) {
            rc = COALESCE_ECANCELED;
            break;
        }
    }
    coalesce__free(l.last);
    if (rc) {
        index_free(l.ix);
        return rc;
    }
    *out = l.ix;
    *rev = r;
    return 0;
}

/* --- The watch -------------------------------------------------------------
 */

static void watch_broke(cache_t *c, int err, int64_t compact_rev)
{
    pthread_mutex_lock(&c->mu);
    c->broken = true;
    c->werr = err;
    c->compact_rev = compact_rev;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

/*
 * Applies events [0, n) (whole revisions) in one critical section: a
 * transaction's effects appear at once. Entries are built before the lock.
 * W rises to the last revision applied in full: the events' own revisions,
 * never a catch-up batch's header, which may be past events not yet sent.
 * Returns how many events were applied; fewer than n on ENOMEM.
 */
static size_t apply_events(cache_t *c, const cache_event_t *evs, size_t n)
{
    coalesce_buf_t *small[WATCH_CHUNK], **es = small;
    if (n > WATCH_CHUNK && !(es = coalesce__malloc(n * sizeof(*es))))
        return 0;
    size_t built = 0; /* Events whose entries exist. */
    for (; built < n; built++) {
        const cache_event_t *ev = &evs[built];
        es[built] = NULL;
        if (ev->type != CACHE_EV_PUT)
            continue;
        cache_meta_t m = {ev->kv.create_rev, ev->kv.mod_rev, ev->kv.version,
                          ev->kv.lease};
        if (!(es[built] = entry_new(ev->kv.key, ev->kv.keylen, ev->kv.value,
                                    ev->kv.vallen, &m, false)))
            break;
    }
    index_t *drop = NULL;
    bool overflow = false;
    size_t i = 0;
    br_wrlock(&c->lk);
    int64_t w = c->w;
    if (c->ix) {
        for (; i < built; i++) {
            const cache_event_t *ev = &evs[i];
            bool used = false;
            if (in_prefix(c, ev->kv.key, ev->kv.keylen) &&
                apply_one(c->ix, ev->type == CACHE_EV_PUT, ev->kv.key,
                          ev->kv.keylen, ev->kv.mod_rev, es[i], false, &used))
                break;
            if (used)
                es[i] = NULL;
            c->events++;
        }
    } else {
        i = built; /* Degraded: nothing to keep, only W. */
    }
    if (i) {
        int64_t top = evs[i - 1].kv.mod_rev;
        if (i < n && evs[i].kv.mod_rev == top)
            top--; /* That revision is not complete. */
        if (top > w)
            w = top;
    }
    c->w = w;
    if (c->ix) {
        tomb_gc(c->ix, w);
        if (over_bounds(c, c->ix)) {
            drop = degrade(c);
            overflow = true;
        }
    }
    br_unlock(&c->lk);
    for (size_t k = 0; k < built; k++)
        coalesce_buf_unref(es[k]);
    if (es != small)
        coalesce__free(es);
    index_free(drop);
    publish_w(c, w);
    if (overflow)
        report(c, CACHE_REPORT_OVERFLOW, COALESCE_EOVERFLOW, w);
    return i;
}

/*
 * On the store's thread. A large response (a catch-up batch) is applied in
 * chunks that end on revision boundaries, so readers are never held back
 * for long and entries are applied while still in the CPU cache.
 */
static void on_watch(void *data, const cache_watch_resp_t *resp)
{
    cache_t *c = data;
    if (resp->error) {
        watch_broke(c, resp->error, resp->compact_revision);
        return;
    }
    /* A response that could not be applied ended the watch for us: what
     * it still delivers (events, progress) would raise W over a revision
     * never applied. The supervisor resumes from W + 1. */
    pthread_mutex_lock(&c->mu);
    bool broken = c->broken;
    pthread_mutex_unlock(&c->mu);
    if (broken)
        return;
    if (!resp->n) { /* Progress: nothing changed up to its revision. */
        br_wrlock(&c->lk);
        if (resp->revision > c->w)
            c->w = resp->revision;
        int64_t w = c->w;
        if (c->ix)
            tomb_gc(c->ix, w);
        br_unlock(&c->lk);
        publish_w(c, w);
        return;
    }
    const cache_event_t *evs = resp->events;
    for (size_t at = 0; at < resp->n;) {
        size_t end = at + WATCH_CHUNK < resp->n ? at + WATCH_CHUNK : resp->n;
        while (end < resp->n && evs[end].kv.mod_rev == evs[end - 1].kv.mod_rev)
            end++;
        size_t done = apply_events(c, evs + at, end - at);
        if (done < end - at) {
            watch_broke(c, COALESCE_ENOMEM, 0); /* Resumes after W. */
            return;
        }
        at = end;
    }
    br_wrlock(&c->lk);
    c->decode_streak = 0;
    br_unlock(&c->lk);
}

static int watch_from(cache_t *c, int64_t rev)
{
    cache_watch_t *w = NULL;
    pthread_mutex_lock(&c->mu);
    c->broken = false;
    c->werr = 0;
    pthread_mutex_unlock(&c->mu);
    int rc = c->store->ops->watch(c->store, c->prefix, c->plen, c->pend,
                                  c->pendlen, rev, on_watch, c, &w);
    if (!rc) {
        pthread_mutex_lock(&c->mu);
        c->watch = w;
        pthread_mutex_unlock(&c->mu);
    }
    return rc;
}

static void watch_end(cache_t *c)
{
    pthread_mutex_lock(&c->mu);
    cache_watch_t *w = c->watch;
    c->watch = NULL;
    pthread_mutex_unlock(&c->mu);
    if (w)
        c->store->ops->watch_cancel(c->store, w);
}

static void set_state(cache_t *c, int state)
{
    br_wrlock(&c->lk);
    if (c->state != CACHE_DEGRADED && c->state != CACHE_STOPPED)
        c->state = state;
    br_unlock(&c->lk);
}

/* Waits ms unless a stop comes; true if stopping. */
static bool pause_ms(cache_t *c, uint32_t ms)
{
    int64_t until = coalesce__now_ns() + (int64_t)ms * 1000000;
    struct timespec ts = {(time_t)(until / 1000000000),
                          (long)(until % 1000000000)};
    pthread_mutex_lock(&c->mu);
    while (!c->stop_req && coalesce__now_ns() < until)
        pthread_cond_timedwait(&c->cv, &c->mu, &ts);
    bool stop = c->stop_req;
    pthread_mutex_unlock(&c->mu);
    return stop;
}

/*
 * Relist at the latest revision R1 and swap the new copy in at once,
 * keeping what memory holds that is newer than R1 (write-throughs that
 * landed meanwhile) and W = R1.
 */
static int relist(cache_t *c, int64_t *r1)
{
    index_t *nx;
    int rc = list(c, &nx, r1);
    if (rc)
        return rc;
    br_wrlock(&c->lk);
    index_t *old = c->ix;
    if (old) {
        for (knode_t *n = old->head->next[0]; n && !rc; n = n->next[0]) {
            if (n->rev <= *r1)
                continue;
            size_t len;
            const unsigned char *key = nkey(n, &len);
            bool used = false;
            rc = apply_one(nx, !n->tomb, key, len, n->rev,
                           coalesce_buf_ref(n->e), true, &used);
            if (!used)
                coalesce_buf_unref(n->e);
        }
        for (size_t i = 0; i < old->nrt; i++)
            if (old->rt[i].rev > *r1) /* Also over what the list found. */
                apply_prefix_delete(nx, old->rt[i].key, old->rt[i].len,
                                    old->rt[i].rev);
    }
    if (rc) {
        br_unlock(&c->lk);
        index_free(nx);
        return rc;
    }
    index_t *drop = nx, *drop2 = NULL;
    bool overflow = false;
    /* Degraded too: the watch goes on from R1 + 1, so a resume must. */
    c->w = *r1;
    if (c->state != CACHE_DEGRADED) {
        c->ix = nx;
        c->relists++;
        drop = old;
        if ((overflow = over_bounds(c, nx)))
            drop2 = degrade(c);
    }
    br_unlock(&c->lk);
    index_free(drop);
    index_free(drop2);
    publish_w(c, *r1);
    if (overflow)
        report(c, CACHE_REPORT_OVERFLOW, COALESCE_EOVERFLOW, *r1);
    return 0;
}

static int64_t current_w(cache_t *c)
{
    br_rdlock(&c->lk);
    int64_t w = c->w;
    br_unlock(&c->lk);
    return w;
}

/*
 * The supervisor: sleeps until the watch ends, then resumes it from W + 1
 * with backoff, or relists after a compaction (or repeated decode errors),
 * reporting what it does. Stops when cache_stop() asks.
 */
static void *supervise(void *data)
{
    cache_t *c = data;
    uint32_t backoff = c->o.backoff_min_ms;
    for (;;) {
        pthread_mutex_lock(&c->mu);
        while (!c->stop_req && !c->broken)
            pthread_cond_wait(&c->cv, &c->mu);
        bool stop = c->stop_req;
        int err = c->werr;
        pthread_mutex_unlock(&c->mu);
        if (stop)
            break;
        watch_end(c); /* It is over; free it. */
        bool need_relist = compacted_rc(err) == COALESCE_ECOMPACTED;
        if (err == COALESCE_EDECODE) {
            br_wrlock(&c->lk);
            need_relist = ++c->decode_streak >= DECODE_RELIST;
            br_unlock(&c->lk);
            report(c, CACHE_REPORT_DECODE, err, current_w(c));
        } else if (!need_relist) {
            report(c, CACHE_REPORT_DISCONNECTED, err, current_w(c));
        }
        for (;;) { /* Until watching again, or stopping. */
            int rc;
            if (need_relist) {
                set_state(c, CACHE_RELISTING);
                int64_t r1 = 0;
                rc = relist(c, &r1);
                if (!rc) {
                    report(c, CACHE_REPORT_RELISTED, 0, r1);
                    need_relist = false;
                    rc = watch_from(c, r1 + 1);
                }
            } else {
                set_state(c, CACHE_RECONNECTING);
                rc = watch_from(c, current_w(c) + 1);
                if (!rc) {
                    br_wrlock(&c->lk);
                    c->reconnects++;
                    br_unlock(&c->lk);
                }
            }
            if (!rc) {
                set_state(c, CACHE_RUNNING);
                backoff = c->o.backoff_min_ms;
                break;
            }
            if (compacted_rc(rc) == COALESCE_ECOMPACTED)
                need_relist = true;
            else if (rc != COALESCE_ECANCELED)
                report(c, CACHE_REPORT_FAILED, rc, current_w(c));
            if (pause_ms(c, backoff))
                break;
            backoff = backoff * 2 > c->o.backoff_max_ms ? c->o.backoff_max_ms
                                                        : backoff * 2;
        }
        /* A short pause between resumes keeps a flapping store from
         * spinning; none is needed after a clean resume. */
    }
    watch_end(c);
    return NULL;
}

/* --- Life ------------------------------------------------------------------
 */

void cache_opts_init(cache_opts_t *o)
{
    if (!o)
        return;
    memset(o, 0, sizeof(*o));
    o->size = sizeof(*o);
    o->page_size = DEFAULT_PAGE;
    o->backoff_min_ms = DEFAULT_BO_MIN;
    o->backoff_max_ms = DEFAULT_BO_MAX;
}

int cache_new(cache_t **out,
              cache_store_t *store,
              const void *prefix,
              size_t prefixlen,
              const cache_opts_t *opts)
{
    cache_opts_t o;
    cache_opts_init(&o);
    if (!out || !store || !store->ops || store->ops->version < 1 || !prefix ||
        !prefixlen || prefixlen > PREFIX_MAX)
        return COALESCE_EINVAL;
    if (opts) {
        if (opts->size != sizeof(o))
            return COALESCE_EINVAL;
        o = *opts;
    }
    if (!o.page_size)
        o.page_size = DEFAULT_PAGE;
    if (!o.backoff_min_ms)
        o.backoff_min_ms = DEFAULT_BO_MIN;
    if (o.backoff_max_ms < o.backoff_min_ms)
        o.backoff_max_ms = o.backoff_min_ms;
    cache_t *c = coalesce__calloc(1, sizeof(*c));
    if (!c)
        return COALESCE_ENOMEM;
    c->prefix = coalesce__malloc(prefixlen);
    c->pend = coalesce__malloc(prefixlen);
    if (!c->prefix || !c->pend) {
        coalesce__free(c->prefix);
        coalesce__free(c->pend);
        coalesce__free(c);
        return COALESCE_ENOMEM;
    }
    memcpy(c->prefix, prefix, prefixlen);
    c->plen = prefixlen;
    c->pendlen = prefix_end(c->prefix, prefixlen, c->pend);
    c->store = store;
    c->o = o;
    br_init(&c->lk);
    pthread_mutex_init(&c->life, NULL);
    pthread_mutex_init(&c->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&c->cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_cond_init(&c->rcv, NULL);
    c->state = CACHE_STOPPED;
    *out = c;
    return 0;
}

/* Ends the reporter thread after it delivered what is queued. */
static void reporter_stop(cache_t *c)
{
    pthread_mutex_lock(&c->mu);
    bool on = c->reporting;
    c->reporting = false;
    c->rstop = true;
    pthread_cond_signal(&c->rcv);
    pthread_mutex_unlock(&c->mu);
    if (on)
        pthread_join(c->reporter, NULL);
}

int cache_start(cache_t *c)
{
    if (!c)
        return COALESCE_EINVAL;
    pthread_mutex_lock(&c->life);
    br_rdlock(&c->lk);
    bool stopped = c->state == CACHE_STOPPED;
    br_unlock(&c->lk);
    if (!stopped) {
        pthread_mutex_unlock(&c->life);
        return COALESCE_EBUSY;
    }
    pthread_mutex_lock(&c->mu);
    c->stop_req = false;
    c->broken = false;
    c->rstop = false;
    c->reporting = false;
    pthread_mutex_unlock(&c->mu);
    if (c->o.report) {
        if (pthread_create(&c->reporter, NULL, reporter, c)) {
            pthread_mutex_unlock(&c->life);
            return COALESCE_ENOMEM;
        }
        pthread_mutex_lock(&c->mu);
        c->reporting = true;
        pthread_mutex_unlock(&c->mu);
    }
    index_t *ix;
    int64_t r0 = 0;
    int rc = list(c, &ix, &r0);
    if (rc) {
        reporter_stop(c);
        pthread_mutex_unlock(&c->life);
        return rc;
    }
    br_wrlock(&c->lk);
    c->ix = ix;
    c->w = r0; /* Even for an empty prefix: nothing at or before R0 can
                  come from the watch. */
    c->state = CACHE_RUNNING;
    c->last_error = 0;
    c->decode_streak = 0;
    bool overflow = over_bounds(c, ix);
    index_t *drop = overflow ? degrade(c) : NULL;
    br_unlock(&c->lk);
    index_free(drop);
    pthread_mutex_lock(&c->mu);
    c->w_pub = r0;
    pthread_mutex_unlock(&c->mu);
    if (overflow)
        report(c, CACHE_REPORT_OVERFLOW, COALESCE_EOVERFLOW, r0);
    rc = watch_from(c, r0 + 1);
    if (!rc && pthread_create(&c->sup, NULL, supervise, c))
        rc = COALESCE_ENOMEM;
    if (rc) {
        watch_end(c);
        br_wrlock(&c->lk);
        drop = c->ix;
        c->ix = NULL;
        c->state = CACHE_STOPPED;
        c->w = 0;
        br_unlock(&c->lk);
        index_free(drop);
        reporter_stop(c);
    }
    pthread_mutex_unlock(&c->life);
    return rc;
}

void cache_stop(cache_t *c)
{
    if (!c)
        return;
    pthread_mutex_lock(&c->life);
    br_rdlock(&c->lk);
    bool stopped = c->state == CACHE_STOPPED;
    br_unlock(&c->lk);
    if (!stopped) {
        pthread_mutex_lock(&c->mu);
        c->stop_req = true;
        pthread_cond_broadcast(&c->cv);
        pthread_mutex_unlock(&c->mu);
        pthread_join(c->sup, NULL); /* It cancels the watch on its way out. */
        br_wrlock(&c->lk);
        index_t *drop = c->ix;
        c->ix = NULL;
        c->state = CACHE_STOPPED;
        c->w = 0;
        br_unlock(&c->lk);
        index_free(drop);
        pthread_mutex_lock(&c->mu);
        c->w_pub = 0;
        c->broken = false;
        pthread_cond_broadcast(&c->cv); /* Fresh-waiters see the stop. */
        pthread_mutex_unlock(&c->mu);
        reporter_stop(c); /* Delivers what is queued, then no more. */
    }
    pthread_mutex_unlock(&c->life);
}

void cache_free(cache_t *c)
{
    if (!c)
        return;
    cache_stop(c);
    br_destroy(&c->lk);
    pthread_mutex_destroy(&c->life);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->cv);
    pthread_cond_destroy(&c->rcv);
    coalesce__free(c->prefix);
    coalesce__free(c->pend);
    coalesce__free(c);
}

/* --- Reads -----------------------------------------------------------------
 */

/* Under the read lock. */
static int read_state(const cache_t *c)
{
    if (c->state == CACHE_STOPPED)
        return COALESCE_ENOTSTARTED;
    if (c->state == CACHE_DEGRADED)
        return COALESCE_EOVERFLOW;
    return 0;
}

int cache_get(cache_t *c,
              const void *key,
              size_t keylen,
              coalesce_buf_t **value,
              cache_meta_t *meta)
{
    if (!c || !in_prefix(c, key, keylen))
        return COALESCE_EINVAL;
    uint64_t h = khash(key, keylen);
    br_rdlock(&c->lk);
    int rc = read_state(c);
    if (!rc) {
        slot_t *sl = slot_find(c->ix, key, keylen, h);
        ehead_t *eh = sl ? EH(sl->e) : NULL;
        if (!eh || eh->tomb) {
            rc = COALESCE_ENOENT;
        } else {
            if (value)
                *value = coalesce_buf_ref(sl->e);
            if (meta)
                *meta = eh->meta;
        }
    }
    br_unlock(&c->lk);
    return rc;
}

int cache_scan(
    cache_t *c, const void *prefix, size_t len, cache_scan_cb cb, void *data)
{
    if (!c || !cb || (!prefix && len))
        return COALESCE_EINVAL;
    size_t cmp = len < c->plen ? len : c->plen;
    if (cmp && memcmp(prefix, c->prefix, cmp) != 0)
        return COALESCE_EINVAL; /* Outside the cache's prefix. */
    const unsigned char *from = len > c->plen ? prefix : c->prefix;
    size_t fromlen = len > c->plen ? len : c->plen;
    coalesce_buf_t *small[64], **v = small;
    size_t n = 0, cap = 64;
    br_rdlock(&c->lk);
    int rc = read_state(c);
    for (knode_t *k = rc ? NULL : sl_seek(c->ix, from, fromlen); k;
         k = k->next[0]) {
        size_t kl;
        const unsigned char *kk = nkey(k, &kl);
        if (kl < fromlen || memcmp(kk, from, fromlen) != 0)
            break;
        if (k->tomb)
            continue;
        if (n == cap) {
            coalesce_buf_t **nv = coalesce__malloc(cap * 2 * sizeof(*nv));
            if (!nv) {
                rc = COALESCE_ENOMEM;
                break;
            }
            memcpy(nv, v, n * sizeof(*nv));
            if (v != small)
                coalesce__free(v);
            v = nv;
            cap *= 2;
        }
        v[n++] = coalesce_buf_ref(k->e);
    }
    br_unlock(&c->lk);
    size_t i = 0;
    for (; !rc && i < n; i++) { /* A snapshot: entries never change. */
        ehead_t *h = EH(v[i]);
        if (cb(data, h->key, h->keylen, v[i], &h->meta))
            break;
    }
    for (i = 0; i < n; i++)
        coalesce_buf_unref(v[i]);
    if (v != small)
        coalesce__free(v);
    return rc;
}

int cache_wait_fresh(cache_t *c, int64_t rev, int timeout_ms)
{
    if (!c)
        return COALESCE_EINVAL;
    int64_t until =
        timeout_ms > 0 ? coalesce__now_ns() + (int64_t)timeout_ms * 1000000 : 0;
    struct timespec ts = {(time_t)(until / 1000000000),
                          (long)(until % 1000000000)};
    int rc = 0;
    pthread_mutex_lock(&c->mu);
    for (;;) {
        br_rdlock(&c->lk);
        bool stopped = c->state == CACHE_STOPPED;
        br_unlock(&c->lk);
        if (stopped) {
            rc = COALESCE_ENOTSTARTED;
            break;
        }
        if (c->w_pub >= rev)
            break;
        if (timeout_ms == 0 ||
            (timeout_ms > 0 && coalesce__now_ns() >= until)) {
            rc = COALESCE_ETIMEDOUT;
            break;
        }
        if (timeout_ms > 0)
            pthread_cond_timedwait(&c->cv, &c->mu, &ts);
        else
            pthread_cond_wait(&c->cv, &c->mu);
    }
    pthread_mutex_unlock(&c->mu);
    return rc;
}

int cache_health(cache_t *c, cache_health_t *out, size_t size)
{
    if (!c || !out)
        return COALESCE_EINVAL;
    cache_health_t h;
    memset(&h, 0, sizeof(h));
    br_rdlock(&c->lk);
    h.state = c->state;
    h.last_error = c->last_error;
    h.watch_rev = c->w;
    if (c->ix) {
        h.entries = c->ix->live;
        h.bytes = c->ix->bytes;
        h.tombstones = c->ix->ntomb;
        h.range_tombstones = c->ix->nrt;
    }
    h.relists = c->relists;
    h.reconnects = c->reconnects;
    h.events = c->events;
    br_unlock(&c->lk);
    pthread_mutex_lock(&c->mu);
    h.reports_dropped = c->rdropped;
    pthread_mutex_unlock(&c->mu);
    memcpy(out, &h, size < sizeof(h) ? size : sizeof(h));
    return 0;
}

/* --- Writes ----------------------------------------------------------------
 */

static bool op_is_put(int type)
{
    return type == CACHE_TXN_PUT || type == CACHE_TXN_CREATE ||
           type == CACHE_TXN_UPDATE;
}

/* Everything the store would reject, or that would leave the prefix,
 * before it is contacted. */
static int txn_check(const cache_t *c, const cache_txn_op_t *ops, size_t n)
{
    if (!ops || !n || n > CACHE_TXN_MAX_OPS)
        return COALESCE_EINVAL;
    for (size_t i = 0; i < n; i++) {
        const cache_txn_op_t *a = &ops[i];
        if (a->type < CACHE_TXN_PUT || a->type > CACHE_TXN_DELETE_PREFIX ||
            !in_prefix(c, a->key, a->keylen) || (!a->value && a->vallen) ||
            (a->opts && (a->opts->ttl_ms < 0 || a->opts->lease < 0)))
            return COALESCE_EINVAL;
        for (size_t j = 0; j < i; j++) {
            const cache_txn_op_t *b = &ops[j];
            bool ap = a->type == CACHE_TXN_DELETE_PREFIX;
            bool bp = b->type == CACHE_TXN_DELETE_PREFIX;
            if (ap && bp)
                continue; /* Overlapping deletes are fine. */
            const cache_txn_op_t *pre = ap ? a : b, *k = ap ? b : a;
            if (ap || bp) {
                if (k->keylen >= pre->keylen &&
                    memcmp(k->key, pre->key, pre->keylen) == 0)
                    return COALESCE_EINVAL;
            } else if (a->keylen == b->keylen &&
                       memcmp(a->key, b->key, a->keylen) == 0) {
                return COALESCE_EINVAL;
            }
        }
    }
    return 0;
}

static void revoke_all(cache_t *c, const int64_t *leases, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (leases[i])
            c->store->ops->lease_revoke(c->store, leases[i]);
}

/*
 * Runs ops as one store transaction and, if it succeeded, applies every
 * effect under one write lock in op order. conflict is the code for a
 * failed compare.
 */
static int run_txn(cache_t *c,
                   const cache_txn_op_t *ops,
                   size_t n,
                   int conflict,
                   int64_t *rev,
                   int64_t *deleted)
{
    int rc = c ? txn_check(c, ops, n) : COALESCE_EINVAL;
    if (rc)
        return rc;
    br_rdlock(&c->lk);
    bool stopped = c->state == CACHE_STOPPED;
    br_unlock(&c->lk);
    if (stopped)
        return COALESCE_ENOTSTARTED;

    cache_cmp_t cmps[CACHE_TXN_MAX_OPS];
    cache_op_t sops[CACHE_TXN_MAX_OPS];
    cache_op_result_t res[CACHE_TXN_MAX_OPS];
    int64_t leases[CACHE_TXN_MAX_OPS];
    coalesce_buf_t *es[CACHE_TXN_MAX_OPS];
    unsigned char *ends[CACHE_TXN_MAX_OPS];
    size_t ncmp = 0;
    memset(leases, 0, n * sizeof(leases[0]));
    memset(es, 0, n * sizeof(es[0]));
    memset(ends, 0, n * sizeof(ends[0]));
    memset(res, 0, n * sizeof(res[0]));
    for (size_t i = 0; i < n && !rc; i++) {
        const cache_txn_op_t *a = &ops[i];
        cache_op_t *o = &sops[i];
        memset(o, 0, sizeof(*o));
        o->key = a->key;
        o->keylen = a->keylen;
        if (a->type == CACHE_TXN_CREATE || a->type == CACHE_TXN_UPDATE ||
            a->type == CACHE_TXN_DELETE_VALUE) {
            cmps[ncmp++] = (cache_cmp_t){
                .key = a->key,
                .keylen = a->keylen,
                .target = a->type == CACHE_TXN_CREATE ? CACHE_CMP_CREATE
                                                      : CACHE_CMP_MOD,
                .result = CACHE_CMP_EQUAL,
                .number = a->type == CACHE_TXN_CREATE ? 0 : a->expect};
        }
        if (op_is_put(a->type)) {
            o->type = CACHE_OP_PUT;
            o->value = a->value;
            o->vallen = a->vallen;
            if (a->opts && a->opts->ttl_ms > 0)
                rc = c->store->ops->lease_grant(c->store, a->opts->ttl_ms,
                                                &leases[i]);
            o->lease = leases[i] ? leases[i] : a->opts ? a->opts->lease : 0;
        } else {
            o->type = CACHE_OP_DELETE;
            if (a->type == CACHE_TXN_DELETE_PREFIX) {
                if (!(ends[i] = coalesce__malloc(a->keylen))) {
                    rc = COALESCE_ENOMEM;
                    break;
                }
                o->end = ends[i];
                o->endlen = prefix_end(a->key, a->keylen, ends[i]);
            }
        }
    }
    int ok = 0;
    int64_t r = 0;
    if (!rc)
        rc = c->store->ops->txn(c->store, cmps, ncmp, sops, n, &ok, &r, res);
    if (rev && !rc)
        *rev = r;
    if (!rc && !ok)
        rc = conflict;
    /* Entries for the puts, built before the lock. */
    for (size_t i = 0; i < n && !rc; i++) {
        if (!op_is_put(ops[i].type))
            continue;
        /* A store's version is trusted, not its range: saturate. */
        int64_t pv = res[i].has_prev ? res[i].prev_version : 0;
        cache_meta_t m = {res[i].has_prev ? res[i].prev_create_rev : r, r,
                          pv < INT64_MAX ? pv + 1 : INT64_MAX, sops[i].lease};
        es[i] = entry_new(ops[i].key, ops[i].keylen, ops[i].value,
                          ops[i].vallen, &m, false);
        /* Without memory the watch brings it; the write stands. */
    }
    if (rc) {
        revoke_all(c, leases, n); /* A failed write leaks no lease. */
    } else {
        index_t *drop = NULL;
        bool overflow = false;
        br_wrlock(&c->lk);
        if (c->ix && r > c->w) { /* At or below W the watch has it. */
            for (size_t i = 0; i < n; i++) {
                const cache_txn_op_t *a = &ops[i];
                bool used = false;
                if (op_is_put(a->type)) {
                    if (es[i])
                        apply_one(c->ix, true, a->key, a->keylen, r, es[i],
                                  false, &used);
                    if (used)
                        es[i] = NULL;
                } else if (a->type != CACHE_TXN_DELETE_PREFIX) {
                    apply_one(c->ix, false, a->key, a->keylen, r, NULL, true,
                              &used);
                } else {
                    apply_prefix_delete(c->ix, a->key, a->keylen, r);
                }
            }
            if (over_bounds(c, c->ix)) {
                drop = degrade(c);
                overflow = true;
            }
        }
        br_unlock(&c->lk);
        index_free(drop);
        if (overflow)
            report(c, CACHE_REPORT_OVERFLOW, COALESCE_EOVERFLOW, r);
        if (deleted)
            for (size_t i = 0; i < n; i++)
                if (!op_is_put(ops[i].type))
                    *deleted += res[i].deleted;
    }
    for (size_t i = 0; i < n; i++) {
        coalesce_buf_unref(es[i]);
        coalesce__free(ends[i]);
    }
    return rc;
}

int cache_put(cache_t *c,
              const void *key,
              size_t keylen,
              const void *value,
              size_t vallen,
              const cache_put_opts_t *opts,
              int64_t *rev)
{
    cache_txn_op_t op = {CACHE_TXN_PUT, key, keylen, value, vallen, 0, opts};
    return run_txn(c, &op, 1, COALESCE_ECONFLICT, rev, NULL);
}

int cache_create(cache_t *c,
                 const void *key,
                 size_t keylen,
                 const void *value,
                 size_t vallen,
                 const cache_put_opts_t *opts,
                 int64_t *rev)
{
    cache_txn_op_t op = {CACHE_TXN_CREATE, key, keylen, value, vallen, 0, opts};
    return run_txn(c, &op, 1, COALESCE_EEXIST, rev, NULL);
}

int cache_update(cache_t *c,
                 const void *key,
                 size_t keylen,
                 const void *value,
                 size_t vallen,
                 int64_t expect,
                 const cache_put_opts_t *opts,
                 int64_t *rev)
{
    cache_txn_op_t op = {CACHE_TXN_UPDATE, key,    keylen, value,
                         vallen,           expect, opts};
    return run_txn(c, &op, 1, COALESCE_ECONFLICT, rev, NULL);
}

int cache_delete(
    cache_t *c, const void *key, size_t keylen, int64_t *deleted, int64_t *rev)
{
    cache_txn_op_t op = {CACHE_TXN_DELETE, key, keylen, NULL, 0, 0, NULL};
    int64_t d = 0;
    int rc = run_txn(c, &op, 1, COALESCE_ECONFLICT, rev, &d);
    if (deleted)
        *deleted = rc ? 0 : d;
    return rc;
}

int cache_delete_value(
    cache_t *c, const void *key, size_t keylen, int64_t expect, int64_t *rev)
{
    cache_txn_op_t op = {
        CACHE_TXN_DELETE_VALUE, key, keylen, NULL, 0, expect, NULL};
    return run_txn(c, &op, 1, COALESCE_ECONFLICT, rev, NULL);
}

int cache_delete_prefix(
    cache_t *c, const void *prefix, size_t len, int64_t *deleted, int64_t *rev)
{
    cache_txn_op_t op = {
        CACHE_TXN_DELETE_PREFIX, prefix, len, NULL, 0, 0, NULL};
    int64_t d = 0;
    int rc = run_txn(c, &op, 1, COALESCE_ECONFLICT, rev, &d);
    if (deleted)
        *deleted = rc ? 0 : d;
    return rc;
}

int cache_txn(cache_t *c, const cache_txn_op_t *ops, size_t n, int64_t *rev)
{
    return run_txn(c, ops, n, COALESCE_ECONFLICT, rev, NULL);
}

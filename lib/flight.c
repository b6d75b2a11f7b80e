/*
 * Flight groups: one upstream fetch per key, streamed to every caller.
 *
 * Locking. A group is an array of shards; the key's XXH3 hash picks the
 * shard, whose one mutex guards the shard's hash table, every field of the
 * shard's flights (segment reference counts and reader cursors included) and
 * the shard's counters. One lock per operation keeps the uncontended path
 * short; hot keys spread over shards. No user callback runs under it.
 *
 * The body is a singly linked chain of immutable segments. A segment is
 * referenced by the link from its predecessor, by the flight's tail (while
 * the writer may append), by the flight's head (while byte 0 is retained for
 * late joiners) and by every reader cursor on it. When a count reaches zero
 * the segment dies and drops its link to the next one, so a prefix nobody
 * can reach is freed at once: memory follows the slowest attached reader,
 * and max_lag bounds that. Dead segments are collected under the lock and
 * their buffers released after it, since a wrapped buffer's destructor is
 * user code.
 *
 * Notify callbacks are collected under the lock and called after it. A
 * reader being closed waits for callbacks running on other threads (so
 * none runs after close returns) and is freed by the last dispatcher that
 * still holds it.
 */
#include "coalesce_int.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#define KEY_MAX         (1u << 20)
#define KEY_INLINE      48 /* Keys up to this size live in the flight. */
#define POOL_MAX        16 /* Spare flights kept per shard. */
#define BUCKETS_MIN     16 /* Initial hash buckets per shard. */
#define NOTE_BATCH      64 /* Notify callbacks collected per pass. */
#define SHARDS_MAX      4096
#define DEFAULT_MAX_LAG (64ull << 20)
#define DEFAULT_RETAIN  (16ull << 20)
#define DEFAULT_SHARDS  64
#define DEFAULT_CHUNK   (1ull << 20)
#define DEFAULT_SPAN    (64ull << 20)

typedef struct seg seg_t;
typedef struct shard shard_t;
typedef struct flight flight_t;
typedef struct hent hent_t;
typedef struct robj robj_t;
typedef struct run run_t;
typedef struct piece piece_t;
typedef struct rreader rreader_t;

/* A shard table entry: an object flight, or a range object (robj_t). */
struct hent {
    hent_t *hnext; /* Hash chain; the spare-flight pool's link too. */
    uint64_t hash;
    unsigned char *key;
    size_t keylen;
    bool registered;
    bool range; /* A robj_t: range flights and object flights never meet. */
};

struct seg {
    seg_t *next;
    coalesce_buf_t *buf; /* NULL for the head sentinel. */
    const unsigned char *data;
    size_t len;
    unsigned refs;
    bool embedded; /* The head sentinel lives inside its flight. */
};

struct flight_writer {
    flight_t *f; /* Object flight, or NULL for a range fetch. */
    run_t *run;  /* Range fetch, or NULL. */
    bool ended;
    bool released; /* Released while the callback still ran. */
};

struct flight_reader {
    flight_t *f;
    flight_reader_t *prev, *next; /* In f->readers. */
    seg_t *seg;    /* Cursor segment (one reference); NULL once finished. */
    size_t pos;    /* Bytes of seg consumed. */
    uint64_t off;  /* Body bytes consumed. */
    size_t peeked; /* Bytes the last peek lent out. */
    coalesce_buf_t *pin; /* Keeps lent bytes alive after a detach. */
    int status;          /* Terminal status once known, else 0. */
    int64_t deadline;    /* Waiter deadline (monotonic ns); 0 for none. */
    flight_notify_cb cb; /* Armed notify callback, or NULL. */
    uint64_t arm_seq;    /* f->ev_seq when it was armed. */
    void *cb_data;
    unsigned notifying; /* Dispatch batches holding this reader. */
    atomic_uint in_cb;  /* Its notify callbacks running now. */
    atomic_bool closed;
    bool close_pending;         /* Closed while held by a dispatch. */
    atomic_bool closer_waiting; /* A close waits for in_cb to drop. */
    bool meta_seen;
    bool attached; /* Counted in f->nreaders. */
    bool leader;
    bool embedded;          /* The leader's reader lives inside the flight. */
    bool range;             /* The handle of a rreader_t (f is NULL). */
    rreader_t *parent;      /* A chunk cursor's range reader, or NULL. */
    flight_reader_t *qnext; /* In its piece's queue of chunk cursors. */
};

struct flight {
    hent_t e; /* First: the table sees flights as entries. */
    flight_group_t *g;
    shard_t *sh;
    unsigned refs;     /* Table + writer + readers + dispatch holds. */
    unsigned nreaders; /* Attached readers: open and not detached. */
    unsigned waiters;  /* Threads blocked on cond. */
    int status;
    bool ended;
    bool canceled;
    bool chunk;    /* One chunk of a range fetch: no key, no leader reader. */
    bool fetching; /* The leader's callback is running. */
    bool meta_set;
    bool meta_stage; /* Meta, first byte or end seen. */
    bool head_held;
    bool cond_ready;
    bool orphan_counted;
    uint64_t written;
    uint64_t base;          /* Chunk: object offset of its first byte. */
    uint64_t clen;          /* Chunk: its length. */
    uint64_t fetch_written; /* Bytes written when the callback returned. */
    uint64_t ev_seq;        /* Events that woke readers. */
    unsigned char *meta;
    size_t metalen;
    seg_t head; /* Sentinel before the first segment. */
    seg_t *tail;
    flight_reader_t *readers;
    pthread_cond_t cond;
    struct flight_writer w;
    flight_reader_t lr; /* The leader's reader. */
    unsigned char keybuf[KEY_INLINE];
};

struct shard {
    pthread_mutex_t mu;
    hent_t **buckets;
    size_t mask;
    size_t count;
    flight_t *pool;
    unsigned npool;
    flight_reader_t *rpool; /* Spare joiner readers, linked by next. */
    unsigned nrpool;
    unsigned long live; /* Flights and range objects not yet freed. */
    bool closing;
    flight_stats_t st;
};

struct flight_group {
    /* 1 while open; at close, + the flights then alive. Before close,
     * live flights are counted per shard under its lock, so the hot path
     * touches no shared atomic. */
    atomic_ulong pending;
    void *data;
    uint64_t seed;
    uint64_t max_lag;
    uint64_t retain;
    uint64_t chunk;
    uint64_t max_gap;
    uint64_t max_span;
    int64_t wait_ns;
    int64_t linger_ns;
    int orphan_policy;
    unsigned nshards;
    pthread_condattr_t cattr;
    shard_t *shards;
};

/* Notify callbacks collected under the lock, run after it. */
typedef struct note {
    flight_reader_t *r;
    flight_notify_cb cb;
    void *data;
} note_t;

typedef struct notes {
    flight_t *hold;        /* Flight kept alive by a reference while running. */
    robj_t *ohold;         /* Or range object. */
    flight_reader_t *self; /* The reader making the call: not notified. */
    uint64_t seq;          /* This event: armings older than it fire. */
    uint64_t oseq;         /* The same for a range object's event. */
    size_t n;
    bool more; /* Armed readers left over for another pass. */
    note_t v[NOTE_BATCH];
} notes_t;

/* Work that must wait until the shard lock is released. */
typedef struct post {
    seg_t *dead;
    coalesce_buf_t *pin;
    flight_reader_t *free_reader;
    flight_group_t *unref_group; /* Owed unrefs_owed group unrefs. */
    unsigned unrefs_owed;
    notes_t notes;
} post_t;

/* Only the scalars: zeroing the note array would cost more than the rest. */
static inline void post_init(post_t *p)
{
    p->dead = NULL;
    p->pin = NULL;
    p->free_reader = NULL;
    p->unref_group = NULL;
    p->unrefs_owed = 0;
    p->notes.hold = NULL;
    p->notes.ohold = NULL;
    p->notes.self = NULL;
    p->notes.seq = 0;
    p->notes.oseq = 0;
    p->notes.n = 0;
    p->notes.more = false;
}

/* A flight or range object freed after the group was closed: the group
 * loses one reference, after the lock. */
static inline void post_owe(post_t *p, flight_group_t *g)
{
    p->unref_group = g;
    p->unrefs_owed++;
}

/* The reader whose notify callback this thread is running, if any. */
static _Thread_local flight_reader_t *notify_current;

static void group_unref(flight_group_t *g);
static void post_run_slow(shard_t *sh, post_t *p);

/* Most operations leave nothing to do after the lock. */
static inline void post_run(shard_t *sh, post_t *p)
{
    if (p->notes.n || p->dead || p->pin || p->free_reader || p->unrefs_owed)
        post_run_slow(sh, p);
}
static void unregister(flight_t *f, post_t *p);
static void rr_free_final(rreader_t *rr, post_t *p);
static void wake_obj(robj_t *o, notes_t *nl);
static void robj_unref(robj_t *o, post_t *p);
static pthread_cond_t *reader_cond(flight_reader_t *r);
static void chunk_lag(flight_t *f, uint64_t start, post_t *p);

/* Range flights, defined at the end; the public functions dispatch. */
static int run_set_meta(flight_writer_t *w, unsigned char *copy, size_t len);
static int run_end(flight_writer_t *w, int status);
static void run_release(flight_writer_t *w);
static int run_state(const flight_writer_t *w);
static shard_t *run_shard(const run_t *R);
static unsigned run_readers(flight_writer_t *w);
static shard_t *reader_shard(const flight_reader_t *r);
static unsigned *reader_waiters(flight_reader_t *r);
static void reader_cond_init(flight_reader_t *r);
static uint64_t reader_ev_seq(const flight_reader_t *r);
static int rr_poll(rreader_t *rr, post_t *p);
static int rr_meta_poll(rreader_t *rr, post_t *p);
static bool rr_meta_stage(const rreader_t *rr);
static const void *rr_meta_blob(const rreader_t *rr, size_t *len);
static const unsigned char *
rr_avail(rreader_t *rr, size_t *len, coalesce_buf_t **owner);
static void rr_advance(rreader_t *rr, size_t n);
static void rr_teardown(rreader_t *rr, post_t *p);

/* --- Segments ------------------------------------------------------------- */

static void seg_unref(shard_t *sh, seg_t *s, post_t *p)
{
    while (s && --s->refs == 0) {
        seg_t *next = s->next;
        s->next = NULL;
        if (!s->embedded) {
            sh->st.segments_held--;
            sh->st.bytes_held -= s->len;
            s->next = p->dead;
            p->dead = s;
        }
        s = next;
    }
}

static void segs_free(seg_t *s)
{
    while (s) {
        seg_t *next = s->next;
        coalesce_buf_unref(s->buf);
        coalesce__free(s);
        s = next;
    }
}

/* --- Hash table ----------------------------------------------------------- */

static size_t bucket_of(const shard_t *sh, uint64_t h)
{
    return (size_t)(h >> 32) & sh->mask;
}

static hent_t *
table_find(shard_t *sh, uint64_t h, const void *key, size_t len, bool range)
{
    for (hent_t *e = sh->buckets[bucket_of(sh, h)]; e; e = e->hnext)
        if (e->hash == h && e->keylen == len && e->range == range &&
            memcmp(e->key, key, len) == 0)
            return e;
    return NULL;
}

static void table_grow(shard_t *sh)
{
    size_t n = (sh->mask + 1) * 2;
    hent_t **nb = coalesce__calloc(n, sizeof(*nb));
    if (!nb)
        return; /* Longer chains, still correct. */
    size_t omask = sh->mask;
    hent_t **ob = sh->buckets;
    sh->buckets = nb;
    sh->mask = n - 1;
    for (size_t i = 0; i <= omask; i++) {
        for (hent_t *e = ob[i], *next; e; e = next) {
            next = e->hnext;
            size_t b = bucket_of(sh, e->hash);
            e->hnext = nb[b];
            nb[b] = e;
        }
    }
    coalesce__free(ob);
}

static void table_insert(shard_t *sh, hent_t *e)
{
    size_t b = bucket_of(sh, e->hash);
    e->hnext = sh->buckets[b];
    sh->buckets[b] = e;
    e->registered = true;
    if (++sh->count > sh->mask + 1)
        table_grow(sh);
}

static void table_remove(shard_t *sh, hent_t *e)
{
    if (!e->registered)
        return;
    hent_t **pp = &sh->buckets[bucket_of(sh, e->hash)];
    while (*pp != e)
        pp = &(*pp)->hnext;
    *pp = e->hnext;
    e->hnext = NULL;
    e->registered = false;
    sh->count--;
}

/* --- Flights -------------------------------------------------------------- */

static void ensure_cond(flight_t *f)
{
    if (!f->cond_ready) {
        pthread_cond_init(&f->cond, &f->g->cattr);
        f->cond_ready = true;
    }
}

static void reader_link(flight_t *f,
                        flight_reader_t *r,
                        bool leader,
                        bool embedded,
                        rreader_t *parent)
{
    /* Every field, explicitly: cheaper than clearing the whole struct. */
    r->f = f;
    r->seg = &f->head;
    f->head.refs++;
    r->pos = 0;
    r->off = 0;
    r->peeked = 0;
    r->pin = NULL;
    r->status = 0;
    r->deadline = 0;
    r->cb = NULL;
    r->cb_data = NULL;
    r->notifying = 0;
    atomic_init(&r->in_cb, 0);
    atomic_init(&r->closed, false);
    r->close_pending = false;
    atomic_init(&r->closer_waiting, false);
    r->arm_seq = 0;
    r->meta_seen = false;
    r->attached = true;
    r->leader = leader;
    r->embedded = embedded;
    r->range = false;
    r->parent = parent;
    r->qnext = NULL;
    r->prev = NULL;
    r->next = f->readers;
    if (f->readers)
        f->readers->prev = r;
    f->readers = r;
    f->nreaders++;
    f->refs++;
    if (!parent) /* A range reader counts once, not per chunk. */
        f->sh->st.readers_open++;
}

static void reader_unlink(flight_t *f, flight_reader_t *r)
{
    if (r->prev)
        r->prev->next = r->next;
    else
        f->readers = r->next;
    if (r->next)
        r->next->prev = r->prev;
    r->prev = r->next = NULL;
    if (!r->parent)
        f->sh->st.readers_open--;
}

static flight_t *flight_new(shard_t *sh,
                            flight_group_t *g,
                            uint64_t h,
                            const void *key,
                            size_t keylen,
                            bool with_leader)
{
    unsigned char *kmem = NULL;
    if (keylen > KEY_INLINE && !(kmem = coalesce__malloc(keylen)))
        return NULL;
    flight_t *f = sh->pool;
    if (f) {
        sh->pool = (flight_t *)f->e.hnext;
        sh->npool--;
    } else if (!(f = coalesce__malloc(sizeof(*f)))) {
        coalesce__free(kmem);
        return NULL;
    }
    f->e.hnext = NULL;
    f->e.hash = h;
    f->e.key = kmem ? kmem : f->keybuf;
    if (keylen)
        memcpy(f->e.key, key, keylen);
    f->e.keylen = keylen;
    f->e.registered = false;
    f->e.range = false;
    f->g = g;
    f->sh = sh;
    f->refs = 1; /* The table's; the leader's reader adds its own. */
    f->nreaders = 0;
    f->waiters = 0;
    f->status = 0;
    f->ended = false;
    f->chunk = false;
    f->base = 0;
    f->clen = 0;
    f->canceled = false;
    f->fetching = true;
    f->meta_set = false;
    f->meta_stage = false;
    f->head_held = true;
    f->cond_ready = false;
    f->orphan_counted = false;
    f->written = 0;
    f->fetch_written = 0;
    f->ev_seq = 0;
    f->meta = NULL;
    f->metalen = 0;
    /* The head is retained for joiners and referenced by the tail. */
    f->head = (seg_t){.refs = 2, .embedded = true};
    f->tail = &f->head;
    f->readers = NULL;
    f->w.f = f;
    f->w.run = NULL;
    f->w.ended = false;
    f->w.released = false;
    if (with_leader)
        reader_link(f, &f->lr, true, true, NULL);
    return f;
}

/* Last reference gone: recycle. Returns true if the group needs an unref
 * (it was closed while this flight was alive). */
static bool flight_unref(flight_t *f)
{
    if (--f->refs)
        return false;
    shard_t *sh = f->sh;
    if (f->cond_ready)
        pthread_cond_destroy(&f->cond);
    if (f->e.key != f->keybuf)
        coalesce__free(f->e.key);
    coalesce__free(f->meta);
    if (sh->npool < POOL_MAX) {
        f->e.hnext = sh->pool ? &sh->pool->e : NULL;
        sh->pool = f;
        sh->npool++;
    } else {
        coalesce__free(f);
    }
    sh->live--;
    return sh->closing;
}

/*
 * Collect armed readers' callbacks; wake blocked readers. Only armings older
 * than this event fire: a reader that re-arms while the callbacks run has
 * seen the event, so later passes over a long list cannot loop on it.
 */
static void wake(flight_t *f, notes_t *nl)
{
    if (f->waiters)
        pthread_cond_broadcast(&f->cond);
    if (!nl->seq)
        nl->seq = ++f->ev_seq;
    for (flight_reader_t *r = f->readers; r; r = r->next) {
        if (!r->cb || r->arm_seq >= nl->seq || r == nl->self)
            continue;
        if (nl->n == NOTE_BATCH) {
            nl->more = true;
            break;
        }
        nl->v[nl->n++] = (note_t){r, r->cb, r->cb_data};
        r->cb = NULL;
        r->notifying++;
    }
    if (nl->n && !nl->hold && !nl->ohold) { /* One hold is enough. */
        nl->hold = f;
        f->refs++;
    }
}

static void end_locked(flight_t *f, int status, post_t *p);

/* A reader stops receiving (detached or closed). When none is left before
 * the end, the writer is told: readers count 0, and with the CANCEL policy
 * the flight ends. */
static void reader_gone(flight_t *f, flight_reader_t *r, post_t *p)
{
    if (!r->attached)
        return;
    r->attached = false;
    if (--f->nreaders || f->ended || f->chunk)
        return; /* A range fetch counts its readers itself. */
    if (!f->orphan_counted)
        f->sh->st.orphaned++;
    f->orphan_counted = true;
    if (f->g->orphan_policy == FLIGHT_ORPHAN_CANCEL) {
        f->canceled = true;
        end_locked(f, FLIGHT_ECANCELED, p);
    }
}

static void detach(flight_t *f, flight_reader_t *r, int status, post_t *p)
{
    r->status = status;
    reader_gone(f, r, p);
    if (r->seg) {
        if (r->peeked && r->seg->buf)
            r->pin = coalesce_buf_ref(r->seg->buf);
        seg_unref(f->sh, r->seg, p);
        r->seg = NULL;
    }
}

static void end_locked(flight_t *f, int status, post_t *p)
{
    shard_t *sh = f->sh;
    f->ended = true;
    f->status = status;
    f->meta_stage = true;
    unregister(f, p); /* Callers hold a reference: f stays. */
    if (status < 0 && !f->chunk)
        sh->st.errors++;
    sh->st.flights_active--;
    if (f->tail) {
        seg_unref(sh, f->tail, p);
        f->tail = NULL;
    }
    if (f->head_held) {
        f->head_held = false;
        seg_unref(sh, &f->head, p);
    }
    wake(f, &p->notes);
}

/* The table's reference goes with registration. */
static void unregister(flight_t *f, post_t *p)
{
    if (!f->e.registered)
        return;
    table_remove(f->sh, &f->e);
    flight_group_t *g = f->g;
    if (flight_unref(f))
        post_owe(p, g);
}

/* --- Post-lock work ------------------------------------------------------- */

static void reader_free_final(flight_reader_t *r, post_t *p)
{
    if (r->range) {
        rr_free_final((rreader_t *)r, p);
        return;
    }
    flight_t *f = r->f;
    shard_t *sh = f->sh;
    bool embedded = r->embedded;
    flight_group_t *g = f->g;
    if (flight_unref(f))
        post_owe(p, g);
    if (embedded)
        return;
    if (sh->nrpool < POOL_MAX) {
        r->next = sh->rpool;
        sh->rpool = r;
        sh->nrpool++;
    } else {
        p->free_reader = r;
    }
}

static void notes_call(shard_t *sh, notes_t *nl)
{
    for (size_t i = 0; i < nl->n; i++) {
        flight_reader_t *r = nl->v[i].r;
        /* Paired with reader close: either we see closed, or it sees us. */
        atomic_fetch_add(&r->in_cb, 1);
        if (!atomic_load(&r->closed)) {
            flight_reader_t *saved = notify_current;
            notify_current = r;
            nl->v[i].cb(r, nl->v[i].data);
            notify_current = saved;
        }
        atomic_fetch_sub(&r->in_cb, 1);
        /* A close waiting for this callback need not wait for the batch. */
        if (atomic_load(&r->closer_waiting)) {
            pthread_mutex_lock(&sh->mu);
            pthread_cond_broadcast(reader_cond(r));
            pthread_mutex_unlock(&sh->mu);
        }
    }
}

/*
 * Runs after the shard lock is released: notify callbacks (in passes, each
 * followed by a short locked section to release the readers), then frees.
 */
static void post_run_slow(shard_t *sh, post_t *p)
{
    notes_t *nl = &p->notes;
    while (nl->n) {
        notes_call(sh, nl);
        pthread_mutex_lock(&sh->mu);
        for (size_t i = 0; i < nl->n; i++) {
            flight_reader_t *r = nl->v[i].r;
            r->notifying--;
            if (r->close_pending && !r->notifying) {
                post_t q;
                post_init(&q);
                reader_free_final(r, &q);
                /* The hold keeps the flight, so no group unref here. */
                if (q.free_reader)
                    coalesce__free(q.free_reader);
            }
        }
        flight_t *f = nl->hold;
        robj_t *o = nl->ohold;
        bool more = nl->more;
        nl->n = 0;
        nl->more = false;
        nl->hold = NULL;
        nl->ohold = NULL;
        if (more && f)
            wake(f, nl); /* May take a new hold. */
        else if (more)
            wake_obj(o, nl);
        if (f) {
            flight_group_t *g = f->g;
            if (flight_unref(f))
                post_owe(p, g);
        } else {
            robj_unref(o, p);
        }
        pthread_mutex_unlock(&sh->mu);
    }
    segs_free(p->dead);
    coalesce_buf_unref(p->pin);
    coalesce__free(p->free_reader);
    while (p->unrefs_owed--)
        group_unref(p->unref_group);
}

/* --- Group ---------------------------------------------------------------- */

void flight_opts_init(flight_opts_t *o)
{
    if (!o)
        return;
    memset(o, 0, sizeof(*o));
    o->size = sizeof(*o);
    o->max_lag = DEFAULT_MAX_LAG;
    o->retain_limit = DEFAULT_RETAIN;
    o->wait_timeout_ms = 0;
    o->shards = DEFAULT_SHARDS;
    o->orphan_policy = FLIGHT_ORPHAN_CONTINUE;
    o->chunk_size = DEFAULT_CHUNK;
    o->range_linger_ms = 0;
    o->range_max_gap = 0;
    o->range_max_span = DEFAULT_SPAN;
}

static uint64_t random_seed(const void *salt)
{
    uint64_t seed;
    if (getrandom(&seed, sizeof(seed), GRND_NONBLOCK) == (ssize_t)sizeof(seed))
        return seed;
    /* No entropy yet (early boot): still unpredictable enough per process. */
    return XXH3_64bits_withSeed(&salt, sizeof(salt),
                                (uint64_t)coalesce__now_ns());
}

static void group_free(flight_group_t *g)
{
    for (unsigned i = 0; i < g->nshards; i++) {
        shard_t *sh = &g->shards[i];
        while (sh->pool) {
            flight_t *f = sh->pool;
            sh->pool = (flight_t *)f->e.hnext;
            coalesce__free(f);
        }
        while (sh->rpool) {
            flight_reader_t *r = sh->rpool;
            sh->rpool = r->next;
            coalesce__free(r);
        }
        coalesce__free(sh->buckets);
        pthread_mutex_destroy(&sh->mu);
    }
    pthread_condattr_destroy(&g->cattr);
    coalesce__free(g->shards); /* NULL-safe. */
    coalesce__free(g);
}

static void group_unref(flight_group_t *g)
{
    if (atomic_fetch_sub(&g->pending, 1) == 1)
        group_free(g);
}

int flight_group_new(flight_group_t **out, const flight_opts_t *opts)
{
    flight_opts_t o;
    flight_opts_init(&o);
    if (!out)
        return COALESCE_EINVAL;
    if (opts) {
        /* One layout so far; older sizes will be accepted as they appear. */
        if (opts->size != sizeof(o))
            return COALESCE_EINVAL;
        memcpy(&o, opts, opts->size);
    }
    if (o.orphan_policy != FLIGHT_ORPHAN_CONTINUE &&
        o.orphan_policy != FLIGHT_ORPHAN_CANCEL)
        return COALESCE_EINVAL;
    if (!o.max_lag)
        o.max_lag = DEFAULT_MAX_LAG;
    if (!o.retain_limit)
        o.retain_limit = DEFAULT_RETAIN;
    if (o.retain_limit > o.max_lag)
        o.retain_limit = o.max_lag;
    if (!o.chunk_size)
        o.chunk_size = DEFAULT_CHUNK;
    if (!o.range_max_span)
        o.range_max_span = DEFAULT_SPAN;
    unsigned n = o.shards ? o.shards : DEFAULT_SHARDS;
    if (n > SHARDS_MAX)
        n = SHARDS_MAX;
    unsigned shards = 1;
    while (shards < n)
        shards <<= 1;

    flight_group_t *g = coalesce__calloc(1, sizeof(*g));
    if (!g)
        return COALESCE_ENOMEM;
    pthread_condattr_init(&g->cattr);
    pthread_condattr_setclock(&g->cattr, CLOCK_MONOTONIC);
    g->shards = coalesce__calloc(shards, sizeof(shard_t));
    if (!g->shards) {
        group_free(g);
        return COALESCE_ENOMEM;
    }
    for (unsigned i = 0; i < shards; i++) {
        shard_t *sh = &g->shards[i];
        sh->buckets = coalesce__calloc(BUCKETS_MIN, sizeof(hent_t *));
        if (!sh->buckets)
            break;
        sh->mask = BUCKETS_MIN - 1;
        pthread_mutex_init(&sh->mu, NULL);
        g->nshards = i + 1; /* Shards group_free() must tear down. */
    }
    if (g->nshards < shards) {
        group_free(g);
        return COALESCE_ENOMEM;
    }
    atomic_init(&g->pending, 1);
    g->seed = random_seed(g);
    g->max_lag = o.max_lag;
    g->retain = o.retain_limit;
    g->wait_ns = (int64_t)o.wait_timeout_ms * 1000000;
    g->linger_ns = (int64_t)o.range_linger_ms * 1000000;
    g->chunk = o.chunk_size;
    g->max_gap = o.range_max_gap;
    g->max_span = o.range_max_span;
    g->orphan_policy = o.orphan_policy;
    *out = g;
    return 0;
}

void flight_group_close(flight_group_t *g)
{
    if (!g)
        return;
    for (unsigned i = 0; i < g->nshards; i++) {
        shard_t *sh = &g->shards[i];
        pthread_mutex_lock(&sh->mu);
        sh->closing = true;
        atomic_fetch_add(&g->pending, sh->live);
        pthread_mutex_unlock(&sh->mu);
    }
    group_unref(g);
}

void flight_group_set_data(flight_group_t *g, void *data)
{
    if (g)
        g->data = data;
}

void *flight_group_get_data(const flight_group_t *g)
{
    return g ? g->data : NULL;
}

int flight_group_stats(flight_group_t *g, flight_stats_t *out, size_t size)
{
    if (!g || !out)
        return COALESCE_EINVAL;
    flight_stats_t sum;
    memset(&sum, 0, sizeof(sum));
    for (unsigned i = 0; i < g->nshards; i++) {
        shard_t *sh = &g->shards[i];
        pthread_mutex_lock(&sh->mu);
        sum.flights_started += sh->st.flights_started;
        sum.joins += sh->st.joins;
        sum.timeouts += sh->st.timeouts;
        sum.errors += sh->st.errors;
        sum.lagged += sh->st.lagged;
        sum.bytes_written += sh->st.bytes_written;
        sum.bytes_delivered += sh->st.bytes_delivered;
        sum.flights_active += sh->st.flights_active;
        sum.readers_open += sh->st.readers_open;
        sum.segments_held += sh->st.segments_held;
        sum.bytes_held += sh->st.bytes_held;
        sum.orphaned += sh->st.orphaned;
        sum.range_fetches += sh->st.range_fetches;
        sum.chunk_joins += sh->st.chunk_joins;
        sum.range_bytes_requested += sh->st.range_bytes_requested;
        sum.range_bytes_fetched += sh->st.range_bytes_fetched;
        sum.range_mismatches += sh->st.range_mismatches;
        pthread_mutex_unlock(&sh->mu);
    }
    memcpy(out, &sum, size < sizeof(sum) ? size : sizeof(sum));
    return 0;
}

/* Codes a reader uses for a live stream cannot end one: EOF means a clean
 * end, and EAGAIN ("nothing yet") would leave every reader waiting. */
static int end_status(int status)
{
    if (status == COALESCE_EOF)
        return 0;
    if (status == COALESCE_EAGAIN)
        return COALESCE_EUPSTREAM;
    return status;
}

/* --- flight_do --------------------------------------------------------------
 */

/*
 * The callback returned: settle the writer according to its answer. During
 * the callback the writer holds no reference of its own: the leader's reader,
 * not yet handed out, keeps the flight alive.
 */
static void fetch_returned(flight_t *f, int rc)
{
    if (rc == FLIGHT_FETCH_DONE && f->w.ended) {
        /* The common synchronous case needs no lock: the stream has ended,
         * so no write can read these fields any more. */
        f->fetching = false;
        return;
    }
    shard_t *sh = f->sh;
    post_t p;
    post_init(&p);
    pthread_mutex_lock(&sh->mu);
    f->fetching = false;
    f->fetch_written = f->written;
    if (rc == FLIGHT_FETCH_ASYNC) {
        /* The writer's reference, until flight_writer_release(), unless it
         * was released already (from another thread, or by the callback). */
        if (!f->w.released)
            f->refs++;
    } else if (!f->ended) {
        end_locked(f,
                   rc < 0                    ? end_status(rc)
                   : rc == FLIGHT_FETCH_DONE ? COALESCE_EUPSTREAM
                                             : COALESCE_EINVAL,
                   &p);
    }
    pthread_mutex_unlock(&sh->mu);
    post_run(sh, &p);
}

int flight_do(flight_group_t *g,
              const void *key,
              size_t keylen,
              flight_fetch_cb fetch,
              void *data,
              flight_reader_t **out)
{
    if (!g || !key || !keylen || keylen > KEY_MAX || !fetch || !out)
        return COALESCE_EINVAL;
    uint64_t h = XXH3_64bits_withSeed(key, keylen, g->seed);
    shard_t *sh = &g->shards[h & (g->nshards - 1)];

    pthread_mutex_lock(&sh->mu);
    if (sh->closing) {
        pthread_mutex_unlock(&sh->mu);
        return COALESCE_ECLOSING;
    }
    flight_t *f = (flight_t *)table_find(sh, h, key, keylen, false);
    if (f) {
        flight_reader_t *r = sh->rpool;
        if (r) {
            sh->rpool = r->next;
            sh->nrpool--;
        } else {
            r = coalesce__malloc(sizeof(*r));
        }
        if (!r) {
            pthread_mutex_unlock(&sh->mu);
            return COALESCE_ENOMEM;
        }
        reader_link(f, r, false, false, NULL);
        if (g->wait_ns && !f->meta_stage)
            r->deadline = coalesce__now_ns() + g->wait_ns;
        sh->st.joins++;
        pthread_mutex_unlock(&sh->mu);
        *out = r;
        return 0;
    }
    f = flight_new(sh, g, h, key, keylen, true);
    if (!f) {
        pthread_mutex_unlock(&sh->mu);
        return COALESCE_ENOMEM;
    }
    table_insert(sh, &f->e);
    sh->st.flights_started++;
    sh->st.flights_active++;
    sh->live++;
    pthread_mutex_unlock(&sh->mu);

    fetch_returned(f, fetch(&f->w, data));
    *out = &f->lr;
    return 0;
}

/* --- Writer -----------------------------------------------------------------
 */

static int writer_state(const flight_writer_t *w)
{
    if (w->f->canceled)
        return FLIGHT_ECANCELED;
    if (w->ended || w->f->ended)
        return COALESCE_EINVAL;
    return 0;
}

int flight_set_meta(flight_writer_t *w, const void *meta, size_t len)
{
    if (!w || (!meta && len))
        return COALESCE_EINVAL;
    unsigned char *copy = coalesce__malloc(len);
    if (!copy)
        return COALESCE_ENOMEM;
    if (len)
        memcpy(copy, meta, len);
    if (w->run)
        return run_set_meta(w, copy, len);
    flight_t *f = w->f;
    shard_t *sh = f->sh;
    post_t p;
    post_init(&p);
    pthread_mutex_lock(&sh->mu);
    int rc = writer_state(w);
    if (!rc && (f->meta_set || f->written))
        rc = COALESCE_EINVAL;
    if (!rc) {
        f->meta = copy;
        f->metalen = len;
        f->meta_set = true;
        f->meta_stage = true;
        copy = NULL;
        wake(f, &p.notes);
    }
    pthread_mutex_unlock(&sh->mu);
    coalesce__free(copy);
    post_run(sh, &p);
    return rc;
}

/* Link segment s at the flight's tail; lag and retention follow. The
 * caller wakes readers. */
static void append_locked(flight_t *f, seg_t *s, post_t *p)
{
    shard_t *sh = f->sh;
    flight_group_t *g = f->g;
    size_t len = s->len;
    /* The new segment is referenced by its predecessor's link and by the
     * tail; the old tail loses the tail's reference. */
    f->tail->next = s;
    seg_unref(sh, f->tail, p);
    f->tail = s;
    f->written += len;
    f->meta_stage = true;
    sh->st.segments_held++;
    sh->st.bytes_held += len;
    if (f->chunk) {
        /* A chunk keeps its head until it ends: it is at most chunk_size. */
        if (g->max_lag != FLIGHT_UNLIMITED)
            chunk_lag(f, f->base + f->written - len, p);
        return;
    }
    sh->st.bytes_written += len;
    if (f->head_held && f->written > g->retain) {
        /* Byte 0 goes: late joiners would miss it, so stop admitting them. */
        f->head_held = false;
        seg_unref(sh, &f->head, p);
        unregister(f, p);
    }
    if (g->max_lag != FLIGHT_UNLIMITED && f->written - len > g->max_lag) {
        /* Lag is counted up to the start of this write, so one large write
         * detaches nobody who had caught up. The leader's reader cannot read
         * while its callback produces the body: it is exempt meanwhile, and
         * afterwards allowed that backlog on top of max_lag. */
        uint64_t start = f->written - len;
        for (flight_reader_t *r = f->readers; r; r = r->next) {
            if (r->status || start - r->off <= g->max_lag)
                continue;
            if (r->leader && (f->fetching ||
                              start - r->off - g->max_lag <= f->fetch_written))
                continue;
            detach(f, r, FLIGHT_ELAGGED, p);
            sh->st.lagged++;
        }
    }
}

static int run_append(flight_writer_t *w,
                      coalesce_buf_t *buf,
                      const unsigned char *data,
                      size_t len);

/* Append a segment over [data, data + len) of buf (the segment adopts the
 * caller's reference on success). */
static int append(flight_writer_t *w,
                  coalesce_buf_t *buf,
                  const unsigned char *data,
                  size_t len)
{
    if (w->run)
        return run_append(w, buf, data, len);
    seg_t *s = coalesce__malloc(sizeof(*s));
    if (!s)
        return COALESCE_ENOMEM;
    *s = (seg_t){.buf = buf, .data = data, .len = len, .refs = 2};
    flight_t *f = w->f;
    shard_t *sh = f->sh;
    post_t p;
    post_init(&p);

    pthread_mutex_lock(&sh->mu);
    int rc = writer_state(w);
    if (rc) {
        pthread_mutex_unlock(&sh->mu);
        coalesce__free(s);
        return rc;
    }
    append_locked(f, s, &p);
    wake(f, &p.notes);
    pthread_mutex_unlock(&sh->mu);
    post_run(sh, &p);
    return 0;
}

int flight_write(flight_writer_t *w, const void *data, size_t len)
{
    if (!w || (!data && len))
        return COALESCE_EINVAL;
    if (!len) {
        shard_t *sh = w->f ? w->f->sh : run_shard(w->run);
        pthread_mutex_lock(&sh->mu);
        int rc = w->f ? writer_state(w) : run_state(w);
        pthread_mutex_unlock(&sh->mu);
        return rc;
    }
    coalesce_buf_t *b;
    if (coalesce__buf_new_copy(&b, data, len))
        return COALESCE_ENOMEM;
    int rc = append(w, b, coalesce_buf_data(b), len);
    if (rc)
        coalesce_buf_unref(b);
    return rc;
}

int flight_write_buf(flight_writer_t *w,
                     coalesce_buf_t *buf,
                     size_t off,
                     size_t len)
{
    if (!w || !buf || off > coalesce_buf_len(buf) ||
        len > coalesce_buf_len(buf) - off)
        return COALESCE_EINVAL;
    if (!len)
        return flight_write(w, NULL, 0);
    coalesce_buf_ref(buf);
    int rc = append(w, buf, (const unsigned char *)coalesce_buf_data(buf) + off,
                    len);
    if (rc)
        coalesce_buf_unref(buf);
    else
        coalesce__buf_publish(buf); /* Only the creator reads the mark. */
    return rc;
}

int flight_end(flight_writer_t *w, int status)
{
    if (!w || status > 0)
        return COALESCE_EINVAL;
    status = end_status(status);
    if (w->run)
        return run_end(w, status);
    flight_t *f = w->f;
    shard_t *sh = f->sh;
    post_t p;
    post_init(&p);
    pthread_mutex_lock(&sh->mu);
    int rc = writer_state(w);
    if (!rc)
        end_locked(f, status, &p);
    if (rc != COALESCE_EINVAL)
        w->ended = true;
    pthread_mutex_unlock(&sh->mu);
    post_run(sh, &p);
    return rc;
}

unsigned flight_writer_readers(flight_writer_t *w)
{
    if (!w)
        return 0;
    if (w->run)
        return run_readers(w);
    pthread_mutex_lock(&w->f->sh->mu);
    unsigned n = w->f->nreaders;
    pthread_mutex_unlock(&w->f->sh->mu);
    return n;
}

void flight_writer_release(flight_writer_t *w)
{
    if (!w)
        return;
    if (w->run) {
        run_release(w);
        return;
    }
    flight_t *f = w->f;
    shard_t *sh = f->sh;
    post_t p;
    post_init(&p);
    pthread_mutex_lock(&sh->mu);
    if (!f->ended)
        end_locked(f, COALESCE_EUPSTREAM, &p);
    w->ended = true;
    /* Inside the callback the writer owns no reference: fetch_returned()
     * settles it. */
    flight_group_t *g = f->g;
    if (f->fetching)
        w->released = true;
    else if (flight_unref(f))
        post_owe(&p, g);
    pthread_mutex_unlock(&sh->mu);
    post_run(sh, &p);
}

/* --- Reader -----------------------------------------------------------------
 */

/* Where the reader stands: 0 with bytes at its cursor, COALESCE_EAGAIN with
 * nothing yet, or its terminal status. */
static int reader_poll(flight_reader_t *r, post_t *p)
{
    flight_t *f = r->f;
    shard_t *sh = f->sh;
    if (r->status)
        return r->status;
    if (r->deadline && !f->meta_stage && coalesce__now_ns() >= r->deadline) {
        detach(f, r, FLIGHT_ETIMEDOUT, p);
        sh->st.timeouts++;
        return r->status;
    }
    seg_t *s = r->seg;
    while (r->pos == s->len && s->next) {
        seg_t *n = s->next;
        n->refs++;
        seg_unref(sh, s, p);
        r->seg = s = n;
        r->pos = 0;
    }
    if (r->pos < s->len)
        return 0;
    if (f->ended) {
        r->status = f->status ? f->status : COALESCE_EOF;
        seg_unref(sh, s, p);
        r->seg = NULL;
        return r->status;
    }
    return COALESCE_EAGAIN;
}

/* Meta readiness: 0 when known, else as reader_poll. */
static int meta_poll(flight_reader_t *r, post_t *p)
{
    flight_t *f = r->f;
    if (r->status == FLIGHT_ETIMEDOUT)
        return r->status;
    if (f->meta_stage) {
        if (!f->meta_set && !f->written && f->ended && f->status < 0)
            return f->status;
        return 0;
    }
    if (r->status)
        return r->status;
    if (r->deadline && coalesce__now_ns() >= r->deadline) {
        detach(f, r, FLIGHT_ETIMEDOUT, p);
        f->sh->st.timeouts++;
        return r->status;
    }
    return COALESCE_EAGAIN;
}

/* Object and range readers share the reading functions below; these pick
 * the kind's own parts. */
static bool meta_stage_of(flight_reader_t *r)
{
    return r->range ? rr_meta_stage((rreader_t *)r) : r->f->meta_stage;
}

static int poll_of(flight_reader_t *r, bool meta, post_t *p)
{
    if (r->range)
        return meta ? rr_meta_poll((rreader_t *)r, p)
                    : rr_poll((rreader_t *)r, p);
    return meta ? meta_poll(r, p) : reader_poll(r, p);
}

/* After a poll returned 0: the bytes at the cursor. */
static const unsigned char *
avail_of(flight_reader_t *r, size_t *len, coalesce_buf_t **owner)
{
    if (r->range)
        return rr_avail((rreader_t *)r, len, owner);
    seg_t *s = r->seg;
    *len = s->len - r->pos;
    if (owner)
        *owner = s->buf;
    return s->data + r->pos;
}

/* n bytes were delivered; a detached reader's cursor is gone. */
static void advance_of(flight_reader_t *r, size_t n)
{
    if (r->range) {
        rr_advance((rreader_t *)r, n);
        return;
    }
    r->off += n;
    r->f->sh->st.bytes_delivered += n;
    if (!r->status)
        r->pos += n;
}

/* Poll, waiting up to timeout_ms (< 0: forever) while there is nothing. */
static int reader_wait(flight_reader_t *r, int timeout_ms, bool meta, post_t *p)
{
    shard_t *sh = reader_shard(r);
    int64_t until = 0;
    if (timeout_ms > 0)
        until = coalesce__now_ns() + (int64_t)timeout_ms * 1000000;
    for (;;) {
        int rc = poll_of(r, meta, p);
        if (rc != COALESCE_EAGAIN || timeout_ms == 0)
            return rc;
        int64_t wake_at = until;
        if (r->deadline && !meta_stage_of(r) &&
            (!wake_at || r->deadline < wake_at))
            wake_at = r->deadline;
        if (until && coalesce__now_ns() >= until)
            return COALESCE_EAGAIN;
        reader_cond_init(r);
        unsigned *waiters = reader_waiters(r);
        (*waiters)++;
        if (wake_at) {
            struct timespec ts = {(time_t)(wake_at / 1000000000),
                                  (long)(wake_at % 1000000000)};
            pthread_cond_timedwait(reader_cond(r), &sh->mu, &ts);
        } else {
            pthread_cond_wait(reader_cond(r), &sh->mu);
        }
        (*waiters)--;
    }
}

/* Start of a peek or read: earlier loans end. */
static void reader_begin(flight_reader_t *r, post_t *p)
{
    p->pin = r->pin;
    r->pin = NULL;
    r->peeked = 0;
}

int flight_meta(flight_reader_t *r,
                int timeout_ms,
                const void **meta,
                size_t *len)
{
    if (!r)
        return COALESCE_EINVAL;
    shard_t *sh = reader_shard(r);
    post_t p;
    post_init(&p);
    p.notes.self = r; /* It learns from the return value. */
    pthread_mutex_lock(&sh->mu);
    int rc = reader_wait(r, timeout_ms, true, &p);
    /* The meta is immutable once set and lives as long as the reader. */
    size_t mlen = 0;
    const void *m = NULL;
    if (r->range) {
        m = rr_meta_blob((rreader_t *)r, &mlen);
    } else if (r->f->meta_set) {
        m = r->f->meta;
        mlen = r->f->metalen;
    }
    if (!rc)
        r->meta_seen = true;
    pthread_mutex_unlock(&sh->mu);
    post_run(sh, &p);
    if (!rc) {
        if (meta)
            *meta = m;
        if (len)
            *len = mlen;
    }
    return rc;
}

int flight_peek(flight_reader_t *r,
                int timeout_ms,
                const void **data,
                size_t *len,
                coalesce_buf_t **owner)
{
    if (!r || !data || !len)
        return COALESCE_EINVAL;
    shard_t *sh = reader_shard(r);
    post_t p;
    post_init(&p);
    p.notes.self = r; /* It learns from the return value. */
    pthread_mutex_lock(&sh->mu);
    reader_begin(r, &p);
    int rc = reader_wait(r, timeout_ms, false, &p);
    if (rc == COALESCE_EAGAIN && meta_stage_of(r))
        r->meta_seen = true; /* See flight_read(). */
    if (!rc) {
        r->meta_seen = true; /* Body bytes come after the meta stage. */
        *data = avail_of(r, len, owner);
        r->peeked = *len;
    }
    pthread_mutex_unlock(&sh->mu);
    post_run(sh, &p);
    return rc;
}

int flight_consume(flight_reader_t *r, size_t n)
{
    if (!r)
        return COALESCE_EINVAL;
    shard_t *sh = reader_shard(r);
    int rc = 0;
    pthread_mutex_lock(&sh->mu);
    if (n > r->peeked) {
        rc = COALESCE_EINVAL;
    } else if (r->status) {
        rc = r->status; /* Detached meanwhile; the loan stays pinned. */
    } else {
        r->peeked -= n;
        advance_of(r, n);
    }
    pthread_mutex_unlock(&sh->mu);
    return rc;
}

int flight_read(
    flight_reader_t *r, void *buf, size_t cap, int timeout_ms, size_t *nread)
{
    if (!r || !buf || !cap || !nread)
        return COALESCE_EINVAL;
    shard_t *sh = reader_shard(r);
    post_t p;
    post_init(&p);
    p.notes.self = r; /* It learns from the return value. */
    size_t total = 0;
    coalesce_buf_t *late_pin = NULL;
    pthread_mutex_lock(&sh->mu);
    reader_begin(r, &p);
    int rc = reader_wait(r, timeout_ms, false, &p);
    /* Body bytes come after the meta stage. A body read that found the
     * meta stage but no bytes has seen it too: otherwise a host that reads
     * only bodies would be told "ready" by every arming until bytes come. */
    if (!rc || (rc == COALESCE_EAGAIN && meta_stage_of(r)))
        r->meta_seen = true;
    while (!rc) {
        size_t n;
        const unsigned char *src = avail_of(r, &n, NULL);
        if (n > cap - total)
            n = cap - total;
        /* Copy outside the lock; the loan keeps the bytes alive. */
        r->peeked = n;
        pthread_mutex_unlock(&sh->mu);
        memcpy((unsigned char *)buf + total, src, n);
        pthread_mutex_lock(&sh->mu);
        r->peeked = 0;
        total += n;
        advance_of(r, n);
        if (r->status) {
            /* Detached while copying: the copied bytes count as read, and
             * the pin that kept them alive goes after the unlock. */
            late_pin = r->pin;
            r->pin = NULL;
            break;
        }
        if (total == cap)
            break;
        rc = poll_of(r, false, &p);
    }
    pthread_mutex_unlock(&sh->mu);
    coalesce_buf_unref(late_pin);
    post_run(sh, &p);
    *nread = total;
    return total ? 0 : rc;
}

int flight_reader_notify(flight_reader_t *r, flight_notify_cb cb, void *data)
{
    if (!r || !cb)
        return COALESCE_EINVAL;
    shard_t *sh = reader_shard(r);
    post_t p;
    post_init(&p);
    p.notes.self = r; /* It learns from the return value. */
    pthread_mutex_lock(&sh->mu);
    int rc = poll_of(r, false, &p);
    int ready = rc != COALESCE_EAGAIN || (meta_stage_of(r) && !r->meta_seen);
    /* A new arming replaces the old one; "ready" leaves nothing armed. */
    r->cb = ready ? NULL : cb;
    r->cb_data = data;
    r->arm_seq = reader_ev_seq(r);
    pthread_mutex_unlock(&sh->mu);
    post_run(sh, &p);
    return ready ? 1 : 0;
}

int64_t flight_reader_deadline_ms(flight_reader_t *r)
{
    if (!r)
        return -1;
    shard_t *sh = reader_shard(r);
    int64_t left = -1;
    pthread_mutex_lock(&sh->mu);
    if (r->deadline && !meta_stage_of(r) && !r->status) {
        int64_t ns = r->deadline - coalesce__now_ns();
        left = ns <= 0 ? 0 : (ns + 999999) / 1000000;
    }
    pthread_mutex_unlock(&sh->mu);
    return left;
}

uint64_t flight_reader_offset(const flight_reader_t *r)
{
    return r ? r->off : 0;
}

int flight_reader_shared(const flight_reader_t *r)
{
    return r && !r->leader;
}

void flight_reader_close(flight_reader_t *r)
{
    if (!r)
        return;
    shard_t *sh = reader_shard(r);
    post_t p;
    post_init(&p);
    pthread_mutex_lock(&sh->mu);
    r->cb = NULL;
    if (r->notifying) {
        /* A dispatch holds r. No callback may run after close returns,
         * except the one this thread may be inside of. The seq_cst
         * operations pair with notes_call(): either it sees closed, or we
         * see its callback running; and either it sees closer_waiting, or
         * we see in_cb drop. */
        atomic_store(&r->closed, true);
        unsigned self = notify_current == r;
        reader_cond_init(r);
        atomic_store(&r->closer_waiting, true);
        while (atomic_load(&r->in_cb) > self)
            pthread_cond_wait(reader_cond(r), &sh->mu);
        atomic_store(&r->closer_waiting, false);
    }
    if (r->range) {
        rr_teardown((rreader_t *)r, &p);
    } else {
        reader_gone(r->f, r, &p);
        reader_unlink(r->f, r);
        if (r->seg) {
            seg_unref(sh, r->seg, &p);
            r->seg = NULL;
        }
    }
    p.pin = r->pin;
    r->pin = NULL;
    if (r->notifying)
        r->close_pending = true; /* The dispatch frees it. */
    else
        reader_free_final(r, &p);
    pthread_mutex_unlock(&sh->mu);
    post_run(sh, &p);
}

/* --- Range flights -------------------------------------------------------
 *
 * A range object (robj_t) stands for one key's range flights; it lives in
 * the key's shard table while anything refers to it, and everything below
 * is guarded by that shard's lock. It remembers what fetches reported (the
 * object's size and validator) and keeps the fetches in flight (run_t) in a
 * list sorted by the chunks they still have to write: a run covers chunks
 * [a, b]; chunks before `cur` are written, so only [cur, b] is joinable.
 *
 * A range reader (rreader_t) is a list of pieces, one per run it reads
 * from, in object order. Chunks are materialised lazily: when a run's
 * writer reaches chunk k it creates a chunk flight (a flight_t without key)
 * and gives every piece waiting for k a cursor on it. So a fetch costs the
 * same whatever its length, and a reader holds cursors only on chunks that
 * are being written or wait to be read. Range readers block on the object's
 * condition variable and are notified by scanning the object's readers.
 */

#define CHUNK_OPEN UINT64_MAX /* A run or piece whose end is not known yet. */
#define OFFSET_LIMIT                                                           \
    (1ull << 63) /* Offsets and sizes stay below: no overflow. */

enum { RUN_LINGER, RUN_FETCH };

struct robj {
    hent_t e; /* First: a table entry. */
    shard_t *sh;
    flight_group_t *g;
    unsigned refs;    /* Runs, range readers, notify holds. */
    unsigned waiters; /* Threads blocked on cond. */
    bool cond_ready;
    bool vset;      /* validator is set (possibly empty). */
    uint64_t total; /* Object size, or FLIGHT_SIZE_UNKNOWN. */
    uint64_t gen;   /* Identity (size, validator) generation, from 1. */
    uint64_t seen;  /* One past the last byte replied in this identity. */
    uint64_t ev_seq;
    unsigned char *validator;
    size_t vlen;
    run_t *runs;          /* In flight, in chunk order. */
    flight_reader_t *rrs; /* Range readers' handles. */
    pthread_cond_t cond;
    unsigned char keybuf[KEY_INLINE];
};

struct run {
    struct flight_writer w; /* w.run == this. */
    run_t *prev, *next;     /* In obj->runs while listed. */
    robj_t *obj;
    rreader_t *leader;
    piece_t *pieces; /* Readers' pieces on this run. */
    flight_t *mq;    /* Materialised chunks not yet full, in order. */
    flight_t *mq_tail;
    uint64_t a, b; /* Chunk extent; b may be CHUNK_OPEN. */
    uint64_t cur;  /* First chunk not yet full. */
    uint64_t mat;  /* Next chunk to materialise. */
    uint64_t ask_first, ask_last;
    uint64_t rlast;  /* Reported last byte. */
    uint64_t expect; /* Body bytes reported. */
    uint64_t written;
    uint64_t gen;      /* The object's identity it was fetched with, */
    uint64_t total;    /* and the size known then. */
    unsigned refs;     /* Writer + pieces. */
    unsigned nreaders; /* Counted pieces: readers waiting for bytes. */
    int status;
    int state;
    bool listed, started, replied, ended, canceled, fetching, meta_set;
    bool orphan_counted;
    unsigned char *meta;
    size_t metalen;
};

struct piece {
    piece_t *rprev, *rnext; /* In run->pieces. */
    run_t *run;
    rreader_t *rr;
    uint64_t from, to;        /* Chunks; to may be CHUNK_OPEN. */
    flight_reader_t *qh, *qt; /* Chunk cursors, in chunk order. */
    bool counted;
};

struct rreader {
    flight_reader_t pub; /* First: the handle. pub.prev/next: obj->rrs. */
    robj_t *obj;
    uint64_t first, last; /* As asked; last may be FLIGHT_RANGE_END. */
    uint64_t pos;         /* Object offset of the next byte to deliver. */
    uint64_t gen;         /* Identity of its first chunk (0: not yet). */
    uint64_t total;       /* The size in that identity, as last seen. */
    uint64_t fetch_written;
    piece_t *pv;
    size_t np, cur; /* Pieces, and the one pos is in. */
    bool fetching;  /* Its flight_do_range() has not returned yet. */
    bool led;
    bool shared;
    bool counted; /* Its length went into range_bytes_requested. */
};

static void run_end_locked(run_t *R, int status, post_t *p);
static void rr_stop(rreader_t *rr, int status, post_t *p);
static void rr_sync(rreader_t *rr);

static pthread_cond_t *reader_cond(flight_reader_t *r)
{
    return r->range ? &((rreader_t *)r)->obj->cond : &r->f->cond;
}

static uint64_t chunk_end_byte(uint64_t k, uint64_t cs)
{
    /* Saturates: the last chunk of a 2^64 space cannot be expressed. */
    if (k > (UINT64_MAX - 1) / cs - 1)
        return UINT64_MAX - 1;
    return (k + 1) * cs - 1;
}

/* --- Range objects --- */

static void robj_unref(robj_t *o, post_t *p)
{
    if (--o->refs)
        return;
    shard_t *sh = o->sh;
    table_remove(sh, &o->e);
    if (o->cond_ready)
        pthread_cond_destroy(&o->cond);
    if (o->e.key != o->keybuf)
        coalesce__free(o->e.key);
    coalesce__free(o->validator);
    flight_group_t *g = o->g;
    coalesce__free(o);
    sh->live--;
    if (sh->closing)
        post_owe(p, g);
}

static robj_t *robj_get(
    shard_t *sh, flight_group_t *g, uint64_t h, const void *key, size_t keylen)
{
    robj_t *o = (robj_t *)table_find(sh, h, key, keylen, true);
    if (o)
        return o;
    if (!(o = coalesce__calloc(1, sizeof(*o))))
        return NULL;
    if (keylen > KEY_INLINE && !(o->e.key = coalesce__malloc(keylen))) {
        coalesce__free(o);
        return NULL;
    }
    if (!o->e.key)
        o->e.key = o->keybuf;
    memcpy(o->e.key, key, keylen);
    o->e.keylen = keylen;
    o->e.hash = h;
    o->e.range = true;
    o->sh = sh;
    o->g = g;
    o->total = FLIGHT_SIZE_UNKNOWN;
    o->gen = 1;
    table_insert(sh, &o->e);
    sh->live++;
    return o;
}

/* The size, if a fetch still in flight vouches for it; once none is, the
 * object may have changed, and the next reply says. */
static uint64_t robj_total(const robj_t *o)
{
    if (o->total == FLIGHT_SIZE_UNKNOWN)
        return o->total;
    for (const run_t *R = o->runs; R; R = R->next)
        if (R->replied && R->gen == o->gen)
            return o->total;
    return FLIGHT_SIZE_UNKNOWN;
}

static void robj_cond(robj_t *o)
{
    if (!o->cond_ready) {
        pthread_cond_init(&o->cond, &o->g->cattr);
        o->cond_ready = true;
    }
}

/* --- Runs --- */

static shard_t *run_shard(const run_t *R)
{
    return R->obj->sh;
}

static void run_unref(run_t *R, post_t *p)
{
    if (--R->refs)
        return;
    coalesce__free(R->meta);
    robj_t *o = R->obj;
    coalesce__free(R);
    robj_unref(o, p);
}

static void run_unlist(run_t *R)
{
    if (!R->listed)
        return;
    if (R->prev)
        R->prev->next = R->next;
    else
        R->obj->runs = R->next;
    if (R->next)
        R->next->prev = R->prev;
    R->prev = R->next = NULL;
    R->listed = false;
}

/* Insert before `before` (NULL: at the end). */
static void run_list_before(robj_t *o, run_t *R, run_t *before)
{
    R->listed = true;
    R->next = before;
    if (before) {
        R->prev = before->prev;
        before->prev = R;
    } else {
        run_t *t = o->runs;
        while (t && t->next)
            t = t->next;
        R->prev = t;
    }
    if (R->prev)
        R->prev->next = R;
    else
        o->runs = R;
}

static bool run_meta_stage(const run_t *R)
{
    return R->ended || R->written || (R->replied && R->meta_set);
}

/* Nothing more will be written for the run's pieces. */
static bool run_done(const run_t *R)
{
    return R->ended || (R->b != CHUNK_OPEN && R->cur > R->b);
}

static void piece_uncount(piece_t *pc, bool orphan_check, post_t *p)
{
    if (!pc->counted)
        return;
    pc->counted = false;
    run_t *R = pc->run;
    if (--R->nreaders || !orphan_check || run_done(R))
        return;
    shard_t *sh = R->obj->sh;
    if (!R->orphan_counted)
        sh->st.orphaned++;
    R->orphan_counted = true;
    if (R->obj->g->orphan_policy == FLIGHT_ORPHAN_CANCEL) {
        R->canceled = true;
        run_end_locked(R, FLIGHT_ECANCELED, p);
    }
}

static void run_end_locked(run_t *R, int status, post_t *p)
{
    if (R->ended)
        return;
    shard_t *sh = R->obj->sh;
    R->ended = true;
    R->status = status;
    run_unlist(R);
    if (status < 0)
        sh->st.errors++;
    /* Chunks not yet full will never be: a clean end here is a short body,
     * which flight_end() has turned into a mismatch already. */
    while (R->mq) {
        flight_t *f = R->mq;
        R->mq = (flight_t *)f->e.hnext;
        f->e.hnext = NULL;
        end_locked(f, status ? status : FLIGHT_EMISMATCH, p);
        flight_group_t *g = f->g;
        if (flight_unref(f))
            post_owe(p, g);
    }
    R->mq_tail = NULL;
    wake_obj(R->obj, &p->notes);
}

static flight_reader_t *reader_take(shard_t *sh)
{
    flight_reader_t *r = sh->rpool;
    if (r) {
        sh->rpool = r->next;
        sh->nrpool--;
        return r;
    }
    return coalesce__malloc(sizeof(*r));
}

static void reader_give(shard_t *sh, flight_reader_t *r)
{
    if (sh->nrpool < POOL_MAX) {
        r->next = sh->rpool;
        sh->rpool = r;
        sh->nrpool++;
    } else {
        coalesce__free(r);
    }
}

/* A chunk cursor goes (its range reader finished the chunk or stopped). */
static void cursor_drop(flight_reader_t *cr, post_t *p)
{
    flight_t *f = cr->f;
    reader_gone(f, cr, p);
    reader_unlink(f, cr);
    if (cr->seg) {
        seg_unref(f->sh, cr->seg, p);
        cr->seg = NULL;
    }
    /* Not reader_free_final(): one operation may drop many cursors. */
    shard_t *sh = f->sh;
    flight_group_t *g = f->g;
    if (flight_unref(f))
        post_owe(p, g);
    reader_give(sh, cr);
}

static bool piece_wants(const piece_t *pc, uint64_t k)
{
    return pc->from <= k && (pc->to == CHUNK_OPEN || k <= pc->to) &&
           !pc->rr->pub.status;
}

static void piece_push(piece_t *pc, flight_reader_t *cr)
{
    cr->qnext = NULL;
    if (pc->qt)
        pc->qt->qnext = cr;
    else
        pc->qh = cr;
    pc->qt = cr;
}

/* Create chunk R->mat and a cursor on it for every piece waiting for it. */
static int run_materialize(run_t *R)
{
    robj_t *o = R->obj;
    shard_t *sh = o->sh;
    flight_group_t *g = o->g;
    uint64_t k = R->mat, cs = g->chunk;
    unsigned need = 0;
    for (piece_t *pc = R->pieces; pc; pc = pc->rnext)
        need += piece_wants(pc, k);
    /* Take everything first, so that a failure changes nothing. */
    flight_reader_t *spare = NULL;
    for (unsigned i = 0; i < need; i++) {
        flight_reader_t *r = reader_take(sh);
        if (!r)
            goto nomem;
        r->next = spare;
        spare = r;
    }
    flight_t *f = flight_new(sh, g, 0, "", 0, false);
    if (!f)
        goto nomem;
    f->chunk = true;
    f->fetching = false;
    f->meta_stage = true;
    f->base = k * cs;
    uint64_t end = chunk_end_byte(k, cs);
    f->clen = (end < R->rlast ? end : R->rlast) - f->base + 1;
    sh->live++;
    if (sh->closing) /* The group counted what was alive when it closed. */
        atomic_fetch_add(&g->pending, 1);
    sh->st.flights_active++;
    for (piece_t *pc = R->pieces; pc; pc = pc->rnext) {
        if (!piece_wants(pc, k))
            continue;
        flight_reader_t *r = spare;
        spare = r->next;
        reader_link(f, r, false, false, pc->rr);
        piece_push(pc, r);
        if (pc->rr != R->leader)
            sh->st.chunk_joins++;
    }
    /* The run's reference (f->refs starts at 1) until the chunk is full. */
    f->e.hnext = NULL;
    if (R->mq_tail)
        R->mq_tail->e.hnext = &f->e;
    else
        R->mq = f;
    R->mq_tail = f;
    R->mat++;
    return 0;
nomem:
    while (spare) {
        flight_reader_t *r = spare;
        spare = r->next;
        reader_give(sh, r);
    }
    return COALESCE_ENOMEM;
}

/* The run's first unfinished chunk is full. */
static void chunk_full(run_t *R, post_t *p)
{
    flight_t *f = R->mq;
    R->mq = (flight_t *)f->e.hnext;
    f->e.hnext = NULL;
    if (!R->mq)
        R->mq_tail = NULL;
    end_locked(f, 0, p);
    flight_group_t *g = f->g;
    if (flight_unref(f))
        post_owe(p, g);
    uint64_t k = R->cur++;
    /* Pieces ending here need nothing more from the run; if they were the
     * last, the rest is orphaned. */
    bool done = run_done(R);
    for (piece_t *pc = R->pieces; pc; pc = pc->rnext)
        if (done || pc->to == k)
            piece_uncount(pc, !done, p);
    if (done)
        run_unlist(R);
}

/* A write into a chunk: a range reader too far behind it is detached. */
static void chunk_lag(flight_t *f, uint64_t start, post_t *p)
{
    flight_group_t *g = f->g;
    shard_t *sh = f->sh; /* Stopping the last reader may free f. */
    for (flight_reader_t *r = f->readers, *next; r; r = next) {
        next = r->next; /* rr_stop() unlinks r, never another of f's. */
        if (f->ended)
            break; /* A stop canceled the run: f may be gone. */
        rreader_t *rr = r->parent;
        if (rr->pub.status || start <= rr->pos || start - rr->pos <= g->max_lag)
            continue;
        /* A write past the reader's last byte (in its last chunk) is not
         * one it will read: it cannot make the reader lag. */
        if (rr->last != FLIGHT_RANGE_END && start > rr->last)
            continue;
        /* As for object flights: a leader cannot read while its callbacks
         * run, and is allowed that backlog afterwards. */
        if (rr->fetching ||
            (rr->led && start - rr->pos - g->max_lag <= rr->fetch_written))
            continue;
        rr_stop(rr, FLIGHT_ELAGGED, p);
        sh->st.lagged++;
    }
}

static int run_state(const flight_writer_t *w)
{
    if (w->run->canceled)
        return FLIGHT_ECANCELED;
    if (w->ended || w->run->ended)
        return COALESCE_EINVAL;
    return 0;
}

static int run_append(flight_writer_t *w,
                      coalesce_buf_t *buf,
                      const unsigned char *data,
                      size_t len)
{
    run_t *R = w->run;
    robj_t *o = R->obj;
    shard_t *sh = o->sh;
    uint64_t cs = o->g->chunk;
    /* Only this writer changes written and the reply, so they can be read
     * before the lock to size the allocation: one segment per chunk. */
    size_t nseg = 1;
    if (R->replied && len <= R->expect - R->written) {
        uint64_t at = R->ask_first + R->written;
        nseg = (size_t)((at + len - 1) / cs - at / cs + 1);
    }
    seg_t *segs = NULL;
    for (size_t i = 0; i < nseg; i++) {
        seg_t *s = coalesce__malloc(sizeof(*s));
        if (!s) {
            segs_free(segs);
            return COALESCE_ENOMEM;
        }
        s->buf = NULL;
        s->next = segs;
        segs = s;
    }
    post_t p;
    post_init(&p);
    pthread_mutex_lock(&sh->mu);
    int rc = run_state(w);
    if (!rc && !R->replied)
        rc = COALESCE_EINVAL;
    if (!rc && len > R->expect - R->written) {
        /* More than upstream announced: nothing after it can be trusted. */
        sh->st.range_mismatches++;
        run_end_locked(R, FLIGHT_EMISMATCH, &p);
        rc = FLIGHT_EMISMATCH;
    }
    uint64_t at = R->ask_first + R->written;
    uint64_t klast = rc ? 0 : (at + len - 1) / cs;
    while (!rc && R->mat <= klast)
        rc = run_materialize(R);
    if (rc) {
        pthread_mutex_unlock(&sh->mu);
        post_run(sh, &p);
        segs_free(segs);
        return rc;
    }
    /* One reference on buf per segment; the caller's becomes the first. */
    size_t off = 0;
    while (off < len) {
        flight_t *f = R->mq;
        size_t n = len - off;
        if (n > f->clen - f->written)
            n = (size_t)(f->clen - f->written);
        seg_t *s = segs;
        segs = s->next;
        if (off)
            coalesce_buf_ref(buf);
        *s = (seg_t){.buf = buf, .data = data + off, .len = n, .refs = 2};
        append_locked(f, s, &p);
        off += n;
        R->written += n;
        sh->st.range_bytes_fetched += n;
        if (!R->ended && f->written == f->clen)
            chunk_full(R, &p);
        if (R->ended)
            break; /* The last reader left (lag, or its chunks are done)
                    * and the policy is CANCEL: as for object flights, the
                    * next call says so. */
    }
    /* The call succeeds, so all len bytes count as fetched, as an object
     * flight's write does; those past the cancel are just not kept. */
    sh->st.range_bytes_fetched += len - off;
    wake_obj(o, &p.notes);
    pthread_mutex_unlock(&sh->mu);
    post_run(sh, &p);
    segs_free(segs); /* Any left over. */
    return 0;
}

/*
 * The reply against the request and the object; sets the run's extent.
 * A reply must first agree with itself and the request: one that does not
 * changes nothing (the object's identity included). The identity (size,
 * validator) binds while another fetch that reported one is in flight: a
 * reply that differs then fails. With none in flight the object may well
 * have changed since, so the reply defines a new identity; readers that
 * straddle the two fail on their own (rr_poll).
 */
static int run_check_reply(run_t *R,
                           uint64_t first,
                           uint64_t last,
                           uint64_t total,
                           const unsigned char *v,
                           size_t vlen)
{
    robj_t *o = R->obj;
    uint64_t t = total;
    if (first != FLIGHT_RANGE_END) {
        if (first != R->ask_first ||
            (R->ask_last != FLIGHT_RANGE_END && last > R->ask_last))
            return FLIGHT_EMISMATCH;
        if (t == FLIGHT_SIZE_UNKNOWN &&
            (R->ask_last == FLIGHT_RANGE_END || last < R->ask_last))
            t = last + 1; /* Upstream stopped early: that is the end. */
        if (t != FLIGHT_SIZE_UNKNOWN &&
            (last >= t || last != (R->ask_last < t - 1 ? R->ask_last : t - 1)))
            return FLIGHT_EMISMATCH; /* Short, or past its own end. */
    } else if (t == FLIGHT_SIZE_UNKNOWN || R->ask_first < t) {
        return FLIGHT_EMISMATCH; /* A 416 must put the end at or before
                                  * the start asked for. */
    }
    bool differs = (o->vset && (vlen != o->vlen ||
                                (vlen && memcmp(v, o->validator, vlen)))) ||
                   (t != FLIGHT_SIZE_UNKNOWN &&
                    o->total != FLIGHT_SIZE_UNKNOWN && t != o->total) ||
                   /* Bytes past the known end, size not given: bigger. */
                   (first != FLIGHT_RANGE_END &&
                    o->total != FLIGHT_SIZE_UNKNOWN && last >= o->total) ||
                   /* Smaller than bytes other replies had. */
                   (t != FLIGHT_SIZE_UNKNOWN && t < o->seen);
    if (differs) {
        for (const run_t *X = o->runs; X; X = X->next)
            if (X != R && X->replied)
                return FLIGHT_EMISMATCH; /* Another version in flight. */
        /* Readers of the old version keep its size (rr_total), even those
         * that have not looked since it was learnt. */
        for (flight_reader_t *r = o->rrs; r; r = r->next)
            rr_sync((rreader_t *)r);
        o->gen++;
        o->vset = false;
        coalesce__free(o->validator);
        o->validator = NULL;
        o->total = FLIGHT_SIZE_UNKNOWN;
        o->seen = 0;
    }
    R->gen = o->gen;
    if (t != FLIGHT_SIZE_UNKNOWN)
        o->total = t;
    if (first == FLIGHT_RANGE_END) { /* 416: nothing at or after ask_first. */
        R->total = t; /* Its readers report it (flight_reader_range). */
        return FLIGHT_ERANGE;
    }
    R->rlast = last;
    R->expect = last - first + 1;
    if (last >= o->seen)
        o->seen = last + 1;
    uint64_t kl = last / o->g->chunk;
    if (R->b == CHUNK_OPEN || R->b > kl)
        R->b = kl;
    return 0;
}

int flight_set_range(flight_writer_t *w,
                     uint64_t first,
                     uint64_t last,
                     uint64_t total,
                     const void *validator,
                     size_t vlen)
{
    if (!w || !w->run || (vlen && !validator) ||
        (first == FLIGHT_RANGE_END) != (last == FLIGHT_RANGE_END) ||
        last < first || (first != FLIGHT_RANGE_END && last >= OFFSET_LIMIT) ||
        (total != FLIGHT_SIZE_UNKNOWN && total > OFFSET_LIMIT))
        return COALESCE_EINVAL;
    unsigned char *copy = NULL;
    if (vlen && !(copy = coalesce__malloc(vlen)))
        return COALESCE_ENOMEM;
    if (vlen)
        memcpy(copy, validator, vlen);
    run_t *R = w->run;
    robj_t *o = R->obj;
    shard_t *sh = o->sh;
    post_t p;
    post_init(&p);
    pthread_mutex_lock(&sh->mu);
    int rc = run_state(w);
    if (!rc && (R->replied || R->written))
        rc = COALESCE_EINVAL;
    if (!rc) {
        rc = run_check_reply(R, first, last, total, copy, vlen);
        if (rc == FLIGHT_EMISMATCH)
            sh->st.range_mismatches++;
        if (rc) {
            run_end_locked(R, rc, &p);
        } else {
            R->replied = true;
            R->total = o->total;
            if (!o->vset) {
                o->vset = true;
                o->validator = copy;
                o->vlen = vlen;
                copy = NULL;
            }
            /* Pieces past the object's end need nothing from it. */
            for (piece_t *pc = R->pieces; pc; pc = pc->rnext)
                if (pc->from > R->b)
                    piece_uncount(pc, true, &p);
            if (run_done(R)) {
                run_unlist(R);
                for (piece_t *pc = R->pieces; pc; pc = pc->rnext)
                    piece_uncount(pc, false, &p);
            }
            wake_obj(o, &p.notes);
        }
    }
    pthread_mutex_unlock(&sh->mu);
    coalesce__free(copy);
    post_run(sh, &p);
    return rc;
}

static int run_set_meta(flight_writer_t *w, unsigned char *copy, size_t len)
{
    run_t *R = w->run;
    shard_t *sh = R->obj->sh;
    post_t p;
    post_init(&p);
    pthread_mutex_lock(&sh->mu);
    int rc = run_state(w);
    if (!rc && (R->meta_set || R->written))
        rc = COALESCE_EINVAL;
    if (!rc) {
        R->meta = copy;
        R->metalen = len;
        R->meta_set = true;
        copy = NULL;
        wake_obj(R->obj, &p.notes);
    }
    pthread_mutex_unlock(&sh->mu);
    coalesce__free(copy);
    post_run(sh, &p);
    return rc;
}

static int run_end(flight_writer_t *w, int status)
{
    run_t *R = w->run;
    shard_t *sh = R->obj->sh;
    post_t p;
    post_init(&p);
    pthread_mutex_lock(&sh->mu);
    int rc = run_state(w);
    if (!rc) {
        if (!status && (!R->replied || R->written < R->expect)) {
            /* A short body is an error, never an end of stream. */
            sh->st.range_mismatches++;
            status = rc = FLIGHT_EMISMATCH;
        }
        run_end_locked(R, status, &p);
    }
    if (rc != COALESCE_EINVAL)
        w->ended = true;
    pthread_mutex_unlock(&sh->mu);
    post_run(sh, &p);
    return rc;
}

static unsigned run_readers(flight_writer_t *w)
{
    shard_t *sh = w->run->obj->sh;
    pthread_mutex_lock(&sh->mu);
    unsigned n = w->run->nreaders;
    pthread_mutex_unlock(&sh->mu);
    return n;
}

static void run_release(flight_writer_t *w)
{
    run_t *R = w->run;
    shard_t *sh = R->obj->sh;
    post_t p;
    post_init(&p);
    pthread_mutex_lock(&sh->mu);
    if (!R->ended)
        run_end_locked(R, COALESCE_EUPSTREAM, &p);
    w->ended = true;
    if (R->fetching)
        w->released = true; /* run_fetch_returned() drops the reference. */
    else
        run_unref(R, &p);
    pthread_mutex_unlock(&sh->mu);
    post_run(sh, &p);
}

static void run_fetch_returned(run_t *R, int rc)
{
    shard_t *sh = R->obj->sh;
    post_t p;
    post_init(&p);
    pthread_mutex_lock(&sh->mu);
    R->fetching = false;
    if (rc != FLIGHT_FETCH_ASYNC || R->w.released) {
        int status = rc < 0                    ? end_status(rc)
                     : rc == FLIGHT_FETCH_DONE ? COALESCE_EUPSTREAM
                                               : COALESCE_EINVAL;
        /* COALESCE_EOF is a clean end: as with flight_end(w, 0), a short
         * (or unreported) body makes it a mismatch. */
        if (!R->ended && !status && (!R->replied || R->written < R->expect)) {
            sh->st.range_mismatches++;
            status = FLIGHT_EMISMATCH;
        }
        if (!R->ended)
            run_end_locked(R, status, &p);
        R->w.ended = true;
        run_unref(R, &p);
    }
    pthread_mutex_unlock(&sh->mu);
    post_run(sh, &p);
}

/* --- Range readers --- */

/* The object's size as the reader knows it: in the identity its first
 * chunk was fetched with, even after the object changed. */
static uint64_t rr_total(const rreader_t *rr)
{
    const robj_t *o = rr->obj;
    if (!rr->gen) /* Before its first fetch replied: what is vouched for. */
        return robj_total(o);
    return rr->gen == o->gen ? o->total : rr->total;
}

/* Learn the identity from the first fetch once it has replied. */
static void rr_sync(rreader_t *rr)
{
    const robj_t *o = rr->obj;
    const run_t *R0 = rr->pv[0].run;
    if (!rr->gen && R0->replied) {
        rr->gen = R0->gen;
        rr->total = R0->total;
    }
    if (rr->gen == o->gen)
        rr->total = o->total;
}

/* One past the last byte the reader delivers; UINT64_MAX while unknown. */
static uint64_t rr_end(const rreader_t *rr)
{
    uint64_t end = rr->last == FLIGHT_RANGE_END ? UINT64_MAX : rr->last + 1;
    uint64_t t = rr_total(rr);
    return t != FLIGHT_SIZE_UNKNOWN && t < end ? t : end;
}

static void rr_count(rreader_t *rr)
{
    if (rr->counted || rr_total(rr) == FLIGHT_SIZE_UNKNOWN)
        return;
    uint64_t end = rr_end(rr);
    rr->counted = true;
    if (end > rr->first)
        rr->obj->sh->st.range_bytes_requested += end - rr->first;
}

static void piece_drain(piece_t *pc, post_t *p)
{
    while (pc->qh) {
        flight_reader_t *cr = pc->qh;
        pc->qh = cr->qnext;
        cursor_drop(cr, p);
    }
    pc->qt = NULL;
}

/* The reader stops receiving: terminal status, cursors and counts go. */
static void rr_stop(rreader_t *rr, int status, post_t *p)
{
    if (!rr->pub.status)
        rr->pub.status = status;
    for (size_t i = 0; i < rr->np; i++) {
        piece_t *pc = &rr->pv[i];
        /* A peek's loan outlives the cursor that lent it. */
        if (i == rr->cur && rr->pub.peeked && pc->qh && pc->qh->seg &&
            pc->qh->seg->buf && !rr->pub.pin)
            rr->pub.pin = coalesce_buf_ref(pc->qh->seg->buf);
        piece_drain(pc, p);
        piece_uncount(pc, true, p);
    }
}

static int rr_finish(rreader_t *rr, int status, post_t *p)
{
    rr_stop(rr, status, p);
    return rr->pub.status;
}

/* Where the reader stands: 0 with bytes at its cursor (the current piece's
 * first chunk cursor, positioned at pos), COALESCE_EAGAIN, or terminal. */
static int rr_poll(rreader_t *rr, post_t *p)
{
    if (rr->pub.status)
        return rr->pub.status;
    robj_t *o = rr->obj;
    shard_t *sh = o->sh;
    uint64_t cs = o->g->chunk;
    if (rr->pub.deadline && !run_meta_stage(rr->pv[0].run) &&
        coalesce__now_ns() >= rr->pub.deadline) {
        sh->st.timeouts++;
        return rr_finish(rr, FLIGHT_ETIMEDOUT, p);
    }
    rr_sync(rr);
    rr_count(rr);
    for (;;) {
        uint64_t t = rr_total(rr);
        if (t != FLIGHT_SIZE_UNKNOWN && rr->first >= t)
            return rr_finish(rr, FLIGHT_ERANGE, p);
        if (rr->pos >= rr_end(rr))
            return rr_finish(rr, COALESCE_EOF, p);
        uint64_t k = rr->pos / cs;
        piece_t *pc = &rr->pv[rr->cur];
        if (pc->to != CHUNK_OPEN && k > pc->to) {
            piece_drain(pc, p);
            piece_uncount(pc, true, p);
            if (rr->cur + 1 == rr->np) /* Pieces cover the whole range. */
                return rr_finish(rr, FLIGHT_EMISMATCH, p);
            rr->cur++;
            continue;
        }
        flight_reader_t *cr = pc->qh;
        while (cr && cr->f->base / cs < k) { /* Chunks read to the end. */
            pc->qh = cr->qnext;
            if (!pc->qh)
                pc->qt = NULL;
            cursor_drop(cr, p);
            cr = pc->qh;
        }
        run_t *R = pc->run;
        /* The object changed: this fetch replied for another version, or
         * found another version too short (past the end of the reader's
         * own version, it would have ended before this chunk). */
        if ((R->replied && R->gen != rr->gen) ||
            (rr->gen && R->ended && R->status == FLIGHT_ERANGE))
            return rr_finish(rr, FLIGHT_EMISMATCH, p);
        if (!cr) {
            /* Past the last byte its fetch replied, all of it written: a
             * mismatch whatever the fetch ends with later, as a chunk
             * cursor would say (flight.h, "Range"). */
            if (R->replied && rr->pos > R->rlast &&
                R->ask_first + R->written > R->rlast)
                return rr_finish(rr, FLIGHT_EMISMATCH, p);
            if (R->ended && R->status < 0)
                return rr_finish(rr, R->status, p);
            if (run_done(R)) /* The run ended before our chunk. */
                return rr_finish(rr, FLIGHT_EMISMATCH, p);
            return COALESCE_EAGAIN;
        }
        int rc = reader_poll(cr, p);
        if (rc == 0) {
            uint64_t at = cr->f->base + cr->off;
            if (at >= rr->pos)
                return 0;
            /* Bytes of the chunk before our first one. */
            size_t n = cr->seg->len - cr->pos;
            if (n > rr->pos - at)
                n = (size_t)(rr->pos - at);
            cr->pos += n;
            cr->off += n;
            continue;
        }
        if (rc == COALESCE_EAGAIN)
            return rc;
        /* A chunk that ended short of pos, or failed. */
        return rr_finish(rr, rc == COALESCE_EOF ? FLIGHT_EMISMATCH : rc, p);
    }
}

/* After rr_poll() returned 0: the bytes at the cursor, within the range. */
static const unsigned char *
rr_avail(rreader_t *rr, size_t *len, coalesce_buf_t **owner)
{
    flight_reader_t *cr = rr->pv[rr->cur].qh;
    seg_t *s = cr->seg;
    if (owner)
        *owner = s->buf;
    size_t n = s->len - cr->pos;
    uint64_t end = rr_end(rr);
    if (end != UINT64_MAX && n > end - rr->pos)
        n = (size_t)(end - rr->pos);
    *len = n;
    return s->data + cr->pos;
}

static void rr_advance(rreader_t *rr, size_t n)
{
    rr->pos += n;
    rr->pub.off += n;
    rr->obj->sh->st.bytes_delivered += n;
    /* Stopped while copying: no cursor left. Nothing consumed (a consume
     * of 0 bytes): there may be no cursor yet. */
    if (rr->pub.status || !n)
        return;
    flight_reader_t *cr = rr->pv[rr->cur].qh;
    cr->pos += n;
    cr->off += n;
}

static bool rr_meta_stage(const rreader_t *rr)
{
    return run_meta_stage(rr->pv[0].run);
}

static const void *rr_meta_blob(const rreader_t *rr, size_t *len)
{
    const run_t *R = rr->pv[0].run;
    *len = R->meta_set ? R->metalen : 0;
    return R->meta_set ? R->meta : NULL;
}

static int rr_meta_poll(rreader_t *rr, post_t *p)
{
    if (rr->pub.status == FLIGHT_ETIMEDOUT)
        return rr->pub.status;
    robj_t *o = rr->obj;
    run_t *R = rr->pv[0].run;
    rr_sync(rr);
    if (run_meta_stage(R)) {
        uint64_t t = rr_total(rr);
        if (t != FLIGHT_SIZE_UNKNOWN && rr->first >= t)
            return rr_finish(rr, FLIGHT_ERANGE, p);
        /* A reader detached meanwhile (lag) keeps its own status: the
         * fetch may have ended only because of that (orphan cancel). */
        if (R->ended && R->status < 0 && !R->written && !R->meta_set)
            return rr->pub.status ? rr->pub.status : R->status;
        rr_count(rr);
        return 0;
    }
    if (rr->pub.status)
        return rr->pub.status;
    if (rr->pub.deadline && coalesce__now_ns() >= rr->pub.deadline) {
        o->sh->st.timeouts++;
        return rr_finish(rr, FLIGHT_ETIMEDOUT, p);
    }
    return COALESCE_EAGAIN;
}

/*
 * Could a read make progress? For notifications: rr_poll()'s tests, without
 * its side effects; a spurious yes only costs the host a read, a missed one
 * leaves it waiting. Under the shard lock, so syncing the identity now is
 * what the next poll would do anyway.
 */
static bool rr_ready(rreader_t *rr)
{
    if (rr->pub.status)
        return true;
    const robj_t *o = rr->obj;
    if (!rr->pub.meta_seen && run_meta_stage(rr->pv[0].run))
        return true;
    rr_sync(rr);
    uint64_t t = rr_total(rr);
    if ((t != FLIGHT_SIZE_UNKNOWN && rr->first >= t) || rr->pos >= rr_end(rr))
        return true;
    uint64_t cs = o->g->chunk, k = rr->pos / cs;
    const piece_t *pc = &rr->pv[rr->cur];
    if (pc->to != CHUNK_OPEN && k > pc->to)
        return true;
    const run_t *R = pc->run;
    /* The object changed under it (as in rr_poll). */
    if ((R->replied && R->gen != rr->gen) ||
        (rr->gen && R->ended && R->status == FLIGHT_ERANGE))
        return true;
    const flight_reader_t *cr = pc->qh;
    while (cr && cr->f->base / cs < k) /* Chunks read to the end. */
        cr = cr->qnext;
    if (!cr)
        return run_done(R);
    const flight_t *f = cr->f;
    return f->base + f->written > rr->pos || f->ended;
}

static void wake_obj(robj_t *o, notes_t *nl)
{
    if (o->waiters)
        pthread_cond_broadcast(&o->cond);
    if (!nl->oseq)
        nl->oseq = ++o->ev_seq;
    for (flight_reader_t *r = o->rrs; r; r = r->next) {
        if (!r->cb || r->arm_seq >= nl->oseq || r == nl->self ||
            !rr_ready((rreader_t *)r))
            continue;
        if (nl->n == NOTE_BATCH) {
            nl->more = true;
            break;
        }
        nl->v[nl->n++] = (note_t){r, r->cb, r->cb_data};
        r->cb = NULL;
        r->notifying++;
    }
    if (nl->n && !nl->hold && !nl->ohold) {
        nl->ohold = o;
        o->refs++;
    }
}

static void rr_free_final(rreader_t *rr, post_t *p)
{
    for (size_t i = 0; i < rr->np; i++) {
        piece_t *pc = &rr->pv[i];
        run_t *R = pc->run;
        if (R->leader == rr)
            R->leader = NULL; /* Another reader may get this address. */
        if (pc->rprev)
            pc->rprev->rnext = pc->rnext;
        else
            R->pieces = pc->rnext;
        if (pc->rnext)
            pc->rnext->rprev = pc->rprev;
        run_unref(R, p);
    }
    robj_t *o = rr->obj;
    coalesce__free(rr->pv);
    coalesce__free(rr);
    robj_unref(o, p);
}

/* A range reader closes (its callbacks are over): everything but its
 * memory goes; reader_free_final() frees that. */
static void rr_teardown(rreader_t *rr, post_t *p)
{
    robj_t *o = rr->obj;
    flight_reader_t *r = &rr->pub;
    r->peeked = 0; /* No pin: nobody reads the loan after close. */
    rr_stop(rr, COALESCE_ECANCELED, p);
    if (r->prev)
        r->prev->next = r->next;
    else
        o->rrs = r->next;
    if (r->next)
        r->next->prev = r->prev;
    o->sh->st.readers_open--;
}

static shard_t *reader_shard(const flight_reader_t *r)
{
    return r->range ? ((const rreader_t *)r)->obj->sh : r->f->sh;
}

static unsigned *reader_waiters(flight_reader_t *r)
{
    return r->range ? &((rreader_t *)r)->obj->waiters : &r->f->waiters;
}

static void reader_cond_init(flight_reader_t *r)
{
    if (r->range)
        robj_cond(((rreader_t *)r)->obj);
    else
        ensure_cond(r->f);
}

static uint64_t reader_ev_seq(const flight_reader_t *r)
{
    return r->range ? ((const rreader_t *)r)->obj->ev_seq : r->f->ev_seq;
}

/* --- flight_do_range --- */

/* What registering a call needs, counted by a dry walk so that the real
 * walk cannot fail half-way. */
typedef struct plan {
    size_t pieces, runs, cursors;
    run_t *spare_runs;          /* Linked by next. */
    flight_reader_t *spare_rds; /* Linked by next. */
} plan_t;

static size_t mq_in(const run_t *R, uint64_t from, uint64_t to)
{
    size_t n = 0;
    for (const flight_t *f = R->mq; f; f = (const flight_t *)f->e.hnext) {
        uint64_t k = f->base / R->obj->g->chunk;
        n += k >= from && (to == CHUNK_OPEN || k <= to);
    }
    return n;
}

static void plan_join(
    plan_t *pl, rreader_t *rr, run_t *R, uint64_t from, uint64_t to, bool apply)
{
    if (!apply) {
        pl->pieces++;
        pl->cursors += mq_in(R, from, to);
        return;
    }
    piece_t *last = rr->np ? &rr->pv[rr->np - 1] : NULL;
    if (last && last->run == R && last->to + 1 == from) {
        last->to = to; /* Grown into a lingering run: one piece. */
        return;
    }
    piece_t *pc = &rr->pv[rr->np++];
    pc->run = R;
    pc->rr = rr;
    pc->from = from;
    pc->to = to;
    pc->counted = true;
    R->nreaders++;
    R->refs++;
    pc->rprev = NULL;
    pc->rnext = R->pieces;
    if (R->pieces)
        R->pieces->rprev = pc;
    R->pieces = pc;
    if (R->leader != rr)
        rr->shared = true;
    /* Chunks being written: read them from their first byte. */
    for (flight_t *f = R->mq; f; f = (flight_t *)f->e.hnext) {
        uint64_t k = f->base / rr->obj->g->chunk;
        if (k < from || (to != CHUNK_OPEN && k > to))
            continue;
        flight_reader_t *r = pl->spare_rds;
        pl->spare_rds = r->next;
        reader_link(f, r, false, false, rr);
        piece_push(pc, r);
        if (R->leader != rr)
            f->sh->st.chunk_joins++;
    }
}

static run_t *plan_new_run(plan_t *pl,
                           rreader_t *rr,
                           run_t *before,
                           uint64_t from,
                           uint64_t to,
                           bool apply)
{
    if (!apply) {
        pl->runs++;
        return NULL;
    }
    robj_t *o = rr->obj;
    run_t *R = pl->spare_runs;
    pl->spare_runs = R->next;
    memset(R, 0, sizeof(*R));
    R->w.run = R;
    R->obj = o;
    R->leader = rr;
    R->a = R->cur = R->mat = from;
    R->b = to;
    R->refs = 1; /* The writer's. */
    R->state = o->g->linger_ns ? RUN_LINGER : RUN_FETCH;
    run_list_before(o, R, before);
    o->refs++;
    rr->led = true;
    return R;
}

/* May a lingering run grow over [from, to] (and the gap to it)? */
static bool may_merge(const run_t *L, uint64_t from, uint64_t to, uint64_t cs)
{
    const flight_group_t *g = L->obj->g;
    if (L->state != RUN_LINGER || L->ended || L->b == CHUNK_OPEN ||
        to == CHUNK_OPEN)
        return false;
    uint64_t lo = from < L->a ? from : L->a;
    uint64_t hi = to > L->b ? to : L->b;
    uint64_t gap = from > L->b ? from - L->b - 1 : L->a - to - 1;
    return gap <= g->max_gap / cs && hi - lo < g->max_span / cs;
}

/*
 * Walk chunks c0..c1 (c1 may be CHUNK_OPEN) against the runs in flight:
 * join the runs covering them, lead one new run per gap, or grow a
 * lingering run over the gap. A dry walk (apply false) only counts, for
 * the worst case (no growing).
 */
static void
plan_walk(plan_t *pl, rreader_t *rr, uint64_t c0, uint64_t c1, bool apply)
{
    robj_t *o = rr->obj;
    uint64_t cs = o->g->chunk;
    run_t *R = o->runs;
    while (R && R->b != CHUNK_OPEN && R->b < c0)
        R = R->next;
    for (uint64_t i = c0;;) {
        uint64_t to;
        if (R && R->cur <= i) {
            to = R->b == CHUNK_OPEN ? c1
                 : c1 == CHUNK_OPEN ? R->b
                                    : (c1 < R->b ? c1 : R->b);
            plan_join(pl, rr, R, i, to, apply);
            R = R->next;
        } else {
            to = R ? R->cur - 1 : CHUNK_OPEN;
            if (c1 != CHUNK_OPEN && c1 < to)
                to = c1;
            if (apply && R && may_merge(R, i, to, cs)) {
                R->a = R->cur = R->mat = i; /* Grows down; joined next. */
                continue;
            }
            run_t *P = R ? R->prev : o->runs;
            while (!R && P && P->next)
                P = P->next;
            if (apply && P && may_merge(P, i, to, cs)) {
                P->b = to; /* Grows up over the gap. */
                plan_join(pl, rr, P, i, to, true);
            } else if (apply) {
                plan_join(pl, rr, plan_new_run(pl, rr, R, i, to, true), i, to,
                          true);
            } else {
                pl->runs++;
                pl->pieces++;
            }
        }
        if (to == CHUNK_OPEN || (c1 != CHUNK_OPEN && to >= c1))
            break;
        i = to + 1;
    }
}

/*
 * Two lingering runs that have become adjacent (a range bridged the gap
 * between them) go out as one request: `into` takes over `from`'s pieces,
 * and `from` ends unfetched (its leader skips it).
 */
static void run_absorb(run_t *into, run_t *from, post_t *p)
{
    while (from->pieces) {
        piece_t *pc = from->pieces;
        from->pieces = pc->rnext;
        pc->run = into;
        pc->rprev = NULL;
        pc->rnext = into->pieces;
        if (into->pieces)
            into->pieces->rprev = pc;
        into->pieces = pc;
        into->refs++;
        from->refs--; /* Never the last: the writer's stays. */
        if (pc->counted) {
            into->nreaders++;
            from->nreaders--;
        }
        if (pc->rr != into->leader) {
            pc->rr->shared = true;
            pc->rr->pub.leader = false;
        }
    }
    into->b = from->b;
    run_end_locked(from, 0, p);
    from->started = true; /* Its leader can no longer reach it: drop the */
    from->w.ended = true; /* writer's reference here. */
    run_unref(from, p);
}

static void runs_coalesce(robj_t *o, post_t *p)
{
    for (run_t *X = o->runs; X && X->next;) {
        run_t *Y = X->next;
        if (X->b != CHUNK_OPEN && X->b + 1 == Y->a && Y->cur == Y->a &&
            may_merge(X, Y->a, Y->b, o->g->chunk) && Y->state == RUN_LINGER)
            run_absorb(X, Y, p);
        else
            X = Y;
    }
}

static void plan_free(shard_t *sh, plan_t *pl)
{
    while (pl->spare_runs) {
        run_t *R = pl->spare_runs;
        pl->spare_runs = R->next;
        coalesce__free(R);
    }
    while (pl->spare_rds) {
        flight_reader_t *r = pl->spare_rds;
        pl->spare_rds = r->next;
        reader_give(sh, r);
    }
}

static int plan_alloc(shard_t *sh, plan_t *pl, rreader_t *rr)
{
    if (!(rr->pv = coalesce__calloc(pl->pieces, sizeof(piece_t))))
        return COALESCE_ENOMEM;
    for (size_t i = 0; i < pl->runs; i++) {
        run_t *R = coalesce__malloc(sizeof(*R));
        if (!R)
            return COALESCE_ENOMEM;
        R->next = pl->spare_runs;
        pl->spare_runs = R;
    }
    for (size_t i = 0; i < pl->cursors; i++) {
        flight_reader_t *r = reader_take(sh);
        if (!r)
            return COALESCE_ENOMEM;
        r->next = pl->spare_rds;
        pl->spare_rds = r;
    }
    return 0;
}

static void sleep_ns(int64_t ns)
{
    struct timespec ts = {(time_t)(ns / 1000000000), (long)(ns % 1000000000)};
    while (nanosleep(&ts, &ts) != 0)
        ; /* Interrupted: sleep the rest. */
}

/* Run the fetch of every run this caller leads, in object order. Called
 * with the lock held; returns without it. */
static void
rr_lead(rreader_t *rr, flight_range_fetch_cb fetch, void *data, post_t *pp)
{
    robj_t *o = rr->obj;
    shard_t *sh = o->sh;
    flight_group_t *g = o->g;
    uint64_t cs = g->chunk;
    post_t p = *pp;
    bool lingering = false;
    for (size_t i = 0; i < rr->np; i++)
        lingering |= rr->pv[i].run->leader == rr && !rr->pv[i].run->ended;
    if (g->linger_ns && lingering) {
        pthread_mutex_unlock(&sh->mu);
        post_run(sh, &p);
        post_init(&p);
        sleep_ns(g->linger_ns); /* Ranges arriving now join our runs. */
        pthread_mutex_lock(&sh->mu);
    }
    for (size_t i = 0; i < rr->np; i++) {
        run_t *R = rr->pv[i].run;
        if (R->leader != rr || R->started)
            continue;
        R->started = true;
        R->state = RUN_FETCH;
        if (R->ended) { /* Nobody wants it any more. */
            R->w.ended = true;
            run_unref(R, &p);
            continue;
        }
        R->ask_first = R->a * cs;
        R->ask_last =
            R->b == CHUNK_OPEN ? FLIGHT_RANGE_END : chunk_end_byte(R->b, cs);
        uint64_t total = robj_total(o);
        if (total != FLIGHT_SIZE_UNKNOWN) { /* Learnt meanwhile. */
            if (R->ask_first >= total) {
                R->total = total;
                run_end_locked(R, FLIGHT_ERANGE, &p);
                R->w.ended = true;
                run_unref(R, &p);
                continue;
            }
            if (R->ask_last > total - 1)
                R->ask_last = total - 1;
            if (R->b == CHUNK_OPEN || R->b > (total - 1) / cs)
                R->b = (total - 1) / cs;
            /* As in flight_set_range(): pieces past the end need nothing
             * from it (the leader's first chunk is before the end). */
            for (piece_t *pc = R->pieces; pc; pc = pc->rnext)
                if (pc->from > R->b)
                    piece_uncount(pc, true, &p);
        }
        R->fetching = true;
        sh->st.range_fetches++;
        uint64_t first = R->ask_first, last = R->ask_last;
        pthread_mutex_unlock(&sh->mu);
        post_run(sh, &p);
        post_init(&p);
        run_fetch_returned(R, fetch(&R->w, first, last, data));
        pthread_mutex_lock(&sh->mu);
    }
    uint64_t written = 0;
    for (size_t i = 0; i < rr->np; i++)
        if (rr->pv[i].run->leader == rr)
            written += rr->pv[i].run->written;
    rr->fetch_written = written;
    rr->fetching = false;
    pthread_mutex_unlock(&sh->mu);
    post_run(sh, &p);
}

int flight_do_range(flight_group_t *g,
                    const void *key,
                    size_t keylen,
                    uint64_t first,
                    uint64_t last,
                    flight_range_fetch_cb fetch,
                    void *data,
                    flight_reader_t **out)
{
    if (!g || !key || !keylen || keylen > KEY_MAX || !fetch || !out ||
        last < first || first >= OFFSET_LIMIT ||
        (last != FLIGHT_RANGE_END && last >= OFFSET_LIMIT))
        return COALESCE_EINVAL;
    uint64_t h = XXH3_64bits_withSeed(key, keylen, g->seed);
    shard_t *sh = &g->shards[h & (g->nshards - 1)];
    rreader_t *rr = coalesce__calloc(1, sizeof(*rr));
    if (!rr)
        return COALESCE_ENOMEM;
    plan_t pl = {0};
    post_t p;
    post_init(&p);
    int rc = 0;
    pthread_mutex_lock(&sh->mu);
    robj_t *o = NULL;
    if (sh->closing)
        rc = COALESCE_ECLOSING;
    else if (!(o = robj_get(sh, g, h, key, keylen)))
        rc = COALESCE_ENOMEM;
    else if (first >= robj_total(o))
        rc = FLIGHT_ERANGE; /* Unknown is UINT64_MAX: never. */
    if (rc)
        goto fail;
    rr->obj = o;
    rr->first = first;
    rr->last = last;
    rr->pos = first;
    uint64_t cs = g->chunk, lastb = last, total = robj_total(o);
    if (total != FLIGHT_SIZE_UNKNOWN && lastb > total - 1)
        lastb = total - 1;
    uint64_t c0 = first / cs;
    uint64_t c1 = lastb == FLIGHT_RANGE_END ? CHUNK_OPEN : lastb / cs;
    plan_walk(&pl, rr, c0, c1, false);
    if ((rc = plan_alloc(sh, &pl, rr)))
        goto fail;
    plan_walk(&pl, rr, c0, c1, true);
    plan_free(sh, &pl);
    if (g->linger_ns)
        runs_coalesce(o, &p);

    flight_reader_t *r = &rr->pub;
    r->range = true;
    atomic_init(&r->in_cb, 0);
    atomic_init(&r->closed, false);
    atomic_init(&r->closer_waiting, false);
    r->attached = true;
    r->leader = !rr->shared;
    r->next = o->rrs;
    if (o->rrs)
        o->rrs->prev = r;
    o->rrs = r;
    o->refs++;
    sh->st.readers_open++;
    if (rr_end(rr) != UINT64_MAX) {
        rr->counted = true;
        sh->st.range_bytes_requested += rr_end(rr) - first;
    }
    run_t *R0 = rr->pv[0].run;
    if (g->wait_ns && R0->leader != rr && !run_meta_stage(R0))
        r->deadline = coalesce__now_ns() + g->wait_ns;
    if (rr->led) {
        rr->fetching = true;
        rr_lead(rr, fetch, data, &p); /* Unlocks, runs p. */
    } else {
        pthread_mutex_unlock(&sh->mu);
        post_run(sh, &p);
    }
    *out = r;
    return 0;
fail:
    plan_free(sh, &pl);
    coalesce__free(rr->pv);
    coalesce__free(rr);
    if (o && !o->refs) {
        o->refs = 1; /* Unused: free it the usual way. */
        robj_unref(o, &p);
    }
    pthread_mutex_unlock(&sh->mu);
    post_run(sh, &p);
    return rc;
}

int flight_reader_range(flight_reader_t *r,
                        uint64_t *first,
                        uint64_t *last,
                        uint64_t *total)
{
    if (!r || !r->range)
        return COALESCE_EINVAL;
    rreader_t *rr = (rreader_t *)r;
    robj_t *o = rr->obj;
    shard_t *sh = o->sh;
    int rc = 0;
    pthread_mutex_lock(&sh->mu);
    rr_sync(rr);
    uint64_t t = rr_total(rr);
    run_t *R0 = rr->pv[0].run;
    if (t != FLIGHT_SIZE_UNKNOWN && rr->first >= t)
        rc = FLIGHT_ERANGE;
    else if (t == FLIGHT_SIZE_UNKNOWN && !R0->replied) {
        rc = R0->ended && R0->status < 0 ? R0->status : COALESCE_EAGAIN;
        if (rc < 0 && rc != COALESCE_EAGAIN && rr->pub.status)
            rc = rr->pub.status; /* Detached: as in rr_meta_poll(). */
        if (rc == FLIGHT_ERANGE)
            t = R0->total;
    }
    uint64_t end = rr_end(rr);
    pthread_mutex_unlock(&sh->mu);
    if (rc == FLIGHT_ERANGE && total)
        *total = t; /* for HTTP's "bytes (star)/size" */
    if (rc)
        return rc;
    if (first)
        *first = rr->first;
    if (last)
        *last = end == UINT64_MAX ? FLIGHT_RANGE_END : end - 1;
    if (total)
        *total = t;
    return 0;
}

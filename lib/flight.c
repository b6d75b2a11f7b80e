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

typedef struct seg seg_t;
typedef struct shard shard_t;
typedef struct flight flight_t;

struct seg {
    seg_t *next;
    coalesce_buf_t *buf; /* NULL for the head sentinel. */
    const unsigned char *data;
    size_t len;
    unsigned refs;
    bool embedded; /* The head sentinel lives inside its flight. */
};

struct flight_writer {
    flight_t *f;
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
    bool embedded; /* The leader's reader lives inside the flight. */
};

struct flight {
    flight_t *hnext; /* Hash chain. */
    flight_group_t *g;
    shard_t *sh;
    uint64_t hash;
    unsigned char *key;
    size_t keylen;
    unsigned refs;     /* Table + writer + readers + dispatch holds. */
    unsigned nreaders; /* Attached readers: open and not detached. */
    unsigned waiters;  /* Threads blocked on cond. */
    int status;
    bool registered; /* In the hash table: joinable. */
    bool ended;
    bool canceled;
    bool fetching; /* The leader's callback is running. */
    bool meta_set;
    bool meta_stage; /* Meta, first byte or end seen. */
    bool head_held;
    bool cond_ready;
    bool orphan_counted;
    uint64_t written;
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
    flight_t **buckets;
    size_t mask;
    size_t count;
    flight_t *pool;
    unsigned npool;
    flight_reader_t *rpool; /* Spare joiner readers, linked by next. */
    unsigned nrpool;
    unsigned long live; /* Flights not yet recycled. */
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
    int64_t wait_ns;
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
    flight_reader_t *self; /* The reader making the call: not notified. */
    uint64_t seq;          /* This event: armings older than it fire. */
    size_t n;
    bool more; /* Armed readers left over for another pass. */
    note_t v[NOTE_BATCH];
} notes_t;

/* Work that must wait until the shard lock is released. */
typedef struct post {
    seg_t *dead;
    coalesce_buf_t *pin;
    flight_reader_t *free_reader;
    flight_group_t *unref_group;
    notes_t notes;
} post_t;

/* Only the scalars: zeroing the note array would cost more than the rest. */
static inline void post_init(post_t *p)
{
    p->dead = NULL;
    p->pin = NULL;
    p->free_reader = NULL;
    p->unref_group = NULL;
    p->notes.hold = NULL;
    p->notes.self = NULL;
    p->notes.seq = 0;
    p->notes.n = 0;
    p->notes.more = false;
}

/* The reader whose notify callback this thread is running, if any. */
static _Thread_local flight_reader_t *notify_current;

static void group_unref(flight_group_t *g);
static void post_run_slow(shard_t *sh, post_t *p);

/* Most operations leave nothing to do after the lock. */
static inline void post_run(shard_t *sh, post_t *p)
{
    if (p->notes.n || p->dead || p->pin || p->free_reader || p->unref_group)
        post_run_slow(sh, p);
}
static void unregister(flight_t *f, post_t *p);

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

static flight_t *
table_find(shard_t *sh, uint64_t h, const void *key, size_t len)
{
    for (flight_t *f = sh->buckets[bucket_of(sh, h)]; f; f = f->hnext)
        if (f->hash == h && f->keylen == len && memcmp(f->key, key, len) == 0)
            return f;
    return NULL;
}

static void table_grow(shard_t *sh)
{
    size_t n = (sh->mask + 1) * 2;
    flight_t **nb = coalesce__calloc(n, sizeof(*nb));
    if (!nb)
        return; /* Longer chains, still correct. */
    size_t omask = sh->mask;
    flight_t **ob = sh->buckets;
    sh->buckets = nb;
    sh->mask = n - 1;
    for (size_t i = 0; i <= omask; i++) {
        for (flight_t *f = ob[i], *next; f; f = next) {
            next = f->hnext;
            size_t b = bucket_of(sh, f->hash);
            f->hnext = nb[b];
            nb[b] = f;
        }
    }
    coalesce__free(ob);
}

static void table_insert(shard_t *sh, flight_t *f)
{
    size_t b = bucket_of(sh, f->hash);
    f->hnext = sh->buckets[b];
    sh->buckets[b] = f;
    f->registered = true;
    if (++sh->count > sh->mask + 1)
        table_grow(sh);
}

static void table_remove(shard_t *sh, flight_t *f)
{
    if (!f->registered)
        return;
    flight_t **pp = &sh->buckets[bucket_of(sh, f->hash)];
    while (*pp != f)
        pp = &(*pp)->hnext;
    *pp = f->hnext;
    f->hnext = NULL;
    f->registered = false;
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

static void
reader_link(flight_t *f, flight_reader_t *r, bool leader, bool embedded)
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
    r->prev = NULL;
    r->next = f->readers;
    if (f->readers)
        f->readers->prev = r;
    f->readers = r;
    f->nreaders++;
    f->refs++;
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
    f->sh->st.readers_open--;
}

static flight_t *flight_new(
    shard_t *sh, flight_group_t *g, uint64_t h, const void *key, size_t keylen)
{
    unsigned char *kmem = NULL;
    if (keylen > KEY_INLINE && !(kmem = coalesce__malloc(keylen)))
        return NULL;
    flight_t *f = sh->pool;
    if (f) {
        sh->pool = f->hnext;
        sh->npool--;
    } else if (!(f = coalesce__malloc(sizeof(*f)))) {
        coalesce__free(kmem);
        return NULL;
    }
    f->hnext = NULL;
    f->g = g;
    f->sh = sh;
    f->hash = h;
    f->key = kmem ? kmem : f->keybuf;
    memcpy(f->key, key, keylen);
    f->keylen = keylen;
    f->refs = 1; /* The table's; the leader's reader adds its own. */
    f->nreaders = 0;
    f->waiters = 0;
    f->status = 0;
    f->registered = false;
    f->ended = false;
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
    f->w.ended = false;
    f->w.released = false;
    reader_link(f, &f->lr, true, true);
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
    if (f->key != f->keybuf)
        coalesce__free(f->key);
    coalesce__free(f->meta);
    if (sh->npool < POOL_MAX) {
        f->hnext = sh->pool;
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
    if (nl->n && !nl->hold) {
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
    if (--f->nreaders || f->ended)
        return;
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
    if (status < 0)
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
    if (!f->registered)
        return;
    table_remove(f->sh, f);
    flight_group_t *g = f->g;
    if (flight_unref(f))
        p->unref_group = g;
}

/* --- Post-lock work ------------------------------------------------------- */

static void reader_free_final(flight_reader_t *r, post_t *p)
{
    flight_t *f = r->f;
    shard_t *sh = f->sh;
    bool embedded = r->embedded;
    flight_group_t *g = f->g;
    if (flight_unref(f))
        p->unref_group = g;
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
            pthread_cond_broadcast(&r->f->cond);
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
        nl->n = 0;
        if (nl->more) {
            nl->more = false;
            nl->hold = NULL;
            wake(f, nl); /* May take a new hold. */
        } else {
            nl->hold = NULL;
        }
        flight_group_t *g = f->g;
        if (flight_unref(f))
            p->unref_group = g;
        pthread_mutex_unlock(&sh->mu);
    }
    segs_free(p->dead);
    coalesce_buf_unref(p->pin);
    coalesce__free(p->free_reader);
    if (p->unref_group)
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
            sh->pool = f->hnext;
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
        sh->buckets = coalesce__calloc(BUCKETS_MIN, sizeof(flight_t *));
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
    flight_t *f = table_find(sh, h, key, keylen);
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
        reader_link(f, r, false, false);
        if (g->wait_ns && !f->meta_stage)
            r->deadline = coalesce__now_ns() + g->wait_ns;
        sh->st.joins++;
        pthread_mutex_unlock(&sh->mu);
        *out = r;
        return 0;
    }
    f = flight_new(sh, g, h, key, keylen);
    if (!f) {
        pthread_mutex_unlock(&sh->mu);
        return COALESCE_ENOMEM;
    }
    table_insert(sh, f);
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

/* Append a segment over [data, data + len) of buf (the segment adopts the
 * caller's reference on success). */
static int append(flight_writer_t *w,
                  coalesce_buf_t *buf,
                  const unsigned char *data,
                  size_t len)
{
    seg_t *s = coalesce__malloc(sizeof(*s));
    if (!s)
        return COALESCE_ENOMEM;
    *s = (seg_t){.buf = buf, .data = data, .len = len, .refs = 2};
    flight_t *f = w->f;
    shard_t *sh = f->sh;
    flight_group_t *g = f->g;
    post_t p;
    post_init(&p);

    pthread_mutex_lock(&sh->mu);
    int rc = writer_state(w);
    if (rc) {
        pthread_mutex_unlock(&sh->mu);
        coalesce__free(s);
        return rc;
    }
    /* The new segment is referenced by its predecessor's link and by the
     * tail; the old tail loses the tail's reference. */
    f->tail->next = s;
    seg_unref(sh, f->tail, &p);
    f->tail = s;
    f->written += len;
    f->meta_stage = true;
    sh->st.bytes_written += len;
    sh->st.segments_held++;
    sh->st.bytes_held += len;
    if (f->head_held && f->written > g->retain) {
        /* Byte 0 goes: late joiners would miss it, so stop admitting them. */
        f->head_held = false;
        seg_unref(sh, &f->head, &p);
        unregister(f, &p);
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
            detach(f, r, FLIGHT_ELAGGED, &p);
            sh->st.lagged++;
        }
    }
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
        flight_t *f = w->f;
        pthread_mutex_lock(&f->sh->mu);
        int rc = writer_state(w);
        pthread_mutex_unlock(&f->sh->mu);
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
    pthread_mutex_lock(&w->f->sh->mu);
    unsigned n = w->f->nreaders;
    pthread_mutex_unlock(&w->f->sh->mu);
    return n;
}

void flight_writer_release(flight_writer_t *w)
{
    if (!w)
        return;
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
        p.unref_group = g;
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

/* Poll, waiting up to timeout_ms (< 0: forever) while there is nothing. */
static int reader_wait(flight_reader_t *r, int timeout_ms, bool meta, post_t *p)
{
    flight_t *f = r->f;
    int64_t until = 0;
    if (timeout_ms > 0)
        until = coalesce__now_ns() + (int64_t)timeout_ms * 1000000;
    for (;;) {
        int rc = meta ? meta_poll(r, p) : reader_poll(r, p);
        if (rc != COALESCE_EAGAIN || timeout_ms == 0)
            return rc;
        int64_t wake_at = until;
        if (r->deadline && !f->meta_stage &&
            (!wake_at || r->deadline < wake_at))
            wake_at = r->deadline;
        if (until && coalesce__now_ns() >= until)
            return COALESCE_EAGAIN;
        ensure_cond(f);
        f->waiters++;
        if (wake_at) {
            struct timespec ts = {(time_t)(wake_at / 1000000000),
                                  (long)(wake_at % 1000000000)};
            pthread_cond_timedwait(&f->cond, &f->sh->mu, &ts);
        } else {
            pthread_cond_wait(&f->cond, &f->sh->mu);
        }
        f->waiters--;
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
    flight_t *f = r->f;
    shard_t *sh = f->sh;
    post_t p;
    post_init(&p);
    p.notes.self = r; /* It learns from the return value. */
    pthread_mutex_lock(&sh->mu);
    int rc = reader_wait(r, timeout_ms, true, &p);
    /* The meta is immutable once set and lives as long as the flight. */
    const void *m = f->meta_set ? f->meta : NULL;
    size_t mlen = f->meta_set ? f->metalen : 0;
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
    shard_t *sh = r->f->sh;
    post_t p;
    post_init(&p);
    p.notes.self = r; /* It learns from the return value. */
    pthread_mutex_lock(&sh->mu);
    reader_begin(r, &p);
    int rc = reader_wait(r, timeout_ms, false, &p);
    if (!rc) {
        seg_t *s = r->seg;
        r->meta_seen = true; /* Body bytes come after the meta stage. */
        *data = s->data + r->pos;
        *len = r->peeked = s->len - r->pos;
        if (owner)
            *owner = s->buf;
    }
    pthread_mutex_unlock(&sh->mu);
    post_run(sh, &p);
    return rc;
}

int flight_consume(flight_reader_t *r, size_t n)
{
    if (!r)
        return COALESCE_EINVAL;
    shard_t *sh = r->f->sh;
    int rc = 0;
    pthread_mutex_lock(&sh->mu);
    if (n > r->peeked) {
        rc = COALESCE_EINVAL;
    } else if (r->status) {
        rc = r->status; /* Detached meanwhile; the loan stays pinned. */
    } else {
        r->pos += n;
        r->off += n;
        r->peeked -= n;
        sh->st.bytes_delivered += n;
    }
    pthread_mutex_unlock(&sh->mu);
    return rc;
}

int flight_read(
    flight_reader_t *r, void *buf, size_t cap, int timeout_ms, size_t *nread)
{
    if (!r || !buf || !cap || !nread)
        return COALESCE_EINVAL;
    shard_t *sh = r->f->sh;
    post_t p;
    post_init(&p);
    p.notes.self = r; /* It learns from the return value. */
    size_t total = 0;
    coalesce_buf_t *late_pin = NULL;
    pthread_mutex_lock(&sh->mu);
    reader_begin(r, &p);
    int rc = reader_wait(r, timeout_ms, false, &p);
    if (!rc)
        r->meta_seen = true; /* Body bytes come after the meta stage. */
    while (!rc) {
        seg_t *s = r->seg;
        size_t n = s->len - r->pos;
        if (n > cap - total)
            n = cap - total;
        const unsigned char *src = s->data + r->pos;
        /* Copy outside the lock; the loan keeps the bytes alive. */
        r->peeked = n;
        pthread_mutex_unlock(&sh->mu);
        memcpy((unsigned char *)buf + total, src, n);
        pthread_mutex_lock(&sh->mu);
        r->peeked = 0;
        total += n;
        r->off += n;
        sh->st.bytes_delivered += n;
        if (r->status) {
            /* Detached while copying: the copied bytes count as read, and
             * the pin that kept them alive goes after the unlock. */
            late_pin = r->pin;
            r->pin = NULL;
            break;
        }
        r->pos += n;
        if (total == cap)
            break;
        rc = reader_poll(r, &p);
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
    shard_t *sh = r->f->sh;
    post_t p;
    post_init(&p);
    p.notes.self = r; /* It learns from the return value. */
    pthread_mutex_lock(&sh->mu);
    int rc = reader_poll(r, &p);
    int ready = rc != COALESCE_EAGAIN || (r->f->meta_stage && !r->meta_seen);
    /* A new arming replaces the old one; "ready" leaves nothing armed. */
    r->cb = ready ? NULL : cb;
    r->cb_data = data;
    r->arm_seq = r->f->ev_seq;
    pthread_mutex_unlock(&sh->mu);
    post_run(sh, &p);
    return ready ? 1 : 0;
}

int64_t flight_reader_deadline_ms(flight_reader_t *r)
{
    if (!r)
        return -1;
    shard_t *sh = r->f->sh;
    int64_t left = -1;
    pthread_mutex_lock(&sh->mu);
    if (r->deadline && !r->f->meta_stage && !r->status) {
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
    flight_t *f = r->f;
    shard_t *sh = f->sh;
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
        ensure_cond(f);
        atomic_store(&r->closer_waiting, true);
        while (atomic_load(&r->in_cb) > self)
            pthread_cond_wait(&f->cond, &sh->mu);
        atomic_store(&r->closer_waiting, false);
    }
    reader_gone(f, r, &p);
    reader_unlink(f, r);
    if (r->seg) {
        seg_unref(sh, r->seg, &p);
        r->seg = NULL;
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

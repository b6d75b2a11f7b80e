/*
 * Stress: one flight group and one write-through cache (over the in-memory
 * store) shared by N threads, each running a seeded random mix of
 * operations and checking every result as it goes; `make stress` runs it
 * under ASan and under TSan.
 *
 * Flights: object flights on a small key space, so that many calls collapse:
 * leaders fetch synchronously (writing a deterministic body in pieces, by
 * copy or zero-copy), asynchronously (the writer goes to a queue and
 * whichever thread takes it finishes the body), or fail (an error end, a
 * negative return, a writer dropped without an end). Readers read by copy,
 * by peek/consume or through notify callbacks, and some close early. Range
 * flights read overlapping ranges of a few objects, several readers at once.
 * Every byte is compared with the deterministic content; every end status
 * must be one the scenario allows; the group's counters must equal what the
 * threads counted.
 *
 * Cache: each thread owns private keys, for which it keeps an exact model
 * (every read and scan must match it), and all threads fight over shared
 * keys, where the checks are the cache's ordering rules: after a write at
 * revision R a read sees R or newer, after a delete at D nothing at or below
 * D comes back, a key seen at M never goes back below M, and a key that
 * vanished was deleted by somebody after the newest version known live.
 * At the end the cache, once its watch has caught up, must equal the
 * store.
 *
 * Blocking: async writers wait in a queue until a reader needs them. A
 * reader with nothing to read first finishes the queued writers of its own
 * object, then waits at most TICK_MS before it looks again; so nobody waits
 * long for a queued writer, and writers nobody waits for stay a while and
 * gather joiners (some readers are put aside for a few operations for the
 * same reason). Waits are bounded (STALL_MS): a stall is a failure, never a
 * hang; so is a run that outlives its time limit (-s).
 */
#define _POSIX_C_SOURCE 200809L

#include <coalesce.h>

#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if defined(__SANITIZE_THREAD__)
#    define SAN_NAME "tsan"
#elif defined(__SANITIZE_ADDRESS__)
#    define SAN_NAME "asan"
#elif defined(__has_feature)
#    if __has_feature(thread_sanitizer)
#        define SAN_NAME "tsan"
#    elif __has_feature(address_sanitizer)
#        define SAN_NAME "asan"
#    endif
#endif
#ifndef SAN_NAME
#    define SAN_NAME "plain"
#endif

#define KiB ((uint64_t)1024)

#define MAX_THREADS 64
#define STALL_MS    60000 /* A reader or the watch stuck this long: a bug. */
#define TICK_MS     10    /* Waiting readers look at the queue this often. */
#define HANG_GRACE  120   /* Seconds past the limit before giving up. */
#define RBUF        (64 * 1024)

/* Flight group options: small limits so that lag and retention matter. */
#define MAX_LAG (128 * KiB)
#define RETAIN  (32 * KiB)
#define CHUNK   (4 * KiB)

/* --- Configuration and global state ----------------------------------- */

static struct {
    int threads;
    long ops;
    double seconds;
    uint64_t seed;
    bool soft;    /* The time limit ends the run without failing it. */
    bool verbose; /* Time per operation type. */
} cfg = {8, 1000000, 600, 1, false, false};

static flight_group_t *grp;
static cache_store_t *store;
static cache_t *cache;
static atomic_bool stop_flag;
static double t_start;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* --- Operations --------------------------------------------------------- */

enum {
    OP_FLIGHT,
    OP_RANGE,
    OP_GET,
    OP_PUT,
    OP_CREATE,
    OP_UPDATE,
    OP_DELETE,
    OP_DELPREFIX,
    OP_TXN,
    OP_SCAN,
    OP_STATS,
    OP_MISC,
    NOPS
};

static const char *const op_names[NOPS] = {
    "flight", "range",         "get", "put",  "create", "update",
    "delete", "delete_prefix", "txn", "scan", "stats",  "misc"};

/* Relative weights; see pick_op(). */
static const int op_weight[NOPS] = {
    [OP_FLIGHT] = 300, [OP_RANGE] = 60,  [OP_GET] = 250,   [OP_PUT] = 100,
    [OP_CREATE] = 40,  [OP_UPDATE] = 60, [OP_DELETE] = 50, [OP_DELPREFIX] = 8,
    [OP_TXN] = 50,     [OP_SCAN] = 30,   [OP_STATS] = 20,  [OP_MISC] = 10};

/* Reader end statuses, counted for the summary. */
enum { S_EOF, S_EIO, S_EUPSTREAM, S_ELAGGED, S_EMISMATCH, S_ERANGE, NSTAT };

/* --- Per-thread state ----------------------------------------------------*/

#define NPRIV  16 /* Private keys per thread. */
#define NGRP   4  /* Shared key groups (prefix deletes). */
#define NPERG  8
#define NSH    (NGRP * NPERG)
#define VALMAX 256

/* The exact model of one private key. */
typedef struct pmodel {
    bool exists;
    int64_t create, mod, version;
    long seq;
} pmodel_t;

typedef struct worker worker_t;

/* A reader the thread holds; notify callbacks check it is still open. */
typedef struct rslot {
    flight_reader_t *r;
    worker_t *t;
    atomic_int open;
    bool offset_unknown; /* A consume failed: the offset is not ours. */
    bool range;          /* What it reads: the writers it may wait for. */
    int obj;
} rslot_t;

struct worker {
    int id;
    pthread_t th;
    uint64_t rng;
    atomic_long done;
    long ops[NOPS];
    double op_time[NOPS];
    const char *opname;
    unsigned char *buf;

    /* Flights. */
    long leads, joins, async_pushed, async_done, async_foreign, early;
    long canceled, range_fetches, range_calls, erange_direct;
    long status[NSTAT];
    uint64_t obj_written, range_written, delivered;
    flight_stats_t last; /* Counters must never go down. */
    rslot_t slots[5];
    /* A reader put aside until all threads together did def_until ops
     * (or this one did def_ops more). */
    bool deferred;
    int def_obj, def_ops;
    long def_until;
    pthread_mutex_t nmu;
    pthread_cond_t ncv;
    unsigned nfired;

    /* Cache. */
    long seq;
    char pkey[NPRIV][16];
    size_t pkeylen;
    char ppref[16], psub[16];
    pmodel_t priv[NPRIV];
    int64_t sh_floor[NSH]; /* A read must see at least this revision. */
    int64_t sh_live[NSH];  /* Newest revision known to have been live. */
    int64_t need_del[NSH]; /* It vanished: a delete after this must exist. */
    long sh_seq[NSH];      /* This thread's last put of the key... */
    int64_t sh_rev[NSH];   /* ...and its revision. */
    long conflicts, exists_hits, fresh_waits, cache_writes;
    long waits, ticks; /* Reader waits, and those that took a whole tick. */
    int64_t watch_rev;
};

static worker_t workers[MAX_THREADS];
static atomic_long ops_all; /* Operations of all threads. */
static _Thread_local worker_t *self;

/* --- Failure ------------------------------------------------------------ */

__attribute__((format(printf, 1, 2), noreturn)) static void
fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    flockfile(stderr);
    if (self)
        fprintf(stderr, "stress: FAIL: thread %d, op %ld (%s): ", self->id,
                atomic_load(&self->done), self->opname);
    else
        fprintf(stderr, "stress: FAIL: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\nstress: (seed %llu, %d threads; rerun with -r %llu)\n",
            (unsigned long long)cfg.seed, cfg.threads,
            (unsigned long long)cfg.seed);
    funlockfile(stderr);
    va_end(ap);
    fflush(stderr);
    /* Other threads are running: leave at once rather than tear down. */
    _exit(1);
}

#define CHECK(cond, ...)                                                       \
    do {                                                                       \
        if (!(cond))                                                           \
            fail(__VA_ARGS__);                                                 \
    } while (0)

static const char *en(int rc)
{
    return coalesce_err_name(rc);
}

/* --- Random numbers ---------------------------------------------------- */

static uint64_t rnd(worker_t *t)
{
    uint64_t z = (t->rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t below(worker_t *t, uint64_t n)
{
    return n ? rnd(t) % n : 0;
}

/* --- Deterministic content ------------------------------------------------ */

static unsigned char pattern(uint64_t seed, uint64_t i)
{
    uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
    x ^= x >> 29;
    return (unsigned char)(x * 0xBF58476D1CE4E5B9ull >> 56);
}

static unsigned char *body_new(uint64_t seed, size_t len)
{
    unsigned char *b = malloc(len ? len : 1);
    CHECK(b, "out of memory");
    for (size_t i = 0; i < len; i++)
        b[i] = pattern(seed, i);
    return b;
}

/* Object flights: keys obj:00..; the last one is larger than MAX_LAG. */
#define NOBJ 16
/* The first four are the hot keys (see op_flight()). */
static const size_t obj_lens[NOBJ] = {700,  4096, 17,    0,     1,    100,
                                      333,  1024, 1500,  2000,  3000, 5000,
                                      6000, 8192, 12000, 160000};
static unsigned char *obj_body[NOBJ];
static char obj_key[NOBJ][16], obj_meta[NOBJ][32];
static size_t obj_keylen[NOBJ], obj_metalen[NOBJ];

/* Range objects: one under a chunk, one a chunk multiple, one > MAX_LAG. */
#define NRO 4
static const uint64_t ro_size[NRO] = {5000, 33333, 100000, 262144};
static unsigned char *ro_body[NRO];
static char ro_key[NRO][16], ro_meta[NRO][16], ro_etag[NRO][16];
static size_t ro_keylen[NRO], ro_metalen[NRO], ro_etaglen[NRO];

/* Cache keys: c/p/TT/KK private to thread TT, c/s/G/K shared. */
static const char cache_prefix[] = "c/";
static char sh_key[NSH][16], sh_gpref[NGRP][16];
static size_t sh_keylen[NSH], sh_gpreflen[NGRP];
/* Newest revision of a delete that covered each shared key. */
static _Atomic int64_t sh_del[NSH];

static void atomic_max64(_Atomic int64_t *a, int64_t v)
{
    int64_t cur = atomic_load(a);
    while (cur < v && !atomic_compare_exchange_weak(a, &cur, v)) {
    }
}

static void content_init(void)
{
    for (int k = 0; k < NOBJ; k++) {
        obj_body[k] = body_new((uint64_t)k, obj_lens[k]);
        obj_keylen[k] = (size_t)snprintf(obj_key[k], 16, "obj:%02d", k);
        obj_metalen[k] = (size_t)snprintf(obj_meta[k], 32, "200 obj:%02d %zu",
                                          k, obj_lens[k]);
    }
    for (int o = 0; o < NRO; o++) {
        ro_body[o] = body_new(1000 + (uint64_t)o, ro_size[o]);
        ro_keylen[o] = (size_t)snprintf(ro_key[o], 16, "range:%d", o);
        ro_metalen[o] = (size_t)snprintf(ro_meta[o], 16, "206 range:%d", o);
        ro_etaglen[o] = (size_t)snprintf(ro_etag[o], 16, "\"v%d\"", o);
    }
    for (int g = 0; g < NGRP; g++) {
        sh_gpreflen[g] = (size_t)snprintf(sh_gpref[g], 16, "c/s/%c/", 'a' + g);
        for (int i = 0; i < NPERG; i++) {
            int k = g * NPERG + i;
            sh_keylen[k] =
                (size_t)snprintf(sh_key[k], 16, "c/s/%c/%d", 'a' + g, i);
        }
    }
}

static void content_free(void)
{
    for (int k = 0; k < NOBJ; k++)
        free(obj_body[k]);
    for (int o = 0; o < NRO; o++)
        free(ro_body[o]);
}

/* --- Writers -------------------------------------------------------------
 *
 * A plan says how a fetch behaves; the thread that produces the body draws
 * the piece sizes and the cut point.
 */

enum {
    P_OK,       /* The whole body, flight_end(w, 0). */
    P_FAIL_END, /* A prefix, then flight_end(w, COALESCE_EIO). */
    P_FAIL_RET, /* A prefix, then the callback returns COALESCE_EIO. */
    P_NOEND,    /* A prefix, then the writer goes without an end. */
    P_SHORT     /* Range: a prefix, then flight_end(w, 0): a short body. */
};

enum { W_COPY, W_WRAP, W_SLICES };

typedef struct plan {
    int kind;
    bool async;
    bool meta;
    bool meta_late; /* Range: the meta after the range, not before. */
    bool yield;     /* sched_yield() between pieces: a wider window to join. */
    int style;
} plan_t;

static void make_plan(worker_t *t, plan_t *p, bool range)
{
    unsigned r = (unsigned)below(t, 100);
    p->kind = r < 70   ? P_OK
              : r < 78 ? P_FAIL_END
              : r < 84 ? P_FAIL_RET
              : r < 90 ? P_NOEND
              : range  ? P_SHORT
                       : P_OK;
    p->async = below(t, 100) < 35;
    p->meta = below(t, 4) != 0;
    p->meta_late = range && below(t, 2);
    p->yield = below(t, 8) == 0;
    p->style = (int)below(t, 3);
}

/*
 * Writes body[0, n) in pieces. Returns 0, or FLIGHT_ECANCELED when the
 * flight was canceled (every reader left); anything else fails the run.
 * *acc counts the bytes the writer accepted.
 */
static int write_pieces(worker_t *t,
                        flight_writer_t *w,
                        const unsigned char *body,
                        uint64_t n,
                        const plan_t *p,
                        uint64_t *acc)
{
    uint64_t base = n > 8 ? n / (1 + below(t, 4)) : 1 + below(t, 4);
    coalesce_buf_t *whole = NULL;
    if (p->style == W_SLICES && n) {
        /* One buffer, published in slices: the zero-copy path that shares
         * a buffer between segments. */
        int rc = coalesce_buf_new(&whole, (size_t)n);
        CHECK(rc == 0, "coalesce_buf_new: %s", en(rc));
        memcpy(coalesce_buf_mutable(whole), body, (size_t)n);
    }
    uint64_t off = 0;
    int rc = 0;
    while (off < n) {
        uint64_t len = base + below(t, base);
        if (len > n - off)
            len = n - off;
        if (p->style == W_COPY) {
            rc = flight_write(w, body + off, (size_t)len);
        } else if (p->style == W_WRAP) {
            coalesce_buf_t *b;
            rc = coalesce_buf_new_wrap(&b, body + off, (size_t)len, NULL, NULL);
            CHECK(rc == 0, "coalesce_buf_new_wrap: %s", en(rc));
            rc = flight_write_buf(w, b, 0, (size_t)len);
            coalesce_buf_unref(b);
        } else {
            rc = flight_write_buf(w, whole, (size_t)off, (size_t)len);
        }
        if (rc == FLIGHT_ECANCELED)
            break;
        CHECK(rc == 0, "flight_write of %llu bytes at %llu: %s",
              (unsigned long long)len, (unsigned long long)off, en(rc));
        off += len;
        *acc += len;
        if (p->yield)
            sched_yield();
    }
    coalesce_buf_unref(whole);
    if (rc == FLIGHT_ECANCELED)
        t->canceled++;
    return rc;
}

/* How many bytes a plan writes out of n. */
static uint64_t plan_cut(worker_t *t, const plan_t *p, uint64_t n)
{
    if (p->kind == P_OK)
        return n;
    if (p->kind == P_SHORT)
        return n ? below(t, n) : 0;
    return below(t, n + 1);
}

/* The ending a plan asks for, once its bytes are out. */
static void plan_end(worker_t *t, flight_writer_t *w, const plan_t *p)
{
    int rc;
    switch (p->kind) {
    case P_OK:
        rc = flight_end(w, 0);
        CHECK(rc == 0 || rc == FLIGHT_ECANCELED, "flight_end(0): %s", en(rc));
        break;
    case P_FAIL_END:
        rc = flight_end(w, COALESCE_EIO);
        CHECK(rc == 0 || rc == FLIGHT_ECANCELED, "flight_end(EIO): %s", en(rc));
        break;
    case P_SHORT:
        rc = flight_end(w, 0);
        CHECK(rc == FLIGHT_EMISMATCH || rc == FLIGHT_ECANCELED,
              "flight_end(0) after a short range body: %s", en(rc));
        break;
    default:
        break; /* P_FAIL_RET, P_NOEND: the library ends it. */
    }
    if (below(t, 8) == 0)
        (void)flight_writer_readers(w);
}

/* An object flight's body, on whichever thread holds the writer. */
static void produce_obj(worker_t *t, flight_writer_t *w, int k, plan_t *p)
{
    uint64_t n = plan_cut(t, p, obj_lens[k]);
    if (write_pieces(t, w, obj_body[k], n, p, &t->obj_written) == 0)
        plan_end(t, w, p);
}

static int set_meta(worker_t *t, flight_writer_t *w, const char *m, size_t len)
{
    int rc = flight_set_meta(w, m, len);
    if (rc == FLIGHT_ECANCELED)
        t->canceled++;
    else
        CHECK(rc == 0, "flight_set_meta: %s", en(rc));
    return rc;
}

/* The reply a range fetch gets from our "upstream": the bytes asked for,
 * clipped to the object, or a 416 past its end. */
static void range_reply(worker_t *t,
                        flight_writer_t *w,
                        int o,
                        uint64_t first,
                        uint64_t last,
                        plan_t *p,
                        bool reported)
{
    uint64_t size = ro_size[o];
    int rc;
    if (first >= size) {
        if (reported)
            return;
        rc = flight_set_range(w, FLIGHT_RANGE_END, FLIGHT_RANGE_END, size,
                              ro_etag[o], ro_etaglen[o]);
        CHECK(rc == FLIGHT_ERANGE || rc == FLIGHT_ECANCELED,
              "flight_set_range(416) of %s from %llu: %s", ro_key[o],
              (unsigned long long)first, en(rc));
        return;
    }
    uint64_t l = last == FLIGHT_RANGE_END || last >= size ? size - 1 : last;
    if (!reported) {
        rc = flight_set_range(w, first, l, size, ro_etag[o], ro_etaglen[o]);
        if (rc == FLIGHT_ECANCELED) {
            t->canceled++;
            return;
        }
        CHECK(rc == 0, "flight_set_range(%llu-%llu/%llu): %s",
              (unsigned long long)first, (unsigned long long)l,
              (unsigned long long)size, en(rc));
    }
    if (p->meta && p->meta_late &&
        set_meta(t, w, ro_meta[o], ro_metalen[o]) != 0)
        return;
    uint64_t n = plan_cut(t, p, l - first + 1);
    if (write_pieces(t, w, ro_body[o] + first, n, p, &t->range_written) == 0)
        plan_end(t, w, p);
}

/* --- The async queue -------------------------------------------------------
 *
 * Writers kept with FLIGHT_FETCH_ASYNC wait here; any thread finishes them.
 */

typedef struct item {
    struct item *next, *prev;
    flight_writer_t *w;
    plan_t plan;
    int owner;
    int obj;
    bool range, reported;
    uint64_t first, last;
} item_t;

static pthread_mutex_t qmu = PTHREAD_MUTEX_INITIALIZER;
static item_t *qhead, *qtail; /* Oldest, newest. */

static void push(item_t *it)
{
    pthread_mutex_lock(&qmu);
    it->next = NULL;
    it->prev = qtail;
    if (qtail)
        qtail->next = it;
    else
        qhead = it;
    qtail = it;
    pthread_mutex_unlock(&qmu);
}

/* Takes it out of the queue, under qmu. */
static void unlink_item(item_t *it)
{
    if (it->prev)
        it->prev->next = it->next;
    else
        qhead = it->next;
    if (it->next)
        it->next->prev = it->prev;
    else
        qtail = it->prev;
}

/* The oldest writer, if any. */
static item_t *pop(void)
{
    pthread_mutex_lock(&qmu);
    item_t *it = qhead;
    if (it)
        unlink_item(it);
    pthread_mutex_unlock(&qmu);
    return it;
}

static void complete(worker_t *t, item_t *it)
{
    if (it->range)
        range_reply(t, it->w, it->obj, it->first, it->last, &it->plan,
                    it->reported);
    else
        produce_obj(t, it->w, it->obj, &it->plan);
    flight_writer_release(it->w);
    t->async_done++;
    if (it->owner != t->id)
        t->async_foreign++;
    free(it);
}

/* Finishes the oldest queued writer, if any. */
static bool complete_one(worker_t *t)
{
    item_t *it = pop();
    if (it)
        complete(t, it);
    return it != NULL;
}

/*
 * Finishes a queued writer the reader s may be waiting for (one of its
 * object's), if any. A waiting reader calls it before each wait, so
 * nobody waits long for a writer in the queue, and queued writers nobody
 * waits for stay there a while: other threads join their flights.
 */
static bool complete_for(worker_t *t, const rslot_t *s)
{
    pthread_mutex_lock(&qmu);
    item_t *it = qtail;
    while (it && (it->range != s->range || it->obj != s->obj))
        it = it->prev;
    if (it)
        unlink_item(it);
    pthread_mutex_unlock(&qmu);
    if (it)
        complete(t, it);
    return it != NULL;
}

/* --- Fetch callbacks -------------------------------------------------------*/

typedef struct fctx {
    worker_t *t;
    int obj;
    plan_t plan;
    int calls;
} fctx_t;

static int obj_fetch(flight_writer_t *w, void *data)
{
    fctx_t *f = data;
    worker_t *t = f->t;
    CHECK(t == self, "fetch callback ran on another thread");
    CHECK(++f->calls == 1, "fetch callback ran %d times", f->calls);
    t->leads++;
    if (f->plan.meta &&
        set_meta(t, w, obj_meta[f->obj], obj_metalen[f->obj]) != 0)
        return FLIGHT_FETCH_DONE;
    if (f->plan.async) {
        item_t *it = calloc(1, sizeof(*it));
        CHECK(it, "out of memory");
        *it = (item_t){.w = w, .plan = f->plan, .owner = t->id, .obj = f->obj};
        push(it);
        t->async_pushed++;
        return FLIGHT_FETCH_ASYNC;
    }
    produce_obj(t, w, f->obj, &f->plan);
    return f->plan.kind == P_FAIL_RET ? COALESCE_EIO : FLIGHT_FETCH_DONE;
}

typedef struct rfctx {
    worker_t *t;
    int obj;
    uint64_t first, last; /* What the caller asked for. */
    uint64_t prev;        /* The previous call's first byte. */
    int calls;
} rfctx_t;

static int
range_fetch(flight_writer_t *w, uint64_t first, uint64_t last, void *data)
{
    rfctx_t *x = data;
    worker_t *t = x->t;
    CHECK(t == self, "range fetch callback ran on another thread");
    CHECK(first % CHUNK == 0, "range fetch from %llu: not chunk-aligned",
          (unsigned long long)first);
    CHECK(x->calls == 0 || first > x->prev,
          "range fetches out of order: %llu after %llu",
          (unsigned long long)first, (unsigned long long)x->prev);
    CHECK(last == FLIGHT_RANGE_END || last >= first,
          "range fetch %llu-%llu: last before first", (unsigned long long)first,
          (unsigned long long)last);
    /* Nothing nobody asked for, beyond chunk rounding. */
    uint64_t lo = x->first - x->first % CHUNK;
    CHECK(first >= lo, "range fetch from %llu for a request from %llu",
          (unsigned long long)first, (unsigned long long)x->first);
    if (x->last != FLIGHT_RANGE_END)
        CHECK(first <= x->last && last != FLIGHT_RANGE_END &&
                  last <= x->last - x->last % CHUNK + CHUNK - 1,
              "range fetch %llu-%llu for a request %llu-%llu",
              (unsigned long long)first, (unsigned long long)last,
              (unsigned long long)x->first, (unsigned long long)x->last);
    x->calls++;
    x->prev = first;
    t->range_fetches++;
    plan_t p;
    make_plan(t, &p, true);
    if (p.meta && !p.meta_late &&
        set_meta(t, w, ro_meta[x->obj], ro_metalen[x->obj]) != 0)
        return FLIGHT_FETCH_DONE;
    if (p.async) {
        item_t *it = calloc(1, sizeof(*it));
        CHECK(it, "out of memory");
        *it = (item_t){.w = w,
                       .plan = p,
                       .owner = t->id,
                       .obj = x->obj,
                       .range = true,
                       .first = first,
                       .last = last};
        if (below(t, 2) && first < ro_size[x->obj]) {
            /* Report the range here, write the body elsewhere. */
            uint64_t size = ro_size[x->obj];
            uint64_t l =
                last == FLIGHT_RANGE_END || last >= size ? size - 1 : last;
            int rc = flight_set_range(w, first, l, size, ro_etag[x->obj],
                                      ro_etaglen[x->obj]);
            CHECK(rc == 0 || rc == FLIGHT_ECANCELED,
                  "flight_set_range(%llu-%llu): %s", (unsigned long long)first,
                  (unsigned long long)l, en(rc));
            if (rc) {
                t->canceled++;
                free(it);
                return FLIGHT_FETCH_DONE;
            }
            it->reported = true;
        }
        push(it);
        t->async_pushed++;
        return FLIGHT_FETCH_ASYNC;
    }
    range_reply(t, w, x->obj, first, last, &p, false);
    return p.kind == P_FAIL_RET ? COALESCE_EIO : FLIGHT_FETCH_DONE;
}

/* --- Readers ---------------------------------------------------------------*/

enum { R_COPY, R_PEEK, R_NOTIFY, R_MODES };

static rslot_t *
slot_open(worker_t *t, int i, flight_reader_t *r, bool range, int obj)
{
    rslot_t *s = &t->slots[i];
    s->r = r;
    s->range = range;
    s->obj = obj;
    s->t = t;
    s->offset_unknown = false;
    atomic_store(&s->open, 1);
    return s;
}

static void slot_close(rslot_t *s)
{
    flight_reader_close(s->r);
    atomic_store(&s->open, 0);
    s->r = NULL;
}

static void on_notify(flight_reader_t *r, void *data)
{
    rslot_t *s = data;
    CHECK(s->r == r, "notify callback for another reader");
    CHECK(atomic_load(&s->open), "notify callback after close");
    worker_t *t = s->t;
    pthread_mutex_lock(&t->nmu);
    t->nfired++;
    pthread_cond_signal(&t->ncv);
    pthread_mutex_unlock(&t->nmu);
}

/* Arms the notify callback and waits until it fires or TICK_MS pass:
 * true if it fired (or the reader is ready now). */
static bool wait_notify(worker_t *t, rslot_t *s)
{
    pthread_mutex_lock(&t->nmu);
    unsigned seen = t->nfired;
    pthread_mutex_unlock(&t->nmu);
    int rc = flight_reader_notify(s->r, on_notify, s);
    if (rc == 1)
        return true;
    CHECK(rc == 0, "flight_reader_notify: %s", en(rc));
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += TICK_MS * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&t->nmu);
    int e = 0;
    while (t->nfired == seen && e == 0)
        e = pthread_cond_timedwait(&t->ncv, &t->nmu, &ts);
    bool fired = t->nfired != seen;
    pthread_mutex_unlock(&t->nmu);
    return fired; /* If not, the arming stays: the next one replaces it. */
}

/* The n bytes at p must be want[off, off + n), within wantlen. */
static void verify(const unsigned char *p,
                   size_t n,
                   const unsigned char *want,
                   uint64_t wantlen,
                   uint64_t off,
                   const char *what)
{
    CHECK(off + n <= wantlen, "%s: %zu bytes at %llu, past the end (%llu)",
          what, n, (unsigned long long)off, (unsigned long long)wantlen);
    if (memcmp(p, want + off, n) != 0) {
        size_t i = 0;
        while (p[i] == want[off + i])
            i++;
        fail("%s: byte %llu is 0x%02x, want 0x%02x", what,
             (unsigned long long)(off + i), p[i], want[off + i]);
    }
}

/* One read of at most the next segment, without waiting longer than tmo:
 * 0 with *n > 0 bytes checked and consumed, or the reader's status. */
static int read_once(worker_t *t,
                     rslot_t *s,
                     bool peek,
                     int tmo,
                     const unsigned char *want,
                     uint64_t wantlen,
                     uint64_t off,
                     const char *what,
                     size_t *n)
{
    *n = 0;
    if (peek) {
        const void *p = NULL;
        size_t len = 0;
        coalesce_buf_t *owner = NULL;
        bool want_owner = below(t, 2);
        int rc = flight_peek(s->r, tmo, &p, &len, want_owner ? &owner : NULL);
        if (rc)
            return rc;
        CHECK(p && len > 0, "flight_peek: 0 gave %zu bytes", len);
        verify(p, len, want, wantlen, off, what);
        if (want_owner) {
            const unsigned char *b = coalesce_buf_data(owner);
            CHECK(b && (const unsigned char *)p >= b &&
                      (const unsigned char *)p + len <=
                          b + coalesce_buf_len(owner),
                  "flight_peek: the bytes are outside their owner");
        }
        size_t take = below(t, 4) == 0 ? 1 + (size_t)below(t, len) : len;
        rc = flight_consume(s->r, take);
        if (rc) {
            CHECK(rc < 0 && rc != COALESCE_EAGAIN && rc != COALESCE_EINVAL,
                  "flight_consume: %s", en(rc));
            s->offset_unknown = true;
            return rc;
        }
        *n = take;
        return 0;
    }
    size_t cap = below(t, 32) == 0 ? 1 + (size_t)below(t, 16)
                                   : 1 + (size_t)below(t, RBUF);
    int rc = flight_read(s->r, t->buf, cap, tmo, n);
    if (rc)
        return rc;
    CHECK(*n > 0 && *n <= cap, "flight_read: 0 with %zu bytes of %zu", *n, cap);
    verify(t->buf, *n, want, wantlen, off, what);
    return 0;
}

/* The next bytes, waiting as long as it takes (bounded by STALL_MS). */
static int read_step(worker_t *t,
                     rslot_t *s,
                     int mode,
                     const unsigned char *want,
                     uint64_t wantlen,
                     uint64_t off,
                     const char *what,
                     size_t *n)
{
    bool peek = mode == R_PEEK;
    int rc = read_once(t, s, peek, 0, want, wantlen, off, what, n);
    double since = 0;
    for (long spurious = 0; rc == COALESCE_EAGAIN;) {
        if (complete_for(t, s)) {
            rc = read_once(t, s, peek, 0, want, wantlen, off, what, n);
            continue;
        }
        double now = now_s();
        if (!since)
            since = now;
        CHECK(now - since < STALL_MS / 1000, "%s: nothing to read for %d s",
              what, STALL_MS / 1000);
        if (mode == R_NOTIFY) {
            bool fired = wait_notify(t, s);
            rc = read_once(t, s, false, 0, want, wantlen, off, what, n);
            t->waits++;
            if (!fired)
                t->ticks++;
            /* Spurious notifications are allowed, but not forever. */
            if (fired && rc == COALESCE_EAGAIN)
                CHECK(++spurious < 100000,
                      "%s: notified %ld times with nothing to read", what,
                      spurious);
        } else {
            double w0 = now_s();
            rc = read_once(t, s, peek, TICK_MS, want, wantlen, off, what, n);
            t->waits++;
            if (rc == COALESCE_EAGAIN || now_s() - w0 >= TICK_MS / 1000.0)
                t->ticks++;
        }
    }
    return rc;
}

/* Waits for the meta (bounded as above). */
static int meta_wait(worker_t *t, rslot_t *s, const void **m, size_t *ml)
{
    int rc = flight_meta(s->r, 0, m, ml);
    double since = now_s();
    while (rc == COALESCE_EAGAIN) {
        CHECK(now_s() - since < STALL_MS / 1000, "no meta for %d s",
              STALL_MS / 1000);
        rc = flight_meta(s->r, complete_for(t, s) ? 0 : TICK_MS, m, ml);
    }
    return rc;
}

static void count_status(worker_t *t, int rc)
{
    int i = rc == COALESCE_EOF         ? S_EOF
            : rc == COALESCE_EIO       ? S_EIO
            : rc == COALESCE_EUPSTREAM ? S_EUPSTREAM
            : rc == FLIGHT_ELAGGED     ? S_ELAGGED
            : rc == FLIGHT_EMISMATCH   ? S_EMISMATCH
                                       : S_ERANGE;
    t->status[i]++;
}

/* After its end a reader says the same again, with no more bytes. */
static void check_terminal(worker_t *t, rslot_t *s, int want, const char *what)
{
    size_t n = 0;
    int rc = flight_read(s->r, t->buf, 8, 0, &n);
    CHECK(rc == want && n == 0, "%s: read after %s gave %s and %zu bytes", what,
          en(want), en(rc), n);
}

/* --- Flight operations ---------------------------------------------------*/

/* Reads an object flight's reader to its end (or an early close) and
 * checks everything it returned. */
static void flight_finish(worker_t *t, int k, rslot_t *s)
{
    uint64_t len = obj_lens[k];
    int pre = 0;
    if (below(t, 2)) {
        const void *m = NULL;
        size_t ml = 0;
        pre = meta_wait(t, s, &m, &ml);
        if (!pre)
            CHECK(ml == 0 ||
                      (ml == obj_metalen[k] && memcmp(m, obj_meta[k], ml) == 0),
                  "%s: wrong meta (%zu bytes)", obj_key[k], ml);
    }
    uint64_t stop_at = below(t, 8) == 0 ? below(t, len + 1) : UINT64_MAX;
    int mode = (int)below(t, R_MODES);
    uint64_t got = 0;
    int rc = pre;
    while (!rc && got < stop_at) {
        size_t n;
        rc = read_step(t, s, mode, obj_body[k], len, got, obj_key[k], &n);
        got += n;
    }
    if (!rc) {
        t->early++;
    } else {
        /* A clean EOF, or the errors our writers cause. */
        CHECK(rc == COALESCE_EOF || rc == COALESCE_EIO ||
                  rc == COALESCE_EUPSTREAM ||
                  (rc == FLIGHT_ELAGGED && len > MAX_LAG),
              "%s (%llu bytes): reader ended with %s after %llu bytes",
              obj_key[k], (unsigned long long)len, en(rc),
              (unsigned long long)got);
        CHECK(rc != COALESCE_EOF || got == len,
              "%s: EOF after %llu of %llu bytes", obj_key[k],
              (unsigned long long)got, (unsigned long long)len);
        count_status(t, rc);
        if (pre || below(t, 4) == 0)
            check_terminal(t, s, rc, obj_key[k]);
    }
    if (!s->offset_unknown)
        CHECK(flight_reader_offset(s->r) == got,
              "%s: flight_reader_offset %llu, read %llu", obj_key[k],
              (unsigned long long)flight_reader_offset(s->r),
              (unsigned long long)got);
    t->delivered += got;
    slot_close(s);
}

#define DEFER_SLOT 4

/* The reader a thread put aside, if any, is read now. */
static void flight_undefer(worker_t *t)
{
    if (t->deferred) {
        t->deferred = false;
        flight_finish(t, t->def_obj, &t->slots[DEFER_SLOT]);
    }
}

static void op_flight(worker_t *t)
{
    /* Half the calls go to four hot keys, so that many collapse; the
     * large body (past MAX_LAG) is rare: it costs the most. */
    int k = below(t, 1024) == 0 ? NOBJ - 1
            : below(t, 2)       ? (int)below(t, 4)
                                : (int)below(t, NOBJ - 1);
    fctx_t f = {.t = t, .obj = k};
    make_plan(t, &f.plan, false);
    flight_reader_t *r = NULL;
    int rc = flight_do(grp, obj_key[k], obj_keylen[k], obj_fetch, &f, &r);
    CHECK(rc == 0 && r, "flight_do(%s): %s", obj_key[k], en(rc));
    int shared = flight_reader_shared(r);
    CHECK(shared == (f.calls == 0), "flight_reader_shared is %d, fetch ran %d",
          shared, f.calls);
    if (shared)
        t->joins++;
    if ((shared || f.plan.async) && !t->deferred && below(t, 4)) {
        /* Read it after a while (leader or joiner): its writer may wait in
         * the queue meanwhile and more threads join. The while is counted in
         * everybody's operations (with 2 cores, most threads are not
         * running at any one time), bounded by this thread's own. */
        slot_open(t, DEFER_SLOT, r, false, k);
        t->deferred = true;
        t->def_obj = k;
        t->def_ops = 256;
        t->def_until = atomic_load_explicit(&ops_all, memory_order_relaxed) +
                       8 + (long)below(t, 64);
        return;
    }
    flight_finish(t, k, slot_open(t, 0, r, false, k));
}

typedef struct rreq {
    int obj;
    uint64_t first, last; /* As asked. */
    uint64_t want;        /* Bytes expected: the range clipped. */
    uint64_t got, stop_at;
    int mode, status;
    rslot_t *s;
    char what[64];
} rreq_t;

static void range_end(worker_t *t, rreq_t *q)
{
    int rc = q->status;
    uint64_t size = ro_size[q->obj];
    if (!rc) {
        t->early++;
    } else if (q->first >= size) {
        CHECK(rc == FLIGHT_ERANGE || rc == COALESCE_EIO ||
                  rc == COALESCE_EUPSTREAM || rc == FLIGHT_EMISMATCH,
              "%s: past the end, reader ended with %s", q->what, en(rc));
        count_status(t, rc);
    } else {
        CHECK(rc == COALESCE_EOF || rc == COALESCE_EIO ||
                  rc == COALESCE_EUPSTREAM || rc == FLIGHT_EMISMATCH ||
                  (rc == FLIGHT_ELAGGED && q->want > MAX_LAG),
              "%s: reader ended with %s after %llu bytes", q->what, en(rc),
              (unsigned long long)q->got);
        CHECK(rc != COALESCE_EOF || q->got == q->want,
              "%s: EOF after %llu of %llu bytes", q->what,
              (unsigned long long)q->got, (unsigned long long)q->want);
        count_status(t, rc);
    }
    if (rc && below(t, 4) == 0)
        check_terminal(t, q->s, rc, q->what);
    if (!q->s->offset_unknown)
        CHECK(flight_reader_offset(q->s->r) == q->got,
              "%s: flight_reader_offset %llu, read %llu", q->what,
              (unsigned long long)flight_reader_offset(q->s->r),
              (unsigned long long)q->got);
    t->delivered += q->got;
    slot_close(q->s);
    q->s = NULL;
}

/* The meta and flight_reader_range() of a range reader. */
static void range_meta(worker_t *t, rreq_t *q)
{
    const void *m = NULL;
    size_t ml = 0;
    int rc = meta_wait(t, q->s, &m, &ml);
    if (!rc) {
        CHECK(ml == 0 || (ml == ro_metalen[q->obj] &&
                          memcmp(m, ro_meta[q->obj], ml) == 0),
              "%s: wrong meta (%zu bytes)", q->what, ml);
        uint64_t f = 0, l = 0, total = 0, size = ro_size[q->obj];
        rc = flight_reader_range(q->s->r, &f, &l, &total);
        if (rc == FLIGHT_ERANGE && q->first >= size) {
            CHECK(total == size, "%s: flight_reader_range: total %llu", q->what,
                  (unsigned long long)total);
            return;
        }
        CHECK(rc != COALESCE_EAGAIN && rc != COALESCE_EINVAL,
              "%s: flight_reader_range after the meta: %s", q->what, en(rc));
        if (!rc) {
            CHECK(q->first < size && f == q->first &&
                      l == q->first + q->want - 1 && total == size,
                  "%s: flight_reader_range %llu-%llu/%llu", q->what,
                  (unsigned long long)f, (unsigned long long)l,
                  (unsigned long long)total);
            return;
        }
        /* The fetch serving the first byte ended before reporting the
         * range (meta set first): its error, or the reader's own. */
    }
    /* An end before any byte: range_end() checks it is an allowed one, and
     * reading must say it again. */
    q->status = rc;
    size_t n = 0;
    int again = flight_read(q->s->r, t->buf, 8, 0, &n);
    CHECK(again == rc && n == 0, "%s: meta or range gave %s, then read %s",
          q->what, en(rc), en(again));
}

static void op_range(worker_t *t)
{
    rreq_t q[3];
    int n = 1 + (int)below(t, 3), open = 0;
    int common = (int)below(t, NRO); /* Mostly one object: overlaps. */
    for (int i = 0; i < n; i++) {
        rreq_t *x = &q[i];
        memset(x, 0, sizeof(*x));
        x->obj = below(t, 4) ? common : (int)below(t, NRO);
        uint64_t size = ro_size[x->obj];
        /* Mostly short ranges anywhere; a few past the end, across the
         * end, or long (past MAX_LAG). */
        enum { PAST, ACROSS, LONG, SHORT } kind;
        unsigned r = (unsigned)below(t, 128);
        kind = r < 4 ? PAST : r < 8 ? ACROSS : r == 8 ? LONG : SHORT;
        if (kind == PAST)
            x->first = size + below(t, size / 8 + 1);
        else if (kind == ACROSS)
            x->first = size - 1 - below(t, 100);
        else if (kind == LONG)
            x->first = below(t, size / 4);
        else
            x->first = below(t, size);
        if (kind == LONG)
            x->last = below(t, 2) ? FLIGHT_RANGE_END
                                  : x->first + 100 * KiB + below(t, 200 * KiB);
        else if (below(t, 4) == 0 &&
                 (kind != SHORT || size - x->first < 16 * KiB))
            x->last = FLIGHT_RANGE_END;
        else
            x->last = x->first + below(t, 8 * KiB);
        uint64_t l = x->last >= size ? size - 1 : x->last;
        x->want = x->first < size ? l - x->first + 1 : 0;
        x->stop_at = below(t, 8) == 0 ? below(t, x->want + 1) : UINT64_MAX;
        x->mode = (int)below(t, R_MODES);
        snprintf(x->what, sizeof(x->what), "%s %llu-%lld", ro_key[x->obj],
                 (unsigned long long)x->first,
                 x->last == FLIGHT_RANGE_END ? -1LL : (long long)x->last);
        rfctx_t rx = {
            .t = t, .obj = x->obj, .first = x->first, .last = x->last};
        flight_reader_t *rd = NULL;
        int rc = flight_do_range(grp, ro_key[x->obj], ro_keylen[x->obj],
                                 x->first, x->last, range_fetch, &rx, &rd);
        t->range_calls++;
        if (rc == FLIGHT_ERANGE) {
            CHECK(x->first >= size, "%s: flight_do_range: ERANGE", x->what);
            t->erange_direct++;
            continue;
        }
        CHECK(rc == 0 && rd, "%s: flight_do_range: %s", x->what, en(rc));
        CHECK(rx.calls > 0 || flight_reader_shared(rd),
              "%s: no fetch led and not shared", x->what);
        x->s = slot_open(t, 1 + i, rd, true, x->obj);
        open++;
        if (below(t, 4) == 0)
            range_meta(t, x);
    }
    /* Read them in random order, a step at a time. */
    while (open) {
        rreq_t *x = &q[below(t, (uint64_t)n)];
        if (!x->s)
            continue;
        if (!x->status && x->got < x->stop_at) {
            size_t m;
            x->status = read_step(t, x->s, x->mode, ro_body[x->obj] + x->first,
                                  x->want, x->got, x->what, &m);
            x->got += m;
            if (!x->status && x->got < x->stop_at)
                continue;
        }
        range_end(t, x);
        open--;
    }
}

static void op_stats(worker_t *t)
{
    flight_stats_t s;
    int rc = flight_group_stats(grp, &s, sizeof(s));
    CHECK(rc == 0, "flight_group_stats: %s", en(rc));
    /* Each shard only counts up, so each sum does too. */
#define MONO(f)                                                                \
    CHECK(s.f >= t->last.f, "flight stats: " #f " went from %llu to %llu",     \
          (unsigned long long)t->last.f, (unsigned long long)s.f)
    MONO(flights_started);
    MONO(joins);
    MONO(errors);
    MONO(lagged);
    MONO(bytes_written);
    MONO(bytes_delivered);
    MONO(orphaned);
    MONO(range_fetches);
    MONO(chunk_joins);
    MONO(range_bytes_requested);
    MONO(range_bytes_fetched);
    MONO(range_mismatches);
#undef MONO
    CHECK(s.timeouts == 0, "flight stats: %llu timeouts without a deadline",
          (unsigned long long)s.timeouts);
    t->last = s;

    cache_health_t h;
    rc = cache_health(cache, &h, sizeof(h));
    CHECK(rc == 0 && h.state == CACHE_RUNNING && h.relists == 0 &&
              h.reconnects == 0,
          "cache_health: %s, state %d, %llu relists, %llu reconnects", en(rc),
          h.state, (unsigned long long)h.relists,
          (unsigned long long)h.reconnects);
    CHECK(h.watch_rev >= t->watch_rev, "cache watch revision went back");
    t->watch_rev = h.watch_rev;
}

/* --- Cache values and checks --------------------------------------------
 *
 * A value names its key, its writer and the writer's sequence number, then
 * padding derived from them, so any read can be checked on its own.
 */

/* Appends the decimal digits of v >= 0 (no stdio: cheap under TSan). */
static size_t put_num(char *out, long v)
{
    char d[24];
    size_t n = 0;
    do {
        d[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (size_t i = 0; i < n; i++)
        out[i] = d[n - 1 - i];
    return n;
}

static size_t mkval(char *out, const char *key, int tid, long seq)
{
    size_t n = strlen(key);
    memcpy(out, key, n);
    out[n++] = '|';
    n += put_num(out + n, tid);
    out[n++] = '|';
    n += put_num(out + n, seq);
    out[n++] = '|';
    size_t pad = (size_t)(seq % 97);
    for (size_t i = 0; i < pad; i++)
        out[n + i] = (char)('a' + (seq + (long)i) % 26);
    return n + pad;
}

/* The number at p[*at] up to a '|', which is skipped; -1 if none. */
static long get_num(const char *p, size_t len, size_t *at)
{
    size_t i = *at;
    long v = 0;
    while (i < len && i - *at < 18 && p[i] >= '0' && p[i] <= '9')
        v = v * 10 + (p[i++] - '0');
    if (i == *at || i >= len || p[i] != '|')
        return -1;
    *at = i + 1;
    return v;
}

/* Checks a value of key; returns its writer and sequence number. */
static void
check_val(const char *key, const void *v, size_t vl, int *tid, long *seq)
{
    const char *p = v;
    char want[VALMAX];
    size_t kl = strlen(key), at = kl + 1;
    int show = (int)(vl < 60 ? vl : 60);
    CHECK(p && vl > kl && vl < VALMAX && !memcmp(p, key, kl) && p[kl] == '|',
          "%s: value of %zu bytes is not one of this key's", key, vl);
    long a = get_num(p, vl, &at), b = a >= 0 ? get_num(p, vl, &at) : -1;
    CHECK(a >= 0 && a < cfg.threads && b > 0,
          "%s: value \"%.*s\" is not one of this key's", key, show, p);
    *tid = (int)a;
    *seq = b;
    size_t wl = mkval(want, key, *tid, *seq);
    CHECK(wl == vl && !memcmp(want, p, vl), "%s: value \"%.*s\" is torn", key,
          show, p);
}

static void check_meta(const char *key, const cache_meta_t *m)
{
    CHECK(m->create_rev >= 2 && m->mod_rev >= m->create_rev &&
              m->version >= 1 && m->version <= m->mod_rev - m->create_rev + 1 &&
              m->lease == 0 && (m->version > 1 || m->create_rev == m->mod_rev),
          "%s: impossible meta create %lld mod %lld version %lld lease %lld",
          key, (long long)m->create_rev, (long long)m->mod_rev,
          (long long)m->version, (long long)m->lease);
}

/* A private key must read exactly as the model says. */
static void priv_check(worker_t *t, int k)
{
    coalesce_buf_t *v = NULL;
    cache_meta_t m;
    const pmodel_t *p = &t->priv[k];
    int rc = cache_get(cache, t->pkey[k], t->pkeylen, &v, &m);
    if (!p->exists) {
        CHECK(rc == COALESCE_ENOENT, "%s: deleted, cache_get gave %s",
              t->pkey[k], en(rc));
        return;
    }
    CHECK(rc == 0, "%s: written at %lld, cache_get gave %s", t->pkey[k],
          (long long)p->mod, en(rc));
    int tid;
    long seq;
    check_val(t->pkey[k], coalesce_buf_data(v), coalesce_buf_len(v), &tid,
              &seq);
    coalesce_buf_unref(v);
    CHECK(tid == t->id && seq == p->seq && m.mod_rev == p->mod &&
              m.create_rev == p->create && m.version == p->version &&
              m.lease == 0,
          "%s: read seq %ld mod %lld create %lld version %lld, want seq %ld "
          "mod %lld create %lld version %lld",
          t->pkey[k], seq, (long long)m.mod_rev, (long long)m.create_rev,
          (long long)m.version, p->seq, (long long)p->mod, (long long)p->create,
          (long long)p->version);
}

static void priv_put(worker_t *t, int k, int64_t rev, long seq)
{
    pmodel_t *p = &t->priv[k];
    if (p->exists) {
        p->version++;
    } else {
        p->exists = true;
        p->create = rev;
        p->version = 1;
    }
    p->mod = rev;
    p->seq = seq;
}

/* What a read of shared key k showed (found, with meta m) must agree with
 * everything this thread knows of it. */
static void sh_saw(worker_t *t, int k, bool found, const cache_meta_t *m)
{
    if (!found) {
        if (t->sh_live[k] > t->need_del[k])
            t->need_del[k] = t->sh_live[k];
        return;
    }
    check_meta(sh_key[k], m);
    CHECK(m->mod_rev >= t->sh_floor[k],
          "%s: read revision %lld, but %lld or newer was already known",
          sh_key[k], (long long)m->mod_rev, (long long)t->sh_floor[k]);
    t->sh_floor[k] = m->mod_rev;
    if (m->mod_rev > t->sh_live[k])
        t->sh_live[k] = m->mod_rev;
}

/* Reads shared key k; returns 1 with its mod revision in *mod if found. */
static int sh_get(worker_t *t, int k, int64_t *mod)
{
    coalesce_buf_t *v = NULL;
    cache_meta_t m;
    int rc = cache_get(cache, sh_key[k], sh_keylen[k], &v, &m);
    if (rc == COALESCE_ENOENT) {
        sh_saw(t, k, false, NULL);
        return 0;
    }
    CHECK(rc == 0, "%s: cache_get: %s", sh_key[k], en(rc));
    int tid;
    long seq;
    check_val(sh_key[k], coalesce_buf_data(v), coalesce_buf_len(v), &tid, &seq);
    coalesce_buf_unref(v);
    sh_saw(t, k, true, &m);
    if (tid == t->id && seq == t->sh_seq[k])
        CHECK(m.mod_rev == t->sh_rev[k],
              "%s: this thread's put at %lld read back at %lld", sh_key[k],
              (long long)t->sh_rev[k], (long long)m.mod_rev);
    else if (t->sh_rev[k] && m.mod_rev == t->sh_rev[k])
        fail("%s: this thread's put at %lld reads as thread %d's seq %ld",
             sh_key[k], (long long)t->sh_rev[k], tid, seq);
    if (mod)
        *mod = m.mod_rev;
    return 1;
}

/* This thread's write of shared key k was acknowledged at rev. */
static void sh_wrote(worker_t *t, int k, int64_t rev, long seq)
{
    t->sh_seq[k] = seq;
    t->sh_rev[k] = rev;
    if (rev > t->sh_floor[k])
        t->sh_floor[k] = rev;
    if (rev > t->sh_live[k])
        t->sh_live[k] = rev;
}

/* ...or its delete, at rev: nothing at or below rev may come back. */
static void sh_deleted(worker_t *t, int k, int64_t rev)
{
    atomic_max64(&sh_del[k], rev);
    if (rev + 1 > t->sh_floor[k])
        t->sh_floor[k] = rev + 1;
}

/* Sometimes wait for the watch to deliver a write: the write-through and
 * the watch must agree. */
static void maybe_fresh(worker_t *t, int64_t rev)
{
    t->cache_writes++;
    if (below(t, 256))
        return;
    int rc = cache_wait_fresh(cache, rev, STALL_MS);
    CHECK(rc == 0, "cache_wait_fresh(%lld): %s", (long long)rev, en(rc));
    t->fresh_waits++;
}

/* --- Cache operations ------------------------------------------------------*/

static void op_get(worker_t *t)
{
    unsigned r = (unsigned)below(t, 10);
    if (r < 4) {
        priv_check(t, (int)below(t, NPRIV));
    } else if (r < 8) {
        sh_get(t, (int)below(t, NSH), NULL);
    } else {
        /* Another thread's key: only its own values may be there. */
        int o = (int)below(t, (uint64_t)cfg.threads), k = (int)below(t, NPRIV);
        coalesce_buf_t *v = NULL;
        cache_meta_t m;
        int rc = cache_get(cache, workers[o].pkey[k], t->pkeylen, &v, &m);
        if (rc == COALESCE_ENOENT)
            return;
        CHECK(rc == 0, "%s: cache_get: %s", workers[o].pkey[k], en(rc));
        int tid;
        long seq;
        check_val(workers[o].pkey[k], coalesce_buf_data(v), coalesce_buf_len(v),
                  &tid, &seq);
        coalesce_buf_unref(v);
        check_meta(workers[o].pkey[k], &m);
        CHECK(tid == o, "%s: written by thread %d", workers[o].pkey[k], tid);
    }
}

static void op_put(worker_t *t)
{
    char v[VALMAX];
    long seq = ++t->seq;
    int64_t rev = 0;
    if (below(t, 2)) {
        int k = (int)below(t, NPRIV);
        size_t vl = mkval(v, t->pkey[k], t->id, seq);
        int rc = cache_put(cache, t->pkey[k], t->pkeylen, v, vl, NULL, &rev);
        CHECK(rc == 0, "%s: cache_put: %s", t->pkey[k], en(rc));
        priv_put(t, k, rev, seq);
        priv_check(t, k);
    } else {
        int k = (int)below(t, NSH);
        size_t vl = mkval(v, sh_key[k], t->id, seq);
        int rc = cache_put(cache, sh_key[k], sh_keylen[k], v, vl, NULL, &rev);
        CHECK(rc == 0, "%s: cache_put: %s", sh_key[k], en(rc));
        sh_wrote(t, k, rev, seq);
        sh_get(t, k, NULL);
    }
    maybe_fresh(t, rev);
}

static void op_create(worker_t *t)
{
    char v[VALMAX];
    long seq = ++t->seq;
    int64_t rev = 0;
    if (below(t, 2)) {
        int k = (int)below(t, NPRIV);
        size_t vl = mkval(v, t->pkey[k], t->id, seq);
        int rc = cache_create(cache, t->pkey[k], t->pkeylen, v, vl, NULL, &rev);
        if (t->priv[k].exists) {
            CHECK(rc == COALESCE_EEXIST, "%s: cache_create of a live key: %s",
                  t->pkey[k], en(rc));
            t->exists_hits++;
        } else {
            CHECK(rc == 0, "%s: cache_create of a deleted key: %s", t->pkey[k],
                  en(rc));
            priv_put(t, k, rev, seq);
            maybe_fresh(t, rev);
        }
        priv_check(t, k);
    } else {
        int k = (int)below(t, NSH);
        size_t vl = mkval(v, sh_key[k], t->id, seq);
        int rc =
            cache_create(cache, sh_key[k], sh_keylen[k], v, vl, NULL, &rev);
        if (rc == COALESCE_EEXIST) {
            t->exists_hits++;
            return;
        }
        CHECK(rc == 0, "%s: cache_create: %s", sh_key[k], en(rc));
        sh_wrote(t, k, rev, seq);
        sh_get(t, k, NULL);
        maybe_fresh(t, rev);
    }
}

static void op_update(worker_t *t)
{
    char v[VALMAX];
    long seq = ++t->seq;
    int64_t rev = 0;
    bool right = below(t, 2);
    if (below(t, 2)) {
        int k = (int)below(t, NPRIV);
        pmodel_t *p = &t->priv[k];
        size_t vl = mkval(v, t->pkey[k], t->id, seq);
        /* An absent key has mod revision 0: expecting 0 creates it. */
        int64_t cur = p->exists ? p->mod : 0;
        int64_t expect = right ? cur
                         : below(t, 2) && cur > 2
                             ? cur - 1 - (int64_t)below(t, (uint64_t)cur - 2)
                             : cur + 1 + (int64_t)below(t, 1000);
        int rc = cache_update(cache, t->pkey[k], t->pkeylen, v, vl, expect,
                              NULL, &rev);
        if (right) {
            CHECK(rc == 0, "%s: cache_update at its revision %lld: %s",
                  t->pkey[k], (long long)expect, en(rc));
            priv_put(t, k, rev, seq);
            maybe_fresh(t, rev);
        } else {
            CHECK(rc == COALESCE_ECONFLICT && rev >= cur,
                  "%s: cache_update expecting %lld, at %lld: %s, rev %lld",
                  t->pkey[k], (long long)expect, (long long)cur, en(rc),
                  (long long)rev);
            t->conflicts++;
        }
        priv_check(t, k);
        return;
    }
    int k = (int)below(t, NSH);
    int64_t mod = 0;
    bool found = sh_get(t, k, &mod);
    size_t vl = mkval(v, sh_key[k], t->id, seq);
    /* Mod revisions only grow, and none is 1: below what was read can
     * never match. */
    int64_t expect = right   ? mod
                     : found ? 1 + (int64_t)below(t, (uint64_t)mod - 1)
                             : 1;
    int rc =
        cache_update(cache, sh_key[k], sh_keylen[k], v, vl, expect, NULL, &rev);
    if (rc == COALESCE_ECONFLICT) {
        CHECK(rev >= mod, "%s: conflict at revision %lld, below %lld",
              sh_key[k], (long long)rev, (long long)mod);
        t->conflicts++;
        return;
    }
    CHECK(right && rc == 0, "%s: cache_update expecting %lld (read %lld): %s",
          sh_key[k], (long long)expect, (long long)mod, en(rc));
    sh_wrote(t, k, rev, seq);
    sh_get(t, k, NULL);
    maybe_fresh(t, rev);
}

static void op_delete(worker_t *t)
{
    int64_t rev = 0, deleted = -1;
    unsigned how = (unsigned)below(t, 3); /* delete, right, wrong value */
    if (below(t, 2)) {
        int k = (int)below(t, NPRIV);
        pmodel_t *p = &t->priv[k];
        int64_t cur = p->exists ? p->mod : 0;
        int rc;
        if (how == 0) {
            rc = cache_delete(cache, t->pkey[k], t->pkeylen, &deleted, &rev);
            CHECK(rc == 0 && deleted == p->exists,
                  "%s: cache_delete: %s, deleted %lld, existed %d", t->pkey[k],
                  en(rc), (long long)deleted, p->exists);
            p->exists = false;
        } else if (how == 1) {
            rc = cache_delete_value(cache, t->pkey[k], t->pkeylen, cur, &rev);
            CHECK(rc == 0, "%s: cache_delete_value at %lld: %s", t->pkey[k],
                  (long long)cur, en(rc));
            p->exists = false;
        } else {
            int64_t expect = cur ? cur + 1 : 1 + (int64_t)below(t, 1000);
            rc =
                cache_delete_value(cache, t->pkey[k], t->pkeylen, expect, &rev);
            CHECK(rc == COALESCE_ECONFLICT,
                  "%s: cache_delete_value expecting %lld at %lld: %s",
                  t->pkey[k], (long long)expect, (long long)cur, en(rc));
            t->conflicts++;
        }
        priv_check(t, k);
        return;
    }
    int k = (int)below(t, NSH);
    int rc;
    if (how == 0) {
        rc = cache_delete(cache, sh_key[k], sh_keylen[k], &deleted, &rev);
        CHECK(rc == 0 && (deleted == 0 || deleted == 1),
              "%s: cache_delete: %s, deleted %lld", sh_key[k], en(rc),
              (long long)deleted);
    } else {
        int64_t mod = 0;
        bool found = sh_get(t, k, &mod);
        int64_t expect = how == 1 ? mod
                         : found  ? 1 + (int64_t)below(t, (uint64_t)mod - 1)
                                  : 1;
        rc = cache_delete_value(cache, sh_key[k], sh_keylen[k], expect, &rev);
        if (rc == COALESCE_ECONFLICT) {
            t->conflicts++;
            return;
        }
        CHECK(how == 1 && rc == 0, "%s: cache_delete_value(%lld): %s",
              sh_key[k], (long long)expect, en(rc));
    }
    sh_deleted(t, k, rev);
    sh_get(t, k, NULL);
    maybe_fresh(t, rev);
}

static void op_delprefix(worker_t *t)
{
    int64_t rev = 0, deleted = -1;
    if (below(t, 2)) {
        /* All of this thread's keys, or those from 10 on. */
        bool sub = below(t, 2);
        const char *pre = sub ? t->psub : t->ppref;
        int lo = sub ? 10 : 0, live = 0;
        for (int k = lo; k < NPRIV; k++)
            live += t->priv[k].exists;
        int rc = cache_delete_prefix(cache, pre, strlen(pre), &deleted, &rev);
        CHECK(rc == 0 && deleted == live,
              "%s: cache_delete_prefix: %s, deleted %lld of %d", pre, en(rc),
              (long long)deleted, live);
        for (int k = lo; k < NPRIV; k++) {
            t->priv[k].exists = false;
            priv_check(t, k);
        }
        return;
    }
    int g = (int)below(t, NGRP);
    int rc =
        cache_delete_prefix(cache, sh_gpref[g], sh_gpreflen[g], &deleted, &rev);
    CHECK(rc == 0 && deleted >= 0 && deleted <= NPERG,
          "%s: cache_delete_prefix: %s, deleted %lld", sh_gpref[g], en(rc),
          (long long)deleted);
    for (int i = 0; i < NPERG; i++) {
        sh_deleted(t, g * NPERG + i, rev);
        sh_get(t, g * NPERG + i, NULL);
    }
    maybe_fresh(t, rev);
}

/* A transaction on private keys: whether it may succeed follows from the
 * model, and so does every key afterwards. */
static void txn_private(worker_t *t)
{
    cache_txn_op_t ops[6];
    char vals[6][VALMAX];
    int keys[6];
    long seqs[6];
    bool prefix = below(t, 8) == 0; /* Delete keys 10.. in the same txn. */
    int n = 1 + (int)below(t, 5), lim = prefix ? 10 : NPRIV;
    bool ok = true;
    for (int i = 0; i < n; i++) {
        int k;
        bool dup;
        do { /* Distinct keys. */
            k = (int)below(t, (uint64_t)lim);
            dup = false;
            for (int j = 0; j < i; j++)
                dup |= keys[j] == k;
        } while (dup);
        keys[i] = k;
        const pmodel_t *p = &t->priv[k];
        int64_t cur = p->exists ? p->mod : 0;
        bool right = below(t, 4) != 0;
        cache_txn_op_t *o = &ops[i];
        memset(o, 0, sizeof(*o));
        o->type = (int)below(t, 5); /* PUT .. DELETE_VALUE */
        o->key = t->pkey[k];
        o->keylen = t->pkeylen;
        seqs[i] = ++t->seq;
        if (o->type <= CACHE_TXN_UPDATE) {
            o->value = vals[i];
            o->vallen = mkval(vals[i], t->pkey[k], t->id, seqs[i]);
        }
        if (o->type == CACHE_TXN_UPDATE || o->type == CACHE_TXN_DELETE_VALUE)
            o->expect = right ? cur : cur + 1 + (int64_t)below(t, 3);
        if (o->type == CACHE_TXN_CREATE)
            ok &= !p->exists;
        if (o->type == CACHE_TXN_UPDATE || o->type == CACHE_TXN_DELETE_VALUE)
            ok &= right;
    }
    if (prefix) {
        memset(&ops[n], 0, sizeof(ops[n]));
        ops[n].type = CACHE_TXN_DELETE_PREFIX;
        ops[n].key = t->psub;
        ops[n].keylen = strlen(t->psub);
        n++;
    }
    int64_t rev = 0;
    int rc = cache_txn(cache, ops, (size_t)n, &rev);
    if (!ok) {
        CHECK(rc == COALESCE_ECONFLICT, "private txn of %d ops: %s, want %s", n,
              en(rc), en(COALESCE_ECONFLICT));
        t->conflicts++;
    } else {
        CHECK(rc == 0, "private txn of %d ops: %s", n, en(rc));
        for (int i = 0; i < n; i++) {
            if (ops[i].type == CACHE_TXN_DELETE_PREFIX) {
                for (int k = 10; k < NPRIV; k++)
                    t->priv[k].exists = false;
            } else if (ops[i].type <= CACHE_TXN_UPDATE) {
                priv_put(t, keys[i], rev, seqs[i]);
            } else {
                t->priv[keys[i]].exists = false;
            }
        }
        maybe_fresh(t, rev);
    }
    for (int k = 0; k < NPRIV; k++)
        priv_check(t, k);
}

/* A transaction on shared keys: a put, a delete, and an update of what was
 * read (or a create); sometimes a whole group deleted too. */
static void txn_shared(worker_t *t)
{
    int g = below(t, 4) == 0 ? (int)below(t, NGRP) : -1;
    int keys[3];
    for (int i = 0; i < 3; i++) {
        bool bad;
        do {
            keys[i] = (int)below(t, NSH);
            bad = g >= 0 && keys[i] / NPERG == g;
            for (int j = 0; j < i; j++)
                bad |= keys[j] == keys[i];
        } while (bad);
    }
    char v0[VALMAX], v2[VALMAX];
    long s0 = ++t->seq, s2 = ++t->seq;
    int64_t mod = 0;
    bool found = sh_get(t, keys[2], &mod);
    cache_txn_op_t ops[4] = {
        {CACHE_TXN_PUT, sh_key[keys[0]], sh_keylen[keys[0]], v0,
         mkval(v0, sh_key[keys[0]], t->id, s0), 0, NULL},
        {CACHE_TXN_DELETE, sh_key[keys[1]], sh_keylen[keys[1]], NULL, 0, 0,
         NULL},
        {found ? CACHE_TXN_UPDATE : CACHE_TXN_CREATE, sh_key[keys[2]],
         sh_keylen[keys[2]], v2, mkval(v2, sh_key[keys[2]], t->id, s2), mod,
         NULL},
        {CACHE_TXN_DELETE_PREFIX, g >= 0 ? sh_gpref[g] : NULL,
         g >= 0 ? sh_gpreflen[g] : 0, NULL, 0, 0, NULL}};
    int64_t rev = 0;
    int rc = cache_txn(cache, ops, g >= 0 ? 4 : 3, &rev);
    if (rc == COALESCE_ECONFLICT) {
        t->conflicts++;
        return;
    }
    CHECK(rc == 0, "shared txn: %s", en(rc));
    sh_wrote(t, keys[0], rev, s0);
    sh_deleted(t, keys[1], rev);
    sh_wrote(t, keys[2], rev, s2);
    for (int i = 0; i < 3; i++)
        sh_get(t, keys[i], NULL);
    if (g >= 0)
        for (int i = 0; i < NPERG; i++) {
            sh_deleted(t, g * NPERG + i, rev);
            sh_get(t, g * NPERG + i, NULL);
        }
    maybe_fresh(t, rev);
}

/* Requests the cache must refuse before contacting the store. */
static void txn_invalid(worker_t *t)
{
    int k = (int)below(t, 10);
    char v[VALMAX];
    size_t vl = mkval(v, t->pkey[k], t->id, ++t->seq);
    cache_txn_op_t ops[2] = {
        {CACHE_TXN_PUT, t->pkey[k], t->pkeylen, v, vl, 0, NULL},
        {CACHE_TXN_DELETE, t->pkey[k], t->pkeylen, NULL, 0, 0, NULL}};
    if (below(t, 2)) { /* A key inside a prefix deleted by the same txn. */
        ops[1].type = CACHE_TXN_DELETE_PREFIX;
        ops[1].key = t->ppref;
        ops[1].keylen = strlen(t->ppref);
    }
    int rc = cache_txn(cache, ops, 2, NULL);
    CHECK(rc == COALESCE_EINVAL, "invalid txn: %s", en(rc));
    priv_check(t, k);
}

static void op_txn(worker_t *t)
{
    unsigned r = (unsigned)below(t, 20);
    if (r == 0)
        txn_invalid(t);
    else if (r < 13)
        txn_private(t);
    else
        txn_shared(t);
}

typedef struct scanst {
    worker_t *t;
    char last[32];
    size_t lastlen;
    int n;
    bool seen_sh[NSH];
    cache_meta_t sh_meta[NSH];
    bool seen_priv[NPRIV];
} scanst_t;

static int scan_cb(void *data,
                   const void *key,
                   size_t keylen,
                   coalesce_buf_t *value,
                   const cache_meta_t *meta)
{
    scanst_t *st = data;
    worker_t *t = st->t;
    char k[32];
    CHECK(keylen > 0 && keylen < sizeof(k), "scan: key of %zu bytes", keylen);
    memcpy(k, key, keylen);
    k[keylen] = 0;
    if (st->n++) {
        size_t m = keylen < st->lastlen ? keylen : st->lastlen;
        int c = memcmp(st->last, k, m);
        CHECK(c < 0 || (c == 0 && st->lastlen < keylen), "scan: %s after %s", k,
              st->last);
    }
    memcpy(st->last, k, keylen + 1);
    st->lastlen = keylen;
    int tid;
    long seq;
    check_val(k, coalesce_buf_data(value), coalesce_buf_len(value), &tid, &seq);
    check_meta(k, meta);
    int a, b;
    char c;
    if (sscanf(k, "c/p/%d/%d", &a, &b) == 2) {
        CHECK(a == tid && b >= 0 && b < NPRIV &&
                  strcmp(k, workers[a].pkey[b]) == 0,
              "scan: key %s written by thread %d", k, tid);
        if (a == t->id) {
            const pmodel_t *p = &t->priv[b];
            CHECK(p->exists && p->seq == seq && p->mod == meta->mod_rev &&
                      p->create == meta->create_rev &&
                      p->version == meta->version,
                  "scan: %s seq %ld mod %lld, model: exists %d seq %ld mod "
                  "%lld",
                  k, seq, (long long)meta->mod_rev, p->exists, p->seq,
                  (long long)p->mod);
            st->seen_priv[b] = true;
        }
    } else {
        CHECK(sscanf(k, "c/s/%c/%d", &c, &b) == 2 && c >= 'a' &&
                  c < 'a' + NGRP && b >= 0 && b < NPERG,
              "scan: unknown key %s", k);
        int i = (c - 'a') * NPERG + b;
        CHECK(strcmp(k, sh_key[i]) == 0, "scan: unknown key %s", k);
        st->seen_sh[i] = true;
        st->sh_meta[i] = *meta;
    }
    return 0;
}

static void op_scan(worker_t *t)
{
    scanst_t st;
    memset(&st, 0, sizeof(st));
    st.t = t;
    unsigned r = (unsigned)below(t, 8);
    const char *pre = r < 5 ? t->ppref : r < 7 ? "c/s/" : cache_prefix;
    int rc = cache_scan(cache, pre, strlen(pre), scan_cb, &st);
    CHECK(rc == 0, "cache_scan(%s): %s", pre, en(rc));
    if (pre == t->ppref || pre == cache_prefix)
        for (int k = 0; k < NPRIV; k++)
            CHECK(st.seen_priv[k] == t->priv[k].exists, "scan of %s: %s %s",
                  pre, t->pkey[k],
                  st.seen_priv[k] ? "present but deleted" : "missing");
    if (pre != t->ppref)
        for (int k = 0; k < NSH; k++)
            sh_saw(t, k, st.seen_sh[k], &st.sh_meta[k]);
}

static void op_misc(worker_t *t)
{
    flight_reader_t *r = NULL;
    int rc;
    unsigned x = (unsigned)below(t, 16);
    if (x == 0) {
        /* The watch reaches the store's revision (a wait: rare). */
        int64_t rev = cache_memstore_revision(store);
        rc = cache_wait_fresh(cache, rev, STALL_MS);
        CHECK(rc == 0, "cache_wait_fresh(%lld): %s", (long long)rev, en(rc));
        t->fresh_waits++;
        return;
    }
    /* Requests refused before anything is done. */
    switch (x % 3) {
    case 0:
        rc = cache_get(cache, "x/1", 3, NULL, NULL);
        CHECK(rc == COALESCE_EINVAL, "cache_get outside the prefix: %s",
              en(rc));
        rc = cache_put(cache, "d/1", 3, "v", 1, NULL, NULL);
        CHECK(rc == COALESCE_EINVAL, "cache_put outside the prefix: %s",
              en(rc));
        break;
    case 1:
        rc = flight_do(grp, "k", 0, obj_fetch, NULL, &r);
        CHECK(rc == COALESCE_EINVAL && !r, "flight_do with no key: %s", en(rc));
        rc = flight_do_range(grp, ro_key[0], ro_keylen[0], 10, 9, range_fetch,
                             NULL, &r);
        CHECK(rc == COALESCE_EINVAL && !r, "flight_do_range(10, 9): %s",
              en(rc));
        break;
    default:
        rc = cache_txn(cache, NULL, 0, NULL);
        CHECK(rc == COALESCE_EINVAL, "empty txn: %s", en(rc));
        break;
    }
}

/* --- Threads ----------------------------------------------------------------
 */

static int weight_total;

static int pick_op(worker_t *t)
{
    int x = (int)below(t, (uint64_t)weight_total);
    for (int i = 0; i < NOPS; i++) {
        if (x < op_weight[i])
            return i;
        x -= op_weight[i];
    }
    return OP_GET;
}

static pthread_mutex_t dmu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t dcv = PTHREAD_COND_INITIALIZER;
static int running;

static void *run(void *arg)
{
    worker_t *t = arg;
    self = t;
    t->opname = "start";
    for (long i = 0; i < cfg.ops && !atomic_load(&stop_flag); i++) {
        /* Queued writers are finished by the threads that wait for them;
         * now and then one is finished by a thread that does not. */
        if (below(t, 256) == 0)
            complete_one(t);
        int op = pick_op(t);
        t->opname = op_names[op];
        double t0 = cfg.verbose ? now_s() : 0;
        switch (op) {
        case OP_FLIGHT:
            op_flight(t);
            break;
        case OP_RANGE:
            op_range(t);
            break;
        case OP_GET:
            op_get(t);
            break;
        case OP_PUT:
            op_put(t);
            break;
        case OP_CREATE:
            op_create(t);
            break;
        case OP_UPDATE:
            op_update(t);
            break;
        case OP_DELETE:
            op_delete(t);
            break;
        case OP_DELPREFIX:
            op_delprefix(t);
            break;
        case OP_TXN:
            op_txn(t);
            break;
        case OP_SCAN:
            op_scan(t);
            break;
        case OP_STATS:
            op_stats(t);
            break;
        default:
            op_misc(t);
            break;
        }
        long all = atomic_fetch_add_explicit(&ops_all, 1, memory_order_relaxed);
        if (t->deferred && (--t->def_ops == 0 || all >= t->def_until))
            flight_undefer(t);
        t->ops[op]++;
        if (cfg.verbose)
            t->op_time[op] += now_s() - t0;
        atomic_fetch_add_explicit(&t->done, 1, memory_order_relaxed);
    }
    t->opname = "exit";
    flight_undefer(t);
    while (complete_one(t)) {
    }
    pthread_mutex_lock(&dmu);
    running--;
    pthread_cond_signal(&dcv);
    pthread_mutex_unlock(&dmu);
    return NULL;
}

static long total_done(void)
{
    long n = 0;
    for (int i = 0; i < cfg.threads; i++)
        n += atomic_load(&workers[i].done);
    return n;
}

/* Waits for the workers, stopping them at the time limit; a worker that
 * still has not finished HANG_GRACE seconds later is stuck. */
static bool supervise(void)
{
    bool limited = false;
    double next_report = t_start + 60;
    pthread_mutex_lock(&dmu);
    while (running > 0) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += 1;
        pthread_cond_timedwait(&dcv, &dmu, &ts);
        double now = now_s();
        if (now - t_start > cfg.seconds && !limited) {
            limited = true;
            atomic_store(&stop_flag, true);
        }
        if (now - t_start > cfg.seconds + HANG_GRACE)
            fail("%d threads still running %d s after the time limit; %ld ops "
                 "done",
                 running, HANG_GRACE, total_done());
        if (now >= next_report && running > 0) {
            /* Long runs (TSan) say they are alive. */
            printf("stress: %.0f s, %ld ops\n", now - t_start, total_done());
            fflush(stdout);
            next_report += 60;
        }
    }
    pthread_mutex_unlock(&dmu);
    return limited;
}

/* --- Final checks ----------------------------------------------------------*/

typedef struct kv {
    char key[32];
    size_t keylen;
    char val[VALMAX];
    size_t vallen;
    cache_meta_t meta;
} kv_t;

typedef struct kvs {
    kv_t *v;
    size_t n, cap;
} kvs_t;

static void kvs_add(kvs_t *l,
                    const void *k,
                    size_t kl,
                    const void *v,
                    size_t vl,
                    const cache_meta_t *m)
{
    CHECK(kl < 32 && vl <= VALMAX, "final: key or value too long");
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 256;
        l->v = realloc(l->v, l->cap * sizeof(*l->v));
        CHECK(l->v, "out of memory");
    }
    kv_t *e = &l->v[l->n++];
    memcpy(e->key, k, kl);
    e->key[kl] = 0;
    e->keylen = kl;
    memcpy(e->val, v, vl);
    e->vallen = vl;
    e->meta = *m;
}

static int store_kv_cb(void *data, const cache_kv_t *kv)
{
    cache_meta_t m = {kv->create_rev, kv->mod_rev, kv->version, kv->lease};
    kvs_add(data, kv->key, kv->keylen, kv->value, kv->vallen, &m);
    return 0;
}

static int scan_kv_cb(void *data,
                      const void *key,
                      size_t keylen,
                      coalesce_buf_t *value,
                      const cache_meta_t *meta)
{
    kvs_add(data, key, keylen, coalesce_buf_data(value),
            coalesce_buf_len(value), meta);
    return 0;
}

/* The cache, once the watch has caught up, equals the store; the models of
 * private keys equal both; no shared key vanished without a delete.
 * Returns the number of keys. */
static size_t final_cache(void)
{
    int64_t rev = cache_memstore_revision(store);
    int rc = cache_wait_fresh(cache, rev, STALL_MS);
    CHECK(rc == 0, "final: cache_wait_fresh(%lld): %s", (long long)rev, en(rc));
    kvs_t a = {0}, b = {0};
    int64_t hdr = 0;
    int more = 0;
    rc = store->ops->range(store, "c/", 2, "c0", 2, 0, 0, store_kv_cb, &a, &hdr,
                           &more);
    CHECK(rc == 0 && !more && hdr == rev,
          "final: store range: %s, more %d, revision %lld of %lld", en(rc),
          more, (long long)hdr, (long long)rev);
    rc = cache_scan(cache, cache_prefix, 2, scan_kv_cb, &b);
    CHECK(rc == 0, "final: cache_scan: %s", en(rc));
    CHECK(a.n == b.n, "final: store has %zu keys, cache %zu", a.n, b.n);
    for (size_t i = 0; i < a.n; i++) {
        kv_t *x = &a.v[i], *y = &b.v[i];
        CHECK(x->keylen == y->keylen && !memcmp(x->key, y->key, x->keylen),
              "final: key %zu is %s in the store, %s in the cache", i, x->key,
              y->key);
        CHECK(x->vallen == y->vallen && !memcmp(x->val, y->val, x->vallen) &&
                  !memcmp(&x->meta, &y->meta, sizeof(x->meta)),
              "final: %s differs: store mod %lld, cache mod %lld", x->key,
              (long long)x->meta.mod_rev, (long long)y->meta.mod_rev);
    }
    /* Private keys: exactly the models. */
    for (int i = 0; i < cfg.threads; i++) {
        worker_t *t = &workers[i];
        for (int k = 0; k < NPRIV; k++) {
            const pmodel_t *p = &t->priv[k];
            kv_t *e = NULL;
            for (size_t j = 0; j < a.n && !e; j++)
                if (!strcmp(a.v[j].key, t->pkey[k]))
                    e = &a.v[j];
            CHECK(!e == !p->exists, "final: %s is %s in the store", t->pkey[k],
                  e ? "present" : "missing");
            if (!e)
                continue;
            char want[VALMAX];
            size_t wl = mkval(want, t->pkey[k], t->id, p->seq);
            CHECK(e->vallen == wl && !memcmp(e->val, want, wl) &&
                      e->meta.mod_rev == p->mod &&
                      e->meta.create_rev == p->create &&
                      e->meta.version == p->version,
                  "final: %s differs from its model", t->pkey[k]);
        }
        for (int k = 0; k < NSH; k++)
            CHECK(!t->need_del[k] || atomic_load(&sh_del[k]) > t->need_del[k],
                  "final: thread %d saw %s vanish after revision %lld, but "
                  "the newest delete was at %lld",
                  i, sh_key[k], (long long)t->need_del[k],
                  (long long)atomic_load(&sh_del[k]));
    }
    size_t n = a.n;
    free(a.v);
    free(b.v);
    return n;
}

/* --- Main ------------------------------------------------------------------*/

static void usage(FILE *f)
{
    fprintf(f,
            "usage: stress [-t THREADS] [-n OPS] [-s SECONDS] [-r SEED] [-k] "
            "[-v]\n"
            "  -t  threads sharing one flight group and one cache (8)\n"
            "  -n  operations per thread (1000000)\n"
            "  -s  time limit; reaching it stops the threads and fails the "
            "run (600)\n"
            "  -k  reaching the time limit is not a failure\n"
            "  -r  seed of the threads' random choices (1)\n"
            "  -v  print the time spent per operation type\n");
}

static char *fmt_m(char *buf, size_t cap, double v)
{
    if (v >= 1e6)
        snprintf(buf, cap, "%.1fM", v / 1e6);
    else if (v >= 1e3)
        snprintf(buf, cap, "%.1fk", v / 1e3);
    else
        snprintf(buf, cap, "%.0f", v);
    return buf;
}

int main(int argc, char **argv)
{
    int c;
    while ((c = getopt(argc, argv, "t:n:s:r:kvh")) != -1) {
        switch (c) {
        case 't':
            cfg.threads = atoi(optarg);
            break;
        case 'n':
            cfg.ops = atol(optarg);
            break;
        case 's':
            cfg.seconds = atof(optarg);
            break;
        case 'r':
            cfg.seed = strtoull(optarg, NULL, 0);
            break;
        case 'k':
            cfg.soft = true;
            break;
        case 'v':
            cfg.verbose = true;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind != argc || cfg.threads < 1 || cfg.threads > MAX_THREADS ||
        cfg.ops < 0 || !(cfg.seconds > 0)) {
        usage(stderr);
        return 2;
    }
    for (int i = 0; i < NOPS; i++)
        weight_total += op_weight[i];
    content_init();

    flight_opts_t fo;
    flight_opts_init(&fo);
    fo.max_lag = MAX_LAG;
    fo.retain_limit = RETAIN;
    fo.chunk_size = CHUNK;
    fo.orphan_policy = FLIGHT_ORPHAN_CANCEL;
    fo.shards = 8; /* Few shards: keys share locks. */
    int rc = flight_group_new(&grp, &fo);
    CHECK(rc == 0, "flight_group_new: %s", en(rc));

    cache_memstore_opts_t mo;
    cache_memstore_opts_init(&mo);
    mo.auto_compact_revs = 4096; /* Bounded history over millions of writes. */
    rc = cache_memstore_new(&store, &mo);
    CHECK(rc == 0, "cache_memstore_new: %s", en(rc));
    rc = cache_new(&cache, store, cache_prefix, 2, NULL);
    CHECK(rc == 0, "cache_new: %s", en(rc));
    rc = cache_start(cache);
    CHECK(rc == 0, "cache_start: %s", en(rc));

    t_start = now_s();
    running = cfg.threads;
    for (int i = 0; i < cfg.threads; i++) {
        worker_t *t = &workers[i];
        t->id = i;
        t->rng = cfg.seed * 0x100000001B3ull + (uint64_t)i;
        t->buf = malloc(RBUF);
        CHECK(t->buf, "out of memory");
        pthread_mutex_init(&t->nmu, NULL);
        pthread_cond_init(&t->ncv, NULL);
        for (int k = 0; k < NPRIV; k++)
            t->pkeylen =
                (size_t)snprintf(t->pkey[k], 16, "c/p/%02d/%02d", i, k);
        snprintf(t->ppref, sizeof(t->ppref), "c/p/%02d/", i);
        snprintf(t->psub, sizeof(t->psub), "c/p/%02d/1", i);
    }
    for (int i = 0; i < cfg.threads; i++) {
        rc = pthread_create(&workers[i].th, NULL, run, &workers[i]);
        CHECK(rc == 0, "pthread_create: %s", strerror(rc));
    }
    bool limited = supervise();
    for (int i = 0; i < cfg.threads; i++)
        pthread_join(workers[i].th, NULL);
    double elapsed = now_s() - t_start;
    CHECK(!pop(), "final: a writer left in the queue");

    /* Totals, and the group's counters against the threads' own. */
    long ops[NOPS] = {0}, st[NSTAT] = {0}, leads = 0, joins = 0, rfetch = 0;
    long pushed = 0, foreign = 0, early = 0, canceled = 0, conflicts = 0;
    long fresh = 0, erange = 0, rcalls = 0;
    uint64_t ow = 0, rw = 0, dl = 0;
    for (int i = 0; i < cfg.threads; i++) {
        worker_t *t = &workers[i];
        for (int k = 0; k < NOPS; k++)
            ops[k] += t->ops[k];
        for (int k = 0; k < NSTAT; k++)
            st[k] += t->status[k];
        leads += t->leads;
        joins += t->joins;
        rfetch += t->range_fetches;
        rcalls += t->range_calls;
        pushed += t->async_pushed;
        foreign += t->async_foreign;
        early += t->early;
        canceled += t->canceled;
        conflicts += t->conflicts;
        fresh += t->fresh_waits;
        erange += t->erange_direct;
        ow += t->obj_written;
        rw += t->range_written;
        dl += t->delivered;
    }
    flight_stats_t s;
    rc = flight_group_stats(grp, &s, sizeof(s));
    CHECK(rc == 0, "final: flight_group_stats: %s", en(rc));
    CHECK(s.readers_open == 0 && s.segments_held == 0 &&
              s.flights_active == 0 && s.bytes_held == 0,
          "final: group not idle: %llu readers open, %llu segments (%llu "
          "bytes) held, %llu flights active",
          (unsigned long long)s.readers_open,
          (unsigned long long)s.segments_held, (unsigned long long)s.bytes_held,
          (unsigned long long)s.flights_active);
    CHECK(s.flights_started == (uint64_t)leads && s.joins == (uint64_t)joins &&
              s.range_fetches == (uint64_t)rfetch,
          "final: group counted %llu fetches, %llu joins, %llu range fetches; "
          "threads %ld, %ld, %ld",
          (unsigned long long)s.flights_started, (unsigned long long)s.joins,
          (unsigned long long)s.range_fetches, leads, joins, rfetch);
    CHECK(s.bytes_written == ow && s.range_bytes_fetched == rw &&
              s.bytes_delivered == dl,
          "final: group counted %llu bytes written, %llu range bytes, %llu "
          "delivered; threads %llu, %llu, %llu",
          (unsigned long long)s.bytes_written,
          (unsigned long long)s.range_bytes_fetched,
          (unsigned long long)s.bytes_delivered, (unsigned long long)ow,
          (unsigned long long)rw, (unsigned long long)dl);
    flight_group_close(grp);

    size_t keys = final_cache();
    cache_health_t h;
    rc = cache_health(cache, &h, sizeof(h));
    CHECK(rc == 0 && h.state == CACHE_RUNNING && h.entries == keys &&
              h.relists == 0 && h.reconnects == 0,
          "final: cache_health: %s, state %d, %llu entries of %zu, %llu "
          "relists, %llu reconnects",
          en(rc), h.state, (unsigned long long)h.entries, keys,
          (unsigned long long)h.relists, (unsigned long long)h.reconnects);
    cache_free(cache);
    CHECK(cache_memstore_watches(store) == 0, "final: %d watches left",
          cache_memstore_watches(store));
    cache_store_free(store);

    long total = 0, cache_ops = 0;
    for (int k = 0; k < NOPS; k++)
        total += ops[k];
    for (int k = OP_GET; k <= OP_SCAN; k++)
        cache_ops += ops[k];
    char b1[16], b2[16], b3[16], b4[16];
    printf("stress (%s): %d threads x %ld ops in %.1f s (flight %s, range %s, "
           "cache %s, other %s; collapse %.2fx)%s\n",
           SAN_NAME, cfg.threads, cfg.ops, elapsed,
           fmt_m(b1, 16, (double)ops[OP_FLIGHT]),
           fmt_m(b2, 16, (double)ops[OP_RANGE]),
           fmt_m(b3, 16, (double)cache_ops),
           fmt_m(b4, 16, (double)(ops[OP_STATS] + ops[OP_MISC])),
           s.flights_started ? (double)(s.flights_started + s.joins) /
                                   (double)s.flights_started
                             : 0.0,
           limited ? " [time limit]" : "");
    printf("stress: flights %llu (%ld async, %ld finished by another thread), "
           "joins %llu, range calls %ld, range fetches %llu, chunk joins "
           "%llu; ends: eof %ld, eio %ld, eupstream %ld, elagged %ld, "
           "emismatch %ld, erange %ld (+%ld at the call), early closes %ld, "
           "writer cancels %ld; cache: %llu keys, revision %lld, %ld "
           "conflicts, %ld freshness waits\n",
           (unsigned long long)s.flights_started, pushed, foreign,
           (unsigned long long)s.joins, rcalls,
           (unsigned long long)s.range_fetches,
           (unsigned long long)s.chunk_joins, st[S_EOF], st[S_EIO],
           st[S_EUPSTREAM], st[S_ELAGGED], st[S_EMISMATCH], st[S_ERANGE],
           erange, early, canceled, (unsigned long long)h.entries,
           (long long)h.watch_rev, conflicts, fresh);
    if (cfg.verbose) {
        long waits = 0, ticks = 0;
        for (int i = 0; i < cfg.threads; i++) {
            waits += workers[i].waits;
            ticks += workers[i].ticks;
        }
        printf("stress: reader waits %ld, %ld of them a whole tick\n", waits,
               ticks);
        /* Wall time per op summed over threads: where the run goes. */
        double sum = 0, tm[NOPS] = {0};
        for (int k = 0; k < NOPS; k++) {
            for (int i = 0; i < cfg.threads; i++)
                tm[k] += workers[i].op_time[k];
            sum += tm[k];
        }
        for (int k = 0; k < NOPS; k++)
            printf("stress: %-13s %9ld ops %8.1f us/op %5.1f%%\n", op_names[k],
                   ops[k], ops[k] ? tm[k] / (double)ops[k] * 1e6 : 0.0,
                   sum > 0 ? 100 * tm[k] / sum : 0.0);
    }
    for (int i = 0; i < cfg.threads; i++) {
        free(workers[i].buf);
        pthread_mutex_destroy(&workers[i].nmu);
        pthread_cond_destroy(&workers[i].ncv);
    }
    content_free();
    if (limited && !cfg.soft) {
        fprintf(stderr,
                "stress: FAIL: time limit of %.0f s reached after %ld of %ld "
                "ops (-s to raise it, -k to accept a partial run)\n",
                cfg.seconds, total, (long)cfg.threads * cfg.ops);
        return 1;
    }
    return 0;
}

/*
 * libFuzzer harness: object flights (flight_do) driven by an operation
 * program decoded from the input, every result checked against a model.
 *
 * One group, three keys, up to NREADERS readers and NWRITERS writers. The
 * program joins and leads flights; fetch callbacks run a nested program of
 * their own (writes, reads of other readers, nested flight_do) and return
 * any result, FLIGHT_FETCH_ASYNC keeping the writer for later operations.
 * Readers read without waiting (timeout 0), by copy or peek/consume, arm
 * notifications, close early. The model predicts every return code, every
 * byte, meta, offsets, lag detaches, timeouts, orphan cancels, which
 * notify callbacks fire and the group's counters; at the end everything is
 * closed, the gauges must be 0 and every allocation must be freed.
 *
 * Time: waiter deadlines use the monotonic clock, which this file replaces
 * (clock_gettime below) with a virtual one on the fuzzing thread, so a
 * deadline passes when the program advances the clock, at no real cost.
 *
 * Single-threaded: the library's thread safety is the stress test's job;
 * here every interleaving of operations on one thread is fair game.
 */
#define _GNU_SOURCE
#define FUZZ_FLIGHT_RUNTIME
#include "fuzz.h"

#include <coalesce.h>

#include <stdatomic.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NKEYS      3
#define NREADERS   8
#define NWRITERS   4
#define NHOLDS     4
#define MAXFLIGHTS 48
#define MAXSEG     256 /* Writes recorded per flight. */
#define MAXOPS     160
#define MAXDEPTH   2 /* Nested flight_do levels inside fetch callbacks. */
#define MAXWRITE   40

/* --- Model ---------------------------------------------------------------- */

/* Byte off of flight id's body; the meta uses another stream. */
static FUZZ_NOCOV uint8_t pat(uint32_t id, uint64_t off)
{
    uint64_t x = (off + 1) * 0x9E3779B97F4A7C15ull ^ (uint64_t)id << 40;
    x ^= x >> 29;
    return (uint8_t)(x * 0xBF58476D1CE4E5B9ull >> 56);
}

static FUZZ_NOCOV uint8_t meta_pat(uint32_t id, size_t i)
{
    return pat(id ^ 0x5a5a5a5au, i + 1000000);
}

typedef struct mflight {
    uint32_t id;
    int key;
    bool registered; /* Joinable: in the group's table. */
    bool ended, canceled, meta_set, meta_stage, head_held, fetching;
    bool orphan_counted, w_ended, w_released;
    int status;
    size_t metalen;
    uint64_t written, fetch_written, maxw;
    uint64_t cb_written; /* Written when the callback returned. */
    unsigned nreaders;   /* Attached. */
    unsigned nseg;
    uint64_t seg_end[MAXSEG]; /* Cumulative end of each write. */
} mflight_t;

typedef struct mreader {
    bool open, handed; /* handed: flight_do returned it. */
    flight_reader_t *r;
    int fl;
    bool leader, attached, meta_seen;
    bool armed, expect_fire, close_in_cb, do_in_cb;
    int status; /* Terminal status once the library set it, else 0. */
    uint64_t off;
    int64_t deadline;
    size_t peeked; /* Bytes of the current loan. */
    const uint8_t *loan;
    uint64_t loan_off;
} mreader_t;

typedef struct mwriter {
    bool live;
    flight_writer_t *w;
    int fl;
} mwriter_t;

typedef struct hold {
    coalesce_buf_t *buf;
    const uint8_t *p;
    size_t len;
    uint32_t id;
    uint64_t off;
} hold_t;

static struct state {
    fuzz_in_t in;
    flight_group_t *g;
    bool closed;
    uint64_t max_lag, retain;
    int64_t wait_ns;
    int policy;
    unsigned ops;
    uint32_t serial;
    int nfl;
    int key_fl[NKEYS];
    mflight_t fl[MAXFLIGHTS];
    mreader_t rd[NREADERS];
    mwriter_t wr[NWRITERS];
    hold_t holds[NHOLDS];
    flight_stats_t st; /* Counters as the model predicts them. */
} S;

static const unsigned char key2[60] =
    "a key longer than the inline key buffer, "
    "NUL \0 inside";
static const struct {
    const void *p;
    size_t len;
} keys[NKEYS] = {{"a", 1}, {"b\0c", 3}, {key2, sizeof(key2)}};

static FUZZ_NOCOV int end_status(int s)
{
    if (s == COALESCE_EOF)
        return 0;
    if (s == COALESCE_EAGAIN)
        return COALESCE_EUPSTREAM;
    return s;
}

/* Notify callbacks armed on fl fire (except self's, which learns from its
 * own return value). */
static FUZZ_NOCOV void m_wake(int fl, int self)
{
    for (int i = 0; i < NREADERS; i++) {
        mreader_t *m = &S.rd[i];
        if (m->open && m->fl == fl && m->armed && i != self) {
            m->armed = false;
            m->expect_fire = true;
        }
    }
}

static FUZZ_NOCOV void m_unregister(mflight_t *F)
{
    if (F->registered && S.key_fl[F->key] == F - S.fl)
        S.key_fl[F->key] = -1;
    F->registered = false;
}

static FUZZ_NOCOV void m_end(int fl, int status, int self)
{
    mflight_t *F = &S.fl[fl];
    F->ended = true;
    F->status = status;
    F->meta_stage = true;
    m_unregister(F);
    if (status < 0)
        S.st.errors++;
    S.st.flights_active--;
    F->head_held = false;
    m_wake(fl, self);
}

static FUZZ_NOCOV void m_gone(int i, int self)
{
    mreader_t *m = &S.rd[i];
    mflight_t *F = &S.fl[m->fl];
    if (!m->attached)
        return;
    m->attached = false;
    if (--F->nreaders || F->ended)
        return;
    if (!F->orphan_counted)
        S.st.orphaned++;
    F->orphan_counted = true;
    if (S.policy == FLIGHT_ORPHAN_CANCEL) {
        F->canceled = true;
        m_end(m->fl, FLIGHT_ECANCELED, self);
    }
}

static FUZZ_NOCOV void m_detach(int i, int status, int self)
{
    S.rd[i].status = status;
    m_gone(i, self);
}

/* What a write would return before it changes anything. */
static FUZZ_NOCOV int m_writer_state(const mflight_t *F)
{
    if (F->canceled)
        return FLIGHT_ECANCELED;
    if (F->w_ended || F->ended)
        return COALESCE_EINVAL;
    return 0;
}

static FUZZ_NOCOV void m_append(int fl, uint64_t len)
{
    mflight_t *F = &S.fl[fl];
    F->written += len;
    F->meta_stage = true;
    F->seg_end[F->nseg++] = F->written;
    if (len > F->maxw)
        F->maxw = len;
    S.st.bytes_written += len;
    if (F->head_held && F->written > S.retain) {
        F->head_held = false;
        m_unregister(F);
    }
    uint64_t start = F->written - len;
    if (S.max_lag != FLIGHT_UNLIMITED && start > S.max_lag) {
        for (int i = 0; i < NREADERS; i++) {
            mreader_t *m = &S.rd[i];
            if (!m->open || m->fl != fl || m->status ||
                start - m->off <= S.max_lag)
                continue;
            /* The leader cannot read while its callback writes; afterwards
             * it may lag that backlog on top of max_lag. */
            if (m->leader &&
                (F->fetching || start - m->off - S.max_lag <= F->fetch_written))
                continue;
            m_detach(i, FLIGHT_ELAGGED, -1);
            S.st.lagged++;
        }
    }
    m_wake(fl, -1);
}

/* Where reader i stands: 0 with *avail bytes (and *segrest of them in the
 * current write), COALESCE_EAGAIN, or its terminal status. */
static FUZZ_NOCOV int m_poll(int i, uint64_t *avail, uint64_t *segrest)
{
    mreader_t *m = &S.rd[i];
    mflight_t *F = &S.fl[m->fl];
    if (m->status)
        return m->status;
    if (m->deadline && !F->meta_stage && vnow >= m->deadline) {
        m_detach(i, FLIGHT_ETIMEDOUT, i);
        S.st.timeouts++;
        return m->status;
    }
    if (m->off < F->written) {
        *avail = F->written - m->off;
        unsigned k = 0;
        while (F->seg_end[k] <= m->off)
            k++;
        *segrest = F->seg_end[k] - m->off;
        return 0;
    }
    if (F->ended) {
        m->status = F->status ? F->status : COALESCE_EOF;
        return m->status;
    }
    return COALESCE_EAGAIN;
}

static FUZZ_NOCOV int m_meta_poll(int i)
{
    mreader_t *m = &S.rd[i];
    mflight_t *F = &S.fl[m->fl];
    if (m->status == FLIGHT_ETIMEDOUT)
        return m->status;
    if (F->meta_stage) {
        if (!F->meta_set && !F->written && F->ended && F->status < 0)
            return F->status;
        return 0;
    }
    if (m->status)
        return m->status;
    if (m->deadline && vnow >= m->deadline) {
        m_detach(i, FLIGHT_ETIMEDOUT, i);
        S.st.timeouts++;
        return m->status;
    }
    return COALESCE_EAGAIN;
}

static FUZZ_NOCOV void
check_body(const uint8_t *p, size_t len, uint32_t id, uint64_t off)
{
    for (size_t k = 0; k < len; k++)
        FUZZ_CHECK(p[k] == pat(id, off + k),
                   "flight %u: byte %llu is %u, want %u", id,
                   (unsigned long long)(off + k), p[k], pat(id, off + k));
}

/* The current loan's bytes must still be there (ASan sees a freed one). */
static FUZZ_NOCOV void check_loan(int i)
{
    mreader_t *m = &S.rd[i];
    if (m->peeked)
        check_body(m->loan, m->peeked, S.fl[m->fl].id, m->loan_off);
}

static FUZZ_NOCOV void check_stats(void)
{
    if (S.closed)
        return; /* The group may be gone. */
    flight_stats_t s;
    FUZZ_CHECK(flight_group_stats(S.g, &s, sizeof(s)) == 0, "stats");
#define EQ(f)                                                                  \
    FUZZ_CHECK(s.f == S.st.f, "stats." #f " %llu, model %llu",                 \
               (unsigned long long)s.f, (unsigned long long)S.st.f)
    EQ(flights_started);
    EQ(joins);
    EQ(timeouts);
    EQ(errors);
    EQ(lagged);
    EQ(bytes_written);
    EQ(bytes_delivered);
    EQ(flights_active);
    EQ(readers_open);
    EQ(orphaned);
#undef EQ
    /* The documented memory bound: per flight at most max(max_lag,
     * retain_limit) plus two writes, plus the leader's callback backlog. */
    if (S.max_lag != FLIGHT_UNLIMITED) {
        uint64_t bound = 0;
        for (int f = 0; f < S.nfl; f++) {
            const mflight_t *F = &S.fl[f];
            bound += S.max_lag + S.retain + 2 * F->maxw +
                     (F->fetching ? F->written : F->cb_written);
        }
        FUZZ_CHECK(s.bytes_held <= bound, "bytes_held %llu > bound %llu",
                   (unsigned long long)s.bytes_held, (unsigned long long)bound);
    }
}

static FUZZ_NOCOV void check_all(void)
{
    for (int i = 0; i < NREADERS; i++) {
        mreader_t *m = &S.rd[i];
        FUZZ_CHECK(!m->expect_fire, "reader %d: notification missing", i);
        if (m->open && m->handed)
            FUZZ_CHECK(flight_reader_offset(m->r) == m->off,
                       "reader %d: offset %llu, model %llu", i,
                       (unsigned long long)flight_reader_offset(m->r),
                       (unsigned long long)m->off);
    }
    check_stats();
}

/* --- Operations ----------------------------------------------------------- */

enum {
    OP_DO,
    OP_META,
    OP_READ,
    OP_PEEK,
    OP_CONSUME,
    OP_CLOSE,
    OP_NOTIFY,
    OP_DEADLINE,
    OP_W_META,
    OP_W_WRITE,
    OP_W_END,
    OP_W_RELEASE,
    OP_W_READERS,
    OP_CLOCK,
    OP_DROP_HOLD,
    OP_READ2, /* Weights: reads and writes are the common case. */
    OP_W_WRITE2,
    OP_DO2,
    OP_GROUP_CLOSE,
    NOPS
};

static void run_ops(int depth, unsigned max_ops);

typedef struct fctx {
    int fl; /* Model flight the call should lead, -1 for a join. */
    int depth;
    bool called;
} fctx_t;

static FUZZ_NOCOV int free_writer(void)
{
    for (int i = 0; i < NWRITERS; i++)
        if (!S.wr[i].live)
            return i;
    return -1;
}

static FUZZ_NOCOV int writer_of(int fl)
{
    for (int i = 0; i < NWRITERS; i++)
        if (S.wr[i].live && S.wr[i].fl == fl)
            return i;
    return -1;
}

/* The callback returned rc: what the library does with the writer. */
static FUZZ_NOCOV void m_fetch_returned(int fl, int rc)
{
    mflight_t *F = &S.fl[fl];
    F->fetching = false;
    F->cb_written = F->written;
    int ws = writer_of(fl);
    if (rc == FLIGHT_FETCH_DONE && F->w_ended) {
        if (ws >= 0)
            S.wr[ws].live = false;
        return;
    }
    F->fetch_written = F->written;
    if (rc == FLIGHT_FETCH_ASYNC)
        return; /* Kept, unless released already. */
    if (!F->ended)
        m_end(fl,
              rc < 0                    ? end_status(rc)
              : rc == FLIGHT_FETCH_DONE ? COALESCE_EUPSTREAM
                                        : COALESCE_EINVAL,
              -1);
    F->w_ended = true;
    if (ws >= 0)
        S.wr[ws].live = false;
}

static int fetch_cb(flight_writer_t *w, void *data)
{
    fctx_t *c = data;
    FUZZ_CHECK(c->fl >= 0, "fetch callback for a caller that should join");
    FUZZ_CHECK(!c->called, "fetch callback called twice");
    c->called = true;
    int rc = COALESCE_EIO; /* No writer slot: fail at once. */
    int ws = free_writer();
    if (ws >= 0) {
        S.wr[ws] = (mwriter_t){true, w, c->fl};
        run_ops(c->depth + 1, fuzz_u8(&S.in) % 8);
        static const int results[] = {
            FLIGHT_FETCH_DONE,  FLIGHT_FETCH_DONE,  FLIGHT_FETCH_ASYNC,
            FLIGHT_FETCH_ASYNC, FLIGHT_FETCH_ASYNC, COALESCE_EIO,
            COALESCE_EOF,       COALESCE_EAGAIN,    2,
            FLIGHT_ECANCELED};
        rc = results[fuzz_u8(&S.in) % 10];
        TRACE("  fetch f%d returns %d\n", c->fl, rc);
    }
    m_fetch_returned(c->fl, rc);
    return rc;
}

static FUZZ_NOCOV int free_reader(void)
{
    for (int i = 0; i < NREADERS; i++)
        if (!S.rd[i].open)
            return i;
    return -1;
}

static void op_do(int depth)
{
    if (depth > MAXDEPTH || S.closed)
        return;
    int key = (int)fuzz_pick(&S.in, NKEYS);
    int i = free_reader();
    if (i < 0)
        return;
    mreader_t *m = &S.rd[i];
    int fl = S.key_fl[key];
    flight_reader_t *r = NULL;
    if (fl >= 0) {
        fctx_t c = {-1, depth, false};
        int rc = flight_do(S.g, keys[key].p, keys[key].len, fetch_cb, &c, &r);
        FUZZ_CHECK(rc == 0 && r, "join: flight_do %d", rc);
        TRACE("  do key %d: r%d joins f%d\n", key, i, fl);
        mflight_t *F = &S.fl[fl];
        *m = (mreader_t){.open = true, .handed = true, .r = r, .fl = fl};
        m->attached = true;
        if (S.wait_ns && !F->meta_stage)
            m->deadline = vnow + S.wait_ns;
        F->nreaders++;
        S.st.readers_open++;
        S.st.joins++;
        FUZZ_CHECK(flight_reader_shared(r) == 1, "joiner not shared");
        return;
    }
    if (S.nfl == MAXFLIGHTS)
        return;
    fl = S.nfl++;
    mflight_t *F = &S.fl[fl];
    memset(F, 0, offsetof(mflight_t, seg_end));
    F->id = ++S.serial;
    F->key = key;
    F->registered = true;
    F->head_held = true;
    F->fetching = true;
    F->nreaders = 1;
    S.key_fl[key] = fl;
    S.st.flights_started++;
    S.st.flights_active++;
    S.st.readers_open++;
    /* The leader's reader exists from the start; it is handed out when
     * flight_do returns. */
    *m = (mreader_t){.open = true, .fl = fl, .leader = true, .attached = true};
    TRACE("  do key %d: r%d leads f%d\n", key, i, fl);
    fctx_t c = {fl, depth, false};
    int rc = flight_do(S.g, keys[key].p, keys[key].len, fetch_cb, &c, &r);
    FUZZ_CHECK(rc == 0 && r, "lead: flight_do %d", rc);
    FUZZ_CHECK(c.called, "leader's fetch not called");
    m->r = r;
    m->handed = true;
    FUZZ_CHECK(flight_reader_shared(r) == 0, "leader shared");
}

/* A handed-out open reader chosen by the input, or -1. */
static int pick_reader(void)
{
    int v[NREADERS], n = 0;
    for (int i = 0; i < NREADERS; i++)
        if (S.rd[i].open && S.rd[i].handed)
            v[n++] = i;
    return n ? v[fuzz_pick(&S.in, (unsigned)n)] : -1;
}

static int pick_writer(void)
{
    int v[NWRITERS], n = 0;
    for (int i = 0; i < NWRITERS; i++)
        if (S.wr[i].live)
            v[n++] = i;
    return n ? v[fuzz_pick(&S.in, (unsigned)n)] : -1;
}

static void op_meta(void)
{
    int i = pick_reader();
    if (i < 0)
        return;
    mreader_t *m = &S.rd[i];
    mflight_t *F = &S.fl[m->fl];
    int want = m_meta_poll(i);
    const void *meta = (const void *)1;
    size_t len = 12345;
    int rc = flight_meta(m->r, 0, &meta, &len);
    TRACE("  meta r%d -> %d\n", i, rc);
    FUZZ_CHECK(rc == want, "reader %d: flight_meta %d, model %d", i, rc, want);
    if (rc)
        return;
    m->meta_seen = true;
    if (!F->meta_set) {
        FUZZ_CHECK(!meta && !len, "meta without flight_set_meta");
        return;
    }
    FUZZ_CHECK(meta && len == F->metalen, "meta %p/%zu, want %zu", meta, len,
               F->metalen);
    for (size_t k = 0; k < len; k++)
        FUZZ_CHECK(((const uint8_t *)meta)[k] == meta_pat(F->id, k),
                   "meta byte %zu", k);
}

static void op_read(void)
{
    int i = pick_reader();
    if (i < 0)
        return;
    mreader_t *m = &S.rd[i];
    mflight_t *F = &S.fl[m->fl];
    size_t cap = 1 + fuzz_u8(&S.in) % 64;
    check_loan(i);
    m->peeked = 0; /* A read ends the loan. */
    uint64_t avail = 0, segrest = 0;
    int want = m_poll(i, &avail, &segrest);
    uint8_t buf[64];
    size_t n = 9999;
    int rc = flight_read(m->r, buf, cap, 0, &n);
    TRACE("  read r%d cap %zu -> %d n %zu\n", i, cap, rc, rc ? 0 : n);
    FUZZ_CHECK(rc == want, "reader %d: flight_read %d, model %d", i, rc, want);
    /* A body read that found the meta stage but no bytes has seen it. */
    if (rc == COALESCE_EAGAIN && F->meta_stage)
        m->meta_seen = true;
    if (rc) {
        FUZZ_CHECK(n == 0, "nread %zu with %d", n, rc);
        return;
    }
    size_t exp = avail < cap ? (size_t)avail : cap;
    FUZZ_CHECK(n == exp, "reader %d: read %zu bytes, model %zu", i, n, exp);
    check_body(buf, n, F->id, m->off);
    m->off += n;
    m->meta_seen = true;
    S.st.bytes_delivered += n;
    if (n < cap) /* The read looked further, and may have met the end. */
        m_poll(i, &avail, &segrest);
}

static void op_peek(void)
{
    int i = pick_reader();
    if (i < 0)
        return;
    mreader_t *m = &S.rd[i];
    mflight_t *F = &S.fl[m->fl];
    uint8_t flags = fuzz_u8(&S.in);
    check_loan(i);
    m->peeked = 0;
    uint64_t avail = 0, segrest = 0;
    int want = m_poll(i, &avail, &segrest);
    const void *data = NULL;
    size_t len = 0;
    coalesce_buf_t *owner = NULL;
    int rc = flight_peek(m->r, 0, &data, &len, (flags & 1) ? &owner : NULL);
    TRACE("  peek r%d -> %d len %zu\n", i, rc, rc ? 0 : len);
    FUZZ_CHECK(rc == want, "reader %d: flight_peek %d, model %d", i, rc, want);
    if (rc == COALESCE_EAGAIN && F->meta_stage)
        m->meta_seen = true;
    if (rc)
        return;
    FUZZ_CHECK(len == segrest, "reader %d: peek %zu bytes, model %llu", i, len,
               (unsigned long long)segrest);
    check_body(data, len, F->id, m->off);
    m->meta_seen = true;
    m->peeked = len;
    m->loan = data;
    m->loan_off = m->off;
    if (!(flags & 1))
        return;
    FUZZ_CHECK(owner, "peek: no owner");
    const uint8_t *od = coalesce_buf_data(owner);
    FUZZ_CHECK(od <= (const uint8_t *)data &&
                   (const uint8_t *)data + len <= od + coalesce_buf_len(owner),
               "peek: bytes outside their owner");
    /* Keep the buffer beyond the loan: it must outlive the reader. */
    for (int h = 0; (flags & 2) && h < NHOLDS; h++) {
        if (!S.holds[h].buf) {
            S.holds[h] =
                (hold_t){coalesce_buf_ref(owner), data, len, F->id, m->off};
            break;
        }
    }
}

static void op_consume(void)
{
    int i = pick_reader();
    if (i < 0)
        return;
    mreader_t *m = &S.rd[i];
    uint8_t how = fuzz_u8(&S.in);
    size_t n = how % 4 == 0   ? m->peeked + 1
               : how % 4 == 1 ? m->peeked / 2
                              : m->peeked;
    check_loan(i);
    int want;
    if (n > m->peeked)
        want = COALESCE_EINVAL;
    else if (m->status)
        want = m->status; /* Detached: the loan stays. */
    else
        want = 0;
    int rc = flight_consume(m->r, n);
    TRACE("  consume r%d %zu -> %d\n", i, n, rc);
    FUZZ_CHECK(rc == want, "reader %d: consume(%zu) %d, model %d", i, n, rc,
               want);
    if (rc)
        return;
    m->peeked -= n;
    if (n)
        m->loan += n;
    m->loan_off += n;
    m->off += n;
    S.st.bytes_delivered += n;
}

static FUZZ_NOCOV void m_close(int i)
{
    mreader_t *m = &S.rd[i];
    m->armed = false;
    m_gone(i, -1);
    m->open = false;
    S.st.readers_open--;
}

static void op_close(void)
{
    int i = pick_reader();
    if (i < 0)
        return;
    check_loan(i);
    flight_reader_t *r = S.rd[i].r;
    TRACE("  close r%d\n", i);
    m_close(i);
    flight_reader_close(r);
}

static void notify_cb(flight_reader_t *r, void *data)
{
    int i = (int)(intptr_t)data;
    mreader_t *m = &S.rd[i];
    FUZZ_CHECK(m->open && m->r == r, "notification for a closed reader %d", i);
    FUZZ_CHECK(m->expect_fire, "reader %d: spurious notification", i);
    m->expect_fire = false;
    if (m->do_in_cb && S.closed) {
        flight_reader_t *x = NULL;
        fctx_t c = {-1, 0, false};
        int rc = flight_do(S.g, "a", 1, fetch_cb, &c, &x);
        FUZZ_CHECK(rc == COALESCE_ECLOSING && !x,
                   "flight_do in a callback after close: %d", rc);
    }
    if (m->close_in_cb) {
        m_close(i);
        flight_reader_close(r);
    }
}

static void op_notify(void)
{
    int i = pick_reader();
    if (i < 0)
        return;
    mreader_t *m = &S.rd[i];
    uint8_t flags = fuzz_u8(&S.in);
    uint64_t avail, segrest;
    int pr = m_poll(i, &avail, &segrest);
    bool ready =
        pr != COALESCE_EAGAIN || (S.fl[m->fl].meta_stage && !m->meta_seen);
    m->armed = !ready;
    m->close_in_cb = flags & 1;
    m->do_in_cb = flags & 2;
    int rc = flight_reader_notify(m->r, notify_cb, (void *)(intptr_t)i);
    TRACE("  notify r%d -> %d\n", i, rc);
    FUZZ_CHECK(rc == (ready ? 1 : 0), "reader %d: notify %d, model ready %d", i,
               rc, ready);
}

static void op_deadline(void)
{
    int i = pick_reader();
    if (i < 0)
        return;
    mreader_t *m = &S.rd[i];
    int64_t want = -1;
    if (m->deadline && !S.fl[m->fl].meta_stage && !m->status) {
        int64_t ns = m->deadline - vnow;
        want = ns <= 0 ? 0 : (ns + 999999) / 1000000;
    }
    int64_t got = flight_reader_deadline_ms(m->r);
    FUZZ_CHECK(got == want, "reader %d: deadline_ms %lld, model %lld", i,
               (long long)got, (long long)want);
}

static void op_w_meta(void)
{
    int ws = pick_writer();
    if (ws < 0)
        return;
    int fl = S.wr[ws].fl;
    mflight_t *F = &S.fl[fl];
    size_t len = fuzz_u8(&S.in) % 17;
    uint8_t meta[16];
    for (size_t k = 0; k < len; k++)
        meta[k] = meta_pat(F->id, k);
    int want = m_writer_state(F);
    if (!want && (F->meta_set || F->written))
        want = COALESCE_EINVAL;
    if (!want) {
        F->meta_set = true;
        F->metalen = len;
        F->meta_stage = true;
        m_wake(fl, -1);
    }
    int rc = flight_set_meta(S.wr[ws].w, len ? meta : NULL, len);
    TRACE("  set_meta w%d f%d len %zu -> %d\n", ws, fl, len, rc);
    FUZZ_CHECK(rc == want, "flight_set_meta %d, model %d", rc, want);
}

static void op_w_write(void)
{
    int ws = pick_writer();
    if (ws < 0)
        return;
    int fl = S.wr[ws].fl;
    mflight_t *F = &S.fl[fl];
    uint8_t how = fuzz_u8(&S.in);
    size_t len = fuzz_u8(&S.in) % (MAXWRITE + 1);
    if (len && F->nseg == MAXSEG)
        return;
    bool zc = how & 1, bad = (how & 6) == 6;
    size_t off = (how >> 3) % 5;
    uint8_t data[MAXWRITE];
    for (size_t k = 0; k < len; k++)
        data[k] = pat(F->id, F->written + k);
    int want = m_writer_state(F);
    if (zc && bad)
        want = COALESCE_EINVAL; /* Slice outside the buffer: no change. */
    else if (!want && len)
        m_append(fl, len);
    int rc;
    if (zc) {
        coalesce_buf_t *b = NULL;
        size_t blen = off + len + 3;
        if (bad && len)
            blen = off + len - 1; /* One byte short. */
        else if (bad)
            blen = 1, off = 2; /* Starts past the end. */
        FUZZ_CHECK(coalesce_buf_new(&b, blen) == 0, "buf");
        uint8_t *bp = coalesce_buf_mutable(b);
        memset(bp, 0xee, blen);
        memcpy(bp + off, data, bad ? 0 : len);
        rc = flight_write_buf(S.wr[ws].w, b, off, len);
        /* Published (immutable) once the flight holds it. */
        bool appended = rc == 0 && len;
        FUZZ_CHECK(!coalesce_buf_mutable(b) == appended,
                   "publish mark after write_buf %d", rc);
        coalesce_buf_unref(b);
    } else {
        rc = flight_write(S.wr[ws].w, len ? data : NULL, len);
    }
    TRACE("  write w%d f%d %zu -> %d\n", ws, fl, len, rc);
    FUZZ_CHECK(rc == want, "write(%zu%s) %d, model %d", len, zc ? ", buf" : "",
               rc, want);
}

static void op_w_end(void)
{
    int ws = pick_writer();
    if (ws < 0)
        return;
    int fl = S.wr[ws].fl;
    mflight_t *F = &S.fl[fl];
    static const int sts[] = {
        0, COALESCE_EOF,     COALESCE_EAGAIN, COALESCE_EIO, COALESCE_EUPSTREAM,
        1, FLIGHT_ECANCELED, FLIGHT_ELAGGED};
    int status = sts[fuzz_u8(&S.in) % 8];
    int want;
    if (status > 0) {
        want = COALESCE_EINVAL;
    } else {
        want = m_writer_state(F);
        if (!want)
            m_end(fl, end_status(status), -1);
        if (want != COALESCE_EINVAL)
            F->w_ended = true;
    }
    int rc = flight_end(S.wr[ws].w, status);
    TRACE("  end w%d f%d %d -> %d\n", ws, fl, status, rc);
    FUZZ_CHECK(rc == want, "flight_end(%d) %d, model %d", status, rc, want);
}

static void op_w_release(int ws)
{
    int fl = S.wr[ws].fl;
    mflight_t *F = &S.fl[fl];
    if (!F->ended)
        m_end(fl, COALESCE_EUPSTREAM, -1);
    F->w_ended = true;
    if (F->fetching)
        F->w_released = true;
    S.wr[ws].live = false;
    TRACE("  release w%d f%d\n", ws, fl);
    flight_writer_release(S.wr[ws].w);
}

static void op_w_readers(void)
{
    int ws = pick_writer();
    if (ws < 0)
        return;
    unsigned n = flight_writer_readers(S.wr[ws].w);
    unsigned want = S.fl[S.wr[ws].fl].nreaders;
    FUZZ_CHECK(n == want, "flight_writer_readers %u, model %u", n, want);
}

static void drop_hold(int h)
{
    hold_t *x = &S.holds[h];
    if (!x->buf)
        return;
    check_body(x->p, x->len, x->id, x->off);
    coalesce_buf_unref(x->buf);
    x->buf = NULL;
}

static void run_ops(int depth, unsigned max_ops)
{
    for (unsigned n = 0; n < max_ops && fuzz_left(&S.in) && S.ops < MAXOPS;
         n++) {
        S.ops++;
        unsigned op = fuzz_u8(&S.in) % NOPS;
        TRACE("d%d op %u\n", depth, op);
        switch (op) {
        case OP_DO:
        case OP_DO2:
            op_do(depth);
            break;
        case OP_META:
            op_meta();
            break;
        case OP_READ:
        case OP_READ2:
            op_read();
            break;
        case OP_PEEK:
            op_peek();
            break;
        case OP_CONSUME:
            op_consume();
            break;
        case OP_CLOSE:
            op_close();
            break;
        case OP_NOTIFY:
            op_notify();
            break;
        case OP_DEADLINE:
            op_deadline();
            break;
        case OP_W_META:
            op_w_meta();
            break;
        case OP_W_WRITE:
        case OP_W_WRITE2:
            op_w_write();
            break;
        case OP_W_END:
            op_w_end();
            break;
        case OP_W_RELEASE: {
            int ws = pick_writer();
            if (ws >= 0)
                op_w_release(ws);
            break;
        }
        case OP_W_READERS:
            op_w_readers();
            break;
        case OP_CLOCK:
            vnow += (int64_t)(fuzz_u8(&S.in) % 8) * 500000;
            break;
        case OP_DROP_HOLD:
            drop_hold((int)fuzz_pick(&S.in, NHOLDS));
            break;
        case OP_GROUP_CLOSE:
            /* Only outside callbacks: close must not overlap a call. */
            if (depth == 0 && !S.closed && (fuzz_u8(&S.in) & 7) == 0) {
                check_all();
                S.closed = true;
                flight_group_close(S.g);
            }
            break;
        }
        check_all();
    }
}

/* Read reader i to its end: every byte, then the same status for good. */
static void drain(int i)
{
    mreader_t *m = &S.rd[i];
    for (int guard = 0;; guard++) {
        FUZZ_CHECK(guard < 100000, "reader %d never ends", i);
        check_loan(i);
        m->peeked = 0;
        uint64_t avail = 0, segrest = 0;
        int want = m_poll(i, &avail, &segrest);
        FUZZ_CHECK(want != COALESCE_EAGAIN, "reader %d: would wait forever", i);
        uint8_t buf[256];
        size_t n = 0;
        int rc = flight_read(m->r, buf, sizeof(buf), 0, &n);
        FUZZ_CHECK(rc == want, "drain %d: read %d, model %d", i, rc, want);
        if (rc) {
            /* Terminal: again, the same, no bytes. */
            rc = flight_read(m->r, buf, sizeof(buf), 0, &n);
            FUZZ_CHECK(rc == want && n == 0, "drain %d: again %d", i, rc);
            const void *d;
            size_t len;
            rc = flight_peek(m->r, 0, &d, &len, NULL);
            FUZZ_CHECK(rc == want, "drain %d: peek again %d", i, rc);
            return;
        }
        size_t exp = avail < sizeof(buf) ? (size_t)avail : sizeof(buf);
        FUZZ_CHECK(n == exp, "drain %d: %zu bytes, model %zu", i, n, exp);
        check_body(buf, n, S.fl[m->fl].id, m->off);
        m->off += n;
        S.st.bytes_delivered += n;
        if (n < sizeof(buf))
            m_poll(i, &avail, &segrest);
    }
}

static void setup(fuzz_in_t in)
{
    /* The model arrays are only reset as far as they are used. */
    S.in = in;
    S.closed = false;
    S.ops = 0;
    S.nfl = 0;
    memset(S.rd, 0, sizeof(S.rd));
    memset(S.wr, 0, sizeof(S.wr));
    memset(S.holds, 0, sizeof(S.holds));
    memset(&S.st, 0, sizeof(S.st));
    for (int k = 0; k < NKEYS; k++)
        S.key_fl[k] = -1;
    vnow = 1000000000000ll;

    flight_opts_t o;
    flight_opts_init(&o);
    uint8_t a = fuzz_u8(&S.in), b = fuzz_u8(&S.in), c = fuzz_u8(&S.in);
    o.max_lag = a < 64 ? FLIGHT_UNLIMITED : a < 128 ? 0 : 1 + a % 48;
    o.retain_limit = b < 64 ? 0 : b % 64;
    o.wait_timeout_ms = c % 4;
    o.orphan_policy = (c >> 2) & 1;
    o.shards = 1 + ((c >> 3) & 3);
    S.max_lag = o.max_lag ? o.max_lag : 64ull << 20;
    S.retain = o.retain_limit ? o.retain_limit : 16ull << 20;
    if (S.retain > S.max_lag)
        S.retain = S.max_lag;
    S.wait_ns = (int64_t)o.wait_timeout_ms * 1000000;
    S.policy = o.orphan_policy;
    FUZZ_CHECK(flight_group_new(&S.g, &o) == 0, "group");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    vclock_on = true;
    long base = atomic_load(&live_allocs);
    setup(fuzz_in(data, size));
    run_ops(0, MAXOPS);

    /* Wind down: writers go (their flights end), readers read to the end
     * or close early, as the rest of the input says. */
    for (int ws = 0; ws < NWRITERS; ws++) {
        if (S.wr[ws].live) {
            op_w_release(ws);
            check_all();
        }
    }
    for (int i = 0; i < NREADERS; i++) {
        if (!S.rd[i].open)
            continue;
        if (!(fuzz_u8(&S.in) & 1))
            drain(i);
        check_loan(i);
        flight_reader_t *r = S.rd[i].r;
        m_close(i);
        flight_reader_close(r);
        check_all();
    }
    for (int h = 0; h < NHOLDS; h++)
        drop_hold(h);
    if (!S.closed) {
        flight_stats_t s;
        flight_group_stats(S.g, &s, sizeof(s));
        FUZZ_CHECK(!s.readers_open && !s.segments_held && !s.bytes_held &&
                       !s.flights_active,
                   "gauges after the end: readers %llu segments %llu bytes "
                   "%llu flights %llu",
                   (unsigned long long)s.readers_open,
                   (unsigned long long)s.segments_held,
                   (unsigned long long)s.bytes_held,
                   (unsigned long long)s.flights_active);
        check_stats();
        flight_group_close(S.g);
    }
    long left = atomic_load(&live_allocs) - base;
    FUZZ_CHECK(left == 0, "%ld allocations left after the group closed", left);
    vclock_on = false;
    return 0;
}

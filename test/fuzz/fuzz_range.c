/*
 * libFuzzer harness: range flights (flight_do_range), their arithmetic and
 * the validation of what "upstream" replies, checked against a model.
 *
 * One object key in one group with a fuzzed chunk size (1 byte to 2^64-1),
 * objects near offset 0 or near 2^63, up to NREADERS range readers with
 * fuzzed ranges (open ends, past the end, invalid ones) and the fetch runs
 * they lead. Each fetch callback first checks the byte range it is asked
 * for against the model's plan (chunk-aligned, exactly the gaps between the
 * runs in flight, clipped to a known size), then runs a nested program:
 * replies with flight_set_range() truthfully or not (wrong first byte,
 * short, long, a whole body, another size or validator, 416, invalid
 * arguments), writes fuzzed amounts (short, exact, excess), ends with any
 * status, or keeps the writer (FLIGHT_FETCH_ASYNC) for later operations.
 * "Upstream" has versions: its content is a pattern of (version, offset)
 * and each version has its own validator, so a byte a reader delivers
 * proves which object and offset it came from.
 *
 * Checks: every return code, byte count and meta the model predicts; every
 * delivered byte is the byte of its offset in one single version (never
 * misaligned, never a mix); an EOF only after exactly the range, clipped
 * to the size flight_reader_range() reports; a reader whose fetches all
 * replied truthfully and completed ends with exactly its bytes (or
 * FLIGHT_ERANGE past the end), whatever the model says; no reader is left
 * armed and ready without a notification; counters; and at the end all
 * gauges 0 and every allocation freed.
 *
 * Not covered: range_linger_ms (it sleeps, and only ranges arriving from
 * other threads during the sleep join a lingering run).
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

#define NREADERS 8
#define NWRITERS 6
#define MAXRUNS  48
#define MAXP     24 /* Pieces per reader. */
#define MAXSEG   64 /* Writes recorded per run. */
#define MAXVER   8
#define MAXOPS   100
#define MAXDEPTH 2
#define END      FLIGHT_RANGE_END
#define UNK      FLIGHT_SIZE_UNKNOWN
#define OPEN     UINT64_MAX /* A run or piece whose last chunk is unknown. */
#define LIMIT    (1ull << 63)

/* --- Model ---------------------------------------------------------------- */

static FUZZ_NOCOV uint8_t pat(int ver, uint64_t off)
{
    uint64_t x = (off + 1) * 0x9E3779B97F4A7C15ull ^ (uint64_t)ver << 56;
    x ^= x >> 29;
    return (uint8_t)(x * 0xBF58476D1CE4E5B9ull >> 56);
}

typedef struct mrun {
    bool listed, ended, replied, canceled, orphan_counted, fetching;
    bool started, meta_set, w_ended, w_released;
    bool truthful;        /* Replied as upstream's current version said. */
    uint64_t start_total; /* The size vouched for when its fetch started. */
    bool wref;            /* The writer still holds the run (and the object). */
    int status, ver, leader; /* leader: reader slot, -1 once closed. */
    uint64_t a, b, cur;      /* Chunks; b may be OPEN. */
    uint64_t ask_first, ask_last, rlast, expect, written, total, gen;
    unsigned nreaders;
    size_t metalen;
    unsigned nseg;
    uint64_t seg_end[MAXSEG]; /* Object offset after each write. */
} mrun_t;

typedef struct mpiece {
    int run;
    uint64_t from, to; /* Chunks; to may be OPEN. */
    bool counted;
} mpiece_t;

typedef struct mrr {
    bool open, handed;
    flight_reader_t *r;
    uint64_t first, last, pos, gen, total;
    uint64_t plan_total; /* The size vouched for when it was planned. */
    bool misled; /* An untruthful reply became the identity while open. */
    int np, cur;
    mpiece_t pv[MAXP];
    int status;
    bool led, fetching, meta_seen, shared, armed, close_in_cb, self_touched;
    uint64_t fetch_written;
    int64_t deadline;
    int ver; /* Version of the bytes delivered so far, -1 before any. */
    size_t peeked;
    const uint8_t *loan;
    uint64_t loan_pos;
    int loan_ver;
} mrr_t;

typedef struct mwriter {
    bool live;
    flight_writer_t *w;
    int run;
} mwriter_t;

static struct state {
    fuzz_in_t in;
    flight_group_t *g;
    uint64_t cs, base, max_lag;
    int64_t wait_ns;
    int policy;
    bool noval;       /* Replies carry no validator: one version only. */
    bool ver_changed; /* Upstream changed during the exec. */
    bool used_empty;  /* A reply had no validator. */
    unsigned ops;
    int nver, curver;
    uint64_t size[MAXVER];
    /* The object's identity as the library keeps it. */
    uint64_t o_total, o_gen, o_seen;
    bool o_vset;
    int o_vid; /* Version whose validator is set; -1: the empty one. */
    int nrun;
    mrun_t run[MAXRUNS];
    mrr_t rd[NREADERS];
    mwriter_t wr[NWRITERS];
    flight_stats_t st;
} S;

static const char key[] = "object";

static FUZZ_NOCOV int end_status(int s)
{
    if (s == COALESCE_EOF)
        return 0;
    if (s == COALESCE_EAGAIN)
        return COALESCE_EUPSTREAM;
    return s;
}

static FUZZ_NOCOV uint64_t chunk_end(uint64_t k)
{
    uint64_t cs = S.cs;
    if (k > (UINT64_MAX - 1) / cs - 1)
        return UINT64_MAX - 1;
    return (k + 1) * cs - 1;
}

static FUZZ_NOCOV bool run_done(const mrun_t *R)
{
    return R->ended || (R->b != OPEN && R->cur > R->b);
}

static FUZZ_NOCOV bool run_meta_stage(const mrun_t *R)
{
    return R->ended || R->written || (R->replied && R->meta_set);
}

/* The size a fetch in flight vouches for. */
static FUZZ_NOCOV uint64_t vouched(void)
{
    if (S.o_total == UNK)
        return UNK;
    for (int i = 0; i < S.nrun; i++)
        if (S.run[i].listed && S.run[i].replied && S.run[i].gen == S.o_gen)
            return S.o_total;
    return UNK;
}

static void m_run_end(int ri, int status);

static FUZZ_NOCOV void m_uncount(mpiece_t *pc, bool orphan_check)
{
    if (!pc->counted)
        return;
    pc->counted = false;
    mrun_t *R = &S.run[pc->run];
    if (--R->nreaders || !orphan_check || run_done(R))
        return;
    if (!R->orphan_counted)
        S.st.orphaned++;
    R->orphan_counted = true;
    if (S.policy == FLIGHT_ORPHAN_CANCEL) {
        R->canceled = true;
        m_run_end(pc->run, FLIGHT_ECANCELED);
    }
}

static FUZZ_NOCOV void m_run_end(int ri, int status)
{
    mrun_t *R = &S.run[ri];
    if (R->ended)
        return;
    R->ended = true;
    R->status = status;
    R->listed = false;
    if (status < 0)
        S.st.errors++;
}

/* The reader stops: first status wins; its pieces need nothing more. */
static FUZZ_NOCOV int m_stop(int x, int status)
{
    mrr_t *X = &S.rd[x];
    if (!X->status)
        X->status = status;
    for (int i = 0; i < X->np; i++)
        m_uncount(&X->pv[i], true);
    return X->status;
}

static FUZZ_NOCOV void m_sync(mrr_t *X)
{
    const mrun_t *R0 = &S.run[X->pv[0].run];
    if (!X->gen && R0->replied) {
        X->gen = R0->gen;
        X->total = R0->total;
    }
    if (X->gen == S.o_gen)
        X->total = S.o_total;
}

static FUZZ_NOCOV uint64_t m_total(const mrr_t *X)
{
    if (!X->gen)
        return vouched();
    return X->gen == S.o_gen ? S.o_total : X->total;
}

static FUZZ_NOCOV uint64_t m_end_of(const mrr_t *X)
{
    uint64_t end = X->last == END ? UINT64_MAX : X->last + 1;
    uint64_t t = m_total(X);
    return t != UNK && t < end ? t : end;
}

/*
 * Where reader x stands: 0 with bytes at pos (*n of them in the current
 * write, within the range), COALESCE_EAGAIN, or its terminal status. With
 * dry, nothing changes (for readiness checks).
 */
static FUZZ_NOCOV int m_poll(int x, bool dry, uint64_t *n, int *ver)
{
    mrr_t *X = &S.rd[x];
    if (X->status)
        return X->status;
    const mrun_t *R0 = &S.run[X->pv[0].run];
    if (X->deadline && !run_meta_stage(R0) && vnow >= X->deadline) {
        if (dry)
            return FLIGHT_ETIMEDOUT;
        S.st.timeouts++;
        return m_stop(x, FLIGHT_ETIMEDOUT);
    }
    mrr_t copy;
    if (dry) {
        copy = *X;
        X = &copy;
    }
    m_sync(X);
    int cur = X->cur;
    for (;;) {
        uint64_t t = m_total(X);
        int fin = 0;
        if (t != UNK && X->first >= t)
            fin = FLIGHT_ERANGE;
        else if (X->pos >= m_end_of(X))
            fin = COALESCE_EOF;
        mpiece_t *pc = &X->pv[cur];
        uint64_t k = X->pos / S.cs;
        if (!fin && pc->to != OPEN && k > pc->to) {
            if (!dry)
                m_uncount(pc, true);
            if (cur + 1 == X->np) {
                fin = FLIGHT_EMISMATCH;
            } else {
                cur++;
                if (!dry)
                    X->cur = cur;
                continue;
            }
        }
        const mrun_t *R = &S.run[pc->run];
        /* Another version: replied for it, or found it too short. */
        if (!fin && ((R->replied && R->gen != X->gen) ||
                     (X->gen && R->ended && R->status == FLIGHT_ERANGE)))
            fin = FLIGHT_EMISMATCH;
        if (!fin && R->ask_first + R->written > X->pos) {
            /* The rest of the write holding pos, within its chunk and the
             * reader's range. */
            unsigned s = 0;
            while (R->seg_end[s] <= X->pos)
                s++;
            uint64_t e = R->seg_end[s];
            uint64_t ce = chunk_end(k);
            if (e > ce + 1)
                e = ce + 1;
            uint64_t end = m_end_of(X);
            if (e > end)
                e = end;
            *n = e - X->pos;
            *ver = R->ver;
            return 0;
        }
        /* Past the last byte its fetch replied, all written: the chunk
         * ended there, a mismatch whatever the fetch ends with later. */
        if (!fin && R->replied && X->pos > R->rlast &&
            R->ask_first + R->written > R->rlast)
            fin = FLIGHT_EMISMATCH;
        if (!fin && R->ended)
            fin = R->status < 0 ? R->status : FLIGHT_EMISMATCH;
        else if (!fin && run_done(R))
            fin = FLIGHT_EMISMATCH;
        if (!fin)
            return COALESCE_EAGAIN;
        return dry ? (X->status ? X->status : fin) : m_stop(x, fin);
    }
}

static FUZZ_NOCOV int m_meta_poll(int x)
{
    mrr_t *X = &S.rd[x];
    if (X->status == FLIGHT_ETIMEDOUT)
        return X->status;
    const mrun_t *R0 = &S.run[X->pv[0].run];
    m_sync(X);
    if (run_meta_stage(R0)) {
        uint64_t t = m_total(X);
        if (t != UNK && X->first >= t)
            return m_stop(x, FLIGHT_ERANGE);
        if (R0->ended && R0->status < 0 && !R0->written && !R0->meta_set)
            return X->status ? X->status : R0->status;
        return 0;
    }
    if (X->status)
        return X->status;
    if (X->deadline && vnow >= X->deadline) {
        S.st.timeouts++;
        return m_stop(x, FLIGHT_ETIMEDOUT);
    }
    return COALESCE_EAGAIN;
}

/* What a notification promises: something new to read (deadlines are the
 * host's timer's business). */
static FUZZ_NOCOV bool m_ready(int x)
{
    mrr_t *X = &S.rd[x];
    if (X->status)
        return true;
    if (!X->meta_seen && run_meta_stage(&S.run[X->pv[0].run]))
        return true;
    int64_t saved = X->deadline;
    X->deadline = 0;
    uint64_t n;
    int ver;
    int rc = m_poll(x, true, &n, &ver);
    X->deadline = saved;
    return rc != COALESCE_EAGAIN;
}

static FUZZ_NOCOV void
check_bytes(const uint8_t *p, uint64_t n, int ver, uint64_t pos)
{
    for (uint64_t k = 0; k < n; k++)
        FUZZ_CHECK(p[k] == pat(ver, pos + k),
                   "byte at %llu is %u, want %u (version %d)",
                   (unsigned long long)(pos + k), p[k], pat(ver, pos + k), ver);
}

static FUZZ_NOCOV void check_loan(int x)
{
    mrr_t *X = &S.rd[x];
    if (X->peeked)
        check_bytes(X->loan, X->peeked, X->loan_ver, X->loan_pos);
}

/* Pieces of run ri's readers still waiting for its bytes, counted from
 * the spec rather than from the library's bookkeeping. */
static FUZZ_NOCOV unsigned m_needers(int ri)
{
    const mrun_t *R = &S.run[ri];
    unsigned n = 0;
    if (R->ended)
        return 0;
    for (int x = 0; x < NREADERS; x++) {
        const mrr_t *X = &S.rd[x];
        if (!X->open || X->status)
            continue;
        for (int i = 0; i < X->np; i++) {
            const mpiece_t *pc = &X->pv[i];
            if (pc->run != ri)
                continue;
            uint64_t lo = pc->from > R->cur ? pc->from : R->cur;
            uint64_t hi = pc->to < R->b ? pc->to : R->b;
            n += lo <= hi;
        }
    }
    return n;
}

static FUZZ_NOCOV void check_stats(void)
{
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
    EQ(bytes_delivered);
    EQ(readers_open);
    EQ(orphaned);
    EQ(range_fetches);
    EQ(range_bytes_fetched);
    EQ(range_mismatches);
#undef EQ
}

static FUZZ_NOCOV void check_all(void)
{
    for (int x = 0; x < NREADERS; x++) {
        mrr_t *X = &S.rd[x];
        if (!X->open || !X->handed)
            continue;
        FUZZ_CHECK(flight_reader_offset(X->r) == X->pos - X->first,
                   "reader %d: offset %llu, model %llu", x,
                   (unsigned long long)flight_reader_offset(X->r),
                   (unsigned long long)(X->pos - X->first));
        FUZZ_CHECK(!X->armed || X->self_touched || !m_ready(x),
                   "reader %d: ready, still armed (missed notification)", x);
    }
    check_stats();
}

/* --- Operations ----------------------------------------------------------- */

enum {
    OP_DO,
    OP_READ,
    OP_PEEK,
    OP_CONSUME,
    OP_META,
    OP_RANGE,
    OP_CLOSE,
    OP_NOTIFY,
    OP_W_REPLY,
    OP_W_WRITE,
    OP_W_META,
    OP_W_END,
    OP_W_RELEASE,
    OP_W_READERS,
    OP_UPSTREAM,
    OP_CLOCK,
    OP_DEADLINE,
    OP_READ2,
    OP_W_WRITE2,
    OP_DO2,
    NOPS
};

static void run_ops(int depth, unsigned max_ops);

static FUZZ_NOCOV int free_slot(void)
{
    for (int i = 0; i < NREADERS; i++)
        if (!S.rd[i].open)
            return i;
    return -1;
}

static FUZZ_NOCOV int writer_of(int ri)
{
    for (int i = 0; i < NWRITERS; i++)
        if (S.wr[i].live && S.wr[i].run == ri)
            return i;
    return -1;
}

/* The runs in flight, in chunk order. */
static FUZZ_NOCOV int listed_runs(int *v)
{
    int n = 0;
    for (int i = 0; i < S.nrun; i++) {
        if (!S.run[i].listed)
            continue;
        int j = n++;
        while (j > 0 && S.run[v[j - 1]].cur > S.run[i].cur) {
            v[j] = v[j - 1];
            j--;
        }
        v[j] = i;
    }
    return n;
}

static FUZZ_NOCOV void add_piece(mrr_t *X, int ri, uint64_t from, uint64_t to)
{
    mpiece_t *pc = &X->pv[X->np++];
    *pc = (mpiece_t){ri, from, to, true};
    S.run[ri].nreaders++;
    if (S.run[ri].leader != X - S.rd)
        X->shared = true;
}

/*
 * The plan of a call over chunks c0..c1 (c1 may be OPEN): join the runs in
 * flight covering them, lead one new run per gap. With !apply only counts
 * pieces and new runs.
 */
static FUZZ_NOCOV void
m_plan(mrr_t *X, uint64_t c0, uint64_t c1, bool apply, int *np, int *nr)
{
    int v[MAXRUNS];
    int n = listed_runs(v), j = 0;
    while (j < n && S.run[v[j]].b != OPEN && S.run[v[j]].b < c0)
        j++;
    for (uint64_t i = c0;;) {
        uint64_t to;
        const mrun_t *R = j < n ? &S.run[v[j]] : NULL;
        if (R && R->cur <= i) {
            to = R->b == OPEN ? c1 : c1 == OPEN ? R->b : c1 < R->b ? c1 : R->b;
            if (apply)
                add_piece(X, v[j], i, to);
            j++;
        } else {
            to = R ? R->cur - 1 : OPEN;
            if (c1 != OPEN && c1 < to)
                to = c1;
            (*nr)++;
            if (apply) {
                int ri = S.nrun++;
                mrun_t *N = &S.run[ri];
                memset(N, 0, offsetof(mrun_t, seg_end));
                N->listed = true;
                N->wref = true;
                N->leader = (int)(X - S.rd);
                N->a = N->cur = i;
                N->b = to;
                N->ver = -1;
                N->start_total = UNK;
                X->led = true;
                add_piece(X, ri, i, to);
            }
        }
        (*np)++;
        if (to == OPEN || (c1 != OPEN && to >= c1))
            break;
        i = to + 1;
    }
}

/* The next run reader x leads that needs a fetch, in order; runs found
 * past the object's end meanwhile end with FLIGHT_ERANGE unfetched. */
static FUZZ_NOCOV int m_lead_next(int x)
{
    mrr_t *X = &S.rd[x];
    for (int i = 0; i < X->np; i++) {
        mrun_t *R = &S.run[X->pv[i].run];
        if (R->leader != x || R->started)
            continue;
        R->started = true;
        if (R->ended) {
            R->w_ended = true;
            R->wref = false;
            continue;
        }
        R->ask_first = R->a * S.cs;
        R->ask_last = R->b == OPEN ? END : chunk_end(R->b);
        uint64_t t = vouched();
        R->start_total = t;
        if (t != UNK) {
            if (R->ask_first >= t) {
                R->total = t;
                m_run_end(X->pv[i].run, FLIGHT_ERANGE);
                R->w_ended = true;
                R->wref = false;
                continue;
            }
            if (R->ask_last > t - 1)
                R->ask_last = t - 1;
            if (R->b == OPEN || R->b > (t - 1) / S.cs)
                R->b = (t - 1) / S.cs;
            /* Pieces past the end need nothing from it. */
            for (int y = 0; y < NREADERS; y++)
                for (int j = 0; S.rd[y].open && j < S.rd[y].np; j++)
                    if (S.rd[y].pv[j].run == X->pv[i].run &&
                        S.rd[y].pv[j].from > R->b)
                        m_uncount(&S.rd[y].pv[j], true);
        }
        R->fetching = true;
        S.st.range_fetches++;
        return X->pv[i].run;
    }
    return -1;
}

typedef struct fctx {
    int x; /* The calling reader's slot. */
    int depth;
} fctx_t;

static FUZZ_NOCOV void m_fetch_returned(int ri, int rc)
{
    mrun_t *R = &S.run[ri];
    R->fetching = false;
    if (rc == FLIGHT_FETCH_ASYNC && !R->w_released)
        return;
    int status = rc < 0                    ? end_status(rc)
                 : rc == FLIGHT_FETCH_DONE ? COALESCE_EUPSTREAM
                                           : COALESCE_EINVAL;
    if (!R->ended && !status && (!R->replied || R->written < R->expect)) {
        S.st.range_mismatches++; /* A short body never ends cleanly. */
        status = FLIGHT_EMISMATCH;
    }
    if (!R->ended)
        m_run_end(ri, status);
    R->w_ended = true;
    R->wref = false;
    int ws = writer_of(ri);
    if (ws >= 0)
        S.wr[ws].live = false;
}

static int
fetch_cb(flight_writer_t *w, uint64_t first, uint64_t last, void *data)
{
    fctx_t *c = data;
    int ri = m_lead_next(c->x);
    TRACE("  fetch run %d [%llu, %llu]\n", ri, (unsigned long long)first,
          (unsigned long long)last);
    FUZZ_CHECK(ri >= 0, "a fetch the plan does not have");
    mrun_t *R = &S.run[ri];
    FUZZ_CHECK(first == R->ask_first && last == R->ask_last,
               "fetch [%llu, %llu], plan [%llu, %llu]",
               (unsigned long long)first, (unsigned long long)last,
               (unsigned long long)R->ask_first,
               (unsigned long long)R->ask_last);
    FUZZ_CHECK(first % S.cs == 0, "fetch not chunk-aligned");
    int rc = COALESCE_EIO;
    for (int ws = 0; ws < NWRITERS; ws++) {
        if (S.wr[ws].live)
            continue;
        S.wr[ws] = (mwriter_t){true, w, ri};
        run_ops(c->depth + 1, fuzz_u8(&S.in) % 8);
        static const int results[] = {FLIGHT_FETCH_DONE,  FLIGHT_FETCH_ASYNC,
                                      FLIGHT_FETCH_ASYNC, FLIGHT_FETCH_ASYNC,
                                      COALESCE_EIO,       COALESCE_EAGAIN,
                                      COALESCE_EOF,       2};
        rc = results[fuzz_u8(&S.in) % 8];
        break;
    }
    TRACE("  fetch run %d returns %d\n", ri, rc);
    m_fetch_returned(ri, rc);
    return rc;
}

/* Once no reader and no writer holds the object, the library forgets what
 * it knew of it (the group is not a cache). */
static FUZZ_NOCOV void m_forget(void)
{
    for (int x = 0; x < NREADERS; x++)
        if (S.rd[x].open)
            return;
    for (int i = 0; i < S.nrun; i++)
        if (S.run[i].wref)
            return;
    S.o_total = UNK;
    S.o_gen = 1;
    S.o_seen = 0;
    S.o_vset = false;
    S.o_vid = -1;
}

/* An offset of the object: near 0 or near 2^63, as the exec's base says. */
static FUZZ_NOCOV uint64_t off_of(uint8_t v)
{
    return S.base + v;
}

static void op_do(int depth)
{
    if (depth > MAXDEPTH)
        return;
    int x = free_slot();
    if (x < 0)
        return;
    uint8_t how = fuzz_u8(&S.in);
    uint64_t first = off_of(fuzz_u8(&S.in)), d = fuzz_u8(&S.in), last;
    switch (how % 8) {
    case 0:
    case 1:
        last = END;
        break;
    case 2:
        /* Spans chunks whatever cs. */
        last = first + (S.cs > (1ull << 40) ? d : d * S.cs / 4 + d);
        if (last < first || last >= LIMIT)
            last = LIMIT - 1;
        break;
    case 3: /* Invalid: before first, or offsets out of range. */
        last = (d & 1) ? first - 1 - d % 4 : (d & 2) ? LIMIT : first;
        if (d & 4)
            first = LIMIT + d % 3, last = END;
        break;
    default:
        last = first + d % 64;
        break;
    }
    mrr_t *X = &S.rd[x];
    int want = 0;
    m_forget();
    uint64_t t = vouched();
    if (last < first || first >= LIMIT || (last != END && last >= LIMIT))
        want = COALESCE_EINVAL;
    else if (t != UNK && first >= t)
        want = FLIGHT_ERANGE;
    uint64_t c0 = 0, c1 = 0;
    if (!want) {
        uint64_t lastb = t != UNK && last > t - 1 ? t - 1 : last;
        c0 = first / S.cs;
        c1 = lastb == END ? OPEN : lastb / S.cs;
        int np = 0, nr = 0;
        memset(X, 0, sizeof(*X));
        m_plan(X, c0, c1, false, &np, &nr);
        if (np > MAXP || S.nrun + nr > MAXRUNS)
            return; /* Beyond what the model records. */
    }
    TRACE("  do r%d [%llu, %llu] want %d\n", x, (unsigned long long)first,
          (unsigned long long)last, want);
    flight_reader_t *r = NULL;
    fctx_t c = {x, depth};
    if (want) {
        int rc = flight_do_range(S.g, key, sizeof(key) - 1, first, last,
                                 fetch_cb, &c, &r);
        FUZZ_CHECK(rc == want && !r, "flight_do_range %d, model %d", rc, want);
        return;
    }
    memset(X, 0, sizeof(*X));
    X->open = true;
    X->first = X->pos = first;
    X->last = last;
    X->plan_total = t;
    X->ver = -1;
    int np = 0, nr = 0;
    m_plan(X, c0, c1, true, &np, &nr);
    S.st.readers_open++;
    const mrun_t *R0 = &S.run[X->pv[0].run];
    if (S.wait_ns && R0->leader != x && !run_meta_stage(R0))
        X->deadline = vnow + S.wait_ns;
    X->fetching = X->led;
    int rc = flight_do_range(S.g, key, sizeof(key) - 1, first, last, fetch_cb,
                             &c, &r);
    FUZZ_CHECK(rc == 0 && r, "flight_do_range %d, model 0", rc);
    FUZZ_CHECK(m_lead_next(x) < 0, "a fetch of the plan was not called");
    X->r = r;
    X->handed = true;
    if (X->led) {
        uint64_t fw = 0;
        for (int i = 0; i < X->np; i++)
            if (S.run[X->pv[i].run].leader == x)
                fw += S.run[X->pv[i].run].written;
        X->fetch_written = fw;
        X->fetching = false;
    }
    FUZZ_CHECK(flight_reader_shared(r) == X->shared, "shared %d, model %d",
               flight_reader_shared(r), X->shared);
}

/* A reader for a reader call, which tells it what a notification would
 * have: it is not owed one until it arms again. */
static FUZZ_NOCOV int pick_reader(void)
{
    int v[NREADERS], n = 0;
    for (int i = 0; i < NREADERS; i++)
        if (S.rd[i].open && S.rd[i].handed)
            v[n++] = i;
    if (!n)
        return -1;
    int x = v[fuzz_pick(&S.in, (unsigned)n)];
    S.rd[x].self_touched = true;
    return x;
}

static FUZZ_NOCOV int pick_writer(void)
{
    int v[NWRITERS], n = 0;
    for (int i = 0; i < NWRITERS; i++)
        if (S.wr[i].live)
            v[n++] = i;
    return n ? v[fuzz_pick(&S.in, (unsigned)n)] : -1;
}

/* A body read that found the meta stage has seen it (flight_read). */
static FUZZ_NOCOV void saw_meta_stage(mrr_t *X, int rc)
{
    if (!rc || (rc == COALESCE_EAGAIN && run_meta_stage(&S.run[X->pv[0].run])))
        X->meta_seen = true;
}

static FUZZ_NOCOV void delivered(int x, const uint8_t *p, uint64_t n, int ver)
{
    mrr_t *X = &S.rd[x];
    FUZZ_CHECK(X->ver < 0 || X->ver == ver,
               "reader %d mixes versions %d and %d", x, X->ver, ver);
    X->ver = ver;
    check_bytes(p, n, ver, X->pos);
    FUZZ_CHECK(X->last == END || X->pos + n - 1 <= X->last,
               "reader %d: bytes past its range", x);
    X->pos += n;
    S.st.bytes_delivered += n;
}

/* An end must be exactly the range, clipped to the size the reader
 * reports; an error comes with flight_reader_range() still answering. */
static FUZZ_NOCOV void check_end(int x, int status)
{
    mrr_t *X = &S.rd[x];
    uint64_t f = 1, l = 2, t = 3;
    int rc = flight_reader_range(X->r, &f, &l, &t);
    if (status == COALESCE_EOF) {
        FUZZ_CHECK(rc == 0, "reader %d: EOF but range %d", x, rc);
        FUZZ_CHECK(f == X->first && l != END && X->pos == l + 1,
                   "reader %d: EOF at %llu, range [%llu, %llu]", x,
                   (unsigned long long)X->pos, (unsigned long long)f,
                   (unsigned long long)l);
        FUZZ_CHECK(X->last == END ? t == l + 1
                                  : l == X->last || (t != UNK && l == t - 1),
                   "reader %d: EOF range [%llu, %llu] of %llu, asked %llu", x,
                   (unsigned long long)f, (unsigned long long)l,
                   (unsigned long long)t, (unsigned long long)X->last);
    } else if (status == FLIGHT_ERANGE) {
        FUZZ_CHECK(X->pos == X->first, "reader %d: bytes then ERANGE", x);
    }
}

static void op_read(void)
{
    int x = pick_reader();
    if (x < 0)
        return;
    mrr_t *X = &S.rd[x];
    size_t cap = 1 + fuzz_u8(&S.in) % 80;
    check_loan(x);
    X->peeked = 0;
    /* As flight_read: segment after segment until cap or nothing. */
    uint64_t exp = 0, n = 0;
    int ver = -1, vers[80], rc;
    while (!(rc = m_poll(x, false, &n, &ver))) {
        if (n > cap - exp)
            n = cap - exp;
        for (uint64_t k = 0; k < n; k++)
            vers[exp + k] = ver;
        exp += n;
        X->pos += n; /* Advanced here, checked below. */
        if (exp == cap)
            break;
    }
    X->pos -= exp;
    int want = exp ? 0 : rc;
    uint8_t buf[80];
    size_t got = 9999;
    int lrc = flight_read(X->r, buf, cap, 0, &got);
    TRACE("  read r%d cap %zu -> %d n %zu\n", x, cap, lrc, lrc ? 0 : got);
    FUZZ_CHECK(lrc == want, "reader %d: read %d, model %d", x, lrc, want);
    saw_meta_stage(X, lrc);
    if (lrc) {
        FUZZ_CHECK(got == 0, "nread %zu with %d", got, lrc);
        check_end(x, lrc);
        return;
    }
    FUZZ_CHECK(got == exp, "reader %d: read %zu, model %llu", x, got,
               (unsigned long long)exp);
    for (size_t k = 0; k < got; k++)
        delivered(x, buf + k, 1, vers[k]);
}

static void op_peek(void)
{
    int x = pick_reader();
    if (x < 0)
        return;
    mrr_t *X = &S.rd[x];
    check_loan(x);
    X->peeked = 0;
    uint64_t n = 0;
    int ver = -1;
    int want = m_poll(x, false, &n, &ver);
    const void *data = NULL;
    size_t len = 0;
    coalesce_buf_t *owner = NULL;
    int rc = flight_peek(X->r, 0, &data, &len, &owner);
    TRACE("  peek r%d -> %d len %zu\n", x, rc, rc ? 0 : len);
    FUZZ_CHECK(rc == want, "reader %d: peek %d, model %d", x, rc, want);
    saw_meta_stage(X, rc);
    if (rc) {
        check_end(x, rc);
        return;
    }
    FUZZ_CHECK(len == n, "reader %d: peek %zu, model %llu", x, len,
               (unsigned long long)n);
    FUZZ_CHECK(owner, "no owner");
    check_bytes(data, len, ver, X->pos);
    FUZZ_CHECK(X->ver < 0 || X->ver == ver, "reader %d mixes versions", x);
    X->peeked = len;
    X->loan = data;
    X->loan_pos = X->pos;
    X->loan_ver = ver;
}

static void op_consume(void)
{
    int x = pick_reader();
    if (x < 0)
        return;
    mrr_t *X = &S.rd[x];
    uint8_t how = fuzz_u8(&S.in);
    size_t n = how % 4 == 0   ? X->peeked + 1
               : how % 4 == 1 ? X->peeked / 2
                              : X->peeked;
    check_loan(x);
    int want = n > X->peeked ? COALESCE_EINVAL : X->status ? X->status : 0;
    int rc = flight_consume(X->r, n);
    TRACE("  consume r%d %zu -> %d\n", x, n, rc);
    FUZZ_CHECK(rc == want, "reader %d: consume %d, model %d", x, rc, want);
    if (rc || !n)
        return;
    delivered(x, X->loan, n, X->loan_ver);
    X->peeked -= n;
    X->loan += n;
    X->loan_pos += n;
}

static void op_meta(void)
{
    int x = pick_reader();
    if (x < 0)
        return;
    mrr_t *X = &S.rd[x];
    int want = m_meta_poll(x);
    const void *m = (const void *)1;
    size_t len = 999;
    int rc = flight_meta(X->r, 0, &m, &len);
    TRACE("  meta r%d -> %d\n", x, rc);
    FUZZ_CHECK(rc == want, "reader %d: meta %d, model %d", x, rc, want);
    if (rc)
        return;
    X->meta_seen = true;
    const mrun_t *R0 = &S.run[X->pv[0].run];
    FUZZ_CHECK(R0->meta_set ? m && len == R0->metalen : !m && !len,
               "reader %d: meta %p/%zu", x, m, len);
    for (size_t k = 0; k < len; k++)
        FUZZ_CHECK(((const uint8_t *)m)[k] == pat(100 + X->pv[0].run, k),
                   "meta byte");
}

static void op_range(void)
{
    int x = pick_reader();
    if (x < 0)
        return;
    mrr_t *X = &S.rd[x];
    const mrun_t *R0 = &S.run[X->pv[0].run];
    m_sync(X);
    uint64_t t = m_total(X);
    int want = 0;
    if (t != UNK && X->first >= t) {
        want = FLIGHT_ERANGE;
    } else if (t == UNK && !R0->replied) {
        want = R0->ended && R0->status < 0 ? R0->status : COALESCE_EAGAIN;
        if (want < 0 && want != COALESCE_EAGAIN && X->status)
            want = X->status;
        if (want == FLIGHT_ERANGE)
            t = R0->total;
    }
    uint64_t end = m_end_of(X);
    uint64_t f = 1, l = 2, tt = 3;
    int rc = flight_reader_range(X->r, &f, &l, &tt);
    TRACE("  range r%d -> %d [%llu, %llu] / %llu\n", x, rc,
          (unsigned long long)f, (unsigned long long)l, (unsigned long long)tt);
    FUZZ_CHECK(rc == want, "reader %d: range %d, model %d", x, rc, want);
    if (rc == FLIGHT_ERANGE)
        FUZZ_CHECK(tt == t, "reader %d: ERANGE total %llu, model %llu", x,
                   (unsigned long long)tt, (unsigned long long)t);
    if (rc)
        return;
    FUZZ_CHECK(
        f == X->first && l == (end == UINT64_MAX ? END : end - 1) && tt == t,
        "reader %d: range [%llu, %llu] / %llu, model end %llu / %llu", x,
        (unsigned long long)f, (unsigned long long)l, (unsigned long long)tt,
        (unsigned long long)end, (unsigned long long)t);
    /* The spec, whatever the model: the asked range clipped to the size. */
    FUZZ_CHECK(l == END
                   ? X->last == END && t == UNK
                   : (X->last == END || l <= X->last) && (t == UNK || l < t),
               "reader %d: range not the clipped request", x);
}

static FUZZ_NOCOV void m_close(int x)
{
    mrr_t *X = &S.rd[x];
    X->armed = false;
    m_stop(x, COALESCE_ECANCELED);
    for (int i = 0; i < X->np; i++)
        if (S.run[X->pv[i].run].leader == x)
            S.run[X->pv[i].run].leader = -1;
    X->open = false;
    S.st.readers_open--;
}

static void op_close(void)
{
    int x = pick_reader();
    if (x < 0)
        return;
    check_loan(x);
    TRACE("  close r%d\n", x);
    flight_reader_t *r = S.rd[x].r;
    m_close(x);
    flight_reader_close(r);
}

static void notify_cb(flight_reader_t *r, void *data)
{
    int x = (int)(intptr_t)data;
    mrr_t *X = &S.rd[x];
    FUZZ_CHECK(X->open && X->r == r, "notification for closed reader %d", x);
    FUZZ_CHECK(X->armed, "reader %d: notified twice", x);
    X->armed = false; /* Spurious ones are allowed: a read tells. */
    if (X->close_in_cb) {
        m_close(x);
        flight_reader_close(r);
    }
}

static void op_notify(void)
{
    int x = pick_reader();
    if (x < 0)
        return;
    mrr_t *X = &S.rd[x];
    uint8_t flags = fuzz_u8(&S.in);
    uint64_t n;
    int ver;
    int pr = m_poll(x, false, &n, &ver);
    bool ready = pr != COALESCE_EAGAIN ||
                 (run_meta_stage(&S.run[X->pv[0].run]) && !X->meta_seen);
    X->armed = !ready;
    X->self_touched = false;
    X->close_in_cb = flags & 1;
    int rc = flight_reader_notify(X->r, notify_cb, (void *)(intptr_t)x);
    TRACE("  notify r%d -> %d\n", x, rc);
    FUZZ_CHECK(rc == ready, "reader %d: notify %d, model ready %d", x, rc,
               ready);
}

static void op_deadline(void)
{
    int x = pick_reader();
    if (x < 0)
        return;
    mrr_t *X = &S.rd[x];
    int64_t want = -1;
    if (X->deadline && !run_meta_stage(&S.run[X->pv[0].run]) && !X->status) {
        int64_t ns = X->deadline - vnow;
        want = ns <= 0 ? 0 : (ns + 999999) / 1000000;
    }
    int64_t got = flight_reader_deadline_ms(X->r);
    FUZZ_CHECK(got == want, "reader %d: deadline %lld, model %lld", x,
               (long long)got, (long long)want);
}

static FUZZ_NOCOV int m_run_state(const mrun_t *R)
{
    if (R->canceled)
        return FLIGHT_ECANCELED;
    if (R->w_ended || R->ended)
        return COALESCE_EINVAL;
    return 0;
}

/* flight_set_range's validation: the reply with itself and the request
 * (changing nothing if it fails), then against the identity. */
static FUZZ_NOCOV int
m_check_reply(mrun_t *R, uint64_t first, uint64_t last, uint64_t total, int vid)
{
    uint64_t t = total;
    if (first != END) {
        if (first != R->ask_first || (R->ask_last != END && last > R->ask_last))
            return FLIGHT_EMISMATCH;
        if (t == UNK && (R->ask_last == END || last < R->ask_last))
            t = last + 1;
        if (t != UNK && last >= t)
            return FLIGHT_EMISMATCH;
        if (t != UNK && last != (R->ask_last < t - 1 ? R->ask_last : t - 1))
            return FLIGHT_EMISMATCH;
    } else if (t == UNK || R->ask_first < t) {
        return FLIGHT_EMISMATCH;
    }
    bool differs = (S.o_vset && vid != S.o_vid) ||
                   (t != UNK && S.o_total != UNK && t != S.o_total) ||
                   (first != END && S.o_total != UNK && last >= S.o_total) ||
                   (t != UNK && t < S.o_seen);
    if (differs) {
        for (int i = 0; i < S.nrun; i++)
            if (&S.run[i] != R && S.run[i].listed && S.run[i].replied)
                return FLIGHT_EMISMATCH;
        for (int x = 0; x < NREADERS; x++)
            if (S.rd[x].open)
                m_sync(&S.rd[x]); /* They keep the old version's size. */
        S.o_gen++;
        S.o_vset = false;
        S.o_total = UNK;
        S.o_seen = 0;
    }
    R->gen = S.o_gen;
    if (t != UNK)
        S.o_total = t;
    if (first == END) {
        R->total = t;
        return FLIGHT_ERANGE;
    }
    R->rlast = last;
    R->expect = last - first + 1;
    if (last >= S.o_seen)
        S.o_seen = last + 1;
    uint64_t kl = last / S.cs;
    if (R->b == OPEN || R->b > kl)
        R->b = kl;
    return 0;
}

static void op_w_reply(void)
{
    int ws = pick_writer();
    if (ws < 0)
        return;
    int ri = S.wr[ws].run;
    mrun_t *R = &S.run[ri];
    uint8_t kind = fuzz_u8(&S.in), d = 1 + fuzz_u8(&S.in) % 4;
    /* What upstream's current version says, then the lie. */
    int ver = S.curver;
    uint64_t sz = S.size[ver];
    uint64_t af = R->ask_first, al = R->ask_last;
    bool past = af >= sz;
    uint64_t first = past ? END : af;
    uint64_t last = past ? END : (al == END || al > sz - 1) ? sz - 1 : al;
    uint64_t total = sz;
    int vid = S.noval ? -1 : ver;
    bool truthful = false;
    switch (kind % 16) {
    case 0:
    case 1:
    case 2:
    case 3:
        truthful = true;
        break;
    case 4:
    case 5:
        total = past ? sz : UNK; /* Content-Range with an unknown size. */
        truthful = true;
        break;
    case 6:
        first = past ? af : af + d; /* Misaligned. */
        if (past)
            last = af + d;
        break;
    case 7: /* A 200: the whole body. */
        first = 0;
        last = sz ? sz - 1 : 0;
        if (!sz)
            first = last = END;
        break;
    case 8: /* Short; size known or not. */
    case 9:
        if (!past)
            last = last >= first + d ? last - d : first;
        if (kind % 16 == 9)
            total = UNK;
        break;
    case 10: /* Long. */
        if (!past)
            last += d;
        break;
    case 11: /* Another size. */
        total = (kind & 16) || sz < d ? sz + d : sz - d;
        break;
    case 12: /* Another version's validator (the bytes are of that one). */
        if (!S.noval && S.nver > 1) {
            ver = (ver + 1 + d) % S.nver;
            vid = ver;
        }
        break;
    case 13: /* No validator: then upstream must not change (the empty
              * validator would stand for two versions). */
        vid = -1;
        truthful = S.noval;
        S.used_empty = true;
        break;
    case 14: /* Invalid arguments. */
        switch (d) {
        case 1:
            last = END, first = af;
            break;
        case 2:
            first = last + 1;
            break;
        case 3:
            last = LIMIT;
            break;
        default:
            total = LIMIT + 1;
            break;
        }
        break;
    default: /* The truth, but a 416 for a range that is not past it. */
        if (!past)
            first = last = END;
        break;
    }
    char vbuf[8];
    size_t vlen = 0;
    if (vid >= 0)
        vlen = (size_t)snprintf(vbuf, sizeof(vbuf), "v%d", vid);
    int want;
    if ((first == END) != (last == END) || last < first ||
        (first != END && last >= LIMIT) || (total != UNK && total > LIMIT))
        want = COALESCE_EINVAL;
    else if ((want = m_run_state(R)) == 0 && (R->replied || R->written))
        want = COALESCE_EINVAL;
    if (!want) {
        uint64_t gen0 = S.o_gen;
        want = m_check_reply(R, first, last, total, vid);
        /* A lie taken as the object's identity (a new generation, or a
         * wrong size): it outlives its fetch, so readers open now may fail
         * for it (say, a size it made the library forget). */
        if (!truthful && (want == 0 || want == FLIGHT_ERANGE) &&
            (S.o_gen != gen0 || (S.o_total != UNK && S.o_total != sz)))
            for (int x = 0; x < NREADERS; x++)
                S.rd[x].misled |= S.rd[x].open;
        if (want == FLIGHT_EMISMATCH)
            S.st.range_mismatches++;
        if (want) {
            m_run_end(ri, want);
        } else {
            R->replied = true;
            R->ver = ver;
            R->truthful = truthful && !S.ver_changed;
            R->total = S.o_total;
            if (!S.o_vset) {
                S.o_vset = true;
                S.o_vid = vid;
            }
            for (int x = 0; x < NREADERS; x++)
                for (int i = 0; S.rd[x].open && i < S.rd[x].np; i++)
                    if (S.rd[x].pv[i].run == ri && S.rd[x].pv[i].from > R->b)
                        m_uncount(&S.rd[x].pv[i], true);
            if (run_done(R)) {
                R->listed = false;
                for (int x = 0; x < NREADERS; x++)
                    for (int i = 0; S.rd[x].open && i < S.rd[x].np; i++)
                        if (S.rd[x].pv[i].run == ri)
                            m_uncount(&S.rd[x].pv[i], false);
            }
        }
    }
    int rc = flight_set_range(S.wr[ws].w, first, last, total,
                              vlen ? vbuf : NULL, vlen);
    TRACE("  reply run %d [%llu, %llu] / %llu v%d -> %d\n", ri,
          (unsigned long long)first, (unsigned long long)last,
          (unsigned long long)total, vid, rc);
    FUZZ_CHECK(rc == want, "set_range %d, model %d", rc, want);
}

/* A write into chunk k from start: range readers too far behind go. */
static FUZZ_NOCOV void m_chunk_lag(int ri, uint64_t k, uint64_t start)
{
    if (S.max_lag == FLIGHT_UNLIMITED)
        return;
    for (int x = 0; x < NREADERS && !S.run[ri].ended; x++) {
        mrr_t *X = &S.rd[x];
        if (!X->open || X->status)
            continue;
        bool on = false;
        for (int i = 0; i < X->np; i++)
            on |= X->pv[i].run == ri && X->pv[i].from <= k &&
                  (X->pv[i].to == OPEN || k <= X->pv[i].to);
        if (!on || start <= X->pos || start - X->pos <= S.max_lag)
            continue;
        if (X->last != END && start > X->last)
            continue; /* Not a byte it will read. */
        if (X->fetching ||
            (X->led && start - X->pos - S.max_lag <= X->fetch_written))
            continue;
        m_stop(x, FLIGHT_ELAGGED);
        S.st.lagged++;
    }
}

static FUZZ_NOCOV void m_chunk_full(int ri, uint64_t k)
{
    mrun_t *R = &S.run[ri];
    R->cur = k + 1;
    bool done = run_done(R);
    for (int x = 0; x < NREADERS; x++)
        for (int i = 0; S.rd[x].open && i < S.rd[x].np; i++) {
            mpiece_t *pc = &S.rd[x].pv[i];
            if (pc->run == ri && (done || pc->to == k))
                m_uncount(pc, !done);
        }
    if (done)
        R->listed = false;
}

static void op_w_write(void)
{
    int ws = pick_writer();
    if (ws < 0)
        return;
    int ri = S.wr[ws].run;
    mrun_t *R = &S.run[ri];
    uint8_t how = fuzz_u8(&S.in);
    uint64_t left = R->replied ? R->expect - R->written : 0;
    uint64_t len = how < 128 ? how % 24 : how < 224 ? left : left + 1;
    if (len > 300 || (len && R->nseg == MAXSEG))
        return;
    uint8_t buf[301];
    int ver = R->ver < 0 ? 0 : R->ver;
    for (uint64_t k = 0; k < len; k++)
        buf[k] = pat(ver, R->ask_first + R->written + k);
    int want = m_run_state(R);
    if (!want && len && !R->replied)
        want = COALESCE_EINVAL;
    if (!want && len > left) {
        S.st.range_mismatches++;
        m_run_end(ri, FLIGHT_EMISMATCH);
        want = FLIGHT_EMISMATCH;
    }
    if (!want && len) {
        /* Segment by chunk: each may detach laggards, fill its chunk and,
         * with CANCEL, end the run; the call succeeds all the same. */
        uint64_t off = 0;
        S.st.range_bytes_fetched += len;
        while (off < len) {
            uint64_t at = R->ask_first + R->written;
            uint64_t k = at / S.cs, ce = chunk_end(k);
            uint64_t cend = ce < R->rlast ? ce : R->rlast;
            uint64_t n = len - off;
            if (n > cend - at + 1)
                n = cend - at + 1;
            R->written += n;
            m_chunk_lag(ri, k, at);
            off += n;
            if (!R->ended && at + n - 1 == cend)
                m_chunk_full(ri, k);
            if (R->ended)
                break;
        }
        R->seg_end[R->nseg++] = R->ask_first + R->written;
    }
    int rc = flight_write(S.wr[ws].w, len ? buf : NULL, (size_t)len);
    TRACE("  write run %d %llu -> %d\n", ri, (unsigned long long)len, rc);
    FUZZ_CHECK(rc == want, "write(%llu) %d, model %d", (unsigned long long)len,
               rc, want);
}

static void op_w_meta(void)
{
    int ws = pick_writer();
    if (ws < 0)
        return;
    int ri = S.wr[ws].run;
    mrun_t *R = &S.run[ri];
    size_t len = fuzz_u8(&S.in) % 9;
    uint8_t m[8];
    for (size_t k = 0; k < len; k++)
        m[k] = pat(100 + ri, k);
    int want = m_run_state(R);
    if (!want && (R->meta_set || R->written))
        want = COALESCE_EINVAL;
    if (!want) {
        R->meta_set = true;
        R->metalen = len;
    }
    int rc = flight_set_meta(S.wr[ws].w, len ? m : NULL, len);
    TRACE("  set_meta run %d -> %d\n", ri, rc);
    FUZZ_CHECK(rc == want, "set_meta %d, model %d", rc, want);
}

static void op_w_end(void)
{
    int ws = pick_writer();
    if (ws < 0)
        return;
    int ri = S.wr[ws].run;
    mrun_t *R = &S.run[ri];
    static const int sts[] = {
        0, 0, COALESCE_EOF, COALESCE_EAGAIN, COALESCE_EIO, 1, FLIGHT_ECANCELED};
    int status = sts[fuzz_u8(&S.in) % 7];
    int want;
    if (status > 0) {
        want = COALESCE_EINVAL;
    } else {
        int s = end_status(status);
        want = m_run_state(R);
        if (!want) {
            if (!s && (!R->replied || R->written < R->expect)) {
                S.st.range_mismatches++;
                s = want = FLIGHT_EMISMATCH; /* Short: never an EOF. */
            }
            m_run_end(ri, s);
        }
        if (want != COALESCE_EINVAL)
            R->w_ended = true;
    }
    int rc = flight_end(S.wr[ws].w, status);
    TRACE("  end run %d %d -> %d\n", ri, status, rc);
    FUZZ_CHECK(rc == want, "end(%d) %d, model %d", status, rc, want);
}

static void op_w_release(int ws)
{
    int ri = S.wr[ws].run;
    mrun_t *R = &S.run[ri];
    m_run_end(ri, COALESCE_EUPSTREAM);
    R->w_ended = true;
    if (R->fetching)
        R->w_released = true;
    else
        R->wref = false;
    S.wr[ws].live = false;
    TRACE("  release run %d\n", ri);
    flight_writer_release(S.wr[ws].w);
}

static void op_w_readers(void)
{
    int ws = pick_writer();
    if (ws < 0)
        return;
    int ri = S.wr[ws].run;
    unsigned n = flight_writer_readers(S.wr[ws].w);
    FUZZ_CHECK(n == S.run[ri].nreaders, "writer readers %u, model %u", n,
               S.run[ri].nreaders);
    if (!S.run[ri].ended)
        FUZZ_CHECK(n == m_needers(ri), "writer readers %u, waiting %u", n,
                   m_needers(ri));
}

static void op_upstream(void)
{
    uint8_t v = fuzz_u8(&S.in);
    if (S.noval || S.used_empty || S.nver == MAXVER)
        return;
    /* A new version: another validator, maybe another size. */
    S.size[S.nver] = (v & 1) ? S.size[S.curver] : off_of(v);
    S.curver = S.nver++;
    S.ver_changed = true;
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
        case OP_META:
            op_meta();
            break;
        case OP_RANGE:
            op_range();
            break;
        case OP_CLOSE:
            op_close();
            break;
        case OP_NOTIFY:
            op_notify();
            break;
        case OP_W_REPLY:
            op_w_reply();
            break;
        case OP_W_WRITE:
        case OP_W_WRITE2:
            op_w_write();
            break;
        case OP_W_META:
            op_w_meta();
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
        case OP_UPSTREAM:
            op_upstream();
            break;
        case OP_CLOCK:
            vnow += (int64_t)(fuzz_u8(&S.in) % 8) * 500000;
            break;
        case OP_DEADLINE:
            op_deadline();
            break;
        }
        check_all();
    }
}

/* A reader whose fetches all told the truth and completed, of a version
 * that never changed, ends with exactly its range (or past the end). */
static FUZZ_NOCOV void check_clean(int x, int status)
{
    mrr_t *X = &S.rd[x];
    if (status == FLIGHT_ELAGGED || status == FLIGHT_ETIMEDOUT)
        return;
    for (int i = 0; i < X->np; i++) {
        const mrun_t *R = &S.run[X->pv[i].run];
        bool ok =
            R->truthful && R->ended && !R->status && R->written == R->expect;
        /* Past the end: true only if the object is that small (another
         * fetch's untruthful size may have said so). */
        bool past = !R->replied && R->ended && R->status == FLIGHT_ERANGE &&
                    !S.ver_changed && R->ask_first >= S.size[0];
        if (!ok && !past)
            return;
    }
    uint64_t sz = S.size[0];
    /* Planned with a size another fetch said untruthfully (another size,
     * or short without one: flight_set_range() then ends the object there)
     * and a fetch in flight still vouched for: its pieces (or the ranges
     * its fetches asked for) stop there, so exactly its bytes are not
     * owed. Truthful replies never say so. Nor is it owed after a lie
     * became the identity while it was open (X->misled). */
    if (X->misled || (X->plan_total != UNK && X->plan_total != sz))
        return;
    for (int i = 0; i < X->np; i++) { /* Or a fetch of it, asked so. */
        const mrun_t *R = &S.run[X->pv[i].run];
        if (R->start_total != UNK && R->start_total != sz)
            return;
    }
    if (X->first >= sz) {
        FUZZ_CHECK(status == FLIGHT_ERANGE, "clean reader %d past the end: %d",
                   x, status);
        return;
    }
    uint64_t l = X->last == END || X->last > sz - 1 ? sz - 1 : X->last;
    FUZZ_CHECK(status == COALESCE_EOF && X->pos == l + 1,
               "clean reader %d [%llu, %llu] of %llu: %d at %llu", x,
               (unsigned long long)X->first, (unsigned long long)X->last,
               (unsigned long long)sz, status, (unsigned long long)X->pos);
}

static void drain(int x)
{
    mrr_t *X = &S.rd[x];
    for (int guard = 0;; guard++) {
        FUZZ_CHECK(guard < 100000, "reader %d never ends", x);
        check_loan(x);
        X->peeked = 0;
        uint64_t exp = 0, n = 0;
        int ver = -1, vers[256], rc;
        while (!(rc = m_poll(x, false, &n, &ver))) {
            if (n > 256 - exp)
                n = 256 - exp;
            for (uint64_t k = 0; k < n; k++)
                vers[exp + k] = ver;
            exp += n;
            X->pos += n;
            if (exp == 256)
                break;
        }
        X->pos -= exp;
        FUZZ_CHECK(exp || rc != COALESCE_EAGAIN, "reader %d would hang", x);
        uint8_t buf[256];
        size_t got = 0;
        int lrc = flight_read(X->r, buf, sizeof(buf), 0, &got);
        FUZZ_CHECK(lrc == (exp ? 0 : rc), "drain %d: %d, model %d", x, lrc,
                   exp ? 0 : rc);
        if (lrc) {
            check_end(x, lrc);
            check_clean(x, lrc);
            FUZZ_CHECK(flight_read(X->r, buf, 1, 0, &got) == lrc,
                       "drain %d: not the same end again", x);
            return;
        }
        FUZZ_CHECK(got == exp, "drain %d: %zu, model %llu", x, got,
                   (unsigned long long)exp);
        for (size_t k = 0; k < got; k++)
            delivered(x, buf + k, 1, vers[k]);
        check_all();
    }
}

static const uint64_t big_cs[] = {1000, 1ull << 62, 1ull << 63, UINT64_MAX};

static void setup(fuzz_in_t in)
{
    S.in = in;
    S.ops = 0;
    S.nrun = 0;
    memset(S.rd, 0, sizeof(S.rd));
    memset(S.wr, 0, sizeof(S.wr));
    memset(&S.st, 0, sizeof(S.st));
    vnow = 1000000000000ll;
    uint8_t a = fuzz_u8(&S.in), b = fuzz_u8(&S.in), c = fuzz_u8(&S.in);
    uint8_t sz = fuzz_u8(&S.in);
    flight_opts_t o;
    flight_opts_init(&o);
    o.chunk_size = a < 128 ? 1 + a % 8 : a < 224 ? 1 + a % 64 : big_cs[a % 4];
    o.max_lag = (b & 3) ? FLIGHT_UNLIMITED : 1 + (b >> 2) % 48;
    o.wait_timeout_ms = (c & 3) == 3 ? 1 + (c >> 2) % 3 : 0;
    o.orphan_policy = (c >> 4) & 1;
    o.shards = 1;
    S.cs = o.chunk_size;
    S.max_lag = o.max_lag;
    S.wait_ns = (int64_t)o.wait_timeout_ms * 1000000;
    S.policy = o.orphan_policy;
    S.noval = (c >> 5) & 1;
    S.base = (c >> 6) == 3 ? LIMIT - 256 : 0;
    S.ver_changed = false;
    S.used_empty = false;
    S.nver = 1;
    S.curver = 0;
    S.size[0] = off_of(sz);
    S.o_total = UNK;
    S.o_gen = 1;
    S.o_seen = 0;
    S.o_vset = false;
    S.o_vid = -1;
    FUZZ_CHECK(flight_group_new(&S.g, &o) == 0, "group");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    vclock_on = true;
    long base = atomic_load(&live_allocs);
    setup(fuzz_in(data, size));
    run_ops(0, MAXOPS);
    for (int ws = 0; ws < NWRITERS; ws++) {
        if (S.wr[ws].live) {
            op_w_release(ws);
            check_all();
        }
    }
    for (int x = 0; x < NREADERS; x++) {
        if (!S.rd[x].open)
            continue;
        if (!(fuzz_u8(&S.in) & 1))
            drain(x);
        check_loan(x);
        flight_reader_t *r = S.rd[x].r;
        m_close(x);
        flight_reader_close(r);
        check_all();
    }
    flight_stats_t s;
    flight_group_stats(S.g, &s, sizeof(s));
    FUZZ_CHECK(
        !s.readers_open && !s.segments_held && !s.bytes_held &&
            !s.flights_active,
        "gauges after the end: readers %llu segments %llu bytes %llu "
        "flights %llu",
        (unsigned long long)s.readers_open, (unsigned long long)s.segments_held,
        (unsigned long long)s.bytes_held, (unsigned long long)s.flights_active);
    flight_group_close(S.g);
    long left = atomic_load(&live_allocs) - base;
    FUZZ_CHECK(left == 0, "%ld allocations left after the group closed", left);
    vclock_on = false;
    return 0;
}

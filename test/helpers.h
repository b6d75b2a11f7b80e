/*
 * Shared test helpers: suite constructors, allocation-failure injection,
 * deterministic body patterns, and the fixtures the flight and range suites
 * share (groups, counters, the object fetch callback, reading and checking
 * bodies, leak checks).
 */
#ifndef COALESCE_TEST_HELPERS_H
#define COALESCE_TEST_HELPERS_H

#ifndef _POSIX_C_SOURCE
#    define _POSIX_C_SOURCE 200809L
#endif

#include <check.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <coalesce.h>

Suite *make_common_suite(void);
Suite *make_buf_suite(void);
Suite *make_flight_suite(void);
Suite *make_range_suite(void);
Suite *make_uv_suite(void);
Suite *make_proxy_suite(void);
Suite *make_memstore_suite(void);
Suite *make_cache_suite(void);
Suite *make_oom_suite(void);

/*
 * Allocation accounting and failure injection. check_main installs a
 * counting allocator before anything else runs.
 *  - test_alloc_live(): allocations made through the library and not freed.
 *  - test_alloc_fail_after(n): the (n+1)-th allocation from now fails, and
 *    only that one; -1 disables injection.
 *  - test_alloc_count(): allocations attempted since the process started.
 *  - test_alloc_failed(): 1 once the injected failure has happened.
 */
long test_alloc_live(void);
long test_alloc_count(void);
void test_alloc_fail_after(long n);
int test_alloc_failed(void);
void test_alloc_install(void);

/* Byte i of the deterministic body for seed s. */
static inline unsigned char test_pattern(uint64_t seed, uint64_t i)
{
    uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
    x ^= x >> 29;
    return (unsigned char)(x * 0xBF58476D1CE4E5B9ull >> 56);
}
void test_fill(unsigned char *dst, uint64_t seed, uint64_t off, size_t len);
/* 1 if buf equals the pattern for seed s from offset off. */
int test_check(const unsigned char *buf,
               uint64_t seed,
               uint64_t off,
               size_t len);

/* Timeouts are multiplied under valgrind (CK_VALGRIND=1 set by make). */
double test_timeout(double seconds);

/*
 * The etcd shared by the suites that run against a real etcd (cache, etcd):
 * check_main starts it once, in the parent process, before the suites run
 * (forked tests inherit it), and stops it by PID at exit. Each test uses its
 * own key prefix. test_etcd_endpoints() is NULL if etcd could not be
 * started; the tests that need it then fail, saying why.
 */
void test_etcd_setup(void);
const char *test_etcd_endpoints(void);
Suite *make_etcd_suite(void);

/*
 * A cache's report log (cache_opts_t.report = replog_cb, report_data = the
 * log): counts, last code and revision per kind; optionally blocks the
 * callback (block) to test that reports never hold up the watch.
 */
#define NWHAT 8

typedef struct replog {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    long n[NWHAT];
    int code[NWHAT];
    int64_t rev[NWHAT];
    long total;
    int stopped;     /* set once cache_stop() returned */
    long after_stop; /* callbacks that ran (in part) after that */
    int block;       /* while set, callbacks wait (at most 10 s) */
    int blocked;
    long block_timeouts;
} replog_t;

void replog_init(replog_t *l);
void replog_destroy(replog_t *l);
void replog_cb(void *data, int what, int code, int64_t revision);
/* Sets a field under the log's lock and wakes waiters. */
void replog_set(replog_t *l, int *field, int v);
/* Waits (ms, scaled under valgrind) until n reports of what, or n blocked
 * callbacks if what < 0: true if they came. */
bool replog_wait(replog_t *l, int what, long n, int ms);

/*
 * Key/value lists, to compare a cache's scan with a store's range: keys in
 * byte order (disorder set otherwise), values and metadata copied.
 */
typedef struct kvrec {
    char *key; /* NUL-terminated copies (keys may hold NULs too) */
    size_t keylen;
    char *val;
    size_t vallen;
    cache_meta_t meta;
} kvrec_t;

typedef struct kvlist {
    kvrec_t *v;
    size_t n, cap;
    int disorder; /* a key not after the previous one */
    int rc;
} kvlist_t;

int kvl_cmp_keys(const void *a, size_t al, const void *b, size_t bl);
void kvl_add(kvlist_t *l,
             const void *k,
             size_t kl,
             const void *v,
             size_t vl,
             const cache_meta_t *m);
void kvl_free(kvlist_t *l);
/* Callbacks for a store's range and for cache_scan(); data is a kvlist_t. */
int kvl_store_cb(void *data, const cache_kv_t *kv);
int kvl_scan_cb(void *data,
                const void *key,
                size_t keylen,
                coalesce_buf_t *value,
                const cache_meta_t *meta);
/* A key printable in a message (bytes outside ASCII escaped). */
void kvl_fmt_key(char *out, size_t cap, const void *k, size_t kl);
/* 0 if a and b are equal (keys, values, metadata); else 1 and why. */
int kvl_diff(const kvlist_t *a, const kvlist_t *b, char *msg, size_t cap);

/* --- Test fixtures (check_flight.c, check_range.c) ------------------------ */

#define KiB ((size_t)1024)
#define MiB (1024 * KiB)

/* Allocation-failure loops: the n-th allocation fails for n < MAX_INJECT. */
#define MAX_INJECT 500

/*
 * test_alloc_live() is recorded at the start of a test and must be back to
 * that value at its end.
 */
#define LEAK_START() const long leak_base_ = test_alloc_live()
#define LEAK_CHECK() ck_assert_int_eq(test_alloc_live(), leak_base_)
/* End of a test: nothing in flight, the group closed, nothing leaked. */
#define FINISH(g)                                                              \
    do {                                                                       \
        assert_idle(g);                                                        \
        flight_group_close(g);                                                 \
        LEAK_CHECK();                                                          \
    } while (0)

/* An address that no library object has: "untouched" out-parameters. */
extern char test_sentinel_byte;
#define SENTINEL(T) ((T *)(void *)&test_sentinel_byte)

/* Checked fixture: no failure injection left over from another test. */
void reset_state(void);
/* A TCase of s with reset_state and a timeout (scaled by test_timeout). */
TCase *tcase(Suite *s, const char *name, double timeout);
/* The monotonic clock, in milliseconds. */
double now_ms(void);

/* Counters: a value that threads add to and wait on. */
typedef struct counter {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    long n;
} counter_t;

void counter_init(counter_t *c);
void counter_destroy(counter_t *c);
void counter_add(counter_t *c, long d);
/* Waits until the value is at least v. */
void counter_wait(counter_t *c, long v);

/* Groups and stats. group_with_opts(NULL) has the default options. */
flight_group_t *group_with_opts(const flight_opts_t *o);
flight_group_t *group_default(void);
flight_stats_t stats_of(flight_group_t *g);
/* The gauges that must be zero once every flight is over and closed. */
void assert_idle(flight_group_t *g);

/* Writes pattern bytes [off, off + len) in writes of at most piece bytes;
 * returns the first failure. */
int write_pattern(flight_writer_t *w,
                  uint64_t seed,
                  uint64_t off,
                  uint64_t len,
                  size_t piece);
/* Writes bytes [off, off + len) of a precomputed body in pieces. */
int write_slices(flight_writer_t *w,
                 const unsigned char *body,
                 size_t off,
                 size_t len,
                 size_t piece);

/* The object flight fetch callback (flight_do) and its context. */
enum fetch_mode {
    F_BODY,  /* sync: optional meta, the body, optional end; returns ret */
    F_ASYNC, /* keeps the writer in ->w, returns FLIGHT_FETCH_ASYNC */
    F_RET    /* returns ret without touching the writer */
};

typedef struct fetch_ctx {
    atomic_int calls;
    int mode;
    uint64_t seed;
    size_t len;
    size_t chunk; /* F_BODY: bytes per flight_write */
    const char *meta;
    bool end;
    int status;
    int ret;
    const unsigned char *body; /* F_BODY: write these bytes if not NULL */
    counter_t *gate;           /* wait for gate >= gate_n first */
    long gate_n;
    flight_group_t *close_group; /* flight_group_close() it first */
    _Atomic(flight_writer_t *) w;
    atomic_int bad_rc; /* a writer call that failed in F_BODY */
    pthread_t thread;  /* where the first call ran */
} fetch_ctx_t;

/* Mode, seed and length; 16 KiB writes, flight_end(w, 0), returns DONE. */
void fetch_init(fetch_ctx_t *f, int mode, uint64_t seed, size_t len);
int fetch_cb(flight_writer_t *w, void *data);
/* The writer an F_ASYNC fetch kept (asserted non-NULL). */
flight_writer_t *writer_of(fetch_ctx_t *f);
/* flight_do on key with fetch_cb; asserts success and the shared flag. */
flight_reader_t *
join(flight_group_t *g, const char *key, fetch_ctx_t *f, int want_shared);

/* Reading: a body is a pattern seed, or precomputed bytes when not NULL. */
typedef struct body {
    uint64_t seed;
    const unsigned char *bytes; /* the whole body, when precomputed */
    uint64_t len;
} body_t;

#define PAT(s) (&(body_t){.seed = (s)})

typedef struct readres {
    int status;   /* what ended the loop: 0 (limit reached) or a code */
    uint64_t got; /* bytes returned */
    bool ok;      /* all matched, no 0-byte success, no overrun */
} readres_t;

/*
 * Reads with flight_read from body offset start, at most cap bytes a call,
 * until a non-zero return or until limit bytes were read (then status 0).
 */
readres_t read_upto(flight_reader_t *r,
                    const body_t *b,
                    uint64_t start,
                    uint64_t limit,
                    size_t cap,
                    int timeout_ms);
/* Blocking reads of up to 7001 bytes until an end. */
readres_t read_all(flight_reader_t *r, const body_t *b, uint64_t start);
/* Non-blocking: reads until COALESCE_EAGAIN or an end. */
readres_t drain(flight_reader_t *r, const body_t *b, uint64_t start);
/*
 * Reads the whole body with flight_peek/flight_consume, consuming every
 * other peek only in part (one consume per peek).
 */
readres_t peek_all(flight_reader_t *r, const body_t *b, uint64_t start);

#define ASSERT_BODY(res, want_status, want_len)                                \
    do {                                                                       \
        readres_t res_ = (res);                                                \
        ck_assert_int_eq(res_.status, (want_status));                          \
        ck_assert_uint_eq(res_.got, (want_len));                               \
        ck_assert_int_eq(res_.ok, 1);                                          \
    } while (0)

/* What one more flight_read (of up to 8 bytes) returns, e.g. after an end:
 * for worker threads, which record it for the main thread to check. */
int read_again(flight_reader_t *r, int timeout_ms);

/* The reader returns its terminal status again, with no further bytes. */
void assert_terminal(flight_reader_t *r, int status);

/* A notify callback that records what it saw (notify_init: all off). */
typedef struct notify_ctx {
    atomic_int fired;
    _Atomic(flight_reader_t *) reader;
    pthread_t thread; /* read after a join or on the same thread */
    bool close_self;
    bool spin; /* widen the window in which a close must wait */
    atomic_int closed;
    atomic_int in_cb;
    atomic_int *violations;
    counter_t *signal;
} notify_ctx_t;

void notify_init(notify_ctx_t *n);
void notify_cb(flight_reader_t *r, void *data);

#endif

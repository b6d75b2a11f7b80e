#include "helpers.h"

#include "etcd_env.h"

#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static atomic_long live;
static atomic_long count;
static atomic_long fail_at = -1; /* absolute allocation number to fail */
static atomic_int failed;

static int should_fail(void)
{
    long n = atomic_fetch_add(&count, 1);
    long at = atomic_load(&fail_at);
    if (at >= 0 && n == at) {
        atomic_store(&failed, 1);
        return 1;
    }
    return 0;
}

/* A header in front of each block keeps live-count exact with realloc. */
#define HDR 16

static void *t_malloc(size_t n)
{
    if (should_fail())
        return NULL;
    char *p = malloc(n + HDR);
    if (!p)
        return NULL;
    atomic_fetch_add(&live, 1);
    return p + HDR;
}

static void *t_calloc(size_t c, size_t n)
{
    if (should_fail())
        return NULL;
    char *p = calloc(1, c * n + HDR);
    if (!p)
        return NULL;
    atomic_fetch_add(&live, 1);
    return p + HDR;
}

static void *t_realloc(void *ptr, size_t n)
{
    if (!ptr)
        return t_malloc(n);
    if (should_fail())
        return NULL;
    char *p = realloc((char *)ptr - HDR, n + HDR);
    return p ? p + HDR : NULL;
}

static void t_free(void *ptr)
{
    if (!ptr)
        return;
    atomic_fetch_sub(&live, 1);
    free((char *)ptr - HDR);
}

void test_alloc_install(void)
{
    int rc = coalesce_replace_allocator(t_malloc, t_realloc, t_calloc, t_free);
    if (rc != 0)
        abort();
}

long test_alloc_live(void)
{
    return atomic_load(&live);
}

long test_alloc_count(void)
{
    return atomic_load(&count);
}

void test_alloc_fail_after(long n)
{
    atomic_store(&failed, 0);
    atomic_store(&fail_at, n < 0 ? -1 : atomic_load(&count) + n);
}

int test_alloc_failed(void)
{
    return atomic_load(&failed);
}

void test_fill(unsigned char *dst, uint64_t seed, uint64_t off, size_t len)
{
    for (size_t i = 0; i < len; i++)
        dst[i] = test_pattern(seed, off + i);
}

int test_check(const unsigned char *buf,
               uint64_t seed,
               uint64_t off,
               size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (buf[i] != test_pattern(seed, off + i))
            return 0;
    return 1;
}

double test_timeout(double seconds)
{
    const char *v = getenv("CK_VALGRIND");
    return v && *v == '1' ? seconds * 20 : seconds;
}

/* --- The shared etcd ------------------------------------------------------ */

static etcd_env_t shared_etcd;
static pid_t shared_etcd_owner;
static bool shared_etcd_up;

static void shared_etcd_stop(void)
{
    /* Forked tests run atexit handlers too: only the starter stops it. */
    if (shared_etcd_up && getpid() == shared_etcd_owner) {
        etcd_env_stop(&shared_etcd);
        shared_etcd_up = false;
    }
}

void test_etcd_setup(void)
{
    if (shared_etcd_up)
        return;
    if (!etcd_env_available()) {
        fprintf(stderr, "\n*** etcd is not available: the tests that run "
                        "against a real etcd will FAIL.\n*** Install it with: "
                        "sudo apt-get install -y etcd-server\n\n");
        return;
    }
    etcd_env_opts_t o = {.members = 1};
    if (etcd_env_start(&shared_etcd, &o) != 0) {
        fprintf(stderr, "\n*** etcd could not be started: the tests that "
                        "run against a real etcd will FAIL.\n\n");
        return;
    }
    shared_etcd_owner = getpid();
    shared_etcd_up = true;
    atexit(shared_etcd_stop);
}

const char *test_etcd_endpoints(void)
{
    return shared_etcd_up ? shared_etcd.endpoints : NULL;
}

/* --- Test fixtures (check_flight.c, check_range.c) ------------------------ */

char test_sentinel_byte;

void reset_state(void)
{
    test_alloc_fail_after(-1);
}

TCase *tcase(Suite *s, const char *name, double timeout)
{
    TCase *tc = tcase_create(name);
    tcase_add_checked_fixture(tc, reset_state, NULL);
    tcase_set_timeout(tc, test_timeout(timeout));
    suite_add_tcase(s, tc);
    return tc;
}

double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

/* --- Counters ------------------------------------------------------------- */

void counter_init(counter_t *c)
{
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
    c->n = 0;
}

void counter_destroy(counter_t *c)
{
    pthread_cond_destroy(&c->cv);
    pthread_mutex_destroy(&c->mu);
}

void counter_add(counter_t *c, long d)
{
    pthread_mutex_lock(&c->mu);
    c->n += d;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

void counter_wait(counter_t *c, long v)
{
    pthread_mutex_lock(&c->mu);
    while (c->n < v)
        pthread_cond_wait(&c->cv, &c->mu);
    pthread_mutex_unlock(&c->mu);
}

/* --- Groups and stats ----------------------------------------------------- */

flight_group_t *group_with_opts(const flight_opts_t *o)
{
    flight_group_t *g = NULL;
    ck_assert_int_eq(flight_group_new(&g, o), 0);
    ck_assert_ptr_nonnull(g);
    return g;
}

flight_group_t *group_default(void)
{
    return group_with_opts(NULL);
}

flight_stats_t stats_of(flight_group_t *g)
{
    flight_stats_t s;
    memset(&s, 0xA5, sizeof(s));
    ck_assert_int_eq(flight_group_stats(g, &s, sizeof(s)), 0);
    return s;
}

void assert_idle(flight_group_t *g)
{
    flight_stats_t s = stats_of(g);
    ck_assert_uint_eq(s.flights_active, 0);
    ck_assert_uint_eq(s.readers_open, 0);
    ck_assert_uint_eq(s.segments_held, 0);
    ck_assert_uint_eq(s.bytes_held, 0);
}

/* --- Writing -------------------------------------------------------------- */

int write_pattern(
    flight_writer_t *w, uint64_t seed, uint64_t off, uint64_t len, size_t piece)
{
    unsigned char *tmp = malloc(piece);
    if (!tmp)
        return COALESCE_ENOMEM;
    int rc = 0;
    for (uint64_t done = 0; done < len && rc == 0;) {
        size_t n = len - done < piece ? (size_t)(len - done) : piece;
        test_fill(tmp, seed, off + done, n);
        rc = flight_write(w, tmp, n);
        done += n;
    }
    free(tmp);
    return rc;
}

int write_slices(flight_writer_t *w,
                 const unsigned char *body,
                 size_t off,
                 size_t len,
                 size_t piece)
{
    int rc = 0;
    for (size_t done = 0; done < len && rc == 0;) {
        size_t n = len - done < piece ? len - done : piece;
        rc = flight_write(w, body + off + done, n);
        done += n;
    }
    return rc;
}

/* --- The object fetch callback -------------------------------------------- */

void fetch_init(fetch_ctx_t *f, int mode, uint64_t seed, size_t len)
{
    memset(f, 0, sizeof(*f));
    atomic_init(&f->calls, 0);
    atomic_init(&f->w, NULL);
    atomic_init(&f->bad_rc, 0);
    f->mode = mode;
    f->seed = seed;
    f->len = len;
    f->chunk = 16 * KiB;
    f->end = true;
    f->status = 0;
    f->ret = FLIGHT_FETCH_DONE;
}

int fetch_cb(flight_writer_t *w, void *data)
{
    fetch_ctx_t *f = data;
    if (atomic_fetch_add(&f->calls, 1) == 0)
        f->thread = pthread_self();
    if (f->gate)
        counter_wait(f->gate, f->gate_n);
    if (f->close_group)
        flight_group_close(f->close_group);
    if (f->mode == F_ASYNC) {
        atomic_store(&f->w, w);
        return FLIGHT_FETCH_ASYNC;
    }
    if (f->mode == F_RET)
        return f->ret;
    int rc = 0;
    if (f->meta)
        rc = flight_set_meta(w, f->meta, strlen(f->meta));
    if (rc == 0)
        rc = f->body ? write_slices(w, f->body, 0, f->len, f->chunk)
                     : write_pattern(w, f->seed, 0, f->len, f->chunk);
    if (rc == 0 && f->end)
        rc = flight_end(w, f->status);
    if (rc != 0)
        atomic_store(&f->bad_rc, rc);
    return f->ret;
}

flight_writer_t *writer_of(fetch_ctx_t *f)
{
    flight_writer_t *w = atomic_load(&f->w);
    ck_assert_ptr_nonnull(w);
    return w;
}

flight_reader_t *
join(flight_group_t *g, const char *key, fetch_ctx_t *f, int want_shared)
{
    flight_reader_t *r = NULL;
    ck_assert_int_eq(flight_do(g, key, strlen(key), fetch_cb, f, &r), 0);
    ck_assert_ptr_nonnull(r);
    ck_assert_int_eq(flight_reader_shared(r), want_shared);
    return r;
}

/* --- Reading -------------------------------------------------------------- */

static bool
body_match(const body_t *b, const unsigned char *buf, uint64_t off, size_t n)
{
    if (b->bytes)
        return off <= b->len && n <= b->len - off &&
               memcmp(buf, b->bytes + off, n) == 0;
    return test_check(buf, b->seed, off, n) == 1;
}

readres_t read_upto(flight_reader_t *r,
                    const body_t *b,
                    uint64_t start,
                    uint64_t limit,
                    size_t cap,
                    int timeout_ms)
{
    readres_t res = {0, 0, true};
    unsigned char *buf = malloc(cap + 16);
    if (!buf) {
        res.ok = false;
        res.status = COALESCE_ENOMEM;
        return res;
    }
    while (res.got < limit) {
        size_t want = limit - res.got < cap ? (size_t)(limit - res.got) : cap;
        size_t n = (size_t)-1;
        memset(buf + want, 0x5A, 16);
        int rc = flight_read(r, buf, want, timeout_ms, &n);
        if (rc != 0) {
            res.status = rc;
            break;
        }
        for (int i = 0; i < 16; i++)
            if (buf[want + i] != 0x5A)
                res.ok = false;
        if (n == 0 || n > want) {
            res.ok = false;
            res.status = 1;
            break;
        }
        if (!body_match(b, buf, start + res.got, n))
            res.ok = false;
        res.got += n;
    }
    free(buf);
    return res;
}

readres_t read_all(flight_reader_t *r, const body_t *b, uint64_t start)
{
    return read_upto(r, b, start, UINT64_MAX, 7001, -1);
}

readres_t drain(flight_reader_t *r, const body_t *b, uint64_t start)
{
    return read_upto(r, b, start, UINT64_MAX, 64 * KiB, 0);
}

readres_t peek_all(flight_reader_t *r, const body_t *b, uint64_t start)
{
    readres_t res = {0, 0, true};
    bool split = true;
    for (;;) {
        const void *d = NULL;
        size_t n = 0;
        coalesce_buf_t *owner = NULL;
        int rc = flight_peek(r, -1, &d, &n, &owner);
        if (rc != 0) {
            res.status = rc;
            break;
        }
        if (!d || n == 0 || !owner) {
            res.ok = false;
            res.status = 1;
            break;
        }
        const unsigned char *od = coalesce_buf_data(owner);
        const unsigned char *p = d;
        if (p < od || p + n > od + coalesce_buf_len(owner))
            res.ok = false;
        if (!body_match(b, p, start + res.got, n))
            res.ok = false;
        size_t take = split && n > 1 ? n / 2 : n;
        split = !split;
        if (flight_consume(r, take) != 0) {
            res.ok = false;
            res.status = 1;
            break;
        }
        res.got += take;
    }
    return res;
}

int read_again(flight_reader_t *r, int timeout_ms)
{
    unsigned char b[8];
    size_t n = 0;
    return flight_read(r, b, sizeof(b), timeout_ms, &n);
}

void assert_terminal(flight_reader_t *r, int status)
{
    unsigned char buf[64];
    size_t n = 12345;
    ck_assert_int_eq(flight_read(r, buf, sizeof(buf), -1, &n), status);
    ck_assert_int_eq(flight_read(r, buf, sizeof(buf), 0, &n), status);
    const void *d = NULL;
    size_t len = 0;
    ck_assert_int_eq(flight_peek(r, 0, &d, &len, NULL), status);
}

/* --- Notify --------------------------------------------------------------- */

void notify_init(notify_ctx_t *n)
{
    memset(n, 0, sizeof(*n));
    atomic_init(&n->fired, 0);
    atomic_init(&n->reader, NULL);
    atomic_init(&n->closed, 0);
    atomic_init(&n->in_cb, 0);
}

void notify_cb(flight_reader_t *r, void *data)
{
    notify_ctx_t *n = data;
    atomic_store(&n->in_cb, 1);
    if (n->violations && atomic_load(&n->closed))
        atomic_fetch_add(n->violations, 1);
    atomic_store(&n->reader, r);
    n->thread = pthread_self();
    if (n->spin)
        for (volatile int k = 0; k < 20000; k = k + 1) {
        }
    if (n->close_self) {
        flight_reader_close(r);
        atomic_store(&n->closed, 1);
    }
    atomic_fetch_add(&n->fired, 1);
    if (n->violations && atomic_load(&n->closed))
        atomic_fetch_add(n->violations, 1);
    atomic_store(&n->in_cb, 0);
    if (n->signal)
        counter_add(n->signal, 1);
}

/* --- Key/value lists --------------------------------------------------------
 */

int kvl_cmp_keys(const void *a, size_t al, const void *b, size_t bl)
{
    size_t n = al < bl ? al : bl;
    int c = memcmp(a, b, n);
    if (c)
        return c;
    return al < bl ? -1 : al > bl;
}

void kvl_add(kvlist_t *l,
             const void *k,
             size_t kl,
             const void *v,
             size_t vl,
             const cache_meta_t *m)
{
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 16;
        kvrec_t *nv = realloc(l->v, l->cap * sizeof(*nv));
        if (!nv)
            abort();
        l->v = nv;
    }
    if (l->n > 0 &&
        kvl_cmp_keys(l->v[l->n - 1].key, l->v[l->n - 1].keylen, k, kl) >= 0)
        l->disorder = 1;
    kvrec_t *r = &l->v[l->n++];
    r->key = malloc(kl + 1);
    r->val = malloc(vl + 1);
    if (!r->key || !r->val)
        abort();
    memcpy(r->key, k, kl);
    r->key[kl] = 0;
    r->keylen = kl;
    if (vl)
        memcpy(r->val, v, vl);
    r->val[vl] = 0;
    r->vallen = vl;
    r->meta = *m;
}

void kvl_free(kvlist_t *l)
{
    for (size_t i = 0; i < l->n; i++) {
        free(l->v[i].key);
        free(l->v[i].val);
    }
    free(l->v);
    memset(l, 0, sizeof(*l));
}

int kvl_store_cb(void *data, const cache_kv_t *kv)
{
    cache_meta_t m = {kv->create_rev, kv->mod_rev, kv->version, kv->lease};
    kvl_add(data, kv->key, kv->keylen, kv->value, kv->vallen, &m);
    return 0;
}

int kvl_scan_cb(void *data,
                const void *key,
                size_t keylen,
                coalesce_buf_t *value,
                const cache_meta_t *meta)
{
    kvl_add(data, key, keylen, coalesce_buf_data(value),
            coalesce_buf_len(value), meta);
    return 0;
}

void kvl_fmt_key(char *out, size_t cap, const void *k, size_t kl)
{
    const unsigned char *b = k;
    size_t o = 0;
    for (size_t i = 0; i < kl && o + 5 < cap; i++) {
        if (b[i] >= 0x20 && b[i] < 0x7f)
            out[o++] = (char)b[i];
        else
            o += (size_t)snprintf(out + o, cap - o, "\\x%02x", b[i]);
    }
    out[o] = 0;
}

/* 0 if equal, key by key, value and metadata; else a message. */
int kvl_diff(const kvlist_t *a, const kvlist_t *b, char *msg, size_t cap)
{
    char k[200];
    size_t n = a->n < b->n ? a->n : b->n;
    for (size_t i = 0; i < n; i++) {
        const kvrec_t *x = &a->v[i], *y = &b->v[i];
        if (kvl_cmp_keys(x->key, x->keylen, y->key, y->keylen) != 0) {
            char k2[200];
            kvl_fmt_key(k, sizeof(k), x->key, x->keylen);
            kvl_fmt_key(k2, sizeof(k2), y->key, y->keylen);
            snprintf(msg, cap, "entry %zu: key %s vs %s", i, k, k2);
            return 1;
        }
        kvl_fmt_key(k, sizeof(k), x->key, x->keylen);
        if (x->vallen != y->vallen || memcmp(x->val, y->val, x->vallen)) {
            snprintf(msg, cap, "key %s: value \"%.60s\" vs \"%.60s\"", k,
                     (const char *)x->val, (const char *)y->val);
            return 1;
        }
        if (memcmp(&x->meta, &y->meta, sizeof(x->meta)) != 0) {
            snprintf(msg, cap,
                     "key %s: meta create %" PRId64 " mod %" PRId64
                     " version %" PRId64 " lease %" PRId64 " vs create %" PRId64
                     " mod %" PRId64 " version %" PRId64 " lease %" PRId64,
                     k, x->meta.create_rev, x->meta.mod_rev, x->meta.version,
                     x->meta.lease, y->meta.create_rev, y->meta.mod_rev,
                     y->meta.version, y->meta.lease);
            return 1;
        }
    }
    if (a->n != b->n) {
        const kvrec_t *x = a->n > b->n ? &a->v[n] : &b->v[n];
        kvl_fmt_key(k, sizeof(k), x->key, x->keylen);
        snprintf(msg, cap, "%zu vs %zu entries; first extra %s (in the %s)",
                 a->n, b->n, k, a->n > b->n ? "first" : "second");
        return 1;
    }
    return 0;
}

/* --- The report log ------------------------------------------------------- */

/* CLOCK_REALTIME + ms, for pthread_cond_timedwait. */
static void deadline_after(struct timespec *ts, int ms)
{
    clock_gettime(CLOCK_REALTIME, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

void replog_init(replog_t *l)
{
    memset(l, 0, sizeof(*l));
    pthread_mutex_init(&l->mu, NULL);
    pthread_cond_init(&l->cv, NULL);
}

void replog_destroy(replog_t *l)
{
    pthread_cond_destroy(&l->cv);
    pthread_mutex_destroy(&l->mu);
}

void replog_cb(void *data, int what, int code, int64_t revision)
{
    replog_t *l = data;
    pthread_mutex_lock(&l->mu);
    if (l->stopped)
        l->after_stop++;
    int i = what > 0 && what < NWHAT ? what : 0;
    l->n[i]++;
    l->code[i] = code;
    l->rev[i] = revision;
    l->total++;
    pthread_cond_broadcast(&l->cv);
    if (l->block) {
        struct timespec ts;
        deadline_after(&ts, (int)(test_timeout(10.0) * 1000.0));
        l->blocked++;
        pthread_cond_broadcast(&l->cv);
        int rc = 0;
        while (l->block && rc == 0)
            rc = pthread_cond_timedwait(&l->cv, &l->mu, &ts);
        if (l->block)
            l->block_timeouts++;
        l->blocked--;
    }
    if (l->stopped)
        l->after_stop++;
    pthread_mutex_unlock(&l->mu);
}

void replog_set(replog_t *l, int *field, int v)
{
    pthread_mutex_lock(&l->mu);
    *field = v;
    pthread_cond_broadcast(&l->cv);
    pthread_mutex_unlock(&l->mu);
}

/* Waits until n reports of what (or blocked callbacks if what < 0). */
bool replog_wait(replog_t *l, int what, long n, int ms)
{
    struct timespec ts;
    deadline_after(&ts, (int)(test_timeout(ms / 1000.0) * 1000.0));
    pthread_mutex_lock(&l->mu);
    int rc = 0;
    for (;;) {
        long have = what < 0 ? l->blocked : l->n[what];
        if (have >= n || rc != 0)
            break;
        rc = pthread_cond_timedwait(&l->cv, &l->mu, &ts);
    }
    long have = what < 0 ? l->blocked : l->n[what];
    pthread_mutex_unlock(&l->mu);
    return have >= n;
}

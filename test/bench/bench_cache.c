/*
 * Benchmarks of the write-through cache (cache.h) over the in-memory store
 * (store.h).
 *
 * Prints one line per figure, "BENCH <name> <median> <unit>", where the
 * median is taken over repetitions measured in this run, plus "#" lines with
 * details. Every figure is measured here; nothing is assumed.
 *
 * One data set serves the timed figures: 1,000,000 keys of 16-64 bytes
 * ("/b/" + 8 hex digits + random padding; 1,000 of them under "/b/scan/")
 * with 100-byte values, written into an in-memory store by transactions of
 * CACHE_TXN_MAX_OPS puts, then loaded by cache_start() (the paged initial
 * load). On it: cache_get of random keys (1 and 2 threads), cache_scan of
 * the 1,000 keys under "/b/scan/", the watch applying a held batch of 200k
 * puts, and cache_put round trips.
 *
 * cache_bytes_per_entry needs a counting allocator, which can only be
 * installed before the library's first allocation and would put a header
 * on every block of the timed figures too. So it runs in a child process
 * forked before any library call (it waits on a pipe until the timed
 * figures are done and their memory is freed), which installs the
 * allocator first thing and builds its own store and cache of the same
 * keys. The timed figures run with the default allocator.
 *
 * Each blocking phase runs under a watchdog, so a library that hangs makes
 * the program fail with a message instead of blocking "make bench".
 *
 * BENCH_CACHE_ONLY=get,scan,watch,put,bytes runs only those.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <coalesce.h>

#define BENCH_NAME     "bench_cache"
#define BENCH_ONLY_ENV "BENCH_CACHE_ONLY"
#include "bench.h"

#define SMALL_STACK (256 * 1024)

#define NKEYS   1000000 /* keys in the data set */
#define NSCAN   1000    /* of which under SCAN_PREFIX */
#define VLEN    100     /* value bytes */
#define KEY_MIN 16
#define KEY_MAX 64
#define TXN_OPS CACHE_TXN_MAX_OPS

static const char PREFIX[] = "/b/";
static const char SCAN_PREFIX[] = "/b/scan/";
#define PLEN      (sizeof(PREFIX) - 1)
#define SCAN_PLEN (sizeof(SCAN_PREFIX) - 1)

/* --- Small helpers -------------------------------------------------------- */

static uint64_t rng_state = 0x5EEDCAC4E0000001ull;

static uint64_t rnd(void) /* splitmix64 */
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void print_list(const char *label, const double *v, int n)
{
    printf("%s", label);
    for (int i = 0; i < n; i++)
        printf(" %.4g", v[i]);
}

/* Nearest-rank percentile of a sorted array. */
static double percentile(const double *sorted, size_t n, double p)
{
    size_t k = (size_t)(p / 100.0 * (double)n + 0.999999);
    if (k < 1)
        k = 1;
    if (k > n)
        k = n;
    return sorted[k - 1];
}

static double ms_since(int64_t t0)
{
    return (double)(now_ns() - t0) / 1e6;
}

static long max_rss_mib(void)
{
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0)
        return 0;
    return ru.ru_maxrss / 1024;
}

static cache_health_t health(cache_t *c)
{
    cache_health_t h;
    memset(&h, 0, sizeof(h));
    CHECK(cache_health(c, &h, sizeof(h)));
    return h;
}

static const char *state_name(int s)
{
    switch (s) {
    case CACHE_STOPPED:
        return "STOPPED";
    case CACHE_RUNNING:
        return "RUNNING";
    case CACHE_RECONNECTING:
        return "RECONNECTING";
    case CACHE_RELISTING:
        return "RELISTING";
    case CACHE_DEGRADED:
        return "DEGRADED";
    }
    return "?";
}

/* --- The data set --------------------------------------------------------- */

/*
 * Key i: "/b/scan/" (i < NSCAN) or "/b/", then 8 hex digits of
 * i * 0x9E3779B1 mod 2^32 (a bijection, so keys are distinct; hex digits
 * never start "scan/"), then random [a-z0-9] up to a random length of
 * KEY_MIN..KEY_MAX bytes. Insertion order is thus unrelated to key order.
 */
struct keyset {
    char *arena;
    uint32_t *off;
    uint8_t *len;
    size_t n;
    uint64_t key_bytes;
};

static struct keyset K;

static const char *key_of(size_t i)
{
    return K.arena + K.off[i];
}

static void keys_gen(size_t n, size_t nscan)
{
    static const char alnum[] = "abcdefghijklmnopqrstuvwxyz0123456789";
    K.n = n;
    K.arena = xmalloc(n * KEY_MAX);
    K.off = xmalloc(n * sizeof(*K.off));
    K.len = xmalloc(n * sizeof(*K.len));
    size_t pos = 0;
    for (size_t i = 0; i < n; i++) {
        char *k = K.arena + pos;
        size_t l = KEY_MIN + (size_t)(rnd() % (KEY_MAX - KEY_MIN + 1));
        const char *p = i < nscan ? SCAN_PREFIX : PREFIX;
        size_t pl = strlen(p);
        memcpy(k, p, pl);
        uint32_t h = (uint32_t)i * 0x9E3779B1u;
        for (int d = 7; d >= 0; d--) {
            k[pl + (size_t)d] = "0123456789abcdef"[h & 15];
            h >>= 4;
        }
        size_t j = pl + 8;
        if (l < j)
            l = j;
        for (; j < l; j++)
            k[j] = alnum[rnd() % (sizeof(alnum) - 1)];
        K.off[i] = (uint32_t)pos;
        K.len[i] = (uint8_t)l;
        K.key_bytes += l;
        pos += l;
    }
}

static void keys_free(void)
{
    free(K.arena);
    free(K.off);
    free(K.len);
    memset(&K, 0, sizeof(K));
}

/* Value of key i written with tag t: i, t, then bytes derived from both. */
static void val_fill(unsigned char *v, uint64_t i, uint32_t t)
{
    memcpy(v, &i, 8);
    memcpy(v + 8, &t, 4);
    for (size_t j = 12; j < VLEN; j++)
        v[j] = (unsigned char)(i * 31 + j * 7 + t);
}

/* 1 if value v (len) is key i's with tag t. */
static int val_ok(const coalesce_buf_t *v, uint64_t i, uint32_t t)
{
    unsigned char want[VLEN];
    val_fill(want, i, t);
    return coalesce_buf_len(v) == VLEN &&
           memcmp(coalesce_buf_data(v), want, VLEN) == 0;
}

/*
 * Puts keys idx[0..n) (distinct; or 0..n when idx is NULL) with tag t into
 * the store, CACHE_TXN_MAX_OPS per transaction. Returns the last revision.
 */
static int64_t
store_put_keys(cache_store_t *s, const uint32_t *idx, size_t n, uint32_t t)
{
    static unsigned char vals[TXN_OPS][VLEN];
    cache_op_t ops[TXN_OPS];
    int64_t rev = 0;
    for (size_t i = 0; i < n; i += TXN_OPS) {
        size_t m = n - i < TXN_OPS ? n - i : TXN_OPS;
        for (size_t j = 0; j < m; j++) {
            size_t k = idx ? idx[i + j] : i + j;
            val_fill(vals[j], k, t);
            memset(&ops[j], 0, sizeof(ops[j]));
            ops[j].type = CACHE_OP_PUT;
            ops[j].key = key_of(k);
            ops[j].keylen = K.len[k];
            ops[j].value = vals[j];
            ops[j].vallen = VLEN;
        }
        int ok = 0;
        int64_t r = 0;
        CHECK(s->ops->txn(s, NULL, 0, ops, m, &ok, &r, NULL));
        if (!ok)
            fail("store txn without compares did not succeed");
        if (r <= rev)
            fail("store txn revision did not rise");
        rev = r;
    }
    return rev;
}

static cache_store_t *store_new_filled(double *fill_ms)
{
    cache_store_t *s = NULL;
    CHECK(cache_memstore_new(&s, NULL));
    int64_t t0 = now_ns();
    int64_t rev = store_put_keys(s, NULL, K.n, 0);
    *fill_ms = ms_since(t0);
    if (cache_memstore_revision(s) != rev)
        fail("cache_memstore_revision differs from the last txn revision");
    return s;
}

/* --- The timed data set: store, cache, shuffled keys ---------------------- */

static cache_store_t *S;
static cache_t *C;
static uint32_t *perm;   /* a random permutation of 0..K.n-1 */
static char *sh_arena;   /* keys in perm order, contiguous */
static uint32_t *sh_off; /* into sh_arena */
static uint8_t *sh_len;

static void shuffle_build(void)
{
    perm = xmalloc(K.n * sizeof(*perm));
    for (size_t i = 0; i < K.n; i++)
        perm[i] = (uint32_t)i;
    for (size_t i = K.n - 1; i > 0; i--) {
        size_t j = (size_t)(rnd() % (i + 1));
        uint32_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    sh_arena = xmalloc(K.key_bytes);
    sh_off = xmalloc(K.n * sizeof(*sh_off));
    sh_len = xmalloc(K.n * sizeof(*sh_len));
    size_t pos = 0;
    for (size_t i = 0; i < K.n; i++) {
        memcpy(sh_arena + pos, key_of(perm[i]), K.len[perm[i]]);
        sh_off[i] = (uint32_t)pos;
        sh_len[i] = K.len[perm[i]];
        pos += sh_len[i];
    }
}

#define LOAD_REPS 3

/*
 * cache_stop() then cache_start() again, on a small cache of the 1,000 keys
 * under "/b/scan/" loaded in pages of 100 (so the load takes several
 * pages). Not timed: a check that a stopped cache can be started again.
 */
static void restart_check(void)
{
    cache_opts_t o;
    cache_opts_init(&o);
    o.page_size = 100;
    cache_t *c = NULL;
    CHECK(cache_new(&c, S, SCAN_PREFIX, SCAN_PLEN, &o));
    int rc1 = cache_start(c);
    cache_stop(c);
    int rc2 = cache_start(c);
    int rc3 = rc2 ? cache_start(c) : 0;
    cache_health_t h = health(c);
    if (rc1 || rc2 || rc3 || h.entries != NSCAN)
        printf("# restart: UNEXPECTED: on a cache of %d keys, page_size "
               "%zu: cache_start %s, cache_stop, cache_start %s, again %s; "
               "then state %s, %llu entries\n",
               NSCAN, o.page_size, coalesce_err_name(rc1),
               coalesce_err_name(rc2), coalesce_err_name(rc3),
               state_name(h.state), (unsigned long long)h.entries);
    else
        printf("# restart: cache_stop then cache_start again on a cache of "
               "%d keys (pages of %zu): fine\n",
               NSCAN, o.page_size);
    cache_free(c);
}

static void setup_big(void)
{
    phase("setup: keys and store fill", 60);
    int64_t t0 = now_ns();
    shuffle_build();
    double shuf_ms = ms_since(t0);
    double fill_ms;
    S = store_new_filled(&fill_ms);
    printf("# setup: %zu keys of %d-%d bytes (%llu key bytes, mean %.1f), "
           "%d-byte values, %d under \"%s\"; shuffled key list built in "
           "%.0f ms; memstore filled with %zu txns of up to %d puts in "
           "%.0f ms (%.2f M puts/s), store revision %lld\n",
           K.n, KEY_MIN, KEY_MAX, (unsigned long long)K.key_bytes,
           (double)K.key_bytes / (double)K.n, VLEN, NSCAN, SCAN_PREFIX, shuf_ms,
           (K.n + TXN_OPS - 1) / TXN_OPS, TXN_OPS, fill_ms,
           (double)K.n / fill_ms / 1e3, (long long)cache_memstore_revision(S));

    phase("cache_start (initial load)", 90);
    cache_opts_t o;
    cache_opts_init(&o);
    double load[LOAD_REPS], freems[LOAD_REPS];
    int reps = 0, nfree = 0;
    for (; reps < LOAD_REPS; reps++) {
        if (C) { /* Each load on a new cache: the initial load. */
            t0 = now_ns();
            cache_free(C);
            freems[nfree++] = ms_since(t0);
        }
        CHECK(cache_new(&C, S, PREFIX, PLEN, &o));
        t0 = now_ns();
        CHECK(cache_start(C));
        load[reps] = ms_since(t0);
        /* One load is enough if it is slow; the budget is about 60 s. */
        if (load[reps] > 4000) {
            reps++;
            break;
        }
    }
    cache_health_t h = health(C);
    int64_t srev = cache_memstore_revision(S);
    printf("# load: cache_new + cache_start of %zu keys, page_size %zu "
           "(default), %d load(s) on new caches: median %.0f ms (%.0f ns "
           "per key)",
           K.n, o.page_size, reps, median(load, reps),
           median(load, reps) * 1e6 / (double)K.n);
    print_list("; ms per load:", load, reps);
    if (nfree)
        print_list("; cache_free of a loaded cache, ms:", freems, nfree);
    printf("\n# load: health after: state %s, entries %llu, bytes %llu, "
           "watch_rev %lld (store %lld)\n",
           state_name(h.state), (unsigned long long)h.entries,
           (unsigned long long)h.bytes, (long long)h.watch_rev,
           (long long)srev);
    if (h.state != CACHE_RUNNING || h.entries != K.n ||
        h.bytes != K.key_bytes + (uint64_t)K.n * VLEN || h.watch_rev != srev)
        printf("# load: UNEXPECTED: expected RUNNING, %zu entries, %llu "
               "bytes, watch_rev %lld\n",
               K.n, (unsigned long long)(K.key_bytes + (uint64_t)K.n * VLEN),
               (long long)srev);
    restart_check();
}

static void teardown_big(void)
{
    phase("teardown", 30);
    cache_free(C);
    C = NULL;
    int w = cache_memstore_watches(S);
    if (w)
        printf("# teardown: UNEXPECTED: %d store watch(es) live after "
               "cache_free\n",
               w);
    cache_store_free(S);
    S = NULL;
    free(perm);
    free(sh_arena);
    free(sh_off);
    free(sh_len);
}

/* --- cache_get_1m_ns and cache_get_1m_2t_mops ----------------------------- */

#define GET_N      1000000
#define GET_REPS   7
#define GET2_REPS  5
#define GET_CHECKS 10000

/* count gets of the shuffled keys from position from, or until limit. */
static long get_run(size_t from, long count, int64_t limit)
{
    size_t i = from;
    long n;
    for (n = 0; n < count; n++) {
        coalesce_buf_t *v;
        int rc = cache_get(C, sh_arena + sh_off[i], sh_len[i], &v, NULL);
        if (rc != 0)
            die("cache_get of an existing key", rc);
        coalesce_buf_unref(v);
        if (++i == K.n)
            i = 0;
        if ((n & 65535) == 65535 && now_ns() > limit) {
            n++;
            break;
        }
    }
    return n;
}

/* Values and metadata of random keys, and misses, outside the timing. */
static void get_check(void)
{
    long bad = 0;
    for (int k = 0; k < GET_CHECKS; k++) {
        uint32_t i = (uint32_t)(rnd() % K.n);
        coalesce_buf_t *v = NULL;
        cache_meta_t m;
        int rc = cache_get(C, key_of(i), K.len[i], &v, &m);
        if (rc != 0 || !val_ok(v, i, 0) || m.version != 1 || m.mod_rev < 1 ||
            m.create_rev != m.mod_rev)
            bad++;
        coalesce_buf_unref(v);
    }
    static const char miss[] = "/b/zzzz-not-a-key";
    int rc = cache_get(C, miss, sizeof(miss) - 1, NULL, NULL);
    int rc2 = cache_get(C, "/a/", 3, NULL, NULL);
    if (bad || rc != COALESCE_ENOENT || rc2 != COALESCE_EINVAL)
        printf("# cache_get: UNEXPECTED: %ld of %d checked keys wrong; "
               "missing key gave %s, key outside the prefix %s\n",
               bad, GET_CHECKS, coalesce_err_name(rc), coalesce_err_name(rc2));
}

/*
 * Context for the figure: one dependent read of a random cache line in
 * 128 MiB (a pointer chase through one random cycle), in ns.
 */
static double dram_ns(void)
{
    const size_t lines = (128u << 20) / 64, step = 64 / sizeof(uint64_t);
    uint64_t *a = xmalloc(lines * 64);
    for (size_t i = 0; i < lines; i++)
        a[i * step] = i;
    for (size_t i = lines - 1; i > 0; i--) { /* Sattolo: one cycle */
        size_t j = (size_t)(rnd() % i);
        uint64_t t = a[i * step];
        a[i * step] = a[j * step];
        a[j * step] = t;
    }
    uint64_t x = 0;
    double best = 0;
    for (int pass = 0; pass < 2; pass++) {
        int64_t t0 = now_ns();
        for (size_t k = 0; k < lines; k++)
            x = a[x * step];
        double ns = (double)(now_ns() - t0) / (double)lines;
        best = pass ? (ns < best ? ns : best) : ns;
    }
    if (x >= lines)
        fail("pointer chase went astray");
    free(a);
    return best;
}

struct get_arg {
    pthread_barrier_t *bar;
    size_t from;
    long count, done;
    int64_t t_start, t_end;
};

static void *get_main(void *p)
{
    struct get_arg *a = p;
    pthread_barrier_wait(a->bar);
    a->t_start = now_ns();
    a->done = get_run(a->from, a->count, a->t_start + 2000000000LL);
    a->t_end = now_ns();
    return NULL;
}

static void bench_get(void)
{
    phase("cache_get_1m", 60);
    get_check();
    double ns[GET_REPS];
    long total = 0;
    for (int rep = -1; rep < GET_REPS; rep++) {
        size_t from = (size_t)(rnd() % K.n);
        int64_t t0 = now_ns();
        long n = get_run(from, GET_N, t0 + 1000000000LL);
        if (rep >= 0) {
            ns[rep] = (double)(now_ns() - t0) / (double)n;
            total += n;
        }
    }
    double m = median(ns, GET_REPS);
    double dram = dram_ns();
    printf("# cache_get_1m: context: one dependent read of a random cache "
           "line in 128 MiB costs %.0f ns on this machine (pointer chase)\n",
           dram);
    printf("# cache_get_1m: cache_get (value ref + coalesce_buf_unref, no "
           "meta) of the %zu keys in shuffled order, keys read sequentially "
           "from a contiguous copy; %d reps of up to %d gets (1 s) after a "
           "warm-up rep, %ld gets measured; %d random keys' values and "
           "metadata checked, plus a miss; ",
           K.n, GET_REPS, GET_N, total, GET_CHECKS);
    print_list("ns per rep:", ns, GET_REPS);
    printf("\n");
    bench_line("cache_get_1m_ns", m, "ns");
    note_target("cache_get_1m_ns", m, 100, 1);

    phase("cache_get_1m_2t", 60);
    double mops[GET2_REPS], one[GET2_REPS];
    for (int rep = 0; rep < GET2_REPS; rep++) {
        pthread_barrier_t bar;
        pthread_barrier_init(&bar, NULL, 2);
        struct get_arg a[2];
        pthread_t t[2];
        size_t base = (size_t)(rnd() % K.n);
        for (int i = 0; i < 2; i++) {
            memset(&a[i], 0, sizeof(a[i]));
            a[i].bar = &bar;
            a[i].from = (base + (size_t)i * K.n / 2) % K.n;
            a[i].count = GET_N;
            spawn(&t[i], get_main, &a[i], 0);
        }
        for (int i = 0; i < 2; i++)
            pthread_join(t[i], NULL);
        pthread_barrier_destroy(&bar);
        int64_t t0 = a[0].t_start < a[1].t_start ? a[0].t_start : a[1].t_start;
        int64_t t1 = a[0].t_end > a[1].t_end ? a[0].t_end : a[1].t_end;
        mops[rep] = (double)(a[0].done + a[1].done) / ((double)(t1 - t0) / 1e3);
        /* The single-thread figure interleaved, under the same conditions. */
        int64_t s0 = now_ns();
        long n = get_run((size_t)(rnd() % K.n), GET_N, s0 + 1000000000LL);
        one[rep] = (double)n / ((double)(now_ns() - s0) / 1e3);
    }
    double m2 = median(mops, GET2_REPS), m1 = median(one, GET2_REPS);
    printf("# cache_get_1m_2t: 2 threads released by a barrier, each up to "
           "%d gets (2 s) of the shuffled keys from opposite halves; %d "
           "reps, each followed by a single-thread rep of %d gets; "
           "total M gets/s:",
           GET_N, GET2_REPS, GET_N);
    print_list("", mops, GET2_REPS);
    print_list("; single thread M gets/s:", one, GET2_REPS);
    printf("\n# cache_get_1m_2t: single thread %.3f M gets/s (median), 2 "
           "threads %.3f M gets/s in all: scaling x%.2f on %ld CPUs\n",
           m1, m2, m2 / m1, sysconf(_SC_NPROCESSORS_ONLN));
    bench_line("cache_get_1m_2t_mops", m2, "Mops");
}

/* --- cache_scan_1k_of_1m_us ----------------------------------------------- */

#define SCAN_REPS  11
#define SCAN_ITERS 200

struct scan_acc {
    uint64_t sum;
    long n;
    /* Verification pass only. */
    int check;
    long bad;
    char last[KEY_MAX + 1];
    size_t lastlen;
};

static int scan_cb(void *data,
                   const void *key,
                   size_t keylen,
                   coalesce_buf_t *value,
                   const cache_meta_t *meta)
{
    struct scan_acc *a = data;
    const unsigned char *p = coalesce_buf_data(value);
    size_t l = coalesce_buf_len(value);
    uint64_t s = 0, w;
    /* One 8-byte read per 64 bytes and the last 8: every cache line of the
     * value is read, at a small fixed cost (summing all 100 bytes one by
     * one would cost about as much as the scan itself). */
    for (size_t j = 0; j + 8 <= l; j += 64) {
        memcpy(&w, p + j, 8);
        s += w;
    }
    if (l >= 8) {
        memcpy(&w, p + l - 8, 8);
        s += w;
    }
    a->sum += s + keylen + (uint64_t)meta->mod_rev;
    a->n++;
    if (a->check) {
        if (keylen < SCAN_PLEN || keylen > KEY_MAX ||
            memcmp(key, SCAN_PREFIX, SCAN_PLEN) != 0 || l != VLEN)
            a->bad++;
        else if (a->lastlen) {
            size_t ml = keylen < a->lastlen ? keylen : a->lastlen;
            int c = memcmp(a->last, key, ml);
            if (c > 0 || (c == 0 && a->lastlen >= keylen))
                a->bad++; /* not in ascending byte order */
        }
        if (keylen <= KEY_MAX) {
            memcpy(a->last, key, keylen);
            a->lastlen = keylen;
        }
    }
    return 0;
}

/* Keeps a reference to every value of a scan (for the calibration). */
struct scan_keep {
    coalesce_buf_t *v[NSCAN];
    const void *key[NSCAN];
    size_t keylen[NSCAN];
    cache_meta_t meta[NSCAN];
    int n;
};

static int scan_keep_cb(void *data,
                        const void *key,
                        size_t keylen,
                        coalesce_buf_t *value,
                        const cache_meta_t *meta)
{
    struct scan_keep *k = data;
    if (k->n == NSCAN)
        return 1;
    k->v[k->n] = coalesce_buf_ref(value);
    k->key[k->n] = key; /* the entry's own key bytes: live with its ref */
    k->keylen[k->n] = keylen;
    k->meta[k->n] = *meta;
    k->n++;
    return 0;
}

/* What the callback alone costs over the same 1,000 values, warm, in us. */
static double scan_cb_alone_us(void)
{
    static struct scan_keep k;
    memset(&k, 0, sizeof(k));
    CHECK(cache_scan(C, SCAN_PREFIX, SCAN_PLEN, scan_keep_cb, &k));
    double us[SCAN_REPS];
    struct scan_acc a;
    memset(&a, 0, sizeof(a));
    for (int rep = 0; rep < SCAN_REPS; rep++) {
        int64_t t0 = now_ns();
        for (int i = 0; i < SCAN_ITERS; i++)
            for (int j = 0; j < k.n; j++)
                scan_cb(&a, k.key[j], k.keylen[j], k.v[j], &k.meta[j]);
        us[rep] = (double)(now_ns() - t0) / 1e3 / SCAN_ITERS;
    }
    for (int j = 0; j < k.n; j++)
        coalesce_buf_unref(k.v[j]);
    if (a.n != (long)k.n * SCAN_ITERS * SCAN_REPS)
        fail("scan calibration: callback count");
    return median(us, SCAN_REPS);
}

static void bench_scan(void)
{
    phase("cache_scan_1k_of_1m", 60);
    struct scan_acc chk;
    memset(&chk, 0, sizeof(chk));
    chk.check = 1;
    int64_t c0 = now_ns();
    CHECK(cache_scan(C, SCAN_PREFIX, SCAN_PLEN, scan_cb, &chk));
    double first_us = (double)(now_ns() - c0) / 1e3;
    if (chk.n != NSCAN || chk.bad)
        printf("# cache_scan: UNEXPECTED: %ld keys visited (want %d), %ld "
               "out of order or outside the prefix\n",
               chk.n, NSCAN, chk.bad);
    double us[SCAN_REPS];
    uint64_t sink = 0;
    long visits = 0;
    for (int rep = 0; rep < SCAN_REPS; rep++) {
        struct scan_acc a;
        memset(&a, 0, sizeof(a));
        int64_t t0 = now_ns();
        for (int i = 0; i < SCAN_ITERS; i++)
            CHECK(cache_scan(C, SCAN_PREFIX, SCAN_PLEN, scan_cb, &a));
        us[rep] = (double)(now_ns() - t0) / 1e3 / SCAN_ITERS;
        if (a.n != (long)NSCAN * SCAN_ITERS)
            printf("# cache_scan: UNEXPECTED: rep %d visited %ld keys, want "
                   "%ld\n",
                   rep, a.n, (long)NSCAN * SCAN_ITERS);
        sink += a.sum;
        visits += a.n;
    }
    double m = median(us, SCAN_REPS);
    double cb_us = scan_cb_alone_us();
    printf("# cache_scan_1k_of_1m: cache_scan(\"%s\") over %d of %zu keys, "
           "the callback reads every cache line of each value (3 8-byte "
           "reads) and the metadata; the callback alone over the same %d "
           "values (refs held, warm) takes %.2f us; first (verification) scan "
           "%.1f us, keys in byte order and in the prefix %s; %d reps of %d "
           "scans (%ld entries visited, checksum %llx); ",
           SCAN_PREFIX, NSCAN, K.n, NSCAN, cb_us, first_us,
           chk.n == NSCAN && !chk.bad ? "yes" : "NO", SCAN_REPS, SCAN_ITERS,
           visits, (unsigned long long)(sink & 0xffff));
    print_list("us per scan per rep:", us, SCAN_REPS);
    printf("\n");
    bench_line("cache_scan_1k_of_1m_us", m, "us");
    note_target("cache_scan_1k_of_1m_us", m, 50, 1);
}

/* --- cache_watch_apply_meps ----------------------------------------------- */

#define WATCH_N      200000
#define WATCH_REPS   5
#define WATCH_EACH   2 /* extra reps delivered one revision per response */
#define WATCH_CHECKS 1000

/* One held batch: WATCH_N puts of existing keys (tag), then delivered. */
static double
watch_rep(int rep, int how, uint32_t tag, double *write_ms, uint64_t *ev)
{
    size_t from = ((size_t)rep * WATCH_N) % (K.n - WATCH_N);
    const uint32_t *idx = perm + from;
    cache_health_t h0 = health(C);
    CHECK(cache_memstore_hold(S, 1));
    int64_t w0 = now_ns();
    int64_t rev = store_put_keys(S, idx, WATCH_N, tag);
    *write_ms = ms_since(w0);
    if (cache_memstore_revision(S) != rev)
        fail("cache_watch_apply: store revision moved by itself");
    /* Nothing may arrive while held. */
    cache_health_t hh = health(C);
    int early = cache_wait_fresh(C, rev, 0);
    int64_t t0 = now_ns();
    CHECK(cache_memstore_flush(S, how));
    int rc = cache_wait_fresh(C, rev, 30000);
    int64_t t1 = now_ns();
    if (rc != 0)
        die("cache_watch_apply: cache_wait_fresh after the flush", rc);
    cache_health_t h1 = health(C);
    long bad = 0;
    for (int k = 0; k < WATCH_CHECKS; k++) {
        uint32_t i = idx[rnd() % WATCH_N];
        coalesce_buf_t *v = NULL;
        cache_meta_t m;
        int grc = cache_get(C, key_of(i), K.len[i], &v, &m);
        if (grc || !val_ok(v, i, tag) || m.mod_rev > rev)
            bad++;
        coalesce_buf_unref(v);
    }
    uint64_t applied = h1.events - h0.events;
    ev[0] = h0.events;
    ev[1] = h1.events;
    if (rep == 0 || applied != WATCH_N || bad || hh.events != h0.events ||
        early != COALESCE_ETIMEDOUT || h1.entries != h0.entries ||
        h1.watch_rev < rev || h1.state != CACHE_RUNNING)
        printf(
            "# cache_watch_apply (%s, rep %d): health events %llu before "
            "the writes, %llu while held, %llu after the flush (%llu "
            "applied, %d written); entries %llu -> %llu; watch_rev %lld "
            "(store %lld); state %s; fresh-check while held %s; %ld of %d "
            "sampled keys without their new value%s\n",
            how == CACHE_FLUSH_BATCH ? "batch" : "each", rep,
            (unsigned long long)h0.events, (unsigned long long)hh.events,
            (unsigned long long)h1.events, (unsigned long long)applied, WATCH_N,
            (unsigned long long)h0.entries, (unsigned long long)h1.entries,
            (long long)h1.watch_rev, (long long)rev, state_name(h1.state),
            coalesce_err_name(early), bad, WATCH_CHECKS,
            applied != WATCH_N || bad || hh.events != h0.events ||
                    early != COALESCE_ETIMEDOUT || h1.entries != h0.entries ||
                    h1.watch_rev < rev || h1.state != CACHE_RUNNING
                ? " -- UNEXPECTED"
                : "");
    return (double)WATCH_N / ((double)(t1 - t0) / 1e3);
}

static void bench_watch(void)
{
    phase("cache_watch_apply", 90);
    double meps[WATCH_REPS], wms[WATCH_REPS], each[WATCH_EACH], ems;
    uint64_t ev[WATCH_REPS + WATCH_EACH][2];
    for (int rep = 0; rep < WATCH_REPS; rep++)
        meps[rep] = watch_rep(rep, CACHE_FLUSH_BATCH, 100 + (uint32_t)rep,
                              &wms[rep], ev[rep]);
    for (int rep = 0; rep < WATCH_EACH; rep++)
        each[rep] = watch_rep(WATCH_REPS + rep, CACHE_FLUSH_EACH,
                              200 + (uint32_t)rep, &ems, ev[WATCH_REPS + rep]);
    CHECK(cache_memstore_hold(S, 0));
    int rc = cache_wait_fresh(C, cache_memstore_revision(S), 5000);
    if (rc)
        printf("# cache_watch_apply: UNEXPECTED: not fresh after the hold "
               "was released: %s\n",
               coalesce_err_name(rc));
    double m = median(meps, WATCH_REPS);
    printf("# cache_watch_apply: cache running on %zu keys; store watch held "
           "(cache_memstore_hold), %d puts of existing keys written through "
           "the store in txns of %d (median %.0f ms, not timed), then timed "
           "from cache_memstore_flush(CACHE_FLUSH_BATCH) to "
           "cache_wait_fresh(store revision) returning; %d reps, M "
           "events/s:",
           K.n, WATCH_N, TXN_OPS, median(wms, WATCH_REPS), WATCH_REPS);
    print_list("", meps, WATCH_REPS);
    printf("\n# cache_watch_apply: the same delivered one revision (%d "
           "events) per response (CACHE_FLUSH_EACH), %d reps, M events/s:",
           TXN_OPS, WATCH_EACH);
    print_list("", each, WATCH_EACH);
    printf("\n# cache_watch_apply: cache_health events before -> after each "
           "rep (%d written per rep):",
           WATCH_N);
    for (int i = 0; i < WATCH_REPS + WATCH_EACH; i++)
        printf(" %llu->%llu", (unsigned long long)ev[i][0],
               (unsigned long long)ev[i][1]);
    printf("\n");
    bench_line("cache_watch_apply_meps", m, "Mev/s");
    note_target("cache_watch_apply_meps", m, 1, 0);
}

/* --- cache_put_mem_us ----------------------------------------------------- */

#define PUT_REPS     5
#define PUT_DISTINCT 10000
#define PUT_REPEAT   10000
#define PUT_HOT      16

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void bench_put(void)
{
    phase("cache_put_mem", 90);
    double *lat = xmalloc((PUT_DISTINCT + PUT_REPEAT) * sizeof(double));
    double *tmp = xmalloc((PUT_DISTINCT + PUT_REPEAT) * sizeof(double));
    double all[PUT_REPS], dis[PUT_REPS], rpt[PUT_REPS], p99[PUT_REPS],
        mean[PUT_REPS];
    unsigned char val[VLEN];
    char key[64];
    int64_t last = 0;
    long bad = 0;
    cache_health_t h0 = health(C);
    for (int rep = 0; rep < PUT_REPS; rep++) {
        int64_t r0 = now_ns();
        for (int i = 0; i < PUT_DISTINCT + PUT_REPEAT; i++) {
            int kl;
            if (i < PUT_DISTINCT)
                kl = snprintf(key, sizeof(key), "/b/put/%d/%08x", rep,
                              (unsigned)i * 0x9E3779B1u);
            else
                kl = snprintf(key, sizeof(key), "/b/put/hot/%02d", i % PUT_HOT);
            val_fill(val, (uint64_t)i, 300 + (uint32_t)rep);
            int64_t rev = 0;
            int64_t t0 = now_ns();
            int rc = cache_put(C, key, (size_t)kl, val, VLEN, NULL, &rev);
            lat[i] = (double)(now_ns() - t0) / 1e3;
            if (rc != 0)
                die("cache_put", rc);
            if (rev <= last)
                bad++;
            last = rev;
        }
        mean[rep] = ms_since(r0) * 1e3 / (PUT_DISTINCT + PUT_REPEAT);
        /* Read-your-writes: the last put is in memory at once. */
        coalesce_buf_t *v = NULL;
        int rc = cache_get(C, key, strlen(key), &v, NULL);
        if (rc ||
            !val_ok(v, PUT_DISTINCT + PUT_REPEAT - 1, 300 + (uint32_t)rep))
            bad++;
        coalesce_buf_unref(v);
        size_t n = PUT_DISTINCT + PUT_REPEAT;
        memcpy(tmp, lat, n * sizeof(double));
        qsort(tmp, n, sizeof(double), cmp_d);
        all[rep] = percentile(tmp, n, 50);
        p99[rep] = percentile(tmp, n, 99);
        qsort(lat, PUT_DISTINCT, sizeof(double), cmp_d);
        dis[rep] = percentile(lat, PUT_DISTINCT, 50);
        qsort(lat + PUT_DISTINCT, PUT_REPEAT, sizeof(double), cmp_d);
        rpt[rep] = percentile(lat + PUT_DISTINCT, PUT_REPEAT, 50);
    }
    int frc = cache_wait_fresh(C, cache_memstore_revision(S), 5000);
    cache_health_t h1 = health(C);
    uint64_t want = h0.entries + (uint64_t)PUT_REPS * PUT_DISTINCT + PUT_HOT;
    if (bad || frc || h1.entries != want)
        printf("# cache_put_mem: UNEXPECTED: %ld revisions not rising or "
               "reads not seeing the write; fresh after the puts: %s; "
               "entries %llu, want %llu\n",
               bad, coalesce_err_name(frc), (unsigned long long)h1.entries,
               (unsigned long long)want);
    double m = median(all, PUT_REPS);
    printf("# cache_put_mem: cache_put of a %d-byte value on the in-memory "
           "store with the cache's watch running (%zu+ keys); %d reps of %d "
           "new keys then %d puts cycling over %d keys, each put timed; "
           "health events %llu -> %llu (the watch's echoes)\n",
           VLEN, K.n, PUT_REPS, PUT_DISTINCT, PUT_REPEAT, PUT_HOT,
           (unsigned long long)h0.events, (unsigned long long)h1.events);
    print_list("# cache_put_mem: per-op median us per rep:", all, PUT_REPS);
    print_list("; new keys:", dis, PUT_REPS);
    print_list("; repeated keys:", rpt, PUT_REPS);
    print_list("; p99:", p99, PUT_REPS);
    print_list("; mean:", mean, PUT_REPS);
    printf("\n# cache_put_mem: medians over reps: new keys %.3f us, "
           "repeated keys %.3f us, p99 %.3f us, mean %.3f us\n",
           median(dis, PUT_REPS), median(rpt, PUT_REPS), median(p99, PUT_REPS),
           median(mean, PUT_REPS));
    bench_line("cache_put_mem_us", m, "us");
    free(lat);
    free(tmp);
}

/* --- cache_bytes_per_entry (child process) -------------------------------- */

/*
 * The counting allocator: a 16-byte header holding the size in front of
 * every block, live bytes and live blocks per exact size (up to HIST_MAX
 * bytes; larger ones in one bucket).
 */
#define HDR      16
#define HIST_MAX 4096
_Static_assert(_Alignof(max_align_t) <= HDR, "header keeps alignment");

static atomic_llong live_bytes, live_blocks;
static atomic_llong hist_n[HIST_MAX + 2]; /* [HIST_MAX + 1]: larger */
static atomic_llong big_bytes;

static void account(size_t n, int sign)
{
    atomic_fetch_add_explicit(&live_bytes, sign * (long long)n,
                              memory_order_relaxed);
    atomic_fetch_add_explicit(&live_blocks, sign, memory_order_relaxed);
    atomic_fetch_add_explicit(&hist_n[n <= HIST_MAX ? n : HIST_MAX + 1], sign,
                              memory_order_relaxed);
    if (n > HIST_MAX)
        atomic_fetch_add_explicit(&big_bytes, sign * (long long)n,
                                  memory_order_relaxed);
}

static void *tag_block(unsigned char *p, size_t n)
{
    memcpy(p, &n, sizeof(n));
    account(n, 1);
    return p + HDR;
}

static void *b_malloc(size_t n)
{
    if (n > SIZE_MAX / 2)
        return NULL;
    unsigned char *p = malloc(n + HDR);
    return p ? tag_block(p, n) : NULL;
}

static void *b_calloc(size_t c, size_t n)
{
    if (n && c > (SIZE_MAX / 2) / n)
        return NULL;
    unsigned char *p = calloc(1, c * n + HDR);
    return p ? tag_block(p, c * n) : NULL;
}

static void *b_realloc(void *ptr, size_t n)
{
    if (!ptr)
        return b_malloc(n);
    if (n > SIZE_MAX / 2)
        return NULL;
    unsigned char *p = (unsigned char *)ptr - HDR;
    size_t old;
    memcpy(&old, p, sizeof(old));
    p = realloc(p, n + HDR);
    if (!p)
        return NULL;
    account(old, -1);
    return tag_block(p, n);
}

static void b_free(void *ptr)
{
    if (!ptr)
        return;
    unsigned char *p = (unsigned char *)ptr - HDR;
    size_t n;
    memcpy(&n, p, sizeof(n));
    account(n, -1);
    free(p);
}

struct mem_snap {
    long long bytes, blocks, big;
    long long *hist; /* HIST_MAX + 2 */
};

static struct mem_snap snap(void)
{
    struct mem_snap s;
    s.bytes = atomic_load(&live_bytes);
    s.blocks = atomic_load(&live_blocks);
    s.big = atomic_load(&big_bytes);
    s.hist = xmalloc((HIST_MAX + 2) * sizeof(long long));
    for (int i = 0; i < HIST_MAX + 2; i++)
        s.hist[i] = atomic_load(&hist_n[i]);
    return s;
}

/* What glibc would use for a block of n bytes (8-byte chunk header,
 * 16-byte granularity, 32 bytes at least): an estimate, not a measurement. */
static long long glibc_chunk(long long n)
{
    long long c = (n + 8 + 15) & ~15LL;
    return c < 32 ? 32 : c;
}

/* Live blocks that appeared between a and b, in size classes. */
struct mem_class {
    long long n, bytes, chunk;
};

static void mem_classes(const struct mem_snap *a,
                        const struct mem_snap *b,
                        struct mem_class *small,
                        struct mem_class *mid,
                        struct mem_class *big)
{
    memset(small, 0, sizeof(*small));
    memset(mid, 0, sizeof(*mid));
    memset(big, 0, sizeof(*big));
    for (long long sz = 0; sz <= HIST_MAX; sz++) {
        long long d = b->hist[sz] - a->hist[sz];
        struct mem_class *c = sz < 200 ? small : mid;
        c->n += d;
        c->bytes += d * sz;
        c->chunk += d * glibc_chunk(sz);
    }
    big->n = b->hist[HIST_MAX + 1] - a->hist[HIST_MAX + 1];
    big->bytes = b->big - a->big;
    big->chunk = big->bytes; /* mmap'ed: page granularity, ignored */
}

#define BYTES_N NKEYS

static void bench_bytes(void)
{
    phase("cache_bytes_per_entry", 120);
    struct mem_snap s0 = snap();
    double fill_ms;
    cache_store_t *s = store_new_filled(&fill_ms);
    struct mem_snap s1 = snap();
    cache_t *c = NULL;
    CHECK(cache_new(&c, s, PREFIX, PLEN, NULL));
    struct mem_snap s2 = snap();
    int64_t t0 = now_ns();
    CHECK(cache_start(c));
    double load_ms = ms_since(t0);
    struct mem_snap s3 = snap();
    cache_health_t h = health(c);
    cache_stop(c);
    struct mem_snap s4 = snap();
    cache_free(c);
    struct mem_snap s5 = snap();
    cache_store_free(s);
    struct mem_snap s6 = snap();

    double n = (double)K.n;
    double kv = (double)(K.key_bytes + (uint64_t)K.n * VLEN) / n;
    double per = (double)(s3.bytes - s2.bytes) / n - kv;
    if (h.state != CACHE_RUNNING || h.entries != K.n ||
        h.bytes != K.key_bytes + (uint64_t)K.n * VLEN)
        printf("# cache_bytes: UNEXPECTED: health after the load: state %s, "
               "entries %llu, bytes %llu\n",
               state_name(h.state), (unsigned long long)h.entries,
               (unsigned long long)h.bytes);
    printf("# cache_bytes: child process, counting allocator installed "
           "before any library call (16-byte header per block, not "
           "counted); memstore with %zu keys filled in %.0f ms, cache_start "
           "in %.0f ms\n",
           K.n, fill_ms, load_ms);
    printf("# cache_bytes: live library bytes (blocks): nothing %lld (%lld); "
           "store filled %lld (%lld); + cache_new %lld (%lld); + "
           "cache_start %lld (%lld); after cache_stop %lld (%lld); after "
           "cache_free %lld (%lld); after cache_store_free %lld (%lld)\n",
           s0.bytes, s0.blocks, s1.bytes, s1.blocks, s2.bytes, s2.blocks,
           s3.bytes, s3.blocks, s4.bytes, s4.blocks, s5.bytes, s5.blocks,
           s6.bytes, s6.blocks);
    printf("# cache_bytes: the cache's copy: %lld bytes in %lld blocks for "
           "%zu entries = %.1f bytes per entry, of which keys + values %.1f "
           "(mean key %.1f + value %d); overhead %.1f bytes per entry\n",
           s3.bytes - s2.bytes, s3.blocks - s2.blocks, K.n,
           (double)(s3.bytes - s2.bytes) / n, kv, (double)K.key_bytes / n, VLEN,
           per);
    struct mem_class sm, md, bg;
    mem_classes(&s2, &s3, &sm, &md, &bg);
    printf("# cache_bytes: breakdown by block size: < 200 bytes (index "
           "nodes): %lld blocks, %.1f bytes per entry (%.2f blocks per "
           "entry, %.1f bytes each); 200 B - 4 KiB (entries: buffer header "
           "+ metadata + key + value): %lld blocks, %.1f bytes per entry of "
           "which %.1f beyond key + value; > 4 KiB (hash slots, skip-list "
           "head, page buffers): %lld blocks, %.1f bytes per entry\n",
           sm.n, (double)sm.bytes / n, (double)sm.n / n,
           sm.n ? (double)sm.bytes / (double)sm.n : 0.0, md.n,
           (double)md.bytes / n, (double)md.bytes / n - kv, bg.n,
           (double)bg.bytes / n);
    printf("# cache_bytes: with glibc's chunk rounding (estimated from the "
           "block sizes: +8 bytes, 16-byte multiples) the copy would take "
           "%.1f bytes per entry, %.1f beyond key + value\n",
           (double)(sm.chunk + md.chunk + bg.chunk) / n,
           (double)(sm.chunk + md.chunk + bg.chunk) / n - kv);
    if (s4.bytes != s2.bytes || s5.bytes != s1.bytes || s6.bytes != s0.bytes)
        printf("# cache_bytes: UNEXPECTED: memory not back: after cache_stop "
               "%+lld bytes vs before cache_start, after cache_free %+lld "
               "vs the store alone, after cache_store_free %+lld vs "
               "nothing\n",
               s4.bytes - s2.bytes, s5.bytes - s1.bytes, s6.bytes - s0.bytes);
    bench_line("cache_bytes_per_entry", per, "bytes");
    note_target("cache_bytes_per_entry", per, 64, 1);
    free(s0.hist);
    free(s1.hist);
    free(s2.hist);
    free(s3.hist);
    free(s4.hist);
    free(s5.hist);
    free(s6.hist);
}

/* Forked before any library call; runs bench_bytes() when told to. */
static void bytes_child(int rfd)
{
    char go = 0;
    ssize_t r;
    while ((r = read(rfd, &go, 1)) < 0 && errno == EINTR)
        ;
    close(rfd);
    if (r != 1 || go != 'g')
        _exit(0); /* the parent ended first, or skipped it */
    CHECK(coalesce_replace_allocator(b_malloc, b_realloc, b_calloc, b_free));
    watchdog_start(SMALL_STACK);
    bench_bytes();
    keys_free();
    atomic_store(&wd_deadline, 0);
    fflush(stdout);
    exit(0);
}

/* --- main ----------------------------------------------------------------- */

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    int64_t start = now_ns();
    printf("# bench_cache: libcoalesce %s, %ld online CPUs\n",
           coalesce_version_string(), sysconf(_SC_NPROCESSORS_ONLN));
    print_load("at start");

    /* The keys first: the bytes child shares them (copy on write). */
    keys_gen(NKEYS, NSCAN);

    bool bytes = selected("bytes");
    pid_t child = -1;
    int wfd = -1;
    if (bytes) {
        int fds[2];
        if (pipe(fds) != 0)
            fail("pipe failed");
        fflush(stdout);
        child = fork();
        if (child < 0)
            fail("fork failed");
        if (child == 0) {
            close(fds[1]);
            bytes_child(fds[0]);
        }
        close(fds[0]);
        wfd = fds[1];
    }

    watchdog_start(SMALL_STACK);

    bool get = selected("get"), scan = selected("scan"),
         watch = selected("watch"), put = selected("put");
    if (get || scan || watch || put) {
        setup_big();
        if (get)
            bench_get();
        if (scan)
            bench_scan();
        if (watch)
            bench_watch();
        if (put)
            bench_put();
        printf("# bench_cache: peak RSS of the timed figures %ld MiB\n",
               max_rss_mib());
        teardown_big();
    }

    if (bytes) {
        phase("cache_bytes_per_entry (child)", 150);
        fflush(stdout);
        if (write(wfd, "g", 1) != 1)
            fail("cannot start the cache_bytes_per_entry child");
        close(wfd);
        int st = 0;
        while (waitpid(child, &st, 0) < 0 && errno == EINTR)
            ;
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr,
                    BENCH_NAME ": the cache_bytes_per_entry child failed "
                               "(status 0x%x)\n",
                    st);
            exit(1);
        }
    }

    keys_free();
    bench_finish(start);
    return 0;
}

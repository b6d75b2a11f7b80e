/*
 * etcd_service.c: a small service that keeps one etcd prefix in memory and
 * writes through it (libcoalesce-etcd).
 *
 * It creates the etcd store and a cache of the prefix, starts the cache
 * (one list, then a watch), writes a few keys through it, reads them back
 * from memory, scans the prefix, prints the cache's health and shuts down.
 * With -w SECONDS it stays up that long and prints what the watch reports:
 * restart etcd meanwhile to see a disconnect and the resume.
 *
 * Build:
 *   cc -std=c11 etcd_service.c \
 *      $(pkg-config --cflags --libs libcoalesce-etcd) -lpthread
 * Run:
 *   etcd_service [-e endpoints] [-p prefix] [-u user -P password]
 *                [--ca F --cert F --key F] [-w seconds]
 */
#define _POSIX_C_SOURCE 200809L

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <coalesce.h>
#include <coalesce/etcd.h>

static const char *prefix = "/demo/";

/* Prints a failed call: the code's name, and what etcd or libcurl said.
 * cache_etcd_last_error() is per thread: call it on the failing thread. */
static int check(int rc, const char *what)
{
    if (rc)
        fprintf(stderr, "etcd_service: %s: %s (%s): %s\n", what,
                coalesce_err_name(rc), coalesce_strerror(rc),
                cache_etcd_last_error());
    return rc;
}

/* prefix + name, in a static buffer per slot (keys stay short here). */
static const char *key(int slot, const char *name)
{
    static char buf[4][256];
    snprintf(buf[slot], sizeof(buf[slot]), "%s%s", prefix, name);
    return buf[slot];
}

/* Runs on the cache's reporter thread: never block here. */
static void on_report(void *data, int what, int code, int64_t rev)
{
    static const char *const names[] = {"?",      "DISCONNECTED", "RELISTED",
                                        "DECODE", "OVERFLOW",     "FAILED"};
    (void)data;
    printf("report: %s (%s) at revision %lld\n",
           what >= 1 && what <= 5 ? names[what] : "?", coalesce_err_name(code),
           (long long)rev);
    fflush(stdout);
}

static int print_entry(void *data,
                       const void *k,
                       size_t klen,
                       coalesce_buf_t *v,
                       const cache_meta_t *m)
{
    (void)data;
    printf("  %.*s = %.*s  (mod_rev %lld, version %lld, lease %lld)\n",
           (int)klen, (const char *)k, (int)coalesce_buf_len(v),
           (const char *)coalesce_buf_data(v), (long long)m->mod_rev,
           (long long)m->version, (long long)m->lease);
    return 0; /* go on */
}

static void usage(void)
{
    fprintf(stderr, "usage: etcd_service [-e endpoints] [-p prefix] "
                    "[-u user -P password] [--ca F --cert F --key F] "
                    "[-w seconds]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    cache_etcd_opts_t eo;
    cache_etcd_opts_init(&eo);
    eo.endpoints = "http://127.0.0.1:2379"; /* comma-separated for failover */
    const char *wait = "0";
    /* Each option sets one string. */
    static const struct option longs[] = {{"ca", required_argument, 0, 1},
                                          {"cert", required_argument, 0, 2},
                                          {"key", required_argument, 0, 3},
                                          {0, 0, 0, 0}};
    const struct {
        int opt;
        const char **dst;
    } set[] = {{'e', &eo.endpoints}, {'p', &prefix},   {'u', &eo.username},
               {'P', &eo.password},  {'w', &wait},     {1, &eo.ca_file},
               {2, &eo.cert_file},   {3, &eo.key_file}};
    int opt;
    while ((opt = getopt_long(argc, argv, "e:p:u:P:w:", longs, NULL)) != -1) {
        size_t i = 0;
        while (i < sizeof(set) / sizeof(set[0]) && set[i].opt != opt)
            i++;
        if (i == sizeof(set) / sizeof(set[0]))
            usage();
        *set[i].dst = optarg;
    }
    if (optind != argc || !*prefix)
        usage();

    /* The store contacts no server yet; the cache's start does. */
    cache_store_t *store = NULL;
    cache_t *c = NULL;
    if (check(cache_etcd_new(&store, &eo), "cache_etcd_new"))
        return 1;
    cache_opts_t co;
    cache_opts_init(&co);
    co.report = on_report; /* watch breaks, relists, ... */
    if (check(cache_new(&c, store, prefix, strlen(prefix), &co), "cache_new"))
        goto fail;
    /* List the prefix at one revision, then watch it. Fails (does not
     * hang) when no endpoint answers within the connect timeout. */
    if (check(cache_start(c), "cache_start (is etcd running?)"))
        goto fail;
    printf("cache of %s started on %s\n", prefix, eo.endpoints);

    /* Writes go to etcd first and reach memory once etcd accepted them. */
    int64_t rev;
    const char *cfg = key(0, "config"), *cnt = key(1, "counter");
    int rc = cache_create(c, cfg, strlen(cfg), "{\"v\":1}", 7, NULL, &rev);
    if (rc == COALESCE_EEXIST)
        printf("create %s: already there (from an earlier run)\n", cfg);
    else if (check(rc, "cache_create"))
        goto fail;
    else
        printf("create %s: revision %lld\n", cfg, (long long)rev);
    if (check(cache_put(c, cnt, strlen(cnt), "0", 1, NULL, &rev), "cache_put"))
        goto fail;
    printf("put %s = 0: revision %lld\n", cnt, (long long)rev);

    /* Read-modify-write: update only if nobody changed it since our read. */
    cache_meta_t m;
    if (check(cache_get(c, cnt, strlen(cnt), NULL, &m), "cache_get"))
        goto fail;
    if (check(cache_update(c, cnt, strlen(cnt), "1", 1, m.mod_rev, NULL, &rev),
              "cache_update"))
        goto fail;
    printf("update %s = 1 if mod_rev %lld: revision %lld\n", cnt,
           (long long)m.mod_rev, (long long)rev);
    rc = cache_update(c, cnt, strlen(cnt), "2", 1, m.mod_rev, NULL, &rev);
    printf("update again with the stale mod_rev: %s (etcd at %lld)\n",
           coalesce_err_name(rc), (long long)rev);

    /* A transaction: all or nothing, seen at once. The session key gets a
     * 10 s lease: etcd deletes it if nobody renews the lease. */
    const char *a = key(0, "a"), *b = key(2, "b"), *s = key(3, "session");
    cache_put_opts_t lease = {.ttl_ms = 10000};
    cache_txn_op_t ops[] = {{.type = CACHE_TXN_PUT,
                             .key = a,
                             .keylen = strlen(a),
                             .value = "A",
                             .vallen = 1},
                            {.type = CACHE_TXN_PUT,
                             .key = b,
                             .keylen = strlen(b),
                             .value = "B",
                             .vallen = 1},
                            {.type = CACHE_TXN_PUT,
                             .key = s,
                             .keylen = strlen(s),
                             .value = "me",
                             .vallen = 2,
                             .opts = &lease}};
    if (check(cache_txn(c, ops, 3, &rev), "cache_txn"))
        goto fail;
    printf("txn of 3 puts: revision %lld\n", (long long)rev);
    int64_t deleted;
    if (check(cache_delete(c, b, strlen(b), &deleted, &rev), "cache_delete"))
        goto fail;
    printf("delete %s: %lld deleted, revision %lld\n", b, (long long)deleted,
           (long long)rev);

    /* Reads are memory only: no round trip to etcd. */
    const char *names[] = {"config", "counter", "a", "b"};
    for (int i = 0; i < 4; i++) {
        const char *k = key(0, names[i]);
        coalesce_buf_t *v;
        rc = cache_get(c, k, strlen(k), &v, &m);
        if (rc == 0) {
            printf("get %s = %.*s (mod_rev %lld)\n", k,
                   (int)coalesce_buf_len(v), (const char *)coalesce_buf_data(v),
                   (long long)m.mod_rev);
            coalesce_buf_unref(v);
        } else {
            printf("get %s: %s\n", k, coalesce_err_name(rc));
        }
    }
    printf("scan of %s:\n", prefix);
    if (check(cache_scan(c, prefix, strlen(prefix), print_entry, NULL),
              "cache_scan"))
        goto fail;

    /* Optionally stay up: other writers and watch breaks show up here. */
    for (int i = atoi(wait); i > 0; i--)
        sleep(1);

    static const char *const states[] = {"STOPPED", "RUNNING", "RECONNECTING",
                                         "RELISTING", "DEGRADED"};
    cache_health_t h;
    cache_health(c, &h, sizeof(h));
    printf("health: state %s, watch_rev %lld, %llu entries, %llu bytes, "
           "%llu events, %llu reconnects, %llu relists, last error %s\n",
           states[h.state], (long long)h.watch_rev,
           (unsigned long long)h.entries, (unsigned long long)h.bytes,
           (unsigned long long)h.events, (unsigned long long)h.reconnects,
           (unsigned long long)h.relists, coalesce_err_name(h.last_error));

    /* Shutdown: the cache first (stops the watch), then the store. */
    cache_stop(c);
    cache_free(c);
    cache_store_free(store);
    return 0;
fail:
    cache_free(c);
    cache_store_free(store);
    return 1;
}

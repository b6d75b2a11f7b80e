/*
 * The etcd store (libcoalesce-etcd): a cache_store_t (store.h) over etcd
 * v3's JSON gateway, for state that lives in an etcd cluster (etcd 3.4 or
 * later). A separate library, so that hosts that do not use etcd never
 * link libcurl or jansson:
 *
 *     cc ... $(pkg-config --cflags --libs libcoalesce-etcd)
 *
 * Transport. Unary requests (range, txn, leases) reuse a small pool of
 * keep-alive connections; each watch has its own connection and a thread
 * the store owns (joined by watch_cancel). Several endpoints may be given:
 * a request that cannot connect, or a read that fails in any way, is tried
 * on the next endpoint, and the store remembers the one that worked. A
 * write (txn) whose request may have reached the server is never retried,
 * not even by libcurl: it fails with COALESCE_EIO or COALESCE_ETIMEDOUT
 * and its outcome is unknown (the cache's watch brings the truth either
 * way). When no endpoint can be reached at all, the code is COALESCE_EIO
 * and nothing was sent.
 *
 * Watches ask for progress notifications; how often etcd sends them is the
 * server's --experimental-watch-progress-notify-interval (10 min by
 * default). A broken watch connection, an {"error": ...} line in the
 * stream, or anything undecodable ends the watch with a canceling response
 * (COALESCE_EIO or COALESCE_EDECODE); the cache then resumes from the last
 * revision it applied + 1, trying the endpoints in turn, with backoff
 * (cache_opts_t). A compacted start revision cancels with COALESCE_ECOMPACTED
 * and the compact revision, and the cache relists.
 *
 * Errors are mapped from etcd's gRPC code, never from the HTTP status:
 * InvalidArgument → COALESCE_EINVAL, OutOfRange → COALESCE_ECOMPACTED,
 * NotFound → COALESCE_ENOENT, PermissionDenied and failed authentication →
 * COALESCE_EACCES, Unavailable → COALESCE_EIO, DeadlineExceeded →
 * COALESCE_ETIMEDOUT, Canceled → COALESCE_ECANCELED, Unimplemented →
 * COALESCE_ENOTSUP, anything else → COALESCE_EBACKEND. A reply that is
 * not what etcd sends (bad JSON, bad base64) is COALESCE_EDECODE. The
 * server's message is kept for cache_etcd_last_error().
 *
 * Security. With a username, the store authenticates (/v3/auth/
 * authenticate) before its first request and again whenever etcd says the
 * token expired; wrong credentials fail every call with COALESCE_EACCES.
 * With https:// endpoints, ca_file verifies the server and cert_file and
 * key_file authenticate the client. A server certificate that does not
 * verify, or a client certificate the server rejects with a TLS alert, is
 * COALESCE_EACCES (if the server closes the connection before its alert
 * arrives, COALESCE_EIO).
 * With both client certificates and authentication on, etcd 3.4's gateway
 * refuses certificates that carry a Common Name: use certificates without
 * one, and log in with the username and password.
 *
 * Memory: this library allocates with malloc (as libcurl and jansson do),
 * not with coalesce_replace_allocator()'s hook.
 *
 * Thread safety: every function here is thread-safe.
 */
#ifndef COALESCE_ETCD_H
#define COALESCE_ETCD_H

#include "store.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(COALESCE_STATIC)
#    define COALESCE_ETCD_API
#elif defined(__GNUC__) && __GNUC__ >= 4
#    define COALESCE_ETCD_API __attribute__((visibility("default")))
#else
#    define COALESCE_ETCD_API
#endif

/** etcd store options; cache_etcd_opts_init() fills the defaults. */
typedef struct cache_etcd_opts {
    size_t size; /**< sizeof(cache_etcd_opts_t). */
    /** Comma-separated base URLs, e.g.
     *  "http://127.0.0.1:2379,http://127.0.0.1:22379" (required; borrowed,
     *  copied by cache_etcd_new). */
    const char *endpoints;
    /** Authentication (NULL: none). Borrowed, copied. */
    const char *username;
    const char *password;
    /** TLS, for https:// endpoints (NULL: libcurl's defaults). PEM files:
     *  the CA that signed the server's certificate, and the client's
     *  certificate and key. Borrowed, copied. */
    const char *ca_file;
    const char *cert_file;
    const char *key_file;
    /** Timeouts: 0 for the default, never negative. */
    int connect_timeout_ms; /**< Per endpoint (default 1000). */
    int request_timeout_ms; /**< One unary request (default 10000). */
    /** A watch that receives nothing, not even a progress notification,
     *  for this long is treated as broken (COALESCE_EIO). Set it above the
     *  server's progress interval; 0 (default): never. TCP keepalive
     *  detects dead peers either way. */
    int watch_idle_ms;
    /** Idle connections kept for reuse (default 4, at most 1024). */
    unsigned max_idle_conns;
} cache_etcd_opts_t;

/** @brief Fill the defaults and set o->size; NULL is a no-op. @since 0.3 */
COALESCE_ETCD_API void cache_etcd_opts_init(cache_etcd_opts_t *o);

/**
 * @brief Create an etcd store. Contacts no server: a store can be created
 *        while etcd is down, and the first request says what is wrong.
 * @param[out] out New store, freed with cache_store_free(); set to NULL on
 *             failure (unless @p out itself is NULL).
 * @param[in] opts Borrowed, not NULL (its strings are copied); endpoints
 *            required.
 * @return 0; COALESCE_EINVAL (NULL @p out or @p opts, no endpoint, more than
 *         16, one longer than 900 bytes or not http:// or https://, a
 *         password without a username, a negative timeout, max_idle_conns
 *         over 1024, a bad opts->size); COALESCE_ENOMEM (also: libcurl's
 *         global initialisation failed).
 * @since 0.3
 */
COALESCE_ETCD_API int cache_etcd_new(cache_store_t **out,
                                     const cache_etcd_opts_t *opts);

/**
 * @brief The message that came with the calling thread's last failed call
 *        on an etcd store: etcd's own message ("etcdserver: authentication
 *        failed, invalid user ID or password"), libcurl's, or what could
 *        not be decoded. "" if none.
 *
 * Read it right after the failing call: a success on an etcd store clears
 * it, but a call that fails before reaching the store (a cache's own
 * argument checks, COALESCE_ENOTSTARTED...) leaves an older message. Failures
 * on the cache's and the store's own threads (watch resumes) keep their
 * messages there: the report callback cannot read them.
 * @return Borrowed, thread-local; valid until the thread's next call.
 * @since 0.3
 */
COALESCE_ETCD_API const char *cache_etcd_last_error(void);

/**
 * @brief The cluster's current revision.
 * @param[out] rev Set on 0; not NULL.
 * @return 0; the store's codes (see above); COALESCE_EINVAL if @p s is
 *         NULL or not an etcd store, or @p rev is NULL.
 * @since 0.3
 */
COALESCE_ETCD_API int cache_etcd_revision(cache_store_t *s, int64_t *rev);

/**
 * @brief Compact the cluster's history up to @p rev (reads and watches
 *        from before it then fail with COALESCE_ECOMPACTED).
 * @return 0; COALESCE_ECOMPACTED (already compacted there, or a future
 *         revision); COALESCE_EINVAL (@p rev <= 0, @p s NULL or not an etcd
 *         store); the store's codes.
 * @since 0.3
 */
COALESCE_ETCD_API int cache_etcd_compact(cache_store_t *s, int64_t rev);

/**
 * @brief Renew a lease, for hosts that keep their own leases alive (call
 *        it every TTL/3). etcd's keepalive reply over the gateway is
 *        unreliable, so the renewal is confirmed with a time-to-live query.
 * @param[out] ttl_ms Remaining time to live after the renewal (may be
 *             NULL); etcd counts whole seconds, rounded down.
 * @return 0; COALESCE_ENOENT (the lease expired or never existed: its keys
 *         are gone); COALESCE_EINVAL (@p s NULL or not an etcd store); the
 *         store's codes.
 * @since 0.3
 */
COALESCE_ETCD_API int
cache_etcd_lease_keepalive(cache_store_t *s, int64_t id, int64_t *ttl_ms);

/**
 * @brief A lease's remaining time to live, in whole seconds (rounded down
 *        by etcd) times 1000.
 * @param[out] ttl_ms Set on 0; may be NULL (an existence check).
 * @return 0; COALESCE_ENOENT (expired, revoked or unknown); COALESCE_EINVAL
 *         (@p s NULL or not an etcd store); the store's codes.
 * @since 0.3
 */
COALESCE_ETCD_API int
cache_etcd_lease_ttl(cache_store_t *s, int64_t id, int64_t *ttl_ms);

#ifdef __cplusplus
}
#endif

#endif /* COALESCE_ETCD_H */

/*
 * Write-through cache: a revision-tracked in-memory copy of one key prefix
 * of a store (store.h).
 *
 * cache_start() lists the prefix at one revision R0 (paged), then watches
 * it from R0 + 1 on the store's thread, so memory follows every writer.
 * Writes go through the cache to the store first and reach memory only
 * once the store accepted them, stamped with the commit revision. Reads
 * are memory only: a hash index for keys, an ordered index for prefix
 * scans in byte order.
 *
 * One rule decides every change to memory, from this process's writes or
 * from the watch: a change at revision r to key k applies only if r is
 * newer than what memory holds for k, a tombstone included, and no prefix
 * delete at or after r covers k. So nothing older overwrites anything
 * newer, a deleted key never comes back, and the order in which the watch
 * and the write-throughs arrive does not matter. W, the watch revision, is
 * the revision up to which the watch has delivered everything; a
 * write-through at or below W is already in memory. Tombstones go once W
 * passes them (W rises with events and with progress notifications).
 *
 * Memory can lag behind the store (other writers show up when the watch
 * delivers them; cache_wait_fresh() waits for a revision); correctness of
 * read-modify-write rests on the store's compares: cache_update() and
 * cache_delete_value() compare the mod revision read from the cache.
 *
 * The watch recovers by itself: a cut watch resumes from the last applied
 * revision + 1 with backoff; a compacted one relists and swaps the new copy
 * in at once. What happened is reported through the error callback and
 * cache_health(), never by blocking the watch.
 *
 * Lifecycle: cache_new() (stopped) -> cache_start() -> reads and writes from
 * any threads -> cache_stop() (and cache_start() again, if wanted) ->
 * cache_free() -> cache_store_free() of the store, which must outlive every
 * cache over it. Values returned by cache_get() are buffers of their own and
 * stay valid after cache_free() until they are released.
 *
 * Thread safety: a cache_t is thread-safe; reads take a shared lock and
 * never wait for the store; writes block until the store has answered.
 * Callbacks run with no cache lock held.
 */
#ifndef COALESCE_CACHE_H
#define COALESCE_CACHE_H

#include "buf.h"
#include "store.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cache cache_t;

/** Cache states (cache_health_t.state). */
enum {
    CACHE_STOPPED = 0,
    CACHE_RUNNING = 1,
    CACHE_RECONNECTING = 2, /**< The watch broke; resuming. */
    CACHE_RELISTING = 3,    /**< After a compaction; reads serve the old
                                 copy until the new one is swapped in. */
    CACHE_DEGRADED = 4      /**< Bounds exceeded: reads return
                                 COALESCE_EOVERFLOW until restarted
                                 (cache_stop(), cache_start()). */
};

/** What the error callback reports (besides the code). */
enum {
    CACHE_REPORT_DISCONNECTED = 1, /**< The watch broke; resuming. */
    CACHE_REPORT_RELISTED = 2,     /**< Compacted: relisted at a revision. */
    CACHE_REPORT_DECODE = 3,       /**< The store could not decode data. */
    CACHE_REPORT_OVERFLOW = 4,     /**< Bounds exceeded: degraded. */
    CACHE_REPORT_FAILED = 5        /**< A resume or relist failed; retrying. */
};

/**
 * @brief Reports from the cache's watch supervision (and bounds overflows).
 *
 * Runs on a reporter thread the cache owns, one report at a time, in order.
 * It may call reads and writes on the cache, but not cache_start(),
 * cache_stop() or cache_free() on it (they wait for this thread). It should
 * not block long: 64 reports queue up, later ones are dropped and counted
 * (cache_health_t.reports_dropped). On the etcd store,
 * cache_etcd_last_error() cannot give the message behind a report: it was
 * set on one of the cache's or the store's own threads.
 * @param data opts.report_data.
 * @param what A CACHE_REPORT_* value.
 * @param code The underlying code (0 if none): DISCONNECTED and FAILED carry
 *             the store's code, DECODE COALESCE_EDECODE, OVERFLOW
 *             COALESCE_EOVERFLOW, RELISTED 0.
 * @param revision The revision concerned (W, the relist revision, or the
 *                 write's commit revision for an overflow it caused).
 */
typedef void (*cache_report_cb)(void *data,
                                int what,
                                int code,
                                int64_t revision);

/** Options; cache_opts_init() fills the defaults. */
typedef struct cache_opts {
    size_t size;      /**< sizeof(cache_opts_t). */
    size_t page_size; /**< Keys per range page. Default 500. */
    /** Bounds: 0 (default): none. Past one the cache does not evict: it
     *  goes CACHE_DEGRADED (reported) until restarted. */
    uint64_t max_entries;
    uint64_t max_bytes;      /**< Keys + values; 0 (default): no bound. */
    uint32_t backoff_min_ms; /**< Resume backoff start. Default 100. */
    uint32_t backoff_max_ms; /**< Resume backoff cap. Default 30000. */
    cache_report_cb report;  /**< May be NULL. */
    void *report_data;       /**< Passed to report; borrowed. */
} cache_opts_t;

/** Entry metadata, as the store reported it (store.h). */
typedef struct cache_meta {
    int64_t create_rev; /**< Revision that created the key. */
    int64_t mod_rev;    /**< Revision of its last change: cache_update()'s
                             and cache_delete_value()'s expect. */
    int64_t version;    /**< 1 on create, +1 per put. */
    int64_t lease;      /**< 0 for none. */
} cache_meta_t;

/** Health, as returned by cache_health(). */
typedef struct cache_health {
    int state;                 /**< CACHE_STOPPED .. CACHE_DEGRADED. */
    int last_error;            /**< Last code reported, 0 if none. */
    int64_t watch_rev;         /**< W. */
    uint64_t entries;          /**< Live keys. */
    uint64_t bytes;            /**< Their keys and values. */
    uint64_t tombstones;       /**< Point tombstones held. */
    uint64_t range_tombstones; /**< Prefix-delete tombstones held. */
    uint64_t relists;          /**< Relists after compaction. */
    uint64_t reconnects;       /**< Watch resumes. */
    uint64_t events;           /**< Watch events applied. */
    /** Reports lost because 64 were already queued for a report callback
     *  that did not keep up. */
    uint64_t reports_dropped;
} cache_health_t;

/** Write options; NULL means none. Read during the call only. Unlike the
 *  other option structs it has no size field: it is frozen as it is, and
 *  options added later will come with a new struct and call, so callers
 *  may keep initialising it with designated initialisers. */
typedef struct cache_put_opts {
    int64_t ttl_ms; /**< > 0: a new lease of at least this long (the store
                         may round up), revoked if the write fails. */
    int64_t lease;  /**< Or an existing lease (ttl_ms 0). */
} cache_put_opts_t;

/** Transaction operation types. */
enum {
    CACHE_TXN_PUT = 0,          /**< Unconditional put. */
    CACHE_TXN_CREATE = 1,       /**< Put if the key does not exist. */
    CACHE_TXN_UPDATE = 2,       /**< Put if its mod revision is expect. */
    CACHE_TXN_DELETE = 3,       /**< Unconditional delete. */
    CACHE_TXN_DELETE_VALUE = 4, /**< Delete if its mod revision is expect. */
    CACHE_TXN_DELETE_PREFIX = 5 /**< Delete every key under key. */
};

/** One operation of cache_txn(); every pointer is borrowed for the call. */
typedef struct cache_txn_op {
    int type;        /**< CACHE_TXN_*. */
    const void *key; /**< Within the cache's prefix; DELETE_PREFIX: the
                          prefix to delete. */
    size_t keylen;
    const void *value; /**< Puts; may be NULL when vallen is 0. */
    size_t vallen;
    int64_t expect; /**< UPDATE, DELETE_VALUE: the mod revision read. */
    const cache_put_opts_t *opts; /**< Puts: may be NULL. */
} cache_txn_op_t;

/**
 * @brief Receives one entry of a scan, in key order.
 *
 * Runs on the thread that called cache_scan(), inside it, with no cache lock
 * held: it may call any function on the cache but cache_free(), writes
 * included (the scan goes on over its snapshot).
 * @param data The pointer given to cache_scan().
 * @param key Borrowed for the call.
 * @param value Borrowed for the call; coalesce_buf_ref() keeps it.
 * @param meta Borrowed for the call.
 * @return 0 to go on, nonzero to stop the scan.
 */
typedef int (*cache_scan_cb)(void *data,
                             const void *key,
                             size_t keylen,
                             coalesce_buf_t *value,
                             const cache_meta_t *meta);

/** @brief Fill the defaults and set o->size; NULL is a no-op. Thread safety:
 *         yes. @since 0.2 */
COALESCE_API void cache_opts_init(cache_opts_t *o);

/**
 * @brief Create a cache of the keys under @p prefix in @p store (stopped).
 *        Contacts no store and starts no thread: see cache_start().
 * @param[out] out New cache, freed with cache_free(); untouched on failure.
 * @param[in] store Borrowed; must outlive the cache.
 * @param[in] prefix Copied; 1 byte to 64 KiB. Keys are the prefix followed
 *            by anything (1 MiB at most in all); no separator is added.
 * @param[in] opts Copied; NULL for the defaults. opts->size must be
 *            sizeof(cache_opts_t) (cache_opts_init() sets it).
 * @return 0; COALESCE_EINVAL (NULL @p out, @p store or @p prefix, bad
 *         prefix length, a store whose ops->version is not
 *         CACHE_STORE_OPS_VERSION, bad opts->size); COALESCE_ENOMEM.
 * Thread safety: yes. @since 0.2
 */
COALESCE_API int cache_new(cache_t **out,
                           cache_store_t *store,
                           const void *prefix,
                           size_t prefixlen,
                           const cache_opts_t *opts);

/**
 * @brief Load the prefix and start watching it.
 *
 * Blocks while it lists the prefix page by page and creates the watch (the
 * store's own timeouts bound each request), then starts the cache's
 * supervising thread (and a reporter thread if opts.report is set).
 * @return 0, also when the copy already exceeds the bounds (the cache is
 *         then CACHE_DEGRADED, and reported); COALESCE_EINVAL (NULL @p c);
 *         COALESCE_EBUSY (already started, degraded included);
 *         COALESCE_ENOMEM (also: no thread); the store's codes from range
 *         and watch (COALESCE_ECOMPACTED if its history kept being compacted
 *         under the listing). On an error the cache stays stopped and can
 *         be started again.
 * Thread safety: yes (concurrent starts and stops are serialized); not from
 * a report callback. @since 0.2
 */
COALESCE_API int cache_start(cache_t *c);

/**
 * @brief Stop: cancel the watch and wait for it, then drop the copy. Reads
 *        return COALESCE_ENOTSTARTED until the next cache_start(). No report
 *        callback runs after it returns (the queued ones run first). A
 *        stopped cache or NULL is a no-op.
 *
 * May block for as long as the store request the supervising thread is in
 * (a resume or a relist page), since it waits for that thread.
 * Thread safety: yes (serialized with cache_start()); not from a report
 * callback. @since 0.2
 */
COALESCE_API void cache_stop(cache_t *c);

/**
 * @brief Stop (as cache_stop()) and free. NULL is a no-op.
 *
 * Values taken with cache_get() or in a scan stay valid until released.
 * Thread safety: no other call on the cache may overlap or follow it; not
 * from a report or scan callback. @since 0.2
 */
COALESCE_API void cache_free(cache_t *c);

/**
 * @brief Read one key from memory; never waits for the store.
 * @param[in] key Borrowed.
 * @param[out] value New reference (release with coalesce_buf_unref());
 *             may be NULL. The bytes never change. Set only on 0.
 * @param[out] meta May be NULL. Set only on 0.
 * @return 0; COALESCE_ENOENT (absent or deleted); COALESCE_EINVAL (NULL
 *         @p c or @p key, a key outside the prefix or over 1 MiB);
 *         COALESCE_ENOTSTARTED; COALESCE_EOVERFLOW (degraded). While the
 *         watch reconnects or relists, the copy still serves reads.
 * Thread safety: yes. @since 0.2
 */
COALESCE_API int cache_get(cache_t *c,
                           const void *key,
                           size_t keylen,
                           coalesce_buf_t **value,
                           cache_meta_t *meta);

/**
 * @brief Visit every key starting with @p prefix, in byte order, from one
 *        consistent snapshot; @p cb runs with no lock held, on this thread.
 * @param[in] prefix Borrowed. Must start with the cache's prefix (or be a
 *            prefix of it, even empty: the whole cache).
 * @param[in] cb Not NULL. @param[in] data Passed to @p cb; borrowed.
 * @return 0 (also when @p cb stopped it, or nothing matched);
 *         COALESCE_EINVAL (NULL @p c or @p cb, NULL @p prefix with @p len >
 *         0, a prefix outside the cache's); COALESCE_ENOTSTARTED;
 *         COALESCE_EOVERFLOW (degraded); COALESCE_ENOMEM (then @p cb was not
 *         called).
 * Thread safety: yes. @since 0.2
 */
COALESCE_API int cache_scan(
    cache_t *c, const void *prefix, size_t len, cache_scan_cb cb, void *data);

/*
 * Writes. Each goes to the store first; memory changes only if the store
 * accepted it (if memory runs out while applying an accepted write, the
 * write stands and the key reaches memory with the watch's echo). @p rev (may
 * be NULL) receives the store's revision: the commit revision on success, the
 * current one after a failed compare; it is untouched after any other error.
 * Keys, values and options are borrowed for the call. A write blocks until
 * the store has answered (the etcd store: request_timeout_ms), and works in
 * every started state, degraded included. Thread safety: yes.
 *
 * Common codes: COALESCE_EINVAL (NULL @p c, a key outside the prefix or over
 * 1 MiB, NULL value with a length, negative ttl_ms or lease: checked before
 * the store is contacted), COALESCE_ENOTSTARTED, COALESCE_ENOMEM, the
 * store's codes (store.h; with opts->ttl_ms, also those of its lease grant).
 * A write that fails with COALESCE_EIO or COALESCE_ETIMEDOUT on the etcd
 * store may have been applied: the watch brings the outcome. @since 0.2 for
 * all of them.
 */

/** @brief Put unconditionally. */
COALESCE_API int cache_put(cache_t *c,
                           const void *key,
                           size_t keylen,
                           const void *value,
                           size_t vallen,
                           const cache_put_opts_t *opts,
                           int64_t *rev);

/** @brief Put if the key does not exist; COALESCE_EEXIST otherwise. */
COALESCE_API int cache_create(cache_t *c,
                              const void *key,
                              size_t keylen,
                              const void *value,
                              size_t vallen,
                              const cache_put_opts_t *opts,
                              int64_t *rev);

/**
 * @brief Put if the key's mod revision is @p expect (as read from
 *        cache_get()); COALESCE_ECONFLICT otherwise. Across a delete and
 *        a re-create the mod revision differs, so no ABA. An @p expect of 0
 *        requires the key to be absent (as cache_create(), but failing with
 *        COALESCE_ECONFLICT).
 */
COALESCE_API int cache_update(cache_t *c,
                              const void *key,
                              size_t keylen,
                              const void *value,
                              size_t vallen,
                              int64_t expect,
                              const cache_put_opts_t *opts,
                              int64_t *rev);

/** @brief Delete; *deleted (may be NULL) is 0 or 1. */
COALESCE_API int cache_delete(
    cache_t *c, const void *key, size_t keylen, int64_t *deleted, int64_t *rev);

/** @brief Delete if the key's mod revision is @p expect; 0 expects the key
 *         to be absent. COALESCE_ECONFLICT otherwise. */
COALESCE_API int cache_delete_value(
    cache_t *c, const void *key, size_t keylen, int64_t expect, int64_t *rev);

/** @brief Delete every key starting with @p prefix (exactly those bytes; it
 *         must start with the cache's prefix). No older put of any such key
 *         can appear in memory afterwards. *deleted (may be NULL) counts the
 *         keys deleted. */
COALESCE_API int cache_delete_prefix(
    cache_t *c, const void *prefix, size_t len, int64_t *deleted, int64_t *rev);

/**
 * @brief Several operations as one store transaction: all or nothing, and
 *        readers see all their effects at once.
 * @return 0; COALESCE_ECONFLICT (a CREATE, UPDATE or DELETE_VALUE
 *         condition failed: nothing changed; not COALESCE_EEXIST, even for
 *         a CREATE); COALESCE_EINVAL (NULL @p ops, no ops, more than
 *         CACHE_TXN_MAX_OPS, an unknown type, a key twice or inside a
 *         DELETE_PREFIX of the same txn, and the common cases above:
 *         checked before the store is contacted); the common codes.
 */
COALESCE_API int
cache_txn(cache_t *c, const cache_txn_op_t *ops, size_t n, int64_t *rev);

/**
 * @brief Wait until the cache has applied everything up to @p rev (W >=
 *        @p rev), for instance a revision a write on another process
 *        returned.
 * @param timeout_ms < 0: no limit; 0: just check; > 0: at most that long.
 * @return 0; COALESCE_ETIMEDOUT; COALESCE_ENOTSTARTED (also when the cache
 *         is stopped during the wait); COALESCE_EINVAL (NULL @p c). W still
 *         rises while degraded.
 * Thread safety: yes. @since 0.2
 */
COALESCE_API int cache_wait_fresh(cache_t *c, int64_t rev, int timeout_ms);

/**
 * @brief Read the state and counters.
 * @param[out] out Filled with min(@p size, sizeof(cache_health_t)) bytes.
 * @param[in] size sizeof(*out) as the caller compiled it.
 * @return 0; COALESCE_EINVAL (NULL @p c or @p out).
 * Thread safety: yes. @since 0.2
 */
COALESCE_API int cache_health(cache_t *c, cache_health_t *out, size_t size);

#ifdef __cplusplus
}
#endif

#endif /* COALESCE_CACHE_H */

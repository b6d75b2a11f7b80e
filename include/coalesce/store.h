/*
 * Stores: the key/value backends a write-through cache (cache.h) keeps a
 * copy of. A store is an ops table with etcd v3's semantics:
 *
 *  - One global revision, raised by one for every successful write
 *    transaction. Each key has a create revision, a mod revision (the
 *    revision of its last change), a version (1 on create, +1 per put,
 *    reset by a delete) and a lease (0 for none).
 *  - range: keys in [key, end) in byte order at a revision, paged.
 *  - txn: compares, then puts and deletes, all or nothing, one revision.
 *  - watch: every change of [key, end) from a start revision, in revision
 *    order, on a thread the store owns; progress notifications; a start
 *    revision that was compacted cancels the watch with the compact
 *    revision.
 *  - leases: grant with a TTL, revoke (deletes the keys attached to it);
 *    expiry does the same.
 *
 * Hosts can write their own store: fill a cache_store_ops_t and embed a
 * cache_store_t as the first member of their object. Every op is blocking
 * and must be thread-safe. libcoalesce ships the in-memory store below (the
 * embedded default) and an etcd store (libcoalesce-etcd).
 *
 * Thread safety: every function here is thread-safe.
 */
#ifndef COALESCE_STORE_H
#define COALESCE_STORE_H

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

/** The ops table layout this header describes (cache_store_ops_t.version). */
#define CACHE_STORE_OPS_VERSION 1

/** Most operations in one transaction (etcd's default limit). */
#define CACHE_TXN_MAX_OPS 128

typedef struct cache_store cache_store_t;
typedef struct cache_watch cache_watch_t;

/** A key and its metadata, borrowed for the duration of a callback. */
typedef struct cache_kv {
    const void *key;
    size_t keylen;
    const void *value; /**< NULL for deletes. */
    size_t vallen;
    int64_t create_rev;
    int64_t mod_rev; /**< For a delete event: the delete's revision. */
    int64_t version;
    int64_t lease;
} cache_kv_t;

/** Event types. */
enum { CACHE_EV_PUT = 0, CACHE_EV_DELETE = 1 };

typedef struct cache_event {
    int type;      /**< CACHE_EV_PUT or CACHE_EV_DELETE. */
    cache_kv_t kv; /**< A delete carries key and mod_rev only. */
} cache_event_t;

/**
 * One watch response, borrowed for the duration of the callback. Exactly
 * one of:
 *  - events: n > 0, in revision order; a revision is never split between
 *    responses. @c revision is the store's revision when it was sent, which
 *    may be past the events' (a catch-up batch): use each event's mod_rev.
 *  - progress: n == 0 and no error: nothing changed in the range up to
 *    @c revision.
 *  - canceled: @c error < 0 and the watch is over (no further callback).
 *    COALESCE_ECOMPACTED with @c compact_revision: the start revision was
 *    compacted. COALESCE_EIO: the connection broke. COALESCE_EDECODE: the
 *    store could not decode what it received.
 */
typedef struct cache_watch_resp {
    int64_t revision;
    const cache_event_t *events;
    size_t n;
    int error;
    int64_t compact_revision;
} cache_watch_resp_t;

/** Receives watch responses on the watch's own store thread, one at a time,
 *  with no store lock held. Must not block long (the store's stream waits)
 *  and must not cancel its own watch. @p data is the watch op's. */
typedef void (*cache_watch_cb)(void *data, const cache_watch_resp_t *resp);

/** Receives one key of a range, borrowed for the call, on the thread that
 *  called range, with no store lock held; nonzero stops the range. */
typedef int (*cache_kv_cb)(void *data, const cache_kv_t *kv);

/** Compare targets and results (etcd's). */
enum {
    CACHE_CMP_VERSION = 0,
    CACHE_CMP_CREATE = 1,
    CACHE_CMP_MOD = 2,
    CACHE_CMP_VALUE = 3,
    CACHE_CMP_LEASE = 4
};
enum {
    CACHE_CMP_EQUAL = 0,
    CACHE_CMP_GREATER = 1,
    CACHE_CMP_LESS = 2,
    CACHE_CMP_NOT_EQUAL = 3
};

/** One compare of a transaction; a missing key has all numbers 0. */
typedef struct cache_cmp {
    const void *key;
    size_t keylen;
    int target;        /**< CACHE_CMP_VERSION .. CACHE_CMP_LEASE. */
    int result;        /**< CACHE_CMP_EQUAL .. CACHE_CMP_NOT_EQUAL. */
    int64_t number;    /**< For every target but VALUE. */
    const void *value; /**< For CACHE_CMP_VALUE. */
    size_t vallen;
} cache_cmp_t;

/** Operation types. */
enum { CACHE_OP_PUT = 0, CACHE_OP_DELETE = 1 };

/** One operation of a transaction. */
typedef struct cache_op {
    int type; /**< CACHE_OP_PUT or CACHE_OP_DELETE. */
    const void *key;
    size_t keylen;
    /** CACHE_OP_DELETE: delete [key, end) if endlen > 0, else key only. */
    const void *end;
    size_t endlen;
    const void *value; /**< CACHE_OP_PUT. */
    size_t vallen;
    int64_t lease; /**< CACHE_OP_PUT: 0 or a granted lease. */
} cache_op_t;

/** What one operation did, filled by the store when the txn succeeded. */
typedef struct cache_op_result {
    int64_t deleted;         /**< CACHE_OP_DELETE: keys deleted. */
    int has_prev;            /**< CACHE_OP_PUT: the key existed before. */
    int64_t prev_create_rev; /**< Its create revision then. */
    int64_t prev_version;    /**< Its version then. */
} cache_op_result_t;

/**
 * The ops a store provides. Every op returns 0 or a negative code:
 * COALESCE_EINVAL (bad request: NULL pointers with lengths, duplicate keys
 * in a txn, a put overlapping a delete range, more than CACHE_TXN_MAX_OPS
 * operations), COALESCE_ECOMPACTED (the revision asked for was compacted, or is
 * in the future), COALESCE_ENOENT (unknown lease), COALESCE_EIO
 * (unreachable), COALESCE_EBACKEND (any other store failure),
 * COALESCE_ENOMEM. The etcd store adds COALESCE_ETIMEDOUT, COALESCE_EACCES,
 * COALESCE_ECANCELED, COALESCE_ENOTSUP and COALESCE_EDECODE (etcd.h).
 * Pointers passed to an op are borrowed for the call; out-parameters not
 * marked "may be NULL" are required.
 */
typedef struct cache_store_ops {
    unsigned version; /**< CACHE_STORE_OPS_VERSION. cache_new() refuses
                           0; a later version (more methods appended)
                           is accepted, and only these methods are called. */
    /** Keys in [key, end) at revision @p rev (0: the latest) in byte
     *  order, at most @p limit (0: all), each passed to @p cb. An empty
     *  end means "key only"; an end of one 0 byte means "no upper bound"
     *  (etcd's convention, for prefixes of 0xff bytes). Sets *header_rev
     *  to the revision read and *more to 1 if keys were left out by the
     *  limit (both may be NULL). @p cb is not NULL. The same end
     *  conventions hold for deletes and watches. */
    int (*range)(cache_store_t *s,
                 const void *key,
                 size_t keylen,
                 const void *end,
                 size_t endlen,
                 int64_t rev,
                 size_t limit,
                 cache_kv_cb cb,
                 void *data,
                 int64_t *header_rev,
                 int *more);
    /** If every compare holds, apply every op at one new revision and set
     *  *succeeded to 1, *rev to that revision and results[i] (may be NULL)
     *  for each op; else change nothing, *succeeded 0, *rev the current
     *  revision. */
    int (*txn)(cache_store_t *s,
               const cache_cmp_t *cmps,
               size_t ncmps,
               const cache_op_t *ops,
               size_t nops,
               int *succeeded,
               int64_t *rev,
               cache_op_result_t *results);
    /** Watch [key, end) from @p start_rev (0: from the next revision);
     *  responses go to @p cb on a store thread until cancel or a canceling
     *  response. A compacted start revision is no error of this call: the
     *  watch starts and is canceled with COALESCE_ECOMPACTED. *out is the new
     *  watch, to be canceled (even after a canceling response: canceling
     *  frees it). */
    int (*watch)(cache_store_t *s,
                 const void *key,
                 size_t keylen,
                 const void *end,
                 size_t endlen,
                 int64_t start_rev,
                 cache_watch_cb cb,
                 void *data,
                 cache_watch_t **out);
    /** Stop a watch; returns once no callback runs or will run. Not from
     *  the watch's own callback. Frees the watch. */
    void (*watch_cancel)(cache_store_t *s, cache_watch_t *w);
    /** Grant a lease of at least @p ttl_ms milliseconds, > 0 (the store
     *  may round up: etcd to whole seconds, 2 s at least by default); its
     *  id goes to *id. */
    int (*lease_grant)(cache_store_t *s, int64_t ttl_ms, int64_t *id);
    /** Revoke a lease: its keys are deleted (COALESCE_ENOENT if unknown). */
    int (*lease_revoke)(cache_store_t *s, int64_t id);
    /** Free the store (every watch canceled first); cache_store_free()
     *  calls it. */
    void (*destroy)(cache_store_t *s);
} cache_store_ops_t;

/** The head of every store object. */
struct cache_store {
    const cache_store_ops_t *ops;
};

/**
 * @brief Free a store (NULL is a no-op). Caches using it must be freed
 *        first.
 * Thread safety: no other call on the store may overlap. @since 0.2
 */
COALESCE_API void cache_store_free(cache_store_t *s);

/* --- The in-memory store ---------------------------------------------------
 *
 * etcd's semantics in process: MVCC history kept back to the compact
 * revision (range and watch at any revision after it), leases with expiry
 * (milliseconds, rounded up to 1 ms, checked by a store thread), progress
 * notifications on demand, txn rules (a key at most once, a put overlapping
 * a delete range rejected, at most CACHE_TXN_MAX_OPS ops). Watches are
 * delivered by one store thread per watch, in revision order.
 */

/** In-memory store options; cache_memstore_opts_init() fills defaults. */
typedef struct cache_memstore_opts {
    size_t size; /**< sizeof(cache_memstore_opts_t). */
    /** Keep at most this many revisions of history (older ones are
     *  compacted automatically); 0 (default): keep until
     *  cache_memstore_compact(). */
    int64_t auto_compact_revs;
} cache_memstore_opts_t;

/** @brief Fill the defaults and set o->size; NULL is a no-op. @since 0.2 */
COALESCE_API void cache_memstore_opts_init(cache_memstore_opts_t *o);

/**
 * @brief Create an in-memory store; it starts its lease-expiry thread.
 * @param[out] out New store, freed with cache_store_free(); untouched on
 *             failure.
 * @param[in] opts Copied; NULL for the defaults. opts->size must be
 *            sizeof(cache_memstore_opts_t).
 * @return 0; COALESCE_EINVAL (NULL @p out, bad opts->size, negative
 *         auto_compact_revs); COALESCE_ENOMEM (also: no thread).
 * @since 0.2
 */
COALESCE_API int cache_memstore_new(cache_store_t **out,
                                    const cache_memstore_opts_t *opts);

/** @brief The store's current revision (1 on a new store, as in etcd: the
 *         first write makes 2), or COALESCE_EINVAL (negative) if @p s is NULL
 *         or not an in-memory store. @since 0.2 */
COALESCE_API int64_t cache_memstore_revision(cache_store_t *s);

/**
 * @brief Compact history up to @p rev: reads and watches from before it
 *        fail with COALESCE_ECOMPACTED.
 * @return 0; COALESCE_ECOMPACTED (already compacted there, @p rev <= 0, or a
 *         future revision); COALESCE_EINVAL (NULL or not an in-memory store).
 * @since 0.2
 */
COALESCE_API int cache_memstore_compact(cache_store_t *s, int64_t rev);

/* Test hooks: reproduce what a real etcd and its network do to a watch.
 * Each returns COALESCE_EINVAL if @p s is NULL or not an in-memory store.
 * @since 0.2 for all of them. */

/**
 * @brief Hold watch deliveries (1) or deliver them again (0). While held,
 *        responses queue up per watch; releasing delivers the queue one
 *        revision per response. @return 0; COALESCE_EINVAL.
 */
COALESCE_API int cache_memstore_hold(cache_store_t *s, int hold);

/** How cache_memstore_flush() delivers what is held. */
enum {
    CACHE_FLUSH_EACH = 0,  /**< One response per revision. */
    CACHE_FLUSH_BATCH = 1, /**< All in one response stamped with the
                                current revision (etcd's catch-up). */
    CACHE_FLUSH_DROP = 2   /**< Discard (what a cut connection loses);
                                the watch goes on after them. */
};

/** @brief Deliver (or drop) what is held now; holding goes on.
 *  @return 0; COALESCE_EINVAL (also an unknown @p how); COALESCE_ENOMEM
 *          (CACHE_FLUSH_BATCH: nothing was flushed). */
COALESCE_API int cache_memstore_flush(cache_store_t *s, int how);

/**
 * @brief End every watch with a canceling response carrying @p error
 *        (COALESCE_EIO: a cut connection; COALESCE_EDECODE: garbage
 *        received), after what was already delivered; held responses are
 *        lost, as a cut connection loses them. The watches must still be
 *        canceled. @return 0; COALESCE_EINVAL (also @p error >= 0).
 */
COALESCE_API int cache_memstore_cut(cache_store_t *s, int error);

/** @brief Send a progress notification to every watch (held if holding).
 *  @return 0; COALESCE_EINVAL; COALESCE_ENOMEM (none was sent). */
COALESCE_API int cache_memstore_progress(cache_store_t *s);

/** @brief Number of watches not yet canceled (tests check nothing leaks),
 *         or COALESCE_EINVAL. */
COALESCE_API int cache_memstore_watches(cache_store_t *s);

#ifdef __cplusplus
}
#endif

#endif /* COALESCE_STORE_H */

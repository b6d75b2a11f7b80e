/*
 * Flight groups: collapsed forwarding with streaming, zero-copy fan-out.
 *
 * Concurrent flight_do() calls for the same key share one upstream fetch.
 * The first caller is the leader: its fetch callback runs once and produces
 * one stream through a writer: an optional meta blob (opaque to the library;
 * hosts put the status line and headers there), body bytes, then an end
 * status. The stream is stored once, as an append-only chain of immutable,
 * reference-counted segments. Every caller, leader included, gets its own
 * reader: a cursor into that chain.
 *
 * Guarantees
 *  - No reader waits for another reader and the writer never waits for a
 *    reader. A slow reader only holds on to segments; a reader more than
 *    max_lag bytes behind the writer is detached with FLIGHT_ELAGGED and keeps
 *    the offset it reached, so the host can resume that client elsewhere
 *    (for instance with a range request).
 *  - A reader that closes drops its cursor and nothing else; the fetch goes
 *    on for the others. When no reader is attached any more (all closed or
 *    detached) the writer can tell (flight_writer_readers() returns 0), and
 *    with FLIGHT_ORPHAN_CANCEL the flight ends with FLIGHT_ECANCELED, which
 *    the writer's next call returns, so the host can stop the upstream.
 *  - A flight is joinable for its whole life, headers and body, as long as
 *    its first byte is still held (retain_limit): a late joiner reads from
 *    byte 0. After the end, or once byte 0 has been let go, the key is free
 *    and the next caller starts a new flight. The group is not a cache.
 *  - The end status reaches every reader exactly once, after every byte that
 *    was written before it: once a reader has returned its end status
 *    (COALESCE_EOF or an error), every later read or peek returns the same
 *    status and never any further bytes (flight_meta() keeps returning 0
 *    once the meta was known).
 *  - Nobody hangs: a fetch callback that fails, or a writer released without
 *    flight_end(), ends the flight with an error for every reader.
 *  - No artificial delay: a leader without waiters pays for a hash lookup and
 *    two short critical sections, nothing more.
 *
 * Memory bound. A reader is detached once it is more than max_lag bytes
 * behind the start of the newest write (so one large write detaches nobody
 * who had caught up). A flight therefore holds at most
 * max(max_lag, retain_limit) bytes plus two writes (the one the slowest
 * reader is inside and the newest), plus about 100 bytes of bookkeeping per
 * write. One exception: while the leader's fetch callback runs on the
 * leader's thread, the leader's own reader cannot read, so it is not
 * detached for that backlog, then or afterwards (it is allowed max_lag on
 * top of what the callback wrote before returning). Hosts producing large
 * bodies should write them from another thread or after returning
 * FLIGHT_FETCH_ASYNC (the usual case with an event loop).
 *
 * Keys are bytes chosen by the host (NUL bytes allowed, 1 byte to 1 MiB).
 * Put into the key everything that changes the response's shape: method
 * class, variant (Vary) values, and so on. A HEAD and a GET are not the same
 * flight unless the host says so.
 *
 * Range flights (flight_do_range). Concurrent byte-range requests for one
 * object share upstream fetches so that every byte is fetched at most once
 * while it is in flight, and nothing nobody asked for is fetched beyond
 * chunk rounding. The object is cut into chunks of chunk_size bytes. A call
 * joins every chunk of its range that is in flight and, for each maximal run
 * of chunks that is not, leads one upstream fetch covering exactly that run
 * (its fetch callback is told the byte range). Registration happens in one
 * critical section per call, so no caller can attach to a fetch that does
 * not cover it. The caller's reader delivers exactly its own bytes: its first
 * byte as soon as it arrives, its end as soon as its last byte arrives,
 * whatever the other callers asked for. Before body bytes, a range writer
 * reports what upstream actually returned (flight_set_range()); a reply that
 * does not match the request or the object's other chunks (wrong start,
 * short, a full body for a partial request, another validator or size)
 * fails the affected readers with FLIGHT_EMISMATCH, and so does a body that
 * ends early: a range reader never delivers misaligned or silently short
 * bytes. A reader whose bytes go past the last one its fetch replied gets
 * FLIGHT_EMISMATCH once that fetch has written all it reported, whatever
 * the fetch ends with later (an error, or a writer released unended). Range and
 * object flights of the same key are separate.
 *
 * Lifecycle
 *   flight_group_new() -> flight_do() from any threads -> readers read and
 *   flight_reader_close(); writers flight_end() -> flight_group_close().
 *   The group is freed when it is closed and its last flight is gone.
 *
 * Thread safety: a flight_group_t is thread-safe; locks are internal, sharded
 * by key hash, and never held while a user callback runs. A flight_reader_t
 * and a flight_writer_t belong to one thread at a time; they may be handed
 * from thread to thread.
 */
#ifndef COALESCE_FLIGHT_H
#define COALESCE_FLIGHT_H

#include "buf.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct flight_group flight_group_t;
typedef struct flight_reader flight_reader_t;
typedef struct flight_writer flight_writer_t;

/** The reader fell more than max_lag bytes behind; see flight_reader_offset. */
#define FLIGHT_ELAGGED COALESCE_ELAGGED
/** A waiter's deadline (wait_timeout_ms) passed before the meta arrived. */
#define FLIGHT_ETIMEDOUT COALESCE_ETIMEDOUT
/** Every reader has gone and the group's orphan policy is CANCEL: what the
 *  writer's calls return (no reader is left to see it). */
#define FLIGHT_ECANCELED COALESCE_ECANCELED
/** A range starts at or after the end of the object (HTTP 416). */
#define FLIGHT_ERANGE COALESCE_ERANGE
/** The upstream's reply does not match the request or the object's other
 *  chunks (range, size or validator), or its body ended early. */
#define FLIGHT_EMISMATCH COALESCE_EMISMATCH

/** For flight_do_range(): the range goes to the end of the object. For
 *  flight_set_range(): upstream returned no bytes (416). */
#define FLIGHT_RANGE_END UINT64_MAX
/** For sizes: the object's total size is not known. */
#define FLIGHT_SIZE_UNKNOWN UINT64_MAX

/** For max_lag and retain_limit: no limit. */
#define FLIGHT_UNLIMITED UINT64_MAX

/** What the fetch callback did with its writer (besides negative codes). */
typedef enum flight_fetch_result {
    /** The callback is done with the writer; the library releases it. */
    FLIGHT_FETCH_DONE = 0,
    /** The callback keeps the writer and will call flight_end() and
     *  flight_writer_release() later, from any thread. */
    FLIGHT_FETCH_ASYNC = 1
} flight_fetch_result_t;

/** What happens when the last reader leaves before the end. */
typedef enum flight_orphan_policy {
    /** Writes go on succeeding (background fill); flight_writer_readers()
     *  returns 0 so the host can decide. */
    FLIGHT_ORPHAN_CONTINUE = 0,
    /** The flight ends with FLIGHT_ECANCELED and the next write returns it. */
    FLIGHT_ORPHAN_CANCEL = 1
} flight_orphan_policy_t;

/**
 * @brief The leader's fetch.
 *
 * Runs once per flight, on the leader's thread, inside flight_do(), with no
 * library lock held. It may produce the whole stream there (blocking I/O)
 * and return FLIGHT_FETCH_DONE, or start the work and return
 * FLIGHT_FETCH_ASYNC and feed the writer later from any thread.
 *
 * @param[in] w Borrowed writer; valid until flight_writer_release(), which
 *            the library calls itself unless the callback returned
 *            FLIGHT_FETCH_ASYNC.
 * @param[in] data The pointer given to flight_do().
 * @return FLIGHT_FETCH_DONE, FLIGHT_FETCH_ASYNC, or a negative code: if the
 *         stream was not ended yet, the flight ends with that code for every
 *         reader, and the writer is released. FLIGHT_FETCH_DONE without
 *         flight_end() ends it with COALESCE_EUPSTREAM; any other positive
 *         value with COALESCE_EINVAL.
 *
 * It may call any library function. flight_do() for the same key joins this
 * very flight: that reader must not be read with a wait from here, since
 * nobody else writes.
 */
typedef int (*flight_fetch_cb)(flight_writer_t *w, void *data);

/**
 * @brief A range leader's fetch: get bytes [@p first, @p last] from upstream.
 *
 * As flight_fetch_cb, once per run of chunks the caller leads. @p first is
 * chunk-aligned; @p last is the run's last byte, clipped to the object's end
 * when the size is known, or FLIGHT_RANGE_END ("to the end": ask for
 * "bytes=first-"). Before any body byte the callback (or whoever holds the
 * writer) must call flight_set_range() with what upstream returned. The body
 * is the bytes of that range, in order; flight_end(w, 0) after the last one.
 * Runs on the caller's thread, inside flight_do_range(), with no library
 * lock held. @return As flight_fetch_cb.
 */
typedef int (*flight_range_fetch_cb)(flight_writer_t *w,
                                     uint64_t first,
                                     uint64_t last,
                                     void *data);

/**
 * @brief One-shot readiness notification, armed by flight_reader_notify().
 *
 * Runs on whichever thread made the reader ready (usually the writer's), with
 * no library lock held, never inside a call on @p r itself. That can be
 * inside that thread's call on another object (flight_write(), flight_end(),
 * flight_writer_release(), a read or flight_reader_close() of another
 * reader...), so it must not block nor take a lock the thread may hold
 * around such calls: signal the reader's owner (uv_async_send(), a condition
 * variable, an eventfd) and return. The only reader function it may call on
 * @p r is flight_reader_close(), and only if the reader's owner is not using
 * it at that moment (typically: the owner is this thread). When more than 64
 * readers of one flight are armed at once, a reader that re-arms quickly may
 * get a spurious notification: read, and re-arm if nothing was there.
 */
typedef void (*flight_notify_cb)(flight_reader_t *r, void *data);

/** Group options. Initialise with flight_opts_init(), then change fields. */
typedef struct flight_opts {
    size_t size; /**< sizeof(flight_opts_t), set by flight_opts_init(). */
    /** Bytes a reader may fall behind the writer before it is detached
     *  with FLIGHT_ELAGGED. Default (and 0) 64 MiB; FLIGHT_UNLIMITED for
     *  none. */
    uint64_t max_lag;
    /** Bytes of the body prefix kept so that late joiners can read from
     *  byte 0; past it the flight is no longer joinable. Default (and 0)
     *  16 MiB; never more than max_lag (clamped). */
    uint64_t retain_limit;
    /** A waiter that has no meta this many milliseconds after joining is
     *  detached with FLIGHT_ETIMEDOUT. 0 (default) means no deadline. */
    uint32_t wait_timeout_ms;
    /** Number of lock shards, rounded up to a power of two, at most 4096.
     *  Default (and 0) 64. */
    uint32_t shards;
    /** A flight_orphan_policy_t. Default FLIGHT_ORPHAN_CONTINUE. */
    int orphan_policy;
    /** Range flights: bytes per chunk, the unit of sharing. Default (and
     *  0) 1 MiB. Memory costs about 200 bytes per upstream range fetch and
     *  per range reader, plus one cursor per chunk being written. */
    uint64_t chunk_size;
    /** Range flights: a leader waits this many milliseconds before its
     *  fetch so that ranges arriving meanwhile go out in the same upstream
     *  request (flight_do_range() blocks that long). Default 0: no wait. */
    uint32_t range_linger_ms;
    /** Range flights, with range_linger_ms: a range joins a lingering fetch
     *  only if at most this many bytes (whole chunks) nobody asked for lie
     *  between them. Default 0: touching or overlapping chunks only. */
    uint64_t range_max_gap;
    /** Range flights, with range_linger_ms: a lingering fetch grows to at
     *  most this many bytes. Default (and 0) 64 MiB. */
    uint64_t range_max_span;
} flight_opts_t;

/** Per-group counters, as returned by flight_group_stats(). */
typedef struct flight_stats {
    uint64_t flights_started; /**< Fetch callbacks run. */
    uint64_t joins;           /**< flight_do() calls that joined a flight. */
    uint64_t timeouts;        /**< Waiters detached by wait_timeout_ms. */
    uint64_t errors;          /**< Flights that ended with an error. */
    uint64_t lagged;          /**< Readers detached by max_lag. */
    uint64_t bytes_written;   /**< Body bytes accepted from writers. */
    uint64_t bytes_delivered; /**< Body bytes consumed by readers. */
    uint64_t flights_active;  /**< Flights not yet ended (gauge). */
    uint64_t readers_open;    /**< Readers not yet closed (gauge). */
    uint64_t segments_held;   /**< Segments alive in all flights (gauge). */
    uint64_t bytes_held;      /**< Body bytes in those segments (gauge). */
    uint64_t orphaned;        /**< Flights whose last reader left early. */
    /* Range flights. flights_started and joins above count object
     * flights only; errors also counts failed range fetches; the gauges
     * count range data too (a chunk being written is one of
     * flights_active, a range reader one of readers_open). */
    uint64_t range_fetches; /**< Range fetch callbacks run. */
    uint64_t chunk_joins;   /**< Chunks of calls served by another caller's
                                 fetch, counted as each chunk starts. */
    uint64_t
        range_bytes_requested;    /**< Bytes of the calls' ranges (clipped
                                       to the object once its size is known). */
    uint64_t range_bytes_fetched; /**< Body bytes from range writers. */
    uint64_t range_mismatches;    /**< Range fetches failed validation. */
} flight_stats_t;

/**
 * @brief Fill @p opts with the defaults and set opts->size. NULL is a no-op.
 * Thread safety: yes. @since 0.1
 */
COALESCE_API void flight_opts_init(flight_opts_t *opts);

/**
 * @brief Create a flight group.
 * @param[out] out New group on success; untouched on failure.
 * @param[in] opts Copied; NULL for the defaults. opts->size must be
 *            sizeof(flight_opts_t) (flight_opts_init() sets it).
 * @return 0; COALESCE_EINVAL (NULL @p out, bad size or policy);
 *         COALESCE_ENOMEM.
 * Thread safety: yes. @since 0.1
 */
COALESCE_API int flight_group_new(flight_group_t **out,
                                  const flight_opts_t *opts);

/**
 * @brief Close a group: it admits no new flight.
 *
 * Flights in progress are not disturbed: their readers and writers stay
 * valid and must still be closed and released. The group's memory is freed
 * when the last of them is gone. flight_do() calls made from a fetch or
 * notify callback of a flight still alive return COALESCE_ECLOSING; any
 * other call must not overlap or follow this one (the group may be freed
 * before it returns).
 * NULL is a no-op. Closing twice is a usage error (the group may already be
 * freed).
 * Thread safety: yes.
 * @since 0.1
 */
COALESCE_API void flight_group_close(flight_group_t *g);

/**
 * @brief Attach a user pointer (never read by the library). NULL @p g is a
 *        no-op.
 * Thread safety: a plain store, not synchronised with
 * flight_group_get_data(): set it before the group is shared. @since 0.1
 */
COALESCE_API void flight_group_set_data(flight_group_t *g, void *data);
/**
 * @brief The user pointer, or NULL (also for a NULL group).
 * Thread safety: yes, once set_data is no longer called. @since 0.1
 */
COALESCE_API void *flight_group_get_data(const flight_group_t *g);

/**
 * @brief Read the group's counters.
 * @param[out] out Filled with min(@p size, sizeof(flight_stats_t)) bytes.
 * @param[in] size sizeof(*out) as the caller compiled it.
 * @return 0; COALESCE_EINVAL for NULL arguments.
 * Thread safety: yes; each shard is read consistently, the sum is not a
 * single snapshot under concurrent traffic. @since 0.1
 */
COALESCE_API int
flight_group_stats(flight_group_t *g, flight_stats_t *out, size_t size);

/**
 * @brief Join the flight for @p key, or start one as its leader.
 *
 * If a flight for the key is in progress and still holds its first byte,
 * the caller joins it. Otherwise the caller becomes the leader: @p fetch
 * runs once, on this thread, before flight_do() returns. Either way the
 * caller gets a reader positioned at byte 0. A failing fetch is reported
 * through the readers (leader's included), not through this return value.
 *
 * @param[in] g The group (borrowed).
 * @param[in] key Copied; 1 byte to 1 MiB of arbitrary bytes.
 * @param[in] fetch Called only if this caller leads; not NULL.
 * @param[in] data Passed to @p fetch; borrowed.
 * @param[out] out New reader on success, to be closed with
 *             flight_reader_close(); untouched on failure.
 * @return 0; COALESCE_EINVAL (NULL argument, bad key length);
 *         COALESCE_ECLOSING (group closed); COALESCE_ENOMEM.
 * Callback: on an error return @p fetch was not called.
 * Thread safety: yes. @since 0.1
 */
COALESCE_API int flight_do(flight_group_t *g,
                           const void *key,
                           size_t keylen,
                           flight_fetch_cb fetch,
                           void *data,
                           flight_reader_t **out);

/**
 * @brief Read bytes [@p first, @p last] of an object, sharing upstream fetches
 *        with concurrent calls for the same key.
 *
 * Joins every chunk of the range already in flight; leads one fetch per run
 * of chunks that is not (@p fetch runs once per such run, on this thread,
 * before the call returns, in increasing order). With range_linger_ms the
 * call first waits that long if it leads anything. The reader delivers
 * exactly bytes @p first .. @p last (clipped to the object's end); errors
 * of the fetches it depends on come through the reader, each once.
 *
 * A caller may hold any number of readers, on one object or several, and
 * read them in any order: nothing waits for a reader, so nothing deadlocks.
 *
 * @param[in] key Copied; 1 byte to 1 MiB; a namespace of its own (object
 *            flights with the same key are unrelated).
 * @param[in] first First byte wanted, below 2^63 (HTTP's limit too).
 * @param[in] last Last byte wanted (inclusive), >= @p first and below 2^63,
 *            or FLIGHT_RANGE_END.
 * @param[in] fetch Called for each run this caller leads; not NULL.
 * @param[in] data Passed to @p fetch; borrowed.
 * @param[out] out New reader, closed with flight_reader_close().
 * @return 0; FLIGHT_ERANGE (@p first is at or past the end of the object
 *         as a fetch still in flight reported it; otherwise the reader
 *         returns it once known); COALESCE_EINVAL (NULL argument, bad key
 *         length, @p last < @p first, offsets out of range);
 *         COALESCE_ECLOSING (group closed); COALESCE_ENOMEM.
 * Callback: on an error return @p fetch was not called. A run found to lie
 * past the object's end while the call lingered is not fetched (its readers
 * get FLIGHT_ERANGE).
 * Thread safety: yes. @since 0.2
 */
COALESCE_API int flight_do_range(flight_group_t *g,
                                 const void *key,
                                 size_t keylen,
                                 uint64_t first,
                                 uint64_t last,
                                 flight_range_fetch_cb fetch,
                                 void *data,
                                 flight_reader_t **out);

/* --- Writer (the leader's side) ----------------------------------------- */

/**
 * @brief Set the meta blob (status line, headers...), once, before the body.
 *
 * Waiters' flight_meta() calls return as soon as this is set (or the first
 * body byte or the end arrives). Joiners' wait_timeout_ms stops applying.
 * @param[in] meta Copied; may be NULL when @p len is 0 (readers then get an
 *            empty, non-NULL meta).
 * @return 0; COALESCE_EINVAL (NULL writer, meta already set, body already
 *         started, stream ended); FLIGHT_ECANCELED (orphaned, CANCEL policy);
 *         COALESCE_ENOMEM (nothing changed).
 * Thread safety: writer's owner thread. @since 0.1
 */
COALESCE_API int
flight_set_meta(flight_writer_t *w, const void *meta, size_t len);

/**
 * @brief Report what upstream returned for a range fetch; mandatory before
 *        its first body byte (the meta may come before or after).
 *
 * The reply must match the request: @p first equal to the first byte asked
 * for, @p last equal to the last byte asked for clipped to the object's end,
 * @p total and @p validator equal to those of the object's other fetches in
 * flight. When none is in flight, a different size or validator means the
 * object changed: the reply defines it anew, and a reader whose range
 * straddles the change gets FLIGHT_EMISMATCH where the new version starts. An
 * HTTP host reports a 206's Content-Range and ETag; a 200 (whole body) as first
 * 0 and last size - 1, which mismatches unless that is what was asked; a 416 as
 * first and last FLIGHT_RANGE_END with the size from "bytes (star)/size". If @p
 * total is unknown and @p last is before the last byte asked for, or the
 * request was open-ended, the object is taken to end at @p last. A reply
 * that contradicts the request or itself (bytes past its own size, a 416
 * whose size is past the first byte asked for) fails this fetch and changes
 * nothing the library knows of the object.
 * @param[in] total Object size, or FLIGHT_SIZE_UNKNOWN.
 * @param[in] validator Copied; an opaque strong validator (ETag,
 *            Last-Modified...); NULL when @p vlen is 0. Compared bytewise.
 * @return 0: write the body, last - first + 1 bytes, then flight_end(w, 0).
 *         FLIGHT_EMISMATCH or FLIGHT_ERANGE: the fetch has ended with that
 *         code for the readers that needed it; stop (release the writer).
 *         COALESCE_EINVAL (NULL writer, not a range writer, already
 *         reported, body or end already there, @p last < @p first, only one
 *         of @p first and @p last FLIGHT_RANGE_END, offsets or @p total past
 *         2^63, NULL @p validator with @p vlen > 0); FLIGHT_ECANCELED;
 *         COALESCE_ENOMEM (nothing changed).
 * Thread safety: writer's owner thread. @since 0.2
 */
COALESCE_API int flight_set_range(flight_writer_t *w,
                                  uint64_t first,
                                  uint64_t last,
                                  uint64_t total,
                                  const void *validator,
                                  size_t vlen);

/**
 * @brief Append body bytes, copying them. Never waits for readers.
 * @param[in] data Copied; may be NULL when @p len is 0.
 * @return 0 (a 0-byte write appends nothing, but returns the codes below
 *         for an ended or canceled writer); COALESCE_EINVAL (NULL arguments,
 *         stream ended; range writer before flight_set_range());
 *         FLIGHT_ECANCELED (orphaned, CANCEL policy); FLIGHT_EMISMATCH
 *         (range writer: more bytes than reported; the fetch has ended);
 *         COALESCE_ENOMEM (nothing was appended; the writer may retry).
 * Thread safety: writer's owner thread. @since 0.1
 */
COALESCE_API int flight_write(flight_writer_t *w, const void *data, size_t len);

/**
 * @brief Append [off, off + len) of @p buf without copying.
 *
 * On success the buffer becomes published (immutable) and the flight takes
 * its own reference; the caller keeps its reference and must still drop it.
 * On failure the buffer is untouched.
 * @param[in] buf Borrowed (the library takes a reference); not NULL.
 * @return As flight_write(); COALESCE_EINVAL also if the slice is outside
 *         the buffer.
 * Thread safety: writer's owner thread. @since 0.1
 */
COALESCE_API int flight_write_buf(flight_writer_t *w,
                                  coalesce_buf_t *buf,
                                  size_t off,
                                  size_t len);

/**
 * @brief End the stream: 0 for a complete body, a negative code for a failed
 *        one. Readers get it after every byte written before it.
 *
 * Two codes that readers use for a live stream are translated: COALESCE_EOF
 * counts as 0 and COALESCE_EAGAIN becomes COALESCE_EUPSTREAM (the same
 * holds for a fetch callback's return value). For a range writer, 0 before
 * all the reported bytes were written ends the fetch with FLIGHT_EMISMATCH
 * (a short body is an error, never an EOF) and is returned.
 *
 * The key becomes free at once: the next flight_do() starts a new flight.
 * The writer stays valid (later writes return COALESCE_EINVAL, or
 * FLIGHT_ECANCELED after a cancel) until it is released.
 * @return 0; COALESCE_EINVAL (NULL writer, positive status, already ended);
 *         FLIGHT_ECANCELED if the flight had already been canceled (the
 *         readers got that).
 * Thread safety: writer's owner thread. @since 0.1
 */
COALESCE_API int flight_end(flight_writer_t *w, int status);

/**
 * @brief Number of readers still attached to the writer's flight: open and
 *        not detached (0: nobody is receiving any more, or a NULL writer).
 *        For a range writer: range readers still waiting for bytes of its
 *        fetch.
 * Thread safety: writer's owner thread. @since 0.1
 */
COALESCE_API unsigned flight_writer_readers(flight_writer_t *w);

/**
 * @brief Release a writer kept with FLIGHT_FETCH_ASYNC.
 *
 * If the stream was not ended, it ends with COALESCE_EUPSTREAM for every
 * reader: a forgotten writer never leaves anyone hanging. @p w must not be
 * used afterwards. NULL is a no-op. A fetch callback may also release its
 * writer itself, before returning either result.
 * Thread safety: writer's owner thread. @since 0.1
 */
COALESCE_API void flight_writer_release(flight_writer_t *w);

/* --- Reader (every caller's side) --------------------------------------- */

/*
 * Timeouts of reader calls: timeout_ms < 0 waits as long as it takes, 0 never
 * waits, > 0 waits at most that long. When the wait ends with nothing to
 * return the call returns COALESCE_EAGAIN and the reader is unchanged.
 * A waiter's deadline (wait_timeout_ms) is separate: it detaches the reader
 * with FLIGHT_ETIMEDOUT, for good.
 */

/*
 * Range readers (from flight_do_range()) work with every reader function.
 * Their "meta" is the meta of the fetch serving their first byte, known once
 * that fetch reported its range (flight_set_range()), so flight_meta() is
 * the point to call flight_reader_range() and build a response. Their
 * offset counts bytes delivered from their first byte. Lag is counted
 * across chunks: a range reader more than max_lag bytes behind the newest
 * write it will read is detached with FLIGHT_ELAGGED (a write past its last
 * byte does not count). The leader exemption above holds for range
 * flights too: a caller whose fetch callback is running on its thread is
 * not detached for what that callback wrote.
 */

/**
 * @brief Wait until the meta is known.
 * @param[out] meta Borrowed, valid until the reader is closed; NULL when the
 *             writer set none. May be NULL if not wanted.
 * @param[out] len Its length; may be NULL.
 * @return 0; COALESCE_EAGAIN (timeout); the flight's error if it ended with
 *         one before the meta stage (a range reader: the error of the fetch
 *         serving its first byte); FLIGHT_ETIMEDOUT; range readers only:
 *         FLIGHT_ERANGE and FLIGHT_ELAGGED; COALESCE_EINVAL for a NULL
 *         reader. Errors after the meta stage (the end, a detach) show in
 *         reads, not here.
 * Thread safety: reader's owner thread. @since 0.1
 */
COALESCE_API int
flight_meta(flight_reader_t *r, int timeout_ms, const void **meta, size_t *len);

/**
 * @brief Copy up to @p cap bytes from the reader's position.
 * @param[out] buf At least @p cap bytes; borrowed.
 * @param[out] nread Bytes copied (> 0 when 0 is returned).
 * @return 0; COALESCE_EOF at the clean end; the flight's error status
 *         (what the writer ended it with, translated as flight_end() says;
 *         COALESCE_EUPSTREAM for a writer that never ended it; for range
 *         readers also FLIGHT_EMISMATCH and FLIGHT_ERANGE); FLIGHT_ELAGGED;
 *         FLIGHT_ETIMEDOUT; COALESCE_EAGAIN (timeout); COALESCE_EINVAL
 *         (NULL argument, @p cap 0). Bytes copied before a detach are
 *         returned first (0); the status comes with the next call.
 * Thread safety: reader's owner thread. @since 0.1
 */
COALESCE_API int flight_read(
    flight_reader_t *r, void *buf, size_t cap, int timeout_ms, size_t *nread);

/**
 * @brief Borrow the next bytes without copying (zero-copy read).
 *
 * Returns the rest of the current segment. Nothing moves until
 * flight_consume().
 * @param[out] data Borrowed, valid until the next consume, read or close on
 *             this reader; take a reference on @p owner to keep it longer.
 * @param[out] len Bytes at @p data (> 0 when 0 is returned).
 * @param[out] owner The buffer holding them (borrowed); pass NULL if not
 *             wanted. @p data and @p len must not be NULL.
 * @return As flight_read().
 * Thread safety: reader's owner thread. @since 0.1
 */
COALESCE_API int flight_peek(flight_reader_t *r,
                             int timeout_ms,
                             const void **data,
                             size_t *len,
                             coalesce_buf_t **owner);

/**
 * @brief Advance past @p n bytes returned by the last flight_peek().
 * @return 0; COALESCE_EINVAL (NULL reader, or @p n more than that peek
 *         returned and not yet consumed);
 *         the reader's terminal status if it was detached meanwhile (the
 *         peeked bytes stay valid until the next call).
 * Thread safety: reader's owner thread. @since 0.1
 */
COALESCE_API int flight_consume(flight_reader_t *r, size_t n);

/**
 * @brief Arm a one-shot callback for when the reader has something new.
 *
 * "Something new" is bytes past the reader's position, the meta, the end
 * status or a detach. The callback fires once and is disarmed; arm it again
 * after reading. Arming replaces a previous arming.
 * @return 0 when armed; 1 if the reader is ready now (nothing armed: read
 *         again); COALESCE_EINVAL (NULL reader or callback).
 * Callback: at most once per successful arming; never after
 *         flight_reader_close() has returned.
 * Thread safety: reader's owner thread. @since 0.1
 */
COALESCE_API int
flight_reader_notify(flight_reader_t *r, flight_notify_cb cb, void *data);

/**
 * @brief Milliseconds left before the waiter's deadline, for hosts that arm
 *        their own timer; -1 when there is no pending deadline (none set,
 *        leader, meta already known, reader ended, or NULL); 0 once it has
 *        passed. Checking happens in reader calls.
 * Thread safety: reader's owner thread. @since 0.1
 */
COALESCE_API int64_t flight_reader_deadline_ms(flight_reader_t *r);

/**
 * @brief Body offset the reader has consumed up to. After FLIGHT_ELAGGED it
 *        is where a resumed (range) request should start. 0 for NULL.
 * Thread safety: reader's owner thread. @since 0.1
 */
COALESCE_API uint64_t flight_reader_offset(const flight_reader_t *r);

/**
 * @brief The range a range reader delivers, once known.
 * @param[out] first First byte (as asked). May be NULL.
 * @param[out] last Last byte: as asked, clipped to the object's end; or
 *             FLIGHT_RANGE_END while an open range's end is unknown. May be
 *             NULL.
 * @param[out] total Object size, or FLIGHT_SIZE_UNKNOWN. May be NULL.
 * @return 0; COALESCE_EAGAIN until the fetch serving the first byte has
 *         reported its range, or another fetch of the object its size
 *         (call after flight_meta()); FLIGHT_ERANGE when
 *         the range starts past the end (*total is set then); that fetch's
 *         error if it failed before reporting; COALESCE_EINVAL (NULL
 *         reader, or an object flight's reader).
 * Thread safety: reader's owner thread. @since 0.2
 */
COALESCE_API int flight_reader_range(flight_reader_t *r,
                                     uint64_t *first,
                                     uint64_t *last,
                                     uint64_t *total);

/**
 * @brief 1 if this reader joined a flight another caller leads, 0 for the
 *        leader (or NULL). A range reader is shared if any of its chunks
 *        came from another caller's fetch.
 * Thread safety: reader's owner thread. @since 0.1
 */
COALESCE_API int flight_reader_shared(const flight_reader_t *r);

/**
 * @brief Close a reader at any point: its cursor and its references go, the
 *        flight goes on for the others. NULL is a no-op.
 *
 * If a notify callback is running on another thread, waits for it to return.
 * May be called from inside the reader's own notify callback.
 * Closing twice is a usage error (the reader is freed).
 * Thread safety: reader's owner thread. @since 0.1
 */
COALESCE_API void flight_reader_close(flight_reader_t *r);

#ifdef __cplusplus
}
#endif

#endif /* COALESCE_FLIGHT_H */

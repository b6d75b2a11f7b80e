/*
 * libuv adapter: flight readers served on a libuv loop.
 *
 * A flight_uv_t binds the library to one uv_loop_t. A reader started on it
 * delivers its meta, its body and its end status through callbacks that run
 * on that loop's thread, whatever thread the writer runs on: the flight's
 * notify callback queues the reader and wakes the loop through one
 * uv_async_t per flight_uv_t. Wake-ups are coalesced: one loop turn serves
 * every reader made ready since the last, so a write seen by 1000 readers on
 * a loop costs the writer one wake-up, not 1000.
 *
 * Body bytes are borrowed segments of the flight's own buffers (zero copy):
 * valid until the data callback returns, or longer with a reference on the
 * owner buffer (for instance until a uv_write() completes). Within a loop
 * turn, readers are served round robin, 64 KiB at a time (a larger segment
 * comes in pieces), so the first bytes of a flight reach all of its readers
 * before any gets more. A reader gets at most FLIGHT_UV_BATCH bytes per turn
 * and all readers together about 16 MiB, so that a large backlog cannot
 * starve the loop's other work.
 *
 * Backpressure: flight_uv_read_stop() (typically from the data callback,
 * when the client's socket is not keeping up) and flight_uv_read_start()
 * again later. A stopped reader holds segments, nothing else; the group's
 * max_lag bounds how many, after which the end callback gets FLIGHT_ELAGGED
 * and flight_reader_offset() tells where to resume.
 *
 * Deadlines: a waiter's wait_timeout_ms runs on a uv_timer_t of the loop, so
 * a waiter whose flight shows no meta in time gets FLIGHT_ETIMEDOUT through
 * its end callback at the deadline, without polling.
 *
 * Writers need nothing from this header: a fetch callback that runs on the
 * loop's thread returns FLIGHT_FETCH_ASYNC and feeds its writer from loop
 * callbacks (a socket, a timer, libcurl's multi interface). A fetch that
 * runs on another thread hands its work to the loop with flight_uv_post().
 *
 * Close ordering (libuv's rule: a handle's memory lives until its close
 * callback): flight_uv_reader_close() every reader, flight_uv_close(), then
 * run the loop until it has nothing left; uv_loop_close() then returns 0.
 *
 * Thread safety: a flight_uv_t and its readers belong to the loop's thread,
 * except flight_uv_post(), which any thread may call until flight_uv_close().
 */
#ifndef COALESCE_UV_H
#define COALESCE_UV_H

#include <uv.h>

#include "flight.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct flight_uv flight_uv_t;
typedef struct flight_uv_reader flight_uv_reader_t;

/** Bytes a reader is served per loop turn before others get their turn. */
#define FLIGHT_UV_BATCH (1024 * 1024)

/*
 * The reader callbacks run on the loop's thread, from the loop (never inside
 * a flight_uv_* call), with no library lock held. They may call
 * flight_uv_read_stop() and flight_uv_reader_close() on their reader, and
 * any other library function.
 */

/**
 * @brief The meta is known; runs once, before any data callback. It does not
 *        run if the reader ends first (only the end callback runs then).
 * @param[in] meta Borrowed, valid until the reader is closed; NULL when the
 *            writer set none.
 */
typedef void (*flight_uv_meta_cb)(flight_uv_reader_t *ur,
                                  const void *meta,
                                  size_t len);

/**
 * @brief Body bytes at the reader's position; they count as consumed when
 *        the callback returns (unless it closed the reader).
 * @param[in] data Borrowed, valid until the callback returns; take a
 *            reference on @p owner (coalesce_buf_ref()) to keep it longer.
 * @param[in] len Bytes at @p data, > 0.
 * @param[in] owner Borrowed; the buffer holding them.
 */
typedef void (*flight_uv_data_cb)(flight_uv_reader_t *ur,
                                  const void *data,
                                  size_t len,
                                  coalesce_buf_t *owner);

/**
 * @brief The end: 0 after the last byte of a complete body, or a negative
 *        code (the flight's error, FLIGHT_ELAGGED, FLIGHT_ETIMEDOUT, ...:
 *        the codes of flight_meta() and flight_read() but COALESCE_EAGAIN).
 *        Runs exactly once per reader that is started and not closed first;
 *        no callback follows it. The reader must still be closed.
 */
typedef void (*flight_uv_end_cb)(flight_uv_reader_t *ur, int status);

/** @brief A function flight_uv_post() runs on the loop's thread: from the
 *         loop, or inside flight_uv_close() for those still queued then. */
typedef void (*flight_uv_task_cb)(void *data);

/**
 * @brief Bind the library to @p loop.
 * @param[out] out New adapter on success; untouched on failure.
 * @param[in] loop Borrowed; must outlive the adapter.
 * @return 0; COALESCE_EINVAL (NULL argument); COALESCE_ENOMEM;
 *         COALESCE_EIO (libuv refused the async handle).
 * Thread safety: the loop's thread. @since 0.4
 */
COALESCE_API int flight_uv_new(flight_uv_t **out, uv_loop_t *loop);

/**
 * @brief Close the adapter; its memory is freed by the loop once its handle
 *        has closed.
 *
 * Functions posted before the call and not run yet run now, on this thread,
 * before it returns (also when it is called from a posted function). Posts
 * from the loop's thread afterwards get COALESCE_ECLOSING; other threads
 * must have stopped posting before this call (join them first): the memory
 * is freed on the next loop turn. NULL is a no-op (returns 0). May be called
 * from a posted function or a reader callback. A second call before the
 * loop has run returns COALESCE_ECLOSING; after that the adapter is freed
 * and a second call is a usage error.
 * @return 0; COALESCE_EBUSY if readers are still open (nothing changed:
 *         close them and call again); COALESCE_ECLOSING (already closing).
 * Thread safety: the loop's thread. @since 0.4
 */
COALESCE_API int flight_uv_close(flight_uv_t *u);

/**
 * @brief Run @p fn(@p data) on the loop's thread, soon, in posting order.
 * @param[in] data Passed to @p fn; borrowed.
 * @return 0; COALESCE_EINVAL (NULL @p u or @p fn); COALESCE_ECLOSING
 *         (flight_uv_close() has begun); COALESCE_ENOMEM.
 * Thread safety: any thread, until flight_uv_close() (see there).
 * @since 0.4
 */
COALESCE_API int
flight_uv_post(flight_uv_t *u, flight_uv_task_cb fn, void *data);

/**
 * @brief Put a flight reader under the loop's control.
 *
 * Nothing is delivered until flight_uv_read_start().
 * @param[out] out New loop reader on success; untouched on failure.
 * @param[in] r Adopted on success (flight_uv_reader_close() closes it); on
 *            failure it stays the caller's. It must be fresh or only read
 *            through the blocking or peek functions by this thread before,
 *            and adopted once; any notify arming of it is replaced.
 * @return 0; COALESCE_EINVAL (NULL argument); COALESCE_ECLOSING (adapter
 *         closing); COALESCE_ENOMEM.
 * Thread safety: the loop's thread. @since 0.4
 */
COALESCE_API int flight_uv_reader_new(flight_uv_reader_t **out,
                                      flight_uv_t *u,
                                      flight_reader_t *r);

/**
 * @brief Start (or resume) delivery; callbacks run from the next loop turn,
 *        never inside this call. Replaces earlier callbacks.
 * @param[in] meta_cb May be NULL (the meta is then skipped).
 * @param[in] data_cb Not NULL.
 * @param[in] end_cb Not NULL.
 * @return 0; COALESCE_EINVAL (NULL reader, NULL @p data_cb or @p end_cb, or
 *         the end was already delivered).
 * Thread safety: the loop's thread. @since 0.4
 */
COALESCE_API int flight_uv_read_start(flight_uv_reader_t *ur,
                                      flight_uv_meta_cb meta_cb,
                                      flight_uv_data_cb data_cb,
                                      flight_uv_end_cb end_cb);

/**
 * @brief Stop delivery until the next flight_uv_read_start(). From a data
 *        callback: that callback's bytes are still consumed, nothing more
 *        is delivered. A stopped reader gets no callback at all; a deadline
 *        that passed meanwhile is delivered when it is started again.
 * @return 0; COALESCE_EINVAL (NULL reader).
 * Thread safety: the loop's thread. @since 0.4
 */
COALESCE_API int flight_uv_read_stop(flight_uv_reader_t *ur);

/**
 * @brief The flight reader underneath (borrowed, valid until the loop
 *        reader is closed): for flight_reader_offset(), _range(), _shared().
 *        Reading it directly while delivery is started is a usage error.
 *        NULL for NULL.
 * Thread safety: the loop's thread. @since 0.4
 */
COALESCE_API flight_reader_t *flight_uv_reader_flight(flight_uv_reader_t *ur);

/** @brief Attach a user pointer (never read by the library); NULL @p ur is a
 *         no-op. Thread safety: the loop's thread. @since 0.4 */
COALESCE_API void flight_uv_reader_set_data(flight_uv_reader_t *ur, void *data);
/** @brief The user pointer, or NULL (also for NULL). Thread safety: the
 *         loop's thread. @since 0.4 */
COALESCE_API void *flight_uv_reader_get_data(const flight_uv_reader_t *ur);

/**
 * @brief Close the loop reader and the flight reader it adopted: no
 *        callback runs after this returns. May be called from the reader's
 *        own callbacks. Memory is freed now or once its timer handle has
 *        closed. NULL is a no-op; closing twice is a usage error (the
 *        memory may be freed).
 * Thread safety: the loop's thread. @since 0.4
 */
COALESCE_API void flight_uv_reader_close(flight_uv_reader_t *ur);

#ifdef __cplusplus
}
#endif

#endif /* COALESCE_UV_H */

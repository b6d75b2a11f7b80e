/*
 * Reference-counted, immutable byte buffers.
 *
 * A coalesce_buf_t is how bytes cross the library without being copied: the
 * leader's writer hands buffers to a flight, and every reader of that flight
 * borrows the same bytes. A buffer is writable by its creator until it is
 * published (handed to flight_write_buf()); from then on it is immutable and
 * lives until its last reference is dropped.
 *
 * Lifecycle: coalesce_buf_new() or coalesce_buf_new_wrap() -> fill (new only)
 * -> publish -> coalesce_buf_unref() by every holder -> freed by the last one.
 *
 * Thread safety: reference counting and the read accessors are thread-safe
 * (C11 atomics); buffers are the library's only objects that several threads
 * may hold without coordination. Filling a buffer before it is published is
 * the creator's business.
 */
#ifndef COALESCE_BUF_H
#define COALESCE_BUF_H

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct coalesce_buf coalesce_buf_t;

/**
 * Destructor for wrapped memory: free_fn(ptr, free_data), called once, by
 * whichever thread drops the last reference, possibly from inside a library
 * call (a flight read, flight_reader_close(), flight_end()...). It must not
 * block and must not use the buffer.
 */
typedef void (*coalesce_buf_free_cb)(void *ptr, void *free_data);

/**
 * @brief Allocate a buffer of @p len bytes, writable until published.
 * @param[out] out New reference on success; untouched on failure.
 * @param[in] len Capacity and initial length; 0 is allowed. The bytes are
 *            not initialised.
 * @return 0; COALESCE_EINVAL if @p out is NULL; COALESCE_ENOMEM.
 * Thread safety: yes.
 * @since 0.1
 */
COALESCE_API int coalesce_buf_new(coalesce_buf_t **out, size_t len);

/**
 * @brief Wrap caller memory without copying it.
 *
 * The memory must stay valid and unchanged until @p free_fn is called, which
 * happens exactly once, when the last reference is dropped, on whichever
 * thread drops it. A NULL @p free_fn means the memory is static or outlives
 * every reference by the caller's own guarantee.
 *
 * @param[out] out New reference on success; untouched on failure (and then
 *             @p free_fn is not called).
 * @param[in] data Adopted through @p free_fn (borrowed if it is NULL); may be
 *            NULL only when @p len is 0.
 * @param[in] free_fn May be NULL; see coalesce_buf_free_cb.
 * @param[in] free_data Passed to @p free_fn; borrowed.
 * @return 0; COALESCE_EINVAL (NULL @p out, or NULL @p data with @p len > 0);
 *         COALESCE_ENOMEM. The new buffer counts as published at once: it
 *         is never writable through coalesce_buf_mutable().
 * Thread safety: yes.
 * @since 0.1
 */
COALESCE_API int coalesce_buf_new_wrap(coalesce_buf_t **out,
                                       const void *data,
                                       size_t len,
                                       coalesce_buf_free_cb free_fn,
                                       void *free_data);

/**
 * @brief Writable pointer to a buffer made by coalesce_buf_new().
 * @return The bytes (borrowed, valid while a reference is held), or NULL if
 *         @p b is NULL, wraps caller memory, or was already published.
 * Thread safety: only the creator may write, and only before publishing.
 * @since 0.1
 */
COALESCE_API void *coalesce_buf_mutable(coalesce_buf_t *b);

/**
 * @brief Shrink an unpublished buffer, e.g. after a short recv(). It never
 *        grows.
 * @return 0; COALESCE_EINVAL if @p b is NULL or @p len exceeds its length;
 *         COALESCE_EBUSY if the buffer was already published (a wrapped
 *         buffer, or one the library made, always is).
 * Thread safety: creator only, before publishing.
 * @since 0.1
 */
COALESCE_API int coalesce_buf_truncate(coalesce_buf_t *b, size_t len);

/**
 * @brief Read-only pointer to the bytes (borrowed; valid while a reference
 *        is held). NULL for a NULL buffer.
 * Thread safety: yes.
 * @since 0.1
 */
COALESCE_API const void *coalesce_buf_data(const coalesce_buf_t *b);

/** @brief Length in bytes (0 for NULL). Thread safety: yes. @since 0.1 */
COALESCE_API size_t coalesce_buf_len(const coalesce_buf_t *b);

/**
 * @brief Take a reference.
 * @return @p b (a new reference the caller must drop), or NULL for NULL.
 * Thread safety: yes.
 * @since 0.1
 */
COALESCE_API coalesce_buf_t *coalesce_buf_ref(coalesce_buf_t *b);

/**
 * @brief Drop a reference; the last one frees the buffer (and calls the
 *        free_fn of a wrapped one, on this thread). NULL is a no-op.
 * Thread safety: yes.
 * @since 0.1
 */
COALESCE_API void coalesce_buf_unref(coalesce_buf_t *b);

#ifdef __cplusplus
}
#endif

#endif /* COALESCE_BUF_H */

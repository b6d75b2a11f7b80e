/*
 * Private to the library: included first by every .c file in lib/.
 */
#ifndef COALESCE_INT_H
#define COALESCE_INT_H

/* -std=c11 hides POSIX declarations unless asked for. */
#ifndef _POSIX_C_SOURCE
#    define _POSIX_C_SOURCE 200809L
#endif
#define COALESCE_BUILDING 1

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "coalesce.h"

/* Allocation goes through the replaceable allocator (common.c). */
void *coalesce__malloc(size_t size);
void *coalesce__calloc(size_t count, size_t size);
void *coalesce__realloc(void *ptr, size_t size);
void coalesce__free(void *ptr);

/* Buffers (buf.c): a copy of caller bytes, and the publish mark. */
int coalesce__buf_new_copy(coalesce_buf_t **out, const void *data, size_t len);
void coalesce__buf_publish(coalesce_buf_t *b);
int coalesce__buf_new_headed(coalesce_buf_t **out,
                             size_t head_len,
                             const void *data,
                             size_t len);
void *coalesce__buf_head(coalesce_buf_t *b);

/* Monotonic clock in nanoseconds. */
static inline int64_t coalesce__now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

#define COALESCE__UNUSED(x) ((void)(x))

#endif /* COALESCE_INT_H */

/*
 * Errors, version and the allocator hook.
 */
#include "coalesce_int.h"

#include <errno.h>
#include <stdlib.h>

/* The POSIX-derived codes must be the negated errno values of this system. */
_Static_assert(COALESCE_ENOENT == -ENOENT, "ENOENT");
_Static_assert(COALESCE_EIO == -EIO, "EIO");
_Static_assert(COALESCE_EAGAIN == -EAGAIN, "EAGAIN");
_Static_assert(COALESCE_ENOMEM == -ENOMEM, "ENOMEM");
_Static_assert(COALESCE_EBUSY == -EBUSY, "EBUSY");
_Static_assert(COALESCE_EEXIST == -EEXIST, "EEXIST");
_Static_assert(COALESCE_EINVAL == -EINVAL, "EINVAL");
_Static_assert(COALESCE_ENOTSUP == -ENOTSUP, "ENOTSUP");
_Static_assert(COALESCE_ETIMEDOUT == -ETIMEDOUT, "ETIMEDOUT");
_Static_assert(COALESCE_ECANCELED == -ECANCELED, "ECANCELED");
_Static_assert(COALESCE_EACCES == -EACCES, "EACCES");

const char *coalesce_strerror(int err)
{
    if (err >= 0)
        return "success";
    switch (err) {
#define XX(name, val, msg)                                                     \
    case COALESCE_##name:                                                      \
        return msg;
        COALESCE_ERRNO_MAP(XX)
#undef XX
    default:
        return "unknown error";
    }
}

const char *coalesce_err_name(int err)
{
    if (err >= 0)
        return "COALESCE_OK";
    switch (err) {
#define XX(name, val, msg)                                                     \
    case COALESCE_##name:                                                      \
        return "COALESCE_" #name;
        COALESCE_ERRNO_MAP(XX)
#undef XX
    default:
        return "UNKNOWN";
    }
}

unsigned coalesce_version(void)
{
    return COALESCE_VERSION_HEX;
}

const char *coalesce_version_string(void)
{
    return COALESCE_VERSION_STRING;
}

/*
 * The allocator is the one piece of process-wide state (as in libuv and
 * hiredis). It may be replaced only before the first allocation, so the
 * function pointers never change while another thread could read them.
 */
static struct {
    coalesce_malloc_fn malloc_fn;
    coalesce_realloc_fn realloc_fn;
    coalesce_calloc_fn calloc_fn;
    coalesce_free_fn free_fn;
} alloc = {malloc, realloc, calloc, free};

static atomic_bool alloc_used;

int coalesce_replace_allocator(coalesce_malloc_fn malloc_fn,
                               coalesce_realloc_fn realloc_fn,
                               coalesce_calloc_fn calloc_fn,
                               coalesce_free_fn free_fn)
{
    if (!malloc_fn || !realloc_fn || !calloc_fn || !free_fn)
        return COALESCE_EINVAL;
    if (atomic_load_explicit(&alloc_used, memory_order_acquire))
        return COALESCE_EBUSY;
    alloc.malloc_fn = malloc_fn;
    alloc.realloc_fn = realloc_fn;
    alloc.calloc_fn = calloc_fn;
    alloc.free_fn = free_fn;
    return 0;
}

static inline void mark_used(void)
{
    /* A plain load first keeps the hot path free of cache-line writes. */
    if (!atomic_load_explicit(&alloc_used, memory_order_relaxed))
        atomic_store_explicit(&alloc_used, true, memory_order_release);
}

void *coalesce__malloc(size_t size)
{
    mark_used();
    return alloc.malloc_fn(size ? size : 1);
}

void *coalesce__calloc(size_t count, size_t size)
{
    mark_used();
    if (size && count > SIZE_MAX / size)
        return NULL;
    return alloc.calloc_fn(count ? count : 1, size ? size : 1);
}

void *coalesce__realloc(void *ptr, size_t size)
{
    mark_used();
    return alloc.realloc_fn(ptr, size ? size : 1);
}

void coalesce__free(void *ptr)
{
    if (ptr)
        alloc.free_fn(ptr);
}

#include "helpers.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

static atomic_long live;
static atomic_long count;
static atomic_long fail_at = -1; /* absolute allocation number to fail */
static atomic_int failed;

static int should_fail(void)
{
    long n = atomic_fetch_add(&count, 1);
    long at = atomic_load(&fail_at);
    if (at >= 0 && n == at) {
        atomic_store(&failed, 1);
        return 1;
    }
    return 0;
}

/* A header in front of each block keeps live-count exact with realloc. */
#define HDR 16

static void *t_malloc(size_t n)
{
    if (should_fail())
        return NULL;
    char *p = malloc(n + HDR);
    if (!p)
        return NULL;
    atomic_fetch_add(&live, 1);
    return p + HDR;
}

static void *t_calloc(size_t c, size_t n)
{
    if (should_fail())
        return NULL;
    char *p = calloc(1, c * n + HDR);
    if (!p)
        return NULL;
    atomic_fetch_add(&live, 1);
    return p + HDR;
}

static void *t_realloc(void *ptr, size_t n)
{
    if (!ptr)
        return t_malloc(n);
    if (should_fail())
        return NULL;
    char *p = realloc((char *)ptr - HDR, n + HDR);
    return p ? p + HDR : NULL;
}

static void t_free(void *ptr)
{
    if (!ptr)
        return;
    atomic_fetch_sub(&live, 1);
    free((char *)ptr - HDR);
}

void test_alloc_install(void)
{
    int rc = coalesce_replace_allocator(t_malloc, t_realloc, t_calloc, t_free);
    if (rc != 0)
        abort();
}

long test_alloc_live(void)
{
    return atomic_load(&live);
}

long test_alloc_count(void)
{
    return atomic_load(&count);
}

void test_alloc_fail_after(long n)
{
    atomic_store(&failed, 0);
    atomic_store(&fail_at, n < 0 ? -1 : atomic_load(&count) + n);
}

int test_alloc_failed(void)
{
    return atomic_load(&failed);
}

void test_fill(unsigned char *dst, uint64_t seed, uint64_t off, size_t len)
{
    for (size_t i = 0; i < len; i++)
        dst[i] = test_pattern(seed, off + i);
}

int test_check(const unsigned char *buf,
               uint64_t seed,
               uint64_t off,
               size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (buf[i] != test_pattern(seed, off + i))
            return 0;
    return 1;
}

double test_timeout(double seconds)
{
    const char *v = getenv("CK_VALGRIND");
    return v && *v == '1' ? seconds * 20 : seconds;
}

/*
 * Reference-counted immutable buffers.
 */
#include "coalesce_int.h"

#include <string.h>

struct coalesce_buf {
    atomic_uint refs;
    atomic_bool published;
    bool owns_bytes; /* Bytes follow the header (coalesce_buf_new). */
    const unsigned char *data;
    size_t len;
    coalesce_buf_free_cb free_fn;
    void *free_data;
    _Alignas(max_align_t) unsigned char bytes[];
};

static coalesce_buf_t *buf_alloc(size_t len)
{
    if (len > SIZE_MAX - sizeof(coalesce_buf_t))
        return NULL;
    coalesce_buf_t *b = coalesce__malloc(sizeof(*b) + len);
    if (!b)
        return NULL;
    atomic_init(&b->refs, 1);
    atomic_init(&b->published, false);
    b->owns_bytes = true;
    b->data = b->bytes;
    b->len = len;
    b->free_fn = NULL;
    b->free_data = NULL;
    return b;
}

int coalesce_buf_new(coalesce_buf_t **out, size_t len)
{
    if (!out)
        return COALESCE_EINVAL;
    coalesce_buf_t *b = buf_alloc(len);
    if (!b)
        return COALESCE_ENOMEM;
    *out = b;
    return 0;
}

int coalesce__buf_new_copy(coalesce_buf_t **out, const void *data, size_t len)
{
    coalesce_buf_t *b = buf_alloc(len);
    if (!b)
        return COALESCE_ENOMEM;
    if (len)
        memcpy(b->bytes, data, len);
    atomic_store_explicit(&b->published, true, memory_order_relaxed);
    *out = b;
    return 0;
}

int coalesce_buf_new_wrap(coalesce_buf_t **out,
                          const void *data,
                          size_t len,
                          coalesce_buf_free_cb free_fn,
                          void *free_data)
{
    if (!out || (!data && len))
        return COALESCE_EINVAL;
    coalesce_buf_t *b = coalesce__malloc(sizeof(*b));
    if (!b)
        return COALESCE_ENOMEM;
    atomic_init(&b->refs, 1);
    atomic_init(&b->published, true);
    b->owns_bytes = false;
    b->data = data;
    b->len = len;
    b->free_fn = free_fn;
    b->free_data = free_data;
    *out = b;
    return 0;
}

void *coalesce_buf_mutable(coalesce_buf_t *b)
{
    if (!b || !b->owns_bytes ||
        atomic_load_explicit(&b->published, memory_order_relaxed))
        return NULL;
    return b->bytes;
}

int coalesce_buf_truncate(coalesce_buf_t *b, size_t len)
{
    if (!b || len > b->len)
        return COALESCE_EINVAL;
    if (atomic_load_explicit(&b->published, memory_order_relaxed))
        return COALESCE_EBUSY;
    b->len = len;
    return 0;
}

void coalesce__buf_publish(coalesce_buf_t *b)
{
    atomic_store_explicit(&b->published, true, memory_order_relaxed);
}

const void *coalesce_buf_data(const coalesce_buf_t *b)
{
    return b ? b->data : NULL;
}

size_t coalesce_buf_len(const coalesce_buf_t *b)
{
    return b ? b->len : 0;
}

coalesce_buf_t *coalesce_buf_ref(coalesce_buf_t *b)
{
    if (b)
        atomic_fetch_add_explicit(&b->refs, 1, memory_order_relaxed);
    return b;
}

void coalesce_buf_unref(coalesce_buf_t *b)
{
    if (!b)
        return;
    if (atomic_fetch_sub_explicit(&b->refs, 1, memory_order_acq_rel) != 1)
        return;
    if (b->free_fn)
        b->free_fn((void *)b->data, b->free_data);
    coalesce__free(b);
}

/* A buffer whose bytes are a private head of head_len bytes, then the
 * value: the head travels with the value in one allocation (cache entries
 * keep their metadata and key there). */
int coalesce__buf_new_headed(coalesce_buf_t **out,
                             size_t head_len,
                             const void *data,
                             size_t len)
{
    head_len = (head_len + 7) & ~(size_t)7;
    if (len > SIZE_MAX - sizeof(coalesce_buf_t) - head_len)
        return COALESCE_ENOMEM;
    coalesce_buf_t *b = buf_alloc(head_len + len);
    if (!b)
        return COALESCE_ENOMEM;
    if (len)
        memcpy(b->bytes + head_len, data, len);
    b->data = b->bytes + head_len;
    b->len = len;
    b->owns_bytes = false; /* Not writable through coalesce_buf_mutable. */
    atomic_store_explicit(&b->published, true, memory_order_relaxed);
    *out = b;
    return 0;
}

void *coalesce__buf_head(coalesce_buf_t *b)
{
    return b->bytes;
}

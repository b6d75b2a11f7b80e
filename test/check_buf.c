/*
 * Reference-counted buffers.
 */
#include "helpers.h"

#include <pthread.h>
#include <string.h>

START_TEST(buf_new_fill_publish)
{
    long live = test_alloc_live();
    coalesce_buf_t *b;
    ck_assert_int_eq(coalesce_buf_new(&b, 16), 0);
    unsigned char *p = coalesce_buf_mutable(b);
    ck_assert_ptr_nonnull(p);
    memcpy(p, "0123456789abcdef", 16);
    ck_assert_int_eq(coalesce_buf_truncate(b, 10), 0);
    ck_assert_uint_eq(coalesce_buf_len(b), 10);
    ck_assert_mem_eq(coalesce_buf_data(b), "0123456789", 10);
    ck_assert_int_eq(coalesce_buf_truncate(b, 11), COALESCE_EINVAL);

    coalesce_buf_unref(b);
    ck_assert_int_eq(test_alloc_live(), live);
}
END_TEST

static int publish_fetch(flight_writer_t *w, void *data)
{
    coalesce_buf_t *b = data;
    ck_assert_int_eq(flight_write_buf(w, b, 0, coalesce_buf_len(b)), 0);
    return flight_end(w, 0);
}

START_TEST(buf_published_is_immutable)
{
    long live = test_alloc_live();
    coalesce_buf_t *b;
    ck_assert_int_eq(coalesce_buf_new(&b, 4), 0);
    memcpy(coalesce_buf_mutable(b), "abcd", 4);
    flight_group_t *g;
    ck_assert_int_eq(flight_group_new(&g, NULL), 0);
    flight_reader_t *r;
    ck_assert_int_eq(flight_do(g, "k", 1, publish_fetch, b, &r), 0);
    ck_assert_ptr_null(coalesce_buf_mutable(b));
    ck_assert_int_eq(coalesce_buf_truncate(b, 1), COALESCE_EBUSY);
    flight_reader_close(r);
    flight_group_close(g);
    coalesce_buf_unref(b);
    ck_assert_int_eq(test_alloc_live(), live);
}
END_TEST

static int freed;
static void count_free(void *ptr, void *data)
{
    ck_assert_ptr_eq(data, &freed);
    ck_assert_mem_eq(ptr, "static", 6);
    freed++;
}

START_TEST(buf_wrap_destructor_once)
{
    freed = 0;
    coalesce_buf_t *b;
    static const char text[] = "static";
    ck_assert_int_eq(coalesce_buf_new_wrap(&b, text, 6, count_free, &freed), 0);
    ck_assert_ptr_eq(coalesce_buf_data(b), text);
    ck_assert_ptr_null(coalesce_buf_mutable(b));
    ck_assert_ptr_eq(coalesce_buf_ref(b), b);
    coalesce_buf_unref(b);
    ck_assert_int_eq(freed, 0);
    coalesce_buf_unref(b);
    ck_assert_int_eq(freed, 1);
}
END_TEST

START_TEST(buf_bad_input)
{
    coalesce_buf_t *b = NULL;
    ck_assert_int_eq(coalesce_buf_new(NULL, 1), COALESCE_EINVAL);
    ck_assert_int_eq(coalesce_buf_new_wrap(&b, NULL, 1, NULL, NULL),
                     COALESCE_EINVAL);
    ck_assert_int_eq(coalesce_buf_new_wrap(NULL, "x", 1, NULL, NULL),
                     COALESCE_EINVAL);
    ck_assert_ptr_null(b);
    ck_assert_ptr_null(coalesce_buf_data(NULL));
    ck_assert_uint_eq(coalesce_buf_len(NULL), 0);
    ck_assert_ptr_null(coalesce_buf_ref(NULL));
    ck_assert_ptr_null(coalesce_buf_mutable(NULL));
    ck_assert_int_eq(coalesce_buf_truncate(NULL, 0), COALESCE_EINVAL);
    coalesce_buf_unref(NULL);
    /* Zero-length buffers are fine. */
    ck_assert_int_eq(coalesce_buf_new(&b, 0), 0);
    ck_assert_uint_eq(coalesce_buf_len(b), 0);
    coalesce_buf_unref(b);
}
END_TEST

START_TEST(buf_oom)
{
    long live = test_alloc_live();
    coalesce_buf_t *b = NULL;
    test_alloc_fail_after(0);
    ck_assert_int_eq(coalesce_buf_new(&b, 10), COALESCE_ENOMEM);
    ck_assert_ptr_null(b);
    test_alloc_fail_after(0);
    ck_assert_int_eq(coalesce_buf_new_wrap(&b, "x", 1, NULL, NULL),
                     COALESCE_ENOMEM);
    ck_assert_ptr_null(b);
    test_alloc_fail_after(-1);
    ck_assert_int_eq(test_alloc_live(), live);
}
END_TEST

/* Refcounts from several threads: the last unref frees exactly once. */
#define RC_THREADS 4
#define RC_ROUNDS  20000
static void *rc_worker(void *arg)
{
    coalesce_buf_t *b = arg;
    for (int i = 0; i < RC_ROUNDS; i++) {
        coalesce_buf_ref(b);
        ck_assert_mem_eq(coalesce_buf_data(b), "static", 6);
        coalesce_buf_unref(b);
    }
    coalesce_buf_unref(b);
    return NULL;
}

START_TEST(buf_refcount_threads)
{
    freed = 0;
    coalesce_buf_t *b;
    ck_assert_int_eq(coalesce_buf_new_wrap(&b, "static", 6, count_free, &freed),
                     0);
    pthread_t t[RC_THREADS];
    for (int i = 0; i < RC_THREADS; i++)
        coalesce_buf_ref(b);
    for (int i = 0; i < RC_THREADS; i++)
        ck_assert_int_eq(pthread_create(&t[i], NULL, rc_worker, b), 0);
    coalesce_buf_unref(b);
    for (int i = 0; i < RC_THREADS; i++)
        pthread_join(t[i], NULL);
    ck_assert_int_eq(freed, 1);
}
END_TEST

Suite *make_buf_suite(void)
{
    Suite *s = suite_create("buf");
    TCase *tc = tcase_create("buf");
    tcase_set_timeout(tc, test_timeout(5));
    tcase_add_test(tc, buf_new_fill_publish);
    tcase_add_test(tc, buf_published_is_immutable);
    tcase_add_test(tc, buf_wrap_destructor_once);
    tcase_add_test(tc, buf_bad_input);
    tcase_add_test(tc, buf_oom);
    tcase_add_test(tc, buf_refcount_threads);
    suite_add_tcase(s, tc);
    return s;
}

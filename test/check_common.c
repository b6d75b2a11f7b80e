/*
 * Errors, version, allocator hook.
 */
#include "helpers.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

START_TEST(errors_match_errno)
{
    ck_assert_int_eq(COALESCE_ENOMEM, -ENOMEM);
    ck_assert_int_eq(COALESCE_EINVAL, -EINVAL);
    ck_assert_int_eq(COALESCE_ETIMEDOUT, -ETIMEDOUT);
    ck_assert_int_eq(COALESCE_ECANCELED, -ECANCELED);
    ck_assert_int_eq(COALESCE_EAGAIN, -EAGAIN);
}
END_TEST

START_TEST(errors_names_and_messages)
{
    ck_assert_str_eq(coalesce_err_name(COALESCE_ENOMEM), "COALESCE_ENOMEM");
    ck_assert_str_eq(coalesce_err_name(COALESCE_ELAGGED), "COALESCE_ELAGGED");
    ck_assert_str_eq(coalesce_err_name(FLIGHT_ETIMEDOUT), "COALESCE_ETIMEDOUT");
    ck_assert_str_eq(coalesce_err_name(0), "COALESCE_OK");
    ck_assert_str_eq(coalesce_err_name(-123456), "UNKNOWN");
    ck_assert_str_eq(coalesce_strerror(-123456), "unknown error");
    ck_assert_str_eq(coalesce_strerror(COALESCE_EOF), "end of stream");
    ck_assert_str_eq(coalesce_strerror(1), "success");
    /* Every code has its own name and a non-empty message. */
    static const int codes[] = {
#define XX(name, val, msg) COALESCE_##name,
        COALESCE_ERRNO_MAP(XX)
#undef XX
    };
    size_t n = sizeof(codes) / sizeof(codes[0]);
    for (size_t i = 0; i < n; i++) {
        ck_assert_ptr_nonnull(coalesce_strerror(codes[i]));
        ck_assert_int_gt((int)strlen(coalesce_strerror(codes[i])), 0);
        ck_assert_str_ne(coalesce_err_name(codes[i]), "UNKNOWN");
        for (size_t j = 0; j < i; j++)
            ck_assert_int_ne(codes[i], codes[j]);
    }
}
END_TEST

START_TEST(version_matches_header)
{
    ck_assert_uint_eq(coalesce_version(), COALESCE_VERSION_HEX);
    ck_assert_str_eq(coalesce_version_string(), COALESCE_VERSION_STRING);
    ck_assert_uint_eq(coalesce_version() >> 16, COALESCE_VERSION_MAJOR);
}
END_TEST

START_TEST(allocator_replace_refused_after_use)
{
    /* main() installed the test allocator before any allocation. */
    coalesce_buf_t *b;
    ck_assert_int_eq(coalesce_buf_new(&b, 8), 0);
    coalesce_buf_unref(b);
    ck_assert_int_eq(coalesce_replace_allocator(malloc, realloc, calloc, free),
                     COALESCE_EBUSY);
    ck_assert_int_eq(coalesce_replace_allocator(NULL, realloc, calloc, free),
                     COALESCE_EINVAL);
    /* The counting allocator is the one in use. */
    long before = test_alloc_count();
    ck_assert_int_eq(coalesce_buf_new(&b, 8), 0);
    ck_assert_int_gt(test_alloc_count(), before);
    coalesce_buf_unref(b);
}
END_TEST

Suite *make_common_suite(void)
{
    Suite *s = suite_create("common");
    TCase *tc = tcase_create("errors");
    tcase_set_timeout(tc, test_timeout(2));
    tcase_add_test(tc, errors_match_errno);
    tcase_add_test(tc, errors_names_and_messages);
    tcase_add_test(tc, version_matches_header);
    tcase_add_test(tc, allocator_replace_refused_after_use);
    suite_add_tcase(s, tc);
    return s;
}

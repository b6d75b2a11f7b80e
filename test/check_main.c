/*
 * Runs every suite; exits non-zero if anything failed.
 */
#include "helpers.h"

#include <stdlib.h>
#include <string.h>

int main(void)
{
    /* Before any library call, so the hook can be installed. */
    test_alloc_install();

    /* Suites that run against a real etcd share one, started here in the
     * parent so that forked tests inherit it. */
    const char *only = getenv("CK_RUN_SUITE");
    if (!only || !strcmp(only, "cache") || !strcmp(only, "etcd"))
        test_etcd_setup();

    SRunner *sr = srunner_create(make_common_suite());
    srunner_add_suite(sr, make_buf_suite());
    srunner_add_suite(sr, make_flight_suite());
    srunner_add_suite(sr, make_range_suite());
    srunner_add_suite(sr, make_uv_suite());
    srunner_add_suite(sr, make_proxy_suite());
    srunner_add_suite(sr, make_memstore_suite());
    srunner_add_suite(sr, make_cache_suite());
    srunner_add_suite(sr, make_oom_suite());
    srunner_add_suite(sr, make_etcd_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

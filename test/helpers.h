/*
 * Shared test helpers: suite constructors, allocation-failure injection,
 * deterministic body patterns.
 */
#ifndef COALESCE_TEST_HELPERS_H
#define COALESCE_TEST_HELPERS_H

#ifndef _POSIX_C_SOURCE
#    define _POSIX_C_SOURCE 200809L
#endif

#include <check.h>
#include <stddef.h>
#include <stdint.h>

#include <coalesce.h>

Suite *make_common_suite(void);
Suite *make_buf_suite(void);
Suite *make_flight_suite(void);

/*
 * Allocation accounting and failure injection. check_main installs a
 * counting allocator before anything else runs.
 *  - test_alloc_live(): allocations made through the library and not freed.
 *  - test_alloc_fail_after(n): the (n+1)-th allocation from now fails, and
 *    only that one; -1 disables injection.
 *  - test_alloc_count(): allocations attempted since the process started.
 *  - test_alloc_failed(): 1 once the injected failure has happened.
 */
long test_alloc_live(void);
long test_alloc_count(void);
void test_alloc_fail_after(long n);
int test_alloc_failed(void);
void test_alloc_install(void);

/* Byte i of the deterministic body for seed s. */
static inline unsigned char test_pattern(uint64_t seed, uint64_t i)
{
    uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
    x ^= x >> 29;
    return (unsigned char)(x * 0xBF58476D1CE4E5B9ull >> 56);
}
void test_fill(unsigned char *dst, uint64_t seed, uint64_t off, size_t len);
/* 1 if buf equals the pattern for seed s from offset off. */
int test_check(const unsigned char *buf,
               uint64_t seed,
               uint64_t off,
               size_t len);

/* Timeouts are multiplied under valgrind (CK_VALGRIND=1 set by make). */
double test_timeout(double seconds);

#endif

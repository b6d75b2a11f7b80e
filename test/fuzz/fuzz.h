/*
 * Shared pieces of the libFuzzer harnesses: a byte consumer in the manner of
 * LLVM's FuzzedDataProvider, and an assertion that reports and aborts.
 *
 * The consumer never fails: once the input is used up every read returns
 * 0, so a harness decodes any input deterministically and stops when
 * fuzz_left() says so.
 */
#ifndef COALESCE_FUZZ_H
#define COALESCE_FUZZ_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct fuzz_in {
    const uint8_t *p;
    size_t n;
} fuzz_in_t;

static inline fuzz_in_t fuzz_in(const uint8_t *data, size_t size)
{
    fuzz_in_t in = {data, size};
    return in;
}

static inline size_t fuzz_left(const fuzz_in_t *in)
{
    return in->n;
}

static inline uint8_t fuzz_u8(fuzz_in_t *in)
{
    if (!in->n)
        return 0;
    in->n--;
    return *in->p++;
}

static inline bool fuzz_bool(fuzz_in_t *in)
{
    return fuzz_u8(in) & 1;
}

/* Little-endian, from as many bytes as are left. */
static inline uint16_t fuzz_u16(fuzz_in_t *in)
{
    uint16_t v = fuzz_u8(in);
    return (uint16_t)(v | (uint16_t)fuzz_u8(in) << 8);
}

static inline uint32_t fuzz_u32(fuzz_in_t *in)
{
    uint32_t v = fuzz_u16(in);
    return v | (uint32_t)fuzz_u16(in) << 16;
}

static inline uint64_t fuzz_u64(fuzz_in_t *in)
{
    uint64_t v = fuzz_u32(in);
    return v | (uint64_t)fuzz_u32(in) << 32;
}

/* A value in [lo, hi], reading only the bytes the span needs. */
static inline uint64_t fuzz_range(fuzz_in_t *in, uint64_t lo, uint64_t hi)
{
    uint64_t span = hi - lo, v = 0;
    for (uint64_t s = span; s; s >>= 8)
        v = v << 8 | fuzz_u8(in);
    return span == UINT64_MAX ? v : lo + v % (span + 1);
}

/* An index below n (n > 0): always one byte while n <= 256, so that a
 * choice takes the same room in the input whatever n is. */
static inline unsigned fuzz_pick(fuzz_in_t *in, unsigned n)
{
    if (n <= 256)
        return fuzz_u8(in) % n;
    return (unsigned)fuzz_range(in, 0, n - 1);
}

/* For a harness's model and checks: no coverage feedback (it would steer
 * the fuzzer by the model's own branches) and no comparison tracing, which
 * costs more than the checks themselves. */
#if defined(__clang__) && __clang_major__ >= 13
#    define FUZZ_NOCOV __attribute__((no_sanitize("coverage")))
#else
#    define FUZZ_NOCOV
#endif

/* A model check: print where and why, then abort (libFuzzer saves the
 * input as a crash). */
#define FUZZ_CHECK(cond, ...)                                                  \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__,   \
                    #cond);                                                    \
            fprintf(stderr, __VA_ARGS__);                                      \
            fputc('\n', stderr);                                               \
            abort();                                                           \
        }                                                                      \
    } while (0)

/*
 * For the flight harnesses (define FUZZ_FLIGHT_RUNTIME before including, in
 * one file per binary): a virtual monotonic clock, FUZZ_TRACE printing and a
 * counting allocator installed before the first run.
 */
#ifdef FUZZ_FLIGHT_RUNTIME
#    include <coalesce.h>
#    include <stdatomic.h>
#    include <sys/syscall.h>
#    include <time.h>
#    include <unistd.h>

/* --- Virtual clock ---------------------------------------------------------
 * The library reads CLOCK_MONOTONIC through clock_gettime(); defined here,
 * ours wins at link time. Other threads and clocks (libFuzzer's own timers)
 * get the real time. */
static _Thread_local bool vclock_on;
static int64_t vnow;

int clock_gettime(clockid_t id, struct timespec *ts)
{
    if (vclock_on && id == CLOCK_MONOTONIC) {
        ts->tv_sec = (time_t)(vnow / 1000000000);
        ts->tv_nsec = (long)(vnow % 1000000000);
        return 0;
    }
    return (int)syscall(SYS_clock_gettime, id, ts);
}

/* FUZZ_TRACE=1 in the environment prints the decoded program. */
static bool trace;
#    define TRACE(...)                                                         \
        do {                                                                   \
            if (trace)                                                         \
                fprintf(stderr, __VA_ARGS__);                                  \
        } while (0)

/* --- Counting allocator: every exec must free all it allocated. ---------- */
static atomic_long live_allocs;

static void *c_malloc(size_t n)
{
    void *p = malloc(n);
    if (p)
        atomic_fetch_add(&live_allocs, 1);
    return p;
}

static void *c_calloc(size_t c, size_t n)
{
    void *p = calloc(c, n);
    if (p)
        atomic_fetch_add(&live_allocs, 1);
    return p;
}

static void *c_realloc(void *p, size_t n)
{
    void *q = realloc(p, n);
    if (!p && q)
        atomic_fetch_add(&live_allocs, 1);
    else if (p && !n && !q)
        atomic_fetch_sub(&live_allocs, 1);
    return q;
}

static void c_free(void *p)
{
    if (p)
        atomic_fetch_sub(&live_allocs, 1);
    free(p);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    trace = getenv("FUZZ_TRACE") != NULL;
    if (coalesce_replace_allocator(c_malloc, c_realloc, c_calloc, c_free)) {
        fprintf(stderr, "cannot install the counting allocator\n");
        abort();
    }
    return 0;
}

#endif /* FUZZ_FLIGHT_RUNTIME */

#endif /* COALESCE_FUZZ_H */

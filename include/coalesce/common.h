/*
 * libcoalesce shared pieces: export macro, error codes, version functions and
 * the allocator hook.
 *
 * Error model. Every fallible function returns an int: 0 (or a documented
 * non-negative value) on success, a negative COALESCE_E* code on failure.
 * Where a POSIX error fits, the code is the negated Linux errno value
 * (COALESCE_ENOMEM == -ENOMEM on Linux; checked when the library is built).
 * Codes specific to the library live in the block -9000 .. -9099. Compare
 * against the named constants, never against numbers, and log
 * coalesce_err_name() as well as the number.
 *
 * If a function that takes a callback returns an error, the callback is never
 * called.
 *
 * Thread safety: everything declared in this header is thread-safe, except
 * coalesce_replace_allocator(), which must be called before any other
 * libcoalesce function.
 */
#ifndef COALESCE_COMMON_H
#define COALESCE_COMMON_H

#include <stddef.h>
#include <stdint.h>

#include "version.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(COALESCE_STATIC)
#    define COALESCE_API
#elif defined(_WIN32)
#    if defined(COALESCE_BUILDING)
#        define COALESCE_API __declspec(dllexport)
#    else
#        define COALESCE_API __declspec(dllimport)
#    endif
#elif defined(__GNUC__) && __GNUC__ >= 4
#    define COALESCE_API __attribute__((visibility("default")))
#else
#    define COALESCE_API
#endif

/*
 * The error list: XX(NAME, value, message). One list generates the constants,
 * coalesce_strerror() and coalesce_err_name(), so they cannot drift apart.
 * New codes are only ever appended; a number is never reused.
 *
 * Where the library's own codes come from (each function lists its codes):
 *  - EOF: a flight reader reached the clean end of the stream.
 *  - ELAGGED, EMISMATCH: flights (FLIGHT_ELAGGED, FLIGHT_EMISMATCH in
 *    flight.h).
 *  - EUPSTREAM: a flight's writer was released, or its fetch callback
 *    returned, without ending the stream.
 *  - ECLOSING: the flight group or the libuv adapter is closing.
 *  - ERANGE: flights: a byte range past the object's end (FLIGHT_ERANGE,
 *    HTTP 416).
 *  - ECOMPACTED: stores and caches: a revision that was compacted or is in
 *    the future (before 0.5 stores returned ERANGE; caches accept both).
 *  - ECONFLICT, ENOTSTARTED, EOVERFLOW: caches (cache.h).
 *  - EDELETED: reserved; nothing returns it yet.
 *  - EBACKEND, EDECODE: stores (store.h, etcd.h).
 *  - EACCES: the etcd store (credentials, certificates).
 * ERANGE and EOVERFLOW are library codes despite their POSIX names:
 * COALESCE_ERANGE is not -ERANGE, COALESCE_EOVERFLOW is not -EOVERFLOW.
 */
#define COALESCE_ERRNO_MAP(XX)                                                 \
    XX(ENOENT, -2, "no such entry")                                            \
    XX(EIO, -5, "i/o error")                                                   \
    XX(EAGAIN, -11, "resource temporarily unavailable")                        \
    XX(ENOMEM, -12, "not enough memory")                                       \
    XX(EBUSY, -16, "resource busy")                                            \
    XX(EEXIST, -17, "already exists")                                          \
    XX(EINVAL, -22, "invalid argument")                                        \
    XX(ENOTSUP, -95, "operation not supported")                                \
    XX(ETIMEDOUT, -110, "timed out")                                           \
    XX(ECANCELED, -125, "operation canceled")                                  \
    XX(EOF, -9000, "end of stream")                                            \
    XX(ELAGGED, -9001, "reader fell too far behind the writer")                \
    XX(EUPSTREAM, -9002, "upstream fetch failed or was abandoned")             \
    XX(ECLOSING, -9003, "handle is closing")                                   \
    XX(ERANGE, -9004, "byte range not satisfiable")                            \
    XX(ECONFLICT, -9005, "revision precondition failed")                       \
    XX(EDELETED, -9006, "key was deleted")                                     \
    XX(EBACKEND, -9007, "storage backend failed")                              \
    XX(EMISMATCH, -9008, "upstream reply does not match the request")          \
    XX(ENOTSTARTED, -9009, "cache is not running")                             \
    XX(EDECODE, -9010, "store returned data it could not decode")              \
    XX(EOVERFLOW, -9011, "cache bounds exceeded")                              \
    XX(ECOMPACTED, -9012, "revision compacted or not yet reached")             \
    XX(EACCES, -13, "permission denied")

/** Error codes. */
typedef enum coalesce_errno {
#define COALESCE__ERR_ENUM(name, val, msg) COALESCE_##name = (val),
    COALESCE_ERRNO_MAP(COALESCE__ERR_ENUM)
#undef COALESCE__ERR_ENUM
        COALESCE_OK = 0 /**< Success. */
} coalesce_errno_t;

/**
 * @brief A human-readable message for an error code.
 * @param[in] err Any int; non-negative values give "success".
 * @return A static string, never NULL; unknown codes give "unknown error".
 * Thread safety: yes. Async-signal-safe: yes.
 * @since 0.1
 */
COALESCE_API const char *coalesce_strerror(int err);

/**
 * @brief The symbolic name of an error code ("COALESCE_ENOMEM").
 * @param[in] err Any int; non-negative values give "COALESCE_OK".
 * @return A static string, never NULL; unknown codes give "UNKNOWN".
 * Thread safety: yes. Async-signal-safe: yes.
 * @since 0.1
 */
COALESCE_API const char *coalesce_err_name(int err);

/**
 * @brief The library's version as COALESCE_VERSION_HEX of the build.
 *
 * Compare (coalesce_version() >> 16) with COALESCE_VERSION_MAJOR at start-up
 * to catch a header/library mismatch without refusing newer minor releases.
 * @return (major << 16) | (minor << 8) | patch of the library that runs.
 * Thread safety: yes.
 * @since 0.1
 */
COALESCE_API unsigned coalesce_version(void);

/**
 * @brief The library's version string, COALESCE_VERSION_STRING of the build
 *        ("0.5.0").
 * @return A static string, never NULL.
 * Thread safety: yes.
 * @since 0.1
 */
COALESCE_API const char *coalesce_version_string(void);

/* The allocator's functions (see coalesce_replace_allocator()): the library
 * never asks for 0 bytes, and checks calloc's multiplication itself. */
typedef void *(*coalesce_malloc_fn)(size_t size);
typedef void *(*coalesce_realloc_fn)(void *ptr, size_t size);
typedef void *(*coalesce_calloc_fn)(size_t count, size_t size);
typedef void (*coalesce_free_fn)(void *ptr);

/**
 * @brief Replace the allocator used for every allocation the library makes.
 *
 * The functions must behave like their C library namesakes and be
 * thread-safe: they are called from every thread that calls the library and
 * from its own threads (cache and store threads). This is the one piece of
 * process-wide state in the library; it exists so that hosts can use their
 * own allocator and tests can inject allocation failures. libcoalesce-etcd
 * does not use it (etcd.h).
 *
 * @param[in] malloc_fn,realloc_fn,calloc_fn,free_fn Borrowed function
 *            pointers; none may be NULL.
 * @return 0 on success; COALESCE_EINVAL if a pointer is NULL;
 *         COALESCE_EBUSY once the library has allocated anything.
 * Thread safety: no; call it before any other libcoalesce function.
 * @since 0.1
 */
COALESCE_API int coalesce_replace_allocator(coalesce_malloc_fn malloc_fn,
                                            coalesce_realloc_fn realloc_fn,
                                            coalesce_calloc_fn calloc_fn,
                                            coalesce_free_fn free_fn);

#ifdef __cplusplus
}
#endif

#endif /* COALESCE_COMMON_H */

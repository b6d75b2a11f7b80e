/*
 * End-to-end harness: runs the example origin and proxy as child processes
 * and drives them over HTTP/1.1 on 127.0.0.1. Used by the proxy suite, the
 * demo and the proxy benchmark.
 *
 * Nothing here is thread-safe: call it from one thread. Every wait is
 * bounded in time.
 */
#ifndef COALESCE_TEST_E2E_H
#define COALESCE_TEST_E2E_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* --- Processes ------------------------------------------------------------ */

typedef struct e2e_proc {
    pid_t pid; /* 0 once stopped */
    int port;  /* the port it printed */
} e2e_proc_t;

/* E2E_BINDIR "/" name, in one of 8 static buffers reused in turn: valid
 * until 8 more calls. */
const char *e2e_bin(const char *name);

/*
 * Starts argv[0] (a path) with argv, stdout on a pipe and stderr inherited,
 * and waits up to 10 s for a stdout line containing " listening on ", whose
 * port (after the last ':') goes into p->port. The pipe is then closed: the
 * programs must print nothing else to stdout (they ignore SIGPIPE anyway).
 * The child is killed (SIGKILL) when the calling thread exits, so call this
 * from a thread that outlives the child.
 * Returns 0, or -1 (the child, if any, killed and reaped; p->pid is 0).
 */
int e2e_spawn(e2e_proc_t *p, const char *const argv[]);

/*
 * SIGTERM, then up to 5 s for it to exit, then SIGKILL. Returns its exit
 * status (0: clean exit), or -1 if it was killed by a signal, had to be
 * killed, or was not running. Always by PID; p->pid is 0 afterwards.
 */
int e2e_stop(e2e_proc_t *p);

/* --- Concurrent HTTP requests --------------------------------------------- */

#define E2E_MAX_REQS 1024

enum e2e_error {
    E2E_OK = 0,
    E2E_ECONNECT = -1, /* connect failed */
    E2E_ERESET = -2,   /* reset (RST) or another socket error */
    E2E_EEOF = -3,     /* closed (FIN) before the end of the response */
    E2E_ETIMEOUT = -4, /* not done within the run's timeout */
    E2E_EPARSE = -5,   /* not valid HTTP */
    E2E_EABORTED = -6, /* closed by us: abort_after, close_when_others_done */
};

typedef struct e2e_req {
    /* Input. Strings are borrowed for the duration of e2e_run. */
    int port;
    const char *method;   /* "GET" or "HEAD"; NULL means GET */
    const char *path;     /* request target, query included */
    const char *headers;  /* extra header lines, each ending "\r\n"; or NULL */
    uint64_t read_rate;   /* read at most this many bytes/s; 0: unlimited */
    uint64_t abort_after; /* reset after this many body bytes; 0: never */
    int verify;           /* check each body byte against the origin's object */
    int close_when_others_done; /* closed (E2E_EABORTED) once every request
                                   without this flag is done */
    int abort_at_send; /* closed (E2E_EABORTED) as soon as the request is
                          written: 1 with an RST, 2 with a FIN; 0: never */
    uint64_t abort_after_head; /* reset (E2E_EABORTED) once this many
                                  response bytes have come while the head is
                                  still incomplete; 0: never */

    /* Output, set by e2e_run. Times are microseconds since the instant every
     * request was sent, -1 if never reached. */
    int status;             /* 0 if no response head arrived */
    char x_cache[17];       /* X-Cache header, truncated; "" if absent */
    int64_t content_length; /* -1 if absent */
    char content_range[65];
    char etag[81];
    uint64_t body_bytes; /* body bytes received (up to abort_after) */
    uint64_t mismatches; /* with verify: bytes that differ from the object */
    int error;           /* enum e2e_error */
    int complete;        /* the body ended as the HTTP framing says */
    int64_t t_headers, t_first_body, t_done; /* t_first_body = t_headers for
                                                an empty body */
    uint64_t body_bytes_at_others_done;      /* body_bytes when the last request
                                                without close_when_others_done was
                                                done */
} e2e_req_t;

/*
 * Runs the n requests (n <= E2E_MAX_REQS) concurrently on a private loop,
 * each on its own connection to 127.0.0.1:port. Every connection is made
 * first; then all requests are written in the same loop iteration. A
 * connection is closed when its response completes (one request per
 * connection). Bodies are not stored; with verify, byte k of a body is
 * compared with byte (start + k) of the object named by the path without its
 * query, where start is the Content-Range start for a 206 and 0 otherwise.
 * Whatever is not done after timeout_ms gets E2E_ETIMEOUT.
 * Returns the number of requests with error != 0, or -1 if the run could
 * not start (bad arguments, no memory).
 */
int e2e_run(e2e_req_t *reqs, size_t n, int timeout_ms);

/*
 * A blocking GET of http://127.0.0.1:port/path (10 s timeout). On success
 * returns 0, *status_out is the status and *body_out a malloc'd,
 * NUL-terminated body (the caller frees it). Returns -1 on failure, with
 * *body_out NULL.
 */
int e2e_get(int port, const char *path, char **body_out, int *status_out);

/* --- Content and numbers -------------------------------------------------- */

/* The origin's seed for an object: FNV-1a 32 of the path up to any '?'. */
uint32_t e2e_path_seed(const char *path);

/* Byte off of the object with that seed (the formula in examples/origin.c). */
uint8_t e2e_content_byte(uint32_t seed, uint64_t off);

/* Bytes [off, off + len) of that object into dst. */
void e2e_content_fill(uint32_t seed, uint64_t off, uint8_t *dst, size_t len);

/*
 * Finds the number at a dotted key path in a JSON text, e.g.
 * "paths./big.requests" or "flight.joins"; keys may themselves contain dots
 * ("paths./a.bin.gets" works). Meant for our own outputs: no unescaping of
 * keys. Returns 0 with *out set, or -1 if absent or not a non-negative
 * integer.
 */
int e2e_json_u64(const char *json, const char *dotted_key, uint64_t *out);

/* The p-th percentile (0-100, nearest rank) of v[0..n); sorts v in place.
 * NAN if n is 0. */
double e2e_percentile(double *v, size_t n, double p);

#endif

/*
 * proxy.c: a collapsing caching reverse proxy on one libuv loop.
 *
 *   client --HTTP/1.1--> proxy --libcurl multi--> origin
 *
 * - A GET miss goes through flight_do(): the first request for a URL leads
 *   one upstream fetch, every request that arrives while it streams joins
 *   it and gets the same bytes as they arrive (X-Cache: MISS for the leader,
 *   COLLAPSED for the others). Nobody waits for the whole body, nobody polls.
 * - A Range request goes through flight_do_range(): concurrent ranges of one
 *   object share upstream range fetches, so each byte is fetched once. A
 *   suffix range (bytes=-n) first learns the size with a collapsed HEAD.
 * - Completed 200 responses are kept in an LRU of whole objects (X-Cache:
 *   HIT); the cache holds the very buffers the flight streamed, no copy.
 * - HEAD is answered from the cache, or collapsed as its own flight.
 * - Each client is fed by its own loop reader (flight_uv_*). A client that
 *   does not keep up stops its reader; past --max-lag it is detached, and
 *   resumed where it was from the cache or with an upstream range request.
 *   A client that leaves affects no one else.
 * - GET /__coalesce/stats returns counters as JSON.
 *
 * Build (Debian: libuv1-dev libhttp-parser-dev libcurl4-openssl-dev):
 *   cc -std=c11 proxy.c $(pkg-config --cflags --libs libcoalesce libuv libcurl)
 *      -lhttp_parser
 * Run:
 *   ./proxy --listen 127.0.0.1:8080 --upstream http://127.0.0.1:8081
 */
#define _POSIX_C_SOURCE 200809L

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <curl/curl.h>
#include <http_parser.h>
#include <uv.h>

#include <coalesce.h>
#include <coalesce/uv.h>

/* A client's reader stops when this much is queued for its socket, and
 * starts again below LOW_WATER. Longer request targets get a 414. (The
 * fuzzer makes these small.) */
#ifndef HIGH_WATER
#    define HIGH_WATER (1024 * 1024)
#    define LOW_WATER  (256 * 1024)
#    define MAX_URL    8192
#endif
#define BUCKETS     4096
#define UNKNOWN_LEN UINT64_MAX

/* --- State -----------------------------------------------------------------
 */

typedef struct entry entry_t;
typedef struct conn conn_t;
typedef struct upstream upstream_t;

static struct {
    /* Flags. */
    const char *listen;
    const char *upstream;
    uint64_t cache_size;
    uint64_t chunk_size;
    uint64_t max_lag;
    uint32_t wait_timeout_ms;
    int sndbuf;
    /* Runtime. */
    uv_loop_t *loop;
    uv_tcp_t server;
    uv_signal_t sigterm, sigint;
    uv_timer_t curl_timer;
    CURLM *multi;
    flight_group_t *group;
    flight_uv_t *fuv;
    bool stopping;
    conn_t *conns;         /* open client connections */
    upstream_t *upstreams; /* transfers in progress */
    /* The object cache: a hash table and an LRU list. */
    entry_t *buckets[BUCKETS];
    entry_t *lru_head, *lru_tail; /* head = most recent */
    uint64_t cache_bytes, cache_objects;
    /* Counters for /__coalesce/stats. */
    uint64_t requests, hits, misses, collapsed, resumed, resumed_from_cache;
    uint64_t errors_sent, aborted, client_gone, upstream_requests;
    uint64_t upstream_bytes, conns_open, idle_closed;
    uint64_t idle_timeout_ms;
} P;

static int curl_fetch(upstream_t *u);
static void tcp_close(uv_tcp_t *t, bool reset, uv_close_cb cb);

/* Where the proxy meets the network: client sockets and upstream transfers.
 * The fuzzer (test/fuzz/fuzz_proxy.c) points these at memory. */
static struct {
    int (*write)(uv_write_t *req,
                 uv_stream_t *s,
                 const uv_buf_t bufs[],
                 unsigned n,
                 uv_write_cb cb);
    size_t (*queued)(const uv_stream_t *s); /* bytes not yet sent */
    int (*read_start)(uv_stream_t *s, uv_alloc_cb alloc, uv_read_cb cb);
    int (*read_stop)(uv_stream_t *s);
    int (*shutdown)(uv_shutdown_t *req, uv_stream_t *s, uv_shutdown_cb cb);
    void (*close)(uv_tcp_t *t, bool reset, uv_close_cb cb);
    int (*fetch)(upstream_t *u); /* start the transfer: 0, or -1 */
} net = {
    .write = uv_write,
    .queued = uv_stream_get_write_queue_size,
    .read_start = uv_read_start,
    .read_stop = uv_read_stop,
    .shutdown = uv_shutdown,
    .close = tcp_close,
    .fetch = curl_fetch,
};

/* Metas are the proxy's own format, opaque to the library:
 * "<status> <content-length or -1>\n<validator>\n<header lines to forward>" */
typedef struct meta {
    int status;
    int64_t clen;
    char validator[256];
    const char *fwd; /* borrowed "Name: value\r\n..." */
    size_t fwdlen;
} meta_t;

static bool meta_parse(const void *p, size_t len, meta_t *m)
{
    if (!p) /* the writer set none */
        return false;
    const char *s = p, *end = s + len;
    char line[64];
    const char *nl = memchr(s, '\n', len);
    if (!nl || (size_t)(nl - s) >= sizeof(line))
        return false;
    memcpy(line, s, (size_t)(nl - s));
    line[nl - s] = 0;
    long long clen;
    if (sscanf(line, "%d %lld", &m->status, &clen) != 2)
        return false;
    m->clen = clen;
    s = nl + 1;
    nl = memchr(s, '\n', (size_t)(end - s));
    if (!nl || (size_t)(nl - s) >= sizeof(m->validator))
        return false;
    memcpy(m->validator, s, (size_t)(nl - s));
    m->validator[nl - s] = 0;
    m->fwd = nl + 1;
    m->fwdlen = (size_t)(end - m->fwd);
    return true;
}

/* --- The object cache ------------------------------------------------------
 */

/* A complete 200 response: its meta and the flight's own body buffers. */
struct entry {
    char *url;
    uint64_t hash;
    char *meta;
    size_t metalen;
    char validator[256];
    coalesce_buf_t **bufs; /* each used whole, in order */
    size_t nbufs;
    uint64_t size;
    unsigned refs;    /* the table's and each response's */
    uint64_t expires; /* uv_now() ms after which it is stale; 0: never */
    bool in_table;
    entry_t *hnext, *prev, *next;
};

static uint64_t hash_url(const char *s)
{
    uint64_t h = 14695981039346656037ull;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

static void entry_unref(entry_t *e)
{
    if (--e->refs)
        return;
    for (size_t i = 0; i < e->nbufs; i++)
        coalesce_buf_unref(e->bufs[i]);
    free(e->bufs);
    free(e->meta);
    free(e->url);
    free(e);
}

static void lru_unlink(entry_t *e)
{
    entry_t **pp = &P.buckets[e->hash % BUCKETS];
    while (*pp != e)
        pp = &(*pp)->hnext;
    *pp = e->hnext;
    if (e->prev)
        e->prev->next = e->next;
    else
        P.lru_head = e->next;
    if (e->next)
        e->next->prev = e->prev;
    else
        P.lru_tail = e->prev;
    e->in_table = false;
    P.cache_bytes -= e->size;
    P.cache_objects--;
    entry_unref(e);
}

static void lru_push_front(entry_t *e)
{
    e->prev = NULL;
    e->next = P.lru_head;
    if (P.lru_head)
        P.lru_head->prev = e;
    P.lru_head = e;
    if (!P.lru_tail)
        P.lru_tail = e;
}

/* A hit moves the entry to the front; the caller gets a reference. */
static entry_t *lru_get(const char *url)
{
    uint64_t h = hash_url(url);
    for (entry_t *e = P.buckets[h % BUCKETS]; e; e = e->hnext) {
        if (e->hash == h && !strcmp(e->url, url)) {
            if (e->expires && uv_now(P.loop) >= e->expires) {
                lru_unlink(e); /* stale: no revalidation here, refetch */
                return NULL;
            }
            if (e->prev) {
                e->prev->next = e->next;
                if (e->next)
                    e->next->prev = e->prev;
                else
                    P.lru_tail = e->prev;
                lru_push_front(e);
            }
            e->refs++;
            return e;
        }
    }
    return NULL;
}

/* Adopts e's buffers; evicts from the tail to stay within --cache-size. */
static void lru_put(entry_t *e)
{
    if (e->size > P.cache_size / 4) {
        entry_unref(e); /* too big to be worth it */
        return;
    }
    entry_t *old = lru_get(e->url);
    if (old) {
        lru_unlink(old);
        entry_unref(old);
    }
    while (P.lru_tail && P.cache_bytes + e->size > P.cache_size)
        lru_unlink(P.lru_tail);
    e->hash = hash_url(e->url);
    e->hnext = P.buckets[e->hash % BUCKETS];
    P.buckets[e->hash % BUCKETS] = e;
    e->in_table = true;
    lru_push_front(e);
    P.cache_bytes += e->size;
    P.cache_objects++;
}

/* --- Upstream: libcurl's multi interface on the loop -----------------------
 */

enum { UP_GET, UP_HEAD, UP_RANGE };

struct upstream {
    CURL *easy;
    flight_writer_t *w;
    int kind;
    uint64_t first, last; /* UP_RANGE: the bytes asked for */
    char *url;            /* the request target, also the cache key */
    long status;
    int64_t clen;
    char etag[256], lastmod[128], crange[128];
    bool no_store;    /* Set-Cookie, Vary, no-store, no-cache, private */
    uint64_t max_age; /* seconds, or UINT64_MAX when not given */
    char *fwd;        /* header lines to forward */
    size_t fwdlen, fwdcap;
    bool in_head;      /* between a status line and its blank line */
    bool headers_done; /* those of the final response */
    int err;           /* the writer refused: abort the transfer */
    /* Cache fill: the buffers written, while the object may be cached. */
    coalesce_buf_t **fill;
    size_t nfill, capfill;
    uint64_t filled;
    bool fill_ok;
    upstream_t *prev, *next;
};

typedef struct sock {
    uv_poll_t poll;
    curl_socket_t fd;
} sock_t;

static void check_multi(void);

static void on_poll(uv_poll_t *h, int status, int events)
{
    sock_t *s = h->data;
    int flags = 0;
    if (status < 0)
        flags = CURL_CSELECT_ERR;
    else {
        if (events & UV_READABLE)
            flags |= CURL_CSELECT_IN;
        if (events & UV_WRITABLE)
            flags |= CURL_CSELECT_OUT;
    }
    int running;
    curl_multi_socket_action(P.multi, s->fd, flags, &running);
    check_multi();
}

static void on_poll_closed(uv_handle_t *h)
{
    free(h->data);
}

static int on_curl_socket(
    CURL *easy, curl_socket_t fd, int action, void *userp, void *socketp)
{
    (void)easy;
    (void)userp;
    sock_t *s = socketp;
    if (action == CURL_POLL_REMOVE) {
        if (s) {
            uv_poll_stop(&s->poll);
            curl_multi_assign(P.multi, fd, NULL);
            uv_close((uv_handle_t *)&s->poll, on_poll_closed);
        }
        return 0;
    }
    if (!s) {
        s = calloc(1, sizeof(*s));
        if (!s || uv_poll_init_socket(P.loop, &s->poll, fd) != 0) {
            free(s);
            return -1;
        }
        s->fd = fd;
        s->poll.data = s;
        curl_multi_assign(P.multi, fd, s);
    }
    int ev = (action & CURL_POLL_IN ? UV_READABLE : 0) |
             (action & CURL_POLL_OUT ? UV_WRITABLE : 0);
    uv_poll_start(&s->poll, ev, on_poll);
    return 0;
}

static void on_curl_timeout(uv_timer_t *t)
{
    (void)t;
    int running;
    curl_multi_socket_action(P.multi, CURL_SOCKET_TIMEOUT, 0, &running);
    check_multi();
}

static int on_curl_timer(CURLM *m, long ms, void *userp)
{
    (void)m;
    (void)userp;
    if (ms < 0)
        uv_timer_stop(&P.curl_timer);
    else /* 0 means "now": on the next loop turn, never from here. */
        uv_timer_start(&P.curl_timer, on_curl_timeout, (uint64_t)ms, 0);
    return 0;
}

static bool is_hop_by_hop(const char *name, size_t n)
{
    static const char *const skip[] = {"connection",
                                       "keep-alive",
                                       "proxy-connection",
                                       "transfer-encoding",
                                       "te",
                                       "trailer",
                                       "upgrade",
                                       "content-length",
                                       "content-range",
                                       "accept-ranges",
                                       "x-cache"};
    for (size_t i = 0; i < sizeof(skip) / sizeof(skip[0]); i++)
        if (strlen(skip[i]) == n && !strncasecmp(name, skip[i], n))
            return true;
    /* http_parser 2.9 (Debian's, and clients built on it) takes any name
     * that starts so for Transfer-Encoding, then refuses our framing. */
    return n > 17 && !strncasecmp(name, "transfer-encoding", 17);
}

/* "name: value" with a token for a name and no control characters but tabs
 * in the value (RFC 9110 5.1, 5.5). Anything else, forwarded, could break
 * or split the response to the client (libcurl hands on the lines as
 * received, a CR in the middle included), so it is dropped. */
static bool header_ok(const char *line, size_t n, size_t namelen)
{
    if (namelen == 0)
        return false;
    for (size_t i = 0; i < namelen; i++) {
        unsigned char ch = (unsigned char)line[i];
        if (!ch || (!isalnum(ch) && !strchr("!#$%&'*+-.^_`|~", ch)))
            return false;
    }
    for (size_t i = namelen + 1; i < n; i++) {
        unsigned char ch = (unsigned char)line[i];
        if ((ch < 32 && ch != '\t') || ch == 127)
            return false;
    }
    return true;
}

static void copy_value(char *dst, size_t cap, const char *v, size_t n)
{
    if (n >= cap)
        n = cap - 1;
    memcpy(dst, v, n);
    dst[n] = 0;
}

static bool parse_content_range(const char *s,
                                uint64_t *first,
                                uint64_t *last,
                                uint64_t *total)
{
    unsigned long long a, b, t;
    if (sscanf(s, "bytes %llu-%llu/%llu", &a, &b, &t) == 3) {
        *total = t;
    } else if (sscanf(s, "bytes %llu-%llu/*", &a, &b) == 2) {
        *total = FLIGHT_SIZE_UNKNOWN;
    } else if (sscanf(s, "bytes */%llu", &t) == 1) {
        *first = *last = FLIGHT_RANGE_END;
        *total = t;
        return true;
    } else {
        return false;
    }
    *first = a;
    *last = b;
    return a <= b;
}

/* The status line and headers are in: tell the flight. */
/* Only a strong ETag may join bytes of different responses (RFC 9110
 * 13.1.5): a weak one or a Last-Modified date would let a changed object
 * be spliced into one body. */
static const char *strong_validator(const upstream_t *u)
{
    return strncmp(u->etag, "W/", 2) ? u->etag : "";
}

static int upstream_headers_done(upstream_t *u)
{
    const char *validator = strong_validator(u);
    if (u->kind == UP_RANGE) {
        uint64_t first, last, total;
        if (u->status == 206 || u->status == 416) {
            if (!parse_content_range(u->crange, &first, &last, &total))
                return COALESCE_EUPSTREAM;
        } else if (u->status == 200 && u->clen > 0) {
            first = 0; /* the whole object: the library checks the fit */
            last = (uint64_t)u->clen - 1;
            total = (uint64_t)u->clen;
        } else {
            return COALESCE_EUPSTREAM; /* 404, 5xx...: a 502 for range readers
                                        */
        }
        int rc = flight_set_range(u->w, first, last, total, validator,
                                  strlen(validator));
        if (rc != 0)
            return rc;
    } else if (u->status == 206 || u->status == 416) {
        /* About a range nobody asked for: no way to pass it on. */
        return COALESCE_EUPSTREAM;
    }
    char head[400];
    int n = snprintf(head, sizeof(head), "%ld %" PRId64 "\n%s\n",
                     u->kind == UP_RANGE ? 206 : u->status, u->clen, validator);
    size_t len = (size_t)n + u->fwdlen;
    char *meta = malloc(len ? len : 1);
    if (!meta)
        return COALESCE_ENOMEM;
    memcpy(meta, head, (size_t)n);
    if (u->fwdlen)
        memcpy(meta + n, u->fwd, u->fwdlen);
    int rc = flight_set_meta(u->w, meta, len);
    free(meta);
    u->fill_ok = u->kind == UP_GET && u->status == 200 && u->clen >= 0 &&
                 (uint64_t)u->clen <= P.cache_size / 4 && !u->no_store &&
                 u->max_age != 0;
    return rc;
}

/* The code of "HTTP/x SSS reason": three digits, 100 to 599 (RFC 9110
 * 15); anything else is 0, a reply that fails (a 502 for the clients). */
static int parse_status(const char *line, size_t n)
{
    const char *sp = memchr(line, ' ', n), *end = line + n;
    if (!sp || end - sp < 4 || (end - sp > 4 && sp[4] != ' '))
        return 0;
    int code = 0;
    for (int i = 1; i <= 3; i++) {
        if (!isdigit((unsigned char)sp[i]))
            return 0;
        code = code * 10 + (sp[i] - '0');
    }
    return code >= 100 && code <= 599 ? code : 0;
}

static size_t on_curl_header(char *line, size_t size, size_t nitems, void *ud)
{
    upstream_t *u = ud;
    size_t n = size * nitems;
    if (u->headers_done) /* trailers: the meta has gone out already */
        return size * nitems;
    while (n && (line[n - 1] == '\n' || line[n - 1] == '\r'))
        n--;
    if (!u->in_head && n >= 5 && !strncmp(line, "HTTP/", 5)) {
        /* A status line: the first, or the one after a 1xx. */
        u->in_head = true;
        u->status = parse_status(line, n);
        u->clen = -1;
        u->etag[0] = u->lastmod[0] = u->crange[0] = 0;
        u->no_store = false;
        u->max_age = UINT64_MAX;
        u->fwdlen = 0;
        return size * nitems;
    }
    if (n == 0) { /* end of the headers; a 1xx is followed by another set */
        u->in_head = false;
        if (u->status >= 200 && !u->headers_done) {
            u->headers_done = true;
            int rc = upstream_headers_done(u);
            if (rc != 0) {
                u->err = rc;
                return 0; /* abort the transfer */
            }
        }
        return size * nitems;
    }
    const char *colon = memchr(line, ':', n);
    if (!colon || !header_ok(line, n, (size_t)(colon - line)))
        return size * nitems;
    size_t nl = (size_t)(colon - line);
    const char *v = colon + 1;
    while (v < line + n && (*v == ' ' || *v == '\t'))
        v++;
    size_t vl = (size_t)(line + n - v);
    if (nl == 14 && !strncasecmp(line, "content-length", nl))
        u->clen = strtoll(v, NULL, 10);
    else if (nl == 4 && !strncasecmp(line, "etag", nl))
        copy_value(u->etag, sizeof(u->etag), v, vl);
    else if (nl == 13 && !strncasecmp(line, "last-modified", nl))
        copy_value(u->lastmod, sizeof(u->lastmod), v, vl);
    else if (nl == 13 && !strncasecmp(line, "content-range", nl))
        copy_value(u->crange, sizeof(u->crange), v, vl);
    else if (nl == 13 && !strncasecmp(line, "cache-control", nl)) {
        char cc[256];
        copy_value(cc, sizeof(cc), v, vl);
        for (char *q = cc; *q; q++)
            *q = (char)tolower((unsigned char)*q);
        if (strstr(cc, "no-store") || strstr(cc, "no-cache") ||
            strstr(cc, "private"))
            u->no_store = true;
        const char *ma = strstr(cc, "s-maxage=");
        ma = ma ? ma + 9 : (ma = strstr(cc, "max-age=")) ? ma + 8 : NULL;
        if (ma)
            u->max_age = strtoull(ma, NULL, 10);
    } else if ((nl == 10 && !strncasecmp(line, "set-cookie", nl)) ||
               (nl == 4 && !strncasecmp(line, "vary", nl))) {
        u->no_store = true; /* per user or per variant: not for everyone */
    }
    if (is_hop_by_hop(line, nl))
        return size * nitems;
    if (u->fwdlen + n + 2 > u->fwdcap) {
        size_t cap = (u->fwdlen + n + 2) * 2;
        char *p = realloc(u->fwd, cap);
        if (!p)
            return 0;
        u->fwd = p;
        u->fwdcap = cap;
    }
    memcpy(u->fwd + u->fwdlen, line, n);
    memcpy(u->fwd + u->fwdlen + n, "\r\n", 2);
    u->fwdlen += n + 2;
    return size * nitems;
}

/* Body bytes: one buffer per callback, handed to the flight without a
 * copy and, while the object may be cached, kept for the cache too. */
static size_t on_curl_body(char *data, size_t size, size_t nmemb, void *ud)
{
    upstream_t *u = ud;
    size_t n = size * nmemb;
    coalesce_buf_t *b;
    if (!u->headers_done) { /* no final status: nothing to pass on */
        u->err = COALESCE_EUPSTREAM;
        return 0;
    }
    if (coalesce_buf_new(&b, n) != 0) {
        u->err = COALESCE_ENOMEM;
        return 0;
    }
    memcpy(coalesce_buf_mutable(b), data, n);
    int rc = flight_write_buf(u->w, b, 0, n);
    if (rc != 0) {
        coalesce_buf_unref(b);
        u->err = rc;
        return 0;
    }
    P.upstream_bytes += n;
    if (u->fill_ok) {
        if (u->nfill == u->capfill) {
            size_t cap = u->capfill ? u->capfill * 2 : 64;
            coalesce_buf_t **p = realloc(u->fill, cap * sizeof(*p));
            if (!p) {
                u->fill_ok = false; /* not cached; the flight goes on */
                coalesce_buf_unref(b);
                return n;
            }
            u->fill = p;
            u->capfill = cap;
        }
        u->fill[u->nfill++] = b; /* the fill keeps this reference */
        u->filled += n;
        return n;
    }
    coalesce_buf_unref(b);
    return n;
}

static void upstream_free(upstream_t *u)
{
    if (u->prev)
        u->prev->next = u->next;
    else
        P.upstreams = u->next;
    if (u->next)
        u->next->prev = u->prev;
    if (u->easy) {
        curl_multi_remove_handle(P.multi, u->easy);
        curl_easy_cleanup(u->easy);
    }
    for (size_t i = 0; i < u->nfill; i++)
        coalesce_buf_unref(u->fill[i]);
    free(u->fill);
    free(u->fwd);
    free(u->url);
    free(u);
}

/* A transfer finished: end the flight and maybe keep the object. */
static void upstream_done(upstream_t *u, CURLcode res)
{
    int status = res == CURLE_OK && u->headers_done ? 0 : COALESCE_EUPSTREAM;
    if (u->err)
        status = u->err;
    if (res != CURLE_OK && !u->err && !P.stopping)
        fprintf(stderr, "proxy: upstream %s: %s\n", u->url,
                curl_easy_strerror(res));
    flight_end(u->w, status); /* may already be ended: then a no-op */
    flight_writer_release(u->w);
    if (status == 0 && u->fill_ok && u->filled == (uint64_t)u->clen) {
        entry_t *e = calloc(1, sizeof(*e));
        meta_t m;
        char head[400];
        int hn = snprintf(head, sizeof(head), "200 %" PRId64 "\n%s\n", u->clen,
                          strong_validator(u));
        if (e && (e->url = strdup(u->url)) &&
            (e->meta = malloc((size_t)hn + u->fwdlen + 1))) {
            memcpy(e->meta, head, (size_t)hn);
            if (u->fwdlen)
                memcpy(e->meta + hn, u->fwd, u->fwdlen);
            e->metalen = (size_t)hn + u->fwdlen;
            meta_parse(e->meta, e->metalen, &m);
            strcpy(e->validator, m.validator);
            e->bufs = u->fill; /* adopted */
            e->nbufs = u->nfill;
            e->size = u->filled;
            e->refs = 1;
            if (u->max_age != UINT64_MAX)
                e->expires = uv_now(P.loop) + u->max_age * 1000;
            u->fill = NULL;
            u->nfill = 0;
            lru_put(e);
        } else if (e) {
            free(e->url);
            free(e);
        }
    }
    upstream_free(u);
}

static void check_multi(void)
{
    CURLMsg *msg;
    int left;
    while ((msg = curl_multi_info_read(P.multi, &left))) {
        if (msg->msg != CURLMSG_DONE)
            continue;
        upstream_t *u;
        curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&u);
        upstream_done(u, msg->data.result);
    }
}

/* The transfer, with libcurl's multi interface: 0, or -1. */
static int curl_fetch(upstream_t *u)
{
    size_t blen = strlen(P.upstream), ulen = strlen(u->url);
    char *full = malloc(blen + ulen + 1);
    CURL *e = full ? curl_easy_init() : NULL;
    if (!e) {
        free(full);
        return -1;
    }
    u->easy = e;
    memcpy(full, P.upstream, blen);
    memcpy(full + blen, u->url, ulen + 1);
    curl_easy_setopt(e, CURLOPT_URL, full);
    free(full); /* libcurl copies strings */
    curl_easy_setopt(e, CURLOPT_PRIVATE, u);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_curl_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, u);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_curl_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, u);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
    curl_easy_setopt(e, CURLOPT_BUFFERSIZE, 65536L);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, 5000L);
    /* A stalled upstream fails its flight (and so its readers) in 30 s. */
    curl_easy_setopt(e, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(e, CURLOPT_LOW_SPEED_TIME, 30L);
    if (u->kind == UP_HEAD)
        curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
    if (u->kind == UP_RANGE) {
        char r[64];
        if (u->last == FLIGHT_RANGE_END)
            snprintf(r, sizeof(r), "%" PRIu64 "-", u->first);
        else
            snprintf(r, sizeof(r), "%" PRIu64 "-%" PRIu64, u->first, u->last);
        curl_easy_setopt(e, CURLOPT_RANGE, r);
    }
    return curl_multi_add_handle(P.multi, e) == CURLM_OK ? 0 : -1;
}

/* Start an upstream request for a flight; FLIGHT_FETCH_ASYNC on success. */
static int upstream_start(flight_writer_t *w,
                          int kind,
                          const char *url,
                          uint64_t first,
                          uint64_t last)
{
    if (P.stopping)
        return COALESCE_ECLOSING;
    upstream_t *u = calloc(1, sizeof(*u));
    if (!u || !(u->url = strdup(url))) {
        free(u);
        return COALESCE_ENOMEM;
    }
    u->w = w;
    u->kind = kind;
    u->first = first;
    u->last = last;
    u->clen = -1;
    u->max_age = UINT64_MAX;
    u->next = P.upstreams;
    if (P.upstreams)
        P.upstreams->prev = u;
    P.upstreams = u;
    if (net.fetch(u) != 0) {
        u->w = NULL;
        upstream_free(u);
        return COALESCE_ENOMEM;
    }
    P.upstream_requests++;
    return FLIGHT_FETCH_ASYNC;
}

static int fetch_get(flight_writer_t *w, void *url)
{
    return upstream_start(w, UP_GET, url, 0, FLIGHT_RANGE_END);
}

static int fetch_head(flight_writer_t *w, void *url)
{
    return upstream_start(w, UP_HEAD, url, 0, FLIGHT_RANGE_END);
}

static int
fetch_range(flight_writer_t *w, uint64_t first, uint64_t last, void *url)
{
    return upstream_start(w, UP_RANGE, url, first, last);
}

/* --- Client connections -----------------------------------------------------
 */

enum { REQ_NONE, REQ_GET, REQ_HEAD };

struct conn {
    uv_tcp_t tcp;
    http_parser parser;
    /* The request being parsed. */
    char url[MAX_URL + 1];
    size_t urllen;
    bool url_too_long;
    char field[32], value[128];
    size_t fieldlen, valuelen;
    bool in_value;
    char range[128];
    bool has_range, has_if_range;
    bool request_ready;
    /* Bytes read but not parsed yet (a pipelined request). */
    char *pending;
    size_t npending, cappending;
    /* The response in progress. */
    bool busy;
    int mode; /* MODE_* of the reader */
    /* MODE_PROBE, MODE_SUFFIX: bytes=-suffix; or, UNKNOWN_LEN, a probe
     * for the 416 of bytes=range_first-range_last */
    uint64_t suffix, range_first, range_last;
    uint64_t probed; /* the size a HEAD probe found, or UNKNOWN_LEN */
    bool http11;     /* the client speaks HTTP/1.1: chunked is allowed */
    bool head;       /* a HEAD: no body in any response to it */
    bool no_body;    /* 1xx, 204, 304: whatever upstream sends is dropped */
    bool reading;    /* uv_read_start() is on */
    bool in_parse;   /* inside parse_pending(): it loops, no recursion */
    uint64_t resume_from; /* MODE_RESUME: where this piece started */
    uv_timer_t idle;      /* no progress for --idle-timeout: reset */
    int handles;          /* open handles (tcp, idle); freed at 0 */
    bool shutting;        /* a graceful close waits for the writes */
    bool handles_closed;
    bool keep_alive;
    flight_uv_reader_t *ur;
    bool reader_stopped;
    bool headers_sent;
    bool chunked;
    uint64_t pos;       /* object offset of the reader's next byte */
    uint64_t want_next; /* next object byte the client needs */
    uint64_t want_last; /* its last one, or UNKNOWN_LEN (to the end) */
    char validator[256];
    bool closing;
    conn_t *prev, *next;
};

typedef struct wreq {
    uv_write_t req;
    conn_t *c;
    coalesce_buf_t *buf; /* a flight segment kept until written */
    entry_t *entry;      /* a cache entry kept until written */
    char *heap;          /* response headers */
    char framing[24];    /* a chunk's size line */
} wreq_t;

enum {
    MODE_OBJECT, /* a GET: the whole object */
    MODE_HEAD,   /* a HEAD */
    MODE_RANGE,  /* bytes=a-b or a- */
    MODE_PROBE,  /* a HEAD for the size (bytes=-n, a 416), then MODE_RANGE */
    MODE_SUFFIX, /* bytes=-n without a size: the object's tail */
    MODE_RESUME  /* the rest after a detach, from a range flight */
};

static void conn_close(conn_t *c, bool reset);
static void response_finished(conn_t *c);
static void parse_pending(conn_t *c);
static void reader_start(conn_t *c);
static void conn_flow(conn_t *c);
static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf);
static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf);

static void on_conn_closed(uv_handle_t *h)
{
    conn_t *c = h->data;
    if (--c->handles)
        return;
    free(c->pending);
    free(c);
    P.conns_open--;
}

static void close_handles(conn_t *c, bool reset)
{
    if (c->handles_closed)
        return;
    c->handles_closed = true;
    uv_close((uv_handle_t *)&c->idle, on_conn_closed);
    net.close(&c->tcp, reset, on_conn_closed);
}

static void tcp_close(uv_tcp_t *t, bool reset, uv_close_cb cb)
{
    if (!reset || uv_tcp_close_reset(t, cb) != 0)
        uv_close((uv_handle_t *)t, cb);
}

static void on_shutdown(uv_shutdown_t *req, int status)
{
    (void)status;
    conn_t *c = req->data;
    free(req);
    close_handles(c, false);
}

/* A graceful close lets the queued writes go out first (uv_close alone
 * would cancel them), bounded by the idle timer; a reset sends an RST, so
 * that a client in the middle of a body knows it did not get all of it. */
static void conn_close(conn_t *c, bool reset)
{
    if (!c->closing) {
        c->closing = true;
        if (c->ur) {
            flight_uv_reader_close(c->ur); /* the flight goes on for others */
            c->ur = NULL;
        }
        if (c->prev)
            c->prev->next = c->next;
        else
            P.conns = c->next;
        if (c->next)
            c->next->prev = c->prev;
    }
    if (reset || c->shutting) {
        close_handles(c, reset);
        return;
    }
    uv_shutdown_t *req = malloc(sizeof(*req));
    if (req) {
        req->data = c;
        if (net.shutdown(req, (uv_stream_t *)&c->tcp, on_shutdown) == 0) {
            c->shutting = true;
            return;
        }
        free(req);
    }
    close_handles(c, false);
}

/* Any progress (bytes read, a write completed) restarts the idle timer. */
static void on_idle(uv_timer_t *t)
{
    conn_t *c = t->data;
    P.idle_closed++;
    conn_close(c, true);
}

static void conn_progress(conn_t *c)
{
    if (!c->handles_closed && P.idle_timeout_ms)
        uv_timer_start(&c->idle, on_idle, P.idle_timeout_ms, 0);
}

static void on_written(uv_write_t *req, int status)
{
    wreq_t *w = (wreq_t *)req;
    conn_t *c = w->c;
    coalesce_buf_unref(w->buf);
    if (w->entry)
        entry_unref(w->entry);
    free(w->heap);
    free(w);
    if (status < 0) {
        if (!c->closing)
            P.client_gone++;
        conn_close(c, true);
        return;
    }
    conn_progress(c);
    /* Backpressure released: let the reader go on. */
    if (c->ur && c->reader_stopped &&
        net.queued((uv_stream_t *)&c->tcp) <= LOW_WATER) {
        c->reader_stopped = false;
        reader_start(c);
    }
    parse_pending(c); /* a pipelined request held back by a full queue */
}

static int conn_write(conn_t *c, uv_buf_t *bufs, unsigned n, wreq_t *w)
{
    w->c = c;
    int rc = net.write(&w->req, (uv_stream_t *)&c->tcp, bufs, n, on_written);
    if (rc < 0) {
        coalesce_buf_unref(w->buf);
        if (w->entry)
            entry_unref(w->entry);
        free(w->heap);
        free(w);
        conn_close(c, true);
    }
    return rc;
}

static const char *reason(int status)
{
    switch (status) {
    case 200:
        return "OK";
    case 206:
        return "Partial Content";
    case 304:
        return "Not Modified";
    case 400:
        return "Bad Request";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 414:
        return "URI Too Long";
    case 416:
        return "Range Not Satisfiable";
    case 500:
        return "Internal Server Error";
    case 502:
        return "Bad Gateway";
    case 503:
        return "Service Unavailable";
    case 504:
        return "Gateway Timeout";
    default:
        return "Status";
    }
}

/* Response headers: Content-Length when clen >= 0, else chunked or
 * neither (HEAD, 204, 304, or a body delimited by the close). */
static char *build_head(conn_t *c,
                        int status,
                        const char *fwd,
                        size_t fwdlen,
                        int64_t clen,
                        const char *extra,
                        const char *xcache,
                        bool chunked,
                        size_t *len)
{
    size_t cap = 512 + fwdlen + (extra ? strlen(extra) : 0);
    char *h = malloc(cap);
    if (!h)
        return NULL;
    int n = snprintf(h, cap, "HTTP/1.1 %d %s\r\n", status, reason(status));
    if (fwdlen) {
        memcpy(h + n, fwd, fwdlen);
        n += (int)fwdlen;
    }
    if (clen >= 0)
        n += snprintf(h + n, cap - (size_t)n, "Content-Length: %" PRId64 "\r\n",
                      clen);
    else if (chunked)
        n += snprintf(h + n, cap - (size_t)n, "Transfer-Encoding: chunked\r\n");
    n += snprintf(h + n, cap - (size_t)n,
                  "%sAccept-Ranges: bytes\r\nX-Cache: %s\r\n"
                  "Connection: %s\r\n\r\n",
                  extra ? extra : "", xcache,
                  c->keep_alive ? "keep-alive" : "close");
    *len = (size_t)n;
    return h;
}

static void send_head(conn_t *c, char *h, size_t len)
{
    wreq_t *w = calloc(1, sizeof(*w));
    if (!h || !w) {
        free(h);
        free(w);
        conn_close(c, true);
        return;
    }
    w->heap = h;
    uv_buf_t b = uv_buf_init(h, (unsigned)len);
    c->headers_sent = true;
    conn_write(c, &b, 1, w);
}

/* A short complete response generated by the proxy itself. */
static void send_simple_x(conn_t *c,
                          int status,
                          const char *ctype,
                          const char *body,
                          const char *extra,
                          const char *xcache)
{
    if (status >= 500)
        P.errors_sent++;
    size_t blen = strlen(body);
    char fwd[128];
    snprintf(fwd, sizeof(fwd), "Content-Type: %s\r\n", ctype);
    size_t hlen;
    char *h = build_head(c, status, fwd, strlen(fwd), (int64_t)blen, extra,
                         xcache, false, &hlen);
    char *all = h ? realloc(h, hlen + blen) : NULL;
    if (!all) {
        free(h);
        conn_close(c, true);
        return;
    }
    memcpy(all + hlen, body, blen);
    send_head(c, all, hlen + (c->head ? 0 : blen));
    response_finished(c);
}

static void send_simple(conn_t *c,
                        int status,
                        const char *ctype,
                        const char *body,
                        const char *extra)
{
    send_simple_x(c, status, ctype, body, extra, "MISS");
}

/* --- Responses from a flight ------------------------------------------------
 */

static char crlf[] = "\r\n", last_chunk[] = "0\r\n\r\n";

/* Send body bytes [pos, pos + len) clipped to what the client wants. */
static void on_body(flight_uv_reader_t *ur,
                    const void *data,
                    size_t len,
                    coalesce_buf_t *owner)
{
    conn_t *c = flight_uv_reader_get_data(ur);
    uint64_t from = c->pos, to = c->pos + len - 1;
    c->pos += len;
    if (c->no_body || to < c->want_next)
        return; /* before the client's range (a suffix range, say) */
    uint64_t a = from > c->want_next ? from : c->want_next;
    uint64_t b = to < c->want_last ? to : c->want_last;
    if (a <= b) {
        wreq_t *w = calloc(1, sizeof(*w));
        if (!w) {
            conn_close(c, true);
            return;
        }
        w->buf = coalesce_buf_ref(owner); /* zero copy until written */
        uv_buf_t v[3];
        unsigned n = 0;
        size_t blen = (size_t)(b - a + 1);
        if (c->chunked) {
            int fl = snprintf(w->framing, sizeof(w->framing), "%zx\r\n", blen);
            v[n++] = uv_buf_init(w->framing, (unsigned)fl);
        }
        v[n++] = uv_buf_init((char *)data + (a - from), (unsigned)blen);
        if (c->chunked)
            v[n++] = uv_buf_init(crlf, 2);
        c->want_next = b + 1;
        if (conn_write(c, v, n, w) < 0)
            return;
    }
    /* The client is not keeping up: what its socket did not take. */
    if (net.queued((uv_stream_t *)&c->tcp) > HIGH_WATER) {
        c->reader_stopped = true;
        flight_uv_read_stop(ur);
    }
}

static void on_meta(flight_uv_reader_t *ur, const void *meta, size_t len);
static void on_end(flight_uv_reader_t *ur, int status);

static void reader_start(conn_t *c)
{
    flight_uv_read_start(c->ur, on_meta, on_body, on_end);
}

static const char *xcache_of(flight_uv_reader_t *ur)
{
    bool shared = flight_reader_shared(flight_uv_reader_flight(ur));
    if (shared)
        P.collapsed++;
    else
        P.misses++;
    return shared ? "COLLAPSED" : "MISS";
}

static void serve_reader(conn_t *c, flight_reader_t *r, int mode);

/* A range once the probe told the size: a suffix, or a range the group
 * found to start past the end (the 416 says the size). A range flight like
 * any other, so it shares chunks with the ranges in flight. Without a size,
 * the whole object's flight: its tail for a suffix, else all of it. */
static void start_probed(conn_t *c, const meta_t *m)
{
    flight_reader_t *r;
    int rc;
    bool suffix = c->suffix != UNKNOWN_LEN;
    if (m->status == 200 && m->clen >= 0) {
        uint64_t size = (uint64_t)m->clen;
        uint64_t n = c->suffix < size ? c->suffix : size;
        uint64_t first = suffix ? size - n : c->range_first;
        uint64_t last = suffix ? size - 1 : c->range_last;
        rc = first < size ? flight_do_range(P.group, c->url, c->urllen, first,
                                            last, fetch_range, c->url, &r)
                          : FLIGHT_ERANGE;
        if (rc == 0) {
            c->probed = size;
            c->pos = c->want_next = first;
            serve_reader(c, r, MODE_RANGE);
        } else if (rc == FLIGHT_ERANGE) {
            char extra[96];
            snprintf(extra, sizeof(extra),
                     "Content-Range: bytes */%" PRIu64 "\r\n", size);
            send_simple(c, 416, "text/plain", "range not satisfiable\n", extra);
        } else {
            send_simple(c, 502, "text/plain", coalesce_strerror(rc), NULL);
        }
        return;
    }
    char key[MAX_URL + 8];
    int kl = snprintf(key, sizeof(key), "GET %s", c->url);
    rc = flight_do(P.group, key, (size_t)kl, fetch_get, c->url, &r);
    if (rc == 0)
        serve_reader(c, r, suffix ? MODE_SUFFIX : MODE_OBJECT);
    else
        send_simple(c, 502, "text/plain", coalesce_strerror(rc), NULL);
}

static void on_meta(flight_uv_reader_t *ur, const void *p, size_t len)
{
    conn_t *c = flight_uv_reader_get_data(ur);
    meta_t m;
    if (!meta_parse(p, len, &m)) {
        send_simple(c, 502, "text/plain", "bad upstream reply\n", NULL);
        return;
    }
    int mode = c->mode;
    if (mode == MODE_PROBE) {
        flight_uv_reader_close(ur);
        c->ur = NULL;
        start_probed(c, &m);
        return;
    }
    size_t hlen;
    char *h;
    char extra[160] = "";
    if (mode == MODE_RESUME) { /* the same object, or nothing */
        if (strcmp(m.validator, c->validator) != 0) {
            P.aborted++;
            conn_close(c, true);
        }
        return;
    }
    snprintf(c->validator, sizeof(c->validator), "%s", m.validator);
    if (mode == MODE_HEAD) { /* a 204 has no Content-Length (RFC 9110 8.6) */
        h = build_head(c, m.status, m.fwd, m.fwdlen,
                       m.status == 204 ? -1 : m.clen, NULL, xcache_of(ur),
                       false, &hlen);
        send_head(c, h, hlen);
        response_finished(c);
        return;
    }
    if (mode == MODE_RANGE) {
        uint64_t first, last, total;
        if (flight_reader_range(flight_uv_reader_flight(ur), &first, &last,
                                &total) != 0 ||
            last == FLIGHT_RANGE_END) {
            send_simple(c, 502, "text/plain", "bad upstream range reply\n",
                        NULL);
            return;
        }
        if (c->probed != UNKNOWN_LEN && total != c->probed) {
            send_simple(c, 502, "text/plain", "object changed\n", NULL);
            return;
        }
        if (total != FLIGHT_SIZE_UNKNOWN)
            snprintf(extra, sizeof(extra),
                     "Content-Range: bytes %" PRIu64 "-%" PRIu64 "/%" PRIu64
                     "\r\n",
                     first, last, total);
        else
            snprintf(extra, sizeof(extra),
                     "Content-Range: bytes %" PRIu64 "-%" PRIu64 "/*\r\n",
                     first, last);
        c->want_last = last;
        h = build_head(c, 206, m.fwd, m.fwdlen, (int64_t)(last - first + 1),
                       extra, xcache_of(ur), false, &hlen);
        send_head(c, h, hlen);
        return;
    }
    /* A whole object, or a suffix range served from it. */
    int64_t clen = m.clen;
    int status = m.status;
    if (mode == MODE_SUFFIX && status == 200 && m.clen >= 0) {
        uint64_t size = (uint64_t)m.clen, n = c->suffix;
        if (n == 0 || size == 0) {
            snprintf(extra, sizeof(extra),
                     "Content-Range: bytes */%" PRIu64 "\r\n", size);
            flight_uv_reader_close(ur);
            c->ur = NULL;
            send_simple(c, 416, "text/plain", "range not satisfiable\n", extra);
            return;
        }
        if (n > size)
            n = size;
        c->want_next = size - n;
        c->want_last = size - 1;
        snprintf(extra, sizeof(extra),
                 "Content-Range: bytes %" PRIu64 "-%" PRIu64 "/%" PRIu64 "\r\n",
                 c->want_next, c->want_last, size);
        status = 206;
        clen = (int64_t)n;
    } else {
        c->want_next = 0;
        c->want_last = m.clen >= 0 ? (uint64_t)m.clen - 1 : UNKNOWN_LEN;
        if (m.clen == 0)
            c->want_last = UNKNOWN_LEN; /* nothing to send: wait for the end */
    }
    c->no_body = status < 200 || status == 204 || status == 304;
    if (c->no_body) {
        clen = -1; /* RFC 9110: no content, no framing headers */
        c->want_last = UNKNOWN_LEN;
    } else if (clen < 0 && !c->http11) {
        c->keep_alive = false; /* HTTP/1.0: the close ends the body */
    }
    c->chunked = clen < 0 && !c->no_body && c->http11;
    h = build_head(c, status, m.fwd, m.fwdlen, clen, extra, xcache_of(ur),
                   c->chunked, &hlen);
    send_head(c, h, hlen);
}

/* Serve bytes [from, last] of a cached entry: one write, zero copy. */
static void send_from_entry(conn_t *c,
                            entry_t *e,
                            char *head,
                            size_t hlen,
                            uint64_t from,
                            uint64_t last)
{
    wreq_t *w = calloc(1, sizeof(*w));
    uv_buf_t *v = calloc(e->nbufs + 1, sizeof(*v));
    if (!w || !v) {
        free(w);
        free(v);
        free(head);
        entry_unref(e);
        conn_close(c, true);
        return;
    }
    unsigned n = 0;
    if (head) {
        w->heap = head;
        v[n++] = uv_buf_init(head, (unsigned)hlen);
        c->headers_sent = true;
    }
    uint64_t off = 0;
    for (size_t i = 0; i < e->nbufs && off <= last; i++) {
        uint64_t len = coalesce_buf_len(e->bufs[i]);
        if (off + len > from) {
            uint64_t a = from > off ? from - off : 0;
            uint64_t b = last - off < len - 1 ? last - off : len - 1;
            v[n++] = uv_buf_init((char *)coalesce_buf_data(e->bufs[i]) + a,
                                 (unsigned)(b - a + 1));
        }
        off += len;
    }
    w->entry = e; /* the reference the caller had */
    conn_write(c, v, n, w);
    free(v); /* uv_write copied the array */
}

/* A reader fell max_lag behind its flight: go on from where the client is,
 * from the cache if the object completed meanwhile, else with an upstream
 * range request for the rest (shared with any other ranges in flight). */
static void resume(conn_t *c, bool detached)
{
    if (!c->validator[0] || c->want_last == UNKNOWN_LEN) {
        P.aborted++; /* cannot prove it is the same object, or its end */
        conn_close(c, true);
        return;
    }
    if (detached)
        P.resumed++;
    entry_t *e = lru_get(c->url);
    if (e && !strcmp(e->validator, c->validator) &&
        (c->want_last == UNKNOWN_LEN || c->want_last < e->size)) {
        P.resumed_from_cache++;
        uint64_t last =
            c->want_last == UNKNOWN_LEN ? e->size - 1 : c->want_last;
        if (c->want_next <= last)
            send_from_entry(c, e, NULL, 0, c->want_next, last);
        else
            entry_unref(e);
        response_finished(c);
        return;
    }
    if (e)
        entry_unref(e);
    /* The rest in pieces of at most max_lag (whole chunks): within a piece
     * the client cannot fall max_lag behind again, and a piece never joins
     * a fetch that is already further ahead than that. */
    uint64_t cs = P.chunk_size, span = P.max_lag / cs * cs;
    if (span < cs)
        span = cs;
    uint64_t end = c->want_next / cs * cs + span - 1;
    uint64_t last = end < c->want_last ? end : c->want_last;
    c->resume_from = c->want_next;
    flight_reader_t *r;
    if (flight_do_range(P.group, c->url, c->urllen, c->want_next, last,
                        fetch_range, c->url, &r) != 0 ||
        flight_uv_reader_new(&c->ur, P.fuv, r) != 0) {
        P.aborted++;
        conn_close(c, true);
        return;
    }
    flight_uv_reader_set_data(c->ur, c);
    c->mode = MODE_RESUME;
    c->pos = c->want_next;
    reader_start(c);
}

static void on_end(flight_uv_reader_t *ur, int status)
{
    conn_t *c = flight_uv_reader_get_data(ur);
    uint64_t total = FLIGHT_SIZE_UNKNOWN; /* for a 416 */
    if (status == FLIGHT_ERANGE)
        (void)flight_reader_range(flight_uv_reader_flight(ur), NULL, NULL,
                                  &total);
    flight_uv_reader_close(ur);
    c->ur = NULL;
    if (status == 0) {
        if (!c->headers_sent) { /* an empty body: the meta came with the end */
            send_simple(c, 502, "text/plain", "empty upstream reply\n", NULL);
            return;
        }
        if (c->mode == MODE_RESUME && c->want_next <= c->want_last &&
            c->want_next > c->resume_from) {
            resume(c, false); /* the next piece */
            return;
        }
        if (c->want_last != UNKNOWN_LEN && c->want_next <= c->want_last) {
            P.aborted++; /* fewer bytes than announced */
            conn_close(c, true);
            return;
        }
        if (c->chunked) {
            wreq_t *w = calloc(1, sizeof(*w));
            if (!w) {
                conn_close(c, true);
                return;
            }
            uv_buf_t b = uv_buf_init(last_chunk, 5);
            if (conn_write(c, &b, 1, w) < 0)
                return;
        }
        response_finished(c);
        return;
    }
    /* A resumed piece that lags before any progress would only loop. */
    if (status == FLIGHT_ELAGGED && c->headers_sent &&
        (c->mode != MODE_RESUME || c->want_next > c->resume_from)) {
        resume(c, true);
        return;
    }
    if (c->headers_sent) { /* too late for a status: the client sees a cut */
        P.aborted++;
        conn_close(c, true);
        return;
    }
    if (status == FLIGHT_ERANGE) {
        char extra[96] = "";
        if (total != FLIGHT_SIZE_UNKNOWN)
            snprintf(extra, sizeof(extra),
                     "Content-Range: bytes */%" PRIu64 "\r\n", total);
        send_simple(c, 416, "text/plain", "range not satisfiable\n", extra);
    } else if (status == FLIGHT_ETIMEDOUT) {
        send_simple(c, 504, "text/plain", "upstream too slow\n", NULL);
    } else {
        char body[128];
        snprintf(body, sizeof(body), "upstream failed: %s\n",
                 coalesce_strerror(status));
        send_simple(c, 502, "text/plain", body, NULL);
    }
}

/* --- Requests
 * ----------------------------------------------------------------- */

static void response_finished(conn_t *c)
{
    if (c->closing)
        return;
    if (c->ur) {
        flight_uv_reader_close(c->ur);
        c->ur = NULL;
    }
    c->busy = false;
    if (!c->keep_alive) { /* once the queued writes are out */
        conn_close(c, false);
        return;
    }
    if (!c->in_parse) /* else parse_pending's loop goes on by itself */
        parse_pending(c);
}

static void stats_json(conn_t *c)
{
    flight_stats_t s;
    flight_group_stats(P.group, &s, sizeof(s));
    char body[2048];
    snprintf(
        body, sizeof(body),
        "{\"requests\":%" PRIu64 ",\"hits\":%" PRIu64 ",\"misses\":%" PRIu64
        ",\"collapsed\":%" PRIu64 ",\"resumed\":%" PRIu64
        ",\"resumed_from_cache\":%" PRIu64 ",\"errors_sent\":%" PRIu64
        ",\"aborted\":%" PRIu64 ",\"client_gone\":%" PRIu64
        ",\"upstream_requests\":%" PRIu64 ",\"upstream_bytes\":%" PRIu64
        ",\"conns_open\":%" PRIu64 ",\"idle_closed\":%" PRIu64
        ",\"cache_objects\":%" PRIu64 ",\"cache_bytes\":%" PRIu64
        ",\"flight\":{\"flights_started\":%" PRIu64 ",\"joins\":%" PRIu64
        ",\"timeouts\":%" PRIu64 ",\"errors\":%" PRIu64 ",\"lagged\":%" PRIu64
        ",\"bytes_written\":%" PRIu64 ",\"bytes_delivered\":%" PRIu64
        ",\"flights_active\":%" PRIu64 ",\"readers_open\":%" PRIu64
        ",\"segments_held\":%" PRIu64 ",\"bytes_held\":%" PRIu64
        ",\"orphaned\":%" PRIu64 ",\"range_fetches\":%" PRIu64
        ",\"chunk_joins\":%" PRIu64 ",\"range_bytes_requested\":%" PRIu64
        ",\"range_bytes_fetched\":%" PRIu64 ",\"range_mismatches\":%" PRIu64
        "}}\n",
        P.requests, P.hits, P.misses, P.collapsed, P.resumed,
        P.resumed_from_cache, P.errors_sent, P.aborted, P.client_gone,
        P.upstream_requests, P.upstream_bytes, P.conns_open, P.idle_closed,
        P.cache_objects, P.cache_bytes, s.flights_started, s.joins, s.timeouts,
        s.errors, s.lagged, s.bytes_written, s.bytes_delivered,
        s.flights_active, s.readers_open, s.segments_held, s.bytes_held,
        s.orphaned, s.range_fetches, s.chunk_joins, s.range_bytes_requested,
        s.range_bytes_fetched, s.range_mismatches);
    send_simple(c, 200, "application/json", body, NULL);
}

/* "bytes=a-b", "bytes=a-" or "bytes=-n"; anything else (several ranges,
 * garbage) is ignored and the whole object is sent, as RFC 9110 allows. */
static bool
parse_range(const char *s, uint64_t *first, uint64_t *last, bool *suffix)
{
    if (strncasecmp(s, "bytes=", 6) != 0 || strchr(s, ','))
        return false;
    s += 6;
    char *end;
    *suffix = *s == '-';
    if (*suffix) {
        if (!isdigit((unsigned char)s[1]))
            return false;
        errno = 0;
        *first = strtoull(s + 1, &end, 10);
        return !errno && !*end;
    }
    if (!isdigit((unsigned char)*s))
        return false;
    errno = 0;
    *first = strtoull(s, &end, 10);
    if (errno || *end != '-' || *first >= (1ull << 62))
        return false;
    s = end + 1;
    if (!*s) {
        *last = FLIGHT_RANGE_END;
        return true;
    }
    if (!isdigit((unsigned char)*s))
        return false;
    *last = strtoull(s, &end, 10);
    if (errno || *end || *last < *first)
        return false;
    if (*last >= (1ull << 62))
        *last = FLIGHT_RANGE_END;
    return true;
}

/* Start streaming a flight reader to the client. */
static void serve_reader(conn_t *c, flight_reader_t *r, int mode)
{
    if (flight_uv_reader_new(&c->ur, P.fuv, r) != 0) {
        flight_reader_close(r);
        send_simple(c, 502, "text/plain", "out of memory\n", NULL);
        return;
    }
    flight_uv_reader_set_data(c->ur, c);
    c->mode = mode;
    reader_start(c);
}

/* Serve a whole cached object, a range of it, or its headers. */
static void serve_hit(conn_t *c,
                      entry_t *e,
                      bool head,
                      bool ranged,
                      uint64_t first,
                      uint64_t last,
                      bool suffix)
{
    P.hits++;
    meta_t m;
    meta_parse(e->meta, e->metalen, &m);
    char extra[160] = "";
    size_t hlen;
    if (ranged && !head) {
        if (suffix) {
            uint64_t n = first < e->size ? first : e->size;
            first = e->size - n;
            last = e->size - 1;
            if (n == 0)
                first = e->size; /* unsatisfiable */
        } else if (last == FLIGHT_RANGE_END || last >= e->size) {
            last = e->size - 1;
        }
        if (first >= e->size) {
            snprintf(extra, sizeof(extra),
                     "Content-Range: bytes */%" PRIu64 "\r\n", e->size);
            entry_unref(e);
            send_simple_x(c, 416, "text/plain", "range not satisfiable\n",
                          extra, "HIT");
            return;
        }
        snprintf(extra, sizeof(extra),
                 "Content-Range: bytes %" PRIu64 "-%" PRIu64 "/%" PRIu64 "\r\n",
                 first, last, e->size);
        char *h =
            build_head(c, 206, m.fwd, m.fwdlen, (int64_t)(last - first + 1),
                       extra, "HIT", false, &hlen);
        if (h)
            send_from_entry(c, e, h, hlen, first, last);
        else
            entry_unref(e);
    } else {
        char *h = build_head(c, 200, m.fwd, m.fwdlen, (int64_t)e->size, NULL,
                             "HIT", false, &hlen);
        if (h && !head && e->size)
            send_from_entry(c, e, h, hlen, 0, e->size - 1);
        else {
            entry_unref(e);
            send_head(c, h, hlen);
        }
    }
    response_finished(c);
}

/* A suffix range needs the object's size first, and so does the 416 for a
 * range found to start past the end: a HEAD (collapsed with any other)
 * tells it, then start_probed() goes on. */
static int probe(conn_t *c, uint64_t suffix, uint64_t first, uint64_t last)
{
    flight_reader_t *r;
    char key[MAX_URL + 8];
    int kl = snprintf(key, sizeof(key), "HEAD %s", c->url);
    int rc = flight_do(P.group, key, (size_t)kl, fetch_head, c->url, &r);
    if (rc == 0) {
        c->suffix = suffix;
        c->range_first = first;
        c->range_last = last;
        serve_reader(c, r, MODE_PROBE);
    }
    return rc;
}

static void handle_request(conn_t *c)
{
    P.requests++;
    c->busy = true;
    c->headers_sent = c->chunked = c->reader_stopped = c->no_body = false;
    c->http11 = c->parser.http_major > 1 ||
                (c->parser.http_major == 1 && c->parser.http_minor >= 1);
    c->validator[0] = 0;
    c->keep_alive = http_should_keep_alive(&c->parser);
    int method = c->parser.method;
    c->head = method == HTTP_HEAD;
    if (method != HTTP_GET && method != HTTP_HEAD) {
        send_simple(c, 405, "text/plain", "GET and HEAD only\n",
                    "Allow: GET, HEAD\r\n");
        return;
    }
    if (c->url_too_long) {
        c->keep_alive = false;
        send_simple(c, 414, "text/plain", "URL too long\n", NULL);
        return;
    }
    if (c->urllen == 0 || c->url[0] != '/') {
        send_simple(c, 400, "text/plain", "origin-form targets only\n", NULL);
        return;
    }
    bool head = c->head;
    if (!head && !strcmp(c->url, "/__coalesce/stats")) {
        stats_json(c);
        return;
    }
    uint64_t first = 0, last = FLIGHT_RANGE_END;
    bool suffix = false;
    /* If-Range: sending the whole object is always a correct answer. */
    bool ranged = !head && c->has_range && !c->has_if_range &&
                  parse_range(c->range, &first, &last, &suffix);
    entry_t *e = lru_get(c->url);
    if (e) {
        serve_hit(c, e, head, ranged, first, last, suffix);
        return;
    }
    c->pos = 0;
    c->want_next = 0;
    c->want_last = UNKNOWN_LEN;
    c->probed = UNKNOWN_LEN;
    flight_reader_t *r;
    int rc;
    if (head) {
        /* Its own flight: a HEAD never waits for a GET's body. */
        char key[MAX_URL + 8];
        int kl = snprintf(key, sizeof(key), "HEAD %s", c->url);
        rc = flight_do(P.group, key, (size_t)kl, fetch_head, c->url, &r);
        if (rc == 0)
            serve_reader(c, r, MODE_HEAD);
    } else if (ranged && !suffix) {
        rc = flight_do_range(P.group, c->url, c->urllen, first, last,
                             fetch_range, c->url, &r);
        if (rc == 0) {
            c->pos = c->want_next = first;
            serve_reader(c, r, MODE_RANGE);
        } else if (rc == FLIGHT_ERANGE) { /* past the end: the 416 says */
            rc = probe(c, UNKNOWN_LEN, first, last);
        }
    } else if (ranged) {
        rc = probe(c, first, 0, 0);
    } else {
        char key[MAX_URL + 8];
        int kl = snprintf(key, sizeof(key), "GET %s", c->url);
        rc = flight_do(P.group, key, (size_t)kl, fetch_get, c->url, &r);
        if (rc == 0)
            serve_reader(c, r, MODE_OBJECT);
    }
    if (rc != 0)
        send_simple(c, rc == COALESCE_ECLOSING ? 503 : 502, "text/plain",
                    coalesce_strerror(rc), NULL);
}

/* http-parser callbacks: collect the target and the few headers used. */
static void header_done(conn_t *c)
{
    if (!c->in_value)
        return;
    c->field[c->fieldlen] = c->value[c->valuelen] = 0;
    if (!strcasecmp(c->field, "range")) {
        c->has_range = c->valuelen < sizeof(c->value) - 1;
        snprintf(c->range, sizeof(c->range), "%s", c->value);
    } else if (!strcasecmp(c->field, "if-range")) {
        c->has_if_range = true;
    }
    c->fieldlen = c->valuelen = 0;
    c->in_value = false;
}

static void append(char *dst, size_t *len, size_t cap, const char *p, size_t n)
{
    size_t room = cap - 1 - *len;
    if (n > room)
        n = room;
    memcpy(dst + *len, p, n);
    *len += n;
}

static int on_url(http_parser *hp, const char *p, size_t n)
{
    conn_t *c = hp->data;
    if (c->urllen + n > MAX_URL)
        c->url_too_long = true;
    append(c->url, &c->urllen, sizeof(c->url), p, n);
    c->url[c->urllen] = 0;
    return 0;
}

static int on_header_field(http_parser *hp, const char *p, size_t n)
{
    conn_t *c = hp->data;
    header_done(c);
    append(c->field, &c->fieldlen, sizeof(c->field), p, n);
    return 0;
}

static int on_header_value(http_parser *hp, const char *p, size_t n)
{
    conn_t *c = hp->data;
    c->in_value = true;
    append(c->value, &c->valuelen, sizeof(c->value), p, n);
    return 0;
}

static int on_headers_complete(http_parser *hp)
{
    header_done(hp->data);
    return 0;
}

static int on_message_begin(http_parser *hp)
{
    conn_t *c = hp->data;
    c->urllen = c->fieldlen = c->valuelen = 0;
    c->url[0] = 0;
    c->url_too_long = c->in_value = c->has_range = c->has_if_range = false;
    return 0;
}

static int on_message_complete(http_parser *hp)
{
    conn_t *c = hp->data;
    c->request_ready = true;
    http_parser_pause(hp, 1); /* one request at a time */
    return 0;
}

static const http_parser_settings parser_settings = {
    .on_message_begin = on_message_begin,
    .on_url = on_url,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_headers_complete = on_headers_complete,
    .on_message_complete = on_message_complete,
};

/* Parse what is buffered; answer at most one request at a time. */
/* A client is read only while its socket keeps up with what it asked for
 * and it has not sent too far ahead: pipelined requests for cached objects
 * would otherwise queue responses without bound. */
static void conn_flow(conn_t *c)
{
    if (c->closing)
        return;
    size_t queued = net.queued((uv_stream_t *)&c->tcp);
    bool want = queued <= (c->reading ? HIGH_WATER : LOW_WATER) &&
                c->npending < 64 * 1024;
    if (want && !c->reading)
        net.read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
    else if (!want && c->reading)
        net.read_stop((uv_stream_t *)&c->tcp);
    c->reading = want;
}

static void parse_pending(conn_t *c)
{
    if (c->in_parse)
        return;
    c->in_parse = true;
    while (!c->busy && !c->closing && c->npending &&
           net.queued((uv_stream_t *)&c->tcp) <= HIGH_WATER) {
        http_parser_pause(&c->parser, 0);
        size_t n = http_parser_execute(&c->parser, &parser_settings, c->pending,
                                       c->npending);
        enum http_errno err = HTTP_PARSER_ERRNO(&c->parser);
        if (err != HPE_OK && err != HPE_PAUSED) {
            c->keep_alive = false;
            c->busy = true;
            c->head = false; /* whatever it was: the close ends it */
            send_simple(c, 400, "text/plain", "bad request\n", NULL);
            break;
        }
        memmove(c->pending, c->pending + n, c->npending - n);
        c->npending -= n;
        if (!c->request_ready)
            break; /* need more bytes */
        c->request_ready = false;
        handle_request(c);
    }
    c->in_parse = false;
    conn_flow(c);
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    conn_t *c = h->data;
    (void)hint;
    if (c->cappending - c->npending < 16384) {
        size_t cap = c->cappending ? c->cappending * 2 : 16384;
        char *p = cap <= 1024 * 1024 ? realloc(c->pending, cap) : NULL;
        if (!p) {
            *buf = uv_buf_init(NULL, 0); /* UV_ENOBUFS: the read fails */
            return;
        }
        c->pending = p;
        c->cappending = cap;
    }
    *buf = uv_buf_init(c->pending + c->npending,
                       (unsigned)(c->cappending - c->npending));
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    conn_t *c = s->data;
    (void)buf;
    if (n < 0) { /* EOF or error: the client has gone */
        if (c->busy)
            P.client_gone++;
        conn_close(c, n != UV_EOF);
        return;
    }
    c->npending += (size_t)n;
    conn_progress(c);
    parse_pending(c);
}

/* Serve a connected c->tcp. */
static void conn_start(conn_t *c)
{
    P.conns_open++;
    c->handles = 2;
    uv_timer_init(P.loop, &c->idle);
    c->idle.data = c;
    conn_progress(c);
    http_parser_init(&c->parser, HTTP_REQUEST);
    c->parser.data = c;
    c->next = P.conns;
    if (P.conns)
        P.conns->prev = c;
    P.conns = c;
    conn_flow(c);
}

static void on_connection(uv_stream_t *server, int status)
{
    if (status < 0)
        return;
    conn_t *c = calloc(1, sizeof(*c));
    if (!c)
        return;
    uv_tcp_init(P.loop, &c->tcp);
    c->tcp.data = c;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
        P.conns_open++; /* on_conn_closed counts it out */
        c->handles = 1;
        uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    if (P.sndbuf > 0)
        uv_send_buffer_size((uv_handle_t *)&c->tcp, &P.sndbuf);
    conn_start(c);
}

/* --- Start and stop
 * ------------------------------------------------------------ */

static void stop_all(void)
{
    if (P.stopping)
        return;
    P.stopping = true;
    uv_close((uv_handle_t *)&P.server, NULL);
    uv_close((uv_handle_t *)&P.sigterm, NULL);
    uv_close((uv_handle_t *)&P.sigint, NULL);
    while (P.conns)
        conn_close(P.conns, true);
    while (P.upstreams) /* their flights end with COALESCE_EUPSTREAM */
        upstream_done(P.upstreams, CURLE_ABORTED_BY_CALLBACK);
    curl_multi_cleanup(P.multi); /* closes its sockets' poll handles */
    P.multi = NULL;
    uv_close((uv_handle_t *)&P.curl_timer, NULL);
    if (flight_uv_close(P.fuv) != 0)
        fprintf(stderr, "proxy: readers still open at exit\n");
}

static void on_signal(uv_signal_t *s, int signum)
{
    (void)s;
    (void)signum;
    stop_all();
}

static uint64_t parse_size(const char *flag, const char *v)
{
    char *end;
    errno = 0;
    unsigned long long x = strtoull(v, &end, 10);
    if (errno || end == v || *end || v[0] == '-') {
        fprintf(stderr, "proxy: %s: not a number: %s\n", flag, v);
        exit(2);
    }
    return x;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: proxy --upstream URL [options]\n"
            "  --listen HOST:PORT     address to serve (127.0.0.1:8080; port 0"
            " picks one)\n"
            "  --upstream URL         origin, e.g. http://127.0.0.1:8081\n"
            "  --cache-size BYTES     LRU of complete objects (256 MiB; 0: "
            "none)\n"
            "  --chunk-size BYTES     range sharing unit (1 MiB)\n"
            "  --max-lag BYTES        a client this far behind is resumed "
            "apart (64 MiB);\n"
            "                         keep it >= --chunk-size, or resumes "
            "may fetch chunks twice\n"
            "  --wait-timeout MS      a waiter without headers by then gets "
            "504 (0: none)\n"
            "  --sndbuf BYTES         client socket send buffer (kernel "
            "default)\n"
            "  --idle-timeout MS      a client that makes no progress this "
            "long is reset (60000; 0: never)\n"
            "Prints \"proxy listening on HOST:PORT\" once serving.\n");
}

/* The group, libcurl and the loop: all but the sockets. 0, or 1. */
static int proxy_init(void)
{
    flight_opts_t o;
    flight_opts_init(&o);
    o.chunk_size = P.chunk_size;
    o.max_lag = P.max_lag;
    o.wait_timeout_ms = P.wait_timeout_ms;
    /* Clients that leave do not stop the fetch: the cache still fills. */
    o.orphan_policy = FLIGHT_ORPHAN_CONTINUE;
    int rc = flight_group_new(&P.group, &o);
    if (rc != 0) {
        fprintf(stderr, "proxy: flight group: %s\n", coalesce_strerror(rc));
        return 1;
    }
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK ||
        !(P.multi = curl_multi_init())) {
        fprintf(stderr, "proxy: libcurl initialisation failed\n");
        return 1;
    }
    P.loop = uv_default_loop();
    if (flight_uv_new(&P.fuv, P.loop) != 0) {
        fprintf(stderr, "proxy: flight_uv_new failed\n");
        return 1;
    }
    uv_timer_init(P.loop, &P.curl_timer);
    curl_multi_setopt(P.multi, CURLMOPT_SOCKETFUNCTION, on_curl_socket);
    curl_multi_setopt(P.multi, CURLMOPT_TIMERFUNCTION, on_curl_timer);
    return 0;
}

int main(int argc, char **argv)
{
    P.listen = "127.0.0.1:8080";
    P.cache_size = 256u << 20;
    P.chunk_size = 1u << 20;
    P.max_lag = 64u << 20;
    P.idle_timeout_ms = 60000;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        }
        if (i + 1 >= argc) {
            usage(stderr);
            return 2;
        }
        const char *v = argv[++i];
        if (!strcmp(a, "--listen"))
            P.listen = v;
        else if (!strcmp(a, "--upstream"))
            P.upstream = v;
        else if (!strcmp(a, "--cache-size"))
            P.cache_size = parse_size(a, v);
        else if (!strcmp(a, "--chunk-size"))
            P.chunk_size = parse_size(a, v);
        else if (!strcmp(a, "--max-lag"))
            P.max_lag = parse_size(a, v);
        else if (!strcmp(a, "--wait-timeout"))
            P.wait_timeout_ms = (uint32_t)parse_size(a, v);
        else if (!strcmp(a, "--sndbuf"))
            P.sndbuf = (int)parse_size(a, v);
        else if (!strcmp(a, "--idle-timeout"))
            P.idle_timeout_ms = parse_size(a, v);
        else {
            usage(stderr);
            return 2;
        }
    }
    if (!P.upstream || strncmp(P.upstream, "http://", 7) != 0) {
        fprintf(stderr, "proxy: --upstream http://HOST:PORT is required\n");
        return 2;
    }
    static char base[1024];
    snprintf(base, sizeof(base), "%s", P.upstream);
    size_t bl = strlen(base);
    while (bl && base[bl - 1] == '/')
        base[--bl] = 0;
    P.upstream = base;
    char host[256];
    const char *colon = strrchr(P.listen, ':');
    if (!colon || (size_t)(colon - P.listen) >= sizeof(host)) {
        fprintf(stderr, "proxy: --listen HOST:PORT\n");
        return 2;
    }
    memcpy(host, P.listen, (size_t)(colon - P.listen));
    host[colon - P.listen] = 0;
    int port = (int)parse_size("--listen", colon + 1);
    int rc = proxy_init();
    if (rc != 0)
        return rc;

    struct sockaddr_in addr;
    uv_tcp_init(P.loop, &P.server);
    if ((rc = uv_ip4_addr(host, port, &addr)) != 0 ||
        (rc = uv_tcp_bind(&P.server, (const struct sockaddr *)&addr, 0)) != 0 ||
        (rc = uv_listen((uv_stream_t *)&P.server, 1024, on_connection)) != 0) {
        fprintf(stderr, "proxy: listen on %s: %s\n", P.listen, uv_strerror(rc));
        return 1;
    }
    struct sockaddr_in bound;
    int blen = sizeof(bound);
    uv_tcp_getsockname(&P.server, (struct sockaddr *)&bound, &blen);
    printf("proxy listening on %s:%d\n", host, ntohs(bound.sin_port));
    fflush(stdout);

    /* A client that resets mid-body must not kill the proxy: libuv writes
     * with write(2), so a closed socket means EPIPE, not SIGPIPE. */
    signal(SIGPIPE, SIG_IGN);
    uv_signal_init(P.loop, &P.sigterm);
    uv_signal_start(&P.sigterm, on_signal, SIGTERM);
    uv_signal_init(P.loop, &P.sigint);
    uv_signal_start(&P.sigint, on_signal, SIGINT);

    uv_run(P.loop, UV_RUN_DEFAULT);

    /* Everything is closed: drop the cache, then the group. */
    while (P.lru_head)
        lru_unlink(P.lru_head);
    flight_group_close(P.group);
    curl_global_cleanup();
    rc = uv_loop_close(P.loop);
    if (rc != 0) {
        fprintf(stderr, "proxy: loop not empty at exit: %s\n", uv_strerror(rc));
        return 1;
    }
    return 0;
}

/*
 * fuzz_proxy: the example proxy (examples/proxy.c) fed arbitrary client
 * bytes, in front of a fake origin, all in memory.
 *
 * The proxy is compiled into this file with its network seam (`net`)
 * pointed at memory: client writes go to a queue that the harness drains
 * into a per-client sink, reads are fed by the harness, and upstream
 * transfers are served by a fake origin through the proxy's own libcurl
 * callbacks (on_curl_header, on_curl_body, upstream_done), so the proxy's
 * parsing of upstream replies is fuzzed too. The loop, the flight group,
 * the libuv adapter and the cache are the real ones. Each execution is one
 * client connection, or two sending the same bytes (so that they share
 * flights); the cache is emptied afterwards, so executions are independent.
 *
 * Input: the requests up to the first NUL; after it, control bytes: the
 * first chooses one or two clients, the rest schedule reads, write
 * completions, upstream steps, loop turns, idle timeouts and client
 * disconnects, and shape each upstream reply (status, framing, validators,
 * ranges, failures). Missing control bytes read as 0: a seed that is just
 * HTTP requests gets a well-behaved origin and a client that reads all.
 * Objects are sized by a "size=N" query (default 100); byte k of the
 * object at target T is content(hash(T), k) whatever the reply's headers
 * say, so that every body the proxy sends can be checked.
 *
 * Checked per execution: no crash, leak or undefined behaviour (ASan,
 * UBSan); every response is well-formed HTTP/1.1 (status line, header
 * syntax, framing by Content-Length, chunked or the close, nothing after
 * "Connection: close", no framing on a 204) and answers its request in
 * order (405, 414 and 400 where due; HEAD without a body; 206 and 416 only
 * for a Range the proxy honours, a 206's Content-Range matching the range
 * and its body, a 416's saying bytes * /size; 200 and 206 bodies byte for
 * byte); no request is left unanswered while the connection is open; a
 * graceful close never cuts a response; and once the clients have gone
 * and the loop has run dry, the connections are freed and the flight
 * group has no reader, flight or segment left.
 */
/* Small, so that backpressure, lag and 414 happen with small inputs. */
#define HIGH_WATER 512
#define LOW_WATER  128
#define MAX_URL    200
#define main       proxy_main
#include "../../examples/proxy.c"
#undef main

#include <stdarg.h>

#if defined(__GNUC__)
#    define PRINTF_LIKE(f, a) __attribute__((format(printf, f, a)))
#    define NORETURN          __attribute__((noreturn))
#else
#    define PRINTF_LIKE(f, a)
#    define NORETURN
#endif
/* The harness's own checking: no coverage feedback (it would only make
 * each execution slower and steer the fuzzer towards our own code). Not
 * inlined either, or it would be instrumented as part of its caller. */
#if defined(__clang__)
#    define NO_COVERAGE __attribute__((no_sanitize("coverage"), noinline))
#else
#    define NO_COVERAGE
#endif

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_OBJ    4096  /* largest object the fake origin serves */
#define CHUNK      64    /* the group's chunk_size */
#define MAX_LAG    256   /* and max_lag */
#define MAX_STEPS  1024  /* control steps per execution */
#define MAX_ROUNDS 20000 /* pump rounds before we call it a hang */

/* --- Failing ------------------------------------------------------------- */

static const uint8_t *in_data; /* this execution's input, for the report */
static size_t in_size;

NO_COVERAGE static void dump(const char *what, const char *p, size_t n)
{
    fprintf(stderr, "--- %s (%zu bytes):\n", what, n);
    for (size_t i = 0; i < n && i < 4096; i++) {
        unsigned char ch = (unsigned char)p[i];
        if (ch == '\n' || (ch >= 32 && ch < 127))
            fputc(ch, stderr);
        else
            fprintf(stderr, "\\x%02x", ch);
    }
    fprintf(stderr, "\n---\n");
}

NO_COVERAGE static void dump_sinks(void);

PRINTF_LIKE(1, 2) NORETURN NO_COVERAGE static void fail(const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "fuzz_proxy: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
    dump("input", (const char *)in_data, in_size);
    dump_sinks();
    abort();
}

#define CHECK(cond, ...)                                                       \
    do {                                                                       \
        if (!(cond))                                                           \
            fail(__VA_ARGS__);                                                 \
    } while (0)

/* --- Input -----------------------------------------------------------------
 */

static const uint8_t *request; /* what each client sends */
static size_t nrequest;
static const uint8_t *ctl; /* control bytes */
static size_t nctl, ctl_off;

/* The next control byte, 0 once they have run out. */
NO_COVERAGE static unsigned ctl_u8(void)
{
    return ctl_off < nctl ? ctl[ctl_off++] : 0;
}

NO_COVERAGE static bool ctl_left(void)
{
    return ctl_off < nctl;
}

/* --- Object content ------------------------------------------------------ */

NO_COVERAGE static uint32_t target_seed(const char *t)
{
    uint32_t h = 2166136261u;
    for (; *t; t++)
        h = (h ^ (uint8_t)*t) * 16777619u;
    return h;
}

static inline uint8_t content(uint32_t seed, uint64_t off)
{
    return (uint8_t)(((uint32_t)(off >> 2) * 2654435761u ^ seed) >>
                     ((off & 3) * 8));
}

/* --- The client sockets, in memory ---------------------------------------- */

typedef struct pending_write {
    uv_write_t *req;
    uv_write_cb cb;
    uv_buf_t *bufs; /* the array is ours, the bytes the proxy's */
    unsigned n;
    size_t len;
    struct pending_write *next;
} pending_write_t;

/* One client connection, and what the proxy's socket calls did to it. */
typedef struct client {
    conn_t *conn;    /* the proxy's, freed by it once closed */
    uv_tcp_t *tcp;   /* &conn->tcp */
    size_t off, end; /* request bytes sent, and to send */
    bool reading;
    uv_alloc_cb alloc;
    uv_read_cb read;
    pending_write_t *head, **tail;
    size_t queued;
    uv_shutdown_t *shut;
    uv_shutdown_cb shut_cb;
    bool closed, reset; /* the proxy closed it (reset: with an RST) */
    uv_close_cb close_cb;
    bool eof, rst;   /* the client closed its side, or reset */
    bool left_first; /* ... before the proxy closed */
    bool told;       /* the proxy has read that EOF or RST */
    char *sink;      /* what the proxy sent it */
    size_t nsink, capsink;
} client_t;

static client_t clients[2];
static int nclients;
static uint64_t progress; /* bumps on anything that happens */

NO_COVERAGE static void dump_sinks(void)
{
    for (int i = 0; i < nclients; i++)
        dump(i ? "sent to client 1" : "sent to client 0", clients[i].sink,
             clients[i].nsink);
}

NO_COVERAGE static client_t *client_of(const void *handle)
{
    for (int i = 0; i < nclients; i++)
        if (clients[i].tcp == handle)
            return &clients[i];
    fail("a call on an unknown handle");
}

NO_COVERAGE static int fake_write(uv_write_t *req,
                                  uv_stream_t *s,
                                  const uv_buf_t bufs[],
                                  unsigned n,
                                  uv_write_cb cb)
{
    client_t *c = client_of(s);
    CHECK(!c->closed, "write after close");
    CHECK(!c->shut, "write after shutdown");
    pending_write_t *w = calloc(1, sizeof(*w));
    CHECK(w && (w->bufs = malloc((n ? n : 1) * sizeof(*bufs))), "oom");
    memcpy(w->bufs, bufs, n * sizeof(*bufs));
    w->req = req;
    w->cb = cb;
    w->n = n;
    for (unsigned i = 0; i < n; i++)
        w->len += bufs[i].len;
    *c->tail = w;
    c->tail = &w->next;
    c->queued += w->len;
    progress++;
    return 0;
}

NO_COVERAGE static size_t fake_queued(const uv_stream_t *s)
{
    return client_of(s)->queued;
}

NO_COVERAGE static int
fake_read_start(uv_stream_t *s, uv_alloc_cb alloc, uv_read_cb cb)
{
    client_t *c = client_of(s);
    CHECK(!c->closed, "read_start after close");
    c->reading = true;
    c->alloc = alloc;
    c->read = cb;
    return 0;
}

NO_COVERAGE static int fake_read_stop(uv_stream_t *s)
{
    client_of(s)->reading = false;
    return 0;
}

NO_COVERAGE static int
fake_shutdown(uv_shutdown_t *req, uv_stream_t *s, uv_shutdown_cb cb)
{
    client_t *c = client_of(s);
    CHECK(!c->closed && !c->shut, "shutdown twice, or after close");
    req->handle = s;
    c->shut = req;
    c->shut_cb = cb;
    progress++;
    return 0;
}

NO_COVERAGE static pending_write_t *pop_write(client_t *c)
{
    pending_write_t *w = c->head;
    if (w) {
        c->head = w->next;
        if (!c->head)
            c->tail = &c->head;
        c->queued -= w->len;
    }
    return w;
}

NO_COVERAGE static void sink_append(client_t *c, const void *p, size_t n)
{
    if (c->nsink + n > c->capsink) {
        size_t cap = (c->nsink + n) * 2;
        char *q = realloc(c->sink, cap);
        CHECK(q, "oom");
        c->sink = q;
        c->capsink = cap;
    }
    memcpy(c->sink + c->nsink, p, n);
    c->nsink += n;
}

/* The handle's close callback: writes and a shutdown still pending are
 * cancelled first, as libuv does. */
NO_COVERAGE static void fake_closed(uv_handle_t *h)
{
    client_t *c = client_of(h);
    pending_write_t *w;
    while ((w = pop_write(c))) {
        w->cb(w->req, UV_ECANCELED);
        free(w->bufs);
        free(w);
    }
    if (c->shut) {
        uv_shutdown_t *req = c->shut;
        c->shut = NULL;
        c->shut_cb(req, UV_ECANCELED);
    }
    c->tcp = NULL; /* the proxy frees it now */
    c->conn = NULL;
    c->close_cb(h);
}

NO_COVERAGE static void fake_close(uv_tcp_t *t, bool reset, uv_close_cb cb)
{
    client_t *c = client_of(t);
    CHECK(!c->closed, "close twice");
    c->closed = true;
    c->reset = reset;
    c->reading = false;
    c->close_cb = cb;
    progress++;
    uv_close((uv_handle_t *)t, fake_closed);
}

/* The client reads one queued write: its bytes reach the sink (unless the
 * client has reset), then its callback runs. A drained queue completes a
 * pending shutdown. */
NO_COVERAGE static bool drain_one(client_t *c)
{
    pending_write_t *w = pop_write(c);
    if (!w) {
        if (c->shut && !c->closed) {
            uv_shutdown_t *req = c->shut;
            c->shut = NULL;
            progress++;
            c->shut_cb(req, c->rst ? UV_ENOTCONN : 0);
            return true;
        }
        return false;
    }
    if (!c->rst)
        for (unsigned i = 0; i < w->n; i++)
            sink_append(c, w->bufs[i].base, w->bufs[i].len);
    progress++;
    w->cb(w->req, c->rst ? UV_EPIPE : 0);
    free(w->bufs);
    free(w);
    return true;
}

/* Up to n request bytes in one read, if the proxy is reading. */
NO_COVERAGE static void client_feed(client_t *c, size_t n)
{
    if (!c->reading || c->closed || c->off == c->end)
        return;
    uv_buf_t b = uv_buf_init(NULL, 0);
    c->alloc((uv_handle_t *)c->tcp, 65536, &b);
    progress++;
    if (!b.base || !b.len) {
        c->read((uv_stream_t *)c->tcp, UV_ENOBUFS, &b);
        return;
    }
    if (n > c->end - c->off)
        n = c->end - c->off;
    if (n > b.len)
        n = b.len;
    memcpy(b.base, request + c->off, n);
    c->off += n;
    c->read((uv_stream_t *)c->tcp, (ssize_t)n, &b);
}

/* The client closes its side (FIN) or resets, sending nothing more. The
 * proxy hears of it when it reads, or (a reset) when it writes. */
NO_COVERAGE static void client_leave(client_t *c, bool reset)
{
    if (c->eof || c->rst)
        return;
    c->end = c->off;
    if (reset)
        c->rst = true;
    else
        c->eof = true;
    if (!c->closed)
        c->left_first = true;
    progress++;
}

/* An EOF or a reset is seen by a reading proxy. */
NO_COVERAGE static void client_notify(client_t *c)
{
    if (c->told || c->closed || !c->reading || !(c->eof || c->rst))
        return;
    c->told = true;
    c->reading = false; /* libuv stops reading at EOF */
    uv_buf_t b = uv_buf_init(NULL, 0);
    c->alloc((uv_handle_t *)c->tcp, 65536, &b);
    progress++;
    c->read((uv_stream_t *)c->tcp, c->eof ? UV_EOF : UV_ECONNRESET, &b);
}

/* --- The upstream, in memory ------------------------------------------------
 */

enum {
    ODD_NONE,
    ODD_STATUS,    /* another status */
    ODD_FAIL,      /* no reply at all */
    ODD_CUT,       /* the body ends early, with an error */
    ODD_CHANGED,   /* another size and validator */
    ODD_FULL,      /* a 200 and the whole body for a range */
    ODD_SHIFTED,   /* a 206 that starts elsewhere */
    ODD_NO_CRANGE, /* a 206 without Content-Range */
    ODD_416,       /* a 416 whatever the range */
    ODD_PRIVATE,   /* Vary, Set-Cookie */
    ODD_BAD_CLEN,  /* a Content-Length curl rejects */
    ODD_206,       /* a 206 to a request without Range */
    ODD_STALL,     /* nothing until the low-speed limit */
    ODD_EMPTY_416, /* a 416 without Content-Range */
    ODD_JUNK,      /* header lines from the control bytes */
    ODD_STAR,      /* a 206 of an object of unknown size (bytes a-b/(star)) */
    ODD_REFUSE,    /* the transfer cannot start */
    ODD_COUNT
};

typedef struct transfer {
    upstream_t *u;
    int step; /* 0: before the headers, 1: body, 2: done */
    int odd;
    unsigned flags;
    uint64_t size;     /* the object's size, as this reply says */
    uint64_t off, end; /* body: object bytes [off, end) still to send */
    bool sized;        /* Content-Length sent */
    uint64_t cut;      /* ODD_CUT: body bytes before the error */
    unsigned piece;    /* body bytes per callback; 0: all */
    uint32_t seed;
    bool aborted; /* a callback refused: curl ends with CURLE_WRITE_ERROR */
    struct transfer *next;
} transfer_t;

static transfer_t *transfers;
static size_t ntransfers;

/* The object size a target asks for with "size=N". */
NO_COVERAGE static uint64_t target_size(const char *t)
{
    const char *q = strchr(t, '?');
    const char *s = q ? strstr(q, "size=") : NULL;
    if (!s)
        return 100;
    uint64_t n = strtoull(s + 5, NULL, 10);
    return n > MAX_OBJ ? MAX_OBJ : n;
}

/* net.fetch: the transfer starts; its reply is decided now. */
NO_COVERAGE static int fake_fetch(upstream_t *u)
{
    transfer_t *t = calloc(1, sizeof(*t));
    if (!t)
        return -1;
    t->u = u;
    t->seed = target_seed(u->url);
    t->size = target_size(u->url);
    t->flags = ctl_u8();
    t->odd = t->flags & 0x80 ? (int)(ctl_u8() % ODD_COUNT) : ODD_NONE;
    t->piece = ctl_u8();
    if (t->odd == ODD_CHANGED)
        t->size = (t->size + 1 + ctl_u8()) % (MAX_OBJ + 1);
    if (t->odd == ODD_REFUSE) {
        free(t);
        return -1;
    }
    t->next = transfers;
    transfers = t;
    ntransfers++;
    progress++;
    return 0;
}

/* One header line through the proxy's header callback, as curl does. */
PRINTF_LIKE(2, 3)
NO_COVERAGE static void header(transfer_t *t, const char *fmt, ...)
{
    char line[512];
    va_list ap;
    if (t->aborted)
        return;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof(line) - 2, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n > sizeof(line) - 3)
        n = (int)sizeof(line) - 3;
    memcpy(line + n, "\r\n", 2);
    size_t len = (size_t)n + 2;
    if (on_curl_header(line, 1, len, t->u) != len)
        t->aborted = true;
}

/* A header line made of control bytes, CR and LF excepted (curl splits
 * lines at LF; a CR inside a line is passed on). Never empty nor starting
 * with a CR: curl takes such a line for the end of the headers and hands
 * on what follows as body, never as more header lines. */
NO_COVERAGE static void junk_header(transfer_t *t)
{
    char line[80];
    size_t n = ctl_u8() % (sizeof(line) - 2);
    if (n == 0)
        n = 1;
    for (size_t i = 0; i < n; i++) {
        unsigned ch = ctl_u8();
        line[i] = (char)(ch == '\n' || (i == 0 && ch == '\r') ? ':'
                         : ch                                 ? ch
                                                              : ' ');
    }
    memcpy(line + n, "\r\n", 2);
    if (!t->aborted && on_curl_header(line, 1, n + 2, t->u) != n + 2)
        t->aborted = true;
}

/* Status line and headers, decided by the request and the control bytes. */
NO_COVERAGE static void send_headers(transfer_t *t)
{
    upstream_t *u = t->u;
    uint64_t size = t->size, first = 0, last = size ? size - 1 : 0;
    bool range = u->kind == UP_RANGE, no_body = u->kind == UP_HEAD;
    unsigned f = t->flags;
    char etag[32] = "";
    int status = 200;
    bool crange = false, unsat = false;
    const char *raw_status = NULL;

    if (range) {
        first = u->first;
        last =
            u->last == FLIGHT_RANGE_END || u->last >= size ? size - 1 : u->last;
        if (first >= size) {
            status = 416;
            unsat = true;
        } else {
            status = 206;
            crange = true;
        }
    }
    switch (t->odd) {
    case ODD_STATUS: {
        /* Some as curl hands them on (it reads three digits). */
        static const char *const codes[] = {
            "200", "201",  "203", "204", "300", "301", "304",  "400", "403",
            "404", "410",  "500", "502", "503", "504", "599",  "299", "999",
            "600", "2000", "20",  "0",   "-1",  "2x0", "200x", "",    "100"};
        raw_status = codes[ctl_u8() % (sizeof(codes) / sizeof(codes[0]))];
        status = atoi(raw_status);
        crange = unsat = false;
        if (status == 100) /* a final 1xx: curl ends it as an error */
            t->odd = ODD_FAIL;
        break;
    }
    case ODD_FULL:
        if (range) {
            status = 200;
            first = 0;
            last = size ? size - 1 : 0;
            crange = unsat = false;
        }
        break;
    case ODD_SHIFTED:
        if (range && crange) {
            first += 1 + ctl_u8() % 100;
            if (first > last)
                last = first;
        }
        break;
    case ODD_416:
        status = 416;
        crange = false;
        unsat = true;
        break;
    case ODD_206:
        if (!range) {
            status = 206;
            crange = true;
        }
        break;
    case ODD_EMPTY_416:
        status = 416;
        crange = unsat = false;
        break;
    default:
        break;
    }
    if (t->odd == ODD_FAIL) {
        t->step = 2;
        return;
    }
    if (f & 0x20) { /* an interim response first */
        header(t, "HTTP/1.1 100 Continue");
        header(t, "%s", "");
    }
    if (raw_status)
        header(t, "HTTP/1.1 %s Fuzz", raw_status);
    else
        header(t, "HTTP/1.1 %d Fuzz", status);
    if (status == 204 || status == 304 || status < 200)
        no_body = true;
    if (!(f & 0x08)) {
        snprintf(etag, sizeof(etag), "%s\"v%" PRIu64 "\"", f & 0x04 ? "W/" : "",
                 size);
        header(t, "ETag: %s", etag);
    }
    header(t, "Last-Modified: Mon, 01 Jan 2024 00:00:00 GMT");
    if (f & 0x10)
        header(t, "Cache-Control: %s",
               (f & 0x40) ? "max-age=0" : "private, no-store");
    else
        header(t, "Cache-Control: public, max-age=3600");
    if (t->odd == ODD_PRIVATE)
        header(t, "%s", (f & 0x40) ? "Vary: Accept" : "Set-Cookie: a=b");
    if (t->odd == ODD_JUNK) {
        unsigned k = 1 + ctl_u8() % 4;
        for (unsigned i = 0; i < k; i++)
            junk_header(t);
    }
    header(t, "Content-Type: application/octet-stream");
    uint64_t len = unsat || size == 0 ? 0 : last - first + 1;
    if (crange && t->odd == ODD_STAR)
        header(t, "Content-Range: bytes %" PRIu64 "-%" PRIu64 "/*", first,
               last);
    else if (crange && t->odd != ODD_NO_CRANGE)
        header(t, "Content-Range: bytes %" PRIu64 "-%" PRIu64 "/%" PRIu64,
               first, last, size);
    if (unsat)
        header(t, "Content-Range: bytes */%" PRIu64, size);
    bool page = unsat && (f & 0x40); /* a 416 with a page of its own */
    if (page)
        len = 20;
    if (t->odd == ODD_BAD_CLEN) {
        header(t, "Content-Length: %s", (f & 0x40) ? "-1" : "12abc");
        t->step = 2; /* curl: CURLE_WEIRD_SERVER_REPLY */
        return;
    }
    /* Without Content-Length (flag 0x01) the body ends with the transfer;
     * a 416 here has no body. */
    t->sized = !(f & 0x01) || no_body || (unsat && !page);
    if (t->sized)
        header(t, "Content-Length: %" PRIu64, len);
    else if (f & 0x02)
        header(t, "Transfer-Encoding: chunked");
    header(t, "%s", "");
    t->off = page ? 0 : first;
    t->end = page ? len : no_body || unsat || size == 0 ? first : last + 1;
    if (t->odd == ODD_CUT)
        t->cut = ctl_u8() % (t->end - t->off + 1);
    t->step = t->aborted ? 2 : 1;
}

NO_COVERAGE static void send_body(transfer_t *t, bool all)
{
    uint64_t left = t->end - t->off;
    if (t->odd == ODD_CUT && t->cut < left)
        left = t->cut;
    if (left == 0 || t->aborted) {
        t->step = 2;
        return;
    }
    uint64_t n = all || !t->piece ? left : t->piece;
    if (n > left)
        n = left;
    static char buf[MAX_OBJ + 256]; /* a body piece is never longer */
    for (uint64_t i = 0; i < n; i++)
        buf[i] = (char)content(t->seed, t->off + i);
    t->off += n;
    if (t->odd == ODD_CUT)
        t->cut -= n;
    if (on_curl_body(buf, 1, (size_t)n, t->u) != n)
        t->aborted = true;
}

NO_COVERAGE static void transfer_end(transfer_t *t)
{
    CURLcode res = CURLE_OK;
    if (t->aborted)
        res = CURLE_WRITE_ERROR;
    else if (t->odd == ODD_FAIL)
        res = CURLE_COULDNT_CONNECT;
    else if (t->odd == ODD_BAD_CLEN)
        res = CURLE_WEIRD_SERVER_REPLY;
    else if (t->odd == ODD_STALL)
        res = CURLE_OPERATION_TIMEDOUT;
    else if (t->odd == ODD_CUT && t->sized)
        res = t->off < t->end ? CURLE_PARTIAL_FILE : CURLE_OK;
    else if (t->odd == ODD_CUT) /* the connection went: no telling */
        res = CURLE_RECV_ERROR;
    transfer_t **pp = &transfers;
    while (*pp != t)
        pp = &(*pp)->next;
    *pp = t->next;
    ntransfers--;
    upstream_t *u = t->u;
    free(t);
    upstream_done(u, res);
}

/* One step of a transfer. force: the pump, which ends stalls too. */
NO_COVERAGE static void transfer_step(transfer_t *t, bool force)
{
    progress++;
    if (t->odd == ODD_STALL && !force)
        return;
    if (t->odd == ODD_STALL) {
        transfer_end(t);
        return;
    }
    switch (t->step) {
    case 0:
        send_headers(t);
        break;
    case 1:
        send_body(t, force);
        break;
    default:
        transfer_end(t);
        break;
    }
}

/* --- The requests, as the proxy parses them --------------------------------
 */

typedef struct req_info {
    int method;
    bool keep_alive_req; /* what the request asked for */
    bool too_long, bad_target, stats;
    bool ranged, suffix; /* the Range the proxy honours */
    uint64_t first, last;
    uint32_t seed;
} req_info_t;

static req_info_t *reqs;
static size_t nreqs, capreqs;
static bool parse_error; /* after the nreqs complete requests */

/* Runs the proxy's own parser settings over the client's bytes, one message
 * at a time as parse_pending does, on a scratch connection. */
NO_COVERAGE static void mirror_requests(void)
{
    static conn_t m;
    size_t off = 0;
    memset(&m, 0, sizeof(m));
    http_parser_init(&m.parser, HTTP_REQUEST);
    m.parser.data = &m;
    nreqs = 0;
    parse_error = false;
    while (off < nrequest) {
        http_parser_pause(&m.parser, 0);
        size_t n =
            http_parser_execute(&m.parser, &parser_settings,
                                (const char *)request + off, nrequest - off);
        enum http_errno err = HTTP_PARSER_ERRNO(&m.parser);
        if (err != HPE_OK && err != HPE_PAUSED) {
            parse_error = true;
            break;
        }
        off += n;
        if (!m.request_ready)
            break;
        m.request_ready = false;
        if (nreqs == capreqs) {
            capreqs = capreqs ? capreqs * 2 : 64;
            reqs = realloc(reqs, capreqs * sizeof(*reqs));
            CHECK(reqs, "oom");
        }
        req_info_t *r = &reqs[nreqs++];
        memset(r, 0, sizeof(*r));
        r->method = m.parser.method;
        r->keep_alive_req = http_should_keep_alive(&m.parser);
        r->too_long = m.url_too_long;
        r->bad_target = m.urllen == 0 || m.url[0] != '/';
        r->stats = !strcmp(m.url, "/__coalesce/stats");
        r->seed = target_seed(m.url);
        r->last = FLIGHT_RANGE_END;
        r->ranged = r->method == HTTP_GET && m.has_range && !m.has_if_range &&
                    parse_range(m.range, &r->first, &r->last, &r->suffix);
    }
}

/* --- Checking the responses ------------------------------------------------
 */

/* The response being parsed. */
typedef struct resp {
    const req_info_t *req; /* NULL: the 400 for a parse error */
    char field[64];
    size_t fieldlen;
    char value[256];
    size_t valuelen;
    bool in_value;
    int nclen, nte, nconn, nxcache, ncrange;
    int64_t clen;
    bool chunked, close;
    char crange[256];
    uint64_t cr_first, cr_last, cr_total; /* a 206's Content-Range */
    bool cr_known_total;
    uint64_t body, body_off; /* bytes so far; object offset of the next */
    bool check_body;
    int status;
} resp_t;

typedef struct resp_check {
    size_t index; /* responses begun */
    size_t done;  /* responses complete */
    bool in_resp; /* inside one */
    bool after_close;
    resp_t r;
} resp_check_t;

static inline bool is_tchar(unsigned char ch)
{
    return isalnum(ch) || (ch && strchr("!#$%&'*+-.^_`|~", ch));
}

/* Header name, header value: RFC 9110 syntax. */
NO_COVERAGE static void header_end(resp_check_t *c)
{
    resp_t *rc = &c->r;
    if (!rc->in_value)
        return;
    CHECK(rc->fieldlen > 0, "response %zu: empty header name", c->index);
    rc->field[rc->fieldlen < sizeof(rc->field) ? rc->fieldlen
                                               : sizeof(rc->field) - 1] = 0;
    rc->value[rc->valuelen < sizeof(rc->value) ? rc->valuelen
                                               : sizeof(rc->value) - 1] = 0;
    const char *f = rc->field, *v = rc->value;
    if (!strcasecmp(f, "content-length")) {
        rc->nclen++;
        char *end;
        CHECK(isdigit((unsigned char)v[0]), "Content-Length: %s", v);
        rc->clen = strtoll(v, &end, 10);
        CHECK(!*end, "Content-Length: %s", v);
    } else if (!strcasecmp(f, "transfer-encoding")) {
        rc->nte++;
        CHECK(!strcmp(v, "chunked"), "Transfer-Encoding: %s", v);
        rc->chunked = true;
    } else if (!strcasecmp(f, "connection")) {
        rc->nconn++;
        CHECK(!strcmp(v, "close") || !strcmp(v, "keep-alive"), "Connection: %s",
              v);
        rc->close = !strcmp(v, "close");
    } else if (!strcasecmp(f, "x-cache")) {
        rc->nxcache++;
    } else if (!strcasecmp(f, "content-range")) {
        rc->ncrange++;
        snprintf(rc->crange, sizeof(rc->crange), "%s", v);
    }
    rc->fieldlen = rc->valuelen = 0;
    rc->in_value = false;
}

NO_COVERAGE static int rc_begin(http_parser *p)
{
    resp_check_t *c = p->data;
    size_t i = c->index;
    CHECK(!c->after_close, "a response after Connection: close");
    CHECK(i < nreqs || (i == nreqs && parse_error),
          "response %zu to %zu requests%s", i, nreqs,
          parse_error ? " and a bad one" : "");
    c->in_resp = true;
    memset(&c->r, 0, sizeof(c->r));
    c->r.req = i < nreqs ? &reqs[i] : NULL;
    c->r.clen = -1;
    return 0;
}

NO_COVERAGE static int rc_field(http_parser *p, const char *at, size_t n)
{
    resp_check_t *c = p->data;
    resp_t *rc = &c->r;
    header_end(c);
    for (size_t i = 0; i < n; i++, rc->fieldlen++) {
        CHECK(is_tchar((unsigned char)at[i]),
              "response %zu: bad header name character 0x%02x", c->index,
              (unsigned char)at[i]);
        if (rc->fieldlen < sizeof(rc->field)) /* long ones: truncated */
            rc->field[rc->fieldlen] = at[i];
    }
    return 0;
}

NO_COVERAGE static int rc_value(http_parser *p, const char *at, size_t n)
{
    resp_check_t *c = p->data;
    resp_t *rc = &c->r;
    rc->in_value = true;
    for (size_t i = 0; i < n && rc->valuelen < sizeof(rc->value); i++)
        rc->value[rc->valuelen++] = at[i];
    for (size_t i = 0; i < n; i++) { /* over the cap: still checked */
        unsigned char ch = (unsigned char)at[i];
        CHECK(ch == '\t' || (ch >= 32 && ch != 127),
              "response %zu: control character 0x%02x in a value", c->index,
              ch);
    }
    return 0;
}

NO_COVERAGE static int rc_headers_done(http_parser *p)
{
    resp_check_t *c = p->data;
    resp_t *rc = &c->r;
    const req_info_t *r = rc->req;
    size_t index = c->index;
    header_end(c);
    int st = p->status_code;
    rc->status = st;
    CHECK(p->http_major == 1 && p->http_minor == 1, "not HTTP/1.1");
    CHECK(st >= 100 && st <= 999, "status %d", st);
    CHECK(st >= 200, "response %zu: a 1xx status (%d) from the proxy", index,
          st);
    CHECK(rc->nconn == 1, "response %zu: %d Connection headers", index,
          rc->nconn);
    CHECK(rc->nxcache == 1, "response %zu: %d X-Cache headers", index,
          rc->nxcache);
    CHECK(rc->nclen <= 1 && rc->nte <= 1 && rc->ncrange <= 1,
          "response %zu: repeated framing headers", index);
    CHECK(!(rc->nclen && rc->nte), "response %zu: Content-Length and chunked",
          index);
    bool head = r && r->method == HTTP_HEAD;
    if (st == 204 || st == 304)
        CHECK(!rc->nte && (st == 304 || !rc->nclen),
              "response %zu: %d with framing headers", index, st);
    if (!head && st != 204 && st != 304 && !rc->nclen && !rc->nte)
        CHECK(rc->close,
              "response %zu: delimited by the close, but "
              "Connection: keep-alive",
              index);
    CHECK(!r || r->keep_alive_req || rc->close,
          "response %zu: keep-alive, but the request asked for a close", index);
    /* What the proxy itself must answer. */
    if (!r) {
        CHECK(st == 400 && rc->close, "parse error answered with %d%s", st,
              rc->close ? "" : " and keep-alive");
    } else if (r->method != HTTP_GET && r->method != HTTP_HEAD) {
        CHECK(st == 405, "method %s answered with %d",
              http_method_str((enum http_method)r->method), st);
    } else if (r->too_long) {
        CHECK(st == 414 && rc->close, "a long URL answered with %d", st);
    } else if (r->bad_target) {
        CHECK(st == 400, "a bad target answered with %d", st);
    }
    if (st == 206) {
        unsigned long long a, b, t;
        int used = 0;
        CHECK(r && r->ranged,
              "response %zu: 206 to a request without a Range"
              " we honour",
              index);
        CHECK(rc->ncrange == 1 && rc->nclen == 1,
              "response %zu: 206 without Content-Range or Content-Length",
              index);
        if (sscanf(rc->crange, "bytes %llu-%llu/%llu%n", &a, &b, &t, &used) ==
                3 &&
            !rc->crange[used]) {
            rc->cr_known_total = true;
            CHECK(b < t, "Content-Range: %s", rc->crange);
        } else {
            CHECK(sscanf(rc->crange, "bytes %llu-%llu/*%n", &a, &b, &used) ==
                          2 &&
                      !rc->crange[used],
                  "response %zu: Content-Range: %s", index, rc->crange);
            t = 0;
        }
        CHECK(a <= b && (int64_t)(b - a + 1) == rc->clen,
              "response %zu: Content-Range %s, Content-Length %" PRId64, index,
              rc->crange, rc->clen);
        rc->cr_first = a;
        rc->cr_last = b;
        rc->cr_total = t;
        /* The range asked for, clipped to the object. */
        if (r->ranged && rc->cr_known_total) {
            uint64_t wf, wl;
            if (r->suffix) {
                uint64_t n = r->first < t ? r->first : t;
                wf = t - n;
                wl = t - 1;
            } else {
                wf = r->first;
                wl = r->last < t ? r->last : t - 1;
            }
            CHECK(a == wf && b == wl,
                  "response %zu: Content-Range %s for bytes %" PRIu64
                  "-%" PRIu64 "%s",
                  index, rc->crange, r->first, r->last,
                  r->suffix ? " (suffix)" : "");
        }
        rc->body_off = a;
        rc->check_body = true;
    } else if (st == 416) {
        unsigned long long t;
        CHECK(r && r->ranged,
              "response %zu: 416 to a request without a Range"
              " we honour",
              index);
        int used = 0;
        CHECK(rc->ncrange == 1 &&
                  sscanf(rc->crange, "bytes */%llu%n", &t, &used) == 1 &&
                  !rc->crange[used],
              "response %zu: 416 with Content-Range \"%s\"", index,
              rc->ncrange ? rc->crange : "(none)");
    } else {
        CHECK(!rc->ncrange, "response %zu: Content-Range on a %d", index, st);
        rc->check_body = st == 200 && r && !r->stats;
    }
    return head; /* no body follows a HEAD's response */
}

NO_COVERAGE static int rc_body(http_parser *p, const char *at, size_t n)
{
    resp_check_t *c = p->data;
    resp_t *rc = &c->r;
    size_t index = c->index;
    if (rc->check_body)
        for (size_t i = 0; i < n; i++)
            CHECK((uint8_t)at[i] == content(rc->req->seed, rc->body_off + i),
                  "response %zu: body byte %" PRIu64 " (object offset %" PRIu64
                  ") wrong",
                  index, rc->body + i, rc->body_off + i);
    rc->body += n;
    rc->body_off += n;
    return 0;
}

NO_COVERAGE static int rc_complete(http_parser *p)
{
    resp_check_t *c = p->data;
    resp_t *rc = &c->r;
    if (rc->status == 206)
        CHECK(rc->body == rc->cr_last - rc->cr_first + 1,
              "response %zu: 206 with %" PRIu64 " body bytes for %s", c->index,
              rc->body, rc->crange);
    c->after_close = rc->close;
    c->in_resp = false;
    c->done = ++c->index;
    return 0;
}

static const http_parser_settings check_settings = {
    .on_message_begin = rc_begin,
    .on_header_field = rc_field,
    .on_header_value = rc_value,
    .on_headers_complete = rc_headers_done,
    .on_body = rc_body,
    .on_message_complete = rc_complete,
};

/* Parses all a client got; eof: the proxy has closed (a FIN), which ends a
 * body delimited by the close. Returns how many responses are complete;
 * *cut: bytes of one more. */
NO_COVERAGE static size_t
check_responses(const client_t *c, bool eof, bool *cut, bool *last_close)
{
    const char *sink = c->sink;
    size_t nsink = c->nsink;
    static resp_check_t rc;
    http_parser p;
    memset(&rc, 0, sizeof(rc));
    http_parser_init(&p, HTTP_RESPONSE);
    p.data = &rc;
    size_t n = http_parser_execute(&p, &check_settings, sink, nsink);
    CHECK(HTTP_PARSER_ERRNO(&p) == HPE_OK && n == nsink,
          "bad response %zu at byte %zu: %s", rc.index, n,
          http_errno_description(HTTP_PARSER_ERRNO(&p)));
    bool partial = rc.in_resp;
    if (eof) {
        http_parser_execute(&p, &check_settings, NULL, 0);
        *cut = HTTP_PARSER_ERRNO(&p) == HPE_INVALID_EOF_STATE;
        CHECK(*cut || HTTP_PARSER_ERRNO(&p) == HPE_OK, "at EOF: %s",
              http_errno_description(HTTP_PARSER_ERRNO(&p)));
    } else {
        *cut = partial;
    }
    *last_close = rc.after_close;
    return rc.done;
}

/* --- Driving ---------------------------------------------------------------
 */

NO_COVERAGE static void setup(void)
{
    P.upstream = "http://fuzz.invalid";
    P.cache_size = 1024; /* objects up to 256 bytes are kept, 4 at least */
    P.chunk_size = CHUNK;
    P.max_lag = MAX_LAG;
    P.idle_timeout_ms = 0;
    net.write = fake_write;
    net.queued = fake_queued;
    net.read_start = fake_read_start;
    net.read_stop = fake_read_stop;
    net.shutdown = fake_shutdown;
    net.close = fake_close;
    net.fetch = fake_fetch;
    if (proxy_init() != 0)
        abort();
}

/* A connection accepted: the proxy's own setup, without a socket. */
NO_COVERAGE static void client_connect(client_t *c)
{
    char *sink = c->sink;
    size_t cap = c->capsink;
    memset(c, 0, sizeof(*c));
    c->sink = sink; /* kept from one execution to the next */
    c->capsink = cap;
    c->tail = &c->head;
    c->end = nrequest;
    c->conn = calloc(1, sizeof(*c->conn));
    CHECK(c->conn, "oom");
    uv_tcp_init(P.loop, &c->conn->tcp);
    c->conn->tcp.data = c->conn;
    c->tcp = &c->conn->tcp;
    conn_start(c->conn);
}

/* One round of everything: reads, writes, whole transfers, a loop turn. */
NO_COVERAGE static bool pump_round(void)
{
    uint64_t before = progress;
    for (int i = 0; i < nclients; i++) {
        client_feed(&clients[i], SIZE_MAX);
        client_notify(&clients[i]);
        while (drain_one(&clients[i]))
            ;
    }
    for (transfer_t *t = transfers, *next; t; t = next) {
        next = t->next; /* the end frees t, and nothing else */
        while (t->step < 2 && t->odd != ODD_STALL)
            transfer_step(t, true);
        transfer_step(t, true);
    }
    uv_run(P.loop, UV_RUN_NOWAIT);
    return progress != before;
}

/* Until nothing moves for two rounds in a row. */
NO_COVERAGE static void settle(const char *when)
{
    int idle = 0, rounds = 0;
    while (idle < 2) {
        CHECK(++rounds < MAX_ROUNDS, "no quiescence %s", when);
        idle = pump_round() ? 0 : idle + 1;
    }
}

NO_COVERAGE static void run_controlled(void)
{
    for (int steps = 0; ctl_left() && steps < MAX_STEPS; steps++) {
        unsigned op = ctl_u8();
        client_t *c = &clients[(op >> 3) % (unsigned)nclients];
        switch (op % 8) {
        case 0:
        case 1: { /* a read of n bytes (0: all) */
            unsigned n = ctl_u8();
            client_feed(c, n ? n : SIZE_MAX);
            break;
        }
        case 2: { /* the client takes up to n writes */
            unsigned n = 1 + ctl_u8() % 4;
            while (n-- && drain_one(c))
                ;
            break;
        }
        case 3:
        case 4: /* a step of one transfer */
            if (ntransfers) {
                unsigned k = ctl_u8() % ntransfers;
                transfer_t *t = transfers;
                while (k--)
                    t = t->next;
                transfer_step(t, false);
            }
            break;
        case 5:
            uv_run(P.loop, UV_RUN_NOWAIT);
            break;
        case 6:
            if (!(op & 0x10))
                client_notify(c);
            else if (!c->closed) /* its idle timer fires */
                on_idle(&c->conn->idle);
            break;
        default: /* the client leaves: FIN, or RST */
            client_leave(c, op & 0x10);
            break;
        }
    }
}

/* With the connection still open: everything read has been answered,
 * unless the client left; a close was announced and cut nothing. */
NO_COVERAGE static void check_open(const client_t *c)
{
    bool cut, last_close;
    size_t done = check_responses(c, c->closed && !c->reset, &cut, &last_close);
    if (c->eof || c->rst)
        return;
    if (!c->closed) {
        CHECK(c->off == c->end, "the proxy stopped reading at byte %zu of %zu",
              c->off, c->end);
        CHECK(done == nreqs && !parse_error,
              "%zu of %zu requests answered, the connection still open", done,
              nreqs);
        CHECK(!last_close, "Connection: close, but the connection open");
        CHECK(!c->conn->busy, "busy after the last response");
    } else if (!c->reset) {
        CHECK(!cut, "a graceful close cut response %zu", done);
        CHECK(last_close,
              "a graceful close after response %zu, which said "
              "keep-alive",
              done);
    }
}

/* After the client left: closed and freed, and no response cut by a
 * graceful close the client did not start. */
NO_COVERAGE static void check_gone(const client_t *c)
{
    bool cut, last_close;
    CHECK(c->closed, "the connection is still open after the client left");
    CHECK(!c->conn, "the connection was not freed");
    check_responses(c, !c->reset, &cut, &last_close);
    CHECK(!cut || c->reset || c->left_first, "a graceful close cut a response");
}

NO_COVERAGE int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static bool ready;
    if (!ready) {
        setup();
        ready = true;
    }
    in_data = data;
    in_size = size;
    const uint8_t *nul = memchr(data, 0, size);
    request = data;
    nrequest = nul ? (size_t)(nul - data) : size;
    ctl = nul ? nul + 1 : data + size;
    nctl = nul ? size - nrequest - 1 : 0;
    ctl_off = 0;
    mirror_requests();

    /* Bit 0 of the first control byte: a second client sends the same
     * bytes, so that the two share flights (and one may leave). */
    nclients = 1 + (ctl_u8() & 1);
    for (int i = 0; i < nclients; i++)
        client_connect(&clients[i]);
    run_controlled();
    settle("with the clients connected");
    for (int i = 0; i < nclients; i++)
        check_open(&clients[i]);

    for (int i = 0; i < nclients; i++)
        client_leave(&clients[i], false);
    settle("after the clients left");
    for (int i = 0; i < nclients; i++)
        check_gone(&clients[i]);
    CHECK(!P.conns && P.conns_open == 0, "connections not freed");
    CHECK(!transfers && !P.upstreams, "upstream transfers left");

    flight_stats_t st;
    flight_group_stats(P.group, &st, sizeof(st));
    CHECK(st.readers_open == 0, "readers_open %" PRIu64, st.readers_open);
    CHECK(st.flights_active == 0, "flights_active %" PRIu64, st.flights_active);
    /* The cache holds buffers, not segments: those die with the flights. */
    CHECK(st.segments_held == 0 && st.bytes_held == 0,
          "segments_held %" PRIu64 " bytes_held %" PRIu64, st.segments_held,
          st.bytes_held);
    while (P.lru_head)
        lru_unlink(P.lru_head);
    CHECK(P.cache_bytes == 0 && P.cache_objects == 0, "cache accounting");
    return 0;
}

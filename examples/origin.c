/*
 * origin.c: a small HTTP/1.1 origin server for the proxy demo and tests.
 *
 * Every path serves a deterministic object generated on the fly, so a client
 * can check each byte it receives without holding a copy, and objects can be
 * as large as you like (nothing is buffered). Query parameters shape each
 * response, and /__origin/stats counts what the origin was asked for: the
 * numbers a collapsing proxy in front of it should keep small.
 *
 *   origin [--listen HOST:PORT] [--size BYTES] [--ttfb MS]
 *          [--rate BYTES_PER_S]
 *
 * Defaults: 127.0.0.1:8081 (port 0 picks a free port), 1 MiB objects, no
 * delay, no rate limit. Once listening it prints one line to stdout,
 * "origin listening on HOST:PORT", and nothing else (errors go to stderr).
 *
 * Query parameters (the path alone, without the query, names the object):
 *   size=N        object size in bytes
 *   ttfb=MS       delay before the status line
 *   rate=B        body rate in bytes per second (0: unlimited)
 *   range=0       ignore Range headers: always 200 with the full body
 *   etag=STR      send ETag "STR" instead of the computed one
 *   fail=before   after ttfb, reset the connection (RST) without a response
 *   fail=after:N  send the headers and N body bytes, then reset
 *   status=CODE   reply CODE (200-599) with a short text body
 *
 * GET /__origin/stats returns the counters as JSON, GET /__origin/reset
 * zeroes them; neither is counted.
 *
 * Build:
 *   cc -std=c11 origin.c -luv -lhttp_parser
 */
#define _POSIX_C_SOURCE 200809L /* gmtime_r, strncasecmp */

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/ioctl.h>
#include <time.h>

#include <http_parser.h>
#include <uv.h>

#define PIECE        (64 * 1024) /* body bytes generated per write */
#define MAX_INFLIGHT 4           /* writes queued per connection */
#define TICK_MS      10          /* pacing period when rate is set */
#define URL_MAX      8192
#define RANGE_MAX    256  /* longer Range headers get a 400 */
#define ETAG_MAX     64   /* longest etag= override */
#define MAX_PATHS    1000 /* paths with their own counters */
#define MAX_RANGES   1000 /* Range values kept per path */
#define LINGER_MS    2000 /* how long a closing connection drains input */
#define DRAIN_MS     1000 /* how long fail=after waits for the peer's ACKs */

#define LAST_MODIFIED "Mon, 01 Jan 2024 00:00:00 GMT"

#ifdef __GNUC__
#    define PRINTF_LIKE(f, a) __attribute__((format(printf, f, a)))
#else
#    define PRINTF_LIKE(f, a)
#endif

/* --- Objects -------------------------------------------------------------- */

/* FNV-1a (32 bit) of the path: the object's seed. */
static uint32_t path_seed(const char *path, size_t len)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < len; i++)
        h = (h ^ (uint8_t)path[i]) * 16777619u;
    return h;
}

/* Byte i of the object with seed s, so clients can check any range:
 *   (uint8_t)(((uint32_t)(i >> 2) * 2654435761u ^ s) >> ((i & 3) * 8))
 * that is, word i / 4 of a multiplicative hash, little-endian. */
static uint8_t object_byte(uint32_t seed, uint64_t i)
{
    return (uint8_t)(((uint32_t)(i >> 2) * 2654435761u ^ seed) >>
                     ((i & 3) * 8));
}

/* The same a word at a time: four times fewer multiplications. */
static void fill(char *dst, uint32_t seed, uint64_t off, size_t len)
{
    size_t k = 0;
    for (; k < len && (off + k) % 4; k++)
        dst[k] = (char)object_byte(seed, off + k);
    for (; k + 4 <= len; k += 4) {
        uint32_t w = (uint32_t)((off + k) >> 2) * 2654435761u ^ seed;
        dst[k] = (char)(uint8_t)w;
        dst[k + 1] = (char)(uint8_t)(w >> 8);
        dst[k + 2] = (char)(uint8_t)(w >> 16);
        dst[k + 3] = (char)(uint8_t)(w >> 24);
    }
    for (; k < len; k++)
        dst[k] = (char)object_byte(seed, off + k);
}

/* --- Counters ------------------------------------------------------------- */

struct path_stats {
    struct path_stats *next;
    char *path;
    uint64_t requests, gets, heads, body_bytes;
    char **ranges;
    size_t nranges;
};

static struct {
    uint64_t requests, body_bytes;
    struct path_stats *first, *last;
    size_t npaths;
    unsigned gen; /* bumped by reset, so older responses stop counting */
} stats;

/* The counters of a path, created on first use; NULL past MAX_PATHS (or out
 * of memory), when only the totals count. A list is enough at this size. */
static struct path_stats *path_stats(const char *path, size_t len)
{
    struct path_stats *ps;
    for (ps = stats.first; ps; ps = ps->next)
        if (strlen(ps->path) == len && memcmp(ps->path, path, len) == 0)
            return ps;
    if (stats.npaths == MAX_PATHS || !(ps = calloc(1, sizeof(*ps))))
        return NULL;
    if (!(ps->path = malloc(len + 1))) {
        free(ps);
        return NULL;
    }
    memcpy(ps->path, path, len);
    ps->path[len] = '\0';
    if (stats.last)
        stats.last->next = ps;
    else
        stats.first = ps;
    stats.last = ps;
    stats.npaths++;
    return ps;
}

static void add_range(struct path_stats *ps, const char *v, size_t len)
{
    if (!ps->ranges && !(ps->ranges = calloc(MAX_RANGES, sizeof(char *))))
        return;
    if (ps->nranges == MAX_RANGES ||
        !(ps->ranges[ps->nranges] = malloc(len + 1)))
        return;
    memcpy(ps->ranges[ps->nranges], v, len);
    ps->ranges[ps->nranges++][len] = '\0';
}

static void stats_reset(void)
{
    struct path_stats *ps, *next;
    for (ps = stats.first; ps; ps = next) {
        next = ps->next;
        for (size_t i = 0; i < ps->nranges; i++)
            free(ps->ranges[i]);
        free(ps->ranges);
        free(ps->path);
        free(ps);
    }
    unsigned gen = stats.gen + 1;
    memset(&stats, 0, sizeof(stats));
    stats.gen = gen;
}

/* A growing string for the stats JSON; on allocation failure it stays
 * truncated and oom is set. */
struct sbuf {
    char *p;
    size_t len, cap;
    int oom;
};

PRINTF_LIKE(2, 3) static void sb_printf(struct sbuf *b, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = b->oom ? -1
                       : vsnprintf(b->p ? b->p + b->len : NULL, b->cap - b->len,
                                   fmt, ap);
        va_end(ap);
        if (n < 0)
            return;
        if (b->len + (size_t)n < b->cap) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = (b->cap ? b->cap * 2 : 4096) + (size_t)n;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
}

/* A JSON string; paths and Range values come from the network. */
static void sb_json_str(struct sbuf *b, const char *s)
{
    sb_printf(b, "\"");
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            sb_printf(b, "\\%c", ch);
        else if (ch < 0x20 || ch >= 0x7f)
            sb_printf(b, "\\u%04x", ch);
        else
            sb_printf(b, "%c", ch);
    }
    sb_printf(b, "\"");
}

static void stats_json(struct sbuf *b)
{
    sb_printf(
        b, "{\"requests\":%" PRIu64 ",\"body_bytes\":%" PRIu64 ",\"paths\":{",
        stats.requests, stats.body_bytes);
    for (struct path_stats *ps = stats.first; ps; ps = ps->next) {
        sb_json_str(b, ps->path);
        sb_printf(b,
                  ":{\"requests\":%" PRIu64 ",\"gets\":%" PRIu64
                  ",\"heads\":%" PRIu64 ",\"body_bytes\":%" PRIu64
                  ",\"ranges\":[",
                  ps->requests, ps->gets, ps->heads, ps->body_bytes);
        for (size_t i = 0; i < ps->nranges; i++) {
            sb_json_str(b, ps->ranges[i]);
            sb_printf(b, i + 1 < ps->nranges ? "," : "");
        }
        sb_printf(b, ps->next ? "]}," : "]}");
    }
    sb_printf(b, "}}\n");
}

/* --- Connections ---------------------------------------------------------- */

/* One write: headers and/or a piece of body, freed in its callback. */
struct piece {
    uv_write_t req;
    size_t body_len; /* object bytes in it, for the counters */
    char data[];
};

struct response {
    int head, keep_alive;
    int fail_before, fail_after; /* reset instead of finishing */
    uint32_t seed;
    uint64_t off, end;        /* next object offset to send; end of the body */
    uint64_t rate;            /* bytes per second, 0: unlimited */
    uint64_t start_ns;        /* when the body started, for pacing */
    uint64_t queued;          /* body bytes written since start_ns */
    struct piece *head_piece; /* status line and headers, sent after ttfb */
    struct path_stats *ps;
    unsigned gen;
    int inflight;
};

struct conn {
    uv_tcp_t tcp;
    uv_timer_t timer; /* ttfb, pacing, drain before reset, linger */
    uv_shutdown_t shutdown;
    http_parser parser;
    struct conn *prev, *next;
    int open_handles, closing, lingering, reading;
    uint64_t deadline;

    /* Input. Reading stops while a response is in progress, so a paused
     * parser's unparsed bytes stay here for the next request (pipelining). */
    char in[16384];
    size_t in_len, in_off;

    /* The request being parsed. */
    char url[URL_MAX];
    size_t url_len;
    char field[8]; /* header name, enough to recognise "Range" */
    size_t field_len;
    int hstate; /* 0 before headers, 1 in a name, 2 in a value */
    int value_is_range, range_count;
    char range[RANGE_MAX + 1];
    size_t range_len;

    struct response r;
};

static uv_loop_t *loop;
static uv_tcp_t server;
static uv_signal_t sigterm, sigint;
static struct conn *conns; /* every open connection, for shutdown */
static struct {
    uint64_t size, ttfb, rate;
} defaults = {1048576, 0, 0};

static void feed(struct conn *c);

static void on_close(uv_handle_t *h)
{
    struct conn *c = h->data;
    if (--c->open_handles > 0)
        return;
    free(c->r.head_piece);
    free(c);
}

/* Closes at once; reset sends RST (SO_LINGER 0) instead of FIN. */
static void close_conn(struct conn *c, int reset)
{
    if (c->closing)
        return;
    c->closing = 1;
    if (c->prev)
        c->prev->next = c->next;
    else
        conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    uv_close((uv_handle_t *)&c->timer, on_close);
    if (!reset || uv_tcp_close_reset(&c->tcp, on_close) != 0)
        uv_close((uv_handle_t *)&c->tcp, on_close);
}

static void on_linger_timeout(uv_timer_t *t)
{
    close_conn(t->data, 0);
}

static void on_shutdown(uv_shutdown_t *req, int status)
{
    (void)req;
    (void)status; /* the linger timer or the peer's EOF closes */
}

static void alloc_in(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    struct conn *c = h->data;
    (void)hint;
    *buf = uv_buf_init(c->in, sizeof(c->in));
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct conn *c = s->data;
    (void)buf;
    if (nread < 0) {
        close_conn(c, 0); /* EOF or error; a response was never pending */
        return;
    }
    if (c->lingering || nread == 0)
        return;
    c->in_len = (size_t)nread;
    c->in_off = 0;
    feed(c);
}

static void set_reading(struct conn *c, int on)
{
    if (on && !c->reading) {
        if (uv_read_start((uv_stream_t *)&c->tcp, alloc_in, on_read) != 0)
            close_conn(c, 0);
        else
            c->reading = 1;
    } else if (!on && c->reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = 0;
    }
}

/* After the last response: FIN once the writes are out, then read and drop
 * whatever the client still sends until it closes. Closing with unread
 * input would send an RST that can destroy the response in flight. */
static void linger_close(struct conn *c)
{
    c->lingering = 1;
    if (uv_shutdown(&c->shutdown, (uv_stream_t *)&c->tcp, on_shutdown) != 0) {
        close_conn(c, 0);
        return;
    }
    uv_timer_start(&c->timer, on_linger_timeout, LINGER_MS, 0);
    set_reading(c, 1);
}

/* fail=after: reset only once the peer has acknowledged the bytes sent, as
 * an RST drops whatever is still in our send queue. Bounded by DRAIN_MS. */
static void on_drain_tick(uv_timer_t *t)
{
    struct conn *c = t->data;
    uv_os_fd_t fd;
    int unacked = 0;
    if (uv_now(loop) < c->deadline &&
        uv_fileno((uv_handle_t *)&c->tcp, &fd) == 0 &&
        ioctl(fd, TIOCOUTQ, &unacked) == 0 && unacked > 0)
        return;
    close_conn(c, 1);
}

static void count_body(struct conn *c, size_t n)
{
    if (c->r.gen != stats.gen)
        return;
    stats.body_bytes += n;
    if (c->r.ps)
        c->r.ps->body_bytes += n;
}

static void pump(struct conn *c);

static void on_write(uv_write_t *req, int status)
{
    struct piece *p = (struct piece *)req;
    struct conn *c = req->handle->data;
    c->r.inflight--;
    if (status == 0 && p->body_len)
        count_body(c, p->body_len);
    free(p);
    if (c->closing)
        return;
    if (status < 0)
        close_conn(c, 0); /* the client went away */
    else
        pump(c);
}

static int send_piece(struct conn *c, struct piece *p, size_t len)
{
    uv_buf_t b = uv_buf_init(p->data, (unsigned)len);
    if (uv_write(&p->req, (uv_stream_t *)&c->tcp, &b, 1, on_write) != 0) {
        free(p);
        close_conn(c, 0);
        return -1;
    }
    c->r.inflight++;
    return 0;
}

static void on_pace_tick(uv_timer_t *t)
{
    pump(t->data);
}

/* The response is written: reset, close, or go on with the next request. */
static void finish(struct conn *c)
{
    if (c->r.fail_after) {
        c->deadline = uv_now(loop) + DRAIN_MS;
        uv_timer_start(&c->timer, on_drain_tick, 0, 1);
    } else if (!c->r.keep_alive) {
        linger_close(c);
    } else {
        memset(&c->r, 0, sizeof(c->r));
        http_parser_pause(&c->parser, 0);
        feed(c);
    }
}

/* Queues body pieces while fewer than MAX_INFLIGHT writes are pending, so a
 * slow client holds at most that much memory; the write callbacks and the
 * pacing timer call it again. */
static void pump(struct conn *c)
{
    struct response *r = &c->r;
    while (r->inflight < MAX_INFLIGHT && r->off < r->end) {
        uint64_t n = r->end - r->off < PIECE ? r->end - r->off : PIECE;
        if (r->rate) {
            /* What the rate allows since the body started, plus one tick. */
            double allowed =
                (double)r->rate * (double)(uv_hrtime() - r->start_ns) / 1e9 +
                (double)r->rate / (1000 / TICK_MS) - (double)r->queued;
            if (allowed < 1) {
                if (!uv_is_active((uv_handle_t *)&c->timer))
                    uv_timer_start(&c->timer, on_pace_tick, TICK_MS, 0);
                return;
            }
            if ((double)n > allowed)
                n = (uint64_t)allowed;
        }
        struct piece *p = malloc(sizeof(*p) + n);
        if (!p) {
            close_conn(c, 1);
            return;
        }
        fill(p->data, r->seed, r->off, (size_t)n);
        p->body_len = (size_t)n;
        r->off += n;
        r->queued += n;
        if (send_piece(c, p, (size_t)n) != 0)
            return;
    }
    if (r->inflight == 0 && r->off >= r->end)
        finish(c);
}

/* After ttfb: the status line and headers (plus any short body), then the
 * object's body. */
static void send_head(struct conn *c)
{
    struct piece *p = c->r.head_piece;
    c->r.head_piece = NULL;
    if (c->r.fail_before) {
        free(p);
        close_conn(c, 1);
        return;
    }
    if (send_piece(c, p, strlen(p->data)) != 0)
        return;
    c->r.start_ns = uv_hrtime();
    pump(c);
}

static void on_ttfb(uv_timer_t *t)
{
    send_head(t->data);
}

/* --- Requests ------------------------------------------------------------- */

struct params {
    uint64_t size, ttfb, rate, fail_n;
    int no_ranges, fail, status; /* fail: 0, 1 before, 2 after:N */
    const char *etag;
    size_t etag_len;
};

static int parse_u64(const char *s, size_t len, uint64_t *out)
{
    uint64_t v = 0;
    if (len == 0 || len > 19)
        return -1;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    *out = v;
    return 0;
}

/* The query's parameters over the defaults; -1 on a bad value. Values are
 * taken raw (no percent-decoding): none of them needs it. */
static int parse_query(const char *q, size_t len, struct params *p)
{
    const char *end = q + len;
    while (q < end) {
        const char *amp = memchr(q, '&', (size_t)(end - q));
        const char *next = amp ? amp : end;
        const char *eq = memchr(q, '=', (size_t)(next - q));
        if (eq) {
            size_t klen = (size_t)(eq - q), vlen = (size_t)(next - eq - 1);
            const char *v = eq + 1;
            uint64_t n = 0;
#define KEY(k) (klen == sizeof(k) - 1 && memcmp(q, k, klen) == 0)
            if (KEY("size")) {
                if (parse_u64(v, vlen, &p->size) || p->size > (1ull << 50))
                    return -1;
            } else if (KEY("ttfb")) {
                if (parse_u64(v, vlen, &p->ttfb) || p->ttfb > 3600000)
                    return -1;
            } else if (KEY("rate")) {
                if (parse_u64(v, vlen, &p->rate))
                    return -1;
            } else if (KEY("range")) {
                p->no_ranges = vlen == 1 && v[0] == '0';
            } else if (KEY("etag")) {
                if (vlen == 0 || vlen > ETAG_MAX)
                    return -1;
                for (size_t i = 0; i < vlen; i++)
                    if (v[i] < 0x21 || v[i] > 0x7e || v[i] == '"' ||
                        v[i] == '\\')
                        return -1;
                p->etag = v;
                p->etag_len = vlen;
            } else if (KEY("fail")) {
                if (vlen == 6 && memcmp(v, "before", 6) == 0)
                    p->fail = 1;
                else if (vlen > 6 && memcmp(v, "after:", 6) == 0 &&
                         parse_u64(v + 6, vlen - 6, &p->fail_n) == 0)
                    p->fail = 2;
                else
                    return -1;
            } else if (KEY("status")) {
                if (parse_u64(v, vlen, &n) || n < 200 || n > 599)
                    return -1;
                p->status = (int)n;
            }
#undef KEY
        }
        q = amp ? amp + 1 : end;
    }
    return 0;
}

/* A single range of an object of the given size: 206 with [*a, *b], 416,
 * or 200 for anything we do not serve as a range (RFC 9110 allows ignoring
 * a Range header). */
static int parse_range(const char *v, uint64_t size, uint64_t *a, uint64_t *b)
{
    const char *dash;
    uint64_t x, y;
    if (strncasecmp(v, "bytes=", 6) != 0 || strchr(v, ',') ||
        !(dash = strchr(v + 6, '-')))
        return 200;
    const char *s = v + 6, *e = dash + 1;
    size_t slen = (size_t)(dash - s), elen = strlen(e);
    if (slen == 0) { /* bytes=-n: the last n bytes */
        if (parse_u64(e, elen, &y))
            return 200;
        if (y == 0 || size == 0)
            return 416;
        *a = y >= size ? 0 : size - y;
        *b = size - 1;
        return 206;
    }
    if (parse_u64(s, slen, &x))
        return 200;
    if (elen == 0)
        y = UINT64_MAX; /* bytes=a- */
    else if (parse_u64(e, elen, &y) || y < x)
        return 200;
    if (x >= size)
        return 416;
    *a = x;
    *b = y >= size ? size - 1 : y;
    return 206;
}

static const char *reason(int status)
{
    static const struct {
        int code;
        const char *text;
    } reasons[] = {
        {200, "OK"},
        {204, "No Content"},
        {206, "Partial Content"},
        {304, "Not Modified"},
        {400, "Bad Request"},
        {404, "Not Found"},
        {405, "Method Not Allowed"},
        {416, "Range Not Satisfiable"},
        {500, "Internal Server Error"},
        {502, "Bad Gateway"},
        {503, "Service Unavailable"},
        {504, "Gateway Timeout"},
    };
    for (size_t i = 0; i < sizeof(reasons) / sizeof(reasons[0]); i++)
        if (reasons[i].code == status)
            return reasons[i].text;
    return "Status";
}

/* A piece holding the status line, the headers and an optional short body;
 * extra is more header lines. 204 and 304 responses have no body. */
static struct piece *
make_head(struct conn *c, int status, const char *extra, const char *body)
{
    int nobody = status == 204 || status == 304;
    size_t blen = body && !nobody ? strlen(body) : 0;
    size_t cap = 512 + strlen(extra) + blen;
    struct piece *p = malloc(sizeof(*p) + cap);
    if (!p)
        return NULL;
    char date[64];
    struct tm tm;
    time_t now = time(NULL);
    strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S GMT",
             gmtime_r(&now, &tm));
    int n = snprintf(p->data, cap, "HTTP/1.1 %d %s\r\nDate: %s\r\n%s", status,
                     reason(status), date, extra);
    if (!nobody && body)
        n += snprintf(p->data + n, cap - (size_t)n,
                      "Content-Type: text/plain\r\nContent-Length: %zu\r\n",
                      blen);
    n += snprintf(p->data + n, cap - (size_t)n, "%s\r\n%s",
                  c->r.keep_alive ? "" : "Connection: close\r\n",
                  c->r.head || !body || nobody ? "" : body);
    p->body_len = 0;
    return p;
}

/* Replies at once with a short text body (or extra's own framing). */
static void
reply(struct conn *c, int status, const char *extra, const char *body)
{
    struct piece *p = make_head(c, status, extra, body);
    if (!p) {
        close_conn(c, 1);
        return;
    }
    c->r.head_piece = p;
    send_head(c);
}

static void reply_stats(struct conn *c)
{
    struct sbuf b = {0};
    stats_json(&b);
    if (b.oom) {
        free(b.p);
        reply(c, 500, "", "out of memory\n");
        return;
    }
    char extra[128];
    snprintf(extra, sizeof(extra),
             "Content-Type: application/json\r\nContent-Length: %zu\r\n"
             "Cache-Control: no-store\r\n",
             b.len);
    reply(c, 200, extra, NULL);
    /* The JSON goes as its own write after the headers. */
    struct piece *p;
    if (c->r.head || c->closing || !(p = malloc(sizeof(*p) + b.len))) {
        free(b.p);
        return;
    }
    memcpy(p->data, b.p, b.len);
    p->body_len = 0;
    free(b.p);
    send_piece(c, p, b.len);
}

/* An object, or status=CODE, after the request's ttfb. */
static void reply_object(struct conn *c,
                         const char *path,
                         size_t path_len,
                         const struct params *q)
{
    struct response *r = &c->r;
    char extra[512];
    int status = q->status;
    r->fail_before = q->fail == 1;
    if (status) {
        snprintf(extra, sizeof(extra), "%d %s\n", status, reason(status));
        r->head_piece = make_head(c, status, "", extra);
    } else {
        uint64_t a = 0, b = q->size ? q->size - 1 : 0;
        status = 200;
        if (c->range_count && !q->no_ranges)
            status = c->range_count > 1
                         ? 200
                         : parse_range(c->range, q->size, &a, &b);
        if (status == 200) {
            a = 0;
            b = q->size ? q->size - 1 : 0;
        }
        r->seed = path_seed(path, path_len);
        r->off = a;
        r->end = status == 416 || q->size == 0 ? a : b + 1;
        int n = snprintf(extra, sizeof(extra),
                         "Content-Type: application/octet-stream\r\n"
                         "Content-Length: %" PRIu64 "\r\n"
                         "Accept-Ranges: %s\r\nLast-Modified: %s\r\n",
                         r->end - r->off, q->no_ranges ? "none" : "bytes",
                         LAST_MODIFIED);
        if (q->etag)
            n += snprintf(extra + n, sizeof(extra) - (size_t)n,
                          "ETag: \"%.*s\"\r\n", (int)q->etag_len, q->etag);
        else
            n += snprintf(extra + n, sizeof(extra) - (size_t)n,
                          "ETag: \"%08" PRIx32 "-%llu\"\r\n", r->seed,
                          (unsigned long long)q->size);
        if (status == 206)
            snprintf(extra + n, sizeof(extra) - (size_t)n,
                     "Content-Range: bytes %" PRIu64 "-%" PRIu64 "/%" PRIu64
                     "\r\n",
                     a, b, q->size);
        else if (status == 416)
            snprintf(extra + n, sizeof(extra) - (size_t)n,
                     "Content-Range: bytes */%" PRIu64 "\r\n", q->size);
        r->head_piece = make_head(c, status, extra, NULL);
        if (r->head)
            r->end = r->off;
        r->rate = q->rate;
        if (q->fail == 2) {
            r->fail_after = 1;
            if (q->fail_n < r->end - r->off)
                r->end = r->off + q->fail_n;
        }
    }
    if (!r->head_piece) {
        close_conn(c, 1);
        return;
    }
    if (q->ttfb)
        uv_timer_start(&c->timer, on_ttfb, q->ttfb, 0);
    else
        send_head(c);
}

/* A complete request is parsed (and the parser paused): answer it. */
static void respond(struct conn *c)
{
    struct response *r = &c->r;
    int method = c->parser.method;
    r->head = method == HTTP_HEAD;
    r->keep_alive = http_should_keep_alive(&c->parser) && !c->parser.upgrade;
    r->gen = stats.gen;

    const char *url = c->url, *qm = memchr(url, '?', c->url_len);
    size_t path_len = qm ? (size_t)(qm - url) : c->url_len;
    if (path_len == 0 || url[0] != '/') {
        r->keep_alive = 0;
        reply(c, 400, "", "bad request target\n");
        return;
    }
    if (path_len > 10 && memcmp(url, "/__origin/", 10) == 0) {
        if (path_len == 15 && memcmp(url, "/__origin/stats", 15) == 0)
            reply_stats(c);
        else if (path_len == 15 && memcmp(url, "/__origin/reset", 15) == 0) {
            stats_reset();
            reply(c, 204, "", NULL);
        } else
            reply(c, 404, "", "not found\n");
        return;
    }

    stats.requests++;
    struct path_stats *ps = r->ps = path_stats(url, path_len);
    if (ps) {
        ps->requests++;
        ps->gets += method == HTTP_GET;
        ps->heads += method == HTTP_HEAD;
        if (c->range_count) {
            int prefixed = strncasecmp(c->range, "bytes=", 6) == 0;
            add_range(ps, c->range + (prefixed ? 6 : 0),
                      c->range_len - (prefixed ? 6 : 0));
        }
    }
    if (method != HTTP_GET && method != HTTP_HEAD) {
        r->keep_alive = 0;
        reply(c, 405, "Allow: GET, HEAD\r\n", "method not allowed\n");
        return;
    }
    struct params q = {
        .size = defaults.size, .ttfb = defaults.ttfb, .rate = defaults.rate};
    if (qm && parse_query(qm + 1, c->url_len - path_len - 1, &q) != 0) {
        r->keep_alive = 0;
        reply(c, 400, "", "bad query parameter\n");
        return;
    }
    reply_object(c, url, path_len, &q);
}

/* http-parser callbacks: collect the URL and the Range header. Returning
 * non-zero stops the parser with an error (a 400). */
static int on_message_begin(http_parser *p)
{
    struct conn *c = p->data;
    c->url_len = c->field_len = c->range_len = 0;
    c->hstate = c->value_is_range = c->range_count = 0;
    return 0;
}

static int on_url(http_parser *p, const char *at, size_t len)
{
    struct conn *c = p->data;
    if (len >= sizeof(c->url) - c->url_len)
        return -1;
    memcpy(c->url + c->url_len, at, len);
    c->url_len += len;
    c->url[c->url_len] = '\0';
    return 0;
}

/* Names and values may arrive in several calls each. */
static int on_header_field(http_parser *p, const char *at, size_t len)
{
    struct conn *c = p->data;
    if (c->hstate != 1)
        c->field_len = 0;
    c->hstate = 1;
    size_t n = len < sizeof(c->field) - c->field_len
                   ? len
                   : sizeof(c->field) - c->field_len;
    memcpy(c->field + c->field_len, at, n);
    c->field_len += len; /* past sizeof(field): not a name we want */
    return 0;
}

static int on_header_value(http_parser *p, const char *at, size_t len)
{
    struct conn *c = p->data;
    if (c->hstate != 2) {
        c->value_is_range =
            c->field_len == 5 && strncasecmp(c->field, "range", 5) == 0;
        c->range_count += c->value_is_range;
        if (c->value_is_range)
            c->range_len = 0; /* a second Range header: multi-range */
    }
    c->hstate = 2;
    if (!c->value_is_range)
        return 0;
    if (len > RANGE_MAX - c->range_len)
        return -1;
    memcpy(c->range + c->range_len, at, len);
    c->range_len += len;
    c->range[c->range_len] = '\0';
    return 0;
}

static int on_message_complete(http_parser *p)
{
    /* One request at a time: the rest of the input waits in c->in. */
    http_parser_pause(p, 1);
    return 0;
}

static const http_parser_settings settings = {
    .on_message_begin = on_message_begin,
    .on_url = on_url,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_message_complete = on_message_complete,
};

/* Parses buffered input up to the next complete request. */
static void feed(struct conn *c)
{
    while (c->in_off < c->in_len) {
        size_t n = http_parser_execute(&c->parser, &settings, c->in + c->in_off,
                                       c->in_len - c->in_off);
        c->in_off += n;
        enum http_errno e = HTTP_PARSER_ERRNO(&c->parser);
        if (e == HPE_PAUSED) {
            set_reading(c, 0);
            respond(c);
            return;
        }
        if (e != HPE_OK || n == 0) {
            set_reading(c, 0);
            c->r.keep_alive = 0;
            reply(c, 400, "", "bad request\n");
            return;
        }
    }
    set_reading(c, 1);
}

static void on_connection(uv_stream_t *srv, int status)
{
    struct conn *c;
    if (status < 0) {
        fprintf(stderr, "origin: accept: %s\n", uv_strerror(status));
        return;
    }
    if (!(c = calloc(1, sizeof(*c)))) {
        fprintf(stderr, "origin: out of memory\n");
        return;
    }
    uv_tcp_init(loop, &c->tcp);
    uv_timer_init(loop, &c->timer);
    c->tcp.data = c->timer.data = c;
    c->open_handles = 2;
    if ((c->next = conns))
        conns->prev = c;
    conns = c;
    if (uv_accept(srv, (uv_stream_t *)&c->tcp) != 0) {
        close_conn(c, 0);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    http_parser_init(&c->parser, HTTP_REQUEST);
    c->parser.data = c;
    set_reading(c, 1);
}

/* --- Main ----------------------------------------------------------------- */

static void on_signal(uv_signal_t *s, int signum)
{
    (void)s;
    (void)signum;
    uv_close((uv_handle_t *)&server, NULL);
    uv_close((uv_handle_t *)&sigterm, NULL);
    uv_close((uv_handle_t *)&sigint, NULL);
    while (conns)
        close_conn(conns, 0);
}

static void usage(FILE *f)
{
    fprintf(f, "usage: origin [--listen HOST:PORT] [--size BYTES] "
               "[--ttfb MS] [--rate BYTES_PER_S]\n"
               "  every path serves a deterministic object; query parameters "
               "size, ttfb, rate,\n"
               "  range=0, etag, fail=before|after:N and status override the "
               "defaults;\n"
               "  GET /__origin/stats and /__origin/reset read and zero the "
               "counters\n");
}

/* HOST:PORT, with [v6]:PORT allowed. */
static int parse_listen(const char *s, struct sockaddr_storage *ss)
{
    char host[256];
    const char *colon = strrchr(s, ':');
    uint64_t port;
    if (!colon || (size_t)(colon - s) >= sizeof(host) ||
        parse_u64(colon + 1, strlen(colon + 1), &port) || port > 65535)
        return -1;
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = '\0';
    if (host[0] == '[' && colon > s + 1 && colon[-1] == ']') {
        host[colon - s - 1] = '\0';
        return uv_ip6_addr(host + 1, (int)port, (struct sockaddr_in6 *)ss);
    }
    return uv_ip4_addr(host, (int)port, (struct sockaddr_in *)ss);
}

int main(int argc, char **argv)
{
    const char *listen_on = "127.0.0.1:8081";
    for (int i = 1; i < argc; i += 2) {
        uint64_t *num = NULL;
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            usage(stdout);
            return 0;
        }
        if (i + 1 == argc) {
            usage(stderr);
            return 2;
        }
        if (strcmp(argv[i], "--listen") == 0)
            listen_on = argv[i + 1];
        else if (strcmp(argv[i], "--size") == 0)
            num = &defaults.size;
        else if (strcmp(argv[i], "--ttfb") == 0)
            num = &defaults.ttfb;
        else if (strcmp(argv[i], "--rate") == 0)
            num = &defaults.rate;
        else {
            usage(stderr);
            return 2;
        }
        if (num && parse_u64(argv[i + 1], strlen(argv[i + 1]), num) != 0) {
            fprintf(stderr, "origin: bad number for %s: %s\n", argv[i],
                    argv[i + 1]);
            return 2;
        }
    }

    struct sockaddr_storage ss;
    int rc, namelen = sizeof(ss);
    if (parse_listen(listen_on, &ss) != 0) {
        fprintf(stderr, "origin: bad --listen address: %s\n", listen_on);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN); /* a vanished client is a write error */
    loop = uv_default_loop();
    uv_tcp_init(loop, &server);
    if ((rc = uv_tcp_bind(&server, (struct sockaddr *)&ss, 0)) != 0 ||
        (rc = uv_listen((uv_stream_t *)&server, 1024, on_connection)) != 0 ||
        (rc = uv_tcp_getsockname(&server, (struct sockaddr *)&ss, &namelen))) {
        fprintf(stderr, "origin: listen on %s: %s\n", listen_on,
                uv_strerror(rc));
        return 1;
    }
    uv_signal_init(loop, &sigterm);
    uv_signal_init(loop, &sigint);
    uv_signal_start(&sigterm, on_signal, SIGTERM);
    uv_signal_start(&sigint, on_signal, SIGINT);

    char host[64];
    int port;
    if (ss.ss_family == AF_INET6) {
        uv_ip6_name((struct sockaddr_in6 *)&ss, host, sizeof(host));
        port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
        printf("origin listening on [%s]:%d\n", host, port);
    } else {
        uv_ip4_name((struct sockaddr_in *)&ss, host, sizeof(host));
        port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
        printf("origin listening on %s:%d\n", host, port);
    }
    fflush(stdout);

    uv_run(loop, UV_RUN_DEFAULT);
    rc = uv_loop_close(loop);
    stats_reset();
    if (rc != 0) {
        fprintf(stderr, "origin: loop close: %s\n", uv_strerror(rc));
        return 1;
    }
    return 0;
}

/*
 * End-to-end harness: child processes, a concurrent HTTP client on a private
 * libuv loop, the origin's content formula and a small JSON number reader
 * (the demo does not link jansson).
 */
#define _GNU_SOURCE /* pipe2 */

#include "e2e.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h> /* NAN */
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <time.h>
#include <unistd.h>

#include <http_parser.h>
#include <uv.h>

#ifndef E2E_BINDIR
#    error "E2E_BINDIR must name the directory holding proxy and origin"
#endif

/* --- Content -------------------------------------------------------------- */

uint32_t e2e_path_seed(const char *path)
{
    uint32_t h = 2166136261u;
    for (; *path && *path != '?'; path++)
        h = (h ^ (uint8_t)*path) * 16777619u;
    return h;
}

uint8_t e2e_content_byte(uint32_t seed, uint64_t off)
{
    return (uint8_t)(((uint32_t)(off >> 2) * 2654435761u ^ seed) >>
                     ((off & 3) * 8));
}

void e2e_content_fill(uint32_t seed, uint64_t off, uint8_t *dst, size_t len)
{
    size_t k = 0;
    for (; k < len && (off + k) % 4; k++)
        dst[k] = e2e_content_byte(seed, off + k);
    for (; k + 4 <= len; k += 4) { /* a word at a time */
        uint32_t w = (uint32_t)((off + k) >> 2) * 2654435761u ^ seed;
        dst[k] = (uint8_t)w;
        dst[k + 1] = (uint8_t)(w >> 8);
        dst[k + 2] = (uint8_t)(w >> 16);
        dst[k + 3] = (uint8_t)(w >> 24);
    }
    for (; k < len; k++)
        dst[k] = e2e_content_byte(seed, off + k);
}

/* --- Processes ------------------------------------------------------------ */

const char *e2e_bin(const char *name)
{
    static char buf[8][1024];
    static unsigned next;
    char *b = buf[next++ % 8];
    snprintf(b, sizeof(buf[0]), "%s/%s", E2E_BINDIR, name);
    return b;
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* The port in a "... listening on HOST:PORT" line, or -1. */
static int listening_port(const char *line)
{
    const char *colon = strrchr(line, ':');
    char *end;
    long port;
    if (!strstr(line, " listening on ") || !colon)
        return -1;
    port = strtol(colon + 1, &end, 10);
    return end != colon + 1 && port > 0 && port < 65536 ? (int)port : -1;
}

static void child_exec(int out, pid_t parent, const char *const argv[])
{
    sigset_t none;
    /* Dies with us, even if we crash; the check covers a parent that died
     * before prctl. */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent)
        _exit(127);
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    if (dup2(out, STDOUT_FILENO) < 0)
        _exit(127);
    execv(argv[0], (char *const *)argv);
    /* Only async-signal-safe calls here: the parent may have threads. */
    static const char msg[] = "e2e: exec failed: ";
    write(STDERR_FILENO, msg, sizeof(msg) - 1);
    write(STDERR_FILENO, argv[0], strlen(argv[0]));
    write(STDERR_FILENO, "\n", 1);
    _exit(127);
}

int e2e_spawn(e2e_proc_t *p, const char *const argv[])
{
    int fds[2];
    char line[512];
    size_t len = 0;
    pid_t parent = getpid();

    p->pid = 0;
    p->port = 0;
    if (pipe2(fds, O_CLOEXEC) != 0)
        return -1;
    pid_t pid = fork();
    if (pid < 0) {
        close(fds[0]);
        close(fds[1]);
        return -1;
    }
    if (pid == 0)
        child_exec(fds[1], parent, argv);
    close(fds[1]);

    int64_t deadline = mono_ms() + 10000;
    int port = -1;
    while (port < 0) {
        struct pollfd pfd = {.fd = fds[0], .events = POLLIN};
        int64_t left = deadline - mono_ms();
        if (left <= 0)
            break;
        int rc = poll(&pfd, 1, (int)left);
        if (rc < 0 && errno == EINTR)
            continue;
        if (rc <= 0)
            break;
        if (len == sizeof(line) - 1)
            len = 0; /* an overlong line: not ours */
        ssize_t n = read(fds[0], line + len, sizeof(line) - 1 - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break; /* it exited or closed stdout */
        len += (size_t)n;
        line[len] = '\0';
        char *nl;
        while (port < 0 && (nl = strchr(line, '\n'))) {
            *nl = '\0';
            port = listening_port(line);
            len -= (size_t)(nl + 1 - line);
            memmove(line, nl + 1, len + 1);
        }
    }
    close(fds[0]);
    if (port < 0) {
        fprintf(stderr, "e2e: %s did not print \"listening on\" within 10 s\n",
                argv[0]);
        kill(pid, SIGKILL);
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
            ;
        return -1;
    }
    p->pid = pid;
    p->port = port;
    return 0;
}

int e2e_stop(e2e_proc_t *p)
{
    pid_t pid = p->pid;
    int status;
    p->pid = 0;
    if (pid <= 0) /* never kill(0) or kill(-1) */
        return -1;
    kill(pid, SIGTERM);
    int64_t deadline = mono_ms() + 5000;
    while (mono_ms() < deadline) {
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid)
            return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
        if (r < 0 && errno != EINTR)
            return -1;
        struct timespec ts = {0, 10 * 1000000L};
        nanosleep(&ts, NULL);
    }
    fprintf(stderr, "e2e: pid %d ignored SIGTERM for 5 s; killing it\n",
            (int)pid);
    kill(pid, SIGKILL);
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    return -1;
}

/* --- Concurrent HTTP client ----------------------------------------------- */

struct run;

struct conn {
    uv_tcp_t tcp;
    uv_timer_t pace; /* resumes reading under read_rate */
    uv_connect_t connect;
    uv_write_t write;
    http_parser parser;
    struct run *run;
    e2e_req_t *req;
    char *request;
    size_t request_len;
    int done, message_done, aborted, tcp_open;
    uint32_t seed;
    uint64_t start; /* object offset of the first body byte */
    uint64_t raw;   /* bytes read, headers included, for read_rate */
    char field[32]; /* header name being parsed, truncated */
    size_t field_len;
    int in_value; /* the parser is in a header value */
    char *dst;    /* where the current value goes, or NULL */
    size_t dst_cap, dst_len;
    char content_length[24];
};

struct run {
    uv_loop_t loop;
    uv_timer_t timeout;
    struct conn *conns;
    size_t n, connecting, open, others_open;
    uint64_t t0; /* the common send instant; 0 before */
    /* One read buffer for every connection: reads are consumed at once. */
    char buf[65536];
    uint8_t expect[65536]; /* the bytes a verified body piece should hold */
};

static int64_t since_send_us(const struct run *run)
{
    return run->t0 ? (int64_t)((uv_hrtime() - run->t0) / 1000) : -1;
}

static void finish(struct conn *c, int error, int reset);

static void others_done(struct run *run)
{
    for (size_t i = 0; i < run->n; i++) {
        struct conn *c = &run->conns[i];
        c->req->body_bytes_at_others_done = c->req->body_bytes;
        if (c->req->close_when_others_done)
            finish(c, E2E_EABORTED, 0);
    }
}

/* Ends a request once: records the outcome and closes its handles (reset:
 * with an RST). */
static void finish(struct conn *c, int error, int reset)
{
    struct run *run = c->run;
    e2e_req_t *r = c->req;
    if (c->done)
        return;
    c->done = 1;
    r->error = error;
    if (r->t_done < 0)
        r->t_done = since_send_us(run);
    uv_close((uv_handle_t *)&c->pace, NULL);
    if (c->tcp_open && (!reset || uv_tcp_close_reset(&c->tcp, NULL) != 0))
        uv_close((uv_handle_t *)&c->tcp, NULL);
    if (!r->close_when_others_done && --run->others_open == 0)
        others_done(run);
    if (--run->open == 0)
        uv_close((uv_handle_t *)&run->timeout, NULL);
}

static void on_timeout(uv_timer_t *t)
{
    struct run *run = t->data;
    for (size_t i = 0; i < run->n; i++)
        finish(&run->conns[i], E2E_ETIMEOUT, 0);
}

/* Bytes read_rate still allows now (one 10 ms tick of burst). */
static double pace_allowance(const struct conn *c)
{
    double rate = (double)c->req->read_rate;
    return rate * (double)(uv_hrtime() - c->run->t0) / 1e9 + rate / 100 -
           (double)c->raw;
}

static void alloc_buf(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    struct conn *c = h->data;
    size_t len = sizeof(c->run->buf);
    (void)hint;
    if (c->req->read_rate) {
        double a = pace_allowance(c);
        len = a < 1 ? 1 : a < (double)len ? (size_t)a : len;
    }
    *buf = uv_buf_init(c->run->buf, (unsigned)len);
}

/* http-parser callbacks, in HTTP_RESPONSE mode. */

static int on_header_field(http_parser *p, const char *at, size_t len)
{
    struct conn *c = p->data;
    if (c->in_value)
        c->field_len = 0;
    c->in_value = 0;
    for (size_t i = 0; i < len && c->field_len < sizeof(c->field) - 1; i++)
        c->field[c->field_len++] = at[i];
    c->field[c->field_len] = '\0';
    return 0;
}

/* Copies the headers we report, truncated to their fields' sizes. */
static int on_header_value(http_parser *p, const char *at, size_t len)
{
    struct conn *c = p->data;
    e2e_req_t *r = c->req;
    if (!c->in_value) {
        static const struct {
            const char *name;
            size_t off, cap;
        } wanted[] = {
            {"x-cache", offsetof(e2e_req_t, x_cache), sizeof(r->x_cache)},
            {"content-range", offsetof(e2e_req_t, content_range),
             sizeof(r->content_range)},
            {"etag", offsetof(e2e_req_t, etag), sizeof(r->etag)},
        };
        c->in_value = 1;
        c->dst = NULL;
        c->dst_len = 0;
        for (size_t i = 0; i < sizeof(wanted) / sizeof(wanted[0]); i++)
            if (strcasecmp(c->field, wanted[i].name) == 0) {
                c->dst = (char *)r + wanted[i].off;
                c->dst_cap = wanted[i].cap;
            }
        if (strcasecmp(c->field, "content-length") == 0) {
            c->dst = c->content_length;
            c->dst_cap = sizeof(c->content_length);
        }
    }
    for (size_t i = 0; c->dst && i < len && c->dst_len < c->dst_cap - 1; i++)
        c->dst[c->dst_len++] = at[i];
    if (c->dst)
        c->dst[c->dst_len] = '\0';
    return 0;
}

static int on_headers_complete(http_parser *p)
{
    struct conn *c = p->data;
    e2e_req_t *r = c->req;
    unsigned long long a, b, size;
    r->status = p->status_code;
    r->t_headers = since_send_us(c->run);
    if (c->content_length[0])
        r->content_length = strtoll(c->content_length, NULL, 10);
    if (r->status == 206 &&
        sscanf(r->content_range, "bytes %llu-%llu/%llu", &a, &b, &size) == 3)
        c->start = a;
    /* The parser cannot know the request was a HEAD: 1 means no body. */
    return r->method && strcmp(r->method, "HEAD") == 0;
}

static int on_body(http_parser *p, const char *at, size_t len)
{
    struct conn *c = p->data;
    e2e_req_t *r = c->req;
    if (r->t_first_body < 0)
        r->t_first_body = since_send_us(c->run);
    if (r->abort_after && len >= r->abort_after - r->body_bytes) {
        len = (size_t)(r->abort_after - r->body_bytes);
        c->aborted = 1;
    }
    if (r->verify) {
        /* Reads are at most sizeof(run->buf), and so is each body piece. */
        uint8_t *want = c->run->expect;
        e2e_content_fill(c->seed, c->start + r->body_bytes, want, len);
        if (memcmp(at, want, len) != 0)
            for (size_t i = 0; i < len; i++)
                r->mismatches += (uint8_t)at[i] != want[i];
    }
    r->body_bytes += len;
    return c->aborted; /* non-zero stops the parser */
}

static int on_message_complete(http_parser *p)
{
    struct conn *c = p->data;
    e2e_req_t *r = c->req;
    c->message_done = 1;
    r->complete = 1;
    r->t_done = since_send_us(c->run);
    if (r->t_first_body < 0)
        r->t_first_body = r->t_headers;
    http_parser_pause(p, 1); /* ignore anything after the response */
    return 0;
}

static const http_parser_settings settings = {
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

static void on_pace(uv_timer_t *t)
{
    struct conn *c = t->data;
    if (uv_read_start((uv_stream_t *)&c->tcp, alloc_buf, on_read) != 0)
        finish(c, E2E_ERESET, 0);
}

/* libuv reports POLLHUP after a short read as EOF without reading the
 * socket's error, so a reset can arrive as UV_EOF: ask the socket. */
static int socket_error(uv_stream_t *s)
{
    uv_os_fd_t fd;
    int err = 0;
    socklen_t len = sizeof(err);
    return uv_fileno((uv_handle_t *)s, &fd) == 0 &&
           getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err != 0;
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct conn *c = s->data;
    if (nread == 0 || c->done)
        return;
    if (nread == UV_EOF && socket_error(s))
        nread = UV_ECONNRESET;
    if (nread < 0 && nread != UV_EOF) {
        finish(c, E2E_ERESET, 0);
        return;
    }
    /* At EOF a zero-length execute lets the parser end a body that is
     * delimited by the close, and otherwise report it incomplete. */
    size_t len = nread < 0 ? 0 : (size_t)nread, first = len;
    uint64_t ah = c->req->abort_after_head;
    if (ah && !c->req->status && c->raw < ah && c->raw + len >= ah)
        first = (size_t)(ah - c->raw); /* the head may end before: see below */
    c->raw += len;
    http_parser_execute(&c->parser, &settings, len ? buf->base : NULL, first);
    if (first < len && !c->message_done && !c->aborted &&
        HTTP_PARSER_ERRNO(&c->parser) == HPE_OK) {
        if (!c->req->status) {
            finish(c, E2E_EABORTED, 1);
            return;
        }
        http_parser_execute(&c->parser, &settings, buf->base + first,
                            len - first);
    }
    if (c->message_done)
        finish(c, E2E_OK, 0);
    else if (c->aborted)
        finish(c, E2E_EABORTED, 1);
    else if (nread < 0)
        finish(c, E2E_EEOF, 0);
    else if (HTTP_PARSER_ERRNO(&c->parser) != HPE_OK)
        finish(c, E2E_EPARSE, 0);
    else if (c->req->read_rate && pace_allowance(c) < 1) {
        /* libuv reads whatever is there: stop until the rate allows more. */
        uv_read_stop(s);
        uv_timer_start(&c->pace, on_pace, 10, 0);
    }
}

static void on_write(uv_write_t *w, int status)
{
    struct conn *c = w->data;
    if (status < 0 && !c->done)
        finish(c, E2E_ERESET, 0);
    else if (c->req->abort_at_send && !c->done)
        finish(c, E2E_EABORTED, c->req->abort_at_send == 1);
}

/* Every connection is up (or failed): send all requests together. */
static void send_all(struct run *run)
{
    run->t0 = uv_hrtime();
    for (size_t i = 0; i < run->n; i++) {
        struct conn *c = &run->conns[i];
        uv_buf_t b = uv_buf_init(c->request, (unsigned)c->request_len);
        if (c->done)
            continue;
        c->write.data = c;
        if (uv_write(&c->write, (uv_stream_t *)&c->tcp, &b, 1, on_write) ||
            uv_read_start((uv_stream_t *)&c->tcp, alloc_buf, on_read))
            finish(c, E2E_ERESET, 0);
    }
}

static void on_connect(uv_connect_t *req, int status)
{
    struct conn *c = req->data;
    if (status < 0)
        finish(c, E2E_ECONNECT, 0);
    if (--c->run->connecting == 0)
        send_all(c->run);
}

/* Sets up request i and starts its connection. */
static void start(struct run *run, size_t i, e2e_req_t *r)
{
    struct conn *c = &run->conns[i];
    const char *method = r->method ? r->method : "GET";
    const char *extra = r->headers ? r->headers : "";
    struct sockaddr_in addr;

    r->status = 0;
    r->x_cache[0] = r->content_range[0] = r->etag[0] = '\0';
    r->content_length = -1;
    r->body_bytes = r->mismatches = r->body_bytes_at_others_done = 0;
    r->error = E2E_OK;
    r->complete = 0;
    r->t_headers = r->t_first_body = r->t_done = -1;

    c->run = run;
    c->req = r;
    c->seed = e2e_path_seed(r->path);
    c->tcp.data = c->pace.data = c->connect.data = c;
    http_parser_init(&c->parser, HTTP_RESPONSE);
    c->parser.data = c;
    uv_timer_init(&run->loop, &c->pace);
    /* _ex creates the socket now, so options can be set before connect. */
    c->tcp_open = uv_tcp_init_ex(&run->loop, &c->tcp, AF_INET) == 0;

    size_t cap = strlen(method) + strlen(r->path) + strlen(extra) + 64;
    c->request = malloc(cap);
    int len = c->request ? snprintf(c->request, cap,
                                    "%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                                    "%s\r\n",
                                    method, r->path, r->port, extra)
                         : -1;
    c->request_len = len > 0 ? (size_t)len : 0;
    if (r->read_rate && c->tcp_open) {
        /* A small receive window, so the server really sees a slow reader
         * instead of filling our kernel buffers. Set before connecting. */
        int size = 4096;
        uv_recv_buffer_size((uv_handle_t *)&c->tcp, &size);
    }
    uv_ip4_addr("127.0.0.1", r->port, &addr);
    if (len < 0 || !c->tcp_open ||
        uv_tcp_connect(&c->connect, &c->tcp, (const struct sockaddr *)&addr,
                       on_connect) != 0) {
        finish(c, E2E_ECONNECT, 0);
        if (--run->connecting == 0)
            send_all(run);
    }
}

int e2e_run(e2e_req_t *reqs, size_t n, int timeout_ms)
{
    struct run *run;
    int failed = 0;
    if (n == 0 || n > E2E_MAX_REQS || timeout_ms <= 0)
        return -1;
    if (!(run = calloc(1, sizeof(*run))) ||
        !(run->conns = calloc(n, sizeof(*run->conns))) ||
        uv_loop_init(&run->loop) != 0) {
        if (run)
            free(run->conns);
        free(run);
        return -1;
    }
    run->n = run->connecting = run->open = n;
    for (size_t i = 0; i < n; i++)
        run->others_open += !reqs[i].close_when_others_done;
    uv_timer_init(&run->loop, &run->timeout);
    run->timeout.data = run;
    uv_timer_start(&run->timeout, on_timeout, (uint64_t)timeout_ms, 0);
    for (size_t i = 0; i < n; i++)
        start(run, i, &reqs[i]);

    uv_run(&run->loop, UV_RUN_DEFAULT);
    if (uv_loop_close(&run->loop) != 0) {
        fprintf(stderr, "e2e_run: a handle is still open\n");
        failed = -1;
    }
    for (size_t i = 0; i < n; i++) {
        free(run->conns[i].request);
        if (failed >= 0 && reqs[i].error != E2E_OK)
            failed++;
    }
    free(run->conns);
    free(run);
    return failed;
}

/* --- Blocking GET --------------------------------------------------------- */

struct get_ctx {
    char *body;
    size_t len, cap;
    int done, oom;
};

static int get_on_body(http_parser *p, const char *at, size_t len)
{
    struct get_ctx *g = p->data;
    if (g->len + len + 1 > g->cap) {
        size_t cap = (g->cap ? g->cap : 4096) * 2 + len;
        char *b = cap <= (256u << 20) ? realloc(g->body, cap) : NULL;
        if (!b) {
            g->oom = 1;
            return 1;
        }
        g->body = b;
        g->cap = cap;
    }
    memcpy(g->body + g->len, at, len);
    g->len += len;
    return 0;
}

static int get_on_complete(http_parser *p)
{
    struct get_ctx *g = p->data;
    g->done = 1;
    http_parser_pause(p, 1);
    return 0;
}

int e2e_get(int port, const char *path, char **body_out, int *status_out)
{
    static const http_parser_settings get_settings = {
        .on_body = get_on_body,
        .on_message_complete = get_on_complete,
    };
    struct get_ctx g = {0};
    struct sockaddr_in addr = {.sin_family = AF_INET,
                               .sin_port = htons((uint16_t)port)};
    struct timeval tv = {10, 0};
    http_parser parser;
    char buf[16384];
    int fd, len;

    *body_out = NULL;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    len = snprintf(buf, sizeof(buf),
                   "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                   "Connection: close\r\n\r\n",
                   path, port);
    if (len < 0 || (size_t)len >= sizeof(buf) ||
        (fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0)
        return -1;
    /* The timeouts bound every blocking call below. */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0 ||
        send(fd, buf, (size_t)len, MSG_NOSIGNAL) != len) {
        close(fd);
        return -1;
    }
    http_parser_init(&parser, HTTP_RESPONSE);
    parser.data = &g;
    while (!g.done) {
        ssize_t n = recv(fd, buf, sizeof(buf), 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            break;
        http_parser_execute(&parser, &get_settings, buf, (size_t)n);
        if (g.done || n == 0 || HTTP_PARSER_ERRNO(&parser) != HPE_OK)
            break;
    }
    close(fd);
    if (!g.done || g.oom || !(g.body || (g.body = malloc(1)))) {
        free(g.body);
        return -1;
    }
    g.body[g.len] = '\0';
    *body_out = g.body;
    *status_out = parser.status_code;
    return 0;
}

/* --- JSON numbers and percentiles ----------------------------------------- */

static const char *json_ws(const char *s)
{
    while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r')
        s++;
    return s;
}

/* Past the string that starts at s ('"'), or NULL. */
static const char *json_string_end(const char *s)
{
    for (s++; *s && *s != '"'; s++)
        if (*s == '\\' && !*++s)
            return NULL;
    return *s ? s + 1 : NULL;
}

/* Past the value at s, or NULL if malformed or nested too deep. */
static const char *json_skip(const char *s, int depth)
{
    s = json_ws(s);
    if (*s == '"')
        return json_string_end(s);
    if (*s == '{' || *s == '[') {
        char close = *s == '{' ? '}' : ']';
        if (depth > 64)
            return NULL;
        s = json_ws(s + 1);
        if (*s == close)
            return s + 1;
        for (;;) {
            if (close == '}') {
                if (*s != '"' || !(s = json_string_end(s)))
                    return NULL;
                s = json_ws(s);
                if (*s++ != ':')
                    return NULL;
            }
            if (!(s = json_skip(s, depth + 1)))
                return NULL;
            s = json_ws(s);
            if (*s != ',')
                return *s == close ? s + 1 : NULL;
            s = json_ws(s + 1);
        }
    }
    const char *start = s; /* a number or a literal */
    while (*s && strchr("+-.0123456789eEtruefalsn", *s))
        s++;
    return s > start ? s : NULL;
}

/* The number at key path k inside the object at s. Every member whose name
 * is a prefix of k up to a '.' is tried, so names may contain dots. */
static int json_find(const char *s, const char *k, uint64_t *out, int depth)
{
    s = json_ws(s);
    if (*s != '{' || depth > 64)
        return -1;
    s = json_ws(s + 1);
    while (*s == '"') {
        const char *name = s + 1, *end = json_string_end(s);
        if (!end)
            return -1;
        size_t nlen = (size_t)(end - 1 - name);
        const char *v = json_ws(end);
        if (*v++ != ':')
            return -1;
        v = json_ws(v);
        if (strncmp(k, name, nlen) == 0) {
            if (k[nlen] == '\0') {
                char *num_end;
                if (*v < '0' || *v > '9')
                    return -1;
                errno = 0;
                *out = strtoull(v, &num_end, 10);
                return errno || *num_end == '.' || *num_end == 'e' ||
                               *num_end == 'E'
                           ? -1
                           : 0;
            }
            if (k[nlen] == '.' &&
                json_find(v, k + nlen + 1, out, depth + 1) == 0)
                return 0;
        }
        if (!(s = json_skip(v, depth + 1)))
            return -1;
        s = json_ws(s);
        if (*s != ',')
            return -1;
        s = json_ws(s + 1);
    }
    return -1;
}

int e2e_json_u64(const char *json, const char *dotted_key, uint64_t *out)
{
    return json && dotted_key ? json_find(json, dotted_key, out, 0) : -1;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double e2e_percentile(double *v, size_t n, double p)
{
    if (n == 0)
        return NAN;
    qsort(v, n, sizeof(*v), cmp_double);
    /* Nearest rank: the smallest value with at least p% of v at or below. */
    double want = p / 100 * (double)n;
    size_t rank = want <= 0 ? 1 : (size_t)want;
    if ((double)rank < want)
        rank++;
    return v[rank <= n ? rank - 1 : n - 1];
}

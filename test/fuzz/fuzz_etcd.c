/*
 * libFuzzer harness for the etcd store's decoding (lib/etcdstore.c): the
 * watch stream, unary replies and base64, fed arbitrary bytes. Everything
 * it decodes is checked against a model written here from the gateway's
 * format (cache-reference.md §D, etcd.h, store.h), with its own base64:
 * the store must deliver exactly what the model expects, or end with the
 * documented code.
 *
 * Input: three header bytes, then the payload.
 *   h[0] & 3   0, 1: watch stream; 2: unary reply; 3: base64
 *   watch      h[1]: & 7 == 7: a non-2xx status (error body), (h[1] >> 3)
 *              & 3 picks it; & 0x60 == 0x60: also one byte at a time.
 *              h[2]: seeds the split into write-callback pieces.
 *   unary      h[1] % 6: range, txn, put, lease grant, timetolive, error
 *              body; h[2]: the request's shape (see unary()).
 *   base64     the payload is bytes to encode and text to decode.
 *
 * The store is included whole to reach its static functions; MAX_REPLY is
 * lowered so that over-long lines are reachable with small inputs.
 */
#define MAX_REPLY 2048u
#include "etcdstore.c"

#include <stdint.h>

#define CHECK(cond, ...)                                                       \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "fuzz_etcd: %s:%d: check failed: %s: ", __FILE__,  \
                    __LINE__, #cond);                                          \
            fprintf(stderr, __VA_ARGS__);                                      \
            fprintf(stderr, "\n");                                             \
            abort();                                                           \
        }                                                                      \
    } while (0)

/* --- A byte log: what was delivered, and what the model expects -------- */

typedef struct blog {
    unsigned char *p;
    size_t len, cap;
} blog_t;

static void lg_put(blog_t *l, const void *p, size_t n)
{
    if (l->len + n > l->cap) {
        size_t cap = l->cap ? l->cap : 4096;
        while (cap < l->len + n)
            cap *= 2;
        l->p = realloc(l->p, cap);
        CHECK(l->p, "out of memory");
        l->cap = cap;
    }
    if (n)
        memcpy(l->p + l->len, p, n);
    l->len += n;
}

static void lg_u64(blog_t *l, uint64_t v)
{
    lg_put(l, &v, sizeof(v));
}

static void lg_tag(blog_t *l, char tag)
{
    lg_put(l, &tag, 1);
}

/* One kv: its bytes are read whole, so ASAN checks their bounds. */
static void lg_kv(blog_t *l,
                  int type,
                  const void *k,
                  size_t kl,
                  const void *v,
                  size_t vl,
                  const int64_t num[4])
{
    lg_u64(l, (uint64_t)type);
    lg_u64(l, kl);
    lg_put(l, k, kl);
    lg_u64(l, v != NULL);
    lg_u64(l, vl);
    lg_put(l, v, vl);
    for (int i = 0; i < 4; i++)
        lg_u64(l, (uint64_t)num[i]);
}

static bool lg_same(const blog_t *a, const blog_t *b)
{
    return a->len == b->len && (!a->len || !memcmp(a->p, b->p, a->len));
}

/* Reused between runs: no allocation per run. */
static blog_t want_log, got_log, got_log2;

/* --- The model: base64 and JSON fields, from §D.1 ----------------------- */

static const char m_alpha[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
static signed char m_val[256];

/* Standard padded base64, by a bit accumulator (the store works in
 * groups of four). */
static size_t m_enc(const unsigned char *p, size_t n, char *out)
{
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        acc = acc << 8 | p[i];
        bits += 8;
        while (bits >= 6) {
            bits -= 6;
            out[o++] = m_alpha[(acc >> bits) & 63];
        }
    }
    if (bits)
        out[o++] = m_alpha[(acc << (6 - bits)) & 63];
    while (o % 4)
        out[o++] = '=';
    return o;
}

/* -1 unless s is the canonical encoding of some bytes (out: room for
 * n / 4 * 3). */
static long m_dec(const char *s, size_t n, unsigned char *out)
{
    if (n % 4)
        return -1;
    size_t pad = 0;
    while (pad < 2 && pad < n && s[n - 1 - pad] == '=')
        pad++;
    uint32_t acc = 0;
    int bits = 0;
    size_t o = 0;
    for (size_t i = 0; i < n - pad; i++) {
        int v = m_val[(unsigned char)s[i]];
        if (v < 0)
            return -1;
        acc = acc << 6 | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (unsigned char)(acc >> bits);
        }
    }
    /* Padding must be needed, and the bits it leaves over zero. */
    if ((pad && bits != 2 * (int)pad) || (acc & ((1u << bits) - 1)))
        return -1;
    return (long)o;
}

/* An int64 field: absent or null is 0; a JSON integer, or a decimal
 * string (how the gateway prints int64). */
static int m_int(const json_t *o, const char *name, int64_t *out)
{
    json_t *v = json_object_get(o, name);
    *out = 0;
    if (!v || json_is_null(v))
        return 0;
    if (json_is_integer(v)) {
        *out = (int64_t)json_integer_value(v);
        return 0;
    }
    if (!json_is_string(v))
        return -1;
    const char *s = json_string_value(v);
    char *end;
    errno = 0;
    long long x = strtoll(s, &end, 10);
    if (errno || end == s || *end)
        return -1;
    *out = (int64_t)x;
    return 0;
}

static int m_bool(const json_t *o, const char *name, bool *out)
{
    json_t *v = json_object_get(o, name);
    *out = json_is_true(v);
    return !v || json_is_null(v) || json_is_boolean(v) ? 0 : -1;
}

/* A bytes field: absent or null is empty. *p is malloc'd (free it). */
static int m_bytes(const json_t *o, const char *name, char **p, size_t *len)
{
    json_t *v = json_object_get(o, name);
    *len = 0;
    *p = malloc(v && json_is_string(v) ? json_string_length(v) / 4 * 3 + 1 : 1);
    CHECK(*p, "out of memory");
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_string(v))
        return -1;
    size_t sl = json_string_length(v);
    long n = m_dec(json_string_value(v), sl, (unsigned char *)*p);
    if (n < 0)
        return -1;
    *len = (size_t)n;
    return 0;
}

/* A KeyValue (§D.2) into the log; -1 if it is not one. The key is always
 * there; mod_revision > 0 (a kv or event without it is useless). */
static int m_kv(const json_t *o, int type, bool with_value, blog_t *l)
{
    if (!json_is_object(o) || !json_is_string(json_object_get(o, "key")))
        return -1;
    char *k, *v;
    size_t kl, vl;
    int64_t num[4];
    int rc = m_bytes(o, "key", &k, &kl) | m_bytes(o, "value", &v, &vl);
    if (!rc &&
        (m_int(o, "create_revision", &num[0]) ||
         m_int(o, "mod_revision", &num[1]) || m_int(o, "version", &num[2]) ||
         m_int(o, "lease", &num[3]) || num[1] <= 0))
        rc = -1;
    if (!rc)
        lg_kv(l, type, k, kl, with_value ? v : NULL, with_value ? vl : 0, num);
    free(k);
    free(v);
    return rc;
}

/* etcd.h's table of gRPC codes. */
static int m_grpc(int64_t code, const char *msg)
{
    switch (code) {
    case 0:
        return 0;
    case 1:
        return COALESCE_ECANCELED;
    case 3:
        return strstr(msg, "authentication failed") ||
                       strstr(msg, "user name is empty") ||
                       strstr(msg, "invalid auth token")
                   ? COALESCE_EACCES
                   : COALESCE_EINVAL;
    case 4:
        return COALESCE_ETIMEDOUT;
    case 5:
        return COALESCE_ENOENT;
    case 7:
    case 16:
        return COALESCE_EACCES;
    case 11:
        return COALESCE_ECOMPACTED;
    case 12:
        return COALESCE_ENOTSUP;
    case 14:
        return COALESCE_EIO;
    default:
        return COALESCE_EBACKEND;
    }
}

/* --- The watch model (§D.4) --------------------------------------------- */

typedef struct wmodel {
    bool created;
    int term; /* what ended the stream, 0 while it runs */
    int64_t compact;
} wmodel_t;

static void m_event_resp(wmodel_t *m, const json_t *evs, int64_t hrev)
{
    size_t at = want_log.len;
    lg_tag(&want_log, 'E');
    lg_u64(&want_log, (uint64_t)hrev);
    lg_u64(&want_log, json_array_size(evs));
    int64_t last = 0;
    for (size_t i = 0; i < json_array_size(evs); i++) {
        json_t *e = json_array_get(evs, i), *t = json_object_get(e, "type");
        int type = CACHE_EV_PUT;
        if (t && !json_is_null(t)) { /* PUT is 0: omitted */
            const char *ts = json_string_value(t);
            if (ts && !strcmp(ts, "DELETE"))
                type = CACHE_EV_DELETE;
            else if (!ts || strcmp(ts, "PUT"))
                goto bad;
        }
        int64_t mod;
        if (m_kv(json_object_get(e, "kv"), type, type == CACHE_EV_PUT,
                 &want_log) ||
            m_int(json_object_get(e, "kv"), "mod_revision", &mod) || mod < last)
            goto bad;
        last = mod;
    }
    return;
bad:
    want_log.len = at; /* all or nothing */
    m->term = COALESCE_EDECODE;
}

/* One line, as w_line must take it. */
static void m_line(wmodel_t *m, const char *s, size_t len)
{
    while (len && (s[len - 1] == '\r' || s[len - 1] == ' '))
        len--;
    if (!len)
        return;
    json_t *j = json_loadb(s, len, 0, NULL);
    json_t *res = json_object_get(j, "result"),
           *err = json_object_get(j, "error");
    if (!res && !err) {
        m->term = COALESCE_EDECODE;
    } else if (err) {
        int64_t code;
        m_int(err, "grpc_code", &code);
        const char *msg = json_string_value(json_object_get(err, "message"));
        msg = msg ? msg : "";
        /* An expired token is resumed with a new one, as a broken stream. */
        m->term = m_grpc(code, msg);
        if (!m->term || code == 16 || strstr(msg, "invalid auth token"))
            m->term = COALESCE_EIO;
    } else {
        bool created, canceled;
        int64_t compact, hrev;
        json_t *evs = json_object_get(res, "events");
        if (!json_is_object(res) || m_bool(res, "created", &created) ||
            m_bool(res, "canceled", &canceled) ||
            m_int(res, "compact_revision", &compact) ||
            m_int(json_object_get(res, "header"), "revision", &hrev) ||
            (evs && !json_is_array(evs))) {
            m->term = COALESCE_EDECODE;
        } else if (canceled) {
            const char *why =
                json_string_value(json_object_get(res, "cancel_reason"));
            if (created && compact > 0)
                m->created = true;
            m->compact = compact;
            m->term = compact > 0 ? COALESCE_ECOMPACTED
                      : why && strstr(why, "permission denied")
                          ? COALESCE_EACCES
                          : COALESCE_EIO;
        } else if (created) {
            m->created = true;
        } else if (!m->created) {
            m->term = COALESCE_EDECODE; /* data before created */
        } else if (json_array_size(evs)) {
            m_event_resp(m, evs, hrev);
        } else {
            lg_tag(&want_log, 'P');
            lg_u64(&want_log, (uint64_t)hrev);
        }
    }
    json_decref(j);
}

/* The stream d[0, n) with a 2xx status: lines until one ends it. A line
 * longer than MAX_REPLY - 1 bytes ends it even before its newline. */
static void m_stream(wmodel_t *m, const uint8_t *d, size_t n)
{
    for (size_t at = 0; at < n && !m->term;) {
        const uint8_t *nl = memchr(d + at, '\n', n - at);
        size_t len = nl ? (size_t)(nl - (d + at)) : n - at;
        if (len + 1 > MAX_REPLY) {
            m->term = COALESCE_EDECODE;
            break;
        }
        if (!nl)
            break;
        m_line(m, (const char *)d + at, len);
        at += len + 1;
    }
    /* What ends a watch that ran (store.h: three codes). */
    if (m->created) {
        int rc = m->term == COALESCE_EDECODE ||
                         (m->term == COALESCE_ECOMPACTED && m->compact > 0)
                     ? m->term
                     : COALESCE_EIO;
        lg_tag(&want_log, 'C');
        lg_u64(&want_log, (uint64_t)rc);
        lg_u64(&want_log,
               (uint64_t)(rc == COALESCE_ECOMPACTED ? m->compact : 0));
    }
}

/* --- The watch, driven by hand ------------------------------------------ */

typedef struct wrec {
    ewatch_t *w;
    blog_t *log;
    bool ended;
} wrec_t;

static void on_watch(void *data, const cache_watch_resp_t *r)
{
    wrec_t *c = data;
    CHECK(!c->ended, "a response after the canceling one");
    if (r->error) {
        CHECK(r->error == COALESCE_EIO || r->error == COALESCE_EDECODE ||
                  r->error == COALESCE_ECOMPACTED,
              "canceled with %d", r->error);
        CHECK((r->error == COALESCE_ECOMPACTED) == (r->compact_revision > 0),
              "error %d with compact revision %lld", r->error,
              (long long)r->compact_revision);
        CHECK(!r->n, "a canceling response with events");
        c->ended = true;
        lg_tag(c->log, 'C');
        lg_u64(c->log, (uint64_t)r->error);
        lg_u64(c->log, (uint64_t)r->compact_revision);
        return;
    }
    CHECK(c->w->state == W_CREATED, "a response before created");
    CHECK(!r->compact_revision, "compact revision without error");
    if (!r->n) {
        lg_tag(c->log, 'P');
        lg_u64(c->log, (uint64_t)r->revision);
        return;
    }
    CHECK(r->events, "%zu events, no array", r->n);
    lg_tag(c->log, 'E');
    lg_u64(c->log, (uint64_t)r->revision);
    lg_u64(c->log, r->n);
    for (size_t i = 0; i < r->n; i++) {
        const cache_event_t *e = &r->events[i];
        const cache_kv_t *kv = &e->kv;
        CHECK(e->type == CACHE_EV_PUT || e->type == CACHE_EV_DELETE,
              "event type %d", e->type);
        CHECK(kv->key, "event %zu: no key", i);
        CHECK(kv->mod_rev > 0, "event %zu: mod_rev %lld", i,
              (long long)kv->mod_rev);
        CHECK(!i || kv->mod_rev >= r->events[i - 1].kv.mod_rev,
              "event %zu: out of order", i);
        if (e->type == CACHE_EV_PUT)
            CHECK(kv->value, "event %zu: a put without a value", i);
        else
            CHECK(!kv->value && !kv->vallen, "event %zu: a delete's value", i);
        int64_t num[4] = {kv->create_rev, kv->mod_rev, kv->version, kv->lease};
        lg_kv(c->log, e->type, kv->key, kv->keylen, kv->value, kv->vallen, num);
    }
}

/* etcd.h: a failure says why in cache_etcd_last_error(). */
static void check_msg(int rc)
{
    CHECK(!rc || last_err[0], "code %d without a message", rc);
    last_err[0] = 0;
}

static uint32_t rng_next(uint32_t *s)
{
    /* xorshift32: the split must be a function of the input. */
    *s ^= *s << 13;
    *s ^= *s >> 17;
    *s ^= *s << 5;
    return *s;
}

/* The next piece's length: mostly short, sometimes the rest. */
static size_t piece_len(uint32_t *rng, size_t left)
{
    uint32_t r = rng_next(rng);
    size_t n = r % 4 == 0   ? 1 + (r >> 2) % 4
               : r % 4 == 1 ? 1 + (r >> 2) % 32
               : r % 4 == 2 ? 1 + (r >> 2) % 512
                            : left;
    return n < left ? n : left;
}

enum { SPLIT_RANDOM, SPLIT_WHOLE, SPLIT_BYTES };

/* Feeds d[0, n) to a new watch's write callback as curl would, then ends
 * the stream as w_main does. For a non-2xx status, checks the error body
 * and returns. */
static void watch_pass(const uint8_t *d,
                       size_t n,
                       long status,
                       int split,
                       uint32_t seed,
                       const wmodel_t *m)
{
    ewatch_t *w = calloc(1, sizeof(*w));
    CHECK(w, "out of memory");
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    got_log.len = 0;
    wrec_t rec = {w, &got_log, false};
    w->cb = on_watch;
    w->data = &rec;
    w->state = W_CONNECTING;
    w->status = status;
    uint32_t rng = seed | 1;
    size_t kept = 0; /* bytes of an error body that fit */
    bool stopped = false;
    /* Each piece is copied to the end of this buffer: ASAN sees reads
     * past it. */
    char *buf = malloc(n ? n : 1);
    CHECK(buf, "out of memory");
    for (size_t at = 0; at < n;) {
        size_t len = split == SPLIT_WHOLE   ? n - at
                     : split == SPLIT_BYTES ? 1
                                            : piece_len(&rng, n - at);
        char *piece = buf + n - len;
        memcpy(piece, d + at, len);
        size_t took = w_write(piece, 1, len, w);
        CHECK(w->line.cap <= MAX_REPLY, "line buffer of %zu bytes",
              w->line.cap);
        if (status / 100 == 2) {
            CHECK(took == (w->term ? 0 : len), "took %zu of %zu, term %d", took,
                  len, w->term);
        } else {
            CHECK(took == (kept + len + 1 > MAX_REPLY ? 0 : len),
                  "error body: took %zu of %zu", took, len);
            kept += took;
        }
        at += len;
        if (took != len) { /* curl ends the transfer */
            stopped = true;
            break;
        }
    }
    if (status / 100 != 2) {
        /* w_main's error body: whatever fit, decoded by parse_error. */
        CHECK(!got_log.len, "a response with HTTP %ld", status);
        CHECK(w->line.len == kept && (!kept || !memcmp(w->line.p, d, kept)),
              "error body: kept %zu bytes, want %zu", w->line.len, kept);
        CHECK(!kept || !w->line.p[kept], "error body not terminated");
        json_t *j = kept ? json_loadb((const char *)d, kept, 0, NULL) : NULL;
        json_t *cj = json_object_get(j, "code");
        long code;
        int rc = parse_error(&w->line, status, &code), want = COALESCE_EBACKEND;
        check_msg(rc);
        if (json_is_integer(cj)) {
            const char *msg = j_str(j, "message");
            want =
                m_grpc(json_integer_value(cj), *msg ? msg : j_str(j, "error"));
            want = want ? want : COALESCE_EBACKEND;
            CHECK(code == (long)json_integer_value(cj), "code %ld", code);
        } else {
            CHECK(code == -1, "code %ld from a body without one", code);
        }
        CHECK(rc == want, "error body: %d, want %d", rc, want);
        json_decref(j);
    } else {
        CHECK(w->term == m->term, "the stream ended with %d, want %d", w->term,
              m->term);
        CHECK(stopped == (m->term != 0), "stopped %d, term %d", stopped,
              m->term);
        CHECK((w->state == W_CREATED) == m->created, "created %d, want %d",
              w->state == W_CREATED, m->created);
        check_msg(w->term);
        if (w->term) { /* curl would not call again; nothing more anyway */
            char c = '\n';
            CHECK(!w_write(&c, 1, 1, w), "a write after the end");
        }
        if (w->state == W_CREATED)
            w_end(w);
        if (!lg_same(&got_log, &want_log)) {
            size_t i = 0;
            while (i < got_log.len && i < want_log.len &&
                   got_log.p[i] == want_log.p[i])
                i++;
            CHECK(0,
                  "split %d: delivered %zu log bytes, model %zu; differ at %zu",
                  split, got_log.len, want_log.len, i);
        }
    }
    free(buf);
    free(w->line.p);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
    free(w);
}

static void watch(const uint8_t *h, const uint8_t *d, size_t n)
{
    static const long bad[] = {400, 404, 500, 503};
    long status = (h[1] & 7) == 7 ? bad[(h[1] >> 3) & 3] : 200;
    wmodel_t m = {0};
    want_log.len = 0;
    if (status == 200)
        m_stream(&m, d, n);
    uint32_t seed = (uint32_t)h[2] << 16 ^ (uint32_t)n ^ 0x9e3779b9u;
    watch_pass(d, n, status, SPLIT_RANDOM, seed, &m);
    watch_pass(d, n, status, SPLIT_WHOLE, 0, &m);
    /* The most pieces: a quarter of the (short) inputs, for speed. */
    if ((h[1] & 0x60) == 0x60 && n <= 1024)
        watch_pass(d, n, status, SPLIT_BYTES, 0, &m);
}

/* --- Unary replies (§D.2, §D.3) ----------------------------------------- */

typedef struct rrec {
    blog_t *log;
    size_t calls, stop; /* the callback returns 1 at call stop + 1 */
} rrec_t;

static int on_kv(void *data, const cache_kv_t *kv)
{
    rrec_t *c = data;
    CHECK(kv->key && kv->value, "a range kv without key or value");
    int64_t num[4] = {kv->create_rev, kv->mod_rev, kv->version, kv->lease};
    lg_kv(c->log, 0, kv->key, kv->keylen, kv->value, kv->vallen, num);
    return ++c->calls == c->stop;
}

/* range: h[2] & 8 a read at revision 5; & 4 no hrev/more; >> 4 the
 * callback that stops (0: none). */
static void unary_range(const json_t *resp, uint8_t p)
{
    int64_t rev = p & 8 ? 5 : 0;
    bool outs = !(p & 4);
    size_t stop = p >> 4;
    /* The model. */
    want_log.len = 0;
    int64_t hr = 0;
    bool more;
    json_t *kvs = json_object_get(resp, "kvs");
    int want = COALESCE_EDECODE;
    size_t nk = json_array_size(kvs);
    if (json_is_object(json_object_get(resp, "header")) &&
        !m_int(json_object_get(resp, "header"), "revision", &hr) && hr > 0 &&
        !m_bool(resp, "more", &more) && (!kvs || json_is_array(kvs))) {
        want = 0;
        for (size_t i = 0; !want && i < nk; i++)
            if (m_kv(json_array_get(kvs, i), 0, true, &want_log))
                want = COALESCE_EDECODE;
    }
    /* Twice: decoding is a function of the reply. */
    for (int pass = 0; pass < 2; pass++) {
        blog_t *lg = pass ? &got_log2 : &got_log;
        lg->len = 0;
        rrec_t rec = {lg, 0, stop};
        int64_t h = -7;
        int mo = -7;
        int rc = range_decode(resp, rev, on_kv, &rec, outs ? &h : NULL,
                              outs ? &mo : NULL);
        CHECK(rc == want, "range: %d, want %d (%s)", rc, want, last_err);
        check_msg(rc);
        if (rc) {
            CHECK(!rec.calls, "range: %zu callbacks, then %d", rec.calls, rc);
            CHECK(h == -7 && mo == -7, "range: outputs set on error");
            continue;
        }
        CHECK(rec.calls == (stop && stop < nk ? stop : nk),
              "range: %zu callbacks of %zu, stop %zu", rec.calls, nk, stop);
        if (outs)
            CHECK(h == (rev ? rev : hr) && mo == more,
                  "range: revision %lld more %d", (long long)h, mo);
        /* What was delivered is the model's first calls kvs. */
        CHECK(lg->len <= want_log.len &&
                  (!lg->len || !memcmp(lg->p, want_log.p, lg->len)) &&
                  (rec.calls < nk || lg->len == want_log.len),
              "range: the kvs differ from the model");
    }
    CHECK(lg_same(&got_log, &got_log2), "range: two decodes differ");
}

/* prev_kv of a put (§D.6): absent if omitted. */
static int m_prev(const json_t *pk, cache_op_result_t *res)
{
    memset(res, 0, sizeof(*res));
    if (!pk || json_is_null(pk))
        return 0;
    res->has_prev = 1;
    return !json_is_object(pk) ||
                   m_int(pk, "create_revision", &res->prev_create_rev) ||
                   m_int(pk, "version", &res->prev_version)
               ? -1
               : 0;
}

static int m_header(const json_t *resp, int64_t *hr)
{
    json_t *h = json_object_get(resp, "header");
    return json_is_object(h) && !m_int(h, "revision", hr) && *hr > 0 ? 0 : -1;
}

/* txn and put: h[2] & 3 ops (txn), bits 2-4 which are deletes, & 0x20
 * no results wanted. */
static void unary_write(const json_t *resp, uint8_t p, bool txn)
{
    size_t nops = txn ? p & 3 : 1;
    cache_op_t ops[3];
    memset(ops, 0, sizeof(ops));
    for (size_t i = 0; i < nops; i++)
        ops[i].type = txn && p >> (2 + i) & 1 ? CACHE_OP_DELETE : CACHE_OP_PUT;
    bool want_res = !(p & 0x20);
    cache_op_result_t *res = want_res ? malloc(nops * sizeof(*res) + 1) : NULL,
                      mres[3];
    CHECK(!want_res || res, "out of memory");
    /* The model. */
    int64_t hr = 0;
    bool ok = !txn;
    int want = m_header(resp, &hr) ? COALESCE_EDECODE : 0;
    json_t *rs = json_object_get(resp, "responses");
    if (!want && txn &&
        (m_bool(resp, "succeeded", &ok) || (rs && !json_is_array(rs)) ||
         (ok && json_array_size(rs) != nops)))
        want = COALESCE_EDECODE;
    for (size_t i = 0; !want && ok && want_res && i < nops; i++) {
        json_t *r = txn ? json_array_get(rs, i) : NULL;
        if (!txn)
            want = m_prev(json_object_get(resp, "prev_kv"), &mres[i]);
        else if (ops[i].type == CACHE_OP_PUT)
            want = m_prev(
                json_object_get(json_object_get(r, "response_put"), "prev_kv"),
                &mres[i]);
        else
            want = (memset(&mres[i], 0, sizeof(mres[i])),
                    m_int(json_object_get(r, "response_delete_range"),
                          "deleted", &mres[i].deleted));
        want = want ? COALESCE_EDECODE : 0;
    }
    int succeeded = -7;
    int64_t rev = -7;
    int rc = txn ? txn_decode(resp, ops, nops, &succeeded, &rev, res)
                 : put_decode(resp, &succeeded, &rev, res);
    CHECK(rc == want, "%s: %d, want %d (%s)", txn ? "txn" : "put", rc, want,
          last_err);
    check_msg(rc);
    if (!rc) {
        CHECK(succeeded == ok && rev == hr, "%s: succeeded %d rev %lld",
              txn ? "txn" : "put", succeeded, (long long)rev);
        for (size_t i = 0; ok && want_res && i < nops; i++)
            CHECK(!memcmp(&res[i], &mres[i], sizeof(res[i])),
                  "result %zu differs from the model", i);
    } else {
        CHECK(succeeded == -7 && rev == -7, "outputs set on error");
    }
    free(res);
}

static void unary(const uint8_t *h, const uint8_t *d, size_t n)
{
    static const long bad[] = {400, 404, 412, 500, 503, 504};
    int kind = h[1] % 6;
    long status = kind == 5 ? bad[h[2] % 6] : 200;
    /* The body, through curl's write callback for unary replies. */
    rbuf_t r = {0};
    uint32_t rng = ((uint32_t)h[2] << 8 ^ (uint32_t)n) | 1;
    for (size_t at = 0; at < n;) {
        size_t len = piece_len(&rng, n - at);
        size_t took = rbuf_write((char *)d + at, 1, len, &r);
        if (took != len)
            break;
        at += len;
    }
    CHECK(r.too_big == (n + 1 > MAX_REPLY), "reply of %zu: too big %d", n,
          r.too_big);
    if (r.too_big) { /* call() refuses it */
        free(r.p);
        return;
    }
    CHECK(r.len == n && (!n || (!memcmp(r.p, d, n) && !r.p[n])),
          "reply body differs");
    if (status != 200) {
        json_t *j = n ? json_loadb((const char *)d, n, 0, NULL) : NULL;
        json_t *cj = json_object_get(j, "code");
        long code;
        int rc = parse_error(&r, status, &code), want = COALESCE_EBACKEND;
        check_msg(rc);
        if (json_is_integer(cj)) {
            const char *msg = j_str(j, "message");
            want =
                m_grpc(json_integer_value(cj), *msg ? msg : j_str(j, "error"));
            want = want ? want : COALESCE_EBACKEND;
            CHECK(code == (long)json_integer_value(cj), "code %ld", code);
        } else {
            CHECK(code == -1, "code %ld from a body without one", code);
        }
        CHECK(rc == want, "error body: %d, want %d", rc, want);
        json_decref(j);
        free(r.p);
        return;
    }
    json_t *resp;
    int rc = reply_object(&r, "/fuzz", &resp);
    check_msg(rc);
    json_t *j = n ? json_loadb((const char *)d, n, 0, NULL) : NULL;
    CHECK(rc == (json_is_object(j) ? 0 : COALESCE_EDECODE) &&
              (!rc) == (resp != NULL),
          "reply: %d", rc);
    json_decref(j);
    free(r.p);
    if (rc)
        return;
    int64_t id = -7, ttl = -7, v;
    switch (kind) {
    case 0:
        unary_range(resp, h[2]);
        break;
    case 1:
    case 2:
        unary_write(resp, h[2], kind == 1);
        break;
    case 3: {
        const char *e = json_string_value(json_object_get(resp, "error"));
        int want = e && *e                           ? COALESCE_EBACKEND
                   : m_int(resp, "ID", &v) || v == 0 ? COALESCE_EDECODE
                                                     : 0;
        rc = lease_grant_decode(resp, &id);
        check_msg(rc);
        CHECK(rc == want && (rc || id == v), "lease grant: %d, want %d", rc,
              want);
        break;
    }
    case 4: {
        int want = m_int(resp, "TTL", &v) ? COALESCE_EDECODE
                   : v <= 0               ? COALESCE_ENOENT
                   : v > INT64_MAX / 1000 ? COALESCE_EDECODE
                                          : 0;
        rc = lease_ttl_decode(resp, 9, h[2] & 1 ? NULL : &ttl);
        check_msg(rc);
        CHECK(rc == want, "timetolive: %d, want %d", rc, want);
        CHECK(rc || (h[2] & 1) ? ttl == -7 : ttl == v * 1000,
              "timetolive: %lld ms", (long long)ttl);
        break;
    }
    }
    json_decref(resp);
}

/* --- Base64 (§D.1: standard alphabet, padded) --------------------------- */

static void base64(const uint8_t *d, size_t n)
{
    /* Bytes: encode, compare with the model, decode back. */
    char *enc = b64_enc(d, n);
    CHECK(enc, "b64_enc failed");
    size_t el = strlen(enc);
    char *menc = malloc(el + 4);
    CHECK(menc, "out of memory");
    CHECK(el == (n + 2) / 3 * 4 && m_enc(d, n, menc) == el &&
              !memcmp(enc, menc, el),
          "b64_enc of %zu bytes differs from the model", n);
    unsigned char *dec = malloc(el / 4 * 3 + 1);
    CHECK(dec, "out of memory");
    long dl = b64_dec(enc, el, dec);
    CHECK(dl == (long)n && (!n || !memcmp(dec, d, n)),
          "round trip of %zu bytes: %ld", n, dl);
    free(dec);
    free(enc);
    free(menc);
    /* Text: accepted exactly when canonical, and then it encodes back. */
    unsigned char *out = malloc(n / 4 * 3 + 1), *mout = malloc(n / 4 * 3 + 1);
    CHECK(out && mout, "out of memory");
    long got = b64_dec((const char *)d, n, out);
    long want = m_dec((const char *)d, n, mout);
    CHECK(got == want && (got <= 0 || !memcmp(out, mout, (size_t)got)),
          "b64_dec: %ld, model %ld", got, want);
    if (got >= 0) {
        enc = b64_enc(out, (size_t)got);
        CHECK(enc && strlen(enc) == n && !memcmp(enc, d, n),
              "decoded text does not encode back");
        free(enc);
    }
    free(out);
    free(mout);
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    memset(m_val, -1, sizeof(m_val));
    for (int i = 0; i < 64; i++)
        m_val[(unsigned char)m_alpha[i]] = (signed char)i;
    json_object_seed(1); /* deterministic runs */
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 3)
        return 0;
    last_err[0] = 0;
    const uint8_t *h = data, *d = data + 3;
    size_t n = size - 3;
    switch (h[0] & 3) {
    case 0:
    case 1:
        watch(h, d, n);
        break;
    case 2:
        unary(h, d, n);
        break;
    default:
        base64(d, n);
        break;
    }
    return 0;
}

/*
 * The etcd store (libcoalesce-etcd): store.h's ops over etcd v3's JSON
 * gateway, with libcurl and jansson. See etcd.h for the contract and
 * cache-reference.md §D for the wire format (int64 as strings, standard
 * base64 bytes, zero values omitted, gRPC codes in error bodies).
 *
 * Unary calls take a curl easy handle from a small pool, so connections
 * are reused; each watch owns a thread, a multi handle and its connection,
 * and is stopped by curl_multi_wakeup(), not by a timeout. Nothing here
 * calls into libcoalesce: this library only shares its headers.
 */
#ifndef _POSIX_C_SOURCE
#    define _POSIX_C_SOURCE 200809L
#endif

#include <coalesce/etcd.h>

#include <curl/curl.h>
#include <jansson.h>

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_ENDPOINTS 16
/* A reply or watch line larger is refused. The fuzz harness lowers it. */
#ifndef MAX_REPLY
#    define MAX_REPLY (256u << 20)
#endif

/* --- Errors ------------------------------------------------------------- */

static _Thread_local char last_err[512];

COALESCE_ETCD_API const char *cache_etcd_last_error(void)
{
    return last_err;
}

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
static int
fail(int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_err, sizeof(last_err), fmt, ap);
    va_end(ap);
    return rc;
}

/* etcd's gRPC codes; the message tells authentication failures apart. */
static int map_grpc(long code, const char *msg)
{
    switch (code) {
    case 0:
        return 0;
    case 1:
        return COALESCE_ECANCELED;
    case 3:
        if (strstr(msg, "authentication failed") ||
            strstr(msg, "user name is empty") ||
            strstr(msg, "invalid auth token"))
            return COALESCE_EACCES;
        return fail(COALESCE_EINVAL, "etcd: bad argument");
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

static bool auth_expired(long code, const char *msg)
{
    return code == 16 || strstr(msg, "invalid auth token") != NULL;
}

/* Transport failures. Certificate problems are credentials too: a server
 * that rejects the client's certificate sends a TLS alert, which libcurl
 * reports as a receive error (its text is in last_err by then). */
static int map_curl(CURLcode c)
{
    if ((c == CURLE_RECV_ERROR || c == CURLE_SEND_ERROR) &&
        (strstr(last_err, "alert bad certificate") ||
         strstr(last_err, "alert certificate required") ||
         strstr(last_err, "alert unknown ca")))
        return COALESCE_EACCES;
    switch (c) {
    case CURLE_OPERATION_TIMEDOUT:
        return COALESCE_ETIMEDOUT;
    case CURLE_OUT_OF_MEMORY:
        return COALESCE_ENOMEM;
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_CIPHER:
        return COALESCE_EACCES;
    default:
        return COALESCE_EIO;
    }
}

/* --- Base64 (standard alphabet, padded: what the gateway speaks) -------- */

static const char b64a[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static char *b64_enc(const void *data, size_t len)
{
    const unsigned char *p = data;
    if (len > (SIZE_MAX - 1) / 4 * 3 - 3)
        return NULL;
    char *out = malloc((len + 2) / 3 * 4 + 1), *o = out;
    if (!out)
        return NULL;
    size_t i = 0;
    for (; i + 3 <= len; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16 | (uint32_t)p[i + 1] << 8 | p[i + 2];
        *o++ = b64a[v >> 18];
        *o++ = b64a[(v >> 12) & 63];
        *o++ = b64a[(v >> 6) & 63];
        *o++ = b64a[v & 63];
    }
    if (i < len) {
        uint32_t v = (uint32_t)p[i] << 16;
        if (i + 1 < len)
            v |= (uint32_t)p[i + 1] << 8;
        *o++ = b64a[v >> 18];
        *o++ = b64a[(v >> 12) & 63];
        *o++ = i + 1 < len ? b64a[(v >> 6) & 63] : '=';
        *o++ = '=';
    }
    *o = 0;
    return out;
}

static int b64_val(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

/* Decodes s into out (room for len / 4 * 3 bytes); -1 if not canonical. */
static long b64_dec(const char *s, size_t len, unsigned char *out)
{
    if (len % 4)
        return -1;
    size_t n = 0;
    for (size_t i = 0; i < len; i += 4) {
        int v[4];
        int pad = 0;
        for (int j = 0; j < 4; j++) {
            unsigned char c = (unsigned char)s[i + j];
            if (c == '=' && i + 4 == len && j >= 2) {
                v[j] = 0;
                pad++;
            } else if (pad || (v[j] = b64_val(c)) < 0) {
                return -1;
            }
        }
        /* Canonical: the bits padding leaves unused must be 0. */
        if ((pad == 2 && (v[1] & 15)) || (pad == 1 && (v[2] & 3)))
            return -1;
        uint32_t x = (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12 |
                     (uint32_t)v[2] << 6 | (uint32_t)v[3];
        out[n++] = (unsigned char)(x >> 16);
        if (pad < 2)
            out[n++] = (unsigned char)(x >> 8);
        if (pad < 1)
            out[n++] = (unsigned char)x;
    }
    return (long)n;
}

/* --- JSON helpers ------------------------------------------------------- */

/* A field the gateway may omit (zero), send as a string or as a number. */
static int j_int(const json_t *o, const char *name, int64_t *out)
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

static int j_bool(const json_t *o, const char *name, bool *out)
{
    json_t *v = json_object_get(o, name);
    *out = false;
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_boolean(v))
        return -1;
    *out = json_is_true(v);
    return 0;
}

static const char *j_str(const json_t *o, const char *name)
{
    const char *s = json_string_value(json_object_get(o, name));
    return s ? s : "";
}

static int j_set_b64(json_t *o, const char *name, const void *p, size_t n)
{
    char *s = b64_enc(p ? p : "", n);
    if (!s)
        return -1;
    int rc = json_object_set_new(o, name, json_string(s));
    free(s);
    return rc;
}

/* int64 as a string, as the gateway prints them. */
static int j_set_int(json_t *o, const char *name, int64_t v)
{
    char b[24];
    snprintf(b, sizeof(b), "%lld", (long long)v);
    return json_object_set_new(o, name, json_string(b));
}

/* Decoded bytes of a base64 field (absent: empty), into an arena. */
typedef struct arena {
    unsigned char *p;
    size_t used, cap;
} arena_t;

static int
j_bytes(const json_t *o, const char *name, arena_t *a, size_t *off, size_t *len)
{
    json_t *v = json_object_get(o, name);
    *off = a->used;
    *len = 0;
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_string(v))
        return -1;
    size_t sl = json_string_length(v);
    size_t need = sl / 4 * 3 + 1;
    if (a->used + need > a->cap) {
        size_t cap = a->cap ? a->cap : 256;
        while (cap < a->used + need)
            cap *= 2;
        unsigned char *p = realloc(a->p, cap);
        if (!p)
            return -2;
        a->p = p;
        a->cap = cap;
    }
    long n = b64_dec(json_string_value(v), sl, a->p + a->used);
    if (n < 0)
        return -1;
    *len = (size_t)n;
    a->used += (size_t)n + 1; /* + 1: never a zero-size slot */
    return 0;
}

/* A key/value decoded from JSON; bytes are offsets into an arena until
 * the arena stops moving. */
typedef struct jkv {
    size_t koff, klen, voff, vlen;
    bool has_value;
    cache_kv_t kv;
} jkv_t;

static int decode_kv(const json_t *o, arena_t *a, jkv_t *out)
{
    memset(out, 0, sizeof(*out));
    if (!json_is_object(o))
        return fail(COALESCE_EDECODE, "etcd: a kv is not an object");
    int rc = j_bytes(o, "key", a, &out->koff, &out->klen);
    if (!rc)
        rc = j_bytes(o, "value", a, &out->voff, &out->vlen);
    if (rc == -2)
        return fail(COALESCE_ENOMEM, "etcd: out of memory");
    /* A key is always sent (and fills the arena: a->p is never NULL). */
    if (rc || !json_is_string(json_object_get(o, "key")))
        return fail(COALESCE_EDECODE, "etcd: bad key or value (base64)");
    if (j_int(o, "create_revision", &out->kv.create_rev) ||
        j_int(o, "mod_revision", &out->kv.mod_rev) ||
        j_int(o, "version", &out->kv.version) ||
        j_int(o, "lease", &out->kv.lease))
        return fail(COALESCE_EDECODE, "etcd: bad number in a kv");
    if (out->kv.mod_rev <= 0)
        return fail(COALESCE_EDECODE, "etcd: kv without mod_revision");
    return 0;
}

static void kv_fix(jkv_t *k, const arena_t *a, bool with_value)
{
    k->kv.key = a->p + k->koff;
    k->kv.keylen = k->klen;
    k->kv.value = with_value ? a->p + k->voff : NULL;
    k->kv.vallen = with_value ? k->vlen : 0;
}

/* --- The store ---------------------------------------------------------- */

typedef struct ewatch ewatch_t;

typedef struct conn {
    CURL *h;
    char err[CURL_ERROR_SIZE];
} conn_t;

typedef struct etcd {
    cache_store_t base; /* first */
    char *eps[MAX_ENDPOINTS];
    size_t neps;
    atomic_size_t cur; /* the endpoint that last worked */
    char *user, *pass, *ca, *cert, *key;
    long connect_ms, request_ms;
    int idle_ms;
    unsigned max_idle;
    pthread_mutex_t mu; /* pool, token, watches */
    conn_t **idle;
    unsigned nidle;
    char *token;
    pthread_mutex_t auth_mu; /* one authentication at a time */
    ewatch_t *watches;
} etcd_t;

static const cache_store_ops_t etcd_ops;

static etcd_t *as_etcd(cache_store_t *s)
{
    return s && s->ops == &etcd_ops ? (etcd_t *)s : NULL;
}

typedef struct rbuf {
    char *p;
    size_t len, cap;
    bool too_big; /* over MAX_REPLY: refused */
} rbuf_t;

static size_t rbuf_write(char *ptr, size_t size, size_t nmemb, void *ud)
{
    rbuf_t *b = ud;
    size_t n = size * nmemb;
    if (b->len + n + 1 > MAX_REPLY) {
        b->too_big = true;
        return 0;
    }
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 1024;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p)
            return 0;
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, ptr, n);
    b->len += n;
    b->p[b->len] = 0;
    return n;
}

static void set_common(etcd_t *e, CURL *h, char *errbuf)
{
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, e->connect_ms);
    curl_easy_setopt(h, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
    curl_easy_setopt(h, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(h, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(h, CURLOPT_TCP_KEEPIDLE, 10L);
    curl_easy_setopt(h, CURLOPT_TCP_KEEPINTVL, 5L);
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
    if (e->ca)
        curl_easy_setopt(h, CURLOPT_CAINFO, e->ca);
    if (e->cert)
        curl_easy_setopt(h, CURLOPT_SSLCERT, e->cert);
    if (e->key)
        curl_easy_setopt(h, CURLOPT_SSLKEY, e->key);
}

/* libcurl resends a request whose reused connection died before the reply
 * came. A write may already have been applied: its second attempt is
 * aborted instead (COALESCE_EIO, outcome unknown). The pre-request
 * callback runs once per attempt, just before the request is sent. */
typedef struct attempts {
    int n;
    bool resend_ok;
} attempts_t;

static int on_prereq(void *ud, char *ip, char *lip, int port, int lport)
{
    attempts_t *a = ud;
    (void)ip;
    (void)lip;
    (void)port;
    (void)lport;
    return a->n++ && !a->resend_ok ? CURL_PREREQFUNC_ABORT : CURL_PREREQFUNC_OK;
}

/* With TLS 1.3 a server checks the client's certificate after the
 * handshake and may reset the connection before its alert is read: say
 * what is likely. */
static const char *cert_hint(const etcd_t *e, size_t ep, CURLcode cc)
{
    bool reset = cc == CURLE_RECV_ERROR || cc == CURLE_SEND_ERROR ||
                 cc == CURLE_COULDNT_CONNECT || cc == CURLE_GOT_NOTHING ||
                 cc == CURLE_ABORTED_BY_CALLBACK; /* a write not resent */
    if (reset && !strncmp(e->eps[ep], "https://", 8))
        return e->cert ? " (did the server reject the client certificate?)"
                       : " (does the server require a client certificate?)";
    return "";
}

static conn_t *conn_get(etcd_t *e)
{
    pthread_mutex_lock(&e->mu);
    conn_t *c = e->nidle ? e->idle[--e->nidle] : NULL;
    pthread_mutex_unlock(&e->mu);
    if (c)
        return c;
    c = calloc(1, sizeof(*c));
    if (!c || !(c->h = curl_easy_init())) {
        free(c);
        return NULL;
    }
    set_common(e, c->h, c->err);
    curl_easy_setopt(c->h, CURLOPT_TIMEOUT_MS, e->request_ms);
    curl_easy_setopt(c->h, CURLOPT_WRITEFUNCTION, rbuf_write);
    curl_easy_setopt(c->h, CURLOPT_POST, 1L);
    curl_easy_setopt(c->h, CURLOPT_PREREQFUNCTION, on_prereq);
    return c;
}

static void conn_free(conn_t *c)
{
    if (c) {
        curl_easy_cleanup(c->h);
        free(c);
    }
}

static void conn_put(etcd_t *e, conn_t *c)
{
    pthread_mutex_lock(&e->mu);
    if (e->nidle < e->max_idle) {
        e->idle[e->nidle++] = c;
        c = NULL;
    }
    pthread_mutex_unlock(&e->mu);
    conn_free(c);
}

/* Request flags. */
enum {
    R_IDEMPOTENT = 1, /* any failure may be retried on the next endpoint */
    R_NO_AUTH = 2,    /* the authentication request itself */
    R_RAW = 4         /* the reply body is not needed (keepalive stream) */
};

static int post_once(etcd_t *e,
                     size_t ep,
                     const char *path,
                     const char *body,
                     bool resend_ok,
                     const char *token,
                     rbuf_t *reply,
                     long *status,
                     CURLcode *cc,
                     bool *sent)
{
    conn_t *c = conn_get(e);
    if (!c)
        return fail(COALESCE_ENOMEM, "etcd: out of memory");
    char url[1024];
    snprintf(url, sizeof(url), "%s%s", e->eps[ep], path);
    struct curl_slist *hd = NULL, *t;
    char auth[4200];
    bool ok = (hd = curl_slist_append(NULL, "Content-Type: application/json"));
    if (ok && (t = curl_slist_append(hd, "Expect:")))
        hd = t;
    else
        ok = false;
    if (ok && token) {
        snprintf(auth, sizeof(auth), "Authorization: %s", token);
        if ((t = curl_slist_append(hd, auth)))
            hd = t;
        else
            ok = false;
    }
    if (!ok) {
        curl_slist_free_all(hd);
        conn_put(e, c);
        return fail(COALESCE_ENOMEM, "etcd: out of memory");
    }
    reply->len = 0;
    reply->too_big = false;
    c->err[0] = 0;
    curl_easy_setopt(c->h, CURLOPT_URL, url);
    curl_easy_setopt(c->h, CURLOPT_HTTPHEADER, hd);
    attempts_t att = {0, resend_ok};
    curl_easy_setopt(c->h, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(c->h, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
    curl_easy_setopt(c->h, CURLOPT_PREREQDATA, &att);
    curl_easy_setopt(c->h, CURLOPT_WRITEDATA, reply);
    *cc = curl_easy_perform(c->h);
    *status = 0;
    curl_easy_getinfo(c->h, CURLINFO_RESPONSE_CODE, status);
    /* Nothing sent (refused, unreachable, connect timeout, TLS handshake):
     * safe to try the next endpoint, even for a write. */
    long reqsize = 0;
    curl_easy_getinfo(c->h, CURLINFO_REQUEST_SIZE, &reqsize);
    *sent = reqsize > 0 || att.n > 1;
    if (*cc == CURLE_ABORTED_BY_CALLBACK && att.n > 1)
        fail(COALESCE_EIO,
             "etcd %s: the connection broke after a write was sent (%s); "
             "not resent, outcome unknown%s",
             e->eps[ep], c->err[0] ? c->err : "no reply",
             cert_hint(e, ep, *cc));
    else if (*cc != CURLE_OK)
        fail(map_curl(*cc), "etcd %s: %s%s", e->eps[ep],
             c->err[0] ? c->err : curl_easy_strerror(*cc),
             cert_hint(e, ep, *cc));
    curl_easy_setopt(c->h, CURLOPT_HTTPHEADER, NULL);
    curl_slist_free_all(hd);
    conn_put(e, c);
    return 0;
}

/* An error body {"error","message","code"}; sets *code (-1: not one). */
static int parse_error(const rbuf_t *r, long status, long *code)
{
    *code = -1;
    json_t *j = r->len ? json_loadb(r->p, r->len, 0, NULL) : NULL;
    json_t *cj = json_object_get(j, "code");
    if (!json_is_integer(cj)) {
        json_decref(j);
        return fail(COALESCE_EBACKEND, "etcd: HTTP %ld: %.200s", status,
                    r->len ? r->p : "");
    }
    *code = (long)json_integer_value(cj);
    const char *msg = j_str(j, "message");
    if (!*msg)
        msg = j_str(j, "error");
    int rc = map_grpc(*code, msg);
    if (!rc)
        rc = COALESCE_EBACKEND;
    fail(rc, "etcd: %s (code %ld)", msg, *code);
    json_decref(j);
    return rc;
}

static int call(etcd_t *e, const char *path, json_t *req, json_t **out, int fl);

/* A 2xx reply body: one JSON object. */
static int reply_object(const rbuf_t *r, const char *path, json_t **out)
{
    json_error_t je;
    *out = json_loadb(r->p ? r->p : "", r->len, 0, &je);
    if (json_is_object(*out))
        return 0;
    json_decref(*out);
    *out = NULL;
    return fail(COALESCE_EDECODE, "etcd %s: bad reply: %s", path, je.text);
}

/* The current token (copied into buf), authenticating if there is none. */
static int get_token(etcd_t *e, char *buf, size_t len)
{
    /* Fast path: a token is there; nobody waits for an authentication. */
    pthread_mutex_lock(&e->mu);
    bool ready = e->token && strlen(e->token) < len;
    if (ready)
        snprintf(buf, len, "%s", e->token);
    pthread_mutex_unlock(&e->mu);
    if (ready)
        return 0;
    pthread_mutex_lock(&e->auth_mu);
    pthread_mutex_lock(&e->mu);
    bool have = e->token != NULL;
    if (have)
        snprintf(buf, len, "%s", e->token);
    pthread_mutex_unlock(&e->mu);
    int rc = 0;
    if (!have) {
        json_t *req = json_object(), *resp = NULL;
        if (!req || json_object_set_new(req, "name", json_string(e->user)) ||
            json_object_set_new(req, "password",
                                json_string(e->pass ? e->pass : ""))) {
            json_decref(req);
            rc = fail(COALESCE_ENOMEM, "etcd: out of memory");
        } else {
            rc = call(e, "/v3/auth/authenticate", req, &resp,
                      R_IDEMPOTENT | R_NO_AUTH);
        }
        const char *tok =
            rc ? NULL : json_string_value(json_object_get(resp, "token"));
        if (!rc && (!tok || !*tok || strlen(tok) >= len))
            rc = fail(COALESCE_EDECODE, "etcd: authenticate: no token");
        if (!rc) {
            char *copy = strdup(tok);
            if (!copy) {
                rc = fail(COALESCE_ENOMEM, "etcd: out of memory");
            } else {
                pthread_mutex_lock(&e->mu);
                free(e->token);
                e->token = copy;
                pthread_mutex_unlock(&e->mu);
                snprintf(buf, len, "%s", tok);
            }
        }
        json_decref(resp);
    }
    pthread_mutex_unlock(&e->auth_mu);
    return rc;
}

/* Forgets a token etcd refused, unless someone already replaced it. */
static void drop_token(etcd_t *e, const char *used)
{
    pthread_mutex_lock(&e->mu);
    if (e->token && strcmp(e->token, used) == 0) {
        free(e->token);
        e->token = NULL;
    }
    pthread_mutex_unlock(&e->mu);
}

/*
 * One unary request: req (consumed) to each endpoint in turn, from the one
 * that last worked, while the failure allows it (see R_*); a token etcd
 * says expired is renewed once. *out gets the reply object (NULL for
 * R_RAW).
 */
static int call(etcd_t *e, const char *path, json_t *req, json_t **out, int fl)
{
    *out = NULL;
    char *body = req ? json_dumps(req, JSON_COMPACT) : NULL;
    json_decref(req);
    if (!body)
        return fail(COALESCE_ENOMEM, "etcd: out of memory");
    bool auth = e->user && !(fl & R_NO_AUTH);
    bool renewed = false;
    char token[4096];
    rbuf_t r = {0};
    int rc = COALESCE_EIO;
    size_t first = atomic_load(&e->cur);
    for (size_t i = 0; i < e->neps; i++) {
        size_t ep = (first + i) % e->neps;
        /* get_token tried every endpoint already. */
        if (auth && (rc = get_token(e, token, sizeof(token))) != 0)
            break;
        long status = 0;
        CURLcode cc = CURLE_OK;
        bool sent = false;
        if ((rc = post_once(e, ep, path, body, fl & R_IDEMPOTENT,
                            auth ? token : NULL, &r, &status, &cc, &sent)) != 0)
            break;
        if (cc == CURLE_WRITE_ERROR && r.too_big) {
            /* Another member would send the same: no retry. */
            rc = fail(COALESCE_EBACKEND, "etcd %s: reply over %u MiB", path,
                      MAX_REPLY >> 20);
            break;
        }
        if (cc != CURLE_OK) {
            rc = map_curl(cc);
            /* Unreachable (refused, connect timeout): nothing happened. */
            if (!sent && rc == COALESCE_ETIMEDOUT)
                rc = COALESCE_EIO;
            if (rc == COALESCE_EACCES || rc == COALESCE_ENOMEM)
                break;
            if (!sent || (fl & R_IDEMPOTENT))
                continue;
            break;
        }
        if (status / 100 == 2) {
            atomic_store(&e->cur, ep);
            last_err[0] = 0;
            rc = fl & R_RAW ? 0 : reply_object(&r, path, out);
            break;
        }
        long code;
        rc = parse_error(&r, status, &code);
        if (auth && !renewed && auth_expired(code, last_err)) {
            drop_token(e, token);
            renewed = true;
            i--; /* the same endpoint again, with a new token */
            continue;
        }
        if (rc == COALESCE_EIO && (fl & R_IDEMPOTENT))
            continue; /* Unavailable (no leader...): try another member */
        break;
    }
    free(r.p);
    free(body);
    return rc;
}

static int header_rev(const json_t *resp, int64_t *rev)
{
    json_t *h = json_object_get(resp, "header");
    if (!json_is_object(h) || j_int(h, "revision", rev) || *rev <= 0)
        return fail(COALESCE_EDECODE, "etcd: no header revision");
    return 0;
}

/* --- range -------------------------------------------------------------- */

static json_t *
range_req(const void *key, size_t keylen, const void *end, size_t endlen)
{
    json_t *q = json_object();
    if (!q || j_set_b64(q, "key", key, keylen) ||
        (endlen && j_set_b64(q, "range_end", end, endlen))) {
        json_decref(q);
        return NULL;
    }
    return q;
}

/* A range reply to a read at rev (0: the latest). */
static int range_decode(const json_t *resp,
                        int64_t rev,
                        cache_kv_cb cb,
                        void *data,
                        int64_t *hrev,
                        int *more)
{
    int64_t hr;
    bool mo;
    json_t *kvs = json_object_get(resp, "kvs");
    int rc = header_rev(resp, &hr);
    if (rc)
        return rc;
    if (j_bool(resp, "more", &mo) || (kvs && !json_is_array(kvs)))
        return fail(COALESCE_EDECODE, "etcd: bad range reply");
    /* Decode every kv before the first callback: all or nothing. */
    size_t n = json_array_size(kvs);
    arena_t a = {0};
    jkv_t *ks = n ? calloc(n, sizeof(*ks)) : NULL;
    if (n && !ks)
        rc = fail(COALESCE_ENOMEM, "etcd: out of memory");
    for (size_t i = 0; !rc && i < n; i++)
        rc = decode_kv(json_array_get(kvs, i), &a, &ks[i]);
    for (size_t i = 0; !rc && i < n; i++) {
        kv_fix(&ks[i], &a, true);
        if (cb && cb(data, &ks[i].kv)) /* NULL: as the memory store. */
            break;
    }
    free(ks);
    free(a.p);
    if (!rc) {
        /* etcd's header is the current revision; a pinned read read rev. */
        if (hrev)
            *hrev = rev ? rev : hr;
        if (more)
            *more = mo;
    }
    return rc;
}

static int e_range(cache_store_t *s,
                   const void *key,
                   size_t keylen,
                   const void *end,
                   size_t endlen,
                   int64_t rev,
                   size_t limit,
                   cache_kv_cb cb,
                   void *data,
                   int64_t *hrev,
                   int *more)
{
    etcd_t *e = as_etcd(s);
    if (!e || (!key && keylen) || (!end && endlen) || rev < 0 ||
        limit > INT64_MAX)
        return fail(COALESCE_EINVAL, "etcd: bad argument");
    json_t *q = range_req(key, keylen, end, endlen);
    if (!q || (limit && j_set_int(q, "limit", (int64_t)limit)) ||
        (rev && j_set_int(q, "revision", rev))) {
        json_decref(q);
        return fail(COALESCE_ENOMEM, "etcd: out of memory");
    }
    json_t *resp;
    int rc = call(e, "/v3/kv/range", q, &resp, R_IDEMPOTENT);
    if (rc)
        return rc;
    rc = range_decode(resp, rev, cb, data, hrev, more);
    json_decref(resp);
    return rc;
}

/* --- txn ---------------------------------------------------------------- */

static const char *const cmp_target[] = {"VERSION", "CREATE", "MOD", "VALUE",
                                         "LEASE"};
static const char *const cmp_result[] = {"EQUAL", "GREATER", "LESS",
                                         "NOT_EQUAL"};
static const char *const cmp_field[] = {"version", "create_revision",
                                        "mod_revision", "value", "lease"};

static json_t *txn_cmp(const cache_cmp_t *c)
{
    if (c->target < 0 || c->target > CACHE_CMP_LEASE || c->result < 0 ||
        c->result > CACHE_CMP_NOT_EQUAL || (!c->key && c->keylen) ||
        (c->target == CACHE_CMP_VALUE && !c->value && c->vallen))
        return NULL;
    json_t *o = json_object();
    if (!o || j_set_b64(o, "key", c->key, c->keylen) ||
        json_object_set_new(o, "target", json_string(cmp_target[c->target])) ||
        json_object_set_new(o, "result", json_string(cmp_result[c->result])) ||
        (c->target == CACHE_CMP_VALUE
             ? j_set_b64(o, "value", c->value, c->vallen)
             : j_set_int(o, cmp_field[c->target], c->number))) {
        json_decref(o);
        return NULL;
    }
    return o;
}

/* A RequestOp, or with bare set the inner PutRequest or DeleteRangeRequest
 * (for /v3/kv/put). prev_kv only when the caller wants the results. */
static json_t *txn_op(const cache_op_t *op, bool prev, bool bare)
{
    if ((!op->key && op->keylen) || (!op->end && op->endlen) ||
        (!op->value && op->vallen))
        return NULL;
    json_t *o = json_object(), *in = NULL;
    if (op->type == CACHE_OP_PUT) {
        in = json_object();
        if (!in || j_set_b64(in, "key", op->key, op->keylen) ||
            j_set_b64(in, "value", op->value, op->vallen) ||
            (op->lease && j_set_int(in, "lease", op->lease)) ||
            (prev && json_object_set_new(in, "prev_kv", json_true())))
            goto fail;
    } else if (op->type == CACHE_OP_DELETE) {
        in = range_req(op->key, op->keylen, op->end, op->endlen);
    }
    if (!o || !in)
        goto fail;
    if (bare) {
        json_decref(o);
        return in;
    }
    if (json_object_set_new(o,
                            op->type == CACHE_OP_PUT ? "request_put"
                                                     : "request_delete_range",
                            in))
        goto fail_o;
    return o;
fail:
    json_decref(in);
fail_o:
    json_decref(o);
    return NULL;
}

static int put_result(const json_t *pk, cache_op_result_t *res)
{
    memset(res, 0, sizeof(*res));
    if (!pk || json_is_null(pk))
        return 0; /* no previous key (omitted) */
    res->has_prev = 1;
    if (!json_is_object(pk) ||
        j_int(pk, "create_revision", &res->prev_create_rev) ||
        j_int(pk, "version", &res->prev_version))
        return fail(COALESCE_EDECODE, "etcd: bad prev_kv");
    return 0;
}

/* A /v3/kv/put reply. */
static int put_decode(const json_t *resp,
                      int *succeeded,
                      int64_t *rev,
                      cache_op_result_t *results)
{
    int64_t hr;
    int rc = header_rev(resp, &hr);
    if (!rc && results)
        rc = put_result(json_object_get(resp, "prev_kv"), results);
    if (!rc && succeeded) /* Both may be NULL, as in the memory store. */
        *succeeded = 1;
    if (!rc && rev)
        *rev = hr;
    return rc;
}

/* A /v3/kv/txn reply to ops. */
static int txn_decode(const json_t *resp,
                      const cache_op_t *ops,
                      size_t nops,
                      int *succeeded,
                      int64_t *rev,
                      cache_op_result_t *results)
{
    bool ok;
    int64_t hr;
    json_t *rs = json_object_get(resp, "responses");
    int rc = header_rev(resp, &hr);
    if (rc)
        return rc;
    if (j_bool(resp, "succeeded", &ok) || (rs && !json_is_array(rs)) ||
        (ok && json_array_size(rs) != nops))
        return fail(COALESCE_EDECODE, "etcd: bad txn reply");
    for (size_t i = 0; !rc && ok && results && i < nops; i++) {
        json_t *r = json_array_get(rs, i);
        cache_op_result_t *res = &results[i];
        memset(res, 0, sizeof(*res));
        if (ops[i].type == CACHE_OP_PUT) {
            rc = put_result(
                json_object_get(json_object_get(r, "response_put"), "prev_kv"),
                res);
        } else if (j_int(json_object_get(r, "response_delete_range"), "deleted",
                         &res->deleted)) {
            rc = fail(COALESCE_EDECODE, "etcd: bad delete reply");
        }
    }
    if (!rc && succeeded)
        *succeeded = ok;
    if (!rc && rev)
        *rev = hr;
    return rc;
}

/* An unconditional put (cache_put) goes through /v3/kv/put: etcd's txn
 * path costs about 0.1 ms more per request. */
static int put_only(etcd_t *e,
                    const cache_op_t *op,
                    int *succeeded,
                    int64_t *rev,
                    cache_op_result_t *results)
{
    json_t *q = txn_op(op, results, true), *resp;
    if (!q)
        return fail(COALESCE_EINVAL, "etcd: bad op 0");
    int rc = call(e, "/v3/kv/put", q, &resp, 0);
    if (rc)
        return rc;
    rc = put_decode(resp, succeeded, rev, results);
    json_decref(resp);
    return rc;
}

static int e_txn(cache_store_t *s,
                 const cache_cmp_t *cmps,
                 size_t ncmps,
                 const cache_op_t *ops,
                 size_t nops,
                 int *succeeded,
                 int64_t *rev,
                 cache_op_result_t *results)
{
    etcd_t *e = as_etcd(s);
    if (!e || (!cmps && ncmps) || (!ops && nops) || nops > CACHE_TXN_MAX_OPS ||
        ncmps > CACHE_TXN_MAX_OPS)
        return fail(COALESCE_EINVAL, "etcd: bad argument");
    for (size_t i = 0; i < nops; i++)
        if (ops[i].type != CACHE_OP_PUT && ops[i].type != CACHE_OP_DELETE)
            return fail(COALESCE_EINVAL, "etcd: bad argument");
    if (!ncmps && nops == 1 && ops[0].type == CACHE_OP_PUT)
        return put_only(e, ops, succeeded, rev, results);
    json_t *q = json_object(), *ca = json_array(), *sa = json_array();
    int rc = 0;
    if (!q || !ca || !sa || json_object_set(q, "compare", ca) ||
        json_object_set(q, "success", sa))
        rc = fail(COALESCE_ENOMEM, "etcd: out of memory");
    for (size_t i = 0; !rc && i < ncmps; i++)
        if (json_array_append_new(ca, txn_cmp(&cmps[i])))
            rc = fail(COALESCE_EINVAL, "etcd: bad compare %zu", i);
    for (size_t i = 0; !rc && i < nops; i++)
        if (json_array_append_new(sa, txn_op(&ops[i], results, false)))
            rc = fail(COALESCE_EINVAL, "etcd: bad op %zu", i);
    json_decref(ca);
    json_decref(sa);
    if (rc) {
        json_decref(q);
        return rc;
    }
    json_t *resp;
    if ((rc = call(e, "/v3/kv/txn", q, &resp, 0)) != 0)
        return rc;
    rc = txn_decode(resp, ops, nops, succeeded, rev, results);
    json_decref(resp);
    return rc;
}

/* --- leases, compaction, revision -------------------------------------- */

/* One lease request {"ID": id}. */
static int lease_call(
    cache_store_t *s, const char *path, int64_t id, json_t **resp, int fl)
{
    etcd_t *e = as_etcd(s);
    *resp = NULL;
    if (!e)
        return fail(COALESCE_EINVAL, "etcd: bad argument");
    json_t *q = json_object();
    if (!q || j_set_int(q, "ID", id)) {
        json_decref(q);
        return fail(COALESCE_ENOMEM, "etcd: out of memory");
    }
    return call(e, path, q, resp, fl);
}

static int lease_grant_decode(const json_t *resp, int64_t *id)
{
    if (*j_str(resp, "error"))
        return fail(COALESCE_EBACKEND, "etcd: lease grant: %s",
                    j_str(resp, "error"));
    if (j_int(resp, "ID", id) || *id == 0)
        return fail(COALESCE_EDECODE, "etcd: lease grant: bad ID");
    return 0;
}

static int e_lease_grant(cache_store_t *s, int64_t ttl_ms, int64_t *id)
{
    etcd_t *e = as_etcd(s);
    if (!e || ttl_ms <= 0 || !id)
        return fail(COALESCE_EINVAL, "etcd: bad argument");
    json_t *q = json_object(), *resp;
    /* etcd leases are whole seconds: round up, never shorten. */
    if (!q || j_set_int(q, "TTL", ttl_ms / 1000 + (ttl_ms % 1000 != 0))) {
        json_decref(q);
        return fail(COALESCE_ENOMEM, "etcd: out of memory");
    }
    int rc = call(e, "/v3/lease/grant", q, &resp, 0);
    if (rc)
        return rc;
    rc = lease_grant_decode(resp, id);
    json_decref(resp);
    return rc;
}

static int e_lease_revoke(cache_store_t *s, int64_t id)
{
    json_t *resp;
    int rc = lease_call(s, "/v3/lease/revoke", id, &resp, 0);
    json_decref(resp);
    return rc;
}

static int lease_ttl_decode(const json_t *resp, int64_t id, int64_t *ttl_ms)
{
    int64_t ttl;
    if (j_int(resp, "TTL", &ttl) || ttl > INT64_MAX / 1000)
        return fail(COALESCE_EDECODE, "etcd: timetolive: bad TTL");
    if (ttl <= 0)
        return fail(COALESCE_ENOENT, "etcd: lease %lld expired or unknown",
                    (long long)id);
    if (ttl_ms)
        *ttl_ms = ttl * 1000;
    return 0;
}

COALESCE_ETCD_API int
cache_etcd_lease_ttl(cache_store_t *s, int64_t id, int64_t *ttl_ms)
{
    json_t *resp;
    int rc = lease_call(s, "/v3/lease/timetolive", id, &resp, R_IDEMPOTENT);
    if (rc)
        return rc;
    rc = lease_ttl_decode(resp, id, ttl_ms);
    json_decref(resp);
    return rc;
}

COALESCE_ETCD_API int
cache_etcd_lease_keepalive(cache_store_t *s, int64_t id, int64_t *ttl_ms)
{
    /* The stream's reply line is sometimes missing (§D.5): ignore it and
     * ask time-to-live, which is unary and reliable. */
    json_t *resp;
    int rc = lease_call(s, "/v3/lease/keepalive", id, &resp, R_RAW);
    json_decref(resp);
    return rc ? rc : cache_etcd_lease_ttl(s, id, ttl_ms);
}

COALESCE_ETCD_API int cache_etcd_compact(cache_store_t *s, int64_t rev)
{
    etcd_t *e = as_etcd(s);
    if (!e || rev <= 0)
        return fail(COALESCE_EINVAL, "etcd: bad argument");
    json_t *resp, *q = json_object();
    if (!q || j_set_int(q, "revision", rev)) {
        json_decref(q);
        return fail(COALESCE_ENOMEM, "etcd: out of memory");
    }
    int rc = call(e, "/v3/kv/compaction", q, &resp, 0);
    json_decref(resp);
    return rc;
}

COALESCE_ETCD_API int cache_etcd_revision(cache_store_t *s, int64_t *rev)
{
    etcd_t *e = as_etcd(s);
    if (!e || !rev)
        return fail(COALESCE_EINVAL, "etcd: bad argument");
    /* One key (a NUL byte) that nobody uses: the header is what we want. */
    json_t *resp, *q = range_req("", 1, NULL, 0);
    if (!q || json_object_set_new(q, "count_only", json_true())) {
        json_decref(q);
        return fail(COALESCE_ENOMEM, "etcd: out of memory");
    }
    int rc = call(e, "/v3/kv/range", q, &resp, R_IDEMPOTENT);
    if (!rc)
        rc = header_rev(resp, rev);
    json_decref(resp);
    return rc;
}

/* --- watch -------------------------------------------------------------- */

/*
 * One thread per watch. It connects (endpoints in turn until one answers
 * "created"), then reads the newline-delimited stream and delivers each
 * response. The stream ends with exactly one canceling response unless
 * watch_cancel stopped it first.
 */
struct ewatch {
    etcd_t *e;
    cache_watch_cb cb;
    void *data;
    char *body; /* the create request */
    pthread_t th;
    CURLM *multi;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int state; /* W_CONNECTING, W_CREATED, W_FAILED */
    int init_rc;
    atomic_bool cancel;
    /* The stream, on the watch thread only. */
    rbuf_t line;
    int term;           /* the canceling error, 0 while running */
    int64_t compact;    /* with COALESCE_ECOMPACTED */
    bool token_refused; /* etcd said the token expired */
    char token[4096];   /* the token this connection used */
    char why[512];      /* the watch thread's message, for watch()'s caller */
    CURL *h;            /* this connection */
    long status;        /* its HTTP status, once known */
    int64_t rx_ns;      /* last byte received */
    ewatch_t *next, **pprev;
};

enum { W_CONNECTING, W_CREATED, W_FAILED };

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void w_set_state(ewatch_t *w, int state, int rc)
{
    pthread_mutex_lock(&w->mu);
    if (w->state == W_CONNECTING) {
        w->state = state;
        w->init_rc = rc;
        pthread_cond_broadcast(&w->cv);
    }
    pthread_mutex_unlock(&w->mu);
}

static void w_deliver(ewatch_t *w, const cache_watch_resp_t *r)
{
    if (!atomic_load(&w->cancel))
        w->cb(w->data, r);
}

static int w_events(ewatch_t *w, json_t *evs, int64_t hrev)
{
    size_t n = json_array_size(evs);
    arena_t a = {0};
    jkv_t *ks = calloc(n, sizeof(*ks));
    cache_event_t *ev = calloc(n, sizeof(*ev));
    int rc = ks && ev ? 0 : COALESCE_ENOMEM;
    for (size_t i = 0; !rc && i < n; i++) {
        json_t *e = json_array_get(evs, i), *t = json_object_get(e, "type");
        const char *type = json_string_value(t);
        /* A name; PUT (0) is omitted. Anything else, a number too, is not
         * what etcd sends: never read it as a PUT. */
        if (!t || json_is_null(t) || (type && !strcmp(type, "PUT"))) {
            ev[i].type = CACHE_EV_PUT;
        } else if (type && !strcmp(type, "DELETE")) {
            ev[i].type = CACHE_EV_DELETE;
        } else {
            rc = fail(COALESCE_EDECODE, "etcd watch: event type %s",
                      type ? type : "not a string");
            break;
        }
        rc = decode_kv(json_object_get(e, "kv"), &a, &ks[i]);
        if (!rc && i && ks[i].kv.mod_rev < ks[i - 1].kv.mod_rev)
            rc = fail(COALESCE_EDECODE, "etcd watch: events out of order");
    }
    if (!rc) {
        for (size_t i = 0; i < n; i++) {
            kv_fix(&ks[i], &a, ev[i].type == CACHE_EV_PUT);
            ev[i].kv = ks[i].kv;
        }
        cache_watch_resp_t r = {.revision = hrev, .events = ev, .n = n};
        w_deliver(w, &r);
    }
    free(ks);
    free(ev);
    free(a.p);
    return rc;
}

/* One line of the stream; nonzero ends the watch (w->term says why). */
static int w_line(ewatch_t *w, const char *s, size_t len)
{
    while (len && (s[len - 1] == '\r' || s[len - 1] == ' '))
        len--;
    if (!len)
        return 0;
    json_error_t je;
    json_t *j = json_loadb(s, len, 0, &je);
    json_t *res = json_object_get(j, "result"),
           *err = json_object_get(j, "error");
    int rc = 0;
    if (!json_is_object(j) || (!res && !err)) {
        rc = fail(COALESCE_EDECODE, "etcd watch: bad line: %s", je.text);
    } else if (err) {
        int64_t code = 0;
        const char *msg = j_str(err, "message");
        j_int(err, "grpc_code", &code);
        w->token_refused = auth_expired((long)code, msg);
        rc = map_grpc((long)code, msg);
        if (!rc || w->token_refused)
            rc = COALESCE_EIO;
        fail(rc, "etcd watch: %s (code %lld)", msg, (long long)code);
    } else {
        bool created, canceled;
        int64_t hrev, compact;
        json_t *evs = json_object_get(res, "events");
        if (!json_is_object(res) || j_bool(res, "created", &created) ||
            j_bool(res, "canceled", &canceled) ||
            j_int(res, "compact_revision", &compact) ||
            j_int(json_object_get(res, "header"), "revision", &hrev) ||
            (evs && !json_is_array(evs))) {
            rc = fail(COALESCE_EDECODE, "etcd watch: bad response");
        } else if (canceled) {
            if (created && compact > 0)
                w_set_state(w, W_CREATED, 0); /* delivered as a cancel */
            /* An expired token shows here too (created and canceled at
             * once), not as an error line. */
            const char *why = j_str(res, "cancel_reason");
            w->compact = compact;
            w->token_refused =
                auth_expired(0, why) || strstr(why, "Unauthenticated") != NULL;
            rc = compact > 0                        ? COALESCE_ECOMPACTED
                 : strstr(why, "permission denied") ? COALESCE_EACCES
                                                    : COALESCE_EIO;
            fail(rc, "etcd watch canceled: %s", why);
        } else if (created) {
            w_set_state(w, W_CREATED, 0);
        } else if (w->state != W_CREATED) {
            rc = fail(COALESCE_EDECODE, "etcd watch: data before created");
        } else if (json_array_size(evs)) {
            rc = w_events(w, evs, hrev);
        } else {
            cache_watch_resp_t r = {.revision = hrev};
            w_deliver(w, &r);
        }
    }
    json_decref(j);
    if (rc)
        w->term = rc;
    return rc;
}

static size_t w_write(char *ptr, size_t size, size_t nmemb, void *ud)
{
    ewatch_t *w = ud;
    size_t n = size * nmemb;
    w->rx_ns = now_ns();
    if (w->term)
        return 0;
    if (!w->status)
        curl_easy_getinfo(w->h, CURLINFO_RESPONSE_CODE, &w->status);
    if (w->status / 100 != 2) /* an error body: kept whole for the caller */
        return rbuf_write(ptr, size, nmemb, &w->line);
    for (size_t i = 0; i < n;) {
        char *nl = memchr(ptr + i, '\n', n - i);
        size_t take = nl ? (size_t)(nl - (ptr + i)) : n - i;
        if (take && rbuf_write(ptr + i, 1, take, &w->line) != take) {
            w->term = fail(COALESCE_EDECODE, "etcd watch: line too long");
            return 0;
        }
        i += take;
        if (!nl)
            break;
        i++;
        int rc = w_line(w, w->line.p ? w->line.p : "", w->line.len);
        w->line.len = 0;
        if (rc)
            return 0;
    }
    return n;
}

/* One connection to one endpoint, until the stream ends. Returns the
 * curl result; w->term is set if the stream said why it ended. */
static CURLcode w_stream(ewatch_t *w, size_t ep, long *status, bool *sent)
{
    etcd_t *e = w->e;
    char errbuf[CURL_ERROR_SIZE] = "";
    char url[1024], auth[4200];
    CURL *h = curl_easy_init();
    struct curl_slist *hd = NULL, *t;
    CURLcode cc = CURLE_OUT_OF_MEMORY;
    *status = 0;
    *sent = false;
    if (!h)
        return cc;
    if (!(hd = curl_slist_append(NULL, "Content-Type: application/json")))
        goto out;
    if (e->user) {
        int rc = get_token(e, w->token, sizeof(w->token));
        if (rc) {
            w->term = rc;
            cc = CURLE_LOGIN_DENIED;
            goto out;
        }
        snprintf(auth, sizeof(auth), "Authorization: %s", w->token);
        if (!(t = curl_slist_append(hd, auth)))
            goto out;
        hd = t;
    }
    set_common(e, h, errbuf);
    snprintf(url, sizeof(url), "%s/v3/watch", e->eps[ep]);
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hd);
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, w->body);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, w_write);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, w);
    w->line.len = 0;
    w->rx_ns = now_ns();
    w->h = h;
    w->status = 0;
    if (curl_multi_add_handle(w->multi, h) != CURLM_OK)
        goto out;
    int64_t start = now_ns();
    int running = 1;
    cc = CURLE_OK;
    while (running && !atomic_load(&w->cancel) && !w->term) {
        if (curl_multi_perform(w->multi, &running) != CURLM_OK)
            break;
        int left;
        CURLMsg *m;
        while ((m = curl_multi_info_read(w->multi, &left)))
            if (m->msg == CURLMSG_DONE)
                cc = m->data.result;
        if (!running || w->term)
            break;
        int64_t now = now_ns();
        if (w->state == W_CONNECTING &&
            now - start > (int64_t)e->request_ms * 1000000) {
            w->term = fail(COALESCE_ETIMEDOUT, "etcd watch: no reply");
            break;
        }
        if (e->idle_ms && w->state == W_CREATED &&
            now - w->rx_ns > (int64_t)e->idle_ms * 1000000) {
            w->term =
                fail(COALESCE_EIO, "etcd watch: idle for %d ms", e->idle_ms);
            break;
        }
        curl_multi_poll(w->multi, NULL, 0, 200, NULL);
    }
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, status);
    long reqsize = 0;
    curl_easy_getinfo(h, CURLINFO_REQUEST_SIZE, &reqsize);
    *sent = reqsize > 0;
    w->h = NULL;
    if (cc != CURLE_OK && cc != CURLE_WRITE_ERROR && !w->term)
        fail(map_curl(cc), "etcd watch %s: %s%s", e->eps[ep],
             errbuf[0] ? errbuf : curl_easy_strerror(cc), cert_hint(e, ep, cc));
    curl_multi_remove_handle(w->multi, h);
out:
    curl_slist_free_all(hd);
    curl_easy_cleanup(h);
    return cc;
}

/* The canceling response of a watch that ran. store.h allows three codes:
 * the stream's own error codes say why in last_err, the cache just
 * resumes. */
static void w_end(ewatch_t *w)
{
    int rc = w->term;
    if (rc != COALESCE_EDECODE &&
        !(rc == COALESCE_ECOMPACTED && w->compact > 0))
        rc = COALESCE_EIO; /* also a stream that just ended (rc 0) */
    cache_watch_resp_t r = {.error = rc,
                            .compact_revision =
                                rc == COALESCE_ECOMPACTED ? w->compact : 0};
    w_deliver(w, &r);
}

static void *w_main(void *arg)
{
    ewatch_t *w = arg;
    etcd_t *e = w->e;
    size_t first = atomic_load(&e->cur);
    bool renewed = false;
    int rc = COALESCE_EIO;
    for (size_t i = 0; i < e->neps && !atomic_load(&w->cancel); i++) {
        size_t ep = (first + i) % e->neps;
        long status = 0;
        w->term = 0;
        w->token_refused = false;
        bool sent = false;
        CURLcode cc = w_stream(w, ep, &status, &sent);
        if (w->state == W_CREATED) {
            /* It ran: whatever ended it is the canceling response. */
            if (w->token_refused)
                drop_token(e, w->token); /* the resume renews it */
            atomic_store(&e->cur, ep);
            break;
        }
        /* Not created: decide whether another endpoint may do better. */
        if (w->term == COALESCE_EACCES || w->term == COALESCE_ENOMEM) {
            rc = w->term;
            break;
        }
        if (w->token_refused && !renewed) {
            drop_token(e, w->token);
            renewed = true;
            i--;
            continue;
        }
        if (status && status / 100 != 2 && !w->term) {
            long code;
            rc = parse_error(&w->line, status, &code);
            if (e->user && !renewed && auth_expired(code, last_err)) {
                drop_token(e, w->token);
                renewed = true;
                i--;
                continue;
            }
            if (rc != COALESCE_EIO)
                break;
            continue;
        }
        rc = w->term ? w->term : map_curl(cc);
        if (!sent && rc == COALESCE_ETIMEDOUT)
            rc = COALESCE_EIO; /* unreachable */
        if (rc == COALESCE_EACCES)
            break;
    }
    if (w->state != W_CREATED) {
        memcpy(w->why, last_err, sizeof(w->why));
        w_set_state(w, W_FAILED, rc ? rc : COALESCE_EIO);
        return NULL;
    }
    w_end(w);
    return NULL;
}

static void w_free(ewatch_t *w)
{
    if (w->multi)
        curl_multi_cleanup(w->multi);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
    free(w->line.p);
    free(w->body);
    free(w);
}

static int e_watch(cache_store_t *s,
                   const void *key,
                   size_t keylen,
                   const void *end,
                   size_t endlen,
                   int64_t start_rev,
                   cache_watch_cb cb,
                   void *data,
                   cache_watch_t **out)
{
    etcd_t *e = as_etcd(s);
    if (!e || !cb || !out || (!key && keylen) || (!end && endlen) ||
        start_rev < 0)
        return fail(COALESCE_EINVAL, "etcd: bad argument");
    ewatch_t *w = calloc(1, sizeof(*w));
    if (!w)
        return fail(COALESCE_ENOMEM, "etcd: out of memory");
    w->e = e;
    w->cb = cb;
    w->data = data;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    json_t *cr = range_req(key, keylen, end, endlen), *q = json_object();
    if (cr && q && !(start_rev && j_set_int(cr, "start_revision", start_rev)) &&
        !json_object_set_new(cr, "progress_notify", json_true()) &&
        !json_object_set(q, "create_request", cr))
        w->body = json_dumps(q, JSON_COMPACT);
    json_decref(cr);
    json_decref(q);
    w->multi = curl_multi_init();
    if (!w->body || !w->multi) {
        w_free(w);
        return fail(COALESCE_ENOMEM, "etcd: out of memory");
    }
    if (pthread_create(&w->th, NULL, w_main, w)) {
        w_free(w);
        return fail(COALESCE_ENOMEM, "etcd: cannot start a watch thread");
    }
    pthread_mutex_lock(&w->mu);
    while (w->state == W_CONNECTING)
        pthread_cond_wait(&w->cv, &w->mu);
    int rc = w->state == W_FAILED ? w->init_rc : 0;
    pthread_mutex_unlock(&w->mu);
    if (rc) {
        pthread_join(w->th, NULL);
        fail(rc, "%s", w->why);
        w_free(w);
        return rc;
    }
    pthread_mutex_lock(&e->mu);
    w->next = e->watches;
    if (w->next)
        w->next->pprev = &w->next;
    w->pprev = &e->watches;
    e->watches = w;
    pthread_mutex_unlock(&e->mu);
    *out = (cache_watch_t *)w;
    return 0;
}

static void e_watch_cancel(cache_store_t *s, cache_watch_t *cw)
{
    etcd_t *e = as_etcd(s);
    ewatch_t *w = (ewatch_t *)cw;
    if (!e || !w)
        return;
    pthread_mutex_lock(&e->mu);
    *w->pprev = w->next;
    if (w->next)
        w->next->pprev = w->pprev;
    pthread_mutex_unlock(&e->mu);
    atomic_store(&w->cancel, true);
    curl_multi_wakeup(w->multi);
    pthread_join(w->th, NULL);
    w_free(w);
}

/* --- Creation ----------------------------------------------------------- */

static void e_destroy(cache_store_t *s)
{
    etcd_t *e = as_etcd(s);
    if (!e)
        return;
    while (e->watches)
        e_watch_cancel(s, (cache_watch_t *)e->watches);
    for (unsigned i = 0; i < e->nidle; i++)
        conn_free(e->idle[i]);
    free(e->idle);
    for (size_t i = 0; i < e->neps; i++)
        free(e->eps[i]);
    free(e->user);
    free(e->pass);
    free(e->ca);
    free(e->cert);
    free(e->key);
    free(e->token);
    pthread_mutex_destroy(&e->mu);
    pthread_mutex_destroy(&e->auth_mu);
    free(e);
}

static const cache_store_ops_t etcd_ops = {
    .version = CACHE_STORE_OPS_VERSION,
    .range = e_range,
    .txn = e_txn,
    .watch = e_watch,
    .watch_cancel = e_watch_cancel,
    .lease_grant = e_lease_grant,
    .lease_revoke = e_lease_revoke,
    .destroy = e_destroy,
};

COALESCE_ETCD_API void cache_etcd_opts_init(cache_etcd_opts_t *o)
{
    if (!o)
        return;
    memset(o, 0, sizeof(*o));
    o->size = sizeof(*o);
    o->connect_timeout_ms = 1000;
    o->request_timeout_ms = 10000;
    o->max_idle_conns = 4;
}

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_init_rc;

static void curl_init(void)
{
    /* Never cleaned up: other users of libcurl in the process may need it. */
    curl_init_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

static int dup_opt(char **dst, const char *src)
{
    *dst = NULL;
    if (!src)
        return 0;
    return (*dst = strdup(src)) ? 0 : -1;
}

static int parse_endpoints(etcd_t *e, const char *list)
{
    const char *p = list;
    while (*p) {
        while (*p == ' ' || *p == ',')
            p++;
        size_t n = strcspn(p, ", ");
        if (!n)
            break;
        if (e->neps == MAX_ENDPOINTS || n > 900)
            return fail(COALESCE_EINVAL,
                        "etcd: too many or too long endpoints");
        if (!(n > 7 && !strncmp(p, "http://", 7)) &&
            !(n > 8 && !strncmp(p, "https://", 8)))
            return fail(COALESCE_EINVAL, "etcd: endpoint %.*s: not http(s)://",
                        (int)n, p);
        size_t m = n;
        while (m && p[m - 1] == '/')
            m--;
        char *ep = malloc(m + 1);
        if (!ep)
            return fail(COALESCE_ENOMEM, "etcd: out of memory");
        memcpy(ep, p, m);
        ep[m] = 0;
        e->eps[e->neps++] = ep;
        p += n;
    }
    return e->neps ? 0 : fail(COALESCE_EINVAL, "etcd: no endpoint");
}

COALESCE_ETCD_API int cache_etcd_new(cache_store_t **out,
                                     const cache_etcd_opts_t *opts)
{
    if (!out)
        return fail(COALESCE_EINVAL, "etcd: bad argument");
    *out = NULL;
    if (!opts || opts->size != sizeof(*opts) || !opts->endpoints ||
        (opts->password && !opts->username) || opts->connect_timeout_ms < 0 ||
        opts->request_timeout_ms < 0 || opts->watch_idle_ms < 0 ||
        opts->max_idle_conns > 1024)
        return fail(COALESCE_EINVAL, "etcd: bad options");
    pthread_once(&curl_once, curl_init);
    if (curl_init_rc != CURLE_OK)
        return fail(COALESCE_ENOMEM, "etcd: curl_global_init failed");
    etcd_t *e = calloc(1, sizeof(*e));
    if (!e)
        return fail(COALESCE_ENOMEM, "etcd: out of memory");
    e->base.ops = &etcd_ops;
    pthread_mutex_init(&e->mu, NULL);
    pthread_mutex_init(&e->auth_mu, NULL);
    e->connect_ms = opts->connect_timeout_ms ? opts->connect_timeout_ms : 1000;
    e->request_ms = opts->request_timeout_ms ? opts->request_timeout_ms : 10000;
    e->idle_ms = opts->watch_idle_ms;
    e->max_idle = opts->max_idle_conns;
    int rc = parse_endpoints(e, opts->endpoints);
    if (!rc &&
        (dup_opt(&e->user, opts->username) ||
         dup_opt(&e->pass, opts->password) || dup_opt(&e->ca, opts->ca_file) ||
         dup_opt(&e->cert, opts->cert_file) ||
         dup_opt(&e->key, opts->key_file) ||
         !(e->idle = calloc(e->max_idle + 1, sizeof(*e->idle)))))
        rc = fail(COALESCE_ENOMEM, "etcd: out of memory");
    if (rc) {
        e_destroy(&e->base);
        return rc;
    }
    *out = &e->base;
    return 0;
}

/*
 * Test environment for the etcd store: real etcd servers on loopback, a TCP
 * proxy that injects network faults, and a fake etcd HTTP server that sends
 * scripted bytes. Used by the Check tests and the benchmarks; link with
 * -lcurl -lpthread.
 *
 * Everything listens on 127.0.0.1 only, on ports the kernel picked, and
 * every wait has a deadline.
 *
 * Process lifetime: etcd members are started with PR_SET_PDEATHSIG=SIGKILL,
 * so they die with the test process even if it crashes or is killed by
 * Check's timeout. The signal fires when the *thread* that forked exits, so
 * call etcd_env_start() and etcd_env_restart() from a thread that outlives
 * the servers (normally the main thread of the test). Temporary directories
 * left behind by a dead test process are removed by the next
 * etcd_env_start().
 */
#ifndef COALESCE_TEST_ETCD_ENV_H
#define COALESCE_TEST_ETCD_ENV_H

#include <pthread.h>
#include <stddef.h>
#include <sys/types.h>

/* --- Real etcd servers -----------------------------------------------------
 */

/* Users created when opts.auth is set. */
#define ETCD_ENV_ROOT_USER   "root"
#define ETCD_ENV_ROOT_PASS   "rootpw"
#define ETCD_ENV_READER_USER "reader" /* read-only on every key */
#define ETCD_ENV_READER_PASS "readerpw"

typedef struct etcd_env_opts {
    int members;     /* 1 (default when 0) or 3: a cluster on loopback */
    int tls;         /* https client URLs, client-cert auth (peers: http) */
    int auth;        /* users above created and auth enabled */
    int progress_ms; /* watch progress notify interval (0: 100 ms) */
    int token_ttl_s; /* --auth-token-ttl (0: etcd's default, 300 s) */
} etcd_env_opts_t;

typedef struct etcd_member {
    pid_t pid; /* 0 when not running */
    int client_port, peer_port;
    char name[16];
    char client_url[64]; /* http(s)://127.0.0.1:port */
    char token[128];     /* cached root token for etcd_env_post (auth) */
} etcd_member_t;

typedef struct etcd_env {
    etcd_env_opts_t o;
    int n;
    etcd_member_t m[3];
    /* Temporary dir: data dirs mN/, logs mN.log, certs. Under /dev/shm when
     * it exists (fsync is cheap there), else $TMPDIR or /tmp. */
    char dir[256];
    char endpoints[512]; /* comma-separated client URLs of all members */
    /* TLS files (when o.tls). The client certs have no CN (O=etcd-env-client):
     * with auth on, etcd 3.4's gateway rejects client certs that have one. */
    char ca_file[320], cert_file[320], key_file[320]; /* CA; client cert */
    char bad_ca_file[320]; /* an unrelated self-signed CA */
    char bad_cert_file[320], bad_key_file[320]; /* client signed by bad CA */
    /* Private. */
    char etcd_bin[256];
    int live;             /* lock initialised */
    pthread_mutex_t lock; /* m[].token */
} etcd_env_t;

/*
 * 1 if /usr/bin/etcd (or etcd in PATH) runs. Otherwise prints a loud
 * message to stderr saying how to install etcd-server and returns 0.
 */
int etcd_env_available(void);

/*
 * Starts the servers: 0, or -1 after printing why to stderr (with the tail
 * of the member's log) and cleaning up everything it started. Returns once
 * every member answers and agrees on a leader; with auth, once every member
 * rejects unauthenticated requests. *e needs no initialisation.
 */
int etcd_env_start(etcd_env_t *e, const etcd_env_opts_t *o);

/*
 * SIGTERM each running member, SIGKILL those still alive after 5 s, reap
 * them, remove the temporary dir. Only signals PIDs it started. Safe to call
 * twice, and after a failed start.
 */
void etcd_env_stop(etcd_env_t *e);

/* SIGKILL member i and reap it: 0, or -1 if it was not running. */
int etcd_env_kill(etcd_env_t *e, int i);

/*
 * Start member i again with the same flags, ports and data dir (etcd
 * ignores --initial-cluster* when the data dir exists) and wait (20 s)
 * until it answers and knows a leader: 0 or -1.
 */
int etcd_env_restart(etcd_env_t *e, int i);

/*
 * Index of the member that is leader, as reported by the running members
 * (their /v3/maintenance/status agree, and the leader's "leader" equals its
 * own header.member_id); waits up to 10 s for one, else -1.
 */
int etcd_env_leader(etcd_env_t *e);

/*
 * Raw POST of json to path (e.g. "/v3/kv/put") on member i, as root when
 * auth is on (token cached, renewed when etcd rejects it) and with the
 * client certificate when tls is on. The reply body (truncated, always
 * NUL-terminated) goes to out when out is not NULL. Returns the HTTP status,
 * or -1 when there was no HTTP reply (10 s timeout). Thread-safe.
 */
int etcd_env_post(etcd_env_t *e,
                  int i,
                  const char *path,
                  const char *json,
                  char *out,
                  size_t outlen);

/* --- TCP fault proxy -------------------------------------------------------
 */

/*
 * Listens on 127.0.0.1 (random port) and forwards each connection to
 * 127.0.0.1:target_port, both ways, from one poll() thread. When one side
 * resets, the other side is reset too; a FIN is forwarded as a FIN.
 */
typedef struct tcp_proxy tcp_proxy_t;

int tcp_proxy_start(tcp_proxy_t **out, int target_port); /* 0 or -1 */
int tcp_proxy_port(const tcp_proxy_t *p);
/* Reset (RST) every current connection, both sides; returns once done. */
void tcp_proxy_cut(tcp_proxy_t *p);
/* While on, new connections are accepted and reset at once (the client
 * fails fast); existing ones are untouched. */
void tcp_proxy_block(tcp_proxy_t *p, int on);
/* While on, no byte moves on any connection (a silent network: the client
 * times out); connections are still accepted and connected. */
void tcp_proxy_stall(tcp_proxy_t *p, int on);
void tcp_proxy_set_target(tcp_proxy_t *p, int target_port); /* new conns */
long tcp_proxy_accepted(const tcp_proxy_t *p); /* connections so far */
long tcp_proxy_active(const tcp_proxy_t *p);   /* connections open now */
/* Resets every connection, joins the thread, frees. NULL is fine. */
void tcp_proxy_stop(tcp_proxy_t *p);

/* --- Fake etcd HTTP server -------------------------------------------------
 */

/*
 * A minimal HTTP/1.1 server on 127.0.0.1 (random port), one thread per
 * connection, keep-alive, request bodies with Content-Length (and
 * "Expect: 100-continue"). Each request is given to the handler, which
 * writes whatever bytes it likes to req->fd.
 */
typedef struct fake_http fake_http_t;
typedef struct fake_req {
    const char *method;  /* "POST", "GET", ... */
    const char *path;    /* "/v3/kv/range" (with any query string) */
    const char *headers; /* raw header lines, "\r\n"-separated */
    const char *body;    /* NUL-terminated (bodylen excludes it) */
    size_t bodylen;
    int fd;   /* the connection */
    long seq; /* per-server request number, from 0 */
} fake_req_t;

/* Return 0 to keep the connection for the next request, 1 to close it. */
typedef int (*fake_handler_t)(void *data,
                              fake_http_t *srv,
                              const fake_req_t *req);

/* h NULL: every request gets a 404. 0 or -1. */
int fake_http_start(fake_http_t **out, fake_handler_t h, void *data);
int fake_http_port(const fake_http_t *s);
/* Requests seen so far for path (exact match; NULL: all). */
long fake_http_requests(const fake_http_t *s, const char *path);
/* Shuts down every connection (so that blocked handlers' writes and waits
 * fail), joins all threads, frees. NULL is fine. */
void fake_http_stop(fake_http_t *s);

/* Writing helpers for handlers; 0, or -1 when the peer is gone. */
int fake_http_send(int fd, const void *buf, size_t len); /* all bytes */
int fake_http_reply_json(int fd, int status, const char *json);
int fake_http_start_chunked(int fd, int status);
int fake_http_chunk(int fd, const void *buf, size_t len); /* len > 0 */
int fake_http_end_chunked(int fd);
/* Make the coming close send an RST instead of a FIN. */
void fake_http_abort(int fd);
/*
 * Block until the peer closes the connection, the server stops, or max_ms
 * pass: 1 if the peer closed or the server is stopping, 0 on timeout.
 */
int fake_http_hold(fake_http_t *s, int fd, int max_ms);
/* Value of header name (case-insensitive) copied into out: 1 if found, 0
 * if not. */
int fake_req_header(const fake_req_t *r,
                    const char *name,
                    char *out,
                    size_t outlen);

#endif

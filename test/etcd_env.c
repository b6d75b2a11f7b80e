/*
 * Test environment for the etcd store: real etcd servers, a TCP fault
 * proxy, a fake etcd HTTP server. See etcd_env.h.
 */
#ifndef _GNU_SOURCE
#    define _GNU_SOURCE /* prctl, POLLRDHUP, accept4, nftw, eventfd */
#endif

#include "etcd_env.h"

#include <curl/curl.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define READY_MS    20000 /* a member must answer within this */
#define LEADER_MS   10000 /* etcd_env_leader's deadline */
#define STOP_MS     5000  /* SIGTERM grace, then SIGKILL */
#define REQUEST_MS  10000 /* etcd_env_post */
#define POLL_MS     20    /* readiness polling period */
#define START_TRIES 3     /* a picked port may be taken before etcd binds */

#define ENV_ERR(...)                                                           \
    do {                                                                       \
        fprintf(stderr, "etcd_env: " __VA_ARGS__);                             \
        fputc('\n', stderr);                                                   \
    } while (0)

/* --- Time ----------------------------------------------------------------- */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Only for polling a server with a deadline, never to wait for an event. */
static void nap_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

static int ms_left(int64_t deadline)
{
    int64_t left = deadline - now_ms();
    return left <= 0 ? 0 : left > INT32_MAX ? INT32_MAX : (int)left;
}

/* --- Processes ------------------------------------------------------------ */

/* /usr/bin/name, else name in PATH: 1 with the path in out, or 0. */
static int find_exe(const char *name, char *out, size_t outlen)
{
    snprintf(out, outlen, "/usr/bin/%s", name);
    if (access(out, X_OK) == 0)
        return 1;
    const char *path = getenv("PATH");
    while (path && *path) {
        size_t n = strcspn(path, ":");
        if (n > 0 &&
            (size_t)snprintf(out, outlen, "%.*s/%s", (int)n, path, name) <
                outlen &&
            access(out, X_OK) == 0)
            return 1;
        path += n;
        path += *path == ':';
    }
    out[0] = '\0';
    return 0;
}

/* fd moved to >= 3 with FD_CLOEXEC, so that dup2 onto 0-2 always copies. */
static int high_fd(int fd)
{
    if (fd < 0 || fd > 2)
        return fd;
    int h = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    close(fd);
    return h;
}

/*
 * fork + exec bin with stdout and stderr appended to log, stdin from
 * /dev/null. The child gets SIGKILL when the thread that forked it exits
 * (PR_SET_PDEATHSIG), so a crashed test leaves nothing running. The parent
 * may have threads: the child only makes async-signal-safe calls.
 */
static pid_t spawn(const char *bin, char *const argv[], const char *log)
{
    int fd =
        high_fd(open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644));
    int nul = high_fd(open("/dev/null", O_RDONLY | O_CLOEXEC));
    if (fd < 0 || nul < 0) {
        ENV_ERR("cannot open %s: %s", log, strerror(errno));
        if (fd >= 0)
            close(fd);
        if (nul >= 0)
            close(nul);
        return -1;
    }
    struct rlimit rl;
    int maxfd = getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < 65536
                    ? (int)rl.rlim_cur
                    : 65536;
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent) /* the parent died before prctl */
            _exit(127);
        /* The test may block or ignore signals; etcd must see SIGTERM. */
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigaction(SIGPIPE, &dfl, NULL);
        sigaction(SIGTERM, &dfl, NULL);
        sigaction(SIGINT, &dfl, NULL);
        if (dup2(nul, 0) < 0 || dup2(fd, 1) < 0 || dup2(fd, 2) < 0)
            _exit(127);
            /* Inherited sockets (a proxy's listener...) must not live on. */
#ifdef SYS_close_range
        if (syscall(SYS_close_range, 3U, ~0U, 0) != 0)
#endif
            for (int i = 3; i < maxfd; i++)
                close(i);
        execv(bin, argv);
        _exit(127);
    }
    if (pid < 0)
        ENV_ERR("fork: %s", strerror(errno));
    close(fd);
    close(nul);
    return pid;
}

/*
 * Reap pid, waiting up to ms: 1 (with *status) if reaped, 0 on timeout, -1
 * if it is not our child (already reaped).
 */
static int wait_pid_ms(pid_t pid, int ms, int *status)
{
    int64_t end = now_ms() + ms;
    /* Polls: valgrind does not know pidfd_open and warns on every call,
     * and 10 ms is plenty for stopping a server. */
    int rc;
    for (;;) {
        int st;
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid) {
            if (status)
                *status = st;
            rc = 1;
            break;
        }
        if (r < 0 && errno != EINTR) {
            rc = -1;
            break;
        }
        int left = ms_left(end);
        if (left == 0) {
            rc = 0;
            break;
        }
        nap_ms(left < 10 ? left : 10);
    }
    return rc;
}

/* SIGKILL and reap a child we started. */
static void kill_reap(pid_t pid)
{
    if (pid <= 0)
        return;
    kill(pid, SIGKILL);
    if (wait_pid_ms(pid, STOP_MS, NULL) == 0)
        ENV_ERR("pid %d survived SIGKILL for %d ms", (int)pid, STOP_MS);
}

static void print_tail(const char *what, const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        ENV_ERR("%s: no log %s", what, path);
        return;
    }
    char buf[4096];
    long size = fseek(f, 0, SEEK_END) == 0 ? ftell(f) : 0;
    fseek(f, size > (long)sizeof buf - 1 ? size - (long)sizeof buf + 1 : 0,
          SEEK_SET);
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = '\0';
    fclose(f);
    fprintf(stderr, "etcd_env: --- %s: end of %s ---\n%s%s--- end ---\n", what,
            path, buf, n && buf[n - 1] != '\n' ? "\n" : "");
}

static int file_contains(const char *path, const char *needle)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    char line[8192];
    int found = 0;
    while (!found && fgets(line, sizeof line, f))
        found = strstr(line, needle) != NULL;
    fclose(f);
    return found;
}

/* Run a command to completion (deadline ms) with output to log: 0 or -1. */
static int run_cmd(char *const argv[], const char *log, int ms)
{
    pid_t pid = spawn(argv[0], argv, log);
    if (pid < 0)
        return -1;
    int st = 0;
    int r = wait_pid_ms(pid, ms, &st);
    if (r == 0) {
        ENV_ERR("%s took more than %d ms", argv[0], ms);
        kill_reap(pid);
        return -1;
    }
    if (r < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        ENV_ERR("%s %s failed", argv[0], argv[1] ? argv[1] : "");
        print_tail(argv[0], log);
        return -1;
    }
    return 0;
}

/* --- Directories ---------------------------------------------------------- */

static int
rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    remove(p);
    return 0;
}

static void rm_rf(const char *dir)
{
    nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

/* 1 if pid no longer runs: no such process, or a zombie. */
static int pid_gone(pid_t pid)
{
    if (kill(pid, 0) != 0)
        return errno == ESRCH;
    char path[64], stat[256];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    size_t n = fread(stat, 1, sizeof stat - 1, f);
    fclose(f);
    stat[n] = '\0';
    const char *end = strrchr(stat, ')'); /* "pid (comm) S ..." */
    return end && end[1] == ' ' && end[2] == 'Z';
}

/*
 * Dirs are named etcd_env.PID.XXXXXX: remove those of dead processes of
 * ours (a test that crashed or was killed by Check's timeout).
 */
static void clean_stale(const char *base)
{
    DIR *d = opendir(base);
    if (!d)
        return;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (strncmp(de->d_name, "etcd_env.", 9) != 0)
            continue;
        char *end;
        long pid = strtol(de->d_name + 9, &end, 10);
        if (*end != '.' || pid <= 0 || pid == (long)getpid())
            continue;
        if (!pid_gone((pid_t)pid))
            continue;
        char path[512];
        struct stat st;
        snprintf(path, sizeof path, "%s/%s", base, de->d_name);
        if (lstat(path, &st) == 0 && S_ISDIR(st.st_mode) &&
            st.st_uid == getuid())
            rm_rf(path);
    }
    closedir(d);
}

static int make_dir(etcd_env_t *e)
{
    const char *base = "/dev/shm";
    struct stat st;
    if (stat(base, &st) != 0 || !S_ISDIR(st.st_mode) ||
        access(base, W_OK | X_OK) != 0) {
        base = getenv("TMPDIR");
        if (!base || !*base)
            base = "/tmp";
    }
    clean_stale(base);
    if ((size_t)snprintf(e->dir, sizeof e->dir, "%s/etcd_env.%ld.XXXXXX", base,
                         (long)getpid()) >= sizeof e->dir - 64 ||
        !mkdtemp(e->dir)) {
        ENV_ERR("cannot make a temporary dir under %s: %s", base,
                strerror(errno));
        e->dir[0] = '\0';
        return -1;
    }
    return 0;
}

/* --- HTTP (libcurl) ------------------------------------------------------- */

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;

static void curl_init(void)
{
    curl_global_init(CURL_GLOBAL_ALL);
}

struct outbuf {
    char *p;
    size_t len, cap;
};

static size_t on_body(char *ptr, size_t size, size_t nmemb, void *ud)
{
    struct outbuf *o = ud;
    size_t n = size * nmemb;
    if (o->p && o->cap > o->len + 1) {
        size_t k = o->cap - 1 - o->len;
        k = n < k ? n : k;
        memcpy(o->p + o->len, ptr, k);
        o->len += k;
        o->p[o->len] = '\0';
    }
    return n; /* the rest is dropped: out is only for looking at */
}

/* POST json to url: the HTTP status, or -1 without a reply. */
static int http_post(const etcd_env_t *e,
                     const char *url,
                     const char *token,
                     const char *json,
                     char *out,
                     size_t outlen,
                     long timeout_ms)
{
    pthread_once(&curl_once, curl_init);
    struct outbuf ob = {out, 0, out ? outlen : 0};
    if (out && outlen)
        out[0] = '\0';
    CURL *h = curl_easy_init();
    if (!h)
        return -1;
    struct curl_slist *hdrs =
        curl_slist_append(NULL, "Content-Type: application/json");
    char auth[200];
    if (token && *token) {
        snprintf(auth, sizeof auth, "Authorization: %s", token);
        hdrs = curl_slist_append(hdrs, auth);
    }
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, json ? json : "{}");
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_NOPROXY, "*"); /* ignore http_proxy */
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, timeout_ms);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, timeout_ms);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &ob);
    if (e->o.tls) {
        curl_easy_setopt(h, CURLOPT_CAINFO, e->ca_file);
        curl_easy_setopt(h, CURLOPT_SSLCERT, e->cert_file);
        curl_easy_setopt(h, CURLOPT_SSLKEY, e->key_file);
    }
    long status = -1;
    if (curl_easy_perform(h) != CURLE_OK ||
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status) != CURLE_OK ||
        status == 0)
        status = -1;
    curl_slist_free_all(hdrs);
    curl_easy_cleanup(h);
    return (int)status;
}

/*
 * The value of "key": in a JSON reply, a string or a number (etcd's gateway
 * writes int64s as strings), copied into out: 0, or -1. Good enough for the
 * flat fields read here (member_id, leader, token).
 */
static int
json_field(const char *body, const char *key, char *out, size_t outlen)
{
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *p = strstr(body, pat);
    if (!p)
        return -1;
    p += strlen(pat);
    while (*p == ' ')
        p++;
    int quoted = *p == '"';
    p += quoted;
    size_t n = 0;
    while (p[n] && (quoted ? p[n] != '"' : strchr(",} \n", p[n]) == NULL))
        n++;
    if (n == 0 || n >= outlen)
        return -1;
    memcpy(out, p, n);
    out[n] = '\0';
    return 0;
}

static int post_member(const etcd_env_t *e,
                       int i,
                       const char *token,
                       const char *path,
                       const char *json,
                       char *out,
                       size_t outlen,
                       long timeout_ms)
{
    char url[256];
    snprintf(url, sizeof url, "%s%s", e->m[i].client_url, path);
    return http_post(e, url, token, json, out, outlen, timeout_ms);
}

/* member_id and leader from member i's status: 0, or -1. */
static int
member_status(const etcd_env_t *e, int i, char *id, char *leader, size_t len)
{
    char body[2048];
    if (post_member(e, i, NULL, "/v3/maintenance/status", "{}", body,
                    sizeof body, 1000) != 200 ||
        json_field(body, "member_id", id, len) != 0 ||
        json_field(body, "leader", leader, len) != 0)
        return -1;
    return 0;
}

/* --- Certificates --------------------------------------------------------- */

static const char openssl_cnf[] =
    "[req]\n"
    "distinguished_name = dn\n"
    "prompt = no\n"
    "[dn]\n"
    "CN = unused\n"
    "[v3_ca]\n"
    "basicConstraints = critical,CA:TRUE\n"
    "keyUsage = critical,keyCertSign,cRLSign\n"
    "subjectKeyIdentifier = hash\n"
    /* etcd's gateway dials the gRPC server with the server cert as client
     * cert when --client-cert-auth is on: it needs clientAuth too. */
    "[server]\n"
    "basicConstraints = CA:FALSE\n"
    "keyUsage = critical,digitalSignature,keyEncipherment\n"
    "extendedKeyUsage = serverAuth,clientAuth\n"
    "subjectAltName = IP:127.0.0.1,DNS:localhost\n"
    "[client]\n"
    "basicConstraints = CA:FALSE\n"
    "keyUsage = critical,digitalSignature,keyEncipherment\n"
    "extendedKeyUsage = clientAuth\n";

struct certgen {
    const etcd_env_t *e;
    char bin[256], cnf[320], log[320];
};

static int openssl_run(struct certgen *g, const char *const *args)
{
    char *argv[40];
    int n = 0;
    argv[n++] = g->bin;
    for (; *args && n < 39; args++)
        argv[n++] = (char *)*args;
    argv[n] = NULL;
    return run_cmd(argv, g->log, 20000);
}

/* DIR/name.pem + DIR/name.key; a self-signed CA when ca is NULL. */
static int make_cert(struct certgen *g,
                     const char *name,
                     const char *subj,
                     const char *ca,
                     const char *ext,
                     const char *serial)
{
    char key[320], pem[320], csr[320], cakey[320], capem[320];
    snprintf(key, sizeof key, "%s/%s.key", g->e->dir, name);
    snprintf(pem, sizeof pem, "%s/%s.pem", g->e->dir, name);
    snprintf(csr, sizeof csr, "%s/%s.csr", g->e->dir, name);
    if (!ca) {
        const char *a[] = {"req",         "-config",  g->cnf,
                           "-x509",       "-new",     "-newkey",
                           "ec",          "-pkeyopt", "ec_paramgen_curve:P-256",
                           "-nodes",      "-keyout",  key,
                           "-out",        pem,        "-days",
                           "1",           "-subj",    subj,
                           "-extensions", "v3_ca",    NULL};
        return openssl_run(g, a);
    }
    snprintf(cakey, sizeof cakey, "%s/%s.key", g->e->dir, ca);
    snprintf(capem, sizeof capem, "%s/%s.pem", g->e->dir, ca);
    const char *r[] = {
        "req",     "-config", g->cnf,     "-new",
        "-newkey", "ec",      "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes",  "-keyout", key,        "-out",
        csr,       "-subj",   subj,       NULL};
    const char *x[] = {
        "x509",        "-req", "-in",   csr, "-CA",  capem, "-CAkey",   cakey,
        "-set_serial", serial, "-days", "1", "-out", pem,   "-extfile", g->cnf,
        "-extensions", ext,    NULL};
    return openssl_run(g, r) == 0 && openssl_run(g, x) == 0 ? 0 : -1;
}

static int make_certs(etcd_env_t *e)
{
    struct certgen g = {.e = e};
    if (!find_exe("openssl", g.bin, sizeof g.bin)) {
        ENV_ERR("*** openssl not found: cannot make TLS certificates; "
                "install it: sudo apt-get install -y openssl ***");
        return -1;
    }
    snprintf(g.cnf, sizeof g.cnf, "%s/openssl.cnf", e->dir);
    snprintf(g.log, sizeof g.log, "%s/openssl.log", e->dir);
    FILE *f = fopen(g.cnf, "w");
    if (!f || fputs(openssl_cnf, f) == EOF || fclose(f) != 0) {
        ENV_ERR("cannot write %s", g.cnf);
        return -1;
    }
    /* With --client-cert-auth and auth enabled, etcd 3.4's gateway answers
     * 400 "CommonName of client sending a request against gateway will be
     * ignored" to a client cert with a CN: the client certs have none. */
    if (make_cert(&g, "ca", "/CN=etcd-env-ca", NULL, NULL, NULL) ||
        make_cert(&g, "server", "/CN=127.0.0.1", "ca", "server", "2") ||
        make_cert(&g, "client", "/O=etcd-env-client", "ca", "client", "3") ||
        make_cert(&g, "bad_ca", "/CN=etcd-env-bad-ca", NULL, NULL, NULL) ||
        make_cert(&g, "bad_client", "/O=etcd-env-client", "bad_ca", "client",
                  "2"))
        return -1;
    snprintf(e->ca_file, sizeof e->ca_file, "%s/ca.pem", e->dir);
    snprintf(e->cert_file, sizeof e->cert_file, "%s/client.pem", e->dir);
    snprintf(e->key_file, sizeof e->key_file, "%s/client.key", e->dir);
    snprintf(e->bad_ca_file, sizeof e->bad_ca_file, "%s/bad_ca.pem", e->dir);
    snprintf(e->bad_cert_file, sizeof e->bad_cert_file, "%s/bad_client.pem",
             e->dir);
    snprintf(e->bad_key_file, sizeof e->bad_key_file, "%s/bad_client.key",
             e->dir);
    return 0;
}

/* --- etcd members --------------------------------------------------------- */

int etcd_env_available(void)
{
    char bin[256];
    if (find_exe("etcd", bin, sizeof bin)) {
        char *argv[] = {bin, (char *)"--version", NULL};
        if (run_cmd(argv, "/dev/null", 10000) == 0)
            return 1;
    }
    fprintf(stderr,
            "\n"
            "**********************************************************\n"
            "* etcd_env: etcd-server is missing (no runnable etcd in  *\n"
            "* /usr/bin or PATH): the etcd tests cannot run.          *\n"
            "* Install it:   sudo apt-get install -y etcd-server      *\n"
            "**********************************************************\n"
            "\n");
    return 0;
}

/* A free port on 127.0.0.1 that is not in taken[0..n). */
static int free_port(const int *taken, int n)
{
    for (int tries = 0; tries < 100; tries++) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            return -1;
        struct sockaddr_in a = {.sin_family = AF_INET,
                                .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        socklen_t len = sizeof a;
        int port = -1;
        if (bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
            getsockname(fd, (struct sockaddr *)&a, &len) == 0)
            port = ntohs(a.sin_port);
        close(fd);
        if (port < 0)
            return -1;
        int dup = 0;
        for (int i = 0; i < n; i++)
            dup |= taken[i] == port;
        if (!dup)
            return port;
    }
    return -1;
}

static int pick_ports(etcd_env_t *e)
{
    int taken[6], n = 0;
    for (int i = 0; i < e->n; i++) {
        etcd_member_t *m = &e->m[i];
        if ((m->client_port = free_port(taken, n)) < 0)
            return -1;
        taken[n++] = m->client_port;
        if ((m->peer_port = free_port(taken, n)) < 0)
            return -1;
        taken[n++] = m->peer_port;
        snprintf(m->name, sizeof m->name, "m%d", i);
        snprintf(m->client_url, sizeof m->client_url, "%s://127.0.0.1:%d",
                 e->o.tls ? "https" : "http", m->client_port);
    }
    size_t off = 0;
    for (int i = 0; i < e->n; i++)
        off += (size_t)snprintf(e->endpoints + off, sizeof e->endpoints - off,
                                "%s%s", i ? "," : "", e->m[i].client_url);
    return 0;
}

struct argv_buf {
    char store[8192];
    char *v[48];
    size_t used;
    int n;
};

static void arg(struct argv_buf *a, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void arg(struct argv_buf *a, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *p = a->store + a->used;
    int k = vsnprintf(p, sizeof a->store - a->used, fmt, ap);
    va_end(ap);
    if (k < 0 || (size_t)k >= sizeof a->store - a->used ||
        a->n >= (int)(sizeof a->v / sizeof a->v[0]) - 1)
        abort(); /* a bug here, not a test failure */
    a->used += (size_t)k + 1;
    a->v[a->n++] = p;
    a->v[a->n] = NULL;
}

/* The same command line for the first start and every restart. */
static void member_argv(const etcd_env_t *e, int i, struct argv_buf *a)
{
    const etcd_member_t *m = &e->m[i];
    a->used = 0;
    a->n = 0;
    arg(a, "%s", e->etcd_bin);
    arg(a, "--name=%s", m->name);
    arg(a, "--data-dir=%s/%s", e->dir, m->name);
    arg(a, "--listen-client-urls=%s", m->client_url);
    arg(a, "--advertise-client-urls=%s", m->client_url);
    arg(a, "--listen-peer-urls=http://127.0.0.1:%d", m->peer_port);
    arg(a, "--initial-advertise-peer-urls=http://127.0.0.1:%d", m->peer_port);
    char cluster[512];
    size_t off = 0;
    for (int j = 0; j < e->n; j++)
        off += (size_t)snprintf(cluster + off, sizeof cluster - off,
                                "%s%s=http://127.0.0.1:%d", j ? "," : "",
                                e->m[j].name, e->m[j].peer_port);
    arg(a, "--initial-cluster=%s", cluster);
    /* Ignored by etcd once the data dir holds a member (restarts). */
    arg(a, "--initial-cluster-state=new");
    arg(a, "--initial-cluster-token=%s", strrchr(e->dir, '/') + 1);
    arg(a, "--experimental-watch-progress-notify-interval=%dms",
        e->o.progress_ms);
    /* Quick elections: a member starts in ~0.5 s, a new leader follows a
     * killed one within ~1 s. */
    arg(a, "--heartbeat-interval=50");
    arg(a, "--election-timeout=500");
    arg(a, "--logger=zap");
    arg(a, "--log-outputs=stderr"); /* into mN.log, with early errors */
    if (e->o.tls) {
        arg(a, "--cert-file=%s/server.pem", e->dir);
        arg(a, "--key-file=%s/server.key", e->dir);
        arg(a, "--trusted-ca-file=%s/ca.pem", e->dir);
        arg(a, "--client-cert-auth");
    }
    if (e->o.auth && e->o.token_ttl_s > 0)
        arg(a, "--auth-token-ttl=%d", e->o.token_ttl_s);
}

static void log_path(const etcd_env_t *e, int i, char *out, size_t len)
{
    snprintf(out, len, "%s/%s.log", e->dir, e->m[i].name);
}

static void print_member_tail(const etcd_env_t *e, int i)
{
    char log[320];
    log_path(e, i, log, sizeof log);
    print_tail(e->m[i].name, log);
}

static int spawn_member(etcd_env_t *e, int i)
{
    struct argv_buf a;
    char log[320];
    member_argv(e, i, &a);
    log_path(e, i, log, sizeof log);
    FILE *f = fopen(log, "a"); /* restarts append: mark where each begins */
    if (f) {
        fprintf(f, "=== etcd_env: starting %s ===\n", e->m[i].name);
        fclose(f);
    }
    pid_t pid = spawn(e->etcd_bin, a.v, log);
    if (pid < 0)
        return -1;
    e->m[i].pid = pid;
    return 0;
}

/* Index of the running member that says it is the leader, or -1. */
static int leader_now(const etcd_env_t *e)
{
    for (int i = 0; i < e->n; i++) {
        char id[32], leader[32];
        if (e->m[i].pid > 0 &&
            member_status(e, i, id, leader, sizeof id) == 0 &&
            strcmp(id, leader) == 0)
            return i;
    }
    return -1;
}

/*
 * SIGTERM the running members, SIGKILL the ones still alive after ms.
 * A leader that gets SIGTERM tries to hand its leadership over first and,
 * when the others are stopping too, waits ~6 s for that to time out. So in
 * a cluster the followers go first, and the leader, which steps down after
 * an election timeout without a quorum (CheckQuorum), goes last.
 */
static void stop_members(etcd_env_t *e, int ms)
{
    int64_t end = now_ms() + ms;
    int running = 0;
    for (int i = 0; i < e->n; i++)
        running += e->m[i].pid > 0;
    int leader = running > 1 && ms > 0 ? leader_now(e) : -1;
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1 && leader >= 0) {
            /* Bounded: the step-down takes ~election-timeout (500 ms). */
            int64_t down = now_ms() + 2000;
            while (leader_now(e) == leader && ms_left(down) > 0)
                nap_ms(POLL_MS);
        }
        for (int i = 0; i < e->n; i++)
            if (e->m[i].pid > 0 && (i == leader) == (pass == 1))
                kill(e->m[i].pid, SIGTERM);
        for (int i = 0; i < e->n; i++) {
            if (e->m[i].pid <= 0 || (i == leader) != (pass == 1))
                continue;
            if (wait_pid_ms(e->m[i].pid, ms_left(end), NULL) == 0)
                kill_reap(e->m[i].pid);
            e->m[i].pid = 0;
        }
    }
}

/*
 * Wait until the members in mask answer /v3/maintenance/status and agree on
 * a leader: 0, or -1 after printing why. *bind_fail is set when a member
 * died because its port was taken (worth retrying with new ports).
 */
static int wait_ready(etcd_env_t *e, unsigned mask, int ms, int *bind_fail)
{
    int64_t end = now_ms() + ms;
    *bind_fail = 0;
    for (;;) {
        char ids[3][32], leaders[3][32];
        int ready = 1;
        for (int i = 0; i < e->n; i++) {
            if (!(mask & 1u << i))
                continue;
            char log[320];
            log_path(e, i, log, sizeof log);
            if (e->m[i].pid <= 0 || wait_pid_ms(e->m[i].pid, 0, NULL) != 0) {
                e->m[i].pid = 0;
                /* The caller may retry with other ports, quietly. */
                *bind_fail = file_contains(log, "address already in use");
                if (!*bind_fail) {
                    ENV_ERR("member %s exited while starting", e->m[i].name);
                    print_tail(e->m[i].name, log);
                }
                return -1;
            }
            if (member_status(e, i, ids[i], leaders[i], sizeof ids[i]) != 0 ||
                strcmp(leaders[i], "0") == 0)
                ready = 0;
        }
        for (int i = 0; ready && i < e->n; i++)
            for (int j = i + 1; j < e->n; j++)
                if ((mask & 1u << i) && (mask & 1u << j) &&
                    strcmp(leaders[i], leaders[j]) != 0)
                    ready = 0;
        if (ready)
            return 0;
        if (ms_left(end) == 0)
            break;
        nap_ms(POLL_MS);
    }
    ENV_ERR("etcd not ready (answering, with a leader) after %d ms", ms);
    for (int i = 0; i < e->n; i++)
        if (mask & 1u << i)
            print_member_tail(e, i);
    return -1;
}

static int setup_auth(etcd_env_t *e)
{
    static const char *const steps[][2] = {
        {"/v3/auth/user/add", "{\"name\":\"" ETCD_ENV_ROOT_USER
                              "\",\"password\":\"" ETCD_ENV_ROOT_PASS "\"}"},
        {"/v3/auth/role/add", "{\"name\":\"root\"}"},
        {"/v3/auth/user/grant",
         "{\"user\":\"" ETCD_ENV_ROOT_USER "\",\"role\":\"root\"}"},
        {"/v3/auth/user/add", "{\"name\":\"" ETCD_ENV_READER_USER
                              "\",\"password\":\"" ETCD_ENV_READER_PASS "\"}"},
        {"/v3/auth/role/add", "{\"name\":\"reader\"}"},
        /* key "\0" to range_end "\0": every key. */
        {"/v3/auth/role/grant",
         "{\"name\":\"reader\",\"perm\":{\"permType\":\"READ\","
         "\"key\":\"AA==\",\"range_end\":\"AA==\"}}"},
        {"/v3/auth/user/grant",
         "{\"user\":\"" ETCD_ENV_READER_USER "\",\"role\":\"reader\"}"},
        {"/v3/auth/enable", "{}"},
    };
    char body[1024];
    for (size_t k = 0; k < sizeof steps / sizeof steps[0]; k++) {
        int st = post_member(e, 0, NULL, steps[k][0], steps[k][1], body,
                             sizeof body, REQUEST_MS);
        if (st != 200) {
            ENV_ERR("auth setup: %s %s: HTTP %d %s", steps[k][0], steps[k][1],
                    st, body);
            return -1;
        }
    }
    /* Every member applies the enable through raft: wait until each one
     * refuses a request without a token. */
    int64_t end = now_ms() + READY_MS;
    for (int i = 0; i < e->n; i++) {
        while (post_member(e, i, NULL, "/v3/kv/range", "{\"key\":\"AA==\"}",
                           body, sizeof body, 1000) == 200) {
            if (ms_left(end) == 0) {
                ENV_ERR("auth: %s still serves unauthenticated requests",
                        e->m[i].name);
                return -1;
            }
            nap_ms(POLL_MS);
        }
    }
    return 0;
}

int etcd_env_start(etcd_env_t *e, const etcd_env_opts_t *o)
{
    memset(e, 0, sizeof *e);
    if (o)
        e->o = *o;
    if (e->o.members == 0)
        e->o.members = 1;
    if (e->o.members != 1 && e->o.members != 3) {
        ENV_ERR("members must be 1 or 3, not %d", e->o.members);
        return -1;
    }
    if (e->o.progress_ms <= 0)
        e->o.progress_ms = 100;
    e->n = e->o.members;
    if (!etcd_env_available() ||
        !find_exe("etcd", e->etcd_bin, sizeof e->etcd_bin))
        return -1;
    pthread_once(&curl_once, curl_init);
    pthread_mutex_init(&e->lock, NULL);
    e->live = 1;
    if (make_dir(e) != 0 || (e->o.tls && make_certs(e) != 0))
        goto fail;
    for (int attempt = 1;; attempt++) {
        if (pick_ports(e) != 0) {
            ENV_ERR("no free port on 127.0.0.1");
            goto fail;
        }
        int ok = 1, bind_fail = 0;
        /* All at once: cluster members wait for each other. */
        for (int i = 0; ok && i < e->n; i++)
            ok = spawn_member(e, i) == 0;
        if (ok && wait_ready(e, (1u << e->n) - 1, READY_MS, &bind_fail) == 0)
            break;
        stop_members(e, 0);
        if (!bind_fail || attempt == START_TRIES) {
            if (bind_fail) {
                ENV_ERR("ports taken %d times in a row", attempt);
                for (int i = 0; i < e->n; i++)
                    print_member_tail(e, i);
            }
            goto fail;
        }
        /* Fresh data dirs and logs for the new ports. */
        for (int i = 0; i < e->n; i++) {
            char p[320];
            snprintf(p, sizeof p, "%s/%s", e->dir, e->m[i].name);
            rm_rf(p);
            log_path(e, i, p, sizeof p);
            unlink(p);
        }
    }
    if (e->o.auth && setup_auth(e) != 0)
        goto fail;
    return 0;
fail:
    etcd_env_stop(e);
    return -1;
}

void etcd_env_stop(etcd_env_t *e)
{
    stop_members(e, STOP_MS);
    if (e->dir[0]) {
        rm_rf(e->dir);
        e->dir[0] = '\0';
    }
    if (e->live) {
        pthread_mutex_destroy(&e->lock);
        e->live = 0;
    }
}

int etcd_env_kill(etcd_env_t *e, int i)
{
    if (i < 0 || i >= e->n || e->m[i].pid <= 0)
        return -1;
    kill_reap(e->m[i].pid);
    e->m[i].pid = 0;
    return 0;
}

int etcd_env_restart(etcd_env_t *e, int i)
{
    if (i < 0 || i >= e->n || !e->dir[0]) {
        ENV_ERR("restart: no member %d", i);
        return -1;
    }
    if (e->m[i].pid > 0) {
        ENV_ERR("restart: %s is running", e->m[i].name);
        return -1;
    }
    pthread_mutex_lock(&e->lock);
    e->m[i].token[0] = '\0'; /* simple tokens live in memory */
    pthread_mutex_unlock(&e->lock);
    int bind_fail = 0;
    if (spawn_member(e, i) != 0 ||
        wait_ready(e, 1u << i, READY_MS, &bind_fail) != 0) {
        if (bind_fail) {
            ENV_ERR("restart: %s: port %d or %d taken meanwhile", e->m[i].name,
                    e->m[i].client_port, e->m[i].peer_port);
            print_member_tail(e, i);
        }
        etcd_env_kill(e, i);
        return -1;
    }
    return 0;
}

int etcd_env_leader(etcd_env_t *e)
{
    int64_t end = now_ms() + LEADER_MS;
    do {
        char ids[3][32], leaders[3][32];
        const char *agreed = NULL;
        int agree = 1, leader = -1;
        for (int i = 0; i < e->n; i++) {
            if (e->m[i].pid <= 0 ||
                member_status(e, i, ids[i], leaders[i], sizeof ids[i]) != 0)
                continue;
            if (!agreed)
                agreed = leaders[i];
            else if (strcmp(agreed, leaders[i]) != 0)
                agree = 0;
            if (strcmp(ids[i], leaders[i]) == 0)
                leader = i;
        }
        /* All that answered agree, and the leader is one of them: a killed
         * leader is still named by the others until they time out. */
        if (agree && leader >= 0)
            return leader;
        nap_ms(POLL_MS);
    } while (ms_left(end) > 0);
    ENV_ERR("no leader after %d ms", LEADER_MS);
    return -1;
}

/* A root token from member i into tok: 0, or -1. */
static int authenticate(const etcd_env_t *e, int i, char *tok, size_t len)
{
    char body[1024];
    int st = post_member(e, i, NULL, "/v3/auth/authenticate",
                         "{\"name\":\"" ETCD_ENV_ROOT_USER
                         "\",\"password\":\"" ETCD_ENV_ROOT_PASS "\"}",
                         body, sizeof body, REQUEST_MS);
    if (st != 200 || json_field(body, "token", tok, len) != 0) {
        ENV_ERR("authenticate as root on %s: HTTP %d %s", e->m[i].name, st,
                body);
        return -1;
    }
    return 0;
}

int etcd_env_post(etcd_env_t *e,
                  int i,
                  const char *path,
                  const char *json,
                  char *out,
                  size_t outlen)
{
    if (i < 0 || i >= e->n || !e->dir[0])
        return -1;
    char tok[sizeof e->m[i].token] = "";
    for (int attempt = 0;; attempt++) {
        if (e->o.auth) {
            pthread_mutex_lock(&e->lock);
            memcpy(tok, e->m[i].token, sizeof tok);
            pthread_mutex_unlock(&e->lock);
            if (!tok[0]) {
                if (authenticate(e, i, tok, sizeof tok) != 0)
                    return -1;
                pthread_mutex_lock(&e->lock);
                memcpy(e->m[i].token, tok, sizeof tok);
                pthread_mutex_unlock(&e->lock);
            }
        }
        int st = post_member(e, i, tok, path, json, out, outlen, REQUEST_MS);
        /* 401: the token expired, or the member restarted and forgot it. */
        if (st != 401 || !e->o.auth || attempt > 0)
            return st;
        pthread_mutex_lock(&e->lock);
        if (strcmp(e->m[i].token, tok) == 0)
            e->m[i].token[0] = '\0';
        pthread_mutex_unlock(&e->lock);
    }
}

/* --- Sockets -------------------------------------------------------------- */

/* A listening socket on 127.0.0.1:random: the fd (port in *port), or -1. */
static int listen_loopback(int *port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0 ||
        listen(fd, 128) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) != 0) {
        ENV_ERR("listen on 127.0.0.1: %s", strerror(errno));
        close(fd);
        return -1;
    }
    *port = ntohs(a.sin_port);
    return fd;
}

/* Close fd with an RST rather than a FIN. */
static void close_rst(int fd)
{
    struct linger l = {.l_onoff = 1, .l_linger = 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
    close(fd);
}

static void wake(int efd)
{
    uint64_t one = 1;
    while (write(efd, &one, sizeof one) < 0 && errno == EINTR) {
    }
}

static void drain(int efd)
{
    uint64_t v;
    while (read(efd, &v, sizeof v) < 0 && errno == EINTR) {
    }
}

/* --- TCP fault proxy ------------------------------------------------------ */

#define PROXY_BUF (64 * 1024)

/* One proxied connection: side 0 is the client, side 1 the target. */
struct pconn {
    int fd[2];
    int connecting; /* non-blocking connect to the target pending */
    int eof[2];     /* side d sent a FIN */
    int shut[2];    /* ...and it was passed on: shutdown(fd[!d], WR) */
    size_t off[2], len[2];
    char buf[2][PROXY_BUF]; /* buf[d]: read from fd[d], to go to fd[!d] */
};

struct tcp_proxy {
    int lfd, efd, port;
    atomic_int target, blocked, stalled;
    atomic_long accepted, active;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int stop;               /* under mu */
    long cut_req, cut_done; /* under mu: tcp_proxy_cut generations */
    struct pconn **conns;   /* owned by the thread */
    size_t nconns, capconns;
};

static void pconn_close(struct pconn *c, int rst)
{
    for (int d = 0; d < 2; d++) {
        if (c->fd[d] < 0)
            continue;
        if (rst)
            close_rst(c->fd[d]);
        else
            close(c->fd[d]);
        c->fd[d] = -1;
    }
}

static void proxy_accept(tcp_proxy_t *p)
{
    for (;;) {
        int cfd = accept4(p->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (cfd < 0)
            return; /* EAGAIN, or an error the next poll shows again */
        atomic_fetch_add(&p->accepted, 1);
        if (atomic_load(&p->blocked)) {
            close_rst(cfd);
            continue;
        }
        int sfd =
            socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        struct pconn *c = NULL;
        if (p->nconns == p->capconns) {
            size_t cap = p->capconns ? 2 * p->capconns : 8;
            struct pconn **n = realloc(p->conns, cap * sizeof *n);
            if (n) {
                p->conns = n;
                p->capconns = cap;
            }
        }
        if (sfd >= 0 && p->nconns < p->capconns)
            c = calloc(1, sizeof *c);
        if (!c) {
            if (sfd >= 0)
                close(sfd);
            close_rst(cfd);
            continue;
        }
        int one = 1;
        setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        setsockopt(sfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct sockaddr_in a = {.sin_family = AF_INET,
                                .sin_port =
                                    htons((uint16_t)atomic_load(&p->target)),
                                .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        c->fd[0] = cfd;
        c->fd[1] = sfd;
        if (connect(sfd, (struct sockaddr *)&a, sizeof a) != 0) {
            if (errno != EINPROGRESS) {
                pconn_close(c, 1); /* refused: the client sees a reset */
                free(c);
                continue;
            }
            c->connecting = 1;
        }
        p->conns[p->nconns++] = c;
        atomic_store(&p->active, (long)p->nconns);
    }
}

/* Move bytes for c after poll: 0, or -1 when the pair must be reset. */
static int pconn_io(struct pconn *c, const struct pollfd *pf)
{
    if (c->connecting) {
        if (!(pf[1].revents & (POLLOUT | POLLERR | POLLHUP)))
            return (pf[0].revents & POLLERR) ? -1 : 0;
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(c->fd[1], SOL_SOCKET, SO_ERROR, &err, &len) != 0 ||
            err != 0)
            return -1;
        c->connecting = 0;
        return 0;
    }
    for (int d = 0; d < 2; d++) {
        if (pf[d].revents & POLLERR)
            return -1;
        /* Read side d when its buffer is empty. */
        if ((pf[d].revents & (POLLIN | POLLHUP)) && !c->eof[d] &&
            c->len[d] == 0) {
            ssize_t n = recv(c->fd[d], c->buf[d], PROXY_BUF, 0);
            if (n > 0) {
                c->off[d] = 0;
                c->len[d] = (size_t)n;
            } else if (n == 0) {
                c->eof[d] = 1;
            } else if (errno != EAGAIN && errno != EINTR) {
                return -1;
            }
        }
        /* Write it to the other side (try at once: usually it fits). */
        if (c->len[d] > 0) {
            ssize_t n = send(c->fd[!d], c->buf[d] + c->off[d], c->len[d],
                             MSG_NOSIGNAL | MSG_DONTWAIT);
            if (n > 0) {
                c->off[d] += (size_t)n;
                c->len[d] -= (size_t)n;
            } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
                return -1;
            }
        }
        if (c->eof[d] && c->len[d] == 0 && !c->shut[d]) {
            shutdown(c->fd[!d], SHUT_WR); /* pass the FIN on */
            c->shut[d] = 1;
        }
    }
    return 0;
}

static void *proxy_main(void *arg)
{
    tcp_proxy_t *p = arg;
    struct pollfd *pf = NULL;
    size_t cappf = 0;
    for (;;) {
        pthread_mutex_lock(&p->mu);
        int stop = p->stop;
        if (p->cut_req != p->cut_done) {
            for (size_t i = 0; i < p->nconns; i++) {
                pconn_close(p->conns[i], 1);
                free(p->conns[i]);
            }
            p->nconns = 0;
            atomic_store(&p->active, 0);
            p->cut_done = p->cut_req;
            pthread_cond_broadcast(&p->cv);
        }
        pthread_mutex_unlock(&p->mu);
        if (stop)
            break;
        size_t need = 2 + 2 * p->nconns;
        if (need > cappf) {
            struct pollfd *n = realloc(pf, need * sizeof *n);
            if (!n) {
                nap_ms(10); /* out of memory: try again */
                continue;
            }
            pf = n;
            cappf = need;
        }
        pf[0] = (struct pollfd){.fd = p->efd, .events = POLLIN};
        pf[1] = (struct pollfd){.fd = p->lfd, .events = POLLIN};
        int stalled = atomic_load(&p->stalled);
        for (size_t i = 0; i < p->nconns; i++) {
            struct pconn *c = p->conns[i];
            struct pollfd *q = &pf[2 + 2 * i];
            q[0] = (struct pollfd){.fd = c->fd[0]};
            q[1] = (struct pollfd){.fd = c->fd[1]};
            if (stalled) { /* not even errors: nothing happens */
                q[0].fd = q[1].fd = -1;
            } else if (c->connecting) {
                q[1].events = POLLOUT;
            } else {
                for (int d = 0; d < 2; d++) {
                    if (!c->eof[d] && c->len[d] == 0)
                        q[d].events |= POLLIN;
                    if (c->len[d] > 0)
                        q[!d].events |= POLLOUT;
                }
            }
        }
        /* The timeout only bounds the wait; wake() is what ends it. */
        if (poll(pf, (nfds_t)need, 1000) < 0)
            continue;
        if (pf[0].revents & POLLIN)
            drain(p->efd);
        size_t keep = 0;
        for (size_t i = 0; i < p->nconns; i++) {
            struct pconn *c = p->conns[i];
            int r = stalled ? 0 : pconn_io(c, &pf[2 + 2 * i]);
            if (r != 0 || (c->shut[0] && c->shut[1])) {
                pconn_close(c, r != 0);
                free(c);
            } else {
                p->conns[keep++] = c;
            }
        }
        p->nconns = keep;
        atomic_store(&p->active, (long)keep);
        if (pf[1].revents & POLLIN)
            proxy_accept(p);
    }
    for (size_t i = 0; i < p->nconns; i++) {
        pconn_close(p->conns[i], 1);
        free(p->conns[i]);
    }
    p->nconns = 0;
    atomic_store(&p->active, 0);
    free(pf);
    return NULL;
}

int tcp_proxy_start(tcp_proxy_t **out, int target_port)
{
    *out = NULL;
    tcp_proxy_t *p = calloc(1, sizeof *p);
    if (!p)
        return -1;
    p->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    p->lfd = listen_loopback(&p->port);
    atomic_init(&p->target, target_port);
    atomic_init(&p->blocked, 0);
    atomic_init(&p->stalled, 0);
    atomic_init(&p->accepted, 0);
    atomic_init(&p->active, 0);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    if (p->efd < 0 || p->lfd < 0 ||
        pthread_create(&p->thread, NULL, proxy_main, p) != 0) {
        ENV_ERR("tcp_proxy_start failed");
        if (p->efd >= 0)
            close(p->efd);
        if (p->lfd >= 0)
            close(p->lfd);
        pthread_mutex_destroy(&p->mu);
        pthread_cond_destroy(&p->cv);
        free(p);
        return -1;
    }
    *out = p;
    return 0;
}

int tcp_proxy_port(const tcp_proxy_t *p)
{
    return p->port;
}

void tcp_proxy_cut(tcp_proxy_t *p)
{
    pthread_mutex_lock(&p->mu);
    long gen = ++p->cut_req;
    wake(p->efd);
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += 5;
    while (p->cut_done < gen && !p->stop)
        if (pthread_cond_timedwait(&p->cv, &p->mu, &dl) == ETIMEDOUT) {
            ENV_ERR("tcp_proxy_cut: the proxy thread did not answer in 5 s");
            break;
        }
    pthread_mutex_unlock(&p->mu);
}

void tcp_proxy_block(tcp_proxy_t *p, int on)
{
    atomic_store(&p->blocked, on != 0);
}

void tcp_proxy_stall(tcp_proxy_t *p, int on)
{
    atomic_store(&p->stalled, on != 0);
    wake(p->efd); /* rebuild the poll set */
}

void tcp_proxy_set_target(tcp_proxy_t *p, int target_port)
{
    atomic_store(&p->target, target_port);
}

long tcp_proxy_accepted(const tcp_proxy_t *p)
{
    return atomic_load(&((tcp_proxy_t *)p)->accepted);
}

long tcp_proxy_active(const tcp_proxy_t *p)
{
    return atomic_load(&((tcp_proxy_t *)p)->active);
}

void tcp_proxy_stop(tcp_proxy_t *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    wake(p->efd);
    pthread_join(p->thread, NULL);
    close(p->lfd);
    close(p->efd);
    free(p->conns);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p);
}

/* --- Fake etcd HTTP server ------------------------------------------------ */

#define FAKE_MAX_HEAD (64 * 1024)
#define FAKE_MAX_BODY (64 * 1024 * 1024)
#define FAKE_IDLE_MS  60000 /* an idle keep-alive connection is closed */

struct fconn {
    fake_http_t *s;
    int fd;   /* -1 once closed; under s->mu */
    int done; /* the thread is about to return; under s->mu */
    pthread_t thread;
    struct fconn *next;
};

struct path_count {
    char *path;
    long n;
    struct path_count *next;
};

struct fake_http {
    int lfd, efd, port;
    fake_handler_t h;
    void *data;
    pthread_t thread;
    atomic_int stopping;
    atomic_long seq;
    pthread_mutex_t mu;
    struct fconn *conns;      /* under mu */
    struct path_count *paths; /* under mu */
    long total;               /* under mu */
};

int fake_http_send(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static const char *reason(int status)
{
    switch (status) {
    case 200:
        return "OK";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 500:
        return "Internal Server Error";
    case 503:
        return "Service Unavailable";
    default:
        return "Status";
    }
}

int fake_http_reply_json(int fd, int status, const char *json)
{
    char head[256];
    size_t len = strlen(json);
    int k = snprintf(head, sizeof head,
                     "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                     "Content-Length: %zu\r\n\r\n",
                     status, reason(status), len);
    return fake_http_send(fd, head, (size_t)k) == 0 &&
                   fake_http_send(fd, json, len) == 0
               ? 0
               : -1;
}

int fake_http_start_chunked(int fd, int status)
{
    char head[256];
    int k = snprintf(head, sizeof head,
                     "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n",
                     status, reason(status));
    return fake_http_send(fd, head, (size_t)k);
}

int fake_http_chunk(int fd, const void *buf, size_t len)
{
    char head[32];
    if (len == 0)
        return 0; /* a 0-length chunk would end the body */
    int k = snprintf(head, sizeof head, "%zx\r\n", len);
    return fake_http_send(fd, head, (size_t)k) == 0 &&
                   fake_http_send(fd, buf, len) == 0 &&
                   fake_http_send(fd, "\r\n", 2) == 0
               ? 0
               : -1;
}

int fake_http_end_chunked(int fd)
{
    return fake_http_send(fd, "0\r\n\r\n", 5);
}

void fake_http_abort(int fd)
{
    struct linger l = {.l_onoff = 1, .l_linger = 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
}

int fake_http_hold(fake_http_t *s, int fd, int max_ms)
{
    int64_t end = now_ms() + (max_ms > 0 ? max_ms : 0);
    for (;;) {
        if (atomic_load(&s->stopping))
            return 1;
        /* POLLRDHUP only: bytes the peer sends do not end the hold. Stop
         * shuts the socket down, which shows as POLLHUP. */
        struct pollfd p = {.fd = fd, .events = POLLRDHUP};
        int r = poll(&p, 1, ms_left(end));
        if (r > 0)
            return 1;
        if (r == 0 || (r < 0 && errno != EINTR))
            return 0;
    }
}

int fake_req_header(const fake_req_t *r,
                    const char *name,
                    char *out,
                    size_t outlen)
{
    size_t nl = strlen(name);
    for (const char *l = r->headers; l && *l;) {
        const char *eol = strstr(l, "\r\n");
        size_t len = eol ? (size_t)(eol - l) : strlen(l);
        if (len > nl && l[nl] == ':' && strncasecmp(l, name, nl) == 0) {
            const char *v = l + nl + 1;
            const char *ve = l + len;
            while (v < ve && (*v == ' ' || *v == '\t'))
                v++;
            while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t'))
                ve--;
            if (outlen) {
                size_t n = (size_t)(ve - v) < outlen - 1 ? (size_t)(ve - v)
                                                         : outlen - 1;
                memcpy(out, v, n);
                out[n] = '\0';
            }
            return 1;
        }
        l += len + (eol ? 2 : 0);
    }
    return 0;
}

static void count_path(fake_http_t *s, const char *path)
{
    pthread_mutex_lock(&s->mu);
    s->total++;
    struct path_count *c = s->paths;
    while (c && strcmp(c->path, path) != 0)
        c = c->next;
    if (!c && (c = calloc(1, sizeof *c)) != NULL) {
        if ((c->path = strdup(path)) == NULL) {
            free(c);
            c = NULL;
        } else {
            c->next = s->paths;
            s->paths = c;
        }
    }
    if (c)
        c->n++;
    pthread_mutex_unlock(&s->mu);
}

long fake_http_requests(const fake_http_t *s, const char *path)
{
    fake_http_t *m = (fake_http_t *)s; /* the lock, not the counts */
    long n = 0;
    pthread_mutex_lock(&m->mu);
    if (!path) {
        n = m->total;
    } else {
        for (struct path_count *c = m->paths; c; c = c->next)
            if (strcmp(c->path, path) == 0)
                n = c->n;
    }
    pthread_mutex_unlock(&m->mu);
    return n;
}

/* Read more into *buf (growing it up to max): bytes read, 0 on EOF or stop
 * or idle timeout, -1 on error or when full. */
static ssize_t
fill(fake_http_t *s, int fd, char **buf, size_t *len, size_t *cap, size_t max)
{
    if (*len + 1 >= *cap) {
        if (*cap >= max)
            return -1;
        size_t ncap = *cap * 2 < max ? *cap * 2 : max;
        char *n = realloc(*buf, ncap);
        if (!n)
            return -1;
        *buf = n;
        *cap = ncap;
    }
    for (;;) {
        if (atomic_load(&s->stopping))
            return 0;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int r = poll(&p, 1, FAKE_IDLE_MS);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return r == 0 ? 0 : -1;
        ssize_t n = recv(fd, *buf + *len, *cap - 1 - *len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n > 0)
            *len += (size_t)n;
        return n;
    }
}

/*
 * Serve requests on one connection until the handler or the client closes
 * it. buf holds the bytes read so far (a request may be pipelined).
 */
static void serve(fake_http_t *s, int fd)
{
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    while (buf) {
        char *eoh;
        while ((buf[len] = '\0', eoh = strstr(buf, "\r\n\r\n")) == NULL)
            if (fill(s, fd, &buf, &len, &cap, FAKE_MAX_HEAD) <= 0)
                goto out;
        size_t headlen = (size_t)(eoh - buf) + 4;
        eoh[2] = '\0'; /* headers end with their last "\r\n" */
        /* Request line: METHOD SP PATH SP VERSION. */
        char *line_end = strstr(buf, "\r\n");
        char *sp1 = memchr(buf, ' ', (size_t)(line_end - buf));
        char *sp2 =
            sp1 ? memchr(sp1 + 1, ' ', (size_t)(line_end - sp1 - 1)) : NULL;
        if (!sp1 || !sp2)
            goto out;
        *sp1 = *sp2 = *line_end = '\0';
        fake_req_t req = {
            .method = buf, .path = sp1 + 1, .headers = line_end + 2, .fd = fd};
        char v[64];
        size_t bodylen = 0;
        if (fake_req_header(&req, "Transfer-Encoding", v, sizeof v)) {
            fake_http_reply_json(fd, 501, "{\"error\":\"chunked request\"}");
            goto out;
        }
        if (fake_req_header(&req, "Content-Length", v, sizeof v))
            bodylen = strtoul(v, NULL, 10);
        if (bodylen > FAKE_MAX_BODY)
            goto out;
        int close_after = fake_req_header(&req, "Connection", v, sizeof v) &&
                          strcasecmp(v, "close") == 0;
        if (bodylen > 0 && len < headlen + bodylen &&
            fake_req_header(&req, "Expect", v, sizeof v) &&
            strcasecmp(v, "100-continue") == 0 &&
            fake_http_send(fd, "HTTP/1.1 100 Continue\r\n\r\n", 25) != 0)
            goto out;
        /* The pointers into buf must survive the reads: offsets. */
        size_t m_off = (size_t)(req.method - buf);
        size_t p_off = (size_t)(req.path - buf);
        size_t h_off = (size_t)(req.headers - buf);
        while (len < headlen + bodylen)
            if (fill(s, fd, &buf, &len, &cap, headlen + bodylen + 1) <= 0)
                goto out;
        char *body = malloc(bodylen + 1);
        if (!body)
            goto out;
        memcpy(body, buf + headlen, bodylen);
        body[bodylen] = '\0';
        req.method = buf + m_off;
        req.path = buf + p_off;
        req.headers = buf + h_off;
        req.body = body;
        req.bodylen = bodylen;
        req.seq = atomic_fetch_add(&s->seq, 1);
        count_path(s, req.path);
        int r = s->h ? s->h(s->data, s, &req)
                     : (fake_http_reply_json(fd, 404, "{}") != 0);
        free(body);
        if (r != 0 || close_after)
            goto out;
        /* Keep what follows this request. */
        len -= headlen + bodylen;
        memmove(buf, buf + headlen + bodylen, len);
    }
out:
    free(buf);
}

static void *fconn_main(void *arg)
{
    struct fconn *c = arg;
    fake_http_t *s = c->s;
    serve(s, c->fd);
    pthread_mutex_lock(&s->mu);
    close(c->fd); /* under mu: stop must not shut down a reused fd */
    c->fd = -1;
    c->done = 1;
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* Join the connection threads that finished (all of them with all != 0). */
static void reap_conns(fake_http_t *s, int all)
{
    for (;;) {
        struct fconn *c = NULL, **pp;
        pthread_mutex_lock(&s->mu);
        for (pp = &s->conns; *pp; pp = &(*pp)->next)
            if (all || (*pp)->done) {
                c = *pp;
                *pp = c->next;
                break;
            }
        pthread_mutex_unlock(&s->mu);
        if (!c)
            return;
        pthread_join(c->thread, NULL);
        free(c);
    }
}

static void *fake_main(void *arg)
{
    fake_http_t *s = arg;
    while (!atomic_load(&s->stopping)) {
        struct pollfd p[2] = {{.fd = s->efd, .events = POLLIN},
                              {.fd = s->lfd, .events = POLLIN}};
        if (poll(p, 2, 1000) <= 0) /* wake() ends it; 1 s bounds it */
            continue;
        reap_conns(s, 0);
        if (!(p[1].revents & POLLIN))
            continue;
        int fd = accept4(s->lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0)
            continue;
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct fconn *c = calloc(1, sizeof *c);
        if (!c) {
            close(fd);
            continue;
        }
        c->s = s;
        c->fd = fd;
        pthread_mutex_lock(&s->mu);
        if (pthread_create(&c->thread, NULL, fconn_main, c) != 0) {
            pthread_mutex_unlock(&s->mu);
            close(fd);
            free(c);
            continue;
        }
        c->next = s->conns;
        s->conns = c;
        pthread_mutex_unlock(&s->mu);
    }
    return NULL;
}

int fake_http_start(fake_http_t **out, fake_handler_t h, void *data)
{
    *out = NULL;
    fake_http_t *s = calloc(1, sizeof *s);
    if (!s)
        return -1;
    s->h = h;
    s->data = data;
    atomic_init(&s->stopping, 0);
    atomic_init(&s->seq, 0);
    pthread_mutex_init(&s->mu, NULL);
    s->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    s->lfd = listen_loopback(&s->port);
    if (s->efd < 0 || s->lfd < 0 ||
        pthread_create(&s->thread, NULL, fake_main, s) != 0) {
        ENV_ERR("fake_http_start failed");
        if (s->efd >= 0)
            close(s->efd);
        if (s->lfd >= 0)
            close(s->lfd);
        pthread_mutex_destroy(&s->mu);
        free(s);
        return -1;
    }
    *out = s;
    return 0;
}

int fake_http_port(const fake_http_t *s)
{
    return s->port;
}

void fake_http_stop(fake_http_t *s)
{
    if (!s)
        return;
    atomic_store(&s->stopping, 1);
    wake(s->efd);
    pthread_join(s->thread, NULL);
    close(s->lfd);
    /* Blocked handlers and reads fail now: their threads end. */
    pthread_mutex_lock(&s->mu);
    for (struct fconn *c = s->conns; c; c = c->next)
        if (c->fd >= 0)
            shutdown(c->fd, SHUT_RDWR);
    pthread_mutex_unlock(&s->mu);
    reap_conns(s, 1);
    close(s->efd);
    while (s->paths) {
        struct path_count *c = s->paths;
        s->paths = c->next;
        free(c->path);
        free(c);
    }
    pthread_mutex_destroy(&s->mu);
    free(s);
}

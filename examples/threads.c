/*
 * threads.c: collapsed forwarding in a thread-per-request server.
 *
 * Eight client threads ask for the same object at the same moment. Only one
 * of them, the leader, goes upstream; the others join its flight and stream
 * the same bytes while they arrive, so the upstream sees one request.
 *
 * The upstream is simulated by a thread that waits a little (connection and
 * time to first byte), sends a status line, then a 4 MiB body in 64 KiB
 * chunks with a short pause between chunks.
 *
 * Build:
 *   cc -std=c11 threads.c $(pkg-config --cflags --libs libcoalesce) -lpthread
 */
#define _POSIX_C_SOURCE 200809L /* pthread_barrier_t, clock_gettime */

#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <coalesce.h>

#define CLIENTS   8
#define BODY_SIZE ((size_t)4 << 20)
#define CHUNK     ((size_t)64 << 10)

/* Everything that changes the response goes into the key: here the method
 * and the path. A HEAD would be another flight. */
static const char KEY[] = "GET /videos/intro.mp4";

static flight_group_t *group;
static pthread_barrier_t start;
static struct timespec t0;

/* Byte i of the object, so that every client can check what it got. */
static unsigned char body_byte(size_t i)
{
    return (unsigned char)(i % 251);
}

static double ms_since_start(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)(t.tv_sec - t0.tv_sec) * 1e3 +
           (double)(t.tv_nsec - t0.tv_nsec) / 1e6;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* --- The upstream side ---------------------------------------------------- */

/* One thread per upstream fetch; there should be exactly one. */
struct upstream {
    pthread_mutex_t lock;
    pthread_t threads[CLIENTS];
    int fetches;
};

static struct upstream upstream = {.lock = PTHREAD_MUTEX_INITIALIZER};

/*
 * Feeds the flight from its own thread. Because the leader's fetch callback
 * returned at once, every reader (the leader's too) reads while the body
 * arrives, and max_lag bounds the memory for all of them.
 */
static void *upstream_main(void *arg)
{
    flight_writer_t *w = arg;
    char meta[64];
    int rc;

    sleep_ms(20); /* connect, send the request, wait for the answer */
    snprintf(meta, sizeof(meta), "200 OK\r\nContent-Length: %zu", BODY_SIZE);
    rc = flight_set_meta(w, meta, strlen(meta));

    for (size_t off = 0; rc == 0 && off < BODY_SIZE; off += CHUNK) {
        /* A proxy would recv() straight into this buffer. The flight takes
         * its own reference, so readers share these bytes without a copy. */
        coalesce_buf_t *b;
        rc = coalesce_buf_new(&b, CHUNK);
        if (rc != 0)
            break;
        unsigned char *p = coalesce_buf_mutable(b);
        for (size_t i = 0; i < CHUNK; i++)
            p[i] = body_byte(off + i);
        rc = flight_write_buf(w, b, 0, CHUNK);
        coalesce_buf_unref(b);
        sleep_ms(1); /* the upstream is slower than we are */
    }

    /* Always end the stream, with the error if there was one: a reader
     * never waits for bytes that will not come. */
    flight_end(w, rc);
    flight_writer_release(w);
    return NULL;
}

/*
 * The leader's fetch: runs once per flight, on the leader's thread, inside
 * flight_do(). It starts the upstream request and returns at once with
 * FLIGHT_FETCH_ASYNC: the writer now belongs to the upstream thread.
 */
static int fetch(flight_writer_t *w, void *data)
{
    struct upstream *up = data;
    int rc = COALESCE_ENOMEM;

    pthread_mutex_lock(&up->lock);
    if (up->fetches < CLIENTS) {
        pthread_t *t = &up->threads[up->fetches];
        if (pthread_create(t, NULL, upstream_main, w) == 0) {
            up->fetches++;
            rc = FLIGHT_FETCH_ASYNC;
        }
    }
    pthread_mutex_unlock(&up->lock);
    /* An error fails the flight for every reader; nobody hangs. */
    return rc;
}

/* --- The client side ------------------------------------------------------ */

struct client {
    pthread_t thread;
    int joined;      /* 0: leader, 1: joined the leader's flight */
    int status;      /* COALESCE_EOF when the whole body was read */
    int body_ok;     /* every byte as expected */
    size_t bytes;    /* body bytes read */
    char reply[32];  /* first line of the meta */
    double first_ms; /* first body byte, since the start */
    double end_ms;   /* end of the body */
};

static void *client_main(void *arg)
{
    struct client *c = arg;
    flight_reader_t *r;
    unsigned char buf[16384];
    const void *meta;
    size_t metalen;

    c->body_ok = 1;
    pthread_barrier_wait(&start); /* all clients ask at the same moment */

    int rc = flight_do(group, KEY, sizeof(KEY) - 1, fetch, &upstream, &r);
    if (rc != 0) {
        c->status = rc;
        return NULL;
    }
    c->joined = flight_reader_shared(r);

    /* Blocks until the upstream answered; a server would now send its own
     * status line and headers to its client. */
    rc = flight_meta(r, -1, &meta, &metalen);
    if (rc == 0 && meta) {
        /* The meta is bytes, not a string: keep its first line. */
        const char *line = meta;
        size_t n = 0;
        while (n < metalen && n < sizeof(c->reply) - 1 && line[n] != '\r')
            n++;
        memcpy(c->reply, line, n);
    }

    /* Then the body, as it arrives; COALESCE_EOF is the clean end. */
    while (rc == 0) {
        size_t n;
        rc = flight_read(r, buf, sizeof(buf), -1, &n);
        if (rc != 0)
            break;
        if (c->bytes == 0)
            c->first_ms = ms_since_start();
        for (size_t i = 0; i < n; i++)
            if (buf[i] != body_byte(c->bytes + i))
                c->body_ok = 0;
        c->bytes += n;
    }
    c->end_ms = ms_since_start();
    c->status = rc;
    flight_reader_close(r);
    return NULL;
}

int main(void)
{
    struct client clients[CLIENTS];
    flight_stats_t st;
    int rc, failed = 0, joined = 0;

    /* One group for the whole process, shared by every thread. */
    rc = flight_group_new(&group, NULL);
    if (rc != 0) {
        fprintf(stderr, "flight_group_new: %s\n", coalesce_strerror(rc));
        return 1;
    }
    pthread_barrier_init(&start, NULL, CLIENTS);
    clock_gettime(CLOCK_MONOTONIC, &t0);

    memset(clients, 0, sizeof(clients));
    for (int i = 0; i < CLIENTS; i++)
        if (pthread_create(&clients[i].thread, NULL, client_main,
                           &clients[i]) != 0) {
            fprintf(stderr, "pthread_create failed\n");
            return 1;
        }
    for (int i = 0; i < CLIENTS; i++)
        pthread_join(clients[i].thread, NULL);
    /* The upstream threads end by themselves once their body is written. */
    for (int i = 0; i < upstream.fetches; i++)
        pthread_join(upstream.threads[i], NULL);

    printf("libcoalesce %s: %d client threads request \"%s\" at once\n\n",
           coalesce_version_string(), CLIENTS, KEY);
    printf("caller  role    reply   bytes     first byte  end        body\n");
    for (int i = 0; i < CLIENTS; i++) {
        struct client *c = &clients[i];
        int ok =
            c->status == COALESCE_EOF && c->bytes == BODY_SIZE && c->body_ok;
        failed += !ok;
        joined += c->joined;
        const char *verdict = "ok";
        if (c->status != COALESCE_EOF)
            verdict = coalesce_err_name(c->status);
        else if (!ok)
            verdict = "WRONG BYTES";
        printf("%6d  %-6s  %-6s  %-8zu  %7.1f ms  %7.1f ms  %s\n", i,
               c->joined ? "joined" : "leader", c->reply, c->bytes, c->first_ms,
               c->end_ms, verdict);
    }

    flight_group_stats(group, &st, sizeof(st));
    printf("\ncallers: %d (1 leader expected, %d joined)\n", CLIENTS, joined);
    printf("upstream fetches: %d\n", upstream.fetches);
    printf("bytes: %llu written once by the upstream side, %llu read by "
           "the callers\n",
           (unsigned long long)st.bytes_written,
           (unsigned long long)st.bytes_delivered);
    printf("group stats: flights_started %llu, joins %llu, errors %llu, "
           "timeouts %llu, lagged %llu,\n"
           "             bytes_written %llu, bytes_delivered %llu, "
           "flights_active %llu,\n"
           "             readers_open %llu, segments_held %llu, "
           "bytes_held %llu, orphaned %llu\n",
           (unsigned long long)st.flights_started, (unsigned long long)st.joins,
           (unsigned long long)st.errors, (unsigned long long)st.timeouts,
           (unsigned long long)st.lagged, (unsigned long long)st.bytes_written,
           (unsigned long long)st.bytes_delivered,
           (unsigned long long)st.flights_active,
           (unsigned long long)st.readers_open,
           (unsigned long long)st.segments_held,
           (unsigned long long)st.bytes_held, (unsigned long long)st.orphaned);

    /* Every reader and writer is gone, so this frees the group. */
    flight_group_close(group);
    pthread_barrier_destroy(&start);

    if (failed) {
        printf("\nFAILED: %d caller(s) did not get the exact body\n", failed);
        return 1;
    }
    printf("\nevery caller got the same %zu-byte body from %d upstream "
           "fetch%s\n",
           BODY_SIZE, upstream.fetches, upstream.fetches == 1 ? "" : "es");
    return 0;
}

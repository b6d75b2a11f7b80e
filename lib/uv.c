/*
 * libuv adapter: flight readers served on a loop.
 *
 * A flight's notify callback may run on any thread. It only appends the
 * reader to its adapter's ready list and, if the list was empty, wakes the
 * loop with uv_async_send(); the loop then serves every queued reader with
 * the non-blocking reader calls. Readers are queued at most once, so a burst
 * of writes costs each reader one turn and the writer one wake-up per batch.
 *
 * Within a turn readers are served round robin, FLIGHT_UV_ROUND bytes at a
 * time: with 100 readers of one flight, the first bytes reach all 100
 * before any reader gets its second round, so no reader's time to first
 * byte depends on how much the readers before it had to send.
 */
#include "coalesce_int.h"

#include <pthread.h>

#include <uv.h>

#include "coalesce/uv.h"

/* Circular doubly linked list node; a node alone links to itself. */
typedef struct uv_link {
    struct uv_link *prev, *next;
} uv_link_t;

typedef struct uv_task {
    flight_uv_task_cb fn;
    void *data;
    struct uv_task *next;
} uv_task_t;

struct flight_uv {
    uv_loop_t *loop;
    uv_async_t async;
    pthread_mutex_t mu;
    /* Under mu: readers waiting for a turn, posted tasks, closing flag. */
    uv_link_t ready;
    uv_task_t *tasks;
    uv_task_t **tasks_tail;
    bool closing;
    /* Loop thread only. */
    unsigned nreaders;
};

struct flight_uv_reader {
    uv_link_t link; /* In a ready list or a turn's batch, under u->mu. */
    bool queued;    /* Under u->mu. */
    flight_uv_t *u;
    flight_reader_t *r;
    flight_uv_meta_cb meta_cb;
    flight_uv_data_cb data_cb;
    flight_uv_end_cb end_cb;
    void *data;
    uv_timer_t timer; /* The waiter's deadline; initialised on first use. */
    bool timer_init;
    bool started;
    bool meta_done;
    bool ended;
    bool closed;
    bool serving;      /* Inside serve(): free only when it returns. */
    size_t turn_bytes; /* Delivered in this loop turn. */
};

/* Bytes per reader per round; a larger segment is delivered in pieces. */
#define FLIGHT_UV_ROUND (64 * 1024)
/* Bytes per loop turn over all readers; the rest waits for the next turn,
 * after the loop has polled its other handles. */
#define FLIGHT_UV_TURN (16 * 1024 * 1024)

static void link_init(uv_link_t *l)
{
    l->prev = l->next = l;
}

static bool link_empty(const uv_link_t *l)
{
    return l->next == l;
}

static void link_append(uv_link_t *head, uv_link_t *l)
{
    l->prev = head->prev;
    l->next = head;
    head->prev->next = l;
    head->prev = l;
}

static void link_remove(uv_link_t *l)
{
    l->prev->next = l->next;
    l->next->prev = l->prev;
    link_init(l);
}

/* Moves every node of @p from to the end of @p to. */
static void link_splice(uv_link_t *to, uv_link_t *from)
{
    if (link_empty(from))
        return;
    from->next->prev = to->prev;
    to->prev->next = from->next;
    from->prev->next = to;
    to->prev = from->prev;
    link_init(from);
}

#define READER_OF(l)                                                           \
    ((flight_uv_reader_t *)(void *)((char *)(l)-offsetof(flight_uv_reader_t,   \
                                                         link)))

/* Queue @p ur for a turn; any thread. The loop is woken only when the list
 * goes from empty to non-empty: later readers ride on the same wake-up. */
static void enqueue(flight_uv_reader_t *ur)
{
    flight_uv_t *u = ur->u;
    bool wake = false;
    pthread_mutex_lock(&u->mu);
    if (!ur->queued) {
        wake = link_empty(&u->ready) && !u->tasks;
        ur->queued = true;
        link_append(&u->ready, &ur->link);
    }
    pthread_mutex_unlock(&u->mu);
    if (wake)
        uv_async_send(&u->async);
}

/* The flight's notify callback: runs on the writer's thread. */
static void on_notify(flight_reader_t *r, void *data)
{
    COALESCE__UNUSED(r);
    enqueue(data);
}

static void free_reader(flight_uv_reader_t *ur)
{
    coalesce__free(ur);
}

static void on_timer_closed(uv_handle_t *h)
{
    free_reader(h->data);
}

static void deliver_end(flight_uv_reader_t *ur, int status)
{
    ur->ended = true;
    if (ur->timer_init)
        uv_timer_stop(&ur->timer);
    ur->end_cb(ur, status);
}

static void on_deadline(uv_timer_t *t);

/* Arms a timer for a waiter's deadline, so it is told without polling. */
static void arm_deadline(flight_uv_reader_t *ur)
{
    int64_t ms = ur->meta_done ? -1 : flight_reader_deadline_ms(ur->r);
    if (ms < 0) {
        if (ur->timer_init)
            uv_timer_stop(&ur->timer);
        return;
    }
    if (!ur->timer_init) {
        if (uv_timer_init(ur->u->loop, &ur->timer) != 0)
            return; /* Cannot happen in libuv; the next turn checks anyway. */
        ur->timer.data = ur;
        ur->timer_init = true;
    }
    /* libuv's clock has millisecond steps: one more keeps it from firing a
     * hair early; an early turn would only re-arm. */
    uv_timer_start(&ur->timer, on_deadline, (uint64_t)ms + 1, 0);
}

/* Arms the flight's notification; true if the reader is ready already. */
static bool arm(flight_uv_reader_t *ur)
{
    return flight_reader_notify(ur->r, on_notify, ur) == 1;
}

/* One round of a reader: deliver up to FLIGHT_UV_ROUND bytes, or re-arm
 * when nothing is there. Returns true if it may have more right now.
 * Callbacks may stop or close the reader. */
static bool serve(flight_uv_reader_t *ur, size_t *delivered)
{
    if (ur->closed || ur->ended || !ur->started)
        return false;
    ur->serving = true;
    bool more = false;
    size_t budget = FLIGHT_UV_ROUND;
    for (;;) {
        int rc;
        if (!ur->meta_done) {
            const void *meta;
            size_t len;
            rc = flight_meta(ur->r, 0, &meta, &len);
            if (rc == COALESCE_EAGAIN) {
                if (arm(ur))
                    continue;
                break;
            }
            if (rc < 0) {
                deliver_end(ur, rc);
                break;
            }
            ur->meta_done = true;
            if (ur->meta_cb) {
                ur->meta_cb(ur, meta, len);
                if (ur->closed || !ur->started)
                    break;
            }
        }
        const void *p;
        size_t n;
        coalesce_buf_t *owner;
        rc = flight_peek(ur->r, 0, &p, &n, &owner);
        if (rc == COALESCE_EAGAIN) {
            if (arm(ur))
                continue;
            break;
        }
        if (rc < 0) {
            deliver_end(ur, rc == COALESCE_EOF ? 0 : rc);
            break;
        }
        if (n > budget)
            n = budget;
        ur->data_cb(ur, p, n, owner);
        if (ur->closed)
            break;
        /* A detach meanwhile shows on the next peek. */
        (void)flight_consume(ur->r, n);
        ur->turn_bytes += n;
        *delivered += n;
        if (!ur->started)
            break;
        if ((budget -= n) == 0) {
            more = true; /* The others get their round first. */
            break;
        }
    }
    ur->serving = false;
    if (!ur->closed) {
        if (!ur->ended)
            arm_deadline(ur);
    } else if (!ur->timer_init) {
        free_reader(ur);
        return false;
    }
    return more;
}

static void on_deadline(uv_timer_t *t)
{
    flight_uv_reader_t *ur = t->data;
    size_t n = 0;
    ur->turn_bytes = 0;
    if (serve(ur, &n))
        enqueue(ur);
}

/* Runs up to @p n posted tasks, one at a time, so that a task calling
 * flight_uv_close() finds the rest still queued and runs them itself. */
static void run_tasks(flight_uv_t *u, size_t n)
{
    while (n--) {
        pthread_mutex_lock(&u->mu);
        uv_task_t *t = u->tasks;
        if (t && !(u->tasks = t->next))
            u->tasks_tail = &u->tasks;
        pthread_mutex_unlock(&u->mu);
        if (!t)
            return;
        t->fn(t->data);
        coalesce__free(t);
    }
}

static void on_async(uv_async_t *h)
{
    flight_uv_t *u = h->data;
    uv_link_t batch;
    link_init(&batch);
    size_t ntasks = 0;
    pthread_mutex_lock(&u->mu);
    link_splice(&batch, &u->ready);
    for (uv_task_t *t = u->tasks; t; t = t->next)
        ntasks++;
    pthread_mutex_unlock(&u->mu);
    /* Only the tasks there now: one that posts itself waits a turn. */
    run_tasks(u, ntasks);
    for (uv_link_t *l = batch.next; l != &batch; l = l->next)
        READER_OF(l)->turn_bytes = 0;
    size_t turn = 0;
    /* One at a time under the lock: a callback may close a reader that is
     * still in the batch, and closing unlinks it. */
    for (;;) {
        pthread_mutex_lock(&u->mu);
        if (link_empty(&batch)) {
            pthread_mutex_unlock(&u->mu);
            break;
        }
        if (turn >= FLIGHT_UV_TURN) {
            /* Enough for one turn: the rest first in line for the next. */
            uv_link_t rest;
            link_init(&rest);
            link_splice(&rest, &u->ready);
            link_splice(&batch, &rest);
            link_splice(&u->ready, &batch);
            pthread_mutex_unlock(&u->mu);
            break;
        }
        flight_uv_reader_t *ur = READER_OF(batch.next);
        link_remove(&ur->link);
        ur->queued = false;
        pthread_mutex_unlock(&u->mu);
        if (!serve(ur, &turn))
            continue;
        /* More is there: another round in this turn, at the back of the
         * batch, until the reader has had FLIGHT_UV_BATCH bytes; then the
         * loop's other handles get their turn first. */
        if (ur->turn_bytes >= FLIGHT_UV_BATCH) {
            enqueue(ur);
            continue;
        }
        pthread_mutex_lock(&u->mu);
        if (!ur->queued) {
            ur->queued = true;
            link_append(&batch, &ur->link);
        }
        pthread_mutex_unlock(&u->mu);
    }
    /* What was queued meanwhile without a wake-up of its own (a post or a
     * notify while tasks were still listed, or the rest of a full turn). */
    pthread_mutex_lock(&u->mu);
    bool again = !u->closing && (!link_empty(&u->ready) || u->tasks);
    pthread_mutex_unlock(&u->mu);
    if (again)
        uv_async_send(&u->async);
}

int flight_uv_new(flight_uv_t **out, uv_loop_t *loop)
{
    if (!out || !loop)
        return COALESCE_EINVAL;
    flight_uv_t *u = coalesce__calloc(1, sizeof(*u));
    if (!u)
        return COALESCE_ENOMEM;
    if (pthread_mutex_init(&u->mu, NULL) != 0) {
        coalesce__free(u);
        return COALESCE_ENOMEM;
    }
    if (uv_async_init(loop, &u->async, on_async) != 0) {
        pthread_mutex_destroy(&u->mu);
        coalesce__free(u);
        return COALESCE_EIO;
    }
    u->async.data = u;
    u->loop = loop;
    link_init(&u->ready);
    u->tasks_tail = &u->tasks;
    *out = u;
    return 0;
}

static void on_async_closed(uv_handle_t *h)
{
    flight_uv_t *u = h->data;
    pthread_mutex_destroy(&u->mu);
    coalesce__free(u);
}

int flight_uv_close(flight_uv_t *u)
{
    if (!u)
        return 0;
    if (u->nreaders)
        return COALESCE_EBUSY;
    pthread_mutex_lock(&u->mu);
    if (u->closing) {
        /* A second close before the loop freed it: an error, not a
         * second uv_close() on the same handle. */
        pthread_mutex_unlock(&u->mu);
        return COALESCE_ECLOSING;
    }
    u->closing = true;
    pthread_mutex_unlock(&u->mu);
    run_tasks(u, SIZE_MAX);
    uv_close((uv_handle_t *)&u->async, on_async_closed);
    return 0;
}

int flight_uv_post(flight_uv_t *u, flight_uv_task_cb fn, void *data)
{
    if (!u || !fn)
        return COALESCE_EINVAL;
    uv_task_t *t = coalesce__malloc(sizeof(*t));
    if (!t)
        return COALESCE_ENOMEM;
    t->fn = fn;
    t->data = data;
    t->next = NULL;
    pthread_mutex_lock(&u->mu);
    if (u->closing) {
        pthread_mutex_unlock(&u->mu);
        coalesce__free(t);
        return COALESCE_ECLOSING;
    }
    bool wake = link_empty(&u->ready) && !u->tasks;
    *u->tasks_tail = t;
    u->tasks_tail = &t->next;
    /* Sent under the lock so that it cannot race with uv_close(). */
    if (wake)
        uv_async_send(&u->async);
    pthread_mutex_unlock(&u->mu);
    return 0;
}

int flight_uv_reader_new(flight_uv_reader_t **out,
                         flight_uv_t *u,
                         flight_reader_t *r)
{
    if (!out || !u || !r)
        return COALESCE_EINVAL;
    if (u->closing)
        return COALESCE_ECLOSING;
    flight_uv_reader_t *ur = coalesce__calloc(1, sizeof(*ur));
    if (!ur)
        return COALESCE_ENOMEM;
    link_init(&ur->link);
    ur->u = u;
    ur->r = r;
    u->nreaders++;
    *out = ur;
    return 0;
}

int flight_uv_read_start(flight_uv_reader_t *ur,
                         flight_uv_meta_cb meta_cb,
                         flight_uv_data_cb data_cb,
                         flight_uv_end_cb end_cb)
{
    if (!ur || !data_cb || !end_cb || ur->ended || ur->closed)
        return COALESCE_EINVAL;
    ur->meta_cb = meta_cb;
    ur->data_cb = data_cb;
    ur->end_cb = end_cb;
    if (!ur->started) {
        ur->started = true;
        enqueue(ur); /* Delivered from the next turn, never from here. */
    }
    return 0;
}

int flight_uv_read_stop(flight_uv_reader_t *ur)
{
    if (!ur)
        return COALESCE_EINVAL;
    ur->started = false;
    return 0;
}

flight_reader_t *flight_uv_reader_flight(flight_uv_reader_t *ur)
{
    return ur ? ur->r : NULL;
}

void flight_uv_reader_set_data(flight_uv_reader_t *ur, void *data)
{
    if (ur)
        ur->data = data;
}

void *flight_uv_reader_get_data(const flight_uv_reader_t *ur)
{
    return ur ? ur->data : NULL;
}

void flight_uv_reader_close(flight_uv_reader_t *ur)
{
    if (!ur || ur->closed)
        return;
    flight_uv_t *u = ur->u;
    ur->closed = true;
    ur->started = false;
    /* Waits for a notify callback running on another thread; none runs
     * after this, so nothing can queue the reader again. */
    flight_reader_close(ur->r);
    ur->r = NULL;
    pthread_mutex_lock(&u->mu);
    if (ur->queued) {
        link_remove(&ur->link);
        ur->queued = false;
    }
    pthread_mutex_unlock(&u->mu);
    u->nreaders--;
    if (ur->timer_init)
        uv_close((uv_handle_t *)&ur->timer, on_timer_closed);
    else if (!ur->serving)
        free_reader(ur);
}

/*
 * libcoalesce: stop duplicate work against slow upstreams.
 *
 * Umbrella header: includes every core module. Two headers are included
 * separately: <coalesce/uv.h>, the libuv adapter (in libcoalesce, but it
 * pulls in <uv.h>), and <coalesce/etcd.h>, the etcd store (a separate
 * library, libcoalesce-etcd).
 *
 * Threading (applies to every module): flight groups, caches and stores are
 * thread-safe; flight readers and writers belong to one thread at a time and
 * may be handed between threads; a flight_uv_t and its readers belong to
 * their loop's thread; buffers' reference counts are atomic. No user
 * callback is ever called with a library lock held. Each header says which
 * thread runs each of its callbacks.
 */
#ifndef COALESCE_H
#define COALESCE_H

#include "coalesce/version.h"
#include "coalesce/common.h"
#include "coalesce/buf.h"
#include "coalesce/flight.h"
#include "coalesce/store.h"
#include "coalesce/cache.h"

#endif /* COALESCE_H */

/*
 * libcoalesce: stop duplicate work against slow upstreams.
 *
 * Umbrella header: includes every core module. The libuv adapter, once
 * present, is included separately as <coalesce/uv.h>.
 *
 * Threading (applies to every module): groups are thread-safe; readers and
 * writers belong to one thread at a time and may be handed between threads;
 * buffers' reference counts are atomic. No user callback is ever called with
 * a library lock held.
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

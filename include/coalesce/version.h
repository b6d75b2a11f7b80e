/*
 * libcoalesce version numbers.
 *
 * This file is the single source of the version: the Makefile reads it to
 * name the shared library and to fill in the pkg-config file.
 */
#ifndef COALESCE_VERSION_H
#define COALESCE_VERSION_H

#define COALESCE_VERSION_MAJOR  0
#define COALESCE_VERSION_MINOR  5
#define COALESCE_VERSION_PATCH  0
#define COALESCE_VERSION_STRING "0.5.0"

/** (major << 16) | (minor << 8) | patch, for numeric comparisons. */
#define COALESCE_VERSION_HEX                                                   \
    ((COALESCE_VERSION_MAJOR << 16) | (COALESCE_VERSION_MINOR << 8) |          \
     COALESCE_VERSION_PATCH)

#endif /* COALESCE_VERSION_H */

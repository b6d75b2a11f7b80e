# libcoalesce - GNU make.
#
#   make            shared + static library + pkg-config file
#   make demo       build and run the demo (installs missing Debian packages)
#   make check      tests, export check, core/uv check, examples
#   make bench      benchmarks, printed as "BENCH <name> <median> <unit>"
#   make asan ubsan tsan valgrind     the test suite under each tool
#   make stress     8 threads x 1M mixed operations, under ASan and TSan
#   make fuzz FUZZ_SECONDS=N [FUZZ_RUNS=M]   each libFuzzer target (clang)
#   make install / uninstall          honour DESTDIR, PREFIX, LIBDIR, ...

VERSION_H := include/coalesce/version.h
vpart = $(shell sed -n 's/^\#[ \t]*define[ \t][ \t]*COALESCE_VERSION_$(1)[ \t][ \t]*\([0-9][0-9]*\).*/\1/p' $(VERSION_H))
MAJOR := $(call vpart,MAJOR)
MINOR := $(call vpart,MINOR)
PATCH := $(call vpart,PATCH)
VERSION := $(MAJOR).$(MINOR).$(PATCH)
ifeq ($(words $(MAJOR) $(MINOR) $(PATCH)),3)
else
$(error cannot read the version from $(VERSION_H))
endif

PREFIX ?= /usr/local
LIBDIR ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig
MANDIR ?= $(PREFIX)/share/man
AR ?= ar
LD ?= ld
OBJCOPY ?= objcopy
INSTALL ?= install
CFLAGS ?= -O2 -g
WERROR ?= 1
BUILD ?= build
# Sanitizer flags, set by the asan/ubsan/tsan targets.
SAN ?=

ifneq ($(V),1)
Q := @
endif

WARN := -Wall -Wextra -pedantic -Wstrict-prototypes -Wmissing-prototypes \
	-Wold-style-definition -Wshadow -Wwrite-strings -Wpointer-arith \
	-Wformat=2 -Wundef -Wvla -Wcast-align
ifeq ($(WERROR),1)
WARN += -Werror
endif
# The project's own flags come first and cannot be removed by CFLAGS.
COALESCE_CFLAGS := -std=c11 -fPIC -fvisibility=hidden $(WARN) -Iinclude -Ilib
ALL_CFLAGS = $(COALESCE_CFLAGS) $(CPPFLAGS) $(CFLAGS) $(SAN)
LIBS := -luv -lpthread

SRCS := lib/common.c lib/buf.c lib/flight.c lib/uv.c lib/memstore.c lib/cache.c
OBJS := $(SRCS:lib/%.c=$(BUILD)/obj/%.o)
HDRS := $(wildcard include/*.h include/coalesce/*.h lib/*.h)

SONAME := libcoalesce.so.$(MAJOR)
SHLIB := $(BUILD)/libcoalesce.so.$(VERSION)
STLIB := $(BUILD)/libcoalesce.a
PC := $(BUILD)/libcoalesce.pc
PC_DEV := $(BUILD)/uninstalled/libcoalesce.pc

# libcoalesce-etcd: the etcd store, a separate library over libcurl and
# jansson so that hosts without etcd never link them.
ETCD_SRCS := lib/etcdstore.c
ETCD_OBJS := $(ETCD_SRCS:lib/%.c=$(BUILD)/obj/%.o)
ETCD_SONAME := libcoalesce-etcd.so.$(MAJOR)
ETCD_SHLIB := $(BUILD)/libcoalesce-etcd.so.$(VERSION)
ETCD_STLIB := $(BUILD)/libcoalesce-etcd.a
ETCD_PC := $(BUILD)/libcoalesce-etcd.pc
ETCD_PC_DEV := $(BUILD)/uninstalled/libcoalesce-etcd.pc
# Expanded by the shell in recipes, after the packages are installed.
ETCD_DEPLIBS = $$(pkg-config --libs libcurl jansson)

TEST_SRCS := $(wildcard test/check_*.c) test/helpers.c test/etcd_env.c test/e2e.c
TEST_BIN := $(BUILD)/test/check_coalesce
BENCH_SRCS := $(wildcard test/bench/*.c)
BENCH_BINS := $(BENCH_SRCS:test/bench/%.c=$(BUILD)/bench/%)
EXAMPLE_SRCS := $(wildcard examples/*.c)
EXAMPLE_BINS := $(EXAMPLE_SRCS:examples/%.c=$(BUILD)/examples/%)

# Debian packages each job needs; test/deps.sh installs the missing ones.
DEPS_BUILD := gcc libc6-dev make pkgconf libxxhash-dev libuv1-dev \
	libcurl4-openssl-dev libjansson-dev
DEPS_EXAMPLES := $(DEPS_BUILD) libhttp-parser-dev
DEPS_TEST := $(DEPS_EXAMPLES) check binutils etcd-server openssl
DEPS_BENCH := $(DEPS_TEST) wrk
DEPS_FUZZ := $(DEPS_TEST) clang libclang-rt-dev
NEED = sh test/deps.sh

.PHONY: all shared static pc check test-run check-exports check-core-no-uv \
	check-cxx examples demo bench install uninstall clean asan ubsan tsan \
	valgrind format format-check docs deps-build deps-examples deps-test \
	deps-bench deps-valgrind deps-fuzz stress stress-run fuzz fuzz-build \
	FORCE

all: shared static pc

deps-build:
	$(Q)$(NEED) $(DEPS_BUILD)
deps-examples:
	$(Q)$(NEED) $(DEPS_EXAMPLES)
deps-test:
	$(Q)$(NEED) $(DEPS_TEST)
deps-bench:
	$(Q)$(NEED) $(DEPS_BENCH)
deps-valgrind:
	$(Q)$(NEED) $(DEPS_TEST) valgrind
deps-fuzz:
	$(Q)$(NEED) $(DEPS_FUZZ)

shared: $(SHLIB) $(ETCD_SHLIB)
static: $(STLIB) $(ETCD_STLIB)
pc: $(PC) $(PC_DEV) $(ETCD_PC) $(ETCD_PC_DEV)

$(BUILD)/obj/%.o: lib/%.c $(HDRS) | deps-build
	@mkdir -p $(@D)
	@$(if $(Q),echo "  CC      $<")
	$(Q)$(CC) $(ALL_CFLAGS) $(OBJ_CFLAGS) -c $< -o $@

$(ETCD_OBJS): OBJ_CFLAGS = $$(pkg-config --cflags libcurl jansson)

$(SHLIB): $(OBJS) lib/libcoalesce.map
	@$(if $(Q),echo "  LINK    $@")
	$(Q)$(CC) -shared -Wl,-soname,$(SONAME) \
		-Wl,--version-script=lib/libcoalesce.map -Wl,--no-undefined \
		$(CFLAGS) $(SAN) $(LDFLAGS) -o $@ $(OBJS) $(LIBS) $(LDLIBS)
	$(Q)ln -sf $(notdir $@) $(BUILD)/$(SONAME)
	$(Q)ln -sf $(SONAME) $(BUILD)/libcoalesce.so

# One relocatable object with hidden symbols made local, so that the archive
# exports exactly what the shared library does.
$(STLIB): $(OBJS)
	@$(if $(Q),echo "  AR      $@")
	$(Q)$(LD) -r -o $(BUILD)/coalesce_all.o $(OBJS)
	$(Q)$(OBJCOPY) --localize-hidden $(BUILD)/coalesce_all.o
	$(Q)rm -f $@ && $(AR) rcs $@ $(BUILD)/coalesce_all.o

$(ETCD_SHLIB): $(ETCD_OBJS) lib/libcoalesce-etcd.map
	@$(if $(Q),echo "  LINK    $@")
	$(Q)$(CC) -shared -Wl,-soname,$(ETCD_SONAME) \
		-Wl,--version-script=lib/libcoalesce-etcd.map -Wl,--no-undefined \
		$(CFLAGS) $(SAN) $(LDFLAGS) -o $@ $(ETCD_OBJS) $(ETCD_DEPLIBS) \
		$(LIBS) $(LDLIBS)
	$(Q)ln -sf $(notdir $@) $(BUILD)/$(ETCD_SONAME)
	$(Q)ln -sf $(ETCD_SONAME) $(BUILD)/libcoalesce-etcd.so

$(ETCD_STLIB): $(ETCD_OBJS)
	@$(if $(Q),echo "  AR      $@")
	$(Q)$(LD) -r -o $(BUILD)/coalesce_etcd_all.o $(ETCD_OBJS)
	$(Q)$(OBJCOPY) --localize-hidden $(BUILD)/coalesce_etcd_all.o
	$(Q)rm -f $@ && $(AR) rcs $@ $(BUILD)/coalesce_etcd_all.o

# The .pc files are regenerated when the install paths change.
$(BUILD)/paths.stamp: FORCE
	@mkdir -p $(@D)
	@echo "$(PREFIX)|$(LIBDIR)|$(INCLUDEDIR)|$(VERSION)" | cmp -s - $@ 2>/dev/null || \
		echo "$(PREFIX)|$(LIBDIR)|$(INCLUDEDIR)|$(VERSION)" > $@

$(BUILD)/%.pc: pkgconfig/%.pc.in $(BUILD)/paths.stamp
	$(Q)sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@LIBDIR@|$(LIBDIR)|' \
		-e 's|@INCLUDEDIR@|$(INCLUDEDIR)|' -e 's|@VERSION@|$(VERSION)|' $< > $@

# A .pc file pointing into this tree, for the examples and the smoke test.
$(BUILD)/uninstalled/%.pc: pkgconfig/%.pc.in $(BUILD)/paths.stamp
	@mkdir -p $(@D)
	$(Q)sed -e 's|@PREFIX@|$(CURDIR)|' -e 's|@LIBDIR@|$(abspath $(BUILD))|' \
		-e 's|@INCLUDEDIR@|$(CURDIR)/include|' -e 's|@VERSION@|$(VERSION)|' $< > $@

# --- Tests -------------------------------------------------------------------

# The proxy suite runs the example proxy and origin, built with the same flags.
E2E_BINS := $(BUILD)/examples/proxy $(BUILD)/examples/origin
E2E_CFLAGS = -DE2E_BINDIR='"$(abspath $(BUILD))/examples"'
$(TEST_BIN): $(TEST_SRCS) test/helpers.h test/etcd_env.h test/e2e.h $(STLIB) \
		$(ETCD_STLIB) $(HDRS) $(E2E_BINS) | deps-test
	@mkdir -p $(@D)
	@$(if $(Q),echo "  CC      $@")
	$(Q)$(CC) $(ALL_CFLAGS) -Wno-missing-prototypes $$(pkg-config --cflags check) \
		$(E2E_CFLAGS) -Itest -o $@ $(TEST_SRCS) $(ETCD_STLIB) $(STLIB) \
		$$(pkg-config --libs check) $(ETCD_DEPLIBS) -lhttp_parser $(LIBS) \
		$(LDFLAGS) $(LDLIBS)

test-run: $(TEST_BIN)
	$(Q)$(TEST_BIN)

check: deps-test all test-run check-exports check-core-no-uv check-cxx examples
	@echo "check: all passed"

# The exported dynamic symbols of each library must be exactly the functions
# its headers declare (with COALESCE_API, or COALESCE_ETCD_API).
# $(call exports,library,macro,name)
define exports
	$(Q)cat include/coalesce/*.h | grep -v '^ *#' | tr '\n' ' ' | tr ';' '\n' | \
		grep '$(2)' | sed -E 's/.*$(2)//; s/\(.*//; s/.*[ *]//' | grep . | sort -u \
		> $(BUILD)/$(3).declared
	$(Q)nm -D --defined-only $(1) | awk '$$2 ~ /^[TDBR]$$/ {print $$3}' | \
		sed 's/@.*//' | grep -v '^COALESCE_\(ETCD_\)\?0$$' | sort -u > $(BUILD)/$(3).actual
	$(Q)if ! diff -u $(BUILD)/$(3).declared $(BUILD)/$(3).actual; then \
		echo "check-exports: $(3): exported symbols differ from include/"; exit 1; fi
	@echo "check-exports: $(3): $$(wc -l < $(BUILD)/$(3).actual) symbols, as declared"
endef
check-exports: $(SHLIB) $(ETCD_SHLIB)
	$(call exports,$(SHLIB),COALESCE_API,libcoalesce)
	$(call exports,$(ETCD_SHLIB),COALESCE_ETCD_API,libcoalesce-etcd)

# The core never includes <uv.h>; only the libuv adapter may.
check-core-no-uv:
	$(Q)if grep -l '#include <uv.h>' lib/*.c lib/*.h include/coalesce.h \
		include/coalesce/*.h | grep -v -e 'lib/uv.c' -e 'coalesce/uv.h'; \
		then echo "check-core-no-uv: core file includes <uv.h>"; exit 1; fi

# Public headers must compile as C++ too.
check-cxx:
	$(Q)printf '#include <coalesce.h>\n#include <coalesce/etcd.h>\n#include <coalesce/uv.h>\n' | $(CXX) -x c++ -std=c++11 -Wall -Wextra \
		-Werror -pedantic -Iinclude -fsyntax-only -
	@echo "check-cxx: headers compile as C++"

# Examples build through pkg-config against the libraries just built; those
# named etcd_* use libcoalesce-etcd; the proxy and its origin also use libuv,
# http-parser (no .pc file in Debian) and, for the proxy, libcurl.
EXAMPLE_PC = $(if $(filter etcd_%,$(notdir $@)),libcoalesce-etcd,libcoalesce) \
	$(if $(filter proxy origin,$(notdir $@)),libuv) \
	$(if $(filter proxy,$(notdir $@)),libcurl)
EXAMPLE_LIBS = $(if $(filter proxy origin,$(notdir $@)),-lhttp_parser)
$(BUILD)/examples/%: examples/%.c $(SHLIB) $(ETCD_SHLIB) $(PC_DEV) $(ETCD_PC_DEV) \
		$(HDRS) | deps-examples
	@mkdir -p $(@D)
	@$(if $(Q),echo "  CC      $@")
	$(Q)$(CC) -std=c11 $(WARN) $(CFLAGS) $(SAN) \
		$$(PKG_CONFIG_PATH=$(BUILD)/uninstalled pkg-config --cflags $(EXAMPLE_PC)) \
		-o $@ $< -Wl,-rpath,$(abspath $(BUILD)) \
		$$(PKG_CONFIG_PATH=$(BUILD)/uninstalled pkg-config --libs $(EXAMPLE_PC)) \
		$(EXAMPLE_LIBS) -lpthread

examples: $(EXAMPLE_BINS)

# The demo: origin and proxy on 127.0.0.1, 100 cold GETs and 50 ranges.
DEMO_BIN := $(BUILD)/test/demo
$(DEMO_BIN): test/demo.c test/e2e.c test/e2e.h $(E2E_BINS) | deps-examples
	@mkdir -p $(@D)
	@$(if $(Q),echo "  CC      $@")
	$(Q)$(CC) $(ALL_CFLAGS) -Wno-missing-prototypes $(E2E_CFLAGS) -Itest -o $@ \
		test/demo.c test/e2e.c -lhttp_parser $(LIBS) $(LDFLAGS) $(LDLIBS)

demo: deps-examples $(DEMO_BIN)
	$(Q)$(DEMO_BIN)

# --- Benchmarks ----------------------------------------------------------------

# bench_etcd starts its own etcd with the tests' helpers (test/etcd_env.c).
BENCH_EXTRA = $(if $(filter bench_etcd,$(notdir $@)),test/etcd_env.c \
	$(ETCD_STLIB) $(ETCD_DEPLIBS)) \
	$(if $(filter bench_proxy,$(notdir $@)),$(E2E_CFLAGS) test/e2e.c -lhttp_parser)
$(BUILD)/bench/%: test/bench/%.c test/bench/bench.h test/etcd_env.h \
		test/etcd_env.c test/e2e.h test/e2e.c $(STLIB) $(ETCD_STLIB) $(HDRS) \
		$(E2E_BINS)
	@mkdir -p $(@D)
	@$(if $(Q),echo "  CC      $@")
	$(Q)$(CC) $(ALL_CFLAGS) -Wno-missing-prototypes -Itest -o $@ $< \
		$(BENCH_EXTRA) $(STLIB) $(LIBS) $(LDFLAGS) $(LDLIBS)

bench: deps-bench $(BENCH_BINS)
	$(Q)for b in $(BENCH_BINS); do $$b || exit 1; done

# --- Sanitizers and valgrind ---------------------------------------------------

SANFLAGS_COMMON := -g -fno-omit-frame-pointer
asan:
	$(Q)$(MAKE) --no-print-directory BUILD=build/asan CFLAGS="-O1" \
		SAN="$(SANFLAGS_COMMON) -fsanitize=address" test-run
ubsan:
	$(Q)$(MAKE) --no-print-directory BUILD=build/ubsan CFLAGS="-O1" \
		SAN="$(SANFLAGS_COMMON) -fsanitize=undefined -fno-sanitize-recover=all" test-run
tsan:
	$(Q)$(MAKE) --no-print-directory BUILD=build/tsan CFLAGS="-O1" \
		SAN="$(SANFLAGS_COMMON) -fsanitize=thread" test-run
valgrind: deps-valgrind $(TEST_BIN)
	$(Q)CK_FORK=no CK_VALGRIND=1 valgrind -q --leak-check=full \
		--errors-for-leak-kinds=definite,indirect --error-exitcode=1 $(TEST_BIN)

# --- Stress ----------------------------------------------------------------------

# test/stress.c: one group and one cache shared by 8 threads, bounded in
# operations and time; run under ASan and under TSan.
STRESS_BIN := $(BUILD)/test/stress
$(STRESS_BIN): test/stress.c test/helpers.h $(STLIB) $(HDRS) | deps-test
	@mkdir -p $(@D)
	@$(if $(Q),echo "  CC      $@")
	$(Q)$(CC) $(ALL_CFLAGS) -Wno-missing-prototypes -Itest -o $@ $< $(STLIB) \
		$(LIBS) $(LDFLAGS) $(LDLIBS)
stress-run: $(STRESS_BIN)
	$(Q)$(STRESS_BIN) $(STRESS_ARGS)
stress:
	$(Q)$(MAKE) --no-print-directory BUILD=build/asan CFLAGS="-O1" \
		SAN="$(SANFLAGS_COMMON) -fsanitize=address" stress-run
	$(Q)$(MAKE) --no-print-directory BUILD=build/tsan CFLAGS="-O1" \
		SAN="$(SANFLAGS_COMMON) -fsanitize=thread" stress-run

# --- Fuzzers -------------------------------------------------------------------

# libFuzzer targets test/fuzz/fuzz_<name>.c, built with clang under ASan and
# UBSan and linked with the library's objects (so a harness may reach
# internal functions); seed corpora in test/fuzz/<name>/. Each run works on
# a scratch corpus under the build directory, so the tree stays clean; an
# optional test/fuzz/<name>.dict gives libFuzzer the format's tokens.
FUZZ_NAMES := $(patsubst test/fuzz/fuzz_%.c,%,$(wildcard test/fuzz/fuzz_*.c))
# FUZZ=name selects one target.
FUZZ_SEL = $(or $(FUZZ),$(FUZZ_NAMES))
FUZZ_BINS = $(FUZZ_SEL:%=$(BUILD)/fuzz/fuzz_%)
FUZZ_SECONDS ?= 30
FUZZ_RUNS ?= -1
FUZZ_BUILD ?= build/fuzz
FUZZ_SAN := $(SANFLAGS_COMMON) -fsanitize=address,undefined \
	-fno-sanitize-recover=all
FUZZ_EXTRA = $(if $(filter fuzz_etcd,$(notdir $@)),$(ETCD_DEPLIBS)) \
	$(if $(filter fuzz_proxy,$(notdir $@)),$$(pkg-config --cflags --libs \
	libcurl) -lhttp_parser)
$(BUILD)/fuzz/fuzz_%: test/fuzz/fuzz_%.c $(wildcard test/fuzz/*.h) $(OBJS) \
		$(ETCD_OBJS) $(HDRS) $(wildcard examples/*.c)
	@mkdir -p $(@D)
	@$(if $(Q),echo "  CC      $@")
	$(Q)$(CC) $(ALL_CFLAGS) -Wno-missing-prototypes -fsanitize=fuzzer \
		-Itest -Itest/fuzz -o $@ $< $(OBJS) $(FUZZ_EXTRA) $(LIBS) \
		$(LDFLAGS) $(LDLIBS)
fuzz-build: $(FUZZ_BINS)
fuzz: deps-fuzz
	$(Q)$(MAKE) --no-print-directory BUILD=$(FUZZ_BUILD) CC=clang CFLAGS="-O1" \
		SAN="$(FUZZ_SAN) -fsanitize=fuzzer-no-link" fuzz-build
	$(Q)for n in $(FUZZ_SEL); do \
		work=$(FUZZ_BUILD)/corpus/$$n; mkdir -p $$work $(FUZZ_BUILD)/artifacts; \
		dict=; [ -f test/fuzz/$$n.dict ] && dict=-dict=test/fuzz/$$n.dict; \
		$(FUZZ_BUILD)/fuzz/fuzz_$$n $$dict -max_total_time=$(FUZZ_SECONDS) \
			-runs=$(FUZZ_RUNS) -timeout=10 -rss_limit_mb=4096 \
			-print_final_stats=1 -artifact_prefix=$(FUZZ_BUILD)/artifacts/$$n- \
			$$work test/fuzz/$$n > $(FUZZ_BUILD)/$$n.log 2>&1; rc=$$?; \
		runs=$$(sed -n 's/^stat::number_of_executed_units: *//p' $(FUZZ_BUILD)/$$n.log); \
		secs=$$(sed -n 's/^Done [0-9]* runs in \([0-9]*\).*/\1/p' $(FUZZ_BUILD)/$$n.log); \
		echo "FUZZ $$n $${runs:-0} executions in $${secs:-?} s, exit $$rc"; \
		if [ $$rc -ne 0 ]; then tail -60 $(FUZZ_BUILD)/$$n.log; exit 1; fi; \
	done

# --- Install -------------------------------------------------------------------

# install compiles nothing: run "make" first (so "sudo make install" never
# compiles as root). Only the .pc file is regenerated if the paths changed.
install: $(PC) $(ETCD_PC)
	@for f in $(SHLIB) $(STLIB) $(ETCD_SHLIB) $(ETCD_STLIB); do test -f $$f || \
		{ echo "install: $$f is missing; run 'make' first"; exit 1; }; done
	$(INSTALL) -d $(DESTDIR)$(LIBDIR) $(DESTDIR)$(INCLUDEDIR)/coalesce \
		$(DESTDIR)$(PKGCONFIGDIR) $(DESTDIR)$(MANDIR)/man3
	$(INSTALL) -m 0644 include/coalesce.h $(DESTDIR)$(INCLUDEDIR)/
	$(INSTALL) -m 0644 include/coalesce/*.h $(DESTDIR)$(INCLUDEDIR)/coalesce/
	$(INSTALL) -m 0755 $(SHLIB) $(DESTDIR)$(LIBDIR)/
	ln -sf libcoalesce.so.$(VERSION) $(DESTDIR)$(LIBDIR)/$(SONAME)
	ln -sf $(SONAME) $(DESTDIR)$(LIBDIR)/libcoalesce.so
	$(INSTALL) -m 0644 $(STLIB) $(DESTDIR)$(LIBDIR)/
	$(INSTALL) -m 0755 $(ETCD_SHLIB) $(DESTDIR)$(LIBDIR)/
	ln -sf libcoalesce-etcd.so.$(VERSION) $(DESTDIR)$(LIBDIR)/$(ETCD_SONAME)
	ln -sf $(ETCD_SONAME) $(DESTDIR)$(LIBDIR)/libcoalesce-etcd.so
	$(INSTALL) -m 0644 $(ETCD_STLIB) $(DESTDIR)$(LIBDIR)/
	$(INSTALL) -m 0644 $(PC) $(ETCD_PC) $(DESTDIR)$(PKGCONFIGDIR)/
	$(INSTALL) -m 0644 lib/libcoalesce.3 $(DESTDIR)$(MANDIR)/man3/

uninstall:
	rm -f $(DESTDIR)$(INCLUDEDIR)/coalesce.h
	rm -f $(addprefix $(DESTDIR)$(INCLUDEDIR)/coalesce/,$(notdir $(wildcard include/coalesce/*.h)))
	-rmdir $(DESTDIR)$(INCLUDEDIR)/coalesce 2>/dev/null
	rm -f $(DESTDIR)$(LIBDIR)/libcoalesce.so.$(VERSION) \
		$(DESTDIR)$(LIBDIR)/$(SONAME) $(DESTDIR)$(LIBDIR)/libcoalesce.so \
		$(DESTDIR)$(LIBDIR)/libcoalesce.a $(DESTDIR)$(PKGCONFIGDIR)/libcoalesce.pc \
		$(DESTDIR)$(LIBDIR)/libcoalesce-etcd.so.$(VERSION) \
		$(DESTDIR)$(LIBDIR)/$(ETCD_SONAME) $(DESTDIR)$(LIBDIR)/libcoalesce-etcd.so \
		$(DESTDIR)$(LIBDIR)/libcoalesce-etcd.a \
		$(DESTDIR)$(PKGCONFIGDIR)/libcoalesce-etcd.pc \
		$(DESTDIR)$(MANDIR)/man3/libcoalesce.3

# --- Housekeeping ----------------------------------------------------------------

FORMAT_FILES = $(wildcard include/*.h include/coalesce/*.h lib/*.[ch] \
	test/*.[ch] test/bench/*.[ch] test/fuzz/*.[ch] examples/*.c)
format:
	clang-format -i $(FORMAT_FILES)
format-check:
	$(Q)clang-format --dry-run --Werror $(FORMAT_FILES)

docs:
	@if command -v doxygen >/dev/null; then doxygen -g - >/dev/null; \
		echo "docs: doxygen found but no Doxyfile yet; skipped"; \
		else echo "docs: doxygen not installed; skipped"; fi

clean:
	rm -rf build

FORCE:

# aclone: thin wrapper over meson for the README's Quick start.
#
#   make demo     clone a disk holding ext4, read a file from the clone
#   make check    every test stage below, each running what it adds once:
#                   normal    unit and integration tests (all but vm's)
#                   vm        the tests that run qemu: the VM test (the
#                             kernel's NBD client, qemu), qemu-img/qemu-io
#                   valgrind  the unit tests under memcheck
#                   san       unit tests and the integration tests that
#                             drive the core hardest, under ASan+UBSan
#                   tsan      unit and concurrency tests under TSan
#                   fuzz      30 s of libFuzzer on the metadata parser
#                   deb       the Debian packages: build, lint, install,
#                             run the installed binaries
#                 then one summary: each stage, every failed and skipped
#                 test with its reason, and "N passed, N failed, N skipped".
#   make check-mutants   the mutation check (tests/mutants/): each deliberate
#                 bug must fail the tests named in it.  Not in make check
#                 (it would not fit its 8 minutes); CI runs it after it.
#   make check-STAGE     one stage alone, e.g. make check-tsan
#   make check-loaded    make check beside stress-ng (2 CPU hogs, I/O and
#                 1 GiB of memory churn): the suite must stay green
#
# Both install missing Debian packages first (when run as root).

BUILD      ?= build
SAN_BUILD  ?= build-san
TSAN_BUILD ?= build-tsan
DEB_BUILD  ?= build-deb
FUZZ_BUILD ?= build-fuzz
MUTANT_BUILD ?= build-mutants
MESON     ?= meson
SHELL      = /bin/bash

# (nbdfuse comes with libnbd-bin in Debian 12.)
DEBS = gcc pkg-config meson ninja-build python3 \
       nbdkit nbdkit-plugin-dev libnbd-dev libnbd-bin python3-libnbd \
       liburing-dev libbsd-dev libcmocka-dev libjson-c-dev libnl-genl-3-dev \
       qemu-utils e2fsprogs fuse3 util-linux clang libclang-rt-14-dev valgrind \
       openssl systemd dpkg-dev debhelper lintian man-db \
       qemu-system-x86 nbd-client busybox-static cpio kmod

# make check's stages; check-mutants is run beside it (CI runs both).
STAGES = normal vm valgrind san tsan fuzz deb

.PHONY: all deps build demo check check-loaded check-stages check-lane-a check-lane-b check-lane-c \
        $(addprefix check-,$(STAGES)) check-mutants install clean

all: build

deps:
	@missing=""; \
	for p in $(DEBS); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' \
	    || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "Installing Debian packages:$$missing"; \
	    apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else \
	    echo "Missing Debian packages (install them, or run as root):$$missing" >&2; \
	    exit 1; \
	  fi; \
	fi

$(BUILD)/build.ninja:
	$(MESON) setup $(BUILD)

build: deps $(BUILD)/build.ninja
	$(MESON) compile -C $(BUILD)

demo: build
	bash tests/demo.sh

# Where each stage leaves its results (tests/summary.py reads them).
LOG_normal   = $(BUILD)/meson-logs/testlog.json
LOG_vm       = $(BUILD)/meson-logs/vm.json
LOG_valgrind = $(BUILD)/meson-logs/valgrind-valgrind.json
LOG_san      = $(SAN_BUILD)/meson-logs/testlog.json
LOG_tsan     = $(TSAN_BUILD)/meson-logs/testlog.json
LOG_fuzz     = $(FUZZ_BUILD)/meson-logs/testlog.json
LOG_deb      = $(DEB_BUILD)/testlog.json
LOG_mutants  = $(MUTANT_BUILD)/testlog.json

# (--no-rebuild: each stage builds first; the lanes share build/, and two
# ninjas must not run in one build directory at once.)
MESON_TEST = $(MESON) test --no-rebuild --print-errorlogs --num-processes 2

# What a stage of the default build needs first: the build, unless make
# check's lanes run it (make check built it before they start).
STAGE_BUILD ?= build

# promtool, for the metrics test: from Debian's prometheus package,
# unpacked into the build tree rather than installed, since installing the
# package would also start a Prometheus server.  One on PATH is used as is.
PROMTOOL ?= $(or $(shell command -v promtool),$(CURDIR)/$(BUILD)/tools/promtool)
$(CURDIR)/$(BUILD)/tools/promtool:
	rm -rf $(BUILD)/tools/pkg && mkdir -p $(BUILD)/tools/pkg
	cd $(BUILD)/tools/pkg && { apt-get download prometheus 2>/dev/null || \
	  { apt-get update -qq && apt-get download prometheus; }; }
	dpkg-deb -x $(BUILD)/tools/pkg/prometheus_*.deb $(BUILD)/tools/pkg/root
	cp $(BUILD)/tools/pkg/root/usr/bin/promtool $@
	rm -rf $(BUILD)/tools/pkg

check-normal: $(STAGE_BUILD) $(PROMTOOL)
	ACLONE_PROMTOOL=$(PROMTOOL) $(MESON_TEST) -C $(BUILD) --no-suite vm

# The tests that run qemu (the VM test, qemu-img and qemu-io as clients):
# a stage of their own, so that they run in another lane than the rest of
# the normal build's tests.
check-vm: $(STAGE_BUILD)
	$(MESON_TEST) -C $(BUILD) --suite vm --logbase vm

# memcheck errors and definite leaks fail a unit test.
VALGRIND = valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite
# (Not the ring test: valgrind does not model io_uring's shared rings, and
# ASan and TSan run it instead.)
VALGRIND_TESTS = meta map clone powerloss fgctl
check-valgrind: $(STAGE_BUILD)
	$(MESON_TEST) -C $(BUILD) --wrapper '$(VALGRIND)' --logbase valgrind \
	  $(VALGRIND_TESTS)

# AddressSanitizer + UndefinedBehaviorSanitizer.  The plugin is loaded by
# an uninstrumented nbdkit, so the ASan runtime is preloaded into it
# (ACLONE_TEST_PRELOAD); leak checks run on the unit tests.  The tests of
# the controller's timing are left to the normal and TSan stages
# (ACLONE_CONTROLLER_TIMING_ELSEWHERE, tests/integration/harness.py).
SAN_TESTS = meta map clone ring powerloss fgctl device reused_dest integrity \
            concurrency faults hydration foreground
$(SAN_BUILD)/build.ninja:
	$(MESON) setup $(SAN_BUILD) -Db_sanitize=address,undefined -Db_lundef=false \
	  -Dc_args=-fno-sanitize-recover=all -Dc_link_args=-fno-sanitize-recover=all

check-san: deps $(SAN_BUILD)/build.ninja
	$(MESON) compile -C $(SAN_BUILD)
	ACLONE_TEST_PRELOAD="$$(gcc -print-file-name=libasan.so)" \
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	ACLONE_STRESS_SECONDS=4 ACLONE_KILL_ROUNDS=12 ACLONE_CONTROLLER_TIMING_ELSEWHERE=1 \
	  $(MESON_TEST) -C $(SAN_BUILD) $(SAN_TESTS)

# ThreadSanitizer: the unit tests, the concurrency test (4 clients and
# the hydrator's workers on shared regions) and the foreground test (the
# copy-on-read writer and the controller).  As with ASan, the runtime is
# preloaded into nbdkit; a report in a server's log fails the test.
TSAN_TESTS = meta map clone ring powerloss fgctl concurrency foreground
$(TSAN_BUILD)/build.ninja:
	$(MESON) setup $(TSAN_BUILD) -Db_sanitize=thread -Db_lundef=false

check-tsan: deps $(TSAN_BUILD)/build.ninja
	$(MESON) compile -C $(TSAN_BUILD)
	ACLONE_TEST_PRELOAD="$$(gcc -print-file-name=libtsan.so)" \
	TSAN_OPTIONS=halt_on_error=0:exitcode=66:suppressions=$(CURDIR)/tests/tsan.supp \
	  $(MESON_TEST) -C $(TSAN_BUILD) $(TSAN_TESTS)

# The metadata parser under libFuzzer (clang, ASan+UBSan), for 30 s;
# a longer run: make check-fuzz FUZZ_SECONDS=3600 (the corpus it grows is
# in $(FUZZ_BUILD)/tests/fuzz-corpus).
FUZZ_SECONDS ?= 30
$(FUZZ_BUILD)/build.ninja:
	CC=clang $(MESON) setup $(FUZZ_BUILD) -Dfuzz=true \
	  -Db_sanitize=address,undefined -Db_lundef=false

check-fuzz: deps $(FUZZ_BUILD)/build.ninja
	$(MESON) configure $(FUZZ_BUILD) -Dfuzz_seconds=$(FUZZ_SECONDS)
	$(MESON) compile -C $(FUZZ_BUILD) tests/fuzz_meta
	$(MESON_TEST) -C $(FUZZ_BUILD) --suite fuzz

# The Debian packages from the tracked files: built (the in-package test
# run is off here, the stages above ran the tests), linted, installed, and
# the installed plugin and CLI run.
check-deb: deps
	bash tests/package.sh $(DEB_BUILD)

# The stages run in three lanes side by side, each lane in order.  Most
# integration tests wait on servers (rate limits, timeouts, kill rounds)
# rather than compute, so three lanes keep two cores busy where two left
# a quarter of them idle; every test is meant to pass on a loaded machine
# (make check-loaded).  Every stage runs even when one fails (-k); a stage
# that fails before it writes its results (a build error) leaves no log,
# which the summary counts as a failure.  Each lane's output is shown when
# it ends (-O).  The lanes are balanced by each stage's seconds of tests
# in a make check run (2026-12-02, this 2-core machine: normal 476 |
# san 339, valgrind 60, fuzz 32 | vm 129, tsan 247, deb 66); san and
# tsan build first (about a minute each).
LANE_A = normal
LANE_B = san valgrind fuzz
LANE_C = vm tsan deb

check: build
	@rm -f $(foreach s,$(STAGES),$(LOG_$(s)))
	@$(MAKE) --no-print-directory -k -j3 -Orecurse check-lane-a check-lane-b check-lane-c; rc=$$?; \
	 python3 tests/summary.py $(foreach s,$(STAGES),$(s)=$(LOG_$(s))) | \
	   sed 's/^\([0-9]* passed\)/all: \1/'; st=$${PIPESTATUS[0]}; \
	 [ $$rc = 0 ] && [ $$st = 0 ]

check-lane-a:
	@$(MAKE) --no-print-directory -k -j1 STAGE_BUILD= $(addprefix check-,$(LANE_A))
check-lane-b:
	@$(MAKE) --no-print-directory -k -j1 STAGE_BUILD= $(addprefix check-,$(LANE_B))
check-lane-c:
	@$(MAKE) --no-print-directory -k -j1 STAGE_BUILD= $(addprefix check-,$(LANE_C))

# The suite on a busy machine: it must pass there too (bounds catch
# hangs, they do not measure speed).
STRESS = stress-ng --cpu 2 --io 1 --vm 1 --vm-bytes 1G --timeout 1800s --quiet
check-loaded: build
	@command -v stress-ng >/dev/null || { [ "$$(id -u)" = 0 ] && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq stress-ng; }
	@$(STRESS) & pid=$$!; trap 'kill $$pid 2>/dev/null; wait $$pid' EXIT; \
	 sleep 2; $(MAKE) --no-print-directory check

# All stages one after the other.
check-stages: $(addprefix check-,$(STAGES))

# Mutation check: each patch in tests/mutants/ breaks one rule on purpose;
# the tests it names must fail.  About 5 minutes on this machine, so it is
# not in make check.  Alone it first runs those tests unmutated (a test
# that fails there would "kill" every mutant); .ci/run skips that
# (MUTANTS_FLAGS=--no-baseline) right after make check, whose normal
# stage ran them on the same tree.
MUTANTS_FLAGS ?=
check-mutants: deps
	@rm -f $(LOG_mutants)
	@tests/mutants/run $(MUTANTS_FLAGS) $(MUTANT_BUILD); rc=$$?; \
	 python3 tests/summary.py mutants=$(LOG_mutants); st=$$?; \
	 [ $$rc = 0 ] && [ $$st = 0 ]

install: build
	$(MESON) install -C $(BUILD)

clean:
	rm -rf $(BUILD) $(SAN_BUILD) $(TSAN_BUILD) $(FUZZ_BUILD) $(DEB_BUILD) $(MUTANT_BUILD)

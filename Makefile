# aclone: thin wrapper over meson for the README's Quick start.
#
#   make demo     clone a disk holding ext4, read a file from the clone
#   make check    unit + integration tests; the unit tests under valgrind;
#                 everything again under ASan/UBSan; unit + concurrency
#                 tests under TSan; 30 s of fuzzing; the Debian packages
#
# Both install missing Debian packages first (when run as root).

BUILD      ?= build
SAN_BUILD  ?= build-san
TSAN_BUILD ?= build-tsan
DEB_BUILD  ?= build-deb
FUZZ_BUILD ?= build-fuzz
MESON     ?= meson

# (nbdfuse comes with libnbd-bin in Debian 12.)
DEBS = gcc pkg-config meson ninja-build \
       nbdkit nbdkit-plugin-dev libnbd-dev libnbd-bin python3-libnbd \
       liburing-dev libbsd-dev libcmocka-dev \
       qemu-utils e2fsprogs fuse3 util-linux clang libclang-rt-14-dev valgrind \
       openssl systemd dpkg-dev debhelper lintian man-db \
       qemu-system-x86 nbd-client busybox-static cpio kmod

.PHONY: all deps build demo check check-fast check-san check-tsan check-fuzz \
        check-deb install clean

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

# Unit and integration tests on the normal build; the unit tests again
# under valgrind (memcheck errors and definite leaks fail them).
VALGRIND = valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite
check-fast: build
	$(MESON) test -C $(BUILD) --print-errorlogs --num-processes 2 || true
	$(MESON) test -C $(BUILD) --suite unit --print-errorlogs --num-processes 2 \
	  --wrapper '$(VALGRIND)' --logbase valgrind || true
	@python3 tests/summary.py $(BUILD)/meson-logs/testlog.json \
	  $(BUILD)/meson-logs/valgrind-valgrind.json

# The same under AddressSanitizer + UndefinedBehaviorSanitizer.  The plugin
# is loaded by an uninstrumented nbdkit, so the ASan runtime is preloaded
# into it (ACLONE_TEST_PRELOAD); leak checks run on the unit tests.
$(SAN_BUILD)/build.ninja:
	$(MESON) setup $(SAN_BUILD) -Db_sanitize=address,undefined -Db_lundef=false \
	  -Dc_args=-fno-sanitize-recover=all -Dc_link_args=-fno-sanitize-recover=all

check-san: deps $(SAN_BUILD)/build.ninja
	$(MESON) compile -C $(SAN_BUILD)
	ACLONE_TEST_PRELOAD="$$(gcc -print-file-name=libasan.so)" \
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	ACLONE_STRESS_SECONDS=4 \
	  $(MESON) test -C $(SAN_BUILD) --print-errorlogs --num-processes 2 || true
	@python3 tests/summary.py $(SAN_BUILD)/meson-logs/testlog.json

# ThreadSanitizer: the unit tests and the concurrency test (4 clients and
# the hydrator's workers on shared regions).  As with ASan, the runtime is
# preloaded into nbdkit; a report in a server's log fails the test.
$(TSAN_BUILD)/build.ninja:
	$(MESON) setup $(TSAN_BUILD) -Db_sanitize=thread -Db_lundef=false

check-tsan: deps $(TSAN_BUILD)/build.ninja
	$(MESON) compile -C $(TSAN_BUILD)
	ACLONE_TEST_PRELOAD="$$(gcc -print-file-name=libtsan.so)" \
	TSAN_OPTIONS=halt_on_error=0:exitcode=66 \
	  $(MESON) test -C $(TSAN_BUILD) --print-errorlogs --num-processes 2 \
	  meta map clone powerloss concurrency || true
	@python3 tests/summary.py $(TSAN_BUILD)/meson-logs/testlog.json

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
	$(MESON) test -C $(FUZZ_BUILD) --suite fuzz --print-errorlogs || true
	@python3 tests/summary.py $(FUZZ_BUILD)/meson-logs/testlog.json

# The Debian packages: built from the tracked files with their tests,
# lintian, installed, and the installed plugin and CLI run.
check-deb: deps
	bash tests/package.sh $(DEB_BUILD)

check: build
	@$(MAKE) --no-print-directory check-fast; a=$$?; \
	 $(MAKE) --no-print-directory check-san; b=$$?; \
	 $(MAKE) --no-print-directory check-tsan; d=$$?; \
	 $(MAKE) --no-print-directory check-fuzz; c=$$?; \
	 $(MAKE) --no-print-directory check-deb; e=$$?; \
	 python3 tests/summary.py $(BUILD)/meson-logs/testlog.json \
	   $(BUILD)/meson-logs/valgrind-valgrind.json \
	   $(SAN_BUILD)/meson-logs/testlog.json \
	   $(TSAN_BUILD)/meson-logs/testlog.json \
	   $(FUZZ_BUILD)/meson-logs/testlog.json \
	   $(DEB_BUILD)/testlog.json | sed 's/^/all: /'; \
	 [ $$a = 0 ] && [ $$b = 0 ] && [ $$c = 0 ] && [ $$d = 0 ] && [ $$e = 0 ]

install: build
	$(MESON) install -C $(BUILD)

clean:
	rm -rf $(BUILD) $(SAN_BUILD) $(TSAN_BUILD) $(FUZZ_BUILD) $(DEB_BUILD)

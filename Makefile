# sockproxyd: build, run, test, lint. `make run ARGS="-p 2600 -D"` passes options on.
CARGO ?= cargo
ARGS ?=
# The integration tests mostly wait on sockets; run more of them at once than there are
# cores. Override with `make test TEST_THREADS=1` to debug one at a time.
TEST_THREADS ?= 16

.PHONY: build run test lint bench

build:
	$(CARGO) build --release

run:
	$(CARGO) run --release -- $(ARGS)

# The Lua tests run `lua5.1` from PATH (or $LUA); they skip, saying why, without it.
# Not --all-targets: that would run the bench binary (harness = false) as a test;
# `make lint` (clippy --all-targets) still compiles it.
test:
	$(CARGO) test --lib --bins --tests -- --test-threads=$(TEST_THREADS)

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

# Fuzzing (fuzz/README.md): cargo fuzz on a pinned nightly, which this installs when
# missing, with cargo-fuzz (and a C++ compiler for libFuzzer). Every target runs for
# FUZZ_SECONDS: a smoke by default (CI), `make fuzz FUZZ_SECONDS=900 FUZZ_TARGETS=acl`
# for a real run. Seeds are read from fuzz/corpus/<target>/, what libFuzzer finds goes
# to fuzz/corpus-work/ (not in git), a crash to fuzz/artifacts/<target>/ and fails the run.
# Paths are absolute: the cli target works in a directory of its own.
FUZZ_TOOLCHAIN ?= nightly-2026-10-29
FUZZ_SECONDS ?= 10
FUZZ_TARGETS ?= cli conn_options ini acl command_stream echo
FUZZ_DIR = $(CURDIR)/fuzz

.PHONY: fuzz

fuzz:
	@rustup run $(FUZZ_TOOLCHAIN) rustc --version >/dev/null 2>&1 || \
		rustup toolchain install $(FUZZ_TOOLCHAIN) --profile minimal
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	@command -v c++ >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++; } || \
		{ echo "fuzz: no C++ compiler for libFuzzer: apt-get install g++"; exit 1; }
	@for t in $(FUZZ_TARGETS); do \
		log=$(FUZZ_DIR)/corpus-work/$$t.log; \
		echo "fuzz: $$t for $(FUZZ_SECONDS) s (log: $$log)"; \
		mkdir -p $(FUZZ_DIR)/corpus-work/$$t && \
		if cargo +$(FUZZ_TOOLCHAIN) fuzz run --sanitizer none --debug-assertions $$t \
			$(FUZZ_DIR)/corpus-work/$$t $(FUZZ_DIR)/corpus/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -dict=$(FUZZ_DIR)/dict/sockproxyd.dict \
			-timeout=10 -print_final_stats=1 >$$log 2>&1; then \
			grep -E '^#[0-9]+[[:space:]]+DONE' $$log; \
		else \
			tail -n 80 $$log; echo "fuzz: $$t failed"; exit 1; \
		fi; \
	done

# Measurements, not pass/fail tests (benches/bench.rs; README.md "Performance"): loopback
# only, table on stdout, JSON in target/bench/latest.json. `make bench QUICK=1` takes under
# a minute. socat and haproxy are the reference relays: installed here when missing (as
# root), else their rows are skipped with the reason.
QUICK ?=
bench:
	@if ! command -v socat >/dev/null || ! command -v haproxy >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			export DEBIAN_FRONTEND=noninteractive; \
			apt-get install -y --no-install-recommends socat haproxy || \
			{ apt-get update && apt-get install -y --no-install-recommends socat haproxy; } || \
			echo "bench: could not install socat/haproxy: their rows will be skipped"; \
		else \
			echo "bench: socat/haproxy missing and not root: their rows will be skipped"; \
		fi; \
	fi
	$(CARGO) build --release
	$(CARGO) bench --bench bench -- $(if $(QUICK),--quick)

# --- Cross builds for the router and openLuup hosts (cross/README.md) ---
# `make cross` builds all four static binaries into dist/; `make test-mipsel` runs the
# whole integration suite against the mipsel binary under qemu-user (likewise armv7,
# aarch64). The binaries are rebuilt when the sources change.
DIST ?= dist
CROSS_TARGETS = mipsel-unknown-linux-musl armv7-unknown-linux-musleabihf \
	aarch64-unknown-linux-musl x86_64-unknown-linux-musl
SOURCES = $(wildcard src/*.rs) build.rs Cargo.toml Cargo.lock cross/build.sh

.PHONY: cross test-mipsel test-armv7 test-aarch64

cross: $(foreach t,$(CROSS_TARGETS),$(DIST)/sockproxyd-$(t))

$(DIST)/sockproxyd-%: $(SOURCES)
	sh cross/build.sh $*

# $(call emulated-test,target,qemu binary)
define emulated-test
	@command -v $(2) >/dev/null || { echo "$@: $(2) not found: apt-get install qemu-user-static"; exit 1; }
	SOCKPROXYD_BIN=$(CURDIR)/$(DIST)/sockproxyd-$(1) SOCKPROXYD_RUNNER=$(2) \
		$(CARGO) test --test tests -- --test-threads=$(TEST_THREADS)
endef

test-mipsel: $(DIST)/sockproxyd-mipsel-unknown-linux-musl
	$(call emulated-test,mipsel-unknown-linux-musl,qemu-mipsel-static)

test-armv7: $(DIST)/sockproxyd-armv7-unknown-linux-musleabihf
	$(call emulated-test,armv7-unknown-linux-musleabihf,qemu-arm-static)

test-aarch64: $(DIST)/sockproxyd-aarch64-unknown-linux-musl
	$(call emulated-test,aarch64-unknown-linux-musl,qemu-aarch64-static)

# --- Debian and Raspberry Pi OS packages (deb/README.md; README.md "Installing") ---
# `make deb`: sockproxyd_<version>_{amd64,arm64,armhf}.deb in dist/deb/, from the static
# cross builds (made first when missing or older than the sources), with dpkg-deb only.
# `make deb-test` (as root; changes the machine: CI or a container) checks the amd64
# one: contents, lintian, install, start as the unit says, reload, stop, purge.
VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' Cargo.toml | head -n 1)
DEB_TARGETS = x86_64-unknown-linux-musl aarch64-unknown-linux-musl \
	armv7-unknown-linux-musleabihf

.PHONY: deb deb-test

deb: $(foreach t,$(DEB_TARGETS),$(DIST)/sockproxyd-$(t))
	DIST=$(DIST) sh deb/build.sh $(DEB_TARGETS)

deb-test: $(DIST)/sockproxyd-x86_64-unknown-linux-musl
	DIST=$(DIST) sh deb/build.sh x86_64-unknown-linux-musl
	bash .ci/deb-test $(DIST)/deb/sockproxyd_$(VERSION)_amd64.deb

# --- Installing on an openLuup host (README.md "Installing"), cleaning, script checks ---
# `make build` as yourself, then `sudo make install`: install does not build.
PREFIX ?= /usr/local
DESTDIR ?=
BIN ?= $(or $(CARGO_TARGET_DIR),target)/release/sockproxyd

.PHONY: install uninstall clean check-scripts

# The init script's default DAEMON follows PREFIX; an existing /etc/sockproxyd.conf is kept.
install:
	@test -x $(BIN) || { echo "install: no $(BIN): run 'make build' first"; exit 1; }
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)/etc/init.d
	install -m 755 $(BIN) $(DESTDIR)$(PREFIX)/bin/sockproxyd
	sed 's|/usr/local/bin/|$(PREFIX)/bin/|g' init-script.sh > $(DESTDIR)/etc/init.d/sockproxyd
	chmod 755 $(DESTDIR)/etc/init.d/sockproxyd
	@if [ -e $(DESTDIR)/etc/sockproxyd.conf ]; then \
		echo "keeping $(DESTDIR)/etc/sockproxyd.conf"; \
	else \
		echo "install -m 644 openwrt/files/sockproxyd.conf.sample $(DESTDIR)/etc/sockproxyd.conf"; \
		install -m 644 openwrt/files/sockproxyd.conf.sample $(DESTDIR)/etc/sockproxyd.conf; \
	fi

# Stop it and `update-rc.d sockproxyd remove` first. The configuration stays.
uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/sockproxyd $(DESTDIR)/etc/init.d/sockproxyd
	@echo "kept $(DESTDIR)/etc/sockproxyd.conf (and /etc/default/sockproxyd, if any)"

clean:
	$(CARGO) clean
	rm -rf dist

# Every shell script in the tree, found by its #! line: a syntax check with its own
# shell, then shellcheck in that dialect if installed (apt-get install shellcheck).
check-scripts:
	@command -v shellcheck >/dev/null || \
		echo "check-scripts: shellcheck is not installed (apt-get install shellcheck): syntax only"
	@n=0; bad=; \
	for f in $$(find . -path ./.git -prune -o -path ./target -prune -o -path ./dist -prune \
			-o -type f -print | sort); do \
		set -- $$(sed -n '1s/^#!//p' "$$f"); \
		[ "$${1##*/}" = env ] && shift; \
		case "$${1##*/}" in sh | ash | dash) sh=sh ;; bash) sh=bash ;; *) continue ;; esac; \
		n=$$((n + 1)); echo "$$sh -n $$f"; \
		$$sh -n "$$f" || { bad="$$bad $$f"; continue; }; \
		if command -v shellcheck >/dev/null; then shellcheck -s $$sh "$$f" || bad="$$bad $$f"; fi; \
	done; \
	if [ -n "$$bad" ]; then echo "check-scripts: failed:$$bad"; exit 1; fi; \
	echo "check-scripts: $$n scripts ok"

# --- The SockProxy plugin for Vera (openwrt/vera/plugin/; README.md "On a Vera") ---
# `make vera-plugin`: the upload set in dist/vera-plugin/: the plugin's files and the
# mipsel daemon under the name the plugin looks for (sockproxyd-mipsel). The plugin's own
# tests run with `make test` (tests/vera_plugin.rs).
VERA_PLUGIN = $(DIST)/vera-plugin

.PHONY: vera-plugin

vera-plugin: $(DIST)/sockproxyd-mipsel-unknown-linux-musl
	rm -rf $(VERA_PLUGIN)
	mkdir -p $(VERA_PLUGIN)
	cp openwrt/vera/plugin/D_SockProxy1.xml openwrt/vera/plugin/D_SockProxy1.json \
		openwrt/vera/plugin/I_SockProxy1.xml openwrt/vera/plugin/S_SockProxy1.xml \
		openwrt/vera/plugin/L_SockProxy1.lua $(VERA_PLUGIN)/
	cp $(DIST)/sockproxyd-mipsel-unknown-linux-musl $(VERA_PLUGIN)/sockproxyd-mipsel
	chmod 755 $(VERA_PLUGIN)/sockproxyd-mipsel
	@ls -l $(VERA_PLUGIN)
	@echo "upload every file in $(VERA_PLUGIN)/ at Apps > Develop apps > Luup files"

# --- Soak (not in CI): benches/soak.rs runs mixed traffic against the release daemon ---
# short connections, long transfers with hash checks, notifications, STATs, hang-ups,
# and hostile clients (blank-line and HELP floods, BLKS=1 MiB floods nobody reads, NTFY churn);
# every minute it prints the idle daemon's RSS and descriptor count, and at the end
# whether both stayed flat and every transfer matched (exit 1 otherwise). 30 minutes by
# default: `make soak MINUTES=5`. The daemon's log is in target/soak/daemon.log.
MINUTES ?=

.PHONY: soak

soak:
	$(CARGO) build --release
	$(CARGO) bench --bench soak -- $(if $(MINUTES),--minutes $(MINUTES))

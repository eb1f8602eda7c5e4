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
test:
	$(CARGO) test --all-targets -- --test-threads=$(TEST_THREADS)

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

# Measurements, not pass/fail tests: notification latency, idle wake-ups, RSS.
bench:
	$(CARGO) build --release
	python3 benches/core_metrics.py --bin target/release/sockproxyd

# herald: `make run` starts a dev node, `make test` runs every check CI runs.
CARGO ?= cargo

.PHONY: run build test test-deps lint fmt bench clean

## Build and start `herald dev` on 127.0.0.1:7070 (WebSocket + HTTP) and 127.0.0.1:7071 (gRPC).
run:
	$(CARGO) run --release -p herald -- dev

build:
	$(CARGO) build --workspace --all-targets

## Install what the tests need (Chromium, nats-server, redis-server, rabbitmq-server, rustfmt, clippy), then format
## check, lint, and every test.
test: test-deps lint
	$(CARGO) test --workspace --all-targets

test-deps:
	./scripts/install-test-deps.sh

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## Criterion benchmarks (room matching, delivery encoding), then the standard load scenarios against herald and
## its peers, NATS and Sockudo (loadtest/run-scenarios.sh: results, reports and charts under loadtest/results/).
bench:
	$(CARGO) bench --workspace
	./scripts/install-bench-deps.sh
	$(CARGO) build --release -p herald -p herald-loadtest
	./loadtest/run-scenarios.sh

clean:
	$(CARGO) clean

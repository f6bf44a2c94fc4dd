# herald: `make run` starts a dev node, `make test` runs every check CI runs.
CARGO ?= cargo

.PHONY: run build test test-deps lint k8s-check image fmt bench clean

## Build and start `herald dev` on 127.0.0.1:7070 (WebSocket + HTTP) and 127.0.0.1:7071 (gRPC).
run:
	$(CARGO) run --release -p herald -- dev

build:
	$(CARGO) build --workspace --all-targets

## Install what the tests need (Chromium, nats-server, redis-server, rabbitmq-server, rustfmt, clippy), then format
## check, lint, and every test.
test: test-deps lint k8s-check
	$(CARGO) test --workspace --all-targets

test-deps:
	./scripts/install-test-deps.sh

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## Helm chart and kustomize overlays: k8s/base still the chart's defaults, helm lint, helm template (defaults and
## helm/herald/examples/*.yaml) and kubectl kustomize (k8s/overlays/*), validated with kubernetes-validate --strict
## for Kubernetes 1.30 and 1.33 and checked by scripts/k8s-policy.py (security, probes, shape, drain).
k8s-check:
	./scripts/k8s-check.sh

## The container image (needs Docker, or DOCKER=podman; see Dockerfile for the runtime requirements).
DOCKER ?= docker
IMAGE ?= herald:$(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
image:
	$(DOCKER) build -t $(IMAGE) .

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

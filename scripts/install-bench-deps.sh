#!/usr/bin/env bash
# Installs the peers that `make bench` measures herald against, idempotently: each one is installed only when
# missing, so a second run does nothing.
#
# - NATS server (Debian's `nats-server`), run by the harness with its WebSocket listener on loopback.
# - Sockudo (the crates.io crate `sockudo`, a Rust Pusher-protocol server), built from source into
#   target/bench-tools/bin/sockudo. It has no Debian package; building it takes a long time on 2 cores
#   (about 30 minutes, 330 crates), so its log goes to target/bench-tools/sockudo-install.log.
#
# Sockudo is built without its default features (`--no-default-features --features local`): the defaults add
# OpenTelemetry export and Sockudo's own "v2" protocol extensions (delta compression, tag filtering, recovery),
# none of which the Pusher protocol the harness speaks uses; the single-node `local` adapter needs no Redis, NATS or
# database. If that build fails (a feature-gating bug in some release), the default features are tried once.
#
# Environment: SOCKUDO_VERSION pins a version (default: the newest one), BENCH_TOOLS overrides the install root.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root="${BENCH_TOOLS:-$repo/target/bench-tools}"
sockudo_bin="$root/bin/sockudo"
log="$root/sockudo-install.log"

# Debian installs nats-server in /usr/sbin, which a non-root PATH may lack.
nats_bin="$(command -v nats-server 2>/dev/null || true)"
[[ -z "$nats_bin" && -x /usr/sbin/nats-server ]] && nats_bin=/usr/sbin/nats-server

need_apt=()
[[ -n "$nats_bin" ]] || need_apt+=(nats-server)
if [[ ! -x "$sockudo_bin" ]]; then
    # Native build inputs of sockudo's dependency tree: openssl-sys (libssl-dev, pkg-config), aws-lc-sys and
    # jemalloc (a C compiler, cmake, perl, make), zlib (libz-sys); prost-build where a crate compiles .proto files.
    for pkg in pkg-config libssl-dev cmake make perl zlib1g-dev protobuf-compiler; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
    done
    command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
fi

if ((${#need_apt[@]})); then
    echo "installing: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [[ ! -x "$sockudo_bin" ]]; then
    mkdir -p "$root"
    version_arg=()
    [[ -n "${SOCKUDO_VERSION:-}" ]] && version_arg=(--version "$SOCKUDO_VERSION")
    echo "building sockudo into $root (about 30 min on 2 cores; log: $log)"
    if ! cargo install --locked sockudo "${version_arg[@]}" --root "$root" \
        --no-default-features --features local >"$log" 2>&1; then
        echo "sockudo without default features failed (see $log); trying the default features" >&2
        cargo install --locked sockudo "${version_arg[@]}" --root "$root" >>"$log" 2>&1 || {
            echo "sockudo build failed; the last lines of $log:" >&2
            tail -n 30 "$log" >&2
            exit 1
        }
    fi
fi

[[ -n "$nats_bin" ]] || nats_bin="$(command -v nats-server 2>/dev/null || echo /usr/sbin/nats-server)"
echo "nats-server: $nats_bin ($("$nats_bin" --version 2>&1))"
echo "sockudo:     $sockudo_bin"

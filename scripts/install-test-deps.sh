#!/usr/bin/env bash
# Installs what herald's tests need beyond the Rust toolchain, idempotently: each tool is installed only when
# missing, so a second run does nothing.
set -euo pipefail

need_apt=()
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
# The loadtest's peer test drives a real NATS server (Debian puts it in /usr/sbin). Sockudo takes about half an
# hour to build, so only `make bench` (scripts/install-bench-deps.sh) builds it; its test says so and skips.
command -v nats-server >/dev/null 2>&1 || [[ -x /usr/sbin/nats-server ]] || need_apt+=(nats-server)

if ((${#need_apt[@]})); then
    echo "installing: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

for component in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
        rustup component add "$component"
    fi
done

#!/usr/bin/env bash
# Installs what herald's tests need beyond the Rust toolchain, idempotently: each tool is installed only when
# missing, so a second run does nothing.
set -euo pipefail

need_apt=()
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
# The loadtest's peer test drives a real NATS server (Debian puts it in /usr/sbin). Sockudo takes about half an
# hour to build, so only `make bench` (scripts/install-bench-deps.sh) builds it; its test says so and skips.
command -v nats-server >/dev/null 2>&1 || [[ -x /usr/sbin/nats-server ]] || need_apt+=(nats-server)
# The bridge tests (tests/brokers.rs) start their own private Redis and RabbitMQ brokers on free loopback ports
# (tests/support/brokers.rs); the packages' system services are never used.
command -v redis-server >/dev/null 2>&1 || [[ -x /usr/bin/redis-server ]] || need_apt+=(redis-server)
[[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]] || need_apt+=(rabbitmq-server)

if ((${#need_apt[@]})); then
    echo "installing: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Keep the packages' maintainer scripts from starting their system services (redis-server, rabbitmq-server)
    # on the default ports: invoke-rc.d asks /usr/sbin/policy-rc.d first, and exit status 101 means "not allowed"
    # (without it, rabbitmq's postinst would try its init script, which fails without systemd and fails the
    # install). The deny policy is in place only for the install; a policy that was there before is put back.
    policy=/usr/sbin/policy-rc.d
    saved=""
    if [[ -e $policy ]]; then
        saved=$(mktemp)
        cp -p "$policy" "$saved"
    fi
    restore_policy() {
        if [[ -n $saved ]]; then
            mv -f "$saved" "$policy"
        else
            rm -f "$policy"
        fi
    }
    trap restore_policy EXIT
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    apt-get update -qq
    apt-get install -y -qq -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${need_apt[@]}" >/dev/null
fi

for component in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
        rustup component add "$component"
    fi
done

# helm, kubectl and kubernetes-validate for `make k8s-check`, under .tools/k8s/.
"$(dirname "$0")/install-k8s-tools.sh"

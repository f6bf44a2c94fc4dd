#!/usr/bin/env bash
# Installs what herald's tests need beyond the Rust toolchain, idempotently: each tool is installed only when
# missing, so a second run does nothing.
set -euo pipefail

need_apt=()
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)

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

#!/usr/bin/env bash
# Runs the standard load scenarios against herald (and each peer the harness can drive and finds installed),
# writing loadtest/results/<scenario>-<target>/{result.json,report.md,chart.png,logs/}. Used by `make bench`.
#
# Each run's verdict line from its report.md goes in the summary: "passed, all N targets met", "correct, K of N
# targets missed" (the run was correct but herald missed some of the scenario's performance targets; exit 0), or
# "FAILED" (loss, duplication, reordering or connect failures beyond the scenario's limits; exit 1). Both are
# benchmark results, not errors: they are listed and the script goes on. A run that could not happen at all
# (exit 2: servers would not start, workers died) makes the script exit non-zero at the end. The failover
# scenario applies to herald only: against a peer the harness writes a "not applicable" report and exits 0.
#
# bridge-redis publishes through herald's Redis bridge, which the peers do not have: it runs against herald alone
# and the summary says "not applicable" for the other targets.
#
# Environment: SCENARIOS (default: the six standard ones and bridge-redis), TARGETS (default: herald, plus
# nats/sockudo when their servers are installed), LOADTEST (the harness binary), RESULTS (output root).
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
loadtest="${LOADTEST:-target/release/herald-loadtest}"
results="${RESULTS:-loadtest/results}"
scenarios="${SCENARIOS:-fanout latency idle-memory connect slow-consumers failover bridge-redis}"
herald_only=" bridge-redis "
if [[ -z "${TARGETS:-}" ]]; then
    targets="herald"
    command -v nats-server >/dev/null 2>&1 && targets+=" nats"
    { [[ -x target/bench-tools/bin/sockudo ]] || command -v sockudo >/dev/null 2>&1; } && targets+=" sockudo"
else
    targets="$TARGETS"
fi

if [[ ! -x "$loadtest" ]]; then
    echo "run-scenarios: $loadtest is missing: cargo build --release -p herald -p herald-loadtest" >&2
    exit 2
fi

errors=0
summary=()
for scenario in $scenarios; do
    for target in $targets; do
        if [[ $target != herald && $herald_only == *" $scenario "* ]]; then
            summary+=("$scenario/$target: not applicable (herald's Redis bridge; herald only)")
            continue
        fi
        out="$results/$scenario-$target"
        rm -rf "$out"
        echo "=== $scenario against $target -> $out"
        "$loadtest" run "loadtest/scenarios/$scenario.toml" --target "$target" --out "$out"
        code=$?
        verdict="$(sed -n 's/^\*\*Result: \(.*\)\*\*$/\1/p' "$out/report.md" 2>/dev/null | head -n 1)"
        case $code in
            0) summary+=("$scenario/$target: ${verdict:-passed} (see $out/report.md)") ;;
            1) summary+=("$scenario/$target: ${verdict:-FAILED} (failed on correctness; see $out/report.md)") ;;
            *) summary+=("$scenario/$target: could not run (exit $code)"); errors=$((errors + 1)) ;;
        esac
    done
done

echo
echo "=== summary"
printf '%s\n' "${summary[@]}"
exit $((errors > 0 ? 2 : 0))

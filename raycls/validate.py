"""`raycls validate`: offline checks of the configs that launch raycls on a cluster.

`ray up` has no dry run and Serve silently drops misspelled keys, so a typo costs a cluster start
(minutes, money) or ships a Serve setting that never took effect. This module catches those
mistakes on a laptop, with no cloud credentials and no running Ray:

- Ray cluster YAML (`ray up`): Ray's own `prepare_config` + `validate_config` (the JSON schema and
  the `head_node_type` / `min_workers` rules), plus per-node-type `min_workers <= max_workers`,
  which Ray does not check.
- Serve config files (`serve deploy`): Serve's pydantic schemas, unknown keys at every level with
  a "did you mean", and autoscaling bounds. For raycls's own app, `args` go through
  `raycls.serving.parse_args`, the parser `serve run` / `serve deploy` use, so a value they refuse
  is refused here; absolute bundle and key paths must exist on this machine (relative ones
  resolve on the cluster and get a note; `--paths-on-cluster` skips the check); `args.num_gpus`
  must agree with the Classifier's `ray_actor_options` (which replace the builder's).
- KubeRay manifests (`RayCluster`, `RayJob`, `RayService`): the fields that matter (kinds, Ray
  version against the pin, worker group bounds, the RayJob entrypoint, the embedded Serve config,
  whose paths are the pods' and are not checked).
- A security lint on all of them: no public ingress to the dashboard/Jobs API (8265), GCS (6379)
  or Ray Client (10001), which each give code execution on the cluster, nor to Serve (8000),
  which gives the model (free classification, large bodies) to anyone; a raycls app on a
  non-local host needs API keys; token authentication on; no `:latest` images.

Every problem names the file, the key and the fix. Errors fail (exit 1); warnings and notes are
printed only. A folder argument is searched recursively for .yaml/.yml files.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import logging
import re
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PUBLIC_CIDRS = ("0.0.0.0/0", "::/0")
KUBERAY_KINDS = ("RayCluster", "RayJob", "RayService")
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Problem:
    file: str
    key: str  # dotted path inside the file, e.g. available_node_types.gpu_worker.min_workers
    message: str
    fix: str
    level: str = "error"  # "error" fails validation; "warning" is printed only

    def __str__(self) -> str:
        return f"{self.level}: {self.file}: {self.key}: {self.message} (fix: {self.fix})"


@dataclass(frozen=True)
class Port:
    """A port that must never face 0.0.0.0/0, and precisely what reaching it gives."""

    name: str
    exposure: str  # what anyone who reaches the port can do
    fix: str


# The first three give code execution on the cluster; Serve's port gives the model, not the
# cluster (it runs no submitted code), but an open model is still free compute and a DoS target.
SENSITIVE_PORTS = {
    8265: Port("dashboard/Jobs API", "can submit jobs, i.e. run any code on the cluster, and "
               "read its logs", "remove the rule and use `ray dashboard cluster/config.yaml` "
               "(SSH tunnel), or restrict CidrIp to your own network"),
    6379: Port("GCS", "can join or drive the cluster, i.e. run code on it", "remove the rule: "
               "only the cluster's own nodes talk to the GCS (keep it inside the VPC)"),
    10001: Port("Ray Client", "can connect a driver (`ray.init(\"ray://...\")`), i.e. run code "
                "on the cluster", "remove the rule and tunnel over SSH, or restrict CidrIp to "
                "your own network"),
    8000: Port("Serve HTTP", "can call the model: classify images, read its metadata and send "
               "large request bodies that cost CPU and memory (without API keys, nothing stops "
               "them); it does not give code execution on the cluster",
               "restrict CidrIp to the clients' network or put an authenticated gateway (TLS) "
               "in front, and set args.api_key_file"),
}


def ray_version_pin() -> str:
    """The `major.minor` Ray version this project pins (pyproject.toml), e.g. "2.60"."""
    pyproject = REPO_ROOT / "pyproject.toml"
    if pyproject.is_file():
        m = re.search(r"ray\[[^\]]*\]==(\d+\.\d+)", pyproject.read_text())
        if m:
            return m.group(1)
    import ray  # fallback for an installed wheel without the source tree

    return ".".join(ray.__version__.split(".")[:2])


def _suggest(name: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(known))}"


def _typo_keys(
    mapping: dict, known: typing.Iterable[str], file: str, prefix: str
) -> list[Problem]:
    """Unknown keys that look like misspellings of known ones (for open-ended schemas, where an
    unknown key may be legitimate, only near-misses are reported)."""
    known = set(known)
    problems = []
    for key in mapping:
        if key in known:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
        if close:
            problems.append(
                Problem(file, _join(prefix, key), "unknown key", f"did you mean {close[0]!r}?")
            )
    return problems


def _join(prefix: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    return f"{prefix}.{key}" if prefix else str(key)


def _image_problems(image: str, file: str, key: str, pin: str) -> list[Problem]:
    """No `:latest` or untagged images (they drift away from the pinned Ray version)."""
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    tag = last.split(":", 1)[1] if ":" in last else ""
    if digest:
        return []
    if not tag or tag == "latest" or tag.startswith("latest-"):
        return [
            Problem(
                file, key, f"image {image!r} is unpinned ({tag or 'no tag'})",
                f"use a versioned tag, e.g. rayproject/ray:{pin}.0-py311-gpu",
            )
        ]
    if name.startswith("rayproject/ray") and not tag.startswith(pin + "."):
        return [
            Problem(
                file, key, f"image {image!r} is not Ray {pin} (the pyproject.toml pin)",
                f"use rayproject/ray:{pin}.0-py311[-gpu]",
            )
        ]
    return []


# --------------------------------------------------------------------------- Ray cluster YAML

def _is_public_ingress(rule: dict) -> bool:
    ranges = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
    ranges += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
    return any(r in PUBLIC_CIDRS for r in ranges)


def _exposed_ports(rule: dict) -> list[int]:
    if str(rule.get("IpProtocol", "tcp")) == "-1":  # all protocols, all ports
        return sorted(SENSITIVE_PORTS)
    lo, hi = int(rule.get("FromPort", -1)), int(rule.get("ToPort", -1))
    if lo == -1:
        return sorted(SENSITIVE_PORTS)
    return [p for p in sorted(SENSITIVE_PORTS) if lo <= p <= hi]


def _lint_cluster_security(cfg: dict, file: str, pin: str) -> list[Problem]:
    problems = []
    rules = cfg.get("provider", {}).get("security_group", {}).get("IpPermissions", [])
    for i, rule in enumerate(rules):
        if not _is_public_ingress(rule):
            continue
        for port in _exposed_ports(rule):
            info = SENSITIVE_PORTS[port]
            problems.append(
                Problem(
                    file, f"provider.security_group.IpPermissions[{i}]",
                    f"opens port {port} ({info.name}) to the internet: anyone who reaches it "
                    f"{info.exposure}", info.fix,
                )
            )

    docker = cfg.get("docker") or {}
    docker_opts = " ".join(
        str(o) for k in ("run_options", "head_run_options", "worker_run_options")
        for o in docker.get(k, [])
    )
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        commands = " ".join(cfg.get(key, []))
        if "ray start" in commands and "RAY_AUTH_MODE=token" not in commands + docker_opts:
            problems.append(
                Problem(
                    file, key, "Ray is started without token authentication",
                    "prefix `ray start` with RAY_AUTH_MODE=token and ship ~/.ray/auth_token "
                    "(`ray get-auth-token --generate`) through file_mounts",
                )
            )
        if "--dashboard-host=0.0.0.0" in commands:
            problems.append(
                Problem(
                    file, key, "the dashboard listens on every interface",
                    "use --dashboard-host=127.0.0.1; `ray dashboard` tunnels to it", "warning",
                )
            )

    for key in ("image", "head_image", "worker_image"):
        if docker.get(key):
            problems += _image_problems(docker[key], file, f"docker.{key}", pin)
    for name, node in (cfg.get("available_node_types") or {}).items():
        image = (node.get("docker") or {}).get("worker_image")
        if image:
            problems += _image_problems(
                image, file, f"available_node_types.{name}.docker.worker_image", pin
            )

    setup = " ".join(
        str(c)
        for k in ("setup_commands", "head_setup_commands", "worker_setup_commands")
        for c in cfg.get(k) or []
    )
    for version in re.findall(r"ray(?:\[[^\]]*\])?==([0-9][0-9.*]*)", setup):
        if not (version == pin or version.startswith(pin + ".")):
            problems.append(
                Problem(
                    file, "setup_commands", f"installs ray=={version}, the project pins {pin}.*",
                    f"install ray[train,tune,serve]=={pin}.* (or `pip install -e` the project)",
                )
            )
    pinned_pip = re.search(r"ray(?:\[[^\]]*\])?==", setup) or "pip install -e" in setup
    if not docker.get("image") and not docker.get("head_image") and not pinned_pip:
        problems.append(
            Problem(
                file, "docker.image", "neither a Ray image nor a Ray install is pinned",
                f"set docker.image: rayproject/ray:{pin}.0-py311-gpu",
            )
        )
    return problems


def validate_cluster_config(cfg: dict, file: str) -> list[Problem]:
    """Ray's own offline validation of a `ray up` YAML, plus checks Ray skips, plus security."""
    import jsonschema

    from raycls import raycompat

    try:
        autoscaler_util, schema = raycompat.autoscaler_util(), raycompat.cluster_schema()
    except raycompat.RayCompatError as e:
        return [Problem(file, "(whole file)", f"cannot check with this Ray: {e}",
                        "install the Ray version pyproject.toml pins")]
    pin = ray_version_pin()
    problems: list[Problem] = []
    provider = cfg.get("provider") or {}
    fake = str(provider.get("type", "")).startswith("fake_multinode")

    # Ray logs an INFO line per defaulted field; a validator should print only its findings.
    ray_logger = logging.getLogger(autoscaler_util.__name__)
    level = ray_logger.level
    ray_logger.setLevel(logging.WARNING)
    try:
        # The fake provider's defaults file is not shipped in the 2.60 wheel, so a fake config
        # must be complete on its own; the cloud ones are merged with Ray's defaults.yaml.
        prepared = copy.deepcopy(cfg) if fake else autoscaler_util.prepare_config(cfg)
        if fake:
            autoscaler_util.fill_node_type_min_max_workers(prepared)
    except Exception as e:  # noqa: BLE001 - any failure here is a config problem to report
        return [Problem(file, "(whole file)", f"Ray's prepare_config failed: {e}",
                        "compare with cluster/config.yaml")]
    finally:
        ray_logger.setLevel(level)

    for err in jsonschema.Draft7Validator(schema).iter_errors(prepared):
        key = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        if err.validator == "additionalProperties":
            allowed = err.schema.get("properties", {})
            for extra in sorted(set(err.instance) - set(allowed)):
                problems.append(Problem(file, _join(key if err.absolute_path else "", extra),
                                        "unknown key", _suggest(extra, allowed)))
        else:
            problems.append(Problem(file, key, err.message, "see Ray's cluster YAML reference"))
    problems += _typo_keys(provider, schema["properties"]["provider"]["properties"],
                           file, "provider")

    node_types = prepared.get("available_node_types") or {}
    head = prepared.get("head_node_type")
    if node_types and head not in node_types:
        problems.append(
            Problem(file, "head_node_type", f"{head!r} is not one of available_node_types",
                    f"set it to one of: {', '.join(node_types)}")
        )
    for name, node in node_types.items():
        lo, hi = node.get("min_workers", 0), node.get("max_workers", 0)
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            problems.append(
                Problem(file, f"available_node_types.{name}.min_workers",
                        f"min_workers ({lo}) is above max_workers ({hi})",
                        "lower min_workers or raise max_workers")
            )
    if not problems:
        # Whatever Ray itself still refuses (e.g. the sum of min_workers above max_workers).
        try:
            autoscaler_util.validate_config(prepared)
        except (ValueError, RuntimeError, jsonschema.ValidationError) as e:
            msg = getattr(e, "message", str(e))
            problems.append(Problem(file, "(whole file)", msg, "see Ray's cluster YAML reference"))

    if not fake:  # a fake cluster lives on localhost; the lint is for real networks
        problems += _lint_cluster_security(cfg, file, pin)
    return problems


# --------------------------------------------------------------------------- Serve config

def _pydantic_models(annotation: Any) -> list[type]:
    """The pydantic model classes inside an annotation (Optional[X], List[X], Union[dict, X])."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _pydantic_models(arg)]


def _unknown_serve_keys(data: Any, model: type, file: str, prefix: str) -> list[Problem]:
    """Serve ignores unknown keys at every level; report each with a suggestion."""
    if not isinstance(data, dict):
        return []
    fields = model.model_fields
    problems = []
    for key, value in data.items():
        if key not in fields:
            problems.append(
                Problem(file, _join(prefix, key), f"unknown {model.__name__} key "
                        "(Serve would silently ignore it)", _suggest(key, fields))
            )
            continue
        for sub in _pydantic_models(fields[key].annotation):
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                where = _join(_join(prefix, key), i) if isinstance(value, list) else _join(
                    prefix, key)
                problems += _unknown_serve_keys(item, sub, file, where)
            break  # the first model type is the one the dict form describes
    return problems


RAYCLS_IMPORT_PATHS = ("raycls.deploy", "raycls:deploy")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# ServeArgs fields that name files or folders, checked on this machine when absolute
PATH_ARGS = ("model", "models", "models_root", "api_key_file")


def _args_problems(args: dict, file: str, key: str) -> list[Problem]:
    """`args` through the parser `serve run` / `serve deploy` use (raycls.serving.parse_args),
    so a value raycls.deploy refuses is refused here. The parser stops at the first bad value:
    the keys it names are set aside and the rest parsed again, so every bad value is listed."""
    from raycls.serving.args import ServeConfigError, parse_args

    problems, left = [], dict(args)
    while left:
        try:
            parse_args(left)
            break
        except ServeConfigError as e:
            message = str(e)
            named = [k for k in left if re.search(rf"(?<![\w.]){re.escape(k)}(?![\w])", message)]
            where = ", ".join(_join(key, f"args.{k}") for k in named) or _join(key, "args")
            problems.append(Problem(file, where, message, "see `args:` in serve/config.yaml "
                                    "and docs/cli-serve.md for each argument's type and range"))
            if not named:
                break
            for k in named:
                left.pop(k)
    return problems


def _path_problems(args: dict, file: str, key: str) -> list[Problem]:
    """Bundle and key-file paths of `args`. An absolute path is checked on this machine (a
    missing one is an error); a relative one only gets a note: it resolves on the cluster."""
    from raycls import bundle as bundle_lib

    used = [k for k in PATH_ARGS if isinstance(args.get(k), str) and args[k].strip()]
    if "models_root" in used and (args.get("model") or args.get("models")):
        used.remove("models_root")  # only read when neither model nor models is given
    problems = []
    for name in used:
        value, where = args[name], _join(key, f"args.{name}")
        path = Path(value).expanduser()
        if not path.is_absolute():
            problems.append(Problem(
                file, where, f"{name}={value} is relative: not checked here; it resolves on "
                "the cluster (for `serve deploy`, in the working directory of the head node's "
                "`ray start`), not against this file", "use an absolute path to be sure which "
                "file is served", "note",
            ))  # fmt: skip
            continue
        if name == "api_key_file":
            ok, why = path.is_file(), "no such key file on this machine"
        elif name == "model":
            ok, why = path.is_dir(), "no such bundle directory on this machine"
            if ok:
                try:
                    bundle_lib.read_bundle_meta(path)
                except bundle_lib.BundleError as e:
                    ok, why = False, f"not a usable bundle: {e}"
        else:
            ok, why = path.is_dir(), "no such folder on this machine"
        if not ok:
            problems.append(Problem(
                file, where, f"{name}={value}: {why}", "export a bundle there (`raycls export "
                "RUN_DIR --output PATH`) or fix the path; if the path exists only on the "
                "cluster, pass --paths-on-cluster",
            ))  # fmt: skip
    return problems


def _gpu_problems(app: dict, file: str, key: str) -> list[Problem]:
    """args.num_gpus against the Classifier's ray_actor_options: a deployment's
    ray_actor_options in the file replace the builder's whole (Serve's override rule), so
    `num_gpus` left out there means 0 GPUs, whatever args.num_gpus says."""
    args = app.get("args") or {}
    try:
        wanted = float(args.get("num_gpus", 0) or 0)
    except (TypeError, ValueError):
        return []  # a bad number is the parser's error
    problems = []
    for d, dep in enumerate(app.get("deployments") or []):
        if not isinstance(dep, dict) or not isinstance(dep.get("ray_actor_options"), dict):
            continue
        given = dep["ray_actor_options"].get("num_gpus", 0) or 0
        name, where = dep.get("name"), _join(_join(key, "deployments"), d)
        if name == "Classifier" and isinstance(given, int | float) and given != wanted:
            problems.append(Problem(
                file, f"{where}.ray_actor_options.num_gpus",
                f"Classifier replicas get {given:g} GPUs here but args.num_gpus={wanted:g} "
                "(these ray_actor_options replace the builder's, so this value wins)",
                "set both to the same number", "warning",
            ))  # fmt: skip
        elif name == "Ingress" and isinstance(given, int | float) and given > 0:
            problems.append(Problem(
                file, f"{where}.ray_actor_options.num_gpus",
                f"Ingress replicas reserve {given:g} GPUs; they decode on the CPU (the model "
                "runs on GPUs only in the Classifier, with args.num_gpus)",
                "remove num_gpus from the Ingress and set args.num_gpus", "warning",
            ))  # fmt: skip
    return problems


def _raycls_app_problems(app: dict, file: str, app_key: str, check_paths: bool) -> list[Problem]:
    """For raycls's own application: `args` parsed as `serve run` parses them, deployment names
    that exist, paths, GPU counts (Serve would fail, or silently differ, on the cluster)."""
    if app.get("import_path") not in RAYCLS_IMPORT_PATHS:
        return []
    try:  # imports Ray Serve and onnxruntime; a config check must not need them to work
        import dataclasses

        from ray import serve

        from raycls import serving
    except ImportError:
        return []
    problems = []
    fields = [f.name for f in dataclasses.fields(serving.ServeArgs)]
    args = app.get("args") or {}
    if not isinstance(args, dict):
        return [Problem(file, _join(app_key, "args"), "args must be a mapping of key: value",
                        "see serve/config.yaml")]
    for key in args:
        if key not in fields:
            problems.append(Problem(file, _join(app_key, f"args.{key}"),
                                    "unknown raycls.deploy argument", _suggest(key, fields)))
    known = {k: v for k, v in args.items() if k in fields}
    problems += _args_problems(known, file, app_key)
    if check_paths:
        problems += _path_problems(known, file, app_key)
    problems += _gpu_problems(app, file, app_key)
    names = [d.name for d in vars(serving).values() if isinstance(d, serve.Deployment)]
    for d, dep in enumerate(app.get("deployments") or []):
        name = (dep or {}).get("name")
        if name not in names:
            problems.append(Problem(file, _join(_join(app_key, "deployments"), d) + ".name",
                                    f"raycls.deploy has no deployment {name!r}",
                                    f"use one of: {', '.join(names)}"))
    return problems


def _host_problems(cfg: dict, app: dict, file: str, app_key: str) -> list[Problem]:
    """A raycls app on a non-local HTTP host without API keys. A Serve config file without
    `http_options.host` listens on 0.0.0.0 (ray.serve.schema.HTTPOptionsSchema's default)."""
    if app.get("import_path") not in RAYCLS_IMPORT_PATHS:
        return []
    http = cfg.get("http_options") or {}
    host = str(http.get("host", "0.0.0.0"))
    args = app.get("args") or {}
    if host in LOCAL_HOSTS or (isinstance(args, dict) and args.get("api_key_file")):
        return []
    given = "" if "host" in http else ", Serve's default when http_options.host is missing"
    return [Problem(
        file, _join(app_key, "args"),
        f"raycls listens on {host}{given}, without API keys: anyone who reaches the port can "
        "call the model (classify, send large bodies)",
        "set args.api_key_file (keys one a line; or $RAYCLS_API_KEY_FILE on the cluster), or "
        "set http_options.host: 127.0.0.1 and put a gateway in front", "warning",
    )]  # fmt: skip


def validate_serve_config(
    cfg: dict, file: str, prefix: str = "", check_paths: bool = True
) -> list[Problem]:
    """A Serve config file: multi-app (`applications:`) or a single application. `check_paths`:
    absolute bundle and key paths must exist on this machine (off for a RayService's embedded
    config, whose paths live in the pods, and with --paths-on-cluster)."""
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    model = ServeDeploySchema if "applications" in cfg else ServeApplicationSchema
    problems = _unknown_serve_keys(cfg, model, file, prefix)
    try:
        model.model_validate(cfg)
    except ValidationError as e:
        for err in e.errors():
            key = prefix
            for part in err["loc"]:
                key = _join(key, part)
            problems.append(Problem(file, key or "(top level)", err["msg"],
                                    "see `serve build` output or ray.serve.schema"))

    apps = cfg.get("applications", []) if model is ServeDeploySchema else [cfg]
    for a, app in enumerate(apps if isinstance(apps, list) else []):
        app_key = _join(_join(prefix, "applications"), a) if model is ServeDeploySchema else prefix
        if isinstance(app, dict):
            problems += _raycls_app_problems(app, file, app_key, check_paths)
            problems += _host_problems(cfg, app, file, app_key)
        for d, dep in enumerate((app or {}).get("deployments") or []):
            dep_key = _join(_join(app_key, "deployments"), d)
            auto = (dep or {}).get("autoscaling_config")
            if not isinstance(auto, dict):
                continue
            lo, hi = auto.get("min_replicas", 1), auto.get("max_replicas", 1)
            if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
                problems.append(Problem(file, _join(dep_key, "autoscaling_config.min_replicas"),
                                        f"min_replicas ({lo}) is above max_replicas ({hi})",
                                        "lower min_replicas or raise max_replicas"))
                continue
            try:
                AutoscalingConfig.model_validate(auto)
            except ValidationError as e:
                for err in e.errors():
                    problems.append(Problem(file, _join(dep_key, "autoscaling_config"),
                                            err["msg"], "see ray.serve.config.AutoscalingConfig"))
            if dep.get("num_replicas") not in (None, "auto"):
                problems.append(Problem(file, _join(dep_key, "num_replicas"),
                                        "num_replicas is fixed but autoscaling_config is set",
                                        "remove num_replicas (or set it to auto)"))
    return problems


# --------------------------------------------------------------------------- KubeRay manifests

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
    problems = _typo_keys(spec, RAYCLUSTER_SPEC_KEYS, file, prefix)
    version = str(spec.get("rayVersion", ""))
    if not version.startswith(pin + "."):
        problems.append(Problem(file, _join(prefix, "rayVersion"),
                                f"rayVersion {version or '(missing)'!r} does not match the "
                                f"pinned Ray {pin}", f"set rayVersion: '{pin}.0'"))
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict) or not _containers(head):
        problems.append(Problem(file, _join(prefix, "headGroupSpec"),
                                "missing head group (or its template.spec.containers)",
                                "add headGroupSpec with a ray-head container"))
        head = {}
    if head.get("serviceType") in ("LoadBalancer", "NodePort"):
        problems.append(Problem(file, _join(prefix, "headGroupSpec.serviceType"),
                                f"{head['serviceType']} exposes the head's 8265 (Jobs API), "
                                "6379 (GCS) and 10001 (Ray Client) outside the cluster: anyone "
                                "who reaches them can run code on it",
                                "use ClusterIP and `kubectl port-forward`"))
    if head.get("enableIngress"):
        problems.append(Problem(file, _join(prefix, "headGroupSpec.enableIngress"),
                                "an Ingress publishes the dashboard/Jobs API: anyone who "
                                "reaches it can submit jobs, i.e. run code on the cluster",
                                "remove enableIngress; use `kubectl port-forward`"))

    groups = spec.get("workerGroupSpecs") or []
    if not groups:
        problems.append(Problem(file, _join(prefix, "workerGroupSpecs"), "no worker groups",
                                "add a GPU worker group (minReplicas 0)"))
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    all_groups = [("headGroupSpec", head)]
    for i, group in enumerate(groups):
        key = _join(_join(prefix, "workerGroupSpecs"), i)
        all_groups.append((key, group))
        problems += _typo_keys(group, WORKER_GROUP_KEYS, file, key)
        lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        replicas = group.get("replicas", lo)
        if not group.get("groupName"):
            problems.append(Problem(file, _join(key, "groupName"), "missing", "name the group"))
        if lo > hi:
            problems.append(Problem(file, _join(key, "minReplicas"),
                                    f"minReplicas ({lo}) is above maxReplicas ({hi})",
                                    "lower minReplicas or raise maxReplicas"))
        elif not lo <= replicas <= hi:
            problems.append(Problem(file, _join(key, "replicas"),
                                    f"replicas ({replicas}) is outside [{lo}, {hi}]",
                                    "set replicas between minReplicas and maxReplicas"))
        if lo < hi and not autoscaling:
            problems.append(Problem(file, _join(prefix, "enableInTreeAutoscaling"),
                                    f"worker group {group.get('groupName')!r} has a range "
                                    "but autoscaling is off, so it never scales",
                                    "set enableInTreeAutoscaling: true"))

    token = (spec.get("authOptions") or {}).get("mode") == "token"
    for key, group in all_groups:
        for name, value in (group.get("rayStartParams") or {}).items():
            if not isinstance(value, str):
                problems.append(Problem(file, _join(key, f"rayStartParams.{name}"),
                                        f"value {value!r} is not a string (KubeRay rejects it)",
                                        f"quote it: '{value}'"))
        for c, container in enumerate(_containers(group)):
            ckey = _join(f"{key}.template.spec.containers", c)
            problems += _image_problems(str(container.get("image", "")), file,
                                        _join(ckey, "image"), pin)
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
        problems += _typo_keys(spec, RAYJOB_SPEC_KEYS, file, "spec")
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
        problems += _typo_keys(spec, RAYSERVICE_SPEC_KEYS, file, "spec")
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


# --------------------------------------------------------------------------- files and CLI

def config_kind(doc: Any) -> str:
    """"cluster", "serve", "kuberay" (any Kubernetes object) or "" when unrecognised."""
    if not isinstance(doc, dict):
        return ""
    if "apiVersion" in doc and "kind" in doc:
        return "kuberay"
    if "provider" in doc or "available_node_types" in doc or "head_node_type" in doc:
        return "cluster"
    if "applications" in doc or "import_path" in doc:
        return "serve"
    return ""


def validate_file(path: str | Path, check_paths: bool = True) -> list[Problem]:
    """Every problem found in one YAML file (several documents allowed for Kubernetes);
    `check_paths=False` leaves the Serve args' absolute paths unchecked (--paths-on-cluster)."""
    path = Path(path)
    file = str(path)
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except OSError as e:
        return [Problem(file, "(file)", f"cannot read: {e.strerror}", "check the path")]
    except yaml.YAMLError as e:
        return [Problem(file, "(file)", f"not valid YAML: {e}", "fix the YAML syntax")]
    if not docs:
        return [Problem(file, "(file)", "empty file", "add the configuration")]
    problems = []
    for i, doc in enumerate(docs):
        where = file if len(docs) == 1 else f"{file}[doc {i}]"
        kind = config_kind(doc)
        if kind == "cluster":
            problems += validate_cluster_config(doc, where)
        elif kind == "serve":
            problems += validate_serve_config(doc, where, check_paths=check_paths)
        elif kind == "kuberay":
            problems += validate_kuberay_manifest(doc, where)
        else:
            problems.append(Problem(where, "(top level)", "not a Ray cluster, Serve or KubeRay "
                                    "config", "a cluster YAML has `provider`, a Serve config "
                                    "`applications`, a manifest `apiVersion` + `kind`"))
    return problems


def shipped_configs(root: Path = REPO_ROOT) -> list[Path]:
    """The project's own config files: what `raycls validate` checks with no arguments."""
    found = [root / "cluster" / "config.yaml", root / "cluster" / "local.yaml"]
    found += sorted((root / "cluster" / "kuberay").glob("*.yaml"))
    found += sorted((root / "serve").glob("*config*.yaml"))
    return [p for p in found if p.is_file()]


YAML_SUFFIXES = (".yaml", ".yml")


def configs_in(folder: Path) -> list[Path]:
    """Every .yaml/.yml file under `folder`, recursively, sorted; hidden folders and files
    (.git, .github, ...) are skipped."""
    return sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in YAML_SUFFIXES and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )  # fmt: skip


def is_config_file(path: Path) -> bool:
    """Whether any document of a YAML file looks like a cluster, Serve or Kubernetes config
    (files in a folder that are not, like CI workflows, are skipped rather than failed)."""
    try:
        return any(config_kind(d) for d in yaml.safe_load_all(path.read_text()))
    except (OSError, yaml.YAMLError):
        return True  # unreadable or broken YAML: validate_file reports it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Check Ray cluster (`ray up`), Serve (`serve deploy`) and KubeRay configs offline: "
        "schemas, misspelled keys, raycls.deploy arguments (parsed exactly as `serve run` "
        "parses them), bundle paths, GPU counts and a security lint. Exit status: 0 when no "
        "file has errors (warnings and notes are printed only), 1 when one has, 2 when a path "
        "does not exist or a folder holds no config."
    )
    parser.add_argument(
        "paths", nargs="*", metavar="PATH",
        help="YAML files, or folders: every .yaml/.yml file under a folder, recursively "
             "(hidden folders skipped; files that are no Ray cluster, Serve or KubeRay config "
             "are listed as skipped). Default: this project's cluster/*.yaml, "
             "cluster/kuberay/*.yaml and serve/*config*.yaml",
    )  # fmt: skip
    parser.add_argument(
        "--paths-on-cluster", action="store_true",
        help="do not check the absolute bundle and key-file paths in Serve `args` on this "
             "machine (they exist only on the cluster the config is deployed to). (default: "
             "off: a missing absolute path is an error; relative paths are never checked, they "
             "resolve on the cluster, nor the paths of KubeRay's embedded Serve configs, which "
             "are in the pods)",
    )  # fmt: skip


def main(args: argparse.Namespace) -> int:
    given = [Path(p) for p in args.paths]
    missing = [str(p) for p in given if not p.exists()]
    if missing:
        print(f"error: paths={', '.join(missing)}: no such file or folder; give YAML files or "
              "folders of them", file=sys.stderr)
        return 2
    paths: list[Path] = []
    for p in given or shipped_configs():
        if not p.is_dir():
            paths.append(p)
            continue
        found = configs_in(p)
        skipped = [f for f in found if not is_config_file(f)]
        for f in skipped:
            print(f"skipped: {f} (not a Ray cluster, Serve or KubeRay config)")
        if len(found) == len(skipped):
            print(f"error: paths={p}: no Ray cluster, Serve or KubeRay config "
                  f"({'/'.join(YAML_SUFFIXES)}) under this folder", file=sys.stderr)
            return 2
        paths += [f for f in found if f not in skipped]
    failed = False
    for path in paths:
        problems = validate_file(path, check_paths=not args.paths_on_cluster)
        for problem in problems:
            print(problem, file=sys.stderr)
        errors = [p for p in problems if p.level == "error"]
        failed |= bool(errors)
        print(f"{'FAIL' if errors else 'ok'}: {path}" + (f" ({len(errors)} errors)"
                                                         if errors else ""))
    return 1 if failed else 0

"""`ray up` cluster YAML: Ray's own offline validation, the checks Ray skips, and the security
lint (no public ingress to the dashboard, GCS, Ray Client or Serve ports)."""

from __future__ import annotations

import copy
import logging
import re

from raycls.validate.common import (
    PUBLIC_CIDRS,
    SENSITIVE_PORTS,
    Problem,
    image_problems,
    join_key,
    ray_version_pin,
    suggest,
    typo_keys,
)


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
            problems += image_problems(docker[key], file, f"docker.{key}", pin)
    for name, node in (cfg.get("available_node_types") or {}).items():
        image = (node.get("docker") or {}).get("worker_image")
        if image:
            problems += image_problems(
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
                problems.append(Problem(file, join_key(key if err.absolute_path else "", extra),
                                        "unknown key", suggest(extra, allowed)))
        else:
            problems.append(Problem(file, key, err.message, "see Ray's cluster YAML reference"))
    problems += typo_keys(provider, schema["properties"]["provider"]["properties"],
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

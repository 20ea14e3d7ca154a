"""Serve config files: Serve's pydantic schemas with unknown keys named at every level, and for
raycls's own app its `args` through the parser `serve run` uses, bundle paths, GPUs and hosts."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

from raycls.validate.common import Problem, join_key, suggest


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
                Problem(file, join_key(prefix, key), f"unknown {model.__name__} key "
                        "(Serve would silently ignore it)", suggest(key, fields))
            )
            continue
        for sub in _pydantic_models(fields[key].annotation):
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                where = join_key(join_key(prefix, key), i) if isinstance(value, list) else join_key(
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
            where = ", ".join(join_key(key, f"args.{k}") for k in named) or join_key(key, "args")
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
        value, where = args[name], join_key(key, f"args.{name}")
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
        name, where = dep.get("name"), join_key(join_key(key, "deployments"), d)
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
        return [Problem(file, join_key(app_key, "args"), "args must be a mapping of key: value",
                        "see serve/config.yaml")]
    for key in args:
        if key not in fields:
            problems.append(Problem(file, join_key(app_key, f"args.{key}"),
                                    "unknown raycls.deploy argument", suggest(key, fields)))
    known = {k: v for k, v in args.items() if k in fields}
    problems += _args_problems(known, file, app_key)
    if check_paths:
        problems += _path_problems(known, file, app_key)
    problems += _gpu_problems(app, file, app_key)
    names = [d.name for d in vars(serving).values() if isinstance(d, serve.Deployment)]
    for d, dep in enumerate(app.get("deployments") or []):
        name = (dep or {}).get("name")
        if name not in names:
            problems.append(Problem(file, join_key(join_key(app_key, "deployments"), d) + ".name",
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
        file, join_key(app_key, "args"),
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
                key = join_key(key, part)
            problems.append(Problem(file, key or "(top level)", err["msg"],
                                    "see `serve build` output or ray.serve.schema"))

    apps = cfg.get("applications", []) if model is ServeDeploySchema else [cfg]
    for a, app in enumerate(apps if isinstance(apps, list) else []):
        in_file = model is ServeDeploySchema
        app_key = join_key(join_key(prefix, "applications"), a) if in_file else prefix
        if isinstance(app, dict):
            problems += _raycls_app_problems(app, file, app_key, check_paths)
            problems += _host_problems(cfg, app, file, app_key)
        for d, dep in enumerate((app or {}).get("deployments") or []):
            dep_key = join_key(join_key(app_key, "deployments"), d)
            auto = (dep or {}).get("autoscaling_config")
            if not isinstance(auto, dict):
                continue
            lo, hi = auto.get("min_replicas", 1), auto.get("max_replicas", 1)
            if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
                problems.append(Problem(file, join_key(dep_key, "autoscaling_config.min_replicas"),
                                        f"min_replicas ({lo}) is above max_replicas ({hi})",
                                        "lower min_replicas or raise max_replicas"))
                continue
            try:
                AutoscalingConfig.model_validate(auto)
            except ValidationError as e:
                for err in e.errors():
                    problems.append(Problem(file, join_key(dep_key, "autoscaling_config"),
                                            err["msg"], "see ray.serve.config.AutoscalingConfig"))
            if dep.get("num_replicas") not in (None, "auto"):
                problems.append(Problem(file, join_key(dep_key, "num_replicas"),
                                        "num_replicas is fixed but autoscaling_config is set",
                                        "remove num_replicas (or set it to auto)"))
    return problems

"""The arguments of `serve run raycls.deploy key=value ...`: typed, checked, and resolved to models.

`parse_args` turns the strings of `serve run` (or the typed values of a config file's `args:`) into
one frozen `ServeArgs`, refusing a typo with the closest valid name. `resolve_models` then turns
`model=` / `models=` / `models_root=` into the named set of bundles to serve (name -> absolute
path, from each bundle's own `bundle.json` name) plus the default model, loading every bundle once
so a missing, tampered or mismatched one fails before Serve starts. No Ray, no HTTP in here.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from raycls import bundle as bundle_lib
from raycls import images as image_lib

# The environment variable that names the API key file when `api_key_file=` is not given.
API_KEY_FILE_ENV = "RAYCLS_API_KEY_FILE"


class ServeConfigError(ValueError):
    """A `serve run raycls.deploy` argument or the bundle it names is wrong; says how to fix it."""


@dataclass(frozen=True)
class ServeArgs:
    """Every `key=value` argument of `serve run raycls.deploy` (`args:` in serve/config.yaml)."""

    model: str = ""  # one bundle directory; "" = `models` if given, else the newest under root
    models: str = ""  # a folder: every bundle under it is served, each by its bundle name
    default_model: str = ""  # answers /v1/classify and /v1/model; "" = the only or newest one
    models_root: str = "models"  # where neither model nor models: the newest bundle here
    int8: bool = False  # serve model.int8.onnx (only when export kept one)
    top_k: int = 5  # classes per answer when the request has no ?top_k=
    max_batch_size: int = 16  # requests per onnxruntime call (@serve.batch), per model
    # seconds a batch waits to fill. 0: take what is queued; under load batches still form while
    # the previous one runs, and a lone request is not held back (a 2 ms wait cut c=1 req/s 3x)
    batch_wait_timeout_s: float = 0.0
    max_body_bytes: int = 10 * 1024 * 1024  # request body limit (413 beyond it)
    max_pixels: int = image_lib.DEFAULT_MAX_PIXELS  # per image, checked before decoding (413)
    max_images: int = 64  # images per request (multipart `file` fields, V2 batch N)
    api_key_file: str = ""  # keys, one a line; "" = $RAYCLS_API_KEY_FILE, else no keys (open)
    split: bool | None = None  # ingress + classifier deployments; None = true when num_gpus > 0
    num_cpus: float = 1.0  # CPUs per replica
    onnx_threads: int = 0  # onnxruntime threads per replica (no spinning); 0 = num_cpus, >= 1
    num_gpus: float = 0.0  # GPUs per classifier replica (implies split)
    min_replicas: int = 1  # ingress autoscaling range
    max_replicas: int = 1
    classifier_min_replicas: int = 1  # classifier autoscaling range (split only)
    classifier_max_replicas: int = 1
    target_ongoing_requests: float = 32.0  # autoscaling target per replica
    max_ongoing_requests: int = 64  # per replica; Serve's default of 5 collapses under load
    max_queued_requests: int = 256  # per caller; beyond it requests get a fast 503
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    # Serve's per-request access log lines; off by default: on a small model they cost about 10%
    # of a replica's requests/s, and Serve's request metrics still count every request
    access_log: bool = False

    @property
    def is_split(self) -> bool:
        return self.num_gpus > 0 if self.split is None else self.split


# Keys that can change on a running deployment through `user_config` (no replica restart).
# `models` there may also be a mapping {name: bundle path}: add, replace or remove single models.
USER_CONFIG_KEYS = (
    "model", "models", "default_model", "int8", "top_k", "max_batch_size", "batch_wait_timeout_s",
)  # fmt: skip
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _convert(name: str, kind: str, value: Any) -> Any:
    """One argument from `serve run` (always a string) or YAML (typed) to the field's type."""
    text = str(value).strip()
    if kind.startswith("bool"):
        if isinstance(value, bool):
            return value
        if kind.endswith("None") and text.lower() in ("", "none", "auto"):
            return None
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise ServeConfigError(f"{name}={value!r}: expected true or false")
    if kind == "int":
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(text)) if "e" in text.lower() else int(text)
        except ValueError:
            raise ServeConfigError(f"{name}={value!r}: expected a whole number") from None
    if kind == "float":
        try:
            out = float(text)
        except ValueError:
            raise ServeConfigError(f"{name}={value!r}: expected a number") from None
        if not math.isfinite(out):
            raise ServeConfigError(f"{name}={value!r}: expected a finite number")
        return out
    return text


def parse_args(args: dict[str, Any] | None) -> ServeArgs:
    """Typed, validated ServeArgs from `serve run` key=value pairs; ServeConfigError if wrong."""
    if args is None:
        args = {}
    if isinstance(args, ServeArgs):
        return args
    if not isinstance(args, dict):
        raise ServeConfigError(f"arguments must be key=value pairs, got {type(args).__name__}")
    kinds = {f.name: getattr(f.type, "__name__", str(f.type)) for f in fields(ServeArgs)}
    values: dict[str, Any] = {}
    for key, value in args.items():
        if key not in kinds:
            close = difflib.get_close_matches(key, kinds, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ServeConfigError(
                f"{key}={value}: unknown argument, {hint}(valid: {', '.join(kinds)})"
            )
        values[key] = _convert(key, kinds[key], value)
    out = ServeArgs(**values)
    # (the fields at fault, ok, why): a refusal reads `field=value: why`, like every raycls error
    checks = [
        ("top_k", out.top_k >= 1, "must be at least 1"),
        ("max_batch_size", 1 <= out.max_batch_size <= 4096, "must be in 1..4096"),
        ("batch_wait_timeout_s", 0 <= out.batch_wait_timeout_s <= 10, "must be in 0..10 seconds"),
        ("max_body_bytes", out.max_body_bytes >= 1024, "must be at least 1024"),
        ("max_pixels", out.max_pixels >= 1, "must be at least 1"),
        ("max_images", out.max_images >= 1, "must be at least 1"),
        ("onnx_threads", 0 <= out.onnx_threads <= 1024, "must be in 0..1024 (0 = num_cpus)"),
        ("num_cpus", out.num_cpus >= 0, "must be >= 0"),
        ("num_gpus", out.num_gpus >= 0, "must be >= 0"),
        (
            "min_replicas max_replicas",
            1 <= out.min_replicas <= out.max_replicas,
            "need 1 <= min_replicas <= max_replicas",
        ),
        (
            "classifier_min_replicas classifier_max_replicas",
            1 <= out.classifier_min_replicas <= out.classifier_max_replicas,
            "need 1 <= classifier_min_replicas <= classifier_max_replicas",
        ),
        ("target_ongoing_requests", out.target_ongoing_requests > 0, "must be > 0"),
        ("max_ongoing_requests", out.max_ongoing_requests >= 1, "must be at least 1"),
        (
            "max_queued_requests",
            out.max_queued_requests >= 1 or out.max_queued_requests == -1,
            "must be >= 1 (or -1 for unbounded, not recommended)",
        ),
        ("health_check_period_s", out.health_check_period_s > 0, "must be > 0"),
        ("health_check_timeout_s", out.health_check_timeout_s > 0, "must be > 0"),
        (
            "split num_gpus",
            not (out.split is False and out.num_gpus > 0),
            "num_gpus > 0 needs split=true",
        ),
        (
            "model models",
            not (out.model and out.models),
            "give model (one bundle) or models (a folder), not both",
        ),
    ]
    for names, ok, why in checks:
        if not ok:
            given = ", ".join(f"{n}={getattr(out, n)!r}" for n in names.split())
            raise ServeConfigError(f"{given}: {why}")
    return out


# How to make a bundle, for every "no bundle here" refusal.
MAKE_BUNDLE = (
    "make one with `raycls train` then `raycls export RUN_DIR` (it writes models/<run name>/) "
    "or with `python tune/search.py`, or pass model=PATH of an existing bundle"
)


# ----------------------------------------------------------------------------- models


def bundles_in(folder: str | Path) -> dict[str, str]:
    """{bundle name: absolute path} of every bundle directly under `folder` (hidden ones, still
    being written, skipped); ServeConfigError when there is none or two share a name."""
    root = Path(folder).expanduser().resolve()
    found: dict[str, str] = {}
    for meta_path in sorted(root.glob(f"*/{bundle_lib.META_FILE}")):
        if meta_path.parent.name.startswith("."):
            continue
        try:
            name = str(bundle_lib.read_bundle_meta(meta_path.parent)["name"])
        except bundle_lib.BundleError as e:
            raise ServeConfigError(str(e)) from None
        if name in found:
            raise ServeConfigError(
                f"{meta_path.parent} and {found[name]} are both named {name!r} in bundle.json; "
                "every model on one endpoint needs its own name (re-export one with another name)"
            )
        found[name] = str(meta_path.parent)
    if not found:
        raise ServeConfigError(
            f"models={str(folder)!r}: no bundle found under {root}/; {MAKE_BUNDLE}"
        )
    return found


def model_set(model: str = "", models: Any = "", models_root: str = "models") -> dict[str, str]:
    """{name: absolute bundle path} from `model=` (one), `models=` (a folder, or a mapping from a
    `user_config`), or the newest bundle under `models_root`. Reads bundle.json only."""
    if isinstance(models, dict):
        out = {}
        for name, path in models.items():
            p = Path(str(path)).expanduser().resolve()
            try:
                real = str(bundle_lib.read_bundle_meta(p)["name"])
            except bundle_lib.BundleError as e:
                raise ServeConfigError(str(e)) from None
            if real != str(name):
                raise ServeConfigError(
                    f"models: {name!r} points at {p}, whose bundle.json name is {real!r}; a model "
                    "is served under its bundle name"
                )
            out[real] = str(p)
        if not out:
            raise ServeConfigError("models: the mapping is empty; serve at least one bundle")
        return out
    if models:
        return bundles_in(models)
    if not model:
        try:
            model = str(bundle_lib.newest_bundle(models_root))
        except bundle_lib.BundleError:
            root = Path(models_root).expanduser().resolve()
            raise ServeConfigError(
                f"models_root={models_root!r}: no bundle found under {root}/ (and no model= "
                f"given); {MAKE_BUNDLE}"
            ) from None
    path = Path(model).expanduser().resolve()
    if not path.is_dir():
        raise ServeConfigError(f"model={model!r}: no such bundle directory {path}; {MAKE_BUNDLE}")
    try:
        name = str(bundle_lib.read_bundle_meta(path)["name"])
    except bundle_lib.BundleError as e:
        raise ServeConfigError(f"model={model!r}: {e}") from None
    return {name: str(path)}


def pick_default(paths: dict[str, str], wanted: str = "") -> str:
    """The model that answers /v1/classify: `wanted` if given, else the only or newest one."""
    if wanted:
        if wanted not in paths:
            raise ServeConfigError(
                f"default_model={wanted!r} is not among the served models {sorted(paths)}"
            )
        return wanted

    def created(name: str) -> str:
        try:
            meta = json.loads((Path(paths[name]) / bundle_lib.META_FILE).read_text())
            return str(meta.get("created", ""))
        except (OSError, ValueError):
            return ""

    return max(sorted(paths), key=created)


def resolve_models(args: ServeArgs) -> tuple[ServeArgs, dict[str, str], str]:
    """Pin the model paths (replicas may run in another working directory), load every bundle
    once so a broken one fails here, and pick the default. Returns (args, {name: path}, default).
    """
    paths = model_set(args.model, args.models, args.models_root)
    for path in paths.values():
        try:
            bundle_lib.load_bundle(path, int8=args.int8)
        except bundle_lib.BundleError as e:
            raise ServeConfigError(str(e)) from None
    default = pick_default(paths, args.default_model)
    pinned = replace(
        args,
        model=str(Path(args.model).expanduser().resolve()) if args.model else "",
        models=str(Path(args.models).expanduser().resolve()) if args.models else "",
        models_root=str(Path(args.models_root).expanduser().resolve()),
        api_key_file=api_key_path(args),
    )
    return pinned, paths, default


def resolve_model(args: ServeArgs) -> ServeArgs:
    """The one-model form of resolve_models (`model` pinned to an absolute path)."""
    pinned, paths, default = resolve_models(args)
    return replace(pinned, model=paths[default]) if not args.models else pinned


def api_key_path(args: ServeArgs) -> str:
    """The key file (absolute) from `api_key_file=` or $RAYCLS_API_KEY_FILE, "" for none; the
    file must exist and hold at least one key, checked here so a typo fails before Serve starts."""
    from raycls.serving.auth import read_keys

    path = args.api_key_file or os.environ.get(API_KEY_FILE_ENV, "")
    if not path:
        return ""
    full = str(Path(path).expanduser().resolve())
    read_keys(full)
    return full


def user_config_of(args: ServeArgs, paths: dict[str, str], default: str) -> dict[str, Any]:
    """What the model replicas receive in `reconfigure` (and what `serve deploy` may change)."""
    return {
        "models": dict(paths),
        "default_model": default,
        "int8": args.int8,
        "top_k": args.top_k,
        "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": args.batch_wait_timeout_s,
    }

"""Ray Serve deployments: the raycls HTTP API in front of a verified ONNX bundle.

`serve run raycls.deploy [model=models/NAME top_k=5 ...]` calls `deploy(args)` below, which
validates every argument and the bundle before anything starts, then returns one of two layouts:

- single (default on CPU): one `Ingress` deployment (FastAPI) that reads, validates, decodes,
  resizes and classifies in the same replica, batching concurrent requests with `@serve.batch`.
  A second deployment hop costs about half the requests/s on a small machine (ray-notes, "Serve
  speed"), so this is the default.
- split (`split=true`, and the default when `num_gpus > 0`): `Ingress` decodes on CPU and sends
  uint8 arrays to a `Classifier` deployment (onnxruntime, CUDA provider when a GPU is assigned),
  each with its own autoscaling, so decoding scales apart from GPU inference.

The bundle path and batching knobs travel in `user_config`, so `serve deploy` with a new model path
swaps the model in place through `reconfigure` (the new session is loaded beside the old one and
swapped between batches: no request is dropped). Limits are set per replica from the arguments, not
at import. Nothing here imports torch.
"""

# No `from __future__ import annotations` here: Serve's class-based FastAPI views resolve the
# handlers' annotations (Request, Query) at runtime, and strings there come out as missing fields.
import asyncio
import difflib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, TypeAdapter, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from raycls import bundle as bundle_lib

# ----------------------------------------------------------------------------- arguments


class ServeConfigError(ValueError):
    """A `serve run raycls.deploy` argument or the bundle it names is wrong; says how to fix it."""


@dataclass(frozen=True)
class ServeArgs:
    """Every `key=value` argument of `serve run raycls.deploy` (`args:` in serve/config.yaml)."""

    model: str = ""  # bundle directory; "" = the newest bundle under models_root
    models_root: str = "models"  # where `model=""` looks for bundles
    int8: bool = False  # serve model.int8.onnx (only when export kept one)
    top_k: int = 5  # classes per answer when the request has no ?top_k=
    max_batch_size: int = 16  # requests per onnxruntime call (@serve.batch)
    # seconds a batch waits to fill. 0: take what is queued; under load batches still form while
    # the previous one runs, and a lone request is not held back (a 2 ms wait cut c=1 req/s 3x)
    batch_wait_timeout_s: float = 0.0
    max_body_bytes: int = 10 * 1024 * 1024  # request body limit (413 beyond it)
    max_pixels: int = bundle_lib.DEFAULT_MAX_PIXELS  # per image, checked before decoding (413)
    max_images: int = 64  # images per request (multipart `file` fields)
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
USER_CONFIG_KEYS = ("model", "int8", "top_k", "max_batch_size", "batch_wait_timeout_s")
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
                f"unknown argument {key!r}: {hint}valid arguments are {', '.join(kinds)}"
            )
        values[key] = _convert(key, kinds[key], value)
    out = ServeArgs(**values)
    checks = [
        (out.top_k >= 1, "top_k must be at least 1"),
        (1 <= out.max_batch_size <= 4096, "max_batch_size must be in 1..4096"),
        (0 <= out.batch_wait_timeout_s <= 10, "batch_wait_timeout_s must be in 0..10 seconds"),
        (out.max_body_bytes >= 1024, "max_body_bytes must be at least 1024"),
        (out.max_pixels >= 1, "max_pixels must be at least 1"),
        (out.max_images >= 1, "max_images must be at least 1"),
        (0 <= out.onnx_threads <= 1024, "onnx_threads must be in 0..1024 (0 = num_cpus)"),
        (out.num_cpus >= 0 and out.num_gpus >= 0, "num_cpus and num_gpus must be >= 0"),
        (1 <= out.min_replicas <= out.max_replicas, "need 1 <= min_replicas <= max_replicas"),
        (
            1 <= out.classifier_min_replicas <= out.classifier_max_replicas,
            "need 1 <= classifier_min_replicas <= classifier_max_replicas",
        ),
        (out.target_ongoing_requests > 0, "target_ongoing_requests must be > 0"),
        (out.max_ongoing_requests >= 1, "max_ongoing_requests must be at least 1"),
        (
            out.max_queued_requests >= 1 or out.max_queued_requests == -1,
            "max_queued_requests must be >= 1 (or -1 for unbounded, not recommended)",
        ),
        (out.health_check_period_s > 0, "health_check_period_s must be > 0"),
        (out.health_check_timeout_s > 0, "health_check_timeout_s must be > 0"),
        (not (out.split is False and out.num_gpus > 0), "num_gpus > 0 needs split=true"),
    ]
    for ok, message in checks:
        if not ok:
            raise ServeConfigError(f"{message} (got {_describe(out, message)})")
    return out


def _describe(args: ServeArgs, message: str) -> str:
    names = [f.name for f in fields(ServeArgs) if f.name in message]
    return ", ".join(f"{n}={getattr(args, n)!r}" for n in names) or "invalid value"


def resolve_model(args: ServeArgs) -> ServeArgs:
    """Pin `model` to an absolute bundle path (replicas may run in another working directory) and
    load it once here, so a missing, tampered or mismatched bundle fails before Serve starts."""
    try:
        path = Path(args.model) if args.model else bundle_lib.newest_bundle(args.models_root)
        path = path.expanduser().resolve()
        bundle_lib.load_bundle(path, int8=args.int8)
    except bundle_lib.BundleError as e:
        raise ServeConfigError(str(e)) from None
    return replace(args, model=str(path))


def user_config_of(args: ServeArgs) -> dict[str, Any]:
    return {k: getattr(args, k) for k in USER_CONFIG_KEYS}


# ----------------------------------------------------------------------------- the model


class ModelHolder:
    """The bundle a replica serves, swappable while requests run (no Ray in here)."""

    def __init__(self, providers: list[str] | None = None, threads: int = 0):
        self.providers = providers
        self.threads = threads  # onnxruntime intra-op threads; 0 = onnxruntime's default
        self.bundle: bundle_lib.Bundle | None = None

    def session_options(self) -> Any:
        import onnxruntime as ort

        so = ort.SessionOptions()
        if self.threads:
            # onnxruntime's default is one thread per core, spinning between runs: in a replica
            # that shares its CPUs with the HTTP loop (and other replicas), the spinning threads
            # take the cores the event loop needs. Size the pool to the replica's CPUs instead.
            so.intra_op_num_threads = self.threads
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return so

    def load(self, path: str, int8: bool = False) -> bundle_lib.Bundle:
        # Built beside the current one; assigning it is the swap (in-flight batches keep the old
        # Bundle object they already hold).
        new = bundle_lib.load_bundle(
            path, int8=int8, providers=self.providers, session_options=self.session_options()
        )
        self.check(new)
        self.bundle = new
        return new

    def check(self, bundle: bundle_lib.Bundle | None = None) -> None:
        """Run one blank image through the session; raise if it fails or returns garbage."""
        b = bundle or self.bundle
        if b is None:
            raise RuntimeError("no model loaded")
        logits = b.logits(np.zeros((1, b.channels, b.height, b.width), np.uint8))
        if logits.shape != (1, len(b.classes)) or not np.isfinite(logits).all():
            raise RuntimeError(f"model {b.name} returned bad logits {logits.shape}")

    @staticmethod
    def spec(b: bundle_lib.Bundle) -> dict[str, Any]:
        """What an ingress needs to decode for this bundle, plus its public metadata."""
        meta = {k: v for k, v in b.meta.items() if k != "config"}
        return {
            "name": b.name,
            "shape": (b.channels, b.height, b.width),
            "num_classes": len(b.classes),
            "meta": meta,
            "model_file": b.model_file,
        }


def predict_groups(
    b: bundle_lib.Bundle, groups: list[np.ndarray], top_ks: list[int]
) -> list[list[list[dict]]]:
    """One onnxruntime call for several requests' images (each (n_i, C, H, W)), split back."""
    preds = b.predict(np.concatenate(groups), top_k=max(top_ks))
    out, start = [], 0
    for g, k in zip(groups, top_ks, strict=True):
        out.append([p[:k] for p in preds[start : start + len(g)]])
        start += len(g)
    return out


def _providers(num_gpus: float) -> list[str] | None:
    """CUDA first when Ray gave this replica a GPU and onnxruntime has the provider."""
    import onnxruntime as ort  # imported by bundle already; here for the provider list only
    import ray

    if num_gpus > 0 and ray.get_gpu_ids():
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return None


class _ModelReplica:
    """Holds a model, batches requests into onnxruntime calls, swaps models on reconfigure.

    Used by `Ingress` in the single layout and by `Classifier` in the split one.
    """

    def _init_model(self, args: ServeArgs) -> None:
        from ray.serve.metrics import Counter, Histogram

        self._holder = ModelHolder(
            _providers(args.num_gpus), threads=args.onnx_threads or max(1, round(args.num_cpus))
        )
        self._model_args = args
        # one inference thread: the event loop keeps reading and decoding requests meanwhile,
        # which is what lets the next batch fill up
        self._infer_pool = ThreadPoolExecutor(1, thread_name_prefix="raycls-infer")
        self._swap_lock = asyncio.Lock()
        self._m_images = Counter(
            "raycls_images_classified", description="Images classified.", tag_keys=("model",)
        )
        self._m_batch = Histogram(
            "raycls_batch_images",
            description="Images per onnxruntime call.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256],
            tag_keys=("model",),
        )

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Hot swap: load and check the new bundle in a thread while the old one keeps serving."""
        known = {k: v for k, v in (user_config or {}).items() if k in USER_CONFIG_KEYS}
        unknown = sorted(set(user_config or {}) - set(USER_CONFIG_KEYS))
        if unknown:
            raise ServeConfigError(
                f"user_config keys {unknown} are not reconfigurable; use {list(USER_CONFIG_KEYS)}"
            )
        args = parse_args({**asdict(self._model_args), **known})
        async with self._swap_lock:
            b = self._holder.bundle
            if (
                b is None
                or str(b.path) != str(Path(args.model))
                or b.model_file
                != (bundle_lib.INT8_MODEL_FILE if args.int8 else bundle_lib.MODEL_FILE)
            ):
                await asyncio.to_thread(self._holder.load, args.model, args.int8)
            self._infer_batch.set_max_batch_size(args.max_batch_size)
            self._infer_batch.set_batch_wait_timeout_s(args.batch_wait_timeout_s)
            self._model_args = args

    async def check_health(self) -> None:
        """Serve replaces the replica when this raises (a broken or missing session)."""
        if getattr(self, "_holder", None) is not None:
            await asyncio.to_thread(self._holder.check)

    def model_spec(self) -> dict[str, Any]:
        # cached per (bundle, top_k): this runs on every request in the single layout
        b = self._holder.bundle
        if b is None:
            raise RuntimeError("model not loaded yet")
        cached = getattr(self, "_spec_cache", None)
        if cached is None or cached[0] is not b or cached[1]["top_k"] != self._model_args.top_k:
            cached = (b, {**ModelHolder.spec(b), "top_k": self._model_args.top_k})
            self._spec_cache = cached
        return cached[1]

    async def classify_arrays(
        self, images: np.ndarray, top_k: int
    ) -> tuple[str, list[list[dict]]] | None:
        """uint8 (n, C, H, W) -> (name of the model that ran, per image top-k); None if a swap
        changed the input shape. The name comes from the batch, not from before it: a swap
        between reading the spec and running the batch must not label B's answer as A's."""
        return await self._infer_batch((images, top_k))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _infer_batch(self, items: list[tuple[np.ndarray, int]]) -> list[Any]:
        b = self._holder.bundle
        shape = (b.channels, b.height, b.width)
        ok = [i for i, (a, _) in enumerate(items) if a.shape[1:] == shape]
        results: list[Any] = [None] * len(items)  # None: decoded for a model swapped out
        if ok:
            groups = [items[i][0] for i in ok]
            loop = asyncio.get_running_loop()
            out = await loop.run_in_executor(
                self._infer_pool, predict_groups, b, groups, [items[i][1] for i in ok]
            )
            for i, r in zip(ok, out, strict=True):
                results[i] = (b.name, r)
            n = sum(len(g) for g in groups)
            self._m_images.inc(n, tags={"model": b.name})
            self._m_batch.observe(n, tags={"model": b.name})
        return results


# ----------------------------------------------------------------------------- HTTP API


class ApiError(Exception):
    """An answer for the client: HTTP status + stable code + a message that says the fix."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class Prediction(BaseModel):
    label: str
    index: int
    probability: float


class ImageResult(BaseModel):
    filename: str | None
    predictions: list[Prediction]


class ClassifyAnswer(BaseModel):
    model: str
    predictions: list[Prediction] | None = None  # present when exactly one image was sent
    results: list[ImageResult]  # every image, in the order sent


def _err(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


ERRORS: dict[int | str, dict[str, Any]] = {
    400: _err("not an image, truncated or corrupt image, empty body, malformed multipart"),
    413: _err("body over max_body_bytes, too many images, or an image over max_pixels"),
    415: _err("content type or image format not accepted (PNG, JPEG, WEBP, BMP, GIF, TIFF)"),
    422: _err("bad parameter, e.g. top_k outside 1..number of classes"),
    503: _err("overloaded (queue full) or model not loaded; retry with backoff"),
}
RAW_TYPES = ("image/", "application/octet-stream")
# A client sending a too-large body is drained (not stored) up to this many bytes so that it reads
# our 413 instead of a reset connection; beyond it the connection is dropped.
DRAIN_LIMIT = 64 * 1024 * 1024
INLINE_DECODE_BYTES = 16 * 1024  # larger bodies decode in a thread, off the event loop

app = FastAPI(
    title="raycls",
    description="Image classification with an ONNX bundle on Ray Serve.",
    version="1",
)


def _json(status: int, payload: Any) -> Response:
    return Response(json.dumps(payload).encode(), status, media_type="application/json")


def _error(status: int, code: str, message: str) -> Response:
    return _json(status, {"error": {"code": code, "message": message}})


@app.exception_handler(ApiError)
async def _api_error(_: Request, e: ApiError) -> Response:
    return _error(e.status, e.code, e.message)


@app.exception_handler(bundle_lib.ImageError)
async def _image_error(_: Request, e: bundle_lib.ImageError) -> Response:
    return _error(e.status, e.code, str(e))


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError) -> Response:
    parts = [
        f"{'.'.join(str(p) for p in x.get('loc', ())[1:])}: {x.get('msg')}" for x in e.errors()
    ]
    return _error(422, "invalid_parameter", "; ".join(parts) or "invalid request")


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    return _error(e.status_code, code, str(e.detail))


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 from Content-Length or as soon as it passes `limit`."""
    declared = request.headers.get("content-length")
    too_big = ApiError(
        413, "body_too_large", f"request body is over the limit of {limit:,} bytes; "
        "send smaller images or fewer per request"
    )  # fmt: skip
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, "bad_request", "Content-Length is not a number") from None
        if size > limit:
            if size <= DRAIN_LIMIT:
                async for _ in request.stream():
                    pass
            raise too_big
    chunks, size = [], 0
    stream = request.stream()
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            async for chunk in stream:  # drain (bounded) so the client reads the 413
                size += len(chunk)
                if size > DRAIN_LIMIT:
                    break
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def split_images(
    request: Request, body: bytes, max_images: int
) -> list[tuple[str | None, bytes]]:
    """(filename, bytes) per image: the raw body, or every multipart `file` field in order."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(
                max_files=max_images, max_fields=max_images
            )
        except Exception as e:  # starlette's MultiPartException and malformed boundaries
            msg = str(getattr(e, "message", e)) or "malformed multipart body"
            if "Too many" in msg:
                raise ApiError(
                    413, "too_many_images", f"{msg}; send at most {max_images}"
                ) from None
            raise ApiError(
                400, "bad_multipart", f"multipart body cannot be parsed: {msg}"
            ) from None
        files = [f for f in form.getlist("file") if not isinstance(f, str)]
        if not files:
            raise ApiError(
                400, "missing_file", "multipart body has no `file` field; use -F file=@image.png"
            )
        out = [(f.filename, await f.read()) for f in files]
        await form.close()
        return out
    if not any(ctype.startswith(t) for t in RAW_TYPES):
        raise ApiError(
            415, "unsupported_type", f"Content-Type {ctype or '(none)'!r} is not accepted; send "
            "the image as the body with Content-Type image/png (or jpeg, webp, ...) or as "
            "multipart field `file` (curl -F file=@image.png)"
        )  # fmt: skip
    if not body:
        raise ApiError(400, "empty_body", "request body is empty; send the image bytes")
    return [(None, body)]


_TOP_K = TypeAdapter(int)  # FastAPI's own coercion for `top_k: int`, so both paths agree


def _route_path(scope: dict[str, Any]) -> str:
    """The path below the app's route prefix (Serve puts the prefix in root_path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _raw_image_body(scope: dict[str, Any]) -> bool:
    """The same content-type rule as split_images: a raw image body, not multipart."""
    for key, value in scope["headers"]:
        if key == b"content-type":
            return value.decode("latin-1").split(";")[0].strip().lower().startswith(RAW_TYPES)
    return False


def _query_top_k(query_string: bytes) -> int | None:
    """`?top_k=` as FastAPI would read it (the last value wins); ApiError 422 if not an int."""
    if not query_string:
        return None
    values = [v for k, v in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
              if k == "top_k"]  # fmt: skip
    if not values:
        return None
    try:
        return _TOP_K.validate_python(values[-1])
    except ValidationError as e:
        raise ApiError(422, "invalid_parameter", f"top_k: {e.errors()[0]['msg']}") from None


class ClassifyFastPath:
    """Pure ASGI middleware: answers `POST /v1/classify` with a raw image body (the hot path)
    straight from the replica, skipping FastAPI's routing, parameter injection and response
    handling. py-spy put 40-46% of a small model's replica samples under FastAPI/Starlette,
    against about 25% in decode + onnxruntime. Same checks and same answers as the FastAPI route
    (both call `Ingress.classify_request`); multipart bodies and every other route go to FastAPI.
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or _route_path(scope) != "/v1/classify"
            or not _raw_image_body(scope)
        ):
            return await self.app(scope, receive, send)
        try:
            top_k = _query_top_k(scope.get("query_string", b""))
            # the Ingress instance this replica runs (what FastAPI's class-based views use too)
            ingress = serve.get_replica_context().servable_object
            response = await ingress.classify_request(Request(scope, receive), top_k)
        except ApiError as e:
            response = _error(e.status, e.code, e.message)
        except bundle_lib.ImageError as e:
            response = _error(e.status, e.code, str(e))
        await response(scope, receive, send)


app.add_middleware(ClassifyFastPath)


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress(_ModelReplica):
    """HTTP front: read, validate, decode, then classify here (single) or via Classifier (split)."""

    def __init__(self, args: ServeArgs, classifier: Any = None):
        self.args = args
        self.classifier = classifier  # DeploymentHandle in the split layout
        self._spec: dict[str, Any] | None = None
        if classifier is None:
            self._init_model(args)
        # decoding threads for big images; the limits live here, set per replica (see ray-notes)
        self._decode_pool = ThreadPoolExecutor(
            max(1, int(args.num_cpus) or 1), thread_name_prefix="raycls-decode"
        )
        self._formats = bundle_lib.ALLOWED_FORMATS
        self._page = (resources.files("raycls") / "static" / "index.html").read_text()
        from ray.serve.metrics import Counter

        self._m_decode_errors = Counter(
            "raycls_decode_errors", description="Images refused by the decoder.", tag_keys=("code",)
        )

    # -- model access, the same for both layouts
    async def _current_spec(self, refresh: bool = False) -> dict[str, Any]:
        if self.classifier is None:
            return self.model_spec()
        if self._spec is None or refresh:
            self._spec = await self.classifier.model_spec.remote()
        return self._spec

    async def _classify(
        self, images: np.ndarray, top_k: int
    ) -> tuple[str, list[list[dict]]] | None:
        if self.classifier is None:
            return await self.classify_arrays(images, top_k)
        return await self.classifier.classify_arrays.remote(images, top_k)

    def _decode(self, data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
        c, h, w = shape
        return bundle_lib.decode_image(
            data, c, h, w, max_pixels=self.args.max_pixels, formats=self._formats
        )

    async def _decode_all(self, blobs: list[bytes], shape: tuple[int, int, int]) -> np.ndarray:
        if sum(len(b) for b in blobs) <= INLINE_DECODE_BYTES:
            arrays = [self._decode(b, shape) for b in blobs]  # tiny: a thread hop costs more
        else:
            loop = asyncio.get_running_loop()
            arrays = await asyncio.gather(
                *(loop.run_in_executor(self._decode_pool, self._decode, b, shape) for b in blobs)
            )
        return np.stack(arrays)  # (n, C, H, W) uint8

    @app.post(
        "/v1/classify",
        response_model=ClassifyAnswer,
        responses=ERRORS,
        summary="Classify images (raw body or multipart `file` fields, answered in order)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "image/*": {"schema": {"type": "string", "format": "binary"}},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "file": {
                                    "type": "array",
                                    "items": {"type": "string", "format": "binary"},
                                }
                            },
                            "required": ["file"],
                        }
                    },
                },
            }
        },
    )
    async def classify(
        self,
        request: Request,
        top_k: int | None = Query(None, description="classes per image (default: server's)"),
    ) -> Response:
        # raw-body requests are answered by ClassifyFastPath before FastAPI; multipart ones here
        return await self.classify_request(request, top_k)

    async def classify_request(self, request: Request, top_k: int | None) -> Response:
        """POST /v1/classify after routing: one code path for FastAPI and for the fast path."""
        spec = await self._current_spec()
        k = spec["top_k"] if top_k is None else top_k
        if not 1 <= k <= spec["num_classes"]:
            raise ApiError(
                422, "invalid_parameter",
                f"top_k={k} is out of range: use 1..{spec['num_classes']} (the model's classes)",
            )  # fmt: skip
        body = await read_body(request, self.args.max_body_bytes)
        named = await split_images(request, body, self.args.max_images)
        for _ in range(3):  # a model swap with a new input size: decode again for the new one
            try:
                images = await self._decode_all([b for _, b in named], tuple(spec["shape"]))
            except bundle_lib.ImageError as e:
                self._m_decode_errors.inc(tags={"code": e.code})
                raise
            ran = await self._classify(images, k)
            if ran is not None:
                model_name, preds = ran
                break
            spec = await self._current_spec(refresh=True)
        else:
            raise ApiError(503, "model_swapping", "the model is being swapped; retry")
        results = [
            {"filename": n, "predictions": p} for (n, _), p in zip(named, preds, strict=True)
        ]
        answer: dict[str, Any] = {"model": model_name, "results": results}
        if len(results) == 1:
            answer["predictions"] = results[0]["predictions"]
        return _json(200, answer)

    @app.get("/v1/model", responses={503: ERRORS[503]}, summary="The served bundle's metadata")
    async def model(self) -> Response:
        spec = await self._current_spec(refresh=True)
        a = self.args
        serving = {
            "layout": "split" if self.classifier is not None else "single",
            "model_file": spec["model_file"], "top_k": spec["top_k"],
            "max_body_bytes": a.max_body_bytes, "max_pixels": a.max_pixels,
            "max_images": a.max_images, "formats": list(self._formats),
            "replica": serve.get_replica_context().replica_id.unique_id,
        }  # fmt: skip
        if self.classifier is None:
            serving["max_batch_size"] = self._model_args.max_batch_size
            serving["batch_wait_timeout_s"] = self._model_args.batch_wait_timeout_s
        return _json(200, {**spec["meta"], "serving": serving})

    @app.get("/healthz", summary="Liveness: the replica answers HTTP")
    async def healthz(self) -> Response:
        return _json(200, {"status": "ok"})

    @app.get("/readyz", responses={503: ERRORS[503]}, summary="Readiness: a model is loaded")
    async def readyz(self) -> Response:
        try:
            spec = await self._current_spec(refresh=self.classifier is not None)
        except Exception as e:
            return _error(503, "not_ready", f"model not ready: {e}")
        return _json(200, {"status": "ready", "model": spec["name"]})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self._page)


@serve.deployment(name="Classifier")
class Classifier(_ModelReplica):
    """Batched onnxruntime inference on uint8 arrays (split layout; CUDA when given a GPU)."""

    def __init__(self, args: ServeArgs):
        self.args = args
        self._init_model(args)


# ----------------------------------------------------------------------------- builder


def _scaling(lo: int, hi: int, target: float) -> dict[str, Any]:
    if lo == hi:
        return {"num_replicas": lo}
    return {
        "autoscaling_config": {
            "min_replicas": lo,
            "max_replicas": hi,
            "target_ongoing_requests": target,
        }
    }


def build_app(args: ServeArgs) -> serve.Application:
    """The Serve application for already-validated, resolved arguments.

    The model path and batching knobs also go into `user_config`: a `serve deploy` that changes
    only a deployment's `user_config` (not the app's `args`, which Serve hashes into the code
    version and answers with new replicas) swaps them in place through `reconfigure`.
    """
    common = {
        "logging_config": {"enable_access_log": args.access_log},
        "max_ongoing_requests": args.max_ongoing_requests,
        "max_queued_requests": args.max_queued_requests,
        "health_check_period_s": args.health_check_period_s,
        "health_check_timeout_s": args.health_check_timeout_s,
    }
    if not args.is_split:
        return Ingress.options(
            **common,
            **_scaling(args.min_replicas, args.max_replicas, args.target_ongoing_requests),
            ray_actor_options={"num_cpus": args.num_cpus},
            user_config=user_config_of(args),
        ).bind(args)
    classifier = Classifier.options(
        **common,
        **_scaling(
            args.classifier_min_replicas,
            args.classifier_max_replicas,
            args.target_ongoing_requests,
        ),
        ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
        user_config=user_config_of(args),
    ).bind(args)
    return Ingress.options(
        **common,
        **_scaling(args.min_replicas, args.max_replicas, args.target_ongoing_requests),
        ray_actor_options={"num_cpus": args.num_cpus},
    ).bind(args, classifier)


def deploy(args: dict[str, Any]) -> serve.Application:
    """Application builder behind `serve run raycls.deploy key=value ...` (see ServeArgs).

    Validates every argument and loads the bundle once, so mistakes fail here, before any replica
    starts.
    """
    return build_app(resolve_model(parse_args(args)))

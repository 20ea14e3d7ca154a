"""The `Ingress` deployment: HTTP in, decoded uint8 arrays to a model's batch queue, answers out.

Both protocols come down to two calls here: `classify_blobs(name, encoded images)` (decoded and
resized in this replica with the `/v1` limits) and `classify_array(name, uint8 (N, C, H, W))`.
In the single layout the models live in this replica (`ModelReplica`); in the split one they
live in the `Classifier` deployment and this replica only decodes. The ASGI stack, outermost
first: API keys, the V2 routes, the `/v1` raw-body fast path, FastAPI.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

import numpy as np
from ray import serve

from raycls import bundle as bundle_lib
from raycls import images as image_lib
from raycls.serving.args import ServeArgs
from raycls.serving.auth import ApiKeyGuard, read_keys
from raycls.serving.http import ApiError, app, json_response, read_body, split_images
from raycls.serving.models import top_k_predictions
from raycls.serving.replica import ModelReplica
from raycls.serving.v1 import ClassifyFastPath
from raycls.serving.v2 import V2Routes

INLINE_DECODE_BYTES = 16 * 1024  # larger bodies decode in a thread, off the event loop
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
logger = logging.getLogger("ray.serve")

app.add_middleware(ClassifyFastPath)
app.add_middleware(V2Routes)
app.add_middleware(ApiKeyGuard)  # added last = outermost: nothing runs before the key check


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress(ModelReplica):
    """HTTP front: read, validate, decode, then classify here (single) or via Classifier (split)."""

    def __init__(self, args: ServeArgs, classifier: Any = None):
        from ray.serve.metrics import Counter

        self.args = args
        self.classifier = classifier  # DeploymentHandle in the split layout
        self._specs: dict[str, Any] | None = None
        if classifier is None:
            self._init_models(args)
        self.api_key_digests = read_keys(args.api_key_file) if args.api_key_file else ()
        # decoding threads for big images; the limits live here, set per replica (see ray-notes)
        self._decode_pool = ThreadPoolExecutor(
            max(1, int(args.num_cpus) or 1), thread_name_prefix="raycls-decode"
        )
        self._formats = image_lib.ALLOWED_FORMATS
        self.page = (resources.files("raycls") / "static" / "index.html").read_text()
        self._m_decode_errors = Counter(
            "raycls_decode_errors", description="Images refused by the decoder.", tag_keys=("code",)
        )
        self._m_requests = Counter(
            "raycls_requests", description="Classify requests answered, by model and API.",
            tag_keys=("model", "api"),
        )  # fmt: skip
        if not self.api_key_digests:
            _warn_if_exposed()

    # -- model access, the same for both layouts
    async def specs(self, refresh: bool = False) -> dict[str, Any]:
        """{"default": name, "models": {name: spec}}, from this replica or the Classifier."""
        if self.classifier is None:
            return self.model_specs()
        if self._specs is None or refresh:
            self._specs = await self.classifier.model_specs.remote()
        return self._specs

    async def spec_for(self, name: str | None, refresh: bool = False) -> dict[str, Any]:
        """Model `name`'s decode spec (None: the default); ApiError 404 if it is not served."""
        specs = await self.specs(refresh)
        key = name or specs["default"]
        if key not in specs["models"] and not refresh and self.classifier is not None:
            specs = await self.specs(refresh=True)
            key = name or specs["default"]
        spec = specs["models"].get(key)
        if spec is None:
            if name is None:
                raise ApiError(503, "not_ready", "no model is loaded yet; retry")
            raise ApiError(
                404, "unknown_model", f"no model named {name!r}; served: {sorted(specs['models'])}"
            )
        return spec

    async def _infer(self, name: str, images: np.ndarray) -> tuple[str, np.ndarray] | None:
        if self.classifier is None:
            return await self.infer(name, images)
        return await self.classifier.infer.remote(name, images)

    def _decode(self, data: bytes, spec: dict[str, Any]) -> np.ndarray:
        # the bundle's own resize rule, so served pixels are the ones it was validated on
        c, h, w = spec["shape"]
        return image_lib.decode_image(
            data, c, h, w, resize=spec["resize"], max_pixels=self.args.max_pixels,
            formats=self._formats,
        )

    def _decode_named(self, data: bytes, spec: dict[str, Any], label: str | None) -> np.ndarray:
        """One image of a request; a refusal names it (`label`) when the request has several."""
        try:
            return self._decode(data, spec)
        except image_lib.ImageError as e:
            if label is None:
                raise
            raise image_lib.ImageError(f"{label}: {e}", e.status, e.code) from None

    async def _decode_all(
        self, blobs: list[bytes], spec: dict[str, Any], labels: list[str | None]
    ) -> np.ndarray:
        named = list(zip(blobs, labels, strict=True))
        try:
            if sum(len(b) for b in blobs) <= INLINE_DECODE_BYTES:  # tiny: a thread hop costs more
                arrays = [self._decode_named(b, spec, n) for b, n in named]
            else:
                loop = asyncio.get_running_loop()
                arrays = await asyncio.gather(
                    *(loop.run_in_executor(self._decode_pool, self._decode_named, b, spec, n)
                      for b, n in named)
                )  # fmt: skip
        except image_lib.ImageError as e:
            self._m_decode_errors.inc(tags={"code": e.code})
            raise
        return np.stack(arrays)  # (n, C, H, W) uint8

    async def classify_blobs(
        self, name: str | None, blobs: list[bytes], api: str = "v2",
        labels: list[str | None] | None = None,
    ) -> tuple[dict[str, Any], tuple[str, np.ndarray]]:
        """Encoded images -> (spec used, (model that ran, logits)); a swap that changes the
        input size or removes the default model is retried with the new spec. A bad image is
        named in the error by `labels[i]` (default: `image_bytes[i]`, V2's input, when there
        are several)."""
        if labels is None:
            labels = [f"image_bytes[{i}]" if len(blobs) > 1 else None for i in range(len(blobs))]
        spec = await self.spec_for(name)
        for _ in range(3):
            ran = await self._infer(spec["name"], await self._decode_all(blobs, spec, labels))
            if ran is not None:
                self._m_requests.inc(tags={"model": ran[0], "api": api})
                return spec, ran
            spec = await self.spec_for(name, refresh=True)
        raise ApiError(503, "model_swapping", "the model is being swapped; retry")

    async def classify_array(self, name: str, images: np.ndarray) -> tuple[str, np.ndarray]:
        """uint8 (N, C, H, W) already in the model's shape -> (model that ran, logits)."""
        ran = await self._infer(name, images)
        if ran is None:
            raise ApiError(503, "model_swapping", f"model {name!r} is being swapped; retry")
        self._m_requests.inc(tags={"model": ran[0], "api": "v2"})
        return ran

    # -- /v1
    async def classify_request(self, request: Any, top_k: int | None, name: str | None) -> Any:
        """POST /v1/[models/NAME/]classify after routing: one path for FastAPI and fast path."""
        spec = await self.spec_for(name)
        # raycls predict's rule too: the default is capped by the model's classes (a 2-class
        # model beside a 1000-class one); an explicit ?top_k= out of range is the client's mistake
        try:
            k = bundle_lib.resolve_top_k(top_k, spec["num_classes"], default=spec["top_k"])
        except ValueError as e:
            raise ApiError(422, "invalid_parameter", str(e)) from None
        body = await read_body(request, self.args.max_body_bytes)
        named = await split_images(request, body, self.args.max_images)
        labels = [_image_label(f, i, len(named)) for i, (f, _) in enumerate(named)]
        spec, (model_name, logits) = await self.classify_blobs(
            name, [b for _, b in named], "v1", labels
        )
        preds = top_k_predictions(logits, spec["classes"], k)
        results = [
            {"filename": n, "predictions": p} for (n, _), p in zip(named, preds, strict=True)
        ]
        answer: dict[str, Any] = {"model": model_name, "results": results}
        if len(results) == 1:
            answer["predictions"] = results[0]["predictions"]
        return json_response(200, answer)

    async def model_info(self, name: str | None) -> dict[str, Any]:
        spec = await self.spec_for(name, refresh=True)
        a = self.args
        serving = {
            "layout": "split" if self.classifier is not None else "single",
            "model_file": spec["model_file"], "top_k": spec["top_k"],
            "max_body_bytes": a.max_body_bytes, "max_pixels": a.max_pixels,
            "max_images": a.max_images, "formats": list(self._formats),
            "resize": spec["resize"], "api_keys": bool(self.api_key_digests),
            "replica": serve.get_replica_context().replica_id.unique_id,
        }  # fmt: skip
        if self.classifier is None:
            serving.update(self.batching())
        return {**spec["meta"], "serving": serving}

    async def models_info(self) -> dict[str, Any]:
        specs = await self.specs(refresh=True)
        return {
            "default": specs["default"],
            "models": [{**s["meta"], "model_file": s["model_file"]}
                       for _, s in sorted(specs["models"].items())],
        }  # fmt: skip


def _image_label(filename: str | None, i: int, n: int) -> str | None:
    """How an error names image i of n: by its multipart filename and place, None for a lone
    raw body (the request is the image)."""
    place = f"image {i + 1} of {n}" if n > 1 else ""
    if filename:
        return f"file {filename!r}" + (f" ({place})" if place else "")
    return place or None


def _warn_if_exposed() -> None:
    """One log line when Serve's HTTP host is beyond localhost and no API key is set."""
    from raycls.raycompat import RayCompatError, serve_http_host

    try:
        host = serve_http_host()
    except RayCompatError as e:  # say so rather than skip the check in silence
        logger.warning("raycls: cannot tell whether HTTP is exposed: %s", e)
        return
    except Exception:  # noqa: BLE001 - controller busy or gone: a warning is best effort
        return
    if host not in LOCAL_HOSTS:
        logger.warning(
            "raycls: HTTP is bound to %s without API keys: anyone who reaches the port can "
            "classify; set api_key_file=PATH (or $RAYCLS_API_KEY_FILE)", host,
        )  # fmt: skip


__all__ = ["Ingress", "json_response"]

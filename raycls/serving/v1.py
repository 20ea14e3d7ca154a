"""The `/v1` routes: classify (with the raw-body fast path), model metadata, health, the page.

Routes are plain functions on the FastAPI app of `http.py`; each finds the replica it runs in
(`serve.get_replica_context().servable_object`, the `Ingress` instance) and asks it to classify.
`/v1/classify` and `/v1/model` use the default model, `/v1/models/{name}/...` a named one.
"""

# No `from __future__ import annotations` here: FastAPI resolves the handlers' annotations at
# runtime, and strings there come out as missing fields.
import re
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import TypeAdapter, ValidationError
from ray import serve

from raycls import images as image_lib
from raycls.serving.auth import route_path
from raycls.serving.http import (
    ERRORS,
    RAW_TYPES,
    ApiError,
    ClassifyAnswer,
    app,
    error_response,
    json_response,
)


def _ingress() -> Any:
    """The Ingress instance this replica runs (what FastAPI's class-based views use too)."""
    return serve.get_replica_context().servable_object


_CLASSIFY_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                    "required": ["file"],
                }
            },
        },
    }
}
_TOP_K_QUERY = Query(None, description="classes per image (default: server's)")


@app.post(
    "/v1/classify",
    response_model=ClassifyAnswer,
    responses=ERRORS,
    summary="Classify images with the default model (raw body or multipart `file` fields)",
    openapi_extra=_CLASSIFY_BODY,
)
async def classify(request: Request, top_k: int | None = _TOP_K_QUERY) -> Response:
    # raw-body requests are answered by ClassifyFastPath before FastAPI; multipart ones here
    return await _ingress().classify_request(request, top_k, None)


@app.post(
    "/v1/models/{name}/classify",
    response_model=ClassifyAnswer,
    responses={**ERRORS, 404: ERRORS[422] | {"description": "no model of that name"}},
    summary="Classify images with the model `name`",
    openapi_extra=_CLASSIFY_BODY,
)
async def classify_named(name: str, request: Request, top_k: int | None = _TOP_K_QUERY) -> Response:
    return await _ingress().classify_request(request, top_k, name)


@app.get("/v1/model", responses={503: ERRORS[503]}, summary="The default model's metadata")
async def model() -> Response:
    return json_response(200, await _ingress().model_info(None))


@app.get("/v1/models", summary="Every served model's metadata and the default model's name")
async def models() -> Response:
    return json_response(200, await _ingress().models_info())


@app.get("/v1/models/{name}", summary="One model's metadata")
async def model_named(name: str) -> Response:
    return json_response(200, await _ingress().model_info(name))


@app.get("/healthz", summary="Liveness: the replica answers HTTP")
async def healthz() -> Response:
    return json_response(200, {"status": "ok"})


@app.get("/readyz", responses={503: ERRORS[503]}, summary="Readiness: a model is loaded")
async def readyz() -> Response:
    try:
        spec = await _ingress().spec_for(None, refresh=_ingress().classifier is not None)
    except Exception as e:  # noqa: BLE001 - any failure here means not ready
        return error_response(503, "not_ready", f"model not ready: {e}")
    return json_response(200, {"status": "ready", "model": spec["name"]})


@app.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(_ingress().page)


# ----------------------------------------------------------------------------- the fast path

_TOP_K = TypeAdapter(int)  # FastAPI's own coercion for `top_k: int`, so both paths agree
_CLASSIFY_PATH = re.compile(r"^/v1/(?:models/([^/]+)/)?classify$")


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
    """Pure ASGI middleware: answers `POST /v1/[models/NAME/]classify` with a raw image body (the
    hot path) straight from the replica, skipping FastAPI's routing, parameter injection and
    response handling. py-spy put 40-46% of a small model's replica samples under FastAPI/
    Starlette, against about 25% in decode + onnxruntime. Same checks and answers as the FastAPI
    routes (both call `Ingress.classify_request`); multipart and other routes go to FastAPI.
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        match = None
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _CLASSIFY_PATH.match(route_path(scope))
        if match is None or not _raw_image_body(scope):
            return await self.app(scope, receive, send)
        try:
            top_k = _query_top_k(scope.get("query_string", b""))
            response = await _ingress().classify_request(
                Request(scope, receive), top_k, match.group(1)
            )
        except ApiError as e:
            response = error_response(e.status, e.code, e.message)
        except image_lib.ImageError as e:
            response = error_response(e.status, e.code, str(e))
        await response(scope, receive, send)

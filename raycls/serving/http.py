"""The `/v1` HTTP contract: errors, answer schemas, the FastAPI app, and reading request bodies.

Everything a `/v1` route needs before and after the model: JSON errors with a stable code and a
message that says the fix, body limits enforced while reading, multipart or raw image bodies split
into images. Routes live in `v1.py`; the V2 protocol has its own codec and routes.
"""

# No `from __future__ import annotations` here: FastAPI resolves the handlers' annotations at
# runtime, and strings there come out as missing fields.
import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from raycls import images as image_lib


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


def json_response(status: int, payload: Any) -> Response:
    return Response(json.dumps(payload).encode(), status, media_type="application/json")


def error_response(status: int, code: str, message: str) -> Response:
    return json_response(status, {"error": {"code": code, "message": message}})


@app.exception_handler(ApiError)
async def _api_error(_: Request, e: ApiError) -> Response:
    return error_response(e.status, e.code, e.message)


@app.exception_handler(image_lib.ImageError)
async def _image_error(_: Request, e: image_lib.ImageError) -> Response:
    return error_response(e.status, e.code, str(e))


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError) -> Response:
    parts = [
        f"{'.'.join(str(p) for p in x.get('loc', ())[1:])}: {x.get('msg')}" for x in e.errors()
    ]
    return error_response(422, "invalid_parameter", "; ".join(parts) or "invalid request")


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    return error_response(e.status_code, code, str(e.detail))


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
        except Exception as e:  # noqa: BLE001 - starlette's MultiPartException, HTTPException
            raise _multipart_error(e, max_images) from None
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


def _multipart_error(e: Exception, max_images: int) -> ApiError:
    """Starlette's multipart refusal in our words: its own text comes as `400: Invalid
    multipart data.` (an HTTPException's str) or as a MultiPartException's message."""
    why = str(getattr(e, "detail", None) or getattr(e, "message", None) or e).strip()
    if why.startswith("Too many files"):
        return ApiError(
            413, "too_many_images", f"too many images: at most {max_images} multipart `file` "
            "fields per request (max_images); send the rest in another request"
        )  # fmt: skip
    if why.startswith("Too many fields"):
        return ApiError(
            413, "too_many_images", f"too many multipart fields: at most {max_images} per "
            "request (max_images); send only `file` fields"
        )  # fmt: skip
    why = why.rstrip(".") or "malformed"
    return ApiError(
        400, "bad_multipart", f"multipart body cannot be parsed ({why[:1].lower()}{why[1:]}); "
        "send each image as a `file` field (curl -F file=@image.png)"
    )  # fmt: skip

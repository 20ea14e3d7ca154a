"""The `/v2` routes (Open Inference Protocol, REST) as ASGI middleware in front of FastAPI.

The codec (`v2codec.py`) does the wire format; this module routes, checks the tensors against the
model (`images` UINT8 [N, C, H, W] or `image_bytes` BYTES [N]), runs them through the same
`Ingress` path as `/v1` (same limits, same batch queue per model) and encodes `logits` and
`probabilities`, optionally as classification strings. FastAPI is skipped entirely: the body is
never parsed by content type, and a binary batch of 64 images costs no framework work.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import numpy as np
from starlette.requests import Request

from raycls import bundle as bundle_lib
from raycls import images as image_lib
from raycls.serving import v2codec
from raycls.serving.auth import route_path
from raycls.serving.http import ApiError, read_body

VERSION = "1"  # a bundle is one model version; `/versions/1` is accepted, others are 404
OUTPUTS = ("logits", "probabilities")
_MODEL = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?$")
# bodies at least this large are parsed in a thread, off the event loop
THREAD_PARSE_BYTES = 256 * 1024


async def _send(send: Any, status: int, body: bytes, headers: dict[str, str]) -> None:
    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def _json(send: Any, status: int, payload: Any) -> None:
    import json

    await _send(send, status, json.dumps(payload).encode(), {"content-type": "application/json"})


class V2Routes:
    """ASGI middleware answering every `/v2...` path; everything else goes to the inner app."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not route_path(scope).startswith("/v2"):
            return await self.app(scope, receive, send)
        from ray import serve

        ingress = serve.get_replica_context().servable_object
        try:
            await self.route(ingress, scope, receive, send)
        except v2codec.V2Error as e:
            await _send(send, e.status, v2codec.error_body(str(e)), _JSON)
        except ApiError as e:
            await _send(send, e.status, v2codec.error_body(e.message), _JSON)
        except image_lib.ImageError as e:
            # 415 (format not accepted) is a bad request in V2's vocabulary
            status = 400 if e.status == 415 else e.status
            await _send(send, status, v2codec.error_body(str(e)), _JSON)

    async def route(self, ingress: Any, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path, method = route_path(scope).rstrip("/") or "/", scope["method"]
        if path in ("/v2/health/live", "/v2/health/ready", "/v2"):
            _allow(method, "GET")
            if path == "/v2/health/live":
                return await _json(send, 200, {"live": True})
            if path == "/v2":
                return await _json(send, 200, v2codec.server_metadata(VERSION))
            try:
                await ingress.spec_for(None)
            except Exception:  # noqa: BLE001 - not ready, whatever the reason
                return await _json(send, 503, {"ready": False, "error": "no model loaded yet"})
            return await _json(send, 200, {"ready": True})
        m = _MODEL.match(path)
        if m is None:
            raise v2codec.V2Error(f"no route {path}", 404)
        name, version, action = m.groups()
        if version is not None and version != VERSION:
            raise v2codec.V2Error(
                f"model {name!r} has no version {version!r} (only {VERSION})", 404
            )
        spec = await ingress.spec_for(name)
        if action is None:
            _allow(method, "GET")
            meta = v2codec.model_metadata(spec["name"], tuple(spec["shape"]), spec["classes"])
            return await _json(send, 200, meta)
        if action == "/ready":
            _allow(method, "GET")
            return await _json(send, 200, {"name": spec["name"], "ready": True})
        _allow(method, "POST")
        await self.infer(ingress, spec, Request(scope, receive), send)

    async def infer(self, ingress: Any, spec: dict[str, Any], request: Request, send: Any) -> None:
        body = await read_body(request, ingress.args.max_body_bytes)
        header = request.headers.get(v2codec.HEADER)
        if len(body) >= THREAD_PARSE_BYTES:
            req = await asyncio.to_thread(v2codec.parse_infer_request, body, header)
        else:
            req = v2codec.parse_infer_request(body, header)
        wanted = (
            req.outputs if req.outputs is not None else [v2codec.OutputSpec(n) for n in OUTPUTS]
        )
        for o in wanted:
            if o.name not in OUTPUTS:
                raise v2codec.V2Error(f"unknown output {o.name!r}; the outputs are {list(OUTPUTS)}")
        n, ran = await self._run(ingress, spec, req)
        model_name, logits = ran
        probs = None
        outputs = []
        for o in wanted:
            if o.name == "logits":
                scores = logits
            else:
                probs = bundle_lib.softmax(logits) if probs is None else probs
                scores = probs
            binary = req.binary_output if o.binary is None else o.binary
            if o.classification:
                data = v2codec.classify_strings(scores, o.classification, spec["classes"])
                outputs.append((o.name, "BYTES", data, binary))
            else:
                outputs.append((o.name, "FP32", scores, binary))
        payload, headers = v2codec.encode_infer_response(model_name, req.id, outputs, VERSION)
        await _send(send, 200, payload, headers)

    async def _run(self, ingress: Any, spec: dict[str, Any], req: Any) -> tuple[int, Any]:
        if len(req.inputs) != 1:
            raise v2codec.V2Error(
                f"send exactly one input (`images` UINT8 [N, {', '.join(map(str, spec['shape']))}]"
                f" or `image_bytes` BYTES [N]), got {len(req.inputs)}"
            )
        t = req.inputs[0]
        limit = ingress.args.max_images
        if t.name == "images":
            want = [-1, *spec["shape"]]
            if t.datatype != "UINT8":
                raise v2codec.V2Error(f"input 'images' must be UINT8, got {t.datatype}")
            if len(t.shape) != 4 or tuple(t.shape[1:]) != tuple(spec["shape"]) or not t.shape[0]:
                raise v2codec.V2Error(f"input 'images' must have shape {want}, got {list(t.shape)}")
            if t.shape[0] > limit:
                raise v2codec.V2Error(f"{t.shape[0]} images is over max_images={limit}", 413)
            return t.shape[0], await ingress.classify_array(spec["name"], np.asarray(t.data))
        if t.name == "image_bytes":
            if t.datatype != "BYTES":
                raise v2codec.V2Error(f"input 'image_bytes' must be BYTES, got {t.datatype}")
            if len(t.shape) != 1 or not t.shape[0]:
                raise v2codec.V2Error(
                    f"input 'image_bytes' must have shape [N], got {list(t.shape)}"
                )
            if t.shape[0] > limit:
                raise v2codec.V2Error(f"{t.shape[0]} images is over max_images={limit}", 413)
            _, ran = await ingress.classify_blobs(spec["name"], t.data)
            return t.shape[0], ran
        raise v2codec.V2Error(f"unknown input {t.name!r}; the inputs are 'images' or 'image_bytes'")


_JSON = {"content-type": "application/json"}


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise v2codec.V2Error(f"method {method} not allowed here (use {allowed})", 405)

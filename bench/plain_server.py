"""The server a user writes instead of Ray Serve: one uvicorn process, FastAPI + onnxruntime, no
batching. The serving benchmark's reference.

    python bench/plain_server.py --model models/NAME --port 8001

Same bundle, same decode (`raycls.images.decode_image`) and same answer shape as the Serve
endpoint's `POST /v1/classify` with a raw image body, so the two do the same work per request.
"""

from __future__ import annotations

import argparse

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from raycls import bundle as bundle_lib
from raycls import images as image_lib


def build_app(model: str, top_k: int = 5) -> FastAPI:
    b = bundle_lib.load_bundle(model)
    app = FastAPI()

    @app.post("/v1/classify")
    async def classify(request: Request) -> JSONResponse:
        body = await request.body()
        try:
            image = b.decode(body)
        except image_lib.ImageError as e:
            return JSONResponse({"error": {"code": e.code, "message": str(e)}}, e.status)
        preds = b.predict(image[None], top_k=top_k)  # (1, C, H, W): no batching
        return JSONResponse({"model": b.name, "predictions": preds[0]})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        b.logits(np.zeros((1, b.channels, b.height, b.width), np.uint8))
        return JSONResponse({"status": "ready", "model": b.name})

    return app


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="bundle directory")
    p.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    p.add_argument("--port", type=int, default=8001, help="default: 8001")
    a = p.parse_args()
    # access logs off: Serve's are buffered in the fast mode; a user would turn them off too
    uvicorn.run(build_app(a.model), host=a.host, port=a.port, log_level="warning",
                access_log=False)  # fmt: skip


if __name__ == "__main__":
    main()

"""Several models on one endpoint (`/multi`: `digits` and `parity` from one folder, behind API
keys): routing by name on both APIs, concurrently; keys; one model replaced under load."""

from __future__ import annotations

import concurrent.futures as cf
import copy
import threading
import time
from typing import Any

import httpx
import numpy as np
import pytest
from bundles import png_bytes

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def keyed(url: str, bundles: dict[str, Any]):
    headers = {"Authorization": f"Bearer {bundles['keys'][1]}"}
    with httpx.Client(base_url=url + "/multi", timeout=60, headers=headers) as c:
        yield c


def classify(c: httpx.Client, data: bytes, path: str = "/v1/classify", headers=None, **kw: Any):
    return c.post(path, content=data, headers={"content-type": "image/png", **(headers or {})},
                  **kw)  # fmt: skip


def test_api_keys(url, bundles, keyed):
    png = png_bytes(bundles["a"]["test_images"][0])
    with httpx.Client(base_url=url + "/multi", timeout=60) as anon:
        for path in ("/v1/classify", "/v1/models/parity/classify"):
            r = classify(anon, png, path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", r.text
            assert r.headers["www-authenticate"].startswith("Bearer")
            wrong = classify(anon, png, path, headers={"authorization": "Bearer " + "x" * 32})
            assert wrong.status_code == 401, wrong.text
        v2 = anon.get("/v2/models/digits")
        assert v2.status_code == 401 and isinstance(v2.json()["error"], str)
        assert anon.get("/v1/models").status_code == 401
        assert anon.post("/v2/models/digits/infer", content=b"{}").status_code == 401
        # health and readiness stay open, and so does the page (it asks for the key)
        for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready",
                     "/v2/models/digits/ready", "/"):
            assert anon.get(path).status_code == 200, path
    for key in bundles["keys"]:  # every key in the file works
        r = classify(keyed, png, headers={"authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
    # the main app has no keys: open
    assert classify(httpx.Client(base_url=url, timeout=60), png).status_code == 200


def test_models_listed_and_routed_by_name(keyed, bundles):
    listing = keyed.get("/v1/models").json()
    assert listing["default"] == "digits"
    assert {m["name"] for m in listing["models"]} == {"digits", "parity"}
    assert keyed.get("/v1/model").json()["name"] == "digits"
    assert keyed.get("/v1/models/parity").json()["classes"] == ["even", "odd"]
    assert keyed.get("/v1/models/nope").status_code == 404
    assert classify(keyed, b"x", "/v1/models/nope/classify").json()["error"]["code"] == (
        "unknown_model"
    )


def test_both_models_answer_correctly_concurrently(keyed, bundles):
    """Both models, both APIs, 16 threads at once: each answer is from the model named and is
    that model's own answer for the image (the bundle loaded here, in-process, is the oracle)."""
    from raycls.bundle import load_bundle

    images = bundles["a"]["test_images"][:120]
    pngs = [png_bytes(im) for im in images]
    oracle = {name: [p[0] for p in load_bundle(bundles["multi"] / name).predict(images, top_k=1)]
              for name in ("digits", "parity")}  # fmt: skip

    def v1(i: int) -> tuple[str, str]:
        name = "parity" if i % 2 else "digits"
        r = classify(keyed, pngs[i], f"/v1/models/{name}/classify", params={"top_k": 1})
        assert r.status_code == 200, r.text
        return r.json()["model"], r.json()["predictions"][0]["label"]

    def v2(i: int) -> tuple[str, int]:
        name = "parity" if i % 2 else "digits"
        head = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 1, 8, 8],
                            "parameters": {"binary_data_size": 64}}],
                "outputs": [{"name": "logits"}]}  # fmt: skip
        import json

        h = json.dumps(head).encode()
        r = keyed.post(f"/v2/models/{name}/infer", content=h + images[i].tobytes(),
                       headers={"Inference-Header-Content-Length": str(len(h))})  # fmt: skip
        assert r.status_code == 200, r.text
        return r.json()["model_name"], int(np.argmax(r.json()["outputs"][0]["data"]))

    with cf.ThreadPoolExecutor(16) as ex:
        a = list(ex.map(v1, range(len(pngs))))
        b = list(ex.map(v2, range(len(pngs))))
    for i, ((m1, lab), (m2, idx)) in enumerate(zip(a, b, strict=True)):
        want = "parity" if i % 2 else "digits"
        assert m1 == want and m2 == want
        assert (lab, idx) == (oracle[want][i]["label"], oracle[want][i]["index"]), (i, want)


def test_replace_one_model_under_load_drops_nothing(serve_stack, bundles, keyed):
    """`serve deploy` with user_config models {digits: digits2, parity: same}: `digits` is
    swapped in place while both models take requests; no request fails on either, and `parity`
    keeps its session (its answers never change)."""
    from conftest import deploy_config

    png = png_bytes(bundles["a"]["test_images"][3])
    stop, seen = threading.Event(), {"digits": [], "parity": []}

    def hammer(name: str) -> None:
        with httpx.Client(base_url=serve_stack["url"] + "/multi", timeout=60,
                          headers=dict(keyed.headers)) as c:  # fmt: skip
            while not stop.is_set():
                r = classify(c, png, f"/v1/models/{name}/classify")
                seen[name].append((r.status_code, r.text if r.status_code != 200 else
                                   r.json()["predictions"][0]["probability"]))  # fmt: skip

    def redeploy(digits_path: str) -> None:
        cfg = copy.deepcopy(serve_stack["config"])
        app = next(a for a in cfg["applications"] if a["name"] == "multi")
        app["deployments"] = [{"name": "Ingress", "user_config": {
            "models": {"digits": digits_path, "parity": str(bundles["multi"] / "parity")},
            "default_model": "digits"}}]  # fmt: skip
        deploy_config(cfg)

    before = keyed.get("/v1/models/digits").json()["sha256"]["model.onnx"]
    threads = [threading.Thread(target=hammer, args=(n,)) for n in ("digits", "parity", "parity")]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        redeploy(str(bundles["digits2"]["path"]))
        deadline = time.monotonic() + 90
        while keyed.get("/v1/models/digits").json()["sha256"]["model.onnx"] == before:
            assert time.monotonic() < deadline, "digits was never replaced"
            time.sleep(0.3)
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        redeploy(str(bundles["multi"] / "digits"))  # back, for any test after
    for answers in seen.values():
        assert answers and {c for c, _ in answers} == {200}, [a for a in answers if a[0] != 200][:3]
    assert len({round(p, 6) for _, p in seen["parity"]}) == 1  # parity untouched
    assert len({round(p, 6) for _, p in seen["digits"]}) == 2  # old model, then the new one

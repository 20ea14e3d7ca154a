"""The Open Inference Protocol over real HTTP: the real `tritonclient[http]` against the session's
Serve deployment, then raw-HTTP edge cases (each a 4xx JSON error, the service answering right
after) and a hypothesis fuzz of V2 bodies (never a 5xx)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from bundles import png_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def triton(url: str):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


@pytest.fixture(scope="module")
def client(url: str):
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c


def images_input(images: np.ndarray, binary: bool = True) -> Any:
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("images", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images, binary_data=binary)
    return inp


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_health_and_metadata(triton, bundles):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("digits") and not triton.is_model_ready("nope")
    server = triton.get_server_metadata()
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])
    meta = triton.get_model_metadata("digits")
    assert meta["name"] == "digits"
    inputs = {i["name"]: i for i in meta["inputs"]}
    assert inputs["images"] == {"name": "images", "datatype": "UINT8", "shape": [-1, 1, 8, 8]}
    assert inputs["image_bytes"]["datatype"] == "BYTES"
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {
        "logits": [-1, 10], "probabilities": [-1, 10]
    }
    assert meta["parameters"]["classes"] == [str(i) for i in range(10)]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_uint8_equals_local_model(triton, bundles, binary):
    import tritonclient.http as httpclient

    from raycls.bundle import load_bundle

    images = bundles["a"]["test_images"][:7]
    want = load_bundle(bundles["a"]["path"]).logits(images)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary)
               for n in ("logits", "probabilities")]  # fmt: skip
    r = triton.infer("digits", [images_input(images, binary)], outputs=outputs, request_id="r-1")
    resp = r.get_response()
    assert resp["id"] == "r-1" and resp["model_name"] == "digits"
    np.testing.assert_allclose(r.as_numpy("logits"), want, atol=1e-5)
    np.testing.assert_allclose(r.as_numpy("probabilities"), softmax(want), atol=1e-5)
    # outputs=None: every output, binary
    r = triton.infer("digits", [images_input(images, binary)])
    assert r.as_numpy("logits").shape == (7, 10) and r.as_numpy("probabilities").shape == (7, 10)


def test_classification_strings_and_bytes_input_equal_raycls_predict(triton, bundles, tmp_path):
    import tritonclient.http as httpclient

    images = bundles["a"]["test_images"][:12]
    pngs = [png_bytes(im) for im in images]
    inp = httpclient.InferInput("image_bytes", [len(pngs)], "BYTES")
    inp.set_data_from_numpy(np.array(pngs, dtype=object))
    out = httpclient.InferRequestedOutput("probabilities", class_count=3)
    got = triton.infer("digits", [inp], outputs=[out]).as_numpy("probabilities")
    assert got.shape == (12, 3)
    rows = [[e.decode().split(":") for e in row] for row in got]
    files = []
    for i, p in enumerate(pngs):
        f = tmp_path / f"{i:02d}.png"
        f.write_bytes(p)
        files.append(str(f))
    local = json.loads(subprocess.run(
        [sys.executable, "-m", "raycls", "predict", str(bundles["a"]["path"]), *files, "--json",
         "--top-k", "3"], capture_output=True, text=True, check=True, cwd=REPO,
    ).stdout)["results"]  # fmt: skip
    for row, loc in zip(rows, local, strict=True):
        assert [int(i) for _, i, _ in row] == [p["index"] for p in loc["predictions"]]
        assert [lab for _, _, lab in row] == [p["label"] for p in loc["predictions"]]
        np.testing.assert_allclose([float(s) for s, _, _ in row],
                                   [p["probability"] for p in loc["predictions"]], atol=2e-6)
        scores = [float(s) for s, _, _ in row]
        assert scores == sorted(scores, reverse=True)
    # the same on UINT8 input with logits: raw scores, same order
    cls = triton.infer("digits", [images_input(images)], outputs=[
        httpclient.InferRequestedOutput("logits", class_count=3)]).as_numpy("logits")
    assert [[e.decode().split(":")[1] for e in r] for r in cls] == [
        [i for _, i, _ in row] for row in rows]  # fmt: skip


def test_errors_surface_as_inference_server_exception(triton, bundles):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    images = bundles["a"]["test_images"][:2]
    with pytest.raises(InferenceServerException) as e:
        triton.infer("nope", [images_input(images)])
    assert e.value.status() == "404" and "nope" in e.value.message()
    wrong_type = httpclient.InferInput("images", [2, 1, 8, 8], "FP32")
    wrong_type.set_data_from_numpy(images.astype(np.float32))
    with pytest.raises(InferenceServerException) as e:
        triton.infer("digits", [wrong_type])
    assert e.value.status() == "400" and "UINT8" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        triton.infer("digits", [images_input(np.zeros((2, 1, 9, 8), np.uint8))])
    assert e.value.status() == "400" and "[-1, 1, 8, 8]" in e.value.message()
    assert triton.infer("digits", [images_input(images)]).as_numpy("logits").shape == (2, 10)


# ----------------------------------------------------------------------------- raw HTTP


def infer_raw(client: httpx.Client, body: bytes, header: int | None, path="/v2/models/digits"):
    headers = {} if header is None else {"Inference-Header-Content-Length": str(header)}
    return client.post(path + "/infer", content=body, headers=headers)


def assert_v2_error(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text[:300]}"
    assert isinstance(r.json()["error"], str) and r.json()["error"]


def assert_still_serving(client: httpx.Client, bundles) -> None:
    head, blob = header_for(bundles["a"]["test_images"][:2])
    r = infer_raw(client, head + blob, len(head))
    assert r.status_code == 200, r.text


def header_for(images: np.ndarray, size: int | None = None, **extra: Any) -> tuple[bytes, bytes]:
    blob = images.tobytes()
    t = {"name": "images", "datatype": "UINT8", "shape": list(images.shape),
         "parameters": {"binary_data_size": len(blob) if size is None else size}, **extra}
    return json.dumps({"inputs": [t]}).encode(), blob  # fmt: skip


def bomb() -> bytes:
    from test_serving_http import png_bomb

    return png_bomb()


def edge_cases(bundles) -> list[tuple[str, bytes, int | None, int]]:
    imgs = bundles["a"]["test_images"][:2]
    head, blob = header_for(imgs)
    big = np.zeros((65, 1, 8, 8), np.uint8)
    bhead, bblob = header_for(big)
    bad_size_head, _ = header_for(imgs, size=len(blob) - 1)
    both_head, _ = header_for(imgs, data=imgs.reshape(-1).tolist())
    from raycls.serving.v2codec import serialize_bytes

    wire = serialize_bytes([bomb()])
    bomb_head = json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                        "parameters": {"binary_data_size": len(wire)}}]}).encode()
    return [
        ("no header", head + blob, None, 400),
        ("header larger than body", head + blob, len(head + blob) + 10, 400),
        ("trailing bytes", head + blob + b"xx", len(head), 400),
        ("missing bytes", head + blob[:-3], len(head), 400),
        ("size not shape x datatype", bad_size_head + blob[:-1], len(bad_size_head), 400),
        ("data and binary_data_size", both_head + blob, len(both_head), 400),
        ("N over max_images", bhead + bblob, len(bhead), 413),
        ("decompression bomb", bomb_head + wire, len(bomb_head), 413),
        ("raw garbage", b"not an image", 0, 400),
    ]  # fmt: skip


def test_raw_http_edge_cases(client, bundles):
    for name, body, header, status in edge_cases(bundles):
        r = infer_raw(client, body, header)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        assert r.json()["error"], name
        assert_still_serving(client, bundles)
    # a bad image among several encoded ones is named by its place in `image_bytes`
    from raycls.serving.v2codec import serialize_bytes

    wire = serialize_bytes([png_bytes(bundles["a"]["test_images"][0]), b"not an image"])
    head = json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [2],
                                   "parameters": {"binary_data_size": len(wire)}}]}).encode()
    r = infer_raw(client, head + wire, len(head))
    assert r.status_code == 400 and r.json()["error"].startswith("image_bytes[1]: "), r.text


def test_raw_single_png_and_routes(client, bundles):
    r = infer_raw(client, png_bytes(bundles["a"]["test_images"][0]), 0)
    assert r.status_code == 200, r.text
    assert r.json()["model_name"] == "digits" and r.json()["outputs"][0]["shape"] == [1, 10]
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/models/digits/versions/1").json()["name"] == "digits"
    assert_v2_error(client.get("/v2/models/digits/versions/9"), 404)
    assert_v2_error(client.get("/v2/nothing"), 404)
    assert_v2_error(client.get("/v2/models/digits/infer"), 405)


tensor = st.fixed_dictionaries({
    "name": st.sampled_from(["images", "image_bytes", "other"]),
    "datatype": st.sampled_from(["UINT8", "BYTES", "FP32", "INT64"]),
    "shape": st.lists(st.integers(0, 9), max_size=5),
}, optional={"data": st.lists(st.integers(-1, 300), max_size=70),
             "parameters": st.fixed_dictionaries({"binary_data_size": st.integers(0, 200)})})
output = st.fixed_dictionaries(
    {"name": st.sampled_from(["logits", "probabilities", "x"])},
    optional={"parameters": st.fixed_dictionaries({}, optional={
        "classification": st.integers(-1, 20), "binary_data": st.booleans()})},
)  # fmt: skip
request_body = st.fixed_dictionaries(
    {"inputs": st.lists(tensor, min_size=0, max_size=2)},
    optional={"id": st.text(max_size=4), "outputs": st.lists(output, max_size=3)},
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(doc=request_body, tail=st.binary(max_size=200), header=st.booleans())
def test_fuzz_v2_bodies_never_5xx(client, bundles, doc, tail, header):
    head = json.dumps(doc).encode()
    r = infer_raw(client, head + tail, len(head) if header else None)
    assert r.status_code < 500, r.text[:300]
    if r.status_code != 200:
        assert r.json()["error"]

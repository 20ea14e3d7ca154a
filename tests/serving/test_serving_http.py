"""The HTTP API over real HTTP against Serve on a local Ray (see conftest.py for the modes).

Every bad-input test checks the status, the JSON error body, and that the service answers a good
request right after.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from bundles import png_bytes
from PIL import Image

from raycls.bundle import load_bundle

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]


def classify_png(client: httpx.Client, data: bytes, path: str = "/v1/classify", **params):
    return client.post(path, content=data, headers={"content-type": "image/png"}, params=params)


@pytest.fixture(scope="module")
def client(url: str):
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c


@pytest.fixture()
def good_png(bundles: dict[str, Any]) -> bytes:
    return png_bytes(bundles["a"]["test_images"][0])


def assert_still_serving(client: httpx.Client, good_png: bytes) -> None:
    r = classify_png(client, good_png)
    assert r.status_code == 200, r.text
    assert r.json()["predictions"], r.text


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text[:300]}"
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert err["message"], err
    if code:
        assert err["code"] == code, err
    return err


# ----------------------------------------------------------------------------- answers


def test_answers_equal_raycls_predict_and_accuracy(client, bundles, tmp_path):
    """All test images as PNG over HTTP (concurrently, so batches form): the first 200 answers
    equal `raycls predict` on the same files; accuracy equals the bundle's onnx_test_acc."""
    a = bundles["a"]
    images, labels = a["test_images"], a["test_labels"]
    pngs = [png_bytes(im) for im in images]

    with cf.ThreadPoolExecutor(16) as ex:
        answers = list(ex.map(lambda p: classify_png(client, p, top_k=3), pngs))
    assert [r.status_code for r in answers] == [200] * len(pngs)
    served = [r.json() for r in answers]
    assert {s["model"] for s in served} == {"digits"}

    files = []
    for i, p in enumerate(pngs[:200]):
        f = tmp_path / f"{i:03d}.png"
        f.write_bytes(p)
        files.append(str(f))
    out = subprocess.run(
        [sys.executable, "-m", "raycls", "predict", str(a["path"]), *files, "--json",
         "--top-k", "3"],
        capture_output=True, text=True, check=True, cwd=REPO,
    )  # fmt: skip
    local = json.loads(out.stdout)["results"]
    assert len(local) == 200
    for s, loc in zip(served[:200], local, strict=True):
        got, want = s["predictions"], loc["predictions"]
        assert [p["label"] for p in got] == [p["label"] for p in want]
        assert [p["index"] for p in got] == [p["index"] for p in want]
        # batch composition may change onnxruntime's float summation order, nothing more
        np.testing.assert_allclose(
            [p["probability"] for p in got], [p["probability"] for p in want], atol=1e-5
        )

    # every answer, not only the first 200, is the bundle's own (loaded here: the oracle)
    oracle = [p[0]["label"] for p in load_bundle(a["path"]).predict(images, top_k=1)]
    assert [s["predictions"][0]["label"] for s in served] == oracle
    predicted = np.array([int(label) for label in oracle])
    acc = float((predicted == labels).mean())
    assert acc == pytest.approx(a["acc"], abs=1e-9), (acc, a["acc"])
    assert acc > 0.85  # the tiny MLP is a real classifier


def test_multipart_files_answered_in_order(client, bundles):
    imgs = bundles["a"]["test_images"][:5]
    files = [("file", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(imgs)]
    r = client.post("/v1/classify", files=files, params={"top_k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert "predictions" not in body  # several images: only `results`
    assert [x["filename"] for x in body["results"]] == [f"{i}.png" for i in range(5)]
    for x, im in zip(body["results"], imgs, strict=True):
        single = classify_png(client, png_bytes(im), top_k=2).json()["predictions"]
        assert [p["label"] for p in x["predictions"]] == [p["label"] for p in single]
        assert len(x["predictions"]) == 2
        probs = [p["probability"] for p in x["predictions"]]
        assert probs == sorted(probs, reverse=True) and 0 < probs[0] <= 1


def test_jpeg_rgb_image_is_accepted(client, bundles):
    """Colour JPEG of another size: converted to grey and resized like raycls predict does."""
    rgb = np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG")
    r = client.post("/v1/classify", content=buf.getvalue(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 5


def test_model_health_ready_docs(client, serve_stack):
    m = client.get("/v1/model")
    assert m.status_code == 200
    meta = m.json()
    assert meta["name"] == "digits" and meta["classes"] == [str(i) for i in range(10)]
    assert meta["input"]["height"] == 8 and "onnx_test_acc" in meta["metrics"]
    assert meta["sha256"]["model.onnx"]
    assert meta["serving"]["layout"] == serve_stack["layout"]
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = client.get("/openapi.json").json()
    responses = spec["paths"]["/v1/classify"]["post"]["responses"]
    assert {"200", "400", "413", "415", "422", "503"} <= set(responses)
    for code in ("400", "413", "415", "422", "503"):
        ref = responses[code]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorBody")
    assert {"/v1/model", "/healthz", "/readyz"} <= set(spec["paths"])
    page = client.get("/")
    assert page.status_code == 200 and "v1/classify" in page.text


# ----------------------------------------------------------------------------- bad input


def png_bomb(width: int = 12_000, height: int = 10_000) -> bytes:
    """A valid 1-bit greyscale PNG of width x height zeros: ~15 KB that claims 120 megapixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + b"\x00" * ((width + 7) // 8)  # filter byte + packed bits
    raw = zlib.compress(row * height, 9)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_fast(client, good_png):
    bomb = png_bomb()
    assert len(bomb) < 100_000
    with Image.open(io.BytesIO(bomb)) as im:  # it really is that big
        assert im.size[0] * im.size[1] > 100_000_000
    t = time.perf_counter()
    r = classify_png(client, bomb)
    elapsed = time.perf_counter() - t
    assert_error(r, 413, "too_many_pixels")
    assert elapsed < 5, f"bomb took {elapsed:.1f}s: it was decoded, not refused from its header"
    assert_still_serving(client, good_png)


def truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64), np.uint8)).save(
        buf, "JPEG", quality=95
    )
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def tiny_ico() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "ICO")
    return buf.getvalue()


BAD_RAW = [
    # (id, body, content type, status, code)
    ("empty-body", b"", "image/png", 400, "empty_body"),
    ("garbage", b"this is not an image at all" * 10, "image/png", 400, "not_an_image"),
    ("truncated-jpeg", None, "image/jpeg", 400, "truncated_image"),
    ("wrong-content-type", b"hello", "text/plain", 415, "unsupported_type"),
    ("json-content-type", b"{}", "application/json", 415, "unsupported_type"),
    ("ico-not-allowed", None, "image/x-icon", 415, "unsupported_type"),
    ("svg-not-allowed", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml", 415,
     "unsupported_type"),
]  # fmt: skip


@pytest.mark.parametrize(
    "body,ctype,status,code", [b[1:] for b in BAD_RAW], ids=[b[0] for b in BAD_RAW]
)
def test_bad_raw_bodies(client, good_png, body, ctype, status, code):
    if body is None:
        body = truncated_jpeg() if ctype == "image/jpeg" else tiny_ico()
    r = client.post("/v1/classify", content=body, headers={"content-type": ctype})
    assert_error(r, status, code)
    assert_still_serving(client, good_png)


def test_30mb_body_refused(client, good_png):
    r = classify_png(client, b"\x89PNG" + b"\0" * (30 * 1024 * 1024))
    assert_error(r, 413, "body_too_large")
    assert_still_serving(client, good_png)


def test_oversized_chunked_body_refused_while_reading(client, good_png):
    """No Content-Length (chunked upload): the limit is enforced while reading."""

    def chunks():
        for _ in range(12):
            yield b"\0" * (1024 * 1024)

    r = client.post("/v1/classify", content=chunks(), headers={"content-type": "image/png"})
    assert_error(r, 413, "body_too_large")
    assert_still_serving(client, good_png)


@pytest.mark.parametrize("top_k", ["0", "1000", "-3", "abc", "2.5"])
def test_bad_top_k(client, good_png, top_k):
    r = client.post(
        f"/v1/classify?top_k={top_k}", content=good_png, headers={"content-type": "image/png"}
    )
    assert_error(r, 422, "invalid_parameter")
    assert_still_serving(client, good_png)


def test_bad_multipart(client, good_png):
    """Each refusal in our words (no framework text such as `400: ...` inside a 413), and a bad
    image among several is named by its filename and place."""
    r = client.post("/v1/classify", files={"image": ("a.png", good_png, "image/png")})
    assert_error(r, 400, "missing_file")
    files = [("file", (f"{i}.png", good_png, "image/png")) for i in range(65)]
    msg = assert_error(client.post("/v1/classify", files=files), 413, "too_many_images")["message"]
    assert msg.startswith("too many images: at most 64 multipart `file` fields"), msg
    bad = client.post(
        "/v1/classify",
        content=b"--xyz\r\nnot a part",
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    )
    msg = assert_error(bad, 400, "bad_multipart")["message"]
    assert msg.startswith("multipart body cannot be parsed (invalid multipart data)"), msg
    one_bad = [("file", ("ok.png", good_png, "image/png")), ("file", ("bad.png", b"zz", "x/y")),
               ("file", ("ok2.png", good_png, "image/png"))]  # fmt: skip
    msg = assert_error(client.post("/v1/classify", files=one_bad), 400, "not_an_image")["message"]
    assert msg.startswith("file 'bad.png' (image 2 of 3): "), msg
    for m in (msg, r.json()["error"]["message"]):
        assert "400:" not in m and "Maximum number" not in m, m
    assert_still_serving(client, good_png)


def test_unknown_route_is_json_404(client):
    assert_error(client.get("/v3/nothing"), 404, "not_found")  # /v2 is the V2 API's own
    assert_error(client.get("/v1/classify"), 405)


# ----------------------------------------------------------------------------- operations


def noisy_pngs(n: int, size: int = 96) -> list[tuple[str, tuple[str, bytes, str]]]:
    rng = np.random.default_rng(2)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size), np.uint8)).save(buf, "PNG")
        out.append(("file", (f"{i}.png", buf.getvalue(), "image/png")))
    return out


def test_overload_gets_fast_503_then_recovers(url, good_png):
    """`/small` takes 1 request at a time with 1 queued: 32 concurrent heavy requests must get
    some 503s (never a 500, never a hang), and a normal request works once the load stops."""
    files = noisy_pngs(48)

    def send(_: int) -> int:
        with httpx.Client(base_url=url, timeout=60) as c:
            return c.post("/small/v1/classify", files=files).status_code

    t = time.perf_counter()
    with cf.ThreadPoolExecutor(32) as ex:
        codes = list(ex.map(send, range(32)))
    elapsed = time.perf_counter() - t
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1, codes
    assert codes.count(200) >= 1, codes
    assert elapsed < 60
    with httpx.Client(base_url=url, timeout=30) as c:
        r = classify_png(c, good_png, path="/small/v1/classify")
        assert r.status_code == 200, r.text


def test_metrics_are_exported(ray_session, client, good_png):
    """raycls_images_classified reaches Ray's Prometheus endpoint on this node."""
    import ray

    for _ in range(3):
        assert_still_serving(client, good_png)
    node = next(n for n in ray.nodes() if n["Alive"])
    port = node.get("MetricsExportPort")
    if not port:
        pytest.skip("this Ray node exports no metrics port")
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        except httpx.HTTPError:
            text = ""
        if "raycls_images_classified" in text and "raycls_batch_images" in text:
            break
        time.sleep(2)
    assert "raycls_images_classified" in text
    assert "raycls_batch_images" in text


def test_hot_swap_drops_no_request(client, bundles, serve_stack, good_png):
    """The hot swap exactly as serve/config.yaml's comment says (its `user_config: {model: ...}`
    line uncommented, `serve deploy` again, `args` unchanged): the running replica swaps the
    model through reconfigure (same replica, no restart) while 3 clients keep sending, every
    request is answered 200, and the new model answers after."""
    from conftest import deploy_config, hot_swap_text, serve_config

    stop = threading.Event()
    seen: list[tuple[int, str]] = []

    def hammer() -> None:
        with httpx.Client(base_url=serve_stack["url"], timeout=60) as c:
            while not stop.is_set():
                r = classify_png(c, good_png)
                seen.append((r.status_code, r.json().get("model", r.text[:200])))

    def swap_to(which: str, name: str) -> None:
        text = hot_swap_text(bundles[which]["path"])
        deploy_config(serve_config(bundles["a"]["path"], serve_stack["port"], bundles, text))
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if client.get("/v1/model").json().get("name") == name:
                return
            time.sleep(0.3)
        raise AssertionError(f"model never became {name}")

    replica = client.get("/v1/model").json()["serving"]["replica"]
    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        swap_to("b", "digits-b")
        time.sleep(1)
        after = [classify_png(client, good_png).json()["model"] for _ in range(5)]
        swap_to("a", "digits")  # back, for any test that runs after
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    codes = [c for c, _ in seen]
    assert codes and set(codes) == {200}, [s for s in seen if s[0] != 200][:5]
    assert {"digits", "digits-b"} <= {m for _, m in seen}
    assert after == ["digits-b"] * 5, after
    assert client.get("/v1/model").json()["serving"]["replica"] == replica  # reconfigured in place


def test_serve_http_host_is_the_configured_one(url):
    from raycls.raycompat import serve_http_host

    assert serve_http_host() == "127.0.0.1"  # what serve_config binds; the exposure check reads it

"""The bundles of the streaming runs (tests/conftest.py `stream_runs`) served over real HTTP
answer exactly like `raycls predict` on the same files: what was validated is what is served."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from conftest import wait_ready

from raycls.predict import predict_files

pytestmark = pytest.mark.ray


@pytest.mark.parametrize("kind", ["imagefolder", "parquet"])
def test_served_streaming_bundle_answers_like_predict(serve_stack, stream_runs, stream_tree,
                                                      kind: str) -> None:
    from ray import serve

    import raycls

    bundle = stream_runs[kind]["bundle"]
    prefix = f"/stream-{kind}"
    app = raycls.deploy({"model": str(bundle), "num_cpus": 0.25, "max_batch_size": 8})
    serve.run(app, name=f"stream-{kind}", route_prefix=prefix, blocking=False)
    base = serve_stack["url"] + prefix
    try:
        wait_ready(base + "/readyz")
        files = [p for split in ("val", "test") for p, _ in stream_tree["files"][split]]
        local = predict_files(bundle, files, top_k=3)["results"]
        assert len(local) == len(files) >= 20
        for f, want in zip(files, local, strict=True):
            data = Path(f).read_bytes()
            r = httpx.post(base + "/v1/classify?top_k=3", content=data,
                           headers={"Content-Type": "application/octet-stream"}, timeout=30)
            assert r.status_code == 200, r.text
            got = r.json()["predictions"]
            assert [p["label"] for p in got] == [p["label"] for p in want["predictions"]], f
            for a, b in zip(got, want["predictions"], strict=True):
                assert a["probability"] == pytest.approx(b["probability"], abs=1e-6), f
    finally:
        serve.delete(f"stream-{kind}", _blocking=False)

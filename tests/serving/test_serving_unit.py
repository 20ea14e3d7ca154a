"""Serving without a cluster: builder arguments, serve/config.yaml against Serve's own schema,
the model holder's health check and batching split, and the no-torch rule."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "serve" / "config.yaml"


# ----------------------------------------------------------------------------- builder arguments


def test_parse_args_types_and_defaults():
    from raycls.serving import parse_args

    a = parse_args({"top_k": "3", "split": "true", "num_gpus": "0.5", "max_body_bytes": "2048"})
    assert (a.top_k, a.split, a.num_gpus, a.max_body_bytes) == (3, True, 0.5, 2048)
    assert a.is_split
    assert not parse_args({}).is_split  # CPU default: one deployment
    assert parse_args({"num_gpus": 1}).is_split  # a GPU implies the split layout
    assert parse_args({"split": "auto"}).split is None


@pytest.mark.parametrize(
    "args,needle",
    [
        ({"topk": "3"}, "did you mean top_k"),
        ({"top_k": "three"}, "top_k='three': expected a whole number"),
        ({"top_k": "0"}, "top_k=0: must be at least 1"),
        ({"split": "maybe"}, "expected true or false"),
        ({"min_replicas": "3", "max_replicas": "2"}, "min_replicas <= max_replicas"),
        ({"batch_wait_timeout_s": "nan"}, "finite"),
        ({"max_queued_requests": "0"}, "max_queued_requests"),
        ({"split": "false", "num_gpus": "1"}, "num_gpus > 0 needs split=true"),
    ],
)
def test_parse_args_refuses_with_a_clear_message(args, needle):
    from raycls.serving import ServeConfigError, parse_args

    with pytest.raises(ServeConfigError, match=needle.replace("(", r"\(")):
        parse_args(args)


def test_deploy_builds_both_layouts(bundles):
    from ray.serve import Application

    import raycls

    path = str(bundles["a"]["path"])
    assert isinstance(raycls.deploy({"model": path}), Application)
    assert isinstance(raycls.deploy({"model": path, "split": "true"}), Application)


def test_deploy_finds_newest_bundle_and_refuses_missing_or_tampered(bundles, tmp_path):
    from raycls import bundle as bundle_lib
    from raycls.serving import ServeConfigError, parse_args, resolve_model

    resolved = resolve_model(parse_args({"models_root": str(bundles["root"])}))
    assert Path(resolved.model).is_absolute() and Path(resolved.model).parent == bundles["root"]
    with pytest.raises(ServeConfigError, match="no bundle found"):
        resolve_model(parse_args({"models_root": str(tmp_path / "empty")}))
    # a bundle whose model bytes changed after export is refused before anything starts
    bad = tmp_path / "bad"
    meta = json.loads((bundles["a"]["path"] / "bundle.json").read_text())
    meta.pop("sha256")
    onnx = (bundles["a"]["path"] / "model.onnx").read_bytes()
    bundle_lib.write_bundle(bad, meta, {"model.onnx": onnx})
    (bad / "model.onnx").write_bytes(onnx + b"\0")
    with pytest.raises(ServeConfigError, match="sha256 mismatch"):
        resolve_model(parse_args({"model": str(bad)}))


def test_import_raycls_is_light_and_serving_imports_no_torch():
    code = (
        "import sys, raycls; assert 'ray' not in sys.modules, 'import raycls pulled in Ray';"
        "import raycls.serving, raycls.bundle; d = raycls.deploy;"
        "assert 'torch' not in sys.modules, 'serving imported torch'; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ----------------------------------------------------------------------------- serve/config.yaml


def config_problems(cfg: dict[str, Any]) -> list[str]:
    """Everything Serve would silently drop or accept wrongly in a raycls config file."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (
        DeploymentSchema,
        HTTPOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )

    from raycls import serving

    problems = []

    def unknown(data: dict, model: type, where: str) -> None:
        for key in data:
            if key not in model.model_fields:
                problems.append(f"{where}.{key}: not a {model.__name__} field")

    ServeDeploySchema.model_validate(cfg)  # types and required keys
    unknown(cfg, ServeDeploySchema, "config")
    unknown(cfg.get("http_options", {}), HTTPOptionsSchema, "http_options")
    if not cfg.get("http_options", {}).get("request_timeout_s"):
        problems.append("http_options.request_timeout_s: unset (requests could hang forever)")
    for app in cfg["applications"]:
        name = app.get("name")
        unknown(app, ServeApplicationSchema, f"app {name}")
        try:
            args = serving.parse_args(app.get("args") or {})
        except serving.ServeConfigError as e:
            problems.append(f"app {name} args: {e}")
            continue
        names = {"Ingress", "Classifier"} if args.is_split else {"Ingress"}
        for d in app.get("deployments") or []:
            where = f"app {name} deployment {d.get('name')}"
            unknown(d, DeploymentSchema, where)
            if d.get("name") not in names:
                problems.append(f"{where}: no such deployment in this layout ({sorted(names)})")
            auto = d.get("autoscaling_config")
            if auto:
                unknown(auto, AutoscalingConfig, f"{where}.autoscaling_config")
                try:
                    AutoscalingConfig(**auto)
                except ValueError as e:  # pydantic's ValidationError
                    problems.append(f"{where}.autoscaling_config: {e}")
                if auto.get("min_replicas", 1) > auto.get("max_replicas", 1):
                    problems.append(f"{where}: min_replicas > max_replicas")
            if d.get("max_queued_requests", -1) < 1:
                problems.append(f"{where}: max_queued_requests must be bounded (fast 503s)")
            if d.get("max_ongoing_requests", 5) < 16:
                problems.append(f"{where}: max_ongoing_requests below 16 collapses under load")
            gpus = (d.get("ray_actor_options") or {}).get("num_gpus", 0)
            if d.get("name") == "Classifier" and gpus != args.num_gpus:
                problems.append(f"{where}: num_gpus {gpus} differs from args.num_gpus")
    return problems


def test_shipped_config_is_valid():
    cfg = yaml.safe_load(CONFIG.read_text())
    assert config_problems(cfg) == []
    app = cfg["applications"][0]
    assert app["import_path"] == "raycls.deploy"
    assert {d["name"] for d in app["deployments"]} == {"Ingress", "Classifier"}


def test_shipped_config_serves_what_the_quick_start_wrote(bundles, tmp_path, monkeypatch):
    """The shipped `args` in the folder where Ray started (the build's working directory): the
    newest bundle under models/ (the quick start's `models/search-...`), pinned to an absolute
    path; without models/ the refusal names models_root and says how to make a bundle."""
    import shutil

    import raycls
    from raycls.serving import ServeConfigError, parse_args, resolve_models

    args = yaml.safe_load(CONFIG.read_text())["applications"][0]["args"]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ServeConfigError, match="models_root='models': no bundle found.*raycls"):
        resolve_models(parse_args(args))
    shutil.copytree(bundles["a"]["path"], tmp_path / "models" / "search-digits-20260101-000000")
    _, paths, default = resolve_models(parse_args(args))
    assert paths == {"digits": str(tmp_path / "models" / "search-digits-20260101-000000")}
    assert default == "digits"
    assert raycls.deploy(args) is not None


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda c: c["applications"][0]["deployments"][0].update(max_ongoing_request=3),
         "max_ongoing_request: not a DeploymentSchema field"),
        (lambda c: c["applications"][0]["deployments"][0]["autoscaling_config"].update(
            min_replica=2), "min_replica: not a AutoscalingConfig field"),
        (lambda c: c["applications"][0]["deployments"][0]["autoscaling_config"].update(
            min_replicas=5), "min_replicas > max_replicas"),
        (lambda c: c["applications"][0]["args"].update(topk=3), "did you mean top_k"),
        (lambda c: c["applications"][0]["deployments"][1].update(name="Clasifier"),
         "no such deployment"),
        (lambda c: c["applications"][0]["deployments"][0].pop("max_queued_requests"),
         "must be bounded"),
        (lambda c: c["http_options"].update(request_timeout=3), "not a HTTPOptionsSchema field"),
    ],
)  # fmt: skip
def test_config_check_catches_typos(mutate, needle):
    cfg = yaml.safe_load(CONFIG.read_text())
    mutate(cfg)
    assert any(needle in p for p in config_problems(cfg)), config_problems(cfg)


def test_raycls_validate_accepts_shipped_config():
    """The project's own offline validator (`raycls validate`) agrees."""
    out = subprocess.run(
        [sys.executable, "-m", "raycls", "validate", str(CONFIG)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


# ----------------------------------------------------------------------------- model holder


def test_check_health_fails_when_the_session_breaks(bundles):
    from raycls.serving import ModelHolder

    holder = ModelHolder()
    holder.load(str(bundles["a"]["path"]))
    holder.check()  # healthy

    class Broken:
        def run(self, *a, **k):
            raise RuntimeError("onnxruntime session is gone")

    holder.bundle.session = Broken()
    with pytest.raises(RuntimeError, match="session is gone"):
        holder.check()

    class NaNs:
        def run(self, *a, **k):
            return [np.full((1, 10), np.nan, np.float32)]

    holder.bundle.session = NaNs()
    with pytest.raises(RuntimeError, match="bad logits"):
        holder.check()
    with pytest.raises(RuntimeError, match="no model loaded"):
        ModelHolder().check()


def test_predict_groups_equals_one_call_per_request(bundles):
    from raycls.bundle import load_bundle
    from raycls.serving import predict_groups

    b = load_bundle(bundles["a"]["path"])
    images = bundles["a"]["test_images"]
    groups = [images[0:1], images[1:4], images[4:9]]
    top_ks = [1, 5, 3]
    got = predict_groups(b, groups, top_ks)
    for g, k, out in zip(groups, top_ks, got, strict=True):
        want = b.predict(g, top_k=k)
        assert [[p["index"] for p in r] for r in out] == [[p["index"] for p in r] for r in want]
        assert all(len(r) == k for r in out)


def test_serve_args_fields_have_comments():
    """Every builder argument is documented in docs/cli-serve.md."""
    from raycls.serving import ServeArgs

    doc = (REPO / "docs" / "cli-serve.md").read_text()
    missing = [f.name for f in dataclasses.fields(ServeArgs) if f"`{f.name}`" not in doc]
    assert missing == []


# ----------------------------------------------------------------------------- the fast path


class _Recorder:
    """Stands in for the Ingress replica (what serve.get_replica_context() points at)."""

    def __init__(self):
        self.calls: list[tuple[bytes, int | None]] = []

    async def classify_request(self, request, top_k, name=None):
        from starlette.responses import JSONResponse

        body = await request.body()
        self.calls.append((body, top_k))
        return JSONResponse({"fast": True, "bytes": len(body), "top_k": top_k})


@pytest.fixture
def fast_path(monkeypatch):
    """ClassifyFastPath in front of a stand-in for the FastAPI app, behind a real ASGI client."""
    from types import SimpleNamespace

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from raycls import serving

    replica = _Recorder()
    monkeypatch.setattr(
        serving.serve, "get_replica_context", lambda: SimpleNamespace(servable_object=replica)
    )

    async def fallback(request):
        return JSONResponse({"fast": False, "path": request.url.path})

    inner = Starlette(routes=[Route("/{rest:path}", fallback, methods=["GET", "POST"])])
    return TestClient(serving.ClassifyFastPath(inner), root_path="/small"), replica


def test_fast_path_takes_raw_image_posts_only(fast_path):
    client, replica = fast_path
    raw = client.post("/small/v1/classify?top_k=3", content=b"\x89PNG...",
                      headers={"content-type": "image/png"})  # fmt: skip
    assert raw.json() == {"fast": True, "bytes": 7, "top_k": 3}
    octet = client.post("/small/v1/classify", content=b"abc",
                        headers={"content-type": "application/octet-stream"})  # fmt: skip
    assert octet.json()["fast"] is True and octet.json()["top_k"] is None
    # everything else is FastAPI's: multipart, other content types, other routes and methods
    multipart = client.post("/small/v1/classify", files={"file": ("a.png", b"x", "image/png")})
    assert multipart.json()["fast"] is False
    text = client.post("/small/v1/classify", content=b"x", headers={"content-type": "text/plain"})
    assert text.json()["fast"] is False
    assert client.get("/small/v1/classify").json()["fast"] is False
    other = client.post("/small/v2/classify", content=b"x", headers={"content-type": "image/png"})
    assert other.json()["fast"] is False
    assert len(replica.calls) == 2


@pytest.mark.parametrize("query,status,top_k", [
    ("top_k=7", 200, 7), ("top_k=2&top_k=4", 200, 4), ("other=1", 200, None),
    ("top_k=abc", 422, None), ("top_k=2.5", 422, None), ("top_k=", 422, None),
])  # fmt: skip
def test_fast_path_reads_top_k_like_fastapi(fast_path, query, status, top_k):
    client, replica = fast_path
    r = client.post(f"/small/v1/classify?{query}", content=b"img",
                    headers={"content-type": "image/png"})  # fmt: skip
    assert r.status_code == status, r.text
    if status == 200:
        assert r.json()["top_k"] == top_k
    else:
        assert r.json()["error"]["code"] == "invalid_parameter"
        assert "top_k" in r.json()["error"]["message"]
        assert replica.calls == []  # refused before the body is read or the model runs


def test_replica_sizes_onnxruntime_to_its_cpus():
    from raycls.serving import ModelHolder, parse_args

    so = ModelHolder(threads=2).session_options()
    assert so.intra_op_num_threads == 2
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert ModelHolder().session_options().intra_op_num_threads == 0  # onnxruntime's default
    assert parse_args({}).batch_wait_timeout_s == 0 and parse_args({}).access_log is False


# ----------------------------------------------------------------------------- several models


def test_model_set_adds_replaces_and_removes_one_model_at_a_time(bundles, monkeypatch):
    """ModelSet.apply changes only what changed: an untouched model keeps its session and batch
    queue; a replaced one gets a new session under the same name; a removed one is gone."""
    import asyncio
    from types import SimpleNamespace

    from raycls.serving import ModelHolder, ModelSet, serve

    # @serve.batch reads the replica's max_ongoing_requests for a warning; no replica here
    config = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=64))
    monkeypatch.setattr(serve, "get_replica_context", lambda: config)

    batches: list[tuple[str, int]] = []
    models = ModelSet(ModelHolder, lambda name, n: batches.append((name, n)))
    a, parity = str(bundles["multi"] / "digits"), str(bundles["multi"] / "parity")
    images = bundles["a"]["test_images"][:3]

    async def scenario() -> None:
        await models.apply({"digits": a, "parity": parity}, "digits", False, 16, 0.0)
        parity_slot, parity_session = models.slots["parity"], models.slots["parity"].holder
        name, logits = await models.slots["digits"].infer(images)
        assert name == "digits" and logits.shape == (3, 10)
        assert (await models.slots["parity"].infer(images))[1].shape == (3, 2)
        await models.apply({"digits": str(bundles["digits2"]["path"]), "parity": parity},
                           "digits", False, 16, 0.0)  # fmt: skip
        assert models.slots["parity"] is parity_slot and parity_slot.holder is parity_session
        _, new_logits = await models.slots["digits"].infer(images)
        assert not np.allclose(new_logits, logits)  # another seed: another model answered
        await models.apply({"parity": parity}, "parity", False, 16, 0.0)
        assert set(models.slots) == {"parity"} and models.default == "parity"
        assert models.spec("digits", 5) is None and models.spec("parity", 5)["classes"] == [
            "even", "odd"]  # fmt: skip

    asyncio.run(scenario())
    assert ("digits", 3) in batches and ("parity", 3) in batches


def test_models_folder_arguments(bundles, tmp_path):
    from raycls.serving import ServeConfigError, parse_args, resolve_models

    args, paths, default = resolve_models(parse_args({"models": str(bundles["multi"])}))
    assert set(paths) == {"digits", "parity"} and default in paths
    _, _, default = resolve_models(parse_args({"models": str(bundles["multi"]),
                                               "default_model": "parity"}))  # fmt: skip
    assert default == "parity"
    with pytest.raises(ServeConfigError, match="not among the served models"):
        resolve_models(parse_args({"models": str(bundles["multi"]), "default_model": "x"}))
    with pytest.raises(ServeConfigError, match="not both"):
        parse_args({"model": "a", "models": "b"})
    with pytest.raises(ServeConfigError, match="no bundle found"):
        resolve_models(parse_args({"models": str(tmp_path)}))
    short = tmp_path / "keys.txt"
    short.write_text("tooshort\n")
    with pytest.raises(ServeConfigError, match="under 16 characters"):
        resolve_models(parse_args({"models": str(bundles["multi"]), "api_key_file": str(short)}))
    with pytest.raises(ServeConfigError, match="cannot be read"):
        resolve_models(parse_args({"models": str(bundles["multi"]),
                                   "api_key_file": str(tmp_path / "nope")}))  # fmt: skip


def test_api_key_guard_without_ray():
    """ApiKeyGuard in front of a plain Starlette app: 401 on protected routes, health open."""
    import hashlib

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from raycls.serving.auth import ApiKeyGuard, key_allowed

    digests = (hashlib.sha256(b"k" * 20).digest(), hashlib.sha256(b"j" * 20).digest())

    async def ok(request):
        return JSONResponse({"ok": True})

    inner = Starlette(routes=[Route("/{rest:path}", ok, methods=["GET", "POST"])])
    client = TestClient(ApiKeyGuard(inner, lambda: digests))
    assert client.get("/v1/model").status_code == 401
    assert client.get("/v2/models/m").json() == {
        "error": "missing or wrong API key: send the header `Authorization: Bearer KEY`"}
    assert client.get("/v1/model", headers={"Authorization": "Bearer " + "x" * 20}).json()[
        "error"]["code"] == "unauthorized"  # fmt: skip
    for key in ("k" * 20, "j" * 20):
        assert client.get("/v1/model", headers={"Authorization": f"Bearer {key}"}).json() == {
            "ok": True}  # fmt: skip
    for open_path in ("/healthz", "/readyz", "/v2/health/ready", "/v2/models/m/versions/1/ready"):
        assert client.get(open_path).status_code == 200, open_path
    assert not key_allowed("Basic " + "k" * 20, digests) and not key_allowed(None, digests)
    assert TestClient(ApiKeyGuard(inner, lambda: ())).get("/v1/model").status_code == 200

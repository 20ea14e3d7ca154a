"""One bundle and one local Ray + Serve for all serving tests, deployed like `serve deploy`.

RAYCLS_TEST_SERVE_MODE=fast (default) runs Serve throughput-optimized with HAProxy on the HTTP
port, as the README and serve/config.yaml do; =default runs Serve's stock HTTP proxy. Both modes
must pass. RAYCLS_TEST_SERVE_LAYOUT=single (default) | split picks the deployment layout.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from raycls.ray_session import free_port  # noqa: F401  (tests import it from here)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))  # bundles.py helpers
# bench/serving.py's wait_ready is the one copy (tests import it from here); bench/ goes last on
# the path so none of its modules shadows anything
sys.path.append(str(REPO / "bench"))
from serving import wait_ready  # noqa: E402

SERVE_MODE = os.environ.get("RAYCLS_TEST_SERVE_MODE", "fast")
LAYOUT = os.environ.get("RAYCLS_TEST_SERVE_LAYOUT", "single")
FAST_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}


def pytest_configure(config: pytest.Config) -> None:
    # Serve reads these when its modules are imported and Ray's processes inherit them when Ray
    # starts, so they must be set before either happens (pytest_configure runs before collection).
    if SERVE_MODE not in ("fast", "default"):
        raise pytest.UsageError(f"RAYCLS_TEST_SERVE_MODE={SERVE_MODE!r}: use fast or default")
    if LAYOUT not in ("single", "split"):
        raise pytest.UsageError(f"RAYCLS_TEST_SERVE_LAYOUT={LAYOUT!r}: use single or split")
    if SERVE_MODE == "fast":
        os.environ.update(FAST_ENV)
        # HAProxy's stats and metrics ports are fixed (8404, 9101) on all interfaces: a second
        # fast-mode Serve on this machine (another test run, a benchmark) would collide with ours
        os.environ.update(haproxy_port_env())
    else:
        for k in FAST_ENV:
            os.environ.pop(k, None)


def haproxy_port_env() -> dict[str, str]:
    """Ports of our own for the fast mode's fixed-port pieces.

    Seen here: with two Ray clusters on one host, both allocate replica direct-ingress ports from
    30000 up without seeing each other, and one cluster's HAProxy sent our requests to the other
    cluster's replica. HAProxy's stats and metrics ports (8404, 9101) are fixed too. So each test
    Ray gets a random block of 100 ports below the kernel's ephemeral range.
    """
    block = random.Random(os.getpid() ^ time.monotonic_ns()).randrange(50)
    return {
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(20000 + 100 * block),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(20000 + 100 * block + 99),
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(25000 + 100 * block),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(25000 + 100 * block + 99),
    }


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Bundle A (`digits`) plus bundle B (`digits-b`, another seed) for the hot-swap test; a
    folder of two models (`digits`, `parity`) plus an API key file for the multi-model app, and
    `digits2` (also named `digits`, another seed) to replace one of them."""
    from bundles import build_digits_bundle

    root = tmp_path_factory.mktemp("models")
    a = build_digits_bundle(root / "digits", name="digits", seed=0)
    b = build_digits_bundle(root / "digits-b", name="digits-b", seed=1)
    multi = tmp_path_factory.mktemp("multi")
    build_digits_bundle(multi / "digits", name="digits", seed=0)
    parity = build_digits_bundle(multi / "parity", name="parity", seed=0, parity=True)
    digits2 = build_digits_bundle(tmp_path_factory.mktemp("replace") / "digits", seed=2)
    keys = ["k-" + "a" * 30, "k-" + "b" * 30]
    key_file = multi.parent / "api_keys.txt"
    key_file.write_text("# test keys\n" + "\n".join(keys) + "\n")
    return {"root": root, "a": a, "b": b, "multi": multi, "parity": parity, "digits2": digits2,
            "keys": keys, "key_file": key_file}  # fmt: skip


HOT_SWAP_LINE = re.compile(r"^(\s*)# (user_config: \{model: )(\S+)(\})(\s+#.*)?$", re.M)


def hot_swap_text(new_model: Path) -> str:
    """serve/config.yaml with its hot swap done exactly as its comment says: the one commented
    `user_config: {model: ...}` line uncommented and pointed at `new_model`."""
    text = (REPO / "serve" / "config.yaml").read_text()
    assert len(HOT_SWAP_LINE.findall(text)) == 1, "serve/config.yaml: one hot-swap line expected"
    return HOT_SWAP_LINE.sub(lambda m: f"{m[1]}{m[2]}{json.dumps(str(new_model))}{m[4]}", text)


def serve_config(
    model: Path, port: int, multi: dict[str, Any] | None = None, text: str | None = None
) -> dict[str, Any]:
    """serve/config.yaml (or its edited `text`) with the test's bundle, port and layout, plus a
    deliberately small app (`/small`: one request at a time, one queued) for the overload test,
    and (given the bundles fixture as `multi`) `/multi`: two models from one folder behind API
    keys."""
    cfg = yaml.safe_load(text or (REPO / "serve" / "config.yaml").read_text())
    cfg["http_options"].update(host="127.0.0.1", port=port)
    main = cfg["applications"][0]
    main["args"].update(model=str(model), split=LAYOUT == "split", max_batch_size=16)
    for d in main["deployments"]:
        # 2 cores shared by everyone: fixed single replicas, fractional CPUs
        d.pop("autoscaling_config", None)
        d["num_replicas"] = 1
        d["ray_actor_options"]["num_cpus"] = 0.5
        d["health_check_period_s"] = 2  # the broken-session test waits for a replacement
    if LAYOUT == "single":
        # as the file says for `split: false`: the Classifier entry goes, its user_config (a hot
        # swap) moves to Ingress, which then holds the models
        by_name = {d["name"]: d for d in main["deployments"]}
        if "user_config" in by_name["Classifier"]:
            by_name["Ingress"]["user_config"] = by_name["Classifier"]["user_config"]
        main["deployments"] = [by_name["Ingress"]]
    small = {
        "name": "small",
        "route_prefix": "/small",
        "import_path": "raycls.deploy",
        "args": {
            "model": str(model),
            "split": False,
            "max_ongoing_requests": 1,
            "max_queued_requests": 1,
            "num_cpus": 0.25,
        },  # fmt: skip
    }
    cfg["applications"].append(small)
    if multi is not None:
        cfg["applications"].append({
            "name": "multi", "route_prefix": "/multi", "import_path": "raycls.deploy",
            "args": {"models": str(multi["multi"]), "default_model": "digits", "split": False,
                     "api_key_file": str(multi["key_file"]), "num_cpus": 0.25},
        })  # fmt: skip
    return cfg


def deploy_config(cfg: dict[str, Any]) -> None:
    """What `serve deploy` / `serve run config.yaml` do: validate and submit the whole config."""
    from raycls.raycompat import serve_deploy

    serve_deploy(cfg)


@pytest.fixture(scope="session")
def serve_stack(ray_session, bundles: dict[str, Any]) -> dict[str, Any]:
    """Both apps deployed from serve/config.yaml on the session's local Ray (tests/conftest.py)."""
    from ray import serve

    port = free_port()
    cfg = serve_config(bundles["a"]["path"], port, bundles)
    deploy_config(cfg)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base + "/readyz")
    wait_ready(base + "/small/readyz")
    wait_ready(base + "/multi/readyz")
    yield {"url": base, "config": cfg, "port": port, "mode": SERVE_MODE, "layout": LAYOUT}
    for name in ("raycls", "small", "multi"):
        serve.delete(name, _blocking=False)


@pytest.fixture(scope="session")
def url(serve_stack: dict[str, Any]) -> str:
    return serve_stack["url"]

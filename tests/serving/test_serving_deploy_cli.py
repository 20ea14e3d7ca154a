"""The serving commands exactly as docs/cli-serve.md gives them: `serve run raycls.deploy` with bad
arguments (fast: refused before Ray starts), and `ray start` + `serve deploy serve/config.yaml`
(slow: it starts its own Ray head with the dashboard, which `serve deploy` talks to)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from bundles import png_bytes
from conftest import FAST_ENV, SERVE_MODE, free_port, haproxy_port_env, wait_ready

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# `serve run raycls.deploy ARG` -> what the one error line must say (the field and the fix)
BAD_RUNS = {
    "topk=3": ["topk=3", "did you mean top_k?"],
    "max_batch_size=lots": ["max_batch_size='lots'", "expected a whole number"],
    "top_k=0": ["top_k=0", "must be at least 1"],
    "model=/nonexistent": ["model='/nonexistent'", "no such bundle directory", "raycls export"],
    "": ["models_root='models'", "no bundle found", "raycls train", "raycls export", "model=PATH"],
}


def test_serve_run_bad_arguments_are_one_line_without_ray(tmp_path):
    """Each bad `serve run raycls.deploy` argument (and a bare one in a folder without models/):
    one `error:` line naming the field and the fix, exit status 2, no traceback, no Ray started.
    The five commands run side by side (each is mostly Python imports)."""
    t0 = time.monotonic()
    procs = {
        arg: subprocess.Popen(
            [str(BIN / "serve"), "run", "raycls.deploy", *([arg] if arg else [])],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for arg in BAD_RUNS
    }
    for arg, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        what = f"serve run raycls.deploy {arg}: rc={proc.returncode}\n{out}\n{err}"
        assert proc.returncode == 2, what
        assert "Traceback" not in out + err and "ServeConfigError" not in out + err, what
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, what
        assert all(needle in errors[0] for needle in BAD_RUNS[arg]), what
        assert "Started a local Ray instance" not in out + err, what
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "models").exists()


def serve_cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "serve"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def app_status(address: str, env: dict[str, str]) -> tuple[str, str]:
    """(status, message) of the `raycls` app from `serve status` ("", "" while there is none)."""
    out = serve_cli("status", "-a", address, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    app = (yaml.safe_load(out.stdout) or {}).get("applications", {}).get("raycls") or {}
    return app.get("status", ""), app.get("message", "")


def wait_app_status(address: str, env: dict[str, str], want: str, timeout: float = 180) -> str:
    deadline, last = time.monotonic() + timeout, ("", "")
    while time.monotonic() < deadline:
        last = app_status(address, env)
        if last[0] == want:
            return last[1]
        time.sleep(2)
    raise AssertionError(f"app never reached {want}: {last}")


@pytest.mark.slow
@pytest.mark.ray
def test_serve_deploy_config_file(bundles, tmp_path):
    """docs/cli-serve.md's steps with the shipped serve/config.yaml (only the port and CPUs
    changed): `ray start --head` in a folder, token auth on. Without models/ there, `serve status`
    gives DEPLOY_FAILED and the one-line reason; once models/ holds a bundle (relative paths
    resolve where Ray started, not where `serve` runs), the same file deploys and serves it.
    `serve status` works with RAY_AUTH_MODE=token and is refused without it."""
    import secrets
    import shutil

    http, gcs, dash = free_port(), free_port(), free_port()
    cfg = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    cfg["http_options"]["port"] = http
    for d in cfg["applications"][0]["deployments"]:
        d["ray_actor_options"]["num_cpus"] = 0.5
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    ray_dir, elsewhere = tmp_path / "cluster", tmp_path / "elsewhere"
    ray_dir.mkdir()
    elsewhere.mkdir()

    log = tmp_path / "ray-start.log"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    if SERVE_MODE == "fast":  # own HAProxy ports: the session's Serve may still be running
        ports = haproxy_port_env()
        key = "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"
        while ports[key] == os.environ.get(key):
            ports = haproxy_port_env()
        env.update(FAST_ENV, **ports)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=4",
         "--include-dashboard=true", f"--dashboard-port={dash}", "--disable-usage-stats"],
        env=env, cwd=ray_dir, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dash}"

    def deploy() -> None:
        deadline = time.monotonic() + 120
        while True:
            out = subprocess.run(
                [str(BIN / "serve"), "deploy", str(config), "-a", address],
                env=env, capture_output=True, text=True, timeout=120, cwd=elsewhere,
            )  # fmt: skip
            if out.returncode == 0:
                return
            if time.monotonic() > deadline:
                pytest.fail(
                    f"serve deploy failed: {out.stderr[-1500:]}\n"
                    f"ray start: {log.read_text()[-1500:]}"
                )
            time.sleep(3)  # the dashboard is still starting

    try:
        deploy()  # no models/ where Ray started: accepted, then DEPLOY_FAILED with the reason
        message = wait_app_status(address, env, "DEPLOY_FAILED")
        assert f"models_root='models': no bundle found under {ray_dir}/models/" in message, message
        assert "raycls export" in message and "Traceback" not in message, message
        unauthenticated = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
        refused = serve_cli("status", "-a", address, env=unauthenticated)
        assert refused.returncode != 0, refused.stdout
        assert "Authentication" in refused.stdout + refused.stderr, refused.stderr[-1500:]

        shutil.copytree(bundles["a"]["path"], ray_dir / "models" / "search-digits-20260101-000000")
        deploy()
        wait_app_status(address, env, "RUNNING")
        base = f"http://127.0.0.1:{http}"
        wait_ready(base + "/readyz", timeout=180)
        r = httpx.post(base + "/v1/classify", files={"file": ("d.png", png_bytes(
            bundles["a"]["test_images"][0]))}, timeout=30)  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "digits"
        assert httpx.get(base + "/v1/model").json()["serving"]["layout"] == "split"
    finally:
        # Serve first (it owns the HAProxy daemon, which would outlive its Ray), then Ray:
        # `ray start --block` tears down what it started when its process group is signalled
        serve_cli("shutdown", "-y", "-a", address, env=env)
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)

"""serve/client.py: against the real server, and its 503 retry against a scripted stub server."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from bundles import png_bytes

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "serve" / "client.py"


def run_client(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CLIENT), *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.ray
def test_client_folder_json_and_table(url, bundles, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(bundles["a"]["test_images"][:5]):
        (folder / f"{i}.png").write_bytes(png_bytes(im))
    out = run_client("--url", url, "--json", "--top-k", "2", "--batch", "2", str(folder))
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [Path(r["filename"]).name for r in rows] == [f"{i}.png" for i in range(5)]
    assert all(r["model"] == "digits" and len(r["predictions"]) == 2 for r in rows)
    labels = [str(x) for x in bundles["a"]["test_labels"][:5]]
    assert sum(r["predictions"][0]["label"] == y for r, y in zip(rows, labels, strict=True)) >= 4

    (folder / "broken.png").write_bytes(b"not an image")
    table = run_client("--url", url, str(folder))
    assert table.returncode == 1  # one image failed
    assert "broken.png" in table.stdout and "HTTP 400" in table.stdout
    assert table.stdout.count("1. ") == 5  # the five good images still answered


def test_client_usage_errors(tmp_path):
    out = run_client(str(tmp_path / "missing.png"))
    assert out.returncode == 2 and "no such file or folder" in out.stderr
    out = run_client("--top-k", "0", str(tmp_path))
    assert out.returncode == 2 and "must be at least 1" in out.stderr


class Scripted(BaseHTTPRequestHandler):
    """503 for the first `fail` requests, then a valid answer."""

    fail = 2
    seen = 0

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen += 1
        if type(self).seen <= type(self).fail:
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b"Service Unavailable")
            return
        body = json.dumps({"model": "stub", "results": [
            {"filename": "x.png", "predictions": [{"label": "a", "index": 0, "probability": 1.0}]}
        ]}).encode()  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("fail,retries,code", [(2, 3, 0), (4, 2, 1)])
def test_client_retries_503_with_backoff(tmp_path, fail, retries, code):
    Scripted.fail, Scripted.seen = fail, 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        img = tmp_path / "x.png"
        img.write_bytes(b"\x89PNG")
        out = run_client(
            "--url", f"http://127.0.0.1:{server.server_port}", "--json", "--retries",
            str(retries), "--backoff", "0.01", str(img),
        )  # fmt: skip
    finally:
        server.shutdown()
    assert out.returncode == code, out.stdout + out.stderr
    row = json.loads(out.stdout)
    if code == 0:
        assert row["predictions"][0]["label"] == "a"
        assert Scripted.seen == fail + 1
    else:
        assert "HTTP 503" in row["error"]
        assert Scripted.seen == retries + 1

"""The upload page end to end in headless Chromium, driven over the DevTools protocol.

Needs Debian's `chromium` (apt-get install -y chromium); skipped with that reason when absent.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from bundles import png_bytes

pytestmark = pytest.mark.ray

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class DevTools:
    """The few CDP calls the test needs, over one page's websocket."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=30)
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:  # skip events until our answer arrives
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def eval(self, expression: str) -> Any:
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                      awaitPromise=True)  # fmt: skip
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"page never satisfied: {expression}")


@pytest.fixture()
def browser(tmp_path, url):
    if not Path(CHROMIUM).exists():
        pytest.skip("headless browser test needs Debian's chromium: apt-get install -y chromium")
    profile = tmp_path / "profile"
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={profile}", "--remote-debugging-port=0",
         url + "/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"chromium did not start (exit {proc.poll()})")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        pages = []
        while not pages and time.monotonic() < deadline:
            targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
            pages = [t for t in targets if t["type"] == "page"]
            time.sleep(0.1)
        tools = DevTools(pages[0]["webSocketDebuggerUrl"])
        tools.wait_for("document.readyState === 'complete' && !!document.getElementById('drop')")
        yield tools
        tools.ws.close()
    finally:
        proc.terminate()  # our own chromium, by its handle
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


RENDERED = (
    "document.getElementById('status').textContent.startsWith('done') && "
    "JSON.stringify([...document.querySelectorAll('.pred')].map("
    "e => [e.dataset.label, Number(e.dataset.probability)]))"
)


def test_upload_page_shows_top5(browser, client_answer):
    image, answer = client_answer
    # the model name is fetched from /v1/model when the page loads
    assert (
        browser.wait_for(
            "document.getElementById('model-name').textContent !== '…' && "
            "document.getElementById('model-name').textContent"
        )
        == "digits"
    )

    # 1) choose a file from disk through the page's <input type=file>
    doc = browser.call("DOM.getDocument")
    node = browser.call("DOM.querySelector", nodeId=doc["root"]["nodeId"], selector="#file")
    browser.call("DOM.setFileInputFiles", nodeId=node["nodeId"], files=[str(image)])
    rows = json.loads(browser.wait_for(RENDERED))
    expected = [[p["label"], p["probability"]] for p in answer["predictions"]]
    assert [r[0] for r in rows] == [e[0] for e in expected]
    for (_, got), (_, want) in zip(rows, expected, strict=True):
        assert abs(got - want) < 1e-5
    widths = browser.eval("[...document.querySelectorAll('.bar')].map(b => b.style.width)")
    assert len(widths) == 5 and float(widths[0].rstrip("%")) >= float(widths[-1].rstrip("%"))

    # 2) drag and drop: a drop event carrying the same file
    browser.eval("document.getElementById('results').replaceChildren();"
                 "document.getElementById('status').textContent = ''")  # fmt: skip
    b64 = base64.b64encode(image.read_bytes()).decode()
    browser.eval(
        f"(() => {{ const bytes = Uint8Array.from(atob('{b64}'), c => c.charCodeAt(0));"
        "const dt = new DataTransfer();"
        "dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));"
        "document.getElementById('drop').dispatchEvent("
        "new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true})); })()"
    )
    rows = json.loads(browser.wait_for(RENDERED))
    assert [r[0] for r in rows] == [e[0] for e in expected]

    # 3) a bad file shows the server's error message, not a blank page
    browser.eval(
        "(() => { const dt = new DataTransfer();"
        "dt.items.add(new File([new Uint8Array([1, 2, 3])], 'bad.png', {type: 'image/png'}));"
        "document.getElementById('drop').dispatchEvent("
        "new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true})); })()"
    )
    message = browser.wait_for(
        "document.getElementById('status').className === 'error' && "
        "document.getElementById('status').textContent"
    )
    assert "400" in message and "not a recognised image" in message


@pytest.fixture()
def client_answer(url, bundles, tmp_path):
    image = tmp_path / "digit.png"
    image.write_bytes(png_bytes(bundles["a"]["test_images"][3]))
    r = httpx.post(url + "/v1/classify", files={"file": ("digit.png", image.read_bytes())})
    assert r.status_code == 200, r.text
    return image, r.json()

"""A closed-loop HTTP/1.1 load generator lean enough not to be the bottleneck on 2 cores.

`concurrency` connections (keep-alive), each sending the next prepared request as soon as the
previous answer is read. Requests are pre-built bytes (POST of a PNG body), so the client's cost is
one socket write and one header parse per request: a few microseconds, against hundreds for any
server here. Written on asyncio streams (uvloop when installed) rather than httpx/aiohttp, whose
per-request cost is 10-20x higher and would cap the measurement near the plain server's rate.

    python bench/loadgen.py http://127.0.0.1:8000/v1/classify image.png -c 32 -d 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


def build_requests(url: str, bodies: list[bytes], content_type: str = "image/png") -> list[bytes]:
    """One raw HTTP/1.1 POST per body, headers included."""
    u = urlsplit(url)
    path = u.path + (f"?{u.query}" if u.query else "")
    host = u.netloc
    return [
        (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(b)}\r\nConnection: keep-alive\r\n\r\n"
        ).encode()
        + b
        for b in bodies
    ]


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response; return (status, server wants the connection closed)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)  # data + CRLF
            if size == 0:
                break
    close = headers.get("connection", "").lower() == "close"
    return status, close


async def _worker(host, port, requests, offset, stop_at, record_from, latencies, statuses):
    reader = writer = None
    i = offset
    while time.perf_counter() < stop_at:
        if writer is None:
            reader, writer = await asyncio.open_connection(host, port)
        req = requests[i % len(requests)]
        i += 1
        t0 = time.perf_counter()
        try:
            writer.write(req)
            status, close = await _read_response(reader)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            status, close = -1, True
        t1 = time.perf_counter()
        # counted by completion time: with a slow model at high concurrency a request can take
        # longer than the warm-up, and counting only those started after it biases low
        if record_from <= t1 <= stop_at:
            latencies.append(t1 - t0)
            statuses[status] = statuses.get(status, 0) + 1
        if close:
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def _run(url, requests, concurrency, duration_s, warmup_s) -> dict[str, Any]:
    u = urlsplit(url)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    start = time.perf_counter()
    record_from = start + warmup_s
    stop_at = record_from + duration_s
    await asyncio.gather(*(
        _worker(u.hostname, u.port or 80, requests, k, stop_at, record_from, latencies, statuses)
        for k in range(concurrency)
    ))  # fmt: skip
    ok = statuses.get(200, 0)
    lat = sorted(latencies)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

    return {
        "concurrency": concurrency,
        "duration_s": duration_s,
        "requests": len(lat),
        "ok": ok,
        "errors": len(lat) - ok,
        "statuses": {str(k): v for k, v in statuses.items()},
        "rps": ok / duration_s,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
    }


def run_load(
    url: str,
    bodies: list[bytes],
    concurrency: int,
    duration_s: float,
    warmup_s: float = 0.5,
    content_type: str = "image/png",
) -> dict[str, Any]:
    """Requests/s (200s only, counted over `duration_s` after `warmup_s`) and p50/p99 latency."""
    requests = build_requests(url, bodies, content_type)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    return runner(_run(url, requests, concurrency, duration_s, warmup_s))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("images", nargs="+", help="image files sent in turn")
    p.add_argument("-c", "--concurrency", type=int, default=8, help="connections (default: 8)")
    p.add_argument("-d", "--duration", type=float, default=5, help="seconds (default: 5)")
    p.add_argument("--content-type", default="image/png", help="default: image/png")
    a = p.parse_args()
    bodies = [Path(f).read_bytes() for f in a.images]
    print(json.dumps(run_load(a.url, bodies, a.concurrency, a.duration, 0.5, a.content_type)))


if __name__ == "__main__":
    main()

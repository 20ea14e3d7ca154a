"""Send image files (or folders of them) to a raycls server and print the predictions.

    python serve/client.py cat.png dog.jpg                 # table
    python serve/client.py --json --top-k 3 images/        # one JSON object per image
    python serve/client.py --url http://host:8000 --batch 16 images/

Standard library only, so it runs anywhere. A 503 (the server's queue is full) or a refused
connection is retried with exponential backoff and jitter (`--retries`, `--backoff`); every other
error is reported for its file and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
RETRY_STATUSES = {503}


class ClientError(RuntimeError):
    """A request failed for good; the message says what the server answered."""


def collect_images(paths: list[str]) -> list[Path]:
    """Files as given; folders expanded to their image files (sorted, recursive)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ClientError(f"{p}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise ClientError(f"{p}: no such file or folder")
    return out


def multipart(files: list[Path]) -> tuple[bytes, str]:
    """(body, content type) with one `file` field per image, in order."""
    boundary = uuid.uuid4().hex
    parts = []
    for f in files:
        name = f.name.replace('"', "_")
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
            + f.read_bytes()
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def post(
    url: str, body: bytes, content_type: str, *, retries: int, backoff: float, timeout: float
) -> dict[str, Any]:
    """POST with retries on 503 and refused connections; the parsed JSON answer."""
    for attempt in range(retries + 1):
        request = urllib.request.Request(
            url, data=body, method="POST", headers={"Content-Type": content_type}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            if e.code not in RETRY_STATUSES or attempt == retries:
                try:
                    message = json.loads(text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = text.strip()[:200] or e.reason
                raise ClientError(f"HTTP {e.code}: {message}") from None
            wait = float(e.headers.get("Retry-After") or 0)
        except urllib.error.URLError as e:
            if attempt == retries:
                raise ClientError(f"cannot reach {url}: {e.reason}") from None
            wait = 0.0
        # exponential backoff with full jitter, so many clients do not retry in lockstep
        time.sleep(max(wait, random.uniform(0, backoff * 2**attempt)))
    raise AssertionError("unreachable")


def classify(
    url: str,
    files: list[Path],
    *,
    top_k: int | None = None,
    batch: int = 1,
    retries: int = 5,
    backoff: float = 0.1,
    timeout: float = 60.0,
) -> list[dict[str, Any]]:
    """Per file: {"filename", "model", "predictions"} or {"filename", "error"} (the keys of the
    server's and `raycls predict`'s answers), in the order given. top_k None: the server's
    default (5, capped at the model's classes)."""
    endpoint = f"{url.rstrip('/')}/v1/classify" + (f"?top_k={top_k}" if top_k else "")
    results: list[dict[str, Any]] = []
    for start in range(0, len(files), batch):
        chunk = files[start : start + batch]
        try:
            body, ctype = multipart(chunk)
            answer = post(endpoint, body, ctype, retries=retries, backoff=backoff, timeout=timeout)
            for f, r in zip(chunk, answer["results"], strict=True):
                results.append({**r, "filename": str(f), "model": answer["model"]})
        except (ClientError, OSError) as e:
            if len(chunk) > 1:  # one bad image fails its whole request: retry one by one
                results += classify(url, chunk, top_k=top_k, batch=1, retries=retries,
                                    backoff=backoff, timeout=timeout)  # fmt: skip
            else:
                results.append({"filename": str(chunk[0]), "error": str(e)})
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        lines.append(r["filename"])
        if "error" in r:
            lines.append(f"  error: {r['error']}")
            continue
        for rank, p in enumerate(r["predictions"], 1):
            bar = "#" * round(20 * p["probability"])
            lines.append(f"  {rank}. {p['label']:<12} {p['probability']:.4f} {bar}")
    return "\n".join(lines)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Classify images with a raycls server.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server (default %(default)s)")
    p.add_argument("--top-k", type=positive_int, default=None,
                   help="labels per image, 1..the model's classes (default: the server's, 5 "
                   "capped at the model's classes)")
    p.add_argument("--batch", type=positive_int, default=1, help="images per request (default 1)")
    p.add_argument("--retries", type=int, default=5, help="retries on 503 (default 5)")
    p.add_argument("--backoff", type=float, default=0.1, help="first backoff, s (default 0.1)")
    p.add_argument("--timeout", type=float, default=60.0, help="per request, s (default 60)")
    p.add_argument("--json", action="store_true", help="one JSON object per image per line")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        files = collect_images(args.paths)
    except ClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = classify(
        args.url, files, top_k=args.top_k, batch=args.batch, retries=max(0, args.retries),
        backoff=args.backoff, timeout=args.timeout,
    )  # fmt: skip
    if args.json:
        print("\n".join(json.dumps(r) for r in results))
    else:
        print(format_table(results))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

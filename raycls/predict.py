"""`raycls predict BUNDLE PATH...`: classify image files (or folders of them) on the CPU.

Images go through `images.decode_image`, the same decode/resize serving uses, and the answer has
the server's shape (`/v1/classify`: `{"model", "results": [{"filename", "predictions"}]}`, plus
`predictions` when exactly one image was sent) and its top_k rule (`bundle.resolve_top_k`), so a
local answer equals a served one. A file that cannot be classified gets an entry with an `error`
(`{"code", "message"}`, the server's error body) instead of stopping the others. Imports no
torch and needs no Ray cluster.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from raycls.bundle import DEFAULT_TOP_K, BundleError, load_bundle, resolve_top_k
from raycls.images import ImageError

# What a folder is searched for: serve/client.py's IMAGE_SUFFIXES (a test keeps them equal).
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
BATCH_SIZE = 64  # images per onnxruntime call


class ArgumentError(ValueError):
    """A command-line value that cannot work (`field=value: why`), found before any image."""


def collect_images(paths: list[str | Path]) -> list[tuple[str, dict[str, str] | None]]:
    """(path, None) per image file, in the order given, folders expanded to their image files
    (sorted, recursive, like serve/client.py); (path, error) for a path that yields none."""
    out: list[tuple[str, dict[str, str] | None]] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            out += [(str(f), None) for f in found if f.is_file()]
            if not found:
                out.append((str(p), {"code": "no_images", "message": "folder holds no image "
                            f"files ({', '.join(sorted(IMAGE_SUFFIXES))})"}))
        elif p.exists():
            out.append((str(p), None))
        else:
            out.append((str(p), {"code": "not_found", "message": "no such file or folder"}))
    return out


def read_image(bundle: Any, path: str) -> np.ndarray:
    """One file -> uint8 (C, H, W) for the bundle; ImageError in words that fit a file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageError(f"cannot be read ({e.strerror or e})", 400, "unreadable") from None
    if not data:
        raise ImageError("empty file (0 bytes); not an image", 400, "empty_image")
    return bundle.decode(data)


def predict_files(
    bundle_path: str | Path, paths: list[str | Path], top_k: int | None = None,
    int8: bool = False,
) -> dict[str, Any]:
    """The server's answer for these files: {"model", "results": [{"filename", "predictions":
    [{"label", "index", "probability"}]} or {"filename", "error": {"code", "message"}}]}, and
    "predictions" when exactly one image was given and classified.

    Raises BundleError for the bundle and ArgumentError for a top_k outside 1..classes (before
    any image is read); a bad image is an error entry, the others are still answered.
    """
    bundle = load_bundle(bundle_path, int8=int8)
    try:
        k = resolve_top_k(top_k, len(bundle.classes))
    except ValueError as e:
        raise ArgumentError(str(e)) from None
    results: list[dict[str, Any]] = []
    pending: list[tuple[int, np.ndarray]] = []  # (index in results, image) not yet predicted

    def flush() -> None:
        preds = bundle.predict(np.stack([im for _, im in pending]), top_k=k)
        for (i, _), p in zip(pending, preds, strict=True):
            results[i]["predictions"] = p
        pending.clear()

    for path, error in collect_images(paths):
        results.append({"filename": path})
        if error is None:
            try:
                pending.append((len(results) - 1, read_image(bundle, path)))
            except ImageError as e:
                error = {"code": e.code, "message": str(e)}
        if error is not None:
            results[-1]["error"] = error
        if len(pending) >= BATCH_SIZE:
            flush()
    if pending:
        flush()
    answer: dict[str, Any] = {"model": bundle.name, "results": results}
    if len(results) == 1 and "predictions" in results[0]:
        answer["predictions"] = results[0]["predictions"]
    return answer


def format_table(answer: dict[str, Any]) -> str:
    lines = []
    for r in answer["results"]:
        if "predictions" not in r:
            continue  # named on stderr
        lines.append(r["filename"])
        width = max(len(p["label"]) for p in r["predictions"])
        for rank, p in enumerate(r["predictions"], 1):
            lines.append(f"  {rank}. {p['label']:<{width}}  {p['probability']:.4f}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Classify image files with a bundle on the CPU (onnxruntime; no Ray, no torch). Every "
        "file that can be classified is answered; each one that cannot is named on stderr (and "
        "in the JSON as an `error` entry). Exit status: 0 all classified, 1 any file failed, 2 "
        "a bad bundle or --top-k (nothing classified)."
    )
    parser.add_argument("bundle", help="bundle directory written by `raycls export`")
    parser.add_argument(
        "images", nargs="+", metavar="PATH",
        help="image files (PNG, JPEG, WEBP, BMP, GIF first frame, TIFF first page) or folders: "
             f"every {'/'.join(sorted(IMAGE_SUFFIXES))} file under a folder, recursively, sorted "
             "(as serve/client.py sends them)",
    )  # fmt: skip
    parser.add_argument(
        "--top-k", type=int, default=None, metavar="K",
        help=f"labels per image, in 1..the model's number of classes; beyond it is an error, as "
             f"the server's 422 (default: {DEFAULT_TOP_K}, capped at the number of classes: the "
             "server's rule)",
    )  # fmt: skip
    parser.add_argument(
        "--json", action="store_true",
        help="print the server's JSON answer as one line: {\"model\", \"results\": [{\"filename\", "
             "\"predictions\" | \"error\"}]} (default: off, a table of the classified files)",
    )  # fmt: skip
    parser.add_argument(
        "--int8", action="store_true",
        help="use the bundle's model.int8.onnx (default: off, the FP32 model.onnx)",
    )


def main(args: argparse.Namespace) -> int:
    try:
        answer = predict_files(args.bundle, args.images, top_k=args.top_k, int8=args.int8)
    except BundleError as e:
        why = str(e).removeprefix(f"{Path(args.bundle)}: ")
        print(f"error: bundle={args.bundle}: {why}", file=sys.stderr)
        return 2
    except ArgumentError as e:  # the top_k rule
        print(f"error: {e}; or leave --top-k out (default {DEFAULT_TOP_K}, capped at the "
              "model's classes)", file=sys.stderr)
        return 2
    failed = [r for r in answer["results"] if "error" in r]
    for r in failed:
        print(f"error: {r['filename']}: {r['error']['message']}", file=sys.stderr)
    table = format_table(answer)
    if args.json:
        print(json.dumps(answer))
    elif table:
        print(table)
    return 1 if failed else 0

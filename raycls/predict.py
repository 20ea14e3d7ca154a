"""`raycls predict BUNDLE IMAGE...`: classify image files on the CPU with onnxruntime.

Images go through `bundle.decode_image`, the same decode/resize serving uses, so a local answer
equals a served one. Imports no torch and needs no Ray cluster.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from raycls.bundle import BundleError, ImageError, load_bundle


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory written by `raycls export`")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="PNG/JPEG/WEBP/BMP/GIF/TIFF")
    parser.add_argument(
        "--top-k", type=positive_int, default=5, help="labels per image (default 5)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON line instead of a table"
    )
    parser.add_argument("--int8", action="store_true", help="use the bundle's INT8 model")


def predict_files(
    bundle_path: str | Path, files: list[str | Path], top_k: int = 5, int8: bool = False
) -> dict[str, Any]:
    """{"model": name, "results": [{"file", "predictions": [{"label", "index", "probability"}]}]}.

    Raises BundleError for the bundle, ImageError (naming the file) for an image.
    """
    bundle = load_bundle(bundle_path, int8=int8)
    images = []
    for f in files:
        try:
            data = Path(f).read_bytes()
        except OSError as e:
            raise ImageError(f"{f}: cannot be read ({e.strerror or e})") from None
        try:
            images.append(bundle.decode(data))
        except ImageError as e:
            raise ImageError(f"{f}: {e}", e.status, e.code) from None
    predictions = bundle.predict(np.stack(images), top_k=top_k)
    return {
        "model": bundle.name,
        "results": [
            {"file": str(f), "predictions": p} for f, p in zip(files, predictions, strict=True)
        ],
    }


def format_table(answer: dict[str, Any]) -> str:
    lines = []
    for r in answer["results"]:
        lines.append(r["file"])
        width = max(len(p["label"]) for p in r["predictions"])
        for rank, p in enumerate(r["predictions"], 1):
            lines.append(f"  {rank}. {p['label']:<{width}}  {p['probability']:.4f}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    try:
        answer = predict_files(args.bundle, args.images, top_k=args.top_k, int8=args.int8)
    except (BundleError, ImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(answer) if args.json else format_table(answer))
    return 0

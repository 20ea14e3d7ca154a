"""`raycls data convert` and `raycls data inspect`: dataset tooling that needs no Ray and no torch.

`convert imagefolder:SRC DST` copies every image's encoded bytes, unchanged, into sharded Parquet
(`DST/part-00000.parquet`, ...; columns `image` binary, `label` int64, `split` string; class names
as JSON in the schema metadata key `raycls.classes`), the layout `raycls.sources` reads as
`parquet:DST`. Listing and splits are `raycls.sources.open_source`'s, so `parquet:DST` has exactly
the splits `imagefolder:SRC` had (a flat tree's seeded shares become the `split` column).

Shards are split-major and shuffled: each shard holds rows of one split only (named in its
metadata key `raycls.split`, and its `split` column statistics), in a seeded random order, so a
shard or row group mixes every class and a reader's file shuffle plus a local buffer mixes well.
Row groups hold 256 rows so readers can parallelise inside a shard. Output is written into a
hidden temporary folder beside DST and renamed into place: an interrupted convert leaves nothing.

`inspect DATASET` prints the classes, the counts per split and, from a seeded sample of files per
split (headers only, no pixels decoded), the image sizes, formats and modes and the unreadable
files.

The convert itself is `raycls.convert`'s; this module checks images, inspects datasets and runs
the command line.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from raycls.images import ALLOWED_FORMATS, DEFAULT_MAX_PIXELS
from raycls.sources import SourceError, SplitSource, open_source


class UsageError(ValueError):
    """A flag or argument is wrong: `field=value: why and fix` (exit status 2)."""


# ----------------------------------------------------------------------------- checking images


def check_image(data: bytes, verify: bool = True) -> tuple[str | None, dict[str, Any]]:
    """(None, header facts) for an image the decoder would accept, else (why, {}).

    Headers only: `Image.open` reads the format, mode and size; `verify` adds Pillow's cheap
    structural check (chunk CRCs for PNG) without decoding pixels. Same formats and pixel limit as
    `raycls.images.decode_image`, so a file that passes here is one training can use.
    """
    if not data:
        return "empty file", {}
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as im:
            facts = {"format": im.format, "mode": im.mode, "size": im.size}
            if verify:
                im.verify()
    except Image.DecompressionBombError:
        return f"more than {DEFAULT_MAX_PIXELS:,} pixels", {}
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, ...
        return f"not a readable {'/'.join(ALLOWED_FORMATS)} image ({e})", {}
    w, h = facts["size"]
    if w * h > DEFAULT_MAX_PIXELS:
        return f"{w}x{h} is more than {DEFAULT_MAX_PIXELS:,} pixels", {}
    return None, facts


# ----------------------------------------------------------------------------- inspect


def _sample_rows(split: SplitSource, n: int, seed: int) -> Iterator[tuple[str, bytes, int]]:
    """(path, bytes, label) of up to n rows: a seeded random sample of files, or the first n
    Parquet rows (their order is already shuffled by convert)."""
    if split.kind == "files":
        k = min(n, len(split.paths))
        for i in sorted(np.random.default_rng(seed).choice(len(split.paths), k, replace=False)):
            try:
                data = Path(split.paths[i]).read_bytes()
            except OSError:
                data = b""
            yield split.paths[i], data, split.labels[i]
        return
    for row in split.iter_rows(limit=n):
        yield row["path"], row["image"], row["label"]


def inspect(
    dataset: str, sample: int = 1000, val_fraction: float = 0.1, seed: int = 0
) -> dict[str, Any]:
    """Classes, counts per split and, from a sample per split, sizes, formats and bad files."""
    if sample < 1:
        raise UsageError(f"--sample={sample}: must be at least 1")
    src = open_source(dataset, val_fraction=val_fraction, seed=seed)
    report: dict[str, Any] = {
        "dataset": src.name,
        "layout": src.layout,
        "classes": src.classes,
        "channels": src.channels,
        "splits": {},
    }
    for name, split in src.splits.items():
        kinds, widths, heights = Counter(), [], []
        unreadable, n = [], 0
        for path, data, _ in _sample_rows(split, sample, seed):
            n += 1
            why, facts = check_image(data, verify=False)
            if why is not None:
                unreadable.append({"path": path, "error": why})
                continue
            kinds[f"{facts['format']}/{facts['mode']}"] += 1
            widths.append(facts["size"][0])
            heights.append(facts["size"][1])
        entry: dict[str, Any] = {"count": len(split), "sampled": n}
        if split.kind == "files":
            per_class = Counter(split.labels)
            entry["per_class"] = {c: per_class[i] for i, c in enumerate(src.classes)}
        if widths:
            entry["width"] = _spread(widths)
            entry["height"] = _spread(heights)
            entry["sizes"] = dict(Counter(zip(widths, heights, strict=True)).most_common(5))
            entry["sizes"] = {f"{w}x{h}": k for (w, h), k in entry["sizes"].items()}
        entry["formats"] = dict(kinds.most_common())
        entry["unreadable"] = unreadable
        report["splits"][name] = entry
    return report


def _spread(values: list[int]) -> dict[str, int]:
    a = np.asarray(values)
    return {"min": int(a.min()), "median": int(np.median(a)), "max": int(a.max())}


def format_inspect(report: dict[str, Any]) -> str:
    classes = report["classes"]
    lines = [
        f"{report['dataset']} ({report['layout']} layout, {report['channels']} channel(s))",
        f"classes ({len(classes)}): {', '.join(classes)}",
    ]
    for name, s in report["splits"].items():
        lines.append(f"{name}: {s['count']:,} images (sampled {s['sampled']:,})")
        if "per_class" in s:
            lines.append("  per class: " + ", ".join(f"{c} {k}" for c, k in s["per_class"].items()))
        if "width" in s:
            w, h = s["width"], s["height"]
            lines.append(
                f"  size: width {w['min']}-{w['max']} (median {w['median']}), height "
                f"{h['min']}-{h['max']} (median {h['median']}); most common "
                + ", ".join(f"{k} ({n})" for k, n in s["sizes"].items())
            )
        lines.append("  format/mode: " + ", ".join(f"{k} {n}" for k, n in s["formats"].items()))
        if s["unreadable"]:
            lines.append(f"  unreadable in sample: {len(s['unreadable'])}")
            lines += [f"    {b['path']}: {b['error']}" for b in s["unreadable"][:20]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    c = sub.add_parser(
        "convert",
        help="copy an image folder tree into sharded Parquet",
        description=__doc__.split("\n\n")[1],
    )
    c.add_argument("dataset", help="imagefolder:PATH (train/ val/ test/ or a folder per class)")
    c.add_argument("dst", help="output folder (must not exist, unless --overwrite)")
    c.add_argument(
        "--shard-mb",
        type=float,
        default=128,
        help="megabytes of image bytes per Parquet shard (default 128)",
    )
    c.add_argument(
        "--max-bad-images",
        type=int,
        default=100,
        help="unreadable files skipped before convert gives up (default 100)",
    )
    c.add_argument(
        "--overwrite",
        action="store_true",
        help="replace DST if it holds a previous convert's output (default: refuse)",
    )
    _common(c)
    i = sub.add_parser("inspect", help="classes, counts, sizes and formats of a dataset")
    i.add_argument("dataset", help="imagefolder:PATH or parquet:PATH")
    i.add_argument(
        "--sample",
        type=int,
        default=1000,
        help="files per split whose headers are read (default 1000)",
    )
    i.add_argument("--json", action="store_true", help="print the report as a last JSON line")
    _common(i)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of train held out as val when the data has no val split (default 0.1)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the val share, the row order and the sample (default 0)",
    )


def main(args: argparse.Namespace) -> int:
    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if not 0.0 < args.val_fraction < 1.0:
        print(
            f"error: --val-fraction={args.val_fraction}: must be between 0 and 1 (exclusive)",
            file=sys.stderr,
        )
        return 2
    # convert builds on this module's check_image and UsageError: imported here, not at the top
    from raycls.convert import ConvertError, convert, format_convert

    try:
        if args.data_command == "convert":
            summary = convert(
                args.dataset,
                args.dst,
                shard_mb=args.shard_mb,
                max_bad_images=args.max_bad_images,
                overwrite=args.overwrite,
                val_fraction=args.val_fraction,
                seed=args.seed,
                log=log,
            )
            print(format_convert(summary))
            return 0
        report = inspect(args.dataset, args.sample, args.val_fraction, args.seed)
        print(format_inspect(report))
        if args.json:
            print(json.dumps(report))
        return 0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SourceError as e:
        print(f"error: dataset={args.dataset}: {e}", file=sys.stderr)
        return 1
    except ConvertError as e:
        print(f"error: {e}; nothing was written", file=sys.stderr)
        return 1
    except OSError as e:
        print(
            f"error: {getattr(e, 'filename', None) or args.dataset}: {e.strerror or e}",
            file=sys.stderr,
        )
        return 1

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
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from raycls.images import ALLOWED_FORMATS, DEFAULT_MAX_PIXELS
from raycls.sources import CLASSES_METADATA_KEY, SPLITS, SourceError, SplitSource, open_source

SPLIT_METADATA_KEY = b"raycls.split"
SUMMARY_FILE = "_convert.json"  # readers skip files starting with "_"
ROW_GROUP_ROWS = 256
READ_THREADS = 8  # file reads overlap: most of a convert's time is waiting on storage
PROGRESS_EVERY_S = 3.0


class ConvertError(RuntimeError):
    """Convert stopped (too many unreadable images); nothing was written."""


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


def _read(path: str) -> tuple[str, bytes, str | None]:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return path, b"", f"cannot be read ({e.strerror or e})"
    bad, _ = check_image(data)
    return path, data, bad


def _read_in_order(paths: list[str]) -> Iterator[tuple[str, bytes, str | None]]:
    """(path, bytes, why-unreadable) for each path, in order, reads overlapped in threads."""
    with ThreadPoolExecutor(READ_THREADS) as pool:
        window = READ_THREADS * 16  # bounded look-ahead: memory stays a few MB
        for start in range(0, len(paths), window):
            yield from pool.map(_read, paths[start : start + window])


# ----------------------------------------------------------------------------- convert


class _ShardWriter:
    """Parquet shards of one split each, cut at about `shard_bytes` of image bytes."""

    def __init__(self, folder: Path, classes: list[str], shard_bytes: int, source: str):
        import pyarrow as pa

        self.folder, self.shard_bytes = folder, shard_bytes
        self.metadata = {
            CLASSES_METADATA_KEY: json.dumps(classes).encode(),
            b"raycls.source": source.encode(),
        }
        self.fields = [
            pa.field("image", pa.binary()),
            pa.field("label", pa.int64()),
            pa.field("split", pa.string()),
        ]
        self.shards: list[dict[str, Any]] = []
        self.writer = None
        self.rows: list[tuple[bytes, int]] = []
        self.split = ""

    def add(self, split: str, data: bytes, label: int) -> None:
        if split != self.split:
            self.close_shard()
            self.split = split
        self.rows.append((data, label))
        if len(self.rows) >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.rows:
            return
        if self.writer is None:
            name = f"part-{len(self.shards):05d}.parquet"
            meta = {**self.metadata, SPLIT_METADATA_KEY: self.split.encode()}
            schema = pa.schema(self.fields, metadata=meta)
            # images are already compressed: compressing them again only costs CPU
            self.writer = pq.ParquetWriter(
                self.folder / name,
                schema,
                compression={"image": "NONE", "label": "SNAPPY", "split": "SNAPPY"},
            )
            self.shards.append({"file": name, "split": self.split, "rows": 0, "image_bytes": 0})
        images, labels = zip(*self.rows, strict=True)
        table = pa.table(
            [
                pa.array(images, pa.binary()),
                pa.array(labels, pa.int64()),
                pa.array([self.split] * len(images), pa.string()),
            ],
            schema=self.writer.schema,
        )
        self.writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        shard = self.shards[-1]
        shard["rows"] += len(images)
        shard["image_bytes"] += sum(len(b) for b in images)
        self.rows = []
        if shard["image_bytes"] >= self.shard_bytes:
            self.writer.close()
            self.writer = None

    def close_shard(self) -> None:
        self._flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _check_destination(dst: Path, overwrite: bool) -> None:
    if not dst.exists():
        if not dst.parent.is_dir():
            raise UsageError(f"dst={dst}: its parent folder does not exist; create it first")
        return
    if not overwrite:
        raise UsageError(f"dst={dst}: already exists; pass --overwrite to replace it")
    if not dst.is_dir():
        raise UsageError(f"dst={dst}: exists and is not a folder; remove it yourself")
    foreign = [
        p.name for p in dst.iterdir() if not (p.name.endswith(".parquet") or p.name == SUMMARY_FILE)
    ]
    if foreign:
        raise UsageError(
            f"dst={dst}: holds files convert did not write ({', '.join(sorted(foreign)[:3])}); "
            "--overwrite replaces only a previous convert's output: remove it yourself"
        )


def convert(
    dataset: str,
    dst: str | Path,
    *,
    shard_mb: float = 128,
    max_bad_images: int = 100,
    overwrite: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Convert an image-folder dataset to sharded Parquet at `dst`; returns the summary.

    Raises UsageError for bad arguments, SourceError when the tree cannot be listed, ConvertError
    when more than `max_bad_images` files are unreadable (nothing is written then).
    """
    if not dataset.startswith("imagefolder:"):
        raise UsageError(
            f"dataset={dataset}: convert reads image folders; name it imagefolder:PATH"
        )
    if shard_mb <= 0:
        raise UsageError(f"--shard-mb={shard_mb}: must be above 0 (megabytes of images a shard)")
    if max_bad_images < 0:
        raise UsageError(f"--max-bad-images={max_bad_images}: must be 0 or more")
    dst = Path(dst).expanduser().resolve()
    _check_destination(dst, overwrite)
    src = open_source(dataset, val_fraction=val_fraction, seed=seed)
    if dst == Path(src.root) or Path(src.root) in dst.parents:
        raise UsageError(f"dst={dst}: is inside the source tree {src.root}; write it elsewhere")
    total = sum(len(s) for s in src.splits.values())
    log(f"convert: {src.describe()} -> {dst}")

    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        summary = _write_shards(src, tmp, int(shard_mb * 1e6), max_bad_images, seed, total, log)
        summary["output"] = str(dst)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
        if dst.exists():  # --overwrite, checked above: swap in, then drop the old output
            old = dst.parent / f".{dst.name}.old-{os.getpid()}"
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _write_shards(
    src,
    tmp: Path,
    shard_bytes: int,
    max_bad: int,
    seed: int,
    total: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    import pyarrow.parquet  # noqa: F401 - imported before the clock starts

    writer = _ShardWriter(tmp, src.classes, shard_bytes, src.name)
    counts: dict[str, int] = {}
    bad: list[dict[str, str]] = []
    rng = np.random.default_rng(seed)
    start = last = time.perf_counter()
    done = 0
    for name in SPLITS:
        split: SplitSource | None = src.splits.get(name)
        if split is None:
            continue
        order = rng.permutation(len(split.paths))  # shuffled rows: every shard mixes classes
        paths = [split.paths[i] for i in order]
        labels = [split.labels[i] for i in order]
        counts[name] = 0
        for (path, data, why), label in zip(_read_in_order(paths), labels, strict=True):
            done += 1
            if why is not None:
                bad.append({"path": path, "split": name, "error": why})
                if len(bad) > max_bad:
                    raise ConvertError(
                        f"--max-bad-images={max_bad}: over {max_bad} unreadable images (the "
                        f"latest: {path}: {why}); fix or remove them, or raise the limit"
                    )
                continue
            writer.add(name, data, label)
            counts[name] += 1
            now = time.perf_counter()
            if now - last >= PROGRESS_EVERY_S:
                last = now
                log(f"convert: {done:,}/{total:,} images ({done / (now - start):,.0f} images/s)")
        writer.close_shard()
    seconds = time.perf_counter() - start
    return {
        "source": src.name,
        "layout": src.layout,
        "classes": src.classes,
        "images": counts,
        "shards": writer.shards,
        "image_bytes": sum(s["image_bytes"] for s in writer.shards),
        "bytes": sum((tmp / s["file"]).stat().st_size for s in writer.shards),
        "bad_images": bad,
        "seconds": round(seconds, 3),
        "images_per_s": round(done / seconds, 1) if seconds > 0 else None,
    }


def format_convert(summary: dict[str, Any]) -> str:
    images = ", ".join(f"{n:,} {s}" for s, n in summary["images"].items())
    lines = [
        f"wrote {summary['output']}: {images} images in {len(summary['shards'])} shard(s), "
        f"{summary['bytes'] / 1e6:,.1f} MB, {summary['seconds']:.1f} s "
        f"({summary['images_per_s'] or 0:,.0f} images/s)",
        f"classes ({len(summary['classes'])}): {', '.join(summary['classes'])}",
    ]
    if summary["bad_images"]:
        lines.append(f"skipped {len(summary['bad_images'])} unreadable image(s):")
        lines += [f"  {b['path']}: {b['error']}" for b in summary["bad_images"][:20]]
        if len(summary["bad_images"]) > 20:
            lines.append(f"  ... and {len(summary['bad_images']) - 20} more (see {SUMMARY_FILE})")
    return "\n".join(lines)


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

"""`raycls data convert`: an image folder tree -> sharded Parquet, bytes unchanged.

Every image's encoded bytes are copied into `DST/part-00000.parquet`, ... (columns `image`
binary, `label` int64, `split` string; class names as JSON in the schema metadata key
`raycls.classes`), the layout `raycls.sources` reads as `parquet:DST`, with the splits
`open_source` gave the tree. Shards are split-major and shuffled, row groups hold 256 rows, and
output is written into a hidden folder beside DST and renamed into place (the whole contract is
in `raycls.datatools`' docstring, which is also the command's help).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from raycls.datatools import UsageError, check_image
from raycls.sources import CLASSES_METADATA_KEY, SPLITS, SplitSource, open_source

SPLIT_METADATA_KEY = b"raycls.split"
SUMMARY_FILE = "_convert.json"  # readers skip files starting with "_"
ROW_GROUP_ROWS = 256
READ_THREADS = 8  # file reads overlap: most of a convert's time is waiting on storage
PROGRESS_EVERY_S = 3.0


class ConvertError(RuntimeError):
    """Convert stopped (too many unreadable images); nothing was written."""


# ----------------------------------------------------------------------------- reading files


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



# ----------------------------------------------------------------------------- writing shards


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

"""Listing a `parquet:PATH` dataset: its files, classes, channels and splits.

PATH is a file, a folder, a glob or an `s3://` / `gs://` URI (pyarrow's filesystems). Only the
`label` (and `split`) columns are read here, so listing a dataset on object storage stays cheap;
the rows themselves are read by `raycls.sources.SplitSource`. The layouts are described in
`raycls.sources`' docstring.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import json
import os
from pathlib import Path

from raycls.sources import (
    CLASSES_METADATA_KEY,
    GREY_MODES,
    SPLITS,
    TEST_FRACTION,
    TEST_SEED,
    ImageSource,
    SourceError,
    SplitSource,
    split_folder,
)


def _filesystem(path: str):
    """(pyarrow filesystem, path inside it) for a local path or an object-store URI."""
    import pyarrow.fs as pafs

    if "://" in path:
        try:
            return pafs.FileSystem.from_uri(path)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise SourceError(f"parquet: cannot open {path} ({e})") from None
    return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def _parquet_files(fs, path: str, original: str) -> list[str]:
    import pyarrow.fs as pafs

    if any(ch in path for ch in "*?["):
        if isinstance(fs, pafs.LocalFileSystem):
            found = sorted(glob.glob(path, recursive=True))
        else:
            base = path.split("*")[0].rsplit("/", 1)[0]
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
            found = sorted(i.path for i in infos if fnmatch.fnmatch(i.path, path))
        found = [f for f in found if f.endswith(".parquet")]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise SourceError(f"parquet: {original} does not exist")
        if info.type == pafs.FileType.File:
            return [path]
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        found = sorted(i.path for i in infos if i.type == pafs.FileType.File
                       and i.path.endswith(".parquet")
                       and not any(part.startswith((".", "_")) for part in
                                   i.path[len(path):].split("/")))
    if not found:
        raise SourceError(f"parquet: no .parquet files at {original}")
    return found


def open_parquet(path: str, val_fraction: float, seed: int) -> ImageSource:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs, inner = _filesystem(path)
    files = _parquet_files(fs, inner, path)
    schema = pq.read_schema(files[0], filesystem=fs)
    missing = {"image", "label"} - set(schema.names)
    if missing:
        raise SourceError(
            f"parquet: {files[0]} lacks column(s) {sorted(missing)}; found {schema.names} "
            "(expected `image` with encoded image bytes and `label`)"
        )
    meta = schema.metadata or {}
    by_folder: dict[str, list[str]] = {}
    if "://" not in path and Path(inner).is_dir():
        for split in SPLITS:
            folder = split_folder(Path(inner), split)
            if folder is not None:
                by_folder[split] = [f for f in files if f.startswith(str(folder) + os.sep)]
    has_split_column = "split" in schema.names and not by_folder

    label_values, split_values = [], []
    for f in files:  # label (and split) columns only: cheap, even on object storage
        cols = ["label"] + (["split"] if has_split_column else [])
        t = pq.read_table(f, columns=cols, filesystem=fs)
        label_values.append(t.column("label"))
        if has_split_column:
            split_values.append(t.column("split"))
    classes = _parquet_classes(meta, label_values, files[0])
    common = {"kind": "parquet", "root": path, "classes": classes, "filesystem": fs}
    splits: dict[str, SplitSource] = {}
    if by_folder:
        if "train" not in by_folder:
            raise SourceError(f"parquet: {path} has split folders but no train/")
        for split, split_files in by_folder.items():
            rows = sum(pq.ParquetFile(f, filesystem=fs).metadata.num_rows for f in split_files)
            splits[split] = SplitSource(split, paths=split_files, num_rows=rows, **common)
        layout = "parquet, split folders"
    elif has_split_column:
        counts: dict[str, int] = {}
        for column in split_values:
            for v in pc.value_counts(column).to_pylist():
                counts[v["values"]] = counts.get(v["values"], 0) + v["counts"]
        unknown = sorted(str(v) for v in counts if v not in SPLITS)
        if unknown:
            raise SourceError(f"parquet: {path} has split values {unknown}; use train, val or test")
        if not counts.get("train"):
            raise SourceError(f"parquet: {path} has no rows with split == 'train'")
        for split in SPLITS:
            if counts.get(split):
                splits[split] = SplitSource(split, paths=files, split_value=split,
                                            num_rows=counts[split], **common)
        layout = "parquet, split column"
    else:  # seeded shares by hash: counts are estimates until the rows are read
        total = sum(len(c) for c in label_values)
        n_test = round(total * TEST_FRACTION)
        splits["test"] = SplitSource("test", paths=files, num_rows=n_test,
                                     shares=((TEST_SEED, 0.0, TEST_FRACTION),), **common)
        splits["train"] = SplitSource("train", paths=files, num_rows=total - n_test,
                                      shares=((TEST_SEED, TEST_FRACTION, 1.0),), **common)
        layout = "parquet, seeded shares"
    if "val" not in splits:  # a seeded share of train becomes val
        train = splits["train"]
        salt = TEST_SEED + 1 + seed
        n_val = round(train.num_rows * val_fraction)
        splits["val"] = dataclasses.replace(
            train, name="val", num_rows=n_val, shares=(*train.shares, (salt, 0.0, val_fraction)))
        splits["train"] = dataclasses.replace(
            train, num_rows=train.num_rows - n_val,
            shares=(*train.shares, (salt, val_fraction, 1.0)))
    ordered = {s: splits[s] for s in SPLITS if s in splits}
    channels = _probe_parquet_channels(ordered["train"])
    return ImageSource(f"parquet:{path}", path, layout, classes, channels, ordered)


def _parquet_classes(meta: dict, label_columns: list, first_file: str) -> list[str]:
    if CLASSES_METADATA_KEY in meta:
        try:
            classes = json.loads(meta[CLASSES_METADATA_KEY])
            if isinstance(classes, list) and classes:
                return [str(c) for c in classes]
        except ValueError:
            pass
    import pyarrow as pa
    import pyarrow.compute as pc

    values = pa.chunked_array([c for col in label_columns for c in col.chunks])
    if pa.types.is_integer(values.type):
        lo, hi = pc.min(values).as_py(), pc.max(values).as_py()
        if lo is None or lo < 0:
            raise SourceError(f"parquet: {first_file}: integer labels must be >= 0 (found {lo})")
        return [str(i) for i in range(hi + 1)]
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        return sorted(set(pc.unique(values).to_pylist()) - {None})
    raise SourceError(
        f"parquet: {first_file}: column `label` is {values.type}; use integers or class names"
    )


def _probe_parquet_channels(split: SplitSource) -> int:
    import io

    from PIL import Image

    modes = []
    for row in split.iter_rows(limit=32):
        try:
            with Image.open(io.BytesIO(row["image"])) as im:
                modes.append(im.mode)
        except (OSError, ValueError):
            continue
    return 1 if modes and all(m in GREY_MODES for m in modes) else 3

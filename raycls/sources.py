"""Where a dataset's encoded images come from: layouts, classes and splits, never pixels.

`open_source("imagefolder:PATH" | "parquet:PATH")` lists a dataset and returns an `ImageSource`:
its classes, its channels, and one `SplitSource` per split, each able to yield rows of
(encoded bytes, label, id, path) in this process (`iter_rows`, no Ray) or as a lazy Ray Dataset
(`to_ray`, for streaming). Decoding is `raycls.bundle`'s job and batching is `raycls.stream`'s.
Listing an image folder is done here; listing Parquet files (local or object storage) is
`raycls.parquet_source`'s, which `open_source` calls; both return this module's types.

Layouts:
- `imagefolder:PATH` with `train/` (and `val/` and/or `test/`), each a folder per class, as in
  torchvision: those folders are the splits. Without `val/`, a seeded share of `train/` is the
  validation split; without `test/`, there is no test split (none is invented). Class names are
  `train/`'s folders, sorted; a class in val/test that train lacks is an error.
- `imagefolder:PATH` with a folder per class directly: seeded shares (20% test, a fixed seed of
  its own so `--seed` never leaks test images; then `val_fraction` of the rest, by `seed`).
- `parquet:PATH`, PATH a file, a folder, a glob or an `s3://` / `gs://` URI: columns `image`
  (encoded bytes) and `label` (int or class-name string); the split from a `split` column
  (train/val/test), else from `train/` `val/` `test/` sub-folders, else seeded shares by a hash
  of each image's bytes (20% test, then `val_fraction`). Class names come from the schema
  metadata key `raycls.classes` (what `raycls data convert` writes), else the label values.

Every row has an `id`: a 63-bit hash of the file's path relative to the dataset root (image
files) or of the image bytes (Parquet), so tests and logs can tell images apart.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("train", "val", "test")
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
CLASSES_METADATA_KEY = b"raycls.classes"
TEST_FRACTION = 0.2  # flat layouts: share held out as the test split
TEST_SEED = 12345  # its own seed: changing --seed never moves a test image into training
GREY_MODES = ("1", "L", "LA", "La", "I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class SourceError(ValueError):
    """A dataset cannot be listed as asked; the message names the path and the fix."""


def row_id(key: bytes) -> int:
    """A stable 63-bit id (fits int64) for a row: blake2b of its path or its bytes."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 1


def _share(key: bytes, salt: int) -> float:
    """A uniform number in [0, 1) fixed by (key, salt): assigns rows to splits without listing."""
    digest = hashlib.blake2b(key, digest_size=8, salt=salt.to_bytes(8, "big", signed=False))
    return int.from_bytes(digest.digest(), "big") / 2**64


@dataclass
class SplitSource:
    """One split: either image files with their labels, or Parquet files with a row filter."""

    name: str  # "train" | "val" | "test"
    kind: str  # "files" | "parquet"
    root: str  # files: ids are paths relative to it; parquet: the dataset's location
    paths: list[str]  # image files, or Parquet files
    labels: list[int] = field(default_factory=list)  # files: one per path
    classes: list[str] = field(default_factory=list)
    # parquet: which rows of `paths` belong here
    split_value: str = ""  # keep rows whose `split` column equals this ("" = no split column)
    shares: tuple[tuple[int, float, float], ...] = ()  # and (salt, lo, hi): lo <= share < hi
    num_rows: int = 0  # parquet: rows in this split (estimated for hash shares)
    filesystem: Any = None  # pyarrow filesystem for parquet paths (None = local)

    def __len__(self) -> int:
        return len(self.paths) if self.kind == "files" else self.num_rows

    def count(self) -> int:
        return len(self)

    # ------------------------------------------------------------------ in this process

    def iter_rows(self, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """Rows {"image": bytes, "label": int, "id": int, "path": str}, in listing order."""
        n = 0
        for row in self._iter_all():
            if limit is not None and n >= limit:
                return
            n += 1
            yield row

    def _iter_all(self) -> Iterator[dict[str, Any]]:
        if self.kind == "files":
            for path, label in zip(self.paths, self.labels, strict=True):
                try:
                    data = Path(path).read_bytes()
                except OSError as e:
                    data = b""  # reported by the decoder as an empty image, named by path
                    path = f"{path} ({e.strerror or e})"
                yield {"image": data, "label": label, "path": path,
                       "id": row_id(os.path.relpath(path, self.root).encode())}
            return
        import pyarrow.parquet as pq

        index = {c: i for i, c in enumerate(self.classes)}
        for path in self.paths:
            f = pq.ParquetFile(path, filesystem=self.filesystem)
            columns = ["image", "label"] + (["split"] if self.split_value else [])
            for batch in f.iter_batches(batch_size=256, columns=columns):
                rows = parquet_rows(batch.to_pydict(), self, index, path)
                yield from (dict(zip(rows, values, strict=True)) for values in
                            zip(*rows.values(), strict=True))

    # ------------------------------------------------------------------ Ray Data

    def to_ray(self, shuffle_seed: int | None = None):
        """A lazy Ray Dataset of rows image (binary), label (int64), id (int64), path (str).

        `shuffle_seed` shuffles the file order, differently on every execution (epoch): the
        cheapest shuffle there is (metadata only); `raycls.stream` adds a local buffer on top.
        """
        import ray.data
        from ray.data import FileShuffleConfig

        shuffle = None if shuffle_seed is None else FileShuffleConfig(seed=shuffle_seed)
        if self.kind == "files":
            ds = ray.data.read_binary_files(
                self.paths, include_paths=True, shuffle=shuffle,
                override_num_blocks=max(1, min(len(self.paths) // 64, 512)),
            )
            roots = {os.path.normpath(p).lstrip("/"): label
                     for p, label in zip(self.paths, self.labels, strict=True)}
            return ds.map_batches(
                _label_files, fn_kwargs={"labels": roots, "root": self.root},
                batch_format="pyarrow", zero_copy_batch=True,
            )
        columns = ["image", "label"] + (["split"] if self.split_value else [])
        ds = ray.data.read_parquet(
            self.paths, filesystem=self.filesystem, shuffle=shuffle, include_paths=True,
        ).select_columns([*columns, "path"])
        return ds.map_batches(
            _parquet_batch, fn_kwargs={"split": self, "classes": self.classes},
            batch_format="pyarrow", zero_copy_batch=True,
        )


def _label_files(batch, labels: dict[str, int], root: str):
    """Ray Data: (bytes, path) of image files -> rows with label and id (labels by path)."""
    import pyarrow as pa

    paths = [os.path.normpath(p).lstrip("/") for p in batch.column("path").to_pylist()]
    rel_root = os.path.normpath(root).lstrip("/")
    return pa.table({
        "image": batch.column("bytes"),
        "label": pa.array([labels[p] for p in paths], pa.int64()),
        "id": pa.array([row_id(os.path.relpath(p, rel_root).encode()) for p in paths],
                       pa.int64()),
        "path": pa.array(["/" + p if not os.path.exists(p) else p for p in paths]),
    })


def parquet_rows(columns: dict[str, list], split: SplitSource, index: dict[str, int],
                 path: str | None = None) -> dict[str, list]:
    """Keep the rows of one split and map labels to class indices (Python lists in and out)."""
    images, labels = columns["image"], columns["label"]
    paths = columns.get("path") or [path or split.root] * len(images)
    keep = range(len(images))
    if split.split_value:
        keep = [i for i in keep if columns["split"][i] == split.split_value]
    for salt, lo, hi in split.shares:
        keep = [i for i in keep if lo <= _share(images[i] or b"", salt) < hi]
    out: dict[str, list] = {"image": [], "label": [], "id": [], "path": []}
    for i in keep:
        out["image"].append(images[i])
        out["label"].append(label_index(labels[i], index))
        out["id"].append(row_id(images[i] or b""))
        out["path"].append(f"{paths[i]} (label {labels[i]})")
    return out


def label_index(value: Any, index: dict[str, int]) -> int:
    """An integer label is the class index itself; a string label is a class name."""
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        if 0 <= value < len(index):
            return int(value)
        raise SourceError(f"label {value} is out of range for {len(index)} classes")
    key = str(value)
    if key not in index:
        raise SourceError(f"label {value!r} is not one of the classes {list(index)}")
    return index[key]


def _parquet_batch(batch, split: SplitSource, classes: list[str]):
    import pyarrow as pa

    rows = parquet_rows(batch.to_pydict(), split, {c: i for i, c in enumerate(classes)})
    return pa.table({
        "image": pa.array(rows["image"], pa.binary()),
        "label": pa.array(rows["label"], pa.int64()),
        "id": pa.array(rows["id"], pa.int64()),
        "path": pa.array(rows["path"], pa.string()),
    })


@dataclass
class ImageSource:
    name: str  # "imagefolder:/abs/path" | "parquet:..."
    root: str
    layout: str  # "splits" | "flat" | "parquet, <how the splits are found>"
    classes: list[str]
    channels: int  # 1 (every sampled image is grey) or 3
    splits: dict[str, SplitSource]

    def describe(self) -> str:
        counts = ", ".join(f"{len(s)} {n}" for n, s in self.splits.items())
        return f"{self.name} ({self.layout}, {len(self.classes)} classes: {counts})"


# ----------------------------------------------------------------------------- imagefolder


def _list_images(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
    return found


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def split_folder(root: Path, split: str) -> Path | None:
    for name in SPLIT_FOLDERS[split]:
        if (root / name).is_dir():
            return root / name
    return None


def _files_of(folder: Path, classes: list[str], split: str, where: Path) -> tuple[list, list]:
    present = _class_folders(folder)
    unknown = sorted(set(present) - set(classes))
    if unknown:
        raise SourceError(
            f"imagefolder: {folder} has class folder(s) {unknown} that {where}/train lacks; "
            f"every {split} class must also be a training class ({', '.join(classes)})"
        )
    files, labels = [], []
    for i, c in enumerate(classes):
        if not (folder / c).is_dir():
            continue
        found = _list_images(folder / c)
        if not found and split == "train":
            raise SourceError(
                f"imagefolder: class folder {folder / c} has no images "
                f"({', '.join(IMAGE_SUFFIXES)})"
            )
        files += found
        labels += [i] * len(found)
    if not files:
        raise SourceError(f"imagefolder: {folder} holds no images in class folders")
    return files, labels


def seeded_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(held-out indices, kept indices) of n rows, at least one held out; the same seed always
    holds out the same rows. Every split in raycls (val shares, digits' and flat folders' test
    share) is this one: unstratified on purpose, so published figures keep their splits."""
    order = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(n * fraction)))
    return np.sort(order[:k]), np.sort(order[k:])


def _take(files: list[str], labels: list[int], idx: np.ndarray) -> tuple[list, list]:
    return [files[i] for i in idx], [labels[i] for i in idx]


def open_imagefolder(path: str, val_fraction: float, seed: int) -> ImageSource:
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise SourceError(
            f"imagefolder: {path} is not a directory (expected a folder per class, or train/ "
            "val/ test/ folders each holding a folder per class)"
        )
    train_dir = split_folder(root, "train")
    files: dict[str, tuple[list, list]] = {}
    if train_dir is not None:
        layout = "splits"
        allowed = {n for names in SPLIT_FOLDERS.values() for n in names}
        others = sorted(set(_class_folders(root)) - allowed)
        if others:
            raise SourceError(
                f"imagefolder: {root} mixes split folders (train/) with other folders {others}; "
                "use either a folder per class, or train/ val/ test/ each holding a folder per "
                "class"
            )
        classes = _class_folders(train_dir)
        files["train"] = _files_of(train_dir, classes, "train", root)
        for split in ("val", "test"):
            folder = split_folder(root, split)
            if folder is not None:
                files[split] = _files_of(folder, classes, split, root)
        if "val" not in files:  # a seeded share of train/ becomes val
            held, kept = seeded_split(len(files["train"][0]), val_fraction, seed)
            files["val"] = _take(*files["train"], held)
            files["train"] = _take(*files["train"], kept)
    else:
        layout = "flat"
        classes = _class_folders(root)
        all_files, all_labels = _files_of(root, classes, "train", root)
        test, rest = seeded_split(len(all_files), TEST_FRACTION, TEST_SEED)
        files["test"] = _take(all_files, all_labels, test)
        rest_files, rest_labels = _take(all_files, all_labels, rest)
        val, train = seeded_split(len(rest_files), val_fraction, seed)
        files["train"] = _take(rest_files, rest_labels, train)
        files["val"] = _take(rest_files, rest_labels, val)
    if len(classes) < 2:
        raise SourceError(
            f"imagefolder: {train_dir or root} needs at least 2 class folders, found {classes}"
        )
    splits = {
        name: SplitSource(name, "files", str(root), *files[name], classes=classes)
        for name in SPLITS if name in files
    }
    channels = probe_channels(splits["train"].paths[:32])
    return ImageSource(f"imagefolder:{root}", str(root), layout, classes, channels, splits)


def probe_channels(files: list[str]) -> int:
    """1 when every sampled image is greyscale, else 3 (headers only, no pixels decoded)."""
    from PIL import Image

    modes = []
    for f in files:
        try:
            with Image.open(f) as im:
                modes.append(im.mode)
        except (OSError, ValueError):
            continue  # an unreadable file is reported when it is decoded
    return 1 if modes and all(m in GREY_MODES for m in modes) else 3


# ----------------------------------------------------------------------------- registry


def is_encoded(spec: str) -> bool:
    """Whether a dataset name is one of encoded image files (streamable) or a built-in array."""
    return spec.startswith(("imagefolder:", "parquet:"))


def open_source(spec: str, val_fraction: float = 0.1, seed: int = 0) -> ImageSource:
    """List `imagefolder:PATH` or `parquet:PATH` (see the module docstring)."""
    kind, _, path = spec.partition(":")
    if not path:
        raise SourceError(f"{spec!r}: name a path after the colon, e.g. {kind}:/data/photos")
    if kind == "imagefolder":
        return open_imagefolder(path, val_fraction, seed)
    if kind == "parquet":
        from raycls.parquet_source import open_parquet  # it builds on this module's types

        return open_parquet(path, val_fraction, seed)
    raise SourceError(f"{spec!r}: not an encoded-image dataset (imagefolder:PATH or parquet:PATH)")

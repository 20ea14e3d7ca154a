"""Dataset registry: every dataset becomes uint8 image tensors (N, C, H, W) + int64 labels.

- `digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images). Works offline anywhere;
  a seeded 20% is held out as the test split.
- `mnist`, `fashion-mnist`: the four official gzipped IDX files in `data_dir`.
- `cifar10`: the official *binary* layout (`cifar-10-batches-bin/`); downloaded (md5-checked) when
  missing and the network is reachable.
- `imagefolder:PATH` and `parquet:PATH` (layouts in `raycls.sources`): streamed by
  `raycls.stream` by default; `--data-mode memory` decodes them here once, through Ray Data and
  the one decoder, centre-cropped to `image_size` (default 32).

Train/val is a seeded split of the official training set; the test split is the official one where
the dataset has one (encoded datasets: see `raycls.sources`). mean/std are per channel, of
[0, 1]-scaled training pixels.

One job in about 400 lines: each reader is short, and all of them build the one `Dataset` through
the same split and mean/std helpers, so they read best side by side.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import struct
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raycls.sources import seeded_split


class DataError(ValueError):
    """A dataset is missing or malformed; the message names the file and the fix."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    name: str
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: Split
    val: Split
    test: Split  # empty when the data has no test split
    resize: str = "stretch"  # how a bundle fits served images to the input size (raycls.bundle)

    @property
    def channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]

    def describe(self) -> dict:
        """The part of a checkpoint's metadata that says what the model expects."""
        return {
            "name": self.name,
            "classes": list(self.classes),
            "channels": self.channels,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
        }


# ----------------------------------------------------------------------------- helpers


def _split_train_val(images: np.ndarray, labels: np.ndarray, val_fraction: float, seed: int):
    val, train = seeded_split(len(labels), val_fraction, seed)
    return Split(_t(images[train]), _l(labels[train])), Split(_t(images[val]), _l(labels[val]))


def _t(images: np.ndarray) -> torch.Tensor:
    # np.array copies: IDX arrays are read-only views of the decompressed file
    return torch.from_numpy(np.array(images, dtype=np.uint8, order="C"))


def _l(labels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))


def _mean_std(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.to(torch.float64).div_(255).transpose(0, 1).reshape(images.shape[1], -1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).tolist())


def _build(name, classes, train_x, train_y, test_x, test_y, val_fraction, seed) -> Dataset:
    # mean/std of the whole official training split: the published constants (e.g. CIFAR-10's
    # 0.4914, 0.4822, 0.4465) and independent of the validation seed
    mean, std = _mean_std(_t(train_x))
    train, val = _split_train_val(train_x, train_y, val_fraction, seed)
    return Dataset(name, list(classes), mean, std, train, val, Split(_t(test_x), _l(test_y)))


def _md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


# ----------------------------------------------------------------------------- digits


def load_digits(val_fraction: float, seed: int, test_fraction: float = 0.2) -> Dataset:
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    # pixel values are 0..16; scale to the full uint8 range like every other dataset
    images = np.rint(bunch.images * (255 / 16)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    labels = bunch.target.astype(np.int64)
    # the test hold-out uses a seed of its own, so changing --seed never leaks test images
    test, rest = seeded_split(len(labels), test_fraction, seed=12345)
    return _build(
        "digits", MNIST_CLASSES, images[rest], labels[rest], images[test], labels[test],
        val_fraction, seed,
    )


# ----------------------------------------------------------------------------- IDX (MNIST)

MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def read_idx(path: Path, expect_magic: int) -> np.ndarray:
    """Read a gzipped IDX file (big-endian header: magic, dims...; then uint8 data)."""
    if not path.is_file():
        raise DataError(f"{path}: missing")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable gzip file ({e}); re-download it") from None
    if len(raw) < 8:
        raise DataError(f"{path}: truncated (only {len(raw)} bytes)")
    magic, = struct.unpack(">i", raw[:4])
    if magic != expect_magic:
        raise DataError(f"{path}: bad IDX magic {magic} (expected {expect_magic}); wrong file?")
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}i", raw[4 : 4 + 4 * ndim])
    expected = int(np.prod(dims))
    data = raw[4 + 4 * ndim :]
    if len(data) != expected:
        raise DataError(
            f"{path}: truncated or padded: {len(data)} data bytes for shape {dims} "
            f"(expected {expected}); re-download it"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def load_idx_dataset(name: str, data_dir: str, classes, val_fraction: float, seed: int) -> Dataset:
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(
            f"{name}: data directory {d} does not exist; put the four official files "
            f"({', '.join(IDX_FILES.values())}) there and pass --data-dir"
        )
    missing = [f for f in IDX_FILES.values() if not (d / f).is_file()]
    if missing:
        raise DataError(f"{name}: {d} lacks {', '.join(missing)} (the official gzipped IDX files)")
    tx = read_idx(d / IDX_FILES["train_images"], 2051)[:, None]
    ty = read_idx(d / IDX_FILES["train_labels"], 2049)
    vx = read_idx(d / IDX_FILES["test_images"], 2051)[:, None]
    vy = read_idx(d / IDX_FILES["test_labels"], 2049)
    for x, y, split in ((tx, ty, "train"), (vx, vy, "test")):
        if len(x) != len(y):
            raise DataError(f"{name}: {split} has {len(x)} images but {len(y)} labels in {d}")
    return _build(name, classes, tx, ty, vx, vy, val_fraction, seed)


# ----------------------------------------------------------------------------- CIFAR-10

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_FOLDER = "cifar-10-batches-bin"
CIFAR10_RECORD = 1 + 3 * 32 * 32


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path}: missing")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR10_RECORD:
        raise DataError(
            f"{path}: {raw.size} bytes is not a whole number of {CIFAR10_RECORD}-byte records "
            "(truncated?); re-download cifar-10-binary.tar.gz"
        )
    records = raw.reshape(-1, CIFAR10_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DataError(f"{path}: label byte {labels.max()} out of range 0-9; not CIFAR-10 binary")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def download_cifar10(root: Path, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5) -> Path:
    """Download and unpack the official binary archive into `root`, checking its md5. A failed
    download leaves no trace: the folders it created are removed again. (torchvision's
    `download_and_extract_archive` leaves a bad download behind, says only "File not found or
    corrupted." and unpacks without tarfile's "data" filter; hence this one.)"""
    created = next((p for p in reversed([root, *root.parents]) if not p.exists()), None)
    root.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} -> {root} ...", flush=True)
    with tempfile.NamedTemporaryFile(dir=root, suffix=".tar.gz", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    ok = False
    try:
        urllib.request.urlretrieve(url, tmp_path)
        actual = _md5(tmp_path)
        if actual != md5:
            raise DataError(
                f"{url}: md5 {actual} does not match the published {md5}; the download is "
                "corrupted, delete it and try again"
            )
        with tarfile.open(tmp_path, "r:gz") as tar:
            tar.extractall(root, filter="data")  # "data" refuses absolute paths and links out
        ok = True
    finally:
        tmp_path.unlink(missing_ok=True)
        if not ok and created is not None:
            shutil.rmtree(created, ignore_errors=True)
    return root / CIFAR10_FOLDER


def find_cifar10(data_dir: str, download: bool = True) -> Path:
    d = Path(data_dir)
    for candidate in (d, d / CIFAR10_FOLDER):
        if (candidate / "test_batch.bin").is_file():
            return candidate
    where = (
        f"put the official binary version there ({d}/{CIFAR10_FOLDER}/data_batch_1..5.bin, "
        f"test_batch.bin, batches.meta.txt; from {CIFAR10_URL}) and pass --data-dir"
    )
    if not download:
        raise DataError(f"cifar10: not found in {d}; {where}")
    try:
        return download_cifar10(d)
    except (OSError, urllib.error.URLError) as e:
        raise DataError(
            f"cifar10: not found in {d} and the download failed ({e}); {where}"
        ) from None


def load_cifar10(data_dir: str, val_fraction: float, seed: int, download: bool = True) -> Dataset:
    folder = find_cifar10(data_dir, download)
    parts = [read_cifar_batch(folder / f"data_batch_{i}.bin") for i in range(1, 6)]
    tx = np.concatenate([p[0] for p in parts])
    ty = np.concatenate([p[1] for p in parts])
    vx, vy = read_cifar_batch(folder / "test_batch.bin")
    meta = folder / "batches.meta.txt"
    lines = meta.read_text().splitlines() if meta.is_file() else []
    classes = [c.strip() for c in lines if c.strip()]
    if len(classes) != 10:
        raise DataError(f"{meta}: expected 10 class names, one per line, found {len(classes)}")
    return _build("cifar10", classes, tx, ty, vx, vy, val_fraction, seed)


# ----------------------------------------------------------------------------- encoded images


def load_encoded(
    spec: str, image_size: int, val_fraction: float, seed: int, max_bad_images: int = 100,
) -> Dataset:
    """`imagefolder:` / `parquet:` decoded once into memory (`--data-mode memory`): listed by
    `raycls.sources`, decoded in parallel by Ray Data with the validation rule of
    `raycls.stream` (centre crop, the one decoder), collected as uint8 arrays. Files that do
    not decode are skipped and named; more than `max_bad_images` of them stop the load."""
    from raycls.sources import SourceError, open_source
    from raycls.stream import DEFAULT_IMAGE_SIZE, decode_batch

    try:
        src = open_source(spec, val_fraction, seed)
    except SourceError as e:
        raise DataError(str(e)) from None
    size = image_size or DEFAULT_IMAGE_SIZE
    splits, bad = {}, []
    for name, split in src.splits.items():
        ds = split.to_ray().map_batches(
            decode_batch, fn_kwargs={"channels": src.channels, "size": size, "train": False},
            batch_size=64,
        )
        images, labels = [], []
        for b in ds.iter_batches(batch_size=256, batch_format="numpy"):
            ok = b["valid"].astype(bool)
            images.append(b["image"][ok])
            labels.append(b["label"][ok])
            bad += [str(e) for e in b["error"][~ok]]
        x = np.concatenate(images) if images else np.zeros((0, src.channels, size, size), np.uint8)
        y = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        splits[name] = Split(_t(x), _l(y))
    report_bad_images(bad, max_bad_images, src.name)
    empty = Split(_t(np.zeros((0, src.channels, size, size), np.uint8)), _l(np.zeros(0)))
    mean, std = _mean_std(splits["train"].images)
    return Dataset(src.name, src.classes, mean, std, splits["train"], splits["val"],
                   splits.get("test", empty), resize="center-crop")


def _first(bad: list[str], n: int = 5) -> str:
    return "; ".join(bad[:n]) + (f" (and {len(bad) - n} more)" if len(bad) > n else "")


def bad_images_message(what: str, bad: list[str], limit: int) -> str:
    """The error once more than `limit` files did not decode (streaming and memory alike)."""
    return (
        f"{what}: {len(bad)} unreadable image(s), more than --max-bad-images {limit}: "
        f"{_first(bad)}. Fix or remove those files (`raycls data inspect` lists them), or "
        "raise --max-bad-images"
    )


def report_bad_images(bad: list[str], limit: int, what: str) -> None:
    """Warn about skipped files; raise DataError once there are more than `limit` of them."""
    if len(bad) > limit:
        raise DataError(bad_images_message(what, bad, limit))
    if bad:
        import sys

        print(f"[raycls] warning: skipped {len(bad)} unreadable image(s): {_first(bad)}",
              file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- registry

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "imagefolder:PATH", "parquet:PATH")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]  # batches.meta.txt of the official archive, in label order


@dataclass(frozen=True)
class BuiltinShape:
    """What a built-in dataset holds, known without loading it (commands check their inputs
    against it before any data loads)."""

    channels: int
    image_size: int  # native; `--image-size` resizes
    classes: tuple[str, ...]


BUILTIN_SHAPES = {
    "digits": BuiltinShape(1, 8, tuple(MNIST_CLASSES)),
    "mnist": BuiltinShape(1, 28, tuple(MNIST_CLASSES)),
    "fashion-mnist": BuiltinShape(1, 28, tuple(FASHION_CLASSES)),
    "cifar10": BuiltinShape(3, 32, tuple(CIFAR10_CLASSES)),
}


def load_dataset(
    name: str, data_dir: str = "data", image_size: int = 0, val_fraction: float = 0.1,
    seed: int = 0, download: bool = True, max_bad_images: int = 100,
) -> Dataset:
    """Load a dataset by registry name; see the module docstring for the names."""
    if name == "digits":
        ds = load_digits(val_fraction, seed)
    elif name == "mnist":
        ds = load_idx_dataset("mnist", data_dir, MNIST_CLASSES, val_fraction, seed)
    elif name == "fashion-mnist":
        ds = load_idx_dataset("fashion-mnist", data_dir, FASHION_CLASSES, val_fraction, seed)
    elif name == "cifar10":
        ds = load_cifar10(data_dir, val_fraction, seed, download)
    elif name.startswith(("imagefolder:", "parquet:")):
        return load_encoded(name, image_size, val_fraction, seed, max_bad_images)
    else:
        raise DataError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    if image_size and image_size != ds.image_size:
        ds = resize_dataset(ds, image_size)
    return ds


def resize_dataset(ds: Dataset, size: int) -> Dataset:
    """Bilinear resize of every split (e.g. to feed 28x28 digits to a 32x32-minimum model)."""
    import torch.nn.functional as F

    def rs(s: Split) -> Split:
        x = F.interpolate(s.images.float(), size=(size, size), mode="bilinear", antialias=True)
        return Split(x.round().clamp(0, 255).to(torch.uint8), s.labels)

    return Dataset(ds.name, ds.classes, ds.mean, ds.std, rs(ds.train), rs(ds.val), rs(ds.test),
                   ds.resize)
